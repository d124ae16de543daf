"""Decode attention over the paged KV cache, in C: the kernel's source and its Python entry.

Decode attention is memory bound: every step reads each sequence's whole K/V context.
Torch can only get there through a gather (copy the pages into a padded batch, then
SDPA), which moves the context through memory three times. This kernel reads each page
once, in place: one OpenMP task per sequence (per sequence and KV head when there are
few) streams its pages, computes the scores of every query head, a softmax, and the
weighted sum of values, in float32. Compiled and loaded with the plugin's other kernels
by :mod:`tokenmill_cpu.native`.
"""
from __future__ import annotations

import ctypes

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Decode attention. For each decode sequence s (its query row q_rows[s]):
   context length L = seq_lens[s]; keys 0..L-1 live in pages block_tables[s*bt_stride + i],
   token t at page t / bs, offset t % bs. Cache layout [num_blocks, bs, Hk, D], contiguous.
   q, the cache and out are all float32 or all bfloat16 (read in place, widened to float32,
   out rounded back); q and out: rows of H*D with row strides q_stride / out_stride; head h reads KV head h / G. window > 0 keeps only
   the last `window` keys. Per task: scores of the query heads (pass over K), softmax,
   weighted sum of values (pass over V), in float32. */

static inline __attribute__((always_inline)) float kv_at(const void *base, int64_t i, const int bf16) {
    if (bf16) {
        union { uint32_t u; float f; } c;
        c.u = (uint32_t)((const uint16_t *)base)[i] << 16;
        return c.f;
    }
    return ((const float *)base)[i];
}

static inline uint16_t attn_bf16_round(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

static inline __attribute__((always_inline)) void head_scores(const float *qs, const void *kc, int64_t off,
                                                              float *sc, int G, int D, int n, int idx, float scale,
                                                              const int bf16) {
    for (int g = 0; g < G; g++) {
        const float *qg = qs + (int64_t)g * D;
        float dot = 0.0f;
        #pragma omp simd reduction(+:dot)
        for (int d = 0; d < D; d++) dot += qg[d] * kv_at(kc, off + d, bf16);
        sc[(int64_t)g * n + idx] = dot * scale;
    }
}

/* One task: sequence s = task / split, KV heads h0 .. h0 + Hk / split. Inlined into each exported
   function's own parallel loop with bf16 a constant, so each KV dtype gets its own vector code. */
static inline __attribute__((always_inline)) void decode_task(
        int task, int split, const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
        const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
        const int64_t *q_rows, void *out, int64_t out_stride,
        int H, int Hk, int D, int bs, float scale, int window, const int bf16, const int qbf16) {
    const int G = H / Hk;
    const int64_t tok_stride = (int64_t)Hk * D;
    const int64_t blk_stride = (int64_t)bs * tok_stride;
    const int heads_per_task = Hk / split;
    {
        const int s = task / split, h0 = (task % split) * heads_per_task;
        const int L = seq_lens[s];
        const int start = (window > 0 && L > window) ? L - window : 0;
        const int n = L - start;
        if (n <= 0) return;
        const int nh = heads_per_task;
        const int64_t q_off = q_rows[s] * q_stride + (int64_t)h0 * G * D;
        const int64_t o_off = q_rows[s] * out_stride + (int64_t)h0 * G * D;
        const int qn = nh * G * D;
        float *qbuf = qbf16 ? (float *)malloc(sizeof(float) * (size_t)qn) : NULL;
        if (qbf16)
            for (int i = 0; i < qn; i++) qbuf[i] = kv_at(q, q_off + i, 1);
        const float *qs = qbf16 ? qbuf : (const float *)q + q_off;
        float *scores = (float *)malloc(sizeof(float) * (size_t)nh * G * (size_t)n);
        float *acc = (float *)calloc((size_t)nh * G * (size_t)D, sizeof(float));
        const int32_t *table = block_tables + (int64_t)s * bt_stride;
        const int gn = G * n;
        for (int b = start / bs, t0 = b * bs; t0 < L; b++, t0 += bs) {
            const int64_t page = (int64_t)table[b] * blk_stride + (int64_t)h0 * D;
            const int lo = t0 < start ? start - t0 : 0, hi = L - t0 < bs ? L - t0 : bs;
            for (int o = lo; o < hi; o++) {
                const int64_t kp = page + o * tok_stride;
                for (int h = 0; h < nh; h++)
                    head_scores(qs + (int64_t)h * G * D, k_cache, kp + (int64_t)h * D, scores + (int64_t)h * gn,
                                G, D, n, t0 + o - start, scale, bf16);
            }
        }
        for (int r = 0; r < nh * G; r++) {
            float *sc = scores + (int64_t)r * n;
            float m = -INFINITY;
            for (int i = 0; i < n; i++) m = sc[i] > m ? sc[i] : m;
            float sum = 0.0f;
            #pragma omp simd reduction(+:sum)
            for (int i = 0; i < n; i++) { sc[i] = expf(sc[i] - m); sum += sc[i]; }
            const float inv = 1.0f / sum;
            #pragma omp simd
            for (int i = 0; i < n; i++) sc[i] *= inv;
        }
        for (int b = start / bs, t0 = b * bs; t0 < L; b++, t0 += bs) {
            const int64_t page = (int64_t)table[b] * blk_stride + (int64_t)h0 * D;
            const int lo = t0 < start ? start - t0 : 0, hi = L - t0 < bs ? L - t0 : bs;
            for (int o = lo; o < hi; o++) {
                const int64_t vp0 = page + o * tok_stride;
                const int idx = t0 + o - start;
                for (int h = 0; h < nh; h++) {
                    const int64_t vp = vp0 + (int64_t)h * D;
                    for (int g = 0; g < G; g++) {
                        const float w = scores[(int64_t)(h * G + g) * n + idx];
                        float *ag = acc + (int64_t)(h * G + g) * D;
                        #pragma omp simd
                        for (int d = 0; d < D; d++) ag[d] += w * kv_at(v_cache, vp + d, bf16);
                    }
                }
            }
        }
        if (qbf16) {
            uint16_t *os = (uint16_t *)out + o_off;
            for (int i = 0; i < qn; i++) os[i] = attn_bf16_round(acc[i]);
            free(qbuf);
        } else {
            memcpy((float *)out + o_off, acc, sizeof(float) * (size_t)qn);
        }
        free(scores);
        free(acc);
    }
}

/* The same task with vectors (AVX-512: 16 lanes, AVX2 with FMA: 8) for head sizes that are a multiple
   of the lane count and groups of 1, 2, 4 or 8 query heads per KV head (the generic loops above reduce
   one dot product at a time, element by element, and at decode's short contexts that costs more than
   the memory they read). Each key row is loaded a vector at a time once for the G query heads of its
   group; the softmax runs vectorised (exp: Cephes' single-precision polynomial, ~1 ulp). Results equal
   the generic path's up to float32 summation order. The V* macros are the one ISA's vector ops. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __attribute__((always_inline)) __m512 ld16(const void *base, int64_t i, const int bf16) {
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + i);
}

/* bfloat16 bits of 16 floats in the low halves of 32-bit lanes: round to nearest even, NaN stays NaN */
static inline __attribute__((always_inline)) __m512i bf16_bits16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}

