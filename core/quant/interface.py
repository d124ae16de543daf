"""The quantization-method interface: how a linear layer's weights are stored, loaded and multiplied.

A :class:`QuantizationMethod` subclass implements one family of formats. It declares the
``checkpoint_formats`` it loads (the ``quant_method`` of a checkpoint's
``config.json`` ``quantization_config``) and the ``online_modes`` it applies to a float
checkpoint at load time (``--quantization int8``). Classes are registered through the
``tokenmill_quantization_methods`` hook; for each format and platform the engine takes
the available class with the highest ``priority`` among those whose ``device_types``
name the platform (``"*"``: every platform), so a plugin adds a faster implementation of
a format by subclassing the core's class and registering it for its platform at a
higher priority. The core registers a reference implementation of every format
(dequantize, then matmul) at priority 0.

Life of a method, once per model load:

1. ``cls.available(platform)``: cheap; ``None`` when it can run there, else the reason.
2. ``cls(format_or_mode, quant_config, dtype)``: parses and validates the checkpoint's
   ``quantization_config`` dict (``None`` for an online mode). Anything it does not
   support (bits, group size, act-order, zero points...) raises ``ValueError`` naming it:
   a checkpoint never loads as garbage.
3. ``quantizes(prefix)``: whether the layer with this checkpoint name prefix
   (``"model.layers.0.self_attn.qkv_proj"``) is quantized; the others get the unquantized
   method. ``shard_prefixes`` names the checkpoint's unfused projections of a fused layer.
4. ``create_weights(layer, spec)``: registers the layer's parameters (see
   :mod:`tokenmill.quant.params` for how fused shards and experts load into them).
5. After every tensor was loaded: ``process_weights_after_loading(layer)``: quantize
   float weights (online modes), repack for a platform kernel, drop what is not needed.
6. Each step: ``apply(layer, x, bias, expert) -> x @ W.T + bias`` (``bias`` may be
   ``None``; a method may fuse it into its matmul). ``expert`` selects one expert of a
   stacked expert layer (Mixtral), else ``None``. This is the hot path: a plain method
   call on the object built at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class LinearSpec:
    """What a linear layer asks of its method.

    ``in_features`` and ``out_features`` are the logical (unpacked) sizes; the layer
    computes ``[..., in] -> [..., out]``. ``shard_sizes``: ordered ``{shard: rows}`` when
    the output rows are several fused projections (``{"q": 512, "k": 128, "v": 128}``),
    else ``None``. ``num_experts``: ``E`` for a stack of ``E`` expert matrices (every
    parameter gets a leading ``[E]`` dimension), else ``None``. ``dtype``/``device``: the
    model's activation dtype and device. ``prefix``: the layer's checkpoint name.
    """

    in_features: int
    out_features: int
    shard_sizes: dict | None
    num_experts: int | None
    dtype: Any
    device: Any
    prefix: str = ""

    @property
    def shard_names(self) -> tuple:
        return tuple(self.shard_sizes) if self.shard_sizes else (None,)


class QuantizationMethod:
    """One implementation of one or more quantization formats. See the module docstring.

    Class attributes: ``name`` (for reports, e.g. ``"gptq"``), ``checkpoint_formats``,
    ``online_modes``, ``device_types``, ``priority``. ``covers_experts``: whether stacked
    expert layers can use it (otherwise a model with experts is refused at load with the
    reason). An instance holds the parsed configuration and is shared by every layer.
    """

    name: ClassVar[str] = ""
    checkpoint_formats: ClassVar[tuple[str, ...]] = ()
    online_modes: ClassVar[tuple[str, ...]] = ()
    device_types: ClassVar[tuple[str, ...]] = ("*",)
    priority: ClassVar[int] = 0
    covers_experts: ClassVar[bool] = True

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        """``fmt``: the checkpoint format or online mode; ``quant_config``: the checkpoint's dict or None."""
        self.format = fmt
        self.quant_config = quant_config
        self.dtype = dtype

    @classmethod
    def available(cls, platform) -> str | None:
        """``None`` when this class can run on ``platform``, else why not (cheap, never raises)."""
        return None

    def quantizes(self, prefix: str, shard_prefixes: tuple[str, ...] = ()) -> bool:
        """Whether the layer ``prefix`` (its unfused parts: ``shard_prefixes``) is quantized."""
        return not prefix.endswith("lm_head")

    def create_weights(self, layer, spec: LinearSpec) -> None:
        """Register ``layer``'s parameters for ``spec`` (see :mod:`tokenmill.quant.params`)."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer) -> None:
        """Called once after loading: quantize, repack, free what ``apply`` does not need."""

    def apply(self, layer, x, bias=None, expert: int | None = None):
        """``x [..., in] -> x @ W.T + bias [..., out]`` in ``x.dtype``; ``expert`` picks one of a stack."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs and reports: the parsed parameters."""
        return self.format

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
