"""The ANCHOR step as people write it today, the baseline of ``train.bench``: torchattacks'
``PGD`` on the classifier's cross-entropy, then one forward of the clean and adversarial
views, the eager SupCon loss with the hard-positive weights plus lambda CE, one
``loss.backward()`` and the optimiser step, all under standard AMP autocast, with the model
and images in the default (NCHW) layout. Same model, batch, K, eps, alpha and precision as
the trainer's step it is compared with."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..supcon import supcon_loss
from .config import TrainConfig


def conventional_step(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                      bf16: bool) -> Callable[[Tensor, Tensor], dict]:
    """``step(x, y) -> {"loss": ...}``; needs torchattacks (``pip install --no-deps torchattacks``)."""
    try:
        import torchattacks
    except ImportError as exc:
        raise RuntimeError("the conventional baseline needs torchattacks "
                           "(pip install --no-deps torchattacks)") from exc
    # torchattacks puts the model in eval mode while attacking and restores it after, as
    # cfg.attack_bn == "eval" does in the trainer.
    attack = torchattacks.PGD(model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.pgd_steps,
                              random_start=cfg.random_start)
    device_type = next(model.parameters()).device.type

    def step(x: Tensor, y: Tensor) -> dict:
        b = x.shape[0]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            x_adv = attack(x, y)
            logits, emb = model(torch.cat([x, x_adv]), with_embedding=True)
            features = torch.stack([emb[:b], emb[b:]], dim=1)
            loss = supcon_loss(features, y, temperature=cfg.temperature,
                               hard_positive_beta=cfg.hard_positive_beta, backend="eager") \
                + cfg.ce_weight * F.cross_entropy(logits[b:], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    return step
