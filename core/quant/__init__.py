"""Quantization: the method interface, the formats, reference dequantize-matmuls, the quantizer.

:mod:`.interface` is the contract (:class:`QuantizationMethod`); :mod:`.registry` picks the
implementation of a checkpoint's format (or of ``--quantization``) for the platform;
:mod:`.params` loads fused shards and stacked experts into a method's parameters.
"""
from __future__ import annotations

from tokenmill.quant.interface import LinearSpec, QuantizationMethod
from tokenmill.quant.unquantized import UNQUANTIZED, UnquantizedMethod


def linear_method(ctx, prefix: str, shard_prefixes: tuple[str, ...] = ()) -> QuantizationMethod:
    """The method for the linear layer ``prefix``: ``ctx.quantization`` if it quantizes it, else the float one.

    The float method is ``ctx.float_method`` (the platform's best implementation of
    unquantized linears, see :func:`tokenmill.quant.registry.resolve_float_method`), or
    the core's ``F.linear`` one without a context.
    """
    method = getattr(ctx, "quantization", None) if ctx is not None else None
    if method is None or not method.quantizes(prefix, shard_prefixes):
        return getattr(ctx, "float_method", None) or UNQUANTIZED
    return method


__all__ = ["LinearSpec", "QuantizationMethod", "UNQUANTIZED", "UnquantizedMethod", "linear_method"]
