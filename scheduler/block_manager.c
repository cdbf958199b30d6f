/*
 * block_manager.c - paged KV block bookkeeping: refcounts, copy-on-write,
 * prefix caching with LRU eviction. See block_manager.h for the contract and
 * the invariants.
 *
 * Layout: per-block arrays indexed by physical id, allocated once at create.
 *   free list   a stack of ids (pop is O(1); ids come out 0, 1, 2, ... at
 *               first, which keeps tests readable);
 *   LRU list    doubly linked through lru_prev / lru_next, head = least
 *               recently released = next to evict;
 *   hash table  open addressing with linear probing over block ids, keyed by
 *               the block's chain hash, capacity >= 2 * n_blocks so the load
 *               stays <= 1/2. It is a multimap (colliding or duplicate keys
 *               simply sit further along the probe run) and deletes shift
 *               later entries back, so there are no tombstones.
 * A block is registered iff serial[id] != 0; then hash, parent_serial and its
 * block_size tokens in tok[] are valid and it is in the hash table once.
 */
#include "scheduler/block_manager.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define BM_MAX_BLOCKS (1 << 30)
#define BM_MAX_BLOCK_SIZE 65536
#define BM_HASH_ROOT 0x5eed0f5c4ed01e00ull /* parent hash of a sequence's first block */
#define BM_NONE (-1)

struct sched_bm {
    int n_blocks;
    int block_size;
    bool prefix_caching;

    int32_t *ref; /* refcount per block, >= 0 */

    int32_t *free_stack; /* n_free ids, free (refcount 0, unregistered) */
    int n_free;

    int32_t *lru_prev, *lru_next; /* cached blocks, head = oldest */
    int32_t lru_head, lru_tail;
    int n_cached;

    int n_used; /* blocks with refcount > 0 */

    /* Prefix cache; the arrays below are NULL when prefix caching is off. */
    uint64_t *hash;          /* chain hash of a registered block */
    uint64_t *serial;        /* content identity; 0 = not registered */
    uint64_t *parent_serial; /* serial of the parent content (0 for a first block) */
    int32_t *tok;            /* n_blocks * block_size token ids of registered blocks */
    int32_t *slots;          /* hash table of block ids, BM_NONE = empty */
    size_t slot_mask;
    int n_registered;
    uint64_t next_serial;
    sched_bm_hash_fn hash_fn;

    uint64_t query_tokens, hit_tokens;
};

/* ---- hashing ---- */

/* A bijective 64-bit mixer: xor-shifts spread high bits down, odd multipliers
 * spread low bits up; two rounds give full avalanche for our purpose (finding
 * candidates; every hit is verified exactly anyway). */
static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 31;
    x *= 0x9c5a3f1b27d4e86bull;
    x ^= x >> 29;
    x *= 0xc13fa9a902a6328full;
    x ^= x >> 32;
    return x;
}

static uint64_t default_block_hash(uint64_t parent_hash, const int32_t *tokens, int n)
{
    uint64_t h = mix64(parent_hash ^ ((uint64_t)(uint32_t)n * 0x8f1bbcdc6ed9eba1ull));
    int i = 0;
    for (; i + 1 < n; i += 2) {
        uint64_t pair = (uint64_t)(uint32_t)tokens[i] | (uint64_t)(uint32_t)tokens[i + 1] << 32;
        h = mix64(h + 0x6a09e667f3bcc909ull + pair);
    }
    if (i < n)
        h = mix64(h + 0xbb67ae8584caa73bull + (uint64_t)(uint32_t)tokens[i]);
    return h;
}

static inline uint64_t block_hash(const sched_bm *bm, uint64_t parent, const int32_t *tokens)
{
    return bm->hash_fn(parent, tokens, bm->block_size);
}

static inline const int32_t *block_tokens(const sched_bm *bm, int32_t id)
{
    return bm->tok + (size_t)id * (size_t)bm->block_size;
}

