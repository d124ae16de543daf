"""CPU 4-bit GPTQ and AWQ: torch's packed int4 matmul instead of dequantizing every weight per step.

``torch._convert_weight_to_int4pack_for_cpu`` packs an int32 ``[N, K]`` of values 0..15
into a uint8 ``[N, K / 2]`` (two weights a byte, blocked for its kernel), and
``torch._weight_int4pack_mm_for_cpu(x [M, K], packed, group, sz [K / group, N, 2])``
computes ``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * sz[g, n, 0] + sz[g, n, 1]``
(``g = k // group``; checked numerically in torch 2.13, float32 error 4e-7). The
checkpoints' ``(q - zero) * scale`` is that with ``sz = (scale, (8 - zero) * scale)``.

What the kernel takes, and so what these classes serve (anything else is refused
and the core's reference serves it):

- 4 bits (GPTQ's 8 bits are refused in the constructor).
- bfloat16 activations only. The kernel is vectorised for bfloat16 alone: float32
  and float16 are 20x (one token) to 150x (64 tokens) slower than ``F.linear`` in
  the same dtype here, slower than the reference at prefill, so those are refused.
- groups of 32, 64, 128 or 256 inputs; a larger group (per-channel GPTQ:
  ``group_size -1``) repeats its scales over the largest of those dividing it; a
  layer whose group has none of them keeps the reference.
- ``N`` a multiple of 16 per packed matrix; a layer without it keeps the reference.
- GPTQ ``desc_act``: the inputs are sorted by group once at load (``g_idx``), the
  weight is packed in that order and each call permutes ``x``'s columns to match;
  a layer whose groups are not all ``group_size`` inputs keeps the reference.

After loading only the packed weight, its ``sz`` and (``desc_act``) the input order
stay on the layer: the checkpoint's ``qweight``/``qzeros``/``scales``/``g_idx`` are freed.
"""
from __future__ import annotations

import logging

import torch

from tokenmill.quant.awq import AWQMethod, awq_unpack
from tokenmill.quant.gptq import GPTQMethod, unpack_cols, unpack_rows
from tokenmill.quant.params import expert_view, replace_param

log = logging.getLogger(__name__)

#: The group sizes torch's CPU int4 matmul accepts, largest first.
KERNEL_GROUPS = (256, 128, 64, 32)
#: The checkpoint tensors the packed form replaces.
CHECKPOINT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def kernel_group(group: int) -> int | None:
    """The largest group size the kernel accepts that divides ``group`` (scales repeat over it), or None."""
    return next((g for g in KERNEL_GROUPS if group % g == 0), None)


def pack_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int, dtype):
    """``(packed uint8 [N, K/2], sz [K/kg, N, 2], kg)`` of ``W[n, k] = (q[k, n] - zeros[g]) * scales[g]``.

    ``q`` int ``[K, N]`` (0..15), ``zeros``/``scales`` ``[K / group, N]``, groups contiguous along K.
    """
    kg = kernel_group(group)
    rep = group // kg
    s = scales.to(torch.float32).repeat_interleave(rep, dim=0)
    z = zeros.to(torch.float32).repeat_interleave(rep, dim=0)
    sz = torch.stack([s, (8 - z) * s], dim=-1).to(dtype).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(q.t().contiguous().to(torch.int32), 1)
    return packed, sz, kg


