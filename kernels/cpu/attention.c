/*
 * attention.c - dense causal attention of one sequence on the CPU.
 *
 * Work is split into (kv head, block of query rows) tasks; the query heads of
 * one group share the task so each K/V row is loaded once per group. Each
 * query row keeps a running max, denominator and output accumulator while it
 * walks the keys in chunks (online softmax), so memory use is independent of
 * the context length. A single row over a long context (a decode step) splits
 * its keys instead, see attention_split.
 */
#include "kernels/kernels.h"
#include "kernels/cpu/simd.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define KEY_CHUNK 128
#define MAX_HEAD_DIM KERN_ATTN_MAX_HEAD_DIM
#define MAX_GROUP KERN_ATTN_MAX_GROUP
#define PARALLEL_MIN_WORK (1 << 16)

typedef struct {
    const kern_attn_args *a;
    int rows_per_task;
    int n_row_blocks;
} attn_job;

/* s[i] = scale * (q . rows[i]) for i < n: eight keys at a time, their dot
 * products reduced together. */
static void key_scores(const float *q, const float *const *rows, int n, int hd, float scale,
                       float *s)
{
    int i = 0;
#ifdef KERN_HAVE_AVX2
    if (hd % 8 == 0)
        for (; i + 8 <= n; i += 8) {
            __m256 d[8];
            for (int u = 0; u < 8; u++) {
                const float *k = rows[i + u];
                __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
                for (int e = 8; e < hd; e += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k + e), acc);
                d[u] = acc;
            }
            _mm256_storeu_ps(
                s + i, _mm256_mul_ps(kern_hsum8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]),
                                     _mm256_set1_ps(scale)));
        }
#endif
    for (; i < n; i++) {
        const float *k = rows[i];
        float d = 0.0f;
#pragma omp simd reduction(+ : d)
        for (int e = 0; e < hd; e++)
            d += q[e] * k[e];
        s[i] = d * scale;
    }
}

/* One chunk's step of the online softmax: scores s[0..n) become the weights
 * exp(s - m_new), and the running max *m, sum *l and accumulator acc[0..hd)
 * move to m_new = max(*m, max s) (rescaled by exp(*m - m_new), 0 on the first
 * chunk). */
static void softmax_chunk(float *s, int n, float *m, float *l, float *acc, int hd)
{
    float cmax = -INFINITY;
#pragma omp simd reduction(max : cmax)
    for (int i = 0; i < n; i++)
        cmax = s[i] > cmax ? s[i] : cmax;
    const float m_new = cmax > *m ? cmax : *m;
    const float corr = expf(*m - m_new);
    int i = 0;
#ifdef KERN_HAVE_AVX2
    const __m256 vm = _mm256_set1_ps(m_new);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(s + i, kern_exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm)));
#endif
    for (; i < n; i++)
        s[i] = expf(s[i] - m_new);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (i = 0; i < n; i++)
        sum += s[i];
    *l = *l * corr + sum;
    *m = m_new;
    if (corr != 1.0f)
        for (int e = 0; e < hd; e++)
            acc[e] *= corr;
}

