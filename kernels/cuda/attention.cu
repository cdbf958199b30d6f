/*
 * attention.cu - causal attention over paged KV on the GPU, the twin of
 * kern_attention_f32 (kernels/cpu/attention.c), for one sequence or a
 * variable-length batch of decode rows and prefill chunks in one launch.
 *
 * One thread block per (query tile, kv head, sequence). A tile is up to
 * NV_MAX query vectors: rows_per_tile consecutive rows times the group of
 * query heads that read this kv head (GQA), so each K/V row is brought into
 * shared memory once for the whole group. The block walks the keys in chunks
 * of TK = 32 (FlashAttention style): the chunk's K and V go to shared memory,
 * then each warp takes up to QPW of the tile's vectors; lane j scores key
 * c0 + j against a vector (the query read from shared memory as a
 * broadcast), the warp takes the chunk's max and sum with shuffles, rescales
 * its running output (online softmax) and adds p_j * V_j, each lane owning the
 * head dims lane, lane + 32, ... So no score matrix is materialized and memory
 * use does not depend on the context length. Chunks past the tile's last row
 * position are never loaded (causal skipping); a vector ignores keys past its
 * own position.
 *
 * Key splitting (flash-decoding): when a launch has too few blocks to fill
 * the device (decode of one or a few sequences over long contexts) and every
 * sequence fits one query tile, the keys are also split into n_splits ranges,
 * one block each; blocks write their unnormalized partial output with its
 * running max and sum into the workspace, and a second kernel merges the
 * splits. Without enough workspace the launch simply does not split.
 *
 * Shared memory per block: V chunk [TK][hd], queries [NV_MAX][hd], K chunk
 * [TK][hd + 1] (the odd row stride puts the 32 lanes' keys in 32 banks): 82 KB
 * at head_dim 256, so the limit is raised at context creation.
 */
#include "kernels/cuda/common.cuh"

#include <limits.h>
#include <math.h>

#define TK 32 /* keys per chunk: one per lane */
#define WARPS 4
#define QPW 4 /* query vectors per warp */
#define NV_MAX (WARPS * QPW)
#define SPLIT_MIN_KEYS 256 /* keys per split at least */
#define MAX_SPLITS 64

struct attn_params {
    const float *q, *k, *v;
    float *out;
    const int32_t *q_start, *ctx_len, *blocks; /* q_start NULL: one sequence (n_q, ctx) */
    int blocks_stride, block_size;
    int n_q, ctx;
    int n_heads, n_kv_heads, head_dim, kv_stride, group, rows_per_tile;
    float scale;
    /* n_splits > 1: block x = split, keys [split * split_len, + split_len),
     * partials to part[((s * n_kv_heads + kvh) * NV_MAX + vector) * n_splits
     * + split] as (hd + 2) floats: max, sum, unnormalized output. */
    int n_splits, split_len;
    float *part;
};

static size_t smem_bytes(int hd)
{
    return sizeof(float) * ((size_t)TK * hd + (size_t)NV_MAX * hd + (size_t)TK * (hd + 1));
}

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

/* DPL: head dims per lane (head_dim <= 32 * DPL). VEC: 16-byte K/V loads
 * (head_dim and kv_stride multiples of 4, k and v 16-byte aligned). */
