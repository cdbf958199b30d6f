/*
 * kv_compress.c - compressed KV caches of one sequence (int8, int4, zip).
 *
 * research/sparse-kv-spec.md sections 3 and 4; the kernels are in
 * kernels/cpu/kv_quant.c and attention_quant.c.
 *
 * Memory. Compressed pages are cut out of pool blocks: a block given to one
 * page format holds n_sub pages of `slots` tokens each (page_geom: about 16
 * tokens per page; the K pages in the block's K region, the V pages in its V
 * region, each page 16-byte aligned). The scheduler's slab
 * (scheduler/kv_slab.c) hands pages of any block to any sequence, so the pool
 * budget in bytes decides how many tokens of each format exist, at the
 * granularity of one page. Page ids are block * RT_KVQ_SUB + index. Pages are
 * private to the sequence (never in the prefix cache; prefix blocks it reused
 * stay fp for others).
 *
 * int8 / int4 ("direct"): every step packs its new K and V rows straight
 * from the step's scratch into ordered pages (page i of the class holds
 * positions [i*B, i*B + B)); nothing of such a sequence is ever written as
 * f32 to the pool, so it holds no f32 tail and no whole-prompt peak.
 * Prefix-cache hits are the exception: those positions sit in shared fp
 * blocks and are packed (copied) by the sequence's first step. Attention of
 * a long chunk dequantizes the earlier positions into a per-rank workspace
 * and runs the exact (or sparse) prefill kernel over it with the chunk's own
 * f32 rows (as llama.cpp does with a quantized cache, later chunks see the
 * earlier ones quantized); short steps walk the pages with the fused kernel.
 *
 * zip: class 0 holds the salient tokens at high_bits, class 1 the rest at
 * low_bits, as unordered sets (RoPE is inside K, and every cached token
 * precedes every query row); per kv head the sets differ. The prompt stays
 * f32 in fp blocks until its last chunk (saliency needs the probe rows of the
 * whole prompt; the spec's peak), then is packed. Decode tokens go to class
 * 2, an int8 tail of ordered pages (a deviation: the spec keeps an fp16
 * tail; int8 costs 3.8x less than f32 here and adds an error far below the
 * 4/2-bit one); when the tail reaches flush_tokens, it is dequantized, scored
 * with the flushing step's query (the reference's choice) and packed into
 * classes 0 and 1 with the prompt's statistics (KERN_KVQ_STATS_PROMPT: a
 * documented deviation so flushes can be small), and the tail's pages are
 * refilled from the start.
 *
 * Tensor parallelism: the zip value pages keep one (min, delta) pair per
 * token across all kv heads, which ranks holding different heads cannot
 * share; compressed caches need tp == 1 (rt_kvq_check says so).
 */
#include "runtime/model_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ERR(...) (snprintf(err, errlen, __VA_ARGS__), -1)

enum { CLS_HI = 0, CLS_LO = 1, CLS_TAIL = 2 };

/* How a format's pages sit in pool blocks. */
typedef struct {
    int n_sub, slots;        /* pages per block, tokens per page */
    size_t kstride, vstride; /* bytes from one page of a block to the next, K and V regions */
} page_geom;

typedef struct {
    kern_kvq_fmt fmt;
    kern_kvq_geom g; /* block_size: slots per page */
    page_geom pg;
    int32_t *ids; /* pages held, in fill order (block * RT_KVQ_SUB + index) */
    int n_pages, cap;
    int n_tokens; /* tokens in the class; pages fill in order, every page but the last is full */
} kvq_class;

struct rt_kvq {
    const rt_model *m;
    rt_kv_pool *pool;
    rt_kv_policy pol;
    kern_kvq_policy kp;
    bool zip;
    int n_classes;
    kvq_class cls[RT_KVQ_MAX_CLASSES];
    kern_kvq_geom g_fp; /* the pool's own geometry */
    int L;              /* prompt length (with generated tokens when recomputing) */
    uint64_t seed;
    kern_kvq_seq_state st;
    /* the step in progress */
    bool in_step;
    bool last_prefill;
    bool direct; /* the step's new rows stay in the scratch (never in fp blocks) */
    int step_n_past, step_n_new;
    kern_kvq_plan plan;
    int add[RT_KVQ_MAX_CLASSES]; /* tokens each class receives in this step */
    bool flush;                  /* zip: this step empties the tail into classes 0 and 1 */
    /* zip */
    float *stats;  /* [n_layers][2][KERN_KVQ_STATS_FLOATS(kv_dim)] */
    float *colsum; /* [n_layers][H * L] prompt probe sums; freed after compression */
    float *window; /* [H * flush_tokens] a flush's window sums (one layer at a time) */
    int32_t *probes;
    int n_probes;
    float *scores;  /* [H * max(L, flush)] */
    int32_t *order; /* [H * max(L, flush)] */
    float *qbuf;    /* [max(n_probes, 1) * n_heads * head_dim] gathered probe rows */
    int32_t *qpos;
    float *lse; /* [n_heads] */
    kern_kvq_page *pages;
    int pages_cap;
};

const char *rt_kv_format_name(rt_kv_format f)
{
    switch (f) {
    case RT_KV_FP:
        return "fp";
    case RT_KV_INT8:
        return "int8";
    case RT_KV_INT4:
        return "int4";
    case RT_KV_ZIP:
        return "zip";
    default:
        return "?";
    }
}

