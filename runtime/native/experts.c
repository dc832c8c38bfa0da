/* dsexport's routed-expert kernel: the MoE FFN of one layer for a few tokens, on packed weights.
 *
 * Why: ONNX Runtime's QMoE runs each expert's GEMV on one thread and repacks 4-bit blocks to
 * 0.75 bytes/weight; decode is memory-bound, so every active expert's rows are split across all
 * threads here (64-row chunks taken from a shared counter, as llama.cpp's mul_mat_id does) and
 * the weights are read as the bundle stores them (no repacking, no block sums).
 *
 * Weights (runtime/paging.py's store records, read in place):
 *   fp32  w float [R, K]
 *   int8  scales float [R, K/B], q uint8 [R, K]         value (q - z) * scale
 *   int4  scales float [R, K/B], q uint8 [R, K/2]       even index in the low nibble
 *   zero points uint8 [R, K/B] (asymmetric) or none (z = 2^(bits-1))
 * Activations of quantized experts are rounded to int8 per block of B (scale absmax/127,
 * rounded half to even: MLAS's rule, which the fused QMoE applies), so each block's dot product
 * is an exact integer sum times two scales.
 *
 * Paths: AVX2 (x86-64, built with -march=native where it has AVX2) and portable C that the
 * compiler vectorizes for the target (Arm: NEON under -mcpu=native). Results agree to float
 * rounding across paths.
 * No Python API: runtime/native.py loads this with ctypes.
 */
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
#endif

#define CHUNK_ROWS 64
#define MAX_THREADS 256
#define QK 32 /* the kernels' sub-block: every supported block (32, 64, 128) is a multiple */

int dsx_version(void) { return 1; }

/* 1 AVX2, 2 NEON, 0 portable C */
int dsx_simd(void) {
#if defined(DSX_AVX2)
    return 1;
#else
    return 0;
#endif
}

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
};

typedef struct { dsx_pool *pool; int tid; } worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *worker_main(void *p) {
    worker_arg *wa = (worker_arg *)p;
    dsx_pool *pool = wa->pool;
    int tid = wa->tid;
    free(wa);
    int seen = 0; /* the generation at creation */
    for (;;) {
        long polls = 0;
        while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->stop)) {
            if (++polls < pool->spin) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->sleeping, 1);
            while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->cv, &pool->mu);
            atomic_fetch_sub(&pool->sleeping, 1);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        /* The caller does not wait for workers, only for the work: a worker that wakes late (a
         * busy machine) finds the chunks taken, or the next dispatch's, and helps with those. */
        seen = atomic_load(&pool->generation);
        pool->task(pool->arg, tid);
    }
}

void dsx_pool_destroy(dsx_pool *pool);

dsx_pool *dsx_pool_create(int threads, long spin) {
    dsx_pool *pool = calloc(1, sizeof(dsx_pool));
    if (!pool) return NULL;
    pool->n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    pool->spin = spin;
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->sleeping, 0);
    atomic_init(&pool->stop, 0);
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    pool->threads = calloc((size_t)pool->n, sizeof(pthread_t));
    if (!pool->threads) { free(pool); return NULL; }
    for (int t = 1; t < pool->n; t++) {
        worker_arg *wa = malloc(sizeof(worker_arg));
        if (!wa || (wa->pool = pool, wa->tid = t, pthread_create(&pool->threads[t], NULL, worker_main, wa))) {
            free(wa);
            pool->n = t; /* the threads started so far */
            dsx_pool_destroy(pool);
            return NULL;
        }
    }
    return pool;
}

void dsx_pool_destroy(dsx_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int t = 1; t < pool->n; t++) pthread_join(pool->threads[t], NULL);
    free(pool->threads);
    free(pool->scratch);
    free(pool->work);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool);
}

/* Wake the workers to run task(arg, tid) and run it on the caller (tid 0). Returns at once when
 * the caller's share is done: tasks track their own completion (moe_run waits for its chunks). */
static void pool_wake(dsx_pool *pool, dsx_task task, void *arg) {
    pool->task = task;
    pool->arg = arg;
    if (pool->n > 1) {
        atomic_fetch_add(&pool->generation, 1);
        if (atomic_load(&pool->sleeping)) {
            pthread_mutex_lock(&pool->mu);
            pthread_cond_broadcast(&pool->cv);
            pthread_mutex_unlock(&pool->mu);
        }
    }
    task(arg, 0);
}

