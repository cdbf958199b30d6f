/*
 * test_gguf.c - unit tests for runtime/gguf.c, the GGUF reader.
 *
 * Three sources of input: the real stories260K.gguf (parsed as-is, then corrupted
 * one field at a time, each corruption expected to be refused by the check meant
 * for it, proven by a substring of the error message), small synthetic files
 * written here (every metadata type, F16/BF16 tensors, targeted corruptions), and
 * brute-force truncations/byte mutations of the real file, which must fail or
 * succeed cleanly. Buffers handed to the parser are always malloc-ed at their
 * exact length, so any read past the end shows up under valgrind.
 *
 * Needs $SIEVE_SHARED_DIR/models/stories260K.gguf (default ../shared).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/gguf.h"

/* Facts about stories260K.gguf, read with python's gguf package (GGUFReader). */
#define MODEL_SIZE 1185376u
#define MODEL_DATA_OFFSET 14176u
#define MODEL_N_TENSORS 48u
#define MODEL_N_KV 19u

/* The real model, loaded once by the group setup; tests copy it before changing it. */
static uint8_t *model;
static size_t model_size;
static rt_gguf *model_g; /* the unmodified parse, used to locate fields to corrupt */

/* ---- helpers ---- */

static float f32_from_bits(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void model_path(char *out, size_t n)
{
    const char *dir = getenv("SIEVE_SHARED_DIR");
    snprintf(out, n, "%s/models/stories260K.gguf", dir && *dir ? dir : "../shared");
}

static int setup_model(void **state)
{
    (void)state;
    char path[4096];
    model_path(path, sizeof path);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "test_gguf: cannot open %s: %s (set SIEVE_SHARED_DIR)\n", path,
                strerror(errno));
        return -1;
    }
    model = malloc(MODEL_SIZE + 1);
    model_size = model ? fread(model, 1, MODEL_SIZE + 1, f) : 0;
    fclose(f);
    if (model_size != MODEL_SIZE) {
        fprintf(stderr, "test_gguf: %s is %zu bytes, expected %u\n", path, model_size, MODEL_SIZE);
        return -1;
    }
    char err[512];
    if (rt_gguf_parse(&model_g, model, model_size, err, sizeof err) != 0) {
        fprintf(stderr, "test_gguf: %s\n", err);
        return -1;
    }
    return 0;
}

static int teardown_model(void **state)
{
    (void)state;
    rt_gguf_close(model_g);
    free(model);
    return 0;
}

/* A private copy of the first n bytes of the model, allocated at exactly n bytes. */
static uint8_t *model_copy(size_t n)
{
    uint8_t *b = malloc(n ? n : 1);
    assert_non_null(b);
    memcpy(b, model, n);
    return b;
}

