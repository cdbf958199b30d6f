/*
 * test_kernels.c - unit tests for the CPU kernels (kernels/kernels.h): the fast
 * matmul and attention against their double-accumulating references, the
 * elementwise ops against double computations written here, the f16/bf16
 * conversions on known bit patterns (and every f16 value against a decoder
 * written here), and the thread pool's run-every-index-once contract.
 *
 * Inputs come from a fixed-seed xorshift, so every run sees the same numbers.
 * Output buffers are pre-filled with NaN (so an element never written fails the
 * comparison) and have guard elements past the end or between rows that must be
 * left untouched.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"

#define GUARD 1234.5f /* value of the untouched guard elements */

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

/* Uniform in [lo, hi). */
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

static float *random_floats(size_t n, float lo, float hi)
{
    float *p = alloc_floats(n);
    for (size_t i = 0; i < n; i++)
        p[i] = rnd(lo, hi);
    return p;
}

static void fill(float *p, size_t n, float v)
{
    for (size_t i = 0; i < n; i++)
        p[i] = v;
}

/* ---- pools shared by the tests ---- */

static kern_pool *pool4;

static int group_setup(void **state)
{
    (void)state;
    pool4 = kern_pool_create(4);
    return pool4 && kern_pool_size(pool4) == 4 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    kern_pool_destroy(pool4);
    return 0;
}

/* ---- matmul ---- */

/* Tolerance: kern_matmul_f32 accumulates in float (several accumulators, or
 * OpenBLAS), the reference in double. Rounding errors of a K-term float dot
 * product grow like sqrt(K) * 2^-24 * |terms|, so each element must satisfy
 *     |y - ref| <= 1e-5 * sqrt(K) * max(1, |ref|)
 * (relative error 1e-5 * sqrt(K), absolute near zero where cancellation makes a
 * relative bound meaningless; inputs are in [-1, 1)). That is orders of
 * magnitude above float rounding and orders below any real mistake (a dropped
 * or doubled term is ~0.3). */
static void check_matmul(kern_pool *pool, int M, int N, int K, int ldx, int ldy)
{
    float *x = random_floats((size_t)M * ldx, -1.0f, 1.0f);
    float *w = random_floats((size_t)N * K, -1.0f, 1.0f);
    const size_t ny = (size_t)M * ldy + 8; /* 8 guard elements past the end */
    float *y = alloc_floats(ny), *ref = alloc_floats(ny);
    fill(y, ny, GUARD);
    for (int m = 0; m < M; m++)
        fill(y + (size_t)m * ldy, (size_t)N, NAN);
    fill(ref, ny, GUARD);
    kern_matmul_f32(pool, y, ldy, x, ldx, w, M, N, K);
    kern_matmul_ref(ref, ldy, x, ldx, w, M, N, K);
    const double tol = 1e-5 * sqrt((double)K);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            const double a = y[(size_t)m * ldy + n], r = ref[(size_t)m * ldy + n];
            const double e = fabs(a - r) / fmax(1.0, fabs(r));
            if (!(e <= tol))
                fail_msg("matmul M=%d N=%d K=%d: y[%d,%d]=%g ref=%g (rel err %g > %g)", M, N, K, m,
                         n, a, r, e, tol);
        }
        for (int n = N; n < ldy && m < M - 1; n++) /* padding between rows */
            assert_true(y[(size_t)m * ldy + n] == GUARD);
    }
    for (size_t i = (size_t)(M - 1) * ldy + N; i < ny; i++)
        assert_true(y[i] == GUARD);
    /* The reference itself is a y = x W^T: spot-check one element in double. */
    double s = 0.0;
    for (int k = 0; k < K; k++)
        s += (double)x[(size_t)(M - 1) * ldx + k] * w[(size_t)(N - 1) * K + k];
    assert_true(fabs(s - ref[(size_t)(M - 1) * ldy + N - 1]) <= 1e-6 * fmax(1.0, fabs(s)));
    free(x);
    free(w);
    free(y);
    free(ref);
}

static void test_matmul_matvec_below_parallel_threshold_matches_ref(void **state)
{
    (void)state;
    rng_seed(1);
    check_matmul(pool4, 1, 512, 64, 64, 512); /* 32768 MACs: runs inline */
    check_matmul(NULL, 1, 512, 64, 64, 512);
    check_matmul(NULL, 1, 3, 5, 5, 3); /* tails shorter than a vector */
}

