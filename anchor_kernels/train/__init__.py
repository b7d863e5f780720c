"""The reference ANCHOR trainer: ``python -m anchor_kernels.train`` or
``anchor-train``; ``torchrun --nproc_per_node=K -m anchor_kernels.train`` for several GPUs.

Modules, one job each: ``config`` (flags and config file), ``data`` (CIFAR-10 / .npz /
synthetic, device-resident batches), ``augment`` (batched crop + flip), ``models`` (CIFAR
ResNet-18 + heads), ``methods`` (the ANCHOR, PGD-AT and TRADES steps), ``schedule``
(learning rate), ``evaluation`` (clean and PGD-20 accuracy), ``checkpoint`` (atomic save,
RNG state), ``metrics`` (JSON lines, CSV, PNG), ``timing`` (step split), ``ddp`` (torchrun),
``trainer`` (the loop), ``bench`` (GPU throughput of the ANCHOR step).
"""

from .config import TrainConfig, parse_args
from .trainer import Trainer, TrainingDiverged, main

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "main", "parse_args"]
