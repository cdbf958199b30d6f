/*
 * test_cuda_forward.c - the CUDA forward pass (runtime/forward_cuda.c) against
 * llama.cpp's greedy references and against the CPU forward pass, and the
 * backend choice (runtime/backend.h).
 *
 * Everywhere: rt_backend_select's rules for the machine it runs on (no GPU
 * here: "auto" and an empty device list give the CPU with the reason, "cuda"
 * is an error naming it), and loading a model onto CUDA without a usable GPU
 * fails with a message instead of crashing.
 *
 * With a GPU (otherwise each case prints "SKIP: no CUDA device" and is
 * skipped): greedy generation on the GPU with f32 weights reproduces
 * shared/golden/stories260K-greedy.json token for token; with the default
 * f16 weights its logits stay within a stated tolerance of the CPU's along the
 * golden continuations, and its greedy choice agrees wherever the CPU's top
 * two logits are further apart than that tolerance; a mixed batch of prefill
 * chunks and decode rows over a shared pool with scattered block tables,
 * copy-on-write included, matches the CPU step for step; a sequence whose
 * cache is not on the device fails that step with a message and the next
 * step runs (and, on the emulated device of cuda_emulator.c, an injected
 * device error fails only its step, with tp 1 and 2, eager or replayed from a
 * decode graph). Decode steps replayed from CUDA graphs give the logits of
 * eager steps, across batch sizes and block-table lengths that change
 * between steps. With two GPUs or more (the emulator has four): tensor
 * parallelism over 2 and 4 GPUs gives tp 1's greedy tokens, and the golden
 * ones, on every golden prompt, its logits within 1e-4 of tp 1's, and the
 * paged mixed batches above also hold under tp 2; a split that does not
 * divide the heads is refused. Sparse prefill (FlexPrefill at several gammas,
 * chunked and whole, per-head and GQA-union sets; PowerAttention with dense
 * and sparse layers, decode included) gives the CPU's greedy tokens, its
 * logits within SPARSE_LOGIT_TOL and its block and chunk counts (a real
 * GPU's FlexPrefill blocks within 1%: its profiles round differently), on the
 * golden prompts and a 1500-token one, with tp 1 and 2; FlexPrefill with
 * gamma 1 and tau 0 gives dense attention's tokens. SIEVE_CUDA_FORWARD_MODELS (GGUF paths
 * separated by ':', e.g. the qwen2, scaled-RoPE and Q4_K models
 * tests/gpu/run.sh stages) adds a CPU-vs-GPU logits comparison per model.
 *
 * Built twice: test_cuda_forward against the real backend (it skips without
 * a GPU), and test_cuda_forward_emulated against tests/unit/cuda_emulator.c,
 * which runs the CUDA backend's host side on the CPU twins, so its logic
 * (ranks, collectives, graphs) is checked on every machine.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "runtime/backend.h"
#include "runtime/model.h"
#include "runtime/sampler.h"
#include "tests/common/testutil.h"

#define N_GEN 32
/* f16 weights against the CPU's f32: |gpu - cpu| <= this * (1 + max |cpu|). */
#define F16_LOGIT_TOL 2e-2
/* f32 weights: cuBLAS in full f32, reductions in another order. */
#define F32_LOGIT_TOL 1e-4
/* A decode graph against eager steps: the same ops, but over rows padded to a
 * power of two, which may change how a product blocks its rows (f32 rounding
 * only; a graph that replays stale inputs is off by whole units). */
#define GRAPH_LOGIT_TOL 1e-6
/* Sparse prefill, f32 weights: the same blocks on both sides (the emulated
 * device selects from the CPU's estimate; a GPU's profiles may differ in the
 * last bits), attention summed in another order. */
#define SPARSE_LOGIT_TOL 1e-4

#ifdef SIEVE_CUDA_EMULATED
void kern_cuda_emulator_fail_after(int n); /* cuda_emulator.c */
#endif

static bool have_gpu;
static int n_gpus;

/* Loads path with tp ranks (on devices 0..tp-1) and decode graphs on or off. */
static rt_model *load_tp(const char *path, rt_backend backend, bool f32_weights, int max_batch,
                         int tp, bool graphs)
{
    rt_model_opts o = {.n_threads = 2,
                       .max_batch_tokens = max_batch,
                       .tp = tp,
                       .backend = backend,
                       .device = 0,
                       .device_f32_weights = f32_weights,
                       .cuda_graphs_off = !graphs};
    rt_model *m = NULL;
    char err[512];
    if (rt_model_load(&m, path, &o, err, sizeof(err)) != 0)
        fail_msg("load %s on %s (tp %d): %s", path, rt_backend_name(backend), tp, err);
    assert_int_equal(rt_model_backend(m), backend);
    return m;
}

static rt_model *load(const char *path, rt_backend backend, bool f32_weights, int max_batch)
{
    return load_tp(path, backend, f32_weights, max_batch, 1, true);
}

/* Skips (true) unless n GPUs are there for tensor parallelism. */
static bool skip_without_gpus(int n)
{
    if (have_gpu && n_gpus >= n)
        return false;
    print_message("SKIP: tensor parallelism %d on CUDA needs %d GPUs (%d here)\n", n, n, n_gpus);
    skip();
    return true;
}

static bool skip_without_gpu(void)
{
    if (have_gpu)
        return false;
    print_message("SKIP: no CUDA device%s\n",
                  rt_backend_cuda_built() ? "" : " (built without CUDA)");
    skip();
    return true;
}

static int json_ids(json_t *arr, int32_t *out, int cap)
{
    int n = (int)json_array_size(arr);
    assert_true(n <= cap);
    for (int i = 0; i < n; i++)
        out[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return n;
}

/* max |a - b| / (1 + max |b|) over n logits. */
static double logit_error(const float *a, const float *b, int n)
{
    double worst = 0.0, scale = 0.0;
    for (int i = 0; i < n; i++) {
        worst = fmax(worst, fabs((double)a[i] - (double)b[i]));
        scale = fmax(scale, fabs((double)b[i]));
    }
    return worst / (1.0 + scale);
}

/* The gap between the largest and second largest logit. */
static double top2_margin(const float *x, int n)
{
    double a = -INFINITY, b = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (x[i] > a) {
            b = a;
            a = x[i];
        } else if (x[i] > b) {
            b = x[i];
        }
    }
    return a - b;
}

/* ---- everywhere ---- */

