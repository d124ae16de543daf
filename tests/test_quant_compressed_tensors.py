"""compressed-tensors checkpoints: the layout read back by the library itself, HF parity, refusals.

The independent reader is the compressed-tensors library's own model-free dequantizer
(``CompressedTensorsDequantizer``, which runs its compressors' ``decompress``): it turns
each checkpoint ``tokenmill quantize --format compressed-tensors|int8`` wrote into float
weights. Our loader's dequantized weights must equal them, and HF transformers' greedy
tokens on them must equal ours on the quantized checkpoint for every architecture
(weight-only and FP8 schemes; W8A8 quantizes activations too, so it reports agreement).
"""
from __future__ import annotations

import json

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.quant.checkpoint import rewrite_checkpoint
from tokenmill.quant.quantizer import quantize_checkpoint
from tokenmill.testing import hf_greedy, make_tiny_model

SCHEMES = {  # label: (format, quantize_checkpoint kwargs)
    "w4a16-g32": ("compressed-tensors", dict(scheme="w4a16", group_size=32)),
    "w4a16-g64-asym": ("compressed-tensors", dict(scheme="w4a16", group_size=64, sym=False)),
    "fp8": ("compressed-tensors", dict(scheme="fp8")),
    "int8": ("int8", {}),
    "w8a8": ("compressed-tensors", dict(scheme="w8a8")),
}
QPARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "input_scale")


def _quantize(arch: str, label: str, tmp_path):
    fmt, kwargs = SCHEMES[label]
    return quantize_checkpoint(make_tiny_model(arch), tmp_path / f"q-{label}", fmt, **kwargs)


def library_dequantized(q, dst):
    """A plain float checkpoint of ``q`` through the compressed-tensors library's dequantizer."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    tensors = load_file(str(q / "model.safetensors"))
    # The model-free reader matches modules by name only: tell it the embedding is no Linear.
    reader = CompressedTensorsDequantizer(str(q), ignore=["re:.*embed_tokens$"], dtype=torch.float32)
    floats = reader.validate(dict(tensors))  # also fails on leftover (orphan) quantization params

    def convert(name, tensor):
        base, _, suffix = name.rpartition(".")
        if suffix in QPARAMS:
            return {f"{base}.weight": floats[f"{base}.weight"]} if suffix == "weight_packed" else {}
        return {name: floats[name]}

    return rewrite_checkpoint(q, dst, convert, config_remove=("quantization_config",)), floats


@pytest.mark.parametrize("label", list(SCHEMES))
def test_layout_matches_the_library_reader(tmp_path, label):
    from safetensors import safe_open

    q = _quantize("llama", label, tmp_path)
    cfg = json.loads((q / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["quantization_status"] == "compressed"
    h = safe_open(str(q / "model.safetensors"), "pt")
    name = "model.layers.0.self_attn.q_proj"
    if label.startswith("w4a16") or label == "int8":
        bits = 4 if label.startswith("w4a16") else 8
        assert cfg["format"] == "pack-quantized"
        packed = h.get_tensor(f"{name}.weight_packed")
        assert packed.dtype == torch.int32 and packed.shape == (128, 128 * bits // 32)
        assert h.get_tensor(f"{name}.weight_shape").tolist() == [128, 128]
        assert (f"{name}.weight_zero_point" in h.keys()) == label.endswith("asym")
    else:
        assert cfg["format"] == ("float-quantized" if label == "fp8" else "int-quantized")
        assert h.get_tensor(f"{name}.weight").dtype == (torch.float8_e4m3fn if label == "fp8" else torch.int8)
        assert h.get_tensor(f"{name}.weight_scale").shape == (128, 1)
    assert "lm_head.weight" in h.keys() and "model.embed_tokens.weight" in h.keys()

    _, floats = library_dequantized(q, tmp_path / "dq")
    llm = LLM(model=str(q), dtype="float32")
    method = llm.engine.runner.quantization
    assert method.format == "compressed-tensors"
    layers = llm.engine.runner.model.model.layers
    for i, layer, parts in ((0, layers[0].self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj",
                                                                "self_attn.v_proj")),
                            (1, layers[1].mlp.down_proj, ("mlp.down_proj",))):
        ours = method.dequantized(layer, None, torch.float32)
        theirs = torch.cat([floats[f"model.layers.{i}.{p}.weight"] for p in parts])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_pack_quantized_nibbles_as_documented(tmp_path):
    """Written from the format's description, not the library: 8 values per int32, low bits first, +8."""
    from safetensors import safe_open

    q = _quantize("llama", "w4a16-g32", tmp_path)
    _, floats = library_dequantized(q, tmp_path / "dq")
    h = safe_open(str(q / "model.safetensors"), "pt")
    base = "model.layers.0.mlp.up_proj"
    packed = h.get_tensor(f"{base}.weight_packed").to(torch.int64) & 0xFFFFFFFF
    scale = h.get_tensor(f"{base}.weight_scale").to(torch.float32)
    values = torch.stack([(packed >> (4 * i)) & 15 for i in range(8)], dim=-1).reshape(packed.shape[0], -1) - 8
    w = values.to(torch.float32) * scale.repeat_interleave(32, dim=1)
    assert torch.equal(w, floats[f"{base}.weight"])


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral"]
MODES = {"plain": {}, "chunked": {"max_num_batched_tokens": 7},
         "preempt": {"num_blocks": 12, "block_size": 4, "enable_prefix_caching": False}}
