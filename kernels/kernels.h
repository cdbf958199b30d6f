/*
 * kernels.h - the compute ops of the transformer, one signature per op.
 *
 * kernels/cpu/ implements every op (a scalar reference where the fast version
 * is not obviously correct, and the version the runtime calls); kernels/cuda/
 * will implement the same signatures. Shapes and strides are explicit; no op
 * allocates. Row-major everywhere: a weight matrix W of shape [n_out, n_in]
 * is n_out rows of n_in floats, as GGUF stores llama weights.
 */
#ifndef SIEVE_KERNELS_H
#define SIEVE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---- thread pool ------------------------------------------------------ */

/* A fixed pool of compute workers used inside one forward step. The calling
 * thread takes part in the work, so a pool of n threads starts n-1 workers. */
typedef struct kern_pool kern_pool;

/* Work item: fn(ctx, i, n) is called once for every i in [0, n). */
typedef void (*kern_task_fn)(void *ctx, int i, int n);

kern_pool *kern_pool_create(int n_threads);
void kern_pool_destroy(kern_pool *p);
int kern_pool_size(const kern_pool *p);
/* Runs fn for i = 0..n_tasks-1 spread over the pool; returns when all are done.
 * p may be NULL (runs inline). Not re-entrant: one caller at a time. */
void kern_pool_run(kern_pool *p, kern_task_fn fn, void *ctx, int n_tasks);

/* ---- elementwise and normalization -------------------------------------- */

/* out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for r < rows. */
void kern_rmsnorm_f32(float *out, const float *x, const float *w, int rows, int dim, float eps);

/* out[i] = silu(gate[i]) * up[i] (SwiGLU), n elements; out may alias gate. */
void kern_swiglu_f32(float *out, const float *gate, const float *up, size_t n);

/* y[i] += x[i]. */
void kern_add_f32(float *y, const float *x, size_t n);

/* Rotary embedding in place on rows of n_heads x head_dim values, rotating
 * adjacent pairs (x[2i], x[2i+1]) of the first rope_dim dims of every head by
 * pos[r] * base^(-2i/rope_dim). */
void kern_rope_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim, int rope_dim,
                   float base);

/* Both rotations with explicit inverse frequencies (rope_dim / 2 of them), for
 * scaled RoPE (Llama 3's rope_scaling): neox selects the pairing. */
void kern_rope_table_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                         int rope_dim, const float *inv_freq, int neox);

/* The same rotation on NeoX / Hugging Face layout: pairs (x[i], x[i + d/2])
 * of the first rope_dim dims, d = rope_dim (qwen2, and llama weights as
 * Hugging Face stores them). */
void kern_rope_neox_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                        int rope_dim, float base);

/* ---- matrix products ---------------------------------------------------- */

/* y[m, n] = sum_k x[m, k] * w[n, k] for m < M, n < N (y = x W^T).
 * ldx, ldy: row strides of x and y. Uses the pool for matrix-vector products
 * and OpenBLAS GEMM for M > 1. */
void kern_matmul_f32(kern_pool *pool, float *y, int ldy, const float *x, int ldx, const float *w,
                     int M, int N, int K);

/* The same with rows of w ldw >= K floats apart: w may be a column slice
 * [:, c0, c0 + K) of a wider matrix (tensor parallelism's wo and w_down). */
void kern_matmul_f32_ldw(kern_pool *pool, float *y, int ldy, const float *x, int ldx,
                         const float *w, int ldw, int M, int N, int K);
/* y += x W^T, otherwise as kern_matmul_f32_ldw: a projection added straight
 * into the residual stream (no product buffer, no separate add pass, no
 * zeroing of the output before sgemm accumulates). For decode-sized products (up to 32 rows)
 * the sums equal y + kern_matmul_f32_ldw's bit for bit; sgemm adds its
 * partial sums over K to y one block at a time, so there they differ by
 * rounding. */
void kern_matmul_f32_acc(kern_pool *pool, float *y, int ldy, const float *x, int ldx,
                         const float *w, int ldw, int M, int N, int K);

/* One output of kern_matvec_group_f32: y (row stride ldy) = x W^T with W of
 * N rows ldw floats apart. */
typedef struct {
    float *y;
    int ldy;
    const float *w;
    int ldw;
    int N;
} kern_mv_out;

#define KERN_MATVEC_GROUP_MAX 4

/* Up to KERN_MATVEC_GROUP_MAX products of the same x (M rows of K, a decode
 * batch: M <= 32) in one pass of the pool, e.g. the Q, K and V projections:
 * one dispatch instead of three, and the threads stream the matrices back to
 * back. Each output equals kern_matmul_f32_ldw's. Returns 0, or -1 (nothing
 * done) when M is too large for the row kernel or n_outs is out of range. */
int kern_matvec_group_f32(kern_pool *pool, const float *x, int ldx, int M, int K,
                          const kern_mv_out *outs, int n_outs);

/* The scalar reference of kern_matmul_f32, accumulating in double. */
void kern_matmul_ref(float *y, int ldy, const float *x, int ldx, const float *w, int M, int N,
                     int K);

/* ---- attention ---------------------------------------------------------- */

/* Causal attention of one sequence over its cached keys and values.
 * q:   n_q rows of n_heads * head_dim (query row r is at position ctx_len - n_q + r)
 * k,v: ctx_len rows of n_kv_heads * head_dim (row stride kv_stride floats),
 *      positions 0..ctx_len-1; head h reads kv head h / (n_heads / n_kv_heads).
 * out: n_q rows of n_heads * head_dim.
 * Scores are scaled by 1/sqrt(head_dim); the softmax is computed online over
 * chunks of keys (FlashAttention style), so no score matrix is materialized. */