static void test_backend_select_follows_the_rules(void **state)
{
    (void)state;
    rt_backend_choice ch;
    char err[512] = "";
    const int none[1] = {0};
    rt_device_request cpu = {.pref = RT_DEVICE_CPU, .n_devices = -1, .tp = 1};
    assert_int_equal(rt_backend_select(&cpu, &ch, err, sizeof(err)), 0);
    assert_int_equal(ch.backend, RT_BACKEND_CPU);
    assert_int_equal(ch.device, -1);
    assert_non_null(strstr(ch.why, "device \"cpu\""));

    rt_device_request empty = {.pref = RT_DEVICE_AUTO, .devices = none, .n_devices = 0, .tp = 1};
    assert_int_equal(rt_backend_select(&empty, &ch, err, sizeof(err)), 0);
    assert_int_equal(ch.backend, RT_BACKEND_CPU);
    assert_non_null(
        strstr(ch.why, rt_backend_cuda_built() ? "devices list is empty" : "built without CUDA"));

    rt_device_request tp2 = {.pref = RT_DEVICE_AUTO, .n_devices = -1, .tp = 2};
    assert_int_equal(rt_backend_select(&tp2, &ch, err, sizeof(err)), 0);
    if (have_gpu && n_gpus >= 2) { /* one GPU per rank: the first two */
        assert_int_equal(ch.backend, RT_BACKEND_CUDA);
        assert_int_equal(ch.n_devices, 2);
        assert_int_equal(ch.devices[0], 0);
        assert_int_equal(ch.devices[1], 1);
        print_message("auto, tp 2: %s\n", ch.why);
        const int listed[3] = {1, 1, 0}; /* a repeat is skipped */
        rt_device_request two = {
            .pref = RT_DEVICE_CUDA, .devices = listed, .n_devices = 3, .tp = 2};
        assert_int_equal(rt_backend_select(&two, &ch, err, sizeof(err)), 0);
        assert_int_equal(ch.devices[0], 1);
        assert_int_equal(ch.devices[1], 0);
        assert_int_equal(ch.device, 1);
    } else {
        assert_int_equal(ch.backend, RT_BACKEND_CPU);
        if (have_gpu)
            assert_non_null(strstr(ch.why, "tensor_parallel_size 2 needs 2 GPUs"));
    }

    rt_device_request autod = {.pref = RT_DEVICE_AUTO, .n_devices = -1, .tp = 1};
    rt_device_request cuda = {.pref = RT_DEVICE_CUDA, .n_devices = -1, .tp = 1};
    if (have_gpu) {
        assert_int_equal(rt_backend_select(&autod, &ch, err, sizeof(err)), 0);
        assert_int_equal(ch.backend, RT_BACKEND_CUDA);
        assert_int_equal(ch.device, 0);
        assert_true(ch.device_name[0] != 0);
        print_message("auto: %s\n", ch.why);
        const int absent[1] = {63};
        rt_device_request bad = {
            .pref = RT_DEVICE_CUDA, .devices = absent, .n_devices = 1, .tp = 1};
        assert_int_equal(rt_backend_select(&bad, &ch, err, sizeof(err)), -1);
        assert_non_null(strstr(err, "device 63 is not present"));
        if (n_gpus < 8) {
            cuda.tp = n_gpus + 1; /* more ranks than GPUs */
            assert_int_equal(rt_backend_select(&cuda, &ch, err, sizeof(err)), -1);
            char want[64];
            snprintf(want, sizeof(want), "tensor_parallel_size %d needs %d GPUs", cuda.tp, cuda.tp);
            assert_non_null(strstr(err, want));
            print_message("refused: %s\n", err);
        }
        return;
    }
    const char *reason =
        rt_backend_cuda_built() ? "no CUDA device is present" : "built without CUDA";
    assert_int_equal(rt_backend_select(&autod, &ch, err, sizeof(err)), 0);
    assert_int_equal(ch.backend, RT_BACKEND_CPU);
    assert_non_null(strstr(ch.why, reason));
    assert_int_equal(rt_backend_select(&cuda, &ch, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "device \"cuda\" was requested but no GPU can be used"));
    assert_non_null(strstr(err, reason));
}

static void test_cuda_load_without_a_gpu_fails_with_a_message(void **state)
{
    (void)state;
    if (have_gpu) {
#ifdef SIEVE_CUDA_EMULATED
        print_message("SKIP: the emulated GPU is present (the loads below use it)\n");
#else
        print_message("SKIP: a GPU is present (the loads below use it)\n");
#endif
        skip();
        return;
    }
    rt_model_opts o = {.n_threads = 1, .max_batch_tokens = 64, .backend = RT_BACKEND_CUDA};
    rt_model *m = NULL;
    char err[512] = "";
    assert_int_equal(
        rt_model_load(&m, tu_shared_path("models/stories260K.gguf"), &o, err, sizeof(err)), -1);
    assert_null(m);
    assert_non_null(strstr(err, "cuda"));
    print_message("refused as expected: %s\n", err);
}

/* ---- with a GPU ---- */

/* Greedy generation of one sequence with a private cache. */
static void generate(rt_model *m, const int32_t *prompt, int n_prompt, int32_t *out, int n_gen)
{
    const int n_vocab = rt_model_hparams(m)->n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)n_vocab);
    rt_kv *kv = rt_kv_create(m, n_prompt + n_gen);
    assert_non_null(kv);
    char err[512];
    rt_seq_batch b = {.kv = kv, .tokens = prompt, .n_tokens = n_prompt, .logits = logits};
    if (rt_forward(m, &b, 1, err, sizeof(err)) != 0)
        fail_msg("prefill: %s", err);
    for (int t = 0; t < n_gen; t++) {
        out[t] = rt_argmax(logits, n_vocab);
        if (t + 1 == n_gen)
            break;
        rt_seq_batch d = {.kv = kv, .tokens = &out[t], .n_tokens = 1, .logits = logits};
        if (rt_forward(m, &d, 1, err, sizeof(err)) != 0)
            fail_msg("decode %d: %s", t, err);
    }
    rt_kv_destroy(kv);
    free(logits);
}

static void test_cuda_greedy_matches_golden_with_f32_weights(void **state)
{
    (void)state;
    if (skip_without_gpu())
        return;
    rt_model *m = load(tu_shared_path("models/stories260K.gguf"), RT_BACKEND_CUDA, true, 512);
    json_t *golden = tu_load_json("golden/stories260K-greedy.json");
    assert_non_null(golden);
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(golden, "cases"), i, c)
    {
        int32_t prompt[256], want[64], got[N_GEN];
        const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
        json_ids(json_object_get(c, "completion_token_ids"), want, 64);
        generate(m, prompt, np, got, N_GEN);
        for (int t = 0; t < N_GEN; t++)
            if (got[t] != want[t])
                fail_msg("prompt %zu ('%s'): token %d is %d on the GPU, golden %d", i,
                         json_string_value(json_object_get(c, "prompt")), t, got[t], want[t]);
    }
    print_message("%zu golden prompts x %d tokens equal on the GPU (f32 weights)\n",
                  json_array_size(json_object_get(golden, "cases")), N_GEN);
    json_decref(golden);
    rt_model_destroy(m);
}

