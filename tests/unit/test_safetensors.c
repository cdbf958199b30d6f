/*
 * test_safetensors.c - tests for runtime/safetensors.c: a good file written here (F32, F16,
 * BF16 and a U8 buffer), every corruption the parser must refuse with a message naming the
 * tensor and the field, model directories (single file and sharded through
 * model.safetensors.index.json, with hostile weight maps), and the Q/K row permutation
 * checked against the RoPE kernel.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/kernels.h"
#include "runtime/safetensors.h"

/* --- building files ------------------------------------------------------------------------ */

/* An image: 8-byte length, header padded with spaces to a multiple of 8 (as safetensors
 * writes it), data. Caller frees. */
static uint8_t *image(const char *header, const void *data, size_t data_len, size_t *size)
{
    size_t h = strlen(header);
    size_t padded = (h + 7) / 8 * 8;
    *size = 8 + padded + data_len;
    uint8_t *p = malloc(*size ? *size : 1);
    assert_non_null(p);
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    }
    memcpy(p + 8, header, h);
    memset(p + 8 + h, ' ', padded - h);
    if (data_len) {
        memcpy(p + 8 + padded, data, data_len);
    }
    return p;
}

static char tmpdir[256];

static int setup(void **state)
{
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof(tmpdir), "%s/sieve_st_XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static void remove_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
            continue;
        }
        char p[512];
        snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
        if (e->d_type == DT_DIR) {
            remove_tree(p);
        } else {
            unlink(p);
        }
    }
    closedir(d);
    rmdir(dir);
}

static int teardown(void **state)
{
    (void)state;
    remove_tree(tmpdir);
    return 0;
}

static const char *path_in(const char *sub, const char *name)
{
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    if (sub) {
        snprintf(buf[k], sizeof(buf[k]), "%s/%s/%s", tmpdir, sub, name);
    } else {
        snprintf(buf[k], sizeof(buf[k]), "%s/%s", tmpdir, name);
    }
    return buf[k];
}

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Creates an empty folder tmpdir/name and returns its path (a static buffer per name slot). */
static const char *subdir(const char *name)
{
    static char buf[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof(buf[k]), "%s", path_in(NULL, name));
    remove_tree(buf[k]);
    assert_int_equal(mkdir(buf[k], 0700), 0);
    return buf[k];
}

/* The good file: F32 [4, 3] at [0, 48), F16 [3] at [48, 54), BF16 [2, 2] at [54, 62),
 * U8 [2] at [62, 64); listed out of data order on purpose. */
static const char good_header[] =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"model.norm.weight\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[48,54]},"
    "\"model.embed_tokens.weight\":{\"dtype\":\"F32\",\"shape\":[4,3],\"data_offsets\":[0,48]},"
    "\"lm_head.weight\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[54,62]},"
    "\"mask\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[62,64]}}";

static void good_data(uint8_t data[64])
{
    float f[12];
    for (int i = 0; i < 12; i++) {
        f[i] = (float)i * 0.5f - 1.0f;
    }
    memcpy(data, f, 48);
    const uint16_t h[3] = {0x3C00, 0xC000, 0x3555}; /* 1, -2, ~0.333 */
    memcpy(data + 48, h, 6);
    const uint16_t b[4] = {0x3F80, 0x4000, 0xBF80, 0x4040}; /* 1, 2, -1, 3 */
    memcpy(data + 54, b, 8);
    data[62] = 1;
    data[63] = 0;
}

static uint8_t *good_image(size_t *size)
{
    uint8_t data[64];
    good_data(data);
    return image(good_header, data, sizeof(data), size);
}

/* --- one file ------------------------------------------------------------------------------ */

