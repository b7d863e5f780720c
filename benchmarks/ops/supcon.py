"""SupCon / ANCHOR loss (``anchor_kernels.supcon_loss``): single set, M = N anchors, or with
``anchors`` < 1 two sets: the first M = anchors x N rows as anchors against all N as the
contrast set (``anchor_offset=0``), the shape of one process of the distributed loss.

Inputs: features (N, D) with ``requires_grad``, labels (N,) drawn from ``classes`` classes.
Work: the similarity matmul, 2 M N D flops forward and 4 M N D backward (dz and dc); the
normalisation, exps and a fused backend's recomputation of the tile are not counted, so
TFLOP/s is useful work per second, comparable across backends.
"""

from __future__ import annotations

import functools

import torch

from anchor_kernels import backends, reference, supcon_loss

from ..records import Candidate, Problem, Settings, Work
from . import _common

NAME = "supcon"
SIZE_LABEL = "N (batch rows; M = anchors x N anchors)"
# beta > 0: soft hard-positive mining; topk > 0: the top-k mode (0: off); beta = topk = 0 is
# standard SupCon.
OPTIONS = {"d": 128, "classes": 10, "temperature": 0.1, "beta": 0.0, "topk": 0,
           "detach_weights": True, "anchors": 1.0}

_SIZES = {
    ("cpu", True): (256, 512, 1024, 2048),
    ("cpu", False): (512, 1024, 2048, 4096, 8192),
    ("cuda", True): (1024, 4096, 16384),
    ("cuda", False): tuple(1024 * 2 ** k for k in range(7)),  # 1024 .. 65536
}


def sizes(device_type: str, quick: bool) -> tuple[int, ...]:
    return _SIZES[(device_type, quick)]


def make_problem(n: int, dtype: torch.dtype, device: torch.device, options: dict) -> Problem:
    gen = torch.Generator(device=device).manual_seed(n)
    f = torch.randn(n, options["d"], device=device, dtype=dtype, generator=gen)
    labels = torch.randint(0, options["classes"], (n,), device=device, generator=gen)
    f.requires_grad_()
    m = n if options["anchors"] >= 1 else max(1, round(n * options["anchors"]))
    return Problem(op=NAME, n=n, m=m, d=options["d"], dtype=dtype, device=device,
                   inputs={"features": f, "labels": labels}, grad_inputs=(f,))


def _loss_args(p: Problem) -> tuple[tuple, dict]:
    """supcon_loss's tensors: one set, or the first M rows against all N (two sets)."""
    f, y = p.inputs["features"], p.inputs["labels"]
    if p.m == p.n:
        return (f, y), {}
    return (f[:p.m], y[:p.m]), dict(contrast=f, contrast_labels=y, anchor_offset=0)


def work(p: Problem, pass_: str) -> Work:
    mnd = float(p.m) * p.n * p.d
    return Work(flops={"fwd": 2 * mnd, "bwd": 4 * mnd, "fwd+bwd": 6 * mnd}[pass_])


def _loss_kwargs(options: dict) -> dict:
    return dict(temperature=options["temperature"], hard_positive_beta=options["beta"],
                hard_positive_topk=options["topk"] or None,
                detach_weights=options["detach_weights"])


def _backend_reasons(name: str, options: dict):
    def reasons(p: Problem) -> list[str]:
        (f, y), two = _loss_args(p)
        problem = backends.SupConProblem(
            f=f, y_f=y, g=two.get("contrast"), y_g=two.get("contrast_labels"),
            temperature=options["temperature"], beta=options["beta"], topk=options["topk"] or None,
            detach_weights=options["detach_weights"], normalize=True, anchor_offset=0)
        return backends.available_backends(problem)[name]
    return reasons


def _backend_build(name: str, options: dict):
    kwargs = _loss_kwargs(options)

    def build(p: Problem):
        tensors, two = _loss_args(p)
        return functools.partial(supcon_loss, *tensors, backend=name, **two, **kwargs), p.grad_inputs
    return build


def _compiled_build(options: dict, settings: Settings):
    kwargs = _loss_kwargs(options)
    fn = _common.compiled((NAME, tuple(sorted(kwargs.items()))),
                          functools.partial(reference.supcon_loss, **kwargs), settings)

    def build(p: Problem):
        (f, y), two = _loss_args(p)
        if two:
            return functools.partial(fn, f, y, two["contrast"], two["contrast_labels"],
                                     anchor_offset=0), p.grad_inputs
        return functools.partial(fn, f, y), p.grad_inputs
    return build


def candidates(device: torch.device, options: dict, settings: Settings) -> list[Candidate]:
    """Every anchor_kernels backend (eager is the baseline), torch.compile of the reference,
    and on CUDA the flash-attention neighbour."""
    out = _common.backend_candidates(
        backends.BACKEND_NAMES, device, settings, lambda name: _backend_reasons(name, options),
        lambda name: _backend_build(name, options), note='supcon_loss(backend="{name}")')
    out.append(Candidate("eager", "baseline", _backend_build("eager", options),
                         note='supcon_loss(backend="eager"): the reference, O(M N) memory'))
    out.append(Candidate("compile", "baseline", _compiled_build(options, settings),
                         note=_common.compile_note(settings)))
    if device.type == "cuda":
        out.append(_common.ATTENTION)
    return out
