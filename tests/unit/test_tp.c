/*
 * test_tp.c - tensor parallelism on the CPU (runtime/tp.c): stories260K (8
 * heads, 4 KV heads, FFN 172) split over 2 and 4 ranks gives the greedy
 * tokens of one rank - and llama.cpp's golden ones - on every golden prompt,
 * alone, batched, in chunks and in a paged pool; its logits stay within 1e-4
 * of one rank's; the sparse prefill policies select the same blocks; and a
 * split that does not divide the heads is refused. A copy of the model with
 * Q8_0 output and F16 down projections (the slices a rank copies at load)
 * splits over 2 ranks with tp 1's results and refuses 4 (16 columns are not
 * a Q8_0 block). Also the strided-weight product the ranks use for their F32
 * column slices.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/quant.h"
#include "runtime/gguf.h"
#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/common/testutil.h"

#define N_GEN 32
#define N_TP 3 /* tp 1, 2, 4 */

static const int tp_of[N_TP] = {1, 2, 4};

typedef struct {
    rt_model *m[N_TP];
    json_t *golden;
    int n_vocab;
} fixture;

static rt_model *load(int tp, int threads, char *err, size_t errlen)
{
    rt_model *m = NULL;
    rt_model_opts o = {.n_threads = threads, .max_batch_tokens = 512, .n_ctx = 0, .tp = tp};
    if (rt_model_load(&m, tu_shared_path("models/stories260K.gguf"), &o, err, errlen) != 0)
        return NULL;
    return m;
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    char err[512];
    for (int i = 0; i < N_TP; i++) {
        /* One compute thread per rank. */
        f->m[i] = load(tp_of[i], tp_of[i], err, sizeof(err));
        if (!f->m[i]) {
            fprintf(stderr, "load tp %d: %s\n", tp_of[i], err);
            return -1;
        }
    }
    f->n_vocab = rt_model_hparams(f->m[0])->n_vocab;
    f->golden = tu_load_json("golden/stories260K-greedy.json");
    if (!f->golden)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    for (int i = 0; i < N_TP; i++)
        rt_model_destroy(f->m[i]);
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

static json_t *golden_case(fixture *f, size_t i, int32_t *prompt, int *np, int32_t *want)
{
    json_t *c = json_array_get(json_object_get(f->golden, "cases"), i);
    *np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
    assert_int_equal(json_ids(json_object_get(c, "completion_token_ids"), want, 64), N_GEN);
    return c;
}

/* Greedy generation of one sequence in a private cache, prefill in chunks. */
static void generate(rt_model *m, const int32_t *prompt, int n_prompt, int chunk, int32_t *out)
{
    const int n_vocab = rt_model_hparams(m)->n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)n_vocab);
    rt_kv *kv = rt_kv_create(m, n_prompt + N_GEN);
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
    for (int t = 0; t < N_GEN; t++) {
        out[t] = rt_argmax(logits, n_vocab);
        if (t + 1 == N_GEN)
            break;
        rt_seq_batch b = {.kv = kv, .tokens = &out[t], .n_tokens = 1, .logits = logits};
        assert_int_equal(rt_forward(m, &b, 1, err, sizeof(err)), 0);
    }
    rt_kv_destroy(kv);
    free(logits);
}

static void expect_tokens(const int32_t *got, const int32_t *want, const char *what, int tp,
                          size_t prompt)
{
    for (int t = 0; t < N_GEN; t++)
        if (got[t] != want[t]) {
            fprintf(stderr, "tp %d, prompt %zu: token %d is %d, %s has %d\n", tp, prompt, t, got[t],
                    what, want[t]);
            fail();
        }
}

static void test_tp_greedy_matches_tp1_and_golden_for_every_prompt(void **state)
{
    fixture *f = *state;
    const size_t n_cases = json_array_size(json_object_get(f->golden, "cases"));
    assert_true(n_cases > 0);
    for (size_t i = 0; i < n_cases; i++) {
        int32_t prompt[256], want[64], one[N_GEN], got[N_GEN];
        int np;
        golden_case(f, i, prompt, &np, want);
        generate(f->m[0], prompt, np, np, one);
        expect_tokens(one, want, "golden", 1, i);
        for (int k = 1; k < N_TP; k++) {
            generate(f->m[k], prompt, np, np, got);
            expect_tokens(got, one, "tp 1", tp_of[k], i);
            expect_tokens(got, want, "golden", tp_of[k], i);
        }
    }
}

