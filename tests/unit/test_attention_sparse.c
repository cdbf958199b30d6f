/*
 * test_attention_sparse.c - unit tests for sparse prefill (kernels/kernels.h,
 * "sparse attention (issue 6)"): the block-sparse kernel against the masked
 * double reference and the dense kernel, the probe profiles against a brute
 * force softmax, FlexPrefill (the recipe of research/sparse-kv-spec.md 1.7) and
 * PowerAttention (recipe 2.7), block-mask accounting, determinism and argument
 * checks.
 *
 * Inputs come from a fixed-seed xorshift. Outputs are pre-filled with NaN and
 * followed by guard values; K/V rows a kernel must not read (padding between
 * heads, unused pages) are NaN, so reading one poisons the result.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"

#define GUARD 1234.5f

static kern_pool *pool4;

static int group_setup(void **state)
{
    (void)state;
    pool4 = kern_pool_create(4);
    return pool4 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    kern_pool_destroy(pool4);
    return 0;
}

/* ---- inputs ---- */

static uint64_t rng_state;

static void rng_seed(uint64_t s)
{
    rng_state = s ? s : 0x9E3779B97F4A7C15ull;
}

static uint64_t xorshift64(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static float rnd(float lo, float hi)
{
    return lo + (hi - lo) * (float)((double)(xorshift64() >> 11) * 0x1.0p-53);
}

static float *alloc_floats(size_t n)
{
    float *p = malloc(sizeof(float) * (n ? n : 1));
    assert_non_null(p);
    return p;
}

static void fill(float *p, size_t n, float x)
{
    for (size_t i = 0; i < n; i++)
        p[i] = x;
}

/* One attention problem: q, k, v, out (with guards) and an optional page table. */
typedef struct {
    int n_q, ctx_len, n_heads, n_kv_heads, head_dim;
    int page;   /* > 0: paged KV with pages of this many rows, in shuffled order */
    int kv_pad; /* extra NaN floats per K/V row */
} shape;

typedef struct {
    shape s;
    float *q, *k, *v, *out;
    int32_t *table;
    size_t nq_floats, kv_rows;
    kern_attn_args a;
} problem;

/* Row of k/v that holds position j. */
static size_t kv_row(const problem *p, int j)
{
    return p->table ? (size_t)p->table[j / p->s.page] * p->s.page + (size_t)(j % p->s.page)
                    : (size_t)j;
}

static void problem_reset_out(problem *p)
{
    fill(p->out, p->nq_floats, NAN);
    fill(p->out + p->nq_floats, 4, GUARD);
}

static void problem_init(problem *p, shape s)
{
    memset(p, 0, sizeof(*p));
    p->s = s;
    const int kvw = s.n_kv_heads * s.head_dim, stride = kvw + s.kv_pad;
    p->nq_floats = (size_t)s.n_q * s.n_heads * s.head_dim;
    p->q = alloc_floats(p->nq_floats);
    for (size_t i = 0; i < p->nq_floats; i++)
        p->q[i] = rnd(-1.0f, 1.0f);
    if (s.page > 0) {
        const int n_pages = (s.ctx_len + s.page - 1) / s.page + 3;
        p->table = malloc(sizeof(int32_t) * (size_t)n_pages);
        assert_non_null(p->table);
        for (int i = 0; i < n_pages; i++)
            p->table[i] = i;
        for (int i = n_pages - 1; i > 0; i--) { /* shuffle */
            const int j = (int)(xorshift64() % (uint64_t)(i + 1));
            const int32_t t = p->table[i];
            p->table[i] = p->table[j];
            p->table[j] = t;
        }
        p->kv_rows = (size_t)n_pages * s.page;
    } else {
        p->kv_rows = (size_t)s.ctx_len + 2;
    }
    p->k = alloc_floats(p->kv_rows * stride);
    p->v = alloc_floats(p->kv_rows * stride);
    fill(p->k, p->kv_rows * stride, NAN);
    fill(p->v, p->kv_rows * stride, NAN);
    for (int j = 0; j < s.ctx_len; j++)
        for (int i = 0; i < kvw; i++) {
            p->k[kv_row(p, j) * stride + i] = rnd(-1.0f, 1.0f);
            p->v[kv_row(p, j) * stride + i] = rnd(-1.0f, 1.0f);
        }
    p->out = alloc_floats(p->nq_floats + 4);
    p->a = (kern_attn_args){.q = p->q,
                            .k = p->k,
                            .v = p->v,
                            .out = p->out,
                            .n_q = s.n_q,
                            .ctx_len = s.ctx_len,
                            .n_heads = s.n_heads,
                            .n_kv_heads = s.n_kv_heads,
                            .head_dim = s.head_dim,
                            .kv_stride = stride,
                            .blocks = p->table,
                            .block_size = s.page};
    problem_reset_out(p);
}

static void problem_free(problem *p)
{
    free(p->q);
    free(p->k);
    free(p->v);
    free(p->out);
    free(p->table);
}

/* K or V element (position j, kv head kvh, dim d). */
static float *kv_at(problem *p, float *base, int j, int kvh, int d)
{
    return base + kv_row(p, j) * p->a.kv_stride + (size_t)kvh * p->s.head_dim + d;
}

static float *q_at(problem *p, int r, int h, int d)
{
    return p->q + ((size_t)r * p->s.n_heads + h) * p->s.head_dim + d;
}

/* Largest |x - y| over n floats divided by the largest |y|; infinity on NaN. */
static double rel_err(const float *x, const float *y, size_t n)
{
    double worst = 0.0, scale = 1e-30;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)x[i] - (double)y[i]);
        if (isnan(e))
            return INFINITY;
        worst = fmax(worst, e);
        scale = fmax(scale, fabs((double)y[i]));
    }
    return worst / scale;
}

static double abs_err(const float *x, const float *y, size_t n)
{
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)x[i] - (double)y[i]);
        if (isnan(e))
            return INFINITY;
        worst = fmax(worst, e);
    }
    return worst;
}

static int guards_intact(const problem *p)
{
    for (int i = 0; i < 4; i++)
        if (p->out[p->nq_floats + i] != GUARD)
            return 0;
    return 1;
}

/* The dense reference output of p, in a new buffer. */
static float *dense_ref(problem *p)
{
    float *ref = alloc_floats(p->nq_floats);
    kern_attn_args a = p->a;
    a.out = ref;
    kern_attention_ref(&a);
    return ref;
}

/* ---- masks ---- */

typedef struct {
    kern_block_mask m;
    uint64_t *bits;
} mask_buf;

static void mask_alloc(mask_buf *mb, int B, int n_lists, int ctx_len, int n_q)
{
    const size_t words = kern_block_mask_words(B, n_lists, ctx_len, n_q);
    assert_true(words > 0);
    mb->bits = malloc(sizeof(uint64_t) * words);
    assert_non_null(mb->bits);
    assert_int_equal(kern_block_mask_init(&mb->m, mb->bits, words, B, n_lists, ctx_len, n_q),
                     KERN_SPARSE_OK);
}

/* Random rows: the diagonal plus every other causal block with probability
 * density. */
static void mask_random(kern_block_mask *m, double density)
{
    for (int l = 0; l < m->n_lists; l++)
        for (int i = 0; i < m->n_qblocks; i++) {
            const int r = m->q_block0 + i;
            kern_block_mask_set(m, l, r, r);
            for (int c = 0; c < r; c++)
                if (rnd(0.0f, 1.0f) < density)
                    kern_block_mask_set(m, l, r, c);
        }
}

/* The dense boolean mask [head][row][key] a block mask stands for (causality
 * is left to the reference). */
static uint8_t *mask_expand(const kern_block_mask *m, const kern_attn_args *a)
{
    uint8_t *d = calloc((size_t)a->n_heads * a->n_q * a->ctx_len, 1);
    assert_non_null(d);
    for (int h = 0; h < a->n_heads; h++)
        for (int r = 0; r < a->n_q; r++) {
            const int qb = (a->ctx_len - a->n_q + r) / m->block_size;
            const int l = h / (a->n_heads / m->n_lists);
            for (int j = 0; j < a->ctx_len; j++)
                d[((size_t)h * a->n_q + r) * a->ctx_len + j] =
                    (uint8_t)kern_block_mask_get(m, l, qb, j / m->block_size);
        }
    return d;
}

static float *masked_ref(problem *p, const kern_block_mask *m)
{
    uint8_t *d = mask_expand(m, &p->a);
    float *ref = alloc_floats(p->nq_floats);
    kern_attn_args a = p->a;
    a.out = ref;
    kern_attention_masked_ref(&a, d);
    free(d);
    return ref;
}

/* Runs the block-sparse kernel on p with m and returns the error against the
 * masked reference relative to its largest output. */
static double sparse_vs_ref(problem *p, const kern_block_mask *m, kern_pool *pool)
{
    problem_reset_out(p);
    assert_int_equal(kern_attention_block_sparse_f32(pool, &p->a, m), KERN_SPARSE_OK);
    float *ref = masked_ref(p, m);
    double e = rel_err(p->out, ref, p->nq_floats);
    if (!guards_intact(p))
        e = INFINITY;
    free(ref);
    return e;
}

