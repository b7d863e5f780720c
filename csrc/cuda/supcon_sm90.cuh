// Hopper (sm_90a) SupCon kernels on CuTe: TMA loads into a three-stage shared-memory pipeline
// signalled by mbarriers, wgmma with fp32 accumulation, producer / consumer warp
// specialisation with setmaxnreg, and the two consumer warpgroups taking turns at the tensor
// cores (ping-pong), so that one's products overlap the other's per-logit work.
//
// Forward: one CTA takes 128 anchors and streams the contrast set through 128-column tiles
// (64 for TF32 rows):
//   warpgroup 0, the producer, gives up registers (setmaxnreg.dec); one lane issues the TMA
//     copies (the anchor block once, a column tile per stage) and the warp's 32 lanes stage
//     the tile's label keys and inverse norms in shared memory beside it;
//   warpgroups 1 and 2, the consumers, take the registers (setmaxnreg.inc) and 64 anchor rows
//     each: in its turn, wgmma from shared memory to 64 fp32 accumulators per thread (32 for
//     TF32); then the per-logit work (inverse norms, masks, online log-sum-exp, positives) on
//     the accumulators in registers, and the stage is handed back to the producer.
// Backward: the same pipeline over 64-column tiles of the inner rows (32 with soft mining or
// TF32 rows);
// each consumer recomputes S for its 64 rows (wgmma from shared memory), forms H = G(S) from
// the accumulators, and feeds H, converted to the features' dtype, from registers as the A
// operand of dX += H Y (wgmma with Y's tile read transposed from the same shared memory, or
// for TF32 from its Y^T, below), in its next turn, with the next tile's S product: a tile
// costs two wgmma products and no shared-memory round trip of S or H.
// The maths and the statistics written are those of the sm_80 kernels (supcon_mma.cuh, whose
// gterm, quad reductions, chain-rule epilogue and variant dispatch these use) and of
// csrc/supcon.cpp. The inputs taken are those of the sm_80 kernels (bf16 / fp16, D <= 128,
// D % 8 == 0, rows contiguous, 16-byte aligned with a row stride % 8 == 0; TF32 rows too,
// D % 4 == 0) that a TMA descriptor can describe (supcon_sm90_fwd.cu: sm90_supported).
// TF32 backward: wgmma reads TF32 operands from shared memory K-major only, so dX += H Y
// cannot read Y's tile transposed in place; the producer warpgroup's three idle warps write
// each tile's Y^T beside it (transpose_tile), with the k order permuted so that H's
// accumulators are the A registers as they lie (yt_col), and signal it on a barrier of its
// own; its tiles are 32 columns (shared memory: the anchor block, three stages of Y and of Y^T
// in 4-byte elements, 160 KiB).
// The accumulator layout the loops assume (a thread holds rows r0 and r0 + 8 of its warp's 16
// and 32 columns, in pairs; a row's columns are spread over one quad) is checked on the host
// by tests/cuda_emulation/supcon_mma_layouts.cu; the shared-memory side (the wgmma descriptors
// of every product against the bytes the TMA copies and the transposers write) by
// supcon_sm90_smem.cu; the barriers' protocol by tests/test_supcon_sm90_pipeline.py.
// The kernel body exists only in sm_90a code (wgmma and setmaxnreg are sm_90a instructions);
// compiled for any other target it is empty, and the launcher never selects it there.
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "rows_cache.h"
#include "supcon_kernels.h"
#include "supcon_mma.cuh"

