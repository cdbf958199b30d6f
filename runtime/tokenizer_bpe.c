/*
 * tokenizer_bpe.c - byte-level BPE (GPT-2 style, as Llama 3, Qwen2 and SmolLM use it) that
 * matches Hugging Face tokenizers token for token.
 *
 * Encoding, per call:
 *  1. added tokens are found leftmost-longest in the text (special ones only when
 *     parse_special is on; lstrip / rstrip / single_word as tokenizer.json sets them);
 *  2. every stretch of text between them is normalized to NFC when the tokenizer says so;
 *  3. the pre-tokenizer steps split it into pieces: the Llama 3 / Qwen2 / GPT-2 regexes are
 *     implemented here directly (there is no regex engine), with Oniguruma's leftmost-first
 *     alternation and backtracking worked out per alternative;
 *  4. each piece is split into bytes, each byte standing for the one-character piece of
 *     GPT-2's printable alphabet, and adjacent symbols are merged lowest rank first
 *     (leftmost on ties) with a heap, as Hugging Face's Word::merge_all does.
 * Decoding maps each piece's characters back through the alphabet to bytes.
 *
 * Invariants:
 *  - The tables built here (merges, whole-piece index, added-token buckets) are immutable
 *    after rt_bpe_build; all scratch state lives in the rt_bpe_tokenize call.
 *  - Invalid UTF-8 never stops encoding: each invalid byte is one punctuation-like character
 *    for the pre-tokenizers, passes NFC unchanged and is still one byte for the merges, so
 *    every byte of the input reaches the output and decoding restores it.
 *  - \p{L} and \p{N} come from runtime/unicode_tables.h (see tools/gen_unicode_tables.py);
 *    \s is Unicode White_Space, as in Oniguruma.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/tokenizer_internal.h"
#include "runtime/unicode_tables.h"

/* --- GPT-2's byte <-> character alphabet ---------------------------------------------------
 * Printable Latin-1 bytes stand for themselves; the other 68 bytes (0-32, 127-160, 173) are
 * moved, in order, to U+0100..U+0143, so every byte is one visible character. */

static uint32_t byte_to_cp(uint8_t b)
{
    if (b <= 32) {
        return 256u + b;
    }
    if (b >= 127 && b <= 160) {
        return (uint32_t)b + 162u; /* 127 -> 289 = 256 + 33 */
    }
    if (b == 173) {
        return 323;
    }
    return b;
}

static int cp_to_byte(uint32_t cp)
{
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255)) {
        return (int)cp;
    }
    if (cp >= 256 && cp <= 288) {
        return (int)(cp - 256);
    }
    if (cp >= 289 && cp <= 322) {
        return (int)(cp - 162);
    }
    if (cp == 323) {
        return 173;
    }
    return -1;
}

/* --- UTF-8 ---------------------------------------------------------------------------------- */

/* Marks an invalid byte b as the code point CP_INVALID + b: outside Unicode, so no table
 * matches it, and the byte itself is recoverable. */
#define CP_INVALID 0x110000u

/* Decodes one character at s[0..n) strictly (no overlongs, surrogates or values past
 * U+10FFFF); an invalid sequence yields its first byte alone as CP_INVALID + byte. */
static uint32_t utf8_next(const uint8_t *s, size_t n, uint32_t *cp)
{
    uint8_t c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    uint32_t len, v, min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, v = c & 0x1Fu, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, v = c & 0x0Fu, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, v = c & 0x07u, min = 0x10000;
    } else {
        *cp = CP_INVALID + c;
        return 1;
    }
    if (len > n) {
        *cp = CP_INVALID + c;
        return 1;
    }
    for (uint32_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            *cp = CP_INVALID + c;
            return 1;
        }
        v = (v << 6) | (s[i] & 0x3Fu);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) {
        *cp = CP_INVALID + c;
        return 1;
    }
    *cp = v;
    return len;
}

