/*
 * matmul.c - y = x W^T on the CPU.
 *
 * One row of x (decode): a matrix-vector product, rows of W split across the
 * pool when the product is big enough to pay for the hand-off, each dot
 * product vectorized with several accumulators. Several rows (prefill, batched
 * decode): OpenBLAS sgemm, which blocks for cache far better than we would,
 * single-threaded on each of the pool's threads over a slice of W's rows.
 * Rows of W may lie further apart than K (ldw): a column slice of a larger
 * matrix, which is how a tensor-parallel rank reads its part of wo and w_down
 * without a copy.
 */
#include "kernels/kernels.h"

#include <cblas.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#include "kernels/cpu/simd.h"

/* Below this many multiply-adds a product runs on the caller: waking the
 * workers (and keeping them spinning) costs more than the arithmetic, and on
 * a small machine the spare core is better left to the HTTP loop. A decode
 * matvec is memory-bound: from 1 MiB of f32 weights (a 512x512 matrix) one
 * core's bandwidth is the limit, so it is split. */
#define PARALLEL_MIN_MACS (1 << 18)
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
    int M, N, K, ldx, ldy, ldw, rows_per_task;
    bool acc; /* y += x W^T instead of y = */
} matvec_job;

/* Rows [r0, r1) of W against every row of x: each weight row is read once
 * for all M inputs, which is what a decode batch needs (memory-bound). */
#ifdef KERN_HAVE_AVX2
/* Eight rows of W (ldw floats apart) against one x: x is loaded once for the
 * eight dot products, and the eight sums leave in one store. K is a multiple
 * of 8. */
static inline void dot8_rows(float *y, const float *x, const float *w, int K, int ldw, bool acc)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const size_t k8 = (size_t)ldw;
    for (int k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + k), a0);
        a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + k8 + k), a1);
        a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 2 * k8 + k), a2);
        a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 3 * k8 + k), a3);
        a4 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 4 * k8 + k), a4);
        a5 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 5 * k8 + k), a5);
        a6 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 6 * k8 + k), a6);
        a7 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + 7 * k8 + k), a7);
    }
    const __m256 s = kern_hsum8(a0, a1, a2, a3, a4, a5, a6, a7);
    _mm256_storeu_ps(y, acc ? _mm256_add_ps(_mm256_loadu_ps(y), s) : s);
}

/* Four rows of W against two rows of x (batched decode): six loads feed eight
 * FMAs instead of nine loads for eight, and the eight sums leave in one
 * reduction. y0, y1: the four outputs of each x row. */
static inline void dot4x2(float *y0, float *y1, const float *x0, const float *x1, const float *w,
                          int K, int ldw, const float *pf, bool acc)
{
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    const size_t k8 = (size_t)ldw;
    for (int k = 0; k < K; k += 8) {
        if (pf && (k & 15) == 0)
            _mm_prefetch((const char *)(pf + k), _MM_HINT_T0);
        __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);
        __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k8 + k);
        __m256 w2 = _mm256_loadu_ps(w + 2 * k8 + k), w3 = _mm256_loadu_ps(w + 3 * k8 + k);
        /* Each loaded vector feeds two FMAs from a register: without this the
         * compiler folds every use into a memory operand (ten loads for eight
         * FMAs instead of six). */
        __asm__("" : "+x"(u), "+x"(v), "+x"(w0), "+x"(w1), "+x"(w2), "+x"(w3));
        a00 = _mm256_fmadd_ps(u, w0, a00);
        a01 = _mm256_fmadd_ps(u, w1, a01);
        a02 = _mm256_fmadd_ps(u, w2, a02);
        a03 = _mm256_fmadd_ps(u, w3, a03);
        a10 = _mm256_fmadd_ps(v, w0, a10);
        a11 = _mm256_fmadd_ps(v, w1, a11);
        a12 = _mm256_fmadd_ps(v, w2, a12);
        a13 = _mm256_fmadd_ps(v, w3, a13);
    }
    const __m256 s = kern_hsum8(a00, a01, a02, a03, a10, a11, a12, a13);
    __m128 s0 = _mm256_castps256_ps128(s), s1 = _mm256_extractf128_ps(s, 1);
    if (acc) {
        s0 = _mm_add_ps(_mm_loadu_ps(y0), s0);
        s1 = _mm_add_ps(_mm_loadu_ps(y1), s1);
    }
    _mm_storeu_ps(y0, s0);
    _mm_storeu_ps(y1, s1);
}
#endif

