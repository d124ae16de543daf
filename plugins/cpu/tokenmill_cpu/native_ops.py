"""C kernels for the transformer block's small ops: RMSNorm (with the residual add), rotary, SiLU-and-mul.

At decode's few rows each of these ops is a handful of torch calls (rotary: a gather, six
elementwise passes, views), whose dispatch and OpenMP wake-ups cost more than the
arithmetic; one C loop per op does it in one pass on the calling thread, and spreads over
``nthreads`` OpenMP threads only when the tensor is large (prefill). They follow the
contracts of :mod:`tokenmill.ops.registry` in float32 and in bfloat16, where they round to
bfloat16 at the same points as the reference (after the normalisation, after each product
and sum of the rotation, with the cosines and sines rounded first). They are compiled into
the same library as the decode-attention kernel (:mod:`tokenmill_cpu.native`); without a C
compiler the torch versions in :mod:`tokenmill_cpu.ops` serve.
"""
from __future__ import annotations

import ctypes

import torch

SOURCE = r"""
/* Elementwise ops of the transformer block, one pass over memory each. Rows of width N with
   row strides; `nthreads` OpenMP threads only when the work is large enough to pay for
   waking them (decode batches run on the calling thread). T is float (float32) or
   uint16_t (bfloat16 bits); LD/ST widen and round (to nearest even) between them. */
#define PAR_MIN 65536

static inline float bf16_ld(const uint16_t *p, int64_t i) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)p[i] << 16;
    return c.f;
}
static inline uint16_t bf16_round(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u);  /* quiet NaN */
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}
static inline float bf16_r(float f) { union { uint32_t u; float f; } c; c.u = (uint32_t)bf16_round(f) << 16; return c.f; }

#define F32_LD(p, i) ((p)[i])
#define F32_ST(p, i, v) ((p)[i] = (v))
#define F32_R(v) (v)
#define BF16_LD(p, i) bf16_ld((p), (i))
#define BF16_ST(p, i, v) ((p)[i] = bf16_round(v))
#define BF16_R(v) bf16_r(v)

#define DEFINE_OPS(SUF, T, LD, ST, R)                                                                      \
static float inv_rms_##SUF(const T *x, int N, float eps) {                                                 \
    float ss = 0.0f;                                                                                       \
    _Pragma("omp simd reduction(+:ss)")                                                                    \
    for (int i = 0; i < N; i++) { const float v = LD(x, i); ss += v * v; }                                \
    return 1.0f / sqrtf(ss / (float)N + eps);                                                              \
}                                                                                                          \
void rms_norm_##SUF(const T *x, int64_t xs, const T *w, T *out, int64_t os, int T_, int N, float eps,      \
                    int nthreads) {                                                                        \
    _Pragma("omp parallel for if ((int64_t)T_ * N >= PAR_MIN) num_threads(nthreads)")                      \
    for (int t = 0; t < T_; t++) {                                                                         \
        const T *xr = x + t * xs;                                                                          \
        T *o = out + t * os;                                                                               \
        const float inv = inv_rms_##SUF(xr, N, eps);                                                       \
        _Pragma("omp simd")                                                                                \
        for (int i = 0; i < N; i++) ST(o, i, LD(w, i) * R(LD(xr, i) * inv));                               \
    }                                                                                                      \
}                                                                                                          \
/* new_res = x + res; out = rms_norm(new_res) */                                                           \
void fused_add_rms_norm_##SUF(const T *x, int64_t xs, const T *res, int64_t rs, const T *w, T *out,        \
                              T *new_res, int T_, int N, float eps, int nthreads) {                        \
    _Pragma("omp parallel for if ((int64_t)T_ * N >= PAR_MIN) num_threads(nthreads)")                      \
    for (int t = 0; t < T_; t++) {                                                                         \
        const T *xr = x + t * xs, *rr = res + t * rs;                                                      \
        T *nr = new_res + (int64_t)t * N, *o = out + (int64_t)t * N;                                       \
        _Pragma("omp simd")                                                                                \
        for (int i = 0; i < N; i++) ST(nr, i, LD(rr, i) + LD(xr, i));                                      \
        const float inv = inv_rms_##SUF(nr, N, eps);                                                       \
        _Pragma("omp simd")                                                                                \
        for (int i = 0; i < N; i++) ST(o, i, LD(w, i) * R(LD(nr, i) * inv));                               \
    }                                                                                                      \
}                                                                                                          \
/* Neox rotary of whole heads: x1 = x[:D/2], x2 = x[D/2:]; out = (x1*cos - x2*sin, x2*cos + x1*sin);     \
   the float32 cache rows are [cos(D/2), sin(D/2)]. */                                                     \
static void rotate_heads_##SUF(const T *x, T *o, int H, int D, const float *cs) {                         \
    const int h2 = D / 2;                                                                                  \
    for (int h = 0; h < H; h++) {                                                                          \
        const T *x1 = x + (int64_t)h * D, *x2 = x1 + h2;                                                   \
        T *o1 = o + (int64_t)h * D, *o2 = o1 + h2;                                                         \
        _Pragma("omp simd")                                                                                \
        for (int i = 0; i < h2; i++) {                                                                     \
            const float a = LD(x1, i), b = LD(x2, i), c = R(cs[i]), s = R(cs[h2 + i]);                     \
            ST(o1, i, R(a * c) - R(b * s));                                                                \
            ST(o2, i, R(b * c) + R(a * s));                                                                \
        }                                                                                                  \
    }                                                                                                      \
}                                                                                                          \
/* Returns 1, writing nothing, when a position lies outside the cache's `rows` rows; else 0. */            \
int rotary_neox_##SUF(const int64_t *pos, const T *q, int64_t qs, const T *k, int64_t ks,                  \
                      const float *cache, int64_t rows, T *qo, T *ko, int T_, int Hq, int Hk, int D,       \
                      int nthreads) {                                                                      \
    for (int t = 0; t < T_; t++)                                                                           \
        if (pos[t] < 0 || pos[t] >= rows) return 1;                                                        \
    _Pragma("omp parallel for if ((int64_t)T_ * (Hq + Hk) * D >= PAR_MIN) num_threads(nthreads)")          \
    for (int t = 0; t < T_; t++) {                                                                         \
        const float *cs = cache + pos[t] * D;                                                              \
        rotate_heads_##SUF(q + t * qs, qo + (int64_t)t * Hq * D, Hq, D, cs);                               \
        rotate_heads_##SUF(k + t * ks, ko + (int64_t)t * Hk * D, Hk, D, cs);                               \
    }                                                                                                      \
    return 0;                                                                                              \
}

DEFINE_OPS(f32, float, F32_LD, F32_ST, F32_R)
DEFINE_OPS(bf16, uint16_t, BF16_LD, BF16_ST, BF16_R)

/* SwiGLU's activation: out = silu(x[:I]) * x[I:] per row, silu(a) = a / (1 + exp(-a)); bfloat16 rounds
   the activation and then the product, as the reference's two bfloat16 ops do. With AVX-512 or AVX2, a
   vector at a time (exp and the V* ops: the decode-attention kernel's). */
static inline __attribute__((always_inline)) void silu_mul_row(const void *x, void *o, int I, const int bf16) {
    int i = 0;
#ifdef VL
    for (; i + VL <= I; i += VL) {
        const vecf a = VLD(x, i, bf16), u = VLD(x, (int64_t)I + i, bf16);
        const vecf act = VDIV(a, VADD(VSET1(1.0f), VEXP(VSUB(VZERO(), a))));
        if (bf16) VST_BF16((uint16_t *)o + i, VMUL(VRND_BF16(act), u));
        else VSTU((float *)o + i, VMUL(act, u));
    }
#endif
    for (; i < I; i++) {
        if (bf16) {
            const float a = bf16_ld((const uint16_t *)x, i), u = bf16_ld((const uint16_t *)x, (int64_t)I + i);
            ((uint16_t *)o)[i] = bf16_round(bf16_r(a / (1.0f + expf(-a))) * u);
        } else {
            const float a = ((const float *)x)[i];
            ((float *)o)[i] = a / (1.0f + expf(-a)) * ((const float *)x)[(int64_t)I + i];
        }
    }
}

void silu_and_mul_f32(const float *x, int64_t xs, float *out, int64_t os, int T_, int I, int nthreads) {
    _Pragma("omp parallel for if ((int64_t)T_ * I >= PAR_MIN) num_threads(nthreads)")
    for (int t = 0; t < T_; t++) silu_mul_row(x + t * xs, out + t * os, I, 0);
}

void silu_and_mul_bf16(const uint16_t *x, int64_t xs, uint16_t *out, int64_t os, int T_, int I, int nthreads) {
    _Pragma("omp parallel for if ((int64_t)T_ * I >= PAR_MIN) num_threads(nthreads)")
    for (int t = 0; t < T_; t++) silu_mul_row(x + t * xs, out + t * os, I, 1);
}
"""

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_ARGS = {
    "rms_norm": [_P, _I64, _P, _P, _I64, _I32, _I32, _F32, _I32],
    "fused_add_rms_norm": [_P, _I64, _P, _I64, _P, _P, _P, _I32, _I32, _F32, _I32],
    "rotary_neox": [_P, _P, _I64, _P, _I64, _P, _I64, _P, _P, _I32, _I32, _I32, _I32, _I32],
    "silu_and_mul": [_P, _I64, _P, _I64, _I32, _I32, _I32],
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
#: C function name -> ctypes argument types (set on the library by :func:`tokenmill_cpu.native.load`).
SIGNATURES = {f"{op}_{suf}": args for op, args in _ARGS.items() for suf in _SUFFIX.values()}
#: C function name -> ctypes return type, for those that return one (the rest return nothing).
RESTYPES = {f"rotary_neox_{suf}": _I32 for suf in _SUFFIX.values()}


_KERNELS: dict = {}  # (library, op, dtype) -> its C function


def _fn(lib, op: str, *tensors):
    """The kernel of ``op`` for the tensors' common dtype, or None (another dtype, device or layout).

    On the hot path (every layer, every step): plain loops and a cached function, since at decode
    these checks cost as much as the kernels they guard."""
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype or t.dim() != 2 or t.stride(-1) != 1 or not t.is_cpu:
            return None
    key = (id(lib), op, dtype)
    fn = _KERNELS.get(key)
    if fn is None:
        suffix = _SUFFIX.get(dtype)
        if suffix is None:
            return None
        fn = _KERNELS[key] = getattr(lib, f"{op}_{suffix}")
    return fn


def rms_norm(lib, x, weight, eps):
    """``rms_norm`` in one pass, or None when the tensors are not the kernel's (the caller falls back)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    fn = _fn(lib, "rms_norm", x2, weight.view(1, -1)) if weight.is_contiguous() else None
    if fn is None:
        return None
    out = torch.empty(x2.shape, dtype=x.dtype)
    fn(x2.data_ptr(), x2.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), x2.shape[0], x2.shape[1],
       float(eps), torch.get_num_threads())
    return out.view(x.shape)


def fused_add_rms_norm(lib, x, residual, weight, eps):
    """``(rms_norm(x + residual), x + residual)`` in one pass, or None (the caller falls back)."""
    if x.shape != residual.shape or not weight.is_contiguous():
        return None
    fn = _fn(lib, "fused_add_rms_norm", x, residual, weight.view(1, -1))
    if fn is None:
        return None
    out, new_res = torch.empty(x.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)
    fn(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), weight.data_ptr(), out.data_ptr(),
       new_res.data_ptr(), x.shape[0], x.shape[1], float(eps), torch.get_num_threads())
    return out, new_res


def silu_and_mul(lib, x):
    """``silu(x[..., :I]) * x[..., I:]`` in one pass, or None when ``x`` is not the kernel's (the caller falls back)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    fn = _fn(lib, "silu_and_mul", x2) if x.shape[-1] % 2 == 0 else None
    if fn is None:
        return None
    inter = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype)
    fn(x2.data_ptr(), x2.stride(0), out.data_ptr(), out.stride(0), x2.shape[0], inter, torch.get_num_threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], inter)


def rotary_neox(lib, positions, q, k, cos_sin_cache, head_size):
    """Neox rotary of whole heads of ``q`` ``[T, Hq*D]`` and ``k`` ``[T, Hk*D]``, or None (the caller falls back)."""
    fn = _fn(lib, "rotary_neox", q, k)
    if fn is None or cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous():
        return None
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[-1] != head_size or q.shape[1] % head_size \
            or k.shape[1] % head_size:
        return None
    n = positions.shape[0]
    pos = positions.to(torch.int64).contiguous()
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    if fn(pos.data_ptr(), q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), cos_sin_cache.data_ptr(),
          cos_sin_cache.shape[0], q_out.data_ptr(), k_out.data_ptr(), n, q.shape[1] // head_size,
          k.shape[1] // head_size, head_size, torch.get_num_threads()):
        raise IndexError(f"rotary position out of range of the cos/sin cache ({cos_sin_cache.shape[0]} rows)")
    return q_out, k_out
