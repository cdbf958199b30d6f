/*
 * bench_runtime.c - single-stream speed of the CPU runtime.
 *
 * Prints prefill tok/s for a long prompt (default 1499 tokens, as in
 * shared/baselines/llama-cpp-cpu.md) and decode tok/s for 128 greedy tokens
 * after a short prompt, median of several runs. Measures the runtime alone
 * (no HTTP), so it is the engine's ceiling.
 *
 *   bench_runtime [--model PATH] [--threads N] [--prompt-tokens N]
 *                 [--gen-tokens N] [--runs N] [--batch N] [--seqs N] [--tp N]
 *                 [--long-decode 1]
 *
 * --long-decode 1 also times the generation right after the long prompt
 * (context n_prompt .. n_prompt + gen), where attention reads the prompt's K/V
 * at every step.
 * --tp N splits the model over N tensor-parallel ranks (rt_model_opts.tp),
 * each with max(1, threads / N) compute threads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/model.h"
#include "runtime/sampler.h"
#include "scheduler/scheduler.h"

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* A prompt of exactly n tokens: BOS and story text repeated. */
static int32_t *make_prompt(const rt_tokenizer *tok, int n)
{
    static const char *text =
        " Once upon a time, there was a little girl named Lily. She loved to play outside in "
        "the park with her friends. One day, she saw a big red ball under a tree.";
    int32_t *out = malloc(sizeof(int32_t) * (size_t)n);
    int32_t *ids;
    size_t m;
    if (!out || rt_tokenize(tok, text, strlen(text), false, false, &ids, &m) != 0 || m == 0)
        exit(1);
    out[0] = rt_tokenizer_bos(tok);
    for (int i = 1; i < n; i++)
        out[i] = ids[(size_t)(i - 1) % m];
    free(ids);
    return out;
}

