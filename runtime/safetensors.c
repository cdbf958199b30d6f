/*
 * safetensors.c - safetensors files and Hugging Face model directories.
 *
 * Every byte of a file is treated as hostile. Invariants, on success:
 *  - the header length is at most MAX_HEADER_BYTES and lies inside the file; the header is
 *    a JSON object (jansson parses it, duplicate keys refused);
 *  - each tensor has a known dtype, at most RT_ST_MAX_DIMS dimensions, an element count and
 *    byte size computed without overflow, data_offsets [begin, end) inside the data section
 *    with end - begin equal to the byte size and begin a multiple of the element size;
 *  - sorted by begin, the tensors tile the data section exactly (no overlap, hole or
 *    trailing byte), as the reference implementation requires;
 *  - names are unique, non-empty, NUL-free C strings (owned copies) indexed for binary search.
 * On failure everything is freed, *out is NULL and err names the file, tensor and field.
 * There is no global state; a parsed file or directory is read-only.
 */
#include "runtime/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum {
    /* The reference implementation's limit; real headers are kilobytes. */
    MAX_HEADER_BYTES = 100000000,
    /* Longest name quoted in a message. */
    SHOWN_BYTES = 96,
    /* Shards of one model; real ones have at most a few hundred. */
    MAX_SHARDS = 4096,
};

static const struct {
    const char *name;
    uint8_t size;
} dtypes[RT_ST_DTYPE_COUNT] = {
    [RT_ST_F32] = {"F32", 4},   [RT_ST_F16] = {"F16", 2},         [RT_ST_BF16] = {"BF16", 2},
    [RT_ST_F64] = {"F64", 8},   [RT_ST_I8] = {"I8", 1},           [RT_ST_U8] = {"U8", 1},
    [RT_ST_I16] = {"I16", 2},   [RT_ST_U16] = {"U16", 2},         [RT_ST_I32] = {"I32", 4},
    [RT_ST_U32] = {"U32", 4},   [RT_ST_I64] = {"I64", 8},         [RT_ST_U64] = {"U64", 8},
    [RT_ST_BOOL] = {"BOOL", 1}, [RT_ST_F8_E4M3] = {"F8_E4M3", 1}, [RT_ST_F8_E5M2] = {"F8_E5M2", 1},
};

/* dtypes safetensors defines that have no whole-byte element; named in their refusal. */
static const char *const sub_byte_dtypes[] = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0"};

const char *rt_st_dtype_name(rt_st_dtype t)
{
    return (unsigned)t < RT_ST_DTYPE_COUNT ? dtypes[t].name : "unknown";
}

size_t rt_st_dtype_size(rt_st_dtype t)
{
    return (unsigned)t < RT_ST_DTYPE_COUNT ? dtypes[t].size : 0;
}

struct rt_st_file {
    const uint8_t *base;
    size_t size;
    void *map; /* non-NULL when rt_st_open mapped the file */
    size_t map_size;
    size_t n;
    rt_st_tensor *tensors; /* by data offset */
    const rt_st_tensor **by_name;
    json_t *metadata; /* "__metadata__" or NULL */
};

/* --- messages ------------------------------------------------------------------------------ */

