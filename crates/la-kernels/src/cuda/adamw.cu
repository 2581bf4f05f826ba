// AdamW's three in-place passes over a parameter (adamw.rs has the rule), one thread per
// element, in the CPU kernel's order of operations.
#include <stdint.h>

// dst = beta dst + (1 - beta) g, or g * g when `square` (the two moments).
template <typename T>
__device__ void adamw_moment(T* dst, const T* g, int64_t n, T beta, int square) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const T x = square ? g[i] * g[i] : g[i];
        dst[i] = dst[i] * beta + x * (T(1) - beta);
    }
}

// w = w decay - step m / (sqrt(v) / sqrt_bias2 + eps).
template <typename T>
__device__ void adamw_weight(T* w, const T* m, const T* v, int64_t n, T decay, T step,
                             T sqrt_bias2, T eps) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        w[i] = w[i] * decay - m[i] / (sqrt(v[i]) / sqrt_bias2 + eps) * step;
}

#define ADAMW(T, SUFFIX)                                                                     \
    extern "C" __global__ void adamw_moment_##SUFFIX(T* dst, const T* g, int64_t n, T beta,  \
                                                     int square) {                           \
        adamw_moment(dst, g, n, beta, square);                                               \
    }                                                                                        \
    extern "C" __global__ void adamw_weight_##SUFFIX(T* w, const T* m, const T* v, int64_t n, \
                                                     T decay, T step, T sqrt_bias2, T eps) { \
        adamw_weight(w, m, v, n, decay, step, sqrt_bias2, eps);                              \
    }

ADAMW(float, f32)
ADAMW(double, f64)
