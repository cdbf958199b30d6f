/*
 * bench_decode_cuda.c - decode tok/s of a whole model on the CUDA backend,
 * with decode steps replayed from CUDA graphs and launched eagerly, at a few
 * batch sizes; optionally over tensor-parallel GPUs.
 *
 *   bench_decode_cuda [--model PATH] [--batch 1,16,64] [--steps N] [--prompt N] [--tp N]
 *
 * For each batch size: that many sequences in one paged pool, each prefilled
 * with a --prompt token prompt, then --steps greedy decode steps of all of
 * them together, timed after a few warm-up steps (which also capture the
 * graphs). The model is loaded twice, graphs on and off (rt_model_opts
 * .cuda_graphs_off), and both are timed on the same sequences. Prints tok/s
 * and ms per step of each, the speedup, and the graph counters. A small model
 * (the default stories260K) shows the launch overhead graphs save; a large
 * one is bound by weight bandwidth and gains little. Figures only; nothing is
 * asserted. Without CUDA or a device it says so and exits 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/backend.h"
#include "runtime/model.h"
#include "runtime/sampler.h"

#define MAX_BATCHES 8
#define BLOCK 16

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct {
    const char *model;
    int batches[MAX_BATCHES];
    int n_batches;
    int steps, prompt, tp;
} bench_opts;

static rt_model *load(const bench_opts *o, int max_batch, bool graphs)
{
    rt_model_opts mo = {.n_threads = 1,
                        .max_batch_tokens = max_batch,
                        .tp = o->tp,
                        .backend = RT_BACKEND_CUDA,
                        .cuda_graphs_off = !graphs};
    rt_model *m = NULL;
    char err[512];
    if (rt_model_load(&m, o->model, &mo, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_decode_cuda: %s\n", err);
        return NULL;
    }
    return m;
}

/* Decode tok/s of `batch` sequences on m (0 on failure). */
static double run(rt_model *m, const bench_opts *o, int batch, double *ms_step)
{
    const int V = rt_model_hparams(m)->n_vocab;
    const int len = o->prompt + o->steps + 8;
    const int per = (len + BLOCK - 1) / BLOCK;
    rt_kv_pool *pool = rt_kv_pool_create(m, batch * per, BLOCK);
    int32_t *blocks = malloc(sizeof(int32_t) * (size_t)batch * per);
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)batch * len);
    float *logits = malloc(sizeof(float) * (size_t)batch * V);
    rt_seq_batch *b = malloc(sizeof(rt_seq_batch) * (size_t)batch);
    int *past = calloc((size_t)batch, sizeof(int));
    double tps = 0.0;
    char err[512];
    if (!pool || rt_kv_pool_blocks(pool) < batch * per || !blocks || !toks || !logits || !b ||
        !past) {
        fprintf(stderr, "bench_decode_cuda: no room for %d sequences of %d tokens\n", batch, len);
        goto out;
    }
    for (int i = 0; i < batch * per; i++)
        blocks[i] = i;
    for (int s = 0; s < batch; s++) {
        int32_t *t = toks + (size_t)s * len;
        for (int i = 0; i < o->prompt; i++)
            t[i] = (int32_t)(1 + (s * 131 + i * 17) % (V - 1));
        rt_seq_batch p = {.tokens = t,
                          .n_tokens = o->prompt,
                          .logits = logits,
                          .pool = pool,
                          .blocks = blocks + (size_t)s * per,
                          .n_blocks = per};
        if (rt_forward(m, &p, 1, err, sizeof(err)) != 0) {
            fprintf(stderr, "bench_decode_cuda: prefill: %s\n", err);
            goto out;
        }
        t[o->prompt] = (int32_t)rt_argmax(logits, V);
        past[s] = o->prompt;
    }
    const int warm = 4;
    double t0 = 0.0;
    for (int k = 0; k < warm + o->steps; k++) {
        if (k == warm)
            t0 = now_s();
        for (int s = 0; s < batch; s++)
            b[s] = (rt_seq_batch){.tokens = toks + (size_t)s * len + past[s],
                                  .n_tokens = 1,
                                  .logits = logits + (size_t)s * V,
                                  .pool = pool,
                                  .blocks = blocks + (size_t)s * per,
                                  .n_blocks = per,
                                  .n_past = past[s]};
        if (rt_forward(m, b, batch, err, sizeof(err)) != 0) {
            fprintf(stderr, "bench_decode_cuda: decode: %s\n", err);
            goto out;
        }
        for (int s = 0; s < batch; s++) {
            past[s]++;
            toks[(size_t)s * len + past[s]] = (int32_t)rt_argmax(logits + (size_t)s * V, V);
        }
    }
    const double dt = now_s() - t0;
    *ms_step = dt / o->steps * 1e3;
    tps = (double)batch * o->steps / dt;
