"""A C kernel for float32 and bfloat16 linears on weights packed once at load into K-major tiles.

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
contiguously. bfloat16 tiles hold pairs of consecutive inputs per 32-bit word (the layout
``vdpbf16ps`` reads), so a step is one broadcast word per row and, with AVX512-BF16, one
instruction per pair of products and 16 outputs; without it a shift and a mask widen the pair
for two float32 FMAs. Accumulation is float32 and the output is rounded once, as ``F.linear``.

Measured on the 2-core development box (Zen 4, AVX-512 with BF16; llama20m's 33 decode linears,
92 MB of float32 weights, best of 5, one process): float32 M = 1 / 8 / 16 / 32 / 64 / 256 rows in
2.2-2.8 / 2.9 / 4.9 / 8.9 / 15.9 / 59 ms against oneDNN's (packed weights) 4.3-4.9 / 4.5-5.9 /
5.7 / 9.0 / 15.8 / 55 ms and the row kernel's 3.6-4.5 / 6.1-6.4 / 8.8 / 14.1 / 25.5 / 92 ms;
bfloat16 1.3 / 1.5 / 2.3 / 4.0 / 7.5 / 30 ms against oneDNN's 2.0 / 2.2 / 2.9 / 4.5 / 7.8 / 29
and the row kernel's 2.0 / 4.2 / 6.6 / 11.4 / 22.6 / 87. Ahead of both up to 32 rows, level at
64 and 256, so where oneDNN has kernels for the dtype, linears with more than
:data:`MAX_ROWS` rows keep it.
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
/* rows whose accumulator panel lives on the thread's stack (8 KiB with AVX-512): decode calls allocate nothing */
#define TL_SMALL 64
typedef float tl_vf __attribute__((vector_size(TL_L * 4)));
typedef uint32_t tl_vu __attribute__((vector_size(TL_L * 4)));
typedef uint32_t tl_u32u __attribute__((aligned(2), may_alias));

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

/* bfloat16: tiles of pairs. tiles16[t, k2, j] is a 32-bit word holding w[t * NR + j, 2 k2] (low half) and
   w[t * NR + j, 2 k2 + 1] (high half), the odd K's last high half zero; each input row is read as pairs too,
   so a step takes one broadcast word per row. With AVX512-BF16 one vdpbf16ps does a pair's two products
   for 16 outputs; otherwise a shift and a mask widen the pair and two float32 FMAs do them. Accumulation
   is float32, the bias is added in float32 and the output is rounded to nearest even once. */
void tiles_pack_bf16(const uint16_t *w, uint32_t *tiles, int N, int K) {
    const int nt = (N + TL_NR - 1) / TL_NR, K2 = (K + 1) / 2;
    for (int t = 0; t < nt; t++)
        for (int k2 = 0; k2 < K2; k2++)
            for (int j = 0; j < TL_NR; j++) {
                const int n = t * TL_NR + j;
                uint32_t lo = 0, hi = 0;
                if (n < N) {
                    lo = w[(int64_t)n * K + 2 * k2];
                    hi = 2 * k2 + 1 < K ? w[(int64_t)n * K + 2 * k2 + 1] : 0;
                }
                tiles[((int64_t)t * K2 + k2) * TL_NR + j] = lo | hi << 16;
            }
}

/* the pair (x[2 k2], x[2 k2 + 1]) of a row as one word; the odd K's last one with a zero high half */
static inline uint32_t tl_pair(const uint16_t *x, int k2, int K) {
    return 2 * k2 + 1 < K ? *(const tl_u32u *)(x + 2 * k2) : (uint32_t)x[2 * k2];
}

#if defined(__AVX512BF16__) && TL_L == 16
#include <immintrin.h>
#define TL_DOT(a, xw, w) a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_set1_epi32((int)(xw)), (__m512bh)(w))
#else
#define TL_DOT(a, xw, w) do {                                                                     \
        union { uint32_t u; float f; } lo_, hi_;                                                \
        lo_.u = (xw) << 16; hi_.u = (xw) & 0xffff0000u;                                         \
        a += (tl_vf)((w) << 16) * lo_.f + (tl_vf)((w) & 0xffff0000u) * hi_.f;                   \
    } while (0)
#endif

/* The two vectors of one tile row (input k, or pair k in bfloat16). */
#define TL_W(TV, k) const TV w0 = *(const TV *)(wt + (int64_t)(k) * TL_NR), w1 = *(const TV *)(wt + (int64_t)(k) * TL_NR + TL_L)

/* NAME_MR: MR rows x NR outputs over tile rows [k0, k1) (inputs in float32, pairs in bfloat16), the
   partial sums kept in acc (NR floats a row) between K blocks; BODY() runs the tile rows. */
#define TL_MICRO(NAME, TX, MR, BODY)                                                                          \
static inline void NAME##_##MR(const TX *x, int64_t xs, const void *wtv, int k0, int k1, int K, float *acc,  \
                               int first) {                                                                   \
    const int Mr = MR;                                                                                        \
    tl_vf a0[MR], a1[MR];                                                                                     \
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {                                                  \
        a0[m] = first ? (tl_vf){0} : *(const tl_vf *)(acc + m * TL_NR);                                      \
        a1[m] = first ? (tl_vf){0} : *(const tl_vf *)(acc + m * TL_NR + TL_L);                               \
    }                                                                                                         \
    BODY()                                                                                                    \
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; m++) {                                                  \
        *(tl_vf *)(acc + m * TL_NR) = a0[m];                                                                  \
        *(tl_vf *)(acc + m * TL_NR + TL_L) = a1[m];                                                           \
    }                                                                                                         \
    (void)Mr, (void)K;                                                                                        \
}

#define TL_F32_BODY()                                                                                         \
    const float *wt = (const float *)wtv;                                                                     \
    for (int k = k0; k < k1; k++) {                                                                           \
        TL_W(tl_vf, k);                                                                                       \
        _Pragma("GCC unroll 16") for (int m = 0; m < Mr; m++) {                                              \
            const tl_vf xb = (tl_vf){0} + x[m * xs + k];                                                      \
            a0[m] += xb * w0;                                                                                 \
            a1[m] += xb * w1;                                                                                 \
        }                                                                                                     \
    }

#define TL_BF16_BODY()                                                                                        \
    const uint32_t *wt = (const uint32_t *)wtv;                                                               \
    const int full = 2 * k1 <= K ? k1 : k1 - 1;  /* the odd K's last pair is half */                          \
    for (int k2 = k0; k2 < full; k2++) {                                                                      \
        TL_W(tl_vu, k2);                                                                                      \
        _Pragma("GCC unroll 16") for (int m = 0; m < Mr; m++) {                                              \
            const uint32_t xw = *(const tl_u32u *)(x + m * xs + 2 * k2);                                      \
            TL_DOT(a0[m], xw, w0);                                                                            \
            TL_DOT(a1[m], xw, w1);                                                                            \
        }                                                                                                     \
    }                                                                                                         \
    if (full < k1) {                                                                                          \
        TL_W(tl_vu, full);                                                                                    \
        for (int m = 0; m < Mr; m++) {                                                                        \
            const uint32_t xw = tl_pair(x + m * xs, full, K);                                                 \
            TL_DOT(a0[m], xw, w0);                                                                            \
            TL_DOT(a1[m], xw, w1);                                                                            \
        }                                                                                                     \
    }

/* Every register block up to TL_MR rows, and NAME(mr, ...) picking one by the rows left. */
#if TL_MR > 6
#define TL_CASES_MORE(NAME) case 7: NAME##_7(x, xs, wt, k0, k1, K, acc, first); break; \
                            case 8: NAME##_8(x, xs, wt, k0, k1, K, acc, first); break;
#else
#define TL_CASES_MORE(NAME)
#endif
#define TL_MICROS(NAME, TX, BODY)                                                                             \
    TL_MICRO(NAME, TX, 1, BODY) TL_MICRO(NAME, TX, 2, BODY) TL_MICRO(NAME, TX, 3, BODY)                       \
    TL_MICRO(NAME, TX, 4, BODY) TL_MICRO(NAME, TX, 5, BODY) TL_MICRO(NAME, TX, 6, BODY)                       \
    TL_MICROS_MORE(NAME, TX, BODY)                                                                            \
static inline void NAME(int mr, const TX *x, int64_t xs, const void *wt, int k0, int k1, int K, float *acc,   \
                        int first) {                                                                          \
    switch (mr) {                                                                                             \
    case 1: NAME##_1(x, xs, wt, k0, k1, K, acc, first); break;                                                \
    case 2: NAME##_2(x, xs, wt, k0, k1, K, acc, first); break;                                                \
    case 3: NAME##_3(x, xs, wt, k0, k1, K, acc, first); break;                                                \
    case 4: NAME##_4(x, xs, wt, k0, k1, K, acc, first); break;                                                \
    case 5: NAME##_5(x, xs, wt, k0, k1, K, acc, first); break;                                                \
    case 6: NAME##_6(x, xs, wt, k0, k1, K, acc, first); break;                                                \
    TL_CASES_MORE(NAME)                                                                                       \
    }                                                                                                         \
}
#if TL_MR > 6
#define TL_MICROS_MORE(NAME, TX, BODY) TL_MICRO(NAME, TX, 7, BODY) TL_MICRO(NAME, TX, 8, BODY)
#else
#define TL_MICROS_MORE(NAME, TX, BODY)
#endif
TL_MICROS(tl_micro_f32, float, TL_F32_BODY)
TL_MICROS(tl_micro_bf16, uint16_t, TL_BF16_BODY)

/* NAME: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) with w packed by tiles_pack_SUF, KD tile rows per tile.
   Each thread takes whole tiles; per tile, K blocks of TL_KC tile rows (outer) so that the slab stays in L1
   across the row blocks (inner), then STORE(sum, bias index) writes each output. Returns -1 when a thread's
   accumulator panel (M x NR floats, on the heap above TL_SMALL rows) cannot be allocated (y is then
   partly written), else 0. */
#define TL_LINEAR(NAME, MICRO, TX, TW, TY, KD, STORE)                                                        \
int NAME(const TX *x, int64_t xs, const TW *tiles, const TY *bias, TY *y, int64_t ys, int M, int N, int K,   \
         int nthreads) {                                                                                      \
    const int nt = (N + TL_NR - 1) / TL_NR, kd = KD;                                                          \
    int failed = 0;                                                                                           \
    _Pragma("omp parallel num_threads(nthreads) if(nthreads > 1)")                                            \
    {                                                                                                         \
        float small[TL_SMALL * TL_NR] __attribute__((aligned(64)));                                           \
        float *acc = M <= TL_SMALL ? small : aligned_alloc(64, sizeof(float) * TL_NR * (size_t)M);           \
        if (!acc) {                                                                                           \
            _Pragma("omp atomic write")                                                                       \
            failed = 1;                                                                                       \
        }                                                                                                     \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int t = 0; t < nt; t++) {                                                                        \
            if (!acc) continue;                                                                               \
            const TW *wt = tiles + (int64_t)t * kd * TL_NR;                                                   \
            for (int k0 = 0; k0 < kd; k0 += TL_KC) {                                                          \
                const int k1 = kd - k0 < TL_KC ? kd : k0 + TL_KC;                                             \
                for (int m0 = 0; m0 < M; m0 += TL_MR)                                                         \
                    MICRO(M - m0 < TL_MR ? M - m0 : TL_MR, x + (int64_t)m0 * xs, xs, wt, k0, k1, K,           \
                          acc + (int64_t)m0 * TL_NR, k0 == 0);                                                \
            }                                                                                                 \
            const int n0 = t * TL_NR, nr = N - n0 < TL_NR ? N - n0 : TL_NR;                                   \
            for (int m = 0; m < M; m++) {                                                                     \
                TY *ym = y + (int64_t)m * ys + n0;                                                            \
                const float *am = acc + (int64_t)m * TL_NR;                                                   \
                for (int j = 0; j < nr; j++) ym[j] = STORE(am[j], n0 + j);                                    \
            }                                                                                                 \
        }                                                                                                     \
        if (acc != small) free(acc);                                                                          \
    }                                                                                                         \
    return failed ? -1 : 0;                                                                                   \
}
#define TL_STORE_F32(v, n) (bias ? (v) + bias[n] : (v))
#define TL_STORE_BF16(v, n) bf16_round(bias ? (v) + bf16_ld(bias, n) : (v))
TL_LINEAR(linear_tiles_f32, tl_micro_f32, float, float, float, K, TL_STORE_F32)
TL_LINEAR(linear_tiles_bf16, tl_micro_bf16, uint16_t, uint32_t, uint16_t, (K + 1) / 2, TL_STORE_BF16)
"""

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_LINEAR = [_P, _I64, _P, _P, _P, _I64, _I32, _I32, _I32, _I32]
#: C function name -> ctypes argument types (set on the library by :func:`tokenmill_cpu.native.load`).
SIGNATURES = {"tiles_nr": [], "tiles_pack_f32": [_P, _P, _I32, _I32], "tiles_pack_bf16": [_P, _P, _I32, _I32],
              "linear_tiles_f32": _LINEAR, "linear_tiles_bf16": _LINEAR}
