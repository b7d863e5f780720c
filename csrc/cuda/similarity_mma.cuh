// Tensor-core similarity kernels for bf16 / fp16 rows on sm_80 and newer, on the tile
// machinery of the SupCon kernels (supcon_mma.cuh: swizzled shared-memory tiles filled by
// cp.async, ldmatrix fragments, mma.sync m16n8k16 with fp32 accumulation), for the inputs that
// machinery takes (supcon_cuda::mma_supported: D <= 128 with D % 8 == 0, 16-byte rows), and
// for TF32 rows (fp32 with TF32 allowed; D % 4 == 0) as the loss's kernels take them.
//
// Forward: a CTA keeps 128 rows of a in shared memory and streams its share of b's 64-row
// tiles through the two-stage pipeline; each tile's S = acc rna[i] inv_t rnb[j] goes from the
// accumulators to global memory, two columns per store where S's rows allow it.
// Backward, one side (dz = inv_t G (y / n_y)): a CTA owns 64 rows of dz, all D columns, and
// streams 64-wide tiles of G and y. G's tile comes by cp.async like the rows (kGT: G^T lies in
// memory, db's case, and ldmatrix.trans reads it); y's tile is scaled by 1 / n_y in place by
// the threads that copied it, before the barrier that hands the tile to the products (the y
// rows are scaled, never G: |y / n_y| <= 1 in any dtype, G / n_y can overflow float16).
// dz accumulates in fp32 registers and is written once; with fewer row blocks than two per SM
// the columns are split among CTAs (BwdArgs::splits), each writing a slice of dz that the
// chain-rule launch sums. TF32 (similarity_bwd_tf32): the same pipeline, with the products of
// the loss's TF32 backward (no ldmatrix.trans for 32-bit elements).
#pragma once

#include "similarity_kernels.h"
#include "supcon_mma.cuh"

