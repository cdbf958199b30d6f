/*
 * attention.c - the "attention" request object and its configuration (see
 * attention.h). One table lists every field with where it lives and the
 * kernels' own limits, so parsing, bounds and the allow list agree.
 */
#include "server/attention.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef enum { F_INT, F_FLOAT } field_kind;

typedef struct {
    const char *name; /* dotted path inside "attention" */
    field_kind kind;
    double lo, hi; /* the kernels' limits */
} field_def;

/* Indexes into the table; kept in step with field_ptr(). */
enum {
    A_PREFILL,
    A_FLEX_GAMMA,
    A_FLEX_TAU,
    A_FLEX_MIN_BUDGET,
    A_FLEX_MAX_BUDGET,
    A_FLEX_BLOCK,
    A_POWER_WINDOW,
    A_POWER_BLOCK,
    A_POWER_DENSE,
    A_KV_CACHE,
    A_ZIP_SALIENT,
    A_ZIP_HIGH,
    A_ZIP_LOW,
    A_ZIP_FLUSH
};

static const field_def fields[SRV_ATTN_FIELDS] = {
    [A_PREFILL] = {"prefill", F_INT, 0, 0},
    [A_FLEX_GAMMA] = {"flex.gamma", F_FLOAT, 1e-6, 1.0},
    [A_FLEX_TAU] = {"flex.tau", F_FLOAT, 0.0, 1.0},
    [A_FLEX_MIN_BUDGET] = {"flex.min_budget", F_INT, 0, 1 << 24},
    [A_FLEX_MAX_BUDGET] = {"flex.max_budget", F_INT, 0, 1 << 24},
    [A_FLEX_BLOCK] = {"flex.block_size", F_INT, RT_FLEX_MIN_BLOCK, KERN_FLEX_MAX_BLOCK},
    [A_POWER_WINDOW] = {"power.window_blocks", F_INT, 1, 1 << 20},
    [A_POWER_BLOCK] = {"power.block_size", F_INT, 1, 4096},
    [A_POWER_DENSE] = {"power.dense_layers", F_INT, 0, 0},
    [A_KV_CACHE] = {"kv_cache", F_INT, 0, 0},
    [A_ZIP_SALIENT] = {"zip.salient_fraction", F_FLOAT, 0.0, 1.0},
    [A_ZIP_HIGH] = {"zip.high_bits", F_INT, 2, 8},
    [A_ZIP_LOW] = {"zip.low_bits", F_INT, 2, 8},
    [A_ZIP_FLUSH] = {"zip.flush_tokens", F_INT, 1, 4096},
};

static void *field_ptr(srv_attention *a, int f)
{
    switch (f) {
    case A_FLEX_GAMMA:
        return &a->flex.gamma;
    case A_FLEX_TAU:
        return &a->flex.tau;
    case A_FLEX_MIN_BUDGET:
        return &a->flex.min_budget;
    case A_FLEX_MAX_BUDGET:
        return &a->flex.max_budget;
    case A_FLEX_BLOCK:
        return &a->flex.block_size;
    case A_POWER_WINDOW:
        return &a->power.window_blocks;
    case A_POWER_BLOCK:
        return &a->power.block_size;
    case A_ZIP_SALIENT:
        return &a->zip_salient_fraction;
    case A_ZIP_HIGH:
        return &a->zip_high_bits;
    case A_ZIP_LOW:
        return &a->zip_low_bits;
    case A_ZIP_FLUSH:
        return &a->zip_flush_tokens;
    default:
        return NULL;
    }
}

void srv_attention_conf_default(srv_attention_conf *c)
{
    memset(c, 0, sizeof(*c));
    c->def.prefill = SRV_PREFILL_DENSE;
    kern_flex_params_default(&c->def.flex);
    kern_power_params_default(&c->def.power);
    c->def.dense_count = 2;
    c->def.period = 7;
    snprintf(c->def.kv_cache, sizeof(c->def.kv_cache), "fp");
    c->def.kv_format = RT_KV_FP;
    /* ZipCache's reference setting (spec 3.1): 60% of the tokens at 4 bits,
     * the rest at 2; one fp block of tail per flush (kv_compress.c). */
    c->def.zip_salient_fraction = 0.6f;
    c->def.zip_high_bits = 4;
    c->def.zip_low_bits = 2;
    c->def.zip_flush_tokens = 16;
    for (int k = 0; k < RT_KV_N_FORMATS; k++)
        c->kv_allowed[k] = true;
    for (int f = 0; f < SRV_ATTN_FIELDS; f++) {
        c->allow[f] = true;
        c->lo[f] = fields[f].lo;
        c->hi[f] = fields[f].hi;
    }
    c->auto_min_prompt_tokens = 4096;
}