static inline bool tokens_equal(const sched_bm *bm, int32_t id, const int32_t *tokens)
{
    return memcmp(block_tokens(bm, id), tokens, (size_t)bm->block_size * sizeof(int32_t)) == 0;
}

/* ---- hash table ---- */

static inline size_t slot_home(const sched_bm *bm, uint64_t h)
{
    return (size_t)(h ^ (h >> 32)) & bm->slot_mask;
}

static void table_insert(sched_bm *bm, int32_t id)
{
    size_t i = slot_home(bm, bm->hash[id]);
    while (bm->slots[i] != BM_NONE)
        i = (i + 1) & bm->slot_mask;
    bm->slots[i] = id;
}

/* Index of id's slot, or SIZE_MAX when it is not in the table. */
static size_t table_slot_of(const sched_bm *bm, int32_t id)
{
    size_t i = slot_home(bm, bm->hash[id]);
    while (bm->slots[i] != BM_NONE) {
        if (bm->slots[i] == id)
            return i;
        i = (i + 1) & bm->slot_mask;
    }
    return SIZE_MAX;
}

/* Removes id and shifts later members of the probe run back into the hole,
 * so every remaining entry stays reachable from its home slot. */
static void table_remove(sched_bm *bm, int32_t id)
{
    size_t hole = table_slot_of(bm, id);
    if (hole == SIZE_MAX)
        return;
    bm->slots[hole] = BM_NONE;
    for (size_t j = (hole + 1) & bm->slot_mask; bm->slots[j] != BM_NONE;
         j = (j + 1) & bm->slot_mask) {
        size_t home = slot_home(bm, bm->hash[bm->slots[j]]);
        /* The entry at j may move to hole unless its home lies cyclically in
         * (hole, j]: then it would be moved in front of its home. */
        bool home_in_between = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (home_in_between)
            continue;
        bm->slots[hole] = bm->slots[j];
        bm->slots[j] = BM_NONE;
        hole = j;
    }
}

/* A registered block with chain hash h, parent content parent_serial and
 * exactly these tokens, or BM_NONE. */
static int32_t table_find(const sched_bm *bm, uint64_t h, uint64_t parent_serial,
                          const int32_t *tokens)
{
    size_t i = slot_home(bm, h);
    while (bm->slots[i] != BM_NONE) {
        int32_t id = bm->slots[i];
        if (bm->hash[id] == h && bm->parent_serial[id] == parent_serial &&
            tokens_equal(bm, id, tokens))
            return id;
        i = (i + 1) & bm->slot_mask;
    }
    return BM_NONE;
}

static void register_block(sched_bm *bm, int32_t id, uint64_t h, uint64_t parent_serial,
                           const int32_t *tokens)
{
    /* Same content under the same parent already registered: share its serial,
     * so children registered under either copy chain from both. */
    int32_t twin = table_find(bm, h, parent_serial, tokens);
    bm->serial[id] = twin != BM_NONE ? bm->serial[twin] : ++bm->next_serial;
    bm->hash[id] = h;
    bm->parent_serial[id] = parent_serial;
    memcpy(bm->tok + (size_t)id * (size_t)bm->block_size, tokens,
           (size_t)bm->block_size * sizeof(int32_t));
    table_insert(bm, id);
    bm->n_registered++;
}

static void unregister_block(sched_bm *bm, int32_t id)
{
    table_remove(bm, id);
    bm->serial[id] = 0;
    bm->n_registered--;
}

/* ---- LRU list of cached blocks ---- */

static void lru_push_tail(sched_bm *bm, int32_t id)
{
    bm->lru_prev[id] = bm->lru_tail;
    bm->lru_next[id] = BM_NONE;
    if (bm->lru_tail != BM_NONE)
        bm->lru_next[bm->lru_tail] = id;
    else
        bm->lru_head = id;
    bm->lru_tail = id;
    bm->n_cached++;
}