PARITY = ["w4a16-g32", "w4a16-g64-asym", "fp8", "int8"]
CASES = [(s, a, list(MODES)[(i + j) % 3]) for j, s in enumerate(PARITY) for i, a in enumerate(ARCHS)]
NEW_TOKENS = 12
TEXTS = ["def fibonacci(n):\n    return", "The quick brown fox", "import os\nimport sys\n\nclass Config:\n"]


def _prompts(arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tiny_model(arch)))
    return [tok.encode(t) for t in TEXTS]


def _generate(path, prompts, **engine):
    llm = LLM(model=str(path), dtype="float32", **engine)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return llm, [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.mark.parametrize("label,arch,mode", CASES)
def test_greedy_matches_hf_on_library_dequantized(tmp_path, label, arch, mode):
    q = _quantize(arch, label, tmp_path)
    dq, _ = library_dequantized(q, tmp_path / "dq")
    prompts = _prompts(arch)
    llm, got = _generate(q, prompts, **MODES[mode])
    assert got == hf_greedy(dq, prompts, NEW_TOKENS)
    if mode == "preempt":
        assert llm.stats().num_preemptions > 0


def test_w8a8_agreement_with_fp32(tmp_path):
    prompts = _prompts("llama")
    _, fp32 = _generate(make_tiny_model("llama"), prompts)
    _, w8a8 = _generate(_quantize("llama", "w8a8", tmp_path), prompts)
    same = sum(a == b for x, y in zip(fp32, w8a8) for a, b in zip(x, y)) / sum(map(len, fp32))
    print(f"compressed-tensors w8a8 greedy agreement with fp32: {same:.1%}")
    assert same > 0.5  # per-token int8 activations on random weights: close, not equal


def _refused(tmp_path, edit, match):
    q = _quantize("llama", "w4a16-g32", tmp_path)
    cfg = json.loads((q / "config.json").read_text())
    edit(cfg["quantization_config"])
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        LLM(model=str(q), dtype="float32")


def _group(c):
    return c["config_groups"]["group_0"]


@pytest.mark.parametrize("edit,match", [
    (lambda c: _group(c)["weights"].update(num_bits=2), "pack-quantized weights of 2 bits are not supported"),
    (lambda c: c.update(format="nvfp4-pack-quantized"), "format 'nvfp4-pack-quantized' is not supported"),
    (lambda c: c.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparse-24-bitmask.*not supported"),
    (lambda c: c.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (lambda c: c.update(quantization_status="frozen"), "quantization_status 'frozen' is not supported"),
    (lambda c: _group(c).update(output_activations={"num_bits": 8}), "output_activations"),
    (lambda c: _group(c).update(input_activations={"num_bits": 8, "type": "int", "strategy": "tensor",
                                                   "dynamic": False}), "input_activations 8-bit int tensor"),
    (lambda c: _group(c)["weights"].update(strategy="block", block_structure=[32, 32], group_size=None),
     "strategy 'block' is not supported"),
    (lambda c: _group(c).update(targets=["re:.*q_proj$"]), "fused projections .* have different schemes"),
])
def test_unsupported_schemes_refused_at_load(tmp_path, edit, match):
    _refused(tmp_path, edit, match)
