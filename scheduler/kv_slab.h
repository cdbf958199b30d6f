/*
 * kv_slab.h - the pool blocks that hold compressed KV pages.
 *
 * A compressed page is smaller than a pool block (an int4 page of 16 tokens
 * takes a seventh of a 16-token f32 block), so a block given to one page
 * format is cut into n_sub equal pages (runtime/kv_compress.c decides n_sub
 * and the page size per format) that any sequence may take. A page id is
 * block * SCHED_SLAB_SUB + index. A block goes back to the block manager as
 * soon as its last page is given back. Sequences therefore hold compressed
 * KV at page granularity, not block granularity: a sequence's partly filled
 * last page wastes at most one page, never most of a block.
 *
 * Threads: the engine thread only. Every argument is checked; bad input is
 * refused or ignored, never an abort.
 */
#ifndef SIEVE_SCHEDULER_KV_SLAB_H
#define SIEVE_SCHEDULER_KV_SLAB_H

#include <stdint.h>

#include "runtime/model.h"
#include "scheduler/block_manager.h"

#define SCHED_SLAB_SUB 16 /* most pages per block; page id = block * 16 + index */
#define SCHED_SLAB_FMTS 16

typedef struct sched_slab sched_slab;

/* A slab over bm's blocks; NULL on bad arguments or no memory. */
sched_slab *sched_slab_create(sched_bm *bm);
void sched_slab_destroy(sched_slab *s);

/* Takes n pages of format fmt (0 .. SCHED_SLAB_FMTS-1) whose blocks hold
 * n_sub (1 .. SCHED_SLAB_SUB) pages, filling partly used blocks of the format
 * first, into ids. 0, or -1 with nothing taken when blocks are short or the
 * arguments are bad (a format must keep the same n_sub). */
int sched_slab_take(sched_slab *s, int fmt, int n_sub, int n, int32_t *ids);

/* Gives back n pages; unknown or already free pages are ignored. */
void sched_slab_give(sched_slab *s, const int32_t *ids, int n);

/* Hands compressed cache q the pages its step of n tokens at n_past needs,
 * class by class. 0, or -1 when blocks are short or q refuses (pages already
 * handed stay with q: it will need them). */
int sched_slab_feed_kvq(sched_slab *s, rt_kvq *q, int n_past, int n);
/* Gives back every page q holds (before destroying q). */
void sched_slab_give_kvq(sched_slab *s, const rt_kvq *q);

/* Fresh blocks that taking n pages of fmt would need now. */
int sched_slab_blocks_needed(const sched_slab *s, int fmt, int n_sub, int n);

/* Blocks the slab holds, all formats together, and pages taken. */
int sched_slab_blocks(const sched_slab *s);
int sched_slab_pages(const sched_slab *s);

/* 0 when every internal invariant holds (lists, counts), else -1. For tests. */
int sched_slab_check(const sched_slab *s);

#endif