static void test_matmul_matvec_above_parallel_threshold_matches_ref(void **state)
{
    (void)state;
    rng_seed(2);
    check_matmul(pool4, 1, 1024, 512, 512, 1024); /* 524288 MACs: split over the pool */
    check_matmul(NULL, 1, 1024, 512, 512, 1024);
    check_matmul(pool4, 1, 1001, 257, 257, 1001); /* rows not a multiple of the task size */
    kern_pool *pool2 = kern_pool_create(2);
    assert_non_null(pool2);
    check_matmul(pool2, 1, 1001, 257, 257, 1001);
    kern_pool_destroy(pool2);
}

static void test_matmul_gemm_with_row_strides_matches_ref(void **state)
{
    (void)state;
    rng_seed(3);
    check_matmul(NULL, 7, 33, 65, 65 + 11, 33 + 5);
    check_matmul(pool4, 7, 33, 65, 80, 40);
    check_matmul(pool4, 2, 256, 128, 128, 256);
    check_matmul(pool4, 5, 40, 64, 72, 48); /* odd rows of x: pairs, then one alone */
    check_matmul(NULL, 16, 64, 64, 64, 64); /* a 16-sequence decode batch of stories260K */
    check_matmul(NULL, 64, 96, 288, 300, 100);
    /* sgemm split over the pool's threads: slices of 16-row multiples, the
     * last one shorter. */
    check_matmul(pool4, 64, 96, 288, 300, 100);
    kern_pool *pool2 = kern_pool_create(2);
    assert_non_null(pool2);
    check_matmul(pool2, 40, 1001, 70, 70, 1003);
    kern_pool_destroy(pool2);
}

/* y += x W^T: a decode-sized product adds exactly what kern_matmul_f32_ldw
 * computes (the same sums, one more rounding); an sgemm-sized one is within
 * check_matmul's tolerance of y0 + the reference. W's rows are ldw apart. */
static void check_matmul_acc(kern_pool *pool, int M, int N, int K, int ldw)
{
    const int ldx = K + 3, ldy = N + 5;
    float *x = random_floats((size_t)M * ldx, -1.0f, 1.0f);
    float *w = random_floats((size_t)N * ldw, -1.0f, 1.0f);
    float *y0 = random_floats((size_t)M * ldy, -4.0f, 4.0f);
    float *y = alloc_floats((size_t)M * ldy), *p = alloc_floats((size_t)M * ldy);
    float *wc = alloc_floats((size_t)N * K), *ref = alloc_floats((size_t)M * ldy);
    memcpy(y, y0, sizeof(float) * (size_t)M * ldy);
    kern_matmul_f32_acc(pool, y, ldy, x, ldx, w, ldw, M, N, K);
    kern_matmul_f32_ldw(pool, p, ldy, x, ldx, w, ldw, M, N, K);
    for (int n = 0; n < N; n++)
        memcpy(wc + (size_t)n * K, w + (size_t)n * ldw, sizeof(float) * (size_t)K);
    kern_matmul_ref(ref, ldy, x, ldx, wc, M, N, K);
    const double tol = 1e-5 * sqrt((double)K);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            const size_t i = (size_t)m * ldy + n;
            if (M <= 32) {
                if (y[i] != y0[i] + p[i])
                    fail_msg("acc M=%d N=%d K=%d: y[%d,%d]=%.9g, y0 + product = %.9g", M, N, K, m,
                             n, y[i], y0[i] + p[i]);
                continue;
            }
            const double r = (double)y0[i] + ref[i], e = fabs(y[i] - r) / fmax(1.0, fabs(r));
            if (!(e <= tol))
                fail_msg("acc M=%d N=%d K=%d: y[%d,%d]=%g ref=%g (rel err %g > %g)", M, N, K, m, n,
                         y[i], r, e, tol);
        }
        for (int n = N; n < ldy; n++) /* untouched between rows */
            assert_true(y[(size_t)m * ldy + n] == y0[(size_t)m * ldy + n]);
    }
    free(x);
    free(w);
    free(y0);
    free(y);
    free(p);
    free(wc);
    free(ref);
}

