/*
 * scheduler.c - the engine thread: admission, continuous batching with
 * chunked prefill, sampling, stop conditions and notification.
 *
 * Invariants:
 * - A request is in exactly one place: the inbox (submitted, not yet seen by
 *   the engine), the waiting list, the running array, or nowhere (finished).
 *   Only the engine thread moves it out of the inbox.
 * - Engine-private fields (kv, sampler, logits, n_prefilled, last_token) are
 *   touched only on the engine thread. Output fields (text, tokens, finish)
 *   are written by the engine under the request's mutex and read by others
 *   under it.
 * - The engine holds one reference from submit until the request finishes.
 */
#include "scheduler/scheduler.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct sched_request {
    atomic_int refs;
    atomic_bool cancel;
    sched_params p;
    sched_notify_fn notify;
    void *user;
    struct sched_request *next; /* inbox / waiting list link */

    pthread_mutex_t mu; /* guards the output fields below */
    char *text;         /* raw generated text (stop strings not yet cut) */
    size_t text_raw, text_cap;
    size_t text_final; /* bytes that are final */
    int32_t *tokens;   /* capacity max_tokens */
    int n_tokens;
    sched_finish finish;
    char error[256];
    double t_arrival, t_first, t_finish;

    /* engine thread only */
    rt_kv *kv;
    rt_sampler sampler;
    float *logits;
    int n_prefilled;
    int32_t last_token;
};

struct sched_engine {
    rt_model *model;
    sched_opts opts;
    int n_ctx, n_vocab;
    int32_t eos;
    pthread_t thread;
    pthread_mutex_t mu; /* guards inbox, n_inbox, stop, stats */
    pthread_cond_t cv;
    sched_request *inbox, *inbox_tail;
    int n_inbox;
    int n_outstanding; /* submitted and not yet finished */
    bool stop;
    bool cancel_all;
    sched_stats stats;

    /* engine thread only */
    sched_request *waiting, *waiting_tail;
    int n_waiting;
    sched_request **running;
    int n_running;
    rt_seq_batch *batch;
    sched_request **batch_req;
};

double sched_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- requests ----------------------------------------------------------- */

static void free_params(sched_params *p)
{
    free(p->prompt);
    for (int i = 0; i < p->n_stop; i++)
        free(p->stop[i]);
}

sched_request *sched_request_create(const sched_params *p, sched_notify_fn notify, void *user)
{
    if (p->n_prompt <= 0 || p->max_tokens <= 0 || p->n_stop < 0 || p->n_stop > SCHED_MAX_STOP)
        return NULL;
    sched_request *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancel, false);
    r->p = *p;
    r->p.prompt = malloc(sizeof(int32_t) * (size_t)p->n_prompt);
    r->tokens = malloc(sizeof(int32_t) * (size_t)p->max_tokens);
    bool ok = r->p.prompt && r->tokens;
    r->p.n_stop = 0;
    for (int i = 0; ok && i < p->n_stop; i++) {
        r->p.stop[i] = strdup(p->stop[i]);
        ok = r->p.stop[i] != NULL;
        r->p.n_stop = i + 1;
    }
    if (!ok) {
        free_params(&r->p);
        free(r->tokens);
        free(r);
        return NULL;
    }
    memcpy(r->p.prompt, p->prompt, sizeof(int32_t) * (size_t)p->n_prompt);
    r->notify = notify;
    r->user = user;
    pthread_mutex_init(&r->mu, NULL);
    r->t_arrival = sched_now();
    return r;
}