static void put_le(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void expect_parse_error(const uint8_t *buf, size_t size, const char *want)
{
    char err[512] = "untouched";
    rt_gguf *g = (rt_gguf *)(uintptr_t)1;
    int rc = rt_gguf_parse(&g, buf, size, err, sizeof err);
    if (rc == 0)
        rt_gguf_close(g);
    assert_int_not_equal(rc, 0);
    assert_null(g);
    if (!strstr(err, want))
        fail_msg("expected \"%s\" in error \"%s\"", want, err);
    assert_int_equal(strncmp(err, "gguf: ", 6), 0);
}

/* Copies the model, writes v (bytes wide) at off, expects an error containing want. */
static void expect_patch_error(size_t off, uint64_t v, int bytes, const char *want)
{
    uint8_t *b = model_copy(model_size);
    put_le(b + off, v, bytes);
    expect_parse_error(b, model_size, want);
    free(b);
}

/* Byte offsets of fields in the model, found through the good parse. */
static size_t kv_key_off(const char *key) /* the key's uint64 length */
{
    const rt_gguf_kv *kv = rt_gguf_find_kv(model_g, key);
    assert_non_null(kv);
    return (size_t)((const uint8_t *)kv->key.ptr - model) - 8;
}

static size_t kv_type_off(const char *key) /* the uint32 value type */
{
    const rt_gguf_kv *kv = rt_gguf_find_kv(model_g, key);
    assert_non_null(kv);
    return (size_t)((const uint8_t *)kv->key.ptr - model) + kv->key.len;
}

static size_t tensor_name_off(const char *name) /* the name's uint64 length */
{
    const rt_gguf_tensor *t = rt_gguf_find_tensor(model_g, name);
    assert_non_null(t);
    return (size_t)((const uint8_t *)t->name.ptr - model) - 8;
}

static size_t tensor_ndims_off(const char *name)
{
    const rt_gguf_tensor *t = rt_gguf_find_tensor(model_g, name);
    assert_non_null(t);
    return (size_t)((const uint8_t *)t->name.ptr - model) + t->name.len;
}

static size_t tensor_ne_off(const char *name, unsigned d)
{
    return tensor_ndims_off(name) + 4 + 8 * d;
}

static size_t tensor_type_off(const char *name)
{
    return tensor_ne_off(name, rt_gguf_find_tensor(model_g, name)->n_dims);
}

static size_t tensor_offset_off(const char *name)
{
    return tensor_type_off(name) + 4;
}

/* ---- a small GGUF writer for synthetic files ---- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} wbuf;

static void put(wbuf *w, const void *src, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 64;
        w->p = realloc(w->p, w->cap);
        assert_non_null(w->p);
    }
    memcpy(w->p + w->n, src, n);
    w->n += n;
}

static void put_uint(wbuf *w, uint64_t v, int bytes)
{
    uint8_t b[8];
    put_le(b, v, bytes);
    put(w, b, (size_t)bytes);
}

static void put_u8(wbuf *w, uint8_t v)
{
    put_uint(w, v, 1);
}
static void put_u16(wbuf *w, uint16_t v)
{
    put_uint(w, v, 2);
}
static void put_u32(wbuf *w, uint32_t v)
{
    put_uint(w, v, 4);
}
static void put_u64(wbuf *w, uint64_t v)
{
    put_uint(w, v, 8);
}

static void put_f32(wbuf *w, float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    put_u32(w, bits);
}

static void put_f64(wbuf *w, double f)
{
    uint64_t bits;
    memcpy(&bits, &f, sizeof bits);
    put_u64(w, bits);
}

static void put_str(wbuf *w, const char *s)
{
    put_u64(w, strlen(s));
    put(w, s, strlen(s));
}

static void put_header(wbuf *w, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    put(w, "GGUF", 4);
    put_u32(w, version);
    put_u64(w, n_tensors);
    put_u64(w, n_kv);
}

static void put_key(wbuf *w, const char *key, rt_gguf_type type)
{
    put_str(w, key);
    put_u32(w, type);
}

static void put_arr_head(wbuf *w, const char *key, rt_gguf_type et, uint64_t n)
{
    put_key(w, key, RT_GGUF_ARRAY);
    put_u32(w, et);
    put_u64(w, n);
}

static void put_tensor_info(wbuf *w, const char *name, uint32_t n_dims, const uint64_t *ne,
                            rt_ggml_type type, uint64_t offset)
{
    put_str(w, name);
    put_u32(w, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        put_u64(w, ne[d]);
    put_u32(w, type);
    put_u64(w, offset);
}

static void put_pad(wbuf *w, size_t align)
{
    while (w->n % align)
        put_u8(w, 0);
}

/* An exact-size copy of the written bytes (so overreads are visible to valgrind). */
static uint8_t *wbuf_take(wbuf *w, size_t *size)
{
    uint8_t *b = malloc(w->n ? w->n : 1);
    assert_non_null(b);
    memcpy(b, w->p, w->n);
    *size = w->n;
    free(w->p);
    *w = (wbuf){0};
    return b;
}

static void expect_wbuf_error(wbuf *w, const char *want)
{
    size_t size;
    uint8_t *b = wbuf_take(w, &size);
    expect_parse_error(b, size, want);
    free(b);
}

/* ---- the real model parses ---- */

static void check_model(const rt_gguf *g, const uint8_t *base)
{
    assert_int_equal(g->version, 3);
    assert_int_equal(g->n_tensors, MODEL_N_TENSORS);
    assert_int_equal(g->n_kv, MODEL_N_KV);
    assert_int_equal(g->alignment, 32);
    assert_int_equal(g->data_offset, MODEL_DATA_OFFSET);
    assert_int_equal(g->size, MODEL_SIZE);

    uint64_t u;
    double f;
    rt_gguf_str s;
    assert_int_equal(rt_gguf_get_uint(g, "llama.embedding_length", &u), 0);
    assert_int_equal(u, 64);
    assert_int_equal(rt_gguf_get_uint(g, "llama.block_count", &u), 0);
    assert_int_equal(u, 5);
    assert_int_equal(rt_gguf_get_uint(g, "llama.context_length", &u), 0);
    assert_int_equal(u, 2048);
    assert_int_equal(rt_gguf_get_uint(g, "tokenizer.ggml.padding_token_id", &u), 0);
    assert_int_equal(u, UINT32_MAX);
    assert_int_equal(rt_gguf_find_kv(g, "llama.embedding_length")->type, RT_GGUF_UINT32);
    assert_int_equal(rt_gguf_get_float(g, "llama.attention.layer_norm_rms_epsilon", &f), 0);
    assert_true(f == (double)f32_from_bits(0x3727c5ac)); /* 1e-5f */
    assert_int_equal(rt_gguf_get_str(g, "general.architecture", &s), 0);
    assert_true(rt_gguf_str_eq(s, "llama"));
    assert_int_equal(rt_gguf_get_str(g, "tokenizer.ggml.model", &s), 0);
    assert_true(rt_gguf_str_eq(s, "llama"));
    assert_false(rt_gguf_str_eq(s, "llam"));

    const rt_gguf_kv *tokens = rt_gguf_find_kv(g, "tokenizer.ggml.tokens");
    assert_non_null(tokens);
    assert_int_equal(tokens->type, RT_GGUF_ARRAY);
    assert_int_equal(tokens->v.arr.type, RT_GGUF_STRING);
    assert_int_equal(tokens->v.arr.n, 512);
    assert_true(rt_gguf_str_eq(tokens->v.arr.strs[0], "<unk>"));
    assert_true(rt_gguf_str_eq(tokens->v.arr.strs[2], "</s>"));
    assert_true(rt_gguf_str_eq(tokens->v.arr.strs[3], "<0x00>"));
    assert_true(rt_gguf_str_eq(tokens->v.arr.strs[259], "\xe2\x96\x81t"));
    assert_true(rt_gguf_str_eq(tokens->v.arr.strs[511], "\xe2\x80\x8a"));

    const rt_gguf_kv *scores = rt_gguf_find_kv(g, "tokenizer.ggml.scores");
    assert_non_null(scores);
    assert_int_equal(scores->v.arr.type, RT_GGUF_FLOAT32);
    assert_int_equal(scores->v.arr.n, 512);
    assert_int_equal(rt_gguf_arr_float(scores, 261, &f), 0);
    assert_true(f == -2.0);
    assert_int_equal(rt_gguf_arr_float(scores, 511, &f), 0);
    assert_true(f == -252.0);
    assert_int_equal(rt_gguf_arr_float(scores, 512, &f), -1);

    const rt_gguf_kv *types = rt_gguf_find_kv(g, "tokenizer.ggml.token_type");
    assert_non_null(types);
    assert_int_equal(types->v.arr.type, RT_GGUF_INT32);
    int64_t i;
    static const struct {
        uint64_t idx;
        int64_t want;
    } tt[] = {{0, 2}, {1, 3}, {3, 6}, {259, 1}};
    for (size_t k = 0; k < sizeof tt / sizeof tt[0]; k++) {
        assert_int_equal(rt_gguf_arr_int(types, tt[k].idx, &i), 0);
        assert_int_equal(i, tt[k].want);
    }

    const rt_gguf_tensor *t = rt_gguf_find_tensor(g, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 512);
    assert_int_equal(t->ne[2], 1);
    assert_int_equal(t->ne[3], 1);
    assert_int_equal(t->type, RT_GGML_F32);
    assert_int_equal(t->offset, 0);
    assert_int_equal(t->nbytes, 64 * 512 * 4);
    assert_ptr_equal(t->data, base + MODEL_DATA_OFFSET);

    /* First floats of three tensors, bit patterns from GGUFReader. */
    static const struct {
        const char *name;
        uint32_t bits;
        uint64_t offset;
    } first[] = {
        {"token_embd.weight", 0xbe96e950, 0},
        {"output_norm.weight", 0x401d54ef, 131072},
        {"blk.0.attn_q.weight", 0x3d35d536, 262400},
    };
    for (size_t k = 0; k < sizeof first / sizeof first[0]; k++) {
        t = rt_gguf_find_tensor(g, first[k].name);
        assert_non_null(t);
        assert_int_equal(t->offset, first[k].offset);
        float v;
        memcpy(&v, t->data, sizeof v);
        assert_true(v == f32_from_bits(first[k].bits));
    }
    t = rt_gguf_find_tensor(g, "blk.4.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 172);
    assert_int_equal(t->ne[1], 64);
    assert_int_equal(t->nbytes, 172 * 64 * 4);

    /* Every tensor is F32, sized by its shape, and lies inside the file; the last one
     * ends exactly at the end of the file. */
    uint64_t end_max = 0;
    for (uint64_t k = 0; k < g->n_tensors; k++) {
        t = &g->tensors[k];
        assert_int_equal(t->type, RT_GGML_F32);
        assert_int_equal(t->nbytes, t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] * 4);
        assert_true((const uint8_t *)t->data >= base + g->data_offset);
        uint64_t end = (uint64_t)((const uint8_t *)t->data - base) + t->nbytes;
        assert_true(end <= g->size);
        assert_int_equal(t->offset % 32, 0);
        assert_ptr_equal(rt_gguf_find_tensor(g, "blk.0.attn_q.weight"), &g->tensors[3]);
        end_max = end > end_max ? end : end_max;
    }
    assert_int_equal(end_max, MODEL_SIZE);
    assert_null(rt_gguf_find_tensor(g, "blk.5.attn_q.weight"));
    assert_null(rt_gguf_find_tensor(g, "token_embd.weigh"));
    assert_null(rt_gguf_find_tensor(g, ""));
}

static void test_gguf_parses_real_model(void **state)
{
    (void)state;
    uint8_t *b = model_copy(model_size);
    rt_gguf *g = NULL;
    char err[256];
    assert_int_equal(rt_gguf_parse(&g, b, model_size, err, sizeof err), 0);
    assert_ptr_equal(g->base, b);
    assert_null(g->map);
    check_model(g, b);
    rt_gguf_close(g);
    free(b);
}

static void test_gguf_open_maps_real_model(void **state)
{
    (void)state;
    char path[4096], err[256];
    model_path(path, sizeof path);
    rt_gguf *g = NULL;
    assert_int_equal(rt_gguf_open(&g, path, err, sizeof err), 0);
    assert_non_null(g->map);
    assert_int_equal(g->map_size, MODEL_SIZE);
    check_model(g, g->base);
    assert_memory_equal(g->base, model, MODEL_SIZE);
    rt_gguf_close(g);
    rt_gguf_close(NULL);
}

static void test_gguf_getters_report_missing_and_wrong_type(void **state)
{
    (void)state;
    uint64_t u = 77;
    double f = 77;
    bool b = false;
    rt_gguf_str s = {0};
    assert_int_equal(rt_gguf_get_uint(model_g, "no.such.key", &u), -1);
    assert_int_equal(rt_gguf_get_float(model_g, "no.such.key", &f), -1);
    assert_int_equal(rt_gguf_get_bool(model_g, "no.such.key", &b), -1);
    assert_int_equal(rt_gguf_get_str(model_g, "no.such.key", &s), -1);
    assert_int_equal(rt_gguf_get_uint(model_g, "general.architecture", &u), -2);
    assert_int_equal(rt_gguf_get_uint(model_g, "tokenizer.ggml.tokens", &u), -2);
    assert_int_equal(rt_gguf_get_float(model_g, "llama.block_count", &f), -2);
    assert_int_equal(rt_gguf_get_bool(model_g, "llama.block_count", &b), -2);
    assert_int_equal(rt_gguf_get_str(model_g, "llama.block_count", &s), -2);
    assert_int_equal(rt_gguf_get_uint(model_g, "llama.attention.layer_norm_rms_epsilon", &u), -2);
    assert_int_equal(u, 77); /* untouched on failure */
    assert_null(rt_gguf_find_kv(model_g, "llama"));
    assert_null(rt_gguf_find_kv(model_g, ""));
    assert_null(rt_gguf_find_kv(NULL, "llama.block_count"));
    int64_t i;
    const rt_gguf_kv *arch = rt_gguf_find_kv(model_g, "general.architecture");
    assert_int_equal(rt_gguf_arr_int(arch, 0, &i), -1);
    assert_int_equal(rt_gguf_arr_float(arch, 0, &f), -1);
    assert_int_equal(rt_gguf_arr_int(NULL, 0, &i), -1);
    const rt_gguf_kv *tokens = rt_gguf_find_kv(model_g, "tokenizer.ggml.tokens");
    assert_int_equal(rt_gguf_arr_int(tokens, 0, &i), -1);
    assert_int_equal(rt_gguf_arr_float(tokens, 0, &f), -1);
    const rt_gguf_kv *scores = rt_gguf_find_kv(model_g, "tokenizer.ggml.scores");
    assert_int_equal(rt_gguf_arr_int(scores, 0, &i), -1); /* floats are not integers */
}

/* ---- header corruptions ---- */

static void test_gguf_rejects_bad_magic(void **state)
{
    (void)state;
    expect_patch_error(0, 'X', 1, "bad magic 58 47 55 46");
}

static void test_gguf_rejects_version_1(void **state)
{
    (void)state;
    expect_patch_error(4, 1, 4, "unsupported GGUF version 1;");
}

static void test_gguf_rejects_version_4(void **state)
{
    (void)state;
    expect_patch_error(4, 4, 4, "unsupported GGUF version 4;");
}

static void test_gguf_rejects_big_endian_file(void **state)
{
    (void)state;
    expect_patch_error(4, 0x03000000, 4, "big-endian version 3");
}

static void test_gguf_rejects_truncated_header(void **state)
{
    (void)state;
    uint8_t *b = model_copy(10);
    expect_parse_error(b, 10, "file truncated at offset 8 reading tensor_count");
    free(b);
    b = model_copy(3);
    expect_parse_error(b, 3, "file is too small to be GGUF (3 bytes)");
    free(b);
    expect_parse_error(NULL, 0, "file is too small to be GGUF (0 bytes)");
}

static void test_gguf_rejects_absurd_kv_count(void **state)
{
    (void)state;
    expect_patch_error(16, (uint64_t)1 << 40, 8,
                       "kv_count 1099511627776 is larger than the file can hold");
    expect_patch_error(16, UINT64_MAX, 8, "kv_count 18446744073709551615 is larger than");
}

static void test_gguf_rejects_absurd_tensor_count(void **state)
{
    (void)state;
    expect_patch_error(8, (uint64_t)1 << 40, 8,
                       "tensor_count 1099511627776 is larger than the file can hold");
}

/* ---- metadata corruptions ---- */

static void test_gguf_rejects_truncated_kv_section(void **state)
{
    (void)state;
    /* 5000 is inside the 512 token strings (bytes 24..6470). */
    uint8_t *b = model_copy(5000);
    expect_parse_error(b, 5000, "key 'tokenizer.ggml.tokens': ");
    free(b);
    /* Cut inside the value of llama.block_count: a 4-byte read with fewer left. */
    size_t cut = kv_type_off("llama.block_count") + 4 + 2;
    b = model_copy(cut);
    expect_parse_error(b, cut, "key 'llama.block_count': file truncated");
    free(b);
}

static void test_gguf_rejects_absurd_key_length(void **state)
{
    (void)state;
    expect_patch_error(24, (uint64_t)1 << 62, 8,
                       "kv pair 0: key length 4611686018427387904 at offset 24 exceeds the "
                       "limit of 1024 bytes");
}

static void test_gguf_rejects_empty_key(void **state)
{
    (void)state;
    expect_patch_error(kv_key_off("llama.block_count"), 0, 8, "empty key at offset");
}

static void test_gguf_rejects_key_with_nul(void **state)
{
    (void)state;
    expect_patch_error(kv_key_off("llama.block_count") + 8 + 3, 0, 1, "contains a NUL byte");
}

static void test_gguf_rejects_string_value_past_end(void **state)
{
    (void)state;
    size_t off = kv_type_off("general.architecture") + 4;
    expect_patch_error(off, (uint64_t)1 << 40, 8,
                       "key 'general.architecture': string value at offset");
    expect_patch_error(off, (uint64_t)1 << 40, 8, "extends past the end of the file");
}

static void test_gguf_rejects_unknown_value_type(void **state)
{
    (void)state;
    expect_patch_error(kv_type_off("llama.block_count"), 13, 4,
                       "key 'llama.block_count': unknown value type 13");
}

static void test_gguf_rejects_absurd_array_count(void **state)
{
    (void)state;
    /* Strings and fixed-size elements are bounded separately. */
    expect_patch_error(kv_type_off("tokenizer.ggml.tokens") + 8, (uint64_t)1 << 50, 8,
                       "key 'tokenizer.ggml.tokens': array count 1125899906842624");
    expect_patch_error(kv_type_off("tokenizer.ggml.scores") + 8, 1000000, 8,
                       "key 'tokenizer.ggml.scores': array count 1000000");
    expect_patch_error(kv_type_off("tokenizer.ggml.scores") + 8, UINT64_MAX, 8,
                       "is larger than the file can hold");
}

static void test_gguf_rejects_nested_array(void **state)
{
    (void)state;
    expect_patch_error(kv_type_off("tokenizer.ggml.tokens") + 4, RT_GGUF_ARRAY, 4,
                       "key 'tokenizer.ggml.tokens': nested arrays");
}

static void test_gguf_rejects_unknown_array_element_type(void **state)
{
    (void)state;
    expect_patch_error(kv_type_off("tokenizer.ggml.scores") + 4, 200, 4,
                       "unknown array element type 200");
}

static void test_gguf_rejects_duplicate_key(void **state)
{
    (void)state;
    /* tokenizer.ggml.bos_token_id -> tokenizer.ggml.eos_token_id */
    expect_patch_error(kv_key_off("tokenizer.ggml.bos_token_id") + 8 + 15, 'e', 1,
                       "key 'tokenizer.ggml.eos_token_id': duplicate key");
}

static void test_gguf_rejects_bad_alignment(void **state)
{
    (void)state;
    /* "llama.block_count" and "general.alignment" are both 17 bytes; the value is 5. */
    size_t key = kv_key_off("llama.block_count") + 8;
    uint8_t *b = model_copy(model_size);
    memcpy(b + key, "general.alignment", 17);
    expect_parse_error(b, model_size, "alignment 5 is not a non-zero power of two");
    put_le(b + key + 17 + 4, 0, 4);
    expect_parse_error(b, model_size, "alignment 0 is not a non-zero power of two");
    /* A valid but larger alignment moves the data section from 14176 to 14336, which
     * pushes the last tensor 160 bytes past the end. */
    put_le(b + key + 17 + 4, 256, 4);
    expect_parse_error(b, model_size, "'blk.4.ffn_norm.weight': data [offset 1185280, 256 bytes]");
    free(b);
}

/* ---- tensor info corruptions ---- */

static void test_gguf_rejects_truncated_tensor_infos(void **state)
{
    (void)state;
    /* Far enough in that the tensor_count still fits the bytes left. */
    size_t cut = tensor_ndims_off("blk.4.attn_q.weight") + 6;
    uint8_t *b = model_copy(cut);
    expect_parse_error(b, cut, "tensor 'blk.4.attn_q.weight': file truncated at offset");
    free(b);
    /* Cut before the infos: the count no longer fits what is left. */
    cut = tensor_name_off("token_embd.weight") + 100;
    b = model_copy(cut);
    expect_parse_error(b, cut, "tensor_count 48 is larger than the file can hold");
    free(b);
}

static void test_gguf_rejects_bad_n_dims(void **state)
{
    (void)state;
    expect_patch_error(tensor_ndims_off("output_norm.weight"), 0, 4,
                       "tensor 'output_norm.weight': n_dims 0 at offset");
    expect_patch_error(tensor_ndims_off("output_norm.weight"), 5, 4, "n_dims 5 at offset");
}

static void test_gguf_rejects_zero_dimension(void **state)
{
    (void)state;
    expect_patch_error(tensor_ne_off("token_embd.weight", 1), 0, 8,
                       "tensor 'token_embd.weight': ne[1] = 0");
}

static void test_gguf_rejects_element_count_overflow(void **state)
{
    (void)state;
    expect_patch_error(tensor_ne_off("token_embd.weight", 1), (uint64_t)1 << 60, 8,
                       "tensor 'token_embd.weight': element count overflows");
    expect_patch_error(tensor_ne_off("token_embd.weight", 1), UINT64_MAX, 8,
                       "is not in 1..INT64_MAX");
}

static void test_gguf_rejects_unknown_tensor_type(void **state)
{
    (void)state;
    expect_patch_error(tensor_type_off("blk.0.attn_k.weight"), 4, 4,
                       "tensor 'blk.0.attn_k.weight': unknown tensor type 4");
    expect_patch_error(tensor_type_off("blk.0.attn_k.weight"), 39, 4, "unknown tensor type 39");
    expect_patch_error(tensor_type_off("blk.0.attn_k.weight"), 0xffffffffu, 4,
                       "unknown tensor type 4294967295");
}

static void test_gguf_rejects_partial_block(void **state)
{
    (void)state;
    /* 64 elements cannot be Q4_K, whose blocks hold 256. */
    expect_patch_error(tensor_type_off("output_norm.weight"), RT_GGML_Q4_K, 4,
                       "ne[0] = 64 is not a multiple of the Q4_K block size 256");
}

static void test_gguf_rejects_unaligned_tensor_offset(void **state)
{
    (void)state;
    expect_patch_error(tensor_offset_off("output_norm.weight"), 131072 + 4, 8,
                       "tensor 'output_norm.weight': data offset 131076");
    expect_patch_error(tensor_offset_off("output_norm.weight"), 131072 + 4, 8,
                       "is not a multiple of the alignment 32");
}

static void test_gguf_rejects_tensor_offset_out_of_range(void **state)
{
    (void)state;
    uint64_t room = MODEL_SIZE - MODEL_DATA_OFFSET;
    expect_patch_error(tensor_offset_off("output_norm.weight"), room, 8,
                       "tensor 'output_norm.weight': data [offset 1185376, 256 bytes] "
                       "extends past the end of the file (1185376 bytes)");
    expect_patch_error(tensor_offset_off("output_norm.weight"), room + ((uint64_t)1 << 40), 8,
                       "extends past the end of the file");
    /* data_offset + offset would wrap around. */
    expect_patch_error(tensor_offset_off("output_norm.weight"), UINT64_MAX - 31, 8,
                       "data [data section + 18446744073709551584, 256 bytes] extends past");
}

static void test_gguf_rejects_truncated_tensor_data(void **state)
{
    (void)state;
    uint8_t *b = model_copy(model_size - 100);
    expect_parse_error(b, model_size - 100,
                       "gguf: tensor 'blk.4.ffn_norm.weight': data [offset 1185120, 256 bytes] "
                       "extends past the end of the file (1185276 bytes)");
    free(b);
}

static void test_gguf_rejects_duplicate_tensor_name(void **state)
{
    (void)state;
    /* blk.2.attn_k.weight -> blk.2.attn_q.weight */
    expect_patch_error(tensor_name_off("blk.2.attn_k.weight") + 8 + 11, 'q', 1,
                       "tensor 'blk.2.attn_q.weight': duplicate tensor name");
}

static void test_gguf_rejects_long_tensor_name(void **state)
{
    (void)state;
    expect_patch_error(tensor_name_off("output.weight"), 2000, 8,
                       "tensor info 2: tensor name length 2000");
    expect_patch_error(tensor_name_off("output.weight"), 2000, 8, "exceeds the limit of 1024");
    expect_patch_error(tensor_name_off("output.weight"), 0, 8, "empty tensor name");
}

/* ---- synthetic files ---- */

/* A v2 file with one key of every type, an array of every element type and four
 * tensors (F16, BF16, Q4_0, a 3-d F32), aligned to 64. */
static void write_every_type(wbuf *w)
{
    put_header(w, 2, 4, 29);
    put_key(w, "u8", RT_GGUF_UINT8);
    put_u8(w, 200);
    put_key(w, "i8", RT_GGUF_INT8);
    put_u8(w, (uint8_t)-100);
    put_key(w, "u16", RT_GGUF_UINT16);
    put_u16(w, 60000);
    put_key(w, "i16", RT_GGUF_INT16);
    put_u16(w, (uint16_t)-30000);
    put_key(w, "u32", RT_GGUF_UINT32);
    put_u32(w, 4000000000u);
    put_key(w, "i32", RT_GGUF_INT32);
    put_u32(w, (uint32_t)-2000000000);
    put_key(w, "i32.pos", RT_GGUF_INT32);
    put_u32(w, 123);
    put_key(w, "f32", RT_GGUF_FLOAT32);
    put_f32(w, 1.5f);
    put_key(w, "bool", RT_GGUF_BOOL);
    put_u8(w, 1);
    put_key(w, "bool.false", RT_GGUF_BOOL);
    put_u8(w, 0);
    put_key(w, "str", RT_GGUF_STRING);
    put_str(w, "hello, world");
    put_key(w, "str.empty", RT_GGUF_STRING);
    put_str(w, "");
    put_key(w, "u64", RT_GGUF_UINT64);
    put_u64(w, UINT64_MAX);
    put_key(w, "i64", RT_GGUF_INT64);
    put_u64(w, (uint64_t)INT64_MIN);
    put_key(w, "f64", RT_GGUF_FLOAT64);
    put_f64(w, -0.1);

    put_arr_head(w, "arr.u8", RT_GGUF_UINT8, 3);
    put_u8(w, 1);
    put_u8(w, 2);
    put_u8(w, 255);
    put_arr_head(w, "arr.i8", RT_GGUF_INT8, 2);
    put_u8(w, (uint8_t)-128);
    put_u8(w, 127);
    put_arr_head(w, "arr.u16", RT_GGUF_UINT16, 2);
    put_u16(w, 65535);
    put_u16(w, 7);
    put_arr_head(w, "arr.i16", RT_GGUF_INT16, 2);
    put_u16(w, (uint16_t)-32768);
    put_u16(w, 300);
    put_arr_head(w, "arr.u32", RT_GGUF_UINT32, 1);
    put_u32(w, UINT32_MAX);
    put_arr_head(w, "arr.i32", RT_GGUF_INT32, 3);
    put_u32(w, (uint32_t)INT32_MIN);
    put_u32(w, 0);
    put_u32(w, (uint32_t)-5);
    put_arr_head(w, "arr.f32", RT_GGUF_FLOAT32, 2);
    put_f32(w, 0.5f);
    put_f32(w, -1.25f);
    put_arr_head(w, "arr.bool", RT_GGUF_BOOL, 3);
    put_u8(w, 1);
    put_u8(w, 0);
    put_u8(w, 1);
    put_arr_head(w, "arr.str", RT_GGUF_STRING, 3);
    put_str(w, "a");
    put_str(w, "");
    put_str(w, "xyz");
    put_arr_head(w, "arr.u64", RT_GGUF_UINT64, 2);
    put_u64(w, UINT64_MAX);
    put_u64(w, 42);
    put_arr_head(w, "arr.i64", RT_GGUF_INT64, 2);
    put_u64(w, (uint64_t)INT64_MIN);
    put_u64(w, (uint64_t)-3);
    put_arr_head(w, "arr.f64", RT_GGUF_FLOAT64, 1);
    put_f64(w, 1e300);
    put_arr_head(w, "arr.empty", RT_GGUF_INT32, 0);
    put_key(w, "general.alignment", RT_GGUF_UINT32);
    put_u32(w, 64);

    put_tensor_info(w, "half", 2, (const uint64_t[]){4, 2}, RT_GGML_F16, 0);
    put_tensor_info(w, "brain", 1, (const uint64_t[]){8}, RT_GGML_BF16, 64);
    put_tensor_info(w, "quant", 1, (const uint64_t[]){32}, RT_GGML_Q4_0, 128);
    put_tensor_info(w, "cube", 3, (const uint64_t[]){2, 3, 4}, RT_GGML_F32, 192);
    put_pad(w, 64);
    static const uint16_t halves[8] = {0x3c00, 0x4000, 0x4200, 0x4400, /* F16 1.0 .. 8.0 */
                                       0x4500, 0x4600, 0x4700, 0x4800};
    for (int i = 0; i < 8; i++)
        put_u16(w, halves[i]);
    put_pad(w, 64);
    for (int i = 0; i < 8; i++) /* BF16: high halves of F32 */
        put_u16(w, (uint16_t)(0x3f80 + i));
    put_pad(w, 64);
    for (int i = 0; i < 18; i++)
        put_u8(w, (uint8_t)i);
    put_pad(w, 64);
    for (int i = 0; i < 24; i++)
        put_f32(w, (float)i);
}

static void test_gguf_parses_synthetic_v2_with_every_type(void **state)
{
    (void)state;
    wbuf w = {0};
    write_every_type(&w);
    size_t size;
    uint8_t *b = wbuf_take(&w, &size);
    rt_gguf *g = NULL;
    char err[512] = "";
    if (rt_gguf_parse(&g, b, size, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(g->version, 2);
    assert_int_equal(g->n_kv, 29);
    assert_int_equal(g->alignment, 64);
    assert_int_equal(g->data_offset % 64, 0);

    uint64_t u;
    double f;
    bool bo;
    rt_gguf_str s;
    static const struct {
        const char *key;
        uint64_t want;
    } uints[] = {
        {"u8", 200},      {"u16", 60000}, {"u32", 4000000000u}, {"u64", UINT64_MAX},
        {"i32.pos", 123}, {"bool", 1},    {"bool.false", 0},
    };
    for (size_t k = 0; k < sizeof uints / sizeof uints[0]; k++) {
        assert_int_equal(rt_gguf_get_uint(g, uints[k].key, &u), 0);
        assert_true(u == uints[k].want);
    }
    /* Negative integers do not convert; non-integers are the wrong type. */
    static const char *const not_uint[] = {"i8",  "i16", "i32", "i64",
                                           "f32", "f64", "str", "arr.u8"};
    for (size_t k = 0; k < sizeof not_uint / sizeof not_uint[0]; k++)
        assert_int_equal(rt_gguf_get_uint(g, not_uint[k], &u), -2);
    assert_int_equal(rt_gguf_find_kv(g, "i8")->v.i, -100);
    assert_int_equal(rt_gguf_find_kv(g, "i16")->v.i, -30000);
    assert_int_equal(rt_gguf_find_kv(g, "i32")->v.i, -2000000000);
    assert_true(rt_gguf_find_kv(g, "i64")->v.i == INT64_MIN);
    assert_int_equal(rt_gguf_find_kv(g, "u16")->type, RT_GGUF_UINT16);

    assert_int_equal(rt_gguf_get_float(g, "f32", &f), 0);
    assert_true(f == 1.5);
    assert_int_equal(rt_gguf_get_float(g, "f64", &f), 0);
    assert_true(f == -0.1);
    assert_int_equal(rt_gguf_get_float(g, "u8", &f), -2);
    assert_int_equal(rt_gguf_get_float(g, "missing", &f), -1);

    assert_int_equal(rt_gguf_get_bool(g, "bool", &bo), 0);
    assert_true(bo);
    assert_int_equal(rt_gguf_get_bool(g, "bool.false", &bo), 0);
    assert_false(bo);
    assert_int_equal(rt_gguf_get_bool(g, "u8", &bo), -2);
    assert_int_equal(rt_gguf_get_bool(g, "missing", &bo), -1);

    assert_int_equal(rt_gguf_get_str(g, "str", &s), 0);
    assert_true(rt_gguf_str_eq(s, "hello, world"));
    assert_int_equal(rt_gguf_get_str(g, "str.empty", &s), 0);
    assert_int_equal(s.len, 0);
    assert_true(rt_gguf_str_eq(s, ""));
    assert_int_equal(rt_gguf_get_str(g, "arr.str", &s), -2);
    assert_int_equal(rt_gguf_get_str(g, "missing", &s), -1);

    /* Integer arrays through arr_int, every element type. */
    static const struct {
        const char *key;
        uint64_t i;
        int64_t want;
    } ints[] = {
        {"arr.u8", 0, 1},    {"arr.u8", 2, 255},         {"arr.i8", 0, -128},
        {"arr.i8", 1, 127},  {"arr.u16", 0, 65535},      {"arr.i16", 0, -32768},
        {"arr.i16", 1, 300}, {"arr.u32", 0, UINT32_MAX}, {"arr.i32", 0, INT32_MIN},
        {"arr.i32", 2, -5},  {"arr.bool", 0, 1},         {"arr.bool", 1, 0},
        {"arr.u64", 1, 42},  {"arr.i64", 0, INT64_MIN},  {"arr.i64", 1, -3},
    };
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
        int64_t v = 0;
        const rt_gguf_kv *kv = rt_gguf_find_kv(g, ints[k].key);
        assert_non_null(kv);
        assert_int_equal(rt_gguf_arr_int(kv, ints[k].i, &v), 0);
        if (v != ints[k].want)
            fail_msg("%s[%" PRIu64 "] = %" PRId64, ints[k].key, ints[k].i, v);
    }
    int64_t iv;
    assert_int_equal(rt_gguf_arr_int(rt_gguf_find_kv(g, "arr.u64"), 0, &iv), -1); /* > INT64 */
    assert_int_equal(rt_gguf_arr_int(rt_gguf_find_kv(g, "arr.f32"), 0, &iv), -1);
    assert_int_equal(rt_gguf_arr_int(rt_gguf_find_kv(g, "arr.i32"), 3, &iv), -1);
    assert_int_equal(rt_gguf_arr_int(rt_gguf_find_kv(g, "arr.empty"), 0, &iv), -1);
    assert_int_equal(rt_gguf_find_kv(g, "arr.empty")->v.arr.n, 0);

    static const struct {
        const char *key;
        uint64_t i;
        double want;
    } floats[] = {
        {"arr.f32", 0, 0.5},
        {"arr.f32", 1, -1.25},
        {"arr.f64", 0, 1e300},
        {"arr.i16", 0, -32768.0},
        {"arr.u64", 0, 18446744073709551615.0},
    };
    for (size_t k = 0; k < sizeof floats / sizeof floats[0]; k++) {
        assert_int_equal(rt_gguf_arr_float(rt_gguf_find_kv(g, floats[k].key), floats[k].i, &f), 0);
        assert_true(f == floats[k].want);
    }
    assert_int_equal(rt_gguf_arr_float(rt_gguf_find_kv(g, "arr.f32"), 2, &f), -1);

    const rt_gguf_kv *strs = rt_gguf_find_kv(g, "arr.str");
    assert_int_equal(strs->v.arr.type, RT_GGUF_STRING);
    assert_int_equal(strs->v.arr.n, 3);
    assert_true(rt_gguf_str_eq(strs->v.arr.strs[0], "a"));
    assert_true(rt_gguf_str_eq(strs->v.arr.strs[1], ""));
    assert_true(rt_gguf_str_eq(strs->v.arr.strs[2], "xyz"));

    static const struct {
        const char *name;
        rt_ggml_type type;
        uint32_t n_dims;
        uint64_t ne[4], offset, nbytes;
    } tensors[] = {
        {"half", RT_GGML_F16, 2, {4, 2, 1, 1}, 0, 16},
        {"brain", RT_GGML_BF16, 1, {8, 1, 1, 1}, 64, 16},
        {"quant", RT_GGML_Q4_0, 1, {32, 1, 1, 1}, 128, 18},
        {"cube", RT_GGML_F32, 3, {2, 3, 4, 1}, 192, 96},
    };
    for (size_t k = 0; k < 4; k++) {
        const rt_gguf_tensor *t = rt_gguf_find_tensor(g, tensors[k].name);
        assert_non_null(t);
        assert_int_equal(t->type, tensors[k].type);
        assert_int_equal(t->n_dims, tensors[k].n_dims);
        for (int d = 0; d < 4; d++)
            assert_int_equal(t->ne[d], tensors[k].ne[d]);
        assert_int_equal(t->offset, tensors[k].offset);
        assert_int_equal(t->nbytes, tensors[k].nbytes);
        assert_ptr_equal(t->data, b + g->data_offset + tensors[k].offset);
    }
    uint16_t h;
    memcpy(&h, rt_gguf_find_tensor(g, "brain")->data, 2);
    assert_int_equal(h, 0x3f80);
    memcpy(&h, (const uint8_t *)rt_gguf_find_tensor(g, "half")->data + 2, 2);
    assert_int_equal(h, 0x4000);
    float last;
    memcpy(&last, (const uint8_t *)rt_gguf_find_tensor(g, "cube")->data + 92, 4);
    assert_true(last == 23.0f);
    assert_int_equal(g->data_offset + 192 + 96, size);

    rt_gguf_close(g);
    free(b);
}

static void test_gguf_parses_minimal_files(void **state)
{
    (void)state;
    /* Header only: no metadata, no tensors, no padding. */
    wbuf w = {0};
    put_header(&w, 3, 0, 0);
    size_t size;
    uint8_t *b = wbuf_take(&w, &size);
    rt_gguf *g = NULL;
    assert_int_equal(rt_gguf_parse(&g, b, size, NULL, 0), 0);
    assert_int_equal(g->n_kv, 0);
    assert_int_equal(g->n_tensors, 0);
    assert_int_equal(g->data_offset, 24);
    assert_null(rt_gguf_find_kv(g, "x"));
    assert_null(rt_gguf_find_tensor(g, "x"));
    rt_gguf_close(g);
    free(b);

    /* Metadata only, without the final padding. */
    put_header(&w, 3, 0, 1);
    put_key(&w, "general.name", RT_GGUF_STRING);
    put_str(&w, "odd");
    b = wbuf_take(&w, &size);
    assert_int_equal(rt_gguf_parse(&g, b, size, NULL, 0), 0);
    assert_int_equal(g->data_offset, size);
    rt_gguf_close(g);
    free(b);
}

static void test_gguf_rejects_bool_not_0_or_1(void **state)
{
    (void)state;
    wbuf w = {0};
    put_header(&w, 3, 0, 1);
    put_key(&w, "flag", RT_GGUF_BOOL);
    put_u8(&w, 2);
    expect_wbuf_error(&w, "key 'flag': bool value at offset 40 is 2, not 0 or 1");

    put_header(&w, 3, 0, 1);
    put_arr_head(&w, "flags", RT_GGUF_BOOL, 3);
    put_u8(&w, 0);
    put_u8(&w, 1);
    put_u8(&w, 7);
    expect_wbuf_error(&w, "key 'flags': bool array element 2 at offset");
}

static void test_gguf_rejects_alignment_of_wrong_type(void **state)
{
    (void)state;
    wbuf w = {0};
    put_header(&w, 3, 0, 1);
    put_key(&w, "general.alignment", RT_GGUF_UINT64);
    put_u64(&w, 32);
    expect_wbuf_error(&w, "key 'general.alignment': has type UINT64, expected UINT32");
}

static void test_gguf_rejects_data_section_past_end(void **state)
{
    (void)state;
    wbuf w = {0};
    put_header(&w, 3, 1, 1);
    put_key(&w, "general.alignment", RT_GGUF_UINT32);
    put_u32(&w, 0x80000000u);
    put_tensor_info(&w, "t", 1, (const uint64_t[]){1}, RT_GGML_F32, 0);
    put_f32(&w, 1.0f);
    expect_wbuf_error(&w, "data section would start at offset 2147483648, past the end");
}

static void test_gguf_rejects_string_array_past_end(void **state)
{
    (void)state;
    wbuf w = {0};
    put_header(&w, 3, 0, 1);
    put_arr_head(&w, "words", RT_GGUF_STRING, 2);
    put_str(&w, "one");
    put_u64(&w, 5); /* second string claims 5 bytes, 2 follow */
    put(&w, "tw", 2);
    expect_wbuf_error(&w, "key 'words': array string at offset");
}

static void test_gguf_quotes_hostile_names_safely(void **state)
{
    (void)state;
    /* Control bytes in a name must not reach the message; long names are cut. */
    char name[300];
    memset(name, 'n', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    memcpy(name, "\x1b[31m", 5);
    wbuf w = {0};
    put_header(&w, 3, 0, 1);
    put_key(&w, name, 99);
    size_t size;
    uint8_t *b = wbuf_take(&w, &size);
    char err[512];
    rt_gguf *g = NULL;
    assert_int_not_equal(rt_gguf_parse(&g, b, size, err, sizeof err), 0);
    assert_non_null(strstr(err, "key '?[31mnnn"));
    assert_non_null(strstr(err, "...': unknown value type 99"));
    assert_null(strchr(err, '\x1b'));
    assert_true(strlen(err) < 200);
    /* err may be NULL, and a short buffer gets a truncated, terminated message. */
    assert_int_not_equal(rt_gguf_parse(&g, b, size, NULL, 0), 0);
    char small[12];
    assert_int_not_equal(rt_gguf_parse(&g, b, size, small, sizeof small), 0);
    assert_string_equal(small, "gguf: key '");
    free(b);
}

static void test_gguf_type_table_matches_ggml(void **state)
{
    (void)state;
    static const struct {
        uint32_t type;
        const char *name;
        uint64_t block, bytes;
    } want[] = {
        {RT_GGML_F32, "F32", 1, 4},           {RT_GGML_F16, "F16", 1, 2},
        {RT_GGML_BF16, "BF16", 1, 2},         {RT_GGML_Q4_0, "Q4_0", 32, 18},
        {RT_GGML_Q4_1, "Q4_1", 32, 20},       {RT_GGML_Q5_0, "Q5_0", 32, 22},
        {RT_GGML_Q5_1, "Q5_1", 32, 24},       {RT_GGML_Q8_0, "Q8_0", 32, 34},
        {RT_GGML_Q8_1, "Q8_1", 32, 36},       {RT_GGML_Q2_K, "Q2_K", 256, 84},
        {RT_GGML_Q3_K, "Q3_K", 256, 110},     {RT_GGML_Q4_K, "Q4_K", 256, 144},
        {RT_GGML_Q5_K, "Q5_K", 256, 176},     {RT_GGML_Q6_K, "Q6_K", 256, 210},
        {RT_GGML_Q8_K, "Q8_K", 256, 292},     {RT_GGML_IQ2_XXS, "IQ2_XXS", 256, 66},
        {RT_GGML_IQ2_XS, "IQ2_XS", 256, 74},  {RT_GGML_IQ3_XXS, "IQ3_XXS", 256, 98},
        {RT_GGML_IQ1_S, "IQ1_S", 256, 50},    {RT_GGML_IQ4_NL, "IQ4_NL", 32, 18},
        {RT_GGML_IQ3_S, "IQ3_S", 256, 110},   {RT_GGML_IQ2_S, "IQ2_S", 256, 82},
        {RT_GGML_IQ4_XS, "IQ4_XS", 256, 136}, {RT_GGML_I8, "I8", 1, 1},
        {RT_GGML_I16, "I16", 1, 2},           {RT_GGML_I32, "I32", 1, 4},
        {RT_GGML_I64, "I64", 1, 8},           {RT_GGML_F64, "F64", 1, 8},
        {RT_GGML_IQ1_M, "IQ1_M", 256, 56},    {RT_GGML_TQ1_0, "TQ1_0", 256, 54},
        {RT_GGML_TQ2_0, "TQ2_0", 256, 66},
    };
    size_t known = 0;
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        assert_string_equal(rt_ggml_type_name(want[k].type), want[k].name);
        assert_int_equal(rt_ggml_block_size(want[k].type), want[k].block);
        assert_int_equal(rt_ggml_type_block_bytes(want[k].type), want[k].bytes);
    }
    for (uint32_t t = 0; t < 1000; t++)
        known += rt_ggml_block_size(t) != 0;
    assert_int_equal(known, sizeof want / sizeof want[0]);
    assert_string_equal(rt_ggml_type_name(4), "unknown");
    assert_string_equal(rt_ggml_type_name(UINT32_MAX), "unknown");
    assert_int_equal(rt_ggml_type_block_bytes(31), 0);
    assert_string_equal(rt_gguf_type_name(RT_GGUF_FLOAT64), "FLOAT64");
    assert_string_equal(rt_gguf_type_name(RT_GGUF_ARRAY), "ARRAY");
    assert_string_equal(rt_gguf_type_name(13), "unknown");
}

/* ---- opening files ---- */

static void test_gguf_open_reports_missing_file(void **state)
{
    (void)state;
    char err[512];
    rt_gguf *g = (rt_gguf *)(uintptr_t)1;
    assert_int_equal(rt_gguf_open(&g, "/nonexistent/dir/model.gguf", err, sizeof err), -1);
    assert_null(g);
    assert_non_null(strstr(err, "/nonexistent/dir/model.gguf"));
    assert_non_null(strstr(err, strerror(ENOENT)));
}

static void test_gguf_open_rejects_empty_and_special_files(void **state)
{
    (void)state;
    char path[] = "/tmp/test_gguf_XXXXXX", err[512];
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    rt_gguf *g = NULL;
    assert_int_equal(rt_gguf_open(&g, path, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "is empty"));

    /* A file with a parse error: the message names the path and the problem. */
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite("GGUF\x01\0\0\0", 1, 8, f), 8);
    fclose(f);
    assert_int_equal(rt_gguf_open(&g, path, err, sizeof err), -1);
    assert_null(g);
    char want[600];
    snprintf(want, sizeof want, "gguf: %s: unsupported GGUF version 1", path);
    assert_non_null(strstr(err, want));
    unlink(path);

    assert_int_equal(rt_gguf_open(&g, "/dev/null", err, sizeof err), -1);
    assert_non_null(strstr(err, "'/dev/null' is not a regular file"));
    assert_int_equal(rt_gguf_open(&g, "/tmp", NULL, 0), -1);
}

/* ---- brute force ---- */

static void test_gguf_truncations_fail_cleanly(void **state)
{
    (void)state;
    size_t tried = 0;
    for (size_t len = 0; len < model_size; len += len < 200 ? 1 : 997) {
        uint8_t *b = model_copy(len);
        char err[512] = "";
        rt_gguf *g = (rt_gguf *)(uintptr_t)1;
        int rc = rt_gguf_parse(&g, b, len, err, sizeof err);
        if (rc == 0)
            fail_msg("truncation to %zu bytes parsed", len);
        assert_null(g);
        assert_int_equal(strncmp(err, "gguf: ", 6), 0);
        free(b);
        tried++;
    }
    /* The last byte matters too. */
    uint8_t *b = model_copy(model_size - 1);
    expect_parse_error(b, model_size - 1, "extends past the end of the file");
    free(b);
    assert_true(tried > 1300);
}

/* Overwrites each byte of the header, metadata and tensor infos in turn with a few
 * values; every parse must either fail with a message or succeed with all tensor
 * data inside the buffer. */
static void test_gguf_byte_mutations_never_escape_buffer(void **state)
{
    (void)state;
    static const uint8_t values[] = {0x00, 0xff, 0x80};
    uint8_t *b = model_copy(model_size);
    size_t ok = 0, failed = 0;
    for (size_t pos = 0; pos < MODEL_DATA_OFFSET; pos++) {
        /* The token strings are long runs of similar bytes: sample them sparsely. */
        if (pos > 200 && pos < 6400 && pos % 13 != 0)
            continue;
        uint8_t saved = b[pos];
        for (size_t k = 0; k < sizeof values; k++) {
            if (values[k] == saved)
                continue;
            b[pos] = values[k];
            char err[512] = "";
            rt_gguf *g = NULL;
            if (rt_gguf_parse(&g, b, model_size, err, sizeof err) == 0) {
                for (uint64_t i = 0; i < g->n_tensors; i++) {
                    const rt_gguf_tensor *t = &g->tensors[i];
                    uint64_t start = (uint64_t)((const uint8_t *)t->data - b);
                    assert_true(start >= g->data_offset && start <= model_size);
                    assert_true(t->nbytes <= model_size - start);
                }
                rt_gguf_close(g);
                ok++;
            } else {
                assert_null(g);
                assert_int_equal(strncmp(err, "gguf: ", 6), 0);
                failed++;
            }
        }
        b[pos] = saved;
    }
    assert_true(ok > 0 && failed > 0);
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_parses_real_model),
        cmocka_unit_test(test_gguf_open_maps_real_model),
        cmocka_unit_test(test_gguf_getters_report_missing_and_wrong_type),
        cmocka_unit_test(test_gguf_rejects_bad_magic),
        cmocka_unit_test(test_gguf_rejects_version_1),
        cmocka_unit_test(test_gguf_rejects_version_4),
        cmocka_unit_test(test_gguf_rejects_big_endian_file),
        cmocka_unit_test(test_gguf_rejects_truncated_header),
        cmocka_unit_test(test_gguf_rejects_absurd_kv_count),
        cmocka_unit_test(test_gguf_rejects_absurd_tensor_count),
        cmocka_unit_test(test_gguf_rejects_truncated_kv_section),
        cmocka_unit_test(test_gguf_rejects_absurd_key_length),
        cmocka_unit_test(test_gguf_rejects_empty_key),
        cmocka_unit_test(test_gguf_rejects_key_with_nul),
        cmocka_unit_test(test_gguf_rejects_string_value_past_end),
        cmocka_unit_test(test_gguf_rejects_unknown_value_type),
        cmocka_unit_test(test_gguf_rejects_absurd_array_count),
        cmocka_unit_test(test_gguf_rejects_nested_array),
        cmocka_unit_test(test_gguf_rejects_unknown_array_element_type),
        cmocka_unit_test(test_gguf_rejects_duplicate_key),
        cmocka_unit_test(test_gguf_rejects_bad_alignment),
        cmocka_unit_test(test_gguf_rejects_truncated_tensor_infos),
        cmocka_unit_test(test_gguf_rejects_bad_n_dims),
        cmocka_unit_test(test_gguf_rejects_zero_dimension),
        cmocka_unit_test(test_gguf_rejects_element_count_overflow),
        cmocka_unit_test(test_gguf_rejects_unknown_tensor_type),
        cmocka_unit_test(test_gguf_rejects_partial_block),
        cmocka_unit_test(test_gguf_rejects_unaligned_tensor_offset),
        cmocka_unit_test(test_gguf_rejects_tensor_offset_out_of_range),
        cmocka_unit_test(test_gguf_rejects_truncated_tensor_data),
        cmocka_unit_test(test_gguf_rejects_duplicate_tensor_name),
        cmocka_unit_test(test_gguf_rejects_long_tensor_name),
        cmocka_unit_test(test_gguf_parses_synthetic_v2_with_every_type),
        cmocka_unit_test(test_gguf_parses_minimal_files),
        cmocka_unit_test(test_gguf_rejects_bool_not_0_or_1),
        cmocka_unit_test(test_gguf_rejects_alignment_of_wrong_type),
        cmocka_unit_test(test_gguf_rejects_data_section_past_end),
        cmocka_unit_test(test_gguf_rejects_string_array_past_end),
        cmocka_unit_test(test_gguf_quotes_hostile_names_safely),
        cmocka_unit_test(test_gguf_type_table_matches_ggml),
        cmocka_unit_test(test_gguf_open_reports_missing_file),
        cmocka_unit_test(test_gguf_open_rejects_empty_and_special_files),
        cmocka_unit_test(test_gguf_truncations_fail_cleanly),
        cmocka_unit_test(test_gguf_byte_mutations_never_escape_buffer),
    };
    return cmocka_run_group_tests(tests, setup_model, teardown_model);
}
