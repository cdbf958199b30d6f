/*
 * sampler.h - picks the next token from logits.
 *
 * temperature 0 (or top_k 1) is greedy: the highest logit, ties to the lowest
 * id. Otherwise: logits / temperature -> softmax -> top_k -> top_p -> min_p ->
 * renormalize -> one draw from a per-request generator seeded by `seed`, so
 * the same request with the same seed gives the same tokens.
 */
#ifndef SIEVE_RUNTIME_SAMPLER_H
#define SIEVE_RUNTIME_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    float temperature; /* >= 0; 0 = greedy */
    int top_k;         /* <= 0 = off */
    float top_p;       /* (0, 1]; 1 = off */
    float min_p;       /* [0, 1]; 0 = off */
    uint64_t seed;
} rt_sampling;

typedef struct {
    int id;
    float p;
} rt_candidate;

typedef struct {
    rt_sampling p;
    uint64_t rng;
    int n_vocab;
    rt_candidate *cand; /* n_vocab entries */
} rt_sampler;

/* Neutral parameters: temperature 1, no filters, seed 0. */
void rt_sampling_defaults(rt_sampling *p);

int rt_sampler_init(rt_sampler *s, const rt_sampling *p, int n_vocab);
void rt_sampler_free(rt_sampler *s);

/* Returns the chosen token id. */
int rt_sample(rt_sampler *s, const float *logits);

/* Greedy choice: the index of the largest logit, the lowest on ties. */
int rt_argmax(const float *logits, int n);

/* The generator's next value in [0, 1); exposed for tests. */
double rt_sampler_uniform(rt_sampler *s);

#endif
