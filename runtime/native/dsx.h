/* Shared by the native kernels (experts.c: routed experts; decoder.c: the whole decoder step):
 * the thread pool, the chunk dispatcher, activation rounding and the row dot products.
 * Weight layouts and the rounding rule are described in experts.c. */
#ifndef DSX_H
#define DSX_H
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(DSX_PORTABLE)
#include <immintrin.h>
#define DSX_AVX2 1
#if defined(__F16C__)
#define DSX_F16C 1 /* panels may hold fp16 scales (every AVX2 CPU has F16C; -march=native turns it on) */
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DSX_VNNI 1 /* vpdpbusd on 256-bit vectors (Zen 4, Ice Lake and later servers) */
#define dsx_dpbusd _mm256_dpbusd_epi32
#elif defined(__AVXVNNI__)
#define DSX_VNNI 1 /* the VEX form (Alder Lake and later clients) */
#define dsx_dpbusd _mm256_dpbusd_avx_epi32
#endif
#endif

#define CHUNK_ROWS 256 /* the most rows a chunk holds */
#define MAX_GROUP 7 /* the most tokens one pass over a matrix's rows computes */
/* The next group of a matrix's `left` tokens: quantized rows take 4 at a time (the panels'
 * accumulators); fp32 rows up to 7 in one pass (rows_f32_wide), more split into equal groups
 * (8 tokens' inputs, 32 KB at K=1024, no longer stay in L1: measured slower than 4 + 4). */
static inline int group_size(int bits, int left) {
    if (bits != 32) return left < 4 ? left : 4;
    const int groups = (left + MAX_GROUP - 1) / MAX_GROUP;
    return (left + groups - 1) / groups;
}
/* Rows per chunk: fp32 ~256 KB of one matrix (K=1024: 64 rows; K=512: 128), quantized 64 rows
 * (int4 K=1024: 40 KB), a multiple of 8 (panels). Measured on M (2-core EPYC, alternating runs):
 * fp32 decode 45-46 ms per step with 256 KB chunks against 47-51 with 64 rows and 55-61 with
 * 64 KB; quantized steps showed no difference above the noise, so they keep 64 rows (more chunks
 * to balance on small matrices). */
static inline int chunk_rows(size_t row_bytes, int quantized) {
    const size_t most = quantized ? 64 : CHUNK_ROWS;
    size_t rows = ((size_t)262144 / (row_bytes ? row_bytes : 1)) / 8 * 8;
    return rows < 8 ? 8 : rows > most ? (int)most : (int)rows;
}
#define MAX_THREADS 256
#define QK 32 /* the kernels' sub-block: every supported block (32, 64, 128) is a multiple */

/* ---- chunked parallel loops ------------------------------------------------------------------
 * One dispatch runs chunk(ctx, c, tid) for c in [0, n_chunks) on all threads. Each thread's run of
 * chunks is a packed 64-bit cursor (dispatch epoch, end, next index) claimed by compare-and-swap:
 * a thread from an earlier dispatch cannot take a chunk of this one, and a thread that never
 * wakes delays nobody: the others take its chunks, and the caller waits for chunks done, not for
 * threads. */
typedef void (*dsx_chunk_fn)(void *ctx, int c, int tid);
typedef struct {
    _Atomic uint64_t cursor[MAX_THREADS];
    atomic_uint epoch;
    atomic_int completed;
    _Atomic(dsx_chunk_fn) fn;
    _Atomic(void *) ctx;
    unsigned next_epoch;
    int n_threads;
} dsx_dispatch;


/* ---- a small thread pool: spin briefly, then sleep ------------------------------------------ */
typedef struct dsx_pool dsx_pool;
typedef void (*dsx_task)(void *arg, int tid);

