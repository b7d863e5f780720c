// Tensor-core SupCon kernels for bf16 / fp16 features on sm_80 and newer, written on CuTe
// (CUTLASS): the anchor block stays in shared memory, column tiles stream through a
// two-stage cp.async pipeline, the products run as mma.sync m16n8k16 with fp32 accumulation
// from ldmatrix fragments, and every per-logit operation (scale, mask, online log-sum-exp,
// positives, G) runs on the accumulators in registers: no S tile goes through shared memory.
// Both also take fp32 rows as TF32 (tfloat32_t: mma.sync m16n8k8, the same tiles at 4 bytes an
// element) where torch allows TF32 matmuls, and so do the similarity forward and the selection,
// which share the forward's S = A B^T; the row pass has rounded those rows to TF32 already
// (RowNormArgs::tf32), so the products are exact products of the rounded rows.
//
// The maths is that of supcon_kernels.cuh (and csrc/supcon.cpp); only the tiling differs:
//   forward:  128 anchors per CTA (4 warps x 32 rows), 64-column tiles;
//   backward: 64 rows per CTA, 64-column tiles (32 with soft mining); S = X Y^T is recomputed, H = G(S) is formed
//             in registers and fed straight back as the A operand of dX += H Y (the
//             accumulator layout of m16n8k16 is its A-operand layout), so each tile costs
//             two tensor-core products and no shared-memory round trip (TF32: the same with
//             the product's k permuted, and Y^T transposed through shared memory, as 32-bit
//             elements have no ldmatrix.trans: gemm_h_y_tf32).
// Features are read as 16-byte rows of up to kD = 128 columns (D a multiple of 8 elements, 4
// for TF32, and so the row stride; 16-byte aligned); zero-filled past D and past the last
// row. Other inputs take the kernels of supcon_kernels.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "label_keys.cuh"
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
constexpr int bwd_cols(int mode) { return mode == kBwdLse || mode == kBwdUniform ? 64 : 32; }
template <int kMode>
constexpr int bwd_cols() {
  return bwd_cols(kMode);
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
template <>
struct MmaOp<tfloat32_t> {
  using type = SM80_16x8x8_F32TF32TF32F32_TN;
};

// Calls launch(T{}) with T the CuTe element type of the S = A B^T kernels for dtype: half_t,
// bfloat16_t, or tfloat32_t for kTFloat32 rows (what mma_supported takes).
template <typename Launch>
cudaError_t with_element_type(Dtype dtype, Launch&& launch) {
  switch (dtype) {
    case Dtype::kFloat16:
      return launch(half_t{});
    case Dtype::kTFloat32:
      return launch(tfloat32_t{});
    default:
      return launch(bfloat16_t{});
  }
}

// Elements of a 16-byte chunk (a cp.async copy, an ldmatrix row): 8, or 4 for TF32.
template <typename T>
constexpr int kChunk = 16 / int(sizeof(T));

// 4 warps along M; the 64 x 16 x (two chunks) tile permutation lets ldmatrix.x4 feed whole
// fragments (K = 16 for 16-bit elements, 8 for TF32: one mma's K).
template <typename T>
using TiledMma = decltype(make_tiled_mma(typename MmaOp<T>::type{}, Layout<Shape<_4, _1, _1>>{},
                                         Tile<_64, _16, Int<2 * kChunk<T>>>{}));

// Row-major (rows, kD) tiles of T, 16-byte chunks XOR-swizzled by the row (8 rows of 128
// bytes: 64 16-bit elements or 32 TF32) so that ldmatrix is conflict-free.
template <typename T = half_t>
using SmemAtom = decltype(composition(Swizzle<3, sizeof(T) == 2 ? 3 : 2, 3>{},
                                      Layout<Shape<_8, Int<8 * kChunk<T>>>, Stride<Int<8 * kChunk<T>>, _1>>{}));
template <int kRows, typename T = half_t>
using SmemTile = decltype(tile_to_shape(SmemAtom<T>{}, Shape<Int<kRows>, Int<kD>>{}));
// The same bytes seen as (kD, rows): the B operand of dX += H Y.
template <int kRows>
using SmemTileT = decltype(composition(SmemTile<kRows>{},
                                       make_layout(Shape<Int<kD>, Int<kRows>>{}, GenRowMajor{})));

// Per-column inputs of one tile, staged in shared memory next to the features: the labels as
// the tile loop compares them (Label: int32_t, their keys, label_keys.cuh, in the forward;
// int64_t, the labels, in the backward: supcon_bwd_mma_kernel says why), 1 / norms, and the
// backward's inner anchors' statistics.
template <int kCols, typename Label>
struct ColumnStats {
  Label label[kCols];
  float rn[kCols];
  float4 anchor[kCols];  // backward, inner anchors: g, LSE * log2(e), q', sbar
};

// Shared-memory words of T (tiles hold T's bits), and T's type in global memory (TF32 rows are
// float32 there).
template <typename T>
using Word = uint_byte_t<int(sizeof(T))>;
template <typename T>
using Stored = std::conditional_t<std::is_same_v<T, tfloat32_t>, float, T>;

template <int kRows, int kCols, typename T, typename Label>
struct SharedStorage {
  alignas(128) Word<T> x[kRows * kD];
  alignas(128) Word<T> y[2][kCols * kD];
  ColumnStats<kCols, Label> cols[2];
};
// The forward's, with its anchors' labels sorted where one is out of a key's range.
template <typename T>
struct FwdStorage : SharedStorage<kFwdRows, kFwdCols, T, int32_t> {
  label_keys::SortedRows<kFwdRows> rows;
};
template <int kCols, typename T>
using BwdStorage = SharedStorage<kBwdRows, kCols, T, int64_t>;

// Thread t's share of a (kRows, kD) tile copy: 16-byte chunk c of rows r0 + kStep k, k < kPasses
// (every chunk of the tile once: tests/cuda_emulation/supcon_mma_layouts.cu). r0 < kStep is
// known to the compiler, which then folds each pass's swizzled shared-memory offset.
template <int kRows, typename T = half_t>
struct RowCopy {
  static constexpr int kChunks = kD / kChunk<T>, kStep = kThreads / kChunks, kPasses = kRows / kStep;
  static_assert(kThreads % kChunks == 0 && kRows % kStep == 0, "tile split");
  int c, r0;
  CUTE_HOST_DEVICE static RowCopy of(int thread) { return {thread % kChunks, (thread / kChunks) % kStep}; }
  CUTE_HOST_DEVICE int row(int k) const { return r0 + kStep * k; }
};

// cp.async of rows [row0, row0 + kRows) of m into the swizzled tile s (zeros past the matrix).
// kFolded (the forward): rows counted from RowCopy's r0 < kStep, each pass's swizzled offset
// folded; otherwise from t / kChunks, as the backward keeps them (its registers cannot spare
// the folded form's addresses: two of its variants spill).
template <int kRows, typename T, bool kFolded, typename Smem>
__device__ __forceinline__ void load_rows(const Matrix& m, int64_t row0, int D, Smem& s) {
  using Copy = RowCopy<kRows, T>;
  constexpr int kE = kChunk<T>;
  const T* base = static_cast<const T*>(m.data);
  auto copy_chunk = [&](int r, int c) {
    const int64_t row = row0 + r;
    const bool ok = row < m.rows && c * kE < D;
    const T* src = ok ? base + row * m.s0 + c * kE : base;
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                    *reinterpret_cast<uint128_t*>(&s(r, c * kE)), ok);
  };
  if constexpr (kFolded) {
    const Copy cp = Copy::of(threadIdx.x);
    CUTE_UNROLL
    for (int k = 0; k < Copy::kPasses; ++k) copy_chunk(cp.row(k), cp.c);
  } else {
    const int c = threadIdx.x % Copy::kChunks;
    CUTE_UNROLL
    for (int r = threadIdx.x / Copy::kChunks; r < kRows; r += Copy::kStep) copy_chunk(r, c);
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

// acc += A B^T for the (rows, kD) tiles sa and sb in shared memory, as the forwards and the
// selection form S for a column tile: this thread's ldmatrix fragments of both, loaded one k-step ahead
// (gemm_smem). The partitions of sa are the same every tile; inlined, they are formed once.
template <typename Mma, typename SA, typename SB, typename Acc>
__device__ __forceinline__ void gemm_rows(Mma& mma, SA const& sa, SB const& sb, Acc& acc) {
  using T = typename SA::value_type;
  auto thr_mma = mma.get_thread_slice(threadIdx.x);
  auto copy_a = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, mma);
  auto copy_b = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, mma);
  auto thr_a = copy_a.get_thread_slice(threadIdx.x);
  auto thr_b = copy_b.get_thread_slice(threadIdx.x);
  Tensor ra = thr_mma.partition_fragment_A(sa);
  Tensor rb = thr_mma.partition_fragment_B(sb);
  Tensor ra_v = thr_a.retile_D(ra);
  Tensor rb_v = thr_b.retile_D(rb);
  gemm_smem(mma, copy_a, thr_a.partition_S(sa), ra, ra_v, copy_b, thr_b.partition_S(sb), rb, rb_v, acc);
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

// Per-row state of the forwards' online statistics (both kernels'), in log2 units of s, except
// that sums over positives are kept in units of t = acc / ||y|| and scaled by sc once at the
// end: s = t sc, with sc = inv_tau log2(e) / ||x|| > 0, folds into exp2's FFMA.
// With a fixed shift (FwdArgs::shift2 > 0: normalised rows, |t sc| <= shift2) the shifts are
// that bound and its soft-weights counterpart, |t kn| <= |nbt| shift2, from the start: no
// running maxima, no rescaling (tile_update's kFixed).
struct RowState {
  float sc, kn;        // sc, and sc nbt: the soft weights' exponent per unit of t
  int32_t key;         // the label's key (label_keys.cuh)
  int64_t self_col;    // column of the self pair, or -1
  float m, l;          // shift of s (running max, or the fixed bound), sum of 2^(s - m)
  float cnt, sw;       // positives: count, sum of t (uniform) or of w t (soft)
  float tm, lw;        // soft: shift of t kn over positives, sum of 2^(t kn - tm)

  CUTE_HOST_DEVICE static RowState start(float sc, float nbt, int32_t key, int64_t self_col,
                                         float shift2 = 0.f) {
    const float m = shift2 > 0.f ? shift2 : -INFINITY, tm = shift2 > 0.f ? fabsf(nbt) * shift2 : -INFINITY;
    return {sc, sc * nbt, key, self_col, m, 0.f, 0.f, 0.f, tm, 0.f};
  }
  // Anchor row i of a forward (rows past M: finite, unused), its label keyed by key_of
  // (label_keys.cuh); fixed: FwdArgs::shift2's shifts.
  template <typename KeyOf>
  CUTE_HOST_DEVICE static RowState of(const FwdArgs& p, int64_t i, bool fixed, const KeyOf& key_of) {
    const bool ok = i < p.x.rows;
    return start(ok ? p.rnx[i] * p.inv_tau * kLog2e : 1.f, p.nbt, ok ? key_of(p.lx[i]) : 0,
                 p.has_self ? i + p.shift : -1, fixed ? p.shift2 : 0.f);
  }

  // The sums of another part of the row's columns folded in (both states' quad sums taken, as
  // a split writes them): each part's sums rescaled to the larger shift; soft mining's sum over
  // positives shares the soft weights' shift, plain SupCon's has none. With fixed shifts both
  // parts have the same shifts and every factor is 1.
  template <int kMode>
  CUTE_HOST_DEVICE void merge(float m2, float l2, float cnt2, float sw2, float tm2, float lw2) {
    const float m_new = fmaxf(m, m2), m_use = m_new == -INFINITY ? 0.f : m_new;
    l = l * exp2_ftz(m - m_use) + l2 * exp2_ftz(m2 - m_use);
    m = m_new;
    cnt += cnt2;
    if constexpr (kMode == kFwdSoft) {
      const float t_new = fmaxf(tm, tm2), t_use = t_new == -INFINITY ? 0.f : t_new;
      const float f = exp2_ftz(tm - t_use), f2 = exp2_ftz(tm2 - t_use);
      lw = lw * f + lw2 * f2;
      sw = sw * f + sw2 * f2;
      tm = t_new;
    } else {
      sw += sw2;
    }
  }
};

// The reductions over the four lanes of a quad, which hold the same rows: shuffles on the
// device; Quad is a parameter so that tests/cuda_emulation/supcon_fwd_math.cu can run the
// per-logit code below on the host with one lane holding a row's columns.
struct QuadShuffle {
  __device__ float max(float v) const { return quad_max(v); }
  __device__ float sum(float v) const { return quad_sum(v); }
};
// One lane holding the whole row (the merge of split statistics, the host checks).
struct OneLane {
  CUTE_HOST_DEVICE float max(float v) const { return v; }
  CUTE_HOST_DEVICE float sum(float v) const { return v; }
};

// A row's statistics from its final state (the FwdArgs contract: loss, valid, and stats
// LSE, sbar, log W, |P|); lse_count is |A(i)|, the count of the log-sum-exp-only mode.
struct RowStats {
  float loss, lse, sbar, logw, count;
  bool valid;
};
template <int kMode, typename Quad>
CUTE_HOST_DEVICE RowStats finish_row(const RowState& s, float lse_count, const Quad& quad) {
  const float ln2 = 0.6931471805599453f;
  const float l = quad.sum(s.l), c = quad.sum(s.cnt), sw = quad.sum(s.sw), lw = quad.sum(s.lw);
  const float lse = (s.m + log2f(l)) * ln2;
  if constexpr (kMode == kFwdLse) {
    const bool ok = lse_count > 0.f;
    return {ok ? lse : 0.f, lse, 0.f, 0.f, lse_count, ok};
  } else {
    constexpr bool kSoft = kMode == kFwdSoft;
    const bool ok = c > 0.f;
    const float sbar = ok ? (kSoft ? sw / lw : sw / c) * s.sc * ln2 : 0.f;
    const float logw = kSoft ? (s.tm + log2f(lw)) * ln2 : logf(c);
    return {ok ? lse - sbar : 0.f, lse, sbar, logw, c, ok};
  }
}

CUTE_HOST_DEVICE float lse_count(const FwdArgs& p) { return float(p.y.rows - (p.has_self ? 1 : 0)); }

CUTE_HOST_DEVICE void store_stats(const FwdArgs& p, int64_t i, const RowStats& r) {
  p.valid[i] = r.valid;
  p.loss[i] = r.loss;
  float* out = p.stats + 4 * i;
  out[0] = r.lse, out[1] = r.sbar, out[2] = r.logw, out[3] = r.count;
}

template <int kMode>
__device__ __forceinline__ void write_stats(const FwdArgs& p, int64_t i, const RowState& s) {
  const RowStats r = finish_row<kMode>(s, lse_count(p), QuadShuffle{});
  if (i >= p.x.rows || (threadIdx.x % 4) != 0) return;
  store_stats(p, i, r);
}

// A split's statistics of row i over its columns (FwdArgs::partial): the state's shifts and
// its quad sums, which RowState::merge takes.
__device__ __forceinline__ void write_partial(const FwdArgs& p, int64_t i, const RowState& s) {
  const float l = quad_sum(s.l), cnt = quad_sum(s.cnt), sw = quad_sum(s.sw), lw = quad_sum(s.lw);
  if (i >= p.x.rows || (threadIdx.x % 4) != 0) return;
  float* out = p.partial + (int64_t(blockIdx.y) * p.x.rows + i) * kFwdPartial;
  out[0] = s.m, out[1] = l, out[2] = cnt, out[3] = sw, out[4] = s.tm, out[5] = lw;
}

// One thread per row: the splits' statistics merged in split order (deterministic), then the
// row's statistics as the unsplit kernel writes them.
template <int kMode>
__global__ void supcon_fwd_merge_kernel(const FwdArgs p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.x.rows) return;
  // (no key: the splits counted the positives)
  RowState s = RowState::of(p, i, p.shift2 > 0.f, [](int64_t) { return 0; });
  for (int k = 0; k < p.splits; ++k) {
    const float* q = p.partial + (int64_t(k) * p.x.rows + i) * kFwdPartial;
    s.merge<kMode>(q[0], q[1], q[2], q[3], q[4], q[5]);
  }
  store_stats(p, i, finish_row<kMode>(s, lse_count(p), OneLane{}));
}
// After a forward on grid (row blocks, splits > 1), sm_80 or Hopper: the merge, a thread a row.
template <int kMode>
inline cudaError_t launch_fwd_merge(const FwdArgs& a, cudaStream_t stream) {
  supcon_fwd_merge_kernel<kMode><<<unsigned((a.x.rows + 255) / 256), 256, 0, stream>>>(a);
  return cudaGetLastError();
}

