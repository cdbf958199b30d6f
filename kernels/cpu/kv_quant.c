/*
 * kv_quant.c - compressed KV page formats: sizes, packing, dequantization, the
 * ZipCache segment statistics, salient-set selection and the decode-time
 * flush cadence (research/sparse-kv-spec.md sections 3 and 4).
 *
 * Page layouts are documented once, in kernels.h. Invariants kept here:
 * - pages never hold a non-finite scale or code: statistics are taken over the
 *   finite values only, NaN is packed as 0 and +-Inf clamp to the end codes;
 * - every f16 scale is rounded up (never down) from the exact one, so the
 *   largest magnitude of a group never clips (q4_0's opposite extreme aside);
 * - codes are computed from the *stored* parameters, so the error bound of a
 *   value is the bound of the parameters the reader sees;
 * - kern_kvq_dequant_head is the only dequantizer: the attention kernel and
 *   kern_kvq_unpack share it, so the kernel sees exactly the unpacked tensor.
 */
#include "kernels/kernels.h"
#include "kernels/cpu/simd.h"

#include <float.h>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define F16_MAX 65504.0f
#define GROUP 32
#define MAX_KV_HEADS 1024

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* ---- formats and sizes ---- */

static const char *const fmt_names[KERN_KVQ_N_FMT] = {"f32",  "f16",  "q8",  "q4",
                                                      "zip8", "zip4", "zip2"};
static const int fmt_bits[KERN_KVQ_N_FMT] = {32, 16, 8, 4, 8, 4, 2};

static bool fmt_ok(int fmt)
{
    return fmt >= 0 && fmt < KERN_KVQ_N_FMT;
}

const char *kern_kvq_fmt_name(kern_kvq_fmt fmt)
{
    return fmt_ok(fmt) ? fmt_names[fmt] : "?";
}

int kern_kvq_fmt_bits(kern_kvq_fmt fmt)
{
    return fmt_ok(fmt) ? fmt_bits[fmt] : 0;
}

kern_kvq_fmt kern_kvq_zip_fmt(int bits)
{
    switch (bits) {
    case 8:
        return KERN_KVQ_ZIP8;
    case 4:
        return KERN_KVQ_ZIP4;
    case 2:
        return KERN_KVQ_ZIP2;
    default:
        return KERN_KVQ_N_FMT;
    }
}

int kern_kvq_geom_check(const kern_kvq_geom *g, char *err, size_t errlen)
{
    if (!g)
        return fail(err, errlen, "kv geometry is NULL");
    if (g->n_kv_heads < 1 || g->n_kv_heads > MAX_KV_HEADS)
        return fail(err, errlen, "n_kv_heads %d is not in [1, %d]", g->n_kv_heads, MAX_KV_HEADS);
    if (g->head_dim < 8 || g->head_dim > KERN_ATTN_MAX_HEAD_DIM || g->head_dim % 8 != 0)
        return fail(err, errlen, "head_dim %d is not a multiple of 8 in [8, %d]", g->head_dim,
                    KERN_ATTN_MAX_HEAD_DIM);
    if (g->block_size < 1 || g->block_size > KERN_KVQ_MAX_BLOCK_SIZE)
        return fail(err, errlen, "block_size %d is not in [1, %d]", g->block_size,
                    KERN_KVQ_MAX_BLOCK_SIZE);
    return 0;
}

static int n_groups(int d)
{
    return (d + GROUP - 1) / GROUP;
}

/* Bytes of one kv head's tile of one slot (codes and per-slot-head scales). */
static size_t slot_head_bytes(kern_kvq_fmt fmt, int d)
{
    switch (fmt) {
    case KERN_KVQ_F32:
        return 4 * (size_t)d;
    case KERN_KVQ_F16:
        return 2 * (size_t)d;
    case KERN_KVQ_Q8:
        return (size_t)d + 2 * (size_t)n_groups(d);
    case KERN_KVQ_Q4:
        return (size_t)d / 2 + 2 * (size_t)n_groups(d);
    default: /* ZIP: codes only */
        return (size_t)d * (size_t)fmt_bits[fmt] / 8;
    }
}

/* Bytes at the start of a page before its head tiles (ZIP V slot pairs). */
static size_t page_header_bytes(kern_kvq_fmt fmt, kern_kvq_kind kind, int bs)
{
    return kern_kvq_fmt_is_zip(fmt) && kind == KERN_KVQ_V ? 4 * (size_t)bs : 0;
}

size_t kern_kvq_page_bytes(kern_kvq_fmt fmt, kern_kvq_kind kind, const kern_kvq_geom *g)
{
    if (!fmt_ok(fmt) || (kind != KERN_KVQ_K && kind != KERN_KVQ_V) ||
        kern_kvq_geom_check(g, NULL, 0) != 0)
        return 0;
    return page_header_bytes(fmt, kind, g->block_size) +
           (size_t)g->n_kv_heads * (size_t)g->block_size * slot_head_bytes(fmt, g->head_dim);
}

size_t kern_kvq_block_bytes(kern_kvq_fmt fmt, const kern_kvq_geom *g)
{
    return kern_kvq_page_bytes(fmt, KERN_KVQ_K, g) + kern_kvq_page_bytes(fmt, KERN_KVQ_V, g);
}

double kern_kvq_bytes_per_token(kern_kvq_fmt high, kern_kvq_fmt low, float salient_fraction,
                                const kern_kvq_geom *g)
{
    const size_t bh = kern_kvq_block_bytes(high, g), bl = kern_kvq_block_bytes(low, g);
    if (!bh || !bl || !(salient_fraction >= 0.0f && salient_fraction <= 1.0f))
        return 0.0;
    const double f = salient_fraction;
    return (f * (double)bh + (1.0 - f) * (double)bl) / (double)g->block_size;
}

