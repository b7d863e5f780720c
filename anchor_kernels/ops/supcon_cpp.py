"""The "cpu" and "cuda" backends of the SupCon loss: the C++ extension's ops
``anchor_kernels::supcon_fwd`` / ``supcon_bwd`` (``csrc/supcon.cpp``, ``csrc/cuda/supcon*``)
with their fake kernels and autograd registered here.

Schemas (declared once, in ``csrc/supcon.cpp``; the dispatcher picks the CPU or CUDA kernel)::

    supcon_fwd(features (M, D), labels (M,), contrast (N, D)?, contrast_labels (N,)?,
               temperature, beta, detach_weights, normalize, anchor_offset?, lse_only,
               scale=1, reduction=0)
        -> loss, valid (M,) bool, stats (M, 4): per-anchor statistics that only the same
           device's supcon_bwd reads (their layout: csrc/supcon.cpp, csrc/cuda/supcon_kernels.cuh)
    supcon_bwd(grad_loss, <the forward's inputs>, stats, ..., scale, reduction)
        -> grad_features (M, D), grad_contrast (N, D) ((0, D) when contrast is None)

``loss`` is the per-anchor value times ``scale`` (M,) with reduction 0, or one value (0-d):
1 their sum, 2 their mean over valid anchors; ``grad_loss`` has the loss's shape.

``loss`` and ``stats`` are float32 for half inputs, float64 for float64. ``detach_weights``
is read by the backward only (it is a forward argument so that autograd can pass it on).
With ``lse_only`` the per-anchor value is LSE_i, valid means A(i) is non-empty and stats[:, 3]
holds |A(i)| (the top-k mode adds its own positive term).

Single backward only: a second differentiation raises ``_autograd.double_backward_error``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..reference import reduce_loss
from .._autograd import call, eager_function, refuse_double_backward
from ..backends import REDUCTION_CODES, SupConProblem
from . import supcon_composite, supcon_topk

LOAD_ERROR = _ext.load()

# From this many logits (M N) on, plain SupCon (beta = 0) takes its positive term from class
# sums around these kernels' log-sum-exp-only mode (supcon_classsum.py): some 50 small torch
# ops for less per-logit work. Where that pays is for a GPU to say; the one measurement, of the
# Triton kernels on an H200, found no gain up to N = 65536 (supcon_triton.STREAMING_MIN_LOGITS),
# so these kernels start where those do.
CLASSSUM_MIN_LOGITS = 131072 * 131072


def _fwd_fake(features, labels, contrast, contrast_labels, temperature, beta, detach_weights,
              normalize, anchor_offset, lse_only, scale=1.0, reduction=0):
    m = features.shape[0]
    acc = torch.promote_types(features.dtype, torch.float32)
    return (features.new_empty((m,) if reduction == 0 else (), dtype=acc),
            features.new_empty((m,), dtype=torch.bool), features.new_empty((m, 4), dtype=acc))


def _bwd_fake(grad_loss, features, labels, contrast, contrast_labels, stats, temperature, beta,
              detach_weights, normalize, anchor_offset, lse_only, scale=1.0, reduction=0):
    dg = (features.new_empty((0, features.shape[1])) if contrast is None
          else contrast.new_empty(contrast.shape))
    return features.new_empty(features.shape), dg


def _setup_context(ctx, inputs, output):
    features, labels, contrast, contrast_labels, *scalars = inputs
    _, valid, stats = output
    ctx.mark_non_differentiable(valid, stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for valid and stats
    ctx.save_for_backward(features, labels, contrast, contrast_labels, stats)
    # temperature, beta, detach_weights, normalize, anchor_offset, lse_only, scale, reduction
    ctx.scalars = scalars


def _backward(ctx, grad_loss, grad_valid, grad_stats):
    if grad_loss is None:  # the loss unused
        return (None,) * (4 + len(ctx.scalars))
    features, labels, contrast, contrast_labels, stats = ctx.saved_tensors
    df, dg = torch.ops.anchor_kernels.supcon_bwd(grad_loss, features, labels, contrast,
                                                 contrast_labels, stats, *ctx.scalars)
    df, dg = refuse_double_backward(features.device.type, (df, dg),
                                    (grad_loss, features, contrast))
    # Gradients of (features, labels, contrast, contrast_labels, <the scalars>).
    return (df, None, None if contrast is None else dg, None) + (None,) * len(ctx.scalars)


if LOAD_ERROR is None:
    torch.library.register_fake("anchor_kernels::supcon_fwd")(_fwd_fake)
    torch.library.register_fake("anchor_kernels::supcon_bwd")(_bwd_fake)
    torch.library.register_autograd("anchor_kernels::supcon_fwd", _backward,
                                    setup_context=_setup_context)
    SupConCpp = eager_function("SupConCpp", torch.ops.anchor_kernels.supcon_fwd, _setup_context,
                               _backward, 12)


def max_beta(dtype: torch.dtype) -> float:
    """The largest ``hard_positive_beta`` the kernels take for inputs of ``dtype``: beta times
    the accumulation dtype's rounding unit stays below 1e-4, so that the backward's weights,
    from recomputed cosines, agree with the forward's to that relative error."""
    return 1e11 if dtype == torch.float64 else 1e3  # accumulation in float64, else float32