/* Largest slot count whose K and V pages fit a pool block's region. */
static int page_slots(kern_kvq_fmt fmt, const rt_kv_pool *pool)
{
    const size_t region = (size_t)pool->block_size * (size_t)pool->kv_dim * sizeof(float);
    const int hd = pool->kv_dim / (pool->n_kv_heads > 0 ? pool->n_kv_heads : 1);
    int lo = 0, hi = KERN_KVQ_MAX_BLOCK_SIZE;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        const kern_kvq_geom g = {pool->n_kv_heads, hd, mid};
        const size_t kb = kern_kvq_page_bytes(fmt, KERN_KVQ_K, &g);
        const size_t vb = kern_kvq_page_bytes(fmt, KERN_KVQ_V, &g);
        if (kb && vb && kb <= region && vb <= region)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static void class_formats(const rt_kv_policy *p, kern_kvq_fmt *hi, kern_kvq_fmt *lo)
{
    switch (p->format) {
    case RT_KV_INT8:
        *hi = *lo = KERN_KVQ_Q8;
        return;
    case RT_KV_INT4:
        *hi = *lo = KERN_KVQ_Q4;
        return;
    case RT_KV_ZIP:
        *hi = kern_kvq_zip_fmt(p->high_bits);
        *lo = kern_kvq_zip_fmt(p->low_bits);
        return;
    default:
        *hi = *lo = KERN_KVQ_F32;
    }
}

static size_t round16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* About 16 tokens per page: as many pages per block as whole 16-token pages
 * fit, then the largest page size whose n_sub aligned K and V pages fit the
 * block's regions. n_sub == 0 when not even one slot fits. */
static page_geom geom_of(kern_kvq_fmt fmt, const rt_kv_pool *pool)
{
    page_geom pg = {0, 0, 0, 0};
    const size_t region = (size_t)pool->block_size * (size_t)pool->kv_dim * sizeof(float);
    const int hd = pool->kv_dim / (pool->n_kv_heads > 0 ? pool->n_kv_heads : 1);
    const int whole = page_slots(fmt, pool);
    if (whole < 1)
        return pg;
    int n_sub = whole / 16;
    n_sub = n_sub < 1 ? 1 : n_sub > RT_KVQ_SUB ? RT_KVQ_SUB : n_sub;
    for (; n_sub >= 1; n_sub--)
        for (int slots = whole / n_sub; slots >= 1; slots--) {
            const kern_kvq_geom g = {pool->n_kv_heads, hd, slots};
            const size_t kb = round16(kern_kvq_page_bytes(fmt, KERN_KVQ_K, &g));
            const size_t vb = round16(kern_kvq_page_bytes(fmt, KERN_KVQ_V, &g));
            if (kb && vb && kb * (size_t)n_sub <= region && vb * (size_t)n_sub <= region)
                return (page_geom){n_sub, slots, kb, vb};
        }
    return pg;
}

static kern_kvq_fmt class_fmt(const rt_kv_policy *p, int c)
{
    kern_kvq_fmt hi, lo;
    class_formats(p, &hi, &lo);
    return c == CLS_HI ? hi : c == CLS_LO ? lo : KERN_KVQ_Q8;
}

int rt_kvq_n_classes_of(const rt_kv_policy *p)
{
    return !p || p->format == RT_KV_FP ? 0 : p->format == RT_KV_ZIP ? 3 : 1;
}

int rt_kvq_class_geom(const rt_kv_pool *pool, const rt_kv_policy *p, int c, int *fmt, int *n_sub,
                      int *slots)
{
    if (!pool || c < 0 || c >= rt_kvq_n_classes_of(p))
        return -1;
    const kern_kvq_fmt f = class_fmt(p, c);
    if (f == KERN_KVQ_N_FMT)
        return -1;
    const page_geom pg = geom_of(f, pool);
    if (pg.n_sub < 1)
        return -1;
    if (fmt)
        *fmt = (int)f;
    if (n_sub)
        *n_sub = pg.n_sub;
    if (slots)
        *slots = pg.slots;
    return 0;
}

bool rt_kv_policy_fp_prompt(const rt_kv_policy *p)
{
    return !p || p->format == RT_KV_FP || p->format == RT_KV_ZIP;
}

int rt_kvq_flush_tokens(const rt_kv_pool *pool, const rt_kv_policy *p)
{
    const int bs = pool->block_size;
    int f = p->flush_tokens > 0 ? p->flush_tokens : bs;
    return (f + bs - 1) / bs * bs;
}

int rt_kvq_check(const rt_model *m, const rt_kv_pool *pool, const rt_kv_policy *p, char *err,
                 size_t errlen)
{
    if (!p || p->format == RT_KV_FP)
        return 0;
    if (p->format < 0 || p->format >= RT_KV_N_FORMATS)
        return ERR("unknown KV cache format %d", (int)p->format);
    if (m->tp > 1)
        return ERR("compressed KV caches (%s) need tensor_parallel 1, the model runs on %d ranks",
                   rt_kv_format_name(p->format), m->tp);
    if (pool->cuda)
        return ERR("compressed KV caches (%s) run on the CPU backend only; this model runs on "
                   "CUDA",
                   rt_kv_format_name(p->format));
    const int hd = m->hp.head_dim;
    const kern_kvq_geom g = {m->hp.n_kv_heads, hd, pool->block_size};
    char why[160];
    if (kern_kvq_geom_check(&g, why, sizeof(why)) != 0)
        return ERR("compressed KV caches do not fit this model: %s", why);
    kern_kvq_fmt hi, lo;
    class_formats(p, &hi, &lo);
    if (hi == KERN_KVQ_N_FMT || lo == KERN_KVQ_N_FMT)
        return ERR("zip bits must be 8, 4 or 2 (high %d, low %d)", p->high_bits, p->low_bits);
    if (p->format == RT_KV_ZIP && !(p->salient_fraction >= 0.0f && p->salient_fraction <= 1.0f))
        return ERR("zip salient_fraction must be in [0, 1]");
    for (int c = 0; c < rt_kvq_n_classes_of(p); c++)
        if (geom_of(class_fmt(p, c), pool).n_sub < 1)
            return ERR("a compressed page does not fit a KV block of %d tokens", pool->block_size);
    return 0;
}

int rt_kvq_block_tokens(const rt_kv_pool *pool, const rt_kv_policy *p, int cls)
{
    if (!p || p->format == RT_KV_FP)
        return pool->block_size;
    const page_geom pg = geom_of(class_fmt(p, cls), pool);
    return pg.n_sub * pg.slots;
}

double rt_kvq_bytes_per_token(const rt_kv_pool *pool, const rt_kv_policy *p)
{
    const double block_bytes =
        2.0 * pool->n_layers * (double)pool->block_size * pool->kv_dim * sizeof(float);
    if (!p || p->format == RT_KV_FP)
        return block_bytes / pool->block_size;
    if (p->format != RT_KV_ZIP)
        return block_bytes / rt_kvq_block_tokens(pool, p, 0);
    const double f = p->salient_fraction;
    return f * block_bytes / rt_kvq_block_tokens(pool, p, 0) +
           (1.0 - f) * block_bytes / rt_kvq_block_tokens(pool, p, 1);
}

void rt_kvq_destroy(rt_kvq *q)
{
    if (!q)
        return;
    for (int c = 0; c < RT_KVQ_MAX_CLASSES; c++)
        free(q->cls[c].ids);
    free(q->stats);
    free(q->colsum);
    free(q->window);
    free(q->probes);
    free(q->scores);
    free(q->order);
    free(q->qbuf);
    free(q->qpos);
    free(q->lse);
    free(q->pages);
    free(q);
}

rt_kvq *rt_kvq_create(const rt_model *m, rt_kv_pool *pool, const rt_kv_policy *p, int prompt_len,
                      int n_cached, uint64_t seed, char *err, size_t errlen)
{
    if (!p || p->format == RT_KV_FP) {
        snprintf(err, errlen, "fp needs no compressed cache");
        return NULL;
    }
    if (rt_kvq_check(m, pool, p, err, errlen) != 0)
        return NULL;
    if (prompt_len < 1 || n_cached < 0 || n_cached >= prompt_len) {
        snprintf(err, errlen, "prompt length %d with %d cached tokens", prompt_len, n_cached);
        return NULL;
    }
    rt_kvq *q = calloc(1, sizeof(*q));
    if (!q) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    const rt_hparams *hp = &m->hp;
    const int H = hp->n_kv_heads, hd = hp->head_dim, kvd = H * hd;
    q->m = m;
    q->pool = pool;
    q->pol = *p;
    q->L = prompt_len;
    q->seed = seed;
    q->st.n_tokens = n_cached; /* prefix-cache hits: already in fp blocks */
    q->g_fp = (kern_kvq_geom){H, hd, pool->block_size};
    kern_kvq_fmt hi, lo;
    class_formats(p, &hi, &lo);
    const bool zip = p->format == RT_KV_ZIP;
    q->zip = zip;
    q->n_classes = rt_kvq_n_classes_of(p);
    for (int c = 0; c < q->n_classes; c++) {
        kvq_class *k = &q->cls[c];
        k->fmt = class_fmt(p, c);
        k->pg = geom_of(k->fmt, pool);
        k->g = (kern_kvq_geom){H, hd, k->pg.slots};
    }
    q->kp = (kern_kvq_policy){
        .high = hi,
        .low = lo,
        .salient_fraction = zip ? p->salient_fraction : 1.0f,
        .block_size = pool->block_size,
        .flush_tokens = rt_kvq_flush_tokens(pool, p),
        .saliency = KERN_KVQ_SAL_CURRENT,
        .stats = KERN_KVQ_STATS_PROMPT,
        .prompt_norm = KERN_KVQ_NORM_CAUSAL_ROWS,
        .head_shared = false,
    };
    if (kern_kvq_policy_check(&q->kp, err, errlen) != 0) {
        rt_kvq_destroy(q);
        return NULL;
    }
    bool ok = true;
    q->lse = malloc(sizeof(float) * (size_t)hp->n_heads);
    ok = ok && q->lse;
    if (zip) {
        const size_t sf = KERN_KVQ_STATS_FLOATS(kvd);
        const int wmax = prompt_len > q->kp.flush_tokens ? prompt_len : q->kp.flush_tokens;
        q->n_probes = kern_kvq_probe_count(prompt_len);
        q->stats = calloc((size_t)hp->n_layers * 2 * sf, sizeof(float));
        q->colsum = calloc((size_t)hp->n_layers * H * (size_t)prompt_len, sizeof(float));
        q->window = calloc((size_t)H * (size_t)q->kp.flush_tokens, sizeof(float));
        q->probes = malloc(sizeof(int32_t) * (size_t)(q->n_probes > 0 ? q->n_probes : 1));
        q->scores = malloc(sizeof(float) * (size_t)H * (size_t)wmax);
        q->order = malloc(sizeof(int32_t) * (size_t)H * (size_t)wmax);
        q->qbuf = malloc(sizeof(float) * (size_t)(q->n_probes > 0 ? q->n_probes : 1) *
                         (size_t)hp->n_heads * (size_t)hd);
        q->qpos = malloc(sizeof(int32_t) * (size_t)(q->n_probes > 0 ? q->n_probes : 1));
        ok = ok && q->stats && q->colsum && q->window && q->probes && q->scores && q->order &&
             q->qbuf && q->qpos;
        if (ok)
            kern_kvq_probe_rows(q->probes, prompt_len, seed);
    }
    if (!ok) {
        snprintf(err, errlen, "out of memory for the compressed KV state");
        rt_kvq_destroy(q);
        return NULL;
    }
    return q;
}

/* Tokens each class receives when the plan compresses n tokens. */
static void split_counts(const rt_kvq *q, int n, int add[RT_KVQ_MAX_CLASSES])
{
    add[CLS_HI] = add[CLS_LO] = add[CLS_TAIL] = 0;
    if (!q->zip) {
        add[CLS_HI] = n;
        return;
    }
    add[CLS_HI] = kern_kvq_salient_count(n, q->kp.salient_fraction);
    add[CLS_LO] = n - add[CLS_HI];
}

/* What a step of n_new tokens at n_past does: whether its rows stay out of
 * fp blocks, the zip plan, and the tokens each class receives. */
typedef struct {
    bool direct, last, flush;
    kern_kvq_plan plan;
    int add[RT_KVQ_MAX_CLASSES];
} step_shape;

static step_shape shape_of(const rt_kvq *q, int n_new)
{
    step_shape sh = {0};
    sh.last = !q->st.prompt_done && q->st.n_tokens + n_new >= q->L;
    if (!q->zip) {
        /* Everything not yet in pages goes in: prefix-cache hits (fp blocks)
         * and the step's own rows. */
        sh.direct = true;
        sh.add[CLS_HI] = q->st.n_tokens + n_new - q->st.n_compressed;
        return sh;
    }
    sh.direct = q->st.prompt_done;
    sh.plan = kern_kvq_cadence_plan(&q->kp, q->st, n_new, sh.last);
    if (sh.plan.action != KERN_KVQ_ACT_NONE)
        split_counts(q, sh.plan.n, sh.add);
    sh.flush = sh.direct && sh.plan.action == KERN_KVQ_ACT_FLUSH;
    if (sh.direct && !sh.flush)
        sh.add[CLS_TAIL] = n_new; /* into the int8 tail */
    return sh;
}

static int pages_for(const kvq_class *c, int tokens_after)
{
    const int B = c->g.block_size;
    const int want = (tokens_after + B - 1) / B;
    return want > c->n_pages ? want - c->n_pages : 0;
}

/* Tokens class c holds after a step of shape sh (the tail empties on a flush). */
static int tokens_after(const rt_kvq *q, const step_shape *sh, int c)
{
    if (c == CLS_TAIL && sh->flush)
        return 0;
    return q->cls[c].n_tokens + sh->add[c];
}

int rt_kvq_pages_needed(const rt_kvq *q, int n_past, int n_new, int need[RT_KVQ_MAX_CLASSES])
{
    if (!q || n_new < 0 || n_past != q->st.n_tokens || !need)
        return -1;
    const step_shape sh = shape_of(q, n_new);
    int total = 0;
    for (int c = 0; c < RT_KVQ_MAX_CLASSES; c++) {
        need[c] = c < q->n_classes ? pages_for(&q->cls[c], tokens_after(q, &sh, c)) : 0;
        total += need[c];
    }
    return total;
}

static int class_grow(kvq_class *c, int n)
{
    if (c->n_pages + n <= c->cap)
        return 0;
    int cap = c->cap ? c->cap * 2 : 8;
    while (cap < c->n_pages + n)
        cap *= 2;
    int32_t *b = realloc(c->ids, sizeof(int32_t) * (size_t)cap);
    if (!b)
        return -1;
    c->ids = b;
    c->cap = cap;
    return 0;
}

int rt_kvq_add_pages(rt_kvq *q, int c, const int32_t *ids, int n)
{
    if (!q || q->in_step || c < 0 || c >= q->n_classes || n < 0 || (n > 0 && !ids))
        return -1;
    const rt_kv_pool *p = q->pool;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] / RT_KVQ_SUB >= p->n_blocks ||
            ids[i] % RT_KVQ_SUB >= q->cls[c].pg.n_sub)
            return -1;
    kvq_class *k = &q->cls[c];
    if (class_grow(k, n) != 0)
        return -1;
    if (n > 0)
        memcpy(k->ids + k->n_pages, ids, sizeof(int32_t) * (size_t)n);
    k->n_pages += n;
    return 0;
}

