/*
 * tokenizer_spm.c - SentencePiece-style BPE tokenizer (tokenizer.ggml.model = llama) that
 * matches llama.cpp token for token, plus the vocabulary core both tokenizer kinds share
 * (piece arena, piece -> id table, decoded bytes per id, special-token list), the public
 * accessors and the GGUF bridge. The byte-level BPE encoder is tokenizer_bpe.c; the struct
 * and the hooks between the files are in tokenizer_internal.h.
 *
 * Encoding: the text is split on special tokens (control, user-defined and unknown pieces,
 * longest piece first); each remaining raw fragment gets a dummy-prefix space when it starts
 * the text or follows a special token, spaces become U+2581, and adjacent symbols are merged
 * best-score-first (leftmost on ties) while their concatenation is a vocabulary piece.
 * Symbols that never became a piece fall back to <0xNN> byte tokens.
 *
 * Invariants:
 * - An rt_tokenizer is immutable once created; rt_tokenize keeps all scratch state in the
 *   call, so one tokenizer can serve many threads.
 * - Pieces live in one arena with explicit lengths (any bytes, NUL-terminated for callers'
 *   convenience). The piece -> id table keeps the highest id for a duplicated piece, because
 *   llama.cpp builds its map by overwriting in id order.
 * - A merged symbol is always a vocabulary piece (a merge happens only when the concatenation
 *   is in the table), so only never-merged symbols can need byte fallback.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif

#include "runtime/tokenizer.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/gguf.h"
#include "runtime/tokenizer_internal.h"

/* U+2581 LOWER ONE EIGHTH BLOCK, SentencePiece's visible space. */
#define SPM_SPACE "\xe2\x96\x81"
#define SPM_SPACE_LEN 3

void rt_tokenizer_set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static inline uint32_t piece_len(const rt_tokenizer *t, uint32_t id)
{
    return (uint32_t)(t->off[id + 1] - t->off[id] - 1);
}

static inline const char *piece_ptr(const rt_tokenizer *t, uint32_t id)
{
    return t->text + t->off[id];
}

/* FNV-1a: pieces are short, so a simple byte loop beats anything clever. */
static inline uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

int32_t rt_tokenizer_lookup(const rt_tokenizer *t, const char *s, size_t n)
{
    if (n == 0 || n > t->max_piece_len) {
        return -1;
    }
    size_t slot = (size_t)hash_bytes(s, n) & t->table_mask;
    for (;;) {
        uint32_t v = t->table[slot];
        if (v == 0) {
            return -1;
        }
        uint32_t id = v - 1;
        if (piece_len(t, id) == n && memcmp(piece_ptr(t, id), s, n) == 0) {
            return (int32_t)id;
        }
        slot = (slot + 1) & t->table_mask;
    }
}

/* Parses "<0xNN>" (either hex case); returns the byte or -1. */
static int parse_byte_piece(const char *s, size_t n)
{
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') {
        return -1;
    }
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9') {
            d = c - '0';
        } else if (c >= 'A' && c <= 'F') {
            d = c - 'A' + 10;
        } else if (c >= 'a' && c <= 'f') {
            d = c - 'a' + 10;
        } else {
            return -1;
        }
        v = v * 16 + d;
    }
    return v;
}

static bool is_special_type(int32_t type)
{
    return type == RT_TOKEN_CONTROL || type == RT_TOKEN_USER_DEFINED || type == RT_TOKEN_UNKNOWN;
}

/* The decoded form follows llama.cpp's token_to_piece with special=false, which is what a
 * completion stream shows: control and unknown tokens vanish, user-defined tokens are
 * printed verbatim (no U+2581 unescaping), anything of another type prints nothing. */
static size_t render_piece(const char *p, size_t n, int32_t type, char *dst)
{
    switch (type) {
    case RT_TOKEN_NORMAL: {
        size_t o = 0;
        for (size_t i = 0; i < n;) {
            if (n - i >= SPM_SPACE_LEN && memcmp(p + i, SPM_SPACE, SPM_SPACE_LEN) == 0) {
                if (dst) {
                    dst[o] = ' ';
                }
                o++;
                i += SPM_SPACE_LEN;
            } else {
                if (dst) {
                    dst[o] = p[i];
                }
                o++;
                i++;
            }
        }
        return o;
    }
    case RT_TOKEN_USER_DEFINED:
        if (dst) {
            memcpy(dst, p, n);
        }
        return n;
    case RT_TOKEN_BYTE: {
        int b = parse_byte_piece(p, n);
        if (b < 0) {
            return 0;
        }
        if (dst) {
            dst[0] = (char)b;
        }
        return 1;
    }
    default:
        return 0;
    }
}

typedef struct {
    uint32_t len;
    int32_t id;
} special_key;