class CppSupCon:
    """The extension's kernels on one device type: fused streaming forward and backward with
    O(M + N) extra memory (per-thread tiles on CPU, per-block tiles on CUDA)."""

    def __init__(self, name: str, device_type: str, dtypes: tuple[torch.dtype, ...]):
        self.name, self.device_type, self.dtypes = name, device_type, dtypes

    def load_error(self) -> str | None:
        return LOAD_ERROR if self.device_type == "cpu" else _ext.cuda_error()

    def not_supported_reasons(self, p: SupConProblem) -> list[str]:
        reasons = []
        error = self.load_error()
        if error is not None:
            reasons.append(error)
        if p.f.device.type != self.device_type:
            reasons.append(f"the {self.name} backend runs {self.device_type} tensors; "
                           f"features are on {p.f.device}")
        if p.f.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {p.f.dtype} is not supported by the {self.name} kernels ({names})")
        if p.topk is not None and not p.lse_only:
            reasons += supcon_topk.topk_reasons(p, self.name)
        limit = max_beta(p.f.dtype)
        if p.beta > limit:
            reasons.append(
                f"hard_positive_beta={p.beta:g} is above {limit:g}, past which the {self.name} "
                f"kernels' soft-mining gradient in {p.out_dtype} is dominated by rounding (the "
                "backward recomputes each cosine, and an error of one rounding unit moves a "
                "weight by beta times that); use backend='eager'"
                + (" or float64 inputs" if p.out_dtype != torch.float64 else ""))
        return reasons

    def _call(self, p: SupConProblem, scale: float, reduction: int) -> tuple[Tensor, Tensor]:
        """(loss, valid) from one op call each way (``reduction`` as in the op schema)."""
        # Rows whose squares could overflow are scaled exactly inside the op (the CUDA
        # kernels' overflow-safe copy, the CPU kernels' robust norms).
        inputs = (p.f, p.y_f, p.g, p.y_g, p.temperature, p.beta, p.detach_weights, p.normalize,
                  p.anchor_offset, p.lse_only, scale, reduction)
        loss, valid, _ = call(SupConCpp, torch.ops.anchor_kernels.supcon_fwd, *inputs)
        return loss, valid

    def _composite(self, p: SupConProblem):
        return supcon_composite.composite(self, p, self.name, CLASSSUM_MIN_LOGITS)

    def per_anchor(self, p: SupConProblem) -> tuple[Tensor, Tensor]:
        composite = self._composite(p)
        if composite is not None:
            return composite()
        return self._call(p, 1.0, 0)

    def loss(self, p: SupConProblem, scale: float, reduction: str) -> Tensor:
        """The loss with ``scale`` and the reduction applied inside the op."""
        composite = self._composite(p)
        if composite is not None:
            per_anchor, valid = composite()
            return reduce_loss(per_anchor, valid, scale, reduction)
        return self._call(p, scale, REDUCTION_CODES[reduction])[0]


CPU_BACKEND = CppSupCon("cpu", "cpu", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
CUDA_BACKEND = CppSupCon("cuda", "cuda", (torch.float16, torch.bfloat16, torch.float32))
