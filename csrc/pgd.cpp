// Fused PGD step and random start (anchor_kernels/reference.py pgd_step / pgd_random_start):
// op schemas and the CPU kernels. One pass over memory each:
//
//   pgd_step:          x_adv = clamp(min(max(x_adv + alpha sign(g), x - eps), x + eps), lo, hi)
//                      with sign(0) = sign(NaN) = 0; in place on x_adv
//   pgd_random_start:  out = clamp(x + eps (2u - 1), lo, hi),  u = Philox uniform of element i
//
// eps / alpha are floats or (B,) per-sample tensors. Arithmetic in float32 for half inputs
// (float64 for float64), rounded once at the store, so the results equal the reference bit
// for bit: alpha sign(g) is exact, so contracting the step into an FMA changes nothing, but
// eps (2u - 1) is not, so the random start is compiled without FP contraction.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "pgd_args.h"
#include "pgd_philox.h"

#if defined(__clang__)
#define PGD_NO_FP_CONTRACT
#elif defined(__GNUC__)
#define PGD_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define PGD_NO_FP_CONTRACT
#endif

namespace anchor_kernels::pgd {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task: ~0.4 MB of float32 traffic

// max / min that return NaN when either operand is NaN, like torch.maximum / torch.minimum.
template <typename T>
inline T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
inline T min_nan(T a, T b) {
  return (a < b || a != a) ? a : b;
}

// Runs fn(b, start, stop) over the pieces of [begin, end) that lie in one sample b each.
template <typename Fn>
inline void for_each_sample_piece(int64_t begin, int64_t end, int64_t inner, const Fn& fn) {
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / inner;
    const int64_t stop = std::min(end, (b + 1) * inner);
    fn(b, i, stop);
    i = stop;
  }
}

template <typename scalar_t>
void step_kernel(scalar_t* xa, const scalar_t* g, const scalar_t* x,
                 const at::opmath_type<scalar_t>* eps_p, const at::opmath_type<scalar_t>* alpha_p,
                 at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> alpha,
                 at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi, Sizes s) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, s.n, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, s.inner, [&](int64_t b, int64_t start, int64_t stop) {
      const acc_t e = eps_p ? eps_p[b] : eps;
      const acc_t a = alpha_p ? alpha_p[b] : alpha;
      for (int64_t j = start; j < stop; ++j) {
        const acc_t gv = static_cast<acc_t>(g[j]);
        const acc_t sgn = static_cast<acc_t>(gv > 0) - static_cast<acc_t>(gv < 0);
        const acc_t xv = static_cast<acc_t>(x[j]);
        acc_t v = static_cast<acc_t>(xa[j]) + a * sgn;
        v = min_nan(max_nan(v, xv - e), xv + e);
        xa[j] = static_cast<scalar_t>(min_nan(max_nan(v, lo), hi));
      }
    });
  });
}

template <typename scalar_t>
PGD_NO_FP_CONTRACT void random_start_piece(scalar_t* out, const scalar_t* x,
                                           at::opmath_type<scalar_t> e, uint64_t seed,
                                           at::opmath_type<scalar_t> lo,
                                           at::opmath_type<scalar_t> hi, int64_t start,
                                           int64_t stop) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = start; j < stop; ++j) {
    const acc_t u = static_cast<acc_t>(philox_uniform(static_cast<uint64_t>(j), seed));
    const acc_t noise = e * (acc_t(2) * u - acc_t(1));  // rounded here: no FMA with the sum
    const acc_t v = static_cast<acc_t>(x[j]) + noise;
    out[j] = static_cast<scalar_t>(min_nan(max_nan(v, lo), hi));
  }
}

template <typename scalar_t>
void random_start_kernel(scalar_t* out, const scalar_t* x, const at::opmath_type<scalar_t>* eps_p,
                         at::opmath_type<scalar_t> eps, uint64_t seed,
                         at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi, Sizes s) {
  at::parallel_for(0, s.n, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, s.inner, [&](int64_t b, int64_t start, int64_t stop) {
      random_start_piece(out, x, eps_p ? eps_p[b] : eps, seed, lo, hi, start, stop);
    });
  });
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x,
                  const std::optional<at::Tensor>& eps_t, const std::optional<at::Tensor>& alpha_t,
                  double eps, double alpha, double lo, double hi) {
  const Sizes s = check_step_args(x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi);
  if (s.n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "pgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    step_kernel<scalar_t>(x_adv.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                          x.data_ptr<scalar_t>(), optional_ptr<acc_t>(eps_t),
                          optional_ptr<acc_t>(alpha_t), static_cast<acc_t>(eps),
                          static_cast<acc_t>(alpha), static_cast<acc_t>(lo),
                          static_cast<acc_t>(hi), s);
  });
}

void pgd_random_start_cpu(const at::Tensor& out, const at::Tensor& x,
                          const std::optional<at::Tensor>& eps_t, double eps, int64_t seed,
                          double lo, double hi) {
  const Sizes s = check_random_start_args(out, x, eps_t, eps, seed, lo, hi);
  if (s.n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pgd_random_start_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    random_start_kernel<scalar_t>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                  optional_ptr<acc_t>(eps_t), static_cast<acc_t>(eps),
                                  static_cast<uint64_t>(seed), static_cast<acc_t>(lo),
                                  static_cast<acc_t>(hi), s);
  });
}

}  // namespace
}  // namespace anchor_kernels::pgd

TORCH_LIBRARY_FRAGMENT(anchor_kernels, m) {
  m.def(
      "pgd_step(Tensor(a!) x_adv, Tensor grad, Tensor x, Tensor? eps_t, Tensor? alpha_t, "
      "float eps, float alpha, float lo, float hi) -> ()");
  m.def(
      "pgd_random_start(Tensor(a!) out, Tensor x, Tensor? eps_t, float eps, int seed, "
      "float lo, float hi) -> ()");
}

TORCH_LIBRARY_IMPL(anchor_kernels, CPU, m) {
  m.impl("pgd_step", &anchor_kernels::pgd::pgd_step_cpu);
  m.impl("pgd_random_start", &anchor_kernels::pgd::pgd_random_start_cpu);
}