/* Teacher-forced on the golden continuation, so both runs see the same
 * tokens: every step's logits of tp 2 (and 4) within 1e-4 of tp 1's. */
static void test_tp_logits_within_1e_4_of_tp1(void **state)
{
    fixture *f = *state;
    const size_t n_cases = json_array_size(json_object_get(f->golden, "cases"));
    float *ref = malloc(sizeof(float) * (size_t)f->n_vocab);
    float *lg = malloc(sizeof(float) * (size_t)f->n_vocab);
    char err[256];
    for (int k = 1; k < N_TP; k++) {
        double worst = 0;
        for (size_t i = 0; i < n_cases; i++) {
            int32_t prompt[256], want[64];
            int np;
            golden_case(f, i, prompt, &np, want);
            rt_kv *kv1 = rt_kv_create(f->m[0], np + N_GEN);
            rt_kv *kvk = rt_kv_create(f->m[k], np + N_GEN);
            for (int t = -1; t < N_GEN - 1; t++) {
                const int32_t *toks = t < 0 ? prompt : &want[t];
                const int n = t < 0 ? np : 1;
                rt_seq_batch b1 = {.kv = kv1, .tokens = toks, .n_tokens = n, .logits = ref};
                rt_seq_batch bk = {.kv = kvk, .tokens = toks, .n_tokens = n, .logits = lg};
                assert_int_equal(rt_forward(f->m[0], &b1, 1, err, sizeof(err)), 0);
                assert_int_equal(rt_forward(f->m[k], &bk, 1, err, sizeof(err)), 0);
                for (int v = 0; v < f->n_vocab; v++)
                    worst = fmax(worst, fabs((double)ref[v] - (double)lg[v]));
            }
            rt_kv_destroy(kv1);
            rt_kv_destroy(kvk);
        }
        fprintf(stderr, "tp %d: max |logit - tp 1 logit| over all golden steps %.2e\n", tp_of[k],
                worst);
        assert_true(worst <= 1e-4);
    }
    free(ref);
    free(lg);
}

/* All golden prompts prefilled, then decoded, together in one flat batch. */
static void test_tp_batched_sequences_match_golden(void **state)
{
    fixture *f = *state;
    json_t *cases = json_object_get(f->golden, "cases");
    const int ns = (int)json_array_size(cases);
    assert_true(ns <= 16);
    for (int k = 1; k < N_TP; k++) {
        rt_model *m = f->m[k];
        int32_t prompts[16][256], want[16][64], got[16][N_GEN];
        int np[16];
        rt_kv *kv[16];
        float *logits[16];
        rt_seq_batch b[16];
        for (int s = 0; s < ns; s++) {
            golden_case(f, (size_t)s, prompts[s], &np[s], want[s]);
            kv[s] = rt_kv_create(m, np[s] + N_GEN);
            logits[s] = malloc(sizeof(float) * (size_t)f->n_vocab);
            b[s] = (rt_seq_batch){
                .kv = kv[s], .tokens = prompts[s], .n_tokens = np[s], .logits = logits[s]};
        }
        char err[256];
        assert_int_equal(rt_forward(m, b, ns, err, sizeof(err)), 0);
        for (int t = 0; t < N_GEN; t++) {
            for (int s = 0; s < ns; s++) {
                got[s][t] = rt_argmax(logits[s], f->n_vocab);
                b[s] = (rt_seq_batch){
                    .kv = kv[s], .tokens = &got[s][t], .n_tokens = 1, .logits = logits[s]};
            }
            if (t + 1 < N_GEN)
                assert_int_equal(rt_forward(m, b, ns, err, sizeof(err)), 0);
        }
        for (int s = 0; s < ns; s++) {
            expect_tokens(got[s], want[s], "golden", tp_of[k], (size_t)s);
            rt_kv_destroy(kv[s]);
            free(logits[s]);
        }
    }
}

/* Chunked prefill into a private cache, and several sequences prefilled in
 * chunks of 3 into a shared paged pool whose blocks are scattered and
 * interleaved between them, then decoded together. */
