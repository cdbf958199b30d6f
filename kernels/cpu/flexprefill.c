/*
 * flexprefill.c - FlexPrefill block selection (research/sparse-kv-spec.md 1.2-1.5)
 * and the prefill that runs it.
 *
 * Per layer, in two parts. The estimate (kern_flex_estimate_f32) reads Q and
 * K: probe profiles of the last B query rows (two passes, O(heads x N),
 * kern_attention_probe_profiles_f32), block means of K, and the scaled means
 * of the probe rows and of each query block. The selection reads only the
 * estimate, so a device can compute it with its twin and copy it to the host
 * (kern_flexprefill_select_estimated): one task per query head, budgets from
 * the cumulative mass gamma, the Jensen-Shannon test against tau, vertical and
 * slash blocks, and for query-aware heads the pooled-score blocks; the
 * selection is written as bitset rows of a kern_block_mask that lives in the
 * workspace, and the block-sparse kernel runs it.
 *
 * Choices where the spec leaves room or the reference code has quirks:
 * - Step 3 divides the mass count by B, where FP-code divides by a literal 128
 *   (the same for the default B = 128).
 * - The slash profile is pooled by token distance, block d = distances
 *   [dB, dB+B); FP-code pools its reversed array on an index grid that matches
 *   this exactly when ctx_len is a multiple of B.
 * - Sorted running sums are found without sorting: a bisection on the bit
 *   pattern of a threshold value (non-negative floats order like their bits)
 *   finds the largest set whose sum stays within the budget; ties at the
 *   threshold are taken lowest index first. Sums are in double.
 * - Top-k of column and diagonal blocks break ties by the lower index.
 * - gamma >= 1 selects every causal block (spec 1.7.2), so rounding in the
 *   running sums cannot drop a block.
 * - Chunks (n_q < ctx_len) use the chunked extension of spec 1.5.
 *
 * Workspace: everything is allocated by kern_flex_ws_create. Per-head tasks
 * that need private scratch (the query-aware score triangle) take one of
 * n_threads slots with an atomic flag; at most kern_pool_size(pool) tasks run
 * at once, so a slot is always free.
 */
#include "kernels/kernels.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kern_flex_ws {
    int max_ctx, n_heads, n_kv_heads, head_dim, min_block, n_threads;
    int max_nb, max_words;
    float *vertical, *slash; /* n_heads * max_ctx: probe profiles */
    float *probe;            /* probe-row scratch for kern_attention_probe_profiles_f32 */
    float *kbar;             /* n_kv_heads * max_nb * head_dim: block means of K */
    float *qbar;             /* n_heads * head_dim: scaled mean of the probe rows */
    float *qtil;             /* n_heads * max_nb * head_dim: scaled query block means */
    float *vb, *sb;          /* n_heads * max_nb: pooled vertical and slash mass */
    uint64_t *bits;          /* n_heads * max_nb * max_words: the selection */
    size_t n_bits;
    kern_flex_head *heads; /* n_heads: the last selection's decisions */
    int n_heads_done;      /* heads the last selection covered (0 after a dense path) */
    unsigned char *slots;  /* n_threads * slot_bytes */
    size_t slot_bytes;
    atomic_int *busy;
    size_t bytes;
};

typedef struct {
    const kern_attn_args *a;
    const kern_flex_params *p;
    kern_flex_ws *ws;
    kern_flex_estimate est; /* what the selection reads (in ws) */
    kern_block_mask *mask;
    int B, nb, minB, maxB;
    atomic_int n_query_aware;
} flex_job;

/* The estimate's tasks: shape and destination. */
typedef struct {
    const kern_attn_args *a;
    const kern_flex_estimate *est;
    int B, nb, q_block0, n_qblocks;
    float scale;
} estimate_job;

static int ceil_div(long a, long b)
{
    return (int)((a + b - 1) / b);
}
static int imin(int a, int b)
{
    return a < b ? a : b;
}
static int imax(int a, int b)
{
    return a > b ? a : b;
}

static void set_err(char *err, size_t err_len, const char *msg)
{
    if (err && err_len)
        snprintf(err, err_len, "%s", msg);
}

