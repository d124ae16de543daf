"""CPU quantized matmuls: torch's packed int8 kernels instead of dequantizing every weight per step.

``int8`` (weight-only, bfloat16 activations): ``torch._weight_int8pack_mm`` multiplies the
activations by int8 weights with per-row scales without materialising the float weight; in
float32 and float16 that kernel is slower than the reference, which serves them. ``w8a8``:
``torch._int_mm`` runs the int8 x int8 -> int32 GEMM; the per-token and per-channel
scales are applied as in the core's reference, whose int64 accumulation it matches
exactly. Both subclass the core's :class:`~tokenmill.quant.int8.Int8Method`, keep its
parameters and refusals, and are checked against it by the conformance suite. The 4-bit
GPTQ and AWQ classes are in :mod:`tokenmill_cpu.quant4`.
"""
from __future__ import annotations

import torch

from tokenmill.quant.int8 import Int8Method, quantize_per_token
from tokenmill.quant.params import expert_view
from tokenmill_cpu.quant4 import CPU_INT4_METHODS


class CpuInt8Method(Int8Method):
    """``int8`` / ``w8a8`` on CPU through torch's int8 kernels."""

    device_types = ("cpu",)
    priority = 10

    @classmethod
    def available(cls, platform) -> str | None:
        missing = [op for op in ("_weight_int8pack_mm", "_int_mm") if not hasattr(torch, op)]
        return f"this torch lacks torch.{', torch.'.join(missing)}" if missing else None

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        # Measured (one thread, a 2048x512 layer): in float32 the int8pack kernel takes 0.9 / 7.4 / 57 ms
        # at 1 / 8 / 64 tokens where dequantize-then-F.linear takes 0.6 / 0.7 / 2.5 ms; in bfloat16 it
        # is the faster one at decode (0.07 / 0.25 ms).
        if not self.activations and dtype is not None and dtype != torch.bfloat16:
            raise ValueError(f"int8 weight-only on cpu: torch's int8pack matmul serves bfloat16 activations only "
                             f"(in {dtype} it is slower than the reference's dequantize-then-matmul)")

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        if self.activations:  # _int_mm wants the [K, N] operand: keep the transpose, not a copy per step
            layer.qweight_t = layer.qweight.data.transpose(-1, -2)

    def apply(self, layer, x, bias=None, expert=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        scale = expert_view(layer.weight_scale, expert)
        if self.activations:
            a, t = quantize_per_token(x2)
            acc = torch._int_mm(a, expert_view(layer.qweight_t, expert)).to(torch.float32)
            y = (acc * t * scale).to(x.dtype)
        else:
            y = torch._weight_int8pack_mm(x2, expert_view(layer.qweight, expert), scale.to(x.dtype))
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


CPU_QUANT_METHODS = [CpuInt8Method, *CPU_INT4_METHODS]
