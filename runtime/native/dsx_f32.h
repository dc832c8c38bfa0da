/* fp32 kernels of dsx.h (included by it, after its vector helpers): weight rows against 1-7
 * tokens, dot products, and the transposed GEMVs of the latent attention (fp32 or fp16 weights). */
#ifndef DSX_F32_H
#define DSX_F32_H

/* fp32 weight rows [r0, r1) (row stride K) against T = 1-2 tokens: out[t][r - r0]. Two tokens: two
 * rows per pass share each token's loads (a prompt's groups that reuse rows from cache); one:
 * row by row. 3-7 tokens: rows_f32_wide. */
static inline float dot_f32(const float *w, const float *x, int K);
DSX_INLINE void rows_f32_t(const float *W, int K, int r0, int r1, const int T, const float *const *x, float *const *out) {
#if defined(DSX_AVX2)
    int r = T > 1 ? r0 : r1; /* one token: row by row (four FMA chains; measured faster at decode) */
    for (; r + 2 <= r1; r += 2) {
        const float *w0 = W + (size_t)r * K, *w1 = w0 + K;
        __m256 acc[2][4];
        for (int t = 0; t < 4; t++) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
        int k = 0;
        for (; k + 8 <= K; k += 8) {
            if (!(k & 15)) {
                _mm_prefetch((const char *)(w0 + k + 1024), _MM_HINT_T0);
                _mm_prefetch((const char *)(w1 + k + 1024), _MM_HINT_T0);
            }
            const __m256 a = _mm256_loadu_ps(w0 + k), b = _mm256_loadu_ps(w1 + k);
            for (int t = 0; t < T; t++) {
                const __m256 xt = _mm256_loadu_ps(x[t] + k);
                acc[0][t] = _mm256_fmadd_ps(a, xt, acc[0][t]);
                acc[1][t] = _mm256_fmadd_ps(b, xt, acc[1][t]);
            }
        }
        for (int t = 0; t < T; t++) {
            float s0 = hsum_ps(acc[0][t]), s1 = hsum_ps(acc[1][t]);
            for (int j = k; j < K; j++) s0 += w0[j] * x[t][j], s1 += w1[j] * x[t][j];
            out[t][r - r0] = s0;
            out[t][r + 1 - r0] = s1;
        }
    }
    for (r = T > 1 ? r : r0; r < r1; r++) /* (a software prefetch here made fp32 decode 20-30% slower) */
        for (int t = 0; t < T; t++) out[t][r - r0] = dot_f32(W + (size_t)r * K, x[t], K);
#else
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < T; t++) out[t][r - r0] = dot_f32(W + (size_t)r * K, x[t], K);
#endif
}

/* fp32 rows against 2 tokens streamed once (a verify step, an expert's two tokens): one row at a
 * time, two FMA chains per token. Streams DRAM faster than two rows per pass (M's head, 2 tokens:
 * 17.3-17.5 against 14.4-16.2 GB/s on the 2-core EPYC; benchmarks in docs/performance.md); groups
 * of 2 that reuse rows from cache keep rows_f32_t. */
DSX_INLINE void rows_f32_few(const float *W, int K, int r0, int r1, const int T, const float *const *x,
                             float *const *out) {
#if defined(DSX_AVX2)
    for (int r = r0; r < r1; r++) {
        const float *w = W + (size_t)r * K;
        __m256 a[3][2];
        for (int t = 0; t < 3; t++) a[t][0] = a[t][1] = _mm256_setzero_ps();
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
            for (int t = 0; t < T; t++) {
                a[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t] + k), a[t][0]);
                a[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t] + k + 8), a[t][1]);
            }
        }
        for (int t = 0; t < T; t++) {
            float sum = hsum_ps(_mm256_add_ps(a[t][0], a[t][1]));
            for (int j = k; j < K; j++) sum += w[j] * x[t][j];
            out[t][r - r0] = sum;
        }
    }
#else
    rows_f32_t(W, K, r0, r1, T, x, out);
#endif
}

/* fp32 rows against 3-7 tokens in one pass (a prompt: a linear layer's tokens in groups, an
 * expert's tokens at once), R rows x T tokens per tile: R x T accumulators, R + T loads per R x T
 * FMAs. R is set for the memory, not the FMAs: a pass over rows it cannot hold in cache is bound by
 * how many rows stream at once (the misses in flight): at 2 rows per tile fp32 prompt rows
 * streamed at ~10 GB/s per core on the 2-core EPYC against 21-24 for a one-token dot; tiles of 6
 * rows x 3-4 tokens, 4 x 5-6 and 3 x 7 streamed 20-25% faster there with two threads, and a
 * prefetch of the rows two tiles ahead into L2 (not L1: that was no faster) took a 64-token
 * prompt on M from 315 to 272 ms (medians; docs/performance.md). Sized to the registers: 32 with
 * AVX-512VL (ymm16-31), else 16.
 * Each output is one accumulator over k in order, as in rows_f32_t: the tile shape does not change
 * the sums. */
