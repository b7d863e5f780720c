// Torch glue of the CUDA SupCon kernels: argument checks (shared with the CPU kernels) and the
// launches on the current stream: the row norms, the loss kernels and the loss's scale and
// reduction (forward), the per-anchor staging (backward), and the chain rule through the
// normalisation where the kernels do not fuse it. Built only with a CUDA torch and
// toolkit; the kernels are in supcon_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "rows_glue.h"
#include "supcon_args.h"
#include "supcon_kernels.h"

namespace anchor_kernels::supcon {
namespace {

namespace k = anchor_kernels::supcon_cuda;

using cuda_glue::matrix;
using cuda_glue::normalize_backward;
using cuda_glue::row_norms;
using cuda_glue::Rows;

k::Dtype kernel_dtype(const at::Tensor& f) { return cuda_glue::kernel_dtype(f, "supcon", "features"); }

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
  cuda_glue::check_kernel_choice("supcon");
  const k::Dtype dtype = kernel_dtype(f);
  const c10::cuda::CUDAGuard guard(f.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = sz.single ? f : *contrast;
  const at::Tensor lf = labels.to(at::kLong).contiguous();
  const at::Tensor lg = sz.single ? lf : contrast_labels->to(at::kLong).contiguous();
  const Rows rows = row_norms(dtype, f, g, sz.single, normalize, stream);
  const auto fopts = f.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({sz.M}, fopts);
  at::Tensor valid = at::empty({sz.M}, f.options().dtype(at::kBool));
  at::Tensor stats = at::empty({sz.M, 4}, fopts);

  k::FwdArgs a{};
  a.x = matrix(rows.f);
  a.y = matrix(rows.g);
  a.D = sz.D;
  a.lx = lf.data_ptr<int64_t>();
  a.ly = lg.data_ptr<int64_t>();
  a.rnx = rows.inv(false);
  a.rny = rows.inv(true);
  a.has_self = sz.offset >= 0;
  a.shift = a.has_self ? sz.offset : 0;
  a.inv_tau = float(1.0 / temperature);
  a.nbt = float(-beta * temperature);
  a.mode = forward_mode(lse_only, beta);
  a.shift2 = k::fixed_shift(normalize, temperature, a.mode == k::kFwdSoft ? beta : 0.0, sz.N);
  a.loss = loss.data_ptr<float>();
  a.valid = valid.data_ptr<bool>();
  a.stats = stats.data_ptr<float>();
  a.splits = k::fwd_splits(dtype, a);
  at::Tensor partial;  // the splits' statistics, merged by the forward's last launch
  if (a.splits > 1) {
    partial = at::empty({a.splits, sz.M, k::kFwdPartial}, fopts);
    a.partial = partial.data_ptr<float>();
  }
  C10_CUDA_CHECK(k::launch_supcon_fwd(dtype, a, stream));
  if (reduction == kNone && scale == 1.0) return {loss, valid, stats};

  at::Tensor out = reduction == kNone ? at::empty({sz.M}, fopts) : at::empty({}, fopts);
  const k::LossReduceArgs r{loss.data_ptr<float>(), valid.data_ptr<bool>(), sz.M, float(scale),
                            int(reduction), out.data_ptr<float>()};
  C10_CUDA_CHECK(k::launch_loss_reduce(r, stream));
  return {out, valid, stats};
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
  cuda_glue::check_kernel_choice("supcon");
  const k::Dtype dtype = kernel_dtype(f);
  const c10::cuda::CUDAGuard guard(f.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int mode = lse_only ? k::kBwdLse
                   : beta == 0     ? k::kBwdUniform
                   : detach_weights ? k::kBwdSoftDetached
                                    : k::kBwdSoftExact;
  const at::Tensor g = sz.single ? f : *contrast;
  const at::Tensor lf = labels.to(at::kLong).contiguous();
  const at::Tensor lg = sz.single ? lf : contrast_labels->to(at::kLong).contiguous();
  const Rows rows = row_norms(dtype, f, g, sz.single, normalize, stream);
  const auto fopts = f.options().dtype(at::kFloat);

  // Per anchor (4, M): g_i, LSE_i, q_i (1/|P| or logW), sbar_i, then gmax, from one launch.
  // Invalid anchors get g = 0 and LSE = q = +inf, so that their G rows are exactly 0.
  const at::Tensor st = stats.contiguous();
  const at::Tensor gf = grad.to(at::kFloat);  // () or (M,), any stride (an expand's is 0)
  at::Tensor staged = at::empty({4 * sz.M + 1}, fopts);
  k::AnchorStageArgs s{};
  s.stats = st.data_ptr<float>();
  s.grad = gf.data_ptr<float>();
  s.grad_stride = gf.dim() == 0 ? 0 : gf.stride(0);
  s.M = sz.M;
  s.scale = float(scale);
  s.reduction = int(reduction);
  s.uniform = mode == k::kBwdUniform;
  s.anchor = staged.data_ptr<float>();
  s.gmax = s.anchor + 4 * sz.M;
  C10_CUDA_CHECK(k::launch_anchor_stage(s, stream));

  k::BwdArgs a{};
  a.D = sz.D;
  a.anchor = s.anchor;
  a.M = sz.M;
  a.gmax = s.gmax;
  a.has_self = sz.offset >= 0;
  a.inv_tau = float(1.0 / temperature);
  a.nbt = float(-beta * temperature);
  a.mode = mode;

  // The tensor-core kernels apply the normalisation's chain rule in their epilogue and write
  // the gradient in the features' dtype, unless their columns are split (BwdArgs::splits):
  // then, like the other kernels, they write dz in fp32 (a slice per split) for
  // normalize_backward.
  const bool fused = k::mma_supported(dtype, matrix(rows.f), matrix(rows.g), sz.D);
  a.norm_eps = float(cuda_glue::kNormEps);
  auto pass = [&](const at::Tensor& x, const at::Tensor& x_norms, const at::Tensor& x_prescale) {
    a.splits = fused ? k::bwd_splits(dtype, a) : 1;
    const bool epilogue = fused && a.splits == 1;
    at::Tensor out = a.splits > 1 ? at::empty({a.splits, x.size(0), sz.D}, fopts)
                                  : at::empty({x.size(0), sz.D}, epilogue ? x.options() : fopts);
    a.df = epilogue ? out.data_ptr() : nullptr;
    a.norms = epilogue && normalize ? x_norms.data_ptr<float>() : nullptr;
    a.prescale = epilogue && x_prescale.defined() ? x_prescale.data_ptr<float>() : nullptr;
    a.dx = epilogue ? nullptr : out.data_ptr<float>();
    C10_CUDA_CHECK(k::launch_supcon_bwd(dtype, a, stream));
    return epilogue ? out : normalize_backward(dtype, x, x_norms, x_prescale, out, normalize, stream);
  };

  // Rows of f: with one set both terms of H (one pass), else the anchor-statistics term.
  a.x = matrix(rows.f);
  a.y = matrix(rows.g);
  a.lx = lf.data_ptr<int64_t>();
  a.ly = lg.data_ptr<int64_t>();
  a.rnx = rows.inv(false);
  a.rny = rows.inv(true);
  a.outer = true;
  a.inner = sz.single;
  a.shift = a.has_self ? sz.offset : 0;
  at::Tensor df = pass(rows.f, rows.norms(false), rows.prescale(false));
  if (sz.single) return {df, at::empty({0, sz.D}, f.options())};

  // Rows of g: the columns' pass, anchors inner.
  a.x = matrix(rows.g);
  a.y = matrix(rows.f);
  a.lx = lg.data_ptr<int64_t>();
  a.ly = lf.data_ptr<int64_t>();
  a.rnx = rows.inv(true);
  a.rny = rows.inv(false);
  a.outer = false;
  a.inner = true;
  a.shift = a.has_self ? -sz.offset : 0;
  return {df, pass(rows.g, rows.norms(true), rows.prescale(true))};
}

}  // namespace
}  // namespace anchor_kernels::supcon

TORCH_LIBRARY_IMPL(anchor_kernels, CUDA, m) {
  m.impl("supcon_fwd", &anchor_kernels::supcon::supcon_fwd_cuda);
  m.impl("supcon_bwd", &anchor_kernels::supcon::supcon_bwd_cuda);
}
