/*
 * test_sparse_policy.c - sparse prefill policies through the runtime's forward
 * pass on the real model (stories260K, a ~1500-token prompt, blocks of 32,
 * min_budget 64): FlexPrefill with gamma 1 equals dense, gamma 0.9 computes
 * fewer blocks and stays close to dense (KL divergence of the next-token
 * distribution bounded by the figure measured when this test was written),
 * PowerAttention likewise, and chunked prefill keeps working.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/common/testutil.h"

#define N_PROMPT 1500

typedef struct {
    rt_model *m;
    int32_t prompt[N_PROMPT];
    int n_vocab;
} fixture;

static int setup(void **state)
{
    static fixture f;
    char err[512];
    rt_model_opts o = {.n_threads = 2, .max_batch_tokens = 512, .n_ctx = 0};
    if (rt_model_load(&f.m, tu_shared_path("models/stories260K.gguf"), &o, err, sizeof(err)))
        return -1;
    f.n_vocab = rt_model_hparams(f.m)->n_vocab;
    static const char *text =
        " Once upon a time, there was a little girl named Lily. She loved to play outside in the "
        "park with her friends. One day, she saw a big red ball under a tree. Tom said, \"Let's "
        "play!\" They ran and laughed until the sun went down.";
    int32_t *ids;
    size_t n;
    if (rt_tokenize(rt_model_tokenizer(f.m), text, strlen(text), false, false, &ids, &n) != 0)
        return -1;
    f.prompt[0] = 1;
    for (int i = 1; i < N_PROMPT; i++)
        f.prompt[i] = ids[(size_t)(i - 1) % n];
    free(ids);
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    rt_model_destroy(f->m);
    return 0;
}

/* Prefills the prompt in chunks under a policy; logits of the last token. */
static void prefill(fixture *f, const rt_attn_policy *pol, int chunk, float *logits,
                    rt_attn_stats *st)
{
    rt_kv *kv = rt_kv_create(f->m, N_PROMPT);
    assert_non_null(kv);
    memset(st, 0, sizeof(*st));
    char err[256];
    for (int i = 0; i < N_PROMPT; i += chunk) {
        const int n = N_PROMPT - i < chunk ? N_PROMPT - i : chunk;
        rt_seq_batch b = {.kv = kv,
                          .tokens = f->prompt + i,
                          .n_tokens = n,
                          .logits = i + n == N_PROMPT ? logits : NULL,
                          .policy = pol,
                          .stats = st};
        assert_int_equal(rt_forward(f->m, &b, 1, err, sizeof(err)), 0);
    }
    rt_kv_destroy(kv);
}

static double kl_divergence(const float *p_logits, const float *q_logits, int n)
{
    double mp = -INFINITY, mq = -INFINITY, zp = 0, zq = 0, kl = 0;
    for (int i = 0; i < n; i++) {
        mp = fmax(mp, p_logits[i]);
        mq = fmax(mq, q_logits[i]);
    }
    for (int i = 0; i < n; i++) {
        zp += exp(p_logits[i] - mp);
        zq += exp(q_logits[i] - mq);
    }
    for (int i = 0; i < n; i++) {
        const double lp = p_logits[i] - mp - log(zp), lq = q_logits[i] - mq - log(zq);
        kl += exp(lp) * (lp - lq);
    }
    return kl;
}

static rt_attn_policy flex_policy(float gamma)
{
    rt_attn_policy p;
    memset(&p, 0, sizeof(p));
    p.prefill = RT_PREFILL_FLEX;
    kern_flex_params_default(&p.flex);
    p.flex.gamma = gamma;
    p.flex.block_size = 32;
    p.flex.min_budget = 64;
    return p;
}

