/*
 * test_openai.c - tests for the OpenAI JSON layer (server/openai.c).
 *
 * srv_parse_request is the server's first line against hostile request bodies, so most of
 * this file is two tables of bad bodies (completions and chat), each row with the status,
 * error.param, error.code and a piece of the message it must produce. Good bodies are checked
 * field by field against the parsed struct (n, stream, logprobs, echo, penalties, logit_bias,
 * chat messages). The response builders (srv_response_json, srv_choice_json) are checked for
 * their exact JSON shape, srv_json_text for its exact bytes, and srv_logprobs_json in both
 * endpoint formats over a hand-made sched_output with the real stories260K tokenizer. Every
 * parse, failed or not, is followed by srv_completion_req_free so that a run under valgrind
 * finds no leak.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/model.h"
#include "server/openai.h"
#include "tests/common/testutil.h"

static const srv_limits LIM = {.model_name = "stories260K",
                               .n_vocab = 512,
                               .n_ctx = 2048,
                               .default_max_tokens = 16,
                               .attention = NULL};

#define A16 "aaaaaaaaaaaaaaaa"
#define A256 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16

#define FFFD "\xEF\xBF\xBD"

/* --- helpers ------------------------------------------------------------------------------ */

static int parse(const char *body, srv_completion_req *r, srv_error *e)
{
    memset(e, 0, sizeof(*e));
    return srv_parse_completion(body, strlen(body), &LIM, r, e);
}

static int parse_chat(const char *body, srv_completion_req *r, srv_error *e)
{
    memset(e, 0, sizeof(*e));
    return srv_parse_request(SRV_CHAT, body, strlen(body), &LIM, r, e);
}

/* Parses a chat body that must be accepted; prints the error when it is not. */
static void parse_chat_ok(const char *body, srv_completion_req *r)
{
    srv_error e;
    const int rc = parse_chat(body, r, &e);
    if (rc != 0) {
        print_error("rejected %s: %d %s\n", body, e.status, e.message);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(r->kind, SRV_CHAT);
}

/* Parses a body that must be accepted; prints the error when it is not. */
static void parse_ok(const char *body, srv_completion_req *r)
{
    srv_error e;
    const int rc = parse(body, r, &e);
    if (rc != 0) {
        print_error("rejected %s: %d %s\n", body, e.status, e.message);
    }
    assert_int_equal(rc, 0);
}

/* Parses a body that must be rejected with one error; frees the request. */
static void expect_rejected(const char *body, int status, const char *param, const char *code,
                            const char *in_message)
{
    srv_completion_req r;
    srv_error e;
    const int rc = parse(body, &r, &e);
    srv_completion_req_free(&r);
    if (rc == 0) {
        print_error("accepted %s\n", body);
    }
    assert_int_equal(rc, -1);
    assert_int_equal(e.status, status);
    assert_string_equal(e.param, param ? param : "");
    if (code) {
        assert_non_null(e.code);
        assert_string_equal(e.code, code);
    } else {
        assert_null(e.code);
    }
    if (!strstr(e.message, in_message)) {
        print_error("message \"%s\" lacks \"%s\"\n", e.message, in_message);
        fail();
    }
}

static void expect_text(const char *in, size_t len, const char *want, size_t want_len)
{
    json_t *j = srv_json_text(in, len);
    assert_non_null(j);
    assert_true(json_is_string(j));
    assert_int_equal(json_string_length(j), want_len);
    assert_memory_equal(json_string_value(j), want, want_len);
    json_decref(j);
}

static json_t *get(const json_t *obj, const char *key)
{
    assert_true(json_is_object(obj));
    json_t *v = json_object_get(obj, key);
    if (!v) {
        print_error("missing key \"%s\"\n", key);
    }
    assert_non_null(v);
    return v;
}

static void expect_json_string(const json_t *obj, const char *key, const char *want)
{
    const json_t *v = get(obj, key);
    assert_true(json_is_string(v));
    assert_string_equal(json_string_value(v), want);
}

static void expect_json_integer(const json_t *obj, const char *key, long long want)
{
    const json_t *v = get(obj, key);
    assert_true(json_is_integer(v));
    assert_int_equal(json_integer_value(v), want);
}

/* --- bad bodies --------------------------------------------------------------------------- */

typedef struct {
    const char *body;
    int status;
    const char *param;   /* NULL -> no param */
    const char *code;    /* NULL -> no code */
    const char *message; /* a substring the message must contain */
} bad_body;

#define P "{\"prompt\":\"hi\","
#define M0 "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
#define UNSUP "unsupported_parameter"

static const bad_body BAD[] = {
    /* not a JSON object */
    {"", 400, NULL, NULL, "not valid JSON"},
    {"hello", 400, NULL, NULL, "not valid JSON"},
    {"{\"prompt\":\"hi\"", 400, NULL, NULL, "not valid JSON"},
    {"{\"prompt\":\"hi\",}", 400, NULL, NULL, "not valid JSON"},
    {"{\"prompt\":\"hi\"} x", 400, NULL, NULL, "not valid JSON"},
    {"[{\"prompt\":\"hi\"}]", 400, NULL, NULL, "must be a JSON object"},
    {"\"hi\"", 400, NULL, NULL, "JSON"},
    {"42", 400, NULL, NULL, "JSON"},
    {"null", 400, NULL, NULL, "JSON"},
    /* prompt */
    {"{}", 400, "prompt", NULL, "'prompt' is required"},
    {"{\"model\":\"stories260K\"}", 400, "prompt", NULL, "'prompt' is required"},
    {"{\"prompt\":null}", 400, "prompt", NULL, "'prompt' is required"},
    {"{\"prompt\":5}", 400, "prompt", NULL, "'prompt' must be a string or an array"},
    {"{\"prompt\":true}", 400, "prompt", NULL, "'prompt' must be a string or an array"},
    {"{\"prompt\":{\"text\":\"hi\"}}", 400, "prompt", NULL, "'prompt' must be a string or an"},
    {"{\"prompt\":[]}", 400, "prompt", NULL, "'prompt' must not be an empty array"},
    {"{\"prompt\":[1.5]}", 400, "prompt", NULL, "'prompt'[0] must be a token id in [0, 512)"},
    {"{\"prompt\":[1,true]}", 400, "prompt", NULL, "'prompt'[1] must be a token id"},
    {"{\"prompt\":[1,null]}", 400, "prompt", NULL, "'prompt'[1] must be a token id"},
    {"{\"prompt\":[1,\"a\"]}", 400, "prompt", NULL, "'prompt'[1] must be a token id"},
    {"{\"prompt\":[-1]}", 400, "prompt", NULL, "'prompt'[0] must be a token id in [0, 512)"},
    {"{\"prompt\":[3,512]}", 400, "prompt", NULL, "'prompt'[1] must be a token id in [0, 512)"},
    {"{\"prompt\":[1099511627776]}", 400, "prompt", NULL, "'prompt'[0] must be a token id"},
    {"{\"prompt\":[\"a\",\"b\"]}", 400, "prompt", NULL, "several prompts"},
    {"{\"prompt\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", 400, "prompt", NULL, "several prompts"},
    {"{\"prompt\":[[1,2]]}", 400, "prompt", NULL, "several prompts"},
    {"{\"prompt\":[[1],[2]]}", 400, "prompt", NULL, "several prompts"},
    {"{\"prompt\":[[\"a\"]]}", 400, "prompt", NULL, "several prompts"},
    /* model */
    {P "\"model\":5}", 400, "model", NULL, "'model' must be a string"},
    {P "\"model\":[\"stories260K\"]}", 400, "model", NULL, "'model' must be a string"},
    {P "\"model\":\"gpt-4\"}", 404, "model", "model_not_found", "'gpt-4' does not exist"},
    {P "\"model\":\"\"}", 404, "model", "model_not_found", "serves 'stories260K'"},
    {P "\"model\":\"stories260k\"}", 404, "model", "model_not_found", "does not exist"},
    /* sampling */
    {P "\"temperature\":-0.1}", 400, "temperature", NULL, "'temperature' must be between 0 and 2"},
    {P "\"temperature\":2.1}", 400, "temperature", NULL, "between 0 and 2, got 2.1"},
    {P "\"temperature\":\"1\"}", 400, "temperature", NULL, "'temperature' must be a number"},
    {P "\"temperature\":true}", 400, "temperature", NULL, "'temperature' must be a number"},
    {P "\"top_p\":0}", 400, "top_p", NULL, "'top_p' must be greater than 0"},
    {P "\"top_p\":1.5}", 400, "top_p", NULL, "'top_p' must be between 0 and 1"},
    {P "\"top_p\":\"x\"}", 400, "top_p", NULL, "'top_p' must be a number"},
    {P "\"min_p\":-1}", 400, "min_p", NULL, "'min_p' must be between 0 and 1"},
    {P "\"min_p\":2}", 400, "min_p", NULL, "'min_p' must be between 0 and 1"},
    {P "\"top_k\":-2}", 400, "top_k", NULL, "'top_k' must be between -1 and"},
    {P "\"top_k\":1.5}", 400, "top_k", NULL, "'top_k' must be an integer"},
    {P "\"top_k\":\"3\"}", 400, "top_k", NULL, "'top_k' must be an integer"},
    {P "\"seed\":\"x\"}", 400, "seed", NULL, "'seed' must be an integer"},
    {P "\"seed\":1.5}", 400, "seed", NULL, "'seed' must be an integer"},
    /* lengths */
    {P "\"max_tokens\":0}", 400, "max_tokens", NULL, "'max_tokens' must be between 1 and 2048"},
    {P "\"max_tokens\":-1}", 400, "max_tokens", NULL, "'max_tokens' must be between 1 and 2048"},
    {P "\"max_tokens\":1.5}", 400, "max_tokens", NULL, "'max_tokens' must be an integer"},
    {P "\"max_tokens\":\"16\"}", 400, "max_tokens", NULL, "'max_tokens' must be an integer"},
    {P "\"max_tokens\":2049}", 400, "max_tokens", NULL, "between 1 and 2048, got 2049"},
    {P "\"max_completion_tokens\":0}", 400, "max_completion_tokens", NULL,
     "'max_completion_tokens' must be between 1 and 2048"},
    {P "\"max_tokens\":16,\"max_completion_tokens\":0}", 400, "max_completion_tokens", NULL,
     "'max_completion_tokens' must be between 1"},
    /* stop */
    {P "\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", 400, "stop", NULL, "at most 4 strings, got 5"},
    {P "\"stop\":5}", 400, "stop", NULL, "'stop' must be a string or an array of strings"},
    {P "\"stop\":{}}", 400, "stop", NULL, "'stop' must be a string or an array of strings"},
    {P "\"stop\":[\"a\",5]}", 400, "stop", NULL, "'stop' must be a string or an array of strings"},
    {P "\"stop\":[null]}", 400, "stop", NULL, "'stop' must be a string or an array of strings"},
    {P "\"stop\":\"" A256 "a\"}", 400, "stop", NULL, "1 to 256 bytes"},
    {P "\"stop\":[\"x\",\"" A256 "a\"]}", 400, "stop", NULL, "1 to 256 bytes"},
    /* flags and strings */
    {P "\"ignore_eos\":\"yes\"}", 400, "ignore_eos", NULL, "'ignore_eos' must be a boolean"},
    {P "\"ignore_eos\":1}", 400, "ignore_eos", NULL, "'ignore_eos' must be a boolean"},
    {P "\"user\":5}", 400, "user", NULL, "'user' must be a string"},
    {P "\"user\":{}}", 400, "user", NULL, "'user' must be a string"},
    /* choices and streaming */
    {P "\"n\":0}", 400, "n", NULL, "'n' must be between 1 and 16, got 0"},
    {P "\"n\":17}", 400, "n", NULL, "'n' must be between 1 and 16, got 17"},
    {P "\"n\":2.5}", 400, "n", NULL, "'n' must be an integer"},
    {P "\"n\":\"2\"}", 400, "n", NULL, "'n' must be an integer"},
    {P "\"n\":{}}", 400, "n", NULL, "'n' must be an integer"},
    {P "\"best_of\":3}", 400, "best_of", UNSUP, "'best_of' other than 'n' is not supported"},
    {P "\"n\":2,\"best_of\":3}", 400, "best_of", UNSUP, "'best_of' other than 'n'"},
    {P "\"best_of\":17}", 400, "best_of", NULL, "'best_of' must be between 1 and 16"},
    {P "\"stream\":\"yes\"}", 400, "stream", NULL, "'stream' must be a boolean"},
    {P "\"stream\":{}}", 400, "stream", NULL, "'stream' must be a boolean"},
    {P "\"stream\":1}", 400, "stream", NULL, "'stream' must be a boolean"},
    {P "\"stream_options\":{\"include_usage\":true}}", 400, "stream_options", NULL,
     "'stream_options' is only allowed when 'stream' is true"},
    {P "\"stream\":false,\"stream_options\":{}}", 400, "stream_options", NULL,
     "only allowed when 'stream' is true"},
    {P "\"stream\":true,\"stream_options\":{\"include_usage\":\"x\"}}", 400, "stream_options", NULL,
     "'stream_options.include_usage' must be a boolean"},
    {P "\"stream\":true,\"stream_options\":5}", 400, "stream_options", NULL,
     "'stream_options' must be an object"},
    /* logprobs and echo (completions: logprobs is the number of alternatives) */
    {P "\"logprobs\":-1}", 400, "logprobs", NULL, "'logprobs' must be between 0 and 20, got -1"},
    {P "\"logprobs\":21}", 400, "logprobs", NULL, "'logprobs' must be between 0 and 20, got 21"},
    {P "\"logprobs\":true}", 400, "logprobs", NULL, "'logprobs' must be an integer"},
    {P "\"logprobs\":\"3\"}", 400, "logprobs", NULL, "'logprobs' must be an integer"},
    {P "\"echo\":\"x\"}", 400, "echo", NULL, "'echo' must be a boolean"},
    {P "\"echo\":1}", 400, "echo", NULL, "'echo' must be a boolean"},
    /* logit_bias */
    {P "\"logit_bias\":[]}", 400, "logit_bias", NULL,
     "'logit_bias' must be an object mapping token ids to numbers"},
    {P "\"logit_bias\":\"1\"}", 400, "logit_bias", NULL, "'logit_bias' must be an object"},
    {P "\"logit_bias\":{\"abc\":1}}", 400, "logit_bias", NULL,
     "'logit_bias' key 'abc' is not a token id in [0, 512)"},
    {P "\"logit_bias\":{\"600\":1}}", 400, "logit_bias", NULL, "key '600' is not a token id"},
    {P "\"logit_bias\":{\"512\":1}}", 400, "logit_bias", NULL, "key '512' is not a token id"},
    {P "\"logit_bias\":{\"-1\":1}}", 400, "logit_bias", NULL, "key '-1' is not a token id"},
    {P "\"logit_bias\":{\"1.5\":1}}", 400, "logit_bias", NULL, "key '1.5' is not a token id"},
    {P "\"logit_bias\":{\"\":1}}", 400, "logit_bias", NULL, "key '' is not a token id"},
    {P "\"logit_bias\":{\"1\":101}}", 400, "logit_bias", NULL,
     "'logit_bias' values must be numbers between -100 and 100"},
    {P "\"logit_bias\":{\"1\":-100.5}}", 400, "logit_bias", NULL, "between -100 and 100"},
    {P "\"logit_bias\":{\"1\":\"x\"}}", 400, "logit_bias", NULL, "values must be numbers"},
    {P "\"logit_bias\":{\"1\":null}}", 400, "logit_bias", NULL, "values must be numbers"},
    {P "\"logit_bias\":{\"2\":1,\"1\":true}}", 400, "logit_bias", NULL, "values must be numbers"},
    /* penalties */
    {P "\"presence_penalty\":2.5}", 400, "presence_penalty", NULL,
     "'presence_penalty' must be between -2 and 2, got 2.5"},
    {P "\"presence_penalty\":\"0\"}", 400, "presence_penalty", NULL,
     "'presence_penalty' must be a number"},
    {P "\"frequency_penalty\":-3}", 400, "frequency_penalty", NULL,
     "'frequency_penalty' must be between -2 and 2, got -3"},
    {P "\"repetition_penalty\":0}", 400, "repetition_penalty", NULL,
     "'repetition_penalty' must be between 0.01 and 10, got 0"},
    {P "\"repetition_penalty\":11}", 400, "repetition_penalty", NULL,
     "'repetition_penalty' must be between 0.01 and 10, got 11"},
    {P "\"repetition_penalty\":false}", 400, "repetition_penalty", NULL,
     "'repetition_penalty' must be a number"},
    /* min_tokens */
    {P "\"min_tokens\":-1}", 400, "min_tokens", NULL, "'min_tokens' must be between 0 and 2048"},
    {P "\"min_tokens\":2049}", 400, "min_tokens", NULL, "between 0 and 2048, got 2049"},
    {P "\"min_tokens\":1.5}", 400, "min_tokens", NULL, "'min_tokens' must be an integer"},
    {P "\"max_tokens\":4,\"min_tokens\":5}", 400, "min_tokens", NULL,
     "'min_tokens' (5) must not exceed 'max_tokens' (4)"},
    {P "\"max_completion_tokens\":4,\"min_tokens\":5}", 400, "min_tokens", NULL,
     "must not exceed 'max_tokens' (4)"},
    /* priority (vLLM's extension) */
    {P "\"priority\":\"high\"}", 400, "priority", NULL, "'priority' must be an integer"},
    {P "\"priority\":0.5}", 400, "priority", NULL, "'priority' must be an integer"},
    {P "\"priority\":1000001}", 400, "priority", NULL,
     "'priority' must be between -1000000 and 1000000, got 1000001"},
    /* known fields this server cannot honour */
    {P "\"suffix\":\"x\"}", 400, "suffix", UNSUP, "'suffix' is not supported"},
    {P "\"tools\":[{}]}", 400, "tools", UNSUP, "'tools' is not supported"},
    {P "\"functions\":[{\"name\":\"f\"}]}", 400, "functions", UNSUP,
     "'functions' is not supported"},
    {P "\"response_format\":{\"type\":\"json_object\"}}", 400, "response_format", UNSUP,
     "'response_format' type 'json_object' is not supported"},
    {P "\"response_format\":{\"type\":5}}", 400, "response_format", NULL,
     "'response_format' must be an object with a string 'type'"},
    {P "\"response_format\":\"text\"}", 400, "response_format", NULL,
     "must be an object with a string 'type'"},
};

/* Every row is checked even after one fails, so that one run names all the failing rows. */
static void test_completion_rejects_each_bad_body_with_its_error(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < sizeof(BAD) / sizeof(BAD[0]); i++) {
        const bad_body *b = &BAD[i];
        srv_completion_req r;
        srv_error e;
        const int rc = parse(b->body, &r, &e);
        srv_completion_req_free(&r);
        const char *want_param = b->param ? b->param : "";
        const bool ok = rc == -1 && e.status == b->status && e.type &&
                        strcmp(e.type, "invalid_request_error") == 0 &&
                        strcmp(e.param, want_param) == 0 &&
                        (b->code ? e.code && strcmp(e.code, b->code) == 0 : e.code == NULL) &&
                        strstr(e.message, b->message) != NULL;
        if (!ok) {
            failures++;
            print_error("row %zu %.80s\n  want %d param=%s code=%s msg~\"%s\"\n"
                        "  got rc=%d %d type=%s param=%s code=%s msg=\"%s\"\n",
                        i, b->body, b->status, want_param, b->code ? b->code : "(null)", b->message,
                        rc, rc ? e.status : 0, rc && e.type ? e.type : "(null)", rc ? e.param : "",
                        rc && e.code ? e.code : "(null)", rc ? e.message : "");
        }
    }
    assert_int_equal(failures, 0);
}

