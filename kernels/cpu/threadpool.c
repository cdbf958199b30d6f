/*
 * threadpool.c - the fixed pool of compute workers used inside a forward step.
 *
 * One job at a time: kern_pool_run publishes (fn, ctx, n_tasks) under a new
 * generation number, workers and the caller claim task indices from an atomic
 * counter, and the caller waits until every task has finished. Workers spin
 * briefly before sleeping because a decode step issues many small jobs back to
 * back and a condition-variable wake-up costs more than the job itself.
 */
#include "kernels/kernels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#define SPIN_ITERS 20000

struct kern_pool {
    int n_threads; /* including the caller */
    pthread_t *workers;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    atomic_uint generation;  /* bumped once per job */
    _Atomic uint64_t ticket; /* generation << 32 | next task index */
    atomic_int done_tasks;
    atomic_bool stop;
    kern_task_fn fn;
    void *ctx;
    int n_tasks;
};

/* Claims and runs tasks of job `gen` until none is left. The ticket packs the
 * job's generation with the next task index, so a worker that arrives late
 * can never claim an index of a newer job under an older job's fn. */
static void drain_tasks(kern_pool *p, unsigned gen)
{
    for (;;) {
        uint64_t t = atomic_load_explicit(&p->ticket, memory_order_acquire);
        do {
            if ((unsigned)(t >> 32) != gen || (uint32_t)t >= (uint32_t)p->n_tasks)
                return;
        } while (!atomic_compare_exchange_weak_explicit(&p->ticket, &t, t + 1, memory_order_acq_rel,
                                                        memory_order_acquire));
        p->fn(p->ctx, (int)(uint32_t)t, p->n_tasks);
        atomic_fetch_add_explicit(&p->done_tasks, 1, memory_order_release);
    }
}

static void *worker_main(void *arg)
{
    kern_pool *p = arg;
    unsigned seen = atomic_load(&p->generation);
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
               !atomic_load(&p->stop)) {
            if (++spins < SPIN_ITERS)
                continue;
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop))
            return NULL;
        seen = gen;
        drain_tasks(p, gen);
    }
}

kern_pool *kern_pool_create(int n_threads)
{
    if (n_threads < 1)
        n_threads = 1;
    kern_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    atomic_init(&p->generation, 0);
    atomic_init(&p->ticket, 0);
    atomic_init(&p->done_tasks, 0);
    atomic_init(&p->stop, false);
    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof(pthread_t));
        if (!p->workers) {
            free(p);
            return NULL;
        }
        for (int i = 0; i < n_threads - 1; i++) {
            if (pthread_create(&p->workers[i], NULL, worker_main, p) != 0) {
                p->n_threads = i + 1; /* only the started ones are joined */
                break;
            }
        }
    }
    return p;
}

void kern_pool_destroy(kern_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, true);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_threads - 1; i++)
        pthread_join(p->workers[i], NULL);
    free(p->workers);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    free(p);
}

int kern_pool_size(const kern_pool *p)
{
    return p ? p->n_threads : 1;
}

void kern_pool_run(kern_pool *p, kern_task_fn fn, void *ctx, int n_tasks)
{
    if (n_tasks <= 0)
        return;
    if (!p || p->n_threads == 1 || n_tasks == 1) {
        for (int i = 0; i < n_tasks; i++)
            fn(ctx, i, n_tasks);
        return;
    }
    /* Close the previous job's ticket first: a worker still draining it must
     * not see this job's larger n_tasks next to its old ticket. */
    const unsigned old_gen = atomic_load(&p->generation);
    atomic_store(&p->ticket, ((uint64_t)old_gen << 32) | UINT32_MAX);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->done_tasks, 0, memory_order_relaxed);
    unsigned gen = old_gen + 1;
    atomic_store_explicit(&p->ticket, (uint64_t)gen << 32, memory_order_release);
    pthread_mutex_lock(&p->mu);
    atomic_store_explicit(&p->generation, gen, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    drain_tasks(p, gen);
    while (atomic_load_explicit(&p->done_tasks, memory_order_acquire) < n_tasks)
        ;
}
