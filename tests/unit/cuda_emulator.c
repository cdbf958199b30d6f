/*
 * cuda_emulator.c - kernels/cuda.h implemented on the host with the CPU twins,
 * for test_cuda_forward_emulated: the CUDA backend's host side
 * (runtime/forward_cuda.c: the rank threads, uploads and shards, pool layout,
 * the packed step inputs, per-pool attention groups, decode graphs, logits
 * chunks, errors) runs and is checked on machines without a GPU. "Device
 * memory" is host memory and each twin is the CPU op its CUDA kernel is
 * tested against (tests/unit/test_cuda_twins.c), so the emulated GPU forward
 * pass must equal the CPU one up to the weights' f16 rounding.
 *
 * Devices: EMU_DEVICES of them, one context per host thread as on CUDA. An op
 * runs at once on the calling thread, except during a graph capture: then it
 * is recorded with its arguments copied by value (what a CUDA graph keeps of
 * a kernel launch) and runs only when the graph is launched, reading device
 * memory as it is then. So a graph that bakes in a value the host changes
 * between steps replays wrong here, as it would on a GPU. A capture also
 * refuses what CUDA refuses inside one: syncs, allocations, workspace growth.
 *
 * Tensor parallelism: the communicator of kern_cuda_comm_create is the
 * shared-memory threads one (kernels/cpu/collective.c), and the all-reduce is
 * an op like the others (recorded in a capture), so ranks on emulated devices
 * run the sharding code with its collectives.
 *
 * What it cannot check: the kernels themselves, streams, timing, NCCL and
 * device faults; test_cuda_twins and tests/gpu/run.sh do that on a GPU. It
 * keeps the contract's thread rule: ops without kern_cuda_init on the calling
 * thread fail with KERN_CUDA_E_NOCTX, so a call made off a rank's thread
 * shows. kern_cuda_emulator_fail_after(n) makes the nth op run from then on
 * (on any thread, replayed or not; all-reduces not counted) fail, as a device
 * error would.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/collective.h"
#include "kernels/cuda.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"

#define EMU_DEVICES 4

typedef int (*emu_run)(const void *args);

typedef struct {
    emu_run run;
    const char *what;
    void *args; /* a copy, owned by the graph */
} emu_rec;

struct kern_cuda_graph {
    emu_rec *recs;
    int n, cap;
};

static _Thread_local int t_device = -1;
static _Thread_local int t_err;
static _Thread_local char t_msg[256];
static _Thread_local size_t t_ws_bytes;
static _Thread_local kern_cuda_graph *t_capture; /* the capture in progress, or NULL */

static pthread_mutex_t fail_mu = PTHREAD_MUTEX_INITIALIZER;
static int fail_countdown; /* > 0: ops until the injected failure; guarded by fail_mu */

void kern_cuda_emulator_fail_after(int n);
void kern_cuda_emulator_fail_after(int n)
{
    pthread_mutex_lock(&fail_mu);
    fail_countdown = n;
    pthread_mutex_unlock(&fail_mu);
}

static bool injected_failure_due(void)
{
    pthread_mutex_lock(&fail_mu);
    const bool due = fail_countdown > 0 && --fail_countdown == 0;
    pthread_mutex_unlock(&fail_mu);
    return due;
}

static int fail(int rc, const char *what)
{
    if (t_err == 0) {
        t_err = rc;
        snprintf(t_msg, sizeof(t_msg), "%s (emulated)", what);
    }
    return rc;
}

static int run_allreduce(const void *p);

/* Runs one op now (with the injected failure when due: never an all-reduce,
 * whose failure would leave the other ranks waiting out the communicator's
 * timeout; test_collective covers that). */
static int execute(emu_run run, const void *args, const char *what)
{
    if (run != run_allreduce && injected_failure_due())
        return fail(KERN_CUDA_E_RUNTIME, what);
    return run(args);
}