static void test_completion_error_json_mirrors_each_table_row(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(BAD) / sizeof(BAD[0]); i++) {
        srv_completion_req r;
        srv_error e;
        assert_int_equal(parse(BAD[i].body, &r, &e), -1);
        srv_completion_req_free(&r);
        json_t *j = srv_error_json(&e);
        json_t *inner = get(j, "error");
        expect_json_string(inner, "message", e.message);
        expect_json_string(inner, "type", "invalid_request_error");
        if (BAD[i].param) {
            expect_json_string(inner, "param", BAD[i].param);
        } else {
            assert_true(json_is_null(get(inner, "param")));
        }
        if (BAD[i].code) {
            expect_json_string(inner, "code", BAD[i].code);
        } else {
            assert_true(json_is_null(get(inner, "code")));
        }
        json_decref(j);
    }
}

/* A body of n token ids 1, 2, ..., n (mod 500); malloc-ed. */
static char *token_body(int n)
{
    const size_t cap = 32 + (size_t)n * 5;
    char *body = malloc(cap);
    assert_non_null(body);
    size_t o = (size_t)snprintf(body, cap, "{\"prompt\":[");
    for (int i = 0; i < n; i++) {
        o += (size_t)snprintf(body + o, cap - o, "%s%d", i ? "," : "", 1 + i % 500);
    }
    snprintf(body + o, cap - o, "]}");
    return body;
}

static void test_completion_rejects_token_prompt_longer_than_context(void **state)
{
    (void)state;
    char *body = token_body(LIM.n_ctx + 1);
    expect_rejected(body, 400, "prompt", "context_length_exceeded",
                    "maximum context length is 2048 tokens");
    expect_rejected(body, 400, "prompt", "context_length_exceeded", "2049 tokens in the prompt");
    free(body);
}

