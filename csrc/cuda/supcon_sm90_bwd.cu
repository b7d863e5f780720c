// Launcher of the Hopper SupCon backward (supcon_sm90.cuh). CUDA and CuTe headers only.
#include <cuda_runtime.h>

#include "supcon_sm90.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

template <typename T, int kMode, int kSides>
cudaError_t bwd_kernel(const BwdArgs& a, cudaStream_t stream) {
  return sm90::launch<sm90::BwdStorage<T, kMode>>(
      sm90::supcon_bwd_sm90_kernel<T, kMode, kSides>, a, sm90::make_tma_rows<T, sm90::kM>(a.x, int(a.D)),
      sm90::make_tma_rows<T, sm90::bwd_cols<kMode>()>(a.y, int(a.D)), stream);
}

template <typename T, int kMode>
cudaError_t bwd_sides(const BwdArgs& a, cudaStream_t stream) {
  if (a.outer && a.inner) return bwd_kernel<T, kMode, mma::kBoth>(a, stream);
  if (a.outer) return bwd_kernel<T, kMode, mma::kOuter>(a, stream);
  return bwd_kernel<T, kMode, mma::kInner>(a, stream);
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

cudaError_t launch_supcon_bwd_sm90(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  return dtype == Dtype::kFloat16 ? bwd<cute::half_t>(args, stream) : bwd<cute::bfloat16_t>(args, stream);
}

}  // namespace anchor_kernels::supcon_cuda
