// Launchers of the CUDA similarity kernels (similarity_kernels.cu): raw pointers, sizes,
// strides and a stream, so that the kernels compile with CUDA headers only and the torch glue
// (similarity_cuda.cpp) stays small. See csrc/similarity.cpp for the maths.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "supcon_kernels.h"  // Dtype, Matrix

namespace anchor_kernels::similarity_cuda {

using supcon_cuda::Dtype;
using supcon_cuda::Matrix;

// S (M, N) in the input dtype, S_ij = (a_i . b_j) rna[i] rnb[j] inv_t, rows ld_s apart.
struct FwdArgs {
  Matrix a;          // (M, D)
  Matrix b;          // (N, D)
  int64_t D;
  const float* rna;  // (M,) 1 / max(||a_i||, eps), or ones
  const float* rnb;  // (N,)
  float inv_t;
  void* s;
  int64_t ld_s;
};

// dz (R, D) fp32 contiguous, dz_r = inv_t sum_q G(r, q) y_q rny[q], G(r, q) = g[r gr + q gq]
// in the input dtype: one side of the backward (da with G, db with G^T: swapped strides).
struct BwdArgs {
  const void* g;
  int64_t gr, gq;
  int64_t R;
  Matrix y;          // (Q, D)
  int64_t D;
  const float* rny;  // (Q,)
  float inv_t;
  float* dz;
  // The CuTe kernel only (bwd_splits): with splits > 1 the Q columns are split among that many
  // CTAs per row block, each writing its part of dz to its slice of dz (splits, R, D).
  int splits;
};

// bf16 / fp16 and TF32 (kTFloat32) inputs that the CuTe kernels take (mma_fwd_supported,
// mma_bwd_supported) run there; other bf16 / fp16 products run on the tensor cores through
// WMMA (fp32 accumulation) where the binary is built for sm_80 or newer, and as fp32 FMA
// elsewhere; other fp32 products take the FMA path.
cudaError_t launch_similarity_fwd(Dtype dtype, const FwdArgs& args, cudaStream_t stream);
cudaError_t launch_similarity_bwd(Dtype dtype, const BwdArgs& args, cudaStream_t stream);

// The CuTe tensor-core kernels (similarity_mma.cu): the rows as supcon_cuda::mma_supported
// takes them (bf16 / fp16, D <= 128 with D % 8 == 0, 16-byte rows; TF32 rows) and, for the
// backward, G contiguous along one dimension whose extent is a multiple of 8, 16-byte aligned
// (TF32: and 136 KiB of shared memory a CTA).
bool mma_fwd_supported(Dtype dtype, const FwdArgs& args);
bool mma_bwd_supported(Dtype dtype, const BwdArgs& args);
cudaError_t launch_similarity_fwd_mma(Dtype dtype, const FwdArgs& args, cudaStream_t stream);
cudaError_t launch_similarity_bwd_mma(Dtype dtype, const BwdArgs& args, cudaStream_t stream);
// BwdArgs::splits for a backward side: 1 unless it runs on the CuTe kernel with fewer 64-row
// blocks than two per SM (the loss's rule, supcon_cuda::mma::column_splits).
int bwd_splits(Dtype dtype, const BwdArgs& args);

}  // namespace anchor_kernels::similarity_cuda