#if defined(__AVX512VL__)
#define DSX_VREGS 32
#else
#define DSX_VREGS 16
#endif
static inline int tile_rows(int T) { /* 3 <= T <= MAX_GROUP */
    static const int wide[MAX_GROUP + 1] = {0, 0, 0, 6, 6, 4, 4, 3}, narrow[MAX_GROUP + 1] = {0, 0, 0, 3, 2, 2, 2, 1};
    return DSX_VREGS >= 32 ? wide[T] : narrow[T];
}
DSX_INLINE void tile_f32(const float *W, int K, int r, int r0, const int R, const int T, const float *const *x,
                         float *const *out) {
#if defined(DSX_AVX2)
    const float *w = W + (size_t)r * K;
    __m256 acc[6][MAX_GROUP];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) acc[i][t] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[6];
        if (!(k & 15)) /* the rows two tiles on, into L2 (a prefetch never faults past the matrix) */
            for (int i = 0; i < R; i++) _mm_prefetch((const char *)(w + (size_t)(i + 2 * R) * K + k), _MM_HINT_T1);
        for (int i = 0; i < R; i++) wv[i] = _mm256_loadu_ps(w + (size_t)i * K + k);
        for (int t = 0; t < T; t++) {
            const __m256 xt = _mm256_loadu_ps(x[t] + k);
            for (int i = 0; i < R; i++) acc[i][t] = _mm256_fmadd_ps(wv[i], xt, acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) {
            float sum = hsum_ps(acc[i][t]);
            for (int j = k; j < K; j++) sum += w[(size_t)i * K + j] * x[t][j];
            out[t][r + i - r0] = sum;
        }
#endif
}
DSX_INLINE void rows_f32_wide(const float *W, int K, int r0, int r1, const int T, const float *const *x,
                              float *const *out) {
#if defined(DSX_AVX2)
    const int R = tile_rows(T);
    int r = r0;
    for (; r + R <= r1; r += R) tile_f32(W, K, r, r0, R, T, x, out);
    for (; r < r1; r++) tile_f32(W, K, r, r0, 1, T, x, out);
#else
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < T; t++) out[t][r - r0] = dot_f32(W + (size_t)r * K, x[t], K);
#endif
}

/* T a constant in each call below: the accumulators stay in registers. once: these T tokens are
 * all the rows will see (streamed from memory once); else rows come back for more tokens from cache. */
static inline void rows_f32(const float *W, int K, int r0, int r1, int T, const float *const *x, float *const *out,
                            int once) {
    switch (T) {
    case 7: rows_f32_wide(W, K, r0, r1, 7, x, out); break;
    case 6: rows_f32_wide(W, K, r0, r1, 6, x, out); break;
    case 5: rows_f32_wide(W, K, r0, r1, 5, x, out); break;
    case 4: rows_f32_wide(W, K, r0, r1, 4, x, out); break;
    case 3: rows_f32_wide(W, K, r0, r1, 3, x, out); break;
    case 2: if (once) rows_f32_few(W, K, r0, r1, 2, x, out); else rows_f32_t(W, K, r0, r1, 2, x, out); break;
    default: rows_f32_t(W, K, r0, r1, 1, x, out);
    }
}

static inline float dot_f32(const float *w, const float *x, int K) {
#if defined(DSX_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 32 <= K; j += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    float r = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < K; j++) r += w[j] * x[j];
    return r;
#else
    float acc[8] = {0};
    int j = 0;
    for (; j + 8 <= K; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += w[j + l] * x[j + l];
    float r = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < K; j++) r += w[j] * x[j];
    return r;
#endif
}

/* An fp16 value's bits as a float (exact; for builds without F16C) */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t bits;
    if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal: renormalize */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 1024));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 1023) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(DSX_F16C)
#define DSX_HALF_VECTORS 1
#else
#define DSX_HALF_VECTORS 0
#endif

/* y[j] = sum_i x[i] W[i][j] for j < cols (W rows of stride ld; float, or fp16 when half: the
 * absorbed W_UK/W_UV held as the fp16 values they are): the accumulators stay in registers
 * across the rows (64 columns at a time), where axpy row by row loads and stores y once per row. */
DSX_INLINE void gemv_t_any(const void *restrict W, const int half, int rows, int cols, size_t ld,
                           const float *restrict x, float *restrict y) {
    int j = 0;
#if defined(DSX_AVX2)
    for (; (!half || DSX_HALF_VECTORS) && j + 64 <= cols; j += 64) {
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
        for (int i = 0; i < rows; i++) {
            const __m256 xi = _mm256_set1_ps(x[i]);
            const size_t at = (size_t)i * ld + j;
            for (int u = 0; u < 8; u++) {
#if defined(DSX_F16C)
                const __m256 w = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)W + at + 8 * u)))
                                      : _mm256_loadu_ps((const float *)W + at + 8 * u);
#else
                const __m256 w = _mm256_loadu_ps((const float *)W + at + 8 * u);
#endif
                a[u] = _mm256_fmadd_ps(xi, w, a[u]);
            }
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(y + j + 8 * u, a[u]);
    }
#endif
    for (; j < cols; j++) {
        float s = 0.0f;
        for (int i = 0; i < rows; i++) {
            const size_t at = (size_t)i * ld + j;
            s += x[i] * (half ? half_to_float(((const uint16_t *)W)[at]) : ((const float *)W)[at]);
        }
        y[j] = s;
    }
}

static inline void gemv_t(const float *restrict W, int rows, int cols, size_t ld, const float *restrict x,
                          float *restrict y) {
    gemv_t_any(W, 0, rows, cols, ld, x, y);
}

#endif
