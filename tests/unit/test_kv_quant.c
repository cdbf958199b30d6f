/*
 * test_kv_quant.c - unit tests for the compressed KV cache (kernels.h section
 * "compressed KV"): page sizes, the per-element error bounds of
 * research/sparse-kv-spec.md section 3.6 for every scheme, pack/unpack of every
 * code value, constant and non-finite inputs, the saliency of section 3.2 on a
 * hand-built attention matrix, the decode kernel over mixed pages against
 * dense attention over the dequantized tensor and against the existing dense
 * kernel, GQA, paged and batched sequences, the flush cadence, and argument
 * checks.
 *
 * Inputs come from a fixed-seed xorshift. Output buffers are pre-filled with
 * NaN so that an element never written fails its comparison. Measured error
 * figures are printed with print_message.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
/* cmocka needs the four headers above first. */
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"

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

static void *alloc_page(size_t bytes)
{
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    assert_non_null(p);
    memset(p, 0xA5, bytes); /* garbage, as a recycled pool block */
    return p;
}

static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)a[i] - (double)b[i]);
        worst = isnan(e) ? INFINITY : fmax(worst, e);
    }
    return worst;
}

static kern_kvq_src contiguous(const float *base, const kern_kvq_geom *g, int len)
{
    return (kern_kvq_src){.base = base, .stride = (size_t)g->n_kv_heads * g->head_dim, .len = len};
}

static kern_pool *pool2;

static int group_setup(void **state)
{
    (void)state;
    pool2 = kern_pool_create(2);
    return pool2 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    kern_pool_destroy(pool2);
    return 0;
}

/* ---- page sets: a sequence's pages built the way the plumbing will ---- */

#define MAX_PAGES 512

typedef struct {
    kern_kvq_page pages[MAX_PAGES];
    void *mem[2 * MAX_PAGES];
    float *stats[64];
    int n_pages, n_mem, n_stats;
} page_set;

static void ps_free(page_set *ps)
{
    for (int i = 0; i < ps->n_mem; i++)
        free(ps->mem[i]);
    for (int i = 0; i < ps->n_stats; i++)
        free(ps->stats[i]);
    ps->n_pages = ps->n_mem = ps->n_stats = 0;
}

static kern_kvq_page *ps_new_page(page_set *ps, kern_kvq_fmt fmt, const kern_kvq_geom *g)
{
    assert_true(ps->n_pages < MAX_PAGES);
    kern_kvq_page *p = &ps->pages[ps->n_pages++];
    void *k = alloc_page(kern_kvq_page_bytes(fmt, KERN_KVQ_K, g));
    void *v = alloc_page(kern_kvq_page_bytes(fmt, KERN_KVQ_V, g));
    ps->mem[ps->n_mem++] = k;
    ps->mem[ps->n_mem++] = v;
    *p = (kern_kvq_page){.k = k, .v = v, .pos0 = KERN_KVQ_UNORDERED, .n = 0, .fmt = (int)fmt};
    return p;
}

/* Positions [first, first + n) as ordered pages of a uniform format. */
static void ps_add_uniform(page_set *ps, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                           const kern_kvq_src *k, const kern_kvq_src *v, int first, int n)
{
    char err[256];
    for (int p0 = first; p0 < first + n; p0 += g->block_size) {
        const int m = first + n - p0 < g->block_size ? first + n - p0 : g->block_size;
        kern_kvq_page *pg = ps_new_page(ps, fmt, g);
        const kern_kvq_sel sel = {.first = p0, .n = m};
        assert_int_equal(
            kern_kvq_pack((void *)pg->k, KERN_KVQ_K, fmt, g, 0, k, &sel, NULL, err, sizeof(err)),
            0);
        assert_int_equal(
            kern_kvq_pack((void *)pg->v, KERN_KVQ_V, fmt, g, 0, v, &sel, NULL, err, sizeof(err)),
            0);
        pg->pos0 = p0;
        pg->n = m;
    }
}

/* One class of a ZIP segment: statistics, then set pages of block_size slots. */
static void ps_add_zip_class(page_set *ps, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                             const kern_kvq_src *k, const kern_kvq_src *v, const int32_t *idx,
                             int head_stride, int n, int seg_first, int seg_n)
{
    char err[256];
    float *st = alloc_floats(KERN_KVQ_STATS_FLOATS(g->n_kv_heads * g->head_dim));
    ps->stats[ps->n_stats++] = st;
    const kern_kvq_sel cls = {.idx = idx, .head_stride = head_stride, .n = n};
    assert_int_equal(kern_kvq_zip_stats(st, fmt, g, k, &cls, v, seg_first, seg_n, err, sizeof(err)),
                     0);
    for (int i0 = 0; i0 < n; i0 += g->block_size) {
        const int m = n - i0 < g->block_size ? n - i0 : g->block_size;
        kern_kvq_page *pg = ps_new_page(ps, fmt, g);
        const kern_kvq_sel sel = {.idx = idx + i0, .head_stride = head_stride, .n = m};
        assert_int_equal(
            kern_kvq_pack((void *)pg->k, KERN_KVQ_K, fmt, g, 0, k, &sel, st, err, sizeof(err)), 0);
        assert_int_equal(
            kern_kvq_pack((void *)pg->v, KERN_KVQ_V, fmt, g, 0, v, &sel, st, err, sizeof(err)), 0);
        pg->stats = st;
        pg->n = m;
    }
}

/* A ZIP segment [first, first + n): random saliency scores, per-head or
 * shared sets, salient pages at `hi`, regular pages at `lo`. Returns n_salient. */
static int ps_add_zip_segment(page_set *ps, const kern_kvq_geom *g, const kern_kvq_src *k,
                              const kern_kvq_src *v, int first, int n, kern_kvq_fmt hi,
                              kern_kvq_fmt lo, float fraction, bool shared)
{
    char err[256];
    const int H = g->n_kv_heads;
    float *sc = random_floats((size_t)H * n, 0.0f, 1.0f);
    int32_t *order = malloc(sizeof(int32_t) * (size_t)H * (n ? n : 1));
    assert_non_null(order);
    assert_int_equal(kern_kvq_saliency_normalize(sc, sc, H, first, n, KERN_KVQ_NORM_NONE, 0, NULL,
                                                 0, shared, err, sizeof(err)),
                     0);
    const int n_sal = kern_kvq_select_salient(order, sc, H, first, n, fraction, err, sizeof(err));
    assert_true(n_sal >= 0);
    ps_add_zip_class(ps, hi, g, k, v, order, n, n_sal, first, n);
    ps_add_zip_class(ps, lo, g, k, v, order + n_sal, n, n - n_sal, first, n);
    free(order);
    free(sc);
    return n_sal;
}

/* Dense K and V over the dequantized pages: row j is the j-th slot in page
 * order (set pages have no positions; callers use them with n_q = 1). */
static int ps_dequantize(const page_set *ps, const kern_kvq_geom *g, float *k, float *v)
{
    char err[256];
    const size_t kvd = (size_t)g->n_kv_heads * g->head_dim;
    int j = 0;
    for (int i = 0; i < ps->n_pages; i++) {
        const kern_kvq_page *p = &ps->pages[i];
        assert_int_equal(kern_kvq_unpack(k + j * kvd, kvd, p->k, KERN_KVQ_K, p->fmt, g, 0, p->n,
                                         p->stats, err, sizeof(err)),
                         0);
        assert_int_equal(kern_kvq_unpack(v + j * kvd, kvd, p->v, KERN_KVQ_V, p->fmt, g, 0, p->n,
                                         p->stats, err, sizeof(err)),
                         0);
        j += p->n;
    }
    return j;
}

/* ---- sizes ---- */

static void test_kvq_page_bytes_match_q8_0_and_q4_0_per_32_values(void **state)
{
    (void)state;
    const kern_kvq_geom g = {4, 64, 16};
    const size_t values = 4 * 64 * 16;
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_F32, KERN_KVQ_K, &g), 4 * values);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_F16, KERN_KVQ_V, &g), 2 * values);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q8, KERN_KVQ_K, &g), values / 32 * 34);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q8, KERN_KVQ_V, &g), values / 32 * 34);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q4, KERN_KVQ_K, &g), values / 32 * 18);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q4, KERN_KVQ_V, &g), values / 32 * 18);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_ZIP8, KERN_KVQ_K, &g), values);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_ZIP4, KERN_KVQ_K, &g), values / 2);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_ZIP2, KERN_KVQ_K, &g), values / 4);
    /* V adds one f16 (min, delta) pair per slot. */
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_ZIP4, KERN_KVQ_V, &g), values / 2 + 16 * 4);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_ZIP2, KERN_KVQ_V, &g), values / 4 + 16 * 4);
    assert_int_equal(kern_kvq_block_bytes(KERN_KVQ_Q8, &g), 2 * (values / 32 * 34));

    /* Head dims below or not a multiple of 32 use a short last group. */
    const kern_kvq_geom tiny = {4, 8, 16}; /* stories260K: Hkv * D = 32 */
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q8, KERN_KVQ_K, &tiny), 4 * 16 * (8 + 2));
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q4, KERN_KVQ_K, &tiny), 4 * 16 * (4 + 2));
    const kern_kvq_geom d80 = {2, 80, 16};
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q8, KERN_KVQ_K, &d80), 2 * 16 * (80 + 3 * 2));

    /* Bad formats and geometries have no size. */
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_N_FMT, KERN_KVQ_K, &g), 0);
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q8, (kern_kvq_kind)2, &g), 0);
    const kern_kvq_geom odd = {4, 12, 16};
    assert_int_equal(kern_kvq_page_bytes(KERN_KVQ_Q8, KERN_KVQ_K, &odd), 0);

    /* The capacity targets on the 768-dim synthetic model (D = 64,
     * 12 or 4 kv heads), data pages only, against f16: int4 >= 3.5x and zip
     * (4/2 bits, 60% salient) >= 4.5x. */
    const int kvh[2] = {12, 4};
    for (int i = 0; i < 2; i++) {
        const kern_kvq_geom s = {kvh[i], 64, 16};
        const double f16 = kern_kvq_bytes_per_token(KERN_KVQ_F16, KERN_KVQ_F16, 1.0f, &s);
        const double q8 = kern_kvq_bytes_per_token(KERN_KVQ_Q8, KERN_KVQ_Q8, 1.0f, &s);
        const double q4 = kern_kvq_bytes_per_token(KERN_KVQ_Q4, KERN_KVQ_Q4, 1.0f, &s);
        const double zip = kern_kvq_bytes_per_token(KERN_KVQ_ZIP4, KERN_KVQ_ZIP2, 0.6f, &s);
        print_message("kv heads %2d: bytes/token/layer f16 %.0f q8 %.0f (%.2fx) q4 %.0f (%.2fx) "
                      "zip4/2@0.6 %.1f (%.2fx)\n",
                      kvh[i], f16, q8, f16 / q8, q4, f16 / q4, zip, f16 / zip);
        assert_true(f16 / q4 >= 3.5);
        assert_true(f16 / zip >= 4.5);
    }
}

/* ---- error bounds (spec 3.6) ---- */

/* Fills n rows of kvd values, each group of 32 of each row at its own scale
 * in [1e-2, 1e2], so the bounds are tested across magnitudes. */
static float *scaled_rows(int n, int kvd)
{
    float *x = alloc_floats((size_t)n * kvd);
    for (int t = 0; t < n; t++)
        for (int c0 = 0; c0 < kvd; c0 += 32) {
            const float s = powf(10.0f, rnd(-2.0f, 2.0f));
            const float off = rnd(-0.5f, 0.5f) * s;
            for (int c = c0; c < c0 + 32 && c < kvd; c++)
                x[(size_t)t * kvd + c] = off + rnd(-1.0f, 1.0f) * s;
        }
    return x;
}

