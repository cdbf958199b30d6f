/*
 * http.c - the HTTP front end on the libuv loop thread.
 *
 * libmicrohttpd runs without threads of its own (MHD_USE_EPOLL with
 * suspend/resume): its epoll fd is watched by a uv_poll and its timeout by a
 * uv_timer, and MHD_run is called from those callbacks. A completion request
 * goes: body collected -> validated -> tokenized on libuv's worker pool ->
 * submitted to the engine -> connection suspended; the engine's notify
 * callback queues the connection on a mutex-protected list and wakes the loop
 * with uv_async_send; the loop builds the response and resumes the
 * connection, and MHD calls the handler again to queue it.
 *
 * Ownership: a conn is created by the first handler call, belongs to the loop
 * thread, and is freed by MHD's request-completed callback. While a request is
 * with the engine, conn->req holds a reference; the engine only touches the
 * conn through the done list.
 */
#include "server/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <sys/socket.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "runtime/tokenizer.h"
#include "runtime/chat_template.h"
#include "server/boot.h"
#include "server/metrics.h"
#include "server/openai.h"

/* The chat page, embedded at build time (server/web/index.html). */
extern const unsigned char srv_web_page[];
extern const size_t srv_web_page_len;

typedef enum {
    CONN_READING,    /* collecting the body */
    CONN_WORKING,    /* tokenizing or with the engine; the connection is suspended */
    CONN_RESPONDING, /* a complete response is ready to queue */
    CONN_STREAMING,  /* an SSE stream is (about to be) queued; chunks flow through out */
} conn_phase;

typedef struct conn {
    srv_server *srv;
    struct MHD_Connection *mc;
    conn_phase phase;
    char *body;
    size_t len, cap;
    bool too_large;
    srv_completion_req creq;
    uv_work_t work;
    int32_t *tokens; /* the prompt, tokenized on the worker pool */
    size_t n_tokens;
    char *echo_text; /* completions with echo: the prompt as text */
    size_t echo_len;
    srv_error work_err; /* set by the worker when rendering fails */
    bool work_failed;

    int n_choices;
    sched_request *reqs[SRV_MAX_CHOICES];
    size_t sent_text[SRV_MAX_CHOICES]; /* streaming: bytes already sent per choice */
    int sent_tokens[SRV_MAX_CHOICES];  /* streaming: tokens whose logprobs were sent */
    bool sent_final[SRV_MAX_CHOICES];
    int n_done;  /* finish notifications received (guarded by srv->done_mu) */
    bool queued; /* on srv->ready (guarded by srv->done_mu) */
    struct conn *next_ready;
    struct conn *next_work; /* on_async's private walk of a snapshot of srv->ready */
    bool accounted;         /* its srv->active share has been given back */

    /* streaming output, loop thread only */
    char *out;
    size_t out_len, out_off, out_cap;
    bool stream_done;
    bool reader_suspended;
    bool failed_alloc;

    int status; /* complete response */
    char *resp;
    char id[40];
    long created;
    double t_start;
    bool closed;         /* MHD finished with it while the engine still ran */
    struct sockwatch *w; /* its connection's socket watch, while MHD has the request */
    bool suspended;      /* MHD_suspend_connection'd */
    int http_status;     /* for the access log */
    char method[8];
    char path[128];
    int log_prompt_tokens, log_completion_tokens;
    double log_ttft;
} conn;

struct srv_server {
    cfg_config cfg;
    rt_model *model;
    sched_engine *engine;
    const rt_tokenizer *tok;
    int chat_family;
    srv_limits limits;
    srv_attention_conf attn_conf;
    char model_name[256];
    long created;
    uv_loop_t *loop;
    struct MHD_Daemon *d;
    uv_poll_t poll;
    uv_timer_t timer;
    uv_async_t async;
    uv_signal_t sigint, sigterm;
    uv_timer_t drain_timer;
    pthread_mutex_t done_mu;
    conn *ready; /* connections with engine output to handle */
    int port;
    int active;               /* connections whose requests are with the worker pool or engine */
    bool model_ready;         /* model loaded and engine running (loop thread) */
    int n_conns;              /* open connections (MHD connection notifications) */
    char *tls_cert, *tls_key; /* PEM texts, kept for the daemon's lifetime */
    bool load_failed;
    int exit_code;
    uv_work_t load_work;
    char load_err[1024];
    bool draining;
    int idle_ticks;       /* drain ticks in a row with nothing in flight */
    MHD_socket listen_fd; /* returned by MHD_quiesce_daemon; closed after stop */
    double drain_deadline;
    bool engine_cancelled;
};

/* ---- responses ---------------------------------------------------------- */

static void set_json_response(conn *c, int status, json_t *j)
{
    free(c->resp);
    c->resp = json_dumps(j, JSON_COMPACT);
    c->status = c->resp ? status : 500;
    json_decref(j);
}

static void set_error(conn *c, const srv_error *e)
{
    set_json_response(c, e->status, srv_error_json(e));
}

/* Extra header of an error response: Retry-After for 429 and 503. */
static const char *retry_header(int status)
{
    return status == 429 || status == 503 ? "Retry-After" : NULL;
}

/* CORS: the allowed origin to echo for this request, or NULL. */
static const char *cors_origin(const conn *c)
{
    const char *conf = c->srv->cfg.cors_origins;
    if (!conf[0])
        return NULL;
    if (strcmp(conf, "*") == 0)
        return "*";
    const char *origin = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "Origin");
    if (!origin)
        return NULL;
    const size_t n = strlen(origin);
    for (const char *p = conf; *p;) {
        const char *end = strchr(p, ',');
        const size_t len = end ? (size_t)(end - p) : strlen(p);
        while (*p == ' ' && len > 0)
            p++;
        if (len == n && strncmp(p, origin, n) == 0)
            return origin;
        if (!end)
            break;
        p = end + 1;
    }
    return NULL;
}

static void add_cors(const conn *c, struct MHD_Response *r)
{
    const char *o = cors_origin(c);
    if (!o)
        return;
    MHD_add_response_header(r, "Access-Control-Allow-Origin", o);
    if (strcmp(o, "*") != 0)
        MHD_add_response_header(r, "Vary", "Origin");
}

static enum MHD_Result queue_body(conn *c, int status, char *body, const char *extra_header,
                                  const char *extra_value)
{
    const char *text = body ? body
                            : "{\"error\":{\"message\":\"out of "
                              "memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (extra_header)
        MHD_add_response_header(r, extra_header, extra_value);
    add_cors(c, r);
    enum MHD_Result ret = MHD_queue_response(c->mc, (unsigned)status, r);
    MHD_destroy_response(r);
    c->http_status = status;
    return ret;
}

static enum MHD_Result queue_error(conn *c, const srv_error *e)
{
    json_t *j = srv_error_json(e);
    char *body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    const char *name = retry_header(e->status);
    enum MHD_Result ret = queue_body(c, e->status, body, name, name ? "1" : NULL);
    free(body);
    return ret;
}

/* ---- the loop's view of MHD --------------------------------------------- */

static void run_mhd(srv_server *s);

static void on_timer(uv_timer_t *t)
{
    run_mhd(t->data);
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    run_mhd(p->data);
}

static void run_mhd(srv_server *s)
{
    MHD_run(s->d);
    MHD_UNSIGNED_LONG_LONG ms;
    if (MHD_get_timeout(s->d, &ms) == MHD_YES)
        uv_timer_start(&s->timer, on_timer, ms > 60000 ? 60000 : (uint64_t)ms, 0);
    else
        uv_timer_start(&s->timer, on_timer, 1000, 0);
}

/* ---- engine hand-off ---------------------------------------------------- */

/* Engine thread. A conn stays alive until every choice's finish notification
 * has been counted here, so this never touches freed memory. */
