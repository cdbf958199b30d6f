/*
 * test_sampler.c - unit tests for runtime/sampler.c: greedy choice and its tie
 * rule, seeding, and the distribution of draws under temperature, top_k, top_p
 * and min_p.
 *
 * Distribution tests compare empirical frequencies with probabilities computed
 * here in double. With n draws the standard deviation of a frequency is at most
 * sqrt(0.25 / n): 0.0035 for 20000 draws, so a tolerance of 0.02 is more than 5
 * standard deviations (and the generator is seeded, so every run draws the same
 * numbers: the tests cannot flake, they can only be wrong once).
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

#include "runtime/sampler.h"

#define N_DRAWS 20000
#define FREQ_TOL 0.02

/* ---- helpers ---- */

static void sampler_open(rt_sampler *s, float temperature, int top_k, float top_p, float min_p,
                         uint64_t seed, int n_vocab)
{
    rt_sampling p;
    rt_sampling_defaults(&p);
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = seed;
    assert_int_equal(rt_sampler_init(s, &p, n_vocab), 0);
    assert_non_null(s->cand);
}

/* Logits whose softmax is exactly probs (up to float rounding). */
static void logits_from_probs(float *logits, const double *probs, int n)
{
    for (int i = 0; i < n; i++)
        logits[i] = (float)log(probs[i]);
}

/* softmax(logits / temperature) in double. */
static void softmax_ref(double *out, const float *logits, int n, double temperature)
{
    double mx = logits[0];
    for (int i = 1; i < n; i++)
        if (logits[i] > mx)
            mx = logits[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        out[i] = exp(((double)logits[i] - mx) / temperature);
        sum += out[i];
    }
    for (int i = 0; i < n; i++)
        out[i] /= sum;
}

/* Draws n_draws tokens and stores the frequency of each id in freq[0..n_vocab).
 * Fails the test if any draw is outside [0, n_vocab). */
static void draw_frequencies(rt_sampler *s, const float *logits, int n_draws, double *freq)
{
    const int n = s->n_vocab;
    int *count = calloc((size_t)n, sizeof(int));
    assert_non_null(count);
    for (int d = 0; d < n_draws; d++) {
        const int id = rt_sample(s, logits);
        assert_in_range(id, 0, n - 1);
        count[id]++;
    }
    for (int i = 0; i < n; i++)
        freq[i] = (double)count[i] / n_draws;
    free(count);
}

static void assert_freq_close(const double *freq, const double *expect, int n, double tol)
{
    for (int i = 0; i < n; i++) {
        const double diff = fabs(freq[i] - expect[i]);
        if (diff >= tol)
            fail_msg("token %d: frequency %.4f, expected %.4f (|diff| %.4f >= %.4f)", i, freq[i],
                     expect[i], diff, tol);
    }
}

/* ---- greedy ---- */

static void test_sampler_greedy_temperature_zero_picks_max(void **state)
{
    (void)state;
    const float logits[6] = {0.5f, -1.0f, 2.25f, 2.0f, -3.0f, 1.0f};
    rt_sampler s;
    sampler_open(&s, 0.0f, 0, 1.0f, 0.0f, 1, 6);
    for (int d = 0; d < 50; d++)
        assert_int_equal(rt_sample(&s, logits), 2);
    rt_sampler_free(&s);
    assert_int_equal(rt_argmax(logits, 6), 2);
}

static void test_sampler_greedy_ties_go_to_lowest_id(void **state)
{
    (void)state;
    float logits[10];
    for (int i = 0; i < 10; i++)
        logits[i] = -0.5f * (float)i;
    logits[3] = 4.0f;
    logits[7] = 4.0f;
    assert_int_equal(rt_argmax(logits, 10), 3);

    rt_sampler s;
    sampler_open(&s, 0.0f, 0, 1.0f, 0.0f, 7, 10);
    assert_int_equal(rt_sample(&s, logits), 3);
    rt_sampler_free(&s);

    /* All equal: the first id. */
    float flat[5] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    assert_int_equal(rt_argmax(flat, 5), 0);
}

