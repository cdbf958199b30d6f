/*
 * config.c - defaults, JSON file loading, command-line flags and validation.
 *
 * One table describes every key (name, type, where it lives, its range), so the
 * JSON loader, the flag parser, validation and the typo suggestion all agree.
 */
#include "config/config.h"

#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef SIEVE_DEFAULT_MODEL
#define SIEVE_DEFAULT_MODEL "../shared/models/stories260K.gguf"
#endif
#ifndef SIEVE_VERSION
#define SIEVE_VERSION "0.0.0"
#endif

typedef enum { K_STR, K_INT, K_INT64, K_BOOL } key_kind;

typedef struct {
    const char *name; /* JSON key */
    const char *flag; /* long command-line flag, or NULL */
    key_kind kind;
    size_t off;
    size_t cap; /* K_STR buffer size */
    int64_t min, max;
} key_def;

#define STR(field, flag)                                                                           \
    { #field, flag, K_STR, offsetof(cfg_config, field), sizeof(((cfg_config *)0)->field), 0, 0 }
#define INT(field, flag, lo, hi) {#field, flag, K_INT, offsetof(cfg_config, field), 0, lo, hi}
#define INT64(field, flag, lo, hi) {#field, flag, K_INT64, offsetof(cfg_config, field), 0, lo, hi}
#define BOOL(field, flag) {#field, flag, K_BOOL, offsetof(cfg_config, field), 0, 0, 1}

static const key_def keys[] = {
    STR(model, "--model"),
    STR(model_name, "--model-name"),
    STR(host, "--host"),
    INT(port, "--port", 0, 65535),
    INT(threads, "--threads", 0, 1024),
    INT64(max_body_bytes, "--max-body-bytes", 1024, (int64_t)1 << 32),
    INT(context_length, "--context-length", 0, 1 << 24),
    INT(max_running_seqs, "--max-running-seqs", 1, 4096),
    INT(max_batch_tokens, "--max-batch-tokens", 16, 1 << 20),
    INT(drain_timeout_s, "--drain-timeout", 0, 3600),
    INT(max_waiting, "--max-waiting", 0, 1 << 20),
    INT(default_max_tokens, "--default-max-tokens", 1, 1 << 24),
    INT(connection_timeout_s, "--connection-timeout", 1, 86400),
    INT(max_connections, "--max-connections", 1, 1 << 20),
    BOOL(log_requests, "--log-requests"),
    STR(chat_template, "--chat-template"),
    INT64(kv_cache_bytes, "--kv-cache-bytes", 0, (int64_t)1 << 46),
    INT(kv_block_size, "--kv-block-size", 1, 4096),
    BOOL(prefix_caching, "--prefix-caching"),
};
#define N_KEYS (sizeof(keys) / sizeof(keys[0]))

void cfg_defaults(cfg_config *c)
{
    memset(c, 0, sizeof(*c));
    snprintf(c->model, sizeof(c->model), "%s", SIEVE_DEFAULT_MODEL);
    snprintf(c->host, sizeof(c->host), "127.0.0.1");
    c->port = 8080;
    c->threads = 0;
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
}

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
    size_t best_d = 4; /* suggest only close matches */
    for (size_t i = 0; i < N_KEYS; i++) {
        size_t d = levenshtein(name, keys[i].name);
        if (d < best_d) {
            best_d = d;
            best = keys[i].name;
        }
    }
    return best;
}

static int set_int(cfg_config *c, const key_def *k, int64_t v, char *err, size_t errlen)
{
    if (v < k->min || v > k->max) {
        snprintf(err, errlen, "config key '%s': %lld is out of range [%lld, %lld]", k->name,
                 (long long)v, (long long)k->min, (long long)k->max);
        return -1;
    }
    char *p = (char *)c + k->off;
    if (k->kind == K_INT)
        *(int *)p = (int)v;
    else
        *(int64_t *)p = v;
    return 0;
}

static int set_str(cfg_config *c, const key_def *k, const char *s, char *err, size_t errlen)
{
    if (strlen(s) >= k->cap) {
        snprintf(err, errlen, "config key '%s': value longer than %zu bytes", k->name, k->cap - 1);
        return -1;
    }
    memcpy((char *)c + k->off, s, strlen(s) + 1);
    return 0;
}

static int apply_json_value(cfg_config *c, const key_def *k, json_t *v, char *err, size_t errlen)
{
    switch (k->kind) {
    case K_STR:
        if (!json_is_string(v))
            break;
        return set_str(c, k, json_string_value(v), err, errlen);
    case K_INT:
    case K_INT64:
        if (!json_is_integer(v))
            break;
        return set_int(c, k, json_integer_value(v), err, errlen);
    case K_BOOL:
        if (!json_is_boolean(v))
            break;
        *(bool *)((char *)c + k->off) = json_is_true(v);
        return 0;
    }
    static const char *kind_names[] = {"a string", "an integer", "an integer", "a boolean"};
    snprintf(err, errlen, "config key '%s': expected %s", k->name, kind_names[k->kind]);
    return -1;
}

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

