/*
 * tp.c - tensor parallelism on the CPU: the model split over tp ranks, and
 * the rank threads that run a forward step together.
 *
 * A rank holds a contiguous range of query heads (with their kv heads) and a
 * contiguous range of FFN columns of every layer. Its q/k/v and gate/up
 * projections are row slices of the model's tensors, used in place; its
 * output and down projections are column slices, whose products are partial
 * sums that the ranks add up with the communicator's all-reduce
 * (kernels/collective.h) - the only exchange between ranks. F32 column slices
 * are read in place with a row stride; slices of other types are copied once
 * here, because the quantized products take contiguous rows.
 *
 * With tp == 1 the single rank is the whole model (its layers are m->layers),
 * so the sharded forward pass is also the plain one.
 *
 * Threads: rank 0 is the caller of rt_forward (the engine thread); ranks 1..
 * are threads started here and stopped in rt_tp_free. A step is handed to
 * them by bumping a generation number under a mutex; each rank then runs
 * rt_forward_rank, and rank 0 waits until all have reported done before it
 * reads the result or returns, so the step description in the model is never
 * rewritten while a rank reads it. A rank can only block inside a collective,
 * and a collective times out (breaking the communicator for every later
 * step) instead of hanging, so the wait for "done" always ends.
 */
#include "runtime/model_internal.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ERR(...) (snprintf(err, errlen, __VA_ARGS__), -1)

typedef struct {
    rt_model *m;
    int rank;
} rank_arg;

struct rt_tp_threads {
    pthread_mutex_t mu;
    pthread_cond_t go;   /* gen moved on, or stop */
    pthread_cond_t done; /* n_done reached the number of rank threads */
    unsigned long gen;   /* bumped once per step; guarded by mu */
    int n_done;          /* rank threads finished with step gen; guarded by mu */
    bool stop;           /* guarded by mu */
    int n_started;       /* rank threads running (joined by rt_tp_free) */
    pthread_t th[RT_TP_MAX_RANKS];
    rank_arg args[RT_TP_MAX_RANKS];
};

/* ---- the split ---- */

static size_t lcm_size(size_t a, size_t b)
{
    size_t x = a, y = b;
    while (y) {
        const size_t t = x % y;
        x = y;
        y = t;
    }
    return a / x * b;
}

/* Checks that the model splits over tp ranks: heads and kv heads evenly, each
 * rank's slice of every wo row a whole number of blocks, and at least one
 * block of w_down's rows per rank. *ffn_unit receives the granularity of the
 * FFN split (the blocks of every layer's w_down). */
static int check_split(const rt_model *m, int tp, int *ffn_unit, char *err, size_t errlen)
{
    const rt_hparams *hp = &m->hp;
    if (hp->n_heads % tp != 0 || hp->n_kv_heads % tp != 0)
        return ERR("model: tp %d does not divide the %d attention heads and %d KV heads "
                   "(tensor parallelism splits whole heads)",
                   tp, hp->n_heads, hp->n_kv_heads);
    const int qd_rank = hp->n_heads / tp * hp->head_dim;
    size_t unit = 1;
    for (int l = 0; l < hp->n_layers; l++) {
        const rt_layer *L = &m->layers[l];
        const size_t bo = kern_type_block_size(L->wo.type);
        if (bo == 0 || (size_t)qd_rank % bo != 0)
            return ERR("model: tp %d gives each rank %d columns of blk.%d.attn_output, not a "
                       "multiple of its %s blocks of %zu",
                       tp, qd_rank, l, kern_type_name(L->wo.type), bo);
        const size_t bd = kern_type_block_size(L->w_down.type);
        if (bd == 0)
            return ERR("model: blk.%d.ffn_down has type %s, which cannot be split", l,
                       kern_type_name(L->w_down.type));
        unit = lcm_size(unit, bd);
    }
    if ((size_t)hp->ffn_dim % unit != 0 || (size_t)hp->ffn_dim / unit < (size_t)tp)
        return ERR("model: tp %d cannot split the %d FFN columns in blocks of %zu (ffn_down's "
                   "type): fewer blocks than ranks",
                   tp, hp->ffn_dim, unit);
    *ffn_unit = (int)unit;
    return 0;
}