/* Writes cp (or the raw byte of an invalid marker) and returns the byte count. */
static size_t utf8_put(uint32_t cp, uint8_t *dst)
{
    if (cp >= CP_INVALID) {
        dst[0] = (uint8_t)(cp - CP_INVALID);
        return 1;
    }
    if (cp < 0x80) {
        dst[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        dst[0] = (uint8_t)(0xC0 | (cp >> 6));
        dst[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (uint8_t)(0xE0 | (cp >> 12));
        dst[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (uint8_t)(0xF0 | (cp >> 18));
    dst[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    dst[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* --- character classes ---------------------------------------------------------------------- */

enum { C_OTHER, C_LETTER, C_NUMBER, C_SPACE };

static bool in_ranges(const rt_uc_range *r, size_t n, uint32_t cp)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < r[mid].lo) {
            hi = mid;
        } else if (cp > r[mid].hi) {
            lo = mid + 1;
        } else {
            return true;
        }
    }
    return false;
}

/* Unicode White_Space, which is what \s means to Oniguruma and char::is_whitespace to Rust. */
static bool is_white_space(uint32_t cp)
{
    if (cp <= 0x20) {
        return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
    }
    if (cp < 0x85) {
        return false;
    }
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
           cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

static int char_class(uint32_t cp)
{
    if (cp < 0x80) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') {
            return C_LETTER;
        }
        if (cp >= '0' && cp <= '9') {
            return C_NUMBER;
        }
        return is_white_space(cp) ? C_SPACE : C_OTHER;
    }
    if (cp >= CP_INVALID) {
        return C_OTHER;
    }
    if (is_white_space(cp)) {
        return C_SPACE;
    }
    if (in_ranges(rt_uc_letter, sizeof(rt_uc_letter) / sizeof(rt_uc_letter[0]), cp)) {
        return C_LETTER;
    }
    if (in_ranges(rt_uc_number, sizeof(rt_uc_number) / sizeof(rt_uc_number[0]), cp)) {
        return C_NUMBER;
    }
    return C_OTHER;
}

/* A character of the text being split: its code point, byte length and class. */
typedef struct {
    uint32_t cp;
    uint32_t len;
    int cls;
} uchar;

static uchar char_at(const uint8_t *s, size_t pos, size_t end)
{
    uchar c;
    c.len = utf8_next(s + pos, end - pos, &c.cp);
    c.cls = char_class(c.cp);
    return c;
}

/* --- NFC ------------------------------------------------------------------------------------ */

enum {
    HANGUL_S = 0xAC00,
    HANGUL_L = 0x1100,
    HANGUL_V = 0x1161,
    HANGUL_T = 0x11A7,
    HANGUL_L_COUNT = 19,
    HANGUL_V_COUNT = 21,
    HANGUL_T_COUNT = 28,
    HANGUL_N_COUNT = HANGUL_V_COUNT * HANGUL_T_COUNT,
    HANGUL_S_COUNT = HANGUL_L_COUNT * HANGUL_N_COUNT,
};

static uint32_t ccc_of(uint32_t cp)
{
    if (cp < 0x300 || cp >= CP_INVALID) {
        return 0;
    }
    size_t lo = 0, hi = sizeof(rt_uc_ccc) / sizeof(rt_uc_ccc[0]);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < rt_uc_ccc[mid].lo) {
            hi = mid;
        } else if (cp > rt_uc_ccc[mid].hi) {
            lo = mid + 1;
        } else {
            return rt_uc_ccc[mid].value;
        }
    }
    return 0;
}

static bool nfc_unstable(uint32_t cp)
{
    return cp >= 0x300 && cp < CP_INVALID &&
           in_ranges(rt_uc_nfc_unstable, sizeof(rt_uc_nfc_unstable) / sizeof(rt_uc_nfc_unstable[0]),
                     cp);
}

static const rt_uc_decomp *find_decomp(uint32_t cp)
{
    size_t lo = 0, hi = sizeof(rt_uc_decomps) / sizeof(rt_uc_decomps[0]);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < rt_uc_decomps[mid].cp) {
            hi = mid;
        } else if (cp > rt_uc_decomps[mid].cp) {
            lo = mid + 1;
        } else {
            return &rt_uc_decomps[mid];
        }
    }
    return NULL;
}

/* The primary composite of (a, b), or 0. */
static uint32_t compose_pair(uint32_t a, uint32_t b)
{
    if (a >= HANGUL_L && a < HANGUL_L + HANGUL_L_COUNT && b >= HANGUL_V &&
        b < HANGUL_V + HANGUL_V_COUNT) {
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_V_COUNT + (b - HANGUL_V)) * HANGUL_T_COUNT;
    }
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_S_COUNT && (a - HANGUL_S) % HANGUL_T_COUNT == 0 &&
        b > HANGUL_T && b < HANGUL_T + HANGUL_T_COUNT) {
        return a + (b - HANGUL_T);
    }
    size_t lo = 0, hi = sizeof(rt_uc_comps) / sizeof(rt_uc_comps[0]);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const rt_uc_comp *c = &rt_uc_comps[mid];
        if (a < c->a || (a == c->a && b < c->b)) {
            hi = mid;
        } else if (a > c->a || b > c->b) {
            lo = mid + 1;
        } else {
            return c->composite;
        }
    }
    return 0;
}

typedef struct {
    uint32_t *v;
    size_t n, cap;
} cp_buf;

static int cp_push(cp_buf *b, uint32_t cp)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        uint32_t *v = realloc(b->v, cap * sizeof(*v));
        if (!v) {
            return -1;
        }
        b->v = v;
        b->cap = cap;
    }
    b->v[b->n++] = cp;
    return 0;
}

/* Full canonical decomposition of cp appended to out. The tables nest at most a few levels
 * (Unicode keeps decompositions short), so the recursion depth is small and fixed. */
static int decompose(uint32_t cp, cp_buf *out)
{
    if (cp >= HANGUL_S && cp < HANGUL_S + HANGUL_S_COUNT) {
        uint32_t s = cp - HANGUL_S;
        uint32_t t = s % HANGUL_T_COUNT;
        if (cp_push(out, HANGUL_L + s / HANGUL_N_COUNT) ||
            cp_push(out, HANGUL_V + (s % HANGUL_N_COUNT) / HANGUL_T_COUNT)) {
            return -1;
        }
        return t ? cp_push(out, HANGUL_T + t) : 0;
    }
    const rt_uc_decomp *d = cp >= 0xC0 && cp < CP_INVALID ? find_decomp(cp) : NULL;
    if (!d) {
        return cp_push(out, cp);
    }
    if (decompose(d->a, out)) {
        return -1;
    }
    return d->b ? decompose(d->b, out) : 0;
}

typedef struct {
    uint32_t ccc, idx, cp;
} ccc_key;

static int cmp_ccc_key(const void *x, const void *y)
{
    const ccc_key *a = x, *b = y;
    if (a->ccc != b->ccc) {
        return a->ccc < b->ccc ? -1 : 1;
    }
    return (a->idx > b->idx) - (a->idx < b->idx);
}

/* Canonical ordering: each run of non-starters sorted stably by combining class. A sort
 * rather than the textbook insertion sort keeps hostile runs of marks O(n log n). */
