"""Projected gradient descent attacks on the fused PGD step, and robust-accuracy evaluation.

``PGD(model, ...)(x, y) -> x_adv`` works like torchattacks' ``PGD``: inputs in [lo, hi]
(default [0, 1], no normalisation inside), the model in eval mode during the attack, the
result detached. Differences that matter:

- gradients are taken with ``torch.autograd.grad`` with respect to the input only, so the
  parameters' ``.grad`` are never touched and no weight gradient is computed;
- every module's train/eval flag is restored afterwards (not only the top-level one);
- the update and the random start are the fused one-pass kernels of ``anchor_kernels.pgd``;
- the cross-entropy objective is summed over the batch (per-sample gradients do not shrink
  with the batch size, so they do not underflow in float16 autocast; the sign is the same
  as for the mean);
- ``loss="supcon"`` attacks the embeddings through the fused ``anchor_kernels.supcon_loss``.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validate as v
from .pgd import BACKEND_NAMES, NORMS, check_bounds, check_budget, pgd_random_start, pgd_step
from .supcon import supcon_loss

LOSSES = ("ce", "supcon")
POSITIVES = ("label", "instance")


class _EvalMode:
    """Puts ``model`` in eval (or train) mode and restores each module's own flag on exit."""

    def __init__(self, model: nn.Module, eval_mode: bool | None):
        self.model, self.eval_mode = model, eval_mode

    def __enter__(self):
        self.saved = [(m, m.training) for m in self.model.modules()]
        if self.eval_mode is not None:
            self.model.train(not self.eval_mode)
        return self

    def __exit__(self, *exc):
        for module, training in self.saved:
            module.training = training
        return False


