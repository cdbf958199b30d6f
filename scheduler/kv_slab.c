/*
 * kv_slab.c - pool blocks cut into compressed KV pages (see kv_slab.h).
 *
 * Per block: its format (-1: not the slab's), its page count and a bitmask of
 * the pages taken. Per format: a doubly linked list of its blocks that still
 * have a free page, so taking a page is O(1) and a block leaves the list when
 * full and rejoins it when a page comes back.
 */
#include "scheduler/kv_slab.h"

#include <stdbool.h>
#include <stdlib.h>

#define NONE (-1)

struct sched_slab {
    sched_bm *bm;
    int n_blocks;
    int8_t *fmt;    /* [n_blocks] */
    uint8_t *n_sub; /* [n_blocks] */
    uint16_t *used; /* [n_blocks] bit i: page i taken */
    int32_t *next;  /* [n_blocks] partial-list links */
    int32_t *prev;  /* [n_blocks] */
    int32_t head[SCHED_SLAB_FMTS];
    int8_t fmt_sub[SCHED_SLAB_FMTS]; /* n_sub of each format in use, 0: none yet */
    int blocks, pages;
};

sched_slab *sched_slab_create(sched_bm *bm)
{
    if (bm == NULL || sched_bm_total(bm) < 1)
        return NULL;
    sched_slab *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    const size_t n = (size_t)sched_bm_total(bm);
    s->bm = bm;
    s->n_blocks = (int)n;
    s->fmt = malloc(n);
    s->n_sub = calloc(n, 1);
    s->used = calloc(n, sizeof(uint16_t));
    s->next = malloc(n * sizeof(int32_t));
    s->prev = malloc(n * sizeof(int32_t));
    if (!s->fmt || !s->n_sub || !s->used || !s->next || !s->prev) {
        sched_slab_destroy(s);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        s->fmt[i] = -1;
        s->next[i] = s->prev[i] = NONE;
    }
    for (int f = 0; f < SCHED_SLAB_FMTS; f++)
        s->head[f] = NONE;
    return s;
}

void sched_slab_destroy(sched_slab *s)
{
    if (s == NULL)
        return;
    free(s->fmt);
    free(s->n_sub);
    free(s->used);
    free(s->next);
    free(s->prev);
    free(s);
}

static void list_push(sched_slab *s, int f, int32_t b)
{
    s->prev[b] = NONE;
    s->next[b] = s->head[f];
    if (s->head[f] != NONE)
        s->prev[s->head[f]] = b;
    s->head[f] = b;
}

static void list_remove(sched_slab *s, int f, int32_t b)
{
    if (s->prev[b] != NONE)
        s->next[s->prev[b]] = s->next[b];
    else
        s->head[f] = s->next[b];
    if (s->next[b] != NONE)
        s->prev[s->next[b]] = s->prev[b];
    s->next[b] = s->prev[b] = NONE;
}

static inline uint16_t full_mask(int n_sub)
{
    return (uint16_t)((1u << n_sub) - 1u);
}

static void give_one(sched_slab *s, int32_t id)
{
    if (id < 0)
        return;
    const int32_t b = id / SCHED_SLAB_SUB;
    const int i = id % SCHED_SLAB_SUB;
    if (b >= s->n_blocks || s->fmt[b] < 0 || i >= s->n_sub[b] || !(s->used[b] & (1u << i)))
        return; /* not a page taken from this slab */
    const int f = s->fmt[b];
    const bool was_full = s->used[b] == full_mask(s->n_sub[b]);
    s->used[b] = (uint16_t)(s->used[b] & ~(1u << i));
    s->pages--;
    if (s->used[b] == 0) {
        if (!was_full)
            list_remove(s, f, b);
        s->fmt[b] = -1;
        s->n_sub[b] = 0;
        s->blocks--;
        sched_bm_give(s->bm, b);
    } else if (was_full) {
        list_push(s, f, b);
    }
}

void sched_slab_give(sched_slab *s, const int32_t *ids, int n)
{
    if (s == NULL || ids == NULL)
        return;
    for (int k = 0; k < n; k++)
        give_one(s, ids[k]);
}

static bool args_ok(const sched_slab *s, int fmt, int n_sub, int n)
{
    return s != NULL && fmt >= 0 && fmt < SCHED_SLAB_FMTS && n_sub >= 1 &&
           n_sub <= SCHED_SLAB_SUB && n >= 0 && (s->fmt_sub[fmt] == 0 || s->fmt_sub[fmt] == n_sub);
}

