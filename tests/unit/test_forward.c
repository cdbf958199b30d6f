/*
 * test_forward.c - the CPU forward pass against llama.cpp's greedy references
 * (shared/golden/stories260K-greedy.json), and the properties that batching
 * and chunked prefill must keep exactly.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/common/testutil.h"

#define N_GEN 32

typedef struct {
    rt_model *model;
    json_t *golden;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    char err[512];
    rt_model_opts o = {.n_threads = 2, .max_batch_tokens = 512, .n_ctx = 0};
    if (rt_model_load(&f->model, tu_shared_path("models/stories260K.gguf"), &o, err, sizeof(err)) !=
        0) {
        fprintf(stderr, "load: %s\n", err);
        return -1;
    }
    f->golden = tu_load_json("golden/stories260K-greedy.json");
    if (!f->golden)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    rt_model_destroy(f->model);
    json_decref(f->golden);
    free(f);
    return 0;
}

static int json_ids(json_t *arr, int32_t *out, int cap)
{
    int n = (int)json_array_size(arr);
    assert_true(n <= cap);
    for (int i = 0; i < n; i++)
        out[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return n;
}

/* Greedy generation of one sequence: prefill in chunks of `chunk` tokens. */
static void generate(rt_model *m, const int32_t *prompt, int n_prompt, int chunk, int32_t *out,
                     int n_gen)
{
    const int n_vocab = rt_model_hparams(m)->n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)n_vocab);
    rt_kv *kv = rt_kv_create(m, n_prompt + n_gen);
    assert_non_null(kv);
    char err[256];
    for (int i = 0; i < n_prompt; i += chunk) {
        const int n = n_prompt - i < chunk ? n_prompt - i : chunk;
        rt_seq_batch b = {.kv = kv,
                          .tokens = prompt + i,
                          .n_tokens = n,
                          .logits = i + n == n_prompt ? logits : NULL};
        assert_int_equal(rt_forward(m, &b, 1, err, sizeof(err)), 0);
    }
    for (int t = 0; t < n_gen; t++) {
        out[t] = rt_argmax(logits, n_vocab);
        if (t + 1 == n_gen)
            break;
        rt_seq_batch b = {.kv = kv, .tokens = &out[t], .n_tokens = 1, .logits = logits};
        assert_int_equal(rt_forward(m, &b, 1, err, sizeof(err)), 0);
    }
    rt_kv_destroy(kv);
    free(logits);
}

static void test_forward_greedy_matches_golden_for_every_prompt(void **state)
{
    fixture *f = *state;
    json_t *cases = json_object_get(f->golden, "cases");
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c)
    {
        int32_t prompt[256], want[64], got[N_GEN];
        const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
        const int nw = json_ids(json_object_get(c, "completion_token_ids"), want, 64);
        assert_int_equal(nw, N_GEN);
        generate(f->model, prompt, np, np, got, N_GEN);
        for (int t = 0; t < N_GEN; t++)
            if (got[t] != want[t]) {
                fprintf(stderr, "prompt %zu ('%s'): token %d is %d, golden %d\n", i,
                        json_string_value(json_object_get(c, "prompt")), t, got[t], want[t]);
                fail();
            }
    }
}

static void test_forward_tokenizer_gives_golden_prompt_ids(void **state)
{
    fixture *f = *state;
    const rt_tokenizer *tok = rt_model_tokenizer(f->model);
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(f->golden, "cases"), i, c)
    {
        int32_t want[256];
        const int nw = json_ids(json_object_get(c, "prompt_token_ids"), want, 256);
        const char *p = json_string_value(json_object_get(c, "prompt"));
        int32_t *ids;
        size_t n;
        assert_int_equal(rt_tokenize(tok, p, strlen(p), true, true, &ids, &n), 0);
        assert_int_equal((int)n, nw);
        assert_memory_equal(ids, want, sizeof(int32_t) * n);
        free(ids);
    }
}