#define KERN_ATTN_MAX_HEAD_DIM 256
#define KERN_ATTN_MAX_GROUP 16 /* n_heads / n_kv_heads */

typedef struct {
    const float *q;
    const float *k;
    const float *v;
    float *out;
    int n_q, ctx_len;
    int n_heads, n_kv_heads, head_dim;
    int kv_stride;
    /* Paged KV: when blocks is non-NULL, key/value position j lives in row
     * blocks[j / block_size] * block_size + j % block_size of k and v. */
    const int32_t *blocks;
    int block_size;
} kern_attn_args;

/* Row of k (or v) holding position j. */
static inline size_t kern_attn_row(const kern_attn_args *a, int j)
{
    if (!a->blocks)
        return (size_t)j;
    return (size_t)a->blocks[j / a->block_size] * (size_t)a->block_size +
           (size_t)(j % a->block_size);
}

void kern_attention_f32(kern_pool *pool, const kern_attn_args *a);
/* Reference: explicit scores and a two-pass softmax in double, one thread. */
void kern_attention_ref(const kern_attn_args *a);

/* ---- conversions -------------------------------------------------------- */

float kern_f16_to_f32(uint16_t h);
float kern_bf16_to_f32(uint16_t h);
void kern_f16_to_f32_row(float *dst, const uint16_t *src, size_t n);
void kern_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n);

/* ---- compressed KV (issue 7) ---- */

/* Quantized KV pages and the decode attention that reads them
 * (research/sparse-kv-spec.md sections 3 and 4; kernels/cpu/kv_quant.c and
 * kernels/cpu/attention_quant.c).
 *
 * A page is one block of block_size token slots of one layer's K, or of its V,
 * for all kv heads. Its format is recorded by the owner (the block table), not
 * in the page; the page holds data plus the per-slot scales that go with it.
 * Geometry: H = n_kv_heads, D = head_dim (a multiple of 8), B = block_size;
 * a "group" is 32 consecutive values along D (the last group of a head is
 * D mod 32 values when D is not a multiple of 32); ng = ceil(D / 32).
 *
 *   F32   [slot][head][D] f32: the rt_kv_pool row layout, so a pool block can
 *         be used as a page as is. Bytes 4*B*H*D.
 *   F16   [slot][head][D] IEEE half. Bytes 2*B*H*D.
 *   Q8    int8, llama.cpp q8_0 (symmetric, d = amax/127, value = code*d).
 *         Per head a tile [scales: B*ng f16][codes: B*D int8]; the scale of
 *         group g of slot s is scales[s*ng + g]. 34 bytes per 32 values.
 *   Q4    int4, llama.cpp q4_0 (d = signed max / -8, code = clamp(x/d + 8,
 *         0, 15), value = (code - 8)*d). Per head a tile [scales: B*ng f16]
 *         [codes: B*D/2]. 18 bytes per 32 values.
 *   ZIPb  ZipCache classes at b = 8, 4 or 2 bits, no per-page parameters for
 *         K: per head a tile of B*D*b/8 code bytes.
 *         K (channel-wise, asymmetric):  k = code*delta[c] + min[c]
 *         V (channel-separable token-wise, CST):
 *                                   v = (code*delta_s + min_s) * scale[c]
 *         with (min_s, delta_s) one f16 pair per slot across all heads, at the
 *         start of the V page: [pairs: B*2 f16][head tiles: H * B*D*b/8].
 *         min[c], delta[c] (per class) and scale[c] (per segment) for every
 *         channel c < H*D live in the segment statistics (KERN_KVQ_STATS_FLOATS
 *         floats: [k_min | k_delta | v_scale], kv_dim each), one per (layer,
 *         segment, class), kept by the request beside its pages.
 *   Codes below 8 bits are packed per group of n values: 4 bits, byte j holds
 *   value j (low nibble) and value j + n/2; 2 bits, byte j holds values j,
 *   j + n/4, j + n/2 and j + 3n/4 at bit 0, 2, 4 and 6. Q4 packs like ZIP4.
 *   f16 scales are rounded up from the exact ones (so a group's largest
 *   magnitude never clips) and codes are computed from the stored scales.
 *   A V slot's (min_s, delta_s) covers x / scale[c] over all its heads;
 *   a range below 1e-8 * max(1, |max|) stores delta 1 and codes 0. Pages must
 *   be 4-byte aligned (64 recommended); every slot, scale and code of a page
 *   is written only by kern_kvq_pack, so a recycled block needs no clearing.
 *
 * Slots of a page are either ordered (slot i holds position pos0 + i for every
 * head) or a set (pos0 = KERN_KVQ_UNORDERED): attention over cached tokens is a
 * softmax over a set and RoPE is inside K, so ZIP pages can hold any tokens,
 * even different tokens per head (per-head salient sets), as long as every one
 * of them precedes every query row that reads the page.
 *
 * Non-finite input: packing never stores a non-finite parameter or code into
 * Q8, Q4 or ZIP pages. Statistics and scales are taken over the finite values
 * only, NaN is stored as 0, +-Inf (and values beyond the f16 range of a scale)
 * saturate to the largest code. F32 and F16 pages store values as given (F16:
 * beyond +-65504 becomes +-Inf). A NaN or Inf in a query, or in F32/F16 page
 * data, can make the output (and lse) of the query heads that read it NaN;
 * other heads and rows are unaffected. Nothing crashes.
 */
#include <stdbool.h>