static void lru_remove(sched_bm *bm, int32_t id)
{
    int32_t p = bm->lru_prev[id], n = bm->lru_next[id];
    if (p != BM_NONE)
        bm->lru_next[p] = n;
    else
        bm->lru_head = n;
    if (n != BM_NONE)
        bm->lru_prev[n] = p;
    else
        bm->lru_tail = p;
    bm->lru_prev[id] = bm->lru_next[id] = BM_NONE;
    bm->n_cached--;
}

/* ---- block states ---- */

static inline bool is_registered(const sched_bm *bm, int32_t id)
{
    return bm->serial != NULL && bm->serial[id] != 0;
}

/* A fresh block with refcount 1: from the free list, else by evicting the
 * least recently released cached block. BM_NONE when there is neither. */
static int32_t take_block(sched_bm *bm)
{
    int32_t id;
    if (bm->n_free > 0) {
        id = bm->free_stack[--bm->n_free];
    } else if (bm->lru_head != BM_NONE) {
        id = bm->lru_head;
        lru_remove(bm, id);
        unregister_block(bm, id);
    } else {
        return BM_NONE;
    }
    bm->ref[id] = 1;
    bm->n_used++;
    return id;
}

/* One more reference to a block that is used or cached (a prefix hit). */
static void acquire_block(sched_bm *bm, int32_t id)
{
    if (bm->ref[id] == 0) {
        lru_remove(bm, id);
        bm->n_used++;
    }
    bm->ref[id]++;
}

static void drop_block(sched_bm *bm, int32_t id)
{
    if (id < 0 || id >= bm->n_blocks || bm->ref[id] <= 0)
        return; /* out of range or a double release: ignore */
    if (--bm->ref[id] > 0)
        return;
    bm->n_used--;
    if (is_registered(bm, id))
        lru_push_tail(bm, id);
    else
        bm->free_stack[bm->n_free++] = id;
}

/* ---- block tables ---- */

static inline int blocks_for(const sched_bm *bm, int n_tokens)
{
    return n_tokens <= 0 ? 0 : (n_tokens - 1) / bm->block_size + 1;
}

static bool table_is_empty(const sched_block_table *bt)
{
    return bt->blocks == NULL && bt->hashes == NULL && bt->n_blocks == 0 && bt->cap == 0 &&
           bt->n_tokens == 0 && bt->n_hashed == 0;
}

/* The O(1) shape checks every function relies on before indexing bt. */
static bool table_shape_ok(const sched_bm *bm, const sched_block_table *bt)
{
    if (bt->n_blocks < 0 || bt->cap < bt->n_blocks || bt->n_tokens < 0 || bt->n_hashed < 0)
        return false;
    if (bt->n_blocks != blocks_for(bm, bt->n_tokens))
        return false;
    if (bt->n_blocks > 0 && bt->blocks == NULL)
        return false;
    if (bt->n_hashed > bt->n_tokens / bm->block_size || (bt->n_hashed > 0 && bt->hashes == NULL))
        return false;
    return bt->cap == 0 || (bt->blocks != NULL && bt->hashes != NULL);
}

static inline bool block_held(const sched_bm *bm, int32_t id)
{
    return id >= 0 && id < bm->n_blocks && bm->ref[id] > 0;
}

/* Grows bt's arrays to hold at least need blocks (doubling). On failure the
 * arrays may have moved but bt's contents and cap are unchanged. */
static int table_reserve(sched_block_table *bt, int need)
{
    if (need <= bt->cap)
        return 0;
    int cap = bt->cap < 4 ? 4 : bt->cap;
    while (cap < need)
        cap = cap > INT_MAX / 2 ? need : cap * 2;
    int32_t *blocks = realloc(bt->blocks, (size_t)cap * sizeof(*blocks));
    if (blocks == NULL)
        return -1;
    bt->blocks = blocks;
    uint64_t *hashes = realloc(bt->hashes, (size_t)cap * sizeof(*hashes));
    if (hashes == NULL)
        return -1;
    bt->hashes = hashes;
    bt->cap = cap;
    return 0;
}