static int canonical_order(uint32_t *v, size_t n)
{
    for (size_t i = 0; i < n;) {
        if (ccc_of(v[i]) == 0) {
            i++;
            continue;
        }
        size_t j = i;
        bool sorted = true;
        uint32_t prev = 0;
        while (j < n) {
            uint32_t c = ccc_of(v[j]);
            if (c == 0) {
                break;
            }
            sorted = sorted && c >= prev;
            prev = c;
            j++;
        }
        if (!sorted) {
            ccc_key *keys = malloc((j - i) * sizeof(*keys));
            if (!keys) {
                return -1;
            }
            for (size_t k = i; k < j; k++) {
                keys[k - i] = (ccc_key){ccc_of(v[k]), (uint32_t)(k - i), v[k]};
            }
            qsort(keys, j - i, sizeof(*keys), cmp_ccc_key);
            for (size_t k = i; k < j; k++) {
                v[k] = keys[k - i].cp;
            }
            free(keys);
        }
        i = j;
    }
    return 0;
}

/* Canonical composition in place (the standard algorithm: a character combines with the
 * last starter unless a character between them blocks it). Returns the new length. */
static size_t compose(uint32_t *v, size_t n)
{
    if (n == 0) {
        return 0;
    }
    size_t starter = 0, out = 1;
    uint32_t last_ccc = ccc_of(v[0]) ? 256 : 0;
    for (size_t i = 1; i < n; i++) {
        uint32_t c = ccc_of(v[i]);
        uint32_t composite = compose_pair(v[starter], v[i]);
        if (composite && (last_ccc < c || last_ccc == 0)) {
            v[starter] = composite;
            continue;
        }
        if (c == 0) {
            starter = out;
        }
        last_ccc = c;
        v[out++] = v[i];
    }
    return out;
}

/* NFC of s[0..n) into *dst (malloc-ed) when it differs from s; *dst stays NULL when the text
 * is already NFC (the usual case, found by one scan). */
static int nfc(const uint8_t *s, size_t n, uint8_t **dst, size_t *dst_len)
{
    *dst = NULL;
    *dst_len = 0;
    bool stable = true;
    for (size_t i = 0; i < n && stable;) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        i += utf8_next(s + i, n - i, &cp);
        stable = !nfc_unstable(cp);
    }
    if (stable) {
        return 0;
    }
    cp_buf b = {0};
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_next(s + i, n - i, &cp);
        if (decompose(cp, &b)) {
            free(b.v);
            return -1;
        }
    }
    if (canonical_order(b.v, b.n)) {
        free(b.v);
        return -1;
    }
    b.n = compose(b.v, b.n);
    uint8_t *o = malloc(b.n * 4 + 1);
    if (!o) {
        free(b.v);
        return -1;
    }
    size_t len = 0;
    for (size_t i = 0; i < b.n; i++) {
        len += utf8_put(b.v[i], o + len);
    }
    free(b.v);
    *dst = o;
    *dst_len = len;
    return 0;
}

/* --- pre-tokenizer regexes ------------------------------------------------------------------ */

/* Length of a contraction suffix ('s 't 're 've 'm 'll 'd, after the apostrophe) at s[0..n),
 * or 0. Case-insensitive matching is ASCII-only, as Oniguruma does it for these patterns. */
static size_t contraction(const uint8_t *s, size_t n, bool icase)
{
    if (n == 0) {
        return 0;
    }
    uint8_t a = icase ? (uint8_t)(s[0] | 0x20) : s[0];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        return 1;
    }
    if (n < 2) {
        return 0;
    }
    uint8_t b = icase ? (uint8_t)(s[1] | 0x20) : s[1];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        return 2;
    }
    return 0;
}

/* End of the run of characters of class cls starting at pos (pos itself if none). */
static size_t run_of(const uint8_t *s, size_t pos, size_t end, int cls)
{
    while (pos < end) {
        uchar c = char_at(s, pos, end);
        if (c.cls != cls) {
            break;
        }
        pos += c.len;
    }
    return pos;
}

static size_t run_of_newlines(const uint8_t *s, size_t pos, size_t end)
{
    while (pos < end && (s[pos] == '\r' || s[pos] == '\n')) {
        pos++;
    }
    return pos;
}

/* The whitespace alternatives shared by all three patterns, at a whitespace character:
 *   \s*[\r\n]+   (Llama 3 / Qwen2 only: through the last newline of the whitespace run)
 *   \s+(?!\S)    (the whole run at the end of the text, else all of it but its last char)
 *   \s+          (the whole run) */
static size_t match_space(const uint8_t *s, size_t pos, size_t end, bool newline_rule)
{
    size_t w = pos, last_start = pos, after_newline = 0, count = 0;
    while (w < end) {
        uchar c = char_at(s, w, end);
        if (c.cls != C_SPACE) {
            break;
        }
        if (c.cp == '\r' || c.cp == '\n') {
            after_newline = w + c.len;
        }
        last_start = w;
        w += c.len;
        count++;
    }
    if (newline_rule && after_newline) {
        return after_newline;
    }
    if (w == end || count < 2) {
        return w;
    }
    return last_start;
}

/* Llama 3 (max_digits 3) and Qwen2 (max_digits 1):
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
 *    ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * Returns the end of the match at pos; every character starts some match. */
