/* visionmoe's native CPU kernels: the noisy top-k router (V-MoE token choice) in one pass forward and one
 * backward, the MoE layer's row moves (dispatch and combine of a token-choice plan), forward and back, and
 * small experts computed token by token with the moves fused in (the `fused` backend, at the end).
 *
 * Plain C without torch headers (compiled on first use in about a second, called through ctypes from
 * visionmoe/native/__init__.py). Forward, for each token: the noisy logits l + sigma * noise, their
 * softmax (the gates), the stable top-k of the gates, the k-th largest noisy logit and the load loss's
 * p = 1 - Phi((threshold - l) / sigma); per group, the choice-major capacity positions, the kept gate
 * weights, and the per-expert sums of the gates (importance) and of p (load). Backward: the gradient of
 * the logits from those of the gates, the weights and the two sums. What ATen computes in some thirty
 * passes over (tokens, E) tensors, in two.
 *
 * exp and erfc are polynomial approximations (Cephes expf, relative error ~2e-7; Numerical Recipes'
 * erfcc, ~1.2e-7) written so that GCC vectorises the loops over experts; the results agree with ATen's
 * to float rounding, not bit for bit. The build uses -ffp-contract=off so that l + sigma * noise rounds
 * as ATen's mul-then-add does (the same noisy logits, bit for bit).
 *
 * The row moves are copies and gated sums of whole rows, in the order ATen's path computes them (products
 * rounded, then summed over a token's choices from the first), so the layer's output is bit-identical to
 * its ATen path; only the row dot products of the gates' gradients sum in another order.
 *
 * Work is split over routing groups or tokens into `threads` contiguous chunks (see parallel_for).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define MAX_K 64
#define MIN_VALUES_PER_THREAD 32768

typedef void (*chunk_fn)(void *ctx, int64_t begin, int64_t end);

#ifndef _OPENMP
typedef struct {
    chunk_fn fn;
    void *ctx;
    int64_t begin, end;
} chunk_t;

static void *run_chunk(void *arg) {
    chunk_t *c = (chunk_t *)arg;
    c->fn(c->ctx, c->begin, c->end);
    return NULL;
}
#endif

/* fn over [0, n) in up to `threads` chunks of at least `grain` items. Built with OpenMP (the default),
 * the chunks run on the OpenMP runtime already in the process: PyTorch's own libgomp, whose workers
 * would otherwise spin on the cores our threads need. Without it, one POSIX thread per chunk. */
static void parallel_for(int64_t n, int64_t grain, int threads, chunk_fn fn, void *ctx) {
    int64_t chunks = threads < 1 ? 1 : threads;
    if (chunks > MAX_THREADS) chunks = MAX_THREADS;
    if (grain < 1) grain = 1;
    if (chunks > n / grain) chunks = n / grain;
    if (chunks <= 1) {
        fn(ctx, 0, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(chunks) schedule(static, 1)
    for (int64_t i = 0; i < chunks; i++) fn(ctx, n * i / chunks, n * (i + 1) / chunks);
#else
    chunk_t parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 0; i < chunks; i++) {
        parts[i] = (chunk_t){fn, ctx, n * i / chunks, n * (i + 1) / chunks};
    }
    for (int64_t i = 1; i < chunks; i++) started[i] = pthread_create(&ids[i], NULL, run_chunk, &parts[i]) == 0;
    run_chunk(&parts[0]);
    for (int64_t i = 1; i < chunks; i++) {
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            run_chunk(&parts[i]); /* no thread to be had: run it here */
    }
#endif
}

static int64_t group_grain(int64_t S, int64_t E) {
    int64_t per_group = S * E;
    if (per_group < 1) return INT64_MAX; /* no work: one chunk */
    return per_group >= MIN_VALUES_PER_THREAD ? 1 : (MIN_VALUES_PER_THREAD + per_group - 1) / per_group;
}

/* ---- exp and erfc on 8 lanes ---------------------------------------------------------------------------
 * GCC/Clang vector extensions: one 32-byte vector (AVX2 with -march=native; two SSE halves elsewhere, or
 * NEON) holds 8 experts of a token; E must be a multiple of 8. No libm calls, no branches. */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline v8f select8(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }

static inline v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n by the exponent bits;
 * relative error ~2e-7 on [-87, 88] (clamped there: e^-87 ~ 1.6e-38, the smallest normal float). */
static inline v8f exp8(v8f x) {
    x = select8(x < -87.0f, splat8(-87.0f), x);
    x = select8(x > 88.0f, splat8(88.0f), x);
    const v8f magic = splat8(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8f t = x * 1.44269504088896341f + magic;
    v8i n = (v8i)t - (v8i)magic;
    v8f nf = t - magic;
    v8f r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (v8f)((n + 127) << 23);
}

/* Numerical Recipes' erfcc (Chebyshev fit), fractional error < 1.2e-7 (to float rounding here). */
static inline v8f erfc8(v8f x) {
    v8f z = (v8f)((v8i)x & 0x7fffffff);
    v8f t = 1.0f / (1.0f + 0.5f * z);
    v8f poly = -0.82215223f + t * 0.17087277f;
    poly = 1.48851587f + t * poly;
    poly = -1.13520398f + t * poly;
    poly = 0.27886807f + t * poly;
    poly = -0.18628806f + t * poly;
    poly = 0.09678418f + t * poly;
    poly = 0.37409196f + t * poly;
    poly = 1.00002368f + t * poly;
    poly = -1.26551223f + t * poly;
    v8f r = t * exp8(-z * z + poly);
    return select8(x >= 0.0f, r, 2.0f - r);
}

static inline float hsum8(v8f v) { /* in lane order, as a loop over experts would add */
    float s = v[0];
    for (int i = 1; i < 8; i++) s += v[i];
    return s;
}

/* chosen[0..K): the indices of the K largest of row[0..E) in order, ties to the lower index, as a stable
 * descending sort orders them (the row holds no NaN and no -inf). Branch-free: per pick, the maximum,
 * then the lowest index holding it, which is then masked out in the scratch copy. */
static inline void top_k(const float *row, int64_t E, int64_t K, int64_t *chosen, float *scratch) {
    memcpy(scratch, row, (size_t)E * sizeof(float));
    for (int64_t j = 0; j < K; j++) {
        float m = -INFINITY;
        for (int64_t e = 0; e < E; e++) m = scratch[e] > m ? scratch[e] : m;
        int64_t best = E;
        for (int64_t e = E - 1; e >= 0; e--) best = scratch[e] == m ? e : best;
        chosen[j] = best;
        scratch[best] = -INFINITY;
    }
}

#if defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

#ifdef __AVX2__

/* top_k for E = 8 in AVX2: the maximum by a tree of lane swaps, its lowest lane by movemask. */
static inline void top_k8(const float *row, int64_t K, int64_t *chosen) {
    __m256 v = _mm256_loadu_ps(row);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t j = 0; j < K; j++) {
        __m256 m = _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));
        m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4E));
        m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 0x01));
        const int best = __builtin_ctz((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, m, _CMP_EQ_OQ)));
        chosen[j] = best;
        const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, _mm256_set1_epi32(best)));
        v = _mm256_blendv_ps(v, _mm256_set1_ps(-INFINITY), hit);
    }
}
#define HAVE_TOP_K8 1
#endif

