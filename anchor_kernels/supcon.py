"""The functional hard-mined SupCon loss: argument handling and backend dispatch."""

from __future__ import annotations

from torch import Tensor

from . import _validate as v
from .backends import BACKEND_NAMES, SupConProblem, select_backend
from .reference import reduce_loss

REDUCTIONS = ("mean", "sum", "none")


def flatten_views(x: Tensor) -> Tensor:
    """(B, V, ...) -> (V B, D), view-major as SupContrast's ``torch.cat(torch.unbind(x, 1))``."""
    b, n_views = x.shape[:2]
    return x.reshape(b, n_views, -1).transpose(0, 1).reshape(b * n_views, -1)


def view_labels(labels: Tensor | None, b: int, n_views: int, like: Tensor, name: str) -> Tensor:
    """Labels of the flattened views: the given (B,) labels, or the sample index (SimCLR)."""
    if labels is None:
        import torch
        return torch.arange(b, device=like.device).repeat(n_views)
    v.check_labels(name, labels, b, like, f"the batch size B={b} of features (B, V, D)")
    return labels.repeat(n_views)


def prepare(features, labels, contrast, contrast_labels, anchor_offset) -> tuple:
    """Validate and flatten to (f, y_f, g, y_g, anchor_offset)."""
    v.check_tensor("features", features, floating=True)
    if features.dim() < 2:
        raise ValueError(f"features must be (M, D) or (B, V, D), got shape {tuple(features.shape)}")
    if features.dim() >= 3 and features.shape[0] * features.shape[1] == 0:
        raise ValueError(f"features is an empty batch (shape {tuple(features.shape)})")
    if features.dim() >= 3:
        b, n_views = features.shape[:2]
        if labels is None and contrast is not None:
            raise ValueError("labels must be given when contrast is given")
        f = flatten_views(features)
        y_f = view_labels(labels, b, n_views, features, "labels")
    else:
        if labels is None:
            raise ValueError("labels is required for 2-D features (M, D); for SimCLR-style "
                             "instance positives pass features as (B, V, D)")
        f = features
        y_f = v.check_labels("labels", labels, f.shape[0], f, f"features' M={f.shape[0]} rows")
    if f.shape[0] == 0:
        raise ValueError(f"features is an empty batch (shape {tuple(features.shape)})")
    if f.shape[1] == 0:
        raise ValueError(f"features has no feature dimension (shape {tuple(features.shape)})")

    if contrast is None:
        if contrast_labels is not None:
            raise ValueError("contrast_labels was given without contrast")
        if anchor_offset != 0:
            raise ValueError(f"anchor_offset must be 0 when contrast is None, got {anchor_offset}")
        return f, y_f, None, None, 0

    v.check_tensor("contrast", contrast, floating=True)
    v.check_same("contrast", contrast, "features", features)
    g = flatten_views(contrast) if contrast.dim() >= 3 else contrast
    if g.dim() != 2 or g.shape[1] != f.shape[1]:
        raise ValueError(f"contrast must be (N, {f.shape[1]}) to match features' D, "
                         f"got shape {tuple(contrast.shape)}")
    if g.shape[0] == 0:
        raise ValueError("contrast is an empty batch")
    if contrast_labels is None:
        raise ValueError("contrast_labels is required when contrast is given")
    if contrast.dim() >= 3:
        y_g = view_labels(contrast_labels, contrast.shape[0], contrast.shape[1], f, "contrast_labels")
    else:
        y_g = v.check_labels("contrast_labels", contrast_labels, g.shape[0], f,
                             f"contrast's N={g.shape[0]} rows")
    if anchor_offset is not None:
        v.check_int("anchor_offset", anchor_offset, minimum=0)
        if anchor_offset + f.shape[0] > g.shape[0]:
            raise ValueError(
                f"anchor_offset={anchor_offset} puts the {f.shape[0]} anchors past the end of the "
                f"{g.shape[0]} contrast rows; use anchor_offset=None when the anchors are not "
                "part of the contrast set")
    return f, y_f, g, y_g, anchor_offset