/* ---- element helpers ---- */

static inline float nan_to_zero(float x)
{
    return x != x ? 0.0f : x;
}

/* The f16 at or above x (x >= 0), at most F16_MAX: a scale rounded this way
 * never makes the largest magnitude of its group clip. */
static inline _Float16 f16_round_up(float x)
{
    if (!(x < F16_MAX))
        return (_Float16)F16_MAX;
    _Float16 h = (_Float16)x;
    if ((float)h < x) {
        uint16_t b;
        memcpy(&b, &h, sizeof(b));
        b++;
        memcpy(&h, &b, sizeof(b));
    }
    return h;
}

static inline _Float16 f16_sat(float x)
{
    return (_Float16)(x > F16_MAX ? F16_MAX : x < -F16_MAX ? -F16_MAX : x);
}

/* Round-half-up of v into [0, top]; v is never NaN here (inputs are
 * sanitized), +-Inf land on the ends. */
static inline uint8_t ucode(float v, int top)
{
    if (!(v > 0.0f))
        return 0;
    if (v >= (float)top)
        return (uint8_t)top;
    return (uint8_t)(int)(v + 0.5f);
}

/* ---- code packing (kernels.h: per group of n, 4 bits split in halves, 2
 * bits in quarters; zip_codes_row and q4_row read this layout) ---- */

static void codes_pack(uint8_t *restrict dst, const uint8_t *restrict c, int d, int bits)
{
    if (bits == 8) {
        memcpy(dst, c, (size_t)d);
        return;
    }
    for (int g0 = 0; g0 < d; g0 += GROUP) {
        const int n = d - g0 < GROUP ? d - g0 : GROUP;
        uint8_t *b = dst + g0 * bits / 8;
        const uint8_t *x = c + g0;
        if (bits == 4) {
            const int h = n / 2;
            for (int j = 0; j < h; j++)
                b[j] = (uint8_t)(x[j] | x[j + h] << 4);
        } else {
            const int q = n / 4;
            for (int j = 0; j < q; j++)
                b[j] = (uint8_t)(x[j] | x[j + q] << 2 | x[j + 2 * q] << 4 | x[j + 3 * q] << 6);
        }
    }
}

/* ---- page addressing ---- */

typedef struct {
    int h, d, bs, ng;
    size_t tile; /* bytes of one head's tile */
} page_geo;

static page_geo geo_of(kern_kvq_fmt fmt, const kern_kvq_geom *g)
{
    page_geo p = {g->n_kv_heads, g->head_dim, g->block_size, n_groups(g->head_dim), 0};
    p.tile = (size_t)p.bs * slot_head_bytes(fmt, p.d);
    return p;
}

/* Q8/Q4: the scales of one head's tile, then its codes. */
static inline _Float16 *q_scales(uint8_t *page, const page_geo *p, int h)
{
    return (_Float16 *)(void *)(page + (size_t)h * p->tile);
}
static inline uint8_t *q_codes(uint8_t *page, const page_geo *p, int h)
{
    return page + (size_t)h * p->tile + 2 * (size_t)p->bs * (size_t)p->ng;
}

/* ZIP: the codes of one head's tile (after the V slot pairs). */
static inline uint8_t *zip_codes(uint8_t *page, const page_geo *p, kern_kvq_kind kind, int h)
{
    return page + page_header_bytes(KERN_KVQ_ZIP8, kind, p->bs) + (size_t)h * p->tile;
}

/* ---- dequantization ----
 *
 * One row (slot) of one head at a time; every loop is over contiguous values
 * of a group so the compiler vectorizes it, and sub-byte codes are expanded
 * straight to floats (no intermediate code array). */

static inline void f16_row(float *restrict o, const _Float16 *restrict x, int d)
{
#ifdef __F16C__
    for (int i = 0; i < d; i += 8) /* d is a multiple of 8 */
        _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
#else
    for (int i = 0; i < d; i++)
        o[i] = (float)x[i];
#endif
}

static inline void q8_row(float *restrict o, const _Float16 *restrict sc, const int8_t *restrict x,
                          int d)
{
    for (int g0 = 0, gi = 0; g0 < d; g0 += GROUP, gi++) {
        const int m = d - g0 < GROUP ? d - g0 : GROUP;
        const float sd = (float)sc[gi];
#pragma omp simd
        for (int i = 0; i < m; i++)
            o[g0 + i] = (float)x[g0 + i] * sd;
    }
}

static inline void q4_row(float *restrict o, const _Float16 *restrict sc, const uint8_t *restrict b,
                          int d)
{
    for (int g0 = 0, gi = 0; g0 < d; g0 += GROUP, gi++) {
        const int h = (d - g0 < GROUP ? d - g0 : GROUP) / 2;
        const float sd = (float)sc[gi];
        const uint8_t *bg = b + g0 / 2;
#pragma omp simd
        for (int j = 0; j < h; j++) {
            o[g0 + j] = (float)((int)(bg[j] & 15) - 8) * sd;
            o[g0 + j + h] = (float)((int)(bg[j] >> 4) - 8) * sd;
        }
    }
}

#ifdef KERN_HAVE_AVX2
static inline __m256 u8x8_ps(__m128i x)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
}

/* One row of whole 32-value groups of ZIP codes, dequantized in registers:
 * K: o = code * a + b (a, b per channel); V (mt, dt per slot, a = the
 * channel scales): o = (code * dt + mt) * a. Same arithmetic as the scalar
 * path (one rounding per fused op may differ: within the tests' 1e-5). */
