// Launchers of the SupCon loss's O(M + N) passes (kernels in supcon_rows.cuh, interface in
// supcon_kernels.h). CUDA headers only.
#include <cuda_runtime.h>

#include "supcon_rows.cuh"

namespace anchor_kernels::supcon_cuda {
namespace {

using detail::kNormRows;
using detail::kThreads;

template <typename T>
cudaError_t row_norms(const RowNormArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.x.rows + a.y.rows + kNormRows - 1) / kNormRows);
  detail::row_norms_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t norm_backward(const NormBwdArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.x.rows + kNormRows - 1) / kNormRows);
  detail::norm_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_norms(Dtype dtype, const RowNormArgs& args, cudaStream_t stream) {
  if (args.x.rows + args.y.rows == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kFloat16:
      return row_norms<__half>(args, stream);
    case Dtype::kBFloat16:
      return row_norms<__nv_bfloat16>(args, stream);
    default:
      return row_norms<float>(args, stream);
  }
}

cudaError_t launch_norm_backward(Dtype dtype, const NormBwdArgs& args, cudaStream_t stream) {
  if (args.x.rows == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kFloat16:
      return norm_backward<__half>(args, stream);
    case Dtype::kBFloat16:
      return norm_backward<__nv_bfloat16>(args, stream);
    default:
      return norm_backward<float>(args, stream);
  }
}

cudaError_t launch_loss_reduce(const LossReduceArgs& args, cudaStream_t stream) {
  detail::loss_reduce_kernel<<<1, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_anchor_stage(const AnchorStageArgs& args, cudaStream_t stream) {
  detail::anchor_stage_kernel<<<1, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace anchor_kernels::supcon_cuda
