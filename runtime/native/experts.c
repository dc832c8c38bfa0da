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
#include "dsx.h"

int dsx_version(void) { return 1; }

/* 1 AVX2, 2 NEON, 0 portable C */
int dsx_simd(void) {
#if defined(DSX_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* 1: the integer block sums use VNNI (vpdpbusd) */
int dsx_vnni(void) {
#if defined(DSX_VNNI)
    return 1;
#else
    return 0;
#endif
}

/* vector registers the fp32 tiles were sized for (dsx.h tile_rows): 32 with AVX-512VL, else 16 */
int dsx_vector_registers(void) { return DSX_VREGS; }

/* 1: packed panels may hold fp16 scales (panel 2 in dsx_linear and dsx_moe_args) */
int dsx_half_scales(void) {
#if defined(DSX_F16C)
    return 1;
#else
    return 0;
#endif
}

typedef struct { dsx_pool *pool; int tid; } worker_arg;


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
    int32_t panel;             /* every expert's q and scales packed by dsx_pack_panels (decoder.c):
                                * 1 float scales, 2 fp16 scales */
} dsx_moe_args;

typedef struct {
    const dsx_moe_args *a;
    matrix_shape gu, dn;
    int Dp, Ip;            /* K of gate_up and down, padded to the block */
    int P;                 /* (expert, token) pairs */
    int B, quant;          /* block; 1 when the activations are rounded to int8 */
    /* activations */
    int8_t *xq; float *xs; float *xsum; int32_t *xlanes; /* per token [N, Dp] / [N, Dp/B] x2 / [N, Dp/B, 8] */
    const float *xf;       /* fp32 activations (padded copy) [N, Dp] */
    float *h;              /* gate_up outputs [P, 2I] */
    int8_t *hq; float *hs; float *hsum; int32_t *hlanes; float *hf; /* SwiGLU outputs per pair [P, Ip] */
    int fast; /* block 32, int8 activations, no zero points: rows_q_b32 */
    int chunk_gu, chunk_dn; /* rows per chunk of each phase (a down chunk reads those rows of every active expert) */
    row_input x_in, h_in; /* the two phases' inputs as the kernels read them (views of the above) */
} moe_work;

/* Wake the workers to run task(arg, tid) and run it on the caller (tid 0). Returns at once when
 * the caller's share is done: tasks track their own completion (dsx_parallel waits for its chunks). */
