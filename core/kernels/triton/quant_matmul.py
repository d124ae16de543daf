"""Dequantize-matmuls in Triton: ``y = x @ W.T (+ bias)`` with ``W`` dequantized tile by tile in registers.

Two kernels, both over a ``(M tiles, N tiles)`` grid that walks ``K`` in ``BLOCK_K`` steps
with a float32 accumulator (int32 for int8 activations), the float weight never
materialised in memory:

``_packed_matmul`` (GPTQ and AWQ after their repack)
    ``qweight`` int32 ``[K / P, N]`` packed along ``K``, ``P = 32 // BITS`` values per word,
    input ``k`` at bits ``BITS * (k % P)`` (GPTQ's own layout; AWQ is repacked into it).
    A ``[BLOCK_K / P, BLOCK_N]`` tile of words is unpacked to ``[BLOCK_K, BLOCK_N]`` by a
    shift and a reshape. ``zeros`` int16 and ``scales`` ``[G, N]``:
    ``W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n]`` in float32 with ``g = k // GROUP``,
    or ``g = gidx[k]`` when ``HAS_GIDX`` (act-order checkpoints whose groups are not equal
    runs after the load-time permutation). When a ``BLOCK_K`` tile lies inside one group
    (``GROUP % BLOCK_K == 0``) one row of scales and zeros serves the whole tile.
``_scaled_matmul`` (int8 weight-only, W8A8, FP8)
    ``w`` ``[N, K]`` of one-byte values (int8 or float8 e4m3) and a per-row float32 scale:
    ``y = (x @ w.T) * scale[n]``; with ``A_SCALE`` the activations are int8 with one scale
    per row (W8A8: int32 accumulation, exact) and ``y = acc * a_scale[m] * scale[n]``.

``x`` and the weight tiles are read through host-side tensor descriptors (Triton 3.9 has
no block pointers), which zero-fill out-of-range rows and columns; scales, zeros and the
group index are gathered with masked pointer loads. Float32 inputs multiply in IEEE
float32 (no TF32), so fp32 results match the reference to rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tokenmill.kernels.triton.launch import kernel_for, next_pow2


@triton.jit
def _packed_matmul(x_desc, q_desc, s_ptr, z_ptr, gidx_ptr, bias_ptr, y_ptr, M, N, K,
                   stride_s, stride_z, stride_y,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    shifts = (tl.arange(0, PACK) * BITS)[None, :, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([pid_m * BLOCK_M, k0])
        words = q_desc.load([k0 // PACK, pid_n * BLOCK_N])  # [BLOCK_K / PACK, BLOCK_N]
        q = tl.reshape((words[:, None, :] >> shifts) & MASK, [BLOCK_K, BLOCK_N]).to(tl.float32)
        if HAS_GIDX or (GROUP % BLOCK_K != 0):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            if HAS_GIDX:
                g = tl.load(gidx_ptr + k, mask=k_ok, other=0).to(tl.int64)
            else:
                g = (k // GROUP).to(tl.int64)
            mask = k_ok[:, None] & n_ok[None, :]
            s = tl.load(s_ptr + g[:, None] * stride_s + n[None, :], mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * stride_z + n[None, :], mask=mask, other=0).to(tl.float32)
        else:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_s + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * stride_z + n, mask=n_ok, other=0).to(tl.float32)[None, :]
        w = ((q - z) * s).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(y_ptr + m.to(tl.int64)[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m < M)[:, None] & n_ok[None, :])


@triton.jit
def _scaled_matmul(x_desc, w_desc, s_ptr, a_ptr, bias_ptr, y_ptr, M, N, K, stride_y,
                   A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if A_SCALE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([pid_m * BLOCK_M, k0])
        w = w_desc.load([pid_n * BLOCK_N, k0])  # [BLOCK_N, BLOCK_K]
        if A_SCALE:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    out = acc.to(tl.float32) * tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
    if A_SCALE:
        out = out * tl.load(a_ptr + m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m.to(tl.int64)[:, None] * stride_y + n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A descriptor needs a 16-byte aligned base and 16-byte multiple row strides (the callers check strides)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def descriptor_ok(rows_bytes: int) -> bool:
    """Whether a row of this many bytes can be a descriptor's stride (16-byte multiple)."""
    return rows_bytes % 16 == 0


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  gidx: torch.Tensor | None, group: int, bits: int, bias: torch.Tensor | None = None,
                  out_dtype=None) -> torch.Tensor:
    """``x [M, K] @ W.T`` for ``W`` packed as described in the module docstring; ``[M, N]`` in ``out_dtype``."""
    m, k = x.shape
    pack = 32 // bits
    n = qweight.shape[1]
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y
    x = _aligned(x)
    qweight = _aligned(qweight)
    block_k = 32 if group % 64 else 64
    block_m, block_n = _block_m(m), min(64, next_pow2(n, 16))
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    q_desc = TensorDescriptor.from_tensor(qweight, [block_k // pack, block_n])
    dummy = scales
    kernel_for(_packed_matmul, x)[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x_desc, q_desc, scales, zeros, gidx if gidx is not None else dummy, bias if bias is not None else dummy,
        y, m, n, k, scales.stride(0), zeros.stride(0), y.stride(0),
        BITS=bits, GROUP=group, HAS_GIDX=gidx is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def scaled_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                  a_scale: torch.Tensor | None = None, out_dtype=None) -> torch.Tensor:
    """``(x [M, K] @ w.T) * scale`` (``* a_scale[m]`` for int8 ``x``) ``+ bias``; ``[M, N]`` in ``out_dtype``."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y
    x = _aligned(x)
    w = _aligned(w)
    block_m, block_n, block_k = _block_m(m), min(64, next_pow2(n, 16)), 64
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(w, [block_n, block_k])
    scale = scale.to(torch.float32).contiguous()
    kernel_for(_scaled_matmul, x)[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x_desc, w_desc, scale, a_scale if a_scale is not None else scale, bias if bias is not None else scale,
        y, m, n, k, y.stride(0), A_SCALE=a_scale is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y