typedef enum {
    KERN_KVQ_F32 = 0,
    KERN_KVQ_F16,
    KERN_KVQ_Q8,
    KERN_KVQ_Q4,
    KERN_KVQ_ZIP8,
    KERN_KVQ_ZIP4,
    KERN_KVQ_ZIP2,
    KERN_KVQ_N_FMT
} kern_kvq_fmt;

typedef enum { KERN_KVQ_K = 0, KERN_KVQ_V = 1 } kern_kvq_kind;

#define KERN_KVQ_UNORDERED (-1)
#define KERN_KVQ_MAX_BLOCK_SIZE 1024
#define KERN_KVQ_STATS_FLOATS(kv_dim) (3 * (size_t)(kv_dim))
#define KERN_KVQ_DEFAULT_FLUSH 128 /* spec 3.4: G_flush, a multiple of the page size */

typedef struct {
    int n_kv_heads;
    int head_dim;   /* a multiple of 8, at most KERN_ATTN_MAX_HEAD_DIM */
    int block_size; /* slots per page, 1..KERN_KVQ_MAX_BLOCK_SIZE */
} kern_kvq_geom;

/* 0 when the geometry is usable, else -1 with a message. */
int kern_kvq_geom_check(const kern_kvq_geom *g, char *err, size_t errlen);
/* "f32", "f16", "q8", "q4", "zip8", "zip4", "zip2"; "?" for anything else. */
const char *kern_kvq_fmt_name(kern_kvq_fmt fmt);
/* Bits of one value of the format (32, 16, 8, 4, 8, 4, 2); 0 when unknown. */
int kern_kvq_fmt_bits(kern_kvq_fmt fmt);
static inline bool kern_kvq_fmt_is_zip(kern_kvq_fmt f)
{
    return f == KERN_KVQ_ZIP8 || f == KERN_KVQ_ZIP4 || f == KERN_KVQ_ZIP2;
}
/* The ZIP format of b bits (8, 4, 2), or KERN_KVQ_N_FMT for any other b. */
kern_kvq_fmt kern_kvq_zip_fmt(int bits);

/* Bytes of one page of K (or V) in format fmt; 0 for a bad format or geometry.
 * kern_kvq_block_bytes is K + V: what one block of one layer costs, so a byte
 * budget holds budget / (n_layers * block bytes) blocks of that format. */
size_t kern_kvq_page_bytes(kern_kvq_fmt fmt, kern_kvq_kind kind, const kern_kvq_geom *g);
size_t kern_kvq_block_bytes(kern_kvq_fmt fmt, const kern_kvq_geom *g);
/* Mean bytes per token of one layer (K + V) with full pages, salient_fraction
 * of the tokens in `high` and the rest in `low` (pass high == low and 1 for a
 * uniform format). Excludes the segment statistics and the fp tail. */
double kern_kvq_bytes_per_token(kern_kvq_fmt high, kern_kvq_fmt low, float salient_fraction,
                                const kern_kvq_geom *g);

/* Where packing and saliency read f32 rows of kv_dim values, for positions
 * [first, first + len): position t is row u = t - first, or with a block table
 * (as kern_attn_args) row blocks[u / block_size] * block_size + u % block_size;
 * a row starts at base + row * stride. The prompt in rt_kv_pool blocks is
 * {layer base, kv_dim, block table, block_size, 0, n}; a ZIP tail starting at
 * an unaligned position p is {..., its own page list, block_size, p, n}. */
typedef struct {
    const float *base;
    size_t stride; /* floats between rows, >= kv_dim */
    const int32_t *blocks;
    int block_size;
    int first;
    int len;
} kern_kvq_src;

/* Which positions fill n slots: slot i holds position first + i for every head
 * (idx == NULL), or position idx[h * head_stride + i] for head h (head_stride 0:
 * the same list for every head). */
typedef struct {
    const int32_t *idx;
    int head_stride;
    int first;
    int n;
} kern_kvq_sel;

/* Quantizes the selected rows of src into slots [slot0, slot0 + sel->n) of a
 * page; other slots are left as they are, so a page can be filled in several
 * calls. ZIP formats need the segment statistics (kern_kvq_zip_stats) of the
 * slots' class. Returns 0, or -1 with a message (nothing written). */
int kern_kvq_pack(void *page, kern_kvq_kind kind, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                  int slot0, const kern_kvq_src *src, const kern_kvq_sel *sel, const float *stats,
                  char *err, size_t errlen);

/* Dequantizes slots [slot0, slot0 + n) into n rows of kv_dim floats (row stride
 * dst_stride floats), in slot order. Returns 0, or -1 with a message. */
int kern_kvq_unpack(float *dst, size_t dst_stride, const void *page, kern_kvq_kind kind,
                    kern_kvq_fmt fmt, const kern_kvq_geom *g, int slot0, int n, const float *stats,
                    char *err, size_t errlen);

/* The building block of the attention kernels: dequantizes slots [slot0,
 * slot0 + n) of kv head h into n rows of head_dim floats (stride dst_stride).
 * No argument checks; kern_kvq_unpack is the checked form. */
void kern_kvq_dequant_head(float *dst, size_t dst_stride, const void *page, kern_kvq_kind kind,
                           kern_kvq_fmt fmt, const kern_kvq_geom *g, int h, int slot0, int n,
                           const float *stats);

/* Statistics of one ZIP class of one segment (the prompt, or one decode flush)
 * of one layer, into stats[KERN_KVQ_STATS_FLOATS(kv_dim)]:
 *   k_min, k_delta: per channel over the class's keys `cls` (per head: the
 *     positions head h holds), delta = range / (2^b - 1); a range below
 *     1e-8 * max(1, |max|) gives delta 1 (every code 0, exact for constants);
 *   v_scale: per channel sqrt(max |v|) over all the segment's values
 *     [seg_first, seg_first + seg_n), 1 for an all-zero channel.
 * Returns 0, or -1 with a message. */
