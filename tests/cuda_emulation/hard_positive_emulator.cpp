// Runs the CUDA hard-positive selection kernel (csrc/cuda/hard_positive_kernels.cuh) under the
// host emulation of cuda_host_shim.h, with the block runner of emulator.cpp (included: its
// helpers have internal linkage); loaded with ctypes by hard_positive_emulated.py.
#include "emulator.cpp"

#include "cuda/hard_positive_kernels.cuh"

namespace hp = anchor_kernels::hard_positive_cuda;

// dtype: 0 float32, 1 float16, 2 bfloat16; order: 0 ascending threads, 1 descending.
extern "C" int emu_hard_positive(int dtype, const hp::Args* a, int order) {
  const unsigned gx = unsigned((a->z.rows + dt::kBlock - 1) / dt::kBlock);
  switch (dtype) {
    case 1:
      return run_grid(&hp::detail::hard_positive_kernel<__half, true>, *a, gx, 1, order);
    case 2:
      return run_grid(&hp::detail::hard_positive_kernel<__nv_bfloat16, true>, *a, gx, 1, order);
    default:
      return run_grid(&hp::detail::hard_positive_kernel<float, false>, *a, gx, 1, order);
  }
}

extern "C" int emu_sizeof_hard_positive_args() { return int(sizeof(hp::Args)); }
