/*
 * ops.cu - elementwise CUDA twins: RMSNorm, SwiGLU, residual add, bias add,
 * the paged KV store, RoPE, the f16/bf16 conversions, the embedding gather
 * and greedy argmax.
 *
 * Each computes what its CPU twin in kernels/cpu/ computes, in the same order
 * of float operations where that is cheap (RoPE's angles, the conversions and
 * the embedding decodes are bit-identical; reductions differ only in the
 * order of the partial sums). Explicit __fmul_rn / __fsub_rn keep nvcc from
 * fusing a multiply and an add the C build (ISO mode, no contraction) keeps
 * apart.
 */
#include "kernels/cuda/common.cuh"

#include <limits.h>
#include <math.h>

#define EW_THREADS 256
#define EW_MAX_BLOCKS 65535u
#define ROW_THREADS 256
#define ARGMAX_THREADS 1024
#define ROPE_MAX_PAIRS 512 /* the CPU op rotates at most this many pairs per head */

/* ---- reductions ---- */

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every
 * thread gets the result. */
__device__ float block_sum(float v)
{
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* part[] may still be read by a previous call */
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    const int n_warps = (int)(blockDim.x >> 5);
    v = lane < n_warps ? part[lane] : 0.0f;
    return warp_sum(v);
}

/* ---- RMSNorm ---- */

__global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int dim, float eps)
{
    const size_t r = blockIdx.x;
    const float *xr = x + r * (size_t)dim;
    float *o = out + r * (size_t)dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss);
    const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        o[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
}

extern "C" int kern_cuda_rmsnorm_f32(float *out, const float *x, const float *w, int rows, int dim,
                                     float eps)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "rmsnorm");
    if (rc || rows == 0)
        return rc;
    if (rows < 0 || dim <= 0 || !out || !x || !w)
        return kc_fail(KERN_CUDA_E_ARG, "rmsnorm: rows %d, dim %d, or a NULL pointer", rows, dim);
    rmsnorm_kernel<<<(unsigned)rows, ROW_THREADS, 0, kc_stream(c)>>>(out, x, w, dim, eps);
    return kc_launched("rmsnorm launch");
}

/* ---- SwiGLU and add ---- */

__global__ void swiglu_kernel(float *out, const float *gate, const float *up, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = __fmul_rn(g / (1.0f + expf(-g)), up[i]);
    }
}

extern "C" int kern_cuda_swiglu_f32(float *out, const float *gate, const float *up, size_t n)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "swiglu");
    if (rc || n == 0)
        return rc;
    if (!out || !gate || !up)
        return kc_fail(KERN_CUDA_E_ARG, "swiglu: NULL pointer");
    swiglu_kernel<<<kc_blocks(n, EW_THREADS, EW_MAX_BLOCKS), EW_THREADS, 0, kc_stream(c)>>>(
        out, gate, up, n);
    return kc_launched("swiglu launch");
}

__global__ void add_kernel(float *y, const float *x, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

extern "C" int kern_cuda_add_f32(float *y, const float *x, size_t n)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "add");
    if (rc || n == 0)
        return rc;
    if (!y || !x)
        return kc_fail(KERN_CUDA_E_ARG, "add: NULL pointer");
    add_kernel<<<kc_blocks(n, EW_THREADS, EW_MAX_BLOCKS), EW_THREADS, 0, kc_stream(c)>>>(y, x, n);
    return kc_launched("add launch");
}

/* y[r, :] += b for each of rows rows of n (a bias on every token). */
__global__ void add_rows_kernel(float *y, const float *b, size_t n, size_t total)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += b[i % n];
}

extern "C" int kern_cuda_add_rows_f32(float *y, const float *b, int rows, int n)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "add_rows");
    if (rc || rows == 0)
        return rc;
    if (rows < 0 || n <= 0 || !y || !b)
        return kc_fail(KERN_CUDA_E_ARG, "add_rows: rows %d, n %d, or a NULL pointer", rows, n);
    const size_t total = (size_t)rows * (size_t)n;
    add_rows_kernel<<<kc_blocks(total, EW_THREADS, EW_MAX_BLOCKS), EW_THREADS, 0, kc_stream(c)>>>(
        y, b, (size_t)n, total);
    return kc_launched("add_rows launch");
}

/* ---- KV store ---- */