/* ---- prefix lookup ---- */

typedef struct {
    int hits;   /* leading blocks found in the cache */
    int in_lru; /* of which cached (unreferenced) now */
} prefix_match;

/* Walks the prompt's leading full blocks, all but the last token, through the
 * cache. Writes the hit ids and chain hashes when ids / hashes are given. */
static prefix_match prefix_walk(const sched_bm *bm, const int32_t *tokens, int n_tokens,
                                int32_t *ids, uint64_t *hashes)
{
    prefix_match m = {0, 0};
    if (!bm->prefix_caching || bm->n_registered == 0)
        return m;
    int max_hits = (n_tokens - 1) / bm->block_size;
    uint64_t parent_hash = BM_HASH_ROOT, parent_serial = 0;
    for (int k = 0; k < max_hits; k++) {
        const int32_t *t = tokens + (size_t)k * (size_t)bm->block_size;
        uint64_t h = block_hash(bm, parent_hash, t);
        int32_t id = table_find(bm, h, parent_serial, t);
        if (id == BM_NONE)
            break;
        if (ids != NULL)
            ids[k] = id;
        if (hashes != NULL)
            hashes[k] = h;
        m.hits++;
        m.in_lru += bm->ref[id] == 0;
        parent_hash = h;
        parent_serial = bm->serial[id];
    }
    return m;
}

/* ---- public API ---- */

sched_bm *sched_bm_create(int n_blocks, int block_size, bool prefix_caching)
{
    if (n_blocks < 1 || n_blocks > BM_MAX_BLOCKS || block_size < 1 ||
        block_size > BM_MAX_BLOCK_SIZE)
        return NULL;
    if ((size_t)n_blocks > SIZE_MAX / sizeof(int32_t) / (size_t)block_size)
        return NULL;
    sched_bm *bm = calloc(1, sizeof(*bm));
    if (bm == NULL)
        return NULL;
    size_t n = (size_t)n_blocks;
    bm->n_blocks = n_blocks;
    bm->block_size = block_size;
    bm->prefix_caching = prefix_caching;
    bm->ref = calloc(n, sizeof(int32_t));
    bm->free_stack = malloc(n * sizeof(int32_t));
    bm->lru_prev = malloc(n * sizeof(int32_t));
    bm->lru_next = malloc(n * sizeof(int32_t));
    bool ok = bm->ref && bm->free_stack && bm->lru_prev && bm->lru_next;
    if (ok && prefix_caching) {
        size_t n_slots = 16;
        while (n_slots < 2 * n)
            n_slots *= 2;
        bm->hash = calloc(n, sizeof(uint64_t));
        bm->serial = calloc(n, sizeof(uint64_t));
        bm->parent_serial = calloc(n, sizeof(uint64_t));
        bm->tok = calloc(n * (size_t)block_size, sizeof(int32_t));
        bm->slots = malloc(n_slots * sizeof(int32_t));
        bm->slot_mask = n_slots - 1;
        ok = bm->hash && bm->serial && bm->parent_serial && bm->tok && bm->slots;
        if (ok)
            for (size_t i = 0; i < n_slots; i++)
                bm->slots[i] = BM_NONE;
    }
    if (!ok) {
        sched_bm_destroy(bm);
        return NULL;
    }
    for (int i = 0; i < n_blocks; i++) {
        bm->free_stack[i] = n_blocks - 1 - i; /* pops 0, 1, 2, ... */
        bm->lru_prev[i] = bm->lru_next[i] = BM_NONE;
    }
    bm->n_free = n_blocks;
    bm->lru_head = bm->lru_tail = BM_NONE;
    bm->hash_fn = default_block_hash;
    return bm;
}

