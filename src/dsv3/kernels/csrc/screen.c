/* The greedy choice of a batched decode step without the fp32 LM head over every row.
 *
 * At 64 rows the fp32 head was a quarter of the bench model's step (8.4 of ~31 ms, ~250 GFLOP/s), and greedy
 * decoding keeps one number of each row of logits: its argmax. `dsv3::screened_greedy` (ops.cpp) multiplies bf16
 * copies of the hidden states and the head (oneDNN's bf16 GEMM, AMX where the CPU has it: ~3x the fp32 rate) into
 * bf16 `approx`, whose every entry is within eps[m] of the fp32 logit (eps from the rounding of bf16 inputs, fp32
 * accumulation and the bf16 output: see ops.cpp). Any column the fp32 product ranks first then lies
 * within 2 eps[m] of the row's largest approx; only those columns are recomputed in fp32 here and the largest of
 * them is the token. So the token is the fp32 head's argmax -- up to the order of its fp32 sums, which no two
 * GEMMs share either -- at the cost of a few dot products per row (~11 on the bench model). */
#include "common.h"

static inline float bf16_f32(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}
#if defined(__AVX512F__)
static inline __m512 ld_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

/* Take column c into the running best (the first of equal values; NaN compares false, never chosen over a number). */
static inline void consider(const float *x, const float *w, long K, long c, float *best, long *at) {
    const float v = dot_f32(x, w + c * K, K);
    if (v > *best || (*at < 0 && !isnan(v))) {
        *best = v;
        *at = c;
    }
}

/* out[m] = the first column of the largest fp32 h[m] . W[n] among the columns whose approx[m, n] >= (the row's
 * largest approx) - 2 eps[m]; NaN never chosen. A row whose approx or eps is not finite (an overflowing or NaN
 * hidden state, a non-finite weight) is recomputed whole, as the fp32 head would be. */
void screened_argmax(const float *h, long M, long K, const float *w, long V, const uint16_t *approx, const float *eps,
                     int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (long m = 0; m < M; m++) {
        const uint16_t *a16 = approx + m * V;
        const float *x = h + m * K;
        float top = -INFINITY, low = INFINITY;
        int nan = 0;
        long n = 0;
#if defined(__AVX512F__)
        __m512 vt = _mm512_set1_ps(-INFINITY), vl = _mm512_set1_ps(INFINITY);
        __mmask16 un = 0;
        for (; n + 16 <= V; n += 16) {
            const __m512 v = ld_bf16(a16 + n);
            un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            vt = _mm512_max_ps(vt, v);
            vl = _mm512_min_ps(vl, v);
        }
        top = _mm512_reduce_max_ps(vt);
        low = _mm512_reduce_min_ps(vl);
        nan = un != 0;
#endif
        for (; n < V; n++) {
            const float v = bf16_f32(a16[n]);
            nan |= isnan(v);
            top = v > top ? v : top;
            low = v < low ? v : low;
        }
        const int finite = !nan && isfinite(top) && isfinite(low) && isfinite(eps[m]);
        const float floor_ = finite ? top - 2.f * eps[m] : -INFINITY;
        float best = -INFINITY;
        long at = -1;
        n = 0;
#if defined(__AVX512F__)
        const __m512 vf = _mm512_set1_ps(floor_);
        for (; finite && n + 16 <= V; n += 16) {
            __mmask16 hit = _mm512_cmp_ps_mask(ld_bf16(a16 + n), vf, _CMP_GE_OQ);
            for (; hit; hit &= hit - 1) consider(x, w, K, n + __builtin_ctz(hit), &best, &at);
        }
#endif
        for (; n < V; n++) /* the tail; every column of a row that is not finite */
            if (!finite || bf16_f32(a16[n]) >= floor_) consider(x, w, K, n, &best, &at);
        out[m] = at < 0 ? 0 : at;
    }
}