class PGD:
    """Projected gradient ascent on a loss of the model, inside an eps-ball around x.

    ``attack(x, y) -> x_adv``:
        x: (B, ...) inputs in [lo, hi]; y: (B,) integer labels (may be None for
        ``loss="supcon", positives="instance"``). Returns x_adv (B, ...) like x, detached,
        with ``||x_adv - x|| <= eps`` (per sample) and ``lo <= x_adv <= hi``.

    Each of the ``steps`` iterations computes ``grad = d loss(x_adv) / d x_adv`` and applies
    the fused step ``x_adv <- proj(x_adv + alpha sign(grad))`` (L-inf) or the L2 step.

    Args:
        model: an ``nn.Module``; its forward gives logits (B, C) for ``loss="ce"``. A
            ``DistributedDataParallel`` model is attacked through its ``.module``.
        eps: radius, float >= 0 or (B,) tensor (per-sample budgets).
        alpha: step size, float > 0 or (B,) tensor.
        steps: number of iterations, >= 0 (0 returns the start point).
        random_start: start at a uniform random point of the ball (``pgd_random_start``)
            instead of at x.
        loss: "ce" (summed cross-entropy of ``model(x_adv)``), "supcon", or a callable
            ``loss(outputs, y) -> scalar`` with ``outputs = forward(x_adv)`` (``embed(x_adv)``
            when ``embed`` is given, else ``model(x_adv)``); the attack maximises it.
        norm: "linf" (every backend) or "l2" (step: triton or eager; random start: eager).
        lo, hi: the valid input range.
        eval_mode: True (default) runs the model in eval mode during the attack, False in
            train mode, None leaves the modes alone. Every module's flag is restored after.
        embed: for ``loss="supcon"``, a callable ``embed(x) -> (B, D)`` giving the embeddings
            to attack, e.g. ``lambda x: model.head(model.backbone(x))``; None means
            ``model(x)`` returns the embeddings. Use submodules of ``model`` so that
            ``eval_mode`` reaches them.
        positives: for "supcon": "label" (samples of the same class, and the clean view, are
            positives) or "instance" (only the clean view of the same image, SimCLR-style).
            The objective is ``supcon_loss(stack([embed(x_adv), embed(x).detach()], 1), y)``:
            the adversarial view is pushed away from its positives.
        supcon_kwargs: extra arguments of ``supcon_loss`` (temperature, hard_positive_beta...).
        loss_backend: the ``supcon_loss`` backend ("auto", "triton", "cuda", "cpu", "eager").
        autocast_dtype: e.g. torch.bfloat16 to run forward and loss under ``torch.autocast``
            (x_adv and the step stay in x's dtype). An autocast context around the call
            works as well.
        generator: ``torch.Generator`` for the random start (default torch's global one).
        backend: the ``pgd_step`` / ``pgd_random_start`` backend.
        name: a label for ``evaluate`` (default built from the settings).
    """

    def __init__(
        self,
        model: nn.Module,
        eps=8 / 255,
        alpha=2 / 255,
        steps: int = 10,
        random_start: bool = True,
        loss: str | Callable = "ce",
        *,
        norm: str = "linf",
        lo: float = 0.0,
        hi: float = 1.0,
        eval_mode: bool | None = True,
        embed: Callable[[Tensor], Tensor] | None = None,
        positives: str = "label",
        supcon_kwargs: dict | None = None,
        loss_backend: str = "auto",
        autocast_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        name: str | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for arg, value in (("eps", eps), ("alpha", alpha)):
            if not isinstance(value, Tensor):
                v.check_positive(arg, value, allow_zero=arg == "eps")
        self.steps = v.check_int("steps", steps, minimum=0)
        if not isinstance(random_start, bool):
            raise TypeError(f"random_start must be a bool, got {type(random_start).__name__}")
        if not callable(loss):
            v.check_choice("loss", loss, LOSSES)
        self.lo, self.hi = check_bounds(lo, hi)
        v.check_choice("norm", norm, NORMS)
        if eval_mode is not None and not isinstance(eval_mode, bool):
            raise TypeError(f"eval_mode must be a bool or None, got {type(eval_mode).__name__}")
        if embed is not None and not callable(embed):
            raise TypeError(f"embed must be callable, got {type(embed).__name__}")
        v.check_choice("positives", positives, POSITIVES)
        v.check_choice("loss_backend", loss_backend, BACKEND_NAMES)
        v.check_choice("backend", backend, BACKEND_NAMES)
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"autocast_dtype must be a torch.dtype, got {type(autocast_dtype).__name__}")
        # DDP's forward arms its reducer for a backward with parameter gradients, which the
        # attack never runs: attack the wrapped module (same parameters, no gradient sync).
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model, self.eps, self.alpha, self.random_start = model, eps, alpha, random_start
        self.loss, self.norm, self.eval_mode, self.embed = loss, norm, eval_mode, embed
        self.positives, self.supcon_kwargs = positives, dict(supcon_kwargs or {})
        self.loss_backend, self.autocast_dtype = loss_backend, autocast_dtype
        self.generator, self.backend = generator, backend
        self.name = name or self._default_name()

    def _default_name(self) -> str:
        def fmt(value):
            return "per-sample" if isinstance(value, Tensor) else f"{value:.4g}"
        objective = self.loss if isinstance(self.loss, str) else "custom"
        return (f"pgd{self.steps}_{self.norm}_eps{fmt(self.eps)}_alpha{fmt(self.alpha)}"
                f"{'_rs' if self.random_start else ''}_{objective}")

    def config(self) -> dict:
        """The settings as a JSON-serialisable dict."""
        def num(value):
            return value.tolist() if isinstance(value, Tensor) else value
        return {"name": self.name, "eps": num(self.eps), "alpha": num(self.alpha),
                "steps": self.steps, "random_start": self.random_start, "norm": self.norm,
                "loss": self.loss if isinstance(self.loss, str) else getattr(
                    self.loss, "__name__", "custom"), "lo": self.lo, "hi": self.hi}

    def __repr__(self) -> str:
        return f"PGD({json.dumps(self.config())})"

    # -----------------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, eps, alpha) -> None:
        """Values of x (in [lo, hi], no NaN) and of tensor budgets: one device sync per call."""
        checks = []
        lo_x, hi_x = torch.aminmax(x.detach())
        checks.append(((lo_x >= self.lo) & (hi_x <= self.hi)).reshape(1))
        if isinstance(eps, Tensor):
            checks.append(((eps >= 0) & torch.isfinite(eps)).all().reshape(1))
        if isinstance(alpha, Tensor):
            checks.append(((alpha > 0) & torch.isfinite(alpha)).all().reshape(1))
        ok = torch.cat(checks).cpu()
        if not ok[0]:
            raise ValueError(f"x must lie in [lo, hi] = [{self.lo}, {self.hi}] (and hold no NaN); "
                             f"its values span [{lo_x.item()}, {hi_x.item()}]")
        if isinstance(eps, Tensor) and not ok[1]:
            raise ValueError("eps must be finite and >= 0 for every sample")
        if isinstance(alpha, Tensor) and not ok[-1]:
            raise ValueError("alpha must be finite and > 0 for every sample")

    def _forward(self, x: Tensor) -> Tensor:
        if self.embed is not None:
            return self.embed(x)
        return self.model(x)

    def _autocast(self, x: Tensor):
        if self.autocast_dtype is None:  # the caller's autocast context, if any, stays in force
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

    def _objective(self, x_adv: Tensor, y, clean_embeddings, first: bool = False) -> Tensor:
        if self.loss == "ce":
            logits = self.model(x_adv).float()
            if first:  # once per call (one sync): cross_entropy would fail obscurely (or assert on GPU)
                _check_class_labels(y, logits)
            return F.cross_entropy(logits, y, reduction="sum")
        out = self._forward(x_adv)
        if self.loss == "supcon":
            views = torch.stack([out, clean_embeddings.to(out.dtype)], dim=1)  # (B, 2, D)
            labels = y if self.positives == "label" else None
            return supcon_loss(views, labels, backend=self.loss_backend, **self.supcon_kwargs)
        return self.loss(out, y)

    def __call__(self, x: Tensor, y: Tensor | None) -> Tensor:
        v.check_tensor("x", x, floating=True)
        if x.dim() == 0:
            raise ValueError("x must be a batch (B, ...), got a 0-d tensor")
        needs_labels = self.loss == "ce" or (self.loss == "supcon" and self.positives == "label")
        if y is not None or needs_labels:
            v.check_labels("y", y, x.shape[0], x, f"the batch size B={x.shape[0]} of x")
        eps = check_budget("eps", self.eps, x, allow_zero=True)[1]
        alpha = check_budget("alpha", self.alpha, x, allow_zero=False)[1]
        eps = self.eps if eps is None else eps
        alpha = self.alpha if alpha is None else alpha
        if x.numel() == 0:
            return x.detach().clone()
        self._check_inputs(x, eps, alpha)
        x = x.detach()

        with _EvalMode(self.model, self.eval_mode):
            if self.random_start:
                x_adv = pgd_random_start(x, eps, self.lo, self.hi, norm=self.norm,
                                         generator=self.generator, backend=self.backend)
            else:
                x_adv = x.clone()
            clean = None
            if self.loss == "supcon" and self.steps > 0:
                with torch.no_grad(), self._autocast(x):
                    clean = self._forward(x)
            for step in range(self.steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad(), self._autocast(x):
                    objective = self._objective(x_adv, y, clean, first=step == 0)
                if objective.dim() != 0:
                    raise ValueError(f"the loss must be a scalar, got shape {tuple(objective.shape)}")
                (grad,) = torch.autograd.grad(objective, x_adv)
                x_adv = x_adv.detach()
                pgd_step(x_adv, grad, x, eps, alpha, self.lo, self.hi, norm=self.norm,
                         backend=self.backend)
        return x_adv.detach()

    forward = __call__


def _check_class_labels(y: Tensor, logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"loss='ce' needs the model to return logits (B, C), got shape "
                         f"{tuple(logits.shape)}")
    c = logits.shape[1]
    if bool(((y < 0) | (y >= c)).any()):
        raise ValueError(f"y must hold class indices in [0, {c}) for the model's {c} classes, "
                         f"got values in [{int(y.min())}, {int(y.max())}]")


# ---------------------------------------------------------------------------------------
# presets


def pgd20_trades(model: nn.Module, **overrides) -> PGD:
    """PGD-20 of TRADES' CIFAR-10 evaluation script (``pgd_attack_cifar10.py``): L-inf,
    eps 0.031, step 0.003, 20 steps, starting at x (no random start), inputs in [0, 1]."""
    kw = dict(eps=0.031, alpha=0.003, steps=20, random_start=False, name="pgd20_trades")
    return PGD(model, **{**kw, **overrides})


def pgd20(model: nn.Module, **overrides) -> PGD:
    """PGD-20 as in Madry et al. / torchattacks: L-inf, eps 8/255, step 2/255, random start."""
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=20, random_start=True, name="pgd20")
    return PGD(model, **{**kw, **overrides})