static int cmp_special(const void *a, const void *b)
{
    const special_key *x = a, *y = b;
    if (x->len != y->len) {
        return x->len > y->len ? -1 : 1;
    }
    return (x->id > y->id) - (x->id < y->id);
}

void rt_tokenizer_destroy(rt_tokenizer *t)
{
    if (!t) {
        return;
    }
    free(t->text);
    free(t->off);
    free(t->dec);
    free(t->dec_off);
    free(t->scores);
    free(t->types);
    free(t->table);
    free(t->specials);
    rt_bpe_free(t->bpe);
    free(t);
}

static int validate_id(int32_t id, uint32_t n_vocab, const char *what, char *err, size_t errlen)
{
    if (id < -1 || (id >= 0 && (uint32_t)id >= n_vocab)) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: %s %d is out of range (n_vocab %u)", what, id,
                             n_vocab);
        return -1;
    }
    return 0;
}

int rt_tokenizer_create(rt_tokenizer **out, const rt_vocab_spec *spec, char *err, size_t errlen)
{
    return rt_tokenizer_create_kind(out, spec, NULL, err, errlen);
}

/* The decoded form of a piece: the SentencePiece rendering, or the byte-level one. */
static size_t render(const rt_tokenizer *t, uint32_t id, char *dst)
{
    if (t->kind == RT_TOKENIZER_BPE) {
        return rt_bpe_render_piece(piece_ptr(t, id), piece_len(t, id), t->types[id], dst);
    }
    return render_piece(piece_ptr(t, id), piece_len(t, id), t->types[id], dst);
}

int rt_tokenizer_create_kind(rt_tokenizer **out, const rt_vocab_spec *spec,
                             const rt_bpe_config *bpe, char *err, size_t errlen)
{
    if (!out) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: no output pointer");
        return -1;
    }
    *out = NULL;
    if (!spec) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: no vocabulary spec");
        return -1;
    }
    const uint32_t n = spec->n_vocab;
    /* ids are int32_t and the table stores id + 1 in a uint32_t */
    if (n == 0 || n > (uint32_t)INT32_MAX - 1) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: n_vocab %u is out of range", n);
        return -1;
    }
    if (!spec->pieces) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: no pieces");
        return -1;
    }
    if (validate_id(spec->bos_id, n, "bos_id", err, errlen) ||
        validate_id(spec->eos_id, n, "eos_id", err, errlen) ||
        validate_id(spec->unk_id, n, "unk_id", err, errlen)) {
        return -1;
    }

    size_t total = 0;
    uint32_t max_len = 0;
    for (uint32_t i = 0; i < n; i++) {
        size_t len = spec->piece_lens ? spec->piece_lens[i]
                                      : (spec->pieces[i] ? strlen(spec->pieces[i]) : 0);
        if (len > 0 && !spec->pieces[i]) {
            rt_tokenizer_set_err(err, errlen, "tokenizer: piece %u is NULL", i);
            return -1;
        }
        if (len > UINT32_MAX - 1 || total > SIZE_MAX / 2 - len) {
            rt_tokenizer_set_err(err, errlen, "tokenizer: piece %u is too long", i);
            return -1;
        }
        total += len + 1;
        if (len > max_len) {
            max_len = (uint32_t)len;
        }
    }

    rt_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) {
        goto oom;
    }
    t->kind = bpe ? RT_TOKENIZER_BPE : RT_TOKENIZER_SPM;
    t->n_vocab = n;
    t->max_piece_len = max_len;
    t->bos_id = spec->bos_id;
    t->eos_id = spec->eos_id;
    t->unk_id = spec->unk_id;
    t->add_bos = spec->add_bos;
    t->add_space_prefix = spec->add_space_prefix;

    t->text = malloc(total);
    t->off = malloc(((size_t)n + 1) * sizeof(*t->off));
    t->dec_off = malloc(((size_t)n + 1) * sizeof(*t->dec_off));
    t->scores = malloc((size_t)n * sizeof(*t->scores));
    t->types = malloc((size_t)n * sizeof(*t->types));
    if (!t->text || !t->off || !t->dec_off || !t->scores || !t->types) {
        goto oom;
    }

    size_t pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        size_t len = spec->piece_lens ? spec->piece_lens[i]
                                      : (spec->pieces[i] ? strlen(spec->pieces[i]) : 0);
        t->off[i] = pos;
        if (len) {
            memcpy(t->text + pos, spec->pieces[i], len);
        }
        t->text[pos + len] = '\0';
        pos += len + 1;
        t->scores[i] = spec->scores ? spec->scores[i] : 0.0f;
        if (spec->types) {
            t->types[i] = spec->types[i];
        } else {
            t->types[i] =
                parse_byte_piece(spec->pieces[i], len) >= 0 ? RT_TOKEN_BYTE : RT_TOKEN_NORMAL;
        }
    }
    t->off[n] = pos;

    /* Rendered bytes never exceed the piece (U+2581 and GPT-2's two-byte characters shrink
     * to one byte). */
    size_t dec_total = 0;
    for (uint32_t i = 0; i < n; i++) {
        dec_total += render(t, i, NULL);
    }
    t->dec = malloc(dec_total ? dec_total : 1);
    if (!t->dec) {
        goto oom;
    }
    size_t dpos = 0;
    for (uint32_t i = 0; i < n; i++) {
        t->dec_off[i] = dpos;
        dpos += render(t, i, t->dec + dpos);
    }
    t->dec_off[n] = dpos;

    /* Load factor <= 1/2 keeps probe chains short. */
    size_t cap = 16;
    while (cap < (size_t)n * 2) {
        cap *= 2;
    }
    t->table = calloc(cap, sizeof(*t->table));
    if (!t->table) {
        goto oom;
    }
    t->table_mask = cap - 1;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t len = piece_len(t, i);
        if (len == 0) {
            continue; /* no symbol is ever empty, so an empty piece can never match */
        }
        size_t slot = (size_t)hash_bytes(piece_ptr(t, i), len) & t->table_mask;
        for (;;) {
            uint32_t v = t->table[slot];
            if (v == 0 || (piece_len(t, v - 1) == len &&
                           memcmp(piece_ptr(t, v - 1), piece_ptr(t, i), len) == 0)) {
                t->table[slot] = i + 1; /* a later duplicate replaces the earlier id */
                break;
            }
            slot = (slot + 1) & t->table_mask;
        }
    }

    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        int32_t id = rt_tokenizer_lookup(t, name, 6);
        if (id < 0) {
            /* llama.cpp's second choice: the raw byte as a piece of its own */
            char raw = (char)b;
            id = rt_tokenizer_lookup(t, &raw, 1);
        }
        t->byte_token[b] = id >= 0 ? id : t->unk_id;
    }

    uint32_t n_special = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (is_special_type(t->types[i]) && piece_len(t, i) > 0) {
            n_special++;
        }
    }
    if (n_special) {
        special_key *keys = malloc(n_special * sizeof(*keys));
        t->specials = malloc(n_special * sizeof(*t->specials));
        if (!keys || !t->specials) {
            free(keys);
            goto oom;
        }
        uint32_t k = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (is_special_type(t->types[i]) && piece_len(t, i) > 0) {
                keys[k].len = piece_len(t, i);
                keys[k].id = (int32_t)i;
                k++;
            }
        }
        /* Longest first so "<|a|>x" wins over "<|a|>"; equal lengths go by id so the
         * order is deterministic (llama.cpp leaves it to an unstable sort). */
        qsort(keys, n_special, sizeof(*keys), cmp_special);
        for (uint32_t i = 0; i < n_special; i++) {
            t->specials[i] = keys[i].id;
        }
        free(keys);
        t->n_specials = n_special;
    }

    if (bpe && rt_bpe_build(t, bpe, err, errlen) != 0) {
        rt_tokenizer_destroy(t);
        return -1;
    }
    *out = t;
    return 0;

