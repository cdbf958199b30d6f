/*
 * test_cuda_twins.c - every CUDA kernel (kernels/cuda.h) against its CPU twin
 * (kernels/kernels.h, kernels/quant.h) on the same random inputs, with the
 * tolerance stated at each case; plus the CUDA error paths (argument errors,
 * a missing context, a too-small workspace, a sync that times out instead of
 * hanging), graph replay, and a one-rank NCCL all-reduce when NCCL is built.
 *
 * Without a device (or in a build without CUDA) every test prints
 * "SKIP: no CUDA device" and is skipped, so the suite passes on CI machines.
 *
 * Inputs come from a fixed-seed xorshift. Device outputs are pre-filled with
 * NaN (0xff bytes), so an element a kernel forgets to write fails the
 * comparison, and padding a kernel must not touch is checked to still be NaN.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "kernels/quant.h"
#ifdef SIEVE_HAVE_CUDA
#include "kernels/collective.h"
#include "kernels/cuda.h"
#endif

static bool have_device;

#ifdef SIEVE_HAVE_CUDA

/* ---- inputs ---- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

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

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    assert_non_null(p);
    return p;
}

static float *random_floats(size_t n, float lo, float hi)
{
    float *p = xmalloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++)
        p[i] = rnd(lo, hi);
    return p;
}

/* ---- device helpers ---- */

static void sync_ok(const char *what)
{
    char err[512] = "";
    const int rc = kern_cuda_sync(err, sizeof(err));
    if (rc)
        fail_msg("%s: %s: %s", what, kern_cuda_strerror(rc), err);
}

static void check(int rc, const char *what)
{
    if (rc) {
        char err[512] = "";
        kern_cuda_sync(err, sizeof(err));
        fail_msg("%s: %s: %s", what, kern_cuda_strerror(rc), err);
    }
}

static void *dev_alloc(size_t bytes)
{
    char err[256] = "";
    void *p = kern_cuda_malloc(bytes, err, sizeof(err));
    if (!p)
        fail_msg("kern_cuda_malloc(%zu): %s", bytes, err);
    return p;
}

/* Device copy of host data. */
static void *dev_from(const void *h, size_t bytes)
{
    void *d = dev_alloc(bytes);
    check(kern_cuda_h2d(d, h, bytes, KERN_CUDA_COMPUTE), "h2d");
    return d;
}

/* Device buffer of NaN (every byte 0xff). */
static void *dev_nan(size_t bytes)
{
    void *d = dev_alloc(bytes);
    check(kern_cuda_memset(d, 0xff, bytes, KERN_CUDA_COMPUTE), "memset");
    return d;
}

static void to_host(void *h, const void *d, size_t bytes)
{
    check(kern_cuda_d2h(h, d, bytes, KERN_CUDA_COMPUTE), "d2h");
    sync_ok("d2h");
}

static bool is_nan_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u == 0xffffffffu;
}

/* |got - want| <= atol + rtol * (scale ? scale[i] : |want[i]|) for all i;
 * fails naming the worst element. Returns the largest error seen. */
static double expect_close(const char *what, const float *got, const float *want,
                           const float *scale, size_t n, double rtol, double atol)
{
    double worst_excess = 0.0, max_err = 0.0;
    size_t worst = 0;
    bool bad = false;
    for (size_t i = 0; i < n; i++) {
        const double s = scale ? scale[i] : fabs((double)want[i]);
        const double e = fabs((double)got[i] - (double)want[i]);
        const double tol = atol + rtol * s;
        if (!(e <= tol)) { /* NaN fails too */
            const double excess = isnan(e) ? INFINITY : e - tol;
            if (!bad || excess > worst_excess) {
                worst_excess = excess;
                worst = i;
            }
            bad = true;
        }
        if (e > max_err)
            max_err = e;
    }
    if (bad)
        fail_msg("%s: element %zu is %.9g, CPU twin %.9g (tolerance %.3g + %.3g * %.6g)", what,
                 worst, (double)got[worst], (double)want[worst], atol, rtol,
                 scale ? (double)scale[worst] : fabs((double)want[worst]));
    return max_err;
}

/* ---- elementwise ---- */

static void case_rmsnorm(void)
{
    /* Tolerance: relative 1e-5 (the sum of squares is reduced in another order). */
    static const int shapes[][2] = {{1, 4096}, {5, 100}, {33, 1031}, {2, 1}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        const int rows = shapes[s][0], dim = shapes[s][1];
        const size_t n = (size_t)rows * dim;
        float *x = random_floats(n, -3.0f, 3.0f), *w = random_floats((size_t)dim, 0.5f, 1.5f);
        float *want = xmalloc(sizeof(float) * n), *got = xmalloc(sizeof(float) * n);
        kern_rmsnorm_f32(want, x, w, rows, dim, 1e-5f);
        float *dx = dev_from(x, sizeof(float) * n), *dw = dev_from(w, sizeof(float) * dim);
        float *dout = dev_nan(sizeof(float) * n);
        check(kern_cuda_rmsnorm_f32(dout, dx, dw, rows, dim, 1e-5f), "rmsnorm");
        to_host(got, dout, sizeof(float) * n);
        expect_close("rmsnorm", got, want, NULL, n, 1e-5, 1e-7);
        kern_cuda_free(dx);
        kern_cuda_free(dw);
        kern_cuda_free(dout);
        free(x);
        free(w);
        free(want);
        free(got);
    }
}

static void case_swiglu(void)
{
    /* Tolerance: relative 4e-6 (expf differs by an ulp or two). Also in place. */
    const size_t n = 100003;
    float *g = random_floats(n, -10.0f, 10.0f), *u = random_floats(n, -2.0f, 2.0f);
    float *want = xmalloc(sizeof(float) * n), *got = xmalloc(sizeof(float) * n);
    kern_swiglu_f32(want, g, u, n);
    float *dg = dev_from(g, sizeof(float) * n), *du = dev_from(u, sizeof(float) * n);
    float *dout = dev_nan(sizeof(float) * n);
    check(kern_cuda_swiglu_f32(dout, dg, du, n), "swiglu");
    to_host(got, dout, sizeof(float) * n);
    expect_close("swiglu", got, want, NULL, n, 4e-6, 1e-30);
    check(kern_cuda_swiglu_f32(dg, dg, du, n), "swiglu in place");
    to_host(got, dg, sizeof(float) * n);
    expect_close("swiglu in place", got, want, NULL, n, 4e-6, 1e-30);
    kern_cuda_free(dg);
    kern_cuda_free(du);
    kern_cuda_free(dout);
    free(g);
    free(u);
    free(want);
    free(got);
}

static void case_add(void)
{
    /* One f32 addition per element: bit-identical. */
    const size_t n = 100003;
    float *y = random_floats(n, -5.0f, 5.0f), *x = random_floats(n, -5.0f, 5.0f);
    float *got = xmalloc(sizeof(float) * n);
    float *dy = dev_from(y, sizeof(float) * n), *dx = dev_from(x, sizeof(float) * n);
    kern_add_f32(y, x, n);
    check(kern_cuda_add_f32(dy, dx, n), "add");
    to_host(got, dy, sizeof(float) * n);
    assert_memory_equal(got, y, sizeof(float) * n);
    kern_cuda_free(dy);
    kern_cuda_free(dx);
    free(y);
    free(x);
    free(got);
}

static void case_rope(void)
{
    /* Both pairings. Tolerance: the angle pos * freq can differ by the
     * rounding of freq (an ulp of powf), so |err| <= (|a| + |b|) * (pos *
     * 2.4e-7 + 1e-6) per pair; in practice almost every value is
     * bit-identical (counted and printed). */
    static const int32_t pos[] = {0, 1, 2, 17, 1000, 4095, 32768, 100000, 131071};
    const int rows = (int)(sizeof(pos) / sizeof(pos[0]));
    static const struct {
        int n_heads, head_dim, rope_dim;
        float base;
    } cfg[] = {{4, 128, 128, 10000.0f}, {3, 64, 32, 500000.0f}, {2, 96, 96, 1000000.0f}};
    for (size_t c = 0; c < 2 * sizeof(cfg) / sizeof(cfg[0]); c++) {
        const bool neox = c % 2 == 1;
        const size_t k = c / 2;
        const int nh = cfg[k].n_heads, hd = cfg[k].head_dim;
        const size_t n = (size_t)rows * nh * hd;
        float *x = random_floats(n, -1.0f, 1.0f);
        float *want = xmalloc(sizeof(float) * n), *got = xmalloc(sizeof(float) * n);
        float *scale = xmalloc(sizeof(float) * n);
        memcpy(want, x, sizeof(float) * n);
        const int rd = cfg[k].rope_dim;
        if (neox)
            kern_rope_neox_f32(want, pos, rows, nh, hd, rd, cfg[k].base);
        else
            kern_rope_f32(want, pos, rows, nh, hd, rd, cfg[k].base);
        /* |a| + |b| <= 2 for inputs in [-1, 1]. */
        for (int r = 0; r < rows; r++)
            for (size_t i = 0; i < (size_t)nh * hd; i++)
                scale[(size_t)r * nh * hd + i] = 2.0f * ((float)pos[r] * 2.4e-7f + 1e-6f);
        float *dx = dev_from(x, sizeof(float) * n);
        int32_t *dpos = dev_from(pos, sizeof(pos));
        if (neox)
            check(kern_cuda_rope_neox_f32(dx, dpos, rows, nh, hd, rd, cfg[k].base), "rope_neox");
        else
            check(kern_cuda_rope_f32(dx, dpos, rows, nh, hd, rd, cfg[k].base), "rope");
        to_host(got, dx, sizeof(float) * n);
        expect_close(neox ? "rope_neox" : "rope", got, want, scale, n, 1.0, 1e-30);
        size_t same = 0;
        for (size_t i = 0; i < n; i++)
            same += memcmp(&got[i], &want[i], 4) == 0;
        print_message("%s (heads %d, dim %d, rope_dim %d): %zu of %zu values bit-identical\n",
                      neox ? "rope_neox" : "rope", nh, hd, rd, same, n);
        kern_cuda_free(dx);
        kern_cuda_free(dpos);
        free(x);
        free(want);
        free(got);
        free(scale);
    }
}