static void test_completion_failed_parse_frees_partial_allocations(void **state)
{
    (void)state;
    /* Stop strings and user are copied before the prompt is checked; the free must find them. */
    srv_completion_req r;
    srv_error e;
    assert_int_equal(parse("{\"user\":\"u\",\"stop\":[\"a\",\"b\"],\"prompt\":[1,999]}", &r, &e),
                     -1);
    assert_string_equal(e.param, "prompt");
    srv_completion_req_free(&r);
    assert_null(r.user);
    assert_int_equal(r.n_stop, 0);
    assert_null(r.prompt_tokens);
    srv_completion_req_free(&r); /* twice is harmless: free zeroes the struct */
}

/* --- good bodies -------------------------------------------------------------------------- */

static void test_completion_accepts_minimal_text_prompt_with_defaults(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"prompt\":\"hi\"}", &r);
    assert_non_null(r.prompt_text);
    assert_string_equal(r.prompt_text, "hi");
    assert_int_equal(r.prompt_len, 2);
    assert_null(r.prompt_tokens);
    assert_int_equal(r.n_prompt_tokens, 0);
    assert_int_equal(r.max_tokens, 0); /* the server applies default_max_tokens later */
    assert_true(r.sampling.temperature == 1.0f);
    assert_true(r.sampling.top_p == 1.0f);
    assert_true(r.sampling.min_p == 0.0f);
    assert_int_equal(r.sampling.top_k, 0);
    assert_int_equal(r.sampling.seed, 0);
    assert_false(r.seed_set);
    assert_int_equal(r.n_stop, 0);
    assert_false(r.ignore_eos);
    assert_null(r.user);
    assert_int_equal(r.kind, SRV_COMPLETION);
    assert_int_equal(r.n, 1);
    assert_false(r.stream);
    assert_false(r.include_usage);
    assert_int_equal(r.logprobs, -1);
    assert_false(r.echo);
    assert_int_equal(r.min_tokens, 0);
    assert_true(r.sampling.presence_penalty == 0.0f);
    assert_true(r.sampling.frequency_penalty == 0.0f);
    assert_true(r.sampling.repetition_penalty == 1.0f);
    assert_null(r.sampling.logit_bias);
    assert_int_equal(r.sampling.n_logit_bias, 0);
    assert_null(r.bias);
    assert_null(r.msgs);
    assert_int_equal(r.n_msgs, 0);
    assert_int_equal(r.priority, 0);
    srv_completion_req_free(&r);
}

static void test_completion_accepts_text_prompt_with_escapes_and_utf8(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"prompt\":\"a\\nb \\u00e9\\ud83d\\ude00\"}", &r);
    const char want[] = "a\nb \xC3\xA9\xF0\x9F\x98\x80";
    assert_int_equal(r.prompt_len, sizeof(want) - 1);
    assert_memory_equal(r.prompt_text, want, sizeof(want));
    srv_completion_req_free(&r);

    parse_ok("{\"prompt\":\"\"}", &r); /* the server, not the parser, refuses zero tokens */
    assert_string_equal(r.prompt_text, "");
    assert_int_equal(r.prompt_len, 0);
    srv_completion_req_free(&r);
}

static void test_completion_accepts_omitted_null_or_matching_model(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"prompt\":\"hi\"}", &r);
    srv_completion_req_free(&r);
    parse_ok("{\"prompt\":\"hi\",\"model\":null}", &r);
    srv_completion_req_free(&r);
    parse_ok("{\"model\":\"stories260K\",\"prompt\":\"hi\"}", &r);
    assert_string_equal(r.prompt_text, "hi");
    srv_completion_req_free(&r);
}

static void test_completion_accepts_single_element_list_as_text(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"prompt\":[\"Once upon a time\"]}", &r);
    assert_non_null(r.prompt_text);
    assert_string_equal(r.prompt_text, "Once upon a time");
    assert_int_equal(r.prompt_len, 16);
    assert_null(r.prompt_tokens);
    assert_int_equal(r.n_prompt_tokens, 0);
    srv_completion_req_free(&r);
}

static void test_completion_copies_token_id_prompt(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"prompt\":[1,0,511,42,42]}", &r);
    assert_null(r.prompt_text);
    assert_int_equal(r.n_prompt_tokens, 5);
    assert_non_null(r.prompt_tokens);
    const int32_t want[] = {1, 0, 511, 42, 42};
    for (int i = 0; i < 5; i++) {
        assert_int_equal(r.prompt_tokens[i], want[i]);
    }
    srv_completion_req_free(&r);

    char *body = token_body(LIM.n_ctx); /* the parser's cap; the server also counts max_tokens */
    parse_ok(body, &r);
    assert_int_equal(r.n_prompt_tokens, LIM.n_ctx);
    assert_int_equal(r.prompt_tokens[LIM.n_ctx - 1], 1 + (LIM.n_ctx - 1) % 500);
    srv_completion_req_free(&r);
    free(body);
}

static void test_completion_accepts_stop_string_and_array_skipping_empty(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"stop\":\"\\n\"}", &r);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "\n");
    srv_completion_req_free(&r);

    parse_ok(P "\"stop\":[\"\",\"END\",\"\",\"\\n\\n\"]}", &r);
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[0], "END");
    assert_string_equal(r.stop[1], "\n\n");
    srv_completion_req_free(&r);

    parse_ok(P "\"stop\":\"\"}", &r);
    assert_int_equal(r.n_stop, 0);
    srv_completion_req_free(&r);

    parse_ok(P "\"stop\":[]}", &r);
    assert_int_equal(r.n_stop, 0);
    srv_completion_req_free(&r);

    parse_ok(P "\"stop\":null}", &r);
    assert_int_equal(r.n_stop, 0);
    srv_completion_req_free(&r);

    parse_ok(P "\"stop\":[\"a\",\"b\",\"c\",\"" A256 "\"]}", &r); /* 4 strings, 256 bytes */
    assert_int_equal(r.n_stop, 4);
    assert_string_equal(r.stop[2], "c");
    assert_int_equal(strlen(r.stop[3]), 256);
    srv_completion_req_free(&r);
}

static void test_completion_accepts_integral_real_max_tokens(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"max_tokens\":16.0}", &r);
    assert_int_equal(r.max_tokens, 16);
    srv_completion_req_free(&r);
    parse_ok(P "\"max_tokens\":1}", &r);
    assert_int_equal(r.max_tokens, 1);
    srv_completion_req_free(&r);
    parse_ok(P "\"max_tokens\":2048}", &r);
    assert_int_equal(r.max_tokens, 2048);
    srv_completion_req_free(&r);
    parse_ok(P "\"max_tokens\":null}", &r);
    assert_int_equal(r.max_tokens, 0);
    srv_completion_req_free(&r);
}

static void test_completion_max_tokens_wins_over_max_completion_tokens(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"max_completion_tokens\":32}", &r);
    assert_int_equal(r.max_tokens, 32);
    srv_completion_req_free(&r);
    parse_ok(P "\"max_tokens\":null,\"max_completion_tokens\":32}", &r);
    assert_int_equal(r.max_tokens, 32);
    srv_completion_req_free(&r);
    parse_ok(P "\"max_tokens\":8,\"max_completion_tokens\":32}", &r);
    assert_int_equal(r.max_tokens, 8);
    srv_completion_req_free(&r);
    parse_ok(P "\"max_completion_tokens\":32,\"max_tokens\":64}", &r);
    assert_int_equal(r.max_tokens, 64);
    srv_completion_req_free(&r);
}

static void test_completion_accepts_neutral_values_of_optional_fields(void **state)
{
    (void)state;
    static const char *const bodies[] = {
        P "\"stream\":false}",
        P "\"stream\":null}",
        P "\"n\":1}",
        P "\"n\":1.0}",
        P "\"best_of\":1}",
        P "\"echo\":false}",
        P "\"logit_bias\":{}}",
        P "\"logit_bias\":null}",
        P "\"logprobs\":null}",
        P "\"suffix\":null}",
        P "\"suffix\":\"\"}",
        P "\"tools\":[]}",
        P "\"tools\":null}",
        P "\"functions\":[]}",
        P "\"response_format\":{\"type\":\"text\"}}",
        P "\"response_format\":null}",
        P "\"stream_options\":null}",
        P "\"min_tokens\":0}",
        P "\"presence_penalty\":0}",
        P "\"presence_penalty\":0.0}",
        P "\"frequency_penalty\":0}",
        P "\"repetition_penalty\":1}",
        P "\"stream\":false,\"n\":1,\"best_of\":1,\"echo\":false,\"logit_bias\":{},"
          "\"presence_penalty\":0,\"frequency_penalty\":0,\"repetition_penalty\":1.0}",
    };
    for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        srv_completion_req r;
        parse_ok(bodies[i], &r);
        assert_string_equal(r.prompt_text, "hi");
        /* each leaves the request as if the field were absent */
        assert_int_equal(r.n, 1);
        assert_false(r.stream);
        assert_false(r.include_usage);
        assert_int_equal(r.logprobs, -1);
        assert_false(r.echo);
        assert_int_equal(r.min_tokens, 0);
        assert_int_equal(r.sampling.n_logit_bias, 0);
        assert_null(r.sampling.logit_bias);
        assert_true(r.sampling.presence_penalty == 0.0f);
        assert_true(r.sampling.frequency_penalty == 0.0f);
        assert_true(r.sampling.repetition_penalty == 1.0f);
        srv_completion_req_free(&r);
    }
}

static void test_completion_ignores_unknown_fields(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"prompt\":\"hi\",\"metadata\":{\"a\":[1,2]},\"store\":true,\"x-custom\":\"v\","
             "\"top_a\":\"not checked\"}",
             &r);
    assert_string_equal(r.prompt_text, "hi");
    srv_completion_req_free(&r);
}

static void test_completion_sets_seed_flag_only_when_seed_given(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"seed\":0}", &r);
    assert_true(r.seed_set);
    assert_int_equal(r.sampling.seed, 0);
    srv_completion_req_free(&r);
    parse_ok(P "\"seed\":1234567}", &r);
    assert_true(r.seed_set);
    assert_int_equal(r.sampling.seed, 1234567);
    srv_completion_req_free(&r);
    parse_ok(P "\"seed\":42.0}", &r);
    assert_true(r.seed_set);
    assert_int_equal(r.sampling.seed, 42);
    srv_completion_req_free(&r);
    parse_ok(P "\"seed\":-1}", &r);
    assert_true(r.seed_set);
    assert_true(r.sampling.seed == UINT64_MAX);
    srv_completion_req_free(&r);
    parse_ok(P "\"seed\":null}", &r);
    assert_false(r.seed_set);
    srv_completion_req_free(&r);
}

static void test_completion_top_k_minus_one_and_zero_mean_off(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"top_k\":-1}", &r);
    assert_int_equal(r.sampling.top_k, 0);
    srv_completion_req_free(&r);
    parse_ok(P "\"top_k\":0}", &r);
    assert_int_equal(r.sampling.top_k, 0);
    srv_completion_req_free(&r);
    parse_ok(P "\"top_k\":1}", &r);
    assert_int_equal(r.sampling.top_k, 1);
    srv_completion_req_free(&r);
    parse_ok(P "\"top_k\":40.0}", &r);
    assert_int_equal(r.sampling.top_k, 40);
    srv_completion_req_free(&r);
}

