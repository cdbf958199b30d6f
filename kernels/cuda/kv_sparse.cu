/*
 * kv_sparse.cu - the CUDA twins of the compressed-KV ops (kernels/cpu/kv_quant.c,
 * kernels/cpu/attention_quant.c) and of the block-sparse causal prefill
 * (kernels/cpu/attention_sparse.c).
 *
 * Pages: the byte layout of kernels.h, byte for byte, so a page packed here
 * reads on the CPU and the other way round. Packing repeats the CPU's
 * arithmetic step by step (IEEE division, f16 round-to-nearest-even, the same
 * round-up of scales, the same clamps and code rounding), so the codes and
 * scales are bit-identical to kern_kvq_pack's; the one dequantizer
 * (kvq_value) is the CPU's formula with fused multiply-adds for the ZIP
 * affine maps, as the CPU's AVX2 path computes them.
 *
 * Decode attention over pages: one thread block per (query tile, kv head,
 * sequence), or per (page range, kv head, sequence) when a decode batch is too
 * small to fill the device (flash-decoding: partial results in the op
 * workspace, merged by a second kernel that also writes the lse). A block
 * walks its pages in chunks of TK slots, dequantizes the chunk's K and V of its
 * kv head into shared memory once for the whole GQA group, and runs one online
 * softmax per query vector (a warp per vector, a lane per key) exactly as
 * attention.cu does for f32 pages. Ordered slots are causal per row; set pages
 * are visible to every row.
 *
 * Block-sparse prefill: one thread block per (row tile inside one sparse query
 * block, kv head). The block visits the union of its heads' selected key blocks
 * in ascending order, in chunks of TK keys read through the page table, and a
 * vector skips chunks of blocks its own list does not hold; unselected blocks
 * are never loaded. Keys inside the diagonal block are masked per token.
 *
 * Device data the host cannot check: page descriptors (kern_kvq_page, on the
 * device), block tables, selection positions and mask bits. Kernels never read
 * outside what a descriptor describes: a page with an unknown format, a slot
 * count outside its block, NULL data or missing ZIP statistics is skipped; a
 * packing position outside its source packs zeros; mask bits above the
 * diagonal are ignored (keys are causal anyway) and a row that selects nothing
 * gets zeros.
 */
#include "kernels/cuda/common.cuh"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#define GROUP 32 /* quantization group along head_dim */
#define TK 32    /* keys per chunk: one per lane */
#define WARPS 4  /* warps per attention block */
#define QPW 4    /* query vectors per warp */
#define NV_MAX (WARPS * QPW)
#define MAX_KV_HEADS 1024 /* kern_kvq_geom_check's bound */
#define F16_MAX 65504.0f
#define DEFAULT_SMEM (48u << 10)
#define SEQS_PER_LAUNCH 64 /* sequences carried in one launch's parameters */
#define MAX_SPLITS 64
#define SPLIT_MIN_KEYS 256

/* ---- page geometry (kernels.h "compressed KV"), shared by host and device ---- */

__host__ __device__ __forceinline__ int fmt_bits(int fmt)
{
    switch (fmt) {
    case KERN_KVQ_F32:
        return 32;
    case KERN_KVQ_F16:
        return 16;
    case KERN_KVQ_Q8:
    case KERN_KVQ_ZIP8:
        return 8;
    case KERN_KVQ_Q4:
    case KERN_KVQ_ZIP4:
        return 4;
    case KERN_KVQ_ZIP2:
        return 2;
    default:
        return 0;
    }
}

__host__ __device__ __forceinline__ bool fmt_zip(int fmt)
{
    return fmt == KERN_KVQ_ZIP8 || fmt == KERN_KVQ_ZIP4 || fmt == KERN_KVQ_ZIP2;
}

__host__ __device__ __forceinline__ int n_groups(int d)
{
    return (d + GROUP - 1) / GROUP;
}

/* Bytes of one kv head's data for one slot (codes and the slot's scales). */
__host__ __device__ __forceinline__ size_t slot_head_bytes(int fmt, int d)
{
    switch (fmt) {
    case KERN_KVQ_F32:
        return 4 * (size_t)d;
    case KERN_KVQ_F16:
        return 2 * (size_t)d;
    case KERN_KVQ_Q8:
        return (size_t)d + 2 * (size_t)n_groups(d);
    case KERN_KVQ_Q4:
        return (size_t)d / 2 + 2 * (size_t)n_groups(d);
    default:
        return (size_t)d * (size_t)fmt_bits(fmt) / 8;
    }
}

/* Bytes before the head tiles: the (min, delta) f16 pairs of a ZIP V page. */
__host__ __device__ __forceinline__ size_t header_bytes(int fmt, int kind, int bs)
{
    return fmt_zip(fmt) && kind == KERN_KVQ_V ? 4 * (size_t)bs : 0;
}

/* ---- f16 helpers (bit patterns, as the CPU's _Float16) ---- */

__device__ __forceinline__ uint16_t f16_bits(float x)
{
    return __half_as_ushort(__float2half_rn(x));
}

__device__ __forceinline__ float f16_val(uint16_t b)
{
    return __half2float(__ushort_as_half(b));
}

/* The f16 at or above x >= 0, at most F16_MAX (kv_quant.c f16_round_up). */
__device__ __forceinline__ uint16_t f16_round_up(float x)
{
    if (!(x < F16_MAX))
        return f16_bits(F16_MAX);
    uint16_t b = f16_bits(x);
    if (f16_val(b) < x)
        b++;
    return b;
}

__device__ __forceinline__ float nan_to_zero(float x)
{
    return x != x ? 0.0f : x;
}

/* Round-half-up of v into [0, top] (kv_quant.c ucode). */
__device__ __forceinline__ int ucode(float v, int top)
{
    if (!(v > 0.0f))
        return 0;
    if (v >= (float)top)
        return top;
    return (int)(v + 0.5f);
}

/* Code of element e of a slot's row of `bits`-bit codes, packed per group of
 * up to 32 values (4 bits: halves; 2 bits: quarters). */
__device__ __forceinline__ int code_at(const uint8_t *row, int e, int d, int bits)
{
    if (bits == 8)
        return row[e];
    const int g0 = e & ~(GROUP - 1), m = min(GROUP, d - g0), j = e - g0;
    const uint8_t *b = row + g0 * bits / 8;
    if (bits == 4) {
        const int h = m / 2;
        return j < h ? b[j] & 15 : b[j - h] >> 4;
    }
    const int q = m / 4, k = j / q;
    return (b[j - k * q] >> (2 * k)) & 3;
}

/* Value of element e of kv head h, slot s of a page (kern_kvq_dequant_head for
 * one element). bs is the page's own slot count. */