static inline void zip_row_avx2(float *restrict o, const uint8_t *restrict b, int d, int bits,
                                const float *a, const float *bb, bool v, float mt, float dt)
{
    const __m256 vmt = _mm256_set1_ps(mt), vdt = _mm256_set1_ps(dt);
    for (int g0 = 0; g0 < d; g0 += GROUP) {
        const uint8_t *bg = b + g0 * bits / 8;
        __m256 c[4];
        if (bits == 8) {
            const __m128i x0 = _mm_loadu_si128((const __m128i *)(const void *)bg);
            const __m128i x1 = _mm_loadu_si128((const __m128i *)(const void *)(bg + 16));
            c[0] = u8x8_ps(x0);
            c[1] = u8x8_ps(_mm_srli_si128(x0, 8));
            c[2] = u8x8_ps(x1);
            c[3] = u8x8_ps(_mm_srli_si128(x1, 8));
        } else if (bits == 4) {
            const __m128i x = _mm_loadu_si128((const __m128i *)(const void *)bg);
            const __m128i m = _mm_set1_epi8(15);
            const __m128i lo = _mm_and_si128(x, m), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
            c[0] = u8x8_ps(lo);
            c[1] = u8x8_ps(_mm_srli_si128(lo, 8));
            c[2] = u8x8_ps(hi);
            c[3] = u8x8_ps(_mm_srli_si128(hi, 8));
        } else {
            const __m128i x = _mm_loadl_epi64((const __m128i *)(const void *)bg);
            const __m128i m = _mm_set1_epi8(3);
            c[0] = u8x8_ps(_mm_and_si128(x, m));
            c[1] = u8x8_ps(_mm_and_si128(_mm_srli_epi16(x, 2), m));
            c[2] = u8x8_ps(_mm_and_si128(_mm_srli_epi16(x, 4), m));
            c[3] = u8x8_ps(_mm_and_si128(_mm_srli_epi16(x, 6), m));
        }
        for (int k = 0; k < 4; k++) {
            const int i = g0 + 8 * k;
            const __m256 r =
                v ? _mm256_mul_ps(_mm256_fmadd_ps(c[k], vdt, vmt), _mm256_loadu_ps(a + i))
                  : _mm256_fmadd_ps(c[k], _mm256_loadu_ps(a + i), _mm256_loadu_ps(bb + i));
            _mm256_storeu_ps(o + i, r);
        }
    }
}
#endif

/* ZIP codes of one row as floats (the affine map is applied by the caller). */
static inline void zip_codes_row(float *restrict o, const uint8_t *restrict b, int d, int bits)
{
    if (bits == 8) {
#pragma omp simd
        for (int i = 0; i < d; i++)
            o[i] = (float)b[i];
        return;
    }
    for (int g0 = 0; g0 < d; g0 += GROUP) {
        const int m = d - g0 < GROUP ? d - g0 : GROUP;
        const uint8_t *bg = b + g0 * bits / 8;
        float *og = o + g0;
        if (bits == 4) {
            const int h = m / 2;
#pragma omp simd
            for (int j = 0; j < h; j++) {
                og[j] = (float)(bg[j] & 15);
                og[j + h] = (float)(bg[j] >> 4);
            }
        } else {
            const int q = m / 4;
#pragma omp simd
            for (int j = 0; j < q; j++) {
                og[j] = (float)(bg[j] & 3);
                og[j + q] = (float)((bg[j] >> 2) & 3);
                og[j + 2 * q] = (float)((bg[j] >> 4) & 3);
                og[j + 3 * q] = (float)(bg[j] >> 6);
            }
        }
    }
}

void kern_kvq_dequant_head(float *dst, size_t dst_stride, const void *page_, kern_kvq_kind kind,
                           kern_kvq_fmt fmt, const kern_kvq_geom *g, int h, int slot0, int n,
                           const float *stats)
{
    uint8_t *page = (uint8_t *)(uintptr_t)page_;
    const page_geo p = geo_of(fmt, g);
    const int d = p.d, kvd = p.h * p.d;
    switch (fmt) {
    case KERN_KVQ_F32:
        for (int s = slot0; s < slot0 + n; s++)
            memcpy(dst + (size_t)(s - slot0) * dst_stride,
                   (const float *)(void *)page + ((size_t)s * p.h + h) * d,
                   sizeof(float) * (size_t)d);
        return;
    case KERN_KVQ_F16:
        for (int s = slot0; s < slot0 + n; s++)
            f16_row(dst + (size_t)(s - slot0) * dst_stride,
                    (const _Float16 *)(void *)page + ((size_t)s * p.h + h) * d, d);
        return;
    case KERN_KVQ_Q8:
        for (int s = slot0; s < slot0 + n; s++)
            q8_row(dst + (size_t)(s - slot0) * dst_stride, q_scales(page, &p, h) + (size_t)s * p.ng,
                   (const int8_t *)(q_codes(page, &p, h) + (size_t)s * d), d);
        return;
    case KERN_KVQ_Q4:
        for (int s = slot0; s < slot0 + n; s++)
            q4_row(dst + (size_t)(s - slot0) * dst_stride, q_scales(page, &p, h) + (size_t)s * p.ng,
                   q_codes(page, &p, h) + (size_t)s * (size_t)(d / 2), d);
        return;
    default: {
        const int bits = fmt_bits[fmt];
        const size_t row = (size_t)d * (size_t)bits / 8;
        const uint8_t *codes = zip_codes(page, &p, kind, h);
#ifdef KERN_HAVE_AVX2
        if (d % GROUP == 0) {
            const float *mn = stats + (size_t)h * d, *dl = stats + kvd + (size_t)h * d;
            const float *sc = stats + 2 * (size_t)kvd + (size_t)h * d;
            for (int s = slot0; s < slot0 + n; s++) {
                float *o = dst + (size_t)(s - slot0) * dst_stride;
                if (kind == KERN_KVQ_K) {
                    zip_row_avx2(o, codes + (size_t)s * row, d, bits, dl, mn, false, 0.0f, 0.0f);
                } else {
                    const _Float16 *pair = (const _Float16 *)(void *)page + 2 * (size_t)s;
                    zip_row_avx2(o, codes + (size_t)s * row, d, bits, sc, NULL, true,
                                 (float)pair[0], (float)pair[1]);
                }
            }
            return;
        }
#endif
        if (kind == KERN_KVQ_K) {
            const float *mn = stats + (size_t)h * d, *dl = stats + kvd + (size_t)h * d;
            for (int s = slot0; s < slot0 + n; s++) {
                float *restrict o = dst + (size_t)(s - slot0) * dst_stride;
                zip_codes_row(o, codes + (size_t)s * row, d, bits);
#pragma omp simd
                for (int i = 0; i < d; i++)
                    o[i] = o[i] * dl[i] + mn[i];
            }
            return;
        }
        const float *sc = stats + 2 * (size_t)kvd + (size_t)h * d;
        for (int s = slot0; s < slot0 + n; s++) {
            const _Float16 *pair = (const _Float16 *)(void *)page + 2 * (size_t)s;
            const float mt = (float)pair[0], dt = (float)pair[1];
            float *restrict o = dst + (size_t)(s - slot0) * dst_stride;
            zip_codes_row(o, codes + (size_t)s * row, d, bits);
#pragma omp simd
            for (int i = 0; i < d; i++)
                o[i] = (o[i] * dt + mt) * sc[i];
        }
        return;
    }
    }
}

