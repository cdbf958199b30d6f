/*
 * test_scheduler.c - unit tests for scheduler/scheduler.c in manual mode: chunked
 * prefill, decodes before prefill, the running-sequence limit, priority and
 * arrival order, preemption and recomputation, prefix caching, n > 1 siblings,
 * cancellation, admission refusals, stop conditions, forward failures, and a
 * randomized soak against solo runs.
 *
 * The engine runs over a fake forward pass. The fake keeps its own "KV cache":
 * one token id per pool slot, written through the block table of each batch
 * entry, and it computes the next token from a hash of the whole sequence as it
 * reads it back through that block table. So a token is only right when every
 * earlier position sits in the slot the block table says (prefix hits,
 * preemption and recomputation included), and a sequence's tokens depend on its
 * content alone: a request produces the same tokens whether it runs alone or
 * among others, preempted or not. The real tiny model is loaded only to create
 * KV pools of the wanted geometry (the engine asks the pool for it).
 *
 * Geometry throughout: vocabulary 32, EOS 1, generated tokens 3 .. 15 (never
 * EOS unless a test makes the fake prefer it), prompt tokens 3 .. 31.
 *
 * A failing assertion longjmps out of its test, so a failing test leaks its
 * engine under valgrind; passing tests free everything.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/model.h"
#include "runtime/sampler.h"
#include "scheduler/scheduler.h"
#include "tests/common/testutil.h"

#define N_VOCAB 32
#define EOS 1
#define RULE_FIRST 3
#define RULE_SPAN 13
#define MAX_SEQ 512
#define MAX_ENTRIES 32
#define FAIL_MSG "fake forward failed on purpose"

static rt_model *g_model;

/* ---- the fake forward pass ---- */

typedef struct {
    int n_past, n_tokens;
    bool logits;
} seen_entry;

typedef struct {
    int n_blocks, bs, max_batch_tokens;
    rt_kv_pool *pool;
    int32_t *store; /* n_blocks * bs slots, -1 = never written */
    int *stamp;     /* call number that last wrote each slot (overlap check) */
    bool prefer_eos;
    int fail_on_call; /* 1-based call that returns -1; 0: never */
    int calls;
    seen_entry seen[MAX_ENTRIES];
    int n_seen;
    char bad[256]; /* first broken expectation, "" while none */
} fake;

/* The next token after seq[0 .. n): FNV-1a of the sequence, folded into the
 * generated range. Depends on content only, never on scheduling. */
static int32_t rule_token(const int32_t *seq, int n)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++) {
        h ^= (uint32_t)seq[i];
        h *= 16777619u;
    }
    return (int32_t)(RULE_FIRST + (int32_t)(h % RULE_SPAN));
}

static void fake_bad(fake *f, const char *what, int entry, int pos)
{
    if (!f->bad[0])
        snprintf(f->bad, sizeof(f->bad), "call %d entry %d pos %d: %s", f->calls, entry, pos, what);
}

static int fake_forward(void *ctx, rt_seq_batch *seqs, int n_seqs, char *err, size_t errlen)
{
    fake *f = ctx;
    f->calls++;
    f->n_seen = 0;
    if (f->fail_on_call == f->calls) {
        snprintf(err, errlen, "%s", FAIL_MSG);
        return -1;
    }
    int total = 0;
    for (int i = 0; i < n_seqs; i++)
        total += seqs[i].n_tokens;
    if (total > f->max_batch_tokens)
        fake_bad(f, "batch exceeds max_batch_tokens", -1, total);
    for (int i = 0; i < n_seqs; i++) {
        const rt_seq_batch *s = &seqs[i];
        if (i < MAX_ENTRIES)
            f->seen[f->n_seen++] =
                (seen_entry){.n_past = s->n_past, .n_tokens = s->n_tokens, .logits = s->logits};
        const int end = s->n_past + s->n_tokens;
        if (s->pool != f->pool || s->kv || s->n_tokens < 1 || s->n_past < 0 || end > MAX_SEQ ||
            (long)s->n_blocks * f->bs < end) {
            fake_bad(f, "entry shape", i, end);
            continue;
        }
        for (int b = 0; b < s->n_blocks; b++)
            if (s->blocks[b] < 0 || s->blocks[b] >= f->n_blocks)
                fake_bad(f, "block id out of range", i, b);
        if (f->bad[0])
            continue;
        for (int j = 0; j < s->n_tokens; j++) {
            const int pos = s->n_past + j;
            const int slot = s->blocks[pos / f->bs] * f->bs + pos % f->bs;
            if (f->stamp[slot] == f->calls)
                fake_bad(f, "two entries write the same slot", i, pos);
            f->stamp[slot] = f->calls;
            f->store[slot] = s->tokens[j];
        }
        if (!s->logits)
            continue;
        int32_t seq[MAX_SEQ];
        for (int pos = 0; pos < end; pos++) {
            seq[pos] = f->store[s->blocks[pos / f->bs] * f->bs + pos % f->bs];
            if (seq[pos] < 0)
                fake_bad(f, "reads a slot never written", i, pos);
        }
        for (int v = 0; v < N_VOCAB; v++)
            s->logits[v] = 0.0f;
        s->logits[rule_token(seq, end)] = 5.0f;
        if (f->prefer_eos)
            s->logits[EOS] = 10.0f;
    }
    return 0;
}

/* ---- the bench: a pool, a fake and an engine in manual mode ---- */

/* Pool blocks, block size (0: 4), max_batch_tokens, max_running_seqs,
 * max_waiting (0: 8), n_ctx and prefix caching. */
typedef struct {
    int blocks, bs, batch, running, waiting, ctx;
    bool prefix;
} bench_cfg;

typedef struct {
    fake fk;
    sched_engine *e;
} bench;

static void bench_open(bench *b, const bench_cfg *c)
{
    memset(b, 0, sizeof(*b));
    const int bs = c->bs > 0 ? c->bs : 4;
    const int slots = c->blocks * bs;
    b->fk.n_blocks = c->blocks;
    b->fk.bs = bs;
    b->fk.max_batch_tokens = c->batch;
    b->fk.pool = rt_kv_pool_create(g_model, c->blocks, bs);
    assert_non_null(b->fk.pool);
    b->fk.store = malloc(sizeof(int32_t) * (size_t)slots);
    b->fk.stamp = calloc((size_t)slots, sizeof(int));
    assert_non_null(b->fk.store);
    assert_non_null(b->fk.stamp);
    for (int i = 0; i < slots; i++)
        b->fk.store[i] = -1;
    const sched_opts o = {
        .max_running_seqs = c->running,
        .max_waiting = c->waiting > 0 ? c->waiting : 8,
        .max_batch_tokens = c->batch,
        .prefix_caching = c->prefix,
        .manual = true,
        .forward = fake_forward,
        .forward_ctx = &b->fk,
        .pool = b->fk.pool,
        .n_vocab = N_VOCAB,
        .n_ctx = c->ctx,
        .eos = EOS,
    };
    char err[256] = "";
    b->e = sched_engine_create(NULL, &o, err, sizeof(err));
    if (!b->e)
        fail_msg("sched_engine_create: %s", err);
}

