"""The cpu plugin's 4-bit GPTQ/AWQ through torch's int4 matmul: numerics, memory, fallbacks, engine parity.

The engine check is teacher-forced: HF transformers runs float32 on the checkpoint
dequantized by the documented unpacking (tests/test_quant_formats.py), over the prompt
plus the tokens we generated in bfloat16, so each of our greedy tokens is compared with
HF's argmax on the same prefix (free-running greedy in bfloat16 drifts from float32's
after the first near-tie, as HF's own bfloat16 run does).
"""
from __future__ import annotations

import pytest
import torch

from tokenmill.conformance.quant_cases import Geometry, QuantCase
from tokenmill.conformance.quant_checks import _build
from tokenmill.quant import quantizer as qz
from tokenmill.quant.awq import AWQMethod
from tokenmill.quant.gptq import GPTQMethod, pack_rows
from tokenmill_cpu.quant4 import CpuAWQMethod, CpuGPTQMethod


def _gptq(bits=4, group=128, act=False, sym=True, v2=False):
    cfg = qz.checkpoint_config("gptq", bits=bits, group_size=group, desc_act=act, sym=sym)
    if v2:
        cfg["checkpoint_format"] = "gptq_v2"

    def tensors(w, order):
        t = qz.gptq_quantize(w, bits, group, sym, order if act else None)
        if v2:  # gptq_v2 stores the zero itself: undo v1's minus one
            from tokenmill.quant.gptq import pack_cols, unpack_cols
            t["qzeros"] = pack_cols(unpack_cols(t["qzeros"], bits) + 1, bits)
        return t

    return QuantCase(f"gptq{bits}-g{group}{'-act' if act else ''}{'' if sym else '-asym'}{'-v2' if v2 else ''}",
                     cfg, tensors)


def _awq(group):
    return QuantCase(f"awq-g{group}", qz.checkpoint_config("awq", group_size=group),
                     lambda w, o: qz.awq_quantize(w, group))


PACKED = [
    (CpuGPTQMethod, GPTQMethod, "gptq", _gptq(group=128)),
    (CpuGPTQMethod, GPTQMethod, "gptq", _gptq(group=32, act=True)),
    (CpuGPTQMethod, GPTQMethod, "gptq", _gptq(group=-1, sym=False)),  # per channel: scales repeat over 256
    (CpuGPTQMethod, GPTQMethod, "gptq", _gptq(group=64, sym=False, v2=True)),
    (CpuGPTQMethod, GPTQMethod, "gptq", _gptq(group=512)),  # a group the kernel lacks: repeated over 256
    (CpuAWQMethod, AWQMethod, "awq", _awq(64)),
]
GEOMS = [Geometry("fused", 512, 384, shard_sizes={"a": 256, "b": 128}, bias=True),
         Geometry("experts", 512, 256, num_experts=2)]


