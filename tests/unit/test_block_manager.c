/*
 * test_block_manager.c - unit tests for scheduler/block_manager.c: block
 * accounting, exhaustion, copy-on-write after fork, prefix-cache hits and
 * their limits, LRU eviction order, commit of generated tokens, hash-collision
 * safety, double release, admission counts, and a randomized run against a
 * reference model.
 *
 * Block size 4 throughout, so prompts stay short; blocks come off the free
 * list as 0, 1, 2, ... in a fresh manager.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "scheduler/block_manager.h"

#define BS 4

/* ---- helpers ---- */

static sched_bm *bm_open(int n_blocks, bool prefix_caching)
{
    sched_bm *bm = sched_bm_create(n_blocks, BS, prefix_caching);
    assert_non_null(bm);
    assert_int_equal(sched_bm_check(bm), 0);
    return bm;
}

/* tokens[i] = base + i: prompts with different bases share no block. */
static void fill(int32_t *tokens, int n, int32_t base)
{
    for (int i = 0; i < n; i++)
        tokens[i] = base + i;
}

/* Allocates a prompt, expecting success, and registers its full blocks. */
static void prompt_in(sched_bm *bm, sched_block_table *bt, const int32_t *tokens, int n)
{
    assert_int_equal(sched_bm_allocate_prompt(bm, bt, tokens, n), 0);
    sched_bm_commit(bm, bt, tokens, n);
    assert_int_equal(sched_bm_check(bm), 0);
}

static void assert_counts(const sched_bm *bm, int used, int free_, int cached)
{
    assert_int_equal(sched_bm_used_count(bm), used);
    assert_int_equal(sched_bm_free_count(bm), free_);
    assert_int_equal(sched_bm_cached_count(bm), cached);
    assert_int_equal(sched_bm_used_count(bm) + sched_bm_free_count(bm), sched_bm_total(bm));
    assert_int_equal(sched_bm_check(bm), 0);
}

static void assert_table_zeroed(const sched_block_table *bt)
{
    assert_null(bt->blocks);
    assert_null(bt->hashes);
    assert_int_equal(bt->n_blocks, 0);
    assert_int_equal(bt->cap, 0);
    assert_int_equal(bt->n_tokens, 0);
    assert_int_equal(bt->n_cached, 0);
    assert_int_equal(bt->n_hashed, 0);
}

/* ---- accounting ---- */

static void test_bm_create_rejects_bad_sizes(void **state)
{
    (void)state;
    assert_null(sched_bm_create(0, BS, true));
    assert_null(sched_bm_create(-5, BS, true));
    assert_null(sched_bm_create(8, 0, true));
    assert_null(sched_bm_create(8, -1, false));
    assert_null(sched_bm_create(8, 1 << 20, true));
    sched_bm_destroy(NULL);
    sched_bm *bm = bm_open(8, true);
    assert_int_equal(sched_bm_total(bm), 8);
    assert_int_equal(sched_bm_block_size(bm), BS);
    assert_counts(bm, 0, 8, 0);
    sched_bm_destroy(bm);
}

static void test_bm_allocate_and_release_return_every_block(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(16, false);
    int32_t t[64];
    fill(t, 64, 100);
    sched_block_table a = {0}, b = {0};
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 9), 0); /* 3 blocks */
    assert_int_equal(a.n_blocks, 3);
    assert_int_equal(a.n_tokens, 9);
    assert_int_equal(a.n_cached, 0);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 16), 0); /* 4 blocks */
    assert_int_equal(b.n_blocks, 4);
    assert_counts(bm, 7, 9, 0);
    for (int k = 0; k < a.n_blocks; k++)
        assert_int_equal(sched_bm_ref_count(bm, a.blocks[k]), 1);
    sched_bm_release(bm, &a);
    assert_table_zeroed(&a);
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 16, 0);
    for (int i = 0; i < 16; i++)
        assert_int_equal(sched_bm_ref_count(bm, i), 0);
    sched_bm_destroy(bm);
}

static void test_bm_exhaustion_fails_and_leaves_state_unchanged(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(4, true);
    int32_t t[32];
    fill(t, 32, 0);
    sched_block_table a = {0}, b = {0};
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 12), 0); /* 3 of 4 blocks */
    assert_counts(bm, 3, 1, 0);

    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t + 12, 5), -1); /* needs 2 */
    assert_table_zeroed(&b);
    assert_counts(bm, 3, 1, 0);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 100), -1); /* more than the pool */
    assert_table_zeroed(&b);

    int32_t before[3];
    memcpy(before, a.blocks, sizeof(before));
    sched_bm_copy cow;
    assert_int_equal(sched_bm_append(bm, &a, 5, &cow), -1); /* 17 tokens: 5 blocks */
    assert_int_equal(cow.src, -1);
    assert_int_equal(a.n_tokens, 12);
    assert_int_equal(a.n_blocks, 3);
    assert_memory_equal(a.blocks, before, sizeof(before));
    assert_counts(bm, 3, 1, 0);

    assert_int_equal(sched_bm_append(bm, &a, 4, &cow), 0); /* exactly the last block */
    assert_counts(bm, 4, 0, 0);
    assert_int_equal(sched_bm_append(bm, &a, 1, &cow), -1);
    assert_int_equal(a.n_tokens, 16);
    sched_bm_release(bm, &a);
    assert_counts(bm, 0, 4, 0);
    sched_bm_destroy(bm);
}

static void test_bm_append_across_block_boundary_takes_exactly_one_block(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, false);
    int32_t t[BS];
    fill(t, BS, 7);
    sched_block_table a = {0};
    sched_bm_copy cow;
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, BS), 0); /* one full block */
    assert_int_equal(sched_bm_free_count(bm), 7);

    assert_int_equal(sched_bm_append(bm, &a, 1, &cow), 0); /* slot 4: block 1 */
    assert_int_equal(cow.src, -1);
    assert_int_equal(cow.dst, -1);
    assert_int_equal(a.n_blocks, 2);
    assert_int_equal(a.n_tokens, BS + 1);
    assert_int_equal(sched_bm_free_count(bm), 6);

    for (int i = 0; i < BS - 1; i++) /* slots 5..7 stay in block 1 */
        assert_int_equal(sched_bm_append(bm, &a, 1, &cow), 0);
    assert_int_equal(a.n_blocks, 2);
    assert_int_equal(sched_bm_free_count(bm), 6);

    assert_int_equal(sched_bm_append(bm, &a, 1, &cow), 0); /* slot 8: block 2 */
    assert_int_equal(a.n_blocks, 3);
    assert_int_equal(sched_bm_free_count(bm), 5);

    assert_int_equal(sched_bm_append(bm, &a, 0, &cow), 0); /* n = 0 changes nothing */
    assert_int_equal(a.n_tokens, 2 * BS + 1);
    assert_int_equal(sched_bm_free_count(bm), 5);
    sched_bm_release(bm, &a);
    assert_counts(bm, 0, 8, 0);
    sched_bm_destroy(bm);
}