static void test_flex_gamma_1_equals_dense(void **state)
{
    fixture *f = *state;
    float dense[512], flex[512];
    rt_attn_stats sd, sf;
    prefill(f, NULL, 512, dense, &sd);
    rt_attn_policy p = flex_policy(1.0f);
    prefill(f, &p, 512, flex, &sf);
    assert_int_equal(rt_argmax(dense, f->n_vocab), rt_argmax(flex, f->n_vocab));
    double max_diff = 0;
    for (int i = 0; i < f->n_vocab; i++)
        max_diff = fmax(max_diff, fabs((double)dense[i] - flex[i]));
    fprintf(stderr, "flex gamma 1: density %.3f, max |logit diff| vs dense %.2e\n",
            (double)sf.computed / (double)sf.causal, max_diff);
    assert_true(sf.computed == sf.causal);
    assert_true(max_diff < 1e-3);
}

static void test_flex_gamma_09_is_sparse_and_close_to_dense(void **state)
{
    fixture *f = *state;
    float dense[512], flex[512];
    rt_attn_stats sd, sf;
    prefill(f, NULL, 512, dense, &sd);
    rt_attn_policy p = flex_policy(0.9f);
    prefill(f, &p, 512, flex, &sf);
    const double density = (double)sf.computed / (double)sf.causal;
    const double kl = kl_divergence(dense, flex, f->n_vocab);
    fprintf(stderr, "flex gamma 0.9: density %.3f, KL(dense || flex) %.3e, sparse chunks %lld\n",
            density, kl, (long long)sf.sparse_chunks);
    assert_true(density < 0.9);
    assert_true(sf.sparse_chunks > 0);
    /* Measured 2026-11-30 on this prompt: density 0.183, KL 9.45e-3 (the
     * chosen token agrees). The bound is twice that: room for kernel changes,
     * not for a broken selection. */
    assert_true(kl < 0.02);
    assert_int_equal(rt_argmax(dense, f->n_vocab), rt_argmax(flex, f->n_vocab));
}

static void test_flex_works_with_chunked_prefill(void **state)
{
    fixture *f = *state;
    float dense[512], flex[512];
    rt_attn_stats sd, sf;
    prefill(f, NULL, 512, dense, &sd);
    rt_attn_policy p = flex_policy(1.0f);
    prefill(f, &p, 300, flex, &sf); /* chunks that start mid-block */
    assert_int_equal(rt_argmax(dense, f->n_vocab), rt_argmax(flex, f->n_vocab));
    p = flex_policy(0.9f);
    prefill(f, &p, 300, flex, &sf);
    assert_true(sf.computed < sf.causal);
    assert_true(kl_divergence(dense, flex, f->n_vocab) < 0.02);
}

static void test_power_with_full_window_equals_dense(void **state)
{
    fixture *f = *state;
    float dense[512], power[512];
    rt_attn_stats sd, sp;
    prefill(f, NULL, 512, dense, &sd);
    rt_attn_policy p;
    memset(&p, 0, sizeof(p));
    p.prefill = RT_PREFILL_POWER;
    p.power.block_size = 32;
    p.power.window_blocks = N_PROMPT / 32 + 1; /* the window covers everything */
    p.power_dense_count = 0;
    p.power_period = 1;
    prefill(f, &p, 512, power, &sp);
    assert_true(sp.computed == sp.causal);
    assert_int_equal(rt_argmax(dense, f->n_vocab), rt_argmax(power, f->n_vocab));
    /* The default pattern is sparse and its dense layers are counted. */
    kern_power_params_default(&p.power);
    p.power.block_size = 32;
    p.power_dense_count = 2;
    p.power_period = 7;
    prefill(f, &p, 512, power, &sp);
    const double density = (double)sp.computed / (double)sp.causal;
    fprintf(stderr, "power (W=5, B=32, 2 of 7 dense): density %.3f, KL %.3e\n", density,
            kl_divergence(dense, power, f->n_vocab));
    assert_true(density < 1.0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flex_gamma_1_equals_dense),
        cmocka_unit_test(test_flex_gamma_09_is_sparse_and_close_to_dense),
        cmocka_unit_test(test_flex_works_with_chunked_prefill),
        cmocka_unit_test(test_power_with_full_window_equals_dense),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
