/*
 * test_quant.c - unit tests for the quantized weight formats (kernels/quant.h):
 * block codecs against the gguf Python package, round-trip error bounds per
 * type, the fused products against their dequantize-then-f32 reference and
 * against the plain f32 product, the scalar fallback against the SIMD path,
 * and rejection of bad arguments.
 *
 * Known answers: the blocks below are bytes from a fixed xorshift stream with
 * their f16 scale fields set to fixed values; their dequantization was computed
 * once with `gguf.quants.dequantize` (gguf 0.19, numpy) and is embedded as a
 * position-weighted sum, a sum of squares and spot values. The byte hashes of
 * Q8_0/Q4_0/BF16/F16 quantization were computed with `gguf.quants.quantize`
 * (numpy's float16 for F16) on the input built by quant_kat_input(). The
 * script mirrors xorshift64() and kat_bytes() below:
 *     x ^= x << 13; x ^= x >> 7; x ^= x << 17 (mod 2^64); byte = (x >> 32) & 255
 *     block bytes: seed 1000 + ggml type id, 2 blocks, scale fields 0x2E66 + i
 *     (dmin fields 0x2A00 + i) for block i; FNV-1a 64 over the quantized bytes.
 *
 * Inputs come from a fixed-seed xorshift, so every run sees the same numbers.
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
#include "kernels/quant.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

#define GUARD 1234.5f

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

static double unif(void)
{
    return (double)(xorshift64() >> 11) * 0x1.0p-53;
}

/* Approximately N(0, 1) (Irwin-Hall of 4 uniforms, rescaled): cheap under valgrind. */
static float gauss(void)
{
    return (float)((unif() + unif() + unif() + unif() - 2.0) * 1.7320508075688772);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static float *gauss_floats(size_t n, float scale)
{
    float *p = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = scale * gauss();
    return p;
}

static uint64_t fnv1a(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static const int WEIGHT_TYPES[] = {KERN_TYPE_F16,  KERN_TYPE_BF16, KERN_TYPE_Q8_0, KERN_TYPE_Q4_0,
                                   KERN_TYPE_Q4_K, KERN_TYPE_Q5_K, KERN_TYPE_Q6_K};
#define N_WEIGHT_TYPES (sizeof(WEIGHT_TYPES) / sizeof(WEIGHT_TYPES[0]))

/* Type activations are quantized to inside kern_matmul_q (F32: none). */
static int act_type(int type)
{
    switch (type) {
    case KERN_TYPE_Q8_0:
    case KERN_TYPE_Q4_0:
        return KERN_TYPE_Q8_0;
    case KERN_TYPE_Q4_K:
    case KERN_TYPE_Q5_K:
    case KERN_TYPE_Q6_K:
        return KERN_TYPE_Q8_K;
    default:
        return KERN_TYPE_F32;
    }
}

/* ---- pools ---- */

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
    kern_quant_scratch_free();
    return 0;
}

/* Restores the detected instruction set after a test that forced one. */
static int restore_isa(void **state)
{
    (void)state;
    kern_quant_set_isa(kern_quant_isa_detected());
    return 0;
}

/* ---- types ---- */

static void test_quant_type_sizes_match_ggml(void **state)
{
    (void)state;
    static const struct {
        int type;
        const char *name;
        size_t bs, bytes;
    } want[] = {
        {KERN_TYPE_F32, "F32", 1, 4},       {KERN_TYPE_F16, "F16", 1, 2},
        {KERN_TYPE_BF16, "BF16", 1, 2},     {KERN_TYPE_Q8_0, "Q8_0", 32, 34},
        {KERN_TYPE_Q4_0, "Q4_0", 32, 18},   {KERN_TYPE_Q4_K, "Q4_K", 256, 144},
        {KERN_TYPE_Q5_K, "Q5_K", 256, 176}, {KERN_TYPE_Q6_K, "Q6_K", 256, 210},
        {KERN_TYPE_Q8_K, "Q8_K", 256, 292},
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        assert_string_equal(kern_type_name(want[i].type), want[i].name);
        assert_int_equal(kern_type_block_size(want[i].type), want[i].bs);
        assert_int_equal(kern_type_block_bytes(want[i].type), want[i].bytes);
        assert_int_equal(kern_row_bytes(want[i].type, 768), 768 / want[i].bs * want[i].bytes);
    }
    assert_int_equal(kern_row_bytes(KERN_TYPE_Q8_0, 48), 0);  /* not a multiple of 32 */
    assert_int_equal(kern_row_bytes(KERN_TYPE_Q4_K, 288), 0); /* not a multiple of 256 */
    assert_int_equal(kern_row_bytes(KERN_TYPE_Q4_K, 0), 0);
    assert_int_equal(kern_row_bytes(KERN_TYPE_F16, -2), 0);
    assert_string_equal(kern_type_name(3), "unknown"); /* Q4_1: not supported */
    assert_int_equal(kern_type_block_size(3), 0);
    assert_int_equal(kern_type_block_bytes(99), 0);
    for (size_t i = 0; i < N_WEIGHT_TYPES; i++)
        assert_true(kern_type_is_weight(WEIGHT_TYPES[i]));
    assert_true(kern_type_is_weight(KERN_TYPE_F32));
    assert_false(kern_type_is_weight(KERN_TYPE_Q8_K));
    assert_false(kern_type_is_weight(3));
    assert_string_equal(kern_quant_strerror(KERN_QE_ARG), "invalid size, stride or pointer");
}

/* ---- f16 / bf16 ---- */

static void test_quant_f32_to_f16_rounds_to_nearest_even(void **state)
{
    (void)state;
    /* Every half survives a trip through f32 (NaNs stay NaN). */
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = kern_f16_to_f32((uint16_t)h);
        const uint16_t back = kern_f32_to_f16(f);
        if (isnan(f))
            assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0);
        else if (back != h)
            fail_msg("half 0x%04x -> %g -> 0x%04x", h, (double)f, back);
    }
    /* Ties go to even; overflow goes to infinity; underflow to zero or subnormals. */
    assert_int_equal(kern_f32_to_f16(1.0f + 0x1.0p-11f), 0x3c00);     /* tie, even below */
    assert_int_equal(kern_f32_to_f16(1.0f + 3 * 0x1.0p-11f), 0x3c02); /* tie, even above */
    assert_int_equal(kern_f32_to_f16(1.0f + 0x1.0p-11f + 0x1.0p-20f), 0x3c01);
    assert_int_equal(kern_f32_to_f16(65520.0f), 0x7c00); /* rounds to inf */
    assert_int_equal(kern_f32_to_f16(65519.0f), 0x7bff);
    assert_int_equal(kern_f32_to_f16(-INFINITY), 0xfc00);
    assert_int_equal(kern_f32_to_f16(0x1.0p-25f), 0x0000); /* tie to even 0 */
    assert_int_equal(kern_f32_to_f16(0x1.8p-25f), 0x0001);
    assert_int_equal(kern_f32_to_f16(-0.0f), 0x8000);
