/* MLA decoding of bf16 / fp16 / fp32 queries over a paged cache of the same type or FP8 (DeepSeek-V3.2's 656-byte
 * layout), dense or sparse (per-query-position slot lists), on AVX-512 CPUs, for seekstack.mla's CPU path (built and
 * loaded by seekstack.cpu_native; the vectorised PyTorch path runs wherever this does not: head dims that are not
 * multiples of 32 / 64, no AVX-512, no compiler).
 *
 * Why C: the PyTorch path runs one step per group of requests as separate ops: gather the pages, widen them to
 * fp32 (PyTorch has no bf16-in/fp32-out CPU matmul), two MKL sgemms with 16-128 rows, softmax ops; at h_q = 16 a
 * key cost ~730 ns of one thread, ~300 of them gathering and widening pages. Here a tile of 16 keys is widened once
 * into L1-sized fp32 rows that both products read while they are in cache, and the softmax runs in registers.
 * (AVX512-BF16's VDPBF16PS, tried first for the scores, ran at half the fp32 FMA rate on this Xeon.)
 *
 * Work item: one request, one KV head and up to 16 query rows (64 with an FP8 cache; rows = s_q x h_q / h_kv as
 * FlashMLA counts them; row r is query position r / group, head g * group + r % group). Items of 13-16 rows (h_q =
 * 16 at s_q = 1, and every full block of larger problems) run `attend_lanes`: the rows in the lanes of one vector; per
 * tile of 16 keys
 * the scores are FMAs of a query column and a broadcast key value (no lane sums), the online softmax (base 2) runs
 * on the rows' vectors, and the loop widens the next tile and prefetches the one after between its FMAs; P V once
 * per 8 tiles. Items of fewer rows run `attend`, per tile of 16 keys:
 *   scores: 4 rows x 4 keys in 16 accumulators over d / 16 chunks (a key load feeds 4 FMAs), summed across lanes
 *           by a transpose-and-add tree, the quarters transposed into one vector of 16 scores per row;
 *   online softmax in base 2: running max m per row, sums kept 16 lanes wide, earlier sums and outputs rescaled by
 *           2^(m - m'), the rescale factors computed for 16 rows per exp2;
 *   P V: 4 rows x 64 output columns in 16 registers per pass over the tile's 16 V rows (the first dv columns of K).
 * Keys past the request's length are never read (cache slots there may hold NaN); the bottom-right causal
 * mask (query position s sees keys < length - (s_q - 1 - s)) and the length set masked scores to -inf. A row that
 * sees no key gets out = 0 and lse = +inf, as the reference. Threads (OpenMP, torch's own libgomp when loaded after
 * torch) take work items dynamically, longest first; with several threads long requests are split into pieces of
 * keys (split-KV) whose partial results are merged as FlashMLA's combine kernel merges them, so that a batch of one
 * request uses every thread (b = 1, h_q = 16, s_k = 32k: 3.95 ms on 2 threads vs 7.75 on one).
 *
 * One thread at h_q = 16, s_q = 1 (this Xeon, time-stamp counts at 2.3 GHz, b = 16, s_k = 256 / 1k / 4k): 16.6 /
 * 15.2 / 15.4 ns per (row, key) = 8.0-8.8 scores with the next tile's widening and prefetches (the scores' FMAs
 * alone: 6.6) + 5.9-6.2 P V (its FMAs: 5.9) + 0.3 softmax + 0.5-1.8 per item (query transposes, outputs).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SEEKSTACK_MLA_KERNEL 1
#include <immintrin.h>

#include "../gemm/e4m3.h" /* FP8 caches: e4m3 x power-of-two tile scale, exact in fp32 */
#else
#define SEEKSTACK_MLA_KERNEL 0
#endif

int seekstack_mla_supported(void) { return SEEKSTACK_MLA_KERNEL; }

#if SEEKSTACK_MLA_KERNEL

/* Items have at most LANE_ROWS query rows (one vector's lanes in `attend_lanes`): 16-row items run 9-16 % faster
 * than 64-row ones even at h_q = 128, where 64 rows shared each widened tile (h_q = 16, s_q = 2: 10-16 %). FP8
 * caches keep items of up to ROWS rows: their decode costs ~10 vector operations per 16 values, which 16 rows do
 * not repay (h_q = 128: 62-69 % of the roofline against 70-77 with 64 rows). */
enum { KT = 16, ROWS = 64, MAX_D = 1024, MIN_SPLIT = 512 };
/* `attend_lanes` takes items of 13-16 rows: it always does 16 rows' work (ns per (row, key), 2 threads, s_k = 1k:
 * 16 rows 20.0 vs 20.9 for the blocks, 12 rows 23.9 vs 22.7, 8 rows 32.3 vs 26.3). */
enum { LANE_ROWS = 16, LANE_MIN_ROWS = 13, LANE_STRIDE = MAX_D + 16 };
/* `attend_lanes` runs P V once per chunk of LANE_TILES tiles (128 keys): the outputs make one trip through the
 * cache per chunk instead of per tile (2 / 4 / 8 / 16 / 32 tiles: 0.95-0.96 / 0.95-0.96 / 0.95 / 0.99-1.02 / 1.07-1.23
 * of one P V per tile; past 16 the chunk's fp32 keys crowd L2). */
enum { LANE_TILES = 8 };