void sched_bm_destroy(sched_bm *bm)
{
    if (bm == NULL)
        return;
    free(bm->ref);
    free(bm->free_stack);
    free(bm->lru_prev);
    free(bm->lru_next);
    free(bm->hash);
    free(bm->serial);
    free(bm->parent_serial);
    free(bm->tok);
    free(bm->slots);
    free(bm);
}

int sched_bm_block_size(const sched_bm *bm)
{
    return bm ? bm->block_size : 0;
}
int sched_bm_total(const sched_bm *bm)
{
    return bm ? bm->n_blocks : 0;
}
int sched_bm_free_count(const sched_bm *bm)
{
    return bm ? bm->n_free + bm->n_cached : 0;
}
int sched_bm_used_count(const sched_bm *bm)
{
    return bm ? bm->n_used : 0;
}
int sched_bm_cached_count(const sched_bm *bm)
{
    return bm ? bm->n_cached : 0;
}

int sched_bm_blocks_needed(sched_bm *bm, const int32_t *tokens, int n_tokens)
{
    if (bm == NULL || n_tokens < 1)
        return -1;
    if (tokens == NULL) /* private blocks: no prefix hits */
        return blocks_for(bm, n_tokens);
    prefix_match m = prefix_walk(bm, tokens, n_tokens, NULL, NULL);
    return blocks_for(bm, n_tokens) - m.hits + m.in_lru;
}

static int allocate(sched_bm *bm, sched_block_table *bt, const int32_t *tokens, int n_tokens);

int sched_bm_allocate_prompt(sched_bm *bm, sched_block_table *bt, const int32_t *tokens,
                             int n_tokens)
{
    if (tokens == NULL)
        return -1;
    return allocate(bm, bt, tokens, n_tokens);
}

int sched_bm_allocate_private(sched_bm *bm, sched_block_table *bt, int n_tokens)
{
    if (allocate(bm, bt, NULL, n_tokens) != 0)
        return -1;
    bt->private_blocks = true;
    return 0;
}

/* tokens == NULL: fresh blocks only, no prefix walk. */
static int allocate(sched_bm *bm, sched_block_table *bt, const int32_t *tokens, int n_tokens)
{
    if (bm == NULL || bt == NULL || n_tokens < 1 || !table_is_empty(bt))
        return -1;
    int need = blocks_for(bm, n_tokens);
    if (need > bm->n_blocks)
        return -1;
    int32_t *ids = malloc((size_t)need * sizeof(*ids));
    uint64_t *hashes = malloc((size_t)need * sizeof(*hashes));
    if (ids == NULL || hashes == NULL) {
        free(ids);
        free(hashes);
        return -1;
    }
    prefix_match m = {0, 0};
    if (tokens)
        m = prefix_walk(bm, tokens, n_tokens, ids, hashes);
    if (need - m.hits + m.in_lru > sched_bm_free_count(bm)) {
        free(ids);
        free(hashes);
        return -1;
    }
    /* Hits first: taking them off the LRU list keeps them from being evicted
     * to make room for the new blocks below. */
    for (int k = 0; k < m.hits; k++)
        acquire_block(bm, ids[k]);
    for (int k = m.hits; k < need; k++)
        ids[k] = take_block(bm); /* cannot fail: counted above */
    bt->blocks = ids;
    bt->hashes = hashes;
    bt->n_blocks = bt->cap = need;
    bt->n_tokens = n_tokens;
    bt->n_cached = m.hits * bm->block_size;
    bt->n_hashed = m.hits;
    if (tokens) {
        bm->query_tokens += (uint64_t)n_tokens;
        bm->hit_tokens += (uint64_t)bt->n_cached;
    }
    return 0;
}

int sched_bm_prefix_hits(sched_bm *bm, const int32_t *tokens, int n_tokens, int *in_lru)
{
    if (in_lru)
        *in_lru = 0;
    if (bm == NULL || tokens == NULL || n_tokens < 1)
        return 0;
    prefix_match m = prefix_walk(bm, tokens, n_tokens, NULL, NULL);
    if (in_lru)
        *in_lru = m.in_lru;
    return m.hits;
}

