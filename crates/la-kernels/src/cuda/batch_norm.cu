// BatchNorm + ReLU over an NCHW map viewed as [b, c, hw], in training and evaluation mode,
// and its backward (norm.rs has the maths; the CPU kernel there is the reference).
//
// Every per-channel reduction is two launches, as the bias gradient's: blocks of a grid
// (chunks, c) reduce fixed chunks of a channel's b * hw values, then one thread a channel
// combines its chunks in order; no atomics, so a run is reproducible. Sums are in double,
// as the CPU kernel's. The variance is Chan's parallel form: each chunk's mean and sum of
// squared deviations (two passes over the chunk), merged pairwise, which stays exact where
// a one-pass E[x^2] - E[x]^2 would cancel.
#include <stdint.h>

#define BN_BLOCK 256

// The sum of v over the block's BN_BLOCK threads, returned to every thread.
__device__ double bn_block_sum(double v) {
    __shared__ double sums[BN_BLOCK];
    sums[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = BN_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
        __syncthreads();
    }
    const double total = sums[0];
    __syncthreads();  // before the next call writes sums
    return total;
}

// Index of the m-th value (m < b * hw) of channel ch.
__device__ __forceinline__ int64_t bn_index(int64_t m, int64_t ch, int64_t c, int64_t hw) {
    return ((m / hw) * c + ch) * hw + m % hw;
}

// Grid (chunks, c): partials[(ch * chunks + k) * 2 + {0, 1}] = the mean and the sum of squared
// deviations from it of chunk k of channel ch.
template <typename T>
__device__ void bn_chunk_stats(const T* x, double* partials, int64_t b, int64_t c, int64_t hw,
                               int64_t per_chunk) {
    const int64_t ch = blockIdx.y, k = blockIdx.x, chunks = gridDim.x;
    const int64_t start = k * per_chunk, end = min(b * hw, start + per_chunk);
    double sum = 0.0;
    for (int64_t m = start + threadIdx.x; m < end; m += BN_BLOCK)
        sum += (double)x[bn_index(m, ch, c, hw)];
    const double mean = bn_block_sum(sum) / (double)(end - start);
    double squares = 0.0;
    for (int64_t m = start + threadIdx.x; m < end; m += BN_BLOCK) {
        const double d = (double)x[bn_index(m, ch, c, hw)] - mean;
        squares += d * d;
    }
    squares = bn_block_sum(squares);
    if (threadIdx.x == 0) {
        partials[(ch * chunks + k) * 2] = mean;
        partials[(ch * chunks + k) * 2 + 1] = squares;
    }
}

// One thread a channel: merges the channel's chunks in order into stats[ch] (mean) and
// stats[c + ch] (biased variance), and writes y = x * scale + shift's per-channel factors.
template <typename T>
__device__ void bn_finish_stats(const double* partials, double* stats, T* scale, T* shift,
                                const T* weight, const T* bias, int64_t c, int64_t chunks,
                                int64_t count, int64_t per_chunk, double eps) {
    for (int64_t ch = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; ch < c;
         ch += (int64_t)gridDim.x * blockDim.x) {
        double n = 0.0, mean = 0.0, squares = 0.0;
        for (int64_t k = 0; k < chunks; ++k) {
            const double nk = (double)(min(count, (k + 1) * per_chunk) - k * per_chunk);
            const double mk = partials[(ch * chunks + k) * 2];
            const double sk = partials[(ch * chunks + k) * 2 + 1];
            const double total = n + nk, delta = mk - mean;
            mean += delta * (nk / total);
            squares += sk + delta * delta * (n * nk / total);
            n = total;
        }
        const double var = squares / n;
        stats[ch] = mean;
        stats[c + ch] = var;
        const double s = (double)weight[ch] / sqrt(var + eps);
        scale[ch] = (T)s;
        shift[ch] = (T)((double)bias[ch] - mean * s);
    }
}

// One thread a channel: evaluation mode's factors from the running statistics.
template <typename T>
__device__ void bn_eval_factors(const T* running_mean, const T* running_var, T* scale, T* shift,
                                const T* weight, const T* bias, int64_t c, double eps) {
    for (int64_t ch = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; ch < c;
         ch += (int64_t)gridDim.x * blockDim.x) {
        const double s = (double)weight[ch] / sqrt((double)running_var[ch] + eps);
        scale[ch] = (T)s;
        shift[ch] = (T)((double)bias[ch] - (double)running_mean[ch] * s);
    }
}

// y = relu(x * scale + shift) per channel.
template <typename T>
__device__ void bn_relu_apply(const T* x, T* y, const T* scale, const T* shift, int64_t c,
                              int64_t hw, int64_t total) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t ch = (i / hw) % c;
        const T v = x[i] * scale[ch] + shift[ch];
        y[i] = (!(v > T(0)) && v == v) ? T(0) : v;
    }
}

// running = (1 - momentum) running + momentum * factor * batch, batch the first c of stats
// (f64); PyTorch's update (factor n / (n - 1) for the variance).
template <typename T>
__device__ void bn_running_update(T* running, const double* batch, int64_t c, double momentum,
                                  double factor) {
    for (int64_t ch = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; ch < c;
         ch += (int64_t)gridDim.x * blockDim.x)
        running[ch] = (T)((1.0 - momentum) * (double)running[ch] + momentum * factor * batch[ch]);
}

