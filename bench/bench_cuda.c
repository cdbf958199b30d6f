/*
 * bench_cuda.c - each CUDA kernel against its CPU twin, on shapes of
 * Llama-3-8B (dim 4096, 32 query / 8 kv heads of 128, FFN 14336, vocab
 * 128256), plus a batch-1 / batch-64 decode weight stream over the whole
 * model's projections in bf16 against the HBM roofline, decode attention over
 * compressed KV pages (q8, q4, zip4/2, f16, f32) against the fp paged kernel,
 * and block-sparse prefill at a 10% selection against dense.
 *
 *   bench_cuda [--quick] [--threads N] [--hbm-gbs 4300] [--only SECTION,...]
 *
 * Sections (all by default): elementwise, embed, matmul, stream, attention,
 * kvq, sparse.
 *
 * Every row: the op, its shape, GPU time per call (mean over >= 0.2 s), its
 * rate (GB/s of the bytes it must move, or TFLOP/s), the CPU twin's time (a
 * pool of --threads workers, default all cores; "-" where the CPU would take
 * too long), and the speedup. GPU times are host wall clock around queued
 * calls closed by kern_cuda_sync, so launch overhead is included (that is
 * what a step pays). Figures only; nothing is asserted. Without a device (or
 * CUDA) it says so and exits 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/kernels.h"
#include "kernels/quant.h"
#ifdef SIEVE_HAVE_CUDA
#include "kernels/cuda.h"
#endif

#ifndef SIEVE_HAVE_CUDA
int main(void)
{
    printf("bench_cuda: no CUDA device (built without CUDA)\n");
    return 0;
}
#else

#define MIN_SECONDS 0.2
#define MAX_ITERS 2000

static int g_quick;
static kern_pool *g_pool;
static double g_hbm_gbs = 4300.0;

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    char err[512] = "";
    const int rc = kern_cuda_sync(err, sizeof(err));
    fprintf(stderr, "bench_cuda: %s: %s: %s\n", what, kern_cuda_strerror(rc), err);
    exit(1);
}

static void *dev(size_t bytes)
{
    char err[256] = "";
    void *p = kern_cuda_malloc(bytes, err, sizeof(err));
    if (!p) {
        fprintf(stderr, "bench_cuda: %s\n", err);
        exit(1);
    }
    return p;
}

/* A device buffer of uniform values in [lo, hi) (generated on the host once
 * per size class: the values only need to be ordinary numbers). */
static float *dev_random(size_t n, float lo, float hi)
{
    float *h = malloc(sizeof(float) * n);
    if (!h)
        exit(1);
    uint64_t s = 0x9E3779B97F4A7C15ull ^ n;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        h[i] = lo + (hi - lo) * (float)((double)(s >> 11) * 0x1.0p-53);
    }
    float *d = dev(sizeof(float) * n);
    if (kern_cuda_h2d(d, h, sizeof(float) * n, KERN_CUDA_COMPUTE) != 0)
        die("h2d");
    char err[256];
    if (kern_cuda_sync(err, sizeof(err)) != 0)
        die("h2d sync");
    free(h);
    return d;
}

/* A device buffer of the float 0x3c3c3c3c (about 0.0115): for timing only. */
static float *dev_fill(size_t bytes)
{
    float *d = dev(bytes);
    if (kern_cuda_memset(d, 0x3c, bytes, KERN_CUDA_COMPUTE) != 0)
        die("memset");
    return d;
}

static float *host_random(size_t n, float lo, float hi)
{
    float *h = malloc(sizeof(float) * n);
    if (!h)
        exit(1);
    for (size_t i = 0; i < n; i++)
        h[i] = lo + (hi - lo) * (float)rand() / (float)RAND_MAX;
    return h;
}

typedef int (*gpu_fn)(void *ctx);
typedef void (*cpu_fn)(void *ctx);

/* Mean seconds per call of fn, after one warm-up call. */
static double time_gpu(gpu_fn fn, void *ctx)
{
    char err[512] = "";
    if (fn(ctx) != 0 || kern_cuda_sync(err, sizeof(err)) != 0)
        die("warm-up");
    int iters = 0;
    double t0 = now_s(), t = 0.0;
    int batch = 1;
    while (t < MIN_SECONDS && iters < MAX_ITERS) {
        for (int i = 0; i < batch; i++)
            if (fn(ctx) != 0)
                die("call");
        if (kern_cuda_sync(err, sizeof(err)) != 0)
            die("sync");
        iters += batch;
        t = now_s() - t0;
        batch *= 2;
    }
    return t / iters;
}

static double time_cpu(cpu_fn fn, void *ctx)
{
    fn(ctx);
    int iters = 0;
    const double t0 = now_s();
    double t = 0.0;
    while (t < MIN_SECONDS && iters < 50) {
        fn(ctx);
        iters++;
        t = now_s() - t0;
    }
    return t / iters;
}

static void row(const char *op, const char *shape, double gpu_s, double amount, const char *unit,
                double cpu_s)
{
    char cpu[32] = "-", speed[32] = "-";
    if (cpu_s > 0) {
        snprintf(cpu, sizeof(cpu), "%.1f", cpu_s * 1e6);
        snprintf(speed, sizeof(speed), "%.1fx", cpu_s / gpu_s);
    }
    printf("%-22s %-34s %12.1f %10.1f %-7s %12s %9s\n", op, shape, gpu_s * 1e6,
           amount / gpu_s / (unit[0] == 'T' ? 1e12 : 1e9), unit, cpu, speed);
    fflush(stdout);
}

