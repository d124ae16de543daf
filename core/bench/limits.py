"""What the hardware allows a model: the matmul limit of a workload, and KV bytes per token.

The limit is this machine's own matmul rate at the model's linear shapes, through the float
linear the engine uses on the platform (the cpu plugin's repacked oneDNN weights), measured in the
same run (so it is as noisy as the engines it is compared with), divided by the matmul
work of the workload: ``2 * linear parameters`` FLOPs per token, for every prompt token
(prefill) and every output token (decode), the LM head once per output token. Attention's
own FLOPs are left out, so the limit is a ceiling no engine reaches.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShapes:
    """The linear layers of a Llama-family decoder: ``(in, out)`` per layer, the LM head, KV geometry."""

    layer_linears: tuple[tuple[int, int], ...]
    num_layers: int
    lm_head: tuple[int, int]
    num_kv_heads: int
    head_size: int

    @classmethod
    def from_checkpoint(cls, model_dir) -> ModelShapes:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        head = cfg.get("head_dim") or hidden // heads
        linears = ((hidden, (heads + 2 * kv) * head), (heads * head, hidden), (hidden, 2 * inter), (inter, hidden))
        return cls(linears, cfg["num_hidden_layers"], (hidden, cfg["vocab_size"]), kv, head)

    def flops_per_token(self, lm_head: bool = True) -> float:
        per_layer = sum(2 * k * n for k, n in self.layer_linears)
        return per_layer * self.num_layers + (2 * self.lm_head[0] * self.lm_head[1] if lm_head else 0)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token (any paged layout stores these bytes, padding aside)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_size * dtype_bytes


def gemm_gflops(shapes: ModelShapes, dtype: str = "float32", rows: int = 256, seconds: float = 1.0,
                method=None, windows: int = 1) -> float:
    """This machine's matmul rate (GFLOP/s) over the model's linear shapes at ``rows`` tokens.

    ``method``: the float linear the engine uses here (see
    :func:`tokenmill.quant.registry.resolve_float_method`; a plugin's may repack weights at
    load), else ``F.linear``. ``windows`` > 1 times that many windows of ``seconds`` and returns
    the best, so a burst of other work on a shared machine lowers the peak less.
    """
    import torch

    from tokenmill.quant.unquantized import UNQUANTIZED

    if windows < 1:
        raise ValueError(f"windows must be at least 1, got {windows}")
    method = method or UNQUANTIZED
    dt = getattr(torch, dtype)
    layers = []
    for k, n in (*shapes.layer_linears, shapes.lm_head):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(n, k).to(dt), requires_grad=False)
        method.process_weights_after_loading(layer)
        layers.append((layer, torch.randn(rows, k).to(dt)))
    flops = sum(2 * rows * x.shape[1] * layer.weight.shape[0] for layer, x in layers)
    best = 0.0
    with torch.no_grad():
        for layer, x in layers:
            method.apply(layer, x)
        for _ in range(windows):
            passes, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or passes < 3:
                for layer, x in layers:
                    method.apply(layer, x)
                passes += 1
            best = max(best, flops * passes / (time.perf_counter() - t0) / 1e9)
    return best


def engine_gemm_gflops(shapes: ModelShapes, dtype: str, device: str = "auto", **kw) -> tuple[float, str]:
    """:func:`gemm_gflops` (``kw``: its timing arguments) through the float linear the engine resolves on the
    selected platform, and that linear's name."""
    import torch

    from tokenmill.plugins import get_plugin_manager
    from tokenmill.quant.registry import resolve_float_method

    pm = get_plugin_manager()
    method = resolve_float_method(pm.registered("quantization_methods"), pm.select_platform(device),
                                  getattr(torch, dtype))
    return gemm_gflops(shapes, dtype, method=method, **kw), type(method).__name__


def prefill_seconds(shapes: ModelShapes, prompt_tokens: int, gflops: float) -> float:
    """The least time to a first token: the prompt's matmuls and one LM head at ``gflops`` (attention not counted)."""
    work = prompt_tokens * shapes.flops_per_token(lm_head=False) + 2 * shapes.lm_head[0] * shapes.lm_head[1]
    return work / (gflops * 1e9)


def workload_limit(shapes: ModelShapes, prompt_tokens: int, output_tokens: int, gflops: float) -> float:
    """Output tok/s if every matmul of the workload ran at ``gflops``."""
    work = prompt_tokens * shapes.flops_per_token(lm_head=False) + output_tokens * shapes.flops_per_token()
    return output_tokens / (work / (gflops * 1e9)) if work else 0.0