static void attend_row(const kern_attn_args *a, int kvh, int r)
{
    const int hd = a->head_dim;
    const int group = a->n_heads / a->n_kv_heads;
    const int pos = a->ctx_len - a->n_q + r; /* causal: keys 0..pos */
    const float scale = 1.0f / sqrtf((float)hd);
    float m[MAX_GROUP], l[MAX_GROUP];
    float acc[MAX_GROUP][MAX_HEAD_DIM];
    float s[MAX_GROUP][KEY_CHUNK];
    const float *qrow = a->q + (size_t)r * a->n_heads * hd;
    for (int g = 0; g < group; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        memset(acc[g], 0, sizeof(float) * (size_t)hd);
    }
    /* Where key j lives, walked block by block instead of dividing per key;
     * computed once per chunk and shared by K, V and every head of the group. */
    size_t off[KEY_CHUNK];
    const float *krows[KEY_CHUNK];
    const int bs = a->blocks ? a->block_size : pos + 1;
    int blk = 0, in_blk = 0;
    for (int j0 = 0; j0 <= pos; j0 += KEY_CHUNK) {
        const int j1 = j0 + KEY_CHUNK <= pos + 1 ? j0 + KEY_CHUNK : pos + 1;
        for (int j = j0; j < j1; j++) {
            const size_t row =
                a->blocks ? (size_t)a->blocks[blk] * (size_t)bs + (size_t)in_blk : (size_t)j;
            off[j - j0] = row * (size_t)a->kv_stride + (size_t)kvh * hd;
            krows[j - j0] = a->k + off[j - j0];
            if (++in_blk == bs) {
                in_blk = 0;
                blk++;
            }
        }
        for (int g = 0; g < group; g++) {
            const float *q = qrow + (size_t)(kvh * group + g) * hd;
            key_scores(q, krows, j1 - j0, hd, scale, s[g]);
            softmax_chunk(s[g], j1 - j0, &m[g], &l[g], acc[g], hd);
            int jv = j0;
#ifdef KERN_HAVE_AVX2
            /* Head dims that are whole vectors: the accumulator stays in registers for
             * one key after another (the generic loop below re-derives its trip count
             * per key, which dominates at small head dims). */
            if (hd == 8) {
                /* Four independent accumulators hide the FMA latency chain. */
                __m256 a0 = _mm256_loadu_ps(acc[g]), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                const float *sg = s[g] - j0;
                for (; jv + 4 <= j1; jv += 4) {
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(sg[jv]),
                                         _mm256_loadu_ps(a->v + off[jv - j0]), a0);
                    a1 = _mm256_fmadd_ps(_mm256_set1_ps(sg[jv + 1]),
                                         _mm256_loadu_ps(a->v + off[jv + 1 - j0]), a1);
                    a2 = _mm256_fmadd_ps(_mm256_set1_ps(sg[jv + 2]),
                                         _mm256_loadu_ps(a->v + off[jv + 2 - j0]), a2);
                    a3 = _mm256_fmadd_ps(_mm256_set1_ps(sg[jv + 3]),
                                         _mm256_loadu_ps(a->v + off[jv + 3 - j0]), a3);
                }
                for (; jv < j1; jv++)
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(sg[jv]),
                                         _mm256_loadu_ps(a->v + off[jv - j0]), a0);
                _mm256_storeu_ps(acc[g],
                                 _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            } else if (hd % 8 == 0) {
                for (; jv < j1; jv++) {
                    const __m256 p8 = _mm256_set1_ps(s[g][jv - j0]);
                    const float *v = a->v + off[jv - j0];
                    for (int i = 0; i < hd; i += 8)
                        _mm256_storeu_ps(acc[g] + i, _mm256_fmadd_ps(p8, _mm256_loadu_ps(v + i),
                                                                     _mm256_loadu_ps(acc[g] + i)));
                }
            }
#endif
            for (; jv < j1; jv++) {
                const float p = s[g][jv - j0];
                const float *v = a->v + off[jv - j0];
#pragma omp simd
                for (int i = 0; i < hd; i++)
                    acc[g][i] += p * v[i];
            }
        }
    }
    float *orow = a->out + (size_t)r * a->n_heads * hd;
    for (int g = 0; g < group; g++) {
        float *o = orow + (size_t)(kvh * group + g) * hd;
        const float inv = 1.0f / l[g];
        for (int i = 0; i < hd; i++)
            o[i] = acc[g][i] * inv;
    }
}

static void attn_task(void *ctx, int t, int n_tasks)
{
    const attn_job *j = ctx;
    const int kvh = t / j->n_row_blocks;
    const int r0 = (t % j->n_row_blocks) * j->rows_per_task;
    int r1 = r0 + j->rows_per_task;
    if (r1 > j->a->n_q)
        r1 = j->a->n_q;
    for (int r = r0; r < r1; r++)
        attend_row(j->a, kvh, r);
}

