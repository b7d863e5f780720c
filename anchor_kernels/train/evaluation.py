"""Clean and PGD-20 test accuracy through ``anchor_kernels.attacks``.

Two PGD-20 settings (DESIGN section 4): eps 0.031, step 0.003 as in TRADES' evaluation
script, and eps 8/255, step 2/255 with a random start. Under torchrun every process
evaluates its shard of the test images and the counts are summed.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ddp
from .data import DeviceLoader


def eval_attacks(model: nn.Module) -> dict:
    """name -> attack, from the attacks module's PGD-20 presets."""
    from ..attacks import pgd20_eval_attacks

    return pgd20_eval_attacks(model)


def evaluate(model: nn.Module, loader: DeviceLoader, info: ddp.DistInfo, autocast,
             channels_last: bool = False) -> dict[str, float]:
    """{"clean_acc", "<attack>_acc", ..., "eval_images"} over every image of ``loader``."""
    from ..attacks import evaluate as attacks_evaluate

    was_training = model.training
    model.eval()
    try:
        with autocast():
            accs = attacks_evaluate(model, loader.epoch(0, channels_last), eval_attacks(model))
    finally:
        model.train(was_training)
    n_local = _shard_len(loader)
    names = sorted(accs)
    counts = torch.tensor([accs[k] * n_local for k in names] + [n_local], dtype=torch.float64,
                          device=info.device)
    ddp.all_reduce_sum(counts, info)
    total = counts[-1].item()
    out = {_acc_name(k): (counts[i].item() / total if total else float("nan")) for i, k in enumerate(names)}
    out["eval_images"] = int(total)
    return out


def _shard_len(loader: DeviceLoader) -> int:
    return len(range(loader.rank, loader.num_images, loader.world))


def _acc_name(key: str) -> str:
    return key if key.endswith("_acc") else f"{key}_acc"
