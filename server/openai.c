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

#include <errno.h>
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
        srv_error_set(err, 400, "invalid_request_error", NULL, "prompt", "'prompt' is required");
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
 * not implement: refusing them beats answering something else. */
static int refuse_unsupported(json_t *root, srv_kind kind, srv_error *err)
{
    static const char *const fields[] = {"suffix", "tools",      "functions",
                                         "audio",  "modalities", "prediction"};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        json_t *v = json_object_get(root, fields[i]);
        if (!v || json_is_null(v) || (json_is_array(v) && json_array_size(v) == 0))
            continue;
        if (json_is_string(v) && json_string_length(v) == 0 && strcmp(fields[i], "suffix") == 0)
            continue;
        srv_error_set(err, 400, "invalid_request_error", "unsupported_parameter", fields[i],
                      "'%s' is not supported by this server", fields[i]);
        return -1;
    }
    json_t *rf = json_object_get(root, "response_format");
    if (rf && !json_is_null(rf)) {
        json_t *type = json_is_object(rf) ? json_object_get(rf, "type") : NULL;
        if (!json_is_string(type)) {
            srv_error_set(err, 400, "invalid_request_error", NULL, "response_format",
                          "'response_format' must be an object with a string 'type'");
            return -1;
        }
        if (strcmp(json_string_value(type), "text") != 0) {
            srv_error_set(err, 400, "invalid_request_error", "unsupported_parameter",
                          "response_format", "'response_format' type '%.64s' is not supported",
                          json_string_value(type));
            return -1;
        }
    }
    (void)kind;
    return 0;
}

static int parse_logit_bias(json_t *root, const srv_limits *lim, srv_completion_req *out,
                            srv_error *err)
{
    json_t *lb = json_object_get(root, "logit_bias");
    if (!lb || json_is_null(lb))
        return 0;
    if (!json_is_object(lb))
        return bad(err, "logit_bias", "'%s' must be an object mapping token ids to numbers%s", "");
    const size_t n = json_object_size(lb);
    if (n > RT_MAX_LOGIT_BIAS) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "logit_bias",
                      "'logit_bias' may hold at most %d entries, got %zu", RT_MAX_LOGIT_BIAS, n);
        return -1;
    }
    if (n == 0)
        return 0;
    out->bias = malloc(sizeof(rt_logit_bias) * n);
    if (!out->bias) {
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    const char *key;
    json_t *v;
    int i = 0;
    json_object_foreach(lb, key, v)
    {
        char *end;
        errno = 0;
        long id = strtol(key, &end, 10);
        double b;
        if (!*key || *end || errno || id < 0 || id >= lim->n_vocab) {
            srv_error_set(err, 400, "invalid_request_error", NULL, "logit_bias",
                          "'logit_bias' key '%.32s' is not a token id in [0, %d)", key,
                          lim->n_vocab);
            return -1;
        }
        if (!as_number(v, &b) || !(b >= -100.0 && b <= 100.0)) {
            srv_error_set(err, 400, "invalid_request_error", NULL, "logit_bias",
                          "'logit_bias' values must be numbers between -100 and 100");
            return -1;
        }
        out->bias[i].id = (int32_t)id;
        out->bias[i].bias = (float)b;
        i++;
    }
    out->sampling.logit_bias = out->bias;
    out->sampling.n_logit_bias = i;
    return 0;
}

/* One chat message's content: a string, or an array of {"type":"text"} parts
 * joined by newlines; null only for an assistant turn. */
static int parse_content(json_t *c, size_t i, bool null_ok, srv_msg *m, srv_error *err)
{
    char param[64];
    snprintf(param, sizeof(param), "messages[%zu].content", i);
    if (!c || json_is_null(c)) {
        if (!null_ok) {
            srv_error_set(err, 400, "invalid_request_error", NULL, param, "'%s' is required",
                          param);
            return -1;
        }
        m->content = strdup("");
        m->content_len = 0;
        return m->content ? 0 : -1;
    }
    if (json_is_string(c)) {
        m->content_len = json_string_length(c);
        m->content = malloc(m->content_len + 1);
        if (!m->content)
            return -1;
        memcpy(m->content, json_string_value(c), m->content_len + 1);
        return 0;
    }
    if (!json_is_array(c)) {
        srv_error_set(err, 400, "invalid_request_error", NULL, param,
                      "'%s' must be a string or an array of content parts", param);
        return -1;
    }
    size_t total = 0, k;
    json_t *part;
    json_array_foreach(c, k, part)
    {
        json_t *type = json_object_get(part, "type");
        json_t *text = json_object_get(part, "text");
        if (!json_is_string(type) || strcmp(json_string_value(type), "text") != 0) {
            srv_error_set(err, 400, "invalid_request_error", "unsupported_parameter", param,
                          "'%s'[%zu]: only parts of type 'text' are supported", param, k);
            return -1;
        }
        if (!json_is_string(text)) {
            srv_error_set(err, 400, "invalid_request_error", NULL, param,
                          "'%s'[%zu].text must be a string", param, k);
            return -1;
        }
        total += json_string_length(text) + 1;
    }
    m->content = malloc(total + 1);
    if (!m->content)
        return -1;
    size_t o = 0;
    json_array_foreach(c, k, part)
    {
        json_t *text = json_object_get(part, "text");
        if (o)
            m->content[o++] = '\n';
        memcpy(m->content + o, json_string_value(text), json_string_length(text));
        o += json_string_length(text);
    }
    m->content[o] = 0;
    m->content_len = o;
    return 0;
}