/* Feeds prompt + continuation to both models one step at a time (the prompt
 * as one prefill), comparing logits after each step; returns the worst
 * logit_error and counts greedy disagreements where the CPU's margin exceeds
 * tol (*hard) and elsewhere (*soft). */
static double compare_along(rt_model *gpu, rt_model *cpu, const int32_t *prompt, int np,
                            const int32_t *cont, int nc, double tol, int *hard, int *soft)
{
    const int V = rt_model_hparams(cpu)->n_vocab;
    float *lg = malloc(sizeof(float) * (size_t)V), *lc = malloc(sizeof(float) * (size_t)V);
    rt_kv *kg = rt_kv_create(gpu, np + nc + 1), *kc = rt_kv_create(cpu, np + nc + 1);
    assert_non_null(kg);
    assert_non_null(kc);
    char err[512];
    double worst = 0.0;
    for (int t = -1; t < nc; t++) {
        const int32_t *tok = t < 0 ? prompt : &cont[t];
        const int n = t < 0 ? np : 1;
        rt_seq_batch bg = {.kv = kg, .tokens = tok, .n_tokens = n, .logits = lg};
        rt_seq_batch bc = {.kv = kc, .tokens = tok, .n_tokens = n, .logits = lc};
        if (rt_forward(gpu, &bg, 1, err, sizeof(err)) != 0)
            fail_msg("GPU step %d: %s", t, err);
        if (rt_forward(cpu, &bc, 1, err, sizeof(err)) != 0)
            fail_msg("CPU step %d: %s", t, err);
        worst = fmax(worst, logit_error(lg, lc, V));
        if (rt_argmax(lg, V) != rt_argmax(lc, V)) {
            const double scale = 1.0 + fabs((double)lc[rt_argmax(lc, V)]);
            if (top2_margin(lc, V) > 2.0 * tol * scale)
                (*hard)++;
            else
                (*soft)++;
        }
    }
    rt_kv_destroy(kg);
    rt_kv_destroy(kc);
    free(lg);
    free(lc);
    return worst;
}

static void test_cuda_f16_logits_follow_the_cpu(void **state)
{
    (void)state;
    if (skip_without_gpu())
        return;
    const char *path = tu_shared_path("models/stories260K.gguf");
    rt_model *cpu = load(path, RT_BACKEND_CPU, false, 512);
    rt_model *gpu = load(path, RT_BACKEND_CUDA, false, 512);
    json_t *golden = tu_load_json("golden/stories260K-greedy.json");
    assert_non_null(golden);
    double worst = 0.0;
    int hard = 0, soft = 0, steps = 0;
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(golden, "cases"), i, c)
    {
        int32_t prompt[256], cont[64];
        const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
        const int nc = json_ids(json_object_get(c, "completion_token_ids"), cont, 64);
        worst =
            fmax(worst, compare_along(gpu, cpu, prompt, np, cont, nc, F16_LOGIT_TOL, &hard, &soft));
        steps += nc + 1;
    }
    print_message("f16 weights: worst logit error %.3g (tolerance %.3g) over %d steps; greedy "
                  "differs at %d near-ties, %d clear choices\n",
                  worst, F16_LOGIT_TOL, steps, soft, hard);
    assert_true(worst <= F16_LOGIT_TOL);
    assert_int_equal(hard, 0);
    json_decref(golden);
    rt_model_destroy(gpu);
    rt_model_destroy(cpu);
}

/* One step of the same batch on both models; logits compared per sequence. */
static double step_both(rt_model *gpu, rt_model *cpu, rt_seq_batch *bg, rt_seq_batch *bc, int n)
{
    char err[512];
    if (rt_forward(gpu, bg, n, err, sizeof(err)) != 0)
        fail_msg("GPU step: %s", err);
    if (rt_forward(cpu, bc, n, err, sizeof(err)) != 0)
        fail_msg("CPU step: %s", err);
    const int V = rt_model_hparams(cpu)->n_vocab;
    double worst = 0.0;
    for (int i = 0; i < n; i++)
        if (bg[i].logits)
            worst = fmax(worst, logit_error(bg[i].logits, bc[i].logits, V));
    return worst;
}

