/* Part of cpu_decode.c (one translation unit): element conversions and vector helpers shared by both paths. */

/* 2^x, relative error < 2e-7; 0 below 2^-125 (2^-inf = 0). Those lanes are zeroed by a mask: letting scalef
 * underflow to 0 took a microcode assist (~3500 cycles per item whose tile had masked keys). */
static inline __m512 exp2_ps(__m512 x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n); /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5252734e-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps((__mmask16)~tiny, p, n);
}

/* dst[0:n] = src[0:n] as fp32 (bf16 is fp32's top half), n a multiple of 32, in the *interleaved* order of a 32-wide
 * chunk: dst[c .. c+16] = src[c + {0-3, 8-11, 16-19, 24-27}], dst[c+16 .. c+32] = src[c + {4-7, 12-15, 20-23, 28-31}]
 * (two word unpacks against zero: half the instructions of a zero-extend and shift per element). Dot products are
 * unchanged when both sides share the order; outputs are put back in order once, at the end (`store_row`). */
static inline void widen(const uint16_t *src, int64_t n, float *dst) {
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t c = 0; c < n; c += 32) {
        __m512i x = _mm512_loadu_si512(src + c);
        _mm512_storeu_ps(dst + c, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, x)));
        _mm512_storeu_ps(dst + c + 16, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, x)));
    }
}

enum { BF16 = 0, FP16 = 1, FP32 = 2 }; /* element types of q, out and a non-FP8 cache */

/* `widen` for any element type: fp16 and fp32 rows are converted in natural order and put in the interleaved one. */
static inline void widen_any(const char *src, int64_t n, int dtype, float *dst) {
    if (dtype == BF16) {
        widen((const uint16_t *)src, n, dst);
        return;
    }
    const __m512i lo = _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
    const __m512i hi = _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4);
    for (int64_t c = 0; c < n; c += 32) {
        __m512 n0, n1;
        if (dtype == FP16) {
            n0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * c)));
            n1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * c + 32)));
        } else {
            n0 = _mm512_loadu_ps((const float *)src + c);
            n1 = _mm512_loadu_ps((const float *)src + c + 16);
        }
        _mm512_storeu_ps(dst + c, _mm512_permutex2var_ps(n0, lo, n1));
        _mm512_storeu_ps(dst + c + 16, _mm512_permutex2var_ps(n0, hi, n1));
    }
}

/* A key row of the FP8 cache (DeepSeek-V3.2's layout, `seekstack.mla.fp8_cache`: dv e4m3 values, dv / 128 fp32
 * scales, d - dv bf16 RoPE values) as fp32 in `widen`'s interleaved order. */
static inline void widen_fp8(const char *row, int64_t d, int64_t dv, float *dst) {
    const __m512i lo = _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
    const __m512i hi = _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4);
    float tile[128];
    for (int64_t c0 = 0; c0 < dv; c0 += 128) {
        float s;
        memcpy(&s, row + dv + 4 * (c0 / 128), sizeof s);
        decode_block((const int8_t *)row + c0, 128, s, tile); /* natural order */
        for (int c = 0; c < 128; c += 32) {
            __m512 n0 = _mm512_loadu_ps(tile + c), n1 = _mm512_loadu_ps(tile + c + 16);
            _mm512_storeu_ps(dst + c0 + c, _mm512_permutex2var_ps(n0, lo, n1));
            _mm512_storeu_ps(dst + c0 + c + 16, _mm512_permutex2var_ps(n0, hi, n1));
        }
    }
    widen((const uint16_t *)(row + dv + 4 * (dv / 128)), d - dv, dst + dv);
}

/* out[0:n] = acc[0:n] * scale in natural order, from `widen`'s interleaved order, as bf16 / fp16 (rounded to nearest
 * even, as torch rounds) or fp32. */
static inline void store_row(const float *acc, int64_t n, float scale, int dtype, char *out_bytes) {
    uint16_t *out = (uint16_t *)out_bytes;
    const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    const __m512 k = _mm512_set1_ps(scale);
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    for (int64_t c = 0; c < n; c += 32) {
        __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(acc + c), k), hi = _mm512_mul_ps(_mm512_loadu_ps(acc + c + 16), k);
        __m512 halves[2] = {_mm512_permutex2var_ps(lo, first, hi), _mm512_permutex2var_ps(lo, second, hi)};
        if (dtype == FP32) {
            _mm512_storeu_ps((float *)out_bytes + c, halves[0]);
            _mm512_storeu_ps((float *)out_bytes + c + 16, halves[1]);
            continue;
        }
        if (dtype == FP16) {
            for (int h = 0; h < 2; h++)
                _mm256_storeu_si256((__m256i *)(out + c + 16 * h),
                                    _mm512_cvtps_ph(halves[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            continue;
        }
        for (int h = 0; h < 2; h++) {
            __m512i u = _mm512_castps_si512(halves[h]);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
            __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), odd), 16);
            _mm256_storeu_si256((__m256i *)(out + c + 16 * h), _mm512_cvtepi32_epi16(rounded));
        }
    }
}

/* dst[16 c + r] = src[r * sstride + c] for r, c < 16 (a 16 x 16 transpose in registers: 64 shuffles). */
static inline void transpose16(const float *src, int64_t sstride, float *dst) {
    __m512 x[16], t[16], u[16];
    for (int r = 0; r < 16; r++)
        x[r] = _mm512_loadu_ps(src + r * sstride);
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[2 * i] = _mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4 i + j], lane L: column 4 L + j of rows 4 i .. 4 i + 3 */
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        __m512d c = _mm512_castps_pd(t[4 * i + 2]), e = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
    }
    for (int j = 0; j < 4; j++) {
        __m512 x0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
        __m512 y0 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
        __m512 y1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
        _mm512_storeu_ps(dst + 16 * j, _mm512_shuffle_f32x4(x0, y0, 0x88));
        _mm512_storeu_ps(dst + 16 * (4 + j), _mm512_shuffle_f32x4(x0, y0, 0xDD));
        _mm512_storeu_ps(dst + 16 * (8 + j), _mm512_shuffle_f32x4(x1, y1, 0x88));
        _mm512_storeu_ps(dst + 16 * (12 + j), _mm512_shuffle_f32x4(x1, y1, 0xDD));
    }
}
