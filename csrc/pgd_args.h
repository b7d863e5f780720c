// Argument checks of the pgd ops, shared by the CPU kernels and the CUDA glue, so that a direct
// call of torch.ops.anchor_kernels.pgd_step / pgd_random_start gets an error naming the tensor,
// whichever device runs it. anchor_kernels/pgd.py arranges the layouts these checks ask for.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace anchor_kernels::pgd {

// Elements of one call: n in all, `inner` per sample (the batch is the outermost dimension).
struct Sizes {
  int64_t n, inner;
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Arithmetic dtype: float32 for half inputs, else the input's (reference.pgd_compute_dtype).
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Dense with the batch outermost: contiguous, or channels_last (4-D / 5-D). The kernels then
// read flat memory, and offset / inner is the sample index.
inline bool dense_batch_outer(const at::Tensor& t) {
  return t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

inline void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.strides() == ref.strides(), op, ": ", name, " has strides ", t.strides(), " but ",
              ref_name, " has ", ref.strides(), "; they must share one memory layout");
}

inline Sizes check_main(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(dense_batch_outer(t), op, ": ", name,
              " must be contiguous or channels_last (dense, batch outermost), got strides ",
              t.strides());
  const int64_t n = t.numel();
  const int64_t batch = (t.dim() > 0 && n > 0) ? t.size(0) : 1;
  return Sizes{n, std::max<int64_t>(n / batch, 1)};
}

// A per-sample tensor (B,) in the compute dtype, contiguous, on x's device; or a float.
inline void check_budget(const char* op, const std::optional<at::Tensor>& t, const char* name,
                         double value, bool allow_zero, const at::Tensor& x) {
  if (t.has_value()) {
    const int64_t batch = x.dim() > 0 ? x.size(0) : 1;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, op, ": ", name, " must have shape (", batch,
                ",), one value per sample of x ", x.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == compute_dtype(x.scalar_type()), op, ": ", name, " must be ",
                compute_dtype(x.scalar_type()), " for ", x.scalar_type(), " inputs, got ",
                t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ",
                x.device());
  } else {
    TORCH_CHECK(std::isfinite(value) && (allow_zero ? value >= 0 : value > 0), op, ": ", name,
                " must be finite and ", (allow_zero ? ">= 0" : "> 0"), ", got ", value);
  }
}

inline void check_bounds(const char* op, double lo, double hi) {
  TORCH_CHECK(lo < hi, op, ": lo must be < hi, got lo=", lo, ", hi=", hi);
}

// The kernels are elementwise: reading element i of an input and writing element i of the
// output is safe when they are the same memory, not when one is shifted against the other.
inline void check_no_partial_overlap(const char* op, const at::Tensor& out, const char* out_name,
                                     const at::Tensor& in, const char* in_name) {
  TORCH_CHECK(at::get_overlap_status(out, in) != at::MemOverlapStatus::Partial, op, ": ",
              out_name, " and ", in_name, " share memory at different offsets (e.g. buf[1:] and "
              "buf[:-1]); pass a copy of ", in_name);
}

inline Sizes check_step_args(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x,
                             const std::optional<at::Tensor>& eps_t,
                             const std::optional<at::Tensor>& alpha_t, double eps, double alpha,
                             double lo, double hi) {
  const char* op = "pgd_step";
  const Sizes s = check_main(op, x_adv, "x_adv");
  check_like(op, grad, "grad", x_adv, "x_adv");
  check_like(op, x, "x", x_adv, "x_adv");
  check_no_partial_overlap(op, x_adv, "x_adv", grad, "grad");
  check_no_partial_overlap(op, x_adv, "x_adv", x, "x");
  check_budget(op, eps_t, "eps", eps, /*allow_zero=*/true, x);
  check_budget(op, alpha_t, "alpha", alpha, /*allow_zero=*/false, x);
  check_bounds(op, lo, hi);
  return s;
}

inline Sizes check_random_start_args(const at::Tensor& out, const at::Tensor& x,
                                     const std::optional<at::Tensor>& eps_t, double eps,
                                     int64_t seed, double lo, double hi) {
  const char* op = "pgd_random_start";
  // Philox counters follow the row-major index of x.
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), op,
              ": x and out must be contiguous (row-major), got strides ", x.strides(), " and ",
              out.strides());
  const Sizes s = check_main(op, x, "x");
  check_like(op, out, "out", x, "x");
  check_no_partial_overlap(op, out, "out", x, "x");
  check_budget(op, eps_t, "eps", eps, /*allow_zero=*/true, x);
  TORCH_CHECK(seed >= 0, op, ": seed must be >= 0, got ", seed);
  check_bounds(op, lo, hi);
  return s;
}

}  // namespace anchor_kernels::pgd
