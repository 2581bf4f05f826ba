// The sum of squares of each of several tensors in two launches, whatever their number (the
// gradient norm of a training step, la_kernels::squares): one block a chunk of one tensor
// writes its partial sum, then one thread a tensor adds its chunks in order (no atomics, so
// a run repeats). Sums are in double. The tensors are reached through a table of device
// pointers that the host builds each call (cuda/plan.rs splits them into chunks):
//   table = [pointers (n) | chunk's tensor (chunks) | chunk's start | chunk's end |
//            first chunk of each tensor (n + 1)], all int64.
#include <stdint.h>

#define SQ_BLOCK 256

template <typename T>
__device__ void chunk_squares(const int64_t* table, int64_t n, int64_t chunks, double* partials) {
    __shared__ double sums[SQ_BLOCK];
    const int64_t chunk = blockIdx.x;
    const int64_t* tensor_of = table + n;
    const T* data = (const T*)table[tensor_of[chunk]];
    const int64_t start = table[n + chunks + chunk], end = table[n + 2 * chunks + chunk];
    double sum = 0.0;
    for (int64_t i = start + threadIdx.x; i < end; i += SQ_BLOCK) {
        const double x = (double)data[i];
        sum += x * x;
    }
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned s = SQ_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[chunk] = sums[0];
}

__device__ void sum_chunks(const int64_t* table, int64_t n, int64_t chunks, const double* partials,
                           double* out) {
    const int64_t* first = table + n + 3 * chunks;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < n;
         t += (int64_t)gridDim.x * blockDim.x) {
        double sum = 0.0;
        for (int64_t k = first[t]; k < first[t + 1]; ++k) sum += partials[k];
        out[t] = sum;
    }
}

extern "C" __global__ void chunk_squares_f32(const int64_t* table, int64_t n, int64_t chunks,
                                             double* partials) {
    chunk_squares<float>(table, n, chunks, partials);
}
extern "C" __global__ void chunk_squares_f64(const int64_t* table, int64_t n, int64_t chunks,
                                             double* partials) {
    chunk_squares<double>(table, n, chunks, partials);
}
extern "C" __global__ void sum_chunks_all(const int64_t* table, int64_t n, int64_t chunks,
                                          const double* partials, double* out) {
    sum_chunks(table, n, chunks, partials, out);
}