static void on_engine_notify(sched_request *r, bool finished, void *user)
{
    conn *c = user;
    srv_server *s = c->srv;
    if (!finished && !c->creq.stream)
        return;
    pthread_mutex_lock(&s->done_mu);
    if (finished)
        c->n_done++;
    if (!c->queued) {
        c->queued = true;
        c->next_ready = s->ready;
        s->ready = c;
    }
    pthread_mutex_unlock(&s->done_mu);
    uv_async_send(&s->async);
}

static void free_conn(conn *c);

static void free_handle(uv_handle_t *h)
{
    free(h);
}

/* One per TCP connection, from libmicrohttpd's connection-started notification
 * to its connection-closed one: a uv_poll on the socket that looks for the
 * peer's hang-up, which libmicrohttpd can miss in two ways.
 *
 * - While a request is being received: libmicrohttpd's epoll is
 *   edge-triggered, and when the request's bytes and the client's FIN arrive
 *   before it reads (a client that sends part of a request and closes), it
 *   reads the bytes, takes the socket for drained and never reads the EOF, so
 *   the connection (descriptor, memory pool, connection slot) sits in
 *   CLOSE_WAIT until the idle timeout. The watch waits for EPOLLRDHUP
 *   (level-triggered in libuv) and answers it with shutdown(SHUT_RD): that
 *   wakes libmicrohttpd's epoll again, bytes still queued stay readable, and
 *   its next read ends in the EOF, on which it closes the connection as for
 *   any client abort.
 * - While the connection is suspended (its request with the worker pool or
 *   the engine) libmicrohttpd does not look at the socket at all: peeking at
 *   it finds the hang-up, and the request's sequences are cancelled at the
 *   engine's next step, freeing their KV blocks. Pipelined bytes mean nothing
 *   until the answer is written. Resuming the connection re-arms the first
 *   watch, which then passes the hang-up on to libmicrohttpd.
 *
 * libuv allows one poll handle per socket, hence one handle for both. It is
 * unreferenced, so open connections do not keep the loop running at exit. */
typedef struct sockwatch {
    uv_poll_t poll; /* first member: the close callback frees the whole struct */
    conn *c;        /* the request on this connection, while MHD has one */
    bool hup;       /* the hang-up has been passed on with shutdown(SHUT_RD) */
    int events;     /* what the poll watches now (UV_*; 0: stopped) */
} sockwatch;

static void on_sock_event(uv_poll_t *h, int status, int events);

/* Watches for these events (0: stops); a no-op when they are the current ones, as
 * on every resume of a stream. */
static void sockwatch_set(sockwatch *w, int events)
{
    if (events == w->events)
        return;
    w->events = events;
    if (events)
        uv_poll_start(&w->poll, events, on_sock_event);
    else
        uv_poll_stop(&w->poll);
}

static void on_sock_event(uv_poll_t *h, int status, int events)
{
    sockwatch *w = (sockwatch *)h;
    conn *c = w->c;
    int fd;
    (void)events;
    if (uv_fileno((uv_handle_t *)h, &fd) != 0)
        return;
    if (c && c->suspended) {
        char b;
        const ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && status >= 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return; /* nothing to learn yet */
        if (n <= 0) /* the EOF or a socket error: the client is gone */
            for (int i = 0; i < c->n_choices; i++)
                sched_request_cancel(c->reqs[i]);
        sockwatch_set(w, 0); /* resuming the connection re-arms the watch */
        return;
    }
    w->hup = true;
    shutdown(fd, SHUT_RD);
    sockwatch_set(w, 0);
}

/* The receiving watch, unless the hang-up has already been passed on. */
static void sockwatch_arm(sockwatch *w)
{
    sockwatch_set(w, w->hup ? 0 : UV_DISCONNECT);
}

/* A suspended request: its bytes and its hang-up matter now. */
static void watch_peer(conn *c)
{
    if (c->w)
        sockwatch_set(c->w, UV_READABLE | UV_DISCONNECT);
}

static void detach_watch(conn *c)
{
    if (!c->w)
        return;
    c->w->c = NULL;
    sockwatch_arm(c->w);
    c->w = NULL;
}

static void conn_suspend(conn *c)
{
    c->suspended = true;
    MHD_suspend_connection(c->mc);
}

static void conn_resume(conn *c)
{
    c->suspended = false;
    if (c->w)
        sockwatch_arm(c->w);
    MHD_resume_connection(c->mc);
}

static void release_reqs(conn *c)
{
    for (int i = 0; i < c->n_choices; i++) {
        sched_request_release(c->reqs[i]);
        c->reqs[i] = NULL;
    }
    c->n_choices = 0;
}

static const char *finish_name(const sched_output *o)
{
    return srv_finish_reason(o->finish);
}

/* A failed or cancelled choice turns the whole response into an error. */
static bool output_error(const sched_output *o, srv_error *e)
{
    if (o->finish == SCHED_FINISH_TIMEOUT) {
        srv_error_set(e, 504, "server_error", "timeout", NULL,
                      "the request did not finish within the server's request_timeout_s");
        return true;
    }
    if (o->finish == SCHED_FINISH_ERROR) {
        srv_error_set(e, 500, "server_error", NULL, NULL, "generation failed: %s", o->error);
        return true;
    }
    if (o->finish == SCHED_FINISH_CANCELLED) {
        srv_error_set(e, 503, "server_error", "server_shutting_down", NULL,
                      "the request was cancelled: the server is shutting down");
        return true;
    }
    return false;
}

/* The extension object next to usage: what attention did for the request. */
static json_t *sieve_json(const srv_server *s, const conn *c, const sched_output *o)
{
    rt_attn_policy pol;
    srv_attention_resolve(&s->attn_conf, &c->creq.attn, o->n_prompt, &pol);
    json_t *j = json_object();
    json_object_set_new(j, "prefill", json_string(srv_prefill_name(pol.prefill)));
    const double density =
        o->attn.causal > 0 ? (double)o->attn.computed / (double)o->attn.causal : 1.0;
    json_object_set_new(j, "prefill_density", json_real(density));
    if (pol.prefill == RT_PREFILL_FLEX && o->attn.sparse_chunks == 0)
        json_object_set_new(j, "prefill_note",
                            json_string("the prompt is too short for a sparse selection "
                                        "(FlexPrefill needs more than max(2, min_budget / "
                                        "block_size) blocks): it ran dense"));
    json_object_set_new(j, "kv_cache", json_string(c->creq.attn.kv_cache));
    rt_kv_policy kvp;
    srv_attention_kv(&c->creq.attn, &kvp);
    double bpt = 0.0;
    char why[160];
    sched_engine_check_kv(s->engine, &kvp, &bpt, why, sizeof(why));
    json_object_set_new(j, "kv_bytes_per_token", json_integer((json_int_t)(bpt + 0.5)));
    json_object_set_new(j, "prefix_cache_hit_tokens", json_integer(o->prefix_hit_tokens));
    return j;
}

static void build_full_response(conn *c)
{
    srv_server *s = c->srv;
    const srv_kind kind = c->creq.kind;
    json_t *choices = json_array();
    int prompt_tokens = 0, completion_tokens = 0;
    srv_error e;
    for (int i = 0; i < c->n_choices; i++) {
        sched_output o;
        if (sched_request_output(c->reqs[i], 0, &o) != 0) {
            free(o.text);
            json_decref(choices);
            srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
            set_error(c, &e);
            return;
        }
        if (output_error(&o, &e)) {
            free(o.text);
            json_decref(choices);
            set_error(c, &e);
            return;
        }
        json_t *lp = c->creq.logprobs >= 0
                         ? srv_logprobs_json(kind, s->tok, &o, 0, o.n_tokens, c->echo_len)
                         : NULL;
        json_t *choice;
        if (c->echo_text) {
            char *t = malloc(c->echo_len + o.text_len + 1);
            if (t) {
                memcpy(t, c->echo_text, c->echo_len);
                memcpy(t + c->echo_len, o.text, o.text_len);
            }
            choice = srv_choice_json(kind, false, i, t ? t : "", t ? c->echo_len + o.text_len : 0,
                                     false, finish_name(&o), lp);
            free(t);
        } else {
            choice =
                srv_choice_json(kind, false, i, o.text, o.text_len, false, finish_name(&o), lp);
        }
        json_array_append_new(choices, choice);
        prompt_tokens = o.n_prompt;
        completion_tokens += o.n_tokens;
        if (i == 0 && o.t_first_token > 0)
            c->log_ttft = o.t_first_token - c->t_start;
        free(o.text);
    }
    c->log_prompt_tokens = prompt_tokens;
    c->log_completion_tokens = completion_tokens;
    json_t *resp = srv_response_json(kind, false, c->id, s->model_name, c->created, choices,
                                     srv_usage_json(prompt_tokens, completion_tokens));
    sched_output o0;
    if (sched_request_output(c->reqs[0], (size_t)-1, &o0) == 0)
        json_object_set_new(resp, "sieve", sieve_json(s, c, &o0));
    free(o0.text);
    set_json_response(c, 200, resp);
}

