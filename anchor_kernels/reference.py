"""Eager PyTorch reference of the ANCHOR loss: the spec every backend must match.

Written straight from the definition (README "The loss"), with O(M N) memory. Every backend
is tested against these functions, in float64, on forward and every gradient.

Notation: anchors ``f`` (M, D) with labels ``y_f`` (M,), contrast set ``g`` (N, D) with
labels ``y_g`` (N,), temperature ``tau``. Anchor ``i`` is contrast column
``self(i) = anchor_offset + i`` (no column when ``anchor_offset`` is None).

    z_i = f_i / max(||f_i||, eps)        c_j = g_j / max(||g_j||, eps)      (if normalize)
    s_ij = z_i . c_j / tau               cos_ij = z_i . c_j
    A(i) = {j : j != self(i)}            P(i) = {j in A(i) : y_g[j] == y_f[i]}
    LSE_i = log sum_{j in A(i)} exp(s_ij)
    w_ij  = softmax_{j in P(i)}(-beta cos_ij)     (soft mining; beta = 0 is SupCon)
          = 1/k' on the k' = min(k, |P(i)|) lowest-cosine positives      (top-k)
    L_i   = sum_{j in P(i)} w_ij (LSE_i - s_ij) = LSE_i - sum_j w_ij s_ij
    loss  = (tau / base_tau) * mean_{i : |P(i)| > 0} L_i
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12


def normalize_rows(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """x / max(||x||, eps) row-wise, like ``F.normalize`` (zero rows stay zero, never NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def self_and_positive_masks(labels: Tensor, contrast_labels: Tensor, anchor_offset: int | None):
    """Boolean (M, N) masks of the denominator set A and the positive set P."""
    m, n = labels.shape[0], contrast_labels.shape[0]
    cols = torch.arange(n, device=labels.device)
    denom = torch.ones(m, n, dtype=torch.bool, device=labels.device)
    if anchor_offset is not None:
        rows = torch.arange(m, device=labels.device) + anchor_offset
        denom = cols[None, :] != rows[:, None]
    pos = denom & (labels[:, None] == contrast_labels[None, :])
    return denom, pos


def topk_hardest_mask(cos: Tensor, pos: Tensor, k: int) -> Tensor:
    """(M, N) mask of each row's k lowest-cosine positives; ties go to the lower index."""
    key = cos.detach().masked_fill(~pos, float("inf"))
    order = torch.argsort(key, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(key.shape[1], device=key.device).expand_as(order).contiguous())
    return pos & (rank < k)


def supcon_per_anchor(
    f: Tensor,  # (M, D)
    y_f: Tensor,  # (M,)
    g: Tensor | None = None,  # (N, D); None means g = f
    y_g: Tensor | None = None,  # (N,)
    *,
    temperature: float = 0.1,
    hard_positive_beta: float = 0.0,
    hard_positive_topk: int | None = None,
    detach_weights: bool = True,
    normalize: bool = True,
    anchor_offset: int | None = 0,
) -> tuple[Tensor, Tensor]:
    """Per-anchor losses ``L_i`` (0 where an anchor has no positive) and the validity mask.

    Computed in the dtype of ``f``; pass float64 inputs for the ground truth.
    """
    z = normalize_rows(f) if normalize else f
    if g is None:
        c, y_g = z, y_f
    else:
        c = normalize_rows(g) if normalize else g
    cos = z @ c.T
    s = cos / temperature
    denom, pos = self_and_positive_masks(y_f, y_g, anchor_offset)
    npos = pos.sum(dim=1)
    valid = npos > 0
    # Rows whose denominator set is empty have no positives either; give them every column
    # so that logsumexp stays finite and its gradient is 0 * finite rather than NaN.
    denom_safe = denom | ~denom.any(dim=1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(~denom_safe, float("-inf")), dim=1)
    if hard_positive_topk is not None:
        sel = topk_hardest_mask(cos, pos, hard_positive_topk)
        w = sel.to(s.dtype) / npos.clamp(max=hard_positive_topk).clamp_min(1)[:, None].to(s.dtype)
    else:
        logits_w = (-hard_positive_beta * cos).masked_fill(~pos, float("-inf"))
        logits_w = logits_w.masked_fill(~valid[:, None], 0.0)  # no NaN rows from softmax
        w = torch.softmax(logits_w, dim=1) * pos
    if detach_weights:
        w = w.detach()
    sbar = (w * s).sum(dim=1)
    per_anchor = torch.where(valid, lse - sbar, torch.zeros_like(lse))
    return per_anchor, valid


def reduce_loss(per_anchor: Tensor, valid: Tensor, scale: float, reduction: str) -> Tensor:
    """Apply ``tau / base_tau`` and the reduction; the mean is over valid anchors only."""
    per_anchor = per_anchor * scale
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / valid.sum().clamp_min(1).to(per_anchor.dtype)


def supcon_loss(
    f: Tensor,
    y_f: Tensor,
    g: Tensor | None = None,
    y_g: Tensor | None = None,
    *,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    hard_positive_beta: float = 0.0,
    hard_positive_topk: int | None = None,
    detach_weights: bool = True,
    normalize: bool = True,
    anchor_offset: int | None = 0,
    reduction: str = "mean",
) -> Tensor:
    """The loss of section 1 on 2-D inputs, no argument checking (see ``anchor_kernels.supcon_loss``)."""
    per_anchor, valid = supcon_per_anchor(
        f, y_f, g, y_g, temperature=temperature, hard_positive_beta=hard_positive_beta,
        hard_positive_topk=hard_positive_topk, detach_weights=detach_weights,
        normalize=normalize, anchor_offset=anchor_offset)
    base = temperature if base_temperature is None else base_temperature
    return reduce_loss(per_anchor, valid, temperature / base, reduction)


def supcontrast_loss(features: Tensor, labels: Tensor | None = None, mask: Tensor | None = None,
                     temperature: float = 0.07, contrast_mode: str = "all",
                     base_temperature: float = 0.07) -> Tensor:
    """The SupContrast (HobbitLong/SupContrast ``losses.py``) formula, written independently.

    features (B, V, D), already normalised by the caller as in that code. Mean over all
    anchors, anchors without positives counting 0. Used as a test oracle and as the
    dense-``mask`` path of :class:`anchor_kernels.SupConLoss`.
    """
    b, v = features.shape[:2]
    feats = features.reshape(b, v, -1)
    if mask is None:
        lab = torch.arange(b, device=features.device) if labels is None else labels.reshape(-1)
        mask = (lab[:, None] == lab[None, :])
    mask = mask.to(feats.dtype)
    contrast = torch.cat(torch.unbind(feats, dim=1), dim=0)  # (V B, D), view-major
    anchor, n_anchor_views = (feats[:, 0], 1) if contrast_mode == "one" else (contrast, v)
    logits = anchor @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(n_anchor_views, v)
    m = anchor.shape[0]
    not_self = torch.ones_like(mask)
    not_self[torch.arange(m), torch.arange(m)] = 0
    mask = mask * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    npos = mask.sum(1)
    mean_log_prob_pos = (mask * log_prob).sum(1) / torch.where(npos < 1e-6, torch.ones_like(npos), npos)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def pairwise_similarity(a: Tensor, b: Tensor | None = None, *, normalize: bool = True,
                        temperature: float = 1.0) -> Tensor:
    """S = norm(a) norm(b)^T / t, (M, N), for a (M, D) and b (N, D) (None: b = a)."""
    za = normalize_rows(a) if normalize else a
    zb = za if b is None else (normalize_rows(b) if normalize else b)
    return za @ zb.T / temperature


def hard_positive_mining(
    z: Tensor,  # (M, D)
    labels: Tensor,  # (M,)
    k: int,
    *,
    normalize: bool = True,
    contrast: Tensor | None = None,  # (N, D); None means the anchors themselves
    contrast_labels: Tensor | None = None,  # (N,)
    anchor_offset: int | None = 0,
) -> tuple[Tensor, Tensor]:
    """Per anchor, its k hardest positives: (indices (M, k) int64, cosines (M, k)).

    Row i lists the positives ``P(i)`` (same label, not the self column ``anchor_offset + i``)
    with the k lowest ``cos_ij``, ascending, ties to the lower j: the set is exactly
    ``topk_hardest_mask(cos, pos, k)``. Rows with fewer than k positives are padded with index
    -1 and cosine +inf (a padded entry sorts after every real one). Cosines are in z's dtype
    and differentiable with respect to ``z`` and ``contrast``.
    """
    zn = normalize_rows(z) if normalize else z
    if contrast is None:
        c, y_c = zn, labels
    else:
        c = normalize_rows(contrast) if normalize else contrast
        y_c = contrast_labels
    cos = zn @ c.T
    _, pos = self_and_positive_masks(labels, y_c, anchor_offset)
    key = cos.detach().masked_fill(~pos, float("inf"))
    order = torch.argsort(key, dim=1, stable=True)[:, :k]
    chosen = pos.gather(1, order)
    idx = torch.where(chosen, order, torch.full_like(order, -1))
    vals = cos.gather(1, order).masked_fill(~chosen, float("inf"))
    pad = k - order.shape[1]  # k > N: no row can fill k slots
    if pad > 0:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], dim=1)
        vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), float("inf"))], dim=1)
    return idx, vals


def pgd_step(x_adv: Tensor, grad: Tensor, x: Tensor, eps, alpha, lo: float = 0.0,
             hi: float = 1.0) -> Tensor:
    """clamp(clamp(x_adv + alpha sign(grad), x - eps, x + eps), lo, hi), out of place."""
    step = x_adv + alpha * torch.sign(grad)
    return torch.clamp(torch.minimum(torch.maximum(step, x - eps), x + eps), lo, hi)