static inline __attribute__((always_inline)) void st16_bf16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(bf16_bits16(v)));
}

/* v rounded to bfloat16 and widened back */
static inline __attribute__((always_inline)) __m512 rnd16_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v), 16));
}

static inline __m512 exp512(__m512 x) {  /* overflows to +inf past 88.7 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static void softmax512(float *sc, int n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sc + i));
    const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1u);
    if (i < n) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, sc + i));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + i), mx));
        _mm512_storeu_ps(sc + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (i < n) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + i), mx));
        _mm512_mask_storeu_ps(sc + i, tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(sc + i, _mm512_mul_ps(_mm512_loadu_ps(sc + i), inv));
    if (i < n) _mm512_mask_storeu_ps(sc + i, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, sc + i), inv));
}


typedef __m512 vecf;
#define VL 16
#define VLD(base, i, bf16) ld16((base), (i), (bf16))
#define VLDU(p) _mm512_loadu_ps(p)
#define VSTU(p, v) _mm512_storeu_ps((p), (v))
#define VZERO() _mm512_setzero_ps()
#define VSET1(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VHSUM(v) _mm512_reduce_add_ps(v)
#define VSOFTMAX(p, n) softmax512((p), (n))
#define VEXP(x) exp512(x)
#define VADD(a, b) _mm512_add_ps((a), (b))
#define VSUB(a, b) _mm512_sub_ps((a), (b))
#define VMUL(a, b) _mm512_mul_ps((a), (b))
#define VDIV(a, b) _mm512_div_ps((a), (b))
#define VRND_BF16(v) rnd16_bf16(v)
#define VST_BF16(p, v) st16_bf16((p), (v))
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __attribute__((always_inline)) __m256 ld8(const void *base, int64_t i, const int bf16) {
    if (bf16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)base + i);
}

/* bfloat16 bits of 8 floats in the low halves of 32-bit lanes: round to nearest even, NaN stays NaN */
static inline __attribute__((always_inline)) __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}

