/* dsexport's native decoder: one call runs the whole DeepSeek decoder over N new tokens.
 *
 * Why: on a CPU, decode reads every active weight once per token. ONNX Runtime runs an M-sized
 * step as ~830 nodes (1.2-1.6 us of dispatch each), repacks 4-bit weights to 0.75 bytes/weight,
 * and a paged bundle pays twelve session runs per token. Here the step is a loop of row-split
 * GEMVs on the bundle's own bytes (MatMulNBits rows, the expert store's records) in one thread
 * pool whose workers stay warm between the step's ~100 parallel loops.
 *
 * The arithmetic is the graph's (exporter/emit.py), op for op:
 *   x = embed[ids]
 *   per layer:  h = rmsnorm(x) ; [q | kv] = W_qkv h  (q rows pre-scaled by the softmax scale;
 *               with q_lora: q = W_qb rmsnorm(q_a)) ; latent = [rmsnorm(kv[:r]), rope(kv[r:])]
 *               appended to the cache ; per head: q_lat = W_UK^T q_nope, scores over the cache
 *               (causal + attention mask), softmax, ctx = W_UV (probs . latent[:, :r]) ;
 *               x += W_o ctx ; h = rmsnorm(x) ; x += dense MLP(h), or
 *               x += shared experts(h) + sum_k w_k expert_k(h) with the graph's routing
 *   logits = W_head rmsnorm(x)
 * Quantized projections round their input to int8 per block when the bundle's do (MatMulNBits
 * accuracy_level 4), with the rule of experts.c. Weights are [rows, K] row-major: fp32, or
 * block-quantized rows (scales float [rows, Kp/B], q [rows, Kp*bits/8], symmetric: zero 2^(bits-1)),
 * which AVX2 builds take as 8-row panels repacked at load (dsx_pack_panels; dsx.h says why).
 */
#include "dsx.h"

#include <float.h>
#include <time.h>

typedef struct {
    int32_t bits;      /* 32: fp32 [rows, K]; 8 or 4: block-quantized rows; 6: 6-bit panels (dsx.h) */
    int32_t block;     /* quantized: B, a multiple of 32 */
    int32_t rows, K;   /* K: inputs (quantized rows are padded to Kp, a multiple of B) */
    int32_t round_act; /* quantized: round the input to int8 per block */
    int32_t panel;     /* w and scales packed by dsx_pack_panels (block 32, int8 activations, AVX2):
                        * 1 with float scales, 2 with fp16 scales (dsx_half_scales) */
    const void *w;     /* fp32 weights, or the packed q */
    const float *scales;
    const float *bias; /* [rows] or NULL */
} dsx_linear;

typedef struct {
    const float *attn_norm; /* [D] */
    dsx_linear qkv;         /* [q (H*(dn+dr)) or q_a (qr) | kv_a (r+dr), D] */
    const float *q_a_norm;  /* [qr], q_lora only */
    dsx_linear q_b;         /* [H*(dn+dr), qr], q_lora only */
    const float *kv_norm;   /* [r] */
    const float *w_uk;      /* [H, r/64, dn, 64] when 64 divides r (each 64 columns contiguous), else [H, dn, r] */
    const float *w_uv;      /* [H, r, dv]; both fp16 (uint16) when w_half */
    dsx_linear o_proj;      /* [D, H*dv] */
    const float *mlp_norm;  /* [D] */
    dsx_linear gate_up;     /* dense MLP or shared experts: [2I, D], gate rows then up rows; rows 0: none */
    dsx_linear down;        /* [D, I] */
    const float *router;    /* [E, D], MoE layers */
    const float *router_bias; /* [E] or NULL */
    const int32_t *groups;  /* [E] routing group of each expert */
    const uint64_t *experts; /* [E, 6] record addresses, as dsx_moe takes them */
    int32_t E, expert_I, expert_bits, expert_block, expert_round_act, expert_panel; /* panel: as dsx_moe_args */
    int32_t w_half;         /* 1: w_uk and w_uv hold fp16 values (a quantized bundle's absorbed="fp16") */
} dsx_layer;

typedef struct {
    int32_t n_layers, D, H, dn, dr, dv, r, qr, vocab;
    int32_t k, n_group, topk_group;
    int32_t sigmoid;        /* scoring: 1 sigmoid, 0 softmax */
    int32_t group_top2;     /* group score: 1 sum of the top two (noaux_tc), 0 the max */
    int32_t norm_topk;
    int32_t reserved;
    float routed_scale, eps, latent_eps, rope_scale;
    const float *inv_freq;  /* [dr/2] */
    const float *embed;     /* [vocab, D] */
    const float *final_norm; /* [D] */
    dsx_linear head;        /* [vocab, D] */
    const dsx_layer *layers;
    /* An MTP block's input (eh_proj.rows > 0): x = eh_proj [enorm(embed[ids]), hnorm(hidden_in)]
     * instead of the embedding row (docs/mtp.md); its one layer, final norm and head follow as usual. */
    dsx_linear eh_proj;     /* [D, 2D] fp32 */
    const float *enorm, *hnorm; /* [D] */
} dsx_model;

