/*
 * flexprefill.cu - the CUDA twin of kern_flex_estimate_f32: what FlexPrefill's
 * selection reads from Q and K (probe profiles, block means), computed on the
 * device so that only these small arrays go to the host, which selects the
 * blocks (kernels/cpu/flexprefill.c) and hands back a mask for
 * kern_cuda_attention_block_sparse_f32.
 *
 * Probe profiles: the n_probe = B probe rows (the chunk's last rows, at
 * positions P0 .. P0 + n_probe - 1 with P0 = ctx_len - n_probe) against every
 * key, in tiles of TILE keys (one thread per key, one block per (tile, head)).
 * Pass 1 writes each tile's max and sum of exponentials per probe row to the
 * op workspace; a combine kernel turns them into log-sum-exps; pass 2
 * recomputes the scores and accumulates w = exp(s - lse) / n_probe: by key in
 * a register (vertical), by distance o = P0 + i - key in shared memory (the
 * block's keys cover TILE + n_probe - 1 consecutive distances; each probe
 * row's weights land on distinct entries and rows go one after another), and
 * each tile's distance row goes to the workspace, summed per distance over the
 * (at most three) tiles that touch it in tile order by a last kernel. Every
 * sum has a fixed order, so results repeat exactly; they differ from the CPU
 * op's (another summation order, expf) by f32 rounding.
 *
 * Block means: the CPU's sums in the CPU's order (additions only, then one
 * product by the same float), so kbar, qbar and qtil equal the CPU's bit for
 * bit.
 */
#include "kernels/cuda/common.cuh"

#include <math.h>

#define TILE 128 /* keys per block of the profile kernels */
#define ROWS 16  /* probe rows scored together (registers per thread) */

struct probe_params {
    const float *q, *k;
    const int32_t *blocks;
    float *vertical, *slash;
    float2 *part; /* pass 1: [head][tile][n_probe] (max, sum) */
    float *lse;   /* [head][n_probe] */
    float *sl;    /* pass 2: [head][tile][TILE + n_probe - 1] */
    int n_q, ctx, n_heads, group, hd, kv_stride, page_size, n_probe, n_tiles;
    float scale, inv_probe;
};

__device__ __forceinline__ size_t key_row(const probe_params &p, int j)
{
    if (!p.blocks)
        return (size_t)j;
    return (size_t)p.blocks[j / p.page_size] * (size_t)p.page_size + (size_t)(j % p.page_size);
}

__device__ __forceinline__ float warp_max(float x)
{
    for (int o = 16; o > 0; o >>= 1)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
    for (int o = 16; o > 0; o >>= 1)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* Scores of this thread's key against probe rows i0 .. i0 + ROWS - 1 (staged,
 * scaled, in qs); -inf where masked or past the probe rows. */
__device__ void score_rows(const probe_params &p, const float *qs, const float *kr, int j, int i0,
                           float s[ROWS])
{
    for (int r = 0; r < ROWS; r++)
        s[r] = 0.0f;
    if (kr)
        for (int d = 0; d < p.hd; d++) {
            const float kd = kr[d];
            for (int r = 0; r < ROWS; r++)
                s[r] += qs[r * p.hd + d] * kd;
        }
    const int P0 = p.ctx - p.n_probe;
    for (int r = 0; r < ROWS; r++)
        if (!kr || i0 + r >= p.n_probe || j > P0 + i0 + r)
            s[r] = -INFINITY;
}

/* Probe rows i0 .. i0 + ROWS - 1 of head h, scaled, into qs (zeros past them). */
__device__ void stage_rows(const probe_params &p, int h, int i0, float *qs)
{
    for (int x = threadIdx.x; x < ROWS * p.hd; x += blockDim.x) {
        const int r = x / p.hd, d = x % p.hd, i = i0 + r;
        qs[x] = i < p.n_probe
                    ? p.q[((size_t)(p.n_q - p.n_probe + i) * p.n_heads + h) * p.hd + d] * p.scale
                    : 0.0f;
    }
}