@pytest.mark.parametrize("cls,ref,key,case", PACKED, ids=[c[3].label for c in PACKED])
@pytest.mark.parametrize("geom", GEOMS, ids=[g.label for g in GEOMS])
def test_packed_layer_matches_reference_and_keeps_only_the_packed_form(cls, ref, key, case, geom):
    gen = torch.Generator().manual_seed(0)
    weights = case.checkpoint(geom, gen)
    bias = torch.randn(geom.out_features, generator=gen) * 0.1 if geom.bias else None
    ours = _build(cls, key, case, geom, torch.bfloat16, "cpu", weights, bias)
    want_layer = _build(ref, key, case, geom, torch.float32, "cpu", weights, bias)
    kept = {n for n, _ in ours.named_parameters()}
    assert kept == {"int4_weight", "int4_scales_zeros"} | ({"bias"} if bias is not None else set())
    assert (ours.int4_perm is not None) == case.quant_config.get("desc_act", False)
    stored = sum(p.untyped_storage().nbytes() for n, p in ours.named_parameters() if n != "bias")
    if ours.int4_perm is not None:
        stored += ours.int4_perm.untyped_storage().nbytes()
    # half a byte a weight, a bfloat16 scale and zero per kernel group and output, 4 bytes an input for desc_act
    e, n, k = geom.num_experts or 1, geom.out_features, geom.in_features
    assert stored == e * (n * k // 2 + (k // ours.int4_group) * n * 4 + (k * 4 if ours.int4_perm is not None else 0))
    if ours.int4_group >= 64:
        assert stored <= 0.30 * e * n * k * 2, f"{stored / (e * n * k * 2):.1%} of bf16"
    for tokens in (1, 5):
        x = torch.randn(tokens, geom.in_features, generator=gen).to(torch.bfloat16)
        for expert in ((0, 1) if geom.num_experts else (None,)):
            got = ours(x, expert).float()
            want = want_layer(x.float(), expert)
            assert got.shape == want.shape
            assert float((got - want).abs().max() / want.abs().max()) < 2e-2


def _layer_with_g_idx(g_idx: torch.Tensor, n: int):
    """A GPTQ 4-bit layer of ``g_idx``'s groups (arbitrary, possibly unequal), loaded through ``cls``."""
    k, groups = g_idx.numel(), int(g_idx.max()) + 1
    gen = torch.Generator().manual_seed(1)
    tensors = {"qweight": pack_rows(torch.randint(0, 16, (k, n), generator=gen), 4),
               "qzeros": qz.pack_cols(torch.full((groups, n), 7), 4),
               "scales": (torch.rand(groups, n, generator=gen) * 0.01 + 0.001).to(torch.float16), "g_idx": g_idx}
    cfg = qz.checkpoint_config("gptq", bits=4, group_size=k // groups, desc_act=True)
    case = QuantCase("custom", cfg, None)
    geom = Geometry("plain", k, n)
    return (_build(CpuGPTQMethod, "gptq", case, geom, torch.bfloat16, "cpu", {None: tensors}, None),
            _build(GPTQMethod, "gptq", case, geom, torch.float32, "cpu", {None: tensors}, None))


@pytest.mark.parametrize("why", ["unequal-groups", "rows-not-multiple-of-16"])
def test_layers_the_kernel_cannot_take_keep_the_reference(why):
    if why == "unequal-groups":
        g_idx = torch.cat([torch.zeros(40), torch.ones(24), torch.full((64,), 2), torch.full((128,), 3)])
        ours, ref = _layer_with_g_idx(g_idx[torch.randperm(256)].to(torch.int32), 64)
    else:
        ours, ref = _layer_with_g_idx((torch.arange(256) // 64).to(torch.int32), 24)
    assert "qweight" in dict(ours.named_parameters()) and "int4_weight" not in dict(ours.named_parameters())
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert float((ours(x).float() - ref(x.float())).abs().max() / ref(x.float()).abs().max()) < 2e-2


def test_refusals_fall_back_to_the_reference():
    from tokenmill.plugins import get_plugin_manager
    from tokenmill.quant.registry import resolve_quantization

    methods = get_plugin_manager().registered("quantization_methods")
    cpu = next(p for p in get_plugin_manager().platforms() if p.name == "cpu")
    g4 = qz.checkpoint_config("gptq", bits=4, group_size=128)
    assert type(resolve_quantization(methods, cpu, torch.bfloat16, g4)) is CpuGPTQMethod
    assert type(resolve_quantization(methods, cpu, torch.bfloat16, qz.checkpoint_config("awq"))) is CpuAWQMethod
    for dtype, cfg, why in ((torch.float32, g4, "bfloat16 activations only"),
                            (torch.float16, g4, "bfloat16 activations only"),
                            (torch.bfloat16, {**g4, "bits": 8}, "takes 4 bits, not 8"),
                            (torch.bfloat16, {**g4, "group_size": 16}, "multiple of 32 inputs, not 16")):
        with pytest.raises(ValueError, match=why):
            CpuGPTQMethod("gptq", cfg, dtype)
        assert type(resolve_quantization(methods, cpu, dtype, cfg)) is GPTQMethod
    with pytest.raises(ValueError, match="not 16"):
        CpuAWQMethod("awq", qz.checkpoint_config("awq", group_size=16), torch.bfloat16)


ENGINE = [("gptq4-g64-act", "llama", "plain"), ("awq-g32", "mistral", "chunked"), ("gptq4-g32", "qwen2", "preempt"),
          ("awq-g32", "qwen3", "plain"), ("gptq4-g64-act", "mixtral", "chunked")]
#: bfloat16 against float32 moves a logit by ~1e-2 here (logits up to ~2.5): a greedy token
#: that is not HF's argmax must be within this of it.
NEAR_TIE = 0.05


@pytest.mark.parametrize("fmt,arch,mode", ENGINE)
def test_engine_greedy_tokens_are_hf_argmax_on_dequantized_weights(tmp_path, fmt, arch, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_quant_formats import FORMATS, MODES, NEW_TOKENS, TEXTS, dequantize_documented
    from tokenmill import LLM, SamplingParams
    from tokenmill.testing import make_tiny_model

    kwargs, unpack = FORMATS[fmt]
    kwargs = dict(kwargs)
    src = make_tiny_model(arch)
    q = qz.quantize_checkpoint(src, tmp_path / "q", kwargs.pop("fmt"), **kwargs)
    dq = dequantize_documented(q, tmp_path / "dq", unpack)
    tok = AutoTokenizer.from_pretrained(str(src))
    prompts = [tok.encode(t) for t in TEXTS]
    llm = LLM(model=str(q), dtype="bfloat16", **MODES[mode])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert type(llm.engine.runner.quantization) in (CpuGPTQMethod, CpuAWQMethod)
    layers = [m for m in llm.engine.runner.model.modules() if getattr(m, "method", None) is llm.engine.runner.quantization]
    assert layers and all(set(m._parameters) <= {"int4_weight", "int4_scales_zeros", "bias"} and
                          set(m._buffers) == {"int4_perm"} for m in layers)
    if mode == "preempt":
        assert llm.stats().num_preemptions > 0
    hf = AutoModelForCausalLM.from_pretrained(str(dq), dtype=torch.float32).eval()
    same = 0
    for p, g in zip(prompts, got):
        with torch.inference_mode():
            logits = hf(input_ids=torch.tensor([p + g])).logits[0, len(p) - 1: len(p) - 1 + len(g)]
        mine = logits[torch.arange(len(g)), torch.tensor(g)]
        gap = logits.max(-1).values - mine
        assert float(gap.max()) <= NEAR_TIE, f"a greedy token {float(gap.max()):.3f} below HF's argmax"
        same += int((gap == 0).sum())
    print(f"{fmt} {arch} {mode}: {same} of {sum(map(len, got))} greedy tokens are HF's float32 argmax, "
          f"the rest within {NEAR_TIE}")


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_linear_weights_at_most_30_percent_of_bf16(tmp_path, fmt):
    """The bench's measure (every tensor the quantizable linear layers keep), groups of 128."""
    from tokenmill import LLM
    from tokenmill.bench.quant_modes import model_bytes
    from tokenmill.testing import make_tiny_model

    src = make_tiny_model("llama")
    q = qz.quantize_checkpoint(src, tmp_path / "q", fmt, group_size=128)
    packed = model_bytes(LLM(model=str(q), dtype="bfloat16").engine.runner.model)[0]
    bf16 = model_bytes(LLM(model=str(src), dtype="bfloat16").engine.runner.model)[0]
    assert packed <= 0.30 * bf16, f"{packed / bf16:.1%} of bf16"