static void bench_close(bench *b)
{
    sched_engine_destroy(b->e);
    rt_kv_pool_destroy(b->fk.pool);
    free(b->fk.store);
    free(b->fk.stamp);
}

static void assert_fake_clean(const fake *f)
{
    if (f->bad[0])
        fail_msg("fake forward saw a bad batch: %s", f->bad);
}

/* ---- requests ---- */

typedef struct {
    int calls, finished, calls_after_finish;
} note;

static void on_notify(sched_request *r, bool finished, void *user)
{
    (void)r;
    note *n = user;
    if (n->finished)
        n->calls_after_finish++;
    n->calls++;
    if (finished)
        n->finished++;
}

typedef struct {
    int max_tokens, priority, min_tokens, logprobs;
    bool ignore_eos;
    double timeout_s;
} req_cfg;

static sched_request *req_open(const int32_t *prompt, int n_prompt, const req_cfg *c, note *nt)
{
    sched_params p = {
        .prompt = (int32_t *)prompt,
        .n_prompt = n_prompt,
        .max_tokens = c->max_tokens,
        .ignore_eos = c->ignore_eos,
        .min_tokens = c->min_tokens,
        .logprobs = c->logprobs,
        .priority = c->priority,
        .timeout_s = c->timeout_s,
    };
    rt_sampling_defaults(&p.sampling);
    p.sampling.temperature = 0.0f;
    sched_request *r = sched_request_create(&p, on_notify, nt);
    assert_non_null(r);
    return r;
}

/* A plain greedy request without logprobs. */
static sched_request *req_simple(const int32_t *prompt, int n_prompt, int max_tokens, int priority,
                                 note *nt)
{
    const req_cfg c = {.max_tokens = max_tokens, .priority = priority, .logprobs = -1};
    return req_open(prompt, n_prompt, &c, nt);
}

/* Distinct prompts: tokens drawn from 3 .. 31 by a small generator. */
static void make_prompt(int32_t *out, int n, uint32_t seed)
{
    uint32_t x = seed * 2654435761u + 1u;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        out[i] = (int32_t)(3 + (x >> 16) % 29);
    }
}

/* What a request produces alone: the rule applied to its growing sequence. */
static void reference_tokens(const int32_t *prompt, int n_prompt, int n_gen, int32_t *out)
{
    int32_t seq[MAX_SEQ];
    memcpy(seq, prompt, sizeof(int32_t) * (size_t)n_prompt);
    for (int i = 0; i < n_gen; i++) {
        out[i] = rule_token(seq, n_prompt + i);
        seq[n_prompt + i] = out[i];
    }
}

static sched_output output_of(sched_request *r)
{
    sched_output o;
    assert_int_equal(sched_request_output(r, 0, &o), 0);
    free(o.text);
    o.text = NULL;
    return o;
}

static void assert_tokens_are_reference(sched_request *r, const int32_t *prompt, int n_prompt,
                                        int n_gen)
{
    int32_t want[MAX_SEQ];
    reference_tokens(prompt, n_prompt, n_gen, want);
    const sched_output o = output_of(r);
    assert_int_equal(o.n_tokens, n_gen);
    assert_memory_equal(o.tokens, want, sizeof(int32_t) * (size_t)n_gen);
}

static void assert_finished(sched_request *r, sched_finish why, int n_tokens)
{
    const sched_output o = output_of(r);
    assert_int_equal(o.finish, why);
    assert_int_equal(o.n_tokens, n_tokens);
}

static void assert_notified_once(const note *n)
{
    assert_int_equal(n->finished, 1);
    assert_int_equal(n->calls_after_finish, 0);
}

/* ---- expected batches ---- */

typedef struct {
    sched_request *r;
    int n_tokens, n_past;
    bool logits;
} entry;

/* Runs one step and checks the batch it ran, entry by entry, in order. */
static void step_expect(bench *b, int n, const entry *want)
{
    b->fk.n_seen = 0;
    assert_int_equal(sched_engine_step(b->e), n);
    assert_fake_clean(&b->fk);
    sched_request *reqs[MAX_ENTRIES];
    int nt[MAX_ENTRIES];
    assert_int_equal(sched_engine_last_batch(b->e, reqs, nt, MAX_ENTRIES), n);
    assert_int_equal(b->fk.n_seen, n);
    for (int i = 0; i < n; i++) {
        assert_ptr_equal(reqs[i], want[i].r);
        assert_int_equal(nt[i], want[i].n_tokens);
        assert_int_equal(b->fk.seen[i].n_tokens, want[i].n_tokens);
        assert_int_equal(b->fk.seen[i].n_past, want[i].n_past);
        assert_int_equal(b->fk.seen[i].logits, want[i].logits);
    }
}

static int step_checked(bench *b)
{
    b->fk.n_seen = 0;
    const int n = sched_engine_step(b->e);
    assert_fake_clean(&b->fk);
    return n;
}

static bool is_finished(sched_request *r)
{
    return output_of(r).finish != SCHED_FINISH_NONE;
}

/* Steps until r finishes; returns the steps taken. */
static int run_until_finished(bench *b, sched_request *r, int max_steps)
{
    int steps = 0;
    while (!is_finished(r)) {
        assert_true(steps < max_steps);
        step_checked(b);
        steps++;
    }
    return steps;
}

static sched_stats stats_of(bench *b)
{
    sched_stats s;
    sched_engine_stats(b->e, &s);
    return s;
}

/* ---- 1. chunked prefill ---- */

static void test_sched_chunked_prefill_splits_prompt_and_samples_after_last_chunk(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 16, .batch = 8, .running = 4, .ctx = 64});
    int32_t prompt[20];
    make_prompt(prompt, 20, 1);
    note nt = {0};
    sched_request *r = req_simple(prompt, 20, 4, 0, &nt);
    assert_int_equal(sched_submit(b.e, r), SCHED_OK);

    step_expect(&b, 1, (entry[]){{r, 8, 0, false}});
    assert_int_equal(sched_request_n_computed(r), 8);
    assert_int_equal(output_of(r).n_tokens, 0);
    assert_int_equal(nt.calls, 0);
    step_expect(&b, 1, (entry[]){{r, 8, 8, false}});
    assert_int_equal(sched_request_n_computed(r), 16);
    assert_int_equal(output_of(r).n_tokens, 0);
    step_expect(&b, 1, (entry[]){{r, 4, 16, true}});
    assert_int_equal(sched_request_n_computed(r), 20);
    assert_int_equal(output_of(r).n_tokens, 1);
    assert_int_equal(nt.calls, 1);
    for (int i = 0; i < 3; i++) {
        step_expect(&b, 1, (entry[]){{r, 1, 20 + i, true}});
        assert_int_equal(output_of(r).n_tokens, 2 + i);
    }
    assert_finished(r, SCHED_FINISH_LENGTH, 4);
    assert_tokens_are_reference(r, prompt, 20, 4);
    assert_notified_once(&nt);
    assert_int_equal(nt.calls, 4);
    step_expect(&b, 0, NULL);

    const sched_stats s = stats_of(&b);
    assert_int_equal(s.prompt_tokens, 20);
    assert_int_equal(s.requests_finished, 1);
    assert_int_equal(s.finished_by_reason[SCHED_FINISH_LENGTH], 1);
    assert_int_equal(s.steps, 6);
    assert_int_equal(s.kv_blocks_used, 0);
    sched_request_release(r);
    bench_close(&b);
}