__device__ __forceinline__ float kvq_value(const uint8_t *page, int kind, int fmt, int nkv, int d,
                                           int bs, int h, int s, int e, const float *stats)
{
    switch (fmt) {
    case KERN_KVQ_F32:
        return ((const float *)page)[((size_t)s * nkv + h) * d + e];
    case KERN_KVQ_F16:
        return f16_val(((const uint16_t *)page)[((size_t)s * nkv + h) * d + e]);
    case KERN_KVQ_Q8:
    case KERN_KVQ_Q4: {
        const int ng = n_groups(d);
        const uint8_t *t = page + (size_t)h * bs * slot_head_bytes(fmt, d);
        const float sd = f16_val(((const uint16_t *)t)[(size_t)s * ng + e / GROUP]);
        const uint8_t *codes = t + 2 * (size_t)bs * ng;
        if (fmt == KERN_KVQ_Q8)
            return (float)(int8_t)codes[(size_t)s * d + e] * sd;
        return (float)(code_at(codes + (size_t)s * (d / 2), e, d, 4) - 8) * sd;
    }
    default: {
        const int bits = fmt_bits(fmt);
        const size_t row = (size_t)d * bits / 8;
        const uint8_t *codes = page + header_bytes(fmt, kind, bs) + (size_t)h * bs * row;
        const float c = (float)code_at(codes + (size_t)s * row, e, d, bits);
        const size_t kvd = (size_t)nkv * d, ch = (size_t)h * d + e;
        if (kind == KERN_KVQ_K)
            return fmaf(c, stats[kvd + ch], stats[ch]);
        const uint16_t *pair = (const uint16_t *)page + 2 * (size_t)s;
        return fmaf(c, f16_val(pair[1]), f16_val(pair[0])) * stats[2 * kvd + ch];
    }
    }
}

/* Values e0 .. e0 + 7 (e0 a multiple of 8, so one quantization group) of kv head
 * h, slot s: kvq_value for eight elements with the addressing done once, as the
 * attention kernels expand their tiles. */
__device__ __forceinline__ void kvq_values8(float (&o)[8], const uint8_t *page, int kind, int fmt,
                                            int nkv, int d, int bs, int h, int s, int e0,
                                            const float *stats)
{
    switch (fmt) {
    case KERN_KVQ_F32: {
        const float *x = (const float *)page + ((size_t)s * nkv + h) * d + e0;
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = x[i];
        return;
    }
    case KERN_KVQ_F16: {
        const uint16_t *x = (const uint16_t *)page + ((size_t)s * nkv + h) * d + e0;
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = f16_val(x[i]);
        return;
    }
    case KERN_KVQ_Q8:
    case KERN_KVQ_Q4: {
        const int ng = n_groups(d);
        const uint8_t *t = page + (size_t)h * bs * slot_head_bytes(fmt, d);
        const float sd = f16_val(((const uint16_t *)t)[(size_t)s * ng + e0 / GROUP]);
        const uint8_t *codes = t + 2 * (size_t)bs * ng;
        if (fmt == KERN_KVQ_Q8) {
            const int8_t *x = (const int8_t *)codes + (size_t)s * d + e0;
#pragma unroll
            for (int i = 0; i < 8; i++)
                o[i] = (float)x[i] * sd;
            return;
        }
        const uint8_t *row = codes + (size_t)s * (d / 2);
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = (float)(code_at(row, e0 + i, d, 4) - 8) * sd;
        return;
    }
    default: {
        const int bits = fmt_bits(fmt);
        const size_t row = (size_t)d * bits / 8;
        const uint8_t *codes =
            page + header_bytes(fmt, kind, bs) + (size_t)h * bs * row + (size_t)s * row;
        const size_t kvd = (size_t)nkv * d, ch = (size_t)h * d + e0;
        if (kind == KERN_KVQ_K) {
#pragma unroll
            for (int i = 0; i < 8; i++)
                o[i] = fmaf((float)code_at(codes, e0 + i, d, bits), stats[kvd + ch + i],
                            stats[ch + i]);
            return;
        }
        const uint16_t *pair = (const uint16_t *)page + 2 * (size_t)s;
        const float mt = f16_val(pair[0]), dt = f16_val(pair[1]);
#pragma unroll
        for (int i = 0; i < 8; i++)
            o[i] = fmaf((float)code_at(codes, e0 + i, d, bits), dt, mt) * stats[2 * kvd + ch + i];
        return;
    }
    }
}

/* ---- host-side checks (the CPU's messages, where the data is on the host) ---- */

static int check_geom(const char *what, const kern_kvq_geom *g)
{
    if (!g)
        return kc_fail(KERN_CUDA_E_ARG, "%s: kv geometry is NULL", what);
    if (g->n_kv_heads < 1 || g->n_kv_heads > MAX_KV_HEADS)
        return kc_fail(KERN_CUDA_E_ARG, "%s: n_kv_heads %d is not in [1, %d]", what, g->n_kv_heads,
                       MAX_KV_HEADS);
    if (g->head_dim < 8 || g->head_dim > KERN_ATTN_MAX_HEAD_DIM || g->head_dim % 8 != 0)
        return kc_fail(KERN_CUDA_E_ARG, "%s: head_dim %d is not a multiple of 8 in [8, %d]", what,
                       g->head_dim, KERN_ATTN_MAX_HEAD_DIM);
    if (g->block_size < 1 || g->block_size > KERN_KVQ_MAX_BLOCK_SIZE)
        return kc_fail(KERN_CUDA_E_ARG, "%s: block_size %d is not in [1, %d]", what, g->block_size,
                       KERN_KVQ_MAX_BLOCK_SIZE);
    return 0;
}

static int check_page(const char *what, const void *page, int kind, int fmt, const kern_kvq_geom *g,
                      int slot0, int n, const float *stats)
{
    int rc = check_geom(what, g);
    if (rc)
        return rc;
    if (fmt < 0 || fmt >= KERN_KVQ_N_FMT)
        return kc_fail(KERN_CUDA_E_ARG, "%s: unknown page format %d", what, fmt);
    if (kind != KERN_KVQ_K && kind != KERN_KVQ_V)
        return kc_fail(KERN_CUDA_E_ARG, "%s: page kind %d is neither K nor V", what, kind);
    if (!page || ((uintptr_t)page & 3u) != 0)
        return kc_fail(KERN_CUDA_E_ARG, "%s: page %p is NULL or not 4-byte aligned", what, page);
    if (slot0 < 0 || n < 0 || slot0 > g->block_size - n)
        return kc_fail(KERN_CUDA_E_ARG, "%s: slots [%d, %d + %d) are outside a page of %d slots",
                       what, slot0, slot0, n, g->block_size);
    if (fmt_zip(fmt) && !stats)
        return kc_fail(KERN_CUDA_E_ARG, "%s: zip%d page needs its segment statistics", what,
                       fmt_bits(fmt));
    return 0;
}

