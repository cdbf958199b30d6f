/*
 * scheduler.c - the engine: admission, continuous batching over a paged KV
 * pool with chunked prefill, prefix caching and preemption, sampling, stop
 * conditions, notification and metrics.
 *
 * Invariants:
 * - A request is in exactly one place: the inbox (submitted, not yet seen by
 *   the engine), the waiting list (sorted by priority, then arrival), the
 *   running array (sorted the same way), or nowhere (finished). Only the
 *   engine thread moves it out of the inbox.
 * - A running request owns a block table whose slots cover its computed
 *   tokens; a waiting one owns none (a preempted request gave its blocks back
 *   and will recompute, usually hitting its own blocks in the prefix cache).
 * - seq = prompt + generated tokens; n_computed of them have KV in the pool.
 *   A running request computes seq[n_computed..] in chunks; when n_computed
 *   reaches the length of seq the step's logits give the next token.
 * - Engine-private fields are touched only on the engine thread. Output fields
 *   (text, tokens, finish) are written by the engine under the request's mutex
 *   and read by others under it.
 * - The engine holds one reference from submit until the request finishes.
 */
#include "scheduler/scheduler.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "scheduler/block_manager.h"
#include "scheduler/kv_slab.h"

_Static_assert(SCHED_SLAB_SUB == RT_KVQ_SUB, "page ids: one encoding");

struct sched_request {
    atomic_int refs;
    atomic_bool cancel;
    sched_params p;
    sched_notify_fn notify;
    void *user;
    struct sched_request *next; /* inbox / waiting list link */
    uint64_t arrival_seq;       /* FCFS order among equal priorities */
    sched_request *leader;      /* first choice of the same HTTP request, or NULL */

    pthread_mutex_t mu; /* guards the output fields below */
    char *text;         /* raw generated text (stop strings not yet cut) */
    size_t text_raw, text_cap;
    size_t text_final; /* bytes that are final */
    int32_t *tokens;   /* generated; capacity max_tokens */
    int n_tokens;
    float *lp;        /* logprobs >= 0: max_tokens entries */
    int32_t *top_ids; /* max_tokens * logprobs */
    float *top_lps;
    size_t *tok_end; /* max_tokens entries */
    sched_finish finish;
    char error[256];
    double t_arrival, t_first, t_finish;
    rt_attn_stats attn_out; /* copy of attn, published under mu */
    int prefix_hit_tokens;

    /* engine thread only */
    rt_attn_stats attn;
    int32_t *seq; /* prompt then generated tokens; capacity n_prompt + max_tokens */
    int n_seq;
    int n_computed;
    int n_preempted;
    bool started; /* sampler and logits exist */
    bool running;
    sched_block_table bt;
    rt_kvq *kvq; /* compressed KV state, or NULL (fp) */
    rt_sampler sampler;
    float *logits;
    double t_last_token;
};

struct sched_engine {
    rt_model *model;
    sched_opts opts;
    int n_ctx, n_vocab, max_batch_tokens;
    int32_t eos;
    const rt_tokenizer *tok;
    sched_forward_fn forward;
    void *forward_ctx;
    rt_kv_pool *pool;
    bool own_pool;
    sched_bm *bm;
    sched_slab *slab; /* pool blocks cut into compressed pages */
    int watermark_blocks;
    pthread_t thread;
    bool has_thread;
    pthread_mutex_t mu; /* guards inbox, n_inbox, n_outstanding, stop, cancel_all, stats */
    pthread_cond_t cv;
    sched_request *inbox, *inbox_tail;
    int n_inbox;
    int n_outstanding; /* submitted and not yet finished */
    uint64_t next_arrival;
    bool stop;
    bool cancel_all;
    sched_stats stats;

    /* engine thread only */
    sched_request *waiting;
    int n_waiting;
    sched_request **running;
    int n_running;
    rt_seq_batch *batch;
    sched_request **batch_req;
    int n_batch;
};

double sched_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- histograms ----------------------------------------------------------- */

static void hist_init(sched_hist *h, const double *bounds, int n)
{
    memset(h, 0, sizeof(*h));
    h->n_bounds = n < SCHED_HIST_MAX ? n : SCHED_HIST_MAX;
    memcpy(h->bounds, bounds, sizeof(double) * (size_t)h->n_bounds);
}

void sched_hist_observe(sched_hist *h, double v)
{
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i])
        i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

