/*
 * test_tokenizer.c - tests for the SentencePiece tokenizer (runtime/tokenizer_spm.c).
 *
 * The golden files in $SIEVE_SHARED_DIR/golden were made by llama.cpp on stories260K.gguf;
 * every case there must tokenize to the same ids and decode to the same text here. Small
 * hand-built vocabularies cover what a 512-token model cannot show: merge order and ties,
 * the special-token partition, byte-fallback misses and the GGUF error paths (built as
 * GGUF images in memory).
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

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define UNDER_VALGRIND() (RUNNING_ON_VALGRIND != 0)
#endif
#endif
#ifndef UNDER_VALGRIND
#define UNDER_VALGRIND() 0
#endif

#include "runtime/gguf.h"
#include "runtime/tokenizer.h"

#define SP "\xe2\x96\x81" /* U+2581, the escaped space */

static struct {
    rt_gguf *gguf;
    rt_tokenizer *tok;
    json_t *tokenize_root;
    json_t *greedy_root;
} fx;

/* --- helpers ------------------------------------------------------------------------------ */

static json_t *load_json(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/golden/%s", dir, name);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        fprintf(stderr, "cannot load %s: %s (line %d)\n", path, jerr.text, jerr.line);
    }
    return root;
}

static int group_setup(void **state)
{
    (void)state;
    const char *dir = getenv("SIEVE_SHARED_DIR");
    if (!dir || !*dir) {
        fprintf(stderr, "SIEVE_SHARED_DIR is not set (it must point at shared/)\n");
        return -1;
    }
    char path[4096], err[256];
    snprintf(path, sizeof(path), "%s/models/stories260K.gguf", dir);
    if (rt_gguf_open(&fx.gguf, path, err, sizeof(err)) != 0) {
        fprintf(stderr, "rt_gguf_open(%s): %s\n", path, err);
        return -1;
    }
    if (rt_tokenizer_from_gguf(&fx.tok, fx.gguf, err, sizeof(err)) != 0) {
        fprintf(stderr, "rt_tokenizer_from_gguf: %s\n", err);
        return -1;
    }
    fx.tokenize_root = load_json(dir, "stories260K-tokenize.json");
    fx.greedy_root = load_json(dir, "stories260K-greedy.json");
    return fx.tokenize_root && fx.greedy_root ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    json_decref(fx.tokenize_root);
    json_decref(fx.greedy_root);
    rt_tokenizer_destroy(fx.tok);
    rt_gguf_close(fx.gguf);
    memset(&fx, 0, sizeof(fx));
    return 0;
}

static const json_t *golden_cases(const json_t *root)
{
    const json_t *cases = json_object_get(root, "cases");
    assert_non_null(cases);
    assert_true(json_is_array(cases));
    assert_true(json_array_size(cases) > 0);
    return cases;
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

static void print_ids(const char *label, const int32_t *ids, size_t n)
{
    print_message("  %s (%zu):", label, n);
    for (size_t i = 0; i < n; i++) {
        print_message(" %d", ids[i]);
    }
    print_message("\n");
}

static void expect_ids(const int32_t *got, size_t n, const int32_t *want, size_t n_want,
                       const char *what)
{
    if (n == n_want && (n == 0 || memcmp(got, want, n * sizeof(*got)) == 0)) {
        return;
    }
    print_message("token ids differ for %s\n", what);
    print_ids("want", want, n_want);
    print_ids("got ", got, n);
    fail_msg("token ids differ for %s", what);
}

static int32_t *json_ids(const json_t *arr, size_t *n)
{
    assert_true(json_is_array(arr));
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n ? *n : 1) * sizeof(*ids));
    assert_non_null(ids);
    for (size_t i = 0; i < *n; i++) {
        const json_t *v = json_array_get(arr, i);
        assert_true(json_is_integer(v));
        ids[i] = (int32_t)json_integer_value(v);
    }
    return ids;
}

/* Tokenizes a golden string and compares with the golden id list stored under key. */
static void check_golden_ids(const json_t *c, const char *text_key, const char *ids_key, bool bos,
                             bool special)
{
    const json_t *text = json_object_get(c, text_key);
    assert_true(json_is_string(text));
    size_t n_want, n;
    int32_t *want = json_ids(json_object_get(c, ids_key), &n_want);
    int32_t *got;
    encode(fx.tok, json_string_value(text), json_string_length(text), bos, special, &got, &n);
    char what[512];
    snprintf(what, sizeof(what), "%s of \"%s\"", ids_key, json_string_value(text));
    expect_ids(got, n, want, n_want, what);
    free(want);
    free(got);
}

static void expect_bytes(const char *got, size_t n, const char *want, size_t n_want,
                         const char *what)
{
    if (n == n_want && memcmp(got, want, n) == 0) {
        return;
    }
    print_message("bytes differ for %s\n  want (%zu): \"%.*s\"\n  got  (%zu): \"%.*s\"\n", what,
                  n_want, (int)n_want, want, n, (int)n, got);
    fail_msg("decoded bytes differ for %s", what);
}

