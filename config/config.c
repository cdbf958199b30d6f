/*
 * config.c - defaults, JSON file loading, SIEVE_* environment variables,
 * command-line flags, validation, --check-config and the key reference.
 *
 * One table describes every key (name, flag, type, where it lives, its range
 * and its documentation), so the JSON loader, the environment, the flag
 * parser, validation, the typo suggestions, --help and --config-schema (from
 * which tools/gen_config_doc.py writes docs/config.md and config/sieve.json)
 * all agree. A key's environment variable is always "SIEVE_" + the key in
 * upper case; its flag is "--" + the key with '-' for '_'.
 */
#include "config/config.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef SIEVE_DEFAULT_MODEL
#define SIEVE_DEFAULT_MODEL "../shared/models/stories260K.gguf"
#endif
#ifndef SIEVE_VERSION
#define SIEVE_VERSION "0.0.0"
#endif

typedef enum { K_STR, K_INT, K_INT64, K_BOOL, K_STRLIST } key_kind;

typedef struct {
    const char *name; /* JSON key; the variable is SIEVE_<NAME> */
    const char *flag; /* long command-line flag */
    key_kind kind;
    size_t off;       /* the field in cfg_config */
    size_t cap;       /* K_STR: buffer size; K_STRLIST: bytes per item */
    int64_t min, max; /* K_INT, K_INT64: the range; K_STRLIST: max = most items */
    size_t count_off; /* K_STRLIST: the int that counts the items */
    const char *arg;  /* the value's placeholder in --help */
    const char *help; /* one line for --help */
    const char *doc;  /* the reference text (docs/config.md, config/sieve.json) */
    bool json_object; /* K_STR holding a JSON object's text (a file may give the object) */
    bool int_list;    /* K_STR holding "auto" or comma-separated indices (a file may give an
                         array of integers) */
} key_def;

#define FIELD_SIZE(field) sizeof(((cfg_config *)0)->field)
#define STR(field, flag_, arg_, help_, doc_)                                                       \
    {                                                                                              \
        .name = #field, .flag = flag_, .kind = K_STR, .off = offsetof(cfg_config, field),          \
        .cap = FIELD_SIZE(field), .arg = arg_, .help = help_, .doc = doc_                          \
    }
#define JSONSTR(field, flag_, arg_, help_, doc_)                                                   \
    {                                                                                              \
        .name = #field, .flag = flag_, .kind = K_STR, .off = offsetof(cfg_config, field),          \
        .cap = FIELD_SIZE(field), .arg = arg_, .help = help_, .doc = doc_, .json_object = true     \
    }
#define INTLIST(field, flag_, arg_, help_, doc_)                                                   \
    {                                                                                              \
        .name = #field, .flag = flag_, .kind = K_STR, .off = offsetof(cfg_config, field),          \
        .cap = FIELD_SIZE(field), .arg = arg_, .help = help_, .doc = doc_, .int_list = true        \
    }
#define INT(field, flag_, lo, hi, arg_, help_, doc_)                                               \
    {                                                                                              \
        .name = #field, .flag = flag_, .kind = K_INT, .off = offsetof(cfg_config, field),          \
        .min = lo, .max = hi, .arg = arg_, .help = help_, .doc = doc_                              \
    }
#define INT64(field, flag_, lo, hi, arg_, help_, doc_)                                             \
    {                                                                                              \
        .name = #field, .flag = flag_, .kind = K_INT64, .off = offsetof(cfg_config, field),        \
        .min = lo, .max = hi, .arg = arg_, .help = help_, .doc = doc_                              \
    }
#define BOOL(field, flag_, help_, doc_)                                                            \
    {                                                                                              \
        .name = #field, .flag = flag_, .kind = K_BOOL, .off = offsetof(cfg_config, field),         \
        .min = 0, .max = 1, .arg = "BOOL", .help = help_, .doc = doc_                              \
    }

