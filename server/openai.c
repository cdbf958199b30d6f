/*
 * openai.c - parsing and validation of OpenAI request bodies, and the JSON of
 * responses and errors.
 *
 * Validation is strict about the fields we know (type and range, each error
 * naming the field) and lenient about fields we do not know, as vLLM and
 * llama.cpp's server are: clients send extra fields, and rejecting them would
 * break the official SDKs. Known fields that this server cannot honour yet are
 * refused rather than silently ignored.
 */
#include "server/openai.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when it is not one. */
static size_t utf8_seq_len(const unsigned char *s, size_t left)
{
    const unsigned char c = s[0];
    size_t n;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (left < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return n;
}

json_t *srv_json_text(const char *text, size_t len)
{
    const unsigned char *s = (const unsigned char *)text;
    char *buf = malloc(len * 3 + 1); /* each bad byte may become 3 bytes */
    if (!buf)
        return json_string("");
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t n = utf8_seq_len(s + i, len - i);
        if (n == 0) {
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        } else {
            memcpy(buf + o, s + i, n);
            o += n;
            i += n;
        }
    }
    json_t *j = json_stringn(buf, o);
    free(buf);
    return j ? j : json_string("");
}

void srv_error_set(srv_error *e, int status, const char *type, const char *code, const char *param,
                   const char *fmt, ...)
{
    e->status = status;
    e->type = type;
    e->code = code;
    snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
}

json_t *srv_error_json(const srv_error *e)
{
    json_t *inner = json_object();
    json_object_set_new(inner, "message", json_string(e->message));
    json_object_set_new(inner, "type", json_string(e->type ? e->type : "invalid_request_error"));
    json_object_set_new(inner, "param", e->param[0] ? json_string(e->param) : json_null());
    json_object_set_new(inner, "code", e->code ? json_string(e->code) : json_null());
    json_t *root = json_object();
    json_object_set_new(root, "error", inner);
    return root;
}

static int bad(srv_error *err, const char *param, const char *fmt, const char *detail)
{
    srv_error_set(err, 400, "invalid_request_error", NULL, param, fmt, param, detail);
    return -1;
}

/* A JSON number as double; integers are numbers too. */
static bool as_number(const json_t *v, double *out)
{
    if (json_is_real(v))
        *out = json_real_value(v);
    else if (json_is_integer(v))
        *out = (double)json_integer_value(v);
    else
        return false;
    return true;
}

static int get_float(json_t *root, const char *key, double lo, double hi, float *out,
                     srv_error *err)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v))
        return 0;
    double d;
    if (!as_number(v, &d))
        return bad(err, key, "'%s' must be a number%s", "");
    if (!(d >= lo && d <= hi)) {
        srv_error_set(err, 400, "invalid_request_error", NULL, key,
                      "'%s' must be between %g and %g, got %g", key, lo, hi, d);
        return -1;
    }
    *out = (float)d;
    return 0;
}

static int get_int(json_t *root, const char *key, long long lo, long long hi, long long *out,
                   bool *present, srv_error *err)
{
    json_t *v = json_object_get(root, key);
    if (present)
        *present = false;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v)) {
        /* 16.0 is an integer to a JavaScript client; accept exact reals. */
        const double d = json_is_real(v) ? json_real_value(v) : 0.5;
        if (d != floor(d) || fabs(d) > 9e15)
            return bad(err, key, "'%s' must be an integer%s", "");
        *out = (long long)d;
    } else {
        *out = json_integer_value(v);
    }
    if (*out < lo || *out > hi) {
        srv_error_set(err, 400, "invalid_request_error", NULL, key,
                      "'%s' must be between %lld and %lld, got %lld", key, lo, hi, *out);
        return -1;
    }
    if (present)
        *present = true;
    return 0;
}

static int get_bool(json_t *root, const char *key, bool *out, srv_error *err)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return bad(err, key, "'%s' must be a boolean%s", "");
    *out = json_is_true(v);
    return 0;
}

