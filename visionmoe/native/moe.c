/* visionmoe's native CPU kernels: the noisy top-k router (V-MoE token choice) in one pass forward and one
 * backward, the MoE layer's row moves (dispatch and combine of a token-choice plan), forward and back, small
 * experts computed with the moves fused in (the `fused` backend): tiled per block of tokens, or by expert;
 * the routers' logits, and their noise (a counter-based normal stream, at the end).
 *
 * Plain C without torch headers (compiled on first use, 12 s with gcc -O3 on 2 cores; called through
 * ctypes from visionmoe/native/__init__.py). Forward, for each token: the noisy logits l + sigma * noise,
 * their softmax (the gates), the stable top-k of the gates, the k-th largest noisy logit and the load loss's
 * p = 1 - Phi((threshold - l) / sigma); per group, the choice-major capacity positions, the kept gate
 * weights, and the per-expert sums of the gates (importance) and of p (load). Backward: the gradient of
 * the logits from those of the gates, the weights and the two sums. What ATen computes in some thirty
 * passes over (tokens, E) tensors, in two.
 *
 * exp, log and erfc are polynomial approximations (Cephes expf, relative error ~2e-7; Cephes logf, ~1e-7;
 * Numerical Recipes' erfcc, ~1.2e-7; the experts' GELU takes ATen's erf formula, see normal_cdf8) written so
 * that GCC vectorises the loops over experts; the results agree with ATen's to float rounding, not bit for
 * bit.
 * The build uses -ffp-contract=off so that l + sigma * noise rounds as ATen's mul-then-add does (the same
 * noisy logits, bit for bit).
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
#define MIN_VALUES_PER_THREAD 8192 /* (tokens, E) values per thread at least, routers: ~0.1 ms of work */

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

/* i / K for i >= 0, K >= 1 and i·K < 2^64 (any assignment index of a tensor in memory) by a multiply: the
 * token of assignment i = t·K + j, once per row moved, where a 64-bit division takes tens of cycles. With
 * m = ceil(2^64 / K) = (2^64 - 1) / K + 1 (K >= 2), i·m / 2^64 = i / K + i·(m·K - 2^64) / (K·2^64), whose
 * second term is below 1/K as m·K - 2^64 < K: the floor is exact. K = 1 is i itself (m would be 2^64). */
static inline uint64_t divisor_magic(int64_t K) { return K > 1 ? UINT64_MAX / (uint64_t)K + 1 : 0; }

static inline int64_t divide(int64_t i, uint64_t magic) {
    return magic ? (int64_t)(((unsigned __int128)(uint64_t)i * magic) >> 64) : i;
}

/* ---- exp, log and erfc on 8 lanes -------------------------------------------------------------------------
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

/* exp and erfc on n vectors at once (n a constant once inlined, at most 8), in place: the same operations on
 * each vector, step by step across the vectors so that their dependency chains (a polynomial's steps wait on
 * each other) run side by side instead of one after another; exp8 and erfc8 are the one-vector case.
 *
 * exp: Cephes expf, x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n by the exponent bits;
 * relative error ~2e-7 on [-87, 88] (adding 1.5 * 2^23 rounds to an integer); 0 below -87 (e^-87 ~ 1.6e-38,
 * about the smallest normal float), clamped to 88 above: no subnormal comes out, as arithmetic on
 * subnormals runs many times slower (the load loss's erfc of experts far below the threshold, and their
 * gradient's density: a 0 there cut the router's forward by a fifth; BENCHMARKS.md, fourteenth pass).
 * erfc: Numerical Recipes' erfcc (Chebyshev fit), fractional error < 1.2e-7 (to float rounding here). */
#define FOR_N _Pragma("GCC unroll 8") for (int i = 0; i < n; i++)

static inline __attribute__((always_inline)) void exp8_n(v8f *x, const int n) {
    v8f nf[8], r[8], p[8];
    v8i e[8];
    v8i under[8];
    FOR_N {
        under[i] = (v8i)(x[i] < -87.0f);
        x[i] = select8(under[i], splat8(-87.0f), x[i]);
        x[i] = select8(x[i] > 88.0f, splat8(88.0f), x[i]);
        const v8f t = x[i] * 1.44269504088896341f + 12582912.0f;
        e[i] = (v8i)t - (v8i)splat8(12582912.0f);
        nf[i] = t - 12582912.0f;
    }
    FOR_N r[i] = (x[i] - nf[i] * 0.693359375f) - nf[i] * -2.12194440e-4f;
    FOR_N p[i] = splat8(1.9875691500e-4f) * r[i] + 1.3981999507e-3f;
    FOR_N p[i] = p[i] * r[i] + 8.3334519073e-3f;
    FOR_N p[i] = p[i] * r[i] + 4.1665795894e-2f;
    FOR_N p[i] = p[i] * r[i] + 1.6666665459e-1f;
    FOR_N p[i] = p[i] * r[i] + 5.0000001201e-1f;
    FOR_N x[i] = select8(under[i], splat8(0.0f), (p[i] * r[i] * r[i] + r[i] + 1.0f) * (v8f)((e[i] + 127) << 23));
}

static inline __attribute__((always_inline)) void erfc8_n(v8f *x, const int n) {
    v8f z[8], t[8], poly[8], arg[8];
    FOR_N {
        z[i] = (v8f)((v8i)x[i] & 0x7fffffff);
        t[i] = 1.0f / (1.0f + 0.5f * z[i]);
        poly[i] = -0.82215223f + t[i] * 0.17087277f;
    }
    FOR_N poly[i] = 1.48851587f + t[i] * poly[i];
    FOR_N poly[i] = -1.13520398f + t[i] * poly[i];
    FOR_N poly[i] = 0.27886807f + t[i] * poly[i];
    FOR_N poly[i] = -0.18628806f + t[i] * poly[i];
    FOR_N poly[i] = 0.09678418f + t[i] * poly[i];
    FOR_N poly[i] = 0.37409196f + t[i] * poly[i];
    FOR_N poly[i] = 1.00002368f + t[i] * poly[i];
    FOR_N arg[i] = -z[i] * z[i] + (-1.26551223f + t[i] * poly[i]);
    exp8_n(arg, n);
    FOR_N {
        const v8f r = t[i] * arg[i];
        x[i] = select8(x[i] >= 0.0f, r, 2.0f - r);
    }
}

static inline v8f exp8(v8f x) {
    exp8_n(&x, 1);
    return x;
}

static inline v8f erfc8(v8f x) {
    erfc8_n(&x, 1);
    return x;
}

/* Cephes logf for normal x > 0: x = m 2^e with m in [√½, √2), log(1 + (m - 1)) by a degree-9 polynomial;
 * relative error ~1e-7 */
static inline v8f log8(v8f x) {
    const v8i bits = (v8i)x;
    v8i e = ((bits >> 23) & 0xff) - 126; /* x = m 2^e, m in [1/2, 1) */
    v8f m = (v8f)((bits & 0x007fffff) | 0x3f000000);
    const v8i small = m < 0.70710678118654752f;
    e = e + small;                                    /* -1 where m < √½ ... */
    m = m + (v8f)(small & (v8i)m) - 1.0f;             /* ... and m doubled there */
    const v8f z = m * m;
    v8f y = splat8(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const v8f ef = __builtin_convertvector(e, v8f);
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    return m + y + ef * 0.693359375f;
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
    float *gates, *threshold, *weight, *weight_t; /* weight_t, expert_t: token-major copies, or NULL */
    int64_t *expert, *position, *expert_t, *counts, *unrouted; /* counts (G, E), unrouted (G): or NULL */
    uint8_t *kept, *nonfinite;
    double *importance, *load, *entropy;
} fwd_t;

/* lanes whose float is an infinity or a NaN (all exponent bits set): the logits' finiteness check */
static inline v8i nonfinite8(v8f x) { return ((v8i)x & 0x7f800000) == 0x7f800000; }

/* x with its infinities and NaNs noted in *bad and read as 0: a group holding one is reported and its results
 * are meaningless, but every expert id stays in [0, E) (a NaN gate would match no maximum in the top-k, whose
 * index would then run past the experts and the capacity counters) */
static inline v8f finite8(v8f x, v8i *bad) {
    const v8i b = nonfinite8(x);
    *bad |= b;
    return select8(b, splat8(0.0f), x);
}

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
 * lane (ties to the lower expert, as top_k8). */
static inline void top_k8_lanes(const v8f *val, int64_t K, v8i *chosen) {
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
        for (int e = 0; e < 8; e++) w[e] = select8(idx == e, splat8(-INFINITY), w[e]);
    }
}

/* the K-th largest of val[0..8) per lane (a repeated value counting each time; K <= 8): each value bubbles
 * into the K largest so far, a few max/min steps where top_k8_lanes also tracks the experts */
static inline v8f kth_largest8(const v8f *val, int64_t K) {
    v8f top[8];
    for (int64_t i = 0; i < K; i++) top[i] = splat8(-INFINITY);
    for (int e = 0; e < 8; e++) {
        v8f x = val[e];
        for (int64_t i = 0; i < K; i++) {
            const v8f hi = select8(x > top[i], x, top[i]);
            x = select8(x > top[i], top[i], x);
            top[i] = hi;
        }
    }
    return top[K - 1];
}

