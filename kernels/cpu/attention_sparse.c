/*
 * attention_sparse.c - block-sparse causal attention on the CPU (the kernel that
 * FlexPrefill and PowerAttention run), its masked double reference, the block
 * mask helpers, and the probe-row attention profiles FlexPrefill selects from.
 *
 * Layout of the fast kernel. A task is (kv head, chunk of up to HEADS_PER_TILE
 * query heads of its group, group of consecutive query blocks); tasks run head
 * by head so that the two threads read the same K/V. A task walks its query
 * blocks in streams: one head's sub-tile of TILE_ROWS positions, with its
 * queries transposed (qt[d][row], pre-scaled), its output accumulator
 * transposed (ot[d][row]) and a running max m and sum l per row, so all softmax
 * arithmetic is vectorized across rows. Up to MAX_STREAMS streams share each
 * key tile: its K/V rows (found through the page table) are copied once into
 * contiguous buffers (head dims up to 164), where the micro-kernels broadcast
 * single elements from L1 (cache rows kv_stride apart would compete for a few
 * L1 sets). The key blocks of a group are the union of its streams' mask rows,
 * visited in ascending order; each tile of up to TILE_KEYS keys is computed
 * only for the streams whose own row holds its block, and only up to the
 * stream's last position, so a diagonal tile costs its unmasked part.
 *
 * Numerics: scores, softmax and accumulators in fp32; the queries carry
 * log2(e) / sqrt(D), so scores are in base 2 and the softmax takes 2^x (the
 * same weights, a cheaper exponential). For each (row, key) the dot product
 * runs over d in order and each output element accumulates keys in order,
 * whatever the tile composition, so a row's result does not depend on which
 * other rows share its streams (decode equals prefill bit for bit).
 *
 * Invariants: every mask row holds its diagonal block and nothing above it, and
 * the first key of the diagonal block is <= every row position of the block, so
 * a row has seen at least one unmasked key before any fully masked tile and its
 * l is > 0 at the end.
 */
#include "kernels/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#if !defined(__AVX__) && defined(__GNUC__) && !defined(__clang__)
/* 32-byte vectors only pass between static functions of this file, which agree
 * on their ABI; without AVX GCC would warn about the psABI of every one. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define TILE_ROWS 16             /* positions per sub-tile = rows per head = 2 vectors */
#define TILE_KEYS 64             /* keys per tile */
#define HEADS_PER_TILE 4         /* query heads sharing a sub-tile's K/V reads */
#define MAX_STREAMS 16           /* (head, sub-tile) pairs sharing a loaded K/V tile */
#define ARENA_FLOATS (41 * 1024) /* a task's streams and K/V tile: 164 KB of stack */
#define HD_MAX KERN_ATTN_MAX_HEAD_DIM
#define PROBE_MAX KERN_PROBE_MAX_ROWS

/* ---- vector helpers (GCC/Clang vector extensions; FMA when the target has it) ---- */

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 v8_set1(float x)
{
    return (v8){x, x, x, x, x, x, x, x};
}
static inline v8i v8i_set1(int32_t x)
{
    return (v8i){x, x, x, x, x, x, x, x};
}
/* Aligned access to the kernel's own 32-byte aligned tiles. */
static inline v8 v8_ld(const float *p)
{
    return *(const v8 *)(const void *)p;
}
static inline void v8_st(float *p, v8 x)
{
    *(v8 *)(void *)p = x;
}
/* Unaligned access (caller arrays). */
static inline v8 v8_ldu(const float *p)
{
    v8 x;
    memcpy(&x, p, sizeof x);
    return x;
}
static inline void v8_stu(float *p, v8 x)
{
    memcpy(p, &x, sizeof x);
}