/* ---- server-sent events ----------------------------------------------- */

static void out_append(conn *c, const char *data, size_t n)
{
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + n)
            cap *= 2;
        char *b = realloc(c->out, cap);
        if (!b) {
            c->failed_alloc = true;
            return;
        }
        c->out = b;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
}

static void out_event(conn *c, json_t *j)
{
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!text) {
        c->failed_alloc = true;
        return;
    }
    out_append(c, "data: ", 6);
    out_append(c, text, strlen(text));
    out_append(c, "\n\n", 2);
    free(text);
}

static void out_chunk(conn *c, json_t *choice)
{
    srv_server *s = c->srv;
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_t *chunk =
        srv_response_json(c->creq.kind, true, c->id, s->model_name, c->created, choices, NULL);
    if (c->creq.include_usage)
        json_object_set_new(chunk, "usage", json_null());
    out_event(c, chunk);
}

/* Appends the chunks for whatever the engine produced since the last call. */
static void stream_progress(conn *c)
{
    srv_server *s = c->srv;
    const srv_kind kind = c->creq.kind;
    bool all_final = true;
    int prompt_tokens = 0, completion_tokens = 0;
    for (int i = 0; i < c->n_choices; i++) {
        if (c->sent_final[i]) {
            sched_output o;
            if (sched_request_output(c->reqs[i], (size_t)-1, &o) == 0) {
                prompt_tokens = o.n_prompt;
                completion_tokens += o.n_tokens;
            }
            free(o.text);
            continue;
        }
        sched_output o;
        if (sched_request_output(c->reqs[i], c->sent_text[i], &o) != 0) {
            free(o.text);
            c->failed_alloc = true;
            return;
        }
        srv_error e;
        if (output_error(&o, &e)) {
            /* Too late for a status code: the stream carries the error object. */
            out_event(c, srv_error_json(&e));
            c->sent_final[i] = true;
            free(o.text);
            continue;
        }
        const size_t new_len = o.text_len - c->sent_text[i];
        const int tok_to = o.n_tokens;
        const bool new_tokens = c->creq.logprobs >= 0 && tok_to > c->sent_tokens[i];
        if (new_len > 0 || new_tokens) {
            json_t *lp = new_tokens ? srv_logprobs_json(kind, s->tok, &o, c->sent_tokens[i], tok_to,
                                                        c->echo_len)
                                    : NULL;
            out_chunk(c, srv_choice_json(kind, true, i, o.text, new_len, false, NULL, lp));
            c->sent_text[i] = o.text_len;
            if (new_tokens)
                c->sent_tokens[i] = tok_to;
        }
        if (o.finish != SCHED_FINISH_NONE) {
            out_chunk(c, srv_choice_json(kind, true, i, "", 0, false, finish_name(&o), NULL));
            c->sent_final[i] = true;
            prompt_tokens = o.n_prompt;
            completion_tokens += o.n_tokens;
        } else {
            all_final = false;
        }
        free(o.text);
    }
    if (all_final && !c->stream_done) {
        c->log_prompt_tokens = prompt_tokens;
        c->log_completion_tokens = completion_tokens;
        if (c->creq.include_usage) {
            json_t *u =
                srv_response_json(kind, true, c->id, s->model_name, c->created, json_array(),
                                  srv_usage_json(prompt_tokens, completion_tokens));
            sched_output o0;
            if (sched_request_output(c->reqs[0], (size_t)-1, &o0) == 0)
                json_object_set_new(u, "sieve", sieve_json(s, c, &o0));
            free(o0.text);
            out_event(c, u);
        }
        out_append(c, "data: [DONE]\n\n", 14);
        c->stream_done = true;
    }
}

/* The opening chunks: the assistant role (chat) or the echoed prompt. */
static void stream_start(conn *c)
{
    for (int i = 0; i < c->n_choices; i++) {
        if (c->creq.kind == SRV_CHAT)
            out_chunk(c, srv_choice_json(SRV_CHAT, true, i, "", 0, true, NULL, NULL));
        else if (c->echo_text)
            out_chunk(c, srv_choice_json(SRV_COMPLETION, true, i, c->echo_text, c->echo_len, false,
                                         NULL, NULL));
    }
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    conn *c = cls;
    if (c->failed_alloc)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    if (c->out_off < c->out_len) {
        size_t n = c->out_len - c->out_off;
        if (n > max)
            n = max;
        memcpy(buf, c->out + c->out_off, n);
        c->out_off += n;
        if (c->out_off == c->out_len)
            c->out_off = c->out_len = 0;
        return (ssize_t)n;
    }
    if (c->stream_done)
        return MHD_CONTENT_READER_END_OF_STREAM;
    /* Nothing to send yet: park the connection until the engine posts. */
    c->reader_suspended = true;
    conn_suspend(c);
    return 0;
}

/* Gives back the conn's share of srv->active, once. */
static void account_done(conn *c)
{
    if (!c->accounted) {
        c->accounted = true;
        c->srv->active--;
    }
}

static void on_async(uv_async_t *a)
{
    srv_server *s = a->data;
    /* The engine may queue a conn again while this walk runs, rewriting its
     * next_ready: walk a private copy of the links taken under the lock. */
    pthread_mutex_lock(&s->done_mu);
    conn *list = s->ready;
    s->ready = NULL;
    for (conn *c = list; c; c = c->next_ready) {
        c->queued = false;
        c->next_work = c->next_ready;
    }
    pthread_mutex_unlock(&s->done_mu);
    while (list) {
        conn *c = list;
        list = c->next_work;
        pthread_mutex_lock(&s->done_mu);
        const bool all_done = c->n_done == c->n_choices;
        const bool queued_again = c->queued;
        pthread_mutex_unlock(&s->done_mu);
        if (c->closed) {
            /* The client is gone: free once the engine is done with it and no
             * notification still holds it on the ready list. */
            if (all_done && !queued_again) {
                account_done(c);
                free_conn(c);
            }
            continue;
        }
        if (c->creq.stream) {
            if (c->phase == CONN_STREAMING)
                stream_progress(c);
            if (c->reader_suspended) {
                c->reader_suspended = false;
                conn_resume(c);
            }
            continue;
        }
        if (!all_done || c->phase != CONN_WORKING)
            continue; /* not finished, or already answered on an earlier visit */
        build_full_response(c);
        release_reqs(c);
        c->phase = CONN_RESPONDING;
        account_done(c);
        conn_resume(c);
    }
    run_mhd(s);
}

/* Worker pool: rendering a chat and tokenizing a long prompt must not stall
 * the loop. */