static void matvec_rows(const matvec_job *j, int r0, int r1)
{
#ifdef KERN_HAVE_AVX2
    if (j->K % 8 == 0) {
        int r = r0;
        for (; r + 8 <= r1; r += 8) {
            const float *wr = j->w + (size_t)r * j->ldw;
            int m = 0;
            /* While this block of eight rows is computed from cache, the next
             * one is prefetched, a row per call: the first eight calls cover it. */
            int call = 0;
            for (; m + 2 <= j->M; m += 2)
                for (int h = 0; h < 8; h += 4, call++) {
                    const float *pf = r + 8 + call < r1 && call < 8
                                          ? j->w + (size_t)(r + 8 + call) * j->ldw
                                          : NULL;
                    dot4x2(j->y + (size_t)m * j->ldy + r + h,
                           j->y + (size_t)(m + 1) * j->ldy + r + h, j->x + (size_t)m * j->ldx,
                           j->x + (size_t)(m + 1) * j->ldx, wr + (size_t)h * j->ldw, j->K, j->ldw,
                           pf, j->acc);
                }
            for (; m < j->M; m++)
                dot8_rows(j->y + (size_t)m * j->ldy + r, j->x + (size_t)m * j->ldx, wr, j->K,
                          j->ldw, j->acc);
        }
        r0 = r; /* the last rows, fewer than eight, go through the plain loop */
    }
#endif
    for (int r = r0; r < r1; r++) {
        const float *wr = j->w + (size_t)r * j->ldw;
        for (int m = 0; m < j->M; m++) {
            const float d = dot_f32(j->x + (size_t)m * j->ldx, wr, j->K);
            float *o = j->y + (size_t)m * j->ldy + r;
            *o = j->acc ? *o + d : d;
        }
    }
}

static void matvec_task(void *ctx, int t, int n_tasks)
{
    (void)n_tasks;
    const matvec_job *j = ctx;
    const int r0 = t * j->rows_per_task;
    const int r1 = r0 + j->rows_per_task < j->N ? r0 + j->rows_per_task : j->N;
    matvec_rows(j, r0, r1);
}

/* Several products sharing x in one pass of the pool: task t takes a slice
 * of rows of one output, the outputs' slices numbered one after another. */
typedef struct {
    matvec_job jobs[KERN_MATVEC_GROUP_MAX];
    int first_task[KERN_MATVEC_GROUP_MAX + 1];
    int n;
} matvec_group;

static void matvec_group_task(void *ctx, int t, int n_tasks)
{
    (void)n_tasks;
    const matvec_group *g = ctx;
    int i = 0;
    while (i + 1 < g->n && t >= g->first_task[i + 1])
        i++;
    const matvec_job *j = &g->jobs[i];
    const int r0 = (t - g->first_task[i]) * j->rows_per_task;
    const int r1 = r0 + j->rows_per_task < j->N ? r0 + j->rows_per_task : j->N;
    matvec_rows(j, r0, r1);
}

/* Up to this many rows of x, the row-streaming kernel beats a GEMM call:
 * OpenBLAS's packing and threading cost more than they save on a handful of
 * rows, and tiny matrices gain nothing from blocking. */
#define SMALL_M 32
#define SMALL_GEMM_MACS (1L << 20)

/* OpenBLAS runs single-threaded inside the pool's tasks. Its own threads
 * would spin for a while after each call (OPENBLAS_THREAD_TIMEOUT, about 0.1 s
 * by default) and take a core from the pool's attention and elementwise work
 * that follows every projection; splitting W's rows over the pool costs only
 * a second packing of x. Measured on the 768-dim f32 model's 1499-token
 * prefill: 1-8% faster than OpenBLAS's threading (median of six runs 3.5%). */
static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static void blas_single_threaded(void)
{
    openblas_set_num_threads(1);
}

typedef struct {
    float *y;
    const float *x, *w;
    int M, N, K, ldx, ldy, ldw, per;
    bool acc; /* y += x W^T instead of y = */
} gemm_job;

static void gemm_task(void *ctx, int t, int n_tasks)
{
    (void)n_tasks;
    const gemm_job *g = ctx;
    const int n0 = t * g->per, n1 = n0 + g->per < g->N ? n0 + g->per : g->N;
    /* Zeroing the slice here and accumulating costs less than OpenBLAS's own
     * pass for beta 0 (sgemm_beta, ~1.5% of a prefill's samples; with memset
     * the 1499-token f32 prefill is 0.3-1.7% faster, four alternations). */
    if (!g->acc)
        for (int m = 0; m < g->M; m++)
            memset(g->y + (size_t)m * g->ldy + n0, 0, sizeof(float) * (size_t)(n1 - n0));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, g->M, n1 - n0, g->K, 1.0f, g->x, g->ldx,
                g->w + (size_t)n0 * g->ldw, g->ldw, 1.0f, g->y + n0, g->ldy);
}

