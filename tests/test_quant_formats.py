"""GPTQ, AWQ and FP8 checkpoints: the quantizer's layouts, read back independently, and HF parity.

The unpacking below is written from the formats' documentation, independently of
``tokenmill.quant``: it turns each quantized checkpoint into a plain float checkpoint, on
which HF transformers' greedy tokens must equal ours on the quantized checkpoint, for
every architecture; the engine modes (plain, chunked prefill, preemption) rotate over
the architectures so each format meets each mode.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.quant.checkpoint import rewrite_checkpoint
from tokenmill.quant.quantizer import quantize_checkpoint
from tokenmill.testing import hf_greedy, make_tiny_model

AWQ_FIELD_TO_COLUMN = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order


def _u32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32).astype(np.int64)


def doc_gptq(parts: dict, bits: int, offset: int = 1) -> torch.Tensor:
    qw, qz = _u32(parts["qweight"]), _u32(parts["qzeros"])
    per, mask = 32 // bits, (1 << bits) - 1
    k, n = qw.shape[0] * per, qw.shape[1]
    q = np.stack([(qw[i // per] >> (bits * (i % per))) & mask for i in range(k)])
    z = np.stack([((qz[:, j // per] >> (bits * (j % per))) & mask) + offset for j in range(n)], axis=1)
    g = parts["g_idx"].numpy().astype(np.int64)
    w = (q - z[g]) * parts["scales"].float().numpy()[g]
    return torch.from_numpy(w.T.astype(np.float32))


def doc_awq(parts: dict, group: int) -> torch.Tensor:
    def unpack(packed):
        p = _u32(packed)
        out = np.zeros((p.shape[0], p.shape[1] * 8), dtype=np.int64)
        for j in range(p.shape[1]):
            for field, col in enumerate(AWQ_FIELD_TO_COLUMN):
                out[:, 8 * j + col] = (p[:, j] >> (4 * field)) & 15
        return out

    q, z = unpack(parts["qweight"]), unpack(parts["qzeros"])
    g = np.arange(q.shape[0]) // group
    w = (q - z[g]) * parts["scales"].float().numpy()[g]
    return torch.from_numpy(w.T.astype(np.float32))


def doc_fp8(parts: dict) -> torch.Tensor:
    return parts["weight"].to(torch.float32) * parts["weight_scale"].to(torch.float32)


FORMATS = {
    "gptq4-g32": (dict(fmt="gptq", bits=4, group_size=32), lambda p: doc_gptq(p, 4)),
    "gptq4-g64-act": (dict(fmt="gptq", bits=4, group_size=64, desc_act=True), lambda p: doc_gptq(p, 4)),
    "gptq8-channel-asym": (dict(fmt="gptq", bits=8, group_size=-1, sym=False), lambda p: doc_gptq(p, 8)),
    "awq-g32": (dict(fmt="awq", group_size=32), lambda p: doc_awq(p, 32)),
    "fp8": (dict(fmt="fp8"), doc_fp8),
}
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight")


def dequantize_documented(src, dst, unpack):
    """A plain float checkpoint from a quantized one, through the documented unpacking."""
    from safetensors import safe_open

    handle = safe_open(str(src / "model.safetensors"), "pt")
    groups: dict[str, dict] = {}
    for name in handle.keys():
        base, _, suffix = name.rpartition(".")
        if suffix in SUFFIXES and any(f"{base}.{s}" in handle.keys() for s in ("qweight", "weight_scale")):
            groups.setdefault(base, {})[suffix] = handle.get_tensor(name)

    def convert(name, tensor):
        base, _, suffix = name.rpartition(".")
        if base not in groups:
            return {name: tensor}
        if suffix not in SUFFIXES:
            return {name: tensor}  # a bias stays as it is
        if suffix != ("qweight" if "qweight" in groups[base] else "weight"):
            return {}
        return {f"{base}.weight": unpack(groups[base])}

    return rewrite_checkpoint(src, dst, convert, config_remove=("quantization_config",))


def test_gptq_layout_conventions(tmp_path):
    from tokenmill.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(make_tiny_model("llama")), str(out), "--format", "gptq", "--group-size", "32"]) == 0
    from safetensors import safe_open

    h = safe_open(str(out / "model.safetensors"), "pt")
    qz = h.get_tensor("model.layers.0.self_attn.q_proj.qzeros")
    assert qz.dtype == torch.int32 and qz.shape == (128 // 32, 128 // 8)
    assert (qz == 0x77777777).all()  # symmetric 4-bit: zero 8 stored as 7 in every nibble
    assert h.get_tensor("model.layers.0.self_attn.q_proj.qweight").shape == (128 // 8, 128)
    assert h.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
    assert h.get_tensor("model.layers.0.self_attn.q_proj.g_idx").tolist() == [i // 32 for i in range(128)]
    assert "model.embed_tokens.weight" in h.keys() and "lm_head.weight" in h.keys()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4


def test_refuses_unsupported_parameters(tmp_path):
    from tokenmill.plugins import get_plugin_manager
    from tokenmill.quant.registry import checkpoint_quantization, resolve_quantization

    src = make_tiny_model("llama")
    out = quantize_checkpoint(src, tmp_path / "q", "gptq", bits=4, group_size=32)
    cfg = json.loads((out / "config.json").read_text())
    good = cfg["quantization_config"]
    pm = get_plugin_manager()
    cpu = next(p for p in pm.platforms() if p.name == "cpu")
    for bad, why in (({"bits": 3}, "bits=3"), ({"checkpoint_format": "marlin"}, "checkpoint_format"),
                     ({"static_groups": True}, "static_groups"),
                     ({"quant_method": "awq", "version": "gemv"}, "version='gemv'"),
                     ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise")):
        qcfg = {**good, **bad}
        with pytest.raises(ValueError, match=why):
            resolve_quantization(pm.registered("quantization_methods"), cpu, torch.float32, qcfg)
    cfg["quantization_config"] = {**good, "bits": 3}
    (out / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_quantization(out)["bits"] == 3
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        LLM(model=str(out), dtype="float32")


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral"]
MODES = {"plain": {}, "chunked": {"max_num_batched_tokens": 7},
         "preempt": {"num_blocks": 12, "block_size": 4, "enable_prefix_caching": False}}
CASES = [(f, a, list(MODES)[(i + j) % 3]) for j, f in enumerate(FORMATS) for i, a in enumerate(ARCHS)]
NEW_TOKENS = 16
TEXTS = ["def fibonacci(n):\n    return", "The quick brown fox", "import os\nimport sys\n\nclass Config:\n"]


@pytest.mark.parametrize("fmt,arch,mode", CASES)
def test_greedy_matches_hf_on_dequantized(tmp_path, fmt, arch, mode):
    from transformers import AutoTokenizer

    kwargs, unpack = FORMATS[fmt]
    kwargs = dict(kwargs)
    src = make_tiny_model(arch)
    q = quantize_checkpoint(src, tmp_path / "q", kwargs.pop("fmt"), **kwargs)
    dq = dequantize_documented(q, tmp_path / "dq", unpack)
    tok = AutoTokenizer.from_pretrained(str(src))
    prompts = [tok.encode(t) for t in TEXTS]
    want = hf_greedy(dq, prompts, NEW_TOKENS)
    llm = LLM(model=str(q), dtype="float32", **MODES[mode])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert got == want
    assert llm.engine.runner.quantization.format == ("fp8" if fmt == "fp8" else fmt.split("-")[0][:4])
    if mode == "preempt":
        assert llm.stats().num_preemptions > 0


def test_fp8_matmul_only_where_the_platform_declares_fp8():
    from types import SimpleNamespace

    from tokenmill.plugins import get_plugin_manager
    from tokenmill.quant.fp8 import Fp8Method, Fp8ScaledMMMethod, quantize_fp8_per_channel
    from tokenmill.quant.registry import resolve_quantization

    methods = get_plugin_manager().registered("quantization_methods")
    plain = SimpleNamespace(name="cpu", capabilities=SimpleNamespace(fp8=False))
    fp8 = SimpleNamespace(name="cpu", capabilities=SimpleNamespace(fp8=True))
    assert type(resolve_quantization(methods, plain, torch.float32, None, "fp8")) is Fp8Method
    fast = resolve_quantization(methods, fp8, torch.float32, None, "fp8")
    assert type(fast) is Fp8ScaledMMMethod
    q, s = quantize_fp8_per_channel(torch.randn(48, 64))
    layer = SimpleNamespace(weight=q, weight_scale=s)
    x = torch.randn(5, 64)
    ref = Fp8Method("fp8", None, torch.float32).apply(layer, x)
    got = fast.apply(layer, x)
    # FP8 activations (3 mantissa bits) against float activations: a few percent
    assert (got - ref).abs().max() <= 0.08 * ref.abs().max()
