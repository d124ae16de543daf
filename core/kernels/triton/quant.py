"""Quantization methods around the shared Triton dequantize-matmuls (Triton is imported on first use).

Each class subclasses the core's reference method of its format, so it loads the same
checkpoint tensors and refuses the same configurations; after loading it repacks them
for :mod:`tokenmill.kernels.triton.quant_matmul` and its ``apply`` runs the kernel.
:func:`tokenmill.kernels.triton.quant_methods` subclasses them per platform.

Repacks, done once in ``process_weights_after_loading``:

* GPTQ: ``qweight`` already is the kernel's layout. ``qzeros`` is unpacked to int16
  ``zeros [G, N]`` with the checkpoint format's offset applied. With ``desc_act`` the
  inputs are sorted by group (``perm``, applied to ``x`` per call, and to ``qweight``'s
  rows once), so a tile of inputs reads one group's scales; ``gidx`` is kept only when
  the sorted groups are not runs of ``group_size``.
* AWQ: ``qweight`` ``[K, N / 8]`` in AWQ's interleaved order is unpacked and repacked
  along ``K`` as GPTQ's ``[K / 8, N]``; ``qzeros`` as GPTQ's.
* int8 / w8a8 / FP8: the reference's ``[N, K]`` one-byte weight and per-row scale as is.

A layer whose sizes a tensor descriptor cannot address (rows not a multiple of 16 bytes)
keeps the reference's ``apply``.
"""
from __future__ import annotations

import torch

from tokenmill.quant.awq import AWQMethod, awq_unpack
from tokenmill.quant.fp8 import Fp8Method
from tokenmill.quant.gptq import GPTQMethod, unpack_cols, unpack_rows
from tokenmill.quant.int8 import Int8Method, quantize_per_token
from tokenmill.quant.params import expert_view, replace_param

#: ``GROUP`` for a per-channel layer: one group, larger than any ``K``.
ONE_GROUP = 1 << 30


def _kernels():
    from tokenmill.kernels.triton import quant_matmul

    return quant_matmul


