/*
 * test_kv_cache.c - compressed KV caches in the forward pass (runtime/kv_compress.c)
 * on the real stories260K model, against the fp cache: greedy agreement per
 * format (spec 3.6 item 7, issue 7's 95% for int8 and 85% for zip), pages of
 * mixed slot counts in one attention call against the double reference,
 * released fp blocks never read again, chunked prefill equal to one chunk,
 * and the capacity each format gives a pool block.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "kernels/kernels.h"
#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/common/testutil.h"

#define N_GEN 32
#define BS 16
#define FP_BLOCKS 64    /* fp table: blocks [0, 64) */
#define POOL_BLOCKS 256 /* compressed pages from block 64 on */

typedef struct {
    rt_model *model;
    rt_kv_pool *pool;
    json_t *golden;
    int n_vocab;
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
    f->pool = rt_kv_pool_create(f->model, POOL_BLOCKS, BS);
    f->golden = tu_load_json("golden/stories260K-greedy.json");
    if (!f->pool || !f->golden)
        return -1;
    f->n_vocab = rt_model_hparams(f->model)->n_vocab;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    rt_kv_pool_destroy(f->pool);
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

static rt_kv_policy policy(rt_kv_format fmt)
{
    rt_kv_policy p = {.format = fmt};
    if (fmt == RT_KV_ZIP) {
        p.salient_fraction = 0.6f;
        p.high_bits = 4;
        p.low_bits = 2;
    }
    return p;
}

/* A released block is filled with NaN: a kernel that still read it would
 * produce NaN logits, which run() refuses. */
static void poison_block(fixture *f, int32_t id)
{
    rt_kv_pool_fill_block(f->pool, id, NAN);
}

/*
 * One sequence through the forward pass on the fixture's pool: the prompt in
 * chunks of `chunk`, then n_gen decode steps fed with feed[t] when feed is
 * non-NULL (teacher forcing) or with the argmax. argmax[t] and top1[t] get
 * each step's greedy token and largest logit; logits_out (n_gen * n_vocab,
 * optional) every step's logits.
 */
static void run(fixture *f, const rt_kv_policy *pol, const int32_t *prompt, int np, int chunk,
                const int32_t *feed, int n_gen, int32_t *argmax, float *top1, float *logits_out)
{
    rt_model *m = f->model;
    const int nv = f->n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)nv);
    int32_t fp[FP_BLOCKS];
    for (int j = 0; j < FP_BLOCKS; j++)
        fp[j] = j;
    /* Pages as the scheduler's slab cuts them: each class fills its own
     * blocks from block FP_BLOCKS on, n_sub pages per block. */
    int next = FP_BLOCKS, cur_blk[RT_KVQ_MAX_CLASSES], cur_used[RT_KVQ_MAX_CLASSES];
    for (int c = 0; c < RT_KVQ_MAX_CLASSES; c++)
        cur_blk[c] = -1, cur_used[c] = 0;
    char err[256];
    rt_kvq *q = NULL;
    if (pol->format != RT_KV_FP) {
        q = rt_kvq_create(m, f->pool, pol, np, 0, 1234, err, sizeof(err));
        if (!q)
            fprintf(stderr, "rt_kvq_create: %s\n", err);
        assert_non_null(q);
    }
    int n_past = 0, released = 0;
    int32_t tok;
    for (;;) {
        const int32_t *toks;
        int n;
        if (n_past < np) {
            n = np - n_past < chunk ? np - n_past : chunk;
            toks = prompt + n_past;
        } else {
            const int t = n_past - np; /* generated so far */
            if (t >= n_gen)
                break;
            tok = feed ? feed[t] : argmax[t];
            toks = &tok;
            n = 1;
        }
        if (q) {
            int need[RT_KVQ_MAX_CLASSES];
            assert_true(rt_kvq_pages_needed(q, n_past, n, need) >= 0);
            for (int c = 0; c < RT_KVQ_MAX_CLASSES; c++) {
                int n_sub = 0;
                if (need[c] > 0)
                    assert_int_equal(rt_kvq_class_geom(f->pool, pol, c, NULL, &n_sub, NULL), 0);
                for (int i = 0; i < need[c]; i++) {
                    if (cur_blk[c] < 0 || cur_used[c] == n_sub) {
                        assert_true(next < POOL_BLOCKS);
                        cur_blk[c] = next++;
                        cur_used[c] = 0;
                    }
                    const int32_t id = cur_blk[c] * RT_KVQ_SUB + cur_used[c]++;
                    assert_int_equal(rt_kvq_add_pages(q, c, &id, 1), 0);
                }
            }
        }
        const bool want = n_past + n >= np;
        rt_seq_batch b = {.tokens = toks,
                          .n_tokens = n,
                          .logits = want ? logits : NULL,
                          .pool = f->pool,
                          .blocks = fp,
                          .n_blocks = (n_past + n + BS - 1) / BS,
                          .n_past = n_past,
                          .kvq = q};
        if (rt_forward(m, &b, 1, err, sizeof(err)) != 0)
            fail_msg("forward: %s", err);
        n_past += n;
        if (q) {
            /* What the scheduler does: release the fp blocks below the
             * compressed positions; here they are poisoned instead. */
            const int rel = rt_kvq_n_compressed(q) / BS;
            for (; released < rel; released++) {
                poison_block(f, fp[released]);
                fp[released] = -1;
            }
        }
        if (want) {
            const int t = n_past - np;
            if (t < n_gen) {
                argmax[t] = rt_argmax(logits, nv);
                float mx = -INFINITY;
                for (int i = 0; i < nv; i++)
                    mx = logits[i] > mx ? logits[i] : mx;
                assert_true(isfinite(mx));
                top1[t] = mx;
                if (logits_out)
                    memcpy(logits_out + (size_t)t * nv, logits, sizeof(float) * (size_t)nv);
            }
        }
    }
    rt_kvq_destroy(q);
    free(logits);
}

