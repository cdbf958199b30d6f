/*
 * matmul.cu - y = x W^T on the GPU: f32 through cublasSgemm; F16/BF16 weights
 * through a streaming matrix-vector kernel for decode (M <= 8) and
 * cublasGemmEx on the tensor cores above that.
 *
 * Row-major onto column-major: cuBLAS sees a row-major [R][C] array with row
 * stride L as the column-major C x R matrix with leading dimension L. So y
 * [M][N] is Y = y^T (N x M, ld ldy), x [M][K] is X = x^T (K x M, ld ldx) and
 * W [N][K] is W^T (K x N, ld K); y = x W^T is Y = (W^T)^T X: op(A) = T on
 * A = w (lda K), op(B) = N on B = x (ldb ldx), m = N, n = M, k = K.
 *
 * The decode kernel: one warp per weight row, each lane streaming 16-byte
 * vectors of 8 halves (several in flight), the M rows of x read through L1
 * (they are shared by every warp of the SM), f32 accumulation per row of x,
 * one warp reduction at the end. Weight rows are read exactly once per call,
 * which is what batch-1 decode needs to run at memory bandwidth.
 */
#include "kernels/cuda/common.cuh"

#define GEMV_MAX_M 8
#define GEMV_WARPS 8
#define GEMV_UNROLL 4 /* 16-byte weight loads in flight per lane */

static int check_dims(const char *what, float *y, int ldy, const float *x, int ldx, const void *w,
                      int M, int N, int K)
{
    if (M < 0 || N < 0 || K < 0)
        return kc_fail(KERN_CUDA_E_ARG, "%s: negative size M %d, N %d, K %d", what, M, N, K);
    if (M == 0 || N == 0 || K == 0)
        return 0;
    if (!y || !w || !x)
        return kc_fail(KERN_CUDA_E_ARG, "%s: NULL pointer", what);
    if (ldx < K || (M > 1 && ldy < N))
        return kc_fail(KERN_CUDA_E_ARG, "%s: ldx %d < K %d or ldy %d < N %d", what, ldx, K, ldy, N);
    return 0;
}

extern "C" int kern_cuda_matmul_f32(float *y, int ldy, const float *x, int ldx, const float *w,
                                    int M, int N, int K)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "matmul_f32");
    if (!rc)
        rc = check_dims("matmul_f32", y, ldy, x, ldx, w, M, N, K);
    if (rc || M == 0 || N == 0 || K == 0) /* as the CPU op: nothing written */
        return rc;
    const float one = 1.0f, zero = 0.0f;
    /* With one row, cuBLAS still checks the unused leading dimensions. */
    const int lb = ldx > K ? ldx : K;
    const int lc = M == 1 && ldy < N ? N : ldy;
    return kc_check_blas(
        cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, K, x, lb, &zero, y, lc),
        "cublasSgemm");
}

/* ---- half weights ---- */

__device__ __forceinline__ float half_to_f32(uint16_t h, bool bf16)
{
    return bf16 ? kc_bf16_to_f32(h) : kc_f16_to_f32(h);
}

/* The 8 halves of a 16-byte vector, in memory order. */
__device__ __forceinline__ void unpack8(uint4 q, bool bf16, float *f)
{
    const uint32_t u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = half_to_f32((uint16_t)(u[i] & 0xffffu), bf16);
        f[2 * i + 1] = half_to_f32((uint16_t)(u[i] >> 16), bf16);
    }
}

/* VEC: K % 8 == 0, w and x 16-byte aligned, ldx % 4 == 0. */
template <int MR, bool BF16, bool VEC>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_half_kernel(float *y, int ldy, const float *x, int ldx, const uint16_t *w, int M, int N,
                     int K)
{
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N)
        return;
    const uint16_t *wr = w + (size_t)n * (size_t)K;
    float acc[MR];