// Built with ANCHOR_KERNELS_INNER_TILES_ONLY (by tests/test_ext_build.py alone, never run), the
// forwards leave out the edge tiles' copy of their per-logit code (and the label keys their
// search of labels out of range, label_keys.cuh), so that the instructions an inner tile runs
// with labels in range can be counted from the SASS.
#if defined(ANCHOR_KERNELS_INNER_TILES_ONLY)
constexpr bool kEdgeCopy = false;
#else
constexpr bool kEdgeCopy = true;
#endif

// One kCols-column tile's per-logit work for two rows of a thread, 8 apart (an m16 slab of the
// sm_80 forward's accumulators, a Hopper consumer's 64-row slab): acc(v) for v = k + 2 i + 4 j
// is row i of the two, column col0 + 8 j + k (tests/cuda_emulation/supcon_mma_layouts.cu);
// key and rn are the tile's per-column inputs (the labels' keys, 1 / norms). kEdge tiles mask
// columns past N and the self pair; kFixed: the rows' shifts are fixed (RowState), no maxima
// are taken.
template <int kMode, bool kEdge, bool kFixed, int kCols, typename Acc, typename Quad = QuadShuffle>
CUTE_HOST_DEVICE void tile_update(Acc&& acc, RowState (&rs)[2], const int32_t* key, const float* rn,
                                  int col0, int64_t y0, int64_t N, const Quad& quad = {}) {
  constexpr int kPairs = kCols / 8;
  constexpr bool kStatsPos = kMode != kFwdLse, kSoft = kMode == kFwdSoft;
  // Pass 1: t = acc / ||y||, masks, the tile's row maxima (not needed with fixed shifts).
  float tmax[2] = {-INFINITY, -INFINITY};
  CUTE_UNROLL
  for (int j = 0; j < kPairs; ++j) {
    const int c = col0 + 8 * j;
    const float2 r2 = *reinterpret_cast<const float2*>(rn + c);
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i)
      CUTE_UNROLL
      for (int k = 0; k < 2; ++k) {
        float& t = acc(k + 2 * i + 4 * j);
        t *= k ? r2.y : r2.x;
        if (kEdge && (y0 + c + k >= N || y0 + c + k == rs[i].self_col)) t = -INFINITY;
        if constexpr (!kFixed) tmax[i] = fmaxf(tmax[i], t);
      }
  }
  float m_use[2] = {rs[0].m, rs[1].m}, tw[2] = {rs[0].tm, rs[1].tm};
  CUTE_UNROLL
  for (int i = 0; i < 2 && !kFixed; ++i) {
    RowState& r = rs[i];
    const float m_new = fmaxf(r.m, quad.max(tmax[i]) * r.sc);
    m_use[i] = m_new == -INFINITY ? 0.f : m_new;
    r.l *= exp2_ftz(r.m - m_use[i]);
    r.m = m_new;
  }
  if constexpr (kSoft && !kFixed) {
    // The tile's max of t kn over positives rescales the soft weights' running sums.
    float ttm[2] = {-INFINITY, -INFINITY};
    CUTE_UNROLL
    for (int j = 0; j < kPairs; ++j) {
      const int2 lab = *reinterpret_cast<const int2*>(key + col0 + 8 * j);
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i)
        CUTE_UNROLL
        for (int k = 0; k < 2; ++k) {
          const float t = acc(k + 2 * i + 4 * j);
          if ((k ? lab.y : lab.x) == rs[i].key && (!kEdge || t != -INFINITY))
            ttm[i] = fmaxf(ttm[i], t * rs[i].kn);
        }
    }
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      RowState& r = rs[i];
      const float t_new = fmaxf(r.tm, quad.max(ttm[i]));
      tw[i] = t_new == -INFINITY ? 0.f : t_new;
      const float f = exp2_ftz(r.tm - tw[i]);
      r.lw *= f, r.sw *= f, r.tm = t_new;
    }
  }
  // Pass 2: the exponentials and the positives.
  CUTE_UNROLL
  for (int j = 0; j < kPairs; ++j) {
    int2 lab{};
    if constexpr (kStatsPos) lab = *reinterpret_cast<const int2*>(key + col0 + 8 * j);
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i)
      CUTE_UNROLL
      for (int k = 0; k < 2; ++k) {
        RowState& r = rs[i];
        const float t = acc(k + 2 * i + 4 * j);
        r.l += exp2_ftz(fmaf(t, r.sc, -m_use[i]));
        if constexpr (kStatsPos) {
          // Masked columns have t = -inf: never positives.
          if ((k ? lab.y : lab.x) == r.key && (!kEdge || t != -INFINITY)) {
            r.cnt += 1.f;
            if constexpr (kSoft) {
              const float e = exp2_ftz(fmaf(t, r.kn, -tw[i]));
              r.lw += e;
              r.sw += e * t;
            } else {
              r.sw += t;
            }
          }
        }
      }
  }
}

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
  auto& st = *reinterpret_cast<FwdStorage<T>*>(smem_raw);
  Tensor sX = make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.x)), SmemTile<kM, T>{});
  const int D = int(p.D);
  const int64_t x0 = int64_t(blockIdx.x) * kM;
  const int tid = threadIdx.x;
  const auto key_of = label_keys::cta_keys_for<kMode != kFwdLse>(st.rows, p.lx, p.x.rows, x0, tid, kThreads);
  // This CTA's columns, its share of the row block's (FwdArgs::splits = gridDim.y; all of them
  // without a split): from c0 on, counted from there below (y0, N, the self pairs' columns).
  const int64_t per = ((p.y.rows + kBlockN - 1) / kBlockN + gridDim.y - 1) / gridDim.y * kBlockN;
  const int64_t c0 = per * blockIdx.y;
  const int64_t left = p.y.rows - c0, N = left < 0 ? 0 : left < per ? left : per;
  const Matrix y{static_cast<const T*>(p.y.data) + c0 * p.y.s0, N, p.y.s0, p.y.s1};
  const int64_t* const ly = p.ly + c0;
  const float* const rny = p.rny + c0;
  const int64_t shift = p.shift - c0;
  const int n_tiles = int((N + kBlockN - 1) / kBlockN);

  auto stage_columns = [&](int t, int buf) {  // label keys and 1 / norms of tile t
    if (tid < kBlockN) {
      const int64_t j = int64_t(t) * kBlockN + tid;
      const bool ok = j < N;
      if constexpr (kMode != kFwdLse) st.cols[buf].label[tid] = ok ? key_of(ly[j], st.rows) : 0;
      st.cols[buf].rn[tid] = ok ? rny[j] : 0.f;
    }
  };
  auto tile_y = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTile<kBlockN, T>{});
  };

  load_rows<kM, T, true>(p.x, x0, D, sX);
  if (n_tiles > 0) {
    auto sY0 = tile_y(0);
    load_rows<kBlockN, T, true>(y, 0, D, sY0);
    stage_columns(0, 0);
  }
  cp_async_fence();

  TiledMma<T> tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kM>, Int<kBlockN>>{});
  Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kBlockN>>{}));
  constexpr int kMi = decltype(size<1>(acc))::value;  // m16 slabs of the thread's rows

  // Per-row statistics (RowState), two rows 8 apart per m16 slab mi of the thread's rows.
  RowState rs[kMi][2];
  int64_t row[kMi][2];
  CUTE_UNROLL
  for (int mi = 0; mi < kMi; ++mi)
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      row[mi][i] = x0 + get<0>(coord(make_coord(0, i), mi, 0));
      rs[mi][i] = RowState::of(p, row[mi][i], kFixed, [&](int64_t l) { return key_of(l, st.rows); });
      if (p.has_self) rs[mi][i].self_col -= c0;
    }
  const int col0 = get<1>(coord(0));

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t y0 = int64_t(t) * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // tile t landed; tile t - 1's buffer is free
    if (t + 1 < n_tiles) {
      auto sYn = tile_y(buf ^ 1);
      load_rows<kBlockN, T, true>(y, y0 + kBlockN, D, sYn);
    }
    cp_async_fence();
    clear(acc);
    gemm_rows(tiled_mma, sX, tile_y(buf), acc);
    if (t + 1 < n_tiles) stage_columns(t + 1, buf ^ 1);  // read after the next barrier

    const bool edge = y0 + kBlockN > N || meets_diagonal<kM, kBlockN>(p.has_self, shift, x0, y0);
    const ColumnStats<kBlockN, int32_t>& cols = st.cols[buf];
    if (kEdgeCopy && edge) {
      CUTE_UNROLL
      for (int mi = 0; mi < kMi; ++mi)
        tile_update<kMode, true, kFixed, kBlockN>(acc(_, mi, _), rs[mi], cols.label, cols.rn, col0, y0, N);
    } else {
      CUTE_UNROLL
      for (int mi = 0; mi < kMi; ++mi)
        tile_update<kMode, false, kFixed, kBlockN>(acc(_, mi, _), rs[mi], cols.label, cols.rn, col0, y0, N);
    }
  }
  CUTE_UNROLL
  for (int mi = 0; mi < kMi; ++mi)
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      if (gridDim.y > 1)
        write_partial(p, row[mi][i], rs[mi][i]);
      else
        write_stats<kMode>(p, row[mi][i], rs[mi][i]);
    }