def supcon_loss(
    features: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    hard_positive_beta: float = 0.0,
    hard_positive_topk: int | None = None,
    detach_weights: bool = True,
    normalize: bool = True,
    contrast: Tensor | None = None,
    contrast_labels: Tensor | None = None,
    anchor_offset: int | None = 0,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Hard-positive-mined supervised contrastive loss (ANCHOR); ``beta = 0`` is SupCon.

    Args:
        features: (M, D) anchors, or SupContrast's (B, V, D) views (flattened view-major to
            (V B, D)). float16, bfloat16, float32 or float64.
        labels: (M,) or (B,) integer labels. None with (B, V, D) features: each sample's other
            views are its only positives (SimCLR / NT-Xent).
        temperature: tau > 0.
        base_temperature: the loss is scaled by tau / base_temperature (default: tau, no scaling).
        hard_positive_beta: soft mining, beta >= 0: positives weighted by softmax(-beta cos).
        hard_positive_topk: top-k mining, k >= 1: the k lowest-cosine positives, weight 1/k'.
        detach_weights: treat the mining weights as constants in the backward (default), or
            differentiate through the softmax.
        normalize: L2-normalise features and contrast rows (fused in the kernels).
        contrast: (N, D) contrast set (default: the anchors themselves).
        contrast_labels: (N,) labels of ``contrast``; required with it.
        anchor_offset: anchor i is contrast row ``anchor_offset + i`` and is left out of its own
            denominator; None when the anchors are not part of ``contrast``.
        reduction: "mean" (over anchors with at least one positive), "sum", or "none" (per
            anchor, 0 for anchors without positives).
        backend: "auto", "triton", "cuda", "cpu" or "eager". An explicit backend that cannot run
            the inputs raises ValueError saying why; it never falls back silently.

    Returns:
        The loss: float32 for half-precision inputs, else the input dtype. A batch where no
        anchor has a positive gives 0 with zero gradients. NaN or inf in the features is not
        checked (that would synchronise the device) and propagates to the loss. On GPU,
        float32 products follow ``torch.get_float32_matmul_precision()`` as ``torch.matmul``
        does: exact at "highest" (torch's default), TF32 allowed at "high" / "medium".
    """
    f, y_f, g, y_g, anchor_offset = prepare(features, labels, contrast, contrast_labels,
                                            anchor_offset)
    temperature = v.check_positive("temperature", temperature)
    base = temperature if base_temperature is None else v.check_positive(
        "base_temperature", base_temperature)
    beta = v.check_positive("hard_positive_beta", hard_positive_beta, allow_zero=True)
    if hard_positive_topk is not None:
        v.check_int("hard_positive_topk", hard_positive_topk, minimum=1)
        if beta != 0.0:
            raise ValueError("hard_positive_beta and hard_positive_topk are two mining modes; "
                             "give one of them")
    if not isinstance(detach_weights, bool):
        raise TypeError(f"detach_weights must be a bool, got {type(detach_weights).__name__}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    v.check_choice("reduction", reduction, REDUCTIONS)
    v.check_choice("backend", backend, BACKEND_NAMES)

    problem = SupConProblem(f, y_f, g, y_g, temperature, beta, hard_positive_topk,
                            detach_weights, normalize, anchor_offset)
    chosen = select_backend(backend, problem)
    if hasattr(chosen, "loss"):  # the reduction fused into the backend's own launch
        return chosen.loss(problem, temperature / base, reduction)
    per_anchor, valid = chosen.per_anchor(problem)
    return reduce_loss(per_anchor, valid, temperature / base, reduction)


def available_backends(features: Tensor, labels: Tensor | None = None, *,
                       temperature: float = 0.1, base_temperature: float | None = None,
                       hard_positive_beta: float = 0.0, hard_positive_topk: int | None = None,
                       detach_weights: bool = True, normalize: bool = True,
                       contrast: Tensor | None = None, contrast_labels: Tensor | None = None,
                       anchor_offset: int | None = 0, reduction: str = "mean",
                       backend: str = "auto") -> dict[str, list[str]]:
    """Which backends can run ``supcon_loss`` on these inputs, and why the others cannot.

    Takes ``supcon_loss``'s arguments (``base_temperature``, ``reduction`` and ``backend`` do
    not change the answer) and returns ``{backend: reasons}`` for "triton", "cuda", "cpu" and
    "eager"; an empty list means that backend can run them. Nothing is computed.
    """
    from .backends import available_backends as reasons_for

    f, y_f, g, y_g, anchor_offset = prepare(features, labels, contrast, contrast_labels,
                                            anchor_offset)
    problem = SupConProblem(f, y_f, g, y_g, v.check_positive("temperature", temperature),
                            float(hard_positive_beta), hard_positive_topk, detach_weights,
                            normalize, anchor_offset)
    return reasons_for(problem)