/* ---- parameters ---- */

void kern_flex_params_default(kern_flex_params *p)
{
    p->gamma = 0.9f;
    p->tau = 0.1f;
    p->min_budget = 1024;
    p->max_budget = 0;
    p->block_size = 128;
    p->gqa_union = 0;
}

int kern_flex_params_check(const kern_flex_params *p, char *err, size_t err_len)
{
    if (!p) {
        set_err(err, err_len, "flex parameters missing");
        return KERN_SPARSE_EINVAL;
    }
    if (!(p->gamma > 0.0f && p->gamma <= 1.0f)) {
        set_err(err, err_len, "gamma must be in (0, 1]");
        return KERN_SPARSE_EINVAL;
    }
    if (!(p->tau >= 0.0f && p->tau <= 1.0f)) {
        set_err(err, err_len, "tau must be in [0, 1]");
        return KERN_SPARSE_EINVAL;
    }
    if (p->min_budget < 0) {
        set_err(err, err_len, "min_budget must be >= 0");
        return KERN_SPARSE_EINVAL;
    }
    if (p->max_budget < 0) {
        set_err(err, err_len, "max_budget must be >= 0 (0: unlimited)");
        return KERN_SPARSE_EINVAL;
    }
    if (p->block_size < KERN_FLEX_MIN_BLOCK || p->block_size > KERN_FLEX_MAX_BLOCK) {
        char msg[64];
        snprintf(msg, sizeof msg, "block_size must be in [%d, %d]", KERN_FLEX_MIN_BLOCK,
                 KERN_FLEX_MAX_BLOCK);
        set_err(err, err_len, msg);
        return KERN_SPARSE_EINVAL;
    }
    if (p->gqa_union != 0 && p->gqa_union != 1) {
        set_err(err, err_len, "gqa_union must be 0 or 1");
        return KERN_SPARSE_EINVAL;
    }
    return KERN_SPARSE_OK;
}

/* ---- workspace ---- */

static size_t align64(size_t n)
{
    return (n + 63) & ~(size_t)63;
}

/* Per-task scratch: softmax of pooled scores (nb), the selected column and
 * diagonal sets (words each) and the query-aware score triangle
 * (nb (nb + 1) / 2). */
static size_t slot_size(int nb)
{
    const size_t words = (size_t)(nb + 63) / 64;
    return align64(sizeof(float) * (size_t)nb) + 2 * align64(sizeof(uint64_t) * words) +
           align64(sizeof(float) * ((size_t)nb * ((size_t)nb + 1) / 2));
}