/* ---- fork and copy-on-write ---- */

static void test_bm_fork_shares_blocks_and_append_copies_shared_last_block(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[6];
    fill(t, 6, 40);
    sched_block_table a = {0}, b = {0};
    prompt_in(bm, &a, t, 6); /* block 0 full, block 1 holds 2 of 4 */
    assert_int_equal(sched_bm_fork(bm, &a, &b), 0);
    assert_int_equal(sched_bm_used_count(bm), 2);
    assert_int_equal(b.n_blocks, 2);
    assert_int_equal(b.n_tokens, 6);
    assert_int_equal(b.n_hashed, a.n_hashed);
    for (int k = 0; k < 2; k++) {
        assert_int_equal(b.blocks[k], a.blocks[k]);
        assert_int_equal(sched_bm_ref_count(bm, a.blocks[k]), 2);
    }

    int32_t shared = a.blocks[1];
    sched_bm_copy cow;
    assert_int_equal(sched_bm_append(bm, &b, 1, &cow), 0);
    assert_int_equal(cow.src, shared);
    assert_int_equal(cow.dst, b.blocks[1]);
    assert_int_not_equal(cow.dst, shared);
    assert_int_equal(a.blocks[1], shared);
    assert_int_equal(sched_bm_ref_count(bm, shared), 1);
    assert_int_equal(sched_bm_ref_count(bm, cow.dst), 1);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[0]), 2); /* full block stays shared */
    assert_int_equal(sched_bm_used_count(bm), 3);

    /* a's last block is private again: it writes in place. */
    assert_int_equal(sched_bm_append(bm, &a, 1, &cow), 0);
    assert_int_equal(cow.src, -1);
    assert_int_equal(a.blocks[1], shared);
    assert_int_equal(sched_bm_used_count(bm), 3);

    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    assert_int_equal(sched_bm_used_count(bm), 0);
    assert_int_equal(sched_bm_free_count(bm), 8);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_append_after_fork_into_new_block_does_not_copy(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS];
    fill(t, 2 * BS, 3);
    sched_block_table a = {0}, b = {0};
    prompt_in(bm, &a, t, 2 * BS); /* both blocks full */
    assert_int_equal(sched_bm_fork(bm, &a, &b), 0);
    sched_bm_copy cow;
    assert_int_equal(sched_bm_append(bm, &b, 1, &cow), 0);
    assert_int_equal(cow.src, -1);
    assert_int_equal(cow.dst, -1);
    assert_int_equal(b.n_blocks, 3);
    assert_int_equal(sched_bm_ref_count(bm, b.blocks[2]), 1);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[0]), 2);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[1]), 2);
    assert_int_equal(sched_bm_used_count(bm), 3);
    /* No cow buffer is needed when no copy is. */
    assert_int_equal(sched_bm_append(bm, &a, 1, NULL), 0);
    sched_bm_release(bm, &b);
    sched_bm_release(bm, &a);
    assert_int_equal(sched_bm_used_count(bm), 0);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

/* ---- prefix cache ---- */

static void test_bm_prefix_hit_reuses_matching_leading_blocks(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(16, true);
    int32_t t[3 * BS + 1];
    fill(t, 3 * BS + 1, 500);
    sched_block_table a = {0}, b = {0}, c = {0};
    prompt_in(bm, &a, t, 3 * BS + 1); /* 3 full blocks registered */
    assert_int_equal(a.n_hashed, 3);

    /* Same first 2 blocks, then something else. */
    int32_t u[2 * BS + 3];
    memcpy(u, t, sizeof(int32_t) * 2 * BS);
    fill(u + 2 * BS, 3, 9000);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, u, 2 * BS + 3), 0);
    assert_int_equal(b.n_cached, 2 * BS);
    assert_int_equal(b.blocks[0], a.blocks[0]);
    assert_int_equal(b.blocks[1], a.blocks[1]);
    assert_int_not_equal(b.blocks[2], a.blocks[2]);
    assert_int_equal(b.n_hashed, 2);
    assert_int_equal(b.hashes[0], a.hashes[0]);
    assert_int_equal(b.hashes[1], a.hashes[1]);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[0]), 2);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[1]), 2);
    assert_int_equal(sched_bm_used_count(bm), 5); /* 4 for a, 1 new for b */

    /* Differs in block 1 (one token): only block 0 is reused. */
    int32_t v[3 * BS];
    memcpy(v, t, sizeof(v));
    v[BS + 2] = -7;
    assert_int_equal(sched_bm_allocate_prompt(bm, &c, v, 3 * BS), 0);
    assert_int_equal(c.n_cached, BS);
    assert_int_equal(c.blocks[0], a.blocks[0]);
    assert_int_not_equal(c.blocks[1], a.blocks[1]);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[0]), 3);

    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    sched_bm_release(bm, &c);
    assert_int_equal(sched_bm_used_count(bm), 0);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_prompt_equal_to_cached_one_reuses_all_but_last_block(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(16, true);
    int32_t t[3 * BS];
    fill(t, 3 * BS, 60);
    sched_block_table a = {0}, b = {0}, c = {0};
    prompt_in(bm, &a, t, 3 * BS);
    assert_int_equal(a.n_hashed, 3); /* every block is registered... */

    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 3 * BS), 0);
    assert_int_equal(b.n_cached, 2 * BS); /* ...but the last is recomputed */
    assert_int_equal(b.blocks[0], a.blocks[0]);
    assert_int_equal(b.blocks[1], a.blocks[1]);
    assert_int_not_equal(b.blocks[2], a.blocks[2]);

    /* A prompt of exactly one block gets no hit at all. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &c, t, BS), 0);
    assert_int_equal(c.n_cached, 0);
    assert_int_not_equal(c.blocks[0], a.blocks[0]);

    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    sched_bm_release(bm, &c);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_prefix_hit_survives_release_of_first_sequence(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS + 2];
    fill(t, 2 * BS + 2, 11);
    sched_block_table a = {0}, b = {0};
    prompt_in(bm, &a, t, 2 * BS + 2);
    int32_t a0 = a.blocks[0], a1 = a.blocks[1];
    sched_bm_release(bm, &a);
    /* The 2 full blocks stay cached; the partial one is free. */
    assert_counts(bm, 0, 8, 2);
    assert_int_equal(sched_bm_ref_count(bm, a0), 0);

    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 2 * BS + 2), 0);
    assert_int_equal(b.n_cached, 2 * BS);
    assert_int_equal(b.blocks[0], a0);
    assert_int_equal(b.blocks[1], a1);
    assert_int_equal(sched_bm_ref_count(bm, a0), 1); /* hit while cached: refcount 1 */
    assert_counts(bm, 3, 5, 0);
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 8, 2);
    sched_bm_destroy(bm);
}