static void *rank_own(rt_rank *rk, size_t bytes)
{
    void **owned = realloc(rk->owned, sizeof(void *) * (size_t)(rk->n_owned + 1));
    if (!owned)
        return NULL;
    rk->owned = owned;
    void *p = malloc(bytes);
    if (p)
        rk->owned[rk->n_owned++] = p;
    return p;
}

/* Rows [r0, ...) of w, in place. */
static rt_weight row_slice(const rt_weight *w, int r0)
{
    rt_weight s = *w;
    s.data = (const char *)w->data + (size_t)r0 * w->row_bytes;
    return s;
}

/* Columns [c0, c0 + n) of every one of the `rows` rows of w: F32 in place
 * (same row stride), other types copied into rows of their own. c0 and n are
 * multiples of the type's block size (check_split). */
static int col_slice(rt_rank *rk, const rt_weight *w, int rows, int c0, int n, rt_weight *out)
{
    *out = *w;
    if (w->type == KERN_TYPE_F32) {
        out->data = (const float *)w->data + c0;
        return 0;
    }
    const size_t bs = kern_type_block_size(w->type), bb = kern_type_block_bytes(w->type);
    const size_t off = (size_t)c0 / bs * bb, rb = (size_t)n / bs * bb;
    char *dst = rank_own(rk, rb * (size_t)rows);
    if (!dst)
        return -1;
    for (int r = 0; r < rows; r++)
        memcpy(dst + (size_t)r * rb, (const char *)w->data + (size_t)r * w->row_bytes + off, rb);
    out->data = dst;
    out->row_bytes = rb;
    return 0;
}

static int build_layers(rt_model *m, rt_rank *rk, char *err, size_t errlen)
{
    const rt_hparams *hp = &m->hp;
    const int hd = hp->head_dim;
    rk->layers = calloc((size_t)hp->n_layers, sizeof(rt_layer));
    if (!rk->layers)
        return ERR("model: out of memory for the shards of tp");
    for (int l = 0; l < hp->n_layers; l++) {
        const rt_layer *L = &m->layers[l];
        rt_layer *S = &rk->layers[l];
        S->attn_norm = L->attn_norm;
        S->ffn_norm = L->ffn_norm;
        S->wq = row_slice(&L->wq, rk->h0 * hd);
        S->wk = row_slice(&L->wk, rk->kvh0 * hd);
        S->wv = row_slice(&L->wv, rk->kvh0 * hd);
        S->w_gate = row_slice(&L->w_gate, rk->f0);
        S->w_up = row_slice(&L->w_up, rk->f0);
        if (L->bq) {
            S->bq = L->bq + (size_t)rk->h0 * hd;
            S->bk = L->bk + (size_t)rk->kvh0 * hd;
            S->bv = L->bv + (size_t)rk->kvh0 * hd;
        }
        if (col_slice(rk, &L->wo, hp->dim, rk->h0 * hd, rk->n_h * hd, &S->wo) != 0 ||
            col_slice(rk, &L->w_down, hp->dim, rk->f0, rk->n_f, &S->w_down) != 0)
            return ERR("model: out of memory copying layer %d's slices for tp rank %d", l,
                       rk->rank);
    }
    return 0;
}

