// CUDA kernels of the hard-positive-mined SupCon loss (DESIGN.md section 1; the maths is
// written out in csrc/supcon.cpp). CUDA headers only: the launchers are in supcon_kernels.cu,
// the torch glue in supcon.cpp. Kept in a header so that the tests can also compile these
// kernels on the host against an emulation of the CUDA thread model (tests/cuda_emulation).
//
// One CTA of 128 threads owns a block of 64 rows and streams over 64-column tiles:
//   S_tile = X_b Y_c^T (fp32 accumulation; WMMA on bf16/fp16, FMA on fp32), scaled in fp32
//   by 1/||x_i|| 1/||y_j|| / tau (the normalisation is fused: no normalised copy is stored).
// Forward: online max / sum per row for LSE_i and the soft-mining normaliser, two threads
// per row. Backward: H = G tile (from the saved row statistics), then dX_b += H (Y_c / ||y||)
// on a 64-wide slice of D per CTA (grid.y), fp32 accumulators, written once: no atomics.
// One set: H carries both G_bc and G_cb^T, so one pass gives the whole gradient.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "supcon_kernels.h"

// Tensor-core (WMMA) paths only where the device code is compiled for sm_80 or newer; the
// same kernels use FMA otherwise (older architectures, the host pass, the host emulation).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ANCHOR_KERNELS_WMMA 1
#include <mma.h>
#else
#define ANCHOR_KERNELS_WMMA 0
#endif

namespace anchor_kernels::supcon_cuda::detail {

constexpr int kThreads = 128;
constexpr int kBlock = 64;          // rows per CTA, columns per tile, D per backward CTA
constexpr int kK = 32;              // D chunk of the S tile product
constexpr int kSLd = kBlock + 4;    // fp32 tile row stride (multiple of 4 for WMMA stores)
constexpr int kMmaKLd = kK + 8;     // 16-bit operand row strides (multiples of 8 for WMMA)
constexpr int kMmaLd = kBlock + 8;
constexpr int kOpsBytes = 2 * kBlock * kMmaLd * 2;  // largest operand layout (see below)
static_assert(2 * kK * kSLd * 4 <= kOpsBytes, "FMA S operands fit the operand buffer");
static_assert(kBlock * kSLd * 4 <= kOpsBytes, "FMA Y operand fits the operand buffer");
static_assert(2 * kBlock * kMmaKLd * 2 <= kOpsBytes, "WMMA S operands fit the operand buffer");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// x rounded to TF32 (10 stored mantissa bits), to nearest with ties away from zero as
// cvt.rna.tf32.f32 rounds: half a unit of the 13 dropped bits added to the magnitude's bits,
// then those bits cleared (a carry into the exponent is the right result). inf and NaN stay.
__device__ __forceinline__ float round_tf32(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf, NaN
  u = (u + 0x1000u) & 0xffffe000u;
  memcpy(&x, &u, sizeof u);
  return x;
}

template <typename T>
__device__ __forceinline__ T load(const Matrix& m, int64_t r, int64_t d, int64_t D) {
  const T* p = static_cast<const T*>(m.data);
  return (r < m.rows && d < D) ? p[r * m.s0 + d * m.s1] : from_float<T>(0.f);
}

// Ss[r][c] = sum_d X[x0 + r][d] Y[y0 + c][d] over the 64 x 64 tile (0 outside the matrices).
// Operand layouts in `ops`: WMMA: As, Bs [64][kMmaKLd] of T; FMA: transposed AsT, BsT
// [kK][kSLd] of float. Ends with __syncthreads().
template <typename T, bool MMA>
__device__ void dot_tile(const Matrix& X, int64_t x0, const Matrix& Y, int64_t y0, int64_t D,
                         unsigned char* ops, float (*Ss)[kSLd]) {
  const int tid = threadIdx.x;
#if ANCHOR_KERNELS_WMMA
  if constexpr (MMA) {
    using namespace nvcuda;
    auto As = reinterpret_cast<T(*)[kMmaKLd]>(ops);
    auto Bs = reinterpret_cast<T(*)[kMmaKLd]>(ops + kBlock * kMmaKLd * sizeof(T));
    const int warp = tid / 32, wr = warp / 2, wc = warp % 2;  // 32 x 32 quadrant per warp
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int64_t k0 = 0; k0 < D; k0 += kK) {
      __syncthreads();  // the previous chunk is consumed
      for (int e = tid; e < kBlock * kK; e += kThreads) {
        const int r = e / kK, k = e % kK;
        As[r][k] = load<T>(X, x0 + r, k0 + k, D);
        Bs[r][k] = load<T>(Y, y0 + r, k0 + k, D);
      }
      __syncthreads();
      for (int kk = 0; kk < kK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &As[wr * 32 + i * 16][kk], kMmaKLd);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[wc * 32 + j * 16][kk], kMmaKLd);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Ss[wr * 32 + i * 16][wc * 32 + j * 16], acc[i][j], kSLd,
                                wmma::mem_row_major);
    __syncthreads();
    return;
  }