static void test_bm_evicts_least_recently_released_first(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(4, true);
    int32_t ta[2 * BS + 1], tb[2 * BS + 1], tc[2 * BS];
    fill(ta, 2 * BS + 1, 1000);
    fill(tb, 2 * BS + 1, 2000);
    fill(tc, 2 * BS, 3000);
    ta[2 * BS] = tb[2 * BS] = 0;
    sched_block_table a = {0}, b = {0}, c = {0}, d = {0};
    /* Each prompt's 2 full blocks, committed; the extra token's block is
     * appended later, so exactly the 4 full blocks fill the pool. */
    prompt_in(bm, &a, ta, 2 * BS);
    prompt_in(bm, &b, tb, 2 * BS);
    assert_counts(bm, 4, 0, 0);
    int32_t a0 = a.blocks[0], a1 = a.blocks[1], b0 = b.blocks[0], b1 = b.blocks[1];
    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 4, 4);

    /* One new block: a's tail block goes first (a released before b, and a
     * sequence's last block before its first). */
    int32_t one[BS];
    fill(one, BS, 4000);
    assert_int_equal(sched_bm_allocate_prompt(bm, &c, one, BS), 0);
    assert_int_equal(c.blocks[0], a1);
    assert_counts(bm, 1, 3, 3);
    sched_bm_release(bm, &c); /* not full-committed: back to the free list */
    assert_counts(bm, 0, 4, 3);

    /* Two new blocks: the free one, then a's first block. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &d, tc, 2 * BS), 0);
    assert_true((d.blocks[0] == a1 && d.blocks[1] == a0) ||
                (d.blocks[0] == a0 && d.blocks[1] == a1));
    assert_counts(bm, 2, 2, 2);
    assert_int_equal(sched_bm_ref_count(bm, b0), 0);
    assert_int_equal(sched_bm_ref_count(bm, b1), 0);
    sched_bm_release(bm, &d);

    /* b is still fully cached, a is gone. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, tb, 2 * BS + 1), 0);
    assert_int_equal(b.n_cached, 2 * BS);
    assert_int_equal(b.blocks[0], b0);
    assert_int_equal(b.blocks[1], b1);
    sched_bm_release(bm, &b);
    assert_int_equal(sched_bm_blocks_needed(bm, ta, 2 * BS + 1), 3);
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, ta, 2 * BS + 1), 0);
    assert_int_equal(a.n_cached, 0);
    sched_bm_release(bm, &a);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_hit_on_blocks_in_use_shares_them(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS + 1];
    fill(t, 2 * BS + 1, 77);
    sched_block_table a = {0}, b = {0};
    prompt_in(bm, &a, t, 2 * BS + 1);
    assert_int_equal(sched_bm_blocks_needed(bm, t, 2 * BS + 1), 1);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 2 * BS + 1), 0);
    assert_int_equal(b.n_cached, 2 * BS);
    assert_counts(bm, 4, 4, 0);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[1]), 2);
    sched_bm_release(bm, &a);
    assert_counts(bm, 3, 5, 0); /* still referenced by b: not cached yet */
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 8, 2);
    sched_bm_destroy(bm);
}

static void test_bm_commit_registers_blocks_filled_by_generated_tokens(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t seq[3 * BS];
    fill(seq, 3 * BS, 300); /* prompt = first 6 tokens, then generated ones */
    sched_block_table a = {0}, b = {0};
    sched_bm_copy cow;
    prompt_in(bm, &a, seq, 6);
    assert_int_equal(a.n_hashed, 1);
    assert_int_equal(sched_bm_append(bm, &a, 2, &cow), 0); /* 8 tokens: block 1 full */
    sched_bm_commit(bm, &a, seq, 8);
    assert_int_equal(a.n_hashed, 2);
    assert_int_equal(sched_bm_append(bm, &a, 1, &cow), 0);
    sched_bm_commit(bm, &a, seq, 9);
    assert_int_equal(a.n_hashed, 2);
    int32_t a0 = a.blocks[0], a1 = a.blocks[1];
    sched_bm_release(bm, &a);
    assert_int_equal(sched_bm_cached_count(bm), 2);

    /* A later prompt made of prompt + generated text, and more. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, seq, 11), 0);
    assert_int_equal(b.n_cached, 2 * BS);
    assert_int_equal(b.blocks[0], a0);
    assert_int_equal(b.blocks[1], a1);
    sched_bm_release(bm, &b);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_commit_is_idempotent_and_only_registers_computed_blocks(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[3 * BS];
    fill(t, 3 * BS, 21);
    sched_block_table a = {0};
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 3 * BS), 0);
    sched_bm_commit(bm, &a, t, BS + 3); /* chunked prefill: 7 tokens computed */
    assert_int_equal(a.n_hashed, 1);
    uint64_t h0 = a.hashes[0];
    sched_bm_commit(bm, &a, t, BS + 3);
    assert_int_equal(a.n_hashed, 1);
    assert_int_equal(a.hashes[0], h0);
    sched_bm_commit(bm, &a, t, 100 * BS); /* clamped to the reserved slots */
    assert_int_equal(a.n_hashed, 3);
    sched_bm_commit(bm, &a, t, 3 * BS);
    assert_int_equal(a.n_hashed, 3);
    assert_int_equal(a.hashes[0], h0);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_release(bm, &a);
    assert_counts(bm, 0, 8, 3);
    sched_bm_destroy(bm);
}