typedef struct {
    int32_t B, T, past, capacity; /* rows, new tokens per row, cached positions, cache capacity */
    const int64_t *ids;           /* [B, T] */
    const int64_t *positions;     /* [B, T] */
    const int64_t *mask;          /* [B, past + T] */
    float *const *cache;          /* per layer [B, capacity, r + dr]; new latents written at past.. */
    float *logits;                /* [B, T, vocab] */
    float *hidden;                /* [B, T, D] final-normed states, or NULL */
    int32_t *routed;              /* [n_layers, B * T, k] the experts each MoE layer chose, or NULL */
    double *profile;              /* [6] seconds added per part (PROFILE_*), or NULL */
    int32_t last_only;            /* 1: logits [B, 1, vocab] of each row's last token only (a prompt's) */
    int32_t reserved;
    const float *hidden_in;       /* [B, T, D] the main model's final-normed states: an MTP block's input */
} dsx_step;

/* the step's parts, for the breakdown benchmarks print */
enum { PROFILE_PROJECTIONS, PROFILE_ATTENTION, PROFILE_EXPERTS, PROFILE_HEAD, PROFILE_SERIAL, PROFILE_PARTS };

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int dsx_moe_layer(dsx_pool *pool, int bits, int round_act, int block, int N, int D, int I, int n_active,
                  const float *x, const float *residual, float *out, const uint64_t *experts,
                  const int32_t *tok_start, const int32_t *tok_index, const float *tok_weight, int panel);

/* ---- scratch: one block per call, carved in order ------------------------------------------ */
typedef struct { char *p; size_t used, size; } arena;

static void *take(arena *a, size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    if (a->used + bytes > a->size) return NULL;
    void *p = a->p + a->used;
    a->used += bytes;
    return p;
}

/* ---- one linear layer over N tokens: rows split across threads ----------------------------- */
typedef struct {
    const dsx_linear *L;
    int N, fast;
    row_input in;             /* fp32 input (a padded copy for quantized rows) and its rounding */
    float *out; int ldo;
    int chunk;                /* rows per chunk */
} lin_work;

static void linear_chunk(void *ctx, int c, int tid) {
    (void)tid;
    const lin_work *w = (const lin_work *)ctx;
    const dsx_linear *L = w->L;
    const int r0 = c * w->chunk, r1 = r0 + w->chunk < L->rows ? r0 + w->chunk : L->rows;
    const dsx_matrix m = {(const uint8_t *)L->w, L->scales, NULL};
    const matrix_shape s = {L->bits, w->in.Kp, L->block};
    for (int n0 = 0, T; n0 < w->N; n0 += T) {
        T = group_size(L->bits, w->N - n0);
        int rows[MAX_GROUP];
        float *out[MAX_GROUP];
        for (int t = 0; t < T; t++) rows[t] = n0 + t, out[t] = w->out + (size_t)(n0 + t) * w->ldo + r0;
        matrix_rows(L->bits, w->fast, L->panel, L->round_act, &m, &s, L->K, &w->in, rows, T, r0, r1, out, T == w->N);
        if (L->bias)
            for (int t = 0; t < T; t++)
                for (int r = r0; r < r1; r++) out[t][r - r0] += L->bias[r];
    }
}