/* Teacher-forced agreement with the fp greedy tokens over every golden
 * prompt, and the mean top-1 logit difference. */
static void agreement(fixture *f, rt_kv_format fmt, double *agree, double *dlogit, double *prefix)
{
    json_t *cases = json_object_get(f->golden, "cases");
    size_t i;
    json_t *c;
    int same = 0, total = 0, pre = 0;
    double dsum = 0.0;
    json_array_foreach(cases, i, c)
    {
        int32_t prompt[256], fp_tok[N_GEN], q_tok[N_GEN], free_tok[N_GEN];
        float fp_top[N_GEN], q_top[N_GEN], free_top[N_GEN];
        const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
        const rt_kv_policy fpp = policy(RT_KV_FP), qp = policy(fmt);
        run(f, &fpp, prompt, np, 512, NULL, N_GEN, fp_tok, fp_top, NULL);
        run(f, &qp, prompt, np, 512, fp_tok, N_GEN, q_tok, q_top, NULL);
        run(f, &qp, prompt, np, 512, NULL, N_GEN, free_tok, free_top, NULL);
        for (int t = 0; t < N_GEN; t++) {
            same += q_tok[t] == fp_tok[t];
            dsum += fabs((double)q_top[t] - (double)fp_top[t]);
            total++;
        }
        int k = 0;
        while (k < N_GEN && free_tok[k] == fp_tok[k])
            k++;
        pre += k;
    }
    *agree = (double)same / total;
    *dlogit = dsum / total;
    *prefix = (double)pre / (double)json_array_size(cases);
}

static void test_fp_policy_run_matches_golden(void **state)
{
    fixture *f = *state;
    json_t *c = json_array_get(json_object_get(f->golden, "cases"), 0);
    int32_t prompt[256], want[64], got[N_GEN];
    float top[N_GEN];
    const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
    json_ids(json_object_get(c, "completion_token_ids"), want, 64);
    const rt_kv_policy p = policy(RT_KV_FP);
    run(f, &p, prompt, np, 512, NULL, N_GEN, got, top, NULL);
    assert_memory_equal(got, want, sizeof(int32_t) * N_GEN);
}

static void test_compressed_formats_follow_fp_greedy(void **state)
{
    fixture *f = *state;
    const struct {
        rt_kv_format fmt;
        double min_agree, max_dlogit;
    } cases[] = {
        {RT_KV_INT8, 0.95, 0.1},
        {RT_KV_INT4, 0.70, 1.5},
        {RT_KV_ZIP, 0.85, 0.5},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        double agree, dl, prefix;
        agreement(f, cases[i].fmt, &agree, &dl, &prefix);
        printf("kv %-5s teacher-forced agreement with fp %.4f, mean |top-1 logit diff| %.5f, "
               "free-running identical prefix %.1f of %d tokens\n",
               rt_kv_format_name(cases[i].fmt), agree, dl, prefix, N_GEN);
        assert_true(agree >= cases[i].min_agree);
        assert_true(dl <= cases[i].max_dlogit);
    }
}