static const key_def keys[] = {
    STR(model, "--model", "PATH", "GGUF model file",
        "Path of the GGUF model file to serve; a relative path is resolved from the working "
        "directory. The built-in default is the repository's test model "
        "(../shared/models/stories260K.gguf, made absolute at build time)."),
    STR(model_name, "--model-name", "NAME", "model id served by /v1/models",
        "Model id reported by /v1/models and accepted in the 'model' field of requests. Empty: "
        "the file name without .gguf (stories260K)."),
    STR(host, "--host", "ADDR", "listen address",
        "Listen address. Use 0.0.0.0 to listen on every interface (as in a container)."),
    INT(port, "--port", 0, 65535, "N", "listen port",
        "Listen port; 0 picks a free port and logs it."),
    INT(threads, "--threads", 0, 1024, "N", "compute threads, 0 = all CPUs",
        "Compute threads for the forward pass and OpenBLAS; 0 = the number of online CPUs."),
    STR(device, "--device", "NAME", "auto, cpu or cuda: where the forward pass runs",
        "Backend of the forward pass: \"auto\" runs on a CUDA GPU when the build has CUDA, a "
        "device is present and 'devices' is not empty, and on the CPU otherwise (the start-up "
        "log says which and why); \"cpu\" always uses the CPU; \"cuda\" requires a GPU and "
        "fails start-up (exit status 1) when none is usable. Default \"auto\"."),
    INTLIST(devices, "--devices", "IDS", "GPU indices to use (\"auto\", \"0,1\", \"\" = none)",
            "CUDA devices the server may use: \"auto\" (the first tensor_parallel_size devices "
            "present), a list of indices (an array of integers in a file, \"0,1\" in "
            "SIEVE_DEVICES and --devices), or an empty list ([] or \"\"), which keeps the "
            "forward pass on the CPU. At most 16 indices, each 0..63. Default \"auto\"."),
    INT(tensor_parallel_size, "--tensor-parallel-size", 1, 8, "N",
        "ranks splitting attention heads and FFN columns",
        "Tensor-parallel ranks: attention heads and FFN columns are split over this many "
        "ranks, with an all-reduce after the attention output and FFN down projections; it "
        "must divide the model's head and KV head counts. On the CPU the ranks are threads "
        "(a deterministic shared-memory all-reduce); on CUDA each rank is one GPU of "
        "'devices' (the first this many listed, or present for \"auto\") with an NCCL "
        "all-reduce, so it needs that many GPUs: with fewer, \"auto\" runs on the CPU and "
        "\"cuda\" fails start-up. Default 1."),
    BOOL(cuda_graphs, "--cuda-graphs", "replay CUDA decode steps as graphs",
         "On the CUDA backend, capture each decode step shape (sequences padded to a power of "
         "two, block tables to a power-of-two length) once as a CUDA graph and replay it "
         "whenever that shape repeats, which saves the launch overhead of every kernel; "
         "other steps run eagerly. false runs every step eagerly (e.g. to compare). No effect "
         "on the CPU. Default true."),
    INT64(max_body_bytes, "--max-body-bytes", 1024, (int64_t)1 << 32, "BYTES",
          "request body limit, 413 above it",
          "Largest accepted request body in bytes; a larger body gets HTTP 413."),
    INT(context_length, "--context-length", 0, 1 << 24, "N", "context length, 0 = the model's",
        "Context length in tokens (prompt + completion); 0 = the model's own "
        "(llama.context_length)."),
    INT(max_running_seqs, "--max-running-seqs", 1, 4096, "N", "sequences decoded together",
        "Sequences decoded together in one engine step."),
    INT(max_batch_tokens, "--max-batch-tokens", 16, 1 << 20, "N",
        "tokens in one engine step (prefill chunk budget)",
        "Tokens processed in one engine step: every running sequence's decode token plus "
        "prompt chunks (chunked prefill). Must be at least max_running_seqs."),
    INT(drain_timeout_s, "--drain-timeout", 0, 3600, "S",
        "on SIGTERM, seconds to let requests finish",
        "On SIGINT/SIGTERM the server stops accepting and lets the requests in flight finish "
        "for up to this many seconds, then cancels the rest and exits. Keep a Kubernetes "
        "pod's terminationGracePeriodSeconds (and systemd's TimeoutStopSec) above it."),
    INT(max_waiting, "--max-waiting", 0, 1 << 20, "N", "queued requests before 429",
        "Requests queued behind the running ones before new ones get HTTP 429 with "
        "Retry-After."),
    INT(default_max_tokens, "--default-max-tokens", 1, 1 << 24, "N",
        "max_tokens when a request omits it",
        "max_tokens of a completion request that does not set it (16, as OpenAI's "
        "completions API)."),
    INT(connection_timeout_s, "--connection-timeout", 1, 86400, "S",
        "idle connection timeout in seconds", "Seconds an idle HTTP connection is kept open."),
    INT(max_connections, "--max-connections", 1, 1 << 20, "N", "concurrent connection limit",
        "Concurrent HTTP connections; above it new connections are refused."),
    BOOL(log_requests, "--log-requests", "one log line per request",
         "Log one line per finished request to stderr."),
    INT(request_timeout_s, "--request-timeout-s", 0, 86400, "S",
        "per-request deadline in seconds (0 = none)",
        "Seconds a request may take from arrival to its last token, 0..86400. Past it the "
        "engine stops the request and frees its blocks at the next step; the client gets 504 "
        "(code 'timeout'), or an error event on a stream. 0 = no deadline. Default 0."),
    STR(cors_origins, "--cors-origins", "ORIGINS",
        "CORS: \"*\" or comma-separated origins (\"\" = off)",
        "Cross-origin requests from browsers: \"*\" allows any origin, a comma-separated list "
        "allows those origins (the matching one is echoed), \"\" sends no CORS headers. "
        "Preflight OPTIONS requests are answered with 204. Default \"\"."),
    STR(tls_cert_file, "--tls-cert-file", "PATH", "PEM certificate: serve HTTPS",
        "PEM certificate (chain) file; together with tls_key_file the server speaks HTTPS "
        "(libmicrohttpd with GnuTLS). Both empty: plain HTTP. Default \"\"."),
    STR(tls_key_file, "--tls-key-file", "PATH", "PEM private key for --tls-cert-file",
        "PEM private key of tls_cert_file. Default \"\"."),
    INT(max_header_bytes, "--max-header-bytes", 4096, 1 << 24, "N",
        "per-connection memory for headers (431 past it)",
        "Memory per connection for the request line and headers, 4096..16777216 bytes; a "
        "request whose headers do not fit gets 431. Default 32768."),
    JSONSTR(attention, "--attention", "JSON",
            "attention policy defaults, allowed fields, bounds (a JSON object)",
            "Per-request attention policies (README 'Attention policies'): a JSON object with "
            "'default' (the request object's shape: prefill dense|flex|power|auto, flex{gamma, "
            "tau, min_budget, max_budget, block_size}, power{window_blocks, block_size, "
            "dense_layers}, kv_cache fp|int8|int4|zip, zip{salient_fraction, high_bits, low_bits, "
            "flush_tokens}), 'allow' (fields requests may set, e.g. [\"prefill\", "
            "\"flex.gamma\"]; \"*\" for all), 'bounds' ({\"flex.gamma\": [0.8, 1.0]}), "
            "'kv_cache_formats' (the KV formats requests may choose; all by default) and "
            "'auto_min_prompt_tokens' (default 4096). Empty: dense by default, every field "
            "allowed within the kernels' limits. In a config file the object may be given "
            "directly; flags and SIEVE_ATTENTION take its JSON text."),
    STR(chat_template, "--chat-template", "NAME",
        "plain, chatml, llama2, llama3, mistral, gemma, phi3, zephyr",
        "Chat template family for /v1/chat/completions: plain, chatml, llama2, llama3, "
        "mistral, gemma, phi3 or zephyr. Empty: detected from the model's "
        "tokenizer.chat_template; a model without one (stories260K) uses plain ('role: "
        "content' lines, then 'assistant:')."),
    INT64(kv_cache_bytes, "--kv-cache-bytes", 0, (int64_t)1 << 46, "BYTES",
          "KV cache budget in bytes, 0 = auto",
          "Memory for the paged KV cache in bytes, allocated once at start-up; it decides how "
          "many blocks exist. 0 = enough for max_running_seqs full contexts, capped at a "
          "quarter of the available memory. Must hold at least one full context."),
    INT(kv_block_size, "--kv-block-size", 1, 4096, "N", "tokens per KV block",
        "Tokens per KV block (the unit of allocation, sharing and prefix caching)."),
    BOOL(prefix_caching, "--prefix-caching", "reuse KV of identical prompt prefixes",
         "Reuse the KV blocks of identical prompt prefixes across requests (full blocks, keyed "
         "by a hash chain of their tokens, evicted least recently used)."),
    {.name = "api_keys",
     .flag = "--api-keys",
     .kind = K_STRLIST,
     .off = offsetof(cfg_config, api_keys),
     .cap = CFG_API_KEY_LEN,
     .min = 0,
     .max = CFG_API_KEYS_MAX,
     .count_off = offsetof(cfg_config, n_api_keys),
     .arg = "KEY,...",
     .help = "API keys (prefer SIEVE_API_KEYS or --api-key-file)",
     .doc = "API keys. When any key is set (here or through api_key_file), every API request "
            "must carry 'Authorization: Bearer KEY' with one of them, or gets HTTP 401. In a "
            "file: an array of strings; in SIEVE_API_KEYS and --api-keys: the keys separated "
            "by commas. A key is 1 to 255 visible ASCII characters other than ','. Prefer "
            "api_key_file or the environment to the command line, which other local users "
            "can read. Empty: no authentication."},
    STR(api_key_file, "--api-key-file", "PATH", "file of API keys, one per line",
        "File of API keys, one per line, added to api_keys (blank lines and lines starting "
        "with '#' are skipped; surrounding spaces are trimmed). Read once at start-up; a "
        "missing file, a bad line or a file without any key is an error."),
};
#define N_KEYS (sizeof(keys) / sizeof(keys[0]))