int kern_kvq_zip_stats(float *stats, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                       const kern_kvq_src *k, const kern_kvq_sel *cls, const kern_kvq_src *v,
                       int seg_first, int seg_n, char *err, size_t errlen);

/* -- compressed KV: decode attention over the pages -- */

/* One page as the kernel reads it. n == 0 pages are skipped. */
typedef struct {
    const void *k, *v;
    const float *stats; /* ZIP: the class statistics; otherwise unused */
    int32_t pos0;       /* position of slot 0, or KERN_KVQ_UNORDERED */
    int32_t n;          /* filled slots, 0..block_size */
    int32_t fmt;        /* kern_kvq_fmt */
    int32_t block_size; /* slots of the page's layout; 0: the call's g.block_size */
} kern_kvq_page;

/* One sequence: n_q query rows over the union of its pages, which may be of
 * any formats in any order (salient, regular, the fp tail). Row r is at
 * position q_pos[r], or ctx_len - n_q + r when q_pos is NULL. Ordered slots are
 * causal (visible when position <= the row's); set pages are visible to every
 * row. A row that sees no key gets zeros and lse -inf. */
typedef struct {
    const float *q; /* n_q rows of n_heads * head_dim */
    float *out;     /* n_q rows of n_heads * head_dim */
    float *lse;     /* optional: n_q rows of n_heads, log sum exp of the scaled scores */
    const int32_t *q_pos;
    const kern_kvq_page *pages;
    int n_pages;
    int n_q;
    int ctx_len; /* every position (keys, rows) is < ctx_len */
} kern_kvq_seq;

typedef struct {
    kern_kvq_geom g;
    int n_heads; /* query heads; head h reads kv head h / (n_heads / n_kv_heads) */
    const kern_kvq_seq *seqs;
    int n_seqs;
} kern_kvq_attn_args;

/* Attention of every sequence's rows over its pages, scores scaled by
 * 1/sqrt(head_dim), one online softmax per (row, head) across all pages.
 * out must not overlap q, lse or the pages. Sequences of one call share the
 * geometry; batching them in one call spreads (sequence, kv head) tasks over
 * the pool, which a call per sequence cannot do for 1-row decode.
 * Dequantization is fused: each chunk of a page is expanded for one kv head
 * into an L1-sized tile shared by the query heads of that group. Tasks are
 * (sequence, kv head, rows) spread over the pool (NULL: inline). Returns 0, or
 * -1 with a message naming the bad argument (nothing written). */
int kern_attention_decode_quant(kern_pool *pool, const kern_kvq_attn_args *a, char *err,
                                size_t errlen);
/* Reference: every page dequantized with kern_kvq_unpack, explicit scores and a
 * two-pass softmax in double, one thread. Same contract. */
int kern_attention_decode_quant_ref(const kern_kvq_attn_args *a, char *err, size_t errlen);

/* -- compressed KV: saliency (spec 3.2) -- */

/* Probe rows of a prompt of L tokens: the last L - floor(0.95 L) positions and
 * floor(0.05 L) positions drawn uniformly with replacement from
 * [0, floor(0.95 L)) by a PRNG seeded with seed; sorted ascending. */
int kern_kvq_probe_count(int L);
/* Writes kern_kvq_probe_count(L) positions into rows; returns that count. */
int kern_kvq_probe_rows(int32_t *rows, int L, uint64_t seed);

/* Query rows scoring keys [key_first, key_first + n_keys) for saliency. */
typedef struct {
    const float *q;       /* n_q rows of n_heads * head_dim */
    const int32_t *q_pos; /* position of each row */
    const float *lse;     /* n_q rows of n_heads, or NULL: computed here from
                           * keys [0, q_pos[r]] of k (which must hold them) */
    int n_q;
    int n_heads;
    const kern_kvq_src *k;
    int key_first, n_keys;
} kern_kvq_probe_args;

/* colsum[h * n_keys + (j - key_first)] += sum over rows r with q_pos[r] >= j
 * and over the query heads of kv head h of exp(q.k_j / sqrt(D) - lse): the
 * normalized attention the rows give key j (spec 3.2 steps 2 and 3). Works for
 * prompt probe rows (chunk by chunk: a row's keys exist when it is computed)
 * and for decode rows over the tail window (pass the decode kernel's lse).
 * Returns 0, or -1 with a message. */
int kern_kvq_saliency_accumulate(kern_pool *pool, float *colsum, const kern_kvq_geom *g,
                                 const kern_kvq_probe_args *a, char *err, size_t errlen);

typedef enum {
    KERN_KVQ_NORM_CAUSAL_ROWS = 0, /* divide by L - j: ZipCache code parity (default) */
    KERN_KVQ_NORM_PROBE_ROWS,      /* divide by the number of probes at positions >= j */
    KERN_KVQ_NORM_NONE             /* raw sums (the reference's decode flush) */
} kern_kvq_norm;

/* scores[h * n_keys + i] = colsum[...] / divisor for key j = key_first + i (0
 * when the divisor is 0). With head_shared, every head's row is the sum over
 * heads (one salient set for all heads). scores may alias colsum. PROBE_ROWS
 * needs the probe positions. Returns 0, or -1 with a message. */
int kern_kvq_saliency_normalize(float *scores, const float *colsum, int n_kv_heads, int key_first,
                                int n_keys, kern_kvq_norm norm, int L, const int32_t *probe_pos,
                                int n_probes, bool head_shared, char *err, size_t errlen);