int rt_kvq_class_pages(const rt_kvq *q, int c, const int32_t **ids)
{
    if (!q || c < 0 || c >= q->n_classes) {
        if (ids)
            *ids = NULL;
        return 0;
    }
    if (ids)
        *ids = q->cls[c].ids;
    return q->cls[c].n_pages;
}

int rt_kvq_class_format(const rt_kvq *q, int c, int *fmt, int *n_sub)
{
    if (!q || c < 0 || c >= q->n_classes)
        return -1;
    *fmt = (int)q->cls[c].fmt;
    *n_sub = q->cls[c].pg.n_sub;
    return 0;
}

int rt_kvq_n_classes(const rt_kvq *q)
{
    return q ? q->n_classes : 0;
}

double rt_kvq_bytes_held(const rt_kvq *q)
{
    if (!q)
        return 0.0;
    const rt_kv_pool *p = q->pool;
    const double block_bytes =
        2.0 * p->n_layers * (double)p->block_size * p->kv_dim * sizeof(float);
    double b = 0.0;
    for (int c = 0; c < q->n_classes; c++)
        b += q->cls[c].n_pages * block_bytes / q->cls[c].pg.n_sub;
    return b;
}

bool rt_kvq_needs_fp(const rt_kvq *q, int n_new)
{
    return q && !shape_of(q, n_new).direct;
}

