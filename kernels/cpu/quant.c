/*
 * quant.c - GGUF block-quantized weights and F16/BF16 rows on the CPU:
 * conversion to and from f32, and y = x W^T read straight from the blocks.
 *
 * Layout: one scalar codec per type (the definition of the format, written to
 * read like ggml's reference code), one scalar dot-product kernel per weight
 * type (the portable fallback), and the AVX2 versions of the dot products and
 * of the activation quantizers. A dot kernel multiplies one weight row with R
 * (<= TILE_M) rows of prepared activations, so for M > 1 each weight block is
 * unpacked once per R rows. The driver (kern_matmul_q) prepares activations,
 * then splits the rows of W over the pool.
 *
 * Invariants: integer partial sums never overflow int32 (the bounds are noted
 * at each kernel); the SIMD activation quantizers produce the same bytes as
 * the scalar ones for finite input, so the scalar and SIMD products differ
 * only in the order of f32 additions.
 */
#include "kernels/quant.h"
#include "kernels/kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define HAVE_X86 0
#endif

#define TILE_M 4   /* rows of x per dot-kernel call */
#define BLOCK_M 64 /* rows of x kept hot (in L2) while a task walks its weight rows */
#define PARALLEL_MIN_MACS (1 << 17)
#define ROWS_PER_TASK_MIN 16
/* The kernels prefetch the weight stream this far ahead: on the machines we
 * measured, the hardware prefetcher alone left a single-row stream at ~60% of
 * the triad bandwidth (bench/bench_matmul.c); ~4 KiB ahead reaches 85-95%. */
#define PREFETCH_AHEAD 4096

/* ---- f16 / bf16 ---------------------------------------------------------- */

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* Round-to-nearest-even f32 -> half without branches on the value (Maratyszcza's
 * FP16 library, as ggml uses): scaling by 2^112 then 2^-110 lets the FPU do the
 * rounding, including into subnormals; NaN becomes a quiet NaN. Relies on
 * IEEE float arithmetic without contraction (ISO C mode: -ffp-contract=off). */