static void init_stats(sched_engine *e)
{
    static const double lat[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                 0.5,   1,      2.5,   5,    10,    30,   60,  120};
    static const double tok[] = {0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                                 0.1,    0.2,   0.5,   1,     2.5,  5};
    static const double step[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                  0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
    static const double batch[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
    hist_init(&e->stats.ttft, lat, sizeof(lat) / sizeof(lat[0]));
    hist_init(&e->stats.e2e, lat, sizeof(lat) / sizeof(lat[0]));
    hist_init(&e->stats.tpot, tok, sizeof(tok) / sizeof(tok[0]));
    hist_init(&e->stats.step_time, step, sizeof(step) / sizeof(step[0]));
    hist_init(&e->stats.batch_tokens, batch, sizeof(batch) / sizeof(batch[0]));
}

/* ---- requests ----------------------------------------------------------- */

static void free_params(sched_params *p)
{
    free((void *)p->sampling.logit_bias);
    free(p->prompt);
    for (int i = 0; i < p->n_stop; i++)
        free(p->stop[i]);
}

static void request_free(sched_request *r)
{
    if (r->leader)
        sched_request_release(r->leader); /* the reference taken at submit */
    free_params(&r->p);
    free(r->tokens);
    free(r->tok_end);
    free(r->lp);
    free(r->top_ids);
    free(r->top_lps);
    free(r->text);
    free(r->seq);
    rt_sampler_free(&r->sampler);
    free(r->logits);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

sched_request *sched_request_create(const sched_params *p, sched_notify_fn notify, void *user)
{
    if (p->n_prompt <= 0 || p->max_tokens <= 0 || p->n_stop < 0 || p->n_stop > SCHED_MAX_STOP ||
        p->logprobs > SCHED_MAX_LOGPROBS || p->sampling.n_logit_bias < 0 ||
        p->sampling.n_logit_bias > RT_MAX_LOGIT_BIAS || p->n_prompt > INT32_MAX - p->max_tokens)
        return NULL;
    sched_request *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancel, false);
    pthread_mutex_init(&r->mu, NULL);
    r->p = *p;
    r->p.n_stop = 0;
    r->p.sampling.logit_bias = NULL;
    r->p.prompt = malloc(sizeof(int32_t) * (size_t)p->n_prompt);
    r->seq = malloc(sizeof(int32_t) * ((size_t)p->n_prompt + (size_t)p->max_tokens));
    r->tokens = malloc(sizeof(int32_t) * (size_t)p->max_tokens);
    r->tok_end = malloc(sizeof(size_t) * (size_t)p->max_tokens);
    bool ok = r->p.prompt && r->seq && r->tokens && r->tok_end;
    if (ok && p->logprobs >= 0) {
        const size_t k = (size_t)p->max_tokens * (size_t)(p->logprobs > 0 ? p->logprobs : 1);
        r->lp = malloc(sizeof(float) * (size_t)p->max_tokens);
        r->top_ids = malloc(sizeof(int32_t) * k);
        r->top_lps = malloc(sizeof(float) * k);
        ok = r->lp && r->top_ids && r->top_lps;
    }
    if (ok && p->sampling.n_logit_bias > 0) {
        rt_logit_bias *b = malloc(sizeof(*b) * (size_t)p->sampling.n_logit_bias);
        ok = b != NULL;
        if (ok)
            memcpy(b, p->sampling.logit_bias, sizeof(*b) * (size_t)p->sampling.n_logit_bias);
        r->p.sampling.logit_bias = b;
    }
    for (int i = 0; ok && i < p->n_stop; i++) {
        r->p.stop[i] = strdup(p->stop[i]);
        ok = r->p.stop[i] != NULL;
        r->p.n_stop = i + 1;
    }
    if (!ok) {
        request_free(r);
        return NULL;
    }
    memcpy(r->p.prompt, p->prompt, sizeof(int32_t) * (size_t)p->n_prompt);
    memcpy(r->seq, p->prompt, sizeof(int32_t) * (size_t)p->n_prompt);
    r->n_seq = p->n_prompt;
    r->notify = notify;
    r->user = user;
    r->t_arrival = sched_now();
    return r;
}

void sched_request_release(sched_request *r)
{
    if (r && atomic_fetch_sub(&r->refs, 1) == 1)
        request_free(r);
}

void sched_request_cancel(sched_request *r)
{
    atomic_store(&r->cancel, true);
}

int sched_request_n_computed(const sched_request *r)
{
    return r->n_computed;
}
int sched_request_n_preempted(const sched_request *r)
{
    return r->n_preempted;
}

int sched_request_output(sched_request *r, size_t text_from, sched_output *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&r->mu);
    const size_t from = text_from < r->text_final ? text_from : r->text_final;
    const size_t n = r->text_final - from;
    out->text = malloc(n + 1);
    if (out->text) {
        if (n)
            memcpy(out->text, r->text + from, n);
        out->text[n] = 0;
    }
    out->text_len = r->text_final;
    out->tokens = r->tokens;
    out->n_tokens = r->n_tokens;
    out->lp = r->lp;
    out->top_ids = r->top_ids;
    out->top_lps = r->top_lps;
    out->top_n = r->p.logprobs > 0 ? r->p.logprobs : 0;
    out->tok_end = r->tok_end;
    out->n_prompt = r->p.n_prompt;
    out->finish = r->finish;
    memcpy(out->error, r->error, sizeof(out->error));
    out->t_arrival = r->t_arrival;
    out->t_first_token = r->t_first;
    out->t_finish = r->t_finish;
    out->attn = r->attn_out;
    out->prefix_hit_tokens = r->prefix_hit_tokens;
    pthread_mutex_unlock(&r->mu);
    return out->text ? 0 : -1;
}

/* ---- output text and stop strings --------------------------------------- */

/* Length of the longest suffix of text that is a proper prefix of stop. */
static size_t partial_stop_suffix(const char *text, size_t len, const char *stop)
{
    const size_t sl = strlen(stop);
    for (size_t k = sl - 1 < len ? sl - 1 : len; k > 0; k--)
        if (memcmp(text + len - k, stop, k) == 0)
            return k;
    return 0;
}

/* Bytes at the end of text that start an unfinished UTF-8 character. */
static size_t incomplete_utf8_tail(const char *text, size_t len)
{
    for (size_t back = 1; back <= 4 && back <= len; back++) {
        const unsigned char c = (unsigned char)text[len - back];
        if ((c & 0xC0) == 0x80)
            continue; /* continuation byte: keep looking for the lead */
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > back ? back : 0;
    }
    return 0;
}

/* Appends a token's bytes; returns true when a stop string completed (the
 * text is then cut where the stop string begins). Called under r->mu. */
static bool append_text(sched_request *r, const char *bytes, size_t n)
{
    if (r->text_raw + n + 1 > r->text_cap) {
        size_t cap = r->text_cap ? r->text_cap * 2 : 256;
        while (cap < r->text_raw + n + 1)
            cap *= 2;
        char *t = realloc(r->text, cap);
        if (!t)
            return false;
        r->text = t;
        r->text_cap = cap;
    }
    const size_t old = r->text_raw;
    memcpy(r->text + old, bytes, n);
    r->text_raw += n;
    r->text[r->text_raw] = 0;
    /* The earliest match wins, whichever stop string it is. */
    const char *first = NULL;
    for (int i = 0; i < r->p.n_stop; i++) {
        const char *stop = r->p.stop[i];
        const size_t sl = strlen(stop);
        const size_t from = old >= sl ? old - sl + 1 : 0;
        const char *hit = memmem(r->text + from, r->text_raw - from, stop, sl);
        if (hit && (!first || hit < first))
            first = hit;
    }
    if (first) {
        r->text_raw = (size_t)(first - r->text);
        r->text_final = r->text_raw;
        return true;
    }
    size_t hold = incomplete_utf8_tail(r->text, r->text_raw);
    for (int i = 0; i < r->p.n_stop; i++) {
        const size_t k = partial_stop_suffix(r->text, r->text_raw, r->p.stop[i]);
        if (k > hold)
            hold = k;
    }
    r->text_final = r->text_raw - hold;
    return false;
}

/* ---- engine: bookkeeping ------------------------------------------------ */

/* Priority first (lower first), then arrival. */
static bool runs_before(const sched_request *a, const sched_request *b)
{
    if (a->p.priority != b->p.priority)
        return a->p.priority < b->p.priority;
    return a->arrival_seq < b->arrival_seq;
}

static void waiting_insert(sched_engine *e, sched_request *r)
{
    sched_request **pp = &e->waiting;
    while (*pp && !runs_before(r, *pp))
        pp = &(*pp)->next;
    r->next = *pp;
    *pp = r;
    e->n_waiting++;
}

static void running_insert(sched_engine *e, sched_request *r)
{
    int i = e->n_running;
    while (i > 0 && runs_before(r, e->running[i - 1])) {
        e->running[i] = e->running[i - 1];
        i--;
    }
    e->running[i] = r;
    e->n_running++;
    r->running = true;
}

static void running_remove(sched_engine *e, sched_request *r)
{
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i] == r) {
            memmove(&e->running[i], &e->running[i + 1],
                    sizeof(*e->running) * (size_t)(e->n_running - i - 1));
            e->n_running--;
            break;
        }
    r->running = false;
}

