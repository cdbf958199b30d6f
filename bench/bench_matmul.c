/*
 * bench_matmul.c - speed of y = x W^T per weight type against the memory
 * roofline, all in one run.
 *
 * 1. Triad bandwidth (a = b + s c over 3 x 128 MiB, threaded with the same
 *    pool), the roofline of a matrix-vector product: it streams its weights
 *    once. Measured again before each type, since the bandwidth of a shared
 *    machine drifts; each type's shares use the triad taken next to it.
 * 2. Matrix-vector products (M = 1) on the synth768 shapes (N x K = 768x768,
 *    2048x768, 768x2048, 512x768). Each shape is replicated into enough copies
 *    to exceed the caches (--mb, default 256 MiB of weights) and the copies are
 *    cycled, so weights come from DRAM as in decode: GB/s of weights, GFLOP/s,
 *    and the share of the triad bandwidth.
 * 3. A decode sweep: the matrix-vector products of one token of the synth768
 *    model (12 layers of q, k, v, o, gate, up, down, then the 512-row output;
 *    12 or 4 KV heads), weights per token / time = tok/s ceiling and share.
 * 4. Matrix-matrix products (M = --m rows, default 64) on the same shapes:
 *    GFLOP/s (prefill), the weights warm in cache.
 *
 *   bench_matmul [--threads N] [--types f32,f16,bf16,q8_0,q4_0,q4_k,q5_k,q6_k]
 *                [--mb MiB] [--seconds S] [--m M] [--isa scalar|best]
 *                [--clock wall|cpu]   (cpu: thread CPU time, needs --threads 1)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "kernels/kernels.h"
#include "kernels/quant.h"

typedef struct {
    int N, K;
    const char *what;
} shape;

static const shape SHAPES[] = {{768, 768, "attn q/o"},
                               {2048, 768, "ffn gate/up"},
                               {768, 2048, "ffn down"},
                               {512, 768, "output"}};
#define N_SHAPES (sizeof(SHAPES) / sizeof(SHAPES[0]))

/* Wall time, or with --clock cpu (one thread only) the thread's CPU time: on a
 * machine shared with other work that measures speed while running, for the
 * triad and the products alike. */
static clockid_t bench_clock = CLOCK_MONOTONIC;

