/*
 * test_kv_slab.c - the compressed-page slab over the block manager: pages of
 * one format fill a block before another is taken, a block returns to the
 * manager with its last page, formats never share a block, and a request
 * that does not fit takes nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "scheduler/block_manager.h"
#include "scheduler/kv_slab.h"

static void test_pages_fill_a_block_then_take_the_next(void **state)
{
    (void)state;
    sched_bm *bm = sched_bm_create(8, 16, false);
    sched_slab *s = sched_slab_create(bm);
    int32_t ids[32];
    assert_int_equal(sched_slab_blocks_needed(s, 2, 7, 10), 2);
    assert_int_equal(sched_slab_take(s, 2, 7, 10, ids), 0);
    assert_int_equal(sched_slab_blocks(s), 2);
    assert_int_equal(sched_slab_pages(s), 10);
    assert_int_equal(sched_bm_free_count(bm), 6);
    /* The first 7 pages share one block, then the next block. */
    for (int i = 1; i < 7; i++)
        assert_int_equal(ids[i] / SCHED_SLAB_SUB, ids[0] / SCHED_SLAB_SUB);
    assert_int_not_equal(ids[7] / SCHED_SLAB_SUB, ids[0] / SCHED_SLAB_SUB);
    for (int i = 0; i < 10; i++)
        for (int j = i + 1; j < 10; j++)
            assert_int_not_equal(ids[i], ids[j]);
    /* 4 spare pages in the second block: 4 more need no block. */
    assert_int_equal(sched_slab_blocks_needed(s, 2, 7, 4), 0);
    assert_int_equal(sched_slab_check(s), 0);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_slab_destroy(s);
    sched_bm_destroy(bm);
}

static void test_last_page_returns_the_block(void **state)
{
    (void)state;
    sched_bm *bm = sched_bm_create(4, 16, false);
    sched_slab *s = sched_slab_create(bm);
    int32_t a[3], b[3];
    assert_int_equal(sched_slab_take(s, 0, 3, 3, a), 0); /* one full block */
    assert_int_equal(sched_slab_take(s, 0, 3, 2, b), 0); /* a second, partly used */
    assert_int_equal(sched_bm_free_count(bm), 2);
    sched_slab_give(s, a, 2);
    assert_int_equal(sched_bm_free_count(bm), 2); /* a[2] still holds the first block */
    assert_int_equal(sched_slab_check(s), 0);
    sched_slab_give(s, &a[2], 1);
    assert_int_equal(sched_bm_free_count(bm), 3);
    /* Giving a page twice, or one never taken, changes nothing. */
    sched_slab_give(s, &a[2], 1);
    const int32_t junk[3] = {-5, 3 * SCHED_SLAB_SUB + 15, 1 << 30};
    sched_slab_give(s, junk, 3);
    assert_int_equal(sched_slab_pages(s), 2);
    assert_int_equal(sched_slab_check(s), 0);
    /* The partly used block takes the next page of its format. */
    int32_t c;
    assert_int_equal(sched_slab_take(s, 0, 3, 1, &c), 0);
    assert_int_equal(c / SCHED_SLAB_SUB, b[0] / SCHED_SLAB_SUB);
    sched_slab_give(s, b, 2);
    sched_slab_give(s, &c, 1);
    assert_int_equal(sched_bm_free_count(bm), 4);
    assert_int_equal(sched_slab_blocks(s), 0);
    assert_int_equal(sched_slab_check(s), 0);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_slab_destroy(s);
    sched_bm_destroy(bm);
}

static void test_formats_keep_their_own_blocks_and_short_takes_nothing(void **state)
{
    (void)state;
    sched_bm *bm = sched_bm_create(3, 16, false);
    sched_slab *s = sched_slab_create(bm);
    int32_t x, y, many[64];
    assert_int_equal(sched_slab_take(s, 1, 4, 1, &x), 0);
    assert_int_equal(sched_slab_take(s, 2, 4, 1, &y), 0);
    assert_int_not_equal(x / SCHED_SLAB_SUB, y / SCHED_SLAB_SUB);
    /* A format keeps its page count. */
    assert_int_equal(sched_slab_take(s, 1, 5, 1, many), -1);
    /* 3 spare pages of format 1 plus one free block of 4: 7 fit, 8 do not. */
    assert_int_equal(sched_slab_take(s, 1, 4, 8, many), -1);
    assert_int_equal(sched_slab_pages(s), 2);
    assert_int_equal(sched_bm_free_count(bm), 1);
    assert_int_equal(sched_slab_take(s, 1, 4, 7, many), 0);
    assert_int_equal(sched_bm_free_count(bm), 0);
    /* Bad arguments. */
    assert_int_equal(sched_slab_take(s, -1, 4, 1, many), -1);
    assert_int_equal(sched_slab_take(s, SCHED_SLAB_FMTS, 4, 1, many), -1);
    assert_int_equal(sched_slab_take(s, 3, 0, 1, many), -1);
    assert_int_equal(sched_slab_take(s, 3, SCHED_SLAB_SUB + 1, 1, many), -1);
    assert_int_equal(sched_slab_take(s, 3, 2, 1, NULL), -1);
    assert_null(sched_slab_create(NULL));
    assert_int_equal(sched_slab_check(s), 0);
    sched_slab_destroy(s);
    sched_bm_destroy(bm);
}

static void test_prefix_only_allocation_holds_the_hits(void **state)
{
    (void)state;
    sched_bm *bm = sched_bm_create(8, 4, true);
    int32_t toks[12];
    for (int i = 0; i < 12; i++)
        toks[i] = 100 + i;
    sched_block_table a = {0}, b = {0}, c = {0};
    assert_int_equal(sched_bm_allocate_prompt(bm, &a, toks, 12), 0);
    sched_bm_commit(bm, &a, toks, 12);
    /* Two full blocks hit (never the block of the last token). */
    int in_lru = -1;
    assert_int_equal(sched_bm_prefix_hits(bm, toks, 12, &in_lru), 2);
    assert_int_equal(in_lru, 0);
    assert_int_equal(sched_bm_allocate_prefix(bm, &b, toks, 12), 0);
    assert_int_equal(b.n_tokens, 8);
    assert_int_equal(b.n_cached, 8);
    assert_int_equal(b.n_blocks, 2);
    assert_int_equal(b.blocks[0], a.blocks[0]);
    assert_int_equal(sched_bm_ref_count(bm, a.blocks[0]), 2);
    /* No hits: an empty table, no block taken. */
    const int32_t other[5] = {1, 2, 3, 4, 5};
    const int free_before = sched_bm_free_count(bm);
    assert_int_equal(sched_bm_allocate_prefix(bm, &c, other, 5), 0);
    assert_int_equal(c.n_blocks, 0);
    assert_int_equal(c.n_tokens, 0);
    assert_int_equal(sched_bm_free_count(bm), free_before);
    assert_int_equal(sched_bm_allocate_prefix(bm, &c, other, 5), -1); /* not empty */
    sched_bm_release(bm, &a);
    sched_bm_release(bm, &b);
    sched_bm_release(bm, &c);
    assert_int_equal(sched_bm_used_count(bm), 0);
    assert_int_equal(sched_bm_check(bm), 0);
    sched_bm_destroy(bm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pages_fill_a_block_then_take_the_next),
        cmocka_unit_test(test_last_page_returns_the_block),
        cmocka_unit_test(test_formats_keep_their_own_blocks_and_short_takes_nothing),
        cmocka_unit_test(test_prefix_only_allocation_holds_the_hits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