/* Gives back every block of r, fp and compressed, and its compressed state. */
static void drop_kv(sched_engine *e, sched_request *r)
{
    sched_bm_release(e->bm, &r->bt);
    sched_slab_give_kvq(e->slab, r->kvq);
    rt_kvq_destroy(r->kvq);
    r->kvq = NULL;
}

static void finish_request(sched_engine *e, sched_request *r, sched_finish why, const char *msg)
{
    const double now = sched_now();
    pthread_mutex_lock(&r->mu);
    r->finish = why;
    r->attn_out = r->attn;
    r->text_final = r->text_raw; /* held-back bytes are final now */
    r->t_finish = now;
    if (msg)
        snprintf(r->error, sizeof(r->error), "%s", msg);
    const int n_tokens = r->n_tokens;
    pthread_mutex_unlock(&r->mu);
    if (r->running)
        running_remove(e, r);
    drop_kv(e, r);
    free(r->logits);
    r->logits = NULL;
    rt_sampler_free(&r->sampler);
    pthread_mutex_lock(&e->mu);
    e->n_outstanding--;
    e->stats.requests_finished++;
    e->stats.finished_by_reason[why]++;
    const int pol = (int)r->p.policy.prefill;
    if (pol >= 0 && pol < 3) {
        e->stats.policy_requests[pol]++;
        e->stats.policy_blocks_computed[pol] += (uint64_t)r->attn.computed;
        e->stats.policy_blocks_causal[pol] += (uint64_t)r->attn.causal;
    }
    if (why == SCHED_FINISH_STOP || why == SCHED_FINISH_LENGTH) {
        sched_hist_observe(&e->stats.e2e, now - r->t_arrival);
        if (n_tokens > 1)
            sched_hist_observe(&e->stats.tpot, (now - r->t_first) / (n_tokens - 1));
    }
    pthread_mutex_unlock(&e->mu);
    if (r->notify)
        r->notify(r, true, r->user);
    sched_request_release(r);
}

