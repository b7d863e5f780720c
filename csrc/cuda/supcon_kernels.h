// Launchers of the CUDA SupCon kernels (supcon_kernels.cu): raw pointers, sizes, strides and
// a stream, so that the kernels compile with CUDA headers only and the torch glue
// (supcon.cpp) stays small. See csrc/supcon.cpp for the maths.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace anchor_kernels::supcon_cuda {

// kTFloat32: float32 rows whose products may run as TF32, as torch.matmul's do when torch
// allows TF32 (cuda_glue::kernel_dtype decides). The row pass rounds their copy to TF32
// (RowNormArgs::tf32) and the tensor-core S = A B^T kernels take them (mma_supported); every
// other kernel treats them as kFloat32.
enum class Dtype { kFloat32, kFloat16, kBFloat16, kTFloat32 };

// Row statistics modes; the numbering is shared with the CPU kernels.
enum FwdMode { kFwdLse = 0, kFwdUniform = 1, kFwdSoft = 2 };
enum BwdMode { kBwdLse = 0, kBwdUniform = 1, kBwdSoftDetached = 2, kBwdSoftExact = 3 };

// A matrix of `rows` rows, D columns, element (r, d) at data[r * s0 + d * s1].
struct Matrix {
  const void* data;
  int64_t rows, s0, s1;
};

struct FwdArgs {
  Matrix x;           // anchors (M, D)
  Matrix y;           // contrast set (N, D)
  int64_t D;
  const int64_t* lx;  // (M,) labels
  const int64_t* ly;  // (N,)
  const float* rnx;   // (M,) 1 / max(||x_i||, eps), or ones without normalisation
  const float* rny;   // (N,)
  bool has_self;      // anchor i is column i + shift
  int64_t shift;
  float inv_tau, nbt;  // 1 / tau and -beta * tau
  // Normalised rows bound every logit: s log2(e) <= shift2 = log2(e) / tau (1 + 2^-8). When
  // > 0, the tensor-core forwards shift their exponentials by that bound (and the soft
  // weights' by |nbt| shift2) instead of running maxima; the caller sets it only where no
  // exponential that matters can underflow (fixed_shift, below). 0: running maxima.
  float shift2;
  int mode;            // FwdMode
  float* loss;         // (M,)
  bool* valid;         // (M,)
  float* stats;        // (M, 4): LSE, sbar, logW, |P| (|A| with lse_only)
  // The sm_80 tensor-core forward only (fwd_splits): with splits > 1 the columns are split
  // among that many CTAs per row block, each writes its rows' partial statistics to partial
  // (splits, M, kFwdPartial), and one more launch merges them into loss, valid and stats.
  int splits;
  float* partial;
};

constexpr int kFwdPartial = 6;  // per row and split: shift, sum, |P|, sum over P, soft shift, sum

// FwdArgs::shift2: with normalised rows every logit is bounded, s log2(e) <= log2(e) / tau,
// and the tensor-core forwards may shift their exponentials by that bound (and the soft
// weights' by beta log2(e)) instead of keeping running maxima. Only where the smallest term a
// row can sum, 2^(-2 shift), stays far above float32's underflow: the Triton kernels' rule,
// 2 shift + log2(N) <= 96, for both. (Checked at its boundary by
// tests/cuda_emulation/supcon_fwd_math.cu.)
inline float fixed_shift(bool normalize, double temperature, double beta, int64_t n) {
  if (!normalize) return 0.f;
  const double shift2 = 1.4426950408889634 / temperature * (1.0 + 1.0 / 256);
  const double room = 96.0 - std::log2(double(std::max<int64_t>(n, 1)));
  return 2 * shift2 <= room && 2 * beta * temperature * shift2 <= room ? float(shift2) : 0.f;
}

