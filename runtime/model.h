/*
 * model.h - a loaded Llama-family model and its forward pass.
 *
 * rt_model_load maps a GGUF file, checks the architecture, hyperparameters
 * and every tensor's presence, shape and type, builds the tokenizer and
 * allocates the scratch buffers of one forward step (nothing is allocated on
 * the hot path). A model is used by one thread at a time (the engine thread);
 * rt_kv caches belong to sequences and are passed to each step.
 */
#ifndef SIEVE_RUNTIME_MODEL_H
#define SIEVE_RUNTIME_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kernels.h"
#include "runtime/backend.h"
#include "runtime/tokenizer.h"

typedef struct {
    char arch[32];
    char name[128]; /* general.name, or "" */
    int n_vocab;
    int dim;      /* embedding_length */
    int n_layers; /* block_count */
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int rope_dim;
    int ffn_dim;
    int n_ctx_train; /* the model's context_length */
    float rope_base;
    float norm_eps;
    bool rope_neox; /* rotate (i, i + d/2) pairs (qwen2, Hugging Face layout) */
    bool qkv_bias;  /* attn_q/k/v carry biases (qwen2) */
} rt_hparams;

typedef struct {
    int n_threads;        /* compute threads; <= 0 means 1 */
    int max_batch_tokens; /* tokens in one forward step; <= 0 means 512 */
    int n_ctx;            /* context length used; <= 0 means the model's */
    /* Called now and then while weights load, with the fraction done. */
    void (*progress)(void *ctx, float frac);
    void *progress_ctx;
    /* Tensor-parallel ranks (1..8; 0 or 1: none): attention heads and FFN
     * columns are split over tp threads of this process, each with
     * max(1, n_threads / tp) compute threads. tp must divide the head and KV
     * head counts; rt_model_load refuses a split the weights cannot take. */
    int tp;
    /* The backend (runtime/backend.h; 0 is the CPU). RT_BACKEND_CUDA runs on
     * CUDA device `device`, or with tp > 1 on tp devices, one rank each (the
     * heads and FFN columns split as on the CPU, an NCCL all-reduce after the
     * attention output and FFN down projections): the weights are uploaded
     * once at load (f16, or bf16 for a tensor f16 cannot hold; F16/BF16 as
     * they are; quantized types dequantized), rt_kv_pool_create allocates
     * pools on the device(s), and rt_forward runs there, copying in only
     * token ids, positions and block tables, and out only the requested
     * logits. */
    rt_backend backend;
    int device;
    /* CUDA with tp > 1: the device of each rank (tp distinct indices); NULL:
     * device, device + 1, ... */
    const int *devices;
    /* CUDA: keep F32 weight matrices in f32 on the device (tests). */
    bool device_f32_weights;
    /* CUDA: run decode steps eagerly instead of replaying captured graphs. */
    bool cuda_graphs_off;
} rt_model_opts;

typedef struct rt_model rt_model;

int rt_model_load(rt_model **out, const char *path, const rt_model_opts *opts, char *err,
                  size_t errlen);
void rt_model_destroy(rt_model *m);

const rt_hparams *rt_model_hparams(const rt_model *m);
const rt_tokenizer *rt_model_tokenizer(const rt_model *m);
int rt_model_n_ctx(const rt_model *m);
/* tokenizer.chat_template from the file (Jinja source, not NUL-terminated),
 * or NULL when the model has none. */
const char *rt_model_chat_template(const rt_model *m, size_t *len);
int rt_model_max_batch_tokens(const rt_model *m);
/* The backend the model runs on. */
rt_backend rt_model_backend(const rt_model *m);

/* CUDA decode graphs so far (all zero on the CPU): shapes captured, steps
 * replayed from a graph, and graph-shaped decode steps run eagerly (graph
 * slots full, a failed capture or launch). */
typedef struct {
    long captured, replayed, eager;
} rt_graph_stats;
void rt_model_graph_stats(const rt_model *m, rt_graph_stats *out);

/* A paged KV pool: n_blocks blocks of block_size positions for every layer,
 * allocated once. Which block holds which positions of which sequence is the
 * scheduler's business (scheduler/block_manager.h); the forward pass only
 * follows block tables. */
typedef struct rt_kv_pool rt_kv_pool;