struct dsx_pool {
    int n;                 /* threads including the caller */
    pthread_t *threads;
    atomic_int generation; /* bumped per dispatch */
    atomic_int sleeping;
    atomic_int stop;
    long spin;             /* polls before a worker sleeps */
    dsx_task task;
    void *arg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* scratch for dsx_moe, grown on demand */
    void *scratch;
    size_t scratch_bytes;
    void *work; /* dsx_moe's per-call state (a moe_work) */
    dsx_dispatch dispatch; /* one dispatcher per pool: a late worker can only join this pool's current loop */
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

dsx_pool *dsx_pool_create(int threads, long spin);
void dsx_pool_destroy(dsx_pool *pool);
/* Run task(arg, tid) on every worker and on the caller (tid 0); returns when the caller's share is done. */
void dsx_pool_run(dsx_pool *pool, dsx_task task, void *arg);

/* Run chunk(ctx, c, tid) for every c in [0, n_chunks) on all of the pool's threads; returns when all are done. */
void dsx_parallel(dsx_pool *pool, int n_chunks, dsx_chunk_fn fn, void *ctx);

/* ---- activations: rounded to int8 per block ------------------------------------------------ */
/* x [K] -> q [K] int8 (for int4 weights each 32-chunk permuted, even indices first and odd
 * second, to match the nibble order), scale [K/B], and scale x the block's sum of q (for the zero points). */
static inline void quantize_row(const float *x, int K, int B, int permute, int8_t *q, float *scale, float *corr, int32_t *lanes) {
    for (int b0 = 0; b0 < K; b0 += B) {
        float amax = 0.0f;
        for (int j = 0; j < B; j++) { float a = fabsf(x[b0 + j]); amax = a > amax ? a : amax; }
        float inv = amax == 0.0f ? 0.0f : 127.0f / amax;
        scale[b0 / B] = amax / 127.0f;
        int32_t s = 0;
        for (int c = b0; c < b0 + B; c += QK) {
            for (int j = 0; j < QK; j++) {
                int dst = permute ? (j & 1 ? QK / 2 + j / 2 : j / 2) : j;
                int8_t v = (int8_t)nearbyintf(x[c + j] * inv); /* half to even: the default mode */
                q[c + dst] = v;
                s += v;
            }
        }
        corr[b0 / B] = scale[b0 / B] * (float)s;
        if (lanes) { /* the int4 offset's term, 8 x sum(q), as lane 0 of a vector subtracted per block */
            memset(lanes + (size_t)(b0 / B) * 8, 0, 32);
            lanes[(size_t)(b0 / B) * 8] = 8 * s;
        }
    }
}

#if defined(DSX_AVX2)
/* Integer block sums, the same exact int32 values with or without VNNI (no product or pair sum
 * saturates: nibbles 0..15 and |w| <= 128 against |x| <= 127). With VNNI one vpdpbusd replaces
 * maddubs + madd (+ add): M's int4 prefill ~10% faster on a Zen 4 (decode unchanged: it waits
 * on memory, not on these). */
/* sum over each 4 bytes of lo * xe + hi * xo (lo, hi unsigned nibbles; xe, xo signed) */
static inline __m256i dot_nibbles(__m256i lo, __m256i xe, __m256i hi, __m256i xo) {
#if defined(DSX_VNNI)
    return dsx_dpbusd(dsx_dpbusd(_mm256_setzero_si256(), lo, xe), hi, xo);
#else
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo)),
                             _mm256_set1_epi16(1));
#endif
}