kern_flex_ws *kern_flex_ws_create(int max_ctx, int n_heads, int n_kv_heads, int head_dim,
                                  int min_block_size, int n_threads)
{
    if (max_ctx < 1 || n_heads < 1 || n_kv_heads < 1 || n_heads % n_kv_heads != 0 || head_dim < 1 ||
        head_dim > KERN_ATTN_MAX_HEAD_DIM || min_block_size < KERN_FLEX_MIN_BLOCK ||
        min_block_size > KERN_FLEX_MAX_BLOCK || n_threads < 1 || n_threads > 1024)
        return NULL;
    kern_flex_ws *ws = calloc(1, sizeof(*ws));
    if (!ws)
        return NULL;
    ws->max_ctx = max_ctx;
    ws->n_heads = n_heads;
    ws->n_kv_heads = n_kv_heads;
    ws->head_dim = head_dim;
    ws->min_block = min_block_size;
    ws->n_threads = n_threads;
    ws->max_nb = ceil_div(max_ctx, min_block_size);
    ws->max_words = (ws->max_nb + 63) / 64;
    const size_t prof = (size_t)n_heads * (size_t)max_ctx;
    const size_t probe = kern_probe_scratch_floats(n_heads, head_dim, KERN_FLEX_MAX_BLOCK);
    const size_t kbar = (size_t)n_kv_heads * (size_t)ws->max_nb * (size_t)head_dim;
    const size_t pooled = (size_t)n_heads * (size_t)ws->max_nb;
    const size_t qbar = (size_t)n_heads * (size_t)head_dim, qtil = pooled * (size_t)head_dim;
    ws->n_bits = (size_t)n_heads * (size_t)ws->max_nb * (size_t)ws->max_words;
    ws->slot_bytes = slot_size(ws->max_nb);
    ws->vertical = malloc(sizeof(float) * prof);
    ws->slash = malloc(sizeof(float) * prof);
    ws->probe = malloc(sizeof(float) * probe);
    ws->kbar = malloc(sizeof(float) * kbar);
    ws->qbar = malloc(sizeof(float) * qbar);
    ws->qtil = malloc(sizeof(float) * qtil);
    ws->vb = malloc(sizeof(float) * pooled);
    ws->sb = malloc(sizeof(float) * pooled);
    ws->bits = malloc(sizeof(uint64_t) * ws->n_bits);
    ws->slots = aligned_alloc(64, ws->slot_bytes * (size_t)n_threads);
    ws->busy = calloc((size_t)n_threads, sizeof(atomic_int));
    ws->heads = calloc((size_t)n_heads, sizeof(kern_flex_head));
    if (!ws->heads || !ws->vertical || !ws->slash || !ws->probe || !ws->kbar || !ws->qbar ||
        !ws->qtil || !ws->vb || !ws->sb || !ws->bits || !ws->slots || !ws->busy) {
        kern_flex_ws_destroy(ws);
        return NULL;
    }
    for (int i = 0; i < n_threads; i++)
        atomic_init(&ws->busy[i], 0);
    ws->bytes = sizeof(*ws) + sizeof(float) * (2 * prof + probe + kbar + qbar + qtil + 2 * pooled) +
                sizeof(uint64_t) * ws->n_bits + ws->slot_bytes * (size_t)n_threads +
                sizeof(atomic_int) * (size_t)n_threads + sizeof(kern_flex_head) * (size_t)n_heads;
    return ws;
}

void kern_flex_ws_destroy(kern_flex_ws *ws)
{
    if (!ws)
        return;
    free(ws->vertical);
    free(ws->slash);
    free(ws->probe);
    free(ws->kbar);
    free(ws->qbar);
    free(ws->qtil);
    free(ws->vb);
    free(ws->sb);
    free(ws->bits);
    free(ws->slots);
    free(ws->busy);
    free(ws->heads);
    free(ws);
}

size_t kern_flex_ws_bytes(const kern_flex_ws *ws)
{
    return ws ? ws->bytes : 0;
}

int kern_flex_head_info(const kern_flex_ws *ws, int h, kern_flex_head *out)
{
    if (!ws || !out || h < 0 || h >= ws->n_heads_done)
        return KERN_SPARSE_EINVAL;
    *out = ws->heads[h];
    return KERN_SPARSE_OK;
}

static int slot_acquire(kern_flex_ws *ws)
{
    for (;;)
        for (int i = 0; i < ws->n_threads; i++)
            if (!atomic_exchange_explicit(&ws->busy[i], 1, memory_order_acquire))
                return i;
}

static void slot_release(kern_flex_ws *ws, int i)
{
    atomic_store_explicit(&ws->busy[i], 0, memory_order_release);
}

/* ---- selecting by mass and by rank ---- */

static float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double sum_above(const float *x, long n, float t, long *count)
{
    double s = 0.0;
    long c = 0;
#pragma omp simd reduction(+ : s, c)
    for (long i = 0; i < n; i++) {
        const int above = x[i] > t;
        s += above ? (double)x[i] : 0.0;
        c += above;
    }
    *count = c;
    return s;
}

static long count_above(const float *x, long n, float t)
{
    long c = 0;
#pragma omp simd reduction(+ : c)
    for (long i = 0; i < n; i++)
        c += x[i] > t;
    return c;
}

/* The largest values of x (non-negative) whose running sum in descending order
 * stays <= budget. Returns their number; every x > *thr is among them, plus the
 * first *ties (by index) of the values equal to *thr. */