/* The /detokenize endpoint renders control and unknown tokens as their text, while
 * rt_token_to_bytes (like completion output) drops them, so their text is removed from the
 * golden string before comparing. */
static char *golden_text_without_specials(const char *text, const int32_t *ids, size_t n)
{
    char *out = strdup(text);
    assert_non_null(out);
    for (size_t i = 0; i < n; i++) {
        int type = rt_token_type(fx.tok, ids[i]);
        if (type != RT_TOKEN_CONTROL && type != RT_TOKEN_UNKNOWN) {
            continue;
        }
        size_t plen;
        const char *p = rt_token_piece(fx.tok, ids[i], &plen);
        char *hit = strstr(out, p);
        if (hit) {
            memmove(hit, hit + plen, strlen(hit + plen) + 1);
        }
    }
    return out;
}

typedef struct {
    const char *piece;
    float score;
    int32_t type;
} entry;

/* A tokenizer over a hand-written vocabulary; types all zero means "pass no types". */
static rt_tokenizer *make_tok(const entry *v, uint32_t n, bool add_space_prefix, int32_t unk_id)
{
    const char **pieces = malloc(n * sizeof(*pieces));
    uint32_t *lens = malloc(n * sizeof(*lens));
    float *scores = malloc(n * sizeof(*scores));
    int32_t *types = malloc(n * sizeof(*types));
    assert_true(pieces && lens && scores && types);
    bool any_type = false;
    for (uint32_t i = 0; i < n; i++) {
        pieces[i] = v[i].piece;
        lens[i] = (uint32_t)strlen(v[i].piece);
        scores[i] = v[i].score;
        types[i] = v[i].type;
        any_type = any_type || v[i].type != 0;
    }
    rt_vocab_spec spec = {
        .n_vocab = n,
        .pieces = pieces,
        .piece_lens = lens,
        .scores = scores,
        .types = any_type ? types : NULL,
        .bos_id = -1,
        .eos_id = -1,
        .unk_id = unk_id,
        .add_bos = false,
        .add_space_prefix = add_space_prefix,
    };
    rt_tokenizer *t = NULL;
    char err[256] = "";
    int rc = rt_tokenizer_create(&t, &spec, err, sizeof(err));
    if (rc != 0) {
        fail_msg("rt_tokenizer_create: %s", err);
    }
    free(pieces);
    free(lens);
    free(scores);
    free(types);
    return t;
}

static void expect_encoding(const rt_tokenizer *t, const char *text, bool special,
                            const int32_t *want, size_t n_want)
{
    int32_t *got;
    size_t n;
    encode(t, text, strlen(text), false, special, &got, &n);
    char what[256];
    snprintf(what, sizeof(what), "\"%s\" (parse_special %d)", text, special);
    expect_ids(got, n, want, n_want, what);
    free(got);
}

#define EXPECT_ENCODING(t, text, special, ...)                                                     \
    do {                                                                                           \
        const int32_t want_[] = {__VA_ARGS__};                                                     \
        expect_encoding((t), (text), (special), want_, sizeof(want_) / sizeof(want_[0]));          \
    } while (0)

static int32_t id_of(const rt_tokenizer *t, const char *piece)
{
    uint32_t n = rt_tokenizer_n_vocab(t);
    for (uint32_t i = 0; i < n; i++) {
        size_t len;
        const char *p = rt_token_piece(t, (int32_t)i, &len);
        if (len == strlen(piece) && memcmp(p, piece, len) == 0) {
            return (int32_t)i;
        }
    }
    fail_msg("piece \"%s\" is not in the vocabulary", piece);
    return -1;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* --- golden files ------------------------------------------------------------------------- */

static void test_golden_tokenize_with_special_parsing_matches_llama_cpp(void **state)
{
    (void)state;
    const json_t *cases = golden_cases(fx.tokenize_root);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        check_golden_ids(json_array_get(cases, i), "text", "token_ids", false, true);
    }
}

static void test_golden_tokenize_without_special_parsing_matches_llama_cpp(void **state)
{
    (void)state;
    const json_t *cases = golden_cases(fx.tokenize_root);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        check_golden_ids(json_array_get(cases, i), "text", "token_ids_parse_special_false", false,
                         false);
    }
}

static void test_golden_tokenize_with_add_special_prepends_bos_only(void **state)
{
    (void)state;
    const json_t *cases = golden_cases(fx.tokenize_root);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        check_golden_ids(json_array_get(cases, i), "text", "token_ids_add_special_true", true,
                         true);
    }
}