#if defined(__F16C__)
    /* Against the hardware conversion on random bit patterns. */
    rng_seed(11);
    for (int i = 0; i < 50000; i++) {
        const uint32_t u = (uint32_t)(xorshift64() >> 32);
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f))
            continue;
        const uint16_t hw = (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
        if (kern_f32_to_f16(f) != hw)
            fail_msg("f32 0x%08x: 0x%04x, hardware 0x%04x", u, kern_f32_to_f16(f), hw);
    }
#endif
}

static void test_quant_f32_to_bf16_rounds_to_nearest_even(void **state)
{
    (void)state;
    assert_int_equal(kern_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(kern_f32_to_bf16(1.0f + 0x1.0p-8f), 0x3f80); /* tie, even below */
    assert_int_equal(kern_f32_to_bf16(1.0f + 3 * 0x1.0p-8f), 0x3f82);
    assert_int_equal(kern_f32_to_bf16(-2.0f), 0xc000);
    assert_true((kern_f32_to_bf16(NAN) & 0x7fc0) == 0x7fc0); /* stays a quiet NaN */
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = kern_bf16_to_f32((uint16_t)h);
        if (!isnan(f))
            assert_int_equal(kern_f32_to_bf16(f), h);
    }
}

/* ---- known answers ---- */

static const uint8_t *kat_bytes(int type, size_t block_bytes, uint8_t *buf)
{
    rng_seed(1000 + (uint64_t)type);
    for (size_t i = 0; i < 2 * block_bytes; i++)
        buf[i] = (uint8_t)(xorshift64() >> 32);
    for (int i = 0; i < 2; i++) {
        uint8_t *b = buf + (size_t)i * block_bytes;
        const uint16_t d = (uint16_t)(0x2E66 + i), dmin = (uint16_t)(0x2A00 + i);
        if (type == KERN_TYPE_Q6_K) {
            memcpy(b + 208, &d, 2);
        } else {
            memcpy(b, &d, 2);
            if (type == KERN_TYPE_Q4_K || type == KERN_TYPE_Q5_K)
                memcpy(b + 2, &dmin, 2);
        }
    }
    return buf;
}

typedef struct {
    int type;
    int n;
    double wsum, sqsum;
    int idx[18];
    float val[18];
    int n_spots;
} kat_case;