/* Gives the request's blocks back; it returns to the waiting list (in its
 * original place: its arrival order is kept) and will recompute. */
static void preempt(sched_engine *e, sched_request *r)
{
    running_remove(e, r);
    drop_kv(e, r);
    r->n_computed = 0;
    r->n_preempted++;
    waiting_insert(e, r);
    pthread_mutex_lock(&e->mu);
    e->stats.preemptions++;
    pthread_mutex_unlock(&e->mu);
}

/* Samples the next token from r->logits: logprobs come from the model's raw
 * distribution; min_tokens bans EOS before the draw. */
static int32_t choose_token(sched_engine *e, sched_request *r)
{
    const int i = r->n_tokens; /* only the engine writes n_tokens */
    const bool ban_eos = r->p.min_tokens > i && e->eos >= 0 && !r->p.ignore_eos;
    float eos_logit = 0.0f;
    if (ban_eos) {
        eos_logit = r->logits[e->eos];
        r->logits[e->eos] = -INFINITY;
    }
    const int32_t tok = (int32_t)rt_sample(&r->sampler, r->logits);
    if (ban_eos)
        r->logits[e->eos] = eos_logit; /* logprobs describe the model, not the ban */
    if (r->lp) {
        const int k = r->p.logprobs;
        r->lp[i] = rt_logprobs(r->logits, e->n_vocab, tok, k, r->top_ids + (size_t)i * (size_t)k,
                               r->top_lps + (size_t)i * (size_t)k);
    }
    rt_sampler_accept(&r->sampler, tok);
    return tok;
}

/* Records a sampled token and applies the stop conditions. */
static void accept_token(sched_engine *e, sched_request *r, int32_t tok)
{
    char piece[256];
    size_t n = e->tok ? rt_token_to_bytes(e->tok, tok, piece, sizeof(piece)) : 0;
    if (n > sizeof(piece))
        n = sizeof(piece);
    const double now = sched_now();
    sched_finish why = SCHED_FINISH_NONE;
    pthread_mutex_lock(&r->mu);
    r->tokens[r->n_tokens++] = tok;
    const bool first = r->n_tokens == 1;
    if (first)
        r->t_first = now;
    if (tok == e->eos && !r->p.ignore_eos)
        why = SCHED_FINISH_STOP;
    else if (append_text(r, piece, n))
        why = SCHED_FINISH_STOP;
    else if (r->n_tokens >= r->p.max_tokens)
        why = SCHED_FINISH_LENGTH;
    r->tok_end[r->n_tokens - 1] = r->text_raw;
    r->attn_out = r->attn;
    pthread_mutex_unlock(&r->mu);
    r->seq[r->n_seq++] = tok;
    if (first) {
        pthread_mutex_lock(&e->mu);
        sched_hist_observe(&e->stats.ttft, now - r->t_arrival);
        pthread_mutex_unlock(&e->mu);
    }
    if (why != SCHED_FINISH_NONE)
        finish_request(e, r, why, NULL);
    else if (r->notify)
        r->notify(r, false, r->user);
}

/* ---- engine: one step ----------------------------------------------------- */

static void take_inbox(sched_engine *e, bool block)
{
    pthread_mutex_lock(&e->mu);
    while (block && !e->stop && !e->cancel_all && !e->inbox && e->n_running == 0 && !e->waiting)
        pthread_cond_wait(&e->cv, &e->mu);
    sched_request *in = e->inbox;
    e->inbox = e->inbox_tail = NULL;
    e->n_inbox = 0;
    pthread_mutex_unlock(&e->mu);
    while (in) {
        sched_request *next = in->next;
        waiting_insert(e, in);
        in = next;
    }
}

static bool past_deadline(const sched_request *r, double now)
{
    return r->p.timeout_s > 0 && now - r->t_arrival > r->p.timeout_s;
}

/* Finishes cancelled requests (all of them when `all`) and those past their
 * deadline; their blocks are free before the step runs. */
static void drop_cancelled(sched_engine *e, bool all)
{
    const double now = sched_now();
    for (sched_request **pp = &e->waiting; *pp;) {
        sched_request *r = *pp;
        const bool late = past_deadline(r, now);
        if (all || late || atomic_load(&r->cancel)) {
            *pp = r->next;
            e->n_waiting--;
            finish_request(e, r, late && !all ? SCHED_FINISH_TIMEOUT : SCHED_FINISH_CANCELLED,
                           late && !all ? "the request's deadline passed" : NULL);
        } else {
            pp = &r->next;
        }
    }
    for (int i = e->n_running - 1; i >= 0; i--) {
        sched_request *r = e->running[i];
        const bool late = past_deadline(r, now);
        if (all || late || atomic_load(&r->cancel))
            finish_request(e, r, late && !all ? SCHED_FINISH_TIMEOUT : SCHED_FINISH_CANCELLED,
                           late && !all ? "the request's deadline passed" : NULL);
    }
}

/* The first choice of a request computes the shared prompt; its siblings wait
 * until that is done and then find the prompt's full blocks in the prefix
 * cache instead of computing them again. */