static void test_matmul_acc_adds_to_y(void **state)
{
    (void)state;
    rng_seed(4);
    kern_pool *pool2 = kern_pool_create(2);
    assert_non_null(pool2);
    check_matmul_acc(NULL, 1, 37, 24, 24);      /* inline, scalar tail rows */
    check_matmul_acc(pool4, 1, 1024, 512, 600); /* split matvec, a column slice of W */
    check_matmul_acc(pool4, 5, 40, 64, 72);     /* row pairs, then one alone */
    check_matmul_acc(pool2, 32, 64, 64, 64);
    check_matmul_acc(pool2, 70, 300, 96, 128); /* sgemm with beta 1 */
    check_matmul_acc(NULL, 64, 48, 200, 200);
    kern_pool_destroy(pool2);
}

static void test_matmul_zero_sizes_write_nothing(void **state)
{
    (void)state;
    float x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 1, 1}, y[4] = {GUARD, GUARD, GUARD, GUARD};
    kern_matmul_f32(NULL, y, 2, x, 2, w, 0, 2, 2);
    kern_matmul_f32(pool4, y, 2, x, 2, w, 2, 0, 2);
    kern_matmul_f32(pool4, y, 2, x, 2, w, 1, 2, 0);
    for (int i = 0; i < 4; i++)
        assert_true(y[i] == GUARD);
}

/* ---- attention ---- */

typedef struct {
    int n_q, ctx_len, n_heads, n_kv_heads, head_dim, kv_pad;
    int block_size; /* > 0: paged, the blocks in reverse order */
} attn_case;

/* Runs kern_attention_f32 and kern_attention_ref on random q, k, v and returns
 * the largest absolute difference (infinity if an output is NaN). K/V padding
 * between rows and rows past ctx_len are NaN: reading them poisons the result. */
static double attention_error(kern_pool *pool, attn_case c)
{
    const int qw = c.n_heads * c.head_dim;
    const int kv_stride = c.n_kv_heads * c.head_dim + c.kv_pad;
    const size_t nq = (size_t)c.n_q * qw;
    const int bs = c.block_size > 0 ? c.block_size : 1;
    const int n_blocks = (c.ctx_len + bs - 1) / bs;
    const size_t nkv = (size_t)(n_blocks * bs + 2) * kv_stride;
    float *q = random_floats(nq, -1.0f, 1.0f);
    float *k = alloc_floats(nkv), *v = alloc_floats(nkv);
    int32_t *blocks = malloc(sizeof(int32_t) * (size_t)n_blocks);
    assert_non_null(blocks);
    for (int b = 0; b < n_blocks; b++)
        blocks[b] = n_blocks - 1 - b;
    fill(k, nkv, NAN);
    fill(v, nkv, NAN);
    for (int j = 0; j < c.ctx_len; j++) {
        const size_t row =
            c.block_size > 0 ? (size_t)blocks[j / bs] * bs + (size_t)(j % bs) : (size_t)j;
        for (int i = 0; i < c.n_kv_heads * c.head_dim; i++) {
            k[row * kv_stride + i] = rnd(-1.0f, 1.0f);
            v[row * kv_stride + i] = rnd(-1.0f, 1.0f);
        }
    }
    float *out = alloc_floats(nq + 4), *ref = alloc_floats(nq);
    fill(out, nq, NAN);
    fill(out + nq, 4, GUARD);
    fill(ref, nq, NAN);
    kern_attn_args a = {.q = q,
                        .k = k,
                        .v = v,
                        .out = out,
                        .n_q = c.n_q,
                        .ctx_len = c.ctx_len,
                        .n_heads = c.n_heads,
                        .n_kv_heads = c.n_kv_heads,
                        .head_dim = c.head_dim,
                        .kv_stride = kv_stride,
                        .blocks = c.block_size > 0 ? blocks : NULL,
                        .block_size = c.block_size};
    kern_attention_f32(pool, &a);
    a.out = ref;
    kern_attention_ref(&a);
    double worst = 0.0;
    for (size_t i = 0; i < nq; i++) {
        const double e = fabs((double)out[i] - (double)ref[i]);
        worst = isnan(e) ? INFINITY : fmax(worst, e);
    }
    for (size_t i = nq; i < nq + 4; i++)
        if (out[i] != GUARD)
            worst = INFINITY;
    free(q);
    free(k);
    free(v);
    free(blocks);
    free(out);
    free(ref);
    return worst;
}

