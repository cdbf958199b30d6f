/*
 * sampler.c - greedy and stochastic token choice (see sampler.h for the order
 * of the filters). The generator is splitmix64: tiny state, good statistics,
 * and identical streams on every platform for a given seed.
 */
#include "runtime/sampler.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

void rt_sampling_defaults(rt_sampling *p)
{
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->seed = 0;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->repetition_penalty = 1.0f;
    p->logit_bias = NULL;
    p->n_logit_bias = 0;
}

static bool has_penalties(const rt_sampling *p)
{
    return p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f ||
           p->repetition_penalty != 1.0f;
}

int rt_sampler_init(rt_sampler *s, const rt_sampling *p, int n_vocab)
{
    memset(s, 0, sizeof(*s));
    s->p = *p;
    s->rng = p->seed;
    s->n_vocab = n_vocab;
    s->cand = malloc(sizeof(rt_candidate) * (size_t)n_vocab);
    s->work = malloc(sizeof(float) * (size_t)n_vocab);
    bool ok = s->cand && s->work;
    if (ok && has_penalties(p)) {
        s->counts = calloc((size_t)n_vocab, sizeof(uint32_t));
        s->seen = calloc((size_t)n_vocab, 1);
        ok = s->counts && s->seen;
    }
    if (ok && p->n_logit_bias > 0) {
        s->bias = malloc(sizeof(rt_logit_bias) * (size_t)p->n_logit_bias);
        ok = s->bias != NULL;
        if (ok)
            memcpy(s->bias, p->logit_bias, sizeof(rt_logit_bias) * (size_t)p->n_logit_bias);
    }
    s->p.logit_bias = s->bias;
    if (!ok) {
        rt_sampler_free(s);
        return -1;
    }
    return 0;
}

void rt_sampler_free(rt_sampler *s)
{
    free(s->cand);
    free(s->work);
    free(s->counts);
    free(s->seen);
    free(s->bias);
    s->cand = NULL;
    s->work = NULL;
    s->counts = NULL;
    s->seen = NULL;
    s->bias = NULL;
}

void rt_sampler_set_prompt(rt_sampler *s, const int32_t *tokens, int n)
{
    if (!s->seen)
        return;
    for (int i = 0; i < n; i++)
        if (tokens[i] >= 0 && tokens[i] < s->n_vocab)
            s->seen[tokens[i]] = 1;
}

void rt_sampler_accept(rt_sampler *s, int32_t token)
{
    if (!s->counts || token < 0 || token >= s->n_vocab)
        return;
    s->counts[token]++;
    s->seen[token] = 1;
}

/* logit_bias and the penalties, into s->work; returns the logits to sample. */
static const float *process_logits(rt_sampler *s, const float *logits)
{
    const rt_sampling *p = &s->p;
    if (!s->counts && p->n_logit_bias == 0)
        return logits;
    memcpy(s->work, logits, sizeof(float) * (size_t)s->n_vocab);
    float *w = s->work;
    for (int i = 0; i < p->n_logit_bias; i++) {
        const int32_t id = p->logit_bias[i].id;
        if (id >= 0 && id < s->n_vocab)
            w[id] += p->logit_bias[i].bias;
    }
    if (s->counts) {
        const float rp = p->repetition_penalty;
        for (int i = 0; i < s->n_vocab; i++) {
            if (s->seen[i] && rp != 1.0f)
                w[i] = w[i] > 0.0f ? w[i] / rp : w[i] * rp;
            if (s->counts[i])
                w[i] -= (float)s->counts[i] * p->frequency_penalty + p->presence_penalty;
        }
    }
    return w;
}

float rt_logprobs(const float *logits, int n_vocab, int32_t token, int top_n, int32_t *top_ids,
                  float *top_lps)
{
    float mx = logits[0];
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > mx)
            mx = logits[i];
    double sum = 0.0;
    for (int i = 0; i < n_vocab; i++)
        sum += exp((double)(logits[i] - mx));
    const double lse = (double)mx + log(sum);
    /* Insertion into a sorted list of top_n: top_n is small (<= 20). */
    int have = 0;
    for (int i = 0; i < n_vocab && top_n > 0; i++) {
        const float v = logits[i];
        if (have == top_n && !(v > logits[top_ids[have - 1]]))
            continue;
        int k = have < top_n ? have++ : top_n - 1;
        while (k > 0 && v > logits[top_ids[k - 1]]) {
            top_ids[k] = top_ids[k - 1];
            k--;
        }
        top_ids[k] = i;
    }
    for (int k = 0; k < have; k++)
        top_lps[k] = (float)((double)logits[top_ids[k]] - lse);
    return (float)((double)logits[token] - lse);
}

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rt_sampler_uniform(rt_sampler *s)
{
    return (double)(splitmix64(&s->rng) >> 11) * 0x1.0p-53;
}

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
    logits = process_logits(s, logits);
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
