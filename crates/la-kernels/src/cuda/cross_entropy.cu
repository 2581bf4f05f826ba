// The mean cross-entropy of logits [rows, k] against target distributions [rows, k] smoothed
// as PyTorch's label_smoothing (t' = (1 - s) t + s / k), forward and backward (loss.rs has
// the maths; its generic form is the reference). Row reductions are in double.
//
// Forward: one block a row writes the row's loss, log-normaliser and target sum, then one
// thread sums the rows' losses in order (no atomics: reproducible). Backward: one element-
// wise pass, d logits = g / rows (softmax(x) sum t' - t'), g read on the device, so the
// step never waits for the host. The targets are a [rows, k] matrix, or (when `targets` is
// null) the one-hot rows of `labels` (u32 [rows]), so hard labels need no matrix uploaded.
#include <stdint.h>

#define CE_BLOCK 256

// Target j of row r: the matrix's entry, or 1 at row r's label.
template <typename T>
__device__ __forceinline__ double ce_target(const T* targets, const uint32_t* labels, int64_t r,
                                            int64_t j, int64_t k) {
    return targets ? (double)targets[r * k + j] : (labels[r] == (uint32_t)j ? 1.0 : 0.0);
}

// The sum (or, when `take_max`, the maximum) of v over the block's CE_BLOCK threads,
// returned to every thread.
__device__ double ce_block_reduce(double v, bool take_max) {
    __shared__ double values[CE_BLOCK];
    values[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = CE_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const double other = values[threadIdx.x + s];
            values[threadIdx.x] = take_max ? fmax(values[threadIdx.x], other)
                                           : values[threadIdx.x] + other;
        }
        __syncthreads();
    }
    const double result = values[0];
    __syncthreads();  // before the next call writes values
    return result;
}

// Grid (rows): row_stats[3 r + {0, 1, 2}] = row r's loss, log sum exp x and sum t'.
template <typename T>
__device__ void cross_entropy_rows(const T* logits, const T* targets, const uint32_t* labels,
                                   double* row_stats, int64_t k, double smoothing) {
    const int64_t r = blockIdx.x;
    const T* x = logits + r * k;
    double m = -INFINITY;
    for (int64_t j = threadIdx.x; j < k; j += CE_BLOCK) m = fmax(m, (double)x[j]);
    m = ce_block_reduce(m, true);
    double exps = 0.0, tx = 0.0, ts = 0.0;
    for (int64_t j = threadIdx.x; j < k; j += CE_BLOCK) {
        const double xj = (double)x[j];
        const double tj =
            (1.0 - smoothing) * ce_target(targets, labels, r, j, k) + smoothing / (double)k;
        exps += exp(xj - m);
        tx += tj * xj;
        ts += tj;
    }
    exps = ce_block_reduce(exps, false);
    tx = ce_block_reduce(tx, false);
    ts = ce_block_reduce(ts, false);
    if (threadIdx.x == 0) {
        const double log_norm = m + log(exps);
        row_stats[3 * r] = ts * log_norm - tx;
        row_stats[3 * r + 1] = log_norm;
        row_stats[3 * r + 2] = ts;
    }
}

// One thread: loss[0] = the mean of the rows' losses, in row order.
template <typename T>
__device__ void cross_entropy_mean(const double* row_stats, T* loss, int64_t rows) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) total += row_stats[3 * r];
    loss[0] = (T)(total / (double)rows);
}

// d logits = g / rows (exp(x - log_norm) sum t' - t'), g = grad[0].
template <typename T>
__device__ void cross_entropy_backward(const T* logits, const T* targets, const uint32_t* labels,
                                       const double* row_stats, const T* grad, T* dlogits,
                                       int64_t rows, int64_t k, double smoothing) {
    const double g = (double)grad[0] / (double)rows;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * k;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / k;
        const double p = exp((double)logits[i] - row_stats[3 * r + 1]);
        const double t =
            (1.0 - smoothing) * ce_target(targets, labels, r, i % k, k) + smoothing / (double)k;
        dlogits[i] = (T)(g * (p * row_stats[3 * r + 2] - t));
    }
}

#define CROSS_ENTROPY(T, SUFFIX)                                                              \
    extern "C" __global__ void cross_entropy_rows_##SUFFIX(                                   \
        const T* logits, const T* targets, const uint32_t* labels, double* row_stats,         \
        int64_t k, double smoothing) {                                                        \
        cross_entropy_rows(logits, targets, labels, row_stats, k, smoothing);                 \
    }                                                                                         \
    extern "C" __global__ void cross_entropy_mean_##SUFFIX(const double* row_stats, T* loss,  \
                                                           int64_t rows) {                    \
        cross_entropy_mean(row_stats, loss, rows);                                            \
    }                                                                                         \
    extern "C" __global__ void cross_entropy_backward_##SUFFIX(                               \
        const T* logits, const T* targets, const uint32_t* labels, const double* row_stats,   \
        const T* grad, T* dlogits, int64_t rows, int64_t k, double smoothing) {               \
        cross_entropy_backward(logits, targets, labels, row_stats, grad, dlogits, rows, k,    \
                               smoothing);                                                    \
    }

CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(double, f64)