static void test_kvq_int8_error_is_within_amax_over_254(void **state)
{
    (void)state;
    rng_seed(11);
    const kern_kvq_geom g = {3, 96, 16};
    const int kvd = 3 * 96, n = 16;
    char err[256];
    float *x = scaled_rows(n, kvd), *y = alloc_floats((size_t)n * kvd);
    void *page = alloc_page(kern_kvq_page_bytes(KERN_KVQ_Q8, KERN_KVQ_K, &g));
    const kern_kvq_src src = contiguous(x, &g, n);
    const kern_kvq_sel sel = {.first = 0, .n = n};
    assert_int_equal(
        kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, &src, &sel, NULL, err, sizeof(err)), 0);
    fill(y, (size_t)n * kvd, NAN);
    assert_int_equal(
        kern_kvq_unpack(y, kvd, page, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, n, NULL, err, sizeof(err)),
        0);
    double worst = 0.0;
    for (int t = 0; t < n; t++)
        for (int c0 = 0; c0 < kvd; c0 += 32) {
            float amax = 0.0f;
            for (int c = c0; c < c0 + 32; c++)
                amax = fmaxf(amax, fabsf(x[t * kvd + c]));
            for (int c = c0; c < c0 + 32; c++) {
                const double xv = x[t * kvd + c], e = fabs(xv - y[t * kvd + c]);
                const double bound = amax / 254.0 + 0x1p-10 * fabs(xv) + 0x1p-22 * amax;
                worst = fmax(worst, e / bound);
                if (!(e <= bound))
                    fail_msg("q8 slot %d ch %d: x %g err %g > bound %g", t, c, xv, e, bound);
            }
        }
    print_message("q8: worst error / (amax/254 + fp16 term) = %.3f\n", worst);
    free(page);
    free(x);
    free(y);
}

static void
test_kvq_int4_error_is_within_amax_over_16_and_over_8_at_the_clipped_extreme(void **state)
{
    (void)state;
    rng_seed(12);
    const kern_kvq_geom g = {2, 64, 16};
    const int kvd = 128, n = 16;
    char err[256];
    float *x = scaled_rows(n, kvd), *y = alloc_floats((size_t)n * kvd);
    /* In every other group, force an opposite-sign extreme that clips. */
    for (int t = 0; t < n; t++)
        for (int c0 = 0; c0 < kvd; c0 += 64) {
            x[t * kvd + c0] = 2.0f;
            x[t * kvd + c0 + 1] = -2.0f * (1.0f - 1e-7f);
        }
    void *page = alloc_page(kern_kvq_page_bytes(KERN_KVQ_Q4, KERN_KVQ_V, &g));
    const kern_kvq_src src = contiguous(x, &g, n);
    const kern_kvq_sel sel = {.first = 0, .n = n};
    assert_int_equal(
        kern_kvq_pack(page, KERN_KVQ_V, KERN_KVQ_Q4, &g, 0, &src, &sel, NULL, err, sizeof(err)), 0);
    fill(y, (size_t)n * kvd, NAN);
    assert_int_equal(
        kern_kvq_unpack(y, kvd, page, KERN_KVQ_V, KERN_KVQ_Q4, &g, 0, n, NULL, err, sizeof(err)),
        0);
    double worst16 = 0.0, worst8 = 0.0;
    int clipped = 0;
    for (int t = 0; t < n; t++)
        for (int c0 = 0; c0 < kvd; c0 += 32) {
            float amax = 0.0f, smax = 0.0f;
            for (int c = c0; c < c0 + 32; c++)
                if (fabsf(x[t * kvd + c]) > amax) {
                    amax = fabsf(x[t * kvd + c]);
                    smax = x[t * kvd + c];
                }
            for (int c = c0; c < c0 + 32; c++) {
                const double xv = x[t * kvd + c], e = fabs(xv - y[t * kvd + c]);
                /* x / d > 7.5 with d = smax / -8: the opposite extreme clips. */
                const bool clips = xv / (smax / -8.0) > 7.5;
                const double bound =
                    amax / (clips ? 8.0 : 16.0) + 0x1p-10 * fabs(xv) + 0x1p-22 * amax;
                if (clips) {
                    clipped++;
                    worst8 = fmax(worst8, e / bound);
                } else {
                    worst16 = fmax(worst16, e / bound);
                }
                if (!(e <= bound))
                    fail_msg("q4 slot %d ch %d: x %g err %g > bound %g", t, c, xv, e, bound);
            }
        }
    assert_true(clipped >= n);
    print_message("q4: worst error / (amax/16 + fp16) = %.3f; clipped extremes (%d) / (amax/8 + "
                  "fp16) = %.3f\n",
                  worst16, clipped, worst8);
    free(page);
    free(x);
    free(y);
}

/* ZIP keys, channel-wise per class: |x - x^| <= R/(2(2^b - 1)) + fp16 term,
 * and the RMS on uniform data is delta/sqrt(12). */
static void test_kvq_zip_key_error_is_within_range_over_510_30_and_6(void **state)
{
    (void)state;
    const kern_kvq_geom g = {2, 64, 16};
    const int kvd = 128, n = 256;
    const kern_kvq_fmt fmts[3] = {KERN_KVQ_ZIP8, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2};
    const double div[3] = {510.0, 30.0, 6.0};
    char err[256];
    for (int f = 0; f < 3; f++) {
        rng_seed(13 + (uint64_t)f);
        float *x = alloc_floats((size_t)n * kvd), *y = alloc_floats((size_t)n * kvd);
        float lo[128], hi[128];
        for (int c = 0; c < kvd; c++) {
            const float s = powf(10.0f, rnd(-1.0f, 1.0f));
            lo[c] = rnd(-2.0f, 1.0f) * s;
            hi[c] = lo[c] + rnd(0.1f, 2.0f) * s;
        }
        for (int t = 0; t < n; t++)
            for (int c = 0; c < kvd; c++)
                x[t * kvd + c] = rnd(lo[c], hi[c]);
        page_set ps = {0};
        const kern_kvq_src src = contiguous(x, &g, n);
        int32_t *all = malloc(sizeof(int32_t) * n);
        assert_non_null(all);
        for (int t = 0; t < n; t++)
            all[t] = t;
        ps_add_zip_class(&ps, fmts[f], &g, &src, &src, all, 0, n, 0, n);
        int j = 0;
        for (int i = 0; i < ps.n_pages; i++) {
            assert_int_equal(kern_kvq_unpack(y + (size_t)j * kvd, kvd, ps.pages[i].k, KERN_KVQ_K,
                                             fmts[f], &g, 0, ps.pages[i].n, ps.pages[i].stats, err,
                                             sizeof(err)),
                             0);
            j += ps.pages[i].n;
        }
        double worst = 0.0, se = 0.0, sd2 = 0.0;
        for (int c = 0; c < kvd; c++) {
            float mn = INFINITY, mx = -INFINITY;
            for (int t = 0; t < n; t++) {
                mn = fminf(mn, x[t * kvd + c]);
                mx = fmaxf(mx, x[t * kvd + c]);
            }
            const double R = (double)mx - mn, delta = R / (div[f] / 2.0);
            for (int t = 0; t < n; t++) {
                const double xv = x[t * kvd + c], e = fabs(xv - y[t * kvd + c]);
                const double bound = R / div[f] + 0x1p-10 * (fabs(xv) + fabs(mn)) +
                                     0x1p-21 * (fabs(xv) + fabs(mn) + R);
                worst = fmax(worst, e / bound);
                se += e * e;
                sd2 += delta * delta / 12.0;
                if (!(e <= bound))
                    fail_msg("%s key ch %d: x %g err %g > bound %g", kern_kvq_fmt_name(fmts[f]), c,
                             xv, e, bound);
            }
        }
        const double rms_ratio = sqrt(se / sd2);
        print_message("%s keys: worst error / (R/%.0f + fp16) = %.3f, RMS / (delta/sqrt 12) = "
                      "%.3f\n",
                      kern_kvq_fmt_name(fmts[f]), div[f], worst, rms_ratio);
        assert_true(rms_ratio > 0.85 && rms_ratio < 1.15);
        ps_free(&ps);
        free(all);
        free(x);
        free(y);
    }
}

/* ZIP values, CST: |x - x^| <= c_j * delta_t / 2 with the stored delta_t,
 * plus the fp16 term c_j * 2^-10 (|x'| + |min_t|). */
static void test_kvq_zip_value_error_is_within_channel_scale_times_half_delta(void **state)
{
    (void)state;
    const kern_kvq_geom g = {2, 32, 16};
    const int kvd = 64, n = 48;
    const kern_kvq_fmt fmts[3] = {KERN_KVQ_ZIP8, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2};
    char err[256];
    for (int f = 0; f < 3; f++) {
        rng_seed(21 + (uint64_t)f);
        float *x = scaled_rows(n, kvd), *y = alloc_floats((size_t)n * kvd);
        float *st = alloc_floats(KERN_KVQ_STATS_FLOATS(kvd));
        const kern_kvq_src src = contiguous(x, &g, n);
        const kern_kvq_sel all = {.first = 0, .n = n};
        assert_int_equal(
            kern_kvq_zip_stats(st, fmts[f], &g, &src, &all, &src, 0, n, err, sizeof(err)), 0);
        double worst = 0.0;
        for (int p0 = 0; p0 < n; p0 += 16) {
            uint8_t *page = alloc_page(kern_kvq_page_bytes(fmts[f], KERN_KVQ_V, &g));
            const kern_kvq_sel sel = {.first = p0, .n = 16};
            assert_int_equal(
                kern_kvq_pack(page, KERN_KVQ_V, fmts[f], &g, 0, &src, &sel, st, err, sizeof(err)),
                0);
            assert_int_equal(kern_kvq_unpack(y + (size_t)p0 * kvd, kvd, page, KERN_KVQ_V, fmts[f],
                                             &g, 0, 16, st, err, sizeof(err)),
                             0);
            const _Float16 *pair = (const _Float16 *)(void *)page;
            for (int s = 0; s < 16; s++) {
                const int t = p0 + s;
                const double mn = (double)pair[2 * s], dl = (double)pair[2 * s + 1];
                double xmin = INFINITY, xmax = -INFINITY;
                for (int c = 0; c < kvd; c++) {
                    const double xp = (double)(x[t * kvd + c] / st[2 * kvd + c]);
                    xmin = fmin(xmin, xp);
                    xmax = fmax(xmax, xp);
                }
                /* The stored min is the f16 nearest the row's; the stored
                 * delta covers [stored min, max], rounded up by < 2^-10. */
                assert_true(fabs(mn - xmin) <= 0x1p-11 * fabs(xmin));
                const double exact = (xmax - mn) / ((1 << kern_kvq_fmt_bits(fmts[f])) - 1);
                assert_true(dl >= exact * (1 - 1e-6) && dl <= exact * (1 + 0x1p-10) + 1e-7);
                for (int c = 0; c < kvd; c++) {
                    const double cj = st[2 * kvd + c], xv = x[t * kvd + c];
                    const double e = fabs(xv - y[t * kvd + c]);
                    const double bound = cj * dl / 2.0 + cj * 0x1p-10 * (fabs(xv / cj) + fabs(mn)) +
                                         0x1p-21 * (fabs(xv) + cj * (fabs(mn) + dl));
                    worst = fmax(worst, e / bound);
                    if (!(e <= bound))
                        fail_msg("%s value t %d ch %d: x %g err %g > bound %g",
                                 kern_kvq_fmt_name(fmts[f]), t, c, xv, e, bound);
                }
            }
            free(page);
        }
        print_message("%s values (CST): worst error / (c_j delta_t / 2 + fp16) = %.3f\n",
                      kern_kvq_fmt_name(fmts[f]), worst);
        free(st);
        free(x);
        free(y);
    }
}

/* ---- layouts and round trips ---- */

/* With min 0 and delta 1 every value is its own code: every code value at
 * every position of 2- and 4-bit rows (and q4's signed codes) must come back
 * exactly, and the raw bytes must follow the documented packing. */
