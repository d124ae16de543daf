"""Paged attention for the ``example`` platform, with its own cache layout.

Pages are stored head-major, ``[2, num_blocks, num_kv_heads, block_size, head_size]``,
to show that a backend owns its layout: it says so in :meth:`kv_cache_shape`, writes
and reads pages accordingly, and the engine never looks inside. Blocks stay on
dimension 1, so the default ``copy_blocks`` still applies. One sequence at a time:
gather its pages, mask causally (and by the sliding window), attend with SDPA.
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

    @classmethod
    def kv_cache_shape(cls, num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
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
