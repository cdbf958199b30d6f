/*
 * fuzz_request.c - libFuzzer target for the OpenAI request parser and
 * validator (server/openai.c: srv_parse_request), both endpoints.
 *
 * Input: the first byte picks the endpoint (even: /v1/completions, odd:
 * /v1/chat/completions; the seeds use '0' and '1' so they stay readable), the
 * rest is the request body, not NUL-terminated.
 *
 * Checked on every input: a refusal is a 400 or 404 with a type and a
 * message (never a 500: nothing here is allowed to run out of memory under
 * libFuzzer's limits), and its error object serializes; an acceptance holds
 * only values in the documented ranges (n, max_tokens, stop strings, token
 * ids, logprobs, sampling parameters, messages); srv_completion_req_free is
 * safe after either, twice; srv_json_text turns the raw body into a JSON
 * string whatever its bytes.
 */
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "server/openai.h"
#include "tests/fuzz/fuzz_common.h"

#define N_VOCAB 512
#define N_CTX 2048

static void check_refusal(const srv_error *err, size_t len)
{
    FUZZ_CHECK(err->status == 400 || err->status == 404, "status %d (%s)", err->status,
               err->message);
    FUZZ_CHECK(err->type != NULL, "no error type");
    FUZZ_CHECK(memchr(err->message, 0, sizeof(err->message)) != NULL, "message not terminated");
    FUZZ_CHECK(err->message[0] != 0, "empty message for a %zu-byte body", len);
    FUZZ_CHECK(memchr(err->param, 0, sizeof(err->param)) != NULL, "param not terminated");
    json_t *j = srv_error_json(err);
    FUZZ_CHECK(j != NULL, "srv_error_json returned NULL");
    char *text = json_dumps(j, JSON_COMPACT);
    FUZZ_CHECK(text != NULL, "the error object does not serialize: %s", err->message);
    free(text);
    json_decref(j);
}

static void check_sampling(const rt_sampling *s)
{
    FUZZ_CHECK(s->temperature >= 0.0f && s->temperature <= 2.0f, "temperature %g", s->temperature);
    FUZZ_CHECK(s->top_p > 0.0f && s->top_p <= 1.0f, "top_p %g", s->top_p);
    FUZZ_CHECK(s->min_p >= 0.0f && s->min_p <= 1.0f, "min_p %g", s->min_p);
    FUZZ_CHECK(s->top_k >= 0, "top_k %d", s->top_k);
    FUZZ_CHECK(s->presence_penalty >= -2.0f && s->presence_penalty <= 2.0f, "presence %g",
               s->presence_penalty);
    FUZZ_CHECK(s->frequency_penalty >= -2.0f && s->frequency_penalty <= 2.0f, "frequency %g",
               s->frequency_penalty);
    FUZZ_CHECK(s->repetition_penalty >= 0.01f && s->repetition_penalty <= 10.0f, "repetition %g",
               s->repetition_penalty);
    FUZZ_CHECK(s->n_logit_bias >= 0 && s->n_logit_bias <= RT_MAX_LOGIT_BIAS, "n_logit_bias %d",
               s->n_logit_bias);
    for (int i = 0; i < s->n_logit_bias; i++) {
        FUZZ_CHECK(s->logit_bias[i].id >= 0 && s->logit_bias[i].id < N_VOCAB, "bias id %d",
                   s->logit_bias[i].id);
        FUZZ_CHECK(s->logit_bias[i].bias >= -100.0f && s->logit_bias[i].bias <= 100.0f, "bias %g",
                   s->logit_bias[i].bias);
    }
}