#endif
}

// A CTA's column tiles [t0, t0 + n): its share of the row block's `all` kCols-column tiles
// (FwdArgs / BwdArgs::splits = gridDim.y; all of them without a split), counted in the whole
// matrix's columns. The sm_80 backward and the Hopper kernels share them so; the sm_80 forward
// shares the same columns, counted from its first.
struct TileShare {
  int all, t0, n;
};
template <int kCols>
__device__ __forceinline__ TileShare tile_share(int64_t cols) {
  const int all = int((cols + kCols - 1) / kCols), per = (all + int(gridDim.y) - 1) / int(gridDim.y);
  const int t0 = int(blockIdx.y) * per;
  return {all, t0, max(0, min(per, all - t0))};
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
  if (p.df == nullptr) {  // dz to dx, or with split columns to this split's slice of it
    float* dx = p.dx + (p.splits > 1 ? int64_t(blockIdx.y) * R * D : 0);
    CUTE_UNROLL
    for (int e = 0; e < size(dacc); e += 2) {
      const int64_t x = x0 + row0 + 8 * ((e >> 1) & 1);
      const int d = col0 + 8 * (e >> 2);  // even; elements e, e + 1 are columns d, d + 1
      if (x < R && d < D)
        *reinterpret_cast<float2*>(dx + x * D + d) = make_float2(dacc(e) * scale, dacc(e + 1) * scale);
    }
    return;
  }
  using S = Stored<T>;  // (TF32 rows are float32 in memory, and so is their gradient)
  const S* xrow[2];
  S* frow[2];
  float dot[2] = {0.f, 0.f}, rn[2], pre[2];
  bool ok[2], project[2];
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    const int64_t x = x0 + row0 + 8 * r;
    ok[r] = x < R;
    xrow[r] = static_cast<const S*>(p.x.data) + (ok[r] ? x : 0) * p.x.s0 + col0;
    frow[r] = static_cast<S*>(p.df) + (ok[r] ? x : 0) * D + col0;
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
      frow[r][off] = S(v * rn[r] * pre[r]);  // the prescale last: exact (a power of two)
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

// The TF32 backward's dX += H Y. m16n8k8's accumulators (c0..c3 = acc(4 j + 0..3) of the S
// tile's n8 block j) give lane (g, t) = (lane / 4, lane % 4) columns 2t, 2t + 1 of rows g, g + 8,
// and its A operand asks for k = t and t + 4 of the same rows. Taken with its k-step's columns
// permuted (k = t is column 2t, k = t + 4 column 2t + 1), H is in place: (a0, a1, a2, a3) =
// (c0, c2, c1, c3), no shuffle (the 16-bit kernels read theirs as acc_as_a_operand). B then
// takes Y's rows in the same order: b0, b1 = Y(8 j + 2t, d), Y(8 j + 2t + 1, d) with d = 8 n + g
// for dX's n8 block n, one 8-byte load from a transposed copy of the tile (Y^T, kYtPad floats
// past each row: conflict-free), which the threads write from the swizzled tile (32-bit
// elements have no ldmatrix.trans). Checked on the host against CuTe's m16n8k8 layouts
// (tests/cuda_emulation/supcon_mma_layouts.cu).
CUTE_HOST_DEVICE constexpr int tf32_h_order(int v) { return v == 1 ? 2 : v == 2 ? 1 : v; }  // a_v = c_(this)
// The 16-bit kernels' copy of Y^T for dX's B operand: ldmatrix.trans. TF32 transposes the tile
// itself (transpose_tile), so its Y^T copy objects, a plain copy, are formed but never used.
template <typename T>
using YtCopyAtom = std::conditional_t<sizeof(T) == 2, Copy_Atom<SM75_U16x8_LDSM_T, T>, Copy_Atom<UniversalCopy<T>, T>>;
constexpr int kYtPad = 8;
template <int kCols>
struct YtTile {
  float v[kD][kCols + kYtPad];
};

// The backward's shared memory: BwdStorage, and for TF32 Y^T's tile after it.
template <int kMode, typename T>
constexpr int bwd_shared_bytes() {
  constexpr int kCols = bwd_cols<kMode>();
  return int(sizeof(BwdStorage<kCols, T>)) + (std::is_same_v<T, tfloat32_t> ? int(sizeof(YtTile<kCols>)) : 0);
}

// The most shared memory a TF32 kernel of the loss asks: the backward's (64 rows and two 64-row
// tiles at 4 bytes an element, the columns' labels and norms, and Y^T: 135.5 KiB) or the
// forward's (128 anchors, their labels sorted: 132 KiB); the similarity forward and the
// selection assert they ask no more. A device must grant a CTA as much for mma_supported to
// take TF32 rows (the similarity backward asks its own, 136 KiB: mma_bwd_supported there).
constexpr int kTf32SharedBytes = std::max(int(sizeof(FwdStorage<tfloat32_t>)),
                                          bwd_shared_bytes<kBwdLse, tfloat32_t>());

// x rounded to TF32 on the device (the A operand's H), as round_tf32 rounds on the host.
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
  uint32_t y;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(y) : "f"(x));
  return y;
}

