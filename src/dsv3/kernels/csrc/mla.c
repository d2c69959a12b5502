/* One MLA layer for a few decode tokens in one call.
 *
 * PyTorch runs a decode step of MLA as ~40 small ops (projections, two RMSNorms, the rotary
 * slice, the cache write, four batched matmuls, masking and softmax), each costing more in
 * dispatch than in arithmetic on a small model. Here the whole layer is one OpenMP region:
 * q (low-rank or direct) and the latent projections, RMSNorms, interleaved-pair rotary, the
 * latent written to its cache slot, attention in the absorbed form over the cached latents
 * (scores = (q_nope W_UK)·c + q_pe·k_pe, output W_UV (p·c)) and the output projection.
 * Linear weights are fp32 or int8 with one scale per row; accumulation is fp32.
 */
#include "common.h"

/* x [M, D] (after the input RMSNorm); cos/sin [M, dr/2]; w_kvb = kv_b_proj as [H, dn+dv, C];
 * cache [slots, C+dr]: token m's latent goes to slot_mapping[m], then it attends to the slots
 * key_slots[m, 0..S) where key_mask[m, s] (NULL: all). scratch: see `mla_scratch_floats`. y [M, D]. */
void mla_decode(const MLADims *d, const float *x, long M, const Lin *q_a, const float *q_norm, const Lin *q_b,
                const Lin *kv_a, const float *kv_norm, const float *w_kvb, const Lin *o, const float *cos,
                const float *sin, float *cache, const int64_t *slot_mapping, const int64_t *key_slots,
                const uint8_t *key_mask, long S, float *scratch, float *y, int threads) {
    const long H = d->H, C = d->C, dq = d->dn + d->dr, W = C + d->dr, half = d->dr / 2, per = 2 * C + d->dr + S;
    float *qa = scratch, *q = qa + M * d->Rq, *kva = q + M * H * dq, *work = kva + M * W, *attn = work + M * H * per;
#pragma omp parallel num_threads(threads)
    {
        lin(kv_a, x, M, d->D, kva, W);
        if (d->Rq) {
            lin(q_a, x, M, d->D, qa, d->Rq);
#pragma omp for schedule(static)
            for (long m = 0; m < M; m++) rms_inplace(qa + m * d->Rq, d->Rq, q_norm, d->q_eps);
            lin(q_b, qa, M, d->Rq, q, H * dq);
        } else {
            lin(q_b, x, M, d->D, q, H * dq);
        }
#pragma omp for schedule(static)
        for (long m = 0; m < M; m++) {
            float *lat = kva + m * W;
            rms_inplace(lat, C, kv_norm, d->kv_eps);
            rope_pairs(lat + C, cos + m * half, sin + m * half, half);
            for (long h = 0; h < H; h++) rope_pairs(q + (m * H + h) * dq + d->dn, cos + m * half, sin + m * half, half);
            memcpy(cache + slot_mapping[m] * W, lat, W * sizeof(float));
        }
#pragma omp for schedule(static)
        for (long mh = 0; mh < M * H; mh++) {
            const long m = mh / H, h = mh % H;
            float *ql = work + mh * per, *p = ql + W, *ol = p + S;
            const float *qn = q + mh * dq, *wk = w_kvb + h * (d->dn + d->dv) * C, *wv = wk + d->dn * C;
            const int64_t *ks = key_slots + m * S;
            for (long c = 0; c < C; c++) ql[c] = 0.f;
            for (long i = 0; i < d->dn; i++) { /* q_lat = q_nope W_UK */
                const float a = qn[i], *row = wk + i * C;
#pragma omp simd
                for (long c = 0; c < C; c++) ql[c] += a * row[c];
            }
            memcpy(ql + C, qn + d->dn, d->dr * sizeof(float));
            float mx = -INFINITY, sum = 0.f;
            for (long s = 0; s < S; s++) {
                p[s] = (key_mask && !key_mask[m * S + s]) ? -INFINITY : dot_f32(ql, cache + ks[s] * W, W) * d->scale;
                mx = p[s] > mx ? p[s] : mx;
            }
            for (long s = 0; s < S; s++) {
                p[s] = p[s] == -INFINITY ? 0.f : expf(p[s] - mx);
                sum += p[s];
            }
            for (long c = 0; c < C; c++) ol[c] = 0.f;
            for (long s = 0; s < S; s++) {
                if (p[s] == 0.f) continue;
                const float w = p[s] / sum, *kv = cache + ks[s] * W;
#pragma omp simd
                for (long c = 0; c < C; c++) ol[c] += w * kv[c];
            }
            for (long v = 0; v < d->dv; v++) attn[mh * d->dv + v] = dot_f32(wv + v * C, ol, C);
        }
        lin(o, attn, M, H * d->dv, y, d->D);
    }
}
