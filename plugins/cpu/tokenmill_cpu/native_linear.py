"""A C kernel for linears with few rows (decode): the weight streamed once, in its checkpoint layout.

With M = 1..32 rows a linear is a read of the whole weight: the arithmetic is a few FLOPs per
weight byte, so the speed is the memory bandwidth the kernel sustains. oneDNN's inner
product, even on pre-packed weights, reaches 55-70% of the box's read bandwidth at one row
and less as rows are added (it re-reads the weight per block of rows). This kernel reads
``[out, in]`` rows in tiles of eight output features: each tile (8 x K values, 16-32 KiB for
K = 512-1024) comes from memory once and stays in L1 while every input row is dotted with it,
eight vector accumulators at a time (AVX2 or AVX-512, whatever ``-march=native`` gives), and
the tiles are spread over the OpenMP threads. It is compiled into the cpu plugin's library
(:mod:`tokenmill_cpu.native`). float32 weights with float32 rows; bfloat16 weights with
bfloat16 rows, widened as they are read (a shift and a mask per pair), accumulated in float32
and rounded to nearest even. In bfloat16 (where oneDNN has no bfloat16 kernels for the CPU,
as on the development box, ``F.linear`` is the alternative): 33 linears at M = 1 / 8 / 32 in
4.4 / 11.7 / 35.6 ms against 4.2 / 25.6 / 99.5 ms.

Measured on the 2-core development box (Zen 3, AVX2), the 33 linears of a llama20m decode step
(92 MB of float32 weights), best of 5: M = 1 / 4 / 8 / 16 / 32 rows in 6.2 / 6.6 / 7.6 / 11.2 /
15.1 ms against oneDNN's 8.6 / 9.6 / 11.5 / 14.9 / 18.3 ms (1.37x / 1.45x / 1.50x / 1.33x /
1.21x); at 64 rows oneDNN is ahead (100 vs 111 GFLOP/s), so larger batches keep it.
"""
from __future__ import annotations

import ctypes

import torch

#: Most rows served by the kernel; a linear with more goes to oneDNN (or ``F.linear``).
MAX_ROWS = 32