static void test_completion_accepts_sampling_range_bounds(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"temperature\":0,\"top_p\":1,\"min_p\":0}", &r);
    assert_true(r.sampling.temperature == 0.0f);
    assert_true(r.sampling.top_p == 1.0f);
    assert_true(r.sampling.min_p == 0.0f);
    srv_completion_req_free(&r);
    parse_ok(P "\"temperature\":2,\"top_p\":1e-9,\"min_p\":1}", &r);
    assert_true(r.sampling.temperature == 2.0f);
    assert_true(r.sampling.top_p > 0.0f);
    assert_true(r.sampling.min_p == 1.0f);
    srv_completion_req_free(&r);
}

static void test_completion_fills_every_field(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"model\":\"stories260K\",\"prompt\":\"Once\",\"max_tokens\":100,"
             "\"temperature\":0.7,\"top_p\":0.9,\"top_k\":40,\"min_p\":0.05,\"seed\":1234,"
             "\"ignore_eos\":true,\"user\":\"alice\",\"stop\":[\"\\n\\n\",\"The end\"],"
             "\"stream\":false}",
             &r);
    assert_string_equal(r.prompt_text, "Once");
    assert_int_equal(r.prompt_len, 4);
    assert_int_equal(r.max_tokens, 100);
    assert_true(r.sampling.temperature == 0.7f);
    assert_true(r.sampling.top_p == 0.9f);
    assert_int_equal(r.sampling.top_k, 40);
    assert_true(r.sampling.min_p == 0.05f);
    assert_int_equal(r.sampling.seed, 1234);
    assert_true(r.seed_set);
    assert_true(r.ignore_eos);
    assert_non_null(r.user);
    assert_string_equal(r.user, "alice");
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[0], "\n\n");
    assert_string_equal(r.stop[1], "The end");
    srv_completion_req_free(&r);

    parse_ok(P "\"ignore_eos\":false}", &r);
    assert_false(r.ignore_eos);
    srv_completion_req_free(&r);
}

static void test_completion_reads_only_len_bytes_of_body(void **state)
{
    (void)state;
    const char body[] = "{\"prompt\":\"hi\"}garbage";
    srv_completion_req r;
    srv_error e;
    assert_int_equal(srv_parse_completion(body, 15, &LIM, &r, &e), 0);
    assert_string_equal(r.prompt_text, "hi");
    srv_completion_req_free(&r);
}

static void test_completion_parses_n_and_matching_best_of(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"n\":2}", &r);
    assert_int_equal(r.n, 2);
    srv_completion_req_free(&r);
    parse_ok(P "\"n\":16}", &r);
    assert_int_equal(r.n, SRV_MAX_CHOICES);
    srv_completion_req_free(&r);
    parse_ok(P "\"n\":3.0,\"best_of\":3}", &r);
    assert_int_equal(r.n, 3);
    srv_completion_req_free(&r);
    parse_ok(P "\"n\":null}", &r);
    assert_int_equal(r.n, 1);
    srv_completion_req_free(&r);
}

static void test_completion_parses_stream_and_include_usage(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"stream\":true}", &r);
    assert_true(r.stream);
    assert_false(r.include_usage);
    srv_completion_req_free(&r);
    parse_ok(P "\"stream\":true,\"stream_options\":{\"include_usage\":true}}", &r);
    assert_true(r.stream);
    assert_true(r.include_usage);
    srv_completion_req_free(&r);
    parse_ok(P "\"stream\":true,\"stream_options\":{\"include_usage\":false}}", &r);
    assert_true(r.stream);
    assert_false(r.include_usage);
    srv_completion_req_free(&r);
    parse_ok(P "\"stream\":true,\"stream_options\":{}}", &r);
    assert_false(r.include_usage);
    srv_completion_req_free(&r);
    parse_ok(P "\"stream\":true,\"stream_options\":{\"include_usage\":null,\"x\":1}}", &r);
    assert_true(r.stream);
    assert_false(r.include_usage);
    srv_completion_req_free(&r);
}

static void test_completion_parses_logprobs_count_and_echo(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"logprobs\":0}", &r);
    assert_int_equal(r.logprobs, 0); /* the chosen token's logprob, no alternatives */
    srv_completion_req_free(&r);
    parse_ok(P "\"logprobs\":5}", &r);
    assert_int_equal(r.logprobs, 5);
    srv_completion_req_free(&r);
    parse_ok(P "\"logprobs\":20}", &r);
    assert_int_equal(r.logprobs, SCHED_MAX_LOGPROBS);
    srv_completion_req_free(&r);
    parse_ok(P "\"logprobs\":3.0}", &r);
    assert_int_equal(r.logprobs, 3);
    srv_completion_req_free(&r);
    parse_ok(P "\"echo\":true}", &r);
    assert_true(r.echo);
    assert_int_equal(r.logprobs, -1);
    srv_completion_req_free(&r);
    /* top_logprobs is a chat field; completions ignore it */
    parse_ok(P "\"top_logprobs\":3}", &r);
    assert_int_equal(r.logprobs, -1);
    srv_completion_req_free(&r);
}

static void test_completion_parses_min_tokens(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"min_tokens\":5}", &r); /* no max_tokens: the server checks it later */
    assert_int_equal(r.min_tokens, 5);
    srv_completion_req_free(&r);
    parse_ok(P "\"min_tokens\":8,\"max_tokens\":8}", &r);
    assert_int_equal(r.min_tokens, 8);
    assert_int_equal(r.max_tokens, 8);
    srv_completion_req_free(&r);
    parse_ok(P "\"min_tokens\":2048}", &r);
    assert_int_equal(r.min_tokens, 2048);
    srv_completion_req_free(&r);
}

static void test_completion_parses_priority(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"priority\":-5}", &r);
    assert_int_equal(r.priority, -5);
    srv_completion_req_free(&r);
    parse_ok(P "\"priority\":1000000}", &r);
    assert_int_equal(r.priority, 1000000);
    srv_completion_req_free(&r);
    parse_ok(P "\"priority\":null}", &r);
    assert_int_equal(r.priority, 0);
    srv_completion_req_free(&r);
    parse_chat_ok(M0 "\"priority\":3}", &r);
    assert_int_equal(r.priority, 3);
    srv_completion_req_free(&r);
}

static void test_completion_parses_sampling_penalties(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"presence_penalty\":0.5,\"frequency_penalty\":-1.5,\"repetition_penalty\":1.1}",
             &r);
    assert_true(r.sampling.presence_penalty == 0.5f);
    assert_true(r.sampling.frequency_penalty == -1.5f);
    assert_true(r.sampling.repetition_penalty == 1.1f);
    srv_completion_req_free(&r);
    parse_ok(P "\"presence_penalty\":-2,\"frequency_penalty\":2,\"repetition_penalty\":0.01}", &r);
    assert_true(r.sampling.presence_penalty == -2.0f);
    assert_true(r.sampling.frequency_penalty == 2.0f);
    assert_true(r.sampling.repetition_penalty == 0.01f);
    srv_completion_req_free(&r);
    parse_ok(P "\"presence_penalty\":2,\"frequency_penalty\":-2,\"repetition_penalty\":10}", &r);
    assert_true(r.sampling.presence_penalty == 2.0f);
    assert_true(r.sampling.frequency_penalty == -2.0f);
    assert_true(r.sampling.repetition_penalty == 10.0f);
    srv_completion_req_free(&r);
}

/* The bias of token id in the parsed request, or NAN when it has none. */
static float bias_of(const srv_completion_req *r, int32_t id)
{
    float b = NAN;
    for (int i = 0; i < r->sampling.n_logit_bias; i++) {
        if (r->sampling.logit_bias[i].id == id) {
            assert_true(isnan(b)); /* one entry per id */
            b = r->sampling.logit_bias[i].bias;
        }
    }
    return b;
}

static void test_completion_parses_logit_bias_entries(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok(P "\"logit_bias\":{\"1\":5,\"511\":-100,\"0\":100,\"42\":0.5}}", &r);
    assert_int_equal(r.sampling.n_logit_bias, 4);
    assert_non_null(r.bias);
    assert_ptr_equal(r.sampling.logit_bias, r.bias);
    assert_true(bias_of(&r, 1) == 5.0f);
    assert_true(bias_of(&r, 511) == -100.0f);
    assert_true(bias_of(&r, 0) == 100.0f);
    assert_true(bias_of(&r, 42) == 0.5f);
    assert_true(isnan(bias_of(&r, 2)));
    srv_completion_req_free(&r);
    assert_null(r.bias);

    parse_ok(P "\"logit_bias\":{\"7\":-1e-3}}", &r);
    assert_int_equal(r.sampling.n_logit_bias, 1);
    assert_int_equal(r.sampling.logit_bias[0].id, 7);
    assert_true(r.sampling.logit_bias[0].bias == -1e-3f);
    srv_completion_req_free(&r);
}

static void test_completion_fills_every_new_field(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_ok("{\"model\":\"stories260K\",\"prompt\":\"Once\",\"max_tokens\":10,\"n\":4,"
             "\"best_of\":4,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
             "\"logprobs\":3,\"echo\":true,\"min_tokens\":2,\"presence_penalty\":0.25,"
             "\"frequency_penalty\":0.75,\"repetition_penalty\":1.5,\"logit_bias\":{\"9\":-7},"
             "\"seed\":7,\"suffix\":\"\",\"response_format\":{\"type\":\"text\"}}",
             &r);
    assert_string_equal(r.prompt_text, "Once");
    assert_int_equal(r.max_tokens, 10);
    assert_int_equal(r.n, 4);
    assert_true(r.stream);
    assert_true(r.include_usage);
    assert_int_equal(r.logprobs, 3);
    assert_true(r.echo);
    assert_int_equal(r.min_tokens, 2);
    assert_true(r.sampling.presence_penalty == 0.25f);
    assert_true(r.sampling.frequency_penalty == 0.75f);
    assert_true(r.sampling.repetition_penalty == 1.5f);
    assert_int_equal(r.sampling.n_logit_bias, 1);
    assert_true(bias_of(&r, 9) == -7.0f);
    assert_int_equal(r.sampling.seed, 7);
    assert_true(r.seed_set);
    srv_completion_req_free(&r);
}

/* --- chat requests ------------------------------------------------------------------------ */

#define M M0