static void check_attention(kern_pool *pool, attn_case c)
{
    const double e = attention_error(pool, c);
    if (!(e <= 1e-5))
        fail_msg("attention n_q=%d ctx=%d heads=%d kv_heads=%d hd=%d pad=%d pool=%d: "
                 "max abs err %g > 1e-5",
                 c.n_q, c.ctx_len, c.n_heads, c.n_kv_heads, c.head_dim, c.kv_pad,
                 kern_pool_size(pool), e);
}

static void test_attention_decode_matches_ref_for_every_context_up_to_300(void **state)
{
    (void)state;
    rng_seed(10);
    /* Crosses the 128-key chunk boundary (127, 128, 129, 256, 257) and, with
     * 8 heads of 64, the parallel threshold (ctx >= 128). */
    for (int ctx = 1; ctx <= 300; ctx++) {
        check_attention(pool4, (attn_case){1, ctx, 8, 2, 64, 0, 0});
        check_attention(NULL, (attn_case){1, ctx, 4, 4, 8, 3, 0});
    }
}

/* From 768 keys a single row splits its keys into ranges of 256 over the
 * pool (every head per range, merged after): contiguous and paged caches,
 * grouped heads, padded rows, one thread or four, ranges of unequal size. */
static void test_attention_decode_long_context_matches_ref(void **state)
{
    (void)state;
    rng_seed(14);
    const int ctxs[] = {767, 768, 769, 1000, 1499, 2053};
    for (size_t i = 0; i < sizeof(ctxs) / sizeof(ctxs[0]); i++) {
        check_attention(pool4, (attn_case){1, ctxs[i], 8, 2, 64, 0, 0});
        check_attention(NULL, (attn_case){1, ctxs[i], 12, 12, 64, 0, 16});
        check_attention(pool4, (attn_case){1, ctxs[i], 4, 4, 8, 3, 32});
        check_attention(pool4, (attn_case){1, ctxs[i], 6, 3, 12, 5, 0}); /* head dim not x8 */
    }
}

static void test_attention_prefill_matches_ref(void **state)
{
    (void)state;
    rng_seed(11);
    check_attention(pool4, (attn_case){200, 200, 8, 2, 64, 0, 0});
    check_attention(NULL, (attn_case){200, 200, 8, 2, 64, 0, 0});
    check_attention(pool4, (attn_case){200, 200, 4, 4, 8, 0, 0});
}

static void test_attention_chunked_prefill_at_end_of_context_matches_ref(void **state)
{
    (void)state;
    rng_seed(12);
    check_attention(pool4, (attn_case){50, 300, 8, 2, 64, 0, 0});
    check_attention(NULL, (attn_case){50, 300, 8, 2, 64, 0, 0});
    check_attention(pool4, (attn_case){50, 300, 8, 8, 8, 5, 0});
}

static void test_attention_grouped_query_heads_match_ref(void **state)
{
    (void)state;
    rng_seed(13);
    const int kv_heads[3] = {1, 2, 8};
    for (int i = 0; i < 3; i++)
        for (int hd = 8; hd <= 64; hd *= 8) {
            check_attention(pool4, (attn_case){17, 150, 8, kv_heads[i], hd, 0, 0});
            check_attention(NULL, (attn_case){17, 150, 8, kv_heads[i], hd, 0, 0});
            check_attention(pool4, (attn_case){1, 150, 8, kv_heads[i], hd, 0, 0});
        }
}

static void test_attention_kv_stride_wider_than_kv_heads_matches_ref(void **state)
{
    (void)state;
    rng_seed(14);
    /* Padding between K/V rows is NaN: any read of it shows in the output. */
    check_attention(pool4, (attn_case){1, 200, 8, 2, 64, 64, 0});
    check_attention(pool4, (attn_case){40, 200, 8, 2, 64, 7, 0});
    check_attention(NULL, (attn_case){40, 200, 8, 8, 8, 1, 0});
}

