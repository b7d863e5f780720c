"""Public hard-positive selection: per anchor, the k positives it is least similar to."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate as v
from . import reference
from .backends import BACKEND_NAMES
from .similarity import OpDispatch

NORM_EPS = reference.NORM_EPS


class EagerHardPositive:
    """The reference selection (O(M N) memory), any device and dtype."""

    name = "eager"

    def not_supported_reasons(self, z: Tensor, c: Tensor, k: int) -> list[str]:
        return []

    def __call__(self, z: Tensor, labels: Tensor, c: Tensor, c_labels: Tensor, k: int,
                 normalize: bool, anchor_offset: int | None) -> tuple[Tensor, Tensor]:
        dtype = cosine_dtype(z.dtype)  # half inputs ranked in float32, as the kernels do
        idx, cos = reference.hard_positive_mining(
            z.to(dtype), labels, k, normalize=normalize, contrast=c.to(dtype),
            contrast_labels=c_labels, anchor_offset=anchor_offset)
        return idx, cos


def _load_triton():
    from .ops.hard_positive_triton import BACKEND
    return BACKEND


def _load_cpu():
    from .ops.hard_positive_cpp import CPU_BACKEND
    return CPU_BACKEND


def _load_cuda():
    from .ops.hard_positive_cpp import CUDA_BACKEND
    return CUDA_BACKEND


DISPATCH = OpDispatch(
    "hard_positive_mining",
    {"triton": _load_triton, "cpu": _load_cpu, "cuda": _load_cuda},
    EagerHardPositive(),
    {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpu", "eager")},
)


def cosine_dtype(dtype: torch.dtype) -> torch.dtype:
    """Cosines are returned in float32 for half-precision embeddings, else in their dtype."""
    return torch.promote_types(dtype, torch.float32)


def _normalized(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """(x / max(||x||, eps), ||x||), without overflow for any finite row (``reference``)."""
    if not normalize:
        return x, None
    return reference.normalize_rows(x), reference.row_norms(x)[:, 0]


def _normalize_backward(dzn: Tensor, zn: Tensor, n: Tensor | None) -> Tensor:
    """dx for zn = x / max(||x||, eps): (dzn - [||x|| > eps] zn (zn . dzn)) / max(||x||, eps)."""
    if n is None:
        return dzn
    proj = torch.where(n > NORM_EPS, (zn * dzn).sum(dim=1), torch.zeros_like(n))
    return (dzn - proj[:, None] * zn) / n.clamp_min(NORM_EPS)[:, None]


class SelectedCosine(torch.autograd.Function):
    """The cosines of selected pairs, ``cos[i, r] = norm(z)_i . norm(c)_{idx[i, r]}``, as a
    differentiable function of ``z`` (M, D) and ``c`` (N, D).

    The values come from the selection kernel; only the backward is computed here, with
    O((M + N) D + M k) memory (no (M, k, D) gather): for G = dL/dcos (0 on padding),

        d norm(z)_i = sum_r G[i, r] norm(c)_{idx[i, r]}        (an embedding-bag sum)
        d norm(c)_j = sum_{(i, r) : idx[i, r] = j} G[i, r] norm(z)_i   (bags by sorted j)

    then back through the normalisation. Single backward (no double backward).
    """

    @staticmethod
    def forward(ctx, z, c, idx, cos, normalize: bool):
        # c is None when the contrast set is z itself (one tensor, gradients summed here:
        # torch.compile cannot trace a Function given the same tensor twice).
        ctx.save_for_backward(z, c, idx)
        ctx.normalize = normalize
        return cos.clone()

    @staticmethod
    def backward(ctx, grad):
        z, c, idx = ctx.saved_tensors
        same = c is None
        dtype = cosine_dtype(z.dtype)
        zn, nz = _normalized(z.to(dtype), ctx.normalize)
        cn, nc = (zn, nz) if same else _normalized(c.to(dtype), ctx.normalize)
        chosen = idx >= 0
        w = torch.where(chosen, grad.to(dtype), torch.zeros((), dtype=dtype, device=grad.device))
        j = idx.clamp_min(0)
        dz = dc = None
        if ctx.needs_input_grad[0]:
            dzn = F.embedding_bag(j, cn, mode="sum", per_sample_weights=w)
            if same:
                dzn = dzn + _scatter_to_columns(j, w, zn, zn.shape[0])
            dz = _normalize_backward(dzn, zn, nz).to(z.dtype)
        if not same and ctx.needs_input_grad[1]:
            dcn = _scatter_to_columns(j, w, zn, cn.shape[0])
            dc = _normalize_backward(dcn, cn, nc).to(c.dtype)
        return dz, dc, None, None, None  # z, c, idx, cos, normalize


def _scatter_to_columns(j: Tensor, w: Tensor, zn: Tensor, n: int) -> Tensor:
    """(n, D): row j sums w[i, r] zn[i] over the (i, r) with j[i, r] = j, by bags of sorted j."""
    m, k = j.shape
    sorted_j, order = torch.sort(j.reshape(-1), stable=True)
    rows = torch.arange(m, device=j.device).repeat_interleave(k)[order]
    # Where each column's bag starts; searchsorted rather than bincount, which syncs on CUDA.
    offsets = torch.searchsorted(sorted_j, torch.arange(n, device=j.device))
    return F.embedding_bag(rows, zn, offsets, mode="sum", per_sample_weights=w.reshape(-1)[order])


def mine(z: Tensor, labels: Tensor, c: Tensor, c_labels: Tensor, k: int, *, normalize: bool,
         anchor_offset: int | None, backend: str) -> tuple[Tensor, Tensor]:
    """Selection on validated inputs with a named (or "auto") backend; cosines differentiable."""
    impl = DISPATCH.select(backend, z.device, z, c, k)
    with torch.no_grad():
        # No row has more than N positives: k past N would only allocate padding.
        idx, cos = impl(z, labels, c, c_labels, min(k, c.shape[0]), normalize, anchor_offset)
    if torch.is_grad_enabled() and (z.requires_grad or c.requires_grad):
        cos = SelectedCosine.apply(z, None if c is z else c, idx, cos, normalize)
    return idx, cos


def hard_positive_mining(
    z: Tensor,  # (M, D)
    labels: Tensor,  # (M,)
    k: int,
    *,
    normalize: bool = True,
    contrast: Tensor | None = None,  # (N, D)
    contrast_labels: Tensor | None = None,  # (N,)
    anchor_offset: int | None = 0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per anchor, its k hardest positives: the k with the lowest cosine similarity.

    With ``cos_ij = norm(z)_i . norm(c)_j`` (``c = contrast``, or ``z`` itself) and the
    positives ``P(i) = {j != anchor_offset + i : contrast_labels[j] == labels[i]}``, row i of
    the result lists the ``min(k, |P(i)|)`` positives of lowest cosine in ascending order,
    ties to the lower index: the selection of the loss's ``hard_positive_topk=k`` mode
    (``reference.topk_hardest_mask``). The kernels stream over column blocks with a running
    per-row top-k, so no M x N matrix is formed.

    Args:
        z: (M, D) anchor embeddings, float16/bfloat16/float32/float64.
        labels: (M,) integer labels.
        k: int >= 1; values above N (the contrast rows) act as N.
        normalize: L2-normalise rows first (False: plain dot products are ranked).
        contrast: (N, D) candidate set (default: the anchors themselves).
        contrast_labels: (N,) labels of ``contrast``; required with it.
        anchor_offset: anchor i is contrast row ``anchor_offset + i`` and never its own
            positive; None when the anchors are not in ``contrast``. Must be 0 without
            ``contrast``.
        backend: "auto", "triton", "cuda", "cpu" or "eager"; an explicit backend that cannot
            run the inputs raises ValueError saying why.

    Returns (with ``k`` taken as ``min(k, N)``: no anchor has more than N positives):
        indices: (M, k) int64 column indices into ``contrast`` (or ``z``), -1 where the anchor
            has fewer than k positives (always at the end of a row).
        cosines: (M, k) float32 for half-precision inputs, else the input dtype (on GPU,
            float32 products follow ``torch.get_float32_matmul_precision()``); +inf where
            the index is -1, so every row is sorted ascending. Differentiable with respect to
            ``z`` and ``contrast`` (padding entries get no gradient).

    Selection is made in float32 (half inputs are multiplied exactly, with float32
    accumulation); two positives whose cosines differ by less than float32 rounding may be
    ordered differently from a float64 computation. Not affected by ``torch.autocast``.
    """
    v.check_tensor("z", z, ndim=2, floating=True)
    m, d = z.shape
    v.check_labels("labels", labels, m, z, f"z's M={m} rows")
    k = v.check_int("k", k, minimum=1)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    v.check_choice("backend", backend, BACKEND_NAMES)
    if contrast is None:
        if contrast_labels is not None:
            raise ValueError("contrast_labels was given without contrast")
        if anchor_offset != 0:
            raise ValueError(f"anchor_offset must be 0 when contrast is None, got {anchor_offset}")
        c, y_c = z, labels
    else:
        v.check_tensor("contrast", contrast, ndim=2, floating=True)
        v.check_same("contrast", contrast, "z", z)
        if contrast.shape[1] != d:
            raise ValueError(f"contrast must be (N, {d}) to match z's D, "
                             f"got shape {tuple(contrast.shape)}")
        if contrast_labels is None:
            raise ValueError("contrast_labels is required when contrast is given")
        n = contrast.shape[0]
        v.check_labels("contrast_labels", contrast_labels, n, z, f"contrast's N={n} rows")
        if anchor_offset is not None:
            v.check_int("anchor_offset", anchor_offset, minimum=0)
            if anchor_offset + m > n:
                raise ValueError(
                    f"anchor_offset={anchor_offset} puts the {m} anchors past the end of the "
                    f"{n} contrast rows; use anchor_offset=None when the anchors are not part "
                    "of the contrast set")
        c, y_c = contrast, contrast_labels
    return mine(z, labels, c, y_c, k, normalize=normalize, anchor_offset=anchor_offset,
                backend=backend)
