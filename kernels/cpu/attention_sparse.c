/*
 * attention_sparse.c - block-sparse causal attention on the CPU (the kernel that
 * FlexPrefill and PowerAttention run), its masked double reference, the block
 * mask helpers, and the probe-row attention profiles FlexPrefill selects from.
 *
 * Layout of the fast kernel. A task is (query block, kv head, chunk of up to
 * HEADS_PER_TILE query heads of that kv head's group). It walks its query block
 * in sub-tiles of TILE_ROWS positions. For a sub-tile every head keeps its
 * queries transposed (qt[d][row], pre-scaled by 1/sqrt(D)), its output
 * accumulator transposed (ot[d][row]) and a running max m and sum l per row, so
 * all softmax arithmetic is vectorized across rows. K and V are never copied:
 * the micro-kernels broadcast single K/V elements straight from the cache rows
 * (found through the page table), so paging costs one pointer per key and
 * skipped blocks cost nothing. The key blocks of a sub-tile are the union of
 * its heads' mask rows, visited in ascending order; each tile of up to TILE_KEYS
 * keys is computed only for the heads whose own row holds its block, and they
 * all read the same K/V cache lines.
 *
 * Numerics: scores, softmax and accumulators in fp32; for each (row, key) the
 * dot product runs over d in order and each output element accumulates keys in
 * order, whatever the tile composition, so a row's result does not depend on
 * which other rows share its sub-tile (decode equals prefill bit for bit).
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
#if defined(__FMA__)
#include <immintrin.h>
#endif
#if !defined(__AVX__) && defined(__GNUC__) && !defined(__clang__)
/* 32-byte vectors only pass between static functions of this file, which agree
 * on their ABI; without AVX GCC would warn about the psABI of every one. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define TILE_ROWS 16     /* positions per sub-tile = rows per head = 2 vectors */
#define TILE_KEYS 64     /* keys per tile */
#define HEADS_PER_TILE 4 /* query heads sharing a sub-tile's K/V reads */
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

static inline v8 v8_max(v8 a, v8 b)
{
    return v8_select(a > b, a, b);
}

static inline float v8_hsum(v8 x)
{
    float s = 0.0f;
    for (int i = 0; i < 8; i++)
        s += x[i];
    return s;
}

/* exp(x) for x <= 0 (softmax arguments): Cody-Waite reduction to r in
 * [-ln2/2, ln2/2] and a degree-6 polynomial, about 2 ulp; 0 below -87.3 and for
 * -inf; exp(0) is exactly 1. */
static inline v8 v8_exp(v8 x)
{
    const v8i under = x < v8_set1(-87.3f);
    x = v8_select(under, v8_set1(-87.3f), x);
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

/* ---- micro-kernels on 16-row tiles ---- */

/* st[j][0..16) = sum_d kp[j][d] * qt[d][0..16) for j < nk. */
static void qk_tile(float *restrict st, const float *restrict qt, const float *const *kp, int nk,
                    int hd)
{
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
    }
}

