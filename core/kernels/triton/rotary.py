"""Rotary position embedding in Triton: one program per token rotates every head of q or k.

Neox style rotates the two halves of the first ``rotary_dim`` features, the other style
interleaved pairs; features past ``rotary_dim`` pass through. As the reference, cosines
and sines are rounded to the input dtype before use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.launch import kernel_for, next_pow2


@triton.jit
def _rotary(pos_ptr, x_ptr, y_ptr, cs_ptr, stride_xt, stride_yt, stride_cs,
            NUM_HEADS: tl.constexpr, HEAD: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
            HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr, HEAD_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    i_ok = i < HALF
    dt = x_ptr.dtype.element_ty
    cos = tl.load(cs_ptr + p * stride_cs + i, mask=i_ok, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(cs_ptr + p * stride_cs + HALF + i, mask=i_ok, other=0.0).to(dt).to(tl.float32)
    h = tl.arange(0, HEADS_PAD)[:, None]
    mask = (h < NUM_HEADS) & i_ok[None, :]
    if IS_NEOX:
        i1 = i
        i2 = i + HALF
    else:
        i1 = 2 * i
        i2 = 2 * i + 1
    x_row = x_ptr + t * stride_xt + h * HEAD
    y_row = y_ptr + t * stride_yt + h * HEAD
    x1 = tl.load(x_row + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + i1[None, :], (x1 * cos[None, :] - x2 * sin[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + i2[None, :], (x2 * cos[None, :] + x1 * sin[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    if 2 * HALF < HEAD:
        d = tl.arange(0, HEAD_PAD)[None, :]
        pmask = (h < NUM_HEADS) & (d >= 2 * HALF) & (d < HEAD)
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
        kernel_for(_rotary, x2)[(n,)](
            positions, x2, y, cos_sin_cache, x2.stride(0), y.stride(0), cos_sin_cache.stride(0),
            NUM_HEADS=heads, HEAD=head_size, HALF=half, IS_NEOX=bool(is_neox),
            HEADS_PAD=next_pow2(heads), HALF_PAD=next_pow2(half), HEAD_PAD=next_pow2(head_size))
    return y.view(x.shape)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_size: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rotary_embedding`` op (see :mod:`tokenmill.ops.registry`)."""
    return (_rotate(positions, q, cos_sin_cache, head_size, is_neox),
            _rotate(positions, k, cos_sin_cache, head_size, is_neox))
