// Argument checks of the hard_positive op, shared by the CPU kernel and the CUDA glue, so that
// a direct call of torch.ops.anchor_kernels.hard_positive gets an error naming the tensor and
// the shape it should have, whichever device runs it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace anchor_kernels::hard_positive {

inline void check_labels(const char* name, const at::Tensor& y, int64_t n, const char* what,
                         const at::Tensor& like) {
  TORCH_CHECK(y.dim() == 1 && y.size(0) == n, "hard_positive: ", name, " must have shape (", n,
              ",) to match ", what, ", got ", y.sizes());
  TORCH_CHECK(at::isIntegralType(y.scalar_type(), /*includeBool=*/false), "hard_positive: ", name,
              " must hold integer class labels, got ", y.scalar_type());
  TORCH_CHECK(y.device() == like.device(), "hard_positive: ", name, " is on ", y.device(),
              " but z is on ", like.device());
}

// The self-column offset (-1: no self column).
inline int64_t check_args(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& c,
                          const at::Tensor& c_labels, int64_t k,
                          std::optional<int64_t> anchor_offset) {
  const auto t = z.scalar_type();
  TORCH_CHECK(z.dim() == 2, "hard_positive: z must be 2-D (M, D), got shape ", z.sizes());
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "hard_positive: z must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(c.dim() == 2 && c.size(1) == z.size(1), "hard_positive: c must have shape (N, ",
              z.size(1), ") to match z's D, got ", c.sizes());
  TORCH_CHECK(c.scalar_type() == t, "hard_positive: c has dtype ", c.scalar_type(), " but z has ",
              t);
  TORCH_CHECK(c.device() == z.device(), "hard_positive: c is on ", c.device(), " but z is on ",
              z.device());
  check_labels("labels", labels, z.size(0), "z's rows", z);
  check_labels("c_labels", c_labels, c.size(0), "c's rows", z);
  TORCH_CHECK(k >= 1, "hard_positive: k must be >= 1, got ", k);
  if (!anchor_offset.has_value()) return -1;
  const int64_t offset = *anchor_offset;
  TORCH_CHECK(offset >= 0 && offset + z.size(0) <= c.size(0), "hard_positive: anchor_offset=",
              offset, " puts the ", z.size(0), " anchors outside the ", c.size(0), " rows of c");
  return offset;
}

}  // namespace anchor_kernels::hard_positive