static void test_golden_token_ids_decode_to_detokenized_text(void **state)
{
    (void)state;
    const json_t *cases = golden_cases(fx.tokenize_root);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        const json_t *detok = json_object_get(c, "detokenized");
        assert_true(json_is_string(detok));
        size_t n, len;
        int32_t *ids = json_ids(json_object_get(c, "token_ids"), &n);
        char *got = decode(fx.tok, ids, n, &len);
        char *want = golden_text_without_specials(json_string_value(detok), ids, n);
        expect_bytes(got, len, want, strlen(want), json_string_value(detok));
        free(want);
        free(got);
        free(ids);
    }
}

static void test_golden_prompts_tokenize_with_bos(void **state)
{
    (void)state;
    const json_t *cases = golden_cases(fx.greedy_root);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        check_golden_ids(c, "prompt", "prompt_token_ids", true, true);
        check_golden_ids(c, "prompt", "prompt_token_ids_no_bos", false, true);
    }
}

static void test_golden_completion_ids_decode_to_completion_text(void **state)
{
    (void)state;
    const json_t *cases = golden_cases(fx.greedy_root);
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        const json_t *text = json_object_get(c, "completion_text");
        assert_true(json_is_string(text));
        size_t n, len;
        int32_t *ids = json_ids(json_object_get(c, "completion_token_ids"), &n);
        char *got = decode(fx.tok, ids, n, &len);
        expect_bytes(got, len, json_string_value(text), json_string_length(text),
                     json_string_value(json_object_get(c, "prompt")));
        free(got);
        free(ids);
    }
}

/* --- behaviour on the real vocabulary ----------------------------------------------------- */

static void test_model_metadata_is_read_from_gguf(void **state)
{
    (void)state;
    assert_int_equal(rt_tokenizer_n_vocab(fx.tok), 512);
    assert_int_equal(rt_tokenizer_bos(fx.tok), 1);
    assert_int_equal(rt_tokenizer_eos(fx.tok), 2);
    assert_true(rt_tokenizer_add_bos(fx.tok));
    assert_int_equal(rt_token_type(fx.tok, 0), RT_TOKEN_UNKNOWN);
    assert_int_equal(rt_token_type(fx.tok, 1), RT_TOKEN_CONTROL);
    assert_int_equal(rt_token_type(fx.tok, 13), RT_TOKEN_BYTE);
    assert_int_equal(rt_token_type(fx.tok, 403), RT_TOKEN_NORMAL);
    assert_int_equal(rt_token_type(fx.tok, 512), 0);
    assert_int_equal(rt_token_type(fx.tok, -1), 0);
    size_t len;
    assert_string_equal(rt_token_piece(fx.tok, 403, &len), SP "Once");
    assert_int_equal(len, strlen(SP "Once"));
    assert_null(rt_token_piece(fx.tok, 512, &len));
    assert_null(rt_token_piece(fx.tok, -5, NULL));
}

static void test_special_token_text_becomes_its_id(void **state)
{
    (void)state;
    EXPECT_ENCODING(fx.tok, "<s>", true, 1);
    EXPECT_ENCODING(fx.tok, "</s>", true, 2);
    EXPECT_ENCODING(fx.tok, "<unk>", true, 0);
    EXPECT_ENCODING(fx.tok, "<s></s><unk>", true, 1, 2, 0);
}

static void test_text_after_special_token_gets_dummy_prefix_again(void **state)
{
    (void)state;
    /* " Hello" then BOS then " world": the fragment after a special token is a new start */
    EXPECT_ENCODING(fx.tok, "Hello<s>world", true, 346, 306, 414, 1, 263, 304, 341);
    /* no empty fragment (and so no lone space) after a trailing special token */
    EXPECT_ENCODING(fx.tok, "Hello</s>", true, 346, 306, 414, 2);
    /* BOS requested and written in the text: both appear, as in llama.cpp */
    int32_t *ids;
    size_t n;
    encode(fx.tok, "<s>Hello", strlen("<s>Hello"), true, true, &ids, &n);
    const int32_t want[] = {1, 1, 346, 306, 414};
    expect_ids(ids, n, want, 5, "\"<s>Hello\" with BOS");
    free(ids);
}

static void test_special_token_text_is_plain_when_parse_special_off(void **state)
{
    (void)state;
    const int32_t sp = id_of(fx.tok, SP), lt = id_of(fx.tok, "<"), gt = id_of(fx.tok, ">");
    const int32_t s = id_of(fx.tok, "s");
    EXPECT_ENCODING(fx.tok, "<s>", false, sp, lt, s, gt);
    int32_t *ids;
    size_t n, len;
    encode(fx.tok, "<s>", 3, false, false, &ids, &n);
    char *text = decode(fx.tok, ids, n, &len);
    expect_bytes(text, len, " <s>", 4, "decoded \"<s>\"");
    free(text);
    free(ids);
}

