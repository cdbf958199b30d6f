/*
 * fuzz_tokenizer.c - libFuzzer target for text -> token ids -> bytes
 * (runtime/tokenizer*.c: rt_tokenize, rt_token_to_bytes) over real
 * vocabularies loaded once: stories260K's SentencePiece tokenizer from
 * $SIEVE_SHARED_DIR/models/stories260K.gguf, and the Hugging Face
 * tokenizer.json fixtures in tests/fixtures/tokenizers/ that this build can
 * load (byte-level BPE: gpt2, llama3, qwen2, smollm; SentencePiece-style:
 * llama2, mistral).
 *
 * Input: byte 0 picks the tokenizer (values 0-2: stories260K, the rest cycle
 * through the fixtures) and, in bits 4 and 5, add_bos and parse_special; the
 * rest is the text (any bytes, not NUL-terminated).
 *
 * Checked on every input: encoding succeeds with at most one token per byte
 * of the escaped text (a space becomes 3 bytes of U+2581) plus BOS and the
 * dummy prefixes, every id is in the vocabulary, each token's
 * bytes come out the same whatever the buffer size (and never past it), and
 * without special parsing decoding gives the text back exactly (after the
 * prefix space the tokenizer adds, which is measured at start-up: llama.cpp's
 * dummy prefix and a Prepend normalizer add it always, a ByteLevel
 * add_prefix_space or a Metaspace pre-tokenizer only before text that does
 * not start with a space): byte fallback and byte-level BPE lose nothing. Exceptions, as
 * the tokenizers document them: in a SentencePiece vocabulary, text holding
 * U+2581 (it is the escaped space) or invalid UTF-8 (as in llama.cpp, a stray
 * lead byte takes the next byte into its symbol, so a following space's
 * U+2581 bytes fall back to byte tokens and decode as U+2581, not as a
 * space); non-ASCII text under an NFC normalizer; and text holding an added
 * token with lstrip or rstrip, which swallows the whitespace beside it.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <jansson.h>

#include "runtime/gguf.h"
#include "runtime/tokenizer.h"
#include "tests/fuzz/fuzz_common.h"

#define MAX_TOKENIZERS 8

typedef struct {
    const char *name;
    rt_tokenizer *tok;
    bool nfc;           /* normalizes: round trip only for ASCII */
    bool spm;           /* U+2581 in the text decodes as a space */
    const char *prefix; /* what decoding puts before the text */
    bool always_prefix; /* even before a leading space */
    char *stripping[8]; /* added tokens with lstrip/rstrip: they absorb whitespace */
    int n_stripping;
} loaded;

static loaded g_tok[MAX_TOKENIZERS];
static int g_n;

static size_t decode(const rt_tokenizer *t, const int32_t *ids, size_t n, char **out);

/* decode(encode(probe)) without specials; caller frees. */
static size_t round_trip(const loaded *l, const char *probe, char **text)
{
    int32_t *ids = NULL;
    size_t n = 0;
    FUZZ_CHECK(rt_tokenize(l->tok, probe, strlen(probe), false, false, &ids, &n) == 0,
               "%s: cannot encode the probe", l->name);
    const size_t len = decode(l->tok, ids, n, text);
    free(ids);
    return len;
}

/* Measures the prefix space: none, always, or only before text not starting with one. */
static void calibrate(loaded *l)
{
    char *text = NULL;
    size_t len = round_trip(l, "Hello world", &text);
    if (len == 11 && memcmp(text, "Hello world", 11) == 0)
        l->prefix = "";
    else if (len == 12 && memcmp(text, " Hello world", 12) == 0)
        l->prefix = " ";
    else
        FUZZ_CHECK(false, "%s: the probe decodes to '%.*s'", l->name, (int)len, text);
    free(text);
    len = round_trip(l, " Hello", &text);
    l->always_prefix = *l->prefix && len == 7 && memcmp(text, "  Hello", 7) == 0;
    free(text);
}

/* Added tokens whose lstrip or rstrip swallows the whitespace next to them, so that
 * text holding them does not come back byte for byte (as in Hugging Face). */
static void find_stripping(loaded *l, const char *path)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    size_t i;
    json_t *t;
    json_array_foreach(json_object_get(root, "added_tokens"), i, t)
    {
        if ((json_is_true(json_object_get(t, "lstrip")) ||
             json_is_true(json_object_get(t, "rstrip"))) &&
            json_is_string(json_object_get(t, "content")) && l->n_stripping < 8)
            l->stripping[l->n_stripping++] =
                strdup(json_string_value(json_object_get(t, "content")));
    }
    json_decref(root);
}