/* ---- activations: rounded to int8 per block ------------------------------------------------ */
/* x [K] -> q [K] int8 (for int4 weights each 32-chunk permuted, even indices first and odd
 * second, to match the nibble order), scale [K/B], and scale x the block's sum of q (for the zero points). */
static void quantize_row(const float *x, int K, int B, int permute, int8_t *q, float *scale, float *corr, int32_t *lanes) {
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
static inline float hsum_ps(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

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

/* ---- one matrix row against one token's activations ---------------------------------------- */
typedef struct {
    const uint8_t *q;     /* int8/int4 bytes, or float weights for fp32 */
    const float *scales;  /* [R, K/B] */
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
static void rows_q_b32(int bits, const uint8_t *q, const float *scales, size_t row_bytes, int nb, int r0, int r1,
                       const int8_t *xq, const float *xs, const int32_t *lanes, float *out) {
    const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
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
                p0 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q0, x), ones), c);
                p1 = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q1, x), ones), c);
            } else {
                __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w0 + b * 32)), flip);
                __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w1 + b * 32)), flip);
                p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(x, q0)), ones);
                p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q1, q1), _mm256_sign_epi8(x, q1)), ones);
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
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int b = 0; b < nb; b++) {
        __m256i isum = _mm256_setzero_si256();
        if (s->bits == 4) { /* unsigned nibbles x signed activations; z * xsum subtracted below */
            for (int c = 0; c < per; c++) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(w + (size_t)(b * per + c) * QK / 2));
                __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)(b * per + c) * QK));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones));
            }
        } else if (!wz) { /* q - 128 is q ^ 0x80 as int8; |w| * sign(x, w) keeps maddubs from saturating */
            for (int c = 0; c < per; c++) {
                __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + (size_t)(b * per + c) * QK)),
                                             _mm256_set1_epi8((char)0x80));
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + (size_t)(b * per + c) * QK));
                __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
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

/* ---- the MoE layer ----------------------------------------------------------------------- */
typedef struct {
    int32_t bits;          /* 4, 8 or 32 (all experts of a call) */
    int32_t round_act;     /* 1: int8 activations per block (required for the integer path) */
    int32_t block;         /* weight and activation block (quantized) */
    int32_t n_tokens, D, I, n_active;
    const float *x;        /* [N, D] expert input */
    const float *residual; /* [N, D] added to the output, or NULL */
    float *out;            /* [N, D] */
    const uint64_t *experts; /* [A, 6]: gate_up q, scales, zeros; down q, scales, zeros (addresses) */
    const int32_t *tok_start;  /* [A + 1] */
    const int32_t *tok_index;  /* [P] token rows, per active expert */
    const float *tok_weight;   /* [P] routing weights */
} dsx_moe_args;

typedef struct {
    const dsx_moe_args *a;
    matrix_shape gu, dn;
    int Dp, Ip;            /* K of gate_up and down, padded to the block */
    int P;                 /* (expert, token) pairs */
    /* activations */
    int8_t *xq; float *xs; float *xsum; int32_t *xlanes; /* per token [N, Dp] / [N, Dp/B] x2 / [N, Dp/B, 8] */
    const float *xf;       /* fp32 activations (padded copy) [N, Dp] */
    float *h;              /* gate_up outputs [P, 2I] */
    int8_t *hq; float *hs; float *hsum; int32_t *hlanes; float *hf; /* SwiGLU outputs per pair [P, Ip] */
    int n_chunks, n_threads;
    int fast; /* block 32, int8 activations, no zero points: rows_q_b32 */
    /* One dispatch = one phase of one call. Each thread's run of chunks is a packed 64-bit cursor
     * (dispatch epoch, end, next index) claimed by compare-and-swap: a thread from an earlier
     * dispatch cannot take a chunk of this one, and a thread that never wakes delays nobody:
     * the others take its chunks, and the caller waits for chunks done, not for threads. */
    _Atomic uint64_t cursor[MAX_THREADS];
    atomic_uint epoch_phase; /* epoch << 1 | phase (0 gate/up, 1 down) */
    atomic_int completed;
    unsigned epoch;
} moe_work;

