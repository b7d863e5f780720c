"""One optimisation step of each method, on the same model, data, schedule and attack.

- ``anchor``: per image the augmented view x and a PGD view x_adv (maximising CE by default);
  one forward of the 2B images gives logits and projections; the loss is
  ``L = L_supcon(features (B, 2, embed_dim), y) + lambda * CE(classifier(x_adv), y)`` with the
  hard-mined SupCon loss of ``anchor_kernels.supcon_loss``.
- ``pgd-at`` (Madry et al. 2018): ``CE(model(x_adv), y)``, x_adv maximising CE.
- ``trades`` (Zhang et al. 2019): ``CE(model(x), y) + beta * KL(p(x) || p(x_adv))``
  (batch mean), x_adv maximising that KL from the clean prediction.
- ``standard``: ``CE(model(x), y)`` on the augmented images, no attack (the floor of a
  robustness comparison).

Clean and adversarial images go through one forward as a single batch of 2B (as SupContrast
does with its views), so BatchNorm sees both and DistributedDataParallel sees one forward per
backward. The loss is computed on detached copies of the model outputs and its gradient is
then pushed through the model, which gives exactly the gradient of the joint graph and lets
the step time be split into attack / forward / loss (forward and backward) / backward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrainConfig
from .timing import SectionTimer


@dataclass
class StepContext:
    model: nn.Module  # the module attacks call (possibly compiled); forward(x) -> logits
    train_model: nn.Module  # what the training forward calls: the DDP wrapper, or ``model``
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    timer: SectionTimer
    autocast: Callable[[], AbstractContextManager]
    attack: Callable[[Tensor, Tensor], Tensor]
    supcon: Callable[[Tensor, Tensor], Tensor] | None = None


def make_supcon(cfg: TrainConfig, world: int) -> Callable[[Tensor, Tensor], Tensor]:
    """features (B, 2, D), labels (B,) -> the hard-mined SupCon loss.

    Under torchrun the loss sees the global batch through ``anchor_kernels.distributed``
    (anchors local, contrast set gathered from every rank; each rank's value is its share,
    scaled so that DDP's gradient average is the single-process gradient of the global batch).
    """
    kwargs = dict(temperature=cfg.temperature, hard_positive_beta=cfg.hard_positive_beta,
                  hard_positive_topk=cfg.hard_positive_topk, backend=cfg.loss_backend)
    if world > 1:
        from ..distributed import supcon_loss as loss_fn
    else:
        from ..supcon import supcon_loss as loss_fn

    def supcon(features: Tensor, labels: Tensor) -> Tensor:
        return loss_fn(features, labels, **kwargs)

    return supcon


def trades_kl(logits_adv: Tensor, p_clean: Tensor) -> Tensor:
    """sum over the batch of KL(p_clean || softmax(logits_adv)): TRADES' attack objective
    (``nn.KLDivLoss(reduction='sum')``), maximised by PGD with ``p_clean`` as the target."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), p_clean, reduction="sum")


def attack_budget(cfg: TrainConfig) -> dict:
    """eps, alpha, steps, random start (and its radius) of ``cfg.train_attack``."""
    if cfg.train_attack == "fgsm-rs":  # Wong, Rice & Kolter 2020
        return dict(eps=cfg.eps, alpha=1.25 * cfg.eps, steps=1, random_start=True)
    if cfg.train_attack == "n-fgsm":  # de Jorge et al. 2022: k = 2, alpha = eps, no clipping
        return dict(eps=3 * cfg.eps, alpha=cfg.eps, steps=1, random_start=True,
                    start_eps=2 * cfg.eps)
    return dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.pgd_steps, random_start=cfg.random_start)


def _pgd(model: nn.Module, cfg: TrainConfig, loss, **kw):
    from ..attacks import PGD

    # The training batches are the data set's own images, in [0, 1] by construction: no
    # per-step value check (and its host synchronisation) in the attack.
    name = None if cfg.train_attack == "pgd" else cfg.train_attack
    # --attack-graph (not with TRADES, whose objective reads each step's clean prediction)
    return PGD(model, **attack_budget(cfg), loss=loss, eval_mode=cfg.attack_bn == "eval",
               backend=cfg.pgd_backend, check_inputs=False, name=name,
               cuda_graph=cfg.attack_graph, **kw)