/* One vector of the 16 accumulators' horizontal sums, lane t = sum of a[t]. */
static inline __m512 sum16(const __m512 a[16]) {
    __m512 x[8], z[4];
    for (int p = 0; p < 8; p++) /* [a0+a2, b0+b2, a1+a3, b1+b3] per 128-bit quarter */
        x[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
    for (int p = 0; p < 4; p++) { /* [a, b, c, d] partial sums per quarter */
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(x[2 * p]), _mm512_castps_pd(x[2 * p + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(x[2 * p]), _mm512_castps_pd(x[2 * p + 1]));
        z[p] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x44), _mm512_shuffle_f32x4(z[0], z[1], 0xEE));
    __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x44), _mm512_shuffle_f32x4(z[2], z[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

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

typedef struct {
    const char *q;
    const char *k_cache; /* strides in bytes */
    const int32_t *block_table, *seqlens;
    char *out;
    float *lse;
    int64_t b, s_q, h_q, h_kv, d, dv, page;
    int64_t block_stride, row_stride, head_stride, table_stride;
    float scale_log2; /* softmax scale x log2(e) */
    int causal, fp8, dtype;
    int64_t esize; /* bytes of a q / out element (and of a non-FP8 cache's) */
    int64_t row_bytes; /* of one key row of one KV head: 2 d, or the FP8 layout's */
    const int32_t *indices; /* sparse decoding: [b, s_q, topk] cache slots, -1 = skip; NULL: dense */
    int64_t topk;
} Problem;

typedef struct {
    float *acc;        /* [ROWS][stride]: unnormalised outputs */
    float *v;          /* [KT][stride]: the tile's key rows in fp32 (V = their first dv columns) */
    float *qf;         /* [ROWS][stride]: the query rows in fp32 (`attend_lanes`: its columns, [d][16]) */
    float *lanes_tile; /* [2][LANE_TILES x KT][LANE_STRIDE]: `attend_lanes`' keys of two chunks */
    int64_t stride;    /* d + 16: rows 64 bytes off a multiple of 4 KiB, so 16 of them do not share L1 sets */
    float s[ROWS][KT]; /* the tile's scores */
    float p[ROWS][KT]; /* the tile's probabilities (2^(s - m)) */
    float alpha[ROWS]; /* 2^(m_old - m_new) of the tile */
    float m[ROWS], m_new[ROWS];
    float l[ROWS][16]; /* running sums, per lane */
} Workspace;

#define ACC(w, r) ((w)->acc + (r) * (w)->stride)
#define V(w, t) ((w)->v + (t) * (w)->stride)
#define QF(w, r) ((w)->qf + (r) * (w)->stride)

/* One split's unnormalised result, merged by `combine`: per row the running max, the sum and the outputs. */
typedef struct {
    float *m, *l, *acc; /* [rows], [rows], [rows][dv] for the block's rows (at most ROWS) */
} Partial;

/* The item's query rows (pointers into q) and causal limits (row r sees keys < limit[r]); returns the most keys any
 * row sees. */
static int64_t item_rows(const Problem *pr, const int32_t *slots, int64_t req, int64_t spos, int64_t g, int64_t r0,
                         int64_t nrows, const char **qrow, int64_t *limit) {
    const int64_t group = pr->h_q / pr->h_kv, len = slots ? pr->topk : pr->seqlens[req];
    int64_t keys = 0;
    for (int64_t r = 0; r < nrows; r++) {
        int64_t row = r0 + r, s = slots ? spos : row / group, h = slots ? g * group + row : g * group + row % group;
        qrow[r] = pr->q + ((req * pr->s_q + s) * pr->h_q + h) * pr->d * pr->esize;
        limit[r] = pr->causal ? len - (pr->s_q - 1 - s) : len;
        keys = limit[r] > keys ? limit[r] : keys;
    }
    return keys;
}

/* Widens keys j0 .. j0 + nk - 1 of the item into rows of `tile` (`tstride` floats apart) and prefetches the rows two
 * tiles ahead into L2. Returns the sparse entries of -1 among them: their V columns are zeroed (P V reads them with
 * probability 0, so they must be finite) and their scores are to be masked. */
static inline __mmask16 load_tile(const Problem *pr, const int32_t *slots, const int32_t *table, int64_t g,
                                  int64_t j0, int nk, int64_t end, float *tile, int64_t tstride) {
    /* page and offset of the tile's first key and of the key two tiles ahead (DRAM latency), stepped key by key */
    int64_t pg = j0 / pr->page, off = j0 % pr->page;
    int64_t pg_next = (j0 + 2 * KT) / pr->page, off_next = (j0 + 2 * KT) % pr->page;
    __mmask16 skipped = 0;
    for (int t = 0; t < KT; t++) {
        int64_t j = j0 + t;
        if (t < nk) {
            int64_t slot = slots ? slots[j] : 0;
            if (slot < 0) {
                skipped |= (__mmask16)(1u << t);
                memset(tile + t * tstride, 0, (size_t)pr->dv * sizeof(float));
            } else {
                const char *row = slots ? pr->k_cache + (slot / pr->page) * pr->block_stride +
                                              (slot % pr->page) * pr->row_stride + g * pr->head_stride
                                        : pr->k_cache + table[pg] * pr->block_stride + off * pr->row_stride +
                                              g * pr->head_stride;
                if (pr->fp8)
                    widen_fp8(row, pr->d, pr->dv, tile + t * tstride);
                else
                    widen_any(row, pr->d, pr->dtype, tile + t * tstride);
            }
        }
        if (j + 2 * KT < end && (!slots || slots[j + 2 * KT] >= 0)) {
            int64_t slot = slots ? slots[j + 2 * KT] : 0;
            const char *next = slots ? pr->k_cache + (slot / pr->page) * pr->block_stride +
                                           (slot % pr->page) * pr->row_stride + g * pr->head_stride
                                     : pr->k_cache + table[pg_next] * pr->block_stride + off_next * pr->row_stride +
                                           g * pr->head_stride;
            for (int64_t byte = 0; byte < pr->row_bytes; byte += 64)
                _mm_prefetch(next + byte, _MM_HINT_T1); /* to L2: 3 % faster than to L1 at h_q = 16 */
        }
        if (++off == pr->page) {
            off = 0;
            pg++;
        }
        if (++off_next == pr->page) {
            off_next = 0;
            pg_next++;
        }
    }
    return skipped;
}

/* P V of `attend`: acc[r] = acc[r] x alpha[r] + sum over the tile's nk keys t of p[r][t] x V[t], for rows r <
 * padded (a multiple of 4), 4 rows x 64 output columns in 16 registers per pass over the keys. */
static inline void pv_tile(Workspace *w, int64_t padded, int nk, int64_t dv) {
    for (int64_t r = 0; r < padded; r += 4) {
        for (int64_t c = 0; c < dv; c += 64) {
            __m512 o[4][4];
            for (int i = 0; i < 4; i++) {
                __m512 al = _mm512_set1_ps(w->alpha[r + i]);
                for (int e = 0; e < 4; e++)
                    o[i][e] = _mm512_mul_ps(_mm512_loadu_ps(ACC(w, r + i) + c + 16 * e), al);
            }
            for (int t = 0; t < nk; t++) {
                const float *vt = V(w, t) + c;
                __m512 v0 = _mm512_loadu_ps(vt), v1 = _mm512_loadu_ps(vt + 16);
                __m512 v2 = _mm512_loadu_ps(vt + 32), v3 = _mm512_loadu_ps(vt + 48);
                for (int i = 0; i < 4; i++) {
                    __m512 pi = _mm512_set1_ps(w->p[r + i][t]);
                    o[i][0] = _mm512_fmadd_ps(pi, v0, o[i][0]);
                    o[i][1] = _mm512_fmadd_ps(pi, v1, o[i][1]);
                    o[i][2] = _mm512_fmadd_ps(pi, v2, o[i][2]);
                    o[i][3] = _mm512_fmadd_ps(pi, v3, o[i][3]);
                }
            }
            for (int i = 0; i < 4; i++)
                for (int e = 0; e < 4; e++)
                    _mm512_storeu_ps(ACC(w, r + i) + c + 16 * e, o[i][e]);
        }
    }
}

/* The item's results from each row's running max m (base 2), sum l and unnormalised outputs: out and lse, or the
 * split's partial. */
static void finish(const Problem *pr, Workspace *w, const int32_t *slots, int64_t req, int64_t spos, int64_t g,
                   int64_t r0, int64_t nrows, const float *m, const float *l, const Partial *part) {
    const int64_t group = pr->h_q / pr->h_kv, dv = pr->dv;
    for (int64_t r = 0; r < nrows; r++) {
        if (part != NULL) {
            part->m[r] = m[r];
            part->l[r] = l[r];
            memcpy(part->acc + r * dv, ACC(w, r), (size_t)dv * sizeof(float));
            continue;
        }
        int64_t row = r0 + r, s = slots ? spos : row / group, h = slots ? g * group + row : g * group + row % group;
        char *o = pr->out + ((req * pr->s_q + s) * pr->h_q + h) * dv * pr->esize;
        float *lse = pr->lse + (req * pr->h_q + h) * pr->s_q + s;
        if (l[r] == 0.0f) {
            memset(o, 0, (size_t)(dv * pr->esize));
            *lse = INFINITY;
            continue;
        }
        store_row(ACC(w, r), dv, 1.0f / l[r], pr->dtype, o);
        *lse = (m[r] + log2f(l[r])) * 0.69314718055994531f;
    }
}

/* A work item: keys [k_begin, k_end) of request `req`'s pages (dense) or of query position `spos`'s slot list
 * (sparse), for KV head g and rows r0 .. r0 + nrows. Writes out / lse, or `part` when the keys are split. */
static void attend(const Problem *pr, Workspace *w, int64_t req, int64_t spos, int64_t g, int64_t r0, int64_t nrows,
                   int64_t k_begin, int64_t k_end, const Partial *part) {
    const int64_t d = pr->d, dv = pr->dv;
    const int32_t *slots = pr->indices ? pr->indices + (req * pr->s_q + spos) * pr->topk : NULL;
    const int32_t *table = slots ? NULL : pr->block_table + req * pr->table_stride;
    const int64_t len = slots ? pr->topk : pr->seqlens[req];
    const char *qrow[ROWS];
    int64_t limit[ROWS];
    const int64_t keys = item_rows(pr, slots, req, spos, g, r0, nrows, qrow, limit);
    for (int64_t r = 0; r < nrows; r++) {
        widen_any(qrow[r], d, pr->dtype, QF(w, r));
        w->m[r] = -INFINITY;
        memset(w->l[r], 0, sizeof w->l[r]);
        memset(ACC(w, r), 0, (size_t)dv * sizeof(float));
    }
    const int64_t padded = (nrows + 3) & ~(int64_t)3; /* P V works on 4 rows: pad with zero probabilities */
    for (int64_t r = nrows; r < padded; r++) {
        memset(w->p[r], 0, sizeof w->p[r]);
        memset(ACC(w, r), 0, (size_t)dv * sizeof(float));
        w->alpha[r] = 1.0f;
    }
    const __m512 scale = _mm512_set1_ps(pr->scale_log2), minus_inf = _mm512_set1_ps(-INFINITY);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const int64_t stop = keys < k_end ? keys : k_end, end = len < k_end ? len : k_end;
    for (int64_t j0 = k_begin; j0 < stop; j0 += KT) {
        /* Keys of the tile inside the range; the rest of a last tile is neither read nor used (masked scores,
         * P V stops at nk). */
        const int nk = end - j0 < KT ? (int)(end - j0) : KT;
        const __mmask16 skipped = load_tile(pr, slots, table, g, j0, nk, end, w->v, w->stride);
        /* Scores for 4 rows x 4 keys at a time in 16 registers: each load feeds 4 FMAs. */
        for (int64_t r = 0; r < nrows; r += 4) {
            const float *qr[4];
            for (int i = 0; i < 4; i++)
                qr[i] = QF(w, r + i < nrows ? r + i : r);
            for (int grp = 0; grp < KT / 16; grp++) {
                __m512 v[4];
                for (int kq = 0; kq < 4; kq++) {
                    if (16 * grp + 4 * kq >= nk) { /* past the request: masked below */
                        v[kq] = _mm512_setzero_ps();
                        continue;
                    }
                    __m512 a[16];
                    for (int i = 0; i < 16; i++)
                        a[i] = _mm512_setzero_ps();
                    const float *k4 = V(w, 16 * grp + 4 * kq);
                    for (int64_t c = 0; c < d; c += 16) {
                        __m512 x0 = _mm512_loadu_ps(qr[0] + c), x1 = _mm512_loadu_ps(qr[1] + c);
                        __m512 x2 = _mm512_loadu_ps(qr[2] + c), x3 = _mm512_loadu_ps(qr[3] + c);
                        for (int t = 0; t < 4; t++) {
                            __m512 kv = _mm512_loadu_ps(k4 + t * w->stride + c);
                            a[t] = _mm512_fmadd_ps(x0, kv, a[t]);
                            a[4 + t] = _mm512_fmadd_ps(x1, kv, a[4 + t]);
                            a[8 + t] = _mm512_fmadd_ps(x2, kv, a[8 + t]);
                            a[12 + t] = _mm512_fmadd_ps(x3, kv, a[12 + t]);
                        }
                    }
                    v[kq] = sum16(a); /* 128-bit quarter i: row r + i, keys 4 kq .. 4 kq + 3 of the group */
                }
                /* a 4 x 4 transpose of the quarters: row i = quarter i of v[0..3] */
                __m512 t0 = _mm512_shuffle_f32x4(v[0], v[1], 0x44), t1 = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
                __m512 t2 = _mm512_shuffle_f32x4(v[2], v[3], 0x44), t3 = _mm512_shuffle_f32x4(v[2], v[3], 0xEE);
                __m512 rows4[4] = {_mm512_shuffle_f32x4(t0, t2, 0x88), _mm512_shuffle_f32x4(t0, t2, 0xDD),
                                   _mm512_shuffle_f32x4(t1, t3, 0x88), _mm512_shuffle_f32x4(t1, t3, 0xDD)};
                for (int i = 0; i < 4 && r + i < nrows; i++)
                    _mm512_storeu_ps(w->s[r + i] + 16 * grp, rows4[i]);
            }
        }
        /* Online softmax. Per row: scale, mask the tile's tail, the new running max. */
        for (int64_t r = 0; r < nrows; r++) {
            __m512 top = minus_inf;
            for (int grp = 0; grp < KT / 16; grp++) {
                __m512 s = _mm512_mul_ps(_mm512_loadu_ps(w->s[r] + 16 * grp), scale);
                int64_t first = j0 + 16 * grp;
                if (first + 16 > limit[r] || skipped) {
                    __mmask16 dead = _mm512_cmpge_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)first)),
                                                             _mm512_set1_epi32((int32_t)(limit[r] < 0 ? 0 : limit[r])));
                    s = _mm512_mask_blend_ps(dead | (__mmask16)(skipped >> (16 * grp)), s, minus_inf);
                }
                _mm512_storeu_ps(w->s[r] + 16 * grp, s);
                top = _mm512_max_ps(top, s);
            }
            float tile_max = _mm512_reduce_max_ps(top);
            w->m_new[r] = tile_max > w->m[r] ? tile_max : w->m[r];
        }
        /* The rescale factors 2^(m - m'), 16 rows per exp2 (1 for rows that have seen no key: m' = -inf). */
        for (int64_t r = 0; r < nrows; r += 16) {
            __mmask16 live = nrows - r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nrows - r)) - 1u);
            __m512 m_old = _mm512_mask_loadu_ps(minus_inf, live, w->m + r);
            __m512 m_new = _mm512_mask_loadu_ps(minus_inf, live, w->m_new + r);
            __mmask16 none = _mm512_cmpeq_ps_mask(m_new, minus_inf);
            __m512 alpha = _mm512_mask_blend_ps(none, exp2_ps(_mm512_sub_ps(m_old, m_new)), _mm512_set1_ps(1.0f));
            _mm512_mask_storeu_ps(w->alpha + r, live, alpha);
            _mm512_mask_storeu_ps(w->m + r, live, m_new);
        }
        /* The probabilities; the running sums stay 16 lanes wide (summed once at the end). */
        for (int64_t r = 0; r < nrows; r++) {
            if (w->m[r] == -INFINITY) {
                memset(w->p[r], 0, sizeof w->p[r]);
                continue;
            }
            __m512 m = _mm512_set1_ps(w->m[r]);
            __m512 l = _mm512_mul_ps(_mm512_loadu_ps(w->l[r]), _mm512_set1_ps(w->alpha[r]));
            for (int grp = 0; grp < KT / 16; grp++) {
                __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(w->s[r] + 16 * grp), m));
                l = _mm512_add_ps(l, p);
                _mm512_storeu_ps(w->p[r] + 16 * grp, p);
            }
            _mm512_storeu_ps(w->l[r], l);
        }
        pv_tile(w, padded, nk, dv);
    }
    float sums[ROWS];
    for (int64_t r = 0; r < nrows; r++)
        sums[r] = _mm512_reduce_add_ps(_mm512_loadu_ps(w->l[r]));
    finish(pr, w, slots, req, spos, g, r0, nrows, w->m, sums, part);
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