static void test_tp_chunked_prefill_and_paged_pool_match_golden(void **state)
{
    fixture *f = *state;
    for (int k = 1; k < N_TP; k++) {
        rt_model *m = f->m[k];
        int32_t prompt[256], want[64], got[N_GEN];
        int np;
        golden_case(f, 2, prompt, &np, want); /* 12-token prompt */
        for (int chunk = 1; chunk <= 5; chunk += 2) {
            generate(m, prompt, np, chunk, got);
            expect_tokens(got, want, "golden", tp_of[k], 2);
        }

        enum { NS = 4, BS = 4, NB = 80 };
        rt_kv_pool *pool = rt_kv_pool_create(m, NB, BS);
        assert_non_null(pool);
        int32_t prompts[NS][256], wants[NS][64], gots[NS][N_GEN], tables[NS][16];
        int nps[NS], past[NS];
        float *logits[NS];
        rt_seq_batch b[NS];
        for (int s = 0; s < NS; s++) {
            golden_case(f, (size_t)s + 3, prompts[s], &nps[s], wants[s]);
            for (int j = 0; j < 16; j++) /* block j of sequence s: interleaved, descending */
                tables[s][j] = NB - 1 - (j * NS + s);
            logits[s] = malloc(sizeof(float) * (size_t)f->n_vocab);
            past[s] = 0;
        }
        char err[256];
        for (int done = 0; done < NS;) {
            int nb = 0;
            done = 0;
            for (int s = 0; s < NS; s++) {
                if (past[s] >= nps[s]) {
                    done++;
                    continue;
                }
                const int n = nps[s] - past[s] < 3 ? nps[s] - past[s] : 3;
                b[nb++] = (rt_seq_batch){.tokens = prompts[s] + past[s],
                                         .n_tokens = n,
                                         .logits = past[s] + n == nps[s] ? logits[s] : NULL,
                                         .pool = pool,
                                         .blocks = tables[s],
                                         .n_blocks = 16,
                                         .n_past = past[s]};
                past[s] += n;
            }
            if (nb)
                assert_int_equal(rt_forward(m, b, nb, err, sizeof(err)), 0);
        }
        for (int t = 0; t < N_GEN; t++) {
            for (int s = 0; s < NS; s++) {
                gots[s][t] = rt_argmax(logits[s], f->n_vocab);
                b[s] = (rt_seq_batch){.tokens = &gots[s][t],
                                      .n_tokens = 1,
                                      .logits = logits[s],
                                      .pool = pool,
                                      .blocks = tables[s],
                                      .n_blocks = 16,
                                      .n_past = past[s]++};
            }
            if (t + 1 < N_GEN)
                assert_int_equal(rt_forward(m, b, NS, err, sizeof(err)), 0);
        }
        for (int s = 0; s < NS; s++) {
            expect_tokens(gots[s], wants[s], "golden", tp_of[k], (size_t)s + 3);
            free(logits[s]);
        }
        rt_kv_pool_destroy(pool);
    }
}

/* A batch the step refuses is refused before any rank starts, and the model
 * keeps working. */
static void test_tp_rejects_bad_batches_and_keeps_working(void **state)
{
    fixture *f = *state;
    rt_model *m = f->m[1];
    rt_kv *kv = rt_kv_create(m, 4);
    char err[256];
    int32_t bad_token = 512;
    rt_seq_batch b = {.kv = kv, .tokens = &bad_token, .n_tokens = 1};
    assert_int_equal(rt_forward(m, &b, 1, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "outside the vocabulary"));
    assert_int_equal(rt_kv_len(kv), 0);
    rt_kv_destroy(kv);
    int32_t prompt[256], want[64], got[N_GEN];
    int np;
    golden_case(f, 0, prompt, &np, want);
    generate(m, prompt, np, np, got);
    expect_tokens(got, want, "golden", 2, 0);
}

static void test_tp_refuses_splits_that_do_not_divide_the_heads(void **state)
{
    (void)state;
    char err[512];
    /* 8 heads, 4 KV heads: 3 divides neither, 8 not the KV heads. */
    const int bad[] = {3, 8};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = 0;
        assert_null(load(bad[i], 1, err, sizeof(err)));
        fprintf(stderr, "tp %d: %s\n", bad[i], err);
        char want[32];
        snprintf(want, sizeof(want), "tp %d", bad[i]);
        assert_non_null(strstr(err, want));
        assert_non_null(strstr(err, "heads"));
    }
    const int out_of_range[] = {9, -1};
    for (size_t i = 0; i < 2; i++) {
        assert_null(load(out_of_range[i], 1, err, sizeof(err)));
        assert_non_null(strstr(err, "out of range"));
    }
}

/* ---- sparse prefill policies under tp ---- */

#define N_LONG 600

