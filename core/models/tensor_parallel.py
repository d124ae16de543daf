"""Tensor-parallel sharding of the Llama family: which slice of each layer a rank holds.

Megatron-style: the q/k/v and gate/up projections are split by output rows
(column-parallel: each rank computes its own heads and its share of the intermediate
size, no communication), o_proj and down_proj by input columns (row-parallel: partial
sums, one all-reduce each), the embedding and the LM head by vocabulary rows (padded to
a multiple of the rank count; one all-reduce after the lookup, one all-gather of the
logits). KV heads are split too, or replicated when there are fewer KV heads than ranks
(then ``size`` must be a multiple of their number). Mixtral's experts are split like the
MLP (each expert's intermediate size), followed by one all-reduce. Norms, rotary and the
MoE router are replicated.

Ranks take their slice of each checkpoint tensor as it streams in (:func:`shard_tensor`),
so no rank ever holds a full copy of a split weight beyond the one tensor being read.
A row-parallel bias is added once: rank 0 keeps it, the others hold zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class LocalSizes:
    """One rank's share of a decoder: heads, KV heads (and the first global KV head it holds),
    intermediate size, vocabulary rows (padded), expert intermediate size."""

    num_heads: int
    num_kv_heads: int
    kv_head_start: int
    intermediate: int | None
    vocab: int
    head_size: int


def local_kv_heads(num_kv_heads: int, tp) -> tuple[int, int]:
    """``(local KV heads, first global KV head)`` for ``tp.rank``; replicated below one head per rank."""
    if num_kv_heads >= tp.size:
        n = tp.split(num_kv_heads, "the number of KV heads")
        return n, tp.rank * n
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp.size} must divide the number of KV heads ({num_kv_heads}) "
                         f"or be a multiple of it")
    return 1, tp.rank // (tp.size // num_kv_heads)


def local_sizes(config, tp) -> LocalSizes:
    """This rank's sizes for an HF Llama-family ``config``; ``ValueError`` when ``tp.size`` does not split it."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    heads_local = tp.split(heads, "the number of attention heads")
    kv_local, kv_start = local_kv_heads(kv, tp)
    inter = getattr(config, "intermediate_size", None)
    return LocalSizes(num_heads=heads_local, num_kv_heads=kv_local,
                      kv_head_start=kv_start,
                      intermediate=None if inter is None else tp.split(inter, "the intermediate size"),
                      vocab=-(-config.vocab_size // tp.size), head_size=head_size)


def rank_attention_spec(spec, tp):
    """``spec`` with this rank's query and KV head counts."""
    if tp.size == 1:
        return spec
    kv, _ = local_kv_heads(spec.num_kv_heads, tp)
    return replace(spec, num_heads=tp.split(spec.num_heads, "the number of attention heads"), num_kv_heads=kv)


def _rows(tensor: torch.Tensor, dim: int, start: int, size: int, pad_to: int | None = None) -> torch.Tensor:
    """``tensor.narrow(dim, start, size)``, zero-padded to ``pad_to`` along ``dim`` (vocabulary tail)."""
    end = min(start + size, tensor.shape[dim])
    part = tensor.narrow(dim, start, max(0, end - start))
    if pad_to is not None and part.shape[dim] < pad_to:
        shape = list(part.shape)
        shape[dim] = pad_to - part.shape[dim]
        part = torch.cat([part, part.new_zeros(shape)], dim=dim)
    return part.contiguous()


def shard_tensor(target: str, shard, tensor: torch.Tensor, sizes: LocalSizes, tp) -> torch.Tensor:
    """This rank's slice of checkpoint ``tensor`` bound for parameter ``target`` (shard ``shard``).

    ``target`` is our parameter name (after fusing q/k/v and gate/up); tensors of replicated
    parameters come back unchanged.
    """
    if tp.size == 1:
        return tensor
    r, hs = tp.rank, sizes.head_size
    if ".qkv_proj." in target:
        if shard is None:
            raise ValueError(f"{target}: a checkpoint with a pre-fused qkv projection cannot be split for "
                             "tensor parallelism")
        if shard == "q":
            return _rows(tensor, 0, r * sizes.num_heads * hs, sizes.num_heads * hs)
        return _rows(tensor, 0, sizes.kv_head_start * hs, sizes.num_kv_heads * hs)
    if ".gate_up_proj." in target:
        if shard is None:
            raise ValueError(f"{target}: a checkpoint with a pre-fused gate/up projection cannot be split for "
                             "tensor parallelism")
        return _rows(tensor, 0, r * sizes.intermediate, sizes.intermediate)
    if target.endswith((".o_proj.weight", ".down_proj.weight")):
        return _rows(tensor, 1, r * tensor.shape[1] // tp.size, tensor.shape[1] // tp.size)
    if target.endswith((".o_proj.bias", ".down_proj.bias")):
        return tensor if r == 0 else torch.zeros_like(tensor)
    if target in ("model.embed_tokens.weight", "lm_head.weight"):
        return _rows(tensor, 0, r * sizes.vocab, sizes.vocab, pad_to=sizes.vocab)
    return tensor


def shard_expert_tensor(which: str, tensor: torch.Tensor, intermediate_local: int, tp) -> torch.Tensor:
    """A Mixtral expert's slice: ``w1``/``w3`` ``[I, H]`` by rows, ``w2`` ``[H, I]`` by columns;
    ``w13`` / ``w2_stacked`` are the stacked ``[E, 2I, H]`` / ``[E, H, I]`` forms."""
    if tp.size == 1:
        return tensor
    start = tp.rank * intermediate_local
    if which in ("w1", "w3"):
        return _rows(tensor, 0, start, intermediate_local)
    if which == "w2":
        return _rows(tensor, 1, start, intermediate_local)
    if which == "w13":
        full = tensor.shape[1] // 2
        return torch.cat([_rows(tensor, 1, start, intermediate_local),
                          _rows(tensor, 1, full + start, intermediate_local)], dim=1)
    if which == "w2_stacked":
        return _rows(tensor, 2, start, intermediate_local)
    raise ValueError(f"unknown expert weight {which!r}")
