/*
 * attention_quant.c - attention over compressed KV pages on the CPU: the
 * decode kernel that walks pages of any format (F32, F16, Q8, Q4, ZIP) into one
 * online softmax, its double-precision reference, and the saliency column
 * sums of spec section 3.2.
 *
 * Work is split into (sequence, kv head, up to ROWS query rows) tasks. A task
 * walks the sequence's pages in chunks of CHUNK slots; for each chunk it
 * expands the kv head's K and V slice once into an L1-sized tile (F32 pages
 * are read in place), and every query head of the group and every row of the
 * task reads that tile, so a page is loaded once per group. The output rows
 * serve as the accumulators; each (row, head) keeps a running max and
 * denominator. Ordered slots are causal per row; set pages are visible to all.
 */
#include "kernels/kernels.h"
#include "kernels/cpu/simd.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 16
#define ROWS 4
#define MAX_HEAD_DIM KERN_ATTN_MAX_HEAD_DIM
#define MAX_GROUP KERN_ATTN_MAX_GROUP
#define PARALLEL_MIN_WORK (1 << 15)

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static inline int row_pos(const kern_kvq_seq *s, int r)
{
    return s->q_pos ? s->q_pos[r] : s->ctx_len - s->n_q + r;
}

/* ---- argument checks ---- */

static int check_heads(const kern_kvq_geom *g, int n_heads, char *err, size_t errlen)
{
    if (kern_kvq_geom_check(g, err, errlen) != 0)
        return -1;
    if (n_heads < g->n_kv_heads || n_heads % g->n_kv_heads != 0)
        return fail(err, errlen, "n_heads %d is not a multiple of n_kv_heads %d", n_heads,
                    g->n_kv_heads);
    if (n_heads / g->n_kv_heads > MAX_GROUP)
        return fail(err, errlen, "group size %d exceeds %d", n_heads / g->n_kv_heads, MAX_GROUP);
    return 0;
}

/* The geometry of one page: the call's, with the page's own slot count. */
static inline kern_kvq_geom page_geom(const kern_kvq_geom *g, const kern_kvq_page *p)
{
    kern_kvq_geom pg = *g;
    if (p->block_size > 0)
        pg.block_size = p->block_size;
    return pg;
}

static int check_seq(const kern_kvq_attn_args *a, int si, char *err, size_t errlen)
{
    const kern_kvq_seq *s = &a->seqs[si];
    if (s->n_q < 0 || s->ctx_len < 0 || s->n_pages < 0)
        return fail(err, errlen, "sequence %d: negative n_q %d, ctx_len %d or n_pages %d", si,
                    s->n_q, s->ctx_len, s->n_pages);
    if (s->n_q > 0 && (!s->q || !s->out))
        return fail(err, errlen, "sequence %d: q or out is NULL", si);
    if (s->n_pages > 0 && !s->pages)
        return fail(err, errlen, "sequence %d: pages is NULL", si);
    if (!s->q_pos && s->n_q > s->ctx_len)
        return fail(err, errlen, "sequence %d: n_q %d exceeds ctx_len %d", si, s->n_q, s->ctx_len);
    for (int r = 0; s->q_pos && r < s->n_q; r++)
        if (s->q_pos[r] < 0 || s->q_pos[r] >= s->ctx_len)
            return fail(err, errlen, "sequence %d: row %d position %d is outside [0, %d)", si, r,
                        s->q_pos[r], s->ctx_len);
    for (int i = 0; i < s->n_pages; i++) {
        const kern_kvq_page *p = &s->pages[i];
        if (p->fmt < 0 || p->fmt >= KERN_KVQ_N_FMT)
            return fail(err, errlen, "sequence %d page %d: unknown format %d", si, i, p->fmt);
        const int bs = p->block_size > 0 ? p->block_size : a->g.block_size;
        if (p->block_size < 0 || p->block_size > KERN_KVQ_MAX_BLOCK_SIZE || p->n < 0 || p->n > bs)
            return fail(err, errlen, "sequence %d page %d: %d slots in a page of %d", si, i, p->n,
                        p->block_size < 0 ? p->block_size : bs);
        if (p->n == 0)
            continue;
        if (!p->k || !p->v)
            return fail(err, errlen, "sequence %d page %d: K or V data is NULL", si, i);
        if (kern_kvq_fmt_is_zip((kern_kvq_fmt)p->fmt) && !p->stats)
            return fail(err, errlen, "sequence %d page %d: %s page without statistics", si, i,
                        kern_kvq_fmt_name((kern_kvq_fmt)p->fmt));
        if (p->pos0 != KERN_KVQ_UNORDERED && (p->pos0 < 0 || p->pos0 > s->ctx_len - p->n))
            return fail(err, errlen,
                        "sequence %d page %d: positions [%d, %d + %d) are outside "
                        "[0, ctx_len %d)",
                        si, i, p->pos0, p->pos0, p->n, s->ctx_len);
    }
    return 0;
}

