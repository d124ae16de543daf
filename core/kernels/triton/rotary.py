"""Rotary position embedding in Triton: each program rotates every head of a few tokens of q or k.

Neox style rotates the two halves of the first ``rotary_dim`` features, the other style
interleaved pairs; features past ``rotary_dim`` pass through. As the reference, cosines
and sines are rounded to the input dtype before use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.launch import kernel_for, next_pow2

#: Elements (tokens x heads x rotary pairs) per program.
TILE = 2048


@triton.jit
def _rotary(pos_ptr, x_ptr, y_ptr, cs_ptr, n, stride_xt, stride_yt, stride_cs,
            NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
            BLOCK_T: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, HEAD_PAD: tl.constexpr):
    t1 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t1 < n
    p = tl.load(pos_ptr + t1, mask=t_ok, other=0).to(tl.int64)[:, None, None]
    t = t1.to(tl.int64)[:, None, None]
    h = tl.arange(0, HEADS_PAD)[None, :, None]
    i = tl.arange(0, HALF_PAD)[None, None, :]
    dt = x_ptr.dtype.element_ty
    cs_mask = t_ok[:, None, None] & (i < HALF)
    cos = tl.load(cs_ptr + p * stride_cs + i, mask=cs_mask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(cs_ptr + p * stride_cs + HALF + i, mask=cs_mask, other=0.0).to(dt).to(tl.float32)
    mask = cs_mask & (h < NUM_HEADS)
    if IS_NEOX:
        i1 = i
        i2 = i + HALF
    else:
        i1 = 2 * i
        i2 = 2 * i + 1
    x_row = x_ptr + t * stride_xt + h * HEAD
    y_row = y_ptr + t * stride_yt + h * HEAD
    x1 = tl.load(x_row + i1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + i1, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + i2, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    if 2 * HALF < HEAD:
        d = tl.arange(0, HEAD_PAD)[None, None, :]
        pmask = t_ok[:, None, None] & (h < NUM_HEADS) & (d >= 2 * HALF) & (d < HEAD)
        tl.store(y_row + d, tl.load(x_row + d, mask=pmask, other=0.0), mask=pmask)


def _rotate(positions, x, cos_sin_cache, head_size, is_neox):
    n = positions.shape[0]
    x2 = x.reshape(n, -1)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    heads = x2.shape[1] // head_size
    half = cos_sin_cache.shape[-1] // 2
    if n:
        heads_pad, half_pad = next_pow2(heads), next_pow2(half)
        block_t = min(16, next_pow2(n), max(1, TILE // (heads_pad * half_pad)))
        kernel_for(_rotary, x2)[(triton.cdiv(n, block_t),)](
            positions, x2, y, cos_sin_cache, n, x2.stride(0), y.stride(0), cos_sin_cache.stride(0),
            NUM_HEADS=heads, HEAD=head_size, HALF=half, IS_NEOX=bool(is_neox), BLOCK_T=block_t,
            HEADS_PAD=heads_pad, HALF_PAD=half_pad, HEAD_PAD=next_pow2(head_size))
    return y.view(x.shape)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_size: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rotary_embedding`` op (see :mod:`tokenmill.ops.registry`)."""
    return (_rotate(positions, q, cos_sin_cache, head_size, is_neox),
            _rotate(positions, k, cos_sin_cache, head_size, is_neox))
