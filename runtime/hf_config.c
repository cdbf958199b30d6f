/*
 * hf_config.c - config.json of a Hugging Face model directory into rt_hf_config.
 *
 * The file is hostile input: every key is type-checked (integers must be JSON integers,
 * floats any JSON number), every value range-checked against limits far above real models
 * (so later size arithmetic cannot overflow), cross-key constraints checked (heads divide
 * evenly, head_dim even). Messages name the key and the value found.
 */
#include "runtime/hf_config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_CONFIG_BYTES (16 << 20)

static const struct {
    const char *model_type, *architecture;
    rt_hf_arch arch;
} archs[] = {
    {"llama", "LlamaForCausalLM", RT_HF_ARCH_LLAMA},
    {"mistral", "MistralForCausalLM", RT_HF_ARCH_MISTRAL},
    {"qwen2", "Qwen2ForCausalLM", RT_HF_ARCH_QWEN2},
};

const char *rt_hf_arch_name(rt_hf_arch arch)
{
    for (size_t i = 0; i < sizeof(archs) / sizeof(archs[0]); i++) {
        if (archs[i].arch == arch) {
            return archs[i].model_type;
        }
    }
    return "unknown";
}

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen, const char *fmt,
                                                      ...)
{
    if (!err || errlen == 0) {
        return -1;
    }
    int n = snprintf(err, errlen, "config.json: ");
    if (n < 0 || (size_t)n >= errlen) {
        return -1;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

/* A JSON value shown in a message: compact, cut to fit. */
static const char *show(char *out, size_t cap, const json_t *v)
{
    char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    size_t o = 0;
    if (s) {
        for (size_t i = 0; s[i] && o + 4 < cap; i++) {
            unsigned char c = (unsigned char)s[i];
            out[o++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
        }
        if (strlen(s) > o) {
            for (int k = 0; k < 3 && o + 1 < cap; k++) {
                out[o++] = '.';
            }
        }
    }
    out[o] = '\0';
    free(s);
    return out;
}

typedef struct {
    const json_t *root;
    char *err;
    size_t errlen;
} reader;

/* An integer key in [lo, hi]; absent or null gives dflt when required is false. */
static int get_int(reader *r, const json_t *obj, const char *key, bool required, int dflt,
                   long long lo, long long hi, int *out)
{
    const json_t *v = json_object_get(obj, key);
    char b[64];
    if (!v || json_is_null(v)) {
        if (required) {
            return fail(r->err, r->errlen, "'%s' is missing", key);
        }
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v)) {
        return fail(r->err, r->errlen, "'%s' must be an integer (got %s)", key,
                    show(b, sizeof(b), v));
    }
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi) {
        return fail(r->err, r->errlen, "'%s' = %lld is out of range [%lld, %lld]", key,
                    (long long)x, lo, hi);
    }
    *out = (int)x;
    return 0;
}

/* A number key in [lo, hi] (lo exclusive when open_lo); absent or null gives dflt. */
static int get_num(reader *r, const json_t *obj, const char *key, bool required, double dflt,
                   double lo, bool open_lo, double hi, double *out)
{
    const json_t *v = json_object_get(obj, key);
    char b[64];
    if (!v || json_is_null(v)) {
        if (required) {
            return fail(r->err, r->errlen, "'%s' is missing", key);
        }
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v)) {
        return fail(r->err, r->errlen, "'%s' must be a number (got %s)", key,
                    show(b, sizeof(b), v));
    }
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || (open_lo && x == lo) || x > hi) {
        return fail(r->err, r->errlen, "'%s' = %g is out of range %s%g, %g]", key, x,
                    open_lo ? "(" : "[", lo, hi);
    }
    *out = x;
    return 0;
}

static int get_bool(reader *r, const json_t *obj, const char *key, bool dflt, bool *out)
{
    const json_t *v = json_object_get(obj, key);
    char b[64];
    if (!v || json_is_null(v)) {
        *out = dflt;
        return 0;
    }
    if (!json_is_boolean(v)) {
        return fail(r->err, r->errlen, "'%s' must be true or false (got %s)", key,
                    show(b, sizeof(b), v));
    }
    *out = json_is_true(v);
    return 0;
}

static int copy_str(reader *r, const json_t *v, const char *key, char *dst, size_t cap)
{
    char b[96];
    if (!json_is_string(v) || json_string_length(v) >= cap || json_string_length(v) == 0 ||
        strlen(json_string_value(v)) != json_string_length(v)) {
        return fail(r->err, r->errlen, "'%s' must be a short string (got %s)", key,
                    show(b, sizeof(b), v));
    }
    memcpy(dst, json_string_value(v), json_string_length(v) + 1);
    return 0;
}