#: Compiled after :data:`tokenmill_cpu.native_ops.SOURCE`, whose ``bf16_ld`` / ``bf16_round`` it uses.
SOURCE = r"""
/* y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for few rows m. w row-major [N, K]; x rows and
   y rows with strides xs / ys. Tiles of GV_NR output features: the tile's weights are read
   from memory once, then reused from L1 for every row. */
#ifdef __AVX512F__
#define GV_LANES 16
#else
#define GV_LANES 8
#endif
#define GV_NR 8
typedef float gv_vf __attribute__((vector_size(GV_LANES * 4)));
typedef float gv_vfu __attribute__((vector_size(GV_LANES * 4), aligned(4)));
typedef uint32_t gv_vu __attribute__((vector_size(GV_LANES * 4)));
typedef uint32_t gv_vuu __attribute__((vector_size(GV_LANES * 4), aligned(2)));

static inline float gv_sum(gv_vf v) {
    float t = 0.0f;
    for (int l = 0; l < GV_LANES; l++) t += v[l];
    return t;
}

/* float32: output features n0 .. n0 + nr - 1 (nr <= GV_NR) of every row. */
static inline void gv_tile_f32(const float *x, int64_t xs, int M, const float *w, const float *bias, float *y,
                               int64_t ys, int64_t n0, int nr, int K) {
    const int kv = K - K % GV_LANES;
    for (int m = 0; m < M; m++) {
        const float *xm = x + (int64_t)m * xs;
        gv_vf a[GV_NR];
        for (int r = 0; r < GV_NR; r++) a[r] = (gv_vf){0};
        if (nr == GV_NR) {
            for (int k = 0; k < kv; k += GV_LANES) {
                gv_vf xv = *(const gv_vfu *)(xm + k);
                for (int r = 0; r < GV_NR; r++) a[r] += *(const gv_vfu *)(w + (n0 + r) * K + k) * xv;
            }
        } else {
            for (int k = 0; k < kv; k += GV_LANES) {
                gv_vf xv = *(const gv_vfu *)(xm + k);
                for (int r = 0; r < nr; r++) a[r] += *(const gv_vfu *)(w + (n0 + r) * K + k) * xv;
            }
        }
        for (int r = 0; r < nr; r++) {
            float v = gv_sum(a[r]);
            for (int k = kv; k < K; k++) v += xm[k] * w[(n0 + r) * K + k];
            y[(int64_t)m * ys + n0 + r] = bias ? v + bias[n0 + r] : v;
        }
    }
}

/* bfloat16: a 32-bit word of the weight holds elements 2j (low half) and 2j + 1 (high half), so a
   shift and a mask widen a vector of words into the even and the odd elements, without any
   shuffle; the rows were widened beforehand with each block of 2 * GV_LANES inputs stored evens
   first, odds second, to match. */
static inline void gv_tile_bf16(const float *xp, int M, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                                int64_t ys, int64_t n0, int nr, int K) {
    const int kv = K - K % (2 * GV_LANES);
    for (int m = 0; m < M; m++) {
        const float *xm = xp + (int64_t)m * K;
        gv_vf a[GV_NR];
        for (int r = 0; r < GV_NR; r++) a[r] = (gv_vf){0};
        for (int k = 0; k < kv; k += 2 * GV_LANES) {
            gv_vf xe = *(const gv_vfu *)(xm + k), xo = *(const gv_vfu *)(xm + k + GV_LANES);
            for (int r = 0; r < nr; r++) {
                gv_vu u = *(const gv_vuu *)(w + (n0 + r) * K + k);
                a[r] += (gv_vf)(u << 16) * xe + (gv_vf)(u & 0xffff0000u) * xo;
            }
        }
        for (int r = 0; r < nr; r++) {
            float v = gv_sum(a[r]);
            for (int k = kv; k < K; k++) v += xm[k] * bf16_ld(w, (n0 + r) * K + k);
            if (bias) v += bf16_ld(bias, n0 + r);
            y[(int64_t)m * ys + n0 + r] = bf16_round(v);
        }
    }
}

#define GV_TILES(CALL)                                                                       \
    const int tiles = (N + GV_NR - 1) / GV_NR;                                               \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)")      \
    for (int t = 0; t < tiles; t++) {                                                        \
        int64_t n0 = (int64_t)t * GV_NR;                                                     \
        int nr = N - n0 < GV_NR ? (int)(N - n0) : GV_NR;                                     \
        CALL;                                                                                \
    }

void linear_rows_f32(const float *x, int64_t xs, const float *w, const float *bias, float *y, int64_t ys,
                     int M, int N, int K, int nthreads) {
    GV_TILES(gv_tile_f32(x, xs, M, w, bias, y, ys, n0, nr, K))
}

/* bfloat16 rows are widened once into scratch (M x K floats: at most a few hundred KiB);
   returns -1 when that scratch cannot be allocated (y is then not written), else 0. */
int linear_rows_bf16(const uint16_t *x, int64_t xs, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                      int64_t ys, int M, int N, int K, int nthreads) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)M * (size_t)K);
    if (!xp) return -1;
    const int kv = K - K % (2 * GV_LANES);
    for (int m = 0; m < M; m++) {
        const uint16_t *xm = x + (int64_t)m * xs;
        float *dst = xp + (int64_t)m * K;
        for (int k = 0; k < kv; k += 2 * GV_LANES)
            for (int j = 0; j < GV_LANES; j++) {
                dst[k + j] = bf16_ld(xm, k + 2 * j);
                dst[k + GV_LANES + j] = bf16_ld(xm, k + 2 * j + 1);
            }
        for (int k = kv; k < K; k++) dst[k] = bf16_ld(xm, k);
    }
    GV_TILES(gv_tile_bf16(xp, M, w, bias, y, ys, n0, nr, K))
    free(xp);
    return 0;
}
"""

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: C function name -> ctypes argument types (set on the library by :func:`tokenmill_cpu.native.load`).
SIGNATURES = {name: [_P, _I64, _P, _P, _P, _I64, _I32, _I32, _I32, _I32]
              for name in ("linear_rows_f32", "linear_rows_bf16")}
#: C function name -> ctypes return type, for those that return one.
RESTYPES = {"linear_rows_bf16": _I32}
_NAMES = {torch.float32: "linear_rows_f32", torch.bfloat16: "linear_rows_bf16"}
_FNS: dict = {}  # (library, dtype) -> its C function


def supports(dtype) -> bool:
    """Whether the kernel serves weights and rows of ``dtype``."""
    return dtype in _NAMES


def linear(lib, x, weight, bias, num_threads: int):
    """``x @ weight.T + bias`` through the kernel, or None when it does not serve these tensors.

    ``x`` ``[..., K]`` with at most :data:`MAX_ROWS` rows, ``weight`` a contiguous ``[N, K]`` of
    ``x``'s dtype (float32 or bfloat16), ``bias`` ``[N]`` or None."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k) if x.dim() != 2 else x
    m = x2.shape[0]
    if m > MAX_ROWS or x2.stride(-1) != 1 or x.dtype != weight.dtype or not weight.is_contiguous():
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return None
    key = (id(lib), x.dtype)
    fn = _FNS.get(key)
    if fn is None:
        if x.dtype not in _NAMES:
            return None
        fn = _FNS[key] = getattr(lib, _NAMES[x.dtype])
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)
    if fn(x2.data_ptr(), x2.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), n,
          m, n, k, num_threads):
        raise MemoryError(f"no memory for the {m} x {k} float32 scratch of a bfloat16 linear")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
