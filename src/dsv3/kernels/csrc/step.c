/* A whole decode step of the transformer's layers in one call.
 *
 * With every layer's MLA, router, experts and MLP already native, what is left of a batch-1 step
 * in Python is glue: module calls, descriptor lookups, residual adds, ~15 small tensors per layer.
 * On a small model that glue costs more than the arithmetic. Here the layer loop runs in C over a
 * plan of descriptors built once (dsv3/kernels/step.py), calling the same kernels the modules
 * call, in the same order, so results equal the per-module path bit for bit. Past BATCH_ROWS
 * rows with fp32 weights the layers run batch.c's GEMM form instead.
 */
#include "step.h"

/* Floats of scratch `decode_layers` needs for M tokens attending to S keys. */
long decode_layers_scratch(const LayerPlan *layers, long L, long M, long S) {
    if (M > BATCH_ROWS && batch_ok(layers, L, NULL)) /* batch.c: no per-row score buffer over the S keys */
        return batch_layers_scratch(layers, L, M);
    long most = 0;
    for (long i = 0; i < L; i++) {
        const LayerPlan *l = layers + i;
        const MLADims *d = &l->mla;
        long mla = M * (d->Rq + d->H * (d->dn + d->dr) + d->C + d->dr + d->H * (2 * d->C + d->dr + S) + d->H * d->dv);
        long ffn = M * (l->inter > l->top_k * l->einter ? l->inter : l->top_k * l->einter) + 3 * M * l->top_k + M * l->E; /* idx int64, wt, scores */
        most = mla > most ? mla : most;
        most = ffn > most ? ffn : most;
    }
    return 3 * M * layers[0].mla.D + most;
}

/* x [M, D] (the embeddings, updated in place to the last block's output); caches[i]: layer i's latent
 * cache; slot_mapping, key_slots, key_mask, S as `mla_decode` (the same slots in every layer). */
void decode_layers(const LayerPlan *layers, long L, float *const *caches, float *x, long M, const float *cos,
                   const float *sin, const int64_t *slot_mapping, const int64_t *key_slots, const uint8_t *key_mask,
                   long S, float *scratch, int threads) {
    if (M > BATCH_ROWS && batch_ok(layers, L, NULL)) {
        batch_layers(layers, L, caches, x, M, cos, sin, slot_mapping, key_slots, key_mask, S, scratch, threads);
        return;
    }
    const long D = layers[0].mla.D;
    float *h = scratch, *a = h + M * D, *b = a + M * D, *work = b + M * D;
    for (long i = 0; i < L; i++) {
        const LayerPlan *l = layers + i;
        rms_norm_f32(x, l->in_norm, h, M, D, l->eps);
        mla_decode(&l->mla, h, M, &l->q_a, l->q_norm, &l->q_b, &l->kv_a, l->kv_norm, l->w_kvb, &l->o, cos, sin,
                   caches[i], slot_mapping, key_slots, key_mask, S, work, a, threads);
        for (long j = 0; j < M * D; j++) x[j] += a[j];
        rms_norm_f32(x, l->post_norm, h, M, D, l->eps);
        if (l->E) {
            const long K = l->top_k;
            int64_t *idx = (int64_t *)work;
            float *wt = (float *)(idx + M * K), *scores = wt + M * K, *fh = scores + M * l->E;
            route_noaux(h, l->router, l->router_bias, M, D, l->E, l->n_group, l->topk_group, K, (int)l->norm_topk,
                        l->route_scale, idx, wt, scores);
            moe_lin(h, idx, wt, &l->egate, &l->eup, &l->edown, fh, a, M, K, D, l->einter, threads);
            if (l->inter) {
                mlp_decode(&l->gate, &l->up, &l->down, h, fh, b, M, D, l->inter, threads);
                for (long j = 0; j < M * D; j++) a[j] += b[j];
            }
        } else {
            mlp_decode(&l->gate, &l->up, &l->down, h, work, a, M, D, l->inter, threads);
        }
        for (long j = 0; j < M * D; j++) x[j] += a[j];
    }
}

/* Floats of scratch `decode_step` needs (beyond `decode_layers`'). */
long decode_step_scratch(const ModelPlan *mp, const LayerPlan *layers, long L, long M, long S) {
    return decode_layers_scratch(layers, L, M, S) + M * layers[0].mla.D + 2 * M * mp->half;
}

/* A decode step from token ids to post-norm hidden states [M, D] and, with `logits`, the head's [M, vocab].
 * positions [M] (NULL: start + m % T, the rows being B sequences of T tokens). Returns 0, or 1 + the row
 * of a token id outside the vocabulary (nothing is computed then). */
long decode_step(const ModelPlan *mp, const LayerPlan *layers, long L, float *const *caches, const int64_t *ids,
                 const int64_t *positions, long start, long T, long M, const int64_t *slot_mapping,
                 const int64_t *key_slots, const uint8_t *key_mask, long S, float *hidden, float *logits,
                 float *scratch, int threads) {
    const long D = layers[0].mla.D, half = mp->half;
    float *x = scratch, *cos = x + M * D, *sin = cos + M * half, *rest = sin + M * half;
    for (long m = 0; m < M; m++)
        if (ids[m] < 0 || ids[m] >= mp->vocab) return m + 1; /* the caller raises, as an embedding lookup would */
    for (long m = 0; m < M; m++) {
        memcpy(x + m * D, mp->embed + ids[m] * D, D * sizeof(float));
        const float pos = (float)(positions ? positions[m] : start + m % T);
        for (long i = 0; i < half; i++) {
            const float a = pos * mp->inv_freq[i];
            cos[m * half + i] = cosf(a) * mp->attn_factor;
            sin[m * half + i] = sinf(a) * mp->attn_factor;
        }
    }
    decode_layers(layers, L, caches, x, M, cos, sin, slot_mapping, key_slots, key_mask, S, rest, threads);
    rms_norm_f32(x, mp->final_norm, hidden, M, D, mp->final_eps);
    if (logits && M > BATCH_ROWS && mp->head.kind == 0) {
        if (mp->head_packed)
            dsv3_sgemm_packed(M, mp->vocab, D, hidden, mp->head_packed, logits);
        else
            mm_nt(hidden, D, (const float *)mp->head.w, D, logits, mp->vocab, M, mp->vocab, D);
    } else if (logits) {
#pragma omp parallel num_threads(threads)
        lin(&mp->head, hidden, M, D, logits, mp->vocab);
    }
    return 0;
}