/* ---- 2. decodes first ---- */

static void test_sched_decodes_run_every_step_and_prefill_takes_the_rest(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 64, .batch = 8, .running = 4, .ctx = 128});
    int32_t pa[4], pb[4], pc[30];
    make_prompt(pa, 4, 2);
    make_prompt(pb, 4, 3);
    make_prompt(pc, 30, 4);
    note na = {0}, nb = {0}, nc = {0};
    sched_request *a = req_simple(pa, 4, 30, 0, &na);
    sched_request *bq = req_simple(pb, 4, 30, 0, &nb);
    sched_request *c = req_simple(pc, 30, 2, 0, &nc);
    assert_int_equal(sched_submit(b.e, a), SCHED_OK);
    assert_int_equal(sched_submit(b.e, bq), SCHED_OK);
    step_expect(&b, 2, (entry[]){{a, 4, 0, true}, {bq, 4, 0, true}});

    assert_int_equal(sched_submit(b.e, c), SCHED_OK);
    step_expect(&b, 3, (entry[]){{a, 1, 4, true}, {bq, 1, 4, true}, {c, 6, 0, false}});
    step_expect(&b, 3, (entry[]){{a, 1, 5, true}, {bq, 1, 5, true}, {c, 6, 6, false}});
    step_expect(&b, 3, (entry[]){{a, 1, 6, true}, {bq, 1, 6, true}, {c, 6, 12, false}});
    step_expect(&b, 3, (entry[]){{a, 1, 7, true}, {bq, 1, 7, true}, {c, 6, 18, false}});
    step_expect(&b, 3, (entry[]){{a, 1, 8, true}, {bq, 1, 8, true}, {c, 6, 24, true}});
    assert_int_equal(output_of(c).n_tokens, 1);
    step_expect(&b, 3, (entry[]){{a, 1, 9, true}, {bq, 1, 9, true}, {c, 1, 30, true}});
    assert_finished(c, SCHED_FINISH_LENGTH, 2);
    assert_tokens_are_reference(c, pc, 30, 2);
    step_expect(&b, 2, (entry[]){{a, 1, 10, true}, {bq, 1, 10, true}});
    /* One token per step for each decoder, none skipped. */
    assert_int_equal(output_of(a).n_tokens, 8);
    assert_int_equal(output_of(bq).n_tokens, 8);

    run_until_finished(&b, a, 100);
    assert_finished(a, SCHED_FINISH_LENGTH, 30);
    assert_finished(bq, SCHED_FINISH_LENGTH, 30);
    assert_tokens_are_reference(a, pa, 4, 30);
    assert_tokens_are_reference(bq, pb, 4, 30);
    assert_notified_once(&na);
    assert_notified_once(&nb);
    assert_notified_once(&nc);
    sched_request_release(a);
    sched_request_release(bq);
    sched_request_release(c);
    bench_close(&b);
}

/* ---- 3. max_running_seqs ---- */

static void test_sched_max_running_seqs_holds_back_until_a_sequence_finishes(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 32, .batch = 16, .running = 2, .ctx = 64});
    int32_t pa[4], pb[4], pc[4];
    make_prompt(pa, 4, 5);
    make_prompt(pb, 4, 6);
    make_prompt(pc, 4, 7);
    note na = {0}, nb = {0}, nc = {0};
    sched_request *a = req_simple(pa, 4, 2, 0, &na);
    sched_request *bq = req_simple(pb, 4, 5, 0, &nb);
    sched_request *c = req_simple(pc, 4, 3, 0, &nc);
    assert_int_equal(sched_submit(b.e, a), SCHED_OK);
    assert_int_equal(sched_submit(b.e, bq), SCHED_OK);
    assert_int_equal(sched_submit(b.e, c), SCHED_OK);

    step_expect(&b, 2, (entry[]){{a, 4, 0, true}, {bq, 4, 0, true}});
    sched_stats s = stats_of(&b);
    assert_int_equal(s.running, 2);
    assert_int_equal(s.waiting, 1);
    assert_int_equal(sched_request_n_computed(c), 0);
    step_expect(&b, 2, (entry[]){{a, 1, 4, true}, {bq, 1, 4, true}});
    assert_finished(a, SCHED_FINISH_LENGTH, 2);
    step_expect(&b, 2, (entry[]){{bq, 1, 5, true}, {c, 4, 0, true}});
    step_expect(&b, 2, (entry[]){{bq, 1, 6, true}, {c, 1, 4, true}});
    step_expect(&b, 2, (entry[]){{bq, 1, 7, true}, {c, 1, 5, true}});
    assert_finished(bq, SCHED_FINISH_LENGTH, 5);
    assert_finished(c, SCHED_FINISH_LENGTH, 3);
    step_expect(&b, 0, NULL);
    assert_tokens_are_reference(a, pa, 4, 2);
    assert_tokens_are_reference(bq, pb, 4, 5);
    assert_tokens_are_reference(c, pc, 4, 3);
    sched_request_release(a);
    sched_request_release(bq);
    sched_request_release(c);
    bench_close(&b);
}

/* ---- 4. priority, then arrival ---- */

static void test_sched_lower_priority_value_runs_first_and_ties_keep_arrival_order(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 32, .batch = 16, .running = 1, .ctx = 64});
    enum { N = 6 };
    static const int prio[N] = {0, 0, -1, 5, -1, -2}; /* A B C D E, then F after one step */
    int32_t prompts[N][4];
    note notes[N] = {{0}};
    sched_request *r[N];
    for (int i = 0; i < N; i++) {
        make_prompt(prompts[i], 4, 10u + (uint32_t)i);
        r[i] = req_simple(prompts[i], 4, 1, prio[i], &notes[i]);
    }
    for (int i = 0; i < 5; i++)
        assert_int_equal(sched_submit(b.e, r[i]), SCHED_OK);
    step_expect(&b, 1, (entry[]){{r[2], 4, 0, true}}); /* C (-1, first) */
    assert_int_equal(sched_submit(b.e, r[5]), SCHED_OK);
    static const int order[] = {5, 4, 0, 1, 3}; /* F (-2), E (-1), A, B (0), D (5) */
    for (int k = 0; k < 5; k++) {
        step_expect(&b, 1, (entry[]){{r[order[k]], 4, 0, true}});
        assert_finished(r[order[k]], SCHED_FINISH_LENGTH, 1);
    }
    step_expect(&b, 0, NULL);
    for (int i = 0; i < N; i++) {
        assert_notified_once(&notes[i]);
        assert_tokens_are_reference(r[i], prompts[i], 4, 1);
        sched_request_release(r[i]);
    }
    bench_close(&b);
}