static int check_args(const kern_kvq_attn_args *a, char *err, size_t errlen)
{
    if (!a)
        return fail(err, errlen, "attention arguments are NULL");
    if (check_heads(&a->g, a->n_heads, err, errlen) != 0)
        return -1;
    if (a->n_seqs < 0 || (a->n_seqs > 0 && !a->seqs))
        return fail(err, errlen, "n_seqs %d with seqs %p", a->n_seqs, (const void *)a->seqs);
    for (int i = 0; i < a->n_seqs; i++)
        if (check_seq(a, i, err, errlen) != 0)
            return -1;
    return 0;
}

/* ---- the kernel ---- */

/* K or V of one chunk for one kv head: F32 pages in place, others expanded. */
static const float *chunk_tile(float *tile, size_t *stride, const kern_kvq_page *p,
                               kern_kvq_kind kind, const kern_kvq_geom *g, int kvh, int c0, int n)
{
    const void *data = kind == KERN_KVQ_K ? p->k : p->v;
    if (p->fmt == KERN_KVQ_F32) {
        *stride = (size_t)g->n_kv_heads * g->head_dim;
        return (const float *)data + ((size_t)c0 * g->n_kv_heads + kvh) * g->head_dim;
    }
    *stride = (size_t)g->head_dim;
    const kern_kvq_geom pg = page_geom(g, p);
    kern_kvq_dequant_head(tile, *stride, data, kind, (kern_kvq_fmt)p->fmt, &pg, kvh, c0, n,
                          p->stats);
    return tile;
}

/* s[i] = q . k_i * scale for nv keys of a tile, four keys at a time so the
 * four sums are independent chains and q is loaded once for them. */
static inline void score_keys(float *restrict s, const float *restrict q, const float *kt,
                              size_t ks, int nv, int hd, float scale)
{
    int i = 0;
    for (; i + 4 <= nv; i += 4) {
        const float *restrict k0 = kt + (size_t)i * ks, *restrict k1 = k0 + ks;
        const float *restrict k2 = k1 + ks, *restrict k3 = k2 + ks;
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int e = 0; e < hd; e++) {
            d0 += q[e] * k0[e];
            d1 += q[e] * k1[e];
            d2 += q[e] * k2[e];
            d3 += q[e] * k3[e];
        }
        s[i] = d0 * scale;
        s[i + 1] = d1 * scale;
        s[i + 2] = d2 * scale;
        s[i + 3] = d3 * scale;
    }
    for (; i < nv; i++) {
        const float *restrict k = kt + (size_t)i * ks;
        float d = 0.0f;
#pragma omp simd reduction(+ : d)
        for (int e = 0; e < hd; e++)
            d += q[e] * k[e];
        s[i] = d * scale;
    }
}

/* o += sum_i p[i] v_i, four keys per pass over o so each output vector is
 * loaded and stored once per four keys. */
static inline void accumulate_values(float *restrict o, const float *restrict p, const float *vt,
                                     size_t vs, int nv, int hd)
{
    int i = 0;
    for (; i + 4 <= nv; i += 4) {
        const float *restrict v0 = vt + (size_t)i * vs, *restrict v1 = v0 + vs;
        const float *restrict v2 = v1 + vs, *restrict v3 = v2 + vs;
        const float p0 = p[i], p1 = p[i + 1], p2 = p[i + 2], p3 = p[i + 3];
#pragma omp simd
        for (int e = 0; e < hd; e++)
            o[e] += p0 * v0[e] + p1 * v1[e] + p2 * v2[e] + p3 * v3[e];
    }
    for (; i < nv; i++) {
        const float *restrict v = vt + (size_t)i * vs;
        const float pi = p[i];
#pragma omp simd
        for (int e = 0; e < hd; e++)
            o[e] += pi * v[e];
    }
}