static const kat_case KAT[] = {
    {KERN_TYPE_Q8_0,
     64,
     -2183.927490234375,
     3793.0821128822863,
     {0, 1, 15, 16, 31, 32, 33, 47, 48, 63},
     {-5.89855957f, 1.49963379f, 9.49768066f, -0.699829102f, -10.1975098f, 5.7020874f, 7.1026001f,
      3.60131836f, -5.10186768f, 1.30047607f},
     10},
    {KERN_TYPE_Q4_0,
     64,
     -32.20556640625,
     12.581622317433357,
     {0, 1, 15, 16, 31, 32, 33, 47, 48, 63},
     {-0.599853516f, 0.49987793f, 0.0f, -0.599853516f, 0.599853516f, -0.200073242f, 0.500183105f,
      0.0f, -0.500183105f, -0.200073242f},
     10},
    {KERN_TYPE_Q4_K,
     512,
     2996221.0050048828,
     507846.09863138571,
     {0, 1, 15, 16, 31, 32, 33, 47, 48, 63, 64, 100, 127, 128, 200, 255, 333, 511},
     {7.64794922f, 24.4438477f, 26.543335f, 5.54846191f, 20.244873f, 24.3903809f, 18.6917725f,
      14.8927002f, 9.1940918f, 14.8927002f, 19.5541992f, 9.21020508f, 42.1021729f, 7.38500977f,
      72.1226807f, 18.2387695f, -1.8762207f, 17.190094f},
     18},
    {KERN_TYPE_Q5_K,
     512,
     5048201.2051391602,
     1866423.5846147425,
     {0, 1, 15, 16, 31, 32, 33, 47, 48, 63, 64, 100, 127, 128, 200, 255, 333, 511},
     {93.2702637f, 104.367554f, 15.5892334f, 74.7747803f, 26.6865234f, 7.8416748f, 40.1337891f,
      36.7346191f, 26.5371094f, 43.532959f, 59.4851074f, 116.758301f, 38.5773926f, 2.78613281f,
      28.4926758f, 69.8763428f, 5.83282471f, 81.2915649f},
     18},
    {KERN_TYPE_Q6_K,
     512,
     102314.23474121094,
     10909222.223351534,
     {0, 1, 15, 16, 31, 32, 33, 47, 48, 63, 64, 100, 127, 128, 200, 255, 333, 511},
     {143.964844f, 172.757812f, 179.956055f, -72.5822754f, 254.037964f, -76.78125f, 23.9941406f,
      9.59765625f, -84.6793213f, -217.746826f, -4.9987793f, 23.0943604f, 118.970947f, -345.515625f,
      -13.7966309f, -111.572754f, -160.858887f, 286.104736f},
     18},
};

static void test_quant_dequant_matches_gguf_reference(void **state)
{
    (void)state;
    for (size_t c = 0; c < sizeof(KAT) / sizeof(KAT[0]); c++) {
        const kat_case *k = &KAT[c];
        uint8_t buf[2 * 292];
        float out[512];
        const size_t bytes = kern_type_block_bytes(k->type);
        assert_int_equal(
            kern_dequant_row(k->type, kat_bytes(k->type, bytes, buf), out, (size_t)k->n), 0);
        double ws = 0.0, sq = 0.0;
        for (int i = 0; i < k->n; i++) {
            ws += (double)out[i] * (i + 1);
            sq += (double)out[i] * out[i];
        }
        /* numpy computes in f32 like we do; allow for a different operation order. */
        if (fabs(ws - k->wsum) > 1e-6 * (fabs(k->wsum) + k->n * sqrt(k->sqsum)) ||
            fabs(sq - k->sqsum) > 1e-6 * k->sqsum)
            fail_msg("%s: weighted sum %.9g (want %.9g), sum of squares %.9g (want %.9g)",
                     kern_type_name(k->type), ws, k->wsum, sq, k->sqsum);
        for (int s = 0; s < k->n_spots; s++) {
            const float got = out[k->idx[s]], want = k->val[s];
            if (fabsf(got - want) > 1e-6f * fmaxf(1.0f, fabsf(want)))
                fail_msg("%s: element %d is %.9g, want %.9g", kern_type_name(k->type), k->idx[s],
                         (double)got, (double)want);
        }
    }
}

/* 256 values (the first block scaled up) and crafted ties: d = 1 exactly. */
static void quant_kat_input(float *x, int q4)
{
    rng_seed(77);
    for (int i = 0; i < 256; i++)
        x[i] = (float)(unif() * 2.0 - 1.0) * (i < 32 ? 100.0f : 1.0f);
    x[256] = q4 ? -8.0f : 127.0f;
    for (int j = 1; j < 32; j++)
        x[256 + j] = q4 ? (float)(j % 16) - 8.0f + 0.5f : (float)(j - 16) + 0.5f;
}

static void test_quant_quantize_matches_gguf_bytes(void **state)
{
    (void)state;
    float x[288];
    uint8_t q[288 * 4];
    const kern_isa isas[] = {KERN_ISA_SCALAR, kern_quant_isa_detected()};
    for (int i = 0; i < 2; i++) {
        kern_quant_set_isa(isas[i]);
        quant_kat_input(x, 0);
        assert_int_equal(kern_quant_row(KERN_TYPE_Q8_0, x, q, 288), 0);
        assert_true(fnv1a(q, 9 * 34) == 0x2620fa9f47e2eacdull);
        assert_int_equal(kern_quant_row(KERN_TYPE_BF16, x, q, 288), 0);
        assert_true(fnv1a(q, 288 * 2) == 0x57ad8665c0f4cb62ull);
        assert_int_equal(kern_quant_row(KERN_TYPE_F16, x, q, 288), 0);
        assert_true(fnv1a(q, 288 * 2) == 0xe360e44d51bad2b4ull);
        quant_kat_input(x, 1);
        assert_int_equal(kern_quant_row(KERN_TYPE_Q4_0, x, q, 288), 0);
        assert_true(fnv1a(q, 9 * 18) == 0x44ee1dbc019119a0ull);
    }
}

/* ---- round trips ---- */

