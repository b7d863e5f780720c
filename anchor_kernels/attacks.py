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
from . import attack_graph
from .pgd import BACKEND_NAMES, NORMS, check_bounds, check_budget, pgd_random_start, pgd_step
from .supcon import supcon_loss

LOSSES = ("ce", "supcon")
POSITIVES = ("label", "instance")


class _EvalMode:
    """Puts ``model`` in eval (or train) mode and restores each module's own flag on exit.

    In train mode, modules whose class name contains one of ``keep_eval`` (e.g. "BatchNorm",
    "Dropout") stay in eval mode, as torchattacks' ``set_model_training_mode`` does."""

    def __init__(self, model: nn.Module, eval_mode: bool | None, keep_eval: tuple = ()):
        self.model, self.eval_mode, self.keep_eval = model, eval_mode, keep_eval

    def __enter__(self):
        self.saved = [(m, m.training) for m in self.model.modules()]
        if self.eval_mode is not None:
            self.model.train(not self.eval_mode)
            if not self.eval_mode:
                for m in self.model.modules():
                    if any(k in type(m).__name__ for k in self.keep_eval):
                        m.eval()
        return self

    def __exit__(self, *exc):
        for module, training in self.saved:
            module.training = training
        return False


class _NoParameterGrads:
    """Turns ``requires_grad`` off for every parameter of ``model`` that has it, and back on
    exit (also on an exception): the attack needs input gradients only."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p in self.frozen:
            p.requires_grad_(True)
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
        start_eps: radius of that random start, a float >= 0 (default: eps). N-FGSM with
            radius e, for example, is ``PGD(eps=3 * e, alpha=e, steps=1, start_eps=2 * e)``:
            noise from the 2e ball, one step of e, and a 3e ball that never binds.
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
        check_inputs: check the values of x (in [lo, hi], no NaN), of tensor budgets and of
            the labels against the model's classes, which costs one device synchronisation
            per call (default). False leaves the attack loop without any host
            synchronisation, for a training loop whose inputs are known to be valid.
        cuda_graph: capture the steps after the random start in a CUDA graph on the first
            call for a given shape, and replay it on later calls (CUDA inputs only; see
            ``anchor_kernels.attack_graph``). The model's parameters must be updated in place
            between calls (as ``torch.optim`` does), and autocast runs without its weight
            cache. Off by default.

    While attacking, the model's parameters have ``requires_grad`` off, so no weight
    gradient is computed for the input gradients the attack needs; each flag is restored
    afterwards, also when the attack raises.
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
        start_eps: float | None = None,
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
        check_inputs: bool = True,
        cuda_graph: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for arg, value in (("eps", eps), ("alpha", alpha)):
            if not isinstance(value, Tensor):
                v.check_positive(arg, value, allow_zero=arg == "eps")
        self.steps = v.check_int("steps", steps, minimum=0)
        if not isinstance(random_start, bool):
            raise TypeError(f"random_start must be a bool, got {type(random_start).__name__}")
        if start_eps is not None:
            v.check_positive("start_eps", start_eps, allow_zero=True)
        self.start_eps = start_eps
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
        if not isinstance(check_inputs, bool):
            raise TypeError(f"check_inputs must be a bool, got {type(check_inputs).__name__}")
        self.check_inputs = check_inputs
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        self.cuda_graph = cuda_graph
        self._graphs = attack_graph.CapturedSteps()
        self._classes: int | None = None  # the model's class count, known after a first call
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
        # torchattacks' state: attack mode, normalisation, BatchNorm/Dropout in train mode
        self.attack_mode, self.targeted, self._target_map, self._kth_min = "default", False, None, 1
        self.normalization_used: dict | None = None
        self._stats_on: dict = {}  # (device, dtype) -> its copies of the normalisation's stats
        self._keep_eval: tuple = ()
        self._given_name = name
        self.name = name or self._default_name()

    def _default_name(self) -> str:
        def fmt(value):
            return "per-sample" if isinstance(value, Tensor) else f"{value:.4g}"
        objective = self.loss if isinstance(self.loss, str) else "custom"
        mode = "" if self.attack_mode == "default" else "_" + self.attack_mode
        return (f"pgd{self.steps}_{self.norm}_eps{fmt(self.eps)}_alpha{fmt(self.alpha)}"
                f"{'_rs' if self.random_start else ''}_{objective}{mode}")

    def config(self) -> dict:
        """The settings as a JSON-serialisable dict."""
        def num(value):
            return value.tolist() if isinstance(value, Tensor) else value
        return {"name": self.name, "eps": num(self.eps), "alpha": num(self.alpha),
                "steps": self.steps, "random_start": self.random_start,
                "start_eps": self.start_eps, "norm": self.norm,
                "loss": self.loss if isinstance(self.loss, str) else getattr(
                    self.loss, "__name__", "custom"), "lo": self.lo, "hi": self.hi,
                "attack_mode": self.attack_mode,
                "normalization_used": self.normalization_used is not None}

    def __repr__(self) -> str:
        return f"PGD({json.dumps(self.config())})"

    # -----------------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, eps, alpha, y: Tensor | None = None) -> None:
        """Values of x (in [lo, hi], no NaN), of tensor budgets and, when given, of the class
        labels against the model's class count: one device sync per call."""
        checks = []
        lo_x, hi_x = torch.aminmax(x.detach())
        checks.append(((lo_x >= self.lo) & (hi_x <= self.hi)).reshape(1))
        if isinstance(eps, Tensor):
            checks.append(((eps >= 0) & torch.isfinite(eps)).all().reshape(1))
        if isinstance(alpha, Tensor):
            checks.append(((alpha > 0) & torch.isfinite(alpha)).all().reshape(1))
        if y is not None:
            checks.append(((y >= 0) & (y < self._classes)).all().reshape(1))
        ok = torch.cat(checks).cpu()
        if y is not None and not ok[-1]:
            c = self._classes
            raise ValueError(f"y must hold class indices in [0, {c}) for the model's {c} classes, "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        if not ok[0]:
            raise ValueError(f"x must lie in [lo, hi] = [{self.lo}, {self.hi}] (and hold no NaN); "
                             f"its values span [{lo_x.item()}, {hi_x.item()}]")
        if isinstance(eps, Tensor) and not ok[1]:
            raise ValueError("eps must be finite and >= 0 for every sample")
        if isinstance(alpha, Tensor) and not ok[1 + isinstance(eps, Tensor)]:
            raise ValueError("alpha must be finite and > 0 for every sample")

    def _forward(self, x: Tensor) -> Tensor:
        x = self._normalize(x)
        if self.embed is not None:
            return self.embed(x)
        return self.model(x)

    def _autocast(self, x: Tensor):
        if self.autocast_dtype is None:  # the caller's autocast context, if any, stays in force
            return contextlib.nullcontext()
        # a captured graph must cast the weights itself, not read a cache it does not own
        return torch.autocast(x.device.type, dtype=self.autocast_dtype,
                              cache_enabled=not self.cuda_graph)

    def _objective(self, x_adv: Tensor, y, clean_embeddings, first: bool = False) -> Tensor:
        # targeted: y holds the target labels and the attack descends their loss
        sign = -1.0 if self.targeted else 1.0
        if self.loss == "ce":
            logits = self.model(self._normalize(x_adv)).float()
            if first:  # once per call (one sync): cross_entropy would fail obscurely (or assert on GPU)
                _check_class_labels(y, logits)
                self._classes = logits.shape[1]
            return sign * F.cross_entropy(logits, y, reduction="sum")
        out = self._forward(x_adv)
        if self.loss == "supcon":
            views = torch.stack([out, clean_embeddings.to(out.dtype)], dim=1)  # (B, 2, D)
            labels = y if self.positives == "label" else None
            return supcon_loss(views, labels, backend=self.loss_backend, **self.supcon_kwargs)
        return sign * self.loss(out, y)

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
        if self.targeted and self.loss == "supcon":
            raise ValueError("targeted modes need loss='ce' or a callable loss, not 'supcon'")
        if x.numel() == 0:
            return x.detach().clone()
        x = x.detach()
        if self.normalization_used is not None:  # attack in pixel space, as torchattacks
            x = self._denormalize(x).clamp(self.lo, self.hi)  # clamp: rounding of the inverse
        graphed = self.cuda_graph and self.steps > 0
        if self.check_inputs and not graphed:
            self._check_inputs(x, eps, alpha)

        with _EvalMode(self.model, self.eval_mode, self._keep_eval), _NoParameterGrads(self.model):
            if self.targeted:
                y = self._target_labels(x, y)
            if self.random_start:
                start = eps if self.start_eps is None else self.start_eps
                x_adv = pgd_random_start(x, start, self.lo, self.hi, norm=self.norm,
                                         generator=self.generator, backend=self.backend)
            else:
                x_adv = x.clone()
            if graphed:
                x_adv = self._graphed_steps(x, x_adv, y, eps, alpha)
            else:
                x_adv = self._steps(x, x_adv, y, eps, alpha, self.check_inputs)
        if self.normalization_used is not None:
            return self._normalize(x_adv).detach()
        return x_adv.detach()

    forward = __call__

    def _steps(self, x: Tensor, x_adv: Tensor, y, eps, alpha, check_labels: bool) -> Tensor:
        """The K steps from the start ``x_adv``: the loop that ``cuda_graph`` captures."""
        clean = None
        if self.loss == "supcon" and self.steps > 0:
            with torch.no_grad(), self._autocast(x):
                clean = self._forward(x)
        for step in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad(), self._autocast(x):
                objective = self._objective(x_adv, y, clean, first=step == 0 and check_labels)
            if objective.dim() != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(objective.shape)}")
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = x_adv.detach()
            pgd_step(x_adv, grad, x, eps, alpha, self.lo, self.hi, norm=self.norm,
                     backend=self.backend)
        return x_adv

    def _graphed_steps(self, x: Tensor, x_adv: Tensor, y, eps, alpha) -> Tensor:
        """``_steps`` replayed from a captured CUDA graph (captured on a first call)."""
        dev = x.device.type
        autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        key = (tuple(x.shape), x.dtype, x.stride(), x.device, attack_graph.tensor_key(y),
               attack_graph.tensor_key(eps), attack_graph.tensor_key(alpha), autocast,
               self.targeted, attack_graph.state_key(self.model))
        inputs = {"x": x, "start": x_adv}
        for name, value in (("y", y), ("eps", eps), ("alpha", alpha)):
            if isinstance(value, Tensor):
                inputs[name] = value
        if self.check_inputs:
            # A first call checks the labels from its first logits; a replay cannot (the check
            # synchronises), so it checks them here against the class count seen then.
            replay_labels = self.loss == "ce" and key in self._graphs.entries
            self._check_inputs(x, eps, alpha, y if replay_labels else None)

        def body(t: dict, check_labels: bool = False) -> Tensor:
            # the start is cloned: the steps update their x_adv in place, and a static input
            # must stay a plain buffer for the next call's copy
            with torch.autocast(dev, enabled=autocast[0], dtype=autocast[1], cache_enabled=False):
                return self._steps(t["x"], t["start"].clone(), t.get("y", y), t.get("eps", eps),
                                   t.get("alpha", alpha), check_labels)

        return self._graphs.run(key, inputs, body, lambda: body(inputs, self.check_inputs))

    # --- torchattacks' Attack surface --------------------------------------------------

    def get_logits(self, inputs: Tensor) -> Tensor:
        """The model's logits for ``inputs`` as given to the attack (normalised inputs when
        ``set_normalization_used`` was called, as torchattacks outside an attack)."""
        return self.model(inputs)

    def get_mode(self) -> str:
        """"default" or "targeted(label)", "targeted(custom)", "targeted(random)",
        "targeted(least-likely)"."""
        return self.attack_mode

    def _set_mode(self, mode: str, target_map, quiet: bool) -> None:
        if mode != "default" and self.loss == "supcon":
            raise ValueError("targeted modes need loss='ce' or a callable loss, not 'supcon'")
        self.attack_mode, self.targeted, self._target_map = mode, mode != "default", target_map
        if self._given_name is None:
            self.name = self._default_name()
        if not quiet:
            print(f"Attack mode is changed to '{mode}'.")

    def set_mode_default(self, quiet: bool = False) -> None:
        """Untargeted: maximise the loss of the true labels."""
        self._set_mode("default", None, quiet)

    def set_mode_targeted_by_label(self, quiet: bool = False) -> None:
        """Targeted: the labels passed to ``attack(x, y)`` are the targets."""
        self._set_mode("targeted(label)", None, quiet)

    def set_mode_targeted_by_function(self, target_map_function: Callable, quiet: bool = False) -> None:
        """Targeted: targets are ``target_map_function(x, y)``, e.g. ``lambda x, y: (y + 1) % 10``."""
        if not callable(target_map_function):
            raise TypeError("target_map_function must be callable (inputs, labels) -> targets")
        self._set_mode("targeted(custom)", target_map_function, quiet)

    def set_mode_targeted_random(self, quiet: bool = False) -> None:
        """Targeted: a uniformly random class other than the label (drawn from ``generator``)."""
        self._set_mode("targeted(random)", self._random_targets, quiet)

    def set_mode_targeted_least_likely(self, kth_min: int = 1, quiet: bool = False) -> None:
        """Targeted: the class with the ``kth_min``-th smallest logit, the label left out."""
        self._kth_min = v.check_int("kth_min", kth_min, minimum=1)
        self._set_mode("targeted(least-likely)", self._least_likely_targets, quiet)

    def set_normalization_used(self, mean, std) -> None:
        """The model takes ``(x - mean) / std`` (per channel): the attack is then called with
        and returns normalised inputs, and works in pixel space ([lo, hi]) in between."""
        # float32, as torchattacks keeps them, so that both give the same bits
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != std.numel() or mean.numel() == 0:
            raise ValueError(f"mean and std must have one value per channel, got {mean.numel()} "
                             f"and {std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError("std must be > 0 for every channel")
        c = mean.numel()
        self.normalization_used = {"mean": mean.reshape(1, c, 1, 1), "std": std.reshape(1, c, 1, 1)}
        self._stats_on = {}

    def set_model_training_mode(self, model_training: bool = False,
                                batchnorm_training: bool = False,
                                dropout_training: bool = False) -> None:
        """Modules' modes during the attack: eval (default), or train with BatchNorm and
        Dropout layers kept in eval unless their flag is set (torchattacks' rules)."""
        self.eval_mode = not model_training
        self._keep_eval = tuple(name for name, train in (("BatchNorm", batchnorm_training),
                                                         ("Dropout", dropout_training)) if not train)

    def save(self, data_loader: Iterable, save_path: str | None = None, verbose: bool = True,
             return_verbose: bool = False, save_predictions: bool = False,
             save_clean_inputs: bool = False, save_type: str = "float"):
        """torchattacks' ``save``: attack every batch of ``data_loader`` and ``torch.save`` a
        dict with "adv_inputs", "labels" (and "preds", "clean_inputs"), "save_type" ("int":
        uint8 pixels, x * 255 truncated, as there) to ``save_path``. Inputs are saved in pixel
        space when normalisation is set. Returns (robust accuracy %, mean L2 of the successful
        perturbations, seconds of the last batch) when ``return_verbose``."""
        v.check_choice("save_type", save_type, ("float", "int"))
        device = self._device()
        saved = {"adv_inputs": [], "labels": [], "preds": [], "clean_inputs": []}
        correct = total = 0
        l2s, rob_acc, l2, seconds = [], 0.0, 0.0, 0.0
        for x, y in data_loader:
            start = time.perf_counter()
            x, y = x.to(device), y.to(device)
            x_adv = self(x, y)
            with torch.no_grad(), _EvalMode(self.model, True):
                pred = self.get_logits(x_adv).argmax(dim=1)
            right = pred == y
            correct += int(right.sum())
            total += y.shape[0]
            delta = x_adv - x  # in the caller's space, as torchattacks
            l2s.append(delta.reshape(x.shape[0], -1)[~right].norm(dim=1))
            rob_acc = 100.0 * correct / total
            l2 = torch.cat(l2s).mean().item() if sum(t.numel() for t in l2s) else 0.0
            seconds = time.perf_counter() - start
            if verbose:
                print(f"- Save progress: {total} samples / Robust accuracy: {rob_acc:.2f} % / "
                      f"L2: {l2:.5f} ({seconds:.3f} s)", end="\r")
            for key, value in (("adv_inputs", self._pixels(x_adv)), ("labels", y),
                               ("preds", pred), ("clean_inputs", self._pixels(x))):
                saved[key].append(value.detach().cpu())
        if verbose:
            print()
        if save_path is not None:
            out = {"adv_inputs": torch.cat(saved["adv_inputs"]), "labels": torch.cat(saved["labels"])}
            if save_predictions:
                out["preds"] = torch.cat(saved["preds"])
            if save_clean_inputs:
                out["clean_inputs"] = torch.cat(saved["clean_inputs"])
            if save_type == "int":
                for key in ("adv_inputs", "clean_inputs"):
                    if key in out:
                        out[key] = (out[key] * 255).to(torch.uint8)
            out["save_type"] = save_type
            torch.save(out, save_path)
        if return_verbose:
            return rob_acc, l2, seconds
        return None

    # --- helpers of the above ---

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _stats_like(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) on x's device and dtype, copied there once: a CUDA graph cannot capture
        the host-to-device copy, and a replay reads the copy its capture saw."""
        key = (x.device, x.dtype)
        if key not in self._stats_on:
            n = self.normalization_used
            self._stats_on[key] = (n["mean"].to(x.device, x.dtype), n["std"].to(x.device, x.dtype))
        return self._stats_on[key]

    def _normalize(self, x: Tensor) -> Tensor:
        if self.normalization_used is None:
            return x
        mean, std = self._stats_like(x)
        return (x - mean) / std

    def _denormalize(self, x: Tensor) -> Tensor:
        mean, std = self._stats_like(x)
        return x * std + mean

    def _pixels(self, x: Tensor) -> Tensor:
        return x if self.normalization_used is None else self._denormalize(x)

    def _target_labels(self, x: Tensor, y: Tensor | None) -> Tensor:
        """Targets of a targeted attack, from pixel-space ``x`` and the true labels ``y``."""
        if self.attack_mode == "targeted(label)":
            if y is None:
                raise ValueError("targeted(label) mode takes the targets as y; got None")
            return y
        target = self._target_map(x, y)  # pixel-space inputs, as torchattacks passes them
        v.check_labels("target labels", target, x.shape[0], x, f"the batch size B={x.shape[0]}")
        return target

    def _clean_logits(self, x: Tensor) -> Tensor:
        with torch.no_grad(), _EvalMode(self.model, True), self._autocast(x):
            return self.model(self._normalize(x)).float()

    def _random_targets(self, x: Tensor, y: Tensor | None) -> Tensor:
        logits = self._clean_logits(x)
        y = logits.argmax(dim=1) if y is None else y
        gen_device = self.generator.device if self.generator is not None else y.device
        shift = torch.randint(1, logits.shape[1], y.shape, generator=self.generator,
                              device=gen_device).to(y.device)
        return (y + shift) % logits.shape[1]

    def _least_likely_targets(self, x: Tensor, y: Tensor | None) -> Tensor:
        logits = self._clean_logits(x)
        y = logits.argmax(dim=1) if y is None else y
        if not 1 <= self._kth_min < logits.shape[1]:
            raise ValueError(f"kth_min={self._kth_min} must be below the {logits.shape[1]} classes")
        others = logits.scatter(1, y[:, None], float("inf"))  # the label is never a target
        return others.kthvalue(self._kth_min, dim=1).indices


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


def attack_name(attack) -> str:
    """``attack.name`` if it has one, else its class and settings, e.g. torchattacks'
    ``PGD(eps=0.03137, alpha=0.007843, steps=10, random_start=True)``."""
    name = getattr(attack, "name", None)
    if isinstance(name, str) and name:
        return name
    if not hasattr(attack, "__dict__") or isinstance(attack, type(attack_name)):
        return getattr(attack, "__name__", type(attack).__name__)
    noise = {"attack", "model_name", "device", "targeted", "supported_mode",
             "normalization_used", "attack_mode"}
    settings = [f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}"
                for k, val in vars(attack).items()
                if not k.startswith("_") and k not in noise
                and isinstance(val, (bool, int, float, str))]
    mode = getattr(attack, "attack_mode", "default")
    if isinstance(mode, str) and mode != "default":
        settings.append(f"mode={mode}")
    return f"{type(attack).__name__}({', '.join(settings)})"


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
        for attack in attacks:
            key = attack_name(attack)
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