/* Salient tokens of n_keys: n_keys - floor((1 - salient_fraction) * n_keys);
 * salient_fraction in [0, 1], read to 6 decimals. */
int kern_kvq_salient_count(int n_keys, float salient_fraction);

/* Per kv head, the regular tokens are the floor((1 - f) n) lowest scores (ties:
 * the earlier position is regular), the rest salient. Writes order[h * n_keys
 * ...]: the salient positions ascending, then the regular ones ascending, so
 * {idx = order, head_stride = n_keys, n = n_salient} and {idx = order +
 * n_salient, ...} select the two classes for kern_kvq_pack. Returns n_salient,
 * or -1 with a message. */
int kern_kvq_select_salient(int32_t *order, const float *scores, int n_kv_heads, int key_first,
                            int n_keys, float salient_fraction, char *err, size_t errlen);

/* -- compressed KV: decode-time flush cadence (spec 3.3, 3.4) -- */

/* How a sequence's KV moves through the formats (per layer; the plan is the
 * same for every layer). The prompt is written as F32 rows as today; dense or
 * sparse prefill reads them. Before each step the scheduler asks for the plan
 * of every sequence, after it advances the state:
 *  - score_probes (ZIP prefill chunks): probe positions come from
 *    kern_kvq_probe_rows(prompt length, seed); for the probe rows inside the
 *    chunk, kern_kvq_saliency_accumulate into the prompt's column sums
 *    [n_kv_heads][L] (lse NULL, or the prefill kernel's row lse).
 *  - COMPRESS_PROMPT, after the last chunk's attention: ZIP: normalize
 *    (plan.norm, plan.norm_L, head_shared), kern_kvq_select_salient with
 *    salient_fraction, kern_kvq_zip_stats for each class (high, low), then
 *    kern_kvq_pack ceil(n / block_size) set pages per class. Uniform formats
 *    pack the full pages [first, first + n) as ordered pages. The F32 blocks
 *    are then freed (shared prefix-cache blocks stay F32; the request packs
 *    its own copy; compressed pages are private to it).
 *  - score_window (ZIP decode): after this step's attention, which returns
 *    the row's lse, kern_kvq_saliency_accumulate the decode row over the tail
 *    window [window_first, window_first + window_n) into a per-(layer, kv
 *    head) window buffer of flush_tokens floats (the tail never exceeds
 *    flush_tokens with 1-token steps); zero it after each flush.
 *  - FLUSH: uniform formats pack the tail's full pages. ZIP normalizes the
 *    window (plan.norm), selects, and with new_stats computes new statistics
 *    (a new segment, new pages); without (STATS_PROMPT) it appends each class
 *    to that class's open page (kern_kvq_pack at slot0 = its n) with the
 *    prompt's statistics, then opens new pages.
 * The kernel then reads: compressed pages (set pages for ZIP, ordered for
 * Q8/Q4) plus the ordered F32 tail pages starting at n_compressed. */

typedef enum {
    KERN_KVQ_SAL_CURRENT = 0, /* reference: the flushing step's query alone, raw sums */
    KERN_KVQ_SAL_WINDOW       /* every decode query accumulates, normalized (deviation) */
} kern_kvq_flush_saliency;

typedef enum {
    KERN_KVQ_STATS_OWN = 0, /* spec: each flush is a new segment with its own statistics */
    KERN_KVQ_STATS_PROMPT   /* deviation: flushes reuse the prompt's statistics (codes
                             * clamp) and append to the open ZIP pages, so flushes
                             * can be as small as one page with no statistics cost */
} kern_kvq_flush_stats;

typedef struct {
    kern_kvq_fmt high;      /* salient (or the uniform) format */
    kern_kvq_fmt low;       /* regular format; == high for a uniform format */
    float salient_fraction; /* ZIP: share of tokens at high */
    int block_size;
    int flush_tokens; /* ZIP: G_flush, a positive multiple of block_size */
    kern_kvq_flush_saliency saliency;
    kern_kvq_flush_stats stats;
    kern_kvq_norm prompt_norm; /* normalization of the prompt's probe column sums */
    bool head_shared;          /* one salient set for all kv heads (sum over heads) */
} kern_kvq_policy;

/* Positions [0, n_compressed) are in compressed pages; [n_compressed,
 * n_tokens) are the full-precision tail. */
typedef struct {
    int n_tokens;
    int n_compressed;
    bool prompt_done;
} kern_kvq_seq_state;

typedef enum {
    KERN_KVQ_ACT_NONE = 0,
    KERN_KVQ_ACT_COMPRESS_PROMPT, /* after the step: compress [first, first + n), the prompt */
    KERN_KVQ_ACT_FLUSH            /* after the step: compress the tail [first, first + n) */
} kern_kvq_action;

typedef struct {
    kern_kvq_action action;
    int first, n;
    bool new_stats;    /* ZIP: compute statistics for [first, first + n) (a new segment) */
    bool score_probes; /* ZIP prefill: accumulate this chunk's probe rows into the
                        * prompt's column sums */
    bool score_window; /* ZIP decode: accumulate this step's query over the tail window */
    int window_first, window_n;
    kern_kvq_norm norm; /* how to normalize the column sums before selecting */
    int norm_L;         /* L for KERN_KVQ_NORM_CAUSAL_ROWS */
} kern_kvq_plan;

/* 0 when the policy is usable, else -1 with a message. */
int kern_kvq_policy_check(const kern_kvq_policy *p, char *err, size_t errlen);
/* What a step that appends n_new tokens to a sequence in state s must do;
 * last_prefill: this step holds the prompt's last chunk. Pure. */
