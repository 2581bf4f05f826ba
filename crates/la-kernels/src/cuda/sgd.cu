// SGD with momentum's two in-place passes over a parameter (sgd.rs has the rule), one thread
// per element, in the CPU kernel's order of operations.
#include <stdint.h>

template <typename T>
__device__ void sgd_buffer(T* buf, const T* grad, const T* w, int64_t n, T momentum,
                           T weight_decay) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        buf[i] = buf[i] * momentum + (grad[i] + w[i] * weight_decay);
}

template <typename T>
__device__ void sgd_weight(T* w, const T* grad, const T* buf, int64_t n, T lr, T momentum,
                           T weight_decay, int nesterov) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const T step = nesterov ? (grad[i] + w[i] * weight_decay) + buf[i] * momentum : buf[i];
        w[i] -= step * lr;
    }
}

#define SGD(T, SUFFIX)                                                                       \
    extern "C" __global__ void sgd_buffer_##SUFFIX(T* buf, const T* grad, const T* w,        \
                                                   int64_t n, T momentum, T weight_decay) {  \
        sgd_buffer(buf, grad, w, n, momentum, weight_decay);                                 \
    }                                                                                        \
    extern "C" __global__ void sgd_weight_##SUFFIX(T* w, const T* grad, const T* buf,        \
                                                   int64_t n, T lr, T momentum,              \
                                                   T weight_decay, int nesterov) {           \
        sgd_weight(w, grad, buf, n, lr, momentum, weight_decay, nesterov);                   \
    }

SGD(float, f32)
SGD(double, f64)