static void attend(const kern_kvq_attn_args *a, const kern_kvq_seq *sq, int kvh, int r0, int r1)
{
    const kern_kvq_geom *g = &a->g;
    const int hd = g->head_dim, group = a->n_heads / g->n_kv_heads;
    const int nr = r1 - r0, nrg = nr * group;
    const float scale = 1.0f / sqrtf((float)hd);
    _Alignas(64) float ktile[CHUNK * MAX_HEAD_DIM];
    _Alignas(64) float vtile[CHUNK * MAX_HEAD_DIM];
    float m[ROWS * MAX_GROUP], l[ROWS * MAX_GROUP];
    float s[ROWS * MAX_GROUP][CHUNK];
    int qpos[ROWS], vis[ROWS];
    const float *q[ROWS * MAX_GROUP];
    float *acc[ROWS * MAX_GROUP];
    for (int r = 0; r < nr; r++) {
        qpos[r] = row_pos(sq, r0 + r);
        for (int gg = 0; gg < group; gg++) {
            const size_t off = ((size_t)(r0 + r) * a->n_heads + (size_t)kvh * group + gg) * hd;
            q[r * group + gg] = sq->q + off;
            acc[r * group + gg] = sq->out + off;
            memset(sq->out + off, 0, sizeof(float) * (size_t)hd);
            m[r * group + gg] = -INFINITY;
            l[r * group + gg] = 0.0f;
        }
    }
    for (int pi = 0; pi < sq->n_pages; pi++) {
        const kern_kvq_page *pg = &sq->pages[pi];
        const bool ordered = pg->pos0 != KERN_KVQ_UNORDERED;
        for (int c0 = 0; c0 < pg->n; c0 += CHUNK) {
            const int cn = pg->n - c0 < CHUNK ? pg->n - c0 : CHUNK;
            int maxvis = 0;
            for (int r = 0; r < nr; r++) {
                int v = cn;
                if (ordered) {
                    v = qpos[r] - (pg->pos0 + c0) + 1;
                    v = v < 0 ? 0 : v > cn ? cn : v;
                }
                vis[r] = v;
                maxvis = v > maxvis ? v : maxvis;
            }
            if (maxvis == 0) {
                if (ordered)
                    break; /* later slots of the page are later positions */
                continue;
            }
            size_t ks, vs;
            const float *kt = chunk_tile(ktile, &ks, pg, KERN_KVQ_K, g, kvh, c0, maxvis);
            for (int rg = 0; rg < nrg; rg++) {
                const int nv = vis[rg / group];
                if (nv == 0)
                    continue;
                score_keys(s[rg], q[rg], kt, ks, nv, hd, scale);
                float cmax = -INFINITY;
                for (int i = 0; i < nv; i++)
                    cmax = s[rg][i] > cmax ? s[rg][i] : cmax;
                if (cmax > m[rg]) {
                    const float corr = expf(m[rg] - cmax); /* 0 on the first chunk */
                    float *restrict o = acc[rg];
                    l[rg] *= corr;
#pragma omp simd
                    for (int e = 0; e < hd; e++)
                        o[e] *= corr;
                    m[rg] = cmax;
                }
                /* With no finite score yet, exp(s - 0) keeps -inf scores at 0. */
                const float mm = m[rg] == -INFINITY ? 0.0f : m[rg];
                float sum = 0.0f;
                for (int i = 0; i < nv; i++) {
                    const float p = expf(s[rg][i] - mm);
                    s[rg][i] = p;
                    sum += p;
                }
                l[rg] += sum;
            }
            const float *vt = chunk_tile(vtile, &vs, pg, KERN_KVQ_V, g, kvh, c0, maxvis);
            for (int rg = 0; rg < nrg; rg++)
                if (vis[rg / group] > 0)
                    accumulate_values(acc[rg], s[rg], vt, vs, vis[rg / group], hd);
        }
    }
    for (int rg = 0; rg < nrg; rg++) {
        float *o = acc[rg];
        const float inv = l[rg] > 0.0f ? 1.0f / l[rg] : 0.0f;
        if (l[rg] != l[rg]) /* NaN: let it show rather than hide it */
            for (int e = 0; e < hd; e++)
                o[e] = NAN;
        else
            for (int e = 0; e < hd; e++)
                o[e] *= inv;
        if (sq->lse) {
            const int r = rg / group, gg = rg % group;
            sq->lse[(size_t)(r0 + r) * a->n_heads + (size_t)kvh * group + gg] =
                l[rg] > 0.0f    ? m[rg] + logf(l[rg])
                : l[rg] == 0.0f ? -INFINITY
                                : NAN;
        }
    }
}