static void case_rope_table(void)
{
    /* Scaled RoPE from a table, both pairings. The angle pos * inv_freq[i] is
     * the same float product on both sides, so only sin/cos rounding differs:
     * |err| <= (|a| + |b|) * 1e-6 per pair. */
    static const int32_t pos[] = {0, 1, 5, 999, 8191, 65535, 131071};
    const int rows = (int)(sizeof(pos) / sizeof(pos[0]));
    const int nh = 3, hd = 128, rd = 128, half = rd / 2;
    float inv[64];
    for (int i = 0; i < half; i++) /* Llama 3 style: low frequencies divided by up to 8 */
        inv[i] = powf(500000.0f, -2.0f * (float)i / (float)rd) / (i < half / 2 ? 1.0f : 8.0f);
    const size_t n = (size_t)rows * nh * hd;
    for (int neox = 0; neox < 2; neox++) {
        float *x = random_floats(n, -1.0f, 1.0f);
        float *want = xmalloc(sizeof(float) * n), *got = xmalloc(sizeof(float) * n);
        float *scale = xmalloc(sizeof(float) * n);
        memcpy(want, x, sizeof(float) * n);
        kern_rope_table_f32(want, pos, rows, nh, hd, rd, inv, neox);
        for (size_t i = 0; i < n; i++)
            scale[i] = 2e-6f;
        float *dx = dev_from(x, sizeof(float) * n), *dinv = dev_from(inv, sizeof(float) * half);
        int32_t *dpos = dev_from(pos, sizeof(pos));
        check(kern_cuda_rope_table_f32(dx, dpos, rows, nh, hd, rd, dinv, neox), "rope_table");
        to_host(got, dx, sizeof(float) * n);
        expect_close(neox ? "rope_table neox" : "rope_table", got, want, scale, n, 1.0, 1e-30);
        kern_cuda_free(dx);
        kern_cuda_free(dinv);
        kern_cuda_free(dpos);
        free(x);
        free(want);
        free(got);
        free(scale);
    }
}

static void case_add_rows(void)
{
    /* One f32 addition per element, as kern_add_f32 on each row: bit-identical. */
    const int rows = 37, n = 1031;
    const size_t total = (size_t)rows * n;
    float *y = random_floats(total, -5.0f, 5.0f), *b = random_floats((size_t)n, -1.0f, 1.0f);
    float *got = xmalloc(sizeof(float) * total);
    float *dy = dev_from(y, sizeof(float) * total), *db = dev_from(b, sizeof(float) * n);
    for (int r = 0; r < rows; r++)
        kern_add_f32(y + (size_t)r * n, b, (size_t)n);
    check(kern_cuda_add_rows_f32(dy, db, rows, n), "add_rows");
    to_host(got, dy, sizeof(float) * total);
    assert_memory_equal(got, y, sizeof(float) * total);
    kern_cuda_free(dy);
    kern_cuda_free(db);
    free(y);
    free(b);
    free(got);
}

static void case_kv_store(void)
{
    /* Rows of k and v copied to scattered slots of a strided cache (a rank's
     * columns of a wider row), a negative slot skipped: bit-identical, and
     * every other cache value untouched. */
    const int rows = 9, kvd = 96, stride = 160, n_slots = 64;
    static const int32_t slots[] = {5, 63, 0, 17, -1, 18, 40, 2, 33};
    const size_t cache_n = (size_t)n_slots * stride;
    float *k = random_floats((size_t)rows * kvd, -2.0f, 2.0f);
    float *v = random_floats((size_t)rows * kvd, -2.0f, 2.0f);
    float *kc = random_floats(cache_n, -1.0f, 1.0f), *vc = random_floats(cache_n, -1.0f, 1.0f);
    float *got = xmalloc(sizeof(float) * cache_n);
    float *dkc = dev_from(kc, sizeof(float) * cache_n),
          *dvc = dev_from(vc, sizeof(float) * cache_n);
    float *dk = dev_from(k, sizeof(float) * rows * kvd),
          *dv = dev_from(v, sizeof(float) * rows * kvd);
    int32_t *dslots = dev_from(slots, sizeof(slots));
    const int off = 32; /* the rank's first column */
    for (int r = 0; r < rows; r++) {
        if (slots[r] < 0)
            continue;
        memcpy(kc + (size_t)slots[r] * stride + off, k + (size_t)r * kvd, sizeof(float) * kvd);
        memcpy(vc + (size_t)slots[r] * stride + off, v + (size_t)r * kvd, sizeof(float) * kvd);
    }
    check(kern_cuda_kv_store_f32(dkc + off, dvc + off, stride, dk, dv, kvd, dslots, rows),
          "kv_store");
    to_host(got, dkc, sizeof(float) * cache_n);
    assert_memory_equal(got, kc, sizeof(float) * cache_n);
    to_host(got, dvc, sizeof(float) * cache_n);
    assert_memory_equal(got, vc, sizeof(float) * cache_n);
    kern_cuda_free(dkc);
    kern_cuda_free(dvc);
    kern_cuda_free(dk);
    kern_cuda_free(dv);
    kern_cuda_free(dslots);
    free(k);
    free(v);
    free(kc);
    free(vc);
    free(got);
}

/* ---- conversions ---- */

static void case_conversions(void)
{
    /* Bit-identical, except NaN to f32 (the GPU gives the canonical NaN). */
    enum { H = 65536, F = 200000 };
    uint16_t *h = xmalloc(sizeof(uint16_t) * H);
    for (int i = 0; i < H; i++)
        h[i] = (uint16_t)i;
    float *got = xmalloc(sizeof(float) * (H > F ? H : F));
    uint16_t *dh = dev_from(h, sizeof(uint16_t) * H);
    float *df = dev_nan(sizeof(float) * F);
    for (int bf = 0; bf < 2; bf++) {
        check(bf ? kern_cuda_bf16_to_f32_row(df, dh, H) : kern_cuda_f16_to_f32_row(df, dh, H),
              "half to f32");
        to_host(got, df, sizeof(float) * H);
        for (int i = 0; i < H; i++) {
            const float want = bf ? kern_bf16_to_f32(h[i]) : kern_f16_to_f32(h[i]);
            if (isnan(want) ? !isnan(got[i]) : memcmp(&want, &got[i], 4) != 0)
                fail_msg("%s 0x%04x: got %.9g, CPU twin %.9g", bf ? "bf16" : "f16", i,
                         (double)got[i], (double)want);
        }
    }
    /* f32 -> half: random bit patterns (every class: NaN payloads, infinities,
     * subnormals) and the rounding edges. */
    float *x = xmalloc(sizeof(float) * F);
    static const float edges[] = {0.0f,      -0.0f,      65504.0f,       65519.996f, 65520.0f,
                                  -65520.0f, 6.1e-5f,    5.96e-8f,       2.98e-8f,   2.99e-8f,
                                  1.0f,      1.0009765f, 1.00048828125f, INFINITY,   -INFINITY,
                                  NAN,       3.4e38f,    1.0e-40f};
    const size_t n_edges = sizeof(edges) / sizeof(edges[0]);
    for (size_t i = 0; i < F; i++) {
        uint32_t u = (uint32_t)xorshift64();
        memcpy(&x[i], &u, 4);
    }
    memcpy(x, edges, sizeof(edges));
    for (size_t i = n_edges; i < F / 2; i++) /* half of them in the f16 range */
        x[i] = rnd(-70000.0f, 70000.0f) * (i % 3 == 0 ? 1e-4f : 1.0f);
    float *dx = dev_from(x, sizeof(float) * F);
    uint16_t *dout = dev_nan(sizeof(uint16_t) * F);
    uint16_t *hg = xmalloc(sizeof(uint16_t) * F);
    for (int bf = 0; bf < 2; bf++) {
        check(bf ? kern_cuda_f32_to_bf16_row(dout, dx, F) : kern_cuda_f32_to_f16_row(dout, dx, F),
              "f32 to half");
        to_host(hg, dout, sizeof(uint16_t) * F);
        for (size_t i = 0; i < F; i++) {
            const uint16_t want = bf ? kern_f32_to_bf16(x[i]) : kern_f32_to_f16(x[i]);
            if (hg[i] != want)
                fail_msg("f32 %.9g to %s: got 0x%04x, CPU twin 0x%04x", (double)x[i],
                         bf ? "bf16" : "f16", hg[i], want);
        }
    }
    kern_cuda_free(dh);
    kern_cuda_free(df);
    kern_cuda_free(dx);
    kern_cuda_free(dout);
    free(h);
    free(got);
    free(x);
    free(hg);
}

/* ---- embeddings and argmax ---- */

static void case_embed(void)
{
    /* Bit-identical to kern_dequant_row on each token's row; tokens outside
     * the vocabulary give zeros. */
    static const int types[] = {KERN_TYPE_F32, KERN_TYPE_F16, KERN_TYPE_BF16, KERN_TYPE_Q8_0,
                                KERN_TYPE_Q4_0};
    static const int32_t tokens[] = {0, 49, 7, 7, -1, 50, 3};
    const int n_vocab = 50, dim = 256, nt = (int)(sizeof(tokens) / sizeof(tokens[0]));
    float *src = random_floats((size_t)n_vocab * dim, -2.0f, 2.0f);
    float *want = xmalloc(sizeof(float) * nt * dim), *got = xmalloc(sizeof(float) * nt * dim);
    int32_t *dtok = dev_from(tokens, sizeof(tokens));
    float *dout = dev_nan(sizeof(float) * nt * dim);
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        const int type = types[t];
        const size_t rb = kern_row_bytes(type, dim);
        uint8_t *table = xmalloc(rb * n_vocab);
        for (int v = 0; v < n_vocab; v++)
            assert_int_equal(kern_quant_row(type, src + (size_t)v * dim, table + rb * v, dim), 0);
        for (int i = 0; i < nt; i++) {
            float *w = want + (size_t)i * dim;
            if (tokens[i] < 0 || tokens[i] >= n_vocab)
                memset(w, 0, sizeof(float) * dim);
            else
                assert_int_equal(kern_dequant_row(type, table + rb * tokens[i], w, dim), 0);
        }
        void *dtable = dev_from(table, rb * n_vocab);
        check(kern_cuda_embed(type, dout, dtable, n_vocab, dtok, nt, dim), "embed");
        to_host(got, dout, sizeof(float) * nt * dim);
        if (memcmp(got, want, sizeof(float) * nt * dim) != 0)
            fail_msg("embed %s: differs from kern_dequant_row", kern_type_name(type));
        kern_cuda_free(dtable);
        free(table);
    }
    kern_cuda_free(dtok);
    kern_cuda_free(dout);
    free(src);
    free(want);
    free(got);
}

