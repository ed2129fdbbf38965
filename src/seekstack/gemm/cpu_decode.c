/* FP8 (e4m3fn) decode with 128-wide block scales, for seekstack.gemm's CPU path (loaded by seekstack.cpu_native).
 *
 * An e4m3 byte s.eeee.mmm becomes an fp32 bit pattern with integer ops that vectorise: the 7 magnitude bits go
 * under the fp32 exponent/mantissa boundary (<< 20) with 120 added to the exponent (the two biases differ by
 * 127 - 7), which is exact for normal values; subnormals (eeee = 0, value m * 2^-9) are then 2 f - 2^-6, 0x7F
 * is NaN, and the sign bit is copied. No step creates an fp32 subnormal, so flush-to-zero modes
 * cannot change a result. One multiply by the block scale follows: the result equals torch's
 * `x.float() * scale` bit for bit. With AVX-512 a table form does the same in fewer instructions. Measured on one
 * core: 0.16 ns per element (AVX-512), 0.22 (portable), vs 0.41 for the five eager torch passes.
 *
 * `threads` > 1 splits the rows over OpenMP threads. Built with -fopenmp and loaded after torch, the library binds
 * to the libgomp torch already loaded (same soname), i.e. to torch's own warm thread pool: a Python thread pool
 * here lost to torch's spinning OpenMP workers (decode 0.42 ms on 2 threads vs 0.25 on one).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "e4m3.h"

/* out[r, c] = e4m3(x[r, c]) * scales[(row0 + r) / gran, c / 128] for r < rows, c < k; out[r, k:kp] = 0. */
void seekstack_decode_e4m3_rows(const int8_t *restrict x, int64_t rows, int64_t k, int64_t x_stride, int64_t row0,
                                const float *restrict scales, int64_t s_stride, int64_t gran,
                                float *restrict out, int64_t out_stride, int64_t kp, int64_t threads) {
    #pragma omp parallel for num_threads((int)threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *xr = x + r * x_stride;
        const float *sr = scales + ((row0 + r) / gran) * s_stride;
        float *o = out + r * out_stride;
        for (int64_t c0 = 0; c0 < k; c0 += 128) {
            int64_t c1 = c0 + 128 < k ? c0 + 128 : k;
            decode_block(xr + c0, c1 - c0, sr[c0 / 128], o + c0);
        }
        for (int64_t c = k; c < kp; c++)
            o[c] = 0.0f;
    }
}

/* out[j, 0:nr] = tile[0:nr][j] for j < 128: a decoded [16, 128] tile written transposed into 128 rows of out. */
#if defined(__AVX512F__) && !defined(SEEKSTACK_PORTABLE)
/* 16 x 16 blocks transposed in registers (unpacks, then 128-bit lane shuffles): 64 shuffles and 16 masked 64-byte
 * stores per 256 elements, where a scalar column walk made the transposed decode twice the plain one's time. */
static void store_transposed(float tile[16][128], int64_t nr, float *restrict out, int64_t out_stride) {
    const __mmask16 live = (__mmask16)((1u << nr) - 1u);
    for (int64_t j0 = 0; j0 < 128; j0 += 16) {
        __m512 r[16], t[16];
        for (int i = 0; i < 16; i++)
            r[i] = _mm512_loadu_ps(tile[i] + j0);
        for (int i = 0; i < 16; i += 2) { /* per 128-bit lane q: (a[4q], b[4q], a[4q+1], b[4q+1]) and the next two */
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) { /* r[i + e], lane q: rows i .. i+3 of column 4q + e */
            r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
            r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
            r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
            r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        }
        for (int e = 0; e < 4; e++) { /* column 4q + e = lane q of r[e], r[4 + e], r[8 + e], r[12 + e] */
            __m512 lo01 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x44), hi01 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xEE);
            __m512 lo23 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x44);
            __m512 hi23 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xEE);
            float *o = out + (j0 + e) * out_stride;
            _mm512_mask_storeu_ps(o, live, _mm512_shuffle_f32x4(lo01, lo23, 0x88));
            _mm512_mask_storeu_ps(o + 4 * out_stride, live, _mm512_shuffle_f32x4(lo01, lo23, 0xDD));
            _mm512_mask_storeu_ps(o + 8 * out_stride, live, _mm512_shuffle_f32x4(hi01, hi23, 0x88));
            _mm512_mask_storeu_ps(o + 12 * out_stride, live, _mm512_shuffle_f32x4(hi01, hi23, 0xDD));
        }
    }
}
#else
static void store_transposed(float tile[16][128], int64_t nr, float *restrict out, int64_t out_stride) {
    for (int64_t j = 0; j < 128; j++)
        for (int64_t i = 0; i < nr; i++)
            out[j * out_stride + i] = tile[i][j];
}
#endif

