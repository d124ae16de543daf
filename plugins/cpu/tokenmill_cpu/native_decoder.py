"""C source of a Llama-family decode step in one call (every layer, then the final norm).

Compiled into the plugin's library with the kernels it calls (:mod:`tokenmill_cpu.native`);
:mod:`tokenmill_cpu.fused_decode` decides when it serves a step and calls it.
"""
from __future__ import annotations

import ctypes

SOURCE = r"""
/* One decode step of a decoder stack. Weights in the model dtype, packed by tiles_pack_f32 or
   tiles_pack_bf16; biases and
   the q/k norms optional (0). Returns 0; 1 when a position lies outside the cos/sin cache; -1 when
   scratch memory cannot be allocated (out is then not written). */
typedef struct {
    const void *in_norm, *post_norm, *q_norm, *k_norm;
    const void *w_qkv, *b_qkv, *w_o, *b_o, *w_gu, *b_gu, *w_down, *b_down;
    void *k_cache, *v_cache;
    float in_eps, post_eps, qk_eps, scale;
    int window;
} tm_layer;

typedef struct {
    int L, H, Hq, Hk, D, I, bs, nthreads;
    const float *cos_sin;
    int64_t cos_rows;
    const void *final_norm;
    float final_eps;
} tm_stack;

static inline int tm_linear_f32(const float *x, const void *w, const void *b, float *y, int M, int N, int K, int nt) {
    return linear_tiles_f32(x, K, (const float *)w, (const float *)b, y, N, M, N, K, nt);
}
static inline int tm_linear_bf16(const uint16_t *x, const void *w, const void *b, uint16_t *y, int M, int N, int K,
                                 int nt) {
    return linear_tiles_bf16(x, K, (const uint32_t *)w, (const uint16_t *)b, y, N, M, N, K, nt);
}

#define DEFINE_STACK(SUF, T)                                                                                \
int decoder_stack_##SUF(const tm_stack *s, const tm_layer *layers, int M, const int64_t *pos,               \
                        const int64_t *slots, const int32_t *tables, int64_t bt_stride,                     \
                        const int32_t *seq_lens, const int64_t *q_rows, const T *x, T *out) {               \
    const int H = s->H, D = s->D, Hq = s->Hq, Hk = s->Hk, I = s->I, nt = s->nthreads;                       \
    const int Q = Hq * D, KV = Hk * D, W = Q + 2 * KV, wide = W > 2 * I ? W : 2 * I;                       \
    T *res = (T *)malloc(sizeof(T) * (size_t)M * (size_t)(3 * H + wide + 3 * Q + 2 * KV + I));             \
    if (!res) return -1;                                                                                    \
    T *h = res + (int64_t)M * H, *hid = h + (int64_t)M * H, *big = hid + (int64_t)M * H;                    \
    T *qn = big + (int64_t)M * wide, *kn = qn + (int64_t)M * Q, *qr = kn + (int64_t)M * KV;                 \
    T *kr = qr + (int64_t)M * Q, *att = kr + (int64_t)M * KV, *act = att + (int64_t)M * Q;                  \
    int rc = 0;                                                                                             \
    memcpy(res, x, sizeof(T) * (size_t)M * H);                                                             \
    for (int l = 0; l < s->L && rc == 0; l++) {                                                             \
        const tm_layer *ly = layers + l;                                                                    \
        if (l == 0) rms_norm_##SUF(x, H, (const T *)ly->in_norm, h, H, M, H, ly->in_eps, nt);               \
        else fused_add_rms_norm_##SUF(hid, H, res, H, (const T *)ly->in_norm, h, res, M, H, ly->in_eps, nt); \
        if ((rc = tm_linear_##SUF(h, ly->w_qkv, ly->b_qkv, big, M, W, H, nt))) break;                       \
        const T *qin = big, *kin = big + Q;                                                                 \
        int64_t qs = W, ks = W;                                                                             \
        if (ly->q_norm) {                                                                                   \
            for (int t = 0; t < M; t++) {                                                                   \
                rms_norm_##SUF(big + (int64_t)t * W, D, (const T *)ly->q_norm, qn + (int64_t)t * Q, D, Hq,   \
                               D, ly->qk_eps, 1);                                                           \
                rms_norm_##SUF(big + (int64_t)t * W + Q, D, (const T *)ly->k_norm, kn + (int64_t)t * KV, D,  \
                               Hk, D, ly->qk_eps, 1);                                                       \
            }                                                                                               \
            qin = qn, kin = kn, qs = Q, ks = KV;                                                            \
        }                                                                                                   \
        if (rotary_neox_##SUF(pos, qin, qs, kin, ks, s->cos_sin, s->cos_rows, qr, kr, M, Hq, Hk, D, nt)) {  \
            rc = 1;                                                                                         \
            break;                                                                                          \
        }                                                                                                   \
        for (int t = 0; t < M; t++) {                                                                       \
            memcpy((T *)ly->k_cache + slots[t] * KV, kr + (int64_t)t * KV, sizeof(T) * KV);                 \
            memcpy((T *)ly->v_cache + slots[t] * KV, big + (int64_t)t * W + Q + KV, sizeof(T) * KV);        \
        }                                                                                                   \
        paged_decode_##SUF(qr, Q, (const T *)ly->k_cache, (const T *)ly->v_cache, tables, bt_stride,        \
                           seq_lens, q_rows, att, Q, M, Hq, Hk, D, s->bs, ly->scale, ly->window, nt);       \
        if ((rc = tm_linear_##SUF(att, ly->w_o, ly->b_o, hid, M, H, Q, nt))) break;                         \
        fused_add_rms_norm_##SUF(hid, H, res, H, (const T *)ly->post_norm, h, res, M, H, ly->post_eps, nt); \
        if ((rc = tm_linear_##SUF(h, ly->w_gu, ly->b_gu, big, M, 2 * I, H, nt))) break;                     \
        silu_and_mul_##SUF(big, 2 * I, act, I, M, I, nt);                                                   \
        if ((rc = tm_linear_##SUF(act, ly->w_down, ly->b_down, hid, M, H, I, nt))) break;                   \
    }                                                                                                       \
    if (rc == 0)                                                                                            \
        fused_add_rms_norm_##SUF(hid, H, res, H, (const T *)s->final_norm, out, res, M, H, s->final_eps, nt); \
    free(res);                                                                                              \
    return rc;                                                                                              \
}

DEFINE_STACK(f32, float)
DEFINE_STACK(bf16, uint16_t)
"""

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class Layer(ctypes.Structure):
    """``tm_layer``: one layer's weights, norms, caches and attention settings."""

    _fields_ = [(n, _P) for n in ("in_norm", "post_norm", "q_norm", "k_norm", "w_qkv", "b_qkv", "w_o", "b_o",
                                  "w_gu", "b_gu", "w_down", "b_down", "k_cache", "v_cache")] + \
               [(n, _F32) for n in ("in_eps", "post_eps", "qk_eps", "scale")] + [("window", _I32)]


class Stack(ctypes.Structure):
    """``tm_stack``: the shapes shared by every layer, the rotary table and the final norm."""

    _fields_ = [(n, _I32) for n in ("L", "H", "Hq", "Hk", "D", "I", "bs", "nthreads")] + \
               [("cos_sin", _P), ("cos_rows", _I64), ("final_norm", _P), ("final_eps", _F32)]


#: C function name -> ctypes argument types (set on the library by :func:`tokenmill_cpu.native.load`).
SIGNATURES = {f"decoder_stack_{suf}": [ctypes.POINTER(Stack), ctypes.POINTER(Layer), _I32, _P, _P, _P, _I64, _P, _P,
                                       _P, _P] for suf in ("f32", "bf16")}
RESTYPES = {name: _I32 for name in SIGNATURES}
