"""Cases of the Triton quantization methods the conformance suite's grid does not reach, run under
Triton's interpreter by tests/test_triton_quant.py (``python tests/triton_quant_cases.py`` with
``TRITON_INTERPRET=1``). Prints one JSON object: case label -> worst relative error against
the core's reference class in float32 (or the error message).

Each case loads the same checkpoint tensors into the Triton class (on CPU tensors, interpreted)
and into the core's reference class, through the engine's loading path.
"""
from __future__ import annotations

import json
import sys
import types

import torch

from tokenmill.conformance.quant_cases import Geometry, QuantCase
from tokenmill.conformance.quant_checks import _build
from tokenmill.kernels.triton import quant as tq
from tokenmill.quant import quantizer as q
from tokenmill.quant.awq import AWQMethod
from tokenmill.quant.fp8 import Fp8Method
from tokenmill.quant.gptq import GPTQMethod
from tokenmill.quant.int8 import Int8Method


def uneven_groups(bits, group):
    """act-order whose groups are not runs of ``group`` once sorted: the kernel reads ``gidx``."""
    def tensors(w, order):
        t = q.gptq_quantize(w, bits, group, True, order)
        k = w.shape[1]
        t["g_idx"] = torch.randint(0, k // group, (k,), generator=torch.Generator().manual_seed(1)).to(torch.int32)
        return t
    return QuantCase("uneven", q.checkpoint_config("gptq", bits=bits, group_size=group, desc_act=True), tensors)


def gptq(bits, group, sym=True, act=False):
    cfg = q.checkpoint_config("gptq", bits=bits, group_size=group, desc_act=act, sym=sym)
    return QuantCase("gptq", cfg, lambda w, o: q.gptq_quantize(w, bits, group, sym, o if act else None))


CASES = {
    # (name): (Triton class, reference class, key, case, geometry, token counts)
    "gptq4 uneven act-order groups": (tq.TritonGPTQMethod, GPTQMethod, "gptq", uneven_groups(4, 32),
                                      Geometry("g", 128, 64), (1, 5)),
    "gptq4 act-order experts": (tq.TritonGPTQMethod, GPTQMethod, "gptq", gptq(4, 32, act=True),
                                Geometry("e", 128, 64, num_experts=3), (3,)),
    "gptq4 many M tiles, K tail": (tq.TritonGPTQMethod, GPTQMethod, "gptq", gptq(4, -1, sym=False),
                                   Geometry("m", 96, 48, bias=True), (70,)),
    "gptq8 unaligned rows (reference fallback)": (tq.TritonGPTQMethod, GPTQMethod, "gptq", gptq(8, -1),
                                                  Geometry("u", 36, 32), (2,)),
    "awq g64 fused": (tq.TritonAWQMethod, AWQMethod, "awq",
                      QuantCase("awq", q.checkpoint_config("awq", group_size=64), lambda w, o: q.awq_quantize(w, 64)),
                      Geometry("f", 192, 80, shard_sizes={"a": 48, "b": 16, "c": 16}), (1, 33)),
    "int8 K tail": (tq.TritonInt8Method, Int8Method, "int8", QuantCase("online", None, lambda w, o: {"weight": w}),
                    Geometry("k", 80, 40, bias=True), (1, 17)),
    "w8a8 K tail": (tq.TritonInt8Method, Int8Method, "w8a8", QuantCase("online", None, lambda w, o: {"weight": w}),
                    Geometry("k", 80, 40, bias=True), (1, 17)),
    "fp8 checkpoint fused": (tq.TritonFp8Method, Fp8Method, "fp8",
                             QuantCase("fp8", q.checkpoint_config("fp8"), lambda w, o: q.fp8_quantize(w)),
                             Geometry("f", 128, 96, shard_sizes={"a": 64, "b": 32}), (1, 7)),
    "fp8 online experts": (tq.TritonFp8Method, Fp8Method, "fp8", QuantCase("online", None, lambda w, o: {"weight": w}),
                           Geometry("e", 128, 64, num_experts=2), (4,)),
}


def run(name, dtype):
    cls, ref_cls, key, case, geometry, tokens = CASES[name]
    gen = torch.Generator().manual_seed(0)
    weights = case.checkpoint(geometry, gen)
    bias = torch.randn(geometry.out_features, generator=gen) * 0.1 if geometry.bias else None
    ours = _build(cls, key, case, geometry, dtype, "cpu", weights, bias)
    ref = _build(ref_cls, key, case, geometry, torch.float32, "cpu", weights, bias)
    worst = 0.0
    for t in tokens:
        x = torch.randn(t, geometry.in_features, generator=gen).to(dtype)
        expert = geometry.num_experts - 1 if geometry.num_experts else None
        with torch.no_grad():
            got, want = ours(x, expert), ref(x.float(), expert)
        assert got.dtype == dtype and got.shape == want.shape
        worst = max(worst, float((got.float() - want).abs().max() / want.abs().max()))
    return {"err": worst, "kernel": bool(ours.triton_ok), "gidx": getattr(ours, "gidx", None) is not None}


def main():
    fp8_platform = types.SimpleNamespace(capabilities=types.SimpleNamespace(fp8=True))
    no_fp8 = types.SimpleNamespace(capabilities=types.SimpleNamespace(fp8=False))
    out = {"fp8 available": [tq.TritonFp8Method.available(fp8_platform), tq.TritonFp8Method.available(no_fp8)]}
    for name in CASES:
        for dtype in (torch.float32, torch.float16):
            try:
                out[f"{name}/{dtype}"] = run(name, dtype)
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                out[f"{name}/{dtype}"] = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
