// Hard-positive selection (DESIGN.md section 2): op schema and the CPU kernel.
//
// Per anchor i, the k positives of lowest cosine, ties to the lower index:
//   cos_ij = (z_i . c_j) / (n_z[i] n_c[j])   (n = max(||.||, eps), or 1 without normalising)
//   over P(i) = {j != self(i) : y_c[j] == y_z[i]},  self(i) = anchor_offset + i,
// exactly the selection of reference.topk_hardest_mask. Streaming: each thread owns a block of
// anchors and walks the contrast set in column tiles (a BLAS product of the raw rows, scaled by
// the inverse norms; with normalisation, rows whose sum of squares could overflow are scaled
// by their exact overflow-safe factor first, row_scale.h), keeping one bounded max-heap of
// (cos, j) per anchor: a candidate enters when it is below the heap's largest (cos, j),
// compared lexicographically, so ties go to the lower j. A NaN cosine (NaN inputs) is ranked
// as +inf, after every number and before the padding, and returned as NaN. Tiles without a
// positive for any anchor of the block are skipped before the product.
// No M x N buffer. Cosines are computed in float32 (float64 for float64 inputs).
//
// Output: indices (M, k) int64, -1 past an anchor's |P(i)|; cosines (M, k) in the accumulation
// dtype, +inf there; ascending.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_gemm.h"
#include "hard_positive_args.h"
#include "row_scale.h"

namespace anchor_kernels::hard_positive {
namespace {

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;  // a 128 x 512 fp32 tile is 256 KiB: stays in L2

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (R,) 1 / max(||x_r||, eps) in the accumulation dtype, or ones without normalisation.
template <typename A>
std::vector<A> inv_norms(const at::Tensor& x, bool normalize) {
  const int64_t R = x.size(0), D = x.size(1);
  std::vector<A> out(R, A(1));
  if (!normalize) return out;
  const A* xp = x.data_ptr<A>();
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      A ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += xp[r * D + d] * xp[r * D + d];
      out[r] = A(1) / std::max(std::sqrt(ss), A(kNormEps));
    }
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> select_impl(const at::Tensor& z, const at::Tensor& labels,
                                               const at::Tensor& c, const at::Tensor& c_labels,
                                               int64_t k, bool normalize, int64_t offset) {
  using A = acc_t<T>;
  // (key, j, cos) ordered by (key, j), key = cos with NaN as +inf: a strict weak order.
  struct Entry {
    A key;
    int64_t j;
    A cos;
    bool operator<(const Entry& o) const { return key < o.key || (key == o.key && j < o.j); }
  };
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const int64_t M = z.size(0), N = c.size(0), D = z.size(1);
  at::Tensor idx = at::full({M, k}, -1, z.options().dtype(at::kLong));
  at::Tensor cos = at::full({M, k}, std::numeric_limits<double>::infinity(), z.options().dtype(acc));
  if (M == 0 || N == 0) return {idx, cos};
  const bool same = c.is_same(z);
  std::vector<A> unused;  // cosines do not change under the overflow-safe factors
  const at::Tensor x = rows_in_acc<A>(z, normalize, unused);
  const at::Tensor y = same ? x : rows_in_acc<A>(c, normalize, unused);
  const at::Tensor yx = labels.to(at::kLong).contiguous();
  const at::Tensor yy = same ? yx : c_labels.to(at::kLong).contiguous();
  const std::vector<A> rx = inv_norms<A>(x, normalize);
  const std::vector<A> ry = same ? rx : inv_norms<A>(y, normalize);
  const A* xp = x.data_ptr<A>();
  const A* yp = y.data_ptr<A>();
  const int64_t* lx = yx.data_ptr<int64_t>();
  const int64_t* ly = yy.data_ptr<int64_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  A* cp = cos.data_ptr<A>();
  const int64_t cap = std::min(k, N);

  std::atomic<int64_t> next{0};
  const int64_t blocks = div_up(M, kRowBlock);
  const int64_t threads = std::min<int64_t>(blocks, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    cpu::SequentialBlas sequential;
    std::vector<A> tile(kRowBlock * kColBlock);
    std::vector<std::vector<Entry>> heaps(kRowBlock);
    for (auto& h : heaps) h.reserve(cap);
    for (int64_t blk = next++; blk < blocks; blk = next++) {
      const int64_t r0 = blk * kRowBlock, m = std::min(kRowBlock, M - r0);
      for (auto& h : heaps) h.clear();
      for (int64_t c0 = 0; c0 < N; c0 += kColBlock) {
        const int64_t n = std::min(kColBlock, N - c0);
        bool any = false;
        for (int64_t i = 0; i < m && !any; ++i) {
          const int64_t self = offset >= 0 ? offset + r0 + i : -1;
          for (int64_t j = c0; j < c0 + n; ++j)
            if (ly[j] == lx[r0 + i] && j != self) {
              any = true;
              break;
            }
        }
        if (!any) continue;
        if (D > 0)
          cpu::gemm<A>(true, m, n, D, A(1), xp + r0 * D, D, yp + c0 * D, D, A(0), tile.data(),
                       kColBlock);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t yi = lx[r0 + i];
          const int64_t self = offset >= 0 ? offset + r0 + i : -1;
          const A ri = rx[r0 + i];
          std::vector<Entry>& h = heaps[i];
          for (int64_t jj = 0; jj < n; ++jj) {
            const int64_t j = c0 + jj;
            if (ly[j] != yi || j == self) continue;
            const A value = D > 0 ? tile[i * kColBlock + jj] * ri * ry[j] : A(0);
            const Entry e{std::isnan(value) ? std::numeric_limits<A>::infinity() : value, j, value};
            if (static_cast<int64_t>(h.size()) < cap) {
              h.push_back(e);
              std::push_heap(h.begin(), h.end());
            } else if (e < h.front()) {
              std::pop_heap(h.begin(), h.end());
              h.back() = e;
              std::push_heap(h.begin(), h.end());
            }
          }
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        std::vector<Entry>& h = heaps[i];
        std::sort_heap(h.begin(), h.end());  // ascending (cos, j)
        for (size_t r = 0; r < h.size(); ++r) {
          ip[(r0 + i) * k + r] = h[r].j;
          cp[(r0 + i) * k + r] = h[r].cos;
        }
      }
    }
  });
  return {idx, cos};
}

std::tuple<at::Tensor, at::Tensor> hard_positive_cpu(const at::Tensor& z, const at::Tensor& labels,
                                                     const at::Tensor& c,
                                                     const at::Tensor& c_labels, int64_t k,
                                                     bool normalize,
                                                     std::optional<int64_t> anchor_offset) {
  const int64_t offset = check_args(z, labels, c, c_labels, k, anchor_offset);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "hard_positive", [&] {
    out = select_impl<scalar_t>(z, labels, c, c_labels, k, normalize, offset);
  });
  return out;
}

}  // namespace
}  // namespace anchor_kernels::hard_positive

TORCH_LIBRARY_FRAGMENT(anchor_kernels, m) {
  m.def("hard_positive(Tensor z, Tensor labels, Tensor c, Tensor c_labels, int k, "
        "bool normalize, int? anchor_offset) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(anchor_kernels, CPU, m) {
  m.impl("hard_positive", &anchor_kernels::hard_positive::hard_positive_cpu);
}
