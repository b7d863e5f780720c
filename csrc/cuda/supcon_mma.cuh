// Tensor-core SupCon kernels for bf16 / fp16 features on sm_80 and newer, written on CuTe
// (CUTLASS): the anchor block stays in shared memory, column tiles stream through a
// two-stage cp.async pipeline, the products run as mma.sync m16n8k16 with fp32 accumulation
// from ldmatrix fragments, and every per-logit operation (scale, mask, online log-sum-exp,
// positives, G) runs on the accumulators in registers: no S tile goes through shared memory.
//
// The maths is that of supcon_kernels.cuh (and csrc/supcon.cpp); only the tiling differs:
//   forward:  128 anchors per CTA (4 warps x 32 rows), 64-column tiles;
//   backward: 64 rows per CTA, 64-column tiles (32 with soft mining); S = X Y^T is recomputed, H = G(S) is formed
//             in registers and fed straight back as the A operand of dX += H Y (the
//             accumulator layout of m16n8k16 is its A-operand layout), so each tile costs
//             two tensor-core products and no shared-memory round trip.
// Features are read as 16-byte rows of up to kD = 128 columns (D % 8 == 0, row stride % 8 == 0,
// 16-byte aligned); zero-filled past D and past the last row. Other inputs take the kernels
// of supcon_kernels.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include <cstdint>
#include <type_traits>

#include "supcon_kernels.h"

namespace anchor_kernels::supcon_cuda::mma {

using namespace cute;

constexpr int kD = 128;          // feature columns a tile holds
constexpr int kThreads = 128;    // 4 warps, stacked along the rows of the tile
constexpr int kFwdRows = 128;    // anchors per forward CTA
constexpr int kFwdCols = 64;     // columns per forward tile
constexpr int kBwdRows = 64;     // rows per backward CTA
// Columns per backward tile: 64, but 32 for soft mining, whose one-set variants exceed 255
// registers at 64 and spill (H, its half copy and the 64 x 128 dX accumulators are live together).
template <int kMode>
constexpr int bwd_cols() {
  return kMode == kBwdLse || kMode == kBwdUniform ? 64 : 32;
}
constexpr float kLog2e = 1.4426950408889634f;

// 2^x by the MUFU.EX2 instruction alone: exp2f adds a range check and two multiplies to each
// call, to keep results below 2^-126 as denormals. Every exponential here is a probability or a
// weight summed next to a maximum of 1, where a denormal flushed to 0 changes no sum.
// (On the host, for the checks of tests/cuda_emulation: exp2f.)
CUTE_HOST_DEVICE float exp2_ftz(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

template <typename T>
struct MmaOp;
template <>
struct MmaOp<half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct MmaOp<bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};

// 4 warps along M; the 64 x 16 x 16 tile permutation lets ldmatrix.x4 feed whole fragments.
template <typename T>
using TiledMma = decltype(make_tiled_mma(typename MmaOp<T>::type{}, Layout<Shape<_4, _1, _1>>{},
                                         Tile<_64, _16, _16>{}));

// Row-major (rows, kD) tiles, 16-byte chunks XOR-swizzled so that ldmatrix is conflict-free.
using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                      Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
template <int kRows>
using SmemTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kD>>{}));
// The same bytes seen as (kD, rows): the B operand of dX += H Y.
template <int kRows>
using SmemTileT = decltype(composition(SmemTile<kRows>{},
                                       make_layout(Shape<Int<kD>, Int<kRows>>{}, GenRowMajor{})));

// Per-column inputs of one tile, staged in shared memory next to the features.
template <int kCols>
struct ColumnStats {
  int64_t label[kCols];
  float rn[kCols];
  float4 anchor[kCols];  // backward, inner anchors: g, LSE * log2(e), q', sbar
};

template <int kRows, int kCols>
struct SharedStorage {
  alignas(128) uint16_t x[kRows * kD];
  alignas(128) uint16_t y[2][kCols * kD];
  ColumnStats<kCols> cols[2];
};

template <int kRows, int kCols>
constexpr int shared_bytes() {
  return int(sizeof(SharedStorage<kRows, kCols>));
}