/* rt_argmax's rule: the first index of the maximum, NaN never greater. */
static int32_t argmax_ref(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

static void case_argmax(void)
{
    enum { ROWS = 6, N = 32017 };
    float *x = random_floats((size_t)ROWS * N, -20.0f, 20.0f);
    float *r1 = x + N, *r2 = x + 2 * N, *r3 = x + 3 * N, *r4 = x + 4 * N, *r5 = x + 5 * N;
    for (int i = 0; i < N; i++) {
        r1[i] = 1.0f;      /* all tied: index 0 */
        r3[i] = -INFINITY; /* all -inf: index 0 */
        if (i % 97 == 5)
            r4[i] = NAN; /* NaN ignored */
    }
    r2[5] = 100.0f;
    r2[N - 1] = 100.0f; /* tie: the earlier wins */
    r5[0] = NAN;        /* the one documented difference: NaN at 0 never wins */
    r5[1234] = 50.0f;
    int32_t want[ROWS], got[ROWS];
    for (int r = 0; r < ROWS; r++)
        want[r] = argmax_ref(x + (size_t)r * N, N);
    want[5] = 1234;
    float *dx = dev_from(x, sizeof(float) * ROWS * N);
    int32_t *dout = dev_nan(sizeof(got));
    check(kern_cuda_argmax_f32(dout, dx, ROWS, N), "argmax");
    to_host(got, dout, sizeof(got));
    for (int r = 0; r < ROWS; r++)
        if (got[r] != want[r])
            fail_msg("argmax row %d: got %d, want %d", r, got[r], want[r]);
    kern_cuda_free(dx);
    kern_cuda_free(dout);
    free(x);
}

/* ---- matrix products ---- */

/* scale[m * N + n] = sum_k |x[m, k] w[n, k]|: the size of the rounding errors. */
static float *abs_products(const float *x, int ldx, const float *w, int M, int N, int K)
{
    float *s = xmalloc(sizeof(float) * M * N);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double a = 0.0;
            for (int k = 0; k < K; k++)
                a += fabs((double)x[(size_t)m * ldx + k] * (double)w[(size_t)n * K + k]);
            s[(size_t)m * N + n] = (float)a;
        }
    return s;
}

/* Packs rows [M][ldy] to [M][N], checking the padding columns are still NaN. */
static void unpad(float *dst, const float *src, int M, int N, int ldy, const char *what)
{
    for (int m = 0; m < M; m++) {
        memcpy(dst + (size_t)m * N, src + (size_t)m * ldy, sizeof(float) * N);
        for (int n = N; n < ldy; n++)
            if (!is_nan_bits(src[(size_t)m * ldy + n]))
                fail_msg("%s: padding y[%d, %d] was written", what, m, n);
    }
}

static void case_matmul_f32(void)
{
    /* Tolerance: 1e-5 * sum_k |x w| (f32 accumulation in any order). */
    static const int shapes[][5] = {/* M, N, K, ldx, ldy */
                                    {1, 4096, 4096, 4096, 4096},
                                    {1, 1000, 333, 340, 1003},
                                    {7, 513, 257, 260, 520},
                                    {64, 1024, 2048, 2048, 1024},
                                    {33, 77, 1, 1, 80}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        const int ldx = shapes[s][3], ldy = shapes[s][4];
        float *x = random_floats((size_t)M * ldx, -1.0f, 1.0f);
        float *w = random_floats((size_t)N * K, -1.0f, 1.0f);
        float *want = xmalloc(sizeof(float) * M * N), *got = xmalloc(sizeof(float) * M * N);
        float *raw = xmalloc(sizeof(float) * M * ldy);
        kern_matmul_ref(want, N, x, ldx, w, M, N, K);
        float *scale = abs_products(x, ldx, w, M, N, K);
        float *dx = dev_from(x, sizeof(float) * M * ldx), *dw = dev_from(w, sizeof(float) * N * K);
        float *dy = dev_nan(sizeof(float) * M * ldy);
        check(kern_cuda_matmul_f32(dy, ldy, dx, ldx, dw, M, N, K), "matmul_f32");
        to_host(raw, dy, sizeof(float) * M * ldy);
        unpad(got, raw, M, N, ldy, "matmul_f32");
        expect_close("matmul_f32", got, want, scale, (size_t)M * N, 1e-5, 1e-30);
        kern_cuda_free(dx);
        kern_cuda_free(dw);
        kern_cuda_free(dy);
        free(x);
        free(w);
        free(want);
        free(got);
        free(raw);
        free(scale);
    }
}

static void case_matmul_q(void)
{
    /* The twin is kern_matmul_q (f32 x, half W, f32 accumulation).
     * M <= 8: 1e-5 * sum |x w|. M > 8 (x rounded to the half type for the
     * tensor cores): plus 2^-8 (BF16) or 2^-11 (F16) * sum |x w|.
     * Shapes cover the 16-byte path, K % 8 != 0 and an unaligned W (the
     * scalar path), and the cuBLAS path. */
    static const int shapes[][5] = {/* M, N, K, ldx, w offset in halves */
                                    {1, 4096, 4096, 4096, 0}, {3, 1000, 1024, 1028, 0},
                                    {8, 257, 520, 520, 0},    {1, 100, 203, 203, 0},
                                    {2, 300, 512, 512, 1},    {37, 512, 1024, 1024, 0},
                                    {64, 1024, 4096, 4096, 0}};
    static const int types[] = {KERN_TYPE_F16, KERN_TYPE_BF16};
    for (size_t t = 0; t < 2; t++)
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
            const int type = types[t];
            const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2], ldx = shapes[s][3];
            const int off = shapes[s][4], ldy = N;
            float *x = random_floats((size_t)M * ldx, -1.0f, 1.0f);
            float *wf = random_floats((size_t)N * K, -1.0f, 1.0f);
            uint16_t *w = xmalloc(sizeof(uint16_t) * N * K);
            for (int n = 0; n < N; n++) {
                assert_int_equal(kern_quant_row(type, wf + (size_t)n * K, w + (size_t)n * K, K), 0);
                assert_int_equal(kern_dequant_row(type, w + (size_t)n * K, wf + (size_t)n * K, K),
                                 0); /* wf = the exact weights, for the error scale */
            }
            float *want = xmalloc(sizeof(float) * M * N), *got = xmalloc(sizeof(float) * M * N);
            assert_int_equal(kern_matmul_q(NULL, type, want, ldy, x, ldx, w, M, N, K), 0);
            float *scale = abs_products(x, ldx, wf, M, N, K);
            float *dx = dev_from(x, sizeof(float) * M * ldx);
            uint16_t *dw = dev_alloc(sizeof(uint16_t) * ((size_t)N * K + (size_t)off));
            check(kern_cuda_h2d(dw + off, w, sizeof(uint16_t) * N * K, KERN_CUDA_COMPUTE), "h2d");
            float *dy = dev_nan(sizeof(float) * M * ldy);
            check(kern_cuda_matmul_q(type, dy, ldy, dx, ldx, dw + off, M, N, K), "matmul_q");
            to_host(got, dy, sizeof(float) * M * N);
            double rtol = 1e-5;
            if (M > 8)
                rtol += type == KERN_TYPE_BF16 ? 0x1.0p-8 : 0x1.0p-11;
            char what[96];
            snprintf(what, sizeof(what), "matmul_q %s M %d N %d K %d", kern_type_name(type), M, N,
                     K);
            expect_close(what, got, want, scale, (size_t)M * N, rtol, 1e-30);
            kern_cuda_free(dx);
            kern_cuda_free(dw);
            kern_cuda_free(dy);
            free(x);
            free(wf);
            free(w);
            free(want);
            free(got);
            free(scale);
        }
}

/* ---- attention ---- */

typedef struct {
    int n_heads, n_kv_heads, head_dim;
    int n_q, ctx_len;
    int block_size; /* 0: contiguous rows */
    int pad;        /* extra floats per KV row */
} attn_shape;

/* A KV pool holding ctx_len positions in shuffled blocks (or contiguous). */
typedef struct {
    float *k, *v;
    int32_t *blocks;
    int n_blocks, rows, kv_stride;
} kv_pool;

