/* Native kernels for the token-choice MoE layer on the CPU: routing and row moves (a probe, issue 22).
 *
 * Plain C (no torch headers: it compiles in about a second), called through ctypes on the data of
 * contiguous float32 / int64 tensors (benchmarks/native_moves_probe.py). Each kernel computes what a few
 * ATen operators compute, in one pass over the rows and with the same floating-point operations in
 * the same order where the layer's result depends on it (the build uses -ffp-contract=off: no FMA
 * contraction), so the layer's outputs are bit-identical to its ATen path; only the row dot products
 * of the gate gradients sum in another order.
 *
 * Work is split over rows (tokens, or groups for the routing) into `threads` contiguous chunks, one
 * POSIX thread each, when there is enough of it.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIN_ROWS_PER_THREAD 4096
#define MAX_THREADS 64

typedef void (*chunk_fn)(void *ctx, int64_t begin, int64_t end);

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

/* fn over [0, n) in up to `threads` chunks of at least `grain` items; the caller runs the first. */
static void parallel_for(int64_t n, int64_t grain, int threads, chunk_fn fn, void *ctx) {
    int64_t chunks = threads < 1 ? 1 : threads;
    if (chunks > MAX_THREADS) chunks = MAX_THREADS;
    if (grain < 1) grain = 1;
    if (chunks > n / grain) chunks = n / grain;
    if (chunks <= 1) {
        fn(ctx, 0, n);
        return;
    }
#ifdef _OPENMP /* PyTorch's own OpenMP workers (one libgomp in the process), as visionmoe/native does */
#pragma omp parallel for num_threads(chunks) schedule(static, 1)
    for (int64_t i = 0; i < chunks; i++) fn(ctx, n * i / chunks, n * (i + 1) / chunks);
#else
    chunk_t parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 0; i < chunks; i++) {
        parts[i].fn = fn;
        parts[i].ctx = ctx;
        parts[i].begin = n * i / chunks;
        parts[i].end = n * (i + 1) / chunks;
    }
    for (int64_t i = 1; i < chunks; i++)
        started[i] = pthread_create(&ids[i], NULL, run_chunk, &parts[i]) == 0;
    run_chunk(&parts[0]);
    for (int64_t i = 1; i < chunks; i++) {
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            run_chunk(&parts[i]); /* no thread to be had: run it here */
    }
#endif
}

/* ---- routing ------------------------------------------------------------------------------------ */

/* The index of the largest of `scores[0..E)` not yet in `chosen[0..j)`; ties go to the lower index,
 * as a stable descending sort orders them (the scores hold no NaN). */
static inline int64_t pick_next(const float *scores, int64_t E, const int64_t *chosen, int64_t j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; e++) {
        int taken = 0;
        for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
        if (taken) continue;
        if (best < 0 || scores[e] > scores[best]) best = e;
    }
    return best;
}

typedef struct {
    const float *scores;
    int64_t S, E, K, capacity;
    int64_t *expert, *position, *load;
    uint8_t *kept;
} route_t;

static void route_chunk(void *arg, int64_t g0, int64_t g1) {
    const route_t *a = (const route_t *)arg;
    const int64_t S = a->S, E = a->E, K = a->K;
    int64_t chosen[64];
    for (int64_t g = g0; g < g1; g++) {
        int64_t *expert = a->expert + g * K * S, *position = a->position + g * K * S, *load = a->load + g * E;
        uint8_t *kept = a->kept + g * K * S;
        for (int64_t s = 0; s < S; s++) {
            const float *row = a->scores + (g * S + s) * E;
            for (int64_t j = 0; j < K; j++) {
                chosen[j] = pick_next(row, E, chosen, j);
                expert[j * S + s] = chosen[j];
            }
        }
        /* choice-major priority: every first choice before any second choice, tokens in order */
        memset(load, 0, (size_t)E * sizeof(int64_t));
        for (int64_t i = 0; i < K * S; i++) {
            int64_t p = load[expert[i]]++;
            position[i] = p;
            kept[i] = a->capacity < 0 || p < a->capacity;
        }
    }
}

/* Stable top-K of each token's E scores, then each assignment's slot in its expert, first come first
 * served in choice-major order. scores (G, S, E); expert, position, kept (G, K, S) in the plan's layout
 * (assignment j·S + s is token s's j-th choice); load (G, E): assignments offered to each expert.
 * capacity < 0: every assignment kept (dropless). K <= 64. */