static bool sibling_must_wait(const sched_engine *e, const sched_request *r)
{
    const sched_request *l = r->leader;
    return e->opts.prefix_caching && l && l->running && l->n_computed < l->p.n_prompt &&
           r->n_preempted == 0;
}

/* Blocks an int8/int4 request needs at admission: its prefix hits that are
 * only cached now, and fresh blocks for the pages of the rest of its prompt. */
static int pages_blocks_needed(sched_engine *e, const sched_request *r, bool private_kv)
{
    int fmt, n_sub, slots;
    if (rt_kvq_class_geom(e->pool, &r->p.kv, 0, &fmt, &n_sub, &slots) != 0)
        return -1;
    int in_lru = 0;
    const int hits = private_kv ? 0 : sched_bm_prefix_hits(e->bm, r->seq, r->n_seq, &in_lru);
    const int tokens = r->n_seq - hits * sched_bm_block_size(e->bm);
    const int blocks = sched_slab_blocks_needed(e->slab, fmt, n_sub, (tokens + slots - 1) / slots);
    return blocks < 0 ? -1 : blocks + in_lru;
}

static void admit(sched_engine *e)
{
    for (sched_request **pp = &e->waiting; *pp && e->n_running < e->opts.max_running_seqs;) {
        sched_request *r = *pp;
        if (sibling_must_wait(e, r)) {
            pp = &r->next;
            continue;
        }
        /* KV computed under a sparse policy differs from dense KV: such a
         * sequence neither reuses nor publishes prefix-cache blocks. */
        const bool private_kv = r->p.policy.prefill != RT_PREFILL_DENSE;
        /* int8/int4 sequences pack every chunk into pages: they take fp
         * blocks only for prefix-cache hits, and their prompt's pages. */
        const bool direct = r->p.kv.format != RT_KV_FP && !rt_kv_policy_fp_prompt(&r->p.kv);
        const int need = direct
                             ? pages_blocks_needed(e, r, private_kv)
                             : sched_bm_blocks_needed(e->bm, private_kv ? NULL : r->seq, r->n_seq);
        /* New work keeps a small reserve so running sequences can still grow;
         * a preempted sequence may use it, or it might never come back. */
        const int reserve = r->n_preempted || e->n_running == 0 ? 0 : e->watermark_blocks;
        if (need < 0 || need + reserve > sched_bm_free_count(e->bm))
            break; /* first come, first served: nothing behind it jumps the queue */
        if (!r->started) {
            r->logits = malloc(sizeof(float) * (size_t)e->n_vocab);
            if (!r->logits || rt_sampler_init(&r->sampler, &r->p.sampling, e->n_vocab) != 0) {
                *pp = r->next;
                e->n_waiting--;
                finish_request(e, r, SCHED_FINISH_ERROR, "out of memory");
                continue;
            }
            rt_sampler_set_prompt(&r->sampler, r->p.prompt, r->p.n_prompt);
            r->started = true;
        }
        if (direct ? (!private_kv && sched_bm_allocate_prefix(e->bm, &r->bt, r->seq, r->n_seq) != 0)
                   : (private_kv ? sched_bm_allocate_private(e->bm, &r->bt, r->n_seq)
                                 : sched_bm_allocate_prompt(e->bm, &r->bt, r->seq, r->n_seq)) != 0)
            break;
        r->n_computed = r->bt.n_cached;
        if (r->p.kv.format != RT_KV_FP && e->model) {
            char why[256];
            r->kvq = rt_kvq_create(e->model, e->pool, &r->p.kv, r->n_seq, r->n_computed,
                                   r->p.sampling.seed ? r->p.sampling.seed : 0x5eedULL, why,
                                   sizeof(why));
            if (!r->kvq) {
                sched_bm_release(e->bm, &r->bt);
                *pp = r->next;
                e->n_waiting--;
                finish_request(e, r, SCHED_FINISH_ERROR, why);
                continue;
            }
        }
        if (!r->n_preempted) {
            pthread_mutex_lock(&r->mu);
            r->prefix_hit_tokens = r->bt.n_cached;
            pthread_mutex_unlock(&r->mu);
        }
        *pp = r->next;
        e->n_waiting--;
        r->next = NULL;
        running_insert(e, r);
    }
}

/* Reserves the slots for n more tokens of r, preempting the sequences that run
 * after it (youngest / lowest priority first) while blocks are short. Returns
 * false when r itself had to be preempted. */
/* The pages r's compressed cache needs for a step of n tokens, taken from
 * the slab and handed to it. false when blocks are short (pages already
 * taken for other classes stay with r: it will need them). */
static bool reserve_pages(sched_engine *e, sched_request *r, int n)
{
    return !r->kvq || sched_slab_feed_kvq(e->slab, r->kvq, r->n_computed, n) == 0;
}

