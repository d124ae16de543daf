"""A C kernel for float32 linears on weights packed once at load into K-major tiles of output features.

The row kernel (:mod:`tokenmill_cpu.native_linear`) dots each input row with eight weight rows:
every FMA needs a weight load, so it is load-bound and, on AVX-512 CPUs, slower than oneDNN
from four rows up. Here the weight ``[N, K]`` is repacked at load into tiles of ``NR`` output
features (two vector registers: 32 with AVX-512, 16 with AVX2), each stored K-major
(``tiles[t, k, j] = w[t * NR + j, k]``, the last tile zero-padded). A register block of
``MR`` rows x ``NR`` outputs (8 x 32 with AVX-512, 6 x 16 with AVX2: the accumulators fill
the vector registers) then takes, per k, two weight loads and ``MR`` broadcasts of the
inputs for ``2 * MR`` FMAs, the classic outer-product GEMM micro-kernel; K runs in blocks of
:data:`KC` so that a tile's weight slab stays in L1 while every block of rows uses it, and
the tiles are spread over the OpenMP threads. At one row this still reads each weight once,
contiguously.

Measured on the 2-core development box (Zen 4, AVX-512; llama20m's 33 decode linears, 92 MB of
float32 weights, best of 5, one process): M = 1 / 8 / 16 / 32 / 64 / 256 rows in 2.2-2.8 / 2.9 /
4.9 / 8.9 / 15.9 / 59 ms against oneDNN's (packed weights) 4.3-4.9 / 4.5-5.9 / 5.7 / 9.0 /
15.8 / 55 ms and the row kernel's 3.6-4.5 / 6.1-6.4 / 8.8 / 14.1 / 25.5 / 92 ms: ahead of both
up to 32 rows, level at 64, 7% behind oneDNN at 256, so linears with more than
:data:`MAX_ROWS` rows keep oneDNN.
"""
from __future__ import annotations

import ctypes

import torch

#: Most rows a call takes; more go to oneDNN, which is level at 64 and ahead beyond.
MAX_ROWS = 64

#: Depth of a K block (the slab of a tile that stays in L1 while every row block uses it).
KC = 256

