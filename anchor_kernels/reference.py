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


def overflow_safe_scale(x: Tensor) -> Tensor:
    """Per-row factors (..., 1) that make a row's sum of squares safe to form.

    A row whose largest |x| could overflow the sum of its squares (in the accumulation dtype,
    float32 for half inputs) gets 2^-e with 2^(e-1) <= max |x| < 2^e, as robust norms scale;
    every other row gets 1. A power of two is exact, and cosines and unit vectors do not
    change under a positive row scale, so scaled rows give F.normalize's result where that is
    finite, and a finite unit vector for every finite row. Detached: a constant of the graph.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    d = max(x.shape[-1], 1)
    big = (torch.finfo(acc).max / (4.0 * d)) ** 0.5  # D such squares stay below the maximum
    amax = x.detach().abs().amax(dim=-1, keepdim=True).to(acc) if x.shape[-1] else \
        x.new_zeros((*x.shape[:-1], 1), dtype=acc)
    _, e = torch.frexp(amax)
    scaled = (amax > big) & torch.isfinite(amax)
    return torch.where(scaled, torch.ldexp(torch.ones_like(amax), -e), torch.ones_like(amax))


def prescale_rows(x: Tensor) -> Tensor:
    """``x * overflow_safe_scale(x)``: the same unit vectors, with sums of squares that cannot
    overflow. Rows already safe are untouched (on CPU, x itself is returned when all are)."""
    if x.dtype == torch.float16:  # float32 sums of float16 squares cannot overflow
        return x
    scale = overflow_safe_scale(x)
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and bool((scale == 1).all()):
        return x
    return x * scale.to(x.dtype)


def row_norms(x: Tensor) -> Tensor:
    """||x|| per row (..., 1), in float32 for half inputs, computed without overflow or
    underflow inside the sum; inf only where the norm itself exceeds the dtype's range."""
    acc = torch.promote_types(x.dtype, torch.float32)
    scale = overflow_safe_scale(x)
    return (x.to(acc) * scale).norm(dim=-1, keepdim=True) / scale


