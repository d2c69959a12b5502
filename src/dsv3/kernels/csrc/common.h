/* Helpers shared by the decode kernels: fp32 dot products over fp32 or int8 weight rows. */
#pragma once
#ifdef __cplusplus
extern "C" {
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
/* AVX-512: four independent accumulators (a single one makes every multiply-add wait for the
 * previous one) and masked loads for the tail, so rows of 80 or 96 values cost no scalar loop. */
static inline __m512 ld_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline __m512 ld_f32_tail(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 ld_i8_tail(const int8_t *p, __mmask16 m) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p))); }
#define DOT_AVX512(LOAD, LOAD_TAIL)                                                                     \
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps(); \
    long k = 0;                                                                                         \
    for (; k + 64 <= n; k += 64) {                                                                      \
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), LOAD(b + k), s0);                                  \
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), LOAD(b + k + 16), s1);                        \
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 32), LOAD(b + k + 32), s2);                        \
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 48), LOAD(b + k + 48), s3);                        \
    }                                                                                                   \
    for (; k + 16 <= n; k += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), LOAD(b + k), s0);        \
    if (k < n) {                                                                                        \
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);                                                 \
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), LOAD_TAIL(b + k, m), s1);                 \
    }                                                                                                   \
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));

static inline float dot_f32(const float *restrict a, const float *restrict b, long n) { DOT_AVX512(_mm512_loadu_ps, ld_f32_tail) }
static inline float dot_i8(const float *restrict a, const int8_t *restrict b, long n) { DOT_AVX512(ld_i8, ld_i8_tail) }

/* int4 blocks of 32 (see Lin): w = u * scale + bias per group, one 16-byte load per block. */
static inline float dot_u4(const float *restrict x, const uint8_t *restrict p, const float *scale, const float *bias,
                           long K, long group) {
    /* Groups in the outer loop (no division per block), two blocks per step into four accumulators. */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
    const __m128i low = _mm_set1_epi8(15);
#define U4_BLOCK(B, A0, A1)                                                                                        \
    {                                                                                                             \
        const __m128i q = _mm_loadu_si128((const __m128i *)(p + (B) / 2));                                        \
        const __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);                 \
        A0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + (B)), _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), sc, c), A0); \
        A1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + (B) + 16), _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), sc, c), A1); \
    }
    for (long g = 0, b = 0; b < K; g++) {
        const __m512 sc = _mm512_set1_ps(scale[g]), c = _mm512_set1_ps(bias[g]);
        const long end = b + group;
        for (; b + 64 <= end; b += 64) {
            U4_BLOCK(b, acc0, acc1)
            U4_BLOCK(b + 32, acc2, acc3)
        }
        if (b < end) {
            U4_BLOCK(b, acc0, acc1)
            b += 32;
        }
    }
#undef U4_BLOCK
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}
#else
/* Portable: 16 partial sums, so the compiler's vectors need not wait on one accumulator. */
#define DOT_BODY                                                                                        \
    float acc[16] = {0.f};                                                                              \
    long k = 0;                                                                                         \
    for (; k + 16 <= n; k += 16) {                                                                      \
        _Pragma("omp simd") for (int j = 0; j < 16; j++) acc[j] += a[k + j] * (float)b[k + j];          \
    }                                                                                                   \
    float s = 0.f;                                                                                      \
    for (int j = 0; j < 16; j++) s += acc[j];                                                           \
    for (; k < n; k++) s += a[k] * (float)b[k];                                                         \
    return s;

static inline float dot_f32(const float *restrict a, const float *restrict b, long n) { DOT_BODY }
static inline float dot_i8(const float *restrict a, const int8_t *restrict b, long n) { DOT_BODY }

static inline float dot_u4(const float *restrict x, const uint8_t *restrict p, const float *scale, const float *bias,
                           long K, long group) {
    float s = 0.f;
    for (long b = 0; b < K; b += 32) {
        const float sc = scale[b / group], c = bias[b / group];
        for (int j = 0; j < 16; j++)
            s += x[b + j] * ((float)(p[b / 2 + j] & 15) * sc + c) + x[b + j + 16] * ((float)(p[b / 2 + j] >> 4) * sc + c);
    }
    return s;
}
#endif

/* e^x to ~2e-7 relative for |x| < 87, in plain arithmetic (no libm call), so loops over it vectorize:
 * 2^t with t = x log2(e) split into n + f, |f| <= 1/2, 2^f a degree-6 polynomial, 2^n built in the exponent. */
