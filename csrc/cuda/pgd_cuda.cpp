// Torch glue of the CUDA PGD kernels (csrc/cuda/pgd_kernels.cu): argument checks, device guard,
// current stream, and the CUDA implementations of the anchor_kernels::pgd_* ops (schemas in
// csrc/pgd.cpp). Built only when torch is a CUDA build and a CUDA toolkit is found.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "pgd_args.h"

namespace anchor_kernels::pgd::cuda {

cudaError_t launch_step(int dtype, void* xa, const void* g, const void* x, const void* eps_p,
                        const void* alpha_p, double eps, double alpha, double lo, double hi,
                        int64_t n, int64_t inner, cudaStream_t stream);
cudaError_t launch_random_start(int dtype, void* out, const void* x, const void* eps_p,
                                double eps, uint64_t seed, double lo, double hi, int64_t n,
                                int64_t inner, cudaStream_t stream);

namespace {

// The dtype codes of pgd_kernels.cu.
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    case at::kDouble:
      return 3;
    default:
      break;
  }
  TORCH_CHECK(false, "pgd: unsupported dtype ", t);
  return -1;
}

const void* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x,
                   const std::optional<at::Tensor>& eps_t, const std::optional<at::Tensor>& alpha_t,
                   double eps, double alpha, double lo, double hi) {
  check_cuda(x_adv, "pgd_step", "x_adv");
  const Sizes s = check_step_args(x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi);
  if (s.n == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const cudaError_t err = launch_step(
      dtype_code(x_adv.scalar_type()), x_adv.data_ptr(), grad.data_ptr(), x.data_ptr(),
      optional_ptr(eps_t), optional_ptr(alpha_t), eps, alpha, lo, hi, s.n, s.inner,
      c10::cuda::getCurrentCUDAStream(x_adv.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "pgd_step: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void pgd_random_start_cuda(const at::Tensor& out, const at::Tensor& x,
                           const std::optional<at::Tensor>& eps_t, double eps, int64_t seed,
                           double lo, double hi) {
  check_cuda(x, "pgd_random_start", "x");
  const Sizes s = check_random_start_args(out, x, eps_t, eps, seed, lo, hi);
  if (s.n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = launch_random_start(
      dtype_code(x.scalar_type()), out.data_ptr(), x.data_ptr(), optional_ptr(eps_t), eps,
      static_cast<uint64_t>(seed), lo, hi, s.n, s.inner,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "pgd_random_start: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace
}  // namespace anchor_kernels::pgd::cuda

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("pgd_step", &anchor_kernels::pgd::cuda::pgd_step_cuda);
  m.impl("pgd_random_start", &anchor_kernels::pgd::cuda::pgd_random_start_cuda);
}
