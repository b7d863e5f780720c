// Launchers of the tensor-core similarity kernels (similarity_mma.cuh) and the rule of which
// inputs they take. CUDA and CuTe headers only.
#include <cuda_runtime.h>

#include "similarity_mma.cuh"

namespace anchor_kernels::similarity_cuda {
namespace {

using supcon_cuda::mma::launch;

// Column groups of the forward's grid: each CTA streams span tiles of b, so that it reads its
// rows of a once for more columns, doubling span up to kMaxSpan while the grid keeps 1024 CTAs
// (several waves on any GPU; fewer would leave SMs idle), and at most 65535 groups.
unsigned column_groups(int64_t row_blocks, int64_t tiles) {
  int64_t span = 1;
  while (span < mma::kMaxSpan && row_blocks * ((tiles + 2 * span - 1) / (2 * span)) >= 1024) span *= 2;
  while ((tiles + span - 1) / span > 65535) span *= 2;
  return unsigned((tiles + span - 1) / span);
}

// G (R, Q) read by cp.async: contiguous along one dimension (G^T in memory: along R), whose
// extent is a multiple of 8 (no chunk of 8 straddles its end), the other stride too, and a
// 16-byte aligned start.
bool g_fits(const BwdArgs& a, bool transposed) {
  const int64_t extent = transposed ? a.R : a.y.rows, unit = transposed ? a.gr : a.gq;
  const int64_t ld = transposed ? a.gq : a.gr;
  return unit == 1 && extent % 8 == 0 && ld % 8 == 0 && reinterpret_cast<uintptr_t>(a.g) % 16 == 0;
}

template <typename T>
cudaError_t fwd(const FwdArgs& a, cudaStream_t stream) {
  const int64_t row_blocks = (a.a.rows + mma::kFwdRows - 1) / mma::kFwdRows;
  const int groups = int(column_groups(row_blocks, (a.b.rows + mma::kCols - 1) / mma::kCols));
  return launch(mma::similarity_fwd_mma_kernel<T>, a.a.rows, mma::kFwdRows, groups,
                int(sizeof(mma::FwdStorage<T>)), stream, a);
}

template <typename T>
constexpr int bwd_shared_bytes() {
  return int(std::is_same_v<T, cute::tfloat32_t> ? sizeof(mma::BwdStorageTf32) : sizeof(mma::BwdStorage));
}

template <typename T>
cudaError_t bwd(const BwdArgs& a, bool transposed, cudaStream_t stream) {
  constexpr int smem = bwd_shared_bytes<T>();
  return launch(transposed ? mma::similarity_bwd_mma_kernel<T, true> : mma::similarity_bwd_mma_kernel<T, false>,
                a.R, mma::kBwdRows, a.splits, smem, stream, a);
}

}  // namespace

bool mma_fwd_supported(Dtype dtype, const FwdArgs& a) {
  return supcon_cuda::mma_supported(dtype, a.a, a.b, a.D);
}

bool mma_bwd_supported(Dtype dtype, const BwdArgs& a) {
  // TF32 rows: where the device grants the TF32 kernel's shared memory besides.
  return supcon_cuda::mma_supported(dtype, a.y, a.y, a.D) && (g_fits(a, false) || g_fits(a, true)) &&
         (dtype != Dtype::kTFloat32 ||
          supcon_cuda::mma::shared_memory_optin() >= bwd_shared_bytes<cute::tfloat32_t>());
}

int bwd_splits(Dtype dtype, const BwdArgs& a) {
  if (a.R == 0 || a.D == 0 || !mma_bwd_supported(dtype, a)) return 1;
  return supcon_cuda::mma::column_splits(a.R, mma::kBwdRows, a.y.rows, mma::kCols);
}

cudaError_t launch_similarity_fwd_mma(Dtype dtype, const FwdArgs& args, cudaStream_t stream) {
  return supcon_cuda::mma::with_element_type(dtype, [&](auto t) { return fwd<decltype(t)>(args, stream); });
}

cudaError_t launch_similarity_bwd_mma(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  const bool transposed = !g_fits(args, false);
  return supcon_cuda::mma::with_element_type(dtype, [&](auto t) { return bwd<decltype(t)>(args, transposed, stream); });
}

}  // namespace anchor_kernels::similarity_cuda