static int parse_prompt(json_t *root, const srv_limits *lim, srv_completion_req *out,
                        srv_error *err)
{
    json_t *p = json_object_get(root, "prompt");
    if (!p || json_is_null(p)) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "prompt",
                      "'prompt' is required");
        return -1;
    }
    if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
        p = json_array_get(p, 0); /* ["text"]: one prompt in the list form */
    if (json_is_string(p)) {
        out->prompt_len = json_string_length(p);
        out->prompt_text = malloc(out->prompt_len + 1);
        if (!out->prompt_text) {
            srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
            return -1;
        }
        memcpy(out->prompt_text, json_string_value(p), out->prompt_len + 1);
        return 0;
    }
    if (!json_is_array(p))
        return bad(err, "prompt", "'%s' must be a string or an array of token ids%s", "");
    const size_t n = json_array_size(p);
    if (n == 0)
        return bad(err, "prompt", "'%s' must not be an empty array%s", "");
    if (json_is_array(json_array_get(p, 0)) || json_is_string(json_array_get(p, 0))) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "prompt",
                      "'prompt' with several prompts in one request is not supported; "
                      "send one request per prompt");
        return -1;
    }
    if (n > (size_t)lim->n_ctx) {
        srv_error_set(err, 400, "invalid_request_error", "context_length_exceeded", "prompt",
                      "This model's maximum context length is %d tokens, however you requested "
                      "%zu tokens in the prompt",
                      lim->n_ctx, n);
        return -1;
    }
    out->prompt_tokens = malloc(sizeof(int32_t) * n);
    if (!out->prompt_tokens) {
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(p, i);
        if (!json_is_integer(t) || json_integer_value(t) < 0 ||
            json_integer_value(t) >= lim->n_vocab) {
            srv_error_set(err, 400, "invalid_request_error", NULL, "prompt",
                          "'prompt'[%zu] must be a token id in [0, %d)", i, lim->n_vocab);
            return -1;
        }
        out->prompt_tokens[i] = (int32_t)json_integer_value(t);
    }
    out->n_prompt_tokens = (int)n;
    return 0;
}

static int parse_stop(json_t *root, srv_completion_req *out, srv_error *err)
{
    json_t *s = json_object_get(root, "stop");
    if (!s || json_is_null(s))
        return 0;
    json_t *one[1] = {s};
    json_t **items = one;
    size_t n = 1;
    if (json_is_array(s)) {
        n = json_array_size(s);
        if (n > SCHED_MAX_STOP) {
            srv_error_set(err, 400, "invalid_request_error", NULL, "stop",
                          "'stop' may hold at most %d strings, got %zu", SCHED_MAX_STOP, n);
            return -1;
        }
        items = NULL;
    } else if (!json_is_string(s)) {
        return bad(err, "stop", "'%s' must be a string or an array of strings%s", "");
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = items ? items[i] : json_array_get(s, i);
        if (!json_is_string(v))
            return bad(err, "stop", "'%s' must be a string or an array of strings%s", "");
        const size_t len = json_string_length(v);
        if (len == 0)
            continue; /* an empty stop string would stop before any text */
        if (len > 256 || memchr(json_string_value(v), 0, len))
            return bad(err, "stop", "each '%s' string must be 1 to 256 bytes without NUL%s", "");
        out->stop[out->n_stop] = strdup(json_string_value(v));
        if (!out->stop[out->n_stop]) {
            srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
            return -1;
        }
        out->n_stop++;
    }
    return 0;
}

/* Fields of the OpenAI API that change the output and that this server does
 * not implement yet: refusing them beats answering something else. */
static int refuse_unsupported(json_t *root, srv_error *err)
{
    static const struct {
        const char *key;
        const char *neutral; /* JSON value that asks for nothing, or NULL */
    } fields[] = {
        {"stream", "false"}, {"n", "1"},        {"best_of", "1"}, {"logprobs", NULL},
        {"echo", "false"},   {"suffix", NULL},  {"logit_bias", NULL},
    };
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        json_t *v = json_object_get(root, fields[i].key);
        if (!v || json_is_null(v))
            continue;
        if (fields[i].neutral) {
            json_t *neutral = json_loads(fields[i].neutral, JSON_DECODE_ANY, NULL);
            bool same = json_equal(v, neutral) ||
                        (json_is_integer(neutral) && json_is_real(v) &&
                         json_real_value(v) == (double)json_integer_value(neutral));
            json_decref(neutral);
            if (same)
                continue;
        }
        if (strcmp(fields[i].key, "logit_bias") == 0 && json_is_object(v) &&
            json_object_size(v) == 0)
            continue;
        srv_error_set(err, 400, "invalid_request_error", "unsupported_parameter", fields[i].key,
                      "'%s' is not supported by this server yet", fields[i].key);
        return -1;
    }
    return 0;
}

static int check_penalty(json_t *root, const char *key, double lo, double hi, double neutral,
                         srv_error *err)
{
    float v = (float)neutral;
    if (get_float(root, key, lo, hi, &v, err) != 0)
        return -1;
    if (v != (float)neutral) {
        srv_error_set(err, 400, "invalid_request_error", "unsupported_parameter", key,
                      "'%s' other than %g is not supported by this server yet", key, neutral);
        return -1;
    }
    return 0;
}