static size_t match_llama3(const uint8_t *s, size_t pos, size_t end, int max_digits)
{
    uchar c = char_at(s, pos, end);
    if (c.cp == '\'') {
        size_t k = contraction(s + pos + 1, end - pos - 1, true);
        if (k) {
            return pos + 1 + k;
        }
    }
    if (c.cls == C_LETTER) {
        return run_of(s, pos, end, C_LETTER);
    }
    if (c.cls != C_NUMBER && c.cp != '\r' && c.cp != '\n' && pos + c.len < end &&
        char_at(s, pos + c.len, end).cls == C_LETTER) {
        return run_of(s, pos + c.len, end, C_LETTER);
    }
    if (c.cls == C_NUMBER) {
        size_t e = pos;
        for (int i = 0; i < max_digits && e < end; i++) {
            uchar d = char_at(s, e, end);
            if (d.cls != C_NUMBER) {
                break;
            }
            e += d.len;
        }
        return e;
    }
    size_t start = pos;
    if (c.cp == ' ' && pos + 1 < end && char_at(s, pos + 1, end).cls == C_OTHER) {
        start = pos + 1;
    }
    if (start > pos || c.cls == C_OTHER) {
        return run_of_newlines(s, run_of(s, start, end, C_OTHER), end);
    }
    return match_space(s, pos, end, true);
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t match_gpt2(const uint8_t *s, size_t pos, size_t end)
{
    uchar c = char_at(s, pos, end);
    if (c.cp == '\'') {
        size_t k = contraction(s + pos + 1, end - pos - 1, false);
        if (k) {
            return pos + 1 + k;
        }
    }
    size_t start = pos;
    int cls = c.cls;
    if (c.cp == ' ' && pos + 1 < end) {
        int next = char_at(s, pos + 1, end).cls;
        if (next != C_SPACE) {
            start = pos + 1;
            cls = next;
        }
    }
    if (cls != C_SPACE) {
        return run_of(s, start, end, cls);
    }
    return match_space(s, pos, end, false);
}

/* --- the tokenizer state -------------------------------------------------------------------- */

typedef struct {
    int32_t id;
    uint32_t len;
    uint8_t attrs;
} added_token;

struct rt_bpe {
    rt_pretok pretok[RT_BPE_MAX_PRETOK];
    uint32_t n_pretok;
    bool nfc;
    bool ignore_merges;
    /* merges: open addressing on (left << 32 | right); EMPTY_KEY marks a free slot */
    uint64_t *merge_key;
    uint32_t *merge_rank;
    int32_t *merge_id;
    size_t merge_mask;
    /* whole pieces by their decoded bytes, for ignore_merges: id + 1 per slot, 0 = empty */
    uint32_t *word_table;
    size_t word_mask;
    /* added tokens by first byte, each bucket longest first: [first[b], first[b + 1]) */
    added_token *added;
    uint32_t added_first[257];
};

#define EMPTY_KEY UINT64_MAX

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static inline uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static bool merge_find(const struct rt_bpe *b, int32_t left, int32_t right, uint32_t *rank,
                       int32_t *id)
{
    if (left < 0 || right < 0 || !b->merge_key) {
        return false;
    }
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (size_t slot = (size_t)mix64(key) & b->merge_mask;; slot = (slot + 1) & b->merge_mask) {
        uint64_t k = b->merge_key[slot];
        if (k == EMPTY_KEY) {
            return false;
        }
        if (k == key) {
            *rank = b->merge_rank[slot];
            *id = b->merge_id[slot];
            return true;
        }
    }
}

/* The id of the vocabulary piece whose decoded bytes are s[0..n), or -1. */
static int32_t word_find(const rt_tokenizer *t, const uint8_t *s, size_t n)
{
    const struct rt_bpe *b = t->bpe;
    if (!b->word_table || n == 0) {
        return -1;
    }
    for (size_t slot = (size_t)fnv1a((const char *)s, n) & b->word_mask;;
         slot = (slot + 1) & b->word_mask) {
        uint32_t v = b->word_table[slot];
        if (v == 0) {
            return -1;
        }
        uint32_t id = v - 1;
        size_t len = t->dec_off[id + 1] - t->dec_off[id];
        if (len == n && memcmp(t->dec + t->dec_off[id], s, n) == 0) {
            return (int32_t)id;
        }
    }
}

void rt_bpe_free(struct rt_bpe *b)
{
    if (!b) {
        return;
    }
    free(b->merge_key);
    free(b->merge_rank);
    free(b->merge_id);
    free(b->word_table);
    free(b->added);
    free(b);
}

/* Decodes a piece written in GPT-2's alphabet into bytes; returns the count, or -1 when some
 * character is not in the alphabet. */
static long decode_alphabet(const char *p, size_t n, char *dst)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_next((const uint8_t *)p + i, n - i, &cp);
        int b = cp_to_byte(cp);
        if (b < 0) {
            return -1;
        }
        if (dst) {
            dst[o] = (char)b;
        }
        o++;
    }
    return (long)o;
}

/* Hugging Face's ByteLevel decoder: a token all of whose characters are in the alphabet
 * decodes to their bytes, any other token to its own text. Control tokens and the unused
 * and unknown ones print nothing, as in the SentencePiece tokenizer. */
size_t rt_bpe_render_piece(const char *p, size_t n, int32_t type, char *dst)
{
    if (type != RT_TOKEN_NORMAL && type != RT_TOKEN_USER_DEFINED && type != RT_TOKEN_BYTE) {
        return 0;
    }
    long k = decode_alphabet(p, n, NULL);
    if (k >= 0) {
        decode_alphabet(p, n, dst);
        return (size_t)k;
    }
    if (dst && n) {
        memcpy(dst, p, n);
    }
    return n;
}

