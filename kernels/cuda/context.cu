/*
 * context.cu - devices, the per-thread context, errors, memory, transfers and
 * graphs for the CUDA twins (kernels/cuda.h).
 *
 * The context lives in thread-local storage: one host thread drives one
 * device, so no locks are needed and ops find their queue without an argument.
 * Errors are kept per thread: the first failure since the last sync, with its
 * message, so a step can enqueue many ops and check once. Waiting for the
 * device is only ever a bounded poll (kern_cuda_sync), never a blocking
 * synchronize that could hang on a wedged device.
 */
#include "kernels/cuda/common.cuh"

#include <new>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define DEFAULT_TIMEOUT_MS 60000
/* cuBLAS asks for 32 MiB of workspace on Hopper; giving it one up front keeps
 * graph capture free of allocations. */
#define BLAS_WORKSPACE_BYTES (32u << 20)
/* Polls before the sync loop starts sleeping between queries. */
#define SPIN_POLLS 2000
#define POLL_SLEEP_NS 20000

static thread_local kc_ctx *t_ctx;
static thread_local int t_err_code;
static thread_local char t_err_msg[512];

kc_ctx *kc_current(void)
{
    return t_ctx;
}

int kc_fail(int rc, const char *fmt, ...)
{
    if (t_err_code == 0) {
        t_err_code = rc;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(t_err_msg, sizeof(t_err_msg), fmt, ap);
        va_end(ap);
    }
    return rc;
}

static int rc_of(cudaError_t e)
{
    if (e == cudaErrorMemoryAllocation)
        return KERN_CUDA_E_NOMEM;
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice)
        return KERN_CUDA_E_NODEV;
    return KERN_CUDA_E_RUNTIME;
}

int kc_check(cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return 0;
    return kc_fail(rc_of(e), "%s: %s: %s", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

int kc_check_blas(cublasStatus_t s, const char *what)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return 0;
    const int rc = s == CUBLAS_STATUS_ALLOC_FAILED ? KERN_CUDA_E_NOMEM : KERN_CUDA_E_CUBLAS;
    return kc_fail(rc, "%s: %s: %s", what, cublasGetStatusName(s), cublasGetStatusString(s));
}

/* Writes a message into a caller's buffer and returns rc (functions that take
 * an error buffer report there, not in the thread's sticky error). */
static int report(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int report(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static int report_cuda(char *err, size_t errlen, cudaError_t e, const char *what)
{
    return report(err, errlen, rc_of(e), "%s: %s: %s", what, cudaGetErrorName(e),
                  cudaGetErrorString(e));
}

extern "C" const char *kern_cuda_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "ok";
    case KERN_CUDA_E_NODEV:
        return "no CUDA device";
    case KERN_CUDA_E_NOCTX:
        return "no CUDA context on this thread";
    case KERN_CUDA_E_ARG:
        return "invalid argument";
    case KERN_CUDA_E_TYPE:
        return "unsupported element type";
    case KERN_CUDA_E_NOMEM:
        return "out of memory";
    case KERN_CUDA_E_RUNTIME:
        return "CUDA runtime error";
    case KERN_CUDA_E_CUBLAS:
        return "cuBLAS error";
    case KERN_CUDA_E_TIMEOUT:
        return "CUDA device timed out";
    case KERN_CUDA_E_STATE:
        return "not allowed in this state";
    case KERN_CUDA_E_COMM:
        return "collective failed";
    default:
        return "unknown error";
    }
}

/* ---- devices ---- */

extern "C" int kern_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver or no device: not sticky, clear it */
        return 0;
    }
    return n;
}

extern "C" int kern_cuda_device_query(int device, kern_cuda_device_info *info, char *err,
                                      size_t errlen)
{
    const int n = kern_cuda_device_count();
    if (!info)
        return report(err, errlen, KERN_CUDA_E_ARG, "device query: info is NULL");
    if (device < 0 || device >= n)
        return report(err, errlen, KERN_CUDA_E_NODEV, "device %d: %d CUDA device(s) present",
                      device, n);
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess)
        return report_cuda(err, errlen, e, "cudaGetDeviceProperties");
    memset(info, 0, sizeof(*info));
    const size_t name_len = strnlen(p.name, sizeof(p.name));
    const size_t keep = name_len < sizeof(info->name) ? name_len : sizeof(info->name) - 1;
    memcpy(info->name, p.name, keep);
    info->name[keep] = '\0';
    info->cc_major = p.major;
    info->cc_minor = p.minor;
    info->n_sm = p.multiProcessorCount;
    info->total_mem = p.totalGlobalMem;
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess)
        prev = -1;
    e = cudaSetDevice(device);
    if (e == cudaSuccess)
        e = cudaMemGetInfo(&info->free_mem, &info->total_mem);
    if (prev >= 0)
        (void)cudaSetDevice(prev);
    return e == cudaSuccess ? 0 : report_cuda(err, errlen, e, "cudaMemGetInfo");
}

