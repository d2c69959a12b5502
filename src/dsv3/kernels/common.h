/* Helpers shared by the decode kernels: fp32 dot products over fp32 or int8 weight rows. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float dot_f32(const float *restrict a, const float *restrict b, long n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (long k = 0; k < n; k++) s += a[k] * b[k];
    return s;
}

static inline float dot_i8(const float *restrict a, const int8_t *restrict b, long n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (long k = 0; k < n; k++) s += a[k] * (float)b[k];
    return s;
}

/* A linear layer's weight as the kernels read it. kind 0: fp32 [N, K]; 1: int8 [N, K] with a scale per row. */
typedef struct { const void *w; const float *scale; long kind; } Lin;

static inline float lin_row(const Lin *L, long n, const float *x, long K) {
    if (L->kind == 0) return dot_f32(x, (const float *)L->w + n * K, K);
    return L->scale[n] * dot_i8(x, (const int8_t *)L->w + n * K, K);
}

/* y[m, n] = x[m] · W[n] for M rows; work-shared over n (call inside a parallel region). */
static inline void lin(const Lin *L, const float *x, long M, long K, float *y, long N) {
#pragma omp for schedule(static)
    for (long n = 0; n < N; n++)
        for (long m = 0; m < M; m++) y[m * N + n] = lin_row(L, n, x + m * K, K);
}