/* Shows a file-supplied piece in a message: printable ASCII as is, other bytes as '?'. */
static const char *show_piece(char *out, size_t cap, const char *p, size_t n)
{
    size_t o = 0, i = 0;
    for (; i < n && o + 4 < cap; i++) {
        unsigned char ch = (unsigned char)p[i];
        out[o++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
    }
    if (i < n) {
        for (int k = 0; k < 3 && o + 1 < cap; k++) {
            out[o++] = '.';
        }
    }
    out[o] = '\0';
    return out;
}

static int build_merges(rt_tokenizer *t, struct rt_bpe *b, const rt_bpe_config *cfg, char *err,
                        size_t errlen)
{
    if (cfg->n_merges == 0) {
        return 0;
    }
    if (!cfg->merges) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: no merges");
        return -1;
    }
    size_t cap = 16;
    while (cap < (size_t)cfg->n_merges * 2) {
        cap *= 2;
    }
    b->merge_key = malloc(cap * sizeof(*b->merge_key));
    b->merge_rank = malloc(cap * sizeof(*b->merge_rank));
    b->merge_id = malloc(cap * sizeof(*b->merge_id));
    char *cat = malloc((size_t)t->max_piece_len + 1);
    if (!b->merge_key || !b->merge_rank || !b->merge_id || !cat) {
        free(cat);
        rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    memset(b->merge_key, 0xff, cap * sizeof(*b->merge_key));
    b->merge_mask = cap - 1;
    for (uint32_t i = 0; i < cfg->n_merges; i++) {
        const rt_bpe_merge *m = &cfg->merges[i];
        int32_t l = rt_tokenizer_lookup(t, m->left, m->left_len);
        int32_t r = rt_tokenizer_lookup(t, m->right, m->right_len);
        int32_t id = -1;
        size_t n = (size_t)m->left_len + m->right_len;
        if (l >= 0 && r >= 0 && n <= t->max_piece_len) {
            memcpy(cat, m->left, m->left_len);
            memcpy(cat + m->left_len, m->right, m->right_len);
            id = rt_tokenizer_lookup(t, cat, n);
        }
        if (id < 0) {
            char a[48], c[48];
            const char *what = l < 0   ? "its left piece"
                               : r < 0 ? "its right piece"
                                       : "the merged piece";
            rt_tokenizer_set_err(err, errlen,
                                 "tokenizer: merge %u (\"%s\" \"%s\"): %s is not in the vocabulary",
                                 i, show_piece(a, sizeof(a), m->left, m->left_len),
                                 show_piece(c, sizeof(c), m->right, m->right_len), what);
            free(cat);
            return -1;
        }
        /* a repeated pair keeps its last rank, as Hugging Face's merge map does */
        uint64_t key = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
        size_t slot = (size_t)mix64(key) & b->merge_mask;
        while (b->merge_key[slot] != EMPTY_KEY && b->merge_key[slot] != key) {
            slot = (slot + 1) & b->merge_mask;
        }
        b->merge_key[slot] = key;
        b->merge_rank[slot] = i;
        b->merge_id[slot] = id;
    }
    free(cat);
    return 0;
}

/* Indexes NORMAL pieces written in the alphabet by their decoded bytes (which t->dec holds). */
static int build_word_table(rt_tokenizer *t, struct rt_bpe *b, char *err, size_t errlen)
{
    size_t cap = 16;
    while (cap < (size_t)t->n_vocab * 2) {
        cap *= 2;
    }
    b->word_table = calloc(cap, sizeof(*b->word_table));
    if (!b->word_table) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    b->word_mask = cap - 1;
    for (uint32_t i = 0; i < t->n_vocab; i++) {
        const char *p = t->text + t->off[i];
        size_t n = t->off[i + 1] - t->off[i] - 1;
        if (t->types[i] != RT_TOKEN_NORMAL || n == 0 || decode_alphabet(p, n, NULL) < 0) {
            continue;
        }
        const char *d = t->dec + t->dec_off[i];
        size_t dn = t->dec_off[i + 1] - t->dec_off[i];
        size_t slot = (size_t)fnv1a(d, dn) & b->word_mask;
        for (;; slot = (slot + 1) & b->word_mask) {
            uint32_t v = b->word_table[slot];
            if (v == 0) {
                b->word_table[slot] = i + 1;
                break;
            }
            size_t vn = t->dec_off[v] - t->dec_off[v - 1];
            if (vn == dn && memcmp(t->dec + t->dec_off[v - 1], d, dn) == 0) {
                break; /* the alphabet is one-to-one, so only equal pieces collide */
            }
        }
    }
    return 0;
}

static int cmp_added(const void *x, const void *y)
{
    const added_token *a = x, *b = y;
    if (a->len != b->len) {
        return a->len > b->len ? -1 : 1;
    }
    return (a->id > b->id) - (a->id < b->id);
}

static int build_added(rt_tokenizer *t, struct rt_bpe *b, const rt_bpe_config *cfg, char *err,
                       size_t errlen)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < t->n_specials; i++) {
        int32_t type = t->types[t->specials[i]];
        n += type == RT_TOKEN_CONTROL || type == RT_TOKEN_USER_DEFINED;
    }
    b->added = malloc((n ? n : 1) * sizeof(*b->added));
    if (!b->added) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    uint32_t count[256] = {0};
    uint32_t k = 0;
    for (uint32_t i = 0; i < t->n_specials; i++) {
        int32_t id = t->specials[i];
        if (t->types[id] != RT_TOKEN_CONTROL && t->types[id] != RT_TOKEN_USER_DEFINED) {
            continue;
        }
        uint32_t len = (uint32_t)(t->off[id + 1] - t->off[id] - 1);
        b->added[k++] = (added_token){id, len, cfg->attrs ? cfg->attrs[id] : 0};
        count[(uint8_t)t->text[t->off[id]]]++;
    }
    /* bucket by first byte; within a bucket longest first, then by id */
    b->added_first[0] = 0;
    for (int c = 0; c < 256; c++) {
        b->added_first[c + 1] = b->added_first[c] + count[c];
    }
    added_token *sorted = malloc((n ? n : 1) * sizeof(*sorted));
    if (!sorted) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    uint32_t fill[256];
    memcpy(fill, b->added_first, sizeof(fill));
    for (uint32_t i = 0; i < n; i++) {
        uint8_t c = (uint8_t)t->text[t->off[b->added[i].id]];
        sorted[fill[c]++] = b->added[i];
    }
    for (int c = 0; c < 256; c++) {
        uint32_t lo = b->added_first[c], hi = b->added_first[c + 1];
        if (hi - lo > 1) {
            qsort(sorted + lo, hi - lo, sizeof(*sorted), cmp_added);
        }
    }
    free(b->added);
    b->added = sorted;
    return 0;
}