static kv_pool make_pool(const attn_shape *s, int extra_blocks)
{
    kv_pool p;
    p.kv_stride = s->n_kv_heads * s->head_dim + s->pad;
    const int bs = s->block_size ? s->block_size : 1;
    const int used = (s->ctx_len + bs - 1) / bs;
    p.n_blocks = s->block_size ? used + extra_blocks : 0;
    p.rows = s->block_size ? p.n_blocks * bs : s->ctx_len;
    p.k = random_floats((size_t)p.rows * p.kv_stride, -1.0f, 1.0f);
    p.v = random_floats((size_t)p.rows * p.kv_stride, -1.0f, 1.0f);
    p.blocks = NULL;
    if (s->block_size) {
        int32_t *perm = xmalloc(sizeof(int32_t) * p.n_blocks);
        for (int i = 0; i < p.n_blocks; i++)
            perm[i] = i;
        for (int i = p.n_blocks - 1; i > 0; i--) {
            const int j = (int)(xorshift64() % (uint64_t)(i + 1));
            const int32_t t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        p.blocks = perm; /* the first `used` entries are the table */
    }
    return p;
}

static void free_pool(kv_pool *p)
{
    free(p->k);
    free(p->v);
    free(p->blocks);
}

static void case_attention(void)
{
    /* Tolerance: 5e-5 absolute against kern_attention_ref (outputs are
     * averages of values in [-1, 1]); kern_attention_f32 is held to the same.
     * Single-tile launches with few blocks and long contexts take the
     * split-keys path (the workspace is 16 MiB). */
    static const attn_shape shapes[] = {
        {8, 2, 64, 300, 300, 16, 4},  /* prefill, GQA 4, 16-byte loads */
        {32, 8, 128, 1, 1000, 16, 0}, /* decode, Llama-3-8B heads */
        {4, 4, 80, 5, 77, 0, 1},      /* MHA, contiguous, odd stride: scalar loads */
        {16, 1, 256, 40, 129, 32, 0}, /* group 16, head_dim 256 */
        {2, 1, 32, 1, 1, 16, 0},      /* one key */
        {6, 2, 128, 70, 333, 16, 0},  /* chunked prefill: rows at 263..332 */
        {16, 1, 256, 1, 3000, 16, 0}, /* long decode: keys split 11 ways */
        {8, 2, 64, 3, 2049, 64, 0},   /* 3 rows, split keys, GQA 4 */
    };
    for (size_t c = 0; c < sizeof(shapes) / sizeof(shapes[0]); c++) {
        const attn_shape *s = &shapes[c];
        kv_pool p = make_pool(s, 3);
        const size_t qn = (size_t)s->n_q * s->n_heads * s->head_dim;
        float *q = random_floats(qn, -1.0f, 1.0f);
        float *want = xmalloc(sizeof(float) * qn), *cpu = xmalloc(sizeof(float) * qn);
        float *got = xmalloc(sizeof(float) * qn);
        kern_attn_args a = {q,           p.k,         p.v,        want,
                            s->n_q,      s->ctx_len,  s->n_heads, s->n_kv_heads,
                            s->head_dim, p.kv_stride, p.blocks,   s->block_size};
        kern_attention_ref(&a);
        a.out = cpu;
        kern_attention_f32(NULL, &a);
        const size_t kvb = sizeof(float) * (size_t)p.rows * p.kv_stride;
        kern_attn_args d = a;
        d.q = dev_from(q, sizeof(float) * qn);
        d.k = dev_from(p.k, kvb);
        d.v = dev_from(p.v, kvb);
        d.out = dev_nan(sizeof(float) * qn);
        d.blocks = p.blocks ? dev_from(p.blocks, sizeof(int32_t) * p.n_blocks) : NULL;
        check(kern_cuda_attention_f32(&d), "attention");
        to_host(got, d.out, sizeof(float) * qn);
        char what[128];
        snprintf(what, sizeof(what), "attention heads %d/%d dim %d rows %d ctx %d bs %d",
                 s->n_heads, s->n_kv_heads, s->head_dim, s->n_q, s->ctx_len, s->block_size);
        const double e = expect_close(what, got, want, NULL, qn, 0.0, 5e-5);
        expect_close("attention (CPU twin vs reference)", cpu, want, NULL, qn, 0.0, 5e-5);
        print_message("%s: max error %.3g\n", what, e);
        kern_cuda_free((void *)d.q);
        kern_cuda_free((void *)d.k);
        kern_cuda_free((void *)d.v);
        kern_cuda_free(d.out);
        kern_cuda_free((void *)d.blocks);
        free_pool(&p);
        free(q);
        free(want);
        free(cpu);
        free(got);
    }
}

/* One varlen launch over sequences (nq[s] rows, ctx[s] keys), compared with
 * kern_attention_ref run on each sequence. */
static void varlen_run(const char *what, const int *nq, const int *ctx, int ns)
{
    enum { HQ = 8, HKV = 2, HD = 128, BS = 16 };
    int32_t *q_start = xmalloc(sizeof(int32_t) * (size_t)(ns + 1));
    int32_t *ctx32 = xmalloc(sizeof(int32_t) * (size_t)ns);
    int max_q = 0, max_ctx = 0, stride = 0, total_blocks = 0;
    q_start[0] = 0;
    for (int s = 0; s < ns; s++) {
        q_start[s + 1] = q_start[s] + nq[s];
        ctx32[s] = ctx[s];
        max_q = nq[s] > max_q ? nq[s] : max_q;
        max_ctx = ctx[s] > max_ctx ? ctx[s] : max_ctx;
        const int nb = (ctx[s] + BS - 1) / BS;
        stride = nb > stride ? nb : stride;
        total_blocks += nb;
    }
    const int kvs = HKV * HD;
    const int rows = total_blocks * BS;
    float *k = random_floats((size_t)rows * kvs, -1.0f, 1.0f);
    float *v = random_floats((size_t)rows * kvs, -1.0f, 1.0f);
    /* Block ids: a shuffled pool dealt out to the sequences in turn. */
    int32_t *perm = xmalloc(sizeof(int32_t) * total_blocks);
    for (int i = 0; i < total_blocks; i++)
        perm[i] = i;
    for (int i = total_blocks - 1; i > 0; i--) {
        const int j = (int)(xorshift64() % (uint64_t)(i + 1));
        const int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    int32_t *table = xmalloc(sizeof(int32_t) * (size_t)ns * stride);
    for (int i = 0; i < ns * stride; i++)
        table[i] = -1; /* never read */
    for (int s = 0, next = 0; s < ns; s++)
        for (int b = 0; b < (ctx[s] + BS - 1) / BS; b++)
            table[s * stride + b] = perm[next++];
    const int total_q = q_start[ns];
    const size_t qn = (size_t)total_q * HQ * HD;
    float *q = random_floats(qn, -1.0f, 1.0f);
    float *want = xmalloc(sizeof(float) * qn), *got = xmalloc(sizeof(float) * qn);
    for (int s = 0; s < ns; s++) {
        const size_t off = (size_t)q_start[s] * HQ * HD;
        kern_attn_args a = {q + off, k,  v,   want + off,         nq[s], ctx[s], HQ,
                            HKV,     HD, kvs, table + s * stride, BS};
        kern_attention_ref(&a);
    }
    kern_cuda_attn_varlen b = {
        .q = dev_from(q, sizeof(float) * qn),
        .k = dev_from(k, sizeof(float) * rows * kvs),
        .v = dev_from(v, sizeof(float) * rows * kvs),
        .out = dev_nan(sizeof(float) * qn),
        .q_start = dev_from(q_start, sizeof(int32_t) * (size_t)(ns + 1)),
        .ctx_len = dev_from(ctx32, sizeof(int32_t) * (size_t)ns),
        .blocks = dev_from(table, sizeof(int32_t) * (size_t)ns * stride),
        .blocks_stride = stride,
        .block_size = BS,
        .n_seqs = ns,
        .max_q = max_q,
        .max_ctx = max_ctx,
        .n_heads = HQ,
        .n_kv_heads = HKV,
        .head_dim = HD,
        .kv_stride = kvs,
    };
    check(kern_cuda_attention_varlen_f32(&b), what);
    to_host(got, b.out, sizeof(float) * qn);
    const double e = expect_close(what, got, want, NULL, qn, 0.0, 5e-5);
    print_message("%s (%d sequences, %d rows): max error %.3g\n", what, ns, total_q, e);
    kern_cuda_free((void *)b.q);
    kern_cuda_free((void *)b.k);
    kern_cuda_free((void *)b.v);
    kern_cuda_free(b.out);
    kern_cuda_free((void *)b.q_start);
    kern_cuda_free((void *)b.ctx_len);
    kern_cuda_free((void *)b.blocks);
    free(q_start);
    free(ctx32);
    free(k);
    free(v);
    free(perm);
    free(table);
    free(q);
    free(want);
    free(got);
}

static void case_attention_varlen(void)
{
    /* Decode rows and prefill chunks in one launch (one tile per 4 rows), and
     * a decode-only batch over contexts of 1 to 3000 keys (split keys,
     * sequences shorter than the split length leave empty splits). */
    static const int mixed_q[] = {1, 17, 5, 1, 64, 3, 0};
    static const int mixed_ctx[] = {500, 17, 260, 1, 164, 3, 40};
    varlen_run("attention_varlen mixed", mixed_q, mixed_ctx, 7);
    static const int dec_q[] = {1, 1, 1, 1, 1};
    static const int dec_ctx[] = {3000, 1, 700, 2500, 31};
    varlen_run("attention_varlen decode", dec_q, dec_ctx, 5);
}

/* ---- errors, graphs, devices ---- */

static void *add_without_context(void *arg)
{
    int *rc = arg;
    rc[0] = kern_cuda_add_f32((float *)16, (const float *)16, 4);
    char err[256] = "";
    rc[1] = kern_cuda_sync(err, sizeof(err));
    rc[2] = strstr(err, "kern_cuda_init") != NULL;
    return NULL;
}

static void case_errors(void)
{
    char err[512] = "";
    /* An argument error is returned at once, kept, reported by sync, then cleared. */
    assert_int_equal(kern_cuda_rmsnorm_f32(NULL, NULL, NULL, 1, 8, 1e-5f), KERN_CUDA_E_ARG);
    assert_int_equal(kern_cuda_last_error(err, sizeof(err)), KERN_CUDA_E_ARG);
    assert_non_null(strstr(err, "rmsnorm"));
    assert_int_equal(kern_cuda_sync(err, sizeof(err)), KERN_CUDA_E_ARG);
    assert_int_equal(kern_cuda_sync(err, sizeof(err)), 0);

    float *d = dev_nan(sizeof(float) * 64);
    assert_int_equal(kern_cuda_matmul_q(12 /* Q4_K */, d, 4, d, 4, d, 1, 4, 4), KERN_CUDA_E_TYPE);
    kern_cuda_sync(err, sizeof(err));
    assert_non_null(strstr(err, "dequantize"));
    kern_attn_args a = {d, d, d, d, 1, 1, 4, 4, 300, 1200, NULL, 0};
    assert_int_equal(kern_cuda_attention_f32(&a), KERN_CUDA_E_ARG);
    kern_cuda_sync(err, sizeof(err));
    assert_non_null(strstr(err, "head_dim 300"));
    a.head_dim = 8;
    a.kv_stride = 32;
    a.n_kv_heads = 3;
    assert_int_equal(kern_cuda_attention_f32(&a), KERN_CUDA_E_ARG); /* 4 heads over 3 */
    assert_int_equal(kern_cuda_embed(KERN_TYPE_Q4_0, d, d, 4, (const int32_t *)d, 1, 33),
                     KERN_CUDA_E_ARG); /* dim not a multiple of 32 */
    assert_int_equal(kern_cuda_sync(err, sizeof(err)), KERN_CUDA_E_ARG);

    /* The workspace is never grown by an op. */
    assert_int_equal(kern_cuda_matmul_q(KERN_TYPE_BF16, d, 4, d, 1000000, d, 9, 4, 1000000),
                     KERN_CUDA_E_NOMEM);
    kern_cuda_sync(err, sizeof(err));
    assert_non_null(strstr(err, "kern_cuda_reserve_workspace"));

    /* No context on another thread. */
    int rc[3] = {0, 0, 0};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, add_without_context, rc), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(rc[0], KERN_CUDA_E_NOCTX);
    assert_int_equal(rc[1], KERN_CUDA_E_NOCTX);
    assert_true(rc[2]);

    /* A bad device is an error, and leaves this thread's context alone. */
    assert_int_equal(kern_cuda_device_count() > 0, 1);
    kern_cuda_device_info info;
    assert_int_equal(kern_cuda_device_query(9999, &info, err, sizeof(err)), KERN_CUDA_E_NODEV);
    assert_int_equal(kern_cuda_current_device(), 0);

    /* A sync that runs out of time says so instead of waiting on. */
    enum { DIM = 4096 };
    float *x = dev_alloc(sizeof(float) * DIM * DIM), *w = dev_alloc(sizeof(float) * DIM * DIM);
    float *y = dev_alloc(sizeof(float) * DIM * DIM);
    check(kern_cuda_memset(x, 0, sizeof(float) * DIM * DIM, KERN_CUDA_COMPUTE), "memset");
    check(kern_cuda_memset(w, 0, sizeof(float) * DIM * DIM, KERN_CUDA_COMPUTE), "memset");
    sync_ok("before the timeout");
    for (int i = 0; i < 100; i++)
        check(kern_cuda_matmul_f32(y, DIM, x, DIM, w, DIM, DIM, DIM), "matmul");
    kern_cuda_set_timeout_ms(1);
    assert_int_equal(kern_cuda_sync(err, sizeof(err)), KERN_CUDA_E_TIMEOUT);
    assert_non_null(strstr(err, "did not finish within 1 ms"));
    kern_cuda_set_timeout_ms(0);
    sync_ok("after the timeout");
    kern_cuda_free(x);
    kern_cuda_free(w);
    kern_cuda_free(y);
    kern_cuda_free(d);
}

static void case_graph(void)
{
    /* A captured rmsnorm -> matmul (cuBLAS) -> add replays to the CPU result,
     * also after the inputs change in place. */
    enum { T = 4, D = 256, N = 256 };
    float *x = random_floats(T * D, -1.0f, 1.0f), *g = random_floats(D, 0.5f, 1.5f);
    float *w = random_floats((size_t)N * D, -0.1f, 0.1f), *r = random_floats(T * N, -1.0f, 1.0f);
    float *dx = dev_from(x, sizeof(float) * T * D), *dg = dev_from(g, sizeof(float) * D);
    float *dw = dev_from(w, sizeof(float) * N * D), *dr = dev_alloc(sizeof(float) * T * N);
    float *dn = dev_alloc(sizeof(float) * T * D), *dp = dev_alloc(sizeof(float) * T * N);
    char err[512] = "";
    sync_ok("before capture");
    if (kern_cuda_graph_begin(err, sizeof(err)) != 0)
        fail_msg("graph_begin: %s", err);
    check(kern_cuda_rmsnorm_f32(dn, dx, dg, T, D, 1e-5f), "rmsnorm in capture");
    check(kern_cuda_matmul_f32(dp, N, dn, D, dw, T, N, D), "matmul in capture");
    check(kern_cuda_add_f32(dr, dp, (size_t)T * N), "add in capture");
    assert_int_equal(kern_cuda_sync(err, sizeof(err)), KERN_CUDA_E_STATE);
    kern_cuda_graph *graph = kern_cuda_graph_end(err, sizeof(err));
    if (!graph)
        fail_msg("graph_end: %s", err);
    float *nrm = xmalloc(sizeof(float) * T * D), *prj = xmalloc(sizeof(float) * T * N);
    float *want = xmalloc(sizeof(float) * T * N), *got = xmalloc(sizeof(float) * T * N);
    for (int round = 0; round < 2; round++) {
        if (round == 1)
            for (int i = 0; i < T * D; i++)
                x[i] = rnd(-2.0f, 2.0f);
        check(kern_cuda_h2d(dx, x, sizeof(float) * T * D, KERN_CUDA_COMPUTE), "h2d");
        check(kern_cuda_h2d(dr, r, sizeof(float) * T * N, KERN_CUDA_COMPUTE), "h2d");
        check(kern_cuda_graph_launch(graph), "graph launch");
        to_host(got, dr, sizeof(float) * T * N);
        kern_rmsnorm_f32(nrm, x, g, T, D, 1e-5f);
        kern_matmul_ref(prj, N, nrm, D, w, T, N, D);
        memcpy(want, r, sizeof(float) * T * N);
        kern_add_f32(want, prj, (size_t)T * N);
        expect_close("graph replay", got, want, NULL, (size_t)T * N, 1e-4, 1e-5);
    }
    kern_cuda_graph_destroy(graph);
    kern_cuda_free(dx);
    kern_cuda_free(dg);
    kern_cuda_free(dw);
    kern_cuda_free(dr);
    kern_cuda_free(dn);
    kern_cuda_free(dp);
    free(x);
    free(g);
    free(w);
    free(r);
    free(nrm);
    free(prj);
    free(want);
    free(got);
}

static void case_device_query(void)
{
    kern_cuda_device_info info;
    char err[256] = "";
    if (kern_cuda_device_query(0, &info, err, sizeof(err)) != 0)
        fail_msg("device_query: %s", err);
    assert_true(info.name[0] != '\0');
    assert_true(info.cc_major >= 7 && info.n_sm > 0 && info.total_mem > 0);
    print_message("device 0: %s, compute capability %d.%d, %d SMs, %.1f GiB (%.1f free)\n",
                  info.name, info.cc_major, info.cc_minor, info.n_sm,
                  (double)info.total_mem / (1 << 30), (double)info.free_mem / (1 << 30));
}

static void case_nccl_one_rank(void)
{
#ifdef SIEVE_HAVE_NCCL
    /* One rank: the all-reduce is the identity, through NCCL on the device. */
    const int dev[1] = {0};
    char err[256] = "";
    kern_comm *c = kern_comm_create_nccl(dev, 1, err, sizeof(err));
    if (!c)
        fail_msg("kern_comm_create_nccl: %s", err);
    assert_int_equal(kern_comm_get_kind(c), KERN_COMM_NCCL);
    float h[1000], back[1000];
    for (int i = 0; i < 1000; i++)
        h[i] = (float)i * 0.5f;
    float *d = dev_from(h, sizeof(h));
    if (kern_comm_allreduce_sum_f32(c, 0, d, 1000, err, sizeof(err)) != 0)
        fail_msg("allreduce: %s", err);
    to_host(back, d, sizeof(back));
    assert_memory_equal(back, h, sizeof(h));
    kern_cuda_free(d);
    kern_comm_destroy(c);
#else
    print_message("SKIP: built without NCCL\n");
    skip();
#endif
}

/* ---- compressed KV (issue 7) ---- */

/* Equal bytes, except that two f16 NaNs are equal whatever their payloads
 * (the CPU's conversion keeps the payload, the GPU's makes it canonical). */
static void expect_same_page(const char *what, const uint8_t *got, const uint8_t *want,
                             size_t bytes, kern_kvq_fmt fmt)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < bytes; i++) {
        if (got[i] == want[i])
            continue;
        if (fmt == KERN_KVQ_F16) {
            const size_t e = i & ~(size_t)1;
            uint16_t a, b;
            memcpy(&a, got + e, 2);
            memcpy(&b, want + e, 2);
            if ((a & 0x7fff) > 0x7c00 && (b & 0x7fff) > 0x7c00)
                continue;
        }
        if (bad++ == 0)
            first = i;
    }
    if (bad)
        fail_msg("%s: %zu of %zu bytes differ from the CPU's page; first at byte %zu: 0x%02x, "
                 "CPU 0x%02x",
                 what, bad, bytes, first, got[first], want[first]);
}

