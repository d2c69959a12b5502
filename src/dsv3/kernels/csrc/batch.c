/* A batched decode step (tens to hundreds of rows, fp32 weights) with every projection one GEMM.
 *
 * step.c's per-row kernels stream each weight row past a few tokens: right for batch 1-8, where
 * reading the weights is the cost. At 64 rows the step is compute-bound, and those kernels (or
 * 4x4 register blocks of our own) reached 100-135 GFLOP/s where the BLAS PyTorch links reaches
 * 220-300; yet calling that BLAS op by op from Python left ~10 ms of glue in a 50 ms step of the
 * 73M bench model. Here the layer loop runs in C as in step.c, but each projection, each head's
 * absorbed W_UK / W_UV product, each expert's rows and the LM head are one `dsv3_sgemm` (ATen's
 * cpublas); attention reads the paged latent cache in place (attend.c's `attend_row`), experts
 * run grouped (grouped.c). Same operations in the same order as the modules; results agree to
 * fp32 rounding (the summation order differs).
 */
#include "step.h"

/* Whether every layer (and the head, when given) has fp32 weights: the plans this path takes. */
int batch_ok(const LayerPlan *layers, long L, const Lin *head) {
    for (long i = 0; i < L; i++) {
        const LayerPlan *l = layers + i;
        if ((l->mla.Rq && l->q_a.kind) || l->q_b.kind || l->kv_a.kind || l->o.kind) return 0;
        if (l->inter && (l->gate.kind || l->up.kind || l->down.kind)) return 0;
        if (l->E && (l->egate.kind || l->eup.kind || l->edown.kind)) return 0;
    }
    return !head || head->kind == 0;
}

/* Floats of scratch `batch_layers` needs. */
long batch_layers_scratch(const LayerPlan *layers, long L, long M) {
    long most = 0;
    for (long i = 0; i < L; i++) {
        const LayerPlan *l = layers + i;
        const MLADims *d = &l->mla;
        const long W = d->C + d->dr;
        long mla = M * (d->Rq + d->H * (d->dn + d->dr) + W + d->H * W + d->H * d->C + d->H * d->dv);
        long ffn = 2 * M * l->inter;
        if (l->E) { /* idx (int64), weights, scores, 64-byte alignment, then the grouped experts' or the MLP's */
            const long grouped = moe_grouped_scratch(M, l->top_k, d->D, l->einter, l->E);
            ffn = 3 * M * l->top_k + M * l->E + 16 + (grouped > ffn ? grouped : ffn);
        }
        most = mla > most ? mla : most;
        most = ffn > most ? ffn : most;
    }
    return 3 * M * layers[0].mla.D + most;
}

static void norm_rows(const float *x, const float *w, float *y, long M, long D, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long m = 0; m < M; m++) rms_norm_f32(x + m * D, w, y + m * D, 1, D, eps);
}

static void add_rows(float *x, const float *a, long n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long j = 0; j < n; j++) x[j] += a[j];
}

/* MLA for M decode rows: x [M, D] normed; cache/slot_mapping/key_slots/key_mask/S as `mla_decode`. y [M, D]. */
static void batch_mla(const LayerPlan *l, const float *x, long M, const float *cos, const float *sin, float *cache,
                      const int64_t *slot_mapping, const int64_t *key_slots, const uint8_t *key_mask, long S,
                      float *scratch, float *y, int threads) {
    const MLADims *d = &l->mla;
    const long D = d->D, H = d->H, C = d->C, dn = d->dn, dq = d->dn + d->dr, W = C + d->dr, half = d->dr / 2;
    float *qa = scratch, *q = qa + M * d->Rq, *kva = q + M * H * dq, *ql = kva + M * W, *ol = ql + M * H * W,
          *attn = ol + M * H * C;
    lin_mm(&l->kv_a, x, D, kva, W, M, W, D);
    if (d->Rq) {
        lin_mm(&l->q_a, x, D, qa, d->Rq, M, d->Rq, D);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long m = 0; m < M; m++) rms_inplace(qa + m * d->Rq, d->Rq, l->q_norm, d->q_eps);
        lin_mm(&l->q_b, qa, d->Rq, q, H * dq, M, H * dq, d->Rq);
    } else {
        lin_mm(&l->q_b, x, D, q, H * dq, M, H * dq, D);
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long m = 0; m < M; m++) { /* norm + rotary, the latent to its slot (before any row attends), q_pe */
            float *lat = kva + m * W;
            rms_inplace(lat, C, l->kv_norm, d->kv_eps);
            rope_pairs(lat + C, cos + m * half, sin + m * half, half);
            memcpy(cache + slot_mapping[m] * W, lat, W * sizeof(float));
            for (long h = 0; h < H; h++) {
                float *pe = q + (m * H + h) * dq + dn;
                rope_pairs(pe, cos + m * half, sin + m * half, half);
                memcpy(ql + (m * H + h) * W + C, pe, d->dr * sizeof(float));
            }
        }
