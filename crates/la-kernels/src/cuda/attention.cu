// Exact softmax attention, out = softmax(q k^T * scale) v, for q, k: [b, n, d] and v: [b, n, c],
// in O(n) memory (softmax_attention.rs has the maths; its CPU kernel is the reference): tiles of
// TILE queries against tiles of TILE keys with a running max and sum (flash attention's online
// softmax), the scores never stored beyond one [TILE, TILE] tile in shared memory.
//
// The value width c (up to 512 in VGG) is taken in column chunks of `cc` (a power of two from
// 16 to CC_MAX, chosen by the host, cuda/plan.rs): each chunk is one pass over the keys, the
// scores recomputed (d = c / 8, so that costs an eighth of the product with v per pass). Thread
// t owns column t % cc of the chunk for rows t / cc, t / cc + 256 / cc, ... of its tile.
//
// Backward (no atomics, so a run repeats to the digit): delta = rowsum(dout * out) first; then
// one kernel a query tile for dq (looping over every key tile) and one a key tile for dk and dv
// (looping over every query tile), each recomputing the scores from q, k and the forward's
// log-sum-exp. d must be at most D_MAX (the host checks and otherwise runs the generic form).
#include <stdint.h>

#define ATTN_THREADS 256
#define TILE 16
#define D_MAX 64

// Columns a chunk holds at most: 128 for float, 64 for double (shared memory under 48 KiB).
template <typename T>
struct Chunk {
    static constexpr int MAX = 512 / sizeof(T);
};

// Rows [row0, row0 + TILE) of a [n, width] matrix (columns [col0, col0 + cols)) into
// dst[TILE][dst_stride], zeros past n.
template <typename T>
__device__ void attn_load(T* dst, int dst_stride, const T* src, int64_t n, int64_t width,
                          int64_t row0, int64_t col0, int cols) {
    for (int i = threadIdx.x; i < TILE * cols; i += ATTN_THREADS) {
        const int r = i / cols, j = i % cols;
        dst[r * dst_stride + j] = row0 + r < n ? src[(row0 + r) * width + col0 + j] : T(0);
    }
}

// scores[q][k] = scale * (qs[q] . ks[k]) for the thread's entry (q, k) = (t / TILE, t % TILE);
// -inf for a key past n.
template <typename T>
__device__ T attn_score(const T* qs, const T* ks, int d, T scale, int64_t key0, int64_t n) {
    const int q = threadIdx.x / TILE, k = threadIdx.x % TILE;
    if (key0 + k >= n) return -INFINITY;
    T s = T(0);
    for (int e = 0; e < d; ++e) s += qs[q * D_MAX + e] * ks[k * D_MAX + e];
    return s * scale;
}