class _Int4Packed:
    """The packed-int4 half shared by the GPTQ and AWQ classes: constructor refusals, repacking, ``apply``."""

    device_types = ("cpu",)
    priority = 10

    @classmethod
    def available(cls, platform) -> str | None:
        missing = [op for op in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
                   if not hasattr(torch, op)]
        return f"this torch lacks torch.{', torch.'.join(missing)}" if missing else None

    def _refuse_dtype(self, dtype) -> None:
        if dtype != torch.bfloat16:
            raise ValueError(f"{self.name}: torch's CPU int4 matmul is vectorised for bfloat16 activations only "
                             f"(not {dtype}); the reference serves {dtype}")

    def _unpacked(self, layer, expert):
        """``(q [K, N], zeros [G, N], scales [G, N], g_idx [K] or None)`` of one matrix, unpacked."""
        raise NotImplementedError

    def _pack_layer(self, layer) -> None:
        experts = layer.qweight.shape[0] if layer.qweight.dim() == 3 else None
        packed, szs, perms = [], [], []
        for e in range(experts) if experts else (None,):
            q, zeros, scales, g_idx = self._unpacked(layer, e)
            k, n = q.shape
            group = k // scales.shape[0]
            why = None if n % 16 == 0 else f"{n} outputs, not a multiple of 16"
            if why is None and kernel_group(group) is None:
                why = f"groups of {group} inputs, not a multiple of 32"
            perm = None
            if why is None and g_idx is not None:
                perm = torch.argsort(g_idx.long(), stable=True).to(torch.int32)
                if not torch.equal(torch.bincount(g_idx.long(), minlength=scales.shape[0]),
                                   torch.full((scales.shape[0],), group, dtype=torch.long)):
                    why = f"desc_act groups of unequal sizes (not all {group} inputs)"
                q = q[perm]
            if why:
                log.info("%s: %s keeps the reference %s path (%s)", type(self).__name__, layer.prefix, self.name, why)
                return
            p, sz, kg = pack_int4(q, zeros, scales, group, self.dtype)
            packed.append(p)
            szs.append(sz)
            perms.append(perm)
        for name in CHECKPOINT_TENSORS:
            if name in layer._parameters:
                replace_param(layer, name, None)
        stack = (lambda ts: torch.stack(ts)) if experts else (lambda ts: ts[0])
        replace_param(layer, "int4_weight", stack(packed))
        replace_param(layer, "int4_scales_zeros", stack(szs))
        layer.int4_group = kg
        layer.register_buffer("int4_perm", stack(perms) if perms[0] is not None else None, persistent=False)

    def apply(self, layer, x, bias=None, expert=None):
        packed = layer._parameters.get("int4_weight")
        if packed is None:  # a layer the kernel cannot take (see _pack_layer)
            return super().apply(layer, x, bias, expert)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.int4_perm is not None:
            x2 = x2.index_select(1, expert_view(layer.int4_perm, expert))
        y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), expert_view(packed, expert), layer.int4_group,
                                              expert_view(layer.int4_scales_zeros, expert))
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])


class CpuGPTQMethod(_Int4Packed, GPTQMethod):
    """GPTQ 4-bit (groups, per-channel, ``desc_act``, symmetric or not) on CPU through torch's int4 matmul."""

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        if self.bits != 4:
            raise ValueError(f"gptq: torch's CPU int4 matmul takes 4 bits, not {self.bits}")
        group = self.cfg["group_size"]
        if group != -1 and kernel_group(group) is None:
            raise ValueError(f"gptq: torch's CPU int4 matmul takes groups of a multiple of 32 inputs, not {group}")
        self._refuse_dtype(dtype)

    def _unpacked(self, layer, expert):
        q = unpack_rows(expert_view(layer.qweight.data, expert), 4)
        zeros = unpack_cols(expert_view(layer.qzeros.data, expert), 4) + self.cfg["zero_offset"]
        g_idx = expert_view(layer.g_idx.data, expert) if self.cfg["desc_act"] else None
        return q, zeros, expert_view(layer.scales.data, expert), g_idx

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)  # the reference's g_idx checks
        self._pack_layer(layer)


class CpuAWQMethod(_Int4Packed, AWQMethod):
    """AWQ (GEMM, 4-bit, zero points) on CPU through torch's int4 matmul."""

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        if kernel_group(self.group_size) is None:
            raise ValueError(f"awq: torch's CPU int4 matmul takes groups of a multiple of 32 inputs, "
                             f"not {self.group_size}")
        self._refuse_dtype(dtype)

    def _unpacked(self, layer, expert):
        return (awq_unpack(expert_view(layer.qweight.data, expert)), awq_unpack(expert_view(layer.qzeros.data, expert)),
                expert_view(layer.scales.data, expert), None)

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        self._pack_layer(layer)


CPU_INT4_METHODS = [CpuGPTQMethod, CpuAWQMethod]
