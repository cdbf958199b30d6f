/*
 * attention.h - the "attention" extension object of requests (DESIGN.md):
 * parsing, the operator's defaults and bounds, and resolving "auto". Private
 * to server/.
 *
 *   "attention": {
 *     "prefill": "dense" | "flex" | "power" | "auto",
 *     "flex":  {"gamma", "tau", "min_budget", "max_budget", "block_size"},
 *     "power": {"window_blocks", "block_size", "dense_layers": "K of every N"},
 *     "kv_cache": "fp" | "int8" | "int4" | "zip",
 *     "zip": {"salient_fraction", "high_bits", "low_bits", "flush_tokens"},
 *   }
 *
 * The configuration key `attention` holds the same shape under "default",
 * plus "allow" (the fields a request may set, e.g. ["prefill", "flex.gamma"];
 * "*" for all), "bounds" ({"flex.gamma": [0.5, 1], ...}) and
 * "auto_min_prompt_tokens" (prompts at least this long use flex under
 * "auto") and "kv_cache_formats" (the KV formats requests may choose; all by
 * default, and the default format always). A request field outside its bounds or not allowed gets
 * 400 naming it (e.g. param "attention.flex.gamma").
 */
#ifndef SIEVE_SERVER_ATTENTION_H
#define SIEVE_SERVER_ATTENTION_H

#include <jansson.h>
#include <stdbool.h>

#include "runtime/model.h"

struct srv_error_s;

typedef enum {
    SRV_PREFILL_DENSE,
    SRV_PREFILL_FLEX,
    SRV_PREFILL_POWER,
    SRV_PREFILL_AUTO
} srv_prefill;

/* A request's (or the server's default) attention choice before "auto" is
 * resolved. */
typedef struct {
    srv_prefill prefill;
    kern_flex_params flex;
    kern_power_params power;
    int dense_count, period; /* PowerAttention's dense layers */
    char kv_cache[8];        /* the format's name */
    rt_kv_format kv_format;
    float zip_salient_fraction;
    int zip_high_bits, zip_low_bits, zip_flush_tokens;
} srv_attention;

#define SRV_ATTN_FIELDS 14

typedef struct {
    srv_attention def;
    bool kv_allowed[RT_KV_N_FORMATS];
    bool allow[SRV_ATTN_FIELDS]; /* indexed like the field table in attention.c */
    double lo[SRV_ATTN_FIELDS], hi[SRV_ATTN_FIELDS];
    int auto_min_prompt_tokens;
} srv_attention_conf;

/* The built-in configuration: default dense, every field allowed within the
 * kernels' own limits, auto from 4096 prompt tokens. */
void srv_attention_conf_default(srv_attention_conf *c);

/* Parses the `attention` configuration object (NULL or "" keeps the
 * defaults). 0, or -1 with a message naming the key. */
int srv_attention_conf_parse(srv_attention_conf *c, const char *json, char *err, size_t errlen);

/* Parses a request's "attention" value (may be NULL: the defaults) into out,
 * starting from the configured defaults. 0, or -1 with a 400 in err whose
 * param names the field. */
int srv_attention_parse(const srv_attention_conf *c, json_t *v, srv_attention *out, char *param,
                        size_t param_len, char *msg, size_t msg_len);

/* Resolves "auto" for a prompt of n_prompt tokens and fills the runtime
 * policy. */
void srv_attention_resolve(const srv_attention_conf *c, const srv_attention *a, int n_prompt,
                           rt_attn_policy *out);

/* The KV cache policy of a parsed attention object. */
void srv_attention_kv(const srv_attention *a, rt_kv_policy *out);

const char *srv_prefill_name(rt_prefill_policy p);

#endif