static void tokenize_work(uv_work_t *w)
{
    conn *c = w->data;
    srv_server *s = c->srv;
    const srv_completion_req *q = &c->creq;
    if (q->kind == SRV_CHAT) {
        rt_chat_msg *msgs = calloc((size_t)q->n_msgs, sizeof(*msgs));
        char *text = NULL;
        size_t len = 0;
        char err[256];
        if (!msgs) {
            c->work_failed = true;
            srv_error_set(&c->work_err, 500, "server_error", NULL, NULL, "out of memory");
            return;
        }
        for (int i = 0; i < q->n_msgs; i++)
            msgs[i] = (rt_chat_msg){q->msgs[i].role, strlen(q->msgs[i].role), q->msgs[i].content,
                                    q->msgs[i].content_len};
        const int32_t bos = rt_tokenizer_bos(s->tok), eos = rt_tokenizer_eos(s->tok);
        size_t bl = 0, el = 0;
        const char *bp = bos >= 0 ? rt_token_piece(s->tok, bos, &bl) : NULL;
        const char *ep = eos >= 0 ? rt_token_piece(s->tok, eos, &el) : NULL;
        char bos_s[64] = "", eos_s[64] = "";
        if (bp && bl < sizeof(bos_s))
            memcpy(bos_s, bp, bl), bos_s[bl] = 0;
        if (ep && el < sizeof(eos_s))
            memcpy(eos_s, ep, el), eos_s[el] = 0;
        int rc = rt_chat_render((rt_chat_family)s->chat_family, msgs, (size_t)q->n_msgs, true,
                                bos_s, eos_s, &text, &len, err, sizeof(err));
        free(msgs);
        if (rc != 0) {
            c->work_failed = true;
            srv_error_set(&c->work_err, 400, "invalid_request_error", NULL, "messages", "%s", err);
            return;
        }
        const bool add_bos = !rt_chat_template_includes_bos((rt_chat_family)s->chat_family);
        if (rt_tokenize(s->tok, text, len, add_bos, true, &c->tokens, &c->n_tokens) != 0)
            c->tokens = NULL;
        free(text);
    } else if (q->prompt_text) {
        if (rt_tokenize(s->tok, q->prompt_text, q->prompt_len, true, true, &c->tokens,
                        &c->n_tokens) != 0)
            c->tokens = NULL;
    }
    if (!c->tokens && (q->kind == SRV_CHAT || q->prompt_text) && !c->work_failed) {
        c->work_failed = true;
        srv_error_set(&c->work_err, 500, "server_error", NULL, NULL, "tokenization failed");
    }
}

static void fail_working(conn *c, const srv_error *e)
{
    set_error(c, e);
    c->phase = CONN_RESPONDING;
    account_done(c);
    conn_resume(c);
    run_mhd(c->srv);
}

/* The prompt as text for echo: the request's own string, or its token ids
 * decoded (without the BOS). */
static void make_echo(conn *c, const int32_t *prompt, int n_prompt)
{
    const srv_completion_req *q = &c->creq;
    if (q->prompt_text) {
        c->echo_text = malloc(q->prompt_len + 1);
        if (c->echo_text) {
            memcpy(c->echo_text, q->prompt_text, q->prompt_len + 1);
            c->echo_len = q->prompt_len;
        }
        return;
    }
    size_t cap = 64, len = 0;
    char *t = malloc(cap);
    for (int i = 0; t && i < n_prompt; i++) {
        char piece[256];
        size_t n = rt_token_to_bytes(c->srv->tok, prompt[i], piece, sizeof(piece));
        n = n < sizeof(piece) ? n : sizeof(piece);
        if (len + n + 1 > cap) {
            while (len + n + 1 > cap)
                cap *= 2;
            char *nt = realloc(t, cap);
            if (!nt) {
                free(t);
                t = NULL;
                break;
            }
            t = nt;
        }
        memcpy(t + len, piece, n);
        len += n;
    }
    c->echo_text = t;
    c->echo_len = t ? len : 0;
}

static void tokenize_done(uv_work_t *w, int status)
{
    conn *c = w->data;
    srv_server *s = c->srv;
    const srv_completion_req *q = &c->creq;
    srv_error e;
    if (c->work_failed) {
        fail_working(c, &c->work_err);
        return;
    }
    const bool from_text = q->kind == SRV_CHAT || q->prompt_text;
    const int32_t *prompt = from_text ? c->tokens : q->prompt_tokens;
    const int n_prompt = from_text ? (int)c->n_tokens : q->n_prompt_tokens;
    if (status != 0) {
        srv_error_set(&e, 500, "server_error", NULL, NULL, "tokenization failed");
        fail_working(c, &e);
        return;
    }
    if (n_prompt == 0) {
        srv_error_set(&e, 400, "invalid_request_error", NULL,
                      q->kind == SRV_CHAT ? "messages" : "prompt", "the prompt produced no tokens");
        fail_working(c, &e);
        return;
    }
    const int n_ctx = sched_engine_n_ctx(s->engine);
    int max_tokens = q->max_tokens;
    if (n_prompt >= n_ctx || (max_tokens > 0 && n_prompt + max_tokens > n_ctx)) {
        srv_error_set(&e, 400, "invalid_request_error", "context_length_exceeded",
                      q->kind == SRV_CHAT ? "messages" : "prompt",
                      "This model's maximum context length is %d tokens. However, you requested "
                      "%d tokens (%d in the %s, %d for the completion). Please reduce the "
                      "length of the %s or max_tokens.",
                      n_ctx, n_prompt + (max_tokens > 0 ? max_tokens : 1), n_prompt,
                      q->kind == SRV_CHAT ? "messages" : "prompt", max_tokens > 0 ? max_tokens : 1,
                      q->kind == SRV_CHAT ? "messages" : "prompt");
        fail_working(c, &e);
        return;
    }
    if (max_tokens == 0) {
        /* Completions default to a short answer (OpenAI's 16); chat runs to the context. */
        max_tokens = q->kind == SRV_CHAT ? n_ctx - n_prompt : s->cfg.default_max_tokens;
        if (max_tokens > n_ctx - n_prompt)
            max_tokens = n_ctx - n_prompt;
    }
    if (q->min_tokens > max_tokens) {
        srv_error_set(&e, 400, "invalid_request_error", NULL, "min_tokens",
                      "'min_tokens' (%d) exceeds the tokens left for the completion (%d)",
                      q->min_tokens, max_tokens);
        fail_working(c, &e);
        return;
    }
    if (q->echo)
        make_echo(c, prompt, n_prompt);
    uint64_t seed = q->sampling.seed;
    if (!q->seed_set && getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed))
        seed = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)c;
    rt_kv_policy kvp;
    srv_attention_kv(&q->attn, &kvp);
    char kv_why[256];
    if (sched_engine_check_kv(s->engine, &kvp, NULL, kv_why, sizeof(kv_why)) != 0) {
        srv_error_set(&e, 400, "invalid_request_error", NULL, "attention.kv_cache",
                      "'attention.kv_cache' '%s' is not available with this model: %s",
                      rt_kv_format_name(kvp.format), kv_why);
        fail_working(c, &e);
        return;
    }
    for (int i = 0; i < q->n; i++) {
        sched_params p = {0};
        p.kv = kvp;
        p.prompt = (int32_t *)prompt;
        p.n_prompt = n_prompt;
        p.max_tokens = max_tokens;
        p.sampling = q->sampling;
        p.sampling.seed = seed + (uint64_t)i; /* choices differ, and stay reproducible */
        for (int k = 0; k < q->n_stop; k++)
            p.stop[k] = q->stop[k];
        p.n_stop = q->n_stop;
        p.ignore_eos = q->ignore_eos;
        p.min_tokens = q->min_tokens;
        p.priority = q->priority;
        p.timeout_s = s->cfg.request_timeout_s;
        srv_attention_resolve(&s->attn_conf, &q->attn, n_prompt, &p.policy);
        p.logprobs = q->logprobs;
        c->reqs[i] = sched_request_create(&p, on_engine_notify, c);
        c->n_choices = i + 1;
        if (!c->reqs[i]) {
            release_reqs(c);
            srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
            fail_working(c, &e);
            return;
        }
    }
    int rc = sched_submit_many(s->engine, c->reqs, c->n_choices);
    if (rc != SCHED_OK) {
        release_reqs(c);
        if (rc == SCHED_E_QUEUE_FULL)
            srv_error_set(&e, 429, "rate_limit_exceeded", "rate_limit_exceeded", NULL,
                          "The server is at capacity (%d requests queued); retry later",
                          s->cfg.max_waiting);
        else if (rc == SCHED_E_STOPPING)
            srv_error_set(&e, 503, "server_error", "server_shutting_down", NULL,
                          "the server is shutting down");
        else
            srv_error_set(&e, 400, "invalid_request_error", "context_length_exceeded", "prompt",
                          "This model's maximum context length is %d tokens", n_ctx);
        fail_working(c, &e);
        return;
    }
    if (q->stream) {
        c->phase = CONN_STREAMING;
        stream_start(c);
        conn_resume(c);
        run_mhd(s);
    } else {
        watch_peer(c);
    }
}