static double now(void)
{
    struct timespec ts;
    clock_gettime(bench_clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static void *xalloc(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "bench_matmul: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* ---- triad ---- */

typedef struct {
    float *a, *b, *c;
    size_t n, per_task;
} triad_job;

static void triad_task(void *ctx, int t, int n_tasks)
{
    const triad_job *j = ctx;
    const size_t i0 = (size_t)t * j->per_task;
    const size_t i1 = i0 + j->per_task < j->n ? i0 + j->per_task : j->n;
    for (size_t i = i0; i < i1; i++)
        j->a[i] = j->b[i] + 3.0f * j->c[i];
}

/* Best of several passes, in GB/s (3 arrays counted, as STREAM does). */
static double triad(kern_pool *pool, triad_job *j)
{
    const int tasks = kern_pool_size(pool);
    j->per_task = (j->n + (size_t)tasks - 1) / (size_t)tasks;
    double best = 0.0;
    for (int rep = 0; rep < 6; rep++) {
        const double t0 = now();
        kern_pool_run(pool, triad_task, j, tasks);
        const double gbs = 3.0 * 4.0 * (double)j->n / (now() - t0) / 1e9;
        if (rep > 0 && gbs > best) /* the first pass also faults pages in */
            best = gbs;
    }
    return best;
}

/* ---- weights ---- */

/* `copies` copies of an N x K matrix of `type` (random values quantized once). */
static uint8_t *make_weights(int type, int N, int K, int copies, size_t *bytes_per_copy)
{
    const size_t row = kern_row_bytes(type, K);
    const size_t one = row * (size_t)N;
    uint8_t *w = xalloc(one * (size_t)copies);
    float *f = xalloc((size_t)K * sizeof(float));
    for (int n = 0; n < N; n++) {
        for (int k = 0; k < K; k++)
            f[k] = 0.02f * rnd();
        if (kern_quant_row(type, f, w + (size_t)n * row, (size_t)K) != 0) {
            fprintf(stderr, "bench_matmul: cannot quantize to %s\n", kern_type_name(type));
            exit(1);
        }
    }
    for (int c = 1; c < copies; c++)
        memcpy(w + (size_t)c * one, w, one);
    free(f);
    *bytes_per_copy = one;
    return w;
}

static void run_q(kern_pool *pool, int type, float *y, const float *x, const void *w, int M, int N,
                  int K)
{
    int rc = kern_matmul_q(pool, type, y, N, x, K, w, M, N, K);
    if (rc != 0) {
        fprintf(stderr, "bench_matmul: kern_matmul_q(%s): %s\n", kern_type_name(type),
                kern_quant_strerror(rc));
        exit(1);
    }
}

/* ---- sections ---- */

static void bench_matvec(kern_pool *pool, int type, size_t ws_bytes, double seconds, double bw)
{
    float *x = xalloc(2048 * sizeof(float)), *y = xalloc(2048 * sizeof(float));
    for (int i = 0; i < 2048; i++)
        x[i] = rnd();
    for (size_t s = 0; s < N_SHAPES; s++) {
        const int N = SHAPES[s].N, K = SHAPES[s].K;
        size_t one;
        const size_t row = kern_row_bytes(type, K);
        int copies = (int)(ws_bytes / (row * (size_t)N)) + 1;
        uint8_t *w = make_weights(type, N, K, copies, &one);
        for (int c = 0; c < copies; c++) /* warm-up: page faults, scratch */
            run_q(pool, type, y, x, w + (size_t)c * one, 1, N, K);
        long calls = 0;
        const double t0 = now();
        double t1;
        do {
            for (int c = 0; c < copies; c++)
                run_q(pool, type, y, x, w + (size_t)c * one, 1, N, K);
            calls += copies;
            t1 = now();
        } while (t1 - t0 < seconds);
        const double per = (t1 - t0) / (double)calls;
        const double gbs = (double)one / per / 1e9;
        printf("  matvec %-5s %4dx%-4d %-11s %8.1f us %7.2f GB/s %6.2f GFLOP/s %5.1f%% of triad\n",
               kern_type_name(type), N, K, SHAPES[s].what, per * 1e6, gbs, 2.0 * N * K / per / 1e9,
               100.0 * gbs / bw);
        free(w);
    }
    free(x);
    free(y);
}

/* One decode token's products of the synth768 model (dim 768, 12 layers, FFN
 * 2048, vocab 512) with n_kv KV heads of 64. */
static void bench_decode(kern_pool *pool, int type, int n_kv, double seconds, double bw)
{
    enum { DIM = 768, FFN = 2048, VOCAB = 512, LAYERS = 12 };
    const int kvd = n_kv * 64;
    const struct {
        int N, K;
    } mats[] = {{DIM, DIM}, {kvd, DIM}, {kvd, DIM}, {DIM, DIM}, {FFN, DIM}, {FFN, DIM}, {DIM, FFN}};
    const int per_layer = (int)(sizeof(mats) / sizeof(mats[0]));
    uint8_t *w[7];
    size_t one[7], total = 0;
    for (int i = 0; i < per_layer; i++) {
        w[i] = make_weights(type, mats[i].N, mats[i].K, LAYERS, &one[i]);
        total += one[i] * LAYERS;
    }
    size_t one_out;
    uint8_t *wout = make_weights(type, VOCAB, DIM, 1, &one_out);
    total += one_out;
    float *x = xalloc(FFN * sizeof(float)), *y = xalloc(FFN * sizeof(float));
    for (int i = 0; i < FFN; i++)
        x[i] = rnd();
    long tokens = 0;
    double t0 = 0.0, t1;
    for (int warm = 1;; warm = 0) {
        if (!warm && tokens == 0)
            t0 = now();
        for (int l = 0; l < LAYERS; l++)
            for (int i = 0; i < per_layer; i++)
                run_q(pool, type, y, x, w[i] + (size_t)l * one[i], 1, mats[i].N, mats[i].K);
        run_q(pool, type, y, x, wout, 1, VOCAB, DIM);
        if (warm)
            continue;
        tokens++;
        t1 = now();
        if (t1 - t0 >= seconds)
            break;
    }
    const double per = (t1 - t0) / (double)tokens;
    const double gbs = (double)total / per / 1e9;
    printf("  decode %-5s synth768%-4s %6.1f MB/token %7.1f tok/s %7.2f GB/s %5.1f%% of triad "
           "(roofline %.1f tok/s)\n",
           kern_type_name(type), n_kv == 12 ? "" : "-gqa", (double)total / 1e6, 1.0 / per, gbs,
           100.0 * gbs / bw, bw * 1e9 / (double)total);
    for (int i = 0; i < per_layer; i++)
        free(w[i]);
    free(wout);
    free(x);
    free(y);
}

static void bench_gemm(kern_pool *pool, int type, int M, double seconds)
{
    float *x = xalloc((size_t)M * 2048 * sizeof(float));
    float *y = xalloc((size_t)M * 2048 * sizeof(float));
    for (size_t i = 0; i < (size_t)M * 2048; i++)
        x[i] = rnd();
    for (size_t s = 0; s < N_SHAPES; s++) {
        const int N = SHAPES[s].N, K = SHAPES[s].K;
        size_t one;
        uint8_t *w = make_weights(type, N, K, 1, &one);
        run_q(pool, type, y, x, w, M, N, K);
        long calls = 0;
        const double t0 = now();
        double t1;
        do {
            run_q(pool, type, y, x, w, M, N, K);
            calls++;
            t1 = now();
        } while (t1 - t0 < seconds);
        const double per = (t1 - t0) / (double)calls;
        printf("  gemm   %-5s %4dx%-4d M=%-4d %10.1f us %7.1f GFLOP/s\n", kern_type_name(type), N,
               K, M, per * 1e6, 2.0 * M * N * K / per / 1e9);
        free(w);
    }
    free(x);
    free(y);
}

static int parse_type(const char *s)
{
    static const struct {
        const char *name;
        int type;
    } names[] = {{"f32", KERN_TYPE_F32},   {"f16", KERN_TYPE_F16},   {"bf16", KERN_TYPE_BF16},
                 {"q8_0", KERN_TYPE_Q8_0}, {"q4_0", KERN_TYPE_Q4_0}, {"q4_k", KERN_TYPE_Q4_K},
                 {"q5_k", KERN_TYPE_Q5_K}, {"q6_k", KERN_TYPE_Q6_K}};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcasecmp(s, names[i].name))
            return names[i].type;
    return -1;
}

int main(int argc, char **argv)
{
    int threads = (int)sysconf(_SC_NPROCESSORS_ONLN), M = 64;
    double seconds = 0.4, mb = 256;
    char types_arg[256] = "f32,f16,bf16,q8_0,q4_0,q4_k,q5_k,q6_k";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--types"))
            snprintf(types_arg, sizeof(types_arg), "%s", argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--mb"))
            mb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--m"))
            M = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--clock"))
            bench_clock = !strcmp(argv[i + 1], "cpu") ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC;
        else if (!strcmp(argv[i], "--isa"))
            kern_quant_set_isa(!strcmp(argv[i + 1], "scalar") ? KERN_ISA_SCALAR : KERN_ISA_AVX2);
        else {
            fprintf(stderr, "bench_matmul: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (threads < 1 || M < 1 || seconds <= 0 || mb <= 0 ||
        (bench_clock != CLOCK_MONOTONIC && threads != 1)) {
        fprintf(stderr, "bench_matmul: bad option value (--clock cpu needs --threads 1)\n");
        return 2;
    }
    kern_pool *pool = kern_pool_create(threads);
    triad_job tj = {.n = (size_t)32 << 20};
    tj.a = xalloc(tj.n * 4);
    tj.b = xalloc(tj.n * 4);
    tj.c = xalloc(tj.n * 4);
    for (size_t i = 0; i < tj.n; i++) {
        tj.a[i] = 0.0f;
        tj.b[i] = 1.0f;
        tj.c[i] = 2.0f;
    }
    printf("bench_matmul: %d threads, quantized kernels %s, weights cycled over %.0f MiB, %s "
           "time\n",
           threads, kern_quant_isa() == KERN_ISA_AVX2 ? "AVX2" : "scalar", mb,
           bench_clock == CLOCK_MONOTONIC ? "wall" : "thread CPU");
    char *save = NULL;
    for (char *tok = strtok_r(types_arg, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        const int type = parse_type(tok);
        if (type < 0) {
            fprintf(stderr, "bench_matmul: unknown type %s\n", tok);
            return 2;
        }
        const double bw = triad(pool, &tj);
        printf("%s (triad %.2f GB/s)\n", kern_type_name(type), bw);
        bench_matvec(pool, type, (size_t)(mb * 1048576.0), seconds, bw);
        bench_decode(pool, type, 12, 2 * seconds, bw);
        bench_decode(pool, type, 4, 2 * seconds, bw);
        bench_gemm(pool, type, M, seconds);
    }
    printf("triad at the end: %.2f GB/s\n", triad(pool, &tj));
    free(tj.a);
    free(tj.b);
    free(tj.c);
    kern_pool_destroy(pool);
    kern_quant_scratch_free();
    return 0;
}