namespace anchor_kernels::similarity_cuda::mma {

using namespace cute;
using supcon_cuda::mma::gemm_rows;
using supcon_cuda::mma::gemm_smem;
using supcon_cuda::mma::kD;
using supcon_cuda::mma::kThreads;
using supcon_cuda::mma::load_rows;
using supcon_cuda::mma::RowCopy;
using supcon_cuda::mma::SmemAtom;
using supcon_cuda::mma::SmemTile;
using supcon_cuda::mma::SmemTileT;
using supcon_cuda::mma::Stored;
using supcon_cuda::mma::TiledMma;
using supcon_cuda::mma::Word;

constexpr int kFwdRows = 128;  // rows of a per forward CTA
constexpr int kCols = 64;      // rows of b (forward) or of y and columns of G (backward) per tile
constexpr int kBwdRows = 64;   // rows of dz per backward CTA
constexpr int kMaxSpan = 8;    // most b tiles a forward CTA streams

template <typename T>
struct FwdStorage {
  alignas(128) Word<T> a[kFwdRows * kD];
  alignas(128) Word<T> b[2][kCols * kD];
};
static_assert(sizeof(FwdStorage<tfloat32_t>) <= supcon_cuda::mma::kTf32SharedBytes, "TF32 shared memory");
struct BwdStorage {
  alignas(128) uint16_t g[2][kBwdRows * kCols];
  alignas(128) uint16_t y[2][kCols * kD];
};
// TF32: G's tile as it lies, rows padded (conflict-free 8-byte reads of the A registers), the
// y tile, and y^T's (supcon_cuda::mma::transpose_tile; 32-bit elements have no ldmatrix.trans).
constexpr int kGPad = supcon_cuda::mma::kYtPad;
using GTileTf32 = Layout<Shape<Int<kBwdRows>, Int<kCols>>, Stride<Int<kCols + kGPad>, _1>>;
struct BwdStorageTf32 {
  alignas(128) float g[2][kBwdRows * (kCols + kGPad)];
  alignas(128) uint32_t y[2][kCols * kD];
  supcon_cuda::mma::YtTile<kCols> yt;
};

// A 64 x 64 tile of G as it lies in memory (rows r, or q with kGT), and the (r, q) view of it
// that the A operand reads.
using GTile = decltype(tile_to_shape(SmemAtom<>{}, Shape<Int<kBwdRows>, Int<kCols>>{}));
template <bool kGT>
using GTileA = std::conditional_t<kGT, decltype(composition(GTile{}, make_layout(Shape<Int<kBwdRows>, Int<kCols>>{},
                                                                                   GenRowMajor{}))),
                                  GTile>;

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

template <typename T>
__global__ void __launch_bounds__(kThreads) similarity_fwd_mma_kernel(const FwdArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<FwdStorage<T>*>(smem_raw);
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.a)), SmemTile<kFwdRows, T>{});
  const int64_t M = p.a.rows, N = p.b.rows;
  const int D = int(p.D);
  const int64_t x0 = int64_t(blockIdx.x) * kFwdRows;
  // This CTA's tiles of b: span of them from tile blockIdx.y * span (the launcher's grid).
  const int64_t all_tiles = (N + kCols - 1) / kCols;
  const int64_t span = (all_tiles + gridDim.y - 1) / gridDim.y, first = int64_t(blockIdx.y) * span;
  const int n_tiles = int(all_tiles - first < span ? all_tiles - first : span);
  const int tid = threadIdx.x;
  auto tile_b = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.b[buf])), SmemTile<kCols, T>{});
  };

  load_rows<kFwdRows, T, true>(p.a, x0, D, sA);
  if (n_tiles > 0) {
    auto sB0 = tile_b(0);
    load_rows<kCols, T, true>(p.b, first * kCols, D, sB0);
  }
  cp_async_fence();

  TiledMma<T> tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kFwdRows>, Int<kCols>>{});
  Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kFwdRows>, Int<kCols>>{}));
  constexpr int kMi = decltype(size<1>(acc))::value;  // m16 slabs of the thread's rows

  // Element v = k + 2 i + 4 j of slab mi is row i of the slab's two, column col0 + 8 j + k of
  // the tile (tests/cuda_emulation/supcon_mma_layouts.cu). Each row of the thread's keeps its
  // scale rna inv_t and its pointer at column col0, so that inner tiles store at immediate
  // offsets, two columns at a time where S's rows allow it.
  using S = Stored<T>;
  S* const s = static_cast<S*>(p.s);
  const bool pairs = p.ld_s % 2 == 0 && reinterpret_cast<uintptr_t>(s) % (2 * sizeof(S)) == 0;
  const int col0 = get<1>(coord(0));
  S* out[kMi][2];
  float scale[kMi][2];
  CUTE_UNROLL
  for (int mi = 0; mi < kMi; ++mi)
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int64_t row = x0 + get<0>(coord(make_coord(0, i), mi, 0));
      out[mi][i] = row < M ? s + row * p.ld_s + col0 : nullptr;
      scale[mi][i] = row < M ? p.rna[row] * p.inv_t : 0.f;
    }

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t y0 = (first + t) * kCols;
    cp_async_wait<0>();
    __syncthreads();  // tile t landed; tile t - 1's buffer is free
    if (t + 1 < n_tiles) {
      auto sBn = tile_b(buf ^ 1);
      load_rows<kCols, T, true>(p.b, y0 + kCols, D, sBn);
    }
    cp_async_fence();
    clear(acc);
    gemm_rows(tiled_mma, sA, tile_b(buf), acc);

    const int64_t cols = N - y0 - col0;  // of this thread's columns 8 j + k, those below cols exist
    float rb[kCols / 8][2];
    CUTE_UNROLL
    for (int j = 0; j < kCols / 8; ++j)
      CUTE_UNROLL
      for (int k = 0; k < 2; ++k) rb[j][k] = 8 * j + k < cols ? p.rnb[y0 + col0 + 8 * j + k] : 0.f;
    auto store = [&](auto inner_tile) {  // inner: all 64 columns exist, pairs allowed
      CUTE_UNROLL
      for (int mi = 0; mi < kMi; ++mi)
        CUTE_UNROLL
        for (int i = 0; i < 2; ++i) {
          if (out[mi][i] == nullptr) continue;
          S* o = out[mi][i] + y0;
          auto slab = acc(_, mi, _);
          CUTE_UNROLL
          for (int j = 0; j < kCols / 8; ++j) {
            const S v0 = S(slab(2 * i + 4 * j) * scale[mi][i] * rb[j][0]);
            const S v1 = S(slab(1 + 2 * i + 4 * j) * scale[mi][i] * rb[j][1]);
            if constexpr (decltype(inner_tile)::value) {
              *reinterpret_cast<Pair<S>*>(o + 8 * j) = Pair<S>{{v0, v1}};
            } else {
              if (8 * j < cols) o[8 * j] = v0;
              if (8 * j + 1 < cols) o[8 * j + 1] = v1;
            }
          }
        }
    };
    if (pairs && y0 + kCols <= N)
      store(std::true_type{});
    else
      store(std::false_type{});
  }
