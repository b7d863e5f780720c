// Hard-positive-mined SupCon loss (DESIGN.md section 1): op schemas and the CPU kernels.
//
// Forward, per anchor i, streaming over column tiles of S = Z C^T / tau with online maxima:
//   LSE_i  = log sum_{j in A(i)} exp(s_ij)
//   u_i    = min_{j in P(i)} s_ij,   lw_i = sum_{j in P(i)} exp(-beta tau (s_ij - u_i))
//   sbar_i = sum_{j in P(i)} w_ij s_ij,   w_ij = exp(-beta tau (s_ij - u_i) - log lw_i)
//   L_i    = LSE_i - sbar_i  (0 when P(i) is empty);   with lse_only: L_i = LSE_i.
// Soft mining shifts by the smallest positive s (the largest -beta cos), never forming
// -beta cos itself: every exponent is <= 0 and the hardest positive's is exactly 0, so lw_i >= 1
// and the weights stay finite for any finite beta (a product -beta cos of 1e10 rounds by ~1e3,
// which would underflow every exp). beta tau is clamped to T's range (a larger beta gives the
// same weights in T), and a beta tau that rounds to 0 in T is uniform mining.
// Saved per anchor (O(M)): stats[i] = (LSE_i, sbar_i, log |P(i)|, |P(i)|) (uniform),
// (LSE_i, sbar_i, u_i, log lw_i) (soft; log lw_i = -inf when P(i) is empty), or
// (LSE_i, 0, 0, |A(i)|) with lse_only.
//
// Backward, with g_i = dLoss/dL_i (0 for anchors without positives) and p_ij = exp(s_ij - LSE_i):
//   G_ij = g_i (p_ij - w_ij)                                   detached weights
//   G_ij = g_i (p_ij - w_ij (1 - beta tau (s_ij - sbar_i)))    exact weights (0 where w_ij = 0)
//   G_ij = g_i p_ij                                            lse_only
//   dz_i = sum_j G_ij c_j / tau,   dc_j = sum_i G_ij z_i / tau,
// and through the normalisation df = (dz - z (z . dz)) / ||f||. With one set (c = z) the
// gradient of row k is sum_j (G_kj + G_jk) z_j / tau: one row-parallel pass recomputes each
// tile S_bc once and forms G_bc (stats of rows b) and G_cb^T (stats of rows c) from it, two
// GEMMs per tile and no reduction across threads. Two sets take a row pass for df and a column
// pass for dg. Nothing of size M x N is stored: the tile buffers are per thread.
//
// The ops return L_i times `scale` per anchor (reduction 0), or reduced (1: sum, 2: mean over
// anchors with positives) to one value, whose gradient g_i they then expand themselves
// (supcon_args.h), so a caller's forward + backward is one op call each way.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_gemm.h"
#include "row_scale.h"
#include "supcon_args.h"

namespace anchor_kernels::supcon {
namespace {

using at::vec::Vectorized;

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS
constexpr int64_t kMaxRowBlock = 128;
constexpr int64_t kColBlock = 512;  // a 128 x 512 fp32 tile is 256 KiB: stays in L2

enum FwdMode { kFwdLse, kFwdUniform, kFwdSoft };
enum BwdMode { kBwdLse, kBwdUniform, kBwdSoftDetached, kBwdSoftExact };

// Scalar and vector versions of the few operations the kernels need, so that one generic
// expression serves the vector body and the scalar tail of every loop.
template <typename T>
inline T vexp(T x) {
  return std::exp(x);
}
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  return x.exp_u20();
}
template <typename T>
inline T vselect(bool mask, T a, T b) {
  return mask ? a : b;
}
template <typename T>
inline Vectorized<T> vselect(const Vectorized<T>& mask, const Vectorized<T>& a,
                             const Vectorized<T>& b) {
  return Vectorized<T>::blendv(b, a, mask);
}
template <typename T>
inline T vmax(T a, T b) {
  return std::max(a, b);
}
template <typename T>
inline Vectorized<T> vmax(const Vectorized<T>& a, const Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
template <typename T>
inline T vmin(T a, T b) {
  return std::min(a, b);
}
template <typename T>
inline Vectorized<T> vmin(const Vectorized<T>& a, const Vectorized<T>& b) {
  return at::vec::minimum(a, b);
}
template <typename T>
inline bool veq(T a, T b) {
  return a == b;
}
template <typename T>
inline Vectorized<T> veq(const Vectorized<T>& a, const Vectorized<T>& b) {
  return a == b;
}
template <typename T>
inline T hmax(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T r = buf[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i) r = std::max(r, buf[i]);
  return r;
}
template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T r = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) r += buf[i];
  return r;
}