int rt_bpe_build(rt_tokenizer *t, const rt_bpe_config *cfg, char *err, size_t errlen)
{
    if (cfg->n_pretok > RT_BPE_MAX_PRETOK) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: %u pre-tokenizer steps (at most %d)",
                             cfg->n_pretok, RT_BPE_MAX_PRETOK);
        return -1;
    }
    struct rt_bpe *b = calloc(1, sizeof(*b));
    if (!b) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: out of memory");
        return -1;
    }
    t->bpe = b;
    memcpy(b->pretok, cfg->pretok, sizeof(b->pretok));
    b->n_pretok = cfg->n_pretok;
    b->nfc = cfg->nfc;
    b->ignore_merges = cfg->ignore_merges;
    for (int c = 0; c < 256; c++) {
        uint8_t u[4];
        size_t n = utf8_put(byte_to_cp((uint8_t)c), u);
        t->byte_token[c] = rt_tokenizer_lookup(t, (const char *)u, n);
    }
    if (build_merges(t, b, cfg, err, errlen) || build_added(t, b, cfg, err, errlen)) {
        return -1;
    }
    if (cfg->ignore_merges && build_word_table(t, b, err, errlen)) {
        return -1;
    }
    return 0;
}

int rt_bpe_pretok_from_gguf_name(const char *name, size_t len, rt_bpe_config *cfg, bool *add_bos)
{
    static const struct {
        const char *name;
        rt_pretok steps[2];
        uint32_t n;
        bool ignore_merges, add_bos;
    } known[] = {
        {"llama-bpe", {RT_PRETOK_LLAMA3}, 1, true, true},
        {"llama3", {RT_PRETOK_LLAMA3}, 1, true, true},
        {"llama-v3", {RT_PRETOK_LLAMA3}, 1, true, true},
        {"qwen2", {RT_PRETOK_QWEN2}, 1, false, false},
        {"smollm", {RT_PRETOK_DIGITS_EACH, RT_PRETOK_GPT2}, 2, false, false},
        {"gpt-2", {RT_PRETOK_GPT2}, 1, false, false},
        {"gpt2", {RT_PRETOK_GPT2}, 1, false, false},
    };
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
        if (strlen(known[i].name) == len && memcmp(known[i].name, name, len) == 0) {
            memcpy(cfg->pretok, known[i].steps, sizeof(known[i].steps));
            cfg->n_pretok = known[i].n;
            cfg->ignore_merges = known[i].ignore_merges;
            cfg->nfc = false;
            *add_bos = known[i].add_bos;
            return 0;
        }
    }
    return -1;
}

/* --- encoding ------------------------------------------------------------------------------- */

/* A byte range of the text being split. */
typedef struct {
    size_t off, len;
} span;

typedef struct {
    span *v;
    size_t n, cap;
} span_buf;

static int span_push(span_buf *b, size_t off, size_t len)
{
    if (len == 0) {
        return 0; /* Hugging Face drops empty splits */
    }
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        span *v = realloc(b->v, cap * sizeof(*v));
        if (!v) {
            return -1;
        }
        b->v = v;
        b->cap = cap;
    }
    b->v[b->n++] = (span){off, len};
    return 0;
}

/* One symbol of a piece under merging; dead once merged into its left neighbour. */
typedef struct {
    int32_t prev, next;
    int32_t id;
    bool dead;
} symbol;

typedef struct {
    uint32_t rank;
    int32_t pos;
    int32_t id;
} merge_item;

/* Everything one rt_bpe_tokenize call allocates, freed in one place. */
typedef struct {
    uint8_t *text; /* the segment being split (normalized, prefixed) */
    size_t text_cap;
    span_buf pieces, next;
    symbol *sym;
    merge_item *heap;
    size_t sym_cap;
} scratch;

static void scratch_free(scratch *s)
{
    free(s->text);
    free(s->pieces.v);
    free(s->next.v);
    free(s->sym);
    free(s->heap);
}

static inline bool item_before(const merge_item *a, const merge_item *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(merge_item *h, size_t *n, merge_item it)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!item_before(&it, &h[parent])) {
            break;
        }
        h[i] = h[parent];
        i = parent;
    }
    h[i] = it;
}

