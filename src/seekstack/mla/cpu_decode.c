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

#include "cpu_convert.h" /* widening to fp32, storing outputs, exp2, transposes */
#include "cpu_item.h"    /* the problem, the workspace, an item's rows, tiles and results */
#include "cpu_blocks.h"  /* `attend`: 4 x 4 register blocks */
#include "cpu_lanes.h"   /* `attend_lanes`: 16 rows in one vector's lanes */

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
