// Fused pairwise similarity (DESIGN.md section 2): op schemas and the CPU kernels.
//
// Forward, for a (M, D), b (N, D), temperature t, n_x = max(||x||, eps) (1 without normalising):
//   S_ij = (a_i . b_j) / (n_a[i] n_b[j] t)
// tile by tile: a BLAS product of the raw rows into the output tile, then the tile is scaled by
// the inverse norms while it is in cache. No normalised copy of a or b is made (half inputs
// are widened to float32 once, as BLAS needs). With normalisation, rows whose sum of squares
// could overflow are scaled by their exact overflow-safe factor first (row_scale.h: S does not
// change); n_a, n_b are the norms of the rows the product used.
//
// Backward, for G = dL/dS (M, N):
//   dz_a[i] = (1/t) sum_j (G_ij / n_b[j]) b_j
//   da[i]   = (dz_a[i] - [||a_i|| > eps] z_i (z_i . dz_a[i])) / n_a[i],   z_i = a_i / n_a[i]
// and the same for db with G^T. Each thread owns a block of output rows: it scales G tiles by
// the inverse norms into its scratch, accumulates dz in its scratch with BLAS, and applies the
// normalisation backward to finished rows, times the row's overflow-safe factor. No M x N
// temporary.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_gemm.h"
#include "row_scale.h"
#include "similarity_args.h"

namespace anchor_kernels::similarity {
namespace {

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;  // a 128 x 512 fp32 tile is 256 KiB: stays in L2

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(block, scratch) for every block in [0, blocks) on at::parallel_for's threads,
// each thread claiming the next unclaimed block; scratch is a per-thread buffer of T.
template <typename T, typename F>
void parallel_blocks(int64_t blocks, int64_t scratch_elems, const F& body) {
  if (blocks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(blocks, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    cpu::SequentialBlas sequential;
    at::Tensor scratch = at::empty({std::max<int64_t>(scratch_elems, 1)},
                                   at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    for (int64_t blk = next++; blk < blocks; blk = next++) body(blk, scratch.data_ptr<T>());
  });
}

// (R,) max(||x_r||, eps) in the accumulation dtype, or ones without normalisation.
template <typename A>
at::Tensor clamped_norms(const at::Tensor& x, bool normalize) {
  const int64_t R = x.size(0), D = x.size(1);
  at::Tensor n = at::empty({R}, x.options());
  A* np = n.data_ptr<A>();
  const A* xp = x.data_ptr<A>();
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (!normalize) {
        np[r] = A(1);
        continue;
      }
      A ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += xp[r * D + d] * xp[r * D + d];
      np[r] = std::max(std::sqrt(ss), A(kNormEps));
    }
  });
  return n;
}

// scale / n_r for every row norm n_r (a multiply per element in the loops, not a division).
template <typename A>
std::vector<A> scaled_inverse(const at::Tensor& n, A scale) {
  const A* np = n.data_ptr<A>();
  std::vector<A> out(n.numel());
  for (int64_t r = 0; r < n.numel(); ++r) out[r] = scale / np[r];
  return out;
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& a, const at::Tensor& b, bool normalize,
                        double temperature) {
  using A = acc_t<T>;
  const int64_t M = a.size(0), N = b.size(0), D = a.size(1);
  std::vector<A> unused;  // the forward reads the scaled rows; factors matter to the backward
  const at::Tensor x = rows_in_acc<A>(a, normalize, unused);
  const at::Tensor y = b.is_same(a) ? x : rows_in_acc<A>(b, normalize, unused);
  const at::Tensor na = clamped_norms<A>(x, normalize);
  const at::Tensor nb = b.is_same(a) ? na : clamped_norms<A>(y, normalize);
  at::Tensor s = at::empty({M, N}, a.options());
  if (D == 0) {  // BLAS needs leading dimensions >= 1; the product is 0
    s.zero_();
    return s;
  }
  const A* xp = x.data_ptr<A>();
  const A* yp = y.data_ptr<A>();
  const std::vector<A> ra = scaled_inverse(na, A(1.0 / temperature));  // 1 / (n_a t)
  const std::vector<A> rb = scaled_inverse(nb, A(1));
  T* sp = s.data_ptr<T>();
  const int64_t col_blocks = div_up(N, kColBlock);
  constexpr bool direct = std::is_same_v<T, A>;  // the product goes straight into S
  parallel_blocks<A>(div_up(M, kRowBlock) * col_blocks, direct ? 0 : kRowBlock * kColBlock,
                     [&](int64_t blk, A* scratch) {
    const int64_t r0 = (blk / col_blocks) * kRowBlock, c0 = (blk % col_blocks) * kColBlock;
    const int64_t m = std::min(kRowBlock, M - r0), n = std::min(kColBlock, N - c0);
    A* tile = direct ? reinterpret_cast<A*>(sp) + r0 * N + c0 : scratch;
    const int64_t ld = direct ? N : kColBlock;
    cpu::gemm<A>(true, m, n, D, A(1), xp + r0 * D, D, yp + c0 * D, D, A(0), tile, ld);
    const A* rbj = rb.data() + c0;
    for (int64_t i = 0; i < m; ++i) {
      const A ri = ra[r0 + i];
      const A* in = tile + i * ld;
      T* out = sp + (r0 + i) * N + c0;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(in[j] * ri * rbj[j]);
    }
  });
  return s;
}