#pragma omp for schedule(static)
        for (long h = 0; h < H; h++) /* q_lat = q_nope W_UK, head by head */
            mm_nn(q + h * dq, H * dq, l->w_kvb + h * (dn + d->dv) * C, C, ql + h * W, H * W, M, C, dn);
#pragma omp for schedule(dynamic, 1)
        for (long m = 0; m < M; m++)
            attend_row(ql + m * H * W, H, W, C, cache, key_slots + m * S, key_mask ? key_mask + m * S : NULL, S,
                       d->scale, ol + m * H * C);
#pragma omp for schedule(static)
        for (long h = 0; h < H; h++) /* o = o_lat W_UVᵀ */
            mm_nt(ol + h * C, H * C, l->w_kvb + (h * (dn + d->dv) + dn) * C, C, attn + h * d->dv, H * d->dv, M,
                  d->dv, C);
    }
    lin_mm(&l->o, attn, H * d->dv, y, D, M, D, H * d->dv);
}

/* The dense SwiGLU MLP (or the shared experts) for M rows: x [M, D] -> y [M, D]; scratch 2 M I floats. */
static void batch_mlp(const LayerPlan *l, const float *x, long M, float *scratch, float *y, int threads) {
    const long D = l->mla.D, I = l->inter;
    float *g = scratch, *u = g + M * I;
    lin_mm(&l->gate, x, D, g, I, M, I, D);
    lin_mm(&l->up, x, D, u, I, M, I, D);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long m = 0; m < M; m++) swiglu_row(g + m * I, u + m * I, I);
    lin_mm(&l->down, g, I, y, D, M, D, I);
}

/* `decode_layers` for many rows (see batch_ok): x [M, D] updated in place to the last block's output. */
void batch_layers(const LayerPlan *layers, long L, float *const *caches, float *x, long M, const float *cos,
                  const float *sin, const int64_t *slot_mapping, const int64_t *key_slots, const uint8_t *key_mask,
                  long S, float *scratch, int threads) {
    const long D = layers[0].mla.D;
    float *h = scratch, *a = h + M * D, *b = a + M * D, *work = b + M * D;
    for (long i = 0; i < L; i++) {
        const LayerPlan *l = layers + i;
        norm_rows(x, l->in_norm, h, M, D, l->eps, threads);
        batch_mla(l, h, M, cos, sin, caches[i], slot_mapping, key_slots, key_mask, S, work, a, threads);
        add_rows(x, a, M * D, threads);
        norm_rows(x, l->post_norm, h, M, D, l->eps, threads);
        if (l->E) {
            const long K = l->top_k;
            int64_t *idx = (int64_t *)work;
            float *wt = (float *)(idx + M * K), *scores = wt + M * K;
            float *rest = (float *)(((uintptr_t)(scores + M * l->E) + 63) & ~(uintptr_t)63); /* holds int64s */
#pragma omp parallel for num_threads(threads) schedule(static)
            for (long m = 0; m < M; m++)
                route_noaux(h + m * D, l->router, l->router_bias, 1, D, l->E, l->n_group, l->topk_group, K,
                            (int)l->norm_topk, l->route_scale, idx + m * K, wt + m * K, scores + m * l->E);
            moe_grouped(h, idx, wt, (const float *)l->egate.w, (const float *)l->eup.w, l->egate.ew / 4,
                        (const float *)l->edown.w, l->edown.ew / 4, a, M, K, D, l->einter, l->E, rest, threads);
            if (l->inter) {
                batch_mlp(l, h, M, rest, b, threads);
                add_rows(a, b, M * D, threads);
            }
        } else {
            batch_mlp(l, h, M, work, a, threads);
        }
        add_rows(x, a, M * D, threads);
    }
}