static void test_bm_commit_stops_at_tokens_contradicting_a_shared_block(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS], wrong[2 * BS];
    fill(t, 2 * BS, 5);
    sched_block_table a = {0}, b = {0};
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 2 * BS), 0);
    assert_int_equal(sched_bm_fork(bm, &a, &b), 0);
    sched_bm_commit(bm, &a, t, 2 * BS);
    assert_int_equal(a.n_hashed, 2);
    memcpy(wrong, t, sizeof(t));
    wrong[1] = 999; /* b shares a's block 0, registered with t's tokens */
    sched_bm_commit(bm, &b, wrong, 2 * BS);
    assert_int_equal(b.n_hashed, 0);
    sched_bm_commit(bm, &b, t, 2 * BS);
    assert_int_equal(b.n_hashed, 2);
    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 8, 2);
    sched_bm_destroy(bm);
}

static void test_bm_duplicate_blocks_of_concurrent_prompts_chain_from_either_copy(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(16, true);
    int32_t seq[3 * BS + 1];
    fill(seq, 3 * BS + 1, 70); /* prompt = 9 tokens, then 3 generated, then 1 more */
    sched_block_table a = {0}, b = {0}, c = {0};
    sched_bm_copy cow;
    /* Both admitted before either registered anything: no hits, two copies. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, seq, 2 * BS + 1), 0);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, seq, 2 * BS + 1), 0);
    assert_int_equal(b.n_cached, 0);
    sched_bm_commit(bm, &a, seq, 2 * BS + 1);
    sched_bm_commit(bm, &b, seq, 2 * BS + 1);
    assert_int_equal(b.hashes[1], a.hashes[1]);
    /* Only b goes on to fill a third block. */
    assert_int_equal(sched_bm_append(bm, &b, 3, &cow), 0);
    sched_bm_commit(bm, &b, seq, 3 * BS);
    assert_int_equal(b.n_hashed, 3);
    int32_t b2 = b.blocks[2];
    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 16, 5);
    /* Whichever copy of blocks 0 and 1 the lookup meets, b's third block
     * follows: equal content under an equal parent is one identity. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &c, seq, 3 * BS + 1), 0);
    assert_int_equal(c.n_cached, 3 * BS);
    assert_int_equal(c.blocks[2], b2);
    sched_bm_release(bm, &c);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_never_hits_with_prefix_caching_disabled(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, false);
    int32_t t[2 * BS + 1];
    fill(t, 2 * BS + 1, 8);
    sched_block_table a = {0}, b = {0};
    prompt_in(bm, &a, t, 2 * BS + 1);
    assert_int_equal(a.n_hashed, 0);
    assert_int_equal(sched_bm_blocks_needed(bm, t, 2 * BS + 1), 3);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 2 * BS + 1), 0);
    assert_int_equal(b.n_cached, 0);
    for (int k = 0; k < 3; k++)
        assert_int_not_equal(b.blocks[k], a.blocks[k]);
    sched_bm_release(bm, &a);
    assert_counts(bm, 3, 5, 0); /* nothing is kept cached */
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 8, 0);
    uint64_t q, h;
    sched_bm_prefix_stats(bm, &q, &h);
    assert_int_equal(q, 2 * (2 * BS + 1));
    assert_int_equal(h, 0);
    sched_bm_destroy(bm);
}

/* out = a (one block) | b (one block) | one block of zeros. */
static void concat_blocks(int32_t *out, const int32_t *a, const int32_t *b)
{
    memcpy(out, a, sizeof(int32_t) * BS);
    memcpy(out + BS, b, sizeof(int32_t) * BS);
    memset(out + 2 * BS, 0, sizeof(int32_t) * BS);
}

/* Every block hashes alike: every lookup has to tell blocks apart by their
 * tokens and by their parent. */
static uint64_t constant_hash(uint64_t parent_hash, const int32_t *tokens, int n)
{
    (void)parent_hash;
    (void)tokens;
    (void)n;
    return 42;
}

static void test_bm_hash_collisions_never_give_a_wrong_hit(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(32, true);
    assert_int_equal(sched_bm_set_hash_fn(bm, constant_hash), 0);
    int32_t x0[BS], z0[BS], y[BS], w[BS];
    fill(x0, BS, 100);
    fill(z0, BS, 200);
    fill(y, BS, 300);
    fill(w, BS, 400);
    int32_t xy[3 * BS], zw[3 * BS], zy[3 * BS];
    concat_blocks(xy, x0, y);
    concat_blocks(zw, z0, w);
    concat_blocks(zy, z0, y);

    sched_block_table a = {0}, c = {0}, b = {0}, d = {0};
    prompt_in(bm, &a, xy, 3 * BS); /* X0 | Y | tail */
    prompt_in(bm, &c, zw, 3 * BS); /* Z0 | W | tail */
    /* Z0 | Y: block 0 hits c's Z0; a's Y has equal tokens and an equal parent
     * hash, but its parent is X0, not Z0: it must not be reused. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, zy, 3 * BS), 0);
    assert_int_equal(b.n_cached, BS);
    assert_int_equal(b.blocks[0], c.blocks[0]);
    assert_int_not_equal(b.blocks[1], a.blocks[1]);
    assert_int_not_equal(b.blocks[1], c.blocks[1]);
    sched_bm_commit(bm, &b, zy, 3 * BS);

    /* Exact repeats still hit, despite all the colliding entries. */
    sched_bm_release(bm, &a);
    assert_int_equal(sched_bm_allocate_prompt(bm, &d, xy, 3 * BS), 0);
    assert_int_equal(d.n_cached, 2 * BS);
    sched_bm_release(bm, &d);
    assert_int_equal(sched_bm_allocate_prompt(bm, &d, zy, 3 * BS), 0);
    assert_int_equal(d.n_cached, 2 * BS);
    assert_int_equal(d.blocks[1], b.blocks[1]);

    /* A block made of other tokens never matches. */
    int32_t other[2 * BS];
    fill(other, 2 * BS, 900);
    assert_int_equal(sched_bm_blocks_needed(bm, other, 2 * BS), 2);

    sched_bm_release(bm, &b);
    sched_bm_release(bm, &c);
    sched_bm_release(bm, &d);
    assert_int_equal(sched_bm_check(bm), 0);
    /* Evicting colliding entries (LRU: a's 3, b's tail, c's tail evicted
     * first) keeps the rest reachable. */
    sched_block_table e = {0};
    int32_t big[32 * BS];
    fill(big, 32 * BS, 5000);
    assert_int_equal(sched_bm_cached_count(bm), 8);
    assert_int_equal(sched_bm_allocate_prompt(bm, &e, big, 29 * BS), 0);
    assert_int_equal(sched_bm_cached_count(bm), 3);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_release(bm, &e);
    assert_int_equal(sched_bm_allocate_prompt(bm, &d, zy, 3 * BS), 0);
    assert_int_equal(d.n_cached, 2 * BS);
    sched_bm_release(bm, &d);
    assert_int_equal(sched_bm_allocate_prompt(bm, &d, xy, 3 * BS), 0);
    assert_int_equal(d.n_cached, 0);
    sched_bm_release(bm, &d);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_set_hash_fn_refused_once_blocks_are_registered(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[BS + 1];
    fill(t, BS + 1, 1);
    sched_block_table a = {0};
    prompt_in(bm, &a, t, BS + 1);
    assert_int_equal(sched_bm_set_hash_fn(bm, constant_hash), -1);
    sched_bm_release(bm, &a);
    assert_int_equal(sched_bm_set_hash_fn(bm, constant_hash), -1); /* still cached */
    sched_bm_reset_cache(bm);
    assert_int_equal(sched_bm_set_hash_fn(bm, constant_hash), 0);
    assert_int_equal(sched_bm_set_hash_fn(bm, NULL), 0);
    sched_bm_destroy(bm);
}

static void test_bm_double_release_is_ignored(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS + 1];
    fill(t, 2 * BS + 1, 50);
    sched_block_table a = {0}, alias = {0};
    prompt_in(bm, &a, t, 2 * BS + 1);
    /* A second table naming the same blocks without owning references. */
    alias = a;
    alias.blocks = malloc(sizeof(int32_t) * (size_t)a.cap);
    alias.hashes = malloc(sizeof(uint64_t) * (size_t)a.cap);
    assert_non_null(alias.blocks);
    assert_non_null(alias.hashes);
    memcpy(alias.blocks, a.blocks, sizeof(int32_t) * (size_t)a.n_blocks);

    sched_bm_release(bm, &a);
    assert_counts(bm, 0, 8, 2);
    sched_bm_release(bm, &alias); /* every refcount is already 0 */
    assert_table_zeroed(&alias);
    assert_counts(bm, 0, 8, 2);
    for (int i = 0; i < 8; i++)
        assert_int_equal(sched_bm_ref_count(bm, i), 0);
    sched_bm_release(bm, &a); /* a zeroed table */
    sched_bm_release(bm, NULL);
    assert_counts(bm, 0, 8, 2);

    sched_block_table b = {0};
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 2 * BS + 1), 0);
    assert_int_equal(b.n_cached, 2 * BS); /* the cache survived intact */
    sched_bm_release(bm, &b);
    sched_bm_destroy(bm);
}