/* sum over each 4 bytes of u * x (u unsigned, x signed) */
static inline __m256i dot_u8s8(__m256i u, __m256i x) {
#if defined(DSX_VNNI)
    return dsx_dpbusd(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

static inline float hsum_ps(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#define DSX_INLINE static inline __attribute__((always_inline))
#include "dsx_f32.h"

/* ---- one matrix row against one token's activations ---------------------------------------- */
typedef struct {
    const uint8_t *q;     /* int8/int4 bytes, or float weights for fp32 */
    const float *scales;  /* [R, K/B], or a panel layout's (fp16 when matrix_rows' panel is 2) */
    const uint8_t *zeros; /* [R, K/B] or NULL */
} dsx_matrix;

typedef struct {
    int bits;             /* 4, 8 or 32 */
    int K;                /* inputs of the matrix (padded to B for quantized ones) */
    int B;                /* block */
} matrix_shape;

#if defined(DSX_AVX2)
/* Rows [r0, r1) of a block-32 matrix without zero points for one token: two rows per pass (one
 * activation load serves both, one reduction finishes both); int4's offset is subtracted in the
 * integer sums (lanes). out[r - r0] for each row. */
static inline void rows_q_b32(int bits, const uint8_t *q, const float *scales, size_t row_bytes, int nb, int r0, int r1,
                       const int8_t *xq, const float *xs, const int32_t *lanes, float *out) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m128i low = _mm_set1_epi8(0x0f);
    int r = r0;
    for (; r < r1; r += 2) {
        const int two = r + 1 < r1;
        const uint8_t *w0 = q + (size_t)r * row_bytes, *w1 = two ? w0 + row_bytes : w0;
        const float *s0 = scales + (size_t)r * nb, *s1 = two ? s0 + nb : s0;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
            __m256i p0, p1;
            if (bits == 4) {
                const __m256i c = _mm256_loadu_si256((const __m256i *)(lanes + b * 8));
                __m128i b0 = _mm_loadu_si128((const __m128i *)(w0 + b * 16));
                __m128i b1 = _mm_loadu_si128((const __m128i *)(w1 + b * 16));
                __m256i q0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b0, 4), low), _mm_and_si128(b0, low));
                __m256i q1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b1, 4), low), _mm_and_si128(b1, low));
                p0 = _mm256_sub_epi32(dot_u8s8(q0, x), c);
                p1 = _mm256_sub_epi32(dot_u8s8(q1, x), c);
            } else {
                __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w0 + b * 32)), flip);
                __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w1 + b * 32)), flip);
                p0 = dot_u8s8(_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(x, q0));
                p1 = dot_u8s8(_mm256_sign_epi8(q1, q1), _mm256_sign_epi8(x, q1));
            }
            const float d = xs[b];
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s0[b] * d), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(s1[b] * d), a1);
        }
        __m256 h = _mm256_hadd_ps(a0, a1);
        h = _mm256_hadd_ps(h, h);
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        out[r - r0] = _mm_cvtss_f32(t);
        if (two) out[r + 1 - r0] = _mm_cvtss_f32(_mm_shuffle_ps(t, t, 1));
    }
}
#endif

/* ---- panels: 8 rows interleaved per block, repacked at load (runtime/native_backend.py) ------
 * Why: row by row, each 32-weight block costs ~12 vector ops (unpack, multiply-add, scale), and
 * two cores of AVX2 then stream int4 at ~10 GB/s, not the ~22 GB/s the memory gives. Eight rows
 * at a time share the activation loads and reduce their block sums together:
 *   int4  per block 8 rows x 16 bytes, rows (2i, 2i+1) in one 32-byte load: low nibbles against
 *         the even activations broadcast to both lanes, high nibbles against the odd ones; the
 *         four pair sums reduced by three hadds to [r0 r2 r4 r6 r1 r3 r5 r7] (scales stored in that order)
 *   int6  (8-bit rows whose values all lie in [-32, 31]: a 6-bit head in MatMulNBits' 8-bit form)
 *         u = q + 32 in 0..63: the low nibbles as int4's (128 bytes), then per row 8 bytes of the
 *         high two bits (six_bits_byte in decoder.c), spread to bits 4-5 of each byte by one
 *         shuffle and two 64-bit shifts; the int4 reduction, the offset 32 x sum(x). 0.75 bytes a
 *         weight where int8 reads 1
 *   int8  per block 8 rows x 32 signed bytes (q ^ 0x80 at packing): |w| against sign(x, w), the
 *         eight row sums reduced by hadds to [r0 .. r7]
 * Scales [panels, blocks, 8], float or (half = 1) fp16: the exporter rounds block scales to fp16
 * values (core/quant.py), so a matrix whose scales all are loads them at 2 bytes, as llama.cpp's
 * q4_0/q8_0 store theirs (int4 0.5625 bytes/weight, not 0.625). Rows past the matrix are zero
 * (scale 0). Same arithmetic as rows_q_b32 (exact integer block sums times the two scales),
 * summed in another order. */
#define PANEL 8
#ifndef DSX_PREFETCH
#define DSX_PREFETCH 4096
#endif
static inline int panel_scale_slot(int bits, int j) { return bits != 8 ? (j & 1 ? 4 + j / 2 : j / 2) : j; }

#if defined(DSX_AVX2)
/* the 8 scales of panel block i (ps: the matrix's scales, float or fp16) */
DSX_INLINE __m256 panel_scales(const void *ps, size_t i, const int half) {
#if defined(DSX_F16C)
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)ps + i)));
#endif
    (void)half;
    return _mm256_loadu_ps((const float *)ps + i);
}

