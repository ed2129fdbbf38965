/* Part of cpu_decode.c (one translation unit): `attend_lanes`, items of 13-16 query rows held in the lanes of one
 * vector (every item of bf16 / fp16 / fp32 problems at h_q = 16 or 128). */

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
    const char *qrow[LANE_ROWS];
    int64_t limit[LANE_ROWS];
    const ItemKeys it = item_keys(pr, req, spos, g, r0, nrows, qrow, limit);
    const int32_t *slots = it.slots, *table = it.table;
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
    const int64_t stop = it.keys < k_end ? it.keys : k_end, end = it.len < k_end ? it.len : k_end;
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