static inline __attribute__((always_inline)) void st8_bf16(uint16_t *p, __m256 v) {
    const __m256i b = bf16_bits8(v);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

/* v rounded to bfloat16 and widened back */
static inline __attribute__((always_inline)) __m256 rnd8_bf16(__m256 v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m256 exp256(__m256 x) {  /* saturates at exp(88.3) instead of overflowing */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n built in the exponent field: n lies in [-126, 127] after the clamps */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static void softmax256(float *sc, int n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(sc + i));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (int j = i; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + i), vmx));
        _mm256_storeu_ps(sc + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (int j = i; j < n; j++) { sc[j] = expf(sc[j] - mx); total += sc[j]; }
    const float inv = 1.0f / total;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(sc + i, _mm256_mul_ps(_mm256_loadu_ps(sc + i), vinv));
    for (int j = i; j < n; j++) sc[j] *= inv;
}

typedef __m256 vecf;
#define VL 8
#define VLD(base, i, bf16) ld8((base), (i), (bf16))
#define VLDU(p) _mm256_loadu_ps(p)
#define VSTU(p, v) _mm256_storeu_ps((p), (v))
#define VZERO() _mm256_setzero_ps()
#define VSET1(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VHSUM(v) hsum8(v)
#define VSOFTMAX(p, n) softmax256((p), (n))
#define VEXP(x) exp256(x)
#define VADD(a, b) _mm256_add_ps((a), (b))
#define VSUB(a, b) _mm256_sub_ps((a), (b))
#define VMUL(a, b) _mm256_mul_ps((a), (b))
#define VDIV(a, b) _mm256_div_ps((a), (b))
#define VRND_BF16(v) rnd8_bf16(v)
#define VST_BF16(p, v) st8_bf16((p), (v))
#endif

#ifdef VL
static inline __attribute__((always_inline)) void decode_task_vec(
        int task, int split, const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
        const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
        const int64_t *q_rows, void *out, int64_t out_stride,
        int H, int Hk, int D, int bs, float scale, int window, const int bf16, const int G) {
    const int64_t tok_stride = (int64_t)Hk * D;
    const int64_t blk_stride = (int64_t)bs * tok_stride;
    const int nh = Hk / split;
    const int s = task / split, h0 = (task % split) * nh;
    const int L = seq_lens[s];
    const int start = (window > 0 && L > window) ? L - window : 0;
    const int n = L - start;
    if (n <= 0) return;
    const int64_t q_off = q_rows[s] * q_stride + (int64_t)h0 * G * D;
    const int64_t o_off = q_rows[s] * out_stride + (int64_t)h0 * G * D;
    const int qn = nh * G * D;
    float *qbuf = bf16 ? (float *)malloc(sizeof(float) * (size_t)qn) : NULL;
    if (bf16)
        for (int i = 0; i < qn; i += VL) VSTU(qbuf + i, VLD(q, q_off + i, 1));
    const float *qs = bf16 ? qbuf : (const float *)q + q_off;
    float *scores = (float *)malloc(sizeof(float) * (size_t)nh * G * (size_t)n);
    int64_t *rows = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);  /* cache offset of each key, head 0 */
    const int32_t *table = block_tables + (int64_t)s * bt_stride;
    for (int i = 0; i < n; i++) {
        const int t = start + i;
        rows[i] = (int64_t)table[t / bs] * blk_stride + (int64_t)(t % bs) * tok_stride;
    }
    /* Keys outer, heads inner: each key row (all heads of the task) is read once, front to back, so the
       pages stream from memory in order; a head-outer order re-walks them once per head at a stride,
       which at decode (a step's cache is not in the CPU caches) costs several times the arithmetic. */
    const int rowsn = nh * G;
    for (int i = 0; i < n; i++) {
        for (int h = 0; h < nh; h++) {
            const float *qh = qs + (int64_t)h * G * D;
            const int64_t kp = rows[i] + (int64_t)(h0 + h) * D;
            vecf acc[8];
            for (int g = 0; g < G; g++) acc[g] = VZERO();
            for (int c = 0; c < D; c += VL) {
                const vecf kc = VLD(k_cache, kp + c, bf16);
                for (int g = 0; g < G; g++) acc[g] = VFMA(VLDU(qh + (int64_t)g * D + c), kc, acc[g]);
            }
            for (int g = 0; g < G; g++) scores[(int64_t)(h * G + g) * n + i] = VHSUM(acc[g]) * scale;
        }
    }
    for (int r = 0; r < rowsn; r++) VSOFTMAX(scores + (int64_t)r * n, n);
    float *acc = (float *)calloc((size_t)rowsn * (size_t)D, sizeof(float));
    for (int i = 0; i < n; i++) {
        for (int h = 0; h < nh; h++) {
            const int64_t vp = rows[i] + (int64_t)(h0 + h) * D;
            for (int c = 0; c < D; c += VL) {
                const vecf vc = VLD(v_cache, vp + c, bf16);
                for (int g = 0; g < G; g++) {
                    float *a = acc + (int64_t)(h * G + g) * D + c;
                    VSTU(a, VFMA(VSET1(scores[(int64_t)(h * G + g) * n + i]), vc, VLDU(a)));
                }
            }
        }
    }
    if (bf16)
        for (int j = 0; j < rowsn * D; j++) ((uint16_t *)out)[o_off + j] = attn_bf16_round(acc[j]);
    else
        memcpy((float *)out + o_off, acc, sizeof(float) * (size_t)rowsn * D);
    free(acc);
    free(rows);
    free(scores);
    free(qbuf);
}

