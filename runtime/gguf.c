/*
 * gguf.c - reader for GGUF v2/v3 files: header, metadata, tensor infos, data section.
 *
 * Every byte of the input is treated as hostile. Invariants:
 *  - all reads go through the cursor helpers, which check the byte count against
 *    what is left in the buffer before touching memory, so no input can make us
 *    read outside [buf, buf + size);
 *  - every allocation is sized by a count that was first checked against the
 *    bytes left (each element has a known minimum encoded size), so a hostile
 *    count cannot make us allocate more than a small multiple of the file size;
 *  - arithmetic on numbers taken from the file is checked for overflow;
 *  - on success each tensor's [data, data + nbytes) lies inside the buffer and
 *    its offset is a multiple of the alignment; keys and tensor names are unique,
 *    non-empty and contain no NUL byte (they are looked up by C string);
 *  - on failure everything allocated is freed, *out is NULL and err says what
 *    was wrong, where (byte offset) and, when known, in which key or tensor.
 * There is no global state: parsing is re-entrant and a parsed rt_gguf is
 * read-only, so it may be shared between threads.
 */
#include "runtime/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
    HEADER_BYTES = 4 + 4 + 8 + 8,
    /* Smallest possible encodings, used to bound counts by the bytes left:
     * key length + 1-byte key + value type + 1-byte value, and
     * name length + 1-byte name + n_dims + one ne + type + offset. */
    MIN_KV_BYTES = 8 + 1 + 4 + 1,
    MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8,
    MIN_STRING_BYTES = 8,
    /* Keys and tensor names are identifiers; anything longer is garbage. */
    MAX_NAME_BYTES = 1024,
    DEFAULT_ALIGNMENT = 32,
    /* Longest name quoted in an error message. */
    SHOWN_NAME_BYTES = 96,
};

typedef struct {
    const char *name;
    uint16_t block; /* elements per block */
    uint16_t bytes; /* bytes per block */
} ggml_type_info;

/* Holes (ids ggml retired or that we do not know) have block == 0. */
static const ggml_type_info ggml_types[RT_GGML_TYPE_COUNT] = {
    [RT_GGML_F32] = {"F32", 1, 4},
    [RT_GGML_F16] = {"F16", 1, 2},
    [RT_GGML_Q4_0] = {"Q4_0", 32, 18},
    [RT_GGML_Q4_1] = {"Q4_1", 32, 20},
    [RT_GGML_Q5_0] = {"Q5_0", 32, 22},
    [RT_GGML_Q5_1] = {"Q5_1", 32, 24},
    [RT_GGML_Q8_0] = {"Q8_0", 32, 34},
    [RT_GGML_Q8_1] = {"Q8_1", 32, 36},
    [RT_GGML_Q2_K] = {"Q2_K", 256, 84},
    [RT_GGML_Q3_K] = {"Q3_K", 256, 110},
    [RT_GGML_Q4_K] = {"Q4_K", 256, 144},
    [RT_GGML_Q5_K] = {"Q5_K", 256, 176},
    [RT_GGML_Q6_K] = {"Q6_K", 256, 210},
    [RT_GGML_Q8_K] = {"Q8_K", 256, 292},
    [RT_GGML_IQ2_XXS] = {"IQ2_XXS", 256, 66},
    [RT_GGML_IQ2_XS] = {"IQ2_XS", 256, 74},
    [RT_GGML_IQ3_XXS] = {"IQ3_XXS", 256, 98},
    [RT_GGML_IQ1_S] = {"IQ1_S", 256, 50},
    [RT_GGML_IQ4_NL] = {"IQ4_NL", 32, 18},
    [RT_GGML_IQ3_S] = {"IQ3_S", 256, 110},
    [RT_GGML_IQ2_S] = {"IQ2_S", 256, 82},
    [RT_GGML_IQ4_XS] = {"IQ4_XS", 256, 136},
    [RT_GGML_I8] = {"I8", 1, 1},
    [RT_GGML_I16] = {"I16", 1, 2},
    [RT_GGML_I32] = {"I32", 1, 4},
    [RT_GGML_I64] = {"I64", 1, 8},
    [RT_GGML_F64] = {"F64", 1, 8},
    [RT_GGML_IQ1_M] = {"IQ1_M", 256, 56},
    [RT_GGML_BF16] = {"BF16", 1, 2},
    [RT_GGML_TQ1_0] = {"TQ1_0", 256, 54},
    [RT_GGML_TQ2_0] = {"TQ2_0", 256, 66},
};