static void check_acceptance(const srv_completion_req *r, srv_kind kind)
{
    FUZZ_CHECK(r->kind == kind, "kind %d", r->kind);
    FUZZ_CHECK(r->n >= 1 && r->n <= SRV_MAX_CHOICES, "n %d", r->n);
    FUZZ_CHECK(r->max_tokens >= 0 && r->max_tokens <= N_CTX, "max_tokens %d", r->max_tokens);
    FUZZ_CHECK(r->min_tokens >= 0 && r->min_tokens <= N_CTX, "min_tokens %d", r->min_tokens);
    FUZZ_CHECK(r->max_tokens == 0 || r->min_tokens <= r->max_tokens, "min %d > max %d",
               r->min_tokens, r->max_tokens);
    FUZZ_CHECK(r->logprobs >= -1 && r->logprobs <= SCHED_MAX_LOGPROBS, "logprobs %d", r->logprobs);
    FUZZ_CHECK(r->priority >= -1000000 && r->priority <= 1000000, "priority %d", r->priority);
    FUZZ_CHECK(!r->include_usage || r->stream, "include_usage without stream");
    FUZZ_CHECK(r->n_stop >= 0 && r->n_stop <= SCHED_MAX_STOP, "n_stop %d", r->n_stop);
    for (int i = 0; i < r->n_stop; i++) {
        const size_t sl = strlen(r->stop[i]);
        FUZZ_CHECK(sl >= 1 && sl <= 256, "stop[%d] has %zu bytes", i, sl);
    }
    check_sampling(&r->sampling);
    if (kind == SRV_COMPLETION) {
        FUZZ_CHECK((r->prompt_text != NULL) != (r->prompt_tokens != NULL),
                   "prompt: text %p tokens %p", (void *)r->prompt_text, (void *)r->prompt_tokens);
        if (r->prompt_text) {
            FUZZ_CHECK(r->prompt_text[r->prompt_len] == 0, "prompt text not terminated");
        } else {
            FUZZ_CHECK(r->n_prompt_tokens >= 1 && r->n_prompt_tokens <= N_CTX, "n_prompt_tokens %d",
                       r->n_prompt_tokens);
            for (int i = 0; i < r->n_prompt_tokens; i++)
                FUZZ_CHECK(r->prompt_tokens[i] >= 0 && r->prompt_tokens[i] < N_VOCAB,
                           "prompt[%d] = %d", i, r->prompt_tokens[i]);
        }
        FUZZ_CHECK(r->n_msgs == 0, "a completion with %d messages", r->n_msgs);
    } else {
        FUZZ_CHECK(r->n_msgs >= 1 && r->msgs != NULL, "chat with %d messages", r->n_msgs);
        FUZZ_CHECK(!r->echo, "echo on chat");
        for (int i = 0; i < r->n_msgs; i++) {
            const char *role = r->msgs[i].role;
            FUZZ_CHECK(role && (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0 ||
                                strcmp(role, "user") == 0 || strcmp(role, "assistant") == 0),
                       "messages[%d].role '%s'", i, role ? role : "(null)");
            FUZZ_CHECK(r->msgs[i].content && r->msgs[i].content[r->msgs[i].content_len] == 0,
                       "messages[%d].content not terminated", i);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const srv_kind kind = (data[0] & 1) ? SRV_CHAT : SRV_COMPLETION;
    const char *body = (const char *)data + 1;
    const size_t len = size - 1;
    const srv_limits lim = {
        .model_name = "stories260K", .n_vocab = N_VOCAB, .n_ctx = N_CTX, .default_max_tokens = 16};
    srv_completion_req req;
    srv_error err;
    if (srv_parse_request(kind, body, len, &lim, &req, &err) == 0)
        check_acceptance(&req, kind);
    else
        check_refusal(&err, len);
    srv_completion_req_free(&req);
    srv_completion_req_free(&req);

    json_t *s = srv_json_text(body, len);
    FUZZ_CHECK(s != NULL && json_is_string(s), "srv_json_text gave no string");
    FUZZ_CHECK(json_string_length(s) >= len, "srv_json_text lost bytes: %zu < %zu",
               json_string_length(s), len);
    char *dump = json_dumps(s, JSON_ENCODE_ANY);
    FUZZ_CHECK(dump != NULL, "srv_json_text's string does not serialize");
    free(dump);
    json_decref(s);
    return 0;
}
