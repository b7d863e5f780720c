"""``nn.Module`` drop-ins with the call shapes users already have; ``forward`` only calls the
functional ``supcon_loss``."""

from __future__ import annotations

from torch import Tensor, nn

from . import _validate as v
from .reference import normalize_rows, supcontrast_loss
from .supcon import supcon_loss


class SupConLoss(nn.Module):
    """Drop-in for SupContrast's ``SupConLoss`` (HobbitLong/SupContrast ``losses.py``).

    Same arguments, call shape and numbers: ``loss = SupConLoss(0.07)(features, labels)`` with
    ``features`` (B, V, D) (trailing dims flattened), ``labels`` (B,) or a dense ``mask`` (B, B)
    or neither (SimCLR). As in that code the features are expected normalised by the caller
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
                import torch
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
    """Drop-in for pytorch-metric-learning's ``losses.SupConLoss(temperature=0.1)``.

    Called as ``(embeddings (M, D), labels (M,), indices_tuple=None, ref_emb=None,
    ref_labels=None)``. Cosine similarity, anchors without positives left out of the mean,
    0 when no anchor has a positive. With ``ref_emb`` the anchors are not part of the
    reference set (nothing is excluded from the denominators), as in that library.
    Miner ``indices_tuple`` is not supported: use ``hard_positive_beta``/``hard_positive_topk``.
    """

    def __init__(self, temperature: float = 0.1, *, hard_positive_beta: float = 0.0,
                 hard_positive_topk: int | None = None, backend: str = "auto"):
        super().__init__()
        self.kwargs = dict(temperature=temperature, hard_positive_beta=hard_positive_beta,
                           hard_positive_topk=hard_positive_topk, backend=backend)

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None,
                ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> Tensor:
        if indices_tuple is not None:
            raise ValueError("indices_tuple (miner output) is not supported; use "
                             "hard_positive_beta or hard_positive_topk to choose positives")
        if ref_emb is None:
            if ref_labels is not None:
                raise ValueError("ref_labels was given without ref_emb")
            return supcon_loss(embeddings, labels, **self.kwargs)
        if ref_labels is None:
            raise ValueError("ref_labels is required with ref_emb")
        return supcon_loss(embeddings, labels, contrast=ref_emb, contrast_labels=ref_labels,
                           anchor_offset=None, **self.kwargs)