/* ---- elementwise ---- */

typedef struct {
    float *out, *x, *w, *y;
    float *hout, *hx, *hw, *hy;
    int32_t *pos, *hpos;
    int rows, dim, heads;
    size_t n;
} ew_job;

static int g_rmsnorm(void *c)
{
    ew_job *j = c;
    return kern_cuda_rmsnorm_f32(j->out, j->x, j->w, j->rows, j->dim, 1e-5f);
}
static void c_rmsnorm(void *c)
{
    ew_job *j = c;
    kern_rmsnorm_f32(j->hout, j->hx, j->hw, j->rows, j->dim, 1e-5f);
}
static int g_swiglu(void *c)
{
    ew_job *j = c;
    return kern_cuda_swiglu_f32(j->out, j->x, j->y, j->n);
}
static void c_swiglu(void *c)
{
    ew_job *j = c;
    kern_swiglu_f32(j->hout, j->hx, j->hy, j->n);
}
static int g_add(void *c)
{
    ew_job *j = c;
    return kern_cuda_add_f32(j->out, j->x, j->n);
}
static void c_add(void *c)
{
    ew_job *j = c;
    kern_add_f32(j->hout, j->hx, j->n);
}
static int g_rope(void *c)
{
    ew_job *j = c;
    return kern_cuda_rope_f32(j->out, j->pos, j->rows, j->heads, 128, 128, 500000.0f);
}
static void c_rope(void *c)
{
    ew_job *j = c;
    kern_rope_f32(j->hout, j->hpos, j->rows, j->heads, 128, 128, 500000.0f);
}
static int g_argmax(void *c)
{
    ew_job *j = c;
    return kern_cuda_argmax_f32(j->pos, j->x, j->rows, j->dim);
}
static void c_argmax(void *c)
{
    ew_job *j = c;
    for (int r = 0; r < j->rows; r++) {
        const float *x = j->hx + (size_t)r * j->dim;
        int best = 0;
        for (int i = 1; i < j->dim; i++)
            if (x[i] > x[best])
                best = i;
        j->hpos[r] = best;
    }
}

static void bench_elementwise(void)
{
    const int T = 64, D = 4096, F = 14336, V = 128256;
    ew_job j;
    memset(&j, 0, sizeof(j));
    const size_t big = (size_t)T * V;
    j.x = dev_random(big, -1.0f, 1.0f);
    j.y = dev_random((size_t)T * F, -1.0f, 1.0f);
    j.w = dev_random((size_t)D, 0.5f, 1.5f);
    j.out = dev(sizeof(float) * (size_t)T * F);
    j.hx = host_random(big, -1.0f, 1.0f);
    j.hy = host_random((size_t)T * F, -1.0f, 1.0f);
    j.hw = host_random((size_t)D, 0.5f, 1.5f);
    j.hout = malloc(sizeof(float) * (size_t)T * F);
    j.hpos = malloc(sizeof(int32_t) * T);
    for (int i = 0; i < T; i++)
        j.hpos[i] = 1000 + i;
    j.pos = dev(sizeof(int32_t) * T);
    if (kern_cuda_h2d(j.pos, j.hpos, sizeof(int32_t) * T, KERN_CUDA_COMPUTE) != 0)
        die("h2d");
    char shape[64];

    j.rows = T;
    j.dim = D;
    snprintf(shape, sizeof(shape), "%d x %d", T, D);
    row("rmsnorm", shape, time_gpu(g_rmsnorm, &j), 8.0 * T * D, "GB/s", time_cpu(c_rmsnorm, &j));
    j.n = (size_t)T * F;
    snprintf(shape, sizeof(shape), "%d x %d", T, F);
    row("swiglu", shape, time_gpu(g_swiglu, &j), 12.0 * (double)j.n, "GB/s",
        time_cpu(c_swiglu, &j));
    j.n = (size_t)T * D;
    snprintf(shape, sizeof(shape), "%d x %d", T, D);
    row("add", shape, time_gpu(g_add, &j), 12.0 * (double)j.n, "GB/s", time_cpu(c_add, &j));
    j.heads = 32;
    snprintf(shape, sizeof(shape), "%d rows x 32 heads x 128", T);
    row("rope", shape, time_gpu(g_rope, &j), 8.0 * T * 32 * 128, "GB/s", time_cpu(c_rope, &j));
    j.dim = V;
    for (int rows = 1; rows <= T; rows *= T) {
        j.rows = rows;
        snprintf(shape, sizeof(shape), "%d x %d", rows, V);
        row("argmax", shape, time_gpu(g_argmax, &j), 4.0 * rows * V, "GB/s",
            time_cpu(c_argmax, &j));
    }
    kern_cuda_free(j.x);
    kern_cuda_free(j.y);
    kern_cuda_free(j.w);
    kern_cuda_free(j.out);
    kern_cuda_free(j.pos);
    free(j.hx);
    free(j.hy);
    free(j.hw);
    free(j.hout);
    free(j.hpos);
}

/* ---- embedding ---- */

typedef struct {
    float *out;
    void *table;
    int32_t *tok;
    int n;
} embed_job;