static void check_good(const rt_st_file *f)
{
    assert_int_equal(rt_st_count(f), 4);
    const char *order[] = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                           "mask"};
    for (size_t i = 0; i < 4; i++) {
        assert_string_equal(rt_st_tensor_at(f, i)->name, order[i]);
    }
    assert_null(rt_st_tensor_at(f, 4));

    const rt_st_tensor *e = rt_st_find(f, "model.embed_tokens.weight");
    assert_non_null(e);
    assert_int_equal(e->dtype, RT_ST_F32);
    assert_int_equal(e->n_dims, 2);
    assert_int_equal(e->shape[0], 4); /* outermost first, as Hugging Face stores it */
    assert_int_equal(e->shape[1], 3);
    assert_int_equal(e->n_elements, 12);
    assert_int_equal(e->nbytes, 48);
    assert_true(e->aligned);
    const float *fv = e->data;
    for (int i = 0; i < 12; i++) {
        assert_true(fv[i] == (float)i * 0.5f - 1.0f);
    }

    const rt_st_tensor *n = rt_st_find(f, "model.norm.weight");
    assert_int_equal(n->dtype, RT_ST_F16);
    assert_int_equal(n->n_dims, 1);
    assert_int_equal(n->shape[0], 3);
    uint16_t h[3];
    memcpy(h, n->data, 6);
    assert_true(kern_f16_to_f32(h[0]) == 1.0f);
    assert_true(kern_f16_to_f32(h[1]) == -2.0f);
    assert_true(fabsf(kern_f16_to_f32(h[2]) - 1.0f / 3.0f) < 1e-3f);

    const rt_st_tensor *b = rt_st_find(f, "lm_head.weight");
    assert_int_equal(b->dtype, RT_ST_BF16);
    uint16_t bv[4];
    memcpy(bv, b->data, 8);
    assert_true(kern_bf16_to_f32(bv[3]) == 3.0f);
    assert_int_equal(rt_st_find(f, "mask")->dtype, RT_ST_U8);

    assert_null(rt_st_find(f, "missing"));
    assert_null(rt_st_find(f, "__metadata__"));
    assert_string_equal(rt_st_metadata(f, "format"), "pt");
    assert_null(rt_st_metadata(f, "nothing"));
}