uint16_t kern_f32_to_f16(float f)
{
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

uint16_t kern_f32_to_bf16(float f)
{
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it, make it quiet */
        return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

static inline float f16(uint16_t h)
{
    return kern_f16_to_f32(h);
}

/* roundf (half away from zero) without a libm call: v - trunc(v) is exact. */
static inline float round_away(float v)
{
    float t = truncf(v);
    if (fabsf(v - t) >= 0.5f)
        t += copysignf(1.0f, v);
    return t;
}

/* A code in [lo, hi] from a scaled value; NaN maps to hi (defined, unlike a cast). */
static inline int clamp_code(float v, float lo, float hi)
{
    return (int)fmaxf(lo, fminf(hi, v));
}

/* ---- scalar codecs -------------------------------------------------------- */

static void dequant_f16(const void *src, float *dst, size_t n)
{
    const uint16_t *s = src;
    for (size_t i = 0; i < n; i++)
        dst[i] = f16(s[i]);
}

static void dequant_bf16(const void *src, float *dst, size_t n)
{
    const uint16_t *s = src;
    for (size_t i = 0; i < n; i++)
        dst[i] = kern_bf16_to_f32(s[i]);
}

static void quant_f16(const float *src, void *dst, size_t n)
{
    uint16_t *d = dst;
    for (size_t i = 0; i < n; i++)
        d[i] = kern_f32_to_f16(src[i]);
}

static void quant_bf16(const float *src, void *dst, size_t n)
{
    uint16_t *d = dst;
    for (size_t i = 0; i < n; i++)
        d[i] = kern_f32_to_bf16(src[i]);
}

static void dequant_f32(const void *src, float *dst, size_t n)
{
    memcpy(dst, src, n * 4);
}
static void quant_f32(const float *src, void *dst, size_t n)
{
    memcpy(dst, src, n * 4);
}

static void dequant_q8_0(const void *src, float *dst, size_t nb)
{
    const kern_block_q8_0 *b = src;
    for (size_t i = 0; i < nb; i++) {
        const float d = f16(b[i].d);
        for (int j = 0; j < KERN_QK; j++)
            dst[i * KERN_QK + (size_t)j] = (float)b[i].qs[j] * d;
    }
}

/* ggml's quantize_row_q8_0_ref: d = amax / 127, codes round(x / d). */
static void quant_q8_0(const float *src, void *dst, size_t nb)
{
    kern_block_q8_0 *b = dst;
    for (size_t i = 0; i < nb; i++) {
        const float *x = src + i * KERN_QK;
        float amax = 0.0f;
        for (int j = 0; j < KERN_QK; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = kern_f32_to_f16(d);
        for (int j = 0; j < KERN_QK; j++)
            b[i].qs[j] = (int8_t)clamp_code(round_away(x[j] * id), -127.0f, 127.0f);
    }
}

static void dequant_q4_0(const void *src, float *dst, size_t nb)
{
    const kern_block_q4_0 *b = src;
    for (size_t i = 0; i < nb; i++) {
        const float d = f16(b[i].d);
        float *y = dst + i * KERN_QK;
        for (int j = 0; j < KERN_QK / 2; j++) {
            y[j] = (float)((b[i].qs[j] & 0x0F) - 8) * d;
            y[j + KERN_QK / 2] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

/* ggml's quantize_row_q4_0_ref: the element of largest magnitude (first one on
 * ties) maps to code 0, d = max / -8, codes trunc(x / d + 8.5) capped at 15. */
static void quant_q4_0(const float *src, void *dst, size_t nb)
{
    kern_block_q4_0 *b = dst;
    for (size_t i = 0; i < nb; i++) {
        const float *x = src + i * KERN_QK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < KERN_QK; j++)
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = kern_f32_to_f16(d);
        for (int j = 0; j < KERN_QK / 2; j++) {
            const int lo = clamp_code(truncf(x[j] * id + 8.5f), 0.0f, 15.0f);
            const int hi = clamp_code(truncf(x[j + KERN_QK / 2] * id + 8.5f), 0.0f, 15.0f);
            b[i].qs[j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

/* The 6-bit scales sc[0..7] and mins m[0..7] of a Q4_K/Q5_K block (ggml's
 * get_scale_min_k4 for j = 0..7). */
static inline void unpack_scales_k4(const uint8_t *s, uint8_t sc[8], uint8_t m[8])
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0x0F) | ((s[j] >> 6) << 4));
        m[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

static inline void pack_scales_k4(uint8_t s[12], const uint8_t sc[8], const uint8_t m[8])
{
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4));
    }
}

static void dequant_q4_K(const void *src, float *dst, size_t nb)
{
    const kern_block_q4_K *b = src;
    for (size_t i = 0; i < nb; i++) {
        const float d = f16(b[i].d), dmin = f16(b[i].dmin);
        uint8_t sc[8], m[8];
        unpack_scales_k4(b[i].scales, sc, m);
        float *y = dst + i * KERN_QK_K;
        for (int c = 0; c < 4; c++) { /* 64 elements from 32 bytes */
            const uint8_t *q = b[i].qs + 32 * c;
            const float d1 = d * sc[2 * c], m1 = dmin * m[2 * c];
            const float d2 = d * sc[2 * c + 1], m2 = dmin * m[2 * c + 1];
            for (int l = 0; l < 32; l++) {
                y[64 * c + l] = d1 * (float)(q[l] & 0x0F) - m1;
                y[64 * c + 32 + l] = d2 * (float)(q[l] >> 4) - m2;
            }
        }
    }
}

static void dequant_q5_K(const void *src, float *dst, size_t nb)
{
    const kern_block_q5_K *b = src;
    for (size_t i = 0; i < nb; i++) {
        const float d = f16(b[i].d), dmin = f16(b[i].dmin);
        uint8_t sc[8], m[8];
        unpack_scales_k4(b[i].scales, sc, m);
        float *y = dst + i * KERN_QK_K;
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = b[i].qs + 32 * c;
            const float d1 = d * sc[2 * c], m1 = dmin * m[2 * c];
            const float d2 = d * sc[2 * c + 1], m2 = dmin * m[2 * c + 1];
            for (int l = 0; l < 32; l++) {
                const int h1 = (b[i].qh[l] >> (2 * c)) & 1, h2 = (b[i].qh[l] >> (2 * c + 1)) & 1;
                y[64 * c + l] = d1 * (float)((q[l] & 0x0F) | (h1 << 4)) - m1;
                y[64 * c + 32 + l] = d2 * (float)((q[l] >> 4) | (h2 << 4)) - m2;
            }
        }
    }
}

/* Code of element e (0..255) of a Q6_K block, in [0, 63]: halves of 128
 * elements; in half h, element 32g + l takes the low (g < 2) or high nibble of
 * ql[64h + 32(g & 1) + l] and bits 2g, 2g+1 of qh[32h + l]. */
static inline int q6_code(const kern_block_q6_K *b, int e)
{
    const int h = e / 128, g = (e % 128) / 32, l = e % 32;
    const uint8_t lo = b->ql[64 * h + 32 * (g & 1) + l];
    const int nib = g < 2 ? (lo & 0x0F) : (lo >> 4);
    return nib | (((b->qh[32 * h + l] >> (2 * g)) & 3) << 4);
}

static void dequant_q6_K(const void *src, float *dst, size_t nb)
{
    const kern_block_q6_K *b = src;
    for (size_t i = 0; i < nb; i++) {
        const float d = f16(b[i].d);
        for (int e = 0; e < KERN_QK_K; e++)
            dst[i * KERN_QK_K + (size_t)e] =
                d * (float)b[i].scales[e / 16] * (float)(q6_code(&b[i], e) - 32);
    }
}

static void dequant_q8_K(const void *src, float *dst, size_t nb)
{
    const kern_block_q8_K *b = src;
    for (size_t i = 0; i < nb; i++)
        for (int j = 0; j < KERN_QK_K; j++)
            dst[i * KERN_QK_K + (size_t)j] = b[i].d * (float)b[i].qs[j];
}

/* Q8_K for activations: d = amax / 127 in f32, codes round(x / d) in
 * [-127, 127], and the 16-element sums the K-quant kernels use for mins and
 * offsets. */
static void quant_q8_K(const float *src, void *dst, size_t nb)
{
    kern_block_q8_K *b = dst;
    for (size_t i = 0; i < nb; i++) {
        const float *x = src + i * KERN_QK_K;
        float amax = 0.0f;
        for (int j = 0; j < KERN_QK_K; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = d;
        for (int j = 0; j < KERN_QK_K; j++)
            b[i].qs[j] = (int8_t)clamp_code(round_away(x[j] * id), -127.0f, 127.0f);
        for (int j = 0; j < KERN_QK_K / 16; j++) {
            int s = 0;
            for (int l = 0; l < 16; l++)
                s += b[i].qs[16 * j + l];
            b[i].bsums[j] = (int16_t)s;
        }
    }
}

/* One-pass fit of the asymmetric K-quants (Q4_K: nmax 15, Q5_K: nmax 31):
 * each 32-element sub-block gets scale (max - min) / nmax and offset -min
 * (min clipped to <= 0, as the format only subtracts); scales and offsets are
 * then coded in 6 bits against the super-block's largest, and the codes
 * recomputed against the coded values. */
static void fit_k4(const float *x, int nmax, uint16_t *d_out, uint16_t *dmin_out,
                   uint8_t scales[12], uint8_t q[KERN_QK_K])
{
    float scale[8], off[8], max_scale = 0.0f, max_off = 0.0f;
    for (int j = 0; j < 8; j++) {
        float mn = x[32 * j], mx = x[32 * j];
        for (int l = 1; l < 32; l++) {
            mn = fminf(mn, x[32 * j + l]);
            mx = fmaxf(mx, x[32 * j + l]);
        }
        mn = fminf(mn, 0.0f);
        scale[j] = (mx - mn) / (float)nmax;
        off[j] = -mn;
        max_scale = fmaxf(max_scale, scale[j]);
        max_off = fmaxf(max_off, off[j]);
    }
    *d_out = kern_f32_to_f16(max_scale / 63.0f);
    *dmin_out = kern_f32_to_f16(max_off / 63.0f);
    const float d = f16(*d_out), dmin = f16(*dmin_out);
    uint8_t sc[8], m[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = d > 0.0f ? (uint8_t)clamp_code(round_away(scale[j] / d), 0.0f, 63.0f) : 0;
        m[j] = dmin > 0.0f ? (uint8_t)clamp_code(round_away(off[j] / dmin), 0.0f, 63.0f) : 0;
    }
    pack_scales_k4(scales, sc, m);
    for (int j = 0; j < 8; j++) {
        const float ds = d * sc[j], dm = dmin * m[j];
        for (int l = 0; l < 32; l++)
            q[32 * j + l] = ds > 0.0f ? (uint8_t)clamp_code(round_away((x[32 * j + l] + dm) / ds),
                                                            0.0f, (float)nmax)
                                      : 0;
    }
}

static void quant_q4_K(const float *src, void *dst, size_t nb)
{
    kern_block_q4_K *b = dst;
    for (size_t i = 0; i < nb; i++) {
        uint8_t q[KERN_QK_K];
        fit_k4(src + i * KERN_QK_K, 15, &b[i].d, &b[i].dmin, b[i].scales, q);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                b[i].qs[32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
    }
}

static void quant_q5_K(const float *src, void *dst, size_t nb)
{
    kern_block_q5_K *b = dst;
    for (size_t i = 0; i < nb; i++) {
        uint8_t q[KERN_QK_K];
        fit_k4(src + i * KERN_QK_K, 31, &b[i].d, &b[i].dmin, b[i].scales, q);
        memset(b[i].qh, 0, sizeof(b[i].qh));
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                const int q1 = q[64 * c + l], q2 = q[64 * c + 32 + l];
                b[i].qs[32 * c + l] = (uint8_t)((q1 & 0x0F) | ((q2 & 0x0F) << 4));
                b[i].qh[l] |= (uint8_t)(((q1 >> 4) << (2 * c)) | ((q2 >> 4) << (2 * c + 1)));
            }
    }
}

/* Q6_K: each 16-element sub-block gets the symmetric scale max / -32 of its
 * largest-magnitude element (so that element codes exactly -32), the scales are
 * coded in int8 against the largest, the codes recomputed against them. */
static void quant_q6_K(const float *src, void *dst, size_t nb)
{
    kern_block_q6_K *b = dst;
    for (size_t i = 0; i < nb; i++) {
        const float *x = src + i * KERN_QK_K;
        float scale[16], amax_scale = 0.0f;
        for (int j = 0; j < 16; j++) {
            float amax = 0.0f, max = 0.0f;
            for (int l = 0; l < 16; l++)
                if (amax < fabsf(x[16 * j + l])) {
                    amax = fabsf(x[16 * j + l]);
                    max = x[16 * j + l];
                }
            scale[j] = max / -32.0f;
            amax_scale = fmaxf(amax_scale, fabsf(scale[j]));
        }
        b[i].d = kern_f32_to_f16(amax_scale / 127.0f);
        const float d = f16(b[i].d);
        uint8_t q[KERN_QK_K];
        for (int j = 0; j < 16; j++) {
            b[i].scales[j] =
                d > 0.0f ? (int8_t)clamp_code(round_away(scale[j] / d), -128.0f, 127.0f) : 0;
            const float ds = d * b[i].scales[j];
            for (int l = 0; l < 16; l++)
                q[16 * j + l] =
                    (uint8_t)(32 + (ds != 0.0f
                                        ? clamp_code(round_away(x[16 * j + l] / ds), -32.0f, 31.0f)
                                        : 0));
        }
        memset(b[i].ql, 0, sizeof(b[i].ql));
        memset(b[i].qh, 0, sizeof(b[i].qh));
        for (int e = 0; e < KERN_QK_K; e++) {
            const int h = e / 128, g = (e % 128) / 32, l = e % 32;
            const int nib = q[e] & 0x0F;
            b[i].ql[64 * h + 32 * (g & 1) + l] |= (uint8_t)(g < 2 ? nib : nib << 4);
            b[i].qh[32 * h + l] |= (uint8_t)((q[e] >> 4) << (2 * g));
        }
    }
}

/* ---- scalar dot kernels ------------------------------------------------------
 * dot(nb, w, xq, xs, R, out): out[r] = <weight row w, activation row r> for
 * r < R, where activation row r starts at xq + r * xs bytes and both rows have
 * nb blocks (F16/BF16: nb elements, activations f32). */

typedef void (*dot_fn)(int nb, const void *w, const void *xq, size_t xs, int R, float *out);

/* A prepared row of Q8_0 activations is its blocks followed (at the next
 * 4-byte boundary) by the blocks' scales as f32, so the SIMD kernels do not
 * convert an activation scale once per weight row. */
static inline size_t act_q8_0_scales_offset(size_t nb)
{
    return (nb * sizeof(kern_block_q8_0) + 3) / 4 * 4;
}

static inline const float *act_q8_0_scales(const void *row, int nb)
{
    return (const float *)((const char *)row + act_q8_0_scales_offset((size_t)nb));
}

static inline const void *xrow(const void *xq, size_t xs, int r)
{
    return (const char *)xq + (size_t)r * xs;
}

static void dot_f16_scalar(int n, const void *w, const void *xq, size_t xs, int R, float *out)
{
    const uint16_t *wr = w;
    for (int r = 0; r < R; r++) {
        const float *x = xrow(xq, xs, r);
        float s = 0.0f;
        for (int i = 0; i < n; i++)
            s += f16(wr[i]) * x[i];
        out[r] = s;
    }
}

static void dot_bf16_scalar(int n, const void *w, const void *xq, size_t xs, int R, float *out)
{
    const uint16_t *wr = w;
    for (int r = 0; r < R; r++) {
        const float *x = xrow(xq, xs, r);
        float s = 0.0f;
        for (int i = 0; i < n; i++)
            s += kern_bf16_to_f32(wr[i]) * x[i];
        out[r] = s;
    }
}

/* |sum| <= 32 * 128 * 127 per block. */
static void dot_q8_0_scalar(int nb, const void *w, const void *xq, size_t xs, int R, float *out)
{
    const kern_block_q8_0 *bw = w;
    for (int r = 0; r < R; r++) {
        const kern_block_q8_0 *bx = xrow(xq, xs, r);
        float s = 0.0f;
        for (int b = 0; b < nb; b++) {
            int si = 0;
            for (int j = 0; j < KERN_QK; j++)
                si += bw[b].qs[j] * bx[b].qs[j];
            s += f16(bw[b].d) * f16(bx[b].d) * (float)si;
        }
        out[r] = s;
    }
}

static void dot_q4_0_scalar(int nb, const void *w, const void *xq, size_t xs, int R, float *out)
{
    const kern_block_q4_0 *bw = w;
    for (int r = 0; r < R; r++) {
        const kern_block_q8_0 *bx = xrow(xq, xs, r);
        float s = 0.0f;
        for (int b = 0; b < nb; b++) {
            int si = 0;
            for (int j = 0; j < KERN_QK / 2; j++)
                si += ((bw[b].qs[j] & 0x0F) - 8) * bx[b].qs[j] +
                      ((bw[b].qs[j] >> 4) - 8) * bx[b].qs[j + KERN_QK / 2];
            s += f16(bw[b].d) * f16(bx[b].d) * (float)si;
        }
        out[r] = s;
    }
}

/* Q4_K/Q5_K: sum = d dx sum_j sc_j <q_j, x_j> - dmin dx sum_j m_j sum(x_j); the
 * sums of x come from bsums. |sum_j sc_j <q_j, x_j>| <= 256 * 63 * 31 * 127. */
static inline void dot_k4_scalar(int nb, const void *w, size_t bytes, const void *xq, size_t xs,
                                 int R, float *out, int five)
{
    for (int r = 0; r < R; r++) {
        const kern_block_q8_K *bx = xrow(xq, xs, r);
        float s = 0.0f, smin = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = (const uint8_t *)w + (size_t)b * bytes;
            const kern_block_q4_K *b4 = (const void *)blk;
            const kern_block_q5_K *b5 = (const void *)blk;
            const uint8_t *qs = five ? b5->qs : b4->qs;
            uint8_t sc[8], m[8];
            unpack_scales_k4(five ? b5->scales : b4->scales, sc, m);
            int sumi = 0, summ = 0;
            for (int j = 0; j < 8; j++) {
                int sj = 0;
                for (int l = 0; l < 32; l++) {
                    const uint8_t byte = qs[32 * (j / 2) + l];
                    int q = j % 2 ? byte >> 4 : byte & 0x0F;
                    if (five)
                        q |= ((b5->qh[l] >> j) & 1) << 4;
                    sj += q * bx[b].qs[32 * j + l];
                }
                sumi += sc[j] * sj;
                summ += m[j] * (bx[b].bsums[2 * j] + bx[b].bsums[2 * j + 1]);
            }
            s += f16(b4->d) * bx[b].d * (float)sumi;
            smin += f16(b4->dmin) * bx[b].d * (float)summ;
        }
        out[r] = s - smin;
    }
}

static void dot_q4_K_scalar(int nb, const void *w, const void *xq, size_t xs, int R, float *out)
{
    dot_k4_scalar(nb, w, sizeof(kern_block_q4_K), xq, xs, R, out, 0);
}

static void dot_q5_K_scalar(int nb, const void *w, const void *xq, size_t xs, int R, float *out)
{
    dot_k4_scalar(nb, w, sizeof(kern_block_q5_K), xq, xs, R, out, 1);
}

/* Q6_K: sum = d dx (sum_j sc_j <q_j, x_j> - 32 sum_j sc_j bsum_j) with q in
 * [0, 63]; |sum_j sc_j <q_j, x_j>| <= 256 * 128 * 63 * 127 < 2^31. */
static void dot_q6_K_scalar(int nb, const void *w, const void *xq, size_t xs, int R, float *out)
{
    const kern_block_q6_K *bw = w;
    for (int r = 0; r < R; r++) {
        const kern_block_q8_K *bx = xrow(xq, xs, r);
        float s = 0.0f;
        for (int b = 0; b < nb; b++) {
            int sumi = 0, sumo = 0;
            for (int j = 0; j < 16; j++) {
                int sj = 0;
                for (int l = 0; l < 16; l++)
                    sj += q6_code(&bw[b], 16 * j + l) * bx[b].qs[16 * j + l];
                sumi += bw[b].scales[j] * sj;
                sumo += bw[b].scales[j] * bx[b].bsums[j];
            }
            s += f16(bw[b].d) * bx[b].d * (float)(sumi - 32 * sumo);
        }
        out[r] = s;
    }
}

/* ---- AVX2 ------------------------------------------------------------------ */

#if HAVE_X86
/* Compiled for AVX2 whatever -march says; called only after runtime detection. */
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline)) AVX2_TARGET

AVX2_INLINE float hsum_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_INLINE float h2f(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* Prefetches the cache lines PREFETCH_AHEAD bytes past [p, p + bytes); past the
 * end of the matrix this touches nothing (prefetches never fault). */
AVX2_INLINE void prefetch_block(const void *p, size_t bytes)
{
    for (size_t o = 0; o < bytes; o += 64)
        _mm_prefetch((const char *)p + PREFETCH_AHEAD + o, _MM_HINT_T0);
}

/* The 32 signed bytes of x * y summed in pairs of 4 into 8 int32 lanes, given
 * ax = |x| (which may be 128 for x = -128: maddubs reads it unsigned). */
AVX2_INLINE __m256i dot_i8_i32(__m256i ax, __m256i x, __m256i y)
{
    const __m256i sy = _mm256_sign_epi8(y, x);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1));
}

/* Exact roundf of 8 lanes, then clamped to [-127, 127] and converted. */
AVX2_INLINE __m256i round_away_epi32(__m256 v)
{
    const __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t));
    const __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    t = _mm256_add_ps(t, _mm256_and_ps(up, _mm256_or_ps(sign, _mm256_set1_ps(1.0f))));
    t = _mm256_max_ps(_mm256_set1_ps(-127.0f), _mm256_min_ps(_mm256_set1_ps(127.0f), t));
    return _mm256_cvttps_epi32(t);
}

