/*
 * scheduler.h - the engine: request lifecycle and continuous batching.
 *
 * The engine owns the model and runs on its own thread. Each step it admits
 * waiting requests (up to max_running_seqs), then runs one forward pass over a
 * flat batch: one decode token for every running sequence plus chunks of the
 * prompts still being prefilled, within max_batch_tokens, so a long prompt
 * never stalls the running streams. After the step it samples, applies stop
 * conditions and notifies each request's owner through its callback.
 *
 * Threads: sched_submit / sched_request_cancel / the getters may be called
 * from any thread (the server's loop thread); the notify callback runs on the
 * engine thread and must not block (the server posts a uv_async).
 */
#ifndef SIEVE_SCHEDULER_H
#define SIEVE_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/model.h"
#include "runtime/sampler.h"

#define SCHED_MAX_STOP 4

typedef enum {
    SCHED_FINISH_NONE = 0,
    SCHED_FINISH_LENGTH,    /* max_tokens or the context length reached */
    SCHED_FINISH_STOP,      /* EOS or a stop string */
    SCHED_FINISH_CANCELLED, /* the client went away or the server is stopping */
    SCHED_FINISH_ERROR,     /* the forward pass refused the batch */
} sched_finish;

typedef struct {
    int32_t *prompt; /* copied at create */
    int n_prompt;
    int max_tokens;  /* > 0 */
    rt_sampling sampling;
    char *stop[SCHED_MAX_STOP]; /* copied; n_stop used */
    int n_stop;
    bool ignore_eos;
} sched_params;

typedef struct sched_request sched_request;
typedef struct sched_engine sched_engine;

/* Called on the engine thread whenever the request produced output or
 * finished (finished is then true, and this is the last call). */
typedef void (*sched_notify_fn)(sched_request *r, bool finished, void *user);

typedef struct {
    int max_running_seqs;
    int max_waiting;
} sched_opts;

/* Starts the engine thread over a loaded model (the engine does not own it). */
sched_engine *sched_engine_create(rt_model *model, const sched_opts *opts);
/* Cancels everything still queued or running, stops and joins the thread. */
void sched_engine_destroy(sched_engine *e);

/* A request holds one reference for its creator; submit adds the engine's. */
sched_request *sched_request_create(const sched_params *p, sched_notify_fn notify, void *user);
void sched_request_release(sched_request *r);

enum { SCHED_OK = 0, SCHED_E_QUEUE_FULL = -1, SCHED_E_TOO_LONG = -2, SCHED_E_STOPPING = -3 };

/* Cancels every queued and running request at the engine's next step (their
 * owners are notified with SCHED_FINISH_CANCELLED); new submits still work. */
void sched_engine_cancel_all(sched_engine *e);

/* Queues the request. SCHED_E_TOO_LONG when prompt + max_tokens exceed the
 * context, SCHED_E_QUEUE_FULL when max_waiting requests already wait. */
int sched_submit(sched_engine *e, sched_request *r);

/* Asks the engine to stop the request at its next step (idempotent). */
void sched_request_cancel(sched_request *r);

/* A consistent snapshot of a request's output, taken under its lock. text is
 * a malloc-ed copy of the final text from byte text_from on (caller frees);
 * tokens point into the request and stay valid until it is released. While
 * the request runs, text_len stops short of bytes that may still turn out to
 * be the start of a stop string or of a UTF-8 character. */
typedef struct {
    char *text;
    size_t text_len;       /* total bytes of final text (stop strings removed) */
    const int32_t *tokens; /* generated token ids */
    int n_tokens;
    int n_prompt;
    sched_finish finish;   /* NONE while running */
    char error[256];       /* for SCHED_FINISH_ERROR */
    double t_arrival, t_first_token, t_finish; /* seconds, monotonic */
} sched_output;

/* Returns 0, or -1 when the copy cannot be allocated. */
int sched_request_output(sched_request *r, size_t text_from, sched_output *out);

/* Per-engine counters, read from any thread. */
typedef struct {
    int running;
    int waiting;
    uint64_t requests_finished;
    uint64_t prompt_tokens;
    uint64_t generated_tokens;
    uint64_t steps;
} sched_stats;

void sched_engine_stats(sched_engine *e, sched_stats *out);
int sched_engine_n_ctx(const sched_engine *e);

/* Monotonic clock in seconds. */
double sched_now(void);

#endif