/* out[n, :rows] (row stride ldo) = L x[n] for n < N; x [N, ldx]. scratch: the activations' copy. */
static int linear(dsx_pool *pool, const dsx_linear *L, const float *x, int ldx, int N, float *out, int ldo, arena *a) {
    lin_work w = {L, N, 0, {x, NULL, NULL, NULL, NULL, ldx, L->K, 1}, out, ldo, CHUNK_ROWS};
    size_t mark = a->used;
    if (L->bits != 32) {
        const int B = L->block, Kp = (L->K + B - 1) / B * B, nb = Kp / B;
        float *xf = take(a, (size_t)N * Kp * 4);
        if (!xf) return -2;
        for (int n = 0; n < N; n++) {
            memcpy(xf + (size_t)n * Kp, x + (size_t)n * ldx, (size_t)L->K * 4);
            memset(xf + (size_t)n * Kp + L->K, 0, (size_t)(Kp - L->K) * 4);
        }
        w.in = (row_input){xf, NULL, NULL, NULL, NULL, Kp, Kp, nb};
        if (L->round_act) {
            int8_t *xq = take(a, (size_t)N * Kp);
            float *xs = take(a, (size_t)N * nb * 4), *xsum = take(a, (size_t)N * nb * 4);
            int32_t *lanes = take(a, (size_t)N * nb * 32);
            if (!xq || !xs || !xsum || !lanes) return -2;
            for (int n = 0; n < N; n++)
                quantize_row(xf + (size_t)n * Kp, Kp, B, L->bits != 8, xq + (size_t)n * Kp, xs + (size_t)n * nb,
                             xsum + (size_t)n * nb, lanes + (size_t)n * nb * 8);
            w.in.q = xq, w.in.s = xs, w.in.sum = xsum, w.in.lanes = lanes;
            w.fast = B == QK;
        }
    }
    w.chunk = chunk_rows(L->bits == 32 ? (size_t)L->K * 4 : (size_t)w.in.Kp * L->bits / 8 + (size_t)w.in.nb * 4, L->bits != 32);
    dsx_parallel(pool, (L->rows + w.chunk - 1) / w.chunk, linear_chunk, &w);
    a->used = mark;
    return 0;
}

/* Row byte j (j < 8) of a 6-bit panel block's high bits: bits 4-5 of u = q + 32 of the row's
 * weights 2j, 2j + 16, 2j + 1, 2j + 17 (the even and odd halves' j and j + 8), two bits each */
static uint8_t six_bits_byte(const uint8_t *u, int j) {
    return (uint8_t)((u[2 * j] >> 4) | (u[2 * j + 16] >> 4) << 2 | (u[2 * j + 1] >> 4) << 4 | (u[2 * j + 17] >> 4) << 6);
}

/* 6-bit panels from 8-bit rows (q [rows, Kp], values q - 128 in [-32, 31]): per panel block the
 * rows' low nibbles as int4's (16 bytes each), then their high bits (8 bytes each). -1: a value
 * outside the range. */
static int pack_six(int rows, int Kp, const uint8_t *q, const float *scales, uint8_t *pq, float *ps) {
    const int nb = Kp / QK, panels = (rows + PANEL - 1) / PANEL;
    for (int p = 0; p < panels; p++)
        for (int b = 0; b < nb; b++) {
            uint8_t *dst = pq + ((size_t)p * nb + b) * PANEL * 24;
            for (int j = 0; j < PANEL; j++) {
                const int r = p * PANEL + j;
                uint8_t u[QK];
                for (int k = 0; k < QK; k++) {
                    const int v = r < rows ? (int)q[(size_t)r * Kp + (size_t)b * QK + k] - 128 : 0;
                    if (v < -32 || v > 31) return -1;
                    u[k] = (uint8_t)(v + 32);
                }
                for (int k = 0; k < QK / 2; k++) dst[j * 16 + k] = (uint8_t)((u[2 * k] & 15) | (u[2 * k + 1] & 15) << 4);
                for (int k = 0; k < 8; k++) dst[128 + j * 8 + k] = six_bits_byte(u, k);
                ps[((size_t)p * nb + b) * PANEL + panel_scale_slot(6, j)] = r < rows ? scales[(size_t)r * nb + b] : 0.0f;
            }
        }
    return 0;
}

/* Repack block-32 rows into panels (dsx.h): pq [ceil(rows/8) * 8, Kp * bits / 8] bytes, ps the same
 * rows x Kp/32 floats. bits 6: 8-bit rows (q [rows, Kp]) whose values fit 6 bits. 0 on success,
 * -1 bad arguments (or a value that does not fit). */
int dsx_pack_panels(int bits, int rows, int Kp, const uint8_t *q, const float *scales, uint8_t *pq, float *ps) {
    if ((bits != 4 && bits != 6 && bits != 8) || rows < 1 || Kp < QK || Kp % QK || !q || !scales || !pq || !ps) return -1;
    if (bits == 6) return pack_six(rows, Kp, q, scales, pq, ps);
    const int nb = Kp / QK, panels = (rows + PANEL - 1) / PANEL;
    const size_t row_bytes = (size_t)Kp * bits / 8, blk = (size_t)QK * bits / 8;
    for (int p = 0; p < panels; p++)
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < PANEL; j++) {
                const int r = p * PANEL + j;
                uint8_t *dst = pq + (((size_t)p * nb + b) * PANEL + j) * blk;
                float *sd = ps + ((size_t)p * nb + b) * PANEL + panel_scale_slot(bits, j);
                if (r >= rows) { /* zero weights: nibble 8 or signed 0, scale 0 */
                    memset(dst, bits == 4 ? 0x88 : 0x00, blk);
                    *sd = 0.0f;
                    continue;
                }
                const uint8_t *src = q + (size_t)r * row_bytes + (size_t)b * blk;
                for (size_t k = 0; k < blk; k++) dst[k] = bits == 8 ? (uint8_t)(src[k] ^ 0x80) : src[k];
                *sd = scales[(size_t)r * nb + b];
            }
    return 0;
}