DSX_INLINE void panels_b32_t(int bits, const uint8_t *pq, const void *ps, const int half, int nb, int p0, int p1,
                             const int8_t *xq, const float *xs, const int32_t *lanes, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const size_t panel_bytes = (size_t)nb * PANEL * 32 * bits / 8;
    for (int p = p0; p < p1; p++) {
        const uint8_t *w = pq + (size_t)p * panel_bytes;
        const size_t s = (size_t)p * nb * PANEL;
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            __m256i sums;
            /* a software prefetch 4 KB ahead: 10-15% more decode speed on M (2-core EPYC, DRAM-bound;
             * 2 KB and 8 KB measured slower). Into L2, not L1: int4 decode median 147 / 146 / 160
             * against 124 / 142 / 142 tok/s in three A/Bs of 6-8 rounds (int8 101 against 99) */
            _mm_prefetch((const char *)(w + DSX_PREFETCH), _MM_HINT_T1);
            _mm_prefetch((const char *)(w + DSX_PREFETCH + 64), _MM_HINT_T1);
            if (bits != 4) _mm_prefetch((const char *)(w + DSX_PREFETCH + 128), _MM_HINT_T1);
            if (bits == 8) _mm_prefetch((const char *)(w + DSX_PREFETCH + 192), _MM_HINT_T1);
            if (bits == 6) {
                const __m256i xe = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + b * 32)));
                const __m256i xo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + b * 32 + 16)));
                const __m256i dup = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7,
                                                     8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
                const __m256i top = _mm256_set1_epi8(0x30);
                __m256i v[4];
                for (int i = 0; i < 4; i++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + i * 32));
                    /* each row's 8 bytes of high bits in both halves of its lane (six_bits_byte) */
                    const __m256i h = _mm256_shuffle_epi8(
                        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w + 128 + i * 16))), dup);
                    const __m256i ue = _mm256_or_si256(_mm256_and_si256(raw, low),
                        _mm256_and_si256(_mm256_sllv_epi64(h, _mm256_setr_epi64x(4, 2, 4, 2)), top));
                    const __m256i uo = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low),
                        _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 2, 0, 2)), top));
                    v[i] = dot_nibbles(ue, xe, uo, xo);
                }
                sums = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
                sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(4 * lanes[b * 8])); /* the offset 32 */
                w += 192;
            } else if (bits == 4) {
                const __m256i xe = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + b * 32)));
                const __m256i xo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq + b * 32 + 16)));
                __m256i v[4];
                for (int i = 0; i < 4; i++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + i * 32));
                    const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                    v[i] = dot_nibbles(lo, xe, hi, xo);
                }
                sums = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
                sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(lanes[b * 8])); /* the offset 8: 8 x sum(x) */
                w += 128;
            } else {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
                __m256i v[8];
                for (int i = 0; i < 8; i++) { /* |q| x sign(x, q): q = -128 (absmax's extreme) stays exact */
                    const __m256i q = _mm256_loadu_si256((const __m256i *)(w + i * 32));
                    v[i] = dot_u8s8(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
                }
                const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
                const __m256i c = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
                sums = _mm256_add_epi32(_mm256_permute2x128_si256(a, c, 0x20), _mm256_permute2x128_si256(a, c, 0x31));
                w += 256;
            }
            const __m256 scale = _mm256_mul_ps(panel_scales(ps, s + (size_t)b * PANEL, half), _mm256_set1_ps(xs[b]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
        }
        float lanes_out[8];
        _mm256_storeu_ps(lanes_out, acc);
        for (int j = 0; j < PANEL; j++) out[(size_t)(p - p0) * PANEL + j] = lanes_out[panel_scale_slot(bits, j)];
    }
}

static inline void panels_b32(int bits, const uint8_t *pq, const void *ps, int half, int nb, int p0, int p1,
                              const int8_t *xq, const float *xs, const int32_t *lanes, float *out) {
    if (half) panels_b32_t(bits, pq, ps, 1, nb, p0, p1, xq, xs, lanes, out); /* half a constant in each */
    else panels_b32_t(bits, pq, ps, 0, nb, p0, p1, xq, xs, lanes, out);
}