/* Copies a file-supplied name for quoting: non-printable bytes become '?', long names cut. */
static const char *show(char *out, size_t cap, const char *s)
{
    size_t o = 0, i = 0;
    for (; s[i] && o + 4 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        out[o++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    if (s[i]) {
        for (int k = 0; k < 3 && o + 1 < cap; k++) {
            out[o++] = '.';
        }
    }
    out[o] = '\0';
    return out;
}

typedef struct {
    char *err;
    size_t errlen;
    const char *label;  /* file name */
    const char *tensor; /* the tensor being read, or NULL */
} ctx;

__attribute__((format(printf, 2, 3))) static int fail(const ctx *c, const char *fmt, ...)
{
    if (!c->err || c->errlen == 0) {
        return -1;
    }
    char name[SHOWN_BYTES];
    int n = c->tensor ? snprintf(c->err, c->errlen, "safetensors: %s: tensor '%s': ", c->label,
                                 show(name, sizeof(name), c->tensor))
                      : snprintf(c->err, c->errlen, "safetensors: %s: ", c->label);
    if (n < 0 || (size_t)n >= c->errlen) {
        return -1;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

/* --- one file ------------------------------------------------------------------------------ */

void rt_st_close(rt_st_file *f)
{
    if (!f) {
        return;
    }
    for (size_t i = 0; i < f->n; i++) {
        free((char *)f->tensors[i].name);
    }
    free(f->tensors);
    free(f->by_name);
    json_decref(f->metadata);
    if (f->map) {
        munmap(f->map, f->map_size);
    }
    free(f);
}

static int parse_dtype(const ctx *c, const json_t *v, rt_st_dtype *out)
{
    if (!json_is_string(v)) {
        return fail(c, "\"dtype\" is missing or not a string");
    }
    const char *s = json_string_value(v);
    for (int t = 0; t < RT_ST_DTYPE_COUNT; t++) {
        if (strcmp(s, dtypes[t].name) == 0) {
            *out = (rt_st_dtype)t;
            return 0;
        }
    }
    char shown[SHOWN_BYTES];
    for (size_t i = 0; i < sizeof(sub_byte_dtypes) / sizeof(sub_byte_dtypes[0]); i++) {
        if (strcmp(s, sub_byte_dtypes[i]) == 0) {
            return fail(c, "dtype '%s' is not supported (sub-byte and scale types cannot be read)",
                        s);
        }
    }
    return fail(c, "unknown dtype '%s'", show(shown, sizeof(shown), s));
}

/* A non-negative JSON integer. */
static bool get_u64(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0) {
        return false;
    }
    *out = (uint64_t)json_integer_value(v);
    return true;
}

static int parse_tensor(const ctx *c, const json_t *v, uint64_t data_size, rt_st_tensor *t)
{
    if (!json_is_object(v)) {
        return fail(c, "the entry is not an object");
    }
    if (parse_dtype(c, json_object_get(v, "dtype"), &t->dtype)) {
        return -1;
    }
    const uint64_t esize = dtypes[t->dtype].size;

    const json_t *shape = json_object_get(v, "shape");
    if (!json_is_array(shape)) {
        return fail(c, "\"shape\" is missing or not an array");
    }
    if (json_array_size(shape) > RT_ST_MAX_DIMS) {
        return fail(c, "shape has %zu dimensions (at most %d)", json_array_size(shape),
                    RT_ST_MAX_DIMS);
    }
    t->n_dims = (uint32_t)json_array_size(shape);
    uint64_t count = 1;
    bool overflow = false;
    for (uint32_t i = 0; i < t->n_dims; i++) {
        if (!get_u64(json_array_get(shape, i), &t->shape[i])) {
            return fail(c, "shape[%u] is not a non-negative integer", i);
        }
        if (t->shape[i] && count > UINT64_MAX / t->shape[i]) {
            overflow = true;
        }
        count *= t->shape[i];
    }
    if (overflow || count > UINT64_MAX / esize) {
        return fail(c, "shape's element count overflows");
    }
    t->n_elements = count;
    t->nbytes = count * esize;

    const json_t *offs = json_object_get(v, "data_offsets");
    uint64_t begin, end;
    if (!json_is_array(offs) || json_array_size(offs) != 2 ||
        !get_u64(json_array_get(offs, 0), &begin) || !get_u64(json_array_get(offs, 1), &end)) {
        return fail(c, "\"data_offsets\" is missing or not two non-negative integers");
    }
    if (begin > end) {
        return fail(c, "data_offsets [%" PRIu64 ", %" PRIu64 ") ends before it begins", begin, end);
    }
    if (end > data_size) {
        return fail(c,
                    "data_offsets [%" PRIu64 ", %" PRIu64 ") run past the end of the data (%" PRIu64
                    " bytes)",
                    begin, end, data_size);
    }
    if (end - begin != t->nbytes) {
        char dims[160];
        size_t o = 0;
        for (uint32_t i = 0; i < t->n_dims && o < sizeof(dims) - 24; i++) {
            o += (size_t)snprintf(dims + o, sizeof(dims) - o, "%s%" PRIu64, i ? ", " : "",
                                  t->shape[i]);
        }
        dims[o] = '\0';
        return fail(c,
                    "shape [%s] of %s needs %" PRIu64 " bytes but data_offsets [%" PRIu64
                    ", %" PRIu64 ") hold %" PRIu64,
                    dims, dtypes[t->dtype].name, t->nbytes, begin, end, end - begin);
    }
    if (begin % esize != 0) {
        return fail(c, "data offset %" PRIu64 " is not a multiple of the %s element size %" PRIu64,
                    begin, dtypes[t->dtype].name, esize);
    }
    /* the data pointer is set once the data section's start is known; keep begin meanwhile */
    t->data = (const void *)(uintptr_t)begin;
    return 0;
}

static int cmp_offset(const void *x, const void *y)
{
    const rt_st_tensor *a = x, *b = y;
    uintptr_t p = (uintptr_t)a->data, q = (uintptr_t)b->data;
    if (p != q) {
        return p < q ? -1 : 1;
    }
    /* zero-size tensors share an offset with their neighbour: put them first */
    return (a->nbytes > b->nbytes) - (a->nbytes < b->nbytes);
}

static int cmp_name(const void *x, const void *y)
{
    const rt_st_tensor *const *a = x, *const *b = y;
    return strcmp((*a)->name, (*b)->name);
}

/* Checks that the tensors, sorted by offset, tile [0, data_size) exactly. */
static int check_tiling(ctx *c, rt_st_file *f, uint64_t data_size)
{
    uint64_t at = 0;
    const char *prev = NULL;
    for (size_t i = 0; i < f->n; i++) {
        rt_st_tensor *t = &f->tensors[i];
        uint64_t begin = (uint64_t)(uintptr_t)t->data;
        c->tensor = t->name;
        if (begin < at) {
            char p[SHOWN_BYTES];
            return fail(
                c, "data [%" PRIu64 ", %" PRIu64 ") overlaps tensor '%s', which ends at %" PRIu64,
                begin, begin + t->nbytes, show(p, sizeof(p), prev), at);
        }
        if (begin > at) {
            return fail(c,
                        "data starts at %" PRIu64 ", leaving %" PRIu64
                        " unused bytes before it (holes are not allowed)",
                        begin, begin - at);
        }
        at = begin + t->nbytes;
        prev = t->name;
    }
    c->tensor = NULL;
    if (at != data_size) {
        return fail(c, "the tensors cover %" PRIu64 " of the %" PRIu64 " data bytes", at,
                    data_size);
    }
    return 0;
}

static int parse_metadata(ctx *c, rt_st_file *f, json_t *meta)
{
    if (!json_is_object(meta)) {
        return fail(c, "\"__metadata__\" is not an object");
    }
    const char *key;
    json_t *v;
    json_object_foreach(meta, key, v)
    {
        if (!json_is_string(v)) {
            char k[SHOWN_BYTES];
            return fail(c, "\"__metadata__\" value '%s' is not a string", show(k, sizeof(k), key));
        }
    }
    f->metadata = json_incref(meta);
    return 0;
}

int rt_st_parse(rt_st_file **out, const void *buf, size_t size, const char *label, char *err,
                size_t errlen)
{
    ctx c = {err, errlen, label ? label : "buffer", NULL};
    *out = NULL;
    const uint8_t *p = buf;
    if (!p || size < 8) {
        return fail(&c, "file is %zu bytes, shorter than the 8-byte header length", size);
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) {
        hlen = hlen << 8 | p[i];
    }
    if (hlen > MAX_HEADER_BYTES) {
        return fail(&c, "header length %" PRIu64 " is absurd (at most %d bytes)", hlen,
                    MAX_HEADER_BYTES);
    }
    if (hlen > size - 8) {
        return fail(&c, "header length %" PRIu64 " runs past the end of the file (%zu bytes)", hlen,
                    size);
    }
    if (hlen < 2 || p[8] != '{') {
        return fail(&c, "header does not start with a JSON object");
    }
    const uint64_t data_size = size - 8 - hlen;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        return fail(&c, "header is not valid JSON (byte %d of the header): %s", jerr.position,
                    jerr.text);
    }
    rt_st_file *f = calloc(1, sizeof(*f));
    if (!f || !json_is_object(root)) {
        json_decref(root);
        free(f);
        return fail(&c, f ? "header is not a JSON object" : "out of memory");
    }
    f->base = p;
    f->size = size;
    size_t n = json_object_size(root);
    f->tensors = calloc(n ? n : 1, sizeof(*f->tensors));
    f->by_name = calloc(n ? n : 1, sizeof(*f->by_name));
    if (!f->tensors || !f->by_name) {
        fail(&c, "out of memory");
        goto bad;
    }
    const char *key;
    size_t klen;
    json_t *v;
    json_object_keylen_foreach(root, key, klen, v)
    {
        if (strcmp(key, "__metadata__") == 0) {
            if (parse_metadata(&c, f, v)) {
                goto bad;
            }
            continue;
        }
        if (klen == 0) {
            fail(&c, "a tensor has an empty name");
            goto bad;
        }
        if (strlen(key) != klen) {
            fail(&c, "a tensor name contains a NUL byte");
            goto bad;
        }
        rt_st_tensor *t = &f->tensors[f->n];
        t->name = strdup(key);
        if (!t->name) {
            fail(&c, "out of memory");
            goto bad;
        }
        f->n++;
        c.tensor = t->name;
        if (parse_tensor(&c, v, data_size, t)) {
            goto bad;
        }
        c.tensor = NULL;
    }
    qsort(f->tensors, f->n, sizeof(*f->tensors), cmp_offset);
    if (check_tiling(&c, f, data_size)) {
        goto bad;
    }
    const uint8_t *data = p + 8 + hlen;
    for (size_t i = 0; i < f->n; i++) {
        rt_st_tensor *t = &f->tensors[i];
        t->data = data + (uintptr_t)t->data;
        t->aligned = (uintptr_t)t->data % dtypes[t->dtype].size == 0;
        f->by_name[i] = t;
    }
    qsort(f->by_name, f->n, sizeof(*f->by_name), cmp_name);
    json_decref(root);
    *out = f;
    return 0;
bad:
    json_decref(root);
    rt_st_close(f);
    return -1;
}

int rt_st_open(rt_st_file **out, const char *path, char *err, size_t errlen)
{
    ctx c = {err, errlen, path ? path : "(null)", NULL};
    *out = NULL;
    int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) {
        return fail(&c, "cannot open: %s", strerror(path ? errno : EINVAL));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(&c, "not a regular file");
    }
    if (st.st_size < 8) {
        close(fd);
        return fail(&c, "file is %lld bytes, shorter than the 8-byte header length",
                    (long long)st.st_size);
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        return fail(&c, "file is too large to map");
    }
    size_t size = (size_t)st.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        return fail(&c, "cannot map %zu bytes: %s", size, strerror(errno));
    }
    if (rt_st_parse(out, map, size, path, err, errlen) != 0) {
        munmap(map, size);
        return -1;
    }
    (*out)->map = map;
    (*out)->map_size = size;
    return 0;
}