static bool reserve_slots(sched_engine *e, sched_request *r, int n)
{
    const bool fp_rows = !r->kvq || rt_kvq_needs_fp(r->kvq, n);
    int need = fp_rows ? r->n_computed + n - r->bt.n_tokens : 0;
    for (;;) {
        sched_bm_copy cow = {-1, -1};
        if (need <= 0 || sched_bm_append(e->bm, &r->bt, need, &cow) == 0) {
            if (cow.src >= 0)
                rt_kv_pool_copy_block(e->pool, cow.src, cow.dst);
            if (reserve_pages(e, r, n))
                return true;
            /* The fp slots stay reserved; only compressed pages are short. */
            need = 0;
        }
        sched_request *victim = e->running[e->n_running - 1];
        for (int i = 0; i < e->n_batch; i++)
            if (e->batch_req[i] == victim)
                victim = r; /* never take blocks from a sequence already in this batch */
        preempt(e, victim);
        if (victim == r)
            return false;
    }
}

static void add_to_batch(sched_engine *e, sched_request *r, int n)
{
    const bool last = r->n_computed + n == r->n_seq;
    e->batch[e->n_batch] = (rt_seq_batch){
        .tokens = r->seq + r->n_computed,
        .n_tokens = n,
        .logits = last ? r->logits : NULL,
        .pool = e->pool,
        .blocks = r->bt.blocks,
        .n_blocks = r->bt.n_blocks,
        .n_past = r->n_computed,
        .policy = r->p.policy.prefill != RT_PREFILL_DENSE ? &r->p.policy : NULL,
        .stats = &r->attn,
        .kvq = r->kvq,
    };
    e->batch_req[e->n_batch++] = r;
}

static void build_batch(sched_engine *e)
{
    int budget = e->max_batch_tokens;
    e->n_batch = 0;
    /* Decodes first: a running stream gets its token every step. */
    for (int i = 0; i < e->n_running && budget > 0; i++) {
        sched_request *r = e->running[i];
        if (r->n_seq - r->n_computed != 1 || r->n_computed < r->p.n_prompt)
            continue;
        if (!reserve_slots(e, r, 1)) {
            i--; /* r left the running array */
            continue;
        }
        add_to_batch(e, r, 1);
        budget--;
    }
    /* Then prompt chunks (and the recomputation of preempted sequences). */
    for (int i = 0; i < e->n_running && budget > 0; i++) {
        sched_request *r = e->running[i];
        const int left = r->n_seq - r->n_computed;
        if (left <= 0 || (left == 1 && r->n_computed >= r->p.n_prompt))
            continue;
        const int n = left < budget ? left : budget;
        if (!reserve_slots(e, r, n)) {
            i--;
            continue;
        }
        add_to_batch(e, r, n);
        budget -= n;
    }
}

/* Publishes the engine's gauges and this step's counters under the lock. */
static void publish_stats(sched_engine *e, bool stepped, double dt, int batch_tokens,
                          uint64_t prompt_tokens, uint64_t generated)
{
    uint64_t q, h;
    sched_bm_prefix_stats(e->bm, &q, &h);
    pthread_mutex_lock(&e->mu);
    if (stepped) {
        e->stats.steps++;
        sched_hist_observe(&e->stats.step_time, dt);
        sched_hist_observe(&e->stats.batch_tokens, batch_tokens);
    }
    e->stats.prompt_tokens += prompt_tokens;
    e->stats.generated_tokens += generated;
    e->stats.running = e->n_running;
    e->stats.waiting = e->n_waiting + e->n_inbox;
    e->stats.prefix_query_tokens = q;
    e->stats.prefix_hit_tokens = h;
    e->stats.kv_blocks_used = sched_bm_used_count(e->bm);
    e->stats.kv_blocks_cached = sched_bm_cached_count(e->bm);
    memset(e->stats.kv_blocks_by_format, 0, sizeof(e->stats.kv_blocks_by_format));
    const double block_bytes = (double)e->stats.kv_block_bytes;
    for (int i = 0; i < e->n_running; i++) {
        const rt_kvq *kq = e->running[i]->kvq;
        if (kq && block_bytes > 0)
            e->stats.kv_blocks_by_format[rt_kvq_format(kq)] += rt_kvq_bytes_held(kq) / block_bytes;
    }
    e->stats.kv_blocks_by_format[RT_KV_FP] = e->stats.kv_blocks_used - sched_slab_blocks(e->slab);
    pthread_mutex_unlock(&e->mu);
}