/* P V of `attend_lanes`: acc = acc x alpha + P V over a chunk's nk keys (tile rows, probabilities pt key-major),
 * all 16 rows x 16 output columns in 16 registers per pass over the keys, so each V vector is loaded once (1 %
 * faster than `pv_tile`'s 4 x 64 per tile). */
static inline void pv_lanes(Workspace *w, int nk, int64_t dv, const float *tile, const float *pt) {
    for (int64_t c = 0; c < dv; c += 16) {
        __m512 o[LANE_ROWS];
        for (int i = 0; i < LANE_ROWS; i++)
            o[i] = _mm512_mul_ps(_mm512_loadu_ps(ACC(w, i) + c), _mm512_set1_ps(w->alpha[i]));
        for (int t = 0; t < nk; t++) {
            const __m512 v = _mm512_loadu_ps(tile + t * LANE_STRIDE + c);
            for (int i = 0; i < LANE_ROWS; i++)
                o[i] = _mm512_fmadd_ps(_mm512_set1_ps(pt[16 * t + i]), v, o[i]);
        }
        for (int i = 0; i < LANE_ROWS; i++)
            _mm512_storeu_ps(ACC(w, i) + c, o[i]);
    }
}

/* An all-zero bf16 key row: the source of keys past a request's end and of sparse entries of -1 in `attend_lanes`'
 * fused loop (their scores are masked; P V must read finite zeros). */
