"""A C kernel for linears with few rows (decode): the weight streamed once, in its checkpoint layout.

Since the tiled kernel (:mod:`tokenmill_cpu.native_tiles`) this one serves only layers whose
tiled copy did not fit the copy budget (:mod:`tokenmill_cpu.linear`): it needs no copy.

With M = 1..32 rows a linear is a read of the whole weight: the arithmetic is a few FLOPs per
weight byte, so the speed is the memory bandwidth the kernel sustains. oneDNN's inner
product, even on pre-packed weights, reaches 55-70% of the box's read bandwidth at one row
and less as rows are added (it re-reads the weight per block of rows). This kernel reads
``[out, in]`` rows in tiles of eight output features: each tile (8 x K values, 16-32 KiB for
K = 512-1024) comes from memory once and stays in L1 while every input row is dotted with it,
eight vector accumulators at a time (AVX2 or AVX-512, whatever ``-march=native`` gives), and
the tiles are spread over the OpenMP threads. It is compiled into the cpu plugin's library
(:mod:`tokenmill_cpu.native`). float32 weights with float32 rows; bfloat16 weights with
bfloat16 rows, widened as they are read (a shift and a mask per pair), two rows sharing each
widening, accumulated in float32 and rounded to nearest even. bfloat16 rows are widened in
panels of 256, so the kernel serves any M: where oneDNN has no bfloat16 kernels for the CPU
(as on the development box) the alternative is ``F.linear``, at 15-18 GFLOP/s from 32 to 2048
rows against the kernel's 66-89. Pairing the rows made bfloat16 1.15x / 1.26x / 1.22x faster
at 2 / 8 / 32 rows (llama20m's 33 decode linears, both builds in one process).

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

#: bfloat16 rows widened to float32 at a time (the kernel's scratch is at most this many rows).
PANEL_ROWS = 256

#: Compiled after :data:`tokenmill_cpu.native_ops.SOURCE`, whose ``bf16_ld`` / ``bf16_round`` it uses.
SOURCE = f"#define GV_PANEL {PANEL_ROWS}\n" + r"""
/* y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for few rows m. w row-major [N, K]; x rows and
   y rows with strides xs / ys. Tiles of GV_NR output features: the tile's weights are read
   from memory once, then reused from L1 for every row. */
#ifdef __AVX512F__
#define GV_LANES 16
#else
#define GV_LANES 8
#endif
typedef float gv_vf __attribute__((vector_size(GV_LANES * 4)));
typedef float gv_vfu __attribute__((vector_size(GV_LANES * 4), aligned(4)));
typedef uint32_t gv_vu __attribute__((vector_size(GV_LANES * 4)));
typedef uint32_t gv_vuu __attribute__((vector_size(GV_LANES * 4), aligned(2)));

static inline float gv_sum(gv_vf v) {
    float t = 0.0f;
    for (int l = 0; l < GV_LANES; l++) t += v[l];
    return t;
}

/* NAME: a register block of one row (bfloat16: MR rows) x NB output features, both
   compile-time so that the accumulators live in registers; in bfloat16 each weight vector is
   widened once for all MR rows. A row on its own takes eight outputs: enough independent
   accumulators to hide the FMA latency. */
#define GV_BLOCK_F32(NAME, NB)                                                                               \
static inline void NAME(const float *x, const float *w, const float *bias, float *y, int K) {                \
    const int kv = K - K % GV_LANES;                                                                         \
    gv_vf a[NB];                                                                                             \
    _Pragma("GCC unroll 8") for (int r = 0; r < NB; r++) a[r] = (gv_vf){0};                                  \
    for (int k = 0; k < kv; k += GV_LANES) {                                                                 \
        gv_vf xv = *(const gv_vfu *)(x + k);                                                                 \
        _Pragma("GCC unroll 8") for (int r = 0; r < NB; r++) a[r] += *(const gv_vfu *)(w + (int64_t)r * K + k) * xv; \
    }                                                                                                        \
    _Pragma("GCC unroll 8") for (int r = 0; r < NB; r++) {                                                   \
        float v = gv_sum(a[r]);                                                                              \
        for (int k = kv; k < K; k++) v += x[k] * w[(int64_t)r * K + k];                                      \
        y[r] = bias ? v + bias[r] : v;                                                                       \
    }                                                                                                        \
}

/* bfloat16: a 32-bit word of the weight holds elements 2j (low half) and 2j + 1 (high half), so a
   shift and a mask widen a vector of words into the even and the odd elements, without any
   shuffle; the rows were widened beforehand (``xp``, K floats a row) with each block of
   2 * GV_LANES inputs stored evens first, odds second, to match. */
#define GV_BLOCK_BF16(NAME, MR, NB)                                                                          \
static inline void NAME(const float *xp, const uint16_t *w, const uint16_t *bias,                            \
                                       uint16_t *y, int64_t ys, int K) {                                     \
    const int kv = K - K % (2 * GV_LANES);                                                                   \
    gv_vf a[MR * NB];                                                                                        \
    _Pragma("GCC unroll 8") for (int i = 0; i < MR * NB; i++) a[i] = (gv_vf){0};                             \
    for (int k = 0; k < kv; k += 2 * GV_LANES) {                                                             \
        gv_vf xe[MR], xo[MR];                                                                                \
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) {                                               \
            xe[m] = *(const gv_vfu *)(xp + (int64_t)m * K + k);                                              \
            xo[m] = *(const gv_vfu *)(xp + (int64_t)m * K + k + GV_LANES);                                   \
        }                                                                                                    \
        _Pragma("GCC unroll 8") for (int r = 0; r < NB; r++) {                                               \
            gv_vu u = *(const gv_vuu *)(w + (int64_t)r * K + k);                                             \
            gv_vf we = (gv_vf)(u << 16), wo = (gv_vf)(u & 0xffff0000u);                                      \
            _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) a[m * NB + r] += we * xe[m] + wo * xo[m];   \
        }                                                                                                    \
    }                                                                                                        \
    _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++)                                                     \
        _Pragma("GCC unroll 8") for (int r = 0; r < NB; r++) {                                               \
            float v = gv_sum(a[m * NB + r]);                                                                 \
            for (int k = kv; k < K; k++) v += xp[(int64_t)m * K + k] * bf16_ld(w, (int64_t)r * K + k);       \
            if (bias) v += bf16_ld(bias, r);                                                                 \
            y[m * ys + r] = bf16_round(v);                                                                   \
        }                                                                                                    \
}

