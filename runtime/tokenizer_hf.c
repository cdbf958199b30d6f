/*
 * tokenizer_hf.c - reads a Hugging Face tokenizer.json into a tokenizer.
 *
 * Two shapes of file are understood, both with model.type "BPE":
 *  - byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): a ByteLevel pre-tokenizer, possibly
 *    after a Split with a pattern this build implements or after Digits; normalizer null or
 *    NFC. Built as an RT_TOKENIZER_BPE tokenizer (tokenizer_bpe.c).
 *  - SentencePiece-style BPE (Llama 2, Mistral): pieces with U+2581 for spaces, byte
 *    fallback, and either the Prepend + Replace normalizers or a Metaspace pre-tokenizer.
 *    Built as the SentencePiece tokenizer, with each merged piece scored by minus the rank of
 *    the first merge that makes it, so best-score-first equals lowest-rank-first.
 * Everything else (other models, normalizers, pre-tokenizers, split patterns,
 * post-processors, options that change the result) is refused with a message naming it, so a
 * model never runs with a tokenizer that silently differs from its own.
 *
 * The file is hostile input: every field is type-checked, ids are bounded by the number of
 * entries (no allocation sized by a number from the file alone), duplicate ids are refused.
 */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/tokenizer_internal.h"

#define SPM_SPACE "\xe2\x96\x81"

/* The split patterns implemented natively, exactly as the model families' files spell them. */
static const struct {
    const char *pattern;
    rt_pretok step;
} known_patterns[] = {
    {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
     "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
     RT_PRETOK_LLAMA3},
    {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
     "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
     RT_PRETOK_QWEN2},
    {"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
     RT_PRETOK_GPT2},
};

/* Names tried, in order, for the EOS id when nothing better is known. */
static const char *const eos_names[] = {"</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"};

typedef struct {
    char *err;
    size_t errlen;
    /* vocabulary being assembled, indexed by id */
    uint32_t n_vocab;
    const char **pieces;
    uint32_t *lens;
    int32_t *types;
    uint8_t *attrs;
    bool *seen;
    uint32_t *index; /* open addressing over the pieces: id + 1 per slot, 0 = empty */
    size_t index_mask;
    /* what the JSON says */
    const json_t *vocab, *merges, *added;
    bool byte_level, byte_fallback, ignore_merges;
    rt_bpe_config bpe;
    bool spm_prefix; /* SentencePiece dummy prefix */
    rt_spm_prefix prefix_mode;
    int32_t bos_id, unk_id;
    bool add_bos;
} hf_reader;

