/*
 * cuda.h - the CUDA twins of the ops in kernels.h, and the device management
 * they run under (the .cu files of kernels/cuda/).
 *
 * Twins: kern_cuda_X has the argument list of the CPU op kern_X, with every
 * array a device pointer, and returns an int status instead of void. The CPU
 * ops' kern_pool argument has no twin: on CUDA the execution resource is the
 * calling thread's context (below). tests/unit/test_cuda_twins.c compares
 * each twin with its CPU op on the same inputs.
 *
 * Contexts: one host thread drives one device (one thread per tensor-parallel
 * rank). kern_cuda_init binds a context to the calling thread: the device, a
 * compute queue and a copy queue (CUDA streams), a cuBLAS handle on the
 * compute queue with its own workspace, and an op workspace. Every op and copy
 * is enqueued on the calling thread's context and returns at once; nothing
 * waits for the device except kern_cuda_sync, which waits at most the
 * context's timeout. Without a context on the thread, calls fail with
 * KERN_CUDA_E_NOCTX.
 *
 * Errors: nothing here aborts. A call returns 0 or a negative KERN_CUDA_E_*
 * code, and the first failure since the last kern_cuda_sync is kept with its
 * message (the CUDA or cuBLAS error name and what was being done). Errors the
 * device reports later (a fault inside a kernel) surface at kern_cuda_sync.
 * Argument errors are found before anything is enqueued.
 *
 * Without SIEVE_HAVE_CUDA this header is still valid C, but nothing declared
 * here is defined: code that calls it is guarded with #ifdef SIEVE_HAVE_CUDA.
 */
#ifndef SIEVE_KERNELS_CUDA_H
#define SIEVE_KERNELS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/collective.h"
#include "kernels/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors ------------------------------------------------------------- */

#define KERN_CUDA_E_NODEV -1   /* no device, no driver, or a bad device index */
#define KERN_CUDA_E_NOCTX -2   /* kern_cuda_init was not called on this thread */
#define KERN_CUDA_E_ARG -3     /* a size, stride, pointer or shape is invalid */
#define KERN_CUDA_E_TYPE -4    /* the element type is not supported by the op */
#define KERN_CUDA_E_NOMEM -5   /* device, pinned or workspace memory ran out */
#define KERN_CUDA_E_RUNTIME -6 /* the CUDA runtime reported an error */
#define KERN_CUDA_E_CUBLAS -7  /* cuBLAS reported an error */
#define KERN_CUDA_E_TIMEOUT -8 /* the device did not finish within the timeout */
#define KERN_CUDA_E_STATE -9   /* not allowed now (e.g. a sync during graph capture) */
#define KERN_CUDA_E_COMM -10   /* a collective (NCCL all-reduce) failed */

/* A short name for a KERN_CUDA_E_* code. */
const char *kern_cuda_strerror(int rc);

/* ---- devices and contexts ----------------------------------------------- */

/* Devices usable now; 0 when there is no device or no driver (never fails). */
int kern_cuda_device_count(void);

typedef struct {
    char name[128];
    int cc_major, cc_minor; /* compute capability (9.0 on H100/H200) */
    int n_sm;
    size_t total_mem;
    size_t free_mem;
} kern_cuda_device_info;

/* Properties of a device; 0, or a negative code with a message. */
int kern_cuda_device_query(int device, kern_cuda_device_info *info, char *err, size_t errlen);

/* Binds a new context on `device` to the calling thread (replacing any it
 * had). 0, or a negative code with a message naming the step that failed. */
int kern_cuda_init(int device, char *err, size_t errlen);
/* Waits for the thread's queues (bounded by the timeout), then releases the
 * context and everything it owns. No-op without a context. */
void kern_cuda_close(void);
/* The device of the thread's context, or -1. */
int kern_cuda_current_device(void);
/* Longest kern_cuda_sync waits (default 60000 ms; <= 0 restores the default). */
void kern_cuda_set_timeout_ms(int ms);

/* Waits until everything enqueued on the thread's queues has finished, at
 * most the timeout. Returns the first error since the previous sync (an op's
 * or the device's) with its message, and clears it; 0 when all went well. */
int kern_cuda_sync(char *err, size_t errlen);
/* The first error since the last sync, without waiting: its code, and its
 * message copied to err (nothing copied when 0). Does not clear it. */
int kern_cuda_last_error(char *err, size_t errlen);

/* ---- memory and transfers ----------------------------------------------- */

/* Device memory on the thread's device; NULL with a message on failure.
 * kern_cuda_free waits for nothing: free only memory no queued op uses. */