/* Mixed paged batches on the GPU (tp ranks) step for step against the CPU. */
static void pool_batches(int tp)
{
    const char *path = tu_shared_path("models/stories260K.gguf");
    rt_model *cpu = load(path, RT_BACKEND_CPU, false, 128);
    rt_model *gpu = load_tp(path, RT_BACKEND_CUDA, true, 128, tp, true);
    enum { NS = 4, NB = 40, BS = 4, PER = 10 };
    rt_kv_pool *pg = rt_kv_pool_create(gpu, NB, BS), *pc = rt_kv_pool_create(cpu, NB, BS);
    assert_non_null(pg);
    assert_non_null(pc);
    assert_int_equal(rt_kv_pool_blocks(pg), NB);
    /* Scattered block tables: sequence s owns blocks s, s + 4, s + 8, ... */
    int32_t blocks[NS][PER];
    for (int s = 0; s < NS; s++)
        for (int j = 0; j < PER; j++)
            blocks[s][j] = s + NS * j;
    const int V = rt_model_hparams(cpu)->n_vocab;
    float *lg = malloc(sizeof(float) * NS * (size_t)V),
          *lc = malloc(sizeof(float) * NS * (size_t)V);
    int32_t toks[NS][40];
    for (int s = 0; s < NS; s++)
        for (int t = 0; t < 40; t++)
            toks[s][t] = (int32_t)(1 + (s * 37 + t * 11) % (V - 1));
    int past[NS] = {0};
    double worst = 0.0;
    /* Staggered starts: sequences prefill chunks of different lengths while
     * others decode, so every step mixes both. */
    static const int chunk[NS] = {7, 1, 13, 3};
    for (int step = 0; step < 8; step++) {
        rt_seq_batch bg[NS], bc[NS];
        int n = 0;
        for (int s = 0; s < NS; s++) {
            const int len = step == 0 ? chunk[s] : (past[s] < 20 ? chunk[s] % 5 + 1 : 1);
            if (past[s] + len > 36)
                continue;
            bg[n] = (rt_seq_batch){.tokens = toks[s] + past[s],
                                   .n_tokens = len,
                                   .logits = (step + s) % 3 ? lg + (size_t)n * V : NULL,
                                   .pool = pg,
                                   .blocks = blocks[s],
                                   .n_blocks = PER,
                                   .n_past = past[s]};
            bc[n] = bg[n];
            bc[n].pool = pc;
            bc[n].logits = bg[n].logits ? lc + (size_t)n * V : NULL;
            past[s] += len;
            n++;
        }
        worst = fmax(worst, step_both(gpu, cpu, bg, bc, n));
    }
    /* Copy-on-write: sequence 0's first block into a free one, then sequence
     * 0 continues on the copy; both sides must still agree. */
    rt_kv_pool_copy_block(pg, blocks[0][0], 39);
    rt_kv_pool_copy_block(pc, blocks[0][0], 39);
    blocks[0][0] = 39;
    rt_seq_batch bg = {.tokens = toks[0] + past[0],
                       .n_tokens = 1,
                       .logits = lg,
                       .pool = pg,
                       .blocks = blocks[0],
                       .n_blocks = PER,
                       .n_past = past[0]};
    rt_seq_batch bc = bg;
    bc.pool = pc;
    bc.logits = lc;
    worst = fmax(worst, step_both(gpu, cpu, &bg, &bc, 1));
    print_message("pool batches, tp %d: worst logit error %.3g (tolerance %.3g)\n", tp, worst,
                  F32_LOGIT_TOL);
    assert_true(worst <= F32_LOGIT_TOL);
    free(lg);
    free(lc);
    rt_kv_pool_destroy(pg);
    rt_kv_pool_destroy(pc);
    rt_model_destroy(gpu);
    rt_model_destroy(cpu);
}

static void test_cuda_pool_batches_match_the_cpu(void **state)
{
    (void)state;
    if (!skip_without_gpu())
        pool_batches(1);
}

static void test_cuda_tp2_pool_batches_match_the_cpu(void **state)
{
    (void)state;
    if (!skip_without_gpus(2))
        pool_batches(2);
}

/* ---- tensor parallelism ---- */

/* Teacher-forced on prompt + continuation: the worst |logit - ref logit| of
 * m against ref along it. */
static double tp_logit_gap(rt_model *m, rt_model *ref, const int32_t *prompt, int np,
                           const int32_t *cont, int nc)
{
    const int V = rt_model_hparams(ref)->n_vocab;
    float *a = malloc(sizeof(float) * (size_t)V), *b = malloc(sizeof(float) * (size_t)V);
    rt_kv *ka = rt_kv_create(m, np + nc + 1), *kb = rt_kv_create(ref, np + nc + 1);
    char err[512];
    double worst = 0.0;
    for (int t = -1; t < nc; t++) {
        const int32_t *tok = t < 0 ? prompt : &cont[t];
        const int n = t < 0 ? np : 1;
        rt_seq_batch ba = {.kv = ka, .tokens = tok, .n_tokens = n, .logits = a};
        rt_seq_batch bb = {.kv = kb, .tokens = tok, .n_tokens = n, .logits = b};
        if (rt_forward(m, &ba, 1, err, sizeof(err)) != 0 ||
            rt_forward(ref, &bb, 1, err, sizeof(err)) != 0)
            fail_msg("step %d: %s", t, err);
        for (int i = 0; i < V; i++)
            worst = fmax(worst, fabs((double)a[i] - (double)b[i]));
    }
    rt_kv_destroy(ka);
    rt_kv_destroy(kb);
    free(a);
    free(b);
    return worst;
}

/* tp 2 (and 4 with four GPUs) on CUDA: the greedy tokens of tp 1 and the
 * golden ones on every golden prompt, logits within 1e-4 of tp 1's. */
static void test_cuda_tp_greedy_matches_tp1_and_golden(void **state)
{
    (void)state;
    if (skip_without_gpus(2))
        return;
    char path[4096]; /* tu_shared_path's buffer is reused by tu_load_json */
    snprintf(path, sizeof(path), "%s", tu_shared_path("models/stories260K.gguf"));
    rt_model *one = load(path, RT_BACKEND_CUDA, true, 512);
    json_t *golden = tu_load_json("golden/stories260K-greedy.json");
    assert_non_null(golden);
    for (int tp = 2; tp <= 4 && tp <= n_gpus; tp *= 2) {
        rt_model *m = load_tp(path, RT_BACKEND_CUDA, true, 512, tp, true);
        double worst = 0.0;
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(golden, "cases"), i, c)
        {
            int32_t prompt[256], want[64], ref[N_GEN], got[N_GEN];
            const int np = json_ids(json_object_get(c, "prompt_token_ids"), prompt, 256);
            const int nc = json_ids(json_object_get(c, "completion_token_ids"), want, 64);
            generate(one, prompt, np, ref, N_GEN);
            generate(m, prompt, np, got, N_GEN);
            for (int t = 0; t < N_GEN; t++)
                if (got[t] != ref[t] || got[t] != want[t])
                    fail_msg("tp %d, prompt %zu: token %d is %d, tp 1 has %d, golden %d", tp, i, t,
                             got[t], ref[t], want[t]);
            worst = fmax(worst, tp_logit_gap(m, one, prompt, np, want, nc));
        }
        rt_graph_stats gs;
        rt_model_graph_stats(m, &gs);
        print_message("tp %d on CUDA: %zu golden prompts x %d tokens equal to tp 1 and golden; "
                      "max |logit - tp 1 logit| %.2e; decode graphs %ld captured, %ld replays\n",
                      tp, json_array_size(json_object_get(golden, "cases")), N_GEN, worst,
                      gs.captured, gs.replayed);
        assert_true(worst <= 1e-4);
        assert_true(gs.replayed > 0);
        rt_model_destroy(m);
    }
    json_decref(golden);
    rt_model_destroy(one);
}

static void test_cuda_tp_refuses_a_split_of_part_heads(void **state)
{
    (void)state;
    if (skip_without_gpu())
        return;
    rt_model_opts o = {.n_threads = 1, .max_batch_tokens = 64, .tp = 3, .backend = RT_BACKEND_CUDA};
    rt_model *m = NULL;
    char err[512] = "";
    assert_int_equal(
        rt_model_load(&m, tu_shared_path("models/stories260K.gguf"), &o, err, sizeof(err)), -1);
    assert_null(m);
    assert_non_null(strstr(err, "tp 3 does not divide the 8 attention heads"));
    print_message("refused: %s\n", err);
}