/* Source rows for packing: n positions from `first` in shuffled blocks of 8 rows
 * (row stride kvd + 3), values in [-2, 2], with a few non-finite and extreme
 * values and an all-zero head row. */
typedef struct {
    float *base;
    int32_t *blocks;
    int n_blocks;
    size_t rows;
    kern_kvq_src src; /* host pointers */
} kvq_source;

static kvq_source make_source(int kvd, int first, int n)
{
    kvq_source s;
    const int bs = 8;
    s.n_blocks = (n + bs - 1) / bs;
    s.rows = (size_t)s.n_blocks * bs;
    const size_t stride = (size_t)kvd + 3;
    s.base = random_floats(s.rows * stride, -2.0f, 2.0f);
    s.blocks = xmalloc(sizeof(int32_t) * (size_t)s.n_blocks);
    for (int i = 0; i < s.n_blocks; i++)
        s.blocks[i] = s.n_blocks - 1 - i;
    s.src = (kern_kvq_src){s.base, stride, s.blocks, bs, first, n};
    float *r1 = s.base + (size_t)s.blocks[0] * bs * stride + stride; /* position first + 1 */
    r1[3] = NAN;
    r1[5] = INFINITY;
    r1[kvd - 1] = -INFINITY;
    r1[kvd - 2] = 1e6f; /* beyond the f16 range */
    float *r2 = r1 + stride;
    for (int e = 0; e < 8; e++)
        r2[e] = 0.0f;
    return s;
}

