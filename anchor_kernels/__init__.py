"""Fused kernels for ANCHOR: hard-positive-mined supervised contrastive learning with
adversarial training. See README.md for the maths and the API."""

from . import attacks, distributed, reference
from .clip import ClipLoss, clip_loss
from .hard_positive import hard_positive_mining
from .losses import HardMinedSupConLoss, PMLSupConLoss, SupConLoss
from .pgd import pgd_random_start, pgd_step
from .similarity import pairwise_similarity
from .supcon import available_backends, supcon_loss

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "HardMinedSupConLoss",
    "PMLSupConLoss",
    "SupConLoss",
    "attacks",
    "available_backends",
    "clip_loss",
    "distributed",
    "hard_positive_mining",
    "pairwise_similarity",
    "pgd_random_start",
    "pgd_step",
    "reference",
    "supcon_loss",
]
