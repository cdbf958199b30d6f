/*
 * tokenizer.h - text <-> token ids for the loaded model.
 *
 * Two kinds of tokenizer sit behind the same functions:
 *  - SentencePiece-style BPE (`tokenizer.ggml.model = llama`, Llama 2 style):
 *    merges driven by per-token scores, a dummy-prefix space, whitespace
 *    escaped to U+2581, byte fallback (<0xNN> tokens) and special tokens
 *    (control, user-defined and unknown tokens, matched in the text when
 *    special parsing is on). Matches llama.cpp token for token (shared/golden).
 *  - Byte-level BPE (`tokenizer.ggml.model = gpt2`, or a Hugging Face
 *    tokenizer.json with a ByteLevel pre-tokenizer: Llama 3, Qwen2, SmolLM,
 *    GPT-2): optional NFC, the model family's pre-tokenizer split rules, bytes
 *    mapped to GPT-2's printable alphabet, merges by rank, added tokens.
 *    Matches Hugging Face tokenizers token for token (tests/fixtures/tokenizers).
 *
 * A tokenizer is immutable after creation (rt_tokenizer_set_special_ids aside,
 * which is for the loader before it shares the tokenizer) and may then be used
 * from any thread.
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

typedef enum {
    RT_TOKENIZER_SPM = 0, /* SentencePiece-style, scores */
    RT_TOKENIZER_BPE = 1  /* byte-level BPE, merge ranks */
} rt_tokenizer_kind;

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

/* Builds the tokenizer from tokenizer.ggml.* metadata. tokenizer.ggml.model
 * "llama" gives the SentencePiece tokenizer; "gpt2" the byte-level BPE one,
 * which needs tokenizer.ggml.merges and a tokenizer.ggml.pre this build knows
 * ("llama-bpe"/"llama3"/"llama-v3", "qwen2", "smollm", "gpt-2"/"gpt2"). Anything
 * else is refused with a message naming it. */
int rt_tokenizer_from_gguf(rt_tokenizer **out, const struct rt_gguf *g, char *err, size_t errlen);

/* Builds the tokenizer from the len bytes of a Hugging Face tokenizer.json.
 * Supported: model.type "BPE" with
 *  - a ByteLevel pre-tokenizer (byte-level BPE), alone or after a Split with
 *    the Llama 3 or Qwen2 pattern, or after Digits; normalizer null or NFC;
 *  - or SentencePiece-style pieces (byte_fallback, U+2581 for spaces:
 *    normalizer Prepend+Replace, or a Metaspace pre-tokenizer), which take
 *    the SentencePiece path with merge ranks as scores.
 * Added tokens become CONTROL (special) or USER_DEFINED tokens (lstrip,
 * rstrip and single_word are honoured by the byte-level path). The
 * post-processor decides add_bos and the BOS id (a TemplateProcessing that
 * starts with a special token); the EOS id is guessed from the usual names
 * ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>") and should be
 * overridden from config.json with rt_tokenizer_set_special_ids. Unknown
 * models, normalizers, pre-tokenizers, split patterns, post-processors and
 * options are refused with a message naming them. */
int rt_tokenizer_from_hf_json(rt_tokenizer **out, const char *json, size_t len, char *err,
                              size_t errlen);

/* rt_tokenizer_from_hf_json on the file at path (at most 512 MiB). */
int rt_tokenizer_from_hf_file(rt_tokenizer **out, const char *path, char *err, size_t errlen);

/* Replaces the BOS and EOS ids (-1: none), e.g. with config.json's. Only for the
 * loader, before the tokenizer is shared with other threads. Returns 0, or -1
 * with a message when an id is out of range. */
int rt_tokenizer_set_special_ids(rt_tokenizer *t, int32_t bos_id, int32_t eos_id, char *err,
                                 size_t errlen);

rt_tokenizer_kind rt_tokenizer_get_kind(const rt_tokenizer *t);

void rt_tokenizer_destroy(rt_tokenizer *t);

uint32_t rt_tokenizer_n_vocab(const rt_tokenizer *t);
int32_t rt_tokenizer_bos(const rt_tokenizer *t);
int32_t rt_tokenizer_eos(const rt_tokenizer *t);
bool rt_tokenizer_add_bos(const rt_tokenizer *t);

/* Encodes len bytes of text. add_bos: prepend BOS when the vocabulary says so
 * (add_bos in the spec). parse_special: text such as "<s>" becomes the special
 * token. On success returns 0 and stores a malloc-ed array in *tokens (caller
 * frees; may be NULL when *n is 0). Returns -1 only on allocation failure.
 * Invalid UTF-8 is tokenized byte by byte (byte fallback), never refused; the
 * byte-level BPE pre-tokenizers see each invalid byte as one punctuation-like
 * character, so its bytes still round-trip. */
int rt_tokenize(const rt_tokenizer *t, const char *text, size_t len, bool add_bos,
                bool parse_special, int32_t **tokens, size_t *n);

/* The bytes that token id contributes to decoded text: U+2581 becomes a space,
 * a <0xNN> byte token is the single byte NN (possibly part of a UTF-8 sequence
 * split across tokens), control tokens (BOS/EOS) and unknown ids give nothing.
 * Byte-level BPE pieces map back from GPT-2's alphabet to the bytes they stand
 * for (again possibly part of a UTF-8 sequence); user-defined (added,
 * non-special) tokens give their text.
 * Returns the byte count, writing at most cap bytes to buf (the return value
 * may exceed cap, like snprintf; no NUL is written). */
size_t rt_token_to_bytes(const rt_tokenizer *t, int32_t id, char *buf, size_t cap);

/* The raw piece string of id as stored in the vocabulary (NULL if out of range). */
const char *rt_token_piece(const rt_tokenizer *t, int32_t id, size_t *len);

/* Type of id (RT_TOKEN_*), or 0 when out of range. */
int rt_token_type(const rt_tokenizer *t, int32_t id);

#endif