static void test_bm_blocks_needed_matches_what_allocate_takes(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(12, true);
    int32_t t[4 * BS + 2];
    fill(t, 4 * BS + 2, 600);
    sched_block_table a = {0}, b = {0}, c = {0}, d = {0};

    /* No hits. */
    int need = sched_bm_blocks_needed(bm, t, 4 * BS + 2);
    assert_int_equal(need, 5);
    int before = sched_bm_free_count(bm);
    prompt_in(bm, &a, t, 4 * BS + 2);
    assert_int_equal(before - sched_bm_free_count(bm), need);

    /* Hits on blocks in use cost nothing. */
    need = sched_bm_blocks_needed(bm, t, 3 * BS + 1);
    assert_int_equal(need, 1);
    before = sched_bm_free_count(bm);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 3 * BS + 1), 0);
    assert_int_equal(before - sched_bm_free_count(bm), need);
    sched_bm_release(bm, &b);

    /* Hits on cached blocks leave the evictable pool: they count. */
    sched_bm_release(bm, &a);
    need = sched_bm_blocks_needed(bm, t, 3 * BS + 1);
    assert_int_equal(need, 4);
    before = sched_bm_free_count(bm);
    assert_int_equal(sched_bm_allocate_prompt(bm, &c, t, 3 * BS + 1), 0);
    assert_int_equal(c.n_cached, 3 * BS);
    assert_int_equal(before - sched_bm_free_count(bm), need);

    /* Admission is exact: need > free fails, need == free succeeds. */
    int32_t u[12 * BS];
    fill(u, 12 * BS, 7000);
    int free_now = sched_bm_free_count(bm);
    assert_int_equal(sched_bm_blocks_needed(bm, u, (free_now + 1) * BS), free_now + 1);
    assert_int_equal(sched_bm_allocate_prompt(bm, &d, u, (free_now + 1) * BS), -1);
    assert_int_equal(sched_bm_blocks_needed(bm, u, free_now * BS), free_now);
    assert_int_equal(sched_bm_allocate_prompt(bm, &d, u, free_now * BS), 0);
    assert_int_equal(sched_bm_free_count(bm), 0);
    assert_int_equal(sched_bm_check(bm), 0);

    /* A prompt whose hits are cached but whose new block has no room fails
     * without taking the hits out of the cache. */
    sched_bm_release(bm, &c);
    int cached = sched_bm_cached_count(bm);
    need = sched_bm_blocks_needed(bm, t, 4 * BS + 2);
    assert_true(need > sched_bm_free_count(bm));
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 4 * BS + 2), -1);
    assert_int_equal(sched_bm_cached_count(bm), cached);
    assert_int_equal(sched_bm_check(bm), 0);

    sched_bm_release(bm, &d);
    sched_bm_destroy(bm);
}

static void test_bm_reset_cache_drops_cached_blocks_only(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS + 1], u[2 * BS + 1];
    fill(t, 2 * BS + 1, 10);
    fill(u, 2 * BS + 1, 90);
    sched_block_table a = {0}, b = {0}, c = {0};
    prompt_in(bm, &a, t, 2 * BS + 1);
    prompt_in(bm, &b, u, 2 * BS + 1);
    sched_bm_release(bm, &a);
    assert_counts(bm, 3, 5, 2);
    sched_bm_reset_cache(bm);
    assert_counts(bm, 3, 5, 0);
    assert_int_equal(sched_bm_blocks_needed(bm, t, 2 * BS + 1), 3);
    /* b's blocks, in use, are still registered. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &c, u, 2 * BS + 1), 0);
    assert_int_equal(c.n_cached, 2 * BS);
    sched_bm_release(bm, &b);
    sched_bm_release(bm, &c);
    assert_counts(bm, 0, 8, 2);
    sched_bm_reset_cache(bm);
    assert_counts(bm, 0, 8, 0);
    sched_bm_reset_cache(NULL);
    sched_bm_destroy(bm);
}

static void test_bm_prefix_stats_count_queried_and_hit_tokens(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS + 3];
    fill(t, 2 * BS + 3, 33);
    sched_block_table a = {0}, b = {0};
    uint64_t q = 1, h = 1;
    sched_bm_prefix_stats(bm, &q, &h);
    assert_int_equal(q, 0);
    assert_int_equal(h, 0);
    prompt_in(bm, &a, t, 2 * BS + 3);
    assert_int_equal(sched_bm_allocate_prompt(bm, &b, t, 2 * BS + 3), 0);
    sched_bm_prefix_stats(bm, &q, &h);
    assert_int_equal(q, 2 * (2 * BS + 3));
    assert_int_equal(h, 2 * BS);
    sched_bm_prefix_stats(bm, NULL, NULL);
    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    sched_bm_destroy(bm);
}

/* Private tables (KV computed under a sparse policy) neither hit the prefix
 * cache nor feed it. */