oom:
    rt_tokenizer_destroy(t);
    rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
    return -1;
}

uint32_t rt_tokenizer_n_vocab(const rt_tokenizer *t)
{
    return t ? t->n_vocab : 0;
}

int32_t rt_tokenizer_bos(const rt_tokenizer *t)
{
    return t ? t->bos_id : -1;
}

int32_t rt_tokenizer_eos(const rt_tokenizer *t)
{
    return t ? t->eos_id : -1;
}

bool rt_tokenizer_add_bos(const rt_tokenizer *t)
{
    return t && t->add_bos;
}

rt_tokenizer_kind rt_tokenizer_get_kind(const rt_tokenizer *t)
{
    return t ? t->kind : RT_TOKENIZER_SPM;
}

int rt_tokenizer_set_special_ids(rt_tokenizer *t, int32_t bos_id, int32_t eos_id, char *err,
                                 size_t errlen)
{
    if (!t) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: no tokenizer");
        return -1;
    }
    if (validate_id(bos_id, t->n_vocab, "bos_id", err, errlen) ||
        validate_id(eos_id, t->n_vocab, "eos_id", err, errlen)) {
        return -1;
    }
    t->bos_id = bos_id;
    t->eos_id = eos_id;
    return 0;
}

const char *rt_token_piece(const rt_tokenizer *t, int32_t id, size_t *len)
{
    if (!t || id < 0 || (uint32_t)id >= t->n_vocab) {
        if (len) {
            *len = 0;
        }
        return NULL;
    }
    if (len) {
        *len = piece_len(t, (uint32_t)id);
    }
    return piece_ptr(t, (uint32_t)id);
}