#endif
  auto AsT = reinterpret_cast<float(*)[kSLd]>(ops);
  auto BsT = reinterpret_cast<float(*)[kSLd]>(ops + kK * kSLd * sizeof(float));
  const int ty = tid / 8, tx = tid % 8;  // rows 4 ty .. 4 ty + 3, columns 8 tx .. 8 tx + 7
  float acc[4][8];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < D; k0 += kK) {
    __syncthreads();
    for (int e = tid; e < kBlock * kK; e += kThreads) {
      const int r = e / kK, k = e % kK;
      AsT[k][r] = to_float(load<T>(X, x0 + r, k0 + k, D));
      BsT[k][r] = to_float(load<T>(Y, y0 + r, k0 + k, D));
    }
    __syncthreads();
    for (int k = 0; k < kK; ++k) {
      float a[4], b[8];
      for (int i = 0; i < 4; ++i) a[i] = AsT[k][ty * 4 + i];
      for (int j = 0; j < 8; ++j) b[j] = BsT[k][tx * 8 + j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) Ss[ty * 4 + i][tx * 8 + j] = acc[i][j];
  __syncthreads();
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T, bool MMA>
__global__ void __launch_bounds__(kThreads) supcon_fwd_kernel(const FwdArgs p) {
  __shared__ __align__(128) unsigned char ops[kOpsBytes];
  __shared__ __align__(128) float Ss[kBlock][kSLd];
  __shared__ int64_t sly[kBlock];
  __shared__ float srny[kBlock];

  const int64_t M = p.x.rows, N = p.y.rows;
  const int64_t x0 = int64_t(blockIdx.x) * kBlock;
  const int r = threadIdx.x / 2, half = threadIdx.x % 2;  // two threads per row
  const int64_t i = x0 + r;
  const bool row_ok = i < M;
  const int64_t yi = row_ok ? p.lx[i] : 0;
  const float rni = row_ok ? p.rnx[i] : 0.f;
  const float ninf = -INFINITY;
  const bool soft = p.mode == kFwdSoft, stats_pos = p.mode != kFwdLse;

  float m = ninf, l = 0.f, tm = ninf, lw = 0.f, sw = 0.f, cnt = 0.f;
  for (int64_t y0 = 0; y0 < N; y0 += kBlock) {
    dot_tile<T, MMA>(p.x, x0, p.y, y0, p.D, ops, Ss);
    if (threadIdx.x < kBlock) {
      const int64_t j = y0 + threadIdx.x;
      sly[threadIdx.x] = j < N ? p.ly[j] : 0;
      srny[threadIdx.x] = j < N ? p.rny[j] : 0.f;
    }
    __syncthreads();
    // This thread's columns of the row, without the self column and past-the-end columns.
    const int c0 = half * (kBlock / 2);
    int c1 = c0 + kBlock / 2;
    if (y0 + c1 > N) c1 = int(N > y0 + c0 ? N - y0 : c0);
    const int64_t self_c = (row_ok && p.has_self) ? i + p.shift - y0 : -1;
    float tmx = ninf, ttm = ninf;
    for (int c = c0; c < c1; ++c) {
      if (c == self_c) continue;
      const float s = Ss[r][c] * rni * srny[c] * p.inv_tau;
      tmx = fmaxf(tmx, s);
      if (soft && sly[c] == yi) ttm = fmaxf(ttm, s * p.nbt);
    }
    tmx = fmaxf(tmx, __shfl_xor_sync(0xffffffffu, tmx, 1));
    ttm = fmaxf(ttm, __shfl_xor_sync(0xffffffffu, ttm, 1));
    if (tmx > m) {
      l *= expf(m - tmx);
      m = tmx;
    }
    if (ttm > tm) {
      const float f = expf(tm - ttm);
      lw *= f;
      sw *= f;
      tm = ttm;
    }
    float tl = 0.f, tlw = 0.f, tsw = 0.f, tc = 0.f;
    for (int c = c0; c < c1; ++c) {
      if (c == self_c) continue;
      const float s = Ss[r][c] * rni * srny[c] * p.inv_tau;
      tl += expf(s - m);
      if (stats_pos && sly[c] == yi) {
        tc += 1.f;
        if (soft) {
          const float e = expf(s * p.nbt - tm);
          tlw += e;
          tsw += e * s;
        } else {
          tsw += s;
        }
      }
    }
    tl += __shfl_xor_sync(0xffffffffu, tl, 1);
    tlw += __shfl_xor_sync(0xffffffffu, tlw, 1);
    tsw += __shfl_xor_sync(0xffffffffu, tsw, 1);
    tc += __shfl_xor_sync(0xffffffffu, tc, 1);
    l += tl;
    lw += tlw;
    sw += tsw;
    cnt += tc;
    // The next dot_tile starts with __syncthreads(), so Ss, sly and srny are not overwritten
    // while this tile is read.
  }
  if (row_ok && half == 0) {
    const float lse = m + logf(l);
    float* out = p.stats + 4 * i;
    if (p.mode == kFwdLse) {
      const float count = float(N - (p.has_self ? 1 : 0));
      p.valid[i] = count > 0.f;
      p.loss[i] = count > 0.f ? lse : 0.f;
      out[0] = lse, out[1] = 0.f, out[2] = 0.f, out[3] = count;
    } else {
      const bool ok = cnt > 0.f;
      const float sbar = ok ? (soft ? sw / lw : sw / cnt) : 0.f;
      const float logw = soft ? tm + logf(lw) : logf(cnt);
      p.valid[i] = ok;
      p.loss[i] = ok ? lse - sbar : 0.f;
      out[0] = lse, out[1] = sbar, out[2] = logw, out[3] = cnt;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward

// G for one (anchor, column) pair from the anchor's (ga, lse, q, sbar); invalid anchors have
// ga = 0 and lse = q = +inf, so both exponentials are 0 and no inf * 0 arises.
__device__ __forceinline__ float gterm(int mode, float s, bool pos, float ga, float lse, float q,
                                       float sbar, float nbt) {
  const float pr = expf(s - lse);
  if (mode == kBwdLse) return ga * pr;
  if (mode == kBwdUniform) return ga * (pr - (pos ? q : 0.f));
  float w = pos ? expf(s * nbt - q) : 0.f;
  if (mode == kBwdSoftExact) w *= 1.f + nbt * (s - sbar);
  return ga * (pr - w);
}

template <typename T, bool MMA>
__global__ void __launch_bounds__(kThreads) supcon_bwd_kernel(const BwdArgs p) {
  __shared__ __align__(128) unsigned char ops[kOpsBytes];
  __shared__ __align__(128) float Ss[kBlock][kSLd];
  // Outer rows (once per CTA) and inner rows (per tile): label, 1/norm, anchor statistics.
  __shared__ int64_t slx[kBlock], sly[kBlock];
  __shared__ float sox[5][kBlock], soy[5][kBlock];

  const int64_t R = p.x.rows, Q = p.y.rows, D = p.D;
  const int64_t x0 = int64_t(blockIdx.x) * kBlock, d0 = int64_t(blockIdx.y) * kBlock;
  const int tid = threadIdx.x;
  const float inv_gmax = 1.f / *p.gmax;

  if (tid < kBlock) {
    const int64_t x = x0 + tid;
    const bool ok = x < R;
    slx[tid] = ok ? p.lx[x] : 0;
    sox[0][tid] = ok ? p.rnx[x] : 0.f;
    for (int a = 0; a < 4; ++a) sox[1 + a][tid] = (ok && p.outer) ? p.anchor[a * p.M + x] : 0.f;
  }

#if ANCHOR_KERNELS_WMMA
  constexpr bool kWmma = MMA;
#else
  constexpr bool kWmma = false;
#endif
  // Accumulators of the 64 x 64 slice dX[x0 : x0 + 64, d0 : d0 + 64].
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
    dot_tile<T, MMA>(p.x, x0, p.y, y0, D, ops, Ss);
    if (tid < kBlock) {
      const int64_t y = y0 + tid;
      const bool ok = y < Q;
      sly[tid] = ok ? p.ly[y] : 0;
      soy[0][tid] = ok ? p.rny[y] : 0.f;
      for (int a = 0; a < 4; ++a) soy[1 + a][tid] = (ok && p.inner) ? p.anchor[a * p.M + y] : 0.f;
    }
    __syncthreads();
    // H in place of S, scaled by 1 / max|g| (half tiles stay in range; undone at the end).
    for (int e = tid; e < kBlock * kBlock; e += kThreads) {
      const int r = e / kBlock, c = e % kBlock;
      const int64_t x = x0 + r, y = y0 + c;
      float h = 0.f;
      if (x < R && y < Q && !(p.has_self && y == x + p.shift)) {
        const float s = Ss[r][c] * sox[0][r] * soy[0][c] * p.inv_tau;
        const bool pos = slx[r] == sly[c];
        if (p.outer) h = gterm(p.mode, s, pos, sox[1][r], sox[2][r], sox[3][r], sox[4][r], p.nbt);
        if (p.inner) h += gterm(p.mode, s, pos, soy[1][c], soy[2][c], soy[3][c], soy[4][c], p.nbt);
      }
      Ss[r][c] = h * inv_gmax;
    }
    __syncthreads();
    // dX slice += H (Y_c / ||y||)[:, d0 : d0 + 64].
    if constexpr (kWmma) {
#if ANCHOR_KERNELS_WMMA
      auto Hs = reinterpret_cast<T(*)[kMmaLd]>(ops);
      auto Ys = reinterpret_cast<T(*)[kMmaLd]>(ops + kBlock * kMmaLd * sizeof(T));
      for (int e = tid; e < kBlock * kBlock; e += kThreads) {
        const int r = e / kBlock, c = e % kBlock;
        Hs[r][c] = from_float<T>(Ss[r][c]);
        Ys[r][c] = from_float<T>(to_float(load<T>(p.y, y0 + r, d0 + c, D)) * soy[0][r]);
      }
      __syncthreads();
      const int warp = tid / 32, wr = warp / 2, wc = warp % 2;
      for (int kk = 0; kk < kBlock; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &Hs[wr * 32 + i * 16][kk], kMmaLd);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Ys[kk][wc * 32 + j * 16], kMmaLd);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(wacc[i][j], a[i], b[j], wacc[i][j]);
      }
#endif
    } else {
      auto Ys = reinterpret_cast<float(*)[kSLd]>(ops);
      for (int e = tid; e < kBlock * kBlock; e += kThreads) {
        const int r = e / kBlock, c = e % kBlock;
        Ys[r][c] = to_float(load<T>(p.y, y0 + r, d0 + c, D)) * soy[0][r];
      }
      __syncthreads();
      const int ty = tid / 8, tx = tid % 8;
      for (int c = 0; c < kBlock; ++c) {
        float a[4], b[8];
        for (int i = 0; i < 4; ++i) a[i] = Ss[ty * 4 + i][c];
        for (int j = 0; j < 8; ++j) b[j] = Ys[c][tx * 8 + j];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // Ss, ops and the inner rows are rewritten by the next tile
  }

  // Write the slice, undoing the 1 / max|g| scale and applying 1 / tau.
  const float scale = *p.gmax * p.inv_tau;
  float* dx = p.dx;
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
      if (x0 + r < R && d0 + c < D) dx[(x0 + r) * D + d0 + c] = Ss[r][c] * scale;
    }
#endif
  } else {
    const int ty = tid / 8, tx = tid % 8;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 8; ++j) {
        const int64_t x = x0 + ty * 4 + i, d = d0 + tx * 8 + j;
        if (x < R && d < D) dx[x * D + d] = acc[i][j] * scale;
      }
  }
}

}  // namespace anchor_kernels::supcon_cuda::detail