/* rows [r0, r1) of a packed matrix (r0 a multiple of 8): exactly r1 - r0 outputs */
static inline void panel_rows(int bits, const uint8_t *pq, const void *ps, int half, int nb, int r0, int r1,
                              const int8_t *xq, const float *xs, const int32_t *lanes, float *out) {
    const int p0 = r0 / PANEL, full = r1 / PANEL;
    if (full > p0) panels_b32(bits, pq, ps, half, nb, p0, full, xq, xs, lanes, out);
    if (full * PANEL < r1) {
        float tail[PANEL];
        panels_b32(bits, pq, ps, half, nb, full, full + 1, xq, xs, lanes, tail);
        memcpy(out + (size_t)(full - p0) * PANEL, tail, (size_t)(r1 - full * PANEL) * sizeof(float));
    }
}

/* Up to 4 tokens against the same int4 panels: each block's nibbles are unpacked once for all of
 * them (prefill, and experts that several tokens chose). out[t][0 .. rows of the panels). */
DSX_INLINE void panels_int4_multi_t(const uint8_t *pq, const void *ps, const int half, int nb, int p0, int p1,
                                    const int T, const int8_t *const *xq, const float *const *xs,
                                    const int32_t *const *lanes, float *const *out) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const size_t panel_bytes = (size_t)nb * PANEL * 16;
    for (int p = p0; p < p1; p++) {
        const uint8_t *w = pq + (size_t)p * panel_bytes;
        const size_t s = (size_t)p * nb * PANEL;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int b = 0; b < nb; b++, w += 128) {
            _mm_prefetch((const char *)(w + DSX_PREFETCH), _MM_HINT_T1);
            _mm_prefetch((const char *)(w + DSX_PREFETCH + 64), _MM_HINT_T1);
            __m256i lo[4], hi[4];
            for (int i = 0; i < 4; i++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + i * 32));
                lo[i] = _mm256_and_si256(raw, low);
                hi[i] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            }
            const __m256 sb = panel_scales(ps, s + (size_t)b * PANEL, half);
            for (int t = 0; t < T; t++) {
                const __m256i xe = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq[t] + b * 32)));
                const __m256i xo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xq[t] + b * 32 + 16)));
                __m256i v[4];
                for (int i = 0; i < 4; i++)
                    v[i] = dot_nibbles(lo[i], xe, hi[i], xo);
                __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
                sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(lanes[t][b * 8]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(sb, _mm256_set1_ps(xs[t][b])), acc[t]);
            }
        }
        for (int t = 0; t < T; t++) {
            float lanes_out[8];
            _mm256_storeu_ps(lanes_out, acc[t]);
            for (int j = 0; j < PANEL; j++) out[t][(size_t)(p - p0) * PANEL + j] = lanes_out[panel_scale_slot(4, j)];
        }
    }
}

#define DSX_INT4_MULTI(H, T) panels_int4_multi_t(pq, ps, H, nb, p0, p1, T, xq, xs, lanes, out)
static inline void panels_b32_int4_multi(const uint8_t *pq, const void *ps, int half, int nb, int p0, int p1, int T,
                                         const int8_t *const *xq, const float *const *xs,
                                         const int32_t *const *lanes, float *const *out) {
    /* T and half constants in each call: the accumulators stay in registers */
    if (half) {
        switch (T) {
        case 4: DSX_INT4_MULTI(1, 4); break;
        case 3: DSX_INT4_MULTI(1, 3); break;
        case 2: DSX_INT4_MULTI(1, 2); break;
        default: DSX_INT4_MULTI(1, 1);
        }
    } else {
        switch (T) {
        case 4: DSX_INT4_MULTI(0, 4); break;
        case 3: DSX_INT4_MULTI(0, 3); break;
        case 2: DSX_INT4_MULTI(0, 2); break;
        default: DSX_INT4_MULTI(0, 1);
        }
    }
}
#undef DSX_INT4_MULTI

