/*
 * test_tokenizer_bpe.c - tests for the byte-level BPE tokenizer (runtime/tokenizer_bpe.c), the
 * tokenizer.json reader (runtime/tokenizer_hf.c) and the GGUF "gpt2" bridge.
 *
 * The fixtures in tests/fixtures/tokenizers were made by tests/fixtures/tokenizers/
 * make_fixtures.py with Hugging Face tokenizers: small BPE vocabularies trained there and
 * configured like Llama 3, Qwen2, SmolLM, GPT-2 and Llama 2's tokenizer.json files, with the
 * ids tokenizers gives for ~45 tricky strings. Every id must match, and decoding must give
 * what tokenizers decodes. Hand-written tokenizer.json strings cover merge order, options
 * and every refusal.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/gguf.h"
#include "runtime/tokenizer.h"

/* --- helpers ------------------------------------------------------------------------------ */

/* tests/fixtures/tokenizers/<name>, found from this file's path (CMake compiles it by its
 * absolute path) unless SIEVE_TEST_FIXTURES names the fixtures folder. */
static const char *fixture_path(const char *name)
{
    static char buf[4096];
    const char *dir = getenv("SIEVE_TEST_FIXTURES");
    if (dir && *dir) {
        snprintf(buf, sizeof(buf), "%s/tokenizers/%s", dir, name);
        return buf;
    }
    const char *file = __FILE__;
    const char *slash = strrchr(file, '/');
    int n = slash ? (int)(slash - file) : 1;
    snprintf(buf, sizeof(buf), "%.*s/../fixtures/tokenizers/%s", n, slash ? file : ".", name);
    return buf;
}

static rt_tokenizer *load_fixture(const char *name)
{
    char file[256], err[512] = "";
    snprintf(file, sizeof(file), "%s.tokenizer.json", name);
    rt_tokenizer *t = NULL;
    if (rt_tokenizer_from_hf_file(&t, fixture_path(file), err, sizeof(err)) != 0) {
        fail_msg("loading %s: %s", fixture_path(file), err);
    }
    assert_non_null(t);
    return t;
}

static json_t *load_cases(const char *name)
{
    char file[256];
    snprintf(file, sizeof(file), "%s.cases.json", name);
    json_error_t jerr;
    json_t *root = json_load_file(fixture_path(file), 0, &jerr);
    if (!root) {
        fail_msg("loading %s: %s", fixture_path(file), jerr.text);
    }
    const json_t *cases = json_object_get(root, "cases");
    assert_true(json_is_array(cases));
    assert_true(json_array_size(cases) >= 30);
    return root;
}

static int32_t *json_ids(const json_t *arr, size_t *n)
{
    assert_true(json_is_array(arr));
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n + 1) * sizeof(*ids));
    assert_non_null(ids);
    for (size_t i = 0; i < *n; i++) {
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    }
    return ids;
}

static void print_ids(const char *label, const int32_t *ids, size_t n)
{
    fprintf(stderr, "  %s [", label);
    for (size_t i = 0; i < n; i++) {
        fprintf(stderr, "%s%d", i ? ", " : "", ids[i]);
    }
    fprintf(stderr, "]\n");
}

static void expect_ids(const int32_t *got, size_t n, const int32_t *want, size_t n_want,
                       const char *what)
{
    if (n != n_want || (n && memcmp(got, want, n * sizeof(*got)) != 0)) {
        fprintf(stderr, "ids differ for %s\n", what);
        print_ids("want", want, n_want);
        print_ids("got ", got, n);
        fail();
    }
}

static void encode(const rt_tokenizer *t, const char *s, size_t len, bool bos, bool special,
                   int32_t **ids, size_t *n)
{
    assert_int_equal(rt_tokenize(t, s, len, bos, special, ids, n), 0);
    if (*n > 0) {
        assert_non_null(*ids);
    }
}

/* Concatenated rt_token_to_bytes of ids; malloc-ed and NUL-terminated. */
static char *decode(const rt_tokenizer *t, const int32_t *ids, size_t n, size_t *len)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        total += rt_token_to_bytes(t, ids[i], NULL, 0);
    }
    char *out = malloc(total + 1);
    assert_non_null(out);
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        pos += rt_token_to_bytes(t, ids[i], out + pos, total - pos);
    }
    assert_int_equal(pos, total);
    out[total] = '\0';
    *len = total;
    return out;
}

static void expect_encoding(const rt_tokenizer *t, const char *text, bool bos, bool special,
                            const int32_t *want, size_t n_want)
{
    int32_t *ids;
    size_t n;
    encode(t, text, strlen(text), bos, special, &ids, &n);
    expect_ids(ids, n, want, n_want, text);
    free(ids);
}

static rt_tokenizer *from_json(const char *json)
{
    rt_tokenizer *t = NULL;
    char err[512] = "";
    if (rt_tokenizer_from_hf_json(&t, json, strlen(json), err, sizeof(err)) != 0) {
        fail_msg("rt_tokenizer_from_hf_json: %s", err);
    }
    return t;
}