/* Every op: a context on this thread; then recorded (capture) or run. */
static int submit(const char *what, emu_run run, const void *args, size_t size)
{
    if (t_device < 0)
        return fail(KERN_CUDA_E_NOCTX, "kern_cuda_init was not called on this thread");
    if (!t_capture)
        return execute(run, args, what);
    kern_cuda_graph *g = t_capture;
    if (g->n == g->cap) {
        const int cap = g->cap ? 2 * g->cap : 64;
        emu_rec *r = realloc(g->recs, sizeof(*r) * (size_t)cap);
        if (!r)
            return fail(KERN_CUDA_E_NOMEM, "graph: out of host memory");
        g->recs = r;
        g->cap = cap;
    }
    void *copy = malloc(size);
    if (!copy)
        return fail(KERN_CUDA_E_NOMEM, "graph: out of host memory");
    memcpy(copy, args, size);
    g->recs[g->n++] = (emu_rec){run, what, copy};
    return 0;
}

const char *kern_cuda_strerror(int rc)
{
    return rc == 0 ? "ok" : "emulated CUDA error";
}

int kern_cuda_device_count(void)
{
    return EMU_DEVICES;
}

int kern_cuda_device_query(int device, kern_cuda_device_info *info, char *err, size_t errlen)
{
    if (device < 0 || device >= EMU_DEVICES) {
        snprintf(err, errlen, "device %d: %d CUDA device(s) present", device, EMU_DEVICES);
        return KERN_CUDA_E_NODEV;
    }
    memset(info, 0, sizeof(*info));
    snprintf(info->name, sizeof(info->name), "emulated GPU %d", device);
    info->cc_major = 9;
    info->n_sm = 1;
    info->total_mem = (size_t)2 << 30;
    info->free_mem = (size_t)1 << 30;
    return 0;
}

int kern_cuda_init(int device, char *err, size_t errlen)
{
    if (device < 0 || device >= EMU_DEVICES) {
        snprintf(err, errlen, "device %d: %d CUDA device(s) present", device, EMU_DEVICES);
        return KERN_CUDA_E_NODEV;
    }
    t_device = device;
    t_ws_bytes = 0;
    return 0;
}

void kern_cuda_close(void)
{
    t_device = -1;
}

int kern_cuda_current_device(void)
{
    return t_device;
}

void kern_cuda_set_timeout_ms(int ms) {}

int kern_cuda_sync(char *err, size_t errlen)
{
    if (t_capture) {
        snprintf(err, errlen, "sync: a graph capture is in progress (emulated)");
        return KERN_CUDA_E_STATE;
    }
    const int rc = t_device < 0 ? KERN_CUDA_E_NOCTX : t_err;
    if (rc && err && errlen)
        snprintf(err, errlen, "%s", t_err ? t_msg : "no context");
    t_err = 0;
    return rc;
}

int kern_cuda_last_error(char *err, size_t errlen)
{
    if (t_err && err && errlen)
        snprintf(err, errlen, "%s", t_msg);
    return t_err;
}

void *kern_cuda_malloc(size_t bytes, char *err, size_t errlen)
{
    if (t_device < 0) {
        snprintf(err, errlen, "malloc: kern_cuda_init was not called");
        return NULL;
    }
    if (t_capture) {
        snprintf(err, errlen, "malloc: not allowed during a graph capture (emulated)");
        return NULL;
    }
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        snprintf(err, errlen, "out of memory");
    else
        memset(p, 0xff, bytes); /* NaN: a value read before it is written shows */
    return p;
}

void kern_cuda_free(void *p)
{
    free(p);
}

void *kern_cuda_host_malloc(size_t bytes, char *err, size_t errlen)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        snprintf(err, errlen, "out of memory");
    return p;
}

void kern_cuda_host_free(void *p)
{
    free(p);
}

typedef struct {
    void *dst;
    const void *src;
    size_t bytes;
    int byte; /* memset */
} copy_args;

static int run_copy(const void *p)
{
    const copy_args *a = p;
    memmove(a->dst, a->src, a->bytes);
    return 0;
}

static int run_memset(const void *p)
{
    const copy_args *a = p;
    memset(a->dst, a->byte, a->bytes);
    return 0;
}