/* ---- routing ------------------------------------------------------------ */

static void random_id(char *out, size_t cap, const char *prefix)
{
    unsigned char b[12];
    if (getrandom(b, sizeof(b), 0) != (ssize_t)sizeof(b))
        memset(b, 0, sizeof(b));
    int n = snprintf(out, cap, "%s", prefix);
    for (size_t i = 0; i < sizeof(b) && (size_t)n + 2 < cap; i++)
        n += snprintf(out + n, cap - (size_t)n, "%02x", b[i]);
}

static enum MHD_Result start_completion(conn *c, srv_kind kind)
{
    srv_server *s = c->srv;
    srv_error e;
    if (srv_parse_request(kind, c->body ? c->body : "", c->len, &s->limits, &c->creq, &e) != 0)
        return queue_error(c, &e);
    if (s->draining) {
        srv_error_set(&e, 503, "server_error", "server_shutting_down", NULL,
                      "the server is shutting down");
        return queue_error(c, &e);
    }
    random_id(c->id, sizeof(c->id), kind == SRV_CHAT ? "chatcmpl-" : "cmpl-");
    c->created = (long)time(NULL);
    c->phase = CONN_WORKING;
    s->active++;
    c->work.data = c;
    conn_suspend(c);
    if (uv_queue_work(s->loop, &c->work, tokenize_work, tokenize_done) != 0) {
        srv_error_set(&e, 500, "server_error", NULL, NULL, "cannot queue tokenization");
        fail_working(c, &e);
    }
    return MHD_YES;
}

static enum MHD_Result queue_json(conn *c, int status, json_t *j)
{
    char *body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    enum MHD_Result r = queue_body(c, status, body, NULL, NULL);
    free(body);
    return r;
}

static json_t *parse_body_object(conn *c, srv_error *e)
{
    json_error_t jerr;
    json_t *root = json_loadb(c->body ? c->body : "", c->len, 0, &jerr);
    if (!root || !json_is_object(root)) {
        srv_error_set(e, 400, "invalid_request_error", NULL, NULL,
                      "The request body must be a JSON object%s%s", root ? "" : ": ",
                      root ? "" : jerr.text);
        json_decref(root);
        return NULL;
    }
    return root;
}

/* POST /tokenize, as llama.cpp's server: {"content", "add_special" (false),
 * "parse_special" (true), "with_pieces" (false)} -> {"tokens": [...]}. */
static enum MHD_Result handle_tokenize(conn *c)
{
    srv_server *s = c->srv;
    srv_error e;
    json_t *root = parse_body_object(c, &e);
    if (!root)
        return queue_error(c, &e);
    json_t *content = json_object_get(root, "content");
    json_t *add = json_object_get(root, "add_special");
    json_t *parse = json_object_get(root, "parse_special");
    json_t *pieces = json_object_get(root, "with_pieces");
    const char *bad_field = !json_is_string(content)             ? "content"
                            : add && !json_is_boolean(add)       ? "add_special"
                            : parse && !json_is_boolean(parse)   ? "parse_special"
                            : pieces && !json_is_boolean(pieces) ? "with_pieces"
                                                                 : NULL;
    if (bad_field) {
        srv_error_set(&e, 400, "invalid_request_error", NULL, bad_field, "'%s' must be a %s",
                      bad_field, strcmp(bad_field, "content") == 0 ? "string" : "boolean");
        json_decref(root);
        return queue_error(c, &e);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    if (rt_tokenize(s->tok, json_string_value(content), json_string_length(content),
                    json_is_true(add), !parse || json_is_true(parse), &ids, &n) != 0) {
        json_decref(root);
        srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        return queue_error(c, &e);
    }
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++) {
        if (json_is_true(pieces)) {
            char piece[256];
            size_t m = rt_token_to_bytes(s->tok, ids[i], piece, sizeof(piece));
            m = m < sizeof(piece) ? m : sizeof(piece);
            json_t *t = json_object();
            json_object_set_new(t, "id", json_integer(ids[i]));
            json_object_set_new(t, "piece", srv_json_text(piece, m));
            json_array_append_new(arr, t);
        } else {
            json_array_append_new(arr, json_integer(ids[i]));
        }
    }
    free(ids);
    json_decref(root);
    json_t *out = json_object();
    json_object_set_new(out, "tokens", arr);
    return queue_json(c, 200, out);
}

/* POST /detokenize: {"tokens": [ids]} -> {"content": text}. */
static enum MHD_Result handle_detokenize(conn *c)
{
    srv_server *s = c->srv;
    srv_error e;
    json_t *root = parse_body_object(c, &e);
    if (!root)
        return queue_error(c, &e);
    json_t *toks = json_object_get(root, "tokens");
    if (!json_is_array(toks)) {
        json_decref(root);
        srv_error_set(&e, 400, "invalid_request_error", NULL, "tokens",
                      "'tokens' must be an array of token ids");
        return queue_error(c, &e);
    }
    const size_t n = json_array_size(toks);
    char *text = malloc(n * 256 + 1);
    size_t len = 0;
    for (size_t i = 0; text && i < n; i++) {
        json_t *t = json_array_get(toks, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 ||
            json_integer_value(t) >= s->limits.n_vocab) {
            free(text);
            json_decref(root);
            srv_error_set(&e, 400, "invalid_request_error", NULL, "tokens",
                          "'tokens'[%zu] must be a token id in [0, %d)", i, s->limits.n_vocab);
            return queue_error(c, &e);
        }
        size_t m = rt_token_to_bytes(s->tok, (int32_t)json_integer_value(t), text + len, 256);
        len += m < 256 ? m : 256;
    }
    json_decref(root);
    if (!text) {
        srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        return queue_error(c, &e);
    }
    json_t *out = json_object();
    json_object_set_new(out, "content", srv_json_text(text, len));
    free(text);
    return queue_json(c, 200, out);
}

/* Compares in time independent of where the strings first differ. */
static bool equal_const_time(const char *a, size_t la, const char *b, size_t lb)
{
    unsigned char diff = la != lb;
    for (size_t i = 0; i < la; i++)
        diff |= (unsigned char)(a[i] ^ (i < lb ? b[i] : 0));
    return diff == 0;
}

/* The API (/v1/..., /tokenize, /detokenize) needs "Authorization: Bearer KEY"
 * when keys are configured; health probes, /metrics and the chat page (which
 * sends the key it is given) stay open, as with vLLM's --api-key. */
static bool needs_key(const char *url)
{
    return strncmp(url, "/v1/", 4) == 0 || strcmp(url, "/tokenize") == 0 ||
           strcmp(url, "/detokenize") == 0 || strcmp(url, "/completions") == 0 ||
           strcmp(url, "/chat/completions") == 0;
}

static bool authorized(const srv_server *s, struct MHD_Connection *mc)
{
    if (s->cfg.n_api_keys == 0)
        return true;
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return false;
    const char *key = h + 7;
    while (*key == ' ')
        key++;
    const size_t len = strlen(key);
    bool ok = false;
    for (int i = 0; i < s->cfg.n_api_keys; i++)
        ok |= equal_const_time(key, len, s->cfg.api_keys[i], strlen(s->cfg.api_keys[i]));
    return ok;
}

