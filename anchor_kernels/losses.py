"""``nn.Module`` drop-ins with the call shapes users already have; ``forward`` only calls the
functional ``supcon_loss``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _validate as v
from .reference import normalize_rows, supcontrast_loss
from .supcon import supcon_loss


class SupConLoss(nn.Module):
    """Drop-in for SupContrast's ``SupConLoss`` (HobbitLong/SupContrast ``losses.py``).

    Same arguments, call shape and numbers: ``loss = SupConLoss(0.07)(features, labels)`` with
    ``features`` (B, V, D) (trailing dims flattened), ``labels`` (B,) or (B, 1) or a dense
    ``mask`` (B, B) or neither (SimCLR). As in that code the features are expected normalised by the caller
    (``normalize=False``) and the loss is averaged over *all* anchors, anchors without
    positives counting 0; the functional ``supcon_loss`` averages over anchors that have a
    positive instead. ``labels`` runs fused; an arbitrary dense ``mask`` cannot be expressed
    as labels, so it runs the eager (O(N^2) memory) formula.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all",
                 base_temperature: float = 0.07, *, normalize: bool = False, backend: str = "auto"):
        super().__init__()
        self.temperature = v.check_positive("temperature", temperature)
        self.contrast_mode = v.check_choice("contrast_mode", contrast_mode, ("all", "one"))
        self.base_temperature = v.check_positive("base_temperature", base_temperature)
        self.normalize = normalize
        self.backend = backend

    def forward(self, features: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        v.check_tensor("features", features, floating=True)
        if features.dim() < 3:
            raise ValueError("features must be (B, V, ...) with at least 3 dimensions, "
                             f"got shape {tuple(features.shape)}")
        if labels is not None and mask is not None:
            raise ValueError("give labels or mask, not both")
        if (isinstance(labels, Tensor) and labels.dim() > 1
                and labels.numel() == features.shape[0]):
            labels = labels.reshape(-1)  # SupContrast takes any shape with B labels, e.g. (B, 1)
        if mask is not None:
            b = features.shape[0]
            v.check_tensor("mask", mask, ndim=2)
            if tuple(mask.shape) != (b, b):
                raise ValueError(f"mask must be ({b}, {b}), got {tuple(mask.shape)}")
            if mask.dtype.is_complex:
                raise TypeError(f"mask must be a bool or real (B, B) tensor, got {mask.dtype}")
            v.check_same("mask", mask, "features", features, dtype=False)
            feats = features
            if self.normalize:
                feats = normalize_rows(features.reshape(*features.shape[:2], -1))
            return supcontrast_loss(feats, mask=mask, temperature=self.temperature,
                                    contrast_mode=self.contrast_mode,
                                    base_temperature=self.base_temperature)
        common = dict(temperature=self.temperature, base_temperature=self.base_temperature,
                      normalize=self.normalize, reduction="none", backend=self.backend)
        if self.contrast_mode == "all":
            per_anchor = supcon_loss(features, labels, **common)
        else:
            b, n_views = features.shape[:2]
            if labels is None:
                labels = torch.arange(b, device=features.device)
            # Anchors are view 0; in the view-major contrast set they are rows 0..B-1.
            per_anchor = supcon_loss(features[:, 0].reshape(b, -1), labels, contrast=features,
                                     contrast_labels=labels, anchor_offset=0, **common)
        return per_anchor.mean()


class HardMinedSupConLoss(nn.Module):
    """The ANCHOR loss: SupCon with hard-positive mining (see ``anchor_kernels.supcon_loss``).

    ``HardMinedSupConLoss(temperature=0.1, hard_positive_beta=1.0)(features, labels)`` with
    ``features`` (M, D) or (B, V, D). Soft mining by default; ``hard_positive_topk=k`` selects
    the k hardest positives instead (then ``hard_positive_beta`` must be 0).
    """

    def __init__(self, temperature: float = 0.1, base_temperature: float | None = None, *,
                 hard_positive_beta: float | None = None, hard_positive_topk: int | None = None,
                 detach_weights: bool = True, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        if hard_positive_beta is None:  # soft mining at beta = 1 unless top-k is chosen
            hard_positive_beta = 1.0 if hard_positive_topk is None else 0.0
        self.kwargs = dict(temperature=temperature, base_temperature=base_temperature,
                           hard_positive_beta=hard_positive_beta,
                           hard_positive_topk=hard_positive_topk, detach_weights=detach_weights,
                           normalize=normalize, reduction=reduction, backend=backend)

    def forward(self, features: Tensor, labels: Tensor | None = None, *,
                contrast: Tensor | None = None, contrast_labels: Tensor | None = None,
                anchor_offset: int | None = 0) -> Tensor:
        return supcon_loss(features, labels, contrast=contrast, contrast_labels=contrast_labels,
                           anchor_offset=anchor_offset, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={val!r}" for k, val in self.kwargs.items())


class PMLSupConLoss(nn.Module):
    """Drop-in for pytorch-metric-learning's ``losses.SupConLoss`` (2.x): same arguments, call
    shape and numbers.

    ``loss = PMLSupConLoss(temperature=0.1)(embeddings (M, D), labels (M,), indices_tuple=None,
    ref_emb=None, ref_labels=None)``, with that library's rules:

    - the self case is decided by identity, as there: when ``ref_labels`` is the ``labels``
      tensor object (or ``ref_emb`` is not given), anchor i is left out of its own row; with
      other ``ref_labels`` every reference row counts, the anchor's copy included;
    - a batch with no positive pair or no negative pair gives 0 with zero gradients;
    - the default reducer is PML's ``AvgNonZeroReducer``: the mean over anchors whose loss is
      greater than 0 (anchors without positives give 0 and are left out, and so are anchors
      whose float loss rounds to exactly 0);
    - ``reducer=``: any PML reducer (``MeanReducer``, ``SumReducer``, ``ThresholdReducer``,
      ``ClassWeightedReducer``, ``DoNothingReducer``, ...), called with the per-anchor losses
      as PML calls it;
    - ``distance=``: PML's ``CosineSimilarity()`` (default) or ``DotProductSimilarity()`` with
      ``power=1`` (``normalize_embeddings=False`` skips the normalisation); distances (``LpDistance``,
      ...) and powers other than 1 raise ValueError: the kernels compute similarities;
    - ``embedding_regularizer`` / ``embedding_reg_weight`` add ``weight * regularizer(embeddings)``;
    - 3-D embeddings and labels that are not (M,) raise ValueError, as there.

    Backends: without ``indices_tuple`` the per-anchor losses come from the fused kernels
    (``backend``, default auto); a miner's ``indices_tuple`` (``(a, p, n)`` triplets or
    ``(a1, p, a2, n)`` pairs) selects arbitrary positive and negative pairs, which labels cannot
    express, so it is computed by the eager formula (O(M N) memory, any device). The checks of
    the two batch-level rules read values (one device synchronisation per call, as in PML).
    The loss is float32 for half-precision embeddings (PML keeps their dtype).

    ``hard_positive_beta`` / ``hard_positive_topk`` (keyword-only, not in PML) add ANCHOR's
    hard-positive mining to the fused path. ``temperature`` is read at every call.
    """

    def __init__(self, temperature: float = 0.1, *, reducer=None, distance=None,
                 embedding_regularizer=None, embedding_reg_weight: float = 1,
                 hard_positive_beta: float = 0.0, hard_positive_topk: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.temperature = v.check_positive("temperature", temperature)
        self.reducer = reducer
        self.distance = distance
        self.normalize = _similarity_normalizes(distance)
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self.hard_positive_beta = hard_positive_beta
        self.hard_positive_topk = hard_positive_topk
        self.backend = backend

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, indices_tuple=None,
                ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> Tensor:
        _check_pml_inputs(embeddings, labels, "embeddings", "labels")
        if labels is None and indices_tuple is None:
            raise ValueError("labels and indices_tuple cannot both be None")
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels was given without ref_emb")
            ref_emb, ref_labels = embeddings, labels
        else:
            _check_pml_inputs(ref_emb, ref_labels, "ref_emb", "ref_labels")
            v.check_same("ref_emb", ref_emb, "embeddings", embeddings)
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(f"ref_emb must be (N, {embeddings.shape[1]}) to match "
                                 f"embeddings' D, got shape {tuple(ref_emb.shape)}")
        temperature = v.check_positive("temperature", self.temperature)
        if indices_tuple is None:
            if ref_labels is None:
                raise ValueError("ref_labels is required with ref_emb (or pass indices_tuple)")
            losses = self._fused_per_anchor(embeddings, labels, ref_emb, ref_labels, temperature)
        else:
            if self.hard_positive_beta or self.hard_positive_topk is not None:
                raise ValueError("indices_tuple chooses the positives itself; it cannot be "
                                 "combined with hard_positive_beta or hard_positive_topk")
            losses = _mined_per_anchor(embeddings, ref_emb, indices_tuple, temperature,
                                       self.normalize)
        loss = self._reduce(losses, embeddings, labels)
        if self.embedding_regularizer is not None:
            loss = loss + self.embedding_regularizer(embeddings) * self.embedding_reg_weight
        return loss

    def _fused_per_anchor(self, embeddings, labels, ref_emb, ref_labels, temperature):
        """Per-anchor losses (M,), or None where PML gives its zero loss."""
        self_case = ref_labels is labels  # PML's rule: identity of the label tensors
        m, n = embeddings.shape[0], ref_emb.shape[0]
        if self_case and ref_emb is not embeddings and n != m:
            raise ValueError(f"ref_emb must have the {m} rows of embeddings when ref_labels is "
                             f"labels (the self case), got {n}")
        n_pos, n_neg = _pair_counts(labels, ref_labels, self_case)
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return None
        kwargs = dict(temperature=temperature, hard_positive_beta=self.hard_positive_beta,
                      hard_positive_topk=self.hard_positive_topk, normalize=self.normalize,
                      reduction="none", backend=self.backend)
        if ref_emb is embeddings and self_case:
            return supcon_loss(embeddings, labels, **kwargs)
        return supcon_loss(embeddings, labels, contrast=ref_emb, contrast_labels=ref_labels,
                           anchor_offset=0 if self_case else None, **kwargs)

    def _reduce(self, losses: Tensor | None, embeddings: Tensor, labels) -> Tensor:
        if self.reducer is not None:  # PML's loss dict, as its losses hand it to a reducer
            if losses is None:
                info = {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
            else:
                info = {"losses": losses, "reduction_type": "element",
                        "indices": torch.arange(losses.shape[0], device=losses.device)}
            return self.reducer({"loss": info}, embeddings, labels)
        if losses is None:
            return (embeddings * 0).sum()  # PML's zero loss: 0, attached, zero gradients
        # AvgNonZeroReducer without a synchronisation: the mean over losses > 0, else 0.
        keep = losses > 0
        return torch.where(keep, losses, 0).sum() / keep.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, backend={self.backend!r}"


def _check_pml_inputs(emb, labels, emb_name: str, labels_name: str) -> None:
    v.check_tensor(emb_name, emb, floating=True)
    if emb.dim() != 2:
        raise ValueError(f"{emb_name} must be a 2D tensor of shape (batch_size, embedding_size), "
                         f"got shape {tuple(emb.shape)}")
    if labels is not None:
        v.check_labels(labels_name, labels, emb.shape[0], emb, f"{emb_name}' {emb.shape[0]} rows")


def _similarity_normalizes(distance) -> bool:
    """Whether a PML similarity normalises the embeddings; ValueError for what the kernels
    cannot compute."""
    if distance is None:
        return True
    name = type(distance).__name__
    if (name in ("CosineSimilarity", "DotProductSimilarity")
            and getattr(distance, "is_inverted", False) and getattr(distance, "power", 1) == 1):
        return bool(getattr(distance, "normalize_embeddings", True))
    raise ValueError("distance must be pytorch-metric-learning's CosineSimilarity() or "
                     "DotProductSimilarity() with power=1 (the kernels compute cosine or dot-product "
                     f"similarities), got {distance!r}")


def _pair_counts(labels: Tensor, ref_labels: Tensor, self_case: bool) -> tuple[int, int]:
    """(positive pairs, negative pairs) as PML counts them, from per-class counts (no M x N)."""
    m = labels.shape[0]
    if m == 0 or ref_labels.shape[0] == 0:
        return 0, 0
    _, inverse = torch.unique(torch.cat([labels, ref_labels.to(labels.dtype)]), return_inverse=True)
    k = int(inverse.max()) + 1
    matches = int((torch.bincount(inverse[:m], minlength=k)
                   * torch.bincount(inverse[m:], minlength=k)).sum())
    return matches - (m if self_case else 0), m * ref_labels.shape[0] - matches


def _mined_per_anchor(embeddings, ref_emb, indices_tuple, temperature, normalize):
    """PML's SupCon on a miner's pairs (eager, O(M N)): per-anchor losses, or None for its zero."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be a miner's (anchors, positives, negatives) or "
                         "(anchors1, positives, anchors2, negatives) tuple of index tensors")
    for i, idx in enumerate(indices_tuple):
        v.check_tensor(f"indices_tuple[{i}]", idx, integer=True)
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        indices_tuple = (a, p, a, n)
    if all(len(idx) <= 1 for idx in indices_tuple):
        return None
    a1, p, a2, n = (idx.to(embeddings.device) for idx in indices_tuple)
    f = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    g = ref_emb.to(f.dtype)
    if normalize:
        f, g = nn.functional.normalize(f, dim=1), nn.functional.normalize(g, dim=1)
    mat = f @ g.T
    pos, neg = torch.zeros_like(mat), torch.zeros_like(mat)
    pos[a1, p] = 1
    neg[a2, n] = 1
    if bool(((pos != 0) & (neg != 0)).any()):
        raise ValueError("indices_tuple makes a pair both positive and negative")
    if not (bool(pos.any()) and bool(neg.any())):
        return None
    mat = mat / temperature
    mat = mat - mat.max(dim=1, keepdim=True).values.detach()  # stability, as PML
    keep = (pos + neg).bool()
    lse = torch.logsumexp(mat.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)
    lse = lse.masked_fill(~keep.any(dim=1, keepdim=True), 0)
    mean_log_prob_pos = (pos * (mat - lse)).sum(dim=1) / (pos.sum(dim=1)
                                                          + torch.finfo(mat.dtype).tiny)
    return -mean_log_prob_pos