int cfg_load_file(cfg_config *c, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "config: cannot open '%s'", path);
        return -1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            if (cap >= (1u << 24)) {
                snprintf(err, errlen, "config: '%s' is larger than 16 MiB", path);
                free(buf);
                fclose(f);
                return -1;
            }
            cap = cap ? cap * 2 : 4096;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                snprintf(err, errlen, "config: out of memory reading '%s'", path);
                return -1;
            }
            buf = nb;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        if (got == 0)
            break;
        len += got;
    }
    fclose(f);
    char inner[512];
    int rc = cfg_load_json(c, buf, len, inner, sizeof(inner));
    if (rc != 0)
        snprintf(err, errlen, "%s: %s", path, inner);
    free(buf);
    return rc;
}

const char *cfg_usage(void)
{
    return "usage: sieve [--config FILE] [options]\n"
           "\n"
           "OpenAI-compatible LLM inference server.\n"
           "\n"
           "  --config FILE             JSON configuration (see config/sieve.json)\n"
           "  --model PATH              GGUF model file\n"
           "  --model-name NAME         model id served by /v1/models\n"
           "  --host ADDR               listen address (default 127.0.0.1)\n"
           "  --port N                  listen port (default 8080)\n"
           "  --threads N               compute threads (0 = all CPUs)\n"
           "  --max-body-bytes N        request body limit, 413 above it\n"
           "  --context-length N        context length (0 = the model's)\n"
           "  --max-running-seqs N      sequences decoded together\n"
           "  --max-batch-tokens N      tokens in one engine step (prefill chunk budget)\n"
           "  --drain-timeout S         on SIGTERM, seconds to let requests finish\n"
           "  --max-waiting N           queued requests before 429\n"
           "  --default-max-tokens N    max_tokens when a request omits it\n"
           "  --connection-timeout S    idle connection timeout in seconds\n"
           "  --max-connections N       concurrent connection limit\n"
           "  --log-requests true|false one log line per request\n"
           "  --kv-cache-bytes N        KV cache budget in bytes (0 = auto)\n"
           "  --kv-block-size N         tokens per KV block (default 16)\n"
           "  --prefix-caching BOOL     reuse KV of identical prompt prefixes (default true)\n"
           "  --chat-template NAME      plain, chatml, llama2, llama3, mistral, gemma, phi3,\n"
           "                            zephyr (default: detected from the model, else plain)\n"
           "  --help, --version\n";
}

static int apply_flag(cfg_config *c, const key_def *k, const char *val, char *err, size_t errlen)
{
    if (k->kind == K_STR)
        return set_str(c, k, val, err, errlen);
    if (k->kind == K_BOOL) {
        if (strcmp(val, "true") == 0 || strcmp(val, "1") == 0)
            *(bool *)((char *)c + k->off) = true;
        else if (strcmp(val, "false") == 0 || strcmp(val, "0") == 0)
            *(bool *)((char *)c + k->off) = false;
        else {
            snprintf(err, errlen, "%s: expected true or false, got '%s'", k->flag, val);
            return -1;
        }
        return 0;
    }
    char *end;
    long long v = strtoll(val, &end, 10);
    if (end == val || *end) {
        snprintf(err, errlen, "%s: expected an integer, got '%s'", k->flag, val);
        return -1;
    }
    return set_int(c, k, v, err, errlen);
}

int cfg_parse_args(cfg_config *c, int argc, char **argv, char *err, size_t errlen)
{
    /* The file goes first so that flags override it whatever their order. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(cfg_usage(), stdout);
            return 1;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("sieve %s\n", SIEVE_VERSION);
            return 1;
        }
        if (strncmp(argv[i], "--config=", 9) == 0) {
            if (cfg_load_file(c, argv[i] + 9, err, errlen) != 0)
                return -1;
        } else if (strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc) {
                snprintf(err, errlen, "--config needs a file name");
                return -1;
            }
            if (cfg_load_file(c, argv[i + 1], err, errlen) != 0)
                return -1;
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--config") == 0) {
            i++;
            continue;
        }
        if (strncmp(a, "--config=", 9) == 0)
            continue;
        const char *eq = strchr(a, '=');
        size_t name_len = eq ? (size_t)(eq - a) : strlen(a);
        const key_def *k = NULL;
        for (size_t j = 0; j < N_KEYS; j++)
            if (keys[j].flag && strlen(keys[j].flag) == name_len &&
                strncmp(keys[j].flag, a, name_len) == 0)
                k = &keys[j];
        if (!k) {
            snprintf(err, errlen, "unknown option '%s' (see --help)", a);
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
        if (apply_flag(c, k, val, err, errlen) != 0)
            return -1;
    }
    return cfg_validate(c, err, errlen);
}

int cfg_validate(const cfg_config *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < N_KEYS; i++) {
        const key_def *k = &keys[i];
        if (k->kind != K_INT && k->kind != K_INT64)
            continue;
        const char *p = (const char *)c + k->off;
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
    if (!c->model[0]) {
        snprintf(err, errlen, "config key 'model': a model path is required");
        return -1;
    }
    if (!c->host[0]) {
        snprintf(err, errlen, "config key 'host': must not be empty");
        return -1;
    }
    return 0;
}