static int check_page_args(const void *page, kern_kvq_kind kind, kern_kvq_fmt fmt,
                           const kern_kvq_geom *g, int slot0, int n, const float *stats, char *err,
                           size_t errlen)
{
    if (kern_kvq_geom_check(g, err, errlen) != 0)
        return -1;
    if (!fmt_ok(fmt))
        return fail(err, errlen, "unknown page format %d", (int)fmt);
    if (kind != KERN_KVQ_K && kind != KERN_KVQ_V)
        return fail(err, errlen, "page kind %d is neither K nor V", (int)kind);
    if (!page)
        return fail(err, errlen, "page is NULL");
    if (slot0 < 0 || n < 0 || slot0 > g->block_size - n)
        return fail(err, errlen, "slots [%d, %d + %d) are outside a page of %d slots", slot0, slot0,
                    n, g->block_size);
    if (kern_kvq_fmt_is_zip(fmt) && !stats)
        return fail(err, errlen, "%s page needs its segment statistics", fmt_names[fmt]);
    return 0;
}

int kern_kvq_unpack(float *dst, size_t dst_stride, const void *page, kern_kvq_kind kind,
                    kern_kvq_fmt fmt, const kern_kvq_geom *g, int slot0, int n, const float *stats,
                    char *err, size_t errlen)
{
    if (check_page_args(page, kind, fmt, g, slot0, n, stats, err, errlen) != 0)
        return -1;
    const size_t kvd = (size_t)g->n_kv_heads * (size_t)g->head_dim;
    if (!dst && n > 0)
        return fail(err, errlen, "unpack destination is NULL");
    if (dst_stride < kvd)
        return fail(err, errlen, "dst_stride %zu is below kv_dim %zu", dst_stride, kvd);
    for (int h = 0; h < g->n_kv_heads; h++)
        kern_kvq_dequant_head(dst + (size_t)h * g->head_dim, dst_stride, page, kind, fmt, g, h,
                              slot0, n, stats);
    return 0;
}

/* ---- packing ---- */

static inline const float *src_row(const kern_kvq_src *s, int t)
{
    const int u = t - s->first;
    size_t r = (size_t)u;
    if (s->blocks)
        r = (size_t)s->blocks[u / s->block_size] * (size_t)s->block_size +
            (size_t)(u % s->block_size);
    return s->base + r * s->stride;
}

static inline bool src_has(const kern_kvq_src *s, int t)
{
    return t >= s->first && t - s->first < s->len;
}

static inline int sel_pos(const kern_kvq_sel *sel, int h, int i)
{
    return sel->idx ? sel->idx[(size_t)h * (size_t)sel->head_stride + (size_t)i] : sel->first + i;
}

static int check_src(const kern_kvq_src *s, const char *what, const kern_kvq_geom *g, char *err,
                     size_t errlen)
{
    if (!s || !s->base)
        return fail(err, errlen, "%s source is NULL", what);
    if (s->stride < (size_t)g->n_kv_heads * (size_t)g->head_dim)
        return fail(err, errlen, "%s source stride %zu is below kv_dim %d", what, s->stride,
                    g->n_kv_heads * g->head_dim);
    if (s->len < 0 || s->first < 0 || s->first > INT32_MAX - s->len)
        return fail(err, errlen, "%s source positions [%d, %d + %d) are invalid", what, s->first,
                    s->first, s->len);
    if (s->blocks && s->block_size < 1)
        return fail(err, errlen, "%s source block_size %d is not positive", what, s->block_size);
    return 0;
}

static int check_sel(const kern_kvq_sel *sel, const kern_kvq_src *s, const char *what, int n_heads,
                     char *err, size_t errlen)
{
    if (!sel)
        return fail(err, errlen, "%s selection is NULL", what);
    if (sel->n < 0)
        return fail(err, errlen, "%s selection count %d is negative", what, sel->n);
    if (!sel->idx) {
        if (sel->n > 0 && (!src_has(s, sel->first) || !src_has(s, sel->first + sel->n - 1)))
            return fail(err, errlen,
                        "%s positions [%d, %d + %d) are outside the source "
                        "[%d, %d + %d)",
                        what, sel->first, sel->first, sel->n, s->first, s->first, s->len);
        return 0;
    }
    if (sel->head_stride < 0)
        return fail(err, errlen, "%s selection head_stride %d is negative", what, sel->head_stride);
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < sel->n; i++) {
            const int t = sel_pos(sel, h, i);
            if (!src_has(s, t))
                return fail(err, errlen,
                            "%s position %d (head %d, slot %d) is outside the "
                            "source [%d, %d + %d)",
                            what, t, h, i, s->first, s->first, s->len);
        }
    return 0;
}