static const uint16_t zero_row[MAX_D];

/* The source rows of keys j .. j + KT - 1 (dense: through the block table; sparse: the slot list); `zero_row` for
 * keys at or past `end` and for sparse entries of -1, which are returned as the skipped keys. */
static inline __mmask16 tile_rows(const Problem *pr, const int32_t *slots, const int32_t *table, int64_t g, int64_t j,
                                  int64_t end, const char **rows) {
    __mmask16 skipped = 0;
    int64_t pg = j / pr->page, off = j % pr->page;
    for (int t = 0; t < KT; t++, j++) {
        const char *row = (const char *)zero_row;
        if (j < end && slots == NULL)
            row = pr->k_cache + table[pg] * pr->block_stride + off * pr->row_stride + g * pr->head_stride;
        else if (j < end && slots[j] < 0)
            skipped |= (__mmask16)(1u << t);
        else if (j < end)
            row = pr->k_cache + (slots[j] / pr->page) * pr->block_stride + (slots[j] % pr->page) * pr->row_stride +
                  g * pr->head_stride;
        rows[t] = row;
        if (++off == pr->page) {
            off = 0;
            pg++;
        }
    }
    return skipped;
}

/* One tile of `attend_lanes`: the scores of keys j0 .. j0 + nk - 1 (rows of `tile`, in fp32), their probabilities
 * 2^(s - m') written key-major into pt (16 rows per key), the running max m and sums l updated (per row, in lanes);
 * returns the rescale factors 2^(m - m').
 * With `next` (bf16 caches), the score loop also widens the next tile's source rows `next` into `next_tile`, one
 * 32-value piece per two columns, and prefetches the rows `ahead` of the tile after it into L2, one line per two
 * columns: spread over the FMAs, that memory work overlaps them, where a tile widened and prefetched in one burst
 * waited on the core's fill buffers (h_q = 16, s_q = 1: 16-20 % less time per key). */
