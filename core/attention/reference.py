"""The reference paged attention backend: plain torch, every platform, any head size.

Implements the ragged paged contract of :mod:`tokenmill.attention.interface`. Sequences
with one new token (decode) are computed together as one padded batch; sequences with
several new tokens (prefill chunks) one at a time, each with an explicit causal (and
sliding-window) mask over its gathered context. Grouped-query attention is computed by
folding the query heads of a group into the query-length axis, so K/V are never repeated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.attention.interface import AttentionBackend, AttentionMetadata


@dataclass
class _Plan:
    """Host-side plan of one step, shared by every layer (built from the ``*_cpu`` lists)."""

    decode_seqs: list[int]  # sequences with exactly one new token
    decode_rows: torch.Tensor | None  # their rows in q (device, int64)
    decode_blocks: torch.Tensor | None  # [S_dec, nb] block ids, padding replaced by 0
    prefills: list[tuple[int, int, int, int]]  # (seq index, first row, last row + 1, seq_len)
    block_size: int
    masks: dict = field(default_factory=dict)  # (kind, seq or None, window) -> bool mask


def _build_plan(meta: AttentionMetadata) -> _Plan:
    bs = meta.block_size
    decode_seqs, decode_starts, prefills = meta.split_decodes()
    device = meta.block_tables.device
    decode_rows = decode_blocks = None
    if decode_seqs:
        decode_rows = torch.tensor(decode_starts, dtype=torch.long, device=device)
        lens = [meta.seq_lens_cpu[i] for i in decode_seqs]
        nb = max(-(-n // bs) for n in lens)
        seq_idx = torch.tensor(decode_seqs, dtype=torch.long, device=device)
        blocks = meta.block_tables.index_select(0, seq_idx)[:, :nb].to(torch.long)
        needed = torch.tensor([-(-n // bs) for n in lens], device=device)
        # Entries past a sequence's own blocks are arbitrary: make them a valid index.
        decode_blocks = torch.where(torch.arange(nb, device=device)[None, :] < needed[:, None], blocks, 0)
    return _Plan(decode_seqs, decode_rows, decode_blocks, prefills, bs)


def gqa_attention(q, k, v, mask, scale):
    """``q``: [B, Lq, H, D]; ``k``, ``v``: [B, Lk, Hk, D]; ``mask``: bool [B, Lq, Lk] -> [B, Lq, H, D]."""
    b, lq, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    # Query head h reads KV head h // g: put each group's g heads along the query axis.
    qg = q.reshape(b, lq, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * lq, d)
    m = mask[:, None, None, :, :].expand(b, 1, g, lq, mask.shape[-1]).reshape(b, 1, g * lq, -1)
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, scale=scale)
    return out.view(b, hk, g, lq, d).permute(0, 3, 1, 2, 4).reshape(b, lq, h, d)


class ReferenceAttention(AttentionBackend):
    """Plain-torch paged attention for every platform: any head size, sliding window, GQA/MQA."""

    name = "reference"
    device_types = ("*",)
    priority = 0
    head_sizes = None
    sliding_window = True
    gqa = True

    @classmethod
    def prepare(cls, meta: AttentionMetadata) -> None:
        meta.extra = _build_plan(meta)

    def _plan(self, meta: AttentionMetadata) -> _Plan:
        if not isinstance(meta.extra, _Plan):
            meta.extra = _build_plan(meta)
        return meta.extra

    def _mask(self, plan: _Plan, key, q_pos, k_len, seq_lens, device):
        """bool [B, Lq, Lk]: key ``t`` is visible to a query at position ``p`` iff ``t <= p`` (and in the window)."""
        mask = plan.masks.get(key)
        if mask is None:
            window = self.spec.sliding_window
            t = torch.arange(k_len, device=device)[None, None, :]
            p = q_pos[:, :, None]
            mask = (t <= p) & (t < seq_lens[:, None, None])
            if window:
                mask &= t > p - window
            plan.masks[key] = mask
        return mask

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata):
        """Write ``k``/``v`` at ``meta.slot_mapping`` (skipping -1), then attend; returns ``[T, H*D]``."""
        num_tokens = q.shape[0]
        hk, d = self.spec.num_kv_heads, self.spec.head_size
        q = q.view(num_tokens, -1, d)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
        slots = meta.slot_mapping.to(torch.long)
        valid = slots >= 0
        flat_k[slots[valid]] = k.view(num_tokens, hk, d)[valid].to(flat_k.dtype)
        flat_v[slots[valid]] = v.view(num_tokens, hk, d)[valid].to(flat_v.dtype)

        plan = self._plan(meta)
        out = torch.empty_like(q)
        window = self.spec.sliding_window
        bs = plan.block_size
        if plan.decode_seqs:
            blocks = plan.decode_blocks
            nseq, nb = blocks.shape
            kd = k_cache[blocks].view(nseq, nb * bs, hk, d).to(q.dtype)
            vd = v_cache[blocks].view(nseq, nb * bs, hk, d).to(q.dtype)
            key = ("decode", None, window)
            if key not in plan.masks:
                lens = torch.tensor([meta.seq_lens_cpu[i] for i in plan.decode_seqs], device=q.device)
                self._mask(plan, key, (lens - 1)[:, None], nb * bs, lens, q.device)
            qd = q.index_select(0, plan.decode_rows)[:, None]
            out[plan.decode_rows] = gqa_attention(qd, kd, vd, plan.masks[key], self.scale)[:, 0]
        for seq, lo, hi, slen in plan.prefills:
            nb = -(-slen // bs)
            blocks = meta.block_tables[seq, :nb].to(torch.long)
            kp = k_cache[blocks].view(1, nb * bs, hk, d)[:, :slen].to(q.dtype)
            vp = v_cache[blocks].view(1, nb * bs, hk, d)[:, :slen].to(q.dtype)
            key = ("prefill", seq, window)
            if key not in plan.masks:
                q_pos = torch.arange(slen - (hi - lo), slen, device=q.device)[None, :]
                self._mask(plan, key, q_pos, slen, torch.tensor([slen], device=q.device), q.device)
            out[lo:hi] = gqa_attention(q[lo:hi][None], kp, vp, plan.masks[key], self.scale)[0]
        return out.view(num_tokens, -1)