/* SIEVE_* variables that are not keys but are not typos either. */
static const char *const env_not_keys[] = {"SIEVE_CONFIG", "SIEVE_SHARED_DIR"};

/* Flags that are not keys, for the typo suggestion. */
static const char *const meta_flags[] = {"--config", "--check-config", "--config-schema", "--help",
                                         "--version"};

void cfg_defaults(cfg_config *c)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->model, sizeof(c->model), "%s", SIEVE_DEFAULT_MODEL);
    snprintf(c->host, sizeof(c->host), "127.0.0.1");
    c->port = 8080;
    c->threads = 0;
    snprintf(c->device, sizeof(c->device), "auto");
    snprintf(c->devices, sizeof(c->devices), "auto");
    c->tensor_parallel_size = 1;
    c->cuda_graphs = true;
    c->max_body_bytes = 8 << 20;
    c->context_length = 0;
    c->max_running_seqs = 16;
    c->max_batch_tokens = 512;
    c->drain_timeout_s = 30;
    c->max_waiting = 256;
    c->default_max_tokens = 16;
    c->connection_timeout_s = 600;
    c->max_connections = 1024;
    c->log_requests = false;
    c->kv_cache_bytes = 0;
    c->kv_block_size = 16;
    c->prefix_caching = true;
    c->max_header_bytes = 32768;
    c->n_api_keys = 0;
    c->api_key_file[0] = '\0';
}

/* ---- names and suggestions ---- */

static size_t levenshtein(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63)
        return 64;
    size_t row[64];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
            size_t best = diag + cost;
            if (row[j] + 1 < best)
                best = row[j] + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

/* Only close matches are suggested: a distance under 4 edits. */
#define SUGGEST_BELOW 4

static const key_def *find_key(const char *name)
{
    for (size_t i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].name, name) == 0)
            return &keys[i];
    return NULL;
}

static const char *nearest_key(const char *name)
{
    const char *best = NULL;
    size_t best_d = SUGGEST_BELOW;
    for (size_t i = 0; i < N_KEYS; i++) {
        size_t d = levenshtein(name, keys[i].name);
        if (d < best_d) {
            best_d = d;
            best = keys[i].name;
        }
    }
    return best;
}

static const char *nearest_flag(const char *flag)
{
    const char *best = NULL;
    size_t best_d = SUGGEST_BELOW;
    for (size_t i = 0; i < N_KEYS + sizeof(meta_flags) / sizeof(meta_flags[0]); i++) {
        const char *f = i < N_KEYS ? keys[i].flag : meta_flags[i - N_KEYS];
        size_t d = levenshtein(flag, f);
        if (d < best_d) {
            best_d = d;
            best = f;
        }
    }
    return best;
}

/* "SIEVE_" + the key in upper case. */
static void env_name(const key_def *k, char *out, size_t n)
{
    size_t j = (size_t)snprintf(out, n, "SIEVE_");
    for (const char *p = k->name; *p && j + 1 < n; p++)
        out[j++] = (*p >= 'a' && *p <= 'z') ? (char)(*p - 'a' + 'A') : *p;
    out[j < n ? j : n - 1] = '\0';
}