static void pack_q8(uint8_t *page, const page_geo *p, int h, int s, const float *x)
{
    _Float16 *sc = q_scales(page, p, h) + (size_t)s * p->ng;
    int8_t *q = (int8_t *)(q_codes(page, p, h) + (size_t)s * p->d);
    for (int g0 = 0, gi = 0; g0 < p->d; g0 += GROUP, gi++) {
        const int m = p->d - g0 < GROUP ? p->d - g0 : GROUP;
        float amax = 0.0f;
        for (int i = 0; i < m; i++) {
            const float a = fabsf(x[g0 + i]);
            if (a <= FLT_MAX && a > amax)
                amax = a;
        }
        const _Float16 d16 = f16_round_up(amax / 127.0f);
        sc[gi] = d16;
        const float d = (float)d16;
        for (int i = 0; i < m; i++) {
            float v = d > 0.0f ? nan_to_zero(x[g0 + i]) / d : 0.0f;
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[g0 + i] = (int8_t)(int)(v + (v >= 0.0f ? 0.5f : -0.5f));
        }
    }
}

static void pack_q4(uint8_t *page, const page_geo *p, int h, int s, const float *x)
{
    _Float16 *sc = q_scales(page, p, h) + (size_t)s * p->ng;
    uint8_t c[KERN_ATTN_MAX_HEAD_DIM];
    for (int g0 = 0, gi = 0; g0 < p->d; g0 += GROUP, gi++) {
        const int m = p->d - g0 < GROUP ? p->d - g0 : GROUP;
        float amax = 0.0f, smax = 0.0f;
        for (int i = 0; i < m; i++) {
            const float a = fabsf(x[g0 + i]);
            if (a <= FLT_MAX && a > amax) {
                amax = a;
                smax = x[g0 + i];
            }
        }
        /* d = signed max / -8: the largest magnitude lands exactly on code 0. */
        const _Float16 mag = f16_round_up(amax / 8.0f);
        const float d = smax > 0.0f ? -(float)mag : (float)mag;
        sc[gi] = (_Float16)d;
        for (int i = 0; i < m; i++) {
            const float v = d != 0.0f ? nan_to_zero(x[g0 + i]) / d + 8.5f : 8.5f;
            c[g0 + i] = (uint8_t)(!(v > 0.0f) ? 0 : v >= 15.0f ? 15 : (int)v);
        }
    }
    codes_pack(q_codes(page, p, h) + (size_t)s * (size_t)(p->d / 2), c, p->d, 4);
}

static void pack_zip_k(uint8_t *page, const page_geo *p, int bits, int h, int s, const float *x,
                       const float *stats)
{
    const int d = p->d, kvd = p->h * p->d, top = (1 << bits) - 1;
    const float *mn = stats + (size_t)h * d, *dl = stats + kvd + (size_t)h * d;
    uint8_t c[KERN_ATTN_MAX_HEAD_DIM];
    for (int i = 0; i < d; i++)
        c[i] = ucode((nan_to_zero(x[i]) - mn[i]) / dl[i], top);
    codes_pack(zip_codes(page, p, KERN_KVQ_K, h) + (size_t)s * (size_t)(d * bits / 8), c, d, bits);
}

/* CST for one slot: x' = x / scale[c] over every head's slice, one (min,
 * delta) pair for the slot, then codes per head. xs[h] is head h's source. */
static void pack_zip_v(uint8_t *page, const page_geo *p, int bits, int s, const float *const *xs,
                       const float *stats)
{
    const int d = p->d, kvd = p->h * p->d, top = (1 << bits) - 1;
    const float *scale = stats + 2 * (size_t)kvd;
    float lo = INFINITY, hi = -INFINITY;
    for (int h = 0; h < p->h; h++)
        for (int i = 0; i < d; i++) {
            const float v = xs[h][i] / scale[(size_t)h * d + i];
            if (fabsf(v) <= FLT_MAX) {
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
            }
        }
    if (lo > hi)
        lo = hi = 0.0f; /* no finite value */
    const _Float16 mn16 = f16_sat(lo);
    const float mn = (float)mn16;
    const float range = hi - mn;
    _Float16 dl16 = (_Float16)1.0f;
    if (range >= 1e-8f * fmaxf(1.0f, fabsf(hi)) && range <= FLT_MAX) {
        dl16 = f16_round_up(range / (float)top);
        if ((float)dl16 == 0.0f)
            dl16 = (_Float16)1.0f;
    }
    _Float16 *pair = (_Float16 *)(void *)page + 2 * (size_t)s;
    pair[0] = mn16;
    pair[1] = dl16;
    const float dl = (float)dl16;
    uint8_t c[KERN_ATTN_MAX_HEAD_DIM];
    for (int h = 0; h < p->h; h++) {
        for (int i = 0; i < d; i++)
            c[i] = ucode((nan_to_zero(xs[h][i]) / scale[(size_t)h * d + i] - mn) / dl, top);
        codes_pack(zip_codes(page, p, KERN_KVQ_V, h) + (size_t)s * (size_t)(d * bits / 8), c, d,
                   bits);
    }
}