__attribute__((format(printf, 2, 3))) static int fail(hf_reader *r, const char *fmt, ...)
{
    if (!r->err || r->errlen == 0) {
        return -1;
    }
    int n = snprintf(r->err, r->errlen, "tokenizer.json: ");
    if (n < 0 || (size_t)n >= r->errlen) {
        return -1;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err + n, r->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

/* A file-supplied string for a message: printable ASCII kept, other bytes as '?', cut. */
static const char *shown(char *out, size_t cap, const char *s, size_t n)
{
    size_t o = 0, i = 0;
    for (; i < n && o + 4 < cap; i++) {
        unsigned char ch = (unsigned char)s[i];
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

static const char *shown_json(char *out, size_t cap, const json_t *s)
{
    if (!json_is_string(s)) {
        snprintf(out, cap, "%s", "(not a string)");
        return out;
    }
    return shown(out, cap, json_string_value(s), json_string_length(s));
}

static bool str_is(const json_t *j, const char *s)
{
    return json_is_string(j) && json_string_length(j) == strlen(s) &&
           memcmp(json_string_value(j), s, strlen(s)) == 0;
}

/* The "type" of a component object, or NULL (with the error set) when it has none. */
static const char *type_of(hf_reader *r, const json_t *obj, const char *where)
{
    const json_t *t = json_is_object(obj) ? json_object_get(obj, "type") : NULL;
    if (!json_is_string(t)) {
        fail(r, "%s has no \"type\"", where);
        return NULL;
    }
    return json_string_value(t);
}

/* Reads an optional boolean member; absent or null gives dflt. */
static int get_bool(hf_reader *r, const json_t *obj, const char *key, bool dflt, bool *out,
                    const char *where)
{
    const json_t *v = json_object_get(obj, key);
    *out = dflt;
    if (!v || json_is_null(v)) {
        return 0;
    }
    if (!json_is_boolean(v)) {
        return fail(r, "%s.%s is not a boolean", where, key);
    }
    *out = json_is_true(v);
    return 0;
}

/* --- vocabulary ----------------------------------------------------------------------------- */

static uint64_t hash_piece(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* The id of piece s[0..n) (the highest id if it is repeated), or -1. */
static int32_t find_piece(const hf_reader *r, const char *s, size_t n)
{
    for (size_t slot = (size_t)hash_piece(s, n) & r->index_mask;;
         slot = (slot + 1) & r->index_mask) {
        uint32_t v = r->index[slot];
        if (v == 0) {
            return -1;
        }
        if (r->lens[v - 1] == n && memcmp(r->pieces[v - 1], s, n) == 0) {
            return (int32_t)(v - 1);
        }
    }
}

static int build_index(hf_reader *r)
{
    size_t cap = 16;
    while (cap < (size_t)r->n_vocab * 2) {
        cap *= 2;
    }
    r->index = calloc(cap, sizeof(*r->index));
    if (!r->index) {
        return fail(r, "out of memory");
    }
    r->index_mask = cap - 1;
    for (uint32_t i = 0; i < r->n_vocab; i++) {
        if (!r->seen[i]) {
            continue;
        }
        size_t slot = (size_t)hash_piece(r->pieces[i], r->lens[i]) & r->index_mask;
        for (;; slot = (slot + 1) & r->index_mask) {
            uint32_t v = r->index[slot];
            if (v == 0 || (r->lens[v - 1] == r->lens[i] &&
                           memcmp(r->pieces[v - 1], r->pieces[i], r->lens[i]) == 0)) {
                r->index[slot] = i + 1;
                break;
            }
        }
    }
    return 0;
}

static int read_id(hf_reader *r, const json_t *v, uint32_t cap, uint32_t *id, const char *what,
                   const char *piece, size_t piece_len)
{
    char b[64];
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        json_integer_value(v) >= (json_int_t)cap) {
        return fail(r, "%s \"%s\" has id %s out of range (the file has %u entries)", what,
                    shown(b, sizeof(b), piece, piece_len),
                    json_is_integer(v) ? "that is" : "that is not an integer", cap);
    }
    *id = (uint32_t)json_integer_value(v);
    return 0;
}

/* Sizes the vocabulary: the largest id of model.vocab and added_tokens plus one, bounded by
 * twice the number of entries (real files are dense) so a hostile id cannot make us
 * allocate. */
static int size_vocab(hf_reader *r)
{
    size_t entries = json_object_size(r->vocab) + (r->added ? json_array_size(r->added) : 0);
    if (entries == 0) {
        return fail(r, "model.vocab is empty");
    }
    if (entries > (1u << 24)) {
        return fail(r, "%zu vocabulary entries (at most %u)", entries, 1u << 24);
    }
    const uint32_t cap = (uint32_t)(2 * entries + 1024);
    uint32_t max_id = 0;
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)r->vocab, key, v)
    {
        uint32_t id = 0;
        if (read_id(r, v, cap, &id, "model.vocab entry", key, strlen(key))) {
            return -1;
        }
        max_id = id > max_id ? id : max_id;
    }
    size_t i;
    json_array_foreach(r->added, i, v)
    {
        const json_t *content = json_object_get(v, "content");
        if (!json_is_object(v) || !json_is_string(content)) {
            return fail(r, "added_tokens[%zu] has no \"content\" string", i);
        }
        uint32_t id = 0;
        if (read_id(r, json_object_get(v, "id"), cap, &id, "added token",
                    json_string_value(content), json_string_length(content))) {
            return -1;
        }
        max_id = id > max_id ? id : max_id;
    }
    r->n_vocab = max_id + 1;
    r->pieces = calloc(r->n_vocab, sizeof(*r->pieces));
    r->lens = calloc(r->n_vocab, sizeof(*r->lens));
    r->types = calloc(r->n_vocab, sizeof(*r->types));
    r->attrs = calloc(r->n_vocab, sizeof(*r->attrs));
    r->seen = calloc(r->n_vocab, sizeof(*r->seen));
    if (!r->pieces || !r->lens || !r->types || !r->attrs || !r->seen) {
        return fail(r, "out of memory");
    }
    return 0;
}

/* model.vocab (piece -> id); size_vocab has checked every id. */
static int read_vocab(hf_reader *r)
{
    const char *key;
    size_t n;
    const json_t *v;
    json_object_keylen_foreach((json_t *)r->vocab, key, n, v)
    {
        uint32_t id = (uint32_t)json_integer_value(v);
        if (r->seen[id]) {
            char a[64], b[64];
            return fail(r, "model.vocab gives id %u to both \"%s\" and \"%s\"", id,
                        shown(a, sizeof(a), r->pieces[id], r->lens[id]),
                        shown(b, sizeof(b), key, n));
        }
        if (n == 0 || n > UINT32_MAX - 1) {
            return fail(r, "model.vocab has an empty piece (id %u)", id);
        }
        r->seen[id] = true;
        r->pieces[id] = key;
        r->lens[id] = (uint32_t)n;
        r->types[id] = RT_TOKEN_NORMAL;
        if (r->byte_fallback && n == 6 && key[0] == '<' && key[1] == '0' && key[2] == 'x' &&
            key[5] == '>') {
            r->types[id] = RT_TOKEN_BYTE;
        }
    }
    return 0;
}

static int read_added(hf_reader *r)
{
    size_t i;
    const json_t *v;
    json_array_foreach(r->added, i, v)
    {
        const json_t *content = json_object_get(v, "content");
        const char *s = json_string_value(content);
        size_t n = json_string_length(content);
        uint32_t id = (uint32_t)json_integer_value(json_object_get(v, "id"));
        char where[48], a[64], b[64];
        snprintf(where, sizeof(where), "added_tokens[%zu]", i);
        bool special, lstrip, rstrip, single_word;
        if (get_bool(r, v, "special", false, &special, where) ||
            get_bool(r, v, "lstrip", false, &lstrip, where) ||
            get_bool(r, v, "rstrip", false, &rstrip, where) ||
            get_bool(r, v, "single_word", false, &single_word, where)) {
            return -1;
        }
        if (n == 0) {
            return fail(r, "%s has empty content", where);
        }
        if (r->seen[id] && (r->lens[id] != n || memcmp(r->pieces[id], s, n) != 0)) {
            return fail(r, "added token \"%s\" has id %u, which model.vocab gives to \"%s\"",
                        shown(a, sizeof(a), s, n), id,
                        shown(b, sizeof(b), r->pieces[id], r->lens[id]));
        }
        r->seen[id] = true;
        r->pieces[id] = s;
        r->lens[id] = (uint32_t)n;
        r->types[id] = special ? RT_TOKEN_CONTROL : RT_TOKEN_USER_DEFINED;
        r->attrs[id] =
            (uint8_t)((lstrip ? RT_TOKEN_ATTR_LSTRIP : 0) | (rstrip ? RT_TOKEN_ATTR_RSTRIP : 0) |
                      (single_word ? RT_TOKEN_ATTR_SINGLE_WORD : 0));
    }
    for (uint32_t id = 0; id < r->n_vocab; id++) {
        if (!r->seen[id]) {
            r->types[id] = RT_TOKEN_UNUSED; /* a gap in the ids: an empty, never-produced piece */
        }
    }
    return 0;
}

/* model.merges: "left right" strings or [left, right] pairs, by rank. */
static int read_merges(hf_reader *r, rt_bpe_merge **out)
{
    *out = NULL;
    if (!r->merges || json_is_null(r->merges)) {
        return 0;
    }
    if (!json_is_array(r->merges)) {
        return fail(r, "model.merges is not an array");
    }
    size_t n = json_array_size(r->merges);
    if (n > (size_t)INT32_MAX) {
        return fail(r, "model.merges has %zu entries", n);
    }
    rt_bpe_merge *m = malloc((n ? n : 1) * sizeof(*m));
    if (!m) {
        return fail(r, "out of memory");
    }
    *out = m;
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(r->merges, i);
        const char *l = NULL, *rt = NULL;
        size_t ln = 0, rn = 0;
        if (json_is_string(e)) {
            const char *s = json_string_value(e);
            size_t len = json_string_length(e);
            const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
            if (sp && sp + 1 < s + len) {
                l = s, ln = (size_t)(sp - s), rt = sp + 1, rn = len - ln - 1;
            }
        } else if (json_is_array(e) && json_array_size(e) == 2 &&
                   json_is_string(json_array_get(e, 0)) && json_is_string(json_array_get(e, 1))) {
            l = json_string_value(json_array_get(e, 0));
            ln = json_string_length(json_array_get(e, 0));
            rt = json_string_value(json_array_get(e, 1));
            rn = json_string_length(json_array_get(e, 1));
        }
        if (!l || ln == 0 || rn == 0 || ln > UINT32_MAX || rn > UINT32_MAX) {
            return fail(r, "model.merges[%zu] is not two pieces", i);
        }
        m[i] = (rt_bpe_merge){l, rt, (uint32_t)ln, (uint32_t)rn};
    }
    r->bpe.merges = m;
    r->bpe.n_merges = (uint32_t)n;
    return 0;
}

/* --- components ----------------------------------------------------------------------------- */

static int read_model(hf_reader *r, const json_t *model)
{
    if (!json_is_object(model)) {
        return fail(r, "\"model\" is missing or not an object");
    }
    const json_t *type = json_object_get(model, "type");
    if (type && !str_is(type, "BPE")) {
        char b[64];
        return fail(r, "model.type \"%s\" is not supported (only \"BPE\")",
                    shown_json(b, sizeof(b), type));
    }
    r->vocab = json_object_get(model, "vocab");
    r->merges = json_object_get(model, "merges");
    if (!json_is_object(r->vocab)) {
        return fail(r, "model.vocab is missing or not an object");
    }
    const json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout) &&
        !(json_is_number(dropout) && json_number_value(dropout) == 0.0)) {
        return fail(r, "model.dropout is set; BPE dropout is not supported");
    }
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const json_t *a = json_object_get(model, affixes[i]);
        if (a && !json_is_null(a) && !str_is(a, "")) {
            return fail(r, "model.%s is set; it is not supported", affixes[i]);
        }
    }
    /* fuse_unk only matters without byte fallback in a SentencePiece-style file, where
     * llama.cpp (whose behaviour that path follows) does not fuse either */
    if (get_bool(r, model, "byte_fallback", false, &r->byte_fallback, "model") ||
        get_bool(r, model, "ignore_merges", false, &r->ignore_merges, "model")) {
        return -1;
    }
    return 0;
}

