// Labels as the CuTe forwards, the Hopper backward and the selection compare them (the sm_80
// backward compares the int64 labels: supcon_mma.cuh says why): 32-bit keys. A logit's
// label compare is then one ISETP instead of a 64-bit compare's two (on the integer pipe, at
// half the FP32 rate on sm_80 and sm_90), and a tile's staged labels take half the shared
// memory.
//
// The keys are exact for any int64 labels, with no pass over the labels and no host
// synchronisation. Keys are relative to the rows of one CTA (its anchors in the forward):
// - a label in [kKeyMin, INT32_MAX] (every class index in practice) is its own key;
// - any other label's key is kOutOfRange + p, p the number of the CTA's row labels below it,
//   where one of the CTA's rows has that label; kNoRow where none has it (a column that then
//   pairs with none of the CTA's rows as a positive).
// Equal labels get equal keys, rows' keys are never kNoRow, and the three ranges do not meet:
// a row's key equals a column's exactly when their labels are equal. A CTA whose rows all
// have labels in range (the common case) does no more than a range check per label; one with
// a row label out of range sorts its row labels into shared memory once, and keys a label out
// of range by a binary search there: unrolled, no loop in the kernels' tile loops.
// Checked on the host by tests/cuda_emulation/supcon_fwd_math.cu, and inside the selection
// kernel by the emulated tests of tests/test_hard_positive.py.
#pragma once

#include <climits>
#include <cstdint>

namespace anchor_kernels::supcon_cuda::label_keys {

constexpr int kMaxRows = 256;                      // rows per CTA the keys can count
constexpr int32_t kOutOfRange = INT32_MIN;         // keys kOutOfRange + p, p < kMaxRows
constexpr int32_t kNoRow = kOutOfRange + kMaxRows;
constexpr int32_t kKeyMin = kNoRow + 1;            // labels from here up are their own key

__host__ __device__ inline bool own_key(int64_t label) { return label >= kKeyMin && label <= INT32_MAX; }

// A CTA's kRows row labels in ascending order, rows past the matrix as INT64_MAX (shared memory).
template <int kRows>
struct SortedRows {
  static_assert(kRows <= kMaxRows && (kRows & (kRows - 1)) == 0, "a power of two, at most kMaxRows");
  int64_t v[kRows];

  // Row r's label (lx[0, n): the CTA's rows), and its position in ascending order (ties by row).
  __host__ __device__ static int64_t label(const int64_t* lx, int n, int r) { return r < n ? lx[r] : INT64_MAX; }
  __host__ __device__ static int position(const int64_t* lx, int n, int r) {
    const int64_t l = label(lx, n, r);
    int p = 0;
    for (int q = 0; q < kRows; ++q) {
      const int64_t m = label(lx, n, q);
      p += m < l || (m == l && q < r);
    }
    return p;
  }

  // The key of a label out of range: the number of values below it (a lower bound, at most
  // kRows - 1), where it is one of them.
  __host__ __device__ int32_t key(int64_t label) const {
    int p = 0;
#pragma unroll
    for (int step = kRows / 2; step > 0; step /= 2) p += v[p + step - 1] < label ? step : 0;
    return v[p] == label ? kOutOfRange + p : kNoRow;
  }
};

// A thread's keys of labels, relative to its CTA's rows, whose labels `sorted` holds where wide
// (a row label is out of range). sorted is passed at each call, from the kernel's own shared
// memory, so that the compiler keeps its address in the shared window (LDS, no generic loads)
// and no register holds it across the tile loop.
struct Keys {
  bool wide;

  template <int kRows>
  __host__ __device__ int32_t operator()(int64_t label, const SortedRows<kRows>& sorted) const {
    if (own_key(label)) return int32_t(label);
#if defined(ANCHOR_KERNELS_INNER_TILES_ONLY)
    return kNoRow;  // (the build that counts what a tile runs with labels in range; never run)
#else
    return wide ? sorted.key(label) : kNoRow;
#endif
  }
};

// Called by every thread of a CTA of `threads`, at its start (it holds barriers): the keys
// relative to rows [x0, x0 + kRows) of lx's `rows` labels.
template <int kRows>
__device__ Keys cta_keys(SortedRows<kRows>& sorted, const int64_t* lx, int64_t rows, int64_t x0,
                         int tid, int threads) {
  const int64_t left = rows - x0;
  const int n = int(left < 0 ? 0 : left < kRows ? left : kRows);
  lx += x0;
  int out = 0;
  for (int r = tid; r < n; r += threads) out |= !own_key(lx[r]);
  if (!__syncthreads_or(out)) return {false};
  for (int r = tid; r < kRows; r += threads)
    sorted.v[SortedRows<kRows>::position(lx, n, r)] = SortedRows<kRows>::label(lx, n, r);
  __syncthreads();
  return {true};
}

// cta_keys where the kernel compares labels (kCompares); otherwise no work (no key is read).
template <bool kCompares, int kRows>
__device__ Keys cta_keys_for(SortedRows<kRows>& sorted, const int64_t* lx, int64_t rows, int64_t x0,
                             int tid, int threads) {
  if constexpr (kCompares)
    return cta_keys(sorted, lx, rows, x0, tid, threads);
  else
    return {false};
}

}  // namespace anchor_kernels::supcon_cuda::label_keys