static const bad_body BAD_CHAT[] = {
    /* messages */
    {"{}", 400, "messages", NULL, "'messages' must be a non-empty array of messages"},
    {"{\"prompt\":\"hi\"}", 400, "messages", NULL, "'messages' must be a non-empty array"},
    {"{\"messages\":null}", 400, "messages", NULL, "'messages' must be a non-empty array"},
    {"{\"messages\":[]}", 400, "messages", NULL, "'messages' must be a non-empty array"},
    {"{\"messages\":\"hi\"}", 400, "messages", NULL, "'messages' must be a non-empty array"},
    {"{\"messages\":{\"role\":\"user\",\"content\":\"hi\"}}", 400, "messages", NULL,
     "'messages' must be a non-empty array"},
    {"{\"messages\":[1]}", 400, "messages[0]", NULL,
     "'messages[0]' must be an object with 'role' and 'content'"},
    {"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},\"b\"]}", 400, "messages[1]", NULL,
     "'messages[1]' must be an object"},
    {"{\"messages\":[null]}", 400, "messages[0]", NULL, "'messages[0]' must be an object"},
    /* roles */
    {"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"bot\",\"content\":\"b\"}]}",
     400, "messages[1].role", NULL,
     "'messages[1].role' must be one of system, developer, user, assistant"},
    {"{\"messages\":[{\"content\":\"a\"}]}", 400, "messages[0].role", NULL,
     "'messages[0].role' must be one of"},
    {"{\"messages\":[{\"role\":5,\"content\":\"a\"}]}", 400, "messages[0].role", NULL,
     "must be one of"},
    {"{\"messages\":[{\"role\":\"User\",\"content\":\"a\"}]}", 400, "messages[0].role", NULL,
     "must be one of"},
    {"{\"messages\":[{\"role\":\"tool\",\"content\":\"a\"}]}", 400, "messages[0].role", NULL,
     "must be one of"},
    /* contents */
    {"{\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400, "messages[0].content", NULL,
     "'messages[0].content' must be a string or an array of content parts"},
    {"{\"messages\":[{\"role\":\"user\",\"content\":{\"text\":\"a\"}}]}", 400,
     "messages[0].content", NULL, "must be a string or an array of content parts"},
    {"{\"messages\":[{\"role\":\"user\",\"content\":null}]}", 400, "messages[0].content", NULL,
     "'messages[0].content' is required"},
    {"{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\"}]}", 400,
     "messages[1].content", NULL, "'messages[1].content' is required"},
    {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":"
     "{\"url\":\"http://x/y.png\"}}]}]}",
     400, "messages[0].content", UNSUP, "only parts of type 'text' are supported"},
    {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
     "{\"type\":\"input_audio\"}]}]}",
     400, "messages[0].content", UNSUP, "'messages[0].content'[1]: only parts of type 'text'"},
    {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":5}]}]}", 400,
     "messages[0].content", NULL, "'messages[0].content'[0].text must be a string"},
    {"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}", 400,
     "messages[0].content", NULL, "[0].text must be a string"},
    /* chat logprobs: a boolean, with top_logprobs for the alternatives */
    {M "\"logprobs\":1}", 400, "logprobs", NULL, "'logprobs' must be a boolean"},
    {M "\"logprobs\":\"true\"}", 400, "logprobs", NULL, "'logprobs' must be a boolean"},
    {M "\"top_logprobs\":2}", 400, "top_logprobs", NULL,
     "'top_logprobs' requires 'logprobs' to be true"},
    {M "\"logprobs\":false,\"top_logprobs\":0}", 400, "top_logprobs", NULL,
     "requires 'logprobs' to be true"},
    {M "\"logprobs\":true,\"top_logprobs\":21}", 400, "top_logprobs", NULL,
     "'top_logprobs' must be between 0 and 20, got 21"},
    {M "\"logprobs\":true,\"top_logprobs\":-1}", 400, "top_logprobs", NULL,
     "'top_logprobs' must be between 0 and 20"},
    {M "\"logprobs\":true,\"top_logprobs\":\"5\"}", 400, "top_logprobs", NULL,
     "'top_logprobs' must be an integer"},
    /* the shared fields are checked as for completions */
    {M "\"model\":\"gpt-4\"}", 404, "model", "model_not_found", "'gpt-4' does not exist"},
    {M "\"temperature\":5}", 400, "temperature", NULL, "'temperature' must be between 0 and 2"},
    {M "\"n\":0}", 400, "n", NULL, "'n' must be between 1 and 16"},
    {M "\"max_completion_tokens\":0}", 400, "max_completion_tokens", NULL, "between 1 and 2048"},
    {M "\"tools\":[{\"type\":\"function\"}]}", 400, "tools", UNSUP, "'tools' is not supported"},
    {M "\"response_format\":{\"type\":\"json_schema\"}}", 400, "response_format", UNSUP,
     "type 'json_schema' is not supported"},
    {M "\"stream_options\":{\"include_usage\":true}}", 400, "stream_options", NULL,
     "only allowed when 'stream' is true"},
    {M "\"logit_bias\":{\"600\":1}}", 400, "logit_bias", NULL, "key '600' is not a token id"},
};

static void test_chat_rejects_each_bad_body_with_its_error(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < sizeof(BAD_CHAT) / sizeof(BAD_CHAT[0]); i++) {
        const bad_body *b = &BAD_CHAT[i];
        srv_completion_req r;
        srv_error e;
        const int rc = parse_chat(b->body, &r, &e);
        srv_completion_req_free(&r);
        const char *want_param = b->param ? b->param : "";
        const bool ok = rc == -1 && e.status == b->status && e.type &&
                        strcmp(e.type, "invalid_request_error") == 0 &&
                        strcmp(e.param, want_param) == 0 &&
                        (b->code ? e.code && strcmp(e.code, b->code) == 0 : e.code == NULL) &&
                        strstr(e.message, b->message) != NULL;
        if (!ok) {
            failures++;
            print_error("chat row %zu %.100s\n  want %d param=%s code=%s msg~\"%s\"\n"
                        "  got rc=%d %d type=%s param=%s code=%s msg=\"%s\"\n",
                        i, b->body, b->status, want_param, b->code ? b->code : "(null)", b->message,
                        rc, rc ? e.status : 0, rc && e.type ? e.type : "(null)", rc ? e.param : "",
                        rc && e.code ? e.code : "(null)", rc ? e.message : "");
        }
    }
    assert_int_equal(failures, 0);
}

static void test_chat_parses_messages_roles_and_contents(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_chat_ok("{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                  "{\"role\":\"developer\",\"content\":\"\"},"
                  "{\"role\":\"user\",\"content\":\"Hi \\u00e9\",\"name\":\"bob\"},"
                  "{\"role\":\"assistant\",\"content\":\"Hello\"}]}",
                  &r);
    assert_int_equal(r.n_msgs, 4);
    assert_non_null(r.msgs);
    assert_string_equal(r.msgs[0].role, "system");
    assert_string_equal(r.msgs[0].content, "Be brief.");
    assert_int_equal(r.msgs[0].content_len, 9);
    assert_string_equal(r.msgs[1].role, "developer");
    assert_string_equal(r.msgs[1].content, "");
    assert_int_equal(r.msgs[1].content_len, 0);
    assert_string_equal(r.msgs[2].role, "user");
    assert_string_equal(r.msgs[2].content, "Hi \xC3\xA9");
    assert_int_equal(r.msgs[2].content_len, 5);
    assert_string_equal(r.msgs[3].role, "assistant");
    assert_string_equal(r.msgs[3].content, "Hello");
    /* a chat request has no prompt of its own and the chat defaults of a completion */
    assert_null(r.prompt_text);
    assert_null(r.prompt_tokens);
    assert_int_equal(r.n, 1);
    assert_int_equal(r.logprobs, -1);
    srv_completion_req_free(&r);
    assert_null(r.msgs);
    assert_int_equal(r.n_msgs, 0);
}

/* srv_msg says content "may hold NULs" and chat_template.h renders length-delimited contents,
 * and srv_parse_request loads the body with JSON_ALLOW_NUL, so "\u0000" (valid JSON) reaches
 * the message byte-exactly. */
static void test_chat_keeps_nul_bytes_in_content(void **state)
{
    (void)state;
    srv_completion_req r;
    static const char body[] = "{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}";
    parse_chat_ok(body, &r);
    assert_int_equal(r.msgs[0].content_len, 3);
    assert_memory_equal(r.msgs[0].content, "a\0b", 4);
    srv_completion_req_free(&r);
}

static void test_chat_joins_text_parts_with_newlines(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_chat_ok("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
                  "\"Once upon\"},{\"type\":\"text\",\"text\":\"a time\"},{\"type\":\"text\","
                  "\"text\":\"\"}]}]}",
                  &r);
    assert_int_equal(r.n_msgs, 1);
    assert_string_equal(r.msgs[0].content, "Once upon\na time\n");
    assert_int_equal(r.msgs[0].content_len, 17);
    srv_completion_req_free(&r);

    parse_chat_ok("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
                  "\"only\"}]}]}",
                  &r);
    assert_string_equal(r.msgs[0].content, "only");
    assert_int_equal(r.msgs[0].content_len, 4);
    srv_completion_req_free(&r);

    parse_chat_ok("{\"messages\":[{\"role\":\"user\",\"content\":[]}]}", &r);
    assert_string_equal(r.msgs[0].content, "");
    assert_int_equal(r.msgs[0].content_len, 0);
    srv_completion_req_free(&r);
}

static void test_chat_accepts_null_or_missing_assistant_content(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_chat_ok("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
                  "{\"role\":\"assistant\",\"content\":null},{\"role\":\"assistant\"},"
                  "{\"role\":\"user\",\"content\":\"again\"}]}",
                  &r);
    assert_int_equal(r.n_msgs, 4);
    assert_string_equal(r.msgs[1].role, "assistant");
    assert_non_null(r.msgs[1].content);
    assert_string_equal(r.msgs[1].content, "");
    assert_int_equal(r.msgs[1].content_len, 0);
    assert_string_equal(r.msgs[2].content, "");
    assert_string_equal(r.msgs[3].content, "again");
    srv_completion_req_free(&r);
}

static void test_chat_logprobs_is_a_flag_with_top_logprobs_count(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_chat_ok(M "\"logprobs\":true}", &r);
    assert_int_equal(r.logprobs, 0);
    srv_completion_req_free(&r);
    parse_chat_ok(M "\"logprobs\":true,\"top_logprobs\":5}", &r);
    assert_int_equal(r.logprobs, 5);
    srv_completion_req_free(&r);
    parse_chat_ok(M "\"logprobs\":true,\"top_logprobs\":20}", &r);
    assert_int_equal(r.logprobs, 20);
    srv_completion_req_free(&r);
    parse_chat_ok(M "\"logprobs\":false}", &r);
    assert_int_equal(r.logprobs, -1);
    srv_completion_req_free(&r);
    parse_chat_ok(M "\"logprobs\":false,\"top_logprobs\":null}", &r);
    assert_int_equal(r.logprobs, -1);
    srv_completion_req_free(&r);
    parse_chat_ok(M "\"logprobs\":null}", &r);
    assert_int_equal(r.logprobs, -1);
    srv_completion_req_free(&r);
}

static void test_chat_parses_shared_fields_and_ignores_echo(void **state)
{
    (void)state;
    srv_completion_req r;
    parse_chat_ok(M "\"model\":\"stories260K\",\"max_completion_tokens\":12,\"n\":2,"
                    "\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                    "\"temperature\":0,\"stop\":[\"\\n\"],\"seed\":3,\"logit_bias\":{\"5\":-100},"
                    "\"presence_penalty\":1,\"min_tokens\":1,\"user\":\"u\",\"echo\":\"x\"}",
                  &r);
    assert_int_equal(r.max_tokens, 12);
    assert_int_equal(r.n, 2);
    assert_true(r.stream);
    assert_true(r.include_usage);
    assert_true(r.sampling.temperature == 0.0f);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "\n");
    assert_true(r.seed_set);
    assert_true(bias_of(&r, 5) == -100.0f);
    assert_true(r.sampling.presence_penalty == 1.0f);
    assert_int_equal(r.min_tokens, 1);
    assert_string_equal(r.user, "u");
    assert_false(r.echo); /* echo is a completions field */
    assert_int_equal(r.n_msgs, 1);
    srv_completion_req_free(&r);
}