/* One block per row: k and v row r into cache row slots[r]. */
__global__ void kv_store_kernel(float *kc, float *vc, int kv_stride, const float *k, const float *v,
                                int kvd, const int32_t *slots)
{
    const size_t r = blockIdx.x;
    const int32_t slot = slots[r];
    if (slot < 0)
        return;
    float *kd = kc + (size_t)slot * (size_t)kv_stride, *vd = vc + (size_t)slot * (size_t)kv_stride;
    const float *ks = k + r * (size_t)kvd, *vs = v + r * (size_t)kvd;
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
        kd[i] = ks[i];
        vd[i] = vs[i];
    }
}

extern "C" int kern_cuda_kv_store_f32(float *k_cache, float *v_cache, int kv_stride, const float *k,
                                      const float *v, int kvd, const int32_t *slots, int rows)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "kv_store");
    if (rc || rows == 0)
        return rc;
    if (rows < 0 || kvd <= 0 || kv_stride < kvd || !k_cache || !v_cache || !k || !v || !slots)
        return kc_fail(KERN_CUDA_E_ARG,
                       "kv_store: rows %d, kvd %d, kv_stride %d, or a NULL pointer", rows, kvd,
                       kv_stride);
    kv_store_kernel<<<(unsigned)rows, ROW_THREADS, 0, kc_stream(c)>>>(k_cache, v_cache, kv_stride,
                                                                      k, v, kvd, slots);
    return kc_launched("kv_store launch");
}

/* ---- RoPE ---- */

/* One block per row: the row's cos/sin table first (one double-precision
 * evaluation per pair, rounded to float as glibc's cosf/sinf round), then
 * every (head, pair) rotation. Pair i is (2i, 2i + 1), or with NEOX (i, i +
 * n_pairs) as kern_rope_neox_f32 pairs them. */
template <bool NEOX>
__global__ void rope_kernel(float *x, const int32_t *pos, int n_heads, int head_dim, int rope_dim,
                            int n_pairs, float base, const float *inv_freq)
{
    __shared__ float cs[ROPE_MAX_PAIRS], sn[ROPE_MAX_PAIRS];
    const size_t r = blockIdx.x;
    const float p = (float)pos[r];
    for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) {
        const float e = -2.0f * (float)i / (float)rope_dim;
        /* A table (scaled RoPE) replaces the power, as kern_rope_table_f32 does. */
        const float freq = inv_freq ? inv_freq[i] : (float)pow((double)base, (double)e);
        const double theta = (double)__fmul_rn(p, freq);
        double s, co;
        sincos(theta, &s, &co);
        cs[i] = (float)co;
        sn[i] = (float)s;
    }
    __syncthreads();
    float *row = x + r * (size_t)n_heads * head_dim;
    const int n = n_heads * n_pairs;
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
        const int h = t / n_pairs, i = t % n_pairs;
        float *v = row + (size_t)h * head_dim + (NEOX ? i : 2 * i);
        const int other = NEOX ? n_pairs : 1;
        const float a = v[0], b = v[other];
        v[0] = __fsub_rn(__fmul_rn(a, cs[i]), __fmul_rn(b, sn[i]));
        v[other] = __fadd_rn(__fmul_rn(a, sn[i]), __fmul_rn(b, cs[i]));
    }
}

template <bool NEOX>
static int rope(float *x, const int32_t *pos, int rows, int n_heads, int head_dim, int rope_dim,
                float base, const float *inv_freq, const char *what)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, what);
    if (rc || rows == 0)
        return rc;
    if (rows < 0 || n_heads <= 0 || head_dim <= 0 || rope_dim < 0 || rope_dim > head_dim || !x ||
        !pos)
        return kc_fail(KERN_CUDA_E_ARG,
                       "%s: rows %d, n_heads %d, head_dim %d, rope_dim %d, or a NULL pointer", what,
                       rows, n_heads, head_dim, rope_dim);
    const int n_pairs = rope_dim / 2 <= ROPE_MAX_PAIRS ? rope_dim / 2 : ROPE_MAX_PAIRS;
    if (n_pairs == 0)
        return 0;
    rope_kernel<NEOX><<<(unsigned)rows, ROW_THREADS, 0, kc_stream(c)>>>(
        x, pos, n_heads, head_dim, rope_dim, n_pairs, base, inv_freq);
    return kc_launched(what);
}

extern "C" int kern_cuda_rope_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                                  int rope_dim, float base)
{
    return rope<false>(x, pos, rows, n_heads, head_dim, rope_dim, base, NULL, "rope");
}

extern "C" int kern_cuda_rope_neox_f32(float *x, const int32_t *pos, int rows, int n_heads,
                                       int head_dim, int rope_dim, float base)
{
    return rope<true>(x, pos, rows, n_heads, head_dim, rope_dim, base, NULL, "rope_neox");
}