/* Round-trip error bounds, per element against the block's largest magnitude
 * amax (sub-block of 32 for Q8_0/Q4_0, super-block of 256 for the K-quants):
 *   Q8_0  |e| <= 0.57 amax / 127 (half a step, plus the f16 rounding of d:
 *         up to 127 * 2^-12 of a step; measured 0.544)
 *   Q4_0  |e| <= 1.01 amax / 8   (the code opposite the extreme clamps from 8 to 7)
 *   Q8_K  |e| <= 0.501 amax / 127
 *   Q4_K  |e| <= 0.10 amax, Q5_K 0.05 amax, Q6_K 0.04 amax (half a step of a
 *         sub-block spanning [-amax, amax] is 0.067, 0.032, 0.016 amax; the 6-
 *         or 8-bit scale codes add the rest; measured 0.066, 0.032, 0.025)
 *   F16   |e| <= 2^-11 |x|, BF16 |e| <= 2^-8 |x|
 * plus an absolute 1e-5 for the block types (and 2^-25 for F16): near zero
 * the f16 scales lose precision and underflow (a block of values ~1e-6, tested
 * here, decodes to zeros, as it does in ggml). Relative RMS error over N(0, 1)
 * data, limits ~1.5x the measured Q8_0 0.0052, Q4_0 0.082, Q8_K 0.0063,
 * Q4_K 0.077, Q5_K 0.037, Q6_K 0.0185 (F16, BF16: the per-element bound). */
typedef struct {
    int type;
    double max_rel_amax; /* per-element bound as a fraction of the block's amax */
    double rms;          /* relative RMS bound */
    double abs;          /* absolute slack near zero */
} rt_bound;

static void check_roundtrip(rt_bound b, kern_isa isa)
{
    const size_t n = 256 * 32;
    float *x = gauss_floats(n, 1.0f), *y = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < 256; i++) /* a block of zeros and one of tiny values */
        x[i] = 0.0f;
    for (size_t i = 256; i < 512; i++)
        x[i] *= 1e-6f;
    uint8_t *q = xmalloc(kern_row_bytes(b.type, (int64_t)n));
    kern_quant_set_isa(isa);
    assert_int_equal(kern_quant_row(b.type, x, q, n), 0);
    assert_int_equal(kern_dequant_row(b.type, q, y, n), 0);
    const size_t bs = kern_type_block_size(b.type) == 1 ? 1 : kern_type_block_size(b.type);
    double se = 0.0, sx = 0.0;
    for (size_t i0 = 0; i0 < n; i0 += bs) {
        float amax = 0.0f;
        for (size_t i = i0; i < i0 + bs; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        for (size_t i = i0; i < i0 + bs; i++) {
            const double e = fabs((double)y[i] - x[i]);
            se += e * e;
            sx += (double)x[i] * x[i];
            if (!(e <= b.max_rel_amax * amax + b.abs))
                fail_msg("%s: element %zu: %g decoded as %g (error %g > %g * amax %g)",
                         kern_type_name(b.type), i, (double)x[i], (double)y[i], e, b.max_rel_amax,
                         (double)amax);
        }
    }
    const double rms = sqrt(se / sx);
    if (!(rms <= b.rms))
        fail_msg("%s: relative RMS error %g > %g", kern_type_name(b.type), rms, b.rms);
    free(x);
    free(y);
    free(q);
}

static void test_quant_roundtrip_error_within_type_bound(void **state)
{
    (void)state;
    const rt_bound bounds[] = {
        {KERN_TYPE_Q8_0, 0.57 / 127, 0.008, 1e-5},
        {KERN_TYPE_Q4_0, 1.01 / 8, 0.13, 1e-5},
        {KERN_TYPE_Q8_K, 0.501 / 127, 0.0105, 1e-5},
        {KERN_TYPE_Q4_K, 0.10, 0.12, 1e-5},
        {KERN_TYPE_Q5_K, 0.05, 0.057, 1e-5},
        {KERN_TYPE_Q6_K, 0.04, 0.029, 1e-5},
        {KERN_TYPE_F16, 0x1.0p-11, 0x1.0p-11, 0x1.0p-25},
        {KERN_TYPE_BF16, 0x1.0p-8, 0x1.0p-8, 0},
    };
    rng_seed(5);
    for (size_t i = 0; i < sizeof(bounds) / sizeof(bounds[0]); i++) {
        check_roundtrip(bounds[i], KERN_ISA_SCALAR);
        check_roundtrip(bounds[i], kern_quant_isa_detected());
    }
}

/* The SIMD activation quantizers must write the scalar ones' bytes exactly
 * (ties included), so the two products differ only in summation order. */
static void test_quant_activation_quantizers_simd_equal_scalar(void **state)
{
    (void)state;
    const size_t n = 256 * 8;
    float *x = gauss_floats(n, 3.0f);
    for (size_t i = 0; i < 256; i++) /* block 0: exact ties at d = 1 */
        x[i] = (float)((int)(i % 64) - 32) + 0.5f;
    x[0] = 127.0f;
    for (size_t i = 256; i < 512; i++) /* block 1: zeros */
        x[i] = 0.0f;
    const int types[] = {KERN_TYPE_Q8_0, KERN_TYPE_Q8_K};
    for (int t = 0; t < 2; t++) {
        const size_t bytes = kern_row_bytes(types[t], (int64_t)n);
        uint8_t *a = xmalloc(bytes), *b = xmalloc(bytes);
        kern_quant_set_isa(KERN_ISA_SCALAR);
        assert_int_equal(kern_quant_row(types[t], x, a, n), 0);
        kern_quant_set_isa(kern_quant_isa_detected());
        assert_int_equal(kern_quant_row(types[t], x, b, n), 0);
        assert_memory_equal(a, b, bytes);
        free(a);
        free(b);
    }
    free(x);
}