static void test_empty_text_gives_no_tokens_unless_bos_requested(void **state)
{
    (void)state;
    int32_t sentinel;
    int32_t *ids = &sentinel;
    size_t n = 99;
    assert_int_equal(rt_tokenize(fx.tok, "", 0, false, true, &ids, &n), 0);
    assert_int_equal(n, 0);
    assert_null(ids);
    assert_int_equal(rt_tokenize(fx.tok, NULL, 0, false, true, &ids, &n), 0);
    assert_int_equal(n, 0);
    free(ids);
    assert_int_equal(rt_tokenize(fx.tok, "", 0, true, true, &ids, &n), 0);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 1);
    free(ids);
}

static void test_missing_character_falls_back_to_utf8_byte_tokens(void **state)
{
    (void)state;
    /* U+65E5 is E6 97 A5; byte tokens are id = byte + 3 */
    EXPECT_ENCODING(fx.tok, "\xe6\x97\xa5", true, 410, 233, 154, 168);
    const int32_t bytes[] = {233, 154, 168};
    size_t len;
    char *text = decode(fx.tok, bytes, 3, &len);
    expect_bytes(text, len, "\xe6\x97\xa5", 3, "byte tokens of U+65E5");
    free(text);
    /* characters that are pieces stay whole */
    EXPECT_ENCODING(fx.tok, "\xc3\xa9", true, 410, 485);
}

static void test_invalid_utf8_is_tokenized_bytewise_and_round_trips(void **state)
{
    (void)state;
    EXPECT_ENCODING(fx.tok, "\xff\xfe", true, 410, 0xff + 3, 0xfe + 3);
    /* a stray continuation byte is a symbol of its own */
    EXPECT_ENCODING(fx.tok, "a\x80", true, 261, 0x80 + 3);
    /* llama.cpp sizes a symbol from its lead byte without checking what follows, so E3
     * swallows "ab" (61 62) and all three become byte tokens (not the 'a' and 'b' pieces) */
    EXPECT_ENCODING(fx.tok, "\xe3\x61\x62", true, 410, 0xe3 + 3, 'a' + 3, 'b' + 3);
    /* a lead byte cut short by the end of the text */
    EXPECT_ENCODING(fx.tok, "a\xe6\x97", true, 261, 0xe6 + 3, 0x97 + 3);

    const char input[] = "x\xff\xfe\xe3\x61\x62\x80 \xf0\x9f";
    int32_t *ids;
    size_t n, len;
    encode(fx.tok, input, sizeof(input) - 1, false, true, &ids, &n);
    char *text = decode(fx.tok, ids, n, &len);
    char want[sizeof(input) + 1];
    want[0] = ' ';
    memcpy(want + 1, input, sizeof(input) - 1);
    expect_bytes(text, len, want, sizeof(input), "invalid UTF-8");
    free(text);
    free(ids);
}

static void test_literal_u2581_behaves_like_a_space(void **state)
{
    (void)state;
    EXPECT_ENCODING(fx.tok, SP, true, 410, 410);
    int32_t *a, *b;
    size_t na, nb;
    encode(fx.tok, "Hello world", 11, false, true, &a, &na);
    encode(fx.tok, "Hello" SP "world", strlen("Hello" SP "world"), false, true, &b, &nb);
    expect_ids(b, nb, a, na, "U+2581 in place of a space");
    free(a);
    free(b);
}

static void test_token_to_bytes_renders_pieces_and_hides_control_tokens(void **state)
{
    (void)state;
    char buf[16];
    memset(buf, '#', sizeof(buf));
    assert_int_equal(rt_token_to_bytes(fx.tok, 346, buf, sizeof(buf)), 3);
    assert_memory_equal(buf, " He", 3);
    assert_int_equal(rt_token_to_bytes(fx.tok, 13, buf, sizeof(buf)), 1);
    assert_int_equal(buf[0], '\n');
    assert_int_equal(rt_token_to_bytes(fx.tok, 1, buf, sizeof(buf)), 0);   /* <s> */
    assert_int_equal(rt_token_to_bytes(fx.tok, 2, buf, sizeof(buf)), 0);   /* </s> */
    assert_int_equal(rt_token_to_bytes(fx.tok, 0, buf, sizeof(buf)), 0);   /* <unk> */
    assert_int_equal(rt_token_to_bytes(fx.tok, 512, buf, sizeof(buf)), 0); /* out of range */
    assert_int_equal(rt_token_to_bytes(fx.tok, -1, buf, sizeof(buf)), 0);
    /* like snprintf: the full length comes back, at most cap bytes are written */
    memset(buf, '#', sizeof(buf));
    assert_int_equal(rt_token_to_bytes(fx.tok, 403, buf, 2), 5); /* " Once" */
    assert_memory_equal(buf, " O##", 4);
    assert_int_equal(rt_token_to_bytes(fx.tok, 403, NULL, 0), 5);
}