/* ---- block-sparse kernel ---- */

static void test_block_sparse_matches_masked_ref_on_random_masks(void **state)
{
    (void)state;
    rng_seed(11);
    const int bs[] = {16, 32}, dims[] = {8, 64, 128}, kvh[] = {8, 4, 1};
    for (int ib = 0; ib < 2; ib++) {
        const int B = bs[ib];
        const int lens[] = {1, B - 1, B, B + 1, 5 * B + 17};
        for (int in = 0; in < 5; in++)
            for (int id = 0; id < 3; id++)
                for (int ik = 0; ik < 3; ik++) {
                    problem p;
                    problem_init(&p, (shape){lens[in], lens[in], 8, kvh[ik], dims[id], 0, 0});
                    mask_buf mb;
                    mask_alloc(&mb, B, 8, p.s.ctx_len, p.s.n_q);
                    mask_random(&mb.m, 0.4);
                    const double e = sparse_vs_ref(&p, &mb.m, (in + id + ik) % 2 ? pool4 : NULL);
                    if (!(e <= 1e-5))
                        fail_msg("B=%d N=%d D=%d kv_heads=%d: rel err %g > 1e-5", B, lens[in],
                                 dims[id], kvh[ik], e);
                    free(mb.bits);
                    problem_free(&p);
                }
    }
}

static void test_block_sparse_chunk_with_paged_kv_and_gqa_4_to_1_matches_masked_ref(void **state)
{
    (void)state;
    rng_seed(12);
    const shape shapes[] = {
        {77, 300, 8, 2, 64, 16, 0}, {1, 300, 8, 2, 64, 16, 5}, {130, 257, 16, 4, 32, 7, 3},
        {33, 100, 8, 2, 128, 0, 9}, {64, 64, 8, 2, 64, 16, 0},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const int lists[] = {1, shapes[i].n_kv_heads, shapes[i].n_heads};
        for (int il = 0; il < 3; il++) {
            problem p;
            problem_init(&p, shapes[i]);
            mask_buf mb;
            mask_alloc(&mb, 32, lists[il], p.s.ctx_len, p.s.n_q);
            mask_random(&mb.m, 0.5);
            const double e = sparse_vs_ref(&p, &mb.m, pool4);
            if (!(e <= 1e-5))
                fail_msg("shape %zu n_lists=%d: rel err %g > 1e-5", i, lists[il], e);
            free(mb.bits);
            problem_free(&p);
        }
    }
}

static void test_block_sparse_with_every_block_equals_dense_kernel(void **state)
{
    (void)state;
    rng_seed(13);
    const shape shapes[] = {{200, 200, 8, 2, 64, 0, 0},
                            {50, 300, 8, 8, 8, 16, 3},
                            {1, 129, 4, 1, 128, 16, 0},
                            {257, 257, 32, 8, 128, 16, 0}};
    const int bs[] = {16, 64, 128};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        problem p;
        problem_init(&p, shapes[i]);
        float *dense = alloc_floats(p.nq_floats);
        kern_attn_args a = p.a;
        a.out = dense;
        kern_attention_f32(pool4, &a);
        for (int ib = 0; ib < 3; ib++) {
            mask_buf mb;
            mask_alloc(&mb, bs[ib], 1, p.s.ctx_len, p.s.n_q);
            kern_block_mask_fill_causal(&mb.m);
            problem_reset_out(&p);
            assert_int_equal(kern_attention_block_sparse_f32(pool4, &p.a, &mb.m), KERN_SPARSE_OK);
            const double e = abs_err(p.out, dense, p.nq_floats);
            if (!(e <= 1e-6) || !guards_intact(&p))
                fail_msg("shape %zu B=%d: max abs diff to kern_attention_f32 %g > 1e-6", i, bs[ib],
                         e);
            free(mb.bits);
        }
        free(dense);
        problem_free(&p);
    }
}

/* One list for all heads, one per group and one per head give the same rows
 * when the lists hold the same blocks, bit for bit. */
static void test_block_sparse_shared_group_and_head_lists_agree(void **state)
{
    (void)state;
    rng_seed(14);
    problem p;
    problem_init(&p, (shape){90, 150, 8, 2, 64, 16, 0});
    mask_buf one, heads;
    mask_alloc(&one, 16, 1, 150, 90);
    mask_random(&one.m, 0.3);
    mask_alloc(&heads, 16, 8, 150, 90);
    for (int h = 0; h < 8; h++)
        memcpy(kern_block_mask_row(&heads.m, h, heads.m.q_block0),
               kern_block_mask_row(&one.m, 0, one.m.q_block0),
               sizeof(uint64_t) * (size_t)(one.m.n_qblocks * one.m.words));
    assert_int_equal(kern_attention_block_sparse_f32(pool4, &p.a, &one.m), KERN_SPARSE_OK);
    float *first = alloc_floats(p.nq_floats);
    memcpy(first, p.out, sizeof(float) * p.nq_floats);
    problem_reset_out(&p);
    assert_int_equal(kern_attention_block_sparse_f32(NULL, &p.a, &heads.m), KERN_SPARSE_OK);
    assert_memory_equal(first, p.out, sizeof(float) * p.nq_floats);
    free(first);
    free(one.bits);
    free(heads.bits);
    problem_free(&p);
}

static void test_block_sparse_is_deterministic_across_thread_counts(void **state)
{
    (void)state;
    rng_seed(15);
    problem p;
    problem_init(&p, (shape){180, 180, 8, 2, 64, 16, 0});
    mask_buf mb;
    mask_alloc(&mb, 16, 8, 180, 180);
    mask_random(&mb.m, 0.3);
    kern_pool *pool1 = kern_pool_create(1), *pool2 = kern_pool_create(2);
    kern_pool *pools[] = {NULL, pool1, pool2, pool4, pool4};
    float *first = alloc_floats(p.nq_floats);
    for (int i = 0; i < 5; i++) {
        problem_reset_out(&p);
        assert_int_equal(kern_attention_block_sparse_f32(pools[i], &p.a, &mb.m), KERN_SPARSE_OK);
        if (i == 0)
            memcpy(first, p.out, sizeof(float) * p.nq_floats);
        else
            assert_memory_equal(first, p.out, sizeof(float) * p.nq_floats);
    }
    kern_pool_destroy(pool1);
    kern_pool_destroy(pool2);
    free(first);
    free(mb.bits);
    problem_free(&p);
}

/* Head dims off the vector width (rows packed unaligned) and above what the
 * kernel packs (read in place), blocks smaller than a 16-row sub-tile (a task
 * spans many blocks), chunks whose first block holds 16k + 1 rows, GQA. */
static void test_block_sparse_odd_dims_small_blocks_and_chunks_match_masked_ref(void **state)
{
    (void)state;
    rng_seed(17);
    const shape shapes[] = {
        {100, 100, 4, 2, 20, 0, 0},  {49, 211, 6, 3, 20, 16, 5}, {130, 300, 4, 1, 256, 0, 0},
        {33, 97, 2, 2, 200, 16, 3},  {161, 161, 3, 1, 64, 0, 0}, {145, 400, 12, 12, 64, 32, 0},
        {200, 333, 12, 4, 64, 0, 0},
    };
    const int bs[] = {8, 24, 64};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int ib = 0; ib < 3; ib++) {
            problem p;
            problem_init(&p, shapes[i]);
            mask_buf mb;
            mask_alloc(&mb, bs[ib], p.s.n_heads, p.s.ctx_len, p.s.n_q);
            mask_random(&mb.m, ib == 2 ? 1.0 : 0.5);
            const double e = sparse_vs_ref(&p, &mb.m, ib == 1 ? NULL : pool4);
            if (!(e <= 1e-5))
                fail_msg("shape %zu B=%d: rel err %g > 1e-5", i, bs[ib], e);
            free(mb.bits);
            problem_free(&p);
        }
}

/* A row's output does not depend on how the prompt is chunked: the last n_q rows
 * computed as a chunk (down to a single decode row) equal the same rows of the
 * whole prompt bit for bit, whichever rows and blocks share a task with it. */