/* Flattens a component that may be a Sequence into its parts (at most cap). */
static int flatten(hf_reader *r, const json_t *c, const char *where, const char *list_key,
                   const json_t **parts, size_t cap, size_t *n)
{
    *n = 0;
    if (!c || json_is_null(c)) {
        return 0;
    }
    const char *type = type_of(r, c, where);
    if (!type) {
        return -1;
    }
    if (strcmp(type, "Sequence") != 0) {
        parts[(*n)++] = c;
        return 0;
    }
    const json_t *list = json_object_get(c, list_key);
    if (!json_is_array(list)) {
        return fail(r, "%s Sequence has no \"%s\" array", where, list_key);
    }
    if (json_array_size(list) > cap) {
        return fail(r, "%s Sequence has %zu parts (at most %zu)", where, json_array_size(list),
                    cap);
    }
    size_t i;
    const json_t *p;
    json_array_foreach(list, i, p)
    {
        if (!type_of(r, p, where)) {
            return -1;
        }
        parts[(*n)++] = p;
    }
    return 0;
}

/* The normalizer: NFC (byte-level files), or the Prepend "\u2581" and Replace " " -> "\u2581"
 * pair of SentencePiece-style files (reported through *prepend and *replace). */
static int read_normalizer(hf_reader *r, const json_t *norm, bool *prepend, bool *replace)
{
    const json_t *parts[8];
    size_t n;
    *prepend = *replace = false;
    if (flatten(r, norm, "normalizer", "normalizers", parts, 8, &n)) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const char *type = json_string_value(json_object_get(parts[i], "type"));
        if (strcmp(type, "NFC") == 0) {
            r->bpe.nfc = true;
        } else if (strcmp(type, "Prepend") == 0 &&
                   str_is(json_object_get(parts[i], "prepend"), SPM_SPACE)) {
            *prepend = true;
        } else if (strcmp(type, "Replace") == 0 &&
                   str_is(json_object_get(json_object_get(parts[i], "pattern"), "String"), " ") &&
                   str_is(json_object_get(parts[i], "content"), SPM_SPACE)) {
            *replace = true;
        } else {
            char b[64];
            return fail(
                r,
                "normalizer \"%s\" is not supported (supported: NFC; and Prepend \"\\u2581\""
                " with Replace \" \" -> \"\\u2581\" for SentencePiece-style files)",
                shown(b, sizeof(b), type, strlen(type)));
        }
    }
    return 0;
}