SOURCE = f"#define TL_KC {KC}\n" + r"""
#ifdef __AVX512F__
#define TL_L 16
#define TL_MR 8
#else
#define TL_L 8
#define TL_MR 6
#endif
#define TL_NR (2 * TL_L)
typedef float tl_vf __attribute__((vector_size(TL_L * 4)));
typedef float tl_vfu __attribute__((vector_size(TL_L * 4), aligned(4)));

int tiles_nr(void) { return TL_NR; }

/* tiles[t, k, j] = w[t * NR + j, k]; zero where t * NR + j >= N. */
void tiles_pack_f32(const float *w, float *tiles, int N, int K) {
    const int nt = (N + TL_NR - 1) / TL_NR;
    for (int t = 0; t < nt; t++)
        for (int k = 0; k < K; k++)
            for (int j = 0; j < TL_NR; j++) {
                const int n = t * TL_NR + j;
                tiles[((int64_t)t * K + k) * TL_NR + j] = n < N ? w[(int64_t)n * K + k] : 0.0f;
            }
}

/* MR rows x NR outputs over kc inputs; the partial sums live in acc (NR floats a row) between K blocks. */
#define TL_MICRO(MR)                                                                                          \
static inline void tl_micro_##MR(const float *x, int64_t xs, const float *wt, int kc, float *acc, int first) { \
    tl_vf a0[MR], a1[MR];                                                                                     \
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {                                                  \
        a0[m] = first ? (tl_vf){0} : *(const tl_vf *)(acc + m * TL_NR);                                      \
        a1[m] = first ? (tl_vf){0} : *(const tl_vf *)(acc + m * TL_NR + TL_L);                               \
    }                                                                                                         \
    for (int k = 0; k < kc; k++) {                                                                            \
        const tl_vf w0 = *(const tl_vf *)(wt + (int64_t)k * TL_NR), w1 = *(const tl_vf *)(wt + (int64_t)k * TL_NR + TL_L); \
        _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {                                              \
            const tl_vf xb = (tl_vf){0} + x[m * xs + k];                                                      \
            a0[m] += xb * w0;                                                                                 \
            a1[m] += xb * w1;                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {                                                  \
        *(tl_vf *)(acc + m * TL_NR) = a0[m];                                                                  \
        *(tl_vf *)(acc + m * TL_NR + TL_L) = a1[m];                                                           \
    }                                                                                                         \
}
TL_MICRO(1) TL_MICRO(2) TL_MICRO(3) TL_MICRO(4) TL_MICRO(5) TL_MICRO(6)
#if TL_MR > 6
TL_MICRO(7) TL_MICRO(8)
#endif

static inline void tl_micro(int mr, const float *x, int64_t xs, const float *wt, int kc, float *acc, int first) {
    switch (mr) {
    case 1: tl_micro_1(x, xs, wt, kc, acc, first); break;
    case 2: tl_micro_2(x, xs, wt, kc, acc, first); break;
    case 3: tl_micro_3(x, xs, wt, kc, acc, first); break;
    case 4: tl_micro_4(x, xs, wt, kc, acc, first); break;
    case 5: tl_micro_5(x, xs, wt, kc, acc, first); break;
    case 6: tl_micro_6(x, xs, wt, kc, acc, first); break;
#if TL_MR > 6
    case 7: tl_micro_7(x, xs, wt, kc, acc, first); break;
    case 8: tl_micro_8(x, xs, wt, kc, acc, first); break;
#endif
    }
}

/* y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) with w packed by tiles_pack_f32. Returns -1 when a
   thread's accumulator panel (M x NR floats) cannot be allocated (y is then partly written), else 0. */
int linear_tiles_f32(const float *x, int64_t xs, const float *tiles, const float *bias, float *y, int64_t ys,
                     int M, int N, int K, int nthreads) {
    const int nt = (N + TL_NR - 1) / TL_NR;
    int failed = 0;
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")
    {
        float *acc = aligned_alloc(64, sizeof(float) * TL_NR * (size_t)((M + 1) & ~1));
        if (!acc) {
            _Pragma("omp atomic write")
            failed = 1;
        }
        _Pragma("omp for schedule(static)")
        for (int t = 0; t < nt; t++) {
            if (!acc) continue;
            const float *wt = tiles + (int64_t)t * K * TL_NR;
            for (int k0 = 0; k0 < K; k0 += TL_KC) {
                const int kc = K - k0 < TL_KC ? K - k0 : TL_KC;
                for (int m0 = 0; m0 < M; m0 += TL_MR)
                    tl_micro(M - m0 < TL_MR ? M - m0 : TL_MR, x + (int64_t)m0 * xs + k0, xs, wt + (int64_t)k0 * TL_NR,
                             kc, acc + (int64_t)m0 * TL_NR, k0 == 0);
            }
            const int n0 = t * TL_NR, nr = N - n0 < TL_NR ? N - n0 : TL_NR;
            for (int m = 0; m < M; m++) {
                float *ym = y + (int64_t)m * ys + n0;
                const float *am = acc + (int64_t)m * TL_NR;
                if (bias) for (int j = 0; j < nr; j++) ym[j] = am[j] + bias[n0 + j];
                else memcpy(ym, am, sizeof(float) * (size_t)nr);
            }
        }
        free(acc);
    }
    return failed ? -1 : 0;
}
"""

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: C function name -> ctypes argument types (set on the library by :func:`tokenmill_cpu.native.load`).
SIGNATURES = {"tiles_nr": [], "tiles_pack_f32": [_P, _P, _I32, _I32],
              "linear_tiles_f32": [_P, _I64, _P, _P, _P, _I64, _I32, _I32, _I32, _I32]}
RESTYPES = {"tiles_nr": _I32, "linear_tiles_f32": _I32}


def pack(lib, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (contiguous float32 ``[N, K]``) repacked into tiles ``[ceil(N / NR), K, NR]``."""
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise ValueError(f"tiles are packed from a 2-D float32 weight, not {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().contiguous()
    n, k = w.shape
    nr = lib.tiles_nr()
    tiles = torch.empty(((n + nr - 1) // nr, k, nr), dtype=torch.float32)
    lib.tiles_pack_f32(w.data_ptr(), tiles.data_ptr(), n, k)
    return tiles


def linear(lib, x, tiles, n: int, bias, num_threads: int, max_rows: int | None = None):
    """``x @ weight.T + bias`` on ``tiles`` (from :func:`pack`, ``n`` output features), or None
    when the kernel does not serve these tensors (more than ``max_rows`` rows, default
    :data:`MAX_ROWS`, 0: no limit; not float32; columns strided)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k) if x.dim() != 2 else x
    m = x2.shape[0]
    limit = MAX_ROWS if max_rows is None else max_rows
    if (limit and m > limit) or x.dtype != torch.float32 or x2.stride(-1) != 1 or tiles.shape[1] != k:
        return None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    y = torch.empty((m, n), dtype=torch.float32)
    if m and lib.linear_tiles_f32(x2.data_ptr(), x2.stride(0), tiles.data_ptr(),
                                  None if bias is None else bias.data_ptr(), y.data_ptr(), n, m, n, k, num_threads):
        raise MemoryError(f"no memory for a {m}-row accumulator panel of a tiled linear")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