/* panel_rows for up to 4 tokens (int4; other widths token by token) */
static inline void panel_rows_multi(int bits, const uint8_t *pq, const void *ps, int half, int nb, int r0, int r1,
                                    int T, const int8_t *const *xq, const float *const *xs,
                                    const int32_t *const *lanes, float *const *out) {
    if (bits != 4 || T == 1) {
        for (int t = 0; t < T; t++) panel_rows(bits, pq, ps, half, nb, r0, r1, xq[t], xs[t], lanes[t], out[t]);
        return;
    }
    const int p0 = r0 / PANEL, full = r1 / PANEL;
    if (full > p0) panels_b32_int4_multi(pq, ps, half, nb, p0, full, T, xq, xs, lanes, out);
    if (full * PANEL < r1) {
        float tail[4][PANEL];
        float *tails[4] = {tail[0], tail[1], tail[2], tail[3]};
        panels_b32_int4_multi(pq, ps, half, nb, full, full + 1, T, xq, xs, lanes, tails);
        for (int t = 0; t < T; t++)
            memcpy(out[t] + (size_t)(full - p0) * PANEL, tail[t], (size_t)(r1 - full * PANEL) * sizeof(float));
    }
}
#endif

/* Quantized row r with int8 activations (xq, xs: per-block scales, xcorr: xs x the block's
 * sum of xq): sum_b ws[b] * (xs[b] * sum_j q[j] * xq[j] - z_b * xcorr[b]), the inner sums exact integers. */
static inline float row_dot_q(const dsx_matrix *m, const matrix_shape *s, int r, const int8_t *xq, const float *xs,
                              const float *xcorr) {
    const int nb = s->K / s->B, per = s->B / QK;
    const size_t row_bytes = (size_t)s->K * s->bits / 8;
    const uint8_t *w = m->q + (size_t)r * row_bytes;
    const float *ws = m->scales + (size_t)r * nb;
    const uint8_t *wz = m->zeros ? m->zeros + (size_t)r * nb : NULL;
    const int32_t zdef = 1 << (s->bits - 1);
    float correction = 0.0f; /* sum_b d_b * z_b * xsum_b, for the unsigned weight paths */
#if defined(DSX_AVX2)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(); /* two chains: fmadd latency */
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int b = 0; b < nb; b++) {
        __m256i isum = _mm256_setzero_si256();
        if (s->bits == 4) { /* unsigned nibbles x signed activations; z * xsum subtracted below */
            for (int c = 0; c < per; c++) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(w + (size_t)(b * per + c) * QK / 2));
                __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)(b * per + c) * QK));
                isum = _mm256_add_epi32(isum, dot_u8s8(q, x));
            }
        } else if (!wz) { /* q - 128 is q ^ 0x80 as int8; |w| * sign(x, w) keeps maddubs from saturating */
            for (int c = 0; c < per; c++) {
                __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + (size_t)(b * per + c) * QK)),
                                             _mm256_set1_epi8((char)0x80));
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)(b * per + c) * QK));
                isum = _mm256_add_epi32(isum, dot_u8s8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)));
            }
        } else { /* int8 with zero points: 16-bit products */
            for (int c = 0; c < per; c++) {
                const uint8_t *wc = w + (size_t)(b * per + c) * QK;
                const int8_t *xc = xq + (size_t)(b * per + c) * QK;
                __m256i p = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)wc)),
                                              _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)xc)));
                p = _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wc + 16))),
                                                          _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xc + 16)))));
                isum = _mm256_add_epi32(isum, p);
            }
        }
        const __m256 d = _mm256_set1_ps(ws[b] * xs[b]);
        if (b & 1) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc0);
    }
    if (wz)
        for (int b = 0; b < nb; b++) correction += ws[b] * xcorr[b] * (float)wz[b];
    else if (s->bits == 4)
        correction = dot_f32(ws, xcorr, nb) * (float)zdef;
    return hsum_ps(_mm256_add_ps(acc0, acc1)) - correction;
#else
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        int32_t isum = 0;
        if (s->bits == 4) {
            const uint8_t *wb = w + (size_t)b * s->B / 2;
            const int8_t *xb = xq + (size_t)b * s->B;
            for (int c = 0; c < per; c++)
                for (int j = 0; j < QK / 2; j++)
                    isum += (int32_t)(wb[c * QK / 2 + j] & 15) * xb[c * QK + j] +
                            (int32_t)(wb[c * QK / 2 + j] >> 4) * xb[c * QK + QK / 2 + j];
        } else {
            const uint8_t *wb = w + (size_t)b * s->B;
            const int8_t *xb = xq + (size_t)b * s->B;
            for (int j = 0; j < s->B; j++) isum += (int32_t)wb[j] * xb[j];
        }
        acc += ws[b] * xs[b] * (float)isum;
        correction += ws[b] * xcorr[b] * (float)(wz ? wz[b] : zdef);
    }
    return acc - correction;