static inline __m512 lane_probs(const Problem *pr, int64_t j0, int nk, __mmask16 skipped, int64_t d, const float *qt,
                                const float *tile, float *pt, __m512i limits, int64_t min_limit, __m512 *m_io,
                                __m512 *l_io, const char *const *next, float *next_tile, const char *const *ahead) {
    const __m512 scale = _mm512_set1_ps(pr->scale_log2), minus_inf = _mm512_set1_ps(-INFINITY);
    /* Rows past nk hold finite values (zeros, or earlier keys): their scores are masked below. */
    __m512 s[KT];
    for (int t = 0; t < KT; t++)
        s[t] = _mm512_setzero_ps();
    if (next != NULL) {
        const __m512i zero = _mm512_setzero_si512();
        int wk = 0, wc = 0; /* the next tile's key and column of this step's piece */
        for (int64_t c = 0; c < d; c += 2) {
            for (int h = 0; h < 2; h++) {
                const __m512 column = _mm512_load_ps(qt + 16 * (c + h));
                for (int t = 0; t < KT; t++)
                    s[t] = _mm512_fmadd_ps(_mm512_set1_ps(tile[t * LANE_STRIDE + c + h]), column, s[t]);
            }
            const __m512i x = _mm512_loadu_si512((const uint16_t *)next[wk] + wc);
            float *dst = next_tile + wk * LANE_STRIDE + wc;
            _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, x))); /* `widen`'s order */
            _mm512_storeu_ps(dst + 16, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, x)));
            _mm_prefetch(ahead[wk] + 2 * wc, _MM_HINT_T1);
            wc += 32;
            if (wc == d) {
                wc = 0;
                wk++;
            }
        }
    } else {
        for (int64_t c = 0; c < d; c++) {
            const __m512 column = _mm512_load_ps(qt + 16 * c);
            for (int t = 0; t < KT; t++)
                s[t] = _mm512_fmadd_ps(_mm512_set1_ps(tile[t * LANE_STRIDE + c]), column, s[t]);
        }
    }
    const int masked = j0 + KT > min_limit || nk < KT || skipped;
    const __m512 m = *m_io;
    __m512 top = m;
    for (int t = 0; t < KT; t++) {
        s[t] = _mm512_mul_ps(s[t], scale);
        if (masked) {
            __mmask16 dead = _mm512_cmpge_epi32_mask(_mm512_set1_epi32((int32_t)(j0 + t)), limits);
            if (t >= nk || (skipped >> t) & 1)
                dead = (__mmask16)0xFFFF;
            s[t] = _mm512_mask_blend_ps(dead, s[t], minus_inf);
        }
        top = _mm512_max_ps(top, s[t]);
    }
    /* rows that have seen no key keep m = -inf, alpha = 1 and p = 0 */
    const __mmask16 none = _mm512_cmpeq_ps_mask(top, minus_inf);
    const __m512 alpha = _mm512_mask_blend_ps(none, exp2_ps(_mm512_sub_ps(m, top)), _mm512_set1_ps(1.0f));
    const __m512 base = _mm512_maskz_mov_ps((__mmask16)~none, top);
    __m512 l = _mm512_mul_ps(*l_io, alpha);
    for (int t = 0; t < KT; t++) {
        __m512 p = exp2_ps(_mm512_sub_ps(s[t], base));
        l = _mm512_add_ps(l, p);
        _mm512_storeu_ps(pt + 16 * t, p);
    }
    *m_io = top;
    *l_io = l;
    return alpha;
}