static int g_embed(void *c)
{
    embed_job *j = c;
    return kern_cuda_embed(KERN_TYPE_BF16, j->out, j->table, 128256, j->tok, j->n, 4096);
}

static void bench_embed(void)
{
    embed_job j;
    const size_t tb = (size_t)128256 * 4096 * 2;
    j.table = dev(tb);
    if (kern_cuda_memset(j.table, 0x3f, tb, KERN_CUDA_COMPUTE) != 0)
        die("memset");
    j.n = 512;
    int32_t tok[512];
    for (int i = 0; i < 512; i++)
        tok[i] = (i * 7919) % 128256;
    j.tok = dev(sizeof(tok));
    j.out = dev(sizeof(float) * 512 * 4096);
    if (kern_cuda_h2d(j.tok, tok, sizeof(tok), KERN_CUDA_COMPUTE) != 0)
        die("h2d");
    for (int n = 1; n <= 512; n *= 512) {
        j.n = n;
        char shape[64];
        snprintf(shape, sizeof(shape), "%d tokens, bf16 128256 x 4096", n);
        row("embed", shape, time_gpu(g_embed, &j), 6.0 * n * 4096, "GB/s", 0.0);
    }
    kern_cuda_free(j.table);
    kern_cuda_free(j.tok);
    kern_cuda_free(j.out);
}

/* ---- matrix products ---- */

typedef struct {
    int type; /* KERN_TYPE_F32 for kern_cuda_matmul_f32 */
    float *y, *x, *hy, *hx;
    void *w, *hw;
    int M, N, K;
} mm_job;

static int g_mm(void *c)
{
    mm_job *j = c;
    if (j->type == KERN_TYPE_F32)
        return kern_cuda_matmul_f32(j->y, j->N, j->x, j->K, j->w, j->M, j->N, j->K);
    return kern_cuda_matmul_q(j->type, j->y, j->N, j->x, j->K, j->w, j->M, j->N, j->K);
}

static void c_mm(void *c)
{
    mm_job *j = c;
    if (j->type == KERN_TYPE_F32)
        kern_matmul_f32(g_pool, j->hy, j->N, j->hx, j->K, j->hw, j->M, j->N, j->K);
    else
        kern_matmul_q(g_pool, j->type, j->hy, j->N, j->hx, j->K, j->hw, j->M, j->N, j->K);
}

static void bench_matmul(void)
{
    static const int shapes[][3] = {{1, 4096, 4096},   {1, 14336, 4096},  {1, 4096, 14336},
                                    {1, 128256, 4096}, {8, 4096, 4096},   {64, 4096, 4096},
                                    {64, 14336, 4096}, {512, 4096, 4096}, {2048, 14336, 4096}};
    static const int types[] = {KERN_TYPE_F32, KERN_TYPE_BF16, KERN_TYPE_F16};
    for (size_t t = 0; t < 3; t++)
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
            mm_job j;
            j.type = types[t];
            j.M = shapes[s][0];
            j.N = shapes[s][1];
            j.K = shapes[s][2];
            if (g_quick && j.M * (double)j.N * j.K > 1e11)
                continue;
            const size_t es = j.type == KERN_TYPE_F32 ? 4 : 2;
            const size_t wn = (size_t)j.N * j.K;
            j.x = dev_random((size_t)j.M * j.K, -1.0f, 1.0f);
            j.y = dev(sizeof(float) * (size_t)j.M * j.N);
            j.w = dev(wn * es);
            if (kern_cuda_memset(j.w, 0x3c, wn * es, KERN_CUDA_COMPUTE) != 0) /* ~1.0 */
                die("memset");
            const double flop = 2.0 * j.M * (double)j.N * j.K;
            const double bytes = (double)wn * (double)es + 4.0 * j.M * ((double)j.K + j.N);
            /* The CPU twin only where it takes well under a second. */
            double cpu = 0.0;
            if (flop < 2e10 && (j.type == KERN_TYPE_F32 || j.M <= 64)) {
                j.hx = host_random((size_t)j.M * j.K, -1.0f, 1.0f);
                j.hy = malloc(sizeof(float) * (size_t)j.M * j.N);
                j.hw = malloc(wn * es);
                memset(j.hw, 0x3c, wn * es);
                cpu = time_cpu(c_mm, &j);
                free(j.hx);
                free(j.hy);
                free(j.hw);
            }
            const double gpu = time_gpu(g_mm, &j);
            char op[32], shape[64];
            snprintf(op, sizeof(op), "matmul %s", kern_type_name(j.type));
            snprintf(shape, sizeof(shape), "M %d N %d K %d", j.M, j.N, j.K);
            if (j.M <= 8)
                row(op, shape, gpu, bytes, "GB/s", cpu);
            else
                row(op, shape, gpu, flop, "TFLOP/s", cpu);
            kern_cuda_free(j.x);
            kern_cuda_free(j.y);
            kern_cuda_free(j.w);
        }
}

/* Decode over every projection of Llama-3-8B in bf16 (32 layers of q, k, v,
 * o, gate, up, down, then the LM head): distinct weights per layer, so
 * nothing is served from L2. Attention and the small ops are left out: this
 * is the weight stream the HBM roofline bounds. */
