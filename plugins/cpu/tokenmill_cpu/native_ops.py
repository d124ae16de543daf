"""C kernels for the transformer block's small float32 ops: RMSNorm (with the residual add) and rotary.

At decode's few rows each of these ops is a handful of torch calls (rotary: a gather, six
elementwise passes, views), whose dispatch and OpenMP wake-ups cost more than the
arithmetic; one C loop per op does it in one pass on the calling thread, and spreads over
``nthreads`` OpenMP threads only when the tensor is large (prefill). They follow the
contracts of :mod:`tokenmill.ops.registry` in float32 and are compiled into the same
library as the decode-attention kernel (:mod:`tokenmill_cpu.native`), so without a C
compiler the torch versions in :mod:`tokenmill_cpu.ops` serve.
"""
from __future__ import annotations

import ctypes

import torch

SOURCE = r"""
/* Elementwise float32 ops of the transformer block, one pass over memory each. Rows of
   width N with row strides; `nthreads` OpenMP threads only when the work is large enough
   to pay for waking them (decode batches run on the calling thread). */
#define PAR_MIN 65536

static float row_inv_rms(const float *x, int N, float eps) {
    float ss = 0.0f;
    #pragma omp simd reduction(+:ss)
    for (int i = 0; i < N; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)N + eps);
}

void rms_norm_f32(const float *x, int64_t xs, const float *w, float *out, int64_t os, int T, int N, float eps,
                  int nthreads) {
    #pragma omp parallel for if ((int64_t)T * N >= PAR_MIN) num_threads(nthreads)
    for (int t = 0; t < T; t++) {
        const float *xr = x + t * xs;
        float *o = out + t * os;
        const float inv = row_inv_rms(xr, N, eps);
        #pragma omp simd
        for (int i = 0; i < N; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* new_res = x + res; out = rms_norm(new_res) */
void fused_add_rms_norm_f32(const float *x, int64_t xs, const float *res, int64_t rs, const float *w,
                            float *out, float *new_res, int T, int N, float eps, int nthreads) {
    #pragma omp parallel for if ((int64_t)T * N >= PAR_MIN) num_threads(nthreads)
    for (int t = 0; t < T; t++) {
        const float *xr = x + t * xs, *rr = res + t * rs;
        float *nr = new_res + (int64_t)t * N, *o = out + (int64_t)t * N;
        #pragma omp simd
        for (int i = 0; i < N; i++) nr[i] = rr[i] + xr[i];
        const float inv = row_inv_rms(nr, N, eps);
        #pragma omp simd
        for (int i = 0; i < N; i++) o[i] = w[i] * (nr[i] * inv);
    }
}

/* Neox rotary over full heads: for each token t at position pos[t], every head of q (Hq) and k (Hk),
   x1 = x[:D/2], x2 = x[D/2:]: out = (x1*cos - x2*sin, x2*cos + x1*sin); cache rows [cos(D/2), sin(D/2)]. */
static void rotate_heads(const float *x, float *o, int H, int D, const float *cs) {
    const int h2 = D / 2;
    const float *c = cs, *s = cs + h2;
    for (int h = 0; h < H; h++) {
        const float *x1 = x + (int64_t)h * D, *x2 = x1 + h2;
        float *o1 = o + (int64_t)h * D, *o2 = o1 + h2;
        #pragma omp simd
        for (int i = 0; i < h2; i++) {
            const float a = x1[i], b = x2[i];
            o1[i] = a * c[i] - b * s[i];
            o2[i] = b * c[i] + a * s[i];
        }
    }
}

void rotary_neox_f32(const int64_t *pos, const float *q, int64_t qs, const float *k, int64_t ks,
                     const float *cache, float *qo, float *ko, int T, int Hq, int Hk, int D, int nthreads) {
    #pragma omp parallel for if ((int64_t)T * (Hq + Hk) * D >= PAR_MIN) num_threads(nthreads)
    for (int t = 0; t < T; t++) {
        const float *cs = cache + pos[t] * D;
        rotate_heads(q + t * qs, qo + (int64_t)t * Hq * D, Hq, D, cs);
        rotate_heads(k + t * ks, ko + (int64_t)t * Hk * D, Hk, D, cs);
    }
}
"""

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
#: C function name -> ctypes argument types (set on the library by :func:`tokenmill_cpu.native.load`).
SIGNATURES = {
    "rms_norm_f32": [_P, _I64, _P, _P, _I64, _I32, _I32, _F32, _I32],
    "fused_add_rms_norm_f32": [_P, _I64, _P, _I64, _P, _P, _P, _I32, _I32, _F32, _I32],
    "rotary_neox_f32": [_P, _P, _I64, _P, _I64, _P, _P, _P, _I32, _I32, _I32, _I32, _I32],
}


def _rows_ok(*tensors) -> bool:
    """2-D float32 CPU tensors whose rows are contiguous (any row stride)."""
    return all(t.dim() == 2 and t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1
               for t in tensors)


def rms_norm(lib, x, weight, eps):
    """``rms_norm`` in one pass, or None when the shapes are not the kernel's (the caller falls back)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if not (_rows_ok(x2) and weight.is_contiguous() and weight.dtype == torch.float32):
        return None
    out = torch.empty(x2.shape, dtype=torch.float32)
    lib.rms_norm_f32(x2.data_ptr(), x2.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), x2.shape[0],
                     x2.shape[1], float(eps), torch.get_num_threads())
    return out.view(x.shape)


def fused_add_rms_norm(lib, x, residual, weight, eps):
    """``(rms_norm(x + residual), x + residual)`` in one pass, or None (the caller falls back)."""
    if x.shape != residual.shape or x.dim() != 2 or not (_rows_ok(x, residual) and weight.is_contiguous()
                                                         and weight.dtype == torch.float32):
        return None
    out, new_res = torch.empty(x.shape, dtype=torch.float32), torch.empty(x.shape, dtype=torch.float32)
    lib.fused_add_rms_norm_f32(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), weight.data_ptr(),
                               out.data_ptr(), new_res.data_ptr(), x.shape[0], x.shape[1], float(eps),
                               torch.get_num_threads())
    return out, new_res


def rotary_neox(lib, positions, q, k, cos_sin_cache, head_size):
    """Neox rotary of whole heads of ``q`` ``[T, Hq*D]`` and ``k`` ``[T, Hk*D]``, or None (the caller falls back)."""
    if q.dim() != 2 or k.dim() != 2 or not _rows_ok(q, k, cos_sin_cache) or not cos_sin_cache.is_contiguous():
        return None
    if cos_sin_cache.shape[-1] != head_size or q.shape[1] % head_size or k.shape[1] % head_size:
        return None
    n = positions.shape[0]
    pos = positions.to(torch.int64).contiguous()
    lo, hi = (int(v) for v in torch.aminmax(pos)) if n else (0, 0)
    if lo < 0 or hi >= cos_sin_cache.shape[0]:  # the C loop would read outside the cache
        raise IndexError(f"rotary position out of range of the cos/sin cache ({cos_sin_cache.shape[0]} rows)")
    q_out, k_out = torch.empty(q.shape, dtype=torch.float32), torch.empty(k.shape, dtype=torch.float32)
    lib.rotary_neox_f32(pos.data_ptr(), q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0),
                        cos_sin_cache.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), n, q.shape[1] // head_size,
                        k.shape[1] // head_size, head_size, torch.get_num_threads())
    return q_out, k_out
