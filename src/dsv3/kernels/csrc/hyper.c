/* mHC's split and Sinkhorn (DeepSeek-V4's residual mixing, dsv3/layers/hyper.py) for every row in one call.
 *
 * Per block and token the official `hc_split_sinkhorn` turns (2 + n)·n mixes into pre [n], post [n] and an n x n
 * near doubly stochastic comb: a softmax, then a column normalisation and `iters - 1` row-and-column rounds. In
 * PyTorch that is ~120 tensor ops of a few values each per call (20 rounds): ~0.25 ms (bench/hc_sinkhorn.py), nine calls a decode step of
 * the embedded long model, a fifth of its step. Here it is one pass over the rows, in fp32, in the reference's
 * order of operations (`dsv3.ops.reference.hc_sinkhorn`). */
#include "common.h"

static inline float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

/* mixes [M, (2 + n) n]; scale [3]; base [(2 + n) n] -> pre [M, n], post [M, n], comb [M, n, n]. n <= 16. */
void hc_sinkhorn_f32(const float *mixes, const float *scale, const float *base, long M, long n, long iters, float eps,
                     float *pre, float *post, float *comb, int threads) {
    const long W = (2 + n) * n;
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 64)
    for (long m = 0; m < M; m++) {
        const float *x = mixes + m * W;
        float *c = comb + m * n * n;
        for (long i = 0; i < n; i++) {
            pre[m * n + i] = sigmoidf_(x[i] * scale[0] + base[i]) + eps;
            post[m * n + i] = 2.f * sigmoidf_(x[n + i] * scale[1] + base[n + i]);
        }
        for (long i = 0; i < n; i++) { /* softmax over each row, + eps */
            float *r = c + i * n, top = -INFINITY, sum = 0.f;
            for (long j = 0; j < n; j++) {
                r[j] = x[2 * n + i * n + j] * scale[2] + base[2 * n + i * n + j];
                top = r[j] > top ? r[j] : top;
            }
            for (long j = 0; j < n; j++) sum += (r[j] = expf(r[j] - top));
            for (long j = 0; j < n; j++) r[j] = r[j] / sum + eps;
        }
        for (long round = 0; round < iters; round++) {
            if (round > 0) /* rows (the first round normalises columns only) */
                for (long i = 0; i < n; i++) {
                    float s = 0.f;
                    for (long j = 0; j < n; j++) s += c[i * n + j];
                    s += eps;
                    for (long j = 0; j < n; j++) c[i * n + j] /= s;
                }
            for (long j = 0; j < n; j++) {
                float s = 0.f;
                for (long i = 0; i < n; i++) s += c[i * n + j];
                s += eps;
                for (long i = 0; i < n; i++) c[i * n + j] /= s;
            }
        }
    }
}