#pragma unroll
    for (int m = 0; m < MR; m++)
        acc[m] = 0.0f;
    if (VEC) {
        const uint4 *wv = (const uint4 *)wr;
        const int nv = K / 8;
        for (int v0 = lane; v0 < nv; v0 += 32 * GEMV_UNROLL) {
            uint4 q[GEMV_UNROLL];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) {
                const int v = v0 + u * 32;
                q[u] = v < nv ? __ldcs(wv + v) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) {
                const int v = v0 + u * 32;
                if (v >= nv)
                    break;
                float wf[8];
                unpack8(q[u], BF16, wf);
#pragma unroll
                for (int m = 0; m < MR; m++) {
                    if (m >= M)
                        break;
                    const float4 *xv = (const float4 *)(x + (size_t)m * ldx + (size_t)v * 8);
                    const float4 a = __ldg(xv), b = __ldg(xv + 1);
                    float s = acc[m];
                    s = fmaf(wf[0], a.x, s);
                    s = fmaf(wf[1], a.y, s);
                    s = fmaf(wf[2], a.z, s);
                    s = fmaf(wf[3], a.w, s);
                    s = fmaf(wf[4], b.x, s);
                    s = fmaf(wf[5], b.y, s);
                    s = fmaf(wf[6], b.z, s);
                    s = fmaf(wf[7], b.w, s);
                    acc[m] = s;
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float wk = half_to_f32(wr[k], BF16);
#pragma unroll
            for (int m = 0; m < MR; m++)
                if (m < M)
                    acc[m] = fmaf(wk, x[(size_t)m * ldx + k], acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < MR; m++) {
        float s = acc[m];
        for (int o = 16; o > 0; o >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0 && m < M)
            y[(size_t)m * ldy + n] = s;
    }
}

template <int MR, bool BF16>
static void launch_gemv(bool vec, cudaStream_t s, float *y, int ldy, const float *x, int ldx,
                        const uint16_t *w, int M, int N, int K)
{
    const unsigned blocks = (unsigned)((N + GEMV_WARPS - 1) / GEMV_WARPS);
    if (vec)
        gemv_half_kernel<MR, BF16, true>
            <<<blocks, GEMV_WARPS * 32, 0, s>>>(y, ldy, x, ldx, w, M, N, K);
    else
        gemv_half_kernel<MR, BF16, false>
            <<<blocks, GEMV_WARPS * 32, 0, s>>>(y, ldy, x, ldx, w, M, N, K);
}

template <bool BF16>
static void gemv(bool vec, cudaStream_t s, float *y, int ldy, const float *x, int ldx,
                 const uint16_t *w, int M, int N, int K)
{
    if (M <= 1)
        launch_gemv<1, BF16>(vec, s, y, ldy, x, ldx, w, M, N, K);
    else if (M <= 2)
        launch_gemv<2, BF16>(vec, s, y, ldy, x, ldx, w, M, N, K);
    else if (M <= 4)
        launch_gemv<4, BF16>(vec, s, y, ldy, x, ldx, w, M, N, K);
    else
        launch_gemv<8, BF16>(vec, s, y, ldy, x, ldx, w, M, N, K);
}

static bool aligned16(const void *p)
{
    return ((uintptr_t)p & 15u) == 0;
}

extern "C" int kern_cuda_matmul_q(int type, float *y, int ldy, const float *x, int ldx,
                                  const void *w, int M, int N, int K)
{
    if (type == KC_TYPE_F32)
        return kern_cuda_matmul_f32(y, ldy, x, ldx, (const float *)w, M, N, K);
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "matmul_q");
    if (rc)
        return rc;
    if (type != KC_TYPE_F16 && type != KC_TYPE_BF16)
        return kc_fail(KERN_CUDA_E_TYPE,
                       "matmul_q: weight type %d is not supported on CUDA (F32, F16, BF16 are;"
                       " dequantize other types at load)",
                       type);
    rc = check_dims("matmul_q", y, ldy, x, ldx, w, M, N, K);
    if (rc || M == 0 || N == 0 || K == 0) /* as kern_matmul_q: nothing written */
        return rc;
    const bool bf16 = type == KC_TYPE_BF16;
    const uint16_t *wh = (const uint16_t *)w;
    cudaStream_t s = kc_stream(c);
    if (M <= GEMV_MAX_M) {
        const bool vec = K % 8 == 0 && ldx % 4 == 0 && aligned16(w) && aligned16(x);
        if (bf16)
            gemv<true>(vec, s, y, ldy, x, ldx, wh, M, N, K);
        else
            gemv<false>(vec, s, y, ldy, x, ldx, wh, M, N, K);
        return kc_launched("matmul_q decode kernel launch");
    }
    const size_t need = 2 * (size_t)M * (size_t)K;
    if (need > c->ws_bytes)
        return kc_fail(KERN_CUDA_E_NOMEM,
                       "matmul_q: M %d x K %d needs %zu bytes of workspace, %zu reserved"
                       " (kern_cuda_reserve_workspace)",
                       M, K, need, c->ws_bytes);
    uint16_t *xh = (uint16_t *)c->ws;
    rc = kc_rows_to_half(xh, x, ldx, M, K, bf16, s);
    if (rc)
        return rc;
    const cudaDataType_t t = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    const float one = 1.0f, zero = 0.0f;
    return kc_check_blas(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, t, K, xh,
                                      t, K, &zero, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx");
}