// fn(j) for vectors starting at j, then fn_tail(j) element by element, over [lo, hi).
template <typename T, typename FV, typename FS>
inline void vloop(int64_t lo, int64_t hi, const FV& fn, const FS& fn_tail) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t j = lo;
  for (; j + W <= hi; j += W) fn(j);
  for (; j < hi; ++j) fn_tail(j);
}

// fn(lo, hi) over [0, n) without column `skip` (none when skip is outside [0, n)).
template <typename F>
inline void for_segments(int64_t n, int64_t skip, const F& fn) {
  if (skip < 0 || skip >= n) {
    fn(0, n);
    return;
  }
  if (skip > 0) fn(0, skip);
  if (skip + 1 < n) fn(skip + 1, n);
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per block: at most kMaxRowBlock, and about four blocks per thread when the rows allow,
// so that the dynamic split below can even out threads that the OS runs slower.
inline int64_t row_block(int64_t rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rb = div_up(rows, 4 * threads);
  return std::clamp<int64_t>(div_up(rb, 8) * 8, 8, kMaxRowBlock);
}

// Runs body(block, scratch) for every block in [0, blocks) on at::parallel_for's threads,
// each thread claiming the next unclaimed block (a static split stalls on a descheduled
// thread of a busy machine). scratch is a per-thread buffer of scratch_elems T.
template <typename T, typename F>
void parallel_blocks(int64_t blocks, int64_t scratch_elems, const F& body) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(blocks, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    cpu::SequentialBlas sequential;
    at::Tensor scratch = at::empty({scratch_elems},
                                   at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    for (int64_t b = next++; b < blocks; b = next++) body(b, scratch.data_ptr<T>());
  });
}

// Rows of f (or g) in the accumulation dtype, contiguous, divided by max(||row||, eps) when
// normalising; norms keeps ||row|| for the backward (inf only past T's range, where the
// gradient 1 / ||row|| rounds to 0 anyway). A row whose sum of squares could overflow is
// summed scaled by its overflow-safe factor (row_scale.h), so every finite row gives a finite
// unit vector; other rows are computed as before.
template <typename T>
void prepare_rows(const at::Tensor& x, bool normalize, at::Tensor& z, at::Tensor& norms) {
  const int64_t R = x.size(0), D = x.size(1);
  z = at::empty({R, D}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
  z.copy_(x);
  norms = at::empty({R}, z.options());
  T* zp = z.data_ptr<T>();
  T* np = norms.data_ptr<T>();
  const T bound = overflow_safe_bound<T>(D);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = zp + r * D;
      const T scale = overflow_safe_factor(row, D, bound);
      T ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += (row[d] * scale) * (row[d] * scale);
      const T ns = std::sqrt(ss);  // ||row|| * scale
      np[r] = ns / scale;
      if (normalize) {
        if (ns >= T(kNormEps) * scale) {
          const T inv = T(1) / ns;
          for (int64_t d = 0; d < D; ++d) row[d] = (row[d] * scale) * inv;
        } else {
          const T inv = T(1 / kNormEps);
          for (int64_t d = 0; d < D; ++d) row[d] *= inv;
        }
      }
    }
  });
}