int sched_bm_allocate_prefix(sched_bm *bm, sched_block_table *bt, const int32_t *tokens,
                             int n_tokens)
{
    if (bm == NULL || bt == NULL || tokens == NULL || n_tokens < 1 || !table_is_empty(bt))
        return -1;
    const int max_hits = (n_tokens - 1) / bm->block_size;
    int32_t *ids = malloc((size_t)(max_hits > 0 ? max_hits : 1) * sizeof(*ids));
    uint64_t *hashes = malloc((size_t)(max_hits > 0 ? max_hits : 1) * sizeof(*hashes));
    if (ids == NULL || hashes == NULL) {
        free(ids);
        free(hashes);
        return -1;
    }
    prefix_match m = prefix_walk(bm, tokens, n_tokens, ids, hashes);
    for (int k = 0; k < m.hits; k++)
        acquire_block(bm, ids[k]);
    bt->blocks = ids;
    bt->hashes = hashes;
    bt->n_blocks = m.hits;
    bt->cap = max_hits > 0 ? max_hits : 1;
    bt->n_tokens = bt->n_cached = m.hits * bm->block_size;
    bt->n_hashed = m.hits;
    bm->query_tokens += (uint64_t)n_tokens;
    bm->hit_tokens += (uint64_t)bt->n_cached;
    return 0;
}

int32_t sched_bm_take(sched_bm *bm)
{
    if (bm == NULL)
        return -1;
    const int32_t id = take_block(bm);
    return id == BM_NONE ? -1 : id;
}

void sched_bm_give(sched_bm *bm, int32_t id)
{
    if (bm != NULL)
        drop_block(bm, id);
}

int sched_bm_append(sched_bm *bm, sched_block_table *bt, int n, sched_bm_copy *cow)
{
    if (cow != NULL)
        cow->src = cow->dst = BM_NONE;
    if (bm == NULL || bt == NULL || n < 0 || !table_shape_ok(bm, bt))
        return -1;
    if (n > INT_MAX - bt->n_tokens)
        return -1;
    if (n == 0)
        return 0;
    int last = bt->n_blocks - 1;
    /* A released last block (sched_bm_release_leading) was full: nothing to copy. */
    const bool released = last >= 0 && bt->blocks[last] == -1;
    if (last >= 0 && !released && !block_held(bm, bt->blocks[last]))
        return -1;
    bool partial = !released && bt->n_tokens % bm->block_size != 0;
    bool copy = partial && bm->ref[bt->blocks[last]] > 1;
    if (copy && cow == NULL)
        return -1;
    int need = blocks_for(bm, bt->n_tokens + n);
    int fresh = need - bt->n_blocks;
    if (fresh + (copy ? 1 : 0) > sched_bm_free_count(bm))
        return -1;
    if (table_reserve(bt, need) != 0)
        return -1;
    if (copy) {
        int32_t src = bt->blocks[last];
        int32_t dst = take_block(bm);
        bm->ref[src]--; /* was > 1, so it stays used */
        bt->blocks[last] = dst;
        cow->src = src;
        cow->dst = dst;
    }
    for (int k = bt->n_blocks; k < need; k++)
        bt->blocks[k] = take_block(bm);
    bt->n_blocks = need;
    bt->n_tokens += n;
    return 0;
}