extern "C" int kern_cuda_rope_table_f32(float *x, const int32_t *pos, int rows, int n_heads,
                                        int head_dim, int rope_dim, const float *inv_freq, int neox)
{
    if (!inv_freq && rows > 0)
        return kc_fail(KERN_CUDA_E_ARG, "rope_table: inv_freq is NULL");
    return neox
               ? rope<true>(x, pos, rows, n_heads, head_dim, rope_dim, 0.0f, inv_freq, "rope_table")
               : rope<false>(x, pos, rows, n_heads, head_dim, rope_dim, 0.0f, inv_freq,
                             "rope_table");
}

/* ---- conversions ---- */

/* kern_f32_to_bf16: round to nearest even, NaN made quiet. */
__device__ __forceinline__ uint16_t f32_to_bf16(float f)
{
    const uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

/* kern_f32_to_f16: round to nearest even (subnormals too); NaN becomes the
 * quiet NaN 0x7e00 with the sign kept. */
__device__ __forceinline__ uint16_t f32_to_f16(float f)
{
    const uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)(((u >> 16) & 0x8000u) | 0x7e00u);
    return __half_as_ushort(__float2half_rn(f));
}

template <int TO> __global__ void convert_kernel(void *dst, const void *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        if (TO == 0)
            ((float *)dst)[i] = kc_f16_to_f32(((const uint16_t *)src)[i]);
        else if (TO == 1)
            ((float *)dst)[i] = kc_bf16_to_f32(((const uint16_t *)src)[i]);
        else if (TO == 2)
            ((uint16_t *)dst)[i] = f32_to_f16(((const float *)src)[i]);
        else
            ((uint16_t *)dst)[i] = f32_to_bf16(((const float *)src)[i]);
    }
}

template <int TO> static int convert(void *dst, const void *src, size_t n, const char *what)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, what);
    if (rc || n == 0)
        return rc;
    if (!dst || !src)
        return kc_fail(KERN_CUDA_E_ARG, "%s: NULL pointer", what);
    convert_kernel<TO>
        <<<kc_blocks(n, EW_THREADS, EW_MAX_BLOCKS), EW_THREADS, 0, kc_stream(c)>>>(dst, src, n);
    return kc_launched(what);
}

extern "C" int kern_cuda_f16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    return convert<0>(dst, src, n, "f16 to f32");
}

extern "C" int kern_cuda_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    return convert<1>(dst, src, n, "bf16 to f32");
}

extern "C" int kern_cuda_f32_to_f16_row(uint16_t *dst, const float *src, size_t n)
{
    return convert<2>(dst, src, n, "f32 to f16");
}

extern "C" int kern_cuda_f32_to_bf16_row(uint16_t *dst, const float *src, size_t n)
{
    return convert<3>(dst, src, n, "f32 to bf16");
}

/* Rows of x (row stride ldx) rounded to a half type into a packed [M][K]
 * array: the activations the tensor-core GEMM reads (matmul.cu). */
__global__ void rows_to_half_kernel(uint16_t *dst, const float *x, int ldx, int K, size_t total,
                                    int bf16)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / (size_t)K, k = i % (size_t)K;
        const float v = x[m * (size_t)ldx + k];
        dst[i] = bf16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
}

int kc_rows_to_half(uint16_t *dst, const float *x, int ldx, int M, int K, bool bf16, cudaStream_t s)
{
    const size_t total = (size_t)M * (size_t)K;
    rows_to_half_kernel<<<kc_blocks(total, EW_THREADS, EW_MAX_BLOCKS), EW_THREADS, 0, s>>>(
        dst, x, ldx, K, total, bf16 ? 1 : 0);
    return kc_launched("activations to half launch");
}

/* ---- embeddings ---- */

__device__ __forceinline__ uint16_t load_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8)); /* little-endian, 2-byte aligned or not */
}