// Labels as dense class ids 0..K-1 held in T, so that the positive mask is one vector
// comparison (exact: K <= M + N is checked to fit T's integer range).
template <typename T>
void dense_ids(const at::Tensor& yf, const std::optional<at::Tensor>& yg, at::Tensor& idf,
               at::Tensor& idg) {
  const at::Tensor a = yf.to(at::kLong).contiguous();
  at::Tensor b = yg.has_value() ? yg->to(at::kLong).contiguous() : at::Tensor();
  const int64_t M = a.numel(), N = b.defined() ? b.numel() : 0;
  TORCH_CHECK(M + N <= (int64_t(1) << std::numeric_limits<T>::digits),
              "supcon: too many labels for exact class ids");
  std::vector<int64_t> all(a.data_ptr<int64_t>(), a.data_ptr<int64_t>() + M);
  if (N) all.insert(all.end(), b.data_ptr<int64_t>(), b.data_ptr<int64_t>() + N);
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());
  auto map = [&](const at::Tensor& y) {
    at::Tensor out = at::empty({y.numel()}, y.options().dtype(c10::CppTypeToScalarType<T>::value));
    const int64_t* yp = y.data_ptr<int64_t>();
    T* op = out.data_ptr<T>();
    for (int64_t i = 0; i < y.numel(); ++i)
      op[i] = T(std::lower_bound(all.begin(), all.end(), yp[i]) - all.begin());
    return out;
  };
  idf = map(a);
  idg = N ? map(b) : idf;
}

// ---------------------------------------------------------------------------------------
// Forward

// -beta tau in T, clamped to T's finite range (a larger beta gives the same weights in T).
template <typename T>
inline T neg_beta_tau(double beta, double tau) {
  return T(-std::min(beta * tau, double(std::numeric_limits<T>::max())));
}

template <typename T>
struct RowState {
  T m = -std::numeric_limits<T>::infinity();   // running max of s over A(i)
  T l = 0;                                      // sum exp(s - m) over A(i)
  T u = std::numeric_limits<T>::infinity();    // running min of s over P(i)
  T lw = 0;                                     // sum exp(nbt (s - u)) over P(i)
  T sw = 0;                                     // sum exp(nbt (s - u)) s over P(i)
  T cnt = 0;                                    // |P(i)|
};

// One anchor row of one tile: s (n,) with column ids `ids`, the self column `skip` left out.
template <typename T, int MODE>
inline void forward_row(const T* s, const T* ids, int64_t n, int64_t skip, T yi, T nbt,
                        RowState<T>& st) {
  using V = Vectorized<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  const V vy(yi), vnbt(nbt), vninf(ninf), vzero(T(0)), vone(T(1));

  // Pass 1: tile maximum of s and, for soft mining, minimum of s over the positives
  // (kept as the maximum of -s).
  V vm(ninf), vt(ninf);
  T sm = ninf, tm = ninf;
  for_segments(n, skip, [&](int64_t lo, int64_t hi) {
    vloop<T>(lo, hi,
        [&](int64_t j) {
          const V x = V::loadu(s + j);
          vm = vmax(vm, x);
          if constexpr (MODE == kFwdSoft)
            vt = vmax(vt, vselect(veq(V::loadu(ids + j), vy), vzero - x, vninf));
        },
        [&](int64_t j) {
          sm = vmax(sm, s[j]);
          if constexpr (MODE == kFwdSoft)
            if (ids[j] == yi) tm = vmax(tm, -s[j]);
        });
  });
  sm = std::max(sm, hmax(vm));
  if (sm > st.m) {
    st.l *= std::exp(st.m - sm);
    st.m = sm;
  }
  if constexpr (MODE == kFwdSoft) {
    const T u = -std::max(tm, hmax(vt));
    if (u < st.u) {
      const T r = st.lw == 0 ? T(0) : std::exp(nbt * (st.u - u));  // <= 1
      st.lw *= r;
      st.sw *= r;
      st.u = u;
    }
  }

  // Pass 2: the sums, against the updated maxima. Masked lanes are selected away (never
  // multiplied), so an overflowing exp on a non-positive lane cannot leak a NaN.
  const V vmrow(st.m), vu(st.u);
  V vl(T(0)), vlw(T(0)), vsw(T(0)), vc(T(0));
  T l = 0, lw = 0, sw = 0, c = 0;
  for_segments(n, skip, [&](int64_t lo, int64_t hi) {
    vloop<T>(lo, hi,
        [&](int64_t j) {
          const V x = V::loadu(s + j);
          vl = vl + vexp(x - vmrow);
          if constexpr (MODE != kFwdLse) {
            const V pos = veq(V::loadu(ids + j), vy);
            vc = vc + vselect(pos, vone, vzero);
            if constexpr (MODE == kFwdUniform) {
              vsw = vsw + vselect(pos, x, vzero);
            } else {
              const V e = vselect(pos, vexp(vnbt * (x - vu)), vzero);
              vlw = vlw + e;
              vsw = vsw + e * x;
            }
          }
        },
        [&](int64_t j) {
          const T x = s[j];
          l += std::exp(x - st.m);
          if constexpr (MODE != kFwdLse) {
            if (ids[j] == yi) {
              c += 1;
              if constexpr (MODE == kFwdUniform) {
                sw += x;
              } else {
                const T e = std::exp(nbt * (x - st.u));
                lw += e;
                sw += e * x;
              }
            }
          }
        });
  });
  st.l += l + hsum(vl);
  if constexpr (MODE != kFwdLse) {
    st.cnt += c + hsum(vc);
    st.sw += sw + hsum(vsw);
    if constexpr (MODE == kFwdSoft) st.lw += lw + hsum(vlw);
  }
}

