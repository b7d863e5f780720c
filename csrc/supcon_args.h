// Argument checks of the supcon ops, shared by the CPU kernels and the CUDA glue, so that a
// direct call of torch.ops.anchor_kernels.supcon_fwd / supcon_bwd gets an error naming the
// tensor and the shape it should have, whichever device runs it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace anchor_kernels::supcon {

// Sizes of one call: anchors f (M, D), contrast set (N, D) (N = M when it is f itself), and
// the self column self(i) = offset + i, or offset = -1 when the anchors are not in the set.
struct Sizes {
  int64_t M, N, D, offset;
  bool single;  // the contrast set is the anchors themselves
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_integer_dtype(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/false);
}

inline Sizes check_forward_args(const at::Tensor& f, const at::Tensor& labels,
                                const std::optional<at::Tensor>& contrast,
                                const std::optional<at::Tensor>& contrast_labels,
                                double temperature, double beta,
                                std::optional<int64_t> anchor_offset) {
  TORCH_CHECK(f.dim() == 2, "supcon: features must be 2-D (M, D), got shape ", f.sizes());
  TORCH_CHECK(is_float_dtype(f.scalar_type()),
              "supcon: features must be float16, bfloat16, float32 or float64, got ",
              f.scalar_type());
  const int64_t M = f.size(0), D = f.size(1);
  TORCH_CHECK(M >= 1 && D >= 1, "supcon: features must be (M, D) with M >= 1 and D >= 1, got ",
              f.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == M, "supcon: labels must have shape (", M,
              ",) to match features (M, D) = ", f.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(is_integer_dtype(labels.scalar_type()),
              "supcon: labels must hold integer class labels, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == f.device(), "supcon: labels is on ", labels.device(),
              " but features is on ", f.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "supcon: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(std::isfinite(beta) && beta >= 0, "supcon: beta must be finite and >= 0, got ",
              beta);
  Sizes s{M, M, D, -1, true};
  if (contrast.has_value()) {
    const at::Tensor& g = *contrast;
    TORCH_CHECK(g.dim() == 2 && g.size(1) == D && g.size(0) >= 1,
                "supcon: contrast must have shape (N, ", D, ") with N >= 1 to match features' D, got ",
                g.sizes());
    TORCH_CHECK(g.scalar_type() == f.scalar_type(), "supcon: contrast has dtype ",
                g.scalar_type(), " but features has ", f.scalar_type());
    TORCH_CHECK(g.device() == f.device(), "supcon: contrast is on ", g.device(),
                " but features is on ", f.device());
    TORCH_CHECK(contrast_labels.has_value(), "supcon: contrast_labels is required with contrast");
    const at::Tensor& yg = *contrast_labels;
    TORCH_CHECK(yg.dim() == 1 && yg.size(0) == g.size(0), "supcon: contrast_labels must have shape (",
                g.size(0), ",) to match contrast (N, D) = ", g.sizes(), ", got ", yg.sizes());
    TORCH_CHECK(is_integer_dtype(yg.scalar_type()),
                "supcon: contrast_labels must hold integer class labels, got ", yg.scalar_type());
    TORCH_CHECK(yg.device() == f.device(), "supcon: contrast_labels is on ", yg.device(),
                " but features is on ", f.device());
    s.N = g.size(0);
    s.single = false;
    if (anchor_offset.has_value()) {
      const int64_t o = *anchor_offset;
      TORCH_CHECK(o >= 0 && o + M <= s.N, "supcon: anchor_offset=", o, " puts the ", M,
                  " anchors outside the ", s.N, " contrast rows (need 0 <= anchor_offset <= ",
                  s.N - M, ")");
      s.offset = o;
    }
  } else {
    TORCH_CHECK(!contrast_labels.has_value(),
                "supcon: contrast_labels was given without contrast");
    TORCH_CHECK(!anchor_offset.has_value() || *anchor_offset == 0,
                "supcon: anchor_offset must be 0 or None when contrast is None, got ",
                *anchor_offset);
    s.offset = anchor_offset.has_value() ? 0 : -1;
  }
  return s;
}

// Loss and statistics dtype: float32 for half inputs, else the input's.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The ops' `reduction` codes (backends.REDUCTION_CODES in Python): per anchor (M,), or
// one value, the sum or the mean over valid anchors.
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

inline void check_reduction(double scale, int64_t reduction) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "supcon: scale must be finite and > 0, got ",
              scale);
  TORCH_CHECK(reduction >= kNone && reduction <= kMean,
              "supcon: reduction must be 0 (none), 1 (sum) or 2 (mean), got ", reduction);
}

inline void check_backward_args(const Sizes& s, const at::Tensor& f, const at::Tensor& grad,
                                const at::Tensor& stats, double scale, int64_t reduction) {
  const auto acc = acc_dtype(f.scalar_type());
  check_reduction(scale, reduction);
  if (reduction == kNone) {
    TORCH_CHECK(grad.dim() == 1 && grad.size(0) == s.M, "supcon_bwd: grad_loss must have shape (",
                s.M, ",) with reduction 0 (none), got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 0, "supcon_bwd: grad_loss must be 0-d with reduction ", reduction,
                " (the loss is one value), got shape ", grad.sizes());
  }
  TORCH_CHECK(grad.device() == f.device(), "supcon_bwd: grad_loss is on ", grad.device(),
              " but features is on ", f.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "supcon_bwd: grad_loss must be floating point, got ", grad.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == s.M && stats.size(1) == 4,
              "supcon_bwd: stats must have shape (", s.M, ", 4) as returned by supcon_fwd, got ",
              stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc, "supcon_bwd: stats must be ", acc,
              " as returned by supcon_fwd, got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == f.device(), "supcon_bwd: stats is on ", stats.device(),
              " but features is on ", f.device());
}

}  // namespace anchor_kernels::supcon
