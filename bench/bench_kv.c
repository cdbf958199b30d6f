/*
 * bench_kv.c - how many sequences a fixed KV budget holds, and how fast they
 * decode, for each KV cache format (fp, int8, int4, zip), in one run.
 *
 *   bench_kv [--model PATH] [--threads N] [--seq-len N] [--gen N]
 *            [--budget-seqs N] [--zip-salient F] [--zip-bits H,L]
 *
 * Defaults follow issue 7: the 768-dim synthetic model
 * (tools/gen_model.py --preset synth768 --gguf /tmp/synth768-f32.gguf),
 * 2048-token sequences, a budget that holds --budget-seqs (2) fp sequences of
 * seq-len + gen tokens, and 32 decode steps.
 *
 * For each format the pool (exactly the budget) is filled the way the engine
 * fills it, with the engine's block manager and compressed-page slab: a
 * sequence is admitted while its prompt's peak fits (fp and zip write the
 * whole prompt as f32 rows first; int8/int4 pack chunk by chunk and need only
 * their pages) and, once packed, every sequence held can still decode --gen
 * tokens (the growth is measured on a probe sequence of the format first).
 * To keep the run short the prompt's KV is computed once (in blocks outside
 * the budget): fp and zip sequences copy it into their own blocks, as a
 * prefix-cache hit would be; int8/int4 sequences read it in place and pack
 * it, which costs the budget exactly what their direct prefill would. Each
 * sequence then computes its last prompt token and packs its own pages.
 * (zip's saliency then comes from that last row only; this changes which
 * tokens are salient, not how many, nor the bytes or the speed.) Then every
 * admitted sequence decodes --gen tokens together, and the first n_fp of them
 * (fp's capacity) decode again at equal batch size.
 *
 * Prints per format: pool bytes per token, sequences held, the ratio to fp
 * (f32 on the CPU) and to "f16-equivalent fp" (half the f32 bytes, what fp
 * costs on a GPU), and decode tok/s at fp's batch size and at capacity.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/model.h"
#include "runtime/sampler.h"
#include "scheduler/block_manager.h"
#include "scheduler/kv_slab.h"
#include "scheduler/scheduler.h"

#define MAX_SEQS 512 /* one decode step holds at most max_batch_tokens (512) sequences */

typedef struct {
    int32_t *fp; /* fp table: one entry per block of positions, -1 once released */
    bool *own;   /* fp[i] was taken from the budget (else: the shared prompt blocks) */
    int n_fp;
    int n_tokens;
    rt_kvq *kvq;
    int32_t next;
    double peak; /* most blocks' worth held at once (during a step, before releasing) */
} seq;

typedef struct {
    sched_bm *bm; /* the budget's blocks */
    sched_slab *slab;
    rt_kv_pool *pool;
    double block_bytes;
} budget_t;

static void seq_free(seq *s, budget_t *B)
{
    for (int i = 0; i < s->n_fp; i++)
        if (s->fp[i] >= 0 && s->own[i])
            sched_bm_give(B->bm, s->fp[i]);
    sched_slab_give_kvq(B->slab, s->kvq);
    rt_kvq_destroy(s->kvq);
    free(s->fp);
    free(s->own);
    memset(s, 0, sizeof(*s));
}

/* Slots for a step of n tokens: fp blocks when the step writes f32 rows,
 * compressed pages from the slab. -1 when the budget is short. */
static int reserve(seq *s, int n, int bs, budget_t *B)
{
    if (!s->kvq || rt_kvq_needs_fp(s->kvq, n))
        while (s->n_fp * bs < s->n_tokens + n) {
            const int32_t id = sched_bm_take(B->bm);
            if (id < 0)
                return -1;
            s->own[s->n_fp] = true;
            s->fp[s->n_fp++] = id;
        }
    if (s->kvq && sched_slab_feed_kvq(B->slab, s->kvq, s->n_tokens, n) != 0)
        return -1;
    return 0;
}

/* What the scheduler does after a step: the fp blocks below the compressed
 * positions go back (all of them once everything is compressed). */