kern_kvq_plan kern_kvq_cadence_plan(const kern_kvq_policy *p, kern_kvq_seq_state s, int n_new,
                                    bool last_prefill);
/* The state after that step (and the plan's action) is done. Pure. */
kern_kvq_seq_state kern_kvq_cadence_advance(kern_kvq_seq_state s, int n_new, bool last_prefill,
                                            const kern_kvq_plan *plan);

/* ---- sparse attention (issue 6) ---- */

/* Block-sparse causal prefill (FlexPrefill, PowerAttention) on a logical grid of
 * sparse blocks of B positions: block c covers absolute positions [c*B, c*B+B).
 * The grid always starts at position 0 and is independent of the KV page size
 * (kern_attn_args.block_size); K/V are read through the page table exactly as
 * kern_attention_f32 reads them. Density is reported as the share of the causal
 * blocks that were computed: sum over query heads and query blocks r of the
 * selected blocks, divided by n_heads * sum of (r + 1); a dense causal prompt is
 * 1.0, the sum nb(nb+1)/2 per head for a prompt of nb blocks.
 *
 * Use from the runtime, per layer and per sequence of a batch:
 * - flex: kern_flexprefill_attention_f32 with one kern_flex_ws per engine
 *   (created at start-up for the largest context; reused by every layer);
 *   decode steps stay on kern_attention_f32.
 * - power: layers for which kern_power_layer_is_dense() is true run
 *   kern_attention_f32; the others run kern_power_attention_f32, in prefill
 *   chunks and in decode (n_q == 1) alike.
 * - density for the response: add up kern_sparse_stats over layers and chunks,
 *   counting a dense layer or a dense path as computed == causal (the
 *   kern_flex_result of a dense path already does), then kern_sparse_density.
 *
 * Return codes of the functions below. */
#define KERN_SPARSE_OK 0
#define KERN_SPARSE_EINVAL (-1) /* an argument is out of range or inconsistent */
#define KERN_SPARSE_ENOSPC (-2) /* a workspace or buffer is too small for the shape */

/* Which key blocks each (list, query block) attends, as one bitset row per pair:
 * bit c of row (l, i) (word c / 64, bit c % 64) set means query block
 * q_block0 + i attends key block c. Query head h uses list
 * h / (n_heads / n_lists), so n_lists is 1 (one pattern for all heads, e.g.
 * PowerAttention), n_kv_heads (one per GQA group) or n_heads (one per head).
 * Every row must have its diagonal bit (c == q_block0 + i) set and no bit above
 * it; inside the diagonal block the kernel masks per token. The rows cover the
 * query blocks of the n_q rows at the end of a context of ctx_len positions:
 * q_block0 = (ctx_len - n_q) / B, n_qblocks = ceil(ctx_len / B) - q_block0.
 * The caller owns bits; kern_block_mask_init describes and clears it. */
typedef struct {
    int block_size; /* B */
    int n_lists;
    int ctx_len, n_q;
    int q_block0, n_qblocks;
    int words;      /* 64-bit words per row: ceil((q_block0 + n_qblocks) / 64) */
    uint64_t *bits; /* row (l, i) at bits + ((size_t)l * n_qblocks + i) * words */
} kern_block_mask;

/* 64-bit words a mask of this shape needs (0 if an argument is out of range). */
size_t kern_block_mask_words(int block_size, int n_lists, int ctx_len, int n_q);
/* Describes a mask over bits[0 .. n_words) and clears it. */
int kern_block_mask_init(kern_block_mask *m, uint64_t *bits, size_t n_words, int block_size,
                         int n_lists, int ctx_len, int n_q);
/* Sets every causal block of every row (block-dense: equals dense attention). */
void kern_block_mask_fill_causal(kern_block_mask *m);

static inline uint64_t *kern_block_mask_row(const kern_block_mask *m, int list, int qblock)
{
    return m->bits + ((size_t)list * (size_t)m->n_qblocks + (size_t)(qblock - m->q_block0)) *
                         (size_t)m->words;
}
static inline void kern_block_mask_set(kern_block_mask *m, int list, int qblock, int kblock)
{
    kern_block_mask_row(m, list, qblock)[kblock / 64] |= (uint64_t)1 << (kblock % 64);
}
static inline int kern_block_mask_get(const kern_block_mask *m, int list, int qblock, int kblock)
{
    return (int)((kern_block_mask_row(m, list, qblock)[kblock / 64] >> (kblock % 64)) & 1u);
}

/* Block counts for density, summable over layers and chunks: computed = sum over
 * query heads of the set bits of its rows, causal = n_heads * sum of (r + 1). */
typedef struct {
    int64_t computed;
    int64_t causal;
} kern_sparse_stats;

void kern_block_mask_stats(const kern_block_mask *m, int n_heads, kern_sparse_stats *st);
/* computed / causal; 1.0 when causal is 0. */
double kern_sparse_density(const kern_sparse_stats *st);

/* FlashAttention-style block-sparse causal attention: same shapes, positions and
 * GQA mapping as kern_attention_f32; query row r (position p = ctx_len - n_q + r,
 * query block p / B) of head h attends the keys j <= p whose block is set in its
 * row of m. Work is split into (kv head, run of query blocks) tasks; the query
 * heads of a group and up to 256 query rows share each K/V tile and each computes
 * only the blocks its own list holds. Uses about 170 KB of stack per thread.
 * Checks the arguments and the mask (shape, diagonal present, nothing above it)
 * and returns KERN_SPARSE_EINVAL without writing out if they are wrong. */
int kern_attention_block_sparse_f32(kern_pool *pool, const kern_attn_args *a,
                                    const kern_block_mask *m);