static int read_arch(reader *r, rt_hf_config *cfg)
{
    const json_t *mt = json_object_get(r->root, "model_type");
    const json_t *list = json_object_get(r->root, "architectures");
    char b[96];
    if (list && !json_is_null(list)) {
        if (!json_is_array(list) || json_array_size(list) == 0) {
            return fail(r->err, r->errlen, "'architectures' must be a non-empty list (got %s)",
                        show(b, sizeof(b), list));
        }
        if (copy_str(r, json_array_get(list, 0), "architectures[0]", cfg->architecture,
                     sizeof(cfg->architecture))) {
            return -1;
        }
    }
    if (mt && !json_is_null(mt)) {
        if (copy_str(r, mt, "model_type", cfg->model_type, sizeof(cfg->model_type))) {
            return -1;
        }
    }
    for (size_t i = 0; i < sizeof(archs) / sizeof(archs[0]); i++) {
        bool type_ok = cfg->model_type[0] && strcmp(cfg->model_type, archs[i].model_type) == 0;
        bool class_ok = strcmp(cfg->architecture, archs[i].architecture) == 0;
        if ((type_ok && (class_ok || !cfg->architecture[0])) || (class_ok && !cfg->model_type[0])) {
            cfg->arch = archs[i].arch;
            snprintf(cfg->model_type, sizeof(cfg->model_type), "%s", archs[i].model_type);
            return 0;
        }
    }
    if (!cfg->model_type[0] && !cfg->architecture[0]) {
        return fail(r->err, r->errlen, "neither 'model_type' nor 'architectures' is given");
    }
    return fail(r->err, r->errlen,
                "unsupported architecture '%s' (model_type '%s'; supported: LlamaForCausalLM "
                "(llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2))",
                cfg->architecture[0] ? cfg->architecture : "-",
                cfg->model_type[0] ? cfg->model_type : "-");
}

static int read_rope_scaling(reader *r, rt_hf_config *cfg)
{
    const json_t *rs = json_object_get(r->root, "rope_scaling");
    char b[96];
    cfg->rope_scaling.type = RT_HF_ROPE_NONE;
    cfg->rope_scaling.factor = 1.0;
    if (!rs || json_is_null(rs)) {
        return 0;
    }
    if (!json_is_object(rs)) {
        return fail(r->err, r->errlen, "'rope_scaling' must be an object or null (got %s)",
                    show(b, sizeof(b), rs));
    }
    const json_t *type = json_object_get(rs, "rope_type");
    if (!type) {
        type = json_object_get(rs, "type");
    }
    if (!json_is_string(type)) {
        return fail(r->err, r->errlen, "'rope_scaling.rope_type' is missing or not a string");
    }
    const char *t = json_string_value(type);
    if (strcmp(t, "default") == 0) {
        return 0;
    }
    if (strcmp(t, "linear") == 0) {
        cfg->rope_scaling.type = RT_HF_ROPE_LINEAR;
        return get_num(r, rs, "factor", true, 1.0, 1.0, false, 1024.0, &cfg->rope_scaling.factor)
                   ? fail(r->err, r->errlen, "'rope_scaling.factor' is missing or not in [1, 1024]")
                   : 0;
    }
    if (strcmp(t, "llama3") != 0) {
        return fail(r->err, r->errlen,
                    "rope_scaling type '%s' is not supported (supported: linear, llama3)",
                    show(b, sizeof(b), type));
    }
    cfg->rope_scaling.type = RT_HF_ROPE_LLAMA3;
    static const char *const keys[] = {"factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings"};
    double *dst[] = {&cfg->rope_scaling.factor, &cfg->rope_scaling.low_freq_factor,
                     &cfg->rope_scaling.high_freq_factor};
    for (size_t i = 0; i < 3; i++) {
        if (get_num(r, rs, keys[i], true, 0, 0.0, true, 1024.0, dst[i])) {
            return fail(r->err, r->errlen, "'rope_scaling.%s' is missing or not in (0, 1024]",
                        keys[i]);
        }
    }
    if (get_int(r, rs, keys[3], true, 0, 1, 1 << 24,
                &cfg->rope_scaling.original_max_position_embeddings)) {
        return fail(r->err, r->errlen, "'rope_scaling.%s' is missing or not in [1, %d]", keys[3],
                    1 << 24);
    }
    if (!(cfg->rope_scaling.high_freq_factor > cfg->rope_scaling.low_freq_factor)) {
        return fail(r->err, r->errlen,
                    "'rope_scaling.high_freq_factor' (%g) must exceed 'low_freq_factor' (%g)",
                    cfg->rope_scaling.high_freq_factor, cfg->rope_scaling.low_freq_factor);
    }
    return 0;
}

