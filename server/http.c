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
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "runtime/tokenizer.h"
#include "server/openai.h"

typedef enum {
    CONN_READING,    /* collecting the body */
    CONN_WORKING,    /* tokenizing or with the engine; the connection is suspended */
    CONN_RESPONDING, /* response ready to queue */
} conn_phase;

typedef struct conn {
    srv_server *srv;
    struct MHD_Connection *mc;
    conn_phase phase;
    char *body;
    size_t len, cap;
    bool too_large;
    srv_completion_req creq;
    sched_request *req;
    uv_work_t work;
    int32_t *tokens; /* from the worker pool */
    size_t n_tokens;
    int status; /* response */
    char *resp;
    char id[40];
    double t_start;
    struct conn *next_done;
    bool closed; /* MHD finished with it while the engine still ran */
} conn;

struct srv_server {
    cfg_config cfg;
    rt_model *model;
    sched_engine *engine;
    const rt_tokenizer *tok;
    srv_limits limits;
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
    conn *done; /* connections whose engine request finished */
    int port;
    int active; /* connections in CONN_WORKING */
    bool draining;
    int idle_ticks; /* drain ticks in a row with nothing in flight */
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

static void set_error(conn *c, const srv_error *e) { set_json_response(c, e->status, srv_error_json(e)); }

static enum MHD_Result queue_body(struct MHD_Connection *mc, int status, char *body,
                                  const char *extra_header, const char *extra_value)
{
    const char *text = body ? body : "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (extra_header)
        MHD_add_response_header(r, extra_header, extra_value);
    enum MHD_Result ret = MHD_queue_response(mc, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result queue_error(struct MHD_Connection *mc, const srv_error *e)
{
    json_t *j = srv_error_json(e);
    char *body = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    const char *allow = e->status == 405 ? "Allow" : NULL;
    enum MHD_Result ret = queue_body(mc, e->status, body, allow, allow ? e->param : NULL);
    free(body);
    return ret;
}

/* ---- the loop's view of MHD --------------------------------------------- */

static void run_mhd(srv_server *s);

static void on_timer(uv_timer_t *t) { run_mhd(t->data); }

static void on_poll(uv_poll_t *p, int status, int events) { run_mhd(p->data); }

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

static void on_engine_notify(sched_request *r, bool finished, void *user)
{
    if (!finished)
        return;
    conn *c = user;
    srv_server *s = c->srv;
    pthread_mutex_lock(&s->done_mu);
    c->next_done = s->done;
    s->done = c;
    pthread_mutex_unlock(&s->done_mu);
    uv_async_send(&s->async);
}

static void build_completion_response(conn *c)
{
    sched_output o;
    if (sched_request_output(c->req, 0, &o) != 0) {
        srv_error e;
        srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        set_error(c, &e);
        free(o.text);
        return;
    }
    srv_server *s = c->srv;
    if (o.finish == SCHED_FINISH_ERROR || o.finish == SCHED_FINISH_CANCELLED) {
        srv_error e;
        if (o.finish == SCHED_FINISH_ERROR)
            srv_error_set(&e, 500, "server_error", NULL, NULL, "generation failed: %s", o.error);
        else
            srv_error_set(&e, 503, "server_error", "server_shutting_down", NULL,
                          "the server is shutting down; retry on another replica");
        set_error(c, &e);
    } else {
        json_t *j = srv_completion_json(c->id, s->model_name, (long)time(NULL), o.text,
                                        o.text_len, srv_finish_reason(o.finish), o.n_prompt,
                                        o.n_tokens);
        set_json_response(c, 200, j);
        if (s->cfg.log_requests)
            fprintf(stderr,
                    "sieve: %s prompt %d tokens, completion %d tokens (%s), ttft %.1f ms, "
                    "total %.1f ms\n",
                    c->id, o.n_prompt, o.n_tokens, srv_finish_reason(o.finish),
                    (o.t_first_token - o.t_arrival) * 1e3, (o.t_finish - c->t_start) * 1e3);
    }
    free(o.text);
}

static void on_async(uv_async_t *a)
{
    srv_server *s = a->data;
    pthread_mutex_lock(&s->done_mu);
    conn *list = s->done;
    s->done = NULL;
    pthread_mutex_unlock(&s->done_mu);
    while (list) {
        conn *c = list;
        list = c->next_done;
        build_completion_response(c);
        sched_request_release(c->req);
        c->req = NULL;
        c->phase = CONN_RESPONDING;
        s->active--;
        MHD_resume_connection(c->mc);
    }
    run_mhd(s);
}

/* Worker pool: tokenizing a long prompt must not stall the loop. */
static void tokenize_work(uv_work_t *w)
{
    conn *c = w->data;
    srv_server *s = c->srv;
    if (c->creq.prompt_text) {
        if (rt_tokenize(s->tok, c->creq.prompt_text, c->creq.prompt_len, true, true, &c->tokens,
                        &c->n_tokens) != 0) {
            c->tokens = NULL;
            c->n_tokens = 0;
        }
    }
}

static void fail_working(conn *c, const srv_error *e)
{
    set_error(c, e);
    c->phase = CONN_RESPONDING;
    c->srv->active--;
    MHD_resume_connection(c->mc);
    run_mhd(c->srv);
}

static void tokenize_done(uv_work_t *w, int status)
{
    conn *c = w->data;
    srv_server *s = c->srv;
    srv_error e;
    const int32_t *prompt = c->creq.prompt_text ? c->tokens : c->creq.prompt_tokens;
    const int n_prompt = c->creq.prompt_text ? (int)c->n_tokens : c->creq.n_prompt_tokens;
    if (status != 0 || (c->creq.prompt_text && !c->tokens)) {
        srv_error_set(&e, 500, "server_error", NULL, NULL, "tokenization failed");
        fail_working(c, &e);
        return;
    }
    if (n_prompt == 0) {
        srv_error_set(&e, 400, "invalid_request_error", NULL, "prompt",
                      "'prompt' produced no tokens");
        fail_working(c, &e);
        return;
    }
    const int n_ctx = sched_engine_n_ctx(s->engine);
    int max_tokens = c->creq.max_tokens;
    if (n_prompt >= n_ctx || (max_tokens > 0 && n_prompt + max_tokens > n_ctx)) {
        srv_error_set(&e, 400, "invalid_request_error", "context_length_exceeded", "prompt",
                      "This model's maximum context length is %d tokens. However, you requested "
                      "%d tokens (%d in the prompt, %d for the completion). Please reduce the "
                      "prompt or max_tokens.",
                      n_ctx, n_prompt + (max_tokens > 0 ? max_tokens : 1), n_prompt,
                      max_tokens > 0 ? max_tokens : 1);
        fail_working(c, &e);
        return;
    }
    if (max_tokens == 0) {
        max_tokens = s->cfg.default_max_tokens;
        if (max_tokens > n_ctx - n_prompt)
            max_tokens = n_ctx - n_prompt;
    }
    sched_params p = {0};
    p.prompt = (int32_t *)prompt;
    p.n_prompt = n_prompt;
    p.max_tokens = max_tokens;
    p.sampling = c->creq.sampling;
    if (!c->creq.seed_set) {
        uint64_t seed;
        if (getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed))
            seed = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)c;
        p.sampling.seed = seed;
    }
    for (int i = 0; i < c->creq.n_stop; i++)
        p.stop[i] = c->creq.stop[i];
    p.n_stop = c->creq.n_stop;
    p.ignore_eos = c->creq.ignore_eos;
    c->req = sched_request_create(&p, on_engine_notify, c);
    if (!c->req) {
        srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
        fail_working(c, &e);
        return;
    }
    int rc = sched_submit(s->engine, c->req);
    if (rc != SCHED_OK) {
        sched_request_release(c->req);
        c->req = NULL;
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

static enum MHD_Result start_completion(conn *c)
{
    srv_server *s = c->srv;
    srv_error e;
    if (srv_parse_completion(c->body ? c->body : "", c->len, &s->limits, &c->creq, &e) != 0)
        return queue_error(c->mc, &e);
    if (s->draining) {
        srv_error_set(&e, 503, "server_error", "server_shutting_down", NULL,
                      "the server is shutting down");
        return queue_error(c->mc, &e);
    }
    random_id(c->id, sizeof(c->id), "cmpl-");
    c->phase = CONN_WORKING;
    s->active++;
    c->work.data = c;
    MHD_suspend_connection(c->mc);
    if (uv_queue_work(s->loop, &c->work, tokenize_work, tokenize_done) != 0) {
        srv_error_set(&e, 500, "server_error", NULL, NULL, "cannot queue tokenization");
        fail_working(c, &e);
    }
    return MHD_YES;
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
    if (strcmp(url, "/health") == 0 || strcmp(url, "/v1/health") == 0) {
        if (!is_get_or_head(method))
            allow = "GET, HEAD";
        else if (s->draining)
            return queue_body(c->mc, 503, "{\"status\":\"draining\"}", NULL, NULL);
        else
            return queue_body(c->mc, 200, "{\"status\":\"ok\"}", NULL, NULL);
    } else if (strcmp(url, "/v1/models") == 0) {
        if (!is_get_or_head(method)) {
            allow = "GET, HEAD";
        } else {
            json_t *j = srv_models_json(s->model_name, s->created, s->limits.n_ctx);
            char *body = json_dumps(j, JSON_COMPACT);
            json_decref(j);
            enum MHD_Result r = queue_body(c->mc, 200, body, NULL, NULL);
            free(body);
            return r;
        }
    } else if (strncmp(url, "/v1/models/", 11) == 0 && is_get_or_head(method)) {
        if (strcmp(url + 11, s->model_name) != 0) {
            srv_error_set(&e, 404, "invalid_request_error", "model_not_found", "model",
                          "The model '%.200s' does not exist", url + 11);
            return queue_error(c->mc, &e);
        }
        json_t *j = srv_models_json(s->model_name, s->created, s->limits.n_ctx);
        json_t *m = json_incref(json_array_get(json_object_get(j, "data"), 0));
        json_decref(j);
        char *body = json_dumps(m, JSON_COMPACT);
        json_decref(m);
        enum MHD_Result r = queue_body(c->mc, 200, body, NULL, NULL);
        free(body);
        return r;
    } else if (strcmp(url, "/v1/completions") == 0) {
        if (strcmp(method, "POST") != 0)
            allow = "POST";
        else
            return start_completion(c);
    } else {
        srv_error_set(&e, 404, "invalid_request_error", "not_found", NULL,
                      "Unknown endpoint %.16s %.200s", method, url);
        return queue_error(c->mc, &e);
    }
    srv_error_set(&e, 405, "invalid_request_error", "method_not_allowed", allow,
                  "Method %.16s is not allowed on %.200s (allowed: %s)", method, url, allow);
    return queue_error(c->mc, &e);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
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
        *con_cls = c;
        /* Refuse an announced oversized body before reading it. */
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)s->cfg.max_body_bytes) {
            c->too_large = true;
            srv_error e;
            srv_error_set(&e, 413, "invalid_request_error", "request_too_large", NULL,
                          "The request body (%s bytes) exceeds the limit of %lld bytes", cl,
                          (long long)s->cfg.max_body_bytes);
            return queue_error(mc, &e);
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
    case CONN_RESPONDING: {
        enum MHD_Result r = queue_body(mc, c->status, c->resp, NULL, NULL);
        return r;
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
        return queue_error(mc, &e);
    }
    return route(c, method, url);
}

static void free_conn(conn *c)
{
    srv_completion_req_free(&c->creq);
    free(c->body);
    free(c->tokens);
    free(c->resp);
    free(c);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    conn *c = *con_cls;
    *con_cls = NULL;
    if (!c)
        return;
    /* A suspended connection is never completed by MHD, so the engine and the
     * worker pool are done with c by now. */
    free_conn(c);
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
    if (!s->engine_cancelled && sched_now() > s->drain_deadline) {
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
    s->listen_fd = MHD_quiesce_daemon(s->d);
    s->drain_deadline = sched_now() + s->cfg.drain_timeout_s;
    uv_timer_start(&s->drain_timer, on_drain_tick, 0, 50);
}

int srv_create(srv_server **out, const cfg_config *cfg, rt_model *model, sched_engine *engine,
               char *err, size_t errlen)
{
    *out = NULL;
    srv_server *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    s->cfg = *cfg;
    s->model = model;
    s->engine = engine;
    s->tok = rt_model_tokenizer(model);
    s->created = (long)time(NULL);
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
    s->limits = (srv_limits){.model_name = s->model_name,
                             .n_vocab = rt_model_hparams(model)->n_vocab,
                             .n_ctx = rt_model_n_ctx(model),
                             .default_max_tokens = cfg->default_max_tokens};
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
        snprintf(err, errlen, "config key 'host': '%s' is not an IPv4 or IPv6 address",
                 cfg->host);
        srv_destroy(s);
        return -1;
    }
    s->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, on_request, s,
                            MHD_OPTION_SOCK_ADDR, sa, MHD_OPTION_NOTIFY_COMPLETED, on_completed,
                            s, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->connection_timeout_s,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->max_connections,
                            MHD_OPTION_END);
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

int srv_port(const srv_server *s) { return s->port; }

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
    fprintf(stderr, "sieve: serving model '%s' on http://%s:%d\n", s->model_name, s->cfg.host,
            s->port);
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
    return 0;
}

void srv_destroy(srv_server *s)
{
    if (!s)
        return;
    if (s->d)
        MHD_stop_daemon(s->d);
    if (s->listen_fd != MHD_INVALID_SOCKET)
        close(s->listen_fd);
    pthread_mutex_destroy(&s->done_mu);
    free(s);
}