// Y^T of the swizzled tile sy (kCols rows of kD): thread t moves the 16-byte chunks c = b +
// kStep k (columns 4c .. 4c + 3) of row q = t % kCols, b = t / kCols, to four scalars of yt
// each (a warp: 32 consecutive q of one chunk column; the reads spread over the banks by the
// swizzle, the writes conflict-free). Where a chunk lies in the swizzled tile depends on the
// row and on its place among the 8 of its 32-column atom, k % kPlaces, so the thread forms
// kPlaces pointers and reaches every chunk from one of them by whole atoms. kTransposeUnroll
// chunks an iteration: unrolled whole, the loads take registers that the one-set SupCon
// variants cannot spare (they spill).
constexpr int kTransposeUnroll = 4;
template <int kCols>
constexpr int transpose_iterations() {
  return kCols * kD / 4 / kThreads / kTransposeUnroll;
}
template <int kCols, typename SY>
CUTE_HOST_DEVICE void transpose_tile(const SY& sy, YtTile<kCols>& yt, int thread) {
  constexpr int kStep = kThreads / kCols, kPlaces = 8 / kStep;
  static_assert(kThreads % kCols == 0 && kTransposeUnroll % kPlaces == 0 && transpose_iterations<kCols>() > 0 &&
                    transpose_iterations<kCols>() * kTransposeUnroll * kStep * 4 == kD,
                "whole iterations per thread");
  const int q = thread % kCols, b = thread / kCols;
  const tfloat32_t* place[kPlaces];
  CUTE_UNROLL
  for (int m = 0; m < kPlaces; ++m) place[m] = &sy(q, 4 * (b + kStep * m));
  const auto atom = &sy(q, 32) - &sy(q, 0);  // (the layout's: a constant)
#pragma unroll 1
  for (int it = 0; it < transpose_iterations<kCols>(); ++it) {
    CUTE_UNROLL
    for (int m = 0; m < kTransposeUnroll; ++m) {
      const int k = kTransposeUnroll * it + m, d = 4 * (b + kStep * k);
      const float4 v = *reinterpret_cast<const float4*>(place[m % kPlaces] + k / kPlaces * atom);
      yt.v[d][q] = v.x, yt.v[d + 1][q] = v.y, yt.v[d + 2][q] = v.z, yt.v[d + 3][q] = v.w;
    }
  }
}