/* Expects json to be refused with a message containing each of the NULL-terminated needles. */
static void expect_refused(const char *json, ...)
{
    rt_tokenizer *t = (rt_tokenizer *)1;
    char err[512] = "";
    int rc = rt_tokenizer_from_hf_json(&t, json, strlen(json), err, sizeof(err));
    if (rc == 0) {
        rt_tokenizer_destroy(t);
        fail_msg("accepted: %s", json);
    }
    assert_null(t);
    va_list ap;
    va_start(ap, json);
    for (const char *s = va_arg(ap, const char *); s; s = va_arg(ap, const char *)) {
        if (!strstr(err, s)) {
            va_end(ap);
            fail_msg("message \"%s\" lacks \"%s\"", err, s);
        }
    }
    va_end(ap);
}

/* --- fixtures against Hugging Face tokenizers --------------------------------------------- */

/* Checks every case of a fixture against the tokenizer t (which may come from the JSON or
 * from a GGUF image built from it). */
static void check_cases(const rt_tokenizer *t, const char *name)
{
    /* Hugging Face's SentencePiece-style decoder strips the dummy prefix's space */
    const bool strip_one = rt_tokenizer_get_kind(t) == RT_TOKENIZER_SPM;
    json_t *root = load_cases(name);
    const json_t *cases = json_object_get(root, "cases");
    size_t i;
    const json_t *c;
    json_array_foreach(cases, i, c)
    {
        const json_t *jt = json_object_get(c, "text");
        const char *text = json_string_value(jt);
        size_t len = json_string_length(jt);
        char what[512];
        snprintf(what, sizeof(what), "%s case %zu \"%s\"", name, i, text);

        size_t n_want, n_plain, n;
        int32_t *want = json_ids(json_object_get(c, "ids"), &n_want);
        int32_t *want_plain = json_ids(json_object_get(c, "ids_plain"), &n_plain);
        int32_t *ids;
        encode(t, text, len, true, true, &ids, &n);
        expect_ids(ids, n, want, n_want, what);
        free(ids);
        encode(t, text, len, false, false, &ids, &n);
        expect_ids(ids, n, want_plain, n_plain, what);

        const json_t *jd = json_object_get(c, "decoded_plain");
        size_t dlen;
        char *dec = decode(t, ids, n, &dlen);
        const char *d = dec;
        if (strip_one && dlen > 0 && d[0] == ' ') {
            d++, dlen--;
        }
        if (dlen != json_string_length(jd) || memcmp(d, json_string_value(jd), dlen) != 0) {
            fail_msg("%s decodes to \"%s\", tokenizers to \"%s\"", what, d, json_string_value(jd));
        }
        free(dec);
        free(ids);
        free(want);
        free(want_plain);
    }
    json_decref(root);
}

static void check_fixture(const char *name, rt_tokenizer_kind kind)
{
    rt_tokenizer *t = load_fixture(name);
    assert_int_equal(rt_tokenizer_get_kind(t), kind);
    check_cases(t, name);
    rt_tokenizer_destroy(t);
}

static void test_llama3_fixture_matches_hf_tokenizers(void **state)
{
    (void)state;
    check_fixture("llama3", RT_TOKENIZER_BPE);
}

static void test_qwen2_fixture_with_nfc_matches_hf_tokenizers(void **state)
{
    (void)state;
    check_fixture("qwen2", RT_TOKENIZER_BPE);
}

static void test_smollm_fixture_with_digit_splits_matches_hf_tokenizers(void **state)
{
    (void)state;
    check_fixture("smollm", RT_TOKENIZER_BPE);
}

static void test_gpt2_fixture_with_prefix_space_matches_hf_tokenizers(void **state)
{
    (void)state;
    check_fixture("gpt2", RT_TOKENIZER_BPE);
}

static void test_llama2_style_fixture_takes_the_sentencepiece_path(void **state)
{
    (void)state;
    check_fixture("llama2", RT_TOKENIZER_SPM);
}

static void test_metaspace_fixture_takes_the_sentencepiece_path(void **state)
{
    (void)state;
    check_fixture("mistral", RT_TOKENIZER_SPM);
}

