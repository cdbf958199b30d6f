/*
 * tokenizer_internal.h - the rt_tokenizer struct and the hooks between the files that
 * implement it:
 *  - tokenizer_spm.c: the vocabulary core shared by both kinds (piece arena, piece -> id
 *    table, decoded bytes per id, special-token list), the SentencePiece encoder, the public
 *    accessors and the GGUF bridge;
 *  - tokenizer_bpe.c: the byte-level BPE encoder (NFC, pre-tokenizers, merges by rank, added
 *    tokens) and GPT-2's byte <-> character alphabet;
 *  - tokenizer_hf.c: reading a Hugging Face tokenizer.json into a spec for either kind.
 * Private to those files; other modules use runtime/tokenizer.h.
 */
#ifndef SIEVE_RUNTIME_TOKENIZER_INTERNAL_H
#define SIEVE_RUNTIME_TOKENIZER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "runtime/tokenizer.h"

/* Per-token options of added tokens, as tokenizer.json spells them. */
enum {
    RT_TOKEN_ATTR_LSTRIP = 1,      /* the match takes the whitespace before it */
    RT_TOKEN_ATTR_RSTRIP = 2,      /* the match takes the whitespace after it */
    RT_TOKEN_ATTR_SINGLE_WORD = 4, /* only matches when not inside a word */
};

/* One pre-tokenizer step of a byte-level BPE tokenizer; each step splits every piece the
 * previous steps made (Hugging Face's Sequence semantics). */
typedef enum {
    RT_PRETOK_LLAMA3 = 1,   /* Split, Llama 3's pattern (numbers in groups of 1 to 3) */
    RT_PRETOK_QWEN2,        /* Split, Qwen2's pattern (single numbers) */
    RT_PRETOK_GPT2,         /* ByteLevel use_regex: GPT-2's pattern */
    RT_PRETOK_DIGITS,       /* Digits, individual_digits false: runs of \p{N} isolated */
    RT_PRETOK_DIGITS_EACH,  /* Digits, individual_digits true: each \p{N} isolated */
    RT_PRETOK_PREFIX_SPACE, /* ByteLevel add_prefix_space: ' ' before each piece lacking one */
} rt_pretok;

enum { RT_BPE_MAX_PRETOK = 8 };

/* A merge (left, right) -> left + right; its rank is its index in the list. */
typedef struct {
    const char *left, *right;
    uint32_t left_len, right_len;
} rt_bpe_merge;

/* What a byte-level BPE tokenizer needs beyond the vocabulary spec. Copied at creation. */
typedef struct {
    const rt_bpe_merge *merges;
    uint32_t n_merges;
    rt_pretok pretok[RT_BPE_MAX_PRETOK];
    uint32_t n_pretok;
    bool nfc;             /* normalize the text (outside added tokens) to NFC first */
    bool ignore_merges;   /* a pre-token that is a vocabulary piece is taken whole */
    const uint8_t *attrs; /* n_vocab RT_TOKEN_ATTR_* flags, or NULL for none */
} rt_bpe_config;

/* When the SentencePiece encoder adds its dummy-prefix space (add_space_prefix on). */
typedef enum {
    RT_SPM_PREFIX_EACH = 0,     /* every raw fragment (llama.cpp; HF's Prepend normalizer) */
    RT_SPM_PREFIX_UNLESS_SPACE, /* every raw fragment not already starting with a space
                                 * (HF's Metaspace, prepend_scheme "always") */
    RT_SPM_PREFIX_FIRST,        /* only a fragment at the start of the text, not starting with a
                                 * space (HF's Metaspace, prepend_scheme "first") */
} rt_spm_prefix;

struct rt_bpe; /* tokenizer_bpe.c */

struct rt_tokenizer {
    rt_tokenizer_kind kind;
    uint32_t n_vocab;
    char *text;      /* every piece, NUL-terminated, back to back */
    size_t *off;     /* n_vocab + 1 offsets into text; piece i is [off[i], off[i+1] - 1) */
    char *dec;       /* what rt_token_to_bytes yields for each id */
    size_t *dec_off; /* n_vocab + 1 offsets into dec */
    float *scores;
    int32_t *types;
    uint32_t *table; /* open addressing, id + 1 per slot, 0 = empty */
    size_t table_mask;
    uint32_t max_piece_len;
    int32_t *specials; /* ids matched literally in text, longest piece first */
    uint32_t n_specials;
    /* SPM: byte fallback id per byte value; BPE: the id of the one-character piece that
     * stands for the byte in GPT-2's alphabet. -1 when none. */
    int32_t byte_token[256];
    int32_t bos_id, eos_id, unk_id;
    bool add_bos;
    bool add_space_prefix;
    rt_spm_prefix prefix_mode; /* set by tokenizer_hf.c after creation; default EACH */
    struct rt_bpe *bpe;        /* byte-level BPE state; NULL for SPM */
};

/* tokenizer_spm.c */
int rt_tokenizer_create_kind(rt_tokenizer **out, const rt_vocab_spec *spec,
                             const rt_bpe_config *bpe, char *err, size_t errlen);
int32_t rt_tokenizer_lookup(const rt_tokenizer *t, const char *s, size_t n);
void rt_tokenizer_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* tokenizer_bpe.c */

/* The decoded bytes of a byte-level piece of the given type written to dst (when not NULL);
 * returns their count, never more than n. */
size_t rt_bpe_render_piece(const char *p, size_t n, int32_t type, char *dst);
/* Builds t->bpe (merges, added-token index) and t->byte_token once the core is built. */
int rt_bpe_build(rt_tokenizer *t, const rt_bpe_config *cfg, char *err, size_t errlen);
void rt_bpe_free(struct rt_bpe *b);
int rt_bpe_tokenize(const rt_tokenizer *t, const char *text, size_t len, bool add_bos,
                    bool parse_special, int32_t **tokens, size_t *n);
/* Sets cfg's pre-tokenizer steps (and ignore_merges, *add_bos) for a GGUF
 * tokenizer.ggml.pre name as llama.cpp reads it. Returns -1 for an unknown name. */
int rt_bpe_pretok_from_gguf_name(const char *name, size_t len, rt_bpe_config *cfg, bool *add_bos);

/* A growable array of token ids, shared by the SPM and BPE encoders. */
typedef struct {
    int32_t *v;
    size_t n, cap;
} rt_id_buf;

/* Appends id; 0, or -1 when the array cannot grow. */
static inline int rt_id_buf_push(rt_id_buf *b, int32_t id)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        int32_t *v = realloc(b->v, cap * sizeof(*v));
        if (!v)
            return -1;
        b->v = v;
        b->cap = cap;
    }
    b->v[b->n++] = id;
    return 0;
}

#endif
