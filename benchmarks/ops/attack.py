"""The PGD attack of ANCHOR training (L-inf, cross-entropy, random start, ``steps`` steps) on
a batch of n CIFAR-sized images against the trainer's model (CIFAR ResNet-18 at
``width``), in eval mode.

Candidates:
- ``anchor_kernels.attacks.PGD`` with each fused ``pgd_step`` backend and
  ``check_inputs=False`` (the trainer's setting: no host synchronisation in the loop);
- ``eager``: the same attack with the reference step (``backend="eager"``);
- ``torchattacks``: ``torchattacks.PGD``, the way people write this loop today;
- ``model-only`` (roofline neighbour): the attack's floor, ``steps`` forward + input-gradient
  passes of the model with no step, so the attack's overhead over the model is the ratio.

Work: the model's flops of those passes (counted once by ``torch.utils.flop_counter``), so
TFLOP/s compare the candidates on the same useful work. Not differentiable: the attack is
timed as one call (``fwd``).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from anchor_kernels import pgd as P
from anchor_kernels.attacks import PGD
from anchor_kernels.train.models import AnchorNet

from ..records import Candidate, Problem, Settings, Work
from . import _common

NAME = "attack"
SIZE_LABEL = "batch of images (n, 3, 32, 32)"
OPTIONS = {"steps": 10, "width": 0.25, "size": 32, "eps": 8 / 255, "alpha": 2 / 255}

_SIZES = {
    ("cpu", True): (8, 32),
    ("cpu", False): (8, 32, 128),
    ("cuda", True): (512, 4096),
    ("cuda", False): (512, 1024, 2048, 4096),
}


def sizes(device_type: str, quick: bool) -> tuple[int, ...]:
    return _SIZES[(device_type, quick)]


_MODELS: dict = {}


def model(device: torch.device, dtype: torch.dtype, width: float) -> torch.nn.Module:
    """One model per (device, dtype, width), in eval mode, channels_last on CUDA."""
    key = (device, dtype, width)
    if key not in _MODELS:
        net = AnchorNet(width=width).to(device=device, dtype=dtype).eval()
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        _MODELS[key] = net
    return _MODELS[key]


def make_problem(n: int, dtype: torch.dtype, device: torch.device, options: dict) -> Problem:
    gen = torch.Generator(device=device).manual_seed(n)
    shape = (n, 3, options["size"], options["size"])
    x = torch.rand(shape, device=device, dtype=dtype, generator=gen)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), device=device, generator=gen)
    # the useful work, counted once here where the options are known (see work())
    flops = options["steps"] * _pass_flops(device, dtype, options["width"], n, options["size"])
    return Problem(op=NAME, n=n, m=n, d=x[0].numel(), dtype=dtype, device=device,
                   inputs={"x": x, "y": y, "flops": torch.tensor(flops, dtype=torch.float64)},
                   grad_inputs=())


def _input_gradient(net, x, y):
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(net(x).float(), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


@functools.lru_cache(maxsize=None)
def _pass_flops(device: torch.device, dtype: torch.dtype, width: float, n: int, size: int) -> float:
    """Flops of one forward + input-gradient pass of the model on n images."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(n, 3, size, size, device=device, dtype=dtype, requires_grad=True)
    y = torch.zeros(n, dtype=torch.long, device=device)
    net = model(device, dtype, width)
    frozen = [q for q in net.parameters() if q.requires_grad]
    for q in frozen:  # the input gradient only, as the attack computes it
        q.requires_grad_(False)
    try:  # .backward(): the counter's hooks do not take autograd.grad of a leaf
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(net(x).float(), y, reduction="sum").backward()
    finally:
        for q in frozen:
            q.requires_grad_(True)
    return float(counter.get_total_flops())


def work(p: Problem, pass_: str) -> Work:
    return Work(flops=float(p.inputs["flops"]))


def _attack_build(backend: str, options: dict, cuda_graph: bool = False):
    def build(p: Problem):
        net = model(p.device, p.dtype, options["width"])
        attack = PGD(net, eps=options["eps"], alpha=options["alpha"], steps=options["steps"],
                     random_start=True, backend=backend, check_inputs=False, cuda_graph=cuda_graph)
        return functools.partial(attack, p.inputs["x"], p.inputs["y"]), ()
    return build


def _backend_reasons(name: str):
    def reasons(p: Problem) -> list[str]:
        return P.available_backends(p.inputs["x"])[name]
    return reasons


def _graph_reasons(p: Problem) -> list[str]:
    reasons = P.available_backends(p.inputs["x"])["triton"]
    if p.device.type != "cuda":
        reasons = reasons + ["CUDA graphs need a CUDA device"]
    return reasons


def _torchattacks_reasons(p: Problem) -> list[str]:
    if importlib.util.find_spec("torchattacks") is None:
        return ["torchattacks is not installed (pip install --no-deps torchattacks)"]
    return []


def _torchattacks_build(options: dict):
    def build(p: Problem):
        import torchattacks

        net = model(p.device, p.dtype, options["width"])
        attack = torchattacks.PGD(net, eps=options["eps"], alpha=options["alpha"],
                                  steps=options["steps"], random_start=True)
        return functools.partial(attack, p.inputs["x"], p.inputs["y"]), ()
    return build


def _model_only_build(options: dict):
    def build(p: Problem):
        net = model(p.device, p.dtype, options["width"])
        x, y = p.inputs["x"], p.inputs["y"]

        def passes():
            for _ in range(options["steps"]):
                grad = _input_gradient(net, x, y)
            return grad
        return passes, ()
    return build


def candidates(device: torch.device, options: dict, settings: Settings) -> list[Candidate]:
    out = _common.backend_candidates(
        P.BACKEND_NAMES, device, settings, _backend_reasons,
        lambda name: _attack_build(name, options),
        note='attacks.PGD(backend="{name}", check_inputs=False)', differentiable=False)
    out.append(Candidate("triton, CUDA graph", "backend", _attack_build("triton", options, True),
                         _graph_reasons, differentiable=False,
                         note='attacks.PGD(backend="triton", check_inputs=False, cuda_graph=True)'))
    out.append(Candidate("eager", "baseline", _attack_build("eager", options),
                         differentiable=False, note='attacks.PGD(backend="eager"): the reference step'))
    out.append(Candidate("torchattacks", "baseline", _torchattacks_build(options),
                         _torchattacks_reasons, differentiable=False,
                         note="torchattacks.PGD, same model, eps, alpha, steps, random start"))
    out.append(Candidate("model-only", "neighbour", _model_only_build(options),
                         differentiable=False,
                         note="steps x (forward + input gradient) of the model, no step: the floor"))
    return out