static void load_all(void)
{
    char err[512];
    rt_gguf *g = NULL;
    const char *model = fuzz_shared_path("models/stories260K.gguf");
    if (rt_gguf_open(&g, model, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", err);
        abort();
    }
    rt_tokenizer *t = NULL;
    if (rt_tokenizer_from_gguf(&t, g, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_tokenizer: %s: %s\n", model, err);
        abort();
    }
    rt_gguf_close(g);
    g_tok[g_n++] = (loaded){.name = "stories260K", .tok = t, .spm = true};
    static const char *const fixtures[] = {"gpt2",   "llama3", "qwen2",
                                           "smollm", "llama2", "mistral"};
    for (size_t i = 0; i < sizeof(fixtures) / sizeof(fixtures[0]); i++) {
        char rel[256];
        snprintf(rel, sizeof(rel), "tests/fixtures/tokenizers/%s.tokenizer.json", fixtures[i]);
        t = NULL;
        if (rt_tokenizer_from_hf_file(&t, fuzz_source_path(rel), err, sizeof(err)) != 0) {
            fprintf(stderr, "fuzz_tokenizer: skipping %s: %s\n", fixtures[i], err);
            continue;
        }
        g_tok[g_n++] = (loaded){.name = fixtures[i],
                                .tok = t,
                                .nfc = strcmp(fixtures[i], "qwen2") == 0,
                                .spm = rt_tokenizer_get_kind(t) == RT_TOKENIZER_SPM};
        find_stripping(&g_tok[g_n - 1], fuzz_source_path(rel));
    }
    for (int i = 0; i < g_n; i++)
        calibrate(&g_tok[i]);
}

/* Concatenated bytes of ids; checks each token's bytes against smaller buffers. */
static size_t decode(const rt_tokenizer *t, const int32_t *ids, size_t n, char **out)
{
    size_t cap = 64, len = 0;
    char *buf = malloc(cap);
    FUZZ_CHECK(buf != NULL, "malloc");
    for (size_t i = 0; i < n; i++) {
        char big[512], dummy[1];
        const size_t m = rt_token_to_bytes(t, ids[i], big, sizeof(big));
        FUZZ_CHECK(m <= sizeof(big), "token %d has %zu bytes", ids[i], m);
        FUZZ_CHECK(rt_token_to_bytes(t, ids[i], dummy, 0) == m, "cap 0 changes the length");
        if (m > 0) {
            /* Exactly m - 1 bytes of room: ASan reports any write past them. */
            char *small = malloc(m - 1 ? m - 1 : 1);
            FUZZ_CHECK(small != NULL, "malloc");
            FUZZ_CHECK(rt_token_to_bytes(t, ids[i], small, m - 1) == m, "short buffer length");
            FUZZ_CHECK(memcmp(small, big, m - 1) == 0, "short buffer bytes");
            free(small);
        }
        if (len + m > cap) {
            while (len + m > cap)
                cap *= 2;
            buf = realloc(buf, cap);
            FUZZ_CHECK(buf != NULL, "realloc");
        }
        memcpy(buf + len, big, m);
        len += m;
    }
    *out = buf;
    return len;
}

/* Whether p[0..n) is well-formed UTF-8 (no overlongs, surrogates or values past U+10FFFF). */
static bool is_utf8(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n;) {
        const uint8_t c = p[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            k = 2, cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 3, cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 4, cp = c & 0x07;
        } else {
            return false;
        }
        if (n - i < k)
            return false;
        for (size_t j = 1; j < k; j++) {
            if ((p[i + j] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (p[i + j] & 0x3F);
        }
        if ((k == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
            (k == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
            return false;
        i += k;
    }
    return true;
}

static bool is_ascii(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] >= 0x80)
            return false;
    return true;
}

static void dump(const char *what, const uint8_t *p, size_t n)
{
    fprintf(stderr, "%s:", what);
    for (size_t i = 0; i < n && i < 256; i++)
        fprintf(stderr, " %02x", p[i]);
    fputc('\n', stderr);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_n)
        load_all();
    if (size < 1)
        return 0;
    const unsigned sel = data[0] & 0x0f;
    const loaded *l = sel < 3 || g_n == 1 ? &g_tok[0] : &g_tok[1 + (sel - 3) % (g_n - 1)];
    const bool add_bos = data[0] & 0x10, parse_special = data[0] & 0x20;
    const char *text = (const char *)data + 1;
    const size_t len = size - 1;

    int32_t *ids = NULL;
    size_t n = 0;
    FUZZ_CHECK(rt_tokenize(l->tok, text, len, add_bos, parse_special, &ids, &n) == 0,
               "%s: rt_tokenize failed on %zu bytes", l->name, len);
    /* A space escapes to 3 bytes and each fragment may get a dummy prefix; each escaped
     * byte is at most one token (byte fallback). */
    FUZZ_CHECK(n <= 4 * len + 2, "%s: %zu tokens for %zu bytes", l->name, n, len);
    const uint32_t nv = rt_tokenizer_n_vocab(l->tok);
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK(ids[i] >= 0 && (uint32_t)ids[i] < nv, "%s: id %d of %u", l->name, ids[i], nv);
    if (add_bos && n > 0 && rt_tokenizer_add_bos(l->tok) && rt_tokenizer_bos(l->tok) >= 0)
        FUZZ_CHECK(ids[0] == rt_tokenizer_bos(l->tok), "%s: no BOS first", l->name);

    char *out = NULL;
    size_t out_len = decode(l->tok, ids, n, &out);
    bool lossy = (l->spm && (memmem(text, len, "\xe2\x96\x81", 3) || !is_utf8(data + 1, len))) ||
                 (l->nfc && !is_ascii(data + 1, len));
    for (int i = 0; i < l->n_stripping && !lossy; i++)
        lossy = memmem(text, len, l->stripping[i], strlen(l->stripping[i])) != NULL;
    if (!parse_special && !lossy && len > 0) {
        /* Some prefix spaces are not added before text that starts with a space. */
        const size_t pl = !l->always_prefix && text[0] == ' ' ? 0 : strlen(l->prefix);
        if (out_len != pl + len || memcmp(out, l->prefix, pl) != 0 ||
            memcmp(out + pl, text, len) != 0) {
            fprintf(stderr, "%s: round trip of %zu bytes gave %zu bytes\n", l->name, len, out_len);
            dump("text", data + 1, len);
            dump("decoded", (const uint8_t *)out, out_len);
            for (size_t i = 0; i < n; i++)
                fprintf(stderr, "%d ", ids[i]);
            FUZZ_CHECK(false, "round trip");
        }
    }
    free(out);
    free(ids);
    return 0;
}
