/* Part of cpu_decode.c (one translation unit): the problem, the per-thread workspace, and what both paths do per
 * work item: its query rows and limits, the source rows of its tiles of keys, widening a tile, writing results. */

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

/* What an item reads: its slot list (sparse) or block-table row (dense), the keys of its request (or list) and the
 * most keys any of its rows sees. `item_keys` also fills the rows' pointers into q and their causal limits (row r
 * sees keys < limit[r]). */
typedef struct {
    const int32_t *slots, *table;
    int64_t len, keys;
} ItemKeys;

static ItemKeys item_keys(const Problem *pr, int64_t req, int64_t spos, int64_t g, int64_t r0, int64_t nrows,
                          const char **qrow, int64_t *limit) {
    ItemKeys it = {NULL, NULL, 0, 0};
    it.slots = pr->indices ? pr->indices + (req * pr->s_q + spos) * pr->topk : NULL;
    it.table = it.slots ? NULL : pr->block_table + req * pr->table_stride;
    it.len = it.slots ? pr->topk : pr->seqlens[req];
    const int64_t group = pr->h_q / pr->h_kv;
    for (int64_t r = 0; r < nrows; r++) {
        int64_t row = r0 + r, s = it.slots ? spos : row / group;
        int64_t h = it.slots ? g * group + row : g * group + row % group;
        qrow[r] = pr->q + ((req * pr->s_q + s) * pr->h_q + h) * pr->d * pr->esize;
        limit[r] = pr->causal ? it.len - (pr->s_q - 1 - s) : it.len;
        it.keys = limit[r] > it.keys ? limit[r] : it.keys;
    }
    return it;
}

/* An all-zero bf16 key row: the source of keys past a request's end and of sparse entries of -1 (their scores are
 * masked; P V must read finite zeros). */
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

/* Widens keys j0 .. j0 + nk - 1 of the item into rows of `tile` (`tstride` floats apart) and prefetches the rows two
 * tiles ahead into L2. Returns the sparse entries of -1 among them: their V columns are zeroed (P V reads them with
 * probability 0, so they must be finite) and their scores are to be masked. */
static inline __mmask16 load_tile(const Problem *pr, const int32_t *slots, const int32_t *table, int64_t g,
                                  int64_t j0, int nk, int64_t end, float *tile, int64_t tstride) {
    const char *rows[KT], *ahead[KT];
    const __mmask16 skipped = tile_rows(pr, slots, table, g, j0, end, rows);
    tile_rows(pr, slots, table, g, j0 + 2 * KT, end, ahead); /* DRAM latency: fetched while this tile computes */
    for (int t = 0; t < KT; t++) {
        float *dst = tile + t * tstride;
        if (t < nk && (skipped >> t) & 1)
            memset(dst, 0, (size_t)pr->dv * sizeof(float));
        else if (t < nk && pr->fp8)
            widen_fp8(rows[t], pr->d, pr->dv, dst);
        else if (t < nk)
            widen_any(rows[t], pr->d, pr->dtype, dst);
        if (ahead[t] != (const char *)zero_row)
            for (int64_t byte = 0; byte < pr->row_bytes; byte += 64)
                _mm_prefetch(ahead[t] + byte, _MM_HINT_T1); /* to L2: 3 % faster than to L1 at h_q = 16 */
    }
    return skipped;
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