static int parse_messages(json_t *root, srv_completion_req *out, srv_error *err)
{
    json_t *msgs = json_object_get(root, "messages");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "messages",
                      "'messages' must be a non-empty array of messages");
        return -1;
    }
    const size_t n = json_array_size(msgs);
    if (n > 100000) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "messages",
                      "'messages' holds %zu messages; the limit is 100000", n);
        return -1;
    }
    out->msgs = calloc(n, sizeof(srv_msg));
    if (!out->msgs) {
        srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m)
    {
        char param[64];
        snprintf(param, sizeof(param), "messages[%zu]", i);
        if (!json_is_object(m)) {
            srv_error_set(err, 400, "invalid_request_error", NULL, param,
                          "'%s' must be an object with 'role' and 'content'", param);
            return -1;
        }
        json_t *role = json_object_get(m, "role");
        static const char *const roles[] = {"system", "developer", "user", "assistant"};
        bool known = false;
        for (size_t r = 0; json_is_string(role) && r < 4; r++)
            known |= strcmp(json_string_value(role), roles[r]) == 0;
        if (!known) {
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            srv_error_set(err, 400, "invalid_request_error", NULL, param,
                          "'%s' must be one of system, developer, user, assistant", param);
            return -1;
        }
        out->msgs[i].role = strdup(json_string_value(role));
        out->n_msgs = (int)i + 1;
        const bool is_assistant = strcmp(json_string_value(role), "assistant") == 0;
        if (!out->msgs[i].role ||
            parse_content(json_object_get(m, "content"), i, is_assistant, &out->msgs[i], err)) {
            if (!err->message[0])
                srv_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
            return -1;
        }
    }
    return 0;
}

static int parse_stream(json_t *root, srv_completion_req *out, srv_error *err)
{
    if (get_bool(root, "stream", &out->stream, err) != 0)
        return -1;
    json_t *so = json_object_get(root, "stream_options");
    if (!so || json_is_null(so))
        return 0;
    if (!out->stream) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "stream_options",
                      "'stream_options' is only allowed when 'stream' is true");
        return -1;
    }
    if (!json_is_object(so))
        return bad(err, "stream_options", "'%s' must be an object%s", "");
    json_t *iu = json_object_get(so, "include_usage");
    if (iu && !json_is_null(iu)) {
        if (!json_is_boolean(iu)) {
            srv_error_set(err, 400, "invalid_request_error", NULL, "stream_options",
                          "'stream_options.include_usage' must be a boolean");
            return -1;
        }
        out->include_usage = json_is_true(iu);
    }
    return 0;
}

static int parse_logprobs(json_t *root, srv_kind kind, srv_completion_req *out, srv_error *err)
{
    out->logprobs = -1;
    long long k = 0;
    bool present = false;
    if (kind == SRV_COMPLETION) {
        if (get_int(root, "logprobs", 0, SCHED_MAX_LOGPROBS, &k, &present, err) != 0)
            return -1;
        if (present)
            out->logprobs = (int)k;
        return 0;
    }
    bool want = false;
    if (get_bool(root, "logprobs", &want, err) != 0 ||
        get_int(root, "top_logprobs", 0, SCHED_MAX_LOGPROBS, &k, &present, err) != 0)
        return -1;
    if (present && !want) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "top_logprobs",
                      "'top_logprobs' requires 'logprobs' to be true");
        return -1;
    }
    if (want)
        out->logprobs = (int)k;
    return 0;
}

