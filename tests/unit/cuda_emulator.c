/*
 * cuda_emulator.c - kernels/cuda.h implemented on the host with the CPU twins,
 * for test_cuda_forward_emulated: the CUDA backend's host side
 * (runtime/forward_cuda.c: the device thread, uploads, pool layout, the
 * packed step inputs, per-pool attention groups, logits chunks, errors) runs
 * and is checked on machines without a GPU. "Device memory" is host memory,
 * every op runs at once on the calling thread, and each twin is the CPU op
 * its CUDA kernel is tested against (tests/unit/test_cuda_twins.c), so the
 * emulated GPU forward pass must equal the CPU one up to the weights' f16
 * rounding.
 *
 * What it cannot check: the kernels themselves, streams, timing, and device
 * faults; test_cuda_twins and tests/gpu/run.sh do that on a GPU. It keeps the
 * contract's thread rule: ops without kern_cuda_init on the calling thread
 * fail with KERN_CUDA_E_NOCTX, so a call made off the device thread shows.
 * kern_cuda_emulator_fail_after(n) makes the nth op from then on fail, as a
 * device error would, to test the error paths.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"

static _Thread_local int t_device = -1;
static _Thread_local int t_err;
static _Thread_local char t_msg[256];
static size_t ws_bytes;
static int fail_countdown; /* > 0: ops until the injected failure */

void kern_cuda_emulator_fail_after(int n);
void kern_cuda_emulator_fail_after(int n)
{
    fail_countdown = n;
}

static int fail(int rc, const char *what)
{
    if (t_err == 0) {
        t_err = rc;
        snprintf(t_msg, sizeof(t_msg), "%s (emulated)", what);
    }
    return rc;
}

/* Every op: a context on this thread, and the injected failure when due. */
static int op(const char *what)
{
    if (t_device < 0)
        return fail(KERN_CUDA_E_NOCTX, "kern_cuda_init was not called on this thread");
    if (fail_countdown > 0 && --fail_countdown == 0)
        return fail(KERN_CUDA_E_RUNTIME, what);
    return 0;
}

const char *kern_cuda_strerror(int rc)
{
    return rc == 0 ? "ok" : "emulated CUDA error";
}

int kern_cuda_device_count(void)
{
    return 1;
}

int kern_cuda_device_query(int device, kern_cuda_device_info *info, char *err, size_t errlen)
{
    if (device != 0) {
        snprintf(err, errlen, "device %d: 1 CUDA device(s) present", device);
        return KERN_CUDA_E_NODEV;
    }
    memset(info, 0, sizeof(*info));
    snprintf(info->name, sizeof(info->name), "emulated GPU");
    info->cc_major = 9;
    info->n_sm = 1;
    info->total_mem = (size_t)2 << 30;
    info->free_mem = (size_t)1 << 30;
    return 0;
}

int kern_cuda_init(int device, char *err, size_t errlen)
{
    if (device != 0) {
        snprintf(err, errlen, "device %d: 1 CUDA device(s) present", device);
        return KERN_CUDA_E_NODEV;
    }
    t_device = device;
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

static int copy(void *dst, const void *src, size_t bytes)
{
    int rc = op("copy");
    if (rc == 0)
        memmove(dst, src, bytes);
    return rc;
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
    int rc = op("memset");
    if (rc == 0)
        memset(dst, byte, bytes);
    return rc;
}

int kern_cuda_queue_wait(kern_cuda_queue waiter, kern_cuda_queue signaller)
{
    return op("queue_wait");
}

int kern_cuda_reserve_workspace(size_t bytes, char *err, size_t errlen)
{
    if (t_device < 0) {
        snprintf(err, errlen, "no context");
        return KERN_CUDA_E_NOCTX;
    }
    if (bytes > ws_bytes)
        ws_bytes = bytes;
    return 0;
}

int kern_cuda_graph_begin(char *err, size_t errlen)
{
    snprintf(err, errlen, "graphs are not emulated");
    return KERN_CUDA_E_STATE;
}

kern_cuda_graph *kern_cuda_graph_end(char *err, size_t errlen)
{
    snprintf(err, errlen, "graphs are not emulated");
    return NULL;
}

int kern_cuda_graph_launch(kern_cuda_graph *g)
{
    return KERN_CUDA_E_STATE;
}

void kern_cuda_graph_destroy(kern_cuda_graph *g) {}

int kern_cuda_rmsnorm_f32(float *out, const float *x, const float *w, int rows, int dim, float eps)
{
    int rc = op("rmsnorm");
    if (rc == 0)
        kern_rmsnorm_f32(out, x, w, rows, dim, eps);
    return rc;
}

int kern_cuda_swiglu_f32(float *out, const float *gate, const float *up, size_t n)
{
    int rc = op("swiglu");
    if (rc == 0)
        kern_swiglu_f32(out, gate, up, n);
    return rc;
}

int kern_cuda_add_f32(float *y, const float *x, size_t n)
{
    int rc = op("add");
    if (rc == 0)
        kern_add_f32(y, x, n);
    return rc;
}

int kern_cuda_add_rows_f32(float *y, const float *b, int rows, int n)
{
    int rc = op("add_rows");
    for (int r = 0; rc == 0 && r < rows; r++)
        kern_add_f32(y + (size_t)r * n, b, (size_t)n);
    return rc;
}

int kern_cuda_kv_store_f32(float *k_cache, float *v_cache, int kv_stride, const float *k,
                           const float *v, int kvd, const int32_t *slots, int rows)
{
    int rc = op("kv_store");
    for (int r = 0; rc == 0 && r < rows; r++) {
        if (slots[r] < 0)
            continue;
        memcpy(k_cache + (size_t)slots[r] * kv_stride, k + (size_t)r * kvd, sizeof(float) * kvd);
        memcpy(v_cache + (size_t)slots[r] * kv_stride, v + (size_t)r * kvd, sizeof(float) * kvd);
    }
    return rc;
}

int kern_cuda_rope_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                       int rope_dim, float base)
{
    int rc = op("rope");
    if (rc == 0)
        kern_rope_f32(x, pos, rows, n_heads, head_dim, rope_dim, base);
    return rc;
}