static merge_item heap_pop(merge_item *h, size_t *n)
{
    merge_item top = h[0];
    merge_item last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) {
            break;
        }
        if (c + 1 < *n && item_before(&h[c + 1], &h[c])) {
            c++;
        }
        if (!item_before(&h[c], &last)) {
            break;
        }
        h[i] = h[c];
        i = c;
    }
    if (*n > 0) {
        h[i] = last;
    }
    return top;
}

static void push_pair(const struct rt_bpe *b, merge_item *h, size_t *hn, const symbol *sym,
                      int32_t left)
{
    uint32_t rank;
    int32_t id;
    int32_t right = sym[left].next;
    if (right >= 0 && merge_find(b, sym[left].id, sym[right].id, &rank, &id)) {
        heap_push(h, hn, (merge_item){rank, left, id});
    }
}

/* Merges the bytes of one piece and appends the resulting ids. */
static int encode_piece(const rt_tokenizer *t, const uint8_t *p, size_t n, scratch *s,
                        rt_id_buf *out)
{
    const struct rt_bpe *b = t->bpe;
    if (b->ignore_merges) {
        int32_t id = word_find(t, p, n);
        if (id >= 0) {
            return rt_id_buf_push(out, id);
        }
    }
    if (n > s->sym_cap) {
        size_t cap = n < 64 ? 64 : n;
        free(s->sym);
        free(s->heap);
        s->sym = malloc(cap * sizeof(*s->sym));
        /* n - 1 seed pairs plus at most two per merge */
        s->heap = malloc(3 * cap * sizeof(*s->heap));
        s->sym_cap = s->sym && s->heap ? cap : 0;
        if (!s->sym_cap) {
            return -1;
        }
    }
    symbol *sym = s->sym;
    for (size_t i = 0; i < n; i++) {
        sym[i] =
            (symbol){(int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, t->byte_token[p[i]], false};
    }
    size_t hn = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        push_pair(b, s->heap, &hn, sym, (int32_t)i);
    }
    while (hn > 0) {
        merge_item top = heap_pop(s->heap, &hn);
        symbol *l = &sym[top.pos];
        if (l->dead || l->next < 0) {
            continue;
        }
        symbol *r = &sym[l->next];
        uint32_t rank;
        int32_t id;
        if (!merge_find(b, l->id, r->id, &rank, &id) || id != top.id) {
            continue; /* stale: one side changed since the pair was queued */
        }
        l->id = top.id;
        r->dead = true;
        l->next = r->next;
        if (r->next >= 0) {
            sym[r->next].prev = top.pos;
        }
        if (l->prev >= 0) {
            push_pair(b, s->heap, &hn, sym, l->prev);
        }
        push_pair(b, s->heap, &hn, sym, top.pos);
    }
    for (int32_t i = n ? 0 : -1; i >= 0; i = sym[i].next) {
        int32_t id = sym[i].id >= 0 ? sym[i].id : t->unk_id;
        if (id >= 0 && rt_id_buf_push(out, id)) {
            return -1;
        }
    }
    return 0;
}

/* Applies one regex step to every piece: matches and the (never occurring, but allowed)
 * unmatched gaps between them both become pieces, as Split's Isolated behaviour does. */
static int split_regex(const uint8_t *text, rt_pretok step, const span_buf *in, span_buf *out)
{
    for (size_t i = 0; i < in->n; i++) {
        size_t pos = in->v[i].off, end = pos + in->v[i].len;
        while (pos < end) {
            size_t e = step == RT_PRETOK_GPT2    ? match_gpt2(text, pos, end)
                       : step == RT_PRETOK_QWEN2 ? match_llama3(text, pos, end, 1)
                                                 : match_llama3(text, pos, end, 3);
            if (e <= pos) {
                e = pos + char_at(text, pos, end).len;
            }
            if (span_push(out, pos, e - pos)) {
                return -1;
            }
            pos = e;
        }
    }
    return 0;
}

/* Digits: each \p{N} character (each) or each run of them isolated from the rest. */
static int split_digits(const uint8_t *text, bool each, const span_buf *in, span_buf *out)
{
    for (size_t i = 0; i < in->n; i++) {
        size_t pos = in->v[i].off, end = pos + in->v[i].len, start = pos;
        bool in_digits = false;
        while (pos < end) {
            uchar c = char_at(text, pos, end);
            bool digit = c.cls == C_NUMBER;
            if (digit != in_digits || (digit && each)) {
                if (span_push(out, start, pos - start)) {
                    return -1;
                }
                start = pos;
                in_digits = digit;
            }
            pos += c.len;
        }
        if (span_push(out, start, pos - start)) {
            return -1;
        }
    }
    return 0;
}

/* ByteLevel's add_prefix_space: rebuilds the text with ' ' before every piece that does not
 * start with one. */
static int prefix_space(scratch *s, size_t *len)
{
    size_t need = *len + s->pieces.n;
    uint8_t *t = malloc(need ? need : 1);
    if (!t) {
        return -1;
    }
    size_t o = 0;
    s->next.n = 0;
    for (size_t i = 0; i < s->pieces.n; i++) {
        span p = s->pieces.v[i];
        size_t start = o;
        if (s->text[p.off] != ' ') {
            t[o++] = ' ';
        }
        memcpy(t + o, s->text + p.off, p.len);
        o += p.len;
        if (span_push(&s->next, start, o - start)) {
            free(t);
            return -1;
        }
    }
    free(s->text);
    s->text = t;
    s->text_cap = need;
    *len = o;
    return 0;
}

