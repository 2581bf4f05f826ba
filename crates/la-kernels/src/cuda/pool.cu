// 2x2 max-pooling with stride 2 on contiguous [planes, h, w] maps (odd trailing rows and
// columns dropped, as PyTorch's floor mode), one thread per element, one launch per pass.
// The gradient goes to the first maximum of each window in row-major order and a NaN wins
// its window, the rule of the CPU kernel (pool.rs) and of PyTorch. The backward recomputes
// each window's maximum from the input instead of keeping an index map: one extra read of
// the input, and no [planes, oh, ow] int64 tensor kept alive between the passes.
#include <stdint.h>

template <typename T>
__device__ __forceinline__ int64_t window_argmax(const T* plane, int64_t top, int64_t w) {
    int64_t best = top;
    const int64_t others[3] = {top + 1, top + w, top + w + 1};
#pragma unroll
    for (int i = 0; i < 3; ++i) {
        const T v = plane[others[i]];
        if (v > plane[best] || v != v) best = others[i];
    }
    return best;
}

template <typename T>
__device__ void max_pool_forward(const T* x, T* y, int64_t planes, int64_t h, int64_t w) {
    const int64_t oh = h / 2, ow = w / 2, total = planes * oh * ow;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t plane = i / (oh * ow), cell = i % (oh * ow);
        const T* p = x + plane * h * w;
        y[i] = p[window_argmax(p, 2 * (cell / ow) * w + 2 * (cell % ow), w)];
    }
}

template <typename T>
__device__ void max_pool_backward(const T* x, const T* grad_y, T* grad_x, int64_t planes,
                                  int64_t h, int64_t w) {
    const int64_t oh = h / 2, ow = w / 2, total = planes * h * w;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t plane = i / (h * w), pos = i % (h * w);
        const int64_t row = pos / w, col = pos % w;
        T g = T(0);
        if (row < 2 * oh && col < 2 * ow) {
            const T* p = x + plane * h * w;
            const int64_t top = (row & ~int64_t(1)) * w + (col & ~int64_t(1));
            if (window_argmax(p, top, w) == pos)
                g = grad_y[plane * oh * ow + (row / 2) * ow + col / 2];
        }
        grad_x[i] = g;
    }
}

#define POOL(T, SUFFIX)                                                                      \
    extern "C" __global__ void max_pool_2x2_forward_##SUFFIX(                                \
        const T* x, T* y, int64_t planes, int64_t h, int64_t w) {                            \
        max_pool_forward(x, y, planes, h, w);                                                \
    }                                                                                        \
    extern "C" __global__ void max_pool_2x2_backward_##SUFFIX(                               \
        const T* x, const T* grad_y, T* grad_x, int64_t planes, int64_t h, int64_t w) {      \
        max_pool_backward(x, grad_y, grad_x, planes, h, w);                                  \
    }

POOL(float, f32)
POOL(double, f64)