static void request_free(sched_request *r)
{
    free_params(&r->p);
    free(r->tokens);
    free(r->text);
    rt_kv_destroy(r->kv);
    rt_sampler_free(&r->sampler);
    free(r->logits);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

void sched_request_release(sched_request *r)
{
    if (r && atomic_fetch_sub(&r->refs, 1) == 1)
        request_free(r);
}

void sched_request_cancel(sched_request *r) { atomic_store(&r->cancel, true); }

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
    out->n_prompt = r->p.n_prompt;
    out->finish = r->finish;
    memcpy(out->error, r->error, sizeof(out->error));
    out->t_arrival = r->t_arrival;
    out->t_first_token = r->t_first;
    out->t_finish = r->t_finish;
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
    for (int i = 0; i < r->p.n_stop; i++) {
        const char *stop = r->p.stop[i];
        const size_t sl = strlen(stop);
        const size_t from = old >= sl ? old - sl + 1 : 0;
        const char *hit = memmem(r->text + from, r->text_raw - from, stop, sl);
        if (hit) {
            r->text_raw = (size_t)(hit - r->text);
            r->text_final = r->text_raw;
            return true;
        }
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

/* ---- engine ------------------------------------------------------------- */

static void finish_request(sched_engine *e, sched_request *r, sched_finish why, const char *msg)
{
    pthread_mutex_lock(&r->mu);
    r->finish = why;
    r->text_final = r->text_raw; /* held-back bytes are final now */
    r->t_finish = sched_now();
    if (msg)
        snprintf(r->error, sizeof(r->error), "%s", msg);
    pthread_mutex_unlock(&r->mu);
    rt_kv_destroy(r->kv);
    r->kv = NULL;
    free(r->logits);
    r->logits = NULL;
    rt_sampler_free(&r->sampler);
    pthread_mutex_lock(&e->mu);
    e->n_outstanding--;
    e->stats.requests_finished++;
    e->stats.generated_tokens += (uint64_t)r->n_tokens;
    pthread_mutex_unlock(&e->mu);
    if (r->notify)
        r->notify(r, true, r->user);
    sched_request_release(r);
}

/* Records a sampled token and applies the stop conditions. */
static void accept_token(sched_engine *e, sched_request *r, int32_t tok)
{
    const rt_tokenizer *tk = rt_model_tokenizer(e->model);
    char piece[256];
    size_t n = rt_token_to_bytes(tk, tok, piece, sizeof(piece));
    if (n > sizeof(piece))
        n = sizeof(piece);
    sched_finish why = SCHED_FINISH_NONE;
    pthread_mutex_lock(&r->mu);
    r->tokens[r->n_tokens++] = tok;
    if (r->n_tokens == 1)
        r->t_first = sched_now();
    if (tok == e->eos && !r->p.ignore_eos)
        why = SCHED_FINISH_STOP;
    else if (append_text(r, piece, n))
        why = SCHED_FINISH_STOP;
    else if (r->n_tokens >= r->p.max_tokens)
        why = SCHED_FINISH_LENGTH;
    pthread_mutex_unlock(&r->mu);
    r->last_token = tok;
    if (why != SCHED_FINISH_NONE)
        finish_request(e, r, why, NULL);
    else if (r->notify)
        r->notify(r, false, r->user);
}

static bool admit(sched_engine *e, sched_request *r)
{
    const int cap = r->p.n_prompt + r->p.max_tokens;
    r->kv = rt_kv_create(e->model, cap);
    r->logits = malloc(sizeof(float) * (size_t)e->n_vocab);
    if (!r->kv || !r->logits || rt_sampler_init(&r->sampler, &r->p.sampling, e->n_vocab) != 0) {
        finish_request(e, r, SCHED_FINISH_ERROR, "out of memory for the KV cache");
        return false;
    }
    return true;
}

static void take_inbox(sched_engine *e)
{
    pthread_mutex_lock(&e->mu);
    while (!e->stop && !e->inbox && e->n_running == 0 && !e->waiting)
        pthread_cond_wait(&e->cv, &e->mu);
    sched_request *in = e->inbox;
    e->inbox = e->inbox_tail = NULL;
    e->n_inbox = 0;
    pthread_mutex_unlock(&e->mu);
    while (in) {
        sched_request *next = in->next;
        in->next = NULL;
        if (e->waiting_tail)
            e->waiting_tail->next = in;
        else
            e->waiting = in;
        e->waiting_tail = in;
        e->n_waiting++;
        in = next;
    }
}

static void drop_cancelled(sched_engine *e, bool all)
{
    sched_request **pp = &e->waiting;
    e->waiting_tail = NULL;
    while (*pp) {
        sched_request *r = *pp;
        if (all || atomic_load(&r->cancel)) {
            *pp = r->next;
            e->n_waiting--;
            finish_request(e, r, SCHED_FINISH_CANCELLED, NULL);
        } else {
            e->waiting_tail = r;
            pp = &r->next;
        }
    }
    int j = 0;
    for (int i = 0; i < e->n_running; i++) {
        sched_request *r = e->running[i];
        if (all || atomic_load(&r->cancel))
            finish_request(e, r, SCHED_FINISH_CANCELLED, NULL);
        else
            e->running[j++] = r;
    }
    e->n_running = j;
}

static void engine_step(sched_engine *e)
{
    while (e->waiting && e->n_running < e->opts.max_running_seqs) {
        sched_request *r = e->waiting;
        e->waiting = r->next;
        if (!e->waiting)
            e->waiting_tail = NULL;
        e->n_waiting--;
        r->next = NULL;
        if (admit(e, r))
            e->running[e->n_running++] = r;
    }
    int budget = rt_model_max_batch_tokens(e->model);
    int nb = 0;
    /* Decodes first: a running stream gets its token every step. */
    for (int i = 0; i < e->n_running && budget > 0; i++) {
        sched_request *r = e->running[i];
        if (r->n_prefilled < r->p.n_prompt)
            continue;
        e->batch[nb] = (rt_seq_batch){r->kv, &r->last_token, 1, r->logits};
        e->batch_req[nb++] = r;
        budget--;
    }
    for (int i = 0; i < e->n_running && budget > 0; i++) {
        sched_request *r = e->running[i];
        const int left = r->p.n_prompt - r->n_prefilled;
        if (left <= 0)
            continue;
        const int n = left < budget ? left : budget;
        e->batch[nb] = (rt_seq_batch){r->kv, r->p.prompt + r->n_prefilled, n,
                                      n == left ? r->logits : NULL};
        e->batch_req[nb++] = r;
        budget -= n;
    }
    if (nb == 0)
        return;
    char err[256];
    uint64_t prompt_tokens = 0;
    if (rt_forward(e->model, e->batch, nb, err, sizeof(err)) != 0) {
        /* Each request is in the batch once; finishing clears its kv. */
        for (int i = 0; i < nb; i++)
            finish_request(e, e->batch_req[i], SCHED_FINISH_ERROR, err);
        nb = 0;
    }
    for (int i = 0; i < nb; i++) {
        sched_request *r = e->batch_req[i];
        if (r->n_prefilled < r->p.n_prompt) {
            r->n_prefilled += e->batch[i].n_tokens;
            prompt_tokens += (uint64_t)e->batch[i].n_tokens;
        }
        if (e->batch[i].logits)
            accept_token(e, r, rt_sample(&r->sampler, r->logits));
    }
    /* Compact the running array: finished requests have kv == NULL. */
    int j = 0;
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i]->kv)
            e->running[j++] = e->running[i];
    e->n_running = j;
    pthread_mutex_lock(&e->mu);
    e->stats.steps++;
    e->stats.prompt_tokens += prompt_tokens;
    e->stats.running = e->n_running;
    e->stats.waiting = e->n_waiting + e->n_inbox;
    pthread_mutex_unlock(&e->mu);
}