static void test_kvq_pack_unpack_round_trips_every_code_at_2_and_4_bits(void **state)
{
    (void)state;
    char err[256];
    const int dims[2] = {64, 40}; /* 40: a short last group of 8 */
    for (int di = 0; di < 2; di++) {
        const int D = dims[di];
        const kern_kvq_geom g = {2, D, 16};
        const int kvd = 2 * D, n = 16;
        const kern_kvq_fmt fmts[2] = {KERN_KVQ_ZIP2, KERN_KVQ_ZIP4};
        for (int f = 0; f < 2; f++) {
            const int bits = kern_kvq_fmt_bits(fmts[f]), top = (1 << bits) - 1;
            float *x = alloc_floats((size_t)n * kvd), *y = alloc_floats((size_t)n * kvd);
            float *st = alloc_floats(KERN_KVQ_STATS_FLOATS(kvd));
            for (int c = 0; c < kvd; c++) {
                st[c] = 0.0f;
                st[kvd + c] = 1.0f;
                st[2 * kvd + c] = 1.0f;
            }
            for (int t = 0; t < n; t++)
                for (int c = 0; c < kvd; c++)
                    x[t * kvd + c] = (float)((t + 3 * c) % (top + 1));
            uint8_t *page = alloc_page(kern_kvq_page_bytes(fmts[f], KERN_KVQ_K, &g));
            const kern_kvq_src src = contiguous(x, &g, n);
            const kern_kvq_sel sel = {.first = 0, .n = n};
            assert_int_equal(
                kern_kvq_pack(page, KERN_KVQ_K, fmts[f], &g, 0, &src, &sel, st, err, sizeof(err)),
                0);
            fill(y, (size_t)n * kvd, NAN);
            assert_int_equal(
                kern_kvq_unpack(y, kvd, page, KERN_KVQ_K, fmts[f], &g, 0, n, st, err, sizeof(err)),
                0);
            assert_true(max_abs_diff(x, y, (size_t)n * kvd) == 0.0);
            /* Layout: head h's tile, slot s, group at value g0 of n values. */
            const size_t row = (size_t)D * bits / 8;
            for (int h = 0; h < 2; h++)
                for (int s = 0; s < n; s++)
                    for (int g0 = 0; g0 < D; g0 += 32) {
                        const int m = D - g0 < 32 ? D - g0 : 32, per = 8 / bits;
                        const uint8_t *b = page + ((size_t)h * n + s) * row + g0 * bits / 8;
                        for (int j = 0; j < m / per; j++)
                            for (int k = 0; k < per; k++) {
                                const int code = (b[j] >> (k * bits)) & top;
                                assert_int_equal(code,
                                                 (int)x[s * kvd + h * D + g0 + j + k * (m / per)]);
                            }
                    }
            free(page);
            free(st);
            free(x);
            free(y);
        }
        /* q4: values -8..7 with -8 the signed max give d = 1, codes 0..15. */
        float *x = alloc_floats((size_t)n * kvd), *y = alloc_floats((size_t)n * kvd);
        for (int t = 0; t < n; t++)
            for (int c = 0; c < kvd; c++)
                x[t * kvd + c] = (c % D) % 32 == 0 ? -8.0f : (float)((t + c) % 16 - 8);
        uint8_t *page = alloc_page(kern_kvq_page_bytes(KERN_KVQ_Q4, KERN_KVQ_K, &g));
        const kern_kvq_src src = contiguous(x, &g, n);
        const kern_kvq_sel sel = {.first = 0, .n = n};
        assert_int_equal(
            kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_Q4, &g, 0, &src, &sel, NULL, err, sizeof(err)),
            0);
        assert_int_equal(kern_kvq_unpack(y, kvd, page, KERN_KVQ_K, KERN_KVQ_Q4, &g, 0, n, NULL, err,
                                         sizeof(err)),
                         0);
        assert_true(max_abs_diff(x, y, (size_t)n * kvd) == 0.0);
        free(page);
        free(x);
        free(y);
    }
}

/* A page filled in several calls equals one packed at once (flushes append
 * to open pages). */
static void test_kvq_page_filled_in_parts_equals_page_packed_at_once(void **state)
{
    (void)state;
    rng_seed(5);
    char err[256];
    const kern_kvq_geom g = {2, 64, 16};
    const int kvd = 128, n = 16;
    float *x = random_floats((size_t)n * kvd, -3.0f, 3.0f);
    float *st = alloc_floats(KERN_KVQ_STATS_FLOATS(kvd));
    const kern_kvq_src src = contiguous(x, &g, n);
    const kern_kvq_sel all = {.first = 0, .n = n};
    assert_int_equal(
        kern_kvq_zip_stats(st, KERN_KVQ_ZIP4, &g, &src, &all, &src, 0, n, err, sizeof(err)), 0);
    const kern_kvq_fmt fmts[5] = {KERN_KVQ_F32, KERN_KVQ_F16, KERN_KVQ_Q8, KERN_KVQ_Q4,
                                  KERN_KVQ_ZIP4};
    for (int f = 0; f < 5; f++)
        for (int kind = 0; kind < 2; kind++) {
            const size_t bytes = kern_kvq_page_bytes(fmts[f], (kern_kvq_kind)kind, &g);
            uint8_t *a = alloc_page(bytes), *b = alloc_page(bytes);
            assert_int_equal(kern_kvq_pack(a, (kern_kvq_kind)kind, fmts[f], &g, 0, &src, &all, st,
                                           err, sizeof(err)),
                             0);
            const kern_kvq_sel first = {.first = 0, .n = 5}, rest = {.first = 5, .n = 11};
            assert_int_equal(kern_kvq_pack(b, (kern_kvq_kind)kind, fmts[f], &g, 0, &src, &first, st,
                                           err, sizeof(err)),
                             0);
            assert_int_equal(kern_kvq_pack(b, (kern_kvq_kind)kind, fmts[f], &g, 5, &src, &rest, st,
                                           err, sizeof(err)),
                             0);
            assert_memory_equal(a, b, bytes);
            free(a);
            free(b);
        }
    free(st);
    free(x);
}

/* Constant rows and columns (and all zeros) give no NaN or Inf in any format,
 * and constants come back exactly where the scheme can represent them. */
static void test_kvq_constant_rows_and_columns_stay_finite_and_exact(void **state)
{
    (void)state;
    char err[256];
    const kern_kvq_geom g = {2, 64, 16};
    const int kvd = 128, n = 32;
    float *x = alloc_floats((size_t)n * kvd), *y = alloc_floats((size_t)n * kvd);
    const kern_kvq_fmt fmts[7] = {KERN_KVQ_F32,  KERN_KVQ_F16,  KERN_KVQ_Q8,  KERN_KVQ_Q4,
                                  KERN_KVQ_ZIP8, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2};
    for (int kindc = 0; kindc < 4; kindc++) {
        for (int t = 0; t < n; t++)
            for (int c = 0; c < kvd; c++)
                x[t * kvd + c] = kindc == 0   ? 0.0f
                                 : kindc == 1 ? 3.25f
                                 : kindc == 2 ? (float)(t - 7) * 0.5f    /* constant rows */
                                              : (float)(c - 40) * 0.25f; /* constant columns */
        for (int f = 0; f < 7; f++) {
            page_set ps = {0};
            const kern_kvq_src src = contiguous(x, &g, n);
            if (kern_kvq_fmt_is_zip(fmts[f])) {
                int32_t idx[32];
                for (int t = 0; t < n; t++)
                    idx[t] = t;
                ps_add_zip_class(&ps, fmts[f], &g, &src, &src, idx, 0, n, 0, n);
            } else {
                ps_add_uniform(&ps, fmts[f], &g, &src, &src, 0, n);
            }
            fill(y, (size_t)n * kvd, NAN);
            for (int i = 0, j = 0; i < ps.n_pages; j += ps.pages[i].n, i++)
                assert_int_equal(kern_kvq_unpack(y + (size_t)j * kvd, kvd, ps.pages[i].k,
                                                 KERN_KVQ_K, fmts[f], &g, 0, ps.pages[i].n,
                                                 ps.pages[i].stats, err, sizeof(err)),
                                 0);
            for (size_t i = 0; i < (size_t)n * kvd; i++)
                assert_true(isfinite(y[i]));
            const double e = max_abs_diff(x, y, (size_t)n * kvd);
            /* Exact: zeros, f32, and zip keys (per channel: zero range) for
             * constant columns and constant data. Otherwise within the
             * scheme's worst case over the data's largest magnitude. */
            const double amax = kindc == 0 ? 0.0 : kindc == 1 ? 3.25 : kindc == 2 ? 12.0 : 21.75;
            const double coarse[7] = {0.0,       0x1p-10,  1.0 / 200, 1.0 / 7,
                                      1.0 / 200, 1.0 / 14, 1.0 / 3};
            if (kindc == 0 || fmts[f] == KERN_KVQ_F32 ||
                (kern_kvq_fmt_is_zip(fmts[f]) && (kindc == 1 || kindc == 3)))
                assert_true(e == 0.0);
            else if (!(e <= coarse[f] * amax))
                fail_msg("%s, constant case %d: error %g > %g", kern_kvq_fmt_name(fmts[f]), kindc,
                         e, coarse[f] * amax);
            ps_free(&ps);
        }
    }
    free(x);
    free(y);
}

/* ---- the decode kernel ---- */

typedef struct {
    int n_heads, n_kv_heads, head_dim, block_size;
} shape;

/* Runs the kernel (with pool) and the double reference on one sequence;
 * returns the largest output difference, and checks the lse difference. */
static double kernel_vs_ref(kern_pool *pool, shape sh, const page_set *ps, const float *q, int n_q,
                            int ctx_len, const int32_t *q_pos)
{
    char err[256];
    const size_t nout = (size_t)n_q * sh.n_heads * sh.head_dim;
    const size_t nl = (size_t)n_q * sh.n_heads;
    float *out = alloc_floats(nout + 4), *ref = alloc_floats(nout);
    float *lse = alloc_floats(nl), *lse_ref = alloc_floats(nl);
    fill(out, nout, NAN);
    fill(out + nout, 4, 1234.5f);
    fill(ref, nout, NAN);
    fill(lse, nl, NAN);
    kern_kvq_seq s = {.q = q,
                      .out = out,
                      .lse = lse,
                      .q_pos = q_pos,
                      .pages = ps->pages,
                      .n_pages = ps->n_pages,
                      .n_q = n_q,
                      .ctx_len = ctx_len};
    kern_kvq_attn_args a = {.g = {sh.n_kv_heads, sh.head_dim, sh.block_size},
                            .n_heads = sh.n_heads,
                            .seqs = &s,
                            .n_seqs = 1};
    assert_int_equal(kern_attention_decode_quant(pool, &a, err, sizeof(err)), 0);
    s.out = ref;
    s.lse = lse_ref;
    assert_int_equal(kern_attention_decode_quant_ref(&a, err, sizeof(err)), 0);
    double e = max_abs_diff(out, ref, nout);
    for (int i = 0; i < 4; i++)
        if (out[nout + i] != 1234.5f)
            e = INFINITY;
    const double el = max_abs_diff(lse, lse_ref, nl);
    if (!(el <= 1e-5))
        fail_msg("lse differs from the reference by %g", el);
    free(out);
    free(ref);
    free(lse);
    free(lse_ref);
    return e;
}

/* Spec 3.6 test 6: salient ZIP4, regular ZIP2, int8 and int4 pages and an F32
 * and F16 tail in one sequence; the kernel equals dense attention over the
 * dequantized tensor (the existing kern_attention_ref) within 1e-5. */
static void test_kvq_mixed_pages_equal_dense_attention_over_dequantized_tensor(void **state)
{
    (void)state;
    rng_seed(31);
    const shape sh = {8, 2, 64, 16};
    const kern_kvq_geom g = {2, 64, 16};
    const int kvd = 128, ctx = 301;
    float *k = random_floats((size_t)ctx * kvd, -1.5f, 1.5f);
    float *v = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *q = random_floats((size_t)sh.n_heads * sh.head_dim, -1.0f, 1.0f);
    const kern_kvq_src ks = contiguous(k, &g, ctx), vs = contiguous(v, &g, ctx);
    page_set ps = {0};
    /* Prompt [0, 160) as a ZIP segment with per-head sets; a decode flush
     * [160, 208) with shared sets; int8 and int4 pages; an F16 and F32 tail. */
    ps_add_zip_segment(&ps, &g, &ks, &vs, 0, 160, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2, 0.6f, false);
    ps_add_zip_segment(&ps, &g, &ks, &vs, 160, 48, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2, 0.6f, true);
    ps_add_uniform(&ps, KERN_KVQ_Q8, &g, &ks, &vs, 208, 32);
    ps_add_uniform(&ps, KERN_KVQ_Q4, &g, &ks, &vs, 240, 32);
    ps_add_uniform(&ps, KERN_KVQ_F16, &g, &ks, &vs, 272, 16);
    ps_add_uniform(&ps, KERN_KVQ_F32, &g, &ks, &vs, 288, 13);
    float *kd = alloc_floats((size_t)ctx * kvd), *vd = alloc_floats((size_t)ctx * kvd);
    assert_int_equal(ps_dequantize(&ps, &g, kd, vd), ctx);
    const size_t nout = (size_t)sh.n_heads * sh.head_dim;
    float *out = alloc_floats(nout), *dense = alloc_floats(nout);
    fill(out, nout, NAN);
    fill(dense, nout, NAN);
    kern_attn_args da = {.q = q,
                         .k = kd,
                         .v = vd,
                         .out = dense,
                         .n_q = 1,
                         .ctx_len = ctx,
                         .n_heads = sh.n_heads,
                         .n_kv_heads = sh.n_kv_heads,
                         .head_dim = sh.head_dim,
                         .kv_stride = kvd};
    kern_attention_ref(&da);
    char err[256];
    const kern_kvq_seq s = {
        .q = q, .out = out, .pages = ps.pages, .n_pages = ps.n_pages, .n_q = 1, .ctx_len = ctx};
    const kern_kvq_attn_args a = {.g = g, .n_heads = sh.n_heads, .seqs = &s, .n_seqs = 1};
    assert_int_equal(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), 0);
    const double e = max_abs_diff(out, dense, nout);
    /* And against the undequantized f32 tensor, to see what compression costs. */
    da.k = k;
    da.v = v;
    kern_attention_ref(&da);
    const double eq = max_abs_diff(out, dense, nout);
    print_message("mixed pages (%d): kernel vs dense over dequantized %.2e (bound 1e-5); vs fp32 "
                  "KV %.2e\n",
                  ps.n_pages, e, eq);
    assert_true(e <= 1e-5);
    assert_true(kernel_vs_ref(pool2, sh, &ps, q, 1, ctx, NULL) <= 1e-5);
    ps_free(&ps);
    free(k);
    free(v);
    free(q);
    free(kd);
    free(vd);
    free(out);
    free(dense);
}