typedef struct {
    const kern_kvq_attn_args *a;
    bool one_chunk; /* every sequence has at most ROWS rows (decode): task = seq, kv head */
} attn_job;

static int row_chunks(const kern_kvq_seq *s)
{
    return (s->n_q + ROWS - 1) / ROWS;
}

static void attn_task(void *ctx, int t, int n_tasks)
{
    (void)n_tasks;
    const attn_job *j = ctx;
    const kern_kvq_attn_args *a = j->a;
    const int nkv = a->g.n_kv_heads;
    if (j->one_chunk) {
        const kern_kvq_seq *s = &a->seqs[t / nkv];
        attend(a, s, t % nkv, 0, s->n_q);
        return;
    }
    for (int si = 0; si < a->n_seqs; si++) {
        const kern_kvq_seq *s = &a->seqs[si];
        const int n = row_chunks(s) * nkv;
        if (t >= n) {
            t -= n;
            continue;
        }
        const int kvh = t % nkv, r0 = (t / nkv) * ROWS;
        attend(a, s, kvh, r0, r0 + ROWS < s->n_q ? r0 + ROWS : s->n_q);
        return;
    }
}

int kern_attention_decode_quant(kern_pool *pool, const kern_kvq_attn_args *a, char *err,
                                size_t errlen)
{
    if (check_args(a, err, errlen) != 0)
        return -1;
    long long tasks = 0, work = 0;
    bool one_chunk = true;
    for (int i = 0; i < a->n_seqs; i++) {
        tasks += (long long)row_chunks(&a->seqs[i]) * a->g.n_kv_heads;
        work += (long long)a->seqs[i].n_q * a->seqs[i].ctx_len * a->n_heads * a->g.head_dim;
        one_chunk = one_chunk && row_chunks(&a->seqs[i]) == 1;
    }
    if (tasks > INT32_MAX)
        return fail(err, errlen, "%lld attention tasks are too many", tasks);
    attn_job j = {a, one_chunk};
    kern_pool_run(work >= PARALLEL_MIN_WORK ? pool : NULL, attn_task, &j, (int)tasks);
    return 0;
}

/* ---- the reference ---- */

static int ref_seq(const kern_kvq_attn_args *a, const kern_kvq_seq *s, char *err, size_t errlen)
{
    const kern_kvq_geom *g = &a->g;
    const int hd = g->head_dim, kvd = g->n_kv_heads * hd, group = a->n_heads / g->n_kv_heads;
    size_t n_keys = 0;
    for (int i = 0; i < s->n_pages; i++)
        n_keys += (size_t)s->pages[i].n;
    float *k = malloc(sizeof(float) * (n_keys ? n_keys : 1) * kvd);
    float *v = malloc(sizeof(float) * (n_keys ? n_keys : 1) * kvd);
    int *pos = malloc(sizeof(int) * (n_keys ? n_keys : 1));
    double *sc = malloc(sizeof(double) * (n_keys ? n_keys : 1));
    int rc = 0;
    if (!k || !v || !pos || !sc) {
        rc = fail(err, errlen, "out of memory for %zu reference keys", n_keys);
        goto done;
    }
    size_t j = 0;
    for (int i = 0; i < s->n_pages && rc == 0; i++) {
        const kern_kvq_page *p = &s->pages[i];
        if (p->n == 0)
            continue;
        const kern_kvq_geom pg = page_geom(g, p);
        rc = kern_kvq_unpack(k + j * kvd, (size_t)kvd, p->k, KERN_KVQ_K, (kern_kvq_fmt)p->fmt, &pg,
                             0, p->n, p->stats, err, errlen);
        if (rc == 0)
            rc = kern_kvq_unpack(v + j * kvd, (size_t)kvd, p->v, KERN_KVQ_V, (kern_kvq_fmt)p->fmt,
                                 &pg, 0, p->n, p->stats, err, errlen);
        for (int t = 0; t < p->n; t++)
            pos[j + t] = p->pos0 == KERN_KVQ_UNORDERED ? -1 : p->pos0 + t;
        j += (size_t)p->n;
    }
    for (int r = 0; r < s->n_q && rc == 0; r++) {
        const int qp = row_pos(s, r);
        for (int h = 0; h < a->n_heads; h++) {
            const int kvh = h / group;
            const float *q = s->q + ((size_t)r * a->n_heads + h) * hd;
            double mx = -INFINITY, sum = 0.0;
            for (size_t t = 0; t < n_keys; t++) {
                if (pos[t] > qp) {
                    sc[t] = -INFINITY;
                    continue;
                }
                double d = 0.0;
                for (int e = 0; e < hd; e++)
                    d += (double)q[e] * k[t * kvd + (size_t)kvh * hd + e];
                sc[t] = d / sqrt((double)hd);
                mx = sc[t] > mx ? sc[t] : mx;
            }
            for (size_t t = 0; t < n_keys; t++) {
                sc[t] = sc[t] == -INFINITY ? 0.0 : exp(sc[t] - mx);
                sum += sc[t];
            }
            float *o = s->out + ((size_t)r * a->n_heads + h) * hd;
            for (int e = 0; e < hd; e++) {
                double acc = 0.0;
                for (size_t t = 0; t < n_keys; t++)
                    acc += sc[t] * v[t * kvd + (size_t)kvh * hd + e];
                o[e] = sum > 0.0 ? (float)(acc / sum) : 0.0f;
            }
            if (s->lse)
                s->lse[(size_t)r * a->n_heads + h] = sum > 0.0 ? (float)(mx + log(sum)) : -INFINITY;
        }
    }
done:
    free(k);
    free(v);
    free(pos);
    free(sc);
    return rc;
}