int kern_cuda_rope_neox_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                            int rope_dim, float base)
{
    int rc = op("rope_neox");
    if (rc == 0)
        kern_rope_neox_f32(x, pos, rows, n_heads, head_dim, rope_dim, base);
    return rc;
}

int kern_cuda_rope_table_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                             int rope_dim, const float *inv_freq, int neox)
{
    int rc = op("rope_table");
    if (rc == 0)
        kern_rope_table_f32(x, pos, rows, n_heads, head_dim, rope_dim, inv_freq, neox);
    return rc;
}

int kern_cuda_f16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    int rc = op("f16_to_f32");
    if (rc == 0)
        kern_f16_to_f32_row(dst, src, n);
    return rc;
}

int kern_cuda_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    int rc = op("bf16_to_f32");
    if (rc == 0)
        kern_bf16_to_f32_row(dst, src, n);
    return rc;
}

int kern_cuda_f32_to_f16_row(uint16_t *dst, const float *src, size_t n)
{
    int rc = op("f32_to_f16");
    for (size_t i = 0; rc == 0 && i < n; i++)
        dst[i] = kern_f32_to_f16(src[i]);
    return rc;
}

int kern_cuda_f32_to_bf16_row(uint16_t *dst, const float *src, size_t n)
{
    int rc = op("f32_to_bf16");
    for (size_t i = 0; rc == 0 && i < n; i++)
        dst[i] = kern_f32_to_bf16(src[i]);
    return rc;
}

int kern_cuda_embed(int type, float *out, const void *table, int n_vocab, const int32_t *tokens,
                    int n_tokens, int dim)
{
    int rc = op("embed");
    const size_t rb = kern_row_bytes(type, dim);
    for (int t = 0; rc == 0 && t < n_tokens; t++) {
        float *o = out + (size_t)t * dim;
        if (tokens[t] < 0 || tokens[t] >= n_vocab)
            memset(o, 0, sizeof(float) * dim);
        else if (kern_dequant_row(type, (const char *)table + (size_t)tokens[t] * rb, o,
                                  (size_t)dim) != 0)
            rc = fail(KERN_CUDA_E_TYPE, "embed: type");
    }
    return rc;
}

int kern_cuda_argmax_f32(int32_t *out, const float *x, int rows, int n)
{
    int rc = op("argmax");
    for (int r = 0; rc == 0 && r < rows; r++) {
        int best = 0;
        for (int i = 1; i < n; i++)
            if (x[(size_t)r * n + i] > x[(size_t)r * n + best])
                best = i;
        out[r] = best;
    }
    return rc;
}

int kern_cuda_matmul_f32(float *y, int ldy, const float *x, int ldx, const float *w, int M, int N,
                         int K)
{
    int rc = op("matmul_f32");
    if (rc == 0)
        kern_matmul_f32(NULL, y, ldy, x, ldx, w, M, N, K);
    return rc;
}

int kern_cuda_matmul_q(int type, float *y, int ldy, const float *x, int ldx, const void *w, int M,
                       int N, int K)
{
    if (type != KERN_TYPE_F32 && type != KERN_TYPE_F16 && type != KERN_TYPE_BF16)
        return fail(KERN_CUDA_E_TYPE, "matmul_q: weight type");
    if (M > 8 && type != KERN_TYPE_F32 && 2 * (size_t)M * K > ws_bytes)
        return fail(KERN_CUDA_E_NOMEM, "matmul_q: workspace");
    int rc = op("matmul_q");
    if (rc == 0 && kern_matmul_q(NULL, type, y, ldy, x, ldx, w, M, N, K) != 0)
        rc = fail(KERN_CUDA_E_ARG, "matmul_q");
    return rc;
}

int kern_cuda_attention_f32(const kern_attn_args *a)
{
    int rc = op("attention");
    if (rc == 0)
        kern_attention_f32(NULL, a);
    return rc;
}

int kern_cuda_attention_varlen_f32(const kern_cuda_attn_varlen *a)
{
    int rc = op("attention_varlen");
    for (int s = 0; rc == 0 && s < a->n_seqs; s++) {
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
    return rc;
}
