/* Part of cpu_decode.c (one translation unit): `attend`, items of up to ROWS query rows in 4 x 4 register blocks
 * (items of fewer than LANE_MIN_ROWS rows, and FP8 caches' 64-row items). */

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

/* A work item: keys [k_begin, k_end) of request `req`'s pages (dense) or of query position `spos`'s slot list
 * (sparse), for KV head g and rows r0 .. r0 + nrows. Writes out / lse, or `part` when the keys are split. */
static void attend(const Problem *pr, Workspace *w, int64_t req, int64_t spos, int64_t g, int64_t r0, int64_t nrows,
                   int64_t k_begin, int64_t k_end, const Partial *part) {
    const int64_t d = pr->d, dv = pr->dv;
    const char *qrow[ROWS];
    int64_t limit[ROWS];
    const ItemKeys it = item_keys(pr, req, spos, g, r0, nrows, qrow, limit);
    const int32_t *slots = it.slots;
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
    const int64_t stop = it.keys < k_end ? it.keys : k_end, end = it.len < k_end ? it.len : k_end;
    for (int64_t j0 = k_begin; j0 < stop; j0 += KT) {
        /* Keys of the tile inside the range; the rest of a last tile is neither read nor used (masked scores,
         * P V stops at nk). */
        const int nk = end - j0 < KT ? (int)(end - j0) : KT;
        const __mmask16 skipped = load_tile(pr, slots, it.table, g, j0, nk, end, w->v, w->stride);
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
