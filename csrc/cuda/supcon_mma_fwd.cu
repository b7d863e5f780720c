// Launchers of the tensor-core SupCon forward (supcon_mma.cuh) and the rule of which inputs
// the tensor-core kernels take. CUDA and CuTe headers only; the backward is in supcon_mma_bwd.cu
// (two files, so that the build compiles them in parallel).
#include <cuda_runtime.h>

#include <cstring>

#include "supcon_mma.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

using mma::kFwdRows;

// The forward on grid (row blocks, FwdArgs::splits), then with splits the merge of their
// statistics, one thread per row.
template <typename T>
cudaError_t fwd(const FwdArgs& a, cudaStream_t stream) {
  constexpr int smem = int(sizeof(mma::FwdStorage<T>));
  const int splits = a.splits > 1 ? a.splits : 1;
  return mma::dispatch_fwd(a, [&](auto mode, auto fixed) {
    constexpr int kMode = decltype(mode)::value;
    const cudaError_t err = mma::launch(mma::supcon_fwd_mma_kernel<T, kMode, decltype(fixed)::value>,
                                        a.x.rows, kFwdRows, splits, smem, stream, a);
    return err != cudaSuccess || splits == 1 ? err : mma::launch_fwd_merge<kMode>(a, stream);
  });
}


// cp.async moves 16-byte chunks of `chunk` elements: contiguous rows, 16-byte aligned starts.
bool rows_fit(const Matrix& m, int chunk) {
  return m.s1 == 1 && m.s0 % chunk == 0 && reinterpret_cast<uintptr_t>(m.data) % 16 == 0;
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
  if (dtype == Dtype::kFloat32) return false;
  const bool tf32 = dtype == Dtype::kTFloat32;
  const int chunk = tf32 ? mma::kChunk<cute::tfloat32_t> : mma::kChunk<cute::half_t>;
  return D > 0 && D <= mma::kD && D % chunk == 0 && rows_fit(x, chunk) && rows_fit(y, chunk) &&
         std::strcmp(cuda_kernels_choice(), "general") != 0 && device_has_mma_code() &&
         (!tf32 || mma::shared_memory_optin() >= mma::kTf32SharedBytes);
}

int fwd_splits(Dtype dtype, const FwdArgs& a) {
  if (a.x.rows == 0 || !mma_supported(dtype, a.x, a.y, a.D)) return 1;
  if (sm90_supported(dtype, a.x, a.y, a.D)) return sm90_fwd_splits(dtype, a);
  return mma::column_splits(a.x.rows, kFwdRows, a.y.rows, mma::kFwdCols);
}

cudaError_t launch_supcon_fwd_mma(Dtype dtype, const FwdArgs& args, cudaStream_t stream) {
  return mma::with_element_type(dtype, [&](auto t) { return fwd<decltype(t)>(args, stream); });
}

}  // namespace anchor_kernels::supcon_cuda