/* ---- decode graphs ---- */

enum { GS = 6, G_BS = 4, G_PER = 8 };

/* One decode step of the sequences in `which` (a bit mask) on m, logits to lg. */
static void decode_step(rt_model *m, rt_kv_pool *p, int32_t (*blocks)[G_PER], int32_t *toks,
                        int *past, unsigned which, float *lg, bool advance)
{
    const int V = rt_model_hparams(m)->n_vocab;
    rt_seq_batch b[GS];
    int n = 0;
    for (int s = 0; s < GS; s++) {
        if (!(which & (1u << s)))
            continue;
        b[n] = (rt_seq_batch){.tokens = &toks[s],
                              .n_tokens = 1,
                              .logits = lg + (size_t)n * V,
                              .pool = p,
                              .blocks = blocks[s],
                              .n_blocks = past[s] / G_BS + 1,
                              .n_past = past[s]};
        n++;
    }
    char err[512];
    if (rt_forward(m, b, n, err, sizeof(err)) != 0)
        fail_msg("decode step: %s", err);
    if (!advance)
        return;
    for (int s = 0, j = 0; s < GS; s++)
        if (which & (1u << s)) {
            toks[s] = (int32_t)rt_argmax(lg + (size_t)j++ * V, V);
            past[s]++;
        }
}

/* Decode steps replayed from graphs give the logits of eager steps: batch
 * sizes that come and go (padded to 1, 2, 4, 8 rows) and block tables that
 * grow past a power of two, over a paged pool; sequences prefilled first. */
static void graphs_match_eager(int tp)
{
    const char *path = tu_shared_path("models/stories260K.gguf");
    rt_model *g = load_tp(path, RT_BACKEND_CUDA, true, 64, tp, true);
    rt_model *e = load_tp(path, RT_BACKEND_CUDA, true, 64, tp, false);
    rt_kv_pool *pg = rt_kv_pool_create(g, GS * G_PER, G_BS);
    rt_kv_pool *pe = rt_kv_pool_create(e, GS * G_PER, G_BS);
    assert_non_null(pg);
    assert_non_null(pe);
    const int V = rt_model_hparams(g)->n_vocab;
    int32_t blocks[GS][G_PER], tg[GS], te[GS], prompt[GS][8];
    int past_g[GS], past_e[GS];
    for (int s = 0; s < GS; s++)
        for (int j = 0; j < G_PER; j++)
            blocks[s][j] = (int32_t)(GS * G_PER - 1 - (s + GS * j)); /* scattered, descending */
    float *lg = malloc(sizeof(float) * GS * (size_t)V),
          *le = malloc(sizeof(float) * GS * (size_t)V);
    char err[512];
    for (int s = 0; s < GS; s++) { /* prompts of 2..7 tokens, one prefill each */
        const int np = 2 + s;
        for (int t = 0; t < np; t++)
            prompt[s][t] = (int32_t)(1 + (s * 53 + t * 29) % (V - 1));
        rt_seq_batch b = {.tokens = prompt[s],
                          .n_tokens = np,
                          .logits = lg,
                          .pool = pg,
                          .blocks = blocks[s],
                          .n_blocks = G_PER,
                          .n_past = 0};
        assert_int_equal(rt_forward(g, &b, 1, err, sizeof(err)), 0);
        b.pool = pe;
        b.logits = le;
        assert_int_equal(rt_forward(e, &b, 1, err, sizeof(err)), 0);
        tg[s] = te[s] = (int32_t)rt_argmax(lg, V);
        past_g[s] = past_e[s] = np;
    }
    /* Masks of 6, 3, 5, 1, 2 and 4 sequences, round and round. */
    static const unsigned masks[] = {0x3f, 0x15, 0x2f, 0x08, 0x21, 0x1e};
    double worst = 0.0;
    int steps = 0;
    for (int k = 0; k < 24; k++) {
        const unsigned which = masks[k % 6];
        bool room = true;
        for (int s = 0; s < GS; s++)
            room &= !(which & (1u << s)) || past_g[s] + 1 <= G_PER * G_BS;
        if (!room)
            break;
        decode_step(g, pg, blocks, tg, past_g, which, lg, true);
        decode_step(e, pe, blocks, te, past_e, which, le, true);
        for (int i = 0; i < __builtin_popcount(which); i++)
            worst = fmax(worst, logit_error(lg + (size_t)i * V, le + (size_t)i * V, V));
        for (int s = 0; s < GS; s++)
            assert_int_equal(tg[s], te[s]);
        steps++;
    }
    rt_graph_stats gs, es;
    rt_model_graph_stats(g, &gs);
    rt_model_graph_stats(e, &es);
    print_message("tp %d: %d decode steps, graphs %ld captured, %ld replays, %ld eager; worst "
                  "graph-vs-eager logit error %.2e (tolerance %.0e)\n",
                  tp, steps, gs.captured, gs.replayed, gs.eager, worst, GRAPH_LOGIT_TOL);
    assert_true(worst <= GRAPH_LOGIT_TOL);
    assert_true(gs.captured >= 4); /* 8, 4, 1, 2 rows at least */
    assert_true(gs.replayed >= steps - gs.captured - gs.eager);
    assert_true(gs.replayed > gs.captured);
    assert_int_equal(es.captured + es.replayed + es.eager, 0);

#ifdef SIEVE_CUDA_EMULATED
    /* A device error inside a replayed graph fails that step only: nothing
     * advances, and the same step then runs and still matches eager. */
    int at = 0;
    for (int after = 1; after < 400; after += 37) {
        kern_cuda_emulator_fail_after(after);
        const unsigned which = masks[at++ % 6];
        rt_seq_batch b[GS];
        int n = 0;
        for (int s = 0; s < GS; s++) {
            if (!(which & (1u << s)))
                continue;
            b[n] = (rt_seq_batch){.tokens = &tg[s],
                                  .n_tokens = 1,
                                  .logits = lg + (size_t)n * V,
                                  .pool = pg,
                                  .blocks = blocks[s],
                                  .n_blocks = past_g[s] / G_BS + 1,
                                  .n_past = past_g[s]};
            n++;
        }
        const int rc = rt_forward(g, b, n, err, sizeof(err));
        kern_cuda_emulator_fail_after(0);
        if (rc == 0)
            continue; /* the failure fell after the step */
        assert_non_null(strstr(err, "emulated"));
        decode_step(g, pg, blocks, tg, past_g, which, lg, false);
        decode_step(e, pe, blocks, te, past_e, which, le, false);
        for (int i = 0; i < n; i++)
            if (logit_error(lg + (size_t)i * V, le + (size_t)i * V, V) > GRAPH_LOGIT_TOL)
                fail_msg("tp %d: after a failure at op %d (%s), sequence %d of the step repeated "
                         "is off by %.3g",
                         tp, after, err, i, logit_error(lg + (size_t)i * V, le + (size_t)i * V, V));
    }
    print_message("tp %d: last failure injected into a replay: %s\n", tp, err);
#endif
    free(lg);
    free(le);
    rt_kv_pool_destroy(pg);
    rt_kv_pool_destroy(pe);
    rt_model_destroy(g);
    rt_model_destroy(e);
}