int main(int argc, char **argv)
{
    const char *shared = getenv("SIEVE_SHARED_DIR");
    char model_path[1024];
    snprintf(model_path, sizeof(model_path), "%s/models/stories260K.gguf",
             shared ? shared : "../shared");
    int threads = 0, n_prompt = 1499, n_gen = 128, runs = 5, batch = 512, seqs = 16, tp = 1;
    int long_decode = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model"))
            snprintf(model_path, sizeof(model_path), "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt-tokens"))
            n_prompt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--gen-tokens"))
            n_gen = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--runs"))
            runs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch"))
            batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seqs"))
            seqs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--tp"))
            tp = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--long-decode"))
            long_decode = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (threads <= 0)
        threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (runs < 1 || runs > 100 || n_prompt < 17 || n_gen < 1 || seqs < 1 || seqs > 256)
        return 2;
    rt_model_opts o = {.n_threads = threads, .max_batch_tokens = batch, .n_ctx = 0, .tp = tp};
    rt_model *m;
    char err[512];
    if (rt_model_load(&m, model_path, &o, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_runtime: %s\n", err);
        return 1;
    }
    if (n_prompt + n_gen > rt_model_n_ctx(m)) {
        fprintf(stderr, "bench_runtime: prompt + generation exceed the context\n");
        return 2;
    }
    const int n_vocab = rt_model_hparams(m)->n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)n_vocab);
    int32_t *prompt = make_prompt(rt_model_tokenizer(m), n_prompt);
    double prefill[100], decode[100], decode_long[100];
    for (int r = 0; r < runs; r++) {
        /* Prefill: chunks of max_batch_tokens, as the engine runs them. */
        rt_kv *kv = rt_kv_create(m, n_prompt + (long_decode ? n_gen : 0));
        double t0 = sched_now();
        for (int i = 0; i < n_prompt; i += batch) {
            int n = n_prompt - i < batch ? n_prompt - i : batch;
            rt_seq_batch b = {.kv = kv,
                              .tokens = prompt + i,
                              .n_tokens = n,
                              .logits = i + n == n_prompt ? logits : NULL};
            if (rt_forward(m, &b, 1, err, sizeof(err)) != 0) {
                fprintf(stderr, "bench_runtime: %s\n", err);
                return 1;
            }
        }
        prefill[r] = n_prompt / (sched_now() - t0);
        if (long_decode) {
            /* Decode right after the long prompt: every step's attention
             * reads the whole prompt's K/V. */
            t0 = sched_now();
            for (int t = 0; t < n_gen; t++) {
                int32_t tok = rt_argmax(logits, n_vocab);
                rt_seq_batch b = {.kv = kv, .tokens = &tok, .n_tokens = 1, .logits = logits};
                rt_forward(m, &b, 1, err, sizeof(err));
            }
            decode_long[r] = n_gen / (sched_now() - t0);
        }
        rt_kv_destroy(kv);

        /* Decode: 16-token prompt, then n_gen greedy tokens one at a time. */
        kv = rt_kv_create(m, 16 + n_gen);
        rt_seq_batch b = {.kv = kv, .tokens = prompt, .n_tokens = 16, .logits = logits};
        rt_forward(m, &b, 1, err, sizeof(err));
        t0 = sched_now();
        for (int t = 0; t < n_gen; t++) {
            int32_t tok = rt_argmax(logits, n_vocab);
            b = (rt_seq_batch){.kv = kv, .tokens = &tok, .n_tokens = 1, .logits = logits};
            rt_forward(m, &b, 1, err, sizeof(err));
        }
        decode[r] = n_gen / (sched_now() - t0);
        rt_kv_destroy(kv);
    }
    const rt_hparams *hp = rt_model_hparams(m);
    printf("model            %s (dim %d, %d layers, vocab %d)\n", model_path, hp->dim, hp->n_layers,
           hp->n_vocab);
    printf("threads          %d, tp %d, prefill chunk %d tokens, %d runs (median)\n", threads, tp,
           batch, runs);
    printf("prefill          %d tokens: %.0f tok/s (%.3f s)\n", n_prompt, median(prefill, runs),
           n_prompt / median(prefill, runs));
    printf("decode           %d tokens: %.0f tok/s\n", n_gen, median(decode, runs));
    if (long_decode)
        printf("decode after prompt %d tokens at context %d-%d: %.0f tok/s\n", n_gen, n_prompt,
               n_prompt + n_gen, median(decode_long, runs));
    /* Batched decode: `seqs` sequences of 16-token prompts decoding together in
     * one step each, as the engine runs concurrent requests. */
    if (seqs > 1) {
        rt_kv *kvs[256];
        float *lg = malloc(sizeof(float) * (size_t)n_vocab * (size_t)seqs);
        int32_t toks[256];
        rt_seq_batch bb[256];
        double agg[100];
        for (int r = 0; r < runs; r++) {
            for (int q = 0; q < seqs; q++) {
                kvs[q] = rt_kv_create(m, 16 + n_gen);
                bb[q] = (rt_seq_batch){.kv = kvs[q],
                                       .tokens = prompt,
                                       .n_tokens = 16,
                                       .logits = lg + (size_t)q * (size_t)n_vocab};
            }
            rt_forward(m, bb, seqs, err, sizeof(err));
            double t0 = sched_now();
            for (int t = 0; t < n_gen; t++) {
                for (int q = 0; q < seqs; q++) {
                    toks[q] = rt_argmax(lg + (size_t)q * (size_t)n_vocab, n_vocab);
                    bb[q] = (rt_seq_batch){.kv = kvs[q],
                                           .tokens = &toks[q],
                                           .n_tokens = 1,
                                           .logits = lg + (size_t)q * (size_t)n_vocab};
                }
                rt_forward(m, bb, seqs, err, sizeof(err));
            }
            agg[r] = (double)n_gen * seqs / (sched_now() - t0);
            for (int q = 0; q < seqs; q++)
                rt_kv_destroy(kvs[q]);
        }
        printf("batched decode   %d sequences x %d tokens: %.0f tok/s aggregate\n", seqs, n_gen,
               median(agg, runs));
        free(lg);
    }
    free(prompt);
    free(logits);
    rt_model_destroy(m);
    return 0;
}