static void test_sampler_top_k_one_is_greedy_at_any_temperature(void **state)
{
    (void)state;
    float logits[10];
    for (int i = 0; i < 10; i++)
        logits[i] = 0.1f * (float)(i % 4);
    logits[3] = 1.0f;
    logits[7] = 1.0f; /* tie with 3: 3 wins */
    for (uint64_t seed = 0; seed < 4; seed++) {
        rt_sampler s;
        sampler_open(&s, 1.5f, 1, 1.0f, 0.0f, seed, 10);
        for (int d = 0; d < 200; d++)
            assert_int_equal(rt_sample(&s, logits), 3);
        rt_sampler_free(&s);
    }
}

/* ---- seeding ---- */

static void draw_sequence(uint64_t seed, int *out, int n_draws)
{
    float flat[64] = {0};
    rt_sampler s;
    sampler_open(&s, 1.0f, 0, 1.0f, 0.0f, seed, 64);
    for (int d = 0; d < n_draws; d++)
        out[d] = rt_sample(&s, flat);
    rt_sampler_free(&s);
}

static void test_sampler_same_seed_gives_same_sequence(void **state)
{
    (void)state;
    int a[200], b[200];
    draw_sequence(12345, a, 200);
    draw_sequence(12345, b, 200);
    assert_memory_equal(a, b, sizeof(a));
    /* The sequence is not constant: a flat 64-token distribution over 200 draws
     * must visit many ids. */
    int seen[64] = {0}, distinct = 0;
    for (int d = 0; d < 200; d++)
        if (!seen[a[d]]++)
            distinct++;
    assert_true(distinct >= 40);
}

static void test_sampler_different_seed_gives_different_sequence(void **state)
{
    (void)state;
    int a[200], b[200];
    draw_sequence(12345, a, 200);
    draw_sequence(12346, b, 200);
    /* Independent draws from 64 equally likely ids agree 1 time in 64: ~3 of
     * 200. Demand at least 150 differences. */
    int differ = 0;
    for (int d = 0; d < 200; d++)
        differ += a[d] != b[d];
    assert_true(differ >= 150);
}

/* ---- the distribution without filters ---- */

static void test_sampler_temperature_one_matches_softmax(void **state)
{
    (void)state;
    const float logits[4] = {1.0f, 2.0f, 0.5f, -1.0f};
    double expect[4], freq[4];
    softmax_ref(expect, logits, 4, 1.0);
    rt_sampler s;
    sampler_open(&s, 1.0f, 0, 1.0f, 0.0f, 2024, 4);
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    assert_freq_close(freq, expect, 4, FREQ_TOL);

    /* Chi-square with 3 degrees of freedom: P(chi2 > 16.27) = 0.001. */
    double chi2 = 0.0;
    for (int i = 0; i < 4; i++) {
        const double e = expect[i] * N_DRAWS, o = freq[i] * N_DRAWS;
        chi2 += (o - e) * (o - e) / e;
    }
    if (chi2 >= 16.27)
        fail_msg("chi-square %.2f >= 16.27 (p < 0.001)", chi2);
}

static void test_sampler_temperature_two_flattens_as_softmax_of_half_logits(void **state)
{
    (void)state;
    const float logits[4] = {1.0f, 3.0f, 0.0f, -2.0f};
    double expect[4], freq[4];
    softmax_ref(expect, logits, 4, 2.0);
    rt_sampler s;
    sampler_open(&s, 2.0f, 0, 1.0f, 0.0f, 99, 4);
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    assert_freq_close(freq, expect, 4, FREQ_TOL);
}

static void test_sampler_low_temperature_concentrates_on_argmax(void **state)
{
    (void)state;
    const float logits[4] = {1.5f, 2.0f, 1.0f, 0.0f};
    double expect[4], freq[4];
    softmax_ref(expect, logits, 4, 0.05);
    /* softmax(logits / 0.05): the argmax has 1 - ~e^-10. */
    assert_true(expect[1] > 0.9999);
    rt_sampler s;
    sampler_open(&s, 0.05f, 0, 1.0f, 0.0f, 5, 4);
    draw_frequencies(&s, logits, 5000, freq);
    rt_sampler_free(&s);
    assert_true(freq[1] >= 0.999);
    assert_freq_close(freq, expect, 4, FREQ_TOL);

    /* At temperature 1 the same logits are far from concentrated, so the
     * concentration above comes from the temperature. */
    sampler_open(&s, 1.0f, 0, 1.0f, 0.0f, 5, 4);
    draw_frequencies(&s, logits, 5000, freq);
    rt_sampler_free(&s);
    assert_true(freq[1] < 0.6);
}