/* ---- contexts ---- */

/* Bounded wait for one stream: polls, spinning briefly, then sleeping. */
static int wait_stream(cudaStream_t s, int timeout_ms, const char *name)
{
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0;; i++) {
        const cudaError_t e = cudaStreamQuery(s);
        if (e == cudaSuccess)
            return 0;
        if (e != cudaErrorNotReady)
            return kc_check(e, name);
        if (i < SPIN_POLLS)
            continue;
        clock_gettime(CLOCK_MONOTONIC, &now);
        const double ms =
            (double)(now.tv_sec - t0.tv_sec) * 1e3 + (double)(now.tv_nsec - t0.tv_nsec) / 1e6;
        if (ms > (double)timeout_ms)
            return kc_fail(KERN_CUDA_E_TIMEOUT, "%s: the device did not finish within %d ms", name,
                           timeout_ms);
        const struct timespec nap = {0, POLL_SLEEP_NS};
        nanosleep(&nap, NULL);
    }
}

static void ctx_destroy(kc_ctx *c)
{
    if (!c)
        return;
    if (c->blas)
        (void)cublasDestroy(c->blas);
    if (c->handoff)
        (void)cudaEventDestroy(c->handoff);
    for (int q = 0; q < 2; q++)
        if (c->queue[q])
            (void)cudaStreamDestroy(c->queue[q]);
    if (c->blas_ws)
        (void)cudaFree(c->blas_ws);
    if (c->ws)
        (void)cudaFree(c->ws);
    delete c;
}

extern "C" void kern_cuda_close(void)
{
    kc_ctx *c = t_ctx;
    if (!c)
        return;
    if (c->capturing) {
        cudaGraph_t g = NULL;
        if (cudaStreamEndCapture(kc_stream(c), &g) == cudaSuccess && g)
            (void)cudaGraphDestroy(g);
        (void)cudaGetLastError();
    }
    (void)wait_stream(c->queue[KERN_CUDA_COMPUTE], c->timeout_ms, "close: compute queue");
    (void)wait_stream(c->queue[KERN_CUDA_COPY], c->timeout_ms, "close: copy queue");
    ctx_destroy(c);
    t_ctx = NULL;
    t_err_code = 0;
    t_err_msg[0] = '\0';
}

extern "C" int kern_cuda_init(int device, char *err, size_t errlen)
{
    kern_cuda_close();
    const int n = kern_cuda_device_count();
    if (device < 0 || device >= n)
        return report(err, errlen, KERN_CUDA_E_NODEV, "CUDA device %d: %d device(s) present",
                      device, n);
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess)
        return report_cuda(err, errlen, e, "cudaSetDevice");
    e = cudaFree(NULL); /* creates the primary context now, so its failure is reported here */
    if (e != cudaSuccess)
        return report_cuda(err, errlen, e, "creating the CUDA context");

    kc_ctx *c = new (std::nothrow) kc_ctx();
    if (!c)
        return report(err, errlen, KERN_CUDA_E_NOMEM, "CUDA context: out of host memory");
    c->device = device;
    c->timeout_ms = DEFAULT_TIMEOUT_MS;
    const char *step = "cudaDeviceGetAttribute";
    e = cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, device);
    int optin = 0;
    if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    c->smem_optin = (size_t)optin;
    for (int q = 0; q < 2 && e == cudaSuccess; q++) {
        step = "cudaStreamCreateWithFlags";
        e = cudaStreamCreateWithFlags(&c->queue[q], cudaStreamNonBlocking);
    }
    if (e == cudaSuccess) {
        step = "cudaEventCreateWithFlags";
        e = cudaEventCreateWithFlags(&c->handoff, cudaEventDisableTiming);
    }
    if (e == cudaSuccess) {
        step = "cuBLAS workspace";
        e = cudaMalloc(&c->blas_ws, BLAS_WORKSPACE_BYTES);
        c->blas_ws_bytes = BLAS_WORKSPACE_BYTES;
    }
    if (e == cudaSuccess) {
        step = "attention kernel setup";
        e = kc_attention_setup(device);
    }
    if (e != cudaSuccess) {
        ctx_destroy(c);
        return report_cuda(err, errlen, e, step);
    }
    cublasStatus_t s = cublasCreate(&c->blas);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasSetStream(c->blas, kc_stream(c));
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasSetWorkspace(c->blas, c->blas_ws, c->blas_ws_bytes);
    if (s == CUBLAS_STATUS_SUCCESS) /* full f32 products: no TF32 unless asked */
        s = cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH);
    if (s != CUBLAS_STATUS_SUCCESS) {
        ctx_destroy(c);
        return report(err, errlen,
                      s == CUBLAS_STATUS_ALLOC_FAILED ? KERN_CUDA_E_NOMEM : KERN_CUDA_E_CUBLAS,
                      "cuBLAS setup: %s: %s", cublasGetStatusName(s), cublasGetStatusString(s));
    }
    t_ctx = c;
    t_err_code = 0;
    t_err_msg[0] = '\0';
    return 0;
}

