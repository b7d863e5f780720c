// Device code of the fused PGD step and random start: the kernels that
// csrc/cuda/pgd_kernels.cu launches (csrc/pgd.cpp states the maths; the spec is
// anchor_kernels/reference.py pgd_step / pgd_random_start, matched bit for bit). CUDA headers
// only; kept apart from the launchers so that tests can also compile it for the host and run
// it thread by thread (tests/pgd_cuda_emulator.cpp).
//
// Both kernels are bandwidth-bound: each thread moves 16 bytes per tensor per iteration
// (128-bit loads and stores) in a grid-stride loop. Arithmetic in float32 for half inputs
// (float64 for float64), rounded to nearest even at the store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "pgd_philox.h"

namespace anchor_kernels::pgd::cuda {

constexpr int kThreads = 256;

template <typename T>
struct Num;
template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
  static __device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
};
template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
  static __device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
  static __device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
};
template <>
struct Num<__half> : Num<float> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> : Num<float> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// 16 bytes of T, loaded and stored as one 128-bit access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// NaN when either operand is NaN, like torch.maximum / torch.minimum.
template <typename A>
__device__ __forceinline__ A max_nan(A a, A b) {
  return (a > b || a != a) ? a : b;
}
template <typename A>
__device__ __forceinline__ A min_nan(A a, A b) {
  return (a < b || a != a) ? a : b;
}

template <typename A>
__device__ __forceinline__ A step_one(A xa, A g, A x, A e, A a, A lo, A hi) {
  const A sgn = A(g > A(0)) - A(g < A(0));  // sign(0) = sign(NaN) = 0
  const A v = xa + a * sgn;                  // a * sgn is exact: an FMA gives the same bits
  return min_nan(max_nan(min_nan(max_nan(v, x - e), x + e), lo), hi);
}

template <typename T>
__device__ __forceinline__ typename Num<T>::acc start_one(typename Num<T>::acc x,
                                                          typename Num<T>::acc e, uint64_t i,
                                                          uint64_t seed,
                                                          typename Num<T>::acc lo,
                                                          typename Num<T>::acc hi) {
  using A = typename Num<T>::acc;
  const A u = static_cast<A>(philox_uniform(i, seed));
  // eps (2u - 1) rounded on its own, then the sum: no contraction into an FMA
  const A v = Num<T>::add_rn(x, Num<T>::mul_rn(e, A(2) * u - A(1)));
  return min_nan(max_nan(v, lo), hi);
}

// Per-sample values: the sample of element i0 + j, walked without a division per element.
template <typename I>
struct SampleWalk {
  I b, r, inner;
  __device__ __forceinline__ SampleWalk(I i0, I inner_) : inner(inner_) {
    b = i0 / inner;
    r = i0 - b * inner;
  }
  __device__ __forceinline__ void next() {
    if (++r == inner) {
      r = 0;
      ++b;
    }
  }
};

template <typename T, bool EPS_PS, bool ALPHA_PS, typename I>
__global__ void __launch_bounds__(kThreads)
    step_kernel(T* __restrict__ xa, const T* __restrict__ g, const T* __restrict__ x,
                const typename Num<T>::acc* __restrict__ eps_p,
                const typename Num<T>::acc* __restrict__ alpha_p, typename Num<T>::acc eps,
                typename Num<T>::acc alpha, typename Num<T>::acc lo, typename Num<T>::acc hi, I n,
                I inner, bool vectorized) {
  using A = typename Num<T>::acc;
  using P = Pack<T>;
  constexpr int V = P::kSize;
  const I width = vectorized ? V : 1;
  const I n_packs = n / width;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I p = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; p < n_packs; p += stride) {
    const I i0 = p * width;
    SampleWalk<I> walk(i0, inner);
    if (vectorized) {
      P pa = reinterpret_cast<const P*>(xa)[p];
      const P pg = reinterpret_cast<const P*>(g)[p];
      const P px = reinterpret_cast<const P*>(x)[p];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A e = EPS_PS ? eps_p[walk.b] : eps;
        const A a = ALPHA_PS ? alpha_p[walk.b] : alpha;
        pa.v[j] = Num<T>::store(step_one<A>(Num<T>::load(pa.v[j]), Num<T>::load(pg.v[j]),
                                            Num<T>::load(px.v[j]), e, a, lo, hi));
        if (EPS_PS || ALPHA_PS) walk.next();
      }
      reinterpret_cast<P*>(xa)[p] = pa;
    } else {
      const A e = EPS_PS ? eps_p[walk.b] : eps;
      const A a = ALPHA_PS ? alpha_p[walk.b] : alpha;
      xa[i0] = Num<T>::store(step_one<A>(Num<T>::load(xa[i0]), Num<T>::load(g[i0]),
                                         Num<T>::load(x[i0]), e, a, lo, hi));
    }
  }
  // the last n mod V elements of the vectorized path
  const I tail = n - n_packs * width;
  if (blockIdx.x == 0 && static_cast<I>(threadIdx.x) < tail) {
    const I i = n_packs * width + threadIdx.x;
    SampleWalk<I> walk(i, inner);
    const A e = EPS_PS ? eps_p[walk.b] : eps;
    const A a = ALPHA_PS ? alpha_p[walk.b] : alpha;
    xa[i] = Num<T>::store(step_one<A>(Num<T>::load(xa[i]), Num<T>::load(g[i]),
                                      Num<T>::load(x[i]), e, a, lo, hi));
  }
}

template <typename T, bool EPS_PS, typename I>
__global__ void __launch_bounds__(kThreads)
    random_start_kernel(T* __restrict__ out, const T* __restrict__ x,
                        const typename Num<T>::acc* __restrict__ eps_p, typename Num<T>::acc eps,
                        uint64_t seed, typename Num<T>::acc lo, typename Num<T>::acc hi, I n,
                        I inner, bool vectorized) {
  using A = typename Num<T>::acc;
  using P = Pack<T>;
  constexpr int V = P::kSize;
  const I width = vectorized ? V : 1;
  const I n_packs = n / width;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I p = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; p < n_packs; p += stride) {
    const I i0 = p * width;
    SampleWalk<I> walk(i0, inner);
    if (vectorized) {
      const P px = reinterpret_cast<const P*>(x)[p];
      P po;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A e = EPS_PS ? eps_p[walk.b] : eps;
        po.v[j] = Num<T>::store(start_one<T>(Num<T>::load(px.v[j]), e,
                                             static_cast<uint64_t>(i0 + j), seed, lo, hi));
        if (EPS_PS) walk.next();
      }
      reinterpret_cast<P*>(out)[p] = po;
    } else {
      const A e = EPS_PS ? eps_p[walk.b] : eps;
      out[i0] = Num<T>::store(start_one<T>(Num<T>::load(x[i0]), e, static_cast<uint64_t>(i0),
                                           seed, lo, hi));
    }
  }
  const I tail = n - n_packs * width;
  if (blockIdx.x == 0 && static_cast<I>(threadIdx.x) < tail) {
    const I i = n_packs * width + threadIdx.x;
    SampleWalk<I> walk(i, inner);
    const A e = EPS_PS ? eps_p[walk.b] : eps;
    out[i] = Num<T>::store(start_one<T>(Num<T>::load(x[i]), e, static_cast<uint64_t>(i), seed,
                                        lo, hi));
  }
}

}  // namespace anchor_kernels::pgd::cuda