static void test_good_file_parses_from_memory_and_from_a_mapped_file(void **state)
{
    (void)state;
    size_t size;
    uint8_t *img = good_image(&size);
    rt_st_file *f;
    char err[256] = "";
    if (rt_st_parse(&f, img, size, "good", err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
    check_good(f);
    rt_st_close(f);

    write_file(path_in(NULL, "good.safetensors"), img, size);
    if (rt_st_open(&f, path_in(NULL, "good.safetensors"), err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
    check_good(f);
    rt_st_close(f);
    free(img);
    rt_st_close(NULL);
}

static void test_dtype_names_and_sizes(void **state)
{
    (void)state;
    assert_string_equal(rt_st_dtype_name(RT_ST_BF16), "BF16");
    assert_int_equal(rt_st_dtype_size(RT_ST_F32), 4);
    assert_int_equal(rt_st_dtype_size(RT_ST_F16), 2);
    assert_int_equal(rt_st_dtype_size(RT_ST_BF16), 2);
    assert_int_equal(rt_st_dtype_size(RT_ST_I64), 8);
    assert_string_equal(rt_st_dtype_name(RT_ST_DTYPE_COUNT), "unknown");
    assert_int_equal(rt_st_dtype_size(RT_ST_DTYPE_COUNT), 0);
}

static void test_empty_and_scalar_tensors(void **state)
{
    (void)state;
    const char *hdr = "{\"empty\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[0,0]},"
                      "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}";
    const float one = 1.0f;
    size_t size;
    uint8_t *img = image(hdr, &one, 4, &size);
    rt_st_file *f;
    char err[256] = "";
    if (rt_st_parse(&f, img, size, NULL, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
    assert_int_equal(rt_st_find(f, "empty")->n_elements, 0);
    assert_int_equal(rt_st_find(f, "scalar")->n_dims, 0);
    assert_int_equal(rt_st_find(f, "scalar")->n_elements, 1);
    assert_true(*(const float *)rt_st_find(f, "scalar")->data == 1.0f);
    rt_st_close(f);
    free(img);
}

static void test_unaligned_data_section_is_flagged_not_refused(void **state)
{
    (void)state;
    /* an old writer's header of 5 bytes past the length: data starts at byte 13 */
    const char hdr[] = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    size_t h = strlen(hdr);
    size_t size = 8 + h + 4;
    uint8_t *p = calloc(1, size);
    assert_non_null(p);
    p[0] = (uint8_t)h;
    memcpy(p + 8, hdr, h);
    float v = 2.5f;
    memcpy(p + 8 + h, &v, 4);
    rt_st_file *f;
    char err[256] = "";
    if (rt_st_parse(&f, p, size, NULL, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
    const rt_st_tensor *t = rt_st_find(f, "x");
    assert_int_equal(t->aligned, ((uintptr_t)t->data % 4) == 0);
    float got;
    memcpy(&got, t->data, 4);
    assert_true(got == 2.5f);
    rt_st_close(f);
    free(p);
}

/* Parses header + data_len zero bytes and expects each needle in the message. */
static void expect_corrupt(const char *header, size_t data_len, ...)
{
    uint8_t *data = calloc(1, data_len + 1);
    assert_non_null(data);
    size_t size;
    uint8_t *img = image(header, data, data_len, &size);
    rt_st_file *f = (rt_st_file *)1;
    char err[512] = "";
    int rc = rt_st_parse(&f, img, size, "bad.safetensors", err, sizeof(err));
    if (rc == 0) {
        rt_st_close(f);
        fail_msg("accepted: %s", header);
    }
    assert_null(f);
    assert_non_null(strstr(err, "bad.safetensors"));
    va_list ap;
    va_start(ap, data_len);
    for (const char *s = va_arg(ap, const char *); s; s = va_arg(ap, const char *)) {
        if (!strstr(err, s)) {
            va_end(ap);
            fail_msg("message \"%s\" lacks \"%s\"", err, s);
        }
    }
    va_end(ap);
    free(img);
    free(data);
}

#define T(name, body) "\"" name "\":{" body "}"

static void test_corrupt_headers_are_refused_naming_the_problem(void **state)
{
    (void)state;
    expect_corrupt("{\"w\":5}", 0, "tensor 'w'", "not an object", NULL);
    expect_corrupt("{" T("w", "\"shape\":[1],\"data_offsets\":[0,4]") "}", 4, "tensor 'w'",
                   "\"dtype\" is missing", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"Q9\",\"shape\":[1],\"data_offsets\":[0,4]") "}", 4,
                   "tensor 'w'", "unknown dtype 'Q9'", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[0,1]") "}", 1,
                   "tensor 'w'", "dtype 'F4' is not supported", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":3,\"data_offsets\":[0,12]") "}", 12,
                   "tensor 'w'", "\"shape\" is missing or not an array", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":[3,-1],\"data_offsets\":[0,12]") "}", 12,
                   "tensor 'w'", "shape[1] is not a non-negative integer", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                              "\"data_offsets\":[0,4]") "}",
                   4, "tensor 'w'", "9 dimensions", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
                              "\"data_offsets\":[0,4]") "}",
                   4, "tensor 'w'", "overflows", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]") "}", 4,
                   "tensor 'w'", "\"data_offsets\"", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]") "}", 8,
                   "tensor 'w'", "ends before it begins", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]") "}", 8,
                   "tensor 'w'", "run past the end of the data (8 bytes)", NULL);
    expect_corrupt("{" T("w", "\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]") "}", 12,
                   "tensor 'w'", "shape [2, 2] of F32 needs 16 bytes", "hold 12", NULL);
    expect_corrupt("{" T("h", "\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,2]") "," T(
                       "w", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[2,6]") "}",
                   6, "tensor 'w'", "data offset 2 is not a multiple of the F32 element size 4",
                   NULL);
    expect_corrupt("{" T("a", "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]") "," T(
                       "b", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]") "}",
                   8, "tensor 'b'", "overlaps tensor 'a', which ends at 8", NULL);
    expect_corrupt("{" T("a", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]") "," T(
                       "b", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]") "}",
                   12, "tensor 'b'", "leaving 4 unused bytes", NULL);
    expect_corrupt("{" T("a", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]") "}", 8,
                   "cover 4 of the 8 data bytes", NULL);
    expect_corrupt("{" T("a", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]") "," T(
                       "a", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]") "}",
                   8, "not valid JSON", "duplicate", NULL);
    expect_corrupt("{" T("", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]") "}", 4,
                   "empty name", NULL);
    expect_corrupt("{\"__metadata__\":{\"k\":1}}", 0, "\"__metadata__\" value 'k'", NULL);
    expect_corrupt("{\"__metadata__\":[]}", 0, "\"__metadata__\" is not an object", NULL);
    expect_corrupt("{\"w\":", 0, "not valid JSON", NULL);
    expect_corrupt("[1,2]", 0, "does not start with a JSON object", NULL);
    expect_corrupt("{\"w\\u0000x\":{}}", 0, "not valid JSON", NULL);
}