#define TASK_VEC(BF16, GG) decode_task_vec(task, split, q, q_stride, k_cache, v_cache, block_tables, bt_stride, \
                                           seq_lens, q_rows, out, out_stride, H, Hk, D, bs, scale, window, BF16, GG)
#define DECODE_TASK(BF16, QBF16)                                                                       \
    if (D % VL == 0) {                                                                                 \
        switch (H / Hk) {                                                                              \
            case 1: TASK_VEC(BF16, 1); continue;                                                       \
            case 2: TASK_VEC(BF16, 2); continue;                                                       \
            case 4: TASK_VEC(BF16, 4); continue;                                                       \
            case 8: TASK_VEC(BF16, 8); continue;                                                       \
            default: break;                                                                            \
        }                                                                                              \
    }                                                                                                  \
    decode_task(task, split, q, q_stride, k_cache, v_cache, block_tables, bt_stride, seq_lens,         \
                q_rows, out, out_stride, H, Hk, D, bs, scale, window, BF16, QBF16);
#else
#define DECODE_TASK(BF16, QBF16)                                                                       \
    decode_task(task, split, q, q_stride, k_cache, v_cache, block_tables, bt_stride, seq_lens,         \
                q_rows, out, out_stride, H, Hk, D, bs, scale, window, BF16, QBF16);
#endif

/* few sequences: one task per (sequence, KV head); many: one per sequence, streaming whole rows */
#define DECODE_LOOP(BF16, QBF16)                                                                              \
    const int split = S < 4 * nthreads ? Hk : 1;                                                       \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                             \
    for (int task = 0; task < S * split; task++) {                                                     \
        DECODE_TASK(BF16, QBF16)                                                                       \
    }

void paged_decode_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                      const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
                      const int64_t *q_rows, float *out, int64_t out_stride,
                      int S, int H, int Hk, int D, int bs, float scale, int window, int nthreads) {
    DECODE_LOOP(0, 0)
}

/* All bfloat16: q, the cache and out (out rounded to nearest even), computed in float32. */
void paged_decode_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                       const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens,
                       const int64_t *q_rows, uint16_t *out, int64_t out_stride,
                       int S, int H, int Hk, int D, int bs, float scale, int window, int nthreads) {
    DECODE_LOOP(1, 1)
}
"""

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
#: C function name -> ctypes argument types (set on the library by :func:`tokenmill_cpu.native.load`).
SIGNATURES = {name: [_P, _I64, _P, _P, _P, _I64, _P, _P, _P, _I64, _I32, _I32, _I32, _I32, _I32, _F32, _I32, _I32]
              for name in ("paged_decode_f32", "paged_decode_bf16")}
RESTYPES: dict = {}


def paged_decode(lib, q, k_cache, v_cache, block_tables, seq_lens, q_rows, out, scale: float, window: int | None,
                 num_threads: int) -> None:
    """Decode attention into ``out`` (see ``SOURCE``) with the loaded library ``lib``; tensors on the CPU.

    ``q``, ``out``: ``[T, H, D]`` with contiguous rows; ``k_cache``, ``v_cache``:
    ``[num_blocks, block_size, Hk, D]`` contiguous; all float32 or all bfloat16; ``block_tables`` int32 ``[S, nb]`` (row-contiguous); ``seq_lens`` int32
    ``[S]``; ``q_rows`` int64 ``[S]``.
    """
    _, num_heads, head = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    fn = lib.paged_decode_f32 if q.element_size() == 4 else lib.paged_decode_bf16
    fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
       block_tables.stride(0), seq_lens.data_ptr(), q_rows.data_ptr(), out.data_ptr(), out.stride(0), q_rows.shape[0],
       num_heads, num_kv_heads, head, block_size, float(scale), int(window or 0), int(num_threads))