int rt_kvq_n_compressed(const rt_kvq *q)
{
    return q ? q->st.n_compressed : 0;
}

rt_kv_format rt_kvq_format(const rt_kvq *q)
{
    return q ? q->pol.format : RT_KV_FP;
}

int rt_kvq_begin_step(rt_kvq *q, int n_past, int n_new, char *err, size_t errlen)
{
    if (n_past != q->st.n_tokens)
        return ERR("compressed KV: the step starts at %d, the cache holds %d tokens", n_past,
                   q->st.n_tokens);
    const step_shape sh = shape_of(q, n_new);
    q->last_prefill = sh.last;
    q->direct = sh.direct;
    q->flush = sh.flush;
    q->plan = sh.plan;
    q->step_n_past = n_past;
    q->step_n_new = n_new;
    memcpy(q->add, sh.add, sizeof(q->add));
    for (int c = 0; c < q->n_classes; c++) {
        const int short_by = pages_for(&q->cls[c], tokens_after(q, &sh, c));
        if (short_by > 0)
            return ERR("compressed KV: %d more pages of class %d needed than handed in", short_by,
                       c);
    }
    q->in_step = true;
    return 0;
}

void rt_kvq_end_step(rt_kvq *q, bool ok)
{
    if (!q->in_step)
        return;
    q->in_step = false;
    if (!ok)
        return;
    for (int c = 0; c < q->n_classes; c++)
        q->cls[c].n_tokens = c == CLS_TAIL && q->flush ? 0 : q->cls[c].n_tokens + q->add[c];
    if (q->last_prefill && q->colsum) {
        free(q->colsum); /* the prompt's probe sums are spent */
        q->colsum = NULL;
    }
    if (q->zip) {
        q->st = kern_kvq_cadence_advance(q->st, q->step_n_new, q->last_prefill, &q->plan);
    } else {
        q->st.n_tokens += q->step_n_new;
        q->st.n_compressed = q->st.n_tokens;
        q->st.prompt_done = q->st.prompt_done || q->last_prefill;
    }
}

