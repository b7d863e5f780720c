// Launchers of the tensor-core SupCon backward (supcon_mma.cuh). CUDA and CuTe headers only;
// the TF32 variants are in supcon_mma_bwd_tf32.cu (the build compiles the files in parallel).
#include <cuda_runtime.h>

#include "supcon_mma.cuh"

namespace anchor_kernels::supcon_cuda {

int bwd_splits(Dtype dtype, const BwdArgs& a) {
  if (a.x.rows == 0 || !mma_supported(dtype, a.x, a.y, a.D)) return 1;
  if (sm90_supported(dtype, a.x, a.y, a.D)) return sm90_bwd_splits(dtype, a);
  const int cols = mma::bwd_cols(a.mode);
  return mma::column_splits(a.x.rows, mma::kBwdRows, a.y.rows, cols);
}

cudaError_t launch_supcon_bwd_mma(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat16:
      return mma::launch_bwd<cute::half_t>(args, stream);
    case Dtype::kTFloat32:
      return launch_supcon_bwd_mma_tf32(args, stream);
    default:
      return mma::launch_bwd<cute::bfloat16_t>(args, stream);
  }
}

}  // namespace anchor_kernels::supcon_cuda