namespace anchor_kernels::supcon_cuda::sm90 {

using namespace cute;
using mma::exp2_ftz;
using mma::gterm;
using mma::kLog2e;
using mma::RowState;
using mma::tile_share;
using mma::tile_update;
using mma::write_stats;

constexpr int kD = 128;           // feature columns a tile holds (zero-filled by TMA past D)
constexpr int kM = 128;           // rows per CTA: two consumer warpgroups of 64 rows
// Column tiles in flight: the consumers run half a turn apart (ping-pong, below), so a stage is
// freed half a turn later than either is done with it (in the backward, a turn later: its dX
// product is issued with the next tile's S); a third stage gives the next copy that slack.
constexpr int kStages = 3;
constexpr int kConsumers = 2;     // consumer warpgroups
constexpr int kThreads = 128 * (1 + kConsumers);
template <typename T>
constexpr bool kIsTf32 = std::is_same_v<T, tfloat32_t>;
// Columns per forward tile: 128, or 64 for TF32 rows, whose 4-byte elements would take the
// anchor block and three 128-column stages to 256 KiB of shared memory (160 KiB with 64).
template <typename T>
constexpr int fwd_cols() { return kIsTf32<T> ? 64 : 128; }
// Columns per backward tile: 64, 32 with soft mining (as the sm_80 kernel: at 64 its registers
// spill); 32 for TF32 rows, whose stages hold Y^T too.
template <typename T>
constexpr int bwd_cols(int mode) { return kIsTf32<T> ? 32 : mma::bwd_cols(mode); }
constexpr int kProducerRegs = 40;   // setmaxnreg: 40 x 128 + 232 x 256 <= 64 K registers
constexpr int kConsumerRegs = 232;

// K-major (rows, kD) tiles, 128-byte swizzle: the layout TMA writes and wgmma reads (atoms of
// 8 rows of 128 bytes: 64 16-bit elements, or 32 TF32).
template <typename T, int kRows>
using SmemRows = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{}, Shape<Int<kRows>, Int<kD>>{}));
template <typename T, int kRows>
using SmemRowsStages = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                              Shape<Int<kRows>, Int<kD>, Int<kStages>>{}));
// The same bytes seen as (kD, rows, stages): the B operand of dX += H Y, MN-major (16-bit).
template <typename T, int kRows>
using SmemRowsStagesT = decltype(composition(
    SmemRowsStages<T, kRows>{},
    make_ordered_layout(Shape<Int<kD>, Int<kRows>, Int<kStages>>{}, Step<_2, _1, _3>{})));
// TF32: the B operand of dX += H Y, Y^T's own (kD, cols) tiles (and their stages), K-major.
template <int kCols>
using SmemYt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<tfloat32_t>{}, Shape<Int<kD>, Int<kCols>>{}));
template <int kCols>
using SmemYtStages = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<tfloat32_t>{},
                                            Shape<Int<kD>, Int<kCols>, Int<kStages>>{}));
// The TF32 k order of dX += H Y: within each 8, k = t + 4 h (t < 4) stands for column 2 t + h
// of the tile, the place of H's accumulator of that column in the registers a thread of quad
// lane t holds (S's columns 2 t and 2 t + 1 of each 8): Y^T's column k is Y's row yt_col(k).
CUTE_HOST_DEVICE constexpr int yt_col(int k) { return (k & ~7) + 2 * (k & 3) + ((k >> 2) & 1); }
CUTE_HOST_DEVICE constexpr int yt_k(int j) { return (j & ~7) + ((j & 7) >> 1) + 4 * (j & 1); }

// Two warpgroups stacked along the rows, each a 64 x kCols x 16 wgmma (x 8 for TF32) with both
// operands in shared memory (S = X Y^T) ...
template <typename T, int kCols>
using TiledMmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<T, T, float, Shape<_64, Int<kCols>, Int<kD>>>(),
                                          Layout<Shape<Int<kConsumers>, _1, _1>>{}));
// ... and 64 x kD x 16 with A (H) from registers and B (Y^T) MN-major in shared memory (TF32:
// x 8, B K-major from Y^T's tiles).
template <typename T, int kCols>
using TiledMmaDx = decltype(make_tiled_mma(
    GMMA::rs_op_selector<T, T, float, Shape<_64, Int<kD>, Int<kCols>>, GMMA::Major::K,
                         kIsTf32<T> ? GMMA::Major::K : GMMA::Major::MN>(),
    Layout<Shape<Int<kConsumers>, _1, _1>>{}));

// The wgmma accumulator layout ((2, 2, V), M, N) (column k, row i, column block) read as
// A-operand registers: 16-bit, ((2, 2, 2), M, V / 2), the A fragment of k-step q the
// accumulator pairs of columns 16 q ... 16 q + 15; TF32, ((2, 2), M, V), the A fragment of
// k-step q (row i, k = t + 4 h) the accumulators of column block q as they lie (row i, column
// 2 t + h): the k order of yt_col.
template <typename T, typename Layout>
CUTE_HOST_DEVICE auto acc_as_a_operand(Layout l) {
  if constexpr (kIsTf32<T>) {
    return make_layout(make_layout(get<0, 1>(l), get<0, 0>(l)), get<1>(l),
                       coalesce(make_layout(get<0, 2>(l), get<2>(l))));
  } else {
    auto d = logical_divide(l, Shape<Shape<Underscore, Underscore, _2>>{});
    return make_layout(make_layout(get<0, 0>(d), get<0, 1>(d), get<0, 2, 0>(d)), get<1>(d),
                       coalesce(make_layout(get<0, 2, 1>(d), get<2>(d))));
  }
}

