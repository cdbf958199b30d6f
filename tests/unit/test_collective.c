/*
 * test_collective.c - the shared-memory threads all-reduce of
 * kernels/collective.h: exact sums for 1 to 4 ranks (integer-valued floats,
 * so any order gives the same bits), the fixed rank-order summation on random
 * floats (bit-identical to ((b0 + b1) + b2) + b3, on every rank and every
 * run), thousands of rounds of varying sizes without a deadlock, size
 * mismatches reported to every rank, a missing rank turned into a timeout and
 * a broken communicator instead of a hang, and bad arguments refused.
 *
 * Each rank is a pthread; buffers are pre-filled by the rank that owns them.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h> /* after the headers it needs */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/collective.h"

#define MAX_RANKS 4

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

/* Element i of rank r's input in round `round`: an integer-valued float
 * (exact sums) or a random float in [-1, 1) (order-sensitive sums). */
static float input(int round, int r, size_t i, int exact)
{
    const uint64_t h = mix(((uint64_t)round << 40) ^ ((uint64_t)r << 32) ^ i);
    if (exact)
        return (float)(int)(h % 2001) - 1000.0f;
    return (float)((double)(h >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

/* ---- a rank thread running a script of rounds ---- */

typedef struct {
    kern_comm *comm;
    int rank;
    int rounds;
    int exact;
    int vary; /* sizes vary by round (up to 3000); else n_fixed every round */
    size_t n_fixed;
    size_t n_override; /* > 0: this rank passes this size instead (mismatch test) */
    float *out;        /* when non-NULL: the last round's result, n_fixed elements */
    int rc;            /* first nonzero return */
    int bad_round;     /* first round whose sums were wrong, or -1 */
    char err[256];
} rank_job;

static size_t round_size(int round)
{
    return (size_t)(mix((uint64_t)round) % 3000);
}

static void expected(float *want, int n_ranks, int round, size_t n, int exact)
{
    for (size_t i = 0; i < n; i++) {
        float s = input(round, 0, i, exact);
        for (int r = 1; r < n_ranks; r++)
            s += input(round, r, i, exact);
        want[i] = s;
    }
}

static void *rank_main(void *arg)
{
    rank_job *j = arg;
    const int n_ranks = kern_comm_size(j->comm);
    size_t cap = j->vary ? 3000 : j->n_fixed;
    if (j->n_override > cap)
        cap = j->n_override;
    float *buf = malloc(sizeof(float) * cap + 1);
    float *want = malloc(sizeof(float) * cap + 1);
    j->rc = 0;
    j->bad_round = -1;
    for (int round = 0; round < j->rounds && buf && want; round++) {
        const size_t n = j->vary ? round_size(round) : j->n_fixed;
        for (size_t i = 0; i < n; i++)
            buf[i] = input(round, j->rank, i, j->exact);
        const size_t pass = j->n_override ? j->n_override : n;
        const int rc =
            kern_comm_allreduce_sum_f32(j->comm, j->rank, buf, pass, j->err, sizeof(j->err));
        if (rc) {
            j->rc = rc;
            break;
        }
        expected(want, n_ranks, round, n, j->exact);
        if (j->bad_round < 0 && memcmp(buf, want, sizeof(float) * n) != 0)
            j->bad_round = round;
        if (round % 7 == 3) {
            const int brc = kern_comm_barrier(j->comm, j->rank, j->err, sizeof(j->err));
            if (brc) {
                j->rc = brc;
                break;
            }
        }
    }
    if (j->out && buf)
        memcpy(j->out, buf, sizeof(float) * j->n_fixed);
    free(buf);
    free(want);
    return NULL;
}

/* Runs jobs[0..n) as threads and waits for all of them. */
static void run_ranks(rank_job *jobs, int n)
{
    pthread_t t[MAX_RANKS];
    for (int r = 0; r < n; r++)
        assert_int_equal(pthread_create(&t[r], NULL, rank_main, &jobs[r]), 0);
    for (int r = 0; r < n; r++)
        assert_int_equal(pthread_join(t[r], NULL), 0);
}

static kern_comm *make_comm(int n)
{
    char err[256] = "";
    kern_comm *c = kern_comm_create_threads(n, err, sizeof(err));
    if (!c)
        fail_msg("kern_comm_create_threads(%d): %s", n, err);
    assert_int_equal(kern_comm_size(c), n);
    assert_int_equal(kern_comm_get_kind(c), KERN_COMM_THREADS);
    return c;
}

static void test_allreduce_sums_exactly_for_1_to_4_ranks(void **state)
{
    (void)state;
    static const size_t sizes[] = {0, 1, 3, 5, 1024, 10007};
    for (int n_ranks = 1; n_ranks <= MAX_RANKS; n_ranks++) {
        for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
            kern_comm *c = make_comm(n_ranks);
            rank_job jobs[MAX_RANKS];
            memset(jobs, 0, sizeof(jobs));
            for (int r = 0; r < n_ranks; r++)
                jobs[r] =
                    (rank_job){.comm = c, .rank = r, .rounds = 3, .exact = 1, .n_fixed = sizes[s]};
            run_ranks(jobs, n_ranks);
            for (int r = 0; r < n_ranks; r++) {
                if (jobs[r].rc)
                    fail_msg("%d ranks, n %zu, rank %d: %s", n_ranks, sizes[s], r, jobs[r].err);
                if (jobs[r].bad_round >= 0)
                    fail_msg("%d ranks, n %zu, rank %d: wrong sum in round %d", n_ranks, sizes[s],
                             r, jobs[r].bad_round);
            }
            kern_comm_destroy(c);
        }
    }
}

static void test_allreduce_is_deterministic_in_rank_order(void **state)
{
    (void)state;
    enum { N = 4099 };
    for (int n_ranks = 2; n_ranks <= MAX_RANKS; n_ranks++) {
        float *first = NULL;
        for (int run = 0; run < 3; run++) {
            kern_comm *c = make_comm(n_ranks);
            rank_job jobs[MAX_RANKS];
            float *outs = malloc(sizeof(float) * N * MAX_RANKS);
            assert_non_null(outs);
            for (int r = 0; r < n_ranks; r++)
                jobs[r] = (rank_job){.comm = c,
                                     .rank = r,
                                     .rounds = 1,
                                     .exact = 0,
                                     .n_fixed = N,
                                     .out = outs + (size_t)r * N};
            run_ranks(jobs, n_ranks);
            for (int r = 0; r < n_ranks; r++) {
                assert_int_equal(jobs[r].rc, 0);
                /* bad_round compares with ((b0 + b1) + b2) + b3 bit for bit */
                if (jobs[r].bad_round >= 0)
                    fail_msg("%d ranks: rank %d's sums are not the rank-order sums", n_ranks, r);
                assert_memory_equal(outs + (size_t)r * N, outs, sizeof(float) * N);
            }
            if (!first)
                first = outs;
            else {
                assert_memory_equal(outs, first, sizeof(float) * N);
                free(outs);
            }
            kern_comm_destroy(c);
        }
        free(first);
    }
}

static void test_allreduce_many_rounds_without_deadlock(void **state)
{
    (void)state;
    for (int n_ranks = 2; n_ranks <= MAX_RANKS; n_ranks++) {
        kern_comm *c = make_comm(n_ranks);
        kern_comm_set_timeout_ms(c, 20000); /* a deadlock fails the test instead of hanging */
        rank_job jobs[MAX_RANKS];
        for (int r = 0; r < n_ranks; r++)
            jobs[r] = (rank_job){.comm = c, .rank = r, .rounds = 2000, .exact = 1, .vary = 1};
        run_ranks(jobs, n_ranks);
        for (int r = 0; r < n_ranks; r++) {
            if (jobs[r].rc)
                fail_msg("%d ranks, rank %d: %s", n_ranks, r, jobs[r].err);
            if (jobs[r].bad_round >= 0)
                fail_msg("%d ranks, rank %d: wrong sum in round %d", n_ranks, r, jobs[r].bad_round);
        }
        kern_comm_destroy(c);
    }
}

static void test_allreduce_reports_mismatched_sizes_to_every_rank(void **state)
{
    (void)state;
    kern_comm *c = make_comm(3);
    rank_job jobs[3];
    for (int r = 0; r < 3; r++)
        jobs[r] = (rank_job){.comm = c, .rank = r, .rounds = 1, .exact = 1, .n_fixed = 100};
    jobs[2].n_override = 99;
    run_ranks(jobs, 3);
    for (int r = 0; r < 3; r++) {
        assert_int_equal(jobs[r].rc, KERN_COMM_E_ARG);
        assert_non_null(strstr(jobs[r].err, "rank 2 passed 99 elements"));
    }
    /* The communicator is still usable. */
    for (int r = 0; r < 3; r++)
        jobs[r] = (rank_job){.comm = c, .rank = r, .rounds = 5, .exact = 1, .n_fixed = 100};
    run_ranks(jobs, 3);
    for (int r = 0; r < 3; r++) {
        assert_int_equal(jobs[r].rc, 0);
        assert_int_equal(jobs[r].bad_round, -1);
    }
    kern_comm_destroy(c);
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static void test_allreduce_times_out_instead_of_hanging(void **state)
{
    (void)state;
    kern_comm *c = make_comm(2);
    kern_comm_set_timeout_ms(c, 100);
    float buf[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    char err[256] = "";
    const double t0 = now_ms();
    int rc = kern_comm_allreduce_sum_f32(c, 0, buf, 8, err, sizeof(err)); /* rank 1 never comes */
    const double waited = now_ms() - t0;
    assert_int_equal(rc, KERN_COMM_E_TIMEOUT);
    assert_true(waited >= 90.0 && waited < 5000.0);
    assert_non_null(strstr(err, "only 1 of 2 ranks arrived"));
    /* Broken from now on, for every rank, at once. */
    err[0] = '\0';
    rc = kern_comm_allreduce_sum_f32(c, 1, buf, 8, err, sizeof(err));
    assert_int_equal(rc, KERN_COMM_E_BROKEN);
    assert_non_null(strstr(err, "waited 100 ms"));
    assert_int_equal(kern_comm_barrier(c, 0, err, sizeof(err)), KERN_COMM_E_BROKEN);
    kern_comm_destroy(c);
}

static void test_comm_refuses_bad_arguments(void **state)
{
    (void)state;
    char err[256] = "";
    assert_null(kern_comm_create_threads(0, err, sizeof(err)));
    assert_non_null(strstr(err, "0 ranks"));
    assert_null(kern_comm_create_threads(KERN_COMM_MAX_RANKS + 1, err, sizeof(err)));
    kern_comm *c = make_comm(2);
    float x = 1.0f;
    assert_int_equal(kern_comm_allreduce_sum_f32(c, 2, &x, 1, err, sizeof(err)), KERN_COMM_E_ARG);
    assert_non_null(strstr(err, "rank 2"));
    assert_int_equal(kern_comm_allreduce_sum_f32(c, -1, &x, 1, err, sizeof(err)), KERN_COMM_E_ARG);
    assert_int_equal(kern_comm_allreduce_sum_f32(c, 0, NULL, 4, err, sizeof(err)), KERN_COMM_E_ARG);
    assert_int_equal(kern_comm_allreduce_sum_f32(NULL, 0, &x, 1, err, sizeof(err)),
                     KERN_COMM_E_ARG);
    kern_comm_destroy(c);
    kern_comm_destroy(NULL);
    assert_string_equal(kern_comm_strerror(KERN_COMM_E_TIMEOUT), "ranks timed out");
}

static void test_single_rank_allreduce_is_identity(void **state)
{
    (void)state;
    kern_comm *c = make_comm(1);
    float buf[3] = {1.5f, -2.0f, 3.25f};
    char err[64];
    assert_int_equal(kern_comm_allreduce_sum_f32(c, 0, buf, 3, err, sizeof(err)), 0);
    assert_true(buf[0] == 1.5f && buf[1] == -2.0f && buf[2] == 3.25f);
    assert_int_equal(kern_comm_barrier(c, 0, err, sizeof(err)), 0);
    kern_comm_destroy(c);
}

static void test_nccl_communicator_needs_nccl(void **state)
{
    (void)state;
#ifdef SIEVE_HAVE_NCCL
    print_message("SKIP: built with NCCL (tests/unit/test_cuda_twins.c runs it on a GPU)\n");
    skip();
#else
    char err[256] = "";
    const int dev[1] = {0};
    assert_null(kern_comm_create_nccl(dev, 1, err, sizeof(err)));
    assert_non_null(strstr(err, "without NCCL"));
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_allreduce_sums_exactly_for_1_to_4_ranks),
        cmocka_unit_test(test_allreduce_is_deterministic_in_rank_order),
        cmocka_unit_test(test_allreduce_many_rounds_without_deadlock),
        cmocka_unit_test(test_allreduce_reports_mismatched_sizes_to_every_rank),
        cmocka_unit_test(test_allreduce_times_out_instead_of_hanging),
        cmocka_unit_test(test_comm_refuses_bad_arguments),
        cmocka_unit_test(test_single_rank_allreduce_is_identity),
        cmocka_unit_test(test_nccl_communicator_needs_nccl),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
