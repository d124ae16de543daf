"""GPTQ checkpoints (``quant_method: gptq``), in the layout AutoGPTQ / GPTQModel write.

Per linear layer with ``K`` inputs, ``N`` outputs, ``b`` bits (``p = 32 // b`` values per int32):

``qweight`` int32 ``[K / p, N]``
    packed along the input dimension: input ``k`` of column ``n`` sits at bits
    ``b * (k % p)`` of ``qweight[k // p, n]``.
``qzeros`` int32 ``[G, N / p]``
    packed along the output dimension, same bit order. The ``gptq`` checkpoint format
    stores ``zero - 1`` (symmetric 4-bit: 7, ``0x77777777``); ``checkpoint_format: gptq_v2``
    stores the zero itself.
``scales`` float16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input
    (``k // group_size``, or a permuted assignment with ``desc_act``); ``G`` groups
    (one when ``group_size`` is -1: per output channel).

``W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``. Supported: 4 and 8
bits, group sizes -1/32/64/128 (any that divides K), ``desc_act`` with ``g_idx``,
symmetric and asymmetric zeros. Anything else is refused when the config is read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.interface import LinearSpec, QuantizationMethod
from tokenmill.quant.params import add_param, expert_view

SUPPORTED_BITS = (4, 8)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R / p, C]`` packed along rows (low bits first) -> int32 ``[R, C]`` of unsigned values."""
    p = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    vals = (packed.unsqueeze(-2) >> shifts.view(-1, 1)) & ((1 << bits) - 1)  # [..., R/p, p, C]
    return vals.reshape(*packed.shape[:-2], packed.shape[-2] * p, packed.shape[-1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R, C / p]`` packed along columns (low bits first) -> int32 ``[R, C]``."""
    p = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., R, C/p, p]
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * p)


def pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_rows` (values ``< 2**bits``)."""
    p = 32 // bits
    v = vals.to(torch.int64).reshape(vals.shape[0] // p, p, vals.shape[1])
    out = torch.zeros(v.shape[0], v.shape[2], dtype=torch.int64)
    for i in range(p):
        out |= v[:, i, :] << (bits * i)
    return _to_int32(out)


def pack_cols(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_cols`."""
    p = 32 // bits
    v = vals.to(torch.int64).reshape(vals.shape[0], vals.shape[1] // p, p)
    out = torch.zeros(v.shape[0], v.shape[1], dtype=torch.int64)
    for i in range(p):
        out |= v[:, :, i] << (bits * i)
    return _to_int32(out)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int, dtype) -> torch.Tensor:
    """The float weight ``[N, K]`` of one GPTQ layer (see the module docstring)."""
    q = unpack_rows(qweight, bits)  # [K, N]
    z = unpack_cols(qzeros, bits) + zero_offset  # [G, N]
    g = g_idx.long()
    w = (q - z[g]).to(torch.float32) * scales.to(torch.float32)[g]
    return w.t().to(dtype)


def parse_gptq_config(cfg: dict) -> dict:
    """Validated ``bits``, ``group_size``, ``desc_act``, ``sym``, ``zero_offset``, ``lm_head``, ``skip``."""
    bits = cfg.get("bits", 4)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq: bits={bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    group = cfg.get("group_size", 128)
    if not isinstance(group, int) or (group != -1 and group <= 0):
        raise ValueError(f"gptq: group_size={group!r} is not supported (a positive size or -1)")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq: checkpoint_format={fmt!r} is not supported (gptq, gptq_v2)")
    if cfg.get("dynamic"):
        raise ValueError("gptq: per-module 'dynamic' overrides are not supported")
    if cfg.get("static_groups"):
        # static groups reorder columns differently from desc_act's g_idx: refuse rather than guess
        raise ValueError("gptq: static_groups=true is not supported")
    skip = tuple(cfg.get("modules_to_not_convert") or ())
    return dict(bits=bits, group_size=group, desc_act=bool(cfg.get("desc_act", False)), sym=bool(cfg.get("sym", True)),
                zero_offset=1 if fmt == "gptq" else 0, lm_head=bool(cfg.get("lm_head", False)), skip=skip)


def _skipped(prefix: str, shard_prefixes: tuple, skip: tuple) -> bool:
    names = (prefix, *shard_prefixes)
    return any(s and any(n == s or n.endswith("." + s) or n.startswith(s + ".") for n in names) for s in skip)


class GPTQMethod(QuantizationMethod):
    """Reference GPTQ: dequantize the layer's weight, then ``F.linear``."""

    name = "gptq"
    checkpoint_formats = ("gptq",)

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        self.cfg = parse_gptq_config(quant_config or {})
        self.bits = self.cfg["bits"]
        self.pack = 32 // self.bits

    def describe(self) -> str:
        c = self.cfg
        return (f"gptq {c['bits']}-bit group {c['group_size']}{' desc_act' if c['desc_act'] else ''}"
                f"{'' if c['sym'] else ' asym'}")

    def quantizes(self, prefix: str, shard_prefixes: tuple[str, ...] = ()) -> bool:
        if prefix.endswith("lm_head"):
            return self.cfg["lm_head"]
        return not _skipped(prefix, shard_prefixes, self.cfg["skip"])

    def groups(self, in_features: int, prefix: str) -> int:
        g = self.cfg["group_size"]
        if g == -1:
            return 1
        if in_features % g:
            raise ValueError(f"gptq: {prefix} has {in_features} inputs, not a multiple of group_size {g}")
        return in_features // g

    def create_weights(self, layer, spec: LinearSpec) -> None:
        k, n = spec.in_features, spec.out_features
        if k % self.pack:
            raise ValueError(f"gptq: {spec.prefix} has {k} inputs, not a multiple of {self.pack} ({self.bits}-bit packing)")
        g = self.groups(k, spec.prefix)
        add_param(layer, "qweight", (k // self.pack, n), torch.int32, spec, shard_dim=1)
        add_param(layer, "qzeros", (g, n // self.pack), torch.int32, spec, shard_dim=1, pack=self.pack)
        add_param(layer, "scales", (g, n), spec.dtype, spec, shard_dim=1)
        add_param(layer, "g_idx", (k,), torch.int32, spec, mode="replicate")

    def process_weights_after_loading(self, layer) -> None:
        g_idx = layer.g_idx.data
        groups = layer.scales.shape[-2]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"gptq: {layer.prefix}.g_idx names groups outside 0..{groups - 1}")
        if not self.cfg["desc_act"] and groups > 1:
            k = g_idx.shape[-1]
            trivial = torch.arange(k, dtype=torch.int32, device=g_idx.device) // (k // groups)
            if not torch.equal(g_idx, trivial.expand_as(g_idx)):
                raise ValueError(f"gptq: {layer.prefix}.g_idx is permuted but desc_act is false")

    def dequantized(self, layer, expert, dtype):
        return gptq_dequantize(expert_view(layer.qweight, expert), expert_view(layer.qzeros, expert),
                               expert_view(layer.scales, expert), expert_view(layer.g_idx, expert),
                               self.bits, self.cfg["zero_offset"], dtype)

    def apply(self, layer, x, bias=None, expert=None):
        return F.linear(x, self.dequantized(layer, expert, x.dtype), bias)