void kern_matmul_f32(kern_pool *pool, float *y, int ldy, const float *x, int ldx, const float *w,
                     int M, int N, int K)
{
    kern_matmul_f32_ldw(pool, y, ldy, x, ldx, w, K, M, N, K);
}

static void matmul_f32(kern_pool *pool, float *y, int ldy, const float *x, int ldx, const float *w,
                       int ldw, int M, int N, int K, bool acc)
{
    if (M <= 0 || N <= 0 || K <= 0)
        return;
    if (M <= SMALL_M || (long)M * N * K <= SMALL_GEMM_MACS) {
        matvec_job j = {y, x, w, M, N, K, ldx, ldy, ldw, N, acc};
        int n_tasks = 1;
        const int threads = kern_pool_size(pool);
        if ((long)M * N * K >= PARALLEL_MIN_MACS && threads > 1) {
            /* A few tasks per thread balances uneven progress. */
            n_tasks = threads * 4;
            j.rows_per_task = (N + n_tasks - 1) / n_tasks;
            if (j.rows_per_task < ROWS_PER_TASK_MIN)
                j.rows_per_task = ROWS_PER_TASK_MIN;
            j.rows_per_task = (j.rows_per_task + 7) / 8 * 8; /* whole groups of eight rows */
            n_tasks = (N + j.rows_per_task - 1) / j.rows_per_task;
        }
        kern_pool_run(pool, matvec_task, &j, n_tasks);
        return;
    }
    pthread_once(&blas_once, blas_single_threaded);
    /* One slice of W's rows per thread, in multiples of 16 (OpenBLAS's
     * register blocking): each thread packs its own slice and all of x. */
    const int threads = kern_pool_size(pool);
    gemm_job g = {y, x, w, M, N, K, ldx, ldy, ldw, N, acc};
    if (threads > 1 && N >= 32)
        g.per = ((N + threads - 1) / threads + 15) / 16 * 16;
    kern_pool_run(pool, gemm_task, &g, (N + g.per - 1) / g.per);
}

void kern_matmul_f32_ldw(kern_pool *pool, float *y, int ldy, const float *x, int ldx,
                         const float *w, int ldw, int M, int N, int K)
{
    matmul_f32(pool, y, ldy, x, ldx, w, ldw, M, N, K, false);
}

void kern_matmul_f32_acc(kern_pool *pool, float *y, int ldy, const float *x, int ldx,
                         const float *w, int ldw, int M, int N, int K)
{
    matmul_f32(pool, y, ldy, x, ldx, w, ldw, M, N, K, true);
}

int kern_matvec_group_f32(kern_pool *pool, const float *x, int ldx, int M, int K,
                          const kern_mv_out *outs, int n_outs)
{
    if (M <= 0 || K <= 0 || n_outs <= 0)
        return 0;
    if (M > SMALL_M || n_outs > KERN_MATVEC_GROUP_MAX || !outs)
        return -1;
    matvec_group g = {.n = n_outs};
    long rows = 0;
    for (int i = 0; i < n_outs; i++)
        rows += outs[i].N > 0 ? outs[i].N : 0;
    /* The same slice size for every output: a few tasks per thread over all
     * the rows together, in whole groups of eight rows. */
    const int threads = kern_pool_size(pool);
    int per = (int)((rows + threads * 4 - 1) / (threads * 4));
    per = per < ROWS_PER_TASK_MIN ? ROWS_PER_TASK_MIN : per;
    per = (per + 7) / 8 * 8;
    int tasks = 0;
    for (int i = 0; i < n_outs; i++) {
        const kern_mv_out *o = &outs[i];
        const int N = o->N > 0 ? o->N : 0;
        g.jobs[i] = (matvec_job){o->y, x, o->w, M, N, K, ldx, o->ldy, o->ldw, per, false};
        g.first_task[i] = tasks;
        tasks += (N + per - 1) / per;
    }
    g.first_task[n_outs] = tasks;
    kern_pool_run(pool, matvec_group_task, &g, tasks);
    return 0;
}

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
