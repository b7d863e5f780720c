// CUDA kernel of hard-positive selection (rule in csrc/hard_positive.cpp). CUDA headers
// only; kept in a header, like supcon_kernels.cuh whose 64 x 64 tile product (dot_tile: WMMA
// on bf16/fp16, FMA on fp32) it reuses.
//
// One CTA of 128 threads owns 64 anchors and streams over 64-column tiles of the contrast set.
// A tile with no positive for any of its anchors is skipped before the product. Otherwise
// cos = (z_i . c_j) rnz[i] rnc[j] in fp32, and thread r (< 64) folds row r of the tile into
// its anchor's running top-k. Each candidate is the int64 key (ordered(cos) << 32) | j, where
// ordered() maps the float bits to an int32 of the same order (-0 folded into +0), so one
// integer compare orders by cosine and then by index, and keys are unique. The anchor's keff
// keys live in a global scratch row only its thread touches (L1-resident); the thread keeps
// the largest key (the threshold) and its slot in registers, so a candidate costs one
// compare, and an insertion a rescan of keff keys. Empty slots hold distinct keys above any
// real key. At the end the thread sorts its keys and decodes them into indices and cosines.
#pragma once

#include <cstring>

#include "hard_positive_kernels.h"
#include "label_keys.cuh"
#include "supcon_kernels.cuh"

namespace anchor_kernels::hard_positive_cuda::detail {

using supcon_cuda::detail::dot_tile;
using supcon_cuda::detail::kBlock;
using supcon_cuda::detail::kOpsBytes;
using supcon_cuda::detail::kSLd;
using supcon_cuda::detail::kThreads;
namespace label_keys = supcon_cuda::label_keys;

constexpr int64_t kKeyInf = 0x7FFFFFFFFFFFFFFFll;
constexpr int64_t kKeyPad = 0x7FFFFFFF80000000ll;  // keys at or above it are empty slots

// Bit casts by memcpy (a register move on the device; also compiles in the host emulation).
__device__ __forceinline__ int32_t float_bits(float v) {
  int32_t b;
  memcpy(&b, &v, sizeof b);
  return b;
}

__device__ __forceinline__ float bits_float(int32_t b) {
  float v;
  memcpy(&v, &b, sizeof v);
  return v;
}

__device__ __forceinline__ int64_t make_key(float v, int64_t j) {
  if (v == 0.f) v = 0.f;  // -0 ties with +0, as in torch.sort
  const int32_t bits = float_bits(v);
  const int32_t ordered = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  return int64_t(uint64_t(int64_t(ordered)) << 32) | j;
}

__device__ __forceinline__ float key_cos(int64_t key) {
  const int32_t ordered = int32_t(key >> 32);
  return bits_float(ordered >= 0 ? ordered : ordered ^ 0x7FFFFFFF);
}

// One anchor's running top-k (the rule in the header comment), kept by one thread: its keys in
// the anchor's scratch row, the largest (the threshold) and its slot in registers.
struct TopK {
  int64_t* keys;
  int64_t keff;
  int64_t thr, thr_slot;

  __device__ static TopK start(int64_t* keys, int64_t keff) {
    for (int64_t s = 0; s < keff; ++s) keys[s] = kKeyInf - s;
    return {keys, keff, kKeyInf, 0};
  }

  __device__ void offer(int64_t key) {
    if (key >= thr) return;
    keys[thr_slot] = key;
    thr = keys[0];
    thr_slot = 0;
    for (int64_t s = 1; s < keff; ++s)
      if (keys[s] > thr) {
        thr = keys[s];
        thr_slot = s;
      }
  }

