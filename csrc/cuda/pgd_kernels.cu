// Launchers of the fused PGD kernels (csrc/cuda/pgd_kernels.cuh). CUDA headers only: the
// torch glue is csrc/cuda/pgd_cuda.cpp.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "pgd_kernels.cuh"

namespace anchor_kernels::pgd::cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Enough resident blocks to fill every SM several times over; the grid-stride loop does the rest.
unsigned grid_for(int64_t work) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 16;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < cap ? blocks : cap));
}

// 32-bit indices unless the tensor is too large for them (64-bit division is slow on the GPU).
constexpr int64_t kMax32 = (int64_t{1} << 30);

template <typename T>
cudaError_t step_typed(void* xa, const void* g, const void* x, const void* eps_p,
                       const void* alpha_p, double eps, double alpha, double lo, double hi,
                       int64_t n, int64_t inner, cudaStream_t stream) {
  using A = typename Num<T>::acc;
  const bool vec = aligned16(xa) && aligned16(g) && aligned16(x);
  const int64_t work = vec ? n / Pack<T>::kSize : n;
  const unsigned grid = grid_for(work);
  auto launch = [&](auto eps_ps, auto alpha_ps, auto index) {
    using I = decltype(index);
    step_kernel<T, decltype(eps_ps)::value, decltype(alpha_ps)::value, I>
        <<<grid, kThreads, 0, stream>>>(
            static_cast<T*>(xa), static_cast<const T*>(g), static_cast<const T*>(x),
            static_cast<const A*>(eps_p), static_cast<const A*>(alpha_p), static_cast<A>(eps),
            static_cast<A>(alpha), static_cast<A>(lo), static_cast<A>(hi), static_cast<I>(n),
            static_cast<I>(inner), vec);
  };
  auto with_index = [&](auto eps_ps, auto alpha_ps) {
    if (n < kMax32) {
      launch(eps_ps, alpha_ps, int32_t{0});
    } else {
      launch(eps_ps, alpha_ps, int64_t{0});
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (eps_p && alpha_p) {
    with_index(Yes{}, Yes{});
  } else if (eps_p) {
    with_index(Yes{}, No{});
  } else if (alpha_p) {
    with_index(No{}, Yes{});
  } else {
    with_index(No{}, No{});
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t random_start_typed(void* out, const void* x, const void* eps_p, double eps,
                               uint64_t seed, double lo, double hi, int64_t n, int64_t inner,
                               cudaStream_t stream) {
  using A = typename Num<T>::acc;
  const bool vec = aligned16(out) && aligned16(x);
  const unsigned grid = grid_for(vec ? n / Pack<T>::kSize : n);
  auto launch = [&](auto eps_ps, auto index) {
    using I = decltype(index);
    random_start_kernel<T, decltype(eps_ps)::value, I><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(x), static_cast<const A*>(eps_p),
        static_cast<A>(eps), seed, static_cast<A>(lo), static_cast<A>(hi), static_cast<I>(n),
        static_cast<I>(inner), vec);
  };
  auto with_index = [&](auto eps_ps) {
    if (n < kMax32) {
      launch(eps_ps, int32_t{0});
    } else {
      launch(eps_ps, int64_t{0});
    }
  };
  if (eps_p) {
    with_index(std::true_type{});
  } else {
    with_index(std::false_type{});
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_step(int dtype, void* xa, const void* g, const void* x, const void* eps_p,
                        const void* alpha_p, double eps, double alpha, double lo, double hi,
                        int64_t n, int64_t inner, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32:
      return step_typed<float>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, stream);
    case kFloat16:
      return step_typed<__half>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, stream);
    case kBFloat16:
      return step_typed<__nv_bfloat16>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner,
                                       stream);
    case kFloat64:
      return step_typed<double>(xa, g, x, eps_p, alpha_p, eps, alpha, lo, hi, n, inner, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_random_start(int dtype, void* out, const void* x, const void* eps_p,
                                double eps, uint64_t seed, double lo, double hi, int64_t n,
                                int64_t inner, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32:
      return random_start_typed<float>(out, x, eps_p, eps, seed, lo, hi, n, inner, stream);
    case kFloat16:
      return random_start_typed<__half>(out, x, eps_p, eps, seed, lo, hi, n, inner, stream);
    case kBFloat16:
      return random_start_typed<__nv_bfloat16>(out, x, eps_p, eps, seed, lo, hi, n, inner,
                                               stream);
    case kFloat64:
      return random_start_typed<double>(out, x, eps_p, eps, seed, lo, hi, n, inner, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace anchor_kernels::pgd::cuda
