/*
 * safetensors.h - reader for Hugging Face safetensors files and model directories.
 *
 * A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping
 * each tensor name to {"dtype", "shape", "data_offsets": [begin, end)} (plus an optional
 * "__metadata__" object of strings), then the data. Files are memory-mapped read-only and
 * every field is checked against the file before use, as the reference implementation does
 * and a little more: offsets in range, tensors contiguous and covering the data exactly (no
 * overlaps, holes or trailing bytes), each begin a multiple of the element size, byte range
 * equal to shape product x element size (overflow-checked). Messages name the file, the
 * tensor and the field.
 *
 * A model directory holds config.json and either model.safetensors or, sharded,
 * model.safetensors.index.json whose "weight_map" names each tensor's shard file.
 *
 * Shapes are as Hugging Face stores them: row-major, outermost dimension first, so a linear
 * layer's weight is [out_features, in_features]. (GGUF lists ne innermost first; the same
 * matrix is ne = {in_features, out_features} there.)
 *
 * Handles are immutable after opening and may be shared between threads. Tensor names and
 * data live as long as the handle. Private to runtime/ (and its tests).
 */
#ifndef SIEVE_RUNTIME_SAFETENSORS_H
#define SIEVE_RUNTIME_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Element types safetensors defines with a whole number of bytes. Only F32, F16 and BF16 can
 * be model weights here; the others are parsed (so files that carry them still open) and
 * refused by rt_st_dir_get. */
typedef enum {
    RT_ST_F32,
    RT_ST_F16,
    RT_ST_BF16,
    RT_ST_F64,
    RT_ST_I8,
    RT_ST_U8,
    RT_ST_I16,
    RT_ST_U16,
    RT_ST_I32,
    RT_ST_U32,
    RT_ST_I64,
    RT_ST_U64,
    RT_ST_BOOL,
    RT_ST_F8_E4M3,
    RT_ST_F8_E5M2,
    RT_ST_DTYPE_COUNT
} rt_st_dtype;

enum { RT_ST_MAX_DIMS = 8 };

typedef struct {
    const char *name; /* NUL-terminated */
    rt_st_dtype dtype;
    uint32_t n_dims;                /* 0 for a scalar */
    uint64_t shape[RT_ST_MAX_DIMS]; /* outermost first; unused entries are 0 */
    uint64_t n_elements;
    uint64_t nbytes;
    const void *data; /* inside the mapping */
    /* data is a multiple of the element size from the mapping's (page-aligned) start. True
     * for every file written by safetensors >= 0.3, which pads the header to 8 bytes; when
     * false, read the data with memcpy. */
    bool aligned;
} rt_st_tensor;

/* --- one file ----------------------------------------------------------------------------- */

typedef struct rt_st_file rt_st_file;

/* Maps path read-only and parses it. Returns 0, or -1 with a message in err. */
int rt_st_open(rt_st_file **out, const char *path, char *err, size_t errlen);

/* Parses a safetensors image held in memory (buf must outlive the result); label names it in
 * messages (NULL: "buffer"). */
int rt_st_parse(rt_st_file **out, const void *buf, size_t size, const char *label, char *err,
                size_t errlen);

/* Unmaps and frees. Accepts NULL. */
void rt_st_close(rt_st_file *f);

size_t rt_st_count(const rt_st_file *f);
/* Tensors in the order of their data in the file. */
const rt_st_tensor *rt_st_tensor_at(const rt_st_file *f, size_t i);
const rt_st_tensor *rt_st_find(const rt_st_file *f, const char *name);
/* A "__metadata__" value, or NULL. */
const char *rt_st_metadata(const rt_st_file *f, const char *key);

/* "F32", "BF16", ...; "unknown" out of range. */
const char *rt_st_dtype_name(rt_st_dtype t);
/* Bytes per element; 0 out of range. */
size_t rt_st_dtype_size(rt_st_dtype t);

/* --- a model directory -------------------------------------------------------------------- */

typedef struct rt_st_dir rt_st_dir;

/* Opens the weights of the Hugging Face model directory dir: model.safetensors if present,
 * else the shards listed by model.safetensors.index.json (each opened once; every tensor of
 * the weight map must be in the shard it names; shard names must be plain file names in
 * dir). config.json must exist too (it is read by runtime/hf_config.h). */
int rt_st_dir_open(rt_st_dir **out, const char *dir, char *err, size_t errlen);
void rt_st_dir_close(rt_st_dir *d);

size_t rt_st_dir_count(const rt_st_dir *d);
/* Tensors sorted by name. */
const rt_st_tensor *rt_st_dir_tensor_at(const rt_st_dir *d, size_t i);
const rt_st_tensor *rt_st_dir_find(const rt_st_dir *d, const char *name);
size_t rt_st_dir_shard_count(const rt_st_dir *d);

/* Finds a weight: 0 and *out, or -1 with a message naming the tensor when it is missing or
 * its dtype is not F32, F16 or BF16. */
int rt_st_dir_get(const rt_st_dir *d, const char *name, const rt_st_tensor **out, char *err,
                  size_t errlen);

/* --- layout helper ------------------------------------------------------------------------ */

/* Reorders the rows of a Q or K projection (weight [n_heads * head_dim, in] or bias
 * [n_heads * head_dim], row_bytes per row) from Hugging Face's rotary layout, where a head's
 * rotated pairs are rows (i, i + head_dim/2) ("rotate_half", NeoX style), into the layout of
 * kern_rope_f32, where they are rows (2i, 2i + 1):
 *     dst[h * head_dim + 2i + j] = src[h * head_dim + j * head_dim/2 + i],  j = 0, 1.
 * This is the permutation llama.cpp's converter applies to q_proj and k_proj (use
 * num_attention_heads for Q and num_key_value_heads for K). dst and src must not overlap.
 * Returns 0, or -1 when head_dim is odd or zero. */
int rt_st_permute_rope_rows(void *dst, const void *src, uint64_t n_heads, uint64_t head_dim,
                            size_t row_bytes);

#endif
