/*
 * config.h - the server's configuration: one struct with every key, its
 * defaults, loading from a JSON file (config/sieve.json documents each key),
 * and command-line overrides. Read by every module; owned by main.
 *
 * Precedence: built-in defaults < --config FILE < command-line flags.
 * Validation names the key and the problem; unknown keys are errors (with the
 * nearest known key suggested) so that a typo never silently does nothing.
 */
#ifndef SIEVE_CONFIG_H
#define SIEVE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CFG_PATH_MAX 1024

typedef struct {
    char model[CFG_PATH_MAX];      /* path of the GGUF file */
    char model_name[256];          /* id served by /v1/models; "" = file name without .gguf */
    char host[256];                /* listen address */
    int port;                      /* listen port */
    int threads;                   /* compute threads; 0 = number of online CPUs */
    int64_t max_body_bytes;        /* request body limit (413 above it) */
    int context_length;            /* 0 = the model's own context length */
    int max_running_seqs;          /* sequences decoded together */
    int max_batch_tokens;          /* tokens in one forward step (prefill chunk budget) */
    int drain_timeout_s;           /* on SIGTERM, seconds to let requests finish */
    int max_waiting;               /* queued requests before 429 */
    int default_max_tokens;        /* completions max_tokens when the request omits it */
    int connection_timeout_s;      /* idle HTTP connection timeout */
    int max_connections;           /* concurrent HTTP connections */
    bool log_requests;             /* one log line per finished request */
    char chat_template[64];        /* family name; "" = from the model, else "plain" */
    int64_t kv_cache_bytes;        /* KV pool budget; 0 = auto */
    int kv_block_size;             /* tokens per KV block */
    bool prefix_caching;           /* reuse KV blocks of identical prompt prefixes */
} cfg_config;

/* Fills c with the built-in defaults. */
void cfg_defaults(cfg_config *c);

/* Loads a JSON object from path over the current values. 0, or -1 with err. */
int cfg_load_file(cfg_config *c, const char *path, char *err, size_t errlen);

/* Applies a JSON text (an object) over the current values; used by
 * cfg_load_file and tests. */
int cfg_load_json(cfg_config *c, const char *text, size_t len, char *err, size_t errlen);

/* Parses argv: --config FILE first, then the other flags override it.
 * Returns 0 to run, 1 when --help/--version printed and the caller should
 * exit 0, -1 on error (message in err). */
int cfg_parse_args(cfg_config *c, int argc, char **argv, char *err, size_t errlen);

/* Checks ranges; 0 or -1 with a message naming the key. */
int cfg_validate(const cfg_config *c, char *err, size_t errlen);

/* The usage text for --help. */
const char *cfg_usage(void);

#endif