static void test_cuda_decode_graphs_match_eager(void **state)
{
    (void)state;
    if (!skip_without_gpu())
        graphs_match_eager(1);
}

static void test_cuda_tp2_decode_graphs_match_eager(void **state)
{
    (void)state;
    if (!skip_without_gpus(2))
        graphs_match_eager(2);
}

static void test_cuda_step_error_fails_the_step_only(void **state)
{
    (void)state;
    if (skip_without_gpu())
        return;
    const char *path = tu_shared_path("models/stories260K.gguf");
    rt_model *cpu = load(path, RT_BACKEND_CPU, false, 64);
    rt_model *gpu = load(path, RT_BACKEND_CUDA, false, 64);
    rt_kv_pool *host = rt_kv_pool_create(cpu, 4, 16); /* not on the device */
    const int32_t blocks[1] = {0}, tok[2] = {1, 403};
    float *logits = malloc(sizeof(float) * (size_t)rt_model_hparams(gpu)->n_vocab);
    rt_seq_batch b = {.tokens = tok,
                      .n_tokens = 2,
                      .logits = logits,
                      .pool = host,
                      .blocks = blocks,
                      .n_blocks = 1};
    char err[512] = "";
    assert_int_equal(rt_forward(gpu, &b, 1, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "not on device"));
    print_message("refused: %s\n", err);
    rt_kv *kv = rt_kv_create(gpu, 8);
    rt_seq_batch ok = {.kv = kv, .tokens = tok, .n_tokens = 2, .logits = logits};
    assert_int_equal(rt_forward(gpu, &ok, 1, err, sizeof(err)), 0);
    assert_int_equal(rt_kv_len(kv), 2);
    rt_kv_destroy(kv);
    free(logits);
    rt_kv_pool_destroy(host);
    rt_model_destroy(gpu);
    rt_model_destroy(cpu);
}

/* A device error in the middle of a step fails that step with the error's
 * message; the next step runs and matches the CPU (emulated GPU only: a real
 * device error cannot be caused on purpose). With tp 2 the failing op is on
 * either rank, and the other rank must not wait for it. */
static void test_cuda_device_error_fails_one_step(void **state)
{
    (void)state;
#ifndef SIEVE_CUDA_EMULATED
    print_message("SKIP: needs the emulated device (test_cuda_forward_emulated)\n");
    skip();
#else
    const char *path = tu_shared_path("models/stories260K.gguf");
    rt_model *cpu = load(path, RT_BACKEND_CPU, false, 64);
    const int V = rt_model_hparams(cpu)->n_vocab;
    float *lg = malloc(sizeof(float) * (size_t)V), *lc = malloc(sizeof(float) * (size_t)V);
    const int32_t tok[4] = {1, 403, 407, 411};
    char err[512] = "";
    for (int tp = 1; tp <= 2 && tp <= n_gpus; tp++) {
        rt_model *gpu = load_tp(path, RT_BACKEND_CUDA, true, 64, tp, true);
        for (int after = 1; after < 60 * tp; after += 7) {
            rt_kv *kg = rt_kv_create(gpu, 8), *kc = rt_kv_create(cpu, 8);
            rt_seq_batch bg = {.kv = kg, .tokens = tok, .n_tokens = 4, .logits = lg};
            rt_seq_batch bc = {.kv = kc, .tokens = tok, .n_tokens = 4, .logits = lc};
            kern_cuda_emulator_fail_after(after);
            assert_int_equal(rt_forward(gpu, &bg, 1, err, sizeof(err)), -1);
            assert_non_null(strstr(err, "forward (cuda)"));
            assert_non_null(strstr(err, "emulated"));
            assert_int_equal(rt_kv_len(kg), 0); /* the failed step appended nothing */
            if (rt_forward(gpu, &bg, 1, err, sizeof(err)) != 0)
                fail_msg("tp %d: the step after the failure: %s", tp, err);
            assert_int_equal(rt_forward(cpu, &bc, 1, err, sizeof(err)), 0);
            assert_true(logit_error(lg, lc, V) <= F32_LOGIT_TOL);
            rt_kv_destroy(kg);
            rt_kv_destroy(kc);
        }
        print_message("tp %d: last injected failure: %s\n", tp, err[0] ? err : "(none)");
        rt_model_destroy(gpu);
    }
    free(lg);
    free(lc);
    rt_model_destroy(cpu);
#endif
}

static void test_cuda_extra_models_follow_the_cpu(void **state)
{
    (void)state;
    if (skip_without_gpu())
        return;
    const char *list = getenv("SIEVE_CUDA_FORWARD_MODELS");
    if (!list || !*list) {
        print_message("SKIP: SIEVE_CUDA_FORWARD_MODELS is not set\n");
        skip();
        return;
    }
    char paths[4096];
    snprintf(paths, sizeof(paths), "%s", list);
    int n_models = 0;
    for (char *save = NULL, *p = strtok_r(paths, ":", &save); p; p = strtok_r(NULL, ":", &save)) {
        rt_model *cpu = load(p, RT_BACKEND_CPU, false, 256);
        const rt_hparams *hp = rt_model_hparams(cpu);
        const int V = hp->n_vocab;
        int32_t prompt[48], cont[16];
        for (int i = 0; i < 48; i++)
            prompt[i] = (int32_t)(1 + (i * 131 + 7) % (V - 1));
        for (int i = 0; i < 16; i++)
            cont[i] = (int32_t)(1 + (i * 71 + 3) % (V - 1));
        for (int f32 = 1; f32 >= 0; f32--) {
            rt_model *gpu = load(p, RT_BACKEND_CUDA, f32 == 1, 256);
            int hard = 0, soft = 0;
            const double tol = 0.1; /* quantized CPU products quantize activations too */
            const double worst = compare_along(gpu, cpu, prompt, 48, cont, 16, tol, &hard, &soft);
            print_message("%s (%s, neox %d, bias %d): %s device weights: worst logit error "
                          "%.3g, greedy differs at %d steps (%d near-ties)\n",
                          p, hp->arch, hp->rope_neox, hp->qkv_bias, f32 ? "f32" : "default", worst,
                          hard + soft, soft);
            assert_true(worst <= tol);
            rt_model_destroy(gpu);
        }
        rt_model_destroy(cpu);
        n_models++;
    }
    assert_true(n_models > 0);
}

