/* Bandwidth-bound CPU kernels for few-token (decode) steps.
 *
 * At batch 1 a step reads every active weight once and does ~2 flops per weight, so the time is
 * memory traffic plus per-call overhead. These kernels stream each weight row once for all M
 * tokens, split rows across OpenMP threads in one parallel region per call, and fuse the whole
 * routed-expert SwiGLU (gate/up GEMV, silu, down GEMV, weighted sum over the K chosen experts)
 * into one call. Accumulation is fp32. Built at first use by dsv3/kernels/__init__.py.
 */
#include "common.h"

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* A dense SwiGLU MLP (dense layers, shared experts) for M tokens: y = down(silu(gate x) * up x); h scratch [M, I]. */
void mlp_decode(const Lin *gate, const Lin *up, const Lin *down, const float *x, float *h, float *y, long M, long D,
                long I, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long i = 0; i < I; i++)
            for (long m = 0; m < M; m++) h[m * I + i] = silu(lin_row(gate, i, x + m * D, D)) * lin_row(up, i, x + m * D, D);
        lin(down, h, M, I, y, D);
    }
}

/* Routed experts for M tokens with K choices each, the projections given as descriptors with expert
 * strides (fp32, int8 or int4): x [M, D]; idx [M, K] (int64 expert ids); wt [M, K] routing weights;
 * gate/up rows [I, D] and down rows [D, I] per expert; h scratch [M*K, I];
 * y [M, D] = sum_k wt[m,k] * down[e] @ (silu(gate[e] x) * up[e] x). */
void moe_lin(const float *x, const int64_t *idx, const float *wt, const Lin *gate, const Lin *up, const Lin *down,
             float *h, float *y, long M, long K, long D, long I, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long r = 0; r < M * K * I; r++) {
            long mk = r / I, i = r % I, e = idx[mk];
            const float *xm = x + (mk / K) * D;
            h[r] = silu(lin_row_e(gate, e, i, xm, D)) * lin_row_e(up, e, i, xm, D);
        }
#pragma omp for schedule(static)
        for (long r = 0; r < M * D; r++) {
            long m = r / D, d = r % D;
            float acc = 0.f;
            for (long k = 0; k < K; k++) {
                long mk = m * K + k;
                acc += wt[mk] * lin_row_e(down, idx[mk], d, h + mk * I, I);
            }
            y[r] = acc;
        }
    }
}

/* Any descriptor's y [M, N] = x [M, K] Wᵀ (the int8 and int4 linears). */
void linear_lin(const Lin *L, const float *x, float *y, long M, long N, long K, int threads) {
#pragma omp parallel num_threads(threads)
    lin(L, x, M, K, y, N);
}

/* DeepSeek-V3 router (sigmoid scores, `noaux_tc`): for each of N tokens, scores = sigmoid(W x);
 * selection uses scores + bias: keep the `topk_group` groups with the largest sum of their two best
 * biased scores, then the top `top_k` experts of those groups (descending); weights are the unbiased
 * scores of the chosen experts, normalised to sum 1 if `norm`, times `scale`. Ties go to the lower index. */
void route_noaux(const float *x, const float *w, const float *bias, long N, long D, long E, long n_group,
                 long topk_group, long top_k, int norm, float scale, int64_t *idx, float *wt, float *scores) {
    float choice[1024], gscore[64];
    int keep[64], taken[1024];
    long per = E / n_group;
    for (long n = 0; n < N; n++) {
        float *sc = scores + n * E;
        for (long e = 0; e < E; e++) {
            sc[e] = 1.f / (1.f + expf(-dot_f32(x + n * D, w + e * D, D)));
            choice[e] = sc[e] + (bias ? bias[e] : 0.f);
        }
        if (n_group > 1) {
            for (long g = 0; g < n_group; g++) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (long e = g * per; e < (g + 1) * per; e++) {
                    float v = choice[e];
                    if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) b2 = v;
                }
                gscore[g] = per > 1 ? b1 + b2 : b1;
                keep[g] = 0;
            }
            for (long t = 0; t < topk_group; t++) {
                long best = -1;
                for (long g = 0; g < n_group; g++)
                    if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                keep[best] = 1;
            }
            for (long e = 0; e < E; e++)
                if (!keep[e / per]) choice[e] = -INFINITY;
        }
        float sum = 0.f;
        for (long e = 0; e < E; e++) taken[e] = 0;
        for (long k = 0; k < top_k; k++) {
            long best = -1;
            for (long e = 0; e < E; e++)
                if (!taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
            taken[best] = 1;
            idx[n * top_k + k] = best;
            wt[n * top_k + k] = sc[best];
            sum += sc[best];
        }
        for (long k = 0; k < top_k; k++) {
            if (norm && top_k > 1) wt[n * top_k + k] /= sum + 1e-20f;
            wt[n * top_k + k] *= scale;
        }
    }
}

/* RMSNorm of M rows: y = w * x / sqrt(mean(x^2) + eps), fp32 (PyTorch's rms_norm costs ~10 us a row). */
void rms_norm_f32(const float *x, const float *w, float *y, long M, long D, float eps) {
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * D;
        float ss = dot_f32(xm, xm, D);
        float r = 1.f / sqrtf(ss / (float)D + eps);
        for (long d = 0; d < D; d++) y[m * D + d] = w[d] * (xm[d] * r);
    }
}

/* Greedy choice: out[m] = the first index of the largest value of row m of x [M, N], NaN never chosen (a row
 * without a number gives 0). A batched decode's logits are rows of tens of thousands: PyTorch's max(-1) took
 * ~0.6 ms for 64 rows of 32000 here, a few percent of the step. */
void argmax_rows(const float *x, long M, long N, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long m = 0; m < M; m++) {
        const float *r = x + m * N;
        float best = -INFINITY;
        long at = -1, n = 0;
#if defined(__AVX512F__)
        /* one pass: per lane the largest value and the first block it appeared in (a later block must be larger) */
        __m512 mv = _mm512_set1_ps(-INFINITY);
        __m512i mi = _mm512_set1_epi32(-1), cur = _mm512_setzero_si512();
        const __m512i step = _mm512_set1_epi32(1);
        for (; n + 16 <= N && N < (1L << 31); n += 16, cur = _mm512_add_epi32(cur, step)) {
            const __m512 v = _mm512_loadu_ps(r + n);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, mv, _CMP_GT_OQ); /* NaN compares false */
            mv = _mm512_mask_mov_ps(mv, gt, v);
            mi = _mm512_mask_mov_epi32(mi, gt, cur);
        }
        float vals[16];
        int32_t blocks[16];
        _mm512_storeu_ps(vals, mv);
        _mm512_storeu_si512(blocks, mi);
        for (int j = 0; j < 16; j++) /* the largest; on a tie the smaller index */
            if (blocks[j] >= 0) {
                const long idx = (long)blocks[j] * 16 + j;
                if (vals[j] > best || (vals[j] == best && (at < 0 || idx < at))) {
                    best = vals[j];
                    at = idx;
                }
            }
#endif
        for (; n < N; n++)
            if (r[n] > best) {
                best = r[n];
                at = n;
            }
        out[m] = at < 0 ? 0 : at; /* nothing above -inf: index 0, as argmax over NaN-as--inf gives */
    }
}