/* ---- one query row over a long context: keys split over the pool ----
 *
 * A decode step's row reads every cached K/V row once. Split by heads (above),
 * each task reads its head's 256 bytes out of every 3 KB row (on the 768-dim
 * model): scattered reads that ran at half the machine's bandwidth. Here a task
 * takes a contiguous range of SPLIT_KEYS keys for all heads, reading whole rows
 * in order, and keeps a running max, sum and accumulator per head; the caller
 * merges the ranges. The ranges depend only on the context length, so the
 * result does not depend on the thread count. */
#define SPLIT_MIN_CTX 768
#define SPLIT_KEYS 256
#define SPLIT_CHUNK 32 /* keys scored before their softmax step */
#define SPLIT_MAX_HEADS 128

typedef struct {
    const kern_attn_args *a;
    float scale;
    float *part; /* per range and head: acc[head_dim], m, l */
} split_job;

static void split_task(void *ctx, int t, int n_tasks)
{
    const split_job *j = ctx;
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, H = a->n_heads, group = H / a->n_kv_heads;
    const int k0 = (int)((long)a->ctx_len * t / n_tasks);
    const int k1 = (int)((long)a->ctx_len * (t + 1) / n_tasks);
    const size_t ps = (size_t)hd + 2;
    float *part = j->part + (size_t)t * (size_t)H * ps;
    float s[SPLIT_MAX_HEADS][SPLIT_CHUNK];
    const float *kr[SPLIT_CHUNK], *vr[SPLIT_CHUNK], *kh[SPLIT_CHUNK];
    for (int h = 0; h < H; h++) {
        memset(part + (size_t)h * ps, 0, sizeof(float) * (size_t)hd);
        part[(size_t)h * ps + hd] = -INFINITY;
        part[(size_t)h * ps + hd + 1] = 0.0f;
    }
    for (int c0 = k0; c0 < k1; c0 += SPLIT_CHUNK) {
        const int n = k1 - c0 < SPLIT_CHUNK ? k1 - c0 : SPLIT_CHUNK;
        for (int i = 0; i < n; i++) {
            const size_t row = kern_attn_row(a, c0 + i) * (size_t)a->kv_stride;
            kr[i] = a->k + row;
            vr[i] = a->v + row;
        }
        /* Scores, eight keys at a time for every head: the rows are read
         * whole, one after another. */
        for (int i0 = 0; i0 < n; i0 += 8) {
            const int m = n - i0 < 8 ? n - i0 : 8;
            for (int h = 0; h < H; h++) {
                const size_t off = (size_t)(h / group) * hd;
                for (int u = 0; u < m; u++)
                    kh[u] = kr[i0 + u] + off;
                key_scores(a->q + (size_t)h * hd, kh, m, hd, j->scale, s[h] + i0);
            }
        }
        for (int h = 0; h < H; h++) {
            float *acc = part + (size_t)h * ps;
            softmax_chunk(s[h], n, acc + hd, acc + hd + 1, acc, hd);
        }
        /* The weighted values, row after row. */
        for (int i = 0; i < n; i++)
            for (int h = 0; h < H; h++) {
                float *acc = part + (size_t)h * ps;
                const float *v = vr[i] + (size_t)(h / group) * hd, p = s[h][i];
                int e = 0;
#ifdef KERN_HAVE_AVX2
                const __m256 p8 = _mm256_set1_ps(p);
                for (; e + 8 <= hd; e += 8)
                    _mm256_storeu_ps(acc + e, _mm256_fmadd_ps(p8, _mm256_loadu_ps(v + e),
                                                              _mm256_loadu_ps(acc + e)));
#endif
                for (; e < hd; e++)
                    acc[e] += p * v[e];
            }
    }
}

