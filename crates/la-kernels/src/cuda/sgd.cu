// SGD with momentum's two in-place passes over a parameter (sgd.rs has the rule), one thread
// per element, in the CPU kernel's order of operations; and both for many parameters at once.
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

// Both passes for many parameters in one launch (PyTorch's foreach SGD): one block a chunk
// of one parameter, through a table of device pointers (cuda/plan.rs's chunk_table with
// three columns: weights, gradients, buffers) and each parameter's rates (learning rates,
// then weight decays, as the bits of doubles). Element by element the operations of the two
// passes above, in order.
template <typename T>
__device__ void sgd_many(const int64_t* table, const int64_t* rate_bits, int64_t n,
                         int64_t chunks, T momentum, int nesterov) {
    const double* rates = (const double*)rate_bits;
    const int64_t chunk = blockIdx.x, t = table[3 * n + chunk];
    T* w = (T*)table[t];
    const T* grad = (const T*)table[n + t];
    T* buf = (T*)table[2 * n + t];
    const int64_t start = table[3 * n + chunks + chunk], end = table[3 * n + 2 * chunks + chunk];
    const T lr = (T)rates[t], weight_decay = (T)rates[n + t];
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const T g = grad[i] + w[i] * weight_decay;
        const T b = buf[i] * momentum + g;
        buf[i] = b;
        const T step = nesterov ? g + b * momentum : b;
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
    }                                                                                        \
    extern "C" __global__ void sgd_many_##SUFFIX(const int64_t* table,                       \
                                                 const int64_t* rate_bits, int64_t n,        \
                                                 int64_t chunks, T momentum, int nesterov) { \
        sgd_many<T>(table, rate_bits, n, chunks, momentum, nesterov);                        \
    }

SGD(float, f32)
SGD(double, f64)
