"""Fused kernels for ANCHOR: hard-positive-mined supervised contrastive learning with
adversarial training. See README.md for the maths and the API."""

from . import distributed, reference
from .backends import available_backends
from .losses import HardMinedSupConLoss, PMLSupConLoss, SupConLoss
from .supcon import supcon_loss

__version__ = "0.1.0"

__all__ = [
    "HardMinedSupConLoss",
    "PMLSupConLoss",
    "SupConLoss",
    "available_backends",
    "distributed",
    "reference",
    "supcon_loss",
]