static inline float exp_fast(float x) {
    x = x < -87.f ? -87.f : (x > 87.f ? 87.f : x);
    const float t = x * 1.44269504f;
    const int n = (int)(t + (t >= 0.f ? 0.5f : -0.5f));
    const float f = t - (float)n;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.f;
    union { int32_t i; float f; } u = {.i = (n + 127) << 23};
    return p * u.f;
}

#if defined(__AVX512F__)
/* exp_fast on 16 lanes. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(87.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* g[i] = silu(g[i]) u[i] = g u / (1 + e^-g) for i < n: SwiGLU's gating, 16 at a time. */
static inline void swiglu_row(float *restrict g, const float *restrict u, long n) {
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512 a = _mm512_loadu_ps(g + i), ex = exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));
        _mm512_storeu_ps(g + i, _mm512_div_ps(_mm512_mul_ps(a, _mm512_loadu_ps(u + i)), _mm512_add_ps(_mm512_set1_ps(1.f), ex)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.f + exp_fast(-g[i])) * u[i];
}

/* C[r, c] = sum_k A[r, k] B[c, k] for r < R, c < N: rows of A and B contiguous in k (a linear layer's weight as
 * B), in 4x4 blocks of dot products, each weight row read once per 4 rows of A. */
#if defined(__AVX512F__)
/* 16 accumulators -> one vector of their 16 sums (lane 4i + j: accumulator 4i + j), in ~45 shuffles and adds
 * instead of 16 separate reductions. */
static inline __m512 sum16(const __m512 *v) {
    __m512 u[8], w[4];
    for (int i = 0; i < 8; i++)
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(u[2 * i]), _mm512_castps_pd(u[2 * i + 1]))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(u[2 * i]), _mm512_castps_pd(u[2 * i + 1]))));
    /* each 128-bit lane of w[i] holds that lane's partial sums of accumulators 4i .. 4i+3, in order; add the lanes */
    const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
    const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}
#endif

#if defined(__AVX512F__)
/* One block of gemm_nt: C[i, j] for i < rows, j < cols (both <= 4, constants where it is inlined), the k loop
 * prefetching one line per step of each row in pf[0..np) (weight rows of a later block). */
static inline __attribute__((always_inline)) void gemm_block(const float *restrict A, long lda, const float *restrict B,
                                                             long ldb, float *restrict C, long ldc, long K, const int rows,
                                                             const int cols, const float *const *pf, int np) {
    __m512 acc[16];
    const float *a[4], *b[4];
    for (int i = 0; i < 4; i++) { /* rows / columns past the block's repeat its first (computed, not stored) */
        a[i] = A + (i < rows ? i : 0) * lda;
        b[i] = B + (i < cols ? i : 0) * ldb;
    }
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int q = 0; q < np; q++) _mm_prefetch((const char *)(pf[q] + k), _MM_HINT_T1);
        __m512 av[4];
        for (int i = 0; i < rows; i++) av[i] = _mm512_loadu_ps(a[i] + k);
        for (int j = 0; j < cols; j++) {
            const __m512 bv = _mm512_loadu_ps(b[j] + k);
            for (int i = 0; i < rows; i++) acc[4 * i + j] = _mm512_fmadd_ps(av[i], bv, acc[4 * i + j]);
        }
    }
    if (k < K) {
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        for (int i = 0; i < rows; i++) {
            const __m512 av = _mm512_maskz_loadu_ps(m, a[i] + k);
            for (int j = 0; j < cols; j++)
                acc[4 * i + j] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, b[j] + k), acc[4 * i + j]);
        }
    }
    float out[16];
    _mm512_storeu_ps(out, sum16(acc));
    for (int i = 0; i < rows; i++) memcpy(C + i * ldc, out + 4 * i, cols * sizeof(float));
}

/* gemm_block with `rows` rows (1-4) made a constant: each count its own unrolled loop. */
static inline void gemm_rows(const float *A, long lda, const float *B, long ldb, float *C, long ldc, long K, int rows,
                             int cols, const float *const *pf, int np) {
    if (cols == 4) {
        switch (rows) {
        case 4: gemm_block(A, lda, B, ldb, C, ldc, K, 4, 4, pf, np); break;
        case 3: gemm_block(A, lda, B, ldb, C, ldc, K, 3, 4, pf, np); break;
        case 2: gemm_block(A, lda, B, ldb, C, ldc, K, 2, 4, pf, np); break;
        default: gemm_block(A, lda, B, ldb, C, ldc, K, 1, 4, pf, np);
        }
    } else { /* the last 1-3 columns: rare, one code for them */
        switch (rows) {
        case 4: gemm_block(A, lda, B, ldb, C, ldc, K, 4, cols, pf, np); break;
        case 3: gemm_block(A, lda, B, ldb, C, ldc, K, 3, cols, pf, np); break;
        case 2: gemm_block(A, lda, B, ldb, C, ldc, K, 2, cols, pf, np); break;
        default: gemm_block(A, lda, B, ldb, C, ldc, K, 1, cols, pf, np);
        }
    }
}
#endif