static int alloc_rank(rt_model *m, rt_rank *rk, int threads, char *err, size_t errlen)
{
    const rt_hparams *hp = &m->hp;
    const size_t T = (size_t)m->max_batch_tokens, dim = (size_t)hp->dim;
    const size_t qd = (size_t)rk->n_h * (size_t)hp->head_dim;
    const size_t kvd = (size_t)rk->n_kvh * (size_t)hp->head_dim;
    const size_t ffn = (size_t)rk->n_f;
    rt_scratch *s = &rk->s;
    s->x = calloc(T * dim, sizeof(float));
    s->xb = calloc(T * dim, sizeof(float));
    s->q = calloc(T * qd, sizeof(float));
    s->k = calloc(T * kvd, sizeof(float));
    s->v = calloc(T * kvd, sizeof(float));
    s->att = calloc(T * qd, sizeof(float));
    s->proj = calloc(T * dim, sizeof(float));
    s->gate = calloc(T * ffn, sizeof(float));
    s->up = calloc(T * ffn, sizeof(float));
    s->rows = calloc(T, sizeof(int32_t));
    s->pos = calloc(T, sizeof(int32_t));
    rk->stats = calloc(T, sizeof(rt_attn_stats));
    if (!s->x || !s->xb || !s->q || !s->k || !s->v || !s->att || !s->proj || !s->gate || !s->up ||
        !s->rows || !s->pos || !rk->stats)
        return ERR("model: out of memory for the scratch of %zu batch tokens", T);
    rk->pool = kern_pool_create(threads);
    if (!rk->pool)
        return ERR("model: cannot start %d compute threads", threads);
    /* Sparse-prefill scratch, sized once for the longest context. */
    rk->flex_ws =
        kern_flex_ws_create(m->n_ctx, rk->n_h, rk->n_kvh, hp->head_dim, RT_FLEX_MIN_BLOCK, threads);
    const int max_q = m->max_batch_tokens < m->n_ctx ? m->max_batch_tokens : m->n_ctx;
    rk->mask_words = kern_block_mask_words(1, 1, m->n_ctx, max_q);
    rk->mask_bits = malloc(sizeof(uint64_t) * (rk->mask_words ? rk->mask_words : 1));
    if (!rk->flex_ws || !rk->mask_bits)
        return ERR("model: out of memory for the sparse-attention scratch");
    return 0;
}

static void free_rank(rt_model *m, rt_rank *rk)
{
    if (rk->layers != m->layers)
        free(rk->layers);
    for (int i = 0; i < rk->n_owned; i++)
        free(rk->owned[i]);
    free(rk->owned);
    kern_pool_destroy(rk->pool);
    kern_flex_ws_destroy(rk->flex_ws);
    free(rk->mask_bits);
    rt_scratch *s = &rk->s;
    free(s->x);
    free(s->xb);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->att);
    free(s->proj);
    free(s->gate);
    free(s->up);
    free(s->rows);
    free(s->pos);
    free(rk->stats);
    rt_kvq_ws_free(&rk->kvq_ws);
}

/* ---- the rank threads ---- */