#define IDX_BITS 22
#define IDX_MASK ((1u << IDX_BITS) - 1)
#define EPOCH_MASK 0xfffffu

static inline uint64_t pack_cursor(unsigned epoch, unsigned end, unsigned idx) {
    return ((uint64_t)(epoch & EPOCH_MASK) << (2 * IDX_BITS)) | ((uint64_t)end << IDX_BITS) | idx;
}

/* The next chunk of this dispatch for thread tid: its own run first, then the others'. -1: none. */
static int next_chunk(moe_work *w, unsigned epoch, int tid) {
    for (int i = 0; i < w->n_threads; i++) {
        _Atomic uint64_t *c = &w->cursor[(tid + i) % w->n_threads];
        uint64_t v = atomic_load(c);
        while ((unsigned)(v >> (2 * IDX_BITS)) == (epoch & EPOCH_MASK) && (v & IDX_MASK) < ((v >> IDX_BITS) & IDX_MASK)) {
            if (atomic_compare_exchange_weak(c, &v, v + 1)) return (int)(v & IDX_MASK);
        }
    }
    return -1;
}

static void gate_up_chunk(moe_work *w, int c);
static void down_chunk(moe_work *w, int c);

static void moe_task(void *p, int tid) {
    moe_work *w = (moe_work *)p;
    unsigned ep = atomic_load(&w->epoch_phase), epoch = ep >> 1;
    for (int c; (c = next_chunk(w, epoch, tid)) >= 0;) {
        if (ep & 1) down_chunk(w, c);
        else gate_up_chunk(w, c);
        atomic_fetch_add(&w->completed, 1);
    }
}

/* Run one phase over n_chunks on every thread; returns when all chunks are done. */
static void moe_run(dsx_pool *pool, moe_work *w, int phase, int n_chunks) {
    w->epoch++;
    w->n_chunks = n_chunks;
    atomic_store(&w->completed, 0);
    for (int t = 0; t < w->n_threads; t++)
        atomic_store(&w->cursor[t], pack_cursor(w->epoch, (unsigned)((long)n_chunks * (t + 1) / w->n_threads),
                                                (unsigned)((long)n_chunks * t / w->n_threads)));
    atomic_store(&w->epoch_phase, (w->epoch << 1) | (unsigned)phase);
    pool_wake(pool, moe_task, w);
    for (long polls = 0; atomic_load(&w->completed) < n_chunks; polls++) {
        if (polls < pool->spin) cpu_relax();
        else sched_yield(); /* a worker holding a chunk without a core needs this one */
    }
}

static dsx_matrix matrix_of(const uint64_t *e, int which) {
    dsx_matrix m;
    m.q = (const uint8_t *)(uintptr_t)e[3 * which];
    m.scales = (const float *)(uintptr_t)e[3 * which + 1];
    m.zeros = (const uint8_t *)(uintptr_t)e[3 * which + 2];
    return m;
}

/* phase 1: every (expert, 64 rows of gate_up) chunk; each loaded row serves all its tokens */
static void gate_up_chunk(moe_work *w, int c) {
    const dsx_moe_args *a = w->a;
    const int R = 2 * a->I, per_expert = (R + CHUNK_ROWS - 1) / CHUNK_ROWS;
    {
        int e = c / per_expert, r0 = (c % per_expert) * CHUNK_ROWS, r1 = r0 + CHUNK_ROWS < R ? r0 + CHUNK_ROWS : R;
        dsx_matrix m = matrix_of(a->experts + 6 * e, 0);
#if defined(DSX_AVX2)
        if (w->fast) {
            const int nb = w->Dp / QK;
            for (int p = a->tok_start[e]; p < a->tok_start[e + 1]; p++) {
                int t = a->tok_index[p];
                rows_q_b32(a->bits, m.q, m.scales, (size_t)w->Dp * a->bits / 8, nb, r0, r1, w->xq + (size_t)t * w->Dp,
                           w->xs + (size_t)t * nb, w->xlanes + (size_t)t * nb * 8, w->h + (size_t)p * R + r0);
            }
            return;
        }
#endif
        for (int r = r0; r < r1; r++) {
            for (int p = a->tok_start[e]; p < a->tok_start[e + 1]; p++) {
                int t = a->tok_index[p];
                float v;
                if (a->bits == 32)
                    v = dot_f32((const float *)m.q + (size_t)r * a->D, w->xf + (size_t)t * w->Dp, a->D);
                else if (a->round_act)
                    v = row_dot_q(&m, &w->gu, r, w->xq + (size_t)t * w->Dp, w->xs + (size_t)t * (w->Dp / a->block),
                                  w->xsum + (size_t)t * (w->Dp / a->block));
                else
                    v = row_dot_qf(&m, &w->gu, r, w->xf + (size_t)t * w->Dp);
                w->h[(size_t)p * R + r] = v;
            }
        }
    }
}