static int copy(void *dst, const void *src, size_t bytes)
{
    const copy_args a = {dst, src, bytes, 0};
    return submit("copy", run_copy, &a, sizeof(a));
}

int kern_cuda_h2d(void *dst, const void *src, size_t bytes, kern_cuda_queue q)
{
    return copy(dst, src, bytes);
}

int kern_cuda_d2h(void *dst, const void *src, size_t bytes, kern_cuda_queue q)
{
    return copy(dst, src, bytes);
}

int kern_cuda_d2d(void *dst, const void *src, size_t bytes, kern_cuda_queue q)
{
    return copy(dst, src, bytes);
}

int kern_cuda_memset(void *dst, int byte, size_t bytes, kern_cuda_queue q)
{
    const copy_args a = {dst, NULL, bytes, byte};
    return submit("memset", run_memset, &a, sizeof(a));
}

static int run_nothing(const void *p)
{
    return 0;
}

int kern_cuda_queue_wait(kern_cuda_queue waiter, kern_cuda_queue signaller)
{
    if (t_capture)
        return fail(KERN_CUDA_E_STATE, "queue wait: not allowed during a graph capture");
    const int none = 0;
    return submit("queue_wait", run_nothing, &none, sizeof(none));
}

int kern_cuda_reserve_workspace(size_t bytes, char *err, size_t errlen)
{
    if (t_device < 0) {
        snprintf(err, errlen, "no context");
        return KERN_CUDA_E_NOCTX;
    }
    if (t_capture) {
        snprintf(err, errlen, "workspace: a graph capture is in progress (emulated)");
        return KERN_CUDA_E_STATE;
    }
    if (bytes > t_ws_bytes)
        t_ws_bytes = bytes;
    return 0;
}

/* ---- graphs: capture records, launch replays ---- */

static void graph_free(kern_cuda_graph *g)
{
    for (int i = 0; g && i < g->n; i++)
        free(g->recs[i].args);
    if (g)
        free(g->recs);
    free(g);
}

int kern_cuda_graph_begin(char *err, size_t errlen)
{
    if (t_device < 0) {
        snprintf(err, errlen, "graph: kern_cuda_init was not called");
        return KERN_CUDA_E_NOCTX;
    }
    if (t_capture) {
        snprintf(err, errlen, "graph: a capture is already in progress");
        return KERN_CUDA_E_STATE;
    }
    t_capture = calloc(1, sizeof(kern_cuda_graph));
    if (!t_capture) {
        snprintf(err, errlen, "graph: out of host memory");
        return KERN_CUDA_E_NOMEM;
    }
    return 0;
}

kern_cuda_graph *kern_cuda_graph_end(char *err, size_t errlen)
{
    kern_cuda_graph *g = t_capture;
    if (!g) {
        snprintf(err, errlen, "graph: no capture in progress");
        return NULL;
    }
    t_capture = NULL;
    if (t_err) { /* an op failed inside the capture: CUDA invalidates it */
        snprintf(err, errlen, "capture invalidated: %s", t_msg);
        graph_free(g);
        return NULL;
    }
    return g;
}

int kern_cuda_graph_launch(kern_cuda_graph *g)
{
    if (t_device < 0)
        return fail(KERN_CUDA_E_NOCTX, "graph launch: kern_cuda_init was not called");
    if (!g)
        return fail(KERN_CUDA_E_ARG, "graph launch: graph is NULL");
    if (t_capture)
        return fail(KERN_CUDA_E_STATE, "graph launch inside a capture");
    /* Errors of the replayed ops surface at the next sync, as a kernel's do. */
    for (int i = 0; i < g->n; i++)
        (void)execute(g->recs[i].run, g->recs[i].args, g->recs[i].what);
    return 0;
}

void kern_cuda_graph_destroy(kern_cuda_graph *g)
{
    graph_free(g);
}

/* ---- tensor parallelism: the threads communicator ---- */

