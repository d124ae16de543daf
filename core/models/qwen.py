"""Qwen2 and Qwen3: Llama-family decoders with Qwen's attention details.

Qwen2: bias on the q/k/v projections (not on o_proj). Qwen3: per-head RMSNorm of q and
k before rotary, ``head_dim`` from the config, bias only when ``attention_bias``. Both
slide the window only on the layers ``config.layer_types`` marks ``"sliding_attention"``
(HF derives those from ``use_sliding_window`` and ``max_window_layers``).
"""
from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM


def _qwen_sliding_window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return window if layer_idx >= getattr(config, "max_window_layers", 0) else None
    return window if layer_types[layer_idx] == "sliding_attention" else None


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5."""

    @classmethod
    def qkv_bias(cls, config) -> bool:
        return True

    @classmethod
    def o_bias(cls, config) -> bool:
        return False

    @classmethod
    def layer_sliding_window(cls, config, layer_idx: int) -> int | None:
        return _qwen_sliding_window(config, layer_idx)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 (dense)."""

    qk_norm = True

    @classmethod
    def layer_sliding_window(cls, config, layer_idx: int) -> int | None:
        return _qwen_sliding_window(config, layer_idx)