/* ---- products ---- */

/* The dequantize-then-f32 reference: W decoded, x passed through the same
 * activation quantization and decoded, kern_matmul_ref in double. Also
 * returns the per-element scale sum_k |x'_k w'_k| used by the tolerances. */
static void reference_product(int type, const float *x, int ldx, const void *w, int M, int N, int K,
                              float *ref, int ldy, double *abs_sum)
{
    float *wf = xmalloc((size_t)N * K * sizeof(float));
    float *xf = xmalloc((size_t)M * K * sizeof(float));
    const size_t row = kern_row_bytes(type, K);
    for (int n = 0; n < N; n++)
        assert_int_equal(kern_dequant_row(type, (const uint8_t *)w + (size_t)n * row,
                                          wf + (size_t)n * K, (size_t)K),
                         0);
    const int at = act_type(type);
    uint8_t *xq = xmalloc(kern_row_bytes(KERN_TYPE_Q8_K, K) + kern_row_bytes(KERN_TYPE_F32, K));
    for (int m = 0; m < M; m++) {
        assert_int_equal(kern_quant_row(at, x + (size_t)m * ldx, xq, (size_t)K), 0);
        assert_int_equal(kern_dequant_row(at, xq, xf + (size_t)m * K, (size_t)K), 0);
    }
    kern_matmul_ref(ref, ldy, xf, K, wf, M, N, K);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++)
                s += fabs((double)xf[(size_t)m * K + k] * wf[(size_t)n * K + k]);
            abs_sum[(size_t)m * N + n] = s;
        }
    free(wf);
    free(xf);
    free(xq);
}

/* Tolerances of one product, per element as a fraction of sum_k |x'_k w'_k|:
 *   against the reference (same quantized inputs, double accumulation): 1e-5.
 *     The kernels sum exact integer block dot products scaled in f32 over
 *     K / block_size blocks (F16/BF16: K f32 products), so rounding stays
 *     around sqrt(terms) * 2^-24 (~2e-6 at K = 768); a dropped or doubled block
 *     moves the result by ~block_size / K of the scale (>= 1e-3 here).
 *   scalar fallback against SIMD: 1e-5 (summation order only).
 * Against the pure f32 product, relative RMS error over all outputs (weights
 * and activations both quantized; ~1.5x the largest measured over the shapes
 * below, which have few outputs: F16 2.2e-4, BF16 2.0e-3, Q8_0 0.0081, Q6_K
 * 0.020, Q5_K 0.044, Q4_K 0.086, Q4_0 0.129): F16 5e-4, BF16 3e-3, Q8_0 0.015,
 * Q6_K 0.035, Q5_K 0.065, Q4_K 0.14, Q4_0 0.2. */
static double f32_tolerance(int type)
{
    switch (type) {
    case KERN_TYPE_F16:
        return 5e-4;
    case KERN_TYPE_BF16:
        return 3e-3;
    case KERN_TYPE_Q8_0:
        return 0.015;
    case KERN_TYPE_Q6_K:
        return 0.035;
    case KERN_TYPE_Q5_K:
        return 0.065;
    case KERN_TYPE_Q4_K:
        return 0.14;
    default: /* Q4_0 */
        return 0.2;
    }
}

typedef struct {
    int M, N, K, ldx, ldy;
} mm_shape;