template <typename T, int MODE>
void forward_kernel(const T* Z, const T* idz, int64_t M, const T* C, const T* idc, int64_t N,
                    int64_t D, int64_t offset, double tau, double beta, T* loss, bool* valid,
                    T* stats) {
  const int64_t Br = row_block(M), Bc = std::min(kColBlock, N);
  const T inv_tau = T(1.0 / tau), nbt = neg_beta_tau<T>(beta, tau);
  parallel_blocks<T>(div_up(M, Br), Br * Bc, [&](int64_t b, T* S) {
    std::vector<RowState<T>> st(Br);
    const int64_t i0 = b * Br, rows = std::min(Br, M - i0);
    for (int64_t j0 = 0; j0 < N; j0 += Bc) {
      const int64_t cols = std::min(Bc, N - j0);
      cpu::gemm<T>(true, rows, cols, D, inv_tau, Z + i0 * D, D, C + j0 * D, D, T(0), S, Bc);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const int64_t skip = offset >= 0 ? offset + i - j0 : -1;
        forward_row<T, MODE>(S + r * Bc, idc + j0, cols, skip, idz[i], nbt, st[r]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const RowState<T>& a = st[r];
      const T lse = a.m + std::log(a.l);
      T* out = stats + 4 * i;
      if constexpr (MODE == kFwdLse) {
        const T count = T(N - (offset >= 0 ? 1 : 0));
        valid[i] = count > 0;
        loss[i] = valid[i] ? lse : T(0);
        out[0] = lse, out[1] = 0, out[2] = 0, out[3] = count;
      } else {
        valid[i] = a.cnt > 0;
        const T sbar = valid[i] ? (MODE == kFwdSoft ? a.sw / a.lw : a.sw / a.cnt) : T(0);
        loss[i] = valid[i] ? lse - sbar : T(0);
        out[0] = lse, out[1] = sbar;
        if constexpr (MODE == kFwdSoft) out[2] = a.u, out[3] = std::log(a.lw);
        else out[2] = std::log(a.cnt), out[3] = a.cnt;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward

// G for one (anchor, column) pair from the anchor's statistics: ga = g_i (0 for invalid
// anchors), lse (+inf for invalid anchors, so p = 0), q = 1/|P| (uniform) or log lw (soft,
// 0 when invalid), u = the smallest positive s (soft; -inf when invalid, so w = 0), sbar.
// The soft exponent is clamped to <= 0 (w <= 1): the backward's tiles may round s slightly
// below the forward's u. Generic over scalars and vectors.
template <int MODE, typename V, typename Mask>
inline V gterm(const V& s, const Mask& pos, const V& ga, const V& lse, const V& q, const V& u,
               const V& sbar, const V& nbt, const V& zero, const V& one) {
  const V p = vexp(s - lse);
  if constexpr (MODE == kBwdLse) {
    return ga * p;
  } else if constexpr (MODE == kBwdUniform) {
    return ga * (p - vselect(pos, q, zero));
  } else {
    V w = vselect(pos, vexp(vmin(nbt * (s - u) - q, zero)), zero);
    if constexpr (MODE == kBwdSoftExact) w = vselect(w > zero, w * (one + nbt * (s - sbar)), zero);
    return ga * (p - w);
  }
}

// Per-anchor arrays the backward reads: (ga, lse, q, u, sbar), each (M,).
template <typename T>
struct AnchorArrays {
  const T *ga, *lse, *q, *u, *sbar;
};

// dX (R, D) = sum over inner rows y of H_xy Y_y / tau, where H_xy = G(x, y) with the stats of
// anchor x (OUTER) plus G(y, x) with the stats of anchor y (INNER), and H = 0 on the self
// pair y = x + shift. Row-parallel over blocks of X; each thread owns its rows of dX.
template <typename T, int MODE, bool OUTER, bool INNER>
void backward_pass(const T* X, const T* idx, int64_t R, const T* Y, const T* idy, int64_t Q,
                   int64_t D, bool has_self, int64_t shift, AnchorArrays<T> a, double tau,
                   double beta, T* dX) {
  using V = Vectorized<T>;
  const int64_t Bo = row_block(R), Bi = std::min(kColBlock, Q);
  const T inv_tau = T(1.0 / tau), nbt = neg_beta_tau<T>(beta, tau);
  const V vnbt(nbt), vzero(T(0)), vone(T(1));
  parallel_blocks<T>(div_up(R, Bo), Bo * Bi, [&](int64_t b, T* H) {
    const int64_t x0 = b * Bo, rows = std::min(Bo, R - x0);
    for (int64_t y0 = 0; y0 < Q; y0 += Bi) {
      const int64_t cols = std::min(Bi, Q - y0);
      cpu::gemm<T>(true, rows, cols, D, inv_tau, X + x0 * D, D, Y + y0 * D, D, T(0), H, Bi);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t x = x0 + r;
        T* h = H + r * Bi;
        const T* iy = idy + y0;
        const T yx = idx[x];
        const V vyx(yx);
        T oga = 0, olse = 0, oq = 0, ou = 0, osb = 0;
        if constexpr (OUTER)
          oga = a.ga[x], olse = a.lse[x], oq = a.q[x], ou = a.u[x], osb = a.sbar[x];
        const V voga(oga), volse(olse), voq(oq), vou(ou), vosb(osb);
        // Inner rows are anchors only when INNER (otherwise these are never read).
        const int64_t io = INNER ? y0 : 0;
        const T *iga = a.ga + io, *ilse = a.lse + io, *iq = a.q + io, *iu = a.u + io,
                *isb = a.sbar + io;
        vloop<T>(0, cols,
            [&](int64_t j) {
              const V s = V::loadu(h + j);
              const V pos = veq(V::loadu(iy + j), vyx);
              V acc = vzero;
              if constexpr (OUTER)
                acc = gterm<MODE>(s, pos, voga, volse, voq, vou, vosb, vnbt, vzero, vone);
              if constexpr (INNER)
                acc = acc + gterm<MODE>(s, pos, V::loadu(iga + j), V::loadu(ilse + j),
                                        V::loadu(iq + j), V::loadu(iu + j), V::loadu(isb + j),
                                        vnbt, vzero, vone);
              acc.store(h + j);
            },
            [&](int64_t j) {
              const T s = h[j];
              const bool pos = iy[j] == yx;
              T acc = 0;
              if constexpr (OUTER)
                acc = gterm<MODE>(s, pos, oga, olse, oq, ou, osb, nbt, T(0), T(1));
              if constexpr (INNER)
                acc += gterm<MODE>(s, pos, iga[j], ilse[j], iq[j], iu[j], isb[j], nbt, T(0), T(1));
              h[j] = acc;
            });
        if (has_self) {
          const int64_t y = x + shift - y0;
          if (y >= 0 && y < cols) h[y] = 0;
        }
      }
      cpu::gemm<T>(false, rows, D, cols, inv_tau, H, Bi, Y + y0 * D, D, y0 == 0 ? T(0) : T(1),
                   dX + x0 * D, D);
    }
  });
}

// In place: dZ (R, D) becomes df = (dz - z (z . dz)) / ||f|| (dz / eps where the clamp holds).
template <typename T>
void normalize_backward(const T* Z, const T* norms, T* dZ, int64_t R, int64_t D) {
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = Z + r * D;
      T* dz = dZ + r * D;
      const T n = norms[r];
      if (n >= T(kNormEps)) {
        T dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += z[d] * dz[d];
        const T inv = T(1) / n;
        for (int64_t d = 0; d < D; ++d) dz[d] = (dz[d] - z[d] * dot) * inv;
      } else {
        const T inv = T(1 / kNormEps);
        for (int64_t d = 0; d < D; ++d) dz[d] *= inv;
      }
    }
  });
}

template <typename T>
void dispatch_forward(int mode, const T* Z, const T* idz, int64_t M, const T* C, const T* idc,
                      int64_t N, int64_t D, int64_t offset, double tau, double beta, T* loss,
                      bool* valid, T* stats) {
  switch (mode) {
    case kFwdLse:
      return forward_kernel<T, kFwdLse>(Z, idz, M, C, idc, N, D, offset, tau, beta, loss, valid, stats);
    case kFwdUniform:
      return forward_kernel<T, kFwdUniform>(Z, idz, M, C, idc, N, D, offset, tau, beta, loss, valid, stats);
    default:
      return forward_kernel<T, kFwdSoft>(Z, idz, M, C, idc, N, D, offset, tau, beta, loss, valid, stats);
  }
}

template <typename T, bool OUTER, bool INNER>
void dispatch_backward(int mode, const T* X, const T* idx, int64_t R, const T* Y, const T* idy,
                       int64_t Q, int64_t D, bool has_self, int64_t shift, AnchorArrays<T> a,
                       double tau, double beta, T* dX) {
#define ANCHOR_BWD_CASE(MODE)                                                                   \
  case MODE:                                                                                    \
    return backward_pass<T, MODE, OUTER, INNER>(X, idx, R, Y, idy, Q, D, has_self, shift, a,    \
                                                tau, beta, dX);
  switch (mode) {
    ANCHOR_BWD_CASE(kBwdLse)
    ANCHOR_BWD_CASE(kBwdUniform)
    ANCHOR_BWD_CASE(kBwdSoftDetached)
    default:
      return backward_pass<T, kBwdSoftExact, OUTER, INNER>(X, idx, R, Y, idy, Q, D, has_self,
                                                           shift, a, tau, beta, dX);
  }
#undef ANCHOR_BWD_CASE
}

// The loss from the per-anchor values (0 for anchors without positives): times `scale`, and
// summed or averaged over valid anchors (reference.reduce_loss), in loops over host memory.
at::Tensor reduce_loss(const at::Tensor& loss, const at::Tensor& valid, double scale,
                       int64_t reduction) {
  if (reduction == kNone && scale == 1.0) return loss;
  at::Tensor out = reduction == kNone ? at::empty_like(loss) : at::empty({}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "supcon_reduce_cpu", [&] {
    const scalar_t* lp = loss.data_ptr<scalar_t>();
    const bool* vp = valid.data_ptr<bool>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    scalar_t total = 0;
    int64_t count = 0;
    for (int64_t i = 0; i < loss.numel(); ++i) {
      if (reduction == kNone) op[i] = lp[i] * s;
      total += lp[i] * s;
      count += vp[i];
    }
    if (reduction == kSum) op[0] = total;
    if (reduction == kMean) op[0] = total / static_cast<scalar_t>(std::max<int64_t>(count, 1));
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_fwd_cpu(
    const at::Tensor& f, const at::Tensor& labels, const std::optional<at::Tensor>& contrast,
    const std::optional<at::Tensor>& contrast_labels, double temperature, double beta,
    bool detach_weights, bool normalize, std::optional<int64_t> anchor_offset, bool lse_only,
    double scale, int64_t reduction) {
  (void)detach_weights;  // read by the backward only
  const Sizes sz = check_forward_args(f, labels, contrast, contrast_labels, temperature, beta,
                                      anchor_offset);
  check_reduction(scale, reduction);
  const auto acc = acc_dtype(f.scalar_type());
  at::Tensor loss = at::empty({sz.M}, f.options().dtype(acc));
  at::Tensor valid = at::empty({sz.M}, f.options().dtype(at::kBool));
  at::Tensor stats = at::empty({sz.M, 4}, f.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "supcon_fwd_cpu", [&] {
    const bool soft = neg_beta_tau<scalar_t>(beta, temperature) != 0;
    const int mode = lse_only ? kFwdLse : (soft ? kFwdSoft : kFwdUniform);
    at::Tensor z, zn, c, cn, idf, idg;
    prepare_rows<scalar_t>(f, normalize, z, zn);
    if (sz.single) c = z;
    else prepare_rows<scalar_t>(*contrast, normalize, c, cn);
    dense_ids<scalar_t>(labels, contrast_labels, idf, idg);
    dispatch_forward<scalar_t>(mode, z.data_ptr<scalar_t>(), idf.data_ptr<scalar_t>(), sz.M,
                               c.data_ptr<scalar_t>(), idg.data_ptr<scalar_t>(), sz.N, sz.D,
                               sz.offset, temperature, beta, loss.data_ptr<scalar_t>(),
                               valid.data_ptr<bool>(), stats.data_ptr<scalar_t>());
  });
  return {reduce_loss(loss, valid, scale, reduction), valid, stats};
}

std::tuple<at::Tensor, at::Tensor> supcon_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& f, const at::Tensor& labels,
    const std::optional<at::Tensor>& contrast, const std::optional<at::Tensor>& contrast_labels,
    const at::Tensor& stats, double temperature, double beta, bool detach_weights,
    bool normalize, std::optional<int64_t> anchor_offset, bool lse_only, double scale,
    int64_t reduction) {
  const Sizes sz = check_forward_args(f, labels, contrast, contrast_labels, temperature, beta,
                                      anchor_offset);
  check_backward_args(sz, f, grad, stats, scale, reduction);
  const auto acc = acc_dtype(f.scalar_type());
  at::Tensor df, dg;
  AT_DISPATCH_FLOATING_TYPES(acc, "supcon_bwd_cpu", [&] {
    using T = scalar_t;
    const bool soft = neg_beta_tau<T>(beta, temperature) != 0;  // as the forward decided
    const int mode = lse_only ? kBwdLse
                     : !soft          ? kBwdUniform
                     : detach_weights ? kBwdSoftDetached
                                      : kBwdSoftExact;
    at::Tensor z, zn, c, cn, idf, idg;
    prepare_rows<T>(f, normalize, z, zn);
    if (sz.single) c = z;
    else prepare_rows<T>(*contrast, normalize, c, cn);
    dense_ids<T>(labels, contrast_labels, idf, idg);

    // (ga, lse, q, u, sbar) per anchor; invalid anchors get ga = 0, lse = +inf and (soft)
    // u = -inf so that their G row is exactly 0 (no inf * 0).
    const at::Tensor st = stats.contiguous();
    const at::Tensor g = grad.to(acc).contiguous();
    at::Tensor arr = at::empty({5, sz.M}, st.options());
    const T* sp = st.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    T* ap = arr.data_ptr<T>();
    const T inf = std::numeric_limits<T>::infinity();
    const bool soft_stats = mode == kBwdSoftDetached || mode == kBwdSoftExact;
    // soft: (u, log lw) with log lw >= 0 for a non-empty P(i); else (log n, n)
    auto valid = [&](int64_t i) { return soft_stats ? sp[4 * i + 3] >= 0 : sp[4 * i + 3] > 0; };
    int64_t count = 0;
    if (reduction == kMean)
      for (int64_t i = 0; i < sz.M; ++i) count += valid(i);
    // g_i: the incoming gradient (one value for a reduced loss) through reduce_loss
    const T factor = static_cast<T>(scale) / static_cast<T>(std::max<int64_t>(count, 1));
    for (int64_t i = 0; i < sz.M; ++i) {
      const T lse = sp[4 * i], sbar = sp[4 * i + 1], c2 = sp[4 * i + 2], c3 = sp[4 * i + 3];
      const bool ok = valid(i);
      ap[i] = ok ? gp[reduction == kNone ? i : 0] * factor : T(0);
      ap[sz.M + i] = ok ? lse : inf;
      ap[2 * sz.M + i] = soft_stats ? (ok ? c3 : T(0)) : (ok && mode == kBwdUniform ? T(1) / c3 : T(0));
      ap[3 * sz.M + i] = soft_stats && ok ? c2 : -inf;
      ap[4 * sz.M + i] = ok ? sbar : T(0);
    }
    const AnchorArrays<T> a{ap, ap + sz.M, ap + 2 * sz.M, ap + 3 * sz.M, ap + 4 * sz.M};
    const bool has_self = sz.offset >= 0;

    at::Tensor dz = at::empty({sz.M, sz.D}, z.options());
    if (sz.single) {
      dispatch_backward<T, true, true>(mode, z.data_ptr<T>(), idf.data_ptr<T>(), sz.M,
                                       z.data_ptr<T>(), idf.data_ptr<T>(), sz.M, sz.D, has_self,
                                       0, a, temperature, beta, dz.data_ptr<T>());
    } else {
      dispatch_backward<T, true, false>(mode, z.data_ptr<T>(), idf.data_ptr<T>(), sz.M,
                                        c.data_ptr<T>(), idg.data_ptr<T>(), sz.N, sz.D, has_self,
                                        sz.offset, a, temperature, beta, dz.data_ptr<T>());
      at::Tensor dc = at::empty({sz.N, sz.D}, c.options());
      dispatch_backward<T, false, true>(mode, c.data_ptr<T>(), idg.data_ptr<T>(), sz.N,
                                        z.data_ptr<T>(), idf.data_ptr<T>(), sz.M, sz.D, has_self,
                                        -sz.offset, a, temperature, beta, dc.data_ptr<T>());
      if (normalize) normalize_backward<T>(c.data_ptr<T>(), cn.data_ptr<T>(), dc.data_ptr<T>(), sz.N, sz.D);
      dg = dc.to(contrast->scalar_type());
    }
    if (normalize) normalize_backward<T>(z.data_ptr<T>(), zn.data_ptr<T>(), dz.data_ptr<T>(), sz.M, sz.D);
    df = dz.to(f.scalar_type());
  });
  if (!dg.defined()) dg = at::empty({0, sz.D}, f.options());
  return {df, dg};
}

}  // namespace
}  // namespace anchor_kernels::supcon

TORCH_LIBRARY_FRAGMENT(anchor_kernels, m) {
  m.def(
      "supcon_fwd(Tensor features, Tensor labels, Tensor? contrast, Tensor? contrast_labels, "
      "float temperature, float beta, bool detach_weights, bool normalize, int? anchor_offset, "
      "bool lse_only, float scale=1., int reduction=0) -> (Tensor loss, Tensor valid, Tensor stats)");
  m.def(
      "supcon_bwd(Tensor grad_loss, Tensor features, Tensor labels, Tensor? contrast, "
      "Tensor? contrast_labels, Tensor stats, float temperature, float beta, bool detach_weights, "
      "bool normalize, int? anchor_offset, bool lse_only, float scale=1., int reduction=0) -> "
      "(Tensor grad_features, Tensor grad_contrast)");
}

TORCH_LIBRARY_IMPL(anchor_kernels, CPU, m) {
  m.impl("supcon_fwd", &anchor_kernels::supcon::supcon_fwd_cpu);
  m.impl("supcon_bwd", &anchor_kernels::supcon::supcon_bwd_cpu);
}