static void test_bm_private_tables_neither_hit_nor_publish(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS + 2];
    fill(t, 2 * BS + 2, 7);
    sched_block_table a = {0}, b = {0}, c = {0};
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 2 * BS + 2), 0);
    sched_bm_commit(bm, &a, t, 2 * BS + 2);
    assert_int_equal(sched_bm_blocks_needed(bm, NULL, 2 * BS + 2), 3);
    assert_int_equal(sched_bm_allocate_private(bm, &b, 2 * BS + 2), 0);
    assert_int_equal(b.n_cached, 0);
    for (int k = 0; k < 2; k++)
        assert_true(b.blocks[k] != a.blocks[k]);
    sched_bm_release(bm, &a);
    sched_bm_commit(bm, &b, t, 2 * BS + 2); /* must not register b's blocks */
    sched_bm_release(bm, &b);
    assert_int_equal(sched_bm_allocate_prompt(bm, &c, t, 2 * BS + 2), 0);
    assert_int_equal(c.n_cached, 2 * BS); /* a's blocks, still cached */
    sched_bm_release(bm, &c);
    assert_int_equal(sched_bm_cached_count(bm), 2); /* only a's two full blocks */
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

static void test_bm_rejects_invalid_arguments(void **state)
{
    (void)state;
    sched_bm *bm = bm_open(8, true);
    int32_t t[2 * BS + 2];
    fill(t, 2 * BS + 2, 1);
    sched_block_table a = {0}, b = {0};
    sched_bm_copy cow;

    assert_int_equal(sched_bm_allocate_prompt(NULL, &a, t, 3), -1);
    assert_int_equal(sched_bm_allocate_prompt(bm, NULL, t, 3), -1);
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, NULL, 3), -1);
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 0), -1);
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, -4), -1);
    assert_int_equal(sched_bm_blocks_needed(bm, t, 0), -1);
    assert_int_equal(sched_bm_blocks_needed(bm, NULL, 3), 1); /* private: no prefix walk */
    assert_int_equal(sched_bm_blocks_needed(NULL, t, 3), -1);
    assert_table_zeroed(&a);
    assert_counts(bm, 0, 8, 0);

    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 2 * BS + 2), 0);
    /* A table that already holds blocks is not overwritten. */
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, t, 3), -1);
    assert_int_equal(a.n_tokens, 2 * BS + 2);
    assert_int_equal(sched_bm_append(bm, &a, -1, &cow), -1);
    assert_int_equal(sched_bm_append(bm, NULL, 1, &cow), -1);
    assert_int_equal(sched_bm_fork(bm, &a, &a), -1);
    assert_int_equal(sched_bm_fork(bm, NULL, &b), -1);

    /* A shared partial last block needs somewhere to report the copy. */
    assert_int_equal(sched_bm_fork(bm, &a, &b), 0);
    assert_int_equal(sched_bm_fork(bm, &a, &b), -1); /* b is not empty */
    assert_int_equal(sched_bm_append(bm, &b, 1, NULL), -1);
    assert_int_equal(b.n_tokens, 2 * BS + 2);
    assert_counts(bm, 3, 5, 0);

    /* Corrupt tables are refused, not followed. */
    sched_block_table bad = a;
    bad.n_tokens = 100; /* n_blocks no longer covers n_tokens */
    assert_int_equal(sched_bm_append(bm, &bad, 1, &cow), -1);
    bad = a;
    int32_t ids[3] = {a.blocks[0], a.blocks[1], 12345};
    bad.blocks = ids;
    assert_int_equal(sched_bm_append(bm, &bad, 1, &cow), -1);
    sched_block_table forked = {0};
    assert_int_equal(sched_bm_fork(bm, &bad, &forked), -1);
    assert_table_zeroed(&forked);
    assert_int_equal(sched_bm_ref_count(bm, 12345), -1);
    assert_int_equal(sched_bm_ref_count(bm, -1), -1);
    assert_counts(bm, 3, 5, 0);

    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    assert_counts(bm, 0, 8, 0);
    sched_bm_destroy(bm);
}

/* ---- randomized run against a reference model ---- */

/* The model mirrors every table and, per physical block, what the KV in it
 * would have been computed from: the writer's tokens from position 0 to the
 * block's last written slot. A block reused through fork or a prefix hit must
 * hold exactly the reader's tokens; that is the property that makes sharing
 * correct, whoever wrote the block and however long ago. */

#define STRESS_SEQS 20
#define STRESS_BLOCKS 64
#define STRESS_OPS 4000
#define STRESS_MAX_TOKENS 256

typedef struct {
    bool alive;
    sched_block_table bt;
    int32_t tokens[STRESS_MAX_TOKENS];
    int n_tokens;
    int32_t blocks[STRESS_MAX_TOKENS / BS]; /* what the model expects bt to hold */
    int n_blocks;
} model_seq;

typedef struct {
    int allocs, alloc_fails, hits, cows, evictions, forks, commits, releases, resets;
} stress_tally;

typedef struct {
    sched_bm *bm;
    model_seq seqs[STRESS_SEQS];
    int32_t content[STRESS_BLOCKS][STRESS_MAX_TOKENS]; /* writer's tokens up to the block */
    int content_len[STRESS_BLOCKS];
    uint64_t rng;
    stress_tally tally;
} stress_world;

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int rng_below(stress_world *w, int n)
{
    return (int)(rng_next(&w->rng) % (uint64_t)n);
}