/* The per-token work of forward_chunk for tokens s .. s + 7 of group g, E = 8: the same operations on the
 * same values, 8 tokens to a vector (one per lane) instead of 8 experts, so the dependency chains of one
 * token's softmax, sums and top-k run side by side; the group's sums still add token by token, in order.
 * The results are those of the per-token loop, bit for bit. */
static void forward_block8(const fwd_t *a, int64_t g, int64_t s, int64_t *expert, float *imp, float *ld,
                           double *entropy, v8i *bad) {
    const int64_t S = a->S, K = a->K, t = g * S + s;
    v8f l[8], noisy[8], ex[8], rows[8];
    for (int r = 0; r < 8; r++) l[r] = finite8(load8(a->logits + (t + r) * 8), bad);
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
    v8f shifted[8];
    for (int e = 0; e < 8; e++) shifted[e] = ex[e] = noisy[e] - m;
    exp8_n(ex, 8);
    v8f zs = ex[0], ss = ex[0] * shifted[0]; /* the sums over experts in hsum8's order, from expert 0 */
    for (int e = 1; e < 8; e++) {
        zs = zs + ex[e];
        ss = ss + ex[e] * shifted[e];
    }
    const v8f z = 0.0f + zs, spread = 0.0f + ss; /* as 0.0f + hsum8(...): the same zero's sign */
    const v8f inv = 1.0f / z, part = spread * inv;
    const v8f log_z = log8(z);
    for (int r = 0; r < 8; r++) *entropy += (double)(log_z[r] - part[r]);
    for (int e = 0; e < 8; e++) rows[e] = ex[e] * inv; /* the gates, by expert */
    v8i chosen[MAX_K];
    top_k8_lanes(rows, K, chosen);
    for (int64_t j = 0; j < K; j++)
        for (int r = 0; r < 8; r++) expert[j * S + s + r] = chosen[j][r];
    transpose8(rows); /* rows[r]: token r's gates */
    v8f sum = load8(imp); /* the group's sums, token after token, in a register */
    for (int r = 0; r < 8; r++) {
        store8(a->gates + (t + r) * 8, rows[r]);
        sum = sum + rows[r];
    }
    store8(imp, sum);
    if (ld) {
        const v8f kth = kth_largest8(noisy, K);
        store8(a->threshold + t, kth); /* the k-th largest noisy logit of each token */
        for (int e = 0; e < 8; e++) rows[e] = ((kth - l[e]) / a->load_sigma) * 0.70710678118654752f;
        erfc8_n(rows, 8);
        for (int e = 0; e < 8; e++) rows[e] = 0.5f * rows[e];
        transpose8(rows);
        sum = load8(ld);
        for (int r = 0; r < 8; r++) sum = sum + rows[r];
        store8(ld, sum);
    }
}
#endif

