// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// generator of Random123, cuRAND and Triton's tl.randint4x, for the PGD random start on the
// CPU and on CUDA. Standard headers only, so that the .cu files can include it.
// Spec: anchor_kernels/reference.py philox_4x32_10 / philox_uniform.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PGD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PGD_HOST_DEVICE inline
#endif

namespace anchor_kernels::pgd {

PGD_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Word 0 of Philox4x32-10 with counter (c0, c1, 0, 0) and key (k0, k1).
PGD_HOST_DEVICE uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi2 = mulhi32(0xCD9E8D57u, c2), lo2 = 0xCD9E8D57u * c2;
    c0 = hi2 ^ c1 ^ k0;
    c1 = lo2;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// The uniform of element i: (word0 >> 8) * 2^-24, exact in float32, in [0, 1).
PGD_HOST_DEVICE float philox_uniform(uint64_t i, uint64_t seed) {
  const uint32_t r = philox_word0(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(r >> 8) * 5.9604644775390625e-08f;
}

}  // namespace anchor_kernels::pgd