static long top_mass(const float *x, long n, double budget, float *thr, long *ties)
{
    uint32_t lo = 0, hi = 0x7f800000u; /* 0 .. +inf; sum_above(+inf) is 0 */
    long cnt;
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (sum_above(x, n, bits_to_float(mid), &cnt) <= budget)
            hi = mid;
        else
            lo = mid + 1;
    }
    const float t = bits_to_float(lo);
    const double s = sum_above(x, n, t, &cnt);
    long eq = 0;
    for (long i = 0; i < n; i++)
        eq += x[i] == t;
    long fit = eq;
    if (t > 0.0f && !isinf(t)) {
        const double room = floor((budget - s) / (double)t);
        fit = room < (double)eq ? (long)(room > 0.0 ? room : 0.0) : eq;
    } else if (isinf(t)) {
        fit = 0;
    }
    *thr = t;
    *ties = fit;
    return cnt + fit;
}

/* Marks in sel (bitset over n) the k largest values of x, ties by lower index. */
static void top_k_mark(const float *x, int n, int k, uint64_t *sel)
{
    memset(sel, 0, sizeof(uint64_t) * (size_t)((n + 63) / 64));
    if (k <= 0)
        return;
    if (k > n)
        k = n;
    uint32_t lo = 0, hi = 0x7f800000u;
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (count_above(x, n, bits_to_float(mid)) <= k)
            hi = mid;
        else
            lo = mid + 1;
    }
    const float t = bits_to_float(lo);
    int left = k;
    for (int i = 0; i < n; i++)
        if (x[i] > t) {
            sel[i / 64] |= (uint64_t)1 << (i % 64);
            left--;
        }
    for (int i = 0; i < n && left > 0; i++)
        if (x[i] == t) {
            sel[i / 64] |= (uint64_t)1 << (i % 64);
            left--;
        }
}

/* ---- per-layer steps ---- */

/* K block means per kv head; a partial last block over its real tokens. */
static void kbar_task(void *ctx, int kvh, int n_tasks)
{
    const estimate_job *j = ctx;
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, n = a->ctx_len;
    for (int c = 0; c < j->nb; c++) {
        float *kb = j->est->kbar + ((size_t)kvh * j->nb + c) * hd;
        memset(kb, 0, sizeof(float) * (size_t)hd);
        const int j0 = c * j->B, j1 = imin(j0 + j->B, n);
        for (int t = j0; t < j1; t++) {
            const float *k = a->k + kern_attn_row(a, t) * a->kv_stride + (size_t)kvh * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++)
                kb[d] += k[d];
        }
        const float inv = 1.0f / (float)(j1 - j0);
        for (int d = 0; d < hd; d++)
            kb[d] *= inv;
    }
}

static float dot(const float *x, const float *y, int n)
{
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++)
        s += x[i] * y[i];
    return s;
}

/* Mean of query rows [r0, r1) of head h, scaled by 1/sqrt(D). */
static void query_mean(const estimate_job *j, int h, int r0, int r1, float *out)
{
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim;
    memset(out, 0, sizeof(float) * (size_t)hd);
    for (int r = r0; r < r1; r++) {
        const float *q = a->q + ((size_t)r * a->n_heads + h) * hd;
#pragma omp simd
        for (int d = 0; d < hd; d++)
            out[d] += q[d];
    }
    const float f = j->scale / (float)(r1 - r0);
    for (int d = 0; d < hd; d++)
        out[d] *= f;
}

/* Head h's query means: the probe rows (the last B of the chunk) and every
 * query block's rows inside the chunk. */
static void qmean_task(void *ctx, int h, int n_tasks)
{
    const estimate_job *j = ctx;
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, q_first = a->ctx_len - a->n_q;
    query_mean(j, h, a->n_q - j->B, a->n_q, j->est->qbar + (size_t)h * hd);
    for (int i = 0; i < j->n_qblocks; i++) {
        const int r = j->q_block0 + i;
        const int p0 = imax(r * j->B, q_first), p1 = imin((r + 1) * j->B, a->ctx_len);
        query_mean(j, h, p0 - q_first, p1 - q_first,
                   j->est->qtil + ((size_t)h * j->n_qblocks + i) * hd);
    }
}

