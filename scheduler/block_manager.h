/*
 * block_manager.h - paged KV block manager: which physical KV block holds
 * which tokens of which sequence. Bookkeeping only; the KV data itself lives
 * in the runtime's pool of n_blocks blocks of block_size token slots.
 *
 * Every physical block is in exactly one of three states:
 *   used    refcount > 0: referenced by one or more block tables (several
 *           through fork or prefix-cache hits);
 *   cached  refcount == 0 but registered in the prefix cache: kept for later
 *           hits, evictable, on an LRU list (least recently released first);
 *   free    refcount == 0 and not registered: on the free list.
 * so used_count + cached_count + free_count(free part) == total, and
 * sched_bm_free_count() (what can be allocated now) == free + cached.
 *
 * Prefix cache (vLLM's automatic prefix caching). A block is registered once
 * it is full and its tokens are final (allocate_prompt hits, commit). Its key
 * is a chain hash: hash(parent block's chain hash, the block's token ids).
 * The hash only finds candidates; a hit also requires the stored token ids to
 * be equal and the candidate's parent to be the very block content matched
 * one level up (each registered content gets a serial number, and a block
 * records its parent's serial), so a hit is exact even when the 64-bit hash
 * collides, by chance or on purpose. Registered blocks with the same content
 * and the same parent share one serial, so duplicates are harmless.
 *
 * Invariants:
 *   - refcounts never go negative: releasing a block whose refcount is already
 *     0 is detected and ignored;
 *   - a block being written (the partial last block of a table) has refcount
 *     1: append copies a shared partial block first (copy-on-write);
 *   - only full blocks are registered, and a registered block's tokens never
 *     change (it is only ever shared, never written, while registered);
 *   - a table's blocks[0 .. n_blocks) cover exactly its n_tokens slots:
 *     n_blocks == ceil(n_tokens / block_size); hashes[0 .. n_hashed) are the
 *     chain hashes of its first n_hashed blocks, all registered.
 *
 * Threads: the engine thread only; nothing here locks. After creation the
 * only allocation is growing a block table (amortized doubling) and creating
 * one for a new sequence (allocate_prompt, fork). Every argument is checked:
 * bad input returns an error (or is ignored where the function returns void),
 * it never aborts.
 */
#ifndef SIEVE_SCHEDULER_BLOCK_MANAGER_H
#define SIEVE_SCHEDULER_BLOCK_MANAGER_H

#include <stdbool.h>
#include <stdint.h>

typedef struct sched_bm sched_bm;

/* A sequence's block table. Caller-owned storage: zero-initialize it, let the
 * manager fill it (allocate_prompt or fork), and free it with
 * sched_bm_release. The manager owns the arrays; the caller only reads them. */
typedef struct {
    int32_t *blocks; /* physical block ids, logical order */
    int n_blocks, cap;
    int n_tokens;     /* tokens whose KV slots are reserved */
    int n_cached;     /* leading tokens that came from the prefix cache (set by allocate_prompt) */
    uint64_t *hashes; /* hash chain of the full blocks registered so far (n_hashed entries) */
    int n_hashed;
    bool private_blocks; /* allocated by sched_bm_allocate_private: never shared */
} sched_block_table;

/* Copy-on-write: the runtime copies the KV of block src into block dst. */
typedef struct {
    int32_t src, dst;
} sched_bm_copy;

/* Creates a manager for n_blocks blocks (1 .. 2^30) of block_size slots
 * (1 .. 65536). All blocks start free. NULL on bad arguments or no memory. */
sched_bm *sched_bm_create(int n_blocks, int block_size, bool prefix_caching);
/* Frees the manager (accepts NULL). Block tables still alive keep their
 * arrays; release them before, or free them yourself. */
void sched_bm_destroy(sched_bm *bm);

int sched_bm_block_size(const sched_bm *bm);
int sched_bm_total(const sched_bm *bm);
/* Blocks allocatable now: free + evictable cached. */
int sched_bm_free_count(const sched_bm *bm);
/* Blocks referenced by some sequence. */
int sched_bm_used_count(const sched_bm *bm);
/* Unreferenced blocks kept for prefix hits. */
int sched_bm_cached_count(const sched_bm *bm);

/* Reserves slots for a new sequence's n_tokens >= 1 prompt tokens in bt,
 * which must be zeroed (or released). Reuses cached blocks whose hash chain
 * and tokens match the prompt's leading full blocks, but never the whole
 * prompt: at least the last token is computed, so when every block matches
 * the last one is not reused (as in vLLM). Sets bt->n_cached to the reused
 * tokens (a multiple of block_size) and bt->hashes / n_hashed to the reused
 * blocks' chain. Prefix statistics count successful calls only.
 * Returns 0, or -1 (bt untouched, nothing leaked) on bad arguments, a
 * non-empty bt, too few allocatable blocks or no memory for the table. */
int sched_bm_allocate_prompt(sched_bm *bm, sched_block_table *bt, const int32_t *tokens,
                             int n_tokens);

/* Like allocate_prompt, but without prefix hits, and commit never registers
 * the table's blocks: for a sequence whose KV must not be shared (computed
 * under a sparse attention policy, so it differs from dense KV). */
int sched_bm_allocate_private(sched_bm *bm, sched_block_table *bt, int n_tokens);