static int add_step(hf_reader *r, rt_pretok step)
{
    if (r->bpe.n_pretok >= RT_BPE_MAX_PRETOK) {
        return fail(r, "too many pre-tokenizer steps (at most %d)", RT_BPE_MAX_PRETOK);
    }
    r->bpe.pretok[r->bpe.n_pretok++] = step;
    return 0;
}

static int read_split(hf_reader *r, const json_t *p)
{
    const json_t *pattern = json_object_get(json_object_get(p, "pattern"), "Regex");
    char b[160];
    if (!json_is_string(pattern)) {
        return fail(r, "pre_tokenizer Split without a \"Regex\" pattern is not supported");
    }
    if (!str_is(json_object_get(p, "behavior"), "Isolated")) {
        return fail(r, "pre_tokenizer Split behavior \"%s\" is not supported (only Isolated)",
                    shown_json(b, sizeof(b), json_object_get(p, "behavior")));
    }
    bool invert;
    if (get_bool(r, p, "invert", false, &invert, "pre_tokenizer Split")) {
        return -1;
    }
    if (invert) {
        return fail(r, "pre_tokenizer Split with invert is not supported");
    }
    for (size_t i = 0; i < sizeof(known_patterns) / sizeof(known_patterns[0]); i++) {
        if (str_is(pattern, known_patterns[i].pattern)) {
            return add_step(r, known_patterns[i].step);
        }
    }
    return fail(r,
                "pre_tokenizer Split pattern \"%s\" is not one this build implements (Llama 3's, "
                "Qwen2's and GPT-2's are)",
                shown_json(b, sizeof(b), pattern));
}