static void *rank_main(void *arg)
{
    const rank_arg *a = arg;
    rt_model *m = a->m;
    rt_tp_threads *t = m->threads;
    /* Steps are counted from 0, when the threads start: a thread that first
     * runs after rank 0 has already posted step 1 still runs it. */
    unsigned long seen = 0;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (t->gen == seen && !t->stop)
            pthread_cond_wait(&t->go, &t->mu);
        if (t->stop)
            break;
        seen = t->gen;
        pthread_mutex_unlock(&t->mu);
        rt_forward_rank(m, &m->ranks[a->rank]);
        pthread_mutex_lock(&t->mu);
        if (++t->n_done == m->tp - 1)
            pthread_cond_signal(&t->done);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static int start_threads(rt_model *m, char *err, size_t errlen)
{
    rt_tp_threads *t = calloc(1, sizeof(*t));
    if (!t)
        return ERR("model: out of memory for the tp threads");
    if (pthread_mutex_init(&t->mu, NULL) != 0) {
        free(t);
        return ERR("model: cannot create the tp threads' mutex");
    }
    if (pthread_cond_init(&t->go, NULL) != 0 || pthread_cond_init(&t->done, NULL) != 0) {
        pthread_mutex_destroy(&t->mu);
        free(t);
        return ERR("model: cannot create the tp threads' condition variables");
    }
    m->threads = t;
    for (int r = 1; r < m->tp; r++) {
        t->args[r] = (rank_arg){m, r};
        if (pthread_create(&t->th[t->n_started], NULL, rank_main, &t->args[r]) != 0)
            return ERR("model: cannot start the thread of tp rank %d", r);
        t->n_started++;
    }
    return 0;
}

static void stop_threads(rt_tp_threads *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    t->stop = true;
    pthread_cond_broadcast(&t->go);
    pthread_mutex_unlock(&t->mu);
    for (int i = 0; i < t->n_started; i++)
        pthread_join(t->th[i], NULL);
    pthread_cond_destroy(&t->go);
    pthread_cond_destroy(&t->done);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

/* ---- public (to runtime/) ---- */

int rt_tp_init(rt_model *m, int tp, int threads, char *err, size_t errlen)
{
    const rt_hparams *hp = &m->hp;
    if (tp < 1 || tp > RT_TP_MAX_RANKS)
        return ERR("model: tp %d is out of range [1, %d]", tp, RT_TP_MAX_RANKS);
    int unit = 1;
    if (tp > 1 && check_split(m, tp, &unit, err, errlen) != 0)
        return -1;
    m->ranks = calloc((size_t)tp, sizeof(rt_rank));
    if (!m->ranks)
        return ERR("model: out of memory for %d tp ranks", tp);
    m->tp = tp;
    const int units = hp->ffn_dim / unit;
    for (int r = 0; r < tp; r++) {
        rt_rank *rk = &m->ranks[r];
        rk->rank = r;
        rk->n_h = hp->n_heads / tp;
        rk->h0 = r * rk->n_h;
        rk->n_kvh = hp->n_kv_heads / tp;
        rk->kvh0 = r * rk->n_kvh;
        /* Contiguous, near-equal ranges of whole blocks. */
        const int u0 = (int)((long)units * r / tp), u1 = (int)((long)units * (r + 1) / tp);
        rk->f0 = u0 * unit;
        rk->n_f = (u1 - u0) * unit;
        if (tp == 1)
            rk->layers = m->layers;
        else if (build_layers(m, rk, err, errlen) != 0)
            return -1;
        if (alloc_rank(m, rk, threads, err, errlen) != 0)
            return -1;
    }
    if (tp == 1)
        return 0;
    char inner[256];
    m->comm = kern_comm_create_threads(tp, inner, sizeof(inner));
    if (!m->comm)
        return ERR("model: tp %d: %s", tp, inner);
    return start_threads(m, err, errlen);
}

void rt_tp_free(rt_model *m)
{
    stop_threads(m->threads);
    m->threads = NULL;
    kern_comm_destroy(m->comm);
    m->comm = NULL;
    if (m->ranks)
        for (int r = 0; r < m->tp; r++)
            free_rank(m, &m->ranks[r]);
    free(m->ranks);
    m->ranks = NULL;
}

int rt_tp_run_step(rt_model *m, char *err, size_t errlen)
{
    rt_tp_threads *t = m->threads;
    if (t) {
        pthread_mutex_lock(&t->mu);
        t->n_done = 0;
        t->gen++;
        pthread_cond_broadcast(&t->go);
        pthread_mutex_unlock(&t->mu);
    }
    rt_forward_rank(m, &m->ranks[0]);
    if (t) {
        pthread_mutex_lock(&t->mu);
        while (t->n_done < m->tp - 1)
            pthread_cond_wait(&t->done, &t->mu);
        pthread_mutex_unlock(&t->mu);
    }
    for (int r = 0; r < m->tp; r++)
        if (m->ranks[r].rc != 0)
            return ERR("forward: tp rank %d: %s", r, m->ranks[r].err);
    return 0;
}