/* phase 2: every 64 rows of the output, all active experts summed in the order given */
static void down_chunk(moe_work *w, int c) {
    const dsx_moe_args *a = w->a;
    {
        int r0 = c * CHUNK_ROWS, r1 = r0 + CHUNK_ROWS < a->D ? r0 + CHUNK_ROWS : a->D;
        for (int t = 0; t < a->n_tokens; t++)
            for (int r = r0; r < r1; r++)
                a->out[(size_t)t * a->D + r] = a->residual ? a->residual[(size_t)t * a->D + r] : 0.0f;
        float acc[CHUNK_ROWS];
        for (int e = 0; e < a->n_active; e++) {
            dsx_matrix m = matrix_of(a->experts + 6 * e, 1);
            for (int p = a->tok_start[e]; p < a->tok_start[e + 1]; p++) {
#if defined(DSX_AVX2)
                if (w->fast) {
                    const int nb = w->Ip / QK;
                    rows_q_b32(a->bits, m.q, m.scales, (size_t)w->Ip * a->bits / 8, nb, r0, r1, w->hq + (size_t)p * w->Ip,
                               w->hs + (size_t)p * nb, w->hlanes + (size_t)p * nb * 8, acc);
                } else
#endif
                for (int r = r0; r < r1; r++) {
                    float v;
                    if (a->bits == 32)
                        v = dot_f32((const float *)m.q + (size_t)r * a->I, w->hf + (size_t)p * w->Ip, a->I);
                    else if (a->round_act)
                        v = row_dot_q(&m, &w->dn, r, w->hq + (size_t)p * w->Ip, w->hs + (size_t)p * (w->Ip / a->block),
                                      w->hsum + (size_t)p * (w->Ip / a->block));
                    else
                        v = row_dot_qf(&m, &w->dn, r, w->hf + (size_t)p * w->Ip);
                    acc[r - r0] = v;
                }
                int t = a->tok_index[p];
                float g = a->tok_weight[p];
                for (int r = r0; r < r1; r++) a->out[(size_t)t * a->D + r] += g * acc[r - r0];
            }
        }
    }
}

static void *scratch(dsx_pool *pool, size_t bytes) {
    if (bytes > pool->scratch_bytes) {
        free(pool->scratch);
        pool->scratch = malloc(bytes);
        pool->scratch_bytes = pool->scratch ? bytes : 0;
    }
    return pool->scratch;
}

#define ALIGN64(n) (((n) + 63) & ~(size_t)63)