static void long_prompt(const rt_model *m, int32_t *out)
{
    static const char *text =
        " Once upon a time, there was a little girl named Lily. She loved to play outside in the "
        "park with her friends. One day, she saw a big red ball under a tree. Tom said, \"Let's "
        "play!\" They ran and laughed until the sun went down.";
    int32_t *ids;
    size_t n;
    assert_int_equal(rt_tokenize(rt_model_tokenizer(m), text, strlen(text), false, false, &ids, &n),
                     0);
    out[0] = 1;
    for (int i = 1; i < N_LONG; i++)
        out[i] = ids[(size_t)(i - 1) % n];
    free(ids);
}

static void prefill(rt_model *m, const int32_t *prompt, const rt_attn_policy *pol, int chunk,
                    float *logits, rt_attn_stats *st)
{
    rt_kv *kv = rt_kv_create(m, N_LONG);
    assert_non_null(kv);
    memset(st, 0, sizeof(*st));
    char err[256];
    for (int i = 0; i < N_LONG; i += chunk) {
        const int n = N_LONG - i < chunk ? N_LONG - i : chunk;
        rt_seq_batch b = {.kv = kv,
                          .tokens = prompt + i,
                          .n_tokens = n,
                          .logits = i + n == N_LONG ? logits : NULL,
                          .policy = pol,
                          .stats = st};
        assert_int_equal(rt_forward(m, &b, 1, err, sizeof(err)), 0);
    }
    rt_kv_destroy(kv);
}

static void test_tp_sparse_policies_select_as_tp1(void **state)
{
    fixture *f = *state;
    int32_t prompt[N_LONG];
    long_prompt(f->m[0], prompt);
    float *l1 = malloc(sizeof(float) * (size_t)f->n_vocab);
    float *lk = malloc(sizeof(float) * (size_t)f->n_vocab);
    rt_attn_policy flex, power;
    memset(&flex, 0, sizeof(flex));
    flex.prefill = RT_PREFILL_FLEX;
    kern_flex_params_default(&flex.flex);
    flex.flex.gamma = 0.9f;
    flex.flex.block_size = 32;
    flex.flex.min_budget = 64;
    memset(&power, 0, sizeof(power));
    power.prefill = RT_PREFILL_POWER;
    kern_power_params_default(&power.power);
    power.power.block_size = 32;
    power.power.window_blocks = 3;
    power.power_dense_count = 1;
    power.power_period = 3;
    for (int k = 1; k < N_TP; k++) {
        rt_attn_stats s1, sk;
        /* PowerAttention's pattern is static: the same blocks exactly. */
        prefill(f->m[0], prompt, &power, 256, l1, &s1);
        prefill(f->m[k], prompt, &power, 256, lk, &sk);
        assert_true(s1.computed < s1.causal);
        assert_true(sk.computed == s1.computed && sk.causal == s1.causal);
        assert_int_equal(sk.sparse_chunks, s1.sparse_chunks);
        assert_int_equal(sk.dense_chunks, s1.dense_chunks);
        assert_int_equal(rt_argmax(lk, f->n_vocab), rt_argmax(l1, f->n_vocab));
        /* FlexPrefill selects per head from the scores, which differ from tp
         * 1 only by the rounding of the split sums: the same paths, the same
         * causal count, and the same density to within a block or two. */
        prefill(f->m[0], prompt, &flex, 256, l1, &s1);
        prefill(f->m[k], prompt, &flex, 256, lk, &sk);
        const double d1 = (double)s1.computed / (double)s1.causal;
        const double dk = (double)sk.computed / (double)sk.causal;
        fprintf(stderr, "tp %d: flex density %.4f (tp 1: %.4f), sparse chunks %lld\n", tp_of[k], dk,
                d1, (long long)sk.sparse_chunks);
        assert_true(s1.sparse_chunks > 0 && d1 < 0.9);
        assert_true(sk.causal == s1.causal);
        assert_int_equal(sk.sparse_chunks, s1.sparse_chunks);
        assert_int_equal(sk.dense_chunks, s1.dense_chunks);
        assert_true(fabs(dk - d1) < 0.01);
        assert_int_equal(rt_argmax(lk, f->n_vocab), rt_argmax(l1, f->n_vocab));
    }
    free(l1);
    free(lk);
}

/* ---- quantized column slices ---- */

static void put_bytes(FILE *fp, const void *p, size_t n)
{
    assert_int_equal(fwrite(p, 1, n, fp), n);
}
static void put_u32(FILE *fp, uint32_t v)
{
    put_bytes(fp, &v, 4);
}
static void put_u64(FILE *fp, uint64_t v)
{
    put_bytes(fp, &v, 8);
}
static void put_pad(FILE *fp, long align)
{
    static const uint8_t zeros[64];
    const long at = ftell(fp);
    put_bytes(fp, zeros, (size_t)((align - at % align) % align));
}