static void release_compressed(seq *s, int bs, budget_t *B)
{
    if (!s->kvq)
        return;
    const int nc = rt_kvq_n_compressed(s->kvq);
    const int rel = nc >= s->n_fp * bs ? s->n_fp : nc / bs;
    for (int i = 0; i < rel; i++)
        if (s->fp[i] >= 0) {
            if (s->own[i])
                sched_bm_give(B->bm, s->fp[i]);
            s->fp[i] = -1;
        }
}

/* Blocks' worth held from the budget: owned fp blocks and pages. */
static double blocks_held(const seq *s, const budget_t *B)
{
    double n = rt_kvq_bytes_held(s->kvq) / B->block_bytes;
    for (int i = 0; i < s->n_fp; i++)
        n += s->fp[i] >= 0 && s->own[i];
    return n;
}

/* One decode step of seqs[0..n): each feeds its next token. */
static int decode_step(rt_model *m, seq *seqs, int n, budget_t *B, float *lg, rt_seq_batch *b)
{
    rt_kv_pool *pool = B->pool;
    const int bs = rt_kv_pool_block_size(pool), nv = rt_model_hparams(m)->n_vocab;
    char err[256];
    for (int i = 0; i < n; i++) {
        if (reserve(&seqs[i], 1, bs, B) != 0)
            return -1;
        const double held = blocks_held(&seqs[i], B);
        seqs[i].peak = held > seqs[i].peak ? held : seqs[i].peak;
        b[i] = (rt_seq_batch){.tokens = &seqs[i].next,
                              .n_tokens = 1,
                              .logits = lg + (size_t)i * nv,
                              .pool = pool,
                              .blocks = seqs[i].fp,
                              .n_blocks = seqs[i].n_fp,
                              .n_past = seqs[i].n_tokens,
                              .kvq = seqs[i].kvq};
    }
    if (rt_forward(m, b, n, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_kv: decode: %s\n", err);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        seqs[i].n_tokens++;
        seqs[i].next = rt_argmax(lg + (size_t)i * nv, nv);
        release_compressed(&seqs[i], bs, B);
    }
    return 0;
}

int main(int argc, char **argv)
{
    char model_path[1024] = "/tmp/synth768-f32.gguf";
    int threads = 0, seq_len = 2048, gen = 32, budget_seqs = 2, hb = 4, lb = 2;
    float salient = 0.6f;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model"))
            snprintf(model_path, sizeof(model_path), "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seq-len"))
            seq_len = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--gen"))
            gen = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--budget-seqs"))
            budget_seqs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--zip-salient"))
            salient = (float)atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--zip-bits")) {
            if (sscanf(argv[i + 1], "%d,%d", &hb, &lb) != 2)
                return 2;
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (threads <= 0)
        threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (seq_len < 2 || gen < 1 || budget_seqs < 1)
        return 2;
    rt_model_opts o = {.n_threads = threads, .max_batch_tokens = 512, .n_ctx = seq_len + gen + 16};
    rt_model *m;
    char err[512];
    if (rt_model_load(&m, model_path, &o, err, sizeof(err)) != 0) {
        fprintf(stderr,
                "bench_kv: %s (make it with tools/gen_model.py --preset synth768 --gguf "
                "%s)\n",
                err, model_path);
        return 1;
    }
    const rt_hparams *hp = rt_model_hparams(m);
    const int bs = 16, nv = hp->n_vocab;
    const size_t fp_tok = rt_kv_bytes_per_token(m);
    const int per_seq = (seq_len + gen + bs - 1) / bs + 1;
    const int budget = budget_seqs * per_seq; /* blocks */
    const int prefix_blocks = (seq_len + bs - 1) / bs;
    rt_kv_pool *pool = rt_kv_pool_create(m, budget + prefix_blocks, bs);
    if (!pool) {
        fprintf(stderr, "bench_kv: no memory for the pool\n");
        return 1;
    }
    printf("model          %s (dim %d, %d layers, %d kv heads x %d)\n", model_path, hp->dim,
           hp->n_layers, hp->n_kv_heads, hp->head_dim);
    printf("budget         %d blocks of %d tokens = %.1f MiB (%d fp sequences of %d + %d "
           "tokens), %d threads\n",
           budget, bs, (double)budget * bs * (double)fp_tok / 1048576.0, budget_seqs, seq_len, gen,
           threads);

    /* The prompt's KV, once, in the blocks after the budget. */
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)seq_len);
    for (int i = 0; i < seq_len; i++)
        prompt[i] = 1 + (int32_t)((i * 7919u) % (unsigned)(nv - 1));
    int32_t prefix[4096];
    for (int i = 0; i < prefix_blocks; i++)
        prefix[i] = budget + i;
    const double tp0 = sched_now();
    for (int i = 0; i < seq_len - 1; i += 512) {
        const int n = seq_len - 1 - i < 512 ? seq_len - 1 - i : 512;
        rt_seq_batch b = {.tokens = prompt + i,
                          .n_tokens = n,
                          .pool = pool,
                          .blocks = prefix,
                          .n_blocks = prefix_blocks,
                          .n_past = i};
        if (rt_forward(m, &b, 1, err, sizeof(err)) != 0) {
            fprintf(stderr, "bench_kv: prefill: %s\n", err);
            return 1;
        }
    }
    printf("prompt KV      %d tokens computed once in %.1f s\n", seq_len - 1, sched_now() - tp0);

    static seq seqs[MAX_SEQS];
    float *lg = malloc(sizeof(float) * (size_t)nv * MAX_SEQS);
    rt_seq_batch *batch = malloc(sizeof(rt_seq_batch) * MAX_SEQS);
    const rt_kv_format fmts[4] = {RT_KV_FP, RT_KV_INT8, RT_KV_INT4, RT_KV_ZIP};
    int n_fp_cap = 0;
    double fp_eq_tps = 0.0;
    printf("\n%-6s %12s %15s %6s %9s %14s %16s %18s\n", "format", "bytes/token", "blocks/seq",
           "seqs", "x fp f32", "x fp f16-equiv", "decode tok/s @fp", "decode tok/s @cap");
    for (int fi = 0; fi < 4; fi++) {
        rt_kv_policy pol = {.format = fmts[fi]};
        if (fmts[fi] == RT_KV_ZIP) {
            pol.salient_fraction = salient;
            pol.high_bits = hb;
            pol.low_bits = lb;
        }
        if (rt_kvq_check(m, pool, &pol, err, sizeof(err)) != 0) {
            fprintf(stderr, "bench_kv: %s: %s\n", rt_kv_format_name(fmts[fi]), err);
            return 1;
        }
        /* The budget: blocks [0, budget) of the pool (the shared prompt sits
         * after them), handed out by a block manager and the page slab. */
        budget_t B = {.bm = sched_bm_create(budget, bs, false),
                      .pool = pool,
                      .block_bytes = (double)bs * (double)fp_tok};
        B.slab = B.bm ? sched_slab_create(B.bm) : NULL;
        if (!B.slab) {
            fprintf(stderr, "bench_kv: no memory for the block manager\n");
            return 1;
        }
        /* fp and zip write the whole prompt as f32 rows before packing it (the
         * peak); int8/int4 pack chunk by chunk, so their prompt costs only
         * its pages. */
        const bool fp_prompt = rt_kv_policy_fp_prompt(&pol);
        /* A probe sequence of this format: what it holds after its prompt
         * (c0) and at most while decoding gen tokens (c1). */
        double c0 = 0.0, c1 = 0.0, reserve_each = -1.0;
        int n = 0;
        for (; n < MAX_SEQS; n++) {
            /* Admission: the prompt's peak must fit, and once it is packed
             * every held sequence must still be able to decode gen tokens
             * (reserve_each each, measured on the first one). */
            const int free_blocks = sched_bm_free_count(B.bm);
            if (reserve_each >= 0.0 && ((fp_prompt && free_blocks < prefix_blocks) ||
                                        free_blocks < c0 + reserve_each * (n + 1)))
                break;
            seq *s = &seqs[n];
            memset(s, 0, sizeof(*s));
            s->fp = malloc(sizeof(int32_t) * (size_t)(per_seq + 8));
            s->own = calloc((size_t)(per_seq + 8), sizeof(bool));
            if (fp_prompt) {
                s->n_tokens = 0;
                if (reserve(s, seq_len - 1, bs, &B) != 0) {
                    seq_free(s, &B);
                    break;
                }
                for (int j = 0; j < s->n_fp; j++)
                    rt_kv_pool_copy_block(pool, prefix[j], s->fp[j]);
            } else {
                /* The state a direct prefill reaches costs nothing in fp
                 * blocks: the sequence reads the shared prompt blocks (outside
                 * the budget) like prefix-cache hits and packs them. */
                for (int j = 0; j < prefix_blocks; j++)
                    s->fp[s->n_fp++] = prefix[j];
            }
            s->n_tokens = seq_len - 1;
            if (fmts[fi] != RT_KV_FP) {
                s->kvq = rt_kvq_create(m, pool, &pol, seq_len, seq_len - 1, 1234, err, sizeof(err));
                if (!s->kvq) {
                    fprintf(stderr, "bench_kv: %s\n", err);
                    return 1;
                }
            }
            s->next = prompt[seq_len - 1];
            /* The last prompt token: its step packs the prompt's pages. */
            if (decode_step(m, s, 1, &B, lg, batch) != 0) {
                seq_free(s, &B);
                break;
            }
            if (reserve_each < 0.0) {
                /* The first sequence measures what one sequence grows by while
                 * decoding gen tokens, then starts again from its prompt. */
                c0 = blocks_held(s, &B);
                s->peak = c0;
                for (int t = 0; t < gen; t++)
                    if (decode_step(m, s, 1, &B, lg, batch) != 0)
                        break;
                c1 = s->peak; /* new pages (and fp's tail block) exist during a step */
                reserve_each = c1 > c0 ? c1 - c0 : 0.0;
                seq_free(s, &B);
                n--;
            }
        }
        double held = 0.0;
        for (int i = 0; i < n; i++)
            held += blocks_held(&seqs[i], &B);
        const double bpt = (double)held * bs * (double)fp_tok / ((double)n * seq_len);
        if (fi == 0)
            n_fp_cap = n;
        /* Decode at fp's batch size, then at capacity. */
        const int eq = n_fp_cap < n ? n_fp_cap : n;
        double t0 = sched_now();
        int steps = 0;
        for (; steps < gen / 2; steps++)
            if (decode_step(m, seqs, eq, &B, lg, batch) != 0)
                break;
        const double tps_eq = (double)steps * eq / (sched_now() - t0);
        t0 = sched_now();
        int steps2 = 0;
        for (; steps2 < gen / 2; steps2++)
            if (decode_step(m, seqs, n, &B, lg, batch) != 0)
                break;
        const double tps_cap = (double)steps2 * n / (sched_now() - t0);
        if (fi == 0)
            fp_eq_tps = tps_eq;
        printf("%-6s %12.0f %6.1f -> %6.1f %6d %9.2f %14.2f %9.1f (%.2fx) %18.1f%s\n",
               rt_kv_format_name(fmts[fi]), bpt, c0, c1, n, (double)n / n_fp_cap,
               (double)n / (2.0 * n_fp_cap), tps_eq, tps_eq / fp_eq_tps, tps_cap,
               steps < gen / 2 || steps2 < gen / 2 ? "  (ran out of blocks while decoding)" : "");
        for (int i = 0; i < n; i++)
            seq_free(&seqs[i], &B);
        sched_slab_destroy(B.slab);
        sched_bm_destroy(B.bm);
    }
    printf(
        "\nbytes/token: pool bytes held per prompt token after compression (all layers, K+V,"
        " incl. partly filled pages); blocks/seq: held after the prompt -> at most while decoding;"
        " fp f16-equiv = twice fp's count\n");
    free(lg);
    free(batch);
    free(prompt);
    rt_kv_pool_destroy(pool);
    rt_model_destroy(m);
    return 0;
}
