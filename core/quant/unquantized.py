"""The unquantized method: float weights in the model's dtype, ``F.linear``.

Every layer a quantization format leaves out (and every layer of a float checkpoint)
uses it. Its weight is ``[out, in]`` (``[E, out, in]`` for experts), as checkpoints store it.
"""
from __future__ import annotations

import torch.nn.functional as F

from tokenmill.quant.interface import LinearSpec, QuantizationMethod
from tokenmill.quant.params import add_param, expert_view


class UnquantizedMethod(QuantizationMethod):
    """Float weights, ``y = x @ W.T``."""

    name = "none"
    online_modes = ("none",)

    def __init__(self, fmt: str = "none", quant_config: dict | None = None, dtype=None):
        super().__init__(fmt, quant_config, dtype)

    def quantizes(self, prefix: str, shard_prefixes: tuple[str, ...] = ()) -> bool:
        return False

    def create_weights(self, layer, spec: LinearSpec) -> None:
        add_param(layer, "weight", (spec.out_features, spec.in_features), spec.dtype, spec, shard_dim=0)

    def apply(self, layer, x, bias=None, expert=None):
        return F.linear(x, expert_view(layer.weight, expert), bias)


UNQUANTIZED = UnquantizedMethod()