/* The transpose: out[c, r] = e4m3(x[r, c]) * scales[r, c / 128] for r < rows, c < k; out[k:kp, r] = 0.
 * Rows are decoded 16 at a time into a [16, 128] tile that is written transposed. Threads take blocks of 128
 * columns, i.e. whole rows of out: split by rows, two cores wrote neighbouring lines of each out row (M = 64:
 * 52 us on 2 threads vs 48 on one). */
/* Columns c0 .. c0 + 128 of the transposed decode: rows 128-wide of out. */
static void decode_t_columns(const int8_t *restrict x, int64_t rows, int64_t k, int64_t x_stride,
                             const float *restrict scales, int64_t s_stride, float *restrict out, int64_t out_stride,
                             int64_t c0) {
    enum { TR = 16, TC = 128 };
    float tile[TR][TC];
    memset(tile, 0, sizeof tile); /* rows past the last are transposed too (their lanes are not stored) */
    int64_t nc = k - c0 < TC ? (k - c0 > 0 ? k - c0 : 0) : TC;
    for (int64_t r0 = 0; r0 < rows; r0 += TR) {
        int64_t nr = rows - r0 < TR ? rows - r0 : TR;
        for (int64_t i = 0; i < nr; i++) {
            const int8_t *xr = x + (r0 + i) * x_stride + c0;
            float s = nc ? scales[(r0 + i) * s_stride + c0 / 128] : 0.0f;
            decode_block(xr, nc, s, tile[i]);
            for (int64_t j = nc; j < TC; j++)
                tile[i][j] = 0.0f;
        }
        store_transposed(tile, nr, out + c0 * out_stride + r0, out_stride);
    }
}

void seekstack_decode_e4m3_rows_t(const int8_t *restrict x, int64_t rows, int64_t k, int64_t x_stride,
                                  const float *restrict scales, int64_t s_stride,
                                  float *restrict out, int64_t out_stride, int64_t kp, int64_t threads) {
    #pragma omp parallel for num_threads((int)threads) if (threads > 1) schedule(static)
    for (int64_t c0 = 0; c0 < kp; c0 += 128)
        decode_t_columns(x, rows, k, x_stride, scales, s_stride, out, out_stride, c0);
}

/* fp32 -> bf16 as torch rounds it: to nearest even, any NaN -> 0x7FC0. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

/* dst[c, r] = bf16(src[r, c]) for r < rows, c < cols: the weight-left GEMM's [n, m] chunk into the bf16 [m, n] d.
 * torch's strided copy of the same measured ~1.1 ns per element here. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(SEEKSTACK_PORTABLE)
/* 16 rows at a time: one gather per column (from L1/L2), rounded with integer ops, one 32-byte store: ~0.2 ns. */
void seekstack_f32_to_bf16_t(const float *restrict src, int64_t rows, int64_t cols, int64_t src_stride,
                             uint16_t *restrict dst, int64_t dst_stride, int64_t threads) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i index = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int32_t)src_stride));
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    const __m512i nan = _mm512_set1_epi32(0x7FC0);
    #pragma omp parallel for num_threads((int)threads) if (threads > 1) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        int64_t nr = rows - r0 < 16 ? rows - r0 : 16;
        __mmask16 live = (__mmask16)((1u << nr) - 1u);
        const float *base = src + r0 * src_stride;
        for (int64_t c = 0; c < cols; c++) {
            __m512i u = _mm512_castps_si512(
                _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, index, base + c, sizeof(float)));
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
            __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), odd), 16);
            __mmask16 is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
            rounded = _mm512_mask_blend_epi32(is_nan, rounded, nan);
            _mm256_mask_storeu_epi16(dst + c * dst_stride + r0, live, _mm512_cvtepi32_epi16(rounded));
        }
    }
}
#else
/* Through 16 x 16 tiles in L1. */
void seekstack_f32_to_bf16_t(const float *restrict src, int64_t rows, int64_t cols, int64_t src_stride,
                             uint16_t *restrict dst, int64_t dst_stride, int64_t threads) {
    enum { T = 16 };
    #pragma omp parallel for num_threads((int)threads) if (threads > 1) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += T) {
        uint16_t tile[T][T];
        int64_t nr = rows - r0 < T ? rows - r0 : T;
        for (int64_t c0 = 0; c0 < cols; c0 += T) {
            int64_t nc = cols - c0 < T ? cols - c0 : T;
            for (int64_t i = 0; i < nr; i++) {
                const float *s = src + (r0 + i) * src_stride + c0;
                for (int64_t j = 0; j < nc; j++)
                    tile[j][i] = f32_to_bf16(s[j]);
            }
            for (int64_t j = 0; j < nc; j++)
                memcpy(dst + (c0 + j) * dst_stride + r0, tile[j], (size_t)nr * sizeof(uint16_t));
        }
    }
}
#endif