kern_comm *kern_cuda_comm_create(const int *devices, int n_ranks, char *err, size_t errlen)
{
    for (int i = 0; i < n_ranks; i++) {
        if (devices[i] < 0 || devices[i] >= EMU_DEVICES) {
            snprintf(err, errlen, "device %d is not present (emulated)", devices[i]);
            return NULL;
        }
        for (int j = 0; j < i; j++)
            if (devices[i] == devices[j]) {
                snprintf(err, errlen, "device %d is listed for ranks %d and %d (emulated)",
                         devices[i], j, i);
                return NULL;
            }
    }
    return kern_comm_create_threads(n_ranks, err, errlen);
}

typedef struct {
    kern_comm *c;
    int rank;
    float *buf;
    size_t n;
} allreduce_args;

static int run_allreduce(const void *p)
{
    const allreduce_args *a = p;
    char msg[200];
    const int rc = kern_comm_allreduce_sum_f32(a->c, a->rank, a->buf, a->n, msg, sizeof(msg));
    if (rc == 0)
        return 0;
    char what[240];
    snprintf(what, sizeof(what), "all-reduce: %s", msg);
    return fail(KERN_CUDA_E_COMM, what);
}

int kern_cuda_allreduce_sum_f32(kern_comm *c, int rank, float *buf, size_t n, char *err,
                                size_t errlen)
{
    if (!c)
        return fail(KERN_CUDA_E_ARG, "all-reduce: no communicator");
    const allreduce_args a = {c, rank, buf, n};
    const int rc = submit("all-reduce", run_allreduce, &a, sizeof(a));
    if (rc && err && errlen)
        snprintf(err, errlen, "%s", t_msg);
    return rc;
}

/* ---- the ops ---- */

typedef struct {
    float *out;
    const float *x, *w;
    int rows, dim;
    float eps;
} rmsnorm_args;

static int run_rmsnorm(const void *p)
{
    const rmsnorm_args *a = p;
    kern_rmsnorm_f32(a->out, a->x, a->w, a->rows, a->dim, a->eps);
    return 0;
}

int kern_cuda_rmsnorm_f32(float *out, const float *x, const float *w, int rows, int dim, float eps)
{
    const rmsnorm_args a = {out, x, w, rows, dim, eps};
    return submit("rmsnorm", run_rmsnorm, &a, sizeof(a));
}

typedef struct {
    float *y;
    const float *x, *b;
    size_t n;
    int rows;
} vec_args;

static int run_swiglu(const void *p)
{
    const vec_args *a = p;
    kern_swiglu_f32(a->y, a->x, a->b, a->n);
    return 0;
}

int kern_cuda_swiglu_f32(float *out, const float *gate, const float *up, size_t n)
{
    const vec_args a = {out, gate, up, n, 0};
    return submit("swiglu", run_swiglu, &a, sizeof(a));
}

static int run_add(const void *p)
{
    const vec_args *a = p;
    kern_add_f32(a->y, a->x, a->n);
    return 0;
}

int kern_cuda_add_f32(float *y, const float *x, size_t n)
{
    const vec_args a = {y, x, NULL, n, 0};
    return submit("add", run_add, &a, sizeof(a));
}

static int run_add_rows(const void *p)
{
    const vec_args *a = p;
    for (int r = 0; r < a->rows; r++)
        kern_add_f32(a->y + (size_t)r * a->n, a->b, a->n);
    return 0;
}

int kern_cuda_add_rows_f32(float *y, const float *b, int rows, int n)
{
    const vec_args a = {y, NULL, b, (size_t)n, rows};
    return submit("add_rows", run_add_rows, &a, sizeof(a));
}

typedef struct {
    float *kc, *vc;
    int kv_stride;
    const float *k, *v;
    int kvd;
    const int32_t *slots;
    int rows;
} kv_store_args;

static int run_kv_store(const void *p)
{
    const kv_store_args *a = p;
    for (int r = 0; r < a->rows; r++) {
        if (a->slots[r] < 0)
            continue;
        memcpy(a->kc + (size_t)a->slots[r] * a->kv_stride, a->k + (size_t)r * a->kvd,
               sizeof(float) * a->kvd);
        memcpy(a->vc + (size_t)a->slots[r] * a->kv_stride, a->v + (size_t)r * a->kvd,
               sizeof(float) * a->kvd);
    }
    return 0;
}