/* F32 pages are the rt_kv_pool layout: pages pointing into a shuffled pool
 * give what kern_attention_f32 gives through the same block table (within
 * 1e-6), for decode and for causal chunks of rows. */
static void test_kvq_f32_pages_equal_the_dense_kernel_through_a_block_table(void **state)
{
    (void)state;
    rng_seed(41);
    const int bs = 16, n_blocks = 40, ctx = 250, kvd = 2 * 64;
    const int nb = (ctx + bs - 1) / bs;
    float *pk = random_floats((size_t)n_blocks * bs * kvd, -1.0f, 1.0f);
    float *pv = random_floats((size_t)n_blocks * bs * kvd, -1.0f, 1.0f);
    int32_t blocks[40];
    for (int i = 0; i < n_blocks; i++)
        blocks[i] = (int32_t)((i * 17 + 5) % n_blocks);
    kern_kvq_page pages[40];
    for (int i = 0; i < nb; i++)
        pages[i] = (kern_kvq_page){.k = pk + (size_t)blocks[i] * bs * kvd,
                                   .v = pv + (size_t)blocks[i] * bs * kvd,
                                   .pos0 = i * bs,
                                   .n = i == nb - 1 ? ctx - i * bs : bs,
                                   .fmt = KERN_KVQ_F32};
    const int nqs[3] = {1, 7, 40};
    for (int t = 0; t < 3; t++) {
        const int n_q = nqs[t];
        const size_t nout = (size_t)n_q * 8 * 64;
        float *q = random_floats(nout, -1.0f, 1.0f);
        float *o1 = alloc_floats(nout), *o2 = alloc_floats(nout);
        fill(o1, nout, NAN);
        fill(o2, nout, NAN);
        kern_attn_args da = {.q = q,
                             .k = pk,
                             .v = pv,
                             .out = o1,
                             .n_q = n_q,
                             .ctx_len = ctx,
                             .n_heads = 8,
                             .n_kv_heads = 2,
                             .head_dim = 64,
                             .kv_stride = kvd,
                             .blocks = blocks,
                             .block_size = bs};
        kern_attention_f32(pool2, &da);
        char err[256];
        const kern_kvq_seq s = {
            .q = q, .out = o2, .pages = pages, .n_pages = nb, .n_q = n_q, .ctx_len = ctx};
        const kern_kvq_attn_args a = {.g = {2, 64, bs}, .n_heads = 8, .seqs = &s, .n_seqs = 1};
        assert_int_equal(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), 0);
        const double e = max_abs_diff(o1, o2, nout);
        print_message("f32 pages vs kern_attention_f32, n_q %d: %.2e (bound 1e-6)\n", n_q, e);
        assert_true(e <= 1e-6);
        free(q);
        free(o1);
        free(o2);
    }
    free(pk);
    free(pv);
}

/* GQA: every group size from 1 to 16 over mixed pages matches the reference,
 * with and without the pool. */
static void test_kvq_grouped_query_heads_match_the_reference(void **state)
{
    (void)state;
    const shape shapes[5] = {
        {8, 8, 64, 16}, {8, 2, 64, 16}, {8, 1, 32, 16}, {16, 1, 64, 8}, {12, 4, 128, 16}};
    for (int i = 0; i < 5; i++) {
        rng_seed(51 + (uint64_t)i);
        const shape sh = shapes[i];
        const kern_kvq_geom g = {sh.n_kv_heads, sh.head_dim, sh.block_size};
        const int kvd = sh.n_kv_heads * sh.head_dim, ctx = 97;
        float *k = random_floats((size_t)ctx * kvd, -2.0f, 2.0f);
        float *v = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
        float *q = random_floats((size_t)sh.n_heads * sh.head_dim, -1.0f, 1.0f);
        const kern_kvq_src ks = contiguous(k, &g, ctx), vs = contiguous(v, &g, ctx);
        page_set ps = {0};
        ps_add_zip_segment(&ps, &g, &ks, &vs, 0, 60, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2, 0.6f, false);
        ps_add_uniform(&ps, KERN_KVQ_Q8, &g, &ks, &vs, 60, 20);
        ps_add_uniform(&ps, KERN_KVQ_F32, &g, &ks, &vs, 80, 17);
        const double e1 = kernel_vs_ref(pool2, sh, &ps, q, 1, ctx, NULL);
        const double e2 = kernel_vs_ref(NULL, sh, &ps, q, 1, ctx, NULL);
        if (!(e1 <= 1e-5 && e2 <= 1e-5))
            fail_msg("heads %d kv %d hd %d: %g / %g > 1e-5", sh.n_heads, sh.n_kv_heads, sh.head_dim,
                     e1, e2);
        ps_free(&ps);
        free(k);
        free(v);
        free(q);
    }
}

/* Several rows: ordered pages are causal per row (a row never sees a later
 * position, however large its score), set pages are seen by every row, and
 * explicit row positions work. */
static void test_kvq_rows_are_causal_over_ordered_pages(void **state)
{
    (void)state;
    rng_seed(61);
    const shape sh = {4, 2, 32, 16};
    const kern_kvq_geom g = {2, 32, 16};
    const int kvd = 64, ctx = 90, n_q = 9;
    float *k = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *v = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *q = random_floats((size_t)n_q * sh.n_heads * sh.head_dim, -1.0f, 1.0f);
    const kern_kvq_src ks = contiguous(k, &g, ctx), vs = contiguous(v, &g, ctx);
    page_set ps = {0};
    ps_add_zip_segment(&ps, &g, &ks, &vs, 0, 40, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2, 0.5f, false);
    ps_add_uniform(&ps, KERN_KVQ_Q4, &g, &ks, &vs, 40, 32);
    ps_add_uniform(&ps, KERN_KVQ_F32, &g, &ks, &vs, 72, 18);
    assert_true(kernel_vs_ref(pool2, sh, &ps, q, n_q, ctx, NULL) <= 1e-5);
    const int32_t pos[3] = {40, 55, 89};
    assert_true(kernel_vs_ref(NULL, sh, &ps, q, 3, ctx, pos) <= 1e-5);

    /* Poison the last position's K and V with huge values: every row but the
     * last must be unchanged. */
    char err[256];
    const size_t nout = (size_t)n_q * sh.n_heads * sh.head_dim;
    float *o1 = alloc_floats(nout), *o2 = alloc_floats(nout);
    kern_kvq_seq s = {
        .q = q, .out = o1, .pages = ps.pages, .n_pages = ps.n_pages, .n_q = n_q, .ctx_len = ctx};
    const kern_kvq_attn_args a = {.g = g, .n_heads = sh.n_heads, .seqs = &s, .n_seqs = 1};
    assert_int_equal(kern_attention_decode_quant(NULL, &a, err, sizeof(err)), 0);
    const kern_kvq_page *lp = &ps.pages[ps.n_pages - 1]; /* positions 88, 89 */
    assert_int_equal(lp->pos0 + lp->n, ctx);
    float *last_k = (float *)lp->k + (size_t)(lp->n - 1) * kvd;
    float *last_v = (float *)lp->v + (size_t)(lp->n - 1) * kvd;
    fill(last_k, (size_t)kvd, 1e4f);
    fill(last_v, (size_t)kvd, 1e4f);
    s.out = o2;
    assert_int_equal(kern_attention_decode_quant(NULL, &a, err, sizeof(err)), 0);
    const size_t row = (size_t)sh.n_heads * sh.head_dim;
    assert_true(max_abs_diff(o1, o2, (n_q - 1) * row) == 0.0);
    assert_true(max_abs_diff(o1 + (n_q - 1) * row, o2 + (n_q - 1) * row, row) > 1.0);
    ps_free(&ps);
    free(k);
    free(v);
    free(q);
    free(o1);
    free(o2);
}

/* A batch of sequences gives, bit for bit, what each gives alone, with or
 * without the pool; empty pages and a row with no visible key are handled. */
static void test_kvq_batch_of_sequences_equals_each_sequence_alone(void **state)
{
    (void)state;
    rng_seed(71);
    char err[256];
    const kern_kvq_geom g = {2, 64, 16};
    const int kvd = 128, n_seq = 5;
    page_set ps[5] = {0};
    float *kv[5], *vv[5], *q[5], *out[5], *alone[5];
    kern_kvq_seq seqs[5];
    const int ctxs[5] = {1, 17, 64, 200, 33};
    const kern_kvq_fmt fmts[5] = {KERN_KVQ_F32, KERN_KVQ_Q8, KERN_KVQ_Q4, KERN_KVQ_ZIP4,
                                  KERN_KVQ_F16};
    for (int i = 0; i < n_seq; i++) {
        kv[i] = random_floats((size_t)ctxs[i] * kvd, -1.0f, 1.0f);
        vv[i] = random_floats((size_t)ctxs[i] * kvd, -1.0f, 1.0f);
        q[i] = random_floats(8 * 64, -1.0f, 1.0f);
        out[i] = alloc_floats(8 * 64);
        alone[i] = alloc_floats(8 * 64);
        const kern_kvq_src ks = contiguous(kv[i], &g, ctxs[i]), vs = contiguous(vv[i], &g, ctxs[i]);
        if (kern_kvq_fmt_is_zip(fmts[i]))
            ps_add_zip_segment(&ps[i], &g, &ks, &vs, 0, ctxs[i], KERN_KVQ_ZIP4, KERN_KVQ_ZIP2, 0.6f,
                               false);
        else
            ps_add_uniform(&ps[i], fmts[i], &g, &ks, &vs, 0, ctxs[i]);
        kern_kvq_page *empty = ps_new_page(&ps[i], KERN_KVQ_F32, &g); /* a fresh tail page */
        empty->pos0 = ctxs[i];
        seqs[i] = (kern_kvq_seq){.q = q[i],
                                 .out = out[i],
                                 .pages = ps[i].pages,
                                 .n_pages = ps[i].n_pages,
                                 .n_q = 1,
                                 .ctx_len = ctxs[i] + 1};
    }
    /* Row positions ctx_len - 1 = ctxs[i]: the empty page's position, so the
     * sequences' rows see exactly their packed keys. */
    kern_kvq_attn_args a = {.g = g, .n_heads = 8, .seqs = seqs, .n_seqs = n_seq};
    assert_int_equal(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), 0);
    for (int i = 0; i < n_seq; i++) {
        kern_kvq_seq one = seqs[i];
        one.out = alone[i];
        const kern_kvq_attn_args b = {.g = g, .n_heads = 8, .seqs = &one, .n_seqs = 1};
        assert_int_equal(kern_attention_decode_quant(NULL, &b, err, sizeof(err)), 0);
        assert_memory_equal(out[i], alone[i], sizeof(float) * 8 * 64);
        assert_true(kernel_vs_ref(pool2, (shape){8, 2, 64, 16}, &ps[i], q[i], 1, ctxs[i] + 1,
                                  NULL) <= 1e-5);
    }
    /* A row at position 0 over a page starting at 1 sees nothing: zeros. */
    kern_kvq_page later = ps[1].pages[0];
    later.pos0 = 1;
    later.n = 1;
    const int32_t pos0 = 0;
    float *lse8 = alloc_floats(8);
    const kern_kvq_seq none = {.q = q[1],
                               .out = out[1],
                               .lse = lse8,
                               .q_pos = &pos0,
                               .pages = &later,
                               .n_pages = 1,
                               .n_q = 1,
                               .ctx_len = 2};
    const kern_kvq_attn_args c = {.g = g, .n_heads = 8, .seqs = &none, .n_seqs = 1};
    assert_int_equal(kern_attention_decode_quant(NULL, &c, err, sizeof(err)), 0);
    for (int e = 0; e < 8 * 64; e++)
        assert_true(out[1][e] == 0.0f);
    for (int h = 0; h < 8; h++)
        assert_true(lse8[h] == -INFINITY);
    free(lse8);
    for (int i = 0; i < n_seq; i++) {
        ps_free(&ps[i]);
        free(kv[i]);
        free(vv[i]);
        free(q[i]);
        free(out[i]);
        free(alone[i]);
    }
}