/* MKL's Fortran SGEMM, as torch's own libtorch_cpu exports it. Called inside an OpenMP parallel region it runs on
 * the calling thread alone (MKL_DYNAMIC, and nested regions are off). Its integers are passed by address as int64:
 * read as 32-bit (LP64 MKL) or 64-bit (ILP64) on this little-endian target, they give the same value. */
typedef void (*sgemm_fn)(const char *transa, const char *transb, const void *m, const void *n, const void *k,
                         const float *alpha, const float *a, const void *lda, const float *b, const void *ldb,
                         const float *beta, float *c, const void *ldc);

/* Per thread, kept across calls: a chunk's decoded weight rows and their product (first touch of ~0.6 MB per call
 * would cost ~30 us of page faults). */
static _Thread_local float *chunk_buffer;
static _Thread_local int64_t chunk_buffer_floats;

static float *thread_buffer(int64_t floats) {
    if (chunk_buffer_floats < floats) {
        free(chunk_buffer);
        chunk_buffer = aligned_alloc(64, (size_t)((floats + 15) / 16 * 16) * sizeof(float));
        chunk_buffer_floats = chunk_buffer ? floats : 0;
    }
    return chunk_buffer;
}

/* The small-M FP8 GEMM with the weight on the left, in one call: d[:, rows] (bf16) = (x[rows] decoded) @ at for
 * chunks of `chunk` weight rows, handed to the threads one at a time, after the threads have decoded the
 * activations `a` [m, k] (1 x 128 scales) transposed into `at` [kp, m]. Each thread decodes its chunk into its own
 * buffer (it stays in the core's L2), multiplies it by `at` with a one-thread MKL
 * SGEMM ("NN": MKL's faster layout at small M) and writes the [rows, m] product transposed into d. Against torch
 * calls per chunk this drops ~7 us of Python per step and MKL's split of each small-M product over the threads
 * (M = 64, 160 x 1792 weight rows: 143 us on 2 threads vs 208 on one, where 104 would be a clean split).
 * Returns 0, or -1 when a buffer could not be allocated. */
int seekstack_fp8_gemm_weight_left(const int8_t *restrict a, int64_t m, int64_t a_stride,
                                   const float *restrict a_scales, int64_t as_stride, float *restrict at,
                                   const int8_t *restrict x, int64_t n, int64_t k, int64_t x_stride,
                                   const float *restrict scales, int64_t s_stride, int64_t gran, int64_t kp,
                                   uint16_t *restrict d, int64_t d_stride, int64_t chunk, int64_t threads,
                                   void *sgemm) {
    const sgemm_fn gemm_f = (sgemm_fn)sgemm;
    const int64_t chunks = (n + chunk - 1) / chunk;
    int failed = 0;
    #pragma omp parallel num_threads((int)threads) if (threads > 1)
    {
        float *w = thread_buffer(chunk * (kp + m));
        if (w == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        /* the activations first, decoded and transposed into at [kp, m] (the loop ends on a barrier) */
        #pragma omp for schedule(static)
        for (int64_t c0 = 0; c0 < kp; c0 += 128)
            decode_t_columns(a, m, k, a_stride, a_scales, as_stride, at, m, c0);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < chunks; i++) {
            if (w == NULL)
                continue;
            const int64_t r0 = i * chunk, nr = n - r0 < chunk ? n - r0 : chunk;
            float *prod = w + chunk * kp;
            seekstack_decode_e4m3_rows(x + r0 * x_stride, nr, k, x_stride, r0, scales, s_stride, gran, w, kp, kp, 1);
            const int64_t mm = m, nn = nr, kk = kp;
            const float one = 1.0f, zero = 0.0f;
            /* column-major view: prod^T [m, nr] = at^T-as-stored [m, kp] x w^T-as-stored [kp, nr] */
            gemm_f("N", "N", &mm, &nn, &kk, &one, at, &mm, w, &kk, &zero, prod, &mm);
            seekstack_f32_to_bf16_t(prod, nr, m, m, d + r0, d_stride, 1);
        }
    }
    return failed ? -1 : 0;
}

/* 1 when built with OpenMP (the tests check that the split over threads is real). */
int seekstack_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}
