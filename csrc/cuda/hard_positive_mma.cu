// Launcher of the tensor-core hard-positive selection kernel (hard_positive_mma.cuh). CUDA and
// CuTe headers only.
#include <cuda_runtime.h>

#include "hard_positive_mma.cuh"

namespace anchor_kernels::hard_positive_cuda {
namespace {

template <typename T>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  return supcon_cuda::mma::launch(mma::hard_positive_mma_kernel<T>, a.z.rows, mma::kRows, 1,
                                  int(sizeof(mma::Storage<T>)), stream, a);
}

}  // namespace

bool mma_supported(Dtype dtype, const Args& args) {
  return supcon_cuda::mma_supported(dtype, args.z, args.c, args.D);
}

cudaError_t launch_hard_positive_mma(Dtype dtype, const Args& args, cudaStream_t stream) {
  return supcon_cuda::mma::with_element_type(dtype, [&](auto t) { return launch<decltype(t)>(args, stream); });
}

}  // namespace anchor_kernels::hard_positive_cuda
