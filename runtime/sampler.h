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
    int32_t id;
    float bias; /* added to the logit; -100 bans, +100 forces in practice */
} rt_logit_bias;

#define RT_MAX_LOGIT_BIAS 1024

typedef struct {
    float temperature; /* >= 0; 0 = greedy */
    int top_k;         /* <= 0 = off */
    float top_p;       /* (0, 1]; 1 = off */
    float min_p;       /* [0, 1]; 0 = off */
    uint64_t seed;
    /* OpenAI's penalties on generated tokens: logit -= count * frequency +
     * (count > 0) * presence. 0 = off. */
    float presence_penalty;
    float frequency_penalty;
    /* The CTRL / HF repetition penalty over prompt and generated tokens:
     * positive logits divided by it, negative ones multiplied. 1 = off. */
    float repetition_penalty;
    const rt_logit_bias *logit_bias; /* copied by rt_sampler_init */
    int n_logit_bias;
} rt_sampling;

typedef struct {
    int id;
    float p;
} rt_candidate;

typedef struct {
    rt_sampling p;
    uint64_t rng;
    int n_vocab;
    rt_candidate *cand;  /* n_vocab entries */
    float *work;         /* n_vocab processed logits */
    uint32_t *counts;    /* generated-token counts (penalties), or NULL */
    uint8_t *seen;       /* prompt or generated (repetition penalty), or NULL */
    rt_logit_bias *bias; /* owned copy */
} rt_sampler;

/* Neutral parameters: temperature 1, no filters, seed 0. */
void rt_sampling_defaults(rt_sampling *p);

int rt_sampler_init(rt_sampler *s, const rt_sampling *p, int n_vocab);
void rt_sampler_free(rt_sampler *s);

/* Marks the prompt's tokens for the repetition penalty. */
void rt_sampler_set_prompt(rt_sampler *s, const int32_t *tokens, int n);
/* Records a generated token for the penalties. */
void rt_sampler_accept(rt_sampler *s, int32_t token);

/* Returns the chosen token id: logit_bias, penalties, then greedy or the
 * temperature / top_k / top_p / min_p draw. logits is not modified. */
int rt_sample(rt_sampler *s, const float *logits);

/* Log-probability of `token` under softmax(logits) (the model's raw
 * distribution), and the top_n most likely tokens with theirs, best first,
 * ties to the lower id. top_ids / top_lps hold top_n entries (top_n may be 0). */
float rt_logprobs(const float *logits, int n_vocab, int32_t token, int top_n, int32_t *top_ids,
                  float *top_lps);

/* Greedy choice: the index of the largest logit, the lowest on ties. */
int rt_argmax(const float *logits, int n);

/* The generator's next value in [0, 1); exposed for tests. */
double rt_sampler_uniform(rt_sampler *s);

#endif