/* Quantizes 32 floats with scale id and stores 32 int8 codes. */
AVX2_INLINE void quant32(const float *x, float id, int8_t *q)
{
    const __m256 vid = _mm256_set1_ps(id);
    const __m256i i0 = round_away_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), vid));
    const __m256i i1 = round_away_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), vid));
    const __m256i i2 = round_away_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), vid));
    const __m256i i3 = round_away_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), vid));
    /* packs work within 128-bit lanes; the permute restores element order. */
    const __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
    __m256i p = _mm256_packs_epi16(p01, p23);
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
}

AVX2_INLINE float amax_n(const float *x, int n)
{
    __m256 m = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int i = 0; i < n; i += 8)
        m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_TARGET static void quant_q8_0_avx2(const float *src, void *dst, size_t nb)
{
    kern_block_q8_0 *b = dst;
    for (size_t i = 0; i < nb; i++) {
        const float *x = src + i * KERN_QK;
        const float d = amax_n(x, KERN_QK) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = kern_f32_to_f16(d);
        quant32(x, id, b[i].qs);
    }
}

AVX2_TARGET static void quant_q8_K_avx2(const float *src, void *dst, size_t nb)
{
    kern_block_q8_K *b = dst;
    for (size_t i = 0; i < nb; i++) {
        const float *x = src + i * KERN_QK_K;
        const float d = amax_n(x, KERN_QK_K) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = d;
        for (int j = 0; j < KERN_QK_K; j += 32) {
            quant32(x + j, id, b[i].qs + j);
            /* Two 16-element sums: widen to int16, add neighbours, fold lanes. */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(b[i].qs + j));
            const __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q);
            const __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
            __m128i lo = _mm256_castsi256_si128(s32), hi = _mm256_extracti128_si256(s32, 1);
            lo = _mm_hadd_epi32(lo, hi); /* [a0+a1, a2+a3, b0+b1, b2+b3] */
            lo = _mm_hadd_epi32(lo, lo);
            b[i].bsums[j / 16] = (int16_t)_mm_cvtsi128_si32(lo);
            b[i].bsums[j / 16 + 1] = (int16_t)_mm_extract_epi32(lo, 1);
        }
    }
}

