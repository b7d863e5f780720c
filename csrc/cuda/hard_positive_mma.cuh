// Tensor-core hard-positive selection for bf16 / fp16 rows on sm_80 and newer, and TF32 rows
// (fp32 with TF32 allowed), on the tile machinery of the SupCon kernels (supcon_mma.cuh), for
// the inputs it takes (supcon_cuda::mma_supported: D <= 128 with D % 8 == 0, or 4 for TF32,
// 16-byte rows). The rule and the
// per-anchor selection are those of hard_positive_kernels.cuh (Anchor, TopK); only the
// product differs.
//
// One CTA of 128 threads keeps 64 anchors in shared memory and streams the contrast set's
// 64-row tiles (with their labels and inverse norms) through the two-stage cp.async pipeline.
// A tile with no positive for any of its anchors is skipped before the product (the CTA asks
// with __syncthreads_or). Otherwise the mma.sync product goes from the accumulators to a float
// tile in shared memory, and thread r (< 64) folds row r of it into its anchor's top-k.
#pragma once

#include "hard_positive_kernels.cuh"
#include "supcon_mma.cuh"

namespace anchor_kernels::hard_positive_cuda::mma {

using namespace cute;
using detail::Anchor;
namespace label_keys = supcon_cuda::label_keys;
using supcon_cuda::mma::gemm_rows;
using supcon_cuda::mma::kD;
using supcon_cuda::mma::kThreads;
using supcon_cuda::mma::load_rows;
using supcon_cuda::mma::SmemTile;
using supcon_cuda::mma::TiledMma;
using supcon_cuda::mma::Word;

constexpr int kRows = 64;  // anchors per CTA: the 4 warps' 16-row slabs
constexpr int kCols = 64;  // contrast rows per tile

template <typename T>
struct Storage {
  alignas(128) Word<T> z[kRows * kD];
  alignas(128) Word<T> c[2][kCols * kD];
  float s[kRows][kCols + 1];  // the tile's products; + 1: rows read down a column stay conflict-free
  int32_t label_key[2][kCols];
  label_keys::SortedRows<kRows> rows;  // the anchors' labels, where one is out of a key's range
  float rn[2][kCols];
};

static_assert(sizeof(Storage<tfloat32_t>) <= supcon_cuda::mma::kTf32SharedBytes, "TF32 shared memory");

template <typename T>
__global__ void __launch_bounds__(kThreads) hard_positive_mma_kernel(const Args p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& st = *reinterpret_cast<Storage<T>*>(smem_raw);
  Tensor sZ = make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.z)), SmemTile<kRows, T>{});
  const int64_t N = p.c.rows;
  const int D = int(p.D);
  const int64_t x0 = int64_t(blockIdx.x) * kRows;
  const int tid = threadIdx.x;
  const auto key_of = label_keys::cta_keys(st.rows, p.lz, p.z.rows, x0, tid, kThreads);
  Anchor anchor = Anchor::of(p, x0, tid, key_of, st.rows);
  const int n_tiles = int((N + kCols - 1) / kCols);

  auto tile_c = [&](int buf) {
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(st.c[buf])), SmemTile<kCols, T>{});
  };
  auto stage_columns = [&](int t, int buf) {  // label keys and inverse norms of tile t
    if (tid < kCols) {
      const int64_t j = int64_t(t) * kCols + tid;
      st.label_key[buf][tid] = j < N ? key_of(p.lc[j], st.rows) : 0;
      st.rn[buf][tid] = j < N ? p.rnc[j] : 0.f;
    }
  };

  load_rows<kRows, T, false>(p.z, x0, D, sZ);
  if (n_tiles > 0) {
    auto sC0 = tile_c(0);
    load_rows<kCols, T, false>(p.c, 0, D, sC0);
    stage_columns(0, 0);
  }
  cp_async_fence();

  TiledMma<T> tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kRows>, Int<kCols>>{});
  Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{}));

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t y0 = int64_t(t) * kCols;
    const int cols = int(N - y0 < kCols ? N - y0 : kCols);
    cp_async_wait<0>();
    __syncthreads();  // tile t is in; tile t - 1's buffers and products are consumed
    if (t + 1 < n_tiles) {
      auto sCn = tile_c(buf ^ 1);
      load_rows<kCols, T, false>(p.c, y0 + kCols, D, sCn);
      stage_columns(t + 1, buf ^ 1);
    }
    cp_async_fence();
    // The CTA skips the tile unless one of its anchors has a positive there.
    if (!__syncthreads_or(anchor.has_positive(st.label_key[buf], cols, y0))) continue;
    clear(acc);
    gemm_rows(tiled_mma, sZ, tile_c(buf), acc);
    CUTE_UNROLL
    for (int e = 0; e < size(acc); ++e) st.s[get<0>(coord(e))][get<1>(coord(e))] = acc(e);
    __syncthreads();  // the products are in
    anchor.offer(&st.s[0][0], kCols + 1, st.label_key[buf], st.rn[buf], cols, y0);
  }

  anchor.finish(p);
#endif
}

}  // namespace anchor_kernels::hard_positive_cuda::mma