int kern_kvq_pack(void *page_, kern_kvq_kind kind, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                  int slot0, const kern_kvq_src *src, const kern_kvq_sel *sel, const float *stats,
                  char *err, size_t errlen)
{
    if (!sel)
        return fail(err, errlen, "pack selection is NULL");
    if (check_page_args(page_, kind, fmt, g, slot0, sel->n, stats, err, errlen) != 0 ||
        check_src(src, "pack", g, err, errlen) != 0 ||
        check_sel(sel, src, "pack", g->n_kv_heads, err, errlen) != 0)
        return -1;
    uint8_t *page = page_;
    const page_geo p = geo_of(fmt, g);
    const int d = p.d;
    const float *xs[MAX_KV_HEADS];
    for (int i = 0; i < sel->n; i++) {
        const int s = slot0 + i;
        for (int h = 0; h < p.h; h++)
            xs[h] = src_row(src, sel_pos(sel, h, i)) + (size_t)h * d;
        switch (fmt) {
        case KERN_KVQ_F32:
            for (int h = 0; h < p.h; h++)
                memcpy((float *)(void *)page + ((size_t)s * p.h + h) * d, xs[h],
                       sizeof(float) * (size_t)d);
            break;
        case KERN_KVQ_F16:
            for (int h = 0; h < p.h; h++) {
                _Float16 *o = (_Float16 *)(void *)page + ((size_t)s * p.h + h) * d;
                for (int e = 0; e < d; e++)
                    o[e] = (_Float16)xs[h][e];
            }
            break;
        case KERN_KVQ_Q8:
            for (int h = 0; h < p.h; h++)
                pack_q8(page, &p, h, s, xs[h]);
            break;
        case KERN_KVQ_Q4:
            for (int h = 0; h < p.h; h++)
                pack_q4(page, &p, h, s, xs[h]);
            break;
        default:
            if (kind == KERN_KVQ_K)
                for (int h = 0; h < p.h; h++)
                    pack_zip_k(page, &p, fmt_bits[fmt], h, s, xs[h], stats);
            else
                pack_zip_v(page, &p, fmt_bits[fmt], s, xs, stats);
            break;
        }
    }
    return 0;
}

/* ---- ZIP statistics ---- */

int kern_kvq_zip_stats(float *stats, kern_kvq_fmt fmt, const kern_kvq_geom *g,
                       const kern_kvq_src *k, const kern_kvq_sel *cls, const kern_kvq_src *v,
                       int seg_first, int seg_n, char *err, size_t errlen)
{
    if (kern_kvq_geom_check(g, err, errlen) != 0)
        return -1;
    if (!kern_kvq_fmt_is_zip(fmt))
        return fail(err, errlen, "statistics are for zip formats, not %s", kern_kvq_fmt_name(fmt));
    if (!stats)
        return fail(err, errlen, "statistics destination is NULL");
    if (check_src(k, "key", g, err, errlen) != 0 || check_src(v, "value", g, err, errlen) != 0 ||
        check_sel(cls, k, "class", g->n_kv_heads, err, errlen) != 0)
        return -1;
    if (seg_n < 0 || (seg_n > 0 && (!src_has(v, seg_first) || !src_has(v, seg_first + seg_n - 1))))
        return fail(err, errlen, "segment [%d, %d + %d) is outside the value source [%d, %d + %d)",
                    seg_first, seg_first, seg_n, v->first, v->first, v->len);
    const int d = g->head_dim, kvd = g->n_kv_heads * d;
    const float top = (float)((1 << fmt_bits[fmt]) - 1);
    float *mn = stats, *dl = stats + kvd, *sc = stats + 2 * (size_t)kvd;
    for (int c = 0; c < kvd; c++) {
        mn[c] = INFINITY;
        dl[c] = -INFINITY; /* the max until the end */
        sc[c] = 0.0f;
    }
    for (int h = 0; h < g->n_kv_heads; h++)
        for (int i = 0; i < cls->n; i++) {
            const float *x = src_row(k, sel_pos(cls, h, i)) + (size_t)h * d;
            float *lo = mn + (size_t)h * d, *hi = dl + (size_t)h * d;
            for (int e = 0; e < d; e++)
                if (fabsf(x[e]) <= FLT_MAX) {
                    lo[e] = x[e] < lo[e] ? x[e] : lo[e];
                    hi[e] = x[e] > hi[e] ? x[e] : hi[e];
                }
        }
    for (int c = 0; c < kvd; c++) {
        if (mn[c] > dl[c])
            mn[c] = dl[c] = 0.0f; /* no finite value (or an empty class) */
        const float range = dl[c] - mn[c];
        const bool flat = !(range >= 1e-8f * fmaxf(1.0f, fabsf(dl[c]))) || !(range <= FLT_MAX);
        dl[c] = flat ? 1.0f : range / top;
    }
    for (int t = seg_first; t < seg_first + seg_n; t++) {
        const float *x = src_row(v, t);
        for (int c = 0; c < kvd; c++) {
            const float a = fabsf(x[c]);
            if (a <= FLT_MAX && a > sc[c])
                sc[c] = a;
        }
    }
    for (int c = 0; c < kvd; c++) {
        sc[c] = sqrtf(sc[c]);
        if (!(sc[c] > 0.0f))
            sc[c] = 1.0f;
    }
    return 0;
}

/* ---- probe rows and salient sets ---- */