/* ---- setting values ---- */

static const char *kind_name(key_kind kind)
{
    switch (kind) {
    case K_STR:
        return "string";
    case K_INT:
    case K_INT64:
        return "integer";
    case K_BOOL:
        return "boolean";
    case K_STRLIST:
        return "array of strings";
    }
    return "?";
}

/* label names the source in messages: "config key 'port'", "--port",
 * "environment variable SIEVE_PORT". */
static int set_int(cfg_config *c, const key_def *k, int64_t v, const char *label, char *err,
                   size_t errlen)
{
    if (v < k->min || v > k->max) {
        if (strncmp(label, "config key", 10) == 0)
            snprintf(err, errlen, "%s: %lld is out of range [%lld, %lld]", label, (long long)v,
                     (long long)k->min, (long long)k->max);
        else
            snprintf(err, errlen, "%s: %lld is out of range [%lld, %lld] (config key '%s')", label,
                     (long long)v, (long long)k->min, (long long)k->max, k->name);
        return -1;
    }
    char *p = (char *)c + k->off;
    if (k->kind == K_INT)
        *(int *)p = (int)v;
    else
        *(int64_t *)p = v;
    return 0;
}

static bool is_blank(char ch);

/* Parses "auto" (-1) or comma-separated indices 0..63 ("" is none) into
 * ids[0..cap); the count, or -2 with why set when the text is malformed. */
static int parse_int_list(const char *s, int *ids, int cap, const char **why)
{
    while (is_blank(*s))
        s++;
    if (strcmp(s, "auto") == 0)
        return -1;
    int n = 0;
    while (*s) {
        while (is_blank(*s))
            s++;
        if (*s < '0' || *s > '9') {
            *why = "expected \"auto\" or comma-separated device indices such as \"0,1\"";
            return -2;
        }
        long v = 0;
        while (*s >= '0' && *s <= '9' && v <= 63)
            v = v * 10 + (*s++ - '0');
        if (v > 63) {
            *why = "a device index is larger than 63";
            return -2;
        }
        while (is_blank(*s))
            s++;
        if (*s == ',')
            s++;
        else if (*s) {
            *why = "expected \"auto\" or comma-separated device indices such as \"0,1\"";
            return -2;
        }
        for (int j = 0; j < n && j < cap; j++)
            if (ids[j] == (int)v) {
                *why = "a device index is listed twice";
                return -2;
            }
        if (n >= cap) {
            *why = "more than 16 device indices";
            return -2;
        }
        ids[n++] = (int)v;
    }
    return n;
}

static int set_str(cfg_config *c, const key_def *k, const char *s, const char *label, char *err,
                   size_t errlen)
{
    if (strlen(s) >= k->cap) {
        snprintf(err, errlen, "%s: value longer than %zu bytes", label, k->cap - 1);
        return -1;
    }
    const char *why = NULL;
    int ids[CFG_DEVICES_MAX];
    if (k->int_list && parse_int_list(s, ids, CFG_DEVICES_MAX, &why) == -2) {
        snprintf(err, errlen, "%s: %s, got '%s'", label, why, s);
        return -1;
    }
    memcpy((char *)c + k->off, s, strlen(s) + 1);
    return 0;
}

/* Why an API key is unusable, or NULL when it is fine. */
static const char *api_key_problem(const char *s, size_t len)
{
    if (len == 0)
        return "an API key must not be empty";
    if (len >= CFG_API_KEY_LEN)
        return "an API key is longer than 255 bytes";
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= 0x20 || ch >= 0x7f || ch == ',')
            return "an API key may hold only visible ASCII characters other than ','";
    }
    return NULL;
}

static char *list_item(cfg_config *c, const key_def *k, int i)
{
    return (char *)c + k->off + (size_t)i * k->cap;
}

static int *list_count(cfg_config *c, const key_def *k)
{
    return (int *)((char *)c + k->count_off);
}

/* Appends one item (len bytes of s) to a K_STRLIST key. */
static int list_append(cfg_config *c, const key_def *k, const char *s, size_t len,
                       const char *label, char *err, size_t errlen)
{
    const char *why = api_key_problem(s, len);
    if (why) {
        snprintf(err, errlen, "%s: %s", label, why);
        return -1;
    }
    int *n = list_count(c, k);
    if (*n >= k->max) {
        snprintf(err, errlen, "%s: more than %lld items", label, (long long)k->max);
        return -1;
    }
    char *dst = list_item(c, k, (*n)++);
    memcpy(dst, s, len);
    dst[len] = '\0';
    return 0;
}