static bool is_get_or_head(const char *method)
{
    return strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
}

static enum MHD_Result route(conn *c, const char *method, const char *url)
{
    srv_server *s = c->srv;
    srv_error e;
    const char *allow = NULL;
    if (strcmp(method, "OPTIONS") == 0 && s->cfg.cors_origins[0]) {
        /* A CORS preflight: what a browser may send. */
        struct MHD_Response *r = MHD_create_response_from_buffer(0, "", MHD_RESPMEM_PERSISTENT);
        if (!r)
            return MHD_NO;
        add_cors(c, r);
        MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
        MHD_add_response_header(r, "Access-Control-Allow-Headers", "Authorization, Content-Type");
        MHD_add_response_header(r, "Access-Control-Max-Age", "86400");
        c->http_status = 204;
        enum MHD_Result ret = MHD_queue_response(c->mc, 204, r);
        MHD_destroy_response(r);
        return ret;
    }
    if (needs_key(url) && !authorized(s, c->mc)) {
        const bool sent = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "Authorization");
        srv_error_set(&e, 401, "invalid_request_error", "invalid_api_key", NULL,
                      sent ? "Incorrect API key provided"
                           : "You didn't provide an API key: send 'Authorization: Bearer KEY'");
        json_t *j = srv_error_json(&e);
        char *body = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        enum MHD_Result ret = queue_body(c, 401, body, "WWW-Authenticate", "Bearer");
        free(body);
        return ret;
    }
    if (strcmp(url, "/") == 0 || strcmp(url, "/index.html") == 0) {
        if (!is_get_or_head(method)) {
            allow = "GET, HEAD";
        } else {
            struct MHD_Response *r = MHD_create_response_from_buffer(
                srv_web_page_len, (void *)srv_web_page, MHD_RESPMEM_PERSISTENT);
            if (!r)
                return MHD_NO;
            MHD_add_response_header(r, "Content-Type", "text/html; charset=utf-8");
            c->http_status = 200;
            enum MHD_Result ret = MHD_queue_response(c->mc, MHD_HTTP_OK, r);
            MHD_destroy_response(r);
            return ret;
        }
    } else if (strcmp(url, "/live") == 0 || strcmp(url, "/livez") == 0) {
        /* Liveness: the loop answers, whatever the model is doing. */
        if (!is_get_or_head(method))
            allow = "GET, HEAD";
        else
            return queue_body(c, 200, "{\"status\":\"alive\"}", NULL, NULL);
    } else if (strcmp(url, "/health") == 0 || strcmp(url, "/v1/health") == 0 ||
               strcmp(url, "/ready") == 0) {
        /* Readiness: 200 only while requests can be served. */
        if (!is_get_or_head(method))
            allow = "GET, HEAD";
        else if (s->draining)
            return queue_body(c, 503, "{\"status\":\"draining\"}", "Retry-After", "1");
        else if (!s->model_ready)
            return queue_body(c, 503, "{\"status\":\"loading\"}", "Retry-After", "1");
        else
            return queue_body(c, 200, "{\"status\":\"ok\"}", NULL, NULL);
    } else if (!s->model_ready) {
        srv_error_set(&e, 503, "server_error", "model_loading", NULL,
                      "the model is still loading; retry shortly");
        return queue_error(c, &e);
    } else if (strcmp(url, "/metrics") == 0) {
        if (!is_get_or_head(method)) {
            allow = "GET, HEAD";
        } else {
            sched_stats st;
            sched_engine_stats(s->engine, &st);
            size_t len;
            char *text = srv_metrics_text(&st, s->model_name, &len);
            if (!text) {
                srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
                return queue_error(c, &e);
            }
            struct MHD_Response *r =
                MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
            if (!r) {
                free(text);
                return MHD_NO;
            }
            MHD_add_response_header(r, "Content-Type", "text/plain; version=0.0.4");
            add_cors(c, r);
            c->http_status = 200;
            enum MHD_Result ret = MHD_queue_response(c->mc, MHD_HTTP_OK, r);
            MHD_destroy_response(r);
            return ret;
        }
    } else if (strcmp(url, "/v1/models") == 0) {
        if (!is_get_or_head(method)) {
            allow = "GET, HEAD";
        } else {
            json_t *j = srv_models_json(s->model_name, s->created, s->limits.n_ctx);
            char *body = json_dumps(j, JSON_COMPACT);
            json_decref(j);
            enum MHD_Result r = queue_body(c, 200, body, NULL, NULL);
            free(body);
            return r;
        }
    } else if (strncmp(url, "/v1/models/", 11) == 0 && is_get_or_head(method)) {
        if (strcmp(url + 11, s->model_name) != 0) {
            srv_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                          "The model '%.200s' does not exist", url + 11);
            return queue_error(c, &e);
        }
        json_t *j = srv_models_json(s->model_name, s->created, s->limits.n_ctx);
        json_t *m = json_incref(json_array_get(json_object_get(j, "data"), 0));
        json_decref(j);
        char *body = json_dumps(m, JSON_COMPACT);
        json_decref(m);
        enum MHD_Result r = queue_body(c, 200, body, NULL, NULL);
        free(body);
        return r;
    } else if (strcmp(url, "/v1/completions") == 0 || strcmp(url, "/completions") == 0) {
        if (strcmp(method, "POST") != 0)
            allow = "POST";
        else
            return start_completion(c, SRV_COMPLETION);
    } else if (strcmp(url, "/v1/chat/completions") == 0 || strcmp(url, "/chat/completions") == 0) {
        if (strcmp(method, "POST") != 0)
            allow = "POST";
        else
            return start_completion(c, SRV_CHAT);
    } else if (strcmp(url, "/tokenize") == 0 || strcmp(url, "/detokenize") == 0) {
        if (strcmp(method, "POST") != 0)
            allow = "POST";
        else
            return url[1] == 't' ? handle_tokenize(c) : handle_detokenize(c);
    } else {
        srv_error_set(&e, 404, "invalid_request_error", "not_found", NULL,
                      "Unknown endpoint %.16s %.200s", method, url);
        return queue_error(c, &e);
    }
    srv_error_set(&e, 405, "invalid_request_error", "method_not_allowed", NULL,
                  "Method %.16s is not allowed on %.200s (allowed: %s)", method, url, allow);
    json_t *j = srv_error_json(&e);
    char *body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    enum MHD_Result ret = queue_body(c, 405, body, "Allow", allow);
    free(body);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    srv_server *s = cls;
    conn *c = *con_cls;
    if (!c) {
        c = calloc(1, sizeof(*c));
        if (!c)
            return MHD_NO;
        c->srv = s;
        c->mc = mc;
        c->t_start = sched_now();
        snprintf(c->method, sizeof(c->method), "%s", method);
        snprintf(c->path, sizeof(c->path), "%s", url);
        *con_cls = c;
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(mc, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        if (ci && ci->socket_context) {
            c->w = ci->socket_context;
            c->w->c = c;
        }
        if (s->n_conns > s->cfg.max_connections) {
            /* Past the limit: answer 503 and close rather than leave the client
             * with a reset (libmicrohttpd's own cap sits a little higher). */
            srv_error e;
            srv_error_set(&e, 503, "server_error", "too_many_connections", NULL,
                          "the server has %d open connections (max_connections); retry later",
                          s->n_conns - 1);
            return queue_error(c, &e);
        }
        /* Refuse an announced oversized body before reading it. */
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg.max_body_bytes) {
            c->too_large = true;
            srv_error e;
            srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                          "The request body (%s bytes) exceeds the limit of %lld bytes", cl,
                          (long long)s->cfg.max_body_bytes);
            return queue_error(c, &e);
        }
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        const size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (c->too_large)
            return MHD_YES;
        if (c->len + n > (size_t)s->cfg.max_body_bytes) {
            c->too_large = true;
            free(c->body);
            c->body = NULL;
            c->len = c->cap = 0;
            return MHD_YES;
        }
        if (c->len + n + 1 > c->cap) {
            size_t cap = c->cap ? c->cap : 4096;
            while (cap < c->len + n + 1)
                cap *= 2;
            char *b = realloc(c->body, cap);
            if (!b)
                return MHD_NO;
            c->body = b;
            c->cap = cap;
        }
        memcpy(c->body + c->len, upload_data, n);
        c->len += n;
        c->body[c->len] = 0;
        return MHD_YES;
    }
    switch (c->phase) {
    case CONN_RESPONDING:
        return queue_body(c, c->status, c->resp, retry_header(c->status), "1");
    case CONN_STREAMING: {
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, c, NULL);
        if (!r)
            return MHD_NO;
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        add_cors(c, r);
        c->http_status = 200;
        enum MHD_Result ret = MHD_queue_response(mc, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ret;
    }
    case CONN_WORKING:
        return MHD_YES; /* spurious call while suspended */
    case CONN_READING:
        break;
    }
    if (c->too_large) {
        srv_error e;
        srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                      "The request body exceeds the limit of %lld bytes",
                      (long long)s->cfg.max_body_bytes);
        return queue_error(c, &e);
    }
    return route(c, method, url);
}