static void bench_decode_stream(void)
{
    static const int proj[7][2] = {{4096, 4096},  {1024, 4096},  {1024, 4096}, {4096, 4096},
                                   {14336, 4096}, {14336, 4096}, {4096, 14336}};
    const int n_layers = 32, vocab = 128256;
    size_t layer_elems = 0;
    for (int p = 0; p < 7; p++)
        layer_elems += (size_t)proj[p][0] * proj[p][1];
    const size_t total = layer_elems * n_layers + (size_t)vocab * 4096;
    const double bytes = 2.0 * (double)total;
    uint16_t *w = dev(2 * total);
    if (kern_cuda_memset(w, 0x3c, 2 * total, KERN_CUDA_COMPUTE) != 0)
        die("memset");
    float *x = dev_random((size_t)64 * 14336, -1.0f, 1.0f);
    float *y = dev(sizeof(float) * (size_t)64 * vocab);
    for (int batch = 1; batch <= 64; batch *= 64) {
        char err[512] = "";
        double best = 1e30;
        for (int rep = 0; rep < 4; rep++) { /* the first is a warm-up */
            const double t0 = now_s();
            const uint16_t *wp = w;
            for (int l = 0; l < n_layers; l++)
                for (int p = 0; p < 7; p++) {
                    if (kern_cuda_matmul_q(KERN_TYPE_BF16, y, proj[p][0], x, proj[p][1], wp, batch,
                                           proj[p][0], proj[p][1]) != 0)
                        die("decode stream");
                    wp += (size_t)proj[p][0] * proj[p][1];
                }
            if (kern_cuda_matmul_q(KERN_TYPE_BF16, y, vocab, x, 4096, wp, batch, vocab, 4096) != 0)
                die("decode stream: LM head");
            if (kern_cuda_sync(err, sizeof(err)) != 0)
                die("decode stream sync");
            const double t = now_s() - t0;
            if (rep > 0 && t < best)
                best = t;
        }
        const double roof = bytes / (g_hbm_gbs * 1e9);
        printf("decode weight stream, Llama-3-8B bf16 (%.2f GB), batch %2d: %.2f ms/step, "
               "%.1f tok/s, %.0f GB/s, %.1f%% of the %.0f GB/s roofline (%.2f ms)\n",
               bytes / 1e9, batch, best * 1e3, batch / best, bytes / best / 1e9,
               100.0 * roof / best, g_hbm_gbs, roof * 1e3);
        fflush(stdout);
    }
    kern_cuda_free(w);
    kern_cuda_free(x);
    kern_cuda_free(y);
}

/* ---- attention ---- */

typedef struct {
    kern_cuda_attn_varlen b;
    kern_attn_args single;
    int varlen;
} attn_job;

static int g_attn(void *c)
{
    attn_job *j = c;
    return j->varlen ? kern_cuda_attention_varlen_f32(&j->b) : kern_cuda_attention_f32(&j->single);
}

typedef struct {
    kern_attn_args a;
} attn_cpu_job;

static void c_attn(void *c)
{
    attn_cpu_job *j = c;
    kern_attention_f32(g_pool, &j->a);
}

/* Block table of a sequence: blocks [first, first + n) of the pool. */
static int32_t *seq_table(int first, int n)
{
    int32_t *t = malloc(sizeof(int32_t) * (size_t)n);
    if (!t)
        exit(1);
    for (int i = 0; i < n; i++)
        t[i] = first + i;
    return t;
}

