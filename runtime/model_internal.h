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
    float *x;      /* [T, dim] residual stream (every rank holds the same one) */
    float *xb;     /* [T, dim] normed input */
    float *q;      /* [T, qd] */
    float *k, *v;  /* [T, kvd] */
    float *att;    /* [T, qd] attention output */
    float *proj;   /* [T, dim] partial output projection, then its all-reduced sum */
    float *gate;   /* [T, ffn] */
    float *up;     /* [T, ffn] */
    int32_t *rows; /* [T] rows the last layer computes past K and V (see forward.c) */
    int32_t *pos;  /* [T] their positions */
} rt_scratch;

/* A rank's scratch for compressed sequences: gathered f32 rows and an
 * identity block table (grown on demand, freed with the rank). */
typedef struct {
    float *buf;
    size_t cap;
    int32_t *ids;
    int ids_cap;
} rt_kvq_ws;

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
    rt_kvq_ws kvq_ws;     /* compressed sequences' gather workspace */
    int rc;               /* 0, or -1 when this step failed on this rank (err says why) */
    char err[256];
} rt_rank;

typedef struct rt_tp_threads rt_tp_threads;
typedef struct rt_cuda rt_cuda;

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
    rt_cuda *cuda; /* the CUDA backend (forward_cuda.c), or NULL: the CPU */
};

struct rt_kv_pool {
    int n_layers, kv_dim, block_size, n_blocks;
    int n_kv_heads; /* kv_dim / head_dim: the geometry of compressed pages */
    /* Set when k and v are device memory of this CUDA backend (the model's
     * pools are, when it runs on CUDA); the host never reads them then. */
    rt_cuda *cuda;
    float *k; /* [n_layers][n_blocks * block_size][kv_dim] */
    float *v;
    /* On CUDA: rank r's keys and values on its GPU, [n_layers][n_blocks *
     * block_size][its kv heads x head_dim] (k and v are rank 0's). */
    float *rank_k[RT_TP_MAX_RANKS], *rank_v[RT_TP_MAX_RANKS];
};

struct rt_kv {
    rt_kv_pool *pool; /* one block of `capacity` positions */
    int32_t block0;   /* the block table: just block 0 */
    int len;
};

/* Compressed KV of one sequence inside a step (kv_compress.c). begin/end
 * bracket the step (end with ok false when it failed: nothing advances);
 * per layer, attend runs the sequence's rows over its compressed pages and
 * fp tail (once anything is compressed), after_attention scores and packs
 * what the step's plan says. */
int rt_kvq_begin_step(rt_kvq *q, int n_past, int n_new, char *err, size_t errlen);
void rt_kvq_end_step(rt_kvq *q, bool ok);
void rt_kvq_ws_free(rt_kvq_ws *ws);
/* kn, vn: the step's new K and V rows (a->n_q rows of kv_dim). Returns 0 when
 * the attention is done, 1 when the caller runs its own (exact or sparse)
 * attention over *dense instead (f32 rows: fp blocks, or gathered into ws),
 * -1 with err. */
int rt_kvq_attend(rt_kvq *q, kern_pool *pool, int layer, const kern_attn_args *a, const float *kn,
                  const float *vn, rt_kvq_ws *ws, kern_attn_args *dense, char *err, size_t errlen);
int rt_kvq_after_attention(rt_kvq *q, kern_pool *pool, int layer, const kern_attn_args *a,
                           const float *kn, const float *vn, rt_kvq_ws *ws, char *err,
                           size_t errlen);

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

/* The CUDA backend (forward_cuda.c). rt_cuda_attach starts one host thread
 * per rank, rank r on devices[r], uploads each rank's share of the weights,
 * allocates the step's device buffers and, with several ranks, the NCCL
 * communicator; 0, or -1 with err ("built without CUDA" in a build without
 * it). rt_cuda_detach undoes it (NULL-safe). Pools: rt_cuda_kv_alloc puts
 * each rank's share of p's keys and values on its device (lowering
 * p->n_blocks to what fits on all), 0 or -1; rt_cuda_kv_free and
 * rt_cuda_kv_copy_block are the device versions of freeing and
 * copy-on-write. rt_cuda_forward is rt_forward after its argument checks. */
typedef struct {
    const int *devices; /* [n_ranks], distinct */
    int n_ranks;        /* tensor-parallel ranks, 1..RT_TP_MAX_RANKS */
    bool f32_weights;   /* keep F32 matrices in f32 */
    bool graphs;        /* decode steps as CUDA graphs */
} rt_cuda_opts;

int rt_cuda_attach(rt_model *m, const rt_cuda_opts *o, char *err, size_t errlen);
void rt_cuda_detach(rt_model *m);
int rt_cuda_kv_alloc(rt_cuda *c, rt_kv_pool *p);
void rt_cuda_kv_free(rt_kv_pool *p);
void rt_cuda_kv_copy_block(rt_kv_pool *p, int src, int dst);
int rt_cuda_forward(rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen);
void rt_cuda_graph_stats(const rt_cuda *c, rt_graph_stats *out);

#endif