  // Sorts the keys and writes anchor i's indices and cosines (padding: -1 and +inf).
  __device__ void finish(const Args& p, int64_t i) {
    for (int64_t s = 1; s < keff; ++s) {  // insertion sort, ascending
      const int64_t key = keys[s];
      int64_t t = s;
      for (; t > 0 && keys[t - 1] > key; --t) keys[t] = keys[t - 1];
      keys[t] = key;
    }
    for (int64_t s = 0; s < keff; ++s) {
      const int64_t key = keys[s];
      const bool pad = key >= kKeyPad;
      p.idx[i * p.k + s] = pad ? -1 : (key & 0xFFFFFFFFll);
      p.cos[i * p.k + s] = pad ? INFINITY : key_cos(key);
    }
  }
};

// The anchor a thread selects for (thread t < kRows of a CTA whose anchors start at x0: anchor
// x0 + t), or none: its label's key (label_keys.cuh: key_of), inverse norm, self column and
// top-k. Shared with the tensor-core kernel.
struct Anchor {
  int64_t i;
  int slot;  // its row of the CTA's tiles (the thread's index)
  bool row;  // this thread selects for anchor i
  int32_t label_key;
  float rn;
  int64_t self;  // contrast column of the self pair, or -1
  TopK top;

  template <int kRows>
  __device__ static Anchor of(const Args& p, int64_t x0, int tid, label_keys::Keys key_of,
                              const label_keys::SortedRows<kRows>& rows) {
    Anchor a{x0 + tid, tid, false, 0, 0.f, -1, {}};
    a.row = tid < kRows && a.i < p.z.rows;
    if (a.row) {
      a.label_key = key_of(p.lz[a.i], rows);
      a.rn = p.rnz[a.i];
      a.self = p.has_self ? a.i + p.offset : -1;
      a.top = TopK::start(p.keys + a.i * p.keff, p.keff);
    }
    return a;
  }

  // Whether a tile's first `cols` columns (their labels' keys lc, from column y0) hold one of
  // its positives.
  __device__ bool has_positive(const int32_t* lc, int cols, int64_t y0) const {
    if (!row) return false;
    for (int c = 0; c < cols; ++c)
      if (lc[c] == label_key && y0 + c != self) return true;
    return false;
  }

  // Its row of a tile's products (raw: times rn and rnc[c] here; rows ld apart) into its top-k.
  __device__ void offer(const float* tile, int ld, const int32_t* lc, const float* rnc, int cols,
                        int64_t y0) {
    if (!row) return;
    const float* s = tile + slot * ld;
    for (int c = 0; c < cols; ++c) {
      const int64_t j = y0 + c;
      if (lc[c] != label_key || j == self) continue;
      top.offer(make_key(s[c] * rn * rnc[c], j));
    }
  }

  __device__ void finish(const Args& p) {
    if (row) top.finish(p, i);
  }
};

template <typename T, bool MMA>
__global__ void __launch_bounds__(kThreads) hard_positive_kernel(const Args p) {
  __shared__ __align__(128) unsigned char ops[kOpsBytes];
  __shared__ __align__(128) float Ss[kBlock][kSLd];
  __shared__ int32_t slc[kBlock];  // the tile's label keys
  __shared__ label_keys::SortedRows<kBlock> sorted_rows;
  __shared__ float srnc[kBlock];
  __shared__ int any_positive;

  const int64_t N = p.c.rows;
  const int64_t x0 = int64_t(blockIdx.x) * kBlock;
  const int tid = threadIdx.x;
  const auto key_of = label_keys::cta_keys(sorted_rows, p.lz, p.z.rows, x0, tid, kThreads);
  Anchor anchor = Anchor::of(p, x0, tid, key_of, sorted_rows);

  for (int64_t y0 = 0; y0 < N; y0 += kBlock) {
    __syncthreads();  // the previous tile's labels and products are consumed
    if (tid < kBlock) {
      const int64_t j = y0 + tid;
      slc[tid] = j < N ? key_of(p.lc[j], sorted_rows) : 0;
      srnc[tid] = j < N ? p.rnc[j] : 0.f;
    }
    if (tid == 0) any_positive = 0;
    __syncthreads();
    const int cols = int(N - y0 < kBlock ? N - y0 : kBlock);
    if (anchor.has_positive(slc, cols, y0)) any_positive = 1;
    __syncthreads();
    if (!any_positive) continue;  // the same value in every thread of the CTA
    dot_tile<T, MMA>(p.z, x0, p.c, y0, p.D, ops, Ss);
    anchor.offer(&Ss[0][0], kSLd, slc, srnc, cols, y0);
  }

  anchor.finish(p);
}

}  // namespace anchor_kernels::hard_positive_cuda::detail