static int apply_json_value(cfg_config *c, const key_def *k, json_t *v, char *err, size_t errlen)
{
    char label[96];
    snprintf(label, sizeof(label), "config key '%s'", k->name);
    switch (k->kind) {
    case K_STR:
        if (k->json_object && json_is_object(v)) {
            char *text = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS);
            if (!text) {
                snprintf(err, errlen, "%s: out of memory", label);
                return -1;
            }
            int rc = set_str(c, k, text, label, err, errlen);
            free(text);
            return rc;
        }
        if (k->int_list && json_is_array(v)) {
            char text[256] = "";
            size_t i, len = 0;
            json_t *item;
            json_array_foreach(v, i, item)
            {
                if (!json_is_integer(item) || json_integer_value(item) < 0 ||
                    json_integer_value(item) > 63) {
                    snprintf(err, errlen, "%s[%zu]: expected a device index 0..63", label, i);
                    return -1;
                }
                if (len + 8 < sizeof(text))
                    len += (size_t)snprintf(text + len, sizeof(text) - len, "%s%d", i ? "," : "",
                                            (int)json_integer_value(item));
            }
            return set_str(c, k, text, label, err, errlen);
        }
        if (!json_is_string(v))
            break;
        return set_str(c, k, json_string_value(v), label, err, errlen);
    case K_INT:
    case K_INT64:
        if (!json_is_integer(v))
            break;
        return set_int(c, k, json_integer_value(v), label, err, errlen);
    case K_BOOL:
        if (!json_is_boolean(v))
            break;
        *(bool *)((char *)c + k->off) = json_is_true(v);
        return 0;
    case K_STRLIST: {
        if (!json_is_array(v))
            break;
        size_t i;
        json_t *item;
        json_array_foreach(v, i, item)
        {
            if (!json_is_string(item))
                break;
        }
        if (i < json_array_size(v))
            break;
        cfg_config tmp = *c; /* all or nothing */
        *list_count(&tmp, k) = 0;
        json_array_foreach(v, i, item)
        {
            char item_label[128];
            snprintf(item_label, sizeof(item_label), "%s[%zu]", label, i);
            if (list_append(&tmp, k, json_string_value(item), json_string_length(item), item_label,
                            err, errlen) != 0)
                return -1;
        }
        *c = tmp;
        return 0;
    }
    }
    static const char *expected[] = {"a string", "an integer", "an integer", "a boolean",
                                     "an array of strings"};
    snprintf(err, errlen, "%s: expected %s", label,
             k->int_list ? "an array of device indices or a string" : expected[k->kind]);
    return -1;
}

static bool is_blank(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* A value from the environment or the command line. */
static int apply_text(cfg_config *c, const key_def *k, const char *val, const char *label,
                      char *err, size_t errlen)
{
    switch (k->kind) {
    case K_STR:
        return set_str(c, k, val, label, err, errlen);
    case K_BOOL:
        if (strcmp(val, "true") == 0 || strcmp(val, "1") == 0)
            *(bool *)((char *)c + k->off) = true;
        else if (strcmp(val, "false") == 0 || strcmp(val, "0") == 0)
            *(bool *)((char *)c + k->off) = false;
        else {
            snprintf(err, errlen, "%s: expected true or false, got '%s'", label, val);
            return -1;
        }
        return 0;
    case K_INT:
    case K_INT64: {
        char *end;
        errno = 0;
        long long v = strtoll(val, &end, 10);
        if (end == val || *end) {
            snprintf(err, errlen, "%s: expected an integer, got '%s'", label, val);
            return -1;
        }
        if (errno == ERANGE) {
            snprintf(err, errlen, "%s: %s is out of range [%lld, %lld] (config key '%s')", label,
                     val, (long long)k->min, (long long)k->max, k->name);
            return -1;
        }
        return set_int(c, k, v, label, err, errlen);
    }
    case K_STRLIST: {
        /* Comma-separated, white space around each item trimmed (a secret mounted
         * from a file often ends in a newline); "" is an empty list. */
        cfg_config tmp = *c;
        *list_count(&tmp, k) = 0;
        const char *p = val;
        while (is_blank(*p))
            p++;
        if (*p == '\0') {
            *c = tmp;
            return 0;
        }
        for (;;) {
            const char *comma = strchr(p, ',');
            const char *e = comma ? comma : p + strlen(p);
            while (p < e && is_blank(*p))
                p++;
            const char *q = e;
            while (q > p && is_blank(q[-1]))
                q--;
            if (list_append(&tmp, k, p, (size_t)(q - p), label, err, errlen) != 0)
                return -1;
            if (!comma)
                break;
            p = comma + 1;
        }
        *c = tmp;
        return 0;
    }
    }
    return -1;
}

/* ---- files ---- */

int cfg_load_json(cfg_config *c, const char *text, size_t len, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        snprintf(err, errlen, "config: invalid JSON at line %d column %d: %s", jerr.line,
                 jerr.column, jerr.text);
        return -1;
    }
    if (!json_is_object(root)) {
        snprintf(err, errlen, "config: the top level must be a JSON object");
        json_decref(root);
        return -1;
    }
    const char *name;
    json_t *v;
    int rc = 0;
    json_object_foreach(root, name, v)
    {
        if (name[0] == '_') /* "_comment" style keys are documentation */
            continue;
        const key_def *k = find_key(name);
        if (!k) {
            const char *near = nearest_key(name);
            if (near)
                snprintf(err, errlen, "config: unknown key '%s' (did you mean '%s'?)", name, near);
            else
                snprintf(err, errlen, "config: unknown key '%s'", name);
            rc = -1;
            break;
        }
        if ((rc = apply_json_value(c, k, v, err, errlen)) != 0)
            break;
    }
    json_decref(root);
    return rc;
}

/* Reads a whole file of at most max bytes; *out is NUL-terminated, caller frees. */
static int read_file(const char *path, size_t max, char **out, size_t *outlen, char *err,
                     size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open '%s': %s", path, strerror(errno));
        return -1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 1 >= cap) {
            if (cap > max) {
                snprintf(err, errlen, "'%s' is larger than %zu bytes", path, max);
                free(buf);
                fclose(f);
                return -1;
            }
            cap = cap ? cap * 2 : 4096;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                snprintf(err, errlen, "out of memory reading '%s'", path);
                return -1;
            }
            buf = nb;
        }
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        if (got == 0)
            break;
        len += got;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        snprintf(err, errlen, "cannot read '%s'", path);
        free(buf);
        return -1;
    }
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return 0;
}

