/* Routed experts for many tokens at once: rows grouped by expert, each group one small GEMM.
 *
 * A batched decode step sends ~N·K/E rows to each expert (16 at 64 tokens, top-4 of 16). PyTorch's
 * CPU grouped_mm over the stored [E, 2I, D] stacks reached ~90 GFLOP/s there (a third of what the
 * same FLOPs get as one GEMM), and the per-token kernels of a decode step (moe_lin) re-read every
 * expert's weights per token. Here the (token, expert) pairs are sorted by expert, each expert's
 * rows multiply its weights in 4x4 register blocks (each weight row read once per 4 rows), SwiGLU
 * runs between the two products, and each token sums its experts' outputs in routing order.
 * (The 4x4 blocks are `gemm_nt` in common.h.)
 * fp32 weights (stacked experts, gate_up fused or not); the result equals `moe_lin`'s to rounding.
 */
#include "common.h"

static inline float silu_f(float v) { return v / (1.f + exp_fast(-v)); }

#define COLS 32 /* output columns per task */

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
    float *xs = (float *)(pair + P), *gu = xs + P * D, *ys = gu + P * 2 * I;
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
        for (long p = 0; p < P; p++) memcpy(xs + p * D, x + (pair[p] / K) * D, D * sizeof(float));
        /* gate and up: tasks (expert, block of COLS of the 2I outputs) */
        const long gblocks = (2 * I + COLS - 1) / COLS, dblocks = (D + COLS - 1) / COLS;
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < E * gblocks; t++) {
            const long e = t / gblocks, c0 = (t % gblocks) * COLS, n = off[e + 1] - off[e];
            if (!n) continue;
            const long c1 = c0 + COLS < 2 * I ? c0 + COLS : 2 * I;
            for (long c = c0; c < c1;) { /* a block never straddles gate and up */
                const long end = c < I ? (c1 < I ? c1 : I) : c1;
                const float *w = c < I ? gate + e * gstride + c * D : up + e * gstride + (c - I) * D;
                gemm_nt(xs + off[e] * D, D, w, D, gu + off[e] * 2 * I + c, 2 * I, n, end - c, D);
                c = end;
            }
        }
#pragma omp for schedule(static)
        for (long p = 0; p < P; p++) {
            float *g = gu + p * 2 * I;
            for (long i = 0; i < I; i++) g[i] = silu_f(g[i]) * g[I + i];
        }
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < E * dblocks; t++) {
            const long e = t / dblocks, c0 = (t % dblocks) * COLS, n = off[e + 1] - off[e];
            if (!n) continue;
            const long c1 = c0 + COLS < D ? c0 + COLS : D;
            gemm_nt(gu + off[e] * 2 * I, 2 * I, down + e * dstride + c0 * I, I, ys + off[e] * D + c0, D, n, c1 - c0, I);
        }
#pragma omp for schedule(static)
        for (long m = 0; m < M; m++) {
            float *ym = y + m * D;
            for (long d = 0; d < D; d++) ym[d] = 0.f;
            for (long k = 0; k < K; k++) {
                const float w = wt[m * K + k], *src = ys + pos[m * K + k] * D;
                for (long d = 0; d < D; d++) ym[d] += w * src[d];
            }
        }
    }
}