int rt_token_type(const rt_tokenizer *t, int32_t id)
{
    if (!t || id < 0 || (uint32_t)id >= t->n_vocab) {
        return 0;
    }
    return t->types[id];
}

size_t rt_token_to_bytes(const rt_tokenizer *t, int32_t id, char *buf, size_t cap)
{
    if (!t || id < 0 || (uint32_t)id >= t->n_vocab) {
        return 0;
    }
    size_t n = t->dec_off[id + 1] - t->dec_off[id];
    if (buf && cap) {
        memcpy(buf, t->dec + t->dec_off[id], n < cap ? n : cap);
    }
    return n;
}

/* --- encoding ----------------------------------------------------------------------------- */

/* A piece of the input: raw text (id < 0) or a special token found in it. */
typedef struct {
    size_t off, len;
    int32_t id;
} fragment;

typedef struct {
    fragment *v;
    size_t n, cap;
} frag_buf;

static int frag_push(frag_buf *b, size_t off, size_t len, int32_t id)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 16;
        fragment *v = realloc(b->v, cap * sizeof(*v));
        if (!v) {
            return -1;
        }
        b->v = v;
        b->cap = cap;
    }
    b->v[b->n++] = (fragment){off, len, id};
    return 0;
}

/* Splits raw fragments on each special piece in turn, longest piece first, the way
 * llama.cpp does: a whole pass per special token rather than one leftmost-longest scan, so
 * overlapping specials resolve identically. Control and unknown pieces only count when
 * parse_special is on; user-defined pieces always do (llama.cpp pre-splits them regardless,
 * mirroring Hugging Face tokenizers' added tokens). */
static int partition(const rt_tokenizer *t, const char *text, size_t len, bool parse_special,
                     frag_buf *frags, frag_buf *tmp)
{
    if (len == 0) {
        return 0;
    }
    if (frag_push(frags, 0, len, -1)) {
        return -1;
    }
    for (uint32_t s = 0; s < t->n_specials; s++) {
        int32_t id = t->specials[s];
        if (!parse_special && t->types[id] != RT_TOKEN_USER_DEFINED) {
            continue;
        }
        const char *p = piece_ptr(t, (uint32_t)id);
        size_t plen = piece_len(t, (uint32_t)id);

        bool found = false;
        for (size_t i = 0; i < frags->n && !found; i++) {
            const fragment *f = &frags->v[i];
            found = f->id < 0 && memmem(text + f->off, f->len, p, plen) != NULL;
        }
        if (!found) {
            continue;
        }

        tmp->n = 0;
        for (size_t i = 0; i < frags->n; i++) {
            fragment f = frags->v[i];
            if (f.id >= 0) {
                if (frag_push(tmp, f.off, f.len, f.id)) {
                    return -1;
                }
                continue;
            }
            size_t pos = f.off, end = f.off + f.len;
            while (pos < end) {
                const char *hit = memmem(text + pos, end - pos, p, plen);
                if (!hit) {
                    break;
                }
                size_t h = (size_t)(hit - text);
                if (h > pos && frag_push(tmp, pos, h - pos, -1)) {
                    return -1;
                }
                if (frag_push(tmp, h, plen, id)) {
                    return -1;
                }
                pos = h + plen;
            }
            if (pos < end && frag_push(tmp, pos, end - pos, -1)) {
                return -1;
            }
        }
        frag_buf swap = *frags;
        *frags = *tmp;
        *tmp = swap;
    }
    return 0;
}

/* A run of bytes in the escaped fragment; n == 0 once merged into its left neighbour. */
typedef struct {
    int32_t prev, next;
    uint32_t off, n;
    int32_t id; /* vocabulary id of the run, -1 if it is not a piece */
} symbol;

/* A candidate merge of left and right; stale once either side changed (detected lazily on
 * pop by the size no longer matching, since runs only ever grow or vanish). */
typedef struct {
    float score;
    int32_t left, right;
    uint32_t size;
    int32_t id;
} bigram;

typedef struct {
    char *esc;
    size_t esc_cap;
    symbol *sym;
    bigram *heap;
    size_t heap_n;
} bpe_scratch;

/* Heap order: higher score first, then the leftmost pair. */
static inline bool bigram_before(const bigram *a, const bigram *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(bpe_scratch *s, bigram g)
{
    size_t i = s->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!bigram_before(&g, &s->heap[parent])) {
            break;
        }
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = g;
}

static bigram heap_pop(bpe_scratch *s)
{
    bigram top = s->heap[0];
    bigram last = s->heap[--s->heap_n];
    size_t n = s->heap_n, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) {
            break;
        }
        if (c + 1 < n && bigram_before(&s->heap[c + 1], &s->heap[c])) {
            c++;
        }
        if (!bigram_before(&s->heap[c], &last)) {
            break;
        }
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n > 0) {
        s->heap[i] = last;
    }
    return top;
}