static inline void top_k_row(const float *row, int64_t E, int64_t K, int64_t *chosen, float *scratch) {
#ifdef HAVE_TOP_K8
    if (E == 8) {
        top_k8(row, K, chosen);
        return;
    }
#endif
    top_k(row, E, K, chosen, scratch);
}

/* ---- forward ------------------------------------------------------------------------------------------ */

typedef struct {
    const float *logits, *noise;
    float sigma, load_sigma;
    int64_t S, E, K, capacity;
    float *gates, *threshold, *weight;
    int64_t *expert, *position;
    uint8_t *kept;
    double *importance, *load, *entropy;
} fwd_t;

#ifdef HAVE_TOP_K8
/* r[i][j] <- r[j][i]: an 8 × 8 transpose in registers (rows of 8 tokens' experts <-> 8 experts' tokens) */
static inline void transpose8(v8f *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps((__m256)r[2 * i], (__m256)r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps((__m256)r[2 * i], (__m256)r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = (v8f)_mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = (v8f)_mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* top_k8 for 8 tokens at once, one per lane, on their 8 experts' values val[e]: chosen[j] the j-th index per
 * lane (ties to the lower expert, as top_k8), kth the K-th largest value per lane. */
static inline void top_k8_lanes(const v8f *val, int64_t K, v8i *chosen, v8f *kth) {
    v8f w[8];
    for (int e = 0; e < 8; e++) w[e] = val[e];
    for (int64_t j = 0; j < K; j++) {
        v8f m = w[0];
        for (int e = 1; e < 8; e++) m = select8(w[e] > m, w[e], m);
        v8i idx = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int e = 7; e >= 0; e--) {
            const v8i hit = (v8i)(w[e] == m);
            idx = (hit & e) | (~hit & idx);
        }
        chosen[j] = idx;
        *kth = m;
        for (int e = 0; e < 8; e++) w[e] = select8(idx == e, splat8(-INFINITY), w[e]);
    }
}

/* The per-token work of forward_chunk for tokens s .. s + 7 of group g, E = 8: the same operations on the
 * same values, 8 tokens to a vector (one per lane) instead of 8 experts, so the dependency chains of one
 * token's softmax, sums and top-k run side by side; the group's sums still add token by token, in order.
 * The results are those of the per-token loop, bit for bit. */
static void forward_block8(const fwd_t *a, int64_t g, int64_t s, int64_t *expert, float *imp, float *ld,
                           double *entropy) {
    const int64_t S = a->S, K = a->K, t = g * S + s;
    v8f l[8], noisy[8], ex[8], rows[8];
    for (int r = 0; r < 8; r++) l[r] = load8(a->logits + (t + r) * 8);
    transpose8(l); /* l[e]: expert e's logit of the 8 tokens */
    if (a->noise) {
        for (int r = 0; r < 8; r++) noisy[r] = load8(a->noise + (t + r) * 8);
        transpose8(noisy);
        for (int e = 0; e < 8; e++) noisy[e] = l[e] + a->sigma * noisy[e];
    } else {
        for (int e = 0; e < 8; e++) noisy[e] = l[e];
    }
    v8f m = splat8(-INFINITY);
    for (int e = 0; e < 8; e++) m = select8(noisy[e] > m, noisy[e], m);
    v8f zs, ss; /* the sums over experts in hsum8's order, from expert 0 */
    for (int e = 0; e < 8; e++) {
        v8f shifted = noisy[e] - m;
        ex[e] = exp8(shifted);
        zs = e ? zs + ex[e] : ex[e];
        ss = e ? ss + ex[e] * shifted : ex[e] * shifted;
    }
    const v8f z = 0.0f + zs, spread = 0.0f + ss; /* as 0.0f + hsum8(...): the same zero's sign */
    const v8f inv = 1.0f / z, part = spread * inv;
    for (int r = 0; r < 8; r++) *entropy += (double)(logf(z[r]) - part[r]);
    for (int e = 0; e < 8; e++) rows[e] = ex[e] * inv; /* the gates, by expert */
    v8i chosen[MAX_K];
    v8f kth = splat8(-INFINITY);
    top_k8_lanes(rows, K, chosen, &kth);
    for (int64_t j = 0; j < K; j++)
        for (int r = 0; r < 8; r++) expert[j * S + s + r] = chosen[j][r];
    transpose8(rows); /* rows[r]: token r's gates */
    for (int r = 0; r < 8; r++) {
        store8(a->gates + (t + r) * 8, rows[r]);
        store8(imp, load8(imp) + rows[r]);
    }
    if (ld) {
        top_k8_lanes(noisy, K, chosen, &kth);
        store8(a->threshold + t, kth); /* the k-th largest noisy logit of each token */
        for (int e = 0; e < 8; e++) rows[e] = 0.5f * erfc8(((kth - l[e]) / a->load_sigma) * 0.70710678118654752f);
        transpose8(rows);
        for (int r = 0; r < 8; r++) store8(ld, load8(ld) + rows[r]);
    }
}
#endif

static void forward_chunk(void *arg, int64_t g0, int64_t g1) {
    const fwd_t *a = (const fwd_t *)arg;
    const int64_t S = a->S, E = a->E, K = a->K;
    float *noisy = malloc((size_t)E * 4 * sizeof(float)), *imp = noisy + E, *ld = noisy + 2 * E, *scratch = noisy + 3 * E;
    int64_t *offered = malloc((size_t)E * sizeof(int64_t)); /* assignments offered to each expert so far */
    int64_t chosen[MAX_K];
    for (int64_t g = g0; g < g1; g++) {
        int64_t *expert = a->expert + g * K * S, *position = a->position + g * K * S;
        double *importance = a->importance + g * E, *load = a->load ? a->load + g * E : NULL;
        memset(imp, 0, (size_t)E * 2 * sizeof(float)); /* the group's sums, in float lanes */
        double entropy = 0.0;
        int64_t s = 0;
#ifdef HAVE_TOP_K8
        if (E == 8)
            for (; s + 8 <= S; s += 8) forward_block8(a, g, s, expert, imp, load ? ld : NULL, &entropy);
#endif
        for (; s < S; s++) {
            const int64_t t = g * S + s;
            const float *l = a->logits + t * E;
            float *gate = a->gates + t * E;
            float m = -INFINITY;
            for (int64_t e = 0; e < E; e += 8) {
                v8f v = load8(l + e);
                if (a->noise) v = v + a->sigma * load8(a->noise + t * E + e); /* l + (sigma * n), as ATen */
                store8(noisy + e, v);
                for (int i = 0; i < 8; i++) m = v[i] > m ? v[i] : m;
            }
            float z = 0.0f, spread = 0.0f;
            for (int64_t e = 0; e < E; e += 8) {
                v8f shifted = load8(noisy + e) - m;
                v8f ex = exp8(shifted);
                store8(gate + e, ex);
                z += hsum8(ex);
                spread += hsum8(ex * shifted);
            }
            const float inv = 1.0f / z;
            /* the gates' entropy, -sum g log g with log g = (noisy - m) - log z: one log per token */
            entropy += (double)(logf(z) - spread * inv);
            for (int64_t e = 0; e < E; e += 8) {
                v8f gv = load8(gate + e) * inv;
                store8(gate + e, gv);
                store8(imp + e, load8(imp + e) + gv);
            }
            top_k_row(gate, E, K, chosen, scratch);
            for (int64_t j = 0; j < K; j++) expert[j * S + s] = chosen[j];
            if (load) {
                top_k_row(noisy, E, K, chosen, scratch);
                const float thr = noisy[chosen[K - 1]]; /* the k-th largest noisy logit */
                a->threshold[t] = thr;
                for (int64_t e = 0; e < E; e += 8) {
                    v8f q = (thr - load8(l + e)) / a->load_sigma;
                    store8(ld + e, load8(ld + e) + 0.5f * erfc8(q * 0.70710678118654752f));
                }
            }
        }
        for (int64_t e = 0; e < E; e++) {
            importance[e] = imp[e];
            if (load) load[e] = ld[e];
        }
        a->entropy[g] = entropy;
        /* choice-major priority: every first choice before any second choice, tokens in order */
        memset(offered, 0, (size_t)E * sizeof(int64_t));
        for (int64_t j = 0; j < K; j++)
            for (int64_t s = 0; s < S; s++) {
                const int64_t i = j * S + s, e = expert[i];
                const int64_t p = offered[e]++;
                const int keep = a->capacity < 0 || p < a->capacity;
                position[i] = p;
                a->kept[g * K * S + i] = (uint8_t)keep;
                a->weight[g * K * S + i] = keep ? a->gates[(g * S + s) * E + e] : 0.0f;
            }
    }
    free(noisy);
    free(offered);
}

/* logits, noise (NULL: none) (G, S, E); sigma: the noise's scale; load_sigma > 0: compute the load loss's
 * threshold (T) and per-group sums load (G, E), else both untouched (may be NULL). Out: gates (G, S, E);
 * expert, position, kept, weight (G, K, S) choice-major;
 * importance (G, E) the gates summed per group; entropy (G) the gates' entropy summed per group (nats).
 * capacity < 0: every assignment kept. K <= 64, E a multiple of 8. */
void vmoe_router_forward(const float *logits, const float *noise, float sigma, float load_sigma, int64_t G, int64_t S,
                         int64_t E, int64_t K, int64_t capacity, float *gates, float *threshold, int64_t *expert,
                         int64_t *position, uint8_t *kept, float *weight, double *importance, double *load,
                         double *entropy, int threads) {
    fwd_t a = {logits, noise,    sigma,  load_sigma, S,        E,    K,          capacity,
               gates,  threshold, weight, expert,     position, kept, importance, load_sigma > 0 ? load : NULL,
               entropy};
    parallel_for(G, group_grain(S, E), threads, forward_chunk, &a);
}

/* ---- backward ----------------------------------------------------------------------------------------- */

typedef struct {
    const float *gates, *logits, *threshold, *d_gates, *d_weight, *d_importance, *d_load;
    const int64_t *expert;
    const uint8_t *kept;
    float load_sigma;
    int64_t S, E, K;
    float *d_logits;
} bwd_t;

#ifdef HAVE_TOP_K8
/* backward_chunk's per-token work for tokens s .. s + 7 of group g, E = 8, 8 tokens to a vector (as
 * forward_block8): the same operations on the same values, bit for bit. */
static void backward_block8(const bwd_t *a, int64_t g, int64_t s, float c) {
    const int64_t S = a->S, K = a->K, t = g * S + s;
    v8f gate[8], dg[8], l[8];
    for (int r = 0; r < 8; r++) gate[r] = load8(a->gates + (t + r) * 8);
    transpose8(gate);
    if (a->d_gates) {
        for (int r = 0; r < 8; r++) dg[r] = load8(a->d_gates + (t + r) * 8);
        transpose8(dg);
    } else {
        for (int e = 0; e < 8; e++) dg[e] = splat8(0.0f);
    }
    if (a->d_importance)
        for (int e = 0; e < 8; e++) dg[e] = dg[e] + a->d_importance[e];
    if (a->d_weight)
        for (int64_t j = 0; j < K; j++) {
            const int64_t i = g * K * S + j * S + s;
            const v8f w = load8(a->d_weight + i);
            v8i chosen, kept;
            for (int r = 0; r < 8; r++) chosen[r] = (int32_t)a->expert[i + r], kept[r] = a->kept[i + r] ? -1 : 0;
            for (int e = 0; e < 8; e++) dg[e] = select8(kept & (chosen == e), dg[e] + w, dg[e]);
        }
    v8f dot = gate[0] * dg[0];
    for (int e = 1; e < 8; e++) dot = dot + gate[e] * dg[e];
    dot = splat8(0.0f) + dot; /* as 0.0f + hsum8(...): the same zero's sign */
    v8f thr = splat8(0.0f);
    if (a->d_load) {
        for (int r = 0; r < 8; r++) l[r] = load8(a->logits + (t + r) * 8);
        transpose8(l);
        thr = load8(a->threshold + t);
    }
    for (int e = 0; e < 8; e++) {
        v8f d = gate[e] * (dg[e] - dot);
        if (a->d_load) {
            v8f q = (thr - l[e]) / a->load_sigma;
            d = d + splat8(a->d_load[e]) * c * exp8(-0.5f * q * q);
        }
        dg[e] = d;
    }
    transpose8(dg);
    for (int r = 0; r < 8; r++) store8(a->d_logits + (t + r) * 8, dg[r]);
}
#endif

static void backward_chunk(void *arg, int64_t g0, int64_t g1) {
    const bwd_t *a = (const bwd_t *)arg;
    const int64_t S = a->S, E = a->E, K = a->K;
    float *dg = malloc((size_t)E * sizeof(float));
    /* d p / d l = phi(q) / sigma, q = (threshold - l) / sigma */
    const float c = a->d_load ? 0.39894228040143268f / a->load_sigma : 0.0f;
    for (int64_t g = g0; g < g1; g++) {
        int64_t s = 0;
#ifdef HAVE_TOP_K8
        if (E == 8)
            for (; s + 8 <= S; s += 8) backward_block8(a, g, s, c);
#endif
        for (; s < S; s++) {
            const int64_t t = g * S + s;
            const float *gate = a->gates + t * E;
            for (int64_t e = 0; e < E; e += 8) {
                v8f v = a->d_gates ? load8(a->d_gates + t * E + e) : splat8(0.0f);
                store8(dg + e, a->d_importance ? v + load8(a->d_importance + e) : v);
            }
            if (a->d_weight)
                for (int64_t j = 0; j < K; j++) {
                    const int64_t i = g * K * S + j * S + s;
                    if (a->kept[i]) dg[a->expert[i]] += a->d_weight[i];
                }
            float dot = 0.0f;
            for (int64_t e = 0; e < E; e += 8) dot += hsum8(load8(gate + e) * load8(dg + e));
            float *out = a->d_logits + t * E;
            for (int64_t e = 0; e < E; e += 8) {
                v8f d = load8(gate + e) * (load8(dg + e) - dot);
                if (a->d_load) {
                    v8f q = (a->threshold[t] - load8(a->logits + t * E + e)) / a->load_sigma;
                    d = d + load8(a->d_load + e) * c * exp8(-0.5f * q * q);
                }
                store8(out + e, d);
            }
        }
    }
    free(dg);
}

/* d_logits (G, S, E) from the gradients of the forward's gates (G, S, E), weight (G, K, S), importance (E)
 * (summed over groups) and load (E); any of them NULL: zero. d_load needs logits, threshold, load_sigma. */
void vmoe_router_backward(const float *gates, const float *logits, const float *threshold, float load_sigma,
                          const int64_t *expert, const uint8_t *kept, const float *d_gates, const float *d_weight,
                          const float *d_importance, const float *d_load, int64_t G, int64_t S, int64_t E, int64_t K,
                          float *d_logits, int threads) {
    bwd_t a = {gates, logits, threshold, d_gates, d_weight, d_importance, d_load, expert, kept, load_sigma,
               S,     E,      K,         d_logits};
    parallel_for(G, group_grain(S, E), threads, backward_chunk, &a);
}

/* ---- the layer's row moves: dispatch and combine over a (tokens, K) slot map ------------------------ */

#define MIN_ROWS 4096

typedef struct {
    const int64_t *expert, *position, *base;
    const uint8_t *kept;
    int64_t S, E, K;
    int64_t *slot, *source;
} slots_t;

static void slots_chunk(void *arg, int64_t g0, int64_t g1) {
    const slots_t *a = (const slots_t *)arg;
    const int64_t S = a->S, K = a->K;
    for (int64_t g = g0; g < g1; g++)
        for (int64_t j = 0; j < K; j++)
            for (int64_t s = 0; s < S; s++) {
                const int64_t i = (g * K + j) * S + s, at = (g * S + s) * K + j;
                const int64_t r = a->kept[i] ? a->base[g * a->E + a->expert[i]] + a->position[i] : -1;
                a->slot[at] = r;
                if (r >= 0) a->source[r] = at;
            }
}

/* slot (G·S, K): the buffer row of token s's j-th choice, base[g, e] + position, or -1 where dropped;
 * source (rows): the inverse, (g·S + s)·K + j for the row that choice fills, -1 for a row none fills.
 * expert, position, kept (G, K, S); base (G, E). */
void vmoe_slots(const int64_t *expert, const int64_t *position, const uint8_t *kept, const int64_t *base,
                int64_t G, int64_t S, int64_t E, int64_t K, int64_t *slot, int64_t *source, int64_t rows,
                int threads) {
    memset(source, 0xff, (size_t)rows * sizeof(int64_t)); /* -1 */
    slots_t a = {expert, position, base, kept, S, E, K, slot, source};
    parallel_for(G, S > 0 ? (MIN_ROWS + S - 1) / S : INT64_MAX, threads, slots_chunk, &a);
}

typedef struct {
    const float *src;
    int64_t src_stride;
    const int64_t *slot;
    const float *weight;
    int64_t K, D;
    float *dst;
    int64_t dst_stride;
} rows_t;

static void gather_chunk(void *arg, int64_t t0, int64_t t1) {
    const rows_t *a = (const rows_t *)arg;
    const int64_t K = a->K, D = a->D;
    for (int64_t t = t0; t < t1; t++) {
        float *y = a->dst + t * a->dst_stride;
        for (int64_t d = 0; d < D; d++) y[d] = 0.0f;
        for (int64_t j = 0; j < K; j++) {
            int64_t r = a->slot[t * K + j];
            if (r < 0) continue;
            const float *h = a->src + r * a->src_stride;
            if (a->weight) {
                const float w = a->weight[t * K + j];
                for (int64_t d = 0; d < D; d++) y[d] += h[d] * w;
            } else {
                for (int64_t d = 0; d < D; d++) y[d] += h[d];
            }
        }
    }
}

/* y[t] = Σ_j weight[t, j] · h[slot[t, j]] over the j with slot >= 0 (weight NULL: 1), for T rows of
 * width D; y contiguous (T, D). Each product rounded, then summed in j order from 0. */
void vmoe_gather(const float *h, int64_t h_stride, const int64_t *slot, const float *weight, int64_t T, int64_t K,
                 int64_t D, float *y, int threads) {
    rows_t a = {h, h_stride, slot, weight, K, D, y, D};
    parallel_for(T, MIN_ROWS, threads, gather_chunk, &a);
}

static void scatter_chunk(void *arg, int64_t r0, int64_t r1) {
    const rows_t *a = (const rows_t *)arg; /* slot: here the source of each buffer row */
    const int64_t K = a->K, D = a->D;
    for (int64_t r = r0; r < r1; r++) {
        float *b = a->dst + r * a->dst_stride;
        const int64_t at = a->slot[r];
        if (at < 0) {
            memset(b, 0, (size_t)D * sizeof(float));
            continue;
        }
        const float *x = a->src + (at / K) * a->src_stride;
        if (a->weight) {
            const float w = a->weight[at];
            for (int64_t d = 0; d < D; d++) b[d] = x[d] * w;
        } else {
            memcpy(b, x, (size_t)D * sizeof(float));
        }
    }
}

/* buf[r] = weight[t, j] · x[t] (weight NULL: 1) where source[r] = t·K + j, zero where source[r] < 0: every
 * row of buf written once, in order. buf contiguous (rows, D). */
void vmoe_scatter(const float *x, int64_t x_stride, const int64_t *source, const float *weight, int64_t K,
                  int64_t D, float *buf, int64_t rows, int threads) {
    rows_t a = {x, x_stride, source, weight, K, D, buf, D};
    parallel_for(rows, MIN_ROWS, threads, scatter_chunk, &a);
}

typedef struct {
    const float *a;
    int64_t a_stride;
    const float *h;
    int64_t h_stride;
    const int64_t *slot;
    int64_t K, D;
    float *out;
} dot_t;

static void rowdot_chunk(void *arg, int64_t t0, int64_t t1) {
    const dot_t *p = (const dot_t *)arg;
    const int64_t K = p->K, D = p->D;
    for (int64_t t = t0; t < t1; t++) {
        const float *a = p->a + t * p->a_stride;
        for (int64_t j = 0; j < K; j++) {
            int64_t r = p->slot[t * K + j];
            float sum = 0.0f;
            if (r >= 0) {
                const float *h = p->h + r * p->h_stride;
                for (int64_t d = 0; d < D; d++) sum += a[d] * h[d];
            }
            p->out[t * K + j] = sum;
        }
    }
}

/* out[t, j] = <a[t], h[slot[t, j]]>, 0 where slot < 0; out contiguous (T, K). */
void vmoe_rowdot(const float *a, int64_t a_stride, const float *h, int64_t h_stride, const int64_t *slot, int64_t T,
                 int64_t K, int64_t D, float *out, int threads) {
    dot_t p = {a, a_stride, h, h_stride, slot, K, D, out};
    parallel_for(T, MIN_ROWS, threads, rowdot_chunk, &p);
}

/* ---- small experts, fused with the row moves -------------------------------------------------------------
 * For experts of a few thousand weights (CNN feature maps: D = 8-64, H = D-4D) each token's K expert MLPs
 * are computed directly from its row, the weights staying in the L1/L2 cache: no buffers, no GEMM calls
 * on 8-wide rows, nothing stored for backward but the input (backward recomputes each hidden layer).
 * Forward: y[t] = Σ_j w[t, j] · (act(x[t] W1_e + b1_e) W2_e + b2_e), e = expert[t, j], the dropped
 * choices (e < 0) skipped. Backward: dx, the gates' gradients <dy[t], expert_e(x[t])>, and the weights'
 * gradients summed per chunk of tokens into a private buffer, then over the chunks in chunk order (the
 * chunks depend on the shapes only, so the sums do not depend on the thread count). D and H must be
 * multiples of 8. Sums run in another order than the BLAS's: equal to float rounding. */

#define ACT_RELU 1
#define ACT_GELU 2 /* exact: x Φ(x), Φ(x) = erfc(-x / √2) / 2 */

#if defined(__FMA__)
static inline v8f fma8(v8f a, v8f b, v8f c) { return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline v8f fma8(v8f a, v8f b, v8f c) { return a * b + c; }
#endif

static inline void act_forward(const float *a, float *h, int64_t H, int act) {
    for (int64_t i = 0; i < H; i += 8) {
        v8f v = load8(a + i);
        if (act == ACT_RELU)
            v = select8(v > 0.0f, v, splat8(0.0f));
        else
            v = v * (0.5f * erfc8(v * -0.70710678118654752f));
        store8(h + i, v);
    }
}

/* h = act(a) and, for GELU, its derivative at a into deriv: one erfc per value for both (backward) */
static inline void act_with_derivative(const float *a, float *h, float *deriv, int64_t H, int act) {
    if (act == ACT_RELU) {
        act_forward(a, h, H, act);
        return;
    }
    for (int64_t i = 0; i < H; i += 8) {
        v8f v = load8(a + i);
        v8f cdf = 0.5f * erfc8(v * -0.70710678118654752f);
        store8(h + i, v * cdf);
        store8(deriv + i, cdf + v * (0.39894228040143268f * exp8(-0.5f * v * v)));
    }
}

/* dh <- dh · act'(a) (deriv: act_with_derivative's, for GELU) */
static inline void act_backward(const float *a, const float *deriv, float *dh, int64_t H, int act) {
    for (int64_t i = 0; i < H; i += 8) {
        v8f g = load8(dh + i);
        g = act == ACT_RELU ? select8(load8(a + i) > 0.0f, g, splat8(0.0f)) : g * load8(deriv + i);
        store8(dh + i, g);
    }
}

/* out[0..N) = (bias or 0) + Σ_i s[i] · m[i·N ..], i < M: a vector-matrix product, by blocks of 8 of N,
 * each block's sum split over two accumulators (even and odd i: half the dependency chain). */
static inline void vecmat(const float *s, const float *m, const float *bias, int64_t M, int64_t N, float *out) {
    for (int64_t n = 0; n < N; n += 8) {
        v8f a0 = bias ? load8(bias + n) : splat8(0.0f), a1 = splat8(0.0f);
        int64_t i = 0;
        for (; i + 2 <= M; i += 2) {
            a0 = fma8(splat8(s[i]), load8(m + i * N + n), a0);
            a1 = fma8(splat8(s[i + 1]), load8(m + (i + 1) * N + n), a1);
        }
        if (i < M) a0 = fma8(splat8(s[i]), load8(m + i * N + n), a0);
        store8(out + n, a0 + a1);
    }
}

/* acc[i·N ..] += s[i] · v[0..N) for i < M: a rank-one update */
static inline void outer_add(const float *s, const float *v, int64_t M, int64_t N, float *acc) {
    for (int64_t i = 0; i < M; i++) {
        const v8f si = splat8(s[i]);
        float *row = acc + i * N;
        for (int64_t n = 0; n < N; n += 8) store8(row + n, fma8(si, load8(v + n), load8(row + n)));
    }
}

static inline void add_to(float *acc, const float *v, int64_t N) {
    for (int64_t n = 0; n < N; n += 8) store8(acc + n, load8(acc + n) + load8(v + n));
}

typedef struct {
    const float *x;
    int64_t x_stride;
    const int64_t *expert;
    const float *weight, *w1, *b1, *w2, *b2, *w1t, *w2t, *dy;
    int64_t dy_stride, K, D, H, E, T, chunk, per_chunk;
    int act;
    float *y, *dx, *dweight, *partial;
} ffn_t;

static void ffn_forward_chunk(void *arg, int64_t t0, int64_t t1) {
    const ffn_t *p = (const ffn_t *)arg;
    const int64_t K = p->K, D = p->D, H = p->H;
    float *a = malloc((size_t)(2 * H + D) * sizeof(float)), *h = a + H, *o = h + H;
    for (int64_t t = t0; t < t1; t++) {
        const float *x = p->x + t * p->x_stride;
        float *y = p->y + t * D;
        memset(y, 0, (size_t)D * sizeof(float));
        for (int64_t j = 0; j < K; j++) {
            const int64_t e = p->expert[t * K + j];
            if (e < 0) continue;
            vecmat(x, p->w1 + e * D * H, p->b1 ? p->b1 + e * H : NULL, D, H, a);
            act_forward(a, h, H, p->act);
            vecmat(h, p->w2 + e * H * D, p->b2 ? p->b2 + e * D : NULL, H, D, o);
            const v8f w = splat8(p->weight[t * K + j]);
            for (int64_t d = 0; d < D; d += 8) store8(y + d, load8(y + d) + load8(o + d) * w);
        }
    }
    free(a);
}

/* x (T, D) rows at x_stride; expert, weight (T, K); w1 (E, D, H), b1 (E, H) or NULL, w2 (E, H, D), b2 (E, D)
 * or NULL; act 1 ReLU, 2 GELU. Out: y (T, D) contiguous. */
void vmoe_ffn_forward(const float *x, int64_t x_stride, const int64_t *expert, const float *weight, const float *w1,
                      const float *b1, const float *w2, const float *b2, int64_t T, int64_t K, int64_t D, int64_t H,
                      int act, float *y, int threads) {
    ffn_t p = {.x = x, .x_stride = x_stride, .expert = expert, .weight = weight, .w1 = w1, .b1 = b1, .w2 = w2,
               .b2 = b2, .K = K, .D = D, .H = H, .T = T, .act = act, .y = y};
    parallel_for(T, 256, threads, ffn_forward_chunk, &p);
}

static void ffn_backward_chunk(void *arg, int64_t c0, int64_t c1) {
    const ffn_t *p = (const ffn_t *)arg;
    const int64_t K = p->K, D = p->D, H = p->H, E = p->E;
    float *a = malloc((size_t)(4 * H + 2 * D) * sizeof(float)), *h = a + H, *dh = h + H, *deriv = dh + H;
    float *o = deriv + H, *dout = o + D;
    for (int64_t c = c0; c < c1; c++) {
        float *dw1 = p->partial + c * p->per_chunk, *dw2 = dw1 + E * D * H;
        float *db1 = dw2 + E * H * D, *db2 = db1 + (p->b1 ? E * H : 0); /* only where the biases are */
        memset(dw1, 0, (size_t)p->per_chunk * sizeof(float));
        const int64_t end = (c + 1) * p->chunk < p->T ? (c + 1) * p->chunk : p->T;
        for (int64_t t = c * p->chunk; t < end; t++) {
            const float *x = p->x + t * p->x_stride, *dy = p->dy + t * p->dy_stride;
            float *dx = p->dx ? p->dx + t * D : NULL;
            if (dx) memset(dx, 0, (size_t)D * sizeof(float));
            for (int64_t j = 0; j < K; j++) {
                const int64_t e = p->expert[t * K + j];
                if (e < 0) {
                    if (p->dweight) p->dweight[t * K + j] = 0.0f;
                    continue;
                }
                vecmat(x, p->w1 + e * D * H, p->b1 ? p->b1 + e * H : NULL, D, H, a); /* recomputed */
                act_with_derivative(a, h, deriv, H, p->act);
                if (p->dweight) {
                    vecmat(h, p->w2 + e * H * D, p->b2 ? p->b2 + e * D : NULL, H, D, o);
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; d++) dot += dy[d] * o[d];
                    p->dweight[t * K + j] = dot;
                }
                const v8f w = splat8(p->weight[t * K + j]);
                for (int64_t d = 0; d < D; d += 8) store8(dout + d, load8(dy + d) * w);
                outer_add(h, dout, H, D, dw2 + e * H * D);
                if (p->b2) add_to(db2 + e * D, dout, D);
                vecmat(dout, p->w2t + e * D * H, NULL, D, H, dh); /* W2_e dout */
                act_backward(a, deriv, dh, H, p->act);
                outer_add(x, dh, D, H, dw1 + e * D * H);
                if (p->b1) add_to(db1 + e * H, dh, H);
                if (dx) {
                    vecmat(dh, p->w1t + e * H * D, NULL, H, D, o); /* W1_e dh */
                    add_to(dx, o, D);
                }
            }
        }
    }
    free(a);
}

typedef struct {
    const float *partial;
    int64_t chunks, per_chunk;
    float *out;
} sum_t;

static void sum_chunk(void *arg, int64_t i0, int64_t i1) {
    const sum_t *s = (const sum_t *)arg;
    for (int64_t i = i0; i < i1; i++) {
        float v = s->partial[i];
        for (int64_t c = 1; c < s->chunks; c++) v += s->partial[c * s->per_chunk + i];
        s->out[i] = v;
    }
}

/* The backward of vmoe_ffn_forward for dy (T, D) at dy_stride; w1t (E, H, D) and w2t (E, D, H) are the
 * weights transposed. Out: dx (T, D) or NULL, dweight (T, K) or NULL, and grads: dW1 (E, D, H), dW2
 * (E, H, D), then db1 (E, H) and db2 (E, D) where b1 / b2 are given, contiguous; the tokens' terms summed
 * per `chunk` tokens in `partial` ((T + chunk - 1) / chunk buffers of the grads' size), then over them. */
void vmoe_ffn_backward(const float *x, int64_t x_stride, const int64_t *expert, const float *weight,
                       const float *w1, const float *b1, const float *w2, const float *b2, const float *w1t,
                       const float *w2t, const float *dy, int64_t dy_stride, int64_t T, int64_t K, int64_t D,
                       int64_t H, int64_t E, int act, int64_t chunk, float *dx, float *dweight, float *grads,
                       float *partial, int threads) {
    const int64_t per_chunk = E * (2 * D * H + (b1 ? H : 0) + (b2 ? D : 0));
    const int64_t chunks = (T + chunk - 1) / chunk;
    ffn_t p = {.x = x, .x_stride = x_stride, .expert = expert, .weight = weight, .w1 = w1, .b1 = b1, .w2 = w2,
               .b2 = b2, .w1t = w1t, .w2t = w2t, .dy = dy, .dy_stride = dy_stride, .K = K, .D = D, .H = H,
               .E = E, .T = T, .chunk = chunk, .per_chunk = per_chunk, .act = act, .dx = dx, .dweight = dweight,
               .partial = partial};
    parallel_for(chunks, 1, threads, ffn_backward_chunk, &p);
    sum_t s = {partial, chunks, per_chunk, grads};
    parallel_for(per_chunk, 4096, threads, sum_chunk, &s);
}

int vmoe_abi_version(void) { return 2; }
