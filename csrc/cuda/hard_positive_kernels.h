// Launcher of the CUDA hard-positive selection kernel (hard_positive_kernels.cu): raw
// pointers, sizes, strides and a stream, so that the kernel compiles with CUDA headers only.
// See csrc/hard_positive.cpp for the selection rule.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "supcon_kernels.h"  // Dtype, Matrix

namespace anchor_kernels::hard_positive_cuda {

using supcon_cuda::Dtype;
using supcon_cuda::Matrix;

struct Args {
  Matrix z;            // anchors (M, D)
  Matrix c;            // contrast rows (N, D)
  int64_t D;
  const int64_t* lz;   // (M,) labels
  const int64_t* lc;   // (N,)
  const float* rnz;    // (M,) 1 / max(||z_i||, eps), or ones
  const float* rnc;    // (N,)
  bool has_self;       // anchor i is contrast row i + offset
  int64_t offset;
  int64_t keff;        // slots kept per anchor: min(k, N)
  int64_t* keys;       // (M, keff) scratch
  int64_t* idx;        // (M, k) output, columns >= keff left as they are (-1)
  float* cos;          // (M, k) output (+inf there)
  int64_t k;
};

// bf16 / fp16 and TF32 rows that the CuTe kernel takes (mma_supported: those of the SupCon
// tensor-core forward) run there; other bf16 / fp16 products run on the tensor cores through
// WMMA where the binary is built for sm_80 or newer, and as fp32 FMA elsewhere, as do the other
// fp32 inputs.
cudaError_t launch_hard_positive(Dtype dtype, const Args& args, cudaStream_t stream);

// The CuTe tensor-core kernel (hard_positive_mma.cu).
bool mma_supported(Dtype dtype, const Args& args);
cudaError_t launch_hard_positive_mma(Dtype dtype, const Args& args, cudaStream_t stream);

}  // namespace anchor_kernels::hard_positive_cuda
