"""The cpu plugin's oneDNN-packed float linears: chosen for float32, packed once, same tokens as F.linear."""
from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.models.layers import Linear
from tokenmill.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _linears(llm):
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]


def test_float32_linears_are_packed_and_match_f_linear():
    from tokenmill_cpu.linear import CpuPackedLinearMethod

    prompts = [[5, 9, 13, 2, 7, 11, 3], [4, 4, 8, 1]]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    packed = LLM(model=str(make_tiny_model("llama")), device="cpu", dtype="float32")
    linears = _linears(packed)
    assert linears and all(type(m.method) is CpuPackedLinearMethod for m in linears)
    assert all(m.weight.is_mkldnn for m in linears)  # only the packed copy is kept
    assert any(m.prefix == "lm_head" for m in linears)
    got = packed.generate([{"prompt_token_ids": p} for p in prompts], params)
    plain = LLM(model=str(make_tiny_model("llama")), device="cpu", dtype="float32", reference_ops=True)
    assert not any(m.weight.is_mkldnn for m in _linears(plain))
    want = plain.generate([{"prompt_token_ids": p} for p in prompts], params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            tok = next(iter(b))
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4


def test_bfloat16_is_packed_where_onednn_has_bf16_and_float16_keeps_f_linear():
    from tokenmill.quant import UnquantizedMethod
    from tokenmill_cpu.linear import CpuPackedLinearMethod

    path = str(make_tiny_model("llama"))
    if torch.bfloat16 in CpuPackedLinearMethod.dtypes():
        bf16 = LLM(model=path, device="cpu", dtype="bfloat16")
        assert all(type(m.method) is CpuPackedLinearMethod and m.weight.is_mkldnn for m in _linears(bf16))
        ref = LLM(model=path, device="cpu", dtype="bfloat16", reference_ops=True)
        params = SamplingParams(max_tokens=8, temperature=0)
        a = bf16.generate([{"prompt_token_ids": [5, 9, 13, 2]}], params)[0].outputs[0].token_ids
        b = ref.generate([{"prompt_token_ids": [5, 9, 13, 2]}], params)[0].outputs[0].token_ids
        assert len(a) == len(b) == 8 and a[0] == b[0]  # bf16 rounding may part them later, never at once
    llm = LLM(model=path, device="cpu", dtype="float16")
    assert all(type(m.method) is UnquantizedMethod and not m.weight.is_mkldnn for m in _linears(llm))