static void test_attention_first_query_sees_only_the_first_key(void **state)
{
    (void)state;
    /* Independent of the reference: with n_q = ctx_len, query row 0 attends to
     * key 0 alone, so its output is exactly v[0]; with ctx_len 1 likewise. And
     * identical keys give a uniform softmax: the output is the mean of v. */
    rng_seed(15);
    const int hd = 8, ctx = 5;
    float *q = random_floats((size_t)ctx * hd, -1.0f, 1.0f);
    float *k = random_floats((size_t)ctx * hd, -1.0f, 1.0f);
    float *v = random_floats((size_t)ctx * hd, -1.0f, 1.0f);
    float out[5 * 8];
    fill(out, 40, NAN);
    kern_attn_args a = {.q = q,
                        .k = k,
                        .v = v,
                        .out = out,
                        .n_q = ctx,
                        .ctx_len = ctx,
                        .n_heads = 1,
                        .n_kv_heads = 1,
                        .head_dim = hd,
                        .kv_stride = hd};
    kern_attention_f32(NULL, &a);
    for (int i = 0; i < hd; i++)
        assert_true(fabsf(out[i] - v[i]) <= 1e-6f);

    for (int j = 1; j < ctx; j++)
        memcpy(k + (size_t)j * hd, k, sizeof(float) * hd);
    fill(out, 40, NAN);
    a.n_q = 1;
    kern_attention_f32(pool4, &a);
    for (int i = 0; i < hd; i++) {
        double mean = 0.0;
        for (int j = 0; j < ctx; j++)
            mean += v[(size_t)j * hd + i];
        mean /= ctx;
        assert_true(fabs(out[i] - mean) <= 1e-6);
    }
    free(q);
    free(k);
    free(v);
}

/* ---- rmsnorm, swiglu ---- */

static void test_rmsnorm_matches_f64(void **state)
{
    (void)state;
    rng_seed(20);
    const int rows = 5, dim = 257;
    const float eps = 1e-5f;
    float *x = random_floats((size_t)rows * dim, -2.0f, 2.0f);
    float *w = random_floats((size_t)dim, 0.5f, 1.5f);
    for (int i = 0; i < dim; i++) { /* rows of very different scales */
        x[(size_t)3 * dim + i] *= 100.0f;
        x[(size_t)4 * dim + i] *= 0.01f;
    }
    float *out = alloc_floats((size_t)rows * dim + 4);
    fill(out, (size_t)rows * dim, NAN);
    fill(out + (size_t)rows * dim, 4, GUARD);
    kern_rmsnorm_f32(out, x, w, rows, dim, eps);
    for (int r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int i = 0; i < dim; i++)
            ss += (double)x[(size_t)r * dim + i] * x[(size_t)r * dim + i];
        const double scale = 1.0 / sqrt(ss / dim + eps);
        for (int i = 0; i < dim; i++) {
            const double e = (double)x[(size_t)r * dim + i] * scale * w[i];
            const double got = out[(size_t)r * dim + i];
            if (!(fabs(got - e) <= 1e-5 * fabs(e) + 1e-7))
                fail_msg("rmsnorm row %d [%d]: %g vs %g", r, i, got, e);
        }
    }
    for (int i = 0; i < 4; i++)
        assert_true(out[(size_t)rows * dim + i] == GUARD);
    free(x);
    free(w);
    free(out);
}

static void test_rmsnorm_of_zeros_is_zeros(void **state)
{
    (void)state;
    float x[16] = {0}, w[16], out[16];
    fill(w, 16, 1.0f);
    fill(out, 16, NAN);
    kern_rmsnorm_f32(out, x, w, 1, 16, 1e-6f);
    for (int i = 0; i < 16; i++)
        assert_true(out[i] == 0.0f);
}

static void test_swiglu_matches_f64(void **state)
{
    (void)state;
    rng_seed(21);
    const size_t n = 1000;
    float *gate = random_floats(n, -12.0f, 12.0f);
    float *up = random_floats(n, -3.0f, 3.0f);
    gate[0] = 0.0f;
    gate[1] = -100.0f; /* expf overflows: the result is (-)0 */
    gate[2] = 100.0f;
    gate[3] = -88.0f;
    float *out = alloc_floats(n + 4);
    fill(out, n, NAN);
    fill(out + n, 4, GUARD);
    kern_swiglu_f32(out, gate, up, n);
    for (size_t i = 0; i < n; i++) {
        const double g = gate[i];
        const double e = g / (1.0 + exp(-g)) * up[i];
        if (!(fabs(out[i] - e) <= 1e-5 * fabs(e) + 1e-30))
            fail_msg("swiglu [%zu] gate %g up %g: %g vs %g", i, g, (double)up[i], out[i], e);
    }
    for (size_t i = n; i < n + 4; i++)
        assert_true(out[i] == GUARD);
    /* out may alias gate */
    float *copy = alloc_floats(n);
    memcpy(copy, gate, sizeof(float) * n);
    kern_swiglu_f32(copy, copy, up, n);
    assert_memory_equal(copy, out, sizeof(float) * n);
    free(copy);
    free(gate);
    free(up);
    free(out);
}

