/*
 * fuzz_gguf.c - libFuzzer target for the GGUF reader (runtime/gguf.c:
 * rt_gguf_parse) and for what is built from its metadata without weights:
 * the tokenizer (rt_tokenizer_from_gguf).
 *
 * Input: the bytes of a GGUF file. Seeds are small synthetic files written by
 * tests/fuzz/make_corpus.py (every value type, arrays, tensors of several
 * types, a tokenizer vocabulary) and truncations of them.
 *
 * Checked on every input: a refusal has a message; an accepted file indexes
 * only bytes inside the buffer (every key, string, array and tensor), tensor
 * sizes agree with their shapes and types, the data section is aligned, each
 * key and tensor is found again by name, the typed getters and array readers
 * agree with the value types and refuse out-of-range indexes. When the
 * metadata describes a tokenizer that is accepted, a fixed text is encoded
 * and decoded with it.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime/gguf.h"
#include "runtime/tokenizer.h"
#include "tests/fuzz/fuzz_common.h"

static const uint8_t *g_lo, *g_hi;

static void check_inside(const void *p, uint64_t len, const char *what)
{
    const uint8_t *b = p;
    FUZZ_CHECK(len == 0 || (b >= g_lo && b <= g_hi && len <= (uint64_t)(g_hi - b)),
               "%s [%p, +%llu) is outside the buffer [%p, %p)", what, p, (unsigned long long)len,
               (const void *)g_lo, (const void *)g_hi);
}

static uint64_t elem_size(rt_gguf_type t)
{
    switch (t) {
    case RT_GGUF_UINT8:
    case RT_GGUF_INT8:
    case RT_GGUF_BOOL:
        return 1;
    case RT_GGUF_UINT16:
    case RT_GGUF_INT16:
        return 2;
    case RT_GGUF_UINT32:
    case RT_GGUF_INT32:
    case RT_GGUF_FLOAT32:
        return 4;
    case RT_GGUF_UINT64:
    case RT_GGUF_INT64:
    case RT_GGUF_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

/* A NUL-terminated copy of a name (names are NUL-free by the reader's rules). */
static char *cstr(rt_gguf_str s)
{
    char *c = malloc((size_t)s.len + 1);
    FUZZ_CHECK(c != NULL, "malloc");
    memcpy(c, s.ptr, (size_t)s.len);
    c[s.len] = 0;
    return c;
}

static void check_kv(const rt_gguf *g, const rt_gguf_kv *kv)
{
    check_inside(kv->key.ptr, kv->key.len, "key");
    FUZZ_CHECK(kv->key.len > 0 && !memchr(kv->key.ptr, 0, (size_t)kv->key.len),
               "empty key or key with NUL");
    FUZZ_CHECK(kv->type < RT_GGUF_TYPE_COUNT, "value type %d", kv->type);
    char *key = cstr(kv->key);
    FUZZ_CHECK(rt_gguf_find_kv(g, key) == kv, "key '%s' is not found again", key);
    uint64_t u;
    double f;
    bool b;
    rt_gguf_str s;
    const int ru = rt_gguf_get_uint(g, key, &u), rf = rt_gguf_get_float(g, key, &f);
    const int rb = rt_gguf_get_bool(g, key, &b), rs = rt_gguf_get_str(g, key, &s);
    FUZZ_CHECK(ru == 0 || ru == -2, "get_uint %d", ru);
    FUZZ_CHECK(rf == 0 || rf == -2, "get_float %d", rf);
    FUZZ_CHECK((rb == 0) == (kv->type == RT_GGUF_BOOL), "get_bool %d on type %d", rb, kv->type);
    FUZZ_CHECK((rs == 0) == (kv->type == RT_GGUF_STRING), "get_str %d on type %d", rs, kv->type);
    if (rs == 0)
        check_inside(s.ptr, s.len, "string value");
    if (kv->type == RT_GGUF_ARRAY) {
        const uint64_t n = kv->v.arr.n;
        FUZZ_CHECK(kv->v.arr.type != RT_GGUF_ARRAY && kv->v.arr.type < RT_GGUF_TYPE_COUNT,
                   "array element type %d", kv->v.arr.type);
        if (kv->v.arr.type == RT_GGUF_STRING) {
            FUZZ_CHECK(n == 0 || kv->v.arr.strs != NULL, "string array without strings");
            for (uint64_t i = 0; i < n; i++)
                check_inside(kv->v.arr.strs[i].ptr, kv->v.arr.strs[i].len, "array string");
        } else {
            const uint64_t es = elem_size(kv->v.arr.type);
            FUZZ_CHECK(es > 0 && n <= (uint64_t)(g_hi - g_lo) / es, "array of %llu x %llu",
                       (unsigned long long)n, (unsigned long long)es);
            check_inside(kv->v.arr.data, n * es, "array data");
        }
        double d;
        int64_t iv;
        const uint64_t probe[] = {0, n / 2, n ? n - 1 : 0};
        for (size_t k = 0; k < 3; k++) {
            if (probe[k] >= n)
                continue;
            rt_gguf_arr_float(kv, probe[k], &d);
            rt_gguf_arr_int(kv, probe[k], &iv);
        }
        FUZZ_CHECK(rt_gguf_arr_float(kv, n, &d) == -1, "arr_float accepts index n");
        FUZZ_CHECK(rt_gguf_arr_int(kv, n, &iv) == -1, "arr_int accepts index n");
        FUZZ_CHECK(rt_gguf_arr_int(kv, UINT64_MAX, &iv) == -1, "arr_int accepts UINT64_MAX");
    }
    free(key);
}

