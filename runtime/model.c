/*
 * model.c - loads a Llama-family model from GGUF: hyperparameters, tensors
 * (checked for presence, shape and type), the tokenizer, and the scratch of
 * one forward step; the tensor-parallel ranks (each with its thread pool) are
 * built by tp.c. Also the per-sequence KV cache.
 *
 * F32 tensors are used in place from the mapping; F16 and BF16 ones are
 * widened to f32 once at load. Any other tensor type is refused by name until
 * the quantized kernels exist.
 */
#include "runtime/model_internal.h"
#include "runtime/safetensors.h"

#include <math.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>

#define ERR(...) (snprintf(err, errlen, __VA_ARGS__), -1)

static int get_hparam_u(const rt_gguf *g, const char *arch, const char *suffix, bool required,
                        uint64_t dflt, uint64_t max, int *out, char *err, size_t errlen)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    uint64_t v;
    int rc = rt_gguf_get_uint(g, key, &v);
    if (rc == -1) {
        if (required)
            return ERR("model: missing hyperparameter '%s'", key);
        v = dflt;
    } else if (rc != 0) {
        return ERR("model: hyperparameter '%s' has the wrong type (expected an integer)", key);
    }
    if (v == 0 || v > max)
        return ERR("model: hyperparameter '%s' = %llu is out of range [1, %llu]", key,
                   (unsigned long long)v, (unsigned long long)max);
    *out = (int)v;
    return 0;
}

static int get_hparam_f(const rt_gguf *g, const char *arch, const char *suffix, bool required,
                        double dflt, double lo, double hi, float *out, char *err, size_t errlen)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    double v;
    int rc = rt_gguf_get_float(g, key, &v);
    if (rc == -1) {
        if (required)
            return ERR("model: missing hyperparameter '%s'", key);
        v = dflt;
    } else if (rc != 0) {
        return ERR("model: hyperparameter '%s' has the wrong type (expected a float)", key);
    }
    if (!(v >= lo && v <= hi))
        return ERR("model: hyperparameter '%s' = %g is out of range [%g, %g]", key, v, lo, hi);
    *out = (float)v;
    return 0;
}