static void case_kvq_pack_unpack(void)
{
    /* Tolerance: pages must equal the CPU's byte for byte (codes and f16 scales; F16
     * NaNs may differ in payload only). Unpacked values: exact for F32, F16, Q8 and Q4;
     * ZIP within 1e-6 * (|value| + 4): one fused multiply-add rounding against the CPU
     * scalar path's two (its AVX2 path fuses as the GPU does). */
    static const kern_kvq_geom geoms[] = {{2, 64, 16}, {3, 40, 5}, {1, 256, 32}, {4, 128, 64}};
    for (size_t gi = 0; gi < sizeof(geoms) / sizeof(geoms[0]); gi++) {
        const kern_kvq_geom g = geoms[gi];
        const int kvd = g.n_kv_heads * g.head_dim, first = 100, n_src = 3 * g.block_size + 7;
        kvq_source hs = make_source(kvd, first, n_src);
        const size_t src_bytes = sizeof(float) * hs.rows * hs.src.stride;
        kern_kvq_src dsrc = hs.src;
        dsrc.base = dev_from(hs.base, src_bytes);
        dsrc.blocks = dev_from(hs.blocks, sizeof(int32_t) * (size_t)hs.n_blocks);
        /* Slots [1, bs): positions first + 1 .. (the non-finite row first) for uniform
         * formats, per-head scattered positions for ZIP (as salient sets are). */
        const int slot0 = g.block_size > 1 ? 1 : 0, n = g.block_size - slot0;
        int32_t *idx = xmalloc(sizeof(int32_t) * (size_t)g.n_kv_heads * (size_t)n);
        for (int h = 0; h < g.n_kv_heads; h++)
            for (int i = 0; i < n; i++)
                idx[h * n + i] = first + (int)(xorshift64() % (uint64_t)n_src);
        int32_t *didx = dev_from(idx, sizeof(int32_t) * (size_t)g.n_kv_heads * (size_t)n);
        for (int fmt = 0; fmt < KERN_KVQ_N_FMT; fmt++) {
            const bool zip = kern_kvq_fmt_is_zip((kern_kvq_fmt)fmt);
            float *stats = NULL, *dstats = NULL;
            if (zip) {
                char err[256] = "";
                stats = xmalloc(sizeof(float) * KERN_KVQ_STATS_FLOATS(kvd));
                const kern_kvq_sel cls = {idx, n, 0, n};
                if (kern_kvq_zip_stats(stats, (kern_kvq_fmt)fmt, &g, &hs.src, &cls, &hs.src, first,
                                       n_src, err, sizeof(err)) != 0)
                    fail_msg("zip stats: %s", err);
                dstats = dev_from(stats, sizeof(float) * KERN_KVQ_STATS_FLOATS(kvd));
            }
            const kern_kvq_sel hsel =
                zip ? (kern_kvq_sel){idx, n, 0, n} : (kern_kvq_sel){NULL, 0, first + 1, n};
            kern_kvq_sel dsel = hsel;
            dsel.idx = zip ? didx : NULL;
            for (int kind = 0; kind < 2; kind++) {
                char what[128], err[256] = "";
                snprintf(what, sizeof(what), "kvq %s %s (kv heads %d, dim %d, block %d)",
                         kern_kvq_fmt_name((kern_kvq_fmt)fmt), kind ? "V" : "K", g.n_kv_heads,
                         g.head_dim, g.block_size);
                const size_t pb = kern_kvq_page_bytes((kern_kvq_fmt)fmt, (kern_kvq_kind)kind, &g);
                assert_true(pb > 0);
                uint8_t *want = xmalloc(pb), *got = xmalloc(pb);
                memset(want, 0xa5, pb);
                uint8_t *dpage = dev_from(want, pb);
                if (kern_kvq_pack(want, (kern_kvq_kind)kind, (kern_kvq_fmt)fmt, &g, slot0, &hs.src,
                                  &hsel, stats, err, sizeof(err)) != 0)
                    fail_msg("%s: CPU pack: %s", what, err);
                check(kern_cuda_kvq_pack(dpage, (kern_kvq_kind)kind, (kern_kvq_fmt)fmt, &g, slot0,
                                         &dsrc, &dsel, dstats),
                      what);
                to_host(got, dpage, pb);
                expect_same_page(what, got, want, pb, (kern_kvq_fmt)fmt);
                /* Unpack the CPU's page on both sides (row stride kvd + 5: padding
                 * stays NaN). */
                const size_t ds = (size_t)kvd + 5, dn = ds * (size_t)n;
                float *uw = xmalloc(sizeof(float) * dn), *ug = xmalloc(sizeof(float) * dn);
                memset(uw, 0xff, sizeof(float) * dn);
                if (kern_kvq_unpack(uw, ds, want, (kern_kvq_kind)kind, (kern_kvq_fmt)fmt, &g, slot0,
                                    n, stats, err, sizeof(err)) != 0)
                    fail_msg("%s: CPU unpack: %s", what, err);
                check(kern_cuda_h2d(dpage, want, pb, KERN_CUDA_COMPUTE), "h2d page");
                float *dout = dev_nan(sizeof(float) * dn);
                check(kern_cuda_kvq_unpack(dout, ds, dpage, (kern_kvq_kind)kind, (kern_kvq_fmt)fmt,
                                           &g, slot0, n, dstats),
                      what);
                to_host(ug, dout, sizeof(float) * dn);
                size_t exact = 0;
                for (size_t i = 0; i < dn; i++) {
                    const bool pad = i % ds >= (size_t)kvd;
                    if (pad) {
                        if (!is_nan_bits(ug[i]))
                            fail_msg("%s: unpack wrote padding element %zu", what, i);
                        ug[i] = uw[i] = 0.0f;
                        continue;
                    }
                    if (isnan(uw[i]) && isnan(ug[i]))
                        ug[i] = uw[i] = 0.0f; /* F32/F16 pages keep a NaN input */
                    else if (isinf(uw[i]) && ug[i] == uw[i])
                        ug[i] = uw[i] = 0.0f;
                    exact += memcmp(&ug[i], &uw[i], 4) == 0;
                }
                if (zip) {
                    float *scale = xmalloc(sizeof(float) * dn);
                    for (size_t i = 0; i < dn; i++)
                        scale[i] = fabsf(uw[i]) + 4.0f;
                    expect_close(what, ug, uw, scale, dn, 1e-6, 0.0);
                    free(scale);
                } else {
                    expect_close(what, ug, uw, NULL, dn, 0.0, 0.0);
                }
                print_message("%s: page bit-identical, %zu of %zu unpacked values exact\n", what,
                              exact, (size_t)kvd * n);
                kern_cuda_free(dout);
                kern_cuda_free(dpage);
                free(want);
                free(got);
                free(uw);
                free(ug);
            }
            kern_cuda_free(dstats);
            free(stats);
        }
        kern_cuda_free((void *)dsrc.base);
        kern_cuda_free((void *)dsrc.blocks);
        kern_cuda_free(didx);
        free(idx);
        free(hs.base);
        free(hs.blocks);
    }
}

/* Pages of a decode test: host descriptors for the CPU, device ones for the GPU,
 * and every allocation to free. */
typedef struct {
    kern_kvq_page h[128], d[128];
    int n;
    void *host_mem[512], *dev_mem[512];
    int n_host, n_dev;
} kvq_pages;

static void *keep_host(kvq_pages *ps, void *p)
{
    assert_true(ps->n_host < 512);
    return ps->host_mem[ps->n_host++] = p;
}

static void *keep_dev(kvq_pages *ps, void *p)
{
    assert_true(ps->n_dev < 512);
    return ps->dev_mem[ps->n_dev++] = p;
}

/* Appends a page of `fmt` with its own slot count bs (0: g's) holding sel's
 * positions of src, packed on the CPU (the GPU reads the same bytes). */
static void add_page(kvq_pages *ps, const kern_kvq_geom *g, int bs, kern_kvq_fmt fmt,
                     const kern_kvq_src *k, const kern_kvq_src *v, const kern_kvq_sel *sel,
                     int32_t pos0, const float *stats, const float *dstats)
{
    assert_true(ps->n < 128);
    kern_kvq_geom pg = *g;
    if (bs > 0)
        pg.block_size = bs;
    char err[256] = "";
    kern_kvq_page *h = &ps->h[ps->n], *d = &ps->d[ps->n];
    void *kv[2];
    for (int kind = 0; kind < 2; kind++) {
        const size_t pb = kern_kvq_page_bytes(fmt, (kern_kvq_kind)kind, &pg);
        kv[kind] = keep_host(ps, xmalloc(pb));
        memset(kv[kind], 0, pb);
        if (sel->n > 0 && kern_kvq_pack(kv[kind], (kern_kvq_kind)kind, fmt, &pg, 0, kind ? v : k,
                                        sel, stats, err, sizeof(err)) != 0)
            fail_msg("pack %s page: %s", kern_kvq_fmt_name(fmt), err);
        (kind ? &d->v : &d->k)[0] = keep_dev(ps, dev_from(kv[kind], pb));
    }
    *h = (kern_kvq_page){kv[0], kv[1], stats, pos0, sel->n, fmt, bs};
    d->stats = dstats;
    d->pos0 = pos0;
    d->n = sel->n;
    d->fmt = fmt;
    d->block_size = bs;
    ps->n++;
}

/* Ordered pages of `fmt` and bs slots over positions [lo, hi). */
static void add_ordered(kvq_pages *ps, const kern_kvq_geom *g, int bs, kern_kvq_fmt fmt,
                        const kern_kvq_src *k, const kern_kvq_src *v, int lo, int hi)
{
    const int pbs = bs > 0 ? bs : g->block_size;
    for (int p = lo; p < hi; p += pbs) {
        const kern_kvq_sel sel = {NULL, 0, p, hi - p < pbs ? hi - p : pbs};
        add_page(ps, g, bs, fmt, k, v, &sel, p, NULL, NULL);
    }
}

/* ZIP set pages (slots in a shuffled order) of `fmt` over the positions in pos[0..n),
 * with the class statistics computed from them. */
static void add_zip_class(kvq_pages *ps, const kern_kvq_geom *g, int bs, kern_kvq_fmt fmt,
                          const kern_kvq_src *k, const kern_kvq_src *v, const int32_t *pos, int n)
{
    const int kvd = g->n_kv_heads * g->head_dim;
    float *stats = keep_host(ps, xmalloc(sizeof(float) * KERN_KVQ_STATS_FLOATS(kvd)));
    int32_t *idx = keep_host(ps, xmalloc(sizeof(int32_t) * (size_t)n));
    memcpy(idx, pos, sizeof(int32_t) * (size_t)n);
    for (int i = n - 1; i > 0; i--) {
        const int j = (int)(xorshift64() % (uint64_t)(i + 1));
        const int32_t t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
    }
    const kern_kvq_sel cls = {idx, 0, 0, n};
    char err[256] = "";
    if (kern_kvq_zip_stats(stats, fmt, g, k, &cls, v, 0, v->len, err, sizeof(err)) != 0)
        fail_msg("zip stats: %s", err);
    float *dstats = keep_dev(ps, dev_from(stats, sizeof(float) * KERN_KVQ_STATS_FLOATS(kvd)));
    const int pbs = bs > 0 ? bs : g->block_size;
    for (int i = 0; i < n; i += pbs) {
        const kern_kvq_sel sel = {idx + i, 0, 0, n - i < pbs ? n - i : pbs};
        add_page(ps, g, bs, fmt, k, v, &sel, KERN_KVQ_UNORDERED, stats, dstats);
    }
}

static void free_pages(kvq_pages *ps)
{
    for (int i = 0; i < ps->n_host; i++)
        free(ps->host_mem[i]);
    for (int i = 0; i < ps->n_dev; i++)
        kern_cuda_free(ps->dev_mem[i]);
}

/* One sequence of the decode test: rows, pages, outputs on both sides. */
typedef struct {
    kvq_pages pages;
    float *k, *v, *q;
    int32_t q_pos[8];
    bool has_pos;
    int n_q, ctx;
    kern_kvq_seq h, d;
    float *out_h, *lse_h;
} kvq_test_seq;

static void seq_init(kvq_test_seq *s, const kern_kvq_geom *g, int n_heads, int n_q, int ctx)
{
    memset(s, 0, sizeof(*s));
    const int kvd = g->n_kv_heads * g->head_dim;
    s->n_q = n_q;
    s->ctx = ctx;
    s->k = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    s->v = random_floats((size_t)ctx * kvd, -1.0f, 1.0f);
    s->q = random_floats((size_t)n_q * n_heads * g->head_dim, -1.0f, 1.0f);
}

static void seq_finish(kvq_test_seq *s, const kern_kvq_geom *g, int n_heads)
{
    const size_t qn = (size_t)s->n_q * n_heads * g->head_dim;
    s->out_h = xmalloc(sizeof(float) * qn);
    s->lse_h = xmalloc(sizeof(float) * (size_t)s->n_q * n_heads);
    s->h = (kern_kvq_seq){s->q,       s->out_h,   s->lse_h, s->has_pos ? s->q_pos : NULL,
                          s->pages.h, s->pages.n, s->n_q,   s->ctx};
    s->d = s->h;
    s->d.q = keep_dev(&s->pages, dev_from(s->q, sizeof(float) * qn));
    s->d.out = keep_dev(&s->pages, dev_nan(sizeof(float) * qn));
    s->d.lse = keep_dev(&s->pages, dev_nan(sizeof(float) * (size_t)s->n_q * n_heads));
    s->d.q_pos =
        s->has_pos ? keep_dev(&s->pages, dev_from(s->q_pos, sizeof(int32_t) * s->n_q)) : NULL;
    s->d.pages = keep_dev(&s->pages, dev_from(s->pages.d, sizeof(kern_kvq_page) * s->pages.n));
}

