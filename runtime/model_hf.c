/*
 * model_hf.c - loads a Hugging Face model directory (config.json,
 * model.safetensors or a sharded index, tokenizer.json) into an rt_model.
 *
 * Hyperparameters come from config.json (llama, mistral, qwen2), weights stay
 * memory-mapped (F32 in place when aligned, F16/BF16 run by the quantized
 * kernels as they are), and because Hugging Face stores Q and K rows in the
 * NeoX half-split order, RoPE rotates (i, i + d/2) pairs: no weight is
 * permuted or copied. Llama 3's rope_scaling becomes a frequency table.
 */
#include "runtime/model_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/hf_config.h"
#include "runtime/safetensors.h"

#define ERR(...) (snprintf(err, errlen, __VA_ARGS__), -1)

/* One weight of shape [rows, cols] (outermost first), by its Hugging Face name. */
static int hf_weight(rt_model *m, const char *name, uint64_t rows, uint64_t cols, bool optional,
                     rt_weight *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    const rt_st_tensor *t = rt_st_dir_find(m->st, name);
    if (!t) {
        if (optional)
            return 0;
        return ERR("model: missing tensor '%s'", name);
    }
    const bool vec = cols == 0;
    if ((vec && (t->n_dims != 1 || t->shape[0] != rows)) ||
        (!vec && (t->n_dims != 2 || t->shape[0] != rows || t->shape[1] != cols)))
        return ERR("model: tensor '%s' has shape [%llu, %llu], expected [%llu, %llu]", name,
                   (unsigned long long)t->shape[0],
                   (unsigned long long)(t->n_dims > 1 ? t->shape[1] : 0), (unsigned long long)rows,
                   (unsigned long long)cols);
    const uint64_t n = vec ? rows : rows * cols;
    int type;
    switch (t->dtype) {
    case RT_ST_F32:
        type = KERN_TYPE_F32;
        break;
    case RT_ST_F16:
        type = KERN_TYPE_F16;
        break;
    case RT_ST_BF16:
        type = KERN_TYPE_BF16;
        break;
    default:
        return ERR("model: tensor '%s' has dtype %s (supported: F32, F16, BF16)", name,
                   rt_st_dtype_name(t->dtype));
    }
    /* Vectors (norms, biases) and unaligned or embedding data become f32 copies:
     * the kernels read norms as f32 and f32 rows must be 4-byte aligned. */
    if (vec || !t->aligned || (type == KERN_TYPE_F32 && ((uintptr_t)t->data % 4) != 0)) {
        float *buf = malloc(sizeof(float) * (size_t)n);
        float **owned = realloc(m->owned, sizeof(float *) * (size_t)(m->n_owned + 1));
        if (!buf || !owned) {
            free(buf);
            if (owned)
                m->owned = owned;
            return ERR("model: out of memory for tensor '%s'", name);
        }
        m->owned = owned;
        m->owned[m->n_owned++] = buf;
        const uint8_t *src = t->data;
        for (uint64_t i = 0; i < n; i++) {
            if (type == KERN_TYPE_F32) {
                memcpy(&buf[i], src + i * 4, 4);
            } else {
                uint16_t h;
                memcpy(&h, src + i * 2, 2);
                buf[i] = type == KERN_TYPE_F16 ? kern_f16_to_f32(h) : kern_bf16_to_f32(h);
            }
        }
        out->data = buf;
        out->type = KERN_TYPE_F32;
        out->row_bytes = (size_t)(vec ? rows : cols) * sizeof(float);
        return 0;
    }
    out->data = t->data;
    out->type = type;
    out->row_bytes = (size_t)cols * (type == KERN_TYPE_F32 ? 4 : 2);
    return 0;
}

static int hf_vector(rt_model *m, const char *name, uint64_t n, const float **out, char *err,
                     size_t errlen)
{
    rt_weight w;
    if (hf_weight(m, name, n, 0, false, &w, err, errlen) != 0)
        return -1;
    *out = w.data;
    return 0;
}

