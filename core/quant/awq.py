"""AWQ checkpoints (``quant_method: awq``, ``version: gemm``), in the layout AutoAWQ writes.

Per linear layer with ``K`` inputs, ``N`` outputs, 4 bits, groups of ``group_size`` inputs:

``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[G, N / 8]``
    packed along the output dimension in AWQ's interleaved order: the 4-bit field ``i``
    (bits ``4 i``) of word ``j`` holds output ``8 j + AWQ_ORDER[i]``, with
    ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``. Zeros are stored as they are (no offset).
``scales`` float16 ``[G, N]``.

``W[n, k] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n]``.
Supported: 4 bits, ``zero_point: true``, the GEMM version, any group size dividing K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.gptq import _skipped, _to_int32
from tokenmill.quant.interface import LinearSpec, QuantizationMethod
from tokenmill.quant.params import add_param, expert_view

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Position of output ``8 j + c`` inside word ``j``: the inverse permutation of AWQ_ORDER.
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C / 8]`` in AWQ order -> int32 ``[R, C]`` of 4-bit values in natural column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & 0xF  # [R, C/8, 8]: field i = output AWQ_ORDER[i]
    natural = fields[..., list(AWQ_REVERSE_ORDER)]
    return natural.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def awq_pack(vals: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`awq_unpack` for ``[R, C]`` values ``< 16``."""
    v = vals.to(torch.int64).reshape(vals.shape[0], vals.shape[1] // 8, 8)
    out = torch.zeros(v.shape[0], v.shape[1], dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        out |= v[:, :, col] << (4 * i)
    return _to_int32(out)


def awq_dequantize(qweight, qzeros, scales, group_size: int, dtype) -> torch.Tensor:
    """The float weight ``[N, K]`` of one AWQ layer."""
    q = awq_unpack(qweight)  # [K, N]
    z = awq_unpack(qzeros)  # [G, N]
    k = q.shape[0]
    g = torch.arange(k, device=q.device) // group_size
    w = (q - z[g]).to(torch.float32) * scales.to(torch.float32)[g]
    return w.t().to(dtype)


def parse_awq_config(cfg: dict) -> dict:
    bits = cfg.get("bits", cfg.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"awq: bits={bits} is not supported (only 4)")
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq: version={version!r} is not supported (only gemm)")
    if not cfg.get("zero_point", True):
        raise ValueError("awq: zero_point=false is not supported")
    group = cfg.get("group_size", cfg.get("q_group_size", 128))
    if not isinstance(group, int) or group <= 0:
        raise ValueError(f"awq: group_size={group!r} is not supported (a positive size)")
    return dict(bits=4, group_size=group, skip=tuple(cfg.get("modules_to_not_convert") or ()))


class AWQMethod(QuantizationMethod):
    """Reference AWQ (GEMM layout): dequantize the layer's weight, then ``F.linear``."""

    name = "awq"
    checkpoint_formats = ("awq",)

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        self.cfg = parse_awq_config(quant_config or {})
        self.group_size = self.cfg["group_size"]

    def describe(self) -> str:
        return f"awq 4-bit group {self.group_size} (gemm)"

    def quantizes(self, prefix: str, shard_prefixes: tuple[str, ...] = ()) -> bool:
        return not prefix.endswith("lm_head") and not _skipped(prefix, shard_prefixes, self.cfg["skip"])

    def create_weights(self, layer, spec: LinearSpec) -> None:
        k, n = spec.in_features, spec.out_features
        if k % self.group_size:
            raise ValueError(f"awq: {spec.prefix} has {k} inputs, not a multiple of group_size {self.group_size}")
        if n % 8:
            raise ValueError(f"awq: {spec.prefix} has {n} outputs, not a multiple of 8 (4-bit packing)")
        g = k // self.group_size
        add_param(layer, "qweight", (k, n // 8), torch.int32, spec, shard_dim=1, pack=8)
        add_param(layer, "qzeros", (g, n // 8), torch.int32, spec, shard_dim=1, pack=8)
        add_param(layer, "scales", (g, n), spec.dtype, spec, shard_dim=1)

    def dequantized(self, layer, expert, dtype):
        return awq_dequantize(expert_view(layer.qweight, expert), expert_view(layer.qzeros, expert),
                              expert_view(layer.scales, expert), self.group_size, dtype)

    def apply(self, layer, x, bias=None, expert=None):
        return F.linear(x, self.dequantized(layer, expert, x.dtype), bias)
