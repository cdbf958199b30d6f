/*
 * test_matvec_group.c - kern_matvec_group_f32: several products of one x in a
 * single pass of the pool equal kern_matmul_f32_ldw's, bit for bit (the same
 * row kernel over the same rows), for decode batch sizes, odd row counts,
 * column slices (ldw > K) and serial or threaded pools; too many rows or
 * outputs are refused with nothing written.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/kernels.h"

static uint64_t rng = 12345;
static float frand(void)
{
    rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

static float *rand_buf(size_t n)
{
    float *b = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++)
        b[i] = frand();
    return b;
}

static void check(kern_pool *pool, int M, int K, int ldw, const int *Ns, int n)
{
    float *x = rand_buf((size_t)M * K);
    float *w[KERN_MATVEC_GROUP_MAX], *y[KERN_MATVEC_GROUP_MAX], *ref[KERN_MATVEC_GROUP_MAX];
    kern_mv_out o[KERN_MATVEC_GROUP_MAX];
    for (int i = 0; i < n; i++) {
        w[i] = rand_buf((size_t)Ns[i] * ldw);
        y[i] = calloc((size_t)M * Ns[i], sizeof(float));
        ref[i] = calloc((size_t)M * Ns[i], sizeof(float));
        kern_matmul_f32_ldw(pool, ref[i], Ns[i], x, K, w[i], ldw, M, Ns[i], K);
        o[i] = (kern_mv_out){y[i], Ns[i], w[i], ldw, Ns[i]};
    }
    assert_int_equal(kern_matvec_group_f32(pool, x, K, M, K, o, n), 0);
    for (int i = 0; i < n; i++) {
        assert_memory_equal(y[i], ref[i], sizeof(float) * (size_t)M * Ns[i]);
        free(w[i]);
        free(y[i]);
        free(ref[i]);
    }
    free(x);
}

static void test_group_equals_one_by_one(void **state)
{
    (void)state;
    kern_pool *pools[2] = {kern_pool_create(1), kern_pool_create(2)};
    const int qkv[3] = {768, 256, 256}, ffn[2] = {2048, 2048}, odd[3] = {37, 8, 1};
    for (int p = 0; p < 2; p++) {
        for (int M = 1; M <= 32; M += M < 4 ? 1 : 13) {
            check(pools[p], M, 768, 768, qkv, 3);
            check(pools[p], M, 256, 256, ffn, 2);
            check(pools[p], M, 64, 96, odd, 3); /* a column slice: ldw > K */
        }
        check(pools[p], 5, 20, 20, odd, 3); /* K not a multiple of 8 */
    }
    kern_pool_destroy(pools[0]);
    kern_pool_destroy(pools[1]);
}

static void test_group_refuses_what_it_cannot_do(void **state)
{
    (void)state;
    kern_pool *pool = kern_pool_create(2);
    float x[33 * 8], w[16 * 8], y[33 * 16];
    memset(x, 0, sizeof(x));
    memset(w, 0, sizeof(w));
    for (size_t i = 0; i < sizeof(y) / sizeof(y[0]); i++)
        y[i] = 7.0f;
    kern_mv_out o[KERN_MATVEC_GROUP_MAX + 1];
    for (int i = 0; i <= KERN_MATVEC_GROUP_MAX; i++)
        o[i] = (kern_mv_out){y, 16, w, 8, 16};
    assert_int_equal(kern_matvec_group_f32(pool, x, 8, 33, 8, o, 1), -1); /* M > 32 */
    assert_int_equal(kern_matvec_group_f32(pool, x, 8, 2, 8, o, KERN_MATVEC_GROUP_MAX + 1), -1);
    assert_int_equal(kern_matvec_group_f32(pool, x, 8, 2, 8, NULL, 1), -1);
    for (size_t i = 0; i < sizeof(y) / sizeof(y[0]); i++)
        assert_true(y[i] == 7.0f);
    assert_int_equal(kern_matvec_group_f32(pool, x, 8, 0, 8, o, 1), 0); /* nothing to do */
    kern_pool_destroy(pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_equals_one_by_one),
        cmocka_unit_test(test_group_refuses_what_it_cannot_do),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