static int read_token_ids(reader *r, rt_hf_config *cfg)
{
    char b[96];
    const json_t *bos = json_object_get(r->root, "bos_token_id");
    cfg->bos_token_id = -1;
    if (bos && !json_is_null(bos)) {
        if (!json_is_integer(bos) || json_integer_value(bos) < 0 ||
            json_integer_value(bos) >= cfg->vocab_size) {
            return fail(r->err, r->errlen, "'bos_token_id' = %s is not an id below vocab_size %d",
                        show(b, sizeof(b), bos), cfg->vocab_size);
        }
        cfg->bos_token_id = (int32_t)json_integer_value(bos);
    }
    const json_t *eos = json_object_get(r->root, "eos_token_id");
    cfg->n_eos = 0;
    if (!eos || json_is_null(eos)) {
        return 0;
    }
    size_t n = json_is_array(eos) ? json_array_size(eos) : 1;
    if (n > RT_HF_MAX_EOS) {
        return fail(r->err, r->errlen, "'eos_token_id' lists %zu ids (at most %d)", n,
                    RT_HF_MAX_EOS);
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_is_array(eos) ? json_array_get(eos, i) : eos;
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= cfg->vocab_size) {
            return fail(r->err, r->errlen,
                        "'eos_token_id' holds %s, which is not an id below vocab_size %d",
                        show(b, sizeof(b), v), cfg->vocab_size);
        }
        cfg->eos_token_ids[cfg->n_eos++] = (int32_t)json_integer_value(v);
    }
    return 0;
}

static int read_extras(reader *r, rt_hf_config *cfg)
{
    char b[96];
    const json_t *q = json_object_get(r->root, "quantization_config");
    if (q && !json_is_null(q)) {
        return fail(r->err, r->errlen,
                    "'quantization_config' (quant_method %s) is set; quantized safetensors "
                    "checkpoints are not supported",
                    show(b, sizeof(b), json_object_get(q, "quant_method")));
    }
    const json_t *act = json_object_get(r->root, "hidden_act");
    if (act && !json_is_null(act) &&
        !(json_is_string(act) && strcmp(json_string_value(act), "silu") == 0)) {
        return fail(r->err, r->errlen, "'hidden_act' %s is not supported (only \"silu\")",
                    show(b, sizeof(b), act));
    }
    const json_t *dtype = json_object_get(r->root, "torch_dtype");
    if (!dtype || json_is_null(dtype)) {
        dtype = json_object_get(r->root, "dtype");
    }
    if (dtype && !json_is_null(dtype)) {
        static const char *const known[] = {"float32", "float16", "bfloat16"};
        bool ok = false;
        for (size_t i = 0; i < 3 && json_is_string(dtype); i++) {
            ok = ok || strcmp(json_string_value(dtype), known[i]) == 0;
        }
        if (!ok) {
            return fail(r->err, r->errlen,
                        "'torch_dtype' %s is not supported (float32, float16, bfloat16)",
                        show(b, sizeof(b), dtype));
        }
        snprintf(cfg->torch_dtype, sizeof(cfg->torch_dtype), "%s", json_string_value(dtype));
    }
    bool use_window = cfg->arch != RT_HF_ARCH_QWEN2;
    if (cfg->arch == RT_HF_ARCH_QWEN2 &&
        get_bool(r, r->root, "use_sliding_window", false, &use_window)) {
        return -1;
    }
    int window = 0;
    if (cfg->arch != RT_HF_ARCH_LLAMA &&
        get_int(r, r->root, "sliding_window", false, 0, 0, 1 << 24, &window)) {
        return -1;
    }
    cfg->sliding_window = use_window ? window : 0;
    return 0;
}