// The tiles, the column inputs beside each (Cols: per-stage arrays the producer warp fills),
// and the barriers.
template <typename T, int kCols, typename Cols>
struct SharedStorage {
  alignas(1024) T x[kM * kD];           // 128-byte swizzled tiles want 1024-byte alignment
  alignas(1024) T y[kStages][kCols * kD];
  Cols cols[kStages];
  label_keys::SortedRows<kM> rows;      // the rows' labels, where one is out of a key's range
  uint64_t x_full;                      // the row block landed
  uint64_t full[kStages];               // a column tile and its column inputs landed
  uint64_t empty[kStages];              // every consumer warp is done with the stage
  static constexpr bool kTransposed = false;
};
// TF32 backward: each stage's Y^T (SmemYtStages), and a barrier per stage that it is written.
template <typename T, int kCols, typename Cols>
struct TransposedStorage : SharedStorage<T, kCols, Cols> {
  alignas(1024) T yt[kStages][kD * kCols];
  uint64_t yt_full[kStages];
  static constexpr bool kTransposed = true;
};

template <int kCols>
struct FwdCols {
  alignas(16) int32_t key[kCols];  // the labels' keys (label_keys.cuh)
  alignas(16) float rn[kCols];
};
template <int kCols>
struct BwdCols {
  alignas(16) int32_t key[kCols];  // the labels' keys (label_keys.cuh)
  alignas(16) float rn[kCols];
  float4 anchor[kCols];  // inner anchors: g, LSE log2(e), q', sbar (BwdArgs::anchor, staged)
};

template <typename T>
using FwdStorage = SharedStorage<T, fwd_cols<T>(), FwdCols<fwd_cols<T>()>>;
template <typename T, int kMode, int kCols = bwd_cols<T>(kMode)>
using BwdStorage = std::conditional_t<kIsTf32<T>, TransposedStorage<T, kCols, BwdCols<kCols>>,
                                      SharedStorage<T, kCols, BwdCols<kCols>>>;

// The TMA copy of (rows, D) row-major features into kRows x kD swizzled tiles.
template <typename T, int kRows>
auto make_tma_rows(const Matrix& m, int D) {
  Tensor g = make_tensor(make_gmem_ptr(static_cast<const T*>(m.data)),
                         make_shape(int(m.rows), D), make_stride(int(m.s0), Int<1>{}));
  return make_tma_copy(SM90_TMA_LOAD{}, g, SmemRows<T, kRows>{});
}
template <typename T, int kRows>
using TmaRows = decltype(make_tma_rows<T, kRows>(Matrix{}, 0));
// The same, remembered per host thread for the last few matrices: encoding a descriptor
// (make_tma_copy: a driver entry-point lookup, then cuTensorMapEncodeTiled) costs host time at
// every launch, and a training loop passes the same buffers call after call (the caching
// allocator hands the same blocks back). A descriptor holds the matrix's address, shape and
// strides and the tile (this function's template arguments): nothing else.
template <typename T, int kRows>
TmaRows<T, kRows> tma_rows(const Matrix& m, int D) {
  thread_local RowsCache<TmaRows<T, kRows>> cache;
  return cache.get(m, D, [&] { return make_tma_rows<T, kRows>(m, D); });
}

using Barrier = cutlass::arch::ClusterBarrier;
using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
constexpr int kConsumerWarps = 4 * kConsumers;
constexpr int kTransposers = 96;  // the producer warpgroup's warps 1 to 3 (TF32 backward)