/* `attend` for items of at most LANE_ROWS rows (h_q = 16 at s_q = 1, the commonest decode shape), with the rows in
 * the lanes of one vector. A key's scores for all rows are d FMAs of a query column (rows x 1) and the key's value
 * broadcast from the tile: no lane sums, and in L1 the FMAs run at the core's peak (0.183 ns each here, against
 * 0.205 for the 4 x 4 blocks before their sums). The tile's rows are LANE_STRIDE floats apart, a constant: 16 row
 * addresses from one register (with a run-time stride gcc spilled them: 0.24 ns per FMA). The online softmax runs
 * on the rows' vectors: one max and one exp2 per key for all rows. P V (`pv_lanes`) runs once per chunk of
 * LANE_TILES tiles; chunks alternate between two buffers, so that a chunk's last tile can widen the next chunk's
 * first while P V still reads its own. */
static void attend_lanes(const Problem *pr, Workspace *w, int64_t req, int64_t spos, int64_t g, int64_t r0,
                         int64_t nrows, int64_t k_begin, int64_t k_end, const Partial *part) {
    const int64_t d = pr->d, dv = pr->dv;
    const int32_t *slots = pr->indices ? pr->indices + (req * pr->s_q + spos) * pr->topk : NULL;
    const int32_t *table = slots ? NULL : pr->block_table + req * pr->table_stride;
    const int64_t len = slots ? pr->topk : pr->seqlens[req];
    const char *qrow[LANE_ROWS];
    int64_t limit[LANE_ROWS];
    const int64_t keys = item_rows(pr, slots, req, spos, g, r0, nrows, qrow, limit);
    float *qt = w->qf; /* qt[c][r]: the query columns, zero in unused lanes */
    int32_t lim[LANE_ROWS];
    int64_t min_limit = INT64_MAX;
    for (int64_t r = 0; r < LANE_ROWS; r++) { /* the rows go through the first tile's rows to be transposed */
        if (r < nrows)
            widen_any(qrow[r], d, pr->dtype, w->lanes_tile + r * LANE_STRIDE);
        else
            memset(w->lanes_tile + r * LANE_STRIDE, 0, (size_t)d * sizeof(float));
        int64_t lr = r < nrows ? (limit[r] < 0 ? 0 : limit[r]) : 0; /* unused lanes see no key */
        lim[r] = (int32_t)lr;
        min_limit = r < nrows && lr < min_limit ? lr : min_limit;
    }
    for (int64_t c = 0; c < d; c += 16)
        transpose16(w->lanes_tile + c, LANE_STRIDE, qt + 16 * c);
    for (int64_t r = 0; r < LANE_ROWS; r++) /* unused lanes: p = 0, alpha = 1 keep them 0 */
        memset(ACC(w, r), 0, (size_t)dv * sizeof(float));
    const __m512i limits = _mm512_loadu_si512(lim);
    __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
    float pt[LANE_TILES * KT * LANE_ROWS] __attribute__((aligned(64))); /* the chunk's probabilities */
    const int64_t stop = keys < k_end ? keys : k_end, end = len < k_end ? len : k_end;
    const int64_t tiles = stop > k_begin ? (stop - k_begin + KT - 1) / KT : 0;
    const int fused = pr->dtype == BF16 && !pr->fp8; /* the next tile widened inside the score loop */
    const char *next[KT], *ahead[KT];
    __mmask16 skipped = 0, skipped_next = 0;
    if (fused && tiles > 0) { /* the first tile now, the second to L2 (widened during the first's scores) */
        const char *first[KT];
        skipped = tile_rows(pr, slots, table, g, k_begin, end, first);
        skipped_next = tile_rows(pr, slots, table, g, k_begin + KT, end, next);
        for (int t = 0; t < KT; t++) {
            widen((const uint16_t *)first[t], d, w->lanes_tile + t * LANE_STRIDE);
            for (int64_t byte = 0; byte < pr->row_bytes; byte += 64)
                _mm_prefetch(next[t] + byte, _MM_HINT_T1);
        }
    }
#define LANE_TILE(i) (w->lanes_tile + (((i) / LANE_TILES) % 2 * LANE_TILES + (i) % LANE_TILES) * KT * LANE_STRIDE)
    for (int64_t i0 = 0; i0 < tiles; i0 += LANE_TILES) {
        __m512 alphas[LANE_TILES];
        int n = 0, nk = 0;
        for (; n < LANE_TILES && i0 + n < tiles; n++) {
            const int64_t i = i0 + n, jt = k_begin + i * KT;
            const int nkt = end - jt < KT ? (int)(end - jt) : KT;
            const int more = i + 1 < tiles;
            if (fused && more) {
                const __mmask16 skipped_ahead = tile_rows(pr, slots, table, g, jt + 2 * KT, end, ahead);
                alphas[n] = lane_probs(pr, jt, nkt, skipped, d, qt, LANE_TILE(i), pt + n * KT * 16, limits, min_limit,
                                       &m, &l, next, LANE_TILE(i + 1), ahead);
                skipped = skipped_next;
                skipped_next = skipped_ahead;
                memcpy(next, ahead, sizeof next);
            } else {
                if (!fused)
                    skipped = load_tile(pr, slots, table, g, jt, nkt, end, LANE_TILE(i), LANE_STRIDE);
                alphas[n] = lane_probs(pr, jt, nkt, skipped, d, qt, LANE_TILE(i), pt + n * KT * 16, limits, min_limit,
                                       &m, &l, NULL, NULL, NULL);
            }
            nk = n * KT + nkt;
        }
        /* every tile's probabilities made relative to the chunk's final max; f ends as the outputs' rescale */
        __m512 f = _mm512_set1_ps(1.0f);
        for (int tt = n - 1; tt >= 0; tt--) {
            if (tt < n - 1)
                for (int t = 0; t < KT; t++) {
                    float *pp = pt + (tt * KT + t) * 16;
                    _mm512_storeu_ps(pp, _mm512_mul_ps(_mm512_loadu_ps(pp), f));
                }
            f = _mm512_mul_ps(f, alphas[tt]);
        }
        _mm512_storeu_ps(w->alpha, f);
        pv_lanes(w, nk, dv, LANE_TILE(i0), pt);
    }
#undef LANE_TILE
    float ms[LANE_ROWS], sums[LANE_ROWS];
    _mm512_storeu_ps(ms, m);
    _mm512_storeu_ps(sums, l);
    finish(pr, w, slots, req, spos, g, r0, nrows, ms, sums, part);
}