static void check_tensor(const rt_gguf *g, const rt_gguf_tensor *t)
{
    check_inside(t->name.ptr, t->name.len, "tensor name");
    FUZZ_CHECK(t->n_dims >= 1 && t->n_dims <= RT_GGUF_MAX_DIMS, "n_dims %u", t->n_dims);
    const uint64_t block = rt_ggml_block_size(t->type), bpb = rt_ggml_type_block_bytes(t->type);
    FUZZ_CHECK(block > 0 && bpb > 0, "tensor type %d", t->type);
    unsigned __int128 nelem = 1;
    for (int d = 0; d < RT_GGUF_MAX_DIMS; d++) {
        FUZZ_CHECK(t->ne[d] >= 1, "ne[%d] = 0", d);
        FUZZ_CHECK(d < (int)t->n_dims || t->ne[d] == 1, "unused ne[%d] = %llu", d,
                   (unsigned long long)t->ne[d]);
        nelem *= t->ne[d];
        FUZZ_CHECK(nelem <= (unsigned __int128)INT64_MAX, "element count overflows");
    }
    FUZZ_CHECK(t->ne[0] % block == 0, "ne[0] not a multiple of the block");
    FUZZ_CHECK((unsigned __int128)t->nbytes == nelem / block * bpb, "nbytes %llu",
               (unsigned long long)t->nbytes);
    FUZZ_CHECK(t->offset % g->alignment == 0, "offset %llu unaligned",
               (unsigned long long)t->offset);
    check_inside(t->data, t->nbytes, "tensor data");
    FUZZ_CHECK((const uint8_t *)t->data == g_lo + g->data_offset + t->offset,
               "tensor data pointer");
    char *name = cstr(t->name);
    FUZZ_CHECK(rt_gguf_find_tensor(g, name) == t, "tensor '%s' not found again", name);
    free(name);
}

static void try_tokenizer(const rt_gguf *g)
{
    rt_tokenizer *tok = NULL;
    char err[512] = "";
    if (rt_tokenizer_from_gguf(&tok, g, err, sizeof(err)) != 0) {
        FUZZ_CHECK(err[0] != 0, "tokenizer refused without a message");
        return;
    }
    static const char text[] = "Once upon a time, <s> a \xe2\x96\x81 caf\xc3\xa9 \xff\x00!";
    int32_t *ids = NULL;
    size_t n = 0;
    FUZZ_CHECK(rt_tokenize(tok, text, sizeof(text) - 1, true, true, &ids, &n) == 0,
               "rt_tokenize failed");
    const uint32_t nv = rt_tokenizer_n_vocab(tok);
    for (size_t i = 0; i < n; i++) {
        FUZZ_CHECK(ids[i] >= 0 && (uint32_t)ids[i] < nv, "token %d of %u", ids[i], nv);
        char buf[64];
        rt_token_to_bytes(tok, ids[i], buf, sizeof(buf));
    }
    free(ids);
    rt_tokenizer_destroy(tok);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rt_gguf *g = NULL;
    char err[512] = "";
    if (rt_gguf_parse(&g, data, size, err, sizeof(err)) != 0) {
        FUZZ_CHECK(g == NULL, "a refusal left a result");
        FUZZ_CHECK(err[0] != 0, "refused without a message");
        return 0;
    }
    g_lo = data;
    g_hi = data + size;
    FUZZ_CHECK(g->version == 2 || g->version == 3, "version %u", g->version);
    FUZZ_CHECK(g->alignment > 0 && (g->alignment & (g->alignment - 1)) == 0, "alignment %llu",
               (unsigned long long)g->alignment);
    FUZZ_CHECK(g->data_offset <= size, "data_offset %llu past %zu",
               (unsigned long long)g->data_offset, size);
    for (uint64_t i = 0; i < g->n_kv; i++)
        check_kv(g, &g->kv[i]);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        check_tensor(g, &g->tensors[i]);
    FUZZ_CHECK(rt_gguf_find_kv(g, "") == NULL, "the empty key is found");
    try_tokenizer(g);
    rt_gguf_close(g);
    return 0;
}
