"""The reference ANCHOR trainer: ``python -m anchor_kernels.train`` or
``anchor-train``; ``torchrun --nproc_per_node=K -m anchor_kernels.train`` for several GPUs.

Modules, one job each: ``config`` (flags and config file), ``data`` (CIFAR-10 / any .npz
image set / scikit-learn's digits / synthetic, device-resident batches), ``augment`` (batched
crop + flip), ``models`` (CIFAR ResNet-18 or a small CNN + heads), ``methods`` (the ANCHOR,
PGD-AT, TRADES and standard steps), ``schedule``
(learning rate), ``evaluation`` (clean and PGD-20 accuracy), ``checkpoint`` (atomic save,
RNG state), ``metrics`` (JSON lines, CSV, PNG), ``timing`` (step split), ``ddp`` (torchrun),
``trainer`` (the loop), ``bench`` (GPU throughput of the ANCHOR step), ``experiment`` (the
methods side by side over seeds, with AutoAttack-style evaluation).
"""

from .config import TrainConfig, parse_args
from .trainer import Trainer, TrainingDiverged, main

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "main", "parse_args"]
