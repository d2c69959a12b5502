/* Absorbed MLA attention for many decode rows, read straight from the paged latent cache.
 *
 * With more rows than the whole-step kernels take (a batched decode step), PyTorch ran MLA's
 * attention as a gather of every row's cached latents into a padded copy, two batched matmuls,
 * a mask and a softmax: the copy alone moved each row's whole context once more per layer.
 * Here each row walks its key slots in the cache itself, 16 keys at a time: the scores of all
 * heads for those keys are one small GEMM (`gemm_nt`, the keys as read from the cache when their
 * slots are consecutive, as a paged block's are), an online softmax per head keeps one pass
 * (no score buffer over the context), and o += p c accumulates the latent part c of each entry
 * [c | k_pe], four heads at a time (each key's latent loaded once for the four). The projections around it (q_nope W_UK, o W_UV) stay batched GEMMs.
 */
#include "common.h"

#define KEYS 16

/* One head's scores p[0..n) of a block: scaled, folded into the running max / sum (online softmax), turned into
 * weights in place. Returns the factor the head's accumulated output must be rescaled by (0 on its first block). */
static inline float softmax_block(float *p, long n, float scale, float *mx, float *sum) {
    float top = *mx;
    for (long j = 0; j < n; j++) {
        p[j] *= scale;
        top = p[j] > top ? p[j] : top;
    }
    const float r = exp_fast(*mx - top);
    float add = 0.f;
#if defined(__AVX512F__)
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(p, m, e);
    add = _mm512_mask_reduce_add_ps(m, e);
#else
    for (long j = 0; j < n; j++) {
        p[j] = exp_fast(p[j] - top);
        add += p[j];
    }
#endif
    *sum = *sum * r + add;
    *mx = top;
    return r;
}

/* softmax_block for the H heads of a block at once (scores sc[h * KEYS + j], j < n), r[h] each head's factor:
 * with AVX-512 each head's scores are one vector, and the running maxima and their factors are vectors of 16 heads
 * (the per-head scalar loops were a third of the attention's time). */
static void softmax_heads(float *sc, long H, long n, float scale, float *mx, float *sum, float *r) {
#if defined(__AVX512F__)
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    const __m512 s = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    float top[256];
    for (long h = 0; h < H; h++) {
        const __m512 v = _mm512_mul_ps(_mm512_mask_loadu_ps(ninf, m, sc + h * KEYS), s);
        _mm512_storeu_ps(sc + h * KEYS, v);
        top[h] = _mm512_reduce_max_ps(v);
    }
    long h = 0;
    for (; h + 16 <= H; h += 16) { /* new maxima and old-to-new factors, 16 heads at a time */
        const __m512 old = _mm512_loadu_ps(mx + h), t = _mm512_max_ps(old, _mm512_loadu_ps(top + h));
        _mm512_storeu_ps(r + h, exp16(_mm512_sub_ps(old, t)));
        _mm512_storeu_ps(mx + h, t);
    }
    for (; h < H; h++) {
        const float t = top[h] > mx[h] ? top[h] : mx[h];
        r[h] = exp_fast(mx[h] - t);
        mx[h] = t;
    }
    for (h = 0; h < H; h++) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + h * KEYS), _mm512_set1_ps(mx[h])));
        _mm512_mask_storeu_ps(sc + h * KEYS, m, e);
        sum[h] = sum[h] * r[h] + _mm512_mask_reduce_add_ps(m, e);
    }
#else
    for (long h = 0; h < H; h++) r[h] = softmax_block(sc + h * KEYS, n, scale, mx + h, sum + h);
#endif
}

/* One row's attention: qm [H, W] over keys ks[0..n) (-1, or mask[s] == 0: not a key) of cache [slots, W] ->
 * o [H, C]. H <= 256. */