int kern_cuda_kv_store_f32(float *k_cache, float *v_cache, int kv_stride, const float *k,
                           const float *v, int kvd, const int32_t *slots, int rows)
{
    const kv_store_args a = {k_cache, v_cache, kv_stride, k, v, kvd, slots, rows};
    return submit("kv_store", run_kv_store, &a, sizeof(a));
}

typedef struct {
    float *x;
    const int32_t *pos;
    int rows, n_heads, head_dim, rope_dim;
    float base;
    const float *inv_freq;
    int neox; /* 0, 1; 2: plain rope */
} rope_args;

static int run_rope(const void *p)
{
    const rope_args *a = p;
    if (a->inv_freq)
        kern_rope_table_f32(a->x, a->pos, a->rows, a->n_heads, a->head_dim, a->rope_dim,
                            a->inv_freq, a->neox);
    else if (a->neox)
        kern_rope_neox_f32(a->x, a->pos, a->rows, a->n_heads, a->head_dim, a->rope_dim, a->base);
    else
        kern_rope_f32(a->x, a->pos, a->rows, a->n_heads, a->head_dim, a->rope_dim, a->base);
    return 0;
}

int kern_cuda_rope_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                       int rope_dim, float base)
{
    const rope_args a = {x, pos, rows, n_heads, head_dim, rope_dim, base, NULL, 0};
    return submit("rope", run_rope, &a, sizeof(a));
}

int kern_cuda_rope_neox_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                            int rope_dim, float base)
{
    const rope_args a = {x, pos, rows, n_heads, head_dim, rope_dim, base, NULL, 1};
    return submit("rope_neox", run_rope, &a, sizeof(a));
}

int kern_cuda_rope_table_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                             int rope_dim, const float *inv_freq, int neox)
{
    const rope_args a = {x, pos, rows, n_heads, head_dim, rope_dim, 0.0f, inv_freq, neox};
    return submit("rope_table", run_rope, &a, sizeof(a));
}

typedef struct {
    void *dst;
    const void *src;
    size_t n;
    int kind; /* 0 f16->f32, 1 bf16->f32, 2 f32->f16, 3 f32->bf16 */
} convert_args;

static int run_convert(const void *p)
{
    const convert_args *a = p;
    for (size_t i = 0; i < a->n; i++) {
        if (a->kind == 0)
            ((float *)a->dst)[i] = kern_f16_to_f32(((const uint16_t *)a->src)[i]);
        else if (a->kind == 1)
            ((float *)a->dst)[i] = kern_bf16_to_f32(((const uint16_t *)a->src)[i]);
        else if (a->kind == 2)
            ((uint16_t *)a->dst)[i] = kern_f32_to_f16(((const float *)a->src)[i]);
        else
            ((uint16_t *)a->dst)[i] = kern_f32_to_bf16(((const float *)a->src)[i]);
    }
    return 0;
}

int kern_cuda_f16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    const convert_args a = {dst, src, n, 0};
    return submit("f16_to_f32", run_convert, &a, sizeof(a));
}

int kern_cuda_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    const convert_args a = {dst, src, n, 1};
    return submit("bf16_to_f32", run_convert, &a, sizeof(a));
}

int kern_cuda_f32_to_f16_row(uint16_t *dst, const float *src, size_t n)
{
    const convert_args a = {dst, src, n, 2};
    return submit("f32_to_f16", run_convert, &a, sizeof(a));
}

int kern_cuda_f32_to_bf16_row(uint16_t *dst, const float *src, size_t n)
{
    const convert_args a = {dst, src, n, 3};
    return submit("f32_to_bf16", run_convert, &a, sizeof(a));
}

typedef struct {
    int type;
    float *out;
    const void *table;
    int n_vocab;
    const int32_t *tokens;
    int n_tokens, dim;
} embed_args;