/* ---- rope ---- */

static void test_rope_position_zero_is_identity(void **state)
{
    (void)state;
    rng_seed(30);
    const int n_heads = 3, hd = 16;
    float *x = random_floats((size_t)n_heads * hd, -1.0f, 1.0f);
    float *orig = alloc_floats((size_t)n_heads * hd);
    memcpy(orig, x, sizeof(float) * n_heads * hd);
    const int32_t pos[1] = {0};
    kern_rope_f32(x, pos, 1, n_heads, hd, hd, 10000.0f);
    assert_memory_equal(x, orig, sizeof(float) * n_heads * hd);
    free(x);
    free(orig);
}

/* f64 reference of one row: adjacent pairs (2i, 2i+1), i < rope_dim/2, rotated
 * by pos * base^(-2i/rope_dim). */
static void rope_ref(double *out, const float *x, int32_t pos, int n_heads, int hd, int rope_dim,
                     double base)
{
    for (int h = 0; h < n_heads; h++) {
        const float *v = x + (size_t)h * hd;
        double *o = out + (size_t)h * hd;
        for (int i = 0; i < hd; i++)
            o[i] = v[i];
        for (int i = 0; i < rope_dim / 2; i++) {
            const double th = pos * pow(base, -2.0 * i / rope_dim);
            o[2 * i] = v[2 * i] * cos(th) - v[2 * i + 1] * sin(th);
            o[2 * i + 1] = v[2 * i] * sin(th) + v[2 * i + 1] * cos(th);
        }
    }
}

static void test_rope_matches_f64_and_preserves_pair_norms(void **state)
{
    (void)state;
    rng_seed(31);
    const int n_heads = 4, hd = 64, rows = 6;
    const int32_t pos[6] = {0, 1, 2, 7, 100, 1000};
    const size_t n = (size_t)rows * n_heads * hd;
    float *x = random_floats(n, -1.0f, 1.0f);
    float *orig = alloc_floats(n);
    memcpy(orig, x, sizeof(float) * n);
    kern_rope_f32(x, pos, rows, n_heads, hd, hd, 10000.0f);
    double ref[4 * 64];
    for (int r = 0; r < rows; r++) {
        const float *in = orig + (size_t)r * n_heads * hd, *got = x + (size_t)r * n_heads * hd;
        rope_ref(ref, in, pos[r], n_heads, hd, hd, 10000.0);
        /* theta = pos * freq is formed in float: its rounding error (and that of
         * powf) grows with pos, ~pos * 2^-23 radians, so the tolerance does too. */
        const double tol = 2e-6 + 4e-7 * pos[r];
        for (int i = 0; i < n_heads * hd; i++)
            if (!(fabs(got[i] - ref[i]) <= tol))
                fail_msg("rope pos %d [%d]: %g vs %g (tol %g)", pos[r], i, got[i], ref[i], tol);
        for (int i = 0; i < n_heads * hd; i += 2) {
            const double before = hypot(in[i], in[i + 1]), after = hypot(got[i], got[i + 1]);
            assert_true(fabs(after - before) <= 1e-6 * fmax(1.0, before));
        }
        if (pos[r] != 0) /* it really rotated something */
            assert_memory_not_equal(got, in, sizeof(float) * n_heads * hd);
    }
    free(x);
    free(orig);
}

static void test_rope_partial_rope_dim_leaves_tail_untouched(void **state)
{
    (void)state;
    rng_seed(32);
    const int n_heads = 3, hd = 32, rope_dim = 16, rows = 2;
    const int32_t pos[2] = {5, 42};
    const size_t n = (size_t)rows * n_heads * hd;
    float *x = random_floats(n, -1.0f, 1.0f);
    float *orig = alloc_floats(n);
    memcpy(orig, x, sizeof(float) * n);
    kern_rope_f32(x, pos, rows, n_heads, hd, rope_dim, 10000.0f);
    double ref[3 * 32];
    for (int r = 0; r < rows; r++) {
        const float *in = orig + (size_t)r * n_heads * hd, *got = x + (size_t)r * n_heads * hd;
        rope_ref(ref, in, pos[r], n_heads, hd, rope_dim, 10000.0);
        for (int h = 0; h < n_heads; h++) {
            for (int i = 0; i < rope_dim; i++)
                assert_true(fabs(got[h * hd + i] - ref[h * hd + i]) <= 1e-4);
            /* the tail is bit-for-bit the input */
            assert_memory_equal(got + h * hd + rope_dim, in + h * hd + rope_dim,
                                sizeof(float) * (size_t)(hd - rope_dim));
        }
    }
    free(x);
    free(orig);
}