// dX (R, D) fp32 = sum_y H_xy c_y / tau over the inner rows y (c_y = y row times rny), where
// H_xy = G(x, y) with anchor x's statistics (outer) + G(y, x) with anchor y's (inner), and
// H = 0 on the self pair y = x + shift.
struct BwdArgs {
  Matrix x;            // outer rows (R, D)
  Matrix y;            // inner rows (Q, D)
  int64_t D;
  const int64_t* lx;   // (R,)
  const int64_t* ly;   // (Q,)
  const float* rnx;    // (R,)
  const float* rny;    // (Q,)
  const float* anchor; // (4, M): g_i (0 if invalid), LSE_i (+inf), q_i, sbar_i per anchor
  int64_t M;
  const float* gmax;   // device scalar: max |g_i| (1 when all are 0); keeps half tiles in range
  bool outer, inner;   // which of x / y are the anchors whose statistics enter H
  bool has_self;
  int64_t shift;
  float inv_tau, nbt;
  int mode;            // BwdMode
  float* dx;           // (R, D) contiguous
  // Tensor-core kernels only (mma_supported), when df is set: the chain rule through the
  // normalisation in the epilogue, df = (dz - z (z . dz)) rnx prescale with z = x rnx
  // (dz rnx prescale where ||x|| < eps; dz without normalisation), written to df (R, D,
  // contiguous, the features' dtype) instead of dz to dx.
  void* df;
  const float* norms;  // (R,) ||x_r||, or null without normalisation
  // (R,) the power of two each row of x was prescaled by (RowNormArgs::scaled; df's rows take
  // it as the chain rule's last factor), or null where the rows are the inputs themselves.
  const float* prescale;
  float norm_eps;
  // The sm_80 tensor-core backward only (bwd_splits): with splits > 1 the columns are split
  // among that many CTAs per row block and each writes its dz (times 1 / tau, fp32) to its
  // slice of dx (splits, R, D); df is then unset, and norm_backward_kernel sums the slices.
  int splits;
};

// The O(M + N) passes around them (supcon_rows.cuh), launched by supcon_rows.cu.
//
// With `scaled` set (bf16 / fp32 inputs with normalisation; TF32 rows, with or without), the
// kernels read a contiguous copy. With normalisation, rows whose sum of squares could
// overflow float32 (max |x_r| > big = sqrt(FLT_MAX / 4D)) are scaled in it by 2^-e, with
// 2^(e-1) <= max |x_r| < 2^e (reference.overflow_safe_scale): a power of two changes no unit
// vector, and the raw products of the copy's rows cannot overflow. The norms are then the
// copy's, and `prescale` holds each row's factor (1 for almost all; 1 for all without
// normalisation) for the backward's chain rule.
struct RowNormArgs {
  Matrix x;       // anchors (M, D)
  Matrix y;       // contrast rows (N, D); rows = 0 with one set
  int64_t D;
  bool normalize;
  float eps;
  float* norms;   // (M + N,): ||x_r||, then ||y_r||
  float* inv;     // (M + N,): 1 / max(||.||, eps), or 1 without normalisation
  void* scaled;   // (M + N, D) contiguous, the inputs' dtype: x's rows then y's; or null
  float* prescale;  // (M + N,) with `scaled`: each row's factor
  float big;
  // kTFloat32 rows: the copy's elements (after the prescale) are rounded to TF32, to nearest
  // with ties away from zero as cvt.rna.tf32.f32 does (round_tf32), so that the TF32 products
  // of the tensor cores are those of the rounded rows, and the norms are the rounded rows'.
  bool tf32;
};

// The chain rule through the normalisation, for the kernels that write dz (fp32), the gradient
// with respect to z = x / max(||x||, eps): dx = (dz - [||x|| >= eps] z (z . dz)) / max(||x||, eps)
// times the row's prescale factor; dx = dz without normalisation. dx in x's dtype.
struct NormBwdArgs {
  Matrix x;               // (R, D): the rows the kernels read (the overflow-safe copy, or the inputs)
  const float* dz;        // (R, D) contiguous
  const float* norms;     // (R,) ||x_r||, as row_norms_kernel wrote them
  const float* prescale;  // (R,) the copy's factors, or null
  int64_t D;
  bool normalize;
  float eps;
  void* dx;               // (R, D) contiguous
  int parts;              // dz holds this many (R, D) slices, summed in order (0 or 1: one)
};

struct LossReduceArgs {
  const float* loss;   // (M,) per anchor, 0 where not valid
  const bool* valid;   // (M,)
  int64_t M;
  float scale;
  int reduction;       // 0 none: out (M,); 1 sum, 2 mean over valid anchors: out (1,)
  float* out;
};

