// Runs the CUDA similarity kernels (csrc/cuda/similarity_kernels.cuh) under the host emulation
// of cuda_host_shim.h, with the block runner of emulator.cpp (included: its helpers have
// internal linkage); loaded with ctypes by similarity_emulated.py.
#include "emulator.cpp"

#include "cuda/similarity_kernels.cuh"

namespace sim = anchor_kernels::similarity_cuda;

// dtype: 0 float32, 1 float16, 2 bfloat16 (the half types take their tensor-core kernels,
// which compile to the FMA path here). order: 0 ascending threads, 1 descending.
extern "C" int emu_similarity_fwd(int dtype, const sim::FwdArgs* a, int order) {
  const unsigned gx = unsigned((a->a.rows + dt::kBlock - 1) / dt::kBlock);
  const unsigned gy = unsigned((a->b.rows + dt::kBlock - 1) / dt::kBlock);
  switch (dtype) {
    case 1:
      return run_grid(&sim::detail::similarity_fwd_kernel<__half, true>, *a, gx, gy, order);
    case 2:
      return run_grid(&sim::detail::similarity_fwd_kernel<__nv_bfloat16, true>, *a, gx, gy, order);
    default:
      return run_grid(&sim::detail::similarity_fwd_kernel<float, false>, *a, gx, gy, order);
  }
}

extern "C" int emu_similarity_bwd(int dtype, const sim::BwdArgs* a, int order) {
  const unsigned gx = unsigned((a->R + dt::kBlock - 1) / dt::kBlock);
  const unsigned gy = unsigned((a->D + dt::kBlock - 1) / dt::kBlock);
  switch (dtype) {
    case 1:
      return run_grid(&sim::detail::similarity_bwd_kernel<__half, true>, *a, gx, gy, order);
    case 2:
      return run_grid(&sim::detail::similarity_bwd_kernel<__nv_bfloat16, true>, *a, gx, gy, order);
    default:
      return run_grid(&sim::detail::similarity_bwd_kernel<float, false>, *a, gx, gy, order);
  }
}

extern "C" int emu_sizeof_similarity_args(int which) {
  return which == 0 ? int(sizeof(sim::FwdArgs)) : int(sizeof(sim::BwdArgs));
}