static void test_llama3_fixture_metadata(void **state)
{
    (void)state;
    rt_tokenizer *t = load_fixture("llama3");
    size_t len;
    const char *p = rt_token_piece(t, rt_tokenizer_bos(t), &len);
    assert_non_null(p);
    assert_int_equal(len, strlen("<|begin_of_text|>"));
    assert_memory_equal(p, "<|begin_of_text|>", len);
    assert_true(rt_tokenizer_add_bos(t));
    p = rt_token_piece(t, rt_tokenizer_eos(t), &len);
    assert_int_equal(len, strlen("<|end_of_text|>"));
    assert_memory_equal(p, "<|end_of_text|>", len);
    assert_int_equal(rt_token_type(t, rt_tokenizer_bos(t)), RT_TOKEN_CONTROL);

    /* control tokens print nothing; a user-defined one prints its text; 'Ġ' is a space */
    char buf[32];
    assert_int_equal(rt_token_to_bytes(t, rt_tokenizer_bos(t), buf, sizeof(buf)), 0);
    int32_t *ids;
    size_t n;
    encode(t, "<tool>", 6, false, false, &ids, &n);
    assert_int_equal(n, 1);
    assert_int_equal(rt_token_type(t, ids[0]), RT_TOKEN_USER_DEFINED);
    assert_int_equal(rt_token_to_bytes(t, ids[0], buf, sizeof(buf)), 6);
    assert_memory_equal(buf, "<tool>", 6);
    free(ids);
    encode(t, " ", 1, false, false, &ids, &n);
    assert_int_equal(n, 1);
    p = rt_token_piece(t, ids[0], &len);
    assert_int_equal(len, 2);
    assert_memory_equal(p, "\xc4\xa0", 2); /* U+0120, GPT-2's stand-in for the space byte */
    assert_int_equal(rt_token_to_bytes(t, ids[0], buf, sizeof(buf)), 1);
    assert_int_equal(buf[0], ' ');
    free(ids);

    /* the loader's override, range-checked */
    char err[256] = "";
    assert_int_equal(rt_tokenizer_set_special_ids(t, 0, 1, err, sizeof(err)), 0);
    assert_int_equal(rt_tokenizer_bos(t), 0);
    assert_int_equal(rt_tokenizer_eos(t), 1);
    assert_int_equal(
        rt_tokenizer_set_special_ids(t, 0, (int32_t)rt_tokenizer_n_vocab(t), err, sizeof(err)), -1);
    assert_non_null(strstr(err, "eos_id"));
    rt_tokenizer_destroy(t);
}

static void test_qwen2_fixture_has_no_bos(void **state)
{
    (void)state;
    rt_tokenizer *t = load_fixture("qwen2");
    assert_false(rt_tokenizer_add_bos(t));
    assert_int_equal(rt_tokenizer_bos(t), -1);
    size_t len;
    const char *p = rt_token_piece(t, rt_tokenizer_eos(t), &len);
    assert_int_equal(len, strlen("<|endoftext|>"));
    assert_memory_equal(p, "<|endoftext|>", len);
    rt_tokenizer_destroy(t);
}

static void test_nfc_makes_decomposed_and_precomposed_text_equal(void **state)
{
    (void)state;
    rt_tokenizer *t = load_fixture("qwen2");
    static const char *const pairs[][2] = {
        {"caf\x65\xcc\x81", "caf\xc3\xa9"},                       /* e + U+0301 -> U+00E9 */
        {"\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8", "\xea\xb0\x81"}, /* Hangul L V T -> U+AC01 */
        {"a\xcc\xa3\xcc\x87", "\xe1\xba\xa1\xcc\x87"},            /* a + dot below + dot above */
        {"a\xcc\x87\xcc\xa3", "\xe1\xba\xa1\xcc\x87"},            /* marks reordered by class */
        {"\xe2\x84\xab", "\xc3\x85"},                             /* ANGSTROM SIGN -> A-ring */
        {"\xef\xac\xb1", "\xd7\x91\xd6\xbc"}, /* excluded composition stays apart */
    };
    for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++) {
        int32_t *a, *b;
        size_t na, nb;
        encode(t, pairs[i][0], strlen(pairs[i][0]), false, false, &a, &na);
        encode(t, pairs[i][1], strlen(pairs[i][1]), false, false, &b, &nb);
        expect_ids(a, na, b, nb, pairs[i][0]);
        size_t dlen;
        char *dec = decode(t, a, na, &dlen);
        assert_int_equal(dlen, strlen(pairs[i][1]));
        assert_memory_equal(dec, pairs[i][1], dlen);
        free(dec);
        free(a);
        free(b);
    }
    rt_tokenizer_destroy(t);
}

/* --- GGUF "gpt2" bridge -------------------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
    uint64_t n_kv;
} gguf_writer;

static void gw_bytes(gguf_writer *w, const void *src, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 64;
        w->p = realloc(w->p, w->cap);
        assert_non_null(w->p);
    }
    if (n) {
        memcpy(w->p + w->n, src, n);
    }
    w->n += n;
}

static void gw_uint(gguf_writer *w, uint64_t v, int bytes)
{
    uint8_t b[8];
    for (int i = 0; i < bytes; i++) {
        b[i] = (uint8_t)(v >> (8 * i));
    }
    gw_bytes(w, b, (size_t)bytes);
}

static void gw_strn(gguf_writer *w, const char *s, size_t n)
{
    gw_uint(w, n, 8);
    gw_bytes(w, s, n);
}

static void gw_key(gguf_writer *w, const char *key, uint32_t type)
{
    gw_strn(w, key, strlen(key));
    gw_uint(w, type, 4);
    w->n_kv++;
}

static gguf_writer gw_begin(void)
{
    gguf_writer w = {0};
    gw_bytes(&w, "GGUF", 4);
    gw_uint(&w, 3, 4);
    gw_uint(&w, 0, 8); /* tensors */
    gw_uint(&w, 0, 8); /* kv count, patched by gw_tokenizer */
    return w;
}

static void gw_kv_str(gguf_writer *w, const char *key, const char *v)
{
    gw_key(w, key, RT_GGUF_STRING);
    gw_strn(w, v, strlen(v));
}

