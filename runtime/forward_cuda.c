/*
 * forward_cuda.c - the CUDA backend: the model's weights on one GPU or split
 * over several (tensor parallelism), its KV pools in device memory, and the
 * forward step of forward.c run there.
 *
 * Ranks and threads: a CUDA context belongs to the host thread that made it
 * (kernels/cuda.h), while a model is loaded on one thread (the server's
 * loader) and stepped on another (the engine). So the backend owns one host
 * thread per rank, each driving its own GPU, started at load; it makes the
 * rank's context and does every device call of the rank: load, pool
 * allocation, copy-on-write, steps and the final release. (runtime/tp.c's
 * rank threads run rank 0 on the caller, which a context bound to one thread
 * cannot follow; the hand-off here is the same generation counter.) A caller
 * hands all ranks one job and waits for every rank's result; jobs never
 * overlap (busy, under mu). The wait always ends: a device wait is
 * kern_cuda_sync, bounded by the context's timeout, and ranks only wait for
 * each other at ranks_agree, which every rank reaches before anything that
 * could block.
 *
 * Tensor parallelism (tp ranks, rank r on devices[r]): rank r holds query
 * heads [h0, h0 + n_h) with their KV heads and FFN columns [f0, f0 + n_f):
 * row slices of wq/wk/wv/w_gate/w_up (and the biases), column slices of wo
 * and w_down, whose products are partial sums added up by an all-reduce
 * after the attention output and FFN down projections
 * (kern_cuda_allreduce_sum_f32: NCCL on the rank's compute queue). Every rank
 * holds the embedding table, the norms and the same residual stream; only
 * rank 0 holds the output matrix and computes logits. A rank whose op failed
 * still enqueues every all-reduce of the step, so the others never wait for
 * it; a failed all-reduce or a device timeout with tp > 1 stops the backend
 * (every later step fails at once with that message) rather than risk
 * ranks that disagree.
 *
 * Weights are uploaded once: F16 and BF16 matrices as they are, F32 and the
 * quantized GGUF types converted on the host to f16 (bf16 for a tensor that
 * f16 cannot hold; f32 kept when the model was loaded with
 * device_f32_weights), norms and biases in f32. Projections run through
 * kern_cuda_matmul_q (a streaming kernel for small batches, cuBLAS on the
 * tensor cores with f32 accumulation for larger ones).
 *
 * A KV pool on the device has the host layout of rt_kv_pool
 * ([layer][block * block_size + slot][kv_dim], f32; with tp, each rank's pool
 * holds its KV heads, rank_k/rank_v), so block tables from the scheduler
 * index it unchanged. A step copies in one packed array of int32 (token ids,
 * positions, cache slots, and per pool the query starts, context lengths and
 * block tables) and copies out only the logits asked for. Sequences of one
 * step that use different pools (private rt_kv caches) are attended pool by
 * pool.
 *
 * Decode graphs: a step whose sequences all decode one token from one pool is
 * padded to a bucket of n_pad rows (a power of two) and block tables of a
 * fixed stride (a power of two), so its launches depend only on (pool, n_pad,
 * stride); the embedding and every layer (all-reduces included) are captured
 * once per such shape as a CUDA graph that reads its inputs from a device
 * array of its own, refilled before each launch. Padding rows decode token 0
 * at position 0 and write no KV (slot -1); attention sees max_ctx = stride x
 * block_size, an upper bound (empty key splits add nothing). The final norm
 * and logits run eagerly after it. Shapes that do not repeat, a capture that
 * fails, or graphs turned off (rt_model_opts.cuda_graphs_off) run eagerly.
 *
 * Sparse prefill: a sequence under PowerAttention (any step) or FlexPrefill (a
 * step of more than one token) is a pool group of its own and is attended per
 * layer as forward.c's attend() does, over the rank's heads (each rank selects
 * for its own heads, as the CPU's ranks do), with the same block counts:
 * - PowerAttention: the static block mask is built on the host
 *   (kern_power_mask) once per step, for the chunk and for its last row, and
 *   uploaded once; sparse layers run kern_cuda_attention_block_sparse_f32,
 *   the "K of every N" dense layers dense attention.
 * - FlexPrefill: when kern_flexprefill_path says the chunk gets a selection,
 *   the device computes its estimate (kern_cuda_flex_estimate_f32: probe
 *   profiles, block means; O(heads x context) floats), the rank waits for it
 *   and copies it into its host workspace, kern_flexprefill_select_estimated
 *   selects there with the CPU's code, and the mask goes back up for the
 *   block-sparse kernel. gamma >= 1 needs no estimate (every causal block).
 *   Short chunks and selections that fail take dense attention, as on the
 *   CPU. That wait is one host round trip per layer of a flex chunk.
 * - The last layer: the CPU attends only the rows read after it (the last
 *   row of a sequence that wants logits), so its block counts cover that row
 *   alone; here too, and the chunk's other rows of that layer are zeros (they
 *   are never read).
 * FlexPrefill decode rows are dense and stay in the graphs' groups; steps
 * with a PowerAttention sequence run eagerly. Compressed KV formats are
 * refused when a request asks for one (rt_kvq_check: their pages are packed
 * and read on the host).
 */
#include "runtime/model_internal.h"

#include <stdio.h>
#include <string.h>

#ifndef SIEVE_HAVE_CUDA

