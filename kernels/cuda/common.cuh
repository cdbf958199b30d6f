/*
 * common.cuh - what the CUDA sources of the kernels module share, private to
 * kernels/cuda/: the per-thread context, error recording, launch checks.
 *
 * Invariant: a context belongs to the thread that created it; nothing here is
 * locked because nothing here is shared between threads.
 */
#ifndef SIEVE_KERNELS_CUDA_COMMON_CUH
#define SIEVE_KERNELS_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda.h"

struct kc_ctx {
    int device;
    cudaStream_t queue[2]; /* KERN_CUDA_COMPUTE, KERN_CUDA_COPY */
    cudaEvent_t handoff;   /* kern_cuda_queue_wait */
    cublasHandle_t blas;
    void *blas_ws; /* cuBLAS workspace: set explicitly so graph capture never allocates */
    size_t blas_ws_bytes;
    void *ws; /* op workspace (kern_cuda_reserve_workspace) */
    size_t ws_bytes;
    int n_sm;
    size_t smem_optin; /* most dynamic shared memory one block may have */
    int timeout_ms;
    bool capturing;
};

/* Raises the shared-memory limit of the attention kernels on `device`
 * (attention.cu; called once per context by kern_cuda_init). */
cudaError_t kc_attention_setup(int device);

/* Rows of x (row stride ldx) rounded to bf16 (or f16) into a packed [M][K]
 * array on stream s (ops.cu; the activations of the tensor-core products). */
int kc_rows_to_half(uint16_t *dst, const float *x, int ldx, int M, int K, bool bf16,
                    cudaStream_t s);

/* The calling thread's context, or NULL. */
kc_ctx *kc_current(void);

/* Records a failure (the first since the last sync is kept) and returns rc. */
int kc_fail(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* 0 for cudaSuccess, else records "what: <CUDA error name>: <text>". */
int kc_check(cudaError_t e, const char *what);
int kc_check_blas(cublasStatus_t s, const char *what);
/* After a launch: its configuration error, if any, as kc_check. */
static inline int kc_launched(const char *what)
{
    return kc_check(cudaGetLastError(), what);
}

/* The context, or KERN_CUDA_E_NOCTX recorded under `what`. */
static inline int kc_need_ctx(kc_ctx **c, const char *what)
{
    *c = kc_current();
    return *c ? 0
              : kc_fail(KERN_CUDA_E_NOCTX, "%s: kern_cuda_init was not called on this thread",
                        what);
}

static inline cudaStream_t kc_stream(const kc_ctx *c)
{
    return c->queue[KERN_CUDA_COMPUTE];
}

/* Blocks for n items at `threads` per block, capped (grid-stride loops cover the rest). */
static inline unsigned kc_blocks(size_t n, unsigned threads, unsigned cap)
{
    size_t b = (n + threads - 1) / threads;
    if (b < 1)
        b = 1;
    return (unsigned)(b < cap ? b : cap);
}

/* ggml's element type ids (kernels/quant.h kern_type: that header is C only). */
enum {
    KC_TYPE_F32 = 0,
    KC_TYPE_F16 = 1,
    KC_TYPE_Q4_0 = 2,
    KC_TYPE_Q8_0 = 8,
    KC_TYPE_BF16 = 30,
};

/* Exact decodes (the same values as kern_f16_to_f32 / kern_bf16_to_f32). */
__device__ __forceinline__ float kc_bf16_to_f32(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16);
}

__device__ __forceinline__ float kc_f16_to_f32(uint16_t h)
{
    /* Every half is exactly representable as a float; the hardware converts. */
    return __half2float(__ushort_as_half(h));
}

#endif