static void gw_kv_u32(gguf_writer *w, const char *key, uint32_t v)
{
    gw_key(w, key, RT_GGUF_UINT32);
    gw_uint(w, v, 4);
}

static void gw_kv_bool(gguf_writer *w, const char *key, bool v)
{
    gw_key(w, key, RT_GGUF_BOOL);
    gw_uint(w, v, 1);
}

static void gw_kv_strs(gguf_writer *w, const char *key, const char *const *v, const size_t *lens,
                       size_t n)
{
    gw_key(w, key, RT_GGUF_ARRAY);
    gw_uint(w, RT_GGUF_STRING, 4);
    gw_uint(w, n, 8);
    for (size_t i = 0; i < n; i++) {
        gw_strn(w, v[i], lens ? lens[i] : strlen(v[i]));
    }
}

static void gw_kv_i32s(gguf_writer *w, const char *key, const int32_t *v, size_t n)
{
    gw_key(w, key, RT_GGUF_ARRAY);
    gw_uint(w, RT_GGUF_INT32, 4);
    gw_uint(w, n, 8);
    for (size_t i = 0; i < n; i++) {
        gw_uint(w, (uint32_t)v[i], 4);
    }
}

static int gw_tokenizer(gguf_writer *w, rt_tokenizer **out, char *err, size_t errlen)
{
    for (int i = 0; i < 8; i++) {
        w->p[16 + i] = (uint8_t)(w->n_kv >> (8 * i));
    }
    while (w->n % 32) {
        gw_uint(w, 0, 1);
    }
    rt_gguf *g = NULL;
    char gerr[256];
    if (rt_gguf_parse(&g, w->p, w->n, gerr, sizeof(gerr)) != 0) {
        fail_msg("rt_gguf_parse of the test image: %s", gerr);
    }
    *out = NULL;
    int rc = rt_tokenizer_from_gguf(out, g, err, errlen);
    rt_gguf_close(g);
    free(w->p);
    w->p = NULL;
    return rc;
}

/* Writes a fixture's vocabulary the way llama.cpp's converter does: tokens by id, token types
 * (added special -> CONTROL, added -> USER_DEFINED), merges as "left right". */
static void gw_fixture_vocab(gguf_writer *w, const char *name, uint32_t *n_vocab)
{
    char file[256];
    snprintf(file, sizeof(file), "%s.tokenizer.json", name);
    json_error_t jerr;
    json_t *root = json_load_file(fixture_path(file), 0, &jerr);
    assert_non_null(root);
    const json_t *vocab = json_object_get(json_object_get(root, "model"), "vocab");
    const json_t *added = json_object_get(root, "added_tokens");
    size_t n = json_object_size(vocab) + json_array_size(added);
    const char **pieces = calloc(n, sizeof(*pieces));
    int32_t *types = calloc(n, sizeof(*types));
    assert_true(pieces && types);
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)vocab, key, v)
    {
        size_t id = (size_t)json_integer_value(v);
        assert_true(id < n);
        pieces[id] = key;
        types[id] = RT_TOKEN_NORMAL;
    }
    size_t i;
    json_array_foreach(added, i, v)
    {
        size_t id = (size_t)json_integer_value(json_object_get(v, "id"));
        assert_true(id < n);
        pieces[id] = json_string_value(json_object_get(v, "content"));
        types[id] =
            json_is_true(json_object_get(v, "special")) ? RT_TOKEN_CONTROL : RT_TOKEN_USER_DEFINED;
    }
    for (size_t k = 0; k < n; k++) {
        assert_non_null(pieces[k]);
    }
    gw_kv_strs(w, "tokenizer.ggml.tokens", pieces, NULL, n);
    gw_kv_i32s(w, "tokenizer.ggml.token_type", types, n);
    const json_t *merges = json_object_get(json_object_get(root, "model"), "merges");
    size_t nm = json_array_size(merges);
    char **ms = calloc(nm, sizeof(*ms));
    assert_non_null(ms);
    json_array_foreach(merges, i, v)
    {
        const char *a = json_string_value(json_array_get(v, 0));
        const char *b = json_string_value(json_array_get(v, 1));
        ms[i] = malloc(strlen(a) + strlen(b) + 2);
        assert_non_null(ms[i]);
        sprintf(ms[i], "%s %s", a, b);
    }
    gw_kv_strs(w, "tokenizer.ggml.merges", (const char *const *)ms, NULL, nm);
    for (size_t k = 0; k < nm; k++) {
        free(ms[k]);
    }
    free(ms);
    free(pieces);
    free(types);
    *n_vocab = (uint32_t)n;
    json_decref(root);
}