int srv_parse_completion(const char *body, size_t len, const srv_limits *lim,
                         srv_completion_req *out, srv_error *err)
{
    memset(out, 0, sizeof(*out));
    rt_sampling_defaults(&out->sampling);
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_DECODE_ANY, &jerr);
    if (!root) {
        srv_error_set(err, 400, "invalid_request_error", NULL, NULL,
                      "The request body is not valid JSON: %s (line %d, column %d)", jerr.text,
                      jerr.line, jerr.column);
        return -1;
    }
    int rc = -1;
    if (!json_is_object(root)) {
        srv_error_set(err, 400, "invalid_request_error", NULL, NULL,
                      "The request body must be a JSON object");
        goto done;
    }
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) {
            bad(err, "model", "'%s' must be a string%s", "");
            goto done;
        }
        if (strcmp(json_string_value(model), lim->model_name) != 0) {
            srv_error_set(err, 404, "invalid_request_error", "model_not_found", "model",
                          "The model '%.200s' does not exist; this server serves '%.200s'",
                          json_string_value(model), lim->model_name);
            goto done;
        }
    }
    if (refuse_unsupported(root, err) != 0)
        goto done;
    long long max_tokens = 0, top_k = 0, seed = 0;
    bool have_max = false, have_seed = false, have_mct = false;
    if (get_int(root, "max_tokens", 1, lim->n_ctx, &max_tokens, &have_max, err) != 0)
        goto done;
    long long mct = 0;
    if (get_int(root, "max_completion_tokens", 1, lim->n_ctx, &mct, &have_mct, err) != 0)
        goto done;
    if (have_mct && !have_max)
        max_tokens = mct;
    out->max_tokens = (int)max_tokens;
    if (get_float(root, "temperature", 0.0, 2.0, &out->sampling.temperature, err) != 0 ||
        get_float(root, "top_p", 0.0, 1.0, &out->sampling.top_p, err) != 0 ||
        get_float(root, "min_p", 0.0, 1.0, &out->sampling.min_p, err) != 0 ||
        get_int(root, "top_k", -1, 1 << 30, &top_k, NULL, err) != 0 ||
        get_int(root, "seed", INT64_MIN, INT64_MAX, &seed, &have_seed, err) != 0 ||
        get_bool(root, "ignore_eos", &out->ignore_eos, err) != 0)
        goto done;
    if (out->sampling.top_p <= 0.0f) {
        bad(err, "top_p", "'%s' must be greater than 0%s", "");
        goto done;
    }
    out->sampling.top_k = top_k > 0 ? (int)top_k : 0;
    out->sampling.seed = (uint64_t)seed;
    out->seed_set = have_seed;
    if (check_penalty(root, "presence_penalty", -2.0, 2.0, 0.0, err) != 0 ||
        check_penalty(root, "frequency_penalty", -2.0, 2.0, 0.0, err) != 0 ||
        check_penalty(root, "repetition_penalty", 0.01, 100.0, 1.0, err) != 0)
        goto done;
    json_t *user = json_object_get(root, "user");
    if (user && !json_is_null(user)) {
        if (!json_is_string(user)) {
            bad(err, "user", "'%s' must be a string%s", "");
            goto done;
        }
        out->user = strdup(json_string_value(user));
        if (!out->user) {
            srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
            goto done;
        }
    }
    if (parse_stop(root, out, err) != 0 || parse_prompt(root, lim, out, err) != 0)
        goto done;
    rc = 0;
done:
    json_decref(root);
    return rc;
}

void srv_completion_req_free(srv_completion_req *r)
{
    free(r->prompt_text);
    free(r->prompt_tokens);
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->user);
    memset(r, 0, sizeof(*r));
}

json_t *srv_completion_json(const char *id, const char *model, long created, const char *text,
                            size_t text_len, const char *finish_reason, int prompt_tokens,
                            int completion_tokens)
{
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    json_object_set_new(choice, "text", srv_json_text(text, text_len));
    json_object_set_new(choice, "logprobs", json_null());
    json_object_set_new(choice, "finish_reason",
                        finish_reason ? json_string(finish_reason) : json_null());
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_t *usage = json_object();
    json_object_set_new(usage, "prompt_tokens", json_integer(prompt_tokens));
    json_object_set_new(usage, "completion_tokens", json_integer(completion_tokens));
    json_object_set_new(usage, "total_tokens", json_integer(prompt_tokens + completion_tokens));
    json_t *root = json_object();
    json_object_set_new(root, "id", json_string(id));
    json_object_set_new(root, "object", json_string("text_completion"));
    json_object_set_new(root, "created", json_integer(created));
    json_object_set_new(root, "model", json_string(model));
    json_object_set_new(root, "choices", choices);
    json_object_set_new(root, "usage", usage);
    return root;
}

json_t *srv_models_json(const char *model_name, long created, int n_ctx)
{
    json_t *m = json_object();
    json_object_set_new(m, "id", json_string(model_name));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer(created));
    json_object_set_new(m, "owned_by", json_string("sieve"));
    json_object_set_new(m, "max_model_len", json_integer(n_ctx));
    json_t *data = json_array();
    json_array_append_new(data, m);
    json_t *root = json_object();
    json_object_set_new(root, "object", json_string("list"));
    json_object_set_new(root, "data", data);
    return root;
}

const char *srv_finish_reason(sched_finish f)
{
    switch (f) {
    case SCHED_FINISH_LENGTH:
        return "length";
    case SCHED_FINISH_STOP:
        return "stop";
    default:
        return NULL;
    }
}