void *kern_cuda_malloc(size_t bytes, char *err, size_t errlen);
void kern_cuda_free(void *p);
/* Page-locked host memory, so transfers run asynchronously (portable across
 * devices). NULL with a message on failure. */
void *kern_cuda_host_malloc(size_t bytes, char *err, size_t errlen);
void kern_cuda_host_free(void *p);

/* Queues of a context: ops run on COMPUTE; COPY lets transfers overlap it. */
typedef enum { KERN_CUDA_COMPUTE = 0, KERN_CUDA_COPY = 1 } kern_cuda_queue;

/* Asynchronous copies on queue q. From or to pinned memory they return at
 * once; pageable host memory makes the host wait for the copy. The host buffer
 * must stay valid until a sync. */
int kern_cuda_h2d(void *dst, const void *src, size_t bytes, kern_cuda_queue q);
int kern_cuda_d2h(void *dst, const void *src, size_t bytes, kern_cuda_queue q);
int kern_cuda_d2d(void *dst, const void *src, size_t bytes, kern_cuda_queue q);
int kern_cuda_memset(void *dst, int byte, size_t bytes, kern_cuda_queue q);
/* Work enqueued on `waiter` after this call starts only once everything
 * enqueued on `signaller` so far has finished (no host wait). */
int kern_cuda_queue_wait(kern_cuda_queue waiter, kern_cuda_queue signaller);

/* Grows the op workspace to at least `bytes` (ops never allocate; an op that
 * needs more than is reserved fails with KERN_CUDA_E_NOMEM and says how much
 * to reserve). kern_cuda_matmul_q needs 2 * M * K bytes for M > 8. Waits for
 * the compute queue before replacing the old workspace. */
int kern_cuda_reserve_workspace(size_t bytes, char *err, size_t errlen);

/* ---- graphs ------------------------------------------------------------- */

/* Captures the ops enqueued on the compute queue between begin and end into a
 * replayable graph (decode steps of a repeated shape). No syncs or host
 * copies from pageable memory inside a capture. end returns NULL with a
 * message when the capture failed. */
typedef struct kern_cuda_graph kern_cuda_graph;
int kern_cuda_graph_begin(char *err, size_t errlen);
kern_cuda_graph *kern_cuda_graph_end(char *err, size_t errlen);
int kern_cuda_graph_launch(kern_cuda_graph *g);
void kern_cuda_graph_destroy(kern_cuda_graph *g);

/* ---- tensor parallelism ------------------------------------------------- */

/* The communicator of n_ranks tensor-parallel ranks, rank r on devices[r]
 * (distinct devices): NCCL (kern_comm_create_nccl). Made from one thread;
 * afterwards rank r is driven by the thread whose context is on devices[r].
 * NULL with a message on failure, and always in a build without NCCL. */
kern_comm *kern_cuda_comm_create(const int *devices, int n_ranks, char *err, size_t errlen);

/* buf[0..n) (device memory of the calling thread's device) becomes its sum
 * over the ranks of c, enqueued on the thread's compute queue like an op, so
 * a graph capture records it too. Every rank calls it in the same order with
 * the same n. 0, or KERN_CUDA_E_COMM (also kept as the thread's error) with
 * the collective's message in err. */
int kern_cuda_allreduce_sum_f32(kern_comm *c, int rank, float *buf, size_t n, char *err,
                                size_t errlen);

/* ---- elementwise and normalization (twins of kernels.h) ------------------ */

int kern_cuda_rmsnorm_f32(float *out, const float *x, const float *w, int rows, int dim, float eps);
int kern_cuda_swiglu_f32(float *out, const float *gate, const float *up, size_t n);
int kern_cuda_add_f32(float *y, const float *x, size_t n);
/* Both pairings (adjacent, and NeoX: (i, i + rope_dim / 2)). pos is a device
 * array of rows positions. Frequencies and angles are
 * computed as the CPU op computes them (float exponent, then double pow, sin
 * and cos rounded to float), so both agree to an ulp or so at any position. */
int kern_cuda_rope_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                       int rope_dim, float base);
int kern_cuda_rope_neox_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                            int rope_dim, float base);
/* Twin of kern_rope_table_f32 (scaled RoPE): inv_freq is a device array of
 * rope_dim / 2 inverse frequencies; neox selects the pairing. */
int kern_cuda_rope_table_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                             int rope_dim, const float *inv_freq, int neox);

/* y[r, :] += b for r < rows (row stride n): a bias on every token's row. Twin:
 * kern_add_f32(y + r * n, b, n) for each row. */
int kern_cuda_add_rows_f32(float *y, const float *b, int rows, int n);