static void free_conn(conn *c)
{
    detach_watch(c);
    release_reqs(c);
    srv_completion_req_free(&c->creq);
    free(c->body);
    free(c->tokens);
    free(c->echo_text);
    free(c->resp);
    free(c->out);
    free(c);
}

/* One JSON line per request on stderr: a structured access log. */
static void access_log(const conn *c, enum MHD_RequestTerminationCode toe)
{
    json_t *j = json_object();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    json_object_set_new(j, "ts", json_real((double)ts.tv_sec + (double)ts.tv_nsec * 1e-9));
    if (c->id[0])
        json_object_set_new(j, "id", json_string(c->id));
    json_object_set_new(j, "method", srv_json_text(c->method, strlen(c->method)));
    json_object_set_new(j, "path", srv_json_text(c->path, strlen(c->path)));
    json_object_set_new(j, "status", json_integer(c->http_status));
    json_object_set_new(j, "completed", json_boolean(toe == MHD_REQUEST_TERMINATED_COMPLETED_OK));
    if (c->log_prompt_tokens || c->log_completion_tokens) {
        json_object_set_new(j, "prompt_tokens", json_integer(c->log_prompt_tokens));
        json_object_set_new(j, "completion_tokens", json_integer(c->log_completion_tokens));
    }
    if (c->creq.stream)
        json_object_set_new(j, "stream", json_true());
    if (c->log_ttft > 0)
        json_object_set_new(j, "ttft_ms", json_real(c->log_ttft * 1e3));
    json_object_set_new(j, "duration_ms", json_real((sched_now() - c->t_start) * 1e3));
    char *line = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (line) {
        fprintf(stderr, "%s\n", line);
        free(line);
    }
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    conn *c = *con_cls;
    srv_server *s = cls;
    *con_cls = NULL;
    if (!c)
        return;
    if (s->cfg.log_requests)
        access_log(c, toe);
    detach_watch(c); /* a conn can outlive its request; the next one gets the watch */
    pthread_mutex_lock(&s->done_mu);
    const bool engine_busy = c->n_done < c->n_choices || c->queued;
    pthread_mutex_unlock(&s->done_mu);
    if (engine_busy) {
        /* The client went away mid-stream (or the last notification is still
         * queued): stop its sequences; on_async frees the conn once the engine
         * has reported every choice finished. */
        for (int i = 0; i < c->n_choices; i++)
            sched_request_cancel(c->reqs[i]);
        c->closed = true;
        return;
    }
    if (c->phase == CONN_STREAMING)
        account_done(c); /* a stream that ran to its end */
    free_conn(c);
}

static void on_connection(void *cls, struct MHD_Connection *mc, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    srv_server *s = cls;
    s->n_conns += toe == MHD_CONNECTION_NOTIFY_STARTED ? 1 : -1;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
        sockwatch *w = calloc(1, sizeof(*w));
        if (!ci || !w || !s->loop || uv_poll_init_socket(s->loop, &w->poll, ci->connect_fd) != 0) {
            free(w); /* no watch: the idle timeout still closes a half-closed connection */
            return;
        }
        uv_unref((uv_handle_t *)&w->poll);
        sockwatch_arm(w);
        *socket_context = w;
        return;
    }
    sockwatch *w = *socket_context;
    *socket_context = NULL;
    if (!w)
        return;
    if (w->c)
        w->c->w = NULL;
    sockwatch_set(w, 0); /* before libmicrohttpd closes the descriptor */
    uv_close((uv_handle_t *)&w->poll, free_handle);
}

/* The whole of a small text file (PEM), NUL-terminated; NULL with err. */
static char *read_text_file(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open '%s'", path);
        return NULL;
    }
    char *buf = malloc(1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    fclose(f);
    if (!buf || n == 0) {
        free(buf);
        snprintf(err, errlen, "'%s' is empty or unreadable", path);
        return NULL;
    }
    buf[n] = 0;
    return buf;
}

/* ---- lifecycle ---------------------------------------------------------- */

static void stop_loop(srv_server *s)
{
    uv_timer_stop(&s->drain_timer);
    uv_poll_stop(&s->poll);
    uv_timer_stop(&s->timer);
    uv_signal_stop(&s->sigint);
    uv_signal_stop(&s->sigterm);
    uv_stop(s->loop);
}

static void on_drain_tick(uv_timer_t *t)
{
    srv_server *s = t->data;
    /* Two idle ticks in a row: the last responses have had a tick to flush. */
    if (s->active == 0) {
        if (++s->idle_ticks >= 2)
            stop_loop(s);
        return;
    }
    s->idle_ticks = 0;
    if (!s->engine_cancelled && s->engine && sched_now() > s->drain_deadline) {
        fprintf(stderr, "sieve: drain timeout, cancelling %d requests\n", s->active);
        s->engine_cancelled = true;
        sched_engine_cancel_all(s->engine);
    }
}

static void on_signal(uv_signal_t *sig, int signum)
{
    srv_server *s = sig->data;
    if (s->draining) {
        fprintf(stderr, "sieve: second signal, stopping now\n");
        s->drain_deadline = 0;
        return;
    }
    fprintf(stderr, "sieve: signal %d: draining %d requests in flight\n", signum, s->active);
    s->draining = true;
    /* Stop accepting, and close the listening socket now: new connections are
     * refused at once instead of waiting in the backlog for the whole drain
     * (allowed right away since libmicrohttpd runs without threads here). */
    MHD_socket lfd = MHD_quiesce_daemon(s->d);
    if (lfd != MHD_INVALID_SOCKET)
        close(lfd);
    s->drain_deadline = sched_now() + s->cfg.drain_timeout_s;
    uv_timer_start(&s->drain_timer, on_drain_tick, 0, 50);
}

/* Model-dependent state, set once the model has loaded (loop thread). */
static int attach_model(srv_server *s, char *err, size_t errlen)
{
    const cfg_config *cfg = &s->cfg;
    s->tok = rt_model_tokenizer(s->model);
    s->limits = (srv_limits){.model_name = s->model_name,
                             .n_vocab = rt_model_hparams(s->model)->n_vocab,
                             .n_ctx = rt_model_n_ctx(s->model),
                             .default_max_tokens = cfg->default_max_tokens,
                             .attention = &s->attn_conf};
    if (cfg->chat_template[0]) {
        s->chat_family = rt_chat_family_from_name(cfg->chat_template);
        if (s->chat_family < 0) {
            snprintf(err, errlen,
                     "config key 'chat_template': unknown family '%s' (plain, chatml, llama2, "
                     "llama3, mistral, gemma, phi3, zephyr)",
                     cfg->chat_template);
            return -1;
        }
    } else {
        size_t tl;
        const char *t = rt_model_chat_template(s->model, &tl);
        s->chat_family = t ? rt_chat_family_detect(t, tl) : RT_CHAT_PLAIN;
        if (s->chat_family < 0) {
            fprintf(stderr, "sieve: the model's chat template is not a known family; using "
                            "'plain' (set chat_template to choose one)\n");
            s->chat_family = RT_CHAT_PLAIN;
        }
    }
    fprintf(stderr, "sieve: chat template '%s'\n",
            rt_chat_family_name((rt_chat_family)s->chat_family));
    return 0;
}

