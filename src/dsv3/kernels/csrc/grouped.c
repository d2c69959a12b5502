/* Routed experts for many tokens at once: rows grouped by expert, each group one small GEMM.
 *
 * A batched decode step sends ~N·K/E rows to each expert (16 at 64 tokens, top-4 of 16). PyTorch's
 * CPU grouped_mm over the stored [E, 2I, D] stacks reached ~90 GFLOP/s there (a third of what the
 * same FLOPs get as one GEMM), and the per-token kernels of a decode step (moe_lin) re-read every
 * expert's weights per token. Here the (token, expert) pairs are sorted by expert and each expert is
 * one task: a thread streams that expert's weights once while its rows multiply them in 4x4 register
 * blocks (`gemm_nt` in common.h: each weight row read once per 4 rows, the rows two blocks ahead
 * prefetched), SwiGLU runs between the two products, and each token sums its experts' outputs in
 * routing order. (MKL at these shapes re-packs every expert's weights per call and was slower.)
 * fp32 weights (stacked experts, gate_up fused or not); the result equals `moe_lin`'s to rounding.
 */
#include "common.h"

/* Floats of scratch `moe_grouped` needs. */
long moe_grouped_scratch(long M, long K, long D, long I, long E) {
    const long P = M * K;
    return 2 * (3 * P + 2 * E + 2) + P * (2 * D + 2 * I);
}

/* x [M, D]; idx / wt [M, K] (experts < E); gate / up: expert e's [I, D] at gate + e * gstride (floats; gate_up
 * fused: up = gate + I * D, same stride); down: expert e's [D, I] at down + e * dstride. y [M, D]. The scratch
 * (`moe_grouped_scratch` floats) is the caller's, reused across calls: fresh pages every call cost more than
 * the arithmetic. */
void moe_grouped(const float *x, const int64_t *idx, const float *wt, const float *gate, const float *up, long gstride,
                 const float *down, long dstride, float *y, long M, long K, long D, long I, long E, float *scratch,
                 int threads) {
    const long P = M * K;
    int64_t *off = (int64_t *)scratch, *fill = off + E + 1, *pos = fill + E + 1, *pair = pos + P;
    const long ldx = D, ldg = 2 * I, ldy = D; /* row strides of the gathered inputs, gate|up and outputs */
    float *xs = (float *)(pair + P), *gu = xs + P * ldx, *ys = gu + P * ldg;
    /* Pairs (token, k) sorted by expert, stably: pair[p] in expert order, pos[m * K + k] its place. */
    for (long e = 0; e <= E; e++) off[e] = 0;
    for (long j = 0; j < P; j++) off[idx[j] + 1]++;
    for (long e = 0; e < E; e++) off[e + 1] += off[e];
    memcpy(fill, off, E * sizeof(int64_t));
    for (long j = 0; j < P; j++) {
        pos[j] = fill[idx[j]]++;
        pair[pos[j]] = j;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long p = 0; p < P; p++) memcpy(xs + p * ldx, x + (pair[p] / K) * D, D * sizeof(float));
        /* expert by expert (one task each: a thread streams that expert's weights once, its rows stay in cache):
         * gate and up, SwiGLU, down */
#pragma omp for schedule(dynamic, 1)
        for (long e = 0; e < E; e++) {
            const long n = off[e + 1] - off[e];
            if (!n) continue;
            float *ge = gu + off[e] * ldg;
            gemm_nt(xs + off[e] * ldx, ldx, gate + e * gstride, D, ge, ldg, n, I, D);
            gemm_nt(xs + off[e] * ldx, ldx, up + e * gstride, D, ge + I, ldg, n, I, D);
            for (long p = 0; p < n; p++) swiglu_row(ge + p * ldg, ge + p * ldg + I, I);
            gemm_nt(ge, ldg, down + e * dstride, I, ys + off[e] * ldy, ldy, n, D, I);
        }
#pragma omp for schedule(static)
        for (long m = 0; m < M; m++) {
            float *ym = y + m * D;
            for (long d = 0; d < D; d++) ym[d] = 0.f;
            for (long k = 0; k < K; k++) {
                const float w = wt[m * K + k], *src = ys + pos[m * K + k] * ldy;
                for (long d = 0; d < D; d++) ym[d] += w * src[d];
            }
        }
    }
}
