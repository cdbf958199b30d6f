/*
 * kv_compress.c - compressed KV caches of one sequence (int8, int4, zip).
 *
 * research/sparse-kv-spec.md sections 3 and 4; the kernels are in
 * kernels/cpu/kv_quant.c and attention_quant.c. A sequence always writes its
 * new keys and values as f32 rows into its blocks of the shared pool (the fp
 * table the scheduler keeps), and prefill attention reads them there. After
 * the prompt's last chunk (and at each decode flush) this module packs rows
 * into compressed pages; the scheduler then frees the fp blocks that hold only
 * compressed positions. From then on the sequence's attention walks its
 * compressed pages plus the fp tail in one online softmax.
 *
 * Memory. A compressed page of one format occupies one pool block: for every
 * layer, the K page sits in the block's K region (block_size * kv_dim f32)
 * and the V page in its V region, with as many slots as fit (a q8 page of a
 * 64-dim head holds 3.76x the slots of the f32 block). So the pool's byte
 * budget decides how many tokens of each format exist, and the pages come
 * from the same block manager as everything else (private to the sequence:
 * never in the prefix cache; the prefix blocks it reused stay fp for others).
 *
 * Page classes. int8/int4: one class of ordered pages (page i holds
 * positions [i*B, i*B + B)); only whole fp pages are compressed, so the tail
 * is the partial last block. zip: class 0 holds the salient tokens at
 * high_bits, class 1 the rest at low_bits, as unordered sets (RoPE is inside
 * K, and every cached token precedes every query row); per kv head the sets
 * differ. The prompt's statistics (per layer and class) serve the decode
 * flushes too, which append to the open pages of each class
 * (KERN_KVQ_STATS_PROMPT: flushes can then be as small as one fp page, so
 * the f32 tail stays small; the reference re-quantizes instead). A flush
 * scores its window with the flushing step's query (the reference's choice).
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

typedef struct {
    kern_kvq_fmt fmt;
    kern_kvq_geom g; /* block_size: slots per page */
    int32_t *blk;    /* pool block of each page */
    int n_pages, cap;
    int n_tokens; /* tokens in the class; every page but the last is full */
} kvq_class;

struct rt_kvq {
    const rt_model *m;
    rt_kv_pool *pool;
    rt_kv_policy pol;
    kern_kvq_policy kp;
    int n_classes;
    kvq_class cls[2];
    kern_kvq_geom g_fp; /* the pool's own geometry */
    int L;              /* prompt length (with generated tokens when recomputing) */
    uint64_t seed;
    kern_kvq_seq_state st;
    /* the step in progress */
    bool in_step;
    bool last_prefill;
    int step_n_past, step_n_new;
    kern_kvq_plan plan;
    int add[2]; /* tokens each class receives in this step */
    /* blocks handed in by the scheduler, in order; the first n_used are pages */
    int32_t *blocks;
    int n_blocks, blocks_cap, n_used;
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
    if (page_slots(hi, pool) < 1 || page_slots(lo, pool) < 1)
        return ERR("a compressed page does not fit a KV block of %d tokens", pool->block_size);
    return 0;
}