/* ---- 5. preemption and recomputation ---- */

static const bench_cfg preempt_cfg = {
    .blocks = 8, .batch = 64, .running = 4, .ctx = 64, .prefix = true};

/* Runs one request alone in a fresh engine of the same geometry. */
static void solo_run(const bench_cfg *c, const int32_t *prompt, int n_prompt, int max_tokens,
                     int32_t *out)
{
    bench b;
    bench_open(&b, c);
    note nt = {0};
    sched_request *r = req_simple(prompt, n_prompt, max_tokens, 0, &nt);
    assert_int_equal(sched_submit(b.e, r), SCHED_OK);
    run_until_finished(&b, r, 1000);
    const sched_output o = output_of(r);
    assert_int_equal(o.finish, SCHED_FINISH_LENGTH);
    assert_int_equal(o.n_tokens, max_tokens);
    memcpy(out, o.tokens, sizeof(int32_t) * (size_t)max_tokens);
    assert_int_equal(sched_request_n_preempted(r), 0);
    sched_request_release(r);
    bench_close(&b);
}

static void test_sched_preempts_the_later_sequence_and_recomputes_it_exactly(void **state)
{
    (void)state;
    int32_t pa[8], pb[8], solo_a[20], solo_b[20];
    make_prompt(pa, 8, 20);
    make_prompt(pb, 8, 21);
    solo_run(&preempt_cfg, pa, 8, 20, solo_a);
    solo_run(&preempt_cfg, pb, 8, 20, solo_b);

    bench b;
    bench_open(&b, &preempt_cfg);
    note na = {0}, nb = {0};
    sched_request *a = req_simple(pa, 8, 20, 0, &na);
    sched_request *bq = req_simple(pb, 8, 20, 0, &nb);
    assert_int_equal(sched_submit(b.e, a), SCHED_OK);
    assert_int_equal(sched_submit(b.e, bq), SCHED_OK);

    /* 8 blocks of 4: both prompts (2 blocks each), then one block per 4
     * decoded positions each; position 16 of A finds no free block at step 10. */
    step_expect(&b, 2, (entry[]){{a, 8, 0, true}, {bq, 8, 0, true}});
    for (int s = 2; s <= 9; s++)
        step_expect(&b, 2, (entry[]){{a, 1, 6 + s, true}, {bq, 1, 6 + s, true}});
    assert_int_equal(sched_request_n_preempted(bq), 0);
    assert_int_equal(stats_of(&b).kv_blocks_used, 8);
    step_expect(&b, 1, (entry[]){{a, 1, 16, true}});
    assert_int_equal(sched_request_n_preempted(bq), 1);
    assert_int_equal(sched_request_n_preempted(a), 0);
    assert_int_equal(sched_request_n_computed(bq), 0);
    assert_int_equal(output_of(bq).n_tokens, 9); /* its tokens stay */
    assert_true(stats_of(&b).preemptions >= 1);

    /* B cannot come back while A holds the pool: A runs alone to its end. */
    for (int s = 11; s <= 20; s++)
        step_expect(&b, 1, (entry[]){{a, 1, 6 + s, true}});
    assert_finished(a, SCHED_FINISH_LENGTH, 20);

    /* B returns: its only block still cached is its first (A evicted the
     * others, least recently released first), so it recomputes prompt +
     * generated tokens from position 4, and samples its 10th token. */
    const uint64_t hits_before = stats_of(&b).prefix_hit_tokens;
    step_expect(&b, 1, (entry[]){{bq, 13, 4, true}});
    const sched_stats s = stats_of(&b);
    assert_int_equal(s.prefix_hit_tokens - hits_before, 4);
    assert_int_equal(sched_request_n_computed(bq), 17);
    assert_int_equal(output_of(bq).n_tokens, 10);
    for (int k = 0; k < 10; k++)
        step_expect(&b, 1, (entry[]){{bq, 1, 17 + k, true}});
    assert_finished(bq, SCHED_FINISH_LENGTH, 20);
    step_expect(&b, 0, NULL);

    assert_memory_equal(output_of(a).tokens, solo_a, sizeof(solo_a));
    assert_memory_equal(output_of(bq).tokens, solo_b, sizeof(solo_b));
    assert_tokens_are_reference(a, pa, 8, 20);
    assert_tokens_are_reference(bq, pb, 8, 20);
    assert_notified_once(&na);
    assert_notified_once(&nb);
    assert_int_equal(na.calls, 20);
    assert_int_equal(nb.calls, 20);
    const sched_stats end = stats_of(&b);
    assert_int_equal(end.preemptions, 1);
    assert_int_equal(end.kv_blocks_used, 0);
    assert_int_equal(end.finished_by_reason[SCHED_FINISH_LENGTH], 2);
    sched_request_release(a);
    sched_request_release(bq);
    bench_close(&b);
}

/* ---- 6. prefix caching ---- */

/* A 40-token prompt runs its prefill; then a second request (n2 tokens, sharing the
 * first 40 of p) arrives and its first batch entry must start at want_past. */
static void prefix_case(bool caching, const int32_t *p, int n2, int want_past)
{
    bench b;
    bench_open(&b,
               &(bench_cfg){.blocks = 32, .batch = 64, .running = 4, .ctx = 96, .prefix = caching});
    note na = {0}, nb = {0};
    sched_request *a = req_simple(p, 40, 3, 0, &na);
    assert_int_equal(sched_submit(b.e, a), SCHED_OK);
    step_expect(&b, 1, (entry[]){{a, 40, 0, true}});
    sched_stats s = stats_of(&b);
    assert_int_equal(s.prefix_query_tokens, 40);
    assert_int_equal(s.prefix_hit_tokens, 0);

    sched_request *bq = req_simple(p, n2, 3, 0, &nb);
    assert_int_equal(sched_submit(b.e, bq), SCHED_OK);
    step_expect(&b, 2, (entry[]){{a, 1, 40, true}, {bq, n2 - want_past, want_past, true}});
    s = stats_of(&b);
    assert_int_equal(s.prefix_hit_tokens, (uint64_t)want_past);
    if (caching)
        assert_int_equal(s.prefix_query_tokens, (uint64_t)(40 + n2));
    assert_int_equal(s.prompt_tokens, (uint64_t)(40 + n2 - want_past));
    assert_int_equal(sched_request_n_computed(bq), n2);

    run_until_finished(&b, bq, 10);
    run_until_finished(&b, a, 10);
    assert_tokens_are_reference(a, p, 40, 3);
    assert_tokens_are_reference(bq, p, n2, 3);
    assert_int_equal(stats_of(&b).kv_blocks_used, 0);
    sched_request_release(a);
    sched_request_release(bq);
    bench_close(&b);
}