// The permuted k, for lane = 4 g + t: k = t + 4 h of k-step j stands for column
// permuted_col(j, lane, h) = 8 j + 2t + h (of S and G; a row of Y). A register v of k-step j
// holds k = t + 4 (v >> 1) of the rows g + 8 (v & 1) (the thread's two); B register v (0, 1) of
// dX's n8 block n holds Y^T(yt_row(n, lane), permuted_col(j, lane, v)), yt_row = 8 n + g.
CUTE_HOST_DEVICE constexpr int permuted_col(int j, int lane, int h) { return 8 * j + 2 * (lane % 4) + h; }
CUTE_HOST_DEVICE constexpr int yt_row(int n, int lane) { return 8 * n + lane / 4; }

// dacc (the thread's 16 x kD block of m16n8 accumulators) += A B for k-step j: a the A
// registers (the permuted k), B from yt.
template <int kCols, typename DAcc>
__device__ __forceinline__ void mma_tf32_yt(const uint32_t (&a)[4], const YtTile<kCols>& yt, int j, DAcc& dacc) {
  const int lane = threadIdx.x % 32;
  CUTE_UNROLL
  for (int n = 0; n < kD / 8; ++n) {
    const float2 b = *reinterpret_cast<const float2*>(&yt.v[yt_row(n, lane)][permuted_col(j, lane, 0)]);
    SM80_16x8x8_F32TF32TF32F32_TN::fma(dacc(4 * n), dacc(4 * n + 1), dacc(4 * n + 2), dacc(4 * n + 3),
                                       a[0], a[1], a[2], a[3], __float_as_uint(b.x), __float_as_uint(b.y),
                                       dacc(4 * n), dacc(4 * n + 1), dacc(4 * n + 2), dacc(4 * n + 3));
  }
}