/* Runs the CPU twin and the GPU op on seqs[list[0..n)] and compares out and lse. */
static void kvq_decode_compare(const char *what, const kern_kvq_geom *g, int n_heads,
                               kvq_test_seq *seqs, const int *list, int n)
{
    kern_kvq_seq hs[8], ds[8];
    for (int i = 0; i < n; i++) {
        hs[i] = seqs[list[i]].h;
        ds[i] = seqs[list[i]].d;
    }
    char err[256] = "";
    const kern_kvq_attn_args ha = {*g, n_heads, hs, n};
    if (kern_attention_decode_quant(NULL, &ha, err, sizeof(err)) != 0)
        fail_msg("%s: CPU twin: %s", what, err);
    const kern_kvq_attn_args da = {*g, n_heads, ds, n};
    check(kern_cuda_attention_decode_quant(&da), what);
    double worst = 0.0;
    for (int i = 0; i < n; i++) {
        const kvq_test_seq *s = &seqs[list[i]];
        const size_t qn = (size_t)s->n_q * n_heads * g->head_dim, ln = (size_t)s->n_q * n_heads;
        float *got = xmalloc(sizeof(float) * qn), *lse = xmalloc(sizeof(float) * ln);
        float *want_lse = xmalloc(sizeof(float) * ln);
        to_host(got, s->d.out, sizeof(float) * qn);
        to_host(lse, s->d.lse, sizeof(float) * ln);
        memcpy(want_lse, s->lse_h, sizeof(float) * ln);
        for (size_t r = 0; r < ln; r++)
            if (isinf(want_lse[r]) && want_lse[r] < 0) {
                if (!(isinf(lse[r]) && lse[r] < 0))
                    fail_msg("%s: lse %zu is %g, CPU twin -inf (a row that sees no key)", what, r,
                             (double)lse[r]);
                lse[r] = want_lse[r] = 0.0f;
            }
        char w[320];
        snprintf(w, sizeof(w), "%s, sequence %d out", what, list[i]);
        const double e = expect_close(w, got, s->out_h, NULL, qn, 0.0, 5e-5);
        worst = e > worst ? e : worst;
        snprintf(w, sizeof(w), "%s, sequence %d lse", what, list[i]);
        expect_close(w, lse, want_lse, NULL, ln, 1e-5, 5e-5);
        /* The next call must write everything again. */
        check(kern_cuda_memset(s->d.out, 0xff, sizeof(float) * qn, KERN_CUDA_COMPUTE), "memset");
        check(kern_cuda_memset(s->d.lse, 0xff, sizeof(float) * ln, KERN_CUDA_COMPUTE), "memset");
        free(got);
        free(lse);
        free(want_lse);
    }
    print_message("%s: max output error %.3g\n", what, worst);
}

/* One geometry of the decode test: three sequences over pages of every format. */
static void kvq_decode_geometry(const kern_kvq_geom g, const int n_heads)
{
    const int kvd = g.n_kv_heads * g.head_dim;
    kvq_test_seq seqs[3];
    /* 0: decode at 700: ZIP4 salient set pages (32 slots) and ZIP2 regular ones over
     * [0, 640), then ordered Q4, F16, Q8 pages, an empty page, an F32 tail of 12. */
    kvq_test_seq *s = &seqs[0];
    seq_init(s, &g, n_heads, 1, 700);
    kern_kvq_src k = {s->k, (size_t)kvd, NULL, 0, 0, 700}, v = k;
    v.base = s->v;
    int32_t sal[640], reg[640];
    int ns = 0, nr = 0;
    for (int p = 0; p < 640; p++) {
        if (p % 5 == 0)
            sal[ns++] = p;
        else
            reg[nr++] = p;
    }
    add_zip_class(&s->pages, &g, 32, KERN_KVQ_ZIP4, &k, &v, sal, ns);
    add_zip_class(&s->pages, &g, 0, KERN_KVQ_ZIP2, &k, &v, reg, nr);
    add_ordered(&s->pages, &g, 0, KERN_KVQ_Q4, &k, &v, 640, 656);
    add_ordered(&s->pages, &g, 8, KERN_KVQ_F16, &k, &v, 656, 672);
    add_ordered(&s->pages, &g, 0, KERN_KVQ_Q8, &k, &v, 672, 688);
    const kern_kvq_sel none = {NULL, 0, 0, 0};
    add_page(&s->pages, &g, 0, KERN_KVQ_Q8, &k, &v, &none, 0, NULL, NULL);
    add_ordered(&s->pages, &g, 0, KERN_KVQ_F32, &k, &v, 688, 700);
    seq_finish(s, &g, n_heads);
    /* 1: five rows at 295..299 over Q8 pages [0, 288) and an F32 tail. */
    s = &seqs[1];
    seq_init(s, &g, n_heads, 5, 300);
    k = (kern_kvq_src){s->k, (size_t)kvd, NULL, 0, 0, 300};
    v = k;
    v.base = s->v;
    add_ordered(&s->pages, &g, 0, KERN_KVQ_Q8, &k, &v, 0, 288);
    add_ordered(&s->pages, &g, 0, KERN_KVQ_F32, &k, &v, 288, 300);
    seq_finish(s, &g, n_heads);
    /* 2: rows at positions 3 (sees nothing) and 50 over ordered pages from 10. */
    s = &seqs[2];
    seq_init(s, &g, n_heads, 2, 64);
    s->has_pos = true;
    s->q_pos[0] = 3;
    s->q_pos[1] = 50;
    k = (kern_kvq_src){s->k, (size_t)kvd, NULL, 0, 0, 64};
    v = k;
    v.base = s->v;
    add_ordered(&s->pages, &g, 0, KERN_KVQ_Q8, &k, &v, 10, 42);
    add_ordered(&s->pages, &g, 0, KERN_KVQ_F16, &k, &v, 42, 64);
    seq_finish(s, &g, n_heads);

    /* Sequences 0 and 2 fit one row tile: their pages are split (the workspace is
     * 16 MiB); with sequence 1 (5 rows) the launch has two row tiles when the group is 4. */
    static const int split[] = {0, 2}, all[] = {0, 1, 2}, one[] = {1};
    char what[160];
    snprintf(what, sizeof(what), "decode_quant heads %d/%d dim %d block %d", n_heads, g.n_kv_heads,
             g.head_dim, g.block_size);
    char w[200];
    snprintf(w, sizeof(w), "%s, sequences 0 and 2", what);
    kvq_decode_compare(w, &g, n_heads, seqs, split, 2);
    snprintf(w, sizeof(w), "%s, sequences 0, 1 and 2", what);
    kvq_decode_compare(w, &g, n_heads, seqs, all, 3);
    snprintf(w, sizeof(w), "%s, sequence 1", what);
    kvq_decode_compare(w, &g, n_heads, seqs, one, 1);
    for (int i = 0; i < 3; i++) {
        free_pages(&seqs[i].pages);
        free(seqs[i].k);
        free(seqs[i].v);
        free(seqs[i].q);
        free(seqs[i].out_h);
        free(seqs[i].lse_h);
    }
}

static void case_kvq_decode(void)
{
    /* Tolerance: out 5e-5 absolute (averages of values of magnitude <= ~1), lse 5e-5 +
     * 1e-5 relative, against the CPU twin kern_attention_decode_quant on the same pages;
     * a row that sees no key must be zeros with lse -inf on both. Geometries: GQA 4 at
     * head_dim 64; one kv head of 40 (a partial quantization group) with group 3. */
    kvq_decode_geometry((kern_kvq_geom){2, 64, 16}, 8);
    kvq_decode_geometry((kern_kvq_geom){1, 40, 8}, 3);
}

/* ---- sparse attention (issue 6) ---- */

