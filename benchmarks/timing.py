"""Timers and peak-memory probes with one interface for CUDA and CPU.

Timing: on CUDA, ``triton.testing.do_bench``'s recipe written out, so that no figure rests on
fewer than ``min_reps`` repetitions (do_bench runs ``rep / estimate`` of them, a single one
for a call longer than ``rep``): estimate from a few calls, warm up for ``warmup_ms``, time
``max(min_reps, rep_ms / estimate)`` repetitions with CUDA events around the run alone, L2
flushed before each, garbage collector paused. Candidates compared at one size are timed
interleaved (``bench_interleaved``): their repetitions run in rounds, a slice of each in turn. A run that needs an untimed setup before each
repetition (the backward alone needs a fresh forward: replaying one graph with
``retain_graph=True`` is refused by compiled graphs that donate their buffers) calls it
outside the events. On CPU, the same recipe with ``time.perf_counter`` (CPU caches not
flushed). Gradients are reset
outside the timed region; quantiles come from ``torch.quantile``.

Peak memory: bytes allocated during one call above what was allocated before it. On CUDA,
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU, the allocation
and free events that PyTorch's CPU allocator reports to the profiler
(``torch.profiler.profile(profile_memory=True)``), summed in time order: every tensor the call
creates, including inside C++ kernels and compiled code, on the calling thread. Memory taken
outside PyTorch's allocator (plain ``malloc`` in a kernel's worker threads) is not seen.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda only


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


def bench(run: Callable, device: torch.device, *, warmup_ms: float, rep_ms: float,
          setup: Callable[[], object] | None = None, grad_to_none: Sequence[torch.Tensor] = (),
          min_reps: int = 5) -> Timing:
    """Median and 20/80 % quantiles (ms) of ``run()`` after warm-up.

    With ``setup``, each repetition first calls ``state = setup()`` outside the timed region
    and times ``run(state)`` alone (the backward of a fresh forward, for example).
    """
    out = bench_interleaved({0: Contender(run, setup, grad_to_none)}, device, warmup_ms=warmup_ms,
                            rep_ms=rep_ms, min_reps=min_reps)[0]
    if isinstance(out, BaseException):
        raise out
    return out


@dataclass(frozen=True)
class Contender:
    """One candidate's pass to time: ``run`` (after ``setup``, untimed, when given)."""
    run: Callable
    setup: Callable[[], object] | None = None
    grad_to_none: Sequence[torch.Tensor] = ()


def bench_interleaved(contenders: dict, device: torch.device, *, warmup_ms: float, rep_ms: float,
                      min_reps: int = 5, rounds: int = 5, max_reps: int = 2000) -> dict:
    """``{name: Timing, or the exception that stopped it}`` for ``{name: Contender}``.

    Each contender is warmed up and its repetition count fixed on its own, as in ``bench``;
    then the timed repetitions run in ``rounds`` rounds, each timing a slice of every
    contender's in turn, so that a drift of the machine (clocks, temperature, other load)
    falls on all of them alike rather than on whichever ran last.
    """
    timer = _CudaTimer(device) if device.type == "cuda" else _CpuTimer()
    plans, out = {}, {}
    for name, c in contenders.items():
        try:
            plans[name] = _plan(c, timer, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps,
                                max_reps=max_reps)
        except Exception as exc:
            out[name] = exc
    times = {name: [] for name in plans}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside the timed region is noise, not the op's cost
    try:
        for r in range(rounds):
            for name in list(plans):
                once, reps = plans[name]
                k = reps * (r + 1) // rounds - reps * r // rounds
                try:
                    times[name] += timer.finish([once() for _ in range(k)])
                except Exception as exc:
                    out[name] = exc
                    del plans[name]
    finally:
        if gc_was_enabled:
            gc.enable()
    for name in plans:
        q = torch.quantile(torch.tensor(times[name], dtype=torch.float64),
                           torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        out[name] = Timing(q[0], q[1], q[2], len(times[name]))
    return {name: out[name] for name in contenders}


class _CpuTimer:
    def time(self, run, state) -> float:
        t0 = time.perf_counter()
        run() if state is _NO_STATE else run(state)
        return (time.perf_counter() - t0) * 1e3

    def finish(self, pending) -> list[float]:
        return pending


class _CudaTimer:
    """do_bench's method for a run that needs an untimed setup: CUDA events around ``run``
    alone, with the L2 cache flushed (256 MiB written) before each repetition."""

    def __init__(self, device):
        self.device = device
        self.flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)

    def time(self, run, state):
        self.flush.zero_()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        run() if state is _NO_STATE else run(state)
        end.record()
        return start, end

    def finish(self, pending) -> list[float]:
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in pending]


_NO_STATE = object()


def _plan(c: Contender, timer, *, warmup_ms, rep_ms, min_reps, max_reps):
    """(one timed repetition, how many): estimate from a few calls, warm up for ``warmup_ms``,
    then ``max(min_reps, rep_ms / estimate)`` repetitions, as do_bench decides."""
    def once():
        _reset_grads(c.grad_to_none)  # outside the timed region, as do_bench does
        state = c.setup() if c.setup is not None else _NO_STATE
        return timer.time(c.run, state)

    estimate = timer.finish([once() for _ in range(3)])
    estimate_ms = max(sum(estimate) / len(estimate), 1e-6)
    for _ in range(int(max(1, warmup_ms / estimate_ms))):  # warm up by time, like do_bench
        once()
    timer.finish([])
    return once, int(min(max_reps, max(min_reps, rep_ms / estimate_ms)))


def time_call(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronised call (for time limits, not for reported figures)."""
    synchronize(device)
    t0 = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - t0


def peak_memory(run: Callable, device: torch.device, *, setup: Callable[[], object] | None = None,
                grad_to_none: Sequence[torch.Tensor] = ()) -> tuple[int, float]:
    """(peak bytes above the bytes allocated before the call, seconds) of one ``run()``, or of
    ``run(setup())`` with the setup done before the measurement starts."""
    _reset_grads(grad_to_none)
    if setup is not None:
        state = setup()
        run = functools.partial(run, state)
        del state  # only ``run`` holds it, so it is freed when the backward frees it
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return torch.cuda.max_memory_allocated(device) - base, seconds
    return _peak_memory_cpu(run)


def _peak_memory_cpu(run) -> tuple[int, float]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        t0 = time.perf_counter()
        run()
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
    if isinstance(exc, (_OOM, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def release(device: torch.device, after_error: bool = False) -> None:
    """Return freed memory to the device. After an error, first collect the reference cycles
    of its traceback, which may hold the tensors of the failed call (a full collection takes
    a noticeable fraction of a second once torch.compile is loaded, so only then)."""
    if after_error:
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