/* Reference: dense scores and a two-pass softmax in double, one thread. Row r of
 * head h attends key j iff mask[((size_t)h * n_q + r) * ctx_len + j] != 0 and j is
 * causal (j <= p); a row that attends nothing is written as zeros. */
void kern_attention_masked_ref(const kern_attn_args *a, const uint8_t *mask);

/* The attention profiles of the last n_probe query rows (positions
 * ctx_len - n_probe .. ctx_len - 1), per query head h, for FlexPrefill:
 *   vertical[h * ctx_len + j] = mean over probe rows of their softmax weight on key j
 *   slash[h * ctx_len + o]    = mean over probe rows i of their weight on key p_i - o
 * Each sums to 1. Two passes over the keys (row log-sum-exp, then exp(s - lse)),
 * so memory is O(n_heads * ctx_len). scratch holds kern_probe_scratch_floats()
 * floats. Requires 1 <= n_probe <= min(n_q, KERN_PROBE_MAX_ROWS). */
#define KERN_PROBE_MAX_ROWS 256
size_t kern_probe_scratch_floats(int n_heads, int head_dim, int n_probe);
int kern_attention_probe_profiles_f32(kern_pool *pool, const kern_attn_args *a, int n_probe,
                                      float *vertical, float *slash, float *scratch);

/* -- FlexPrefill (research/sparse-kv-spec.md section 1) --
 * Per layer and per query head: probe rows = the last B query rows; vertical and
 * slash budgets from the cumulative mass gamma; Jensen-Shannon test with tau for
 * query-aware heads; block selection; then the block-sparse kernel. Decode and
 * short inputs take the dense path (kern_attention_f32, bit-identical to dense).
 * Deviations from the reference code, all documented in flexprefill.c: budgets
 * use B where FP-code divides by a literal 128; the slash profile is pooled by
 * token distance (d = o / B), which equals FP-code's reversed grid when ctx_len is
 * a multiple of B; gamma >= 1 selects every causal block.
 *
 * Chunked prefill and prefix-cache hits (n_q < ctx_len) use the spec's chunked
 * extension (1.5): probes are the last B rows of the chunk, profiles are taken
 * against keys [0, ctx_len), only the chunk's query blocks are selected, and the
 * query-aware budget is gamma * (chunk query blocks); res->chunked says so.
 * The probe costs about 2B / n_q of the chunk's dense attention, so chunks of
 * n_q <= 2B rows run dense (KERN_FLEX_DENSE_SHORT_CHUNK). */
typedef struct {
    float gamma;    /* attention-mass coverage, in (0, 1] */
    float tau;      /* JS-distance threshold for query-aware heads, in [0, 1] */
    int min_budget; /* tokens per vertical and per slash set, >= 0 (0: one block) */
    int max_budget; /* token cap, >= 0 (0: unlimited) */
    int block_size; /* B, KERN_FLEX_MIN_BLOCK .. KERN_FLEX_MAX_BLOCK */
    int gqa_union;  /* 0: per-head sets (reference); 1: union within each GQA group */
} kern_flex_params;
#define KERN_FLEX_MIN_BLOCK 8
#define KERN_FLEX_MAX_BLOCK KERN_PROBE_MAX_ROWS

/* gamma 0.9, tau 0.1, min_budget 1024, max_budget 0, block_size 128, gqa_union 0. */
void kern_flex_params_default(kern_flex_params *p);
/* 0, or KERN_SPARSE_EINVAL with a message naming the field ("gamma must be in (0, 1]"). */
int kern_flex_params_check(const kern_flex_params *p, char *err, size_t err_len);

/* Scratch for FlexPrefill, allocated once (never on the per-step path): sized for
 * contexts up to max_ctx, these head counts and head_dim, sparse blocks of at
 * least min_block_size and pools of up to n_threads threads. One caller at a
 * time; the mask a selection returns lives in it until the next call. */
typedef struct kern_flex_ws kern_flex_ws;
kern_flex_ws *kern_flex_ws_create(int max_ctx, int n_heads, int n_kv_heads, int head_dim,
                                  int min_block_size, int n_threads);
void kern_flex_ws_destroy(kern_flex_ws *ws);
size_t kern_flex_ws_bytes(const kern_flex_ws *ws);

typedef enum {
    KERN_FLEX_SPARSE = 0,       /* block-sparse selection */
    KERN_FLEX_DENSE_DECODE,     /* n_q == 1: decode is always dense */
    KERN_FLEX_DENSE_SHORT,      /* ctx_len <= max(2B, minB * B) */
    KERN_FLEX_DENSE_SHORT_CHUNK /* a chunk after cached positions with n_q <= 2B rows */
} kern_flex_path;

typedef struct {
    kern_flex_path path;
    int chunked;              /* n_q < ctx_len and the chunked extension was used */
    int n_query_aware;        /* query heads that took the query-aware path */
    kern_sparse_stats blocks; /* on a dense path: computed == causal (grid of B) */
    double density;           /* blocks.computed / blocks.causal */
} kern_flex_result;

/* What the last selection with ws decided for query head h (for tests, logs and
 * metrics): the vertical and slash block budgets after the clamps, whether the
 * head was query-aware, and its JS distance. KERN_SPARSE_EINVAL for a head the
 * last selection did not cover (or a dense path). */
typedef struct {
    int n_vertical, n_slash;
    int query_aware;
    float js_distance;
} kern_flex_head;
int kern_flex_head_info(const kern_flex_ws *ws, int h, kern_flex_head *out);

/* Jensen-Shannon distance (natural log, 0 ln 0 = 0) of two distributions over n
 * entries: 0 for equal ones, sqrt(ln 2) for disjoint ones. */