int kern_attention_decode_quant_ref(const kern_kvq_attn_args *a, char *err, size_t errlen)
{
    if (check_args(a, err, errlen) != 0)
        return -1;
    for (int i = 0; i < a->n_seqs; i++)
        if (ref_seq(a, &a->seqs[i], err, errlen) != 0)
            return -1;
    return 0;
}

/* ---- saliency column sums ---- */

static inline const float *key_row(const kern_kvq_src *s, int t)
{
    const int u = t - s->first;
    size_t r = (size_t)u;
    if (s->blocks)
        r = (size_t)s->blocks[u / s->block_size] * (size_t)s->block_size +
            (size_t)(u % s->block_size);
    return s->base + r * s->stride;
}

static inline float dot(const float *restrict a, const float *restrict b, int n)
{
    float d = 0.0f;
#pragma omp simd reduction(+ : d)
    for (int e = 0; e < n; e++)
        d += a[e] * b[e];
    return d;
}

typedef struct {
    float *colsum;
    const kern_kvq_geom *g;
    const kern_kvq_probe_args *a;
    float *scores; /* [n_kv_heads][cap] */
    int cap;
} sal_job;

/* d[i] = scale * q . k(t0 + i) for i < n (one kv head's slice of each key). */
static void probe_scores(float *d, const float *q, const kern_kvq_src *k, int kvh, int hd, int t0,
                         int n, float scale)
{
    for (int i = 0; i < n; i++) {
        const float *kr = key_row(k, t0 + i) + (size_t)kvh * hd;
#ifdef KERN_HAVE_AVX2
        if (hd % 16 == 0) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (int e = 0; e < hd; e += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(kr + e), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e + 8), _mm256_loadu_ps(kr + e + 8), a1);
            }
            d[i] = kern_hsum(_mm256_add_ps(a0, a1)) * scale;
            continue;
        }
#endif
        d[i] = dot(q, kr, hd) * scale;
    }
}

/* Adds exp(d[i] - c) to out[i] (out == NULL: only sums them); returns the sum. */
static double exp_shift(float *out, const float *d, int n, float c)
{
    double sum = 0.0;
    int i = 0;
#ifdef KERN_HAVE_AVX2
    const __m256 vc = _mm256_set1_ps(c);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 e = kern_exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(d + i), vc));
        if (out)
            _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), e));
        acc = _mm256_add_ps(acc, e);
    }
    sum = kern_hsum(acc);
#endif
    for (; i < n; i++) {
        const float e = expf(d[i] - c);
        if (out)
            out[i] += e;
        sum += e;
    }
    return sum;
}

/* One kv head: every row and query head of its group adds exp(s - lse) to the
 * column sums of the window keys it can see. Each score is computed once:
 * without a given lse the row's scores over all its keys are kept for the
 * max, the sum and the window. */