/* Spec 3.6 test 3: high = low = 8 bits behaves like int8, both in the error
 * of the values and in the attention output against f32 KV. */
static void test_kvq_zip_8_8_behaves_like_int8(void **state)
{
    (void)state;
    rng_seed(81);
    const shape sh = {8, 2, 64, 16};
    const kern_kvq_geom g = {2, 64, 16};
    const int kvd = 128, ctx = 256;
    float *k = random_floats((size_t)ctx * kvd, -2.0f, 2.0f);
    float *v = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *q = random_floats(8 * 64, -1.0f, 1.0f);
    const kern_kvq_src ks = contiguous(k, &g, ctx), vs = contiguous(v, &g, ctx);
    page_set fp = {0}, q8 = {0}, z88 = {0}, z42 = {0};
    ps_add_uniform(&fp, KERN_KVQ_F32, &g, &ks, &vs, 0, ctx);
    ps_add_uniform(&q8, KERN_KVQ_Q8, &g, &ks, &vs, 0, ctx);
    ps_add_zip_segment(&z88, &g, &ks, &vs, 0, ctx, KERN_KVQ_ZIP8, KERN_KVQ_ZIP8, 0.6f, false);
    ps_add_zip_segment(&z42, &g, &ks, &vs, 0, ctx, KERN_KVQ_ZIP4, KERN_KVQ_ZIP2, 0.6f, false);
    float *o[4];
    page_set *sets[4] = {&fp, &q8, &z88, &z42};
    char err[256];
    for (int i = 0; i < 4; i++) {
        o[i] = alloc_floats(8 * 64);
        const kern_kvq_seq s = {.q = q,
                                .out = o[i],
                                .pages = sets[i]->pages,
                                .n_pages = sets[i]->n_pages,
                                .n_q = 1,
                                .ctx_len = ctx};
        const kern_kvq_attn_args a = {.g = g, .n_heads = 8, .seqs = &s, .n_seqs = 1};
        assert_int_equal(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), 0);
    }
    const double e8 = max_abs_diff(o[0], o[1], 512), ez88 = max_abs_diff(o[0], o[2], 512);
    const double ez42 = max_abs_diff(o[0], o[3], 512);
    print_message("attention output vs f32 KV: q8 %.2e, zip8/8 %.2e, zip4/2 %.2e\n", e8, ez88,
                  ez42);
    assert_true(e8 <= 2e-3 && ez88 <= 2e-3);
    assert_true(ez88 <= 4.0 * e8 + 1e-4);
    assert_true(ez42 > ez88); /* fewer bits cost something */
    assert_true(kernel_vs_ref(pool2, sh, &z88, q, 1, ctx, NULL) <= 1e-5);
    for (int i = 0; i < 4; i++) {
        ps_free(sets[i]);
        free(o[i]);
    }
    free(k);
    free(v);
    free(q);
}

/* Spec 3.6 test 4 and the other degenerate ratio: salient_fraction 1 (no
 * regular token) puts every token at the high width, 0 puts all at low. */
static void test_kvq_degenerate_ratios_put_every_token_in_one_class(void **state)
{
    (void)state;
    rng_seed(91);
    char err[256];
    assert_int_equal(kern_kvq_salient_count(100, 1.0f), 100);
    assert_int_equal(kern_kvq_salient_count(100, 0.0f), 0);
    assert_int_equal(kern_kvq_salient_count(100, 0.6f), 60);
    assert_int_equal(kern_kvq_salient_count(10, 0.6f), 6);
    assert_int_equal(kern_kvq_salient_count(7, 0.6f), 5); /* 7 - floor(2.8) */
    const shape sh = {4, 2, 32, 16};
    const kern_kvq_geom g = {2, 32, 16};
    const int kvd = 64, ctx = 50;
    float *k = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *v = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *q = random_floats(4 * 32, -1.0f, 1.0f);
    const kern_kvq_src ks = contiguous(k, &g, ctx), vs = contiguous(v, &g, ctx);
    const float fr[2] = {1.0f, 0.0f};
    for (int i = 0; i < 2; i++) {
        page_set ps = {0};
        const int n_sal = ps_add_zip_segment(&ps, &g, &ks, &vs, 0, ctx, KERN_KVQ_ZIP4,
                                             KERN_KVQ_ZIP2, fr[i], false);
        assert_int_equal(n_sal, i == 0 ? ctx : 0);
        int n4 = 0, n2 = 0;
        for (int p = 0; p < ps.n_pages; p++) {
            n4 += ps.pages[p].fmt == KERN_KVQ_ZIP4 ? ps.pages[p].n : 0;
            n2 += ps.pages[p].fmt == KERN_KVQ_ZIP2 ? ps.pages[p].n : 0;
        }
        assert_int_equal(n4, i == 0 ? ctx : 0);
        assert_int_equal(n2, i == 0 ? 0 : ctx);
        assert_true(kernel_vs_ref(pool2, sh, &ps, q, 1, ctx, NULL) <= 1e-5);
        ps_free(&ps);
    }
    int32_t order[10];
    const float sc[5] = {0.5f, 0.1f, 0.9f, 0.1f, 0.3f};
    assert_int_equal(kern_kvq_select_salient(order, sc, 1, 100, 5, 1.0f, err, sizeof(err)), 5);
    for (int i = 0; i < 5; i++)
        assert_int_equal(order[i], 100 + i);
    assert_int_equal(kern_kvq_select_salient(order, sc, 1, 100, 5, 0.0f, err, sizeof(err)), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(order[i], 100 + i);
    /* 0.6 of 5: 2 regular, the lowest scores; the tie at 0.1 keeps both. */
    assert_int_equal(kern_kvq_select_salient(order, sc, 1, 100, 5, 0.6f, err, sizeof(err)), 3);
    const int32_t want[5] = {100, 102, 104, 101, 103};
    assert_memory_equal(order, want, sizeof(want));
    free(k);
    free(v);
    free(q);
}

/* ---- saliency ---- */

/* Spec 3.6 test 5: probe count (L - floor(0.95 L)) + floor(0.05 L), the
 * recent rows, random rows below floor(0.95 L), reproducible by seed. */
static void test_kvq_probe_rows_are_recent_plus_seeded_random(void **state)
{
    (void)state;
    const int Ls[7] = {1, 6, 19, 20, 100, 1000, 2048};
    for (int i = 0; i < 7; i++) {
        const int L = Ls[i], body = L * 95 / 100, want = (L - body) + L * 5 / 100;
        assert_int_equal(kern_kvq_probe_count(L), want);
        int32_t *a = malloc(sizeof(int32_t) * (size_t)want), *b = malloc(sizeof(int32_t) * want);
        assert_non_null(a);
        assert_non_null(b);
        assert_int_equal(kern_kvq_probe_rows(a, L, 42), want);
        assert_int_equal(kern_kvq_probe_rows(b, L, 42), want);
        assert_memory_equal(a, b, sizeof(int32_t) * want);
        for (int j = 1; j < want; j++)
            assert_true(a[j - 1] <= a[j]);
        const int n_rand = L * 5 / 100;
        for (int j = 0; j < n_rand; j++)
            assert_true(a[j] >= 0 && a[j] < body);
        for (int j = n_rand; j < want; j++)
            assert_int_equal(a[j], body + (j - n_rand));
        if (L >= 1000) {
            assert_int_equal(kern_kvq_probe_rows(b, L, 43), want);
            assert_true(memcmp(a, b, sizeof(int32_t) * n_rand) != 0);
        }
        free(a);
        free(b);
    }
    assert_int_equal(kern_kvq_probe_count(6), 1); /* 6 - 5 recent + 0 random */
    assert_int_equal(kern_kvq_probe_count(0), 0);
}

/* Spec 3.6 test 5: a hand-built 6x6 causal attention matrix. K_j = e_j and
 * q_i chosen so that s_ij = ln(j + 1): A[i][j] = (j + 1) / ((i + 1)(i + 2)/2).
 * Two query heads share the kv head, so p[j] = 2 sum_{probes i >= j} A[i][j];
 * causal-rows divides by 6 - j, probe-rows by the probes at or after j. */
static void test_kvq_saliency_matches_the_formula_on_a_6x6_matrix(void **state)
{
    (void)state;
    char err[256];
    const int L = 6, D = 8;
    const kern_kvq_geom g = {1, D, 16};
    float k[6 * 8] = {0}, q[6 * 2 * 8] = {0};
    for (int j = 0; j < L; j++)
        k[j * D + j] = 1.0f;
    for (int i = 0; i < L; i++)
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < L; j++)
                q[(i * 2 + h) * D + j] = logf((float)(j + 1)) * sqrtf((float)D);
    const kern_kvq_src ks = contiguous(k, &g, L);
    int32_t all[6] = {0, 1, 2, 3, 4, 5};

    /* Every row a probe, lse computed inside. */
    float colsum[6] = {0}, scores[6];
    kern_kvq_probe_args pa = {
        .q = q, .q_pos = all, .n_q = L, .n_heads = 2, .k = &ks, .key_first = 0, .n_keys = L};
    assert_int_equal(kern_kvq_saliency_accumulate(pool2, colsum, &g, &pa, err, sizeof(err)), 0);
    double p[6] = {0};
    for (int j = 0; j < L; j++)
        for (int i = j; i < L; i++)
            p[j] += 2.0 * (j + 1) / ((i + 1) * (i + 2) / 2.0);
    for (int j = 0; j < L; j++)
        assert_float_equal(colsum[j], p[j], 1e-5);
    assert_int_equal(kern_kvq_saliency_normalize(scores, colsum, 1, 0, L, KERN_KVQ_NORM_CAUSAL_ROWS,
                                                 L, NULL, 0, false, err, sizeof(err)),
                     0);
    for (int j = 0; j < L; j++)
        assert_float_equal(scores[j], p[j] / (L - j), 1e-6);
    assert_int_equal(kern_kvq_saliency_normalize(scores, colsum, 1, 0, L, KERN_KVQ_NORM_PROBE_ROWS,
                                                 L, all, L, false, err, sizeof(err)),
                     0);
    for (int j = 0; j < L; j++)
        assert_float_equal(scores[j], p[j] / (L - j), 1e-6); /* all rows: the two agree */
    const int32_t unsorted[6] = {5, 3, 4, 0, 2, 1};
    float again[6];
    assert_int_equal(kern_kvq_saliency_normalize(again, colsum, 1, 0, L, KERN_KVQ_NORM_PROBE_ROWS,
                                                 L, unsorted, L, false, err, sizeof(err)),
                     0);
    assert_memory_equal(again, scores, sizeof(again));

    /* The seeded probe set of L = 6 is the last row alone; pass its lse from
     * the decode kernel (row at position 5 over an F32 page). */
    int32_t probes[1];
    assert_int_equal(kern_kvq_probe_rows(probes, L, 7), 1);
    assert_int_equal(probes[0], 5);
    float out[2 * 8], lse[2];
    const kern_kvq_page page = {.k = k, .v = k, .pos0 = 0, .n = L, .fmt = KERN_KVQ_F32};
    const kern_kvq_seq s = {.q = q + 5 * 2 * D,
                            .out = out,
                            .lse = lse,
                            .q_pos = probes,
                            .pages = &page,
                            .n_pages = 1,
                            .n_q = 1,
                            .ctx_len = L};
    const kern_kvq_attn_args a = {.g = g, .n_heads = 2, .seqs = &s, .n_seqs = 1};
    assert_int_equal(kern_attention_decode_quant(NULL, &a, err, sizeof(err)), 0);
    assert_float_equal(lse[0], logf(21.0f), 1e-5);
    memset(colsum, 0, sizeof(colsum));
    pa = (kern_kvq_probe_args){.q = q + 5 * 2 * D,
                               .q_pos = probes,
                               .lse = lse,
                               .n_q = 1,
                               .n_heads = 2,
                               .k = &ks,
                               .key_first = 0,
                               .n_keys = L};
    assert_int_equal(kern_kvq_saliency_accumulate(NULL, colsum, &g, &pa, err, sizeof(err)), 0);
    for (int j = 0; j < L; j++)
        assert_float_equal(colsum[j], 2.0 * (j + 1) / 21.0, 1e-6);
    assert_int_equal(kern_kvq_saliency_normalize(scores, colsum, 1, 0, L, KERN_KVQ_NORM_CAUSAL_ROWS,
                                                 L, NULL, 0, false, err, sizeof(err)),
                     0);
    for (int j = 0; j < L; j++)
        assert_float_equal(scores[j], 2.0 * (j + 1) / 21.0 / (L - j), 1e-6);
    /* Causal rows: (j+1)/(6-j) rises with j; regular = floor(0.5 * 6) = 3 lowest. */
    int32_t order[6];
    assert_int_equal(kern_kvq_select_salient(order, scores, 1, 0, L, 0.5f, err, sizeof(err)), 3);
    const int32_t want_causal[6] = {3, 4, 5, 0, 1, 2};
    assert_memory_equal(order, want_causal, sizeof(want_causal));
    assert_int_equal(kern_kvq_saliency_normalize(scores, colsum, 1, 0, L, KERN_KVQ_NORM_PROBE_ROWS,
                                                 L, probes, 1, false, err, sizeof(err)),
                     0);
    for (int j = 0; j < L; j++)
        assert_float_equal(scores[j], 2.0 * (j + 1) / 21.0, 1e-6);

    /* A window: keys [2, 5) only, same sums for those keys. */
    float win[3] = {0};
    pa.key_first = 2;
    pa.n_keys = 3;
    assert_int_equal(kern_kvq_saliency_accumulate(NULL, win, &g, &pa, err, sizeof(err)), 0);
    for (int j = 0; j < 3; j++)
        assert_float_equal(win[j], 2.0 * (j + 3) / 21.0, 1e-6);
}