static int read_hparams(rt_model *m, char *err, size_t errlen)
{
    const rt_gguf *g = m->gguf;
    rt_hparams *hp = &m->hp;
    rt_gguf_str arch;
    if (rt_gguf_get_str(g, "general.architecture", &arch) != 0)
        return ERR("model: missing 'general.architecture'");
    if (arch.len >= sizeof(hp->arch))
        return ERR("model: unsupported architecture (name of %llu bytes)",
                   (unsigned long long)arch.len);
    memcpy(hp->arch, arch.ptr, arch.len);
    hp->arch[arch.len] = 0;
    /* By metadata, not by name guessing: llama and mistral share llama's graph;
     * qwen2 adds q/k/v biases and rotates NeoX-style pairs, as its converter
     * leaves the Hugging Face row order. */
    if (strcmp(hp->arch, "qwen2") == 0) {
        hp->rope_neox = true;
        hp->qkv_bias = true;
    } else if (strcmp(hp->arch, "llama") != 0 && strcmp(hp->arch, "mistral") != 0) {
        return ERR("model: unsupported architecture '%s' (supported: llama, mistral, qwen2)",
                   hp->arch);
    }
    rt_gguf_str name;
    if (rt_gguf_get_str(g, "general.name", &name) == 0 && name.len < sizeof(hp->name)) {
        memcpy(hp->name, name.ptr, name.len);
        hp->name[name.len] = 0;
    }
    const char *a = hp->arch;
    if (get_hparam_u(g, a, "embedding_length", true, 0, 1 << 16, &hp->dim, err, errlen) ||
        get_hparam_u(g, a, "block_count", true, 0, 1024, &hp->n_layers, err, errlen) ||
        get_hparam_u(g, a, "feed_forward_length", true, 0, 1 << 20, &hp->ffn_dim, err, errlen) ||
        get_hparam_u(g, a, "attention.head_count", true, 0, 1024, &hp->n_heads, err, errlen) ||
        get_hparam_u(g, a, "context_length", true, 0, 1 << 24, &hp->n_ctx_train, err, errlen))
        return -1;
    if (get_hparam_u(g, a, "attention.head_count_kv", false, (uint64_t)hp->n_heads, 1024,
                     &hp->n_kv_heads, err, errlen))
        return -1;
    if (hp->dim % hp->n_heads != 0)
        return ERR("model: embedding_length %d is not a multiple of head_count %d", hp->dim,
                   hp->n_heads);
    hp->head_dim = hp->dim / hp->n_heads;
    if (hp->n_heads % hp->n_kv_heads != 0)
        return ERR("model: head_count %d is not a multiple of head_count_kv %d", hp->n_heads,
                   hp->n_kv_heads);
    if (hp->head_dim > KERN_ATTN_MAX_HEAD_DIM || hp->n_heads / hp->n_kv_heads > KERN_ATTN_MAX_GROUP)
        return ERR("model: head size %d or query group %d is larger than supported (%d, %d)",
                   hp->head_dim, hp->n_heads / hp->n_kv_heads, KERN_ATTN_MAX_HEAD_DIM,
                   KERN_ATTN_MAX_GROUP);
    if (get_hparam_u(g, a, "rope.dimension_count", false, (uint64_t)hp->head_dim,
                     (uint64_t)hp->head_dim, &hp->rope_dim, err, errlen))
        return -1;
    if (hp->rope_dim % 2 != 0)
        return ERR("model: rope.dimension_count %d is odd", hp->rope_dim);
    if (get_hparam_f(g, a, "rope.freq_base", false, hp->qkv_bias ? 1000000.0 : 10000.0, 1.0, 1e12,
                     &hp->rope_base, err, errlen) ||
        get_hparam_f(g, a, "attention.layer_norm_rms_epsilon", true, 0, 0.0, 1.0, &hp->norm_eps,
                     err, errlen))
        return -1;
    return 0;
}

/* Finds a tensor, checks its shape (innermost first) and returns its data as
 * f32, widening F16/BF16 into an owned copy. */