void sched_bm_commit(sched_bm *bm, sched_block_table *bt, const int32_t *tokens, int n_tokens)
{
    if (bm == NULL || bt == NULL || tokens == NULL || n_tokens < 1 || !bm->prefix_caching ||
        bt->private_blocks || !table_shape_ok(bm, bt))
        return;
    int limit = n_tokens < bt->n_tokens ? n_tokens : bt->n_tokens;
    int full = limit / bm->block_size;
    uint64_t parent_hash = BM_HASH_ROOT, parent_serial = 0;
    if (bt->n_hashed > 0) {
        int32_t prev = bt->blocks[bt->n_hashed - 1];
        if (!block_held(bm, prev) || !is_registered(bm, prev))
            return;
        parent_hash = bt->hashes[bt->n_hashed - 1];
        parent_serial = bm->serial[prev];
    }
    for (int k = bt->n_hashed; k < full; k++) {
        int32_t id = bt->blocks[k];
        if (!block_held(bm, id))
            return;
        const int32_t *t = tokens + (size_t)k * (size_t)bm->block_size;
        uint64_t h = block_hash(bm, parent_hash, t);
        if (is_registered(bm, id)) {
            /* Shared through fork or a prefix hit: must be the same content. */
            if (bm->hash[id] != h || bm->parent_serial[id] != parent_serial ||
                !tokens_equal(bm, id, t))
                return;
        } else {
            register_block(bm, id, h, parent_serial, t);
        }
        bt->hashes[k] = h;
        bt->n_hashed = k + 1;
        parent_hash = h;
        parent_serial = bm->serial[id];
    }
}

int sched_bm_fork(sched_bm *bm, const sched_block_table *src, sched_block_table *dst)
{
    if (bm == NULL || src == NULL || dst == NULL || src == dst || !table_is_empty(dst) ||
        !table_shape_ok(bm, src))
        return -1;
    for (int k = 0; k < src->n_blocks; k++)
        if (!block_held(bm, src->blocks[k]))
            return -1;
    if (src->n_blocks == 0)
        return 0;
    int n = src->n_blocks;
    int32_t *blocks = malloc((size_t)n * sizeof(*blocks));
    uint64_t *hashes = malloc((size_t)n * sizeof(*hashes));
    if (blocks == NULL || hashes == NULL) {
        free(blocks);
        free(hashes);
        return -1;
    }
    memcpy(blocks, src->blocks, (size_t)n * sizeof(*blocks));
    if (src->n_hashed > 0)
        memcpy(hashes, src->hashes, (size_t)src->n_hashed * sizeof(*hashes));
    for (int k = 0; k < n; k++)
        bm->ref[blocks[k]]++;
    dst->blocks = blocks;
    dst->hashes = hashes;
    dst->n_blocks = dst->cap = n;
    dst->n_tokens = src->n_tokens;
    dst->n_cached = src->n_cached;
    dst->n_hashed = src->n_hashed;
    return 0;
}

void sched_bm_release(sched_bm *bm, sched_block_table *bt)
{
    if (bt == NULL)
        return;
    if (bm != NULL && bt->blocks != NULL) {
        int n = bt->n_blocks < bt->cap ? bt->n_blocks : bt->cap;
        for (int k = n - 1; k >= 0; k--)
            drop_block(bm, bt->blocks[k]);
    }
    free(bt->blocks);
    free(bt->hashes);
    memset(bt, 0, sizeof(*bt));
}

int sched_bm_release_leading(sched_bm *bm, sched_block_table *bt, int n)
{
    if (bm == NULL || bt == NULL || n < 0 || n > bt->n_blocks || (n > 0 && bt->blocks == NULL))
        return -1;
    for (int k = n - 1; k >= 0; k--) {
        if (bt->blocks[k] >= 0)
            drop_block(bm, bt->blocks[k]);
        bt->blocks[k] = -1;
    }
    return 0;
}

void sched_bm_prefix_stats(const sched_bm *bm, uint64_t *query_tokens, uint64_t *hit_tokens)
{
    if (query_tokens != NULL)
        *query_tokens = bm ? bm->query_tokens : 0;
    if (hit_tokens != NULL)
        *hit_tokens = bm ? bm->hit_tokens : 0;
}

void sched_bm_reset_cache(sched_bm *bm)
{
    if (bm == NULL)
        return;
    while (bm->lru_head != BM_NONE) {
        int32_t id = bm->lru_head;
        lru_remove(bm, id);
        unregister_block(bm, id);
        bm->free_stack[bm->n_free++] = id;
    }
}