static const char *const gguf_type_names[RT_GGUF_TYPE_COUNT] = {
    [RT_GGUF_UINT8] = "UINT8",     [RT_GGUF_INT8] = "INT8",     [RT_GGUF_UINT16] = "UINT16",
    [RT_GGUF_INT16] = "INT16",     [RT_GGUF_UINT32] = "UINT32", [RT_GGUF_INT32] = "INT32",
    [RT_GGUF_FLOAT32] = "FLOAT32", [RT_GGUF_BOOL] = "BOOL",     [RT_GGUF_STRING] = "STRING",
    [RT_GGUF_ARRAY] = "ARRAY",     [RT_GGUF_UINT64] = "UINT64", [RT_GGUF_INT64] = "INT64",
    [RT_GGUF_FLOAT64] = "FLOAT64",
};

/* Encoded size of fixed-size value types; 0 for STRING and ARRAY. */
static const uint8_t gguf_type_sizes[RT_GGUF_TYPE_COUNT] = {
    [RT_GGUF_UINT8] = 1,  [RT_GGUF_INT8] = 1,  [RT_GGUF_UINT16] = 2,  [RT_GGUF_INT16] = 2,
    [RT_GGUF_UINT32] = 4, [RT_GGUF_INT32] = 4, [RT_GGUF_FLOAT32] = 4, [RT_GGUF_BOOL] = 1,
    [RT_GGUF_UINT64] = 8, [RT_GGUF_INT64] = 8, [RT_GGUF_FLOAT64] = 8,
};

const char *rt_ggml_type_name(uint32_t type)
{
    if (type >= RT_GGML_TYPE_COUNT || ggml_types[type].block == 0)
        return "unknown";
    return ggml_types[type].name;
}

uint64_t rt_ggml_block_size(uint32_t type)
{
    return type < RT_GGML_TYPE_COUNT ? ggml_types[type].block : 0;
}

uint64_t rt_ggml_type_block_bytes(uint32_t type)
{
    return type < RT_GGML_TYPE_COUNT ? ggml_types[type].bytes : 0;
}

const char *rt_gguf_type_name(uint32_t type)
{
    return type < RT_GGUF_TYPE_COUNT ? gguf_type_names[type] : "unknown";
}

bool rt_gguf_str_eq(rt_gguf_str s, const char *c)
{
    if (!c)
        return false;
    size_t n = strlen(c);
    return s.len == n && (n == 0 || memcmp(s.ptr, c, n) == 0);
}

/* ---- little-endian loads: byte by byte so the host's endianness and the
 * (un)alignment of the file bytes do not matter ---- */

static uint16_t ld16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (unsigned)p[1] << 8);
}

static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t ld64(const uint8_t *p)
{
    return (uint64_t)ld32(p) | (uint64_t)ld32(p + 4) << 32;
}

/* Two's-complement reinterpretation without implementation-defined conversions. */
static int64_t sext(uint64_t v, unsigned bits)
{
    if (bits == 64) {
        int64_t i;
        memcpy(&i, &v, sizeof i);
        return i;
    }
    uint64_t sign = (uint64_t)1 << (bits - 1);
    return (int64_t)(v ^ sign) - (int64_t)sign;
}

static bool is_unsigned(rt_gguf_type t)
{
    return t == RT_GGUF_UINT8 || t == RT_GGUF_UINT16 || t == RT_GGUF_UINT32 ||
           t == RT_GGUF_UINT64 || t == RT_GGUF_BOOL;
}

static bool is_signed(rt_gguf_type t)
{
    return t == RT_GGUF_INT8 || t == RT_GGUF_INT16 || t == RT_GGUF_INT32 || t == RT_GGUF_INT64;
}

static bool is_float(rt_gguf_type t)
{
    return t == RT_GGUF_FLOAT32 || t == RT_GGUF_FLOAT64;
}

/* Decodes a fixed-size value of type t (gguf_type_sizes[t] bytes at p) into kv->v. */
static void load_scalar(rt_gguf_type t, const uint8_t *p, rt_gguf_kv *kv)
{
    switch (t) {
    case RT_GGUF_UINT8:
    case RT_GGUF_BOOL:
        kv->v.u = p[0];
        break;
    case RT_GGUF_INT8:
        kv->v.i = sext(p[0], 8);
        break;
    case RT_GGUF_UINT16:
        kv->v.u = ld16(p);
        break;
    case RT_GGUF_INT16:
        kv->v.i = sext(ld16(p), 16);
        break;
    case RT_GGUF_UINT32:
        kv->v.u = ld32(p);
        break;
    case RT_GGUF_INT32:
        kv->v.i = sext(ld32(p), 32);
        break;
    case RT_GGUF_UINT64:
        kv->v.u = ld64(p);
        break;
    case RT_GGUF_INT64:
        kv->v.i = sext(ld64(p), 64);
        break;
    case RT_GGUF_FLOAT32: {
        uint32_t bits = ld32(p);
        float f;
        memcpy(&f, &bits, sizeof f);
        kv->v.f = f;
        break;
    }
    case RT_GGUF_FLOAT64: {
        uint64_t bits = ld64(p);
        memcpy(&kv->v.f, &bits, sizeof kv->v.f);
        break;
    }
    default:
        break; /* callers only pass fixed-size types */
    }
}

