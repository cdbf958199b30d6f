/*
 * bench_attention.c - achieved GFLOP/s of the CPU attention kernels on the
 * shapes of a prefill chunk and of a decode step.
 *
 * Prefill: kern_attention_block_sparse_f32 with every causal block selected
 * (what runtime/forward.c's dense_attention runs for chunks of >= 128 rows),
 * a chunk of n_q query rows at the end of a context of ctx positions, 64-token
 * blocks. Decode: kern_attention_f32 with one query row. FLOPs count 4 *
 * head_dim per (query head, query row, key) pair inside the causal mask: 2 *
 * head_dim for q.k and 2 * head_dim for p.v.
 *
 *   bench_attention [--threads N] [--heads H] [--kv-heads HKV] [--head-dim D]
 *                   [--rows R] [--ctx 512,1024,1499] [--repeat N] [--cpu]
 * --cpu times with the process CPU clock (use with --threads 1 on a busy machine).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/kernels.h"

/* Process CPU time instead of wall time (--cpu): with --threads 1 it leaves out
 * the time other processes of a shared machine hold the core. */
static int use_cpu_clock;

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(use_cpu_clock ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static float *random_floats(size_t n, unsigned *seed)
{
    float *x = malloc(sizeof(float) * n);
    if (!x)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        x[i] = (float)((*seed >> 8) & 0xffff) / 32768.0f - 1.0f;
    }
    return x;
}

/* Causal (row, key) pairs of n_q rows ending at position ctx - 1. */
static double causal_pairs(int n_q, int ctx)
{
    double s = 0.0;
    for (int r = 0; r < n_q; r++)
        s += ctx - n_q + r + 1;
    return s;
}

typedef struct {
    kern_pool *pool;
    kern_attn_args a;
    kern_block_mask m;
    int sparse;
} bench_case;

static void run_case(const bench_case *c)
{
    if (c->sparse) {
        if (kern_attention_block_sparse_f32(c->pool, &c->a, &c->m) != KERN_SPARSE_OK) {
            fprintf(stderr, "block-sparse kernel refused the shape\n");
            exit(1);
        }
    } else {
        kern_attention_f32(c->pool, &c->a);
    }
}

/* Median seconds of one call over repeat timed runs of enough calls each. */
static double time_case(const bench_case *c, int repeat)
{
    run_case(c);
    double t0 = wall_now();
    int calls = 0;
    while (wall_now() - t0 < 0.05 || calls < 1) {
        run_case(c);
        calls++;
    }
    double *ts = malloc(sizeof(double) * (size_t)repeat);
    for (int i = 0; i < repeat; i++) {
        t0 = wall_now();
        for (int k = 0; k < calls; k++)
            run_case(c);
        ts[i] = (wall_now() - t0) / calls;
    }
    qsort(ts, (size_t)repeat, sizeof(double), cmp_double);
    const double med = ts[repeat / 2];
    free(ts);
    return med;
}

int main(int argc, char **argv)
{
    int threads = 2, heads = 12, kv_heads = 12, hd = 64, rows = 512, repeat = 7;
    char ctx_list[256] = "512,1024,1499";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--heads") && i + 1 < argc)
            heads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--kv-heads") && i + 1 < argc)
            kv_heads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--head-dim") && i + 1 < argc)
            hd = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc)
            rows = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--repeat") && i + 1 < argc)
            repeat = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--cpu"))
            use_cpu_clock = 1;
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc)
            snprintf(ctx_list, sizeof ctx_list, "%s", argv[++i]);
        else {
            fprintf(stderr,
                    "usage: bench_attention [--threads N] [--heads H] [--kv-heads HKV] "
                    "[--head-dim D] [--rows R] [--ctx 512,1024,1499] [--repeat N] [--cpu]\n");
            return 2;
        }
    }
    if (threads < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || hd < 1 ||
        hd > KERN_ATTN_MAX_HEAD_DIM || rows < 1 || repeat < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    kern_pool *pool = kern_pool_create(threads);
    printf("threads %d, heads %d/%d, head_dim %d, flops = 4*head_dim per causal pair\n", threads,
           heads, kv_heads, hd);
    printf("%-8s %6s %6s %10s %10s\n", "kernel", "n_q", "ctx", "ms", "GFLOP/s");
    for (char *tok = strtok(ctx_list, ","); tok; tok = strtok(NULL, ",")) {
        const int ctx = atoi(tok);
        if (ctx < 1)
            continue;
        unsigned seed = 12345u + (unsigned)ctx;
        const int kvw = kv_heads * hd;
        float *q = random_floats((size_t)ctx * heads * hd, &seed);
        float *k = random_floats((size_t)ctx * kvw, &seed);
        float *v = random_floats((size_t)ctx * kvw, &seed);
        float *out = malloc(sizeof(float) * (size_t)ctx * heads * hd);
        const int n_q = rows < ctx ? rows : ctx;
        bench_case c = {.pool = pool,
                        .a = {.q = q,
                              .k = k,
                              .v = v,
                              .out = out,
                              .n_q = n_q,
                              .ctx_len = ctx,
                              .n_heads = heads,
                              .n_kv_heads = kv_heads,
                              .head_dim = hd,
                              .kv_stride = kvw},
                        .sparse = 1};
        const size_t words = kern_block_mask_words(64, 1, ctx, n_q);
        uint64_t *bits = malloc(sizeof(uint64_t) * words);
        kern_block_mask_init(&c.m, bits, words, 64, 1, ctx, n_q);
        kern_block_mask_fill_causal(&c.m);
        double t = time_case(&c, repeat);
        double flops = 4.0 * hd * heads * causal_pairs(n_q, ctx);
        printf("%-8s %6d %6d %10.3f %10.1f\n", "prefill", n_q, ctx, 1e3 * t, flops / t * 1e-9);
        c.sparse = 0;
        c.a.q = q + (size_t)(n_q - 1) * heads * hd;
        c.a.n_q = 1;
        t = time_case(&c, repeat);
        flops = 4.0 * hd * heads * ctx;
        printf("%-8s %6d %6d %10.3f %10.1f\n", "decode", 1, ctx, 1e3 * t, flops / t * 1e-9);
        free(bits);
        free(q);
        free(k);
        free(v);
        free(out);
    }
    kern_pool_destroy(pool);
    return 0;
}
