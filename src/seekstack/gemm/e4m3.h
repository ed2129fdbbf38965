/* e4m3 (float8_e4m3fn) decode: `decode_block(x, n, s, o)` sets o[0:n] = e4m3(x[0:n]) * s, equal to torch's
 * `x.float() * s` bit for bit. Shared by seekstack.gemm's and seekstack.mla's C files (see gemm/cpu_decode.c for
 * how and how fast). */
#ifndef SEEKSTACK_E4M3_H
#define SEEKSTACK_E4M3_H
#include <stdint.h>
#include <string.h>

static inline float e4m3_to_f32(int8_t byte) {
    uint32_t v = (uint8_t)byte;
    uint32_t mag = v & 0x7Fu;
    uint32_t bits = (mag << 20) + (120u << 23);
    float f, subnormal;
    memcpy(&f, &bits, sizeof f);
    subnormal = 2.0f * f - 0x1p-6f; /* 2^-6 (1 + m/8) - 2^-6; computed always so that the choice is a blend */
    f = mag < 8u ? subnormal : f;
    f = mag == 0x7Fu ? __builtin_nanf("") : f;
    memcpy(&bits, &f, sizeof f);
    bits |= (v & 0x80u) << 24;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* o[0:n] = e4m3(x[0:n]) * s, portable (gcc vectorises it: 0.22 ns per element here). */
static void decode_block_portable(const int8_t *restrict x, int64_t n, float s, float *restrict o) {
    for (int64_t c = 0; c < n; c++)
        o[c] = e4m3_to_f32(x[c]) * s;
}

#if defined(__AVX512F__) && !defined(SEEKSTACK_PORTABLE) /* the tests build both */
#include <immintrin.h>
/* The same by a table: every e4m3 value is mi * 2^(e - 10), mi = m + 8 for e > 0 and mi = m, e = 1 for e = 0, so
 * (sign, e) picks one of 32 entries of +-2^(e-10) * s (one permute) and the 4-bit mi is converted and multiplied:
 * 0.16 ns per element here. Equal to `x * s` bit for bit while 2^-9 s and 2^5 s are exact, i.e. for
 * 2^-117 <= |s| < 2^122 (`table_exact`). */
static const float POWERS[32] = {
    0x1p-9f, 0x1p-9f, 0x1p-8f, 0x1p-7f, 0x1p-6f, 0x1p-5f, 0x1p-4f, 0x1p-3f,
    0x1p-2f, 0x1p-1f, 0x1p0f, 0x1p1f, 0x1p2f, 0x1p3f, 0x1p4f, 0x1p5f,
    -0x1p-9f, -0x1p-9f, -0x1p-8f, -0x1p-7f, -0x1p-6f, -0x1p-5f, -0x1p-4f, -0x1p-3f,
    -0x1p-2f, -0x1p-1f, -0x1p0f, -0x1p1f, -0x1p2f, -0x1p3f, -0x1p4f, -0x1p5f};

static inline int table_exact(float s) {
    float a = __builtin_fabsf(s);
    return !(a != 0.0f && a < 0x1p-117f) && !(a >= 0x1p122f && a <= 0x1.fffffep127f);
}

static void decode_block(const int8_t *restrict x, int64_t n, float s, float *restrict o) {
    if (!table_exact(s)) {
        decode_block_portable(x, n, s, o);
        return;
    }
    const __m512 scale = _mm512_set1_ps(s);
    const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(POWERS), scale);
    const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(POWERS + 16), scale);
    const __m512i low3 = _mm512_set1_epi32(7), eight = _mm512_set1_epi32(8);
    const __m512i exponent = _mm512_set1_epi32(0x78), magnitude = _mm512_set1_epi32(0x7F);
    const __m512 nan = _mm512_set1_ps(__builtin_nanf(""));
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(x + c)));
        __m512 power = _mm512_permutex2var_ps(lo, _mm512_srli_epi32(v, 3), hi); /* index: its low 5 bits */
        __m512i mi = _mm512_and_si512(v, low3);
        mi = _mm512_mask_or_epi32(mi, _mm512_test_epi32_mask(v, exponent), mi, eight);
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(mi), power);
        __mmask16 is_nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(v, magnitude), magnitude);
        _mm512_storeu_ps(o + c, _mm512_mask_blend_ps(is_nan, f, nan));
    }
    decode_block_portable(x + c, n - c, s, o + c);
}
#else
#define decode_block decode_block_portable
#endif
#endif