int sched_slab_blocks_needed(const sched_slab *s, int fmt, int n_sub, int n)
{
    if (!args_ok(s, fmt, n_sub, n))
        return -1;
    int spare = 0;
    for (int32_t b = s->head[fmt]; b != NONE && spare < n; b = s->next[b])
        spare += n_sub - __builtin_popcount(s->used[b]);
    return n > spare ? (n - spare + n_sub - 1) / n_sub : 0;
}

int sched_slab_take(sched_slab *s, int fmt, int n_sub, int n, int32_t *ids)
{
    if (!args_ok(s, fmt, n_sub, n) || (n > 0 && ids == NULL))
        return -1;
    const int fresh = sched_slab_blocks_needed(s, fmt, n_sub, n);
    if (fresh > sched_bm_free_count(s->bm))
        return -1;
    s->fmt_sub[fmt] = (int8_t)n_sub;
    for (int k = 0; k < n; k++) {
        int32_t b = s->head[fmt];
        if (b == NONE) {
            b = sched_bm_take(s->bm);
            if (b < 0) { /* counted above; only a broken manager gets here */
                sched_slab_give(s, ids, k);
                return -1;
            }
            s->fmt[b] = (int8_t)fmt;
            s->n_sub[b] = (uint8_t)n_sub;
            s->used[b] = 0;
            s->blocks++;
            list_push(s, fmt, b);
        }
        const int i = __builtin_ctz((unsigned)(~s->used[b]) & full_mask(n_sub));
        s->used[b] = (uint16_t)(s->used[b] | (1u << i));
        s->pages++;
        if (s->used[b] == full_mask(n_sub))
            list_remove(s, fmt, b);
        ids[k] = b * SCHED_SLAB_SUB + i;
    }
    return 0;
}

int sched_slab_feed_kvq(sched_slab *s, rt_kvq *q, int n_past, int n)
{
    int need[RT_KVQ_MAX_CLASSES];
    if (!s || !q || rt_kvq_pages_needed(q, n_past, n, need) < 0)
        return -1;
    for (int c = 0; c < RT_KVQ_MAX_CLASSES; c++) {
        int fmt, n_sub;
        int32_t ids[64];
        if (need[c] > 0 && rt_kvq_class_format(q, c, &fmt, &n_sub) != 0)
            return -1;
        for (int left = need[c]; left > 0;) {
            const int k = left < 64 ? left : 64;
            if (sched_slab_take(s, fmt, n_sub, k, ids) != 0)
                return -1;
            if (rt_kvq_add_pages(q, c, ids, k) != 0) {
                sched_slab_give(s, ids, k);
                return -1;
            }
            left -= k;
        }
    }
    return 0;
}

void sched_slab_give_kvq(sched_slab *s, const rt_kvq *q)
{
    for (int c = 0; c < rt_kvq_n_classes(q); c++) {
        const int32_t *ids;
        const int n = rt_kvq_class_pages(q, c, &ids);
        sched_slab_give(s, ids, n);
    }
}

int sched_slab_blocks(const sched_slab *s)
{
    return s ? s->blocks : 0;
}

int sched_slab_pages(const sched_slab *s)
{
    return s ? s->pages : 0;
}

int sched_slab_check(const sched_slab *s)
{
    if (s == NULL)
        return -1;
    int blocks = 0, pages = 0, listed = 0;
    for (int b = 0; b < s->n_blocks; b++) {
        if (s->fmt[b] < 0) {
            if (s->used[b] != 0 || s->next[b] != NONE || s->prev[b] != NONE)
                return -1;
            continue;
        }
        blocks++;
        pages += __builtin_popcount(s->used[b]);
        if (s->used[b] == 0 || sched_bm_ref_count(s->bm, b) != 1)
            return -1;
    }
    for (int f = 0; f < SCHED_SLAB_FMTS; f++)
        for (int32_t b = s->head[f], prev = NONE; b != NONE; prev = b, b = s->next[b]) {
            if (s->fmt[b] != f || s->prev[b] != prev || s->used[b] == full_mask(s->n_sub[b]) ||
                ++listed > s->n_blocks)
                return -1;
        }
    int partial = 0;
    for (int b = 0; b < s->n_blocks; b++)
        partial += s->fmt[b] >= 0 && s->used[b] != full_mask(s->n_sub[b]);
    return blocks == s->blocks && pages == s->pages && partial == listed ? 0 : -1;
}