/* Head-shared saliency gives every head the sum over heads, hence one set. */
static void test_kvq_head_shared_saliency_gives_every_head_the_same_set(void **state)
{
    (void)state;
    char err[256];
    const float colsum[2 * 4] = {1, 5, 2, 0, 4, 0, 2, 3}; /* heads 0 and 1 */
    float sc[8];
    int32_t order[8];
    assert_int_equal(kern_kvq_saliency_normalize(sc, colsum, 2, 10, 4, KERN_KVQ_NORM_NONE, 0, NULL,
                                                 0, false, err, sizeof(err)),
                     0);
    assert_int_equal(kern_kvq_select_salient(order, sc, 2, 10, 4, 0.5f, err, sizeof(err)), 2);
    const int32_t per_head[8] = {11, 12, 10, 13, 10, 13, 11, 12};
    assert_memory_equal(order, per_head, sizeof(per_head));
    assert_int_equal(kern_kvq_saliency_normalize(sc, colsum, 2, 10, 4, KERN_KVQ_NORM_NONE, 0, NULL,
                                                 0, true, err, sizeof(err)),
                     0);
    for (int i = 0; i < 4; i++)
        assert_float_equal(sc[i], sc[4 + i], 0.0);
    assert_int_equal(kern_kvq_select_salient(order, sc, 2, 10, 4, 0.5f, err, sizeof(err)), 2);
    const int32_t shared[8] = {10, 11, 12, 13, 10, 11, 12, 13}; /* sums 5 5 4 3 */
    assert_memory_equal(order, shared, sizeof(shared));
}

/* ---- cadence ---- */

static void test_kvq_cadence_compresses_the_prompt_then_flushes_every_g_tokens(void **state)
{
    (void)state;
    char err[256];
    kern_kvq_policy p = {.high = KERN_KVQ_ZIP4,
                         .low = KERN_KVQ_ZIP2,
                         .salient_fraction = 0.6f,
                         .block_size = 16,
                         .flush_tokens = KERN_KVQ_DEFAULT_FLUSH,
                         .saliency = KERN_KVQ_SAL_CURRENT,
                         .stats = KERN_KVQ_STATS_OWN};
    assert_int_equal(kern_kvq_policy_check(&p, err, sizeof(err)), 0);
    kern_kvq_seq_state s = {0};
    /* Prefill in chunks of 64 of a 150-token prompt: probes scored in each. */
    kern_kvq_plan pl = kern_kvq_cadence_plan(&p, s, 64, false);
    assert_int_equal(pl.action, KERN_KVQ_ACT_NONE);
    assert_true(pl.score_probes && !pl.score_window);
    s = kern_kvq_cadence_advance(s, 64, false, &pl);
    pl = kern_kvq_cadence_plan(&p, s, 64, false);
    s = kern_kvq_cadence_advance(s, 64, false, &pl);
    pl = kern_kvq_cadence_plan(&p, s, 22, true);
    assert_int_equal(pl.action, KERN_KVQ_ACT_COMPRESS_PROMPT);
    assert_int_equal(pl.first, 0);
    assert_int_equal(pl.n, 150); /* a set: the whole prompt, partial page too */
    assert_true(pl.new_stats && pl.score_probes);
    assert_int_equal(pl.norm, KERN_KVQ_NORM_CAUSAL_ROWS);
    assert_int_equal(pl.norm_L, 150);
    s = kern_kvq_cadence_advance(s, 22, true, &pl);
    assert_true(s.prompt_done);
    assert_int_equal(s.n_compressed, 150);
    /* Decode: nothing until the tail holds 128 tokens; then the flushing
     * step's query scores the window, raw (the reference). */
    int flushes = 0;
    for (int step = 1; step <= 300; step++) {
        pl = kern_kvq_cadence_plan(&p, s, 1, false);
        assert_false(pl.score_probes);
        if (pl.action == KERN_KVQ_ACT_FLUSH) {
            flushes++;
            assert_int_equal(pl.n, 128);
            assert_int_equal(pl.first, 150 + 128 * (flushes - 1));
            assert_true(pl.score_window && pl.new_stats);
            assert_int_equal(pl.window_first, pl.first);
            assert_int_equal(pl.window_n, 128);
            assert_int_equal(pl.norm, KERN_KVQ_NORM_NONE);
            assert_int_equal(step % 128, 0);
        } else {
            assert_int_equal(pl.action, KERN_KVQ_ACT_NONE);
            assert_false(pl.score_window);
        }
        s = kern_kvq_cadence_advance(s, 1, false, &pl);
        assert_true(s.n_tokens - s.n_compressed < 128);
    }
    assert_int_equal(flushes, 2);
    assert_int_equal(s.n_tokens, 450);

    /* Window saliency: every decode step scores the tail; the flush
     * normalizes by the rows that saw each token (L - j). Prompt statistics:
     * no new segment. */
    p.saliency = KERN_KVQ_SAL_WINDOW;
    p.stats = KERN_KVQ_STATS_PROMPT;
    p.flush_tokens = 16;
    assert_int_equal(kern_kvq_policy_check(&p, err, sizeof(err)), 0);
    s = (kern_kvq_seq_state){.n_tokens = 100, .n_compressed = 100, .prompt_done = true};
    for (int step = 1; step <= 16; step++) {
        pl = kern_kvq_cadence_plan(&p, s, 1, false);
        assert_true(pl.score_window);
        assert_int_equal(pl.window_first, 100);
        assert_int_equal(pl.window_n, step);
        assert_int_equal(pl.action, step == 16 ? KERN_KVQ_ACT_FLUSH : KERN_KVQ_ACT_NONE);
        s = kern_kvq_cadence_advance(s, 1, false, &pl);
    }
    assert_false(pl.new_stats);
    assert_int_equal(pl.norm, KERN_KVQ_NORM_CAUSAL_ROWS);
    assert_int_equal(pl.norm_L, 116);
    assert_int_equal(s.n_compressed, 116);
}

static void test_kvq_cadence_packs_uniform_formats_page_by_page(void **state)
{
    (void)state;
    char err[256];
    const kern_kvq_policy p = {.high = KERN_KVQ_Q8, .low = KERN_KVQ_Q8, .block_size = 16};
    assert_int_equal(kern_kvq_policy_check(&p, err, sizeof(err)), 0);
    kern_kvq_seq_state s = {0};
    kern_kvq_plan pl = kern_kvq_cadence_plan(&p, s, 40, true);
    assert_int_equal(pl.action, KERN_KVQ_ACT_COMPRESS_PROMPT);
    assert_int_equal(pl.n, 32); /* full pages only; 8 tokens stay in the tail */
    assert_false(pl.score_probes || pl.new_stats);
    s = kern_kvq_cadence_advance(s, 40, true, &pl);
    int packed = 0;
    for (int step = 1; step <= 40; step++) {
        pl = kern_kvq_cadence_plan(&p, s, 1, false);
        assert_false(pl.score_window);
        if (pl.action == KERN_KVQ_ACT_FLUSH) {
            assert_int_equal(pl.n, 16);
            assert_int_equal(pl.first % 16, 0);
            packed++;
        }
        s = kern_kvq_cadence_advance(s, 1, false, &pl);
    }
    assert_int_equal(packed, 3); /* positions 32..80 */
    assert_int_equal(s.n_compressed, 80);
    /* A short prompt leaves everything in the tail; fp never compresses. */
    s = (kern_kvq_seq_state){0};
    pl = kern_kvq_cadence_plan(&p, s, 5, true);
    assert_int_equal(pl.action, KERN_KVQ_ACT_NONE);
    const kern_kvq_policy fp = {.high = KERN_KVQ_F32, .low = KERN_KVQ_F32, .block_size = 16};
    pl = kern_kvq_cadence_plan(&fp, (kern_kvq_seq_state){.n_tokens = 64, .prompt_done = true}, 1,
                               false);
    assert_int_equal(pl.action, KERN_KVQ_ACT_NONE);
}

/* ---- paged sources and the decode pipeline ---- */

/* Rows read through a block table (and a source starting at an unaligned
 * position, as a ZIP tail) pack and score exactly like contiguous rows. */
static void test_kvq_paged_sources_pack_and_score_like_contiguous_rows(void **state)
{
    (void)state;
    rng_seed(111);
    char err[256];
    const kern_kvq_geom g = {2, 32, 16};
    const int kvd = 64, L = 70, first = 37, bs = 8, n_blocks = 12;
    float *x = random_floats((size_t)L * kvd, -2.0f, 2.0f);
    /* The positions [first, L) scattered over a pool of blocks of 8 rows. */
    float *pool = alloc_floats((size_t)n_blocks * bs * kvd);
    fill(pool, (size_t)n_blocks * bs * kvd, NAN);
    int32_t blocks[12];
    for (int i = 0; i < n_blocks; i++)
        blocks[i] = (int32_t)((i * 5 + 3) % n_blocks);
    for (int t = first; t < L; t++)
        memcpy(pool + ((size_t)blocks[(t - first) / bs] * bs + (t - first) % bs) * kvd,
               x + (size_t)t * kvd, sizeof(float) * kvd);
    const kern_kvq_src flat = contiguous(x, &g, L);
    const kern_kvq_src paged = {.base = pool,
                                .stride = (size_t)kvd,
                                .blocks = blocks,
                                .block_size = bs,
                                .first = first,
                                .len = L - first};
    const int32_t idx[2 * 5] = {40, 69, 37, 50, 51, 38, 39, 60, 61, 68};
    const kern_kvq_sel sel = {.idx = idx, .head_stride = 5, .n = 5};
    float st1[3 * 64], st2[3 * 64];
    assert_int_equal(kern_kvq_zip_stats(st1, KERN_KVQ_ZIP4, &g, &flat, &sel, &flat, first,
                                        L - first, err, sizeof(err)),
                     0);
    assert_int_equal(kern_kvq_zip_stats(st2, KERN_KVQ_ZIP4, &g, &paged, &sel, &paged, first,
                                        L - first, err, sizeof(err)),
                     0);
    assert_memory_equal(st1, st2, sizeof(st1));
    const kern_kvq_fmt fmts[3] = {KERN_KVQ_Q8, KERN_KVQ_Q4, KERN_KVQ_ZIP4};
    for (int f = 0; f < 3; f++) {
        const size_t bytes = kern_kvq_page_bytes(fmts[f], KERN_KVQ_V, &g);
        uint8_t *a = alloc_page(bytes), *b = alloc_page(bytes);
        memset(a, 0, bytes);
        memset(b, 0, bytes);
        assert_int_equal(
            kern_kvq_pack(a, KERN_KVQ_V, fmts[f], &g, 3, &flat, &sel, st1, err, sizeof(err)), 0);
        assert_int_equal(
            kern_kvq_pack(b, KERN_KVQ_V, fmts[f], &g, 3, &paged, &sel, st1, err, sizeof(err)), 0);
        assert_memory_equal(a, b, bytes);
        free(a);
        free(b);
    }
    /* Position 36 is not in the paged source. */
    const kern_kvq_sel before = {.first = 36, .n = 2};
    uint8_t *pg = alloc_page(kern_kvq_page_bytes(KERN_KVQ_Q8, KERN_KVQ_K, &g));
    assert_int_equal(
        kern_kvq_pack(pg, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, &paged, &before, NULL, err, sizeof(err)),
        -1);
    free(pg);
    /* Decode-window saliency over the paged tail equals the flat one. */
    float *q = random_floats(4 * 32, -1.0f, 1.0f);
    const float lse[4] = {3.0f, 2.5f, 4.0f, 3.5f};
    const int32_t qp = L - 1;
    float c1[2 * 33] = {0}, c2[2 * 33] = {0};
    kern_kvq_probe_args pa = {.q = q,
                              .q_pos = &qp,
                              .lse = lse,
                              .n_q = 1,
                              .n_heads = 4,
                              .k = &flat,
                              .key_first = first,
                              .n_keys = L - first};
    assert_int_equal(kern_kvq_saliency_accumulate(NULL, c1, &g, &pa, err, sizeof(err)), 0);
    pa.k = &paged;
    assert_int_equal(kern_kvq_saliency_accumulate(pool2, c2, &g, &pa, err, sizeof(err)), 0);
    assert_memory_equal(c1, c2, sizeof(c1));
    free(q);
    free(x);
    free(pool);
}