double kern_flex_js_distance(const float *p, const float *q, int n);

/* Selects the blocks (steps 0-7). On KERN_FLEX_SPARSE, *mask describes storage
 * inside ws (n_lists = n_heads, or n_kv_heads with gqa_union). On a dense path
 * the mask is not touched and the caller runs kern_attention_f32. */
int kern_flexprefill_select(kern_pool *pool, const kern_attn_args *a, const kern_flex_params *p,
                            kern_flex_ws *ws, kern_block_mask *mask, kern_flex_result *res);
/* Selection, then kern_attention_block_sparse_f32 or kern_attention_f32. */
int kern_flexprefill_attention_f32(kern_pool *pool, const kern_attn_args *a,
                                   const kern_flex_params *p, kern_flex_ws *ws,
                                   kern_flex_result *res);

/* Step 0 alone: KERN_FLEX_SPARSE when a chunk of a's shape gets a selection,
 * else the dense path it takes (p already checked). */
kern_flex_path kern_flexprefill_path(const kern_attn_args *a, const kern_flex_params *p);

/* The selection in two parts, so that a device can run the part that reads Q
 * and K and the host the rest. The estimate of a chunk (a, a grid of B, nb =
 * ceil(ctx_len / B) blocks, query blocks q_block0 = (ctx_len - n_q) / B ..
 * nb - 1, n_qblocks of them) is all the selection reads:
 *   vertical, slash  [n_heads][ctx_len]: the profiles of the last B query rows
 *                    (kern_attention_probe_profiles_f32 with n_probe = B)
 *   kbar             [n_kv_heads][nb][head_dim]: block means of K (a partial
 *                    last block over its real positions)
 *   qbar             [n_heads][head_dim]: mean of the last B query rows
 *   qtil             [n_heads][n_qblocks][head_dim]: mean of each query block's
 *                    rows inside the chunk
 * (query means scaled by 1/sqrt(head_dim)). kern_flex_estimate_f32 computes it
 * (n_q >= B; scratch of kern_probe_scratch_floats(n_heads, head_dim, B)); a
 * device computes it with its twin and copies it into the buffers that
 * kern_flex_ws_estimate names; kern_flexprefill_select_estimated then selects
 * from those buffers as kern_flexprefill_select does, reading nothing through
 * a's pointers (they may be device memory). */
typedef struct {
    float *vertical, *slash, *kbar, *qbar, *qtil;
} kern_flex_estimate;
typedef struct {
    size_t vertical, slash, kbar, qbar, qtil; /* floats of each array */
} kern_flex_estimate_len;
kern_flex_estimate_len kern_flex_estimate_lengths(const kern_attn_args *a, int block_size);
int kern_flex_estimate_f32(kern_pool *pool, const kern_attn_args *a, int block_size,
                           const kern_flex_estimate *est, float *scratch);
/* ws's estimate buffers for a's shape; KERN_SPARSE_ENOSPC if ws is too small. */
int kern_flex_ws_estimate(kern_flex_ws *ws, const kern_attn_args *a, int block_size,
                          kern_flex_estimate *est);
int kern_flexprefill_select_estimated(kern_pool *pool, const kern_attn_args *a,
                                      const kern_flex_params *p, kern_flex_ws *ws,
                                      kern_block_mask *mask, kern_flex_result *res);

/* -- PowerAttention (research/sparse-kv-spec.md section 2) --
 * Query block r attends key block c <= r iff r - c < W (local window, diagonal
 * included), r - c is a power of two, or c == 0 (sink); per token causal. Static:
 * the same for every head and every position set, so chunked prefill and prefix
 * hits need nothing special, and decode at position p uses the row of block p / B.
 * Accuracy claims of the paper assume a model adapted to the pattern and hybrid
 * dense layers; on stock checkpoints it is an experimental policy. */
typedef struct {
    int block_size;    /* B >= 1 */
    int window_blocks; /* W >= 1 */
} kern_power_params;

/* block_size 64, window_blocks 5. */
void kern_power_params_default(kern_power_params *p);
int kern_power_params_check(const kern_power_params *p, char *err, size_t err_len);
/* Key blocks of query block qblock, ascending, into out (at most cap); returns
 * their count, at most W + floor(log2(qblock)) + 2, or KERN_SPARSE_EINVAL /
 * KERN_SPARSE_ENOSPC. A decode row at position p attends kern_power_blocks(p / B). */
int kern_power_blocks(const kern_power_params *p, int qblock, int32_t *out, int cap);
/* Fills every list of m (kern_block_mask_init-ed with B = p->block_size). */
int kern_power_mask(const kern_power_params *p, kern_block_mask *m);
/* Builds the mask in bits (kern_block_mask_words(B, 1, ctx_len, n_q) words) and runs
 * the block-sparse kernel; also right for decode (n_q == 1). st may be NULL. */
int kern_power_attention_f32(kern_pool *pool, const kern_attn_args *a, const kern_power_params *p,
                             uint64_t *bits, size_t n_words, kern_sparse_stats *st);

/* Hybrid layers: "K of every N" keeps layers with layer % N < K dense, so the
 * default "2 of every 7" makes layers 0, 1, 7, 8, 14, 15, ... dense and leaves
 * runs of 5 sparse layers (the paper keeps 2 full layers per 7 "to maximize the
 * continuity of sparse layers" without naming them; we put them first in each
 * period). "none" is 0 of every 1 and "all" is 1 of every 1. */
int kern_power_dense_layers_parse(const char *s, int *dense_count, int *period, char *err,
                                  size_t err_len);
int kern_power_layer_is_dense(int layer, int dense_count, int period);

#endif