double kern_flex_js_distance(const float *p, const float *q, int n)
{
    double js = 0.0;
    for (int i = 0; i < n; i++) {
        const double x = p[i], y = q[i], m = 0.5 * (x + y);
        if (x > 0.0)
            js += 0.5 * x * log(x / m);
        if (y > 0.0)
            js += 0.5 * y * log(y / m);
    }
    return sqrt(js > 0.0 ? js : 0.0);
}

/* Step 5: is head h query-aware? Normalizes vb in place (it sums to 1 up to
 * rounding; ranks are unchanged) and leaves softmax(qbar . kbar) in ahat. */
static int head_is_query_aware(const flex_job *j, int h, float *vb, float *ahat, float *d_js)
{
    const kern_attn_args *a = j->a;
    const int hd = a->head_dim, kvh = h / (a->n_heads / a->n_kv_heads);
    const float *qbar = j->est.qbar + (size_t)h * hd;
    float mx = -INFINITY;
    for (int c = 0; c < j->nb; c++) {
        ahat[c] = dot(qbar, j->est.kbar + ((size_t)kvh * j->nb + c) * hd, hd);
        mx = fmaxf(mx, ahat[c]);
    }
    double sum = 0.0, vsum = 0.0;
    for (int c = 0; c < j->nb; c++) {
        ahat[c] = expf(ahat[c] - mx);
        sum += ahat[c];
        vsum += vb[c];
    }
    for (int c = 0; c < j->nb; c++) {
        ahat[c] = (float)(ahat[c] / sum);
        vb[c] = vsum > 0.0 ? (float)(vb[c] / vsum) : 0.0f;
    }
    const double d = kern_flex_js_distance(ahat, vb, j->nb);
    *d_js = (float)d;
    return d < (double)j->p->tau;
}

/* Step 7: adds the blocks of the pooled-score triangle kept within gamma * rows. */
static void add_query_aware_blocks(const flex_job *j, int h, float *tri)
{
    const kern_attn_args *a = j->a;
    const kern_block_mask *m = j->mask;
    const int hd = a->head_dim, kvh = h / (a->n_heads / a->n_kv_heads);
    long n = 0;
    for (int i = 0; i < m->n_qblocks; i++) {
        const int r = m->q_block0 + i;
        const float *qt = j->est.qtil + ((size_t)h * m->n_qblocks + i) * hd;
        float *row = tri + n, mx = -INFINITY;
        for (int c = 0; c <= r; c++) {
            row[c] = dot(qt, j->est.kbar + ((size_t)kvh * j->nb + c) * hd, hd);
            mx = fmaxf(mx, row[c]);
        }
        double sum = 0.0;
        for (int c = 0; c <= r; c++) {
            row[c] = expf(row[c] - mx);
            sum += row[c];
        }
        for (int c = 0; c <= r; c++)
            row[c] = (float)(row[c] / sum);
        n += r + 1;
    }
    float thr;
    long ties;
    top_mass(tri, n, (double)j->p->gamma * m->n_qblocks, &thr, &ties);
    long e = 0;
    for (int i = 0; i < m->n_qblocks; i++) {
        const int r = m->q_block0 + i;
        for (int c = 0; c <= r; c++, e++) {
            const float x = tri[e];
            if (x > thr || (x == thr && ties-- > 0))
                kern_block_mask_set(j->mask, h, r, c);
        }
    }
}

/* Writes head h's rows: every column in vsel and every diagonal in ssel. */
static void write_vertical_slash(const flex_job *j, int h, const uint64_t *vsel,
                                 const uint64_t *ssel)
{
    const kern_block_mask *m = j->mask;
    for (int i = 0; i < m->n_qblocks; i++) {
        const int r = m->q_block0 + i;
        uint64_t *row = kern_block_mask_row(m, h, r);
        for (int w = 0; w < m->words; w++) {
            const int lo = 64 * w;
            const uint64_t causal = r >= lo + 63 ? ~(uint64_t)0
                                    : r >= lo    ? ((uint64_t)2 << (r - lo)) - 1
                                                 : 0;
            row[w] = vsel[w] & causal;
        }
        for (int w = 0; w <= r / 64; w++)
            for (uint64_t b = ssel[w]; b; b &= b - 1) {
                const int d = 64 * w + __builtin_ctzll(b);
                if (d <= r)
                    row[(r - d) / 64] |= (uint64_t)1 << ((r - d) % 64);
            }
    }
}