template <int DPL, bool VEC>
__global__ void __launch_bounds__(WARPS * 32) attention_kernel(const attn_params p)
{
    extern __shared__ float smem[];
    const int hd = p.head_dim;
    float *Vs = smem;             /* [TK][hd] */
    float *Qs = Vs + TK * hd;     /* [NV_MAX][hd] */
    float *Ks = Qs + NV_MAX * hd; /* [TK][hd + 1] */
    const int ks = hd + 1;

    const int s = blockIdx.z, kvh = blockIdx.y;
    const int tile = p.n_splits > 1 ? 0 : blockIdx.x, split = p.n_splits > 1 ? blockIdx.x : 0;
    int qs = 0, nq = p.n_q, ctx = p.ctx;
    const int32_t *bt = p.blocks;
    if (p.q_start) {
        qs = p.q_start[s];
        nq = p.q_start[s + 1] - qs;
        ctx = p.ctx_len[s];
        if (bt)
            bt += (size_t)s * p.blocks_stride;
    }
    const int r0 = tile * p.rows_per_tile;
    if (r0 >= nq)
        return;
    const int r1 = min(r0 + p.rows_per_tile, nq);
    const int group = p.group;
    const int n_vec = (r1 - r0) * group;
    const size_t q_row = (size_t)p.n_heads * hd;

    for (int i = threadIdx.x; i < n_vec * hd; i += blockDim.x) {
        const int vi = i / hd, d = i % hd;
        const int row = r0 + vi / group, h = kvh * group + vi % group;
        Qs[i] = p.q[(size_t)(qs + row) * q_row + (size_t)h * hd + d];
    }

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float m[QPW], l[QPW], acc[QPW][DPL];
#pragma unroll
    for (int j = 0; j < QPW; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++)
            acc[j][i] = 0.0f;
    }

    /* Keys [k_lo, k_hi): the split's range, cut at the last key any row of the
     * tile sees. */
    const int k_lo = split * p.split_len;
    const int k_hi = min(ctx - nq + r1, p.n_splits > 1 ? k_lo + p.split_len : INT_MAX);
    const size_t head_off = (size_t)kvh * hd;
    for (int c0 = k_lo; c0 < k_hi; c0 += TK) {
        __syncthreads(); /* the previous chunk (and, first time, Qs) is done with */
        if (VEC) {
            const int hd4 = hd / 4;
            for (int i = threadIdx.x; i < TK * hd4; i += blockDim.x) {
                const int j = i / hd4, d = (i % hd4) * 4;
                const int key = c0 + j;
                float4 kv4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv4 = kv4;
                if (key < k_hi) {
                    const size_t row = bt ? (size_t)bt[key / p.block_size] * p.block_size +
                                                (size_t)(key % p.block_size)
                                          : (size_t)key;
                    const size_t off = row * p.kv_stride + head_off + d;
                    kv4 = __ldg((const float4 *)(p.k + off));
                    vv4 = __ldg((const float4 *)(p.v + off));
                }
                *(float4 *)(Vs + j * hd + d) = vv4;
                float *kd = Ks + j * ks + d;
                kd[0] = kv4.x;
                kd[1] = kv4.y;
                kd[2] = kv4.z;
                kd[3] = kv4.w;
            }
        } else {
            for (int i = threadIdx.x; i < TK * hd; i += blockDim.x) {
                const int j = i / hd, d = i % hd;
                const int key = c0 + j;
                float kx = 0.0f, vx = 0.0f;
                if (key < k_hi) {
                    const size_t row = bt ? (size_t)bt[key / p.block_size] * p.block_size +
                                                (size_t)(key % p.block_size)
                                          : (size_t)key;
                    const size_t off = row * p.kv_stride + head_off + d;
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
            const int last = min(ctx - nq + r0 + vi / group, k_hi - 1); /* its last key here */
            if (last < c0)
                continue; /* this vector's keys all came before the chunk */
            const int key = c0 + lane;
            float sc = -INFINITY;
            if (key <= last) {
                const float *qv = Qs + vi * hd;
                const float *kr = Ks + lane * ks;
                float d0 = 0.0f;
                for (int d = 0; d < hd; d++)
                    d0 = fmaf(qv[d], kr[d], d0);
                sc = d0 * p.scale;
            }
            const float m_new = fmaxf(m[j], warp_max(sc));
            const float corr = expf(m[j] - m_new); /* 0 on the first chunk */
            const float pj = key <= last ? expf(sc - m_new) : 0.0f;
            l[j] = l[j] * corr + warp_sum(pj);
#pragma unroll
            for (int i = 0; i < DPL; i++)
                acc[j][i] *= corr;
            const int n_keys = min(TK, last - c0 + 1);
            for (int jj = 0; jj < n_keys; jj++) {
                const float pb = __shfl_sync(0xffffffffu, pj, jj);
                const float *vr = Vs + jj * hd;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + 32 * i;
                    if (d < hd)
                        acc[j][i] = fmaf(pb, vr[d], acc[j][i]);
                }
            }
            m[j] = m_new;
        }
    }

#pragma unroll
    for (int j = 0; j < QPW; j++) {
        const int vi = warp + WARPS * j;
        if (vi >= n_vec)
            break;
        if (p.n_splits > 1) {
            float *pp = p.part +
                        (((size_t)s * p.n_kv_heads + kvh) * NV_MAX + vi) * p.n_splits * (hd + 2) +
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
        float *o = p.out + (size_t)(qs + row) * q_row + (size_t)h * hd;
        const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f; /* a row with no keys: zeros */
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < hd)
                o[d] = acc[j][i] * inv;
        }
    }
}

/* Merges the splits of one query vector: block (vector, kv head, sequence),
 * threads over the head dims. */