static int field_index(const char *name)
{
    for (int f = 0; f < SRV_ATTN_FIELDS; f++)
        if (strcmp(fields[f].name, name) == 0)
            return f;
    return -1;
}

static int parse_kv_format(const char *s, rt_kv_format *out)
{
    for (int i = 0; i < RT_KV_N_FORMATS; i++)
        if (strcmp(s, rt_kv_format_name((rt_kv_format)i)) == 0) {
            *out = (rt_kv_format)i;
            return 0;
        }
    return -1;
}

static int parse_prefill(const char *s, srv_prefill *out)
{
    static const char *names[] = {"dense", "flex", "power", "auto"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (srv_prefill)i;
            return 0;
        }
    return -1;
}

/* Applies one object of the request shape onto out. With conf == NULL (the
 * configuration's own "default") no allow list or bounds apply beyond the
 * kernels' limits. */
static int apply(const srv_attention_conf *conf, json_t *obj, srv_attention *out, char *param,
                 size_t param_len, char *msg, size_t msg_len)
{
#define FAIL(p, ...)                                                                               \
    do {                                                                                           \
        snprintf(param, param_len, "attention%s%s", (p)[0] ? "." : "", p);                         \
        snprintf(msg, msg_len, __VA_ARGS__);                                                       \
        return -1;                                                                                 \
    } while (0)
    if (!json_is_object(obj))
        FAIL("", "'attention' must be an object");
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        if (strcmp(key, "prefill") == 0) {
            if (conf && !conf->allow[A_PREFILL])
                FAIL("prefill", "'attention.prefill' may not be set on this server");
            if (!json_is_string(v) || parse_prefill(json_string_value(v), &out->prefill) != 0)
                FAIL("prefill", "'attention.prefill' must be one of dense, flex, power, auto");
        } else if (strcmp(key, "kv_cache") == 0) {
            if (conf && !conf->allow[A_KV_CACHE])
                FAIL("kv_cache", "'attention.kv_cache' may not be set on this server");
            rt_kv_format fmt;
            if (!json_is_string(v) || parse_kv_format(json_string_value(v), &fmt) != 0)
                FAIL("kv_cache", "'attention.kv_cache' must be one of fp, int8, int4, zip");
            if (conf && !conf->kv_allowed[fmt])
                FAIL("kv_cache", "'attention.kv_cache' '%s' is not offered on this server",
                     rt_kv_format_name(fmt));
            out->kv_format = fmt;
            snprintf(out->kv_cache, sizeof(out->kv_cache), "%s", rt_kv_format_name(fmt));
        } else if (strcmp(key, "flex") == 0 || strcmp(key, "power") == 0 ||
                   strcmp(key, "zip") == 0) {
            if (!json_is_object(v))
                FAIL(key, "'attention.%s' must be an object", key);
            const char *sub;
            json_t *sv;
            json_object_foreach(v, sub, sv)
            {
                char name[64];
                snprintf(name, sizeof(name), "%s.%s", key, sub);
                const int f = field_index(name);
                if (f < 0)
                    FAIL(name, "unknown field 'attention.%s'", name);
                if (conf && !conf->allow[f])
                    FAIL(name, "'attention.%s' may not be set on this server", name);
                if (f == A_POWER_DENSE) {
                    char e[160];
                    if (!json_is_string(sv) ||
                        kern_power_dense_layers_parse(json_string_value(sv), &out->dense_count,
                                                      &out->period, e, sizeof(e)) != 0)
                        FAIL(name, "'attention.power.dense_layers' must read like \"2 of every "
                                   "7\", \"none\" or \"all\"");
                    continue;
                }
                double d;
                if (json_is_integer(sv))
                    d = (double)json_integer_value(sv);
                else if (json_is_real(sv) && fields[f].kind == F_FLOAT)
                    d = json_real_value(sv);
                else
                    FAIL(name, "'attention.%s' must be %s", name,
                         fields[f].kind == F_INT ? "an integer" : "a number");
                const double lo = conf ? conf->lo[f] : fields[f].lo;
                const double hi = conf ? conf->hi[f] : fields[f].hi;
                if (!(d >= lo && d <= hi))
                    FAIL(name, "'attention.%s' must be between %g and %g, got %g", name, lo, hi, d);
                void *p = field_ptr(out, f);
                if (fields[f].kind == F_INT)
                    *(int *)p = (int)d;
                else
                    *(float *)p = (float)d;
            }
        }
        /* Unknown top-level members are ignored, like unknown request fields. */
    }
    char e[160];
    if (kern_flex_params_check(&out->flex, e, sizeof(e)) != 0)
        FAIL("flex", "'attention.flex': %s", e);
    if (kern_power_params_check(&out->power, e, sizeof(e)) != 0)
        FAIL("power", "'attention.power': %s", e);
    const int hb = out->zip_high_bits, lb = out->zip_low_bits;
    if (hb != 8 && hb != 4 && hb != 2)
        FAIL("zip.high_bits", "'attention.zip.high_bits' must be 8, 4 or 2, got %d", hb);
    if (lb != 8 && lb != 4 && lb != 2)
        FAIL("zip.low_bits", "'attention.zip.low_bits' must be 8, 4 or 2, got %d", lb);
    if (lb > hb)
        FAIL("zip.low_bits", "'attention.zip.low_bits' (%d) exceeds high_bits (%d)", lb, hb);
    return 0;