static void head_task(void *ctx, int h, int n_tasks)
{
    flex_job *j = ctx;
    kern_flex_ws *ws = j->ws;
    const int n = j->a->ctx_len, B = j->B, nb = j->nb;
    const int slot = slot_acquire(ws);
    unsigned char *base = ws->slots + (size_t)slot * ws->slot_bytes;
    const size_t words = (size_t)(nb + 63) / 64;
    float *ahat = (float *)(void *)base;
    uint64_t *vsel = (uint64_t *)(void *)(base + align64(sizeof(float) * (size_t)nb));
    uint64_t *ssel = vsel + align64(sizeof(uint64_t) * words) / sizeof(uint64_t);
    float *tri = (float *)(void *)((unsigned char *)ssel + align64(sizeof(uint64_t) * words));

    const float *v = j->est.vertical + (size_t)h * n, *s = j->est.slash + (size_t)h * n;
    float *vb = ws->vb + (size_t)h * ws->max_nb, *sb = ws->sb + (size_t)h * ws->max_nb;
    /* Step 4: block pooling, columns by position and diagonals by distance. */
    for (int c = 0; c < nb; c++) {
        double sv = 0.0, ss = 0.0;
        for (int t = c * B; t < imin((c + 1) * B, n); t++) {
            sv += v[t];
            ss += s[t];
        }
        vb[c] = (float)sv;
        sb[c] = (float)ss;
    }
    /* Step 3: budgets from the cumulative mass. */
    float thr;
    long ties;
    const long cnt_v = top_mass(v, n, j->p->gamma, &thr, &ties) + 1;
    const long cnt_s = top_mass(s, n, j->p->gamma, &thr, &ties) + 1;
    int nvb = (int)(cnt_v / B) + 1, nsb = (int)(cnt_s / B) + 1;
    nvb = imin(imax(nvb, j->minB), j->maxB);
    nsb = imin(imax(nsb, j->minB), j->maxB);
    /* Step 5: pattern decision. */
    float d_js;
    const int query_aware = head_is_query_aware(j, h, vb, ahat, &d_js);
    if (query_aware) {
        nvb = nsb = imin(j->minB, j->maxB);
        atomic_fetch_add(&j->n_query_aware, 1);
    }
    /* Step 6: vertical-slash blocks; the sink column and the diagonal always. */
    vb[0] = INFINITY;
    sb[0] = INFINITY;
    top_k_mark(vb, nb, nvb, vsel);
    top_k_mark(sb, nb, nsb, ssel);
    write_vertical_slash(j, h, vsel, ssel);
    ws->heads[h] = (kern_flex_head){nvb, nsb, query_aware, d_js};
    /* Step 7. */
    if (query_aware)
        add_query_aware_blocks(j, h, tri);
    slot_release(ws, slot);
}

/* Spec 1.3 flag: every head of a group computes the union of the group's sets.
 * Rows are merged in place: list kvh's rows never lie past its sources. */
static void merge_groups(kern_block_mask *m, int n_heads, int n_kv_heads)
{
    const int group = n_heads / n_kv_heads;
    for (int kvh = 0; kvh < n_kv_heads; kvh++)
        for (int i = 0; i < m->n_qblocks; i++) {
            const int r = m->q_block0 + i;
            uint64_t *dst = m->bits + ((size_t)kvh * m->n_qblocks + i) * m->words;
            for (int w = 0; w < m->words; w++) {
                uint64_t x = 0;
                for (int g = 0; g < group; g++)
                    x |= kern_block_mask_row(m, kvh * group + g, r)[w];
                dst[w] = x;
            }
        }
    m->n_lists = n_kv_heads;
}