static void check_product(int type, kern_pool *pool, mm_shape s)
{
    const int M = s.M, N = s.N, K = s.K, ldx = s.ldx, ldy = s.ldy;
    float *x = gauss_floats((size_t)M * ldx, 1.0f);
    float *wf = gauss_floats((size_t)N * K, 0.02f);
    for (int n = 0; n < N; n++) /* rows of different scales */
        for (int k = 0; k < K; k++)
            wf[(size_t)n * K + k] *= 1.0f + (float)(n % 7);
    const size_t row = kern_row_bytes(type, K);
    uint8_t *w = xmalloc(row * N);
    for (int n = 0; n < N; n++)
        assert_int_equal(kern_quant_row(type, wf + (size_t)n * K, w + (size_t)n * row, (size_t)K),
                         0);
    const size_t ny = (size_t)M * ldy + 8;
    float *y = xmalloc(ny * sizeof(float)), *ys = xmalloc(ny * sizeof(float));
    float *ref = xmalloc(ny * sizeof(float)), *y32 = xmalloc(ny * sizeof(float));
    double *abs_sum = xmalloc((size_t)M * N * sizeof(double));
    for (size_t i = 0; i < ny; i++)
        y[i] = ys[i] = GUARD;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            y[(size_t)m * ldy + n] = ys[(size_t)m * ldy + n] = NAN;
    reference_product(type, x, ldx, w, M, N, K, ref, ldy, abs_sum);
    kern_matmul_ref(y32, ldy, x, ldx, wf, M, N, K);
    if (M >= 64) {
        /* A prefill-sized product dequantizes the weights and multiplies in
         * f32 (no activation quantization): its reference is the f64 product
         * with the dequantized weights. */
        float *wd = xmalloc(sizeof(float) * (size_t)N * K);
        for (int n = 0; n < N; n++)
            assert_int_equal(
                kern_dequant_row(type, w + (size_t)n * row, wd + (size_t)n * K, (size_t)K), 0);
        kern_matmul_ref(ref, ldy, x, ldx, wd, M, N, K);
        free(wd);
    }

    kern_quant_set_isa(kern_quant_isa_detected());
    assert_int_equal(kern_matmul_q(pool, type, y, ldy, x, ldx, w, M, N, K), 0);
    kern_quant_set_isa(KERN_ISA_SCALAR);
    assert_int_equal(kern_matmul_q(pool, type, ys, ldy, x, ldx, w, M, N, K), 0);
    kern_quant_set_isa(kern_quant_isa_detected());

    double se = 0.0, s32 = 0.0;
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            const size_t i = (size_t)m * ldy + n;
            const double scale = abs_sum[(size_t)m * N + n];
            if (!(fabs((double)y[i] - ref[i]) <= 1e-5 * scale))
                fail_msg("%s M=%d N=%d K=%d: y[%d,%d] = %.9g, reference %.9g (scale %g)",
                         kern_type_name(type), M, N, K, m, n, (double)y[i], (double)ref[i], scale);
            if (!(fabs((double)ys[i] - y[i]) <= 1e-5 * scale))
                fail_msg("%s M=%d N=%d K=%d: scalar y[%d,%d] = %.9g, SIMD %.9g (scale %g)",
                         kern_type_name(type), M, N, K, m, n, (double)ys[i], (double)y[i], scale);
            se += ((double)y[i] - y32[i]) * ((double)y[i] - y32[i]);
            s32 += (double)y32[i] * y32[i];
        }
        for (int n = N; n < ldy && m < M - 1; n++) /* padding between rows */
            assert_true(y[(size_t)m * ldy + n] == GUARD && ys[(size_t)m * ldy + n] == GUARD);
    }
    for (size_t i = (size_t)(M - 1) * ldy + N; i < ny; i++)
        assert_true(y[i] == GUARD && ys[i] == GUARD);
    const double rel = sqrt(se / s32);
    if (!(rel <= f32_tolerance(type)))
        fail_msg("%s M=%d N=%d K=%d: relative RMS error against f32 %g > %g", kern_type_name(type),
                 M, N, K, rel, f32_tolerance(type));
    free(x);
    free(wf);
    free(w);
    free(y);
    free(ys);
    free(ref);
    free(y32);
    free(abs_sum);
}

/* Shapes: N never a multiple of the pool's row split; K a multiple of 256 for
 * the K-quants (else of 32; F16/BF16 get an odd K); M = 1 (above and below the
 * threading threshold), 3 and 17 (tiles of 4 with remainders) and 70 (the
 * dequantize-then-sgemm path), with row strides larger than the rows. */
static void check_product_shapes(int type)
{
    const int kq = kern_type_block_size(type) == KERN_QK_K;
    const int odd = kern_type_block_size(type) == 1 ? 3 : 0;
    const int K1 = 512, K2 = kq ? 768 : 320;
    const mm_shape shapes[] = {
        {1, 301, K1 + odd, K1 + odd, 301},    /* matvec, split over the pool */
        {1, 37, K2 + odd, K2 + odd, 37},      /* matvec below the threshold */
        {3, 67, K2 + odd, K2 + odd + 5, 70},  /* one partial tile */
        {17, 45, K1 + odd, K1 + odd + 1, 47}, /* four tiles and one row */
        {70, 45, K2 + odd, K2 + odd + 3, 46}, /* prefill: dequantized tiles, sgemm */
    };
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        check_product(type, pool4, shapes[i]);
    check_product(type, NULL, shapes[2]);
}

static void test_quant_matmul_f16(void **state)
{
    (void)state;
    rng_seed(21);
    check_product_shapes(KERN_TYPE_F16);
}

static void test_quant_matmul_bf16(void **state)
{
    (void)state;
    rng_seed(22);
    check_product_shapes(KERN_TYPE_BF16);
}

static void test_quant_matmul_q8_0(void **state)
{
    (void)state;
    rng_seed(23);
    check_product_shapes(KERN_TYPE_Q8_0);
    /* More weight rows than one dequantized tile (2048 rows of K = 512). */
    check_product(KERN_TYPE_Q8_0, pool4, (mm_shape){70, 2100, 512, 512, 2101});
}

static void test_quant_matmul_q4_0(void **state)
{
    (void)state;
    rng_seed(24);
    check_product_shapes(KERN_TYPE_Q4_0);
}

static void test_quant_matmul_q4_K(void **state)
{
    (void)state;
    rng_seed(25);
    check_product_shapes(KERN_TYPE_Q4_K);
}

static void test_quant_matmul_q5_K(void **state)
{
    (void)state;
    rng_seed(26);
    check_product_shapes(KERN_TYPE_Q5_K);
}

static void test_quant_matmul_q6_K(void **state)
{
    (void)state;
    rng_seed(27);
    check_product_shapes(KERN_TYPE_Q6_K);
}

