/*
 * forward_cuda.c - the CUDA backend: the model's weights on one GPU, its KV
 * pools in device memory, and the forward step of forward.c run there.
 *
 * Threads: a CUDA context belongs to the host thread that made it
 * (kernels/cuda.h), while a model is loaded on one thread (the server's
 * loader) and stepped on another (the engine). So the backend owns one
 * device thread, started at load, which makes the context and does every
 * device call: load, pool allocation, copy-on-write, steps and the final
 * release. Callers hand it one job at a time and wait for the result; jobs
 * never overlap (busy, under mu). The wait always ends: every device wait
 * inside a job is kern_cuda_sync, bounded by the context's timeout.
 *
 * Weights are uploaded once: F16 and BF16 matrices as they are, F32 and the
 * quantized GGUF types converted on the host to f16 (bf16 for a tensor that
 * f16 cannot hold; f32 kept when the model was loaded with
 * device_f32_weights), norms and biases in f32. Projections run through
 * kern_cuda_matmul_q (a streaming kernel for small batches, cuBLAS on the
 * tensor cores with f32 accumulation for larger ones).
 *
 * A KV pool on the device has the host layout of rt_kv_pool exactly
 * ([layer][block * block_size + slot][kv_dim], f32), so block tables from
 * the scheduler index it unchanged. A step copies in one packed array of
 * int32 (token ids, positions, cache slots, and per pool the query starts,
 * context lengths and block tables) and copies out only the logits asked
 * for. Sequences of one step that use different pools (private rt_kv caches)
 * are attended pool by pool.
 *
 * Attention on the GPU is dense over f32 KV: FlexPrefill and PowerAttention
 * requests run dense there (one log line per model), and their statistics
 * count every causal block as computed, as the CPU does when it falls back
 * to dense. Compressed KV formats are refused when a request asks for one
 * (rt_kvq_check: their pages are packed and read on the host).
 */
#include "runtime/model_internal.h"

#include <stdio.h>
#include <string.h>

#ifndef SIEVE_HAVE_CUDA

int rt_cuda_attach(rt_model *m, int device, bool f32_weights, char *err, size_t errlen)
{
    snprintf(err, errlen, "cuda: device %d: this build has no CUDA backend (built without CUDA)",
             device);
    return -1;
}

void rt_cuda_detach(rt_model *m) {}

int rt_cuda_kv_alloc(rt_cuda *c, rt_kv_pool *p)
{
    return -1;
}

void rt_cuda_kv_free(rt_kv_pool *p) {}

void rt_cuda_kv_copy_block(rt_kv_pool *p, int src, int dst) {}

int rt_cuda_forward(rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen)
{
    snprintf(err, errlen, "forward: this build has no CUDA backend (built without CUDA)");
    return -1;
}

#else

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <time.h>

#include "kernels/cuda.h"

/* Logit rows computed and copied out together (bounds the logits buffers). */
#define LOGIT_ROWS 64
/* Rows converted per host-to-device copy while uploading a weight. */
#define UPLOAD_BYTES ((size_t)16 << 20)
/* The op workspace at least (attention's key splits use it for decode). */
#define MIN_WORKSPACE ((size_t)64 << 20)
/* Device memory a pool leaves free (cuBLAS, fragmentation). */
#define POOL_RESERVE ((size_t)512 << 20)
#define F16_MAX 65504.0f

typedef struct {
    void *data; /* device memory */
    int type;   /* KERN_TYPE_F32, F16 or BF16 */
} dev_weight;

typedef struct {
    float *attn_norm, *ffn_norm;
    float *bq, *bk, *bv; /* NULL without biases */
    dev_weight wq, wk, wv, wo, w_gate, w_up, w_down;
} dev_layer;

/* Consecutive sequences of a step that share a pool. */
typedef struct {
    rt_kv_pool *pool;
    int s0, n;      /* sequences s0 .. s0 + n - 1 */
    int row0, rows; /* their token rows in the step */
    int max_q, max_ctx;
    int stride;     /* block-table entries per sequence */
    size_t q_start; /* offsets into the step's meta array */
    size_t ctx_len;
    size_t blocks;
} pool_group;

typedef int (*job_fn)(rt_cuda *c, void *arg);

struct rt_cuda {
    rt_model *m;
    int device;
    bool f32_weights;

    /* The device thread and its job slot; all guarded by mu. */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool busy;  /* a caller owns the slot, from handing in a job to taking its result */
    job_fn job; /* the job waiting for the device thread, or NULL */
    void *job_arg;
    bool job_done;
    int job_rc;
    bool quit;
    char err[512]; /* the failed job's message: written by the device thread, read by the caller */

    /* Everything below belongs to the device thread. */
    dev_weight tok_embd, output;
    float *output_norm;
    float *rope_inv_freq; /* the scaled-RoPE table, or NULL */
    dev_layer *layers;
    void **allocs; /* every weight allocation, freed at detach */
    int n_allocs, cap_allocs;
    size_t weight_bytes;
    int n_half, n_bf16, n_f32; /* matrices by device type (for the load line) */

