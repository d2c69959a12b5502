/* DSA's lightning indexer and its top-k in one pass: each query's `k` best compressed entries without the
 * [queries, entries] score matrix.
 *
 * The V3.2/V4 indexer scores every visible entry s of a query t as sum_h w[t,h] relu(q[t,h] . key[s]) and keeps the
 * top k. Done as PyTorch ops that is a batched GEMM into a [T, H, S] buffer, a relu pass, a weighting GEMM into
 * [T, S], a masked copy, topk and a tie check: six passes over arrays that leave the caches once S (a quarter of the
 * context on CSA layers: 262K entries at 1M tokens) is large, so a long prefill ran at 159 tokens/s near 700K
 * tokens, almost all of it in the indexer. Here a thread takes a tile of entries, transposes it once into a
 * [D, TILE] buffer that stays in L2, scores every query of the call against it in registers (4 heads x 64 entries
 * a step) and offers the scores to the query's candidates (`Cands`): only an entry that beats the query's current
 * k-th score is written again. Threads share the work by batch row, then by groups of queries, then (decode: one
 * query, many entries) by parts of the entries, whose candidates merge at the end.
 *
 * Ties go to the earliest entry, as in the reference (`dsv3.ops.reference.index_topk`): entries arrive in
 * increasing order, so one whose score only equals the k-th kept is later and worse; merging parts compares
 * (score, index) in full. A NaN score is never chosen; picked entries with a non-finite
 * score are marked not ok, as the reference marks them. */
#include "common.h"

#include <stdlib.h>

#define TILE 256
#define HB 4   /* heads a register block scores at once */
#define EB 64  /* entries a register block scores at once */
#define MIN2(a, b) ((a) < (b) ? (a) : (b))

/* A query's candidates: every score offered until the buffer first fills, then only scores above `thr`, the k-th
 * best kept so far; a full buffer (cap = 2k) is cut back to its k best by a quickselect, so an entry costs O(1)
 * however often the k-th score rises (a heap paid log k per entry that beat it: most of the time at small S). */
typedef struct {
    float *s;
    int64_t *i;
    long n, cap, k;
    float thr;        /* the k-th best kept (score, index) once full */
    int64_t thr_i;
    int full;
} Cands;

/* a ranks before b: higher score, or equal score and smaller index (a strict order: indices differ) */
static inline int better(float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); }

/* Reorder s/ix [0, n) so that [0, k) holds the k best (in any order), k < n. */
static void select_top(float *s, int64_t *ix, long n, long k) {
    long lo = 0, hi = n - 1;
    while (lo < hi) {
        const long mid = lo + (hi - lo) / 2;
        const float ps = s[mid];
        const int64_t pi = ix[mid];
        long a = lo, b = hi;
        while (a <= b) {
            while (better(s[a], ix[a], ps, pi)) a++;
            while (better(ps, pi, s[b], ix[b])) b--;
            if (a <= b) {
                const float ts = s[a];
                const int64_t ti = ix[a];
                s[a] = s[b], ix[a] = ix[b], s[b] = ts, ix[b] = ti;
                a++, b--;
            }
        }
        if (k - 1 <= b) hi = b;
        else if (k - 1 >= a) lo = a;
        else break; /* position k-1 holds the pivot's equal: done */
    }
}

/* thr = the worst of the k kept in [0, k): what a later entry must beat */
static void set_threshold(Cands *c) {
    long w = 0;
    for (long j = 1; j < c->k; j++)
        if (better(c->s[w], c->i[w], c->s[j], c->i[j])) w = j;
    c->thr = c->s[w], c->thr_i = c->i[w], c->full = 1;
}

static void compact(Cands *c) {
    select_top(c->s, c->i, c->n, c->k);
    c->n = c->k;
    set_threshold(c);
}

static inline void push(Cands *c, float s, int64_t i) {
    c->s[c->n] = s, c->i[c->n] = i;
    if (++c->n == c->cap) compact(c);
    else if (!c->full && c->n == c->k) set_threshold(c); /* the first k offered are the k best so far */
}

/* Scores of one query (q [Hp, D], w [Hp], heads padded to a multiple of HB with zeros) against n entries of the
 * transposed tile kt [D, TILE] (columns past n zero) into sc [n rounded up to EB]. */