extern "C" int kern_cuda_current_device(void)
{
    return t_ctx ? t_ctx->device : -1;
}

extern "C" void kern_cuda_set_timeout_ms(int ms)
{
    if (t_ctx)
        t_ctx->timeout_ms = ms > 0 ? ms : DEFAULT_TIMEOUT_MS;
}

extern "C" int kern_cuda_last_error(char *err, size_t errlen)
{
    if (t_err_code && err && errlen)
        snprintf(err, errlen, "%s", t_err_msg);
    return t_err_code;
}

extern "C" int kern_cuda_sync(char *err, size_t errlen)
{
    kc_ctx *c = t_ctx;
    if (!c)
        return report(err, errlen, KERN_CUDA_E_NOCTX,
                      "sync: kern_cuda_init was not called on this thread");
    if (c->capturing)
        return report(err, errlen, KERN_CUDA_E_STATE, "sync: a graph capture is in progress");
    (void)wait_stream(c->queue[KERN_CUDA_COMPUTE], c->timeout_ms, "compute queue");
    (void)wait_stream(c->queue[KERN_CUDA_COPY], c->timeout_ms, "copy queue");
    const int rc = t_err_code;
    if (rc && err && errlen)
        snprintf(err, errlen, "%s", t_err_msg);
    t_err_code = 0;
    t_err_msg[0] = '\0';
    return rc;
}

/* ---- memory and transfers ---- */