/* The type a tensor of the copy gets: attn_output Q8_0 (rows of 64 = two
 * blocks), ffn_down F16 (rows of 172, no 32-block split), the rest as is. */
static uint32_t copy_type(const rt_gguf_tensor *t)
{
    char name[96];
    snprintf(name, sizeof(name), "%.*s", (int)t->name.len, t->name.ptr);
    if (t->n_dims == 2 && t->type == RT_GGML_F32) {
        if (strstr(name, "attn_output"))
            return RT_GGML_Q8_0;
        if (strstr(name, "ffn_down"))
            return RT_GGML_F16;
    }
    return t->type;
}

/* Writes stories260K with copy_type's tensor types to path: the header and
 * metadata bytes verbatim, new tensor infos, re-encoded data. */
static void write_quantized_copy(const char *path)
{
    rt_gguf *g;
    char err[256];
    assert_int_equal(rt_gguf_open(&g, tu_shared_path("models/stories260K.gguf"), err, sizeof(err)),
                     0);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    const long align = (long)g->alignment;
    const uint8_t *infos = (const uint8_t *)g->tensors[0].name.ptr - 8;
    put_bytes(fp, g->base, (size_t)(infos - g->base));
    uint64_t off = 0;
    size_t *bytes = calloc(g->n_tensors, sizeof(size_t));
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const rt_gguf_tensor *t = &g->tensors[i];
        const uint32_t type = copy_type(t);
        bytes[i] = type == (uint32_t)t->type
                       ? (size_t)t->nbytes
                       : kern_row_bytes((int)type, (int64_t)t->ne[0]) * (size_t)t->ne[1];
        assert_true(bytes[i] > 0);
        put_u64(fp, t->name.len);
        put_bytes(fp, t->name.ptr, t->name.len);
        put_u32(fp, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++)
            put_u64(fp, t->ne[d]);
        put_u32(fp, type);
        put_u64(fp, off);
        off += ((uint64_t)bytes[i] + (uint64_t)align - 1) / (uint64_t)align * (uint64_t)align;
    }
    put_pad(fp, align);
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const rt_gguf_tensor *t = &g->tensors[i];
        const uint32_t type = copy_type(t);
        if (type == (uint32_t)t->type) {
            put_bytes(fp, t->data, bytes[i]);
        } else {
            const size_t rb = kern_row_bytes((int)type, (int64_t)t->ne[0]);
            uint8_t *row = malloc(rb);
            for (uint64_t r = 0; r < t->ne[1]; r++) {
                assert_int_equal(kern_quant_row((int)type, (const float *)t->data + r * t->ne[0],
                                                row, (size_t)t->ne[0]),
                                 0);
                put_bytes(fp, row, rb);
            }
            free(row);
        }
        put_pad(fp, align);
    }
    free(bytes);
    assert_int_equal(fclose(fp), 0);
    rt_gguf_close(g);
}