AVX2_INLINE __m256 load_f16x8(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

AVX2_INLINE __m256 load_bf16x8(const uint16_t *p)
{
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* F16/BF16 weights against f32 rows. One row: four accumulators hide the FMA
 * latency; several rows: one accumulator per row, the converted weights reused. */
AVX2_INLINE void dot_h16_avx2(int n, const uint16_t *w, const void *xq, size_t xs, int R,
                              float *out, int bf)
{
    int i = 0;
    if (R == 1) {
        const float *x = xq;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; i + 32 <= n; i += 32) {
            prefetch_block(w + i, 64);
            a0 = _mm256_fmadd_ps(bf ? load_bf16x8(w + i) : load_f16x8(w + i),
                                 _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(bf ? load_bf16x8(w + i + 8) : load_f16x8(w + i + 8),
                                 _mm256_loadu_ps(x + i + 8), a1);
            a2 = _mm256_fmadd_ps(bf ? load_bf16x8(w + i + 16) : load_f16x8(w + i + 16),
                                 _mm256_loadu_ps(x + i + 16), a2);
            a3 = _mm256_fmadd_ps(bf ? load_bf16x8(w + i + 24) : load_f16x8(w + i + 24),
                                 _mm256_loadu_ps(x + i + 24), a3);
        }
        for (; i + 8 <= n; i += 8)
            a0 = _mm256_fmadd_ps(bf ? load_bf16x8(w + i) : load_f16x8(w + i),
                                 _mm256_loadu_ps(x + i), a0);
        float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; i < n; i++)
            s += (bf ? kern_bf16_to_f32(w[i]) : h2f(w[i])) * x[i];
        out[0] = s;
        return;
    }
    __m256 acc[TILE_M];
    for (int r = 0; r < R; r++)
        acc[r] = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        if ((i & 31) == 0)
            prefetch_block(w + i, 64);
        const __m256 wv = bf ? load_bf16x8(w + i) : load_f16x8(w + i);
        for (int r = 0; r < R; r++)
            acc[r] =
                _mm256_fmadd_ps(wv, _mm256_loadu_ps((const float *)xrow(xq, xs, r) + i), acc[r]);
    }
    for (int r = 0; r < R; r++) {
        const float *x = xrow(xq, xs, r);
        float s = hsum_ps(acc[r]);
        for (int k = i; k < n; k++)
            s += (bf ? kern_bf16_to_f32(w[k]) : h2f(w[k])) * x[k];
        out[r] = s;
    }
}

/* Q8_0 and Q4_0 against Q8_0 activations: each weight block is widened to 32
 * signed bytes once, then multiplied with each of the R activation blocks.
 * Two blocks per step, on two accumulators, so consecutive blocks do not wait
 * on each other's FMA; the activation scales come as f32 (act_q8_0_scales). */
AVX2_INLINE __m256i load_q32(const void *w, int b, int q4, float *d)
{
    if (q4) {
        const kern_block_q4_0 *bw = (const kern_block_q4_0 *)w + b;
        const __m128i t = _mm_loadu_si128((const __m128i *)bw->qs);
        const __m256i v =
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
        *d = h2f(bw->d);
        return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
    }
    const kern_block_q8_0 *bw = (const kern_block_q8_0 *)w + b;
    *d = h2f(bw->d);
    return _mm256_loadu_si256((const __m256i *)bw->qs);
}