static void bench_attention(void)
{
    const int HQ = 32, HKV = 8, HD = 128, BS = 16, KVS = HKV * HD;
    /* Decode: a batch of sequences with `ctx` cached tokens each, one row each. */
    static const int decode[][2] = {{1, 4096}, {64, 4096}, {1, 32768}, {64, 32768}};
    for (size_t c = 0; c < sizeof(decode) / sizeof(decode[0]); c++) {
        const int ns = decode[c][0], ctx = decode[c][1];
        if (g_quick && (double)ns * ctx > 1e6)
            continue;
        const int nb = ctx / BS;
        const size_t rows = (size_t)ns * nb * BS;
        attn_job j;
        memset(&j, 0, sizeof(j));
        j.varlen = 1;
        float *k = dev_fill(sizeof(float) * rows * KVS), *v = dev_fill(sizeof(float) * rows * KVS);
        float *q = dev_random((size_t)ns * HQ * HD, -1.0f, 1.0f);
        float *out = dev(sizeof(float) * (size_t)ns * HQ * HD);
        int32_t *qs = malloc(sizeof(int32_t) * (size_t)(ns + 1)),
                *cl = malloc(sizeof(int32_t) * ns);
        int32_t *tab = seq_table(0, ns * nb);
        for (int s = 0; s <= ns; s++)
            qs[s] = s;
        for (int s = 0; s < ns; s++)
            cl[s] = ctx;
        int32_t *dqs = dev(sizeof(int32_t) * (size_t)(ns + 1)), *dcl = dev(sizeof(int32_t) * ns);
        int32_t *dtab = dev(sizeof(int32_t) * (size_t)ns * nb);
        if (kern_cuda_h2d(dqs, qs, sizeof(int32_t) * (size_t)(ns + 1), KERN_CUDA_COMPUTE) ||
            kern_cuda_h2d(dcl, cl, sizeof(int32_t) * ns, KERN_CUDA_COMPUTE) ||
            kern_cuda_h2d(dtab, tab, sizeof(int32_t) * (size_t)ns * nb, KERN_CUDA_COMPUTE))
            die("h2d");
        j.b = (kern_cuda_attn_varlen){.q = q,
                                      .k = k,
                                      .v = v,
                                      .out = out,
                                      .q_start = dqs,
                                      .ctx_len = dcl,
                                      .blocks = dtab,
                                      .blocks_stride = nb,
                                      .block_size = BS,
                                      .n_seqs = ns,
                                      .max_q = 1,
                                      .max_ctx = ctx,
                                      .n_heads = HQ,
                                      .n_kv_heads = HKV,
                                      .head_dim = HD,
                                      .kv_stride = KVS};
        char shape[64];
        snprintf(shape, sizeof(shape), "%d seqs x ctx %d, 32/8 x 128", ns, ctx);
        row("attention decode f32", shape, time_gpu(g_attn, &j), 8.0 * (double)rows * KVS, "GB/s",
            0.0);
        kern_cuda_free(k);
        kern_cuda_free(v);
        kern_cuda_free(q);
        kern_cuda_free(out);
        kern_cuda_free(dqs);
        kern_cuda_free(dcl);
        kern_cuda_free(dtab);
        free(qs);
        free(cl);
        free(tab);
    }
    /* Prefill: one sequence attending causally to itself. */
    static const int prefill[] = {1024, 8192, 32768};
    for (size_t c = 0; c < sizeof(prefill) / sizeof(prefill[0]); c++) {
        const int n = prefill[c];
        if (g_quick && n > 8192)
            continue;
        float *k = dev_fill(sizeof(float) * n * KVS), *v = dev_fill(sizeof(float) * n * KVS);
        float *q = dev_fill(sizeof(float) * n * HQ * HD);
        float *out = dev(sizeof(float) * (size_t)n * HQ * HD);
        attn_job j;
        memset(&j, 0, sizeof(j));
        j.single = (kern_attn_args){q, k, v, out, n, n, HQ, HKV, HD, KVS, NULL, 0};
        const double flop = 4.0 * HQ * HD * (double)n * (n + 1) / 2.0; /* QK^T and PV, causal */
        double cpu = 0.0;
        if (n <= 1024) {
            attn_cpu_job cj;
            float *hq = host_random((size_t)n * HQ * HD, -1, 1),
                  *hk = host_random((size_t)n * KVS, -1, 1);
            float *hv = host_random((size_t)n * KVS, -1, 1),
                  *ho = malloc(sizeof(float) * (size_t)n * HQ * HD);
            cj.a = (kern_attn_args){hq, hk, hv, ho, n, n, HQ, HKV, HD, KVS, NULL, 0};
            cpu = time_cpu(c_attn, &cj);
            free(hq);
            free(hk);
            free(hv);
            free(ho);
        }
        char shape[64];
        snprintf(shape, sizeof(shape), "%d tokens causal, 32/8 x 128", n);
        row("attention prefill f32", shape, time_gpu(g_attn, &j), flop, "TFLOP/s", cpu);
        kern_cuda_free(k);
        kern_cuda_free(v);
        kern_cuda_free(q);
        kern_cuda_free(out);
    }
}

/* ---- compressed KV decode (issue 7) ---- */

/* A decode batch over compressed pages: 16 sequences of ctx positions each, one
 * row each, Llama-3-8B heads, pages of 64 slots. fp is the paged f32 kernel
 * (kern_cuda_attention_varlen_f32, pool blocks of 16); the rest run
 * kern_cuda_attention_decode_quant over pages of one format, or ZIP with 60%
 * of the tokens (the default salient fraction) in zip4 pages and 40% in zip2.
 * Pages are packed on the GPU by kern_cuda_kvq_pack for sequence 0 and copied
 * for the others (distinct memory, so nothing is served from L2). GB/s counts
 * the K and V page bytes one call must read. */
typedef struct {
    kern_kvq_attn_args a;
} kvq_job;

static int g_kvq(void *c)
{
    kvq_job *j = c;
    return kern_cuda_attention_decode_quant(&j->a);
}

static void h2d_or_die(void *d, const void *h, size_t bytes)
{
    if (kern_cuda_h2d(d, h, bytes, KERN_CUDA_COMPUTE) != 0)
        die("h2d");
}