extern "C" void *kern_cuda_malloc(size_t bytes, char *err, size_t errlen)
{
    if (!t_ctx) {
        report(err, errlen, KERN_CUDA_E_NOCTX, "malloc: kern_cuda_init was not called");
        return NULL;
    }
    void *p = NULL;
    const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        report(err, errlen, rc_of(e), "cudaMalloc of %zu bytes on device %d: %s", bytes,
               t_ctx->device, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

extern "C" void kern_cuda_free(void *p)
{
    if (p)
        (void)cudaFree(p);
}

extern "C" void *kern_cuda_host_malloc(size_t bytes, char *err, size_t errlen)
{
    void *p = NULL;
    const cudaError_t e = cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        report(err, errlen, rc_of(e), "cudaHostAlloc of %zu bytes: %s", bytes,
               cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

extern "C" void kern_cuda_host_free(void *p)
{
    if (p)
        (void)cudaFreeHost(p);
}

static int queue_of(kc_ctx **c, kern_cuda_queue q, cudaStream_t *s, const char *what)
{
    int rc = kc_need_ctx(c, what);
    if (rc)
        return rc;
    if (q != KERN_CUDA_COMPUTE && q != KERN_CUDA_COPY)
        return kc_fail(KERN_CUDA_E_ARG, "%s: queue %d is neither COMPUTE nor COPY", what, (int)q);
    *s = (*c)->queue[q];
    return 0;
}

static int copy(void *dst, const void *src, size_t bytes, kern_cuda_queue q, cudaMemcpyKind kind,
                const char *what)
{
    kc_ctx *c;
    cudaStream_t s = NULL;
    int rc = queue_of(&c, q, &s, what);
    if (rc || bytes == 0)
        return rc;
    if (!dst || !src)
        return kc_fail(KERN_CUDA_E_ARG, "%s: NULL pointer for %zu bytes", what, bytes);
    return kc_check(cudaMemcpyAsync(dst, src, bytes, kind, s), what);
}

extern "C" int kern_cuda_h2d(void *dst, const void *src, size_t bytes, kern_cuda_queue q)
{
    return copy(dst, src, bytes, q, cudaMemcpyHostToDevice, "host-to-device copy");
}

extern "C" int kern_cuda_d2h(void *dst, const void *src, size_t bytes, kern_cuda_queue q)
{
    return copy(dst, src, bytes, q, cudaMemcpyDeviceToHost, "device-to-host copy");
}

extern "C" int kern_cuda_d2d(void *dst, const void *src, size_t bytes, kern_cuda_queue q)
{
    return copy(dst, src, bytes, q, cudaMemcpyDeviceToDevice, "device-to-device copy");
}

extern "C" int kern_cuda_memset(void *dst, int byte, size_t bytes, kern_cuda_queue q)
{
    kc_ctx *c;
    cudaStream_t s = NULL;
    int rc = queue_of(&c, q, &s, "memset");
    if (rc || bytes == 0)
        return rc;
    if (!dst)
        return kc_fail(KERN_CUDA_E_ARG, "memset: NULL pointer for %zu bytes", bytes);
    return kc_check(cudaMemsetAsync(dst, byte, bytes, s), "memset");
}

extern "C" int kern_cuda_queue_wait(kern_cuda_queue waiter, kern_cuda_queue signaller)
{
    kc_ctx *c;
    cudaStream_t sw = NULL, ss = NULL;
    int rc = queue_of(&c, waiter, &sw, "queue wait");
    if (!rc)
        rc = queue_of(&c, signaller, &ss, "queue wait");
    if (rc || sw == ss)
        return rc;
    if (c->capturing)
        return kc_fail(KERN_CUDA_E_STATE, "queue wait: not allowed during a graph capture");
    rc = kc_check(cudaEventRecord(c->handoff, ss), "queue wait: cudaEventRecord");
    return rc ? rc : kc_check(cudaStreamWaitEvent(sw, c->handoff, 0), "queue wait");
}

extern "C" int kern_cuda_reserve_workspace(size_t bytes, char *err, size_t errlen)
{
    kc_ctx *c = t_ctx;
    if (!c)
        return report(err, errlen, KERN_CUDA_E_NOCTX, "workspace: kern_cuda_init was not called");
    if (bytes <= c->ws_bytes)
        return 0;
    if (c->capturing)
        return report(err, errlen, KERN_CUDA_E_STATE, "workspace: a graph capture is in progress");
    /* The old workspace may still be read by queued ops. */
    const int rc = wait_stream(kc_stream(c), c->timeout_ms, "workspace");
    if (rc)
        return report(err, errlen, rc, "workspace: waiting for the compute queue: %s",
                      kern_cuda_strerror(rc));
    void *p = NULL;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return report(err, errlen, rc_of(e), "workspace of %zu bytes on device %d: %s", bytes,
                      c->device, cudaGetErrorString(e));
    }
    if (c->ws)
        (void)cudaFree(c->ws);
    c->ws = p;
    c->ws_bytes = bytes;
    return 0;
}

/* ---- graphs ---- */

struct kern_cuda_graph {
    cudaGraphExec_t exec;
};

extern "C" int kern_cuda_graph_begin(char *err, size_t errlen)
{
    kc_ctx *c = t_ctx;
    if (!c)
        return report(err, errlen, KERN_CUDA_E_NOCTX, "graph: kern_cuda_init was not called");
    if (c->capturing)
        return report(err, errlen, KERN_CUDA_E_STATE, "graph: a capture is already in progress");
    const cudaError_t e = cudaStreamBeginCapture(kc_stream(c), cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess)
        return report_cuda(err, errlen, e, "cudaStreamBeginCapture");
    c->capturing = true;
    return 0;
}

extern "C" kern_cuda_graph *kern_cuda_graph_end(char *err, size_t errlen)
{
    kc_ctx *c = t_ctx;
    if (!c || !c->capturing) {
        report(err, errlen, KERN_CUDA_E_STATE, "graph: no capture in progress");
        return NULL;
    }
    c->capturing = false;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(kc_stream(c), &graph);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        report_cuda(err, errlen, e, "cudaStreamEndCapture (an op inside the capture failed?)");
        return NULL;
    }
    kern_cuda_graph *g = new (std::nothrow) kern_cuda_graph();
    if (!g) {
        (void)cudaGraphDestroy(graph);
        report(err, errlen, KERN_CUDA_E_NOMEM, "graph: out of host memory");
        return NULL;
    }
    e = cudaGraphInstantiate(&g->exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        delete g;
        report_cuda(err, errlen, e, "cudaGraphInstantiate");
        return NULL;
    }
    return g;
}

extern "C" int kern_cuda_graph_launch(kern_cuda_graph *g)
{
    kc_ctx *c;
    int rc = kc_need_ctx(&c, "graph launch");
    if (rc)
        return rc;
    if (!g)
        return kc_fail(KERN_CUDA_E_ARG, "graph launch: graph is NULL");
    return kc_check(cudaGraphLaunch(g->exec, kc_stream(c)), "cudaGraphLaunch");
}

extern "C" void kern_cuda_graph_destroy(kern_cuda_graph *g)
{
    if (!g)
        return;
    (void)cudaGraphExecDestroy(g->exec);
    delete g;
}
