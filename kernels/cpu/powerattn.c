/*
 * powerattn.c - the PowerAttention pattern (research/sparse-kv-spec.md 2.1-2.4)
 * as block masks for the block-sparse kernel, and the rule that keeps some
 * layers dense.
 *
 * Query block r attends key block c <= r iff r - c < W, r - c is a power of two
 * (or 0), or c == 0. The pattern depends on absolute block indices only, so a
 * prefill chunk, a prefix-cache hit and a decode step all take the rows of
 * their own query blocks and nothing else changes; a decode row at position p
 * uses the row of block p / B, and since the kernel's per-row arithmetic does
 * not depend on the other rows of its tile, decoding equals prefilling.
 */
#include "kernels/kernels.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void set_err(char *err, size_t err_len, const char *msg)
{
    if (err && err_len)
        snprintf(err, err_len, "%s", msg);
}

void kern_power_params_default(kern_power_params *p)
{
    p->block_size = 64;
    p->window_blocks = 5;
}

int kern_power_params_check(const kern_power_params *p, char *err, size_t err_len)
{
    if (!p) {
        set_err(err, err_len, "power parameters missing");
        return KERN_SPARSE_EINVAL;
    }
    if (p->block_size < 1) {
        set_err(err, err_len, "block_size must be >= 1");
        return KERN_SPARSE_EINVAL;
    }
    if (p->window_blocks < 1) {
        set_err(err, err_len, "window_blocks must be >= 1");
        return KERN_SPARSE_EINVAL;
    }
    return KERN_SPARSE_OK;
}

int kern_power_blocks(const kern_power_params *p, int qblock, int32_t *out, int cap)
{
    if (kern_power_params_check(p, NULL, 0) != KERN_SPARSE_OK || qblock < 0 || !out || cap < 0)
        return KERN_SPARSE_EINVAL;
    /* Ascending: the sink, the power-of-two distances beyond the window (far to
     * near), then the window. */
    const int w0 = qblock - p->window_blocks + 1 > 0 ? qblock - p->window_blocks + 1 : 0;
    int n = 0;
    if (w0 > 0) {
        if (n == cap)
            return KERN_SPARSE_ENOSPC;
        out[n++] = 0;
    }
    int top = 1;
    while (top <= qblock / 2)
        top *= 2; /* the largest power of two <= qblock */
    for (int d = top; d >= 1 && qblock >= 1; d /= 2) {
        const int c = qblock - d;
        if (c <= 0 || c >= w0)
            continue; /* the sink, or inside the window */
        if (n == cap)
            return KERN_SPARSE_ENOSPC;
        out[n++] = c;
    }
    for (int c = w0; c <= qblock; c++) {
        if (n == cap)
            return KERN_SPARSE_ENOSPC;
        out[n++] = c;
    }
    return n;
}

/* Bits lo..hi of a row. */
static void set_range(uint64_t *row, int lo, int hi)
{
    for (int c = lo; c <= hi;) {
        if (c % 64 == 0 && c + 63 <= hi) {
            row[c / 64] = ~(uint64_t)0;
            c += 64;
        } else {
            row[c / 64] |= (uint64_t)1 << (c % 64);
            c++;
        }
    }
}

int kern_power_mask(const kern_power_params *p, kern_block_mask *m)
{
    if (kern_power_params_check(p, NULL, 0) != KERN_SPARSE_OK || !m || !m->bits ||
        m->block_size != p->block_size)
        return KERN_SPARSE_EINVAL;
    for (int i = 0; i < m->n_qblocks; i++) {
        const int r = m->q_block0 + i;
        uint64_t *row = kern_block_mask_row(m, 0, r);
        memset(row, 0, sizeof(uint64_t) * (size_t)m->words);
        const int w0 = r - p->window_blocks + 1 > 0 ? r - p->window_blocks + 1 : 0;
        set_range(row, w0, r);
        row[0] |= 1u; /* sink */
        for (long d = 1; d <= r; d *= 2)
            row[(r - d) / 64] |= (uint64_t)1 << ((r - d) % 64);
        for (int l = 1; l < m->n_lists; l++)
            memcpy(kern_block_mask_row(m, l, r), row, sizeof(uint64_t) * (size_t)m->words);
    }
    return KERN_SPARSE_OK;
}

int kern_power_attention_f32(kern_pool *pool, const kern_attn_args *a, const kern_power_params *p,
                             uint64_t *bits, size_t n_words, kern_sparse_stats *st)
{
    if (!a || kern_power_params_check(p, NULL, 0) != KERN_SPARSE_OK)
        return KERN_SPARSE_EINVAL;
    kern_block_mask m;
    int rc = kern_block_mask_init(&m, bits, n_words, p->block_size, 1, a->ctx_len, a->n_q);
    if (rc == KERN_SPARSE_OK)
        rc = kern_power_mask(p, &m);
    if (rc == KERN_SPARSE_OK)
        rc = kern_attention_block_sparse_f32(pool, a, &m);
    if (rc == KERN_SPARSE_OK && st)
        kern_block_mask_stats(&m, a->n_heads, st);
    return rc;
}

/* ---- dense layers ---- */

/* Parses a non-negative decimal integer at *s (at most 9 digits). */
static int parse_uint(const char **s, int *out)
{
    const char *p = *s;
    long v = 0;
    int digits = 0;
    while (isdigit((unsigned char)*p)) {
        if (++digits > 9)
            return -1;
        v = v * 10 + (*p++ - '0');
    }
    if (!digits)
        return -1;
    *s = p;
    *out = (int)v;
    return 0;
}

/* Skips one or more spaces (required), then matches w. */
static int parse_word(const char **s, const char *w)
{
    const char *p = *s;
    if (*p != ' ')
        return -1;
    while (*p == ' ')
        p++;
    const size_t n = strlen(w);
    if (strncmp(p, w, n) != 0)
        return -1;
    *s = p + n;
    return 0;
}

int kern_power_dense_layers_parse(const char *s, int *dense_count, int *period, char *err,
                                  size_t err_len)
{
    static const char *what = "dense_layers must be \"K of every N\" (0 <= K <= N, 1 <= N <= "
                              "1000), \"none\" or \"all\"";
    int k, n;
    if (!s || !dense_count || !period) {
        set_err(err, err_len, what);
        return KERN_SPARSE_EINVAL;
    }
    const char *p = s;
    while (*p == ' ')
        p++;
    if (!strcmp(p, "none") || !strcmp(p, "all")) {
        *dense_count = p[0] == 'a';
        *period = 1;
        return KERN_SPARSE_OK;
    }
    if (parse_uint(&p, &k) != 0 || parse_word(&p, "of") != 0 || parse_word(&p, "every") != 0 ||
        parse_word(&p, "") != 0 || parse_uint(&p, &n) != 0)
        goto bad;
    while (*p == ' ')
        p++;
    if (*p != '\0' || n < 1 || n > 1000 || k > n)
        goto bad;
    *dense_count = k;
    *period = n;
    return KERN_SPARSE_OK;
bad:
    set_err(err, err_len, what);
    return KERN_SPARSE_EINVAL;
}

int kern_power_layer_is_dense(int layer, int dense_count, int period)
{
    if (layer < 0 || period < 1)
        return 0;
    return layer % period < dense_count;
}