static void bench_kvq_decode(void)
{
    enum { HQ = 32, HKV = 8, HD = 128, NS = 16, PB = 64 };
    const int KVS = HKV * HD, ctx = g_quick ? 8192 : 32768;
    const kern_kvq_geom g = {HKV, HD, PB};
    char shape[64], err[512] = "";
    snprintf(shape, sizeof(shape), "%d seqs x ctx %d, 32/8 x 128", NS, ctx);

    /* fp: the paged f32 decode kernel. */
    double t_fp;
    {
        const int BS = 16, nb = ctx / BS;
        const size_t rows = (size_t)NS * ctx;
        attn_job j;
        memset(&j, 0, sizeof(j));
        j.varlen = 1;
        float *k = dev_fill(sizeof(float) * rows * KVS), *v = dev_fill(sizeof(float) * rows * KVS);
        float *q = dev_random((size_t)NS * HQ * HD, -1.0f, 1.0f);
        float *out = dev(sizeof(float) * NS * HQ * HD);
        int32_t qs[NS + 1], cl[NS];
        int32_t *tab = seq_table(0, NS * nb);
        for (int s = 0; s <= NS; s++)
            qs[s] = s;
        for (int s = 0; s < NS; s++)
            cl[s] = ctx;
        int32_t *dqs = dev(sizeof(qs)), *dcl = dev(sizeof(cl));
        int32_t *dtab = dev(sizeof(int32_t) * (size_t)NS * nb);
        h2d_or_die(dqs, qs, sizeof(qs));
        h2d_or_die(dcl, cl, sizeof(cl));
        h2d_or_die(dtab, tab, sizeof(int32_t) * (size_t)NS * nb);
        j.b = (kern_cuda_attn_varlen){.q = q,
                                      .k = k,
                                      .v = v,
                                      .out = out,
                                      .q_start = dqs,
                                      .ctx_len = dcl,
                                      .blocks = dtab,
                                      .blocks_stride = nb,
                                      .block_size = BS,
                                      .n_seqs = NS,
                                      .max_q = 1,
                                      .max_ctx = ctx,
                                      .n_heads = HQ,
                                      .n_kv_heads = HKV,
                                      .head_dim = HD,
                                      .kv_stride = KVS};
        t_fp = time_gpu(g_attn, &j);
        row("kv decode fp (varlen)", shape, t_fp, 8.0 * (double)rows * KVS, "GB/s", 0.0);
        kern_cuda_free(k);
        kern_cuda_free(v);
        kern_cuda_free(q);
        kern_cuda_free(out);
        kern_cuda_free(dqs);
        kern_cuda_free(dcl);
        kern_cuda_free(dtab);
        free(tab);
    }

    /* The source rows (one sequence's K and V) on both sides, for packing and the
     * ZIP statistics. */
    const size_t src_n = (size_t)ctx * KVS;
    float *hk = host_random(src_n, -1.0f, 1.0f), *hv = host_random(src_n, -1.0f, 1.0f);
    float *dk = dev(sizeof(float) * src_n), *dv = dev(sizeof(float) * src_n);
    h2d_or_die(dk, hk, sizeof(float) * src_n);
    h2d_or_die(dv, hv, sizeof(float) * src_n);
    const kern_kvq_src hks = {hk, (size_t)KVS, NULL, 0, 0, ctx},
                       hvs = {hv, (size_t)KVS, NULL, 0, 0, ctx};
    const kern_kvq_src dks = {dk, (size_t)KVS, NULL, 0, 0, ctx},
                       dvs = {dv, (size_t)KVS, NULL, 0, 0, ctx};
    /* ZIP classes: positions p with p % 5 < 3 are salient (60%). */
    int32_t *cls[2];
    int ncls[2] = {0, 0};
    cls[0] = malloc(sizeof(int32_t) * ctx);
    cls[1] = malloc(sizeof(int32_t) * ctx);
    if (!cls[0] || !cls[1])
        exit(1);
    for (int p = 0; p < ctx; p++) {
        const int c = p % 5 < 3 ? 0 : 1;
        cls[c][ncls[c]++] = p;
    }
    float *q = dev_random((size_t)NS * HQ * HD, -1.0f, 1.0f);
    float *out = dev(sizeof(float) * NS * HQ * HD), *lse = dev(sizeof(float) * NS * HQ);
    static const kern_kvq_fmt fmts[] = {KERN_KVQ_F32, KERN_KVQ_F16, KERN_KVQ_Q8, KERN_KVQ_Q4,
                                        KERN_KVQ_ZIP8};
    for (size_t f = 0; f < sizeof(fmts) / sizeof(fmts[0]); f++) {
        const bool zip = kern_kvq_fmt_is_zip(fmts[f]);
        /* Page lists of one sequence: (format, first index into the class or position). */
        const kern_kvq_fmt pf[2] = {zip ? KERN_KVQ_ZIP4 : fmts[f], KERN_KVQ_ZIP2};
        const int n_cls = zip ? 2 : 1;
        int n_pages = 0, cls_pages[2];
        size_t seq_bytes = 0;
        for (int c = 0; c < n_cls; c++) {
            const int n = zip ? ncls[c] : ctx;
            cls_pages[c] = (n + PB - 1) / PB;
            n_pages += cls_pages[c];
            seq_bytes += (size_t)cls_pages[c] * kern_kvq_block_bytes(pf[c], &g);
        }
        uint8_t *mem = dev(seq_bytes * NS);
        float *dstats[2] = {NULL, NULL};
        int32_t *didx[2] = {NULL, NULL};
        kern_kvq_page *pages = malloc(sizeof(kern_kvq_page) * (size_t)n_pages * NS);
        if (!pages)
            exit(1);
        for (int c = 0; c < n_cls && zip; c++) {
            float *st = malloc(sizeof(float) * KERN_KVQ_STATS_FLOATS(KVS));
            const kern_kvq_sel sel = {cls[c], 0, 0, ncls[c]};
            if (!st || kern_kvq_zip_stats(st, pf[c], &g, &hks, &sel, &hvs, 0, ctx, err,
                                          sizeof(err)) != 0) {
                fprintf(stderr, "bench_cuda: zip stats: %s\n", err);
                exit(1);
            }
            dstats[c] = dev(sizeof(float) * KERN_KVQ_STATS_FLOATS(KVS));
            h2d_or_die(dstats[c], st, sizeof(float) * KERN_KVQ_STATS_FLOATS(KVS));
            didx[c] = dev(sizeof(int32_t) * ncls[c]);
            h2d_or_die(didx[c], cls[c], sizeof(int32_t) * ncls[c]);
            if (kern_cuda_sync(err, sizeof(err)) != 0)
                die("upload");
            free(st);
        }
        /* Sequence 0 packed on the GPU, then copied; descriptors for every sequence. */
        const double t0 = now_s();
        size_t off = 0;
        int pi = 0;
        for (int c = 0; c < n_cls; c++) {
            const size_t kb = kern_kvq_page_bytes(pf[c], KERN_KVQ_K, &g);
            const size_t vb = kern_kvq_page_bytes(pf[c], KERN_KVQ_V, &g);
            const int n = zip ? ncls[c] : ctx;
            for (int i = 0; i < cls_pages[c]; i++, pi++) {
                const int cnt = n - i * PB < PB ? n - i * PB : PB;
                const kern_kvq_sel sel = zip ? (kern_kvq_sel){didx[c] + (size_t)i * PB, 0, 0, cnt}
                                             : (kern_kvq_sel){NULL, 0, i * PB, cnt};
                if (kern_cuda_kvq_pack(mem + off, KERN_KVQ_K, pf[c], &g, 0, &dks, &sel,
                                       dstats[c]) != 0 ||
                    kern_cuda_kvq_pack(mem + off + kb, KERN_KVQ_V, pf[c], &g, 0, &dvs, &sel,
                                       dstats[c]) != 0)
                    die("kvq pack");
                for (int s = 0; s < NS; s++)
                    pages[(size_t)s * n_pages + pi] =
                        (kern_kvq_page){mem + (size_t)s * seq_bytes + off,
                                        mem + (size_t)s * seq_bytes + off + kb,
                                        dstats[c],
                                        zip ? KERN_KVQ_UNORDERED : i * PB,
                                        cnt,
                                        pf[c],
                                        0};
                off += kb + vb;
            }
        }
        if (kern_cuda_sync(err, sizeof(err)) != 0)
            die("kvq pack sync");
        const double t_pack = now_s() - t0;
        for (int s = 1; s < NS; s++)
            if (kern_cuda_d2d(mem + (size_t)s * seq_bytes, mem, seq_bytes, KERN_CUDA_COMPUTE) != 0)
                die("d2d");
        kern_kvq_page *dpages = dev(sizeof(kern_kvq_page) * (size_t)n_pages * NS);
        h2d_or_die(dpages, pages, sizeof(kern_kvq_page) * (size_t)n_pages * NS);
        kern_kvq_seq seqs[NS];
        for (int s = 0; s < NS; s++)
            seqs[s] = (kern_kvq_seq){q + (size_t)s * HQ * HD,
                                     out + (size_t)s * HQ * HD,
                                     lse + (size_t)s * HQ,
                                     NULL,
                                     dpages + (size_t)s * n_pages,
                                     n_pages,
                                     1,
                                     ctx};
        kvq_job j = {{g, HQ, seqs, NS}};
        const double t = time_gpu(g_kvq, &j);
        char op[32];
        snprintf(op, sizeof(op), "kv decode %s", zip ? "zip4/2 60%" : kern_kvq_fmt_name(fmts[f]));
        row(op, shape, t, (double)seq_bytes * NS, "GB/s", 0.0);
        printf("  %s: %.2f bytes/token/layer, %.2fx the fp time; packing one sequence's %d "
               "pages: %.1f ms\n",
               op, (double)seq_bytes / ctx, t / t_fp, 2 * n_pages, t_pack * 1e3);
        fflush(stdout);
        kern_cuda_free(dpages);
        kern_cuda_free(mem);
        for (int c = 0; c < 2; c++) {
            kern_cuda_free(dstats[c]);
            kern_cuda_free(didx[c]);
        }
        free(pages);
    }
    kern_cuda_free(q);
    kern_cuda_free(out);
    kern_cuda_free(lse);
    kern_cuda_free(dk);
    kern_cuda_free(dv);
    free(hk);
    free(hv);
    free(cls[0]);
    free(cls[1]);
}