out:
    free(past);
    free(b);
    free(logits);
    free(toks);
    free(blocks);
    rt_kv_pool_destroy(pool);
    return tps;
}

static int parse(int argc, char **argv, bench_opts *o)
{
    static char model[4096];
    const char *shared = getenv("SIEVE_SHARED_DIR");
    snprintf(model, sizeof(model), "%s/models/stories260K.gguf", shared ? shared : "../shared");
    *o = (bench_opts){.model = model,
                      .batches = {1, 16, 64},
                      .n_batches = 3,
                      .steps = 200,
                      .prompt = 16,
                      .tp = 1};
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "bench_decode_cuda: %s needs a value\n", argv[i]);
            return -1;
        }
        if (strcmp(argv[i], "--model") == 0) {
            o->model = v;
        } else if (strcmp(argv[i], "--steps") == 0) {
            o->steps = atoi(v);
        } else if (strcmp(argv[i], "--prompt") == 0) {
            o->prompt = atoi(v);
        } else if (strcmp(argv[i], "--tp") == 0) {
            o->tp = atoi(v);
        } else if (strcmp(argv[i], "--batch") == 0) {
            o->n_batches = 0;
            for (const char *p = v; *p && o->n_batches < MAX_BATCHES;) {
                o->batches[o->n_batches++] = atoi(p);
                p = strchr(p, ',');
                if (!p)
                    break;
                p++;
            }
        } else {
            fprintf(stderr, "usage: bench_decode_cuda [--model PATH] [--batch 1,16,64] "
                            "[--steps N] [--prompt N] [--tp N]\n");
            return -1;
        }
        i++;
    }
    for (int i = 0; i < o->n_batches; i++)
        if (o->batches[i] < 1 || o->batches[i] > 1024)
            return fprintf(stderr, "bench_decode_cuda: batch %d out of [1, 1024]\n", o->batches[i]),
                   -1;
    if (o->steps < 1 || o->prompt < 1 || o->tp < 1)
        return fprintf(stderr, "bench_decode_cuda: --steps, --prompt and --tp must be >= 1\n"), -1;
    return 0;
}

int main(int argc, char **argv)
{
    bench_opts o;
    if (parse(argc, argv, &o) != 0)
        return 2;
    const int gpus = rt_backend_cuda_device_count();
    if (!rt_backend_cuda_built() || gpus < 1) {
        printf("bench_decode_cuda: no CUDA device%s: skipped\n",
               rt_backend_cuda_built() ? "" : " (built without CUDA)");
        return 0;
    }
    if (gpus < o.tp) {
        printf("bench_decode_cuda: tp %d needs %d GPUs, %d here: skipped\n", o.tp, o.tp, gpus);
        return 0;
    }
    int max_batch = 64;
    for (int i = 0; i < o.n_batches; i++)
        max_batch = o.batches[i] > max_batch ? o.batches[i] : max_batch;
    max_batch = max_batch > o.prompt ? max_batch : o.prompt;
    rt_model *with = load(&o, max_batch, true), *without = load(&o, max_batch, false);
    if (!with || !without) {
        rt_model_destroy(with);
        rt_model_destroy(without);
        return 1;
    }
    printf("bench_decode_cuda: %s, tp %d, prompt %d, %d timed steps\n", o.model, o.tp, o.prompt,
           o.steps);
    for (int i = 0; i < o.n_batches; i++) {
        double ms_g = 0.0, ms_e = 0.0;
        const double g = run(with, &o, o.batches[i], &ms_g);
        const double e = run(without, &o, o.batches[i], &ms_e);
        printf("decode batch %3d: graphs %10.0f tok/s (%7.3f ms/step)  eager %10.0f tok/s "
               "(%7.3f ms/step)  graphs/eager %.2fx\n",
               o.batches[i], g, ms_g, e, ms_e, e > 0.0 ? g / e : 0.0);
    }
    rt_graph_stats gs;
    rt_model_graph_stats(with, &gs);
    printf("graphs: %ld captured, %ld replays, %ld graph-shaped steps run eagerly\n", gs.captured,
           gs.replayed, gs.eager);
    rt_model_destroy(with);
    rt_model_destroy(without);
    return 0;
}