static void test_gguf_gpt2_llama_bpe_matches_the_json_tokenizer(void **state)
{
    (void)state;
    rt_tokenizer *json_tok = load_fixture("llama3");
    gguf_writer w = gw_begin();
    uint32_t n;
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_str(&w, "tokenizer.ggml.pre", "llama-bpe");
    gw_fixture_vocab(&w, "llama3", &n);
    gw_kv_u32(&w, "tokenizer.ggml.bos_token_id", (uint32_t)rt_tokenizer_bos(json_tok));
    gw_kv_u32(&w, "tokenizer.ggml.eos_token_id", (uint32_t)rt_tokenizer_eos(json_tok));
    rt_tokenizer *t;
    char err[256] = "";
    if (gw_tokenizer(&w, &t, err, sizeof(err)) != 0) {
        fail_msg("from_gguf: %s", err);
    }
    assert_int_equal(rt_tokenizer_get_kind(t), RT_TOKENIZER_BPE);
    assert_int_equal(rt_tokenizer_n_vocab(t), n);
    assert_true(rt_tokenizer_add_bos(t)); /* llama-bpe defaults to BOS, as in llama.cpp */
    check_cases(t, "llama3");
    rt_tokenizer_destroy(t);
    rt_tokenizer_destroy(json_tok);
}

static void test_gguf_gpt2_smollm_matches_the_json_tokenizer(void **state)
{
    (void)state;
    gguf_writer w = gw_begin();
    uint32_t n;
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_str(&w, "tokenizer.ggml.pre", "smollm");
    gw_fixture_vocab(&w, "smollm", &n);
    gw_kv_bool(&w, "tokenizer.ggml.add_bos_token", false);
    rt_tokenizer *t;
    char err[256] = "";
    if (gw_tokenizer(&w, &t, err, sizeof(err)) != 0) {
        fail_msg("from_gguf: %s", err);
    }
    assert_int_equal(rt_tokenizer_bos(t), -1);
    check_cases(t, "smollm");
    rt_tokenizer_destroy(t);
}

static void test_gguf_gpt2_refusals_name_the_key(void **state)
{
    (void)state;
    static const char *const toks[] = {"a", "b", "ab"};
    rt_tokenizer *t;
    char err[256];

    gguf_writer w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", toks, NULL, 3);
    gw_kv_str(&w, "tokenizer.ggml.pre", "llama-bpe");
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.merges"));

    static const char *const merges[] = {"a b"};
    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", toks, NULL, 3);
    gw_kv_strs(&w, "tokenizer.ggml.merges", merges, NULL, 1);
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.pre"));

    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", toks, NULL, 3);
    gw_kv_strs(&w, "tokenizer.ggml.merges", merges, NULL, 1);
    gw_kv_str(&w, "tokenizer.ggml.pre", "deepseek-coder");
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "deepseek-coder"));

    static const char *const bad_merges[] = {"a b", "ab"};
    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", toks, NULL, 3);
    gw_kv_strs(&w, "tokenizer.ggml.merges", bad_merges, NULL, 2);
    gw_kv_str(&w, "tokenizer.ggml.pre", "gpt2");
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.merges[1]"));

    static const char *const missing[] = {"a b", "b a"};
    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", toks, NULL, 3);
    gw_kv_strs(&w, "tokenizer.ggml.merges", missing, NULL, 2);
    gw_kv_str(&w, "tokenizer.ggml.pre", "gpt2");
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "merge 1"));
    assert_non_null(strstr(err, "merged piece"));

    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "bert");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", toks, NULL, 3);
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "\"bert\""));
}

/* --- hand-written tokenizer.json ---------------------------------------------------------- */

/* A byte-level file over a tiny alphabet: a=0 b=1 c=2 Ġ=3 ab=4 bc=5 abc=6 aa=7 plus extras. */
#define TINY_HEAD                                                                                  \
    "{\"version\":\"1.0\",\"added_tokens\":[%s],\"normalizer\":%s,"                                \
    "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,"                        \
    "\"use_regex\":true},\"post_processor\":%s,\"decoder\":{\"type\":\"ByteLevel\"},"              \
    "\"model\":{\"type\":\"BPE\",\"ignore_merges\":%s,\"vocab\":{\"a\":0,\"b\":1,\"c\":2,"         \
    "\"\xc4\xa0\":3,\"ab\":4,\"bc\":5,\"abc\":6,\"aa\":7,\"ca\":8%s},\"merges\":[%s]}}"

static char *tiny_json(const char *added, const char *normalizer, const char *post,
                       const char *ignore, const char *extra_vocab, const char *merges)
{
    size_t cap = strlen(TINY_HEAD) + strlen(added) + strlen(normalizer) + strlen(post) +
                 strlen(ignore) + strlen(extra_vocab) + strlen(merges) + 1;
    char *s = malloc(cap);
    assert_non_null(s);
    snprintf(s, cap, TINY_HEAD, added, normalizer, post, ignore, extra_vocab, merges);
    return s;
}