int srv_parse_request(srv_kind kind, const char *body, size_t len, const srv_limits *lim,
                      srv_completion_req *out, srv_error *err)
{
    memset(out, 0, sizeof(*out));
    memset(err, 0, sizeof(*err));
    out->kind = kind;
    out->n = 1;
    out->logprobs = -1;
    rt_sampling_defaults(&out->sampling);
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
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
    if (refuse_unsupported(root, kind, err) != 0)
        goto done;
    long long max_tokens = 0, top_k = 0, seed = 0, n = 1, best_of = 0, min_tokens = 0, priority = 0;
    bool have_max = false, have_seed = false, have_mct = false, have_best = false;
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
        get_bool(root, "ignore_eos", &out->ignore_eos, err) != 0 ||
        get_int(root, "n", 1, SRV_MAX_CHOICES, &n, NULL, err) != 0 ||
        get_int(root, "best_of", 1, SRV_MAX_CHOICES, &best_of, &have_best, err) != 0 ||
        get_int(root, "min_tokens", 0, lim->n_ctx, &min_tokens, NULL, err) != 0 ||
        get_int(root, "priority", -1000000, 1000000, &priority, NULL, err) != 0 ||
        get_float(root, "presence_penalty", -2.0, 2.0, &out->sampling.presence_penalty, err) ||
        get_float(root, "frequency_penalty", -2.0, 2.0, &out->sampling.frequency_penalty, err) ||
        get_float(root, "repetition_penalty", 0.01, 10.0, &out->sampling.repetition_penalty, err) ||
        parse_stream(root, out, err) != 0 || parse_logprobs(root, kind, out, err) != 0 ||
        parse_logit_bias(root, lim, out, err) != 0)
        goto done;
    if (out->sampling.top_p <= 0.0f) {
        bad(err, "top_p", "'%s' must be greater than 0%s", "");
        goto done;
    }
    if (have_best && best_of != n) {
        srv_error_set(err, 400, "invalid_request_error", "unsupported_parameter", "best_of",
                      "'best_of' other than 'n' is not supported");
        goto done;
    }
    if (max_tokens > 0 && min_tokens > max_tokens) {
        srv_error_set(err, 400, "invalid_request_error", NULL, "min_tokens",
                      "'min_tokens' (%lld) must not exceed 'max_tokens' (%lld)", min_tokens,
                      max_tokens);
        goto done;
    }
    out->n = (int)n;
    out->min_tokens = (int)min_tokens;
    out->priority = (int)priority;
    out->sampling.top_k = top_k > 0 ? (int)top_k : 0;
    out->sampling.seed = (uint64_t)seed;
    out->seed_set = have_seed;
    if (kind == SRV_COMPLETION && get_bool(root, "echo", &out->echo, err) != 0)
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
    if (parse_stop(root, out, err) != 0)
        goto done;
    {
        srv_attention_conf builtin;
        const srv_attention_conf *ac = lim->attention;
        if (!ac) {
            srv_attention_conf_default(&builtin);
            ac = &builtin;
        }
        char param[64], msg[256];
        if (srv_attention_parse(ac, json_object_get(root, "attention"), &out->attn, param,
                                sizeof(param), msg, sizeof(msg)) != 0) {
            srv_error_set(err, 400, "invalid_request_error", NULL, param, "%s", msg);
            goto done;
        }
    }
    if (kind == SRV_COMPLETION ? parse_prompt(root, lim, out, err) != 0
                               : parse_messages(root, out, err) != 0)
        goto done;
    rc = 0;
done:
    json_decref(root);
    return rc;
}

int srv_parse_completion(const char *body, size_t len, const srv_limits *lim,
                         srv_completion_req *out, srv_error *err)
{
    return srv_parse_request(SRV_COMPLETION, body, len, lim, out, err);
}

void srv_completion_req_free(srv_completion_req *r)
{
    free(r->prompt_text);
    free(r->prompt_tokens);
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    for (int i = 0; i < r->n_msgs; i++) {
        free(r->msgs[i].role);
        free(r->msgs[i].content);
    }
    free(r->msgs);
    free(r->bias);
    free(r->user);
    memset(r, 0, sizeof(*r));
}

static json_t *usage_json(int prompt_tokens, int completion_tokens)
{
    json_t *usage = json_object();
    json_object_set_new(usage, "prompt_tokens", json_integer(prompt_tokens));
    json_object_set_new(usage, "completion_tokens", json_integer(completion_tokens));
    json_object_set_new(usage, "total_tokens", json_integer(prompt_tokens + completion_tokens));
    return usage;
}

json_t *srv_response_json(srv_kind kind, bool chunk, const char *id, const char *model,
                          long created, json_t *choices, json_t *usage)
{
    json_t *root = json_object();
    json_object_set_new(root, "id", json_string(id));
    const char *object = kind == SRV_COMPLETION ? "text_completion"
                         : chunk                ? "chat.completion.chunk"
                                                : "chat.completion";
    json_object_set_new(root, "object", json_string(object));
    json_object_set_new(root, "created", json_integer(created));
    json_object_set_new(root, "model", json_string(model));
    json_object_set_new(root, "system_fingerprint", json_string(SRV_SYSTEM_FINGERPRINT));
    json_object_set_new(root, "choices", choices ? choices : json_array());
    if (usage)
        json_object_set_new(root, "usage", usage);
    return root;
}

