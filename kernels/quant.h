/*
 * quant.h - weight formats other than f32: GGUF's block-quantized types
 * (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) and F16/BF16 rows, their conversion to and
 * from f32, and the matrix products that read them directly.
 *
 * Part of the kernels module's public interface (kernels.h includes it).
 *
 * Block layouts are exactly ggml's (ggml-common.h), so a tensor mapped from a
 * GGUF file is used in place. Type ids are ggml's, so a GGUF tensor's type id
 * (rt_ggml_type) passes through unchanged. A row of n elements of a block type
 * is n / block_size consecutive blocks; n must be a multiple of the block size.
 * Every block starts with or contains ggml_half fields read as uint16_t, so
 * block data must be at least 2-byte aligned (GGUF aligns tensors to 32).
 *
 * The quantized products quantize the activations too and multiply integers,
 * as ggml does: Q8_0 and Q4_0 weights meet activations quantized to Q8_0
 * (32-element blocks); the K-quants meet activations quantized to Q8_K
 * (256-element blocks with 16-element sums). F16/BF16 weights meet f32
 * activations and accumulate in f32. Errors are negative return codes
 * (KERN_QE_*), named by kern_quant_strerror.
 */
#ifndef SIEVE_KERNELS_QUANT_H
#define SIEVE_KERNELS_QUANT_H

#include <stddef.h>
#include <stdint.h>

typedef struct kern_pool kern_pool; /* kernels.h: the compute thread pool */

/* Element types, numbered as ggml (and GGUF) number them. */
typedef enum {
    KERN_TYPE_F32 = 0,
    KERN_TYPE_F16 = 1,
    KERN_TYPE_Q4_0 = 2,
    KERN_TYPE_Q8_0 = 8,
    KERN_TYPE_Q4_K = 12,
    KERN_TYPE_Q5_K = 13,
    KERN_TYPE_Q6_K = 14,
    KERN_TYPE_Q8_K = 15, /* activations only: kern_matmul_q refuses it as a weight type */
    KERN_TYPE_BF16 = 30,
} kern_type;

#define KERN_QK 32    /* elements per block of Q8_0 and Q4_0 */
#define KERN_QK_K 256 /* elements per super-block of the K-quants */

/* ---- block layouts (ggml-common.h); the d / dmin fields are IEEE half ---- */

/* Q8_0: x[i] = d * qs[i]. */
typedef struct {
    uint16_t d;
    int8_t qs[KERN_QK];
} kern_block_q8_0;

/* Q4_0: x[i] = d * (q[i] - 8), q[i] = qs[i] & 15 for i < 16 and qs[i - 16] >> 4
 * for i >= 16 (low nibbles hold the first half of the block). */
typedef struct {
    uint16_t d;
    uint8_t qs[KERN_QK / 2];
} kern_block_q4_0;

/* Q4_K: 8 sub-blocks of 32; x = d * sc[j] * q - dmin * m[j], q in [0, 15], with
 * 6-bit sc[j] and m[j] packed in `scales` (bytes 0-3: low 6 bits of sc[0..3],
 * bytes 4-7: low 6 bits of m[0..3], bytes 8-11: low nibble sc[4..7] and high
 * nibble m[4..7], whose top 2 bits are the top bits of bytes 0-3 and 4-7).
 * Each 32 bytes of qs hold two sub-blocks: low nibbles the first 32 elements,
 * high nibbles the next 32. */
typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qs[KERN_QK_K / 2];
} kern_block_q4_K;

/* Q5_K: as Q4_K with a fifth bit: element 64c + l (l < 32) of the super-block
 * takes bit 2c of qh[l], element 64c + 32 + l bit 2c + 1; q in [0, 31]. */
typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qh[KERN_QK_K / 8];
    uint8_t qs[KERN_QK_K / 2];
} kern_block_q5_K;

/* Q6_K: 16 sub-blocks of 16; x = d * scales[j] * (q - 32), q in [0, 63]: low 4
 * bits in ql, high 2 bits in qh, in two halves of 128 elements (see
 * kern_dequant_row's scalar code for the exact interleaving). */
typedef struct {
    uint8_t ql[KERN_QK_K / 2];
    uint8_t qh[KERN_QK_K / 4];
    int8_t scales[KERN_QK_K / 16];
    uint16_t d;
} kern_block_q6_K;

/* Q8_K (activations): x[i] = d * qs[i], d in f32; bsums[j] = sum of qs[16j..16j+15]. */
typedef struct {
    float d;
    int8_t qs[KERN_QK_K];
    int16_t bsums[KERN_QK_K / 16];
} kern_block_q8_K;

_Static_assert(sizeof(kern_block_q8_0) == 34, "Q8_0 block is 34 bytes");
_Static_assert(sizeof(kern_block_q4_0) == 18, "Q4_0 block is 18 bytes");
_Static_assert(sizeof(kern_block_q4_K) == 144, "Q4_K block is 144 bytes");
_Static_assert(sizeof(kern_block_q5_K) == 176, "Q5_K block is 176 bytes");
_Static_assert(sizeof(kern_block_q6_K) == 210, "Q6_K block is 210 bytes");
_Static_assert(sizeof(kern_block_q8_K) == 292, "Q8_K block is 292 bytes");

/* ---- errors ---- */