// dx (R, D) for the rows of x against y through G, where G(r, q) = g[r * gr + q * gq]:
// gr, gq are G's strides for dx = da, swapped for dx = db. fx: x's overflow-safe factors (or
// empty), which the rows of dx are multiplied by.
template <typename T>
at::Tensor side_backward(const T* g, int64_t gr, int64_t gq, const at::Tensor& x,
                         const std::vector<acc_t<T>>& fx, const at::Tensor& y, const at::Tensor& nx,
                         const at::Tensor& ny, bool normalize, double temperature,
                         at::ScalarType out_dtype) {
  using A = acc_t<T>;
  const int64_t R = x.size(0), Q = y.size(0), D = x.size(1);
  at::Tensor dx = at::empty({R, D}, x.options().dtype(out_dtype));
  if (R == 0 || D == 0) return dx;
  const A* xp = x.data_ptr<A>();
  const A* yp = y.data_ptr<A>();
  const A* nxp = nx.data_ptr<A>();
  const std::vector<A> ry = scaled_inverse(ny, A(1));
  T* dxp = dx.data_ptr<T>();
  const A inv_t = A(1.0 / temperature);
  parallel_blocks<A>(div_up(R, kRowBlock), kRowBlock * kColBlock + kRowBlock * D,
                     [&](int64_t blk, A* scratch) {
    const int64_t r0 = blk * kRowBlock, m = std::min(kRowBlock, R - r0);
    A* gs = scratch;                         // (m, kColBlock): G tile / n_y
    A* dz = scratch + kRowBlock * kColBlock;  // (m, D)
    std::fill(dz, dz + m * D, A(0));
    for (int64_t q0 = 0; q0 < Q; q0 += kColBlock) {
      const int64_t n = std::min(kColBlock, Q - q0);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          gs[i * kColBlock + j] = static_cast<A>(g[(r0 + i) * gr + (q0 + j) * gq]) * ry[q0 + j];
      cpu::gemm<A>(false, m, D, n, A(1), gs, kColBlock, yp + q0 * D, D, A(1), dz, D);
    }
    for (int64_t i = 0; i < m; ++i) {
      A* dzi = dz + i * D;
      const A* xi = xp + (r0 + i) * D;
      const A n = nxp[r0 + i];
      const A f = fx.empty() ? A(1) : fx[r0 + i];
      A proj = 0;
      if (normalize && n > A(kNormEps)) {
        for (int64_t d = 0; d < D; ++d) proj += xi[d] * dzi[d];
        proj *= inv_t / (n * n);  // (z . dz) / n with z = x / n, dz = inv_t * dzi
      }
      T* out = dxp + (r0 + i) * D;
      for (int64_t d = 0; d < D; ++d)
        out[d] = static_cast<T>((dzi[d] * inv_t - proj * xi[d]) / n * f);
    }
  });
  return dx;
}

at::Tensor similarity_fwd_cpu(const at::Tensor& a, const at::Tensor& b, bool normalize,
                              double temperature) {
  check_inputs("similarity_fwd", a, b, temperature);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "similarity_fwd", [&] {
    out = forward_impl<scalar_t>(a, b, normalize, temperature);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> similarity_bwd_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                      const at::Tensor& b, bool normalize,
                                                      double temperature) {
  check_backward_inputs(grad, a, b, temperature);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "similarity_bwd", [&] {
    const at::Tensor g = grad.to(a.scalar_type());
    const scalar_t* gp = g.data_ptr<scalar_t>();
    using A = acc_t<scalar_t>;
    std::vector<A> fa, fb;  // the forward's rows and norms again (O((M + N) D)), and the factors
    const at::Tensor x = rows_in_acc<A>(a, normalize, fa);
    const at::Tensor y = rows_in_acc<A>(b, normalize, fb);
    const at::Tensor nac = clamped_norms<A>(x, normalize), nbc = clamped_norms<A>(y, normalize);
    at::Tensor da = side_backward<scalar_t>(gp, g.stride(0), g.stride(1), x, fa, y, nac, nbc,
                                            normalize, temperature, a.scalar_type());
    at::Tensor db = side_backward<scalar_t>(gp, g.stride(1), g.stride(0), y, fb, x, nbc, nac,
                                            normalize, temperature, b.scalar_type());
    out = {da, db};
  });
  return out;
}

}  // namespace
}  // namespace anchor_kernels::similarity

TORCH_LIBRARY_FRAGMENT(anchor_kernels, m) {
  m.def("similarity_fwd(Tensor a, Tensor b, bool normalize, float temperature) -> Tensor");
  m.def("similarity_bwd(Tensor grad, Tensor a, Tensor b, bool normalize, float temperature) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(anchor_kernels, CPU, m) {
  m.impl("similarity_fwd", &anchor_kernels::similarity::similarity_fwd_cpu);
  m.impl("similarity_bwd", &anchor_kernels::similarity::similarity_bwd_cpu);
}