template <typename Storage>
__device__ __forceinline__ void init_barriers(Storage& st) {
  if (threadIdx.x == 0) {
    TxBarrier::init(&st.x_full, 1);
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      TxBarrier::init(&st.full[s], 32);  // the producer warp: one expect_tx, 31 plain arrivals
      Barrier::init(&st.empty[s], kConsumerWarps);
      if constexpr (Storage::kTransposed) Barrier::init(&st.yt_full[s], kTransposers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
}

// The producer warp: the row block [kM blockIdx.x, +kM) of x once, then the kCols-row tiles
// t0 ... t0 + n_tiles - 1 of y into the stages in turn, each with its column inputs
// (stage_column(cols, c, j) fills column c of the stage from row j of y, or from nothing when
// j >= y's rows).
template <typename T, int kCols, typename Storage, typename TmaX, typename TmaY, typename StageColumn>
__device__ __forceinline__ void produce(Storage& st, const TmaX& tma_x, const TmaY& tma_y,
                                        const Matrix& x, const Matrix& y, int D, int t0, int n_tiles,
                                        StageColumn&& stage_column) {
  const int lane = threadIdx.x % 32;
  Tensor sX = make_tensor(make_smem_ptr(st.x), SmemRows<T, kM>{});
  Tensor sY = make_tensor(make_smem_ptr(&st.y[0][0]), SmemRowsStages<T, kCols>{});
  Tensor gX = local_tile(tma_x.get_tma_tensor(make_shape(int(x.rows), D)), Shape<Int<kM>, Int<kD>>{},
                         make_coord(int(blockIdx.x), 0));
  Tensor gY = local_tile(tma_y.get_tma_tensor(make_shape(int(y.rows), D)),
                         Shape<Int<kCols>, Int<kD>>{}, make_coord(_, 0));  // (kCols, kD, tiles)
  auto [tXg, tXs] = tma_partition(tma_x, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sX),
                                  group_modes<0, 2>(gX));
  auto [tYg, tYs] = tma_partition(tma_y, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sY),
                                  group_modes<0, 2>(gY));
  if (lane == 0) {
    TxBarrier::arrive_and_expect_tx(&st.x_full, kM * kD * sizeof(T));
    copy(tma_x.with(st.x_full), tXg, tXs);
  }
  for (int i = 0; i < n_tiles; ++i) {
    const int s = i % kStages, t = t0 + i;
    // A fresh barrier counts as having completed the phase before its first: round 0 passes.
    Barrier::wait(&st.empty[s], ((i / kStages) & 1) ^ 1);
    for (int c = lane; c < kCols; c += 32) stage_column(st.cols[s], c, int64_t(t) * kCols + c);
    if (lane == 0) {
      TxBarrier::arrive_and_expect_tx(&st.full[s], kCols * kD * sizeof(T));
      copy(tma_y.with(st.full[s]), tYg(_, t), tYs(_, s));
    } else {
      TxBarrier::arrive(&st.full[s]);  // after this lane's column inputs (release)
    }
  }
}

// Byte offsets in the 1024-byte aligned TF32 tiles of the backward (the 128-byte swizzle XORs
// address bits [4, 7) with bits [7, 10)): element (r, c) of a (kRows, kD) SmemRows tile, where
// TMA puts it (32-column boxes of kRows rows), and element (d, k) of a (kD, 32) SmemYt tile
// (one swizzle atom along k). tests/cuda_emulation/supcon_sm90_smem.cu checks both against
// the CuTe layouts.
CUTE_HOST_DEVICE constexpr int swizzle128(int a) { return a ^ (((a >> 7) & 7) << 4); }
template <int kRows>
CUTE_HOST_DEVICE constexpr int tf32_rows_byte(int r, int c) {  // (r, c >= 0: shifts, not divisions)
  return swizzle128((c >> 5) * kRows * 128 + r * 128 + 4 * (c & 31));
}
CUTE_HOST_DEVICE constexpr int tf32_yt_byte(int d, int k) { return swizzle128(d * 128 + 4 * k); }

// Y^T of a TF32 tile (y: the stage's kCols rows; yt: its SmemYt tile), yt(d, yt_k(j)) =
// y(j, d), by transposer `thread` of kTransposers: it keeps row j = thread % kCols and moves
// its 16-byte chunks c = thread / kCols, + kTransposers / kCols, ... (columns 4 c ... 4 c + 3)
// to four scalars of Y^T. A warp reads one chunk of 32 rows (spread over the banks by the
// swizzle) and writes 32 columns of a row of Y^T (conflict-free). The rows are TF32 already
// (the row pass rounds them): moved as float bits. Offsets from the tiles' own pointers, so
// that the accesses stay in shared memory (LDS / STS). Y^T's row d = 4 c + q is 128 d bytes
// on, and its swizzle XORs k's place with 16 (d % 8) = 64 (c % 2) + 16 q: from one offset of
// k's in a row, each store is an XOR and an immediate.
template <int kCols>
CUTE_HOST_DEVICE void transpose_tile(const char* y, char* yt, int thread) {
  static_assert(kCols == 32 && kTransposers % kCols == 0, "one swizzle atom of Y^T along k; a row a thread");
  const int j = thread % kCols, at_k = tf32_yt_byte(0, yt_k(j));  // (row 0: unswizzled)
#pragma unroll 2  // (unrolled whole, its loads take more than the producer's 40 registers)
  for (int c = thread / kCols; c < kD / 4; c += kTransposers / kCols) {
    const float4 v = *reinterpret_cast<const float4*>(y + tf32_rows_byte<kCols>(j, 4 * c));
    char* rows = yt + 512 * c;  // row 4 c
    const int k0 = at_k ^ ((c & 1) << 6);
    *reinterpret_cast<float*>(rows + k0) = v.x;
    *reinterpret_cast<float*>(rows + 128 + (k0 ^ 16)) = v.y;
    *reinterpret_cast<float*>(rows + 256 + (k0 ^ 32)) = v.z;
    *reinterpret_cast<float*>(rows + 384 + (k0 ^ 48)) = v.w;
  }
}

