"""RMSNorm in Triton, with the residual add fused in: one program per row.

Arithmetic follows the reference op exactly: the sum ``x + residual`` is rounded to the
input dtype (it is the new residual), normalised in float32, cast back to the input
dtype, then multiplied by the weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.launch import kernel_for, next_pow2


@triton.jit
def _rms_norm(x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, eps, hidden,
              stride_x, stride_r, stride_y, stride_nr,
              HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(new_res_ptr + row * stride_nr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / hidden
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


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
        kernel_for(_rms_norm, x2)[(rows,)](
            x2, r2, weight, y, new_res, float(eps), hidden,
            x2.stride(0), r2.stride(0), y.stride(0), new_res.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(hidden))
    return y.view(shape), new_res.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The ``rms_norm`` op (see :mod:`tokenmill.ops.registry`)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fused_add_rms_norm`` op: ``(rms_norm(x + residual), x + residual)`` in one pass."""
    return _launch(x, residual, weight, eps)