PRESETS = {"pgd20_trades": pgd20_trades, "pgd20": pgd20}


# ---------------------------------------------------------------------------------------
# evaluation


def evaluate(
    model: nn.Module,
    data: Iterable,
    attacks: Mapping[str, Callable] | Sequence[Callable] = (),
    *,
    device: torch.device | str | None = None,
    max_samples: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Clean and robust accuracy of ``model`` over ``data``.

    Args:
        model: classifier, ``model(x) -> logits (B, C)``; run in eval mode (each module's mode
            restored after).
        data: iterable of ``(x, y)`` batches (e.g. a DataLoader), x (B, ...) in the attacks'
            [lo, hi], y (B,) labels.
        attacks: ``{name: attack}`` or a sequence of attacks (named by their ``.name``); each
            ``attack(x, y) -> x_adv``, e.g. :class:`PGD` or a torchattacks attack.
        device: where to move batches (default: the model's first parameter's device).
        max_samples: stop after this many samples (the last batch is truncated).
        autocast_dtype: run the accuracy forwards under ``torch.autocast`` with this dtype.
        progress: show a tqdm progress bar with the running accuracies.

    Returns:
        ``{"n": samples, "clean_acc": float, "robust_acc": {name: float},
        "attacks": {name: settings}, "seconds": float}``, JSON-serialisable. Robust accuracy
        counts the samples still classified correctly after the attack, over all samples.
    """
    from tqdm.auto import tqdm

    if isinstance(attacks, Mapping):
        named = dict(attacks)
    else:
        named = {}
        for i, attack in enumerate(attacks):
            key = getattr(attack, "name", None) or f"attack{i}"
            if key in named:
                raise ValueError(f"two attacks are named {key!r}; pass a dict of names")
            named[key] = attack
    for key, attack in named.items():
        if not callable(attack):
            raise TypeError(f"attack {key!r} must be callable as attack(x, y) -> x_adv, got "
                            f"{type(attack).__name__}")
    if max_samples is not None:
        v.check_int("max_samples", max_samples, minimum=1)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")

    def predict(x: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                             enabled=autocast_dtype is not None):
            return model(x).argmax(dim=1)

    n = 0
    clean = torch.zeros((), dtype=torch.int64, device=device)
    robust = {key: torch.zeros((), dtype=torch.int64, device=device) for key in named}
    start = time.perf_counter()
    with _EvalMode(model, True):
        bar = tqdm(data, desc=desc, disable=not progress, leave=False)
        for batch in bar:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                what = (f"a {type(batch).__name__} of {len(batch)}"
                        if isinstance(batch, (tuple, list)) else type(batch).__name__)
                raise ValueError(f"data must yield (x, y) batches, got {what}")
            x, y = batch
            if max_samples is not None and n >= max_samples:
                break
            if max_samples is not None and n + x.shape[0] > max_samples:
                x, y = x[: max_samples - n], y[: max_samples - n]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            clean += (predict(x) == y).sum()
            for key, attack in named.items():
                robust[key] += (predict(attack(x, y)) == y).sum()
            n += x.shape[0]
            if progress:
                bar.set_postfix({"clean": f"{clean.item() / n:.3f}",
                                 **{k: f"{r.item() / n:.3f}" for k, r in robust.items()}})
        bar.close()
    seconds = time.perf_counter() - start
    if n == 0:
        raise ValueError("data gave no samples")
    return {
        "n": n,
        "clean_acc": clean.item() / n,
        "robust_acc": {key: r.item() / n for key, r in robust.items()},
        "attacks": {key: (a.config() if hasattr(a, "config") else repr(a))
                    for key, a in named.items()},
        "seconds": seconds,
    }
