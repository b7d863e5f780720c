// Torch glue of the CUDA SupCon kernels: argument checks (shared with the CPU kernels), the
// O(M + N) per-row inputs (inverse norms, per-anchor statistics), the launches on the current
// stream, the chain rule through the normalisation, and the loss's scale and reduction. Built only with a CUDA torch and
// toolkit; the kernels are in supcon_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "supcon_args.h"
#include "supcon_kernels.h"

namespace anchor_kernels::supcon {
namespace {

namespace k = anchor_kernels::supcon_cuda;

constexpr double kNormEps = 1e-12;  // reference.NORM_EPS

k::Dtype kernel_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return k::Dtype::kFloat16;
    case at::kBFloat16:
      return k::Dtype::kBFloat16;
    case at::kFloat:
      return k::Dtype::kFloat32;
    default:
      TORCH_CHECK(false, "supcon (CUDA): features must be float32, bfloat16 or float16, got ",
                  x.scalar_type(), " (float64 runs on the cpu backend)");
  }
}

k::Matrix matrix(const at::Tensor& x) { return {x.data_ptr(), x.size(0), x.stride(0), x.stride(1)}; }

// (R,) float32 row norms ||x_r||, computed in fp32 whatever the input dtype.
at::Tensor row_norms(const at::Tensor& x) {
  return at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, false, at::kFloat);
}

at::Tensor inv_norms(const at::Tensor& norms, bool normalize) {
  return normalize ? norms.clamp_min(kNormEps).reciprocal() : at::ones_like(norms);
}

// df from dz (fp32): (dz - z (z . dz)) / ||x|| with z = x / ||x||, or dz / eps where the
// clamp max(||x||, eps) holds; dz itself without normalisation.
at::Tensor normalize_backward(const at::Tensor& x, const at::Tensor& norms, const at::Tensor& dz,
                              bool normalize) {
  if (!normalize) return dz.to(x.scalar_type());
  const at::Tensor rn = inv_norms(norms, true).unsqueeze(1);
  const at::Tensor z = x.to(at::kFloat) * rn;
  const at::Tensor projected = dz - z * (z * dz).sum(1, true);
  return (at::where((norms >= kNormEps).unsqueeze(1), projected, dz) * rn).to(x.scalar_type());
}

// The loss from the per-anchor values (0 for anchors without positives): times `scale`, then
// reduced in the reference's order (reference.reduce_loss), on the device: no reduction is
// left to Python, and nothing synchronises.
at::Tensor reduce_loss(const at::Tensor& per_anchor, const at::Tensor& valid, double scale,
                       int64_t reduction) {
  const at::Tensor scaled = scale == 1.0 ? per_anchor : per_anchor.mul(scale);
  if (reduction == kNone) return scaled;
  const at::Tensor total = scaled.sum();
  if (reduction == kSum) return total;
  return total.div(valid.sum().clamp_min(1).to(total.scalar_type()));
}

// d loss / d per-anchor value (M,) in `acc`, 0 where `valid` is false: the backward of
// reduce_loss, with grad () for a reduced loss and (M,) per anchor. No host synchronisation
// (the mean's count stays on the device).
at::Tensor per_anchor_grad(const at::Tensor& grad, const at::Tensor& valid, double scale,
                           int64_t reduction, at::ScalarType acc) {
  at::Tensor g = grad.to(acc).mul(scale);
  if (reduction == kMean) g = g.div(valid.sum().clamp_min(1).to(acc));
  return at::where(valid, g, 0.0);
}

