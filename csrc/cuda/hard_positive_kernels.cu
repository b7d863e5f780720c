// Launcher of the CUDA hard-positive selection kernel (device code in
// hard_positive_kernels.cuh). CUDA headers only: compiles with `nvcc -arch=sm_90 -c`.
#include "hard_positive_kernels.cuh"

namespace anchor_kernels::hard_positive_cuda {

cudaError_t launch_hard_positive(Dtype dtype, const Args& args, cudaStream_t stream) {
  if (args.z.rows == 0 || args.c.rows == 0) return cudaSuccess;
  if (mma_supported(dtype, args)) return launch_hard_positive_mma(dtype, args, stream);
  const unsigned grid = unsigned((args.z.rows + detail::kBlock - 1) / detail::kBlock);
  switch (dtype) {
    case Dtype::kFloat32:
    case Dtype::kTFloat32:  // the TF32 product is the CuTe kernel's alone
      detail::hard_positive_kernel<float, false><<<grid, detail::kThreads, 0, stream>>>(args);
      break;
    case Dtype::kFloat16:
      detail::hard_positive_kernel<__half, true><<<grid, detail::kThreads, 0, stream>>>(args);
      break;
    case Dtype::kBFloat16:
      detail::hard_positive_kernel<__nv_bfloat16, true><<<grid, detail::kThreads, 0, stream>>>(args);
      break;
  }
  return cudaGetLastError();
}

}  // namespace anchor_kernels::hard_positive_cuda