size_t rt_st_count(const rt_st_file *f)
{
    return f ? f->n : 0;
}

const rt_st_tensor *rt_st_tensor_at(const rt_st_file *f, size_t i)
{
    return f && i < f->n ? &f->tensors[i] : NULL;
}

static const rt_st_tensor *find_sorted(const rt_st_tensor *const *v, size_t n, const char *name)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int r = strcmp(v[mid]->name, name);
        if (r == 0) {
            return v[mid];
        }
        if (r < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return NULL;
}

const rt_st_tensor *rt_st_find(const rt_st_file *f, const char *name)
{
    return f && name ? find_sorted(f->by_name, f->n, name) : NULL;
}

const char *rt_st_metadata(const rt_st_file *f, const char *key)
{
    if (!f || !f->metadata || !key) {
        return NULL;
    }
    return json_string_value(json_object_get(f->metadata, key));
}

/* --- model directories --------------------------------------------------------------------- */

struct rt_st_dir {
    rt_st_file **shards;
    char **shard_names;
    size_t n_shards;
    const rt_st_tensor **by_name; /* sorted */
    size_t n;
};

void rt_st_dir_close(rt_st_dir *d)
{
    if (!d) {
        return;
    }
    for (size_t i = 0; i < d->n_shards; i++) {
        rt_st_close(d->shards[i]);
        free(d->shard_names[i]);
    }
    free(d->shards);
    free(d->shard_names);
    free(d->by_name);
    free(d);
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int join(char *out, size_t cap, const char *dir, const char *name, ctx *c)
{
    int n = snprintf(out, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap) {
        return fail(c, "path of %s is too long", name);
    }
    return 0;
}

/* A shard name from the weight map must be a plain file name inside the directory. */
static bool plain_file_name(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && n < 256 && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

/* Opens (once) the shard called name; returns its index or -1. */
static long open_shard(rt_st_dir *d, const char *dir, const char *name, ctx *c)
{
    for (size_t i = 0; i < d->n_shards; i++) {
        if (strcmp(d->shard_names[i], name) == 0) {
            return (long)i;
        }
    }
    if (d->n_shards >= MAX_SHARDS) {
        fail(c, "more than %d shards", MAX_SHARDS);
        return -1;
    }
    char path[PATH_MAX];
    if (join(path, sizeof(path), dir, name, c)) {
        return -1;
    }
    size_t i = d->n_shards;
    d->shard_names[i] = strdup(name);
    if (!d->shard_names[i]) {
        fail(c, "out of memory");
        return -1;
    }
    d->n_shards++;
    if (rt_st_open(&d->shards[i], path, c->err, c->errlen) != 0) {
        return -1;
    }
    return (long)i;
}

static int dir_single(rt_st_dir *d, const char *dir, ctx *c)
{
    d->shards = calloc(1, sizeof(*d->shards));
    d->shard_names = calloc(1, sizeof(*d->shard_names));
    if (!d->shards || !d->shard_names) {
        return fail(c, "out of memory");
    }
    if (open_shard(d, dir, "model.safetensors", c) < 0) {
        return -1;
    }
    const rt_st_file *f = d->shards[0];
    d->n = f->n;
    d->by_name = malloc((d->n ? d->n : 1) * sizeof(*d->by_name));
    if (!d->by_name) {
        return fail(c, "out of memory");
    }
    memcpy(d->by_name, f->by_name, d->n * sizeof(*d->by_name));
    return 0;
}

static int dir_sharded(rt_st_dir *d, const char *dir, const char *index_path, ctx *c)
{
    c->label = "model.safetensors.index.json";
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        return fail(c, "invalid JSON at line %d, column %d: %s", jerr.line, jerr.column, jerr.text);
    }
    int rc = -1;
    const json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map) || json_object_size(map) == 0) {
        fail(c, "\"weight_map\" is missing, empty or not an object");
        goto done;
    }
    size_t n = json_object_size(map);
    size_t cap = n < MAX_SHARDS ? n : MAX_SHARDS;
    d->shards = calloc(cap, sizeof(*d->shards));
    d->shard_names = calloc(cap, sizeof(*d->shard_names));
    d->by_name = calloc(n, sizeof(*d->by_name));
    if (!d->shards || !d->shard_names || !d->by_name) {
        fail(c, "out of memory");
        goto done;
    }
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)map, key, v)
    {
        char shown[SHOWN_BYTES], shown2[SHOWN_BYTES];
        if (!json_is_string(v) || !plain_file_name(json_string_value(v))) {
            fail(c, "weight_map entry for '%s' is not a file name in the model directory",
                 show(shown, sizeof(shown), key));
            goto done;
        }
        long s = open_shard(d, dir, json_string_value(v), c);
        if (s < 0) {
            goto done;
        }
        const rt_st_tensor *t = rt_st_find(d->shards[s], key);
        if (!t) {
            fail(c, "tensor '%s' is not in %s, where weight_map puts it",
                 show(shown, sizeof(shown), key), show(shown2, sizeof(shown2), d->shard_names[s]));
            goto done;
        }
        d->by_name[d->n++] = t;
    }
    qsort(d->by_name, d->n, sizeof(*d->by_name), cmp_name);
    rc = 0;