static void try_pair(const rt_tokenizer *t, bpe_scratch *s, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) {
        return;
    }
    const symbol *l = &s->sym[left], *r = &s->sym[right];
    uint32_t size = l->n + r->n;
    int32_t id = rt_tokenizer_lookup(t, s->esc + l->off, size);
    if (id < 0) {
        return;
    }
    heap_push(s, (bigram){t->scores[id], left, right, size, id});
}

/* llama.cpp sizes a symbol by its lead byte alone and does not check continuation bytes:
 * 0xC0-0xDF take 2 bytes, 0xE0-0xEF 3, 0xF0-0xFF 4 (clamped at the end), anything else 1.
 * Reproducing that keeps invalid input tokenized exactly as llama.cpp would. */
static inline uint32_t lead_len(unsigned char c)
{
    static const uint8_t by_high_nibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return by_high_nibble[c >> 4];
}

static int encode_raw(const rt_tokenizer *t, const char *src, size_t len, bool prefix,
                      bpe_scratch *s, rt_id_buf *out)
{
    /* escape: optional dummy prefix, then ' ' -> U+2581 */
    size_t n = 0;
    if (prefix) {
        memcpy(s->esc, SPM_SPACE, SPM_SPACE_LEN);
        n = SPM_SPACE_LEN;
    }
    for (size_t i = 0; i < len; i++) {
        if (src[i] == ' ') {
            memcpy(s->esc + n, SPM_SPACE, SPM_SPACE_LEN);
            n += SPM_SPACE_LEN;
        } else {
            s->esc[n++] = src[i];
        }
    }

    int32_t n_sym = 0;
    for (size_t off = 0; off < n;) {
        uint32_t w = lead_len((unsigned char)s->esc[off]);
        if (w > n - off) {
            w = (uint32_t)(n - off);
        }
        symbol *y = &s->sym[n_sym];
        y->prev = n_sym - 1;
        y->next = off + w < n ? n_sym + 1 : -1;
        y->off = (uint32_t)off;
        y->n = w;
        y->id = rt_tokenizer_lookup(t, s->esc + off, w);
        n_sym++;
        off += w;
    }

    s->heap_n = 0;
    for (int32_t i = 1; i < n_sym; i++) {
        try_pair(t, s, i - 1, i);
    }
    while (s->heap_n > 0) {
        bigram g = heap_pop(s);
        symbol *l = &s->sym[g.left], *r = &s->sym[g.right];
        if (l->n == 0 || r->n == 0 || l->next != g.right || l->n + r->n != g.size) {
            continue;
        }
        l->n += r->n;
        l->id = g.id;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) {
            s->sym[r->next].prev = g.left;
        }
        try_pair(t, s, l->prev, g.left);
        try_pair(t, s, g.left, l->next);
    }

    for (int32_t i = n_sym > 0 ? 0 : -1; i >= 0; i = s->sym[i].next) {
        const symbol *y = &s->sym[i];
        if (y->id >= 0) {
            if (rt_id_buf_push(out, y->id)) {
                return -1;
            }
            continue;
        }
        for (uint32_t k = 0; k < y->n; k++) {
            int32_t b = t->byte_token[(unsigned char)s->esc[y->off + k]];
            if (b >= 0 && rt_id_buf_push(out, b)) {
                return -1;
            }
        }
    }
    return 0;
}

/* Whether raw fragment f gets the dummy prefix (see rt_spm_prefix). */
static bool wants_prefix(const rt_tokenizer *t, const char *text, const fragment *f,
                         bool after_special)
{
    if (!t->add_space_prefix || !after_special) {
        return false;
    }
    if (t->prefix_mode == RT_SPM_PREFIX_EACH) {
        return true;
    }
    bool starts_with_space =
        text[f->off] == ' ' ||
        (f->len >= SPM_SPACE_LEN && memcmp(text + f->off, SPM_SPACE, SPM_SPACE_LEN) == 0);
    return !starts_with_space && (t->prefix_mode != RT_SPM_PREFIX_FIRST || f->off == 0);
}