RESTYPES = {"tiles_nr": _I32, "linear_tiles_f32": _I32, "linear_tiles_bf16": _I32}
#: weight dtype -> (C packer, C kernel, dtype of the tiles, inputs per tile row)
_KINDS = {torch.float32: ("tiles_pack_f32", "linear_tiles_f32", torch.float32, 1),
          torch.bfloat16: ("tiles_pack_bf16", "linear_tiles_bf16", torch.int32, 2)}


def supports(dtype) -> bool:
    """Whether the kernel serves weights and rows of ``dtype``."""
    return dtype in _KINDS


def pack(lib, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (float32 or bfloat16 ``[N, K]``) repacked into tiles ``[ceil(N / NR), K, NR]`` (float32)
    or ``[ceil(N / NR), ceil(K / 2), NR]`` words of bfloat16 pairs."""
    if weight.dtype not in _KINDS or weight.dim() != 2:
        raise ValueError(f"tiles are packed from a 2-D float32 or bfloat16 weight, not {weight.dtype} "
                         f"{tuple(weight.shape)}")
    packer, _, dtype, per = _KINDS[weight.dtype]
    w = weight.detach().contiguous()
    n, k = w.shape
    nr = lib.tiles_nr()
    tiles = torch.empty(((n + nr - 1) // nr, -(-k // per), nr), dtype=dtype)
    getattr(lib, packer)(w.data_ptr(), tiles.data_ptr(), n, k)
    return tiles


def linear(lib, x, tiles, n: int, bias, num_threads: int, max_rows: int | None = None):
    """``x @ weight.T + bias`` on ``tiles`` (from :func:`pack` of a weight of ``x``'s dtype, ``n``
    output features), or None when the kernel does not serve these tensors (more than ``max_rows``
    rows, default :data:`MAX_ROWS`, 0: no limit; another dtype; columns strided)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k) if x.dim() != 2 else x
    m = x2.shape[0]
    limit = MAX_ROWS if max_rows is None else max_rows
    kind = _KINDS.get(x.dtype)
    if (limit and m > limit) or kind is None or x2.stride(-1) != 1 or tiles.dtype != kind[2] \
            or tiles.shape[1] != -(-k // kind[3]):
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return None
    y = torch.empty((m, n), dtype=x.dtype)
    if m and getattr(lib, kind[1])(x2.data_ptr(), x2.stride(0), tiles.data_ptr(),
                                   None if bias is None else bias.data_ptr(), y.data_ptr(), n, m, n, k, num_threads):
        raise MemoryError(f"no memory for a {m}-row accumulator panel of a tiled linear")
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