/* ---- block-sparse prefill (issue 6) ---- */

typedef struct {
    kern_attn_args a;
    kern_block_mask m;
} sparse_job;

static int g_sparse(void *c)
{
    sparse_job *j = c;
    return kern_cuda_attention_block_sparse_f32(&j->a, &j->m);
}

/* One sequence's causal prefill at 8K and 32K tokens: the dense kernel, the
 * block-sparse kernel on the full causal mask (its overhead), and on a 10%
 * selection (blocks of 128, one list per kv head: the diagonal, the sink block
 * and distinct random earlier blocks, 10% of each row's causal blocks rounded).
 * TFLOP/s counts the blocks computed. */
static void bench_sparse_prefill(void)
{
    enum { HQ = 32, HKV = 8, HD = 128, B = 128 };
    const int KVS = HKV * HD;
    static const int lens[] = {8192, 32768};
    for (size_t c = 0; c < sizeof(lens) / sizeof(lens[0]); c++) {
        const int n = lens[c];
        if (g_quick && n > 8192)
            continue;
        /* Timing only: the values need only be ordinary numbers. */
        float *k = dev_fill(sizeof(float) * n * KVS), *v = dev_fill(sizeof(float) * n * KVS);
        float *q = dev_fill(sizeof(float) * n * HQ * HD);
        float *out = dev(sizeof(float) * (size_t)n * HQ * HD);
        const kern_attn_args a = {q, k, v, out, n, n, HQ, HKV, HD, KVS, NULL, 0};
        attn_job dj;
        memset(&dj, 0, sizeof(dj));
        dj.single = a;
        const double dense_flop = 4.0 * HQ * HD * (double)n * (n + 1) / 2.0;
        const double t_dense = time_gpu(g_attn, &dj);
        char shape[64];
        snprintf(shape, sizeof(shape), "%d tokens causal, 32/8 x 128", n);
        row("prefill dense", shape, t_dense, dense_flop, "TFLOP/s", 0.0);
        const size_t words = kern_block_mask_words(B, HKV, n, n);
        uint64_t *bits = malloc(sizeof(uint64_t) * words);
        uint64_t *dbits = dev(sizeof(uint64_t) * words);
        sparse_job j;
        j.a = a;
        for (int mode = 0; mode < 2; mode++) {
            if (!bits || kern_block_mask_init(&j.m, bits, words, B, HKV, n, n) != KERN_SPARSE_OK)
                die("mask");
            if (mode == 0) {
                kern_block_mask_fill_causal(&j.m);
            } else {
                uint64_t s = 0x2545F4914F6CDD1Dull;
                for (int l = 0; l < HKV; l++)
                    for (int r = 0; r < j.m.n_qblocks; r++) {
                        /* 10% of the causal blocks, rounded, at least the diagonal. */
                        const int target = (r + 6) / 10 > 1 ? (r + 6) / 10 : 1;
                        kern_block_mask_set(&j.m, l, r, r);
                        int have = 1;
                        if (have < target) {
                            kern_block_mask_set(&j.m, l, r, 0);
                            have++;
                        }
                        while (have < target) {
                            s ^= s << 13;
                            s ^= s >> 7;
                            s ^= s << 17;
                            const int cb = 1 + (int)(s % (uint64_t)(r - 1));
                            if (!kern_block_mask_get(&j.m, l, r, cb)) {
                                kern_block_mask_set(&j.m, l, r, cb);
                                have++;
                            }
                        }
                    }
            }
            kern_sparse_stats st;
            kern_block_mask_stats(&j.m, HQ, &st);
            const double density = kern_sparse_density(&st);
            h2d_or_die(dbits, bits, sizeof(uint64_t) * words);
            j.m.bits = dbits;
            const double t = time_gpu(g_sparse, &j);
            char op[32];
            snprintf(op, sizeof(op), "prefill sparse %.0f%%", density * 100.0);
            row(op, shape, t, dense_flop * density, "TFLOP/s", 0.0);
            printf("  %s: density %.3f, %.2fx faster than dense\n", op, density, t_dense / t);
            fflush(stdout);
            j.m.bits = bits;
        }
        free(bits);
        kern_cuda_free(dbits);
        kern_cuda_free(k);
        kern_cuda_free(v);
        kern_cuda_free(q);
        kern_cuda_free(out);
    }
}