int srv_create(srv_server **out, const cfg_config *cfg, char *err, size_t errlen)
{
    *out = NULL;
    srv_server *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    s->cfg = *cfg;
    s->created = (long)time(NULL);
    if (srv_attention_conf_parse(&s->attn_conf, cfg->attention, err, errlen) != 0) {
        free(s);
        return -1;
    }
    s->listen_fd = MHD_INVALID_SOCKET;
    if (cfg->model_name[0]) {
        snprintf(s->model_name, sizeof(s->model_name), "%s", cfg->model_name);
    } else {
        const char *base = strrchr(cfg->model, '/');
        base = base ? base + 1 : cfg->model;
        snprintf(s->model_name, sizeof(s->model_name), "%.255s", base);
        char *dot = strrchr(s->model_name, '.');
        if (dot && strcmp(dot, ".gguf") == 0)
            *dot = 0;
    }
    pthread_mutex_init(&s->done_mu, NULL);

    struct sockaddr_in sa4;
    struct sockaddr_in6 sa6;
    struct sockaddr *sa;
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    memset(&sa4, 0, sizeof(sa4));
    memset(&sa6, 0, sizeof(sa6));
    if (inet_pton(AF_INET, cfg->host, &sa4.sin_addr) == 1) {
        sa4.sin_family = AF_INET;
        sa4.sin_port = htons((uint16_t)cfg->port);
        sa = (struct sockaddr *)&sa4;
    } else if (inet_pton(AF_INET6, cfg->host, &sa6.sin6_addr) == 1) {
        sa6.sin6_family = AF_INET6;
        sa6.sin6_port = htons((uint16_t)cfg->port);
        sa = (struct sockaddr *)&sa6;
        flags |= MHD_USE_IPv6;
    } else {
        snprintf(err, errlen, "config key 'host': '%s' is not an IPv4 or IPv6 address", cfg->host);
        srv_destroy(s);
        return -1;
    }
    if (cfg->tls_cert_file[0]) {
        char e2[512];
        if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES) {
            snprintf(err, errlen, "TLS is configured but this libmicrohttpd has no TLS support");
            srv_destroy(s);
            return -1;
        }
        s->tls_cert = read_text_file(cfg->tls_cert_file, e2, sizeof(e2));
        s->tls_key = s->tls_cert ? read_text_file(cfg->tls_key_file, e2, sizeof(e2)) : NULL;
        if (!s->tls_key) {
            snprintf(err, errlen, "TLS: %s", e2);
            srv_destroy(s);
            return -1;
        }
        flags |= MHD_USE_TLS;
    }
    /* libmicrohttpd's hard cap sits above max_connections so that the extra
     * connections can be told 503 instead of being dropped. */
    const unsigned hard_cap = (unsigned)cfg->max_connections + 64;
    if (s->tls_cert)
        s->d = MHD_start_daemon(
            flags, (uint16_t)cfg->port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR, sa,
            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_NOTIFY_CONNECTION,
            on_connection, s, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->connection_timeout_s,
            MHD_OPTION_CONNECTION_LIMIT, hard_cap, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
            (size_t)cfg->max_header_bytes, MHD_OPTION_HTTPS_MEM_CERT, s->tls_cert,
            MHD_OPTION_HTTPS_MEM_KEY, s->tls_key, MHD_OPTION_END);
    else
        s->d = MHD_start_daemon(
            flags, (uint16_t)cfg->port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR, sa,
            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_NOTIFY_CONNECTION,
            on_connection, s, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->connection_timeout_s,
            MHD_OPTION_CONNECTION_LIMIT, hard_cap, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
            (size_t)cfg->max_header_bytes, MHD_OPTION_END);
    if (!s->d) {
        snprintf(err, errlen, "cannot listen on %s:%d (address in use or not permitted?)",
                 cfg->host, cfg->port);
        srv_destroy(s);
        return -1;
    }
    const union MHD_DaemonInfo *pi = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = pi ? pi->port : cfg->port;
    *out = s;
    return 0;
}

int srv_port(const srv_server *s)
{
    return s->port;
}

static void load_work(uv_work_t *w)
{
    srv_server *s = w->data;
    if (srv_boot_model(&s->cfg, &s->model, &s->engine, s->load_err, sizeof(s->load_err)) != 0)
        s->load_failed = true;
}

static void load_done(uv_work_t *w, int status)
{
    srv_server *s = w->data;
    char err[512];
    if (!s->load_failed && status == 0 && attach_model(s, err, sizeof(err)) != 0) {
        snprintf(s->load_err, sizeof(s->load_err), "%s", err);
        s->load_failed = true;
    }
    if (s->load_failed || status != 0) {
        fprintf(stderr, "sieve: %s\n", s->load_err);
        s->exit_code = 1;
        stop_loop(s);
        return;
    }
    s->model_ready = true;
    fprintf(stderr, "sieve: serving model '%s' on http://%s:%d\n", s->model_name, s->cfg.host,
            s->port);
}

int srv_run(srv_server *s)
{
    s->loop = uv_default_loop();
    const union MHD_DaemonInfo *ei = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_EPOLL_FD);
    if (!ei) {
        fprintf(stderr, "sieve: libmicrohttpd has no epoll fd\n");
        return 1;
    }
    uv_poll_init(s->loop, &s->poll, ei->epoll_fd);
    uv_timer_init(s->loop, &s->timer);
    uv_timer_init(s->loop, &s->drain_timer);
    uv_async_init(s->loop, &s->async, on_async);
    uv_signal_init(s->loop, &s->sigint);
    uv_signal_init(s->loop, &s->sigterm);
    s->poll.data = s->timer.data = s->async.data = s->drain_timer.data = s;
    s->sigint.data = s->sigterm.data = s;
    uv_poll_start(&s->poll, UV_READABLE, on_poll);
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    signal(SIGPIPE, SIG_IGN);
    fprintf(stderr, "sieve: listening on http://%s:%d (model '%s' loading)\n", s->cfg.host, s->port,
            s->model_name);
    s->load_work.data = s;
    uv_queue_work(s->loop, &s->load_work, load_work, load_done);
    run_mhd(s);
    uv_run(s->loop, UV_RUN_DEFAULT);
    /* Let MHD flush the last responses before the daemon goes away. */
    for (int i = 0; i < 20; i++)
        MHD_run(s->d);
    uv_close((uv_handle_t *)&s->poll, NULL);
    uv_close((uv_handle_t *)&s->timer, NULL);
    uv_close((uv_handle_t *)&s->drain_timer, NULL);
    uv_close((uv_handle_t *)&s->async, NULL);
    uv_close((uv_handle_t *)&s->sigint, NULL);
    uv_close((uv_handle_t *)&s->sigterm, NULL);
    uv_run(s->loop, UV_RUN_DEFAULT);
    return s->exit_code;
}

void srv_destroy(srv_server *s)
{
    if (!s)
        return;
    if (s->d)
        MHD_stop_daemon(s->d);
    if (s->loop)
        uv_run(s->loop, UV_RUN_NOWAIT); /* the close callbacks of the socket watches */
    if (s->listen_fd != MHD_INVALID_SOCKET)
        close(s->listen_fd);
    sched_engine_destroy(s->engine);
    rt_model_destroy(s->model);
    free(s->tls_cert);
    free(s->tls_key);
    pthread_mutex_destroy(&s->done_mu);
    free(s);
}