rt_kv_pool *rt_kv_pool_create(const rt_model *m, int n_blocks, int block_size);
void rt_kv_pool_destroy(rt_kv_pool *p);
int rt_kv_pool_blocks(const rt_kv_pool *p);
int rt_kv_pool_block_size(const rt_kv_pool *p);
/* Copies every layer's keys and values of block src into block dst (copy-on-write). */
void rt_kv_pool_copy_block(rt_kv_pool *p, int src, int dst);
/* Sets every value of block id in every layer (tests: NaN in a released block
 * shows any later read). */
void rt_kv_pool_fill_block(rt_kv_pool *p, int id, float value);
/* Bytes of KV cache one token takes (all layers, keys and values). */
size_t rt_kv_bytes_per_token(const rt_model *m);

/* A private, contiguous cache for one sequence (tests, benchmarks): a pool of
 * one block of `capacity` positions plus its length. */
typedef struct rt_kv rt_kv;

rt_kv *rt_kv_create(const rt_model *m, int capacity);
void rt_kv_destroy(rt_kv *kv);
int rt_kv_len(const rt_kv *kv);
int rt_kv_capacity(const rt_kv *kv);
/* Forgets every position from n on (n <= len). */
void rt_kv_truncate(rt_kv *kv, int n);
/* Bytes held by the cache. */
size_t rt_kv_bytes(const rt_kv *kv);

/* A sequence's attention policy for prefill (and PowerAttention's decode):
 * DESIGN.md's "attention" request object once resolved. Decode tokens always
 * run dense under FLEX (its selection needs a block of queries). */
typedef enum { RT_PREFILL_DENSE = 0, RT_PREFILL_FLEX, RT_PREFILL_POWER } rt_prefill_policy;

typedef struct {
    rt_prefill_policy prefill;
    kern_flex_params flex;
    kern_power_params power;
    int power_dense_count, power_period; /* "K of every N" layers stay dense */
} rt_attn_policy;

/* What attention did, accumulated over steps and layers: block counts on the
 * policy's grid (density = computed / causal), and chunks that FlexPrefill ran
 * densely (short or decode). */
typedef struct {
    int64_t computed, causal;
    int64_t dense_chunks, sparse_chunks;
} rt_attn_stats;

/* Smallest FlexPrefill block the model's workspace supports. */
#define RT_FLEX_MIN_BLOCK 16

/* ---- compressed KV caches (runtime/kv_compress.c; spec sections 3 and 4) ----
 *
 * With a compressed format, a sequence's K and V live in pages of that
 * format cut out of pool blocks (a block holds n_sub pages of one format;
 * the scheduler's slab hands them out, page id = block * RT_KVQ_SUB +
 * index), so a byte budget holds more tokens of a smaller format, at page
 * granularity. int8/int4 pack every step's rows straight into pages; zip
 * keeps the prompt in fp blocks until its last chunk (saliency), then packs
 * it, and packs decode tokens into an int8 tail until each flush. The fp
 * blocks below rt_kvq_n_compressed() are no longer read. */
#define RT_KVQ_SUB 16
#define RT_KVQ_MAX_CLASSES 3

typedef enum { RT_KV_FP = 0, RT_KV_INT8, RT_KV_INT4, RT_KV_ZIP, RT_KV_N_FORMATS } rt_kv_format;

typedef struct {
    rt_kv_format format;
    float salient_fraction;  /* zip: share of tokens kept at high_bits */
    int high_bits, low_bits; /* zip: 8, 4 or 2 */
    int flush_tokens;        /* zip: decode tail tokens per flush (rounded up to whole blocks);
                                0: one block */
} rt_kv_policy;

typedef struct rt_kvq rt_kvq;

/* "fp", "int8", "int4", "zip". */
const char *rt_kv_format_name(rt_kv_format f);
/* 0 when the model and pool can hold the policy's pages, else -1 with err
 * (compressed caches need tp 1 and a head_dim that is a multiple of 8). */
int rt_kvq_check(const rt_model *m, const rt_kv_pool *pool, const rt_kv_policy *p, char *err,
                 size_t errlen);
/* Tokens one pool block holds in class cls (0: salient or uniform, 1: zip's
 * regular tokens, 2: zip's int8 tail); the pool's block size for fp. */
