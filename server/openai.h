/*
 * openai.h - the OpenAI API's JSON: parsing and validating request bodies,
 * building responses and error objects. Pure functions over jansson values,
 * no I/O, so they are unit-tested directly. Private to server/.
 */
#ifndef SIEVE_SERVER_OPENAI_H
#define SIEVE_SERVER_OPENAI_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/sampler.h"
#include "runtime/tokenizer.h"
#include "scheduler/scheduler.h"
#include "server/attention.h"

/* An error as OpenAI reports it: HTTP status, error.type, error.code,
 * error.param and a message that names the field and the problem. */
typedef struct {
    int status;
    const char *type; /* "invalid_request_error", "not_found_error", ... */
    const char *code; /* NULL -> JSON null */
    char param[64];   /* "" -> JSON null */
    char message[512];
} srv_error;

void srv_error_set(srv_error *e, int status, const char *type, const char *code, const char *param,
                   const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* {"error": {"message", "type", "param", "code"}}; caller decrefs. */
json_t *srv_error_json(const srv_error *e);

/* What the server accepts; from the configuration and the model. */
typedef struct {
    const char *model_name;
    int n_vocab;
    int n_ctx;
    int default_max_tokens;
    const srv_attention_conf *attention; /* NULL: the built-in defaults */
} srv_limits;

#define SRV_MAX_CHOICES 16
#define SRV_SYSTEM_FINGERPRINT "sieve-" SIEVE_VERSION

typedef enum { SRV_COMPLETION, SRV_CHAT } srv_kind;

typedef struct {
    char *role;
    char *content; /* NUL-terminated; content_len bytes (may hold NULs) */
    size_t content_len;
} srv_msg;

/* A validated POST /v1/completions or /v1/chat/completions body. */
typedef struct {
    srv_kind kind;
    char *prompt_text; /* NUL-terminated; NULL when the prompt is token ids */
    size_t prompt_len;
    int32_t *prompt_tokens;
    int n_prompt_tokens;
    int max_tokens; /* 0 when the request left it to the server */
    rt_sampling sampling;
    bool seed_set;
    char *stop[SCHED_MAX_STOP];
    int n_stop;
    bool ignore_eos;
    char *user;
    srv_msg *msgs; /* chat */
    int n_msgs;
    rt_logit_bias *bias; /* sampling.logit_bias points here */
    int n;               /* choices */
    int min_tokens;
    int priority; /* lower is served first (vLLM's convention) */
    bool stream, include_usage;
    int logprobs;       /* -1: none; else the number of top alternatives */
    bool echo;          /* completions: prepend the prompt */
    srv_attention attn; /* the "attention" extension, defaults applied */
} srv_completion_req;

int srv_parse_request(srv_kind kind, const char *body, size_t len, const srv_limits *lim,
                      srv_completion_req *out, srv_error *err);

/* Parses and validates a completions body. Returns 0, or -1 with err filled (status 400
 * or 404). On success out owns its strings; free with
 * srv_completion_req_free (also safe after a failure). */
int srv_parse_completion(const char *body, size_t len, const srv_limits *lim,
                         srv_completion_req *out, srv_error *err);
void srv_completion_req_free(srv_completion_req *r);

/* A JSON string of model output, which need not be valid UTF-8 (a byte token
 * cut off by max_tokens): invalid bytes become U+FFFD. Never NULL. */
json_t *srv_json_text(const char *text, size_t len);

/* The text_completion response object; caller decrefs. */
json_t *srv_completion_json(const char *id, const char *model, long created, const char *text,
                            size_t text_len, const char *finish_reason, int prompt_tokens,
                            int completion_tokens);

/* The response (or, with chunk, one streamed chunk) around a choices array,
 * which it takes over; usage may be NULL. */
json_t *srv_response_json(srv_kind kind, bool chunk, const char *id, const char *model,
                          long created, json_t *choices, json_t *usage);
/* One choice: completions {index, text, logprobs, finish_reason}; chat
 * {index, message|delta, logprobs, finish_reason}; takes over logprobs. */
json_t *srv_choice_json(srv_kind kind, bool chunk, int index, const char *text, size_t len,
                        bool with_role, const char *finish_reason, json_t *logprobs);
json_t *srv_usage_json(int prompt_tokens, int completion_tokens);
/* Logprobs of generated tokens [from, to) in the endpoint's format; text_base
 * is added to completions' text offsets (the echoed prompt's length). */
json_t *srv_logprobs_json(srv_kind kind, const rt_tokenizer *tok, const sched_output *o, int from,
                          int to, size_t text_base);

/* GET /v1/models; caller decrefs. */
json_t *srv_models_json(const char *model_name, long created, int n_ctx);

/* "stop" / "length" for a finished request. */
const char *srv_finish_reason(sched_finish f);

#endif