static int blocks_for_tokens(int n)
{
    return (n + BS - 1) / BS;
}

static int min_int(int a, int b)
{
    return a < b ? a : b;
}

/* A prompt from one of a few base texts over a tiny vocabulary, so prompts
 * often share prefixes (hits) and equal blocks often sit under different
 * parents. */
static int random_prompt(stress_world *w, int32_t *out)
{
    int base = rng_below(w, 4);
    int n = 1 + rng_below(w, 48);
    for (int i = 0; i < n; i++)
        out[i] = (int32_t)((base * 7 + i * (base + 1)) % 5);
    if (rng_below(w, 3) == 0)
        out[rng_below(w, n)] = (int32_t)rng_below(w, 5);
    return n;
}

static int pick_seq(stress_world *w, bool alive)
{
    int start = rng_below(w, STRESS_SEQS);
    for (int k = 0; k < STRESS_SEQS; k++) {
        int i = (start + k) % STRESS_SEQS;
        if (w->seqs[i].alive == alive)
            return i;
    }
    return -1;
}

static void model_sync_blocks(model_seq *m)
{
    m->n_blocks = m->bt.n_blocks;
    memcpy(m->blocks, m->bt.blocks, sizeof(int32_t) * (size_t)m->bt.n_blocks);
}

/* m wrote its tokens into its blocks from logical block `from` on. */
static void model_write(stress_world *w, const model_seq *m, int from)
{
    for (int k = from; k < m->n_blocks; k++) {
        int b = m->blocks[k];
        int len = min_int((k + 1) * BS, m->n_tokens);
        memcpy(w->content[b], m->tokens, sizeof(int32_t) * (size_t)len);
        w->content_len[b] = len;
    }
}

/* Block k of m holds KV computed from exactly m's tokens. */
static void assert_block_content(const stress_world *w, const model_seq *m, int k)
{
    int b = m->blocks[k];
    int len = min_int((k + 1) * BS, m->n_tokens);
    assert_int_equal(w->content_len[b], len);
    assert_memory_equal(w->content[b], m->tokens, sizeof(int32_t) * (size_t)len);
}

/* Every invariant the model can see from outside. */
static void stress_check(const stress_world *w)
{
    const sched_bm *bm = w->bm;
    assert_int_equal(sched_bm_check(bm), 0);
    assert_int_equal(sched_bm_used_count(bm) + sched_bm_free_count(bm), STRESS_BLOCKS);
    assert_true(sched_bm_cached_count(bm) <= sched_bm_free_count(bm));

    int refs[STRESS_BLOCKS] = {0};
    int pos[STRESS_BLOCKS];
    int used = 0;
    for (int i = 0; i < STRESS_SEQS; i++) {
        const model_seq *m = &w->seqs[i];
        if (!m->alive)
            continue;
        assert_int_equal(m->bt.n_tokens, m->n_tokens);
        assert_int_equal(m->bt.n_blocks, m->n_blocks);
        assert_int_equal(m->n_blocks, blocks_for_tokens(m->n_tokens));
        assert_memory_equal(m->bt.blocks, m->blocks, sizeof(int32_t) * (size_t)m->n_blocks);
        for (int k = 0; k < m->n_blocks; k++) {
            int b = m->blocks[k];
            assert_true(b >= 0 && b < STRESS_BLOCKS);
            if (refs[b]++ == 0) {
                used++;
                pos[b] = k;
            }
            assert_int_equal(pos[b], k); /* shared only at the same position */
            assert_block_content(w, m, k);
        }
    }
    for (int b = 0; b < STRESS_BLOCKS; b++)
        assert_int_equal(sched_bm_ref_count(bm, b), refs[b]);
    assert_int_equal(sched_bm_used_count(bm), used);
}

static void stress_allocate(stress_world *w)
{
    int i = pick_seq(w, false);
    if (i < 0)
        return;
    model_seq *m = &w->seqs[i];
    int n = random_prompt(w, m->tokens);
    int need = sched_bm_blocks_needed(w->bm, m->tokens, n);
    int before = sched_bm_free_count(w->bm);
    int pure_free = before - sched_bm_cached_count(w->bm);
    int rc = sched_bm_allocate_prompt(w->bm, &m->bt, m->tokens, n);
    assert_int_equal(rc == 0, need <= before);
    if (rc != 0) {
        assert_table_zeroed(&m->bt);
        w->tally.alloc_fails++;
        return;
    }
    assert_int_equal(before - sched_bm_free_count(w->bm), need);
    assert_int_equal(m->bt.n_cached % BS, 0);
    assert_true(m->bt.n_cached < n);
    int hits = m->bt.n_cached / BS;
    assert_int_equal(m->bt.n_hashed, hits);
    w->tally.evictions += blocks_for_tokens(n) - hits > pure_free;
    w->tally.hits += hits > 0;
    w->tally.allocs++;
    m->alive = true;
    m->n_tokens = n;
    model_sync_blocks(m);
    for (int k = 0; k < hits; k++)
        assert_block_content(w, m, k); /* the hit's KV came from these tokens */
    model_write(w, m, hits);
}

static void stress_append(stress_world *w)
{
    int i = pick_seq(w, true);
    if (i < 0)
        return;
    model_seq *m = &w->seqs[i];
    int n = rng_below(w, 5) == 0 ? 1 + rng_below(w, 9) : 1;
    if (m->n_tokens + n > STRESS_MAX_TOKENS)
        return;
    int last = m->n_blocks - 1;
    bool copy = m->n_tokens % BS != 0 && sched_bm_ref_count(w->bm, m->blocks[last]) > 1;
    int take = blocks_for_tokens(m->n_tokens + n) - m->n_blocks + (copy ? 1 : 0);
    int before = sched_bm_free_count(w->bm);
    sched_bm_copy cow;
    int rc = sched_bm_append(w->bm, &m->bt, n, &cow);
    assert_int_equal(rc == 0, take <= before);
    if (rc != 0) {
        assert_int_equal(m->bt.n_tokens, m->n_tokens);
        return;
    }
    assert_int_equal(before - sched_bm_free_count(w->bm), take);
    if (copy) {
        assert_int_equal(cow.src, m->blocks[last]);
        assert_int_equal(cow.dst, m->bt.blocks[last]);
        assert_int_equal(sched_bm_ref_count(w->bm, cow.dst), 1);
        m->blocks[last] = cow.dst;
        w->tally.cows++;
    } else {
        assert_int_equal(cow.src, -1);
    }
    /* Earlier blocks never move; new ones are private. */
    assert_memory_equal(m->bt.blocks, m->blocks, sizeof(int32_t) * (size_t)m->n_blocks);
    for (int k = m->n_blocks; k < m->bt.n_blocks; k++)
        assert_int_equal(sched_bm_ref_count(w->bm, m->bt.blocks[k]), 1);
    int first_written = m->n_tokens / BS;
    for (int k = 0; k < n; k++)
        m->tokens[m->n_tokens + k] = (int32_t)rng_below(w, 3);
    m->n_tokens += n;
    model_sync_blocks(m);
    model_write(w, m, first_written);
}

