"""The frozen records a benchmark run is made of: a problem (one op's inputs at one size),
a candidate (one way to compute the op), a measurement and a largest-batch search result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

PASSES = ("fwd", "bwd", "fwd+bwd")

# What a candidate is, for the table and the plot.
KINDS = (
    "backend",  # an anchor_kernels backend (fused kernels or the eager reference)
    "baseline",  # eager PyTorch / torch.compile of the reference
    "neighbour",  # a different op of similar shape, for a roofline (flash attention)
    "interpreter",  # a Triton backend under TRITON_INTERPRET=1: a debugging aid, not a speed
)


@dataclass(frozen=True)
class Problem:
    """One op's inputs at one size. ``n`` is the swept batch size (the plot's x axis)."""

    op: str
    n: int
    m: int  # rows on the anchor side (the M of the flop count)
    d: int  # feature dimension
    dtype: torch.dtype
    device: torch.device
    inputs: dict  # name -> Tensor
    grad_inputs: tuple  # the op's differentiable inputs


@dataclass(frozen=True)
class Work:
    """Useful work of one pass, for TFLOP/s (``flops``) or GB/s (``bytes``)."""

    flops: float | None = None
    bytes: float | None = None


def _no_reasons(problem: Problem) -> list[str]:
    return []


@dataclass(frozen=True)
class Candidate:
    """One way to run an op. ``build(problem)`` returns ``(forward, grad_inputs)``: a
    zero-argument callable whose result (a Tensor) is what the backward differentiates, and the
    tensors whose ``.grad`` the backward fills (reset between timed runs)."""

    name: str
    kind: str
    build: Callable[[Problem], tuple[Callable[[], Tensor], tuple]]
    reasons: Callable[[Problem], list[str]] = _no_reasons
    # Work of this candidate when it differs from the op's (the attention neighbour).
    work: Callable[[Problem, str], Work] | None = None
    differentiable: bool = True
    note: str = ""


@dataclass(frozen=True)
class Settings:
    """Run-wide choices that shape the candidates."""

    include_interpreter: bool = False  # time Triton under TRITON_INTERPRET=1 (labelled so)
    compile_dynamic: bool = True  # torch.compile(dynamic=True): one compile for every size
    compile_backend: str = "inductor"  # torch.compile(backend=...)


@dataclass(frozen=True)
class Measurement:
    """One (op, candidate, pass, dtype, size). Times in ms; memory in bytes above what was
    allocated before the measured call (the inputs, and for ``bwd`` the saved graph)."""

    op: str
    candidate: str
    kind: str
    pass_: str
    dtype: str
    n: int
    m: int
    d: int
    status: str  # ok | unsupported | oom | error | skipped
    reason: str = ""
    ms: float | None = None  # median
    ms_p20: float | None = None
    ms_p80: float | None = None
    reps: int | None = None  # timed repetitions (None in results of older versions)
    tflops: float | None = None  # at the median time
    gbps: float | None = None
    peak_mem_bytes: int | None = None


STATUSES = ("ok", "unsupported", "oom", "error", "skipped")


@dataclass(frozen=True)
class Fit:
    """Largest batch (doubling) that a candidate ran forward+backward on, and why it stopped."""

    op: str
    candidate: str
    kind: str
    dtype: str
    d: int
    largest_n: int | None
    peak_mem_bytes: int | None  # at largest_n
    seconds: float | None  # one forward+backward call at largest_n
    stopped: str  # oom | mem-cap | time-limit | max-n | budget | unsupported | error
    detail: str
    probes: tuple = field(default_factory=tuple)  # ({n, status, seconds, peak_mem_bytes}, ...)


FIT_STOPS = ("oom", "mem-cap", "time-limit", "max-n", "budget", "unsupported", "error")
