// Torch glue of the CUDA similarity kernels: argument checks (shared with the CPU kernels),
// the row norms (and, for bf16 / fp32 with normalisation, the overflow-safe copy of the rows)
// from one launch each way, the similarity launches on the current stream, and the chain rule
// through the normalisation (O((M + N) D)). Built only with a CUDA torch and toolkit; the
// kernels are in similarity_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "rows_glue.h"
#include "similarity_args.h"
#include "similarity_kernels.h"

namespace anchor_kernels::similarity {
namespace {

namespace k = anchor_kernels::similarity_cuda;

using cuda_glue::kernel_dtype;
using cuda_glue::matrix;
using cuda_glue::row_norms;
using cuda_glue::Rows;

// S from the rows the kernel reads (Rows::f, Rows::g: overflow-safe where needed, same S): two
// launches.
at::Tensor similarity_fwd_cuda(const at::Tensor& a, const at::Tensor& b, bool normalize,
                               double temperature) {
  check_inputs("similarity_fwd", a, b, temperature);
  cuda_glue::check_kernel_choice("similarity_fwd");
  const k::Dtype dtype = kernel_dtype(a, "similarity_fwd", "a");
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Rows rows = row_norms(dtype, a, b, b.is_same(a), normalize, stream);
  at::Tensor s = at::empty({a.size(0), b.size(0)}, a.options());
  k::FwdArgs args{matrix(rows.f), matrix(rows.g), a.size(1), rows.inv(false), rows.inv(true),
                  float(1.0 / temperature), s.data_ptr(), s.stride(0)};
  C10_CUDA_CHECK(k::launch_similarity_fwd(dtype, args, stream));
  return s;
}

// dx for the rows x of `rows` (of_b: b's) against the others, through G(r, q) = g[r gr + q gq].
at::Tensor side_backward(const at::Tensor& g, int64_t gr, int64_t gq, const Rows& rows, bool of_b,
                         bool normalize, double temperature, k::Dtype dtype, cudaStream_t stream) {
  const at::Tensor& x = of_b ? rows.g : rows.f;
  const at::Tensor& y = of_b ? rows.f : rows.g;
  k::BwdArgs args{g.data_ptr(), gr, gq, x.size(0), matrix(y), x.size(1), rows.inv(!of_b),
                  float(1.0 / temperature), nullptr, 1};
  args.splits = k::bwd_splits(dtype, args);  // > 1: dz in slices, summed by the chain rule
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor dz = args.splits > 1 ? at::empty({args.splits, x.size(0), x.size(1)}, fopts)
                                  : at::empty({x.size(0), x.size(1)}, fopts);
  args.dz = dz.data_ptr<float>();
  C10_CUDA_CHECK(k::launch_similarity_bwd(dtype, args, stream));
  return cuda_glue::normalize_backward(dtype, x, rows.norms(of_b), rows.prescale(of_b), dz,
                                       normalize, stream);
}

// The forward's rows and norms again (one launch), then one kernel per side.
std::tuple<at::Tensor, at::Tensor> similarity_bwd_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                       const at::Tensor& b, bool normalize,
                                                       double temperature) {
  check_backward_inputs(grad, a, b, temperature);
  cuda_glue::check_kernel_choice("similarity_bwd");
  const k::Dtype dtype = kernel_dtype(a, "similarity_bwd", "a");
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Rows rows = row_norms(dtype, a, b, false, normalize, stream);
  const at::Tensor g = grad.to(a.scalar_type());
  return {side_backward(g, g.stride(0), g.stride(1), rows, false, normalize, temperature, dtype, stream),
          side_backward(g, g.stride(1), g.stride(0), rows, true, normalize, temperature, dtype, stream)};
}

}  // namespace
}  // namespace anchor_kernels::similarity

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("similarity_fwd", &anchor_kernels::similarity::similarity_fwd_cuda);
  m.impl("similarity_bwd", &anchor_kernels::similarity::similarity_bwd_cuda);
}
