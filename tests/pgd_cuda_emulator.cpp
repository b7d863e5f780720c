// Runs the CUDA PGD kernels (csrc/cuda/pgd_kernels.cuh) on the host, thread by thread, so that
// their device code (vector and scalar paths, tails, grid-stride loops, per-sample walks,
// conversions, Philox) is checked on a machine with no GPU. The kernels use no shared memory
// and no barriers, so running each thread of each block to completion in turn is exact.
// Loaded with ctypes by tests/test_pgd.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

struct EmuIndex {
  unsigned x = 0, y = 0, z = 0;
};
static EmuIndex threadIdx, blockIdx, gridDim;

// Correctly rounded single operations; the host build has no FMA contraction (no -mfma).
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }

#include "cuda/pgd_kernels.cuh"

namespace {

using namespace anchor_kernels::pgd::cuda;

template <typename Kernel>
void run_grid(unsigned grid, Kernel&& kernel) {
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    for (int t = 0; t < kThreads; ++t) {
      threadIdx.x = unsigned(t);
      kernel();
    }
  }
}

template <typename T, typename I>
void step_typed(void* xa, const void* g, const void* x, const void* eps_p, const void* alpha_p,
                double eps, double alpha, double lo, double hi, int64_t n, int64_t inner,
                bool vec, unsigned grid) {
  using A = typename Num<T>::acc;
  auto args = [&](auto kernel) {
    run_grid(grid, [&] {
      kernel(static_cast<T*>(xa), static_cast<const T*>(g), static_cast<const T*>(x),
             static_cast<const A*>(eps_p), static_cast<const A*>(alpha_p), A(eps), A(alpha), A(lo),
             A(hi), I(n), I(inner), vec);
    });
  };
  if (eps_p && alpha_p) args(step_kernel<T, true, true, I>);
  else if (eps_p) args(step_kernel<T, true, false, I>);
  else if (alpha_p) args(step_kernel<T, false, true, I>);
  else args(step_kernel<T, false, false, I>);
}

template <typename T, typename I>
void start_typed(void* out, const void* x, const void* eps_p, double eps, uint64_t seed,
                 double lo, double hi, int64_t n, int64_t inner, bool vec, unsigned grid) {
  using A = typename Num<T>::acc;
  auto args = [&](auto kernel) {
    run_grid(grid, [&] {
      kernel(static_cast<T*>(out), static_cast<const T*>(x), static_cast<const A*>(eps_p),
             A(eps), seed, A(lo), A(hi), I(n), I(inner), vec);
    });
  };
  if (eps_p) args(random_start_kernel<T, true, I>);
  else args(random_start_kernel<T, false, I>);
}

template <typename I>
void step_dispatch(int dtype, void* xa, const void* g, const void* x, const void* eps_p,
                   const void* alpha_p, double eps, double alpha, double lo, double hi, int64_t n,
                   int64_t inner, bool vec, unsigned grid) {
  switch (dtype) {
    case 0: step_typed<float, I>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, vec, grid); break;
    case 1: step_typed<__half, I>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, vec, grid); break;
    case 2: step_typed<__nv_bfloat16, I>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, vec, grid); break;
    case 3: step_typed<double, I>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, vec, grid); break;
  }
}

template <typename I>
void start_dispatch(int dtype, void* out, const void* x, const void* eps_p, double eps,
                    uint64_t seed, double lo, double hi, int64_t n, int64_t inner, bool vec,
                    unsigned grid) {
  switch (dtype) {
    case 0: start_typed<float, I>(out, x, eps_p, eps, seed, lo, hi, n, inner, vec, grid); break;
    case 1: start_typed<__half, I>(out, x, eps_p, eps, seed, lo, hi, n, inner, vec, grid); break;
    case 2: start_typed<__nv_bfloat16, I>(out, x, eps_p, eps, seed, lo, hi, n, inner, vec, grid); break;
    case 3: start_typed<double, I>(out, x, eps_p, eps, seed, lo, hi, n, inner, vec, grid); break;
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float16, 2 bfloat16, 3 float64 (the codes of pgd_kernels.cu).
void emu_pgd_step(int dtype, void* xa, const void* g, const void* x, const void* eps_p,
                  const void* alpha_p, double eps, double alpha, double lo, double hi, int64_t n,
                  int64_t inner, bool vec, unsigned grid, bool index64) {
  if (index64) step_dispatch<int64_t>(dtype, xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, vec, grid);
  else step_dispatch<int32_t>(dtype, xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, vec, grid);
}

void emu_pgd_random_start(int dtype, void* out, const void* x, const void* eps_p, double eps,
                          uint64_t seed, double lo, double hi, int64_t n, int64_t inner, bool vec,
                          unsigned grid, bool index64) {
  if (index64) start_dispatch<int64_t>(dtype, out, x, eps_p, eps, seed, lo, hi, n, inner, vec, grid);
  else start_dispatch<int32_t>(dtype, out, x, eps_p, eps, seed, lo, hi, n, inner, vec, grid);
}

}  // extern "C"