/* The recipe the plumbing follows, end to end on one layer: prompt probes
 * scored with their own lse, the prompt compressed to ZIP4/ZIP2 pages by
 * per-head saliency, decode steps whose queries accumulate the tail window
 * (KERN_KVQ_SAL_WINDOW) with the kernel's lse, and a flush that appends to
 * the open pages with the prompt's statistics (KERN_KVQ_STATS_PROMPT). After
 * every step the kernel matches the reference over its pages. */
static void test_kvq_decode_pipeline_follows_the_cadence_and_matches_the_reference(void **state)
{
    (void)state;
    rng_seed(121);
    char err[256];
    const kern_kvq_geom g = {2, 32, 16};
    const shape sh = {4, 2, 32, 16};
    const int kvd = 64, qd = 4 * 32, L = 40, steps = 16, total = L + steps;
    float *k = random_floats((size_t)total * kvd, -1.0f, 1.0f);
    float *v = random_floats((size_t)total * kvd, -1.0f, 1.0f);
    float *q = random_floats((size_t)total * qd, -1.0f, 1.0f); /* row t's query */
    const kern_kvq_policy pol = {.high = KERN_KVQ_ZIP4,
                                 .low = KERN_KVQ_ZIP2,
                                 .salient_fraction = 0.6f,
                                 .block_size = 16,
                                 .flush_tokens = 16,
                                 .saliency = KERN_KVQ_SAL_WINDOW,
                                 .stats = KERN_KVQ_STATS_PROMPT,
                                 .prompt_norm = KERN_KVQ_NORM_CAUSAL_ROWS};
    assert_int_equal(kern_kvq_policy_check(&pol, err, sizeof(err)), 0);
    const kern_kvq_src ks = contiguous(k, &g, total), vs = contiguous(v, &g, total);

    /* Prefill in one chunk: score the probes, then compress the prompt. */
    kern_kvq_seq_state st = {0};
    kern_kvq_plan pl = kern_kvq_cadence_plan(&pol, st, L, true);
    assert_true(pl.score_probes && pl.action == KERN_KVQ_ACT_COMPRESS_PROMPT && pl.n == L);
    int32_t probes[8];
    const int np = kern_kvq_probe_rows(probes, L, 99);
    assert_int_equal(np, 4);
    float pq[4 * 4 * 32];
    for (int r = 0; r < np; r++)
        memcpy(pq + (size_t)r * qd, q + (size_t)probes[r] * qd, sizeof(float) * qd);
    float colsum[2 * 40] = {0};
    const kern_kvq_probe_args pa = {
        .q = pq, .q_pos = probes, .n_q = np, .n_heads = 4, .k = &ks, .key_first = 0, .n_keys = L};
    assert_int_equal(kern_kvq_saliency_accumulate(pool2, colsum, &g, &pa, err, sizeof(err)), 0);
    assert_int_equal(kern_kvq_saliency_normalize(colsum, colsum, 2, 0, L, pl.norm, pl.norm_L,
                                                 probes, np, false, err, sizeof(err)),
                     0);
    int32_t order[2 * 40];
    const int n_sal = kern_kvq_select_salient(order, colsum, 2, 0, L, 0.6f, err, sizeof(err));
    assert_int_equal(n_sal, 24);
    page_set ps = {0};
    ps_add_zip_class(&ps, KERN_KVQ_ZIP4, &g, &ks, &vs, order, L, n_sal, 0, L);
    ps_add_zip_class(&ps, KERN_KVQ_ZIP2, &g, &ks, &vs, order + n_sal, L, L - n_sal, 0, L);
    assert_int_equal(ps.n_pages, 3); /* salient 16 + 8, regular 16 */
    const float *st_hi = ps.stats[0], *st_lo = ps.stats[1];
    st = kern_kvq_cadence_advance(st, L, true, &pl);

    /* Decode: the tail is F32 pages starting at L. */
    kern_kvq_page *tail = ps_new_page(&ps, KERN_KVQ_F32, &g);
    tail->pos0 = L;
    float window[2 * 16] = {0};
    float out[4 * 32], lse[4];
    for (int step = 0; step < steps; step++) {
        const int t = L + step;
        pl = kern_kvq_cadence_plan(&pol, st, 1, false);
        const kern_kvq_sel one = {.first = t, .n = 1};
        assert_int_equal(kern_kvq_pack((void *)tail->k, KERN_KVQ_K, KERN_KVQ_F32, &g, tail->n, &ks,
                                       &one, NULL, err, sizeof(err)),
                         0);
        assert_int_equal(kern_kvq_pack((void *)tail->v, KERN_KVQ_V, KERN_KVQ_F32, &g, tail->n, &vs,
                                       &one, NULL, err, sizeof(err)),
                         0);
        tail->n++;
        const kern_kvq_seq s = {.q = q + (size_t)t * qd,
                                .out = out,
                                .lse = lse,
                                .pages = ps.pages,
                                .n_pages = ps.n_pages,
                                .n_q = 1,
                                .ctx_len = t + 1};
        const kern_kvq_attn_args a = {.g = g, .n_heads = 4, .seqs = &s, .n_seqs = 1};
        assert_int_equal(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), 0);
        assert_true(kernel_vs_ref(pool2, sh, &ps, q + (size_t)t * qd, 1, t + 1, NULL) <= 1e-5);
        assert_true(pl.score_window);
        assert_int_equal(pl.window_first, L);
        assert_int_equal(pl.window_n, step + 1);
        const int32_t qp = t;
        const kern_kvq_probe_args wa = {.q = q + (size_t)t * qd,
                                        .q_pos = &qp,
                                        .lse = lse,
                                        .n_q = 1,
                                        .n_heads = 4,
                                        .k = &ks,
                                        .key_first = pl.window_first,
                                        .n_keys = 16};
        assert_int_equal(kern_kvq_saliency_accumulate(NULL, window, &g, &wa, err, sizeof(err)), 0);
        if (pl.action == KERN_KVQ_ACT_FLUSH) {
            assert_int_equal(step, 15);
            assert_false(pl.new_stats);
            assert_int_equal(kern_kvq_saliency_normalize(window, window, 2, pl.first, pl.n, pl.norm,
                                                         pl.norm_L, NULL, 0, false, err,
                                                         sizeof(err)),
                             0);
            /* Each token's mean attention over the rows that saw it is a
             * probability of a softmax over t + 1 keys or fewer. */
            for (int i = 0; i < 32; i++)
                assert_true(window[i] > 0.0f && window[i] <= 2.0f);
            int32_t ord[2 * 16];
            const int fs =
                kern_kvq_select_salient(ord, window, 2, pl.first, pl.n, 0.6f, err, sizeof(err));
            assert_int_equal(fs, 10);
            /* Append: 8 salient slots fill the open ZIP4 page, 2 open a new
             * one; the 6 regular tokens open a new ZIP2 page. */
            kern_kvq_page *open_hi = &ps.pages[1];
            assert_int_equal(open_hi->n, 8);
            const kern_kvq_sel fill8 = {.idx = ord, .head_stride = 16, .n = 8};
            assert_int_equal(kern_kvq_pack((void *)open_hi->k, KERN_KVQ_K, KERN_KVQ_ZIP4, &g, 8,
                                           &ks, &fill8, st_hi, err, sizeof(err)),
                             0);
            assert_int_equal(kern_kvq_pack((void *)open_hi->v, KERN_KVQ_V, KERN_KVQ_ZIP4, &g, 8,
                                           &vs, &fill8, st_hi, err, sizeof(err)),
                             0);
            open_hi->n = 16;
            const kern_kvq_fmt f2[2] = {KERN_KVQ_ZIP4, KERN_KVQ_ZIP2};
            const int32_t *ix[2] = {ord + 8, ord + fs};
            const int nn[2] = {2, 16 - fs};
            const float *sts[2] = {st_hi, st_lo};
            for (int c = 0; c < 2; c++) {
                kern_kvq_page *np2 = ps_new_page(&ps, f2[c], &g);
                const kern_kvq_sel sl = {.idx = ix[c], .head_stride = 16, .n = nn[c]};
                assert_int_equal(kern_kvq_pack((void *)np2->k, KERN_KVQ_K, f2[c], &g, 0, &ks, &sl,
                                               sts[c], err, sizeof(err)),
                                 0);
                assert_int_equal(kern_kvq_pack((void *)np2->v, KERN_KVQ_V, f2[c], &g, 0, &vs, &sl,
                                               sts[c], err, sizeof(err)),
                                 0);
                np2->stats = sts[c];
                np2->n = nn[c];
            }
            tail = &ps.pages[3];
            tail->n = 0; /* the tail page is free again */
            tail->pos0 = t + 1;
            memset(window, 0, sizeof(window));
        }
        st = kern_kvq_cadence_advance(st, 1, false, &pl);
    }
    assert_int_equal(st.n_compressed, total);
    /* The final cache: every token once, compressed; the kernel against the
     * reference and, loosely, against f32 attention over the original KV. */
    int slots = 0;
    for (int i = 0; i < ps.n_pages; i++)
        slots += ps.pages[i].n;
    assert_int_equal(slots, total);
    const float *qt = q + (size_t)(total - 1) * qd;
    assert_true(kernel_vs_ref(pool2, sh, &ps, qt, 1, total, NULL) <= 1e-5);
    float dense[4 * 32];
    kern_attn_args da = {.q = qt,
                         .k = k,
                         .v = v,
                         .out = dense,
                         .n_q = 1,
                         .ctx_len = total,
                         .n_heads = 4,
                         .n_kv_heads = 2,
                         .head_dim = 32,
                         .kv_stride = kvd};
    kern_attention_ref(&da);
    const kern_kvq_seq s = {
        .q = qt, .out = out, .pages = ps.pages, .n_pages = ps.n_pages, .n_q = 1, .ctx_len = total};
    const kern_kvq_attn_args a = {.g = g, .n_heads = 4, .seqs = &s, .n_seqs = 1};
    assert_int_equal(kern_attention_decode_quant(NULL, &a, err, sizeof(err)), 0);
    const double e = max_abs_diff(out, dense, 4 * 32);
    print_message("pipeline (zip4/2, 0.6): output vs f32 attention %.3e\n", e);
    assert_true(e < 0.1);
    ps_free(&ps);
    free(k);
    free(v);
    free(q);
}

/* ---- non-finite input and bad arguments ---- */

/* NaN and Inf in K/V never put a non-finite value into a quantized page (NaN
 * packs as 0, Inf saturates) and so never into the output; a NaN in a query
 * or in an f32 page only affects the heads that read it. */