AVX2_INLINE void dot_q32_avx2(int nb, const void *w, const void *xq, size_t xs, int R, float *out,
                              int q4)
{
    const float *xd[TILE_M];
    __m256 acc0[TILE_M], acc1[TILE_M];
    for (int r = 0; r < R; r++) {
        xd[r] = act_q8_0_scales(xrow(xq, xs, r), nb);
        acc0[r] = acc1[r] = _mm256_setzero_ps();
    }
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        prefetch_block((const uint8_t *)w +
                           (size_t)b * (q4 ? sizeof(kern_block_q4_0) : sizeof(kern_block_q8_0)),
                       64);
        float d0, d1;
        const __m256i w0 = load_q32(w, b, q4, &d0), w1 = load_q32(w, b + 1, q4, &d1);
        const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);
        for (int r = 0; r < R; r++) {
            const kern_block_q8_0 *bx = (const kern_block_q8_0 *)xrow(xq, xs, r) + b;
            const __m256i p0 = dot_i8_i32(a0, w0, _mm256_loadu_si256((const __m256i *)bx[0].qs));
            const __m256i p1 = dot_i8_i32(a1, w1, _mm256_loadu_si256((const __m256i *)bx[1].qs));
            acc0[r] =
                _mm256_fmadd_ps(_mm256_set1_ps(d0 * xd[r][b]), _mm256_cvtepi32_ps(p0), acc0[r]);
            acc1[r] =
                _mm256_fmadd_ps(_mm256_set1_ps(d1 * xd[r][b + 1]), _mm256_cvtepi32_ps(p1), acc1[r]);
        }
    }
    if (b < nb) {
        float d0;
        const __m256i w0 = load_q32(w, b, q4, &d0);
        const __m256i a0 = _mm256_sign_epi8(w0, w0);
        for (int r = 0; r < R; r++) {
            const kern_block_q8_0 *bx = (const kern_block_q8_0 *)xrow(xq, xs, r) + b;
            const __m256i p0 = dot_i8_i32(a0, w0, _mm256_loadu_si256((const __m256i *)bx->qs));
            acc0[r] =
                _mm256_fmadd_ps(_mm256_set1_ps(d0 * xd[r][b]), _mm256_cvtepi32_ps(p0), acc0[r]);
        }
    }
    for (int r = 0; r < R; r++)
        out[r] = hsum_ps(_mm256_add_ps(acc0[r], acc1[r]));
}

AVX2_INLINE float hsum128_ps(__m128 s)
{
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Q4_K/Q5_K sub-block j: broadcast int16 element j (bytes 2j, 2j + 1) of a
 * 128-bit lane to every element. */
#define K4_SHUF_ROW(j)                                                                             \
    {                                                                                              \
        2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1,    \
            2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j),             \
            2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1,         \
            2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j), 2 * (j) + 1, 2 * (j),             \
            2 * (j) + 1, 2 * (j), 2 * (j) + 1                                                      \
    }
static const uint8_t K4_SCALE_SHUF[8][32] = {K4_SHUF_ROW(0), K4_SHUF_ROW(1), K4_SHUF_ROW(2),
                                             K4_SHUF_ROW(3), K4_SHUF_ROW(4), K4_SHUF_ROW(5),
                                             K4_SHUF_ROW(6), K4_SHUF_ROW(7)};

/* Q4_K / Q5_K against Q8_K: per 64 elements, 32 bytes of nibbles (plus two
 * bits of qh for Q5_K) become two vectors of unsigned codes; maddubs with the
 * activations, madd with the sub-block scale. The scales and mins are unpacked
 * with ggml's 32-bit mask trick (same result as unpack_scales_k4); the mins
 * term is madd(mins, pairwise sums of bsums). */
AVX2_INLINE void dot_k4_avx2(int nb, const void *w, const void *xq, size_t xs, int R, float *out,
                             int five)
{
    const size_t bytes = five ? sizeof(kern_block_q5_K) : sizeof(kern_block_q4_K);
    const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    __m256 acc[TILE_M];
    __m128 accm[TILE_M];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
        accm[r] = _mm_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        prefetch_block((const uint8_t *)w + (size_t)b * bytes, bytes);
        const uint8_t *blk = (const uint8_t *)w + (size_t)b * bytes;
        const kern_block_q4_K *b4 = (const void *)blk;
        const kern_block_q5_K *b5 = (const void *)blk;
        const uint8_t *qs = five ? b5->qs : b4->qs;
        uint32_t u[4];
        memcpy(u, five ? b5->scales : b4->scales, 12);
        u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
        const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
        u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
        u[2] = mins_lo;
        u[0] &= 0x3f3f3f3fu; /* bytes 0-7: sc[0..7], bytes 8-15: m[0..7] */
        const __m256i mins_scales =
            _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
        const __m128i mins = _mm256_extracti128_si256(mins_scales, 1);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(mins_scales));
        __m256i hb = five ? _mm256_loadu_si256((const __m256i *)b5->qh) : _mm256_setzero_si256();
        __m256i sumi[TILE_M];
        for (int r = 0; r < R; r++)
            sumi[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(bits, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            if (five) { /* bit 0 of each qh byte -> bit 4 of lo, bit 1 -> bit 4 of hi */
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hb, 4), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(hb, 3), bit4));
                hb = _mm256_srli_epi16(hb, 2);
            }
            const __m256i s_lo = _mm256_shuffle_epi8(
                scales, _mm256_loadu_si256((const __m256i *)K4_SCALE_SHUF[2 * c]));
            const __m256i s_hi = _mm256_shuffle_epi8(
                scales, _mm256_loadu_si256((const __m256i *)K4_SCALE_SHUF[2 * c + 1]));
            for (int r = 0; r < R; r++) {
                const kern_block_q8_K *bx = (const kern_block_q8_K *)xrow(xq, xs, r) + b;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(bx->qs + 64 * c));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(bx->qs + 64 * c + 32));
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), s_lo);
                const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), s_hi);
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p0, p1));
            }
        }
        const float d = h2f(b4->d), dmin = h2f(b4->dmin);
        for (int r = 0; r < R; r++) {
            const kern_block_q8_K *bx = (const kern_block_q8_K *)xrow(xq, xs, r) + b;
            const __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bx->bsums),
                                              _mm_loadu_si128((const __m128i *)(bx->bsums + 8)));
            accm[r] = _mm_fmadd_ps(_mm_set1_ps(dmin * bx->d),
                                   _mm_cvtepi32_ps(_mm_madd_epi16(mins, bs)), accm[r]);
            acc[r] =
                _mm256_fmadd_ps(_mm256_set1_ps(d * bx->d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        out[r] = hsum_ps(acc[r]) - hsum128_ps(accm[r]);
}

/* For Q6_K quarter g: broadcast int16 scale 2g of a 128-bit lane to the low
 * lane and scale 2g + 1 to the high lane. */
static const uint8_t Q6_SCALE_SHUF[4][32] = {
    {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
     2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3},
    {4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5,
     6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7, 6, 7},
    {8,  9,  8,  9,  8,  9,  8,  9,  8,  9,  8,  9,  8,  9,  8,  9,
     10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11, 10, 11},
    {12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13, 12, 13,
     14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15, 14, 15},
};

/* Q6_K against Q8_K: per half of 128 elements, 64 bytes of ql and 32 of qh give
 * four vectors of codes in [0, 63]; the -32 offset is applied through bsums:
 * sum = sum_j sc_j <q_j, x_j> - 32 sum_j sc_j bsum_j. */
AVX2_INLINE void dot_q6_K_avx2_R(int nb, const void *w, const void *xq, size_t xs, int R,
                                 float *out)
{
    const kern_block_q6_K *bw = w;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    __m256 acc[TILE_M];
    for (int r = 0; r < R; r++)
        acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        prefetch_block(bw + b, sizeof(kern_block_q6_K));
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)bw[b].scales));
        __m256i sumi[TILE_M];
        for (int r = 0; r < R; r++)
            sumi[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                                  : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(bw[b].qh + 32 * h));
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(bw[b].ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(bw[b].ql + 64 * h + 32));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                   _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_and_si256(qh, m2));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
            for (int g = 0; g < 4; g++) {
                const __m256i s =
                    _mm256_shuffle_epi8(sch, _mm256_loadu_si256((const __m256i *)Q6_SCALE_SHUF[g]));
                for (int r = 0; r < R; r++) {
                    const kern_block_q8_K *bx = (const kern_block_q8_K *)xrow(xq, xs, r) + b;
                    const __m256i xv =
                        _mm256_loadu_si256((const __m256i *)(bx->qs + 128 * h + 32 * g));
                    sumi[r] = _mm256_add_epi32(
                        sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q[g], xv), s));
                }
            }
        }
        const float d = h2f(bw[b].d);
        for (int r = 0; r < R; r++) {
            const kern_block_q8_K *bx = (const kern_block_q8_K *)xrow(xq, xs, r) + b;
            const __m256i so = _mm256_madd_epi16(
                sc16, _mm256_loadu_si256((const __m256i *)bx->bsums)); /* sc_j bsum_j pairs */
            const __m256i v = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(so, 5));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * bx->d), _mm256_cvtepi32_ps(v), acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        out[r] = hsum_ps(acc[r]);
}