#undef FAIL
}

int srv_attention_conf_parse(srv_attention_conf *c, const char *text, char *err, size_t errlen)
{
    srv_attention_conf_default(c);
    if (!text || !text[0])
        return 0;
    json_error_t je;
    json_t *root = json_loads(text, 0, &je);
    if (!json_is_object(root)) {
        snprintf(err, errlen, "config key 'attention': not a JSON object (%s)",
                 root ? "wrong type" : je.text);
        json_decref(root);
        return -1;
    }
    int rc = -1;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        char param[96], msg[256];
        if (strcmp(key, "default") == 0) {
            if (apply(NULL, v, &c->def, param, sizeof(param), msg, sizeof(msg)) != 0) {
                snprintf(err, errlen, "config key 'attention.default': %s", msg);
                goto done;
            }
        } else if (strcmp(key, "allow") == 0) {
            if (!json_is_array(v)) {
                snprintf(err, errlen, "config key 'attention.allow': must be an array of names");
                goto done;
            }
            bool allow[SRV_ATTN_FIELDS] = {false};
            size_t i;
            json_t *n;
            json_array_foreach(v, i, n)
            {
                const char *name = json_is_string(n) ? json_string_value(n) : "";
                if (strcmp(name, "*") == 0) {
                    for (int f = 0; f < SRV_ATTN_FIELDS; f++)
                        allow[f] = true;
                    continue;
                }
                const int f = field_index(name);
                if (f < 0) {
                    snprintf(err, errlen, "config key 'attention.allow': unknown field '%.64s'",
                             name);
                    goto done;
                }
                allow[f] = true;
            }
            memcpy(c->allow, allow, sizeof(allow));
        } else if (strcmp(key, "bounds") == 0) {
            const char *name;
            json_t *b;
            if (!json_is_object(v)) {
                snprintf(err, errlen, "config key 'attention.bounds': must be an object");
                goto done;
            }
            json_object_foreach(v, name, b)
            {
                const int f = field_index(name);
                if (f < 0 || !field_ptr(&c->def, f)) {
                    snprintf(err, errlen, "config key 'attention.bounds': '%.64s' has no range",
                             name);
                    goto done;
                }
                if (!json_is_array(b) || json_array_size(b) != 2 ||
                    !json_is_number(json_array_get(b, 0)) ||
                    !json_is_number(json_array_get(b, 1))) {
                    snprintf(err, errlen, "config key 'attention.bounds.%s': must be [low, high]",
                             name);
                    goto done;
                }
                const double lo = json_number_value(json_array_get(b, 0));
                const double hi = json_number_value(json_array_get(b, 1));
                if (lo > hi || lo < fields[f].lo || hi > fields[f].hi) {
                    snprintf(err, errlen,
                             "config key 'attention.bounds.%s': [%g, %g] must lie within [%g, "
                             "%g]",
                             name, lo, hi, fields[f].lo, fields[f].hi);
                    goto done;
                }
                c->lo[f] = lo;
                c->hi[f] = hi;
            }
        } else if (strcmp(key, "kv_cache_formats") == 0) {
            /* Which formats requests may choose (the default is always served). */
            if (!json_is_array(v) || json_array_size(v) == 0) {
                snprintf(err, errlen,
                         "config key 'attention.kv_cache_formats': must be a "
                         "non-empty array of fp, int8, int4, zip");
                goto done;
            }
            bool kv[RT_KV_N_FORMATS] = {false};
            size_t i;
            json_t *n;
            json_array_foreach(v, i, n)
            {
                rt_kv_format fmt;
                if (!json_is_string(n) || parse_kv_format(json_string_value(n), &fmt) != 0) {
                    snprintf(err, errlen,
                             "config key 'attention.kv_cache_formats': '%.32s' is not one of "
                             "fp, int8, int4, zip",
                             json_is_string(n) ? json_string_value(n) : "(not a string)");
                    goto done;
                }
                kv[fmt] = true;
            }
            memcpy(c->kv_allowed, kv, sizeof(kv));
        } else if (strcmp(key, "auto_min_prompt_tokens") == 0) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) > (1 << 24)) {
                snprintf(err, errlen,
                         "config key 'attention.auto_min_prompt_tokens': must be an "
                         "integer in [0, 16777216]");
                goto done;
            }
            c->auto_min_prompt_tokens = (int)json_integer_value(v);
        } else if (key[0] != '_') {
            snprintf(err, errlen,
                     "config key 'attention': unknown member '%.64s' (default, allow, bounds, "
                     "kv_cache_formats, auto_min_prompt_tokens)",
                     key);
            goto done;
        }
    }
    c->kv_allowed[c->def.kv_format] = true;
    rc = 0;