static void test_sched_prefix_cache_skips_shared_full_blocks(void **state)
{
    (void)state;
    int32_t p[46];
    make_prompt(p, 46, 30);
    /* The same prompt: every block matches, the last is recomputed anyway. */
    prefix_case(true, p, 40, 36);
    /* A longer prompt sharing 40 tokens: all ten blocks of the first hit. */
    prefix_case(true, p, 46, 40);
}

static void test_sched_without_prefix_caching_recomputes_everything(void **state)
{
    (void)state;
    int32_t p[40];
    make_prompt(p, 40, 30);
    prefix_case(false, p, 40, 0);
}

/* ---- 7. n > 1 siblings ---- */

static void test_sched_sibling_waits_for_first_choice_prefill_then_hits_its_blocks(void **state)
{
    (void)state;
    bench b;
    bench_open(&b,
               &(bench_cfg){.blocks = 32, .batch = 16, .running = 4, .ctx = 96, .prefix = true});
    int32_t p[40];
    make_prompt(p, 40, 40);
    note n0 = {0}, n1 = {0};
    sched_request *rs[2] = {req_simple(p, 40, 3, 0, &n0), req_simple(p, 40, 3, 0, &n1)};
    assert_int_equal(sched_submit_many(b.e, rs, 2), SCHED_OK);

    step_expect(&b, 1, (entry[]){{rs[0], 16, 0, false}});
    assert_int_equal(stats_of(&b).running, 1);
    step_expect(&b, 1, (entry[]){{rs[0], 16, 16, false}});
    step_expect(&b, 1, (entry[]){{rs[0], 8, 32, true}});
    step_expect(&b, 2, (entry[]){{rs[0], 1, 40, true}, {rs[1], 4, 36, true}});
    assert_int_equal(stats_of(&b).prefix_hit_tokens, 36);
    step_expect(&b, 2, (entry[]){{rs[0], 1, 41, true}, {rs[1], 1, 40, true}});
    step_expect(&b, 1, (entry[]){{rs[1], 1, 41, true}});
    for (int i = 0; i < 2; i++) {
        assert_finished(rs[i], SCHED_FINISH_LENGTH, 3);
        assert_tokens_are_reference(rs[i], p, 40, 3);
    }
    assert_notified_once(&n0);
    assert_notified_once(&n1);
    assert_int_equal(stats_of(&b).kv_blocks_used, 0);
    sched_request_release(rs[0]);
    sched_request_release(rs[1]);
    bench_close(&b);
}

/* The engine keeps a pointer to the first choice (leader) in every sibling;
 * the creator may drop its reference to a finished choice while another still
 * waits. Run under valgrind, this reads freed memory if the engine does not
 * hold the leader alive. */
static void test_sched_sibling_survives_release_of_its_finished_leader(void **state)
{
    (void)state;
    bench b;
    bench_open(&b,
               &(bench_cfg){.blocks = 32, .batch = 16, .running = 1, .ctx = 96, .prefix = true});
    int32_t p[8];
    make_prompt(p, 8, 41);
    note n0 = {0}, n1 = {0};
    sched_request *rs[2] = {req_simple(p, 8, 2, 0, &n0), req_simple(p, 8, 2, 0, &n1)};
    assert_int_equal(sched_submit_many(b.e, rs, 2), SCHED_OK);
    step_expect(&b, 1, (entry[]){{rs[0], 8, 0, true}});
    step_expect(&b, 1, (entry[]){{rs[0], 1, 8, true}});
    assert_finished(rs[0], SCHED_FINISH_LENGTH, 2);
    sched_request_release(rs[0]);
    step_expect(&b, 1, (entry[]){{rs[1], 4, 4, true}});
    step_expect(&b, 1, (entry[]){{rs[1], 1, 8, true}});
    assert_finished(rs[1], SCHED_FINISH_LENGTH, 2);
    assert_tokens_are_reference(rs[1], p, 8, 2);
    assert_notified_once(&n1);
    sched_request_release(rs[1]);
    bench_close(&b);
}

/* ---- 8. cancellation ---- */

/* A request past its deadline, running or waiting, finishes with TIMEOUT at the
 * next step and gives its blocks back; one without a deadline carries on. */
static void test_sched_deadline_finishes_late_requests(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 16, .batch = 64, .running = 1, .ctx = 64});
    int32_t pa[8], pb[8], pc[8];
    make_prompt(pa, 8, 60);
    make_prompt(pb, 8, 61);
    make_prompt(pc, 8, 62);
    note na = {0}, nb = {0}, nc = {0};
    const req_cfg late = {.max_tokens = 40, .logprobs = -1, .timeout_s = 0.05};
    sched_request *a = req_open(pa, 8, &late, &na);
    sched_request *bq = req_open(pb, 8, &late, &nb);
    sched_request *c = req_simple(pc, 8, 4, 0, &nc);
    assert_int_equal(sched_submit(b.e, a), SCHED_OK);
    assert_int_equal(sched_submit(b.e, bq), SCHED_OK);
    assert_int_equal(sched_submit(b.e, c), SCHED_OK);
    step_expect(&b, 1, (entry[]){{a, 8, 0, true}});
    struct timespec ts = {0, 80 * 1000 * 1000};
    nanosleep(&ts, NULL);
    step_expect(&b, 1, (entry[]){{c, 8, 0, true}}); /* a and bq are dropped first */
    assert_finished(a, SCHED_FINISH_TIMEOUT, 1);
    assert_finished(bq, SCHED_FINISH_TIMEOUT, 0);
    assert_notified_once(&na);
    assert_notified_once(&nb);
    run_until_finished(&b, c, 10);
    assert_finished(c, SCHED_FINISH_LENGTH, 4);
    sched_stats s = stats_of(&b);
    assert_int_equal(s.finished_by_reason[SCHED_FINISH_TIMEOUT], 2);
    assert_int_equal(s.kv_blocks_used, 0);
    sched_request_release(a);
    sched_request_release(bq);
    sched_request_release(c);
    bench_close(&b);
}

