/*
 * matmul.c - y = x W^T on the CPU.
 *
 * One row of x (decode): a matrix-vector product, rows of W split across the
 * pool when the product is big enough to pay for the hand-off, each dot
 * product vectorized with several accumulators. Several rows (prefill, batched
 * decode): OpenBLAS sgemm, which blocks for cache far better than we would.
 */
#include "kernels/kernels.h"

#include <cblas.h>

/* Below this many multiply-adds a matrix-vector product runs on the caller:
 * waking the workers costs more than the arithmetic. */
#define PARALLEL_MIN_MACS (1 << 17)
#define ROWS_PER_TASK_MIN 16

static inline float dot_f32(const float *a, const float *b, int n)
{
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

typedef struct {
    float *y;
    const float *x;
    const float *w;
    int M, N, K, ldx, ldy, rows_per_task;
} matvec_job;

/* Rows [r0, r1) of W against every row of x: each weight row is read once
 * for all M inputs, which is what a decode batch needs (memory-bound). */
static void matvec_task(void *ctx, int t, int n_tasks)
{
    const matvec_job *j = ctx;
    const int r0 = t * j->rows_per_task;
    int r1 = r0 + j->rows_per_task;
    if (r1 > j->N)
        r1 = j->N;
    for (int r = r0; r < r1; r++) {
        const float *wr = j->w + (size_t)r * j->K;
        for (int m = 0; m < j->M; m++)
            j->y[(size_t)m * j->ldy + r] = dot_f32(j->x + (size_t)m * j->ldx, wr, j->K);
    }
}

/* Up to this many rows of x, the row-streaming kernel beats a GEMM call:
 * OpenBLAS's packing and threading cost more than they save on a handful of
 * rows, and tiny matrices gain nothing from blocking. */
#define SMALL_M 8
#define SMALL_GEMM_MACS (1L << 20)

void kern_matmul_f32(kern_pool *pool, float *y, int ldy, const float *x, int ldx, const float *w,
                     int M, int N, int K)
{
    if (M <= 0 || N <= 0 || K <= 0)
        return;
    if (M <= SMALL_M || (long)M * N * K <= SMALL_GEMM_MACS) {
        matvec_job j = {y, x, w, M, N, K, ldx, ldy, N};
        int n_tasks = 1;
        const int threads = kern_pool_size(pool);
        if ((long)M * N * K >= PARALLEL_MIN_MACS && threads > 1) {
            /* A few tasks per thread balances uneven progress. */
            n_tasks = threads * 4;
            j.rows_per_task = (N + n_tasks - 1) / n_tasks;
            if (j.rows_per_task < ROWS_PER_TASK_MIN)
                j.rows_per_task = ROWS_PER_TASK_MIN;
            n_tasks = (N + j.rows_per_task - 1) / j.rows_per_task;
        }
        kern_pool_run(pool, matvec_task, &j, n_tasks);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, x, ldx, w, K, 0.0f, y,
                ldy);
}

void kern_set_blas_threads(int n) { openblas_set_num_threads(n > 0 ? n : 1); }

void kern_matmul_ref(float *y, int ldy, const float *x, int ldx, const float *w, int M, int N,
                     int K)
{
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++)
                s += (double)x[(size_t)m * ldx + k] * (double)w[(size_t)n * K + k];
            y[(size_t)m * ldy + n] = (float)s;
        }
}