json_t *srv_choice_json(srv_kind kind, bool chunk, int index, const char *text, size_t len,
                        bool with_role, const char *finish_reason, json_t *logprobs)
{
    json_t *c = json_object();
    json_object_set_new(c, "index", json_integer(index));
    if (kind == SRV_COMPLETION) {
        json_object_set_new(c, "text", srv_json_text(text, len));
    } else {
        json_t *m = json_object();
        if (!chunk || with_role)
            json_object_set_new(m, "role", json_string("assistant"));
        if (!chunk || len > 0 || with_role)
            json_object_set_new(m, "content", srv_json_text(text, len));
        json_object_set_new(c, chunk ? "delta" : "message", m);
    }
    json_object_set_new(c, "logprobs", logprobs ? logprobs : json_null());
    json_object_set_new(c, "finish_reason",
                        finish_reason ? json_string(finish_reason) : json_null());
    return c;
}

json_t *srv_completion_json(const char *id, const char *model, long created, const char *text,
                            size_t text_len, const char *finish_reason, int prompt_tokens,
                            int completion_tokens)
{
    json_t *choices = json_array();
    json_array_append_new(choices, srv_choice_json(SRV_COMPLETION, false, 0, text, text_len, false,
                                                   finish_reason, NULL));
    return srv_response_json(SRV_COMPLETION, false, id, model, created, choices,
                             usage_json(prompt_tokens, completion_tokens));
}

json_t *srv_usage_json(int prompt_tokens, int completion_tokens)
{
    return usage_json(prompt_tokens, completion_tokens);
}

/* The bytes of a token as a JSON array of integers. */
static json_t *bytes_json(const char *b, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_integer((unsigned char)b[i]));
    return a;
}

json_t *srv_logprobs_json(srv_kind kind, const rt_tokenizer *tok, const sched_output *o, int from,
                          int to, size_t text_base)
{
    char piece[256];
    if (kind == SRV_CHAT) {
        json_t *content = json_array();
        for (int i = from; i < to; i++) {
            json_t *e = json_object();
            size_t n = rt_token_to_bytes(tok, o->tokens[i], piece, sizeof(piece));
            n = n < sizeof(piece) ? n : sizeof(piece);
            json_object_set_new(e, "token", srv_json_text(piece, n));
            json_object_set_new(e, "logprob", json_real(o->lp[i]));
            json_object_set_new(e, "bytes", bytes_json(piece, n));
            json_t *top = json_array();
            for (int k = 0; k < o->top_n; k++) {
                const int32_t id = o->top_ids[(size_t)i * (size_t)o->top_n + (size_t)k];
                size_t m = rt_token_to_bytes(tok, id, piece, sizeof(piece));
                m = m < sizeof(piece) ? m : sizeof(piece);
                json_t *t = json_object();
                json_object_set_new(t, "token", srv_json_text(piece, m));
                json_object_set_new(
                    t, "logprob", json_real(o->top_lps[(size_t)i * (size_t)o->top_n + (size_t)k]));
                json_object_set_new(t, "bytes", bytes_json(piece, m));
                json_array_append_new(top, t);
            }
            json_object_set_new(e, "top_logprobs", top);
            json_array_append_new(content, e);
        }
        json_t *lp = json_object();
        json_object_set_new(lp, "content", content);
        return lp;
    }
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    for (int i = from; i < to; i++) {
        size_t n = rt_token_to_bytes(tok, o->tokens[i], piece, sizeof(piece));
        n = n < sizeof(piece) ? n : sizeof(piece);
        json_array_append_new(tokens, srv_json_text(piece, n));
        json_array_append_new(lps, json_real(o->lp[i]));
        json_t *top = json_object();
        for (int k = 0; k < o->top_n; k++) {
            const int32_t id = o->top_ids[(size_t)i * (size_t)o->top_n + (size_t)k];
            size_t m = rt_token_to_bytes(tok, id, piece, sizeof(piece));
            m = m < sizeof(piece) ? m : sizeof(piece);
            json_t *key = srv_json_text(piece, m);
            json_object_set_new(top, json_string_value(key),
                                json_real(o->top_lps[(size_t)i * (size_t)o->top_n + (size_t)k]));
            json_decref(key);
        }
        json_array_append_new(tops, top);
        const size_t start = i > 0 ? o->tok_end[i - 1] : 0;
        json_array_append_new(offs, json_integer((json_int_t)(text_base + start)));
    }
    json_t *lp = json_object();
    json_object_set_new(lp, "tokens", tokens);
    json_object_set_new(lp, "token_logprobs", lps);
    json_object_set_new(lp, "top_logprobs", tops);
    json_object_set_new(lp, "text_offset", offs);
    return lp;
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
