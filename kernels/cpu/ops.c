/*
 * ops.c - elementwise CPU kernels: RMSNorm, SwiGLU, residual add, RoPE and the
 * f16/bf16 conversions. Vectorized by the compiler (reductions are marked
 * `omp simd` so they may be reassociated; built with -fopenmp-simd).
 */
#include "kernels/kernels.h"
#include "kernels/cpu/simd.h"

#include <math.h>
#include <string.h>

void kern_rmsnorm_f32(float *out, const float *x, const float *w, int rows, int dim, float eps)
{
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *o = out + (size_t)r * dim;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < dim; i++)
            ss += xr[i] * xr[i];
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int i = 0; i < dim; i++)
            o[i] = xr[i] * scale * w[i];
    }
}

void kern_swiglu_f32(float *out, const float *gate, const float *up, size_t n)
{
    size_t i = 0;
#ifdef KERN_HAVE_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = kern_exp256_neg(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void kern_add_f32(float *y, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] += x[i];
}

void kern_rope_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim, int rope_dim,
                   float base)
{
    /* theta_i = pos * base^(-2i/rope_dim), computed per pair; rows share the
     * frequency table so it is built once per call. */
    float freq[512];
    const int half = rope_dim / 2 <= 512 ? rope_dim / 2 : 512;
    for (int i = 0; i < half; i++)
        freq[i] = powf(base, -2.0f * (float)i / (float)rope_dim);
    for (int r = 0; r < rows; r++) {
        const float p = (float)pos[r];
        float cs[512], sn[512];
        for (int i = 0; i < half; i++) {
            const float theta = p * freq[i];
            cs[i] = cosf(theta);
            sn[i] = sinf(theta);
        }
        float *row = x + (size_t)r * n_heads * head_dim;
        for (int h = 0; h < n_heads; h++) {
            float *v = row + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                const float a = v[2 * i], b = v[2 * i + 1];
                v[2 * i] = a * cs[i] - b * sn[i];
                v[2 * i + 1] = a * sn[i] + b * cs[i];
            }
        }
    }
}

void kern_rope_table_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                         int rope_dim, const float *inv_freq, int neox)
{
    const int half = rope_dim / 2 <= 512 ? rope_dim / 2 : 512;
    for (int r = 0; r < rows; r++) {
        float cs[512], sn[512];
        for (int i = 0; i < half; i++) {
            const float theta = (float)pos[r] * inv_freq[i];
            cs[i] = cosf(theta);
            sn[i] = sinf(theta);
        }
        float *row = x + (size_t)r * n_heads * head_dim;
        for (int h = 0; h < n_heads; h++) {
            float *v = row + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
                const float a = v[i0], b = v[i1];
                v[i0] = a * cs[i] - b * sn[i];
                v[i1] = a * sn[i] + b * cs[i];
            }
        }
    }
}

void kern_rope_neox_f32(float *x, const int32_t *pos, int rows, int n_heads, int head_dim,
                        int rope_dim, float base)
{
    float freq[512];
    const int half = rope_dim / 2 <= 512 ? rope_dim / 2 : 512;
    for (int i = 0; i < half; i++)
        freq[i] = powf(base, -2.0f * (float)i / (float)rope_dim);
    for (int r = 0; r < rows; r++) {
        const float p = (float)pos[r];
        float cs[512], sn[512];
        for (int i = 0; i < half; i++) {
            const float theta = p * freq[i];
            cs[i] = cosf(theta);
            sn[i] = sinf(theta);
        }
        float *row = x + (size_t)r * n_heads * head_dim;
        for (int h = 0; h < n_heads; h++) {
            float *v = row + (size_t)h * head_dim;
            for (int i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = a * sn[i] + b * cs[i];
            }
        }
    }
}

float kern_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while ((mant & 0x400) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

float kern_bf16_to_f32(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

void kern_f16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = kern_f16_to_f32(src[i]);
}

void kern_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = kern_bf16_to_f32(src[i]);
}