template <bool PASS2> __global__ void probe_kernel(const probe_params p)
{
    extern __shared__ float smem[];
    float *qs = smem;                        /* ROWS * hd */
    float *wmax = qs + ROWS * p.hd;          /* [TILE / 32][ROWS] */
    float *wsum = wmax + (TILE / 32) * ROWS; /* [TILE / 32][ROWS] */
    float *sl = wsum + (TILE / 32) * ROWS;   /* TILE + n_probe - 1 */
    const int h = blockIdx.y, tile = blockIdx.x, kvh = h / p.group;
    const int jl = threadIdx.x, j = tile * TILE + jl, lane = jl % 32, warp = jl / 32;
    const float *kr = j < p.ctx ? p.k + key_row(p, j) * p.kv_stride + (size_t)kvh * p.hd : NULL;
    const int n_sl = TILE + p.n_probe - 1;
    if (PASS2)
        for (int x = jl; x < n_sl; x += TILE)
            sl[x] = 0.0f;
    float vert = 0.0f;
    for (int i0 = 0; i0 < p.n_probe; i0 += ROWS) {
        __syncthreads();
        stage_rows(p, h, i0, qs);
        __syncthreads();
        float s[ROWS];
        score_rows(p, qs, kr, j, i0, s);
        if (!PASS2) {
            for (int r = 0; r < ROWS; r++) {
                const float m = warp_max(s[r]);
                const float l = warp_sum(m == -INFINITY ? 0.0f : expf(s[r] - m));
                if (lane == 0) {
                    wmax[warp * ROWS + r] = m;
                    wsum[warp * ROWS + r] = l;
                }
            }
            __syncthreads();
            if (jl < ROWS && i0 + jl < p.n_probe) {
                float m = -INFINITY, l = 0.0f;
                for (int w = 0; w < TILE / 32; w++) {
                    const float mw = wmax[w * ROWS + jl], lw = wsum[w * ROWS + jl];
                    if (mw == -INFINITY)
                        continue;
                    const float mn = fmaxf(m, mw);
                    l = l * expf(m - mn) + lw * expf(mw - mn);
                    m = mn;
                }
                p.part[((size_t)h * p.n_tiles + tile) * p.n_probe + i0 + jl] = make_float2(m, l);
            }
        } else {
            for (int r = 0; r < ROWS && i0 + r < p.n_probe; r++) {
                const float w =
                    s[r] == -INFINITY
                        ? 0.0f
                        : expf(s[r] - p.lse[(size_t)h * p.n_probe + i0 + r]) * p.inv_probe;
                vert += w;
                /* Distance P0 + i - j sits at local index i - jl + TILE - 1: distinct
                 * for the threads of one row; rows one after another. */
                sl[i0 + r - jl + TILE - 1] += w;
                __syncthreads();
            }
        }
    }
    if (PASS2) {
        if (kr)
            p.vertical[(size_t)h * p.ctx + j] = vert;
        __syncthreads();
        float *dst = p.sl + ((size_t)h * p.n_tiles + tile) * n_sl;
        for (int x = jl; x < n_sl; x += TILE)
            dst[x] = sl[x];
    }
}

/* lse of each probe row from its tiles' (max, sum), in tile order. */
__global__ void lse_kernel(const probe_params p)
{
    const int h = blockIdx.x;
    for (int i = threadIdx.x; i < p.n_probe; i += blockDim.x) {
        float m = -INFINITY, l = 0.0f;
        for (int t = 0; t < p.n_tiles; t++) {
            const float2 x = p.part[((size_t)h * p.n_tiles + t) * p.n_probe + i];
            if (x.x == -INFINITY)
                continue;
            const float mn = fmaxf(m, x.x);
            l = l * expf(m - mn) + x.y * expf(x.x - mn);
            m = mn;
        }
        p.lse[(size_t)h * p.n_probe + i] = m + logf(l);
    }
}

/* slash[h][o]: the tiles' distance rows summed in tile order. */
__global__ void slash_kernel(const probe_params p)
{
    const int h = blockIdx.y, n_sl = TILE + p.n_probe - 1, P0 = p.ctx - p.n_probe;
    for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < p.ctx; o += gridDim.x * blockDim.x) {
        /* keys P0 + i - o for probe rows i */
        const int jlo = max(0, P0 - o), jhi = min(p.ctx - 1, P0 - o + p.n_probe - 1);
        float sum = 0.0f;
        for (int t = jlo / TILE; jlo <= jhi && t <= jhi / TILE; t++)
            sum += p.sl[((size_t)h * p.n_tiles + t) * n_sl + (o - P0 + (t + 1) * TILE - 1)];
        p.slash[(size_t)h * p.ctx + o] = sum;
    }
}