#endif
}

// cp.async of G's tile [x0, x0 + 64) x [q0, q0 + 64) into g as it lies in memory: rows r with
// columns q (G(r, q) at g[r gr + q]), or with kGT rows q with columns r (at g[q gq + r]). The
// launcher checks that the contiguous extent is a multiple of 8 and the rest 16-byte aligned,
// so that a chunk of 8 (4 for TF32) lies wholly inside or outside G (zero-filled). Thread t
// copies chunk t % kChunks of rows r0 + kStep k, r0 = t / kChunks < kStep (known to the
// compiler, which folds the swizzle).
template <bool kGT, typename T, typename Smem>
__device__ __forceinline__ void load_g(const BwdArgs& p, int64_t x0, int64_t q0, Smem& g) {
  constexpr int kE = supcon_cuda::mma::kChunk<T>, kChunks = kCols / kE, kStep = kThreads / kChunks;
  const int c = threadIdx.x % kChunks, r0 = (threadIdx.x / kChunks) % kStep;
  const int64_t row0 = kGT ? q0 : x0, col = (kGT ? x0 : q0) + kE * c;
  const int64_t rows = kGT ? p.y.rows : p.R, cols = kGT ? p.R : p.y.rows, ld = kGT ? p.gq : p.gr;
  const T* base = static_cast<const T*>(p.g);
  CUTE_UNROLL
  for (int k = 0; k < kBwdRows / kStep; ++k) {
    const int r = r0 + kStep * k;
    const bool ok = row0 + r < rows && col < cols;
    const T* src = ok ? base + (row0 + r) * ld + col : base;
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                    *reinterpret_cast<uint128_t*>(&g(r, kE * c)), ok);
  }
}

// y's tile rows [q0, q0 + kCols) times 1 / n_y, in place, for the chunks this thread copied
// (load_rows<kCols, T, true>: RowCopy's rows and chunk); its cp.async copies must have landed.
// Rows past Q are zeros and stay so.
// (TF32: T(float) rounds to nearest, ties away, in the bits the products read.)
template <typename T, typename Smem>
__device__ __forceinline__ void scale_rows(const BwdArgs& p, int64_t q0, Smem& y) {
  using Copy = RowCopy<kCols, T>;
  constexpr int kE = supcon_cuda::mma::kChunk<T>;
  const Copy cp = Copy::of(threadIdx.x);
  CUTE_UNROLL
  for (int k = 0; k < Copy::kPasses; ++k) {
    const int64_t q = q0 + cp.row(k);
    const float f = q < p.y.rows ? p.rny[q] : 0.f;
    uint128_t& chunk = *reinterpret_cast<uint128_t*>(&y(cp.row(k), kE * cp.c));
    uint128_t v = chunk;
    T* e = reinterpret_cast<T*>(&v);
    CUTE_UNROLL
    for (int i = 0; i < kE; ++i) e[i] = T(float(e[i]) * f);
    chunk = v;
  }
}

// cp.async of tile t: G's into g (load_g), y's rows into y.
template <bool kGT, typename T, typename SG, typename SY>
__device__ __forceinline__ void load_g_and_y(const BwdArgs& p, int64_t x0, int t, SG g, SY y) {
  load_g<kGT, T>(p, x0, int64_t(t) * kCols, g);
  load_rows<kCols, T, true>(p.y, int64_t(t) * kCols, int(p.D), y);
}