void attend_row(const float *qm, long H, long W, long C, const float *cache, const int64_t *ks, const uint8_t *mask,
                long n, float scale, float *o) {
    float mx[256], sum[256], sc[256 * KEYS], tile[KEYS * 1024];
    const int copy_ok = W <= 1024;
    for (long h = 0; h < H; h++) {
        mx[h] = -INFINITY;
        sum[h] = 0.f;
    }
    for (long i = 0; i < H * C; i++) o[i] = 0.f;
    for (long s = 0; s < n;) {
        long slot[KEYS], nb = 0;
        for (; s < n && nb < KEYS; s++)
            if (ks[s] >= 0 && (!mask || mask[s])) slot[nb++] = ks[s];
        if (!nb) break;
        int run = 1; /* consecutive slots: read the block where it lies */
        for (long j = 1; j < nb; j++) run &= slot[j] == slot[0] + j;
        const float *keys = cache + slot[0] * W;
        if (!run) {
            if (!copy_ok) { /* very wide entries: key by key */
                for (long j = 0; j < nb; j++)
                    for (long h = 0; h < H; h++) sc[h * KEYS + j] = dot_f32(qm + h * W, cache + slot[j] * W, W);
                keys = NULL;
            } else {
                for (long j = 0; j < nb; j++) memcpy(tile + j * W, cache + slot[j] * W, W * sizeof(float));
                keys = tile;
            }
        }
        if (keys) gemm_nt(qm, W, keys, W, sc, KEYS, H, nb, W);
        const float *kv[KEYS];
        for (long j = 0; j < nb; j++) kv[j] = keys ? keys + j * W : cache + slot[j] * W;
        float r[256];
        softmax_heads(sc, H, nb, scale, mx, sum, r);
        long h0 = 0, tail = 0;
#if defined(__AVX512F__)
        /* o += p c for 4 heads x 64 outputs at a time: each key's 4 vectors are loaded once for 4 heads */
        tail = C - C % 64;
        for (; h0 + 4 <= H; h0 += 4)
            for (long c0 = 0; c0 < tail; c0 += 64) {
                __m512 acc[16];
                for (int a = 0; a < 4; a++) {
                    const __m512 rv = _mm512_set1_ps(r[h0 + a]);
                    for (int i = 0; i < 4; i++) acc[4 * a + i] = _mm512_mul_ps(_mm512_loadu_ps(o + (h0 + a) * C + c0 + 16 * i), rv);
                }
                for (long j = 0; j < nb; j++) {
                    const float *row = kv[j] + c0;
                    const __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + 16), k2 = _mm512_loadu_ps(row + 32),
                                 k3 = _mm512_loadu_ps(row + 48);
                    for (int a = 0; a < 4; a++) {
                        const __m512 pj = _mm512_set1_ps(sc[(h0 + a) * KEYS + j]);
                        acc[4 * a] = _mm512_fmadd_ps(pj, k0, acc[4 * a]);
                        acc[4 * a + 1] = _mm512_fmadd_ps(pj, k1, acc[4 * a + 1]);
                        acc[4 * a + 2] = _mm512_fmadd_ps(pj, k2, acc[4 * a + 2]);
                        acc[4 * a + 3] = _mm512_fmadd_ps(pj, k3, acc[4 * a + 3]);
                    }
                }
                for (int a = 0; a < 4; a++)
                    for (int i = 0; i < 4; i++) _mm512_storeu_ps(o + (h0 + a) * C + c0 + 16 * i, acc[4 * a + i]);
            }
#endif
        for (long h = 0; h < H; h++) { /* what the blocks above left: columns past `tail` of their heads, other heads whole */
            const float *p = sc + h * KEYS;
            float *oh = o + h * C;
            for (long c = h < h0 ? tail : 0; c < C; c++) {
                float acc = oh[c] * r[h];
                for (long j = 0; j < nb; j++) acc += p[j] * kv[j][c];
                oh[c] = acc;
            }
        }
    }
    for (long h = 0; h < H; h++)
        if (sum[h] > 0.f) {
            const float inv = 1.f / sum[h];
            for (long c = 0; c < C; c++) o[h * C + c] *= inv;
        }
}

/* q [M, H, W] (W = C + dr: q_nope W_UK | q_pe), cache [slots, W], key_slots [M, S] (-1: no key), key_lens [M]
 * (NULL: all S; else only the first key_lens[m] slots count) -> out [M, H, C]; a row without keys gets zeros.
 * H <= 256. */
void mla_attend(const float *q, long M, long H, long W, long C, const float *cache, const int64_t *key_slots, long S,
                const int64_t *key_lens, float scale, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (long m = 0; m < M; m++) {
        const long n = key_lens ? (key_lens[m] < S ? key_lens[m] : S) : S;
        attend_row(q + m * H * W, H, W, C, cache, key_slots + m * S, NULL, n, scale, out + m * H * C);
    }
}