int rt_kvq_block_tokens(const rt_kv_pool *pool, const rt_kv_policy *p, int cls)
{
    if (!p || p->format == RT_KV_FP)
        return pool->block_size;
    kern_kvq_fmt hi, lo;
    class_formats(p, &hi, &lo);
    return page_slots(cls == 0 ? hi : lo, pool);
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
    for (int c = 0; c < 2; c++)
        free(q->cls[c].blk);
    free(q->blocks);
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
    q->n_classes = zip ? 2 : 1;
    q->cls[0].fmt = hi;
    q->cls[1].fmt = lo;
    for (int c = 0; c < 2; c++)
        q->cls[c].g = (kern_kvq_geom){H, hd, page_slots(q->cls[c].fmt, pool)};
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
static void split_counts(const rt_kvq *q, int n, int add[2])
{
    if (q->n_classes == 1) {
        add[0] = n;
        add[1] = 0;
        return;
    }
    add[0] = kern_kvq_salient_count(n, q->kp.salient_fraction);
    add[1] = n - add[0];
}

static int pages_for(const kvq_class *c, int add)
{
    const int B = c->g.block_size;
    const int want = (c->n_tokens + add + B - 1) / B;
    return want > c->n_pages ? want - c->n_pages : 0;
}

int rt_kvq_blocks_needed(const rt_kvq *q, int n_past, int n_new)
{
    if (!q || n_new < 0 || n_past != q->st.n_tokens)
        return -1;
    const bool last = !q->st.prompt_done && n_past + n_new >= q->L;
    const kern_kvq_plan pl = kern_kvq_cadence_plan(&q->kp, q->st, n_new, last);
    if (pl.action == KERN_KVQ_ACT_NONE)
        return 0;
    int add[2];
    split_counts(q, pl.n, add);
    int need = 0;
    for (int c = 0; c < q->n_classes; c++)
        need += pages_for(&q->cls[c], add[c]);
    const int spare = q->n_blocks - q->n_used;
    return need > spare ? need - spare : 0;
}

int rt_kvq_set_blocks(rt_kvq *q, const int32_t *ids, int n)
{
    if (!q || n < q->n_used || (n > 0 && !ids))
        return -1;
    if (n > q->blocks_cap) {
        int32_t *b = realloc(q->blocks, sizeof(int32_t) * (size_t)n);
        if (!b)
            return -1;
        q->blocks = b;
        q->blocks_cap = n;
    }
    for (int i = 0; i < q->n_used; i++)
        if (ids[i] != q->blocks[i])
            return -1; /* the pages already written must stay where they are */
    if (n > 0)         /* memcpy's pointers must not be NULL even for 0 bytes (UBSan) */
        memcpy(q->blocks, ids, sizeof(int32_t) * (size_t)n);
    q->n_blocks = n;
    return 0;
}

int rt_kvq_blocks_held(const rt_kvq *q)
{
    return q ? q->n_blocks : 0;
}

int rt_kvq_n_compressed(const rt_kvq *q)
{
    return q ? q->st.n_compressed : 0;
}

rt_kv_format rt_kvq_format(const rt_kvq *q)
{
    return q ? q->pol.format : RT_KV_FP;
}

static int class_grow(kvq_class *c, int n)
{
    if (c->n_pages + n <= c->cap)
        return 0;
    int cap = c->cap ? c->cap * 2 : 8;
    while (cap < c->n_pages + n)
        cap *= 2;
    int32_t *b = realloc(c->blk, sizeof(int32_t) * (size_t)cap);
    if (!b)
        return -1;
    c->blk = b;
    c->cap = cap;
    return 0;
}

int rt_kvq_begin_step(rt_kvq *q, int n_past, int n_new, char *err, size_t errlen)
{
    if (n_past != q->st.n_tokens)
        return ERR("compressed KV: the step starts at %d, the cache holds %d tokens", n_past,
                   q->st.n_tokens);
    q->last_prefill = !q->st.prompt_done && n_past + n_new >= q->L;
    q->plan = kern_kvq_cadence_plan(&q->kp, q->st, n_new, q->last_prefill);
    q->step_n_past = n_past;
    q->step_n_new = n_new;
    q->add[0] = q->add[1] = 0;
    if (q->plan.action != KERN_KVQ_ACT_NONE) {
        split_counts(q, q->plan.n, q->add);
        /* Assign the step's new pages from the handed-in blocks now, so every
         * layer writes the same places. */
        int need = 0;
        for (int c = 0; c < q->n_classes; c++) {
            const int np = pages_for(&q->cls[c], q->add[c]);
            need += np;
            if (class_grow(&q->cls[c], np) != 0)
                return ERR("compressed KV: out of memory");
        }
        if (q->n_used + need > q->n_blocks)
            return ERR("compressed KV: %d more pages needed, %d blocks handed in", need,
                       q->n_blocks - q->n_used);
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
    for (int c = 0; c < q->n_classes; c++) {
        kvq_class *k = &q->cls[c];
        const int np = pages_for(k, q->add[c]);
        for (int i = 0; i < np; i++)
            k->blk[k->n_pages++] = q->blocks[q->n_used++];
        k->n_tokens += q->add[c];
    }
    if (q->last_prefill && q->colsum) {
        free(q->colsum); /* the prompt's probe sums are spent */
        q->colsum = NULL;
    }
    q->st = kern_kvq_cadence_advance(q->st, q->step_n_new, q->last_prefill, &q->plan);
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

/* The K (or V) page of pool block id in layer l. */
static void *page_at(const rt_kvq *q, int l, int32_t id, kern_kvq_kind kind)
{
    float *base = kind == KERN_KVQ_K ? layer_k(q, l) : layer_v(q, l);
    return base + (size_t)id * (size_t)q->pool->block_size * (size_t)q->pool->kv_dim;
}

static float *class_stats(const rt_kvq *q, int l, int c)
{
    const size_t sf = KERN_KVQ_STATS_FLOATS(q->pool->kv_dim);
    return q->stats ? q->stats + ((size_t)l * 2 + (size_t)c) * sf : NULL;
}

/* ---- attention over compressed pages + the fp tail ---- */

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

int rt_kvq_attend(rt_kvq *q, kern_pool *pool, int l, const kern_attn_args *a, char *err,
                  size_t errlen)
{
    const int bs = q->pool->block_size, kvd = q->pool->kv_dim;
    const int nc = q->st.n_compressed, ctx = a->ctx_len;
    const bool ordered = q->n_classes == 1;
    int n_fp = 0;
    for (int j = nc / bs; j * bs < ctx; j++)
        n_fp++;
    if (grow_pages(q, q->cls[0].n_pages + q->cls[1].n_pages + n_fp) != 0)
        return ERR("compressed KV: out of memory for the page list");
    int np = 0;
    for (int c = 0; c < q->n_classes; c++) {
        const kvq_class *k = &q->cls[c];
        const int B = k->g.block_size;
        for (int i = 0; i < k->n_pages; i++) {
            const int filled = i + 1 < k->n_pages ? B : k->n_tokens - i * B;
            q->pages[np++] = (kern_kvq_page){
                .k = page_at(q, l, k->blk[i], KERN_KVQ_K),
                .v = page_at(q, l, k->blk[i], KERN_KVQ_V),
                .stats = class_stats(q, l, c),
                .pos0 = ordered ? i * B : KERN_KVQ_UNORDERED,
                .n = filled,
                .fmt = k->fmt,
                .block_size = B,
            };
        }
    }
    const float *kb = layer_k(q, l), *vb = layer_v(q, l);
    for (int j = nc / bs; j * bs < ctx; j++) {
        const int start = j * bs > nc ? j * bs : nc;
        const int end = (j + 1) * bs < ctx ? (j + 1) * bs : ctx;
        const size_t row = (size_t)a->blocks[j] * (size_t)bs + (size_t)(start - j * bs);
        q->pages[np++] = (kern_kvq_page){
            .k = kb + row * (size_t)kvd,
            .v = vb + row * (size_t)kvd,
            .pos0 = start,
            .n = end - start,
            .fmt = KERN_KVQ_F32,
            .block_size = bs,
        };
    }
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
    return kern_attention_decode_quant(pool, &qa, err, errlen);
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

/* Where class c's new pages of this step start in the handed-in blocks:
 * class 0 takes its new pages first, then class 1 (as rt_kvq_end_step
 * assigns them). */
static int first_new_block(const rt_kvq *q, int c)
{
    return q->n_used + (c == 1 ? pages_for(&q->cls[0], q->add[0]) : 0);
}

/* Appends the sel.n tokens of sel to class c in layer l, filling its open
 * page first, then the step's new pages. */
static int pack_class(rt_kvq *q, int l, int c, const kern_kvq_src *ks, const kern_kvq_src *vs,
                      kern_kvq_sel sel, char *err, size_t errlen)
{
    kvq_class *k = &q->cls[c];
    const int new0 = first_new_block(q, c);
    const int B = k->g.block_size;
    int tok = k->n_tokens, done = 0;
    const float *stats = class_stats(q, l, c);
    while (done < sel.n) {
        const int page = tok / B, slot = tok % B;
        const int32_t id = page < k->n_pages ? k->blk[page] : q->blocks[new0 + (page - k->n_pages)];
        const int take = B - slot < sel.n - done ? B - slot : sel.n - done;
        kern_kvq_sel part = sel;
        part.n = take;
        if (sel.idx)
            part.idx = sel.idx + done;
        else
            part.first = sel.first + done;
        if (kern_kvq_pack(page_at(q, l, id, KERN_KVQ_K), KERN_KVQ_K, k->fmt, &k->g, slot, ks, &part,
                          stats, err, errlen) != 0 ||
            kern_kvq_pack(page_at(q, l, id, KERN_KVQ_V), KERN_KVQ_V, k->fmt, &k->g, slot, vs, &part,
                          stats, err, errlen) != 0)
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
    if (n_sal != q->add[0])
        return ERR("compressed KV: %d salient tokens, %d planned", n_sal, q->add[0]);
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
        if (cnt > 0 &&
            pack_class(q, l, c, ks, vs, (kern_kvq_sel){q->order + (c == 0 ? 0 : n_sal), n, 0, cnt},
                       err, errlen) != 0)
            return -1;
    }
    return 0;
}

int rt_kvq_after_attention(rt_kvq *q, kern_pool *pool, int l, const kern_attn_args *a, char *err,
                           size_t errlen)
{
    const kern_kvq_plan *pl = &q->plan;
    const int H = q->g_fp.n_kv_heads, hd = q->g_fp.head_dim;
    const int n_past = q->step_n_past, n_new = q->step_n_new, len = n_past + n_new;
    const kern_kvq_src ks = fp_src(q, layer_k(q, l), a->blocks, len);
    const kern_kvq_src vs = fp_src(q, layer_v(q, l), a->blocks, len);
    float *colsum = q->colsum ? q->colsum + (size_t)l * H * (size_t)q->L : NULL;
    if (pl->score_probes && colsum) {
        /* This chunk's probe rows, gathered. */
        int nq = 0;
        const size_t row = (size_t)a->n_heads * (size_t)hd;
        for (int i = 0; i < q->n_probes; i++) {
            const int p = q->probes[i];
            if (p < n_past || p >= len)
                continue;
            memcpy(q->qbuf + (size_t)nq * row, a->q + (size_t)(p - n_past) * row,
                   sizeof(float) * row);
            q->qpos[nq++] = p;
        }
        if (nq > 0) {
            const kern_kvq_probe_args pa = {.q = q->qbuf,
                                            .q_pos = q->qpos,
                                            .lse = NULL,
                                            .n_q = nq,
                                            .n_heads = a->n_heads,
                                            .k = &ks,
                                            .key_first = 0,
                                            .n_keys = q->L};
            if (kern_kvq_saliency_accumulate(pool, colsum, &q->g_fp, &pa, err, errlen) != 0)
                return -1;
        }
    }
    if (pl->score_window && pl->window_n > q->kp.flush_tokens)
        return ERR("compressed KV: a flush window of %d tokens exceeds flush_tokens %d",
                   pl->window_n, q->kp.flush_tokens);
    if (pl->score_window && a->n_q == 1 && q->window) {
        memset(q->window, 0, sizeof(float) * (size_t)H * (size_t)pl->window_n);
        const int32_t pos = len - 1;
        const kern_kvq_probe_args pa = {.q = a->q,
                                        .q_pos = &pos,
                                        .lse = q->lse,
                                        .n_q = 1,
                                        .n_heads = a->n_heads,
                                        .k = &ks,
                                        .key_first = pl->window_first,
                                        .n_keys = pl->window_n};
        if (kern_kvq_saliency_accumulate(pool, q->window, &q->g_fp, &pa, err, errlen) != 0)
            return -1;
    }
    if (pl->action == KERN_KVQ_ACT_NONE)
        return 0;
    if (q->n_classes == 1) {
        const kern_kvq_sel sel = {NULL, 0, pl->first, pl->n};
        return pack_class(q, l, 0, &ks, &vs, sel, err, errlen);
    }
    const float *sums = pl->action == KERN_KVQ_ACT_COMPRESS_PROMPT ? colsum : q->window;
    if (!sums)
        return ERR("compressed KV: no saliency scores for the %s",
                   pl->action == KERN_KVQ_ACT_COMPRESS_PROMPT ? "prompt" : "flush");
    return zip_compress(q, l, &ks, &vs, sums, err, errlen);
}