static void test_chat_failed_parse_frees_earlier_messages(void **state)
{
    (void)state;
    /* Two messages are copied before the third is refused; the free must find them. */
    srv_completion_req r;
    srv_error e;
    assert_int_equal(
        parse_chat("{\"user\":\"u\",\"stop\":\"x\",\"logit_bias\":{\"3\":1},\"messages\":["
                   "{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":"
                   "[{\"type\":\"text\",\"text\":\"a\"}]},{\"role\":\"user\",\"content\":7}]}",
                   &r, &e),
        -1);
    assert_string_equal(e.param, "messages[2].content");
    srv_completion_req_free(&r);
    assert_null(r.msgs);
    assert_null(r.bias);
    assert_null(r.user);
    srv_completion_req_free(&r);
}

static void test_error_json_mirrors_each_chat_table_row(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(BAD_CHAT) / sizeof(BAD_CHAT[0]); i++) {
        srv_completion_req r;
        srv_error e;
        assert_int_equal(parse_chat(BAD_CHAT[i].body, &r, &e), -1);
        srv_completion_req_free(&r);
        json_t *j = srv_error_json(&e);
        json_t *inner = get(j, "error");
        assert_int_equal(json_object_size(inner), 4);
        expect_json_string(inner, "message", e.message);
        expect_json_string(inner, "param", BAD_CHAT[i].param);
        if (BAD_CHAT[i].code) {
            expect_json_string(inner, "code", BAD_CHAT[i].code);
        } else {
            assert_true(json_is_null(get(inner, "code")));
        }
        json_decref(j);
    }
}

/* --- error JSON --------------------------------------------------------------------------- */

static void test_error_json_has_exact_openai_shape(void **state)
{
    (void)state;
    srv_error e;
    srv_error_set(&e, 404, "invalid_request_error", "model_not_found", "model", "no %s here",
                  "gpt-4");
    assert_int_equal(e.status, 404);
    json_t *j = srv_error_json(&e);
    assert_int_equal(json_object_size(j), 1);
    json_t *inner = get(j, "error");
    assert_int_equal(json_object_size(inner), 4);
    expect_json_string(inner, "message", "no gpt-4 here");
    expect_json_string(inner, "type", "invalid_request_error");
    expect_json_string(inner, "param", "model");
    expect_json_string(inner, "code", "model_not_found");
    json_decref(j);

    srv_error_set(&e, 500, "server_error", NULL, NULL, "out of memory");
    j = srv_error_json(&e);
    assert_int_equal(json_object_size(j), 1);
    inner = get(j, "error");
    assert_int_equal(json_object_size(inner), 4);
    expect_json_string(inner, "message", "out of memory");
    expect_json_string(inner, "type", "server_error");
    assert_true(json_is_null(get(inner, "param")));
    assert_true(json_is_null(get(inner, "code")));
    json_decref(j);
}

static void test_error_json_round_trips_through_text(void **state)
{
    (void)state;
    srv_error e;
    srv_error_set(&e, 400, "invalid_request_error", NULL, "stop", "quote \" and \\ and \n");
    json_t *j = srv_error_json(&e);
    char *text = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    assert_non_null(text);
    assert_string_equal(text, "{\"error\":{\"code\":null,\"message\":\"quote \\\" and \\\\ and "
                              "\\n\",\"param\":\"stop\",\"type\":\"invalid_request_error\"}}");
    free(text);
    json_decref(j);
}

static void test_error_set_truncates_long_message_and_param(void **state)
{
    (void)state;
    srv_error e;
    srv_error_set(&e, 400, "invalid_request_error", NULL, A256, "%s%s%s", A256, A256, A256);
    assert_int_equal(strlen(e.param), sizeof(e.param) - 1);
    assert_int_equal(strlen(e.message), sizeof(e.message) - 1);
}

/* --- response JSON ------------------------------------------------------------------------ */

static void test_completion_json_has_text_completion_shape(void **state)
{
    (void)state;
    json_t *j = srv_completion_json("cmpl-abc", "stories260K", 1700000000L, "Once upon", 9,
                                    "length", 5, 16);
    assert_int_equal(json_object_size(j), 7);
    expect_json_string(j, "id", "cmpl-abc");
    expect_json_string(j, "object", "text_completion");
    expect_json_integer(j, "created", 1700000000L);
    expect_json_string(j, "model", "stories260K");
    expect_json_string(j, "system_fingerprint", SRV_SYSTEM_FINGERPRINT);

    json_t *choices = get(j, "choices");
    assert_true(json_is_array(choices));
    assert_int_equal(json_array_size(choices), 1);
    json_t *c = json_array_get(choices, 0);
    assert_int_equal(json_object_size(c), 4);
    expect_json_integer(c, "index", 0);
    expect_json_string(c, "text", "Once upon");
    assert_true(json_is_null(get(c, "logprobs")));
    expect_json_string(c, "finish_reason", "length");

    json_t *usage = get(j, "usage");
    assert_int_equal(json_object_size(usage), 3);
    expect_json_integer(usage, "prompt_tokens", 5);
    expect_json_integer(usage, "completion_tokens", 16);
    expect_json_integer(usage, "total_tokens", 21);
    json_decref(j);
}

static void test_completion_json_sanitizes_text_and_allows_null_finish(void **state)
{
    (void)state;
    json_t *j = srv_completion_json("cmpl-x", "m", 0, "ab\xE2\x82", 4, NULL, 0, 0);
    json_t *c = json_array_get(get(j, "choices"), 0);
    assert_non_null(c);
    const json_t *text = get(c, "text");
    assert_int_equal(json_string_length(text), 8);
    assert_memory_equal(json_string_value(text), "ab" FFFD FFFD, 8);
    assert_true(json_is_null(get(c, "finish_reason")));
    expect_json_integer(get(j, "usage"), "total_tokens", 0);
    json_decref(j);

    j = srv_completion_json("cmpl-y", "m", 1, "", 0, "stop", 3, 0);
    c = json_array_get(get(j, "choices"), 0);
    expect_json_string(c, "text", "");
    expect_json_string(c, "finish_reason", "stop");
    expect_json_integer(get(j, "usage"), "total_tokens", 3);
    json_decref(j);
}

static void test_models_json_lists_the_one_model(void **state)
{
    (void)state;
    json_t *j = srv_models_json("stories260K", 1700000000L, 2048);
    assert_int_equal(json_object_size(j), 2);
    expect_json_string(j, "object", "list");
    json_t *data = get(j, "data");
    assert_true(json_is_array(data));
    assert_int_equal(json_array_size(data), 1);
    json_t *m = json_array_get(data, 0);
    expect_json_string(m, "id", "stories260K");
    expect_json_string(m, "object", "model");
    expect_json_string(m, "owned_by", "sieve");
    expect_json_integer(m, "created", 1700000000L);
    expect_json_integer(m, "max_model_len", 2048);
    json_decref(j);
}