/* ---- small per-token pieces (the caller's thread) ------------------------------------------ */
static void rms_norm(const float *x, const float *w, int n, float eps, float *y) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int j = 0; j < n; j++) y[j] = x[j] * inv * w[j];
}

/* rotate-half rope on dr values in place: the exporter de-interleaves the rope rows */
static void rope(float *x, int dr, const float *cosv, const float *sinv) {
    const int half = dr / 2;
    for (int j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cosv[j] - b * sinv[j];
        x[j + half] = b * cosv[j] + a * sinv[j];
    }
}

/* ---- attention: one (token, group of heads) per chunk ----------------------------------------
 * A group's heads read each cached latent row once (from L1 for every head after the first):
 * one head per chunk read the whole cache once per head. */
typedef struct {
    const dsx_model *m;
    const dsx_layer *ly;
    const dsx_step *s;
    const float *cache;  /* this layer's [B, capacity, L] */
    const float *q;      /* [N, H, dn+dr], rope applied */
    float *ctx;          /* [N, H*dv] */
    float *scratch;      /* per thread: group x [S + L + r] */
    size_t per_thread;
    int group, groups;   /* heads per chunk, chunks per token */
} attn_work;

static void attention_chunk(void *p, int c, int tid) {
    const attn_work *w = (const attn_work *)p;
    const dsx_model *m = w->m;
    const dsx_step *s = w->s;
    const int H = m->H, dn = m->dn, dr = m->dr, dv = m->dv, r = m->r, L = r + dr;
    const int n = c / w->groups, h0 = (c % w->groups) * w->group, b = n / s->T, t = n % s->T;
    const int G = h0 + w->group < H ? w->group : H - h0;
    const int S = s->past + s->T, last = s->past + t; /* keys 0..last are causal */
    float *probs = w->scratch + (size_t)tid * w->per_thread, *qlat = probs + (size_t)G * S, *ctxlat = qlat + (size_t)G * L;
    const int half = w->ly->w_half; /* W_UK/W_UV as fp16 */
    const size_t wsize = half ? 2 : 4;
    for (int g = 0; g < G; g++) { /* q_lat = W_UK[h]^T q_nope, then the rope part */
        const float *q = w->q + ((size_t)n * H + h0 + g) * (dn + dr);
        const char *wuk = (const char *)w->ly->w_uk + (size_t)(h0 + g) * dn * r * wsize;
        float *ql = qlat + (size_t)g * L;
        if (r % 64 == 0)
            for (int jb = 0; jb < r / 64; jb++)
                gemv_t_any(wuk + (size_t)jb * dn * 64 * wsize, half, dn, 64, 64, q, ql + jb * 64);
        else
            gemv_t_any(wuk, half, dn, r, (size_t)r, q, ql);
        memcpy(ql + r, q + dn, (size_t)dr * 4);
    }
    const float *keys = w->cache + (size_t)b * s->capacity * L;
    const int64_t *mask = s->mask + (size_t)b * S;
    int visible = 0;
    for (int j = 0; j < S; j++) {
        if (j > last || !mask[j]) continue;
        visible++;
        for (int g = 0; g < G; g++) probs[(size_t)g * S + j] = dot_f32(qlat + (size_t)g * L, keys + (size_t)j * L, L);
    }
    for (int g = 0; g < G; g++) {
        float *pg = probs + (size_t)g * S, best = -FLT_MAX, total = 0.0f;
        for (int j = 0; j < S; j++)
            if (j <= last && mask[j]) best = pg[j] > best ? pg[j] : best;
        for (int j = 0; j < S; j++) {
            /* the graph fills masked scores with the float minimum: none visible is uniform over S */
            float e = visible ? (j <= last && mask[j] ? expf(pg[j] - best) : 0.0f) : 1.0f;
            pg[j] = e;
            total += e;
        }
        const float inv = 1.0f / total;
        for (int j = 0; j < S; j++) pg[j] *= inv;
        /* the context on the latent: probs . latent[:, :r] (masked positions weigh 0) */
        gemv_t(keys, S, r, (size_t)L, pg, ctxlat + (size_t)g * r);
    }
    for (int g = 0; g < G; g++) /* W_UV: [r, dv] per head */
        gemv_t_any((const char *)w->ly->w_uv + (size_t)(h0 + g) * r * dv * wsize, half, r, dv, (size_t)dv,
                   ctxlat + (size_t)g * r, w->ctx + (size_t)n * H * dv + (size_t)(h0 + g) * dv);
}