/* Shared memory beyond the default needs the kernel's opt-in (cheap; per launch,
 * so any thread's context may launch any of these kernels first). */
template <typename F> static int allow_smem(const kc_ctx *c, F fn, size_t bytes, const char *what)
{
    if (bytes > c->smem_optin)
        return kc_fail(KERN_CUDA_E_ARG,
                       "%s: needs %zu bytes of shared memory, the device allows %zu", what, bytes,
                       c->smem_optin);
    if (bytes <= DEFAULT_SMEM)
        return 0;
    return kc_check(
        cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what);
}

/* ---- packing ---- */

struct pack_params {
    uint8_t *page;
    int kind, fmt, nkv, d, bs, slot0, n;
    const float *stats;
    /* source (kern_kvq_src) */
    const float *base;
    size_t stride;
    const int32_t *src_blocks;
    int src_bs, src_first, src_len;
    /* selection (kern_kvq_sel) */
    const int32_t *idx;
    int head_stride, sel_first;
};

/* Head h's source values for selected slot i, or NULL (packed as zeros) when
 * the position is outside the source. */
__device__ __forceinline__ const float *pack_src(const pack_params &p, int h, int i)
{
    const int t = p.idx ? p.idx[(size_t)h * p.head_stride + i] : p.sel_first + i;
    const long u = (long)t - p.src_first;
    if (u < 0 || u >= p.src_len)
        return NULL;
    size_t r = (size_t)u;
    if (p.src_blocks)
        r = (size_t)p.src_blocks[u / p.src_bs] * (size_t)p.src_bs + (size_t)(u % p.src_bs);
    return p.base + r * p.stride + (size_t)h * p.d;
}

/* Lane `lane` of a warp holds code c of value g0 + lane of a group of m values;
 * writes the group's packed bytes at dst (kv_quant.c codes_pack). */
__device__ __forceinline__ void store_codes(uint8_t *dst, int c, int lane, int m, int bits)
{
    const unsigned full = 0xffffffffu;
    if (bits == 8) {
        if (lane < m)
            dst[lane] = (uint8_t)c;
        return;
    }
    if (bits == 4) {
        const int h = m / 2;
        const int hi = __shfl_sync(full, c, (lane + h) & 31);
        if (lane < h)
            dst[lane] = (uint8_t)(c | hi << 4);
        return;
    }
    const int q = m / 4;
    const int c1 = __shfl_sync(full, c, (lane + q) & 31);
    const int c2 = __shfl_sync(full, c, (lane + 2 * q) & 31);
    const int c3 = __shfl_sync(full, c, (lane + 3 * q) & 31);
    if (lane < q)
        dst[lane] = (uint8_t)(c | c1 << 2 | c2 << 4 | c3 << 6);
}

/* One block per selected slot; warp w packs the (head, group) units w, w +
 * WARPS, ...; ZIP V first reduces the slot's range over all heads. */
__global__ void __launch_bounds__(WARPS * 32) kvq_pack_kernel(const pack_params p)
{
    const int i = blockIdx.x, s = p.slot0 + i;
    const int d = p.d, ng = n_groups(d), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned full = 0xffffffffu;
    if (p.fmt == KERN_KVQ_F32 || p.fmt == KERN_KVQ_F16) {
        for (int x = threadIdx.x; x < p.nkv * d; x += blockDim.x) {
            const int h = x / d, e = x % d;
            const float *src = pack_src(p, h, i);
            const float v = src ? src[e] : 0.0f;
            const size_t off = ((size_t)s * p.nkv + h) * d + e;
            if (p.fmt == KERN_KVQ_F32)
                ((float *)p.page)[off] = v;
            else
                ((uint16_t *)p.page)[off] = f16_bits(v);
        }
        return;
    }
    const size_t kvd = (size_t)p.nkv * d;
    const int bits = fmt_bits(p.fmt), top = (1 << bits) - 1;
    __shared__ float red_lo[WARPS * 32], red_hi[WARPS * 32];
    __shared__ float pair_mn, pair_dl;
    if (fmt_zip(p.fmt) && p.kind == KERN_KVQ_V) {
        /* CST: the slot's (min, delta) of x / scale[c] over every head (finite values). */
        const float *scale = p.stats + 2 * kvd;
        float lo = INFINITY, hi = -INFINITY;
        for (int x = threadIdx.x; x < p.nkv * d; x += blockDim.x) {
            const int h = x / d, e = x % d;
            const float *src = pack_src(p, h, i);
            const float v = (src ? src[e] : 0.0f) / scale[(size_t)h * d + e];
            if (fabsf(v) <= FLT_MAX) {
                lo = fminf(lo, v);
                hi = fmaxf(hi, v);
            }
        }
        red_lo[threadIdx.x] = lo;
        red_hi[threadIdx.x] = hi;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int t = 1; t < (int)blockDim.x; t++) {
                lo = fminf(lo, red_lo[t]);
                hi = fmaxf(hi, red_hi[t]);
            }
            if (lo > hi)
                lo = hi = 0.0f; /* no finite value */
            const uint16_t mn16 = f16_bits(lo > F16_MAX ? F16_MAX : lo < -F16_MAX ? -F16_MAX : lo);
            const float mn = f16_val(mn16);
            const float range = hi - mn;
            uint16_t dl16 = f16_bits(1.0f);
            if (range >= 1e-8f * fmaxf(1.0f, fabsf(hi)) && range <= FLT_MAX) {
                dl16 = f16_round_up(range / (float)top);
                if (f16_val(dl16) == 0.0f)
                    dl16 = f16_bits(1.0f);
            }
            uint16_t *pr = (uint16_t *)p.page + 2 * (size_t)s;
            pr[0] = mn16;
            pr[1] = dl16;
            pair_mn = mn;
            pair_dl = f16_val(dl16);
        }
        __syncthreads();
    }
    for (int u = warp; u < p.nkv * ng; u += WARPS) {
        const int h = u / ng, gi = u % ng, g0 = gi * GROUP, m = min(GROUP, d - g0);
        const float *src = pack_src(p, h, i);
        const float x = lane < m && src ? src[g0 + lane] : 0.0f;
        int c = 0;
        if (p.fmt == KERN_KVQ_Q8 || p.fmt == KERN_KVQ_Q4) {
            /* The group's largest finite magnitude; the first of equal ones wins (Q4 keeps
             * its sign). */
            const float a = fabsf(x);
            float best = lane < m && a <= FLT_MAX ? a : -1.0f;
            int at = lane;
            for (int o = 16; o > 0; o >>= 1) {
                const float ob = __shfl_xor_sync(full, best, o);
                const int oat = __shfl_xor_sync(full, at, o);
                if (ob > best || (ob == best && oat < at)) {
                    best = ob;
                    at = oat;
                }
            }
            const float xs = __shfl_sync(full, x, at);
            const float amax = best > 0.0f ? best : 0.0f;
            const float smax = best > 0.0f ? xs : 0.0f;
            uint8_t *tile = p.page + (size_t)h * p.bs * slot_head_bytes(p.fmt, d);
            uint16_t *sc = (uint16_t *)tile + (size_t)s * ng + gi;
            uint8_t *codes = tile + 2 * (size_t)p.bs * ng;
            const float xv = nan_to_zero(x);
            if (p.fmt == KERN_KVQ_Q8) {
                const uint16_t d16 = f16_round_up(amax / 127.0f);
                const float dd = f16_val(d16);
                float v = dd > 0.0f ? xv / dd : 0.0f;
                v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                if (lane == 0)
                    *sc = d16;
                if (lane < m)
                    codes[(size_t)s * d + g0 + lane] =
                        (uint8_t)(int8_t)(int)(v + (v >= 0.0f ? 0.5f : -0.5f));
                continue;
            }
            const float mag = f16_val(f16_round_up(amax / 8.0f));
            const float dd = smax > 0.0f ? -mag : mag;
            if (lane == 0)
                *sc = f16_bits(dd);
            const float v = dd != 0.0f ? xv / dd + 8.5f : 8.5f;
            c = !(v > 0.0f) ? 0 : v >= 15.0f ? 15 : (int)v;
            store_codes(codes + (size_t)s * (d / 2) + g0 / 2, c, lane, m, 4);
            continue;
        }
        const size_t row = (size_t)d * bits / 8;
        uint8_t *codes = p.page + header_bytes(p.fmt, p.kind, p.bs) + (size_t)h * p.bs * row +
                         (size_t)s * row + g0 * bits / 8;
        const size_t ch = (size_t)h * d + g0 + (lane < m ? lane : 0);
        if (p.kind == KERN_KVQ_K)
            c = ucode((nan_to_zero(x) - p.stats[ch]) / p.stats[kvd + ch], top);
        else
            c = ucode((nan_to_zero(x) / p.stats[2 * kvd + ch] - pair_mn) / pair_dl, top);
        store_codes(codes, c, lane, m, bits);
    }
}