static void test_corrupt_lengths_are_refused(void **state)
{
    (void)state;
    rt_st_file *f;
    char err[256];
    uint8_t small[5] = {0};
    assert_int_equal(rt_st_parse(&f, small, sizeof(small), "tiny", err, sizeof(err)), -1);
    assert_null(f);
    assert_non_null(strstr(err, "shorter than the 8-byte header length"));

    uint8_t absurd[16] = {0};
    uint64_t big = 200000000;
    for (int i = 0; i < 8; i++) {
        absurd[i] = (uint8_t)(big >> (8 * i));
    }
    assert_int_equal(rt_st_parse(&f, absurd, sizeof(absurd), "absurd", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "header length 200000000 is absurd"));

    uint8_t past[16] = {100, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    assert_int_equal(rt_st_parse(&f, past, sizeof(past), "past", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "header length 100 runs past the end of the file (16 bytes)"));

    uint8_t all_ones[16];
    memset(all_ones, 0xff, sizeof(all_ones));
    assert_int_equal(rt_st_parse(&f, all_ones, sizeof(all_ones), "ones", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "absurd"));

    /* a file cut short: the header promises data that is not there */
    size_t size;
    uint8_t *img = good_image(&size);
    write_file(path_in(NULL, "cut.safetensors"), img, size - 10);
    assert_int_equal(rt_st_open(&f, path_in(NULL, "cut.safetensors"), err, sizeof(err)), -1);
    assert_null(f);
    assert_non_null(strstr(err, "cut.safetensors"));
    assert_non_null(strstr(err, "run past the end of the data"));
    free(img);

    write_file(path_in(NULL, "short.safetensors"), "abc", 3);
    assert_int_equal(rt_st_open(&f, path_in(NULL, "short.safetensors"), err, sizeof(err)), -1);
    assert_non_null(strstr(err, "shorter than the 8-byte header length"));
    assert_int_equal(rt_st_open(&f, path_in(NULL, "none.safetensors"), err, sizeof(err)), -1);
    assert_non_null(strstr(err, "cannot open"));
    assert_int_equal(rt_st_open(&f, tmpdir, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "not a regular file"));
}

/* --- model directories --------------------------------------------------------------------- */

static void write_config(const char *dir)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/config.json", dir);
    write_file(p, "{}", 2);
}

