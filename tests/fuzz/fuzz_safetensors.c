/*
 * fuzz_safetensors.c - libFuzzer target for the safetensors reader
 * (runtime/safetensors.c: rt_st_parse and its lookups).
 *
 * Input: the bytes of a safetensors file (8-byte little-endian header length,
 * the JSON header, the data). Seeds are small files written by
 * tests/fuzz/make_corpus.py and truncations and corruptions of them.
 *
 * Checked on every input, against safetensors.h: a refusal has a message and
 * no result; an accepted file lists tensors in data order, contiguous from
 * the end of the header to the end of the buffer (no holes, overlaps or
 * trailing bytes), each with at most RT_ST_MAX_DIMS dimensions, an element
 * count equal to the product of its shape, nbytes = elements x dtype size, a
 * begin that is a multiple of the element size, the `aligned` flag telling
 * the truth about its address, a NUL-terminated name that rt_st_find finds
 * again; lookups of absent names and metadata answer NULL.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "runtime/safetensors.h"
#include "tests/fuzz/fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rt_st_file *f = (rt_st_file *)(uintptr_t)1; /* must become NULL on failure */
    char err[512] = "";
    if (rt_st_parse(&f, data, size, "fuzz", err, sizeof(err)) != 0) {
        FUZZ_CHECK(f == NULL, "a refusal left a result");
        FUZZ_CHECK(err[0] != 0 && memchr(err, 0, sizeof(err)), "refused without a message");
        return 0;
    }
    FUZZ_CHECK(f != NULL, "accepted without a result");
    FUZZ_CHECK(size >= 8, "accepted %zu bytes", size);
    uint64_t header = 0;
    for (int i = 7; i >= 0; i--)
        header = header << 8 | data[i];
    FUZZ_CHECK(header <= size - 8, "header length %llu of %zu bytes", (unsigned long long)header,
               size);
    const uint8_t *next = data + 8 + header, *end = data + size;
    const size_t n = rt_st_count(f);
    for (size_t i = 0; i < n; i++) {
        const rt_st_tensor *t = rt_st_tensor_at(f, i);
        FUZZ_CHECK(t && t->name, "tensor %zu missing", i);
        FUZZ_CHECK(t->dtype < RT_ST_DTYPE_COUNT, "dtype %d", t->dtype);
        FUZZ_CHECK(t->n_dims <= RT_ST_MAX_DIMS, "n_dims %u", t->n_dims);
        unsigned __int128 elems = 1;
        for (uint32_t d = 0; d < t->n_dims; d++)
            elems *= t->shape[d];
        for (uint32_t d = t->n_dims; d < RT_ST_MAX_DIMS; d++)
            FUZZ_CHECK(t->shape[d] == 0, "'%s': unused shape[%u] = %llu", t->name, d,
                       (unsigned long long)t->shape[d]);
        FUZZ_CHECK(elems == t->n_elements, "'%s': %llu elements", t->name,
                   (unsigned long long)t->n_elements);
        const size_t es = rt_st_dtype_size(t->dtype);
        FUZZ_CHECK(es > 0 && (unsigned __int128)t->nbytes == elems * es, "'%s': nbytes %llu",
                   t->name, (unsigned long long)t->nbytes);
        const uint8_t *p = t->data;
        FUZZ_CHECK(p == next, "'%s' starts at +%td, expected +%td (not contiguous)", t->name,
                   p - data, next - data);
        FUZZ_CHECK(t->nbytes <= (uint64_t)(end - p), "'%s' runs past the end", t->name);
        FUZZ_CHECK((size_t)(p - (data + 8 + header)) % es == 0, "'%s': begin not a multiple of %zu",
                   t->name, es);
        FUZZ_CHECK(t->aligned == ((size_t)(p - data) % es == 0), "'%s': aligned flag wrong",
                   t->name);
        next = p + t->nbytes;
        FUZZ_CHECK(rt_st_find(f, t->name) == t, "'%s' not found again", t->name);
        FUZZ_CHECK(strlen(rt_st_dtype_name(t->dtype)) > 0, "dtype name");
    }
    FUZZ_CHECK(next == end, "%td trailing bytes", end - next);
    FUZZ_CHECK(rt_st_tensor_at(f, n) == NULL, "tensor_at(count) is not NULL");
    FUZZ_CHECK(rt_st_find(f, "\x01not a tensor") == NULL, "found an absent tensor");
    rt_st_metadata(f, "format");
    FUZZ_CHECK(rt_st_metadata(f, "\x01not a key") == NULL, "found absent metadata");
    rt_st_close(f);
    return 0;
}