def pack_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int ``[..., K, N]`` values ``< 2**bits`` -> int32 ``[..., K / p, N]`` packed along K, on ``q``'s device."""
    p = 32 // bits
    v = q.to(torch.int64).reshape(*q.shape[:-2], q.shape[-2] // p, p, q.shape[-1])
    shifts = (torch.arange(p, device=q.device, dtype=torch.int64) * bits).view(p, 1)
    words = (v << shifts).sum(dim=-2)  # disjoint bit fields: the sum is the bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


class _TritonMethod:
    """Mixin: a Triton class is available wherever Triton is installed."""

    @classmethod
    def available(cls, platform) -> str | None:
        from tokenmill.kernels.triton.registration import triton_available

        return None if triton_available() else "triton is not installed"


class _PackedMethod(_TritonMethod):
    """What GPTQ and AWQ share once repacked: ``qweight``, ``zeros``, ``scales`` and the optional ``perm``/``gidx``."""

    bits = 4

    def _store(self, layer, q, zeros, group: int, g_idx=None) -> None:
        """``q`` int ``[.., K, N]`` (natural order), ``zeros`` ``[.., G, N]``; ``g_idx`` ``[.., K]`` for act-order."""
        k = q.shape[-2]
        perm = gidx = None
        if g_idx is not None:
            perm = torch.argsort(g_idx.long(), dim=-1, stable=True)
            sorted_g = torch.gather(g_idx.long(), -1, perm)
            q = torch.gather(q, -2, perm.unsqueeze(-1).expand_as(q))
            runs = torch.arange(k, device=q.device) // group if group != ONE_GROUP else torch.zeros_like(sorted_g)
            if not torch.equal(sorted_g, runs.expand_as(sorted_g)):
                gidx = sorted_g.to(torch.int32).contiguous()
        layer.triton_group = group
        layer.triton_ok = (_kernels().descriptor_ok(k * 2) and _kernels().descriptor_ok(q.shape[-1] * 4))
        for name in ("qweight", "qzeros", "g_idx"):
            replace_param(layer, name, None)
        replace_param(layer, "qweight", pack_k(q, self.bits).contiguous())
        replace_param(layer, "zeros", zeros.to(torch.int16).contiguous())
        layer.perm = None if perm is None else perm.contiguous()
        layer.gidx = gidx

    def apply(self, layer, x, bias=None, expert=None):
        if not layer.triton_ok:
            return self._reference_apply(layer, x, bias, expert)
        shape = x.shape
        x2 = _flat(x)
        if layer.perm is not None:
            x2 = x2.index_select(1, expert_view(layer.perm, expert))
        gidx = expert_view(layer.gidx, expert) if layer.gidx is not None else None
        y = _kernels().packed_matmul(x2, expert_view(layer.qweight, expert), expert_view(layer.scales, expert),
                                     expert_view(layer.zeros, expert), gidx, layer.triton_group, self.bits, bias)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _reference_apply(self, layer, x, bias, expert):
        """Dequantize the repacked weight (for layers the kernel cannot address)."""
        q = unpack_rows(expert_view(layer.qweight, expert), self.bits)
        k = q.shape[0]
        g = expert_view(layer.gidx, expert) if layer.gidx is not None else None
        if g is None:
            g = torch.zeros(k, dtype=torch.long, device=q.device) if layer.triton_group == ONE_GROUP else \
                torch.arange(k, device=q.device) // layer.triton_group
        g = g.long()
        w = (q - expert_view(layer.zeros, expert).int()[g]).float() * expert_view(layer.scales, expert).float()[g]
        y = x.reshape(-1, k)
        if layer.perm is not None:
            y = y.index_select(1, expert_view(layer.perm, expert))
        out = torch.nn.functional.linear(y, w.t().to(x.dtype), bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class TritonGPTQMethod(_PackedMethod, GPTQMethod):
    """GPTQ 4/8-bit (groups, per-channel, act-order, asymmetric) through the Triton packed matmul."""

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)  # the reference's g_idx checks
        q = unpack_rows(layer.qweight.data, self.bits)
        zeros = unpack_cols(layer.qzeros.data, self.bits) + self.cfg["zero_offset"]
        group = ONE_GROUP if self.cfg["group_size"] == -1 else self.cfg["group_size"]
        self._store(layer, q, zeros, group, layer.g_idx.data if self.cfg["desc_act"] else None)


class TritonAWQMethod(_PackedMethod, AWQMethod):
    """AWQ GEMM 4-bit, repacked along K for the Triton packed matmul."""

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        self._store(layer, awq_unpack(layer.qweight.data), awq_unpack(layer.qzeros.data), self.group_size)


class _ScaledMethod(_TritonMethod):
    """int8 / FP8 ``[N, K]`` weights with per-row scales through the Triton scaled matmul."""

    def _mark(self, layer, weight: torch.Tensor) -> None:
        layer.triton_ok = _kernels().descriptor_ok(weight.shape[-1] * weight.element_size())


class TritonInt8Method(_ScaledMethod, Int8Method):
    """``int8`` weight-only and ``w8a8`` (dynamic per-token int8 activations, int32 accumulation) in Triton."""

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        self._mark(layer, layer.qweight)

    def apply(self, layer, x, bias=None, expert=None):
        if not layer.triton_ok:
            return Int8Method.apply(self, layer, x, bias, expert)
        shape = x.shape
        q, scale = expert_view(layer.qweight, expert), expert_view(layer.weight_scale, expert)
        x2 = _flat(x)
        if self.activations:
            a, t = quantize_per_token(x2)
            y = _kernels().scaled_matmul(a, q, scale, bias, a_scale=t.reshape(-1).contiguous(), out_dtype=x.dtype)
        else:
            y = _kernels().scaled_matmul(x2, q, scale, bias)
        return y.reshape(*shape[:-1], y.shape[-1])


class TritonFp8Method(_ScaledMethod, Fp8Method):
    """FP8 e4m3 weights upcast tile by tile in Triton (activations stay float), where the platform has FP8."""

    @classmethod
    def available(cls, platform) -> str | None:
        caps = getattr(platform, "capabilities", None)
        if not getattr(caps, "fp8", False):
            return "the platform declares no FP8 (capabilities.fp8 is false): Triton has no e4m3 there"
        return super().available(platform)

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        self._mark(layer, layer.weight)

    def apply(self, layer, x, bias=None, expert=None):
        if not layer.triton_ok:
            return Fp8Method.apply(self, layer, x, bias, expert)
        shape = x.shape
        y = _kernels().scaled_matmul(_flat(x), expert_view(layer.weight, expert),
                                     expert_view(layer.weight_scale, expert), bias)
        return y.reshape(*shape[:-1], y.shape[-1])


#: The Triton quantization classes, subclassed per platform by :func:`tokenmill.kernels.triton.quant_methods`.
TRITON_QUANT_CLASSES = (TritonGPTQMethod, TritonAWQMethod, TritonInt8Method, TritonFp8Method)