void dsx_pool_run(dsx_pool *pool, dsx_task task, void *arg) {
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

#define IDX_BITS 22
#define IDX_MASK ((1u << IDX_BITS) - 1)
#define EPOCH_MASK 0xfffffu

static inline uint64_t pack_cursor(unsigned epoch, unsigned end, unsigned idx) {
    return ((uint64_t)(epoch & EPOCH_MASK) << (2 * IDX_BITS)) | ((uint64_t)end << IDX_BITS) | idx;
}

/* The next chunk of this dispatch for thread tid: its own run first, then the others'. -1: none. */
static int next_chunk(dsx_dispatch *d, unsigned epoch, int tid) {
    for (int i = 0; i < d->n_threads; i++) {
        _Atomic uint64_t *c = &d->cursor[(tid + i) % d->n_threads];
        uint64_t v = atomic_load(c);
        while ((unsigned)(v >> (2 * IDX_BITS)) == (epoch & EPOCH_MASK) && (v & IDX_MASK) < ((v >> IDX_BITS) & IDX_MASK)) {
            if (atomic_compare_exchange_weak(c, &v, v + 1)) return (int)(v & IDX_MASK);
        }
    }
    return -1;
}

static void dispatch_task(void *p, int tid) {
    dsx_dispatch *d = (dsx_dispatch *)p;
    /* fn and ctx are read after the epoch: if they already belong to a later dispatch, this
     * epoch's cursors are spent or re-tagged and no chunk is claimed with them */
    unsigned epoch = atomic_load(&d->epoch);
    dsx_chunk_fn fn = atomic_load(&d->fn);
    void *ctx = atomic_load(&d->ctx);
    for (int c; (c = next_chunk(d, epoch, tid)) >= 0;) {
        fn(ctx, c, tid);
        atomic_fetch_add(&d->completed, 1);
    }
}

void dsx_parallel(dsx_pool *pool, int n_chunks, dsx_chunk_fn fn, void *ctx) {
    if (n_chunks <= 0) return;
    dsx_dispatch *d = &pool->dispatch;
    if (pool->n == 1 || n_chunks == 1) { /* nothing to share */
        for (int c = 0; c < n_chunks; c++) fn(ctx, c, 0);
        return;
    }
    unsigned epoch = ++d->next_epoch;
    d->n_threads = pool->n < MAX_THREADS ? pool->n : MAX_THREADS;
    atomic_store(&d->completed, 0);
    for (int t = 0; t < d->n_threads; t++)
        atomic_store(&d->cursor[t], pack_cursor(epoch, (unsigned)((long)n_chunks * (t + 1) / d->n_threads),
                                                (unsigned)((long)n_chunks * t / d->n_threads)));
    atomic_store(&d->fn, fn);
    atomic_store(&d->ctx, ctx);
    atomic_store(&d->epoch, epoch);
    dsx_pool_run(pool, dispatch_task, d);
    for (long polls = 0; atomic_load(&d->completed) < n_chunks; polls++) {
        if (polls < pool->spin) cpu_relax();
        else sched_yield(); /* a worker holding a chunk without a core needs this one */
    }
}

static void gate_up_chunk(void *ctx, int c, int tid);
static void down_chunk(void *ctx, int c, int tid);

static dsx_matrix matrix_of(const uint64_t *e, int which) {
    dsx_matrix m;
    m.q = (const uint8_t *)(uintptr_t)e[3 * which];
    m.scales = (const float *)(uintptr_t)e[3 * which + 1];
    m.zeros = (const uint8_t *)(uintptr_t)e[3 * which + 2];
    return m;
}

/* phase 1: every (expert, rows of gate_up) chunk; each chunk's rows serve all the expert's tokens */
static void gate_up_chunk(void *ctx, int c, int tid) {
    (void)tid;
    moe_work *w = (moe_work *)ctx;
    const dsx_moe_args *a = w->a;
    const int R = 2 * a->I, per_expert = (R + w->chunk_gu - 1) / w->chunk_gu;
    const int e = c / per_expert, r0 = (c % per_expert) * w->chunk_gu, r1 = r0 + w->chunk_gu < R ? r0 + w->chunk_gu : R;
    const dsx_matrix m = matrix_of(a->experts + 6 * e, 0);
    const int n = a->tok_start[e + 1] - a->tok_start[e];
    for (int p0 = a->tok_start[e], T; p0 < a->tok_start[e + 1]; p0 += T) {
        T = group_size(a->bits, a->tok_start[e + 1] - p0);
        int rows[MAX_GROUP];
        float *out[MAX_GROUP];
        for (int i = 0; i < T; i++) rows[i] = a->tok_index[p0 + i], out[i] = w->h + (size_t)(p0 + i) * R + r0;
        matrix_rows(a->bits, w->fast, a->panel, a->round_act, &m, &w->gu, a->D, &w->x_in, rows, T, r0, r1, out,
                    T == n);
    }
}

/* phase 2: every chunk of output rows, all active experts summed in the order given, each
 * expert's (token) pairs in pair order */
static void down_chunk(void *ctx, int c, int tid) {
    (void)tid;
    moe_work *w = (moe_work *)ctx;
    const dsx_moe_args *a = w->a;
    const int r0 = c * w->chunk_dn, r1 = r0 + w->chunk_dn < a->D ? r0 + w->chunk_dn : a->D;
    for (int t = 0; t < a->n_tokens; t++)
        for (int r = r0; r < r1; r++)
            a->out[(size_t)t * a->D + r] = a->residual ? a->residual[(size_t)t * a->D + r] : 0.0f;
    float acc[MAX_GROUP][CHUNK_ROWS];
    float *out[MAX_GROUP];
    for (int i = 0; i < MAX_GROUP; i++) out[i] = acc[i];
    for (int e = 0; e < a->n_active; e++) {
        const dsx_matrix m = matrix_of(a->experts + 6 * e, 1);
        const int n = a->tok_start[e + 1] - a->tok_start[e];
        for (int p0 = a->tok_start[e], T; p0 < a->tok_start[e + 1]; p0 += T) {
            T = group_size(a->bits, a->tok_start[e + 1] - p0);
            int rows[MAX_GROUP];
            for (int i = 0; i < T; i++) rows[i] = p0 + i;
            matrix_rows(a->bits, w->fast, a->panel, a->round_act, &m, &w->dn, a->I, &w->h_in, rows, T, r0, r1, out,
                        T == n);
            for (int i = 0; i < T; i++) {
                const int t = a->tok_index[p0 + i];
                const float g = a->tok_weight[p0 + i];
                for (int r = r0; r < r1; r++) a->out[(size_t)t * a->D + r] += g * acc[i][r - r0];
            }
        }
    }
}

#define SWIGLU_PAIRS 16 /* (expert, token) pairs per chunk */
static void swiglu_chunk(void *ctx, int c, int tid) {
    (void)tid;
    moe_work *w = (moe_work *)ctx;
    const dsx_moe_args *a = w->a;
    const int I = a->I, B = w->B, p1 = (c + 1) * SWIGLU_PAIRS < w->P ? (c + 1) * SWIGLU_PAIRS : w->P;
    for (int p = c * SWIGLU_PAIRS; p < p1; p++) {
        const float *g = w->h + (size_t)p * 2 * I, *u = g + I;
        float *act = w->hf + (size_t)p * w->Ip;
        for (int j = 0; j < I; j++) act[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        for (int j = I; j < w->Ip; j++) act[j] = 0.0f;
        if (w->quant)
            quantize_row(act, w->Ip, B, a->bits == 4, w->hq + (size_t)p * w->Ip, w->hs + (size_t)p * (w->Ip / B),
                         w->hsum + (size_t)p * (w->Ip / B), w->hlanes + (size_t)p * (w->Ip / B) * 8);
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
    w.xq = w.hq = NULL, w.xs = w.xsum = w.hs = w.hsum = NULL, w.xlanes = w.hlanes = NULL; /* set when rounded */
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
    w.fast = quant && B == QK;
    for (int e = 0; e < a->n_active && w.fast; e++)
        if (a->experts[6 * e + 2] || a->experts[6 * e + 5]) w.fast = 0; /* zero points */
    w.chunk_gu = chunk_rows(a->bits == 32 ? (size_t)a->D * 4 : (size_t)w.Dp * a->bits / 8 + (size_t)(w.Dp / B) * 4, a->bits != 32);
    w.chunk_dn = chunk_rows(a->bits == 32 ? (size_t)a->I * 4 : (size_t)w.Ip * a->bits / 8 + (size_t)(w.Ip / B) * 4, a->bits != 32);
    w.x_in = (row_input){w.xf, w.xq, w.xs, w.xsum, w.xlanes, w.Dp, w.Dp, w.Dp / B};
    w.h_in = (row_input){w.hf, w.hq, w.hs, w.hsum, w.hlanes, w.Ip, w.Ip, w.Ip / B};
    dsx_parallel(pool, a->n_active * ((2 * I + w.chunk_gu - 1) / w.chunk_gu), gate_up_chunk, wp);
    /* SwiGLU per (expert, token) pair, then its rounding for the down projection: on all threads
     * (a prompt's 384 pairs on M took ~0.8 ms per layer on one) */
    w.B = B, w.quant = quant;
    if (P > SWIGLU_PAIRS) dsx_parallel(pool, (P + SWIGLU_PAIRS - 1) / SWIGLU_PAIRS, swiglu_chunk, wp);
    else swiglu_chunk(wp, 0, 0);
    /* phase 2: down rows, the experts' outputs weighted and summed (with the residual) */
    dsx_parallel(pool, (a->D + w.chunk_dn - 1) / w.chunk_dn, down_chunk, wp);
    return 0;
#undef w
}

/* dsx_moe with its arguments spelled out (the native decoder's call) */
int dsx_moe_layer(dsx_pool *pool, int bits, int round_act, int block, int N, int D, int I, int n_active,
                  const float *x, const float *residual, float *out, const uint64_t *experts,
                  const int32_t *tok_start, const int32_t *tok_index, const float *tok_weight, int panel) {
    dsx_moe_args a = {bits, round_act, block, N, D, I, n_active, x, residual, out, experts, tok_start, tok_index,
                      tok_weight, panel};
    return dsx_moe(pool, &a);
}