/* ---- sparse prefill ---- */

enum { SP_PROMPT = 1500, SP_GEN = 8, SP_CHUNK = 512 };

/* A prompt of SP_PROMPT tokens: a story's tokens repeated after BOS. */
static void long_prompt(rt_model *m, int32_t *out)
{
    static const char text[] =
        " Once upon a time, there was a little girl named Lily. She loved to play outside in the "
        "park with her friends. One day, she saw a big red ball under a tree. Tom said, \"Let's "
        "play!\" They ran and laughed until the sun went down.";
    int32_t *ids;
    size_t n;
    assert_int_equal(rt_tokenize(rt_model_tokenizer(m), text, strlen(text), false, false, &ids, &n),
                     0);
    out[0] = 1;
    for (int i = 1; i < SP_PROMPT; i++)
        out[i] = ids[(size_t)(i - 1) % n];
    free(ids);
}

/* Prefill in chunks of `chunk` under pol, then n_gen greedy tokens; the
 * logits of each step go to lg (n_gen rows), the counts to st. */
static void policy_run(rt_model *m, const rt_attn_policy *pol, const int32_t *prompt, int np,
                       int chunk, int n_gen, int32_t *out, float *lg, rt_attn_stats *st)
{
    const int V = rt_model_hparams(m)->n_vocab;
    rt_kv *kv = rt_kv_create(m, np + n_gen);
    assert_non_null(kv);
    memset(st, 0, sizeof(*st));
    char err[512];
    for (int i = 0; i < np; i += chunk) {
        const int n = np - i < chunk ? np - i : chunk;
        rt_seq_batch b = {.kv = kv,
                          .tokens = prompt + i,
                          .n_tokens = n,
                          .logits = i + n == np ? lg : NULL,
                          .policy = pol,
                          .stats = st};
        if (rt_forward(m, &b, 1, err, sizeof(err)) != 0)
            fail_msg("prefill at %d: %s", i, err);
    }
    for (int t = 0; t < n_gen; t++) {
        out[t] = rt_argmax(lg + (size_t)t * V, V);
        if (t + 1 == n_gen)
            break;
        rt_seq_batch d = {.kv = kv,
                          .tokens = &out[t],
                          .n_tokens = 1,
                          .logits = lg + (size_t)(t + 1) * V,
                          .policy = pol,
                          .stats = st};
        if (rt_forward(m, &d, 1, err, sizeof(err)) != 0)
            fail_msg("decode %d: %s", t, err);
    }
    rt_kv_destroy(kv);
}

static rt_attn_policy flex_policy(float gamma, float tau, int B, int min_budget, int gqa_union)
{
    rt_attn_policy p = {.prefill = RT_PREFILL_FLEX};
    kern_flex_params_default(&p.flex);
    p.flex.gamma = gamma;
    p.flex.tau = tau;
    p.flex.block_size = B;
    p.flex.min_budget = min_budget;
    p.flex.gqa_union = gqa_union;
    return p;
}

static rt_attn_policy power_policy(int B, int W, int dense_count, int period)
{
    rt_attn_policy p = {.prefill = RT_PREFILL_POWER,
                        .power = {.block_size = B, .window_blocks = W},
                        .power_dense_count = dense_count,
                        .power_period = period};
    return p;
}

/* Computed blocks: equal, except FlexPrefill's on a real GPU, whose probe
 * profiles differ from the CPU's in the last bits and may tip a budget at its
 * threshold (within 1%). */
static bool counts_agree(const rt_attn_policy *pol, const rt_attn_stats *g, const rt_attn_stats *c)
{
#ifdef SIEVE_CUDA_EMULATED
    (void)pol;
    return g->computed == c->computed;
#else
    if (pol->prefill != RT_PREFILL_FLEX)
        return g->computed == c->computed;
    return fabs((double)(g->computed - c->computed)) <= 0.01 * (double)c->computed;
#endif
}

/* Every policy on the CPU and on the (emulated) GPU with tp ranks: the long
 * prompt whole and in chunks, and the golden prompts; tokens, logits and
 * counts compared. */