static void test_response_json_names_object_by_endpoint_and_chunk(void **state)
{
    (void)state;
    static const struct {
        srv_kind kind;
        bool chunk;
        const char *object;
    } cases[] = {
        {SRV_COMPLETION, false, "text_completion"},
        {SRV_COMPLETION, true, "text_completion"},
        {SRV_CHAT, false, "chat.completion"},
        {SRV_CHAT, true, "chat.completion.chunk"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        json_t *choices = json_array();
        json_array_append_new(choices, json_string("marker"));
        json_t *j = srv_response_json(cases[i].kind, cases[i].chunk, "chatcmpl-1", "stories260K",
                                      1700000001L, choices, srv_usage_json(4, 6));
        assert_int_equal(json_object_size(j), 7);
        expect_json_string(j, "id", "chatcmpl-1");
        expect_json_string(j, "object", cases[i].object);
        expect_json_integer(j, "created", 1700000001L);
        expect_json_string(j, "model", "stories260K");
        expect_json_string(j, "system_fingerprint", SRV_SYSTEM_FINGERPRINT);
        assert_ptr_equal(get(j, "choices"), choices); /* taken over, not copied */
        json_t *usage = get(j, "usage");
        assert_int_equal(json_object_size(usage), 3);
        expect_json_integer(usage, "prompt_tokens", 4);
        expect_json_integer(usage, "completion_tokens", 6);
        expect_json_integer(usage, "total_tokens", 10);
        json_decref(j);
    }
}

static void test_response_json_without_usage_or_choices(void **state)
{
    (void)state;
    json_t *j = srv_response_json(SRV_CHAT, true, "chatcmpl-2", "m", 5, NULL, NULL);
    assert_int_equal(json_object_size(j), 6);
    assert_null(json_object_get(j, "usage"));
    json_t *choices = get(j, "choices");
    assert_true(json_is_array(choices));
    assert_int_equal(json_array_size(choices), 0);
    assert_true(strncmp(json_string_value(get(j, "system_fingerprint")), "sieve-", 6) == 0);
    json_decref(j);
}

static void test_choice_json_completion_has_text(void **state)
{
    (void)state;
    json_t *c = srv_choice_json(SRV_COMPLETION, false, 3, "abc", 2, false, "stop", NULL);
    assert_int_equal(json_object_size(c), 4);
    expect_json_integer(c, "index", 3);
    expect_json_string(c, "text", "ab");
    assert_true(json_is_null(get(c, "logprobs")));
    expect_json_string(c, "finish_reason", "stop");
    json_decref(c);

    json_t *lp = json_object();
    c = srv_choice_json(SRV_COMPLETION, true, 1, "", 0, false, NULL, lp);
    assert_int_equal(json_object_size(c), 4);
    expect_json_string(c, "text", "");
    assert_ptr_equal(get(c, "logprobs"), lp);
    assert_true(json_is_null(get(c, "finish_reason")));
    assert_null(json_object_get(c, "delta"));
    json_decref(c);
}

static void test_choice_json_chat_message_has_role_and_content(void **state)
{
    (void)state;
    json_t *c = srv_choice_json(SRV_CHAT, false, 0, " Once upon", 10, false, "length", NULL);
    assert_int_equal(json_object_size(c), 4);
    expect_json_integer(c, "index", 0);
    assert_null(json_object_get(c, "delta"));
    assert_null(json_object_get(c, "text"));
    json_t *m = get(c, "message");
    assert_int_equal(json_object_size(m), 2);
    expect_json_string(m, "role", "assistant");
    expect_json_string(m, "content", " Once upon");
    assert_true(json_is_null(get(c, "logprobs")));
    expect_json_string(c, "finish_reason", "length");
    json_decref(c);

    /* an empty answer still has its content, and with_role changes nothing outside chunks */
    c = srv_choice_json(SRV_CHAT, false, 2, "", 0, true, "stop", NULL);
    m = get(c, "message");
    assert_int_equal(json_object_size(m), 2);
    expect_json_string(m, "role", "assistant");
    expect_json_string(m, "content", "");
    json_decref(c);

    /* invalid UTF-8 from a cut byte token is replaced, as in completions */
    c = srv_choice_json(SRV_CHAT, false, 0, "a\xE2\x82", 3, false, "length", NULL);
    const json_t *content = get(get(c, "message"), "content");
    assert_int_equal(json_string_length(content), 7);
    assert_memory_equal(json_string_value(content), "a" FFFD FFFD, 7);
    json_decref(c);
}

static void test_choice_json_chat_delta_role_text_and_final(void **state)
{
    (void)state;
    /* the first chunk: the role with empty content */
    json_t *c = srv_choice_json(SRV_CHAT, true, 1, "", 0, true, NULL, NULL);
    assert_int_equal(json_object_size(c), 4);
    expect_json_integer(c, "index", 1);
    assert_null(json_object_get(c, "message"));
    json_t *d = get(c, "delta");
    assert_int_equal(json_object_size(d), 2);
    expect_json_string(d, "role", "assistant");
    expect_json_string(d, "content", "");
    assert_true(json_is_null(get(c, "finish_reason")));
    json_decref(c);

    /* a text chunk: content only */
    json_t *lp = json_object();
    c = srv_choice_json(SRV_CHAT, true, 0, " there was", 6, false, NULL, lp);
    d = get(c, "delta");
    assert_int_equal(json_object_size(d), 1);
    expect_json_string(d, "content", " there");
    assert_ptr_equal(get(c, "logprobs"), lp);
    assert_true(json_is_null(get(c, "finish_reason")));
    json_decref(c);

    /* the final chunk: an empty delta {} and the finish reason */
    c = srv_choice_json(SRV_CHAT, true, 0, "", 0, false, "stop", NULL);
    d = get(c, "delta");
    assert_true(json_is_object(d));
    assert_int_equal(json_object_size(d), 0);
    expect_json_string(c, "finish_reason", "stop");
    assert_true(json_is_null(get(c, "logprobs")));
    char *text = json_dumps(c, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(text,
                        "{\"delta\":{},\"finish_reason\":\"stop\",\"index\":0,\"logprobs\":null}");
    free(text);
    json_decref(c);
}

/* --- logprobs JSON ------------------------------------------------------------------------ */

static rt_model *g_model;

static int logprobs_setup(void **state)
{
    (void)state;
    char err[512];
    rt_model_opts o = {.n_threads = 1, .max_batch_tokens = 64, .n_ctx = 64};
    if (rt_model_load(&g_model, tu_shared_path("models/stories260K.gguf"), &o, err, sizeof(err)) !=
        0) {
        fprintf(stderr, "cannot load %s: %s\n", tu_shared_path("models/stories260K.gguf"), err);
        return -1;
    }
    return 0;
}

static int logprobs_teardown(void **state)
{
    (void)state;
    rt_model_destroy(g_model);
    g_model = NULL;
    return 0;
}

/* " Once upon a time" <0xE2> </s>: four word pieces, a lone byte token (not valid UTF-8 on
 * its own) and the EOS control token, which decodes to nothing. */
enum { N_LP = 6, TOP_N = 2 };

typedef struct {
    int32_t tokens[N_LP];
    float lp[N_LP];
    int32_t top_ids[N_LP * TOP_N];
    float top_lps[N_LP * TOP_N];
    size_t tok_end[N_LP];
    sched_output o;
} lp_fixture;

static void make_lp_fixture(lp_fixture *f, const rt_tokenizer *tok)
{
    memset(f, 0, sizeof(*f));
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(rt_tokenize(tok, "Once upon a time", 16, false, false, &ids, &n), 0);
    assert_int_equal(n, 4); /* " Once" " upon" " a" " time" */
    for (int i = 0; i < 4; i++) {
        f->tokens[i] = ids[i];
    }
    free(ids);
    f->tokens[4] = 3 + 0xE2; /* <0xE2>: byte tokens follow unk, bos, eos */
    size_t plen = 0;
    const char *piece = rt_token_piece(tok, f->tokens[4], &plen);
    assert_non_null(piece);
    assert_int_equal(plen, 6);
    assert_memory_equal(piece, "<0xE2>", 6);
    f->tokens[5] = rt_tokenizer_eos(tok);
    assert_true(f->tokens[5] >= 0);
    size_t end = 0;
    char buf[64];
    for (int i = 0; i < N_LP; i++) {
        f->lp[i] = -0.25f * (float)(i + 1);
        /* the alternatives: the chosen token, then the next token of the list */
        f->top_ids[i * TOP_N] = f->tokens[i];
        f->top_lps[i * TOP_N] = f->lp[i];
        f->top_ids[i * TOP_N + 1] = f->tokens[(i + 1) % N_LP];
        f->top_lps[i * TOP_N + 1] = f->lp[i] - 1.5f;
        end += rt_token_to_bytes(tok, f->tokens[i], buf, sizeof(buf));
        f->tok_end[i] = end;
    }
    assert_int_equal(f->tok_end[3], 17); /* " Once upon a time" */
    assert_int_equal(f->tok_end[4], 18);
    assert_int_equal(f->tok_end[5], 18);
    f->o.tokens = f->tokens;
    f->o.n_tokens = N_LP;
    f->o.lp = f->lp;
    f->o.top_ids = f->top_ids;
    f->o.top_lps = f->top_lps;
    f->o.top_n = TOP_N;
    f->o.tok_end = f->tok_end;
}

static void expect_real(const json_t *v, double want)
{
    assert_true(json_is_real(v));
    if (fabs(json_real_value(v) - want) > 1e-6) {
        print_error("logprob %g, want %g\n", json_real_value(v), want);
        fail();
    }
}

static void expect_bytes(const json_t *arr, const char *want, size_t n)
{
    assert_true(json_is_array(arr));
    assert_int_equal(json_array_size(arr), n);
    for (size_t i = 0; i < n; i++) {
        const json_t *b = json_array_get(arr, i);
        assert_true(json_is_integer(b));
        assert_int_equal(json_integer_value(b), (unsigned char)want[i]);
    }
}

static void test_logprobs_json_completions_format(void **state)
{
    (void)state;
    lp_fixture f;
    make_lp_fixture(&f, rt_model_tokenizer(g_model));
    json_t *lp = srv_logprobs_json(SRV_COMPLETION, rt_model_tokenizer(g_model), &f.o, 0, N_LP, 0);
    assert_int_equal(json_object_size(lp), 4);
    json_t *tokens = get(lp, "tokens"), *lps = get(lp, "token_logprobs"),
           *tops = get(lp, "top_logprobs"), *offs = get(lp, "text_offset");
    assert_int_equal(json_array_size(tokens), N_LP);
    assert_int_equal(json_array_size(lps), N_LP);
    assert_int_equal(json_array_size(tops), N_LP);
    assert_int_equal(json_array_size(offs), N_LP);
    static const char *const want_tok[N_LP] = {" Once", " upon", " a", " time", FFFD, ""};
    static const long long want_off[N_LP] = {0, 5, 10, 12, 17, 18};
    for (int i = 0; i < N_LP; i++) {
        assert_string_equal(json_string_value(json_array_get(tokens, i)), want_tok[i]);
        expect_real(json_array_get(lps, i), f.lp[i]);
        assert_int_equal(json_integer_value(json_array_get(offs, i)), want_off[i]);
        json_t *top = json_array_get(tops, i);
        assert_true(json_is_object(top));
        assert_int_equal(json_object_size(top), TOP_N);
        /* keyed by token text: the chosen token and the next one */
        expect_real(get(top, want_tok[i]), f.lp[i]);
        expect_real(get(top, want_tok[(i + 1) % N_LP]), f.lp[i] - 1.5f);
    }
    json_decref(lp);
}

/* text_offset counts from the start of the text the client sees: the echoed prompt's length
 * (text_base) plus the raw text before the token, tok_end[i - 1], also when a stream's chunk
 * starts mid-way (from > 0). */
static void test_logprobs_json_completions_offsets_use_tok_end_and_base(void **state)
{
    (void)state;
    lp_fixture f;
    make_lp_fixture(&f, rt_model_tokenizer(g_model));
    json_t *lp = srv_logprobs_json(SRV_COMPLETION, rt_model_tokenizer(g_model), &f.o, 1, 4, 16);
    json_t *offs = get(lp, "text_offset");
    assert_int_equal(json_array_size(offs), 3);
    assert_int_equal(json_integer_value(json_array_get(offs, 0)), 16 + 5);
    assert_int_equal(json_integer_value(json_array_get(offs, 1)), 16 + 10);
    assert_int_equal(json_integer_value(json_array_get(offs, 2)), 16 + 12);
    json_t *tokens = get(lp, "tokens");
    assert_int_equal(json_array_size(tokens), 3);
    assert_string_equal(json_string_value(json_array_get(tokens, 0)), " upon");
    assert_string_equal(json_string_value(json_array_get(tokens, 2)), " time");
    expect_real(json_array_get(get(lp, "token_logprobs"), 0), f.lp[1]);
    json_decref(lp);

    /* tok_end, not the token's own length, decides: a stop string cut later must not shift
     * the offsets, so offsets follow tok_end even where it disagrees with the pieces */
    f.tok_end[0] = 100;
    lp = srv_logprobs_json(SRV_COMPLETION, rt_model_tokenizer(g_model), &f.o, 0, 2, 7);
    offs = get(lp, "text_offset");
    assert_int_equal(json_integer_value(json_array_get(offs, 0)), 7);
    assert_int_equal(json_integer_value(json_array_get(offs, 1)), 107);
    json_decref(lp);

    /* an empty range gives empty arrays */
    lp = srv_logprobs_json(SRV_COMPLETION, rt_model_tokenizer(g_model), &f.o, 3, 3, 0);
    assert_int_equal(json_array_size(get(lp, "tokens")), 0);
    assert_int_equal(json_array_size(get(lp, "text_offset")), 0);
    json_decref(lp);
}

static void test_logprobs_json_chat_format(void **state)
{
    (void)state;
    lp_fixture f;
    make_lp_fixture(&f, rt_model_tokenizer(g_model));
    json_t *lp = srv_logprobs_json(SRV_CHAT, rt_model_tokenizer(g_model), &f.o, 0, N_LP, 99);
    assert_int_equal(json_object_size(lp), 1);
    json_t *content = get(lp, "content");
    assert_true(json_is_array(content));
    assert_int_equal(json_array_size(content), N_LP);
    static const char *const want_tok[N_LP] = {" Once", " upon", " a", " time", FFFD, ""};
    static const char *const want_bytes[N_LP] = {" Once", " upon", " a", " time", "\xE2", ""};
    for (int i = 0; i < N_LP; i++) {
        json_t *e = json_array_get(content, i);
        assert_int_equal(json_object_size(e), 4);
        expect_json_string(e, "token", want_tok[i]);
        expect_real(get(e, "logprob"), f.lp[i]);
        /* bytes are the raw token bytes, even where the token string had to be replaced */
        expect_bytes(get(e, "bytes"), want_bytes[i], strlen(want_bytes[i]));
        json_t *top = get(e, "top_logprobs");
        assert_true(json_is_array(top));
        assert_int_equal(json_array_size(top), TOP_N);
        const int next = (i + 1) % N_LP;
        json_t *t0 = json_array_get(top, 0), *t1 = json_array_get(top, 1);
        assert_int_equal(json_object_size(t0), 3);
        expect_json_string(t0, "token", want_tok[i]);
        expect_real(get(t0, "logprob"), f.lp[i]);
        expect_bytes(get(t0, "bytes"), want_bytes[i], strlen(want_bytes[i]));
        expect_json_string(t1, "token", want_tok[next]);
        expect_real(get(t1, "logprob"), f.lp[i] - 1.5f);
        expect_bytes(get(t1, "bytes"), want_bytes[next], strlen(want_bytes[next]));
        assert_null(json_object_get(e, "text_offset"));
    }
    json_decref(lp);

    /* a sub-range, as a stream sends it */
    lp = srv_logprobs_json(SRV_CHAT, rt_model_tokenizer(g_model), &f.o, 2, 3, 0);
    content = get(lp, "content");
    assert_int_equal(json_array_size(content), 1);
    expect_json_string(json_array_get(content, 0), "token", " a");
    json_decref(lp);
}

static void test_logprobs_json_without_alternatives(void **state)
{
    (void)state;
    lp_fixture f;
    make_lp_fixture(&f, rt_model_tokenizer(g_model));
    f.o.top_n = 0;
    f.o.top_ids = NULL;
    f.o.top_lps = NULL;
    json_t *lp = srv_logprobs_json(SRV_CHAT, rt_model_tokenizer(g_model), &f.o, 0, 2, 0);
    json_t *content = get(lp, "content");
    assert_int_equal(json_array_size(content), 2);
    for (int i = 0; i < 2; i++) {
        json_t *top = get(json_array_get(content, i), "top_logprobs");
        assert_true(json_is_array(top));
        assert_int_equal(json_array_size(top), 0);
    }
    json_decref(lp);
    lp = srv_logprobs_json(SRV_COMPLETION, rt_model_tokenizer(g_model), &f.o, 0, 2, 0);
    json_t *tops = get(lp, "top_logprobs");
    assert_int_equal(json_array_size(tops), 2);
    assert_true(json_is_object(json_array_get(tops, 0)));
    assert_int_equal(json_object_size(json_array_get(tops, 0)), 0);
    expect_real(json_array_get(get(lp, "token_logprobs"), 1), f.lp[1]);
    json_decref(lp);
}

/* --- srv_json_text ------------------------------------------------------------------------ */

static void test_json_text_keeps_valid_utf8_unchanged(void **state)
{
    (void)state;
    const char s[] = "plain ASCII, caf\xC3\xA9, \xE2\x82\xAC 5, \xF0\x9F\x98\x80, "
                     "\xEF\xBF\xBF, \xF4\x8F\xBF\xBF, \xED\x9F\xBF, \xEE\x80\x80";
    expect_text(s, sizeof(s) - 1, s, sizeof(s) - 1);
    expect_text("", 0, "", 0);
    expect_text("a\0b", 3, "a\0b", 3); /* NUL is valid UTF-8; jansson keeps the length */
    expect_text("abcdef", 3, "abc", 3);
}

static void test_json_text_replaces_lone_lead_byte(void **state)
{
    (void)state;
    expect_text("\xE2", 1, FFFD, 3);
    expect_text("a\xE2z", 3, "a" FFFD "z", 5);
    expect_text("\x80", 1, FFFD, 3); /* a continuation byte alone */
    expect_text("\xFF\xFE", 2, FFFD FFFD, 6);
    expect_text("\xF5\x80\x80\x80", 4, FFFD FFFD FFFD FFFD, 12); /* above U+10FFFF's lead */
}

/* Each byte of an invalid sequence becomes its own U+FFFD, as the header says ("invalid bytes
 * become U+FFFD"); the valid text after it is kept. */
static void test_json_text_replaces_truncated_sequence_at_end(void **state)
{
    (void)state;
    expect_text("ok\xE2\x82", 4, "ok" FFFD FFFD, 8);
    expect_text("ok\xF0\x9F\x98", 5, "ok" FFFD FFFD FFFD, 11);
    expect_text("\xC3", 1, FFFD, 3);
    expect_text("\xE2\x82x", 3, FFFD FFFD "x", 7); /* cut off by a non-continuation byte */
}

static void test_json_text_replaces_overlong_encodings(void **state)
{
    (void)state;
    expect_text("\xC0\x80", 2, FFFD FFFD, 6);
    expect_text("\xC1\xBF", 2, FFFD FFFD, 6);
    expect_text("\xE0\x80\xAF", 3, FFFD FFFD FFFD, 9);
    expect_text("\xF0\x8F\xBF\xBF", 4, FFFD FFFD FFFD FFFD, 12);
}

static void test_json_text_replaces_surrogates_and_beyond_unicode(void **state)
{
    (void)state;
    expect_text("\xED\xA0\x80", 3, FFFD FFFD FFFD, 9);
    expect_text("a\xED\xBF\xBFz", 5, "a" FFFD FFFD FFFD "z", 11);
    expect_text("\xF4\x90\x80\x80", 4, FFFD FFFD FFFD FFFD, 12);
}

/* --- finish reason ------------------------------------------------------------------------ */

static void test_finish_reason_names_stop_and_length_only(void **state)
{
    (void)state;
    assert_string_equal(srv_finish_reason(SCHED_FINISH_LENGTH), "length");
    assert_string_equal(srv_finish_reason(SCHED_FINISH_STOP), "stop");
    assert_null(srv_finish_reason(SCHED_FINISH_NONE));
    assert_null(srv_finish_reason(SCHED_FINISH_CANCELLED));
    assert_null(srv_finish_reason(SCHED_FINISH_ERROR));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_completion_rejects_each_bad_body_with_its_error),
        cmocka_unit_test(test_completion_error_json_mirrors_each_table_row),
        cmocka_unit_test(test_completion_rejects_token_prompt_longer_than_context),
        cmocka_unit_test(test_completion_failed_parse_frees_partial_allocations),
        cmocka_unit_test(test_completion_accepts_minimal_text_prompt_with_defaults),
        cmocka_unit_test(test_completion_accepts_text_prompt_with_escapes_and_utf8),
        cmocka_unit_test(test_completion_accepts_omitted_null_or_matching_model),
        cmocka_unit_test(test_completion_accepts_single_element_list_as_text),
        cmocka_unit_test(test_completion_copies_token_id_prompt),
        cmocka_unit_test(test_completion_accepts_stop_string_and_array_skipping_empty),
        cmocka_unit_test(test_completion_accepts_integral_real_max_tokens),
        cmocka_unit_test(test_completion_max_tokens_wins_over_max_completion_tokens),
        cmocka_unit_test(test_completion_accepts_neutral_values_of_optional_fields),
        cmocka_unit_test(test_completion_parses_n_and_matching_best_of),
        cmocka_unit_test(test_completion_parses_stream_and_include_usage),
        cmocka_unit_test(test_completion_parses_logprobs_count_and_echo),
        cmocka_unit_test(test_completion_parses_min_tokens),
        cmocka_unit_test(test_completion_parses_priority),
        cmocka_unit_test(test_completion_parses_sampling_penalties),
        cmocka_unit_test(test_completion_parses_logit_bias_entries),
        cmocka_unit_test(test_completion_fills_every_new_field),
        cmocka_unit_test(test_chat_rejects_each_bad_body_with_its_error),
        cmocka_unit_test(test_error_json_mirrors_each_chat_table_row),
        cmocka_unit_test(test_chat_parses_messages_roles_and_contents),
        cmocka_unit_test(test_chat_keeps_nul_bytes_in_content),
        cmocka_unit_test(test_chat_joins_text_parts_with_newlines),
        cmocka_unit_test(test_chat_accepts_null_or_missing_assistant_content),
        cmocka_unit_test(test_chat_logprobs_is_a_flag_with_top_logprobs_count),
        cmocka_unit_test(test_chat_parses_shared_fields_and_ignores_echo),
        cmocka_unit_test(test_chat_failed_parse_frees_earlier_messages),
        cmocka_unit_test(test_completion_ignores_unknown_fields),
        cmocka_unit_test(test_completion_sets_seed_flag_only_when_seed_given),
        cmocka_unit_test(test_completion_top_k_minus_one_and_zero_mean_off),
        cmocka_unit_test(test_completion_accepts_sampling_range_bounds),
        cmocka_unit_test(test_completion_fills_every_field),
        cmocka_unit_test(test_completion_reads_only_len_bytes_of_body),
        cmocka_unit_test(test_error_json_has_exact_openai_shape),
        cmocka_unit_test(test_error_json_round_trips_through_text),
        cmocka_unit_test(test_error_set_truncates_long_message_and_param),
        cmocka_unit_test(test_completion_json_has_text_completion_shape),
        cmocka_unit_test(test_completion_json_sanitizes_text_and_allows_null_finish),
        cmocka_unit_test(test_response_json_names_object_by_endpoint_and_chunk),
        cmocka_unit_test(test_response_json_without_usage_or_choices),
        cmocka_unit_test(test_choice_json_completion_has_text),
        cmocka_unit_test(test_choice_json_chat_message_has_role_and_content),
        cmocka_unit_test(test_choice_json_chat_delta_role_text_and_final),
        cmocka_unit_test(test_models_json_lists_the_one_model),
        cmocka_unit_test(test_json_text_keeps_valid_utf8_unchanged),
        cmocka_unit_test(test_json_text_replaces_lone_lead_byte),
        cmocka_unit_test(test_json_text_replaces_truncated_sequence_at_end),
        cmocka_unit_test(test_json_text_replaces_overlong_encodings),
        cmocka_unit_test(test_json_text_replaces_surrogates_and_beyond_unicode),
        cmocka_unit_test(test_finish_reason_names_stop_and_length_only),
    };
    const struct CMUnitTest model_tests[] = {
        cmocka_unit_test(test_logprobs_json_completions_format),
        cmocka_unit_test(test_logprobs_json_completions_offsets_use_tok_end_and_base),
        cmocka_unit_test(test_logprobs_json_chat_format),
        cmocka_unit_test(test_logprobs_json_without_alternatives),
    };
    const int failed = cmocka_run_group_tests(tests, NULL, NULL);
    return failed + cmocka_run_group_tests(model_tests, logprobs_setup, logprobs_teardown);
}