/* ---- filters ---- */

static void test_sampler_top_k_two_never_leaves_the_two_most_likely(void **state)
{
    (void)state;
    const float logits[6] = {0.1f, 2.0f, -0.5f, 1.5f, 0.3f, 1.0f};
    rt_sampler s;
    sampler_open(&s, 1.0f, 2, 1.0f, 0.0f, 31, 6);
    double freq[6];
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    /* Renormalized over ids 1 and 3 only. */
    const double p1 = exp(2.0) / (exp(2.0) + exp(1.5));
    const double expect[6] = {0, p1, 0, 1.0 - p1, 0, 0};
    for (int i = 0; i < 6; i++)
        if (i != 1 && i != 3)
            assert_true(freq[i] == 0.0);
    assert_freq_close(freq, expect, 6, FREQ_TOL);
}

static void test_sampler_top_k_cut_inside_a_tie_keeps_the_lowest_ids(void **state)
{
    (void)state;
    /* Ids 1, 4 and 6 share the largest logit; top_k 2 keeps 1 and 4 (candidates
     * are ordered by probability, then by id), each drawn half the time. */
    const float logits[8] = {0.0f, 1.0f, 0.5f, -1.0f, 1.0f, 0.2f, 1.0f, 0.9f};
    rt_sampler s;
    sampler_open(&s, 1.0f, 2, 1.0f, 0.0f, 41, 8);
    double freq[8];
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    const double expect[8] = {0, 0.5, 0, 0, 0.5, 0, 0, 0};
    assert_true(freq[6] == 0.0);
    assert_freq_close(freq, expect, 8, FREQ_TOL);
}

static void test_sampler_top_k_above_vocab_is_no_filter(void **state)
{
    (void)state;
    const float logits[4] = {0.0f, 1.0f, 0.5f, 0.25f};
    double expect[4], freq[4];
    softmax_ref(expect, logits, 4, 1.0);
    rt_sampler s;
    sampler_open(&s, 1.0f, 10, 1.0f, 0.0f, 8, 4);
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    assert_freq_close(freq, expect, 4, FREQ_TOL);
}

static void test_sampler_top_p_half_keeps_only_the_top_token(void **state)
{
    (void)state;
    const double probs[3] = {0.6, 0.3, 0.1};
    float logits[3];
    logits_from_probs(logits, probs, 3);
    rt_sampler s;
    sampler_open(&s, 1.0f, 0, 0.5f, 0.0f, 77, 3);
    for (int d = 0; d < 2000; d++)
        assert_int_equal(rt_sample(&s, logits), 0);
    rt_sampler_free(&s);
}

static void test_sampler_top_p_point_eight_keeps_the_top_two(void **state)
{
    (void)state;
    const double probs[3] = {0.6, 0.3, 0.1};
    float logits[3];
    logits_from_probs(logits, probs, 3);
    rt_sampler s;
    sampler_open(&s, 1.0f, 0, 0.8f, 0.0f, 78, 3);
    double freq[3];
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    /* 0.6 < 0.8 <= 0.6 + 0.3: the nucleus is {0, 1}, renormalized by 0.9. */
    const double expect[3] = {0.6 / 0.9, 0.3 / 0.9, 0.0};
    assert_true(freq[2] == 0.0);
    assert_freq_close(freq, expect, 3, FREQ_TOL);
}