static void case_block_sparse(void)
{
    /* Tolerance: 5e-5 absolute against the CPU twin kern_attention_block_sparse_f32 on
     * the same mask (both accumulate in f32; the CPU uses its own exp). */
    static const struct {
        attn_shape s;
        int B, n_lists; /* n_lists 0: PowerAttention's mask (one list) */
        int percent;    /* chance of each off-diagonal causal block */
    } cases[] = {
        {{8, 2, 64, 300, 300, 16, 0}, 32, 8, 30},     /* per-head lists, GQA 4 */
        {{4, 4, 128, 200, 513, 16, 4}, 64, 0, 0},     /* chunked prefill, power mask, padded */
        {{16, 1, 256, 40, 129, 32, 0}, 16, 1, 50},    /* group 16, head_dim 256 */
        {{8, 2, 64, 1, 1000, 16, 0}, 64, 2, 20},      /* decode row, one list per kv head */
        {{6, 2, 80, 97, 97, 0, 1}, 8, 6, 40},         /* contiguous, odd stride: scalar loads */
        {{32, 8, 128, 256, 2048, 16, 0}, 128, 8, 10}, /* Llama-3-8B heads, 10% */
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const attn_shape *s = &cases[c].s;
        const int n_lists = cases[c].n_lists ? cases[c].n_lists : 1;
        kv_pool p = make_pool(s, 3);
        const size_t qn = (size_t)s->n_q * s->n_heads * s->head_dim;
        float *q = random_floats(qn, -1.0f, 1.0f);
        float *want = xmalloc(sizeof(float) * qn), *got = xmalloc(sizeof(float) * qn);
        const size_t words = kern_block_mask_words(cases[c].B, n_lists, s->ctx_len, s->n_q);
        uint64_t *bits = xmalloc(sizeof(uint64_t) * words);
        kern_block_mask m;
        assert_int_equal(
            kern_block_mask_init(&m, bits, words, cases[c].B, n_lists, s->ctx_len, s->n_q),
            KERN_SPARSE_OK);
        if (cases[c].n_lists == 0) {
            const kern_power_params pp = {cases[c].B, 2};
            assert_int_equal(kern_power_mask(&pp, &m), KERN_SPARSE_OK);
        } else {
            for (int l = 0; l < n_lists; l++)
                for (int r = m.q_block0; r < m.q_block0 + m.n_qblocks; r++) {
                    kern_block_mask_set(&m, l, r, r);
                    for (int cb = 0; cb < r; cb++)
                        if ((int)(xorshift64() % 100) < cases[c].percent)
                            kern_block_mask_set(&m, l, r, cb);
                }
        }
        kern_attn_args a = {q,           p.k,         p.v,        want,
                            s->n_q,      s->ctx_len,  s->n_heads, s->n_kv_heads,
                            s->head_dim, p.kv_stride, p.blocks,   s->block_size};
        assert_int_equal(kern_attention_block_sparse_f32(NULL, &a, &m), KERN_SPARSE_OK);
        const size_t kvb = sizeof(float) * (size_t)p.rows * p.kv_stride;
        kern_attn_args d = a;
        d.q = dev_from(q, sizeof(float) * qn);
        d.k = dev_from(p.k, kvb);
        d.v = dev_from(p.v, kvb);
        d.out = dev_nan(sizeof(float) * qn);
        d.blocks = p.blocks ? dev_from(p.blocks, sizeof(int32_t) * p.n_blocks) : NULL;
        kern_block_mask dm = m;
        dm.bits = dev_from(bits, sizeof(uint64_t) * words);
        check(kern_cuda_attention_block_sparse_f32(&d, &dm), "attention_block_sparse");
        to_host(got, d.out, sizeof(float) * qn);
        kern_sparse_stats st;
        kern_block_mask_stats(&m, s->n_heads, &st);
        char what[160];
        snprintf(what, sizeof(what),
                 "block_sparse heads %d/%d dim %d rows %d ctx %d page %d B %d lists %d "
                 "density %.2f",
                 s->n_heads, s->n_kv_heads, s->head_dim, s->n_q, s->ctx_len, s->block_size,
                 cases[c].B, n_lists, kern_sparse_density(&st));
        const double e = expect_close(what, got, want, NULL, qn, 0.0, 5e-5);
        print_message("%s: max error %.3g\n", what, e);
        /* A mask of another shape is refused before anything runs. */
        kern_block_mask bad = dm;
        bad.n_q = s->n_q + 1;
        assert_int_equal(kern_cuda_attention_block_sparse_f32(&d, &bad), KERN_CUDA_E_ARG);
        char err[256] = "";
        assert_int_equal(kern_cuda_sync(err, sizeof(err)), KERN_CUDA_E_ARG);
        kern_cuda_free((void *)d.q);
        kern_cuda_free((void *)d.k);
        kern_cuda_free((void *)d.v);
        kern_cuda_free(d.out);
        kern_cuda_free((void *)d.blocks);
        kern_cuda_free(dm.bits);
        free_pool(&p);
        free(q);
        free(want);
        free(got);
        free(bits);
    }
}

static void case_flex_estimate(void)
{
    /* FlexPrefill's estimate: block means bit for bit (the CPU's sums in its
     * order); probe profiles within 1e-6 absolute (each sums to 1; another
     * order of f32 sums and expf against the CPU's exp). */
    static const struct {
        attn_shape s;
        int B;
    } cases[] = {
        {{8, 2, 64, 300, 300, 16, 0}, 32},     /* whole prompt, paged, GQA 4 */
        {{4, 4, 128, 200, 513, 16, 4}, 64},    /* chunk after cached positions, padded rows */
        {{16, 1, 256, 40, 129, 32, 0}, 16},    /* head_dim 256, group 16 */
        {{6, 2, 80, 97, 97, 0, 1}, 8},         /* contiguous rows, odd stride */
        {{32, 8, 128, 512, 2100, 16, 0}, 128}, /* Llama-3-8B heads, B 128, 17 key tiles */
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const attn_shape *s = &cases[c].s;
        const int B = cases[c].B;
        kv_pool p = make_pool(s, 3);
        const size_t qn = (size_t)s->n_q * s->n_heads * s->head_dim;
        float *q = random_floats(qn, -1.0f, 1.0f);
        kern_attn_args a = {q,           p.k,         p.v,        NULL,
                            s->n_q,      s->ctx_len,  s->n_heads, s->n_kv_heads,
                            s->head_dim, p.kv_stride, p.blocks,   s->block_size};
        const kern_flex_estimate_len L = kern_flex_estimate_lengths(&a, B);
        const size_t n[5] = {L.vertical, L.slash, L.kbar, L.qbar, L.qtil};
        static const char *names[5] = {"vertical", "slash", "kbar", "qbar", "qtil"};
        float *want[5], *dev[5];
        for (int i = 0; i < 5; i++) {
            want[i] = xmalloc(sizeof(float) * n[i]);
            dev[i] = dev_nan(sizeof(float) * n[i]);
        }
        float *scratch =
            xmalloc(sizeof(float) * kern_probe_scratch_floats(s->n_heads, s->head_dim, B));
        const kern_flex_estimate host = {want[0], want[1], want[2], want[3], want[4]};
        a.out = q; /* unused, but the CPU op checks it */
        assert_int_equal(kern_flex_estimate_f32(NULL, &a, B, &host, scratch), KERN_SPARSE_OK);
        const size_t kvb = sizeof(float) * (size_t)p.rows * p.kv_stride;
        kern_attn_args d = a;
        d.q = dev_from(q, sizeof(float) * qn);
        d.k = dev_from(p.k, kvb);
        d.v = d.k;
        d.out = NULL;
        d.blocks = p.blocks ? dev_from(p.blocks, sizeof(int32_t) * p.n_blocks) : NULL;
        char err[256] = "";
        const size_t ws = kern_cuda_flex_estimate_workspace(&d, B);
        assert_true(ws > 0);
        assert_int_equal(kern_cuda_reserve_workspace(ws, err, sizeof(err)), 0);
        const kern_flex_estimate de = {dev[0], dev[1], dev[2], dev[3], dev[4]};
        check(kern_cuda_flex_estimate_f32(&d, B, &de), "flex_estimate");
        for (int i = 0; i < 5; i++) {
            float *got = xmalloc(sizeof(float) * n[i]);
            to_host(got, dev[i], sizeof(float) * n[i]);
            char what[160];
            snprintf(what, sizeof(what), "flex_estimate %s heads %d/%d dim %d rows %d ctx %d B %d",
                     names[i], s->n_heads, s->n_kv_heads, s->head_dim, s->n_q, s->ctx_len, B);
            const double e = expect_close(what, got, want[i], NULL, n[i], 0.0, i < 2 ? 1e-6 : 0.0);
            if (i < 2)
                print_message("%s: max error %.3g\n", what, e);
            free(got);
            kern_cuda_free(dev[i]);
            free(want[i]);
        }
        /* Too few query rows for the probe: refused before anything runs. */
        d.n_q = B - 1;
        assert_int_equal(kern_cuda_flex_estimate_f32(&d, B, &de), KERN_CUDA_E_ARG);
        assert_int_equal(kern_cuda_sync(err, sizeof(err)), KERN_CUDA_E_ARG);
        kern_cuda_free((void *)d.q);
        kern_cuda_free((void *)d.k);
        kern_cuda_free((void *)d.blocks);
        free_pool(&p);
        free(scratch);
        free(q);
    }
}

#define CUDA_CASE(fn) fn
#else
#define CUDA_CASE(fn) NULL
#endif /* SIEVE_HAVE_CUDA */

/* ---- runner ---- */

typedef struct {
    const char *name;
    void (*body)(void);
} twin_case;

static const twin_case cases[] = {
    {"test_cuda_device_query_names_the_device", CUDA_CASE(case_device_query)},
    {"test_cuda_rmsnorm_matches_cpu", CUDA_CASE(case_rmsnorm)},
    {"test_cuda_swiglu_matches_cpu", CUDA_CASE(case_swiglu)},
    {"test_cuda_add_matches_cpu_exactly", CUDA_CASE(case_add)},
    {"test_cuda_rope_and_rope_neox_match_cpu", CUDA_CASE(case_rope)},
    {"test_cuda_rope_table_matches_cpu", CUDA_CASE(case_rope_table)},
    {"test_cuda_add_rows_matches_cpu_exactly", CUDA_CASE(case_add_rows)},
    {"test_cuda_kv_store_matches_row_copies", CUDA_CASE(case_kv_store)},
    {"test_cuda_conversions_match_cpu_bit_for_bit", CUDA_CASE(case_conversions)},
    {"test_cuda_embed_matches_dequant_row", CUDA_CASE(case_embed)},
    {"test_cuda_argmax_matches_cpu", CUDA_CASE(case_argmax)},
    {"test_cuda_matmul_f32_matches_reference", CUDA_CASE(case_matmul_f32)},
    {"test_cuda_matmul_q_half_weights_match_cpu", CUDA_CASE(case_matmul_q)},
    {"test_cuda_attention_matches_cpu", CUDA_CASE(case_attention)},
    {"test_cuda_attention_varlen_matches_each_sequence", CUDA_CASE(case_attention_varlen)},
    {"test_cuda_kvq_pack_matches_cpu_pages_bit_for_bit", CUDA_CASE(case_kvq_pack_unpack)},
    {"test_cuda_attention_decode_quant_matches_cpu", CUDA_CASE(case_kvq_decode)},
    {"test_cuda_attention_block_sparse_matches_cpu", CUDA_CASE(case_block_sparse)},
    {"test_cuda_flex_estimate_matches_cpu", CUDA_CASE(case_flex_estimate)},
    {"test_cuda_errors_are_reported_never_fatal", CUDA_CASE(case_errors)},
    {"test_cuda_graph_replays_captured_ops", CUDA_CASE(case_graph)},
    {"test_nccl_one_rank_allreduce_is_identity", CUDA_CASE(case_nccl_one_rank)},
};
#define N_CASES (sizeof(cases) / sizeof(cases[0]))

static void run_case(void **state)
{
    const twin_case *c = *state;
    if (!have_device || !c->body) {
        print_message("SKIP: no CUDA device\n");
        skip();
    }
    c->body();
}

static int group_setup(void **state)
{
    (void)state;
#ifdef SIEVE_HAVE_CUDA
    have_device = kern_cuda_device_count() > 0;
    if (!have_device)
        return 0;
    char err[512] = "";
    if (kern_cuda_init(0, err, sizeof(err)) != 0 ||
        kern_cuda_reserve_workspace(16u << 20, err, sizeof(err)) != 0) {
        fprintf(stderr, "CUDA device 0 is present but unusable: %s\n", err);
        return -1;
    }
#endif
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
#ifdef SIEVE_HAVE_CUDA
    kern_cuda_close();
#endif
    return 0;
}

int main(void)
{
    struct CMUnitTest tests[N_CASES];
    for (size_t i = 0; i < N_CASES; i++)
        tests[i] = (struct CMUnitTest){cases[i].name, run_case, NULL, NULL, (void *)&cases[i]};
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