static void test_kvq_nan_and_inf_inputs_do_not_crash_and_stay_contained(void **state)
{
    (void)state;
    rng_seed(101);
    char err[256];
    const kern_kvq_geom g = {2, 32, 16};
    const int kvd = 64, ctx = 40;
    float *k = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *v = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    k[3 * kvd + 5] = NAN;
    k[7 * kvd + 40] = INFINITY;
    v[9 * kvd + 1] = -INFINITY;
    v[11 * kvd + 33] = NAN;
    for (int c = 0; c < kvd; c++)
        v[20 * kvd + c] = NAN; /* a row with no finite value */
    k[30 * kvd + 2] = 1e30f;   /* beyond f16 scales */
    const kern_kvq_src ks = contiguous(k, &g, ctx), vs = contiguous(v, &g, ctx);
    const kern_kvq_fmt fmts[5] = {KERN_KVQ_Q8, KERN_KVQ_Q4, KERN_KVQ_ZIP8, KERN_KVQ_ZIP4,
                                  KERN_KVQ_ZIP2};
    float *q = random_floats(4 * 32, -1.0f, 1.0f);
    float *out = alloc_floats(4 * 32), *y = alloc_floats((size_t)ctx * kvd * 2);
    for (int f = 0; f < 5; f++) {
        page_set ps = {0};
        if (kern_kvq_fmt_is_zip(fmts[f]))
            ps_add_zip_segment(&ps, &g, &ks, &vs, 0, ctx, fmts[f], fmts[f], 0.5f, false);
        else
            ps_add_uniform(&ps, fmts[f], &g, &ks, &vs, 0, ctx);
        ps_dequantize(&ps, &g, y, y + (size_t)ctx * kvd);
        for (size_t i = 0; i < (size_t)ctx * kvd * 2; i++)
            assert_true(isfinite(y[i]));
        const kern_kvq_seq s = {
            .q = q, .out = out, .pages = ps.pages, .n_pages = ps.n_pages, .n_q = 1, .ctx_len = ctx};
        const kern_kvq_attn_args a = {.g = g, .n_heads = 4, .seqs = &s, .n_seqs = 1};
        assert_int_equal(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), 0);
        for (int i = 0; i < 4 * 32; i++)
            assert_true(isfinite(out[i]));
        ps_free(&ps);
    }
    /* F32 pages keep the NaN: kv head 0 (query heads 0, 1) reads it, kv head
     * 1 does not. A NaN query poisons its own head only. */
    float *kc = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    float *vc = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    kc[3 * kvd + 5] = NAN;
    q[3 * 32 + 4] = NAN;
    const kern_kvq_page pg[3] = {
        {.k = kc, .v = vc, .pos0 = 0, .n = 16, .fmt = KERN_KVQ_F32},
        {.k = kc + 16 * kvd, .v = vc + 16 * kvd, .pos0 = 16, .n = 16, .fmt = KERN_KVQ_F32},
        {.k = kc + 32 * kvd, .v = vc + 32 * kvd, .pos0 = 32, .n = 8, .fmt = KERN_KVQ_F32}};
    const kern_kvq_seq s = {
        .q = q, .out = out, .pages = pg, .n_pages = 3, .n_q = 1, .ctx_len = ctx};
    const kern_kvq_attn_args a = {.g = g, .n_heads = 4, .seqs = &s, .n_seqs = 1};
    assert_int_equal(kern_attention_decode_quant(NULL, &a, err, sizeof(err)), 0);
    for (int i = 0; i < 32; i++) {
        assert_true(isnan(out[i]) && isnan(out[32 + i])); /* kv head 0 */
        assert_true(isfinite(out[2 * 32 + i]));           /* kv head 1, clean query */
        assert_true(isnan(out[3 * 32 + i]));              /* NaN query */
    }
    free(kc);
    free(vc);
    free(k);
    free(v);
    free(q);
    free(out);
    free(y);
}

static void expect_error(int rc, const char *err, const char *needle)
{
    assert_int_equal(rc, -1);
    if (!strstr(err, needle))
        fail_msg("error \"%s\" does not mention \"%s\"", err, needle);
}

static void test_kvq_bad_arguments_are_rejected_with_a_message(void **state)
{
    (void)state;
    char err[256];
    const kern_kvq_geom g = {2, 32, 16};
    float x[64 * 4] = {0}, st[3 * 64] = {0}, q[4 * 32] = {0}, out[4 * 32];
    void *page = alloc_page(kern_kvq_page_bytes(KERN_KVQ_F32, KERN_KVQ_K, &g));
    const kern_kvq_src src = contiguous(x, &g, 4);
    const kern_kvq_sel sel = {.first = 0, .n = 4};

    const kern_kvq_geom bad_d = {2, 12, 16}, bad_bs = {2, 32, 0}, bad_h = {0, 32, 16};
    expect_error(kern_kvq_geom_check(&bad_d, err, sizeof(err)), err, "head_dim");
    expect_error(kern_kvq_geom_check(&bad_bs, err, sizeof(err)), err, "block_size");
    expect_error(kern_kvq_geom_check(&bad_h, err, sizeof(err)), err, "n_kv_heads");
    expect_error(
        kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_N_FMT, &g, 0, &src, &sel, NULL, err, sizeof(err)),
        err, "format");
    expect_error(
        kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_ZIP4, &g, 0, &src, &sel, NULL, err, sizeof(err)),
        err, "statistics");
    expect_error(
        kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_Q8, &g, 14, &src, &sel, NULL, err, sizeof(err)),
        err, "slots");
    const kern_kvq_sel past = {.first = 2, .n = 4};
    expect_error(
        kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, &src, &past, NULL, err, sizeof(err)),
        err, "outside the source");
    const int32_t idx[2] = {0, 9};
    const kern_kvq_sel badidx = {.idx = idx, .n = 2};
    expect_error(
        kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, &src, &badidx, NULL, err, sizeof(err)),
        err, "position 9");
    const kern_kvq_src narrow = {.base = x, .stride = 10, .len = 4};
    expect_error(
        kern_kvq_pack(page, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, &narrow, &sel, NULL, err, sizeof(err)),
        err, "stride");
    expect_error(
        kern_kvq_pack(NULL, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, &src, &sel, NULL, err, sizeof(err)),
        err, "page is NULL");
    expect_error(
        kern_kvq_unpack(out, 8, page, KERN_KVQ_K, KERN_KVQ_Q8, &g, 0, 1, NULL, err, sizeof(err)),
        err, "dst_stride");
    expect_error(kern_kvq_zip_stats(st, KERN_KVQ_Q8, &g, &src, &sel, &src, 0, 4, err, sizeof(err)),
                 err, "zip");
    expect_error(
        kern_kvq_zip_stats(st, KERN_KVQ_ZIP2, &g, &src, &sel, &src, 1, 4, err, sizeof(err)), err,
        "segment");

    /* The kernel: nothing is written when an argument is bad. */
    kern_kvq_page pg = {.k = x, .v = x, .pos0 = 0, .n = 4, .fmt = KERN_KVQ_F32};
    kern_kvq_seq s = {.q = q, .out = out, .pages = &pg, .n_pages = 1, .n_q = 1, .ctx_len = 4};
    kern_kvq_attn_args a = {.g = g, .n_heads = 4, .seqs = &s, .n_seqs = 1};
    fill(out, 4 * 32, 7.0f);
    a.n_heads = 3;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "n_heads");
    a.n_heads = 2 * 17;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "group");
    a.n_heads = 4;
    pg.n = 17;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "17 slots");
    pg.n = 4;
    pg.pos0 = 2;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "positions");
    pg.pos0 = 0;
    pg.fmt = KERN_KVQ_ZIP4;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "statistics");
    pg.fmt = 99;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "format");
    pg.fmt = KERN_KVQ_F32;
    pg.v = NULL;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "NULL");
    pg.v = x;
    s.n_q = 5;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "n_q");
    s.n_q = 1;
    const int32_t far = 4;
    s.q_pos = &far;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "position 4");
    s.q_pos = NULL;
    s.out = NULL;
    expect_error(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), err, "NULL");
    s.out = out;
    a.g.head_dim = 300;
    expect_error(kern_attention_decode_quant_ref(&a, err, sizeof(err)), err, "head_dim");
    expect_error(kern_attention_decode_quant(pool2, NULL, err, sizeof(err)), err, "NULL");
    for (int i = 0; i < 4 * 32; i++)
        assert_true(out[i] == 7.0f);
    a.g.head_dim = 32;
    assert_int_equal(kern_attention_decode_quant(pool2, &a, err, sizeof(err)), 0);

    /* Saliency, selection and the policy. */
    float cs[4] = {0};
    const int32_t qp = 3;
    kern_kvq_probe_args pa = {
        .q = q, .q_pos = &qp, .n_q = 1, .n_heads = 4, .k = &src, .key_first = 0, .n_keys = 4};
    const kern_kvq_src late = {.base = x, .stride = 64, .first = 2, .len = 2};
    pa.k = &late;
    expect_error(kern_kvq_saliency_accumulate(NULL, cs, &g, &pa, err, sizeof(err)), err, "keys");
    pa.k = &src;
    pa.q_pos = NULL;
    expect_error(kern_kvq_saliency_accumulate(NULL, cs, &g, &pa, err, sizeof(err)), err, "NULL");
    int32_t order[4];
    expect_error(kern_kvq_select_salient(order, cs, 1, 0, 4, 1.5f, err, sizeof(err)), err,
                 "salient_fraction");
    expect_error(kern_kvq_saliency_normalize(cs, cs, 1, 0, 4, KERN_KVQ_NORM_PROBE_ROWS, 4, NULL, 2,
                                             false, err, sizeof(err)),
                 err, "probe");
    kern_kvq_policy p = {.high = KERN_KVQ_ZIP4,
                         .low = KERN_KVQ_Q8,
                         .salient_fraction = 0.6f,
                         .block_size = 16,
                         .flush_tokens = 128};
    expect_error(kern_kvq_policy_check(&p, err, sizeof(err)), err, "zip");
    p.low = KERN_KVQ_ZIP2;
    p.flush_tokens = 100;
    expect_error(kern_kvq_policy_check(&p, err, sizeof(err)), err, "flush_tokens");
    p.flush_tokens = 128;
    p.salient_fraction = -0.1f;
    expect_error(kern_kvq_policy_check(&p, err, sizeof(err)), err, "salient_fraction");
    assert_string_equal(kern_kvq_fmt_name(KERN_KVQ_ZIP2), "zip2");
    assert_string_equal(kern_kvq_fmt_name((kern_kvq_fmt)42), "?");
    assert_int_equal(kern_kvq_zip_fmt(4), KERN_KVQ_ZIP4);
    assert_int_equal(kern_kvq_zip_fmt(3), KERN_KVQ_N_FMT);
    free(page);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kvq_page_bytes_match_q8_0_and_q4_0_per_32_values),
        cmocka_unit_test(test_kvq_int8_error_is_within_amax_over_254),
        cmocka_unit_test(
            test_kvq_int4_error_is_within_amax_over_16_and_over_8_at_the_clipped_extreme),
        cmocka_unit_test(test_kvq_zip_key_error_is_within_range_over_510_30_and_6),
        cmocka_unit_test(test_kvq_zip_value_error_is_within_channel_scale_times_half_delta),
        cmocka_unit_test(test_kvq_pack_unpack_round_trips_every_code_at_2_and_4_bits),
        cmocka_unit_test(test_kvq_page_filled_in_parts_equals_page_packed_at_once),
        cmocka_unit_test(test_kvq_constant_rows_and_columns_stay_finite_and_exact),
        cmocka_unit_test(test_kvq_mixed_pages_equal_dense_attention_over_dequantized_tensor),
        cmocka_unit_test(test_kvq_f32_pages_equal_the_dense_kernel_through_a_block_table),
        cmocka_unit_test(test_kvq_grouped_query_heads_match_the_reference),
        cmocka_unit_test(test_kvq_rows_are_causal_over_ordered_pages),
        cmocka_unit_test(test_kvq_batch_of_sequences_equals_each_sequence_alone),
        cmocka_unit_test(test_kvq_zip_8_8_behaves_like_int8),
        cmocka_unit_test(test_kvq_degenerate_ratios_put_every_token_in_one_class),
        cmocka_unit_test(test_kvq_probe_rows_are_recent_plus_seeded_random),
        cmocka_unit_test(test_kvq_saliency_matches_the_formula_on_a_6x6_matrix),
        cmocka_unit_test(test_kvq_head_shared_saliency_gives_every_head_the_same_set),
        cmocka_unit_test(test_kvq_cadence_compresses_the_prompt_then_flushes_every_g_tokens),
        cmocka_unit_test(test_kvq_cadence_packs_uniform_formats_page_by_page),
        cmocka_unit_test(test_kvq_paged_sources_pack_and_score_like_contiguous_rows),
        cmocka_unit_test(test_kvq_decode_pipeline_follows_the_cadence_and_matches_the_reference),
        cmocka_unit_test(test_kvq_nan_and_inf_inputs_do_not_crash_and_stay_contained),
        cmocka_unit_test(test_kvq_bad_arguments_are_rejected_with_a_message),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