struct means_params {
    const float *q, *k;
    const int32_t *blocks;
    float *kbar, *qbar, *qtil;
    int n_q, ctx, n_heads, n_kv_heads, hd, kv_stride, page_size, B, nb, q_block0, n_qblocks;
    float scale;
};

/* kbar[kvh][c]: block c of kv head kvh (grid: nb x n_kv_heads). */
__global__ void kbar_kernel(const means_params p)
{
    const int c = blockIdx.x, kvh = blockIdx.y;
    const int j0 = c * p.B, j1 = min(j0 + p.B, p.ctx);
    const float inv = 1.0f / (float)(j1 - j0);
    for (int d = threadIdx.x; d < p.hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int t = j0; t < j1; t++) {
            const size_t row = p.blocks ? (size_t)p.blocks[t / p.page_size] * p.page_size +
                                              (size_t)(t % p.page_size)
                                        : (size_t)t;
            acc += p.k[row * p.kv_stride + (size_t)kvh * p.hd + d];
        }
        p.kbar[((size_t)kvh * p.nb + c) * p.hd + d] = acc * inv;
    }
}

/* Query means of head blockIdx.y: x == 0 the probe rows, x == 1 + i query block
 * q_block0 + i inside the chunk. */
__global__ void qmean_kernel(const means_params p)
{
    const int h = blockIdx.y, x = blockIdx.x, q_first = p.ctx - p.n_q;
    int r0, r1;
    float *out;
    if (x == 0) {
        r0 = p.n_q - p.B;
        r1 = p.n_q;
        out = p.qbar + (size_t)h * p.hd;
    } else {
        const int i = x - 1, r = p.q_block0 + i;
        r0 = max(r * p.B, q_first) - q_first;
        r1 = min((r + 1) * p.B, p.ctx) - q_first;
        out = p.qtil + ((size_t)h * p.n_qblocks + i) * p.hd;
    }
    const float f = p.scale / (float)(r1 - r0);
    for (int d = threadIdx.x; d < p.hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int r = r0; r < r1; r++)
            acc += p.q[((size_t)r * p.n_heads + h) * p.hd + d];
        out[d] = acc * f;
    }
}

static size_t align256(size_t n)
{
    return (n + 255) & ~(size_t)255;
}

static int n_tiles_of(const kern_attn_args *a)
{
    return (a->ctx_len + TILE - 1) / TILE;
}

extern "C" size_t kern_cuda_flex_estimate_workspace(const kern_attn_args *a, int block_size)
{
    if (!a || a->ctx_len < 1 || a->n_heads < 1 || block_size < 1)
        return 0;
    const size_t nt = (size_t)n_tiles_of(a), nh = (size_t)a->n_heads, np = (size_t)block_size;
    const size_t part = nh * nt * np * sizeof(float2);
    const size_t sl = nh * nt * (TILE + np - 1) * sizeof(float);
    return align256(nh * np * sizeof(float)) + (part > sl ? part : sl);
}