// The transposers (TF32 backward): each column tile's Y^T, once the tile has landed, into the
// stage's yt, then yt_full[s]. The stage is free: its tile landed after every consumer warp
// handed it back, which they do after the dX product that read the last Y^T there.
template <int kCols, typename Storage>
__device__ __forceinline__ void transpose(Storage& st, int n_tiles, int thread) {
  for (int t = 0; t < n_tiles; ++t) {
    const int s = t % kStages;
    TxBarrier::wait(&st.full[s], (t / kStages) & 1);
    transpose_tile<kCols>(reinterpret_cast<const char*>(st.y[s]), reinterpret_cast<char*>(st.yt[s]), thread);
    cutlass::arch::fence_view_async_shared();  // the writes, before wgmma reads them (async proxy)
    Barrier::arrive(&st.yt_full[s]);
  }
}

// Consumers hand a stage back once every lane of the warp is done with it.
template <typename Storage>
__device__ __forceinline__ void release(Storage& st, int s) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) Barrier::arrive(&st.empty[s]);
}

// acc = A B (zero) or acc += A B over the k-steps of the fragments, issued (asynchronous);
// wgmma_wait waits for every product issued. kRegA: A is in registers (fenced like the
// accumulators, so that no access to it moves across the asynchronous product).
template <bool kRegA = false, typename Mma, typename FA, typename FB, typename Acc>
__device__ __forceinline__ void wgmma_issue(Mma& mma, FA& a, const FB& b, Acc& acc, bool zero) {
  if constexpr (kRegA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  mma.accumulate_ = zero ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}
template <bool kRegA = false, typename FA, typename Acc>
__device__ __forceinline__ void wgmma_wait(FA& a, Acc& acc) {
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if constexpr (kRegA) warpgroup_fence_operand(a);
}

// Ping-pong (as FlashAttention-3's forward): the two consumer warpgroups take turns at the
// tensor cores, so that one's product runs while the other does its per-logit work. Without
// it both wait on the same tile's barrier and issue their products together, then both do
// the per-logit work: the tensor cores and the ALUs each idle half the time. Warpgroup w
// issues a product once the other has issued its previous one: it waits on named barrier w
// (its own 128 threads sync, the other's 128 arrive) and, after issuing, lets the other go.
struct PingPong {
  int wg;       // this consumer warpgroup: 0 or 1
  int n_turns;  // products each warpgroup issues
  static constexpr uint32_t kThreads = 2 * 128;

  __device__ void start() const {  // warpgroup 0 goes first
    if (wg == 1 && n_turns > 0) cutlass::arch::NamedBarrier::arrive(kThreads, 0);
  }
  __device__ void wait_turn() const { cutlass::arch::NamedBarrier::sync(kThreads, wg); }
  // After issuing turn t. Every arrival is waited for: warpgroup 0's n_turns syncs take the
  // first arrival and n_turns - 1 more, so warpgroup 1 skips its last.
  __device__ void pass_turn(int t) const {
    if (wg == 0 || t + 1 < n_turns) cutlass::arch::NamedBarrier::arrive(kThreads, wg ^ 1);
  }
};

template <typename T, int kMode, bool kFixed>
__global__ void __launch_bounds__(kThreads, 1)
    supcon_fwd_sm90_kernel(const FwdArgs p, CUTE_GRID_CONSTANT const TmaRows<T, kM> tma_x,
                           CUTE_GRID_CONSTANT const TmaRows<T, fwd_cols<T>()> tma_y) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kN = fwd_cols<T>();
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<FwdStorage<T>*>(smem_raw);
  const int64_t N = p.y.rows;
  const int64_t x0 = int64_t(blockIdx.x) * kM;
  const auto [all_tiles, t0, n_tiles] = tile_share<kN>(N);
  const auto key_of = label_keys::cta_keys_for<kMode != kFwdLse>(st.rows, p.lx, p.x.rows, x0, threadIdx.x, kThreads);
  init_barriers(st);

  if (threadIdx.x < 128) {  // producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x < 32)
      produce<T, kN>(st, tma_x, tma_y, p.x, p.y, int(p.D), t0, n_tiles,
                     [&](FwdCols<kN>& cols, int c, int64_t j) {
        if constexpr (kMode != kFwdLse) cols.key[c] = j < N ? key_of(p.ly[j], st.rows) : 0;
        cols.rn[c] = j < N ? p.rny[j] : 0.f;
      });
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  TiledMmaS<T, kN> mma;
  auto thr = mma.get_thread_slice(threadIdx.x - 128);
  Tensor sX = make_tensor(make_smem_ptr(st.x), SmemRows<T, kM>{});
  Tensor sY = make_tensor(make_smem_ptr(&st.y[0][0]), SmemRowsStages<T, kN>{});
  Tensor tSrX = thr.make_fragment_A(thr.partition_A(sX));  // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrY = thr.make_fragment_B(thr.partition_B(sY));  // (MMA, MMA_N, MMA_K, stages)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
  static_assert(decltype(size(acc))::value == kN / 2, "a thread holds 2 rows x kN / 4 columns");
  const int col0 = get<1>(coord(0));

  RowState rs[2];
  int64_t row[2];
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    row[i] = x0 + get<0>(coord(2 * i));
    rs[i] = RowState::of(p, row[i], kFixed, [&](int64_t l) { return key_of(l, st.rows); });
  }
  TxBarrier::wait(&st.x_full, 0);

  const PingPong turns{int(threadIdx.x - 128) / 128, n_tiles};
  turns.start();
  for (int i = 0; i < n_tiles; ++i) {
    const int s = i % kStages;
    const int64_t y0 = int64_t(t0 + i) * kN;
    TxBarrier::wait(&st.full[s], (i / kStages) & 1);
    turns.wait_turn();
    wgmma_issue(mma, tSrX, tSrY(_, _, _, s), acc, true);
    turns.pass_turn(i);
    wgmma_wait(tSrX, acc);
    const bool edge = y0 + kN > N || mma::meets_diagonal<kM, kN>(p.has_self, p.shift, x0, y0);
    if (mma::kEdgeCopy && edge)
      tile_update<kMode, true, kFixed, kN>(acc, rs, st.cols[s].key, st.cols[s].rn, col0, y0, N);
    else
      tile_update<kMode, false, kFixed, kN>(acc, rs, st.cols[s].key, st.cols[s].rn, col0, y0, N);
    release(st, s);
  }
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    if (gridDim.y > 1)
      mma::write_partial(p, row[i], rs[i]);  // merged by mma::supcon_fwd_merge_kernel
    else
      write_stats<kMode>(p, row[i], rs[i]);
  }