int kern_kvq_probe_count(int L)
{
    if (L <= 0 || L > INT32_MAX / 100)
        return 0;
    const int body = (int)((long long)L * 95 / 100);
    return (L - body) + (int)((long long)L * 5 / 100);
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void sort_i32(int32_t *a, int n);

int kern_kvq_probe_rows(int32_t *rows, int L, uint64_t seed)
{
    const int n = kern_kvq_probe_count(L);
    if (!rows || n <= 0)
        return 0;
    const int body = (int)((long long)L * 95 / 100);
    const int n_rand = (int)((long long)L * 5 / 100);
    uint64_t st = seed;
    int k = 0;
    for (int i = 0; i < n_rand; i++) /* with replacement, as the reference */
        rows[k++] = (int32_t)(((splitmix64(&st) >> 32) * (uint64_t)body) >> 32);
    for (int t = body; t < L; t++)
        rows[k++] = t;
    sort_i32(rows, n);
    return n;
}

int kern_kvq_salient_count(int n_keys, float salient_fraction)
{
    if (n_keys <= 0 || !(salient_fraction >= 0.0f && salient_fraction <= 1.0f))
        return 0;
    /* The fraction is read to 6 decimals (0.6f is 0.6000000238) and the
     * product nudged up by a relative 1e-12, so 0.4 * 100 is 40, not 39. */
    const double f = nearbyint((double)salient_fraction * 1e6) / 1e6;
    int reg = (int)floor((1.0 - f) * n_keys * (1.0 + 1e-12));
    reg = reg < 0 ? 0 : reg > n_keys ? n_keys : reg;
    return n_keys - reg;
}

int kern_kvq_saliency_normalize(float *scores, const float *colsum, int n_kv_heads, int key_first,
                                int n_keys, kern_kvq_norm norm, int L, const int32_t *probe_pos,
                                int n_probes, bool head_shared, char *err, size_t errlen)
{
    if (!scores || !colsum)
        return fail(err, errlen, "saliency scores or column sums are NULL");
    if (n_kv_heads < 1 || n_keys < 0 || key_first < 0)
        return fail(err, errlen, "saliency shape (kv heads %d, keys %d from %d) is invalid",
                    n_kv_heads, n_keys, key_first);
    if (norm == KERN_KVQ_NORM_PROBE_ROWS && (n_probes < 0 || (n_probes > 0 && !probe_pos)))
        return fail(err, errlen, "probe-row normalization needs the probe positions");
    if (norm != KERN_KVQ_NORM_CAUSAL_ROWS && norm != KERN_KVQ_NORM_PROBE_ROWS &&
        norm != KERN_KVQ_NORM_NONE)
        return fail(err, errlen, "unknown saliency normalization %d", (int)norm);
    bool sorted = true;
    for (int r = 1; r < n_probes && norm == KERN_KVQ_NORM_PROBE_ROWS; r++)
        sorted = sorted && probe_pos[r - 1] <= probe_pos[r];
    int below = 0; /* sorted probes: how many are at positions < j */
    for (int i = 0; i < n_keys; i++) {
        const int j = key_first + i;
        double div = 1.0;
        if (norm == KERN_KVQ_NORM_CAUSAL_ROWS) {
            div = (double)L - j;
        } else if (norm == KERN_KVQ_NORM_PROBE_ROWS && sorted) {
            while (below < n_probes && probe_pos[below] < j)
                below++;
            div = n_probes - below;
        } else if (norm == KERN_KVQ_NORM_PROBE_ROWS) {
            div = 0.0;
            for (int r = 0; r < n_probes; r++)
                div += probe_pos[r] >= j;
        }
        double shared = 0.0;
        for (int h = 0; h < n_kv_heads; h++) {
            const size_t e = (size_t)h * n_keys + i;
            const float v = div > 0.0 ? (float)(colsum[e] / div) : 0.0f;
            scores[e] = v;
            shared += v;
        }
        if (head_shared)
            for (int h = 0; h < n_kv_heads; h++)
                scores[(size_t)h * n_keys + i] = (float)shared;
    }
    return 0;
}

/* In-place heap sorts (no allocation, no comparator context needed). */
static void sift_i32(int32_t *a, int i, int n)
{
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && a[c + 1] > a[c])
            c++;
        if (a[i] >= a[c])
            return;
        const int32_t t = a[i];
        a[i] = a[c];
        a[c] = t;
        i = c;
    }
}

static void sort_i32(int32_t *a, int n)
{
    for (int i = n / 2 - 1; i >= 0; i--)
        sift_i32(a, i, n);
    for (int e = n - 1; e > 0; e--) {
        const int32_t t = a[0];
        a[0] = a[e];
        a[e] = t;
        sift_i32(a, 0, e);
    }
}

/* Orders key indices i by (score, position): the first are the least salient.
 * NaN scores count as the lowest. */
static inline bool key_less(const float *sc, int32_t a, int32_t b)
{
    const float x = sc[a] != sc[a] ? -INFINITY : sc[a];
    const float y = sc[b] != sc[b] ? -INFINITY : sc[b];
    return x < y || (x == y && a < b);
}

static void sift_keys(int32_t *a, const float *sc, int i, int n)
{
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && key_less(sc, a[c], a[c + 1]))
            c++;
        if (!key_less(sc, a[i], a[c]))
            return;
        const int32_t t = a[i];
        a[i] = a[c];
        a[c] = t;
        i = c;
    }
}

static void sort_keys(int32_t *a, const float *sc, int n)
{
    for (int i = n / 2 - 1; i >= 0; i--)
        sift_keys(a, sc, i, n);
    for (int e = n - 1; e > 0; e--) {
        const int32_t t = a[0];
        a[0] = a[e];
        a[e] = t;
        sift_keys(a, sc, 0, e);
    }
}