/* Normalizes, pre-tokenizes and merges one stretch of text between added tokens. */
static int encode_segment(const rt_tokenizer *t, const uint8_t *src, size_t len, scratch *s,
                          rt_id_buf *out)
{
    const struct rt_bpe *b = t->bpe;
    uint8_t *norm = NULL;
    size_t norm_len = 0;
    if (b->nfc && nfc(src, len, &norm, &norm_len)) {
        return -1;
    }
    if (norm) {
        free(s->text);
        s->text = norm;
        s->text_cap = norm_len;
        len = norm_len;
    } else {
        if (len > s->text_cap) {
            free(s->text);
            s->text = malloc(len);
            s->text_cap = s->text ? len : 0;
            if (!s->text) {
                return -1;
            }
        }
        memcpy(s->text, src, len);
    }

    s->pieces.n = 0;
    if (span_push(&s->pieces, 0, len)) {
        return -1;
    }
    for (uint32_t k = 0; k < b->n_pretok; k++) {
        rt_pretok step = b->pretok[k];
        s->next.n = 0;
        int rc = 0;
        if (step == RT_PRETOK_PREFIX_SPACE) {
            rc = prefix_space(s, &len);
        } else if (step == RT_PRETOK_DIGITS || step == RT_PRETOK_DIGITS_EACH) {
            rc = split_digits(s->text, step == RT_PRETOK_DIGITS_EACH, &s->pieces, &s->next);
        } else {
            rc = split_regex(s->text, step, &s->pieces, &s->next);
        }
        if (rc) {
            return -1;
        }
        span_buf tmp = s->pieces;
        s->pieces = s->next;
        s->next = tmp;
    }
    for (size_t i = 0; i < s->pieces.n; i++) {
        if (encode_piece(t, s->text + s->pieces.v[i].off, s->pieces.v[i].len, s, out)) {
            return -1;
        }
    }
    return 0;
}

/* The character before text[pos] (backing up over at most three continuation bytes). */
static uchar char_before(const uint8_t *text, size_t pos)
{
    size_t start = pos - 1;
    while (start > 0 && pos - start < 4 && (text[start] & 0xC0) == 0x80) {
        start--;
    }
    uchar c = char_at(text, start, pos);
    if (start + c.len != pos) { /* not one valid character: the last byte alone */
        c = char_at(text, pos - 1, pos);
    }
    return c;
}

/* Word characters for single_word: letters, numbers and '_' (regex \w, less marks). */
static bool is_word_char(uchar c)
{
    return c.cls == C_LETTER || c.cls == C_NUMBER || c.cp == '_';
}

/* The longest added token at text[pos], or NULL. */
static const added_token *added_at(const rt_tokenizer *t, const uint8_t *text, size_t pos,
                                   size_t len)
{
    const struct rt_bpe *b = t->bpe;
    uint8_t c = text[pos];
    for (uint32_t i = b->added_first[c]; i < b->added_first[c + 1]; i++) {
        const added_token *a = &b->added[i];
        if (a->len <= len - pos && memcmp(text + pos, t->text + t->off[a->id], a->len) == 0) {
            return a;
        }
    }
    return NULL;
}

int rt_bpe_tokenize(const rt_tokenizer *t, const char *text, size_t len, bool add_bos,
                    bool parse_special, int32_t **tokens, size_t *n)
{
    *tokens = NULL;
    *n = 0;
    if (len > 0 && !text) {
        return -1;
    }
    /* Symbol positions are 32-bit and NFC may triple a segment; anything this large could not
     * be allocated sensibly anyway, so it is reported as an allocation failure. */
    if (len > (size_t)INT32_MAX / 8) {
        return -1;
    }
    const uint8_t *s = (const uint8_t *)text;
    rt_id_buf out = {0};
    scratch sc = {0};
    int rc = -1;
    if (add_bos && t->add_bos && t->bos_id >= 0 && rt_id_buf_push(&out, t->bos_id)) {
        goto done;
    }
    /* Leftmost-longest over all added tokens, then filtered, as Hugging Face does it: a
     * special token skipped because parse_special is off still hides what is inside it. */
    size_t seg = 0;
    for (size_t pos = 0; pos < len;) {
        const added_token *a = added_at(t, s, pos, len);
        if (!a) {
            pos++;
            continue;
        }
        size_t start = pos, stop = pos + a->len;
        pos = stop;
        if (!parse_special && t->types[a->id] == RT_TOKEN_CONTROL) {
            continue;
        }
        if ((a->attrs & RT_TOKEN_ATTR_SINGLE_WORD) &&
            ((start > 0 && is_word_char(char_before(s, start))) ||
             (stop < len && is_word_char(char_at(s, stop, len))))) {
            continue;
        }
        if (a->attrs & RT_TOKEN_ATTR_LSTRIP) {
            while (start > seg) {
                uchar c = char_before(s, start);
                if (c.cls != C_SPACE) {
                    break;
                }
                start -= c.len;
            }
        }
        if (a->attrs & RT_TOKEN_ATTR_RSTRIP) {
            while (stop < len) {
                uchar c = char_at(s, stop, len);
                if (c.cls != C_SPACE) {
                    break;
                }
                stop += c.len;
            }
            pos = stop;
        }
        if ((start > seg && encode_segment(t, s + seg, start - seg, &sc, &out)) ||
            rt_id_buf_push(&out, a->id)) {
            goto done;
        }
        seg = stop;
    }
    if (len > seg && encode_segment(t, s + seg, len - seg, &sc, &out)) {
        goto done;
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
    scratch_free(&sc);
    return rc;
}