extern "C" int kern_cuda_kvq_pack(void *page, kern_kvq_kind kind, kern_kvq_fmt fmt,
                                  const kern_kvq_geom *g, int slot0, const kern_kvq_src *src,
                                  const kern_kvq_sel *sel, const float *stats)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "kvq_pack");
    if (rc)
        return rc;
    if (!sel)
        return kc_fail(KERN_CUDA_E_ARG, "kvq_pack: selection is NULL");
    rc = check_page("kvq_pack", page, kind, fmt, g, slot0, sel->n, stats);
    if (rc)
        return rc;
    const size_t kvd = (size_t)g->n_kv_heads * g->head_dim;
    if (!src || !src->base)
        return kc_fail(KERN_CUDA_E_ARG, "kvq_pack: source is NULL");
    if (src->stride < kvd)
        return kc_fail(KERN_CUDA_E_ARG, "kvq_pack: source stride %zu is below kv_dim %zu",
                       src->stride, kvd);
    if (src->len < 0 || src->first < 0 || src->first > INT_MAX - src->len ||
        (src->blocks && src->block_size < 1))
        return kc_fail(KERN_CUDA_E_ARG,
                       "kvq_pack: source positions [%d, %d + %d) or block_size %d are invalid",
                       src->first, src->first, src->len, src->block_size);
    if (sel->idx && sel->head_stride < 0)
        return kc_fail(KERN_CUDA_E_ARG, "kvq_pack: selection head_stride %d is negative",
                       sel->head_stride);
    if (!sel->idx && sel->n > 0 &&
        (sel->first < src->first || sel->first - src->first > src->len - sel->n))
        return kc_fail(KERN_CUDA_E_ARG,
                       "kvq_pack: positions [%d, %d + %d) are outside the source [%d, %d + %d)",
                       sel->first, sel->first, sel->n, src->first, src->first, src->len);
    if (sel->n == 0)
        return 0;
    pack_params p;
    p.page = (uint8_t *)page;
    p.kind = kind;
    p.fmt = fmt;
    p.nkv = g->n_kv_heads;
    p.d = g->head_dim;
    p.bs = g->block_size;
    p.slot0 = slot0;
    p.n = sel->n;
    p.stats = stats;
    p.base = src->base;
    p.stride = src->stride;
    p.src_blocks = src->blocks;
    p.src_bs = src->block_size;
    p.src_first = src->first;
    p.src_len = src->len;
    p.idx = sel->idx;
    p.head_stride = sel->head_stride;
    p.sel_first = sel->first;
    kvq_pack_kernel<<<(unsigned)sel->n, WARPS * 32, 0, kc_stream(c)>>>(p);
    return kc_launched("kvq_pack launch");
}

/* ---- unpacking ---- */

__global__ void kvq_unpack_kernel(float *dst, size_t dst_stride, const uint8_t *page, int kind,
                                  int fmt, int nkv, int d, int bs, int slot0, int n,
                                  const float *stats)
{
    const size_t total = (size_t)n * nkv * d;
    for (size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x; x < total;
         x += (size_t)gridDim.x * blockDim.x) {
        const int e = (int)(x % d), h = (int)(x / d % nkv), r = (int)(x / ((size_t)d * nkv));
        dst[(size_t)r * dst_stride + (size_t)h * d + e] =
            kvq_value(page, kind, fmt, nkv, d, bs, h, slot0 + r, e, stats);
    }
}

extern "C" int kern_cuda_kvq_unpack(float *dst, size_t dst_stride, const void *page,
                                    kern_kvq_kind kind, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                                    int slot0, int n, const float *stats)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "kvq_unpack");
    if (rc)
        return rc;
    rc = check_page("kvq_unpack", page, kind, fmt, g, slot0, n, stats);
    if (rc)
        return rc;
    const size_t kvd = (size_t)g->n_kv_heads * g->head_dim;
    if (!dst && n > 0)
        return kc_fail(KERN_CUDA_E_ARG, "kvq_unpack: destination is NULL");
    if (dst_stride < kvd)
        return kc_fail(KERN_CUDA_E_ARG, "kvq_unpack: dst_stride %zu is below kv_dim %zu",
                       dst_stride, kvd);
    if (n == 0)
        return 0;
    const size_t total = (size_t)n * kvd;
    kvq_unpack_kernel<<<kc_blocks(total, 256, 4096), 256, 0, kc_stream(c)>>>(
        dst, dst_stride, (const uint8_t *)page, kind, fmt, g->n_kv_heads, g->head_dim,
        g->block_size, slot0, n, stats);
    return kc_launched("kvq_unpack launch");
}