/* Instantiates a dot kernel for each constant R so the row loops unroll. */
#define DEFINE_AVX2_DOT(name, call)                                                                \
    AVX2_TARGET static void name(int nb, const void *w, const void *xq, size_t xs, int R,          \
                                 float *out)                                                       \
    {                                                                                              \
        switch (R) {                                                                               \
        case 1:                                                                                    \
            call(1);                                                                               \
            break;                                                                                 \
        case 2:                                                                                    \
            call(2);                                                                               \
            break;                                                                                 \
        case 3:                                                                                    \
            call(3);                                                                               \
            break;                                                                                 \
        default:                                                                                   \
            call(4);                                                                               \
            break;                                                                                 \
        }                                                                                          \
    }

#define CALL_F16(r) dot_h16_avx2(nb, w, xq, xs, r, out, 0)
#define CALL_BF16(r) dot_h16_avx2(nb, w, xq, xs, r, out, 1)
#define CALL_Q8_0(r) dot_q32_avx2(nb, w, xq, xs, r, out, 0)
#define CALL_Q4_0(r) dot_q32_avx2(nb, w, xq, xs, r, out, 1)
#define CALL_Q4_K(r) dot_k4_avx2(nb, w, xq, xs, r, out, 0)
#define CALL_Q5_K(r) dot_k4_avx2(nb, w, xq, xs, r, out, 1)
#define CALL_Q6_K(r) dot_q6_K_avx2_R(nb, w, xq, xs, r, out)

DEFINE_AVX2_DOT(dot_f16_avx2, CALL_F16)
DEFINE_AVX2_DOT(dot_bf16_avx2, CALL_BF16)
DEFINE_AVX2_DOT(dot_q8_0_avx2, CALL_Q8_0)
DEFINE_AVX2_DOT(dot_q4_0_avx2, CALL_Q4_0)
DEFINE_AVX2_DOT(dot_q4_K_avx2, CALL_Q4_K)
DEFINE_AVX2_DOT(dot_q5_K_avx2, CALL_Q5_K)
DEFINE_AVX2_DOT(dot_q6_K_avx2, CALL_Q6_K)

#define AVX2_FN(f) f
#else
#define AVX2_FN(f) NULL
#endif

/* ---- type table and dispatch --------------------------------------------- */

typedef void (*dequant_fn)(const void *src, float *dst, size_t n_blocks);
typedef void (*quant_fn)(const float *src, void *dst, size_t n_blocks);

typedef struct {
    const char *name;
    size_t block_size, block_bytes;
    int act; /* what x is turned into: F32 (used as is), Q8_0 or Q8_K */
    dequant_fn dequant;
    quant_fn quant[2]; /* by kern_isa */
    dot_fn dot[2];     /* by kern_isa; NULL: not a weight type (or F32: kern_matmul_f32) */
} type_traits;

static const type_traits TT_F32 = {
    "F32", 1, 4, KERN_TYPE_F32, dequant_f32, {quant_f32, quant_f32}, {NULL, NULL}};
static const type_traits TT_F16 = {"F16",
                                   1,
                                   2,
                                   KERN_TYPE_F32,
                                   dequant_f16,
                                   {quant_f16, quant_f16},
                                   {dot_f16_scalar, AVX2_FN(dot_f16_avx2)}};
static const type_traits TT_BF16 = {"BF16",
                                    1,
                                    2,
                                    KERN_TYPE_F32,
                                    dequant_bf16,
                                    {quant_bf16, quant_bf16},
                                    {dot_bf16_scalar, AVX2_FN(dot_bf16_avx2)}};
static const type_traits TT_Q8_0 = {"Q8_0",
                                    KERN_QK,
                                    sizeof(kern_block_q8_0),
                                    KERN_TYPE_Q8_0,
                                    dequant_q8_0,
                                    {quant_q8_0, AVX2_FN(quant_q8_0_avx2)},
                                    {dot_q8_0_scalar, AVX2_FN(dot_q8_0_avx2)}};
static const type_traits TT_Q4_0 = {"Q4_0",
                                    KERN_QK,
                                    sizeof(kern_block_q4_0),
                                    KERN_TYPE_Q8_0,
                                    dequant_q4_0,
                                    {quant_q4_0, quant_q4_0},
                                    {dot_q4_0_scalar, AVX2_FN(dot_q4_0_avx2)}};
static const type_traits TT_Q4_K = {"Q4_K",
                                    KERN_QK_K,
                                    sizeof(kern_block_q4_K),
                                    KERN_TYPE_Q8_K,
                                    dequant_q4_K,
                                    {quant_q4_K, quant_q4_K},
                                    {dot_q4_K_scalar, AVX2_FN(dot_q4_K_avx2)}};
static const type_traits TT_Q5_K = {"Q5_K",
                                    KERN_QK_K,
                                    sizeof(kern_block_q5_K),
                                    KERN_TYPE_Q8_K,
                                    dequant_q5_K,
                                    {quant_q5_K, quant_q5_K},
                                    {dot_q5_K_scalar, AVX2_FN(dot_q5_K_avx2)}};
static const type_traits TT_Q6_K = {"Q6_K",
                                    KERN_QK_K,
                                    sizeof(kern_block_q6_K),
                                    KERN_TYPE_Q8_K,
                                    dequant_q6_K,
                                    {quant_q6_K, quant_q6_K},
                                    {dot_q6_K_scalar, AVX2_FN(dot_q6_K_avx2)}};
static const type_traits TT_Q8_K = {
    "Q8_K",        KERN_QK_K,    sizeof(kern_block_q8_K),
    KERN_TYPE_F32, dequant_q8_K, {quant_q8_K, AVX2_FN(quant_q8_K_avx2)},
    {NULL, NULL}};

static const type_traits *traits(int type)
{
    switch (type) {
    case KERN_TYPE_F32:
        return &TT_F32;
    case KERN_TYPE_F16:
        return &TT_F16;
    case KERN_TYPE_BF16:
        return &TT_BF16;
    case KERN_TYPE_Q8_0:
        return &TT_Q8_0;
    case KERN_TYPE_Q4_0:
        return &TT_Q4_0;
    case KERN_TYPE_Q4_K:
        return &TT_Q4_K;
    case KERN_TYPE_Q5_K:
        return &TT_Q5_K;
    case KERN_TYPE_Q6_K:
        return &TT_Q6_K;
    case KERN_TYPE_Q8_K:
        return &TT_Q8_K;
    default:
        return NULL;
    }
}

static pthread_once_t isa_once = PTHREAD_ONCE_INIT;
static kern_isa isa_detected = KERN_ISA_SCALAR;
static kern_isa isa_current = KERN_ISA_SCALAR;