static void test_block_sparse_rows_are_bit_identical_across_chunkings(void **state)
{
    (void)state;
    rng_seed(18);
    const shape shapes[] = {
        {300, 300, 4, 2, 64, 0, 0}, {300, 300, 2, 1, 20, 16, 0}, {150, 150, 2, 2, 256, 0, 0}};
    const int bs[] = {8, 64};
    const int chunks[] = {1, 2, 17, 33, 64, 129};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int ib = 0; ib < 2; ib++) {
            problem p;
            problem_init(&p, shapes[i]);
            const int n = p.s.ctx_len, row = p.s.n_heads * p.s.head_dim;
            mask_buf full;
            mask_alloc(&full, bs[ib], p.s.n_heads, n, n);
            mask_random(&full.m, 0.6);
            assert_int_equal(kern_attention_block_sparse_f32(pool4, &p.a, &full.m), KERN_SPARSE_OK);
            float *whole = alloc_floats(p.nq_floats);
            memcpy(whole, p.out, sizeof(float) * p.nq_floats);
            for (int ic = 0; ic < 6; ic++) {
                const int nq = chunks[ic];
                mask_buf mb;
                mask_alloc(&mb, bs[ib], p.s.n_heads, n, nq);
                for (int l = 0; l < p.s.n_heads; l++)
                    memcpy(kern_block_mask_row(&mb.m, l, mb.m.q_block0),
                           kern_block_mask_row(&full.m, l, mb.m.q_block0),
                           sizeof(uint64_t) * (size_t)(mb.m.n_qblocks * mb.m.words));
                kern_attn_args a = p.a;
                a.q = p.q + (size_t)(n - nq) * row;
                a.n_q = nq;
                problem_reset_out(&p);
                assert_int_equal(kern_attention_block_sparse_f32(ic % 2 ? pool4 : NULL, &a, &mb.m),
                                 KERN_SPARSE_OK);
                if (memcmp(p.out, whole + (size_t)(n - nq) * row, sizeof(float) * nq * row))
                    fail_msg("shape %zu B=%d: the last %d rows differ from the whole prompt's", i,
                             bs[ib], nq);
                free(mb.bits);
            }
            free(whole);
            free(full.bits);
            problem_free(&p);
        }
}

static void test_block_sparse_rejects_bad_masks_and_arguments(void **state)
{
    (void)state;
    rng_seed(16);
    problem p;
    problem_init(&p, (shape){40, 100, 4, 2, 16, 0, 0});
    mask_buf mb;
    mask_alloc(&mb, 16, 1, 100, 40);
    kern_block_mask_fill_causal(&mb.m);
    const kern_block_mask good = mb.m;
    /* Missing diagonal. */
    kern_block_mask_row(&mb.m, 0, 6)[0] &= ~((uint64_t)1 << 6);
    assert_int_equal(kern_attention_block_sparse_f32(NULL, &p.a, &mb.m), KERN_SPARSE_EINVAL);
    kern_block_mask_set(&mb.m, 0, 6, 6);
    /* A block above the diagonal. */
    kern_block_mask_set(&mb.m, 0, 4, 5);
    assert_int_equal(kern_attention_block_sparse_f32(NULL, &p.a, &mb.m), KERN_SPARSE_EINVAL);
    kern_block_mask_fill_causal(&mb.m);
    /* A mask of another shape. */
    kern_attn_args a = p.a;
    a.n_q = 39;
    assert_int_equal(kern_attention_block_sparse_f32(NULL, &a, &mb.m), KERN_SPARSE_EINVAL);
    kern_block_mask m = good;
    m.n_lists = 3; /* does not divide 4 heads */
    assert_int_equal(kern_attention_block_sparse_f32(NULL, &p.a, &m), KERN_SPARSE_EINVAL);
    assert_int_equal(kern_attention_block_sparse_f32(NULL, &p.a, NULL), KERN_SPARSE_EINVAL);
    /* Bad attention arguments. */
    const kern_attn_args bad[] = {
        {.q = p.q,
         .k = p.k,
         .v = p.v,
         .out = p.out,
         .n_q = 41,
         .ctx_len = 40,
         .n_heads = 4,
         .n_kv_heads = 2,
         .head_dim = 16,
         .kv_stride = 32},
        {.q = p.q,
         .k = p.k,
         .v = p.v,
         .out = p.out,
         .n_q = 40,
         .ctx_len = 100,
         .n_heads = 4,
         .n_kv_heads = 3,
         .head_dim = 16,
         .kv_stride = 48},
        {.q = p.q,
         .k = p.k,
         .v = p.v,
         .out = p.out,
         .n_q = 40,
         .ctx_len = 100,
         .n_heads = 4,
         .n_kv_heads = 2,
         .head_dim = 0,
         .kv_stride = 32},
        {.q = p.q,
         .k = p.k,
         .v = p.v,
         .out = p.out,
         .n_q = 40,
         .ctx_len = 100,
         .n_heads = 4,
         .n_kv_heads = 2,
         .head_dim = 512,
         .kv_stride = 1024},
        {.q = p.q,
         .k = p.k,
         .v = p.v,
         .out = p.out,
         .n_q = 40,
         .ctx_len = 100,
         .n_heads = 4,
         .n_kv_heads = 2,
         .head_dim = 16,
         .kv_stride = 31},
        {.q = NULL,
         .k = p.k,
         .v = p.v,
         .out = p.out,
         .n_q = 40,
         .ctx_len = 100,
         .n_heads = 4,
         .n_kv_heads = 2,
         .head_dim = 16,
         .kv_stride = 32},
        {.q = p.q,
         .k = p.k,
         .v = p.v,
         .out = p.out,
         .n_q = 40,
         .ctx_len = 100,
         .n_heads = 4,
         .n_kv_heads = 2,
         .head_dim = 16,
         .kv_stride = 32,
         .blocks = (const int32_t *)p.q,
         .block_size = 0},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(kern_attention_block_sparse_f32(NULL, &bad[i], &mb.m), KERN_SPARSE_EINVAL);
    /* Nothing was written. */
    for (size_t i = 0; i < p.nq_floats; i++)
        assert_true(isnan(p.out[i]));
    /* Mask shapes. */
    uint64_t w[4];
    assert_int_equal(kern_block_mask_words(0, 1, 100, 40), 0);
    assert_int_equal(kern_block_mask_words(16, 0, 100, 40), 0);
    assert_int_equal(kern_block_mask_words(16, 1, 39, 40), 0);
    assert_int_equal(kern_block_mask_words(16, 1, 100, 0), 0);
    assert_int_equal(kern_block_mask_init(&m, w, 4, 0, 1, 100, 40), KERN_SPARSE_EINVAL);
    assert_int_equal(kern_block_mask_init(&m, w, 4, 1, 1, 1000, 1000), KERN_SPARSE_ENOSPC);
    free(mb.bits);
    problem_free(&p);
}

static void test_block_mask_density_is_share_of_causal_blocks(void **state)
{
    (void)state;
    mask_buf mb;
    kern_sparse_stats st;
    /* 10 blocks of 16, full prompt: 55 causal blocks per head. */
    mask_alloc(&mb, 16, 1, 160, 160);
    kern_block_mask_fill_causal(&mb.m);
    kern_block_mask_stats(&mb.m, 8, &st);
    assert_int_equal(st.causal, 8 * 55);
    assert_int_equal(st.computed, 8 * 55);
    assert_true(kern_sparse_density(&st) == 1.0);
    memset(mb.bits, 0, sizeof(uint64_t) * kern_block_mask_words(16, 1, 160, 160));
    for (int r = 0; r < 10; r++)
        kern_block_mask_set(&mb.m, 0, r, r);
    kern_block_mask_stats(&mb.m, 8, &st);
    assert_int_equal(st.computed, 8 * 10);
    assert_true(fabs(kern_sparse_density(&st) - 10.0 / 55.0) < 1e-12);
    free(mb.bits);
    /* A chunk: rows 100..159 are blocks 6..9, 7 + 8 + 9 + 10 causal blocks. */
    mask_alloc(&mb, 16, 2, 160, 60);
    assert_int_equal(mb.m.q_block0, 6);
    assert_int_equal(mb.m.n_qblocks, 4);
    kern_block_mask_fill_causal(&mb.m);
    kern_block_mask_stats(&mb.m, 4, &st);
    assert_int_equal(st.causal, 4 * 34);
    assert_int_equal(st.computed, 4 * 34);
    free(mb.bits);
}

static void test_masked_ref_with_causal_mask_equals_dense_ref_and_empty_row_is_zero(void **state)
{
    (void)state;
    rng_seed(17);
    problem p;
    problem_init(&p, (shape){20, 50, 4, 2, 8, 0, 0});
    uint8_t *all = malloc((size_t)4 * 20 * 50);
    assert_non_null(all);
    memset(all, 1, (size_t)4 * 20 * 50);
    kern_attention_masked_ref(&p.a, all);
    float *ref = dense_ref(&p);
    assert_true(abs_err(p.out, ref, p.nq_floats) <= 1e-6);
    memset(all + (size_t)(1 * 20 + 3) * 50, 0, 50); /* head 1, row 3 attends nothing */
    kern_attention_masked_ref(&p.a, all);
    for (int d = 0; d < 8; d++)
        assert_true(p.out[((size_t)3 * 4 + 1) * 8 + d] == 0.0f);
    free(all);
    free(ref);
    problem_free(&p);
}

/* ---- probe profiles ---- */

static void test_probe_profiles_match_brute_force_softmax(void **state)
{
    (void)state;
    rng_seed(21);
    const shape shapes[] = {
        {100, 100, 4, 2, 16, 0, 0}, {60, 211, 8, 2, 64, 16, 3}, {40, 40, 2, 1, 8, 0, 0}};
    const int probes[] = {16, 40, 40};
    for (int si = 0; si < 3; si++) {
        problem p;
        problem_init(&p, shapes[si]);
        for (size_t i = 0; i < p.nq_floats; i++)
            p.q[i] *= 4.0f; /* peaky rows */
        const int n = p.s.ctx_len, H = p.s.n_heads, D = p.s.head_dim, np = probes[si];
        float *vert = alloc_floats((size_t)H * n), *slash = alloc_floats((size_t)H * n);
        float *scratch = alloc_floats(kern_probe_scratch_floats(H, D, np));
        assert_int_equal(kern_attention_probe_profiles_f32(pool4, &p.a, np, vert, slash, scratch),
                         KERN_SPARSE_OK);
        double *bv = calloc((size_t)n, sizeof(double)), *bs = calloc((size_t)n, sizeof(double));
        double *w = calloc((size_t)n, sizeof(double));
        assert_true(bv && bs && w);
        for (int h = 0; h < H; h++) {
            memset(bv, 0, sizeof(double) * (size_t)n);
            memset(bs, 0, sizeof(double) * (size_t)n);
            const int kvh = h / (H / p.s.n_kv_heads);
            for (int i = 0; i < np; i++) {
                const int r = p.s.n_q - np + i, pos = n - np + i;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j <= pos; j++) {
                    double d = 0.0;
                    for (int e = 0; e < D; e++)
                        d += (double)*q_at(&p, r, h, e) * *kv_at(&p, p.k, j, kvh, e);
                    w[j] = d / sqrt((double)D);
                    mx = fmax(mx, w[j]);
                }
                for (int j = 0; j <= pos; j++)
                    sum += (w[j] = exp(w[j] - mx));
                for (int j = 0; j <= pos; j++) {
                    bv[j] += w[j] / sum / np;
                    bs[pos - j] += w[j] / sum / np;
                }
            }
            double sv = 0.0, ss = 0.0;
            for (int j = 0; j < n; j++) {
                const double ev = fabs(vert[(size_t)h * n + j] - bv[j]);
                const double es = fabs(slash[(size_t)h * n + j] - bs[j]);
                if (!(ev <= 1e-6 && es <= 1e-6))
                    fail_msg("shape %d head %d key %d: vertical %g vs %g, slash %g vs %g", si, h, j,
                             vert[(size_t)h * n + j], bv[j], slash[(size_t)h * n + j], bs[j]);
                sv += vert[(size_t)h * n + j];
                ss += slash[(size_t)h * n + j];
            }
            assert_true(fabs(sv - 1.0) < 1e-5 && fabs(ss - 1.0) < 1e-5);
        }
        assert_int_equal(
            kern_attention_probe_profiles_f32(NULL, &p.a, p.s.n_q + 1, vert, slash, scratch),
            KERN_SPARSE_EINVAL);
        free(bv);
        free(bs);
        free(w);
        free(vert);
        free(slash);
        free(scratch);
        problem_free(&p);
    }
}