done:
    json_decref(root);
    return rc;
}

int rt_st_dir_open(rt_st_dir **out, const char *dir, char *err, size_t errlen)
{
    ctx c = {err, errlen, dir ? dir : "(null)", NULL};
    *out = NULL;
    if (!dir) {
        return fail(&c, "no directory");
    }
    char path[PATH_MAX];
    if (join(path, sizeof(path), dir, "config.json", &c)) {
        return -1;
    }
    if (!file_exists(path)) {
        return fail(&c, "no config.json: not a Hugging Face model directory");
    }
    rt_st_dir *d = calloc(1, sizeof(*d));
    if (!d) {
        return fail(&c, "out of memory");
    }
    int rc;
    if (join(path, sizeof(path), dir, "model.safetensors", &c)) {
        rc = -1;
    } else if (file_exists(path)) {
        rc = dir_single(d, dir, &c);
    } else if (join(path, sizeof(path), dir, "model.safetensors.index.json", &c)) {
        rc = -1;
    } else if (file_exists(path)) {
        rc = dir_sharded(d, dir, path, &c);
    } else {
        rc = fail(&c, "neither model.safetensors nor model.safetensors.index.json is there");
    }
    if (rc != 0) {
        rt_st_dir_close(d);
        return -1;
    }
    *out = d;
    return 0;
}