static inline v8 v8_fma(v8 a, v8 b, v8 c)
{
#if defined(__FMA__)
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline v8 v8_select(v8i mask, v8 a, v8 b)
{
    return (v8)(((v8i)a & mask) | ((v8i)b & ~mask));
}

/* a > b ? a : b lane by lane, which is exactly what MAXPS computes. */
static inline v8 v8_max(v8 a, v8 b)
{
#if defined(__AVX__)
    return (v8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return v8_select(a > b, a, b);
#endif
}

static inline float v8_hsum(v8 x)
{
    float s = 0.0f;
    for (int i = 0; i < 8; i++)
        s += x[i];
    return s;
}

#if defined(__AVX__)
/* r[i] becomes column i of the 8 x 8 matrix whose rows are r[0..8). */
static inline void v8_transpose(v8 r[8])
{
    const __m256 t0 = _mm256_unpacklo_ps((__m256)r[0], (__m256)r[1]);
    const __m256 t1 = _mm256_unpackhi_ps((__m256)r[0], (__m256)r[1]);
    const __m256 t2 = _mm256_unpacklo_ps((__m256)r[2], (__m256)r[3]);
    const __m256 t3 = _mm256_unpackhi_ps((__m256)r[2], (__m256)r[3]);
    const __m256 t4 = _mm256_unpacklo_ps((__m256)r[4], (__m256)r[5]);
    const __m256 t5 = _mm256_unpackhi_ps((__m256)r[4], (__m256)r[5]);
    const __m256 t6 = _mm256_unpacklo_ps((__m256)r[6], (__m256)r[7]);
    const __m256 t7 = _mm256_unpackhi_ps((__m256)r[6], (__m256)r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = (v8)_mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = (v8)_mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = (v8)_mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = (v8)_mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = (v8)_mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = (v8)_mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = (v8)_mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = (v8)_mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

/* exp(x) for x <= 0 (softmax arguments): Cody-Waite reduction to r in
 * [-ln2/2, ln2/2] and a degree-6 polynomial, about 2 ulp; 0 below -87.3 and for
 * -inf; exp(0) is exactly 1. */
static inline v8 v8_exp(v8 x)
{
    const v8i under = x < v8_set1(-87.3f);
    x = v8_max(v8_set1(-87.3f), x);          /* -87.3f > x ? -87.3f : x, as under selects */
    const v8 shifter = v8_set1(12582912.0f); /* 1.5 * 2^23: rounds to nearest */
    const v8 n = (x * v8_set1(1.44269504f) + shifter) - shifter;
    v8 r = v8_fma(n, v8_set1(-0.693145752f), x);
    r = v8_fma(n, v8_set1(-1.42860677e-6f), r);
    v8 p = v8_set1(1.0f / 720.0f);
    p = v8_fma(p, r, v8_set1(1.0f / 120.0f));
    p = v8_fma(p, r, v8_set1(1.0f / 24.0f));
    p = v8_fma(p, r, v8_set1(1.0f / 6.0f));
    p = v8_fma(p, r, v8_set1(0.5f));
    p = v8_fma(p, r, v8_set1(1.0f));
    p = v8_fma(p, r, v8_set1(1.0f));
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return (v8)((v8i)(p * (v8)e) & ~under);
}

/* 2^x for x <= 0, the kernel's softmax in base 2 (scores carry log2(e)):
 * x = n + r with n = round(x) and r = x - n in [-1/2, 1/2] exactly (no
 * reduction constant to round), 2^r by a degree-6 polynomial with constant
 * term 1, fitted here for the least largest relative error on [-1/2, 1/2]
 * (8e-8 evaluated in f32, about 1.3 ulp), 2^n as exponent bits, taken straight
 * from the integer bits of x + 1.5 * 2^23 (n + 0x4B400000, whose high bits the
 * shift drops). x is clamped to -127, whose exponent field 0 makes the result
 * exactly 0: so are 2^x below about -126.5 and -inf (masked keys); 2^0 is
 * exactly 1; NaN stays NaN. */
static inline v8 v8_exp2(v8 x)
{
    x = v8_max(v8_set1(-127.0f), x);
    const v8 t = x + v8_set1(12582912.0f); /* 1.5 * 2^23: rounds to nearest */
    const v8 n = t - v8_set1(12582912.0f);
    const v8 r = x - n;
    v8 p = v8_set1(1.535336203e-4f);
    p = v8_fma(p, r, v8_set1(1.339887465e-3f));
    p = v8_fma(p, r, v8_set1(9.618437359e-3f));
    p = v8_fma(p, r, v8_set1(5.550332471e-2f));
    p = v8_fma(p, r, v8_set1(2.402264791e-1f));
    p = v8_fma(p, r, v8_set1(6.931472029e-1f));
    p = v8_fma(p, r, v8_set1(1.0f));
    return p * (v8)(((v8i)t + 127) << 23);
}

/* ---- micro-kernels on 16-row tiles ---- */

/* st[j][0..16) = sum_d kp[j][d] * qt[d][0..16) for j < nk; mx[0] and mx[1]
 * get the largest score of rows 0..7 and 8..15 (-inf when nk is 0). */
static void qk_tile(float *restrict st, const float *restrict qt, const float *const *kp, int nk,
                    int hd, v8 mx[2])
{
    v8 m0 = v8_set1(-INFINITY), m1 = m0;
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        const float *k0 = kp[j], *k1 = kp[j + 1], *k2 = kp[j + 2], *k3 = kp[j + 3];
        v8 a0 = {0}, b0 = {0}, a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
        for (int d = 0; d < hd; d++) {
            const v8 q0 = v8_ld(qt + 16 * d), q1 = v8_ld(qt + 16 * d + 8);
            v8 x = v8_set1(k0[d]);
            a0 = v8_fma(x, q0, a0);
            b0 = v8_fma(x, q1, b0);
            x = v8_set1(k1[d]);
            a1 = v8_fma(x, q0, a1);
            b1 = v8_fma(x, q1, b1);
            x = v8_set1(k2[d]);
            a2 = v8_fma(x, q0, a2);
            b2 = v8_fma(x, q1, b2);
            x = v8_set1(k3[d]);
            a3 = v8_fma(x, q0, a3);
            b3 = v8_fma(x, q1, b3);
        }
        float *s = st + 16 * j;
        v8_st(s, a0);
        v8_st(s + 8, b0);
        v8_st(s + 16, a1);
        v8_st(s + 24, b1);
        v8_st(s + 32, a2);
        v8_st(s + 40, b2);
        v8_st(s + 48, a3);
        v8_st(s + 56, b3);
        m0 = v8_max(v8_max(m0, a0), v8_max(a1, v8_max(a2, a3)));
        m1 = v8_max(v8_max(m1, b0), v8_max(b1, v8_max(b2, b3)));
    }
    for (; j < nk; j++) {
        const float *k0 = kp[j];
        v8 a0 = {0}, b0 = {0};
        for (int d = 0; d < hd; d++) {
            const v8 x = v8_set1(k0[d]);
            a0 = v8_fma(x, v8_ld(qt + 16 * d), a0);
            b0 = v8_fma(x, v8_ld(qt + 16 * d + 8), b0);
        }
        v8_st(st + 16 * j, a0);
        v8_st(st + 16 * j + 8, b0);
        m0 = v8_max(m0, a0);
        m1 = v8_max(m1, b0);
    }
    mx[0] = m0;
    mx[1] = m1;
}

/* Scores of key k0 + j where key > row position become -inf. */
static void mask_tile(float *st, int nk, int k0, const v8i pos[2])
{
    const v8 ninf = v8_set1(-INFINITY);
    for (int j = 0; j < nk; j++) {
        const v8i key = v8i_set1(k0 + j);
        for (int h = 0; h < 2; h++)
            v8_st(st + 16 * j + 8 * h, v8_select(key > pos[h], ninf, v8_ld(st + 16 * j + 8 * h)));
    }
}

/* The largest score of rows 0..7 and 8..15 of a tile. */
static void max_tile(const float *st, int nk, v8 mx[2])
{
    for (int h = 0; h < 2; h++) {
        v8 mt = v8_set1(-INFINITY);
        for (int j = 0; j < nk; j++)
            mt = v8_max(mt, v8_ld(st + 16 * j + 8 * h));
        mx[h] = mt;
    }
}

/* Online softmax step, given the tile's largest scores mx: turns st's scores
 * into 2^(s - m_new), rescales l and returns in corr the factor the
 * accumulator must be rescaled by. */
static void softmax_tile(float *st, int nk, const v8 mx[2], v8 m[2], v8 l[2], v8 corr[2])
{
    for (int h = 0; h < 2; h++) {
        const v8 m_new = v8_max(m[h], mx[h]);
        const v8 m_use = v8_select(m_new == v8_set1(-INFINITY), v8_set1(0.0f), m_new);
        corr[h] = v8_exp2(m[h] - m_use);
        v8 sum = {0};
        for (int j = 0; j < nk; j++) {
            const v8 p = v8_exp2(v8_ld(st + 16 * j + 8 * h) - m_use);
            v8_st(st + 16 * j + 8 * h, p);
            sum += p;
        }
        l[h] = l[h] * corr[h] + sum;
        m[h] = m_new;
    }
}

/* ot[d][0..16) = ot[d][0..16) * corr + sum_j vp[j][d] * pt[j][0..16) for d < hd
 * (corr[0] for rows 0..7, corr[1] for rows 8..15): the online softmax's
 * rescale, rounded exactly as a separate pass would, folded into the load. */
static void pv_tile(float *restrict ot, const float *restrict pt, const float *const *vp, int nk,
                    int hd, const v8 corr[2])
{
    const v8 c0 = corr[0], c1 = corr[1];
    int d = 0;
    for (; d + 4 <= hd; d += 4) {
        float *o = ot + 16 * d;
        v8 a0 = v8_ld(o) * c0, b0 = v8_ld(o + 8) * c1, a1 = v8_ld(o + 16) * c0;
        v8 b1 = v8_ld(o + 24) * c1, a2 = v8_ld(o + 32) * c0, b2 = v8_ld(o + 40) * c1;
        v8 a3 = v8_ld(o + 48) * c0, b3 = v8_ld(o + 56) * c1;
        for (int j = 0; j < nk; j++) {
            const v8 p0 = v8_ld(pt + 16 * j), p1 = v8_ld(pt + 16 * j + 8);
            const float *v = vp[j] + d;
            v8 x = v8_set1(v[0]);
            a0 = v8_fma(x, p0, a0);
            b0 = v8_fma(x, p1, b0);
            x = v8_set1(v[1]);
            a1 = v8_fma(x, p0, a1);
            b1 = v8_fma(x, p1, b1);
            x = v8_set1(v[2]);
            a2 = v8_fma(x, p0, a2);
            b2 = v8_fma(x, p1, b2);
            x = v8_set1(v[3]);
            a3 = v8_fma(x, p0, a3);
            b3 = v8_fma(x, p1, b3);
        }
        v8_st(o, a0);
        v8_st(o + 8, b0);
        v8_st(o + 16, a1);
        v8_st(o + 24, b1);
        v8_st(o + 32, a2);
        v8_st(o + 40, b2);
        v8_st(o + 48, a3);
        v8_st(o + 56, b3);
    }
    for (; d < hd; d++) {
        float *o = ot + 16 * d;
        v8 a0 = v8_ld(o) * c0, b0 = v8_ld(o + 8) * c1;
        for (int j = 0; j < nk; j++) {
            const v8 x = v8_set1(vp[j][d]);
            a0 = v8_fma(x, v8_ld(pt + 16 * j), a0);
            b0 = v8_fma(x, v8_ld(pt + 16 * j + 8), b0);
        }
        v8_st(o, a0);
        v8_st(o + 8, b0);
    }
}

/* ---- argument checks ---- */

static int check_attn_args(const kern_attn_args *a)
{
    if (!a || !a->q || !a->k || !a->v || !a->out)
        return KERN_SPARSE_EINVAL;
    if (a->n_q < 1 || a->ctx_len < a->n_q || a->n_heads < 1 || a->n_kv_heads < 1 ||
        a->n_heads % a->n_kv_heads != 0 || a->head_dim < 1 || a->head_dim > HD_MAX)
        return KERN_SPARSE_EINVAL;
    if ((long)a->n_kv_heads * a->head_dim > a->kv_stride)
        return KERN_SPARSE_EINVAL;
    if (a->blocks && a->block_size < 1)
        return KERN_SPARSE_EINVAL;
    return KERN_SPARSE_OK;
}

/* ---- block masks ---- */

static int ceil_div(int a, int b)
{
    return (int)(((long)a + b - 1) / b);
}

size_t kern_block_mask_words(int block_size, int n_lists, int ctx_len, int n_q)
{
    if (block_size < 1 || n_lists < 1 || n_q < 1 || ctx_len < n_q)
        return 0;
    const int nb = ceil_div(ctx_len, block_size);
    const int qb0 = (ctx_len - n_q) / block_size;
    const size_t words = (size_t)(nb + 63) / 64;
    return (size_t)n_lists * (size_t)(nb - qb0) * words;
}

int kern_block_mask_init(kern_block_mask *m, uint64_t *bits, size_t n_words, int block_size,
                         int n_lists, int ctx_len, int n_q)
{
    const size_t need = kern_block_mask_words(block_size, n_lists, ctx_len, n_q);
    if (!m || !bits || need == 0)
        return KERN_SPARSE_EINVAL;
    if (n_words < need)
        return KERN_SPARSE_ENOSPC;
    const int nb = ceil_div(ctx_len, block_size);
    m->block_size = block_size;
    m->n_lists = n_lists;
    m->ctx_len = ctx_len;
    m->n_q = n_q;
    m->q_block0 = (ctx_len - n_q) / block_size;
    m->n_qblocks = nb - m->q_block0;
    m->words = (nb + 63) / 64;
    m->bits = bits;
    memset(bits, 0, sizeof(uint64_t) * need);
    return KERN_SPARSE_OK;
}

/* Bits 0..c of a row (the causal blocks of query block c). */
static void set_prefix(uint64_t *row, int words, int c)
{
    for (int w = 0; w < words; w++) {
        const int lo = 64 * w;
        if (c >= lo + 63)
            row[w] = ~(uint64_t)0;
        else if (c >= lo)
            row[w] = ((uint64_t)2 << (c - lo)) - 1;
        else
            row[w] = 0;
    }
}

void kern_block_mask_fill_causal(kern_block_mask *m)
{
    for (int l = 0; l < m->n_lists; l++)
        for (int i = 0; i < m->n_qblocks; i++)
            set_prefix(kern_block_mask_row(m, l, m->q_block0 + i), m->words, m->q_block0 + i);
}

void kern_block_mask_stats(const kern_block_mask *m, int n_heads, kern_sparse_stats *st)
{
    int64_t set = 0, causal = 0;
    for (int l = 0; l < m->n_lists; l++)
        for (int i = 0; i < m->n_qblocks; i++) {
            const uint64_t *row = kern_block_mask_row(m, l, m->q_block0 + i);
            for (int w = 0; w < m->words; w++)
                set += __builtin_popcountll(row[w]);
        }
    for (int i = 0; i < m->n_qblocks; i++)
        causal += m->q_block0 + i + 1;
    st->computed = set * (n_heads / m->n_lists);
    st->causal = causal * n_heads;
}

double kern_sparse_density(const kern_sparse_stats *st)
{
    return st->causal > 0 ? (double)st->computed / (double)st->causal : 1.0;
}

/* The mask describes a's shape, and every row has its diagonal and nothing above. */
static int check_mask(const kern_block_mask *m, const kern_attn_args *a)
{
    if (!m || !m->bits || m->block_size < 1 || m->n_lists < 1 || a->n_heads % m->n_lists != 0)
        return KERN_SPARSE_EINVAL;
    const int nb = ceil_div(a->ctx_len, m->block_size);
    if (m->ctx_len != a->ctx_len || m->n_q != a->n_q ||
        m->q_block0 != (a->ctx_len - a->n_q) / m->block_size || m->n_qblocks != nb - m->q_block0 ||
        m->words != (nb + 63) / 64)
        return KERN_SPARSE_EINVAL;
    for (int l = 0; l < m->n_lists; l++)
        for (int i = 0; i < m->n_qblocks; i++) {
            const int r = m->q_block0 + i;
            const uint64_t *row = kern_block_mask_row(m, l, r);
            if (!((row[r / 64] >> (r % 64)) & 1u))
                return KERN_SPARSE_EINVAL;
            const uint64_t above = (r % 64 == 63) ? 0 : ~(((uint64_t)2 << (r % 64)) - 1);
            if (row[r / 64] & above)
                return KERN_SPARSE_EINVAL;
            for (int w = r / 64 + 1; w < m->words; w++)
                if (row[w])
                    return KERN_SPARSE_EINVAL;
        }
    return KERN_SPARSE_OK;
}

/* ---- the block-sparse kernel ---- */

_Static_assert(MAX_STREAMS >= HEADS_PER_TILE &&
                   ARENA_FLOATS >= (size_t)HEADS_PER_TILE * 2 * TILE_ROWS * HD_MAX,
               "the arena holds the state of every head of a task");

typedef struct {
    const kern_attn_args *a;
    const kern_block_mask *m;
    int group;       /* query heads per kv head */
    int head_chunks; /* ceil(group / HEADS_PER_TILE) */
    int n_bgroups;   /* runs of query blocks, each filling at most a group of streams */
    float scale;     /* log2(e) / sqrt(head_dim): scores in base 2 */
} bs_job;

/* A stream: one query head's sub-tile of TILE_ROWS positions p0 .. p0+np-1,
 * with its queries (qt[d][row], pre-scaled), its accumulator (ot[d][row]) and
 * its running max and sum per row. */
typedef struct {
    int h; /* query head */
    int p0, np;
    const uint64_t *row; /* the head's mask row of the query block */
    float *qt, *ot;
    v8 m[2], l[2];
    v8i pos[2]; /* row positions; padding rows repeat the last */
} bs_stream;

/* Copies keys [k0, k0+nk) of kv head kvh into kbuf/vbuf rows of hd floats, or
 * (kbuf NULL) points straight at the cache rows. */
static void bs_load_tile(const kern_attn_args *a, int kvh, int k0, int nk, float *kbuf, float *vbuf,
                         const float **kp, const float **vp)
{
    const int hd = a->head_dim;
    const size_t kv_off = (size_t)kvh * hd;
    for (int i = 0; i < nk; i++) {
        const size_t row = kern_attn_row(a, k0 + i) * (size_t)a->kv_stride + kv_off;
        const float *k = a->k + row, *v = a->v + row;
        if (!kbuf) {
            kp[i] = k;
            vp[i] = v;
            continue;
        }
        float *kd = kbuf + (size_t)i * hd, *vd = vbuf + (size_t)i * hd;
        int d = 0;
        if (hd % 8 == 0) /* then every packed row is 32-byte aligned */
            for (; d < hd; d += 8) {
                v8_st(kd + d, v8_ldu(k + d));
                v8_st(vd + d, v8_ldu(v + d));
            }
        for (; d + 8 <= hd; d += 8) {
            v8_stu(kd + d, v8_ldu(k + d));
            v8_stu(vd + d, v8_ldu(v + d));
        }
        for (; d < hd; d++) {
            kd[d] = k[d];
            vd[d] = v[d];
        }
        kp[i] = kd;
        vp[i] = vd;
    }
}

/* Asks for keys [k0, k1) of kv head kvh to be brought into the caches. */
static void bs_prefetch_tile(const kern_attn_args *a, int kvh, int k0, int k1)
{
    const size_t kv_off = (size_t)kvh * a->head_dim, bytes = sizeof(float) * (size_t)a->head_dim;
    for (int i = k0; i < k1; i++) {
        const size_t row = kern_attn_row(a, i) * (size_t)a->kv_stride + kv_off;
        const char *k = (const char *)(a->k + row), *v = (const char *)(a->v + row);
        for (size_t b = 0; b < bytes; b += 64) {
            __builtin_prefetch(k + b, 0, 3);
            __builtin_prefetch(v + b, 0, 3);
        }
    }
}

/* Streams (all of kv head kvh) against the key blocks of the union of their
 * mask rows. Each key tile is loaded once for all the streams; a stream
 * computes only the keys up to its last position (the rest of a diagonal tile
 * is masked for all its rows, and a fully masked tile would leave m, l and ot
 * unchanged), so the result of a row does not depend on which streams share
 * the call. kbuf/vbuf: room for TILE_KEYS keys, or NULL. */
__attribute__((noinline)) static void bs_streams(const bs_job *j, int kvh, bs_stream *sm, int ns,
                                                 float *kbuf, float *vbuf)
{
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, B = j->m->block_size;
    _Alignas(32) float st[TILE_KEYS * TILE_ROWS];
    const float *kp[TILE_KEYS], *vp[TILE_KEYS];
    int pmax = 0;
    for (int s = 0; s < ns; s++)
        pmax = sm[s].p0 + sm[s].np - 1 > pmax ? sm[s].p0 + sm[s].np - 1 : pmax;
    const int rmax = pmax / B; /* the last query block; no row has a bit above it */
    for (int w = 0; w <= rmax / 64; w++) {
        uint64_t any = 0;
        for (int s = 0; s < ns; s++)
            any |= sm[s].row[w];
        while (any) {
            const int c = 64 * w + __builtin_ctzll(any);
            any &= any - 1;
            const int kend = (c + 1) * B <= pmax + 1 ? (c + 1) * B : pmax + 1;
            for (int k0 = c * B; k0 < kend; k0 += TILE_KEYS) {
                const int nk = kend - k0 < TILE_KEYS ? kend - k0 : TILE_KEYS;
                bs_load_tile(a, kvh, k0, nk, kbuf, vbuf, kp, vp);
                if (kbuf) {
                    /* The next tile of this block, or the first of the next
                     * block in this mask word: its rows are kv_stride apart,
                     * which the hardware prefetcher does not follow. */
                    int n0 = k0 + nk, n1 = kend;
                    if (n0 >= kend && any) {
                        const int c2 = 64 * w + __builtin_ctzll(any);
                        n0 = c2 * B;
                        n1 = (c2 + 1) * B <= pmax + 1 ? (c2 + 1) * B : pmax + 1;
                    }
                    if (n1 - n0 > TILE_KEYS)
                        n1 = n0 + TILE_KEYS;
                    bs_prefetch_tile(a, kvh, n0, n1);
                }
                for (int s = 0; s < ns; s++) {
                    bs_stream *x = &sm[s];
                    const int last = x->p0 + x->np - 1;
                    if (!((x->row[w] >> (c % 64)) & 1u) || k0 > last)
                        continue;
                    const int nks = last + 1 - k0 < nk ? last + 1 - k0 : nk;
                    v8 mx[2], corr[2];
                    qk_tile(st, x->qt, kp, nks, hd, mx);
                    if (k0 + nks - 1 > x->p0) {
                        mask_tile(st, nks, k0, x->pos);
                        max_tile(st, nks, mx);
                    }
                    softmax_tile(st, nks, mx, x->m, x->l, corr);
                    pv_tile(x->ot, st, vp, nks, hd, corr);
                }
            }
        }
    }
}

static void bs_stream_init(const bs_job *j, bs_stream *x, int r, int h, int p0, int np)
{
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, q_first = a->ctx_len - a->n_q;
    int32_t row_pos[TILE_ROWS];
    for (int t = 0; t < TILE_ROWS; t++)
        row_pos[t] = p0 + (t < np ? t : np - 1);
    memcpy(x->pos, row_pos, sizeof x->pos);
    x->h = h;
    x->p0 = p0;
    x->np = np;
    x->row = kern_block_mask_row(j->m, h / (a->n_heads / j->m->n_lists), r);
    int d0 = 0;
#if defined(__AVX__)
    for (; d0 + 8 <= hd; d0 += 8)
        for (int t0 = 0; t0 < TILE_ROWS; t0 += 8) {
            v8 c[8];
            for (int i = 0; i < 8; i++) {
                const size_t row = (size_t)(p0 + t0 + i - q_first);
                c[i] = t0 + i < np
                           ? v8_ldu(a->q + (row * a->n_heads + h) * hd + d0) * v8_set1(j->scale)
                           : v8_set1(0.0f);
            }
            v8_transpose(c);
            for (int i = 0; i < 8; i++)
                v8_st(x->qt + TILE_ROWS * (d0 + i) + t0, c[i]);
        }
#endif
    for (int t = 0; t < TILE_ROWS; t++) {
        const float *q = a->q + ((size_t)(p0 + t - q_first) * a->n_heads + h) * hd;
        for (int d = d0; d < hd; d++)
            x->qt[TILE_ROWS * d + t] = t < np ? q[d] * j->scale : 0.0f;
    }
    memset(x->ot, 0, sizeof(float) * TILE_ROWS * (size_t)hd);
    x->m[0] = x->m[1] = v8_set1(-INFINITY);
    x->l[0] = x->l[1] = v8_set1(0.0f);
}

static void bs_stream_store(const bs_job *j, const bs_stream *x)
{
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, q_first = a->ctx_len - a->n_q;
    float inv[TILE_ROWS];
    for (int t = 0; t < TILE_ROWS; t++)
        inv[t] = 1.0f / x->l[t / 8][t % 8];
    int d0 = 0;
#if defined(__AVX__)
    for (; d0 + 8 <= hd; d0 += 8)
        for (int t0 = 0; t0 < x->np; t0 += 8) {
            v8 c[8];
            for (int i = 0; i < 8; i++)
                c[i] = v8_ld(x->ot + TILE_ROWS * (d0 + i) + t0);
            v8_transpose(c);
            for (int i = 0; i < 8 && t0 + i < x->np; i++) {
                float *o = a->out + ((size_t)(x->p0 + t0 + i - q_first) * a->n_heads + x->h) * hd;
                v8_stu(o + d0, c[i] * v8_set1(inv[t0 + i]));
            }
        }
#endif
    for (int t = 0; t < x->np; t++) {
        float *o = a->out + ((size_t)(x->p0 + t - q_first) * a->n_heads + x->h) * hd;
        for (int d = d0; d < hd; d++)
            o[d] = x->ot[TILE_ROWS * d + t] * inv[t];
    }
}

/* Scalar twin of v8_fma, so both round the same way. */
static inline float f_fma(float a, float b, float c)
{
#if defined(__FMA__)
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

/* A single query position (a decode step): the arithmetic of bs_streams for one
 * row, element for element (the same fused multiply-adds in the same order,
 * the same exp), so its result equals that row of a prefill bit for bit. The
 * key tile is transposed so that vector lanes run over keys instead of over 16
 * rows of which 15 would be padding. */
__attribute__((noinline)) static void bs_row(const bs_job *j, int r, int p, int h0, int nh)
{
    const kern_attn_args *a = j->a;
    const kern_block_mask *m = j->m;
    const int hd = a->head_dim, B = m->block_size, kvh = h0 / j->group;
    const int q_first = a->ctx_len - a->n_q;
    _Alignas(32) float qs[HEADS_PER_TILE][HD_MAX];
    _Alignas(32) float acc[HEADS_PER_TILE][HD_MAX];
    _Alignas(32) float kt[HD_MAX * TILE_KEYS];
    _Alignas(32) float sc[TILE_KEYS];
    const float *vp[TILE_KEYS];
    const uint64_t *rows[HEADS_PER_TILE];
    float mrun[HEADS_PER_TILE], lrun[HEADS_PER_TILE];
    for (int g = 0; g < nh; g++) {
        const float *q = a->q + ((size_t)(p - q_first) * a->n_heads + h0 + g) * hd;
        for (int d = 0; d < hd; d++)
            qs[g][d] = q[d] * j->scale;
        memset(acc[g], 0, sizeof(float) * (size_t)hd);
        mrun[g] = -INFINITY;
        lrun[g] = 0.0f;
        rows[g] = kern_block_mask_row(m, (h0 + g) / (a->n_heads / m->n_lists), r);
    }
    const size_t kv_off = (size_t)kvh * hd;
    for (int w = 0; w <= r / 64; w++) {
        uint64_t any = 0;
        for (int g = 0; g < nh; g++)
            any |= rows[g][w];
        while (any) {
            const int c = 64 * w + __builtin_ctzll(any);
            any &= any - 1;
            const int kend = (c + 1) * B <= p + 1 ? (c + 1) * B : p + 1;
            for (int k0 = c * B; k0 < kend; k0 += TILE_KEYS) {
                const int nk = kend - k0 < TILE_KEYS ? kend - k0 : TILE_KEYS;
                const int nk8 = (nk + 7) / 8 * 8;
                for (int i = 0; i < nk8; i++) {
                    if (i < nk) {
                        const size_t row = kern_attn_row(a, k0 + i) * (size_t)a->kv_stride + kv_off;
                        const float *k = a->k + row;
                        vp[i] = a->v + row;
                        for (int d = 0; d < hd; d++)
                            kt[TILE_KEYS * d + i] = k[d];
                    } else {
                        for (int d = 0; d < hd; d++)
                            kt[TILE_KEYS * d + i] = 0.0f;
                    }
                }
                for (int g = 0; g < nh; g++) {
                    if (!((rows[g][w] >> (c % 64)) & 1u))
                        continue;
                    for (int i = 0; i < nk8; i += 8) {
                        v8 s = {0};
                        for (int d = 0; d < hd; d++)
                            s = v8_fma(v8_ld(kt + TILE_KEYS * d + i), v8_set1(qs[g][d]), s);
                        v8_st(sc + i, s);
                    }
                    float mt = -INFINITY;
                    for (int i = 0; i < nk; i++)
                        mt = sc[i] > mt ? sc[i] : mt;
                    const float m_new = mrun[g] > mt ? mrun[g] : mt;
                    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
                    const float corr = v8_exp2(v8_set1(mrun[g] - m_use))[0];
                    for (int i = 0; i < nk8; i += 8)
                        v8_st(sc + i, v8_exp2(v8_ld(sc + i) - v8_set1(m_use)));
                    float sum = 0.0f;
                    for (int i = 0; i < nk; i++)
                        sum += sc[i];
                    lrun[g] = lrun[g] * corr + sum;
                    mrun[g] = m_new;
                    for (int d = 0; d < hd; d++)
                        acc[g][d] *= corr;
                    for (int i = 0; i < nk; i++) {
                        const v8 pi = v8_set1(sc[i]);
                        const float *v = vp[i];
                        int d = 0;
                        for (; d + 8 <= hd; d += 8)
                            v8_st(acc[g] + d, v8_fma(v8_ldu(v + d), pi, v8_ld(acc[g] + d)));
                        for (; d < hd; d++)
                            acc[g][d] = f_fma(v[d], sc[i], acc[g][d]);
                    }
                }
            }
        }
    }
    for (int g = 0; g < nh; g++) {
        const float inv = 1.0f / lrun[g];
        float *o = a->out + ((size_t)(p - q_first) * a->n_heads + h0 + g) * hd;
        for (int d = 0; d < hd; d++)
            o[d] = acc[g][d] * inv;
    }
}

/* Whether the arena holds a packed K/V tile besides the streams of a task (of
 * at least HEADS_PER_TILE streams), and how many streams it holds. At head
 * dim 64 that is 16 streams: 256 query rows share each K/V tile copy. */
static int bs_packed(int hd)
{
    return (2 * TILE_KEYS + HEADS_PER_TILE * 2 * TILE_ROWS) * hd <= ARENA_FLOATS;
}
static int bs_max_streams(int hd)
{
    const int n = (ARENA_FLOATS - (bs_packed(hd) ? 2 * TILE_KEYS * hd : 0)) / (2 * TILE_ROWS * hd);
    return n < MAX_STREAMS ? n : MAX_STREAMS;
}

/* Query block r's positions that go through streams: all but a last sub-tile
 * of one position, a decode-shaped row (15 of its 16 lanes would be padding)
 * that bs_row computes. */
static void bs_block_rows(const bs_job *j, int r, int *lo, int *hi, int *tail)
{
    const kern_attn_args *a = j->a;
    const int B = j->m->block_size, q_first = a->ctx_len - a->n_q;
    *lo = r * B > q_first ? r * B : q_first;
    *hi = (r + 1) * B < a->ctx_len ? (r + 1) * B : a->ctx_len;
    *tail = (*hi - *lo) % TILE_ROWS == 1;
    *hi -= *tail;
}

/* Query blocks [r0, r1), heads h0 .. h0+nh-1, in groups of streams that share
 * each loaded key tile: the nh heads of up to max_streams / nh sub-tiles. The
 * arena holds every stream's qt and ot and, when they fit, the packed K/V
 * tile: contiguous rows stay in L1, where cache rows kv_stride apart would
 * compete for a few of its sets, and each tile is read from the cache once
 * per group rather than once per stream. */
__attribute__((noinline)) static void bs_block(const bs_job *j, int r0, int r1, int h0, int nh)
{
    _Alignas(32) float arena[ARENA_FLOATS];
    bs_stream sm[MAX_STREAMS];
    const int hd = j->a->head_dim, kvh = h0 / j->group;
    const size_t tile = (size_t)TILE_ROWS * (size_t)hd, kv_tile = (size_t)TILE_KEYS * (size_t)hd;
    const int packed = bs_packed(hd), per_group = bs_max_streams(hd) / nh;
    float *kbuf = packed ? arena : NULL, *vbuf = packed ? arena + kv_tile : NULL;
    float *state = arena + (packed ? 2 * kv_tile : 0);
    int ns = 0;
    for (int r = r1 - 1; r >= r0; r--) {
        int lo, hi, tail;
        bs_block_rows(j, r, &lo, &hi, &tail);
        for (int p0 = lo; p0 < hi; p0 += TILE_ROWS) {
            const int np = hi - p0 < TILE_ROWS ? hi - p0 : TILE_ROWS;
            for (int g = 0; g < nh; g++, ns++) {
                sm[ns].qt = state + 2 * tile * (size_t)ns;
                sm[ns].ot = sm[ns].qt + tile;
                bs_stream_init(j, &sm[ns], r, h0 + g, p0, np);
            }
            if (ns == per_group * nh || (r == r0 && p0 + np >= hi)) {
                bs_streams(j, kvh, sm, ns, kbuf, vbuf);
                for (int s = 0; s < ns; s++)
                    bs_stream_store(j, &sm[s]);
                ns = 0;
            }
        }
    }
    if (ns) {
        bs_streams(j, kvh, sm, ns, kbuf, vbuf);
        for (int s = 0; s < ns; s++)
            bs_stream_store(j, &sm[s]);
    }
}

/* Task t: query heads h0 .. h0+nh-1 of one kv head (a chunk of its group) over
 * the query blocks of one block group. Tasks run head by head so that the
 * tasks in flight read the same K/V, and within a head the last block groups
 * (the most expensive) first. */
static void bs_task(void *ctx, int t, int n_tasks)
{
    const bs_job *j = ctx;
    const int gi = t % j->n_bgroups, rest = t / j->n_bgroups;
    const int kvh = rest / j->head_chunks, hc = rest % j->head_chunks;
    const int h0 = kvh * j->group + hc * HEADS_PER_TILE;
    const int nh = j->group - hc * HEADS_PER_TILE < HEADS_PER_TILE ? j->group - hc * HEADS_PER_TILE
                                                                   : HEADS_PER_TILE;
    /* Groups of even size (at most blocks_per_group), the last one first. */
    const int q0 = j->m->q_block0, n = j->m->n_qblocks, g = j->n_bgroups - 1 - gi;
    const int r0 = q0 + g * n / j->n_bgroups, r1 = q0 + (g + 1) * n / j->n_bgroups;
    bs_block(j, r0, r1, h0, nh);
    for (int r = r0; r < r1; r++) {
        int lo, hi, tail;
        bs_block_rows(j, r, &lo, &hi, &tail);
        if (tail)
            bs_row(j, r, hi, h0, nh);
    }
}

int kern_attention_block_sparse_f32(kern_pool *pool, const kern_attn_args *a,
                                    const kern_block_mask *m)
{
    int rc = check_attn_args(a);
    if (rc == KERN_SPARSE_OK)
        rc = check_mask(m, a);
    if (rc != KERN_SPARSE_OK)
        return rc;
    bs_job j = {.a = a, .m = m, .group = a->n_heads / a->n_kv_heads};
    j.head_chunks = (j.group + HEADS_PER_TILE - 1) / HEADS_PER_TILE;
    j.scale = (float)(1.4426950408889634 / sqrt((double)a->head_dim)); /* log2(e) / sqrt(D) */
    /* Enough query blocks per task to fill a group of streams. */
    const int nh = j.group < HEADS_PER_TILE ? j.group : HEADS_PER_TILE;
    const int rows = bs_max_streams(a->head_dim) / nh * TILE_ROWS;
    j.n_bgroups = ceil_div(m->n_qblocks, rows > m->block_size ? rows / m->block_size : 1);
    kern_pool_run(pool, bs_task, &j, a->n_kv_heads * j.head_chunks * j.n_bgroups);
    return KERN_SPARSE_OK;
}

/* ---- masked reference ---- */

void kern_attention_masked_ref(const kern_attn_args *a, const uint8_t *mask)
{
    const int hd = a->head_dim, group = a->n_heads / a->n_kv_heads;
    double *sc = malloc(sizeof(double) * (size_t)(a->ctx_len > 0 ? a->ctx_len : 1));
    if (!sc)
        return;
    for (int h = 0; h < a->n_heads; h++) {
        const int kvh = h / group;
        for (int r = 0; r < a->n_q; r++) {
            const int pos = a->ctx_len - a->n_q + r;
            const uint8_t *mrow = mask + ((size_t)h * a->n_q + r) * a->ctx_len;
            const float *q = a->q + ((size_t)r * a->n_heads + h) * hd;
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j <= pos; j++) {
                if (!mrow[j])
                    continue;
                const float *k = a->k + kern_attn_row(a, j) * a->kv_stride + (size_t)kvh * hd;
                double d = 0.0;
                for (int i = 0; i < hd; i++)
                    d += (double)q[i] * k[i];
                sc[j] = d / sqrt((double)hd);
                if (sc[j] > mx)
                    mx = sc[j];
            }
            for (int j = 0; j <= pos; j++)
                if (mrow[j]) {
                    sc[j] = exp(sc[j] - mx);
                    sum += sc[j];
                }
            float *o = a->out + ((size_t)r * a->n_heads + h) * hd;
            for (int i = 0; i < hd; i++) {
                double acc = 0.0;
                for (int j = 0; j <= pos; j++)
                    if (mrow[j])
                        acc +=
                            sc[j] *
                            a->v[kern_attn_row(a, j) * a->kv_stride + (size_t)kvh * hd + (size_t)i];
                o[i] = sum > 0.0 ? (float)(acc / sum) : 0.0f;
            }
        }
    }
    free(sc);
}

/* ---- probe-row profiles ----
 * One task per query head. The probe rows are held transposed in scratch in
 * reverse order: column t is probe row n_probe-1-t, at position ctx_len-1-t.
 * With that order the slash entry of (column t, key j), distance
 * o = ctx_len-1-t-j, lands at index t + j of a reversed slash array, so for a
 * fixed key the columns update consecutive slash entries; the array is
 * reversed in place at the end. */

typedef struct {
    const kern_attn_args *a;
    int n_probe, np16; /* np16: n_probe rounded up to 16 */
    float *vertical, *slash, *scratch;
    float scale;
} probe_job;

/* Scores of key tile [k0, k0+nk) against every probe column group, masked. */
static void probe_scores(const probe_job *j, const float *qt, const float *const *kp, int k0,
                         int nk, float *st)
{
    const int hd = j->a->head_dim, n = j->a->ctx_len;
    for (int g = 0; g < j->np16 / 16; g++) {
        float *s = st + (size_t)g * TILE_KEYS * 16;
        v8 mx[2];
        qk_tile(s, qt + (size_t)g * hd * 16, kp, nk, hd, mx);
        if (k0 + nk - 1 > n - j->n_probe) {
            int32_t p[16];
            v8i pos[2];
            for (int t = 0; t < 16; t++)
                p[t] = n - 1 - (16 * g + t);
            memcpy(pos, p, sizeof pos);
            mask_tile(s, nk, k0, pos);
        }
    }
}

static void probe_task(void *ctx, int h, int n_tasks)
{
    const probe_job *j = ctx;
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, n = a->ctx_len, ng = j->np16 / 16;
    const int kvh = h / (a->n_heads / a->n_kv_heads);
    float *qt = j->scratch + (size_t)h * hd * j->np16; /* 32-byte aligned */
    float *vert = j->vertical + (size_t)h * n, *sr = j->slash + (size_t)h * n;
    _Alignas(32) float st[PROBE_MAX / 16][TILE_KEYS * 16];
    const float *kp[TILE_KEYS];
    v8 m[PROBE_MAX / 8], l[PROBE_MAX / 8], lse[PROBE_MAX / 8];
    for (int g = 0; g < ng; g++)
        for (int t = 0; t < 16; t++) {
            const int col = 16 * g + t;
            const float *q = a->q + ((size_t)(a->n_q - 1 - col) * a->n_heads + h) * hd;
            for (int d = 0; d < hd; d++)
                qt[(size_t)g * hd * 16 + 16 * d + t] = col < j->n_probe ? q[d] * j->scale : 0.0f;
        }
    for (int v = 0; v < 2 * ng; v++) {
        m[v] = v8_set1(-INFINITY);
        l[v] = v8_set1(0.0f);
    }
    /* Pass 1: log-sum-exp of every probe row. */
    for (int k0 = 0; k0 < n; k0 += TILE_KEYS) {
        const int nk = n - k0 < TILE_KEYS ? n - k0 : TILE_KEYS;
        for (int i = 0; i < nk; i++)
            kp[i] = a->k + kern_attn_row(a, k0 + i) * a->kv_stride + (size_t)kvh * hd;
        probe_scores(j, qt, kp, k0, nk, st[0]);
        for (int g = 0; g < ng; g++)
            for (int hv = 0; hv < 2; hv++) {
                const int v = 2 * g + hv;
                const float *s = st[g] + 8 * hv;
                v8 mt = v8_set1(-INFINITY);
                for (int i = 0; i < nk; i++)
                    mt = v8_max(mt, v8_ld(s + 16 * i));
                const v8 m_new = v8_max(m[v], mt);
                const v8 m_use = v8_select(m_new == v8_set1(-INFINITY), v8_set1(0.0f), m_new);
                v8 sum = {0};
                for (int i = 0; i < nk; i++)
                    sum += v8_exp(v8_ld(s + 16 * i) - m_use);
                l[v] = l[v] * v8_exp(m[v] - m_use) + sum;
                m[v] = m_new;
            }
    }
    for (int v = 0; v < 2 * ng; v++)
        for (int t = 0; t < 8; t++)
            lse[v][t] = 8 * v + t < j->n_probe ? m[v][t] + logf(l[v][t]) : INFINITY;
    /* Pass 2: accumulate exp(s - lse) / n_probe by key and by distance. */
    memset(vert, 0, sizeof(float) * (size_t)n);
    memset(sr, 0, sizeof(float) * (size_t)n);
    const v8 inv = v8_set1(1.0f / (float)j->n_probe);
    for (int k0 = 0; k0 < n; k0 += TILE_KEYS) {
        const int nk = n - k0 < TILE_KEYS ? n - k0 : TILE_KEYS;
        for (int i = 0; i < nk; i++)
            kp[i] = a->k + kern_attn_row(a, k0 + i) * a->kv_stride + (size_t)kvh * hd;
        probe_scores(j, qt, kp, k0, nk, st[0]);
        for (int i = 0; i < nk; i++) {
            const int key = k0 + i;
            v8 colsum = {0};
            for (int g = 0; g < ng; g++)
                for (int hv = 0; hv < 2; hv++) {
                    const int v = 2 * g + hv, t0 = 16 * g + 8 * hv;
                    const v8 p = v8_exp(v8_ld(st[g] + 16 * i + 8 * hv) - lse[v]) * inv;
                    colsum += p;
                    if (key + t0 + 8 <= n) {
                        v8_stu(sr + key + t0, v8_ldu(sr + key + t0) + p);
                    } else {
                        for (int t = 0; t < 8 && key + t0 + t < n; t++)
                            sr[key + t0 + t] += p[t];
                    }
                }
            vert[key] += v8_hsum(colsum);
        }
    }
    for (int i = 0, k = n - 1; i < k; i++, k--) {
        const float x = sr[i];
        sr[i] = sr[k];
        sr[k] = x;
    }
}

size_t kern_probe_scratch_floats(int n_heads, int head_dim, int n_probe)
{
    if (n_heads < 1 || head_dim < 1 || n_probe < 1)
        return 0;
    /* + 8: room to align the start to 32 bytes. */
    return (size_t)n_heads * (size_t)head_dim * (size_t)((n_probe + 15) / 16 * 16) + 8;
}

int kern_attention_probe_profiles_f32(kern_pool *pool, const kern_attn_args *a, int n_probe,
                                      float *vertical, float *slash, float *scratch)
{
    const int rc = check_attn_args(a);
    if (rc != KERN_SPARSE_OK)
        return rc;
    if (n_probe < 1 || n_probe > a->n_q || n_probe > PROBE_MAX || !vertical || !slash || !scratch)
        return KERN_SPARSE_EINVAL;
    probe_job j = {.a = a,
                   .n_probe = n_probe,
                   .np16 = (n_probe + 15) / 16 * 16,
                   .vertical = vertical,
                   .slash = slash,
                   .scratch = (float *)(void *)(((uintptr_t)scratch + 31) & ~(uintptr_t)31),
                   .scale = 1.0f / sqrtf((float)a->head_dim)};
    kern_pool_run(pool, probe_task, &j, a->n_heads);
    return KERN_SPARSE_OK;
}