/* bfloat16 pairs rows: the widening (a shift and a mask per weight vector) is then shared by
   two rows' FMAs (figures in the module docstring). In float32 pairing measured 0.72-0.85x (the
   weight loads it saves were not the limit), so float32 takes one row at a time. Outputs per pair: what the vector registers hold (AVX2 has 16, AVX-512 32). */
#ifdef __AVX512F__
#define GV_NB2 8
#else
#define GV_NB2 4
#endif
#define GV_NR 8
GV_BLOCK_F32(gv_f32_one, 1)
GV_BLOCK_F32(gv_f32_row, GV_NR)
GV_BLOCK_BF16(gv_bf16_one, 1, 1)
GV_BLOCK_BF16(gv_bf16_row, 1, GV_NR)
GV_BLOCK_BF16(gv_bf16_pair, 2, GV_NB2)

/* Output features n0 .. n0 + nr - 1 (nr <= GV_NR) of every row: the tile's weights come from
   memory once and stay in L1 for all rows. */
static inline void gv_tile_f32(const float *x, int64_t xs, int M, const float *w, const float *bias, float *y,
                               int64_t ys, int64_t n0, int nr, int K) {
    const float *wt = w + n0 * K, *bt = bias ? bias + n0 : 0;
    float *yt = y + n0;
    if (nr < GV_NR) {  /* the last, partial tile: one output at a time */
        for (int m = 0; m < M; m++)
            for (int r = 0; r < nr; r++)
                gv_f32_one(x + m * xs, wt + (int64_t)r * K, bt ? bt + r : 0, yt + m * ys + r, K);
        return;
    }
    for (int m = 0; m < M; m++) gv_f32_row(x + m * xs, wt, bt, yt + m * ys, K);
}

static inline void gv_tile_bf16(const float *xp, int M, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                                int64_t ys, int64_t n0, int nr, int K) {
    const uint16_t *wt = w + n0 * K, *bt = bias ? bias + n0 : 0;
    uint16_t *yt = y + n0;
    if (nr < GV_NR) {
        for (int m = 0; m < M; m++)
            for (int r = 0; r < nr; r++)
                gv_bf16_one(xp + (int64_t)m * K, wt + (int64_t)r * K, bt ? bt + r : 0, yt + m * ys + r, ys, K);
        return;
    }
    int m = 0;
    for (; m + 2 <= M; m += 2)
        for (int r = 0; r < GV_NR; r += GV_NB2)
            gv_bf16_pair(xp + (int64_t)m * K, wt + (int64_t)r * K, bt ? bt + r : 0, yt + m * ys + r, ys, K);
    if (m < M) gv_bf16_row(xp + (int64_t)m * K, wt, bt, yt + m * ys, ys, K);
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

/* bfloat16 rows are widened into scratch, GV_PANEL rows at a time (at most GV_PANEL x K floats,
   1 MiB for K = 1024), each panel then run through every tile; returns -1 when that scratch
   cannot be allocated (y is then not written), else 0. */
int linear_rows_bf16(const uint16_t *x, int64_t xs, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                      int64_t ys, int M, int N, int K, int nthreads) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)(M < GV_PANEL ? M : GV_PANEL) * (size_t)K);
    if (!xp) return -1;
    const int kv = K - K % (2 * GV_LANES);
    for (int p = 0; p < M; p += GV_PANEL) {
        const int pm = M - p < GV_PANEL ? M - p : GV_PANEL;
        for (int m = 0; m < pm; m++) {
            const uint16_t *xm = x + (int64_t)(p + m) * xs;
            float *dst = xp + (int64_t)m * K;
            for (int k = 0; k < kv; k += 2 * GV_LANES)
                for (int j = 0; j < GV_LANES; j++) {
                    dst[k + j] = bf16_ld(xm, k + 2 * j);
                    dst[k + GV_LANES + j] = bf16_ld(xm, k + 2 * j + 1);
                }
            for (int k = kv; k < K; k++) dst[k] = bf16_ld(xm, k);
        }
        uint16_t *yp = y + (int64_t)p * ys;
        GV_TILES(gv_tile_bf16(xp, pm, w, bias, yp, ys, n0, nr, K))
    }
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


def linear(lib, x, weight, bias, num_threads: int, max_rows: int | None = None):
    """``x @ weight.T + bias`` through the kernel, or None when it does not serve these tensors.

    ``x`` ``[..., K]`` with at most ``max_rows`` rows (default :data:`MAX_ROWS`; 0: no limit),
    ``weight`` a contiguous ``[N, K]`` of ``x``'s dtype (float32 or bfloat16), ``bias`` ``[N]``
    or None."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k) if x.dim() != 2 else x
    m = x2.shape[0]
    limit = MAX_ROWS if max_rows is None else max_rows
    if (limit and m > limit) or x2.stride(-1) != 1 or x.dtype != weight.dtype or not weight.is_contiguous():
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
        raise MemoryError(f"no memory for the {min(m, PANEL_ROWS)} x {k} float32 scratch of a bfloat16 linear")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