int rt_tokenize(const rt_tokenizer *t, const char *text, size_t len, bool add_bos,
                bool parse_special, int32_t **tokens, size_t *n)
{
    *tokens = NULL;
    *n = 0;
    if (!t) {
        return -1;
    }
    if (t->kind == RT_TOKENIZER_BPE) {
        return rt_bpe_tokenize(t, text, len, add_bos, parse_special, tokens, n);
    }
    /* Symbol offsets are 32-bit and the escaped text can triple; anything this large could
     * not be allocated sensibly anyway, so it is reported as an allocation failure. */
    if (len > (size_t)INT32_MAX / 4) {
        return -1;
    }
    if (len > 0 && !text) {
        return -1;
    }

    rt_id_buf out = {0};
    frag_buf frags = {0}, tmp = {0};
    bpe_scratch s = {0};
    int rc = -1;

    if (add_bos && t->add_bos && t->bos_id >= 0 && rt_id_buf_push(&out, t->bos_id)) {
        goto done;
    }
    if (partition(t, text, len, parse_special, &frags, &tmp)) {
        goto done;
    }

    size_t longest = 0;
    for (size_t i = 0; i < frags.n; i++) {
        if (frags.v[i].id < 0 && frags.v[i].len > longest) {
            longest = frags.v[i].len;
        }
    }
    if (longest > 0) {
        /* worst case: every byte a space, plus the dummy prefix */
        s.esc_cap = (longest + 1) * SPM_SPACE_LEN;
        s.esc = malloc(s.esc_cap);
        s.sym = malloc(s.esc_cap * sizeof(*s.sym));
        /* n-1 seed pairs plus at most two new pairs per merge (n-1 merges) */
        s.heap = malloc(3 * s.esc_cap * sizeof(*s.heap));
        if (!s.esc || !s.sym || !s.heap) {
            goto done;
        }
    }

    bool after_special = true; /* the text's start counts as following a special token */
    for (size_t i = 0; i < frags.n; i++) {
        const fragment *f = &frags.v[i];
        if (f->id >= 0) {
            if (rt_id_buf_push(&out, f->id)) {
                goto done;
            }
            after_special = true;
            continue;
        }
        if (encode_raw(t, text + f->off, f->len, wants_prefix(t, text, f, after_special), &s,
                       &out)) {
            goto done;
        }
        after_special = false;
    }

    if (out.n == 0) {
        free(out.v);
        out.v = NULL;
    }
    *tokens = out.v;
    *n = out.n;
    out.v = NULL;
    rc = 0;

done:
    free(out.v);
    free(frags.v);
    free(tmp.v);
    free(s.esc);
    free(s.sym);
    free(s.heap);
    return rc;
}

/* --- GGUF bridge -------------------------------------------------------------------------- */

/* Reads an optional special-token id. llama.cpp starts from fixed defaults for the llama
 * tokenizer (unk 0, bos 1, eos 2) and keeps the default when the key holds an id outside the
 * vocabulary (0xFFFFFFFF included), so a file without the keys still gets BOS prepended. */
static int gguf_token_id(const rt_gguf *g, const char *key, int32_t dflt, uint32_t n_vocab,
                         int32_t *out, char *err, size_t errlen)
{
    *out = dflt >= 0 && (uint32_t)dflt < n_vocab ? dflt : -1;
    uint64_t v;
    int r = rt_gguf_get_uint(g, key, &v);
    if (r == -1) {
        return 0;
    }
    if (r == -2) {
        const rt_gguf_kv *kv = rt_gguf_find_kv(g, key);
        bool negative_int = kv &&
                            (kv->type == RT_GGUF_INT8 || kv->type == RT_GGUF_INT16 ||
                             kv->type == RT_GGUF_INT32 || kv->type == RT_GGUF_INT64) &&
                            kv->v.i < 0;
        if (negative_int) {
            return 0; /* some converters write -1 for "none" */
        }
        rt_tokenizer_set_err(err, errlen, "tokenizer: %s is not an integer", key);
        return -1;
    }
    if (v < n_vocab) {
        *out = (int32_t)v;
    }
    return 0;
}

static int gguf_flag(const rt_gguf *g, const char *key, bool dflt, bool *out, char *err,
                     size_t errlen)
{
    *out = dflt;
    bool v;
    int r = rt_gguf_get_bool(g, key, &v);
    if (r == -1) {
        return 0;
    }
    if (r != 0) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: %s is not a boolean", key);
        return -1;
    }
    *out = v;
    return 0;
}

/* Finds an optional per-token array and checks it has one entry per token. */
static int gguf_vocab_array(const rt_gguf *g, const char *key, uint32_t n_vocab,
                            const rt_gguf_kv **out, char *err, size_t errlen)
{
    *out = NULL;
    const rt_gguf_kv *kv = rt_gguf_find_kv(g, key);
    if (!kv) {
        return 0;
    }
    if (kv->type != RT_GGUF_ARRAY) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: %s is %s, not an array", key,
                             rt_gguf_type_name(kv->type));
        return -1;
    }
    if (kv->v.arr.n != n_vocab) {
        rt_tokenizer_set_err(err, errlen,
                             "tokenizer: %s has %llu entries but tokenizer.ggml.tokens has %u", key,
                             (unsigned long long)kv->v.arr.n, n_vocab);
        return -1;
    }
    *out = kv;
    return 0;
}