/* ---- routing: the graph's (exporter/lowering.emit_routing, final_weights) ------------------ */
static void route(const dsx_model *m, const dsx_layer *ly, const float *logits, float *scores, float *choice,
                  int32_t *slots, float *weights) {
    const int E = ly->E, k = m->k;
    if (m->sigmoid) {
        for (int e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-logits[e]));
    } else {
        float mx = -FLT_MAX, sum = 0.0f;
        for (int e = 0; e < E; e++) mx = logits[e] > mx ? logits[e] : mx;
        for (int e = 0; e < E; e++) sum += (scores[e] = expf(logits[e] - mx));
        for (int e = 0; e < E; e++) scores[e] /= sum;
    }
    for (int e = 0; e < E; e++) choice[e] = scores[e] + (ly->router_bias ? ly->router_bias[e] : 0.0f);
    if (m->n_group > 1 && m->topk_group < m->n_group) {
        float gscore[1024];
        int keep[1024];
        const int G = m->n_group < 1024 ? m->n_group : 1024;
        for (int g = 0; g < G; g++) {
            float a = -INFINITY, b = -INFINITY; /* best two of the group */
            for (int e = 0; e < E; e++) {
                if (ly->groups[e] != g) continue;
                if (choice[e] > a) b = a, a = choice[e];
                else if (choice[e] > b) b = choice[e];
            }
            gscore[g] = m->group_top2 ? (a == -INFINITY ? -INFINITY : a + (b == -INFINITY ? 0.0f : b)) : a;
            keep[g] = 0;
        }
        for (int i = 0; i < m->topk_group && i < G; i++) { /* TopK: the largest, the lower index on ties */
            int best = -1;
            for (int g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            keep[best] = 1;
        }
        for (int e = 0; e < E; e++)
            if (ly->groups[e] < 0 || ly->groups[e] >= G || !keep[ly->groups[e]]) choice[e] = -INFINITY;
    }
    float total = 0.0f;
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < i; j++) taken |= slots[j] == e;
            if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
        }
        slots[i] = best;
        weights[i] = scores[best];
        total += weights[i];
    }
    for (int i = 0; i < k; i++) {
        if (m->norm_topk) weights[i] = weights[i] / (total + 1e-20f);
        weights[i] *= m->routed_scale;
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

static inline void mark(const dsx_step *s, double *last, int part) {
    if (!s->profile) return;
    const double t = now();
    s->profile[part] += t - *last;
    *last = t;
}

/* ---- the step -------------------------------------------------------------------------------- */
static int check(const dsx_model *m, const dsx_step *s) {
    if (!m || !s || s->B < 1 || s->T < 1 || s->past < 0 || s->past + s->T > s->capacity) return -1;
    if (m->dr % 2 || m->r < 1 || m->H < 1 || m->n_layers < 0 || m->k < 1) return -1;
    if (m->eh_proj.rows && (m->eh_proj.rows != m->D || m->eh_proj.K != 2 * m->D || m->eh_proj.bits != 32 ||
                            !s->hidden_in || !m->enorm || !m->hnorm)) return -1;
    for (long i = 0; i < (long)s->B * s->T; i++)
        if (s->ids[i] < 0 || s->ids[i] >= m->vocab) return -3;
    return 0;
}

/* 0 on success; -1 bad arguments, -2 out of memory, -3 a token id outside the vocabulary */
int dsx_decoder_forward(dsx_pool *pool, const dsx_model *m, const dsx_step *s) {
    int rc = check(m, s);
    if (rc) return rc;
    const int N = s->B * s->T, D = m->D, H = m->H, dn = m->dn, dr = m->dr, dv = m->dv, r = m->r, L = r + dr;
    const int S = s->past + s->T, qdim = H * (dn + dr);
    int widest = D > H * dv ? D : H * dv, inter = 0, E = 0, qkv_rows = 0;
    for (int l = 0; l < m->n_layers; l++) {
        const dsx_layer *ly = &m->layers[l];
        inter = ly->gate_up.rows / 2 > inter ? ly->gate_up.rows / 2 : inter;
        E = ly->E > E ? ly->E : E;
        qkv_rows = ly->qkv.rows > qkv_rows ? ly->qkv.rows : qkv_rows;
    }
    widest = inter > widest ? inter : widest;
    widest = m->qr > widest ? m->qr : widest;
    const size_t Kp = ((size_t)widest + 127) / 128 * 128,
                 floats = (size_t)N * (5 * D + qkv_rows + qdim + H * dv + 3 * inter + E); /* 2D: an MTP block's input */
    /* attention: heads in groups, one group per thread for a single token */
    const int group = N >= pool->n ? 1 : (H + pool->n - 1) / pool->n, groups = (H + group - 1) / group;
    const size_t per_thread = (size_t)group * (S + 2 * L) + 64;
    size_t bytes = floats * 4 + (size_t)pool->n * per_thread * 4 + (size_t)N * Kp * 9 + (size_t)N * (Kp / 32) * 48 +
                   (size_t)E * 64 + (size_t)m->k * N * 12 + (size_t)(E + 1) * 8 + (size_t)N * (dr + m->qr) * 4 + 65536;
    arena a = {malloc(bytes), 0, bytes};
    if (!a.p) return -2;
    float *x = take(&a, (size_t)N * D * 4), *h = take(&a, (size_t)N * D * 4), *y = take(&a, (size_t)N * D * 4);
    float *qkv = take(&a, (size_t)N * qkv_rows * 4), *qfull = take(&a, (size_t)N * qdim * 4);
    float *ctx = take(&a, (size_t)N * H * dv * 4), *gu = take(&a, (size_t)N * 2 * inter * 4 + 4);
    float *act = take(&a, (size_t)N * inter * 4 + 4), *rlog = take(&a, (size_t)N * E * 4 + 4);
    float *att = take(&a, (size_t)pool->n * per_thread * 4), *scores = take(&a, (size_t)E * 4 + 4);
    float *choice = take(&a, (size_t)E * 4 + 4);
    int32_t *slots = take(&a, (size_t)m->k * N * 4), *count = take(&a, (size_t)(E + 1) * 4);
    float *weights = take(&a, (size_t)m->k * N * 4);
    int32_t *tok_index = take(&a, (size_t)m->k * N * 4), *tok_start = take(&a, (size_t)(E + 1) * 4);
    float *tok_weight = take(&a, (size_t)m->k * N * 4);
    uint64_t *active = take(&a, (size_t)E * 48 + 8);
    float *cosv = take(&a, (size_t)N * dr * 4 + 4), *sinv = cosv + (size_t)N * dr / 2;
    float *qa = take(&a, (size_t)N * m->qr * 4 + 4), *eh = take(&a, (size_t)N * 2 * D * 4);
    if (!x || !h || !y || !qkv || !qfull || !ctx || !gu || !act || !rlog || !att || !scores || !choice || !slots ||
        !count || !weights || !tok_index || !tok_start || !tok_weight || !active || !cosv || !qa || !eh) {
        free(a.p);
        return -2;
    }
    double last = s->profile ? now() : 0.0;
    for (int n = 0; n < N; n++) {
        memcpy(x + (size_t)n * D, m->embed + (size_t)s->ids[n] * D, (size_t)D * 4);
        for (int i = 0; i < dr / 2; i++) { /* the graph: float(position) * inv_freq, cos/sin times the rope scale */
            const float f = (float)s->positions[n] * m->inv_freq[i];
            cosv[(size_t)n * dr / 2 + i] = cosf(f) * m->rope_scale;
            sinv[(size_t)n * dr / 2 + i] = sinf(f) * m->rope_scale;
        }
    }
    if (m->eh_proj.rows) { /* the MTP block: [enorm(embedding of token t+1), hnorm(h_t)] -> eh_proj */
        for (int n = 0; n < N; n++) {
            rms_norm(x + (size_t)n * D, m->enorm, D, m->eps, eh + (size_t)n * 2 * D);
            rms_norm(s->hidden_in + (size_t)n * D, m->hnorm, D, m->eps, eh + (size_t)n * 2 * D + D);
        }
        mark(s, &last, PROFILE_SERIAL);
        rc = linear(pool, &m->eh_proj, eh, 2 * D, N, x, D, &a);
        mark(s, &last, PROFILE_PROJECTIONS);
    }
    for (int l = 0; l < m->n_layers && !rc; l++) {
        const dsx_layer *ly = &m->layers[l];
        /* attention */
        for (int n = 0; n < N; n++) rms_norm(x + (size_t)n * D, ly->attn_norm, D, m->eps, h + (size_t)n * D);
        mark(s, &last, PROFILE_SERIAL);
        rc = linear(pool, &ly->qkv, h, D, N, qkv, ly->qkv.rows, &a);
        mark(s, &last, PROFILE_PROJECTIONS);
        if (rc) break;
        const int kv_off = ly->qkv.rows - L;
        if (m->qr) { /* q_lora: q = W_qb rmsnorm(q_a) */
            for (int n = 0; n < N; n++) rms_norm(qkv + (size_t)n * ly->qkv.rows, ly->q_a_norm, m->qr, m->latent_eps, qa + (size_t)n * m->qr);
            mark(s, &last, PROFILE_SERIAL);
            rc = linear(pool, &ly->q_b, qa, m->qr, N, qfull, qdim, &a);
            mark(s, &last, PROFILE_PROJECTIONS);
            if (rc) break;
        } else {
            for (int n = 0; n < N; n++) memcpy(qfull + (size_t)n * qdim, qkv + (size_t)n * ly->qkv.rows, (size_t)qdim * 4);
        }
        float *cache = s->cache[l];
        for (int n = 0; n < N; n++) {
            const float *cs = cosv + (size_t)n * dr / 2, *sn = sinv + (size_t)n * dr / 2;
            for (int hh = 0; hh < H; hh++) rope(qfull + ((size_t)n * H + hh) * (dn + dr) + dn, dr, cs, sn);
            const int b = n / s->T, t = n % s->T;
            float *slot = cache + ((size_t)b * s->capacity + s->past + t) * L;
            const float *kv = qkv + (size_t)n * ly->qkv.rows + kv_off;
            rms_norm(kv, ly->kv_norm, r, m->latent_eps, slot);
            memcpy(slot + r, kv + r, (size_t)dr * 4);
            rope(slot + r, dr, cs, sn);
        }
        attn_work aw = {m, ly, s, cache, qfull, ctx, att, per_thread, group, groups};
        mark(s, &last, PROFILE_SERIAL);
        dsx_parallel(pool, N * groups, attention_chunk, &aw);
        mark(s, &last, PROFILE_ATTENTION);
        mark(s, &last, PROFILE_SERIAL);
        rc = linear(pool, &ly->o_proj, ctx, H * dv, N, y, D, &a);
        mark(s, &last, PROFILE_PROJECTIONS);
        if (rc) break;
        for (size_t i = 0; i < (size_t)N * D; i++) x[i] += y[i];
        /* feed-forward */
        for (int n = 0; n < N; n++) rms_norm(x + (size_t)n * D, ly->mlp_norm, D, m->eps, h + (size_t)n * D);
        if (ly->gate_up.rows) { /* dense MLP, or the shared experts */
            const int I = ly->gate_up.rows / 2;
            mark(s, &last, PROFILE_SERIAL);
            rc = linear(pool, &ly->gate_up, h, D, N, gu, 2 * I, &a);
            mark(s, &last, PROFILE_PROJECTIONS);
            if (rc) break;
            for (int n = 0; n < N; n++)
                for (int j = 0; j < I; j++)
                    act[(size_t)n * I + j] = silu(gu[(size_t)n * 2 * I + j]) * gu[(size_t)n * 2 * I + I + j];
            mark(s, &last, PROFILE_SERIAL);
            rc = linear(pool, &ly->down, act, I, N, y, D, &a);
            mark(s, &last, PROFILE_PROJECTIONS);
            if (rc) break;
            for (size_t i = 0; i < (size_t)N * D; i++) x[i] += y[i];
        }
        if (!ly->E) continue;
        dsx_linear router = {32, 0, ly->E, D, 0, 0, ly->router, NULL, NULL};
        mark(s, &last, PROFILE_SERIAL);
        rc = linear(pool, &router, h, D, N, rlog, ly->E, &a);
        mark(s, &last, PROFILE_PROJECTIONS);
        if (rc) break;
        memset(count, 0, (size_t)(ly->E + 1) * 4);
        for (int n = 0; n < N; n++) {
            route(m, ly, rlog + (size_t)n * ly->E, scores, choice, slots + (size_t)n * m->k, weights + (size_t)n * m->k);
            for (int i = 0; i < m->k; i++) count[slots[(size_t)n * m->k + i]]++;
        }
        if (s->routed) memcpy(s->routed + (size_t)l * N * m->k, slots, (size_t)N * m->k * 4);
        /* (expert, token) pairs grouped by expert, experts in ascending slot order (the paged
         * backend's order: the sum does not depend on the routing's order) */
        int n_active = 0, p = 0;
        for (int e = 0; e < ly->E; e++) {
            if (!count[e]) continue;
            memcpy(active + (size_t)n_active * 6, ly->experts + (size_t)e * 6, 48);
            tok_start[n_active] = p;
            for (int n = 0; n < N; n++)
                for (int i = 0; i < m->k; i++)
                    if (slots[(size_t)n * m->k + i] == e) {
                        tok_index[p] = n;
                        tok_weight[p++] = weights[(size_t)n * m->k + i];
                    }
            n_active++;
        }
        tok_start[n_active] = p;
        mark(s, &last, PROFILE_SERIAL);
        rc = dsx_moe_layer(pool, ly->expert_bits, ly->expert_round_act, ly->expert_block, N, D, ly->expert_I, n_active,
                           h, x, x, active, tok_start, tok_index, tok_weight, ly->expert_panel);
        mark(s, &last, PROFILE_EXPERTS);
        if (rc) break;
    }
    if (!rc) {
        for (int n = 0; n < N; n++) rms_norm(x + (size_t)n * D, m->final_norm, D, m->eps, h + (size_t)n * D);
        if (s->hidden) memcpy(s->hidden, h, (size_t)N * D * 4);
        mark(s, &last, PROFILE_SERIAL);
        if (s->last_only && s->T > 1) { /* each row's last token: the head is ~10% of a prompt's work */
            for (int b = 0; b < s->B; b++)
                memmove(h + (size_t)b * D, h + ((size_t)b * s->T + s->T - 1) * D, (size_t)D * 4);
            rc = linear(pool, &m->head, h, D, s->B, s->logits, m->vocab, &a);
        } else {
            rc = linear(pool, &m->head, h, D, N, s->logits, m->vocab, &a);
        }
        mark(s, &last, PROFILE_HEAD);
    }
    free(a.p);
    return rc;
}

/* The first index of the largest of x[0..n), or -1 when any is NaN or Inf */
static int argmax_finite(const float *x, int n) {
    float top = -INFINITY;
    int v = 0, finite = 1;
#if defined(DSX_AVX2)
    __m256 mx = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
    for (; v + 8 <= n; v += 8) {
        const __m256 a = _mm256_loadu_ps(x + v);
        mx = _mm256_max_ps(mx, a);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(a, a), _mm256_setzero_ps(), _CMP_NEQ_UQ)); /* inf - inf, NaN */
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    finite = _mm256_movemask_ps(bad) == 0;
#endif
    for (; v < n; v++) {
        finite &= isfinite(x[v]) != 0;
        top = x[v] > top ? x[v] : top;
    }
    if (!finite || n < 1) return -1;
    for (v = 0; v < n; v++)
        if (x[v] == top) return v;
    return -1;
}