void vmoe_topk_route(const float *scores, int64_t G, int64_t S, int64_t E, int64_t K, int64_t capacity,
                     int64_t *expert, int64_t *position, uint8_t *kept, int64_t *load, int threads) {
    route_t a = {scores, S, E, K, capacity, expert, position, load, kept};
    int64_t grain = S * E >= MIN_ROWS_PER_THREAD ? 1 : (MIN_ROWS_PER_THREAD + S * E - 1) / (S * E);
    parallel_for(G, grain, threads, route_chunk, &a);
}

typedef struct {
    const float *x;
    int64_t E, K;
    float *out;
} kth_t;

static void kth_chunk(void *arg, int64_t r0, int64_t r1) {
    const kth_t *a = (const kth_t *)arg;
    int64_t chosen[64];
    for (int64_t r = r0; r < r1; r++) {
        const float *row = a->x + r * a->E;
        for (int64_t j = 0; j < a->K; j++) chosen[j] = pick_next(row, a->E, chosen, j);
        a->out[r] = row[chosen[a->K - 1]];
    }
}

/* out[r] = the K-th largest of x[r, 0..E) (a repeated value counts each time). K <= 64, no NaN. */
void vmoe_kth_largest(const float *x, int64_t R, int64_t E, int64_t K, float *out, int threads) {
    kth_t a = {x, E, K, out};
    parallel_for(R, MIN_ROWS_PER_THREAD, threads, kth_chunk, &a);
}

typedef struct {
    const int64_t *expert, *position, *base;
    const uint8_t *kept;
    int64_t S, E, K;
    int64_t *slot;
} slots_t;

static void slots_chunk(void *arg, int64_t g0, int64_t g1) {
    const slots_t *a = (const slots_t *)arg;
    const int64_t S = a->S, K = a->K;
    for (int64_t g = g0; g < g1; g++)
        for (int64_t j = 0; j < K; j++)
            for (int64_t s = 0; s < S; s++) {
                int64_t i = (g * K + j) * S + s;
                a->slot[(g * S + s) * K + j] = a->kept[i] ? a->base[g * a->E + a->expert[i]] + a->position[i] : -1;
            }
}

/* slot (G·S, K): the buffer row of token s's j-th choice, base[g, e] + position, or -1 where dropped.
 * expert, position, kept (G, K, S); base (G, E). */
void vmoe_slots(const int64_t *expert, const int64_t *position, const uint8_t *kept, const int64_t *base,
                int64_t G, int64_t S, int64_t E, int64_t K, int64_t *slot, int threads) {
    slots_t a = {expert, position, base, kept, S, E, K, slot};
    parallel_for(G, (MIN_ROWS_PER_THREAD + S - 1) / S, threads, slots_chunk, &a);
}

/* ---- row moves ---------------------------------------------------------------------------------- */

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
    parallel_for(T, MIN_ROWS_PER_THREAD, threads, gather_chunk, &a);
}

static void scatter_chunk(void *arg, int64_t t0, int64_t t1) {
    const rows_t *a = (const rows_t *)arg;
    const int64_t K = a->K, D = a->D;
    for (int64_t t = t0; t < t1; t++) {
        const float *x = a->src + t * a->src_stride;
        for (int64_t j = 0; j < K; j++) {
            int64_t r = a->slot[t * K + j];
            if (r < 0) continue;
            float *b = a->dst + r * a->dst_stride;
            if (a->weight) {
                const float w = a->weight[t * K + j];
                for (int64_t d = 0; d < D; d++) b[d] = x[d] * w;
            } else {
                memcpy(b, x, (size_t)D * sizeof(float));
            }
        }
    }
}

/* buf[slot[t, j]] = weight[t, j] · x[t] (weight NULL: 1) for the j with slot >= 0, every other of the
 * `rows` rows of buf zero. Each slot must be named at most once. buf contiguous (rows, D). */
void vmoe_scatter(const float *x, int64_t x_stride, const int64_t *slot, const float *weight, int64_t T, int64_t K,
                  int64_t D, float *buf, int64_t rows, int threads) {
    memset(buf, 0, (size_t)(rows * D) * sizeof(float));
    rows_t a = {x, x_stride, slot, weight, K, D, buf, D};
    parallel_for(T, MIN_ROWS_PER_THREAD, threads, scatter_chunk, &a);
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
    parallel_for(T, MIN_ROWS_PER_THREAD, threads, rowdot_chunk, &p);
}