static void isa_detect(void)
{
#if HAVE_X86
    /* F16C is CPUID.1:ECX bit 29 (not every compiler's __builtin_cpu_supports knows it);
     * __builtin_cpu_supports also checks that the OS saves the AVX state. */
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)))
        isa_detected = KERN_ISA_AVX2;
#endif
    isa_current = isa_detected;
}

kern_isa kern_quant_isa_detected(void)
{
    pthread_once(&isa_once, isa_detect);
    return isa_detected;
}

kern_isa kern_quant_isa(void)
{
    pthread_once(&isa_once, isa_detect);
    return isa_current;
}

kern_isa kern_quant_set_isa(kern_isa isa)
{
    pthread_once(&isa_once, isa_detect);
    isa_current =
        isa > isa_detected ? isa_detected : (isa < KERN_ISA_SCALAR ? KERN_ISA_SCALAR : isa);
    return isa_current;
}

static quant_fn quant_for(const type_traits *t, kern_isa isa)
{
    return t->quant[isa] ? t->quant[isa] : t->quant[KERN_ISA_SCALAR];
}

/* ---- public: types and rows ------------------------------------------------ */

const char *kern_quant_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "ok";
    case KERN_QE_ARG:
        return "invalid size, stride or pointer";
    case KERN_QE_TYPE:
        return "unsupported tensor type";
    case KERN_QE_NOMEM:
        return "out of memory";
    default:
        return "unknown error";
    }
}

const char *kern_type_name(int type)
{
    const type_traits *t = traits(type);
    return t ? t->name : "unknown";
}

size_t kern_type_block_size(int type)
{
    const type_traits *t = traits(type);
    return t ? t->block_size : 0;
}

size_t kern_type_block_bytes(int type)
{
    const type_traits *t = traits(type);
    return t ? t->block_bytes : 0;
}

size_t kern_row_bytes(int type, int64_t n)
{
    const type_traits *t = traits(type);
    if (!t || n <= 0 || (uint64_t)n % t->block_size != 0)
        return 0;
    const uint64_t nb = (uint64_t)n / t->block_size;
    if (nb > SIZE_MAX / t->block_bytes)
        return 0;
    return (size_t)nb * t->block_bytes;
}

int kern_type_is_weight(int type)
{
    const type_traits *t = traits(type);
    return t && (type == KERN_TYPE_F32 || t->dot[KERN_ISA_SCALAR] != NULL);
}

int kern_dequant_row(int type, const void *src, float *dst, size_t n)
{
    const type_traits *t = traits(type);
    if (!t)
        return KERN_QE_TYPE;
    if (n % t->block_size != 0 || (n && (!src || !dst)))
        return KERN_QE_ARG;
    t->dequant(src, dst, n / t->block_size);
    return 0;
}

int kern_quant_row(int type, const float *src, void *dst, size_t n)
{
    const type_traits *t = traits(type);
    if (!t)
        return KERN_QE_TYPE;
    if (n % t->block_size != 0 || (n && (!src || !dst)))
        return KERN_QE_ARG;
    quant_for(t, kern_quant_isa())(src, dst, n / t->block_size);
    return 0;
}

/* ---- activation scratch (per calling thread) --------------------------- */

typedef struct {
    void *buf[2]; /* 0: prepared activations, 1: dequantized weight rows */
    size_t cap[2];
} scratch;

static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static pthread_key_t scratch_key;

static void scratch_destroy(void *p)
{
    scratch *s = p;
    if (s) {
        free(s->buf[0]);
        free(s->buf[1]);
    }
    free(s);
}

static void scratch_key_init(void)
{
    pthread_key_create(&scratch_key, scratch_destroy);
}

static void *scratch_slot(int slot, size_t n)
{
    pthread_once(&scratch_once, scratch_key_init);
    scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s || pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->cap[slot] < n) {
        const size_t cap = (n + 63) / 64 * 64;
        void *b = aligned_alloc(64, cap);
        if (!b)
            return NULL;
        free(s->buf[slot]);
        s->buf[slot] = b;
        s->cap[slot] = cap;
    }
    return s->buf[slot];
}

static void *scratch_get(size_t n)
{
    return scratch_slot(0, n);
}

void kern_quant_scratch_free(void)
{
    pthread_once(&scratch_once, scratch_key_init);
    scratch_destroy(pthread_getspecific(scratch_key));
    pthread_setspecific(scratch_key, NULL);
}

/* ---- the product ---------------------------------------------------------- */

/* Bytes of one prepared activation row for `act` (Q8_0 rows carry their f32
 * scales too); 0 when K does not divide into blocks. */
static size_t act_row_bytes(int act, int K)
{
    const size_t blocks = kern_row_bytes(act, K);
    if (act != KERN_TYPE_Q8_0 || blocks == 0)
        return blocks;
    const size_t nb = (size_t)K / KERN_QK;
    return act_q8_0_scales_offset(nb) + nb * sizeof(float);
}

typedef struct {
    quant_fn quant;
    int act;
    const float *x;
    int ldx, nb;
    char *xq;
    size_t xq_stride;
    int rows_per_task, M;
} act_job;

static void act_task(void *ctx, int t, int n_tasks)
{
    const act_job *j = ctx;
    const int m0 = t * j->rows_per_task;
    const int m1 = m0 + j->rows_per_task < j->M ? m0 + j->rows_per_task : j->M;
    for (int m = m0; m < m1; m++) {
        char *row = j->xq + (size_t)m * j->xq_stride;
        j->quant(j->x + (size_t)m * (size_t)j->ldx, row, (size_t)j->nb);
        if (j->act == KERN_TYPE_Q8_0) {
            const kern_block_q8_0 *b = (const kern_block_q8_0 *)row;
            float *d = (float *)(row + act_q8_0_scales_offset((size_t)j->nb));
            for (int i = 0; i < j->nb; i++)
                d[i] = f16(b[i].d);
        }
    }
}

typedef struct {
    dot_fn dot;
    float *y;
    int ldy;
    const char *xq;
    size_t xq_stride;
    const char *w;
    size_t w_stride;
    int M, N, nb, rows_per_task;
} mm_job;

/* One task: weight rows [r0, r1) against every row of x. Rows of x are taken
 * BLOCK_M at a time (kept in L2) and TILE_M at a time per dot call (each
 * weight block unpacked once per tile). */
static void mm_task(void *ctx, int t, int n_tasks)
{
    const mm_job *j = ctx;
    const int r0 = t * j->rows_per_task;
    const int r1 = r0 + j->rows_per_task < j->N ? r0 + j->rows_per_task : j->N;
    float out[TILE_M];
    for (int m0 = 0; m0 < j->M; m0 += BLOCK_M) {
        const int m1 = m0 + BLOCK_M < j->M ? m0 + BLOCK_M : j->M;
        for (int n = r0; n < r1; n++) {
            const char *wr = j->w + (size_t)n * j->w_stride;
            for (int m = m0; m < m1; m += TILE_M) {
                const int R = m1 - m < TILE_M ? m1 - m : TILE_M;
                j->dot(j->nb, wr, j->xq + (size_t)m * j->xq_stride, j->xq_stride, R, out);
                for (int r = 0; r < R; r++)
                    j->y[(size_t)(m + r) * (size_t)j->ldy + (size_t)n] = out[r];
            }
        }
    }
}

static int check_args(const type_traits *t, const float *y, int ldy, const float *x, int ldx,
                      const void *w, int M, int N, int K)
{
    if (M < 0 || N < 0 || K < 0)
        return KERN_QE_ARG;
    if (M == 0 || N == 0 || K == 0)
        return 0;
    if (!y || !x || !w || ((uintptr_t)w & 1) != 0 || (size_t)K % t->block_size != 0 || ldx < K ||
        (M > 1 && ldy < N))
        return KERN_QE_ARG;
    return 0;
}