#define KERN_QE_ARG -1   /* a size, stride or pointer is invalid */
#define KERN_QE_TYPE -2  /* the type is not supported by this operation */
#define KERN_QE_NOMEM -3 /* the activation scratch could not be allocated */

const char *kern_quant_strerror(int rc);

/* ---- types ---- */

/* "Q4_K", ...; "unknown" for ids this module does not know. */
const char *kern_type_name(int type);
/* Elements per block (1 for F32/F16/BF16), bytes per block; 0 for unknown ids. */
size_t kern_type_block_size(int type);
size_t kern_type_block_bytes(int type);
/* Bytes of a row of n elements, or 0 when the type is unknown or n is not a
 * positive multiple of its block size. */
size_t kern_row_bytes(int type, int64_t n);
/* True for the weight types kern_matmul_q runs. */
int kern_type_is_weight(int type);

/* ---- scalar conversions ---- */

/* IEEE half / bfloat16 from f32, round to nearest even (NaN stays NaN). */
uint16_t kern_f32_to_f16(float f);
uint16_t kern_f32_to_bf16(float f);

/* ---- rows ---- */

/* dst[0..n) = the n elements of src decoded to f32. Types: F32, F16, BF16,
 * Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, Q8_K. src needs 2-byte alignment (4 for
 * F32/Q8_K). Returns 0, KERN_QE_TYPE, or KERN_QE_ARG when n is not a multiple
 * of the block size. Non-finite scales decode to non-finite values. */
int kern_dequant_row(int type, const void *src, float *dst, size_t n);

/* Encodes n f32 values as `type` (any type kern_dequant_row decodes).
 * Q8_0 and Q4_0 round exactly as ggml's reference quantizers (and the gguf
 * Python package) do, byte for byte. The K-quants use a simpler one-pass
 * min/max fit than llama.cpp's iterative search: valid blocks, somewhat larger
 * error (bounds in tests/unit/test_quant.c). Q8_K uses d = amax / 127 and
 * round-half-away-from-zero (codes in [-127, 127]). Returns as
 * kern_dequant_row. */
int kern_quant_row(int type, const float *src, void *dst, size_t n);

/* ---- products ---- */

/* y[m, n] = sum_k x[m, k] * W[n, k] for m < M, n < N, with W stored as N rows
 * of K elements of `type` (kern_row_bytes(type, K) bytes per row, rows
 * contiguous) - the quantized twin of kern_matmul_f32.
 *
 * F32 runs kern_matmul_f32. F16/BF16 convert on the fly (F16C) and accumulate
 * in f32. Q8_0/Q4_0 quantize each row of x to Q8_0 and Q4_K/Q5_K/Q6_K to Q8_K,
 * then take integer dot products per block, scaled and accumulated in f32.
 * Threaded over rows of W with the pool (which may be NULL); for M > 1 the
 * rows of x are taken in tiles so each weight row is read once per tile.
 * From M = 64 on (a prefill chunk: compute-bound) every type instead
 * dequantizes W to f32, up to 4 MiB of rows at a time, and multiplies with
 * kern_matmul_f32 (OpenBLAS sgemm), x unquantized: 1.2-1.5x faster here, and
 * the result is the dequantize-then-f32 product.
 *
 * The quantized x (and the dequantized rows) live in a scratch owned by the
 * calling thread that grows to the largest size seen (so steady-state calls
 * do not allocate) and is freed when the thread exits or by
 * kern_quant_scratch_free.
 *
 * Returns 0 (also for M, N or K = 0, writing nothing), KERN_QE_TYPE for a type
 * that is not a weight type, KERN_QE_ARG when K is not a multiple of the block
 * size, ldx < K, ldy < N (M > 1), a pointer is NULL or w is not 2-byte
 * aligned, KERN_QE_NOMEM when the scratch cannot grow. */
int kern_matmul_q(kern_pool *pool, int type, float *y, int ldy, const float *x, int ldx,
                  const void *w, int M, int N, int K);

/* The reference of kern_matmul_q: each block of x quantized as kern_matmul_q
 * quantizes it and decoded back to f32, each block of W decoded to f32, dot
 * products accumulated in double, one thread, no allocation. Same arguments
 * and return codes (never KERN_QE_NOMEM). */
int kern_matmul_q_ref(int type, float *y, int ldy, const float *x, int ldx, const void *w, int M,
                      int N, int K);

/* Frees the calling thread's activation scratch (the next kern_matmul_q on
 * this thread allocates it again). */
void kern_quant_scratch_free(void);

/* ---- instruction sets ----
 * Detected at run time (__builtin_cpu_supports plus CPUID for F16C); the SIMD
 * code is compiled for its instruction set whatever -march says. There is no
 * AVX-512 level yet: no machine available to this project exposes AVX-512, so
 * such code could not be tested; AVX-512 CPUs run the AVX2 path. */

typedef enum {
    KERN_ISA_SCALAR = 0, /* portable C */
    KERN_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C */
} kern_isa;

/* The best instruction set this CPU offers (detected once). */
kern_isa kern_quant_isa_detected(void);
/* The instruction set kern_quant_row / kern_matmul_q use now. */
kern_isa kern_quant_isa(void);
/* Selects the instruction set, capped at the detected one (tests use it to run
 * the scalar fallback); returns the one now in effect. Process-wide; do not
 * call while a product runs. */
kern_isa kern_quant_set_isa(kern_isa isa);

#endif