static uint32_t xorshift32(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static void check_long_text(const char *label, const char *text, size_t len, size_t n_chars)
{
    int32_t *ids;
    size_t n, out_len;
    double t0 = now_ms();
    encode(fx.tok, text, len, false, true, &ids, &n);
    double ms = now_ms() - t0;
    print_message("%s: %zu chars (%zu bytes) -> %zu tokens in %.2f ms\n", label, n_chars, len, n,
                  ms);
    /* O(n log n) does this in a few ms; a quadratic merge loop takes far longer */
    double limit = UNDER_VALGRIND() ? 30000.0 : 500.0;
    if (ms > limit) {
        fail_msg("%s took %.1f ms (limit %.0f ms)", label, ms, limit);
    }
    char *back = decode(fx.tok, ids, n, &out_len);
    assert_int_equal(out_len, len + 1);
    assert_int_equal(back[0], ' ');
    assert_memory_equal(back + 1, text, len);
    free(back);
    free(ids);
}

static void test_long_text_tokenizes_fast_and_round_trips(void **state)
{
    (void)state;
    /* clang-format would put each string on a line of its own */
    // clang-format off
    static const char *const alphabet[] = {
        "a", "b", "c", "d", "e", "h", "i", "l", "n", "o", "r", "s", "t", "u", "w", "y",
        "T", "O", "L", " ", " ", " ", " ", ".", ",", "!", "?", "'", "\n", "\t", "0", "7",
        "\xc3\xa9", "\xe6\x97\xa5", "\xe2\x80\x9c", "\xf0\x9f\x99\x82", "  ", "-", "\"", ">",
    };
    // clang-format on
    const size_t n_alpha = sizeof(alphabet) / sizeof(alphabet[0]);
    const size_t n_chars = 20000;
    char *text = malloc(n_chars * 4 + 1);
    assert_non_null(text);
    uint32_t seed = 12345;
    size_t len = 0, chars = 0;
    while (chars < n_chars) {
        const char *c = alphabet[xorshift32(&seed) % n_alpha];
        size_t cl = strlen(c);
        memcpy(text + len, c, cl);
        len += cl;
        chars++;
    }
    check_long_text("random text", text, len, n_chars);

    /* one 20,000-character word: every step has many equal-score candidate pairs */
    for (size_t i = 0; i < n_chars; i++) {
        text[i] = "the"[i % 3];
    }
    check_long_text("repeated word", text, n_chars, n_chars);
    free(text);
}

/* --- hand-built vocabularies -------------------------------------------------------------- */

static void test_highest_score_merges_first_and_ties_go_left(void **state)
{
    (void)state;
    const entry tie[] = {{"a", 0, 1}, {"b", 0, 1}, {"ab", 1, 1}, {"bb", 1, 1}};
    rt_tokenizer *t = make_tok(tie, 4, false, -1);
    EXPECT_ENCODING(t, "abb", true, 2, 1);
    rt_tokenizer_destroy(t);

    const entry better[] = {{"a", 0, 1}, {"b", 0, 1}, {"ab", 1, 1}, {"bb", 2, 1}};
    t = make_tok(better, 4, false, -1);
    EXPECT_ENCODING(t, "abb", true, 0, 3);
    rt_tokenizer_destroy(t);

    /* a merge exposes a new pair: bc first, then a+bc */
    const entry chain[] = {{"a", 0, 1},  {"b", 0, 1},  {"c", 0, 1},
                           {"ab", 1, 1}, {"bc", 5, 1}, {"abc", -9, 1}};
    t = make_tok(chain, 6, false, -1);
    EXPECT_ENCODING(t, "abc", true, 5);
    EXPECT_ENCODING(t, "abcab", true, 5, 3);
    rt_tokenizer_destroy(t);

    /* candidates made stale by a neighbour's merge are skipped: a+a (left), then the
     * pair starting at the already-absorbed second 'a' is dropped, then a+a, then aa+aa */
    const entry run[] = {{"a", 0, 1}, {"aa", 1, 1}, {"aaaa", 2, 1}};
    t = make_tok(run, 3, false, -1);
    EXPECT_ENCODING(t, "aaaa", true, 2);
    EXPECT_ENCODING(t, "aaaaa", true, 2, 0);
    rt_tokenizer_destroy(t);
}

static void test_dummy_prefix_and_space_escaping_follow_the_spec(void **state)
{
    (void)state;
    const entry v[] = {{"a", 0, 1}, {SP, 0, 1}, {SP "a", 1, 1}};
    rt_tokenizer *t = make_tok(v, 3, true, -1);
    EXPECT_ENCODING(t, "a a", true, 2, 2);
    EXPECT_ENCODING(t, " a", true, 1, 2);
    rt_tokenizer_destroy(t);

    t = make_tok(v, 3, false, -1);
    EXPECT_ENCODING(t, "a a", true, 0, 2);
    rt_tokenizer_destroy(t);
}

static void test_duplicate_piece_resolves_to_the_last_id(void **state)
{
    (void)state;
    const entry v[] = {{"x", 0, 1}, {"y", 0, 1}, {"x", 0, 1}};
    rt_tokenizer *t = make_tok(v, 3, false, -1);
    EXPECT_ENCODING(t, "xyx", true, 2, 1, 2);
    rt_tokenizer_destroy(t);
}

static void test_byte_fallback_without_byte_piece_uses_unknown(void **state)
{
    (void)state;
    /* no types given: <0xNN> pieces are BYTE by name, the rest NORMAL */
    const entry v[] = {{"<unk>", 0, 0}, {"<0x41>", 0, 0}, {"b", 0, 0}};
    rt_tokenizer *t = make_tok(v, 3, false, 0);
    assert_int_equal(rt_token_type(t, 1), RT_TOKEN_BYTE);
    assert_int_equal(rt_token_type(t, 0), RT_TOKEN_NORMAL);
    EXPECT_ENCODING(t, "AbC", true, 1, 2, 0);
    char c;
    assert_int_equal(rt_token_to_bytes(t, 1, &c, 1), 1);
    assert_int_equal(c, 'A');
    rt_tokenizer_destroy(t);

    /* with neither a byte piece nor an unknown token the byte has nothing to become */
    t = make_tok(v, 3, false, -1);
    EXPECT_ENCODING(t, "bC", true, 2);
    rt_tokenizer_destroy(t);
}

static void test_special_tokens_match_longest_first_per_token(void **state)
{
    (void)state;
    const entry v[] = {{"<x>", 0, RT_TOKEN_CONTROL},
                       {"<x>y", 0, RT_TOKEN_CONTROL},
                       {"bcd", 0, RT_TOKEN_CONTROL},
                       {"ab", 0, RT_TOKEN_CONTROL},
                       {"a", 0, 1},
                       {"b", 0, 1},
                       {"c", 0, 1},
                       {"y", 0, 1}};
    rt_tokenizer *t = make_tok(v, 8, false, -1);
    EXPECT_ENCODING(t, "a<x>yb<x>", true, 4, 1, 5, 0);
    /* each special token takes a whole pass, longest first, as in llama.cpp: "bcd" claims
     * its bytes before "ab" is looked for, even though "ab" starts earlier */
    EXPECT_ENCODING(t, "abcd", true, 4, 2);
    EXPECT_ENCODING(t, "abab", true, 3, 3);
    rt_tokenizer_destroy(t);
}

static void test_user_defined_tokens_split_even_without_special_parsing(void **state)
{
    (void)state;
    const entry v[] = {{"<ctl>", 0, RT_TOKEN_CONTROL},
                       {SP "u", 0, RT_TOKEN_USER_DEFINED},
                       {"a", 0, 1},
                       {"<", 0, 1},
                       {"c", 0, 1},
                       {"t", 0, 1},
                       {"l", 0, 1},
                       {">", 0, 1}};
    rt_tokenizer *t = make_tok(v, 8, false, -1);
    EXPECT_ENCODING(t, "a" SP "ua", false, 2, 1, 2);
    EXPECT_ENCODING(t, "a<ctl>", false, 2, 3, 4, 5, 6, 7);
    EXPECT_ENCODING(t, "a<ctl>", true, 2, 0);
    /* user-defined pieces print verbatim; control pieces print nothing */
    char buf[8];
    assert_int_equal(rt_token_to_bytes(t, 1, buf, sizeof(buf)), 4);
    assert_memory_equal(buf, SP "u", 4);
    assert_int_equal(rt_token_to_bytes(t, 0, buf, sizeof(buf)), 0);
    rt_tokenizer_destroy(t);
}

static void test_create_rejects_invalid_specs(void **state)
{
    (void)state;
    const char *pieces[] = {"a", "b"};
    const uint32_t lens[] = {1, 1};
    rt_vocab_spec spec = {
        .n_vocab = 2,
        .pieces = pieces,
        .piece_lens = lens,
        .bos_id = -1,
        .eos_id = -1,
        .unk_id = -1,
    };
    rt_tokenizer *t = (rt_tokenizer *)&spec;
    char err[256];

    spec.n_vocab = 0;
    assert_int_equal(rt_tokenizer_create(&t, &spec, err, sizeof(err)), -1);
    assert_null(t);
    assert_non_null(strstr(err, "n_vocab"));
    spec.n_vocab = 2;

    spec.bos_id = 2;
    assert_int_equal(rt_tokenizer_create(&t, &spec, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "bos_id"));
    spec.bos_id = -1;

    spec.unk_id = -2;
    assert_int_equal(rt_tokenizer_create(&t, &spec, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "unk_id"));
    spec.unk_id = -1;

    spec.pieces = NULL;
    assert_int_equal(rt_tokenizer_create(&t, &spec, err, sizeof(err)), -1);
    spec.pieces = pieces;

    assert_int_equal(rt_tokenizer_create(&t, NULL, err, sizeof(err)), -1);
    assert_int_equal(rt_tokenizer_create(&t, &spec, NULL, 0), 0);
    assert_non_null(t);
    rt_tokenizer_destroy(t);
    rt_tokenizer_destroy(NULL);
}

/* --- GGUF bridge with in-memory files ----------------------------------------------------- */

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
    memcpy(w->p + w->n, src, n);
    w->n += n;
}