/* ot[d][0..16) += sum_j vp[j][d] * pt[j][0..16) for d < hd. */
static void pv_tile(float *restrict ot, const float *restrict pt, const float *const *vp, int nk,
                    int hd)
{
    int d = 0;
    for (; d + 4 <= hd; d += 4) {
        float *o = ot + 16 * d;
        v8 a0 = v8_ld(o), b0 = v8_ld(o + 8), a1 = v8_ld(o + 16), b1 = v8_ld(o + 24);
        v8 a2 = v8_ld(o + 32), b2 = v8_ld(o + 40), a3 = v8_ld(o + 48), b3 = v8_ld(o + 56);
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
        v8 a0 = v8_ld(o), b0 = v8_ld(o + 8);
        for (int j = 0; j < nk; j++) {
            const v8 x = v8_set1(vp[j][d]);
            a0 = v8_fma(x, v8_ld(pt + 16 * j), a0);
            b0 = v8_fma(x, v8_ld(pt + 16 * j + 8), b0);
        }
        v8_st(o, a0);
        v8_st(o + 8, b0);
    }
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

/* Online softmax step: turns st's scores into exp(s - m_new), rescales l and ot. */
static void softmax_tile(float *st, int nk, v8 m[2], v8 l[2], float *ot, int hd)
{
    for (int h = 0; h < 2; h++) {
        v8 mt = v8_set1(-INFINITY);
        for (int j = 0; j < nk; j++)
            mt = v8_max(mt, v8_ld(st + 16 * j + 8 * h));
        const v8 m_new = v8_max(m[h], mt);
        const v8 m_use = v8_select(m_new == v8_set1(-INFINITY), v8_set1(0.0f), m_new);
        const v8 corr = v8_exp(m[h] - m_use);
        v8 sum = {0};
        for (int j = 0; j < nk; j++) {
            const v8 p = v8_exp(v8_ld(st + 16 * j + 8 * h) - m_use);
            v8_st(st + 16 * j + 8 * h, p);
            sum += p;
        }
        l[h] = l[h] * corr + sum;
        m[h] = m_new;
        for (int d = 0; d < hd; d++)
            v8_st(ot + 16 * d + 8 * h, v8_ld(ot + 16 * d + 8 * h) * corr);
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

typedef struct {
    const kern_attn_args *a;
    const kern_block_mask *m;
    int group;       /* query heads per kv head */
    int head_chunks; /* ceil(group / HEADS_PER_TILE) */
    int per_qblock;  /* tasks per query block: n_kv_heads * head_chunks */
    float scale;
} bs_job;

/* One sub-tile: positions p0 .. p0+np-1 (one query block) x heads h0 .. h0+nh-1. */
__attribute__((noinline)) static void bs_subtile(const bs_job *j, int r, int p0, int np, int h0,
                                                 int nh)
{
    const kern_attn_args *a = j->a;
    const kern_block_mask *m = j->m;
    const int hd = a->head_dim, B = m->block_size, kvh = h0 / j->group;
    const int q_first = a->ctx_len - a->n_q; /* position of query row 0 */
    const int pmax = p0 + np - 1;
    _Alignas(32) float qt[HEADS_PER_TILE][HD_MAX * TILE_ROWS];
    _Alignas(32) float ot[HEADS_PER_TILE][HD_MAX * TILE_ROWS];
    _Alignas(32) float st[TILE_KEYS * TILE_ROWS];
    const float *kp[TILE_KEYS], *vp[TILE_KEYS];
    const uint64_t *rows[HEADS_PER_TILE];
    v8 mrun[HEADS_PER_TILE][2], lrun[HEADS_PER_TILE][2];
    int32_t row_pos[TILE_ROWS];
    v8i pos[2];
    for (int t = 0; t < TILE_ROWS; t++)
        row_pos[t] = p0 + (t < np ? t : np - 1); /* padding rows repeat the last */
    memcpy(pos, row_pos, sizeof pos);
    for (int g = 0; g < nh; g++) {
        const int h = h0 + g;
        for (int t = 0; t < TILE_ROWS; t++) {
            const float *q = a->q + ((size_t)(p0 + t - q_first) * a->n_heads + h) * hd;
            for (int d = 0; d < hd; d++)
                qt[g][TILE_ROWS * d + t] = t < np ? q[d] * j->scale : 0.0f;
        }
        memset(ot[g], 0, sizeof(float) * TILE_ROWS * (size_t)hd);
        mrun[g][0] = mrun[g][1] = v8_set1(-INFINITY);
        lrun[g][0] = lrun[g][1] = v8_set1(0.0f);
        rows[g] = kern_block_mask_row(m, h / (a->n_heads / m->n_lists), r);
    }
    const size_t kv_off = (size_t)kvh * hd;
    for (int w = 0; w <= r / 64; w++) {
        uint64_t any = 0;
        for (int g = 0; g < nh; g++)
            any |= rows[g][w];
        while (any) {
            const int c = 64 * w + __builtin_ctzll(any);
            any &= any - 1;
            const int kend = (c + 1) * B <= pmax + 1 ? (c + 1) * B : pmax + 1;
            for (int k0 = c * B; k0 < kend; k0 += TILE_KEYS) {
                const int nk = kend - k0 < TILE_KEYS ? kend - k0 : TILE_KEYS;
                for (int i = 0; i < nk; i++) {
                    const size_t row = kern_attn_row(a, k0 + i) * (size_t)a->kv_stride + kv_off;
                    kp[i] = a->k + row;
                    vp[i] = a->v + row;
                }
                for (int g = 0; g < nh; g++) {
                    if (!((rows[g][w] >> (c % 64)) & 1u))
                        continue;
                    qk_tile(st, qt[g], kp, nk, hd);
                    if (k0 + nk - 1 > p0)
                        mask_tile(st, nk, k0, pos);
                    softmax_tile(st, nk, mrun[g], lrun[g], ot[g], hd);
                    pv_tile(ot[g], st, vp, nk, hd);
                }
            }
        }
    }
    for (int g = 0; g < nh; g++) {
        float inv[TILE_ROWS];
        for (int t = 0; t < TILE_ROWS; t++)
            inv[t] = 1.0f / lrun[g][t / 8][t % 8];
        for (int t = 0; t < np; t++) {
            float *o = a->out + ((size_t)(p0 + t - q_first) * a->n_heads + h0 + g) * hd;
            for (int d = 0; d < hd; d++)
                o[d] = ot[g][TILE_ROWS * d + t] * inv[t];
        }
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

/* A single query position (a decode step): the arithmetic of bs_subtile for one
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
                    const float corr = v8_exp(v8_set1(mrun[g] - m_use))[0];
                    for (int i = 0; i < nk8; i += 8)
                        v8_st(sc + i, v8_exp(v8_ld(sc + i) - v8_set1(m_use)));
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

static void bs_task(void *ctx, int t, int n_tasks)
{
    const bs_job *j = ctx;
    const kern_attn_args *a = j->a;
    const int B = j->m->block_size;
    /* Last query blocks first: they are the most expensive. */
    const int i = j->m->n_qblocks - 1 - t / j->per_qblock;
    const int rest = t % j->per_qblock;
    const int kvh = rest / j->head_chunks, hc = rest % j->head_chunks;
    const int h0 = kvh * j->group + hc * HEADS_PER_TILE;
    const int nh = j->group - hc * HEADS_PER_TILE < HEADS_PER_TILE ? j->group - hc * HEADS_PER_TILE
                                                                   : HEADS_PER_TILE;
    const int r = j->m->q_block0 + i;
    const int q_first = a->ctx_len - a->n_q;
    const int lo = r * B > q_first ? r * B : q_first;
    const int hi = (r + 1) * B < a->ctx_len ? (r + 1) * B : a->ctx_len;
    for (int p0 = lo; p0 < hi; p0 += TILE_ROWS) {
        const int np = hi - p0 < TILE_ROWS ? hi - p0 : TILE_ROWS;
        if (np == 1)
            bs_row(j, r, p0, h0, nh);
        else
            bs_subtile(j, r, p0, np, h0, nh);
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
    j.per_qblock = a->n_kv_heads * j.head_chunks;
    j.scale = 1.0f / sqrtf((float)a->head_dim);
    kern_pool_run(pool, bs_task, &j, m->n_qblocks * j.per_qblock);
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
        qk_tile(s, qt + (size_t)g * hd * 16, kp, nk, hd);
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