int sched_engine_step(sched_engine *e)
{
    take_inbox(e, false);
    pthread_mutex_lock(&e->mu);
    const bool all = e->stop || e->cancel_all;
    e->cancel_all = false;
    pthread_mutex_unlock(&e->mu);
    drop_cancelled(e, all);
    admit(e);
    build_batch(e);
    const int nb = e->n_batch;
    if (nb == 0) {
        if (e->n_running == 0 && e->waiting && sched_bm_used_count(e->bm) == 0) {
            /* Nothing runs and the head still does not fit: it never will. */
            sched_request *r = e->waiting;
            e->waiting = r->next;
            e->n_waiting--;
            finish_request(e, r, SCHED_FINISH_ERROR, "the prompt does not fit the KV cache");
        }
        publish_stats(e, false, 0.0, 0, 0, 0);
        return 0;
    }
    const double t0 = sched_now();
    char err[256];
    int total = 0;
    for (int i = 0; i < nb; i++)
        total += e->batch[i].n_tokens;
    if (e->forward(e->forward_ctx, e->batch, nb, err, sizeof(err)) != 0) {
        for (int i = 0; i < nb; i++)
            finish_request(e, e->batch_req[i], SCHED_FINISH_ERROR, err);
        e->n_batch = 0; /* those requests may be gone */
        publish_stats(e, true, sched_now() - t0, total, 0, 0);
        return nb;
    }
    uint64_t prompt_tokens = 0, generated = 0;
    for (int i = 0; i < nb; i++) {
        sched_request *r = e->batch_req[i];
        const int from = r->n_computed, to = from + e->batch[i].n_tokens;
        const int np = r->p.n_prompt;
        prompt_tokens += (uint64_t)((to < np ? to : np) - (from < np ? from : np));
        r->n_computed = to;
        const int compressed = rt_kvq_n_compressed(r->kvq);
        /* Only a table that covers every computed token publishes its full
         * blocks (an int8/int4 table holds just its prefix hits). */
        if ((r->bt.n_blocks == 0 || r->bt.blocks[0] >= 0) && r->bt.n_tokens >= r->n_computed)
            sched_bm_commit(e->bm, &r->bt, r->seq, r->n_computed);
        if (compressed > 0)
            sched_bm_release_leading(e->bm, &r->bt,
                                     compressed >= r->bt.n_tokens
                                         ? r->bt.n_blocks
                                         : compressed / sched_bm_block_size(e->bm));
    }
    for (int i = 0; i < nb; i++) {
        sched_request *r = e->batch_req[i];
        if (e->batch[i].logits) {
            accept_token(e, r, choose_token(e, r));
            generated++;
        }
    }
    publish_stats(e, true, sched_now() - t0, total, prompt_tokens, generated);
    return nb;
}

int sched_engine_check_kv(const sched_engine *e, const rt_kv_policy *p, double *bytes_per_token,
                          char *err, size_t errlen)
{
    if (bytes_per_token)
        *bytes_per_token = (double)e->stats.kv_bytes_per_token;
    if (!p || p->format == RT_KV_FP)
        return 0;
    if (!e->model) {
        snprintf(err, errlen, "compressed KV caches need a model");
        return -1;
    }
    if (rt_kvq_check(e->model, e->pool, p, err, errlen) != 0)
        return -1;
    if (bytes_per_token)
        *bytes_per_token = rt_kvq_bytes_per_token(e->pool, p);
    return 0;
}

int sched_engine_last_batch(sched_engine *e, sched_request **reqs, int *n_tokens, int cap)
{
    int n = e->n_batch < cap ? e->n_batch : cap;
    for (int i = 0; i < n; i++) {
        reqs[i] = e->batch_req[i];
        n_tokens[i] = e->batch[i].n_tokens;
    }
    return n;
}

static void *engine_main(void *arg)
{
    sched_engine *e = arg;
    for (;;) {
        take_inbox(e, true);
        pthread_mutex_lock(&e->mu);
        const bool stop = e->stop;
        pthread_mutex_unlock(&e->mu);
        if (stop) {
            drop_cancelled(e, true);
            return NULL;
        }
        if (sched_engine_step(e) == 0 && (e->n_running > 0 || e->waiting)) {
            /* Blocked on memory with nothing to run: wait for a change. */
            pthread_mutex_lock(&e->mu);
            if (!e->inbox && !e->stop && !e->cancel_all) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 10 * 1000 * 1000;
                if (ts.tv_nsec >= 1000000000L) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000L;
                }
                pthread_cond_timedwait(&e->cv, &e->mu, &ts);
            }
            pthread_mutex_unlock(&e->mu);
        }
    }
}

static int model_forward(void *ctx, rt_seq_batch *seqs, int n, char *err, size_t errlen)
{
    return rt_forward(ctx, seqs, n, err, errlen);
}

/* Blocks for the configured budget; 0 means enough for every running
 * sequence's full context, capped at a quarter of the available memory. */
static int64_t pool_blocks(const sched_opts *o, size_t bytes_per_token, int block_size, int n_ctx)
{
    const int64_t block_bytes = (int64_t)bytes_per_token * block_size;
    int64_t budget = o->kv_cache_bytes;
    if (budget <= 0) {
        budget = (int64_t)o->max_running_seqs * n_ctx * (int64_t)bytes_per_token;
        long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
        if (pages > 0 && page > 0 && budget > (int64_t)pages * page / 4)
            budget = (int64_t)pages * page / 4;
    }
    return budget / block_bytes;
}