static void test_merges_apply_lowest_rank_first_and_ties_go_left(void **state)
{
    (void)state;
    /* "bc" outranks "ab", so "abc" is a + bc, never ab + c: no merge makes "abc" from those */
    char *js = tiny_json("", "null", "null", "false", "", "\"b c\",\"a b\",\"ab c\"");
    rt_tokenizer *t = from_json(js);
    const int32_t want1[] = {0, 5};
    expect_encoding(t, "abc", false, true, want1, 2);
    rt_tokenizer_destroy(t);
    free(js);

    /* with "a b" first, ab + c becomes abc */
    js = tiny_json("", "null", "null", "false", "", "\"a b\",\"b c\",\"ab c\"");
    t = from_json(js);
    const int32_t want2[] = {6};
    expect_encoding(t, "abc", false, true, want2, 1);
    /* equal ranks: "aaa" merges the leftmost pair first */
    rt_tokenizer_destroy(t);
    free(js);

    js = tiny_json("", "null", "null", "false", "", "\"a a\"");
    t = from_json(js);
    const int32_t want3[] = {7, 0};
    expect_encoding(t, "aaa", false, true, want3, 2);
    const int32_t want4[] = {7, 7};
    expect_encoding(t, "aaaa", false, true, want4, 2);
    rt_tokenizer_destroy(t);
    free(js);
}

static void test_ignore_merges_takes_whole_vocabulary_words(void **state)
{
    (void)state;
    /* "ca" is in the vocabulary but no merge makes it */
    char *js = tiny_json("", "null", "null", "true", "", "\"a b\"");
    rt_tokenizer *t = from_json(js);
    const int32_t whole[] = {8};
    expect_encoding(t, "ca", false, true, whole, 1);
    rt_tokenizer_destroy(t);
    free(js);
    js = tiny_json("", "null", "null", "false", "", "\"a b\"");
    t = from_json(js);
    const int32_t split[] = {2, 0};
    expect_encoding(t, "ca", false, true, split, 2);
    rt_tokenizer_destroy(t);
    free(js);
}

static void test_bytes_missing_from_the_vocabulary_use_unk_or_vanish(void **state)
{
    (void)state;
    char *js = tiny_json("", "null", "null", "false", "", "");
    rt_tokenizer *t = from_json(js);
    const int32_t want[] = {0, 1};
    expect_encoding(t, "axb", false, true, want, 2); /* no unk_token: Hugging Face drops 'x' */
    rt_tokenizer_destroy(t);
    free(js);
}

static void test_added_tokens_lstrip_rstrip_and_single_word(void **state)
{
    (void)state;
    char *js =
        tiny_json("{\"id\":9,\"content\":\"<L>\",\"special\":false,\"lstrip\":true},"
                  "{\"id\":10,\"content\":\"<R>\",\"special\":false,\"rstrip\":true},"
                  "{\"id\":11,\"content\":\"<W>\",\"special\":false,\"single_word\":true},"
                  "{\"id\":12,\"content\":\"cab\",\"special\":true}",
                  "null", "null", "false", ",\"<L>\":9,\"<R>\":10,\"<W>\":11,\"cab\":12", "");
    rt_tokenizer *t = from_json(js);
    const int32_t l[] = {0, 9, 3, 1};
    expect_encoding(t, "a  <L> b", false, true, l, 4);
    const int32_t r[] = {0, 3, 10, 1};
    expect_encoding(t, "a <R>  b", false, true, r, 4);
    const int32_t w_alone[] = {0, 3, 11, 3, 1};
    expect_encoding(t, "a <W> b", false, true, w_alone, 5);
    int32_t *ids;
    size_t n;
    encode(t, "a<W>b", 5, false, true, &ids, &n); /* inside a word: plain text */
    for (size_t i = 0; i < n; i++) {
        assert_int_not_equal(ids[i], 11);
    }
    free(ids);
    /* a special token is text when special parsing is off */
    const int32_t s_on[] = {0, 12, 1};
    expect_encoding(t, "acabb", false, true, s_on, 3);
    const int32_t s_off[] = {0, 2, 0, 1, 1};
    expect_encoding(t, "acabb", false, false, s_off, 5);
    rt_tokenizer_destroy(t);
    free(js);
}

static void test_template_post_processor_sets_bos(void **state)
{
    (void)state;
    char *js =
        tiny_json("{\"id\":9,\"content\":\"<s>\",\"special\":true}", "null",
                  "{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\","
                  "\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"pair\":[],"
                  "\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[9],\"tokens\":[\"<s>\"]}}}",
                  "false", "", "");
    rt_tokenizer *t = from_json(js);
    assert_true(rt_tokenizer_add_bos(t));
    assert_int_equal(rt_tokenizer_bos(t), 9);
    const int32_t want[] = {9, 0};
    expect_encoding(t, "a", true, true, want, 2);
    expect_encoding(t, "a", false, true, want + 1, 1);
    rt_tokenizer_destroy(t);
    free(js);
}

static void test_invalid_utf8_round_trips_through_byte_level(void **state)
{
    (void)state;
    rt_tokenizer *t = load_fixture("qwen2"); /* with NFC, which must pass invalid bytes too */
    static const char text[] = "ok \xff\xfe bad \xc3 trunc \xe2\x82 x\xed\xa0\x80 surrogate "
                               "\xf4\x90\x80\x80 over \xc0\xaf long x\xcc\x81 \xe4\xbd\xa0";
    int32_t *ids;
    size_t n, dlen;
    encode(t, text, sizeof(text) - 1, false, false, &ids, &n);
    char *dec = decode(t, ids, n, &dlen);
    assert_int_equal(dlen, sizeof(text) - 1);
    assert_memory_equal(dec, text, dlen);
    free(dec);
    free(ids);
    rt_tokenizer_destroy(t);
}