int cfg_load_file(cfg_config *c, const char *path, char *err, size_t errlen)
{
    char *buf;
    size_t len;
    char inner[768];
    if (read_file(path, (size_t)1 << 24, &buf, &len, inner, sizeof(inner)) != 0) {
        snprintf(err, errlen, "config: %s", inner);
        return -1;
    }
    int rc = cfg_load_json(c, buf, len, inner, sizeof(inner));
    if (rc != 0)
        snprintf(err, errlen, "%s: %s", path, inner);
    free(buf);
    return rc;
}

int cfg_load_api_key_file(cfg_config *c, char *err, size_t errlen)
{
    if (!c->api_key_file[0])
        return 0;
    const key_def *k = find_key("api_keys");
    char *buf;
    size_t len;
    char inner[768];
    if (read_file(c->api_key_file, (size_t)1 << 20, &buf, &len, inner, sizeof(inner)) != 0) {
        snprintf(err, errlen, "config key 'api_key_file': %s", inner);
        return -1;
    }
    int found = 0, line = 0, rc = 0;
    for (char *p = buf; *p && rc == 0;) {
        char *nl = strchr(p, '\n');
        char *e = nl ? nl : p + strlen(p);
        char *next = nl ? nl + 1 : e;
        line++;
        while (p < e && is_blank(*p))
            p++;
        while (e > p && is_blank(e[-1]))
            e--;
        if (p < e && *p != '#') {
            char label[CFG_PATH_MAX + 64];
            snprintf(label, sizeof(label), "api_key_file %s:%d", c->api_key_file, line);
            rc = list_append(c, k, p, (size_t)(e - p), label, err, errlen);
            found++;
        }
        p = next;
    }
    free(buf);
    if (rc == 0 && found == 0) {
        snprintf(err, errlen, "config key 'api_key_file': '%s' holds no key", c->api_key_file);
        rc = -1;
    }
    return rc;
}

/* ---- environment ---- */

extern char **environ;

static bool env_is_key(const char *var, size_t len)
{
    char name[96];
    for (size_t i = 0; i < N_KEYS; i++) {
        env_name(&keys[i], name, sizeof(name));
        if (strlen(name) == len && strncmp(name, var, len) == 0)
            return true;
    }
    for (size_t i = 0; i < sizeof(env_not_keys) / sizeof(env_not_keys[0]); i++)
        if (strlen(env_not_keys[i]) == len && strncmp(env_not_keys[i], var, len) == 0)
            return true;
    return false;
}

static void warn_unknown_env(FILE *warn)
{
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, "SIEVE_", 6) != 0)
            continue;
        const char *eq = strchr(*e, '=');
        size_t len = eq ? (size_t)(eq - *e) : strlen(*e);
        if (env_is_key(*e, len))
            continue;
        /* The suggestion compares the rest, lower-cased, with the key names. */
        char rest[64];
        size_t n = 0;
        for (size_t i = 6; i < len && n + 1 < sizeof(rest); i++)
            rest[n++] = ((*e)[i] >= 'A' && (*e)[i] <= 'Z') ? (char)((*e)[i] - 'A' + 'a') : (*e)[i];
        rest[n] = '\0';
        const char *near = nearest_key(rest);
        if (near) {
            char sugg[96];
            env_name(find_key(near), sugg, sizeof(sugg));
            fprintf(warn,
                    "sieve: warning: unknown environment variable %.*s ignored (did you mean "
                    "%s?)\n",
                    (int)len, *e, sugg);
        } else {
            fprintf(warn, "sieve: warning: unknown environment variable %.*s ignored\n", (int)len,
                    *e);
        }
    }
}

int cfg_load_env(cfg_config *c, FILE *warn, char *err, size_t errlen)
{
    if (warn) /* first, so that a typo is reported even when another variable fails */
        warn_unknown_env(warn);
    for (size_t i = 0; i < N_KEYS; i++) {
        char name[96];
        env_name(&keys[i], name, sizeof(name));
        const char *val = getenv(name);
        if (!val || !*val)
            continue;
        char label[128];
        snprintf(label, sizeof(label), "environment variable %s", name);
        if (apply_text(c, &keys[i], val, label, err, errlen) != 0)
            return -1;
    }
    return 0;
}

/* ---- JSON views: effective values and the schema ---- */

static json_t *value_json(const cfg_config *c, const key_def *k, bool redact)
{
    const char *p = (const char *)c + k->off;
    switch (k->kind) {
    case K_STR:
        return json_string(p);
    case K_INT:
        return json_integer(*(const int *)p);
    case K_INT64:
        return json_integer(*(const int64_t *)p);
    case K_BOOL:
        return json_boolean(*(const bool *)p);
    case K_STRLIST: {
        int n = *(const int *)((const char *)c + k->count_off);
        if (redact && n > 0) /* a string, so that the output never loads back as keys */
            return json_sprintf("<%d redacted>", n);
        json_t *a = json_array();
        for (int i = 0; i < n; i++)
            json_array_append_new(a, json_string(p + (size_t)i * k->cap));
        return a;
    }
    }
    return json_null();
}

char *cfg_to_json(const cfg_config *c)
{
    json_t *o = json_object();
    for (size_t i = 0; i < N_KEYS; i++)
        json_object_set_new(o, keys[i].name, value_json(c, &keys[i], true));
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(o);
    return s;
}

