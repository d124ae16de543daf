"""Rotary position embeddings: the ``cos_sin_cache`` the ``rotary_embedding`` op consumes, from an HF config.

Reads both the transformers-5 form (``config.rope_parameters = {"rope_type", "rope_theta",
"factor", ...}``) and the older one (``config.rope_theta`` plus ``config.rope_scaling``),
and reproduces HF's inverse frequencies exactly (same float32 arithmetic), so that
``cos_sin_cache[p] == cat(cos, sin)`` of HF's rotary module at position ``p``.

Supported ``rope_type``: ``default``, ``linear``, ``llama3``, ``yarn``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_THETA = 10000.0
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """The rotary settings of a model, normalised from whichever form the config uses."""

    head_size: int
    rotary_dim: int
    max_position: int
    theta: float = DEFAULT_THETA
    rope_type: str = "default"
    params: tuple = ()  # sorted (key, value) pairs of the remaining scaling parameters

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_size:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_size={self.head_size}]")
        if self.max_position <= 0:
            raise ValueError(f"max_position must be positive, got {self.max_position}")

    def param(self, key, default=None):
        return dict(self.params).get(key, default)


def _head_size(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def rope_config_from_hf(hf_config, head_size: int | None = None, max_position: int | None = None) -> RopeConfig:
    """Normalise an HF config's rotary settings (either form) into a :class:`RopeConfig`."""
    head_size = head_size or _head_size(hf_config)
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None) or getattr(hf_config, "default_theta", DEFAULT_THETA)
    partial = params.pop("partial_rotary_factor", None) or getattr(hf_config, "partial_rotary_factor", None) or 1.0
    max_pos = max_position or hf_config.max_position_embeddings
    if rope_type in ("llama3", "yarn"):
        orig = getattr(hf_config, "original_max_position_embeddings", None)
        params["original_max_position_embeddings"] = orig or params.get(
            "original_max_position_embeddings") or hf_config.max_position_embeddings
        if rope_type == "yarn" and params.get("factor") is None:
            # As HF: the factor is implied by the ratio of the two context lengths.
            params["factor"] = hf_config.max_position_embeddings / params["original_max_position_embeddings"]
    return RopeConfig(head_size=head_size, rotary_dim=int(head_size * partial), max_position=max_pos,
                      theta=float(theta), rope_type=rope_type, params=tuple(sorted(params.items())))


def _require(cfg: RopeConfig, *keys):
    missing = [k for k in keys if cfg.param(k) is None]
    if missing:
        raise ValueError(f"rope_type {cfg.rope_type!r} needs {', '.join(missing)} in rope_parameters")


def inv_freq_and_scale(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """HF's inverse frequencies ``[rotary_dim // 2]`` (float32) and the cos/sin scaling factor."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    if cfg.rope_type == "linear":
        _require(cfg, "factor")
        return inv_freq / cfg.param("factor"), 1.0
    if cfg.rope_type == "llama3":
        _require(cfg, "factor", "low_freq_factor", "high_freq_factor")
        factor, low, high = cfg.param("factor"), cfg.param("low_freq_factor"), cfg.param("high_freq_factor")
        old_len = cfg.param("original_max_position_embeddings")
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    return _yarn(cfg)


def _yarn(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    _require(cfg, "factor")
    dim, base = cfg.rotary_dim, cfg.theta
    factor = cfg.param("factor")
    orig = cfg.param("original_max_position_embeddings")
    mscale, mscale_all_dim = cfg.param("mscale"), cfg.param("mscale_all_dim")

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = cfg.param("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = cfg.param("beta_fast") or 32, cfg.param("beta_slow") or 1
    truncate = cfg.param("truncate", True)

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def build_cos_sin_cache(cfg: RopeConfig, device=None) -> torch.Tensor:
    """float32 ``[max_position, rotary_dim]``: cosines then sines, exactly as HF's rotary module computes them."""
    inv_freq, scale = inv_freq_and_scale(cfg)
    positions = torch.arange(cfg.max_position, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
    return cache.to(device=device) if device is not None else cache


def cos_sin_cache_from_hf(hf_config, head_size: int | None = None, max_position: int | None = None,
                          device=None) -> torch.Tensor:
    """Shorthand: :func:`build_cos_sin_cache` of :func:`rope_config_from_hf`."""
    return build_cos_sin_cache(rope_config_from_hf(hf_config, head_size, max_position), device)