/* ---- name index: keys and tensor names sorted by bytes, for duplicate detection and
 * binary-search lookups. Sorting rather than hashing keeps the worst case at
 * O(n log n) even for names crafted to collide. ---- */

typedef struct {
    const char *ptr;
    uint64_t len;
    size_t idx; /* position in the kv / tensor array */
} name_entry;

typedef struct {
    name_entry *sorted; /* by bytes, then length, then idx (file order) */
    size_t n;
} name_index;

static int cmp_bytes(const char *a, uint64_t alen, const char *b, uint64_t blen)
{
    uint64_t n = alen < blen ? alen : blen;
    int r = n ? memcmp(a, b, (size_t)n) : 0;
    if (r)
        return r;
    return (alen > blen) - (alen < blen);
}

static int cmp_entries(const void *x, const void *y)
{
    const name_entry *a = x, *b = y;
    int r = cmp_bytes(a->ptr, a->len, b->ptr, b->len);
    return r ? r : (a->idx > b->idx) - (a->idx < b->idx);
}

/* Indexes the n names found at items + i * stride + name_off. Returns -1 when out of
 * memory; otherwise 0, with *dup set to the file-order-first item whose name an
 * earlier item already has (and *first to that earlier item), or SIZE_MAX. */
static int index_build(name_index *ix, const void *items, size_t n, size_t stride, size_t name_off,
                       size_t *dup, size_t *first)
{
    *dup = *first = SIZE_MAX;
    ix->n = n;
    ix->sorted = malloc((n ? n : 1) * sizeof *ix->sorted);
    if (!ix->sorted)
        return -1;
    for (size_t i = 0; i < n; i++) {
        const rt_gguf_str *name =
            (const rt_gguf_str *)(const void *)((const char *)items + i * stride + name_off);
        ix->sorted[i] = (name_entry){name->ptr, name->len, i};
    }
    qsort(ix->sorted, n, sizeof *ix->sorted, cmp_entries);
    /* Equal names are adjacent and in file order, so the earlier one is the first. */
    for (size_t i = 1; i < n; i++) {
        const name_entry *a = &ix->sorted[i - 1], *b = &ix->sorted[i];
        if (b->idx < *dup && cmp_bytes(a->ptr, a->len, b->ptr, b->len) == 0) {
            *dup = b->idx;
            *first = a->idx;
        }
    }
    return 0;
}

