/*
 * collective_nccl.cu - the NCCL half of kernels/collective.h: one process, n
 * GPUs, one host thread per rank, the all-reduce enqueued on the rank
 * thread's compute queue (kernels/cuda.h context).
 *
 * Communicators are nonblocking (ncclConfig_t.blocking = 0): every NCCL call
 * returns at once and its completion is polled with ncclCommGetAsyncError
 * under the caller's timeout, so a rank that never arrives turns into an
 * error, not a hung host thread. Destroying aborts the communicators, which is
 * safe whatever state they are in.
 *
 * The NCCL half is compiled only when the build defines SIEVE_HAVE_NCCL and
 * links NCCL; the CUDA backend's entry points (kern_cuda_comm_create,
 * kern_cuda_allreduce_sum_f32, kernels/cuda.h) always are, and fail with a
 * message without it.
 */
#include "kernels/collective.h"
#include "kernels/cuda/common.cuh"

#include <stdio.h>

extern "C" kern_comm *kern_cuda_comm_create(const int *devices, int n_ranks, char *err,
                                            size_t errlen)
{
    for (int i = 0; i < n_ranks; i++)
        for (int j = 0; j < i; j++)
            if (devices[i] == devices[j]) {
                if (err && errlen)
                    snprintf(err, errlen,
                             "device %d is listed for ranks %d and %d (each rank needs a GPU of "
                             "its own)",
                             devices[i], j, i);
                return NULL;
            }
    return kern_comm_create_nccl(devices, n_ranks, err, errlen);
}

extern "C" int kern_cuda_allreduce_sum_f32(kern_comm *c, int rank, float *buf, size_t n, char *err,
                                           size_t errlen)
{
    kc_ctx *ctx;
    int rc = kc_need_ctx(&ctx, "all-reduce");
    if (rc)
        return rc;
    if (!c || kern_comm_get_kind(c) != KERN_COMM_NCCL)
        return kc_fail(KERN_CUDA_E_ARG, "all-reduce: not an NCCL communicator");
    char msg[256] = "";
    rc = kern_comm_allreduce_sum_f32(c, rank, buf, n, msg, sizeof(msg));
    if (rc == 0)
        return 0;
    if (err && errlen)
        snprintf(err, errlen, "%s (%s)", msg, kern_comm_strerror(rc));
    return kc_fail(KERN_CUDA_E_COMM, "all-reduce of %zu floats on rank %d: %s (%s)", n, rank, msg,
                   kern_comm_strerror(rc));
}

#ifdef SIEVE_HAVE_NCCL

#include <nccl.h>

#include <new>
#include <time.h>

struct kern_nccl {
    int n;
    int devices[KERN_COMM_MAX_RANKS];
    ncclComm_t comms[KERN_COMM_MAX_RANKS];
};

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static int nccl_err(char *err, size_t errlen, ncclResult_t r, ncclComm_t comm, const char *what)
{
    if (err && errlen)
        snprintf(err, errlen, "%s: %s%s%s", what, ncclGetErrorString(r), comm ? ": " : "",
                 comm ? ncclGetLastError(comm) : "");
    return KERN_COMM_E_BACKEND;
}

/* Polls a nonblocking communicator until its last call completes. */
static int settle(ncclComm_t comm, int timeout_ms, char *err, size_t errlen, const char *what)
{
    const double t0 = now_ms();
    for (;;) {
        ncclResult_t state = ncclSuccess;
        const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
        if (r != ncclSuccess)
            return nccl_err(err, errlen, r, comm, what);
        if (state == ncclSuccess)
            return 0;
        if (state != ncclInProgress)
            return nccl_err(err, errlen, state, comm, what);
        if (now_ms() - t0 > (double)timeout_ms) {
            if (err && errlen)
                snprintf(err, errlen, "%s: not done after %d ms", what, timeout_ms);
            return KERN_COMM_E_TIMEOUT;
        }
        const struct timespec nap = {0, 50000};
        nanosleep(&nap, NULL);
    }
}

extern "C" void kern_nccl_destroy(kern_nccl *g)
{
    if (!g)
        return;
    for (int r = 0; r < g->n; r++)
        if (g->comms[r])
            (void)ncclCommAbort(g->comms[r]);
    delete g;
}

extern "C" kern_nccl *kern_nccl_create(const int *devices, int n_ranks, int timeout_ms, char *err,
                                       size_t errlen)
{
    kern_nccl *g = new (std::nothrow) kern_nccl();
    if (!g) {
        if (err && errlen)
            snprintf(err, errlen, "NCCL communicator: out of memory");
        return NULL;
    }
    g->n = n_ranks;
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess)
        prev = -1;
    ncclUniqueId id;
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
        nccl_err(err, errlen, r, NULL, "ncclGetUniqueId");
        delete g;
        return NULL;
    }
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    int rc = 0;
    r = ncclGroupStart();
    for (int k = 0; k < n_ranks && r == ncclSuccess; k++) {
        g->devices[k] = devices[k];
        const cudaError_t e = cudaSetDevice(devices[k]);
        if (e != cudaSuccess) {
            if (err && errlen)
                snprintf(err, errlen, "NCCL communicator: device %d: %s", devices[k],
                         cudaGetErrorString(e));
            rc = KERN_COMM_E_BACKEND;
            break;
        }
        r = ncclCommInitRankConfig(&g->comms[k], n_ranks, id, k, &cfg);
    }
    const ncclResult_t end = ncclGroupEnd();
    if (!rc && r != ncclSuccess && r != ncclInProgress)
        rc = nccl_err(err, errlen, r, NULL, "ncclCommInitRankConfig");
    if (!rc && end != ncclSuccess && end != ncclInProgress)
        rc = nccl_err(err, errlen, end, NULL, "ncclGroupEnd (communicator creation)");
    for (int k = 0; k < n_ranks && !rc; k++)
        rc = settle(g->comms[k], timeout_ms, err, errlen, "NCCL communicator creation");
    if (prev >= 0)
        (void)cudaSetDevice(prev);
    if (rc) {
        kern_nccl_destroy(g);
        return NULL;
    }
    return g;
}

extern "C" int kern_nccl_allreduce_sum_f32(kern_nccl *g, int rank, float *buf, size_t n,
                                           int timeout_ms, char *err, size_t errlen)
{
    kc_ctx *c = kc_current();
    if (!c) {
        if (err && errlen)
            snprintf(err, errlen, "all-reduce: rank %d's thread has no kern_cuda context", rank);
        return KERN_COMM_E_ARG;
    }
    if (c->device != g->devices[rank]) {
        if (err && errlen)
            snprintf(err, errlen, "all-reduce: rank %d is on device %d, this thread drives %d",
                     rank, g->devices[rank], c->device);
        return KERN_COMM_E_ARG;
    }
    if (n == 0)
        return 0;
    const ncclResult_t r =
        ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, g->comms[rank], kc_stream(c));
    if (r != ncclSuccess && r != ncclInProgress)
        return nccl_err(err, errlen, r, g->comms[rank], "ncclAllReduce");
    return settle(g->comms[rank], timeout_ms, err, errlen, "ncclAllReduce");
}

#endif
