/*
 * gguf.h - reader for llama.cpp's GGUF container (versions 2 and 3).
 *
 * The file is memory-mapped read-only (or parsed from a caller's buffer) and
 * every count, length and offset in it is validated against the buffer size
 * before it is used: a truncated or hostile file produces an error message
 * naming the problem, never an out-of-bounds read or an unbounded allocation.
 *
 * Strings returned by this API point into the mapped bytes and are NOT
 * NUL-terminated; use their length. They live as long as the rt_gguf.
 * Private to runtime/ (and its tests); other modules use runtime/model.h.
 */
#ifndef SIEVE_RUNTIME_GGUF_H
#define SIEVE_RUNTIME_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Metadata value types, numbered as in the GGUF specification. */
typedef enum {
    RT_GGUF_UINT8 = 0,
    RT_GGUF_INT8 = 1,
    RT_GGUF_UINT16 = 2,
    RT_GGUF_INT16 = 3,
    RT_GGUF_UINT32 = 4,
    RT_GGUF_INT32 = 5,
    RT_GGUF_FLOAT32 = 6,
    RT_GGUF_BOOL = 7,
    RT_GGUF_STRING = 8,
    RT_GGUF_ARRAY = 9,
    RT_GGUF_UINT64 = 10,
    RT_GGUF_INT64 = 11,
    RT_GGUF_FLOAT64 = 12,
    RT_GGUF_TYPE_COUNT
} rt_gguf_type;

/* Tensor element types, numbered as ggml numbers them. */
typedef enum {
    RT_GGML_F32 = 0,
    RT_GGML_F16 = 1,
    RT_GGML_Q4_0 = 2,
    RT_GGML_Q4_1 = 3,
    RT_GGML_Q5_0 = 6,
    RT_GGML_Q5_1 = 7,
    RT_GGML_Q8_0 = 8,
    RT_GGML_Q8_1 = 9,
    RT_GGML_Q2_K = 10,
    RT_GGML_Q3_K = 11,
    RT_GGML_Q4_K = 12,
    RT_GGML_Q5_K = 13,
    RT_GGML_Q6_K = 14,
    RT_GGML_Q8_K = 15,
    RT_GGML_IQ2_XXS = 16,
    RT_GGML_IQ2_XS = 17,
    RT_GGML_IQ3_XXS = 18,
    RT_GGML_IQ1_S = 19,
    RT_GGML_IQ4_NL = 20,
    RT_GGML_IQ3_S = 21,
    RT_GGML_IQ2_S = 22,
    RT_GGML_IQ4_XS = 23,
    RT_GGML_I8 = 24,
    RT_GGML_I16 = 25,
    RT_GGML_I32 = 26,
    RT_GGML_I64 = 27,
    RT_GGML_F64 = 28,
    RT_GGML_IQ1_M = 29,
    RT_GGML_BF16 = 30,
    RT_GGML_TQ1_0 = 34,
    RT_GGML_TQ2_0 = 35,
    RT_GGML_TYPE_COUNT = 40
} rt_ggml_type;

#define RT_GGUF_MAX_DIMS 4

typedef struct {
    const char *ptr; /* into the file bytes; not NUL-terminated */
    uint64_t len;
} rt_gguf_str;

typedef struct {
    rt_gguf_str key;
    rt_gguf_type type;
    union {
        uint64_t u; /* UINT8..UINT64 and BOOL */
        int64_t i;  /* INT8..INT64 */
        double f;   /* FLOAT32, FLOAT64 */
        rt_gguf_str str;
        struct {
            rt_gguf_type type;   /* element type; never ARRAY (nested arrays are refused) */
            uint64_t n;          /* element count */
            const uint8_t *data; /* raw little-endian elements (numeric types; may be unaligned) */
            rt_gguf_str *strs;   /* STRING elements, n entries, owned by the rt_gguf */
        } arr;
    } v;
} rt_gguf_kv;

typedef struct {
    rt_gguf_str name;
    uint32_t n_dims;
    uint64_t ne[RT_GGUF_MAX_DIMS]; /* innermost first; unused dims are 1 */
    rt_ggml_type type;
    uint64_t offset; /* relative to the start of the data section */
    uint64_t nbytes;
    const void *data; /* base + data_offset + offset, checked to lie inside the file */
} rt_gguf_tensor;

typedef struct rt_gguf {
    const uint8_t *base; /* the file bytes */
    size_t size;
    uint32_t version;
    uint64_t n_kv;
    rt_gguf_kv *kv;
    uint64_t n_tensors;
    rt_gguf_tensor *tensors;
    uint64_t alignment;   /* general.alignment or 32 */
    uint64_t data_offset; /* start of the tensor data section, aligned */
    void *map;            /* non-NULL when the file is mmap-ed by rt_gguf_open */
    size_t map_size;
} rt_gguf;

/* Maps `path` read-only and parses it. Returns 0, or -1 with a message in err. */
int rt_gguf_open(rt_gguf **out, const char *path, char *err, size_t errlen);

/* Parses a GGUF image held in memory; `buf` must outlive the result. */
int rt_gguf_parse(rt_gguf **out, const void *buf, size_t size, char *err, size_t errlen);

/* Frees the index and unmaps the file. Accepts NULL. */
void rt_gguf_close(rt_gguf *g);

const rt_gguf_kv *rt_gguf_find_kv(const rt_gguf *g, const char *key);
const rt_gguf_tensor *rt_gguf_find_tensor(const rt_gguf *g, const char *name);

/* Typed getters. Each returns 0 on success, -1 when the key is missing, and -2
 * when it has an incompatible type (integers of any width convert to uint64 if
 * non-negative; FLOAT32/FLOAT64 convert to double). */
int rt_gguf_get_uint(const rt_gguf *g, const char *key, uint64_t *out);
int rt_gguf_get_float(const rt_gguf *g, const char *key, double *out);
int rt_gguf_get_bool(const rt_gguf *g, const char *key, bool *out);
int rt_gguf_get_str(const rt_gguf *g, const char *key, rt_gguf_str *out);

/* Reads element i of a numeric array as double / int64 (bounds- and type-checked;
 * returns 0 or -1). */
int rt_gguf_arr_float(const rt_gguf_kv *kv, uint64_t i, double *out);
int rt_gguf_arr_int(const rt_gguf_kv *kv, uint64_t i, int64_t *out);

/* Names and sizes of types. Name is "unknown" for an unknown id. Block size and
 * bytes per block are 0 for unknown ids. */
const char *rt_ggml_type_name(uint32_t type);
uint64_t rt_ggml_block_size(uint32_t type);
uint64_t rt_ggml_type_block_bytes(uint32_t type);
const char *rt_gguf_type_name(uint32_t type);

/* True when s equals the NUL-terminated string c. */
bool rt_gguf_str_eq(rt_gguf_str s, const char *c);

#endif