def normalize_rows(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """x / max(||x||, eps) row-wise, like ``F.normalize`` (zero rows stay zero, never NaN).

    Computed in float32 for half inputs (then rounded to x's dtype), with rows that would
    overflow the sum of squares scaled first (``overflow_safe_scale``): every finite row gives
    a finite result, and rows F.normalize handles give its result.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(acc) * overflow_safe_scale(x)
    # Scaled rows have norm >= 1/2 > eps, so the clamp acts only on unscaled rows.
    return (xs / xs.norm(dim=-1, keepdim=True).clamp_min(eps)).to(x.dtype)


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
        # softmax is shift-invariant: shifting by each row's smallest positive cosine makes
        # every exponent <= 0 (the hardest positive's exactly 0) without forming -beta cos,
        # and beta past the dtype's range gives the same weights as its maximum: finite for
        # any finite beta.
        cmin = cos.detach().masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
        cmin = torch.where(valid[:, None], cmin, torch.zeros_like(cmin))
        beta = min(hard_positive_beta, torch.finfo(cos.dtype).max)
        logits_w = (-beta * (cos - cmin)).masked_fill(~pos, float("-inf"))
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
    """Per anchor, its k hardest positives: (indices (M, k) int64, cosines (M, k)), with k
    taken as min(k, N) (no anchor has more than N positives).

    Row i lists the positives ``P(i)`` (same label, not the self column ``anchor_offset + i``)
    with the k lowest ``cos_ij``, ascending, ties to the lower j: the set is exactly
    ``topk_hardest_mask(cos, pos, k)``. Rows with fewer than k positives are padded with index
    -1 and cosine +inf (a padded entry sorts after every real one). A NaN cosine (NaN in the
    inputs) ranks after every real one and before the padding. Cosines are in z's dtype and
    differentiable with respect to ``z`` and ``contrast``.
    """
    zn = normalize_rows(z) if normalize else z
    if contrast is None:
        c, y_c = zn, labels
    else:
        c = normalize_rows(contrast) if normalize else contrast
        y_c = contrast_labels
    cos = zn @ c.T
    _, pos = self_and_positive_masks(labels, y_c, anchor_offset)
    # Positives by cosine (a NaN cosine after every number, ties and NaNs to the lower j),
    # then everything else: two stable sorts.
    key = cos.detach().nan_to_num(nan=float("inf"), posinf=float("inf"))
    order = torch.argsort(key, dim=1, stable=True)
    order = order.gather(1, torch.argsort((~pos).gather(1, order).to(torch.uint8), dim=1,
                                         stable=True))[:, :k]
    chosen = pos.gather(1, order)
    idx = torch.where(chosen, order, torch.full_like(order, -1))
    vals = cos.gather(1, order).masked_fill(~chosen, float("inf"))
    return idx, vals


def _per_sample(value, x: Tensor, dtype: torch.dtype):
    """A float, or a (B,) tensor cast to ``dtype`` and shaped (B, 1, ..., 1) to broadcast over x."""
    if isinstance(value, Tensor):
        return value.to(dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return value


def pgd_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """PGD arithmetic runs in float32 for half inputs (one rounding, at the store), else in dtype."""
    return torch.promote_types(dtype, torch.float32)


def pgd_step(x_adv: Tensor, grad: Tensor, x: Tensor, eps, alpha, lo: float = 0.0,
             hi: float = 1.0, *, norm: str = "linf") -> Tensor:
    """One projected gradient ascent step, out of place (the fused kernels do it in place).

    Shapes: x_adv, grad, x (B, ...); eps and alpha floats or (B,) per-sample tensors.
    Arithmetic in ``pgd_compute_dtype`` (float32 for half inputs), rounded once at the end:

        L-inf:  sign(g) = [g > 0] - [g < 0]      (so sign(0) = sign(NaN) = 0)
                x_adv' = clamp(min(max(x_adv + alpha sign(g), x - eps), x + eps), lo, hi)
        L2:     u = g / max(||g_b||, 1e-12)       (per sample b; zero gradient, zero step)
                d = x_adv + alpha u - x
                x_adv' = clamp(x + d min(1, eps / ||d_b||), lo, hi)

    ``alpha sign(g)`` is exact (+-alpha or 0), so a fused multiply-add gives the same bits.
    Clamping to [lo, hi] after projecting never leaves the ball: x is in the box, so the
    clamp only shrinks each |d_i|.
    """
    ct = pgd_compute_dtype(x_adv.dtype)
    xa, g, x0 = x_adv.to(ct), grad.to(ct), x.to(ct)
    e, a = _per_sample(eps, x, ct), _per_sample(alpha, x, ct)
    if norm == "linf":
        step = xa + a * ((g > 0).to(ct) - (g < 0).to(ct))
        out = torch.minimum(torch.maximum(step, x0 - e), x0 + e)
    elif norm == "l2":
        b = x.shape[0]
        gnorm = g.reshape(b, -1).norm(dim=1).clamp_min(1e-12)
        d = xa + a * (g / _per_sample(gnorm, x, ct)) - x0
        dnorm = d.reshape(b, -1).norm(dim=1)
        e_b = e.reshape(-1) if isinstance(e, Tensor) else torch.full_like(dnorm, e)
        factor = torch.where(dnorm > e_b, e_b / dnorm, torch.ones_like(dnorm))
        out = x0 + d * _per_sample(factor, x, ct)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.clamp(out, lo, hi).to(x_adv.dtype)


PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def philox_4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple:
    """Philox4x32-10 (Salmon et al., SC 2011; Random123, cuRAND and Triton's ``tl.randint4x``).

    Counters are int64 tensors holding uint32 values, the key two Python ints; returns the
    four uint32 output words. int64 products of two uint32 wrap but keep all 64 bits, so
    the high and low words come out exact.
    """
    for _ in range(10):
        p0 = c0 * PHILOX_ROUND_A
        p2 = c2 * PHILOX_ROUND_B
        hi0, lo0 = (p0 >> 32) & _U32, p0 & _U32
        hi2, lo2 = (p2 >> 32) & _U32, p2 & _U32
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_KEY_A) & _U32, (k1 + PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def philox_uniform(seed: int, n: int, device=None) -> Tensor:
    """n float32 uniforms in [0, 1): element i is ``(word0 >> 8) * 2^-24`` of Philox with
    counter (i mod 2^32, i div 2^32, 0, 0) and key (seed mod 2^32, seed div 2^32).

    24 random bits make every value exact in float32, so every backend gives the same bits.
    """
    i = torch.arange(n, device=device, dtype=torch.int64)
    zero = torch.zeros_like(i)
    seed &= (1 << 64) - 1
    r, _, _, _ = philox_4x32_10(i & _U32, i >> 32, zero, zero, seed & _U32, seed >> 32)
    return (r >> 8).to(torch.float32) * 2.0 ** -24


def pgd_random_start(x: Tensor, eps, seed: int, lo: float = 0.0, hi: float = 1.0, *,
                     norm: str = "linf") -> Tensor:
    """A random start in the eps-ball around x, clamped to [lo, hi]. Shapes: x (B, ...), eps
    float or (B,).

    L-inf: ``clamp(x + eps (2u - 1), lo, hi)``, u = ``philox_uniform(seed)`` over x's elements
    in row-major order. ``2u - 1`` is exact; the product ``eps (2u - 1)`` is rounded before
    the sum (kernels must not contract it into a fused multiply-add).
    L2: uniform in the ball: ``x + eps r^(1/d) z / ||z||`` per sample, z Gaussian, r ~ U[0, 1),
    d = elements per sample, drawn from a ``torch.Generator`` seeded with ``seed``.
    """
    ct = pgd_compute_dtype(x.dtype)
    if norm == "linf":
        u = philox_uniform(seed, x.numel(), x.device).reshape(x.shape).to(ct)
        noise = _per_sample(eps, x, ct) * (2.0 * u - 1.0)
    elif norm == "l2":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        b = x.shape[0]
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=ct)
        radius = torch.rand(b, generator=gen, device=x.device, dtype=ct) ** (1.0 / max(x[0].numel(), 1))
        scale = radius / z.reshape(b, -1).norm(dim=1).clamp_min(1e-12)
        noise = _per_sample(eps, x, ct) * z * _per_sample(scale, x, ct)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.clamp(x.to(ct) + noise, lo, hi).to(x.dtype)