/* From this many rows of x (a prefill chunk) the product is compute-bound:
 * weight rows are dequantized to f32, a tile at a time, and multiplied by
 * OpenBLAS's sgemm, which runs near the machine's peak, while the fused dot
 * kernels (built to stream weights for a few rows) do not. The tile keeps
 * the scratch bounded for any matrix. */
#define DEQ_GEMM_MIN_M 64
#define DEQ_TILE_FLOATS (1 << 20)

typedef struct {
    dequant_fn dequant;
    const char *w;
    size_t w_stride;
    float *out;
    int K, nb, n, rows_per_task;
} deq_job;

static void deq_task(void *ctx, int t, int n_tasks)
{
    (void)n_tasks;
    const deq_job *j = ctx;
    const int r0 = t * j->rows_per_task;
    const int r1 = r0 + j->rows_per_task < j->n ? r0 + j->rows_per_task : j->n;
    for (int r = r0; r < r1; r++)
        j->dequant(j->w + (size_t)r * j->w_stride, j->out + (size_t)r * (size_t)j->K,
                   (size_t)j->nb);
}

static int matmul_dequant_gemm(kern_pool *pool, const type_traits *t, float *y, int ldy,
                               const float *x, int ldx, const char *w, int M, int N, int K)
{
    int tile = DEQ_TILE_FLOATS / K / 16 * 16;
    tile = tile < 16 ? 16 : tile > N ? N : tile;
    float *wf = scratch_slot(1, sizeof(float) * (size_t)tile * (size_t)K);
    if (!wf)
        return KERN_QE_NOMEM;
    const int threads = kern_pool_size(pool);
    const size_t nb = (size_t)K / t->block_size, w_stride = nb * t->block_bytes;
    for (int n0 = 0; n0 < N; n0 += tile) {
        const int n = N - n0 < tile ? N - n0 : tile;
        deq_job j = {.dequant = t->dequant,
                     .w = w + (size_t)n0 * w_stride,
                     .w_stride = w_stride,
                     .out = wf,
                     .K = K,
                     .nb = (int)nb,
                     .n = n,
                     .rows_per_task = (n + threads * 2 - 1) / (threads * 2)};
        kern_pool_run(pool, deq_task, &j, (n + j.rows_per_task - 1) / j.rows_per_task);
        kern_matmul_f32(pool, y + n0, ldy, x, ldx, wf, M, n, K);
    }
    return 0;
}

int kern_matmul_q(kern_pool *pool, int type, float *y, int ldy, const float *x, int ldx,
                  const void *w, int M, int N, int K)
{
    const type_traits *t = traits(type);
    if (!t || !kern_type_is_weight(type))
        return KERN_QE_TYPE;
    int rc = check_args(t, y, ldy, x, ldx, w, M, N, K);
    if (rc != 0 || M == 0 || N == 0 || K == 0)
        return rc;
    if (type == KERN_TYPE_F32) {
        kern_matmul_f32(pool, y, ldy, x, ldx, w, M, N, K);
        return 0;
    }
    if (M >= DEQ_GEMM_MIN_M && t->dequant)
        return matmul_dequant_gemm(pool, t, y, ldy, x, ldx, w, M, N, K);
    const kern_isa isa = kern_quant_isa();
    const int threads = kern_pool_size(pool);
    mm_job j = {.dot = t->dot[isa] ? t->dot[isa] : t->dot[KERN_ISA_SCALAR],
                .y = y,
                .ldy = ldy,
                .w = w,
                .w_stride = kern_row_bytes(type, K),
                .M = M,
                .N = N,
                .nb = (int)((size_t)K / t->block_size)};
    if (t->act == KERN_TYPE_F32) {
        j.xq = (const char *)x;
        j.xq_stride = (size_t)ldx * sizeof(float);
    } else {
        const type_traits *a = traits(t->act);
        j.xq_stride = act_row_bytes(t->act, K);
        if (j.xq_stride == 0 || (size_t)M > SIZE_MAX / j.xq_stride)
            return KERN_QE_ARG;
        char *xq = scratch_get((size_t)M * j.xq_stride);
        if (!xq)
            return KERN_QE_NOMEM;
        act_job aj = {.quant = quant_for(a, isa),
                      .act = t->act,
                      .x = x,
                      .ldx = ldx,
                      .nb = (int)((size_t)K / a->block_size),
                      .xq = xq,
                      .xq_stride = j.xq_stride,
                      .rows_per_task = M,
                      .M = M};
        int n_act = 1;
        if ((double)M * K >= PARALLEL_MIN_MACS && threads > 1 && M > 1) {
            aj.rows_per_task = (M + threads * 2 - 1) / (threads * 2);
            n_act = (M + aj.rows_per_task - 1) / aj.rows_per_task;
        }
        kern_pool_run(pool, act_task, &aj, n_act);
        j.xq = xq;
    }
    j.rows_per_task = N;
    int n_tasks = 1;
    if ((double)M * N * K >= PARALLEL_MIN_MACS && threads > 1) {
        /* A few tasks per thread balances uneven progress; for M > 1 chunks of
         * ROWS_PER_TASK_MIN rows keep a task's weights in L1/L2. */
        j.rows_per_task = M == 1 ? (N + threads * 4 - 1) / (threads * 4) : ROWS_PER_TASK_MIN;
        if (j.rows_per_task < ROWS_PER_TASK_MIN)
            j.rows_per_task = ROWS_PER_TASK_MIN;
        n_tasks = (N + j.rows_per_task - 1) / j.rows_per_task;
    }
    kern_pool_run(pool, mm_task, &j, n_tasks);
    return 0;
}

/* ---- the reference --------------------------------------------------------- */

int kern_matmul_q_ref(int type, float *y, int ldy, const float *x, int ldx, const void *w, int M,
                      int N, int K)
{
    const type_traits *t = traits(type);
    if (!t || !kern_type_is_weight(type))
        return KERN_QE_TYPE;
    int rc = check_args(t, y, ldy, x, ldx, w, M, N, K);
    if (rc != 0 || M == 0 || N == 0 || K == 0)
        return rc;
    /* Chunks of one block (256 elements for the per-element types). */
    const size_t chunk = t->block_size > 1 ? t->block_size : KERN_QK_K;
    const size_t row_bytes = kern_row_bytes(type, K);
    const type_traits *a = traits(t->act);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            const float *xr = x + (size_t)m * (size_t)ldx;
            const uint8_t *wr = (const uint8_t *)w + (size_t)n * row_bytes;
            double s = 0.0;
            for (size_t k0 = 0; k0 < (size_t)K; k0 += chunk) {
                const size_t c = (size_t)K - k0 < chunk ? (size_t)K - k0 : chunk;
                float wf[KERN_QK_K], xf[KERN_QK_K];
                _Alignas(16) uint8_t xb[sizeof(kern_block_q8_K)];
                t->dequant(wr + k0 / t->block_size * t->block_bytes, wf, c / t->block_size);
                if (t->act == KERN_TYPE_F32) {
                    memcpy(xf, xr + k0, c * sizeof(float));
                } else {
                    a->quant[KERN_ISA_SCALAR](xr + k0, xb, 1);
                    a->dequant(xb, xf, 1);
                }
                for (size_t i = 0; i < c; i++)
                    s += (double)wf[i] * (double)xf[i];
            }
            y[(size_t)m * (size_t)ldy + (size_t)n] = (float)s;
        }
    return 0;
}
