// Torch glue of the CUDA hard-positive selection kernel: argument checks (shared with the CPU
// kernel), the O(M + N) inverse norms and int64 labels, the O(M k) scratch and outputs, and the
// launch on the current stream. Built only with a CUDA torch and toolkit; the kernel is in
// hard_positive_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "hard_positive_args.h"
#include "hard_positive_kernels.h"

namespace anchor_kernels::hard_positive {
namespace {

namespace kc = anchor_kernels::hard_positive_cuda;

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS

kc::Matrix matrix(const at::Tensor& x) { return {x.data_ptr(), x.size(0), x.stride(0), x.stride(1)}; }

at::Tensor inv_norms(const at::Tensor& x, bool normalize) {
  if (!normalize) return at::ones({x.size(0)}, x.options().dtype(at::kFloat));
  return at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, false, at::kFloat)
      .clamp_min(kNormEps)
      .reciprocal();
}

std::tuple<at::Tensor, at::Tensor> hard_positive_cuda(const at::Tensor& z, const at::Tensor& labels,
                                                      const at::Tensor& c,
                                                      const at::Tensor& c_labels, int64_t k,
                                                      bool normalize,
                                                      std::optional<int64_t> anchor_offset) {
  const int64_t offset = check_args(z, labels, c, c_labels, k, anchor_offset);
  kc::Dtype dtype;
  switch (z.scalar_type()) {
    case at::kHalf:
      dtype = kc::Dtype::kFloat16;
      break;
    case at::kBFloat16:
      dtype = kc::Dtype::kBFloat16;
      break;
    case at::kFloat:
      dtype = kc::Dtype::kFloat32;
      break;
    default:
      TORCH_CHECK(false, "hard_positive (CUDA): z must be float32, bfloat16 or float16, got ",
                  z.scalar_type(), " (float64 runs on the cpu backend)");
  }
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t M = z.size(0), N = c.size(0);
  at::Tensor idx = at::full({M, k}, -1, z.options().dtype(at::kLong));
  at::Tensor cos = at::full({M, k}, std::numeric_limits<float>::infinity(),
                            z.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return {idx, cos};
  const bool same = c.is_same(z);
  const at::Tensor lz = labels.to(at::kLong).contiguous();
  const at::Tensor lc = same ? lz : c_labels.to(at::kLong).contiguous();
  const at::Tensor rz = inv_norms(z, normalize);
  const at::Tensor rc = same ? rz : inv_norms(c, normalize);
  const int64_t keff = std::min(k, N);
  at::Tensor keys = at::empty({M, keff}, z.options().dtype(at::kLong));
  kc::Args args{matrix(z), matrix(c), z.size(1), lz.data_ptr<int64_t>(), lc.data_ptr<int64_t>(),
                rz.data_ptr<float>(), rc.data_ptr<float>(), offset >= 0,
                offset >= 0 ? offset : 0, keff, keys.data_ptr<int64_t>(),
                idx.data_ptr<int64_t>(), cos.data_ptr<float>(), k};
  C10_CUDA_CHECK(kc::launch_hard_positive(dtype, args, c10::cuda::getCurrentCUDAStream()));
  return {idx, cos};
}

}  // namespace
}  // namespace anchor_kernels::hard_positive

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("hard_positive", &anchor_kernels::hard_positive::hard_positive_cuda);
}