static void test_sched_cancel_finishes_running_and_waiting_at_next_step(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 16, .batch = 64, .running = 1, .ctx = 64});
    int32_t pa[8], pb[8], pc[60];
    make_prompt(pa, 8, 50);
    make_prompt(pb, 8, 51);
    make_prompt(pc, 60, 52);
    note na = {0}, nb = {0}, nc = {0};
    sched_request *a = req_simple(pa, 8, 20, 0, &na);
    sched_request *bq = req_simple(pb, 8, 20, 0, &nb);
    assert_int_equal(sched_submit(b.e, a), SCHED_OK);
    assert_int_equal(sched_submit(b.e, bq), SCHED_OK);
    step_expect(&b, 1, (entry[]){{a, 8, 0, true}});
    step_expect(&b, 1, (entry[]){{a, 1, 8, true}});
    assert_int_equal(stats_of(&b).kv_blocks_used, 3);

    sched_request_cancel(a);
    sched_request_cancel(bq);
    sched_request_cancel(a); /* idempotent */
    assert_false(is_finished(a));
    step_expect(&b, 0, NULL);
    assert_finished(a, SCHED_FINISH_CANCELLED, 2);
    assert_finished(bq, SCHED_FINISH_CANCELLED, 0);
    assert_notified_once(&na);
    assert_notified_once(&nb);
    assert_int_equal(na.calls, 3);
    assert_int_equal(nb.calls, 1);
    sched_stats s = stats_of(&b);
    assert_int_equal(s.requests_finished, 2);
    assert_int_equal(s.finished_by_reason[SCHED_FINISH_CANCELLED], 2);
    assert_int_equal(s.kv_blocks_used, 0);
    assert_int_equal(s.running, 0);
    assert_int_equal(s.waiting, 0);

    /* The blocks really are back: a request needing all 16 is admitted. */
    sched_request *c = req_simple(pc, 60, 4, 0, &nc);
    assert_int_equal(sched_submit(b.e, c), SCHED_OK);
    step_expect(&b, 1, (entry[]){{c, 60, 0, true}});
    run_until_finished(&b, c, 10);
    assert_tokens_are_reference(c, pc, 60, 4);
    s = stats_of(&b);
    assert_int_equal(s.kv_blocks_used, 0);
    assert_int_equal(s.finished_by_reason[SCHED_FINISH_LENGTH], 1);
    sched_request_cancel(c); /* after the end: no effect */
    step_expect(&b, 0, NULL);
    assert_finished(c, SCHED_FINISH_LENGTH, 4);
    assert_notified_once(&nc);
    sched_request_release(a);
    sched_request_release(bq);
    sched_request_release(c);
    bench_close(&b);
}

static void test_sched_cancel_all_and_destroy_cancel_everything_outstanding(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 16, .batch = 64, .running = 1, .ctx = 64});
    int32_t p[8];
    make_prompt(p, 8, 60);
    note n[4] = {{0}};
    sched_request *r[4];
    for (int i = 0; i < 4; i++)
        r[i] = req_simple(p, 8, 10, 0, &n[i]);
    assert_int_equal(sched_submit(b.e, r[0]), SCHED_OK);
    assert_int_equal(sched_submit(b.e, r[1]), SCHED_OK);
    step_expect(&b, 1, (entry[]){{r[0], 8, 0, true}});
    sched_engine_cancel_all(b.e);
    step_expect(&b, 0, NULL);
    assert_finished(r[0], SCHED_FINISH_CANCELLED, 1);
    assert_finished(r[1], SCHED_FINISH_CANCELLED, 0);
    assert_notified_once(&n[0]);
    assert_notified_once(&n[1]);
    /* New submits still work after cancel_all; destroy cancels what is left,
     * running (r[2]) and waiting (r[3]). */
    assert_int_equal(sched_submit(b.e, r[2]), SCHED_OK);
    assert_int_equal(sched_submit(b.e, r[3]), SCHED_OK);
    step_expect(&b, 1, (entry[]){{r[2], 8, 0, true}});
    step_expect(&b, 1, (entry[]){{r[2], 1, 8, true}});
    bench_close(&b);
    assert_finished(r[2], SCHED_FINISH_CANCELLED, 2);
    assert_finished(r[3], SCHED_FINISH_CANCELLED, 0);
    assert_notified_once(&n[2]);
    assert_notified_once(&n[3]);
    for (int i = 0; i < 4; i++)
        sched_request_release(r[i]);
}

/* ---- 9. admission refusals ---- */

static void test_sched_submit_refuses_too_long_and_queue_full(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 8, .batch = 64, .running = 1, .waiting = 2, .ctx = 40});
    int32_t p[40];
    make_prompt(p, 40, 70);
    note nt[8] = {{0}};
    /* Beyond n_ctx (40): 30 + 11. */
    sched_request *ctx_long = req_simple(p, 30, 11, 0, &nt[0]);
    assert_int_equal(sched_submit(b.e, ctx_long), SCHED_E_TOO_LONG);
    /* Within n_ctx but beyond the pool's 32 slots: 20 + 13. */
    sched_request *pool_long = req_simple(p, 20, 13, 0, &nt[1]);
    assert_int_equal(sched_submit(b.e, pool_long), SCHED_E_TOO_LONG);
    /* All or none: one too long choice refuses the whole group. */
    sched_request *ok0 = req_simple(p, 4, 2, 0, &nt[2]);
    sched_request *pair[2] = {ok0, pool_long};
    assert_int_equal(sched_submit_many(b.e, pair, 2), SCHED_E_TOO_LONG);
    step_expect(&b, 0, NULL);
    assert_int_equal(stats_of(&b).waiting, 0);

    /* Exactly the pool: 16 + 16 = 32 slots. */
    sched_request *fits = req_simple(p, 16, 16, 0, &nt[3]);
    assert_int_equal(sched_submit(b.e, fits), SCHED_OK);
    /* max_waiting 2 + max_running 1 = 3 outstanding. */
    sched_request *q1 = req_simple(p, 4, 1, 0, &nt[4]);
    sched_request *q2 = req_simple(p, 4, 1, 0, &nt[5]);
    sched_request *q3 = req_simple(p, 4, 1, 0, &nt[6]);
    sched_request *q4 = req_simple(p, 4, 1, 0, &nt[7]);
    sched_request *two[2] = {q1, q2};
    assert_int_equal(sched_submit_many(b.e, two, 2), SCHED_OK);
    assert_int_equal(sched_submit(b.e, q3), SCHED_E_QUEUE_FULL);
    run_until_finished(&b, fits, 100);
    assert_finished(fits, SCHED_FINISH_LENGTH, 16);
    /* One finished: room for one more, not two. */
    sched_request *pair2[2] = {q3, q4};
    assert_int_equal(sched_submit_many(b.e, pair2, 2), SCHED_E_QUEUE_FULL);
    assert_int_equal(sched_submit(b.e, q3), SCHED_OK);
    run_until_finished(&b, q3, 10);
    assert_finished(q1, SCHED_FINISH_LENGTH, 1);
    assert_finished(q2, SCHED_FINISH_LENGTH, 1);
    assert_finished(q3, SCHED_FINISH_LENGTH, 1);
    /* Refused requests were never notified and never finished. */
    assert_int_equal(nt[0].calls + nt[1].calls + nt[2].calls + nt[7].calls, 0);
    assert_false(is_finished(q4));
    assert_int_equal(stats_of(&b).requests_finished, 4);
    sched_request *all[] = {ctx_long, pool_long, ok0, fits, q1, q2, q3, q4};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        sched_request_release(all[i]);
    bench_close(&b);
}

/* Submit accepts n_prompt + max_tokens up to the pool's slots; admission keeps
 * a 1% reserve of blocks for new work. With nothing else running, a request
 * that submit accepted must still run, not fail for memory. */