static void reverse_i32(int32_t *a, int n)
{
    for (int i = 0, j = n - 1; i < j; i++, j--) {
        const int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

int kern_kvq_select_salient(int32_t *order, const float *scores, int n_kv_heads, int key_first,
                            int n_keys, float salient_fraction, char *err, size_t errlen)
{
    if (!order || !scores)
        return fail(err, errlen, "salient selection buffers are NULL");
    if (n_kv_heads < 1 || n_keys < 0 || key_first < 0 || key_first > INT32_MAX - n_keys)
        return fail(err, errlen,
                    "salient selection shape (kv heads %d, keys %d from %d) is "
                    "invalid",
                    n_kv_heads, n_keys, key_first);
    if (!(salient_fraction >= 0.0f && salient_fraction <= 1.0f))
        return fail(err, errlen, "salient_fraction %g is not in [0, 1]", (double)salient_fraction);
    const int n_sal = kern_kvq_salient_count(n_keys, salient_fraction);
    const int n_reg = n_keys - n_sal;
    for (int h = 0; h < n_kv_heads; h++) {
        int32_t *o = order + (size_t)h * n_keys;
        const float *sc = scores + (size_t)h * n_keys;
        for (int i = 0; i < n_keys; i++)
            o[i] = i;
        sort_keys(o, sc, n_keys);
        /* [regular | salient] -> [salient | regular], each by position. */
        sort_i32(o, n_reg);
        sort_i32(o + n_reg, n_sal);
        reverse_i32(o, n_reg);
        reverse_i32(o + n_reg, n_sal);
        reverse_i32(o, n_keys);
        for (int i = 0; i < n_keys; i++)
            o[i] += key_first;
    }
    return n_sal;
}

/* ---- flush cadence ---- */

int kern_kvq_policy_check(const kern_kvq_policy *p, char *err, size_t errlen)
{
    if (!p)
        return fail(err, errlen, "kv policy is NULL");
    if (!fmt_ok(p->high) || !fmt_ok(p->low))
        return fail(err, errlen, "kv policy formats (%d, %d) are unknown", (int)p->high,
                    (int)p->low);
    if (p->block_size < 1 || p->block_size > KERN_KVQ_MAX_BLOCK_SIZE)
        return fail(err, errlen, "kv policy block_size %d is not in [1, %d]", p->block_size,
                    KERN_KVQ_MAX_BLOCK_SIZE);
    const bool zh = kern_kvq_fmt_is_zip(p->high), zl = kern_kvq_fmt_is_zip(p->low);
    if (zh != zl || (!zh && p->high != p->low))
        return fail(err, errlen, "kv policy mixes %s and %s: both zip, or one uniform format",
                    kern_kvq_fmt_name(p->high), kern_kvq_fmt_name(p->low));
    if (!zh)
        return 0;
    if (!(p->salient_fraction >= 0.0f && p->salient_fraction <= 1.0f))
        return fail(err, errlen, "salient_fraction %g is not in [0, 1]",
                    (double)p->salient_fraction);
    if (p->flush_tokens < p->block_size || p->flush_tokens % p->block_size != 0 ||
        p->flush_tokens > 1 << 20)
        return fail(err, errlen, "flush_tokens %d is not a positive multiple of block_size %d",
                    p->flush_tokens, p->block_size);
    if (p->saliency != KERN_KVQ_SAL_CURRENT && p->saliency != KERN_KVQ_SAL_WINDOW)
        return fail(err, errlen, "unknown flush saliency mode %d", (int)p->saliency);
    if (p->stats != KERN_KVQ_STATS_OWN && p->stats != KERN_KVQ_STATS_PROMPT)
        return fail(err, errlen, "unknown flush statistics mode %d", (int)p->stats);
    if (p->prompt_norm != KERN_KVQ_NORM_CAUSAL_ROWS && p->prompt_norm != KERN_KVQ_NORM_PROBE_ROWS)
        return fail(err, errlen, "prompt normalization %d is neither causal-rows nor probe-rows",
                    (int)p->prompt_norm);
    return 0;
}

kern_kvq_plan kern_kvq_cadence_plan(const kern_kvq_policy *p, kern_kvq_seq_state s, int n_new,
                                    bool last_prefill)
{
    kern_kvq_plan pl = {.action = KERN_KVQ_ACT_NONE, .norm = KERN_KVQ_NORM_NONE};
    if (!p || n_new < 0 || p->high == KERN_KVQ_F32 || p->block_size < 1)
        return pl; /* fp: nothing is ever compressed */
    const bool zip = kern_kvq_fmt_is_zip(p->high);
    const int L = s.n_tokens + n_new, bs = p->block_size;
    if (!s.prompt_done) {
        pl.score_probes = zip;
        if (!last_prefill)
            return pl;
        /* Uniform formats keep the partial last page as the tail; a ZIP
         * segment is a set, so the whole prompt goes. */
        pl.first = s.n_compressed;
        pl.n = zip ? L - s.n_compressed : (L / bs) * bs - s.n_compressed;
        pl.action = pl.n > 0 ? KERN_KVQ_ACT_COMPRESS_PROMPT : KERN_KVQ_ACT_NONE;
        pl.new_stats = zip && pl.n > 0;
        pl.norm = p->prompt_norm;
        pl.norm_L = L;
        return pl;
    }
    const int tail = L - s.n_compressed;
    if (!zip) {
        if (tail >= bs) {
            pl.action = KERN_KVQ_ACT_FLUSH;
            pl.first = s.n_compressed;
            pl.n = (tail / bs) * bs;
        }
        return pl;
    }
    const bool flush = tail >= p->flush_tokens;
    pl.score_window = p->saliency == KERN_KVQ_SAL_WINDOW || flush;
    pl.window_first = s.n_compressed;
    pl.window_n = tail;
    if (flush) {
        pl.action = KERN_KVQ_ACT_FLUSH;
        pl.first = s.n_compressed;
        pl.n = tail;
        pl.new_stats = p->stats == KERN_KVQ_STATS_OWN;
        pl.norm =
            p->saliency == KERN_KVQ_SAL_WINDOW ? KERN_KVQ_NORM_CAUSAL_ROWS : KERN_KVQ_NORM_NONE;
        pl.norm_L = L;
    }
    return pl;
}

kern_kvq_seq_state kern_kvq_cadence_advance(kern_kvq_seq_state s, int n_new, bool last_prefill,
                                            const kern_kvq_plan *plan)
{
    if (n_new > 0)
        s.n_tokens += n_new;
    if (plan && plan->action != KERN_KVQ_ACT_NONE && plan->first == s.n_compressed)
        s.n_compressed += plan->n;
    if (last_prefill)
        s.prompt_done = true;
    return s;
}