char *cfg_schema_json(void)
{
    cfg_config d;
    cfg_defaults(&d);
    json_t *a = json_array();
    for (size_t i = 0; i < N_KEYS; i++) {
        const key_def *k = &keys[i];
        char env[96];
        env_name(k, env, sizeof(env));
        json_t *o = json_object();
        json_object_set_new(o, "key", json_string(k->name));
        json_object_set_new(
            o, "type",
            json_string(k->int_list ? "array of integers or string" : kind_name(k->kind)));
        json_object_set_new(o, "default", value_json(&d, k, false));
        if (k->kind == K_INT || k->kind == K_INT64) {
            json_object_set_new(o, "min", json_integer(k->min));
            json_object_set_new(o, "max", json_integer(k->max));
        } else if (k->kind == K_STRLIST) {
            json_object_set_new(o, "max_items", json_integer(k->max));
        } else if (k->kind == K_STR) {
            json_object_set_new(o, "max_bytes", json_integer((json_int_t)k->cap - 1));
        }
        json_object_set_new(o, "flag", json_string(k->flag));
        json_object_set_new(o, "arg", json_string(k->arg));
        json_object_set_new(o, "env", json_string(env));
        json_object_set_new(o, "help", json_string(k->help));
        json_object_set_new(o, "doc", json_string(k->doc));
        json_array_append_new(a, o);
    }
    char *s = json_dumps(a, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(a);
    return s;
}

/* ---- the command line ---- */

static void usage_line(char *buf, size_t cap, size_t *len, const char *left, const char *right)
{
    if (*len >= cap)
        return;
    int n = right[0] ? snprintf(buf + *len, cap - *len, "  %-26s %s\n", left, right)
                     : snprintf(buf + *len, cap - *len, "  %s\n", left);
    if (n > 0)
        *len += (size_t)n;
}

const char *cfg_usage(void)
{
    static char buf[8192];
    if (buf[0])
        return buf;
    size_t len = 0;
    len += (size_t)snprintf(
        buf, sizeof(buf),
        "usage: sieve [--config FILE] [options]\n"
        "       sieve --check-config FILE [options]\n"
        "\n"
        "OpenAI-compatible LLM inference server.\n"
        "\n"
        "Every option is also a configuration key (--max-body-bytes is max_body_bytes) and an\n"
        "environment variable (SIEVE_MAX_BODY_BYTES). Precedence, lowest first: built-in\n"
        "defaults < --config FILE < SIEVE_* environment variables < options. docs/config.md\n"
        "describes every key.\n"
        "\n");
    usage_line(buf, sizeof(buf), &len, "--config FILE",
               "JSON configuration; repeatable, later files win (default $SIEVE_CONFIG)");
    usage_line(buf, sizeof(buf), &len, "--check-config FILE",
               "validate (file, environment, options) without serving: print the");
    usage_line(buf, sizeof(buf), &len, "",
               "effective values as JSON and exit 0, or the error and exit 2");
    usage_line(buf, sizeof(buf), &len, "--config-schema",
               "print every key (type, default, range, flag, variable) as JSON");
    cfg_config d;
    cfg_defaults(&d);
    for (size_t i = 0; i < N_KEYS && len < sizeof(buf); i++) {
        const key_def *k = &keys[i];
        char left[64], right[CFG_PATH_MAX + 160];
        snprintf(left, sizeof(left), "%s %s", k->flag, k->arg);
        json_t *v = value_json(&d, k, false);
        bool show = !(json_is_string(v) && json_string_length(v) == 0) && !json_is_array(v);
        char *dv = show ? json_dumps(v, JSON_ENCODE_ANY) : NULL;
        if (dv && json_is_string(v)) { /* without the quotes */
            snprintf(right, sizeof(right), "%s (default %s)", k->help, json_string_value(v));
        } else if (dv) {
            snprintf(right, sizeof(right), "%s (default %s)", k->help, dv);
        } else {
            snprintf(right, sizeof(right), "%s", k->help);
        }
        free(dv);
        json_decref(v);
        usage_line(buf, sizeof(buf), &len, left, right);
    }
    usage_line(buf, sizeof(buf), &len, "--help, --version", "");
    return buf;
}

/* Returns the value of a --name VALUE or --name=VALUE argument at argv[*i]
 * (advancing *i past a separate value), NULL when argv[*i] is not that
 * option, and sets *missing when the value is absent. */
static const char *option_value(int argc, char **argv, int *i, const char *name, bool *missing)
{
    const char *a = argv[*i];
    size_t n = strlen(name);
    if (strncmp(a, name, n) != 0)
        return NULL;
    if (a[n] == '=')
        return a + n + 1;
    if (a[n] != '\0')
        return NULL;
    if (*i + 1 >= argc) {
        *missing = true;
        return NULL;
    }
    return argv[++*i];
}

static int print_check_result(const cfg_config *c, const char *files, char *err, size_t errlen)
{
    char *json = cfg_to_json(c);
    if (!json) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    fprintf(stderr, "sieve: config OK (%s)\n", files);
    if (access(c->model, R_OK) != 0)
        fprintf(stderr, "sieve: note: the model '%s' is not readable here (%s)\n", c->model,
                strerror(errno));
    printf("%s\n", json);
    fflush(stdout);
    free(json);
    return 1;
}

int cfg_parse_args(cfg_config *c, int argc, char **argv, char *err, size_t errlen)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(cfg_usage(), stdout);
            return 1;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("sieve %s\n", SIEVE_VERSION);
            return 1;
        }
        if (strcmp(argv[i], "--config-schema") == 0) {
            char *s = cfg_schema_json();
            if (!s) {
                snprintf(err, errlen, "out of memory");
                return -1;
            }
            printf("%s\n", s);
            free(s);
            return 1;
        }
    }
    /* Files first, in command-line order, so that the environment and the
     * flags override them whatever the order of the arguments. */
    bool check = false, any_file = false;
    char files[1024] = "";
    for (int i = 1; i < argc; i++) {
        bool missing = false;
        const char *name = "--config";
        const char *path = option_value(argc, argv, &i, name, &missing);
        if (!path && !missing) {
            name = "--check-config";
            path = option_value(argc, argv, &i, name, &missing);
            if (path || missing)
                check = true;
        }
        if (missing) {
            snprintf(err, errlen, "%s needs a file name", name);
            return -1;
        }
        if (!path)
            continue;
        if (cfg_load_file(c, path, err, errlen) != 0)
            return -1;
        size_t fl = strlen(files);
        snprintf(files + fl, sizeof(files) - fl, "%s%s", any_file ? ", " : "", path);
        any_file = true;
    }
    const char *env_file = getenv("SIEVE_CONFIG");
    if (!any_file && env_file && *env_file) {
        if (cfg_load_file(c, env_file, err, errlen) != 0)
            return -1;
        snprintf(files, sizeof(files), "%s", env_file);
        any_file = true;
    }
    if (!any_file)
        snprintf(files, sizeof(files), "no file");
    if (cfg_load_env(c, stderr, err, errlen) != 0)
        return -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool missing = false;
        if (option_value(argc, argv, &i, "--config", &missing) ||
            option_value(argc, argv, &i, "--check-config", &missing))
            continue;
        if (strncmp(a, "--", 2) != 0) {
            size_t la = strlen(a);
            if (la > 5 && strcmp(a + la - 5, ".gguf") == 0)
                snprintf(err, errlen, "unexpected argument '%s' (did you mean --model %s?)", a, a);
            else
                snprintf(err, errlen, "unexpected argument '%s' (options start with --)", a);
            return -1;
        }
        const char *eq = strchr(a, '=');
        size_t name_len = eq ? (size_t)(eq - a) : strlen(a);
        const key_def *k = NULL;
        for (size_t j = 0; j < N_KEYS; j++)
            if (strlen(keys[j].flag) == name_len && strncmp(keys[j].flag, a, name_len) == 0)
                k = &keys[j];
        if (!k) {
            char flag[128];
            snprintf(flag, sizeof(flag), "%.*s", (int)name_len, a);
            const char *near = nearest_flag(flag);
            if (near)
                snprintf(err, errlen, "unknown option '%s' (did you mean %s?)", flag, near);
            else
                snprintf(err, errlen, "unknown option '%s' (see --help)", flag);
            return -1;
        }
        const char *val = eq ? eq + 1 : NULL;
        if (!val) {
            if (i + 1 >= argc) {
                snprintf(err, errlen, "%s needs a value", k->flag);
                return -1;
            }
            val = argv[++i];
        }
        if (apply_text(c, k, val, k->flag, err, errlen) != 0)
            return -1;
    }
    if (cfg_validate(c, err, errlen) != 0)
        return -1;
    if (cfg_load_api_key_file(c, err, errlen) != 0)
        return -1;
    if (check)
        return print_check_result(c, files, err, errlen);
    return 0;
}

