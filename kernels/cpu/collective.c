/*
 * collective.c - the communicator of kernels/collective.h: the shared-memory
 * threads implementation, and the dispatch to NCCL when the build has it.
 *
 * Threads all-reduce, for n ranks: each rank publishes its buffer, waits at a
 * barrier, sums its own slice of the elements across every rank's buffer (in
 * rank order, so the result does not depend on timing) and writes the sum
 * back into every buffer's slice, then waits at a second barrier so no rank
 * returns, and reuses its buffer, while another is still writing into it.
 * Slices are disjoint, so the only synchronization is the two barriers; the
 * second one also keeps a fast rank from publishing its next buffer while a
 * slow one still reads this round's.
 *
 * The barrier is a generation counter under a mutex and a condition variable
 * on the monotonic clock, so a wait can time out; the first timeout marks the
 * communicator broken and wakes everyone (invariant: once broken, every call
 * fails at once).
 */
#include "kernels/collective.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SUM_CHUNK 1024 /* elements summed in a stack tile before the write-back */

struct kern_comm {
    kern_comm_kind kind;
    int n;
    int timeout_ms;
    /* threads: everything below is guarded by mu, except bufs/sizes, which a
     * rank writes before and reads after a barrier (ordered by mu). */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int arrived;
    unsigned long gen;
    bool broken;
    char broken_msg[256];
    float *bufs[KERN_COMM_MAX_RANKS];
    size_t sizes[KERN_COMM_MAX_RANKS];
#ifdef SIEVE_HAVE_NCCL
    kern_nccl *nccl;
#endif
};

static int say(char *err, size_t errlen, int rc, const char *msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg);
    return rc;
}

const char *kern_comm_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "ok";
    case KERN_COMM_E_ARG:
        return "invalid argument";
    case KERN_COMM_E_TIMEOUT:
        return "ranks timed out";
    case KERN_COMM_E_BROKEN:
        return "communicator broken by an earlier failure";
    case KERN_COMM_E_NOSYS:
        return "not built into this binary";
    case KERN_COMM_E_BACKEND:
        return "NCCL or CUDA error";
    case KERN_COMM_E_NOMEM:
        return "out of memory";
    default:
        return "unknown error";
    }
}

static kern_comm *comm_alloc(kern_comm_kind kind, int n_ranks, char *err, size_t errlen)
{
    if (n_ranks < 1 || n_ranks > KERN_COMM_MAX_RANKS) {
        if (err && errlen)
            snprintf(err, errlen, "communicator: %d ranks, expected 1..%d", n_ranks,
                     KERN_COMM_MAX_RANKS);
        return NULL;
    }
    kern_comm *c = calloc(1, sizeof(*c));
    if (!c) {
        say(err, errlen, KERN_COMM_E_NOMEM, "communicator: out of memory");
        return NULL;
    }
    c->kind = kind;
    c->n = n_ranks;
    c->timeout_ms = KERN_COMM_DEFAULT_TIMEOUT_MS;
    return c;
}

kern_comm *kern_comm_create_threads(int n_ranks, char *err, size_t errlen)
{
    kern_comm *c = comm_alloc(KERN_COMM_THREADS, n_ranks, err, errlen);
    if (!c)
        return NULL;
    pthread_condattr_t ca;
    bool ok = pthread_condattr_init(&ca) == 0;
    if (ok) {
        ok = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0 &&
             pthread_cond_init(&c->cv, &ca) == 0;
        pthread_condattr_destroy(&ca);
    }
    if (ok && pthread_mutex_init(&c->mu, NULL) != 0) {
        pthread_cond_destroy(&c->cv);
        ok = false;
    }
    if (!ok) {
        free(c);
        say(err, errlen, KERN_COMM_E_NOMEM, "communicator: cannot create its mutex");
        return NULL;
    }
    return c;
}

kern_comm *kern_comm_create_nccl(const int *devices, int n_ranks, char *err, size_t errlen)
{
#ifdef SIEVE_HAVE_NCCL
    if (!devices) {
        say(err, errlen, KERN_COMM_E_ARG, "NCCL communicator: devices is NULL");
        return NULL;
    }
    kern_comm *c = comm_alloc(KERN_COMM_NCCL, n_ranks, err, errlen);
    if (!c)
        return NULL;
    c->nccl = kern_nccl_create(devices, n_ranks, c->timeout_ms, err, errlen);
    if (!c->nccl) {
        free(c);
        return NULL;
    }
    return c;
#else
    (void)devices;
    (void)n_ranks;
    say(err, errlen, KERN_COMM_E_NOSYS,
        "NCCL communicator: this binary was built without NCCL (SIEVE_HAVE_NCCL)");
    return NULL;
#endif
}

void kern_comm_destroy(kern_comm *c)
{
    if (!c)
        return;
    if (c->kind == KERN_COMM_THREADS) {
        pthread_cond_destroy(&c->cv);
        pthread_mutex_destroy(&c->mu);
    }
#ifdef SIEVE_HAVE_NCCL
    if (c->nccl)
        kern_nccl_destroy(c->nccl);
#endif
    free(c);
}

int kern_comm_size(const kern_comm *c)
{
    return c ? c->n : 0;
}

kern_comm_kind kern_comm_get_kind(const kern_comm *c)
{
    return c->kind;
}

