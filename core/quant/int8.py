"""int8 on the fly: per-output-channel symmetric int8 weights, weight-only (``int8``) or W8A8 (``w8a8``).

The float checkpoint loads as usual; after loading each linear weight ``W [out, in]``
becomes ``q = round(W / s)`` clamped to ``[-127, 127]`` with ``s = max|W_row| / 127``
(float32, one scale per output row), and the float weight is freed.

``int8`` (weight-only): ``y = x @ (q * s).T``; the reference dequantizes, then multiplies.
``w8a8``: activations are quantized too, per token, dynamically: ``a = round(x / t)``
with ``t = max|x_row| / 127``, and ``y = (a @ q.T) * t * s`` with an int32 accumulator
(``torch._int_mm`` where torch has it for the device: an int8 GEMM), so results differ
from float by the activation rounding; the engine reports agreement, not equality.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.interface import LinearSpec, QuantizationMethod
from tokenmill.quant.params import add_param, expert_view, replace_param

QMAX = 127


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., out, in], scale float32 [..., out])``, symmetric per output row."""
    w32 = w.to(torch.float32)
    scale = (w32.abs().amax(dim=-1) / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w32 / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """``q * scale`` per output row, in ``dtype`` (float32 arithmetic)."""
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 activations: ``(a int8 [T, in], scale float32 [T, 1])``."""
    x32 = x.to(torch.float32)
    scale = (x32.abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(x32 / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


class OnlineMethod(QuantizationMethod):
    """Base of the online modes: a float ``weight`` loads as in a float checkpoint, then is quantized."""

    def create_weights(self, layer, spec: LinearSpec) -> None:
        add_param(layer, "weight", (spec.out_features, spec.in_features), spec.dtype, spec, shard_dim=0)


class Int8Method(OnlineMethod):
    """Reference ``int8`` weight-only and ``w8a8``: ``qweight`` int8 ``[out, in]`` and ``weight_scale`` float32 ``[out]``."""

    name = "int8"
    online_modes = ("int8", "w8a8")

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        self.activations = fmt == "w8a8"

    def describe(self) -> str:
        return ("w8a8: int8 weights per output channel, int8 activations per token (dynamic)" if self.activations
                else "int8: int8 weights per output channel, float activations")

    def process_weights_after_loading(self, layer) -> None:
        q, scale = quantize_int8_per_channel(layer.weight.data)
        replace_param(layer, "weight", None)
        replace_param(layer, "qweight", q)
        replace_param(layer, "weight_scale", scale)

    def apply(self, layer, x, bias=None, expert=None):
        q, scale = expert_view(layer.qweight, expert), expert_view(layer.weight_scale, expert)
        if self.activations:
            return w8a8_reference(x, q, scale, bias)
        return F.linear(x, dequantize_int8(q, scale, x.dtype), bias)


def w8a8_reference(x, q, scale, bias=None):
    """``(int8(x) @ q.T) * t * s + bias`` with exact int32 accumulation (int64 on the reference path)."""
    shape = x.shape
    a, t = quantize_per_token(x.reshape(-1, shape[-1]))
    acc = (a.to(torch.int64) @ q.to(torch.int64).T).to(torch.float32)
    y = (acc * t * scale.to(torch.float32)).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], q.shape[0])