/* Arbitrary block bytes (every code, Q8_0 weights of -128, 6-bit scales of 63,
 * Q6_K scales of -128) with finite scale fields: the products still match the
 * reference, so no kernel relies on what our quantizers happen to produce. */
static void test_quant_matmul_on_arbitrary_block_bytes_matches_reference(void **state)
{
    (void)state;
    rng_seed(31);
    const int M = 5, N = 19, K = 512;
    for (size_t t = 2; t < N_WEIGHT_TYPES; t++) { /* the block types */
        const int type = WEIGHT_TYPES[t];
        const size_t row = kern_row_bytes(type, K), bb = kern_type_block_bytes(type);
        uint8_t *w = xmalloc(row * N);
        for (size_t i = 0; i < row * N; i++)
            w[i] = (uint8_t)(xorshift64() >> 40);
        for (size_t b = 0; b < row * N / bb; b++) { /* finite scales in [2^-10, 2^-6) */
            uint8_t *p = w + b * bb;
            const uint16_t d = (uint16_t)(0x1400 + (xorshift64() >> 54)), dm = 0x1800;
            if (type == KERN_TYPE_Q6_K) {
                memcpy(p + 208, &d, 2);
            } else {
                memcpy(p, &d, 2);
                if (type == KERN_TYPE_Q4_K || type == KERN_TYPE_Q5_K)
                    memcpy(p + 2, &dm, 2);
            }
        }
        float *x = gauss_floats((size_t)M * K, 1.0f);
        float *y = xmalloc((size_t)M * N * sizeof(float)), *ys = xmalloc((size_t)M * N * 4);
        float *ref = xmalloc((size_t)M * N * sizeof(float));
        double *abs_sum = xmalloc((size_t)M * N * sizeof(double));
        reference_product(type, x, K, w, M, N, K, ref, N, abs_sum);
        assert_int_equal(kern_matmul_q(pool4, type, y, N, x, K, w, M, N, K), 0);
        kern_quant_set_isa(KERN_ISA_SCALAR);
        assert_int_equal(kern_matmul_q(pool4, type, ys, N, x, K, w, M, N, K), 0);
        kern_quant_set_isa(kern_quant_isa_detected());
        for (int i = 0; i < M * N; i++) {
            if (!(fabs((double)y[i] - ref[i]) <= 1e-5 * abs_sum[i]))
                fail_msg("%s: y[%d] = %.9g, reference %.9g", kern_type_name(type), i, (double)y[i],
                         (double)ref[i]);
            if (!(fabs((double)ys[i] - ref[i]) <= 1e-5 * abs_sum[i]))
                fail_msg("%s: scalar y[%d] = %.9g, reference %.9g", kern_type_name(type), i,
                         (double)ys[i], (double)ref[i]);
        }
        free(w);
        free(x);
        free(y);
        free(ys);
        free(ref);
        free(abs_sum);
    }
}

/* kern_matmul_q_ref (the op's own scalar reference) agrees with the composed
 * one above to double rounding. */
static void test_quant_matmul_q_ref_matches_composed_reference(void **state)
{
    (void)state;
    rng_seed(41);
    const int M = 2, N = 5, K = 512;
    for (size_t t = 0; t < N_WEIGHT_TYPES; t++) {
        const int type = WEIGHT_TYPES[t];
        const size_t row = kern_row_bytes(type, K);
        float *x = gauss_floats((size_t)M * K, 1.0f), *wf = gauss_floats((size_t)N * K, 0.1f);
        uint8_t *w = xmalloc(row * N);
        assert_int_equal(kern_quant_row(type, wf, w, (size_t)N * K), 0);
        float a[10], b[10];
        double abs_sum[10];
        assert_int_equal(kern_matmul_q_ref(type, a, N, x, K, w, M, N, K), 0);
        reference_product(type, x, K, w, M, N, K, b, N, abs_sum);
        for (int i = 0; i < M * N; i++)
            assert_true(fabs((double)a[i] - b[i]) <= 1e-6 * abs_sum[i]);
        free(x);
        free(wf);
        free(w);
    }
}