/* 0 on success; -1 bad arguments, -2 out of memory */
int dsx_moe(dsx_pool *pool, const dsx_moe_args *a) {
    if (!pool || !a || a->n_tokens < 1 || a->n_active < 0 || a->D < 1 || a->I < 1) return -1;
    if (a->bits != 32 && a->bits != 8 && a->bits != 4) return -1;
    int B = a->bits == 32 ? QK : a->block;
    if (a->bits != 32 && (B < QK || B % QK || B > 128)) return -1;
    if (!pool->work && !(pool->work = calloc(1, sizeof(moe_work)))) return -2;
    moe_work *wp = (moe_work *)pool->work; /* one call at a time per pool; too big for the stack */
    /* not cleared: its cursors and epoch must stay valid for workers still leaving the last call */
#define w (*wp)
    w.a = a;
    w.Dp = (a->D + B - 1) / B * B;
    w.Ip = (a->I + B - 1) / B * B;
    w.gu = (matrix_shape){a->bits, w.Dp, B};
    w.dn = (matrix_shape){a->bits, w.Ip, B};
    if (a->bits == 32) w.Dp = a->D, w.Ip = a->I;
    w.P = a->tok_start[a->n_active];
    const int N = a->n_tokens, P = w.P, I = a->I;
    const int quant = a->bits != 32 && a->round_act;
    size_t need = ALIGN64((size_t)P * 2 * I * sizeof(float));
    if (quant)
        need += ALIGN64((size_t)N * w.Dp) + 2 * ALIGN64((size_t)N * (w.Dp / B) * 4) +
                ALIGN64((size_t)P * w.Ip) + 2 * ALIGN64((size_t)P * (w.Ip / B) * 4) +
                ALIGN64((size_t)N * (w.Dp / B) * 32) + ALIGN64((size_t)P * (w.Ip / B) * 32);
    need += ALIGN64((size_t)N * w.Dp * 4) + ALIGN64((size_t)P * w.Ip * 4);
    char *s = scratch(pool, need);
    if (!s) return -2;
    w.h = (float *)s; s += ALIGN64((size_t)P * 2 * I * sizeof(float));
    float *xf = (float *)s; s += ALIGN64((size_t)N * w.Dp * 4);
    w.hf = (float *)s; s += ALIGN64((size_t)P * w.Ip * 4);
    /* activations: padded copies (zeros past D), rounded when the experts are quantized */
    for (int t = 0; t < N; t++) {
        memcpy(xf + (size_t)t * w.Dp, a->x + (size_t)t * a->D, (size_t)a->D * 4);
        for (int j = a->D; j < w.Dp; j++) xf[(size_t)t * w.Dp + j] = 0.0f;
    }
    w.xf = xf;
    if (quant) {
        w.xq = (int8_t *)s; s += ALIGN64((size_t)N * w.Dp);
        w.xs = (float *)s; s += ALIGN64((size_t)N * (w.Dp / B) * 4);
        w.xsum = (float *)s; s += ALIGN64((size_t)N * (w.Dp / B) * 4);
        w.hq = (int8_t *)s; s += ALIGN64((size_t)P * w.Ip);
        w.hs = (float *)s; s += ALIGN64((size_t)P * (w.Ip / B) * 4);
        w.hsum = (float *)s; s += ALIGN64((size_t)P * (w.Ip / B) * 4);
        w.xlanes = (int32_t *)s; s += ALIGN64((size_t)N * (w.Dp / B) * 32);
        w.hlanes = (int32_t *)s;
        for (int t = 0; t < N; t++)
            quantize_row(xf + (size_t)t * w.Dp, w.Dp, B, a->bits == 4, w.xq + (size_t)t * w.Dp,
                         w.xs + (size_t)t * (w.Dp / B), w.xsum + (size_t)t * (w.Dp / B), w.xlanes + (size_t)t * (w.Dp / B) * 8);
    }
    /* phase 1: gate and up rows of every active expert */
    w.n_threads = pool->n < MAX_THREADS ? pool->n : MAX_THREADS;
    w.fast = quant && B == QK;
    for (int e = 0; e < a->n_active && w.fast; e++)
        if (a->experts[6 * e + 2] || a->experts[6 * e + 5]) w.fast = 0; /* zero points */
    moe_run(pool, &w, 0, a->n_active * ((2 * I + CHUNK_ROWS - 1) / CHUNK_ROWS));
    /* SwiGLU per (expert, token) pair, then its rounding for the down projection */
    for (int p = 0; p < P; p++) {
        const float *g = w.h + (size_t)p * 2 * I, *u = g + I;
        float *act = w.hf + (size_t)p * w.Ip;
        for (int j = 0; j < I; j++) act[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        for (int j = I; j < w.Ip; j++) act[j] = 0.0f;
        if (quant)
            quantize_row(act, w.Ip, B, a->bits == 4, w.hq + (size_t)p * w.Ip, w.hs + (size_t)p * (w.Ip / B),
                         w.hsum + (size_t)p * (w.Ip / B), w.hlanes + (size_t)p * (w.Ip / B) * 8);
    }
    /* phase 2: down rows, the experts' outputs weighted and summed (with the residual) */
    moe_run(pool, &w, 1, (a->D + CHUNK_ROWS - 1) / CHUNK_ROWS);
    return 0;
#undef w
}