static void score_tile(const float *q, const float *w, long Hp, long D, const float *kt, long n, float *sc) {
    for (long j = 0; j < n; j += EB) {
#if defined(__AVX512F__)
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        const __m512 zero = _mm512_setzero_ps();
        for (long h = 0; h < Hp; h += HB) {
            __m512 a[HB][4];
            for (int x = 0; x < HB; x++) a[x][0] = a[x][1] = a[x][2] = a[x][3] = zero;
            for (long d = 0; d < D; d++) {
                const float *kr = kt + d * TILE + j;
                const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16), k2 = _mm512_loadu_ps(kr + 32),
                             k3 = _mm512_loadu_ps(kr + 48);
                for (int x = 0; x < HB; x++) {
                    const __m512 qb = _mm512_set1_ps(q[(h + x) * D + d]);
                    a[x][0] = _mm512_fmadd_ps(qb, k0, a[x][0]);
                    a[x][1] = _mm512_fmadd_ps(qb, k1, a[x][1]);
                    a[x][2] = _mm512_fmadd_ps(qb, k2, a[x][2]);
                    a[x][3] = _mm512_fmadd_ps(qb, k3, a[x][3]);
                }
            }
            for (int x = 0; x < HB; x++) {
                const __m512 wb = _mm512_set1_ps(w[h + x]);
                s0 = _mm512_fmadd_ps(wb, _mm512_max_ps(a[x][0], zero), s0);
                s1 = _mm512_fmadd_ps(wb, _mm512_max_ps(a[x][1], zero), s1);
                s2 = _mm512_fmadd_ps(wb, _mm512_max_ps(a[x][2], zero), s2);
                s3 = _mm512_fmadd_ps(wb, _mm512_max_ps(a[x][3], zero), s3);
            }
        }
        _mm512_storeu_ps(sc + j, s0);
        _mm512_storeu_ps(sc + j + 16, s1);
        _mm512_storeu_ps(sc + j + 32, s2);
        _mm512_storeu_ps(sc + j + 48, s3);
#else
        float s[EB] = {0.f};
        for (long h = 0; h < Hp; h++) {
            float a[EB] = {0.f};
            for (long d = 0; d < D; d++) {
                const float qd = q[h * D + d];
                const float *kr = kt + d * TILE + j;
                _Pragma("omp simd") for (int x = 0; x < EB; x++) a[x] += qd * kr[x];
            }
            const float wh = w[h];
            _Pragma("omp simd") for (int x = 0; x < EB; x++) s[x] += wh * (a[x] > 0.f ? a[x] : 0.f);
        }
        memcpy(sc + j, s, sizeof s);
#endif
    }
}

/* Offer the tile's scores sc[0..n) of entries base.. to a query's candidates. */
static void offer(Cands *c, const float *sc, long n, int64_t base) {
    long j = 0;
    for (; j < n && !c->full; j++)
        if (!isnan(sc[j])) push(c, sc[j], base + j);
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(sc + j), _mm512_set1_ps(c->thr), _CMP_GT_OQ);
        for (; hit; hit &= hit - 1) {
            const long x = j + __builtin_ctz(hit);
            if (sc[x] > c->thr) push(c, sc[x], base + x);
        }
    }
#endif
    for (; j < n; j++)
        if (sc[j] > c->thr) push(c, sc[j], base + j);
}

static inline void swap_at(float *s, int64_t *ix, long a, long b) {
    const float ts = s[a];
    const int64_t ti = ix[a];
    s[a] = s[b], ix[a] = ix[b], s[b] = ts, ix[b] = ti;
}

/* Sort s/ix [0, n) best first: quicksort with the comparison inlined (qsort's call per comparison cost more than
 * scoring at small S), insertion sort below 16. */
static void sort_ranked(float *s, int64_t *ix, long n) {
    while (n > 16) {
        const long mid = n / 2;
        /* the median of s[0], s[mid], s[n-1] as the pivot, at 0 */
        if (better(s[mid], ix[mid], s[0], ix[0])) swap_at(s, ix, mid, 0);
        if (better(s[n - 1], ix[n - 1], s[0], ix[0])) swap_at(s, ix, n - 1, 0);
        if (better(s[n - 1], ix[n - 1], s[mid], ix[mid])) swap_at(s, ix, n - 1, mid);
        swap_at(s, ix, mid, 0);
        const float ps = s[0];
        const int64_t pi = ix[0];
        long a = 1, b = n - 1;
        for (;;) {
            while (a <= b && better(s[a], ix[a], ps, pi)) a++;
            while (a <= b && better(ps, pi, s[b], ix[b])) b--;
            if (a >= b) break;
            swap_at(s, ix, a, b);
            a++, b--;
        }
        swap_at(s, ix, 0, b); /* every other element is better or worse (indices differ): [0, b) better, (b, n) worse */
        if (b < n - 1 - b) { /* recurse into the smaller side, loop on the larger */
            sort_ranked(s, ix, b);
            s += b + 1, ix += b + 1, n -= b + 1;
        } else {
            sort_ranked(s + b + 1, ix + b + 1, n - b - 1);
            n = b;
        }
    }
    for (long j = 1; j < n; j++) {
        const float vs = s[j];
        const int64_t vi = ix[j];
        long x = j;
        for (; x > 0 && better(vs, vi, s[x - 1], ix[x - 1]); x--) s[x] = s[x - 1], ix[x] = ix[x - 1];
        s[x] = vs, ix[x] = vi;
    }
}

