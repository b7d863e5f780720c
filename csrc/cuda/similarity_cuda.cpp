// Torch glue of the CUDA similarity kernels: argument checks (shared with the CPU kernels),
// the O(M + N) inverse norms, the launches on the current stream, and the chain rule through
// the normalisation (O((M + N) D)). Built only with a CUDA torch and toolkit; the kernels are
// in similarity_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "similarity_args.h"
#include "similarity_kernels.h"

namespace anchor_kernels::similarity {
namespace {

namespace k = anchor_kernels::similarity_cuda;

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS

k::Dtype kernel_dtype(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return k::Dtype::kFloat16;
    case at::kBFloat16:
      return k::Dtype::kBFloat16;
    case at::kFloat:
      return k::Dtype::kFloat32;
    default:
      TORCH_CHECK(false, op, " (CUDA): a must be float32, bfloat16 or float16, got ",
                  x.scalar_type(), " (float64 runs on the cpu backend)");
  }
}

k::Matrix matrix(const at::Tensor& x) { return {x.data_ptr(), x.size(0), x.stride(0), x.stride(1)}; }

// (R,) float32 max(||x_r||, eps), or ones without normalisation.
at::Tensor clamped_norms(const at::Tensor& x, bool normalize) {
  if (!normalize) return at::ones({x.size(0)}, x.options().dtype(at::kFloat));
  return at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, false, at::kFloat).clamp_min(kNormEps);
}

// dx from dz (fp32): (dz - [||x|| > eps] z (z . dz)) / n with z = x / n, n = max(||x||, eps).
at::Tensor normalize_backward(const at::Tensor& x, const at::Tensor& n, const at::Tensor& dz,
                              bool normalize) {
  if (!normalize) return dz.to(x.scalar_type());
  const at::Tensor rn = n.reciprocal().unsqueeze(1);
  const at::Tensor z = x.to(at::kFloat) * rn;
  const at::Tensor proj = at::where((n > kNormEps).unsqueeze(1), (z * dz).sum(1, true), 0.0);
  return ((dz - proj * z) * rn).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_fwd_cuda(const at::Tensor& a,
                                                                   const at::Tensor& b,
                                                                   bool normalize,
                                                                   double temperature) {
  check_inputs("similarity_fwd", a, b, temperature);
  const k::Dtype dtype = kernel_dtype(a, "similarity_fwd");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor na = clamped_norms(a, normalize);
  at::Tensor nb = b.is_same(a) ? na.clone() : clamped_norms(b, normalize);
  const at::Tensor rna = na.reciprocal(), rnb = nb.reciprocal();
  at::Tensor s = at::empty({a.size(0), b.size(0)}, a.options());
  k::FwdArgs args{matrix(a), matrix(b), a.size(1), rna.data_ptr<float>(), rnb.data_ptr<float>(),
                  float(1.0 / temperature), s.data_ptr(), s.stride(0)};
  C10_CUDA_CHECK(k::launch_similarity_fwd(dtype, args, c10::cuda::getCurrentCUDAStream()));
  return {s, na, nb};
}

// dx for rows x (R, D) against y (Q, D) through G(r, q) = g[r gr + q gq].
at::Tensor side_backward(const at::Tensor& g, int64_t gr, int64_t gq, const at::Tensor& x,
                         const at::Tensor& y, const at::Tensor& nx, const at::Tensor& ny,
                         bool normalize, double temperature, k::Dtype dtype) {
  at::Tensor dz = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  const at::Tensor rny = ny.reciprocal();
  k::BwdArgs args{g.data_ptr(), gr, gq, x.size(0), matrix(y), x.size(1), rny.data_ptr<float>(),
                  float(1.0 / temperature), dz.data_ptr<float>()};
  C10_CUDA_CHECK(k::launch_similarity_bwd(dtype, args, c10::cuda::getCurrentCUDAStream()));
  return normalize_backward(x, nx, dz, normalize);
}

std::tuple<at::Tensor, at::Tensor> similarity_bwd_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                       const at::Tensor& b, const at::Tensor& na,
                                                       const at::Tensor& nb, bool normalize,
                                                       double temperature) {
  check_backward_inputs(grad, a, b, na, nb, temperature);
  const k::Dtype dtype = kernel_dtype(a, "similarity_bwd");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor g = grad.to(a.scalar_type());
  return {side_backward(g, g.stride(0), g.stride(1), a, b, na, nb, normalize, temperature, dtype),
          side_backward(g, g.stride(1), g.stride(0), b, a, nb, na, normalize, temperature, dtype)};
}

}  // namespace
}  // namespace anchor_kernels::similarity

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("similarity_fwd", &anchor_kernels::similarity::similarity_fwd_cuda);
  m.impl("similarity_bwd", &anchor_kernels::similarity::similarity_bwd_cuda);
}