/* A longer sequence: several flushes and pages of each class; no NaN (released
 * blocks are poisoned) and agreement stays high. */
static void test_long_sequence_flushes_and_frees_fp_blocks(void **state)
{
    fixture *f = *state;
    enum { NP = 70, NG = 200 };
    int32_t prompt[NP], fp_tok[NG], q_tok[NG];
    float fp_top[NG], q_top[NG];
    json_t *cases = json_object_get(f->golden, "cases");
    int n = 0;
    for (size_t i = 0; n < NP; i++) {
        json_t *c = json_array_get(cases, i % json_array_size(cases));
        int32_t ids[256];
        const int k = json_ids(json_object_get(c, "completion_token_ids"), ids, 256);
        for (int j = 0; j < k && n < NP; j++)
            prompt[n++] = ids[j];
    }
    prompt[0] = 1; /* BOS */
    const rt_kv_policy fpp = policy(RT_KV_FP);
    run(f, &fpp, prompt, NP, 512, NULL, NG, fp_tok, fp_top, NULL);
    const rt_kv_format fmts[] = {RT_KV_INT8, RT_KV_INT4, RT_KV_ZIP};
    for (int i = 0; i < 3; i++) {
        rt_kv_policy p = policy(fmts[i]);
        p.flush_tokens = 32;
        run(f, &p, prompt, NP, 512, fp_tok, NG, q_tok, q_top, NULL);
        int same = 0;
        for (int t = 0; t < NG; t++)
            same += q_tok[t] == fp_tok[t];
        printf("kv %-5s %d-token prompt, %d teacher-forced steps: agreement %.3f\n",
               rt_kv_format_name(fmts[i]), NP, NG, (double)same / NG);
        assert_true(same >= (fmts[i] == RT_KV_INT8 ? 0.9 : 0.7) * NG);
    }
}

/* Saliency probes scored chunk by chunk give what one chunk gives. */
static void test_zip_chunked_prefill_equals_one_chunk(void **state)
{
    fixture *f = *state;
    json_t *c = json_array_get(json_object_get(f->golden, "cases"), 2);
    int32_t prompt[256], a_tok[N_GEN], b_tok[N_GEN];
    float a_top[N_GEN], b_top[N_GEN];
    const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
    const int nv = f->n_vocab;
    float *la = malloc(sizeof(float) * N_GEN * (size_t)nv);
    float *lb = malloc(sizeof(float) * N_GEN * (size_t)nv);
    const rt_kv_policy p = policy(RT_KV_ZIP);
    run(f, &p, prompt, np, 512, NULL, N_GEN, a_tok, a_top, la);
    run(f, &p, prompt, np, 3, NULL, N_GEN, b_tok, b_top, lb);
    assert_memory_equal(a_tok, b_tok, sizeof(a_tok));
    double md = 0.0;
    for (size_t i = 0; i < (size_t)N_GEN * nv; i++)
        md = fmax(md, fabs((double)la[i] - lb[i]));
    /* The chunks' GEMMs round differently from one; the selection is the same. */
    assert_true(md < 1e-3);
    free(la);
    free(lb);
}

/* Each format's pages cut a pool block into n_sub pages of about 16 tokens:
 * n_sub aligned K pages and V pages fit the block's regions, one more slot
 * per page would not, and smaller formats hold more tokens per block. */