class TradesAttack:
    """``attack(x, p_clean) -> x_adv``: PGD maximising ``trades_kl`` against the clean
    prediction ``p_clean`` (B, C) of this step."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg

    def __call__(self, x: Tensor, p_clean: Tensor) -> Tensor:
        return _pgd(self.model, self.cfg, lambda logits, _: trades_kl(logits, p_clean))(x, None)


def build_attack(method: str, model: nn.Module, cfg: TrainConfig):
    """The training attack, ``anchor_kernels.attacks.PGD`` with the run's eps, alpha and K:
    CE for pgd-at (and anchor by default), the SupCon loss of the projections for
    ``--attack-loss supcon``, the TRADES KL for trades; None for standard training."""
    if method == "standard":
        return None
    if method == "trades":
        return TradesAttack(model, cfg)
    if method == "anchor" and cfg.attack_loss == "supcon":
        return _pgd(model, cfg, "supcon", embed=lambda x: model(x, with_embedding=True)[1],
                    supcon_kwargs=dict(temperature=cfg.temperature,
                                       hard_positive_beta=cfg.hard_positive_beta,
                                       hard_positive_topk=cfg.hard_positive_topk),
                    loss_backend=cfg.loss_backend)
    return _pgd(model, cfg, "ce")


def _loss_and_backward(ctx: StepContext, outputs: tuple[Tensor, ...], loss_fn) -> dict[str, Tensor]:
    """Loss (forward + backward) on detached copies of ``outputs``, then the model backward
    from their gradients and the optimiser step. Returns the loss parts, detached."""
    leaves = [o.detach().requires_grad_() for o in outputs]
    with ctx.timer.section("loss"), ctx.autocast():
        total, parts = loss_fn(*leaves)
        total.backward()
    with ctx.timer.section("backward"):
        torch.autograd.backward(outputs, [leaf.grad for leaf in leaves])
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
    return {"loss": total.detach(), **{k: v.detach() for k, v in parts.items()}}


def _cat(x: Tensor, x_adv: Tensor) -> Tensor:
    """(2B, C, H, W) in x's memory format (channels_last stays channels_last, a no-op copy
    when the attack already kept it)."""
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    return torch.cat([x, x_adv]).contiguous(memory_format=fmt)


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(dim=1) == y).sum()


def anchor_step(ctx: StepContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    b, lam = x.shape[0], ctx.cfg.ce_weight
    with ctx.timer.section("attack"), ctx.autocast():
        x_adv = ctx.attack(x, y)
    with ctx.timer.section("forward"), ctx.autocast():
        logits, emb = ctx.train_model(_cat(x, x_adv), with_embedding=True)

    def loss_fn(logits, emb):
        features = torch.stack([emb[:b], emb[b:]], dim=1)  # (B, 2, D): views (augmented, adversarial)
        l_sup = ctx.supcon(features, y)
        l_ce = F.cross_entropy(logits[b:], y)
        return l_sup + lam * l_ce, {"loss_supcon": l_sup, "loss_ce": l_ce}

    out = _loss_and_backward(ctx, (logits, emb), loss_fn)
    out["correct_clean"], out["correct_adv"] = _correct(logits[:b], y), _correct(logits[b:], y)
    return out


def _cross_entropy(y: Tensor):
    """The loss function of PGD-AT and standard training: CE of the logits against y."""
    def loss_fn(logits):
        l_ce = F.cross_entropy(logits, y)
        return l_ce, {"loss_ce": l_ce}
    return loss_fn


def pgd_at_step(ctx: StepContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    with ctx.timer.section("attack"), ctx.autocast():
        x_adv = ctx.attack(x, y)
    with ctx.timer.section("forward"), ctx.autocast():
        logits = ctx.train_model(x_adv)
    out = _loss_and_backward(ctx, (logits,), _cross_entropy(y))
    out["correct_adv"] = _correct(logits, y)
    return out


def trades_step(ctx: StepContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    b, beta = x.shape[0], ctx.cfg.trades_beta
    with ctx.timer.section("attack"), ctx.autocast():
        # The KL target is the clean prediction in the mode the attack runs in.
        was_training = ctx.model.training
        ctx.model.train(ctx.cfg.attack_bn == "train")
        with torch.no_grad():
            p_clean = F.softmax(ctx.model(x).float(), dim=1)
        ctx.model.train(was_training)
        x_adv = ctx.attack(x, p_clean)
    with ctx.timer.section("forward"), ctx.autocast():
        logits = ctx.train_model(_cat(x, x_adv))

    def loss_fn(logits):
        clean, adv = logits[:b].float(), logits[b:].float()
        l_ce = F.cross_entropy(clean, y)
        l_kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return l_ce + beta * l_kl, {"loss_ce": l_ce, "loss_kl": l_kl}

    out = _loss_and_backward(ctx, (logits,), loss_fn)
    out["correct_clean"], out["correct_adv"] = _correct(logits[:b], y), _correct(logits[b:], y)
    return out


def standard_step(ctx: StepContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    with ctx.timer.section("forward"), ctx.autocast():
        logits = ctx.train_model(x)
    out = _loss_and_backward(ctx, (logits,), _cross_entropy(y))
    out["correct_clean"] = _correct(logits, y)
    return out


def phase2_step(ctx: StepContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Phase 2: backbone frozen, the classifier trained with CE on PGD examples."""
    return pgd_at_step(ctx, x, y)


STEPS = {"anchor": anchor_step, "pgd-at": pgd_at_step, "trades": trades_step,
         "standard": standard_step}