static int read_pre_tokenizer(hf_reader *r, const json_t *pre, bool *metaspace)
{
    const json_t *parts[RT_BPE_MAX_PRETOK];
    size_t n;
    *metaspace = false;
    if (flatten(r, pre, "pre_tokenizer", "pretokenizers", parts, RT_BPE_MAX_PRETOK, &n)) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *p = parts[i];
        const char *type = json_string_value(json_object_get(p, "type"));
        char b[64];
        if (r->byte_level) {
            return fail(r, "pre_tokenizer \"%s\" after ByteLevel is not supported",
                        shown(b, sizeof(b), type, strlen(type)));
        }
        if (strcmp(type, "ByteLevel") == 0) {
            bool prefix, use_regex;
            if (get_bool(r, p, "add_prefix_space", true, &prefix, "pre_tokenizer ByteLevel") ||
                get_bool(r, p, "use_regex", true, &use_regex, "pre_tokenizer ByteLevel") ||
                (prefix && add_step(r, RT_PRETOK_PREFIX_SPACE)) ||
                (use_regex && add_step(r, RT_PRETOK_GPT2))) {
                return -1;
            }
            r->byte_level = true;
        } else if (strcmp(type, "Split") == 0) {
            if (read_split(r, p)) {
                return -1;
            }
        } else if (strcmp(type, "Digits") == 0) {
            bool each;
            if (get_bool(r, p, "individual_digits", false, &each, "pre_tokenizer Digits") ||
                add_step(r, each ? RT_PRETOK_DIGITS_EACH : RT_PRETOK_DIGITS)) {
                return -1;
            }
        } else if (strcmp(type, "Metaspace") == 0 && n == 1) {
            const json_t *scheme = json_object_get(p, "prepend_scheme");
            bool split, add_prefix;
            if (get_bool(r, p, "split", true, &split, "pre_tokenizer Metaspace") ||
                get_bool(r, p, "add_prefix_space", true, &add_prefix, "pre_tokenizer Metaspace")) {
                return -1;
            }
            if (!str_is(json_object_get(p, "replacement"), SPM_SPACE) || split) {
                return fail(r, "pre_tokenizer Metaspace is only supported with replacement "
                               "\"\\u2581\" and split false");
            }
            if (scheme && !str_is(scheme, "always") && !str_is(scheme, "first") &&
                !str_is(scheme, "never")) {
                return fail(r, "pre_tokenizer Metaspace prepend_scheme \"%s\" is not supported",
                            shown_json(b, sizeof(b), scheme));
            }
            *metaspace = true;
            r->spm_prefix = scheme ? !str_is(scheme, "never") : add_prefix;
            r->prefix_mode =
                str_is(scheme, "first") ? RT_SPM_PREFIX_FIRST : RT_SPM_PREFIX_UNLESS_SPACE;
        } else {
            return fail(r,
                        "pre_tokenizer \"%s\" is not supported (supported: ByteLevel, Split, "
                        "Digits, Sequence; Metaspace alone)",
                        shown(b, sizeof(b), type, strlen(type)));
        }
    }
    if (!r->byte_level && r->bpe.n_pretok > 0) {
        return fail(r, "pre_tokenizer without ByteLevel is not supported unless it is a lone "
                       "Metaspace");
    }
    return 0;
}