/* ---- shared online-softmax pieces ---- */

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* V chunk [TK][hd], queries [NV_MAX][hd], K chunk [TK][hd + 1] (odd stride:
 * the lanes' keys fall in distinct banks). */
static size_t attn_smem_bytes(int hd)
{
    return sizeof(float) * ((size_t)TK * hd + (size_t)NV_MAX * hd + (size_t)TK * (hd + 1));
}

/* One online-softmax step of a warp's query vector over a chunk of cn keys in
 * shared memory: lane j holds key j's visibility. Same arithmetic as
 * attention.cu. */
template <int DPL>
__device__ __forceinline__ void softmax_step(float &m, float &l, float (&acc)[DPL], const float *qv,
                                             const float *Ks, int ks, const float *Vs, int hd,
                                             int cn, bool vis, float scale, int lane)
{
    float sc = -INFINITY;
    if (vis) {
        const float *kr = Ks + lane * ks;
        float d0 = 0.0f;
        for (int d = 0; d < hd; d++)
            d0 = fmaf(qv[d], kr[d], d0);
        sc = d0 * scale;
    }
    const float m_new = fmaxf(m, warp_max(sc));
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float corr = expf(m - m_use); /* 0 on the first chunk */
    const float pj = vis ? expf(sc - m_use) : 0.0f;
    l = l * corr + warp_sum(pj);
#pragma unroll
    for (int i = 0; i < DPL; i++)
        acc[i] *= corr;
    for (int jj = 0; jj < cn; jj++) {
        const float pb = __shfl_sync(0xffffffffu, pj, jj);
        const float *vr = Vs + jj * hd;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < hd)
                acc[i] = fmaf(pb, vr[d], acc[i]);
        }
    }
    m = m_new;
}

/* ---- decode attention over compressed pages ---- */

struct kvq_seq_d {
    const float *q;
    float *out;
    float *lse;
    const int32_t *q_pos;
    const kern_kvq_page *pages;
    int n_pages, n_q, ctx_len;
};

struct kvq_attn_params {
    int n_heads, nkv, hd, block_size, group, rows_per_tile;
    float scale;
    /* n_splits > 1: block x = split over pages [split * pages_per_split, + pages_per_split);
     * partials at part[((s * nkv + kvh) * NV_MAX + vector) * n_splits + split] as
     * (hd + 2) floats: max, sum, unnormalized output. */
    int n_splits, pages_per_split;
    float *part;
    int n_seqs;
    kvq_seq_d seqs[SEQS_PER_LAUNCH];
};
static_assert(sizeof(kvq_attn_params) <= 4096, "kernel parameters are limited to 4 KiB");

__device__ __forceinline__ int kvq_row_pos(const kvq_seq_d &sq, int r)
{
    return sq.q_pos ? sq.q_pos[r] : sq.ctx_len - sq.n_q + r;
}

template <int DPL>
__global__ void __launch_bounds__(WARPS * 32) kvq_attn_kernel(const kvq_attn_params p)
{
    extern __shared__ float smem[];
    __shared__ int kpos[TK];
    const int hd = p.hd, ks = hd + 1;
    float *Vs = smem;
    float *Qs = Vs + TK * hd;
    float *Ks = Qs + NV_MAX * hd;
    const int s = blockIdx.z, kvh = blockIdx.y;
    const int tile = p.n_splits > 1 ? 0 : blockIdx.x, split = p.n_splits > 1 ? blockIdx.x : 0;
    const kvq_seq_d sq = p.seqs[s];
    const int r0 = tile * p.rows_per_tile;
    if (r0 >= sq.n_q)
        return;
    const int r1 = min(r0 + p.rows_per_tile, sq.n_q);
    const int group = p.group, n_vec = (r1 - r0) * group;
    const size_t q_row = (size_t)p.n_heads * hd;
    for (int x = threadIdx.x; x < n_vec * hd; x += blockDim.x) {
        const int vi = x / hd, e = x % hd;
        Qs[x] =
            sq.q[(size_t)(r0 + vi / group) * q_row + (size_t)(kvh * group + vi % group) * hd + e];
    }
    int maxpos = INT_MIN;
    for (int r = r0; r < r1; r++)
        maxpos = max(maxpos, kvq_row_pos(sq, r));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float m[QPW], l[QPW], acc[QPW][DPL];
    int vpos[QPW];
#pragma unroll
    for (int j = 0; j < QPW; j++) {
        const int vi = warp + WARPS * j;
        vpos[j] = vi < n_vec ? kvq_row_pos(sq, r0 + vi / group) : INT_MIN;
        m[j] = -INFINITY;
        l[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++)
            acc[j][i] = 0.0f;
    }
    const int pg0 = p.n_splits > 1 ? split * p.pages_per_split : 0;
    const int pg1 = p.n_splits > 1 ? min(sq.n_pages, pg0 + p.pages_per_split) : sq.n_pages;
    for (int pi = pg0; pi < pg1; pi++) {
        const kern_kvq_page pg = sq.pages[pi];
        const int bs = pg.block_size > 0 ? pg.block_size : p.block_size;
        if (pg.fmt < 0 || pg.fmt >= KERN_KVQ_N_FMT || bs > KERN_KVQ_MAX_BLOCK_SIZE ||
            pg.block_size < 0 || pg.n <= 0 || pg.n > bs || !pg.k || !pg.v ||
            (fmt_zip(pg.fmt) && !pg.stats))
            continue; /* malformed (or empty): never read */
        const bool ordered = pg.pos0 != KERN_KVQ_UNORDERED;
        for (int c0 = 0; c0 < pg.n; c0 += TK) {
            if (ordered && pg.pos0 + c0 > maxpos)
                break; /* later slots are later positions */
            const int cn = min(TK, pg.n - c0);
            __syncthreads(); /* the previous chunk (and, first time, Qs) is done with */
            /* Eight values per thread (head_dim is a multiple of 8). */
            const int hd8 = hd / 8;
            for (int x = threadIdx.x; x < TK * hd8; x += blockDim.x) {
                const int j = x / hd8, e0 = (x % hd8) * 8;
                float kx[8], vx[8];
                if (j < cn) {
                    kvq_values8(kx, (const uint8_t *)pg.k, KERN_KVQ_K, pg.fmt, p.nkv, hd, bs, kvh,
                                c0 + j, e0, pg.stats);
                    kvq_values8(vx, (const uint8_t *)pg.v, KERN_KVQ_V, pg.fmt, p.nkv, hd, bs, kvh,
                                c0 + j, e0, pg.stats);
                } else {
#pragma unroll
                    for (int i = 0; i < 8; i++)
                        kx[i] = vx[i] = 0.0f;
                }
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    Ks[j * ks + e0 + i] = kx[i];
                    Vs[j * hd + e0 + i] = vx[i];
                }
            }
            if (threadIdx.x < TK)
                kpos[threadIdx.x] = ordered ? pg.pos0 + c0 + (int)threadIdx.x : -1;
            __syncthreads();
#pragma unroll
            for (int j = 0; j < QPW; j++) {
                const int vi = warp + WARPS * j;
                if (vi >= n_vec)
                    break;
                const bool vis = lane < cn && kpos[lane] <= vpos[j];
                if (!__any_sync(0xffffffffu, vis))
                    continue;
                softmax_step<DPL>(m[j], l[j], acc[j], Qs + vi * hd, Ks, ks, Vs, hd, cn, vis,
                                  p.scale, lane);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < QPW; j++) {
        const int vi = warp + WARPS * j;
        if (vi >= n_vec)
            break;
        if (p.n_splits > 1) {
            float *pp = p.part + (((size_t)s * p.nkv + kvh) * NV_MAX + vi) * p.n_splits * (hd + 2) +
                        (size_t)split * (hd + 2);
            if (lane == 0) {
                pp[0] = m[j];
                pp[1] = l[j];
            }
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + 32 * i;
                if (d < hd)
                    pp[2 + d] = acc[j][i];
            }
            continue;
        }
        const int row = r0 + vi / group, h = kvh * group + vi % group;
        float *o = sq.out + (size_t)row * q_row + (size_t)h * hd;
        const float lv = l[j];
        const float inv = lv > 0.0f ? 1.0f / lv : 0.0f; /* no visible key: zeros */
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < hd)
                o[d] = lv != lv ? NAN : acc[j][i] * inv;
        }
        if (sq.lse && lane == 0)
            sq.lse[(size_t)row * p.n_heads + h] = lv > 0.0f    ? m[j] + logf(lv)
                                                  : lv == 0.0f ? -INFINITY
                                                               : NAN;
    }
}

