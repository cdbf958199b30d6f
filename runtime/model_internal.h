/*
 * model_internal.h - the rt_model and rt_kv structs, shared by the loaders
 * (model.c, model_hf.c), tensor parallelism (tp.c) and the forward pass
 * (forward.c). Private to runtime/.
 */
#ifndef SIEVE_RUNTIME_MODEL_INTERNAL_H
#define SIEVE_RUNTIME_MODEL_INTERNAL_H

#include "kernels/collective.h"
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
    /* Bytes from one row to the next. Rows of other types are contiguous
     * (kern_row_bytes of the row); an F32 column slice (a tensor-parallel
     * rank's wo or w_down) has rows wider than the K it is multiplied with. */
    size_t row_bytes;
} rt_weight;

typedef struct {
    const float *attn_norm, *ffn_norm;
    rt_weight wq, wk, wv, wo, w_gate, w_up, w_down;
    const float *bq, *bk, *bv; /* qwen2's projection biases, or NULL */
} rt_layer;

/* One rank's scratch of a forward step, sized for max_batch_tokens at load;
 * widths are the rank's shard (qd = its heads x head_dim, and so on). */
typedef struct {
    float *x;     /* [T, dim] residual stream (every rank holds the same one) */
    float *xb;    /* [T, dim] normed input */
    float *q;     /* [T, qd] */
    float *k, *v; /* [T, kvd] */
    float *att;   /* [T, qd] attention output */
    float *proj;  /* [T, dim] partial output projection, then its all-reduced sum */
    float *gate;  /* [T, ffn] */
    float *up;    /* [T, ffn] */
} rt_scratch;

#define RT_TP_MAX_RANKS 8

/* One tensor-parallel rank: query heads [h0, h0 + n_h), kv heads
 * [kvh0, kvh0 + n_kvh) and FFN columns [f0, f0 + n_f) of every layer. With
 * tp == 1 the only rank holds the whole model. Built at load (runtime/tp.c);
 * during a step every field below `layers` belongs to the rank's thread. */
typedef struct {
    int rank;
    int h0, n_h, kvh0, n_kvh, f0, n_f;
    /* Per layer: wq/wk/wv/w_gate/w_up (and biases) are row slices of the
     * model's tensors, in place; wo and w_down are column slices: F32 in place
     * (row_bytes = the full row), other types copied at load into `owned`.
     * m->layers itself when tp == 1. */
    rt_layer *layers;
    void **owned;
    int n_owned;
    kern_pool *pool;       /* this rank's compute threads (the caller's included) */
    kern_flex_ws *flex_ws; /* FlexPrefill scratch for n_h heads, contexts up to n_ctx */
    uint64_t *mask_bits;   /* PowerAttention masks for up to max_batch_tokens queries */
    size_t mask_words;
    rt_scratch s;
    rt_attn_stats *stats; /* [max_batch_tokens]: this step's counts, per sequence */
    int rc;               /* 0, or -1 when this step failed on this rank (err says why) */
    char err[256];
} rt_rank;

typedef struct rt_tp_threads rt_tp_threads;

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
    void (*progress)(void *ctx, float frac);
    void *progress_ctx;
    float *rope_inv_freq; /* rope_dim / 2 entries when RoPE is scaled, else NULL */
    struct rt_st_dir *st; /* a Hugging Face directory's tensors, or NULL */
    /* Tensor parallelism (runtime/tp.c): tp ranks; rank 0 runs on the calling
     * (engine) thread, ranks 1.. on threads the model owns, started at load. */
    int tp;
    rt_rank *ranks;         /* [tp] */
    kern_comm *comm;        /* the ranks' all-reduce; NULL when tp == 1 */
    rt_tp_threads *threads; /* NULL when tp == 1 */
    /* The step the ranks run: written by the caller before it starts them,
     * read-only until they are done. */
    const rt_seq_batch *step_seqs;
    int step_n_seqs, step_T;
    int32_t *pos;  /* [T] positions of the step's tokens */
    float *last;   /* [T, dim] final hidden rows of sequences that want logits */
    float *logits; /* [T, n_vocab] */
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

/* Splits the loaded model over tp ranks (1..RT_TP_MAX_RANKS) with `threads`
 * compute threads each: the shards, their scratch, the communicator and the
 * rank threads (tp.c). 0, or -1 with err naming what cannot be split;
 * rt_tp_free undoes a partial result too. */
int rt_tp_init(rt_model *m, int tp, int threads, char *err, size_t errlen);
void rt_tp_free(rt_model *m);

/* Runs rt_forward_rank on every rank for the step in m->step_*, rank 0 on the
 * calling thread; returns when all are done. 0, or -1 with the first rank's
 * error. */
int rt_tp_run_step(rt_model *m, char *err, size_t errlen);

/* One rank's share of the step's layers (forward.c): on return rk->s.x holds
 * the final residual stream; a failure is recorded in rk->rc / rk->err, and
 * the rank still takes part in every collective so no other rank waits. */
void rt_forward_rank(rt_model *m, rt_rank *rk);

#endif
