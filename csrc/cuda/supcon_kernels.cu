// Launchers of the CUDA SupCon kernels (kernels in supcon_kernels.cuh, interface in
// supcon_kernels.h). CUDA headers only, so that nvcc compiles it with no torch present.
#include <cuda_runtime.h>

#include "supcon_kernels.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

using detail::kBlock;
using detail::kThreads;
using detail::supcon_bwd_kernel;
using detail::supcon_fwd_kernel;

template <typename T, bool MMA>
cudaError_t fwd(const FwdArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.x.rows + kBlock - 1) / kBlock);
  supcon_fwd_kernel<T, MMA><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, bool MMA>
cudaError_t bwd(const BwdArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned((a.x.rows + kBlock - 1) / kBlock), unsigned((a.D + kBlock - 1) / kBlock));
  supcon_bwd_kernel<T, MMA><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_supcon_fwd(Dtype dtype, const FwdArgs& args, cudaStream_t stream) {
  if (args.x.rows == 0) return cudaSuccess;
  if (sm90_supported(dtype, args.x, args.y, args.D)) return launch_supcon_fwd_sm90(dtype, args, stream);
  if (mma_supported(dtype, args.x, args.y, args.D)) return launch_supcon_fwd_mma(dtype, args, stream);
  switch (dtype) {
    case Dtype::kFloat16:
      return fwd<__half, true>(args, stream);
    case Dtype::kBFloat16:
      return fwd<__nv_bfloat16, true>(args, stream);
    default:
      return fwd<float, false>(args, stream);
  }
}

cudaError_t launch_supcon_bwd(Dtype dtype, const BwdArgs& args, cudaStream_t stream) {
  if (args.x.rows == 0 || args.D == 0) return cudaSuccess;
  if (sm90_supported(dtype, args.x, args.y, args.D)) return launch_supcon_bwd_sm90(dtype, args, stream);
  if (mma_supported(dtype, args.x, args.y, args.D)) return launch_supcon_bwd_mma(dtype, args, stream);
  switch (dtype) {
    case Dtype::kFloat16:
      return bwd<__half, true>(args, stream);
    case Dtype::kBFloat16:
      return bwd<__nv_bfloat16, true>(args, stream);
    default:
      return bwd<float, false>(args, stream);
  }
}

}  // namespace anchor_kernels::supcon_cuda
