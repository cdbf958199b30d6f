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
    SCHED_FINISH_TIMEOUT,   /* the request's deadline passed */
    SCHED_FINISH_COUNT
} sched_finish;

typedef struct {
    int32_t *prompt; /* copied at create */
    int n_prompt;
    int max_tokens; /* > 0 */
    rt_sampling sampling;
    char *stop[SCHED_MAX_STOP]; /* copied; n_stop used */
    int n_stop;
    bool ignore_eos;
    int min_tokens;        /* EOS is suppressed until this many tokens exist */
    int logprobs;          /* -1: none; k >= 0: each token's logprob and the top k */
    int priority;          /* lower runs first (vLLM's convention); ties: first come first served */
    double timeout_s;      /* > 0: finish with SCHED_FINISH_TIMEOUT this long after submit */
    rt_attn_policy policy; /* prefill attention (zeroed: dense) */
    rt_kv_policy kv;       /* KV cache format (zeroed: fp) */
} sched_params;

#define SCHED_MAX_LOGPROBS 20

typedef struct sched_request sched_request;
typedef struct sched_engine sched_engine;

/* Called on the engine thread whenever the request produced output or
 * finished (finished is then true, and this is the last call). */
typedef void (*sched_notify_fn)(sched_request *r, bool finished, void *user);

/* The forward pass the engine calls; rt_forward bound to the model unless a
 * test substitutes its own. */
typedef int (*sched_forward_fn)(void *ctx, rt_seq_batch *seqs, int n_seqs, char *err,
                                size_t errlen);

typedef struct {
    int max_running_seqs;
    int max_waiting;
    int max_batch_tokens;   /* 0: the model's */
    int64_t kv_cache_bytes; /* KV pool budget; 0: enough for max_running_seqs full contexts,
                               capped at a quarter of available memory */
    int kv_block_size;      /* tokens per block; 0: 16 */
    bool prefix_caching;
    bool manual; /* no engine thread: the caller runs sched_engine_step (tests) */
    /* Tests only (model == NULL): the geometry and the forward to use. */
    sched_forward_fn forward;
    void *forward_ctx;
    rt_kv_pool *pool;
    int n_vocab, n_ctx;
    int32_t eos;
} sched_opts;

/* Starts the engine over a loaded model (the engine does not own it): the KV
 * pool is allocated here from opts. Returns NULL with err on failure. */
sched_engine *sched_engine_create(rt_model *model, const sched_opts *opts, char *err,
                                  size_t errlen);

/* Manual mode: runs one engine step (admission, one batch, sampling) and
 * returns the number of sequences in the batch. */
int sched_engine_step(sched_engine *e);

/* What the last step ran, for tests: the request and token count of each
 * batch entry, in batch order. Returns the entry count (<= cap). */
int sched_engine_last_batch(sched_engine *e, sched_request **reqs, int *n_tokens, int cap);

/* Bookkeeping of a request, for tests: tokens computed and preemptions. */
int sched_request_n_computed(const sched_request *r);
int sched_request_n_preempted(const sched_request *r);
/* Cancels everything still queued or running, stops and joins the thread. */
void sched_engine_destroy(sched_engine *e);

/* A request holds one reference for its creator; submit adds the engine's. */
sched_request *sched_request_create(const sched_params *p, sched_notify_fn notify, void *user);
void sched_request_release(sched_request *r);

enum { SCHED_OK = 0, SCHED_E_QUEUE_FULL = -1, SCHED_E_TOO_LONG = -2, SCHED_E_STOPPING = -3 };

/* Cancels every queued and running request at the engine's next step (their
 * owners are notified with SCHED_FINISH_CANCELLED); new submits still work. */
void sched_engine_cancel_all(sched_engine *e);

/* Queues n requests all together or none of them (the choices of one HTTP
 * request); same return codes as sched_submit. */
int sched_submit_many(sched_engine *e, sched_request **rs, int n);

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
    /* With logprobs >= 0 (else NULL): per generated token i, its logprob lp[i],
     * and top_ids / top_lps[i * top_n .. + top_n); tok_end[i] is the length of
     * the raw text after token i (before stop strings were cut). */
    const float *lp;
    const int32_t *top_ids;
    const float *top_lps;
    int top_n;
    const size_t *tok_end;
    int n_prompt;
    sched_finish finish;                       /* NONE while running */
    char error[256];                           /* for SCHED_FINISH_ERROR */
    double t_arrival, t_first_token, t_finish; /* seconds, monotonic */
    rt_attn_stats attn;    /* what attention did (blocks on the policy's grid) */
    int prefix_hit_tokens; /* prompt tokens whose KV came from the prefix cache */
} sched_output;

/* Returns 0, or -1 when the copy cannot be allocated. */
int sched_request_output(sched_request *r, size_t text_from, sched_output *out);

/* A histogram with fixed bucket bounds (Prometheus style: counts[i] holds the
 * observations <= bounds[i]; the last count is +Inf). */
#define SCHED_HIST_MAX 24
typedef struct {
    int n_bounds;
    double bounds[SCHED_HIST_MAX];
    uint64_t counts[SCHED_HIST_MAX + 1];
    double sum;
    uint64_t count;
} sched_hist;

void sched_hist_observe(sched_hist *h, double v);

/* Per-engine counters, read from any thread. */
typedef struct {
    int running;
    int waiting;
    uint64_t requests_finished;
    uint64_t finished_by_reason[SCHED_FINISH_COUNT]; /* indexed by sched_finish */
    uint64_t prompt_tokens; /* prompt tokens computed (prefix hits excluded) */
    uint64_t generated_tokens;
    uint64_t steps;
    uint64_t preemptions;
    uint64_t prefix_query_tokens, prefix_hit_tokens;
    int kv_blocks_total, kv_blocks_used, kv_blocks_cached;
    int kv_block_size;
    size_t kv_bytes_per_token;
    /* Blocks in use by format (rt_kv_format; fp includes prompts not yet
     * compressed) and the bytes of one block (all layers, K and V). */
    double kv_blocks_by_format[RT_KV_N_FORMATS]; /* blocks' worth (pages are fractions) */
    size_t kv_block_bytes;
    sched_hist ttft, tpot, e2e, step_time, batch_tokens;
    /* Per prefill policy (rt_prefill_policy): finished sequences, and the
     * attention blocks they computed out of the causal ones. */
    uint64_t policy_requests[3], policy_blocks_computed[3], policy_blocks_causal[3];
} sched_stats;

void sched_engine_stats(sched_engine *e, sched_stats *out);
/* 0 when requests may use KV policy p on this engine (fp always), else -1
 * with a message; *bytes_per_token gets the mean pool bytes per token of
 * the format's compressed tokens (fp: the f32 figure). */
int sched_engine_check_kv(const sched_engine *e, const rt_kv_policy *p, double *bytes_per_token,
                          char *err, size_t errlen);
int sched_engine_n_ctx(const sched_engine *e);

/* Monotonic clock in seconds. */
double sched_now(void);

#endif
