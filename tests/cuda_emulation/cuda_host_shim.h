// Host emulation of the parts of the CUDA programming model the kernels use, so that their
// device code (compiled without WMMA, i.e. the FMA paths) runs on a machine with no GPU.
//
// One block at a time; its threads are ucontext coroutines switched round-robin at every
// __syncthreads() (in ascending or descending thread order, so that a missing barrier shows
// up as a difference between the two runs). __shared__ variables become function-local
// statics, shared by the threads of the block. __shfl_xor_sync is a block-wide exchange,
// valid for kernels whose threads all reach it together (as the ones under test do).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#undef __global__
#undef __shared__
#undef __forceinline__
#define __global__
#define __shared__ static
#define __forceinline__ inline
#ifndef __launch_bounds__
#define __launch_bounds__(n)
#endif
#ifndef __align__
#define __align__(n) alignas(n)
#endif

typedef struct CUstream_st* cudaStream_t;

namespace emu {
struct Index {
  unsigned x = 0, y = 0, z = 0;
};
}  // namespace emu

extern emu::Index threadIdx, blockIdx;

void __syncthreads();
int __syncthreads_or(int predicate);
float __shfl_xor_sync(unsigned mask, float value, int lane_mask);