__global__ void combine_kernel(const attn_params p)
{
    const int vi = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    int qs = 0, nq = p.n_q;
    if (p.q_start) {
        qs = p.q_start[s];
        nq = p.q_start[s + 1] - qs;
    }
    const int hd = p.head_dim, group = p.group;
    if (nq <= 0 || vi >= min(nq, p.rows_per_tile) * group)
        return;
    const float *pp =
        p.part + (((size_t)s * p.n_kv_heads + kvh) * NV_MAX + vi) * p.n_splits * (hd + 2);
    float mx = -INFINITY;
    for (int k = 0; k < p.n_splits; k++)
        mx = fmaxf(mx, pp[(size_t)k * (hd + 2)]);
    float sum = 0.0f;
    for (int k = 0; k < p.n_splits; k++) {
        const float *q = pp + (size_t)k * (hd + 2);
        if (q[1] > 0.0f)
            sum += q[1] * expf(q[0] - mx);
    }
    const int row = vi / group, h = kvh * group + vi % group;
    float *o = p.out + (size_t)(qs + row) * p.n_heads * hd + (size_t)h * hd;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < p.n_splits; k++) {
            const float *q = pp + (size_t)k * (hd + 2);
            if (q[1] > 0.0f)
                acc += q[2 + d] * expf(q[0] - mx);
        }
        o[d] = acc * inv;
    }
}

typedef void (*attn_fn)(const attn_params);

static attn_fn pick(int hd, bool vec)
{
    if (hd <= 32)
        return vec ? attention_kernel<1, true> : attention_kernel<1, false>;
    if (hd <= 64)
        return vec ? attention_kernel<2, true> : attention_kernel<2, false>;
    if (hd <= 128)
        return vec ? attention_kernel<4, true> : attention_kernel<4, false>;
    return vec ? attention_kernel<8, true> : attention_kernel<8, false>;
}

cudaError_t kc_attention_setup(int device)
{
    int optin = 0;
    cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    static const int dims[4] = {32, 64, 128, KERN_ATTN_MAX_HEAD_DIM};
    for (int i = 0; i < 4 && e == cudaSuccess; i++) {
        size_t want = smem_bytes(dims[i]);
        if (want > (size_t)optin)
            want = (size_t)optin; /* larger head dims are refused at launch on this device */
        for (int v = 0; v < 2 && e == cudaSuccess; v++)
            e = cudaFuncSetAttribute(pick(dims[i], v != 0),
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)want);
    }
    return e;
}

static int check_shape(const char *what, int n_heads, int n_kv_heads, int hd, int kv_stride,
                       const void *q, const void *k, const void *v, const void *out)
{
    if (!q || !k || !v || !out)
        return kc_fail(KERN_CUDA_E_ARG, "%s: NULL q, k, v or out", what);
    if (hd <= 0 || hd > KERN_ATTN_MAX_HEAD_DIM)
        return kc_fail(KERN_CUDA_E_ARG, "%s: head_dim %d is not in 1..%d", what, hd,
                       KERN_ATTN_MAX_HEAD_DIM);
    if (n_kv_heads <= 0 || n_heads <= 0 || n_heads % n_kv_heads != 0 ||
        n_heads / n_kv_heads > KERN_ATTN_MAX_GROUP)
        return kc_fail(KERN_CUDA_E_ARG,
                       "%s: n_heads %d is not a multiple (at most %d times) of n_kv_heads %d", what,
                       n_heads, KERN_ATTN_MAX_GROUP, n_kv_heads);
    if (kv_stride < n_kv_heads * hd)
        return kc_fail(KERN_CUDA_E_ARG, "%s: kv_stride %d < n_kv_heads * head_dim %d", what,
                       kv_stride, n_kv_heads * hd);
    return 0;
}

/* Key splits for a launch of `blocks` blocks over up to max_ctx keys (0:
 * unknown), or 1. Splitting needs one tile per sequence and the workspace. */
static int choose_splits(const kc_ctx *c, const attn_params *p, int n_tiles, int n_seqs,
                         int max_ctx)
{
    const long blocks = (long)n_tiles * p->n_kv_heads * n_seqs;
    if (n_tiles != 1 || max_ctx < 2 * SPLIT_MIN_KEYS || blocks >= c->n_sm)
        return 1;
    long want = (2L * c->n_sm + blocks - 1) / blocks;
    const long by_keys = max_ctx / SPLIT_MIN_KEYS;
    if (want > by_keys)
        want = by_keys;
    if (want > MAX_SPLITS)
        want = MAX_SPLITS;
    const size_t per_split =
        (size_t)n_seqs * p->n_kv_heads * NV_MAX * (size_t)(p->head_dim + 2) * sizeof(float);
    if (want * per_split > c->ws_bytes)
        want = (long)(c->ws_bytes / per_split);
    return want > 1 ? (int)want : 1;
}