/* ---- pool addressing ---- */

static float *layer_k(const rt_kvq *q, int l)
{
    const rt_kv_pool *p = q->pool;
    return p->k + (size_t)l * (size_t)p->n_blocks * (size_t)p->block_size * (size_t)p->kv_dim;
}

static float *layer_v(const rt_kvq *q, int l)
{
    const rt_kv_pool *p = q->pool;
    return p->v + (size_t)l * (size_t)p->n_blocks * (size_t)p->block_size * (size_t)p->kv_dim;
}

/* The K (or V) page id of class c in layer l. */
static void *page_at(const rt_kvq *q, int l, int c, int32_t id, kern_kvq_kind kind)
{
    const kvq_class *k = &q->cls[c];
    char *base = (char *)(kind == KERN_KVQ_K ? layer_k(q, l) : layer_v(q, l));
    const size_t block = (size_t)(id / RT_KVQ_SUB), sub = (size_t)(id % RT_KVQ_SUB);
    return base + block * (size_t)q->pool->block_size * (size_t)q->pool->kv_dim * sizeof(float) +
           sub * (kind == KERN_KVQ_K ? k->pg.kstride : k->pg.vstride);
}

static float *class_stats(const rt_kvq *q, int l, int c)
{
    const size_t sf = KERN_KVQ_STATS_FLOATS(q->pool->kv_dim);
    return q->stats && c < 2 ? q->stats + ((size_t)l * 2 + (size_t)c) * sf : NULL;
}

/* ---- workspace ---- */

void rt_kvq_ws_free(rt_kvq_ws *ws)
{
    if (!ws)
        return;
    free(ws->buf);
    free(ws->ids);
    memset(ws, 0, sizeof(*ws));
}

static int ws_reserve(rt_kvq_ws *ws, size_t floats, int ids)
{
    if (floats > ws->cap) {
        float *b = realloc(ws->buf, sizeof(float) * floats);
        if (!b)
            return -1;
        ws->buf = b;
        ws->cap = floats;
    }
    if (ids > ws->ids_cap) {
        int32_t *b = realloc(ws->ids, sizeof(int32_t) * (size_t)ids);
        if (!b)
            return -1;
        ws->ids = b;
        ws->ids_cap = ids;
        for (int i = 0; i < ids; i++)
            ws->ids[i] = i;
    }
    return 0;
}

/* Rows [0, n) of class c (ordered: position order) into dst (stride kvd). */
static int unpack_class(const rt_kvq *q, int l, int c, float *kd, float *vd, int n, char *err,
                        size_t errlen)
{
    const kvq_class *k = &q->cls[c];
    const int B = k->g.block_size, kvd = q->pool->kv_dim;
    const float *st = class_stats(q, l, c);
    for (int i = 0; i * B < n; i++) {
        const int cnt = n - i * B < B ? n - i * B : B;
        const size_t off = (size_t)i * (size_t)B * (size_t)kvd;
        if (kern_kvq_unpack(kd + off, (size_t)kvd, page_at(q, l, c, k->ids[i], KERN_KVQ_K),
                            KERN_KVQ_K, k->fmt, &k->g, 0, cnt, st, err, errlen) != 0 ||
            kern_kvq_unpack(vd + off, (size_t)kvd, page_at(q, l, c, k->ids[i], KERN_KVQ_V),
                            KERN_KVQ_V, k->fmt, &k->g, 0, cnt, st, err, errlen) != 0)
            return -1;
    }
    return 0;
}