done:
    json_decref(root);
    return rc;
}

int srv_attention_parse(const srv_attention_conf *c, json_t *v, srv_attention *out, char *param,
                        size_t param_len, char *msg, size_t msg_len)
{
    *out = c->def;
    if (!v || json_is_null(v))
        return 0;
    return apply(c, v, out, param, param_len, msg, msg_len);
}

void srv_attention_resolve(const srv_attention_conf *c, const srv_attention *a, int n_prompt,
                           rt_attn_policy *out)
{
    memset(out, 0, sizeof(*out));
    out->flex = a->flex;
    out->power = a->power;
    out->power_dense_count = a->dense_count;
    out->power_period = a->period;
    switch (a->prefill) {
    case SRV_PREFILL_FLEX:
        out->prefill = RT_PREFILL_FLEX;
        break;
    case SRV_PREFILL_POWER:
        out->prefill = RT_PREFILL_POWER;
        break;
    case SRV_PREFILL_AUTO:
        out->prefill = n_prompt >= c->auto_min_prompt_tokens ? RT_PREFILL_FLEX : RT_PREFILL_DENSE;
        break;
    default:
        out->prefill = RT_PREFILL_DENSE;
    }
}

void srv_attention_kv(const srv_attention *a, rt_kv_policy *out)
{
    memset(out, 0, sizeof(*out));
    out->format = a->kv_format;
    out->salient_fraction = a->zip_salient_fraction;
    out->high_bits = a->zip_high_bits;
    out->low_bits = a->zip_low_bits;
    out->flush_tokens = a->zip_flush_tokens;
}

const char *srv_prefill_name(rt_prefill_policy p)
{
    return p == RT_PREFILL_FLEX ? "flex" : p == RT_PREFILL_POWER ? "power" : "dense";
}
