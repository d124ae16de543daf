"""Building blocks shared by the model implementations.

Weights are allocated uninitialised on the target device in the target dtype (loading
fills them), and never require grad. Every parameter carries a ``weight_loader(param,
tensor, shard=None)`` that copies a checkpoint tensor (or one shard of a fused weight,
e.g. ``"k"`` of a fused qkv projection) into place, casting dtype and device; it checks
shapes and records what was loaded so that :func:`check_all_loaded` can report gaps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def new_param(shape, ctx, shards: tuple = (None,)) -> nn.Parameter:
    """An uninitialised parameter of ``shape`` on ``ctx.device`` in ``ctx.dtype``.

    ``shards`` names the pieces a checkpoint provides for it (``(None,)``: the whole tensor).
    """
    p = nn.Parameter(torch.empty(shape, device=ctx.device, dtype=ctx.dtype), requires_grad=False)
    p.expected_shards = set(shards)
    p.loaded_shards = set()
    p.weight_loader = default_weight_loader
    return p


def _copy(name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard=None, name: str = "") -> None:
    """Copy the whole ``tensor`` into ``param``."""
    _copy(name, param.data, tensor)
    param.loaded_shards.add(None)


def check_all_loaded(module: nn.Module) -> None:
    """Raise ``ValueError`` naming the parameters (or shards of them) the checkpoint did not provide."""
    missing = []
    for name, p in module.named_parameters():
        gaps = getattr(p, "expected_shards", {None}) - getattr(p, "loaded_shards", {None})
        missing += [name if s is None else f"{name}[{s}]" for s in sorted(gaps, key=str)]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:10])}{more}")


class Linear(nn.Module):
    """``y = x @ W.T + b`` through the layer's quantization method; the one linear layer of every model.

    The method (:class:`tokenmill.quant.interface.QuantizationMethod`, chosen from
    ``ctx.quantization`` for this layer's checkpoint name ``prefix``) creates the weight
    parameters, post-processes them after loading and does the matmul, so models need no
    per-format code. ``shard_sizes``: ordered ``{shard_name: rows}`` when the output rows
    are several fused projections (``{"q": 512, "k": 128, "v": 128}``); checkpoints provide
    each shard under its own name (``shard_prefixes``, the unfused projections' names, in
    the same order) and the loader places it. ``num_experts``: a stack of ``E`` expert
    matrices (Mixtral), one picked per call by ``expert``. ``quantize=False`` keeps the
    layer in float whatever the format (a router).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx, shard_sizes: dict | None = None,
                 prefix: str = "", shard_prefixes: tuple[str, ...] = (), num_experts: int | None = None,
                 quantize: bool = True):
        super().__init__()
        from tokenmill.quant import LinearSpec, linear_method

        if shard_sizes is not None and sum(shard_sizes.values()) != out_features:
            raise ValueError(f"shard sizes {shard_sizes} do not add up to {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.prefix = prefix
        spec = LinearSpec(in_features, out_features, shard_sizes, num_experts, ctx.dtype, ctx.device, prefix)
        self.method = linear_method(ctx, prefix, shard_prefixes) if quantize else linear_method(None, prefix)
        if num_experts and not self.method.covers_experts:
            raise ValueError(f"quantization {self.method.describe()} does not cover mixture-of-experts layers "
                             f"({prefix}); serve this model unquantized or with a format that does")
        self.method.create_weights(self, spec)
        if bias:
            from tokenmill.quant.params import add_param

            add_param(self, "bias", (out_features,), ctx.dtype, spec, shard_dim=0)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        bias = self.bias if self.bias is None or expert is None else self.bias[expert]
        return self.method.apply(self, x, bias, expert)


class RMSNorm(nn.Module):
    """RMS normalisation through the platform's ``rms_norm`` / ``fused_add_rms_norm`` kernels."""

    def __init__(self, hidden_size: int, eps: float, ctx):
        super().__init__()
        self.weight = new_param((hidden_size,), ctx)
        self.eps = eps
        self.kernels = ctx.kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``rms_norm(x)``, or with ``residual``: ``(rms_norm(x + residual), x + residual)``."""
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Embedding(nn.Module):
    """Token embedding table ``[vocab, hidden]``; with tensor parallelism each rank holds
    ``ceil(vocab / ranks)`` rows and the lookups are summed over the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ctx):
        super().__init__()
        self.tp = ctx.tp
        rows = -(-num_embeddings // self.tp.size)
        self.vocab_start = self.tp.rank * rows
        self.weight = new_param((rows, embedding_dim), ctx)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))
