// A bias along one axis of a contiguous tensor viewed as [outer, len, inner], optionally
// followed by a ReLU, and the backward of both: the masked gradient and the bias gradient
// (its sum over outer and inner). Used after cuDNN's convolution (len = channels,
// inner = pixels) and for a Linear layer's bias on tokens (inner = 1).
//
// The bias gradient is summed in two launches, partial sums of fixed chunks and then each
// channel's partials in order, rather than with atomics, so that a run is reproducible.
#include <stdint.h>

// y = act(x + bias); in place (reading y) when x is null.
template <typename T>
__device__ void bias_act_forward(const T* x, T* y, const T* bias, int64_t len, int64_t inner,
                                 int64_t total, int relu) {
    const T* src = x ? x : y;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        T v = src[i] + bias[(i / inner) % len];
        y[i] = (relu && !(v > T(0)) && v == v) ? T(0) : v;
    }
}

// Grid (chunks, len): block (k, c) sums chunk k of channel c's outer * inner elements,
// writing the masked gradient as it goes when `masked` is not null (the ReLU's mask is
// output > 0, as the CPU kernel's). blockDim.x must be BLOCK.
#define BLOCK 256
template <typename T>
__device__ void bias_act_backward(const T* grad, const T* output, T* masked, T* partials,
                                  int64_t outer, int64_t len, int64_t inner,
                                  int64_t per_chunk, int relu) {
    __shared__ T sums[BLOCK];
    const int64_t c = blockIdx.y, count = outer * inner;
    const int64_t start = blockIdx.x * per_chunk;
    const int64_t end = min(count, start + per_chunk);
    T sum = T(0);
    for (int64_t m = start + threadIdx.x; m < end; m += BLOCK) {
        const int64_t idx = ((m / inner) * len + c) * inner + m % inner;
        T g = grad[idx];
        if (relu && !(output[idx] > T(0))) g = T(0);
        if (masked) masked[idx] = g;
        sum += g;
    }
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[c * gridDim.x + blockIdx.x] = sums[0];
}

template <typename T>
__device__ void sum_rows(const T* partials, T* out, int64_t rows, int64_t cols) {
    for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows;
         r += (int64_t)gridDim.x * blockDim.x) {
        T sum = T(0);
        for (int64_t k = 0; k < cols; ++k) sum += partials[r * cols + k];
        out[r] = sum;
    }
}

#define BIAS_ACT(T, SUFFIX)                                                                  \
    extern "C" __global__ void bias_act_forward_##SUFFIX(                                    \
        const T* x, T* y, const T* bias, int64_t len, int64_t inner, int64_t total,          \
        int relu) {                                                                          \
        bias_act_forward(x, y, bias, len, inner, total, relu);                               \
    }                                                                                        \
    extern "C" __global__ void bias_act_backward_##SUFFIX(                                   \
        const T* grad, const T* output, T* masked, T* partials, int64_t outer, int64_t len,  \
        int64_t inner, int64_t per_chunk, int relu) {                                        \
        bias_act_backward(grad, output, masked, partials, outer, len, inner, per_chunk,      \
                          relu);                                                             \
    }                                                                                        \
    extern "C" __global__ void sum_rows_##SUFFIX(const T* partials, T* out, int64_t rows,    \
                                                 int64_t cols) {                             \
        sum_rows(partials, out, rows, cols);                                                 \
    }

BIAS_ACT(float, f32)
BIAS_ACT(double, f64)