static void gw_u32(gguf_writer *w, uint32_t v)
{
    uint8_t b[4];
    for (int i = 0; i < 4; i++) {
        b[i] = (uint8_t)(v >> (8 * i));
    }
    gw_bytes(w, b, 4);
}

static void gw_u64(gguf_writer *w, uint64_t v)
{
    uint8_t b[8];
    for (int i = 0; i < 8; i++) {
        b[i] = (uint8_t)(v >> (8 * i));
    }
    gw_bytes(w, b, 8);
}

static void gw_str(gguf_writer *w, const char *s)
{
    gw_u64(w, strlen(s));
    gw_bytes(w, s, strlen(s));
}

static void gw_key(gguf_writer *w, const char *key, uint32_t type)
{
    gw_str(w, key);
    gw_u32(w, type);
    w->n_kv++;
}

static gguf_writer gw_begin(void)
{
    gguf_writer w = {0};
    gw_bytes(&w, "GGUF", 4);
    gw_u32(&w, 3);
    gw_u64(&w, 0); /* tensors */
    gw_u64(&w, 0); /* kv count, patched by gw_parse */
    return w;
}

static void gw_kv_str(gguf_writer *w, const char *key, const char *v)
{
    gw_key(w, key, RT_GGUF_STRING);
    gw_str(w, v);
}