/* This thread's workspace, kept across calls (OpenMP's and torch's threads live as long as the process): allocating
 * and first touching it per call (~340 KB then; ~1.2 MB now, mostly the lanes' two chunks) cost ~5 % of a call at
 * h_q = 16, s_k = 256. */
static _Thread_local Workspace *thread_workspace;

static Workspace *workspace(int64_t d) {
    Workspace *w = thread_workspace;
    if (w != NULL && w->stride == d + 16)
        return w;
    if (w != NULL) {
        free(w->acc);
        free(w);
    }
    thread_workspace = NULL;
    w = malloc(sizeof(Workspace));
    if (w == NULL)
        return NULL;
    w->stride = d + 16;
    const size_t lane_floats = (size_t)2 * LANE_TILES * KT * LANE_STRIDE; /* two chunks */
    w->acc = aligned_alloc(64, ((size_t)(2 * ROWS + KT) * (size_t)w->stride + lane_floats) * sizeof(float));
    if (w->acc == NULL) {
        free(w);
        return NULL;
    }
    w->v = w->acc + ROWS * w->stride;
    w->qf = w->v + KT * w->stride;
    w->lanes_tile = w->qf + ROWS * w->stride;
    memset(w->lanes_tile, 0, lane_floats * sizeof(float)); /* rows past a last tile's keys are read (and masked) */
    return thread_workspace = w;
}

/* Merges the `n` partials of one (unit, KV head, row block) into out / lse: each split's sums and outputs weighted
 * by 2^(m_split - m_max), as FlashMLA's combine kernel does. */
static void combine(const Problem *pr, const Partial *parts, int64_t n, int64_t req, int64_t spos, int64_t g,
                    int64_t r0, int64_t nrows, float *scratch) {
    const int64_t group = pr->h_q / pr->h_kv, dv = pr->dv;
    for (int64_t r = 0; r < nrows; r++) {
        int64_t row = r0 + r, s = spos >= 0 ? spos : row / group;
        int64_t h = spos >= 0 ? g * group + row : g * group + row % group;
        char *o = pr->out + ((req * pr->s_q + s) * pr->h_q + h) * dv * pr->esize;
        float *lse = pr->lse + (req * pr->h_q + h) * pr->s_q + s;
        float top = -INFINITY, l = 0.0f;
        for (int64_t i = 0; i < n; i++)
            top = parts[i].m[r] > top ? parts[i].m[r] : top;
        if (top == -INFINITY) { /* no split saw a key */
            memset(o, 0, (size_t)(dv * pr->esize));
            *lse = INFINITY;
            continue;
        }
        memset(scratch, 0, (size_t)dv * sizeof(float));
        for (int64_t i = 0; i < n; i++) {
            if (parts[i].l[r] == 0.0f)
                continue;
            float weight = exp2f(parts[i].m[r] - top);
            l += parts[i].l[r] * weight;
            const __m512 wv = _mm512_set1_ps(weight);
            for (int64_t c = 0; c < dv; c += 16)
                _mm512_storeu_ps(scratch + c, _mm512_fmadd_ps(_mm512_loadu_ps(parts[i].acc + r * dv + c), wv,
                                                              _mm512_loadu_ps(scratch + c)));
        }
        store_row(scratch, dv, 1.0f / l, pr->dtype, o);
        *lse = (top + log2f(l)) * 0.69314718055994531f;
    }
}

typedef struct {
    int64_t unit, g, r0; /* a request (sparse: a request's query position), a KV head, a block of rows */
} Block;

typedef struct {
    int64_t keys; /* k_end - k_begin: the sort key */
    Block at;
    int64_t k_begin, k_end;
    int64_t part; /* index into the partials, or -1: writes out / lse itself */
} Item;

typedef struct {
    Block at;
    int64_t first, n; /* partials first .. first + n - 1 */
} Merge;

/* A block's request, query position (sparse; -1 when dense) and number of rows. */
static void locate(const Problem *pr, int64_t rows, int64_t block, Block at, int64_t *req, int64_t *spos,
                   int64_t *nrows) {
    *req = pr->indices ? at.unit / pr->s_q : at.unit;
    *spos = pr->indices ? at.unit % pr->s_q : -1;
    *nrows = rows - at.r0 < block ? rows - at.r0 : block;
}

static int longer_first(const void *a, const void *b) {
    int64_t la = ((const Item *)a)->keys, lb = ((const Item *)b)->keys;
    return la < lb ? 1 : la > lb ? -1 : 0;
}

/* Returns 0, or -1 when the sizes are outside what the kernel handles (the caller then runs the PyTorch path).
 * `lanes`: < 0 lets items of LANE_MIN_ROWS .. LANE_ROWS rows run `attend_lanes`; 0 never, > 0 whenever they have at
 * most LANE_ROWS rows (the tests run both paths on the same problems). */