/* The id a TemplateProcessing's special_tokens map gives to name. */
static int template_special_id(hf_reader *r, const json_t *tp, const char *name, int32_t *id)
{
    const json_t *e = json_object_get(json_object_get(tp, "special_tokens"), name);
    const json_t *ids = json_object_get(e, "ids");
    if (json_is_array(ids) && json_array_size(ids) == 1 &&
        json_is_integer(json_array_get(ids, 0))) {
        json_int_t v = json_integer_value(json_array_get(ids, 0));
        if (v >= 0 && v < (json_int_t)r->n_vocab) {
            *id = (int32_t)v;
            return 0;
        }
    }
    char b[64];
    return fail(r, "post_processor TemplateProcessing: special token \"%s\" has no valid id",
                shown(b, sizeof(b), name, strlen(name)));
}

/* add_bos and the BOS id come from the post-processor: a TemplateProcessing whose single
 * template starts with a special token adds it. Special tokens after $A (an EOS appended to
 * every input) are not applied: a prompt for generation must not end the sequence. */
static int read_post_processor(hf_reader *r, const json_t *post)
{
    const json_t *parts[8];
    size_t n;
    if (flatten(r, post, "post_processor", "processors", parts, 8, &n)) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const char *type = json_string_value(json_object_get(parts[i], "type"));
        if (strcmp(type, "ByteLevel") == 0) {
            continue; /* offsets only */
        }
        char b[64];
        if (strcmp(type, "TemplateProcessing") != 0) {
            return fail(r,
                        "post_processor \"%s\" is not supported (supported: TemplateProcessing, "
                        "ByteLevel, Sequence)",
                        shown(b, sizeof(b), type, strlen(type)));
        }
        const json_t *single = json_object_get(parts[i], "single");
        if (!json_is_array(single) || json_array_size(single) == 0) {
            return fail(r, "post_processor TemplateProcessing has no \"single\" template");
        }
        const json_t *first = json_object_get(json_array_get(single, 0), "SpecialToken");
        if (first) {
            const json_t *name = json_object_get(first, "id");
            if (!json_is_string(name)) {
                return fail(r, "post_processor TemplateProcessing: a SpecialToken has no id");
            }
            if (template_special_id(r, parts[i], json_string_value(name), &r->bos_id)) {
                return -1;
            }
            r->add_bos = true;
        }
    }
    return 0;
}