/* ---- conversions ---- */

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void test_f16_known_bit_patterns(void **state)
{
    (void)state;
    assert_true(kern_f16_to_f32(0x3C00) == 1.0f);
    assert_true(kern_f16_to_f32(0xC000) == -2.0f);
    assert_true(kern_f16_to_f32(0x3555) == (float)(1.0 + 341.0 / 1024.0) / 4.0f);
    assert_true(kern_f16_to_f32(0x7BFF) == 65504.0f);
    assert_true(kern_f16_to_f32(0x0001) == ldexpf(1.0f, -24));    /* smallest subnormal */
    assert_true(kern_f16_to_f32(0x03FF) == ldexpf(1023.0f, -24)); /* largest subnormal */
    assert_true(kern_f16_to_f32(0x0400) == ldexpf(1.0f, -14));    /* smallest normal */
    assert_true(kern_f16_to_f32(0x7C00) == INFINITY);
    assert_true(kern_f16_to_f32(0xFC00) == -INFINITY);
    assert_int_equal(f32_bits(kern_f16_to_f32(0x0000)), 0x00000000u);
    assert_int_equal(f32_bits(kern_f16_to_f32(0x8000)), 0x80000000u); /* -0.0 keeps its sign */
    assert_true(signbit(kern_f16_to_f32(0x8000)));
    assert_true(isnan(kern_f16_to_f32(0x7E00)));
    assert_true(isnan(kern_f16_to_f32(0x7C01)));
    assert_true(isnan(kern_f16_to_f32(0xFFFF)));
}

static void test_f16_every_value_matches_decoder(void **state)
{
    (void)state;
    static uint16_t all[65536];
    static float row[65536];
    for (uint32_t h = 0; h < 65536; h++)
        all[h] = (uint16_t)h;
    kern_f16_to_f32_row(row, all, 65536);
    for (uint32_t h = 0; h < 65536; h++) {
        const int sign = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
        const float got = kern_f16_to_f32((uint16_t)h);
        assert_int_equal(f32_bits(row[h]), f32_bits(got));
        if (e == 0x1f && m) {
            assert_true(isnan(got));
            continue;
        }
        double v = e == 0x1f ? INFINITY : e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
        if (sign)
            v = -v;
        if (!(got == (float)v && !signbit(got) == !signbit(v)))
            fail_msg("f16 0x%04x: %a, expected %a", h, (double)got, v);
    }
}

static void test_bf16_known_bit_patterns(void **state)
{
    (void)state;
    assert_true(kern_bf16_to_f32(0x3F80) == 1.0f);
    assert_true(kern_bf16_to_f32(0xC000) == -2.0f);
    assert_true(kern_bf16_to_f32(0x4049) == 3.140625f);
    assert_true(kern_bf16_to_f32(0x7F80) == INFINITY);
    assert_true(isnan(kern_bf16_to_f32(0x7FC0)));
    assert_int_equal(f32_bits(kern_bf16_to_f32(0x8000)), 0x80000000u);
    assert_true(kern_bf16_to_f32(0x0001) == ldexpf(1.0f, -133));
    const uint16_t src[4] = {0x3F80, 0xC000, 0x0000, 0x4049};
    float dst[5] = {0, 0, 0, 0, GUARD};
    kern_bf16_to_f32_row(dst, src, 4);
    assert_true(dst[0] == 1.0f && dst[1] == -2.0f && dst[2] == 0.0f && dst[3] == 3.140625f);
    assert_true(dst[4] == GUARD);
}

/* ---- thread pool ---- */

#define POOL_MAX_TASKS 300

typedef struct {
    atomic_int count[POOL_MAX_TASKS];
    atomic_int bad; /* calls with an index or n outside the job */
    int n;
} pool_job;

