/* A whole greedy MTP speculative step in one call: verify, accept, draft the next step's tokens.
 *
 * Around the native decode step, speculative decoding added Python per step: the MTP module's
 * norms, projection and head as separate ops, two attention layouts, argmaxes and comparisons.
 * On a small model that glue cost more than the draft's arithmetic, so a k=1 step ran at 0.83x
 * plain decoding despite 90 % acceptance. Here one call does it all for B sequences, each bringing
 * its last token and K drafts (made by the previous call):
 *
 *   1. the main model scores [last, d_1 .. d_K] at positions n .. n+K (logits of every row);
 *   2. greedy verification: a = the drafts that equal the argmax before them; the step's tokens are
 *      d_1 .. d_a and the argmax t_a after them (exactly what plain greedy decoding emits);
 *   3. the MTP module takes the exact pairs (h_{n+j}, t_j) at positions n .. n+a into its cache and
 *      drafts the next step's token from the last one, then chains on its own output for K-1 more.
 *
 * A sequence is its ids at positions n .. n+2K-1 (the last token, K drafts, K-1 places chained
 * drafts write to) and its block table, as vLLM's kernels take it: position p lives in slot
 * block_table[p / block_size] * block_size + p % block_size, and row j attends to positions
 * 0 .. n+j. The main model reads rows 0..K, the MTP module rows 0..a+K-1. Cache entries written
 * for rejected drafts (main rows after a, chained MTP rows) sit past the sequence and are
 * overwritten when the real tokens get there, so rejection needs no rollback of the latent cache.
 */
#include "step.h"

#include <stdlib.h>

/* The first maximum (as torch.argmax), a NaN never chosen (as the engine's greedy sampling); all NaN: 0. */
static long argmax_f32(const float *x, long n) {
    long best = -1;
    for (long i = 0; i < n; i++)
        if (x[i] == x[i] && (best < 0 || x[i] > x[best])) best = i;
    return best < 0 ? 0 : best;
}

/* Floats of scratch the MTP module needs for M rows (mtp_rows). */
static long mtp_rows_floats(const MTPPlan *tp, long M, long S) {
    const long D = tp->block.mla.D;
    return M * 3 * D + M * tp->block.mla.dr + decode_layers_scratch(&tp->block, 1, M, S);
}

long mtp_step_scratch(const ModelPlan *mp, const LayerPlan *layers, long L, const MTPPlan *tp, long B, long K, long S) {
    const long M1 = B * (K + 1), D = layers[0].mla.D, Vd = tp->vocab > D ? tp->vocab : D;
    const long main = decode_step_scratch(mp, layers, L, M1, S);
    const long mtp = 2 * M1 * D + B * Vd + 2 * B * D + mtp_rows_floats(tp, M1, S);
    return main > mtp ? main : mtp;
}

/* The MTP module on M rows: x = eh([enorm(embed(tok)); hnorm(h)]) through its block, then its output norm into
 * `out` [M, D]. Rows write their latent to `slots` and attend over `keys` / `mask` ([M, S]). */
static void mtp_rows(const ModelPlan *mp, const MTPPlan *tp, float *cache, const float *h, const int64_t *tok,
                     const int64_t *pos, long M, const int64_t *slots, const int64_t *keys, const uint8_t *mask, long S,
                     float *out, float *scratch, int threads) {
    const long D = tp->block.mla.D, half = tp->block.mla.dr / 2;
    float *cat = scratch, *x = cat + M * 2 * D, *cos = x + M * D, *sin = cos + M * half, *rest = sin + M * half;
    for (long m = 0; m < M; m++) {
        rms_norm_f32(mp->embed + tok[m] * D, tp->enorm, cat + m * 2 * D, 1, D, tp->e_eps);
        rms_norm_f32(h + m * D, tp->hnorm, cat + m * 2 * D + D, 1, D, tp->h_eps);
        for (long i = 0; i < half; i++) {
            const float a = (float)pos[m] * mp->inv_freq[i];
            cos[m * half + i] = cosf(a) * mp->attn_factor;
            sin[m * half + i] = sinf(a) * mp->attn_factor;
        }
    }
    linear_lin(&tp->eh, cat, x, M, D, 2 * D, threads);
    decode_layers(&tp->block, 1, &cache, x, M, cos, sin, slots, keys, mask, S, rest, threads);
    rms_norm_f32(x, tp->final_norm, out, M, D, tp->final_eps);
}

/* Greedy draft tokens from MTP outputs g [M, D] through the draft head (its rows are token ids draft_ids[r], or r). */
static void draft_tokens(const MTPPlan *tp, const float *g, long M, long D, float *logits, int64_t *out, int threads) {
    linear_lin(&tp->head, g, logits, M, tp->vocab, D, threads);
    for (long m = 0; m < M; m++) {
        const long r = argmax_f32(logits + m * tp->vocab, tp->vocab);
        out[m] = tp->draft_ids ? tp->draft_ids[r] : r;
    }
}