static int32_t find_token(const hf_reader *r, const char *name)
{
    return find_piece(r, name, strlen(name));
}

/* --- SentencePiece-style files -------------------------------------------------------------- */

/* Scores for the SentencePiece path: minus the rank of the first merge making the piece, and
 * far below every merge for pieces no merge makes (so they are formed only as a last resort,
 * where Hugging Face would not form them at all). */
static int spm_scores(hf_reader *r, float **out)
{
    float *scores = malloc(r->n_vocab * sizeof(*scores));
    char *cat = NULL;
    size_t cat_cap = 0;
    if (!scores) {
        return fail(r, "out of memory");
    }
    const float none = -1e9f;
    for (uint32_t i = 0; i < r->n_vocab; i++) {
        scores[i] = none;
    }
    for (uint32_t k = 0; k < r->bpe.n_merges; k++) {
        const rt_bpe_merge *m = &r->bpe.merges[k];
        size_t n = (size_t)m->left_len + m->right_len;
        if (n > cat_cap) {
            free(cat);
            cat_cap = n * 2;
            cat = malloc(cat_cap);
            if (!cat) {
                free(scores);
                return fail(r, "out of memory");
            }
        }
        memcpy(cat, m->left, m->left_len);
        memcpy(cat + m->left_len, m->right, m->right_len);
        int32_t id = find_piece(r, cat, n);
        if (id < 0) {
            char a[48], b[48];
            free(cat);
            free(scores);
            return fail(r, "model.merges[%u] (\"%s\" \"%s\") makes a piece not in model.vocab", k,
                        shown(a, sizeof(a), m->left, m->left_len),
                        shown(b, sizeof(b), m->right, m->right_len));
        }
        if (scores[id] == none) {
            scores[id] = -(float)k;
        }
    }
    free(cat);
    *out = scores;
    return 0;
}

/* --- entry points --------------------------------------------------------------------------- */

static void reader_free(hf_reader *r)
{
    free(r->pieces);
    free(r->lens);
    free(r->types);
    free(r->attrs);
    free(r->seen);
    free(r->index);
}