static int run_embed(const void *p)
{
    const embed_args *a = p;
    const size_t rb = kern_row_bytes(a->type, a->dim);
    for (int t = 0; t < a->n_tokens; t++) {
        float *o = a->out + (size_t)t * a->dim;
        if (a->tokens[t] < 0 || a->tokens[t] >= a->n_vocab)
            memset(o, 0, sizeof(float) * a->dim);
        else if (kern_dequant_row(a->type, (const char *)a->table + (size_t)a->tokens[t] * rb, o,
                                  (size_t)a->dim) != 0)
            return fail(KERN_CUDA_E_TYPE, "embed: type");
    }
    return 0;
}

int kern_cuda_embed(int type, float *out, const void *table, int n_vocab, const int32_t *tokens,
                    int n_tokens, int dim)
{
    const embed_args a = {type, out, table, n_vocab, tokens, n_tokens, dim};
    return submit("embed", run_embed, &a, sizeof(a));
}

typedef struct {
    int32_t *out;
    const float *x;
    int rows, n;
} argmax_args;

static int run_argmax(const void *p)
{
    const argmax_args *a = p;
    for (int r = 0; r < a->rows; r++) {
        int best = 0;
        for (int i = 1; i < a->n; i++)
            if (a->x[(size_t)r * a->n + i] > a->x[(size_t)r * a->n + best])
                best = i;
        a->out[r] = best;
    }
    return 0;
}

int kern_cuda_argmax_f32(int32_t *out, const float *x, int rows, int n)
{
    const argmax_args a = {out, x, rows, n};
    return submit("argmax", run_argmax, &a, sizeof(a));
}

typedef struct {
    int type;
    float *y;
    int ldy;
    const float *x;
    int ldx;
    const void *w;
    int M, N, K;
} matmul_args;

static int run_matmul(const void *p)
{
    const matmul_args *a = p;
    if (kern_matmul_q(NULL, a->type, a->y, a->ldy, a->x, a->ldx, a->w, a->M, a->N, a->K) != 0)
        return fail(KERN_CUDA_E_ARG, "matmul_q");
    return 0;
}

int kern_cuda_matmul_f32(float *y, int ldy, const float *x, int ldx, const float *w, int M, int N,
                         int K)
{
    const matmul_args a = {KERN_TYPE_F32, y, ldy, x, ldx, w, M, N, K};
    return submit("matmul_f32", run_matmul, &a, sizeof(a));
}

int kern_cuda_matmul_q(int type, float *y, int ldy, const float *x, int ldx, const void *w, int M,
                       int N, int K)
{
    if (type != KERN_TYPE_F32 && type != KERN_TYPE_F16 && type != KERN_TYPE_BF16)
        return fail(KERN_CUDA_E_TYPE, "matmul_q: weight type");
    if (M > 8 && type != KERN_TYPE_F32 && 2 * (size_t)M * K > t_ws_bytes)
        return fail(KERN_CUDA_E_NOMEM, "matmul_q: workspace");
    const matmul_args a = {type, y, ldy, x, ldx, w, M, N, K};
    return submit("matmul_q", run_matmul, &a, sizeof(a));
}

static int run_attention(const void *p)
{
    kern_attention_f32(NULL, p);
    return 0;
}

int kern_cuda_attention_f32(const kern_attn_args *a)
{
    return submit("attention", run_attention, a, sizeof(*a));
}

static int run_attention_varlen(const void *p)
{
    const kern_cuda_attn_varlen *a = p;
    for (int s = 0; s < a->n_seqs; s++) {
        const int q0 = a->q_start[s], n_q = a->q_start[s + 1] - q0;
        if (n_q > a->max_q || a->ctx_len[s] < n_q || (a->max_ctx && a->ctx_len[s] > a->max_ctx))
            return fail(KERN_CUDA_E_ARG, "attention_varlen: shape");
        const size_t qd = (size_t)a->n_heads * a->head_dim;
        const kern_attn_args x = {
            .q = a->q + (size_t)q0 * qd,
            .k = a->k,
            .v = a->v,
            .out = a->out + (size_t)q0 * qd,
            .n_q = n_q,
            .ctx_len = a->ctx_len[s],
            .n_heads = a->n_heads,
            .n_kv_heads = a->n_kv_heads,
            .head_dim = a->head_dim,
            .kv_stride = a->kv_stride,
            .blocks = a->blocks + (size_t)s * a->blocks_stride,
            .block_size = a->block_size,
        };
        kern_attention_f32(NULL, &x);
    }
    return 0;
}