static uint32_t xorshift32(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void test_long_random_text_round_trips_quickly(void **state)
{
    (void)state;
    static const char *const alphabet[] = {
        "a",
        "e",
        "t",
        " ",
        "  ",
        "\n",
        "\r\n",
        "1",
        "23",
        "'s",
        "'LL",
        ".",
        ",",
        "!?",
        "\xc3\xa9",
        "e\xcc\x81",
        "\xd0\x96",
        "\xe4\xbd\xa0",
        "\xf0\x9f\x98\x80",
        "\xe2\x80\x8b",
        "\xc2\xa0",
        "\t",
        "<tool>",
        "<|endoftext|>",
        "\xff",
        "\xe1\x84\x80\xe1\x85\xa1",
    };
    const char *names[] = {"llama3", "qwen2", "smollm", "gpt2"};
    size_t cap = 1 << 20;
    char *text = malloc(cap + 16);
    assert_non_null(text);
    uint32_t seed = 12345;
    size_t len = 0;
    while (len < cap) {
        const char *a = alphabet[xorshift32(&seed) % (sizeof(alphabet) / sizeof(alphabet[0]))];
        memcpy(text + len, a, strlen(a));
        len += strlen(a);
    }
    for (size_t k = 0; k < 4; k++) {
        rt_tokenizer *t = load_fixture(names[k]);
        int32_t *ids;
        size_t n, dlen;
        double t0 = now_ms();
        encode(t, text, len, false, false, &ids, &n);
        double ms = now_ms() - t0;
        char *dec = decode(t, ids, n, &dlen);
        if (k != 1 && k != 3) { /* NFC (qwen2) and the prefix space (gpt2) change the text */
            assert_int_equal(dlen, len);
            assert_memory_equal(dec, text, len);
        }
        fprintf(stderr, "  %s: %zu bytes -> %zu tokens in %.1f ms\n", names[k], len, n, ms);
        assert_true(ms < 20000.0);
        free(dec);
        free(ids);
        rt_tokenizer_destroy(t);
    }
    free(text);
}

static void test_hostile_whitespace_and_marks_stay_fast(void **state)
{
    (void)state;
    /* one huge piece of spaces, and a long run of combining marks for NFC to reorder */
    rt_tokenizer *t = load_fixture("qwen2");
    size_t n_marks = 200000;
    char *text = malloc(n_marks * 2 + 1);
    assert_non_null(text);
    text[0] = 'a';
    size_t len = 1;
    for (size_t i = 0; i + 1 < n_marks; i++) {
        /* alternating classes 230 and 220 force a real sort */
        memcpy(text + len, i % 2 ? "\xcc\x81" : "\xcc\xa3", 2);
        len += 2;
    }
    int32_t *ids;
    size_t n;
    double t0 = now_ms();
    encode(t, text, len, false, false, &ids, &n);
    assert_true(now_ms() - t0 < 20000.0);
    assert_true(n > 0);
    free(ids);
    memset(text, ' ', len);
    encode(t, text, len, false, false, &ids, &n);
    size_t dlen;
    char *dec = decode(t, ids, n, &dlen);
    assert_int_equal(dlen, len);
    free(dec);
    free(ids);
    free(text);
    rt_tokenizer_destroy(t);
}

static void test_empty_text_gives_bos_only_when_asked(void **state)
{
    (void)state;
    rt_tokenizer *t = load_fixture("llama3");
    int32_t *ids;
    size_t n;
    assert_int_equal(rt_tokenize(t, "", 0, false, true, &ids, &n), 0);
    assert_int_equal(n, 0);
    assert_null(ids);
    assert_int_equal(rt_tokenize(t, NULL, 0, true, true, &ids, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], rt_tokenizer_bos(t));
    free(ids);
    rt_tokenizer_destroy(t);
}

static void test_refusals_name_what_is_unsupported(void **state)
{
    (void)state;
    expect_refused("{\"model\":", "invalid JSON", NULL);
    expect_refused("[]", "not an object", NULL);
    expect_refused("{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}", "WordPiece", NULL);
    expect_refused("{\"model\":{\"type\":\"Unigram\",\"vocab\":[]}}", "Unigram", NULL);

    char *js = tiny_json("", "{\"type\":\"NFKC\"}", "null", "false", "", "");
    expect_refused(js, "normalizer", "NFKC", NULL);
    free(js);
    js = tiny_json("", "null", "{\"type\":\"RobertaProcessing\"}", "false", "", "");
    expect_refused(js, "post_processor", "RobertaProcessing", NULL);
    free(js);
    js = tiny_json("", "null", "null", "false", "", "\"a c\"");
    expect_refused(js, "merge 0", "merged piece", NULL);
    free(js);
    js = tiny_json("", "null", "null", "false", "", "\"a x\"");
    expect_refused(js, "merge 0", "right piece", NULL);
    free(js);
    js = tiny_json("", "null", "null", "false", "", "\"ab\"");
    expect_refused(js, "model.merges[0]", NULL);
    free(js);
    js = tiny_json("", "null", "null", "false", ",\"zz\":99999999", "");
    expect_refused(js, "\"zz\"", "out of range", NULL);
    free(js);
    js = tiny_json("", "null", "null", "false", ",\"zz\":-1", "");
    expect_refused(js, "\"zz\"", "out of range", NULL);
    free(js);
    js = tiny_json("", "null", "null", "false", ",\"zz\":3", "");
    expect_refused(js, "id 3", "zz", NULL);
    free(js);
    js = tiny_json("{\"id\":3,\"content\":\"<x>\",\"special\":true}", "null", "null", "false", "",
                   "");
    expect_refused(js, "<x>", "id 3", NULL);
    free(js);
    js = tiny_json("{\"id\":9,\"content\":\"<x>\",\"special\":\"yes\"}", "null", "null", "false",
                   "", "");
    expect_refused(js, "added_tokens[0].special", NULL);
    free(js);

    static const char split_head[] =
        "{\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","
        "\"pattern\":{\"Regex\":\"%s\"},\"behavior\":\"%s\",\"invert\":false},{\"type\":"
        "\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":false}]},\"model\":{\"type\":"
        "\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}";
    char buf[1024];
    snprintf(buf, sizeof(buf), split_head, "\\\\p{L}+|\\\\s+", "Isolated");
    expect_refused(buf, "Split pattern", "\\p{L}+|\\s+", NULL);
    snprintf(buf, sizeof(buf), split_head, "\\\\p{N}", "Removed");
    expect_refused(buf, "behavior", "Removed", NULL);
    expect_refused("{\"pre_tokenizer\":{\"type\":\"Whitespace\"},\"model\":{\"type\":\"BPE\","
                   "\"vocab\":{\"a\":0},\"merges\":[]}}",
                   "Whitespace", NULL);
    expect_refused("{\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":"
                   "\"ByteLevel\"},{\"type\":\"Digits\"}]},\"model\":{\"type\":\"BPE\","
                   "\"vocab\":{\"a\":0},\"merges\":[]}}",
                   "after ByteLevel", NULL);
    expect_refused("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
                   "neither a byte-level", NULL);
    expect_refused("{\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\","
                   "\"dropout\":0.1,\"vocab\":{\"a\":0},\"merges\":[]}}",
                   "dropout", NULL);
    expect_refused("{\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\","
                   "\"continuing_subword_prefix\":\"##\",\"vocab\":{\"a\":0},\"merges\":[]}}",
                   "continuing_subword_prefix", NULL);
    expect_refused("{\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\","
                   "\"vocab\":{},\"merges\":[]}}",
                   "empty", NULL);
    expect_refused("{\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\","
                   "\"unk_token\":\"<unk>\",\"vocab\":{\"a\":0},\"merges\":[]}}",
                   "unk_token", "<unk>", NULL);

    rt_tokenizer *t = (rt_tokenizer *)1;
    char err[256] = "";
    assert_int_equal(rt_tokenizer_from_hf_file(&t, "/nonexistent/tokenizer.json", err, sizeof(err)),
                     -1);
    assert_null(t);
    assert_non_null(strstr(err, "/nonexistent/tokenizer.json"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama3_fixture_matches_hf_tokenizers),
        cmocka_unit_test(test_qwen2_fixture_with_nfc_matches_hf_tokenizers),
        cmocka_unit_test(test_smollm_fixture_with_digit_splits_matches_hf_tokenizers),
        cmocka_unit_test(test_gpt2_fixture_with_prefix_space_matches_hf_tokenizers),
        cmocka_unit_test(test_llama2_style_fixture_takes_the_sentencepiece_path),
        cmocka_unit_test(test_metaspace_fixture_takes_the_sentencepiece_path),
        cmocka_unit_test(test_llama3_fixture_metadata),
        cmocka_unit_test(test_qwen2_fixture_has_no_bos),
        cmocka_unit_test(test_nfc_makes_decomposed_and_precomposed_text_equal),
        cmocka_unit_test(test_gguf_gpt2_llama_bpe_matches_the_json_tokenizer),
        cmocka_unit_test(test_gguf_gpt2_smollm_matches_the_json_tokenizer),
        cmocka_unit_test(test_gguf_gpt2_refusals_name_the_key),
        cmocka_unit_test(test_merges_apply_lowest_rank_first_and_ties_go_left),
        cmocka_unit_test(test_ignore_merges_takes_whole_vocabulary_words),
        cmocka_unit_test(test_bytes_missing_from_the_vocabulary_use_unk_or_vanish),
        cmocka_unit_test(test_added_tokens_lstrip_rstrip_and_single_word),
        cmocka_unit_test(test_template_post_processor_sets_bos),
        cmocka_unit_test(test_invalid_utf8_round_trips_through_byte_level),
        cmocka_unit_test(test_long_random_text_round_trips_quickly),
        cmocka_unit_test(test_hostile_whitespace_and_marks_stay_fast),
        cmocka_unit_test(test_empty_text_gives_bos_only_when_asked),
        cmocka_unit_test(test_refusals_name_what_is_unsupported),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