// The rows [t0, t1) of the Q tiles this CTA streams: its share of the row block's
// (BwdArgs::splits = gridDim.y; all of them without a split).
struct TileRange {
  int t0, t1;
  __device__ static TileRange of(const BwdArgs& p) {
    const int all_tiles = int((p.y.rows + kCols - 1) / kCols);
    const int per = int((all_tiles + gridDim.y - 1) / gridDim.y), t0 = int(blockIdx.y) * per;
    return {t0, min(all_tiles, t0 + per)};
  }
};

// dz's tile rows to global memory (this split's slice), times 1 / t. Element e of dacc: row
// row0 + 8 ((e >> 1) & 1), column col0 + (e & 1) + 8 (e >> 2) (as in supcon_mma.cuh's write_dx).
template <typename Acc>
__device__ __forceinline__ void write_dz(const BwdArgs& p, const Acc& dacc, int64_t x0, int row0, int col0) {
  const int64_t R = p.R;
  const int D = int(p.D);
  float* const dz = p.dz + (p.splits > 1 ? int64_t(blockIdx.y) * R * D : 0);  // this split's slice
  CUTE_UNROLL
  for (int e = 0; e < size(dacc); e += 2) {
    const int64_t x = x0 + row0 + 8 * ((e >> 1) & 1);
    const int d = col0 + 8 * (e >> 2);  // even; elements e, e + 1 are columns d, d + 1
    if (x < R && d < D)
      *reinterpret_cast<float2*>(dz + x * D + d) = make_float2(dacc(e) * p.inv_t, dacc(e + 1) * p.inv_t);
  }
}

// The TF32 backward side: the 16-bit kernel's tiles and pipeline, with the products of
// supcon_mma.cuh's TF32 backward (the k-steps' columns permuted, B from y^T: mma_tf32_yt). A
// register v of k-step j is G(row g + 8 (v & 1), column permuted_col(j, lane, v >> 1)), read from G's
// tile as it lies (G^T's with kGT) and rounded to TF32; y's tile is scaled by 1 / n_y in place
// (rounded there), then transposed.
template <bool kGT>
__device__ __forceinline__ void similarity_bwd_tf32(const BwdArgs& p) {
  using T = tfloat32_t;
  using supcon_cuda::mma::cvt_rna_tf32;
  using supcon_cuda::mma::permuted_col;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<BwdStorageTf32*>(smem_raw);
  const int64_t x0 = int64_t(blockIdx.x) * kBwdRows;
  const int tid = threadIdx.x, lane = tid % 32;
  const auto [t0, t1] = TileRange::of(p);  // tile t goes to buffer t & 1
  auto tile_g = [&](int buf) { return make_tensor(reinterpret_cast<T*>(st.g[buf]), GTileTf32{}); };
  auto tile_y = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTile<kCols, T>{});
  };
  auto load_tile = [&](int t, int buf) { load_g_and_y<kGT, T>(p, x0, t, tile_g(buf), tile_y(buf)); };
  if (t0 < t1) load_tile(t0, t0 & 1);
  cp_async_fence();

  TiledMma<T> tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor dacc = partition_fragment_C(tiled_mma, Shape<Int<kBwdRows>, Int<kD>>{});
  clear(dacc);
  Tensor dcoord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBwdRows>, Int<kD>>{}));
  static_assert(decltype(size<1>(dacc))::value == 1, "one 16-row slab per warp: e's row is bit 1");
  const int row0 = get<0>(dcoord(0)), col0 = get<1>(dcoord(0));

  for (int t = t0; t < t1; ++t) {
    const int buf = t & 1;
    cp_async_wait<0>();
    auto sY = tile_y(buf);
    scale_rows<T>(p, int64_t(t) * kCols, sY);
    __syncthreads();  // tile t landed and scaled; tile t - 1's buffers and y^T are free
    if (t + 1 < t1) load_tile(t + 1, buf ^ 1);
    cp_async_fence();
    supcon_cuda::mma::transpose_tile(sY, st.yt, tid);
    __syncthreads();  // y^T is in
    const float* g = st.g[buf];
    CUTE_UNROLL
    for (int j = 0; j < kCols / 8; ++j) {
      uint32_t a[4];
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const int r = row0 + 8 * (v & 1), q = permuted_col(j, lane, v >> 1);
        a[v] = cvt_rna_tf32(kGT ? g[q * (kCols + kGPad) + r] : g[r * (kCols + kGPad) + q]);
      }
      supcon_cuda::mma::mma_tf32_yt(a, st.yt, j, dacc);
    }
  }
  write_dz(p, dacc, x0, row0, col0);
}

