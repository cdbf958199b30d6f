/*
 * test_openai.c - tests for the OpenAI JSON layer (server/openai.c).
 *
 * srv_parse_completion is the server's first line against hostile request bodies, so most of
 * this file is one table of bad bodies, each with the status, error.param, error.code and a
 * piece of the message it must produce. Good bodies are checked field by field against the
 * parsed struct. The response builders are checked for their exact JSON shape, and
 * srv_json_text for its exact bytes. Every parse, failed or not, is followed by
 * srv_completion_req_free so that a run under valgrind finds no leak.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/openai.h"

static const srv_limits LIM = {"stories260K", 512, 2048, 16};

#define A16 "aaaaaaaaaaaaaaaa"
#define A256 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16 A16

#define FFFD "\xEF\xBF\xBD"

/* --- helpers ------------------------------------------------------------------------------ */

static int parse(const char *body, srv_completion_req *r, srv_error *e)
{
    memset(e, 0, sizeof(*e));
    return srv_parse_completion(body, strlen(body), &LIM, r, e);
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
    /* known fields this server cannot honour */
    {P "\"stream\":true}", 400, "stream", UNSUP, "'stream' is not supported"},
    {P "\"n\":2}", 400, "n", UNSUP, "'n' is not supported"},
    {P "\"best_of\":3}", 400, "best_of", UNSUP, "'best_of' is not supported"},
    {P "\"n\":{}}", 400, "n", UNSUP, "'n' is not supported"},
    {P "\"stream\":{}}", 400, "stream", UNSUP, "'stream' is not supported"},
    {P "\"logprobs\":1}", 400, "logprobs", UNSUP, "'logprobs' is not supported"},
    {P "\"logprobs\":0}", 400, "logprobs", UNSUP, "'logprobs' is not supported"},
    {P "\"echo\":true}", 400, "echo", UNSUP, "'echo' is not supported"},
    {P "\"logit_bias\":{\"1\":5}}", 400, "logit_bias", UNSUP, "'logit_bias' is not supported"},
    {P "\"suffix\":\"x\"}", 400, "suffix", UNSUP, "'suffix' is not supported"},
    /* penalties: out of range is a plain error, in range but not neutral is unsupported */
    {P "\"presence_penalty\":0.5}", 400, "presence_penalty", UNSUP,
     "'presence_penalty' other than 0 is not supported"},
    {P "\"presence_penalty\":3}", 400, "presence_penalty", NULL,
     "'presence_penalty' must be between -2 and 2"},
    {P "\"presence_penalty\":\"0\"}", 400, "presence_penalty", NULL,
     "'presence_penalty' must be a number"},
    {P "\"frequency_penalty\":-3}", 400, "frequency_penalty", NULL,
     "'frequency_penalty' must be between -2 and 2"},
    {P "\"frequency_penalty\":1}", 400, "frequency_penalty", UNSUP,
     "'frequency_penalty' other than 0"},
    {P "\"repetition_penalty\":0}", 400, "repetition_penalty", NULL,
     "'repetition_penalty' must be between 0.01 and 100"},
    {P "\"repetition_penalty\":1.1}", 400, "repetition_penalty", UNSUP,
     "'repetition_penalty' other than 1"},
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

static void test_completion_accepts_neutral_values_of_unsupported_fields(void **state)
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
    assert_int_equal(json_object_size(j), 6);
    expect_json_string(j, "id", "cmpl-abc");
    expect_json_string(j, "object", "text_completion");
    expect_json_integer(j, "created", 1700000000L);
    expect_json_string(j, "model", "stories260K");

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
        cmocka_unit_test(test_completion_accepts_neutral_values_of_unsupported_fields),
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
        cmocka_unit_test(test_models_json_lists_the_one_model),
        cmocka_unit_test(test_json_text_keeps_valid_utf8_unchanged),
        cmocka_unit_test(test_json_text_replaces_lone_lead_byte),
        cmocka_unit_test(test_json_text_replaces_truncated_sequence_at_end),
        cmocka_unit_test(test_json_text_replaces_overlong_encodings),
        cmocka_unit_test(test_json_text_replaces_surrogates_and_beyond_unicode),
        cmocka_unit_test(test_finish_reason_names_stop_and_length_only),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
