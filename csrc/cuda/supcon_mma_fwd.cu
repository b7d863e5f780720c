// Launchers of the tensor-core SupCon forward (supcon_mma.cuh) and the rule of which inputs
// the tensor-core kernels take. CUDA and CuTe headers only; the backward is in supcon_mma_bwd.cu
// (two files, so that the build compiles them in parallel).
#include <cuda_runtime.h>

#include <cstring>

#include "supcon_mma.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

using mma::launch;
using mma::kFwdRows;

template <typename T>
cudaError_t fwd(const FwdArgs& a, cudaStream_t stream) {
  constexpr int smem = mma::shared_bytes<kFwdRows, mma::kFwdCols>();
  return mma::dispatch_fwd(a, [&](auto mode, auto fixed) {
    return launch(mma::supcon_fwd_mma_kernel<T, decltype(mode)::value, decltype(fixed)::value>,
                  a.x.rows, kFwdRows, smem, stream, a);
  });
}

bool rows_fit(const Matrix& m) {
  // cp.async moves 16-byte chunks of 8 elements: contiguous rows, 16-byte aligned starts.
  return m.s1 == 1 && m.s0 % 8 == 0 && reinterpret_cast<uintptr_t>(m.data) % 16 == 0;
}

// Whether the binary holds sm_80+ code for the current device (the kernels compile to an empty
// body for older targets).
bool device_has_mma_code() {
  return mma::once_per_device([](int) {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, mma::supcon_fwd_mma_kernel<cute::bfloat16_t, kFwdLse, false>) ==
               cudaSuccess &&
           attr.binaryVersion >= 80;
  });
}

}  // namespace

bool mma_supported(Dtype dtype, const Matrix& x, const Matrix& y, int64_t D) {
  return dtype != Dtype::kFloat32 && D > 0 && D <= mma::kD && D % 8 == 0 && rows_fit(x) &&
         rows_fit(y) && std::strcmp(cuda_kernels_choice(), "general") != 0 && device_has_mma_code();
}

cudaError_t launch_supcon_fwd_mma(Dtype dtype, const FwdArgs& args, cudaStream_t stream) {
  return dtype == Dtype::kFloat16 ? fwd<cute::half_t>(args, stream) : fwd<cute::bfloat16_t>(args, stream);
}

}  // namespace anchor_kernels::supcon_cuda