/* Copies positions [first, first + n) of the fp blocks of a into dst rows. */
static void copy_fp(const rt_kvq *q, const kern_attn_args *a, float *kd, float *vd, int first,
                    int n)
{
    const int bs = q->pool->block_size, kvd = q->pool->kv_dim;
    for (int t = 0; t < n; t++) {
        const int p = first + t;
        const size_t row = (size_t)a->blocks[p / bs] * (size_t)bs + (size_t)(p % bs);
        memcpy(kd + (size_t)t * kvd, a->k + row * (size_t)a->kv_stride, sizeof(float) * kvd);
        memcpy(vd + (size_t)t * kvd, a->v + row * (size_t)a->kv_stride, sizeof(float) * kvd);
    }
}

/* ---- attention over compressed pages + the rest ---- */

static int grow_pages(rt_kvq *q, int n)
{
    if (n <= q->pages_cap)
        return 0;
    int cap = q->pages_cap ? q->pages_cap * 2 : 64;
    while (cap < n)
        cap *= 2;
    kern_kvq_page *p = realloc(q->pages, sizeof(*p) * (size_t)cap);
    if (!p)
        return -1;
    q->pages = p;
    q->pages_cap = cap;
    return 0;
}

/* Rows of a step from which a uniform-format sequence gathers its context
 * into f32 and runs the prefill kernel instead of the page kernel. */
#define GATHER_MIN_ROWS 16

int rt_kvq_attend(rt_kvq *q, kern_pool *pool, int l, const kern_attn_args *a, const float *kn,
                  const float *vn, rt_kvq_ws *ws, kern_attn_args *dense, char *err, size_t errlen)
{
    const int bs = q->pool->block_size, kvd = q->pool->kv_dim;
    const int nc = q->st.n_compressed, ctx = a->ctx_len, n_past = q->step_n_past;
    if (!q->direct && nc == 0) {
        *dense = *a; /* a zip prompt: every row is in fp blocks */
        return 1;
    }
    if (q->direct && !q->zip && a->n_q >= GATHER_MIN_ROWS) {
        /* Positions [0, nc) from the pages, [nc, n_past) from fp blocks
         * (prefix hits), then the step's rows: f32 rows in the workspace,
         * addressed through an identity block table. */
        const int n_blk = (ctx + bs - 1) / bs;
        const size_t half = (size_t)n_blk * (size_t)bs * (size_t)kvd;
        if (ws_reserve(ws, 2 * half, n_blk) != 0)
            return ERR("compressed KV: out of memory for the gather workspace");
        float *kd = ws->buf, *vd = ws->buf + half;
        if (unpack_class(q, l, CLS_HI, kd, vd, nc, err, errlen) != 0)
            return -1;
        copy_fp(q, a, kd + (size_t)nc * kvd, vd + (size_t)nc * kvd, nc, n_past - nc);
        memcpy(kd + (size_t)n_past * kvd, kn, sizeof(float) * (size_t)a->n_q * kvd);
        memcpy(vd + (size_t)n_past * kvd, vn, sizeof(float) * (size_t)a->n_q * kvd);
        *dense = *a;
        dense->k = kd;
        dense->v = vd;
        dense->kv_stride = kvd;
        dense->blocks = ws->ids;
        dense->block_size = bs;
        return 1;
    }
    const int n_tail = q->zip ? q->cls[CLS_TAIL].n_tokens : 0;
    int n_fp = 0;
    for (int j = nc / bs; j * bs < ctx; j++)
        n_fp++;
    int n_pages = n_fp + 1;
    for (int c = 0; c < q->n_classes; c++)
        n_pages += q->cls[c].n_pages;
    if (grow_pages(q, n_pages) != 0)
        return ERR("compressed KV: out of memory for the page list");
    int np = 0;
    for (int c = 0; c < q->n_classes; c++) {
        const kvq_class *k = &q->cls[c];
        const int B = k->g.block_size;
        const int held = c == CLS_TAIL ? n_tail : k->n_tokens;
        const bool ordered = !q->zip || c == CLS_TAIL;
        for (int i = 0; i * B < held; i++)
            q->pages[np++] = (kern_kvq_page){
                .k = page_at(q, l, c, k->ids[i], KERN_KVQ_K),
                .v = page_at(q, l, c, k->ids[i], KERN_KVQ_V),
                .stats = class_stats(q, l, c),
                .pos0 = !ordered ? KERN_KVQ_UNORDERED : (c == CLS_TAIL ? nc : 0) + i * B,
                .n = held - i * B < B ? held - i * B : B,
                .fmt = k->fmt,
                .block_size = B,
            };
    }
    /* Rows in fp blocks: [nc + n_tail, n_past) (prefix hits), and the
     * step's rows unless they are direct. */
    const int fp_end = q->direct ? n_past : ctx;
    for (int j = (nc + n_tail) / bs; j * bs < fp_end; j++) {
        const int start = j * bs > nc + n_tail ? j * bs : nc + n_tail;
        const int end = (j + 1) * bs < fp_end ? (j + 1) * bs : fp_end;
        if (end <= start)
            continue;
        const size_t row = (size_t)a->blocks[j] * (size_t)bs + (size_t)(start - j * bs);
        q->pages[np++] = (kern_kvq_page){
            .k = a->k + row * (size_t)a->kv_stride,
            .v = a->v + row * (size_t)a->kv_stride,
            .pos0 = start,
            .n = end - start,
            .fmt = KERN_KVQ_F32,
            .block_size = bs,
        };
    }
    if (q->direct)
        q->pages[np++] = (kern_kvq_page){
            .k = kn,
            .v = vn,
            .pos0 = n_past,
            .n = a->n_q,
            .fmt = KERN_KVQ_F32,
            .block_size = a->n_q,
        };
    const bool want_lse = q->plan.score_window && a->n_q == 1;
    const kern_kvq_seq s = {
        .q = a->q,
        .out = a->out,
        .lse = want_lse ? q->lse : NULL,
        .pages = q->pages,
        .n_pages = np,
        .n_q = a->n_q,
        .ctx_len = ctx,
    };
    const kern_kvq_attn_args qa = {.g = q->g_fp, .n_heads = a->n_heads, .seqs = &s, .n_seqs = 1};
    return kern_attention_decode_quant(pool, &qa, err, errlen) == 0 ? 0 : -1;
}