/* Greedy decode of one sequence: up to n_steps steps of one token each, each fed the last one's
 * argmax (the first index of the largest logit, as numpy's argmax), stopping after a token of
 * `stop`. s: B = T = 1, *ids the token to feed, *positions its position, mask all ones up to
 * past + n_steps; ids, positions and past advance as it goes. tokens[i]: the step's token; routed
 * (or NULL): [n_steps, n_layers, k] the experts each step chose. Why in C: between two steps the
 * Python decode loop cost 210-280 us on M int4 (its working set evicted by the step's ~140 MB of
 * weights), 4-5% of a step. Returns the steps run (>= 1), or a dsx_decoder_forward error, or -4
 * when a step's logits hold NaN or Inf. */
int dsx_decoder_greedy(dsx_pool *pool, const dsx_model *m, dsx_step *s, int n_steps, const int64_t *stop, int n_stop,
                       int64_t *tokens, int32_t *routed) {
    if (!s || s->B != 1 || s->T != 1 || n_steps < 1 || !tokens || (n_stop && !stop)) return -1;
    int64_t *id = (int64_t *)s->ids, *position = (int64_t *)s->positions;
    const size_t per_step = m ? (size_t)m->n_layers * m->k : 0;
    for (int i = 0; i < n_steps; i++) {
        s->routed = routed ? routed + i * per_step : NULL;
        const int rc = dsx_decoder_forward(pool, m, s);
        if (rc) return rc;
        const int best = argmax_finite(s->logits, m->vocab);
        if (best < 0) return -4;
        tokens[i] = best;
        for (int j = 0; j < n_stop; j++)
            if (stop[j] == best) return i + 1;
        *id = best;
        *position += 1;
        s->past += 1;
    }
    return n_steps;
}

/* What runtime/native_backend.py checks before it hands over weights: the structures' sizes and
 * the version of the layouts it prepares (3: W_UK in 64-column blocks, block-32 rows as panels,
 * dsx_step.last_only; 4: the MTP block's input, dsx_model.eh_proj and dsx_step.hidden_in; 5: panels
 * with fp16 scales, panel 2; 6: dsx_layer.w_half; 7: 6-bit panels, dsx_linear.bits 6).
 * A library from another build that disagrees would read the weights wrongly, not fail. */
#define DSX_LAYOUT_VERSION 7
int dsx_decoder_abi(int64_t *sizes, int n) {
    const int64_t mine[] = {sizeof(dsx_linear), sizeof(dsx_layer), sizeof(dsx_model), sizeof(dsx_step),
                            DSX_LAYOUT_VERSION};
    for (int i = 0; i < n && i < 5; i++) sizes[i] = mine[i];
    return 5;
}