struct AnchorStageArgs {
  const float* stats;  // (M, 4) contiguous, as the forward wrote them
  const float* grad;   // incoming gradient: g_i at grad[i * grad_stride]
  int64_t grad_stride; // 0 for a reduced loss's one value (or an expanded gradient)
  int64_t M;
  float scale;
  int reduction;       // as in LossReduceArgs: 2 divides by the number of valid anchors
  bool uniform;        // BwdMode kBwdUniform: q_i = 1 / |P(i)|
  float* anchor;       // (4, M): BwdArgs::anchor
  float* gmax;         // (1,): BwdArgs::gmax
};

cudaError_t launch_row_norms(Dtype dtype, const RowNormArgs& args, cudaStream_t stream);
cudaError_t launch_norm_backward(Dtype dtype, const NormBwdArgs& args, cudaStream_t stream);
cudaError_t launch_loss_reduce(const LossReduceArgs& args, cudaStream_t stream);
cudaError_t launch_anchor_stage(const AnchorStageArgs& args, cudaStream_t stream);

// bf16 / fp16 and TF32 inputs that the CuTe kernels take (mma_supported) run there; other
// bf16 / fp16 inputs on the WMMA kernels of supcon_kernels.cuh where the binary is built for
// sm_80 or newer; other fp32 inputs, and everything on older targets, as fp32 FMA. Returns the
// launch error, if any.
cudaError_t launch_supcon_fwd(Dtype dtype, const FwdArgs& args, cudaStream_t stream);
cudaError_t launch_supcon_bwd(Dtype dtype, const BwdArgs& args, cudaStream_t stream);

// The CuTe tensor-core kernels (supcon_mma.cu): bf16 / fp16, D <= 128 with D % 8 == 0, rows
// contiguous with a row stride % 8 == 0 and 16-byte aligned, and sm_80+ code for the device;
// not with ANCHOR_KERNELS_CUDA_KERNELS=general (the general kernels then run, for comparison;
// the similarity and the selection take their CuTe kernels by the same rule). kTFloat32 rows
// too, with D and the row strides multiples of 4, on a device that grants a CTA the TF32
// kernels' shared memory (135.5 KiB: sm_80 and sm_90 do, sm_86 and sm_89 do not).
bool mma_supported(Dtype dtype, const Matrix& x, const Matrix& y, int64_t D);
cudaError_t launch_supcon_fwd_mma(Dtype dtype, const FwdArgs& args, cudaStream_t stream);
// FwdArgs::splits for a forward: 1 unless it runs on a tensor-core kernel (sm_80 or Hopper)
// with fewer row blocks than two per SM of the device, which then split its columns (4 tiles
// at least).
int fwd_splits(Dtype dtype, const FwdArgs& args);
// BwdArgs::splits for a backward pass, by the same rule (64-row blocks, 128 on Hopper; its
// column tiles).
int bwd_splits(Dtype dtype, const BwdArgs& args);
cudaError_t launch_supcon_bwd_mma(Dtype dtype, const BwdArgs& args, cudaStream_t stream);
cudaError_t launch_supcon_bwd_mma_tf32(const BwdArgs& args, cudaStream_t stream);  // (its kTFloat32 part)

// The Hopper kernels (supcon_sm90_fwd.cu, supcon_sm90_bwd.cu: TMA, wgmma, warp
// specialisation; the backward fuses the normalisation's chain rule as the sm_80 one) take the
// inputs of mma_supported with at least one row and row strides of at least D, both below
// 2^31, on a compute capability 9.0 device, in a binary built with sm_90a code
// (ANCHOR_KERNELS_SM90A); until their first validation on a device, only when
// ANCHOR_KERNELS_CUDA_KERNELS=sm90 (cuda_kernels_choice(): "auto" when unset; "auto" and
// "sm80" take the sm_80 kernels, "general" none of the tensor-core ones, the torch glue
// refuses other values: cuda_glue::check_kernel_choice).
const char* cuda_kernels_choice();
bool sm90_supported(Dtype dtype, const Matrix& x, const Matrix& y, int64_t D);
int sm90_fwd_splits(Dtype dtype, const FwdArgs& args);  // (fwd_splits' Hopper part)
int sm90_bwd_splits(Dtype dtype, const BwdArgs& args);  // (bwd_splits' Hopper part)
cudaError_t launch_supcon_fwd_sm90(Dtype dtype, const FwdArgs& args, cudaStream_t stream);
cudaError_t launch_supcon_bwd_sm90(Dtype dtype, const BwdArgs& args, cudaStream_t stream);

}  // namespace anchor_kernels::supcon_cuda
