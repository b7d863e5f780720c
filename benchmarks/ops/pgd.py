"""The fused PGD step (``anchor_kernels.pgd_step``), in place on x_adv:
``x_adv <- clamp(min(max(x_adv + alpha sign(grad), x - eps), x + eps), lo, hi)``.

Inputs: a batch of n images (n, channels, size, size) in [0, 1]: x, x_adv (a copy) and grad.
Not differentiable (only the forward is timed; no largest-batch search: memory is the inputs).
Memory-bound, so GB/s: the bytes any implementation must move, read x_adv, grad, x and write
x_adv.
"""

from __future__ import annotations

import functools

import torch

from anchor_kernels import pgd as P
from anchor_kernels import reference

from ..records import Candidate, Problem, Settings, Work
from . import _common

NAME = "pgd"
SIZE_LABEL = "batch of images (n, 3, 32, 32)"
OPTIONS = {"channels": 3, "size": 32, "eps": 8 / 255, "alpha": 2 / 255}

_SIZES = {
    ("cpu", True): (128, 512, 2048),
    ("cpu", False): (128, 512, 2048, 8192),
    ("cuda", True): (512, 8192, 32768),
    ("cuda", False): (512, 2048, 8192, 32768, 131072),
}


def sizes(device_type: str, quick: bool) -> tuple[int, ...]:
    return _SIZES[(device_type, quick)]


def make_problem(n: int, dtype: torch.dtype, device: torch.device, options: dict) -> Problem:
    gen = torch.Generator(device=device).manual_seed(n)
    shape = (n, options["channels"], options["size"], options["size"])
    x = torch.rand(shape, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    return Problem(op=NAME, n=n, m=n, d=x[0].numel(), dtype=dtype, device=device,
                   inputs={"x": x, "x_adv": x.clone(), "grad": grad}, grad_inputs=())


def work(p: Problem, pass_: str) -> Work:
    return Work(bytes=4.0 * p.inputs["x"].numel() * p.inputs["x"].element_size())


def _step(p: Problem, options: dict, backend: str):
    i = p.inputs
    return functools.partial(P.pgd_step, i["x_adv"], i["grad"], i["x"], options["eps"],
                             options["alpha"], backend=backend)


def _backend_reasons(name: str):
    def reasons(p: Problem) -> list[str]:
        return P.available_backends(p.inputs["x"])[name]
    return reasons


def _backend_build(name: str, options: dict):
    def build(p: Problem):
        return _step(p, options, name), ()
    return build


def _update(x_adv, grad, x, eps, alpha):
    return x_adv.copy_(reference.pgd_step(x_adv, grad, x, eps, alpha))


def _compiled_build(options: dict, settings: Settings):
    fn = _common.compiled((NAME,), _update, settings)

    def build(p: Problem):
        i = p.inputs
        return functools.partial(fn, i["x_adv"], i["grad"], i["x"], options["eps"],
                                 options["alpha"]), ()
    return build


def candidates(device: torch.device, options: dict, settings: Settings) -> list[Candidate]:
    out = _common.backend_candidates(
        P.BACKEND_NAMES, device, settings, _backend_reasons,
        lambda name: _backend_build(name, options), note='pgd_step(backend="{name}")',
        differentiable=False)
    out.append(Candidate("eager", "baseline", _backend_build("eager", options),
                         differentiable=False,
                         note='pgd_step(backend="eager"): the reference formula, then a copy'))
    out.append(Candidate("compile", "baseline", _compiled_build(options, settings),
                         differentiable=False, note=_common.compile_note(settings)))
    return out