static int get_tensor(rt_model *m, const char *name, uint64_t ne0, uint64_t ne1, bool optional,
                      const float **out, char *err, size_t errlen)
{
    const rt_gguf_tensor *t = rt_gguf_find_tensor(m->gguf, name);
    *out = NULL;
    if (!t) {
        if (optional)
            return 0;
        return ERR("model: missing tensor '%s'", name);
    }
    const uint32_t want_dims = ne1 > 1 ? 2 : 1;
    bool ok = t->ne[0] == ne0 && t->ne[1] == ne1 && t->ne[2] == 1 && t->ne[3] == 1;
    if (!ok || (t->n_dims != want_dims && !(t->n_dims == 2 && ne1 == 1)))
        return ERR("model: tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%llu, %llu]",
                   name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                   (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                   (unsigned long long)ne0, (unsigned long long)ne1);
    const size_t n = (size_t)(ne0 * ne1);
    if (t->type == RT_GGML_F32) {
        *out = t->data;
        return 0;
    }
    if (t->type != RT_GGML_F16 && t->type != RT_GGML_BF16)
        return ERR("model: tensor '%s' has type %s, which this build cannot run yet "
                   "(supported: F32, F16, BF16)",
                   name, rt_ggml_type_name(t->type));
    float *buf = malloc(n * sizeof(float));
    float **owned = realloc(m->owned, sizeof(float *) * (size_t)(m->n_owned + 1));
    if (!buf || !owned) {
        free(buf);
        if (owned)
            m->owned = owned;
        return ERR("model: out of memory widening tensor '%s'", name);
    }
    m->owned = owned;
    m->owned[m->n_owned++] = buf;
    /* The data may be only 2-byte aligned; read it through memcpy-safe rows. */
    uint16_t tmp[256];
    const uint8_t *src = t->data;
    for (size_t i = 0; i < n; i += 256) {
        const size_t c = n - i < 256 ? n - i : 256;
        memcpy(tmp, src + i * 2, c * 2);
        if (t->type == RT_GGML_F16)
            kern_f16_to_f32_row(buf + i, tmp, c);
        else
            kern_bf16_to_f32_row(buf + i, tmp, c);
    }
    *out = buf;
    return 0;
}

/* A matrix weight: F32 in place; the types the quantized kernels run stay in
 * the mapping as they are (K must be a multiple of the type's block). */
static int get_weight(rt_model *m, const char *name, uint64_t ne0, uint64_t ne1, bool optional,
                      rt_weight *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    const rt_gguf_tensor *t = rt_gguf_find_tensor(m->gguf, name);
    if (!t) {
        if (optional)
            return 0;
        return ERR("model: missing tensor '%s'", name);
    }
    if (t->type == RT_GGML_F32 || !kern_type_is_weight((int)t->type)) {
        const float *f;
        if (get_tensor(m, name, ne0, ne1, optional, &f, err, errlen) != 0)
            return -1;
        out->data = f;
        out->type = KERN_TYPE_F32;
        out->row_bytes = (size_t)ne0 * sizeof(float);
        return 0;
    }
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
        return ERR("model: tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%llu, %llu]",
                   name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                   (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                   (unsigned long long)ne0, (unsigned long long)ne1);
    const size_t rb = kern_row_bytes((int)t->type, (int64_t)ne0);
    if (rb == 0 || rb * ne1 != t->nbytes)
        return ERR("model: tensor '%s' of type %s: rows of %llu elements do not fit its blocks",
                   name, rt_ggml_type_name(t->type), (unsigned long long)ne0);
    out->data = t->data;
    out->type = (int)t->type;
    out->row_bytes = rb;
    return 0;
}

static int load_tensors(rt_model *m, char *err, size_t errlen)
{
    const rt_hparams *hp = &m->hp;
    const uint64_t dim = (uint64_t)hp->dim, vocab = (uint64_t)hp->n_vocab;
    const uint64_t qd = (uint64_t)hp->n_heads * (uint64_t)hp->head_dim;
    const uint64_t kvd = (uint64_t)hp->n_kv_heads * (uint64_t)hp->head_dim;
    const uint64_t ffn = (uint64_t)hp->ffn_dim;
    if (get_weight(m, "token_embd.weight", dim, vocab, false, &m->tok_embd, err, errlen) ||
        get_tensor(m, "output_norm.weight", dim, 1, false, &m->output_norm, err, errlen) ||
        get_weight(m, "output.weight", dim, vocab, true, &m->output, err, errlen))
        return -1;
    if (!m->output.data) /* tied embeddings */
        m->output = m->tok_embd;
    m->layers = calloc((size_t)hp->n_layers, sizeof(rt_layer));
    if (!m->layers)
        return ERR("model: out of memory");
    for (int l = 0; l < hp->n_layers; l++) {
        rt_layer *L = &m->layers[l];
        char nn[96];
        snprintf(nn, sizeof(nn), "blk.%d.attn_norm.weight", l);
        if (get_tensor(m, nn, dim, 1, false, &L->attn_norm, err, errlen))
            return -1;
        snprintf(nn, sizeof(nn), "blk.%d.ffn_norm.weight", l);
        if (get_tensor(m, nn, dim, 1, false, &L->ffn_norm, err, errlen))
            return -1;
        if (hp->qkv_bias) {
            snprintf(nn, sizeof(nn), "blk.%d.attn_q.bias", l);
            if (get_tensor(m, nn, qd, 1, false, &L->bq, err, errlen))
                return -1;
            snprintf(nn, sizeof(nn), "blk.%d.attn_k.bias", l);
            if (get_tensor(m, nn, kvd, 1, false, &L->bk, err, errlen))
                return -1;
            snprintf(nn, sizeof(nn), "blk.%d.attn_v.bias", l);
            if (get_tensor(m, nn, kvd, 1, false, &L->bv, err, errlen))
                return -1;
        }
        struct {
            const char *suffix;
            uint64_t ne0, ne1;
            rt_weight *dst;
        } want[] = {
            {"attn_q", dim, qd, &L->wq},        {"attn_k", dim, kvd, &L->wk},
            {"attn_v", dim, kvd, &L->wv},       {"attn_output", qd, dim, &L->wo},
            {"ffn_gate", dim, ffn, &L->w_gate}, {"ffn_up", dim, ffn, &L->w_up},
            {"ffn_down", ffn, dim, &L->w_down},
        };
        if (m->progress)
            m->progress(m->progress_ctx, (float)l / (float)hp->n_layers);
        for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
            char name[96];
            snprintf(name, sizeof(name), "blk.%d.%s.weight", l, want[i].suffix);
            if (get_weight(m, name, want[i].ne0, want[i].ne1, false, want[i].dst, err, errlen))
                return -1;
        }
    }
    return 0;
}

/* The model-wide part of a step's scratch; each rank's is made by rt_tp_init. */
static int alloc_step_buffers(rt_model *m, char *err, size_t errlen)
{
    const size_t T = (size_t)m->max_batch_tokens;
    m->pos = calloc(T, sizeof(int32_t));
    m->last = calloc(T * (size_t)m->hp.dim, sizeof(float));
    m->logits = calloc(T * (size_t)m->hp.n_vocab, sizeof(float));
    if (!m->pos || !m->last || !m->logits)
        return ERR("model: out of memory for the scratch of %zu batch tokens", T);
    return 0;
}

/* Llama 3 GGUFs carry their scaled RoPE as per-frequency divisors in
 * rope_freqs.weight: the table is base^(-2i/d) / factor[i]. */
static int load_rope_freqs(rt_model *m, char *err, size_t errlen)
{
    const rt_gguf_tensor *t = rt_gguf_find_tensor(m->gguf, "rope_freqs.weight");
    if (!t)
        return 0;
    const int half = m->hp.rope_dim / 2;
    const float *factors;
    if (get_tensor(m, "rope_freqs.weight", (uint64_t)half, 1, false, &factors, err, errlen))
        return -1;
    m->rope_inv_freq = malloc(sizeof(float) * (size_t)half);
    if (!m->rope_inv_freq)
        return ERR("model: out of memory");
    for (int i = 0; i < half; i++) {
        if (!(factors[i] > 0.0f))
            return ERR("model: rope_freqs.weight[%d] = %g is not positive", i, factors[i]);
        m->rope_inv_freq[i] =
            powf(m->hp.rope_base, -2.0f * (float)i / (float)m->hp.rope_dim) / factors[i];
    }
    return 0;
}

int rt_model_load(rt_model **out, const char *path, const rt_model_opts *opts, char *err,
                  size_t errlen)
{
    *out = NULL;
    if (opts && (opts->tp < 0 || opts->tp > RT_TP_MAX_RANKS))
        return ERR("model: tp %d is out of range [1, %d]", opts->tp, RT_TP_MAX_RANKS);
    rt_model *m = calloc(1, sizeof(*m));
    if (!m)
        return ERR("model: out of memory");
    char inner[512];
    if (opts) {
        m->progress = opts->progress;
        m->progress_ctx = opts->progress_ctx;
    }
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        /* A Hugging Face directory: config.json + safetensors + tokenizer.json. */
        if (rt_model_load_hf(m, path, err, errlen) != 0)
            goto fail;
    } else {
        if (rt_gguf_open(&m->gguf, path, inner, sizeof(inner)) != 0) {
            snprintf(err, errlen, "%s", inner);
            rt_model_destroy(m);
            return -1;
        }
        if (read_hparams(m, err, errlen) != 0)
            goto fail;
        if (rt_tokenizer_from_gguf(&m->tok, m->gguf, inner, sizeof(inner)) != 0) {
            snprintf(err, errlen, "%s", inner);
            goto fail;
        }
        m->hp.n_vocab = (int)rt_tokenizer_n_vocab(m->tok);
        if (load_tensors(m, err, errlen) != 0)
            goto fail;
        if (load_rope_freqs(m, err, errlen) != 0)
            goto fail;
    }
    if (m->progress)
        m->progress(m->progress_ctx, 1.0f);
    m->n_ctx = opts && opts->n_ctx > 0 ? opts->n_ctx : m->hp.n_ctx_train;
    m->max_batch_tokens = opts && opts->max_batch_tokens > 0 ? opts->max_batch_tokens : 512;
    const int threads = opts && opts->n_threads > 0 ? opts->n_threads : 1;
    const int tp = opts && opts->tp > 1 ? opts->tp : 1;
    if (alloc_step_buffers(m, err, errlen) != 0)
        goto fail;
    /* Each rank gets an equal share of the compute threads (at least one). */
    const int rank_threads = threads / tp > 1 ? threads / tp : 1;
    /* On CUDA the ranks are the backend's (forward_cuda.c): the host keeps one. */
    const bool cuda = opts && opts->backend == RT_BACKEND_CUDA;
    if (rt_tp_init(m, cuda ? 1 : tp, rank_threads, err, errlen) != 0)
        goto fail;
    if (cuda) {
        int devs[RT_TP_MAX_RANKS];
        for (int r = 0; r < tp; r++)
            devs[r] = opts->devices ? opts->devices[r] : opts->device + r;
        const rt_cuda_opts co = {.devices = devs,
                                 .n_ranks = tp,
                                 .f32_weights = opts->device_f32_weights,
                                 .graphs = !opts->cuda_graphs_off};
        if (rt_cuda_attach(m, &co, err, errlen) != 0)
            goto fail;
    }
    *out = m;
    return 0;
fail:
    rt_model_destroy(m);
    return -1;
}

