// Torch glue shared by the CUDA ops (supcon_cuda.cpp, similarity_cuda.cpp,
// hard_positive_cuda.cpp): the kernels' dtype code, their matrix view of a tensor, the one
// launch of row_norms_kernel (supcon_rows.cuh) that gives every op its row norms and, for
// bf16 / fp32 rows with normalisation, the overflow-safe copy its kernels read, and the one
// launch of norm_backward_kernel that applies the chain rule through the normalisation for the
// kernels that leave it to the glue.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <limits>
#include <string>

#include "supcon_kernels.h"

namespace anchor_kernels::cuda_glue {

namespace k = anchor_kernels::supcon_cuda;

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS

// ANCHOR_KERNELS_CUDA_KERNELS picks the tensor-core kernel family (supcon_kernels.h); a value
// it does not name is an error, named after the op, rather than a silent fall-back.
inline void check_kernel_choice(const char* op) {
  const std::string choice = k::cuda_kernels_choice();
  TORCH_CHECK(choice == "auto" || choice == "sm80" || choice == "sm90" || choice == "general", op,
              " (CUDA): ANCHOR_KERNELS_CUDA_KERNELS must be auto, sm80, sm90 or general, got '",
              choice, "'");
}

// op and arg name the input in the error, e.g. ("supcon", "features"). float32 inputs are
// kTFloat32 where torch allows TF32 matmuls (torch.set_float32_matmul_precision("high") or
// "medium", torch.backends.cuda.matmul.allow_tf32), as torch.matmul decides it: their
// products may then run as TF32 on the tensor cores, as cuBLAS's would.
inline k::Dtype kernel_dtype(const at::Tensor& x, const char* op, const char* arg) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return k::Dtype::kFloat16;
    case at::kBFloat16:
      return k::Dtype::kBFloat16;
    case at::kFloat:
      return at::globalContext().allowTF32CuBLAS() ? k::Dtype::kTFloat32 : k::Dtype::kFloat32;
    default:
      TORCH_CHECK(false, op, " (CUDA): ", arg, " must be float32, bfloat16 or float16, got ",
                  x.scalar_type(), " (float64 runs on the cpu backend)");
  }
}

inline k::Matrix matrix(const at::Tensor& x) { return {x.data_ptr(), x.size(0), x.stride(0), x.stride(1)}; }

// What the kernels read of f (M, D) and g (N, D), from one launch: the rows themselves, or for
// bf16 and fp32 inputs with normalisation their overflow-safe copy (RowNormArgs::scaled), and
// for TF32 rows (kTFloat32) always a copy rounded to TF32 (prescaled with normalisation), and
// per row (f's, then g's with two sets) the norm, its inverse 1 / max(||.||, eps) (or 1
// without normalisation) and, with the copy, the prescale factor.
struct Rows {
  at::Tensor f, g;      // the kernels' operands
  at::Tensor stats;     // (3, R) float32: norms, inverses, prescale factors
  bool copied;          // stats[2] holds prescale factors (else it is not written)
  int64_t M;
  bool single;          // g is f

  // Rows of g start at M in stats, or are f's with one set.
  int64_t start(bool of_g) const { return of_g && !single ? M : 0; }
  int64_t count(bool of_g) const { return of_g ? g.size(0) : M; }
  const float* inv(bool of_g) const { return stats.data_ptr<float>() + stats.size(1) + start(of_g); }
  at::Tensor norms(bool of_g) const { return stats[0].narrow(0, start(of_g), count(of_g)); }
  at::Tensor prescale(bool of_g) const {
    return copied ? stats[2].narrow(0, start(of_g), count(of_g)) : at::Tensor();
  }
};

// single: g is f (its rows are f's, computed once).
inline Rows row_norms(k::Dtype dtype, const at::Tensor& f, const at::Tensor& g, bool single,
                      bool normalize, cudaStream_t stream) {
  const int64_t M = f.size(0), N = g.size(0), D = f.size(1);
  const int64_t rows = M + (single ? 0 : N);
  // fp32 sums of fp16 squares cannot overflow: fp16 rows are read as they are.
  const bool tf32 = dtype == k::Dtype::kTFloat32;
  const bool copy = (normalize && dtype != k::Dtype::kFloat16) || tf32;
  Rows out{f, g, at::empty({3, rows}, f.options().dtype(at::kFloat)), copy, M, single};
  k::RowNormArgs a{};
  a.x = matrix(f);
  a.y = single ? k::Matrix{nullptr, 0, 0, 0} : matrix(g);
  a.D = D;
  a.normalize = normalize;
  a.eps = float(kNormEps);
  a.norms = out.stats.data_ptr<float>();
  a.inv = a.norms + rows;
  if (copy) {
    const at::Tensor scaled = at::empty({rows, D}, f.options());
    out.f = scaled.narrow(0, 0, M);
    out.g = single ? out.f : scaled.narrow(0, M, N);
    a.scaled = scaled.data_ptr();
    a.prescale = a.inv + rows;
    a.big = float(std::sqrt(double(std::numeric_limits<float>::max()) / (4.0 * double(D))));
    a.tf32 = tf32;
  }
  C10_CUDA_CHECK(k::launch_row_norms(dtype, a, stream));
  return out;
}

// dx in x's dtype from dz (fp32, contiguous: (R, D), or (parts, R, D) to be summed), one launch
// (NormBwdArgs): x the rows the kernels read, norms and prescale (undefined without the copy)
// as Rows gives them.
inline at::Tensor normalize_backward(k::Dtype dtype, const at::Tensor& x, const at::Tensor& norms,
                                     const at::Tensor& prescale, const at::Tensor& dz,
                                     bool normalize, cudaStream_t stream) {
  at::Tensor dx = at::empty({x.size(0), x.size(1)}, x.options());
  k::NormBwdArgs a{matrix(x), dz.data_ptr<float>(), norms.data_ptr<float>(),
                   prescale.defined() ? prescale.data_ptr<float>() : nullptr, x.size(1),
                   normalize, float(kNormEps), dx.data_ptr(), int(dz.dim() == 3 ? dz.size(0) : 1)};
  C10_CUDA_CHECK(k::launch_norm_backward(dtype, a, stream));
  return dx;
}

}  // namespace anchor_kernels::cuda_glue