static void test_sampler_min_p_half_keeps_tokens_above_half_the_max(void **state)
{
    (void)state;
    const double probs[3] = {0.5, 0.3, 0.2};
    float logits[3];
    logits_from_probs(logits, probs, 3);
    rt_sampler s;
    sampler_open(&s, 1.0f, 0, 1.0f, 0.5f, 79, 3);
    double freq[3];
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    /* Floor 0.5 * 0.5 = 0.25: ids 0 (0.5) and 1 (0.3) stay, 2 (0.2) goes. */
    const double expect[3] = {0.5 / 0.8, 0.3 / 0.8, 0.0};
    assert_true(freq[2] == 0.0);
    assert_freq_close(freq, expect, 3, FREQ_TOL);
}

static void test_sampler_filters_apply_to_ids_in_any_position(void **state)
{
    (void)state;
    /* The most likely ids are not the first ones: filters must work on the
     * sorted candidates and return the original ids. */
    const double probs[5] = {0.05, 0.1, 0.05, 0.2, 0.6};
    float logits[5];
    logits_from_probs(logits, probs, 5);
    rt_sampler s;
    sampler_open(&s, 1.0f, 0, 0.75f, 0.0f, 80, 5);
    double freq[5];
    draw_frequencies(&s, logits, N_DRAWS, freq);
    rt_sampler_free(&s);
    const double expect[5] = {0, 0, 0, 0.2 / 0.8, 0.6 / 0.8};
    assert_freq_close(freq, expect, 5, FREQ_TOL);
    assert_true(freq[0] == 0.0 && freq[1] == 0.0 && freq[2] == 0.0);
}

/* ---- the generator ---- */

static void test_sampler_uniform_stays_in_unit_interval(void **state)
{
    (void)state;
    const uint64_t seeds[3] = {0, 1, UINT64_MAX};
    for (int si = 0; si < 3; si++) {
        rt_sampler s;
        sampler_open(&s, 1.0f, 0, 1.0f, 0.0f, seeds[si], 1);
        double lo = 1.0, hi = 0.0, sum = 0.0;
        int bins[10] = {0};
        const int n = 100000;
        for (int i = 0; i < n; i++) {
            const double u = rt_sampler_uniform(&s);
            assert_true(u >= 0.0);
            assert_true(u < 1.0);
            lo = u < lo ? u : lo;
            hi = u > hi ? u : hi;
            sum += u;
            bins[(int)(u * 10.0)]++;
        }
        rt_sampler_free(&s);
        /* It covers the interval: mean 0.5 (sd 0.0009), extremes near the
         * ends, every tenth holding ~10% (sd 0.001). */
        assert_true(fabs(sum / n - 0.5) < 0.01);
        assert_true(lo < 0.001);
        assert_true(hi > 0.999);
        for (int b = 0; b < 10; b++)
            assert_true(fabs((double)bins[b] / n - 0.1) < 0.01);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sampler_greedy_temperature_zero_picks_max),
        cmocka_unit_test(test_sampler_greedy_ties_go_to_lowest_id),
        cmocka_unit_test(test_sampler_top_k_one_is_greedy_at_any_temperature),
        cmocka_unit_test(test_sampler_same_seed_gives_same_sequence),
        cmocka_unit_test(test_sampler_different_seed_gives_different_sequence),
        cmocka_unit_test(test_sampler_temperature_one_matches_softmax),
        cmocka_unit_test(test_sampler_temperature_two_flattens_as_softmax_of_half_logits),
        cmocka_unit_test(test_sampler_low_temperature_concentrates_on_argmax),
        cmocka_unit_test(test_sampler_top_k_two_never_leaves_the_two_most_likely),
        cmocka_unit_test(test_sampler_top_k_cut_inside_a_tie_keeps_the_lowest_ids),
        cmocka_unit_test(test_sampler_top_k_above_vocab_is_no_filter),
        cmocka_unit_test(test_sampler_top_p_half_keeps_only_the_top_token),
        cmocka_unit_test(test_sampler_top_p_point_eight_keeps_the_top_two),
        cmocka_unit_test(test_sampler_min_p_half_keeps_tokens_above_half_the_max),
        cmocka_unit_test(test_sampler_filters_apply_to_ids_in_any_position),
        cmocka_unit_test(test_sampler_uniform_stays_in_unit_interval),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