static void sparse_matches_cpu(int tp)
{
    const char *path = tu_shared_path("models/stories260K.gguf");
    rt_model *cpu = load(path, RT_BACKEND_CPU, true, 2048);
    rt_model *gpu = load_tp(path, RT_BACKEND_CUDA, true, 2048, tp, true);
    const int V = rt_model_hparams(cpu)->n_vocab;
    int32_t *lp = malloc(sizeof(int32_t) * SP_PROMPT);
    long_prompt(cpu, lp);
    const rt_attn_policy pols[] = {
        flex_policy(0.9f, 0.1f, 32, 64, 0), flex_policy(0.95f, 0.1f, 32, 64, 0),
        flex_policy(0.7f, 0.3f, 16, 32, 0), flex_policy(0.8f, 0.1f, 64, 0, 1),
        flex_policy(0.5f, 1.0f, 32, 64, 0), power_policy(32, 2, 2, 7),
        power_policy(16, 1, 1, 3),          power_policy(64, 4, 0, 1),
    };
    json_t *golden = tu_load_json("golden/stories260K-greedy.json");
    assert_non_null(golden);
    float *lc = malloc(sizeof(float) * SP_GEN * (size_t)V);
    float *lg = malloc(sizeof(float) * SP_GEN * (size_t)V);
    double worst = 0.0;
    int sparse_runs = 0;
    for (size_t k = 0; k < sizeof(pols) / sizeof(pols[0]); k++) {
        const rt_attn_policy *pol = &pols[k];
        const json_t *cases = json_object_get(golden, "cases");
        const int n_prompts = 2 + (int)json_array_size(cases);
        for (int pi = 0; pi < n_prompts; pi++) {
            int32_t gp[256];
            const int32_t *prompt = lp;
            int np = SP_PROMPT, chunk = pi == 0 ? SP_PROMPT : SP_CHUNK;
            if (pi >= 2) {
                np = json_ids(
                    json_object_get(json_array_get(cases, (size_t)pi - 2), "prompt_token_ids"), gp,
                    256);
                prompt = gp;
                chunk = np;
            }
            int32_t tc[SP_GEN], tg[SP_GEN];
            rt_attn_stats sc, sg;
            policy_run(cpu, pol, prompt, np, chunk, SP_GEN, tc, lc, &sc);
            policy_run(gpu, pol, prompt, np, chunk, SP_GEN, tg, lg, &sg);
            for (int t = 0; t < SP_GEN; t++) {
                const double e = logit_error(lg + (size_t)t * V, lc + (size_t)t * V, V);
                worst = fmax(worst, e);
                if (tg[t] != tc[t] || e > SPARSE_LOGIT_TOL)
                    fail_msg("tp %d, policy %zu, prompt %d (%d tokens, chunks of %d): step %d: "
                             "token %d on the GPU, %d on the CPU, logit error %.3g",
                             tp, k, pi, np, chunk, t, tg[t], tc[t], e);
            }
            if (!counts_agree(pol, &sg, &sc) || sg.causal != sc.causal ||
                sg.dense_chunks != sc.dense_chunks || sg.sparse_chunks != sc.sparse_chunks)
                fail_msg("tp %d, policy %zu, prompt %d: GPU counts %lld/%lld blocks, %lld dense "
                         "%lld sparse chunks; CPU %lld/%lld, %lld, %lld",
                         tp, k, pi, (long long)sg.computed, (long long)sg.causal,
                         (long long)sg.dense_chunks, (long long)sg.sparse_chunks,
                         (long long)sc.computed, (long long)sc.causal, (long long)sc.dense_chunks,
                         (long long)sc.sparse_chunks);
            if (pi < 2) {
                print_message("tp %d, policy %zu (%s), %d tokens in chunks of %d: density %.3f, "
                              "%lld sparse + %lld dense chunks, same on both\n",
                              tp, k, pol->prefill == RT_PREFILL_FLEX ? "flex" : "power", np, chunk,
                              (double)sc.computed / (double)sc.causal, (long long)sc.sparse_chunks,
                              (long long)sc.dense_chunks);
                assert_true(sc.sparse_chunks > 0);
                assert_true(sc.computed < sc.causal);
                sparse_runs++;
            }
        }
    }
    print_message("tp %d: %d sparse runs and the golden prompts under each policy: worst logit "
                  "error %.3g (tolerance %.0e)\n",
                  tp, sparse_runs, worst, SPARSE_LOGIT_TOL);
    json_decref(golden);
    free(lc);
    free(lg);
    free(lp);
    rt_model_destroy(gpu);
    rt_model_destroy(cpu);
}

static void test_cuda_sparse_prefill_matches_the_cpu(void **state)
{
    (void)state;
    if (!skip_without_gpu())
        sparse_matches_cpu(1);
}

static void test_cuda_tp2_sparse_prefill_matches_the_cpu(void **state)
{
    (void)state;
    if (!skip_without_gpus(2))
        sparse_matches_cpu(2);
}

/* FlexPrefill keeping every block (gamma 1, tau 0) gives dense attention's
 * tokens and logits on the GPU, counting every causal block as computed. */
static void test_cuda_flex_gamma1_equals_dense(void **state)
{
    (void)state;
    if (skip_without_gpu())
        return;
    const char *path = tu_shared_path("models/stories260K.gguf");
    rt_model *gpu = load(path, RT_BACKEND_CUDA, true, 2048);
    const int V = rt_model_hparams(gpu)->n_vocab;
    int32_t *lp = malloc(sizeof(int32_t) * SP_PROMPT);
    long_prompt(gpu, lp);
    float *ld = malloc(sizeof(float) * SP_GEN * (size_t)V);
    float *lf = malloc(sizeof(float) * SP_GEN * (size_t)V);
    const rt_attn_policy dense = {.prefill = RT_PREFILL_DENSE};
    const rt_attn_policy keep_all = flex_policy(1.0f, 0.0f, 32, 64, 0);
    double worst = 0.0;
    for (int chunk = SP_CHUNK; chunk <= SP_PROMPT; chunk += SP_PROMPT - SP_CHUNK) {
        int32_t td[SP_GEN], tf[SP_GEN];
        rt_attn_stats sd, sf;
        policy_run(gpu, &dense, lp, SP_PROMPT, chunk, SP_GEN, td, ld, &sd);
        policy_run(gpu, &keep_all, lp, SP_PROMPT, chunk, SP_GEN, tf, lf, &sf);
        for (int t = 0; t < SP_GEN; t++) {
            assert_int_equal(tf[t], td[t]);
            worst = fmax(worst, logit_error(lf + (size_t)t * V, ld + (size_t)t * V, V));
        }
        assert_true(sf.sparse_chunks > 0);
        assert_true(sf.computed == sf.causal);
    }
    print_message("flex gamma 1, tau 0 on the GPU: dense's tokens; worst logit gap %.3g\n", worst);
    assert_true(worst <= SPARSE_LOGIT_TOL);
    free(ld);
    free(lf);
    free(lp);
    rt_model_destroy(gpu);
}

int main(void)
{
    n_gpus = rt_backend_cuda_built() ? rt_backend_cuda_device_count() : 0;
    have_gpu = n_gpus > 0;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backend_select_follows_the_rules),
        cmocka_unit_test(test_cuda_load_without_a_gpu_fails_with_a_message),
        cmocka_unit_test(test_cuda_greedy_matches_golden_with_f32_weights),
        cmocka_unit_test(test_cuda_f16_logits_follow_the_cpu),
        cmocka_unit_test(test_cuda_pool_batches_match_the_cpu),
        cmocka_unit_test(test_cuda_tp2_pool_batches_match_the_cpu),
        cmocka_unit_test(test_cuda_tp_greedy_matches_tp1_and_golden),
        cmocka_unit_test(test_cuda_tp_refuses_a_split_of_part_heads),
        cmocka_unit_test(test_cuda_decode_graphs_match_eager),
        cmocka_unit_test(test_cuda_tp2_decode_graphs_match_eager),
        cmocka_unit_test(test_cuda_step_error_fails_the_step_only),
        cmocka_unit_test(test_cuda_device_error_fails_one_step),
        cmocka_unit_test(test_cuda_sparse_prefill_matches_the_cpu),
        cmocka_unit_test(test_cuda_tp2_sparse_prefill_matches_the_cpu),
        cmocka_unit_test(test_cuda_flex_gamma1_equals_dense),
        cmocka_unit_test(test_cuda_extra_models_follow_the_cpu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
