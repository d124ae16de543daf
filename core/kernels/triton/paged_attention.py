"""Ragged paged attention in Triton: one launch serves a batch mixing prefill chunks and decodes.

Two kernels, launched back to back by :func:`paged_attention`:

* ``_reshape_and_cache``: each program writes the K and V (every KV head) of ``BLOCK_T``
  new tokens into the page slots ``slot_mapping`` names; slot ``-1`` writes nothing.
* ``_paged_attention``: the grid is (query tiles, KV heads). A tile is up to ``BLOCK_Q``
  consecutive new tokens of one sequence (the host lists the tiles once per step). Its
  ``BLOCK_M = BLOCK_Q * group`` rows are those tokens times the query heads sharing one KV
  head, so grouped-query attention reads each K/V page once for the whole group. It walks
  the sequence's keys ``TILE_N`` at a time, looking each key's page up in the block table
  (so any page size works), up to the tile's last query position and from the window's
  start when a sliding window is set, with an online softmax in float32. Decode tokens
  are simply tiles of one token.

Only plain pointer arithmetic (no block pointers, which Triton 3.9 removed). The cache
layout is the interface's default ``[2, num_blocks, block_size, num_kv_heads, head_size]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.launch import kernel_for, next_pow2


@triton.jit
def _reshape_and_cache(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, num_tokens,
                       stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_cb, stride_cs, stride_ch,
                       BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD: tl.constexpr,
                       BLOCK_T: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_PAD: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    t3 = t.to(tl.int64)[:, None, None]
    s3 = slot[:, None, None]
    h = tl.arange(0, HEADS_PAD)[None, :, None]
    d = tl.arange(0, HEAD_PAD)[None, None, :]
    mask = (s3 >= 0) & (h < NUM_KV_HEADS) & (d < HEAD)
    dst = (s3 // BLOCK_SIZE) * stride_cb + (s3 % BLOCK_SIZE) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + t3 * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t3 * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_attention(q_ptr, kc_ptr, vc_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, tile_seq_ptr, tile_start_ptr,
                     scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                     GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD: tl.constexpr,
                     HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, WINDOW: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q_off = tl.load(tile_start_ptr + tile)
    q_begin = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = q_off + rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD
    q_rows = (q_begin + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    # Keys past the tile's last query position are never visible to it.
    kv_end = tl.minimum(seq_len, ctx + q_off + BLOCK_Q)
    kv_begin = ctx * 0
    if WINDOW > 0:
        kv_begin = tl.maximum(ctx + q_off - WINDOW + 1, 0)
    offs = tl.arange(0, TILE_N)
    for j in range(kv_begin // TILE_N, tl.cdiv(kv_end, TILE_N)):
        kpos = j * TILE_N + offs
        # A tile of keys may span several pages: look each key's page up in the block table.
        blk = tl.load(bt_ptr + seq * stride_bt + kpos // BLOCK_SIZE, mask=kpos < kv_end, other=0).to(tl.int64)
        ptrs = blk[:, None] * stride_cb + (kpos % BLOCK_SIZE)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        k = tl.load(kc_ptr + ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        visible = (kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] < seq_len)
        if WINDOW > 0:
            visible = visible & (kpos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 so exp() gives 0, not nan.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_shift)
        p = tl.exp(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + ptrs, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


#: Tokens per program of the cache write; keys per iteration of the attention loop.
BLOCK_T = 16
TILE_N = 32


def block_m_for(group: int, max_query_len: int = 1) -> tuple[int, int]:
    """``(BLOCK_Q, BLOCK_M)`` for ``group`` query heads per KV head: a power of two of 16 rows or more.

    Steps with long prefill chunks get 64-row tiles (fewer programs, each K/V tile reused
    by more queries); decode-only steps 16-row tiles (less padding).
    """
    rows = 64 if max_query_len * group > 16 else 16
    block_m = next_pow2(group, rows)
    return max(1, block_m // group), block_m


def plan_tiles(query_lens: list[int], block_q: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The host-side tile list of one step: ``(tile_seq, tile_start)`` int32 tensors on ``device``."""
    seqs, starts = [], []
    for i, n in enumerate(query_lens):
        for s in range(0, n, block_q):
            seqs.append(i)
            starts.append(s)
    t = torch.tensor([seqs, starts], dtype=torch.int32).to(device)
    return t[0], t[1]


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` ``[T, Hk, D]`` into ``k_cache``/``v_cache`` ``[blocks, block_size, Hk, D]`` at the slots."""
    num_tokens, num_kv_heads, head = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    block_size = k_cache.shape[1]
    block_t = min(BLOCK_T, next_pow2(num_tokens))
    kernel_for(_reshape_and_cache, k)[(triton.cdiv(num_tokens, block_t),)](
        k, v, k_cache, v_cache, slot_mapping, num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=block_size, NUM_KV_HEADS=num_kv_heads, HEAD=head, BLOCK_T=block_t,
        HEADS_PAD=next_pow2(num_kv_heads), HEAD_PAD=next_pow2(head))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    tiles: tuple[torch.Tensor, torch.Tensor], block_q: int, scale: float,
                    sliding_window: int | None) -> torch.Tensor:
    """Attention of ``q`` ``[T, H, D]`` over the paged cache into ``out`` ``[T, H, D]`` (see the module doc).

    ``tiles`` comes from :func:`plan_tiles` with ``block_q`` from :func:`block_m_for`.
    """
    num_heads, head = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    block_m = next_pow2(group * block_q)
    tile_seq, tile_start = tiles
    if tile_seq.numel() == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    kernel_for(_paged_attention, q)[(tile_seq.numel(), num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, tile_seq, tile_start,
        float(scale), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD=head, HEAD_PAD=next_pow2(head, 16),
        BLOCK_SIZE=block_size, TILE_N=TILE_N, WINDOW=int(sliding_window or 0))
    return out