static void test_pages_cut_pool_blocks(void **state)
{
    fixture *f = *state;
    const rt_hparams *hp = rt_model_hparams(f->model);
    const kern_kvq_geom g0 = {hp->n_kv_heads, hp->head_dim, BS};
    const size_t region = (size_t)BS * g0.n_kv_heads * g0.head_dim * sizeof(float);
    const struct {
        rt_kv_format fmt;
        int cls;
        kern_kvq_fmt kf;
    } cases[] = {{RT_KV_INT8, 0, KERN_KVQ_Q8},
                 {RT_KV_INT4, 0, KERN_KVQ_Q4},
                 {RT_KV_ZIP, 0, KERN_KVQ_ZIP4},
                 {RT_KV_ZIP, 1, KERN_KVQ_ZIP2},
                 {RT_KV_ZIP, 2, KERN_KVQ_Q8}};
    int prev = BS;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const rt_kv_policy p = policy(cases[i].fmt);
        int fmt, n_sub, slots;
        assert_int_equal(rt_kvq_class_geom(f->pool, &p, cases[i].cls, &fmt, &n_sub, &slots), 0);
        assert_int_equal(fmt, (int)cases[i].kf);
        assert_true(n_sub >= 1 && n_sub <= RT_KVQ_SUB);
        assert_true(n_sub == 1 || slots >= 16);
        assert_int_equal(rt_kvq_block_tokens(f->pool, &p, cases[i].cls), n_sub * slots);
        kern_kvq_geom g = g0;
        g.block_size = slots;
        const size_t kb = (kern_kvq_page_bytes(cases[i].kf, KERN_KVQ_K, &g) + 15) / 16 * 16;
        const size_t vb = (kern_kvq_page_bytes(cases[i].kf, KERN_KVQ_V, &g) + 15) / 16 * 16;
        assert_true(kb * (size_t)n_sub <= region && vb * (size_t)n_sub <= region);
        g.block_size = slots + 1;
        const size_t kb1 = (kern_kvq_page_bytes(cases[i].kf, KERN_KVQ_K, &g) + 15) / 16 * 16;
        const size_t vb1 = (kern_kvq_page_bytes(cases[i].kf, KERN_KVQ_V, &g) + 15) / 16 * 16;
        assert_true(kb1 * (size_t)n_sub > region || vb1 * (size_t)n_sub > region);
        if (cases[i].cls < 2) {
            assert_true(n_sub * slots > prev);
            prev = n_sub * slots;
        }
    }
    const rt_kv_policy fp = policy(RT_KV_FP), i8 = policy(RT_KV_INT8), i4 = policy(RT_KV_INT4),
                       zp = policy(RT_KV_ZIP);
    const double bf = rt_kvq_bytes_per_token(f->pool, &fp);
    assert_true(fabs(bf - (double)rt_kv_bytes_per_token(f->model)) < 1e-9);
    assert_true(rt_kvq_bytes_per_token(f->pool, &i8) < bf);
    assert_true(rt_kvq_bytes_per_token(f->pool, &i4) < rt_kvq_bytes_per_token(f->pool, &i8));
    assert_true(rt_kvq_bytes_per_token(f->pool, &zp) < rt_kvq_bytes_per_token(f->pool, &i4));
}

static void test_policy_errors_are_clear(void **state)
{
    fixture *f = *state;
    char err[256];
    rt_kv_policy p = policy(RT_KV_ZIP);
    p.high_bits = 3;
    assert_int_equal(rt_kvq_check(f->model, f->pool, &p, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "bits"));
    p = policy(RT_KV_ZIP);
    p.salient_fraction = 1.5f;
    assert_int_equal(rt_kvq_check(f->model, f->pool, &p, err, sizeof(err)), -1);
    assert_null(rt_kvq_create(f->model, f->pool, &p, 10, 0, 1, err, sizeof(err)));
    p = policy(RT_KV_INT8);
    assert_null(rt_kvq_create(f->model, f->pool, &p, 0, 0, 1, err, sizeof(err)));
    assert_null(rt_kvq_create(f->model, f->pool, &p, 10, 10, 1, err, sizeof(err)));
    rt_kvq *q = rt_kvq_create(f->model, f->pool, &p, 10, 0, 1, err, sizeof(err));
    assert_non_null(q);
    int need[RT_KVQ_MAX_CLASSES];
    assert_int_equal(rt_kvq_pages_needed(q, 5, 1, need), -1); /* not the cache's length */
    const int total = rt_kvq_pages_needed(q, 0, 10, need);
    assert_int_equal(total, need[0]);
    assert_true(need[0] >= 1);
    const int32_t bad = (POOL_BLOCKS + 1) * RT_KVQ_SUB; /* past the pool */
    assert_int_equal(rt_kvq_add_pages(q, 0, &bad, 1), -1);
    assert_int_equal(rt_kvq_add_pages(q, 1, NULL, 0), -1); /* int8 has one class */
    rt_kvq_destroy(q);
}

/* ---- kernel: pages of different slot counts in one call ---- */