int sched_bm_ref_count(const sched_bm *bm, int32_t id)
{
    if (bm == NULL || id < 0 || id >= bm->n_blocks)
        return -1;
    return bm->ref[id];
}

int sched_bm_set_hash_fn(sched_bm *bm, sched_bm_hash_fn fn)
{
    if (bm == NULL || bm->n_registered != 0)
        return -1;
    bm->hash_fn = fn != NULL ? fn : default_block_hash;
    return 0;
}

/* ---- self-check ---- */

enum {
    BM_CHECK_COUNTS = -1,    /* n_free + n_cached + n_used != n_blocks */
    BM_CHECK_REFCOUNT = -2,  /* a negative refcount */
    BM_CHECK_FREE_LIST = -3, /* free list holds a used, registered or repeated block */
    BM_CHECK_LRU = -4,       /* LRU links, length or members wrong */
    BM_CHECK_TABLE = -5,     /* a registered block unreachable, or a stray slot */
    BM_CHECK_STATE = -6,     /* a block in no state or in two */
    BM_CHECK_NO_MEMORY = -7,
};

int sched_bm_check(const sched_bm *bm)
{
    if (bm == NULL)
        return BM_CHECK_STATE;
    if (bm->n_free + bm->n_cached + bm->n_used != bm->n_blocks)
        return BM_CHECK_COUNTS;
    /* seen[id]: 1 = free list, 2 = LRU, 4 = used */
    unsigned char *seen = calloc((size_t)bm->n_blocks, 1);
    if (seen == NULL)
        return BM_CHECK_NO_MEMORY;
    int rc = 0, used = 0, registered = 0;
    for (int i = 0; i < bm->n_blocks && rc == 0; i++) {
        if (bm->ref[i] < 0)
            rc = BM_CHECK_REFCOUNT;
        if (bm->ref[i] > 0) {
            seen[i] |= 4;
            used++;
        }
        registered += is_registered(bm, i);
    }
    if (rc == 0 && used != bm->n_used)
        rc = BM_CHECK_COUNTS;
    for (int k = 0; k < bm->n_free && rc == 0; k++) {
        int32_t id = bm->free_stack[k];
        if (id < 0 || id >= bm->n_blocks || seen[id] || is_registered(bm, id))
            rc = BM_CHECK_FREE_LIST;
        else
            seen[id] |= 1;
    }
    int32_t prev = BM_NONE;
    int n_lru = 0;
    for (int32_t id = bm->lru_head; id != BM_NONE && rc == 0; id = bm->lru_next[id]) {
        if (id < 0 || id >= bm->n_blocks || seen[id] || bm->lru_prev[id] != prev ||
            !is_registered(bm, id) || ++n_lru > bm->n_cached)
            rc = BM_CHECK_LRU;
        else
            seen[id] |= 2;
        prev = id;
    }
    if (rc == 0 && (n_lru != bm->n_cached || bm->lru_tail != prev))
        rc = BM_CHECK_LRU;
    for (int i = 0; i < bm->n_blocks && rc == 0; i++)
        if (seen[i] != 1 && seen[i] != 2 && seen[i] != 4)
            rc = BM_CHECK_STATE;
    if (rc == 0 && bm->prefix_caching) {
        int occupied = 0;
        for (size_t s = 0; s <= bm->slot_mask && rc == 0; s++) {
            int32_t id = bm->slots[s];
            if (id == BM_NONE)
                continue;
            occupied++;
            if (id < 0 || id >= bm->n_blocks || !is_registered(bm, id) ||
                table_slot_of(bm, id) != s)
                rc = BM_CHECK_TABLE;
        }
        if (rc == 0 && (occupied != registered || registered != bm->n_registered))
            rc = BM_CHECK_TABLE;
    }
    free(seen);
    return rc;
}
