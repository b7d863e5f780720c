// Launcher of the tensor-core SupCon backward's TF32 variants (supcon_mma.cuh): a file of their
// own, so that the build compiles them beside the 16-bit ones (supcon_mma_bwd.cu).
#include <cuda_runtime.h>

#include "supcon_mma.cuh"

namespace anchor_kernels::supcon_cuda {

cudaError_t launch_supcon_bwd_mma_tf32(const BwdArgs& args, cudaStream_t stream) {
  return mma::launch_bwd<cute::tfloat32_t>(args, stream);
}

}  // namespace anchor_kernels::supcon_cuda
