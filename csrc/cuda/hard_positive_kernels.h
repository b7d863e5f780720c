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

cudaError_t launch_hard_positive(Dtype dtype, const Args& args, cudaStream_t stream);

}  // namespace anchor_kernels::hard_positive_cuda