int rt_tokenizer_from_hf_json(rt_tokenizer **out, const char *json, size_t len, char *err,
                              size_t errlen)
{
    hf_reader r = {.err = err, .errlen = errlen, .bos_id = -1, .unk_id = -1};
    if (!out) {
        return fail(&r, "no output pointer");
    }
    *out = NULL;
    if (!json) {
        return fail(&r, "no text");
    }
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!root) {
        return fail(&r, "invalid JSON at line %d, column %d: %s", jerr.line, jerr.column,
                    jerr.text);
    }
    int rc = -1;
    rt_bpe_merge *merges = NULL;
    float *scores = NULL;
    bool prepend = false, replace = false, metaspace = false;
    if (!json_is_object(root)) {
        fail(&r, "the top level is not an object");
        goto done;
    }
    r.added = json_object_get(root, "added_tokens");
    if (r.added && !json_is_null(r.added) && !json_is_array(r.added)) {
        fail(&r, "added_tokens is not an array");
        goto done;
    }
    if (r.added && json_is_null(r.added)) {
        r.added = NULL;
    }
    if (read_model(&r, json_object_get(root, "model")) ||
        read_normalizer(&r, json_object_get(root, "normalizer"), &prepend, &replace) ||
        read_pre_tokenizer(&r, json_object_get(root, "pre_tokenizer"), &metaspace) ||
        size_vocab(&r) || read_vocab(&r) || read_added(&r) || build_index(&r) ||
        read_merges(&r, &merges) ||
        read_post_processor(&r, json_object_get(root, "post_processor"))) {
        goto done;
    }

    bool spm = false;
    if (r.byte_level) {
        if (prepend || replace) {
            fail(&r, "normalizer Prepend/Replace with a ByteLevel pre-tokenizer is not supported");
            goto done;
        }
    } else if (metaspace && !prepend && !replace && !r.bpe.nfc) {
        spm = true;
    } else if (!metaspace && prepend && replace && !r.bpe.nfc) {
        spm = true;
        r.spm_prefix = true;
    } else if (!metaspace && !prepend && replace && !r.bpe.nfc) {
        spm = true; /* Replace alone: no dummy prefix */
    } else {
        fail(&r, "neither a byte-level BPE (no ByteLevel pre-tokenizer) nor a SentencePiece-style "
                 "BPE (Metaspace pre-tokenizer, or Prepend and Replace normalizers)");
        goto done;
    }

    const json_t *unk = json_object_get(json_object_get(root, "model"), "unk_token");
    if (json_is_string(unk)) {
        r.unk_id = find_piece(&r, json_string_value(unk), json_string_length(unk));
        if (r.unk_id < 0) {
            char b[64];
            fail(&r, "model.unk_token \"%s\" is not in the vocabulary",
                 shown_json(b, sizeof(b), unk));
            goto done;
        }
        if (spm) {
            r.types[r.unk_id] = RT_TOKEN_UNKNOWN;
        }
    }
    int32_t eos = -1;
    for (size_t i = 0; i < sizeof(eos_names) / sizeof(eos_names[0]) && eos < 0; i++) {
        eos = find_token(&r, eos_names[i]);
    }

    rt_vocab_spec spec = {
        .n_vocab = r.n_vocab,
        .pieces = r.pieces,
        .piece_lens = r.lens,
        .types = r.types,
        .bos_id = r.bos_id,
        .eos_id = eos,
        .unk_id = r.unk_id,
        .add_bos = r.add_bos,
        .add_space_prefix = r.spm_prefix,
    };
    if (spm) {
        if (spm_scores(&r, &scores)) {
            goto done;
        }
        spec.scores = scores;
        rc = rt_tokenizer_create_kind(out, &spec, NULL, err, errlen);
        if (rc == 0) {
            (*out)->prefix_mode = r.prefix_mode;
        }
    } else {
        r.bpe.ignore_merges = r.ignore_merges;
        r.bpe.attrs = r.attrs;
        rc = rt_tokenizer_create_kind(out, &spec, &r.bpe, err, errlen);
    }
done:
    free(scores);
    free(merges);
    reader_free(&r);
    json_decref(root);
    return rc;
}

int rt_tokenizer_from_hf_file(rt_tokenizer **out, const char *path, char *err, size_t errlen)
{
    if (out) {
        *out = NULL;
    }
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (!f) {
        rt_tokenizer_set_err(err, errlen, "tokenizer: cannot open %s: %s", path ? path : "(null)",
                             strerror(errno));
        return -1;
    }
    const long max = 512L << 20;
    char *buf = NULL;
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0) {
        size = ftell(f);
    }
    if (size < 0 || size > max || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        rt_tokenizer_set_err(err, errlen, "tokenizer: %s is unreadable or larger than %ld bytes",
                             path, max);
        return -1;
    }
    buf = malloc((size_t)size + 1);
    if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        fclose(f);
        rt_tokenizer_set_err(err, errlen, "tokenizer: cannot read %s", path);
        return -1;
    }
    fclose(f);
    int rc = rt_tokenizer_from_hf_json(out, buf, (size_t)size, err, errlen);
    free(buf);
    return rc;
}