static void test_tp_quantized_slices_match_tp1(void **state)
{
    fixture *f = *state;
    char path[] = "/tmp/sieve_test_tp_XXXXXX";
    const int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    write_quantized_copy(path);
    char err[512];
    rt_model *m[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) {
        rt_model_opts o = {.n_threads = i + 1, .max_batch_tokens = 64, .tp = i + 1};
        if (rt_model_load(&m[i], path, &o, err, sizeof(err)) != 0)
            fprintf(stderr, "load tp %d: %s\n", i + 1, err);
        assert_non_null(m[i]);
    }
    /* 4 ranks would hold 16 columns of each attn_output row: half a Q8_0 block. */
    rt_model *m4 = NULL;
    rt_model_opts o4 = {.n_threads = 1, .max_batch_tokens = 64, .tp = 4};
    assert_int_equal(rt_model_load(&m4, path, &o4, err, sizeof(err)), -1);
    assert_null(m4);
    fprintf(stderr, "tp 4: %s\n", err);
    assert_non_null(strstr(err, "attn_output"));
    assert_non_null(strstr(err, "Q8_0"));
    unlink(path);

    const size_t n_cases = json_array_size(json_object_get(f->golden, "cases"));
    float *l1 = malloc(sizeof(float) * (size_t)f->n_vocab);
    float *l2 = malloc(sizeof(float) * (size_t)f->n_vocab);
    double worst = 0;
    for (size_t i = 0; i < n_cases; i++) {
        int32_t prompt[256], want[64], one[N_GEN], got[N_GEN];
        int np;
        golden_case(f, i, prompt, &np, want);
        generate(m[0], prompt, np, np, one);
        generate(m[1], prompt, np, np, got);
        expect_tokens(got, one, "tp 1", 2, i);
        rt_kv *kv1 = rt_kv_create(m[0], np), *kv2 = rt_kv_create(m[1], np);
        rt_seq_batch b1 = {.kv = kv1, .tokens = prompt, .n_tokens = np, .logits = l1};
        rt_seq_batch b2 = {.kv = kv2, .tokens = prompt, .n_tokens = np, .logits = l2};
        assert_int_equal(rt_forward(m[0], &b1, 1, err, sizeof(err)), 0);
        assert_int_equal(rt_forward(m[1], &b2, 1, err, sizeof(err)), 0);
        for (int v = 0; v < f->n_vocab; v++)
            worst = fmax(worst, fabs((double)l1[v] - (double)l2[v]));
        rt_kv_destroy(kv1);
        rt_kv_destroy(kv2);
    }
    fprintf(stderr, "Q8_0/F16 copy, tp 2: max |logit - tp 1 logit| %.2e\n", worst);
    assert_true(worst <= 1e-4);
    free(l1);
    free(l2);
    rt_model_destroy(m[0]);
    rt_model_destroy(m[1]);
}

/* ---- the strided product ---- */

static void test_matmul_f32_ldw_matches_reference_on_column_slices(void **state)
{
    (void)state;
    enum { N = 48, LDW = 200, MAXM = 40 };
    float *w = malloc(sizeof(float) * N * LDW), *x = malloc(sizeof(float) * MAXM * LDW);
    float *slice = malloc(sizeof(float) * N * LDW);
    float *y = malloc(sizeof(float) * MAXM * N), *ref = malloc(sizeof(float) * MAXM * N);
    uint32_t seed = 12345;
    for (int i = 0; i < N * LDW; i++) {
        seed = seed * 1664525u + 1013904223u;
        w[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
    for (int i = 0; i < MAXM * LDW; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
    kern_pool *pool = kern_pool_create(2);
    /* Column ranges of w: aligned multiples of 8, odd widths, the last columns. */
    const int c0s[] = {0, 8, 3, 157, 100};
    const int ks[] = {64, 43, 86, 43, 100};
    const int ms[] = {1, 5, 40};
    for (size_t c = 0; c < sizeof(c0s) / sizeof(c0s[0]); c++) {
        const int c0 = c0s[c], K = ks[c];
        for (int n = 0; n < N; n++)
            memcpy(slice + (size_t)n * K, w + (size_t)n * LDW + c0, sizeof(float) * (size_t)K);
        for (size_t mi = 0; mi < sizeof(ms) / sizeof(ms[0]); mi++) {
            const int M = ms[mi];
            kern_matmul_f32_ldw(pool, y, N, x, LDW, w + c0, LDW, M, N, K);
            kern_matmul_ref(ref, N, x, LDW, slice, M, N, K);
            for (int i = 0; i < M * N; i++)
                assert_true(fabsf(y[i] - ref[i]) <= 1e-5f * (float)K);
            /* The contiguous form agrees with ldw == K. */
            kern_matmul_f32(pool, ref, N, x, LDW, slice, M, N, K);
            kern_matmul_f32_ldw(pool, y, N, x, LDW, slice, K, M, N, K);
            assert_memory_equal(y, ref, sizeof(float) * (size_t)M * N);
        }
    }
    kern_pool_destroy(pool);
    free(w);
    free(x);
    free(slice);
    free(y);
    free(ref);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tp_greedy_matches_tp1_and_golden_for_every_prompt),
        cmocka_unit_test(test_tp_logits_within_1e_4_of_tp1),
        cmocka_unit_test(test_tp_batched_sequences_match_golden),
        cmocka_unit_test(test_tp_chunked_prefill_and_paged_pool_match_golden),
        cmocka_unit_test(test_tp_rejects_bad_batches_and_keeps_working),
        cmocka_unit_test(test_tp_refuses_splits_that_do_not_divide_the_heads),
        cmocka_unit_test(test_tp_sparse_policies_select_as_tp1),
        cmocka_unit_test(test_tp_quantized_slices_match_tp1),
        cmocka_unit_test(test_matmul_f32_ldw_matches_reference_on_column_slices),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