/* The step's keys and values into a paged KV layer: row r of k and v (kvd
 * values each, packed) goes to row slots[r] of k_cache and v_cache (row
 * stride kv_stride >= kvd) for r < rows; a negative slot is skipped. slots
 * is a device array. Twin: a memcpy of each row, as the CPU forward pass
 * writes rows of an rt_kv_pool. */
int kern_cuda_kv_store_f32(float *k_cache, float *v_cache, int kv_stride, const float *k,
                           const float *v, int kvd, const int32_t *slots, int rows);

/* ---- conversions (twins of kernels.h and kernels/quant.h) --------------- */

int kern_cuda_f16_to_f32_row(float *dst, const uint16_t *src, size_t n);
int kern_cuda_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n);
/* Round to nearest even, NaN kept (bit-identical to kern_f32_to_f16/bf16). */
int kern_cuda_f32_to_f16_row(uint16_t *dst, const float *src, size_t n);
int kern_cuda_f32_to_bf16_row(uint16_t *dst, const float *src, size_t n);

/* ---- embeddings and sampling -------------------------------------------- */

/* out[t, :] = row tokens[t] of the table (n_vocab rows of dim elements of
 * `type`, kern_row_bytes(type, dim) bytes each, decoded to f32) for t <
 * n_tokens. Types (kernels/quant.h ids): KERN_TYPE_F32, F16, BF16, Q8_0, Q4_0
 * (dim a multiple of 32 for the block types). Twin: kern_dequant_row on each
 * token's row. A token outside [0, n_vocab) gets a row of zeros. */
int kern_cuda_embed(int type, float *out, const void *table, int n_vocab, const int32_t *tokens,
                    int n_tokens, int dim);

/* out[r] = index of the largest of x[r, 0..n) (row stride n) for r < rows;
 * the lowest index wins ties, NaN never wins (a row of NaN gives 0). Twin:
 * rt_argmax (runtime/sampler.c) per row, which differs only when x[r, 0] is
 * NaN. out is a device array of rows int32. */
int kern_cuda_argmax_f32(int32_t *out, const float *x, int rows, int n);

/* ---- matrix products ---------------------------------------------------- */

/* y = x W^T as kern_matmul_f32 (row-major, ldx/ldy row strides), through
 * cublasSgemm in full f32 (no TF32). */
int kern_cuda_matmul_f32(float *y, int ldy, const float *x, int ldx, const float *w, int M, int N,
                         int K);

/* The twin of kern_matmul_q for KERN_TYPE_F32, F16 and BF16 weights (other
 * types: KERN_CUDA_E_TYPE; dequantize them at load). f32 activations, f32
 * accumulation. M <= 8 (decode): a kernel that streams each weight row once
 * and keeps x in f32 (matches the CPU to f32 rounding). M > 8: x is rounded
 * to the weight's type in the workspace (2*M*K bytes) and cublasGemmEx
 * multiplies on the tensor cores with f32 accumulation, so each x value
 * carries the half type's rounding (relative 2^-11 for F16, 2^-8 for BF16;
 * F16 also overflows beyond 65504). */
int kern_cuda_matmul_q(int type, float *y, int ldy, const float *x, int ldx, const void *w, int M,
                       int N, int K);

/* ---- attention ---------------------------------------------------------- */

/* The twin of kern_attention_f32: one sequence, every pointer of *a (q, k, v,
 * out, blocks) on the device, the struct itself on the host. Splits the keys
 * as kern_cuda_attention_varlen_f32 does. */
int kern_cuda_attention_f32(const kern_attn_args *a);

/* A variable-length batch: sequence s has query rows q_start[s] ..
 * q_start[s+1]-1 of q and out (packed one sequence after another), keys and
 * values at positions 0 .. ctx_len[s]-1 (ctx_len[s] >= its query rows; row r
 * of the sequence is at position ctx_len[s] - n_q + r), and its block table at
 * blocks + s * blocks_stride. Equivalent to kern_attention_f32 on each
 * sequence with kern_attn_args {q + q_start[s] rows, k, v, out + q_start[s]
 * rows, n_q, ctx_len[s], n_heads, n_kv_heads, head_dim, kv_stride, blocks + s
 * * blocks_stride, block_size}. Arrays are on the device; the ints are host
 * values that size the launch. One launch covers decode rows and prefill
 * chunks alike. A decode batch too small to fill the device over long
 * contexts is also split along the keys (flash-decoding), in the op
 * workspace when it is large enough: n_seqs * n_kv_heads * 16 * (head_dim +
 * 2) * 4 bytes per split, up to 64 splits of at least 256 keys. */
