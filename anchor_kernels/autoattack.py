"""AutoAttack-style robust accuracy: worst case per example over a list of attacks.

``standard_attacks(model, eps)`` builds the four attacks of AutoAttack's "standard" version
(Croce & Hein, ICML 2020) from torchattacks, with the standard's settings set explicitly
(torchattacks' own defaults are weaker: 10 iterations instead of 100):

- ``apgd-ce``: APGD on cross-entropy, 100 iterations, 1 restart, rho 0.75;
- ``apgd-t``: targeted APGD on the DLR loss, 100 iterations, 1 restart, the 9 most likely
  other classes as targets (fewer when there are fewer classes);
- ``fab-t``: targeted FAB, 100 iterations, 1 restart, 9 target classes;
- ``square``: Square attack (black box), 5000 queries, p_init 0.8, 1 restart.

``worst_case_accuracy(model, x, y, attacks, eps=...)`` runs them as AutoAttack does: each
attack on the images that every earlier one failed on, so an image counts as robust only when
it is classified correctly clean and after every attack. Each adversarial example is projected
onto the L-inf eps-ball around its image and onto [0, 1] before it is counted, so an attack
that oversteps the budget can never lower the accuracy unfairly. torchattacks is imported on
first use (``pip install torchattacks``).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from . import _validate as v
from .attacks import _EvalMode

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
STANDARD_STEPS = 100
STANDARD_QUERIES = 5000
STANDARD_TARGETS = 9


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise ImportError("the AutoAttack-style evaluation needs torchattacks "
                          "(pip install torchattacks)") from None
    return torchattacks


def standard_attacks(model: nn.Module, eps: float, *, num_classes: int = 10,
                     names=STANDARD_ATTACKS, steps: int = STANDARD_STEPS,
                     n_queries: int = STANDARD_QUERIES, seed: int = 0) -> dict[str, Callable]:
    """``{name: attack}`` for ``names`` (a subset of ``STANDARD_ATTACKS``, in that order of
    use), L-inf radius ``eps`` for inputs in [0, 1]. ``steps`` and ``n_queries`` default to
    the standard's; smaller values are for tests only."""
    v.check_positive("eps", eps)
    v.check_int("num_classes", num_classes, minimum=2)
    v.check_int("steps", steps, minimum=1)
    v.check_int("n_queries", n_queries, minimum=1)
    unknown = [n for n in names if n not in STANDARD_ATTACKS]
    if unknown or not names:
        raise ValueError(f"names must be a non-empty subset of {', '.join(STANDARD_ATTACKS)}; "
                         f"got {list(names)}")
    ta = _torchattacks()
    targets = min(STANDARD_TARGETS, num_classes - 1)
    common = dict(norm="Linf", eps=float(eps), n_restarts=1, seed=seed)
    out: dict[str, Callable] = {}
    for name in names:
        if name == "apgd-ce":
            attack = ta.APGD(model, steps=steps, loss="ce", rho=0.75, **common)
        elif name == "apgd-t":
            attack = ta.APGDT(model, steps=steps, rho=0.75, n_classes=num_classes, **common)
            attack.n_target_classes = targets
        elif name == "fab-t":
            attack = ta.FAB(model, steps=steps, multi_targeted=True, n_classes=num_classes,
                            **common)
            attack.n_target_classes = targets
        else:
            attack = ta.Square(model, n_queries=n_queries, p_init=0.8, **common)
        out[name] = attack
    return out


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """x_adv clipped to the L-inf ball of radius eps around x and to [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def worst_case_accuracy(model: nn.Module, x: Tensor, y: Tensor,
                        attacks: Mapping[str, Callable[[Tensor, Tensor], Tensor]], *, eps: float,
                        batch_size: int = 500, progress: bool = False,
                        desc: str = "attacks") -> dict:
    """Clean accuracy and robust accuracy (worst case per example over ``attacks``).

    Args:
        model: classifier, ``model(x) -> logits (B, C)``; run in eval mode, every module's
            mode restored after.
        x: (N, C, H, W) images in [0, 1]; y: (N,) labels; both on the model's device.
        attacks: ``{name: attack}``, ``attack(x, y) -> x_adv``, run in order, each on the
            images still classified correctly after all earlier ones.
        eps: the L-inf budget every adversarial example is projected onto.
        batch_size: images per attack call.
        progress: a tqdm bar over (attack, batch).

    Returns:
        ``{"n", "clean_acc", "robust_acc", "acc_after": {name: accuracy after the attacks up
        to and including name}, "seconds": {name: s}}``. The global torch RNG is left as it
        was (torchattacks reseeds it).
    """
    from tqdm.auto import tqdm

    v.check_positive("eps", eps)
    v.check_int("batch_size", batch_size, minimum=1)
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, ...) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x holds no image")
    lo, hi = torch.aminmax(x)
    if lo.item() < 0 or hi.item() > 1:
        raise ValueError(f"x must lie in [0, 1], its values span [{lo.item()}, {hi.item()}]")

    def correct(images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]
                              for i in range(0, images.shape[0], batch_size)])

    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with _EvalMode(model, True), torch.random.fork_rng(devices=devices):
        robust = correct(x, y)
        out = {"n": n, "clean_acc": robust.float().mean().item(), "acc_after": {}, "seconds": {}}
        total = len(attacks) * -(-n // batch_size)
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        for name, attack in attacks.items():
            start = time.perf_counter()
            idx = robust.nonzero().flatten()
            for i in range(0, idx.numel(), batch_size):
                b = idx[i:i + batch_size]
                x_adv = project(attack(x[b], y[b]).detach().to(x.dtype), x[b], eps)
                robust[b] = correct(x_adv, y[b])
                bar.update(1)
            bar.update(-(-n // batch_size) - -(-idx.numel() // batch_size))
            out["acc_after"][name] = robust.float().mean().item()
            out["seconds"][name] = time.perf_counter() - start
        bar.close()
    out["robust_acc"] = robust.float().mean().item()
    return out