// The 16-bit backward side: G's and y's tiles read by ldmatrix (G^T's and y's transposed).
template <typename T, bool kGT>
__device__ __forceinline__ void similarity_bwd_half(const BwdArgs& p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<BwdStorage*>(smem_raw);
  const int64_t x0 = int64_t(blockIdx.x) * kBwdRows;
  const int tid = threadIdx.x;
  const auto [t0, t1] = TileRange::of(p);  // tile t goes to buffer t & 1
  auto tile_g = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.g[buf])), GTile{});
  };
  auto tile_ga = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.g[buf])), GTileA<kGT>{});
  };
  auto tile_y = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTile<kCols>{});
  };
  auto tile_yt = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.y[buf])), SmemTileT<kCols>{});
  };
  auto load_tile = [&](int t, int buf) { load_g_and_y<kGT, T>(p, x0, t, tile_g(buf), tile_y(buf)); };
  if (t0 < t1) load_tile(t0, t0 & 1);
  cp_async_fence();

  TiledMma<T> tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  using GCopy = std::conditional_t<kGT, SM75_U16x8_LDSM_T, SM75_U32x4_LDSM_N>;
  auto copy_g = make_tiled_copy_A(Copy_Atom<GCopy, T>{}, tiled_mma);
  auto copy_yt = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, T>{}, tiled_mma);
  auto thr_g = copy_g.get_thread_slice(tid);
  auto thr_yt = copy_yt.get_thread_slice(tid);
  Tensor tGr = thr_mma.partition_fragment_A(tile_ga(0));   // (MMA, 1, kCols / 16)
  Tensor tYtr = thr_mma.partition_fragment_B(tile_yt(0));  // (MMA, kD / 8, kCols / 16)
  Tensor tGr_v = thr_g.retile_D(tGr);
  Tensor tYtr_v = thr_yt.retile_D(tYtr);
  Tensor dacc = partition_fragment_C(tiled_mma, Shape<Int<kBwdRows>, Int<kD>>{});
  clear(dacc);

  for (int t = t0; t < t1; ++t) {
    const int buf = t & 1;
    cp_async_wait<0>();
    auto sY = tile_y(buf);
    scale_rows<T>(p, int64_t(t) * kCols, sY);
    __syncthreads();  // tile t landed and scaled; tile t - 1's buffers are free
    if (t + 1 < t1) load_tile(t + 1, buf ^ 1);
    cp_async_fence();
    Tensor tGs = thr_g.partition_S(tile_ga(buf));
    Tensor tYts = thr_yt.partition_S(tile_yt(buf));
    gemm_smem(tiled_mma, copy_g, tGs, tGr, tGr_v, copy_yt, tYts, tYtr, tYtr_v, dacc);
  }

  Tensor dcoord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBwdRows>, Int<kD>>{}));
  static_assert(decltype(size<1>(dacc))::value == 1, "one 16-row slab per warp: e's row is bit 1");
  write_dz(p, dacc, x0, get<0>(dcoord(0)), get<1>(dcoord(0)));
}

template <typename T, bool kGT>
__global__ void __launch_bounds__(kThreads) similarity_bwd_mma_kernel(const BwdArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, tfloat32_t>)
    similarity_bwd_tf32<kGT>(p);
  else
    similarity_bwd_half<T, kGT>(p);
#endif
}

}  // namespace anchor_kernels::similarity_cuda::mma