static void gw_kv_u32(gguf_writer *w, const char *key, uint32_t v)
{
    gw_key(w, key, RT_GGUF_UINT32);
    gw_u32(w, v);
}

static void gw_kv_bool(gguf_writer *w, const char *key, bool v)
{
    gw_key(w, key, RT_GGUF_BOOL);
    uint8_t b = v;
    gw_bytes(w, &b, 1);
}

static void gw_kv_strs(gguf_writer *w, const char *key, const char *const *v, size_t n)
{
    gw_key(w, key, RT_GGUF_ARRAY);
    gw_u32(w, RT_GGUF_STRING);
    gw_u64(w, n);
    for (size_t i = 0; i < n; i++) {
        gw_str(w, v[i]);
    }
}

static void gw_kv_f32s(gguf_writer *w, const char *key, const float *v, size_t n)
{
    gw_key(w, key, RT_GGUF_ARRAY);
    gw_u32(w, RT_GGUF_FLOAT32);
    gw_u64(w, n);
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &v[i], 4);
        gw_u32(w, bits);
    }
}

static void gw_kv_i32s(gguf_writer *w, const char *key, const int32_t *v, size_t n)
{
    gw_key(w, key, RT_GGUF_ARRAY);
    gw_u32(w, RT_GGUF_INT32);
    gw_u64(w, n);
    for (size_t i = 0; i < n; i++) {
        gw_u32(w, (uint32_t)v[i]);
    }
}

/* Finishes the image (kv count, alignment padding) and builds a tokenizer from it.
 * Returns rt_tokenizer_from_gguf's result; frees the image. */
static int gw_tokenizer(gguf_writer *w, rt_tokenizer **out, char *err, size_t errlen)
{
    for (int i = 0; i < 8; i++) {
        w->p[16 + i] = (uint8_t)(w->n_kv >> (8 * i));
    }
    while (w->n % 32) {
        uint8_t z = 0;
        gw_bytes(w, &z, 1);
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

static const char *const small_vocab[] = {"<unk>", "<s>", "</s>", SP "a", "a"};

static void test_from_gguf_refuses_non_llama_tokenizer(void **state)
{
    (void)state;
    gguf_writer w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", small_vocab, 5);
    rt_tokenizer *t;
    char err[256] = "";
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_null(t);
    assert_non_null(strstr(err, "tokenizer.ggml.model"));
    assert_non_null(strstr(err, "gpt2"));

    w = gw_begin();
    gw_kv_strs(&w, "tokenizer.ggml.tokens", small_vocab, 5);
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.model"));
}

static void test_from_gguf_refuses_arrays_of_the_wrong_length(void **state)
{
    (void)state;
    const float scores[] = {0, 0, 0, -1, -2};
    const int32_t types[] = {2, 3, 3, 1, 1};
    rt_tokenizer *t;
    char err[256] = "";

    gguf_writer w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "llama");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", small_vocab, 5);
    gw_kv_f32s(&w, "tokenizer.ggml.scores", scores, 4);
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.scores"));

    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "llama");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", small_vocab, 5);
    gw_kv_f32s(&w, "tokenizer.ggml.scores", scores, 5);
    gw_kv_i32s(&w, "tokenizer.ggml.token_type", types, 4);
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.token_type"));

    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "llama");
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.tokens"));

    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "llama");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", small_vocab, 5);
    gw_kv_str(&w, "tokenizer.ggml.add_bos_token", "yes");
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "tokenizer.ggml.add_bos_token"));
}