    float *x, *xb, *q, *k, *v, *att, *proj, *gate, *up; /* [T, width] scratch */
    float *last, *logits;                               /* [LOGIT_ROWS, dim / n_vocab] */
    float *h_logits;                                    /* pinned [LOGIT_ROWS, n_vocab] */
    int32_t *meta, *h_meta;                             /* the step's int32 inputs */
    size_t meta_cap;                                    /* int32s of both */
    pool_group *groups;                                 /* [max_batch_tokens] */
    bool warned_policy; /* the sparse-prefill fallback's log line was printed */

    /* The step being run (job_step's arguments, for its helpers). */
    rt_seq_batch *seqs;
    int n_seqs;
};

typedef struct {
    rt_seq_batch *seqs;
    int n_seqs;
} step_args;

/* ---- the device thread ---- */

static void *device_main(void *arg)
{
    rt_cuda *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->job && !c->quit)
            pthread_cond_wait(&c->cv, &c->mu);
        if (!c->job)
            break;
        const job_fn fn = c->job;
        void *a = c->job_arg;
        pthread_mutex_unlock(&c->mu);
        const int rc = fn(c, a);
        pthread_mutex_lock(&c->mu);
        c->job = NULL;
        c->job_rc = rc;
        c->job_done = true;
        pthread_cond_broadcast(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Runs fn on the device thread and waits for it; its message goes to err. */
static int run_job(rt_cuda *c, job_fn fn, void *arg, char *err, size_t errlen)
{
    pthread_mutex_lock(&c->mu);
    while (c->busy)
        pthread_cond_wait(&c->cv, &c->mu);
    c->busy = true;
    c->err[0] = 0;
    c->job = fn;
    c->job_arg = arg;
    c->job_done = false;
    pthread_cond_broadcast(&c->cv);
    while (!c->job_done)
        pthread_cond_wait(&c->cv, &c->mu);
    const int rc = c->job_rc;
    if (rc != 0 && err && errlen)
        snprintf(err, errlen, "%s", c->err);
    c->busy = false;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Records a job's failure message (the first one) and returns -1. */
static int job_fail(rt_cuda *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int job_fail(rt_cuda *c, const char *fmt, ...)
{
    if (c->err[0] == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, sizeof(c->err), fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Waits for the device; -1 with "what: <the first CUDA error>" on failure. */
static int device_sync(rt_cuda *c, const char *what)
{
    char msg[400];
    const int rc = kern_cuda_sync(msg, sizeof(msg));
    if (rc != 0)
        return job_fail(c, "%s: %s (%s)", what, msg, kern_cuda_strerror(rc));
    return 0;
}

/* ---- memory ---- */

static void *dev_alloc(rt_cuda *c, size_t bytes, const char *what)
{
    char msg[256];
    void *p = kern_cuda_malloc(bytes ? bytes : 4, msg, sizeof(msg));
    if (!p)
        job_fail(c, "cuda: allocating %s (%zu bytes): %s", what, bytes, msg);
    return p;
}

/* A weight allocation, remembered for detach. */
static void *weight_alloc(rt_cuda *c, size_t bytes, const char *what)
{
    if (c->n_allocs == c->cap_allocs) {
        const int cap = c->cap_allocs ? 2 * c->cap_allocs : 256;
        void **a = realloc(c->allocs, sizeof(void *) * (size_t)cap);
        if (!a) {
            job_fail(c, "cuda: out of host memory");
            return NULL;
        }
        c->allocs = a;
        c->cap_allocs = cap;
    }
    void *p = dev_alloc(c, bytes, what);
    if (p) {
        c->allocs[c->n_allocs++] = p;
        c->weight_bytes += bytes;
    }
    return p;
}

/* n floats of host memory to the device (NULL in, NULL out). */
static int upload_f32(rt_cuda *c, const float *src, size_t n, float **out, const char *what)
{
    *out = NULL;
    if (!src)
        return 0;
    *out = weight_alloc(c, n * sizeof(float), what);
    if (!*out)
        return -1;
    if (kern_cuda_h2d(*out, src, n * sizeof(float), KERN_CUDA_COMPUTE) != 0)
        return device_sync(c, what) ? -1 : job_fail(c, "cuda: copying %s failed", what);
    return 0;
}

/* Rows [r0, r0 + n) of w as f32 into dst (K values each). */
static int decode_rows(const rt_weight *w, int r0, int n, int K, float *dst)
{
    for (int r = 0; r < n; r++) {
        const char *row = (const char *)w->data + (size_t)(r0 + r) * w->row_bytes;
        float *d = dst + (size_t)r * (size_t)K;
        if (w->type == KERN_TYPE_F32)
            memcpy(d, row, sizeof(float) * (size_t)K);
        else if (kern_dequant_row(w->type, row, d, (size_t)K) != 0)
            return -1;
    }
    return 0;
}

/* Uploads a weight of N rows of K elements as F16/BF16 (or F32), converting
 * on the host in chunks. F16 is chosen unless a value exceeds its range. */
static int upload_weight(rt_cuda *c, const rt_weight *w, int N, int K, dev_weight *out,
                         const char *what)
{
    const size_t n = (size_t)N * (size_t)K;
    memset(out, 0, sizeof(*out));
    if ((w->type == KERN_TYPE_F16 || w->type == KERN_TYPE_BF16) && w->row_bytes == (size_t)K * 2) {
        out->type = w->type;
        out->data = weight_alloc(c, n * 2, what);
        if (!out->data)
            return -1;
        if (w->type == KERN_TYPE_F16)
            c->n_half++;
        else
            c->n_bf16++;
        kern_cuda_h2d(out->data, w->data, n * 2, KERN_CUDA_COMPUTE);
        return device_sync(c, what);
    }
    const bool keep_f32 = c->f32_weights;
    const size_t esize = keep_f32 ? 4 : 2;
    int rows = (int)(UPLOAD_BYTES / ((size_t)K * 4));
    if (rows < 1)
        rows = 1;
    if (rows > N)
        rows = N;
    float *tmp = malloc(sizeof(float) * (size_t)rows * (size_t)K);
    uint16_t *half = keep_f32 ? NULL : malloc(sizeof(uint16_t) * (size_t)rows * (size_t)K);
    if (!tmp || (!keep_f32 && !half)) {
        free(tmp);
        free(half);
        return job_fail(c, "cuda: out of host memory converting %s", what);
    }
    out->data = weight_alloc(c, n * esize, what);
    int rc = out->data ? 0 : -1;
    int type = keep_f32 ? KERN_TYPE_F32 : KERN_TYPE_F16;
    for (int r0 = 0; rc == 0 && r0 < N; r0 += rows) {
        const int nr = N - r0 < rows ? N - r0 : rows;
        const size_t cnt = (size_t)nr * (size_t)K;
        if (decode_rows(w, r0, nr, K, tmp) != 0) {
            rc = job_fail(c, "cuda: cannot decode %s (type %d)", what, w->type);
            break;
        }
        const void *src = tmp;
        if (!keep_f32) {
            if (type == KERN_TYPE_F16)
                for (size_t i = 0; i < cnt; i++)
                    if (fabsf(tmp[i]) > F16_MAX) { /* f16 cannot hold it: start over in bf16 */
                        type = KERN_TYPE_BF16;
                        r0 = -rows;
                        break;
                    }
            if (r0 < 0)
                continue;
            kern_quant_row(type, tmp, half, cnt);
            src = half;
        }
        if (kern_cuda_h2d((char *)out->data + (size_t)r0 * (size_t)K * esize, src, cnt * esize,
                          KERN_CUDA_COMPUTE) != 0 ||
            device_sync(c, what) != 0)
            rc = job_fail(c, "cuda: copying %s failed", what);
    }
    free(tmp);
    free(half);
    out->type = type;
    if (type == KERN_TYPE_F16)
        c->n_half++;
    else if (type == KERN_TYPE_BF16)
        c->n_bf16++;
    else
        c->n_f32++;
    return rc;
}

/* ---- load and release ---- */

static void free_all(rt_cuda *c)
{
    for (int i = 0; i < c->n_allocs; i++)
        kern_cuda_free(c->allocs[i]);
    free(c->allocs);
    c->allocs = NULL;
    c->n_allocs = c->cap_allocs = 0;
    float *bufs[] = {c->x,    c->xb,   c->q,  c->k,    c->v,     c->att,
                     c->proj, c->gate, c->up, c->last, c->logits};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        kern_cuda_free(bufs[i]);
    kern_cuda_free(c->meta);
    kern_cuda_host_free(c->h_meta);
    kern_cuda_host_free(c->h_logits);
    free(c->layers);
    free(c->groups);
}

static int job_release(rt_cuda *c, void *arg)
{
    char msg[256];
    (void)kern_cuda_sync(msg, sizeof(msg));
    free_all(c);
    kern_cuda_close();
    return 0;
}

static int upload_model(rt_cuda *c)
{
    const rt_model *m = c->m;
    const rt_hparams *hp = &m->hp;
    const int dim = hp->dim, qd = hp->n_heads * hp->head_dim;
    const int kvd = hp->n_kv_heads * hp->head_dim, ffn = hp->ffn_dim;
    if (upload_weight(c, &m->tok_embd, hp->n_vocab, dim, &c->tok_embd, "token_embd") != 0)
        return -1;
    if (m->output.data == m->tok_embd.data && m->output.type == m->tok_embd.type)
        c->output = c->tok_embd; /* tied embeddings: one copy */
    else if (upload_weight(c, &m->output, hp->n_vocab, dim, &c->output, "output") != 0)
        return -1;
    if (upload_f32(c, m->output_norm, (size_t)dim, &c->output_norm, "output_norm") != 0 ||
        upload_f32(c, m->rope_inv_freq, (size_t)hp->rope_dim / 2, &c->rope_inv_freq,
                   "rope_freqs") != 0)
        return -1;
    c->layers = calloc((size_t)hp->n_layers, sizeof(dev_layer));
    if (!c->layers)
        return job_fail(c, "cuda: out of host memory");
    for (int l = 0; l < hp->n_layers; l++) {
        const rt_layer *L = &m->layers[l];
        dev_layer *D = &c->layers[l];
        char nm[64];
        snprintf(nm, sizeof(nm), "layer %d", l);
        if (upload_f32(c, L->attn_norm, (size_t)dim, &D->attn_norm, nm) ||
            upload_f32(c, L->ffn_norm, (size_t)dim, &D->ffn_norm, nm) ||
            upload_f32(c, L->bq, (size_t)qd, &D->bq, nm) ||
            upload_f32(c, L->bk, (size_t)kvd, &D->bk, nm) ||
            upload_f32(c, L->bv, (size_t)kvd, &D->bv, nm))
            return -1;
        const struct {
            const rt_weight *w;
            dev_weight *d;
            int N, K;
            const char *name;
        } mats[] = {
            {&L->wq, &D->wq, qd, dim, "attn_q"},
            {&L->wk, &D->wk, kvd, dim, "attn_k"},
            {&L->wv, &D->wv, kvd, dim, "attn_v"},
            {&L->wo, &D->wo, dim, qd, "attn_output"},
            {&L->w_gate, &D->w_gate, ffn, dim, "ffn_gate"},
            {&L->w_up, &D->w_up, ffn, dim, "ffn_up"},
            {&L->w_down, &D->w_down, dim, ffn, "ffn_down"},
        };
        for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++) {
            snprintf(nm, sizeof(nm), "blk.%d.%s", l, mats[i].name);
            if (upload_weight(c, mats[i].w, mats[i].N, mats[i].K, mats[i].d, nm) != 0)
                return -1;
        }
        if (m->progress)
            m->progress(m->progress_ctx, (float)(l + 1) / (float)hp->n_layers);
    }
    return 0;
}

static int alloc_scratch(rt_cuda *c)
{
    const rt_model *m = c->m;
    const rt_hparams *hp = &m->hp;
    const size_t T = (size_t)m->max_batch_tokens;
    const size_t dim = (size_t)hp->dim, qd = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const size_t kvd = (size_t)hp->n_kv_heads * (size_t)hp->head_dim, ffn = (size_t)hp->ffn_dim;
    const size_t f = sizeof(float);
    if (!(c->x = dev_alloc(c, T * dim * f, "x")) || !(c->xb = dev_alloc(c, T * dim * f, "xb")) ||
        !(c->q = dev_alloc(c, T * qd * f, "q")) || !(c->k = dev_alloc(c, T * kvd * f, "k")) ||
        !(c->v = dev_alloc(c, T * kvd * f, "v")) || !(c->att = dev_alloc(c, T * qd * f, "att")) ||
        !(c->proj = dev_alloc(c, T * dim * f, "proj")) ||
        !(c->gate = dev_alloc(c, T * ffn * f, "gate")) ||
        !(c->up = dev_alloc(c, T * ffn * f, "up")) ||
        !(c->last = dev_alloc(c, LOGIT_ROWS * dim * f, "last")) ||
        !(c->logits = dev_alloc(c, LOGIT_ROWS * (size_t)hp->n_vocab * f, "logits")))
        return -1;
    char msg[256];
    c->h_logits = kern_cuda_host_malloc(LOGIT_ROWS * (size_t)hp->n_vocab * f, msg, sizeof(msg));
    c->groups = calloc(T, sizeof(pool_group));
    if (!c->h_logits || !c->groups)
        return job_fail(c, "cuda: pinned logits buffer: %s", msg);
    /* kern_cuda_matmul_q rounds activations of M > 8 rows into the workspace. */
    size_t widest = dim > qd ? dim : qd;
    widest = widest > ffn ? widest : ffn;
    size_t ws = 2 * T * widest;
    ws = ws > MIN_WORKSPACE ? ws : MIN_WORKSPACE;
    if (kern_cuda_reserve_workspace(ws, msg, sizeof(msg)) != 0)
        return job_fail(c, "cuda: workspace of %zu bytes: %s", ws, msg);
    return 0;
}

static int job_load(rt_cuda *c, void *arg)
{
    char msg[400];
    if (kern_cuda_init(c->device, msg, sizeof(msg)) != 0)
        return job_fail(c, "cuda: device %d: %s", c->device, msg);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (upload_model(c) != 0 || alloc_scratch(c) != 0 || device_sync(c, "cuda: load") != 0)
        return -1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    kern_cuda_device_info info;
    if (kern_cuda_device_query(c->device, &info, msg, sizeof(msg)) != 0)
        info.free_mem = 0;
    fprintf(stderr,
            "sieve: cuda: weights on device %d (%.2f GiB: %d f16, %d bf16, %d f32 matrices) in "
            "%.2f s; %.1f GiB free\n",
            c->device, (double)c->weight_bytes / 1073741824.0, c->n_half, c->n_bf16, c->n_f32,
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
            (double)info.free_mem / 1073741824.0);
    return 0;
}

int rt_cuda_attach(rt_model *m, int device, bool f32_weights, char *err, size_t errlen)
{
    if (m->tp != 1) {
        snprintf(err, errlen, "cuda: tensor parallelism (tp %d) is not supported on CUDA", m->tp);
        return -1;
    }
    rt_cuda *c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, errlen, "cuda: out of memory");
        return -1;
    }
    c->m = m;
    c->device = device;
    c->f32_weights = f32_weights;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    if (pthread_create(&c->thread, NULL, device_main, c) != 0) {
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
        free(c);
        snprintf(err, errlen, "cuda: cannot start the device thread");
        return -1;
    }
    m->cuda = c;
    if (run_job(c, job_load, NULL, err, errlen) != 0) {
        rt_cuda_detach(m);
        return -1;
    }
    return 0;
}

void rt_cuda_detach(rt_model *m)
{
    rt_cuda *c = m ? m->cuda : NULL;
    if (!c)
        return;
    run_job(c, job_release, NULL, NULL, 0);
    pthread_mutex_lock(&c->mu);
    c->quit = true;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->thread, NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
    m->cuda = NULL;
}

/* ---- KV pools ---- */

static size_t pool_layer_floats(const rt_kv_pool *p)
{
    return (size_t)p->n_blocks * (size_t)p->block_size * (size_t)p->kv_dim;
}

static int job_kv_alloc(rt_cuda *c, void *arg)
{
    rt_kv_pool *p = arg;
    const size_t block_bytes =
        2 * sizeof(float) * (size_t)p->n_layers * (size_t)p->block_size * (size_t)p->kv_dim;
    kern_cuda_device_info info;
    char msg[256];
    if (kern_cuda_device_query(c->device, &info, msg, sizeof(msg)) != 0)
        return job_fail(c, "cuda: KV pool: %s", msg);
    const size_t avail = info.free_mem > POOL_RESERVE ? info.free_mem - POOL_RESERVE : 0;
    const size_t fit = avail / block_bytes;
    if (fit < 1)
        return job_fail(c, "cuda: KV pool: %zu bytes free on device %d, a block needs %zu",
                        info.free_mem, c->device, block_bytes);
    if ((size_t)p->n_blocks > fit) {
        fprintf(stderr, "sieve: cuda: KV pool lowered from %d to %zu blocks (device memory)\n",
                p->n_blocks, fit);
        p->n_blocks = (int)fit;
    }
    const size_t bytes = pool_layer_floats(p) * (size_t)p->n_layers * sizeof(float);
    p->k = dev_alloc(c, bytes, "the KV pool's keys");
    p->v = p->k ? dev_alloc(c, bytes, "the KV pool's values") : NULL;
    if (!p->v) {
        kern_cuda_free(p->k);
        p->k = NULL;
        return -1;
    }
    /* Zeroed, so a slot read before it is written holds numbers, never NaN bits. */
    kern_cuda_memset(p->k, 0, bytes, KERN_CUDA_COMPUTE);
    kern_cuda_memset(p->v, 0, bytes, KERN_CUDA_COMPUTE);
    return device_sync(c, "cuda: KV pool");
}

int rt_cuda_kv_alloc(rt_cuda *c, rt_kv_pool *p)
{
    char err[512];
    if (run_job(c, job_kv_alloc, p, err, sizeof(err)) != 0) {
        fprintf(stderr, "sieve: %s\n", err);
        return -1;
    }
    p->cuda = c;
    return 0;
}

static int job_kv_free(rt_cuda *c, void *arg)
{
    rt_kv_pool *p = arg;
    char msg[256];
    (void)kern_cuda_sync(msg, sizeof(msg)); /* no queued step may still read them */
    kern_cuda_free(p->k);
    kern_cuda_free(p->v);
    return 0;
}

void rt_cuda_kv_free(rt_kv_pool *p)
{
    if (!p || !p->cuda)
        return;
    run_job(p->cuda, job_kv_free, p, NULL, 0);
    p->k = p->v = NULL;
}

typedef struct {
    rt_kv_pool *p;
    int src, dst;
} copy_args;

static int job_kv_copy(rt_cuda *c, void *arg)
{
    const copy_args *a = arg;
    const rt_kv_pool *p = a->p;
    const size_t block = (size_t)p->block_size * (size_t)p->kv_dim;
    const size_t layer = pool_layer_floats(p);
    for (int l = 0; l < p->n_layers; l++) {
        const size_t s = (size_t)l * layer + (size_t)a->src * block;
        const size_t d = (size_t)l * layer + (size_t)a->dst * block;
        kern_cuda_d2d(p->k + d, p->k + s, block * sizeof(float), KERN_CUDA_COMPUTE);
        kern_cuda_d2d(p->v + d, p->v + s, block * sizeof(float), KERN_CUDA_COMPUTE);
    }
    return device_sync(c, "cuda: KV block copy");
}

void rt_cuda_kv_copy_block(rt_kv_pool *p, int src, int dst)
{
    copy_args a = {p, src, dst};
    char err[512];
    if (run_job(p->cuda, job_kv_copy, &a, err, sizeof(err)) != 0)
        fprintf(stderr, "sieve: %s\n", err); /* the next step reports the device's state */
}

/* ---- the step ---- */

/* Grows the step's int32 input arrays (device and pinned) to n. */
static int reserve_meta(rt_cuda *c, size_t n)
{
    if (n <= c->meta_cap)
        return 0;
    kern_cuda_free(c->meta);
    kern_cuda_host_free(c->h_meta);
    c->meta_cap = 0;
    const size_t cap = n + n / 2 + 1024;
    char msg[256];
    c->meta = dev_alloc(c, cap * sizeof(int32_t), "step inputs");
    c->h_meta = c->meta ? kern_cuda_host_malloc(cap * sizeof(int32_t), msg, sizeof(msg)) : NULL;
    if (!c->h_meta) {
        kern_cuda_free(c->meta);
        c->meta = NULL;
        return c->err[0] ? -1 : job_fail(c, "cuda: pinned step inputs: %s", msg);
    }
    c->meta_cap = cap;
    return 0;
}

/* Row of the pool's layer holding position pos of a sequence. */
static int32_t slot_of(const rt_seq_batch *b, int pos)
{
    const int bs = b->pool->block_size;
    return b->blocks[pos / bs] * bs + pos % bs;
}

/* Groups the sequences by pool and writes the step's int32 inputs into
 * h_meta: tokens [T], positions [T], slots [T], then each group's query
 * starts, context lengths and block tables. Returns the group count, or -1. */
static int build_meta(rt_cuda *c, int T, size_t *n_meta)
{
    rt_seq_batch *seqs = c->seqs;
    int n_groups = 0;
    size_t need = 3 * (size_t)T;
    for (int i = 0; i < c->n_seqs; i++) {
        pool_group *g = n_groups ? &c->groups[n_groups - 1] : NULL;
        if (!g || g->pool != seqs[i].pool) {
            g = &c->groups[n_groups++];
            memset(g, 0, sizeof(*g));
            g->pool = seqs[i].pool;
            g->s0 = i;
        }
        g->n++;
        if (seqs[i].n_blocks > g->stride)
            g->stride = seqs[i].n_blocks;
    }
    for (int gi = 0; gi < n_groups; gi++)
        need += 2 * (size_t)c->groups[gi].n + 1 + (size_t)c->groups[gi].n * c->groups[gi].stride;
    if (reserve_meta(c, need) != 0)
        return -1;
    int32_t *tok = c->h_meta, *pos = tok + T, *slot = pos + T;
    size_t off = 3 * (size_t)T;
    int row = 0;
    for (int gi = 0; gi < n_groups; gi++) {
        pool_group *g = &c->groups[gi];
        g->row0 = row;
        g->q_start = off;
        g->ctx_len = off + (size_t)g->n + 1;
        g->blocks = g->ctx_len + (size_t)g->n;
        off = g->blocks + (size_t)g->n * (size_t)g->stride;
        int32_t *qs = c->h_meta + g->q_start, *cl = c->h_meta + g->ctx_len;
        int32_t *bt = c->h_meta + g->blocks;
        qs[0] = 0;
        for (int j = 0; j < g->n; j++) {
            const rt_seq_batch *b = &seqs[g->s0 + j];
            for (int t = 0; t < b->n_tokens; t++, row++) {
                tok[row] = b->tokens[t];
                pos[row] = b->n_past + t;
                slot[row] = slot_of(b, b->n_past + t);
            }
            qs[j + 1] = qs[j] + b->n_tokens;
            cl[j] = b->n_past + b->n_tokens;
            if (b->n_tokens > g->max_q)
                g->max_q = b->n_tokens;
            if (cl[j] > g->max_ctx)
                g->max_ctx = cl[j];
            for (int k = 0; k < g->stride; k++)
                bt[(size_t)j * g->stride + k] = k < b->n_blocks ? b->blocks[k] : b->blocks[0];
        }
        g->rows = row - g->row0;
    }
    *n_meta = off;
    return n_groups;
}

static int matmul(float *y, int ldy, const float *x, int ldx, const dev_weight *w, int M, int N,
                  int K)
{
    return kern_cuda_matmul_q(w->type, y, ldy, x, ldx, w->data, M, N, K);
}

static int rope(rt_cuda *c, float *x, const int32_t *pos, int T, int n_heads)
{
    const rt_hparams *hp = &c->m->hp;
    if (c->rope_inv_freq)
        return kern_cuda_rope_table_f32(x, pos, T, n_heads, hp->head_dim, hp->rope_dim,
                                        c->rope_inv_freq, hp->rope_neox);
    if (hp->rope_neox)
        return kern_cuda_rope_neox_f32(x, pos, T, n_heads, hp->head_dim, hp->rope_dim,
                                       hp->rope_base);
    return kern_cuda_rope_f32(x, pos, T, n_heads, hp->head_dim, hp->rope_dim, hp->rope_base);
}

/* Keeps the first nonzero status. */
static inline void keep(int *rc, int r)
{
    if (*rc == 0)
        *rc = r;
}

/* One layer over the step's T rows. */
static int layer_forward(rt_cuda *c, int l, int T, int n_groups)
{
    const rt_hparams *hp = &c->m->hp;
    const dev_layer *L = &c->layers[l];
    const int dim = hp->dim, hd = hp->head_dim;
    const int qd = hp->n_heads * hd, kvd = hp->n_kv_heads * hd, ffn = hp->ffn_dim;
    const int32_t *pos = c->meta + T, *slots = c->meta + 2 * (size_t)T;
    int rc = 0;
    keep(&rc, kern_cuda_rmsnorm_f32(c->xb, c->x, L->attn_norm, T, dim, hp->norm_eps));
    keep(&rc, matmul(c->q, qd, c->xb, dim, &L->wq, T, qd, dim));
    keep(&rc, matmul(c->k, kvd, c->xb, dim, &L->wk, T, kvd, dim));
    keep(&rc, matmul(c->v, kvd, c->xb, dim, &L->wv, T, kvd, dim));
    if (L->bq) {
        keep(&rc, kern_cuda_add_rows_f32(c->q, L->bq, T, qd));
        keep(&rc, kern_cuda_add_rows_f32(c->k, L->bk, T, kvd));
        keep(&rc, kern_cuda_add_rows_f32(c->v, L->bv, T, kvd));
    }
    keep(&rc, rope(c, c->q, pos, T, hp->n_heads));
    keep(&rc, rope(c, c->k, pos, T, hp->n_kv_heads));
    for (int gi = 0; gi < n_groups && rc == 0; gi++) {
        const pool_group *g = &c->groups[gi];
        const size_t layer_off = (size_t)l * pool_layer_floats(g->pool);
        float *kc = g->pool->k + layer_off, *vc = g->pool->v + layer_off;
        keep(&rc,
             kern_cuda_kv_store_f32(kc, vc, kvd, c->k + (size_t)g->row0 * kvd,
                                    c->v + (size_t)g->row0 * kvd, kvd, slots + g->row0, g->rows));
        const kern_cuda_attn_varlen a = {
            .q = c->q + (size_t)g->row0 * qd,
            .k = kc,
            .v = vc,
            .out = c->att + (size_t)g->row0 * qd,
            .q_start = c->meta + g->q_start,
            .ctx_len = c->meta + g->ctx_len,
            .blocks = c->meta + g->blocks,
            .blocks_stride = g->stride,
            .block_size = g->pool->block_size,
            .n_seqs = g->n,
            .max_q = g->max_q,
            .max_ctx = g->max_ctx,
            .n_heads = hp->n_heads,
            .n_kv_heads = hp->n_kv_heads,
            .head_dim = hd,
            .kv_stride = kvd,
        };
        keep(&rc, kern_cuda_attention_varlen_f32(&a));
    }
    keep(&rc, matmul(c->proj, dim, c->att, qd, &L->wo, T, dim, qd));
    keep(&rc, kern_cuda_add_f32(c->x, c->proj, (size_t)T * dim));
    keep(&rc, kern_cuda_rmsnorm_f32(c->xb, c->x, L->ffn_norm, T, dim, hp->norm_eps));
    keep(&rc, matmul(c->gate, ffn, c->xb, dim, &L->w_gate, T, ffn, dim));
    keep(&rc, matmul(c->up, ffn, c->xb, dim, &L->w_up, T, ffn, dim));
    keep(&rc, kern_cuda_swiglu_f32(c->gate, c->gate, c->up, (size_t)T * ffn));
    keep(&rc, matmul(c->proj, dim, c->gate, ffn, &L->w_down, T, dim, ffn));
    keep(&rc, kern_cuda_add_f32(c->x, c->proj, (size_t)T * dim));
    return rc;
}

/* The error of a failed enqueue, with what was being done. */
static int step_fail(rt_cuda *c, int rc, const char *what)
{
    char msg[400] = "";
    kern_cuda_sync(msg, sizeof(msg));
    return job_fail(c, "forward (cuda): %s: %s (%s)", what, msg[0] ? msg : "failed",
                    kern_cuda_strerror(rc));
}

/* Final norm, logits and their copy out, LOGIT_ROWS sequences at a time. */
static int logits_out(rt_cuda *c)
{
    const rt_hparams *hp = &c->m->hp;
    const int dim = hp->dim, V = hp->n_vocab;
    int i = 0, row = 0;
    while (i < c->n_seqs) {
        rt_seq_batch *want[LOGIT_ROWS];
        int n = 0, rc = 0;
        for (; i < c->n_seqs && n < LOGIT_ROWS; i++) {
            row += c->seqs[i].n_tokens;
            if (!c->seqs[i].logits)
                continue;
            keep(&rc,
                 kern_cuda_rmsnorm_f32(c->last + (size_t)n * dim, c->x + (size_t)(row - 1) * dim,
                                       c->output_norm, 1, dim, hp->norm_eps));
            want[n++] = &c->seqs[i];
        }
        if (n == 0)
            continue;
        keep(&rc, matmul(c->logits, V, c->last, dim, &c->output, n, V, dim));
        keep(&rc, kern_cuda_d2h(c->h_logits, c->logits, sizeof(float) * (size_t)n * V,
                                KERN_CUDA_COMPUTE));
        if (rc != 0)
            return step_fail(c, rc, "logits");
        if (device_sync(c, "forward (cuda)") != 0)
            return -1;
        for (int j = 0; j < n; j++)
            memcpy(want[j]->logits, c->h_logits + (size_t)j * V, sizeof(float) * (size_t)V);
    }
    return 0;
}

/* Dense block counts of a sequence whose policy asked for sparse prefill (as
 * forward.c's fallback counts them: every causal block on the policy's grid). */
static void count_dense(const rt_hparams *hp, rt_seq_batch *b)
{
    const rt_attn_policy *p = b->policy;
    if (!p || p->prefill == RT_PREFILL_DENSE || !b->stats)
        return;
    const int B = p->prefill == RT_PREFILL_FLEX ? p->flex.block_size : p->power.block_size;
    if (B <= 0)
        return;
    const int ctx = b->n_past + b->n_tokens;
    const int q0 = b->n_past / B, q1 = (ctx - 1) / B;
    int64_t blocks = 0;
    for (int r = q0; r <= q1; r++)
        blocks += r + 1;
    b->stats->computed += blocks * hp->n_heads * hp->n_layers;
    b->stats->causal += blocks * hp->n_heads * hp->n_layers;
    b->stats->dense_chunks += hp->n_layers; /* one dense chunk per layer, as on the CPU */
}

static int job_step(rt_cuda *c, void *arg)
{
    const step_args *sa = arg;
    c->seqs = sa->seqs;
    c->n_seqs = sa->n_seqs;
    const rt_model *m = c->m;
    const rt_hparams *hp = &m->hp;
    int T = 0;
    for (int i = 0; i < c->n_seqs; i++) {
        T += c->seqs[i].n_tokens;
        if (c->seqs[i].pool->cuda != c)
            return job_fail(c, "forward (cuda): sequence %d's KV cache is not on device %d", i,
                            c->device);
        for (int j = 0; j < c->seqs[i].n_blocks; j++)
            if (c->seqs[i].blocks[j] < 0)
                return job_fail(c, "forward (cuda): sequence %d: block %d is released", i, j);
        const rt_attn_policy *p = c->seqs[i].policy;
        if (p && p->prefill != RT_PREFILL_DENSE && !c->warned_policy) {
            c->warned_policy = true;
            fprintf(stderr, "sieve: cuda: FlexPrefill and PowerAttention run dense on the GPU "
                            "(sparse prefill kernels are CPU-only for now)\n");
        }
        if (c->seqs[i].kvq) /* refused at admission (rt_kvq_check); never reaches here */
            return job_fail(c,
                            "forward (cuda): sequence %d: compressed KV caches run on the CPU "
                            "backend only",
                            i);
    }
    size_t n_meta = 0;
    const int n_groups = build_meta(c, T, &n_meta);
    if (n_groups < 0)
        return -1;
    int rc = kern_cuda_h2d(c->meta, c->h_meta, n_meta * sizeof(int32_t), KERN_CUDA_COMPUTE);
    keep(&rc, kern_cuda_embed(c->tok_embd.type, c->x, c->tok_embd.data, hp->n_vocab, c->meta, T,
                              hp->dim));
    if (rc != 0)
        return step_fail(c, rc, "embedding");
    for (int l = 0; l < hp->n_layers; l++) {
        rc = layer_forward(c, l, T, n_groups);
        if (rc != 0) {
            char what[32];
            snprintf(what, sizeof(what), "layer %d", l);
            return step_fail(c, rc, what);
        }
    }
    if (logits_out(c) != 0 || device_sync(c, "forward (cuda)") != 0)
        return -1;
    for (int i = 0; i < c->n_seqs; i++)
        count_dense(hp, &c->seqs[i]);
    return 0;
}

int rt_cuda_forward(rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen)
{
    step_args sa = {seqs, n_seqs};
    if (run_job(m->cuda, job_step, &sa, err, errlen) != 0)
        return -1;
    for (int i = 0; i < n_seqs; i++)
        if (seqs[i].kv)
            seqs[i].kv->len += seqs[i].n_tokens;
    return 0;
}

#endif