/* q [B, T, H, D], w [B, T, H], keys [B, S, D] (contiguous fp32); n_visible [B, T] in [0, S]; kk = min(k, S) >= 1.
 * out_idx [B, T, kk]: each query's top entries by score (ties: earliest), then the unchosen slots; out_ok [B, T, kk]:
 * 1 where the slot holds a visible entry with a finite score. */
void index_topk_f32(const float *q, const float *w, const float *keys, const int64_t *n_visible, long B, long T,
                    long H, long D, long S, long kk, int64_t *out_idx, uint8_t *out_ok, int threads) {
    const long Hp = (H + HB - 1) / HB * HB;
    long maxvis = 0;
    for (long x = 0; x < B * T; x++) maxvis = n_visible[x] > maxvis ? n_visible[x] : maxvis;
    /* threads share the work by batch row, then by groups of at least 16 queries (each group transposes the same
     * tiles), then by parts of the entries (decode: one query, many entries; the parts' candidates merge) */
    const long G = B >= threads ? 1 : MIN2((threads + B - 1) / B, (T + 15) / 16);
    const long Tg = (T + G - 1) / G;
    long P = B * G >= threads ? 1 : (threads + B * G - 1) / (B * G);
    const long tiles = (maxvis + TILE - 1) / TILE;
    if (P > tiles) P = tiles > 0 ? tiles : 1;
    const long per = (tiles + P - 1) / P * TILE; /* entries per part, whole tiles */
    const long cap = 2 * kk;
    Cands *cs = malloc(sizeof(Cands) * B * T * P);
    float *hs = malloc(sizeof(float) * B * T * P * cap);
    int64_t *hi = malloc(sizeof(int64_t) * B * T * P * cap);
    for (long x = 0; x < B * T * P; x++)
        cs[x] = (Cands){hs + x * cap, hi + x * cap, 0, cap, kk, -INFINITY, 0, 0};
    float *qp = calloc(B * T * Hp * D + B * T * Hp, sizeof(float)); /* queries and weights, heads padded */
    float *wp = qp + B * T * Hp * D;
    for (long x = 0; x < B * T; x++) {
        memcpy(qp + x * Hp * D, q + x * H * D, sizeof(float) * H * D);
        memcpy(wp + x * Hp, w + x * H, sizeof(float) * H);
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) collapse(3)
    for (long b = 0; b < B; b++) {
      for (long g = 0; g < G; g++) {
        for (long p = 0; p < P; p++) {
            float *kt = aligned_alloc(64, sizeof(float) * D * TILE);
            float *sc = aligned_alloc(64, sizeof(float) * TILE);
            const long lo = p * per, hi_ = (p + 1) * per < maxvis ? (p + 1) * per : maxvis;
            for (long t0 = lo; t0 < hi_; t0 += TILE) {
                const long n = hi_ - t0 < TILE ? hi_ - t0 : TILE;
                const float *kb = keys + (b * S + t0) * D;
                for (long j = 0; j < n; j++)
                    for (long d = 0; d < D; d++) kt[d * TILE + j] = kb[j * D + d];
                const long padded = (n + EB - 1) / EB * EB;
                for (long d = 0; d < D && padded > n; d++) memset(kt + d * TILE + n, 0, sizeof(float) * (padded - n));
                for (long t = g * Tg; t < T && t < (g + 1) * Tg; t++) {
                    const long x = b * T + t, vis = n_visible[x];
                    if (vis <= t0) continue;
                    const long m = vis - t0 < n ? vis - t0 : n;
                    score_tile(qp + x * Hp * D, wp + x * Hp, Hp, D, kt, m, sc);
                    offer(&cs[x * P + p], sc, m, t0);
                }
            }
            free(kt);
            free(sc);
        }
      }
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long x = 0; x < B * T; x++) {
        Cands *c = &cs[x * P]; /* the other parts' candidates join the first part's (its buffer holds 2k) */
        for (long p = 1; p < P; p++) {
            const Cands *o = &cs[x * P + p];
            for (long j = 0; j < o->n; j++)
                if (!c->full || better(o->s[j], o->i[j], c->thr, c->thr_i)) push(c, o->s[j], o->i[j]);
        }
        if (c->n > kk) compact(c);
        sort_ranked(c->s, c->i, c->n);
        int64_t *oi = out_idx + x * kk;
        uint8_t *ok = out_ok + x * kk;
        for (long j = 0; j < c->n; j++) oi[j] = c->i[j], ok[j] = isfinite(c->s[j]);
        /* the slots no visible entry filled: entries past the visible ones (index 0 if none is left), not ok */
        for (long j = c->n, next = n_visible[x]; j < kk; j++, next++) oi[j] = next < S ? next : 0, ok[j] = 0;
    }
    free(cs);
    free(hs);
    free(hi);
    free(qp);
}