/* Returns 0 when done, -1 when the row is not one this path takes. */
static int attention_split(kern_pool *pool, const kern_attn_args *a)
{
    if (a->n_q != 1 || a->ctx_len < SPLIT_MIN_CTX || a->n_heads > SPLIT_MAX_HEADS)
        return -1;
    const int hd = a->head_dim, H = a->n_heads;
    const int n_split = (a->ctx_len + SPLIT_KEYS - 1) / SPLIT_KEYS;
    const size_t ps = (size_t)hd + 2;
    split_job j = {a, 1.0f / sqrtf((float)hd), malloc(sizeof(float) * (size_t)n_split * H * ps)};
    if (!j.part)
        return -1;
    kern_pool_run(pool, split_task, &j, n_split);
    for (int h = 0; h < H; h++) {
        float mx = -INFINITY;
        for (int t = 0; t < n_split; t++) {
            const float m = j.part[((size_t)t * H + h) * ps + hd];
            mx = m > mx ? m : mx;
        }
        float acc[MAX_HEAD_DIM] = {0}, l = 0.0f;
        for (int t = 0; t < n_split; t++) {
            const float *p = j.part + ((size_t)t * H + h) * ps;
            const float w = expf(p[hd] - mx);
            l += p[hd + 1] * w;
            for (int e = 0; e < hd; e++)
                acc[e] += p[e] * w;
        }
        float *o = a->out + (size_t)h * hd;
        const float inv = 1.0f / l;
        for (int e = 0; e < hd; e++)
            o[e] = acc[e] * inv;
    }
    free(j.part);
    return 0;
}

void kern_attention_f32(kern_pool *pool, const kern_attn_args *a)
{
    if (a->n_q <= 0)
        return;
    if (attention_split(pool, a) == 0)
        return;
    attn_job j = {a, a->n_q, 1};
    const long work = (long)a->n_q * a->ctx_len * a->n_heads * a->head_dim;
    const int threads = kern_pool_size(pool);
    if (threads > 1 && work >= PARALLEL_MIN_WORK) {
        /* Enough tasks for balance: later rows see more keys than earlier. */
        int want = threads * 8 / a->n_kv_heads + 1;
        if (want > a->n_q)
            want = a->n_q;
        j.rows_per_task = (a->n_q + want - 1) / want;
        j.n_row_blocks = (a->n_q + j.rows_per_task - 1) / j.rows_per_task;
    }
    /* Small work runs on the caller: a hand-off costs more than it saves. */
    const bool parallel = threads > 1 && work >= PARALLEL_MIN_WORK;
    kern_pool_run(parallel ? pool : NULL, attn_task, &j, a->n_kv_heads * j.n_row_blocks);
}

void kern_attention_ref(const kern_attn_args *a)
{
    const int hd = a->head_dim;
    const int group = a->n_heads / a->n_kv_heads;
    double *sc = malloc(sizeof(double) * (size_t)(a->ctx_len > 0 ? a->ctx_len : 1));
    if (!sc)
        return;
    for (int r = 0; r < a->n_q; r++) {
        const int pos = a->ctx_len - a->n_q + r;
        for (int h = 0; h < a->n_heads; h++) {
            const int kvh = h / group;
            const float *q = a->q + ((size_t)r * a->n_heads + h) * hd;
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j <= pos; j++) {
                const float *k = a->k + kern_attn_row(a, j) * a->kv_stride + (size_t)kvh * hd;
                double d = 0.0;
                for (int i = 0; i < hd; i++)
                    d += (double)q[i] * k[i];
                sc[j] = d / sqrt((double)hd);
                if (sc[j] > mx)
                    mx = sc[j];
            }
            for (int j = 0; j <= pos; j++) {
                sc[j] = exp(sc[j] - mx);
                sum += sc[j];
            }
            float *o = a->out + ((size_t)r * a->n_heads + h) * hd;
            for (int i = 0; i < hd; i++) {
                double acc = 0.0;
                for (int j = 0; j <= pos; j++)
                    acc += sc[j] * a->v[kern_attn_row(a, j) * a->kv_stride + (size_t)kvh * hd + i];
                o[i] = (float)(acc / sum);
            }
        }
    }
    free(sc);
}