// cp.async of rows [row0, row0 + kRows) of m into the swizzled tile s (zeros past the matrix).
template <int kRows, typename T, typename Smem>
__device__ __forceinline__ void load_rows(const Matrix& m, int64_t row0, int D, Smem& s) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  static_assert(kThreads % kChunks == 0 && kRows % (kThreads / kChunks) == 0, "tile split");
  const T* base = static_cast<const T*>(m.data);
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  CUTE_UNROLL
  for (int r = r0; r < kRows; r += kThreads / kChunks) {
    const int64_t row = row0 + r;
    const bool ok = row < m.rows && c * 8 < D;
    const T* src = ok ? base + row * m.s0 + c * 8 : base;
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                    *reinterpret_cast<uint128_t*>(&s(r, c * 8)), ok);
  }
}

// acc += sum over the kD columns of sA(rows) sB(cols)^T, fragments loaded one k-step ahead.
// ra_v / rb_v are the fragments ra / rb seen by the copies (ThrCopy::retile_D).
template <typename Mma, typename CopyA, typename CopyB, typename SA, typename RA, typename RAV,
          typename SB, typename RB, typename RBV, typename Acc>
__device__ __forceinline__ void gemm_smem(Mma& mma, CopyA& ca, SA const& sa, RA& ra, RAV& ra_v,
                                          CopyB& cb, SB const& sb, RB& rb, RBV& rb_v, Acc& acc) {
  constexpr int kSteps = decltype(size<2>(ra))::value;
  copy(ca, sa(_, _, 0), ra_v(_, _, 0));
  copy(cb, sb(_, _, 0), rb_v(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSteps; ++k) {
    if (k + 1 < kSteps) {
      copy(ca, sa(_, _, k + 1), ra_v(_, _, k + 1));
      copy(cb, sb(_, _, k + 1), rb_v(_, _, k + 1));
    }
    gemm(mma, ra(_, _, k), rb(_, _, k), acc);
  }
}

// The m16n8k16 accumulator layout ((2, 2), M, N) read as A fragments ((2, 2, 2), M, N / 2).
template <typename Layout>
CUTE_HOST_DEVICE auto acc_as_a_operand(Layout l) {
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Whether the tile [y0, y0 + kCols) holds a self column of rows [x0, x0 + kRows).
template <int kRows, int kCols>
__device__ __forceinline__ bool meets_diagonal(bool has_self, int64_t shift, int64_t x0, int64_t y0) {
  return has_self && y0 < x0 + shift + kRows && x0 + shift < y0 + kCols;
}

// ---------------------------------------------------------------------------------------
// Forward: per anchor LSE, sbar, log W and |P| (the FwdArgs contract of supcon_kernels.h).

// Calls launch(mode, fixed), std::integral_constant and std::bool_constant, for the forward
// variant a asks for: its FwdMode, and fixed shifts (FwdArgs::shift2 > 0) or running maxima.
template <bool kFixed, typename Launch>
cudaError_t dispatch_mode(const FwdArgs& a, Launch& launch) {
  using Fixed = std::bool_constant<kFixed>;
  switch (a.mode) {
    case kFwdLse:
      return launch(std::integral_constant<int, kFwdLse>{}, Fixed{});
    case kFwdUniform:
      return launch(std::integral_constant<int, kFwdUniform>{}, Fixed{});
    default:
      return launch(std::integral_constant<int, kFwdSoft>{}, Fixed{});
  }
}
template <typename Launch>
cudaError_t dispatch_fwd(const FwdArgs& a, Launch&& launch) {
  return a.shift2 > 0.f ? dispatch_mode<true>(a, launch) : dispatch_mode<false>(a, launch);
}

// kFixed: the shifts of the exponentials are the bounds FwdArgs::shift2 gives (normalised
// rows), not running maxima: no maxima per tile, no rescaling.
template <typename T, int kMode, bool kFixed>
__global__ void __launch_bounds__(kThreads) supcon_fwd_mma_kernel(const FwdArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kM = kFwdRows, kBlockN = kFwdCols;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<SharedStorage<kM, kBlockN>*>(smem_raw);
  Tensor sX = make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.x)), SmemTile<kM>{});
  const int64_t M = p.x.rows, N = p.y.rows;
  const int D = int(p.D);
  const int64_t x0 = int64_t(blockIdx.x) * kM;
  const int tid = threadIdx.x;
  const int n_tiles = int((N + kBlockN - 1) / kBlockN);

  auto stage_columns = [&](int t, int buf) {  // labels and 1 / norms of tile t
    if (tid < kBlockN) {
      const int64_t j = int64_t(t) * kBlockN + tid;
      const bool ok = j < N;
      st.cols[buf].label[tid] = ok ? p.ly[j] : 0;
      st.cols[buf].rn[tid] = ok ? p.rny[j] : 0.f;
    }
  };
  auto tile_y = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTile<kBlockN>{});
  };

  load_rows<kM, T>(p.x, x0, D, sX);
  if (n_tiles > 0) {
    auto sY0 = tile_y(0);
    load_rows<kBlockN, T>(p.y, 0, D, sY0);
    stage_columns(0, 0);
  }
  cp_async_fence();

  TiledMma<T> tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  auto copy_a = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tXs = thr_a.partition_S(sX);
  Tensor tXr = thr_mma.partition_fragment_A(sX);
  Tensor tYr = thr_mma.partition_fragment_B(tile_y(0));
  Tensor tXr_v = thr_a.retile_D(tXr);
  Tensor tYr_v = thr_b.retile_D(tYr);
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kM>, Int<kBlockN>>{});
  Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kBlockN>>{}));
  constexpr int kMi = decltype(size<1>(acc))::value, kNi = decltype(size<2>(acc))::value;
  constexpr int kR = 2 * kMi;  // rows this thread holds
  constexpr int kC = 2 * kNi;  // columns this thread holds in each tile

  // Per-row state, in log2 units: shift m (running max, or fixed) and sum l of 2^(s - m);
  // positives: count, and sum s (uniform) or shift / sums of the soft weights 2^(nbt s).
  float sc[kR], m[kR], l[kR], cnt[kR], sw[kR], tm[kR], lw[kR];
  int64_t yi[kR], self_c[kR];
  CUTE_UNROLL
  for (int r = 0; r < kR; ++r) {
    const int64_t i = x0 + get<0>(coord(make_coord(0, r % 2), r / 2, 0));
    const bool ok = i < M;
    sc[r] = ok ? p.rnx[i] * p.inv_tau * kLog2e : 0.f;
    yi[r] = ok ? p.lx[i] : 0;
    self_c[r] = p.has_self ? i + p.shift : -1;
    m[r] = kFixed ? p.shift2 : -INFINITY, tm[r] = kFixed ? fabsf(p.nbt) * p.shift2 : -INFINITY;
    l[r] = 0.f, cnt[r] = 0.f, sw[r] = 0.f, lw[r] = 0.f;
  }
  const float nbt = p.nbt;
  constexpr bool kStatsPos = kMode != kFwdLse, kSoft = kMode == kFwdSoft;

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t y0 = int64_t(t) * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // tile t landed; tile t - 1's buffer is free
    if (t + 1 < n_tiles) {
      auto sYn = tile_y(buf ^ 1);
      load_rows<kBlockN, T>(p.y, y0 + kBlockN, D, sYn);
    }
    cp_async_fence();
    auto sY = tile_y(buf);
    clear(acc);
    Tensor tYs = thr_b.partition_S(sY);
    gemm_smem(tiled_mma, copy_a, tXs, tXr, tXr_v, copy_b, tYs, tYr, tYr_v, acc);
    if (t + 1 < n_tiles) stage_columns(t + 1, buf ^ 1);  // read after the next barrier

    float rn[kC];
    int64_t lab[kC], col[kC];
    CUTE_UNROLL
    for (int c = 0; c < kC; ++c) {
      const int lc = get<1>(coord(make_coord(c % 2, 0), 0, c / 2));
      rn[c] = st.cols[buf].rn[lc];
      lab[c] = st.cols[buf].label[lc];
      col[c] = y0 + lc;
    }
    const bool edge = y0 + kBlockN > N || meets_diagonal<kM, kBlockN>(p.has_self, p.shift, x0, y0);
    CUTE_UNROLL
    for (int r = 0; r < kR; ++r) {
      float s[kC];
      float tmax = -INFINITY, ttm = -INFINITY;
      CUTE_UNROLL
      for (int c = 0; c < kC; ++c) {
        s[c] = acc(make_coord(c % 2, r % 2), r / 2, c / 2) * sc[r] * rn[c];
        if (edge && (col[c] >= N || col[c] == self_c[r])) s[c] = -INFINITY;
        if constexpr (!kFixed) {
          tmax = fmaxf(tmax, s[c]);
          if (kSoft && lab[c] == yi[r] && s[c] != -INFINITY) ttm = fmaxf(ttm, s[c] * nbt);
        }
      }
      float m_use = m[r], tl = l[r], tw = tm[r];
      if constexpr (!kFixed) {
        tmax = quad_max(tmax);
        const float m_new = fmaxf(m[r], tmax);
        m_use = m_new == -INFINITY ? 0.f : m_new;
        tl *= exp2_ftz(m[r] - m_use);
        m[r] = m_new;
      }
      if constexpr (kSoft && !kFixed) {
        ttm = quad_max(ttm);
        const float t_new = fmaxf(tm[r], ttm);
        const float t_use = t_new == -INFINITY ? 0.f : t_new;
        const float f = exp2_ftz(tm[r] - t_use);
        lw[r] *= f, sw[r] *= f, tm[r] = t_new;
        tw = t_use;
      }
      CUTE_UNROLL
      for (int c = 0; c < kC; ++c) {
        tl += exp2_ftz(s[c] - m_use);
        if constexpr (kStatsPos) {
          // Masked columns have s = -inf: never positives.
          const bool pos = lab[c] == yi[r] && s[c] != -INFINITY;
          if (pos) {
            cnt[r] += 1.f;
            if constexpr (kSoft) {
              const float e = exp2_ftz(s[c] * nbt - tw);
              lw[r] += e;
              sw[r] += e * s[c];
            } else {
              sw[r] += s[c];
            }
          }
        }
      }
      l[r] = tl;
    }
  }

  const float ln2 = 0.6931471805599453f;
  CUTE_UNROLL
  for (int r = 0; r < kR; ++r) {
    const float lr = quad_sum(l[r]), c = quad_sum(cnt[r]), swr = quad_sum(sw[r]);
    const float lwr = quad_sum(lw[r]);
    const int64_t i = x0 + get<0>(coord(make_coord(0, r % 2), r / 2, 0));
    if (i >= M || (tid % 4) != 0) continue;
    const float lse = (m[r] + log2f(lr)) * ln2;
    float* out = p.stats + 4 * i;
    if constexpr (kMode == kFwdLse) {
      const float count = float(N - (p.has_self ? 1 : 0));
      p.valid[i] = count > 0.f;
      p.loss[i] = count > 0.f ? lse : 0.f;
      out[0] = lse, out[1] = 0.f, out[2] = 0.f, out[3] = count;
    } else {
      const bool ok = c > 0.f;
      const float sbar = ok ? (kSoft ? swr / lwr : swr / c) * ln2 : 0.f;
      const float logw = kSoft ? (tm[r] + log2f(lwr)) * ln2 : logf(c);
      p.valid[i] = ok;
      p.loss[i] = ok ? lse - sbar : 0.f;
      out[0] = lse, out[1] = sbar, out[2] = logw, out[3] = c;
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------
// Backward: dX (R, D) fp32 (the BwdArgs contract of supcon_kernels.h).

// G(x, y) / g-free part for one anchor, with s in natural units; q is 1/|P| (uniform) or
// log W * log2(e) (soft), lse2 = LSE * log2(e). Invalid anchors have g = 0, lse2 = q = +inf.
// kFtz: 2^x by exp2_ftz (the Hopper kernel); exp2f in this file's kernel, whose soft-mining
// variants ptxas gives a stack frame with the inline ex2.
template <int kMode, bool kFtz = false>
__device__ __forceinline__ float gterm(float s, bool pos, float g, float lse2, float q, float sbar,
                                       float nbt) {
  const auto exp2 = [](float x) { return kFtz ? exp2_ftz(x) : exp2f(x); };
  const float pr = exp2(fmaf(s, kLog2e, -lse2));
  if constexpr (kMode == kBwdLse) {
    return g * pr;
  } else if constexpr (kMode == kBwdUniform) {
    return g * (pr - (pos ? q : 0.f));
  } else {
    float w = pos ? exp2(fmaf(s, nbt * kLog2e, -q)) : 0.f;
    if constexpr (kMode == kBwdSoftExact) w *= 1.f + nbt * (s - sbar);
    return g * (pr - w);
  }
}

// Which anchors' statistics enter H (BwdArgs::outer / inner), fixed at compile time: one set
// needs both terms, each pass of two sets one.
enum Sides { kOuter = 1, kInner = 2, kBoth = 3 };

// The backward's epilogue, this kernel's and the Hopper one's (supcon_sm90.cuh): dX's rows
// undo the 1 / max|g| scale and take 1 / tau, then go to dx (fp32) or, through the
// normalisation and the rows' prescale factors, to df. Element e of dacc is row x0 + row0 + 8 ((e >> 1) & 1), column
// col0 + (e & 1) + 8 (e >> 2) in both kernels (checked on the host by
// tests/cuda_emulation/supcon_mma_layouts.cu): two row pointers and immediate offsets, so
// that the epilogue needs no address per element. A row's D columns lie in one quad, so
// z . dz is a quad sum.
template <typename T, typename Acc>
__device__ __forceinline__ void write_dx(const BwdArgs& p, Acc& dacc, int64_t x0, int row0, int col0) {
  const int64_t R = p.x.rows;
  const int D = int(p.D);
  const float scale = *p.gmax * p.inv_tau;
  if (p.df == nullptr) {
    CUTE_UNROLL
    for (int e = 0; e < size(dacc); e += 2) {
      const int64_t x = x0 + row0 + 8 * ((e >> 1) & 1);
      const int d = col0 + 8 * (e >> 2);  // even; elements e, e + 1 are columns d, d + 1
      if (x < R && d < D)
        *reinterpret_cast<float2*>(p.dx + x * D + d) = make_float2(dacc(e) * scale, dacc(e + 1) * scale);
    }
    return;
  }
  const T* xrow[2];
  T* frow[2];
  float dot[2] = {0.f, 0.f}, rn[2], pre[2];
  bool ok[2], project[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t x = x0 + row0 + 8 * r;
    ok[r] = x < R;
    xrow[r] = static_cast<const T*>(p.x.data) + (ok[r] ? x : 0) * p.x.s0 + col0;
    frow[r] = static_cast<T*>(p.df) + (ok[r] ? x : 0) * D + col0;
    rn[r] = ok[r] ? p.rnx[x] : 0.f;
    pre[r] = ok[r] && p.prescale != nullptr ? p.prescale[x] : 1.f;
    project[r] = ok[r] && p.norms != nullptr && p.norms[x] >= p.norm_eps;
  }
  CUTE_UNROLL
  for (int e = 0; e < size(dacc); ++e) {
    const int r = (e >> 1) & 1, off = (e & 1) + 8 * (e >> 2);
    dacc(e) *= scale;
    if (col0 + off < D) dot[r] += dacc(e) * float(xrow[r][off]);
  }
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) dot[r] = quad_sum(dot[r]) * rn[r];  // z . dz
  CUTE_UNROLL
  for (int e = 0; e < size(dacc); ++e) {
    const int r = (e >> 1) & 1, off = (e & 1) + 8 * (e >> 2);
    if (ok[r] && col0 + off < D) {
      const float v = project[r] ? dacc(e) - float(xrow[r][off]) * rn[r] * dot[r] : dacc(e);
      frow[r][off] = T(v * rn[r] * pre[r]);  // the prescale last: exact (a power of two)
    }
  }
}

// Calls launch(mode, sides), both std::integral_constant, for the backward variant a asks for.
template <int kMode, typename Launch>
cudaError_t dispatch_sides(const BwdArgs& a, Launch& launch) {
  using Mode = std::integral_constant<int, kMode>;
  if (a.outer && a.inner) return launch(Mode{}, std::integral_constant<int, kBoth>{});
  if (a.outer) return launch(Mode{}, std::integral_constant<int, kOuter>{});
  return launch(Mode{}, std::integral_constant<int, kInner>{});
}
template <typename Launch>
cudaError_t dispatch_bwd(const BwdArgs& a, Launch&& launch) {
  switch (a.mode) {
    case kBwdLse:
      return dispatch_sides<kBwdLse>(a, launch);
    case kBwdUniform:
      return dispatch_sides<kBwdUniform>(a, launch);
    case kBwdSoftDetached:
      return dispatch_sides<kBwdSoftDetached>(a, launch);
    default:
      return dispatch_sides<kBwdSoftExact>(a, launch);
  }
}

template <typename T, int kMode, int kSides>
__global__ void __launch_bounds__(kThreads) supcon_bwd_mma_kernel(const BwdArgs p) {
  constexpr bool kUseOuter = kSides & kOuter, kUseInner = kSides & kInner;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kM = kBwdRows, kBlockN = bwd_cols<kMode>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<SharedStorage<kM, kBlockN>*>(smem_raw);
  Tensor sX = make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.x)), SmemTile<kM>{});
  const int64_t R = p.x.rows, Q = p.y.rows;
  const int D = int(p.D);
  const int64_t x0 = int64_t(blockIdx.x) * kM;
  const int tid = threadIdx.x;
  const int n_tiles = int((Q + kBlockN - 1) / kBlockN);
  const float inv_gmax = 1.f / *p.gmax;
  const float nbt = p.nbt;
  // Anchor statistics in the units gterm takes; `none` is a row or column past the matrix,
  // or an outer / inner side that does not enter H: G = 0 exactly, no inf * 0.
  const float4 none = make_float4(0.f, INFINITY, kMode == kBwdUniform ? 0.f : INFINITY, 0.f);
  auto anchor_stats = [&](int64_t a) {
    const float g = p.anchor[a], lse = p.anchor[p.M + a], q = p.anchor[2 * p.M + a];
    return make_float4(g, lse * kLog2e, kMode == kBwdUniform ? q : q * kLog2e, p.anchor[3 * p.M + a]);
  };

  auto stage_columns = [&](int t, int buf) {
    if (tid < kBlockN) {
      const int64_t j = int64_t(t) * kBlockN + tid;
      const bool ok = j < Q;
      st.cols[buf].label[tid] = ok ? p.ly[j] : 0;
      st.cols[buf].rn[tid] = ok ? p.rny[j] : 0.f;
      if (kUseInner)
        st.cols[buf].anchor[tid] = ok ? anchor_stats(j) : none;
    }
  };
  auto tile_y = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTile<kBlockN>{});
  };
  auto tile_yt = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTileT<kBlockN>{});
  };

  load_rows<kM, T>(p.x, x0, D, sX);
  if (n_tiles > 0) {
    auto sY0 = tile_y(0);
    load_rows<kBlockN, T>(p.y, 0, D, sY0);
    stage_columns(0, 0);
  }
  cp_async_fence();

  TiledMma<T> tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  auto copy_a = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, T>{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  auto thr_bt = copy_bt.get_thread_slice(tid);
  Tensor tXs = thr_a.partition_S(sX);
  Tensor tXr = thr_mma.partition_fragment_A(sX);
  Tensor tYr = thr_mma.partition_fragment_B(tile_y(0));
  Tensor tYtr = thr_mma.partition_fragment_B(tile_yt(0));  // (MMA, kD / 8, kBlockN / 16)
  Tensor tXr_v = thr_a.retile_D(tXr);
  Tensor tYr_v = thr_b.retile_D(tYr);
  Tensor tYtr_v = thr_bt.retile_D(tYtr);
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kM>, Int<kBlockN>>{});
  Tensor dacc = partition_fragment_C(tiled_mma, Shape<Int<kM>, Int<kD>>{});
  clear(dacc);
  Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kBlockN>>{}));
  constexpr int kMi = decltype(size<1>(acc))::value, kNi = decltype(size<2>(acc))::value;
  constexpr int kR = 2 * kMi, kC = 2 * kNi;

  float sc[kR];
  float4 ar[kR];
  int64_t lxr[kR], self_c[kR];
  CUTE_UNROLL
  for (int r = 0; r < kR; ++r) {
    const int64_t x = x0 + get<0>(coord(make_coord(0, r % 2), r / 2, 0));
    const bool ok = x < R;
    sc[r] = ok ? p.rnx[x] * p.inv_tau : 0.f;
    lxr[r] = ok ? p.lx[x] : 0;
    ar[r] = (ok && kUseOuter) ? anchor_stats(x) : none;
    self_c[r] = p.has_self ? x + p.shift : -1;
  }

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t y0 = int64_t(t) * kBlockN;
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < n_tiles) {
      auto sYn = tile_y(buf ^ 1);
      load_rows<kBlockN, T>(p.y, y0 + kBlockN, D, sYn);
    }
    cp_async_fence();
    auto sY = tile_y(buf);
    clear(acc);
    Tensor tYs = thr_b.partition_S(sY);
    gemm_smem(tiled_mma, copy_a, tXs, tXr, tXr_v, copy_b, tYs, tYr, tYr_v, acc);
    if (t + 1 < n_tiles) stage_columns(t + 1, buf ^ 1);

    const bool diag = meets_diagonal<kM, kBlockN>(p.has_self, p.shift, x0, y0);
    const ColumnStats<kBlockN>& cs = st.cols[buf];
    CUTE_UNROLL
    for (int c = 0; c < kC; ++c) {
      const int lc = get<1>(coord(make_coord(c % 2, 0), 0, c / 2));
      const float rn = cs.rn[lc];
      const int64_t lab = cs.label[lc];
      const float4 ac = kUseInner ? cs.anchor[lc] : none;
      CUTE_UNROLL
      for (int r = 0; r < kR; ++r) {
        float& a = acc(make_coord(c % 2, r % 2), r / 2, c / 2);
        const float s = a * sc[r] * rn;
        const bool pos = lab == lxr[r];
        float h = 0.f;
        if constexpr (kUseOuter) h = gterm<kMode>(s, pos, ar[r].x, ar[r].y, ar[r].z, ar[r].w, nbt);
        if constexpr (kUseInner) h += gterm<kMode>(s, pos, ac.x, ac.y, ac.z, ac.w, nbt);
        if (diag && y0 + lc == self_c[r]) h = 0.f;
        a = h * inv_gmax * rn;  // H scaled into half range, times 1 / ||y_c||
      }
    }
    // dX += H Y: H from the accumulators as A fragments, Y^T from shared memory.
    Tensor h16 = make_tensor<T>(acc.layout());
    CUTE_UNROLL
    for (int e = 0; e < size(acc); ++e) h16(e) = T(acc(e));
    Tensor tHr = make_tensor(h16.data(), acc_as_a_operand(h16.layout()));
    Tensor tYts = thr_bt.partition_S(tile_yt(buf));
    constexpr int kSteps = decltype(size<2>(tHr))::value;
    CUTE_UNROLL
    for (int k = 0; k < kSteps; ++k) {
      copy(copy_bt, tYts(_, _, k), tYtr_v(_, _, k));
      gemm(tiled_mma, tHr(_, _, k), tYtr(_, _, k), dacc);
    }
  }

  Tensor dcoord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
  static_assert(decltype(size<1>(dacc))::value == 1, "one 16-row slab per warp: e's row is bit 1");
  write_dx<T>(p, dacc, x0, get<0>(dcoord(0)), get<1>(dcoord(0)));
#endif
}

// probe(device) for the current device, asked once per device and remembered (false for a
// device that cannot be named). Each call site's lambda is a type of its own, so its cache is.
template <typename Probe>
inline bool once_per_device(Probe probe) {
  static int cached[64] = {};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) cached[dev] = probe(dev) ? 1 : 2;
  return cached[dev] == 1;
}

// One CTA of kThreads per block_rows rows, with smem bytes of dynamic shared memory.
template <typename Args>
inline cudaError_t launch(void (*kernel)(Args), int64_t rows, int block_rows, int smem,
                          cudaStream_t stream, const Args& args) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in (per device; cheap to repeat).
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<unsigned((rows + block_rows - 1) / block_rows), kThreads, size_t(smem), stream>>>(args);
  return cudaGetLastError();
}

}  // namespace anchor_kernels::supcon_cuda::mma