int kern_cuda_attention_varlen_f32(const kern_cuda_attn_varlen *a)
{
    return submit("attention_varlen", run_attention_varlen, a, sizeof(*a));
}

typedef struct {
    kern_attn_args a;
    kern_block_mask m; /* bits: "device" memory, read when the op runs */
} sparse_args;

static int run_block_sparse(const void *p)
{
    const sparse_args *x = p;
    if (kern_attention_block_sparse_f32(NULL, &x->a, &x->m) != KERN_SPARSE_OK)
        return fail(KERN_CUDA_E_ARG, "attention_block_sparse: the CPU twin refused the mask");
    return 0;
}

int kern_cuda_attention_block_sparse_f32(const kern_attn_args *a, const kern_block_mask *m)
{
    const int B = m->block_size;
    const int nb = B > 0 ? (a->ctx_len + B - 1) / B : 0;
    if (B < 1 || m->n_lists < 1 || a->n_heads % m->n_lists != 0 || m->ctx_len != a->ctx_len ||
        m->n_q != a->n_q || m->q_block0 != (a->ctx_len - a->n_q) / B ||
        m->n_qblocks != nb - m->q_block0 || m->words != (nb + 63) / 64)
        return fail(KERN_CUDA_E_ARG, "attention_block_sparse: mask shape");
    const sparse_args x = {*a, *m};
    return submit("attention_block_sparse", run_block_sparse, &x, sizeof(x));
}

/* The estimate's workspace as kernels/cuda/flexprefill.cu sizes it (tiles of
 * 128 keys), so a caller that reserves too little fails here too. */
size_t kern_cuda_flex_estimate_workspace(const kern_attn_args *a, int block_size)
{
    if (!a || a->ctx_len < 1 || a->n_heads < 1 || block_size < 1)
        return 0;
    const size_t nt = (size_t)(a->ctx_len + 127) / 128, nh = (size_t)a->n_heads;
    const size_t np = (size_t)block_size;
    const size_t part = nh * nt * np * 2 * sizeof(float), sl = nh * nt * (128 + np - 1) * 4;
    return ((nh * np * sizeof(float) + 255) & ~(size_t)255) + (part > sl ? part : sl);
}

typedef struct {
    kern_attn_args a;
    int block_size;
    kern_flex_estimate est;
} estimate_args;

static int run_flex_estimate(const void *p)
{
    const estimate_args *x = p;
    float *scratch = malloc(sizeof(float) *
                            kern_probe_scratch_floats(x->a.n_heads, x->a.head_dim, x->block_size));
    if (!scratch)
        return fail(KERN_CUDA_E_NOMEM, "flex_estimate: out of host memory");
    const int rc = kern_flex_estimate_f32(NULL, &x->a, x->block_size, &x->est, scratch);
    free(scratch);
    return rc == KERN_SPARSE_OK ? 0 : fail(KERN_CUDA_E_ARG, "flex_estimate: shape");
}

int kern_cuda_flex_estimate_f32(const kern_attn_args *a, int block_size,
                                const kern_flex_estimate *est)
{
    if (a->n_q < block_size || block_size < KERN_FLEX_MIN_BLOCK || block_size > KERN_FLEX_MAX_BLOCK)
        return fail(KERN_CUDA_E_ARG, "flex_estimate: shape");
    if (kern_cuda_flex_estimate_workspace(a, block_size) > t_ws_bytes)
        return fail(KERN_CUDA_E_NOMEM, "flex_estimate: workspace");
    const estimate_args x = {*a, block_size, *est};
    return submit("flex_estimate", run_flex_estimate, &x, sizeof(x));
}
