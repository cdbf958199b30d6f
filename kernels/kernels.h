/*
 * kernels.h - the compute ops of the transformer, one signature per op.
 *
 * kernels/cpu/ implements every op (a scalar reference where the fast version
 * is not obviously correct, and the version the runtime calls); kernels/cuda/
 * will implement the same signatures. Shapes and strides are explicit; no op
 * allocates. Row-major everywhere: a weight matrix W of shape [n_out, n_in]
 * is n_out rows of n_in floats, as GGUF stores llama weights.
 */
#ifndef SIEVE_KERNELS_H
#define SIEVE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---- thread pool ------------------------------------------------------ */

/* A fixed pool of compute workers used inside one forward step. The calling
 * thread takes part in the work, so a pool of n threads starts n-1 workers. */
typedef struct kern_pool kern_pool;

/* Work item: fn(ctx, i, n) is called once for every i in [0, n). */
typedef void (*kern_task_fn)(void *ctx, int i, int n);

kern_pool *kern_pool_create(int n_threads);
void kern_pool_destroy(kern_pool *p);
int kern_pool_size(const kern_pool *p);
/* Runs fn for i = 0..n_tasks-1 spread over the pool; returns when all are done.
 * p may be NULL (runs inline). Not re-entrant: one caller at a time. */
void kern_pool_run(kern_pool *p, kern_task_fn fn, void *ctx, int n_tasks);

/* ---- elementwise and normalization -------------------------------------- */

/* out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for r < rows. */
void kern_rmsnorm_f32(float *out, const float *x, const float *w, int rows, int dim, float eps);

/* out[i] = silu(gate[i]) * up[i] (SwiGLU), n elements; out may alias gate. */
void kern_swiglu_f32(float *out, const float *gate, const float *up, size_t n);

/* y[i] += x[i]. */
void kern_add_f32(float *y, const float *x, size_t n);

/* Rotary embedding in place on rows of n_heads x head_dim values, rotating
 * adjacent pairs (x[2i], x[2i+1]) of the first rope_dim dims of every head by
 * pos[r] * base^(-2i/rope_dim). */
void kern_rope_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                   int rope_dim, float base);

/* ---- matrix products ---------------------------------------------------- */

/* y[m, n] = sum_k x[m, k] * w[n, k] for m < M, n < N (y = x W^T).
 * ldx, ldy: row strides of x and y. Uses the pool for matrix-vector products
 * and OpenBLAS GEMM for M > 1. */
void kern_matmul_f32(kern_pool *pool, float *y, int ldy, const float *x, int ldx, const float *w,
                     int M, int N, int K);

/* Threads OpenBLAS may use inside kern_matmul_f32 (process-wide setting). */
void kern_set_blas_threads(int n);

/* The scalar reference of kern_matmul_f32, accumulating in double. */
void kern_matmul_ref(float *y, int ldy, const float *x, int ldx, const float *w, int M, int N,
                     int K);

/* ---- attention ---------------------------------------------------------- */

/* Causal attention of one sequence over its cached keys and values.
 * q:   n_q rows of n_heads * head_dim (query row r is at position ctx_len - n_q + r)
 * k,v: ctx_len rows of n_kv_heads * head_dim (row stride kv_stride floats),
 *      positions 0..ctx_len-1; head h reads kv head h / (n_heads / n_kv_heads).
 * out: n_q rows of n_heads * head_dim.
 * Scores are scaled by 1/sqrt(head_dim); the softmax is computed online over
 * chunks of keys (FlashAttention style), so no score matrix is materialized. */
#define KERN_ATTN_MAX_HEAD_DIM 256
#define KERN_ATTN_MAX_GROUP 16 /* n_heads / n_kv_heads */

typedef struct {
    const float *q;
    const float *k;
    const float *v;
    float *out;
    int n_q, ctx_len;
    int n_heads, n_kv_heads, head_dim;
    int kv_stride;
    /* Paged KV: when blocks is non-NULL, key/value position j lives in row
     * blocks[j / block_size] * block_size + j % block_size of k and v. */
    const int32_t *blocks;
    int block_size;
} kern_attn_args;

/* Row of k (or v) holding position j. */
static inline size_t kern_attn_row(const kern_attn_args *a, int j)
{
    if (!a->blocks)
        return (size_t)j;
    return (size_t)a->blocks[j / a->block_size] * (size_t)a->block_size +
           (size_t)(j % a->block_size);
}

void kern_attention_f32(kern_pool *pool, const kern_attn_args *a);
/* Reference: explicit scores and a two-pass softmax in double, one thread. */
void kern_attention_ref(const kern_attn_args *a);

/* ---- conversions -------------------------------------------------------- */

float kern_f16_to_f32(uint16_t h);
float kern_bf16_to_f32(uint16_t h);
void kern_f16_to_f32_row(float *dst, const uint16_t *src, size_t n);
void kern_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n);

#endif