static int check_args(const kern_attn_args *a)
{
    if (!a || !a->q || !a->k || !a->v || !a->out || a->n_q < 1 || a->ctx_len < a->n_q ||
        a->n_heads < 1 || a->n_kv_heads < 1 || a->n_heads % a->n_kv_heads != 0 || a->head_dim < 1 ||
        a->head_dim > KERN_ATTN_MAX_HEAD_DIM || (long)a->n_kv_heads * a->head_dim > a->kv_stride ||
        (a->blocks && a->block_size < 1))
        return KERN_SPARSE_EINVAL;
    return KERN_SPARSE_OK;
}

static void dense_result(kern_flex_result *res, kern_flex_path path, const kern_attn_args *a, int B)
{
    res->path = path;
    int64_t causal = 0;
    for (int r = (a->ctx_len - a->n_q) / B; r < ceil_div(a->ctx_len, B); r++)
        causal += r + 1;
    res->blocks.causal = causal * a->n_heads;
    res->blocks.computed = res->blocks.causal;
    res->density = 1.0;
}

kern_flex_path kern_flexprefill_path(const kern_attn_args *a, const kern_flex_params *p)
{
    const int B = p->block_size;
    const int minB = p->min_budget > 0 ? ceil_div(p->min_budget, B) : 1;
    if (a->n_q == 1)
        return KERN_FLEX_DENSE_DECODE;
    if (a->ctx_len <= 2 * B || (long)a->ctx_len <= (long)minB * B)
        return KERN_FLEX_DENSE_SHORT;
    if (a->n_q < a->ctx_len && a->n_q <= 2 * B)
        return KERN_FLEX_DENSE_SHORT_CHUNK;
    return KERN_FLEX_SPARSE;
}

kern_flex_estimate_len kern_flex_estimate_lengths(const kern_attn_args *a, int block_size)
{
    const size_t nb = (size_t)ceil_div(a->ctx_len, block_size);
    const size_t nqb = nb - (size_t)((a->ctx_len - a->n_q) / block_size);
    const size_t hd = (size_t)a->head_dim, nh = (size_t)a->n_heads;
    return (kern_flex_estimate_len){.vertical = nh * (size_t)a->ctx_len,
                                    .slash = nh * (size_t)a->ctx_len,
                                    .kbar = (size_t)a->n_kv_heads * nb * hd,
                                    .qbar = nh * hd,
                                    .qtil = nh * nqb * hd};
}

/* Whether a selection of a's shape on a grid of B fits ws. */
static int fits(const kern_flex_ws *ws, const kern_attn_args *a, int B)
{
    return a->ctx_len <= ws->max_ctx && B >= ws->min_block && a->n_heads <= ws->n_heads &&
           a->n_kv_heads <= ws->n_kv_heads && a->head_dim <= ws->head_dim;
}

int kern_flex_ws_estimate(kern_flex_ws *ws, const kern_attn_args *a, int block_size,
                          kern_flex_estimate *est)
{
    if (!ws || !est || check_args(a) != KERN_SPARSE_OK || block_size < KERN_FLEX_MIN_BLOCK ||
        block_size > KERN_FLEX_MAX_BLOCK)
        return KERN_SPARSE_EINVAL;
    if (!fits(ws, a, block_size))
        return KERN_SPARSE_ENOSPC;
    *est = (kern_flex_estimate){ws->vertical, ws->slash, ws->kbar, ws->qbar, ws->qtil};
    return KERN_SPARSE_OK;
}

int kern_flex_estimate_f32(kern_pool *pool, const kern_attn_args *a, int block_size,
                           const kern_flex_estimate *est, float *scratch)
{
    if (check_args(a) != KERN_SPARSE_OK || !est || !scratch || block_size < KERN_FLEX_MIN_BLOCK ||
        block_size > KERN_FLEX_MAX_BLOCK || a->n_q < block_size)
        return KERN_SPARSE_EINVAL;
    estimate_job j = {.a = a, .est = est, .B = block_size};
    j.nb = ceil_div(a->ctx_len, j.B);
    j.q_block0 = (a->ctx_len - a->n_q) / j.B;
    j.n_qblocks = j.nb - j.q_block0;
    j.scale = 1.0f / sqrtf((float)a->head_dim);
    const int rc =
        kern_attention_probe_profiles_f32(pool, a, j.B, est->vertical, est->slash, scratch);
    if (rc != KERN_SPARSE_OK)
        return rc;
    kern_pool_run(pool, kbar_task, &j, a->n_kv_heads);
    kern_pool_run(pool, qmean_task, &j, a->n_heads);
    return KERN_SPARSE_OK;
}

