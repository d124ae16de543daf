"""FP8 (float8 e4m3) weights: on the fly (``--quantization fp8``) and from ``quant_method: fp8`` checkpoints.

Checkpoints (the layout AutoFP8 and vLLM's fp8 format use): ``weight`` float8_e4m3fn
``[N, K]``, ``weight_scale`` float32 (one per tensor; for a fused layer one per fused
projection, expanded to rows after loading) and, with ``activation_scheme: static``,
``input_scale``. ``weight_block_size`` (block-wise scales) is refused. Online: one scale
per output row, ``s = max|W_row| / 448``.

Weights stay in FP8 in memory (1 byte each). The reference dequantizes (``q * s`` in
float32, cast to the activation dtype) and multiplies, so activations stay in float:
``input_scale`` is not applied there. Platforms that declare ``capabilities.fp8`` get
:class:`Fp8ScaledMMMethod`, which quantizes activations per token (dynamic) and runs
``torch._scaled_mm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.interface import LinearSpec, QuantizationMethod
from tokenmill.quant.params import add_param, expert_view, replace_param

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q float8_e4m3fn [..., N, K], scale float32 [..., N])``."""
    w32 = w.to(torch.float32)
    scale = (w32.abs().amax(dim=-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w32 / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """``q * scale`` (scale per row ``[N]`` or a scalar) in ``dtype``."""
    s = scale.to(torch.float32)
    if s.dim():
        s = s.unsqueeze(-1)
    return (q.to(torch.float32) * s).to(dtype)


class Fp8Method(QuantizationMethod):
    """Reference FP8: ``weight`` float8 ``[N, K]`` and ``weight_scale`` float32 ``[N]``; dequantize, then matmul."""

    name = "fp8"
    checkpoint_formats = ("fp8",)
    online_modes = ("fp8",)

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        cfg = quant_config or {}
        self.online = quant_config is None
        if cfg.get("weight_block_size"):
            raise ValueError(f"fp8: block-wise scales (weight_block_size={cfg['weight_block_size']}) are not supported")
        fmt_name = str(cfg.get("fmt", "e4m3")).lower()
        if fmt_name not in ("e4m3", "float8_e4m3fn"):
            raise ValueError(f"fp8: fmt={fmt_name!r} is not supported (only e4m3)")
        self.activation_scheme = cfg.get("activation_scheme", "dynamic")
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8: activation_scheme={self.activation_scheme!r} is not supported")
        self.skip = tuple(cfg.get("ignored_layers") or cfg.get("modules_to_not_convert") or ())

    def describe(self) -> str:
        return "fp8 e4m3, per-channel scales (online)" if self.online else \
            f"fp8 e4m3 checkpoint, per-tensor scales, {self.activation_scheme} activations"

    def quantizes(self, prefix: str, shard_prefixes: tuple[str, ...] = ()) -> bool:
        from tokenmill.quant.gptq import _skipped

        return not prefix.endswith("lm_head") and not _skipped(prefix, shard_prefixes, self.skip)

    def create_weights(self, layer, spec: LinearSpec) -> None:
        shape = (spec.out_features, spec.in_features)
        if self.online:
            add_param(layer, "weight", shape, spec.dtype, spec, shard_dim=0)
            return
        add_param(layer, "weight", shape, FP8, spec, shard_dim=0)
        add_param(layer, "weight_scale", (), torch.float32, spec, mode="per_shard")
        if self.activation_scheme == "static":
            add_param(layer, "input_scale", (), torch.float32, spec, mode="per_shard")
        layer.fp8_shard_rows = list((spec.shard_sizes or {None: spec.out_features}).values())

    def process_weights_after_loading(self, layer) -> None:
        if self.online:
            q, scale = quantize_fp8_per_channel(layer.weight.data)
        else:
            q = layer.weight.data
            rows = torch.tensor(layer.fp8_shard_rows, device=q.device)
            scale = torch.repeat_interleave(layer.weight_scale.data, rows, dim=-1)
            replace_param(layer, "input_scale", None)  # activations stay float on the dequantizing paths
        replace_param(layer, "weight", q)
        replace_param(layer, "weight_scale", scale.to(torch.float32))

    def apply(self, layer, x, bias=None, expert=None):
        w = dequantize_fp8(expert_view(layer.weight, expert), expert_view(layer.weight_scale, expert), x.dtype)
        return F.linear(x, w, bias)


class Fp8ScaledMMMethod(Fp8Method):
    """FP8 matmul where the platform declares one (``capabilities.fp8``): per-token FP8 activations, ``_scaled_mm``."""

    priority = 5

    @classmethod
    def available(cls, platform) -> str | None:
        caps = getattr(platform, "capabilities", None)
        if not getattr(caps, "fp8", False):
            return "the platform declares no FP8 matmul (capabilities.fp8 is false): the reference dequantizes"
        if not hasattr(torch, "_scaled_mm"):
            return "this torch has no _scaled_mm"
        return None

    def apply(self, layer, x, bias=None, expert=None):
        w, s = expert_view(layer.weight, expert), expert_view(layer.weight_scale, expert)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        t = (x2.abs().amax(dim=-1, keepdim=True).to(torch.float32) / FP8_MAX).clamp_min(1e-12)
        a = (x2.to(torch.float32) / t).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(a, w.t(), scale_a=t, scale_b=s.view(1, -1), out_dtype=x.dtype,
                             bias=None)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], w.shape[0])