// Forward, grid (query tiles, b): out [b, n, c] and the rows' log-sum-exp lse [b, n].
template <typename T>
__device__ void attn_forward(const T* q, const T* k, const T* v, T* out, T* lse, int64_t n,
                             int d, int64_t c, int cc, T scale) {
    constexpr int CC = Chunk<T>::MAX;
    __shared__ T qs[TILE * D_MAX], ks[TILE * D_MAX], vs[TILE * CC], ps[TILE * TILE];
    __shared__ T row_max[TILE], row_sum[TILE], rescale[TILE];
    const int64_t batch = blockIdx.y, row0 = (int64_t)blockIdx.x * TILE;
    q += batch * n * d;
    k += batch * n * d;
    v += batch * n * c;
    out += batch * n * c;
    lse += batch * n;
    const int col = threadIdx.x % cc, row_step = ATTN_THREADS / cc;
    attn_load(qs, D_MAX, q, n, d, row0, 0, d);
    for (int64_t col0 = 0; col0 < c; col0 += cc) {
        const int cols = (int)min((int64_t)cc, c - col0);
        T acc[TILE];
        for (int i = 0; i < TILE; ++i) acc[i] = T(0);
        if (threadIdx.x < TILE) {
            row_max[threadIdx.x] = -INFINITY;
            row_sum[threadIdx.x] = T(0);
        }
        for (int64_t key0 = 0; key0 < n; key0 += TILE) {
            __syncthreads();  // the previous tile's ks, vs and ps are used up
            attn_load(ks, D_MAX, k, n, d, key0, 0, d);
            attn_load(vs, CC, v, n, c, key0, col0, cols);
            __syncthreads();
            // Each thread its entry (r, k) of the tile: the row's new max (every thread of a
            // row finds the same), then its own probability, so the exponentials run in
            // parallel; the row's first thread updates the running statistics.
            const int r = threadIdx.x / TILE;
            const T s = attn_score(qs, ks, d, scale, key0, n);
            ps[threadIdx.x] = s;
            __syncthreads();
            T m = row_max[r];
            for (int j = 0; j < TILE; ++j) m = max(m, ps[r * TILE + j]);
            __syncthreads();  // the scores are read before the probabilities replace them
            ps[threadIdx.x] = exp(s - m);
            __syncthreads();
            if (threadIdx.x % TILE == 0) {
                T sum = T(0);
                for (int j = 0; j < TILE; ++j) sum += ps[r * TILE + j];
                rescale[r] = exp(row_max[r] - m);  // 0 on the first tile (max -inf)
                row_sum[r] = row_sum[r] * rescale[r] + sum;
                row_max[r] = m;
            }
            __syncthreads();
            if (col < cols) {
#pragma unroll
                for (int i = 0; i < TILE; ++i) {
                    const int r = threadIdx.x / cc + i * row_step;
                    if (r >= TILE) break;
                    T a = acc[i] * rescale[r];
                    for (int j = 0; j < TILE; ++j) a += ps[r * TILE + j] * vs[j * CC + col];
                    acc[i] = a;
                }
            }
        }
        __syncthreads();
        if (col < cols) {
#pragma unroll
            for (int i = 0; i < TILE; ++i) {
                const int r = threadIdx.x / cc + i * row_step;
                if (r >= TILE) break;
                if (row0 + r < n) out[(row0 + r) * c + col0 + col] = acc[i] / row_sum[r];
            }
        }
        if (col0 == 0 && threadIdx.x < TILE && row0 + threadIdx.x < n)
            lse[row0 + threadIdx.x] = row_max[threadIdx.x] + log(row_sum[threadIdx.x]);
        __syncthreads();  // row_max and row_sum are read before the next chunk resets them
    }
}

// delta[row] = sum_j dout[row][j] out[row][j], one thread a row of b * n.
template <typename T>
__device__ void attn_delta(const T* out, const T* dout, T* delta, int64_t rows, int64_t c) {
    for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows;
         r += (int64_t)gridDim.x * blockDim.x) {
        T sum = T(0);
        for (int64_t j = 0; j < c; ++j) sum += dout[r * c + j] * out[r * c + j];
        delta[r] = sum;
    }
}

// The probabilities of the thread's entry (q, k) of a tile pair and, over every column chunk,
// dp = dout[q] . v[k]; returns ds = p (dp - delta[q]). qs, ks hold the tiles; vs, dos are
// scratch for the chunks; the rows' lse and delta are in lse_s, delta_s (+inf and 0 past n).
template <typename T>
__device__ T attn_score_grad(const T* qs, const T* ks, T* vs, T* dos, const T* lse_s,
                             const T* delta_s, const T* v, const T* dout, int64_t n, int d,
                             int64_t c, int cc, T scale, int64_t row0, int64_t key0, T* p_out) {
    constexpr int CC = Chunk<T>::MAX;
    const int qi = threadIdx.x / TILE, ki = threadIdx.x % TILE;
    __syncthreads();  // the caller's tiles are loaded
    const T p = exp(attn_score(qs, ks, d, scale, key0, n) - lse_s[qi]);
    T dp = T(0);
    for (int64_t col0 = 0; col0 < c; col0 += cc) {
        const int cols = (int)min((int64_t)cc, c - col0);
        __syncthreads();  // the previous chunk is used up
        attn_load(vs, CC, v, n, c, key0, col0, cols);
        attn_load(dos, CC, dout, n, c, row0, col0, cols);
        __syncthreads();
        for (int j = 0; j < cols; ++j) dp += dos[qi * CC + j] * vs[ki * CC + j];
    }
    *p_out = p;
    return p * (dp - delta_s[qi]);
}

// Loads a tile's lse (+inf past n, so that its probabilities are 0) and delta (0 past n).
template <typename T>
__device__ void attn_load_rows(T* lse_s, T* delta_s, const T* lse, const T* delta, int64_t n,
                               int64_t row0) {
    if (threadIdx.x < TILE) {
        const int64_t r = row0 + threadIdx.x;
        lse_s[threadIdx.x] = r < n ? lse[r] : T(INFINITY);
        delta_s[threadIdx.x] = r < n ? delta[r] : T(0);
    }
}

