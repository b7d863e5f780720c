"""Hard-positive selection (``anchor_kernels.hard_positive_mining``): per anchor, the k
positives of lowest cosine, with their cosines (differentiable).

Inputs: z (N, D) with ``requires_grad``, labels (N,) from ``classes`` classes, the anchors
being their own candidate set. The timed output is the cosines (N, k), whose backward reaches
z. Work: 2 N^2 D flops forward (every cosine is computed to rank it), 4 N k D backward (the
gradient of the k selected cosines per anchor).
"""

from __future__ import annotations

import functools

import torch

from anchor_kernels import hard_positive as hp
from anchor_kernels import reference
from anchor_kernels.backends import BACKEND_NAMES

from ..records import Candidate, Problem, Settings, Work
from . import _common

NAME = "hard_positive"
SIZE_LABEL = "N (anchors = candidates)"
OPTIONS = {"d": 128, "classes": 10, "k": 4, "normalize": True}

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
    z = torch.randn(n, options["d"], device=device, dtype=dtype, generator=gen)
    labels = torch.randint(0, options["classes"], (n,), device=device, generator=gen)
    z.requires_grad_()
    return Problem(op=NAME, n=n, m=n, d=options["d"], dtype=dtype, device=device,
                   inputs={"z": z, "labels": labels, "k": options["k"]}, grad_inputs=(z,))


def work(p: Problem, pass_: str) -> Work:
    fwd = 2.0 * p.m * p.n * p.d
    bwd = 4.0 * p.m * p.inputs["k"] * p.d
    return Work(flops={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_])


def _cosines(z, labels, k, normalize, backend):
    return hp.hard_positive_mining(z, labels, k, normalize=normalize, backend=backend)[1]


def _reference_cosines(z, labels, k, normalize):
    return reference.hard_positive_mining(z, labels, k, normalize=normalize)[1]


def _backend_reasons(name: str, options: dict):
    def reasons(p: Problem) -> list[str]:
        z = p.inputs["z"]
        return hp.DISPATCH.available(z, z, options["k"])[name]
    return reasons


def _backend_build(name: str, options: dict):
    def build(p: Problem):
        return functools.partial(_cosines, p.inputs["z"], p.inputs["labels"], options["k"],
                                 options["normalize"], name), p.grad_inputs
    return build


def _compiled_build(options: dict, settings: Settings):
    kwargs = dict(k=options["k"], normalize=options["normalize"])
    fn = _common.compiled((NAME, tuple(sorted(kwargs.items()))),
                          functools.partial(_reference_cosines, **kwargs), settings)

    def build(p: Problem):
        return functools.partial(fn, p.inputs["z"], p.inputs["labels"]), p.grad_inputs
    return build


def candidates(device: torch.device, options: dict, settings: Settings) -> list[Candidate]:
    out = _common.backend_candidates(
        BACKEND_NAMES, device, settings, lambda name: _backend_reasons(name, options),
        lambda name: _backend_build(name, options), note='hard_positive_mining(backend="{name}")')
    out.append(Candidate("eager", "baseline", _backend_build("eager", options),
                         note="hard_positive_mining(backend=\"eager\"): topk over the masked "
                              "N x N cosine matrix"))
    out.append(Candidate("compile", "baseline", _compiled_build(options, settings),
                         note=_common.compile_note(settings)))
    return out