static void test_sched_request_accepted_by_submit_runs_in_an_idle_pool(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 100, .batch = 64, .running = 4, .ctx = 512});
    int32_t p[399];
    make_prompt(p, 399, 75);
    note nt = {0};
    sched_request *r = req_simple(p, 399, 1, 0, &nt);
    assert_int_equal(sched_submit(b.e, r), SCHED_OK);
    run_until_finished(&b, r, 20);
    const sched_output o = output_of(r);
    assert_string_equal(o.error, "");
    assert_int_equal(o.finish, SCHED_FINISH_LENGTH);
    assert_tokens_are_reference(r, p, 399, 1);
    sched_request_release(r);
    bench_close(&b);
}

/* ---- 10. stop conditions on tokens ---- */

static void test_sched_eos_stops_unless_ignored_and_min_tokens_delays_it(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 32, .batch = 64, .running = 8, .ctx = 64});
    b.fk.prefer_eos = true;
    int32_t p[4][6];
    for (int i = 0; i < 4; i++)
        make_prompt(p[i], 6, 80u + (uint32_t)i);
    note n[4] = {{0}};
    sched_request *stop = req_open(p[0], 6, &(req_cfg){.max_tokens = 10, .logprobs = -1}, &n[0]);
    sched_request *ignore =
        req_open(p[1], 6, &(req_cfg){.max_tokens = 5, .ignore_eos = true, .logprobs = -1}, &n[1]);
    sched_request *min3 =
        req_open(p[2], 6, &(req_cfg){.max_tokens = 10, .min_tokens = 3, .logprobs = -1}, &n[2]);
    sched_request *min_over_max =
        req_open(p[3], 6, &(req_cfg){.max_tokens = 4, .min_tokens = 9, .logprobs = -1}, &n[3]);
    sched_request *all[4] = {stop, ignore, min3, min_over_max};
    for (int i = 0; i < 4; i++)
        assert_int_equal(sched_submit(b.e, all[i]), SCHED_OK);
    for (int s = 0; s < 20 && stats_of(&b).requests_finished < 4; s++)
        step_checked(&b);

    assert_finished(stop, SCHED_FINISH_STOP, 1);
    assert_int_equal(output_of(stop).tokens[0], EOS);

    assert_finished(ignore, SCHED_FINISH_LENGTH, 5);
    for (int i = 0; i < 5; i++)
        assert_int_equal(output_of(ignore).tokens[i], EOS);

    /* Three tokens by the rule, then EOS as the fourth. */
    int32_t want[4];
    reference_tokens(p[2], 6, 3, want);
    want[3] = EOS;
    assert_finished(min3, SCHED_FINISH_STOP, 4);
    assert_memory_equal(output_of(min3).tokens, want, sizeof(want));

    assert_finished(min_over_max, SCHED_FINISH_LENGTH, 4);
    assert_tokens_are_reference(min_over_max, p[3], 6, 4);

    const sched_stats s = stats_of(&b);
    assert_int_equal(s.finished_by_reason[SCHED_FINISH_STOP], 2);
    assert_int_equal(s.finished_by_reason[SCHED_FINISH_LENGTH], 2);
    assert_int_equal(s.kv_blocks_used, 0);
    for (int i = 0; i < 4; i++) {
        assert_notified_once(&n[i]);
        sched_request_release(all[i]);
    }
    bench_close(&b);
}

/* The header promises logprobs from the model's raw distribution: banning EOS
 * for min_tokens changes the draw, not the reported logprob. */
static void test_sched_logprobs_stay_raw_when_min_tokens_bans_eos(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 16, .batch = 64, .running = 4, .ctx = 64});
    b.fk.prefer_eos = true;
    int32_t p[6];
    make_prompt(p, 6, 90);
    note nt = {0};
    sched_request *r =
        req_open(p, 6, &(req_cfg){.max_tokens = 1, .min_tokens = 1, .logprobs = 2}, &nt);
    assert_int_equal(sched_submit(b.e, r), SCHED_OK);
    step_checked(&b);
    const sched_output o = output_of(r);
    assert_int_equal(o.finish, SCHED_FINISH_LENGTH);
    assert_int_equal(o.n_tokens, 1);
    assert_int_equal(o.tokens[0], rule_token(p, 6));
    assert_int_equal(o.top_n, 2);
    /* Raw logits: EOS 10, the rule's token 5, 30 others 0. */
    const double lse = log(exp(10.0) + exp(5.0) + 30.0);
    assert_float_equal(o.lp[0], (float)(5.0 - lse), 1e-4f);
    assert_int_equal(o.top_ids[0], EOS);
    assert_float_equal(o.top_lps[0], (float)(10.0 - lse), 1e-4f);
    assert_int_equal(o.top_ids[1], rule_token(p, 6));
    sched_request_release(r);
    bench_close(&b);
}

/* ---- 11. forward failure ---- */

static void test_sched_forward_failure_finishes_its_batch_with_error_only(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 32, .batch = 64, .running = 2, .ctx = 64});
    int32_t p[3][4];
    note n[3] = {{0}};
    sched_request *r[3];
    for (int i = 0; i < 3; i++) {
        make_prompt(p[i], 4, 100u + (uint32_t)i);
        r[i] = req_simple(p[i], 4, 5, 0, &n[i]);
        assert_int_equal(sched_submit(b.e, r[i]), SCHED_OK);
    }
    b.fk.fail_on_call = 2;
    step_expect(&b, 2, (entry[]){{r[0], 4, 0, true}, {r[1], 4, 0, true}});
    b.fk.n_seen = 0;
    assert_int_equal(sched_engine_step(b.e), 2);
    for (int i = 0; i < 2; i++) {
        const sched_output o = output_of(r[i]);
        assert_int_equal(o.finish, SCHED_FINISH_ERROR);
        assert_int_equal(o.n_tokens, 1);
        assert_string_equal(o.error, FAIL_MSG);
        assert_notified_once(&n[i]);
    }
    assert_false(is_finished(r[2]));
    /* The engine carries on with the request that was not in that batch. */
    step_expect(&b, 1, (entry[]){{r[2], 4, 0, true}});
    run_until_finished(&b, r[2], 10);
    assert_finished(r[2], SCHED_FINISH_LENGTH, 5);
    assert_tokens_are_reference(r[2], p[2], 4, 5);
    assert_notified_once(&n[2]);
    const sched_stats s = stats_of(&b);
    assert_int_equal(s.finished_by_reason[SCHED_FINISH_ERROR], 2);
    assert_int_equal(s.requests_finished, 3);
    assert_int_equal(s.kv_blocks_used, 0);
    for (int i = 0; i < 3; i++)
        sched_request_release(r[i]);
    bench_close(&b);
}

/* ---- generated-token counter ---- */

static void test_sched_stats_count_generated_tokens(void **state)
{
    (void)state;
    bench b;
    bench_open(&b, &(bench_cfg){.blocks = 16, .batch = 64, .running = 4, .ctx = 64});
    int32_t p[5];
    make_prompt(p, 5, 110);
    note nt = {0};
    sched_request *r = req_simple(p, 5, 7, 0, &nt);
    assert_int_equal(sched_submit(b.e, r), SCHED_OK);
    run_until_finished(&b, r, 20);
    const sched_stats s = stats_of(&b);
    assert_int_equal(s.prompt_tokens, 5);
    assert_int_equal(s.generated_tokens, 7);
    sched_request_release(r);
    bench_close(&b);
}