int rt_model_load_hf(rt_model *m, const char *dir, char *err, size_t errlen)
{
    rt_hf_config cfg;
    char inner[512], path[4096];
    if (rt_hf_config_load(&cfg, dir, inner, sizeof(inner)) != 0)
        return ERR("%s", inner);
    if (cfg.sliding_window > 0)
        return ERR("model: config.json sets sliding_window %d, which this server does not run",
                   cfg.sliding_window);
    if (cfg.o_bias || cfg.mlp_bias)
        return ERR("model: config.json asks for o_proj / mlp biases, which this server does "
                   "not run");
    rt_hparams *hp = &m->hp;
    snprintf(hp->arch, sizeof(hp->arch), "%s", cfg.model_type);
    snprintf(hp->name, sizeof(hp->name), "%s", cfg.architecture);
    hp->dim = cfg.hidden_size;
    hp->n_layers = cfg.num_hidden_layers;
    hp->n_heads = cfg.num_attention_heads;
    hp->n_kv_heads = cfg.num_key_value_heads;
    hp->head_dim = cfg.head_dim;
    hp->rope_dim = cfg.head_dim;
    hp->ffn_dim = cfg.intermediate_size;
    hp->n_ctx_train = cfg.max_position_embeddings;
    hp->rope_base = (float)cfg.rope_theta;
    hp->norm_eps = (float)cfg.rms_norm_eps;
    hp->rope_neox = true;
    hp->qkv_bias = cfg.qkv_bias;
    if (hp->n_heads * hp->head_dim != hp->dim)
        return ERR("model: head_dim %d x %d heads differs from hidden_size %d (not supported)",
                   hp->head_dim, hp->n_heads, hp->dim);
    if (hp->head_dim > KERN_ATTN_MAX_HEAD_DIM || hp->n_heads % hp->n_kv_heads != 0 ||
        hp->n_heads / hp->n_kv_heads > KERN_ATTN_MAX_GROUP)
        return ERR("model: head size %d or query group of %d heads is not supported", hp->head_dim,
                   hp->n_heads / (hp->n_kv_heads ? hp->n_kv_heads : 1));
    if (cfg.rope_scaling.type != RT_HF_ROPE_NONE) {
        m->rope_inv_freq = malloc(sizeof(float) * (size_t)(hp->head_dim / 2));
        if (!m->rope_inv_freq)
            return ERR("model: out of memory");
        rt_hf_rope_inv_freq(&cfg, m->rope_inv_freq);
    }

    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    if (rt_tokenizer_from_hf_file(&m->tok, path, inner, sizeof(inner)) != 0)
        return ERR("%s", inner);
    if ((cfg.bos_token_id >= 0 || cfg.n_eos > 0) &&
        rt_tokenizer_set_special_ids(m->tok, cfg.bos_token_id,
                                     cfg.n_eos > 0 ? cfg.eos_token_ids[0] : -1, inner,
                                     sizeof(inner)) != 0)
        return ERR("%s", inner);
    /* Logits for the ids the tokenizer can print: the embedding may have padding
     * rows past the vocabulary (Qwen2 has 151936 rows for 151665 tokens). */
    const int tok_vocab = (int)rt_tokenizer_n_vocab(m->tok);
    if (tok_vocab > cfg.vocab_size)
        return ERR("model: tokenizer.json has %d tokens, config.json vocab_size %d", tok_vocab,
                   cfg.vocab_size);
    hp->n_vocab = tok_vocab;

    if (rt_st_dir_open(&m->st, dir, inner, sizeof(inner)) != 0)
        return ERR("%s", inner);
    const uint64_t dim = (uint64_t)hp->dim, vocab = (uint64_t)cfg.vocab_size;
    const uint64_t qd = (uint64_t)hp->n_heads * (uint64_t)hp->head_dim;
    const uint64_t kvd = (uint64_t)hp->n_kv_heads * (uint64_t)hp->head_dim;
    const uint64_t ffn = (uint64_t)hp->ffn_dim;
    if (hf_weight(m, "model.embed_tokens.weight", vocab, dim, false, &m->tok_embd, err, errlen) ||
        hf_vector(m, "model.norm.weight", dim, &m->output_norm, err, errlen) ||
        hf_weight(m, "lm_head.weight", vocab, dim, cfg.tie_word_embeddings, &m->output, err,
                  errlen))
        return -1;
    if (!m->output.data)
        m->output = m->tok_embd;
    m->layers = calloc((size_t)hp->n_layers, sizeof(rt_layer));
    if (!m->layers)
        return ERR("model: out of memory");
    for (int l = 0; l < hp->n_layers; l++) {
        rt_layer *L = &m->layers[l];
        char n[160];
#define NAME(suffix) (snprintf(n, sizeof(n), "model.layers.%d.%s", l, suffix), n)
        if (m->progress)
            m->progress(m->progress_ctx, (float)l / (float)hp->n_layers);
        if (hf_vector(m, NAME("input_layernorm.weight"), dim, &L->attn_norm, err, errlen) ||
            hf_vector(m, NAME("post_attention_layernorm.weight"), dim, &L->ffn_norm, err, errlen) ||
            hf_weight(m, NAME("self_attn.q_proj.weight"), qd, dim, false, &L->wq, err, errlen) ||
            hf_weight(m, NAME("self_attn.k_proj.weight"), kvd, dim, false, &L->wk, err, errlen) ||
            hf_weight(m, NAME("self_attn.v_proj.weight"), kvd, dim, false, &L->wv, err, errlen) ||
            hf_weight(m, NAME("self_attn.o_proj.weight"), dim, qd, false, &L->wo, err, errlen) ||
            hf_weight(m, NAME("mlp.gate_proj.weight"), ffn, dim, false, &L->w_gate, err, errlen) ||
            hf_weight(m, NAME("mlp.up_proj.weight"), ffn, dim, false, &L->w_up, err, errlen) ||
            hf_weight(m, NAME("mlp.down_proj.weight"), dim, ffn, false, &L->w_down, err, errlen))
            return -1;
        if (hp->qkv_bias &&
            (hf_vector(m, NAME("self_attn.q_proj.bias"), qd, &L->bq, err, errlen) ||
             hf_vector(m, NAME("self_attn.k_proj.bias"), kvd, &L->bk, err, errlen) ||
             hf_vector(m, NAME("self_attn.v_proj.bias"), kvd, &L->bv, err, errlen)))
            return -1;
#undef NAME
    }
    return 0;
}
