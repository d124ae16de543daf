"""Parameters of a linear layer, and how fused shards and stacked experts load into them.

A method registers each tensor with :func:`add_param`, saying how the checkpoint's
pieces map onto it:

``mode="split"``
    Fused projections concatenate along ``shard_dim`` (the dimension that runs over
    output rows, counted without the expert dimension). ``pack`` output rows share one
    element along it (GPTQ's ``qzeros`` packs 8 rows into one int32), so a shard of ``r``
    rows takes ``r // pack`` elements; shard sizes must divide by ``pack``.
    ``shard_dim=None``: the layer is not fused, the checkpoint gives the whole tensor.
``mode="replicate"``
    Every shard carries the same tensor (GPTQ's ``g_idx``: the fused projections read the
    same input); later shards must equal the first, or the load fails.
``mode="per_shard"``
    A leading ``[num_shards]`` dimension, one entry per shard (a per-tensor FP8 scale of
    each of q, k, v); ``shape`` is one entry's shape.

With ``spec.num_experts`` every parameter gets a leading ``[E]`` dimension and the
checkpoint's pieces arrive as ``shard=(expert, part)`` (``part`` ``None`` for an
unfused expert matrix); ``shard=None`` always means the whole tensor at once.
Every parameter records what was loaded, so ``check_all_loaded`` names what is missing.
"""
from __future__ import annotations

import torch
from torch import nn


def _offsets(spec) -> dict:
    out, start = {}, 0
    for shard, size in (spec.shard_sizes or {None: spec.out_features}).items():
        out[shard] = (start, size)
        start += size
    return out


def expected_shards(spec) -> set:
    names = spec.shard_names
    if spec.num_experts:
        return {(e, s) for e in range(spec.num_experts) for s in names}
    return set(names)


def _copy(name: str, dst: torch.Tensor, src: torch.Tensor, cast: bool = False) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    if src.dtype != dst.dtype and not cast and not (src.is_floating_point() and dst.is_floating_point()):
        raise ValueError(f"checkpoint tensor {name} has dtype {src.dtype}, expected {dst.dtype}")
    dst.copy_(src)


def add_param(layer: nn.Module, name: str, shape: tuple, dtype, spec, *, shard_dim: int | None = None,
              pack: int = 1, mode: str = "split", cast: bool = False) -> nn.Parameter:
    """Register an uninitialised ``layer.<name>`` of ``shape`` (per expert, per shard) and its loader.

    ``cast``: accept any dtype from the checkpoint (an integer shape written as int32 or int64).
    """
    if mode not in ("split", "replicate", "per_shard"):
        raise ValueError(f"unknown parameter mode {mode!r}")
    offsets = _offsets(spec)
    names = list(offsets)
    fused = spec.shard_sizes is not None
    if mode == "split" and fused:
        if shard_dim is None:
            raise ValueError(f"{spec.prefix}.{name}: a fused layer needs shard_dim")
        bad = [s for s, (_, size) in offsets.items() if size % pack]
        if bad:
            raise ValueError(f"{spec.prefix}: shard(s) {bad} have a row count not divisible by {pack}, "
                             f"which {name} packs together")
    full = tuple(shape)
    if mode == "per_shard":
        full = (len(names), *full)
    if spec.num_experts:
        full = (spec.num_experts, *full)
    p = nn.Parameter(torch.empty(full, dtype=dtype, device=spec.device), requires_grad=False)
    p.expected_shards = expected_shards(spec)
    p.loaded_shards = set()
    experts = spec.num_experts

    def load(param, tensor, shard=None, name=name):
        if shard is None:
            if mode == "per_shard" and tensor.numel() == param.numel():  # per-tensor scalar as [] or [1]
                tensor = tensor.reshape(param.shape)
            _copy(name, param.data, tensor, cast)
            param.loaded_shards.update(param.expected_shards)
            return
        data = param.data
        key = shard
        part = shard
        if experts:
            expert, part = shard
            data = data[expert]
        if not fused and part is not None:
            raise ValueError(f"{name}: shard {part!r} given for a layer that is not fused")
        if mode == "per_shard":
            dst = data[names.index(part)]
            if tensor.numel() == dst.numel():  # a per-tensor scalar stored as [] or [1]
                tensor = tensor.reshape(dst.shape)
        elif mode == "replicate" and fused:
            done = {k for k in param.loaded_shards if (k[0] if experts else None) == (shard[0] if experts else None)}
            if done:
                if tuple(data.shape) != tuple(tensor.shape) or not torch.equal(data, tensor.to(data.dtype)):
                    raise ValueError(f"checkpoint tensor {name} differs between the fused projections "
                                     f"{sorted(map(str, done))} and {part!r}, which must share it")
                param.loaded_shards.add(key)
                return
            dst = data
        elif fused and part is not None:
            start, size = offsets[part]
            dst = data.narrow(shard_dim, start // pack, size // pack)
        else:
            dst = data
        _copy(name, dst, tensor, cast)
        param.loaded_shards.add(key)

    p.weight_loader = load
    layer.register_parameter(name, p)
    return p


def replace_param(layer: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Swap ``layer.<name>`` for a (repacked) tensor after loading; ``None`` removes it."""
    if name in layer._parameters:
        del layer._parameters[name]
    if tensor is not None:
        layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def expert_view(t: torch.Tensor, expert: int | None) -> torch.Tensor:
    """``t[expert]`` for a stacked expert tensor, ``t`` itself otherwise."""
    return t if expert is None else t[expert]