/* Merges the page splits of one query vector and writes its output and lse. */
__global__ void kvq_combine_kernel(const kvq_attn_params p)
{
    const int vi = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    const kvq_seq_d sq = p.seqs[s];
    const int hd = p.hd, group = p.group;
    if (vi >= min(sq.n_q, p.rows_per_tile) * group)
        return;
    const float *pp = p.part + (((size_t)s * p.nkv + kvh) * NV_MAX + vi) * p.n_splits * (hd + 2);
    float mx = -INFINITY;
    for (int k = 0; k < p.n_splits; k++)
        mx = fmaxf(mx, pp[(size_t)k * (hd + 2)]);
    const float m_use = mx == -INFINITY ? 0.0f : mx;
    float sum = 0.0f;
    for (int k = 0; k < p.n_splits; k++) {
        const float *q = pp + (size_t)k * (hd + 2);
        if (q[1] != 0.0f) /* a split that saw nothing adds nothing; NaN shows */
            sum += q[1] * expf(q[0] - m_use);
    }
    const int row = vi / group, h = kvh * group + vi % group;
    float *o = sq.out + (size_t)row * p.n_heads * hd + (size_t)h * hd;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int k = 0; k < p.n_splits; k++) {
            const float *q = pp + (size_t)k * (hd + 2);
            if (q[1] != 0.0f)
                a += q[2 + d] * expf(q[0] - m_use);
        }
        o[d] = sum != sum ? NAN : a * inv;
    }
    if (sq.lse && threadIdx.x == 0)
        sq.lse[(size_t)row * p.n_heads + h] = sum > 0.0f    ? mx + logf(sum)
                                              : sum == 0.0f ? -INFINITY
                                                            : NAN;
}

typedef void (*kvq_attn_fn)(const kvq_attn_params);

static kvq_attn_fn kvq_pick(int hd)
{
    if (hd <= 32)
        return kvq_attn_kernel<1>;
    if (hd <= 64)
        return kvq_attn_kernel<2>;
    if (hd <= 128)
        return kvq_attn_kernel<4>;
    return kvq_attn_kernel<8>;
}

