// AdamW's three in-place passes over a parameter (adamw.rs has the rule), one thread per
// element, in the CPU kernel's order of operations; and all three for many parameters at once.
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

// The three passes for many parameters in one launch, fused element by element in the same
// operations: one block a chunk of one parameter, through a table of device pointers
// (cuda/plan.rs's chunk_table with four columns: weights, gradients, first moments, second
// moments) and each parameter's factors (decay, step, sqrt_bias2, eps: 4 doubles as bits).
template <typename T>
__device__ void adamw_many(const int64_t* table, const int64_t* factor_bits, int64_t n,
                           int64_t chunks, T beta1, T beta2) {
    const double* factors = (const double*)factor_bits;
    const int64_t chunk = blockIdx.x, t = table[4 * n + chunk];
    T* w = (T*)table[t];
    const T* grad = (const T*)table[n + t];
    T* m = (T*)table[2 * n + t];
    T* v = (T*)table[3 * n + t];
    const int64_t start = table[4 * n + chunks + chunk], end = table[4 * n + 2 * chunks + chunk];
    const T decay = (T)factors[4 * t], step = (T)factors[4 * t + 1];
    const T sqrt_bias2 = (T)factors[4 * t + 2], eps = (T)factors[4 * t + 3];
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const T g = grad[i];
        const T mi = m[i] * beta1 + g * (T(1) - beta1);
        const T vi = v[i] * beta2 + (g * g) * (T(1) - beta2);
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * decay - mi / (sqrt(vi) / sqrt_bias2 + eps) * step;
    }
}

#define ADAMW(T, SUFFIX)                                                                     \
    extern "C" __global__ void adamw_moment_##SUFFIX(T* dst, const T* g, int64_t n, T beta,  \
                                                     int square) {                           \
        adamw_moment(dst, g, n, beta, square);                                               \
    }                                                                                        \
    extern "C" __global__ void adamw_weight_##SUFFIX(T* w, const T* m, const T* v, int64_t n, \
                                                     T decay, T step, T sqrt_bias2, T eps) { \
        adamw_weight(w, m, v, n, decay, step, sqrt_bias2, eps);                              \
    }                                                                                        \
    extern "C" __global__ void adamw_many_##SUFFIX(const int64_t* table,                     \
                                                   const int64_t* factor_bits, int64_t n,    \
                                                   int64_t chunks, T beta1, T beta2) {       \
        adamw_many<T>(table, factor_bits, n, chunks, beta1, beta2);                          \
    }

ADAMW(float, f32)
ADAMW(double, f64)