/* Steps 0-7; the estimate is computed here from a (compute) or is already in
 * ws (copied there by the caller). */
static int select_blocks(kern_pool *pool, const kern_attn_args *a, const kern_flex_params *p,
                         kern_flex_ws *ws, kern_block_mask *mask, kern_flex_result *res,
                         int compute)
{
    if (check_args(a) != KERN_SPARSE_OK || !ws || !mask || !res ||
        kern_flex_params_check(p, NULL, 0) != KERN_SPARSE_OK)
        return KERN_SPARSE_EINVAL;
    if (!fits(ws, a, p->block_size) || kern_pool_size(pool) > ws->n_threads)
        return KERN_SPARSE_ENOSPC;
    memset(res, 0, sizeof(*res));
    ws->n_heads_done = 0;
    flex_job j = {.a = a, .p = p, .ws = ws, .mask = mask, .B = p->block_size};
    j.nb = ceil_div(a->ctx_len, j.B);
    j.minB = p->min_budget > 0 ? ceil_div(p->min_budget, j.B) : 1;
    j.maxB = p->max_budget > 0 ? imin(ceil_div(p->max_budget, j.B), j.nb) : j.nb;
    atomic_init(&j.n_query_aware, 0);
    /* Step 0: dense dispatch. */
    const kern_flex_path path = kern_flexprefill_path(a, p);
    if (path != KERN_FLEX_SPARSE) {
        dense_result(res, path, a, j.B);
        return KERN_SPARSE_OK;
    }
    res->path = KERN_FLEX_SPARSE;
    res->chunked = a->n_q < a->ctx_len;
    int rc = kern_block_mask_init(mask, ws->bits, ws->n_bits, j.B, a->n_heads, a->ctx_len, a->n_q);
    if (rc != KERN_SPARSE_OK)
        return rc;
    if (p->gamma >= 1.0f) {
        kern_block_mask_fill_causal(mask);
    } else {
        kern_flex_ws_estimate(ws, a, j.B, &j.est);
        if (compute && (rc = kern_flex_estimate_f32(pool, a, j.B, &j.est, ws->probe)) != 0)
            return rc;
        kern_pool_run(pool, head_task, &j, a->n_heads);
        ws->n_heads_done = a->n_heads;
        if (p->gqa_union)
            merge_groups(mask, a->n_heads, a->n_kv_heads);
    }
    res->n_query_aware = atomic_load(&j.n_query_aware);
    kern_block_mask_stats(mask, a->n_heads, &res->blocks);
    res->density = kern_sparse_density(&res->blocks);
    return KERN_SPARSE_OK;
}

int kern_flexprefill_select(kern_pool *pool, const kern_attn_args *a, const kern_flex_params *p,
                            kern_flex_ws *ws, kern_block_mask *mask, kern_flex_result *res)
{
    return select_blocks(pool, a, p, ws, mask, res, 1);
}

int kern_flexprefill_select_estimated(kern_pool *pool, const kern_attn_args *a,
                                      const kern_flex_params *p, kern_flex_ws *ws,
                                      kern_block_mask *mask, kern_flex_result *res)
{
    return select_blocks(pool, a, p, ws, mask, res, 0);
}

int kern_flexprefill_attention_f32(kern_pool *pool, const kern_attn_args *a,
                                   const kern_flex_params *p, kern_flex_ws *ws,
                                   kern_flex_result *res)
{
    kern_block_mask mask;
    const int rc = kern_flexprefill_select(pool, a, p, ws, &mask, res);
    if (rc != KERN_SPARSE_OK)
        return rc;
    if (res->path != KERN_FLEX_SPARSE) {
        kern_attention_f32(pool, a);
        return KERN_SPARSE_OK;
    }
    return kern_attention_block_sparse_f32(pool, a, &mask);
}