extern "C" int kern_cuda_flex_estimate_f32(const kern_attn_args *a, int block_size,
                                           const kern_flex_estimate *est)
{
    static const char what[] = "flex_estimate";
    kc_ctx *c;
    int rc = kc_need_ctx(&c, what);
    if (rc)
        return rc;
    if (!a || !est)
        return kc_fail(KERN_CUDA_E_ARG, "%s: args or estimate is NULL", what);
    if (!a->q || !a->k || !est->vertical || !est->slash || !est->kbar || !est->qbar || !est->qtil)
        return kc_fail(KERN_CUDA_E_ARG, "%s: NULL q, k or estimate array", what);
    const int hd = a->head_dim, B = block_size;
    if (hd < 1 || hd > KERN_ATTN_MAX_HEAD_DIM || a->n_kv_heads < 1 || a->n_heads < 1 ||
        a->n_heads % a->n_kv_heads != 0 || (long)a->n_kv_heads * hd > a->kv_stride)
        return kc_fail(KERN_CUDA_E_ARG, "%s: heads %d/%d, head_dim %d, kv_stride %d", what,
                       a->n_heads, a->n_kv_heads, hd, a->kv_stride);
    if (B < KERN_FLEX_MIN_BLOCK || B > KERN_FLEX_MAX_BLOCK || a->n_q < B || a->ctx_len < a->n_q ||
        (a->blocks && a->block_size < 1))
        return kc_fail(KERN_CUDA_E_ARG, "%s: block_size %d, n_q %d, ctx_len %d, page %d", what, B,
                       a->n_q, a->ctx_len, a->block_size);
    const size_t need = kern_cuda_flex_estimate_workspace(a, B);
    if (need > c->ws_bytes)
        return kc_fail(KERN_CUDA_E_NOMEM, "%s: needs %zu bytes of op workspace, %zu reserved", what,
                       need, c->ws_bytes);
    const int n_tiles = n_tiles_of(a);
    if ((long)n_tiles > 65535L * 32768L)
        return kc_fail(KERN_CUDA_E_ARG, "%s: ctx_len %d is too long", what, a->ctx_len);
    probe_params p;
    p.q = a->q;
    p.k = a->k;
    p.blocks = a->blocks;
    p.vertical = est->vertical;
    p.slash = est->slash;
    p.lse = (float *)c->ws;
    p.part = (float2 *)((char *)c->ws + align256((size_t)a->n_heads * B * sizeof(float)));
    p.sl = (float *)p.part;
    p.n_q = a->n_q;
    p.ctx = a->ctx_len;
    p.n_heads = a->n_heads;
    p.group = a->n_heads / a->n_kv_heads;
    p.hd = hd;
    p.kv_stride = a->kv_stride;
    p.page_size = a->block_size;
    p.n_probe = B;
    p.n_tiles = n_tiles;
    p.scale = 1.0f / sqrtf((float)hd);
    p.inv_probe = 1.0f / (float)B;
    const size_t smem = sizeof(float) * ((size_t)ROWS * hd + 2 * (TILE / 32) * ROWS + TILE + B - 1);
    const cudaStream_t s = kc_stream(c);
    const dim3 grid((unsigned)n_tiles, (unsigned)a->n_heads);
    if (smem > 48 * 1024) {
        rc = kc_check(cudaFuncSetAttribute(probe_kernel<false>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                      what);
        if (!rc)
            rc = kc_check(cudaFuncSetAttribute(probe_kernel<true>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)smem),
                          what);
        if (rc)
            return rc;
    }
    probe_kernel<false><<<grid, TILE, smem, s>>>(p);
    if ((rc = kc_launched("flex_estimate: probe pass 1")) != 0)
        return rc;
    lse_kernel<<<(unsigned)a->n_heads, 128, 0, s>>>(p);
    if ((rc = kc_launched("flex_estimate: probe lse")) != 0)
        return rc;
    probe_kernel<true><<<grid, TILE, smem, s>>>(p);
    if ((rc = kc_launched("flex_estimate: probe pass 2")) != 0)
        return rc;
    slash_kernel<<<dim3(kc_blocks((size_t)a->ctx_len, 256, 4096), (unsigned)a->n_heads), 256, 0,
                   s>>>(p);
    if ((rc = kc_launched("flex_estimate: slash")) != 0)
        return rc;

    means_params m;
    m.q = a->q;
    m.k = a->k;
    m.blocks = a->blocks;
    m.kbar = est->kbar;
    m.qbar = est->qbar;
    m.qtil = est->qtil;
    m.n_q = a->n_q;
    m.ctx = a->ctx_len;
    m.n_heads = a->n_heads;
    m.n_kv_heads = a->n_kv_heads;
    m.hd = hd;
    m.kv_stride = a->kv_stride;
    m.page_size = a->block_size;
    m.B = B;
    m.nb = (a->ctx_len + B - 1) / B;
    m.q_block0 = (a->ctx_len - a->n_q) / B;
    m.n_qblocks = m.nb - m.q_block0;
    m.scale = p.scale;
    const unsigned threads = hd < 256 ? (unsigned)((hd + 31) / 32 * 32) : 256u;
    kbar_kernel<<<dim3((unsigned)m.nb, (unsigned)a->n_kv_heads), threads, 0, s>>>(m);
    if ((rc = kc_launched("flex_estimate: key means")) != 0)
        return rc;
    qmean_kernel<<<dim3((unsigned)(1 + m.n_qblocks), (unsigned)a->n_heads), threads, 0, s>>>(m);
    return kc_launched("flex_estimate: query means");
}