static inline void gemm_nt(const float *restrict A, long lda, const float *restrict B, long ldb, float *restrict C,
                           long ldc, long R, long N, long K) {
#if defined(__AVX512F__)
    /* columns outer: a block's 4 weight rows stay in L1 while every group of 4 rows of A passes over them (the last
     * group 1-3 rows, as its own unrolled block). Each group prefetches, a line per k step, weight rows of the block
     * after next: the weights stream from L3 or memory (a row of experts' weights is read by one block only), the
     * four rows spread over the groups (a few groups take several). */
    const long G = (R + 3) / 4;
    for (long c = 0; c < N; c += 4) {
        const int cols = N - c < 4 ? (int)(N - c) : 4;
        const float *pf[4];
        for (long g = 0; g < G; g++) {
            int np = 0;
            if (c + 12 <= N) { /* the last of fewer than 4 groups takes the rows left */
                const long j0 = g % 4, j1 = G < 4 && g == G - 1 ? 4 : j0 + 1;
                for (long j = j0; j < j1; j++) pf[np++] = B + (c + 8 + j) * ldb;
            }
            const long r = 4 * g;
            gemm_rows(A + r * lda, lda, B + c * ldb, ldb, C + r * ldc + c, ldc, K, R - r < 4 ? (int)(R - r) : 4, cols,
                      pf, np);
        }
    }
#else
    for (long r = 0; r < R; r++)
        for (long cc = 0; cc < N; cc++) C[r * ldc + cc] = dot_f32(A + r * lda, B + cc * ldb, K);
#endif
}

/* A linear layer's weight as the kernels read it:
 *   kind 0: fp32 [N, K];  kind 1: int8 [N, K] with a scale per row;
 *   kind 2: int4 [N, K/2] bytes in blocks of 32 values (byte j of a block holds value j in its low
 *           nibble and value j+16 in its high one), with per-(row, group) scale and bias:
 *           w = u * scale + bias for u in 0..15 (bias = -zero_point * scale).
 * ew / es: the offset of expert e's weight (bytes) and scales (floats), for stacked experts. */
typedef struct {
    const void *w;
    const float *scale;
    const float *bias;
    long kind, group, ew, es;
    const void *packed; /* kind 0: the weight packed for the BLAS (`dsv3::pack_linear`), which batched steps use; or NULL */
} Lin;

/* Row n of expert e's weight times x (K inputs). */
static inline float lin_row_e(const Lin *L, long e, long n, const float *x, long K) {
    if (L->kind == 0) return dot_f32(x, (const float *)L->w + e * L->ew / 4 + n * K, K);
    if (L->kind == 1) return L->scale[e * L->es + n] * dot_i8(x, (const int8_t *)L->w + e * L->ew + n * K, K);
    long G = K / L->group;
    return dot_u4(x, (const uint8_t *)L->w + e * L->ew + n * K / 2, L->scale + e * L->es + n * G,
                  L->bias + e * L->es + n * G, K, L->group);
}

static inline float lin_row(const Lin *L, long n, const float *x, long K) { return lin_row_e(L, 0, n, x, K); }

/* y[m, n] = x[m] · W[n] for M rows; work-shared over n (call inside a parallel region). */
static inline void lin(const Lin *L, const float *x, long M, long K, float *y, long N) {
#pragma omp for schedule(static)
    for (long n = 0; n < N; n++)
        for (long m = 0; m < M; m++) y[m * N + n] = lin_row(L, n, x + m * K, K);
}

/* RMSNorm of one row in place; interleaved-pair rotary (x[2i], x[2i+1]) of one head's rope part. */
static inline void rms_inplace(float *x, long n, const float *w, float eps) {
    float r = 1.f / sqrtf(dot_f32(x, x, n) / (float)n + eps);
    for (long i = 0; i < n; i++) x[i] = w[i] * (x[i] * r);
}

static inline void rope_pairs(float *x, const float *cos, const float *sin, long half) {
    for (long i = 0; i < half; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cos[i] - b * sin[i];
        x[2 * i + 1] = b * cos[i] + a * sin[i];
    }
}

/* The BLAS PyTorch was built with (ops.cpp: its Fortran sgemm_, else at::mm), column-major as BLAS: c[m, n] =
 * alpha op(a) op(b) + beta c, op transposing when ta / tb. Called outside OpenMP regions it uses PyTorch's
 * threads, inside one a single thread. */
