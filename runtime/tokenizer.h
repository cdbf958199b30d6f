/*
 * tokenizer.h - text <-> token ids for the loaded model.
 *
 * Supports `tokenizer.ggml.model = llama`: SentencePiece-style BPE driven by
 * per-token scores, with a dummy-prefix space, whitespace escaped to U+2581,
 * byte fallback (<0xNN> tokens) and special tokens (control, user-defined and
 * unknown tokens, matched in the text when special parsing is on). Behaviour
 * matches llama.cpp's tokenizer token for token (shared/golden).
 *
 * A tokenizer is immutable after creation and may be used from any thread.
 */
#ifndef SIEVE_RUNTIME_TOKENIZER_H
#define SIEVE_RUNTIME_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct rt_gguf;

/* Token types as GGUF stores them in tokenizer.ggml.token_type. */
enum {
    RT_TOKEN_NORMAL = 1,
    RT_TOKEN_UNKNOWN = 2,
    RT_TOKEN_CONTROL = 3,
    RT_TOKEN_USER_DEFINED = 4,
    RT_TOKEN_UNUSED = 5,
    RT_TOKEN_BYTE = 6
};

typedef struct rt_tokenizer rt_tokenizer;

/* Everything the tokenizer is built from; arrays of n_vocab entries. The
 * strings are copied. types may be NULL (all NORMAL, except <0xNN> pieces
 * which are BYTE); scores may be NULL (all 0). */
typedef struct {
    uint32_t n_vocab;
    const char *const *pieces; /* piece text (UTF-8, spaces as U+2581) */
    const uint32_t *piece_lens;
    const float *scores;
    const int32_t *types;
    int32_t bos_id, eos_id, unk_id; /* -1 when absent */
    bool add_bos;                   /* prepend BOS when asked to add specials */
    bool add_space_prefix;          /* SentencePiece dummy prefix */
} rt_vocab_spec;

int rt_tokenizer_create(rt_tokenizer **out, const rt_vocab_spec *spec, char *err, size_t errlen);

/* Builds the tokenizer from tokenizer.ggml.* metadata. Refuses (with a message
 * naming it) any tokenizer.ggml.model other than "llama". */
int rt_tokenizer_from_gguf(rt_tokenizer **out, const struct rt_gguf *g, char *err, size_t errlen);

void rt_tokenizer_destroy(rt_tokenizer *t);

uint32_t rt_tokenizer_n_vocab(const rt_tokenizer *t);
int32_t rt_tokenizer_bos(const rt_tokenizer *t);
int32_t rt_tokenizer_eos(const rt_tokenizer *t);
bool rt_tokenizer_add_bos(const rt_tokenizer *t);

/* Encodes len bytes of text. add_bos: prepend BOS when the vocabulary says so
 * (add_bos in the spec). parse_special: text such as "<s>" becomes the special
 * token. On success returns 0 and stores a malloc-ed array in *tokens (caller
 * frees; may be NULL when *n is 0). Returns -1 only on allocation failure.
 * Invalid UTF-8 is tokenized byte by byte (byte fallback), never refused. */
int rt_tokenize(const rt_tokenizer *t, const char *text, size_t len, bool add_bos,
                bool parse_special, int32_t **tokens, size_t *n);

/* The bytes that token id contributes to decoded text: U+2581 becomes a space,
 * a <0xNN> byte token is the single byte NN (possibly part of a UTF-8 sequence
 * split across tokens), control tokens (BOS/EOS) and unknown ids give nothing.
 * Returns the byte count, writing at most cap bytes to buf (the return value
 * may exceed cap, like snprintf; no NUL is written). */
size_t rt_token_to_bytes(const rt_tokenizer *t, int32_t id, char *buf, size_t cap);

/* The raw piece string of id as stored in the vocabulary (NULL if out of range). */
const char *rt_token_piece(const rt_tokenizer *t, int32_t id, size_t *len);

/* Type of id (RT_TOKEN_*), or 0 when out of range. */
int rt_token_type(const rt_tokenizer *t, int32_t id);

#endif