#endif
}

// ---------------------------------------------------------------------------------------
// Backward: dX (R, D) (the BwdArgs contract of supcon_kernels.h), with the chain rule through
// the normalisation in the epilogue when df is set, as the sm_80 kernel.

// Where the self pairs x + shift = y0 + c of a block's rows x = x0 + r (r < kM) lie among
// kCols-column tiles: in tiles t_lo ... t_hi, at c - r = delta(t) = base - (t - t_lo) kCols
// (INT_MIN elsewhere). 32-bit per-tile arithmetic, so that no 64-bit column index per row is
// held in registers; checked on the host by tests/cuda_emulation/supcon_fwd_math.cu.
template <int kCols>
struct SelfPairs {
  int t_lo = INT_MAX, t_hi = -1, base = 0;

  CUTE_HOST_DEVICE static SelfPairs of(bool has_self, int64_t shift, int64_t x0, int n_tiles) {
    SelfPairs sp;
    const int64_t d = x0 + shift;  // column of the block's first row's self pair
    if (has_self && d + kM > 0) {
      const int64_t lo = d > 0 ? d / kCols : 0;
      sp.t_lo = int(lo);
      sp.t_hi = int(d + kM - 1 < int64_t(n_tiles) * kCols ? (d + kM - 1) / kCols : n_tiles - 1);
      sp.base = int(d - lo * kCols);
    }
    return sp;
  }
  CUTE_HOST_DEVICE int delta(int t) const {
    return t >= t_lo && t <= t_hi ? base - (t - t_lo) * kCols : INT_MIN;
  }
};