// Backward, grid (chunks, c): partials[(ch * chunks + k) * 2 + {0, 1}] = the sums of g' and
// of g' x_hat over chunk k of channel ch, g' the gradient masked by the ReLU (y > 0).
template <typename T>
__device__ void bn_backward_chunks(const T* x, const T* y, const T* grad, const double* stats,
                                   double* partials, int64_t b, int64_t c, int64_t hw,
                                   int64_t per_chunk, double eps) {
    const int64_t ch = blockIdx.y, k = blockIdx.x, chunks = gridDim.x;
    const int64_t start = k * per_chunk, end = min(b * hw, start + per_chunk);
    const double mean = stats[ch], inv_std = 1.0 / sqrt(stats[c + ch] + eps);
    double g_sum = 0.0, gx_sum = 0.0;
    for (int64_t m = start + threadIdx.x; m < end; m += BN_BLOCK) {
        const int64_t i = bn_index(m, ch, c, hw);
        if (y[i] > T(0)) {
            const double g = (double)grad[i];
            g_sum += g;
            gx_sum += g * ((double)x[i] - mean) * inv_std;
        }
    }
    g_sum = bn_block_sum(g_sum);
    gx_sum = bn_block_sum(gx_sum);
    if (threadIdx.x == 0) {
        partials[(ch * chunks + k) * 2] = g_sum;
        partials[(ch * chunks + k) * 2 + 1] = gx_sum;
    }
}

// One thread a channel: sums[ch] = dbias, sums[c + ch] = dweight, each the channel's chunks
// in order; also written as T into the parameters' gradients.
template <typename T>
__device__ void bn_backward_sums(const double* partials, double* sums, T* dweight, T* dbias,
                                 int64_t c, int64_t chunks) {
    for (int64_t ch = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; ch < c;
         ch += (int64_t)gridDim.x * blockDim.x) {
        double db = 0.0, dw = 0.0;
        for (int64_t k = 0; k < chunks; ++k) {
            db += partials[(ch * chunks + k) * 2];
            dw += partials[(ch * chunks + k) * 2 + 1];
        }
        sums[ch] = db;
        sums[c + ch] = dw;
        dbias[ch] = (T)db;
        dweight[ch] = (T)dw;
    }
}

// dx = w r / n (n g' - dbias - x_hat dweight), r = 1 / sqrt(var + eps).
template <typename T>
__device__ void bn_backward_input(const T* x, const T* y, const T* grad, const T* weight,
                                  const double* stats, const double* sums, T* dx, int64_t c,
                                  int64_t hw, int64_t total, double count, double eps) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t ch = (i / hw) % c;
        const double r = 1.0 / sqrt(stats[c + ch] + eps);
        const double g = y[i] > T(0) ? (double)grad[i] : 0.0;
        const double x_hat = ((double)x[i] - stats[ch]) * r;
        dx[i] = (T)((double)weight[ch] * r / count * (count * g - sums[ch] - x_hat * sums[c + ch]));
    }
}

#define BATCH_NORM(T, SUFFIX)                                                                 \
    extern "C" __global__ void bn_chunk_stats_##SUFFIX(const T* x, double* partials,          \
                                                       int64_t b, int64_t c, int64_t hw,      \
                                                       int64_t per_chunk) {                   \
        bn_chunk_stats(x, partials, b, c, hw, per_chunk);                                     \
    }                                                                                         \
    extern "C" __global__ void bn_finish_stats_##SUFFIX(                                      \
        const double* partials, double* stats, T* scale, T* shift, const T* weight,           \
        const T* bias, int64_t c, int64_t chunks, int64_t count, int64_t per_chunk,           \
        double eps) {                                                                         \
        bn_finish_stats(partials, stats, scale, shift, weight, bias, c, chunks, count,        \
                        per_chunk, eps);                                                      \
    }                                                                                         \
    extern "C" __global__ void bn_eval_factors_##SUFFIX(                                      \
        const T* running_mean, const T* running_var, T* scale, T* shift, const T* weight,     \
        const T* bias, int64_t c, double eps) {                                               \
        bn_eval_factors(running_mean, running_var, scale, shift, weight, bias, c, eps);       \
    }                                                                                         \
    extern "C" __global__ void bn_relu_apply_##SUFFIX(const T* x, T* y, const T* scale,       \
                                                      const T* shift, int64_t c, int64_t hw,  \
                                                      int64_t total) {                        \
        bn_relu_apply(x, y, scale, shift, c, hw, total);                                      \
    }                                                                                         \
    extern "C" __global__ void bn_running_update_##SUFFIX(T* running, const double* batch,    \
                                                          int64_t c, double momentum,         \
                                                          double factor) {                    \
        bn_running_update(running, batch, c, momentum, factor);                               \
    }                                                                                         \
    extern "C" __global__ void bn_backward_chunks_##SUFFIX(                                   \
        const T* x, const T* y, const T* grad, const double* stats, double* partials,         \
        int64_t b, int64_t c, int64_t hw, int64_t per_chunk, double eps) {                    \
        bn_backward_chunks(x, y, grad, stats, partials, b, c, hw, per_chunk, eps);            \
    }                                                                                         \
    extern "C" __global__ void bn_backward_sums_##SUFFIX(const double* partials,              \
                                                         double* sums, T* dweight, T* dbias,  \
                                                         int64_t c, int64_t chunks) {         \
        bn_backward_sums(partials, sums, dweight, dbias, c, chunks);                          \
    }                                                                                         \
    extern "C" __global__ void bn_backward_input_##SUFFIX(                                    \
        const T* x, const T* y, const T* grad, const T* weight, const double* stats,          \
        const double* sums, T* dx, int64_t c, int64_t hw, int64_t total, double count,        \
        double eps) {                                                                         \
        bn_backward_input(x, y, grad, weight, stats, sums, dx, c, hw, total, count, eps);     \
    }

BATCH_NORM(float, f32)
BATCH_NORM(double, f64)
