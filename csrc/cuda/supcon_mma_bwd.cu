// Launchers of the tensor-core SupCon backward (supcon_mma.cuh). CUDA and CuTe headers only.
#include <cuda_runtime.h>

#include "supcon_mma.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

using mma::launch;
using mma::kBwdRows;

template <typename T, int kMode>
cudaError_t bwd_sides(const BwdArgs& a, cudaStream_t stream) {
  constexpr int smem = mma::shared_bytes<kBwdRows, mma::bwd_cols<kMode>()>();
  if (a.outer && a.inner)
    return launch(mma::supcon_bwd_mma_kernel<T, kMode, mma::kBoth>, a.x.rows, kBwdRows, smem, stream, a);
  if (a.outer)
    return launch(mma::supcon_bwd_mma_kernel<T, kMode, mma::kOuter>, a.x.rows, kBwdRows, smem, stream, a);
  return launch(mma::supcon_bwd_mma_kernel<T, kMode, mma::kInner>, a.x.rows, kBwdRows, smem, stream, a);
}

template <typename T>
cudaError_t bwd(const BwdArgs& a, cudaStream_t stream) {
  switch (a.mode) {
    case kBwdLse:
      return bwd_sides<T, kBwdLse>(a, stream);
    case kBwdUniform:
      return bwd_sides<T, kBwdUniform>(a, stream);
    case kBwdSoftDetached:
      return bwd_sides<T, kBwdSoftDetached>(a, stream);
    default:
      return bwd_sides<T, kBwdSoftExact>(a, stream);
  }
}

}  // namespace

cudaError_t launch_supcon_bwd_mma(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  return dtype == Dtype::kFloat16 ? bwd<cute::half_t>(args, stream) : bwd<cute::bfloat16_t>(args, stream);
}

}  // namespace anchor_kernels::supcon_cuda