/* Chunked prefill must give the same tokens as one prefill. */
static void test_forward_chunked_prefill_matches_golden(void **state)
{
    fixture *f = *state;
    json_t *c = json_array_get(json_object_get(f->golden, "cases"), 2); /* 12-token prompt */
    int32_t prompt[256], want[64], got[N_GEN];
    const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
    json_ids(json_object_get(c, "completion_token_ids"), want, 64);
    for (int chunk = 1; chunk <= 5; chunk += 2) {
        generate(f->model, prompt, np, chunk, got, N_GEN);
        assert_memory_equal(got, want, sizeof(got));
    }
}

/* All golden prompts prefilled and decoded together in one flat batch give
 * each one its own golden continuation. */
static void test_forward_batched_sequences_match_golden(void **state)
{
    fixture *f = *state;
    json_t *cases = json_object_get(f->golden, "cases");
    const int ns = (int)json_array_size(cases);
    const int n_vocab = rt_model_hparams(f->model)->n_vocab;
    int32_t prompts[16][256], want[16][64], got[16][N_GEN];
    int np[16];
    rt_kv *kv[16];
    float *logits[16];
    rt_seq_batch b[16];
    assert_true(ns <= 16);
    for (int s = 0; s < ns; s++) {
        json_t *c = json_array_get(cases, (size_t)s);
        np[s] = json_ids(json_object_get(c, "prompt_token_ids"), prompts[s], 256);
        json_ids(json_object_get(c, "completion_token_ids"), want[s], 64);
        kv[s] = rt_kv_create(f->model, np[s] + N_GEN);
        logits[s] = malloc(sizeof(float) * (size_t)n_vocab);
        b[s] = (rt_seq_batch){
            .kv = kv[s], .tokens = prompts[s], .n_tokens = np[s], .logits = logits[s]};
    }
    char err[256];
    assert_int_equal(rt_forward(f->model, b, ns, err, sizeof(err)), 0);
    for (int t = 0; t < N_GEN; t++) {
        for (int s = 0; s < ns; s++) {
            got[s][t] = rt_argmax(logits[s], n_vocab);
            b[s] = (rt_seq_batch){
                .kv = kv[s], .tokens = &got[s][t], .n_tokens = 1, .logits = logits[s]};
        }
        if (t + 1 < N_GEN)
            assert_int_equal(rt_forward(f->model, b, ns, err, sizeof(err)), 0);
    }
    for (int s = 0; s < ns; s++) {
        assert_memory_equal(got[s], want[s], sizeof(int32_t) * N_GEN);
        rt_kv_destroy(kv[s]);
        free(logits[s]);
    }
}

/* The same sequences through a shared paged pool, with block tables whose
 * blocks are scattered and interleaved between sequences, give the golden
 * tokens: attention follows the tables exactly. */