int rt_cuda_attach(rt_model *m, const rt_cuda_opts *o, char *err, size_t errlen)
{
    snprintf(err, errlen, "cuda: device %d: this build has no CUDA backend (built without CUDA)",
             o->devices[0]);
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

void rt_cuda_graph_stats(const rt_cuda *c, rt_graph_stats *out)
{
    memset(out, 0, sizeof(*out));
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
/* Decode graphs kept per rank (least recently used replaced). */
#define MAX_GRAPHS 32

typedef struct {
    void *data; /* device memory */
    int type;   /* KERN_TYPE_F32, F16 or BF16 */
} dev_weight;

typedef struct {
    float *attn_norm, *ffn_norm;
    float *bq, *bk, *bv; /* NULL without biases */
    dev_weight wq, wk, wv, wo, w_gate, w_up, w_down;
} dev_layer;

/* Consecutive sequences of a step that share a pool; a sequence attended under
 * a sparse policy (is_sparse) is a group of its own. */
typedef struct {
    rt_kv_pool *pool;
    bool sparse;                           /* one sequence, attended by sparse_attend */
    kern_block_mask pmask, pmask_last;     /* PowerAttention: the chunk's and its last
                                              row's masks (bits on the device) */
    kern_sparse_stats pstats, pstats_last; /* their block counts over the rank's heads */
    int s0, n;                             /* sequences s0 .. s0 + n - 1 */
    int n_all;                             /* n plus the padding sequences of a decode graph */
    int row0, rows;                        /* their token rows in the step */
    int max_q, max_ctx;
    int stride;     /* block-table entries per sequence */
    size_t q_start; /* offsets into the step's input array */
    size_t ctx_len;
    size_t blocks;
} pool_group;

/* A decode step shape and its graph. */
typedef struct {
    const rt_kv_pool *pool;
    int n_pad, stride;
    int32_t *in;           /* device: the inputs the graph reads (never moves) */
    kern_cuda_graph *exec; /* NULL: not captured (yet, or the capture failed) */
    bool tried;            /* a capture was attempted */
    unsigned long used;    /* the rank's step count when last used */
} decode_graph;

typedef struct rt_cuda_rank cuda_rank;
typedef int (*job_fn)(cuda_rank *r, void *arg);

struct rt_cuda_rank {
    rt_cuda *c;
    int rank, device;
    int h0, n_h, kvh0, n_kvh, f0, n_f; /* the shard (the whole model with one rank) */
    pthread_t thread;

    /* The last job's outcome: written by the rank's thread, read by the caller
     * once every rank is done (ordered by mu). */
    int rc;
    bool follower; /* failed only because another rank did */
    bool fatal;    /* a collective failed or the device timed out */
    char err[512];
    size_t kv_fit; /* job_kv_alloc: blocks this device can hold */
    int kv_blocks; /* job_kv_alloc: blocks allocated */

    /* Everything below belongs to the rank's thread (the graph counters are
     * read by the caller between jobs). */
    dev_weight tok_embd, output; /* output: rank 0 only */
    float *output_norm;          /* rank 0 only */
    float *rope_inv_freq;        /* the scaled-RoPE table, or NULL */
    dev_layer *layers;
    void **allocs; /* every weight allocation, freed at release */
    int n_allocs, cap_allocs;
    size_t weight_bytes;
    int n_half, n_bf16, n_f32; /* matrices by device type (for the load line) */

    float *x, *xb, *q, *k, *v, *att, *proj, *gate, *up; /* [T, shard width] scratch */
    float *last, *logits;                               /* rank 0: [LOGIT_ROWS, dim / n_vocab] */
    float *h_logits;                                    /* rank 0: pinned [LOGIT_ROWS, n_vocab] */
    int32_t *meta, *h_meta;                             /* the step's int32 inputs */
    size_t meta_cap;                                    /* int32s of both */
    pool_group *groups;                                 /* [max_batch_tokens] */
    const int32_t *in; /* the inputs the step's ops read: meta, or a graph's */

    decode_graph graphs[MAX_GRAPHS];
    int n_graphs;
    unsigned long n_steps;
    bool graph_warned;
    rt_graph_stats gstats;

    /* Sparse prefill (sparse_attend). The host side of FlexPrefill's selection
     * is made on first use: most servers never ask for it. */
    rt_attn_stats *stats;  /* [max_batch_tokens]: the step's counts per sequence */
    kern_flex_ws *flex_ws; /* host workspace for the rank's heads */
    kern_pool *flex_pool;  /* host threads of the selection */
    float *d_est;          /* device: the estimate */
    size_t est_cap;        /* floats of d_est */
    uint64_t *d_mask;      /* device: the step's PowerAttention masks, then a FlexPrefill one */
    size_t mask_cap;       /* words of d_mask */
    size_t mask_flex;      /* where the FlexPrefill mask goes */
    uint64_t *h_mask;      /* host: the step's PowerAttention masks */
    size_t h_mask_cap;
    size_t ws_reserved; /* op workspace bytes */
};

struct rt_cuda {
    rt_model *m;
    bool f32_weights;
    bool graphs; /* decode steps as graphs */
    int n_ranks;
    cuda_rank ranks[RT_TP_MAX_RANKS];
    kern_comm *comm; /* NULL with one rank */
    int n_started;   /* rank threads running */

    /* The job slot and the ranks' barrier; all guarded by mu. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool busy;         /* a caller owns the slot, from handing in a job to taking its result */
    unsigned long gen; /* bumped once per job */
    job_fn job;
    void *job_arg;
    int n_done; /* ranks done with job gen */
    bool quit;
    int bar_arrived;
    unsigned long bar_gen;
    bool bar_fail, bar_result;

    /* Set (by run_job) when tp cannot go on; every later step fails with it. */
    char broken[640];

    /* The step being run: written by the caller before the job, read-only in it. */
    rt_seq_batch *seqs;
    int n_seqs;
};

/* ---- the rank threads ---- */

static void *rank_main(void *arg)
{
    cuda_rank *r = arg;
    rt_cuda *c = r->c;
    /* Jobs are counted from 0, when the threads start: a thread that first
     * runs after job 1 was posted still runs it. */
    unsigned long seen = 0;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (c->gen == seen && !c->quit)
            pthread_cond_wait(&c->cv, &c->mu);
        if (c->gen == seen)
            break;
        seen = c->gen;
        const job_fn fn = c->job;
        void *a = c->job_arg;
        pthread_mutex_unlock(&c->mu);
        const int rc = fn(r, a);
        pthread_mutex_lock(&c->mu);
        r->rc = rc;
        if (++c->n_done == c->n_ranks)
            pthread_cond_broadcast(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Runs fn on every rank and waits for all; the first failing rank's message
 * (one that failed on its own, not as a follower) goes to err. */
static int run_job(rt_cuda *c, job_fn fn, void *arg, char *err, size_t errlen)
{
    pthread_mutex_lock(&c->mu);
    while (c->busy)
        pthread_cond_wait(&c->cv, &c->mu);
    c->busy = true;
    for (int i = 0; i < c->n_ranks; i++) {
        cuda_rank *r = &c->ranks[i];
        r->rc = 0;
        r->err[0] = 0;
        r->follower = r->fatal = false;
    }
    c->job = fn;
    c->job_arg = arg;
    c->n_done = 0;
    c->gen++;
    pthread_cond_broadcast(&c->cv);
    while (c->n_done < c->n_ranks)
        pthread_cond_wait(&c->cv, &c->mu);
    const cuda_rank *first = NULL;
    bool fatal = false;
    for (int i = 0; i < c->n_ranks; i++) {
        const cuda_rank *r = &c->ranks[i];
        if (r->rc == 0)
            continue;
        if (!first || (first->follower && !r->follower))
            first = r;
        fatal |= r->fatal;
    }
    if (first) {
        char msg[600];
        if (c->n_ranks > 1)
            snprintf(msg, sizeof(msg), "%s [tp rank %d, device %d]",
                     first->err[0] ? first->err : "failed", first->rank, first->device);
        else
            snprintf(msg, sizeof(msg), "%s", first->err[0] ? first->err : "failed");
        if (err && errlen)
            snprintf(err, errlen, "%s", msg);
        if (fatal && c->n_ranks > 1)
            snprintf(c->broken, sizeof(c->broken), "%s", msg);
    }
    c->busy = false;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return first ? -1 : 0;
}

/* Every rank of the job calls it once at the same point: true when every rank
 * passed ok. The ranks' only wait for each other outside the collectives. */
static bool ranks_agree(cuda_rank *r, bool ok)
{
    rt_cuda *c = r->c;
    if (c->n_ranks == 1)
        return ok;
    pthread_mutex_lock(&c->mu);
    const unsigned long g = c->bar_gen;
    if (!ok)
        c->bar_fail = true;
    if (++c->bar_arrived == c->n_ranks) {
        c->bar_result = !c->bar_fail;
        c->bar_arrived = 0;
        c->bar_fail = false;
        c->bar_gen++;
        pthread_cond_broadcast(&c->cv);
    } else {
        while (c->bar_gen == g)
            pthread_cond_wait(&c->cv, &c->mu);
    }
    const bool all = c->bar_result;
    pthread_mutex_unlock(&c->mu);
    return all;
}

/* Records a job's failure message (the first one) and returns -1. */
static int job_fail(cuda_rank *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int job_fail(cuda_rank *r, const char *fmt, ...)
{
    if (r->err[0] == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, sizeof(r->err), fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* A rank that stops because another rank failed. */
static int follow(cuda_rank *r)
{
    r->follower = true;
    return job_fail(r, "another tensor-parallel rank failed");
}

/* Waits for the device; -1 with "what: <the first CUDA error>" on failure. */
static int device_sync(cuda_rank *r, const char *what)
{
    char msg[400];
    const int rc = kern_cuda_sync(msg, sizeof(msg));
    if (rc == 0)
        return 0;
    if (rc == KERN_CUDA_E_TIMEOUT || rc == KERN_CUDA_E_COMM)
        r->fatal = true;
    return job_fail(r, "%s: %s (%s)", what, msg, kern_cuda_strerror(rc));
}

/* ---- memory ---- */

static void *dev_alloc(cuda_rank *r, size_t bytes, const char *what)
{
    char msg[256];
    void *p = kern_cuda_malloc(bytes ? bytes : 4, msg, sizeof(msg));
    if (!p)
        job_fail(r, "cuda: allocating %s (%zu bytes) on device %d: %s", what, bytes, r->device,
                 msg);
    return p;
}

/* A weight allocation, remembered for release. */
static void *weight_alloc(cuda_rank *r, size_t bytes, const char *what)
{
    if (r->n_allocs == r->cap_allocs) {
        const int cap = r->cap_allocs ? 2 * r->cap_allocs : 256;
        void **a = realloc(r->allocs, sizeof(void *) * (size_t)cap);
        if (!a) {
            job_fail(r, "cuda: out of host memory");
            return NULL;
        }
        r->allocs = a;
        r->cap_allocs = cap;
    }
    void *p = dev_alloc(r, bytes, what);
    if (p) {
        r->allocs[r->n_allocs++] = p;
        r->weight_bytes += bytes;
    }
    return p;
}

/* n floats of host memory to the device (NULL in, NULL out). */
static int upload_f32(cuda_rank *r, const float *src, size_t n, float **out, const char *what)
{
    *out = NULL;
    if (!src)
        return 0;
    *out = weight_alloc(r, n * sizeof(float), what);
    if (!*out)
        return -1;
    if (kern_cuda_h2d(*out, src, n * sizeof(float), KERN_CUDA_COMPUTE) != 0)
        return device_sync(r, what) ? -1 : job_fail(r, "cuda: copying %s failed", what);
    return 0;
}

/* Rows [r0, r0 + n) of w as f32 into dst (K values each). */
static int decode_rows(const rt_weight *w, int r0, int n, int K, float *dst)
{
    for (int i = 0; i < n; i++) {
        const char *row = (const char *)w->data + (size_t)(r0 + i) * w->row_bytes;
        float *d = dst + (size_t)i * (size_t)K;
        if (w->type == KERN_TYPE_F32)
            memcpy(d, row, sizeof(float) * (size_t)K);
        else if (kern_dequant_row(w->type, row, d, (size_t)K) != 0)
            return -1;
    }
    return 0;
}

/* The part of a weight (rows of K values) a rank holds: rows [r0, r0 + rows),
 * columns [c0, c0 + cols). */
typedef struct {
    int r0, rows, c0, cols, K;
} wslice;

static wslice whole(int N, int K)
{
    return (wslice){0, N, 0, K, K};
}

static void count_type(cuda_rank *r, int type)
{
    if (type == KERN_TYPE_F16)
        r->n_half++;
    else if (type == KERN_TYPE_BF16)
        r->n_bf16++;
    else
        r->n_f32++;
}

/* An F16/BF16 slice as it is stored: one copy for whole rows, else its
 * columns gathered on the host in chunks. */
static int upload_half(cuda_rank *r, const rt_weight *w, wslice s, dev_weight *out,
                       const char *what)
{
    const size_t n = (size_t)s.rows * (size_t)s.cols;
    out->type = w->type;
    out->data = weight_alloc(r, n * 2, what);
    if (!out->data)
        return -1;
    count_type(r, w->type);
    const char *base = (const char *)w->data + (size_t)s.r0 * w->row_bytes;
    if (s.c0 == 0 && s.cols == s.K) {
        kern_cuda_h2d(out->data, base, n * 2, KERN_CUDA_COMPUTE);
        return device_sync(r, what);
    }
    int chunk = (int)(UPLOAD_BYTES / ((size_t)s.cols * 2));
    chunk = chunk < 1 ? 1 : chunk > s.rows ? s.rows : chunk;
    uint16_t *tmp = malloc((size_t)chunk * (size_t)s.cols * 2);
    if (!tmp)
        return job_fail(r, "cuda: out of host memory slicing %s", what);
    int rc = 0;
    for (int i0 = 0; rc == 0 && i0 < s.rows; i0 += chunk) {
        const int nr = s.rows - i0 < chunk ? s.rows - i0 : chunk;
        for (int i = 0; i < nr; i++)
            memcpy(tmp + (size_t)i * s.cols,
                   base + (size_t)(i0 + i) * w->row_bytes + (size_t)s.c0 * 2, (size_t)s.cols * 2);
        kern_cuda_h2d((char *)out->data + (size_t)i0 * s.cols * 2, tmp, (size_t)nr * s.cols * 2,
                      KERN_CUDA_COMPUTE);
        rc = device_sync(r, what);
    }
    free(tmp);
    return rc;
}

/* Uploads a slice of a weight as F16/BF16 (or F32), converting on the host in
 * chunks. F16 is chosen unless a value of the slice exceeds its range. */
static int upload_weight(cuda_rank *r, const rt_weight *w, wslice s, dev_weight *out,
                         const char *what)
{
    memset(out, 0, sizeof(*out));
    if ((w->type == KERN_TYPE_F16 || w->type == KERN_TYPE_BF16) && w->row_bytes == (size_t)s.K * 2)
        return upload_half(r, w, s, out, what);
    const bool keep_f32 = r->c->f32_weights;
    const size_t esize = keep_f32 ? 4 : 2, cols = (size_t)s.cols;
    int chunk = (int)(UPLOAD_BYTES / ((size_t)s.K * 4));
    chunk = chunk < 1 ? 1 : chunk > s.rows ? s.rows : chunk;
    float *tmp = malloc(sizeof(float) * (size_t)chunk * (size_t)s.K);
    uint16_t *half = keep_f32 ? NULL : malloc(sizeof(uint16_t) * (size_t)chunk * cols);
    if (!tmp || (!keep_f32 && !half)) {
        free(tmp);
        free(half);
        return job_fail(r, "cuda: out of host memory converting %s", what);
    }
    out->data = weight_alloc(r, (size_t)s.rows * cols * esize, what);
    int rc = out->data ? 0 : -1;
    int type = keep_f32 ? KERN_TYPE_F32 : KERN_TYPE_F16;
restart:
    for (int i0 = 0; rc == 0 && i0 < s.rows; i0 += chunk) {
        const int nr = s.rows - i0 < chunk ? s.rows - i0 : chunk;
        const size_t cnt = (size_t)nr * cols;
        if (decode_rows(w, s.r0 + i0, nr, s.K, tmp) != 0) {
            rc = job_fail(r, "cuda: cannot decode %s (type %d)", what, w->type);
            break;
        }
        if (s.c0 != 0 || s.cols != s.K) /* keep the slice's columns, packed */
            for (int i = 0; i < nr; i++)
                memmove(tmp + (size_t)i * cols, tmp + (size_t)i * s.K + s.c0, cols * sizeof(float));
        const void *src = tmp;
        if (!keep_f32) {
            if (type == KERN_TYPE_F16)
                for (size_t i = 0; i < cnt; i++)
                    if (fabsf(tmp[i]) > F16_MAX) { /* f16 cannot hold it: start over in bf16 */
                        type = KERN_TYPE_BF16;
                        goto restart;
                    }
            kern_quant_row(type, tmp, half, cnt);
            src = half;
        }
        if (kern_cuda_h2d((char *)out->data + (size_t)i0 * cols * esize, src, cnt * esize,
                          KERN_CUDA_COMPUTE) != 0 ||
            device_sync(r, what) != 0)
            rc = job_fail(r, "cuda: copying %s failed", what);
    }
    free(tmp);
    free(half);
    out->type = type;
    count_type(r, type);
    return rc;
}

/* ---- load and release ---- */

static void drop_graph(decode_graph *g)
{
    kern_cuda_graph_destroy(g->exec);
    kern_cuda_free(g->in);
    memset(g, 0, sizeof(*g));
}

/* Forgets the graphs of one pool (NULL: all); none may be running. */
static void drop_graphs(cuda_rank *r, const rt_kv_pool *pool)
{
    int kept = 0;
    for (int i = 0; i < r->n_graphs; i++) {
        if (!pool || r->graphs[i].pool == pool)
            drop_graph(&r->graphs[i]);
        else
            r->graphs[kept++] = r->graphs[i];
    }
    r->n_graphs = kept;
}

static void free_all(cuda_rank *r)
{
    drop_graphs(r, NULL);
    for (int i = 0; i < r->n_allocs; i++)
        kern_cuda_free(r->allocs[i]);
    free(r->allocs);
    r->allocs = NULL;
    r->n_allocs = r->cap_allocs = 0;
    float *bufs[] = {r->x,    r->xb,   r->q,  r->k,    r->v,     r->att,
                     r->proj, r->gate, r->up, r->last, r->logits};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        kern_cuda_free(bufs[i]);
    kern_cuda_free(r->meta);
    kern_cuda_host_free(r->h_meta);
    kern_cuda_host_free(r->h_logits);
    kern_cuda_free(r->d_est);
    kern_cuda_free(r->d_mask);
    free(r->h_mask);
    kern_flex_ws_destroy(r->flex_ws);
    kern_pool_destroy(r->flex_pool);
    free(r->stats);
    free(r->layers);
    free(r->groups);
}

static int job_release(cuda_rank *r, void *arg)
{
    char msg[256];
    (void)kern_cuda_sync(msg, sizeof(msg));
    free_all(r);
    kern_cuda_close();
    return 0;
}

static int upload_layer(cuda_rank *r, int l)
{
    const rt_hparams *hp = &r->c->m->hp;
    const rt_layer *L = &r->c->m->layers[l];
    dev_layer *D = &r->layers[l];
    const int dim = hp->dim, hd = hp->head_dim;
    const int qd = hp->n_heads * hd, ffn = hp->ffn_dim;
    const int qr = r->n_h * hd, kvr = r->n_kvh * hd;
    char nm[64];
    snprintf(nm, sizeof(nm), "layer %d", l);
    if (upload_f32(r, L->attn_norm, (size_t)dim, &D->attn_norm, nm) ||
        upload_f32(r, L->ffn_norm, (size_t)dim, &D->ffn_norm, nm) ||
        upload_f32(r, L->bq ? L->bq + (size_t)r->h0 * hd : NULL, (size_t)qr, &D->bq, nm) ||
        upload_f32(r, L->bk ? L->bk + (size_t)r->kvh0 * hd : NULL, (size_t)kvr, &D->bk, nm) ||
        upload_f32(r, L->bv ? L->bv + (size_t)r->kvh0 * hd : NULL, (size_t)kvr, &D->bv, nm))
        return -1;
    const struct {
        const rt_weight *w;
        dev_weight *d;
        wslice s;
        const char *name;
    } mats[] = {
        {&L->wq, &D->wq, {r->h0 * hd, qr, 0, dim, dim}, "attn_q"},
        {&L->wk, &D->wk, {r->kvh0 * hd, kvr, 0, dim, dim}, "attn_k"},
        {&L->wv, &D->wv, {r->kvh0 * hd, kvr, 0, dim, dim}, "attn_v"},
        {&L->wo, &D->wo, {0, dim, r->h0 * hd, qr, qd}, "attn_output"},
        {&L->w_gate, &D->w_gate, {r->f0, r->n_f, 0, dim, dim}, "ffn_gate"},
        {&L->w_up, &D->w_up, {r->f0, r->n_f, 0, dim, dim}, "ffn_up"},
        {&L->w_down, &D->w_down, {0, dim, r->f0, r->n_f, ffn}, "ffn_down"},
    };
    for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++) {
        snprintf(nm, sizeof(nm), "blk.%d.%s", l, mats[i].name);
        if (upload_weight(r, mats[i].w, mats[i].s, mats[i].d, nm) != 0)
            return -1;
    }
    return 0;
}

static int upload_model(cuda_rank *r)
{
    const rt_model *m = r->c->m;
    const rt_hparams *hp = &m->hp;
    const int dim = hp->dim;
    if (upload_weight(r, &m->tok_embd, whole(hp->n_vocab, dim), &r->tok_embd, "token_embd") != 0)
        return -1;
    if (upload_f32(r, m->rope_inv_freq, (size_t)hp->rope_dim / 2, &r->rope_inv_freq,
                   "rope_freqs") != 0)
        return -1;
    if (r->rank == 0) { /* logits are rank 0's */
        if (m->output.data == m->tok_embd.data && m->output.type == m->tok_embd.type)
            r->output = r->tok_embd; /* tied embeddings: one copy */
        else if (upload_weight(r, &m->output, whole(hp->n_vocab, dim), &r->output, "output") != 0)
            return -1;
        if (upload_f32(r, m->output_norm, (size_t)dim, &r->output_norm, "output_norm") != 0)
            return -1;
    }
    r->layers = calloc((size_t)hp->n_layers, sizeof(dev_layer));
    if (!r->layers)
        return job_fail(r, "cuda: out of host memory");
    for (int l = 0; l < hp->n_layers; l++) {
        if (upload_layer(r, l) != 0)
            return -1;
        if (r->rank == 0 && m->progress)
            m->progress(m->progress_ctx, (float)(l + 1) / (float)hp->n_layers);
    }
    return 0;
}

static int alloc_scratch(cuda_rank *r)
{
    const rt_model *m = r->c->m;
    const rt_hparams *hp = &m->hp;
    const size_t T = (size_t)m->max_batch_tokens;
    const size_t dim = (size_t)hp->dim, qd = (size_t)r->n_h * (size_t)hp->head_dim;
    const size_t kvd = (size_t)r->n_kvh * (size_t)hp->head_dim, ffn = (size_t)r->n_f;
    const size_t f = sizeof(float);
    if (!(r->x = dev_alloc(r, T * dim * f, "x")) || !(r->xb = dev_alloc(r, T * dim * f, "xb")) ||
        !(r->q = dev_alloc(r, T * qd * f, "q")) || !(r->k = dev_alloc(r, T * kvd * f, "k")) ||
        !(r->v = dev_alloc(r, T * kvd * f, "v")) || !(r->att = dev_alloc(r, T * qd * f, "att")) ||
        !(r->proj = dev_alloc(r, T * dim * f, "proj")) ||
        !(r->gate = dev_alloc(r, T * ffn * f, "gate")) ||
        !(r->up = dev_alloc(r, T * ffn * f, "up")))
        return -1;
    char msg[256] = "";
    if (r->rank == 0) {
        if (!(r->last = dev_alloc(r, LOGIT_ROWS * dim * f, "last")) ||
            !(r->logits = dev_alloc(r, LOGIT_ROWS * (size_t)hp->n_vocab * f, "logits")))
            return -1;
        r->h_logits = kern_cuda_host_malloc(LOGIT_ROWS * (size_t)hp->n_vocab * f, msg, sizeof(msg));
        if (!r->h_logits)
            return job_fail(r, "cuda: pinned logits buffer: %s", msg);
    }
    r->groups = calloc(T, sizeof(pool_group));
    r->stats = calloc(T, sizeof(rt_attn_stats));
    if (!r->groups || !r->stats)
        return job_fail(r, "cuda: out of host memory");
    /* kern_cuda_matmul_q rounds activations of M > 8 rows into the workspace. */
    size_t widest = dim > qd ? dim : qd;
    widest = widest > ffn ? widest : ffn;
    size_t ws = 2 * T * widest;
    ws = ws > MIN_WORKSPACE ? ws : MIN_WORKSPACE;
    if (kern_cuda_reserve_workspace(ws, msg, sizeof(msg)) != 0)
        return job_fail(r, "cuda: workspace of %zu bytes: %s", ws, msg);
    r->ws_reserved = ws;
    return 0;
}

static int job_load(cuda_rank *r, void *arg)
{
    char msg[400];
    if (kern_cuda_init(r->device, msg, sizeof(msg)) != 0)
        return job_fail(r, "cuda: device %d: %s", r->device, msg);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (upload_model(r) != 0 || alloc_scratch(r) != 0 || device_sync(r, "cuda: load") != 0)
        return -1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    kern_cuda_device_info info;
    if (kern_cuda_device_query(r->device, &info, msg, sizeof(msg)) != 0)
        info.free_mem = 0;
    char who[48] = "";
    if (r->c->n_ranks > 1)
        snprintf(who, sizeof(who), "tp rank %d: ", r->rank);
    fprintf(stderr,
            "sieve: cuda: %sweights on device %d (%.2f GiB: %d f16, %d bf16, %d f32 matrices) in "
            "%.2f s; %.1f GiB free\n",
            who, r->device, (double)r->weight_bytes / 1073741824.0, r->n_half, r->n_bf16, r->n_f32,
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
            (double)info.free_mem / 1073741824.0);
    return 0;
}

/* Checks that the model splits over n ranks and writes each rank's shard:
 * whole heads (and KV heads), FFN columns in near-equal runs of `unit`
 * columns (the largest power of two up to 64 that leaves every rank some). */
static int plan_shards(rt_cuda *c, char *err, size_t errlen)
{
    const rt_hparams *hp = &c->m->hp;
    const int n = c->n_ranks;
    if (hp->n_heads % n != 0 || hp->n_kv_heads % n != 0) {
        snprintf(err, errlen,
                 "cuda: tp %d does not divide the %d attention heads and %d KV heads "
                 "(tensor parallelism splits whole heads)",
                 n, hp->n_heads, hp->n_kv_heads);
        return -1;
    }
    int unit = 64;
    while (unit > 1 && (hp->ffn_dim % unit != 0 || hp->ffn_dim / unit < n))
        unit /= 2;
    if (hp->ffn_dim / unit < n) {
        snprintf(err, errlen, "cuda: tp %d exceeds the %d FFN columns", n, hp->ffn_dim);
        return -1;
    }
    const int units = hp->ffn_dim / unit;
    for (int i = 0; i < n; i++) {
        cuda_rank *r = &c->ranks[i];
        r->n_h = hp->n_heads / n;
        r->h0 = i * r->n_h;
        r->n_kvh = hp->n_kv_heads / n;
        r->kvh0 = i * r->n_kvh;
        const int u0 = (int)((long)units * i / n), u1 = (int)((long)units * (i + 1) / n);
        r->f0 = u0 * unit;
        r->n_f = (u1 - u0) * unit;
    }
    return 0;
}

int rt_cuda_attach(rt_model *m, const rt_cuda_opts *o, char *err, size_t errlen)
{
    if (o->n_ranks < 1 || o->n_ranks > RT_TP_MAX_RANKS) {
        snprintf(err, errlen, "cuda: tp %d is out of range [1, %d]", o->n_ranks, RT_TP_MAX_RANKS);
        return -1;
    }
    rt_cuda *c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, errlen, "cuda: out of memory");
        return -1;
    }
    c->m = m;
    c->n_ranks = o->n_ranks;
    c->f32_weights = o->f32_weights;
    c->graphs = o->graphs;
    if (plan_shards(c, err, errlen) != 0) {
        free(c);
        return -1;
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    m->cuda = c;
    for (int i = 0; i < c->n_ranks; i++) {
        cuda_rank *r = &c->ranks[i];
        r->c = c;
        r->rank = i;
        r->device = o->devices[i];
        if (pthread_create(&r->thread, NULL, rank_main, r) != 0) {
            rt_cuda_detach(m);
            snprintf(err, errlen, "cuda: cannot start the thread of rank %d", i);
            return -1;
        }
        c->n_started++;
    }
    if (run_job(c, job_load, NULL, err, errlen) != 0) {
        rt_cuda_detach(m);
        return -1;
    }
    if (c->n_ranks > 1) {
        char inner[400];
        c->comm = kern_cuda_comm_create(o->devices, c->n_ranks, inner, sizeof(inner));
        if (!c->comm) {
            snprintf(err, errlen, "cuda: tp %d: %s", c->n_ranks, inner);
            rt_cuda_detach(m);
            return -1;
        }
        fprintf(stderr, "sieve: cuda: tensor parallel %d (rank 0 on device %d), all-reduce: %s\n",
                c->n_ranks, c->ranks[0].device,
                kern_comm_get_kind(c->comm) == KERN_COMM_NCCL ? "NCCL" : "threads");
    }
    return 0;
}

void rt_cuda_detach(rt_model *m)
{
    rt_cuda *c = m ? m->cuda : NULL;
    if (!c)
        return;
    /* A broken communicator may have a collective stuck on a device: abort it
     * first, so the release's waits end. */
    if (c->broken[0]) {
        kern_comm_destroy(c->comm);
        c->comm = NULL;
    }
    if (c->n_started == c->n_ranks)
        run_job(c, job_release, NULL, NULL, 0);
    pthread_mutex_lock(&c->mu);
    c->quit = true;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < c->n_started; i++)
        pthread_join(c->ranks[i].thread, NULL);
    kern_comm_destroy(c->comm);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
    m->cuda = NULL;
}

void rt_cuda_graph_stats(const rt_cuda *c, rt_graph_stats *out)
{
    *out = c->ranks[0].gstats;
}

/* ---- KV pools ---- */

static int rank_kv_dim(const cuda_rank *r)
{
    return r->n_kvh * r->c->m->hp.head_dim;
}

static size_t pool_layer_floats(const cuda_rank *r, const rt_kv_pool *p)
{
    return (size_t)p->n_blocks * (size_t)p->block_size * (size_t)rank_kv_dim(r);
}

static int job_kv_alloc(cuda_rank *r, void *arg)
{
    rt_kv_pool *p = arg;
    const size_t block_bytes =
        2 * sizeof(float) * (size_t)p->n_layers * (size_t)p->block_size * (size_t)rank_kv_dim(r);
    kern_cuda_device_info info;
    char msg[256];
    r->kv_fit = 0;
    bool ok = kern_cuda_device_query(r->device, &info, msg, sizeof(msg)) == 0;
    if (!ok) {
        job_fail(r, "cuda: KV pool: %s", msg);
    } else {
        const size_t avail = info.free_mem > POOL_RESERVE ? info.free_mem - POOL_RESERVE : 0;
        r->kv_fit = avail / block_bytes;
        if (r->kv_fit < 1) {
            ok = false;
            job_fail(r, "cuda: KV pool: %zu bytes free on device %d, a block needs %zu",
                     info.free_mem, r->device, block_bytes);
        }
    }
    if (!ranks_agree(r, ok))
        return ok ? follow(r) : -1;
    /* Every rank holds the same blocks: as many as the fullest device fits. */
    size_t fit = (size_t)p->n_blocks;
    for (int i = 0; i < r->c->n_ranks; i++)
        fit = r->c->ranks[i].kv_fit < fit ? r->c->ranks[i].kv_fit : fit;
    r->kv_blocks = (int)fit;
    const size_t bytes =
        fit * (size_t)p->block_size * (size_t)rank_kv_dim(r) * (size_t)p->n_layers * sizeof(float);
    float *k = dev_alloc(r, bytes, "the KV pool's keys");
    float *v = k ? dev_alloc(r, bytes, "the KV pool's values") : NULL;
    p->rank_k[r->rank] = k;
    p->rank_v[r->rank] = v;
    if (!v)
        return -1;
    /* Zeroed, so a slot read before it is written holds numbers, never NaN bits. */
    kern_cuda_memset(k, 0, bytes, KERN_CUDA_COMPUTE);
    kern_cuda_memset(v, 0, bytes, KERN_CUDA_COMPUTE);
    return device_sync(r, "cuda: KV pool");
}

static int job_kv_free(cuda_rank *r, void *arg)
{
    rt_kv_pool *p = arg;
    char msg[256];
    (void)kern_cuda_sync(msg, sizeof(msg)); /* no queued step may still read them */
    drop_graphs(r, p);
    kern_cuda_free(p->rank_k[r->rank]);
    kern_cuda_free(p->rank_v[r->rank]);
    p->rank_k[r->rank] = p->rank_v[r->rank] = NULL;
    return 0;
}

int rt_cuda_kv_alloc(rt_cuda *c, rt_kv_pool *p)
{
    char err[600];
    const int asked = p->n_blocks;
    if (run_job(c, job_kv_alloc, p, err, sizeof(err)) != 0) {
        fprintf(stderr, "sieve: %s\n", err);
        run_job(c, job_kv_free, p, NULL, 0); /* what the other ranks allocated */
        return -1;
    }
    p->n_blocks = c->ranks[0].kv_blocks;
    if (p->n_blocks < asked)
        fprintf(stderr, "sieve: cuda: KV pool lowered from %d to %d blocks (device memory)\n",
                asked, p->n_blocks);
    p->k = p->rank_k[0];
    p->v = p->rank_v[0];
    p->cuda = c;
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

static int job_kv_copy(cuda_rank *r, void *arg)
{
    const copy_args *a = arg;
    const rt_kv_pool *p = a->p;
    float *k = p->rank_k[r->rank], *v = p->rank_v[r->rank];
    const size_t block = (size_t)p->block_size * (size_t)rank_kv_dim(r);
    const size_t layer = pool_layer_floats(r, p);
    for (int l = 0; l < p->n_layers; l++) {
        const size_t s = (size_t)l * layer + (size_t)a->src * block;
        const size_t d = (size_t)l * layer + (size_t)a->dst * block;
        kern_cuda_d2d(k + d, k + s, block * sizeof(float), KERN_CUDA_COMPUTE);
        kern_cuda_d2d(v + d, v + s, block * sizeof(float), KERN_CUDA_COMPUTE);
    }
    return device_sync(r, "cuda: KV block copy");
}

void rt_cuda_kv_copy_block(rt_kv_pool *p, int src, int dst)
{
    copy_args a = {p, src, dst};
    char err[600];
    if (run_job(p->cuda, job_kv_copy, &a, err, sizeof(err)) != 0)
        fprintf(stderr, "sieve: %s\n", err); /* the next step reports the device's state */
}

/* ---- the step's inputs ---- */

/* Grows the step's int32 input arrays (device and pinned) to n. */
static int reserve_meta(cuda_rank *r, size_t n)
{
    if (n <= r->meta_cap)
        return 0;
    kern_cuda_free(r->meta);
    kern_cuda_host_free(r->h_meta);
    r->meta_cap = 0;
    const size_t cap = n + n / 2 + 1024;
    char msg[256];
    r->meta = dev_alloc(r, cap * sizeof(int32_t), "step inputs");
    r->h_meta = r->meta ? kern_cuda_host_malloc(cap * sizeof(int32_t), msg, sizeof(msg)) : NULL;
    if (!r->h_meta) {
        kern_cuda_free(r->meta);
        r->meta = NULL;
        return r->err[0] ? -1 : job_fail(r, "cuda: pinned step inputs: %s", msg);
    }
    r->meta_cap = cap;
    return 0;
}

/* Row of the pool's layer holding position pos of a sequence. */
static int32_t slot_of(const rt_seq_batch *b, int pos)
{
    const int bs = b->pool->block_size;
    return b->blocks[pos / bs] * bs + pos % bs;
}

/* Whether b is attended under a sparse policy this step (a group of its own):
 * PowerAttention always (decode rows too), FlexPrefill for more than one row
 * (decode rows are dense under it). */
static bool is_sparse(const rt_seq_batch *b)
{
    const rt_attn_policy *p = b->policy;
    return p &&
           (p->prefill == RT_PREFILL_POWER || (p->prefill == RT_PREFILL_FLEX && b->n_tokens > 1));
}

/* Groups the sequences by pool and writes the step's int32 inputs into
 * h_meta: tokens, positions, slots (one per row), then each group's query
 * starts, context lengths and block tables. With n_pad > 0 (a decode graph:
 * one group of one-token sequences) the group is padded to n_pad sequences
 * and its block tables to `stride` entries. Returns the group count, or -1. */
static int build_meta(cuda_rank *r, int T, int n_pad, int stride, size_t *n_meta)
{
    rt_cuda *c = r->c;
    rt_seq_batch *seqs = c->seqs;
    int n_groups = 0;
    for (int i = 0; i < c->n_seqs; i++) {
        pool_group *g = n_groups ? &r->groups[n_groups - 1] : NULL;
        const bool sparse = is_sparse(&seqs[i]);
        if (!g || g->pool != seqs[i].pool || sparse || g->sparse) {
            g = &r->groups[n_groups++];
            memset(g, 0, sizeof(*g));
            g->pool = seqs[i].pool;
            g->s0 = i;
            g->sparse = sparse;
        }
        g->n++;
        g->n_all++;
        if (seqs[i].n_blocks > g->stride)
            g->stride = seqs[i].n_blocks;
    }
    if (n_pad) {
        r->groups[0].n_all = n_pad;
        r->groups[0].stride = stride;
        T = n_pad;
    }
    size_t need = 3 * (size_t)T;
    for (int gi = 0; gi < n_groups; gi++) {
        const pool_group *g = &r->groups[gi];
        need += 2 * (size_t)g->n_all + 1 + (size_t)g->n_all * (size_t)g->stride;
    }
    if (reserve_meta(r, need) != 0)
        return -1;
    int32_t *tok = r->h_meta, *pos = tok + T, *slot = pos + T;
    size_t off = 3 * (size_t)T;
    int row = 0;
    for (int gi = 0; gi < n_groups; gi++) {
        pool_group *g = &r->groups[gi];
        g->row0 = row;
        g->q_start = off;
        g->ctx_len = off + (size_t)g->n_all + 1;
        g->blocks = g->ctx_len + (size_t)g->n_all;
        off = g->blocks + (size_t)g->n_all * (size_t)g->stride;
        int32_t *qs = r->h_meta + g->q_start, *cl = r->h_meta + g->ctx_len;
        int32_t *bt = r->h_meta + g->blocks;
        const int32_t any_block = seqs[g->s0].blocks[0];
        qs[0] = 0;
        for (int j = 0; j < g->n_all; j++) {
            int32_t *bj = bt + (size_t)j * g->stride;
            if (j >= g->n) { /* padding: token 0 at position 0, no KV written */
                tok[row] = 0;
                pos[row] = 0;
                slot[row] = -1;
                row++;
                qs[j + 1] = qs[j] + 1;
                cl[j] = 1;
                for (int k = 0; k < g->stride; k++)
                    bj[k] = any_block;
                continue;
            }
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
                bj[k] = k < b->n_blocks ? b->blocks[k] : b->blocks[0];
        }
        if (n_pad) { /* launch sizes that do not change with the step's values */
            g->max_q = 1;
            g->max_ctx = g->stride * g->pool->block_size;
        }
        g->rows = row - g->row0;
    }
    *n_meta = off;
    return n_groups;
}

/* ---- the layers ---- */

static int matmul(float *y, int ldy, const float *x, int ldx, const dev_weight *w, int M, int N,
                  int K)
{
    return kern_cuda_matmul_q(w->type, y, ldy, x, ldx, w->data, M, N, K);
}

static int rope(cuda_rank *r, float *x, const int32_t *pos, int T, int n_heads)
{
    const rt_hparams *hp = &r->c->m->hp;
    if (r->rope_inv_freq)
        return kern_cuda_rope_table_f32(x, pos, T, n_heads, hp->head_dim, hp->rope_dim,
                                        r->rope_inv_freq, hp->rope_neox);
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

/* The ranks' sum of buf (nothing with one rank). */
static int allreduce(cuda_rank *r, float *buf, size_t n)
{
    rt_cuda *c = r->c;
    if (c->n_ranks == 1)
        return 0;
    char msg[300];
    const int rc = kern_cuda_allreduce_sum_f32(c->comm, r->rank, buf, n, msg, sizeof(msg));
    if (rc != 0) {
        r->fatal = true;
        job_fail(r, "forward (cuda): all-reduce: %s", msg);
    }
    return rc;
}

/* ---- sparse prefill ---- */

static int policy_block(const rt_attn_policy *p)
{
    return p->prefill == RT_PREFILL_FLEX ? p->flex.block_size : p->power.block_size;
}

/* The shape of the last n_q rows of b over the rank's heads (no pointers). */
static kern_attn_args rank_shape(const cuda_rank *r, const rt_seq_batch *b, int n_q)
{
    const int hd = r->c->m->hp.head_dim;
    return (kern_attn_args){.n_q = n_q,
                            .ctx_len = b->n_past + b->n_tokens,
                            .n_heads = r->n_h,
                            .n_kv_heads = r->n_kvh,
                            .head_dim = hd,
                            .kv_stride = r->n_kvh * hd,
                            .block_size = b->pool->block_size};
}

/* Offsets of the estimate's five arrays in d_est (64-float aligned); their end. */
static size_t est_layout(const kern_flex_estimate_len *L, size_t off[5])
{
    const size_t n[5] = {L->vertical, L->slash, L->kbar, L->qbar, L->qtil};
    size_t at = 0;
    for (int i = 0; i < 5; i++) {
        off[i] = at;
        at += (n[i] + 63) & ~(size_t)63;
    }
    return at;
}

/* Block counts of dense attention over n_q rows ending at ctx on a grid of B
 * (forward.c's add_dense_blocks: dense layers count as computed). */
static void add_dense_blocks(rt_attn_stats *st, int ctx, int n_q, int n_heads, int B)
{
    int64_t blocks = 0;
    for (int q = (ctx - n_q) / B; q <= (ctx - 1) / B; q++)
        blocks += q + 1;
    st->computed += blocks * n_heads;
    st->causal += blocks * n_heads;
}

/* Sizes the step's sparse-attention buffers (growing them; the previous step
 * has finished with them) and builds and uploads its PowerAttention masks.
 * Runs before the step's first op, so a failure fails it on this rank alone. */
static int prepare_sparse(cuda_rank *r, int n_groups)
{
    rt_cuda *c = r->c;
    size_t power_words = 0, flex_words = 0, est = 0, ws = 0;
    bool flex = false;
    for (int gi = 0; gi < n_groups; gi++) {
        const pool_group *g = &r->groups[gi];
        if (!g->sparse)
            continue;
        const rt_seq_batch *b = &c->seqs[g->s0];
        const rt_attn_policy *p = b->policy;
        const int B = policy_block(p), ctx = b->n_past + b->n_tokens;
        if (p->prefill == RT_PREFILL_POWER) {
            power_words +=
                kern_block_mask_words(B, 1, ctx, b->n_tokens) + kern_block_mask_words(B, 1, ctx, 1);
            continue;
        }
        flex = true;
        const kern_attn_args a = rank_shape(r, b, b->n_tokens);
        if (kern_flexprefill_path(&a, &p->flex) != KERN_FLEX_SPARSE)
            continue;
        const size_t w = kern_block_mask_words(B, r->n_h, ctx, b->n_tokens);
        flex_words = w > flex_words ? w : flex_words;
        if (p->flex.gamma >= 1.0f)
            continue;
        const kern_flex_estimate_len L = kern_flex_estimate_lengths(&a, B);
        size_t off[5];
        const size_t e = est_layout(&L, off), need = kern_cuda_flex_estimate_workspace(&a, B);
        est = e > est ? e : est;
        ws = need > ws ? need : ws;
    }
    char msg[256];
    if (power_words + flex_words > r->mask_cap) {
        kern_cuda_free(r->d_mask);
        r->mask_cap = 0;
        r->d_mask = dev_alloc(r, sizeof(uint64_t) * (power_words + flex_words), "sparse masks");
        if (!r->d_mask)
            return -1;
        r->mask_cap = power_words + flex_words;
    }
    if (power_words > r->h_mask_cap) {
        free(r->h_mask);
        r->h_mask_cap = 0;
        if (!(r->h_mask = malloc(sizeof(uint64_t) * power_words)))
            return job_fail(r, "cuda: out of host memory for sparse masks");
        r->h_mask_cap = power_words;
    }
    if (est > r->est_cap) {
        kern_cuda_free(r->d_est);
        r->est_cap = 0;
        if (!(r->d_est = dev_alloc(r, sizeof(float) * est, "the FlexPrefill estimate")))
            return -1;
        r->est_cap = est;
    }
    if (ws > r->ws_reserved) {
        if (kern_cuda_reserve_workspace(ws, msg, sizeof(msg)) != 0)
            return job_fail(r, "cuda: workspace of %zu bytes for FlexPrefill: %s", ws, msg);
        r->ws_reserved = ws;
    }
    if (flex && !r->flex_ws) {
        const rt_model *m = c->m;
        int threads = kern_pool_size(m->ranks[0].pool) / c->n_ranks;
        threads = threads > 1 ? threads : 1;
        r->flex_pool = kern_pool_create(threads);
        r->flex_ws = r->flex_pool ? kern_flex_ws_create(m->n_ctx, r->n_h, r->n_kvh, m->hp.head_dim,
                                                        RT_FLEX_MIN_BLOCK, threads)
                                  : NULL;
        if (!r->flex_ws) {
            kern_pool_destroy(r->flex_pool);
            r->flex_pool = NULL;
            return job_fail(r, "cuda: out of host memory for the FlexPrefill workspace");
        }
    }
    /* PowerAttention: the chunk's mask and its last row's, for every layer. */
    size_t off = 0;
    for (int gi = 0; gi < n_groups; gi++) {
        pool_group *g = &r->groups[gi];
        const rt_seq_batch *b = &c->seqs[g->s0];
        if (!g->sparse || b->policy->prefill != RT_PREFILL_POWER)
            continue;
        const kern_power_params *pp = &b->policy->power;
        const int ctx = b->n_past + b->n_tokens;
        for (int last = 0; last < 2; last++) {
            const int nq = last ? 1 : b->n_tokens;
            const size_t w = kern_block_mask_words(pp->block_size, 1, ctx, nq);
            kern_block_mask *mk = last ? &g->pmask_last : &g->pmask;
            if (kern_block_mask_init(mk, r->h_mask + off, w, pp->block_size, 1, ctx, nq) != 0 ||
                kern_power_mask(pp, mk) != 0)
                return job_fail(r,
                                "forward (cuda): sequence %d: PowerAttention mask (block size "
                                "%d, window %d)",
                                g->s0, pp->block_size, pp->window_blocks);
            kern_block_mask_stats(mk, r->n_h, last ? &g->pstats_last : &g->pstats);
            mk->bits = r->d_mask + off;
            off += w;
        }
    }
    r->mask_flex = off;
    if (off && kern_cuda_h2d(r->d_mask, r->h_mask, sizeof(uint64_t) * off, KERN_CUDA_COMPUTE))
        return device_sync(r, "cuda: PowerAttention masks") ? -1
                                                            : job_fail(r, "cuda: mask copy failed");
    return 0;
}

/* FlexPrefill over the rows of *a: the estimate on the device, the selection
 * on the host, the block-sparse kernel with its mask; dense where forward.c's
 * attend() is dense. */
static int flex_attend(cuda_rank *r, const kern_flex_params *fp, const kern_attn_args *a,
                       rt_attn_stats *st)
{
    const int B = fp->block_size;
    kern_flex_estimate host;
    bool dense = kern_flexprefill_path(a, fp) != KERN_FLEX_SPARSE ||
                 kern_flex_ws_estimate(r->flex_ws, a, B, &host) != KERN_SPARSE_OK;
    if (!dense && fp->gamma < 1.0f) {
        const kern_flex_estimate_len L = kern_flex_estimate_lengths(a, B);
        size_t off[5];
        est_layout(&L, off);
        float *e = r->d_est;
        const kern_flex_estimate dev = {e + off[0], e + off[1], e + off[2], e + off[3], e + off[4]};
        int rc = kern_cuda_flex_estimate_f32(a, B, &dev);
        const size_t n[5] = {L.vertical, L.slash, L.kbar, L.qbar, L.qtil};
        float *const to[5] = {host.vertical, host.slash, host.kbar, host.qbar, host.qtil};
        for (int i = 0; i < 5; i++)
            keep(&rc, kern_cuda_d2h(to[i], e + off[i], sizeof(float) * n[i], KERN_CUDA_COMPUTE));
        /* The selection needs the estimate now: the only wait inside a layer.
         * Its failure may be an earlier op's: recorded here with its message. */
        if (device_sync(r, "forward (cuda): FlexPrefill estimate") != 0)
            return rc ? rc : KERN_CUDA_E_RUNTIME;
        if (rc)
            return rc;
    }
    kern_block_mask mk;
    kern_flex_result res;
    if (!dense)
        dense = kern_flexprefill_select_estimated(r->flex_pool, a, fp, r->flex_ws, &mk, &res) !=
                    KERN_SPARSE_OK ||
                res.path != KERN_FLEX_SPARSE;
    if (dense) {
        add_dense_blocks(st, a->ctx_len, a->n_q, a->n_heads, B);
        st->dense_chunks++;
        return kern_cuda_attention_f32(a);
    }
    const size_t words = (size_t)mk.n_lists * (size_t)mk.n_qblocks * (size_t)mk.words;
    int rc = kern_cuda_h2d(r->d_mask + r->mask_flex, mk.bits, sizeof(uint64_t) * words,
                           KERN_CUDA_COMPUTE);
    mk.bits = r->d_mask + r->mask_flex;
    keep(&rc, kern_cuda_attention_block_sparse_f32(a, &mk));
    st->computed += res.blocks.computed;
    st->causal += res.blocks.causal;
    st->sparse_chunks++;
    return rc;
}

/* Attention of a sparse group's sequence in layer l (its K and V are stored),
 * as forward.c's attend() computes it for the rank's heads, counts included.
 * In the last layer only the last row of a sequence that wants logits is
 * attended (forward.c's last_layer_rows); its other rows get zeros. */
static int sparse_attend(cuda_rank *r, int l, const pool_group *g, float *kc, float *vc)
{
    const rt_cuda *c = r->c;
    const rt_hparams *hp = &c->m->hp;
    const rt_seq_batch *b = &c->seqs[g->s0];
    const rt_attn_policy *p = b->policy;
    rt_attn_stats *st = &r->stats[g->s0];
    const bool last = l == hp->n_layers - 1;
    const int n = b->n_tokens, nq = last ? (b->logits ? 1 : 0) : n;
    const size_t qd = (size_t)r->n_h * hp->head_dim;
    float *att = r->att + (size_t)g->row0 * qd;
    int rc = 0;
    if (nq < n)
        keep(&rc,
             kern_cuda_memset(att, 0, sizeof(float) * (size_t)(n - nq) * qd, KERN_CUDA_COMPUTE));
    if (nq == 0)
        return rc;
    kern_attn_args a = rank_shape(r, b, nq);
    a.q = r->q + ((size_t)g->row0 + (size_t)(n - nq)) * qd;
    a.k = kc;
    a.v = vc;
    a.out = att + (size_t)(n - nq) * qd;
    a.blocks = r->in + g->blocks;
    if (p->prefill == RT_PREFILL_FLEX) {
        keep(&rc, flex_attend(r, &p->flex, &a, st));
        return rc;
    }
    if (kern_power_layer_is_dense(l, p->power_dense_count, p->power_period)) {
        add_dense_blocks(st, a.ctx_len, nq, r->n_h, p->power.block_size);
        st->dense_chunks++;
        keep(&rc, kern_cuda_attention_f32(&a));
        return rc;
    }
    const kern_sparse_stats *ps = nq == n ? &g->pstats : &g->pstats_last;
    st->computed += ps->computed;
    st->causal += ps->causal;
    st->sparse_chunks++;
    keep(&rc, kern_cuda_attention_block_sparse_f32(&a, nq == n ? &g->pmask : &g->pmask_last));
    return rc;
}

/* The counts forward.c's attend() adds for a sequence that is not in a
 * sparse group but has a policy (FlexPrefill decode rows: dense in every
 * layer that attends them). */
static void count_dense_layers(const cuda_rank *r, const rt_seq_batch *b, rt_attn_stats *st)
{
    const rt_hparams *hp = &r->c->m->hp;
    const int B = policy_block(b->policy), ctx = b->n_past + b->n_tokens;
    for (int l = 0; l < hp->n_layers; l++) {
        const int nq = l == hp->n_layers - 1 ? (b->logits ? 1 : 0) : b->n_tokens;
        if (nq == 0)
            continue;
        add_dense_blocks(st, ctx, nq, r->n_h, B);
        st->dense_chunks++;
    }
}

/* One layer over the step's T rows. Every op is enqueued even after one
 * failed, so the rank takes part in both all-reduces whatever happens. */
static int layer_forward(cuda_rank *r, int l, int T, int n_groups)
{
    const rt_hparams *hp = &r->c->m->hp;
    const dev_layer *L = &r->layers[l];
    const int dim = hp->dim, hd = hp->head_dim;
    const int qd = r->n_h * hd, kvd = r->n_kvh * hd, ffn = r->n_f;
    const int32_t *pos = r->in + T, *slots = r->in + 2 * (size_t)T;
    int rc = 0;
    keep(&rc, kern_cuda_rmsnorm_f32(r->xb, r->x, L->attn_norm, T, dim, hp->norm_eps));
    keep(&rc, matmul(r->q, qd, r->xb, dim, &L->wq, T, qd, dim));
    keep(&rc, matmul(r->k, kvd, r->xb, dim, &L->wk, T, kvd, dim));
    keep(&rc, matmul(r->v, kvd, r->xb, dim, &L->wv, T, kvd, dim));
    if (L->bq) {
        keep(&rc, kern_cuda_add_rows_f32(r->q, L->bq, T, qd));
        keep(&rc, kern_cuda_add_rows_f32(r->k, L->bk, T, kvd));
        keep(&rc, kern_cuda_add_rows_f32(r->v, L->bv, T, kvd));
    }
    keep(&rc, rope(r, r->q, pos, T, r->n_h));
    keep(&rc, rope(r, r->k, pos, T, r->n_kvh));
    for (int gi = 0; gi < n_groups; gi++) {
        const pool_group *g = &r->groups[gi];
        const size_t layer_off = (size_t)l * pool_layer_floats(r, g->pool);
        float *kc = g->pool->rank_k[r->rank] + layer_off;
        float *vc = g->pool->rank_v[r->rank] + layer_off;
        keep(&rc,
             kern_cuda_kv_store_f32(kc, vc, kvd, r->k + (size_t)g->row0 * kvd,
                                    r->v + (size_t)g->row0 * kvd, kvd, slots + g->row0, g->rows));
        if (g->sparse) {
            keep(&rc, sparse_attend(r, l, g, kc, vc));
            continue;
        }
        const kern_cuda_attn_varlen a = {
            .q = r->q + (size_t)g->row0 * qd,
            .k = kc,
            .v = vc,
            .out = r->att + (size_t)g->row0 * qd,
            .q_start = r->in + g->q_start,
            .ctx_len = r->in + g->ctx_len,
            .blocks = r->in + g->blocks,
            .blocks_stride = g->stride,
            .block_size = g->pool->block_size,
            .n_seqs = g->n_all,
            .max_q = g->max_q,
            .max_ctx = g->max_ctx,
            .n_heads = r->n_h,
            .n_kv_heads = r->n_kvh,
            .head_dim = hd,
            .kv_stride = kvd,
        };
        keep(&rc, kern_cuda_attention_varlen_f32(&a));
    }
    keep(&rc, matmul(r->proj, dim, r->att, qd, &L->wo, T, dim, qd));
    keep(&rc, allreduce(r, r->proj, (size_t)T * dim));
    keep(&rc, kern_cuda_add_f32(r->x, r->proj, (size_t)T * dim));
    keep(&rc, kern_cuda_rmsnorm_f32(r->xb, r->x, L->ffn_norm, T, dim, hp->norm_eps));
    keep(&rc, matmul(r->gate, ffn, r->xb, dim, &L->w_gate, T, ffn, dim));
    keep(&rc, matmul(r->up, ffn, r->xb, dim, &L->w_up, T, ffn, dim));
    keep(&rc, kern_cuda_swiglu_f32(r->gate, r->gate, r->up, (size_t)T * ffn));
    keep(&rc, matmul(r->proj, dim, r->gate, ffn, &L->w_down, T, dim, ffn));
    keep(&rc, allreduce(r, r->proj, (size_t)T * dim));
    keep(&rc, kern_cuda_add_f32(r->x, r->proj, (size_t)T * dim));
    return rc;
}

/* The embedding and every layer over T rows reading r->in; the first
 * failure's status, with where it happened in what. */
static int enqueue_layers(cuda_rank *r, int T, int n_groups, char *what, size_t whatlen)
{
    const rt_hparams *hp = &r->c->m->hp;
    int rc =
        kern_cuda_embed(r->tok_embd.type, r->x, r->tok_embd.data, hp->n_vocab, r->in, T, hp->dim);
    if (rc)
        snprintf(what, whatlen, "embedding");
    for (int l = 0; l < hp->n_layers; l++) {
        const int lr = layer_forward(r, l, T, n_groups);
        if (lr && !rc) {
            rc = lr;
            snprintf(what, whatlen, "layer %d", l);
        }
    }
    return rc;
}

/* A rank whose step inputs did not reach the device must not run its layers
 * (its slots would be stale: KV written over other positions), but the other
 * ranks wait for its all-reduces: it takes part in those alone. */
static void collectives_only(cuda_rank *r, int T)
{
    const rt_hparams *hp = &r->c->m->hp;
    for (int l = 0; l < hp->n_layers; l++) {
        allreduce(r, r->proj, (size_t)T * hp->dim);
        allreduce(r, r->proj, (size_t)T * hp->dim);
    }
}

/* The error of a failed enqueue, with what was being done. */
static int step_fail(cuda_rank *r, int rc, const char *what)
{
    char msg[400] = "";
    const int sync_rc = kern_cuda_sync(msg, sizeof(msg));
    if (sync_rc == KERN_CUDA_E_TIMEOUT || sync_rc == KERN_CUDA_E_COMM)
        r->fatal = true;
    return job_fail(r, "forward (cuda): %s: %s (%s)", what, msg[0] ? msg : "failed",
                    kern_cuda_strerror(rc));
}

/* ---- decode graphs ---- */

static unsigned next_pow2(unsigned x)
{
    unsigned p = 1;
    while (p < x)
        p <<= 1;
    return p;
}

/* The padded shape of the step when it can run as a decode graph (every
 * sequence one token, one pool), else n_pad 0: eager. */
static void plan_graph(cuda_rank *r, int *n_pad, int *stride)
{
    const rt_cuda *c = r->c;
    *n_pad = *stride = 0;
    if (!c->graphs)
        return;
    int max_blocks = 1;
    for (int i = 0; i < c->n_seqs; i++) {
        const rt_seq_batch *b = &c->seqs[i];
        if (b->n_tokens != 1 || b->pool != c->seqs[0].pool || is_sparse(b))
            return;
        if (b->n_blocks > max_blocks)
            max_blocks = b->n_blocks;
    }
    const int mbt = c->m->max_batch_tokens;
    const int n = (int)next_pow2((unsigned)c->n_seqs);
    *n_pad = n < mbt ? n : mbt;
    *stride = (int)next_pow2((unsigned)max_blocks);
}

/* The graph slot of a shape: the one it has, or a new one (replacing the
 * least recently used), with its input array; NULL when that cannot be
 * allocated (the step then runs eagerly). */
static decode_graph *graph_slot(cuda_rank *r, const rt_kv_pool *pool, int n_pad, int stride,
                                size_t n_meta)
{
    for (int i = 0; i < r->n_graphs; i++) {
        decode_graph *g = &r->graphs[i];
        if (g->pool == pool && g->n_pad == n_pad && g->stride == stride)
            return g;
    }
    decode_graph *g = &r->graphs[r->n_graphs];
    if (r->n_graphs == MAX_GRAPHS) {
        g = &r->graphs[0];
        for (int i = 1; i < r->n_graphs; i++)
            if (r->graphs[i].used < g->used)
                g = &r->graphs[i];
        drop_graph(g);
    } else {
        r->n_graphs++;
    }
    memset(g, 0, sizeof(*g));
    char msg[256];
    g->in = kern_cuda_malloc(n_meta * sizeof(int32_t), msg, sizeof(msg));
    if (!g->in) {
        *g = r->graphs[--r->n_graphs];
        return NULL;
    }
    g->pool = pool;
    g->n_pad = n_pad;
    g->stride = stride;
    return g;
}

/* Captures the step's layers into g (nothing runs; r->in is g->in). 0, or -1
 * after a capture that failed, left with no error pending: the eager run
 * that follows reports its own. */
static int capture(cuda_rank *r, decode_graph *g)
{
    char msg[300] = "", what[32] = "";
    kern_cuda_graph *exec = NULL;
    g->tried = true;
    if (kern_cuda_graph_begin(msg, sizeof(msg)) == 0) {
        const int rc = enqueue_layers(r, g->n_pad, 1, what, sizeof(what));
        if (rc != 0)
            kern_cuda_last_error(msg, sizeof(msg));
        char end_msg[300] = "";
        exec = kern_cuda_graph_end(end_msg, sizeof(end_msg));
        if (rc == 0 && !exec)
            snprintf(msg, sizeof(msg), "%s", end_msg);
        if (rc != 0) {
            kern_cuda_graph_destroy(exec);
            exec = NULL;
        }
    }
    if (exec) {
        g->exec = exec;
        r->gstats.captured++;
        return 0;
    }
    char ignored[256];
    (void)kern_cuda_sync(ignored, sizeof(ignored));
    r->fatal = false; /* what the capture recorded is not the step's failure */
    r->err[0] = 0;
    if (!r->graph_warned && r->rank == 0) {
        r->graph_warned = true;
        fprintf(stderr,
                "sieve: cuda: a decode graph capture failed (%s%s%s); such steps run eagerly\n",
                what, what[0] ? ": " : "", msg);
    }
    return -1;
}

/* A decode step through its graph (captured on first use), or eagerly over
 * the same padded inputs when there is none or its launch failed (the eager
 * ops still enqueue the rank's all-reduces, so no other rank waits). */
static int run_decode(cuda_rank *r, int n_pad, int stride, size_t n_meta, char *what,
                      size_t whatlen)
{
    decode_graph *g = graph_slot(r, r->c->seqs[0].pool, n_pad, stride, n_meta);
    r->in = g ? g->in : r->meta;
    if (g) {
        g->used = r->n_steps;
        if (!g->exec && !g->tried)
            (void)capture(r, g);
    }
    int rc = kern_cuda_h2d((void *)r->in, r->h_meta, n_meta * sizeof(int32_t), KERN_CUDA_COMPUTE);
    if (rc) {
        snprintf(what, whatlen, "step inputs");
        collectives_only(r, n_pad);
        return rc;
    }
    if (g && g->exec) {
        rc = kern_cuda_graph_launch(g->exec);
        if (rc == 0) {
            r->gstats.replayed++;
            return 0;
        }
        snprintf(what, whatlen, "decode graph launch");
    }
    r->gstats.eager++;
    char lwhat[32] = "";
    const int lr = enqueue_layers(r, n_pad, 1, lwhat, sizeof(lwhat));
    if (lr && !rc) {
        rc = lr;
        snprintf(what, whatlen, "%s", lwhat);
    }
    return rc;
}

/* ---- the step ---- */

/* Final norm, logits and their copy out, LOGIT_ROWS sequences at a time (rank 0). */
static int logits_out(cuda_rank *r)
{
    const rt_cuda *c = r->c;
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
                 kern_cuda_rmsnorm_f32(r->last + (size_t)n * dim, r->x + (size_t)(row - 1) * dim,
                                       r->output_norm, 1, dim, hp->norm_eps));
            want[n++] = &c->seqs[i];
        }
        if (n == 0)
            continue;
        keep(&rc, matmul(r->logits, V, r->last, dim, &r->output, n, V, dim));
        keep(&rc, kern_cuda_d2h(r->h_logits, r->logits, sizeof(float) * (size_t)n * V,
                                KERN_CUDA_COMPUTE));
        if (rc != 0)
            return step_fail(r, rc, "logits");
        if (device_sync(r, "forward (cuda)") != 0)
            return -1;
        for (int j = 0; j < n; j++)
            memcpy(want[j]->logits, r->h_logits + (size_t)j * V, sizeof(float) * (size_t)V);
    }
    return 0;
}

/* What the device cannot run; every rank finds the same. */
static int check_step(cuda_rank *r, int *T)
{
    rt_cuda *c = r->c;
    *T = 0;
    for (int i = 0; i < c->n_seqs; i++) {
        const rt_seq_batch *b = &c->seqs[i];
        *T += b->n_tokens;
        if (b->pool->cuda != c)
            return job_fail(r, "forward (cuda): sequence %d's KV cache is not on device %d", i,
                            r->device);
        for (int j = 0; j < b->n_blocks; j++)
            if (b->blocks[j] < 0)
                return job_fail(r, "forward (cuda): sequence %d: block %d is released", i, j);
        if (b->kvq) /* refused at admission (rt_kvq_check); never reaches here */
            return job_fail(r,
                            "forward (cuda): sequence %d: compressed KV caches run on the CPU "
                            "backend only",
                            i);
    }
    return 0;
}

static int job_step(cuda_rank *r, void *arg)
{
    rt_cuda *c = r->c;
    int T = 0, n_pad = 0, stride = 0, n_groups = -1;
    size_t n_meta = 0;
    memset(r->stats, 0, sizeof(rt_attn_stats) * (size_t)c->n_seqs);
    if (check_step(r, &T) == 0) {
        plan_graph(r, &n_pad, &stride);
        n_groups = build_meta(r, T, n_pad, stride, &n_meta);
        if (n_groups >= 0 && prepare_sparse(r, n_groups) != 0)
            n_groups = -1;
    }
    /* Past this point every rank enqueues every all-reduce of the step. */
    if (!ranks_agree(r, n_groups >= 0))
        return n_groups >= 0 ? follow(r) : -1;
    r->n_steps++;
    char what[32] = "";
    int rc;
    if (n_pad) {
        rc = run_decode(r, n_pad, stride, n_meta, what, sizeof(what));
    } else {
        r->in = r->meta;
        rc = kern_cuda_h2d(r->meta, r->h_meta, n_meta * sizeof(int32_t), KERN_CUDA_COMPUTE);
        if (rc) {
            snprintf(what, sizeof(what), "step inputs");
            collectives_only(r, T);
        } else {
            rc = enqueue_layers(r, T, n_groups, what, sizeof(what));
        }
    }
    if (rc != 0)
        return step_fail(r, rc, what);
    for (int i = 0; i < c->n_seqs; i++)
        if (c->seqs[i].policy && c->seqs[i].policy->prefill != RT_PREFILL_DENSE &&
            !is_sparse(&c->seqs[i]))
            count_dense_layers(r, &c->seqs[i], &r->stats[i]);
    if (r->rank != 0)
        return device_sync(r, "forward (cuda)");
    if (logits_out(r) != 0 || device_sync(r, "forward (cuda)") != 0)
        return -1;
    return 0;
}

int rt_cuda_forward(rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen)
{
    rt_cuda *c = m->cuda;
    if (c->broken[0]) {
        snprintf(err, errlen,
                 "forward (cuda): tensor parallelism stopped after a failed all-reduce or device "
                 "timeout (restart the server): %s",
                 c->broken);
        return -1;
    }
    c->seqs = seqs;
    c->n_seqs = n_seqs;
    if (run_job(c, job_step, NULL, err, errlen) != 0)
        return -1;
    /* Blocks summed over the ranks' heads; chunks once (every rank takes the
     * same paths), as forward.c's merge_stats. */
    for (int i = 0; i < n_seqs; i++) {
        if (seqs[i].kv)
            seqs[i].kv->len += seqs[i].n_tokens;
        rt_attn_stats *st = seqs[i].stats;
        if (!st)
            continue;
        for (int k = 0; k < c->n_ranks; k++) {
            st->computed += c->ranks[k].stats[i].computed;
            st->causal += c->ranks[k].stats[i].causal;
        }
        st->dense_chunks += c->ranks[0].stats[i].dense_chunks;
        st->sparse_chunks += c->ranks[0].stats[i].sparse_chunks;
    }
    return 0;
}

#endif