int forward_mode(bool lse_only, double beta) {
  return lse_only ? k::kFwdLse : (beta == 0 ? k::kFwdUniform : k::kFwdSoft);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_fwd_cuda(
    const at::Tensor& f, const at::Tensor& labels, const std::optional<at::Tensor>& contrast,
    const std::optional<at::Tensor>& contrast_labels, double temperature, double beta,
    bool detach_weights, bool normalize, std::optional<int64_t> anchor_offset, bool lse_only,
    double scale, int64_t reduction) {
  (void)detach_weights;  // read by the backward only
  const Sizes sz = check_forward_args(f, labels, contrast, contrast_labels, temperature, beta,
                                      anchor_offset);
  check_reduction(scale, reduction);
  const k::Dtype dtype = kernel_dtype(f);
  const c10::cuda::CUDAGuard guard(f.device());
  const at::Tensor g = sz.single ? f : *contrast;
  const at::Tensor lf = labels.to(at::kLong).contiguous();
  const at::Tensor lg = sz.single ? lf : contrast_labels->to(at::kLong).contiguous();
  const at::Tensor rnf = inv_norms(row_norms(f), normalize);
  const at::Tensor rng = sz.single ? rnf : inv_norms(row_norms(g), normalize);
  const auto fopts = f.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({sz.M}, fopts);
  at::Tensor valid = at::empty({sz.M}, f.options().dtype(at::kBool));
  at::Tensor stats = at::empty({sz.M, 4}, fopts);

  k::FwdArgs a{};
  a.x = matrix(f);
  a.y = matrix(g);
  a.D = sz.D;
  a.lx = lf.data_ptr<int64_t>();
  a.ly = lg.data_ptr<int64_t>();
  a.rnx = rnf.data_ptr<float>();
  a.rny = rng.data_ptr<float>();
  a.has_self = sz.offset >= 0;
  a.shift = a.has_self ? sz.offset : 0;
  a.inv_tau = float(1.0 / temperature);
  a.nbt = float(-beta * temperature);
  a.mode = forward_mode(lse_only, beta);
  a.loss = loss.data_ptr<float>();
  a.valid = valid.data_ptr<bool>();
  a.stats = stats.data_ptr<float>();
  C10_CUDA_CHECK(k::launch_supcon_fwd(dtype, a, c10::cuda::getCurrentCUDAStream()));
  return {reduce_loss(loss, valid, scale, reduction), valid, stats};
}

std::tuple<at::Tensor, at::Tensor> supcon_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& f, const at::Tensor& labels,
    const std::optional<at::Tensor>& contrast, const std::optional<at::Tensor>& contrast_labels,
    const at::Tensor& stats, double temperature, double beta, bool detach_weights,
    bool normalize, std::optional<int64_t> anchor_offset, bool lse_only, double scale,
    int64_t reduction) {
  const Sizes sz = check_forward_args(f, labels, contrast, contrast_labels, temperature, beta,
                                      anchor_offset);
  check_backward_args(sz, f, grad, stats, scale, reduction);
  const k::Dtype dtype = kernel_dtype(f);
  const c10::cuda::CUDAGuard guard(f.device());
  const int mode = lse_only ? k::kBwdLse
                   : beta == 0     ? k::kBwdUniform
                   : detach_weights ? k::kBwdSoftDetached
                                    : k::kBwdSoftExact;
  const at::Tensor g = sz.single ? f : *contrast;
  const at::Tensor lf = labels.to(at::kLong).contiguous();
  const at::Tensor lg = sz.single ? lf : contrast_labels->to(at::kLong).contiguous();
  const at::Tensor nf = row_norms(f);
  const at::Tensor ng = sz.single ? nf : row_norms(g);
  const at::Tensor rnf = inv_norms(nf, normalize);
  const at::Tensor rng = sz.single ? rnf : inv_norms(ng, normalize);

  // Per anchor (4, M): g_i, LSE_i, q_i (1/|P| or logW), sbar_i. Anchors that are not valid
  // get g = 0 and LSE = q = +inf so that their G rows are exactly 0.
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor ok = stats.select(1, 3) > 0;
  const at::Tensor ga = per_anchor_grad(grad, ok, scale, reduction, at::kFloat);
  const at::Tensor q = mode == k::kBwdUniform ? at::where(ok, stats.select(1, 3).reciprocal(), 0.0)
                                              : at::where(ok, stats.select(1, 2), inf);
  const at::Tensor anchor = at::stack({ga, at::where(ok, stats.select(1, 0), inf), q,
                                       at::where(ok, stats.select(1, 1), 0.0)})
                                .contiguous();
  const at::Tensor amax = ga.abs().max();
  const at::Tensor gmax = at::where(amax > 0, amax, at::ones_like(amax)).contiguous();

  k::BwdArgs a{};
  a.D = sz.D;
  a.anchor = anchor.data_ptr<float>();
  a.M = sz.M;
  a.gmax = gmax.data_ptr<float>();
  a.has_self = sz.offset >= 0;
  a.inv_tau = float(1.0 / temperature);
  a.nbt = float(-beta * temperature);
  a.mode = mode;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = f.options().dtype(at::kFloat);

  // The tensor-core kernels apply the normalisation's chain rule in their epilogue and write
  // the gradient in the features' dtype; the others write dz in fp32 for normalize_backward.
  const bool fused = k::mma_supported(dtype, matrix(f), matrix(g), sz.D);
  a.norm_eps = float(kNormEps);
  auto pass = [&](const at::Tensor& x, const at::Tensor& norms, int64_t rows) {
    at::Tensor out = at::empty({rows, sz.D}, fused ? x.options() : fopts);
    a.df = fused ? out.data_ptr() : nullptr;
    a.norms = fused && normalize ? norms.data_ptr<float>() : nullptr;
    a.dx = fused ? nullptr : out.data_ptr<float>();
    C10_CUDA_CHECK(k::launch_supcon_bwd(dtype, a, stream));
    return fused ? out : normalize_backward(x, norms, out, normalize);
  };

  // Rows of f: with one set both terms of H (one pass), else the anchor-statistics term.
  a.x = matrix(f);
  a.y = matrix(g);
  a.lx = lf.data_ptr<int64_t>();
  a.ly = lg.data_ptr<int64_t>();
  a.rnx = rnf.data_ptr<float>();
  a.rny = rng.data_ptr<float>();
  a.outer = true;
  a.inner = sz.single;
  a.shift = a.has_self ? sz.offset : 0;
  at::Tensor df = pass(f, nf, sz.M);
  if (sz.single) return {df, at::empty({0, sz.D}, f.options())};

  // Rows of g: the columns' pass, anchors inner.
  a.x = matrix(g);
  a.y = matrix(f);
  a.lx = lg.data_ptr<int64_t>();
  a.ly = lf.data_ptr<int64_t>();
  a.rnx = rng.data_ptr<float>();
  a.rny = rnf.data_ptr<float>();
  a.outer = false;
  a.inner = true;
  a.shift = a.has_self ? -sz.offset : 0;
  return {df, pass(g, ng, sz.N)};
}

}  // namespace
}  // namespace anchor_kernels::supcon

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("supcon_fwd", &anchor_kernels::supcon::supcon_fwd_cuda);
  m.impl("supcon_bwd", &anchor_kernels::supcon::supcon_bwd_cuda);
}
