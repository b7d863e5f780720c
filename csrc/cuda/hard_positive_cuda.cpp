// Torch glue of the CUDA hard-positive selection kernel: argument checks (shared with the CPU
// kernel), the inverse norms (and, for bf16 / fp32 with normalisation, the overflow-safe copy
// of the rows: same cosines) from one launch, the int64 labels, the O(M k) scratch and
// outputs, and the launch on the current stream. Built only with a CUDA torch and toolkit;
// the kernel is in hard_positive_kernels.cu.
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
#include "rows_glue.h"

namespace anchor_kernels::hard_positive {
namespace {

namespace kc = anchor_kernels::hard_positive_cuda;

using cuda_glue::matrix;

std::tuple<at::Tensor, at::Tensor> hard_positive_cuda(const at::Tensor& z, const at::Tensor& labels,
                                                      const at::Tensor& c,
                                                      const at::Tensor& c_labels, int64_t k,
                                                      bool normalize,
                                                      std::optional<int64_t> anchor_offset) {
  const int64_t offset = check_args(z, labels, c, c_labels, k, anchor_offset);
  const kc::Dtype dtype = cuda_glue::kernel_dtype(z, "hard_positive", "z");
  cuda_glue::check_kernel_choice("hard_positive");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t M = z.size(0), N = c.size(0);
  at::Tensor idx = at::full({M, k}, -1, z.options().dtype(at::kLong));
  at::Tensor cos = at::full({M, k}, std::numeric_limits<float>::infinity(),
                            z.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return {idx, cos};
  const bool same = c.is_same(z);
  const at::Tensor lz = labels.to(at::kLong).contiguous();
  const at::Tensor lc = same ? lz : c_labels.to(at::kLong).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const cuda_glue::Rows rows = cuda_glue::row_norms(dtype, z, c, same, normalize, stream);
  const int64_t keff = std::min(k, N);
  at::Tensor keys = at::empty({M, keff}, z.options().dtype(at::kLong));
  kc::Args args{matrix(rows.f), matrix(rows.g), z.size(1), lz.data_ptr<int64_t>(),
                lc.data_ptr<int64_t>(), rows.inv(false), rows.inv(true), offset >= 0,
                offset >= 0 ? offset : 0, keff, keys.data_ptr<int64_t>(),
                idx.data_ptr<int64_t>(), cos.data_ptr<float>(), k};
  C10_CUDA_CHECK(kc::launch_hard_positive(dtype, args, stream));
  return {idx, cos};
}

}  // namespace
}  // namespace anchor_kernels::hard_positive

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("hard_positive", &anchor_kernels::hard_positive::hard_positive_cuda);
}