#endif
}

/* quantized row r with fp32 activations (the bundle keeps activations fp32): dequantize per block */
static inline float row_dot_qf(const dsx_matrix *m, const matrix_shape *s, int r, const float *x) {
    const int nb = s->K / s->B;
    const size_t row_bytes = (size_t)s->K * s->bits / 8;
    const uint8_t *w = m->q + (size_t)r * row_bytes;
    const float *ws = m->scales + (size_t)r * nb;
    const uint8_t *wz = m->zeros ? m->zeros + (size_t)r * nb : NULL;
    float tmp[128];
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        float z = wz ? (float)wz[b] : (float)(1 << (s->bits - 1));
        const float *xb = x + (size_t)b * s->B;
        if (s->bits == 4) {
            const uint8_t *wb = w + (size_t)b * s->B / 2;
            for (int j = 0; j < s->B / 2; j++) {
                tmp[2 * j] = (float)(wb[j] & 15) - z;
                tmp[2 * j + 1] = (float)(wb[j] >> 4) - z;
            }
        } else {
            const uint8_t *wb = w + (size_t)b * s->B;
            for (int j = 0; j < s->B; j++) tmp[j] = (float)wb[j] - z;
        }
        acc += ws[b] * dot_f32(tmp, xb, s->B);
    }
    return acc;
}



/* ---- one matrix's rows against a few input rows: the dispatch both the experts and the
 * decoder's projections use ---------------------------------------------------------------- */
typedef struct {
    const float *f;        /* fp32 inputs, row stride ldf (padded to Kp for quantized weights) */
    const int8_t *q;       /* rounded inputs [*, Kp] (int4: each 32 permuted), or NULL */
    const float *s, *sum;  /* per block: scale, scale x sum of q [*, nb] */
    const int32_t *lanes;  /* per block: the int4 offset term [*, nb, 8] */
    int ldf, Kp, nb;
} row_input;

/* Rows [r0, r1) of matrix m (K inputs; shape for the generic paths) against up to 4 input rows
 * in[rows[i]]: out[i][r - r0]. fast: block 32 with rounded inputs and no zero points (AVX2);
 * panel: m packed by dsx_pack_panels (1: float scales, 2: fp16 scales); once: no other call
 * reads these rows for more tokens. */
static inline void matrix_rows(int bits, int fast, int panel, int round_act, const dsx_matrix *m,
                               const matrix_shape *shape, int K, const row_input *in, const int *rows, int T,
                               int r0, int r1, float *const *out, int once) {
#if defined(DSX_AVX2)
    if (fast) {
        const int8_t *xq[4];
        const float *xs[4];
        const int32_t *lanes[4];
        for (int i = 0; i < T; i++)
            xq[i] = in->q + (size_t)rows[i] * in->Kp, xs[i] = in->s + (size_t)rows[i] * in->nb,
            lanes[i] = in->lanes + (size_t)rows[i] * in->nb * 8;
        if (panel) {
            panel_rows_multi(bits, m->q, m->scales, panel == 2, in->nb, r0, r1, T, xq, xs, lanes, out);
        } else {
            for (int i = 0; i < T; i++)
                rows_q_b32(bits, m->q, m->scales, (size_t)in->Kp * bits / 8, in->nb, r0, r1, xq[i], xs[i], lanes[i],
                           out[i]);
        }
        return;
    }
#else
    (void)fast, (void)panel;
#endif
    if (bits == 32) {
        const float *x[MAX_GROUP];
        for (int i = 0; i < T; i++) x[i] = in->f + (size_t)rows[i] * in->ldf;
        rows_f32((const float *)m->q, K, r0, r1, T, x, out, once);
        return;
    }
    for (int i = 0; i < T; i++) {
        const size_t row = (size_t)rows[i];
        for (int r = r0; r < r1; r++)
            out[i][r - r0] = round_act ? row_dot_q(m, shape, r, in->q + row * in->Kp, in->s + row * in->nb,
                                                   in->sum + row * in->nb)
                                       : row_dot_qf(m, shape, r, in->f + row * in->ldf);
    }
}

#endif
