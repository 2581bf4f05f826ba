// A batched matrix product with arbitrary strides, for the projections between maps and
// tokens (projection.rs) in both orders, forward and backward:
//   C[z][i][j] = (accumulate ? C[z][i][j] : bias ? bias[i] : 0) + sum_k A(z, i, k) B(z, k, j)
// where k runs over k_outer x k_inner pairs with a stride each, so that a sum over the images
// of a batch (a weight's gradient) is one product, without partial results or atomics.
// cuda/plan.rs builds the shapes; the order of every sum is fixed, so a run repeats.
//
// 64 x 64 tiles of C per block of 256 threads, each thread 4 x 4 of them; k in steps of 16
// through shared memory. Plain f32/f64 arithmetic (no tensor cores).
#include <stdint.h>

#define GEMM_TILE 64
#define GEMM_K 16

struct GemmShape {
    int64_t m, n, k_outer, k_inner;
    int64_t a_batch, a_row, a_k_outer, a_k_inner;
    int64_t b_batch, b_k_outer, b_k_inner, b_col;
    int64_t c_batch, c_row, c_col;
    int32_t bias_rows;   // 1: C starts at bias[i]
    int32_t accumulate;  // 1: C starts at its old value
};

// Grid (ceil(n / 64), ceil(m / 64), batch), 256 threads.
template <typename T>
__device__ void gemm_strided(const T* a, const T* b, T* c, const T* bias, GemmShape s) {
    __shared__ T as[GEMM_K][GEMM_TILE + 1], bs[GEMM_K][GEMM_TILE + 1];
    const int64_t z = blockIdx.z, row0 = (int64_t)blockIdx.y * GEMM_TILE,
                  col0 = (int64_t)blockIdx.x * GEMM_TILE;
    a += z * s.a_batch;
    b += z * s.b_batch;
    c += z * s.c_batch;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    T acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
    for (int64_t ko = 0; ko < s.k_outer; ++ko) {
        for (int64_t k0 = 0; k0 < s.k_inner; k0 += GEMM_K) {
            __syncthreads();  // the previous tiles are used up
            for (int e = threadIdx.x; e < GEMM_K * GEMM_TILE; e += 256) {
                const int kk = e / GEMM_TILE, r = e % GEMM_TILE;
                const int64_t k = k0 + kk;
                const bool in_k = k < s.k_inner;
                as[kk][r] = in_k && row0 + r < s.m
                                ? a[(row0 + r) * s.a_row + ko * s.a_k_outer + k * s.a_k_inner]
                                : T(0);
                bs[kk][r] = in_k && col0 + r < s.n
                                ? b[ko * s.b_k_outer + k * s.b_k_inner + (col0 + r) * s.b_col]
                                : T(0);
            }
            __syncthreads();
            for (int kk = 0; kk < GEMM_K; ++kk) {
                T av[4], bv[4];
                for (int i = 0; i < 4; ++i) av[i] = as[kk][ty * 4 + i];
                for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx * 4 + j];
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
            }
        }
    }
    for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + ty * 4 + i;
        if (row >= s.m) continue;
        for (int j = 0; j < 4; ++j) {
            const int64_t col = col0 + tx * 4 + j;
            if (col >= s.n) continue;
            T* out = c + row * s.c_row + col * s.c_col;
            const T start = s.accumulate ? *out : s.bias_rows ? bias[row] : T(0);
            *out = start + acc[i][j];
        }
    }
}

#define GEMM(T, SUFFIX)                                                                       \
    extern "C" __global__ void gemm_strided_##SUFFIX(const T* a, const T* b, T* c,            \
                                                     const T* bias, GemmShape s) {            \
        gemm_strided(a, b, c, bias, s);                                                       \
    }

GEMM(float, f32)
GEMM(double, f64)
