"""Timers and peak-memory probes with one interface for CUDA and CPU.

Timing: on CUDA, ``triton.testing.do_bench(fn, warmup, rep, grad_to_none,
quantiles=[0.5, 0.2, 0.8])`` (CUDA events, L2 flushed before each run). On CPU, the same
recipe with ``time.perf_counter``: run for ``warmup_ms``, estimate one call, then time
``rep_ms / estimate`` calls (at least ``min_reps``) one by one, resetting gradients outside
the timed region and with the garbage collector paused (as ``timeit`` does), and take the same
quantiles with ``torch.quantile``. CPU caches are not flushed.

Peak memory: bytes allocated during one call above what was allocated before it. On CUDA,
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU, the allocation
and free events that PyTorch's CPU allocator reports to the profiler
(``torch.profiler.profile(profile_memory=True)``), summed in time order: every tensor the call
creates, including inside C++ kernels and compiled code, on the calling thread. Memory taken
outside PyTorch's allocator (plain ``malloc`` in a kernel's worker threads) is not seen.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    p20: float
    p80: float
    reps: int | None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def bench(fn: Callable[[], object], device: torch.device, *, warmup_ms: float, rep_ms: float,
          grad_to_none: Sequence[torch.Tensor] = (), min_reps: int = 5) -> Timing:
    """Median and 20/80 % quantiles (ms) of ``fn`` after warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        ms, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none),
                                quantiles=list(QUANTILES))
        return Timing(ms, p20, p80, None)
    return _bench_cpu(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none,
                      min_reps=min_reps)


def _bench_cpu(fn, *, warmup_ms, rep_ms, grad_to_none, min_reps, max_reps=10_000) -> Timing:
    start, calls = time.perf_counter(), 0
    while True:  # warm up by time, like do_bench, and at least once
        _reset_grads(grad_to_none)
        fn()
        calls += 1
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if elapsed_ms >= warmup_ms:
            break
    estimate_ms = max(elapsed_ms / calls, 1e-6)
    reps = int(min(max_reps, max(min_reps, rep_ms / estimate_ms)))
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside the timed region is noise, not the op's cost
    try:
        for _ in range(reps):
            _reset_grads(grad_to_none)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    q = torch.quantile(torch.tensor(times, dtype=torch.float64),
                       torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], reps)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronised call (for time limits, not for reported figures)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def peak_memory(fn: Callable[[], object], device: torch.device,
                grad_to_none: Sequence[torch.Tensor] = ()) -> tuple[int, float]:
    """(peak bytes above the bytes allocated before the call, seconds) of one call of ``fn``."""
    _reset_grads(grad_to_none)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return torch.cuda.max_memory_allocated(device) - base, seconds
    return _peak_memory_cpu(fn)


def _peak_memory_cpu(fn) -> tuple[int, float]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    # The raw allocator events (bytes > 0 allocate, < 0 free); the profiler's per-op tables
    # attribute them to ops and lose the time order that the peak needs.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, seconds


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's start/stop lines, which its C++ side writes straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def is_oom(exc: BaseException) -> bool:
    """Out of memory on any device (CUDA's OutOfMemoryError, or the CPU allocator's error)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def release(device: torch.device) -> None:
    """Return freed memory to the device after an out-of-memory error or a large run."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def grow(points: Sequence[tuple[int, float]], n_next: int) -> float | None:
    """Extrapolate a cost (bytes or seconds) to ``n_next`` from measured (n, cost) points.

    Uses the growth exponent of the last two points, clamped to [1, 2] (linear for fused
    kernels, quadratic for an M x N buffer); with one point, assumes quadratic (the safe side
    for a memory cap or a time limit).
    """
    points = [(n, c) for n, c in points if c and c > 0]
    if not points:
        return None
    n1, c1 = points[-1]
    exponent = 2.0
    if len(points) >= 2:
        n0, c0 = points[-2]
        if n1 > n0:
            exponent = min(2.0, max(1.0, math.log(c1 / c0) / math.log(n1 / n0)))
    return c1 * (n_next / n1) ** exponent