/* ---- FlexPrefill ---- */

static kern_flex_params flex_params(float gamma, float tau, int min_budget, int B)
{
    kern_flex_params fp;
    kern_flex_params_default(&fp);
    fp.gamma = gamma;
    fp.tau = tau;
    fp.min_budget = min_budget;
    fp.block_size = B;
    return fp;
}

static kern_flex_ws *flex_ws_for(const problem *p, int min_block)
{
    kern_flex_ws *ws = kern_flex_ws_create(p->s.ctx_len, p->s.n_heads, p->s.n_kv_heads,
                                           p->s.head_dim, min_block, 4);
    assert_non_null(ws);
    return ws;
}

/* Recipe 1.7.2: gamma 1, tau 0 selects every block and equals dense. */
static void test_flex_gamma_1_tau_0_equals_dense(void **state)
{
    (void)state;
    rng_seed(31);
    const shape shapes[] = {{5 * 16 + 17, 5 * 16 + 17, 8, 4, 64, 0, 0},
                            {300, 300, 8, 1, 8, 16, 0},
                            {200, 333, 8, 2, 128, 16, 2}};
    for (int i = 0; i < 3; i++) {
        problem p;
        problem_init(&p, shapes[i]);
        kern_flex_ws *ws = flex_ws_for(&p, 16);
        const kern_flex_params fp = flex_params(1.0f, 0.0f, 0, 16);
        kern_flex_result res;
        assert_int_equal(kern_flexprefill_attention_f32(pool4, &p.a, &fp, ws, &res),
                         KERN_SPARSE_OK);
        assert_int_equal(res.path, KERN_FLEX_SPARSE);
        assert_int_equal(res.chunked, p.s.n_q < p.s.ctx_len);
        assert_true(res.density == 1.0);
        float *ref = dense_ref(&p);
        const double e = rel_err(p.out, ref, p.nq_floats);
        if (!(e <= 1e-5) || !guards_intact(&p))
            fail_msg("shape %d: rel err %g > 1e-5", i, e);
        free(ref);
        kern_flex_ws_destroy(ws);
        problem_free(&p);
    }
}

/* Recipe 1.7.3: decode, short prompts, min_budget >= N and short chunks take
 * the dense kernel, bit for bit. */
static void test_flex_dense_fallbacks_are_bit_identical_to_dense(void **state)
{
    (void)state;
    rng_seed(32);
    const struct {
        shape s;
        int min_budget;
        kern_flex_path path;
    } cases[] = {
        {{1, 300, 8, 2, 16, 0, 0}, 0, KERN_FLEX_DENSE_DECODE},
        {{64, 64, 8, 2, 16, 0, 0}, 0, KERN_FLEX_DENSE_SHORT},     /* N = 2B */
        {{200, 200, 8, 2, 16, 0, 0}, 200, KERN_FLEX_DENSE_SHORT}, /* min_budget >= N */
        {{64, 300, 8, 2, 16, 16, 0}, 0, KERN_FLEX_DENSE_SHORT_CHUNK},
    };
    for (int i = 0; i < 4; i++) {
        problem p;
        problem_init(&p, cases[i].s);
        kern_flex_ws *ws = flex_ws_for(&p, 32);
        const kern_flex_params fp = flex_params(0.9f, 0.1f, cases[i].min_budget, 32);
        kern_flex_result res;
        assert_int_equal(kern_flexprefill_attention_f32(pool4, &p.a, &fp, ws, &res),
                         KERN_SPARSE_OK);
        assert_int_equal(res.path, cases[i].path);
        assert_true(res.density == 1.0);
        assert_true(res.blocks.computed == res.blocks.causal && res.blocks.causal > 0);
        float *dense = alloc_floats(p.nq_floats);
        kern_attn_args a = p.a;
        a.out = dense;
        kern_attention_f32(pool4, &a);
        assert_memory_equal(dense, p.out, sizeof(float) * p.nq_floats);
        free(dense);
        kern_flex_ws_destroy(ws);
        problem_free(&p);
    }
}

/* Sets every K and V element of kv head kvh, and every query of its group, to
 * zero (the hand-made patterns below write the entries they need). */
static void zero_inputs(problem *p)
{
    for (int j = 0; j < p->s.ctx_len; j++)
        for (int h = 0; h < p->s.n_kv_heads; h++)
            for (int d = 0; d < p->s.head_dim; d++) {
                *kv_at(p, p->k, j, h, d) = 0.0f;
                *kv_at(p, p->v, j, h, d) = rnd(-1.0f, 1.0f);
            }
    memset(p->q, 0, sizeof(float) * p->nq_floats);
}

static kern_block_mask flex_select(problem *p, kern_flex_ws *ws, const kern_flex_params *fp,
                                   kern_flex_result *res)
{
    kern_block_mask m;
    assert_int_equal(kern_flexprefill_select(pool4, &p->a, fp, ws, &m, res), KERN_SPARSE_OK);
    assert_int_equal(res->path, KERN_FLEX_SPARSE);
    return m;
}

/* Recipe 1.7.4: all mass on key 0 gives the vertical set {0} padded to minB
 * (ties go to the lowest blocks: 1, 2, 3). */