/* Returns the index of the item named (p, n), or SIZE_MAX. */
static size_t index_find(const name_index *ix, const char *p, size_t n)
{
    size_t lo = 0, hi = ix->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int r = cmp_bytes(ix->sorted[mid].ptr, ix->sorted[mid].len, p, n);
        if (r == 0)
            return ix->sorted[mid].idx;
        if (r < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return SIZE_MAX;
}

/* The public struct plus what only this file needs; rt_gguf is the first member so
 * the handle we return converts back. */
typedef struct {
    rt_gguf pub;
    name_index kv_index;
    name_index tensor_index;
} gguf_impl;

/* ---- cursor and error reporting ---- */

typedef struct {
    const uint8_t *buf;
    uint64_t size;
    uint64_t pos;
    char *err;
    size_t errlen;
    /* What is being read, for messages: "kv pair" / "tensor info" with ctx_index
     * while the name is unknown, then "key" / "tensor" with ctx_name. */
    const char *ctx_kind;
    uint64_t ctx_index;
    rt_gguf_str ctx_name;
    bool ctx_named;
} cursor;

/* Copies a file-supplied name for quoting: non-printable bytes become '?' so a
 * hostile name cannot put control sequences into logs; long names are cut. */
static const char *show(char *out, size_t outlen, rt_gguf_str s)
{
    size_t n = 0;
    uint64_t i = 0;
    for (; i < s.len && n + 4 < outlen; i++) {
        unsigned char ch = (unsigned char)s.ptr[i];
        out[n++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    if (i < s.len)
        for (int k = 0; k < 3 && n + 1 < outlen; k++)
            out[n++] = '.';
    out[n] = '\0';
    return out;
}

__attribute__((format(printf, 2, 3))) static int fail(cursor *c, const char *fmt, ...)
{
    if (!c->err || c->errlen == 0)
        return -1;
    char name[SHOWN_NAME_BYTES];
    int n;
    if (!c->ctx_kind)
        n = snprintf(c->err, c->errlen, "gguf: ");
    else if (c->ctx_named)
        n = snprintf(c->err, c->errlen, "gguf: %s '%s': ", c->ctx_kind,
                     show(name, sizeof name, c->ctx_name));
    else
        n = snprintf(c->err, c->errlen, "gguf: %s %" PRIu64 ": ", c->ctx_kind, c->ctx_index);
    if (n < 0 || (size_t)n >= c->errlen)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

static void set_ctx_index(cursor *c, const char *kind, uint64_t i)
{
    c->ctx_kind = kind;
    c->ctx_index = i;
    c->ctx_named = false;
}

static void set_ctx_name(cursor *c, const char *kind, rt_gguf_str name)
{
    c->ctx_kind = kind;
    c->ctx_name = name;
    c->ctx_named = true;
}

static uint64_t left(const cursor *c)
{
    return c->size - c->pos;
}

/* Returns a pointer to the next n bytes and advances, or fails naming `what`. */
static const uint8_t *take(cursor *c, uint64_t n, const char *what)
{
    if (n > left(c)) {
        fail(c,
             "file truncated at offset %" PRIu64 " reading %s (%" PRIu64 " bytes needed, %" PRIu64
             " left)",
             c->pos, what, n, left(c));
        return NULL;
    }
    const uint8_t *p = c->buf + c->pos;
    c->pos += n;
    return p;
}

static int read_u32(cursor *c, uint32_t *v, const char *what)
{
    const uint8_t *p = take(c, 4, what);
    if (!p)
        return -1;
    *v = ld32(p);
    return 0;
}

static int read_u64(cursor *c, uint64_t *v, const char *what)
{
    const uint8_t *p = take(c, 8, what);
    if (!p)
        return -1;
    *v = ld64(p);
    return 0;
}

/* Reads a gguf string (uint64 length + bytes). max_len 0 means no limit other
 * than the bytes left. */
static int read_str(cursor *c, rt_gguf_str *s, const char *what, uint64_t max_len)
{
    uint64_t at = c->pos, len;
    if (read_u64(c, &len, what) < 0)
        return -1;
    if (max_len && len > max_len)
        return fail(
            c, "%s length %" PRIu64 " at offset %" PRIu64 " exceeds the limit of %" PRIu64 " bytes",
            what, len, at, max_len);
    if (len > left(c))
        return fail(c,
                    "%s at offset %" PRIu64 " has length %" PRIu64
                    ", which extends past the end of the file (%" PRIu64 " bytes)",
                    what, at, len, c->size);
    s->ptr = (const char *)(c->buf + c->pos);
    s->len = len;
    c->pos += len;
    return 0;
}

/* Keys and tensor names: non-empty and NUL-free, because they are looked up by C
 * string and an embedded NUL would make two different names compare equal there. */
static int read_name(cursor *c, rt_gguf_str *s, const char *what)
{
    uint64_t at = c->pos;
    if (read_str(c, s, what, MAX_NAME_BYTES) < 0)
        return -1;
    if (s->len == 0)
        return fail(c, "empty %s at offset %" PRIu64, what, at);
    if (memchr(s->ptr, '\0', s->len))
        return fail(c, "%s at offset %" PRIu64 " contains a NUL byte", what, at);
    return 0;
}

/* File offset of the length field in front of a name read by read_name. */
static uint64_t name_offset(const cursor *c, rt_gguf_str s)
{
    return (uint64_t)((const uint8_t *)s.ptr - c->buf) - 8;
}

/* ---- metadata ---- */

static int read_array(cursor *c, rt_gguf_kv *kv)
{
    uint64_t at = c->pos;
    uint32_t et;
    uint64_t n;
    if (read_u32(c, &et, "array element type") < 0)
        return -1;
    if (et == RT_GGUF_ARRAY)
        return fail(c, "nested arrays (ARRAY of ARRAY at offset %" PRIu64 ") are not supported",
                    at);
    if (et >= RT_GGUF_TYPE_COUNT)
        return fail(c, "unknown array element type %" PRIu32 " at offset %" PRIu64, et, at);
    if (read_u64(c, &n, "array count") < 0)
        return -1;
    /* Bound the count by the bytes left before multiplying or allocating. */
    uint64_t min_elem = et == RT_GGUF_STRING ? MIN_STRING_BYTES : gguf_type_sizes[et];
    if (n > left(c) / min_elem)
        return fail(c,
                    "array count %" PRIu64 " at offset %" PRIu64
                    " is larger than the file can hold (%" PRIu64 " bytes left)",
                    n, at + 4, left(c));
    const uint8_t *data = c->buf + c->pos;
    rt_gguf_str *strs = NULL;
    if (et == RT_GGUF_STRING) {
        if (n > 0 && !(strs = calloc((size_t)n, sizeof *strs)))
            return fail(c, "out of memory for %" PRIu64 " strings", n);
        for (uint64_t i = 0; i < n; i++) {
            if (read_str(c, &strs[i], "array string", 0) < 0) {
                free(strs);
                return -1;
            }
        }
    } else {
        uint64_t bytes = n * min_elem; /* cannot overflow: n <= left / min_elem */
        if (et == RT_GGUF_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (data[i] > 1)
                    return fail(
                        c, "bool array element %" PRIu64 " at offset %" PRIu64 " is %u, not 0 or 1",
                        i, c->pos + i, data[i]);
        c->pos += bytes;
    }
    kv->v.arr.type = (rt_gguf_type)et;
    kv->v.arr.n = n;
    kv->v.arr.data = data;
    kv->v.arr.strs = strs;
    kv->type = RT_GGUF_ARRAY; /* set last: close() frees strs only of complete arrays */
    return 0;
}

static int read_value(cursor *c, rt_gguf_kv *kv, uint32_t type, uint64_t type_at)
{
    if (type == RT_GGUF_ARRAY)
        return read_array(c, kv);
    if (type == RT_GGUF_STRING) {
        if (read_str(c, &kv->v.str, "string value", 0) < 0)
            return -1;
        kv->type = RT_GGUF_STRING;
        return 0;
    }
    if (type >= RT_GGUF_TYPE_COUNT)
        return fail(c, "unknown value type %" PRIu32 " at offset %" PRIu64, type, type_at);
    const uint8_t *p = take(c, gguf_type_sizes[type], "value");
    if (!p)
        return -1;
    if (type == RT_GGUF_BOOL && p[0] > 1)
        return fail(c, "bool value at offset %" PRIu64 " is %u, not 0 or 1", type_at + 4, p[0]);
    load_scalar((rt_gguf_type)type, p, kv);
    kv->type = (rt_gguf_type)type;
    return 0;
}

static int read_kvs(cursor *c, gguf_impl *g)
{
    rt_gguf *pub = &g->pub;
    /* n_kv was checked against the file size, so this allocation is backed by it. */
    pub->kv = calloc(pub->n_kv ? (size_t)pub->n_kv : 1, sizeof *pub->kv);
    if (!pub->kv)
        return fail(c, "out of memory for %" PRIu64 " metadata entries", pub->n_kv);
    for (uint64_t i = 0; i < pub->n_kv; i++) {
        rt_gguf_kv *kv = &pub->kv[i];
        set_ctx_index(c, "kv pair", i);
        if (read_name(c, &kv->key, "key") < 0)
            return -1;
        set_ctx_name(c, "key", kv->key);
        uint64_t type_at = c->pos;
        uint32_t type;
        if (read_u32(c, &type, "value type") < 0 || read_value(c, kv, type, type_at) < 0)
            return -1;
    }
    c->ctx_kind = NULL;
    size_t dup, first;
    if (index_build(&g->kv_index, pub->kv, (size_t)pub->n_kv, sizeof *pub->kv,
                    offsetof(rt_gguf_kv, key), &dup, &first) < 0)
        return fail(c, "out of memory indexing %" PRIu64 " metadata entries", pub->n_kv);
    if (dup != SIZE_MAX) {
        set_ctx_name(c, "key", pub->kv[dup].key);
        return fail(c,
                    "duplicate key at offset %" PRIu64 " (kv pair %zu; first defined by kv "
                    "pair %zu)",
                    name_offset(c, pub->kv[dup].key), dup, first);
    }
    return 0;
}

/* general.alignment, if present, must be a UINT32 non-zero power of two. */
static int read_alignment(cursor *c, gguf_impl *g)
{
    g->pub.alignment = DEFAULT_ALIGNMENT;
    const rt_gguf_kv *kv = rt_gguf_find_kv(&g->pub, "general.alignment");
    if (!kv)
        return 0;
    set_ctx_name(c, "key", kv->key);
    if (kv->type != RT_GGUF_UINT32)
        return fail(c, "has type %s, expected UINT32", rt_gguf_type_name(kv->type));
    if (kv->v.u == 0 || (kv->v.u & (kv->v.u - 1)) != 0)
        return fail(c, "alignment %" PRIu64 " is not a non-zero power of two", kv->v.u);
    c->ctx_kind = NULL;
    g->pub.alignment = kv->v.u;
    return 0;
}

/* ---- tensors ---- */

static int read_tensor_info(cursor *c, gguf_impl *g, uint64_t i)
{
    rt_gguf_tensor *t = &g->pub.tensors[i];
    set_ctx_index(c, "tensor info", i);
    if (read_name(c, &t->name, "tensor name") < 0)
        return -1;
    set_ctx_name(c, "tensor", t->name);

    uint64_t at = c->pos;
    if (read_u32(c, &t->n_dims, "n_dims") < 0)
        return -1;
    if (t->n_dims < 1 || t->n_dims > RT_GGUF_MAX_DIMS)
        return fail(c, "n_dims %" PRIu32 " at offset %" PRIu64 " is not in 1..%d", t->n_dims, at,
                    RT_GGUF_MAX_DIMS);
    /* ggml counts elements in int64_t, so the product must stay below 2^63. */
    uint64_t nelem = 1;
    for (uint32_t d = 0; d < RT_GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d >= t->n_dims)
            continue;
        at = c->pos;
        if (read_u64(c, &t->ne[d], "tensor dimension") < 0)
            return -1;
        if (t->ne[d] == 0 || t->ne[d] > (uint64_t)INT64_MAX)
            return fail(
                c, "ne[%" PRIu32 "] = %" PRIu64 " at offset %" PRIu64 " is not in 1..INT64_MAX", d,
                t->ne[d], at);
        if (nelem > (uint64_t)INT64_MAX / t->ne[d])
            return fail(
                c, "element count overflows at ne[%" PRIu32 "] = %" PRIu64 " (offset %" PRIu64 ")",
                d, t->ne[d], at);
        nelem *= t->ne[d];
    }

    at = c->pos;
    uint32_t type;
    if (read_u32(c, &type, "tensor type") < 0)
        return -1;
    uint64_t block = rt_ggml_block_size(type);
    if (block == 0)
        return fail(c, "unknown tensor type %" PRIu32 " at offset %" PRIu64, type, at);
    t->type = (rt_ggml_type)type;
    if (t->ne[0] % block != 0)
        return fail(c, "ne[0] = %" PRIu64 " is not a multiple of the %s block size %" PRIu64,
                    t->ne[0], rt_ggml_type_name(type), block);
    /* ne[0] % block == 0, so nelem / block is exact. */
    uint64_t blocks = nelem / block, bpb = rt_ggml_type_block_bytes(type);
    if (blocks > UINT64_MAX / bpb)
        return fail(c, "size overflows (%" PRIu64 " blocks of %" PRIu64 " bytes)", blocks, bpb);
    t->nbytes = blocks * bpb;

    at = c->pos;
    if (read_u64(c, &t->offset, "tensor data offset") < 0)
        return -1;
    if (t->offset % g->pub.alignment != 0)
        return fail(c,
                    "data offset %" PRIu64 " (at offset %" PRIu64
                    ") is not a multiple of the alignment %" PRIu64,
                    t->offset, at, g->pub.alignment);
    return 0;
}

static int read_tensors(cursor *c, gguf_impl *g)
{
    rt_gguf *pub = &g->pub;
    /* Checked against the bytes left again now that the metadata is consumed. */
    if (pub->n_tensors > left(c) / MIN_TENSOR_INFO_BYTES)
        return fail(c,
                    "tensor_count %" PRIu64 " is larger than the file can hold (%" PRIu64
                    " bytes left at offset %" PRIu64 ")",
                    pub->n_tensors, left(c), c->pos);
    pub->tensors = calloc(pub->n_tensors ? (size_t)pub->n_tensors : 1, sizeof *pub->tensors);
    if (!pub->tensors)
        return fail(c, "out of memory for %" PRIu64 " tensors", pub->n_tensors);
    for (uint64_t i = 0; i < pub->n_tensors; i++)
        if (read_tensor_info(c, g, i) < 0)
            return -1;
    c->ctx_kind = NULL;
    size_t dup, first;
    if (index_build(&g->tensor_index, pub->tensors, (size_t)pub->n_tensors, sizeof *pub->tensors,
                    offsetof(rt_gguf_tensor, name), &dup, &first) < 0)
        return fail(c, "out of memory indexing %" PRIu64 " tensors", pub->n_tensors);
    if (dup != SIZE_MAX) {
        set_ctx_name(c, "tensor", pub->tensors[dup].name);
        return fail(c,
                    "duplicate tensor name at offset %" PRIu64 " (tensor %zu; first used by "
                    "tensor %zu)",
                    name_offset(c, pub->tensors[dup].name), dup, first);
    }

    /* pos <= size and alignment <= 2^32, so this cannot overflow. */
    uint64_t a = pub->alignment;
    uint64_t data_offset = (c->pos + a - 1) / a * a;
    if (data_offset > c->size) {
        if (pub->n_tensors > 0)
            return fail(c,
                        "data section would start at offset %" PRIu64
                        ", past the end of the file (%" PRIu64 " bytes)",
                        data_offset, c->size);
        /* A metadata-only file need not carry the final padding. */
        data_offset = c->size;
    }
    pub->data_offset = data_offset;

    uint64_t room = c->size - data_offset;
    for (uint64_t i = 0; i < pub->n_tensors; i++) {
        rt_gguf_tensor *t = &pub->tensors[i];
        if (t->offset > room || t->nbytes > room - t->offset) {
            set_ctx_name(c, "tensor", t->name);
            if (t->offset > UINT64_MAX - data_offset)
                return fail(c,
                            "data [data section + %" PRIu64 ", %" PRIu64
                            " bytes] extends past the end of the file (%" PRIu64 " bytes)",
                            t->offset, t->nbytes, c->size);
            return fail(c,
                        "data [offset %" PRIu64 ", %" PRIu64
                        " bytes] extends past the end of the file (%" PRIu64 " bytes)",
                        data_offset + t->offset, t->nbytes, c->size);
        }
        t->data = c->buf + data_offset + t->offset;
    }
    return 0;
}

/* ---- header and entry points ---- */

static int read_header(cursor *c, rt_gguf *g)
{
    static const uint8_t magic[4] = {'G', 'G', 'U', 'F'};
    if (c->size < 4)
        return fail(c, "file is too small to be GGUF (%" PRIu64 " bytes)", c->size);
    if (memcmp(c->buf, magic, 4) != 0)
        return fail(c, "bad magic %02x %02x %02x %02x (expected \"GGUF\")", c->buf[0], c->buf[1],
                    c->buf[2], c->buf[3]);
    c->pos = 4;
    if (read_u32(c, &g->version, "version") < 0)
        return -1;
    if (g->version != 2 && g->version != 3) {
        uint32_t v = g->version;
        uint32_t swapped = v >> 24 | (v >> 8 & 0xff00) | (v << 8 & 0xff0000) | v << 24;
        if (swapped == 2 || swapped == 3)
            return fail(c,
                        "unsupported GGUF version %" PRIu32 " (a big-endian version %" PRIu32
                        " file?); only little-endian "
                        "versions 2 and 3 are supported",
                        v, swapped);
        return fail(c, "unsupported GGUF version %" PRIu32 "; only versions 2 and 3 are supported",
                    v);
    }
    if (read_u64(c, &g->n_tensors, "tensor_count") < 0 || read_u64(c, &g->n_kv, "kv_count") < 0)
        return -1;
    /* Refuse counts the file cannot back before any allocation is sized by them. */
    if (g->n_kv > left(c) / MIN_KV_BYTES)
        return fail(c,
                    "kv_count %" PRIu64 " is larger than the file can hold (%" PRIu64
                    " bytes after the header)",
                    g->n_kv, left(c));
    if (g->n_tensors > left(c) / MIN_TENSOR_INFO_BYTES)
        return fail(c,
                    "tensor_count %" PRIu64 " is larger than the file can hold (%" PRIu64
                    " bytes after the header)",
                    g->n_tensors, left(c));
    return 0;
}

static int parse(rt_gguf **out, const void *buf, size_t size, char *err, size_t errlen)
{
    cursor c = {.buf = buf, .size = size, .err = err, .errlen = errlen};
    *out = NULL;
    if (!buf && size > 0)
        return fail(&c, "NULL buffer of %zu bytes", size);
    gguf_impl *g = calloc(1, sizeof *g);
    if (!g)
        return fail(&c, "out of memory");
    g->pub.base = buf;
    g->pub.size = size;
    if (read_header(&c, &g->pub) < 0 || read_kvs(&c, g) < 0 || read_alignment(&c, g) < 0 ||
        read_tensors(&c, g) < 0) {
        rt_gguf_close(&g->pub);
        return -1;
    }
    *out = &g->pub;
    return 0;
}

int rt_gguf_parse(rt_gguf **out, const void *buf, size_t size, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (!out) {
        if (err && errlen)
            snprintf(err, errlen, "gguf: NULL output pointer");
        return -1;
    }
    return parse(out, buf, size, err, errlen);
}

int rt_gguf_open(rt_gguf **out, const char *path, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (!out || !path) {
        if (err && errlen)
            snprintf(err, errlen, "gguf: NULL %s", out ? "path" : "output pointer");
        return -1;
    }
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not block */
    if (fd < 0) {
        if (err && errlen)
            snprintf(err, errlen, "gguf: cannot open '%s': %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    const char *why = NULL;
    int saved = 0;
    if (fstat(fd, &st) < 0) {
        saved = errno;
        why = "cannot stat";
    } else if (!S_ISREG(st.st_mode)) {
        why = "is not a regular file";
    } else if (st.st_size == 0) {
        why = "is empty";
    } else if ((uint64_t)st.st_size > SIZE_MAX) {
        why = "is too large to map";
    }
    if (why) {
        close(fd);
        if (err && errlen) {
            if (saved)
                snprintf(err, errlen, "gguf: %s '%s': %s", why, path, strerror(saved));
            else
                snprintf(err, errlen, "gguf: '%s' %s", path, why);
        }
        return -1;
    }
    size_t size = (size_t)st.st_size;
    /* MAP_PRIVATE + PROT_READ: we never write, and nobody else's writes should be
     * able to change bytes we have validated (a concurrent truncation still can;
     * that is SIGBUS territory and out of scope). */
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd); /* the mapping keeps the file alive */
    if (map == MAP_FAILED) {
        if (err && errlen)
            snprintf(err, errlen, "gguf: cannot map '%s': %s", path, strerror(map_errno));
        return -1;
    }
    char msg[512];
    rt_gguf *g;
    if (parse(&g, map, size, msg, sizeof msg) < 0) {
        munmap(map, size);
        if (err && errlen) {
            /* Re-prefix the parser's "gguf: ..." message with the path. */
            const char *rest = strncmp(msg, "gguf: ", 6) == 0 ? msg + 6 : msg;
            snprintf(err, errlen, "gguf: %s: %s", path, rest);
        }
        return -1;
    }
    g->map = map;
    g->map_size = size;
    *out = g;
    return 0;
}

void rt_gguf_close(rt_gguf *g)
{
    if (!g)
        return;
    gguf_impl *impl = (gguf_impl *)g;
    if (g->kv)
        for (uint64_t i = 0; i < g->n_kv; i++)
            if (g->kv[i].type == RT_GGUF_ARRAY)
                free(g->kv[i].v.arr.strs);
    free(g->kv);
    free(g->tensors);
    free(impl->kv_index.sorted);
    free(impl->tensor_index.sorted);
    if (g->map)
        munmap(g->map, g->map_size);
    free(impl);
}

/* ---- lookups and getters ---- */

const rt_gguf_kv *rt_gguf_find_kv(const rt_gguf *g, const char *key)
{
    if (!g || !key)
        return NULL;
    const gguf_impl *impl = (const gguf_impl *)g;
    size_t i = index_find(&impl->kv_index, key, strlen(key));
    return i == SIZE_MAX ? NULL : &g->kv[i];
}

const rt_gguf_tensor *rt_gguf_find_tensor(const rt_gguf *g, const char *name)
{
    if (!g || !name)
        return NULL;
    const gguf_impl *impl = (const gguf_impl *)g;
    size_t i = index_find(&impl->tensor_index, name, strlen(name));
    return i == SIZE_MAX ? NULL : &g->tensors[i];
}

int rt_gguf_get_uint(const rt_gguf *g, const char *key, uint64_t *out)
{
    const rt_gguf_kv *kv = rt_gguf_find_kv(g, key);
    if (!kv)
        return -1;
    if (is_unsigned(kv->type)) {
        *out = kv->v.u;
        return 0;
    }
    if (is_signed(kv->type) && kv->v.i >= 0) {
        *out = (uint64_t)kv->v.i;
        return 0;
    }
    return -2;
}

int rt_gguf_get_float(const rt_gguf *g, const char *key, double *out)
{
    const rt_gguf_kv *kv = rt_gguf_find_kv(g, key);
    if (!kv)
        return -1;
    if (!is_float(kv->type))
        return -2;
    *out = kv->v.f;
    return 0;
}

int rt_gguf_get_bool(const rt_gguf *g, const char *key, bool *out)
{
    const rt_gguf_kv *kv = rt_gguf_find_kv(g, key);
    if (!kv)
        return -1;
    if (kv->type != RT_GGUF_BOOL)
        return -2;
    *out = kv->v.u != 0;
    return 0;
}

int rt_gguf_get_str(const rt_gguf *g, const char *key, rt_gguf_str *out)
{
    const rt_gguf_kv *kv = rt_gguf_find_kv(g, key);
    if (!kv)
        return -1;
    if (kv->type != RT_GGUF_STRING)
        return -2;
    *out = kv->v.str;
    return 0;
}

/* Decodes numeric element i of an array into e (e.type set to the element type). */
static int arr_elem(const rt_gguf_kv *kv, uint64_t i, rt_gguf_kv *e)
{
    if (!kv || kv->type != RT_GGUF_ARRAY || i >= kv->v.arr.n)
        return -1;
    rt_gguf_type t = kv->v.arr.type;
    if (t >= RT_GGUF_TYPE_COUNT || gguf_type_sizes[t] == 0)
        return -1; /* STRING (or ARRAY, never stored) */
    /* i < n and n * size was checked against the file at parse time. */
    load_scalar(t, kv->v.arr.data + i * gguf_type_sizes[t], e);
    e->type = t;
    return 0;
}

/* Any numeric element type converts to double (64-bit integers may round). */
int rt_gguf_arr_float(const rt_gguf_kv *kv, uint64_t i, double *out)
{
    rt_gguf_kv e = {0};
    if (arr_elem(kv, i, &e) < 0)
        return -1;
    if (is_float(e.type))
        *out = e.v.f;
    else if (is_signed(e.type))
        *out = (double)e.v.i;
    else
        *out = (double)e.v.u;
    return 0;
}

/* Integer and BOOL elements only; UINT64 values above INT64_MAX do not fit. */
int rt_gguf_arr_int(const rt_gguf_kv *kv, uint64_t i, int64_t *out)
{
    rt_gguf_kv e = {0};
    if (arr_elem(kv, i, &e) < 0)
        return -1;
    if (is_signed(e.type)) {
        *out = e.v.i;
        return 0;
    }
    if (is_unsigned(e.type) && e.v.u <= (uint64_t)INT64_MAX) {
        *out = (int64_t)e.v.u;
        return 0;
    }
    return -1;
}