static void test_from_gguf_applies_llama_defaults_and_flags(void **state)
{
    (void)state;
    rt_tokenizer *t;
    char err[256] = "";

    /* only the required keys: unk/bos/eos default to 0/1/2, BOS and prefix on */
    gguf_writer w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "llama");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", small_vocab, 5);
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), 0);
    assert_int_equal(rt_tokenizer_bos(t), 1);
    assert_int_equal(rt_tokenizer_eos(t), 2);
    assert_true(rt_tokenizer_add_bos(t));
    int32_t *ids;
    size_t n;
    encode(t, "a", 1, true, true, &ids, &n);
    const int32_t want[] = {1, 3};
    expect_ids(ids, n, want, 2, "\"a\" with defaults");
    free(ids);
    rt_tokenizer_destroy(t);

    /* an out-of-range id keeps the default; flags turn BOS and the prefix off */
    const float scores[] = {0, 0, 0, -1, -2};
    const int32_t types[] = {2, 3, 3, 1, 1};
    w = gw_begin();
    gw_kv_str(&w, "tokenizer.ggml.model", "llama");
    gw_kv_strs(&w, "tokenizer.ggml.tokens", small_vocab, 5);
    gw_kv_f32s(&w, "tokenizer.ggml.scores", scores, 5);
    gw_kv_i32s(&w, "tokenizer.ggml.token_type", types, 5);
    gw_kv_u32(&w, "tokenizer.ggml.bos_token_id", 0xFFFFFFFFu);
    gw_kv_u32(&w, "tokenizer.ggml.eos_token_id", 4);
    gw_kv_bool(&w, "tokenizer.ggml.add_bos_token", false);
    gw_kv_bool(&w, "tokenizer.ggml.add_space_prefix", false);
    assert_int_equal(gw_tokenizer(&w, &t, err, sizeof(err)), 0);
    assert_int_equal(rt_tokenizer_bos(t), 1);
    assert_int_equal(rt_tokenizer_eos(t), 4);
    assert_false(rt_tokenizer_add_bos(t));
    assert_int_equal(rt_token_type(t, 0), RT_TOKEN_UNKNOWN);
    encode(t, "a<s>a", 5, true, true, &ids, &n);
    const int32_t want2[] = {4, 1, 4};
    expect_ids(ids, n, want2, 3, "\"a<s>a\" without BOS or prefix");
    free(ids);
    rt_tokenizer_destroy(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_tokenize_with_special_parsing_matches_llama_cpp),
        cmocka_unit_test(test_golden_tokenize_without_special_parsing_matches_llama_cpp),
        cmocka_unit_test(test_golden_tokenize_with_add_special_prepends_bos_only),
        cmocka_unit_test(test_golden_token_ids_decode_to_detokenized_text),
        cmocka_unit_test(test_golden_prompts_tokenize_with_bos),
        cmocka_unit_test(test_golden_completion_ids_decode_to_completion_text),
        cmocka_unit_test(test_model_metadata_is_read_from_gguf),
        cmocka_unit_test(test_special_token_text_becomes_its_id),
        cmocka_unit_test(test_text_after_special_token_gets_dummy_prefix_again),
        cmocka_unit_test(test_special_token_text_is_plain_when_parse_special_off),
        cmocka_unit_test(test_empty_text_gives_no_tokens_unless_bos_requested),
        cmocka_unit_test(test_missing_character_falls_back_to_utf8_byte_tokens),
        cmocka_unit_test(test_invalid_utf8_is_tokenized_bytewise_and_round_trips),
        cmocka_unit_test(test_literal_u2581_behaves_like_a_space),
        cmocka_unit_test(test_token_to_bytes_renders_pieces_and_hides_control_tokens),
        cmocka_unit_test(test_long_text_tokenizes_fast_and_round_trips),
        cmocka_unit_test(test_highest_score_merges_first_and_ties_go_left),
        cmocka_unit_test(test_dummy_prefix_and_space_escaping_follow_the_spec),
        cmocka_unit_test(test_duplicate_piece_resolves_to_the_last_id),
        cmocka_unit_test(test_byte_fallback_without_byte_piece_uses_unknown),
        cmocka_unit_test(test_special_tokens_match_longest_first_per_token),
        cmocka_unit_test(test_user_defined_tokens_split_even_without_special_parsing),
        cmocka_unit_test(test_create_rejects_invalid_specs),
        cmocka_unit_test(test_from_gguf_refuses_non_llama_tokenizer),
        cmocka_unit_test(test_from_gguf_refuses_arrays_of_the_wrong_length),
        cmocka_unit_test(test_from_gguf_applies_llama_defaults_and_flags),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