int seekstack_mla_decode(const char *q, const char *k_cache, const int32_t *block_table, const int32_t *seqlens,
                         char *out, float *lse, int64_t b, int64_t s_q, int64_t h_q, int64_t h_kv, int64_t d,
                         int64_t dv, int64_t page, int64_t block_stride, int64_t row_stride, int64_t head_stride,
                         int64_t table_stride, float softmax_scale, int64_t causal, int64_t fp8,
                         const int32_t *indices, int64_t topk, int64_t split_keys, int64_t dtype, int64_t threads,
                         int64_t lanes) {
    if (d % 32 || dv % 64 || dv > d || d > MAX_D || h_kv < 1 || h_q % h_kv || page < 1)
        return -1;
    if (fp8 && (dv % 128 || (d - dv) % 32))
        return -1;
    if (dtype < BF16 || dtype > FP32)
        return -1;
    const int64_t esize = dtype == FP32 ? 4 : 2;
    Problem pr = {q, k_cache, block_table, seqlens, out, lse, b, s_q, h_q, h_kv, d, dv, page,
                  block_stride, row_stride, head_stride, table_stride, softmax_scale * 1.4426950408889634f,
                  (int)causal, (int)fp8, (int)dtype, esize, fp8 ? dv + 4 * (dv / 128) + 2 * (d - dv) : esize * d,
                  indices, topk};
    /* Dense: a request's s_q x group rows share its keys. Sparse: each (request, query position) has its own slot
     * list and the group's rows. */
    const int64_t units = indices ? b * s_q : b;
    const int64_t rows = indices ? h_q / h_kv : s_q * (h_q / h_kv), block = fp8 ? ROWS : LANE_ROWS;
    const int64_t row_blocks = (rows + block - 1) / block;
    /* Split-KV (FlashMLA's scheduler does the same over SMs): with several threads, keys are cut into pieces of at
     * least MIN_SPLIT so that ~4 pieces per thread exist; a batch of one long request then uses every thread.
     * `split_keys` > 0 forces the piece size (the tests). */
    int64_t total = 0;
    for (int64_t u = 0; u < units; u++)
        total += (indices ? topk : seqlens[u]) * h_kv * row_blocks;
    int64_t piece = INT64_MAX;
    if (split_keys > 0)
        piece = split_keys;
    else if (threads > 1) {
        piece = total / (4 * threads) + 1;
        piece = piece < MIN_SPLIT ? MIN_SPLIT : piece;
    }
    piece = piece < INT64_MAX - KT ? (piece + KT - 1) / KT * KT : piece;
    int64_t n_items = 0, n_parts = 0, n_merges = 0;
    for (int64_t u = 0; u < units; u++) {
        int64_t len = indices ? topk : seqlens[u], n = len > piece ? (len + piece - 1) / piece : 1;
        n_items += n * h_kv * row_blocks;
        if (n > 1) {
            n_parts += n * h_kv * row_blocks;
            n_merges += h_kv * row_blocks;
        }
    }
    Item *items = malloc((size_t)(n_items > 0 ? n_items : 1) * sizeof(Item));
    Merge *merges = malloc((size_t)(n_merges > 0 ? n_merges : 1) * sizeof(Merge));
    Partial *parts = malloc((size_t)(n_parts > 0 ? n_parts : 1) * sizeof(Partial));
    /* a partial holds one block's rows */
    const int64_t block_rows = rows < block ? rows : block;
    float *part_data = n_parts ? malloc((size_t)n_parts * block_rows * (size_t)(dv + 2) * sizeof(float)) : NULL;
    if (items == NULL || merges == NULL || parts == NULL || (n_parts && part_data == NULL)) {
        free(items), free(merges), free(parts), free(part_data);
        return -2;
    }
    int64_t it = 0, ip = 0, im = 0;
    for (int64_t u = 0; u < units; u++) {
        int64_t len = indices ? topk : seqlens[u], n = len > piece ? (len + piece - 1) / piece : 1;
        for (int64_t g = 0; g < h_kv; g++)
            for (int64_t r0 = 0; r0 < rows; r0 += block) {
                if (n > 1)
                    merges[im++] = (Merge){{u, g, r0}, ip, n};
                for (int64_t k = 0; k < n; k++) {
                    int64_t k_begin = n > 1 ? k * piece : 0, k_end = n > 1 && k + 1 < n ? (k + 1) * piece : INT64_MAX;
                    int64_t part = -1;
                    if (n > 1) {
                        float *base = part_data + ip * block_rows * (dv + 2);
                        parts[ip] = (Partial){base, base + block_rows, base + 2 * block_rows};
                        part = ip++;
                    }
                    int64_t span = (k_end < len ? k_end : len) - k_begin;
                    items[it++] = (Item){span, {u, g, r0}, k_begin, k_end, part};
                }
            }
    }
    qsort(items, (size_t)n_items, sizeof(Item), longer_first); /* longest first: the threads finish together */
    int failed = 0;
#pragma omp parallel num_threads((int)threads) if (threads > 1)
    {
        Workspace *w = workspace(d);
        if (w == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_items; i++) {
            if (w == NULL)
                continue;
            const Item *item = &items[i];
            int64_t req, spos, nrows;
            locate(&pr, rows, block, item->at, &req, &spos, &nrows);
            int in_lanes = nrows <= LANE_ROWS && (lanes > 0 || (lanes < 0 && nrows >= LANE_MIN_ROWS));
            (in_lanes ? attend_lanes : attend)(
                &pr, w, req, spos, item->at.g, item->at.r0, nrows, item->k_begin, item->k_end,
                item->part >= 0 ? &parts[item->part] : NULL);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_merges; i++) {
            if (w == NULL)
                continue;
            const Merge *mg = &merges[i];
            int64_t req, spos, nrows;
            locate(&pr, rows, block, mg->at, &req, &spos, &nrows);
            combine(&pr, parts + mg->first, mg->n, req, spos, mg->at.g, mg->at.r0, nrows, ACC(w, 0));
        }
    }
    free(items), free(merges), free(parts), free(part_data);
    return failed ? -2 : 0;
}

#else
int seekstack_mla_decode(void) { return -1; }
#endif