/* Reads tokenizer.ggml.pre for a "gpt2" vocabulary into the pre-tokenizer steps. */
static int gguf_bpe_pretok(const rt_gguf *g, rt_bpe_config *cfg, bool *add_bos, char *err,
                           size_t errlen)
{
    const rt_gguf_kv *pre = rt_gguf_find_kv(g, "tokenizer.ggml.pre");
    if (!pre) {
        rt_tokenizer_set_err(err, errlen,
                             "tokenizer: tokenizer.ggml.model \"gpt2\" needs tokenizer.ggml.pre "
                             "(the pre-tokenizer's name), which is missing");
        return -1;
    }
    if (pre->type != RT_GGUF_STRING) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: tokenizer.ggml.pre is %s, not a string",
                             rt_gguf_type_name(pre->type));
        return -1;
    }
    if (pre->v.str.len > 64 ||
        rt_bpe_pretok_from_gguf_name(pre->v.str.ptr, (size_t)pre->v.str.len, cfg, add_bos) != 0) {
        int shown = pre->v.str.len > 64 ? 64 : (int)pre->v.str.len;
        rt_tokenizer_set_err(err, errlen,
                             "tokenizer: unsupported tokenizer.ggml.pre \"%.*s\" for "
                             "tokenizer.ggml.model \"gpt2\" (supported: llama-bpe, llama3, "
                             "llama-v3, qwen2, smollm, gpt-2, gpt2)",
                             shown, pre->v.str.ptr);
        return -1;
    }
    return 0;
}

/* Reads tokenizer.ggml.merges ("left right" strings, by rank) for a "gpt2" vocabulary; the
 * merges point into the GGUF strings, *merges is malloc-ed. */
static int gguf_bpe_merges(const rt_gguf *g, rt_bpe_config *cfg, rt_bpe_merge **merges, char *err,
                           size_t errlen)
{
    *merges = NULL;
    const rt_gguf_kv *kv = rt_gguf_find_kv(g, "tokenizer.ggml.merges");
    if (!kv) {
        rt_tokenizer_set_err(err, errlen,
                             "tokenizer: tokenizer.ggml.model \"gpt2\" needs "
                             "tokenizer.ggml.merges, which is missing");
        return -1;
    }
    if (kv->type != RT_GGUF_ARRAY || kv->v.arr.type != RT_GGUF_STRING ||
        (kv->v.arr.n > 0 && !kv->v.arr.strs)) {
        rt_tokenizer_set_err(err, errlen,
                             "tokenizer: tokenizer.ggml.merges is not an array of strings");
        return -1;
    }
    if (kv->v.arr.n > (uint64_t)INT32_MAX) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: tokenizer.ggml.merges has %llu entries",
                             (unsigned long long)kv->v.arr.n);
        return -1;
    }
    const uint32_t n = (uint32_t)kv->v.arr.n;
    rt_bpe_merge *m = malloc((n ? n : 1) * sizeof(*m));
    if (!m) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    for (uint32_t i = 0; i < n; i++) {
        const rt_gguf_str *str = &kv->v.arr.strs[i];
        /* llama.cpp splits at the first space after the first byte */
        const char *sp = str->len > 1 ? memchr(str->ptr + 1, ' ', (size_t)str->len - 1) : NULL;
        if (!sp || str->len > UINT32_MAX || sp + 1 == str->ptr + str->len) {
            int shown = str->len > 64 ? 64 : (int)str->len;
            rt_tokenizer_set_err(err, errlen,
                                 "tokenizer: tokenizer.ggml.merges[%u] \"%.*s\" is not two "
                                 "pieces separated by a space",
                                 i, shown, str->ptr);
            free(m);
            return -1;
        }
        m[i].left = str->ptr;
        m[i].left_len = (uint32_t)(sp - str->ptr);
        m[i].right = sp + 1;
        m[i].right_len = (uint32_t)(str->len - m[i].left_len - 1);
    }
    cfg->merges = m;
    cfg->n_merges = n;
    *merges = m;
    return 0;
}

