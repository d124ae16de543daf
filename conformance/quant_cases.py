"""What the quantization checks feed each format: configurations, layer shapes, checkpoint tensors.

Each format (a checkpoint ``quant_method`` or an online ``--quantization`` mode) has a
list of :class:`QuantCase`: a ``quantization_config`` the core supports and a function
turning a random float weight into the tensors a checkpoint of that configuration holds
(written by :mod:`tokenmill.quant.quantizer`, the same code ``tokenmill quantize`` runs).
Online modes load the float weight itself. Every case runs on every :data:`GEOMETRIES`
entry: an unfused layer with a bias, a fused layer of two projections (loaded shard by
shard, as q/k/v are) and a stack of experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

#: Token counts per call: a decode batch of one, an odd-sized batch, and a prefill past the row
#: count where a platform may switch kernels (the cpu plugin: 32).
TOKENS = (1, 7, 40)


@dataclass(frozen=True)
class Geometry:
    """A linear layer's shape: ``shard_sizes`` for fused projections, ``num_experts`` for a stack."""

    label: str
    in_features: int
    out_features: int
    shard_sizes: dict | None = None
    num_experts: int | None = None
    bias: bool = False

    def parts(self) -> list:
        """The ``shard`` keys a checkpoint's pieces load under (see :mod:`tokenmill.quant.params`)."""
        names = list(self.shard_sizes) if self.shard_sizes else [None]
        if self.num_experts:
            return [(e, s) for e in range(self.num_experts) for s in names]
        return names

    def rows(self, part) -> int:
        name = part[1] if isinstance(part, tuple) else part
        return self.shard_sizes[name] if name is not None else self.out_features


GEOMETRIES = (
    Geometry("plain+bias", 128, 64, bias=True),
    Geometry("fused", 128, 96, shard_sizes={"a": 64, "b": 32}),
    Geometry("experts", 128, 64, num_experts=2),
)


@dataclass(frozen=True)
class QuantCase:
    """One configuration of a format. ``tensors(w, order)`` -> ``{param name: tensor}`` for ``w [N, K]``;
    ``order`` is a column permutation shared by a layer's shards (GPTQ's act-order)."""

    label: str
    quant_config: dict | None
    tensors: Callable

    def checkpoint(self, geometry: Geometry, gen) -> dict:
        """``{shard: {param name: tensor}}`` of a random layer of ``geometry``."""
        import torch

        order = torch.randperm(geometry.in_features, generator=gen)
        out = {}
        for part in geometry.parts():
            w = torch.randn(geometry.rows(part), geometry.in_features, generator=gen) * 0.05
            out[part] = self.tensors(w, order)
        return out


def _checkpoint_cases(key: str) -> list[QuantCase]:
    from tokenmill.quant import quantizer as q

    if key == "compressed-tensors":
        return [QuantCase(label, cfg, fn) for label, cfg, fn in q.compressed_tensors_cases()]

    def gptq(bits, group, sym=True, act=False):
        cfg = q.checkpoint_config("gptq", bits=bits, group_size=group, desc_act=act, sym=sym)
        return QuantCase(f"{bits}bit-g{group}{'-desc_act' if act else ''}{'' if sym else '-asym'}", cfg,
                         lambda w, o: q.gptq_quantize(w, bits, group, sym, o if act else None))

    cases = {
        "gptq": [gptq(4, 32), gptq(4, 64, act=True), gptq(8, -1, sym=False), gptq(4, 128, sym=False)],
        "awq": [QuantCase("4bit-g32", q.checkpoint_config("awq", group_size=32),
                          lambda w, o: q.awq_quantize(w, 32))],
        "fp8": [QuantCase("per-tensor", q.checkpoint_config("fp8"), lambda w, o: q.fp8_quantize(w))],
    }
    return cases.get(key, [])


def cases_for(key: str, kind: str) -> list[QuantCase]:
    """The cases of format ``key`` (``kind``: ``checkpoint`` or ``online``); empty when the suite has none."""
    if kind == "online":
        return [QuantCase("online", None, lambda w, o: {"weight": w})]
    return _checkpoint_cases(key)


def reference_class(core_methods: list, key: str, kind: str):
    """The core's reference class of ``key``: serving every platform, lowest priority; None if none."""
    attr = "checkpoint_formats" if kind == "checkpoint" else "online_modes"
    found = [c for c in core_methods if key in getattr(c, attr, ()) and "*" in c.device_types]
    return min(found, key=lambda c: c.priority) if found else None
