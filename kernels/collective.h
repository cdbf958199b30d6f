/*
 * collective.h - the all-reduce of tensor parallelism, behind one interface
 * with two implementations:
 *
 *   threads  n ranks are n threads of this process sharing memory
 *            (kernels/cpu/collective.c); buffers are host memory. What CI runs.
 *   nccl     n ranks are n GPUs of this process, one host thread each
 *            (kernels/cuda/collective_nccl.cu, built with SIEVE_HAVE_NCCL);
 *            buffers are device memory on the rank's GPU, and the reduction is
 *            enqueued on the calling thread's compute queue (kernels/cuda.h).
 *
 * A communicator is created once for all ranks by one thread, then every rank
 * thread calls the collectives with its own rank, in the same order, with the
 * same sizes (the sharding code does exactly this after the attention output
 * and FFN down projections). Collectives are blocking for threads and
 * enqueued (asynchronous to the host) for NCCL.
 *
 * Determinism: the threads version sums element i as ((b0 + b1) + b2) + ...
 * in rank order whatever thread computes it, so results are bit-identical run
 * to run and on every rank.
 *
 * Never a hang: a rank that waits longer than the communicator's timeout for
 * the others (a rank that died, or called with a different size) gets an error,
 * and the communicator is then broken: every later call on any rank fails at
 * once with the same message, so the engine fails the step instead of
 * deadlocking. Destroy it and create a new one to recover.
 */
#ifndef SIEVE_KERNELS_COLLECTIVE_H
#define SIEVE_KERNELS_COLLECTIVE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kern_comm kern_comm;

typedef enum { KERN_COMM_THREADS = 0, KERN_COMM_NCCL = 1 } kern_comm_kind;

#define KERN_COMM_E_ARG -1     /* bad rank, size, pointer, or sizes differ across ranks */
#define KERN_COMM_E_TIMEOUT -2 /* ranks did not all arrive within the timeout */
#define KERN_COMM_E_BROKEN -3  /* an earlier failure broke the communicator */
#define KERN_COMM_E_NOSYS -4   /* this build has no such implementation (NCCL) */
#define KERN_COMM_E_BACKEND -5 /* NCCL or CUDA reported an error */
#define KERN_COMM_E_NOMEM -6

#define KERN_COMM_DEFAULT_TIMEOUT_MS 60000
#define KERN_COMM_MAX_RANKS 64

/* A shared-memory communicator of n_ranks (1..KERN_COMM_MAX_RANKS) threads.
 * NULL with a message on failure. */
kern_comm *kern_comm_create_threads(int n_ranks, char *err, size_t errlen);

/* An NCCL communicator over devices[0..n_ranks), rank r on devices[r]. Made
 * from one thread (NCCL's single-process initialization); afterwards rank r
 * is driven by the thread whose kern_cuda context is on devices[r]. NULL with
 * a message on failure, and always without SIEVE_HAVE_NCCL. */
kern_comm *kern_comm_create_nccl(const int *devices, int n_ranks, char *err, size_t errlen);

/* Frees the communicator; no rank may be inside a collective. NULL is fine. */
void kern_comm_destroy(kern_comm *c);

int kern_comm_size(const kern_comm *c);
kern_comm_kind kern_comm_get_kind(const kern_comm *c);
/* Longest a rank waits for the others (ms; <= 0 restores the default). Set it
 * before the ranks start. */
void kern_comm_set_timeout_ms(kern_comm *c, int ms);

/* buf[0..n) = the element-wise sum of every rank's buf[0..n), on every rank.
 * Called by each rank with its own buffer and the same n. 0, or a negative
 * KERN_COMM_E_* code with a message (every rank gets an error when the sizes
 * differ). */
int kern_comm_allreduce_sum_f32(kern_comm *c, int rank, float *buf, size_t n, char *err,
                                size_t errlen);

/* Returns when every rank has called it (threads), or enqueues nothing and
 * returns at once (NCCL: ordering comes from the queue). Same errors. */
int kern_comm_barrier(kern_comm *c, int rank, char *err, size_t errlen);

/* A short name for a KERN_COMM_E_* code. */
const char *kern_comm_strerror(int rc);

/* ---- the NCCL half, called only through the functions above ----------- */

#ifdef SIEVE_HAVE_NCCL
typedef struct kern_nccl kern_nccl;
kern_nccl *kern_nccl_create(const int *devices, int n_ranks, int timeout_ms, char *err,
                            size_t errlen);
void kern_nccl_destroy(kern_nccl *g);
int kern_nccl_allreduce_sum_f32(kern_nccl *g, int rank, float *buf, size_t n, int timeout_ms,
                                char *err, size_t errlen);
#endif

#ifdef __cplusplus
}
#endif

#endif