/* For admission: how many blocks allocate_prompt would take from
 * sched_bm_free_count() right now, i.e. new blocks plus prefix hits that are
 * currently cached (a hit on a cached block takes it out of the evictable
 * pool). allocate_prompt succeeds exactly when this is <= free_count, and then
 * free_count drops by exactly this much. -1 on bad arguments. */
int sched_bm_blocks_needed(sched_bm *bm, const int32_t *tokens, int n_tokens);
/* (tokens == NULL: what allocate_private would take.) */

/* Reserves n >= 0 more slots at the end of bt (decode: n = 1). If bt's last
 * block is partial and shared (refcount > 1), the new slots would write into
 * it, so a private copy is allocated, replaces it in bt, and is reported in
 * *cow ({src, dst}; the caller copies the KV before writing); otherwise
 * cow->src = cow->dst = -1. At most one copy per call. cow may be NULL only
 * when no copy turns out to be needed. Returns 0, or -1 with bt's contents
 * and the manager unchanged when blocks run out, on bad arguments or when the
 * table cannot grow. */
int sched_bm_append(sched_bm *bm, sched_block_table *bt, int n, sched_bm_copy *cow);

/* Registers in the prefix cache every block of bt that is now full with
 * final tokens: tokens[0 .. n_tokens) are the sequence's tokens (prompt +
 * generated) whose KV has been computed; blocks entirely within
 * min(n_tokens, bt->n_tokens) are registered, in order, after the n_hashed
 * ones already done. Idempotent. Stops early (leaving later blocks
 * unregistered) if the tokens contradict what is already registered for bt.
 * No-op when prefix caching is off. */
void sched_bm_commit(sched_bm *bm, sched_block_table *bt, const int32_t *tokens, int n_tokens);

/* For n > 1 choices: dst (zeroed) shares all of src's blocks (each refcount
 * + 1) and copies its counters and hash chain. Returns 0, or -1 on bad
 * arguments (src invalid, dst not empty, dst == src) or when dst's table
 * cannot be allocated; then nothing changed. */
int sched_bm_fork(sched_bm *bm, const sched_block_table *src, sched_block_table *dst);

/* Drops bt's references, last block first. A block whose refcount reaches 0
 * stays cached if it is registered (full, committed), joining the LRU list as
 * the most recently released; otherwise it returns to the free list. Since
 * the last block is released first, a sequence's tail blocks are evicted
 * before its head blocks (a child block is useless without its parent).
 * A block whose refcount is already 0 is skipped (double release). Frees bt's
 * arrays and zeroes bt. Accepts a zeroed bt and NULL. */
void sched_bm_release(sched_bm *bm, sched_block_table *bt);

/* Drops bt's references to its first n blocks (a compressed KV cache holds
 * their tokens elsewhere now) and marks them -1 in bt; n_tokens, the hash
 * chain and the later blocks stay. Registered blocks stay cached for other
 * sequences. Commit must not be called on bt afterwards. Returns 0, or -1 on
 * bad arguments. */
int sched_bm_release_leading(sched_bm *bm, sched_block_table *bt, int n);

/* Fills an empty bt with the prefix-cache hits of tokens alone (full blocks,
 * never the last token): n_tokens = n_cached = the tokens hit, possibly 0. For
 * a sequence whose later KV lives elsewhere (a compressed cache packs its new
 * rows straight into pages). Counts in the prefix statistics. 0, or -1 on bad
 * arguments or no memory. */
int sched_bm_allocate_prefix(sched_bm *bm, sched_block_table *bt, const int32_t *tokens,
                             int n_tokens);

/* Hits allocate_prefix would find now, in blocks, and how many of them are
 * cached (unreferenced), so taking them lowers the free count. */
int sched_bm_prefix_hits(sched_bm *bm, const int32_t *tokens, int n_tokens, int *in_lru);

/* One private block with refcount 1 outside any table (the compressed-page
 * slab cuts it up), or -1 when none is free. */
int32_t sched_bm_take(sched_bm *bm);
/* Gives back a block from sched_bm_take. */
void sched_bm_give(sched_bm *bm, int32_t id);

/* Prompt tokens queried and hit (reused) by allocate_prompt since creation. */
void sched_bm_prefix_stats(const sched_bm *bm, uint64_t *query_tokens, uint64_t *hit_tokens);

/* Drops every cached (unreferenced) block: they become free and can no longer
 * be hit. Blocks in use stay registered. Statistics are kept. */
void sched_bm_reset_cache(sched_bm *bm);

/* Refcount of block id, or -1 when id is out of range. For tests, metrics. */
int sched_bm_ref_count(const sched_bm *bm, int32_t id);

/* Checks every internal invariant in O(n_blocks) (state partition, free list,
 * LRU links, hash table membership, counters). Returns 0 when consistent, a
 * negative code naming the first broken invariant otherwise. For tests. */
int sched_bm_check(const sched_bm *bm);

/* Test hook: replaces the block hash (NULL restores the default), e.g. with a
 * constant to force every lookup through the collision checks. Allowed only
 * while no block is registered; returns 0, or -1 otherwise. */
typedef uint64_t (*sched_bm_hash_fn)(uint64_t parent_hash, const int32_t *tokens, int n);
int sched_bm_set_hash_fn(sched_bm *bm, sched_bm_hash_fn fn);

#endif