// dq, grid (query tiles, b): dq[q] = scale sum_k ds[q][k] k[k].
template <typename T>
__device__ void attn_backward_dq(const T* q, const T* k, const T* v, const T* dout,
                                 const T* lse, const T* delta, T* dq, int64_t n, int d,
                                 int64_t c, int cc, T scale) {
    constexpr int CC = Chunk<T>::MAX;
    __shared__ T qs[TILE * D_MAX], ks[TILE * D_MAX], vs[TILE * CC], dos[TILE * CC];
    __shared__ T ds[TILE * TILE], lse_s[TILE], delta_s[TILE];
    const int64_t batch = blockIdx.y, row0 = (int64_t)blockIdx.x * TILE;
    q += batch * n * d;
    k += batch * n * d;
    v += batch * n * c;
    dout += batch * n * c;
    lse += batch * n;
    delta += batch * n;
    dq += batch * n * d;
    attn_load(qs, D_MAX, q, n, d, row0, 0, d);
    attn_load_rows(lse_s, delta_s, lse, delta, n, row0);
    T acc[TILE * D_MAX / ATTN_THREADS];
    for (int i = 0; i < TILE * D_MAX / ATTN_THREADS; ++i) acc[i] = T(0);
    for (int64_t key0 = 0; key0 < n; key0 += TILE) {
        __syncthreads();
        attn_load(ks, D_MAX, k, n, d, key0, 0, d);
        T p;
        const T g = attn_score_grad(qs, ks, vs, dos, lse_s, delta_s, v, dout, n, d, c, cc,
                                    scale, row0, key0, &p);
        __syncthreads();
        ds[threadIdx.x] = g;
        __syncthreads();
        // The thread's entries (row, e) of the tile's dq: index t + 256 i of TILE * d.
#pragma unroll
        for (int i = 0; i < TILE * D_MAX / ATTN_THREADS; ++i) {
            const int idx = threadIdx.x + i * ATTN_THREADS;
            if (idx >= TILE * d) break;
            const int r = idx / d, e = idx % d;
            T a = T(0);
            for (int j = 0; j < TILE; ++j) a += ds[r * TILE + j] * ks[j * D_MAX + e];
            acc[i] += a;
        }
    }
#pragma unroll
    for (int i = 0; i < TILE * D_MAX / ATTN_THREADS; ++i) {
        const int idx = threadIdx.x + i * ATTN_THREADS;
        if (idx >= TILE * d) break;
        const int r = idx / d, e = idx % d;
        if (row0 + r < n) dq[(row0 + r) * d + e] = acc[i] * scale;
    }
}