int rt_tokenizer_from_gguf(rt_tokenizer **out, const struct rt_gguf *g, char *err, size_t errlen)
{
    if (!out) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: no output pointer");
        return -1;
    }
    *out = NULL;
    if (!g) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: no GGUF file");
        return -1;
    }

    const rt_gguf_kv *model = rt_gguf_find_kv(g, "tokenizer.ggml.model");
    if (!model) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: tokenizer.ggml.model is missing");
        return -1;
    }
    if (model->type != RT_GGUF_STRING) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: tokenizer.ggml.model is %s, not a string",
                             rt_gguf_type_name(model->type));
        return -1;
    }
    const bool is_bpe = rt_gguf_str_eq(model->v.str, "gpt2");
    if (!is_bpe && !rt_gguf_str_eq(model->v.str, "llama")) {
        int shown = model->v.str.len > 64 ? 64 : (int)model->v.str.len;
        rt_tokenizer_set_err(err, errlen,
                             "tokenizer: unsupported tokenizer.ggml.model \"%.*s\" (supported: "
                             "\"llama\", SentencePiece BPE, and \"gpt2\", byte-level BPE)",
                             shown, model->v.str.ptr);
        return -1;
    }
    rt_bpe_config bpe = {0};
    bool bpe_add_bos = false;
    if (is_bpe && gguf_bpe_pretok(g, &bpe, &bpe_add_bos, err, errlen) != 0) {
        return -1;
    }

    const rt_gguf_kv *toks = rt_gguf_find_kv(g, "tokenizer.ggml.tokens");
    if (!toks) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: tokenizer.ggml.tokens is missing");
        return -1;
    }
    if (toks->type != RT_GGUF_ARRAY || toks->v.arr.type != RT_GGUF_STRING) {
        rt_tokenizer_set_err(err, errlen,
                             "tokenizer: tokenizer.ggml.tokens is not an array of strings");
        return -1;
    }
    if (toks->v.arr.n == 0 || toks->v.arr.n > (uint64_t)INT32_MAX - 1 || !toks->v.arr.strs) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: tokenizer.ggml.tokens has %llu entries",
                             (unsigned long long)toks->v.arr.n);
        return -1;
    }
    const uint32_t n = (uint32_t)toks->v.arr.n;

    const rt_gguf_kv *scores_kv, *types_kv;
    if (gguf_vocab_array(g, "tokenizer.ggml.scores", n, &scores_kv, err, errlen) ||
        gguf_vocab_array(g, "tokenizer.ggml.token_type", n, &types_kv, err, errlen)) {
        return -1;
    }

    /* The SentencePiece defaults are llama.cpp's; a byte-level vocabulary has no fixed
     * special ids, so absent keys mean none. */
    rt_vocab_spec spec = {.n_vocab = n};
    if (gguf_token_id(g, "tokenizer.ggml.bos_token_id", is_bpe ? -1 : 1, n, &spec.bos_id, err,
                      errlen) ||
        gguf_token_id(g, "tokenizer.ggml.eos_token_id", is_bpe ? -1 : 2, n, &spec.eos_id, err,
                      errlen) ||
        gguf_token_id(g, "tokenizer.ggml.unknown_token_id", is_bpe ? -1 : 0, n, &spec.unk_id, err,
                      errlen) ||
        gguf_flag(g, "tokenizer.ggml.add_bos_token", is_bpe ? bpe_add_bos : true, &spec.add_bos,
                  err, errlen) ||
        gguf_flag(g, "tokenizer.ggml.add_space_prefix", !is_bpe, &spec.add_space_prefix, err,
                  errlen)) {
        return -1;
    }

    int rc = -1;
    rt_bpe_merge *merges = NULL;
    if (is_bpe && gguf_bpe_merges(g, &bpe, &merges, err, errlen) != 0) {
        return -1;
    }
    const char **pieces = malloc((size_t)n * sizeof(*pieces));
    uint32_t *lens = malloc((size_t)n * sizeof(*lens));
    float *scores = scores_kv ? malloc((size_t)n * sizeof(*scores)) : NULL;
    int32_t *types = types_kv ? malloc((size_t)n * sizeof(*types)) : NULL;
    if (!pieces || !lens || (scores_kv && !scores) || (types_kv && !types)) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
        goto done;
    }
    for (uint32_t i = 0; i < n; i++) {
        const rt_gguf_str *str = &toks->v.arr.strs[i];
        if (str->len > UINT32_MAX - 1) {
            rt_tokenizer_set_err(err, errlen, "tokenizer: tokenizer.ggml.tokens[%u] is too long",
                                 i);
            goto done;
        }
        pieces[i] = str->ptr;
        lens[i] = (uint32_t)str->len;
        if (scores) {
            double d;
            if (rt_gguf_arr_float(scores_kv, i, &d)) {
                rt_tokenizer_set_err(err, errlen,
                                     "tokenizer: tokenizer.ggml.scores holds %s, not floats",
                                     rt_gguf_type_name(scores_kv->v.arr.type));
                goto done;
            }
            scores[i] = (float)d;
        }
        if (types) {
            int64_t v;
            if (rt_gguf_arr_int(types_kv, i, &v) || v < INT32_MIN || v > INT32_MAX) {
                rt_tokenizer_set_err(
                    err, errlen, "tokenizer: tokenizer.ggml.token_type holds %s, not int32 values",
                    rt_gguf_type_name(types_kv->v.arr.type));
                goto done;
            }
            types[i] = (int32_t)v;
        }
    }
    spec.pieces = pieces;
    spec.piece_lens = lens;
    spec.scores = scores;
    spec.types = types;
    rc = rt_tokenizer_create_kind(out, &spec, is_bpe ? &bpe : NULL, err, errlen);

done:
    free(merges);
    free(pieces);
    free(lens);
    free(scores);
    free(types);
    return rc;
}