int rt_hf_config_parse(rt_hf_config *cfg, const char *json, size_t len, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof(*cfg));
    if (!json) {
        return fail(err, errlen, "no text");
    }
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        return fail(err, errlen, "invalid JSON at line %d, column %d: %s", jerr.line, jerr.column,
                    jerr.text);
    }
    reader r = {root, err, errlen};
    int rc = -1;
    if (!json_is_object(root)) {
        fail(err, errlen, "the top level is not an object");
        goto done;
    }
    if (read_arch(&r, cfg) ||
        get_int(&r, root, "hidden_size", true, 0, 1, 1 << 16, &cfg->hidden_size) ||
        get_int(&r, root, "num_hidden_layers", true, 0, 1, 1024, &cfg->num_hidden_layers) ||
        get_int(&r, root, "num_attention_heads", true, 0, 1, 1024, &cfg->num_attention_heads) ||
        get_int(&r, root, "num_key_value_heads", false, cfg->num_attention_heads, 1, 1024,
                &cfg->num_key_value_heads) ||
        get_int(&r, root, "intermediate_size", true, 0, 1, 1 << 20, &cfg->intermediate_size) ||
        get_int(&r, root, "max_position_embeddings", true, 0, 1, 1 << 24,
                &cfg->max_position_embeddings) ||
        get_int(&r, root, "vocab_size", true, 0, 1, 1 << 24, &cfg->vocab_size) ||
        get_num(&r, root, "rms_norm_eps", false, 1e-6, 0.0, true, 1.0, &cfg->rms_norm_eps) ||
        get_num(&r, root, "rope_theta", false, 10000.0, 0.0, true, 1e12, &cfg->rope_theta) ||
        get_bool(&r, root, "tie_word_embeddings", false, &cfg->tie_word_embeddings) ||
        read_rope_scaling(&r, cfg) || read_token_ids(&r, cfg) || read_extras(&r, cfg)) {
        goto done;
    }
    if (cfg->num_attention_heads % cfg->num_key_value_heads != 0) {
        fail(err, errlen, "'num_attention_heads' %d is not a multiple of 'num_key_value_heads' %d",
             cfg->num_attention_heads, cfg->num_key_value_heads);
        goto done;
    }
    const json_t *hd = json_object_get(root, "head_dim");
    if (hd && !json_is_null(hd)) {
        if (get_int(&r, root, "head_dim", true, 0, 2, 1024, &cfg->head_dim)) {
            goto done;
        }
    } else if (cfg->hidden_size % cfg->num_attention_heads != 0) {
        fail(err, errlen, "'hidden_size' %d is not a multiple of 'num_attention_heads' %d",
             cfg->hidden_size, cfg->num_attention_heads);
        goto done;
    } else {
        cfg->head_dim = cfg->hidden_size / cfg->num_attention_heads;
    }
    if (cfg->head_dim % 2 != 0) {
        fail(err, errlen, "the head size %d is odd, which rotary embeddings cannot use",
             cfg->head_dim);
        goto done;
    }
    bool attention_bias = false;
    if (cfg->arch == RT_HF_ARCH_QWEN2) {
        cfg->qkv_bias = true;
    } else if (get_bool(&r, root, "attention_bias", false, &attention_bias)) {
        goto done;
    } else {
        cfg->qkv_bias = cfg->o_bias = attention_bias;
    }
    if (cfg->arch == RT_HF_ARCH_LLAMA && get_bool(&r, root, "mlp_bias", false, &cfg->mlp_bias)) {
        goto done;
    }
    rc = 0;
done:
    json_decref(root);
    if (rc != 0) {
        memset(cfg, 0, sizeof(*cfg));
    }
    return rc;
}

int rt_hf_config_load(rt_hf_config *cfg, const char *path, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof(*cfg));
    if (!path) {
        return fail(err, errlen, "no path");
    }
    char file[4096];
    struct stat st;
    int n = stat(path, &st) == 0 && S_ISDIR(st.st_mode)
                ? snprintf(file, sizeof(file), "%s/config.json", path)
                : snprintf(file, sizeof(file), "%s", path);
    if (n < 0 || (size_t)n >= sizeof(file)) {
        return fail(err, errlen, "path too long");
    }
    FILE *f = fopen(file, "rb");
    if (!f) {
        return fail(err, errlen, "cannot open %s: %s", file, strerror(errno));
    }
    char *buf = malloc(MAX_CONFIG_BYTES + 1);
    size_t len = buf ? fread(buf, 1, MAX_CONFIG_BYTES + 1, f) : 0;
    bool bad = !buf || ferror(f);
    fclose(f);
    if (bad || len > MAX_CONFIG_BYTES) {
        free(buf);
        return fail(err, errlen, "%s is unreadable or larger than %d bytes", file,
                    MAX_CONFIG_BYTES);
    }
    int rc = rt_hf_config_parse(cfg, buf, len, err, errlen);
    free(buf);
    return rc;
}

void rt_hf_rope_inv_freq(const rt_hf_config *cfg, float *inv_freq)
{
    const int half = cfg->head_dim / 2;
    const double pi = 3.14159265358979323846;
    for (int i = 0; i < half; i++) {
        double f = pow(cfg->rope_theta, -2.0 * i / (double)cfg->head_dim);
        if (cfg->rope_scaling.type == RT_HF_ROPE_LINEAR) {
            f /= cfg->rope_scaling.factor;
        } else if (cfg->rope_scaling.type == RT_HF_ROPE_LLAMA3) {
            const double factor = cfg->rope_scaling.factor;
            const double lo = cfg->rope_scaling.low_freq_factor;
            const double hi = cfg->rope_scaling.high_freq_factor;
            const double old_ctx = cfg->rope_scaling.original_max_position_embeddings;
            const double wavelen = 2.0 * pi / f;
            if (wavelen > old_ctx / lo) {
                f /= factor; /* long wavelengths: interpolate */
            } else if (wavelen >= old_ctx / hi) {
                /* between the two: blend smoothly */
                const double smooth = (old_ctx / wavelen - lo) / (hi - lo);
                f = (1.0 - smooth) * f / factor + smooth * f;
            }
        }
        inv_freq[i] = (float)f;
    }
}