static void count_task(void *ctx, int i, int n)
{
    pool_job *j = ctx;
    if (n != j->n || i < 0 || i >= j->n) {
        atomic_fetch_add(&j->bad, 1);
        return;
    }
    atomic_fetch_add(&j->count[i], 1);
}

/* Runs many consecutive jobs of different sizes (growing and shrinking, 1 task
 * and many) and checks, as soon as each kern_pool_run returns, that every index
 * ran exactly once and nothing ran outside the job. Consecutive jobs alternate
 * between two contexts so a straggler of one job would show in the next. */
static void check_pool_runs_every_index_once(kern_pool *pool, int n_jobs)
{
    static pool_job jobs[2];
    for (int r = 0; r < n_jobs; r++) {
        pool_job *j = &jobs[r & 1];
        const int n = r % 3 == 2 ? 1 + r % 5 : 1 + (r * 37) % POOL_MAX_TASKS;
        j->n = n;
        atomic_store(&j->bad, 0);
        for (int i = 0; i < POOL_MAX_TASKS; i++)
            atomic_store(&j->count[i], 0);
        kern_pool_run(pool, count_task, j, n);
        if (atomic_load(&j->bad) != 0)
            fail_msg("pool of %d, job %d (n=%d): %d calls outside the job", kern_pool_size(pool), r,
                     n, atomic_load(&j->bad));
        for (int i = 0; i < POOL_MAX_TASKS; i++) {
            const int c = atomic_load(&j->count[i]);
            if (c != (i < n ? 1 : 0))
                fail_msg("pool of %d, job %d (n=%d, previous n=%d): index %d ran %d times",
                         kern_pool_size(pool), r, n, jobs[(r + 1) & 1].n, i, c);
        }
    }
}

static void test_pool_runs_every_index_exactly_once(void **state)
{
    (void)state;
    check_pool_runs_every_index_once(NULL, 1000);
    const int sizes[3] = {1, 2, 4};
    for (int s = 0; s < 3; s++) {
        kern_pool *p = kern_pool_create(sizes[s]);
        assert_non_null(p);
        assert_int_equal(kern_pool_size(p), sizes[s]);
        check_pool_runs_every_index_once(p, 5000);
        kern_pool_destroy(p);
    }
    assert_int_equal(kern_pool_size(NULL), 1);
}

static void test_pool_zero_tasks_calls_nothing(void **state)
{
    (void)state;
    static pool_job j;
    j.n = 0;
    atomic_store(&j.bad, 0);
    kern_pool_run(pool4, count_task, &j, 0);
    kern_pool_run(NULL, count_task, &j, 0);
    assert_int_equal(atomic_load(&j.bad), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_matvec_below_parallel_threshold_matches_ref),
        cmocka_unit_test(test_matmul_matvec_above_parallel_threshold_matches_ref),
        cmocka_unit_test(test_matmul_gemm_with_row_strides_matches_ref),
        cmocka_unit_test(test_matmul_acc_adds_to_y),
        cmocka_unit_test(test_matmul_zero_sizes_write_nothing),
        cmocka_unit_test(test_attention_decode_matches_ref_for_every_context_up_to_300),
        cmocka_unit_test(test_attention_decode_long_context_matches_ref),
        cmocka_unit_test(test_attention_prefill_matches_ref),
        cmocka_unit_test(test_attention_chunked_prefill_at_end_of_context_matches_ref),
        cmocka_unit_test(test_attention_grouped_query_heads_match_ref),
        cmocka_unit_test(test_attention_kv_stride_wider_than_kv_heads_matches_ref),
        cmocka_unit_test(test_attention_first_query_sees_only_the_first_key),
        cmocka_unit_test(test_rmsnorm_matches_f64),
        cmocka_unit_test(test_rmsnorm_of_zeros_is_zeros),
        cmocka_unit_test(test_swiglu_matches_f64),
        cmocka_unit_test(test_rope_position_zero_is_identity),
        cmocka_unit_test(test_rope_matches_f64_and_preserves_pair_norms),
        cmocka_unit_test(test_rope_partial_rope_dim_leaves_tail_untouched),
        cmocka_unit_test(test_f16_known_bit_patterns),
        cmocka_unit_test(test_f16_every_value_matches_decoder),
        cmocka_unit_test(test_bf16_known_bit_patterns),
        cmocka_unit_test(test_pool_runs_every_index_exactly_once),
        cmocka_unit_test(test_pool_zero_tasks_calls_nothing),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