static void *engine_main(void *arg)
{
    sched_engine *e = arg;
    for (;;) {
        take_inbox(e);
        pthread_mutex_lock(&e->mu);
        const bool stop = e->stop, all = e->cancel_all;
        e->cancel_all = false;
        pthread_mutex_unlock(&e->mu);
        drop_cancelled(e, stop || all);
        if (stop)
            return NULL;
        engine_step(e);
    }
}

sched_engine *sched_engine_create(rt_model *model, const sched_opts *opts)
{
    sched_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->model = model;
    e->opts = *opts;
    if (e->opts.max_running_seqs < 1)
        e->opts.max_running_seqs = 1;
    e->n_ctx = rt_model_n_ctx(model);
    e->n_vocab = rt_model_hparams(model)->n_vocab;
    e->eos = rt_tokenizer_eos(rt_model_tokenizer(model));
    const int max_batch = e->opts.max_running_seqs + 1;
    e->running = calloc((size_t)e->opts.max_running_seqs, sizeof(*e->running));
    e->batch = calloc((size_t)max_batch, sizeof(*e->batch));
    e->batch_req = calloc((size_t)max_batch, sizeof(*e->batch_req));
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    if (!e->running || !e->batch || !e->batch_req ||
        pthread_create(&e->thread, NULL, engine_main, e) != 0) {
        free(e->running);
        free(e->batch);
        free(e->batch_req);
        free(e);
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
    pthread_join(e->thread, NULL);
    /* Requests submitted after the engine saw stop are still in the inbox. */
    for (sched_request *r = e->inbox, *next; r; r = next) {
        next = r->next;
        finish_request(e, r, SCHED_FINISH_CANCELLED, NULL);
    }
    free(e->running);
    free(e->batch);
    free(e->batch_req);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

int sched_submit(sched_engine *e, sched_request *r)
{
    if ((long)r->p.n_prompt + r->p.max_tokens > e->n_ctx)
        return SCHED_E_TOO_LONG;
    pthread_mutex_lock(&e->mu);
    int rc = SCHED_OK;
    if (e->stop)
        rc = SCHED_E_STOPPING;
    else if (e->n_outstanding >= e->opts.max_waiting + e->opts.max_running_seqs)
        rc = SCHED_E_QUEUE_FULL;
    if (rc == SCHED_OK) {
        atomic_fetch_add(&r->refs, 1);
        e->n_outstanding++;
        e->stats.waiting++;
        r->t_arrival = sched_now();
        r->next = NULL;
        if (e->inbox_tail)
            e->inbox_tail->next = r;
        else
            e->inbox = r;
        e->inbox_tail = r;
        e->n_inbox++;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
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

int sched_engine_n_ctx(const sched_engine *e) { return e->n_ctx; }