static void stress_commit(stress_world *w)
{
    int i = pick_seq(w, true);
    if (i < 0)
        return;
    model_seq *m = &w->seqs[i];
    /* Usually everything is computed; sometimes only part (chunked prefill). */
    int n = rng_below(w, 4) == 0 ? 1 + rng_below(w, m->n_tokens) : m->n_tokens;
    int used = sched_bm_used_count(w->bm), free_ = sched_bm_free_count(w->bm);
    int hashed = m->bt.n_hashed;
    sched_bm_commit(w->bm, &m->bt, m->tokens, n);
    assert_int_equal(m->bt.n_hashed, n / BS > hashed ? n / BS : hashed);
    assert_int_equal(sched_bm_used_count(w->bm), used);
    assert_int_equal(sched_bm_free_count(w->bm), free_);
    w->tally.commits++;
}

static void stress_fork(stress_world *w)
{
    int i = pick_seq(w, true), j = pick_seq(w, false);
    if (i < 0 || j < 0)
        return;
    model_seq *src = &w->seqs[i], *dst = &w->seqs[j];
    int used = sched_bm_used_count(w->bm);
    assert_int_equal(sched_bm_fork(w->bm, &src->bt, &dst->bt), 0);
    assert_int_equal(sched_bm_used_count(w->bm), used);
    dst->alive = true;
    dst->n_tokens = src->n_tokens;
    memcpy(dst->tokens, src->tokens, sizeof(int32_t) * (size_t)src->n_tokens);
    model_sync_blocks(dst);
    w->tally.forks++;
}

static void stress_release(stress_world *w)
{
    int i = pick_seq(w, true);
    if (i < 0)
        return;
    model_seq *m = &w->seqs[i];
    sched_bm_release(w->bm, &m->bt);
    assert_table_zeroed(&m->bt);
    m->alive = false;
    m->n_tokens = m->n_blocks = 0;
    w->tally.releases++;
}

static void test_bm_randomized_operations_keep_invariants(void **state)
{
    (void)state;
    stress_world *w = calloc(1, sizeof(*w));
    assert_non_null(w);
    w->bm = bm_open(STRESS_BLOCKS, true);
    w->rng = 0x2545f4914f6cdd1dull;
    for (int op = 0; op < STRESS_OPS; op++) {
        int r = rng_below(w, 100);
        if (r < 22)
            stress_allocate(w);
        else if (r < 55)
            stress_append(w);
        else if (r < 72)
            stress_commit(w);
        else if (r < 80)
            stress_fork(w);
        else if (r < 99)
            stress_release(w);
        else {
            sched_bm_reset_cache(w->bm);
            assert_int_equal(sched_bm_cached_count(w->bm), 0);
            w->tally.resets++;
        }
        stress_check(w);
    }
    /* Every path was exercised. */
    const stress_tally *t = &w->tally;
    assert_true(t->allocs > 100);
    assert_true(t->alloc_fails > 0);
    assert_true(t->hits > 20);
    assert_true(t->cows > 5);
    assert_true(t->evictions > 5);
    assert_true(t->forks > 20);
    assert_true(t->resets > 0);

    for (int i = 0; i < STRESS_SEQS; i++)
        sched_bm_release(w->bm, &w->seqs[i].bt);
    assert_int_equal(sched_bm_used_count(w->bm), 0);
    assert_int_equal(sched_bm_free_count(w->bm), STRESS_BLOCKS);
    sched_bm_reset_cache(w->bm);
    assert_counts(w->bm, 0, STRESS_BLOCKS, 0);
    sched_bm_destroy(w->bm);
    free(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bm_create_rejects_bad_sizes),
        cmocka_unit_test(test_bm_allocate_and_release_return_every_block),
        cmocka_unit_test(test_bm_exhaustion_fails_and_leaves_state_unchanged),
        cmocka_unit_test(test_bm_append_across_block_boundary_takes_exactly_one_block),
        cmocka_unit_test(test_bm_fork_shares_blocks_and_append_copies_shared_last_block),
        cmocka_unit_test(test_bm_append_after_fork_into_new_block_does_not_copy),
        cmocka_unit_test(test_bm_prefix_hit_reuses_matching_leading_blocks),
        cmocka_unit_test(test_bm_prompt_equal_to_cached_one_reuses_all_but_last_block),
        cmocka_unit_test(test_bm_prefix_hit_survives_release_of_first_sequence),
        cmocka_unit_test(test_bm_evicts_least_recently_released_first),
        cmocka_unit_test(test_bm_hit_on_blocks_in_use_shares_them),
        cmocka_unit_test(test_bm_commit_registers_blocks_filled_by_generated_tokens),
        cmocka_unit_test(test_bm_commit_is_idempotent_and_only_registers_computed_blocks),
        cmocka_unit_test(test_bm_commit_stops_at_tokens_contradicting_a_shared_block),
        cmocka_unit_test(test_bm_duplicate_blocks_of_concurrent_prompts_chain_from_either_copy),
        cmocka_unit_test(test_bm_never_hits_with_prefix_caching_disabled),
        cmocka_unit_test(test_bm_hash_collisions_never_give_a_wrong_hit),
        cmocka_unit_test(test_bm_set_hash_fn_refused_once_blocks_are_registered),
        cmocka_unit_test(test_bm_double_release_is_ignored),
        cmocka_unit_test(test_bm_blocks_needed_matches_what_allocate_takes),
        cmocka_unit_test(test_bm_reset_cache_drops_cached_blocks_only),
        cmocka_unit_test(test_bm_prefix_stats_count_queried_and_hit_tokens),
        cmocka_unit_test(test_bm_private_tables_neither_hit_nor_publish),
        cmocka_unit_test(test_bm_rejects_invalid_arguments),
        cmocka_unit_test(test_bm_randomized_operations_keep_invariants),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
