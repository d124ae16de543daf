"""SiLU-and-mul in Triton: ``silu(x[:, :I]) * x[:, I:]`` over the flattened ``[N, I]`` output.

As the reference: the SiLU is evaluated in float32 and rounded to the input dtype before
the product, which is rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.launch import kernel_for, next_pow2

BLOCK = 1024


@triton.jit
def _silu_and_mul(x_ptr, y_ptr, total, inter, stride_x, stride_y, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    row = e // inter
    col = e % inter
    gate = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + col, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(y_ptr + row * stride_y + col, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The ``silu_and_mul`` op (see :mod:`tokenmill.ops.registry`)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, width = x2.shape
    inter = width // 2
    y = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    total = rows * inter
    if total:
        block = min(BLOCK, next_pow2(total))
        kernel_for(_silu_and_mul, x2)[(triton.cdiv(total, block),)](
            x2, y, total, inter, x2.stride(0), y.stride(0), BLOCK=block)
    return y.view(*shape[:-1], inter)