void rt_model_destroy(rt_model *m)
{
    if (!m)
        return;
    rt_cuda_detach(m);
    rt_tp_free(m);
    free(m->pos);
    free(m->last);
    free(m->logits);
    for (int i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    rt_tokenizer_destroy(m->tok);
    rt_gguf_close(m->gguf);
    rt_st_dir_close(m->st);
    free(m->rope_inv_freq);
    free(m);
}

const rt_hparams *rt_model_hparams(const rt_model *m)
{
    return &m->hp;
}
const rt_tokenizer *rt_model_tokenizer(const rt_model *m)
{
    return m->tok;
}
int rt_model_n_ctx(const rt_model *m)
{
    return m->n_ctx;
}

const char *rt_model_chat_template(const rt_model *m, size_t *len)
{
    rt_gguf_str s;
    if (!m->gguf) {
        *len = 0;
        return NULL;
    }
    if (rt_gguf_get_str(m->gguf, "tokenizer.chat_template", &s) != 0 || s.len == 0) {
        *len = 0;
        return NULL;
    }
    *len = (size_t)s.len;
    return s.ptr;
}
int rt_model_max_batch_tokens(const rt_model *m)
{
    return m->max_batch_tokens;
}
rt_backend rt_model_backend(const rt_model *m)
{
    return m->cuda ? RT_BACKEND_CUDA : RT_BACKEND_CPU;
}

void rt_model_graph_stats(const rt_model *m, rt_graph_stats *out)
{
    if (m->cuda)
        rt_cuda_graph_stats(m->cuda, out);
    else
        memset(out, 0, sizeof(*out));
}

size_t rt_kv_bytes_per_token(const rt_model *m)
{
    return 2 * sizeof(float) * (size_t)m->hp.n_layers * (size_t)m->hp.n_kv_heads *
           (size_t)m->hp.head_dim;
}

rt_kv_pool *rt_kv_pool_create(const rt_model *m, int n_blocks, int block_size)
{
    if (n_blocks <= 0 || block_size <= 0)
        return NULL;
    rt_kv_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->n_layers = m->hp.n_layers;
    p->kv_dim = m->hp.n_kv_heads * m->hp.head_dim;
    p->n_kv_heads = m->hp.n_kv_heads;
    p->block_size = block_size;
    p->n_blocks = n_blocks;
    if (m->cuda) { /* the pool lives on the model's GPU */
        if (rt_cuda_kv_alloc(m->cuda, p) != 0) {
            free(p);
            return NULL;
        }
        return p;
    }
    const size_t n =
        (size_t)p->n_layers * (size_t)n_blocks * (size_t)block_size * (size_t)p->kv_dim;
    p->k = malloc(n * sizeof(float));
    p->v = malloc(n * sizeof(float));
    if (!p->k || !p->v) {
        rt_kv_pool_destroy(p);
        return NULL;
    }
    return p;
}

void rt_kv_pool_fill_block(rt_kv_pool *p, int id, float value)
{
    if (!p || id < 0 || id >= p->n_blocks)
        return;
    const size_t n = (size_t)p->block_size * (size_t)p->kv_dim;
    for (int l = 0; l < p->n_layers; l++) {
        const size_t off = ((size_t)l * (size_t)p->n_blocks + (size_t)id) * n;
        for (size_t i = 0; i < n; i++)
            p->k[off + i] = p->v[off + i] = value;
    }
}

void rt_kv_pool_destroy(rt_kv_pool *p)
{
    if (!p)
        return;
    if (p->cuda)
        rt_cuda_kv_free(p);
    else {
        free(p->k);
        free(p->v);
    }
    free(p);
}

int rt_kv_pool_blocks(const rt_kv_pool *p)
{
    return p->n_blocks;
}
int rt_kv_pool_block_size(const rt_kv_pool *p)
{
    return p->block_size;
}

void rt_kv_pool_copy_block(rt_kv_pool *p, int src, int dst)
{
    if (src < 0 || dst < 0 || src >= p->n_blocks || dst >= p->n_blocks || src == dst)
        return;
    if (p->cuda) {
        rt_cuda_kv_copy_block(p, src, dst);
        return;
    }
    const size_t block = (size_t)p->block_size * (size_t)p->kv_dim;
    const size_t layer = (size_t)p->n_blocks * block;
    for (int l = 0; l < p->n_layers; l++) {
        memcpy(p->k + l * layer + (size_t)dst * block, p->k + l * layer + (size_t)src * block,
               block * sizeof(float));
        memcpy(p->v + l * layer + (size_t)dst * block, p->v + l * layer + (size_t)src * block,
               block * sizeof(float));
    }
}

rt_kv *rt_kv_create(const rt_model *m, int capacity)
{
    if (capacity <= 0 || capacity > m->n_ctx)
        return NULL;
    rt_kv *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return NULL;
    kv->pool = rt_kv_pool_create(m, 1, capacity);
    if (!kv->pool) {
        free(kv);
        return NULL;
    }
    return kv;
}

void rt_kv_destroy(rt_kv *kv)
{
    if (!kv)
        return;
    rt_kv_pool_destroy(kv->pool);
    free(kv);
}

int rt_kv_len(const rt_kv *kv)
{
    return kv->len;
}
int rt_kv_capacity(const rt_kv *kv)
{
    return kv->pool->block_size;
}

void rt_kv_truncate(rt_kv *kv, int n)
{
    if (n >= 0 && n < kv->len)
        kv->len = n;
}

size_t rt_kv_bytes(const rt_kv *kv)
{
    return 2 * sizeof(float) * (size_t)kv->pool->n_layers * (size_t)kv->pool->block_size *
           (size_t)kv->pool->kv_dim;
}