void kern_comm_set_timeout_ms(kern_comm *c, int ms)
{
    if (c)
        c->timeout_ms = ms > 0 ? ms : KERN_COMM_DEFAULT_TIMEOUT_MS;
}

/* ---- threads ---- */

static struct timespec deadline_after(int ms)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

/* Returns when all ranks have arrived; KERN_COMM_E_TIMEOUT for the rank
 * whose wait ran out (it breaks the communicator), KERN_COMM_E_BROKEN for
 * the others. Caller holds nothing. */
static int barrier_wait(kern_comm *c, int rank, char *err, size_t errlen)
{
    pthread_mutex_lock(&c->mu);
    if (c->broken) {
        say(err, errlen, KERN_COMM_E_BROKEN, c->broken_msg);
        pthread_mutex_unlock(&c->mu);
        return KERN_COMM_E_BROKEN;
    }
    const unsigned long gen = c->gen;
    if (++c->arrived == c->n) {
        c->arrived = 0;
        c->gen++;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    const struct timespec deadline = deadline_after(c->timeout_ms);
    int rc = 0;
    while (gen == c->gen && !c->broken) {
        if (pthread_cond_timedwait(&c->cv, &c->mu, &deadline) == ETIMEDOUT && gen == c->gen &&
            !c->broken) {
            c->broken = true;
            snprintf(c->broken_msg, sizeof(c->broken_msg),
                     "all-reduce: rank %d waited %d ms and only %d of %d ranks arrived", rank,
                     c->timeout_ms, c->arrived, c->n);
            pthread_cond_broadcast(&c->cv);
            rc = KERN_COMM_E_TIMEOUT;
        }
    }
    if (gen == c->gen) {
        say(err, errlen, rc ? rc : KERN_COMM_E_BROKEN, c->broken_msg);
        if (!rc)
            rc = KERN_COMM_E_BROKEN;
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* Elements [lo, hi) of every rank's buffer become their sum in rank order. */
static void sum_slice(float *const *bufs, int n_ranks, size_t lo, size_t hi)
{
    float tile[SUM_CHUNK];
    for (size_t i0 = lo; i0 < hi; i0 += SUM_CHUNK) {
        const size_t len = hi - i0 < SUM_CHUNK ? hi - i0 : SUM_CHUNK;
        memcpy(tile, bufs[0] + i0, len * sizeof(float));
        for (int r = 1; r < n_ranks; r++) {
            const float *b = bufs[r] + i0;
            for (size_t i = 0; i < len; i++)
                tile[i] += b[i];
        }
        for (int r = 0; r < n_ranks; r++)
            memcpy(bufs[r] + i0, tile, len * sizeof(float));
    }
}

static int threads_allreduce(kern_comm *c, int rank, float *buf, size_t n, char *err, size_t errlen)
{
    c->bufs[rank] = buf;
    c->sizes[rank] = n;
    int rc = barrier_wait(c, rank, err, errlen);
    if (rc)
        return rc;
    int odd = -1;
    for (int r = 1; r < c->n && odd < 0; r++)
        if (c->sizes[r] != c->sizes[0])
            odd = r;
    size_t n0 = c->sizes[0], n_odd = odd >= 0 ? c->sizes[odd] : 0;
    if (odd < 0) {
        /* Split by a 64-bit product: n * rank fits for any buffer that fits memory. */
        const size_t lo = n * (size_t)rank / (size_t)c->n;
        const size_t hi = n * (size_t)(rank + 1) / (size_t)c->n;
        sum_slice(c->bufs, c->n, lo, hi);
    }
    rc = barrier_wait(c, rank, err, errlen);
    if (rc)
        return rc;
    if (odd >= 0) {
        if (err && errlen)
            snprintf(err, errlen, "all-reduce: rank %d passed %zu elements, rank 0 passed %zu", odd,
                     n_odd, n0);
        return KERN_COMM_E_ARG;
    }
    return 0;
}

static int check_call(const kern_comm *c, int rank, const void *buf, size_t n, char *err,
                      size_t errlen)
{
    if (!c)
        return say(err, errlen, KERN_COMM_E_ARG, "all-reduce: communicator is NULL");
    if (rank < 0 || rank >= c->n) {
        if (err && errlen)
            snprintf(err, errlen, "all-reduce: rank %d of a communicator of %d", rank, c->n);
        return KERN_COMM_E_ARG;
    }
    if (n > 0 && !buf)
        return say(err, errlen, KERN_COMM_E_ARG, "all-reduce: buffer is NULL");
    return 0;
}

int kern_comm_allreduce_sum_f32(kern_comm *c, int rank, float *buf, size_t n, char *err,
                                size_t errlen)
{
    int rc = check_call(c, rank, buf, n, err, errlen);
    if (rc)
        return rc;
#ifdef SIEVE_HAVE_NCCL
    if (c->kind == KERN_COMM_NCCL)
        return kern_nccl_allreduce_sum_f32(c->nccl, rank, buf, n, c->timeout_ms, err, errlen);
#endif
    if (c->n == 1)
        return 0;
    return threads_allreduce(c, rank, buf, n, err, errlen);
}

int kern_comm_barrier(kern_comm *c, int rank, char *err, size_t errlen)
{
    int rc = check_call(c, rank, NULL, 0, err, errlen);
    if (rc || c->kind != KERN_COMM_THREADS || c->n == 1)
        return rc;
    return barrier_wait(c, rank, err, errlen);
}
