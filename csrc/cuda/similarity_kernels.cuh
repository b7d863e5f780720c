// CUDA kernels of the fused pairwise similarity (maths in csrc/similarity.cpp). CUDA headers
// only; kept in a header, like supcon_kernels.cuh whose 64 x 64 tile product (dot_tile: WMMA
// on bf16/fp16, FMA on fp32) they reuse, so that the host emulation can compile them too.
//
// Forward: one CTA per 64 x 64 tile of S: the product of the raw rows, scaled in fp32 by the
// inverse norms and 1/t as it is written (no normalised copy). Backward, one side: a CTA owns
// 64 rows of x and a 64-wide slice of D and streams over 64-row tiles of y:
// dz_slice += G_tile (y_tile / n_y)[:, slice], fp32 accumulators, written once (no atomics).
// The y rows are scaled, never G: |y / n_y| <= 1 in any dtype, G / n_y can overflow float16.
#pragma once

#include "similarity_kernels.h"
#include "supcon_kernels.cuh"

namespace anchor_kernels::similarity_cuda::detail {

using supcon_cuda::detail::dot_tile;
using supcon_cuda::detail::from_float;
using supcon_cuda::detail::kBlock;
using supcon_cuda::detail::kMmaLd;
using supcon_cuda::detail::kOpsBytes;
using supcon_cuda::detail::kSLd;
using supcon_cuda::detail::kThreads;
using supcon_cuda::detail::load;
using supcon_cuda::detail::to_float;

template <typename T, bool MMA>
__global__ void __launch_bounds__(kThreads) similarity_fwd_kernel(const FwdArgs p) {
  __shared__ __align__(128) unsigned char ops[kOpsBytes];
  __shared__ __align__(128) float Ss[kBlock][kSLd];
  const int64_t x0 = int64_t(blockIdx.x) * kBlock, y0 = int64_t(blockIdx.y) * kBlock;
  dot_tile<T, MMA>(p.a, x0, p.b, y0, p.D, ops, Ss);
  T* s = static_cast<T*>(p.s);
  for (int e = threadIdx.x; e < kBlock * kBlock; e += kThreads) {
    const int r = e / kBlock, c = e % kBlock;
    const int64_t i = x0 + r, j = y0 + c;
    if (i < p.a.rows && j < p.b.rows)
      s[i * p.ld_s + j] = from_float<T>(Ss[r][c] * (p.rna[i] * p.inv_t) * p.rnb[j]);
  }
}

template <typename T>
__device__ __forceinline__ T load_g(const BwdArgs& p, int64_t r, int64_t q) {
  return (r < p.R && q < p.y.rows) ? static_cast<const T*>(p.g)[r * p.gr + q * p.gq]
                                   : from_float<T>(0.f);
}

template <typename T, bool MMA>
__global__ void __launch_bounds__(kThreads) similarity_bwd_kernel(const BwdArgs p) {
  __shared__ __align__(128) unsigned char ops[kOpsBytes];
  __shared__ __align__(128) float Ss[kBlock][kSLd];
  const int64_t x0 = int64_t(blockIdx.x) * kBlock, d0 = int64_t(blockIdx.y) * kBlock;
  const int64_t Q = p.y.rows, D = p.D;
  const int tid = threadIdx.x;
  // Consecutive threads walk G's contiguous dimension: columns for da, rows for db (G^T).
  const bool rows_fast = p.gr == 1 && p.gq != 1;

#if ANCHOR_KERNELS_WMMA
  constexpr bool kWmma = MMA;
#else
  constexpr bool kWmma = false;
#endif
  float acc[4][8];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
#if ANCHOR_KERNELS_WMMA
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> wacc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(wacc[i][j], 0.f);
#endif

  for (int64_t y0 = 0; y0 < Q; y0 += kBlock) {
    __syncthreads();  // the previous tile is consumed
    if constexpr (kWmma) {
#if ANCHOR_KERNELS_WMMA
      auto Gs = reinterpret_cast<T(*)[kMmaLd]>(ops);
      auto Ys = reinterpret_cast<T(*)[kMmaLd]>(ops + kBlock * kMmaLd * sizeof(T));
      for (int e = tid; e < kBlock * kBlock; e += kThreads) {
        const int a = e / kBlock, b = e % kBlock;
        const int r = rows_fast ? b : a, c = rows_fast ? a : b;
        Gs[r][c] = load_g<T>(p, x0 + r, y0 + c);
        const int64_t q = y0 + a;
        Ys[a][b] = from_float<T>(q < Q ? to_float(load<T>(p.y, q, d0 + b, D)) * p.rny[q] : 0.f);
      }
      __syncthreads();
      const int warp = tid / 32, wr = warp / 2, wc = warp % 2;
      for (int kk = 0; kk < kBlock; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &Gs[wr * 32 + i * 16][kk], kMmaLd);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Ys[kk][wc * 32 + j * 16], kMmaLd);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(wacc[i][j], fa[i], fb[j], wacc[i][j]);
      }
#endif
    } else {
      auto Ys = reinterpret_cast<float(*)[kSLd]>(ops);
      for (int e = tid; e < kBlock * kBlock; e += kThreads) {
        const int a = e / kBlock, b = e % kBlock;
        const int r = rows_fast ? b : a, c = rows_fast ? a : b;
        Ss[r][c] = to_float(load_g<T>(p, x0 + r, y0 + c));
        const int64_t q = y0 + a;
        Ys[a][b] = q < Q ? to_float(load<T>(p.y, q, d0 + b, D)) * p.rny[q] : 0.f;
      }
      __syncthreads();
      const int ty = tid / 8, tx = tid % 8;  // rows 4 ty .. 4 ty + 3, columns 8 tx .. 8 tx + 7
      for (int c = 0; c < kBlock; ++c) {
        float a[4], b[8];
        for (int i = 0; i < 4; ++i) a[i] = Ss[ty * 4 + i][c];
        for (int j = 0; j < 8; ++j) b[j] = Ys[c][tx * 8 + j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }
  __syncthreads();

  float* dz = p.dz;
  if constexpr (kWmma) {
#if ANCHOR_KERNELS_WMMA
    const int warp = tid / 32, wr = warp / 2, wc = warp % 2;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Ss[wr * 32 + i * 16][wc * 32 + j * 16], wacc[i][j], kSLd,
                                wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < kBlock * kBlock; e += kThreads) {
      const int r = e / kBlock, c = e % kBlock;
      if (x0 + r < p.R && d0 + c < D) dz[(x0 + r) * D + d0 + c] = Ss[r][c] * p.inv_t;
    }
#endif
  } else {
    const int ty = tid / 8, tx = tid % 8;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) {
        const int64_t x = x0 + ty * 4 + i, d = d0 + tx * 8 + j;
        if (x < p.R && d < D) dz[x * D + d] = acc[i][j] * p.inv_t;
      }
  }
}

}  // namespace anchor_kernels::similarity_cuda::detail
