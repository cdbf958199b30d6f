/*
 * config.h - the server's configuration: one struct with every key, its
 * defaults, loading from a JSON file, SIEVE_* environment variables and
 * command-line flags, and validation. Read by every module; owned by main.
 * docs/config.md is the reference of every key (generated from the key table
 * in config.c by tools/gen_config_doc.py).
 *
 * Precedence, lowest first: built-in defaults < the --config FILE(s), in the
 * order given < SIEVE_* environment variables < command-line flags. Each key
 * has all three spellings: max_body_bytes in a file, SIEVE_MAX_BODY_BYTES in
 * the environment, --max-body-bytes on the command line.
 *
 * Validation names the key (or the variable, or the flag) and the problem;
 * unknown file keys and unknown flags are errors that suggest the nearest
 * known one, so a typo never silently does nothing. Unknown SIEVE_* variables
 * are warned about on stderr (with the suggestion) but not refused, since the
 * environment is shared with other software.
 */
#ifndef SIEVE_CONFIG_H
#define SIEVE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CFG_PATH_MAX 1024
#define CFG_API_KEYS_MAX 64 /* keys from api_keys and api_key_file together */
#define CFG_API_KEY_LEN 256 /* bytes per key, with the terminating NUL */
#define CFG_DEVICES_MAX 16  /* GPU indices in the devices key */

typedef struct {
    char model[CFG_PATH_MAX]; /* path of the GGUF file */
    char model_name[256];     /* id served by /v1/models; "" = file name without .gguf */
    char host[256];           /* listen address */
    int port;                 /* listen port */
    int threads;              /* compute threads; 0 = number of online CPUs */
    char device[16];          /* "auto", "cpu" or "cuda": the backend of the forward pass */
    char devices[256];        /* "auto", or GPU indices "0,1" ("" = none: the CPU) */
    int tensor_parallel_size; /* ranks splitting attention heads and FFN columns */
    bool cuda_graphs;         /* CUDA: replay decode steps as captured graphs */
    int64_t max_body_bytes;   /* request body limit (413 above it) */
    int context_length;       /* 0 = the model's own context length */
    int max_running_seqs;     /* sequences decoded together */
    int max_batch_tokens;     /* tokens in one forward step (prefill chunk budget) */
    int drain_timeout_s;      /* on SIGTERM, seconds to let requests finish */
    int max_waiting;          /* queued requests before 429 */
    int default_max_tokens;   /* completions max_tokens when the request omits it */
    int connection_timeout_s; /* idle HTTP connection timeout */
    int max_connections;      /* concurrent HTTP connections */
    bool log_requests;        /* one log line per finished request */
    char chat_template[64];   /* family name; "" = from the model, else "plain" */
    char attention[4096];     /* JSON object: attention policy defaults and bounds */
    int request_timeout_s;    /* 0 = none; else a request's deadline from arrival */
    int64_t kv_cache_bytes;   /* KV pool budget; 0 = auto */
    int kv_block_size;        /* tokens per KV block */
    bool prefix_caching;      /* reuse KV blocks of identical prompt prefixes */
    /* API keys. When n_api_keys > 0 every API request must carry
     * "Authorization: Bearer <one of them>". After cfg_parse_args these are
     * the keys of api_keys (file, SIEVE_API_KEYS or --api-keys) followed by
     * those read from api_key_file, so the server checks this list only.
     * Each key is 1..255 visible ASCII characters other than ','. */
    char api_keys[CFG_API_KEYS_MAX][CFG_API_KEY_LEN];
    int n_api_keys;
    char api_key_file[CFG_PATH_MAX];  /* "" = none; else one key per line, '#' comments */
    char cors_origins[1024];          /* "" = no CORS headers; "*" or comma-separated origins */
    char tls_cert_file[CFG_PATH_MAX]; /* PEM certificate (chain); with tls_key_file: HTTPS */
    char tls_key_file[CFG_PATH_MAX];  /* PEM private key */
    int max_header_bytes;             /* per-connection memory for headers; past it 431 */
} cfg_config;

/* Fills c with the built-in defaults. */
void cfg_defaults(cfg_config *c);

/* Loads a JSON object from path over the current values. 0, or -1 with err. */
int cfg_load_file(cfg_config *c, const char *path, char *err, size_t errlen);

/* Applies a JSON text (an object) over the current values; used by
 * cfg_load_file and tests. */
int cfg_load_json(cfg_config *c, const char *text, size_t len, char *err, size_t errlen);

/* Applies the SIEVE_* environment variables over the current values (an empty
 * variable counts as unset). Unknown SIEVE_* variables are written to warn
 * (one line each, with the nearest known variable) when warn is not NULL.
 * 0, or -1 with a message naming the variable. */
int cfg_load_env(cfg_config *c, FILE *warn, char *err, size_t errlen);

/* Parses argv and builds the whole configuration over c (which holds the
 * defaults): the config files named by --config FILE (each in turn; without
 * one, $SIEVE_CONFIG if set), then the environment, then the other flags,
 * whatever their order on the command line; then validates the result and
 * reads api_key_file into api_keys.
 * Returns
 *    0  run the server with c;
 *    1  done, the caller exits 0: --help, --version or --config-schema
 *       printed, or --check-config FILE found the configuration valid and
 *       printed "config OK" (stderr) and the effective values as JSON
 *       (stdout, API keys redacted);
 *   -1  error, message in err; the caller prints it and exits 2 (this is also
 *       how --check-config reports an invalid configuration). */
int cfg_parse_args(cfg_config *c, int argc, char **argv, char *err, size_t errlen);

/* Checks ranges and the rules between keys; 0 or -1 with a message naming
 * the key. */
int cfg_validate(const cfg_config *c, char *err, size_t errlen);

/* Reads c->api_key_file (when set) and appends its keys to c->api_keys; an
 * unreadable file, a bad line (named file:line), too many keys or a file
 * without any key is an error. cfg_parse_args calls it. 0 or -1 with err. */
int cfg_load_api_key_file(cfg_config *c, char *err, size_t errlen);

/* The GPU indices of c->devices in ids[0..cap): their count (0 for "", no
 * device), or -1 for "auto" (the server picks the first ones present). The
 * text was checked by cfg_validate, so it parses. */
int cfg_devices(const cfg_config *c, int *ids, int cap);

/* The effective values as a JSON object text (API keys redacted), as
 * --check-config prints it; caller frees. NULL when out of memory. */
char *cfg_to_json(const cfg_config *c);

/* Every key as a JSON array of {key, type, default, min, max, flag, env,
 * help, doc}, as --config-schema prints it; caller frees. */
char *cfg_schema_json(void);

/* The usage text for --help. */
const char *cfg_usage(void);

#endif