/* Element j of a row of `type` (kern_dequant_row's values, bit for bit). */
__device__ __forceinline__ float decode(int type, const uint8_t *row, int j)
{
    switch (type) {
    case KC_TYPE_F32:
        return ((const float *)row)[j];
    case KC_TYPE_F16:
        return kc_f16_to_f32(((const uint16_t *)row)[j]);
    case KC_TYPE_BF16:
        return kc_bf16_to_f32(((const uint16_t *)row)[j]);
    case KC_TYPE_Q8_0: { /* 34-byte blocks: f16 d, 32 int8 codes */
        const uint8_t *b = row + (size_t)(j / 32) * 34;
        return __fmul_rn((float)(int8_t)b[2 + j % 32], kc_f16_to_f32(load_u16(b)));
    }
    default: { /* Q4_0, 18-byte blocks: f16 d, 16 bytes of nibbles (low: first half) */
        const uint8_t *b = row + (size_t)(j / 32) * 18;
        const int l = j % 32;
        const int q = l < 16 ? (b[2 + l] & 0x0f) : (b[2 + l - 16] >> 4);
        return __fmul_rn((float)(q - 8), kc_f16_to_f32(load_u16(b)));
    }
    }
}

__global__ void embed_kernel(int type, float *out, const uint8_t *table, size_t row_bytes,
                             int n_vocab, const int32_t *tokens, int dim)
{
    const size_t t = blockIdx.x;
    const int tok = tokens[t];
    float *o = out + t * (size_t)dim;
    if (tok < 0 || tok >= n_vocab) {
        for (int j = threadIdx.x; j < dim; j += blockDim.x)
            o[j] = 0.0f;
        return;
    }
    const uint8_t *row = table + (size_t)tok * row_bytes;
    for (int j = threadIdx.x; j < dim; j += blockDim.x)
        o[j] = decode(type, row, j);
}

extern "C" int kern_cuda_embed(int type, float *out, const void *table, int n_vocab,
                               const int32_t *tokens, int n_tokens, int dim)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "embed");
    if (rc || n_tokens == 0)
        return rc;
    if (n_tokens < 0 || n_vocab <= 0 || dim <= 0 || !out || !table || !tokens)
        return kc_fail(KERN_CUDA_E_ARG, "embed: n_tokens %d, n_vocab %d, dim %d, or a NULL pointer",
                       n_tokens, n_vocab, dim);
    size_t row_bytes;
    switch (type) {
    case KC_TYPE_F32:
        row_bytes = 4 * (size_t)dim;
        break;
    case KC_TYPE_F16:
    case KC_TYPE_BF16:
        row_bytes = 2 * (size_t)dim;
        break;
    case KC_TYPE_Q8_0:
        row_bytes = (size_t)dim / 32 * 34;
        break;
    case KC_TYPE_Q4_0:
        row_bytes = (size_t)dim / 32 * 18;
        break;
    default:
        return kc_fail(KERN_CUDA_E_TYPE, "embed: type %d is not supported on CUDA", type);
    }
    if ((type == KC_TYPE_Q8_0 || type == KC_TYPE_Q4_0) && dim % 32 != 0)
        return kc_fail(KERN_CUDA_E_ARG, "embed: dim %d is not a multiple of 32", dim);
    embed_kernel<<<(unsigned)n_tokens, ROW_THREADS, 0, kc_stream(c)>>>(
        type, out, (const uint8_t *)table, row_bytes, n_vocab, tokens, dim);
    return kc_launched("embed launch");
}

/* ---- argmax ---- */

/* (v, i) beats (bv, bi): larger, or equal and earlier. NaN never beats. */
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi)
{
    return v > bv || (v == bv && i < bi);
}

__global__ void argmax_kernel(int32_t *out, const float *x, int n)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    const float *xr = x + (size_t)blockIdx.x * (size_t)n;
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (beats(xr[i], i, bv, bi)) {
            bv = xr[i];
            bi = i;
        }
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (beats(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = (int)(blockDim.x >> 5);
        bv = lane < n_warps ? sv[lane] : -INFINITY;
        bi = lane < n_warps ? si[lane] : INT_MAX;
        for (int o = 16; o > 0; o >>= 1) {
            const float v = __shfl_xor_sync(0xffffffffu, bv, o);
            const int i = __shfl_xor_sync(0xffffffffu, bi, o);
            if (beats(v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        if (lane == 0)
            out[blockIdx.x] = bi == INT_MAX ? 0 : bi;
    }
}

extern "C" int kern_cuda_argmax_f32(int32_t *out, const float *x, int rows, int n)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "argmax");
    if (rc || rows == 0)
        return rc;
    if (rows < 0 || n <= 0 || !out || !x)
        return kc_fail(KERN_CUDA_E_ARG, "argmax: rows %d, n %d, or a NULL pointer", rows, n);
    argmax_kernel<<<(unsigned)rows, ARGMAX_THREADS, 0, kc_stream(c)>>>(out, x, n);
    return kc_launched("argmax launch");
}