/* ---- scoring and packing after a layer's attention ---- */

/* The layer's f32 rows of this sequence in the pool, positions [0, len). */
static kern_kvq_src fp_src(const rt_kvq *q, const float *base, const int32_t *blocks, int len)
{
    return (kern_kvq_src){.base = base,
                          .stride = (size_t)q->pool->kv_dim,
                          .blocks = blocks,
                          .block_size = q->pool->block_size,
                          .first = 0,
                          .len = len};
}

/* n contiguous rows holding positions [first, first + n). */
static kern_kvq_src rows_src(const rt_kvq *q, const float *base, int first, int n)
{
    return (kern_kvq_src){.base = base,
                          .stride = (size_t)q->pool->kv_dim,
                          .blocks = NULL,
                          .block_size = 1,
                          .first = first,
                          .len = n};
}

/* Appends the sel.n tokens of sel to class c in layer l, from token `at` of
 * the class on (its pages are all held: begin_step checked). */
static int pack_class_at(rt_kvq *q, int l, int c, int at, const kern_kvq_src *ks,
                         const kern_kvq_src *vs, kern_kvq_sel sel, char *err, size_t errlen)
{
    kvq_class *k = &q->cls[c];
    const int B = k->g.block_size;
    int tok = at, done = 0;
    const float *stats = class_stats(q, l, c);
    while (done < sel.n) {
        const int page = tok / B, slot = tok % B;
        if (page >= k->n_pages)
            return ERR("compressed KV: class %d has no page for token %d", c, tok);
        const int32_t id = k->ids[page];
        const int take = B - slot < sel.n - done ? B - slot : sel.n - done;
        kern_kvq_sel part = sel;
        part.n = take;
        if (sel.idx)
            part.idx = sel.idx + done;
        else
            part.first = sel.first + done;
        if (kern_kvq_pack(page_at(q, l, c, id, KERN_KVQ_K), KERN_KVQ_K, k->fmt, &k->g, slot, ks,
                          &part, stats, err, errlen) != 0 ||
            kern_kvq_pack(page_at(q, l, c, id, KERN_KVQ_V), KERN_KVQ_V, k->fmt, &k->g, slot, vs,
                          &part, stats, err, errlen) != 0)
            return -1;
        tok += take;
        done += take;
    }
    return 0;
}

/* ZIP compression of [plan.first, plan.first + plan.n) in layer l: scores
 * from the column sums, per-head salient sets, the prompt's statistics (new
 * segment only), then both classes packed. */
static int zip_compress(rt_kvq *q, int l, const kern_kvq_src *ks, const kern_kvq_src *vs,
                        const float *colsum, char *err, size_t errlen)
{
    const int H = q->g_fp.n_kv_heads, first = q->plan.first, n = q->plan.n;
    if (kern_kvq_saliency_normalize(q->scores, colsum, H, first, n, q->plan.norm, q->plan.norm_L,
                                    q->probes, q->n_probes, q->kp.head_shared, err, errlen) != 0)
        return -1;
    const int n_sal = kern_kvq_select_salient(q->order, q->scores, H, first, n,
                                              q->kp.salient_fraction, err, errlen);
    if (n_sal < 0)
        return -1;
    if (n_sal != q->add[CLS_HI])
        return ERR("compressed KV: %d salient tokens, %d planned", n_sal, q->add[CLS_HI]);
    if (q->plan.new_stats) {
        for (int c = 0; c < 2; c++) {
            const int cnt = c == 0 ? n_sal : n - n_sal;
            if (cnt == 0)
                continue;
            const kern_kvq_sel cls = {q->order + (c == 0 ? 0 : n_sal), n, 0, cnt};
            if (kern_kvq_zip_stats(class_stats(q, l, c), q->cls[c].fmt, &q->cls[c].g, ks, &cls, vs,
                                   first, n, err, errlen) != 0)
                return -1;
        }
    }
    for (int c = 0; c < 2; c++) {
        const int cnt = c == 0 ? n_sal : n - n_sal;
        if (cnt > 0 && pack_class_at(q, l, c, q->cls[c].n_tokens, ks, vs,
                                     (kern_kvq_sel){q->order + (c == 0 ? 0 : n_sal), n, 0, cnt},
                                     err, errlen) != 0)
            return -1;
    }
    return 0;
}

/* Scores the probe rows of this prompt chunk into the layer's column sums. */
static int score_probes(rt_kvq *q, kern_pool *pool, const kern_attn_args *a, float *colsum,
                        const kern_kvq_src *ks, char *err, size_t errlen)
{
    const int hd = q->g_fp.head_dim, n_past = q->step_n_past, len = n_past + q->step_n_new;
    int nq = 0;
    const size_t row = (size_t)a->n_heads * (size_t)hd;
    for (int i = 0; i < q->n_probes; i++) {
        const int p = q->probes[i];
        if (p < n_past || p >= len)
            continue;
        memcpy(q->qbuf + (size_t)nq * row, a->q + (size_t)(p - n_past) * row, sizeof(float) * row);
        q->qpos[nq++] = p;
    }
    if (nq == 0)
        return 0;
    const kern_kvq_probe_args pa = {.q = q->qbuf,
                                    .q_pos = q->qpos,
                                    .lse = NULL,
                                    .n_q = nq,
                                    .n_heads = a->n_heads,
                                    .k = ks,
                                    .key_first = 0,
                                    .n_keys = q->L};
    return kern_kvq_saliency_accumulate(pool, colsum, &q->g_fp, &pa, err, errlen);
}