void dsv3_sgemm(int ta, int tb, long m, long n, long k, float alpha, const float *a, long lda, const float *b, long ldb,
                float beta, float *c, long ldc);

/* y[M, N] = x[M, K] · Wᵀ for a weight packed by the op `dsv3::pack_linear` (MKL's packed GEMM; ops.cpp). */
void dsv3_sgemm_packed(long M, long N, long K, const float *x, const void *packed, float *y);

/* Row-major products on `dsv3_sgemm`: y[M, N] (row stride ldy) = x[M, K] (ldx) · W[N, K]ᵀ (ldw), a linear layer;
 * and y = x · B[K, N] (ldb). */
static inline void mm_nt(const float *x, long ldx, const float *w, long ldw, float *y, long ldy, long M, long N, long K) {
    dsv3_sgemm(1, 0, N, M, K, 1.f, w, ldw, x, ldx, 0.f, y, ldy);
}

static inline void mm_nn(const float *x, long ldx, const float *b, long ldb, float *y, long ldy, long M, long N, long K) {
    dsv3_sgemm(0, 0, N, M, K, 1.f, b, ldb, x, ldx, 0.f, y, ldy);
}

/* y[M, N] = x[M, K] · Wᵀ for an fp32 linear (row strides ldx / ldy): its packed copy when it has one and the rows
 * are dense, else `mm_nt` on the weight. */
static inline void lin_mm(const Lin *L, const float *x, long ldx, float *y, long ldy, long M, long N, long K) {
    if (L->packed && ldx == K && ldy == N) dsv3_sgemm_packed(M, N, K, x, L->packed, y);
    else mm_nt(x, ldx, (const float *)L->w, K, y, ldy, M, N, K);
}

/* MLA shapes (mla.c) and the kernels a whole decode step (step.c) calls. */
typedef struct {
    long D, H, dn, dr, dv, C, Rq; /* hidden, heads, nope/rope/value head dims, kv_lora_rank, q_lora_rank (0: q_proj) */
    float q_eps, kv_eps, scale;   /* the two RMSNorm epsilons and the softmax scale */
} MLADims;

void mla_decode(const MLADims *d, const float *x, long M, const Lin *q_a, const float *q_norm, const Lin *q_b,
                const Lin *kv_a, const float *kv_norm, const float *w_kvb, const Lin *o, const float *cos,
                const float *sin, float *cache, const int64_t *slot_mapping, const int64_t *key_slots,
                const uint8_t *key_mask, long S, float *scratch, float *y, int threads);
void mlp_decode(const Lin *gate, const Lin *up, const Lin *down, const float *x, float *h, float *y, long M, long D,
                long I, int threads);
void moe_lin(const float *x, const int64_t *idx, const float *wt, const Lin *gate, const Lin *up, const Lin *down,
             float *h, float *y, long M, long K, long D, long I, int threads);
void route_noaux(const float *x, const float *w, const float *bias, long N, long D, long E, long n_group,
                 long topk_group, long top_k, int norm, float scale, int64_t *idx, float *wt, float *scores);
void rms_norm_f32(const float *x, const float *w, float *y, long M, long D, float eps);
void argmax_rows(const float *x, long M, long N, int64_t *out, int threads);
void screened_argmax(const float *h, long M, long K, const float *w, long V, const uint16_t *approx, const float *eps,
                     int64_t *out, int threads);
void hc_sinkhorn_f32(const float *mixes, const float *scale, const float *base, long M, long n, long iters, float eps,
                     float *pre, float *post, float *comb, int threads);
void index_topk_f32(const float *q, const float *w, const float *keys, const int64_t *n_visible, long B, long T,
                    long H, long D, long S, long kk, int64_t *out_idx, uint8_t *out_ok, int threads);
void linear_lin(const Lin *L, const float *x, float *y, long M, long N, long K, int threads);
long moe_grouped_scratch(long M, long K, long D, long I, long E);
void moe_grouped(const float *x, const int64_t *idx, const float *wt, const float *gate, const float *up, long gstride,
                 const float *down, long dstride, float *y, long M, long K, long D, long I, long E, float *scratch,
                 int threads);
void mla_attend(const float *q, long M, long H, long W, long C, const float *cache, const int64_t *key_slots, long S,
                const int64_t *key_lens, float scale, float *out, int threads);
void attend_row(const float *qm, long H, long W, long C, const float *cache, const int64_t *ks, const uint8_t *mask,
                long n, float scale, float *o);
#ifdef __cplusplus
}
#endif