static uint64_t rng = 77;
static float frand(void)
{
    rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

static void test_mixed_slot_counts_match_reference(void **state)
{
    (void)state;
    const int H = 2, D = 32, NH = 4, kvd = H * D;
    const kern_kvq_geom g = {H, D, 16};
    const int n_tok = 200;
    float *rows_k = malloc(sizeof(float) * (size_t)n_tok * kvd);
    float *rows_v = malloc(sizeof(float) * (size_t)n_tok * kvd);
    for (int i = 0; i < n_tok * kvd; i++) {
        rows_k[i] = frand();
        rows_v[i] = frand();
    }
    /* Q8 pages of 51 slots for [0, 102), Q4 pages of 85 for [102, 187), an
     * F32 page of 16 slots (13 filled) for [187, 200). */
    const struct {
        kern_kvq_fmt fmt;
        int B, first, n;
    } spec[] = {{KERN_KVQ_Q8, 51, 0, 51},
                {KERN_KVQ_Q8, 51, 51, 51},
                {KERN_KVQ_Q4, 85, 102, 85},
                {KERN_KVQ_F32, 16, 187, 13}};
    kern_kvq_page pages[4];
    void *mem[8];
    char err[256];
    for (int i = 0; i < 4; i++) {
        kern_kvq_geom pg = g;
        pg.block_size = spec[i].B;
        const size_t kb = kern_kvq_page_bytes(spec[i].fmt, KERN_KVQ_K, &pg);
        const size_t vb = kern_kvq_page_bytes(spec[i].fmt, KERN_KVQ_V, &pg);
        mem[2 * i] = aligned_alloc(64, (kb + 63) / 64 * 64);
        mem[2 * i + 1] = aligned_alloc(64, (vb + 63) / 64 * 64);
        const kern_kvq_src ks = {rows_k, (size_t)kvd, NULL, 0, 0, n_tok};
        const kern_kvq_src vs = {rows_v, (size_t)kvd, NULL, 0, 0, n_tok};
        const kern_kvq_sel sel = {NULL, 0, spec[i].first, spec[i].n};
        assert_int_equal(kern_kvq_pack(mem[2 * i], KERN_KVQ_K, spec[i].fmt, &pg, 0, &ks, &sel, NULL,
                                       err, sizeof(err)),
                         0);
        assert_int_equal(kern_kvq_pack(mem[2 * i + 1], KERN_KVQ_V, spec[i].fmt, &pg, 0, &vs, &sel,
                                       NULL, err, sizeof(err)),
                         0);
        pages[i] = (kern_kvq_page){.k = mem[2 * i],
                                   .v = mem[2 * i + 1],
                                   .pos0 = spec[i].first,
                                   .n = spec[i].n,
                                   .fmt = spec[i].fmt,
                                   .block_size = spec[i].B};
    }
    const int nq = 3;
    float q[3 * 4 * 32], out[3 * 4 * 32], ref[3 * 4 * 32], lse[3 * 4], lse_ref[3 * 4];
    for (int i = 0; i < nq * NH * D; i++)
        q[i] = frand();
    kern_kvq_seq s = {
        .q = q, .out = out, .lse = lse, .pages = pages, .n_pages = 4, .n_q = nq, .ctx_len = n_tok};
    kern_kvq_attn_args a = {.g = g, .n_heads = NH, .seqs = &s, .n_seqs = 1};
    kern_pool *pool = kern_pool_create(2);
    assert_int_equal(kern_attention_decode_quant(pool, &a, err, sizeof(err)), 0);
    s.out = ref;
    s.lse = lse_ref;
    assert_int_equal(kern_attention_decode_quant_ref(&a, err, sizeof(err)), 0);
    for (int i = 0; i < nq * NH * D; i++)
        assert_true(fabsf(out[i] - ref[i]) <= 1e-5f);
    for (int i = 0; i < nq * NH; i++)
        assert_true(fabsf(lse[i] - lse_ref[i]) <= 1e-4f);
    /* A page that claims more slots than its layout holds is refused. */
    pages[0].n = 52;
    assert_int_equal(kern_attention_decode_quant(pool, &a, err, sizeof(err)), -1);
    kern_pool_destroy(pool);
    for (int i = 0; i < 8; i++)
        free(mem[i]);
    free(rows_k);
    free(rows_v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mixed_slot_counts_match_reference),
        cmocka_unit_test_setup_teardown(test_fp_policy_run_matches_golden, setup, teardown),
        cmocka_unit_test_setup_teardown(test_compressed_formats_follow_fp_greedy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_sequence_flushes_and_frees_fp_blocks, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_zip_chunked_prefill_equals_one_chunk, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pages_cut_pool_blocks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_policy_errors_are_clear, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
