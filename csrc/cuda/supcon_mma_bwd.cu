// Launchers of the tensor-core SupCon backward (supcon_mma.cuh). CUDA and CuTe headers only.
#include <cuda_runtime.h>

#include "supcon_mma.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

using mma::launch;
using mma::kBwdRows;

template <typename T>
cudaError_t bwd(const BwdArgs& a, cudaStream_t stream) {
  return mma::dispatch_bwd(a, [&](auto mode, auto sides) {
    constexpr int kMode = decltype(mode)::value;
    constexpr int smem = mma::shared_bytes<kBwdRows, mma::bwd_cols<kMode>()>();
    return launch(mma::supcon_bwd_mma_kernel<T, kMode, decltype(sides)::value>, a.x.rows, kBwdRows,
                  a.splits, smem, stream, a);
  });
}

}  // namespace

int bwd_splits(Dtype dtype, const BwdArgs& a) {
  if (a.x.rows == 0 || sm90_supported(dtype, a.x, a.y, a.D) || !mma_bwd_supported(dtype, a.x, a.y, a.D))
    return 1;
  const int cols = mma::bwd_cols(a.mode);
  return mma::column_splits((a.x.rows + kBwdRows - 1) / kBwdRows, (a.y.rows + cols - 1) / cols);
}

cudaError_t launch_supcon_bwd_mma(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  return dtype == Dtype::kFloat16 ? bwd<cute::half_t>(args, stream) : bwd<cute::bfloat16_t>(args, stream);
}

}  // namespace anchor_kernels::supcon_cuda
