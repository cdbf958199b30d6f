/*
 * model_internal.h - the rt_model and rt_kv structs, shared by the loader
 * (model.c) and the forward pass (forward.c). Private to runtime/.
 */
#ifndef SIEVE_RUNTIME_MODEL_INTERNAL_H
#define SIEVE_RUNTIME_MODEL_INTERNAL_H

#include "kernels/kernels.h"
#include "kernels/quant.h"
#include "runtime/gguf.h"
#include "runtime/model.h"

/* A weight matrix as stored: f32 (used in place or widened), or a GGUF type
 * the quantized kernels run directly (F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K,
 * Q6_K), kept zero-copy in the mapping. */
typedef struct {
    const void *data;
    int type; /* kern_type */
    size_t row_bytes;
} rt_weight;

typedef struct {
    const float *attn_norm, *ffn_norm;
    rt_weight wq, wk, wv, wo, w_gate, w_up, w_down;
    const float *bq, *bk, *bv; /* qwen2's projection biases, or NULL */
} rt_layer;

/* Scratch of one forward step, sized for max_batch_tokens at load. */
typedef struct {
    float *x;      /* [T, dim] residual stream */
    float *xb;     /* [T, dim] normed input */
    float *q;      /* [T, n_heads * head_dim] */
    float *k, *v;  /* [T, kv_dim] */
    float *att;    /* [T, n_heads * head_dim] attention output */
    float *proj;   /* [T, dim] */
    float *gate;   /* [T, ffn_dim] */
    float *up;     /* [T, ffn_dim] */
    int32_t *pos;  /* [T] */
    float *last;   /* [T, dim] final hidden rows of sequences that want logits */
    float *logits; /* [T, n_vocab] */
} rt_scratch;

struct rt_model {
    rt_hparams hp;
    rt_gguf *gguf;
    rt_tokenizer *tok;
    rt_weight tok_embd, output;
    const float *output_norm;
    rt_layer *layers;
    float **owned; /* f32 copies of F16/BF16 tensors */
    int n_owned;
    int n_ctx;
    int max_batch_tokens;
    kern_pool *pool;
    rt_scratch s;
    void (*progress)(void *ctx, float frac);
    void *progress_ctx;
    float *rope_inv_freq; /* rope_dim / 2 entries when RoPE is scaled, else NULL */
    struct rt_st_dir *st;  /* a Hugging Face directory's tensors, or NULL */
    kern_flex_ws *flex_ws; /* FlexPrefill scratch for contexts up to n_ctx */
    uint64_t *mask_bits;   /* PowerAttention masks for up to max_batch_tokens queries */
    size_t mask_words;
};

struct rt_kv_pool {
    int n_layers, kv_dim, block_size, n_blocks;
    float *k; /* [n_layers][n_blocks * block_size][kv_dim] */
    float *v;
};

struct rt_kv {
    rt_kv_pool *pool; /* one block of `capacity` positions */
    int32_t block0;   /* the block table: just block 0 */
    int len;
};

/* Fills m from a Hugging Face directory (model_hf.c). 0, or -1 with err. */
int rt_model_load_hf(rt_model *m, const char *dir, char *err, size_t errlen);

#endif
