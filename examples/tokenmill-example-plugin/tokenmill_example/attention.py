"""Paged attention for the ``example`` platform, with its own cache layout.

Pages are stored head-major, ``[2, num_blocks, num_kv_heads, block_size, head_size]``,
to show that a backend owns its layout: it says so in :meth:`kv_cache_shape`, writes
and reads pages accordingly, and the engine never looks inside. Blocks stay on
dimension 1, so the default ``copy_blocks`` and ``swap_blocks`` still apply. Steps with
prefill chunks go one sequence at a time: gather its pages, mask causally (and by the
sliding window), attend with SDPA. Decode-only steps (``max_query_len`` 1) take a batched
path that reads the step only from the metadata's device tensors, with shapes fixed by the
batch size, so it may be captured into a graph and replayed (``graph_capturable``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.interface import AttentionBackend, AttentionMetadata


class ExampleAttention(AttentionBackend):
    name = "example"
    device_types = ("example",)
    priority = 10
    head_sizes = None
    dtypes = ("float32", "bfloat16")
    sliding_window = True
    gqa = True
    graph_capturable = True

    @classmethod
    def kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    def _decode(self, q, k, v, kv_cache, meta: AttentionMetadata):
        """One token per sequence, batched, on device tensors only (no host value, no data-dependent shape)."""
        spec = self.spec
        b, hk, d, bs = q.shape[0], spec.num_kv_heads, spec.head_size, meta.block_size
        slots = meta.slot_mapping.long()
        keep = slots >= 0
        # Rows with slot -1 repeat the write of a row that writes (same slot, same value), so
        # the scatter has a defined result without selecting rows by a mask.
        src = torch.where(keep, torch.arange(b, device=q.device), keep.long().argmax())
        slot = slots[src].clamp(min=0)
        blocks, offsets = slot // bs, slot % bs
        heads = torch.arange(hk, device=q.device)
        for i, new in enumerate((k, v)):
            old = kv_cache[i][blocks[:, None], heads[None, :], offsets[:, None]]
            val = torch.where(keep[src][:, None, None], new.reshape(b, hk, d)[src].to(kv_cache.dtype), old)
            kv_cache[i][blocks[:, None], heads[None, :], offsets[:, None]] = val
        tables = meta.block_tables.long()  # [b, w]
        w = tables.shape[1]
        # [b, w, hk, bs, d] -> [b, hk, w * bs, d]
        keys = kv_cache[0][tables].permute(0, 2, 1, 3, 4).reshape(b, hk, w * bs, d).to(q.dtype)
        values = kv_cache[1][tables].permute(0, 2, 1, 3, 4).reshape(b, hk, w * bs, d).to(q.dtype)
        seq_lens = meta.seq_lens.long()[:, None]
        key_pos = torch.arange(w * bs, device=q.device)[None, :]
        mask = key_pos < seq_lens
        if spec.sliding_window:
            mask &= key_pos > seq_lens - 1 - spec.sliding_window
        group = spec.num_heads // hk
        queries = q.reshape(b, hk, group, d)
        scores = torch.einsum("bhgd,bhkd->bhgk", queries.float(), keys.float()) * self.scale
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(mask.any(-1)[:, None, None, None], probs, torch.zeros_like(probs))  # empty contexts
        out = torch.einsum("bhgk,bhkd->bhgd", probs, values.float())
        return out.reshape(b, spec.num_heads * d).to(q.dtype)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        if meta.max_query_len == 1 and q.shape[0] == meta.block_tables.shape[0]:
            return self._decode(q, k, v, kv_cache, meta)
        spec = self.spec
        num_tokens, hk, d = q.shape[0], spec.num_kv_heads, spec.head_size
        bs = meta.block_size
        q = q.reshape(num_tokens, spec.num_heads, d)
        k = k.reshape(num_tokens, hk, d)
        v = v.reshape(num_tokens, hk, d)
        slots = meta.slot_mapping.long()
        keep = slots >= 0
        blocks, offsets = slots[keep] // bs, slots[keep] % bs
        # Head-major pages: index (block, head, offset) for every written token and head.
        heads = torch.arange(hk)
        kv_cache[0][blocks[:, None], heads[None, :], offsets[:, None]] = k[keep].to(kv_cache.dtype)
        kv_cache[1][blocks[:, None], heads[None, :], offsets[:, None]] = v[keep].to(kv_cache.dtype)

        out = torch.empty_like(q)
        start = 0
        for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if qlen == 0:
                continue
            pages = meta.block_tables[i, : -(-slen // bs)].long()
            # [pages, hk, bs, d] -> [hk, pages * bs, d], cut to the context
            keys = kv_cache[0][pages].transpose(0, 1).reshape(hk, -1, d)[:, :slen].to(q.dtype)
            values = kv_cache[1][pages].transpose(0, 1).reshape(hk, -1, d)[:, :slen].to(q.dtype)
            pos = torch.arange(slen - qlen, slen)[:, None]
            key_pos = torch.arange(slen)[None, :]
            mask = key_pos <= pos
            if spec.sliding_window:
                mask &= key_pos > pos - spec.sliding_window
            queries = q[start:start + qlen].transpose(0, 1)  # [heads, qlen, d]
            attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=spec.num_heads != hk)
            out[start:start + qlen] = attn.transpose(0, 1)
            start += qlen
        return out.reshape(num_tokens, spec.num_heads * d)