static void test_directory_with_one_file(void **state)
{
    (void)state;
    const char *dir = subdir("single");
    char err[256] = "";
    rt_st_dir *d;
    assert_int_equal(rt_st_dir_open(&d, dir, err, sizeof(err)), -1);
    assert_null(d);
    assert_non_null(strstr(err, "config.json"));

    write_config(dir);
    assert_int_equal(rt_st_dir_open(&d, dir, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "model.safetensors.index.json"));

    size_t size;
    uint8_t *img = good_image(&size);
    write_file(path_in("single", "model.safetensors"), img, size);
    free(img);
    if (rt_st_dir_open(&d, dir, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
    assert_int_equal(rt_st_dir_count(d), 4);
    assert_int_equal(rt_st_dir_shard_count(d), 1);
    assert_string_equal(rt_st_dir_tensor_at(d, 0)->name, "lm_head.weight"); /* by name */
    const rt_st_tensor *t;
    assert_int_equal(rt_st_dir_get(d, "model.embed_tokens.weight", &t, err, sizeof(err)), 0);
    assert_int_equal(t->shape[0], 4);
    assert_int_equal(rt_st_dir_get(d, "mask", &t, err, sizeof(err)), -1);
    assert_null(t);
    assert_non_null(strstr(err, "tensor 'mask'"));
    assert_non_null(strstr(err, "dtype U8"));
    assert_int_equal(rt_st_dir_get(d, "model.layers.0.mlp.up_proj.weight", &t, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "tensor 'model.layers.0.mlp.up_proj.weight'"));
    assert_non_null(strstr(err, "missing"));
    rt_st_dir_close(d);
    rt_st_dir_close(NULL);
}

/* Two shards: a holds "x" (F32 [2]) and "y" (BF16 [1]); b holds "z" (F16 [2]). */
static void write_shards(const char *sub)
{
    const float x[2] = {1.5f, -2.0f};
    const uint16_t y[2] = {0x4040, 0}; /* BF16 3, then padding for the F16 file */
    uint8_t da[12];
    memcpy(da, x, 8);
    memcpy(da + 8, y, 2);
    size_t size;
    uint8_t *img = image("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                         "\"y\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[8,10]}}",
                         da, 10, &size);
    write_file(path_in(sub, "model-00001-of-00002.safetensors"), img, size);
    free(img);
    const uint16_t z[2] = {0x3C00, 0x4000};
    img = image("{\"z\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", z, 4, &size);
    write_file(path_in(sub, "model-00002-of-00002.safetensors"), img, size);
    free(img);
}

static void write_index(const char *sub, const char *json)
{
    write_file(path_in(sub, "model.safetensors.index.json"), json, strlen(json));
}

static const char good_index[] =
    "{\"metadata\":{\"total_size\":14},\"weight_map\":{"
    "\"x\":\"model-00001-of-00002.safetensors\",\"z\":\"model-00002-of-00002.safetensors\","
    "\"y\":\"model-00001-of-00002.safetensors\"}}";

static void test_sharded_directory_finds_tensors_across_shards(void **state)
{
    (void)state;
    const char *dir = subdir("sharded");
    write_config(dir);
    write_shards("sharded");
    write_index("sharded", good_index);
    rt_st_dir *d;
    char err[256] = "";
    if (rt_st_dir_open(&d, dir, err, sizeof(err)) != 0) {
        fail_msg("%s", err);
    }
    assert_int_equal(rt_st_dir_count(d), 3);
    assert_int_equal(rt_st_dir_shard_count(d), 2);
    const rt_st_tensor *t;
    assert_int_equal(rt_st_dir_get(d, "x", &t, err, sizeof(err)), 0);
    assert_true(((const float *)t->data)[1] == -2.0f);
    assert_int_equal(rt_st_dir_get(d, "y", &t, err, sizeof(err)), 0);
    assert_int_equal(t->dtype, RT_ST_BF16);
    assert_int_equal(rt_st_dir_get(d, "z", &t, err, sizeof(err)), 0);
    uint16_t z1;
    memcpy(&z1, (const uint8_t *)t->data + 2, 2);
    assert_true(kern_f16_to_f32(z1) == 2.0f);
    assert_string_equal(rt_st_dir_tensor_at(d, 2)->name, "z");
    assert_null(rt_st_dir_tensor_at(d, 3));
    rt_st_dir_close(d);
}

static void expect_dir_refused(const char *index, const char *needle, const char *needle2)
{
    const char *dir = subdir("badshard");
    write_config(dir);
    write_shards("badshard");
    write_index("badshard", index);
    rt_st_dir *d = (rt_st_dir *)1;
    char err[512] = "";
    if (rt_st_dir_open(&d, dir, err, sizeof(err)) == 0) {
        rt_st_dir_close(d);
        fail_msg("accepted index %s", index);
    }
    assert_null(d);
    if (!strstr(err, needle) || (needle2 && !strstr(err, needle2))) {
        fail_msg("message \"%s\" lacks \"%s\" / \"%s\"", err, needle, needle2 ? needle2 : "");
    }
}

static void test_sharded_directory_refuses_bad_weight_maps(void **state)
{
    (void)state;
    expect_dir_refused("{\"weight_map\":{\"x\":\"../model-00001-of-00002.safetensors\"}}",
                       "weight_map entry for 'x'", "not a file name");
    expect_dir_refused("{\"weight_map\":{\"x\":\"/etc/passwd\"}}", "weight_map entry for 'x'",
                       NULL);
    expect_dir_refused("{\"weight_map\":{\"x\":7}}", "weight_map entry for 'x'", NULL);
    expect_dir_refused("{\"weight_map\":{\"x\":\"model-00002-of-00002.safetensors\"}}",
                       "tensor 'x' is not in model-00002-of-00002.safetensors", NULL);
    expect_dir_refused("{\"weight_map\":{\"x\":\"model-00003-of-00003.safetensors\"}}",
                       "model-00003-of-00003.safetensors", "cannot open");
    expect_dir_refused("{\"weight_map\":{}}", "\"weight_map\" is missing, empty", NULL);
    expect_dir_refused("{\"metadata\":{}}", "\"weight_map\"", NULL);
    expect_dir_refused("{\"weight_map\":", "invalid JSON", NULL);

    /* a corrupt shard is named in the message */
    const char *dir = subdir("corruptshard");
    write_config(dir);
    write_shards("corruptshard");
    write_file(path_in("corruptshard", "model-00002-of-00002.safetensors"), "\x08\0\0\0\0\0\0\0[]",
               10);
    write_index("corruptshard", good_index);
    rt_st_dir *d;
    char err[512] = "";
    assert_int_equal(rt_st_dir_open(&d, dir, err, sizeof(err)), -1);
    if (!strstr(err, "model-00002-of-00002.safetensors")) {
        fail_msg("message \"%s\" does not name the shard", err);
    }
}

/* --- the Q/K row permutation --------------------------------------------------------------- */

static void test_rope_permutation_moves_rows_as_documented(void **state)
{
    (void)state;
    /* 2 heads of 4 rows: HF rows (0 1 | 2 3) pair as (0,2) (1,3) */
    const int32_t src[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    int32_t dst[8];
    assert_int_equal(rt_st_permute_rope_rows(dst, src, 2, 4, sizeof(int32_t)), 0);
    const int32_t want[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    assert_memory_equal(dst, want, sizeof(want));
    assert_int_equal(rt_st_permute_rope_rows(dst, src, 2, 3, sizeof(int32_t)), -1);
    assert_int_equal(rt_st_permute_rope_rows(dst, src, 2, 0, sizeof(int32_t)), -1);
}

/* Hugging Face's rotary embedding: rotate_half pairs (i, i + d/2) with base^(-2i/d). */
static void hf_rope(float *q, int n_heads, int head_dim, int pos, float base)
{
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *x = q + h * head_dim;
        for (int i = 0; i < half; i++) {
            double theta = pos * pow(base, -2.0 * i / head_dim);
            double c = cos(theta), s = sin(theta);
            double a = x[i], b = x[i + half];
            x[i] = (float)(a * c - b * s);
            x[i + half] = (float)(b * c + a * s);
        }
    }
}

static void test_permuted_projection_with_our_rope_equals_hf_rope(void **state)
{
    (void)state;
    enum { HEADS = 3, HD = 8, IN = 5, ROWS = HEADS * HD };
    float w[ROWS * IN], wp[ROWS * IN], x[IN];
    uint32_t seed = 7;
    for (int i = 0; i < ROWS * IN; i++) {
        seed = seed * 1664525u + 1013904223u;
        w[i] = (float)(seed >> 8) / (float)(1 << 24) - 0.5f;
    }
    for (int i = 0; i < IN; i++) {
        x[i] = (float)i * 0.3f - 0.6f;
    }
    assert_int_equal(rt_st_permute_rope_rows(wp, w, HEADS, HD, IN * sizeof(float)), 0);
    float q_hf[ROWS], q_ours[ROWS];
    for (int r = 0; r < ROWS; r++) {
        q_hf[r] = q_ours[r] = 0;
        for (int k = 0; k < IN; k++) {
            q_hf[r] += w[r * IN + k] * x[k];
            q_ours[r] += wp[r * IN + k] * x[k];
        }
    }
    const int32_t pos = 11;
    hf_rope(q_hf, HEADS, HD, pos, 10000.0f);
    kern_rope_f32(q_ours, &pos, 1, HEADS, HD, HD, 10000.0f);
    float q_hf_perm[ROWS];
    assert_int_equal(rt_st_permute_rope_rows(q_hf_perm, q_hf, HEADS, HD, sizeof(float)), 0);
    for (int r = 0; r < ROWS; r++) {
        assert_true(fabsf(q_hf_perm[r] - q_ours[r]) < 1e-4f);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_file_parses_from_memory_and_from_a_mapped_file),
        cmocka_unit_test(test_dtype_names_and_sizes),
        cmocka_unit_test(test_empty_and_scalar_tensors),
        cmocka_unit_test(test_unaligned_data_section_is_flagged_not_refused),
        cmocka_unit_test(test_corrupt_headers_are_refused_naming_the_problem),
        cmocka_unit_test(test_corrupt_lengths_are_refused),
        cmocka_unit_test(test_directory_with_one_file),
        cmocka_unit_test(test_sharded_directory_finds_tensors_across_shards),
        cmocka_unit_test(test_sharded_directory_refuses_bad_weight_maps),
        cmocka_unit_test(test_rope_permutation_moves_rows_as_documented),
        cmocka_unit_test(test_permuted_projection_with_our_rope_equals_hf_rope),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