static void test_flex_all_mass_on_key_0_selects_sink_column_padded_to_min_budget(void **state)
{
    (void)state;
    rng_seed(33);
    problem p;
    problem_init(&p, (shape){160, 160, 2, 1, 16, 0, 0});
    zero_inputs(&p);
    *kv_at(&p, p.k, 0, 0, 0) = 10.0f;
    for (int r = 0; r < 160; r++)
        for (int h = 0; h < 2; h++)
            *q_at(&p, r, h, 0) = 10.0f;
    kern_flex_ws *ws = flex_ws_for(&p, 16);
    const kern_flex_params fp = flex_params(0.9f, 0.0f, 64, 16); /* minB = 4 */
    kern_flex_result res;
    const kern_block_mask m = flex_select(&p, ws, &fp, &res);
    for (int h = 0; h < 2; h++) {
        kern_flex_head info;
        assert_int_equal(kern_flex_head_info(ws, h, &info), KERN_SPARSE_OK);
        assert_int_equal(info.n_vertical, 4);
        assert_int_equal(info.query_aware, 0);
        for (int r = 0; r < 10; r++)
            for (int c = 0; c <= r && c < 4; c++)
                assert_true(kern_block_mask_get(&m, h, r, c));
    }
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

/* Recipe 1.7.4: every query attending only itself gives the slash set {d = 0}
 * and the forced sink column, nothing else. */
static void test_flex_pure_diagonal_selects_only_the_diagonal_and_sink(void **state)
{
    (void)state;
    rng_seed(34);
    problem p;
    problem_init(&p, (shape){160, 160, 2, 1, 64, 0, 0});
    zero_inputs(&p);
    for (int j = 0; j < 160; j++) {
        float x[64], norm = 0.0f;
        for (int d = 0; d < 64; d++) {
            x[d] = rnd(-1.0f, 1.0f);
            norm += x[d] * x[d];
        }
        for (int d = 0; d < 64; d++) {
            *kv_at(&p, p.k, j, 0, d) = 30.0f * x[d] / sqrtf(norm);
            for (int h = 0; h < 2; h++)
                *q_at(&p, j, h, d) = 30.0f * x[d] / sqrtf(norm);
        }
    }
    kern_flex_ws *ws = flex_ws_for(&p, 16);
    const kern_flex_params fp = flex_params(0.9f, 0.0f, 0, 16); /* minB = 1 */
    kern_flex_result res;
    const kern_block_mask m = flex_select(&p, ws, &fp, &res);
    for (int h = 0; h < 2; h++) {
        kern_flex_head info;
        assert_int_equal(kern_flex_head_info(ws, h, &info), KERN_SPARSE_OK);
        assert_int_equal(info.n_vertical, 1);
        assert_int_equal(info.n_slash, 1);
        for (int r = 0; r < 10; r++)
            for (int c = 0; c <= r; c++)
                assert_int_equal(kern_block_mask_get(&m, h, r, c), c == 0 || c == r);
    }
    assert_true(fabs(res.density - (2.0 * 10 - 1) / 55.0) < 1e-12);
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

/* Recipe 1.7.4: mass uniform over one column block c* selects c* in every row
 * r >= c*. */
static void test_flex_mass_on_one_column_block_selects_it_in_every_later_row(void **state)
{
    (void)state;
    rng_seed(35);
    problem p;
    problem_init(&p, (shape){192, 192, 4, 2, 16, 16, 0});
    zero_inputs(&p);
    for (int j = 5 * 16; j < 6 * 16; j++)
        for (int h = 0; h < 2; h++)
            *kv_at(&p, p.k, j, h, 0) = 10.0f;
    for (int r = 0; r < 192; r++)
        for (int h = 0; h < 4; h++)
            *q_at(&p, r, h, 0) = 10.0f;
    kern_flex_ws *ws = flex_ws_for(&p, 16);
    const kern_flex_params fp = flex_params(0.9f, 0.0f, 32, 16); /* minB = 2: {0, c*} */
    kern_flex_result res;
    const kern_block_mask m = flex_select(&p, ws, &fp, &res);
    for (int h = 0; h < 4; h++)
        for (int r = 0; r < 12; r++)
            assert_int_equal(kern_block_mask_get(&m, h, r, r >= 5 ? 5 : r), 1);
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

/* Recipe 1.7.5. */
static void test_flex_js_distance_is_0_for_equal_and_sqrt_ln2_for_disjoint(void **state)
{
    (void)state;
    const float a[4] = {0.25f, 0.25f, 0.5f, 0.0f}, b[4] = {0.5f, 0.5f, 0.0f, 0.0f},
                c[4] = {0.0f, 0.0f, 0.5f, 0.5f};
    assert_true(kern_flex_js_distance(a, a, 4) == 0.0);
    assert_true(fabs(kern_flex_js_distance(b, c, 4) - sqrt(log(2.0))) < 1e-7);
    assert_true(fabs(kern_flex_js_distance(b, c, 4) - 0.83255) < 1e-5);
    const double x = kern_flex_js_distance(a, b, 4);
    assert_true(x > 0.0 && x < sqrt(log(2.0)) && x == kern_flex_js_distance(b, a, 4));
}

/* Inputs with the structure of real attention, in score units (q.k/sqrt(D)):
 * a sink at key 0 (score 12 for every query), a local bias that peaks at 8 at
 * distance 0 (8 rotating pairs of dimensions, periods 8 to 512 tokens, as RoPE
 * makes them), unit-variance noise elsewhere, and two needle keys (20% and 50%
 * of the prompt) that chosen rows retrieve with score 20. The needle rows are
 * four rows of the last block and four in the middle of the query rows; they
 * are returned in rows[]. Needs head_dim >= 32. */
static int structured_inputs(problem *p, int *rows)
{
    const int n = p->s.ctx_len, D = p->s.head_dim, nq = p->s.n_q, q0 = n - nq;
    const float rs = sqrtf((float)D), amp = sqrtf(8.0f * rs / 8.0f);
    const float noise = sqrtf(3.0f); /* uniform [-1, 1] * sqrt(3): unit variance */
    float omega[8];
    for (int f = 0; f < 8; f++)
        omega[f] = 6.2831853f / (8.0f * powf(2.0f, (float)f * 6.0f / 7.0f));
    for (int j = 0; j < n; j++)
        for (int h = 0; h < p->s.n_kv_heads; h++) {
            float *k = kv_at(p, p->k, j, h, 0);
            for (int d = 0; d < D; d++)
                k[d] = d < 18 ? 0.0f : noise * rnd(-1.0f, 1.0f);
            for (int f = 0; f < 8; f++) {
                k[2 + 2 * f] = amp * cosf(omega[f] * (float)j);
                k[3 + 2 * f] = amp * sinf(omega[f] * (float)j);
            }
        }
    for (int h = 0; h < p->s.n_kv_heads; h++)
        *kv_at(p, p->k, 0, h, 0) = 3.0f * rs; /* sink: 4 * 3 sqrt(D) / sqrt(D) = 12 */
    for (int r = 0; r < nq; r++)
        for (int h = 0; h < p->s.n_heads; h++) {
            float *q = q_at(p, r, h, 0);
            const int pos = q0 + r;
            for (int d = 0; d < D; d++)
                q[d] = d < 18 ? 0.0f : noise * rnd(-1.0f, 1.0f);
            q[0] = 4.0f;
            for (int f = 0; f < 8; f++) {
                q[2 + 2 * f] = amp * cosf(omega[f] * (float)pos);
                q[3 + 2 * f] = amp * sinf(omega[f] * (float)pos);
            }
        }
    const int keys[2] = {n / 5, n / 2};
    for (int t = 0; t < 2; t++)
        for (int h = 0; h < p->s.n_kv_heads; h++)
            *kv_at(p, p->k, keys[t], h, 1) = (t ? 2.5f : -2.5f) * rs;
    int count = 0;
    for (int i = 0; i < 8; i++) {
        const int r = i < 4 ? nq - 1 - 3 * i : nq / 2 + 5 * i;
        for (int h = 0; h < p->s.n_heads; h++)
            *q_at(p, r, h, 1) = i % 2 ? 8.0f : -8.0f; /* 8 * 2.5 = score 20 */
        rows[count++] = r;
    }
    return count;
}

/* Recipe 1.7.5: tau 0 never makes a head query-aware; tau 1 makes every head
 * query-aware (D_JS is at most sqrt(ln 2) < 1). */
static void test_flex_tau_0_never_and_tau_1_always_query_aware(void **state)
{
    (void)state;
    rng_seed(36);
    problem p;
    problem_init(&p, (shape){512, 512, 8, 2, 32, 0, 0});
    int rows[8];
    structured_inputs(&p, rows);
    kern_flex_ws *ws = flex_ws_for(&p, 32);
    kern_flex_result res;
    kern_flex_params fp = flex_params(0.9f, 0.0f, 64, 32);
    flex_select(&p, ws, &fp, &res);
    assert_int_equal(res.n_query_aware, 0);
    fp.tau = 1.0f;
    const kern_block_mask m = flex_select(&p, ws, &fp, &res);
    assert_int_equal(res.n_query_aware, 8);
    for (int h = 0; h < 8; h++) {
        kern_flex_head info;
        assert_int_equal(kern_flex_head_info(ws, h, &info), KERN_SPARSE_OK);
        assert_true(info.query_aware && info.js_distance <= sqrtf(logf(2.0f)) + 1e-6f);
        assert_int_equal(info.n_vertical, 2); /* forced to minB */
        assert_int_equal(info.n_slash, 2);
    }
    /* The query-aware result is still a valid mask for the kernel. */
    assert_int_equal(kern_attention_block_sparse_f32(pool4, &p.a, &m), KERN_SPARSE_OK);
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

/* Recipe 1.7.6: budgets are clamped to [minB, maxB]; with maxB < minB the cap wins. */
static void test_flex_budgets_are_clamped_to_min_and_max(void **state)
{
    (void)state;
    rng_seed(37);
    problem p;
    problem_init(&p, (shape){640, 640, 8, 2, 32, 0, 0});
    int rows[8];
    structured_inputs(&p, rows);
    kern_flex_ws *ws = flex_ws_for(&p, 32);
    kern_flex_result res;
    kern_flex_params fp = flex_params(0.9f, 0.0f, 3 * 32, 32);
    kern_block_mask m = flex_select(&p, ws, &fp, &res);
    for (int h = 0; h < 8; h++) {
        kern_flex_head info;
        assert_int_equal(kern_flex_head_info(ws, h, &info), KERN_SPARSE_OK);
        assert_true(info.n_vertical >= 3 && info.n_vertical <= 20);
        assert_true(info.n_slash >= 3 && info.n_slash <= 20);
        /* The last row holds every column and every diagonal once. */
        int n = 0;
        for (int c = 0; c < 20; c++)
            n += kern_block_mask_get(&m, h, 19, c);
        assert_true(n >= info.n_vertical && n >= info.n_slash &&
                    n <= info.n_vertical + info.n_slash);
    }
    fp.min_budget = 8 * 32;
    fp.max_budget = 2 * 32;
    m = flex_select(&p, ws, &fp, &res);
    for (int h = 0; h < 8; h++) {
        kern_flex_head info;
        assert_int_equal(kern_flex_head_info(ws, h, &info), KERN_SPARSE_OK);
        assert_int_equal(info.n_vertical, 2);
        assert_int_equal(info.n_slash, 2);
        for (int r = 0; r < 20; r++) {
            int n = 0;
            for (int c = 0; c <= r; c++)
                n += kern_block_mask_get(&m, h, r, c);
            assert_true(n >= 1 && n <= 4);
        }
    }
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

/* Recipe 1.7.7: permuting the query heads of a group permutes the outputs, and
 * a head reads only its own group's K/V. */
static void test_flex_gqa_heads_permute_within_group_and_read_their_own_kv(void **state)
{
    (void)state;
    rng_seed(38);
    problem p;
    problem_init(&p, (shape){512, 512, 8, 2, 32, 16, 0});
    int rows[8];
    structured_inputs(&p, rows);
    kern_flex_ws *ws = flex_ws_for(&p, 32);
    const kern_flex_params fp = flex_params(0.9f, 0.1f, 64, 32);
    kern_flex_result res;
    const size_t hd = 32, row = 8 * hd;
    assert_int_equal(kern_flexprefill_attention_f32(pool4, &p.a, &fp, ws, &res), KERN_SPARSE_OK);
    float *base = alloc_floats(p.nq_floats);
    memcpy(base, p.out, sizeof(float) * p.nq_floats);
    /* Reverse the heads inside each group of 4. */
    const int perm[8] = {3, 2, 1, 0, 7, 6, 5, 4};
    float *q0 = alloc_floats(p.nq_floats);
    memcpy(q0, p.q, sizeof(float) * p.nq_floats);
    for (int r = 0; r < 512; r++)
        for (int h = 0; h < 8; h++)
            memcpy(p.q + r * row + perm[h] * hd, q0 + r * row + h * hd, sizeof(float) * hd);
    assert_int_equal(kern_flexprefill_attention_f32(pool4, &p.a, &fp, ws, &res), KERN_SPARSE_OK);
    for (int r = 0; r < 512; r++)
        for (int h = 0; h < 8; h++)
            assert_memory_equal(p.out + r * row + perm[h] * hd, base + r * row + h * hd,
                                sizeof(float) * hd);
    memcpy(p.q, q0, sizeof(float) * p.nq_floats);
    /* Shift kv head 1's values by 1: heads 0-3 are unchanged, heads 4-7 move by 1. */
    for (int j = 0; j < 512; j++)
        for (int d = 0; d < 32; d++)
            *kv_at(&p, p.v, j, 1, d) += 1.0f;
    assert_int_equal(kern_flexprefill_attention_f32(pool4, &p.a, &fp, ws, &res), KERN_SPARSE_OK);
    for (int r = 0; r < 512; r++) {
        assert_memory_equal(p.out + r * row, base + r * row, sizeof(float) * 4 * hd);
        for (size_t i = 4 * hd; i < row; i++)
            assert_true(fabsf(p.out[r * row + i] - base[r * row + i] - 1.0f) < 1e-5f);
    }
    free(q0);
    free(base);
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

/* Relative L2 error of one output row (all heads) against a reference row. */
static double row_rel_l2(const float *x, const float *ref, size_t n)
{
    double e = 0.0, s = 0.0;
    for (size_t i = 0; i < n; i++) {
        e += ((double)x[i] - ref[i]) * ((double)x[i] - ref[i]);
        s += (double)ref[i] * ref[i];
    }
    return sqrt(e / (s > 0.0 ? s : 1e-30));
}

/* On structured inputs gamma 0.9 skips blocks and keeps the needle rows within
 * 1% of dense, for a whole prompt and for a chunk after a cached prefix
 * (the chunked extension), and the selection only covers the chunk's rows. */
static void test_flex_structured_input_is_sparse_and_needle_rows_stay_within_1pct(void **state)
{
    (void)state;
    const shape shapes[] = {{1024, 1024, 8, 2, 64, 16, 0}, {512, 1024, 8, 2, 64, 16, 0}};
    for (int si = 0; si < 2; si++) {
        rng_seed(39);
        problem p;
        problem_init(&p, shapes[si]);
        int rows[8];
        const int n_rows = structured_inputs(&p, rows);
        kern_flex_ws *ws = flex_ws_for(&p, 32);
        const kern_flex_params fp = flex_params(0.9f, 0.1f, 128, 32);
        kern_flex_result res;
        assert_int_equal(kern_flexprefill_attention_f32(pool4, &p.a, &fp, ws, &res),
                         KERN_SPARSE_OK);
        assert_int_equal(res.path, KERN_FLEX_SPARSE);
        assert_int_equal(res.chunked, si == 1);
        assert_true(res.density > 0.0 && res.density < 0.6);
        const size_t w = 8 * 64;
        for (int i = 0; i < n_rows; i++) {
            const int r = rows[i];
            float ref[8 * 64];
            kern_attn_args a = p.a; /* row r alone: the end of a context of pos + 1 */
            a.q = p.q + (size_t)r * w;
            a.out = ref;
            a.n_q = 1;
            a.ctx_len = p.s.ctx_len - p.s.n_q + r + 1;
            kern_attention_f32(NULL, &a);
            const double e = row_rel_l2(p.out + (size_t)r * w, ref, w);
            if (!(e < 0.01))
                fail_msg("shape %d needle row %d: relative error %g >= 1%%", si, r, e);
        }
        kern_flex_ws_destroy(ws);
        problem_free(&p);
    }
}

/* Spec 1.3 flag: with gqa_union each group's list is the union of its heads'
 * sets, and density does not drop. */
static void test_flex_gqa_union_is_the_union_of_the_group_sets(void **state)
{
    (void)state;
    rng_seed(40);
    problem p;
    problem_init(&p, (shape){640, 640, 8, 2, 32, 0, 0});
    int rows[8];
    structured_inputs(&p, rows);
    kern_flex_ws *ws = flex_ws_for(&p, 32);
    kern_flex_params fp = flex_params(0.9f, 0.1f, 64, 32);
    kern_flex_result res_head, res_union;
    const kern_block_mask mh = flex_select(&p, ws, &fp, &res_head);
    const size_t words = kern_block_mask_words(32, 8, 640, 640);
    uint64_t *heads = malloc(sizeof(uint64_t) * words);
    assert_non_null(heads);
    memcpy(heads, mh.bits, sizeof(uint64_t) * words);
    fp.gqa_union = 1;
    const kern_block_mask mu = flex_select(&p, ws, &fp, &res_union);
    assert_int_equal(mu.n_lists, 2);
    for (int g = 0; g < 2; g++)
        for (int i = 0; i < mu.n_qblocks; i++)
            for (int w = 0; w < mu.words; w++) {
                uint64_t x = 0;
                for (int h = 4 * g; h < 4 * g + 4; h++)
                    x |= heads[((size_t)h * mh.n_qblocks + i) * mh.words + w];
                assert_true(kern_block_mask_row(&mu, g, i)[w] == x);
            }
    assert_true(res_union.density >= res_head.density);
    assert_int_equal(kern_attention_block_sparse_f32(pool4, &p.a, &mu), KERN_SPARSE_OK);
    free(heads);
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

static void test_flex_selection_and_output_are_deterministic(void **state)
{
    (void)state;
    rng_seed(41);
    problem p;
    problem_init(&p, (shape){512, 512, 8, 2, 32, 0, 0});
    int rows[8];
    structured_inputs(&p, rows);
    kern_flex_ws *ws = flex_ws_for(&p, 32);
    const kern_flex_params fp = flex_params(0.9f, 0.1f, 64, 32);
    kern_pool *pool2 = kern_pool_create(2);
    kern_pool *pools[] = {NULL, pool2, pool4};
    float *first = alloc_floats(p.nq_floats);
    kern_flex_result res, first_res;
    for (int i = 0; i < 3; i++) {
        problem_reset_out(&p);
        assert_int_equal(kern_flexprefill_attention_f32(pools[i], &p.a, &fp, ws, &res),
                         KERN_SPARSE_OK);
        if (i == 0) {
            memcpy(first, p.out, sizeof(float) * p.nq_floats);
            first_res = res;
        } else {
            assert_memory_equal(first, p.out, sizeof(float) * p.nq_floats);
            assert_true(res.blocks.computed == first_res.blocks.computed);
            assert_int_equal(res.n_query_aware, first_res.n_query_aware);
        }
    }
    kern_pool_destroy(pool2);
    free(first);
    kern_flex_ws_destroy(ws);
    problem_free(&p);
}

static void test_flex_rejects_bad_parameters_naming_the_field(void **state)
{
    (void)state;
    char err[128];
    kern_flex_params fp;
    kern_flex_params_default(&fp);
    assert_int_equal(kern_flex_params_check(&fp, err, sizeof err), KERN_SPARSE_OK);
    assert_true(fp.gamma == 0.9f && fp.tau == 0.1f && fp.min_budget == 1024 && fp.max_budget == 0 &&
                fp.block_size == 128 && fp.gqa_union == 0);
    const struct {
        const char *field;
        float gamma, tau;
        int min_budget, max_budget, block_size, gqa_union;
    } bad[] = {
        {"gamma", 0.0f, 0.1f, 0, 0, 64, 0},       {"gamma", 1.01f, 0.1f, 0, 0, 64, 0},
        {"gamma", -0.5f, 0.1f, 0, 0, 64, 0},      {"gamma", NAN, 0.1f, 0, 0, 64, 0},
        {"tau", 0.9f, -0.01f, 0, 0, 64, 0},       {"tau", 0.9f, 1.5f, 0, 0, 64, 0},
        {"tau", 0.9f, NAN, 0, 0, 64, 0},          {"min_budget", 0.9f, 0.1f, -1, 0, 64, 0},
        {"max_budget", 0.9f, 0.1f, 0, -5, 64, 0}, {"block_size", 0.9f, 0.1f, 0, 0, 0, 0},
        {"block_size", 0.9f, 0.1f, 0, 0, 7, 0},   {"block_size", 0.9f, 0.1f, 0, 0, 512, 0},
        {"gqa_union", 0.9f, 0.1f, 0, 0, 64, 2},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        fp = (kern_flex_params){bad[i].gamma,      bad[i].tau,        bad[i].min_budget,
                                bad[i].max_budget, bad[i].block_size, bad[i].gqa_union};
        err[0] = '\0';
        assert_int_equal(kern_flex_params_check(&fp, err, sizeof err), KERN_SPARSE_EINVAL);
        if (!strstr(err, bad[i].field))
            fail_msg("case %zu: message \"%s\" does not name %s", i, err, bad[i].field);
    }
    assert_int_equal(kern_flex_params_check(NULL, err, sizeof err), KERN_SPARSE_EINVAL);
    /* Workspaces: bad shapes are refused; too small ones give ENOSPC. */
    assert_null(kern_flex_ws_create(0, 8, 2, 64, 32, 1));
    assert_null(kern_flex_ws_create(100, 8, 3, 64, 32, 1));
    assert_null(kern_flex_ws_create(100, 8, 2, 0, 32, 1));
    assert_null(kern_flex_ws_create(100, 8, 2, 64, 4, 1));
    assert_null(kern_flex_ws_create(100, 8, 2, 64, 32, 0));
    rng_seed(42);
    problem p;
    problem_init(&p, (shape){300, 300, 8, 2, 16, 0, 0});
    kern_flex_result res;
    kern_block_mask m;
    kern_flex_ws *ws = kern_flex_ws_create(299, 8, 2, 16, 32, 4);
    fp = flex_params(0.9f, 0.1f, 0, 32);
    assert_int_equal(kern_flexprefill_select(NULL, &p.a, &fp, ws, &m, &res), KERN_SPARSE_ENOSPC);
    kern_flex_ws_destroy(ws);
    ws = kern_flex_ws_create(300, 8, 2, 16, 64, 4);
    assert_int_equal(kern_flexprefill_select(NULL, &p.a, &fp, ws, &m, &res), KERN_SPARSE_ENOSPC);
    kern_flex_ws_destroy(ws);
    ws = kern_flex_ws_create(300, 8, 2, 16, 32, 2);
    assert_int_equal(kern_flexprefill_select(pool4, &p.a, &fp, ws, &m, &res), KERN_SPARSE_ENOSPC);
    fp.gamma = 2.0f;
    assert_int_equal(kern_flexprefill_select(NULL, &p.a, &fp, ws, &m, &res), KERN_SPARSE_EINVAL);
    fp.gamma = 0.9f;
    assert_int_equal(kern_flexprefill_select(NULL, &p.a, &fp, NULL, &m, &res), KERN_SPARSE_EINVAL);
    kern_flex_head info;
    assert_int_equal(kern_flex_head_info(ws, 0, &info), KERN_SPARSE_EINVAL); /* none yet */
    kern_flex_ws_destroy(ws);
    kern_flex_ws_destroy(NULL);
    problem_free(&p);
}

/* ---- PowerAttention ---- */

static int power_brute(int r, int c, int W)
{
    const int d = r - c;
    return d >= 0 && (d < W || (d & (d - 1)) == 0 || c == 0);
}

static int floor_log2(int x)
{
    int l = -1;
    while (x > 0) {
        x >>= 1;
        l++;
    }
    return l;
}

/* Recipe 2.7.1 and 2.7.5. */
static void test_power_blocks_and_mask_match_brute_force(void **state)
{
    (void)state;
    const kern_power_params worked = {16, 2};
    int32_t out[64];
    const int32_t expect[] = {0, 5, 9, 11, 12, 13};
    assert_int_equal(kern_power_blocks(&worked, 13, out, 64), 6);
    assert_memory_equal(out, expect, sizeof expect);
    const int bs[] = {1, 4, 16}, ws[] = {1, 2, 5};
    const int N = 2000;
    for (int ib = 0; ib < 3; ib++)
        for (int iw = 0; iw < 3; iw++) {
            const kern_power_params pp = {bs[ib], ws[iw]};
            const int nb = (N + pp.block_size - 1) / pp.block_size;
            mask_buf mb;
            mask_alloc(&mb, pp.block_size, 1, N, N);
            assert_int_equal(kern_power_mask(&pp, &mb.m), KERN_SPARSE_OK);
            const int bound = pp.window_blocks + floor_log2(nb) + (pp.window_blocks == 1 ? 2 : 1);
            for (int r = 0; r < nb; r++) {
                const int n = kern_power_blocks(&pp, r, out, 64);
                assert_true(n >= 1 && n <= bound);
                int k = 0;
                for (int c = 0; c <= r; c++) {
                    const int want = power_brute(r, c, pp.window_blocks);
                    if (want) {
                        assert_true(k < n);
                        assert_int_equal(out[k], c);
                        k++;
                    }
                    assert_int_equal(kern_block_mask_get(&mb.m, 0, r, c), want);
                }
                assert_int_equal(k, n);
            }
            free(mb.bits);
        }
    assert_int_equal(kern_power_blocks(&worked, 13, out, 5), KERN_SPARSE_ENOSPC);
}

/* Recipe 2.7.2: a window of every block is dense attention. */
static void test_power_full_window_equals_dense(void **state)
{
    (void)state;
    rng_seed(51);
    problem p;
    problem_init(&p, (shape){300, 300, 8, 2, 64, 16, 0});
    const kern_power_params pp = {32, 10}; /* nb = 10 */
    const size_t words = kern_block_mask_words(32, 1, 300, 300);
    uint64_t *bits = malloc(sizeof(uint64_t) * words);
    kern_sparse_stats st;
    assert_int_equal(kern_power_attention_f32(pool4, &p.a, &pp, bits, words, &st), KERN_SPARSE_OK);
    assert_true(kern_sparse_density(&st) == 1.0);
    float *ref = dense_ref(&p);
    const double e = rel_err(p.out, ref, p.nq_floats);
    if (!(e <= 1e-5) || !guards_intact(&p))
        fail_msg("rel err %g > 1e-5", e);
    free(ref);
    free(bits);
    problem_free(&p);
}

/* Recipe 2.7.3, with GQA (8, 4) and (8, 1), paged KV and a chunk. */
static void test_power_kernel_matches_masked_ref_with_gqa(void **state)
{
    (void)state;
    rng_seed(52);
    const shape shapes[] = {{400, 400, 8, 4, 32, 16, 0}, {150, 400, 8, 1, 64, 0, 0}};
    for (int i = 0; i < 2; i++) {
        problem p;
        problem_init(&p, shapes[i]);
        const kern_power_params pp = {16, 2};
        mask_buf mb;
        mask_alloc(&mb, 16, 1, p.s.ctx_len, p.s.n_q);
        assert_int_equal(kern_power_mask(&pp, &mb.m), KERN_SPARSE_OK);
        const double e = sparse_vs_ref(&p, &mb.m, pool4);
        if (!(e <= 1e-5))
            fail_msg("shape %d: rel err %g > 1e-5", i, e);
        free(mb.bits);
        problem_free(&p);
    }
}

/* Recipe 2.7.4: decoding position t gives row t of a one-shot prefill bit for
 * bit, and so does a prefill chunk after cached positions, with paged KV. */
static void test_power_decode_and_chunks_equal_one_shot_prefill(void **state)
{
    (void)state;
    rng_seed(53);
    problem p;
    problem_init(&p, (shape){300, 300, 8, 2, 64, 16, 0});
    const kern_power_params pp = {16, 2};
    const size_t words = kern_block_mask_words(16, 1, 300, 300);
    uint64_t *bits = malloc(sizeof(uint64_t) * words);
    assert_int_equal(kern_power_attention_f32(pool4, &p.a, &pp, bits, words, NULL), KERN_SPARSE_OK);
    const size_t w = 8 * 64;
    float *one = alloc_floats(p.nq_floats);
    const int ts[] = {0, 1, 15, 16, 17, 100, 255, 256, 299};
    for (int i = 0; i < 9; i++) {
        kern_attn_args a = p.a;
        a.q = p.q + (size_t)ts[i] * w;
        a.out = one;
        a.n_q = 1;
        a.ctx_len = ts[i] + 1;
        assert_int_equal(kern_power_attention_f32(NULL, &a, &pp, bits, words, NULL),
                         KERN_SPARSE_OK);
        assert_memory_equal(one, p.out + (size_t)ts[i] * w, sizeof(float) * w);
    }
    const int starts[] = {100, 37, 299};
    for (int i = 0; i < 3; i++) {
        kern_attn_args a = p.a;
        a.q = p.q + (size_t)starts[i] * w;
        a.out = one;
        a.n_q = 300 - starts[i];
        assert_int_equal(kern_power_attention_f32(pool4, &a, &pp, bits, words, NULL),
                         KERN_SPARSE_OK);
        assert_memory_equal(one, p.out + (size_t)starts[i] * w, sizeof(float) * a.n_q * w);
    }
    free(one);
    free(bits);
    problem_free(&p);
}

static void test_power_density_counts_the_pattern_blocks(void **state)
{
    (void)state;
    rng_seed(54);
    problem p;
    problem_init(&p, (shape){1024, 1024, 4, 1, 8, 0, 0});
    const kern_power_params pp = {16, 3}; /* nb = 64 */
    const size_t words = kern_block_mask_words(16, 1, 1024, 1024);
    uint64_t *bits = malloc(sizeof(uint64_t) * words);
    kern_sparse_stats st;
    assert_int_equal(kern_power_attention_f32(pool4, &p.a, &pp, bits, words, &st), KERN_SPARSE_OK);
    int64_t blocks = 0;
    int32_t out[64];
    for (int r = 0; r < 64; r++)
        blocks += kern_power_blocks(&pp, r, out, 64);
    assert_true(st.computed == 4 * blocks);
    assert_true(st.causal == 4 * 64 * 65 / 2);
    assert_true(kern_sparse_density(&st) < 0.3);
    free(bits);
    problem_free(&p);
}

static void test_power_dense_layers_default_2_of_every_7(void **state)
{
    (void)state;
    int k, n;
    char err[160];
    assert_int_equal(kern_power_dense_layers_parse("2 of every 7", &k, &n, err, sizeof err),
                     KERN_SPARSE_OK);
    assert_int_equal(k, 2);
    assert_int_equal(n, 7);
    const int dense[] = {0, 1, 7, 8, 14, 15, 21, 22, 28, 29};
    int seen = 0;
    for (int layer = 0; layer < 32; layer++) {
        const int is = kern_power_layer_is_dense(layer, k, n);
        if (is) {
            assert_int_equal(layer, dense[seen]);
            seen++;
        }
    }
    assert_int_equal(seen, 10);
    assert_int_equal(kern_power_dense_layers_parse("none", &k, &n, err, sizeof err), 0);
    assert_false(kern_power_layer_is_dense(0, k, n));
    assert_int_equal(kern_power_dense_layers_parse("all", &k, &n, err, sizeof err), 0);
    assert_true(kern_power_layer_is_dense(5, k, n));
    assert_int_equal(kern_power_dense_layers_parse(" 0  of  every  3 ", &k, &n, err, sizeof err),
                     0);
    assert_true(k == 0 && n == 3);
    const char *bad[] = {"",
                         "2 of every 0",
                         "3 of every 2",
                         "of every 7",
                         "2 of every",
                         "2 of every 7x",
                         "-1 of every 7",
                         "2of every 7",
                         "2 of every 1001",
                         "99999999999 of every 7",
                         "2 in every 7"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        assert_int_equal(kern_power_dense_layers_parse(bad[i], &k, &n, err, sizeof err),
                         KERN_SPARSE_EINVAL);
        assert_non_null(strstr(err, "dense_layers"));
    }
}

static void test_power_rejects_bad_parameters(void **state)
{
    (void)state;
    char err[96];
    kern_power_params pp;
    kern_power_params_default(&pp);
    assert_true(pp.block_size == 64 && pp.window_blocks == 5);
    assert_int_equal(kern_power_params_check(&pp, err, sizeof err), KERN_SPARSE_OK);
    pp.block_size = 0;
    assert_int_equal(kern_power_params_check(&pp, err, sizeof err), KERN_SPARSE_EINVAL);
    assert_non_null(strstr(err, "block_size"));
    pp.block_size = 64;
    pp.window_blocks = 0;
    assert_int_equal(kern_power_params_check(&pp, err, sizeof err), KERN_SPARSE_EINVAL);
    assert_non_null(strstr(err, "window_blocks"));
    int32_t out[8];
    assert_int_equal(kern_power_blocks(&pp, 3, out, 8), KERN_SPARSE_EINVAL);
    pp.window_blocks = 2;
    assert_int_equal(kern_power_blocks(&pp, -1, out, 8), KERN_SPARSE_EINVAL);
    mask_buf mb;
    mask_alloc(&mb, 32, 1, 100, 100);
    assert_int_equal(kern_power_mask(&pp, &mb.m), KERN_SPARSE_EINVAL); /* B 64 vs 32 */
    uint64_t w[2];
    rng_seed(55);
    problem p;
    problem_init(&p, (shape){100, 100, 2, 1, 8, 0, 0});
    assert_int_equal(kern_power_attention_f32(NULL, &p.a, &pp, w, 0, NULL), KERN_SPARSE_ENOSPC);
    free(mb.bits);
    problem_free(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_block_sparse_matches_masked_ref_on_random_masks),
        cmocka_unit_test(test_block_sparse_chunk_with_paged_kv_and_gqa_4_to_1_matches_masked_ref),
        cmocka_unit_test(test_block_sparse_with_every_block_equals_dense_kernel),
        cmocka_unit_test(test_block_sparse_shared_group_and_head_lists_agree),
        cmocka_unit_test(test_block_sparse_is_deterministic_across_thread_counts),
        cmocka_unit_test(test_block_sparse_odd_dims_small_blocks_and_chunks_match_masked_ref),
        cmocka_unit_test(test_block_sparse_rows_are_bit_identical_across_chunkings),
        cmocka_unit_test(test_block_sparse_rejects_bad_masks_and_arguments),
        cmocka_unit_test(test_block_mask_density_is_share_of_causal_blocks),
        cmocka_unit_test(test_masked_ref_with_causal_mask_equals_dense_ref_and_empty_row_is_zero),
        cmocka_unit_test(test_probe_profiles_match_brute_force_softmax),
        cmocka_unit_test(test_flex_gamma_1_tau_0_equals_dense),
        cmocka_unit_test(test_flex_dense_fallbacks_are_bit_identical_to_dense),
        cmocka_unit_test(test_flex_all_mass_on_key_0_selects_sink_column_padded_to_min_budget),
        cmocka_unit_test(test_flex_pure_diagonal_selects_only_the_diagonal_and_sink),
        cmocka_unit_test(test_flex_mass_on_one_column_block_selects_it_in_every_later_row),
        cmocka_unit_test(test_flex_js_distance_is_0_for_equal_and_sqrt_ln2_for_disjoint),
        cmocka_unit_test(test_flex_tau_0_never_and_tau_1_always_query_aware),
        cmocka_unit_test(test_flex_budgets_are_clamped_to_min_and_max),
        cmocka_unit_test(test_flex_gqa_heads_permute_within_group_and_read_their_own_kv),
        cmocka_unit_test(test_flex_structured_input_is_sparse_and_needle_rows_stay_within_1pct),
        cmocka_unit_test(test_flex_gqa_union_is_the_union_of_the_group_sets),
        cmocka_unit_test(test_flex_selection_and_output_are_deterministic),
        cmocka_unit_test(test_flex_rejects_bad_parameters_naming_the_field),
        cmocka_unit_test(test_power_blocks_and_mask_match_brute_force),
        cmocka_unit_test(test_power_full_window_equals_dense),
        cmocka_unit_test(test_power_kernel_matches_masked_ref_with_gqa),
        cmocka_unit_test(test_power_decode_and_chunks_equal_one_shot_prefill),
        cmocka_unit_test(test_power_density_counts_the_pattern_blocks),
        cmocka_unit_test(test_power_dense_layers_default_2_of_every_7),
        cmocka_unit_test(test_power_rejects_bad_parameters),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
