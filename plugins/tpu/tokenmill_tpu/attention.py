"""Paged attention for XLA: static-shape K/V writes and torch_xla's ragged paged attention.

The cache layout is the one torch_xla's ragged paged attention reads:
``[num_blocks, block_size, 2 * kv_heads, head_size]``, keys and values interleaved along
the head axis (key head ``h`` at ``2h``, value head ``h`` at ``2h + 1``).

Every tensor op here has a shape fixed by the step's (padded) shape, and nothing is read
back to the host, so one step traces to one XLA graph per shape bucket:

* the K/V write is one ``index_copy_`` of ``T`` rows: a token with slot ``-1`` (padding)
  rewrites a row another token of the step writes anyway, with that token's own value,
  so the write needs no mask and no data-dependent shape, and writes nothing new;
* attention, on a TPU, is torch_xla's Pallas kernel (``torch.ops.xla.ragged_paged_attention``,
  ``use_kernel=True``). Off a TPU (XLA:CPU) the kernel does not exist, and torch_xla's
  non-kernel path (``use_kernel=False``) loops over the sequences in Python with
  data-dependent slices, so every step compiles anew; by default the same contract is
  then computed densely on the padded batch (each token against its sequence's pages,
  masked), which keeps shapes static. ``TOKENMILL_TPU_ATTENTION=xla-reference`` selects
  torch_xla's non-kernel path instead (correct, not static; the conformance script
  reports its compile count beside the dense path's).
"""
from __future__ import annotations

import os

from tokenmill.attention.interface import AttentionBackend, AttentionMetadata

MODE_ENV = "TOKENMILL_TPU_ATTENTION"
MODES = ("auto", "kernel", "dense", "xla-reference")


def attention_mode() -> str:
    """``kernel`` on a TPU, ``dense`` elsewhere, unless ``$TOKENMILL_TPU_ATTENTION`` says otherwise."""
    mode = os.environ.get(MODE_ENV, "auto").strip() or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "auto":
        import torch_xla.runtime as xr

        mode = "kernel" if str(xr.device_type()).upper() == "TPU" else "dense"
    return mode


def write_kv(kv_cache, k, v, slot_mapping) -> None:
    """Write ``k``/``v`` ``[T, Hk, D]`` at ``slot_mapping`` (``-1``: skip) into the interleaved cache, statically."""
    import torch

    num_tokens, hk, d = k.shape
    flat = kv_cache.view(-1, 2 * hk, d)
    rows = torch.stack([k, v], dim=2).reshape(num_tokens, 2 * hk, d).to(flat.dtype)
    valid = slot_mapping >= 0
    # Padding rows copy the first valid token (its slot and value): a duplicate write of an
    # identical row. With no valid token at all, every row rewrites slot 0 with its old value.
    first = torch.argmax(valid.to(torch.int32))
    src = torch.where(valid, torch.arange(num_tokens, device=k.device), first)
    slots = slot_mapping.index_select(0, src)
    src_valid = slots >= 0
    slots = torch.where(src_valid, slots, torch.zeros_like(slots))
    old = flat.index_select(0, slots)
    values = torch.where(src_valid[:, None, None], rows.index_select(0, src), old)
    flat.index_copy_(0, slots, values)


def dense_paged_attention(q, kv_cache, meta: AttentionMetadata, scale: float, window: int | None):
    """The ragged paged contract on a padded batch with static shapes: ``q`` ``[T, H, D]`` -> ``[T, H, D]``."""
    import torch

    num_tokens, h, d = q.shape
    _, bs, hk2, _ = kv_cache.shape
    hk = hk2 // 2
    g = h // hk
    tables = meta.block_tables.to(torch.long)  # [S, W]
    num_seqs, width = tables.shape
    pages = kv_cache.index_select(0, tables.reshape(-1)).view(num_seqs, width * bs, hk, 2, d)
    ends = meta.query_start_loc[1:].to(torch.long)  # [S]
    t = torch.arange(num_tokens, device=q.device)
    # the sequence of each token: how many sequences end at or before it (padding tokens: past the last)
    seq = (t[:, None] >= ends[None, :]).sum(dim=1).clamp(max=num_seqs - 1)
    lens = meta.seq_lens.to(torch.long)
    pos = lens.index_select(0, seq) - (ends.index_select(0, seq) - t)  # position of each token
    real = t < ends[-1]
    kv = pages.index_select(0, seq)  # [T, L, Hk, 2, D]
    keys, values = kv[..., 0, :].to(q.dtype), kv[..., 1, :].to(q.dtype)
    qg = q.view(num_tokens, hk, g, d)
    scores = torch.einsum("thgd,tlhd->thgl", qg, keys) * scale
    j = torch.arange(width * bs, device=q.device)
    mask = (j[None, :] <= pos[:, None]) & real[:, None]
    if window:
        mask &= j[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    # padding tokens see no key: give them a zero output instead of NaN
    probs = torch.softmax(scores.masked_fill(~real[:, None, None, None], 0.0), dim=-1)
    out = torch.einsum("thgl,tlhd->thgd", probs, values)
    return out.reshape(num_tokens, h, d)


class XlaPagedAttention(AttentionBackend):
    """Ragged paged attention on XLA devices (the ``tpu`` platform), static shapes throughout."""

    name = "xla-ragged-paged"
    device_types = ("tpu",)
    priority = 10
    head_sizes = None
    dtypes = ("float32", "bfloat16")
    sliding_window = True
    gqa = True

    block_dim = 0

    @classmethod
    def kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, 2 * num_kv_heads, head_size)

    @classmethod
    def copy_blocks(cls, kv_caches: list, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        import torch

        src = torch.tensor([c[0] for c in copies], device=kv_caches[0].device)
        dst = torch.tensor([c[1] for c in copies], device=kv_caches[0].device)
        for cache in kv_caches:
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def __init__(self, spec):
        super().__init__(spec)
        self.mode = attention_mode()

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        import torch

        spec = self.spec
        num_tokens, d = q.shape[0], spec.head_size
        q = q.reshape(num_tokens, spec.num_heads, d)
        k = k.reshape(num_tokens, spec.num_kv_heads, d)
        v = v.reshape(num_tokens, spec.num_kv_heads, d)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        if self.mode == "dense":
            out = dense_paged_attention(q, kv_cache, meta, self.scale, spec.sliding_window)
        else:
            import torch_xla.experimental.custom_kernel  # noqa: F401 - registers torch.ops.xla.ragged_paged_attention

            real = sum(1 for n in meta.query_lens_cpu if n > 0)
            num_seqs = torch.tensor([real], dtype=torch.int32, device=q.device)
            out = torch.ops.xla.ragged_paged_attention(
                q, kv_cache, meta.seq_lens, meta.block_tables, meta.query_start_loc, num_seqs,
                sm_scale=self.scale, sliding_window=spec.sliding_window, use_kernel=self.mode == "kernel")
            if out.shape[0] != num_tokens:  # the non-kernel path returns only the real tokens' rows
                out = torch.cat([out, out.new_zeros(num_tokens - out.shape[0], spec.num_heads, d)])
        return out.reshape(num_tokens, spec.num_heads * d)
