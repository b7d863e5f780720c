// The O(M + N) passes around the SupCon kernels, on the device so that the torch glue
// (supcon_cuda.cpp) launches three kernels each way instead of about twenty ATen ops:
//   row_norms_kernel: ||x_r|| and 1 / max(||x_r||, eps) of the anchors and contrast rows, and
//     the overflow-safe copy of bf16 / fp32 rows the loss kernels read (RowNormArgs::scaled),
//     rounded to TF32 for the TF32 kernels (RowNormArgs::tf32);
//   norm_backward_kernel: the chain rule through the normalisation after the kernels that
//     leave it to the glue (the general loss kernels, the similarity kernels);
//   loss_reduce_kernel: the forward's scale and reduction (sum, or mean over valid anchors);
//   anchor_stage_kernel: the backward's per-anchor inputs (BwdArgs::anchor, gmax).
// The two reductions run in one CTA, in a fixed order (bitwise reproducible, no atomics, no
// host synchronisation). CUDA headers only; the tests also run these kernels on the host
// (tests/cuda_emulation), so block-wide steps go through __syncthreads and shared memory.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "supcon_kernels.cuh"

namespace anchor_kernels::supcon_cuda::detail {

constexpr int kNormLanes = 4;                     // threads per row in row_norms_kernel
constexpr int kNormRows = kThreads / kNormLanes;  // rows per CTA

// Rows r < x.rows of x, then the rows of y (y.rows = 0 with one set). Each row's sum of
// squares is taken by kNormLanes neighbouring threads over strided elements of D, in fp32.
// With p.scaled and normalisation, a first sweep finds the row's max |x| and its prescale
// factor; with p.scaled the second writes the (scaled) row and sums the squares of what it
// wrote (the values the loss kernels read), rounded to TF32 with p.tf32.
template <typename T>
__global__ void __launch_bounds__(kThreads) row_norms_kernel(const RowNormArgs p) {
  const int64_t r = int64_t(blockIdx.x) * kNormRows + threadIdx.x / kNormLanes;
  const int lane = threadIdx.x % kNormLanes;
  const bool in_x = r < p.x.rows;
  const Matrix& m = in_x ? p.x : p.y;
  const int64_t row = in_x ? r : r - p.x.rows;
  const bool live = r < p.x.rows + p.y.rows;
  float scale = 1.f;
  if (p.scaled != nullptr && p.normalize) {  // (unnormalised rows are multiplied as they are)
    float amax = 0.f;
    for (int64_t d = lane; d < p.D; d += kNormLanes)
      amax = fmaxf(amax, fabsf(to_float(load<T>(m, row, d, p.D))));
    for (int o = 1; o < kNormLanes; o *= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (amax > p.big && amax <= FLT_MAX) {  // finite: an inf or NaN row stays as it is
      int e;
      frexpf(amax, &e);
      scale = ldexpf(1.f, -e);
    }
  }
  T* out = live && p.scaled != nullptr ? static_cast<T*>(p.scaled) + r * p.D : nullptr;
  float ss = 0.f;
  for (int64_t d = lane; d < p.D; d += kNormLanes) {
    float v = to_float(load<T>(m, row, d, p.D));  // 0 past the last row
    if (out != nullptr) {
      T c = from_float<T>(v * scale);
      if constexpr (std::is_same_v<T, float>)
        if (p.tf32) c = round_tf32(c);
      out[d] = c;
      v = to_float(c);
    }
    ss = fmaf(v, v, ss);
  }
  for (int o = 1; o < kNormLanes; o *= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0 && live) {
    const float n = sqrtf(ss);
    p.norms[r] = n;
    p.inv[r] = p.normalize ? 1.f / fmaxf(n, p.eps) : 1.f;
    if (p.scaled != nullptr) p.prescale[r] = scale;
  }
}

// Rows as in row_norms_kernel: each row's z . dz by kNormLanes neighbouring threads, then its
// dx; every lane of a row takes the same branches, and all reach the shuffles. dz is the sum
// of NormBwdArgs::parts slices, taken in order.
template <typename T>
__global__ void __launch_bounds__(kThreads) norm_backward_kernel(const NormBwdArgs p) {
  const int64_t r = int64_t(blockIdx.x) * kNormRows + threadIdx.x / kNormLanes;
  const int lane = threadIdx.x % kNormLanes;
  const bool live = r < p.x.rows;
  const float n = live ? p.norms[r] : 1.f;
  const float rn = p.normalize ? 1.f / fmaxf(n, p.eps) : 1.f;
  const float* dz_row = p.dz + (live ? r * p.D : 0);
  const int parts = p.parts > 1 ? p.parts : 1;
  const int64_t part = p.x.rows * p.D;
  auto dz = [&](int64_t d) {
    float v = dz_row[d];
    for (int k = 1; k < parts; ++k) v += dz_row[k * part + d];
    return v;
  };
  float dot = 0.f;
  if (live && p.normalize && n >= p.eps)  // below eps the clamp holds: no projection
    for (int64_t d = lane; d < p.D; d += kNormLanes)
      dot = fmaf(to_float(load<T>(p.x, r, d, p.D)) * rn, dz(d), dot);
  for (int o = 1; o < kNormLanes; o *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if (!live) return;
  const float scale = rn * (p.prescale != nullptr ? p.prescale[r] : 1.f);
  T* out = static_cast<T*>(p.dx) + r * p.D;
  for (int64_t d = lane; d < p.D; d += kNormLanes) {
    const float z = to_float(load<T>(p.x, r, d, p.D)) * rn;
    out[d] = from_float<T>((dz(d) - z * dot) * scale);
  }
}

// Sum (op 0) or maximum (op 1) of every thread's v, returned to every thread: a tree over
// shared memory, the same order on every run.
__device__ __forceinline__ float block_reduce(float v, float* buf, int op) {
  const int tid = threadIdx.x;
  buf[tid] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (tid < s) buf[tid] = op == 0 ? buf[tid] + buf[tid + s] : fmaxf(buf[tid], buf[tid + s]);
    __syncthreads();
  }
  const float out = buf[0];
  __syncthreads();  // buf is free for the next reduction
  return out;
}

// One CTA. reduction 0: out[i] = loss[i] scale; 1: out[0] = sum_i loss[i] scale; 2: that sum
// over max(#valid, 1) (reference.reduce_loss). Invalid anchors hold 0 in `loss`.
__global__ void __launch_bounds__(kThreads) loss_reduce_kernel(const LossReduceArgs p) {
  __shared__ float buf[kThreads];
  float total = 0.f, count = 0.f;
  for (int64_t i = threadIdx.x; i < p.M; i += kThreads) {
    const float v = p.loss[i] * p.scale;
    if (p.reduction == 0) p.out[i] = v;
    total += v;
    count += p.valid[i] ? 1.f : 0.f;
  }
  if (p.reduction == 0) return;  // uniform across the CTA: no barrier is skipped by some
  total = block_reduce(total, buf, 0);
  count = block_reduce(count, buf, 0);
  if (threadIdx.x == 0) p.out[0] = p.reduction == 1 ? total : total / fmaxf(count, 1.f);
}

// One CTA. From the forward's stats (M, 4) = (LSE, sbar, q2, c) with c = |P(i)| (|A(i)| with
// lse_only), valid where c > 0, and the incoming gradient grad[i * grad_stride] (stride 0:
// one value for a reduced loss): anchor (4, M) = (g_i, LSE_i, q_i, sbar_i) with
// g_i = grad_i scale (/ #valid for the mean), and for invalid anchors (0, +inf, 0 or +inf, 0)
// so that their G rows are exactly 0; q_i = 1 / |P(i)| (uniform) or q2 (logW, soft; 0 with
// lse_only). gmax = max |g_i|, or 1 when every g_i is 0.
__global__ void __launch_bounds__(kThreads) anchor_stage_kernel(const AnchorStageArgs p) {
  __shared__ float buf[kThreads];
  float count = 0.f;
  for (int64_t i = threadIdx.x; i < p.M; i += kThreads) count += p.stats[4 * i + 3] > 0.f ? 1.f : 0.f;
  count = block_reduce(count, buf, 0);
  const float factor = p.reduction == 2 ? p.scale / fmaxf(count, 1.f) : p.scale;
  const float inf = INFINITY;
  float gmax = 0.f;
  for (int64_t i = threadIdx.x; i < p.M; i += kThreads) {
    const float* s = p.stats + 4 * i;
    const bool ok = s[3] > 0.f;
    const float g = ok ? p.grad[i * p.grad_stride] * factor : 0.f;
    p.anchor[i] = g;
    p.anchor[p.M + i] = ok ? s[0] : inf;
    p.anchor[2 * p.M + i] = p.uniform ? (ok ? 1.f / s[3] : 0.f) : (ok ? s[2] : inf);
    p.anchor[3 * p.M + i] = ok ? s[1] : 0.f;
    gmax = fmaxf(gmax, fabsf(g));
  }
  gmax = block_reduce(gmax, buf, 1);
  if (threadIdx.x == 0) p.gmax[0] = gmax > 0.f ? gmax : 1.f;
}

}  // namespace anchor_kernels::supcon_cuda::detail