template <typename T, int kMode, int kSides>
__global__ void __launch_bounds__(kThreads, 1)
    supcon_bwd_sm90_kernel(const BwdArgs p, CUTE_GRID_CONSTANT const TmaRows<T, kM> tma_x,
                           CUTE_GRID_CONSTANT const TmaRows<T, bwd_cols<T>(kMode)> tma_y) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBwdN = bwd_cols<T>(kMode);
  constexpr bool kUseOuter = kSides & mma::kOuter, kUseInner = kSides & mma::kInner;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<BwdStorage<T, kMode>*>(smem_raw);
  const int64_t R = p.x.rows, Q = p.y.rows;
  const int D = int(p.D);
  const int64_t x0 = int64_t(blockIdx.x) * kM;
  const auto [all_tiles, t0, n_tiles] = tile_share<kBwdN>(Q);
  // Anchor statistics in the units gterm takes; `none` is a row or column past the matrix,
  // or a side that does not enter H: G = 0 exactly, no inf * 0.
  const float4 none = make_float4(0.f, INFINITY, kMode == kBwdUniform ? 0.f : INFINITY, 0.f);
  auto anchor_stats = [&](int64_t a) {
    const float g = p.anchor[a], lse = p.anchor[p.M + a], q = p.anchor[2 * p.M + a];
    return make_float4(g, lse * kLog2e, kMode == kBwdUniform ? q : q * kLog2e, p.anchor[3 * p.M + a]);
  };
  const auto key_of = label_keys::cta_keys_for<kMode != kBwdLse>(st.rows, p.lx, R, x0, threadIdx.x, kThreads);
  init_barriers(st);

  if (threadIdx.x < 128) {  // producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (threadIdx.x < 32)
      produce<T, kBwdN>(st, tma_x, tma_y, p.x, p.y, D, t0, n_tiles,
                        [&](BwdCols<kBwdN>& cols, int c, int64_t j) {
        const bool ok = j < Q;
        if constexpr (kMode != kBwdLse) cols.key[c] = ok ? key_of(p.ly[j], st.rows) : 0;
        cols.rn[c] = ok ? p.rny[j] : 0.f;
        if (kUseInner) cols.anchor[c] = ok ? anchor_stats(j) : none;
      });
    else if constexpr (kIsTf32<T>)
      transpose<kBwdN>(st, n_tiles, threadIdx.x - 32);
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int ct = threadIdx.x - 128;
  TiledMmaS<T, kBwdN> mma_s;
  TiledMmaDx<T, kBwdN> mma_dx;
  auto thr_s = mma_s.get_thread_slice(ct);
  auto thr_dx = mma_dx.get_thread_slice(ct);
  Tensor sX = make_tensor(make_smem_ptr(st.x), SmemRows<T, kM>{});
  Tensor sY = make_tensor(make_smem_ptr(&st.y[0][0]), SmemRowsStages<T, kBwdN>{});
  Tensor sYt = [&] {  // 16-bit: Y's tile read transposed; TF32: the transposers' Y^T
    if constexpr (kIsTf32<T>) return make_tensor(make_smem_ptr(&st.yt[0][0]), SmemYtStages<kBwdN>{});
    else return make_tensor(make_smem_ptr(&st.y[0][0]), SmemRowsStagesT<T, kBwdN>{});
  }();
  Tensor tSrX = thr_s.make_fragment_A(thr_s.partition_A(sX));
  Tensor tSrY = thr_s.make_fragment_B(thr_s.partition_B(sY));      // (MMA, N, K, stages)
  Tensor tDrYt = thr_dx.make_fragment_B(thr_dx.partition_B(sYt));  // (MMA, kD, k-steps, stages)
  Tensor acc = partition_fragment_C(mma_s, Shape<Int<kM>, Int<kBwdN>>{});
  Tensor dacc = partition_fragment_C(mma_dx, Shape<Int<kM>, Int<kD>>{});
  clear(dacc);
  Tensor coord = thr_s.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kBwdN>>{}));
  const int col0 = get<1>(coord(0));
  const float inv_gmax = 1.f / *p.gmax;
  const float nbt = p.nbt;

  float sc[2];
  float4 ar[2];
  int32_t key[2];
  const int row0 = get<0>(coord(0));  // the thread's rows: row0 and row0 + 8 of the block
  CUTE_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int64_t x = x0 + row0 + 8 * i;
    const bool ok = x < R;
    sc[i] = ok ? p.rnx[x] * p.inv_tau : 0.f;
    key[i] = ok ? key_of(p.lx[x], st.rows) : 0;
    ar[i] = (ok && kUseOuter) ? anchor_stats(x) : none;
  }
  const auto self_pairs = SelfPairs<kBwdN>::of(p.has_self, p.shift, x0, all_tiles);
  TxBarrier::wait(&st.x_full, 0);

  // Turn t (ping-pong with the other consumer) issues tile t's S product and tile t - 1's dX
  // product together; H(t) is then formed while the other warpgroup's turn runs, and kept,
  // as the next turn's A operand. A stage is handed back once its dX product is done: turn
  // n_tiles issues the last dX product alone.
  Tensor h16 = make_tensor<T>(acc.layout());
  Tensor tHr = make_tensor(h16.data(), acc_as_a_operand<T>(h16.layout()));
  const PingPong turns{ct / 128, n_tiles + 1};
  turns.start();
  for (int t = 0; t <= n_tiles; ++t) {
    const int s = t % kStages, prev = (t + kStages - 1) % kStages;
    if (t < n_tiles) TxBarrier::wait(&st.full[s], (t / kStages) & 1);
    turns.wait_turn();
    if (t < n_tiles) wgmma_issue(mma_s, tSrX, tSrY(_, _, _, s), acc, true);
    if (t > 0) {
      if constexpr (kIsTf32<T>) Barrier::wait(&st.yt_full[prev], ((t - 1) / kStages) & 1);
      wgmma_issue<true>(mma_dx, tHr, tDrYt(_, _, _, prev), dacc, false);  // dX += H Y
    }
    turns.pass_turn(t);
    wgmma_wait<true>(tHr, acc);
    warpgroup_fence_operand(dacc);
    if (t > 0) release(st, prev);
    if (t == n_tiles) break;

    // H (times 1 / ||y|| and 1 / max|g|, into half range) on the accumulators: element
    // v = k + 2 i + 4 j is row i, column col0 + 8 j + k.
    const int self_delta = self_pairs.delta(t0 + t);
    const BwdCols<kBwdN>& cs = st.cols[s];
    CUTE_UNROLL
    for (int j = 0; j < kBwdN / 8; ++j)
      CUTE_UNROLL
      for (int k = 0; k < 2; ++k) {
        const int lc = col0 + 8 * j + k;
        const float rn = cs.rn[lc];
        const int32_t col_key = cs.key[lc];
        const float4 ac = kUseInner ? cs.anchor[lc] : none;
        CUTE_UNROLL
        for (int i = 0; i < 2; ++i) {
          const float sv = acc(k + 2 * i + 4 * j) * sc[i] * rn;
          const bool pos = col_key == key[i];
          float h = 0.f;
          if constexpr (kUseOuter) h = gterm<kMode, true>(sv, pos, ar[i].x, ar[i].y, ar[i].z, ar[i].w, nbt);
          if constexpr (kUseInner) h += gterm<kMode, true>(sv, pos, ac.x, ac.y, ac.z, ac.w, nbt);
          if (lc - (row0 + 8 * i) == self_delta) h = 0.f;
          if constexpr (kIsTf32<T>)  // rounded as the sm_80 TF32 backward rounds H
            h16(k + 2 * i + 4 * j) = T::bitcast(mma::cvt_rna_tf32(h * inv_gmax * rn));
          else
            h16(k + 2 * i + 4 * j) = T(h * inv_gmax * rn);
        }
      }
  }

  Tensor dcoord = thr_dx.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
  mma::write_dx<T>(p, dacc, x0, row0, get<1>(dcoord(0)));  // dX's rows are S's (host-checked)
#endif
}

// One CTA of kThreads per kM rows of args.x and split of its columns (grid (row blocks,
// splits)), with the Storage in dynamic shared memory.
template <typename Storage, typename Args, typename TmaX, typename TmaY>
inline cudaError_t launch(void (*kernel)(Args, TmaX, TmaY), const Args& args, const TmaX& tma_x,
                          const TmaY& tma_y, int splits, cudaStream_t stream) {
  constexpr int smem = int(sizeof(Storage));
  static_assert(smem <= 227 * 1024, "more shared memory than a Hopper CTA may take");
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((args.x.rows + kM - 1) / kM), unsigned(splits > 1 ? splits : 1));
  kernel<<<grid, kThreads, smem, stream>>>(args, tma_x, tma_y);
  return cudaGetLastError();
}

}  // namespace anchor_kernels::supcon_cuda::sm90