typedef struct {
    const float *q;
    const float *k;
    const float *v;
    float *out;
    const int32_t *q_start; /* n_seqs + 1 */
    const int32_t *ctx_len; /* n_seqs */
    const int32_t *blocks;  /* n_seqs * blocks_stride block ids */
    int blocks_stride;
    int block_size;
    int n_seqs;
    int max_q;   /* >= every sequence's query rows */
    int max_ctx; /* >= every ctx_len[s], or 0 if unknown (then keys are never split) */
    int n_heads, n_kv_heads, head_dim;
    int kv_stride;
} kern_cuda_attn_varlen;

int kern_cuda_attention_varlen_f32(const kern_cuda_attn_varlen *a);

/* ---- compressed KV (twins of kernels.h "compressed KV (issue 7)") -------- */

/* kernels/cuda/kv_sparse.cu. Pages have the byte layout of kernels.h, so a page
 * packed on either side reads on the other. The CPU ops' err/errlen have no
 * twin (like their kern_pool): a message goes to the context (kern_cuda_sync,
 * kern_cuda_last_error). Structs (g, src, sel, a, m, a->seqs) are on the host;
 * every array they point to is on the device, and so is every page.
 * Device data cannot be checked before launch: a selection position outside
 * the source packs zeros; a page descriptor (kern_kvq_page, in a device array)
 * with an unknown format, a slot count outside its block, NULL data or missing
 * ZIP statistics is skipped rather than read, where the CPU op refuses it. */

/* Twin of kern_kvq_pack: codes and f16 scales bit-identical to the CPU's (the
 * same IEEE steps and round-ups); page 4-byte aligned. */
int kern_cuda_kvq_pack(void *page, kern_kvq_kind kind, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                       int slot0, const kern_kvq_src *src, const kern_kvq_sel *sel,
                       const float *stats);
/* Twin of kern_kvq_unpack. F32, F16, Q8 and Q4 values are exact; ZIP values
 * use fused multiply-adds (as the CPU's AVX2 path), within an ulp or two of
 * the CPU's scalar path. */
int kern_cuda_kvq_unpack(float *dst, size_t dst_stride, const void *page, kern_kvq_kind kind,
                         kern_kvq_fmt fmt, const kern_kvq_geom *g, int slot0, int n,
                         const float *stats);
/* Twin of kern_attention_decode_quant: fused dequantization, one online
 * softmax per (row, head) across pages of any formats and per-page block
 * sizes, lse when asked. a->seqs is a host array (its q, out, lse, q_pos and
 * pages are device pointers; pages is a device array of kern_kvq_page whose
 * k, v and stats are device pointers). Sequences go 64 per launch. A decode
 * batch too small to fill the device is split along its pages in the op
 * workspace when it is large enough: min(n_seqs, 64) * n_kv_heads * 16 *
 * (head_dim + 2) * 4 bytes per split, up to 64 splits of at least 256
 * positions of ctx_len. */
int kern_cuda_attention_decode_quant(const kern_kvq_attn_args *a);

/* ---- sparse attention (twin of kernels.h "sparse attention (issue 6)") ---- */

/* Twin of kern_attention_block_sparse_f32 (kernels/cuda/kv_sparse.cu): *a as
 * kern_cuda_attention_f32 takes it, *m on the host with m->bits on the device.
 * The mask's shape is checked (KERN_CUDA_E_ARG); its bits are device data:
 * bits above a row's diagonal are ignored (keys are causal anyway) and a row
 * that selects no block gets zeros, where the CPU op refuses such a mask. */
int kern_cuda_attention_block_sparse_f32(const kern_attn_args *a, const kern_block_mask *m);

/* Twin of kern_flex_estimate_f32 (kernels/cuda/flexprefill.cu): FlexPrefill's
 * estimate of a chunk on the device, *a as kern_cuda_attention_f32 takes it
 * (v and out unused), *est on the host with its arrays on the device, laid out
 * as kernels.h describes. The block means equal the CPU's bit for bit; the
 * probe profiles are summed in another (fixed) order, equal within f32
 * rounding. Uses kern_cuda_flex_estimate_workspace(a, block_size) bytes of the
 * op workspace (KERN_CUDA_E_NOMEM, saying how much, when less is reserved). */
int kern_cuda_flex_estimate_f32(const kern_attn_args *a, int block_size,
                                const kern_flex_estimate *est);
size_t kern_cuda_flex_estimate_workspace(const kern_attn_args *a, int block_size);

#ifdef __cplusplus
}
#endif

#endif