static void forward_chunk(void *arg, int64_t g0, int64_t g1) {
    const fwd_t *a = (const fwd_t *)arg;
    const int64_t S = a->S, E = a->E, K = a->K;
    float *noisy = malloc((size_t)E * 4 * sizeof(float)), *imp = noisy + E, *ld = noisy + 2 * E;
    float *scratch = noisy + 3 * E;
    int64_t *offered = malloc((size_t)E * sizeof(int64_t)); /* assignments offered to each expert so far */
    int64_t chosen[MAX_K];
    for (int64_t g = g0; g < g1; g++) {
        int64_t *expert = a->expert + g * K * S, *position = a->position + g * K * S;
        double *importance = a->importance + g * E, *load = a->load ? a->load + g * E : NULL;
        memset(imp, 0, (size_t)E * 2 * sizeof(float)); /* the group's sums, in float lanes */
        double entropy = 0.0;
        v8i bad = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t s = 0;
#ifdef HAVE_TOP_K8
        if (E == 8)
            for (; s + 8 <= S; s += 8) forward_block8(a, g, s, expert, imp, load ? ld : NULL, &entropy, &bad);
#endif
        for (; s < S; s++) {
            const int64_t t = g * S + s;
            const float *l = a->logits + t * E;
            float *gate = a->gates + t * E;
            float m = -INFINITY;
            for (int64_t e = 0; e < E; e += 8) {
                v8f v = finite8(load8(l + e), &bad);
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
            entropy += (double)(log8(splat8(z))[0] - spread * inv); /* log8: as the 8-token blocks */
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
        int any = 0;
        for (int i = 0; i < 8; i++) any |= bad[i] != 0;
        a->nonfinite[g] = (uint8_t)any;
        /* choice-major priority: every first choice before any second choice, tokens in order */
        memset(offered, 0, (size_t)E * sizeof(int64_t));
        for (int64_t j = 0; j < K; j++)
            for (int64_t s = 0; s < S; s++) {
                const int64_t i = j * S + s, e = expert[i];
                const int64_t p = offered[e]++;
                const int keep = a->capacity < 0 || p < a->capacity;
                position[i] = p;
                const float w = keep ? a->gates[(g * S + s) * E + e] : 0.0f;
                a->kept[g * K * S + i] = (uint8_t)keep;
                a->weight[g * K * S + i] = w;
                if (a->expert_t) { /* token s's j-th choice, as the fused experts read them: -1 where dropped */
                    a->expert_t[(g * S + s) * K + j] = keep ? e : -1;
                    a->weight_t[(g * S + s) * K + j] = w;
                }
            }
        if (a->counts) { /* the routing statistics' counts: kept per expert (positions 0 .. offered - 1 of which
                          * those below the capacity were kept) and the tokens none of whose choices was */
            for (int64_t e = 0; e < E; e++)
                a->counts[g * E + e] = a->capacity < 0 || offered[e] < a->capacity ? offered[e] : a->capacity;
            int64_t none = 0;
            for (int64_t s = 0; s < S; s++) {
                int any_kept = 0;
                for (int64_t j = 0; j < K; j++) any_kept |= a->kept[g * K * S + j * S + s];
                none += !any_kept;
            }
            a->unrouted[g] = none;
        }
    }
    free(noisy);
    free(offered);
}

/* logits, noise (NULL: none) (G, S, E); sigma: the noise's scale; load_sigma > 0: compute the load loss's
 * threshold (T) and per-group sums load (G, E), else both untouched (may be NULL). Out: gates (G, S, E);
 * expert, position, kept, weight (G, K, S) choice-major; expert_t and weight_t (G·S, K), unless NULL, the
 * expert and weight of each token's j-th choice token-major, expert -1 where dropped (the fused experts' input),
 * and then counts (G, E) the kept assignments per group and expert and unrouted (G) the tokens with no kept
 * choice per group (the routing statistics', as vmoe_plan_counts gives them);
 * importance (G, E) the gates summed per group; entropy (G) the gates' entropy summed per group (nats);
 * nonfinite (G) 1 where a group's logits hold an infinity or a NaN (the other outputs are then meaningless),
 * else 0: the routers' finiteness check without a pass of its own. capacity < 0: every assignment kept.
 * K <= 64, E a multiple of 8. */
void vmoe_router_forward(const float *logits, const float *noise, float sigma, float load_sigma, int64_t G, int64_t S,
                         int64_t E, int64_t K, int64_t capacity, float *gates, float *threshold, int64_t *expert,
                         int64_t *position, uint8_t *kept, float *weight, int64_t *expert_t, float *weight_t,
                         int64_t *counts, int64_t *unrouted, double *importance, double *load, double *entropy,
                         uint8_t *nonfinite, int threads) {
    const int tokens = expert_t && weight_t && counts && unrouted; /* the four together, or none */
    fwd_t a = {.logits = logits, .noise = noise, .sigma = sigma, .load_sigma = load_sigma, .S = S, .E = E, .K = K,
               .capacity = capacity, .gates = gates, .threshold = threshold, .weight = weight,
               .weight_t = tokens ? weight_t : NULL, .expert = expert, .position = position,
               .expert_t = tokens ? expert_t : NULL, .counts = tokens ? counts : NULL,
               .unrouted = tokens ? unrouted : NULL, .kept = kept, .nonfinite = nonfinite,
               .importance = importance, .load = load_sigma > 0 ? load : NULL, .entropy = entropy};
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
    if (a->d_load) {
        v8f density[8];
        for (int e = 0; e < 8; e++) {
            const v8f q = (thr - l[e]) / a->load_sigma;
            density[e] = -0.5f * q * q;
        }
        exp8_n(density, 8);
        for (int e = 0; e < 8; e++) dg[e] = gate[e] * (dg[e] - dot) + splat8(a->d_load[e]) * c * density[e];
    } else {
        for (int e = 0; e < 8; e++) dg[e] = gate[e] * (dg[e] - dot);
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
    const int64_t D = a->D;
    const uint64_t magic = divisor_magic(a->K);
    for (int64_t r = r0; r < r1; r++) {
        float *b = a->dst + r * a->dst_stride;
        const int64_t at = a->slot[r];
        if (at < 0) {
            memset(b, 0, (size_t)D * sizeof(float));
            continue;
        }
        const float *x = a->src + divide(at, magic) * a->src_stride;
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
 * are computed directly from its row, the weights staying in the L1/L2 cache: no capacity buffers, no GEMM
 * calls on 8-wide rows; each choice's pre-activation and unweighted output are kept for the backward.
 * Forward: y[t] = Σ_j w[t, j] · (act(x[t] W1_e + b1_e) W2_e + b2_e), e = expert[t, j], the dropped
 * choices (e < 0) skipped. Backward: dx, the gates' gradients <dy[t], expert_e(x[t])>, and the weights'
 * gradients summed per chunk of tokens into a private buffer, then over the chunks in chunk order (the
 * chunks depend on the shapes only, so the sums do not depend on the thread count). D and H must be
 * multiples of 8. Sums run in another order than the BLAS's: equal to float rounding. */

#define ACT_RELU 1
#define ACT_GELU 2 /* exact: x Φ(x), Φ the normal CDF (normal_cdf8) */

#if defined(__FMA__)
static inline v8f fma8(v8f a, v8f b, v8f c) { return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline v8f fma8(v8f a, v8f b, v8f c) { return a * b + c; }
#endif

#if defined(__AVX__)
/* 1 / d: the hardware's 12-bit estimate and one Newton step (relative error ~1e-7, well inside erf's) */
static inline v8f reciprocal8(v8f d) {
    const v8f r = (v8f)_mm256_rcp_ps((__m256)d);
    return r * fma8(-d, r, splat8(2.0f));
}
#else
static inline v8f reciprocal8(v8f d) { return 1.0f / d; }
#endif

/* exp8's polynomial with fused multiply-adds (the experts' GELU only: the router keeps exp8's roundings) */
static inline v8f exp8_fma(v8f x) {
    x = select8(x < -87.0f, splat8(-87.0f), x);
    const v8f magic = splat8(12582912.0f);
    const v8f t = fma8(x, splat8(1.44269504088896341f), magic);
    const v8i n = (v8i)t - (v8i)magic;
    const v8f nf = t - magic;
    v8f r = fma8(nf, splat8(-0.693359375f), x);
    r = fma8(nf, splat8(2.12194440e-4f), r);
    v8f p = fma8(splat8(1.9875691500e-4f), r, splat8(1.3981999507e-3f));
    p = fma8(p, r, splat8(8.3334519073e-3f));
    p = fma8(p, r, splat8(4.1665795894e-2f));
    p = fma8(p, r, splat8(1.6666665459e-1f));
    p = fma8(p, r, splat8(5.0000001201e-1f));
    p = fma8(p * r, r, r + 1.0f);
    return p * (v8f)((n + 127) << 23);
}

/* The normal CDF Φ(v) = (1 + erf(v / √2)) / 2 with erf by Abramowitz & Stegun 7.1.26 (absolute error
 * < 1.5e-7: the formula of ATen's own vectorised erf, which its CPU GELU uses), and into *gauss the
 * exp(-v² / 2) that formula computes, which the derivative's density reuses: one exp per value for both.
 * Arguments below -87 give exp's clamp, e^-87: a tail of ~1e-38 where the true one is 0. */
static inline v8f normal_cdf8(v8f v, v8f *gauss) {
    const v8f u = (v8f)((v8i)v & 0x7fffffff) * 0.70710678118654752f; /* |v| / √2 */
    const v8f t = reciprocal8(fma8(splat8(0.3275911f), u, splat8(1.0f)));
    v8f r = fma8(splat8(1.061405429f), t, splat8(-1.453152027f));
    r = fma8(r, t, splat8(1.421413741f));
    r = fma8(r, t, splat8(-0.284496736f));
    r = fma8(r, t, splat8(0.254829592f));
    *gauss = exp8_fma(-u * u);
    const v8f tail = 0.5f * (r * t * *gauss); /* (1 - erf(|v| / √2)) / 2 = Φ(-|v|) */
    return select8(v >= 0.0f, 1.0f - tail, tail);
}

static inline void act_forward(const float *a, float *h, int64_t H, int act) {
    v8f gauss;
    for (int64_t i = 0; i < H; i += 8) {
        v8f v = load8(a + i);
        if (act == ACT_RELU)
            v = select8(v > 0.0f, v, splat8(0.0f));
        else
            v = v * normal_cdf8(v, &gauss);
        store8(h + i, v);
    }
}

/* h = act(a) and, for GELU, its derivative Φ(a) + a φ(a) into deriv: one exp per value for both */
static inline void act_with_derivative(const float *a, float *h, float *deriv, int64_t H, int act) {
    if (act == ACT_RELU) {
        act_forward(a, h, H, act);
        return;
    }
    for (int64_t i = 0; i < H; i += 8) {
        v8f v = load8(a + i), gauss;
        v8f cdf = normal_cdf8(v, &gauss);
        store8(h + i, v * cdf);
        store8(deriv + i, cdf + v * (0.39894228040143268f * gauss));
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

/* The arguments of the loops over the experts (tiled by expert, tiled per block of tokens), forward and backward */
typedef struct {
    const float *x, *weight, *w1, *b1, *w2, *b2, *w1t, *w2t, *dy;
    int64_t x_stride, dy_stride, K, D, H, E, T;
    const int64_t *expert;
    int act, bias1, bias2;   /* backward: whether the experts have b1, b2 (their gradients' place in grads) */
    float *hidden, *outputs; /* each kept choice's pre-activation (T·K, H, in sorted order) and (tiled) its
                              * unweighted output (T·K, D) */
    float *y, *dx, *dweight; /* forward's y (T, D); backward's dx (T, D) and dweight (T, K), each or NULL */
    int64_t chunk, per_chunk; /* blocked: blocks per private weight-gradient buffer, and its floats */
    float *partial;           /* blocked: those buffers */
    const int64_t *order, *offsets; /* tiled: the kept choices sorted by expert, and each expert's first */
    int64_t *block_order, *block_offsets; /* blocked: the same per block of tokens (the forward sorts) */
    int64_t block;                        /* blocked: tokens per block */
    float *rows, *grads;            /* tiled backward: each kept choice's input gradient (T·K, D); the
                                     * weights' gradients */
} experts_t;

typedef struct {
    const float *partial;
    int64_t chunks, per_chunk;
    float *out;
} sum_t;

static void sum_chunk(void *arg, int64_t i0, int64_t i1) {
    const sum_t *s = (const sum_t *)arg;
    for (int64_t i = i0; i < i1; i++) {
        float v = s->chunks ? s->partial[i] : 0.0f; /* no chunks (no tokens): zero gradients */
        for (int64_t c = 1; c < s->chunks; c++) v += s->partial[c * s->per_chunk + i];
        s->out[i] = v;
    }
}

/* ---- experts tiled by expert: small GEMMs in registers ----------------------------------------------------
 * The experts of a token-choice plan, dispatch and combine included: y[t] = Σ_j w[t, j] · expert_e(x[t]),
 * e = expert[t, j], over the kept choices (e >= 0). For experts of some thousands of weights (D·H) and
 * more (smaller ones: the blocked loop below): the kept assignments are sorted by expert (a counting sort,
 * stable: by assignment t·K + j within an expert), and each expert runs its assignments MR rows at a time
 * through register-tiled products (MR rows × 16 columns of accumulators), the rows gathered from x (the
 * next tile's prefetched meanwhile) and the outputs written per assignment (no padded capacity buffers:
 * dropped choices cost nothing); the pre-activations (in sorted order) and outputs are kept for the
 * backward, which adds the weights' gradients as rank-TB updates, one expert per thread, tiles in order:
 * sums in a fixed order whatever the thread count. A token's K outputs (and input gradients, and the
 * gates' gradients) are then computed in token order, its choices in order: reads in the order of memory. */

#define MR 6  /* rows of the register tiles */
#define TB 48 /* rows of a tile of one expert's assignments (a multiple of MR): the weights' gradients are
                 rank-TB updates */

static inline void copy_row(float *dst, const float *src, int64_t N) { /* N a multiple of 8 */
    for (int64_t n = 0; n < N; n += 8) store8(dst + n, load8(src + n));
}

/* c[r, 0..N) = (bias or 0) + Σ_k a[r, k] · b[k, 0..N) for r < MR: a at row stride lda, b (Kd, N) row-major,
 * c at row stride ldc; N a multiple of 8. One accumulator per output vector, k in order: 12 of them for
 * 16 columns (enough in flight to cover the FMAs' latency), 8 loads per 12 FMAs. */
static inline void gemm_rows(const float *a, int64_t lda, const float *b, const float *bias, int64_t Kd, int64_t N,
                             float *c, int64_t ldc) {
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
        const v8f i0 = bias ? load8(bias + n) : splat8(0.0f), i1 = bias ? load8(bias + n + 8) : splat8(0.0f);
        v8f c00 = i0, c01 = i1, c10 = i0, c11 = i1, c20 = i0, c21 = i1, c30 = i0, c31 = i1, c40 = i0, c41 = i1;
        v8f c50 = i0, c51 = i1;
        for (int64_t k = 0; k < Kd; k++) {
            const v8f b0 = load8(b + k * N + n), b1 = load8(b + k * N + n + 8);
            v8f s = splat8(a[k]);
            c00 = fma8(s, b0, c00), c01 = fma8(s, b1, c01);
            s = splat8(a[lda + k]);
            c10 = fma8(s, b0, c10), c11 = fma8(s, b1, c11);
            s = splat8(a[2 * lda + k]);
            c20 = fma8(s, b0, c20), c21 = fma8(s, b1, c21);
            s = splat8(a[3 * lda + k]);
            c30 = fma8(s, b0, c30), c31 = fma8(s, b1, c31);
            s = splat8(a[4 * lda + k]);
            c40 = fma8(s, b0, c40), c41 = fma8(s, b1, c41);
            s = splat8(a[5 * lda + k]);
            c50 = fma8(s, b0, c50), c51 = fma8(s, b1, c51);
        }
        store8(c + n, c00), store8(c + n + 8, c01);
        store8(c + ldc + n, c10), store8(c + ldc + n + 8, c11);
        store8(c + 2 * ldc + n, c20), store8(c + 2 * ldc + n + 8, c21);
        store8(c + 3 * ldc + n, c30), store8(c + 3 * ldc + n + 8, c31);
        store8(c + 4 * ldc + n, c40), store8(c + 4 * ldc + n + 8, c41);
        store8(c + 5 * ldc + n, c50), store8(c + 5 * ldc + n + 8, c51);
    }
    if (n < N) { /* the last 8 columns */
        const v8f i0 = bias ? load8(bias + n) : splat8(0.0f);
        v8f c0 = i0, c1 = i0, c2 = i0, c3 = i0, c4 = i0, c5 = i0;
        for (int64_t k = 0; k < Kd; k++) {
            const v8f b0 = load8(b + k * N + n);
            c0 = fma8(splat8(a[k]), b0, c0);
            c1 = fma8(splat8(a[lda + k]), b0, c1);
            c2 = fma8(splat8(a[2 * lda + k]), b0, c2);
            c3 = fma8(splat8(a[3 * lda + k]), b0, c3);
            c4 = fma8(splat8(a[4 * lda + k]), b0, c4);
            c5 = fma8(splat8(a[5 * lda + k]), b0, c5);
        }
        store8(c + n, c0), store8(c + ldc + n, c1), store8(c + 2 * ldc + n, c2), store8(c + 3 * ldc + n, c3);
        store8(c + 4 * ldc + n, c4), store8(c + 5 * ldc + n, c5);
    }
}

/* c[r, 0..N) = Σ_k a[r, k] · b[k, 0..N) for r < R: gemm_rows over MR rows at a time; the last R mod MR rows
 * through a tile padded with zero rows, so that every row's sums are those of a full tile (the same value
 * wherever the row falls). a at row stride lda; b (Kd, N) row-major, N a multiple of 8; c at stride ldc. */
static inline void rows_product(const float *a, int64_t lda, const float *b, int64_t Kd, int64_t N, int64_t R,
                                float *c, int64_t ldc) {
    int64_t r = 0;
    for (; r + MR <= R; r += MR) gemm_rows(a + r * lda, lda, b, NULL, Kd, N, c + r * ldc, ldc);
    if (r == R) return;
    float *in = calloc((size_t)MR * (Kd + N), sizeof(float)), *out = in + MR * Kd;
    for (int64_t i = 0; r + i < R; i++) memcpy(in + i * Kd, a + (r + i) * lda, (size_t)Kd * sizeof(float));
    gemm_rows(in, Kd, b, NULL, Kd, N, out, N);
    for (int64_t i = 0; r + i < R; i++) memcpy(c + (r + i) * ldc, out + i * N, (size_t)N * sizeof(float));
    free(in);
}

/* acc[k0 + i, n .. n + 8·NV) += Σ_r a[r, k0 + i] · b[r, n ..) for i < KB, r = 0 .. R - 1 in order: a block of
 * KB × NV accumulator vectors held in registers over the R rows (KB, NV constants once inlined) */
static inline __attribute__((always_inline)) void gemm_tn_block(const float *a, int64_t Kd, const float *b,
                                                                int64_t ldb, int64_t N, int64_t R, float *acc,
                                                                int64_t k0, int64_t n, const int KB, const int NV) {
    v8f c[6][2];
    for (int i = 0; i < KB; i++)
        for (int v = 0; v < NV; v++) c[i][v] = load8(acc + (k0 + i) * N + n + 8 * v);
    for (int64_t r = 0; r < R; r++) {
        v8f bv[2];
        for (int v = 0; v < NV; v++) bv[v] = load8(b + r * ldb + n + 8 * v);
        const float *ar = a + r * Kd + k0;
        for (int i = 0; i < KB; i++) {
            const v8f s = splat8(ar[i]);
            for (int v = 0; v < NV; v++) c[i][v] = fma8(s, bv[v], c[i][v]);
        }
    }
    for (int i = 0; i < KB; i++)
        for (int v = 0; v < NV; v++) store8(acc + (k0 + i) * N + n + 8 * v, c[i][v]);
}

/* acc[k, 0..N) += Σ_r a[r, k] · b[r, 0..N), r = 0 .. R - 1 in order (a product per FMA, as a loop over r
 * would add): a (R, Kd) contiguous, b (R, N) at row stride ldb, acc (Kd, N); Kd and N multiples of 8.
 * Blocks of 6 × 16 (then 2 × 16, and 8 columns at the end) stay in registers over the R rows. */
static inline void gemm_tn(const float *a, int64_t Kd, const float *b, int64_t ldb, int64_t N, int64_t R,
                           float *acc) {
    int64_t k = 0;
    for (; k + 6 <= Kd; k += 6) {
        int64_t n = 0;
        for (; n + 16 <= N; n += 16) gemm_tn_block(a, Kd, b, ldb, N, R, acc, k, n, 6, 2);
        if (n < N) gemm_tn_block(a, Kd, b, ldb, N, R, acc, k, n, 6, 1);
    }
    for (; k < Kd; k += 2) {
        int64_t n = 0;
        for (; n + 16 <= N; n += 16) gemm_tn_block(a, Kd, b, ldb, N, R, acc, k, n, 2, 2);
        if (n < N) gemm_tn_block(a, Kd, b, ldb, N, R, acc, k, n, 2, 1);
    }
}


/* acc[0..N) += rows[r, 0..N) for r = 0 .. m - 1 in order, 8 columns at a time in a register */
static inline void add_rows(float *acc, const float *rows, int64_t m, int64_t N) {
    for (int64_t n = 0; n < N; n += 8) {
        v8f v = load8(acc + n);
        for (int64_t r = 0; r < m; r++) v = v + load8(rows + r * N + n);
        store8(acc + n, v);
    }
}

/* order[offsets[e] .. offsets[e + 1]): expert e's kept assignments among first .. last - 1, ascending
 * (offsets[0] = first: order's entries from there); next: E integers of scratch */
static void sort_by_expert(const int64_t *expert, int64_t first, int64_t last, int64_t E, int64_t *order,
                           int64_t *offsets, int64_t *next) {
    memset(offsets, 0, (size_t)(E + 1) * sizeof(int64_t));
    offsets[0] = first;
    for (int64_t i = first; i < last; i++)
        if (expert[i] >= 0) offsets[expert[i] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    memcpy(next, offsets, (size_t)E * sizeof(int64_t));
    for (int64_t i = first; i < last; i++)
        if (expert[i] >= 0) order[next[expert[i]]++] = i;
}

/* R rows of D: row r < m is src's row of assignment order[r] (its token's row, at stride, found with K's
 * divisor_magic; times scale[order[r]] where scale is given), zero rows after */
static inline void gather_tile(const float *src, int64_t stride, const int64_t *order, int64_t m, int64_t R,
                               uint64_t k_magic, int64_t D, const float *scale, float *tile) {
    for (int64_t r = 0; r < R; r++) {
        float *row = tile + r * D;
        if (r >= m) {
            for (int64_t d = 0; d < D; d += 8) store8(row + d, splat8(0.0f));
            continue;
        }
        const float *s = src + divide(order[r], k_magic) * stride;
        if (!scale) {
            copy_row(row, s, D);
            continue;
        }
        const v8f w = splat8(scale[order[r]]);
        for (int64_t d = 0; d < D; d += 8) store8(row + d, load8(s + d) * w);
    }
}

/* the cache lines of the rows (of D floats, at stride) of the tokens of assignments order[0 .. m), on their
 * way in: a tile's rows are scattered over the tokens, and their loads would otherwise wait on memory */
static inline void prefetch_rows(const float *src, int64_t stride, const int64_t *order, int64_t m,
                                 uint64_t k_magic, int64_t D) {
    for (int64_t r = 0; r < m; r++) {
        const char *row = (const char *)(src + divide(order[r], k_magic) * stride);
        for (int64_t b = 0; b < D * (int64_t)sizeof(float); b += 64) __builtin_prefetch(row + b, 0, 3);
    }
}

/* the next tile of an expert's assignments after the one at i (of m rows), if any: its first and its rows */
static inline int64_t next_tile(const experts_t *p, int64_t e, int64_t i, int64_t e1, int64_t *m) {
    int64_t n = i + TB;
    while (n >= p->offsets[e + 1] && ++e < e1) n = p->offsets[e];
    if (e >= e1) return *m = 0, n;
    return *m = p->offsets[e + 1] - n < TB ? p->offsets[e + 1] - n : TB, n;
}

/* Scratch floats of a tile (forward, backward) */
#define FORWARD_SCRATCH(D, H) ((size_t)TB * (2 * (D) + 2 * (H)))
#define BACKWARD_SCRATCH(D, H) ((size_t)TB * (3 * (D) + 4 * (H)))

/* Expert e on R rows (a multiple of MR) of xs (row stride D): pre-activations into pre, activations into
 * h (R × H each), outputs into out (row stride D) */
static void expert_rows(const experts_t *p, int64_t e, const float *xs, int64_t R, float *pre, float *h,
                        float *out) {
    const int64_t D = p->D, H = p->H;
    const float *w1 = p->w1 + e * D * H, *w2 = p->w2 + e * H * D;
    const float *b1 = p->b1 ? p->b1 + e * H : NULL, *b2 = p->b2 ? p->b2 + e * D : NULL;
    for (int64_t r = 0; r < R; r += MR) gemm_rows(xs + r * D, D, w1, b1, D, H, pre + r * H, H);
    act_forward(pre, h, R * H, p->act);
    for (int64_t r = 0; r < R; r += MR) gemm_rows(h + r * H, H, w2, b2, H, D, out + r * D, D);
}

/* The backward of expert_rows for its first m of R rows, given xs and pre as there, h and deriv from
 * act_with_derivative(pre), and dout (R rows of w · dy, zero after m): dh (R × H) and, unless dx is NULL,
 * the rows' input gradients into dx (R rows of D); the weights' gradients added to grads (dW1 (E, D, H),
 * dW2 (E, H, D), then db1 (E, H) and db2 (E, D) where the biases are), rows in order */
static void expert_rows_backward(const experts_t *p, int64_t e, const float *xs, const float *pre, const float *h,
                                 const float *deriv, const float *dout, int64_t R, int64_t m, float *dh, float *dx,
                                 float *grads) {
    const int64_t D = p->D, H = p->H, E = p->E;
    const float *w1t = p->w1t + e * H * D, *w2t = p->w2t + e * D * H;
    float *dw1 = grads + e * D * H, *dw2 = grads + E * D * H + e * H * D;
    float *db1 = p->bias1 ? grads + 2 * E * D * H + e * H : NULL;
    float *db2 = p->bias2 ? grads + 2 * E * D * H + (p->bias1 ? E * H : 0) + e * D : NULL;
    for (int64_t r = 0; r < R; r += MR) gemm_rows(dout + r * D, D, w2t, NULL, D, H, dh + r * H, H);
    act_backward(pre, deriv, dh, R * H, p->act); /* rows after m: zero, or unused below */
    if (dx)
        for (int64_t r = 0; r < R; r += MR) gemm_rows(dh + r * H, H, w1t, NULL, H, D, dx + r * D, D);
    if (db1) add_rows(db1, dh, m, H);
    if (db2) add_rows(db2, dout, m, D);
    gemm_tn(h, H, dout, D, D, m, dw2);
    gemm_tn(xs, D, dh, H, H, m, dw1);
}

/* The forward of a tile: expert e's m <= TB assignments order[i .. i + m): their rows of x gathered, through
 * the expert, each output written at its assignment's row of outputs, the pre-activations at rows i .. of
 * hidden (in sorted order) */
static void forward_tile(const experts_t *p, int64_t e, int64_t i, int64_t m, uint64_t k_magic, float *xt) {
    const int64_t D = p->D, H = p->H;
    float *a = xt + TB * D, *h = a + TB * H, *o = h + TB * H;
    const int64_t R = (m + MR - 1) / MR * MR, *at = p->order + i;
    gather_tile(p->x, p->x_stride, at, m, R, k_magic, D, NULL, xt);
    expert_rows(p, e, xt, R, a, h, o);
    for (int64_t r = 0; r < m; r++) copy_row(p->outputs + at[r] * D, o + r * D, D);
    if (p->hidden) memcpy(p->hidden + i * H, a, (size_t)(m * H) * sizeof(float)); /* in sorted order */
}

static void tiled_forward_chunk(void *arg, int64_t e0, int64_t e1) {
    const experts_t *p = (const experts_t *)arg;
    const uint64_t k_magic = divisor_magic(p->K);
    float *xt = malloc(FORWARD_SCRATCH(p->D, p->H) * sizeof(float));
    for (int64_t e = e0; e < e1; e++) {
        for (int64_t i = p->offsets[e]; i < p->offsets[e + 1]; i += TB) {
            const int64_t m = p->offsets[e + 1] - i < TB ? p->offsets[e + 1] - i : TB;
            int64_t m_next;
            const int64_t i_next = next_tile(p, e, i, e1, &m_next);
            prefetch_rows(p->x, p->x_stride, p->order + i_next, m_next, k_magic, p->D);
            forward_tile(p, e, i, m, k_magic, xt);
        }
    }
    free(xt);
}

/* out[t] = Σ_j (weight[t·K + j] or 1) · src[row of t·K + j] over the kept choices, j in order (0 where none
 * is); the row of assignment t·K + j is pos[t·K + j - t0·K] where pos is given, else t·K + j */
static void add_choices(const experts_t *p, int64_t t0, int64_t t1, const int64_t *pos, const float *src,
                        const float *weight, float *dst) {
    const int64_t K = p->K, D = p->D;
    for (int64_t t = t0; t < t1; t++) {
        float *out = dst + t * D;
        int first = 1;
        for (int64_t j = 0; j < K; j++) {
            if (p->expert[t * K + j] < 0) continue;
            const float *row = src + (pos ? pos[(t - t0) * K + j] : t * K + j) * D;
            const v8f w = splat8(weight ? weight[t * K + j] : 1.0f);
            for (int64_t d = 0; d < D; d += 8) {
                const v8f v = weight ? load8(row + d) * w : load8(row + d);
                store8(out + d, first ? v : load8(out + d) + v);
            }
            first = 0;
        }
        if (first) memset(out, 0, (size_t)D * sizeof(float));
    }
}

static void combine_outputs_chunk(void *arg, int64_t t0, int64_t t1) {
    const experts_t *p = (const experts_t *)arg;
    add_choices(p, t0, t1, NULL, p->outputs, p->weight, p->y);
}

/* <a, b> over D floats (D a multiple of 8): 8 lanes of partial sums over d, then across the lanes */
static inline float row_dot(const float *a, const float *b, int64_t D) {
    v8f dot = load8(a) * load8(b);
    for (int64_t d = 8; d < D; d += 8) dot = fma8(load8(a + d), load8(b + d), dot);
    return hsum8(dot);
}

/* the backward's pass in token order: each kept choice's gate gradient <dy, o> (8 lanes of partial sums over
 * d, then across the lanes; 0 for a dropped choice) and the token's input gradient, its choices' rows added */
static void token_grads_chunk(void *arg, int64_t t0, int64_t t1) {
    const experts_t *p = (const experts_t *)arg;
    const int64_t K = p->K, D = p->D;
    if (p->dweight)
        for (int64_t t = t0; t < t1; t++) {
            const float *dy = p->dy + t * p->dy_stride;
            for (int64_t j = 0; j < K; j++) {
                if (p->expert[t * K + j] < 0) {
                    p->dweight[t * K + j] = 0.0f;
                    continue;
                }
                p->dweight[t * K + j] = row_dot(dy, p->outputs + (t * K + j) * D, D);
            }
        }
    if (p->dx) add_choices(p, t0, t1, NULL, p->rows, NULL, p->dx);
}

/* x (T, D) rows at x_stride; expert, weight (T, K); w1 (E, D, H), b1 (E, H) or NULL, w2 (E, H, D), b2 (E, D)
 * or NULL; act 1 ReLU, 2 GELU. Out: y (T, D) contiguous (the weighted products rounded, then summed over a
 * token's choices in order); order (T·K) and offsets (E + 1) receive the kept assignments sorted by expert,
 * outputs (T·K, D) each one's expert output (at its assignment's row) and hidden (T·K, H), unless NULL, its
 * pre-activation (at its row of the sorted order, as the backward reads them): the backward's inputs. */
void vmoe_tiled_forward(const float *x, int64_t x_stride, const int64_t *expert, const float *weight, const float *w1,
                        const float *b1, const float *w2, const float *b2, int64_t T, int64_t K, int64_t D, int64_t H,
                        int64_t E, int act, int64_t *order, int64_t *offsets, float *hidden, float *outputs, float *y,
                        int threads) {
    int64_t *next = malloc((size_t)(E > 0 ? E : 1) * sizeof(int64_t));
    sort_by_expert(expert, 0, T * K, E, order, offsets, next);
    free(next);
    experts_t p = {.x = x, .weight = weight, .w1 = w1, .b1 = b1, .w2 = w2, .b2 = b2, .x_stride = x_stride, .K = K,
                 .D = D, .H = H, .E = E, .T = T, .expert = expert, .order = order, .offsets = offsets, .act = act,
                 .hidden = hidden, .outputs = outputs, .y = y};
    parallel_for(E, 1, threads, tiled_forward_chunk, &p);
    parallel_for(T, MIN_ROWS, threads, combine_outputs_chunk, &p);
}

/* The backward of forward_tile's tile: its rows' input gradients written at their assignments' rows of
 * p->rows (if wanted), the weights' gradients added to grads (dW1 (E, D, H), dW2 (E, H, D), then db1 (E, H)
 * and db2 (E, D) where the biases are), rows in order */
static void backward_tile(const experts_t *p, int64_t e, int64_t i, int64_t m, uint64_t k_magic, float *grads,
                          float *xt) {
    const int64_t D = p->D, H = p->H;
    float *dout = xt + TB * D, *dxt = dout + TB * D, *a = dxt + TB * D, *h = a + TB * H, *deriv = h + TB * H;
    float *dh = deriv + TB * H;
    const int64_t R = (m + MR - 1) / MR * MR; /* rows computed: m, then zero rows up to MR's multiple */
    const int64_t *at = p->order + i;
    gather_tile(p->x, p->x_stride, at, m, R, k_magic, D, NULL, xt);
    gather_tile(p->dy, p->dy_stride, at, m, R, k_magic, D, p->weight, dout); /* w · dy */
    memcpy(a, p->hidden + i * H, (size_t)(m * H) * sizeof(float));      /* the forward's, in sorted order */
    memset(a + m * H, 0, (size_t)((R - m) * H) * sizeof(float));
    act_with_derivative(a, h, deriv, R * H, p->act);
    expert_rows_backward(p, e, xt, a, h, deriv, dout, R, m, dh, p->rows ? dxt : NULL, grads);
    if (p->rows)
        for (int64_t r = 0; r < m; r++) copy_row(p->rows + at[r] * D, dxt + r * D, D);
}

static void tiled_backward_chunk(void *arg, int64_t e0, int64_t e1) {
    const experts_t *p = (const experts_t *)arg;
    const uint64_t k_magic = divisor_magic(p->K);
    const int64_t D = p->D, H = p->H, E = p->E;
    float *xt = malloc(BACKWARD_SCRATCH(D, H) * sizeof(float));
    for (int64_t e = e0; e < e1; e++) {
        memset(p->grads + e * D * H, 0, (size_t)D * H * sizeof(float));
        memset(p->grads + E * D * H + e * H * D, 0, (size_t)H * D * sizeof(float));
        if (p->bias1) memset(p->grads + 2 * E * D * H + e * H, 0, (size_t)H * sizeof(float));
        if (p->bias2) memset(p->grads + 2 * E * D * H + (p->bias1 ? E * H : 0) + e * D, 0, (size_t)D * sizeof(float));
        for (int64_t i = p->offsets[e]; i < p->offsets[e + 1]; i += TB) {
            const int64_t m = p->offsets[e + 1] - i < TB ? p->offsets[e + 1] - i : TB;
            int64_t m_next;
            const int64_t i_next = next_tile(p, e, i, e1, &m_next);
            prefetch_rows(p->x, p->x_stride, p->order + i_next, m_next, k_magic, D);
            prefetch_rows(p->dy, p->dy_stride, p->order + i_next, m_next, k_magic, D);
            backward_tile(p, e, i, m, k_magic, p->grads, xt);
        }
    }
    free(xt);
}

/* The backward of vmoe_tiled_forward for dy (T, D) at dy_stride, given its order, offsets, hidden and
 * outputs (the same expert ids and weights); w1t (E, H, D) and w2t (E, D, H) are the weights transposed,
 * bias1 / bias2 whether the experts have b1 / b2. Out: dx (T, D) or NULL, dweight (T, K) or NULL (0 for a
 * dropped choice), and grads: dW1 (E, D, H), dW2 (E, H, D), then db1 (E, H) and db2 (E, D) where the biases
 * are, contiguous, written directly (one expert per thread, its rows in order). rows (T·K, D) is scratch
 * (may be NULL without dx). */
void vmoe_tiled_backward(const float *x, int64_t x_stride, const int64_t *expert, const float *weight,
                         const float *w1t, const float *w2t, const float *dy, int64_t dy_stride, int64_t T, int64_t K,
                         int64_t D, int64_t H, int64_t E, int act, int bias1, int bias2, const int64_t *order,
                         const int64_t *offsets, float *hidden, float *outputs, float *rows, float *dx,
                         float *dweight, float *grads, int threads) {
    experts_t p = {.x = x, .weight = weight, .w1t = w1t, .w2t = w2t, .dy = dy, .x_stride = x_stride,
                 .dy_stride = dy_stride, .K = K, .D = D, .H = H, .E = E, .T = T, .expert = expert, .order = order,
                 .offsets = offsets, .act = act, .bias1 = bias1, .bias2 = bias2, .hidden = hidden,
                 .outputs = outputs, .rows = dx ? rows : NULL, .grads = grads, .dx = dx, .dweight = dweight};
    parallel_for(E, 1, threads, tiled_backward_chunk, &p);
    if (dx || dweight) parallel_for(T, MIN_ROWS, threads, token_grads_chunk, &p);
}

/* ---- small experts, blocked by token ---------------------------------------------------------------------
 * The tiled loop's products for experts too small to gain from one sort over the whole layer (D·H of a few
 * hundred on tens of thousands of tokens), where the tiled loop's time goes to moving rows: the tokens run
 * in blocks (of `block` tokens), each block's kept assignments sorted by expert (a counting sort, stable),
 * its tokens' rows copied, in token order, to their assignments' rows of the sorted order in a buffer of
 * the block, and each expert's rows of it through the tiles straight from there; the outputs (forward) and
 * input gradients (backward) stay in the block's buffers until its tokens add theirs, in token order. Only
 * the pre-activations are kept for the backward (not the outputs: the gates' gradients take the outputs
 * recomputed from them, one product more). The weights' gradients are summed per fixed chunk of blocks
 * into a private buffer, then over the chunks in order: the chunks depend on the shapes only, so the sums
 * do not depend on the thread count. */

typedef struct {                /* a thread's buffers for one block at a time */
    float *xs, *ys, *tile;      /* xs, ys: (block·K + MR, D), rows in the block's sorted order; tile: scratch */
    int64_t *pos, *next;        /* pos (block·K): each assignment's row of xs (-1: dropped); next: E */
} block_buffers_t;

static block_buffers_t block_buffers(const experts_t *p, size_t tile) {
    const size_t rows = (size_t)(p->block * p->K + MR);
    block_buffers_t b = {.xs = calloc(2 * rows * (size_t)p->D + tile, sizeof(float)),
                         .pos = malloc(((size_t)(p->block * p->K) + (size_t)p->E + 1) * sizeof(int64_t))};
    b.ys = b.xs + rows * (size_t)p->D, b.tile = b.ys + rows * (size_t)p->D, b.next = b.pos + p->block * p->K;
    return b;
}

/* Block b's tokens t0 .. t1 - 1: pos[a - t0·K] = the row of assignment a in the block's sorted order
 * (order[offsets[0] ..]), -1 for a dropped one; rows[pos] = src's row of its token (src read in token order) */
static void block_rows(const experts_t *p, int64_t t0, int64_t t1, const int64_t *offsets, const float *src,
                       int64_t stride, block_buffers_t *b, float *rows) {
    const int64_t K = p->K, D = p->D;
    for (int64_t a = 0; a < (t1 - t0) * K; a++) b->pos[a] = -1;
    for (int64_t i = offsets[0]; i < offsets[p->E]; i++) b->pos[p->block_order[i] - t0 * K] = i - offsets[0];
    for (int64_t t = t0; t < t1; t++) {
        const float *row = src + t * stride;
        if (t + 8 < t1) __builtin_prefetch(src + (t + 8) * stride, 0, 3); /* a few rows ahead */
        for (int64_t j = 0; j < K; j++) {
            const int64_t q = b->pos[(t - t0) * K + j];
            if (q >= 0) copy_row(rows + q * D, row, D);
        }
    }
}

static void blocked_forward_chunk(void *arg, int64_t b0, int64_t b1) {
    const experts_t *p = (const experts_t *)arg;
    const int64_t K = p->K, D = p->D, H = p->H, E = p->E;
    block_buffers_t buf = block_buffers(p, 2 * (size_t)TB * (size_t)H);
    float *a = buf.tile, *h = a + TB * H;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t t0 = b * p->block, t1 = t0 + p->block < p->T ? t0 + p->block : p->T;
        int64_t *offsets = p->block_offsets + b * (E + 1);
        sort_by_expert(p->expert, t0 * K, t1 * K, E, p->block_order, offsets, buf.next);
        block_rows(p, t0, t1, offsets, p->x, p->x_stride, &buf, buf.xs);
        for (int64_t e = 0; e < E; e++) {
            for (int64_t i = offsets[e]; i < offsets[e + 1]; i += TB) {
                const int64_t m = offsets[e + 1] - i < TB ? offsets[e + 1] - i : TB, R = (m + MR - 1) / MR * MR;
                const int64_t q = i - offsets[0]; /* the tile's first row in the block's buffers */
                /* rows m .. R - 1 run over the next expert's rows (or spare rows) and are discarded: the
                 * next expert's tiles write them after; so the pre-activations go straight into hidden (in
                 * sorted order) where its rows up to R are the block's own, else through a */
                float *pre = p->hidden && i + R <= t1 * K ? p->hidden + i * H : a;
                expert_rows(p, e, buf.xs + q * D, R, pre, h, buf.ys + q * D);
                if (p->hidden && pre == a) memcpy(p->hidden + i * H, a, (size_t)(m * H) * sizeof(float));
            }
        }
        add_choices(p, t0, t1, buf.pos, buf.ys, p->weight, p->y);
    }
    free(buf.xs);
    free(buf.pos);
}

/* As vmoe_tiled_forward, by blocks of `block` tokens: order (T·K) receives each block's kept assignments
 * sorted by expert (from the block's first assignment t0·K on), offsets (blocks · (E + 1)) each block's
 * E + 1 offsets into order, hidden (T·K, H), unless NULL, the pre-activations at the rows of the sorted
 * order (the backward's input). */
void vmoe_blocked_forward(const float *x, int64_t x_stride, const int64_t *expert, const float *weight,
                          const float *w1, const float *b1, const float *w2, const float *b2, int64_t T, int64_t K,
                          int64_t D, int64_t H, int64_t E, int act, int64_t block, int64_t *order, int64_t *offsets,
                          float *hidden, float *y, int threads) {
    experts_t p = {.x = x, .weight = weight, .w1 = w1, .b1 = b1, .w2 = w2, .b2 = b2, .x_stride = x_stride, .K = K,
                 .D = D, .H = H, .E = E, .T = T, .expert = expert, .block_order = order, .block_offsets = offsets,
                 .block = block, .act = act, .hidden = hidden, .y = y};
    parallel_for((T + block - 1) / block, 1, threads, blocked_forward_chunk, &p);
}

static void blocked_backward_chunk(void *arg, int64_t c0, int64_t c1) {
    const experts_t *p = (const experts_t *)arg;
    const int64_t K = p->K, D = p->D, H = p->H, E = p->E, blocks = (p->T + p->block - 1) / p->block;
    block_buffers_t buf = block_buffers(p, (size_t)TB * (4 * (size_t)H + 2 * (size_t)D));
    float *a = buf.tile, *h = a + TB * H, *deriv = h + TB * H, *dh = deriv + TB * H, *dout = dh + TB * H;
    float *o = dout + TB * D;
    for (int64_t c = c0; c < c1; c++) {
        float *grads = p->partial + c * p->per_chunk;
        memset(grads, 0, (size_t)p->per_chunk * sizeof(float));
        const int64_t last = (c + 1) * p->chunk < blocks ? (c + 1) * p->chunk : blocks;
        for (int64_t b = c * p->chunk; b < last; b++) {
            const int64_t t0 = b * p->block, t1 = t0 + p->block < p->T ? t0 + p->block : p->T;
            const int64_t *offsets = p->block_offsets + b * (E + 1);
            block_rows(p, t0, t1, offsets, p->x, p->x_stride, &buf, buf.xs);
            block_rows(p, t0, t1, offsets, p->dy, p->dy_stride, &buf, buf.ys); /* dy, then each row's dx */
            for (int64_t e = 0; e < E; e++) {
                const float *w2 = p->w2 + e * H * D, *b2 = p->b2 ? p->b2 + e * D : NULL;
                for (int64_t i = offsets[e]; i < offsets[e + 1]; i += TB) {
                    const int64_t m = offsets[e + 1] - i < TB ? offsets[e + 1] - i : TB;
                    const int64_t R = (m + MR - 1) / MR * MR, q = i - offsets[0], *at = p->block_order + i;
                    const float *xs = buf.xs + q * D;
                    float *dys = buf.ys + q * D;
                    /* the forward's pre-activations, read in place where hidden has R rows from i (the rows
                     * after m, another expert's, go where dout's zero rows make them add nothing) */
                    const float *pre = p->hidden + i * H;
                    if (i + R > p->T * K) {
                        memcpy(a, pre, (size_t)(m * H) * sizeof(float));
                        memset(a + m * H, 0, (size_t)((R - m) * H) * sizeof(float));
                        pre = a;
                    }
                    act_with_derivative(pre, h, deriv, R * H, p->act);
                    if (p->dweight) { /* the outputs again, for the gates' gradients <dy, o> */
                        for (int64_t r = 0; r < R; r += MR) gemm_rows(h + r * H, H, w2, b2, H, D, o + r * D, D);
                        for (int64_t r = 0; r < m; r++) p->dweight[at[r]] = row_dot(dys + r * D, o + r * D, D);
                    }
                    for (int64_t r = 0; r < R; r++) { /* w · dy, zero rows after m */
                        const v8f w = splat8(r < m ? p->weight[at[r]] : 0.0f);
                        for (int64_t d = 0; d < D; d += 8)
                            store8(dout + r * D + d, r < m ? load8(dys + r * D + d) * w : splat8(0.0f));
                    }
                    expert_rows_backward(p, e, xs, pre, h, deriv, dout, R, m, dh, p->dx ? o : NULL, grads);
                    if (p->dx) /* each row's input gradient, in place of its dy (read above) */
                        for (int64_t r = 0; r < m; r++) copy_row(dys + r * D, o + r * D, D);
                }
            }
            if (p->dweight)
                for (int64_t n = t0 * K; n < t1 * K; n++)
                    if (p->expert[n] < 0) p->dweight[n] = 0.0f;
            if (p->dx) add_choices(p, t0, t1, buf.pos, buf.ys, NULL, p->dx);
        }
    }
    free(buf.xs);
    free(buf.pos);
}

/* As vmoe_tiled_backward, for order, offsets and hidden from vmoe_blocked_forward (w2 and b2, or NULL, the
 * experts' second layer, for the outputs again): the weights' gradients summed per `chunk` blocks into
 * partial ((blocks + chunk - 1) / chunk buffers of the grads' size), then over the chunks in order into
 * grads. */
void vmoe_blocked_backward(const float *x, int64_t x_stride, const int64_t *expert, const float *weight,
                           const float *w1t, const float *w2t, const float *w2, const float *b2, const float *dy,
                           int64_t dy_stride, int64_t T, int64_t K, int64_t D, int64_t H, int64_t E, int act,
                           int bias1, int64_t block, int64_t chunk, int64_t *order, int64_t *offsets, float *hidden,
                           float *dx, float *dweight, float *grads, float *partial, int threads) {
    const int bias2 = b2 != NULL;
    const int64_t per_chunk = E * (2 * D * H + (bias1 ? H : 0) + (bias2 ? D : 0));
    const int64_t chunks = ((T + block - 1) / block + chunk - 1) / chunk;
    experts_t p = {.x = x, .weight = weight, .w1t = w1t, .w2t = w2t, .w2 = w2, .b2 = b2, .dy = dy,
                 .x_stride = x_stride, .dy_stride = dy_stride, .K = K, .D = D, .H = H, .E = E, .T = T,
                 .expert = expert, .block_order = order, .block_offsets = offsets, .block = block, .act = act,
                 .bias1 = bias1, .bias2 = bias2, .hidden = hidden, .dx = dx, .dweight = dweight, .chunk = chunk,
                 .per_chunk = per_chunk, .partial = partial};
    parallel_for(chunks, 1, threads, blocked_backward_chunk, &p);
    sum_t s = {partial, chunks, per_chunk, grads};
    parallel_for(per_chunk, 4096, threads, sum_chunk, &s);
}

/* ---- the routers' logits: a bias-free linear map ----------------------------------------------------------
 * logits[t] = W x[t] for T tokens of D channels (rows at x_stride), W (E, D) given transposed as wt (D, E):
 * register tiles of MR tokens (rows_product), where a BLAS call on (T, 8) x (8, 8) mostly moves memory.
 * Backward: dx[t] = dl[t] W likewise, and dW = Σ_t dl[t] ⊗ x[t] (the tokens in order, by gemm_tn) summed
 * per chunk of tokens into a private buffer, then over the chunks in order (the chunks depend on the shapes
 * only: the sums do not depend on the thread count). E a multiple of 8 (forward), D and E multiples of 8
 * (backward). */

typedef struct {
    const float *x, *wt, *w, *dl;
    int64_t x_stride, D, E, T, chunk;
    float *out, *dx, *partial;
} lin_t;

static void linear_forward_chunk(void *arg, int64_t t0, int64_t t1) {
    const lin_t *p = (const lin_t *)arg;
    rows_product(p->x + t0 * p->x_stride, p->x_stride, p->wt, p->D, p->E, t1 - t0, p->out + t0 * p->E, p->E);
}

void vmoe_linear_forward(const float *x, int64_t x_stride, const float *wt, int64_t T, int64_t D, int64_t E,
                         float *out, int threads) {
    lin_t p = {.x = x, .wt = wt, .x_stride = x_stride, .D = D, .E = E, .T = T, .out = out};
    parallel_for(T, MIN_ROWS, threads, linear_forward_chunk, &p);
}

static void linear_backward_chunk(void *arg, int64_t c0, int64_t c1) {
    const lin_t *p = (const lin_t *)arg;
    const int64_t D = p->D, E = p->E;
    for (int64_t c = c0; c < c1; c++) {
        float *acc = p->partial + c * E * D;
        memset(acc, 0, (size_t)E * D * sizeof(float));
        const int64_t end = (c + 1) * p->chunk < p->T ? (c + 1) * p->chunk : p->T;
        if (p->dx)
            rows_product(p->dl + c * p->chunk * E, E, p->w, E, D, end - c * p->chunk, p->dx + c * p->chunk * D, D);
        /* dW += dlᵀ x over the chunk's tokens in order, blocks of dW held in registers */
        gemm_tn(p->dl + c * p->chunk * E, E, p->x + c * p->chunk * p->x_stride, p->x_stride, D, end - c * p->chunk,
                acc);
    }
}

/* w (E, D); dl (T, E) contiguous. Out: dx (T, D) or NULL; dw (E, D); partial: (T + chunk - 1) / chunk
 * buffers of E·D floats. */
void vmoe_linear_backward(const float *x, int64_t x_stride, const float *w, const float *dl, int64_t T, int64_t D,
                          int64_t E, int64_t chunk, float *dx, float *dw, float *partial, int threads) {
    const int64_t chunks = (T + chunk - 1) / chunk;
    lin_t p = {.x = x, .w = w, .dl = dl, .x_stride = x_stride, .D = D, .E = E, .T = T, .chunk = chunk, .dx = dx,
               .partial = partial};
    parallel_for(chunks, 1, threads, linear_backward_chunk, &p);
    sum_t s = {partial, chunks, E * D, dw};
    parallel_for(E * D, 4096, threads, sum_chunk, &s);
}

/* ---- a token-choice plan's counts -------------------------------------------------------------------------
 * For the routing statistics and the sorted dispatch: per group, the kept assignments of each expert and the
 * tokens none of whose K choices was kept, from a choice-major plan (assignment j·S + i is the j-th choice of
 * the i-th token). Integer sums: exact in any order. */

typedef struct {
    const int64_t *expert; /* (G, K·S), choice-major */
    const uint8_t *kept;   /* likewise */
    int64_t K, S, E;
    int64_t *counts, *unrouted, *invalid; /* plan_counts' outputs */
    int64_t *token_major;                 /* token_major's output */
} plan_t;

static void counts_chunk(void *arg, int64_t g0, int64_t g1) {
    const plan_t *a = (const plan_t *)arg;
    const int64_t K = a->K, S = a->S, E = a->E;
    for (int64_t g = g0; g < g1; g++) {
        const int64_t *expert = a->expert + g * K * S;
        const uint8_t *kept = a->kept + g * K * S;
        int64_t *counts = a->counts + g * E, invalid = 0, unrouted = 0;
        memset(counts, 0, (size_t)E * sizeof(int64_t));
        for (int64_t i = 0; i < K * S; i++) {
            const int64_t e = expert[i];
            if ((uint64_t)e < (uint64_t)E)
                counts[e] += kept[i] != 0;
            else
                invalid++;
        }
        for (int64_t i = 0; i < S; i++) {
            uint8_t any = 0;
            for (int64_t j = 0; j < K; j++) any |= kept[j * S + i];
            unrouted += !any;
        }
        a->unrouted[g] = unrouted;
        a->invalid[g] = invalid;
    }
}

/* expert (G, K·S) int64, kept (G, K·S) bytes 0/1, choice-major. Out: counts (G, E) kept assignments per group
 * and expert; unrouted (G) tokens with no kept choice; invalid (G) expert ids outside [0, E) (not counted). */
void vmoe_plan_counts(const int64_t *expert, const uint8_t *kept, int64_t G, int64_t K, int64_t S, int64_t E,
                      int64_t *counts, int64_t *unrouted, int64_t *invalid, int threads) {
    plan_t a = {.expert = expert, .kept = kept, .K = K, .S = S, .E = E, .counts = counts, .unrouted = unrouted,
               .invalid = invalid};
    parallel_for(G, group_grain(S * K, 1), threads, counts_chunk, &a);
}

static void token_major_chunk(void *arg, int64_t g0, int64_t g1) {
    const plan_t *a = (const plan_t *)arg;
    const int64_t K = a->K, S = a->S;
    for (int64_t g = g0; g < g1; g++) {
        const int64_t *expert = a->expert + g * K * S;
        const uint8_t *kept = a->kept + g * K * S;
        int64_t *out = a->token_major + g * S * K;
        for (int64_t s = 0; s < S; s++)
            for (int64_t j = 0; j < K; j++) out[s * K + j] = kept[j * S + s] ? expert[j * S + s] : -1;
    }
}

/* expert (G, K·S) int64 and kept (G, K·S) bytes, choice-major. Out: (G·S, K) token-major, -1 where dropped. */
void vmoe_token_major(const int64_t *expert, const uint8_t *kept, int64_t G, int64_t K, int64_t S, int64_t *out,
                      int threads) {
    plan_t a = {.expert = expert, .kept = kept, .K = K, .S = S, .token_major = out};
    parallel_for(G, group_grain(S * K, 1), threads, token_major_chunk, &a);
}

/* ---- the routers' noise: standard normal draws from a counter-based stream --------------------------------
 * Draw i of the stream keyed (k0, k1) depends on i and the key alone, so every split over threads gives the
 * same draws, and visionmoe.routing.noise computes the same 32-bit words with torch ops (its draws then differ
 * from these by the rounding of log, sin and cos only). Word i: mix(mix(i ^ k0) ^ k1), mix being Wellons'
 * triple32 (a bijection of 32-bit words with near-ideal avalanche). Block b of 16 draws takes words 16b to
 * 16b + 15: u = 1 - (w >> 8) 2^-24 in (0, 1] from the first eight, v = (w >> 8) 2^-24 in [0, 1) from the last
 * eight, and Box-Muller gives draw 16b + j = r cos 2πv and draw 16b + 8 + j = r sin 2πv, r = sqrt(-2 log u)
 * (so |draw| <= 5.77, as with torch.randn's 24-bit uniforms). Four blocks at a time (NORMAL_BLOCKS), whose
 * independent hash and polynomial chains the core overlaps: 0.14 of torch.randn's time for 524,288 draws on 2
 * threads, 0.28 on one (benchmarks/router_noise.py). */

typedef uint32_t v8u __attribute__((vector_size(32)));

static inline v8u mix8(v8u x) {
    x ^= x >> 17;
    x *= 0xed5ad4bbu;
    x ^= x >> 11;
    x *= 0xac4c1b51u;
    x ^= x >> 15;
    x *= 0x31848babu;
    x ^= x >> 14;
    return x;
}

#if defined(__AVX2__)
static inline v8f sqrt8(v8f x) { return (v8f)_mm256_sqrt_ps((__m256)x); }
#else
static inline v8f sqrt8(v8f x) {
    for (int i = 0; i < 8; i++) x[i] = sqrtf(x[i]);
    return x;
}
#endif

static inline v8f flip_sign8(v8i mask, v8f x) { return (v8f)((v8i)x ^ (mask & INT32_MIN)); }

#define NORMAL_BLOCKS 4 /* blocks of 16 draws computed side by side: independent chains for the core to overlap */
#define EACH for (int i = 0; i < NORMAL_BLOCKS; i++)

/* draws first .. first + 16 NORMAL_BLOCKS - 1 of the stream keyed (k0, k1) into out */
static inline void normal_blocks(uint32_t first, uint32_t k0, uint32_t k1, float *out) {
    const v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const float ulp = 5.9604644775390625e-8f; /* 2^-24 */
    v8u wu[NORMAL_BLOCKS], wv[NORMAL_BLOCKS];
    v8f r[NORMAL_BLOCKS], y[NORMAL_BLOCKS];
    EACH wu[i] = (first + 16u * i + lane) ^ k0;
    EACH wv[i] = (first + 16u * i + 8u + lane) ^ k0;
    EACH wu[i] = mix8(wu[i]) ^ k1;
    EACH wv[i] = mix8(wv[i]) ^ k1;
    EACH wu[i] = mix8(wu[i]);
    EACH wv[i] = mix8(wv[i]);
    EACH r[i] = sqrt8(log8(1.0f - __builtin_convertvector((v8i)(wu[i] >> 8), v8f) * ulp) * -2.0f);
    EACH y[i] = __builtin_convertvector((v8i)(wv[i] >> 8), v8f) * (4.0f * ulp); /* 4v, exact */
    EACH {
        /* 2πv = q π/2 + φ: q the nearest integer to 4v (ties to even), φ = (4v - q) π/2 in [-π/4, π/4] */
        const v8f magic = splat8(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
        const v8f shifted = y[i] + magic;
        const v8i q = (v8i)shifted - (v8i)magic;
        const v8f phi = (y[i] - (shifted - magic)) * 1.57079632679489662f;
        const v8f z = phi * phi;
        /* Cephes sinf and cosf on [-π/4, π/4] */
        v8f s = splat8(-1.9515295891e-4f);
        s = s * z + 8.3321608736e-3f;
        s = s * z - 1.6666654611e-1f;
        s = s * z * phi + phi;
        v8f c = splat8(2.443315711809948e-5f);
        c = c * z - 1.388731625493765e-3f;
        c = c * z + 4.166664568298827e-2f;
        c = c * z * z - 0.5f * z + 1.0f;
        /* rotate by q quarter turns: (cos, sin) = (c, s), (-s, c), (-c, -s), (s, -c) */
        const v8i odd = -(q & 1);
        const v8f cos_abs = select8(odd, s, c), sin_abs = select8(odd, c, s);
        store8(out + 16 * i, r[i] * flip_sign8(-(((q + 1) >> 1) & 1), cos_abs));
        store8(out + 16 * i + 8, r[i] * flip_sign8(-((q >> 1) & 1), sin_abs));
    }
}
#undef EACH

typedef struct {
    uint32_t k0, k1;
    int64_t n;
    float *out;
} normal_t;

static void normal_chunk(void *arg, int64_t b0, int64_t b1) {
    const normal_t *a = (const normal_t *)arg;
    const int64_t per = 16 * NORMAL_BLOCKS;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t at = per * b;
        if (at + per <= a->n) {
            normal_blocks((uint32_t)at, a->k0, a->k1, a->out + at);
        } else {
            float part[16 * NORMAL_BLOCKS];
            normal_blocks((uint32_t)at, a->k0, a->k1, part);
            memcpy(a->out + at, part, (size_t)(a->n - at) * sizeof(float));
        }
    }
}

/* out[0..n): draws 0 .. n - 1 of the stream keyed (k0, k1); n <= 2^32 */
void vmoe_normal(uint32_t k0, uint32_t k1, int64_t n, float *out, int threads) {
    normal_t a = {k0, k1, n, out};
    parallel_for((n + 16 * NORMAL_BLOCKS - 1) / (16 * NORMAL_BLOCKS), 1024, threads, normal_chunk, &a);
}

int vmoe_abi_version(void) { return 5; }
