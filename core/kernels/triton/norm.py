"""RMSNorm in Triton, with the residual add fused in: each program normalises a tile of rows.

Arithmetic follows the reference op exactly: the sum ``x + residual`` is rounded to the
input dtype (it is the new residual), normalised in float32, cast back to the input
dtype, then multiplied by the weight. Narrow rows are packed several to a program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.launch import kernel_for, next_pow2

#: Elements per program when packing several narrow rows together.
TILE = 4096


@triton.jit
def _rms_norm(x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, eps, rows, hidden,
              stride_x, stride_r, stride_y, stride_nr,
              HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (r < rows) & (cols < hidden)
    x = tl.load(x_ptr + r * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + r * stride_r + cols, mask=mask, other=0.0)
        tl.store(new_res_ptr + r * stride_nr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 1) / hidden
    normed = (xf * (1.0 / tl.sqrt(var + eps))[:, None]).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + r * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, hidden = x2.shape
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty_like(x2)
    else:
        r2 = new_res = x2
    if rows:
        block = next_pow2(hidden)
        block_rows = min(16, next_pow2(rows), max(1, TILE // block))
        kernel_for(_rms_norm, x2)[(triton.cdiv(rows, block_rows),)](
            x2, r2, weight, y, new_res, float(eps), rows, hidden,
            x2.stride(0), r2.stride(0), y.stride(0), new_res.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK=block)
    return y.view(shape), new_res.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The ``rms_norm`` op (see :mod:`tokenmill.ops.registry`)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fused_add_rms_norm`` op: ``(rms_norm(x + residual), x + residual)`` in one pass."""
    return _launch(x, residual, weight, eps)