size_t rt_st_dir_count(const rt_st_dir *d)
{
    return d ? d->n : 0;
}

const rt_st_tensor *rt_st_dir_tensor_at(const rt_st_dir *d, size_t i)
{
    return d && i < d->n ? d->by_name[i] : NULL;
}

const rt_st_tensor *rt_st_dir_find(const rt_st_dir *d, const char *name)
{
    return d && name ? find_sorted(d->by_name, d->n, name) : NULL;
}

size_t rt_st_dir_shard_count(const rt_st_dir *d)
{
    return d ? d->n_shards : 0;
}

int rt_st_dir_get(const rt_st_dir *d, const char *name, const rt_st_tensor **out, char *err,
                  size_t errlen)
{
    ctx c = {err, errlen, "model directory", name};
    *out = NULL;
    const rt_st_tensor *t = rt_st_dir_find(d, name);
    if (!t) {
        return fail(&c, "missing");
    }
    if (t->dtype != RT_ST_F32 && t->dtype != RT_ST_F16 && t->dtype != RT_ST_BF16) {
        return fail(&c, "has dtype %s; weights must be F32, F16 or BF16", dtypes[t->dtype].name);
    }
    *out = t;
    return 0;
}

int rt_st_permute_rope_rows(void *dst, const void *src, uint64_t n_heads, uint64_t head_dim,
                            size_t row_bytes)
{
    if (head_dim == 0 || head_dim % 2 != 0 || !dst || !src) {
        return -1;
    }
    const uint64_t half = head_dim / 2;
    uint8_t *o = dst;
    const uint8_t *s = src;
    for (uint64_t h = 0; h < n_heads; h++) {
        for (uint64_t i = 0; i < half; i++) {
            for (uint64_t j = 0; j < 2; j++) {
                memcpy(o + (size_t)(h * head_dim + 2 * i + j) * row_bytes,
                       s + (size_t)(h * head_dim + j * half + i) * row_bytes, row_bytes);
            }
        }
    }
    return 0;
}
