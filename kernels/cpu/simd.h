/*
 * simd.h - small AVX2 helpers shared by the CPU kernels (private to kernels/).
 * Everything here has a portable fallback in the kernels that use it; the
 * AVX2 paths are chosen at compile time (the build targets the host CPU).
 */
#ifndef SIEVE_KERNELS_CPU_SIMD_H
#define SIEVE_KERNELS_CPU_SIMD_H

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KERN_HAVE_AVX2 1

/* The horizontal sums of eight vectors, as one vector: out[i] = sum(v[i]). */
static inline __m256 kern_hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                                __m256 a6, __m256 a7)
{
    const __m256 t0 = _mm256_hadd_ps(a0, a1);
    const __m256 t1 = _mm256_hadd_ps(a2, a3);
    const __m256 t2 = _mm256_hadd_ps(a4, a5);
    const __m256 t3 = _mm256_hadd_ps(a6, a7);
    const __m256 u0 = _mm256_hadd_ps(t0, t1); /* per 128-bit lane: sums of a0..a3 */
    const __m256 u1 = _mm256_hadd_ps(t2, t3); /* per 128-bit lane: sums of a4..a7 */
    const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    return _mm256_add_ps(lo, hi);
}

/* exp(x) to about 2 ulp for x in [-87, 88] (clamped outside): range
 * reduction by ln 2 and Cephes' degree-6 polynomial. Used for softmax
 * weights (x <= 0) and SiLU. */
static inline __m256 kern_exp256_neg(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* The horizontal sum of one vector. */
static inline float kern_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif
