// Launcher of the Hopper SupCon backward (supcon_sm90.cuh). CUDA and CuTe headers only.
#include <cuda_runtime.h>

#include "supcon_sm90.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

template <typename T>
cudaError_t bwd(const BwdArgs& a, cudaStream_t stream) {
  return mma::dispatch_bwd(a, [&](auto mode, auto sides) {
    constexpr int kMode = decltype(mode)::value;
    return sm90::launch<sm90::BwdStorage<T, kMode>>(
        sm90::supcon_bwd_sm90_kernel<T, kMode, decltype(sides)::value>, a,
        sm90::tma_rows<T, sm90::kM>(a.x, int(a.D)),
        sm90::tma_rows<T, sm90::bwd_cols<T>(kMode)>(a.y, int(a.D)), a.splits, stream);
  });
}

}  // namespace

int sm90_bwd_splits(Dtype dtype, const BwdArgs& a) {
  const int cols = dtype == Dtype::kTFloat32 ? sm90::bwd_cols<cute::tfloat32_t>(a.mode)
                                             : sm90::bwd_cols<cute::half_t>(a.mode);
  return mma::column_splits(a.x.rows, sm90::kM, a.y.rows, cols);
}

cudaError_t launch_supcon_bwd_sm90(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  return mma::with_element_type(dtype, [&](auto t) { return bwd<decltype(t)>(args, stream); });
}

}  // namespace anchor_kernels::supcon_cuda