// dk and dv, grid (key tiles, b): dk[k] = scale sum_q ds[q][k] q[q] (a first pass over the
// query tiles), then dv[k] = sum_q p[q][k] dout[q] (a pass over the query tiles for each
// column chunk).
template <typename T>
__device__ void attn_backward_dkv(const T* q, const T* k, const T* v, const T* dout,
                                  const T* lse, const T* delta, T* dk, T* dv, int64_t n, int d,
                                  int64_t c, int cc, T scale) {
    constexpr int CC = Chunk<T>::MAX;
    __shared__ T qs[TILE * D_MAX], ks[TILE * D_MAX], vs[TILE * CC], dos[TILE * CC];
    __shared__ T ds[TILE * TILE], ps[TILE * TILE], lse_s[TILE], delta_s[TILE];
    const int64_t batch = blockIdx.y, key0 = (int64_t)blockIdx.x * TILE;
    q += batch * n * d;
    k += batch * n * d;
    v += batch * n * c;
    dout += batch * n * c;
    lse += batch * n;
    delta += batch * n;
    dk += batch * n * d;
    dv += batch * n * c;
    attn_load(ks, D_MAX, k, n, d, key0, 0, d);
    T acc[TILE * D_MAX / ATTN_THREADS];
    for (int i = 0; i < TILE * D_MAX / ATTN_THREADS; ++i) acc[i] = T(0);
    for (int64_t row0 = 0; row0 < n; row0 += TILE) {
        __syncthreads();
        attn_load(qs, D_MAX, q, n, d, row0, 0, d);
        attn_load_rows(lse_s, delta_s, lse, delta, n, row0);
        __syncthreads();
        T p;
        const T g = attn_score_grad(qs, ks, vs, dos, lse_s, delta_s, v, dout, n, d, c, cc,
                                    scale, row0, key0, &p);
        __syncthreads();
        ds[threadIdx.x] = g;
        __syncthreads();
        // The thread's entries (key, e) of the tile's dk.
#pragma unroll
        for (int i = 0; i < TILE * D_MAX / ATTN_THREADS; ++i) {
            const int idx = threadIdx.x + i * ATTN_THREADS;
            if (idx >= TILE * d) break;
            const int kr = idx / d, e = idx % d;
            T a = T(0);
            for (int j = 0; j < TILE; ++j) a += ds[j * TILE + kr] * qs[j * D_MAX + e];
            acc[i] += a;
        }
    }
#pragma unroll
    for (int i = 0; i < TILE * D_MAX / ATTN_THREADS; ++i) {
        const int idx = threadIdx.x + i * ATTN_THREADS;
        if (idx >= TILE * d) break;
        const int kr = idx / d, e = idx % d;
        if (key0 + kr < n) dk[(key0 + kr) * d + e] = acc[i] * scale;
    }
    const int col = threadIdx.x % cc, row_step = ATTN_THREADS / cc;
    for (int64_t col0 = 0; col0 < c; col0 += cc) {
        const int cols = (int)min((int64_t)cc, c - col0);
        T dv_acc[TILE];
        for (int i = 0; i < TILE; ++i) dv_acc[i] = T(0);
        for (int64_t row0 = 0; row0 < n; row0 += TILE) {
            __syncthreads();
            attn_load(qs, D_MAX, q, n, d, row0, 0, d);
            attn_load(dos, CC, dout, n, c, row0, col0, cols);
            attn_load_rows(lse_s, delta_s, lse, delta, n, row0);
            __syncthreads();
            ps[threadIdx.x] =
                exp(attn_score(qs, ks, d, scale, key0, n) - lse_s[threadIdx.x / TILE]);
            __syncthreads();
            if (col < cols) {
#pragma unroll
                for (int i = 0; i < TILE; ++i) {
                    const int kr = threadIdx.x / cc + i * row_step;
                    if (kr >= TILE) break;
                    T a = dv_acc[i];
                    for (int j = 0; j < TILE; ++j) a += ps[j * TILE + kr] * dos[j * CC + col];
                    dv_acc[i] = a;
                }
            }
        }
        if (col < cols) {
#pragma unroll
            for (int i = 0; i < TILE; ++i) {
                const int kr = threadIdx.x / cc + i * row_step;
                if (kr >= TILE) break;
                if (key0 + kr < n) dv[(key0 + kr) * c + col0 + col] = dv_acc[i];
            }
        }
    }
}

#define ATTENTION(T, SUFFIX)                                                                  \
    extern "C" __global__ void attn_forward_##SUFFIX(const T* q, const T* k, const T* v,      \
                                                     T* out, T* lse, int64_t n, int d,        \
                                                     int64_t c, int cc, T scale) {            \
        attn_forward(q, k, v, out, lse, n, d, c, cc, scale);                                  \
    }                                                                                         \
    extern "C" __global__ void attn_delta_##SUFFIX(const T* out, const T* dout, T* delta,     \
                                                   int64_t rows, int64_t c) {                 \
        attn_delta(out, dout, delta, rows, c);                                                \
    }                                                                                         \
    extern "C" __global__ void attn_backward_dq_##SUFFIX(                                     \
        const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* delta,      \
        T* dq, int64_t n, int d, int64_t c, int cc, T scale) {                                \
        attn_backward_dq(q, k, v, dout, lse, delta, dq, n, d, c, cc, scale);                  \
    }                                                                                         \
    extern "C" __global__ void attn_backward_dkv_##SUFFIX(                                    \
        const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* delta,      \
        T* dk, T* dv, int64_t n, int d, int64_t c, int cc, T scale) {                         \
        attn_backward_dkv(q, k, v, dout, lse, delta, dk, dv, n, d, c, cc, scale);             \
    }

ATTENTION(float, f32)
ATTENTION(double, f64)