static void test_forward_paged_pool_with_scattered_blocks_matches_golden(void **state)
{
    fixture *f = *state;
    json_t *cases = json_object_get(f->golden, "cases");
    const int n_vocab = rt_model_hparams(f->model)->n_vocab;
    enum { NS = 3, BS = 4, NB = 64 };
    rt_kv_pool *pool = rt_kv_pool_create(f->model, NB, BS);
    assert_non_null(pool);
    int32_t prompts[NS][256], want[NS][64], got[NS][N_GEN], tables[NS][16];
    int np[NS], past[NS];
    float *logits[NS];
    rt_seq_batch b[NS];
    for (int s = 0; s < NS; s++) {
        json_t *c = json_array_get(cases, (size_t)s + 1);
        np[s] = json_ids(json_object_get(c, "prompt_token_ids"), prompts[s], 256);
        json_ids(json_object_get(c, "completion_token_ids"), want[s], 64);
        for (int k = 0; k < 16; k++) /* block k of sequence s: interleaved, descending */
            tables[s][k] = NB - 1 - (k * NS + s);
        logits[s] = malloc(sizeof(float) * (size_t)n_vocab);
        past[s] = 0;
    }
    char err[256];
    /* Prefill in chunks of 3 tokens, all sequences in each step. */
    for (int done = 0; done < NS;) {
        int nb = 0;
        done = 0;
        for (int s = 0; s < NS; s++) {
            if (past[s] >= np[s]) {
                done++;
                continue;
            }
            const int n = np[s] - past[s] < 3 ? np[s] - past[s] : 3;
            b[nb++] = (rt_seq_batch){.tokens = prompts[s] + past[s],
                                     .n_tokens = n,
                                     .logits = past[s] + n == np[s] ? logits[s] : NULL,
                                     .pool = pool,
                                     .blocks = tables[s],
                                     .n_blocks = 16,
                                     .n_past = past[s]};
            past[s] += n;
        }
        if (nb)
            assert_int_equal(rt_forward(f->model, b, nb, err, sizeof(err)), 0);
    }
    for (int t = 0; t < N_GEN; t++) {
        for (int s = 0; s < NS; s++) {
            got[s][t] = rt_argmax(logits[s], n_vocab);
            b[s] = (rt_seq_batch){.tokens = &got[s][t],
                                  .n_tokens = 1,
                                  .logits = logits[s],
                                  .pool = pool,
                                  .blocks = tables[s],
                                  .n_blocks = 16,
                                  .n_past = past[s]++};
        }
        if (t + 1 < N_GEN)
            assert_int_equal(rt_forward(f->model, b, NS, err, sizeof(err)), 0);
    }
    for (int s = 0; s < NS; s++) {
        assert_memory_equal(got[s], want[s], sizeof(int32_t) * N_GEN);
        free(logits[s]);
    }
    /* A table pointing outside the pool is refused. */
    int32_t bad_table[1] = {NB};
    int32_t tok = 1;
    rt_seq_batch bad = {.tokens = &tok,
                        .n_tokens = 1,
                        .pool = pool,
                        .blocks = bad_table,
                        .n_blocks = 1,
                        .n_past = 0};
    assert_int_equal(rt_forward(f->model, &bad, 1, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "not in the pool"));
    rt_kv_pool_destroy(pool);
}

static void test_forward_rejects_out_of_range_batches(void **state)
{
    fixture *f = *state;
    rt_kv *kv = rt_kv_create(f->model, 4);
    char err[256];
    int32_t bad_token = 512;
    rt_seq_batch b = {.kv = kv, .tokens = &bad_token, .n_tokens = 1};
    assert_int_equal(rt_forward(f->model, &b, 1, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "outside the vocabulary"));
    int32_t five[5] = {1, 2, 3, 4, 5};
    b = (rt_seq_batch){.kv = kv, .tokens = five, .n_tokens = 5};
    assert_int_equal(rt_forward(f->model, &b, 1, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "cache holds 4"));
    assert_int_equal(rt_kv_len(kv), 0);
    assert_null(rt_kv_create(f->model, rt_model_n_ctx(f->model) + 1));
    rt_kv_destroy(kv);
}

static void test_model_load_refuses_missing_file(void **state)
{
    rt_model *m = NULL;
    char err[512];
    assert_int_equal(rt_model_load(&m, "/nonexistent/model.gguf", NULL, err, sizeof(err)), -1);
    assert_null(m);
    assert_non_null(strstr(err, "/nonexistent/model.gguf"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_greedy_matches_golden_for_every_prompt),
        cmocka_unit_test(test_forward_tokenizer_gives_golden_prompt_ids),
        cmocka_unit_test(test_forward_chunked_prefill_matches_golden),
        cmocka_unit_test(test_forward_batched_sequences_match_golden),
        cmocka_unit_test(test_forward_paged_pool_with_scattered_blocks_matches_golden),
        cmocka_unit_test(test_forward_rejects_out_of_range_batches),
        cmocka_unit_test(test_model_load_refuses_missing_file),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