static int launch(kc_ctx *c, attn_params p, int max_q, int n_seqs, int max_ctx, const char *what)
{
    const int hd = p.head_dim;
    p.group = p.n_heads / p.n_kv_heads;
    p.rows_per_tile = NV_MAX / p.group;
    p.scale = 1.0f / sqrtf((float)hd);
    const size_t smem = smem_bytes(hd);
    if (smem > c->smem_optin)
        return kc_fail(KERN_CUDA_E_ARG,
                       "%s: head_dim %d needs %zu bytes of shared memory, the device allows %zu",
                       what, hd, smem, c->smem_optin);
    const bool vec = hd % 4 == 0 && p.kv_stride % 4 == 0 && ((uintptr_t)p.k & 15u) == 0 &&
                     ((uintptr_t)p.v & 15u) == 0;
    const int n_tiles = (max_q + p.rows_per_tile - 1) / p.rows_per_tile;
    p.n_splits = choose_splits(c, &p, n_tiles, n_seqs, max_ctx);
    p.split_len = 0;
    if (p.n_splits > 1) {
        const int len = (max_ctx + p.n_splits - 1) / p.n_splits;
        p.split_len = (len + TK - 1) / TK * TK;
        p.n_splits = (max_ctx + p.split_len - 1) / p.split_len;
        p.part = (float *)c->ws;
    }
    const dim3 grid((unsigned)(p.n_splits > 1 ? p.n_splits : n_tiles), (unsigned)p.n_kv_heads,
                    (unsigned)n_seqs);
    pick(hd, vec)<<<grid, WARPS * 32, smem, kc_stream(c)>>>(p);
    int rc = kc_launched(what);
    if (rc || p.n_splits <= 1)
        return rc;
    combine_kernel<<<dim3(NV_MAX, (unsigned)p.n_kv_heads, (unsigned)n_seqs), 128, 0,
                     kc_stream(c)>>>(p);
    return kc_launched("attention split merge launch");
}

extern "C" int kern_cuda_attention_f32(const kern_attn_args *a)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "attention");
    if (rc)
        return rc;
    if (!a)
        return kc_fail(KERN_CUDA_E_ARG, "attention: args is NULL");
    if (a->n_q <= 0)
        return 0;
    rc = check_shape("attention", a->n_heads, a->n_kv_heads, a->head_dim, a->kv_stride, a->q, a->k,
                     a->v, a->out);
    if (rc)
        return rc;
    if (a->ctx_len < a->n_q)
        return kc_fail(KERN_CUDA_E_ARG, "attention: ctx_len %d < n_q %d", a->ctx_len, a->n_q);
    if (a->blocks && a->block_size <= 0)
        return kc_fail(KERN_CUDA_E_ARG, "attention: block_size %d", a->block_size);
    attn_params p = {};
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.out = a->out;
    p.blocks = a->blocks;
    p.block_size = a->block_size;
    p.n_q = a->n_q;
    p.ctx = a->ctx_len;
    p.n_heads = a->n_heads;
    p.n_kv_heads = a->n_kv_heads;
    p.head_dim = a->head_dim;
    p.kv_stride = a->kv_stride;
    return launch(c, p, a->n_q, 1, a->ctx_len, "attention launch");
}

extern "C" int kern_cuda_attention_varlen_f32(const kern_cuda_attn_varlen *a)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "attention_varlen");
    if (rc)
        return rc;
    if (!a)
        return kc_fail(KERN_CUDA_E_ARG, "attention_varlen: args is NULL");
    if (a->n_seqs == 0 || a->max_q == 0)
        return 0;
    rc = check_shape("attention_varlen", a->n_heads, a->n_kv_heads, a->head_dim, a->kv_stride, a->q,
                     a->k, a->v, a->out);
    if (rc)
        return rc;
    if (a->n_seqs < 0 || a->n_seqs > 65535 || a->max_q < 0 || !a->q_start || !a->ctx_len)
        return kc_fail(KERN_CUDA_E_ARG,
                       "attention_varlen: n_seqs %d (at most 65535), max_q %d, or NULL q_start"
                       " / ctx_len",
                       a->n_seqs, a->max_q);
    if (a->blocks && (a->block_size <= 0 || a->blocks_stride < 0))
        return kc_fail(KERN_CUDA_E_ARG, "attention_varlen: block_size %d, blocks_stride %d",
                       a->block_size, a->blocks_stride);
    attn_params p = {};
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.out = a->out;
    p.q_start = a->q_start;
    p.ctx_len = a->ctx_len;
    p.blocks = a->blocks;
    p.blocks_stride = a->blocks_stride;
    p.block_size = a->block_size;
    p.n_heads = a->n_heads;
    p.n_kv_heads = a->n_kv_heads;
    p.head_dim = a->head_dim;
    p.kv_stride = a->kv_stride;
    return launch(c, p, a->max_q, a->n_seqs, a->max_ctx > 0 ? a->max_ctx : 0,
                  "attention_varlen launch");
}
