// Just enough of CUDA's C++ dialect to run this crate's kernels on the CPU (src/cuda/emulated.rs):
// a block's threads are OS threads, so __syncthreads is a real barrier and shared memory is
// shared; blocks run one after another.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
// One copy for the running block's threads (blocks do not overlap in time).
#define __shared__ static
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
using std::max;
using std::min;
using std::exp;
using std::log;
using std::sqrt;

template <typename Kernel>
void launch(dim3 grid, dim3 block, Kernel kernel) {
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz) {
        for (unsigned by = 0; by < grid.y; ++by) {
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> barrier(block.x);
                block_barrier = &barrier;
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < block.x; ++t) {
                    threads.emplace_back([=] {
                        blockIdx = {bx, by, bz};
                        threadIdx = {t, 0, 0};
                        kernel();
                    });
                }
                for (auto& thread : threads) thread.join();
            }
        }
    }
}