/* ---- 12. randomized soak ---- */

#define SOAK_N 200

typedef struct {
    int32_t prompt[60];
    int n_prompt, max_tokens, priority;
    int cancel_at; /* step at which the test cancels it; -1: never */
    bool submitted;
    note nt;
    sched_request *r;
} soak_req;

static uint32_t soak_rand(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

static void test_sched_randomized_soak_matches_solo_runs(void **state)
{
    (void)state;
    bench b;
    bench_cfg cfg = {.blocks = 30, .batch = 32, .running = 6, .waiting = SOAK_N, .ctx = 128};
    cfg.prefix = true;
    bench_open(&b, &cfg);
    uint64_t rng = 12345;
    int32_t families[4][60];
    for (int f = 0; f < 4; f++)
        make_prompt(families[f], 60, 200u + (uint32_t)f);
    soak_req *q = calloc(SOAK_N, sizeof(*q));
    assert_non_null(q);
    for (int i = 0; i < SOAK_N; i++) {
        soak_req *s = &q[i];
        s->n_prompt = 1 + (int)(soak_rand(&rng) % 60);
        const int shared =
            soak_rand(&rng) % 2 ? (int)(soak_rand(&rng) % (uint32_t)(s->n_prompt + 1)) : 0;
        const int fam = (int)(soak_rand(&rng) % 4);
        for (int j = 0; j < s->n_prompt; j++)
            s->prompt[j] = j < shared ? families[fam][j] : (int32_t)(3 + soak_rand(&rng) % 29);
        s->max_tokens = 1 + (int)(soak_rand(&rng) % 30);
        s->priority = (int)(soak_rand(&rng) % 3);
        s->cancel_at = soak_rand(&rng) % 8 == 0 ? -2 : -1; /* -2: decided at submit */
        s->r = req_simple(s->prompt, s->n_prompt, s->max_tokens, s->priority, &s->nt);
    }
    int next = 0, step = 0, cancelled = 0;
    while (stats_of(&b).requests_finished < SOAK_N) {
        assert_true(step < 20000);
        for (int k = (int)(soak_rand(&rng) % 4); k > 0 && next < SOAK_N; k--, next++) {
            assert_int_equal(sched_submit(b.e, q[next].r), SCHED_OK);
            if (q[next].cancel_at == -2)
                q[next].cancel_at = step + (int)(soak_rand(&rng) % 40);
        }
        for (int i = 0; i < next; i++)
            if (q[i].cancel_at == step) {
                sched_request_cancel(q[i].r);
                cancelled++;
            }
        step_checked(&b);
        step++;
        for (int i = 0; i < next; i++) {
            const note *n = &q[i].nt;
            assert_true(n->finished <= 1);
            assert_int_equal(n->calls_after_finish, 0);
        }
    }
    assert_int_equal(next, SOAK_N);
    int n_cancelled = 0, n_length = 0;
    for (int i = 0; i < SOAK_N; i++) {
        soak_req *s = &q[i];
        assert_notified_once(&s->nt);
        int32_t want[30];
        reference_tokens(s->prompt, s->n_prompt, s->max_tokens, want);
        const sched_output o = output_of(s->r);
        if (o.finish == SCHED_FINISH_CANCELLED) {
            assert_true(s->cancel_at >= 0);
            assert_true(o.n_tokens < s->max_tokens);
            n_cancelled++;
        } else {
            assert_int_equal(o.finish, SCHED_FINISH_LENGTH);
            assert_int_equal(o.n_tokens, s->max_tokens);
            n_length++;
        }
        assert_memory_equal(o.tokens, want, sizeof(int32_t) * (size_t)o.n_tokens);
    }
    const sched_stats st = stats_of(&b);
    assert_int_equal(st.requests_finished, SOAK_N);
    assert_int_equal(st.finished_by_reason[SCHED_FINISH_CANCELLED], (uint64_t)n_cancelled);
    assert_int_equal(st.finished_by_reason[SCHED_FINISH_LENGTH], (uint64_t)n_length);
    assert_true(cancelled > 0 && n_cancelled > 0);
    /* The run must have exercised what it claims to. */
    assert_true(st.preemptions > 0);
    assert_true(st.prefix_hit_tokens > 0);
    /* One more step after the last finish refreshes the gauges. */
    step_expect(&b, 0, NULL);
    assert_int_equal(stats_of(&b).kv_blocks_used, 0);
    for (int i = 0; i < SOAK_N; i++)
        sched_request_release(q[i].r);
    free(q);
    bench_close(&b);
}

/* ---- runner ---- */

static int group_setup(void **state)
{
    (void)state;
    char err[512];
    const rt_model_opts o = {.n_threads = 1, .max_batch_tokens = 64, .n_ctx = 0};
    const char *path = tu_shared_path("models/stories260K.gguf");
    if (rt_model_load(&g_model, path, &o, err, sizeof(err)) != 0) {
        fprintf(stderr, "load: %s\n", err);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    rt_model_destroy(g_model);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sched_chunked_prefill_splits_prompt_and_samples_after_last_chunk),
        cmocka_unit_test(test_sched_decodes_run_every_step_and_prefill_takes_the_rest),
        cmocka_unit_test(test_sched_max_running_seqs_holds_back_until_a_sequence_finishes),
        cmocka_unit_test(test_sched_lower_priority_value_runs_first_and_ties_keep_arrival_order),
        cmocka_unit_test(test_sched_preempts_the_later_sequence_and_recomputes_it_exactly),
        cmocka_unit_test(test_sched_prefix_cache_skips_shared_full_blocks),
        cmocka_unit_test(test_sched_without_prefix_caching_recomputes_everything),
        cmocka_unit_test(test_sched_sibling_waits_for_first_choice_prefill_then_hits_its_blocks),
        cmocka_unit_test(test_sched_sibling_survives_release_of_its_finished_leader),
        cmocka_unit_test(test_sched_cancel_finishes_running_and_waiting_at_next_step),
        cmocka_unit_test(test_sched_deadline_finishes_late_requests),
        cmocka_unit_test(test_sched_cancel_all_and_destroy_cancel_everything_outstanding),
        cmocka_unit_test(test_sched_submit_refuses_too_long_and_queue_full),
        cmocka_unit_test(test_sched_request_accepted_by_submit_runs_in_an_idle_pool),
        cmocka_unit_test(test_sched_eos_stops_unless_ignored_and_min_tokens_delays_it),
        cmocka_unit_test(test_sched_logprobs_stay_raw_when_min_tokens_bans_eos),
        cmocka_unit_test(test_sched_forward_failure_finishes_its_batch_with_error_only),
        cmocka_unit_test(test_sched_stats_count_generated_tokens),
        cmocka_unit_test(test_sched_randomized_soak_matches_solo_runs),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
