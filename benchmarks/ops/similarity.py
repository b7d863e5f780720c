"""Pairwise similarity (``anchor_kernels.pairwise_similarity``): S = norm(a) norm(a)^T / t.

Inputs: a (N, D) with ``requires_grad`` (b = a). The output is N x N itself, so every
candidate writes N^2 elements: the op is memory-bound at small D, and both TFLOP/s
(2 N^2 D forward, 4 N^2 D backward) and GB/s (the bytes any implementation must move: read
a, write S forward; read dS and a, write da backward) are reported. Roofline neighbour on
every device: the bare matmul ``a @ a.T`` (no normalisation, no scaling).
"""

from __future__ import annotations

import functools

import torch

from anchor_kernels import reference
from anchor_kernels import similarity as sim
from anchor_kernels.backends import BACKEND_NAMES

from ..records import Candidate, Problem, Settings, Work
from . import _common

NAME = "similarity"
SIZE_LABEL = "N (rows of a; S is N x N)"
OPTIONS = {"d": 128, "temperature": 0.1, "normalize": True}

_SIZES = {
    ("cpu", True): (256, 512, 1024, 2048),
    ("cpu", False): (512, 1024, 2048, 4096, 8192),
    ("cuda", True): (1024, 4096, 16384),
    ("cuda", False): tuple(1024 * 2 ** k for k in range(6)),  # 1024 .. 32768
}


def sizes(device_type: str, quick: bool) -> tuple[int, ...]:
    return _SIZES[(device_type, quick)]


def make_problem(n: int, dtype: torch.dtype, device: torch.device, options: dict) -> Problem:
    gen = torch.Generator(device=device).manual_seed(n)
    a = torch.randn(n, options["d"], device=device, dtype=dtype, generator=gen)
    a.requires_grad_()
    return Problem(op=NAME, n=n, m=n, d=options["d"], dtype=dtype, device=device,
                   inputs={"a": a}, grad_inputs=(a,))


def work(p: Problem, pass_: str) -> Work:
    nnd = float(p.m) * p.n * p.d
    size = p.inputs["a"].element_size()
    s_bytes, a_bytes = p.m * p.n * size, p.n * p.d * size
    flops = {"fwd": 2 * nnd, "bwd": 4 * nnd, "fwd+bwd": 6 * nnd}[pass_]
    moved = {"fwd": s_bytes + a_bytes, "bwd": s_bytes + 2 * a_bytes,
             "fwd+bwd": 2 * s_bytes + 3 * a_bytes}[pass_]
    return Work(flops=flops, bytes=moved)


def _backend_reasons(name: str):
    def reasons(p: Problem) -> list[str]:
        return sim.DISPATCH.available(p.inputs["a"], p.inputs["a"])[name]
    return reasons


def _backend_build(name: str, options: dict):
    def build(p: Problem):
        return functools.partial(sim.pairwise_similarity, p.inputs["a"],
                                 normalize=options["normalize"],
                                 temperature=options["temperature"], backend=name), p.grad_inputs
    return build


def _compiled_build(options: dict, settings: Settings):
    kwargs = dict(normalize=options["normalize"], temperature=options["temperature"])
    fn = _common.compiled((NAME, tuple(sorted(kwargs.items()))),
                          functools.partial(reference.pairwise_similarity, **kwargs), settings)

    def build(p: Problem):
        return functools.partial(fn, p.inputs["a"]), p.grad_inputs
    return build


def _matmul_build(p: Problem):
    a = p.inputs["a"]
    return (lambda: a @ a.T), p.grad_inputs


def candidates(device: torch.device, options: dict, settings: Settings) -> list[Candidate]:
    out = _common.backend_candidates(
        BACKEND_NAMES, device, settings, _backend_reasons,
        lambda name: _backend_build(name, options), note='pairwise_similarity(backend="{name}")')
    out.append(Candidate("eager", "baseline", _backend_build("eager", options),
                         note='pairwise_similarity(backend="eager"): F.normalize, mm, scale'))
    out.append(Candidate("compile", "baseline", _compiled_build(options, settings),
                         note=_common.compile_note(settings)))
    out.append(Candidate("matmul", "neighbour", _matmul_build,
                         note="a @ a.T alone (cuBLAS / BLAS): the roofline of the fused op"))
    return out