/* Whether section `name` is in the --only list (every section without one). */
static const char *g_only;

static int want(const char *name)
{
    if (!g_only)
        return 1;
    const size_t n = strlen(name);
    for (const char *p = g_only; (p = strstr(p, name)) != NULL; p += n)
        if ((p == g_only || p[-1] == ',') && (p[n] == ',' || p[n] == '\0'))
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    int threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            g_quick = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--hbm-gbs") && i + 1 < argc)
            g_hbm_gbs = atof(argv[++i]);
        else if (!strcmp(argv[i], "--only") && i + 1 < argc)
            g_only = argv[++i];
        else {
            fprintf(stderr, "usage: bench_cuda [--quick] [--threads N] [--hbm-gbs GB/s] "
                            "[--only SECTION,...]\n"
                            "sections: elementwise, embed, matmul, stream, attention, kvq, "
                            "sparse\n");
            return 2;
        }
    }
    if (kern_cuda_device_count() == 0) {
        printf("bench_cuda: no CUDA device\n");
        return 0;
    }
    char err[512] = "";
    kern_cuda_device_info info;
    if (kern_cuda_device_query(0, &info, err, sizeof(err)) != 0 ||
        kern_cuda_init(0, err, sizeof(err)) != 0 ||
        kern_cuda_reserve_workspace((size_t)2 * 2048 * 14336, err, sizeof(err)) != 0) {
        fprintf(stderr, "bench_cuda: %s\n", err);
        return 1;
    }
    g_pool = kern_pool_create(threads > 0 ? threads : 1);
    printf("bench_cuda: %s (cc %d.%d, %d SMs, %.0f GiB), CPU twin on %d threads\n", info.name,
           info.cc_major, info.cc_minor, info.n_sm, (double)info.total_mem / (1 << 30), threads);
    printf("%-22s %-34s %12s %10s %-7s %12s %9s\n", "op", "shape", "gpu us", "rate", "", "cpu us",
           "speedup");
    if (want("elementwise"))
        bench_elementwise();
    if (want("embed"))
        bench_embed();
    if (want("matmul"))
        bench_matmul();
    if (want("stream"))
        bench_decode_stream();
    if (want("attention"))
        bench_attention();
    if (want("kvq"))
        bench_kvq_decode();
    if (want("sparse"))
        bench_sparse_prefill();
    kern_pool_destroy(g_pool);
    kern_cuda_close();
    return 0;
}
#endif
