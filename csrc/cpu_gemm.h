// Row-major tile GEMM for the CPU kernels: C = alpha * A op(B) + beta * C.
//
// The tiles are small (about 128 x 512 x D) and called from inside at::parallel_for, so the
// call must be cheap and single-threaded. The fast path calls the BLAS `sgemm_` / `dgemm_`
// that libtorch_cpu exports (MKL on x86 wheels); they are declared weak so that a torch build
// without them still loads, and the portable path (at::addmm_ on wrapped pointers) runs
// instead. A one-off self-test guards the fast path against an unexpected BLAS ABI.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

extern "C" {
// Integer arguments are passed as pointers to int64 holding small values: on a little-endian
// machine an LP64 BLAS (32-bit ints) and an ILP64 BLAS (64-bit ints) read the same number.
void sgemm_(const char* transa, const char* transb, const void* m, const void* n, const void* k,
            const float* alpha, const float* a, const void* lda, const float* b, const void* ldb,
            const float* beta, float* c, const void* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const void* m, const void* n, const void* k,
            const double* alpha, const double* a, const void* lda, const double* b,
            const void* ldb, const double* beta, double* c, const void* ldc) __attribute__((weak));
// MKL's per-thread thread count (returns the previous one; 0 means "the global setting").
// This is the C entry point that mkl_service.h maps mkl_set_num_threads_local to; the
// lower-case symbol is the Fortran one, which takes a pointer.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace anchor_kernels::cpu {

template <typename T>
inline void blas_gemm_colmajor(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha,
                               const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                               int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  } else {
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
}

// Row-major C (m x n) = alpha * A (m x k) * op(B) + beta * C, op(B) = B (k x n) when
// b_transposed is false, B^T with B stored (n x k) when true. A column-major BLAS sees the
// row-major C as C^T = op(B)^T A^T, hence the swapped operands.
template <typename T>
inline void gemm_fallback(bool b_transposed, int64_t m, int64_t n, int64_t k, T alpha,
                          const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                          int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto A = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  auto B = b_transposed ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                        : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.addmm_(A, B, beta, alpha);
}

template <typename T>
bool blas_self_test() {
  // (2 x 3) @ (3 x 2)^T and (2 x 3) @ (3 x 2) against a hand-computed product.
  const T a[6] = {1, 2, 3, 4, 5, 6};
  const T bt[6] = {1, 0, 2, 0, 1, 1};  // B^T stored (2 x 3)
  const T bn[6] = {1, 0, 0, 1, 2, 1};  // the same B stored (3 x 2)
  const T want[4] = {7, 5, 16, 11};
  T c[4] = {0, 0, 0, 0};
  blas_gemm_colmajor<T>('T', 'N', 2, 2, 3, T(1), bt, 3, a, 3, T(0), c, 2);
  for (int i = 0; i < 4; ++i)
    if (std::abs(c[i] - want[i]) > T(1e-6)) return false;
  T d[4] = {1, 1, 1, 1};
  blas_gemm_colmajor<T>('N', 'N', 2, 2, 3, T(2), bn, 2, a, 3, T(1), d, 2);
  for (int i = 0; i < 4; ++i)
    if (std::abs(d[i] - (2 * want[i] + 1)) > T(1e-6)) return false;
  return true;
}

template <typename T>
bool has_fast_blas() {
  static const bool ok = [] {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    return false;  // the int64-pointer trick above needs little-endian
#endif
    if constexpr (std::is_same_v<T, float>) {
      if (sgemm_ == nullptr) return false;
    } else {
      if (dgemm_ == nullptr) return false;
    }
    return blas_self_test<T>();
  }();
  return ok;
}

// While alive, BLAS calls from this thread run on this thread only. The kernels call BLAS
// from inside at::parallel_for; a BLAS that opened its own thread team there would
// oversubscribe the cores (measured: 6x the CPU time on 2 cores).
class SequentialBlas {
 public:
  SequentialBlas() : active_(MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

template <typename T>
inline void gemm(bool b_transposed, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  if (m == 0 || n == 0) return;
  if (has_fast_blas<T>()) {
    blas_gemm_colmajor<T>(b_transposed ? 'T' : 'N', 'N', n, m, k, alpha, b, ldb, a, lda, beta,
                          c, ldc);
  } else {
    gemm_fallback<T>(b_transposed, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

}  // namespace anchor_kernels::cpu