int cfg_validate(const cfg_config *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < N_KEYS; i++) {
        const key_def *k = &keys[i];
        const char *p = (const char *)c + k->off;
        if (k->kind == K_STRLIST) {
            int n = *(const int *)((const char *)c + k->count_off);
            if (n < 0 || n > k->max) {
                snprintf(err, errlen, "config key '%s': %d items, at most %lld", k->name, n,
                         (long long)k->max);
                return -1;
            }
            for (int j = 0; j < n; j++) {
                const char *s = p + (size_t)j * k->cap;
                const char *why = api_key_problem(s, strnlen(s, k->cap));
                if (why) {
                    snprintf(err, errlen, "config key '%s'[%d]: %s", k->name, j, why);
                    return -1;
                }
            }
            continue;
        }
        if (k->kind != K_INT && k->kind != K_INT64)
            continue;
        int64_t v = k->kind == K_INT ? *(const int *)p : *(const int64_t *)p;
        if (v < k->min || v > k->max) {
            snprintf(err, errlen, "config key '%s': %lld is out of range [%lld, %lld]", k->name,
                     (long long)v, (long long)k->min, (long long)k->max);
            return -1;
        }
    }
    if (c->max_batch_tokens < c->max_running_seqs) {
        snprintf(err, errlen,
                 "config key 'max_batch_tokens': %d is less than max_running_seqs (%d); every "
                 "running sequence needs a token in each step",
                 c->max_batch_tokens, c->max_running_seqs);
        return -1;
    }
    if (!c->tls_cert_file[0] != !c->tls_key_file[0]) {
        snprintf(err, errlen,
                 "config keys 'tls_cert_file' and 'tls_key_file': set both (HTTPS) "
                 "or neither (HTTP)");
        return -1;
    }
    if (!c->model[0]) {
        snprintf(err, errlen, "config key 'model': a model path is required");
        return -1;
    }
    if (!c->host[0]) {
        snprintf(err, errlen, "config key 'host': must not be empty");
        return -1;
    }
    if (strcmp(c->device, "auto") != 0 && strcmp(c->device, "cpu") != 0 &&
        strcmp(c->device, "cuda") != 0) {
        snprintf(err, errlen, "config key 'device': '%s' is not one of auto, cpu, cuda", c->device);
        return -1;
    }
    int ids[CFG_DEVICES_MAX];
    const char *why = NULL;
    if (parse_int_list(c->devices, ids, CFG_DEVICES_MAX, &why) == -2) {
        snprintf(err, errlen, "config key 'devices': %s, got '%s'", why, c->devices);
        return -1;
    }
    return 0;
}

int cfg_devices(const cfg_config *c, int *ids, int cap)
{
    const char *why = NULL;
    int tmp[CFG_DEVICES_MAX];
    const int n = parse_int_list(c->devices, tmp, CFG_DEVICES_MAX, &why);
    if (n < 0)
        return n == -1 ? -1 : 0;
    for (int i = 0; i < n && i < cap; i++)
        ids[i] = tmp[i];
    return n < cap ? n : cap;
}