static void test_quant_bad_arguments_rejected(void **state)
{
    (void)state;
    float x[1024] = {0}, y[64];
    uint16_t w[1024] = {0};
    for (int i = 0; i < 64; i++)
        y[i] = GUARD;
    /* K not a multiple of the block size */
    assert_int_equal(kern_matmul_q(pool4, KERN_TYPE_Q8_0, y, 4, x, 48, w, 1, 4, 48), KERN_QE_ARG);
    assert_int_equal(kern_matmul_q(NULL, KERN_TYPE_Q4_K, y, 4, x, 288, w, 1, 1, 288), KERN_QE_ARG);
    assert_int_equal(kern_matmul_q_ref(KERN_TYPE_Q6_K, y, 4, x, 288, w, 1, 1, 288), KERN_QE_ARG);
    /* strides, pointers, alignment, negative sizes */
    assert_int_equal(kern_matmul_q(NULL, KERN_TYPE_Q8_0, y, 4, x, 16, w, 1, 1, 32), KERN_QE_ARG);
    assert_int_equal(kern_matmul_q(NULL, KERN_TYPE_Q8_0, y, 1, x, 32, w, 2, 2, 32), KERN_QE_ARG);
    assert_int_equal(kern_matmul_q(NULL, KERN_TYPE_Q8_0, NULL, 1, x, 32, w, 1, 1, 32), KERN_QE_ARG);
    assert_int_equal(kern_matmul_q(NULL, KERN_TYPE_Q8_0, y, 1, x, 32, NULL, 1, 1, 32), KERN_QE_ARG);
    assert_int_equal(
        kern_matmul_q(NULL, KERN_TYPE_Q8_0, y, 1, x, 32, (const char *)w + 1, 1, 1, 32),
        KERN_QE_ARG);
    assert_int_equal(kern_matmul_q(NULL, KERN_TYPE_F16, y, 1, x, 32, w, -1, 1, 32), KERN_QE_ARG);
    /* types that are not weight types */
    assert_int_equal(kern_matmul_q(NULL, KERN_TYPE_Q8_K, y, 1, x, 256, w, 1, 1, 256), KERN_QE_TYPE);
    assert_int_equal(kern_matmul_q(NULL, 3, y, 1, x, 32, w, 1, 1, 32), KERN_QE_TYPE);
    assert_int_equal(kern_matmul_q_ref(99, y, 1, x, 32, w, 1, 1, 32), KERN_QE_TYPE);
    for (int i = 0; i < 64; i++)
        assert_true(y[i] == GUARD);
    /* zero sizes: success, nothing written */
    assert_int_equal(kern_matmul_q(pool4, KERN_TYPE_Q8_0, y, 4, x, 32, w, 0, 4, 32), 0);
    assert_int_equal(kern_matmul_q(pool4, KERN_TYPE_Q8_0, y, 4, x, 32, w, 1, 0, 32), 0);
    assert_int_equal(kern_matmul_q(pool4, KERN_TYPE_Q8_0, y, 4, x, 32, w, 1, 4, 0), 0);
    for (int i = 0; i < 64; i++)
        assert_true(y[i] == GUARD);
    /* rows */
    assert_int_equal(kern_dequant_row(KERN_TYPE_Q4_0, w, x, 33), KERN_QE_ARG);
    assert_int_equal(kern_dequant_row(KERN_TYPE_Q5_K, w, x, 128), KERN_QE_ARG);
    assert_int_equal(kern_dequant_row(3, w, x, 32), KERN_QE_TYPE);
    assert_int_equal(kern_quant_row(KERN_TYPE_Q6_K, x, w, 100), KERN_QE_ARG);
    assert_int_equal(kern_quant_row(KERN_TYPE_Q6_K, NULL, w, 256), KERN_QE_ARG);
    assert_int_equal(kern_quant_row(7, x, w, 32), KERN_QE_TYPE);
    assert_int_equal(kern_dequant_row(KERN_TYPE_Q8_0, w, x, 0), 0);
}

static void test_quant_f32_type_runs_the_f32_product(void **state)
{
    (void)state;
    rng_seed(51);
    const int M = 3, N = 40, K = 70;
    float *x = gauss_floats((size_t)M * K, 1.0f), *w = gauss_floats((size_t)N * K, 1.0f);
    float y[120], ref[120];
    assert_int_equal(kern_matmul_q(pool4, KERN_TYPE_F32, y, N, x, K, w, M, N, K), 0);
    kern_matmul_ref(ref, N, x, K, w, M, N, K);
    for (int i = 0; i < M * N; i++)
        assert_true(fabsf(y[i] - ref[i]) <= 1e-4f * fmaxf(1.0f, fabsf(ref[i])));
    free(x);
    free(w);
}

static void test_quant_isa_selection(void **state)
{
    (void)state;
    const kern_isa det = kern_quant_isa_detected();
    assert_int_equal(kern_quant_set_isa(KERN_ISA_SCALAR), KERN_ISA_SCALAR);
    assert_int_equal(kern_quant_isa(), KERN_ISA_SCALAR);
    assert_int_equal(kern_quant_set_isa(KERN_ISA_AVX2), det); /* capped at the detected one */
    printf("[ info ] quantized kernels use %s\n", det == KERN_ISA_AVX2 ? "AVX2" : "scalar C");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quant_type_sizes_match_ggml),
        cmocka_unit_test(test_quant_f32_to_f16_rounds_to_nearest_even),
        cmocka_unit_test(test_quant_f32_to_bf16_rounds_to_nearest_even),
        cmocka_unit_test(test_quant_dequant_matches_gguf_reference),
        cmocka_unit_test_teardown(test_quant_quantize_matches_gguf_bytes, restore_isa),
        cmocka_unit_test_teardown(test_quant_roundtrip_error_within_type_bound, restore_isa),
        cmocka_unit_test_teardown(test_quant_activation_quantizers_simd_equal_scalar, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_f16, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_bf16, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_q8_0, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_q4_0, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_q4_K, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_q5_K, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_q6_K, restore_isa),
        cmocka_unit_test_teardown(test_quant_matmul_on_arbitrary_block_bytes_matches_reference,
                                  restore_isa),
        cmocka_unit_test(test_quant_matmul_q_ref_matches_composed_reference),
        cmocka_unit_test(test_quant_bad_arguments_rejected),
        cmocka_unit_test(test_quant_f32_type_runs_the_f32_product),
        cmocka_unit_test_teardown(test_quant_isa_selection, restore_isa),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