extern "C" int kern_cuda_attention_decode_quant(const kern_kvq_attn_args *a)
{
    static const char what[] = "attention_decode_quant";
    kc_ctx *c;
    int rc = kc_need_ctx(&c, what);
    if (rc)
        return rc;
    if (!a)
        return kc_fail(KERN_CUDA_E_ARG, "%s: arguments are NULL", what);
    rc = check_geom(what, &a->g);
    if (rc)
        return rc;
    const int nkv = a->g.n_kv_heads, hd = a->g.head_dim;
    if (a->n_heads < nkv || a->n_heads % nkv != 0 || a->n_heads / nkv > KERN_ATTN_MAX_GROUP)
        return kc_fail(KERN_CUDA_E_ARG,
                       "%s: n_heads %d is not a multiple (at most %d times) of n_kv_heads %d", what,
                       a->n_heads, KERN_ATTN_MAX_GROUP, nkv);
    if (a->n_seqs < 0 || (a->n_seqs > 0 && !a->seqs))
        return kc_fail(KERN_CUDA_E_ARG, "%s: n_seqs %d with seqs %p", what, a->n_seqs,
                       (const void *)a->seqs);
    int max_q = 0, max_pages = 0, max_ctx = 0;
    for (int i = 0; i < a->n_seqs; i++) {
        const kern_kvq_seq *s = &a->seqs[i];
        if (s->n_q < 0 || s->ctx_len < 0 || s->n_pages < 0)
            return kc_fail(KERN_CUDA_E_ARG,
                           "%s: sequence %d: negative n_q %d, ctx_len %d or n_pages %d", what, i,
                           s->n_q, s->ctx_len, s->n_pages);
        if (s->n_q > 0 && (!s->q || !s->out))
            return kc_fail(KERN_CUDA_E_ARG, "%s: sequence %d: q or out is NULL", what, i);
        if (s->n_pages > 0 && !s->pages)
            return kc_fail(KERN_CUDA_E_ARG, "%s: sequence %d: pages is NULL", what, i);
        if (!s->q_pos && s->n_q > s->ctx_len)
            return kc_fail(KERN_CUDA_E_ARG, "%s: sequence %d: n_q %d exceeds ctx_len %d", what, i,
                           s->n_q, s->ctx_len);
        max_q = s->n_q > max_q ? s->n_q : max_q;
        max_pages = s->n_pages > max_pages ? s->n_pages : max_pages;
        max_ctx = s->ctx_len > max_ctx ? s->ctx_len : max_ctx;
    }
    if (max_q == 0)
        return 0;
    const size_t smem = attn_smem_bytes(hd);
    const kvq_attn_fn fn = kvq_pick(hd);
    rc = allow_smem(c, fn, smem, what);
    if (rc)
        return rc;
    kvq_attn_params p;
    memset(&p, 0, sizeof(p));
    p.n_heads = a->n_heads;
    p.nkv = nkv;
    p.hd = hd;
    p.block_size = a->g.block_size;
    p.group = a->n_heads / nkv;
    p.rows_per_tile = NV_MAX / p.group;
    p.scale = 1.0f / sqrtf((float)hd);
    const int n_tiles = (max_q + p.rows_per_tile - 1) / p.rows_per_tile;
    /* Split the pages when one tile per sequence leaves the device underused. */
    p.n_splits = 1;
    const int launch_seqs = a->n_seqs < SEQS_PER_LAUNCH ? a->n_seqs : SEQS_PER_LAUNCH;
    const long blocks = (long)n_tiles * nkv * launch_seqs;
    if (n_tiles == 1 && max_pages >= 2 && max_ctx >= 2 * SPLIT_MIN_KEYS && blocks < 4L * c->n_sm) {
        long want = (4L * c->n_sm + blocks - 1) / blocks;
        want = want > max_pages ? max_pages : want;
        want = want > max_ctx / SPLIT_MIN_KEYS ? max_ctx / SPLIT_MIN_KEYS : want;
        want = want > MAX_SPLITS ? MAX_SPLITS : want;
        const size_t per_split =
            (size_t)launch_seqs * nkv * NV_MAX * (size_t)(hd + 2) * sizeof(float);
        if ((size_t)want * per_split > c->ws_bytes)
            want = (long)(c->ws_bytes / per_split);
        if (want > 1) {
            p.pages_per_split = (int)((max_pages + want - 1) / want);
            p.n_splits = (max_pages + p.pages_per_split - 1) / p.pages_per_split;
            p.part = (float *)c->ws;
        }
    }
    for (int first = 0; first < a->n_seqs; first += SEQS_PER_LAUNCH) {
        p.n_seqs = a->n_seqs - first < SEQS_PER_LAUNCH ? a->n_seqs - first : SEQS_PER_LAUNCH;
        for (int i = 0; i < p.n_seqs; i++) {
            const kern_kvq_seq *s = &a->seqs[first + i];
            p.seqs[i] =
                kvq_seq_d{s->q, s->out, s->lse, s->q_pos, s->pages, s->n_pages, s->n_q, s->ctx_len};
        }
        const dim3 grid((unsigned)(p.n_splits > 1 ? p.n_splits : n_tiles), (unsigned)nkv,
                        (unsigned)p.n_seqs);
        fn<<<grid, WARPS * 32, smem, kc_stream(c)>>>(p);
        rc = kc_launched("attention_decode_quant launch");
        if (rc)
            return rc;
        if (p.n_splits > 1) {
            kvq_combine_kernel<<<dim3(NV_MAX, (unsigned)nkv, (unsigned)p.n_seqs), 128, 0,
                                 kc_stream(c)>>>(p);
            rc = kc_launched("attention_decode_quant split merge launch");
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* ---- block-sparse causal prefill ---- */

struct bs_params {
    const float *q, *k, *v;
    float *out;
    const int32_t *blocks; /* page table, or NULL */
    int page_size;
    int n_q, ctx, n_heads, nkv, hd, kv_stride, group, rows_per_tile;
    float scale;
    const uint64_t *bits;
    int B, n_lists, q_block0, n_qblocks, words, tiles_per_qblock;
};

__device__ __forceinline__ size_t bs_kv_row(const bs_params &p, int key)
{
    return p.blocks
               ? (size_t)p.blocks[key / p.page_size] * p.page_size + (size_t)(key % p.page_size)
               : (size_t)key;
}

/* Mask row of query head h for query block index qi (0-based from q_block0). */
__device__ __forceinline__ const uint64_t *bs_row(const bs_params &p, int h, int qi)
{
    const int list = h / (p.n_heads / p.n_lists);
    return p.bits + ((size_t)list * p.n_qblocks + qi) * p.words;
}

template <int DPL, bool VEC>
__global__ void __launch_bounds__(WARPS * 32) block_sparse_kernel(const bs_params p)
{
    extern __shared__ float smem[];
    const int hd = p.hd, ks = hd + 1;
    float *Vs = smem;
    float *Qs = Vs + TK * hd;
    float *Ks = Qs + NV_MAX * hd;
    const int kvh = blockIdx.y;
    /* Last query blocks first: they have the most keys. */
    const int qi = p.n_qblocks - 1 - (int)blockIdx.x / p.tiles_per_qblock;
    const int sub = (int)blockIdx.x % p.tiles_per_qblock;
    const int r = p.q_block0 + qi, q_first = p.ctx - p.n_q;
    const int lo = max(r * p.B, q_first), hi = min((r + 1) * p.B, p.ctx);
    const int p0 = lo + sub * p.rows_per_tile;
    if (p0 >= hi)
        return;
    const int p1 = min(p0 + p.rows_per_tile, hi), pmax = p1 - 1;
    const int group = p.group, n_vec = (p1 - p0) * group;
    const size_t q_row = (size_t)p.n_heads * hd;
    for (int x = threadIdx.x; x < n_vec * hd; x += blockDim.x) {
        const int vi = x / hd, e = x % hd;
        Qs[x] = p.q[(size_t)(p0 - q_first + vi / group) * q_row +
                    (size_t)(kvh * group + vi % group) * hd + e];
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float m[QPW], l[QPW], acc[QPW][DPL];
    const uint64_t *mrow[QPW];
#pragma unroll
    for (int j = 0; j < QPW; j++) {
        const int vi = warp + WARPS * j;
        mrow[j] = bs_row(p, kvh * group + (vi < n_vec ? vi % group : 0), qi);
        m[j] = -INFINITY;
        l[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++)
            acc[j][i] = 0.0f;
    }
    const size_t head_off = (size_t)kvh * hd;
    for (int w = 0; w <= r / 64; w++) {
        uint64_t any = 0;
        for (int g = 0; g < group; g++)
            any |= bs_row(p, kvh * group + g, qi)[w];
        if (w == r / 64 && r % 64 != 63)
            any &= ((uint64_t)2 << (r % 64)) - 1; /* nothing above the diagonal */
        while (any) {
            const int cb = 64 * w + __ffsll((long long)any) - 1;
            any &= any - 1;
            const int kend = min((cb + 1) * p.B, pmax + 1);
            for (int k0 = cb * p.B; k0 < kend; k0 += TK) {
                const int cn = min(TK, kend - k0);
                __syncthreads();
                if (VEC) {
                    const int hd4 = hd / 4;
                    for (int x = threadIdx.x; x < TK * hd4; x += blockDim.x) {
                        const int j = x / hd4, d = (x % hd4) * 4;
                        float4 k4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), v4 = k4;
                        if (j < cn) {
                            const size_t off = bs_kv_row(p, k0 + j) * p.kv_stride + head_off + d;
                            k4 = __ldg((const float4 *)(p.k + off));
                            v4 = __ldg((const float4 *)(p.v + off));
                        }
                        *(float4 *)(Vs + j * hd + d) = v4;
                        float *kd = Ks + j * ks + d;
                        kd[0] = k4.x;
                        kd[1] = k4.y;
                        kd[2] = k4.z;
                        kd[3] = k4.w;
                    }
                } else {
                    for (int x = threadIdx.x; x < TK * hd; x += blockDim.x) {
                        const int j = x / hd, d = x % hd;
                        float kx = 0.0f, vx = 0.0f;
                        if (j < cn) {
                            const size_t off = bs_kv_row(p, k0 + j) * p.kv_stride + head_off + d;
                            kx = p.k[off];
                            vx = p.v[off];
                        }
                        Vs[j * hd + d] = vx;
                        Ks[j * ks + d] = kx;
                    }
                }
                __syncthreads();
#pragma unroll
                for (int j = 0; j < QPW; j++) {
                    const int vi = warp + WARPS * j;
                    if (vi >= n_vec)
                        break;
                    if (!((mrow[j][w] >> (cb % 64)) & 1u))
                        continue; /* this head's list skips the block */
                    const int pos = p0 + vi / group;
                    if (pos < k0)
                        continue;
                    const bool vis = lane < cn && k0 + lane <= pos;
                    softmax_step<DPL>(m[j], l[j], acc[j], Qs + vi * hd, Ks, ks, Vs, hd, cn, vis,
                                      p.scale, lane);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < QPW; j++) {
        const int vi = warp + WARPS * j;
        if (vi >= n_vec)
            break;
        const int row = p0 - q_first + vi / group, h = kvh * group + vi % group;
        float *o = p.out + (size_t)row * q_row + (size_t)h * hd;
        const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < hd)
                o[d] = acc[j][i] * inv;
        }
    }
}

typedef void (*bs_fn)(const bs_params);

static bs_fn bs_pick(int hd, bool vec)
{
    if (hd <= 32)
        return vec ? block_sparse_kernel<1, true> : block_sparse_kernel<1, false>;
    if (hd <= 64)
        return vec ? block_sparse_kernel<2, true> : block_sparse_kernel<2, false>;
    if (hd <= 128)
        return vec ? block_sparse_kernel<4, true> : block_sparse_kernel<4, false>;
    return vec ? block_sparse_kernel<8, true> : block_sparse_kernel<8, false>;
}

extern "C" int kern_cuda_attention_block_sparse_f32(const kern_attn_args *a,
                                                    const kern_block_mask *m)
{
    static const char what[] = "attention_block_sparse";
    kc_ctx *c;
    int rc = kc_need_ctx(&c, what);
    if (rc)
        return rc;
    if (!a || !m)
        return kc_fail(KERN_CUDA_E_ARG, "%s: args or mask is NULL", what);
    if (!a->q || !a->k || !a->v || !a->out || !m->bits)
        return kc_fail(KERN_CUDA_E_ARG, "%s: NULL q, k, v, out or mask bits", what);
    const int hd = a->head_dim;
    if (hd <= 0 || hd > KERN_ATTN_MAX_HEAD_DIM)
        return kc_fail(KERN_CUDA_E_ARG, "%s: head_dim %d is not in 1..%d", what, hd,
                       KERN_ATTN_MAX_HEAD_DIM);
    if (a->n_kv_heads <= 0 || a->n_heads <= 0 || a->n_heads % a->n_kv_heads != 0 ||
        a->n_heads / a->n_kv_heads > KERN_ATTN_MAX_GROUP)
        return kc_fail(KERN_CUDA_E_ARG,
                       "%s: n_heads %d is not a multiple (at most %d times) of n_kv_heads %d", what,
                       a->n_heads, KERN_ATTN_MAX_GROUP, a->n_kv_heads);
    if ((long)a->n_kv_heads * hd > a->kv_stride)
        return kc_fail(KERN_CUDA_E_ARG, "%s: kv_stride %d < n_kv_heads * head_dim", what,
                       a->kv_stride);
    if (a->n_q < 1 || a->ctx_len < a->n_q)
        return kc_fail(KERN_CUDA_E_ARG, "%s: n_q %d, ctx_len %d", what, a->n_q, a->ctx_len);
    if (a->blocks && a->block_size < 1)
        return kc_fail(KERN_CUDA_E_ARG, "%s: page block_size %d", what, a->block_size);
    /* The mask's shape (its bits are device data: not checked, see the file comment). */
    if (m->block_size < 1 || m->n_lists < 1 || a->n_heads % m->n_lists != 0)
        return kc_fail(KERN_CUDA_E_ARG, "%s: mask block_size %d or n_lists %d (n_heads %d)", what,
                       m->block_size, m->n_lists, a->n_heads);
    const int B = m->block_size;
    const int nb = (int)(((long)a->ctx_len + B - 1) / B);
    if (m->ctx_len != a->ctx_len || m->n_q != a->n_q || m->q_block0 != (a->ctx_len - a->n_q) / B ||
        m->n_qblocks != nb - m->q_block0 || m->words != (nb + 63) / 64)
        return kc_fail(KERN_CUDA_E_ARG, "%s: the mask does not describe ctx_len %d, n_q %d", what,
                       a->ctx_len, a->n_q);
    bs_params p;
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.out = a->out;
    p.blocks = a->blocks;
    p.page_size = a->block_size;
    p.n_q = a->n_q;
    p.ctx = a->ctx_len;
    p.n_heads = a->n_heads;
    p.nkv = a->n_kv_heads;
    p.hd = hd;
    p.kv_stride = a->kv_stride;
    p.group = a->n_heads / a->n_kv_heads;
    p.rows_per_tile = NV_MAX / p.group;
    p.scale = 1.0f / sqrtf((float)hd);
    p.bits = m->bits;
    p.B = B;
    p.n_lists = m->n_lists;
    p.q_block0 = m->q_block0;
    p.n_qblocks = m->n_qblocks;
    p.words = m->words;
    p.tiles_per_qblock = (B + p.rows_per_tile - 1) / p.rows_per_tile;
    const long n_blocks = (long)p.n_qblocks * p.tiles_per_qblock;
    if (n_blocks > INT_MAX)
        return kc_fail(KERN_CUDA_E_ARG, "%s: %ld row tiles are too many", what, n_blocks);
    const bool vec = hd % 4 == 0 && a->kv_stride % 4 == 0 && ((uintptr_t)a->k & 15u) == 0 &&
                     ((uintptr_t)a->v & 15u) == 0;
    const size_t smem = attn_smem_bytes(hd);
    const bs_fn fn = bs_pick(hd, vec);
    rc = allow_smem(c, fn, smem, what);
    if (rc)
        return rc;
    fn<<<dim3((unsigned)n_blocks, (unsigned)p.nkv), WARPS * 32, smem, kc_stream(c)>>>(p);
    return kc_launched("attention_block_sparse launch");
}
