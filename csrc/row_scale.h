// Overflow-safe row scaling of the CPU kernels (reference.overflow_safe_scale): a row whose
// largest |x| could overflow the sum of its D squares in the accumulation dtype A is scaled by
// the exact power of two 2^-e (2^(e-1) <= max |x| < 2^e), as robust norms do. Cosines and unit
// vectors do not change under a positive row scale, so the kernels run on the scaled rows and
// multiply the gradient of a scaled row by its factor (the chain rule of x * factor).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace anchor_kernels {

// Below this max |x| a sum of D squares stays under A's maximum.
template <typename A>
A overflow_safe_bound(int64_t D) {
  return std::sqrt(std::numeric_limits<A>::max() / A(4 * std::max<int64_t>(D, 1)));
}

// The factor of one row of D values: 1, or 2^-e for a finite row above the bound (an inf or
// NaN row stays as it is).
template <typename A>
A overflow_safe_factor(const A* row, int64_t D, A bound) {
  A amax = 0;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(row[d]));
  if (!(amax > bound && std::isfinite(amax))) return A(1);
  int e = 0;
  std::frexp(amax, &e);
  return std::ldexp(A(1), -e);
}

// x (R, D), contiguous in A: x itself when no row needs scaling (factors left empty, the
// common case: no copy), else a scaled copy with factors holding every row's factor.
template <typename A>
at::Tensor overflow_safe_rows(const at::Tensor& x, std::vector<A>& factors) {
  const int64_t R = x.size(0), D = x.size(1);
  const A bound = overflow_safe_bound<A>(D);
  const A* xp = x.data_ptr<A>();
  std::vector<A> f(R, A(1));
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f[r] = overflow_safe_factor(xp + r * D, D, bound);
  });
  factors.clear();
  if (std::all_of(f.begin(), f.end(), [](A v) { return v == A(1); })) return x;
  at::Tensor out = x.clone();
  A* op = out.data_ptr<A>();
  for (int64_t r = 0; r < R; ++r)
    if (f[r] != A(1))
      for (int64_t d = 0; d < D; ++d) op[r * D + d] *= f[r];
  factors = std::move(f);
  return out;
}

// x (R, D) any dtype and strides, as the kernels read it: contiguous in A, its rows scaled by
// their overflow-safe factors when normalising (factors as above).
template <typename A>
at::Tensor rows_in_acc(const at::Tensor& x, bool normalize, std::vector<A>& factors) {
  const at::Tensor xa = x.to(c10::CppTypeToScalarType<A>::value).contiguous();
  factors.clear();
  return normalize ? overflow_safe_rows<A>(xa, factors) : xa;
}

}  // namespace anchor_kernels