sched_engine *sched_engine_create(rt_model *model, const sched_opts *opts, char *err, size_t errlen)
{
    sched_engine *e = calloc(1, sizeof(*e));
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->model = model;
    e->opts = *opts;
    if (e->opts.max_running_seqs < 1)
        e->opts.max_running_seqs = 1;
    const int bs = opts->kv_block_size > 0 ? opts->kv_block_size : 16;
    if (model) {
        e->n_ctx = rt_model_n_ctx(model);
        e->n_vocab = rt_model_hparams(model)->n_vocab;
        e->tok = rt_model_tokenizer(model);
        e->eos = rt_tokenizer_eos(e->tok);
        e->max_batch_tokens = rt_model_max_batch_tokens(model);
        e->forward = model_forward;
        e->forward_ctx = model;
        const int64_t nb = pool_blocks(&e->opts, rt_kv_bytes_per_token(model), bs, e->n_ctx);
        const int64_t min_blocks = (e->n_ctx + bs - 1) / bs;
        if (nb < min_blocks) {
            snprintf(err, errlen,
                     "the KV cache budget holds %lld blocks of %d tokens; one full context "
                     "needs %lld (raise kv_cache_bytes or lower context_length)",
                     (long long)nb, bs, (long long)min_blocks);
            free(e);
            return NULL;
        }
        e->pool = rt_kv_pool_create(model, nb > INT32_MAX ? INT32_MAX : (int)nb, bs);
        e->own_pool = true;
        e->stats.kv_bytes_per_token = rt_kv_bytes_per_token(model);
        e->stats.kv_block_bytes = e->stats.kv_bytes_per_token * (size_t)bs;
    } else {
        e->n_ctx = opts->n_ctx;
        e->n_vocab = opts->n_vocab;
        e->eos = opts->eos;
        e->max_batch_tokens = opts->max_batch_tokens;
        e->forward = opts->forward;
        e->forward_ctx = opts->forward_ctx;
        e->pool = opts->pool;
    }
    if (opts->max_batch_tokens > 0 && opts->max_batch_tokens < e->max_batch_tokens)
        e->max_batch_tokens = opts->max_batch_tokens;
    if (!e->pool || !e->forward || e->max_batch_tokens < 1) {
        snprintf(err, errlen, "cannot allocate the KV cache pool");
        if (e->own_pool)
            rt_kv_pool_destroy(e->pool);
        free(e);
        return NULL;
    }
    const int n_blocks = rt_kv_pool_blocks(e->pool);
    e->bm = sched_bm_create(n_blocks, rt_kv_pool_block_size(e->pool), opts->prefix_caching);
    e->slab = e->bm ? sched_slab_create(e->bm) : NULL;
    e->watermark_blocks = n_blocks / 100;
    e->stats.kv_blocks_total = n_blocks;
    e->stats.kv_block_size = rt_kv_pool_block_size(e->pool);
    init_stats(e);
    const int max_batch = e->opts.max_running_seqs + 1;
    e->running = calloc((size_t)e->opts.max_running_seqs + 1, sizeof(*e->running));
    e->batch = calloc((size_t)max_batch, sizeof(*e->batch));
    e->batch_req = calloc((size_t)max_batch, sizeof(*e->batch_req));
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    bool ok = e->bm && e->slab && e->running && e->batch && e->batch_req;
    if (ok && !opts->manual) {
        ok = pthread_create(&e->thread, NULL, engine_main, e) == 0;
        e->has_thread = ok;
    }
    if (!ok) {
        snprintf(err, errlen, "cannot start the engine");
        sched_engine_destroy(e);
        return NULL;
    }
    return e;
}

void sched_engine_destroy(sched_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->has_thread)
        pthread_join(e->thread, NULL);
    else if (e->bm)
        drop_cancelled(e, true);
    /* Requests submitted after the engine saw stop are still in the inbox. */
    take_inbox(e, false);
    if (e->bm)
        drop_cancelled(e, true);
    sched_slab_destroy(e->slab);
    sched_bm_destroy(e->bm);
    if (e->own_pool)
        rt_kv_pool_destroy(e->pool);
    free(e->running);
    free(e->batch);
    free(e->batch_req);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

int sched_submit_many(sched_engine *e, sched_request **rs, int n)
{
    const long slots = (long)rt_kv_pool_blocks(e->pool) * rt_kv_pool_block_size(e->pool);
    for (int i = 0; i < n; i++) {
        const long need = (long)rs[i]->p.n_prompt + rs[i]->p.max_tokens;
        if (need > e->n_ctx || need > slots)
            return SCHED_E_TOO_LONG;
    }
    pthread_mutex_lock(&e->mu);
    int rc = SCHED_OK;
    if (e->stop)
        rc = SCHED_E_STOPPING;
    else if (e->n_outstanding + n > e->opts.max_waiting + e->opts.max_running_seqs)
        rc = SCHED_E_QUEUE_FULL;
    for (int i = 0; rc == SCHED_OK && i < n; i++) {
        sched_request *r = rs[i];
        atomic_fetch_add(&r->refs, 1);
        e->n_outstanding++;
        e->stats.waiting++;
        r->arrival_seq = e->next_arrival++;
        r->leader = NULL;
        if (i > 0) { /* the sibling reads its leader's progress: keep it alive */
            atomic_fetch_add(&rs[0]->refs, 1);
            r->leader = rs[0];
        }
        r->t_arrival = sched_now();
        r->next = NULL;
        if (e->inbox_tail)
            e->inbox_tail->next = r;
        else
            e->inbox = r;
        e->inbox_tail = r;
        e->n_inbox++;
    }
    if (rc == SCHED_OK)
        pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int sched_submit(sched_engine *e, sched_request *r)
{
    return sched_submit_many(e, &r, 1);
}

void sched_engine_cancel_all(sched_engine *e)
{
    pthread_mutex_lock(&e->mu);
    e->cancel_all = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void sched_engine_stats(sched_engine *e, sched_stats *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    pthread_mutex_unlock(&e->mu);
}

int sched_engine_n_ctx(const sched_engine *e)
{
    return e->n_ctx;
}
