/*
 * sampler.c - greedy and stochastic token choice (see sampler.h for the order
 * of the filters). The generator is splitmix64: tiny state, good statistics,
 * and identical streams on every platform for a given seed.
 */
#include "runtime/sampler.h"

#include <math.h>
#include <stdlib.h>

void rt_sampling_defaults(rt_sampling *p)
{
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->seed = 0;
}

int rt_sampler_init(rt_sampler *s, const rt_sampling *p, int n_vocab)
{
    s->p = *p;
    s->rng = p->seed;
    s->n_vocab = n_vocab;
    s->cand = malloc(sizeof(rt_candidate) * (size_t)n_vocab);
    return s->cand ? 0 : -1;
}

void rt_sampler_free(rt_sampler *s)
{
    free(s->cand);
    s->cand = NULL;
}

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rt_sampler_uniform(rt_sampler *s) { return (double)(splitmix64(&s->rng) >> 11) * 0x1.0p-53; }

int rt_argmax(const float *logits, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = i;
    return best;
}

/* Descending probability, ascending id on ties: a total order, so the result
 * does not depend on qsort's stability. */
static int cand_cmp(const void *a, const void *b)
{
    const rt_candidate *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return x->id - y->id;
}

int rt_sample(rt_sampler *s, const float *logits)
{
    const int n = s->n_vocab;
    const rt_sampling *p = &s->p;
    if (p->temperature <= 0.0f || p->top_k == 1)
        return rt_argmax(logits, n);

    const float mx = logits[rt_argmax(logits, n)];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        const float e = expf((logits[i] - mx) / p->temperature);
        s->cand[i].id = i;
        s->cand[i].p = e;
        sum += e;
    }
    for (int i = 0; i < n; i++)
        s->cand[i].p = (float)(s->cand[i].p / sum);
    qsort(s->cand, (size_t)n, sizeof(rt_candidate), cand_cmp);

    int keep = n;
    if (p->top_k > 0 && p->top_k < keep)
        keep = p->top_k;
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        for (int i = 0; i < keep; i++) {
            cum += s->cand[i].p;
            if (cum >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    if (p->min_p > 0.0f) {
        const float floor_p = p->min_p * s->cand[0].p;
        int k = 1;
        while (k < keep && s->cand[k].p >= floor_p)
            k++;
        keep = k;
    }
    double total = 0.0;
    for (int i = 0; i < keep; i++)
        total += s->cand[i].p;
    const double r = rt_sampler_uniform(s) * total;
    double cum = 0.0;
    for (int i = 0; i < keep; i++) {
        cum += s->cand[i].p;
        if (r < cum)
            return s->cand[i].id;
    }
    return s->cand[keep - 1].id;
}
