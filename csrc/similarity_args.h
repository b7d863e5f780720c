// Argument checks of the similarity ops, shared by the CPU kernels and the CUDA glue, so that a
// direct call of torch.ops.anchor_kernels.similarity_fwd / similarity_bwd gets an error naming
// the tensor and the shape it should have, whichever device runs it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace anchor_kernels::similarity {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_inputs(const char* op, const at::Tensor& a, const at::Tensor& b,
                         double temperature) {
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D (M, D), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(1) == a.size(1), op, ": b must have shape (N, ", a.size(1),
              ") to match a's D, got ", b.sizes());
  TORCH_CHECK(is_float_dtype(a.scalar_type()), op,
              ": a must be float16, bfloat16, float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b has dtype ", b.scalar_type(),
              " but a has ", a.scalar_type());
  TORCH_CHECK(b.device() == a.device(), op, ": b is on ", b.device(), " but a is on ", a.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
              ": temperature must be finite and > 0, got ", temperature);
}

inline void check_backward_inputs(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                  double temperature) {
  check_inputs("similarity_bwd", a, b, temperature);
  const int64_t M = a.size(0), N = b.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == N,
              "similarity_bwd: grad must have shape (", M, ", ", N, "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == a.device(), "similarity_bwd: grad is on ", grad.device(),
              " but a is on ", a.device());
}

}  // namespace anchor_kernels::similarity