/* Position n + j of sequence b: its slot, and the slots and mask of the keys it attends to (positions 0 .. n+j). */
static int64_t slot_of(const int64_t *table, long bs, long p) { return table[p / bs] * bs + p % bs; }

static void row_keys(const int64_t *table, long bs, long p, long S, int64_t *keys, uint8_t *mask) {
    for (long q = 0; q < S; q++) {
        keys[q] = slot_of(table, bs, q);
        mask[q] = q <= p;
    }
}

long mtp_step(const ModelPlan *mp, const LayerPlan *layers, long L, float *const *caches, const MTPPlan *tp,
              float *mcache, const int64_t *ids, const int64_t *starts, const int64_t *block_tables, long W, long bs,
              long B, long K, float *hidden, float *logits, int64_t *tokens, int64_t *drafts, float *scratch,
              int threads) {
    const long R = 2 * K, K1 = K + 1, M1 = B * K1, D = layers[0].mla.D, V = mp->vocab, S = W * bs;
    const long Vd = tp->vocab > D ? tp->vocab : D;
    /* Index arrays: the main rows (j <= K), the MTP rows, per-sequence bookkeeping. */
    int64_t *ix = malloc(sizeof(int64_t) * (M1 * (3 + S) + M1 * (3 + S) + 4 * B));
    uint8_t *mk = malloc((size_t)2 * M1 * S);
    if (!ix || !mk) {
        free(ix);
        free(mk);
        return -1;
    }
    int64_t *ids1 = ix, *pos1 = ids1 + M1, *slot1 = pos1 + M1, *keys1 = slot1 + M1;
    int64_t *tok2 = keys1 + M1 * S, *pos2 = tok2 + M1, *slot2 = pos2 + M1, *keys2 = slot2 + M1;
    int64_t *acc = keys2 + M1 * S, *lastrow = acc + B, *dcur = lastrow + B, *dpos = dcur + B;
    uint8_t *mask1 = mk, *mask2 = mk + M1 * S;
    for (long b = 0; b < B; b++)
        for (long j = 0; j < K1; j++) {
            const long m = b * K1 + j, p = starts[b] + j;
            ids1[m] = ids[b * R + j];
            pos1[m] = p;
            slot1[m] = slot_of(block_tables + b * W, bs, p);
            row_keys(block_tables + b * W, bs, p, S, keys1 + m * S, mask1 + m * S);
        }
    const long bad = decode_step(mp, layers, L, caches, ids1, pos1, 0, 1, M1, slot1, keys1, mask1, S, hidden, logits,
                                 scratch, threads);
    if (bad) {
        free(ix);
        free(mk);
        return bad;
    }
    /* Greedy verification, and the exact MTP rows (h_{n+j}, t_j) for j <= a of every sequence. */
    float *h2 = scratch, *g = h2 + M1 * D, *dl = g + M1 * D, *gb = dl + B * Vd, *gn = gb + B * D, *work = gn + B * D;
    long M2 = 0;
    for (long b = 0; b < B; b++) {
        long a = 0;
        for (long j = 0; j < K1; j++) tokens[b * K1 + j] = -1;
        for (long j = 0; j <= a && j < K1; j++) {
            const long m = b * K1 + j, t = argmax_f32(logits + m * V, V);
            tokens[m] = t;
            memcpy(h2 + M2 * D, hidden + m * D, D * sizeof(float));
            tok2[M2] = t;
            pos2[M2] = pos1[m];
            slot2[M2] = slot1[m];
            memcpy(keys2 + M2 * S, keys1 + m * S, S * sizeof(int64_t));
            memcpy(mask2 + M2 * S, mask1 + m * S, S);
            M2++;
            if (j < K && ids[b * R + j + 1] == t) a++;
        }
        acc[b] = a;
        lastrow[b] = M2 - 1;
    }
    mtp_rows(mp, tp, mcache, h2, tok2, pos2, M2, slot2, keys2, mask2, S, g, work, threads);
    /* The last exact row of each sequence drafts its first token; chained rows (position n + a + j) the rest. */
    for (long b = 0; b < B; b++) memcpy(gb + b * D, g + lastrow[b] * D, D * sizeof(float));
    draft_tokens(tp, gb, B, D, dl, dcur, threads);
    for (long b = 0; b < B; b++) drafts[b * K] = dcur[b];
    for (long j = 1; j < K; j++) {
        for (long b = 0; b < B; b++) {
            dpos[b] = starts[b] + acc[b] + j;
            slot2[b] = slot_of(block_tables + b * W, bs, dpos[b]);
            row_keys(block_tables + b * W, bs, dpos[b], S, keys2 + b * S, mask2 + b * S);
        }
        mtp_rows(mp, tp, mcache, gb, dcur, dpos, B, slot2, keys2, mask2, S, gn, work, threads);
        memcpy(gb, gn, B * D * sizeof(float));
        draft_tokens(tp, gb, B, D, dl, dcur, threads);
        for (long b = 0; b < B; b++) drafts[b * K + j] = dcur[b];
    }
    free(ix);
    free(mk);
    return 0;
}