// dacc += H Y for one tile, TF32: acc holds H (fp32, rounded here), yt the tile's Y^T.
template <int kCols, typename Acc, typename DAcc>
__device__ __forceinline__ void gemm_h_y_tf32(const Acc& acc, const YtTile<kCols>& yt, DAcc& dacc) {
  CUTE_UNROLL
  for (int j = 0; j < kCols / 8; ++j) {
    uint32_t a[4];
    CUTE_UNROLL
    for (int v = 0; v < 4; ++v) a[v] = cvt_rna_tf32(acc(4 * j + tf32_h_order(v)));
    mma_tf32_yt(a, yt, j, dacc);
  }
}

template <typename T, int kMode, int kSides>
__global__ void __launch_bounds__(kThreads) supcon_bwd_mma_kernel(const BwdArgs p) {
  constexpr bool kUseOuter = kSides & kOuter, kUseInner = kSides & kInner;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kM = kBwdRows, kBlockN = bwd_cols<kMode>();
  constexpr bool kTf32 = std::is_same_v<T, tfloat32_t>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<BwdStorage<kBlockN, T>*>(smem_raw);
  auto& yt = *reinterpret_cast<YtTile<kBlockN>*>(smem_raw + sizeof(BwdStorage<kBlockN, T>));  // TF32
  Tensor sX = make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.x)), SmemTile<kM, T>{});
  const int64_t R = p.x.rows, Q = p.y.rows;
  const int D = int(p.D);
  const int64_t x0 = int64_t(blockIdx.x) * kM;
  const int tid = threadIdx.x;
  // This CTA's column tiles [t0, t1) (tile_share), counted as in the whole so that no offset
  // takes registers the one-set variants cannot spare.
  const TileShare share = tile_share<kBlockN>(Q);
  const int t0 = share.t0, t1 = share.t0 + share.n;
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
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTile<kBlockN, T>{});
  };
  auto tile_yt = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTileT<kBlockN>{});
  };

  load_rows<kM, T, false>(p.x, x0, D, sX);
  if (t0 < t1) {  // tile t goes to buffer t & 1
    auto sY0 = tile_y(t0 & 1);
    load_rows<kBlockN, T, false>(p.y, int64_t(t0) * kBlockN, D, sY0);
    stage_columns(t0, t0 & 1);
  }
  cp_async_fence();

  TiledMma<T> tiled_mma;
  // S's operands as gemm_rows forms them, here beside dX's (Y^T); the helper itself costs
  // this kernel a register more than its budgets allow (mode 2, one set: 50.1 per logit).
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  auto copy_a = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, T>{}, tiled_mma);
  auto copy_bt = make_tiled_copy_B(YtCopyAtom<T>{}, tiled_mma);
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
  // The labels compare as int64 here, not as the forward's 32-bit keys: with keys, ptxas
  // (nvcc 13.0) recomputed the ldmatrix addresses every tile, 50 to 180 more instructions a
  // tile of plain SupCon than the compares save.
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

  for (int t = t0; t < t1; ++t) {
    const int buf = t & 1;
    const int64_t y0 = int64_t(t) * kBlockN;
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < t1) {
      auto sYn = tile_y(buf ^ 1);
      load_rows<kBlockN, T, false>(p.y, y0 + kBlockN, D, sYn);
    }
    cp_async_fence();
    auto sY = tile_y(buf);
    clear(acc);
    Tensor tYs = thr_b.partition_S(sY);
    gemm_smem(tiled_mma, copy_a, tXs, tXr, tXr_v, copy_b, tYs, tYr, tYr_v, acc);
    if (t + 1 < t1) stage_columns(t + 1, buf ^ 1);

    const bool diag = meets_diagonal<kM, kBlockN>(p.has_self, p.shift, x0, y0);
    const ColumnStats<kBlockN, int64_t>& cs = st.cols[buf];
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
    if constexpr (kTf32) {
      transpose_tile(sY, yt, tid);  // (the previous tile's readers passed this tile's first barrier)
      __syncthreads();
      gemm_h_y_tf32(acc, yt, dacc);
    } else {
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

// Attribute kAttr of the current device, asked once per device (0 if it cannot be named).
template <cudaDeviceAttr kAttr>
inline int device_attribute() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (cached[dev] == 0 && cudaDeviceGetAttribute(&cached[dev], kAttr, dev) != cudaSuccess) cached[dev] = 0;
  return cached[dev];
}
inline int multiprocessors() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }
// The shared memory a CTA may opt in to: what the TF32 kernels' rules compare their needs with.
inline int shared_memory_optin() { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

// How many CTAs share a row block's columns (FwdArgs::splits, BwdArgs::splits) for `rows` rows
// in blocks of block_rows and `cols` columns in tiles of tile_cols: enough for two CTAs per SM
// where the row blocks give fewer, each keeping 4 column tiles at least (the row block's load
// and the split's partial results stay small beside its products), 64 at most.
inline int column_splits(int64_t rows, int block_rows, int64_t cols, int tile_cols) {
  const int64_t row_blocks = (rows + block_rows - 1) / block_rows, tiles = (cols + tile_cols - 1) / tile_cols;
  const int64_t want = (2 * int64_t(multiprocessors()) + row_blocks - 1) / row_blocks;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, tiles / 4, 64})));
}

// One CTA of kThreads per block_rows rows and split (grid (row blocks, splits)), with smem
// bytes of dynamic shared memory.
template <typename Args>
inline cudaError_t launch(void (*kernel)(Args), int64_t rows, int block_rows, int splits, int smem,
                          cudaStream_t stream, const Args& args) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in (per device; cheap to repeat).
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((rows + block_rows - 1) / block_rows), unsigned(splits > 1 ? splits : 1));
  kernel<<<grid, kThreads, size_t(smem), stream>>>(args);
  return cudaGetLastError();
}

// The backward for element type T on grid (row blocks, BwdArgs::splits).
template <typename T>
cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  return dispatch_bwd(a, [&](auto mode, auto sides) {
    constexpr int kMode = decltype(mode)::value;
    return launch(supcon_bwd_mma_kernel<T, kMode, decltype(sides)::value>, a.x.rows, kBwdRows, a.splits,
                  bwd_shared_bytes<kMode, T>(), stream, a);
  });
}

}  // namespace anchor_kernels::supcon_cuda::mma