/* A zip decode step: the new rows join the int8 tail, or, on a flush, the
 * tail and the new rows are scored with this step's query and packed. */
static int zip_decode(rt_kvq *q, kern_pool *pool, int l, const kern_attn_args *a, const float *kn,
                      const float *vn, rt_kvq_ws *ws, char *err, size_t errlen)
{
    const int kvd = q->pool->kv_dim, H = q->g_fp.n_kv_heads, n_new = q->step_n_new;
    const int nc = q->st.n_compressed, n_tail = q->cls[CLS_TAIL].n_tokens;
    if (!q->flush) {
        const kern_kvq_src ks = rows_src(q, kn, q->step_n_past, n_new);
        const kern_kvq_src vs = rows_src(q, vn, q->step_n_past, n_new);
        return pack_class_at(q, l, CLS_TAIL, n_tail, &ks, &vs,
                             (kern_kvq_sel){NULL, 0, q->step_n_past, n_new}, err, errlen);
    }
    const kern_kvq_plan *pl = &q->plan;
    const int n = n_tail + n_new;
    if (pl->first != nc || pl->n != n || pl->window_first != nc || pl->window_n != n)
        return ERR("compressed KV: the flush covers [%d, +%d), the tail [%d, +%d)", pl->first,
                   pl->n, nc, n);
    if (n > q->kp.flush_tokens)
        return ERR("compressed KV: a flush window of %d tokens exceeds flush_tokens %d", n,
                   q->kp.flush_tokens);
    if (ws_reserve(ws, 2 * (size_t)n * (size_t)kvd, 0) != 0)
        return ERR("compressed KV: out of memory for the flush workspace");
    float *kd = ws->buf, *vd = ws->buf + (size_t)n * kvd;
    if (unpack_class(q, l, CLS_TAIL, kd, vd, n_tail, err, errlen) != 0)
        return -1;
    memcpy(kd + (size_t)n_tail * kvd, kn, sizeof(float) * (size_t)n_new * kvd);
    memcpy(vd + (size_t)n_tail * kvd, vn, sizeof(float) * (size_t)n_new * kvd);
    const kern_kvq_src ks = rows_src(q, kd, nc, n), vs = rows_src(q, vd, nc, n);
    if (!q->window)
        return ERR("compressed KV: no flush window");
    memset(q->window, 0, sizeof(float) * (size_t)H * (size_t)n);
    if (a->n_q == 1) {
        const int32_t pos = nc + n - 1;
        const kern_kvq_probe_args pa = {.q = a->q,
                                        .q_pos = &pos,
                                        .lse = q->lse,
                                        .n_q = 1,
                                        .n_heads = a->n_heads,
                                        .k = &ks,
                                        .key_first = nc,
                                        .n_keys = n};
        if (kern_kvq_saliency_accumulate(pool, q->window, &q->g_fp, &pa, err, errlen) != 0)
            return -1;
    }
    return zip_compress(q, l, &ks, &vs, q->window, err, errlen);
}

int rt_kvq_after_attention(rt_kvq *q, kern_pool *pool, int l, const kern_attn_args *a,
                           const float *kn, const float *vn, rt_kvq_ws *ws, char *err,
                           size_t errlen)
{
    const kern_kvq_plan *pl = &q->plan;
    const int H = q->g_fp.n_kv_heads, n_past = q->step_n_past, n_new = q->step_n_new;
    const int len = n_past + n_new;
    if (!q->zip) {
        /* Prefix hits still in fp blocks first, then the step's rows. */
        const int nc = q->st.n_compressed;
        if (n_past > nc) {
            const kern_kvq_src ks = fp_src(q, a->k, a->blocks, n_past);
            const kern_kvq_src vs = fp_src(q, a->v, a->blocks, n_past);
            if (pack_class_at(q, l, CLS_HI, nc, &ks, &vs, (kern_kvq_sel){NULL, 0, nc, n_past - nc},
                              err, errlen) != 0)
                return -1;
        }
        const kern_kvq_src ks = rows_src(q, kn, n_past, n_new);
        const kern_kvq_src vs = rows_src(q, vn, n_past, n_new);
        return pack_class_at(q, l, CLS_HI, n_past, &ks, &vs, (kern_kvq_sel){NULL, 0, n_past, n_new},
                             err, errlen);
    }
    if (q->direct)
        return zip_decode(q, pool, l, a, kn, vn, ws, err, errlen);
    /* The zip prompt: rows in fp blocks; probe scores per chunk, packing at
     * the last chunk. */
    const kern_kvq_src ks = fp_src(q, a->k, a->blocks, len);
    const kern_kvq_src vs = fp_src(q, a->v, a->blocks, len);
    float *colsum = q->colsum ? q->colsum + (size_t)l * H * (size_t)q->L : NULL;
    if (pl->score_probes && colsum && score_probes(q, pool, a, colsum, &ks, err, errlen) != 0)
        return -1;
    if (pl->action == KERN_KVQ_ACT_NONE)
        return 0;
    if (pl->action != KERN_KVQ_ACT_COMPRESS_PROMPT || !colsum)
        return ERR("compressed KV: no saliency scores for the prompt");
    return zip_compress(q, l, &ks, &vs, colsum, err, errlen);
}