int rt_kvq_block_tokens(const rt_kv_pool *pool, const rt_kv_policy *p, int cls);
/* Mean pool bytes per token (all layers, K and V) of compressed tokens. */
double rt_kvq_bytes_per_token(const rt_kv_pool *pool, const rt_kv_policy *p);
/* The decode flush size in tokens. */
int rt_kvq_flush_tokens(const rt_kv_pool *pool, const rt_kv_policy *p);
/* Page classes of a policy (0 for fp, 1 for int8/int4, 3 for zip). */
int rt_kvq_n_classes_of(const rt_kv_policy *p);
/* Class c's page format (an id below 16, for the slab), pages per pool block
 * and tokens per page. 0, or -1 when c is not a class of p. */
int rt_kvq_class_geom(const rt_kv_pool *pool, const rt_kv_policy *p, int c, int *fmt, int *n_sub,
                      int *slots);
/* Whether the prompt of a request with this policy is written to fp blocks
 * (fp, zip) or packed chunk by chunk (int8, int4: no fp blocks beyond its
 * prefix-cache hits). */
bool rt_kv_policy_fp_prompt(const rt_kv_policy *p);

/* A sequence's compressed cache for a prompt (with any recomputed generated
 * tokens) of prompt_len tokens whose first n_cached already sit in fp blocks
 * (prefix-cache hits: zip saliency then sees only the probe rows computed
 * here); seed picks the saliency probe rows. NULL with err when the policy
 * does not fit (see rt_kvq_check) or memory is short. */
rt_kvq *rt_kvq_create(const rt_model *m, rt_kv_pool *pool, const rt_kv_policy *p, int prompt_len,
                      int n_cached, uint64_t seed, char *err, size_t errlen);
void rt_kvq_destroy(rt_kvq *q);
/* Before a step that appends n_new tokens at n_past: the pages each class
 * needs beyond those it holds (need[c]); returns their sum, or -1 when n_past
 * is not the cache's length. */
int rt_kvq_pages_needed(const rt_kvq *q, int n_past, int n_new, int need[RT_KVQ_MAX_CLASSES]);
/* Hands class c n more pages (from the slab, of rt_kvq_class_geom's format). */
int rt_kvq_add_pages(rt_kvq *q, int c, const int32_t *ids, int n);
/* The pages class c holds (to give back when the sequence ends). */
int rt_kvq_class_pages(const rt_kvq *q, int c, const int32_t **ids);
int rt_kvq_n_classes(const rt_kvq *q);
/* Class c's page format and pages per block, as rt_kvq_class_geom gives them. */
int rt_kvq_class_format(const rt_kvq *q, int c, int *fmt, int *n_sub);
/* Pool bytes of the pages held. */
double rt_kvq_bytes_held(const rt_kvq *q);
/* Whether the next step (n_new tokens) writes its rows to fp blocks. */
bool rt_kvq_needs_fp(const rt_kvq *q, int n_new);
/* Positions [0, n) live in compressed pages: the fp blocks wholly below n are
 * no longer read. */
int rt_kvq_n_compressed(const rt_kvq *q);
rt_kv_format rt_kvq_format(const rt_kvq *q);

/* One sequence's share of a forward step: n_tokens new tokens at positions
 * n_past.. . Either kv is set (a private cache; n_past is its length, and the
 * step appends to it), or pool/blocks/n_blocks/n_past describe the sequence's
 * pages in a shared pool (slots for the new positions must be reserved). When
 * logits is non-NULL it receives the n_vocab logits of the last new token. */
typedef struct {
    rt_kv *kv;
    const int32_t *tokens;
    int n_tokens;
    float *logits;
    rt_kv_pool *pool;
    const int32_t *blocks;
    int n_blocks;
    int n_past;
    const rt_attn_policy *policy; /* NULL: dense */
    rt_attn_stats *stats;         /* accumulated when non-NULL */
    rt_kvq *kvq;                  /* compressed KV (pool only), or NULL: fp */
} rt_seq_batch;

/* Runs one step over a flat batch of sequences: the projections and FFN of all
 * their tokens are computed together, attention per sequence over its cache.
 * The total token count must be <= max_batch_tokens and each sequence must fit
 * its cache; tokens must be < n_vocab. Returns 0, or -1 with err (and changes
 * no cache) when an argument is out of range. */
int rt_forward(rt_model *m, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen);

#endif