static void sal_task(void *ctx, int kvh, int n_tasks)
{
    (void)n_tasks;
    const sal_job *j = ctx;
    const kern_kvq_probe_args *a = j->a;
    const int hd = j->g->head_dim, group = a->n_heads / j->g->n_kv_heads;
    const float scale = 1.0f / sqrtf((float)hd);
    float *cs = j->colsum + (size_t)kvh * a->n_keys;
    float *d = j->scores + (size_t)kvh * (size_t)j->cap;
    for (int r = 0; r < a->n_q; r++) {
        const int qp = a->q_pos[r];
        const int last = a->key_first + a->n_keys - 1 < qp ? a->key_first + a->n_keys - 1 : qp;
        const int n_win = last - a->key_first + 1;
        for (int gg = 0; gg < group; gg++) {
            const int h = kvh * group + gg;
            const float *q = a->q + ((size_t)r * a->n_heads + h) * hd;
            if (a->lse) {
                if (n_win <= 0)
                    continue;
                probe_scores(d, q, a->k, kvh, hd, a->key_first, n_win, scale);
                exp_shift(cs, d, n_win, a->lse[(size_t)r * a->n_heads + h]);
                continue;
            }
            probe_scores(d, q, a->k, kvh, hd, 0, qp + 1, scale);
            float mx = -INFINITY;
            for (int t = 0; t <= qp; t++)
                mx = d[t] > mx ? d[t] : mx;
            const float lse = mx + (float)log(exp_shift(NULL, d, qp + 1, mx));
            if (n_win > 0)
                exp_shift(cs, d + a->key_first, n_win, lse);
        }
    }
}

int kern_kvq_saliency_accumulate(kern_pool *pool, float *colsum, const kern_kvq_geom *g,
                                 const kern_kvq_probe_args *a, char *err, size_t errlen)
{
    if (!a || !colsum)
        return fail(err, errlen, "saliency arguments or column sums are NULL");
    if (check_heads(g, a->n_heads, err, errlen) != 0)
        return -1;
    if (a->n_q < 0 || a->n_keys < 0 || a->key_first < 0 || a->key_first > INT32_MAX - a->n_keys)
        return fail(err, errlen, "saliency shape (rows %d, keys %d from %d) is invalid", a->n_q,
                    a->n_keys, a->key_first);
    if (a->n_q > 0 && (!a->q || !a->q_pos))
        return fail(err, errlen, "saliency rows or their positions are NULL");
    const kern_kvq_src *k = a->k;
    if (!k || !k->base || k->stride < (size_t)g->n_kv_heads * g->head_dim || k->len < 0 ||
        k->first < 0 || k->first > INT32_MAX - k->len || (k->blocks && k->block_size < 1))
        return fail(err, errlen, "saliency key source is NULL or malformed");
    for (int r = 0; r < a->n_q; r++) {
        const int qp = a->q_pos[r];
        const int need_lo = a->lse ? a->key_first : 0;
        const int need_hi = qp < a->key_first + a->n_keys - 1 ? qp : a->key_first + a->n_keys - 1;
        if (qp < 0)
            return fail(err, errlen, "saliency row %d position %d is negative", r, qp);
        if (!a->lse && qp >= k->first + k->len)
            return fail(err, errlen, "saliency row %d at %d needs keys the source lacks", r, qp);
        if (need_hi >= need_lo && (need_lo < k->first || need_hi >= k->first + k->len))
            return fail(err, errlen, "saliency row %d needs keys [%d, %d], source has [%d, %d)", r,
                        need_lo, need_hi, k->first, k->first + k->len);
    }
    int cap = 1;
    for (int r = 0; r < a->n_q; r++) {
        const int need = a->lse ? a->n_keys : a->q_pos[r] + 1;
        cap = need > cap ? need : cap;
    }
    float *scores = malloc(sizeof(float) * (size_t)cap * (size_t)g->n_kv_heads);
    if (!scores)
        return fail(err, errlen, "out of memory for the saliency scores");
    sal_job j = {colsum, g, a, scores, cap};
    long long work = 0;
    for (int r = 0; r < a->n_q; r++)
        work += (long long)(a->lse ? a->n_keys : 3 * (a->q_pos[r] + 1)) * a->n_heads * g->head_dim;
    kern_pool_run(work >= PARALLEL_MIN_WORK ? pool : NULL, sal_task, &j, g->n_kv_heads);
    free(scores);
    return 0;
}
