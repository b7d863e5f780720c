"""The sweep (every op x size x dtype x candidate x pass) and the largest-batch search.

Per (dtype, size), sizes in increasing order, each candidate in turn: the time of one
forward+backward call (and, with a memory cap, its peak) is first predicted from the smaller
sizes; then one call warms up (compiles, autotunes), one timed call is checked against
``max_call_s``, and each pass gets one call under the peak-memory probe. Then each pass is
timed for every candidate together, interleaved (``timing.bench_interleaved``), so that no
candidate's figure rests on the machine's state at its turn alone. A candidate that ran out of
memory, or went (or is predicted to go) over the time limit or the memory cap, is skipped at
the larger sizes of that dtype. Work past the time budget is recorded as skipped, so a
bounded run always writes its results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType

import torch

from . import timing
from .passes import grad_like, make_pass
from .records import PASSES, Candidate, Fit, Measurement, Problem, Settings


@dataclass(frozen=True)
class RunConfig:
    ops: tuple  # ((op module, options dict, sizes tuple), ...)
    device: torch.device
    dtypes: tuple  # torch dtypes
    passes: tuple = PASSES
    only: tuple | None = None  # candidate names to run (None: all)
    settings: Settings = field(default_factory=Settings)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_call_s: float = 2.0  # skip timing where one forward+backward call takes longer
    mem_cap_bytes: int | None = None  # CPU: never run what is predicted to exceed this
    time_budget_s: float = 600.0  # the whole sweep's
    fit: bool = True
    fit_max_n: int = 1 << 22
    fit_max_call_s: float = 5.0
    fit_budget_s: float = 120.0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def select(cands: list[Candidate], only) -> list[Candidate]:
    return [c for c in cands if only is None or c.name in only]


def _passes_of(cand: Candidate, passes) -> tuple:
    return passes if cand.differentiable else tuple(p for p in passes if p == "fwd")


class _Clock:
    """A deadline for one share of a budget; ``why`` says which, for the skipped rows."""

    def __init__(self, seconds: float, why: str):
        self.deadline = time.monotonic() + seconds
        self.why = why

    def over(self) -> bool:
        return time.monotonic() > self.deadline


def _shares(budget_s: float, parts: list, what: str):
    """Yield (part, clock): each part gets an equal share of what is left of the budget, so
    time one part leaves unused goes to the parts after it, and no part starves the rest."""
    deadline = time.monotonic() + budget_s
    for i, part in enumerate(parts):
        share = max(0.0, deadline - time.monotonic()) / (len(parts) - i)
        yield part, _Clock(share, f"its share ({share:.0f} s) of {what} ({budget_s:g} s) was "
                                  "used up")


class Sweep:
    """Runs the sweep; ``history`` keeps, per (op, candidate, dtype), the measured forward+
    backward (n, peak bytes, seconds of one call) that predict the next size's."""

    def __init__(self, cfg: RunConfig, progress=None):
        self.cfg = cfg
        self.progress = progress
        self.rows: list[Measurement] = []
        self.fits: list[Fit] = []
        self.history: dict = {}
        self.stopped: dict = {}  # (op, cand, dtype) -> why larger sizes are skipped

    # -- the sweep ---------------------------------------------------------------------------
    def discover(self, cands_by_op: dict) -> None:
        """Ask every candidate about a small problem before any clock starts: importing a
        backend may build it (the C++ extension compiles once, just in time), which is no
        part of a time budget."""
        if self.progress is not None:  # label the (possibly long) build as what it is
            self.progress.set_postfix_str("loading the backends (the first run builds the C++ "
                                          "extension, once)", refresh=True)
        for op, options, sizes in self.cfg.ops:
            for dtype in self.cfg.dtypes:
                p = op.make_problem(min(sizes), dtype, self.cfg.device, options)
                for cand in cands_by_op[op.NAME]:
                    try:
                        cand.reasons(p)
                    except Exception:  # recorded with its reason when the sweep asks again
                        pass

    def run_sweep(self, cands_by_op: dict) -> None:
        # The budget is shared between the (op, dtype) pairs (see _shares), so that none
        # starves the others; sizes in increasing order within a share.
        parts = [(op, options, sizes, dtype) for op, options, sizes in self.cfg.ops
                 for dtype in self.cfg.dtypes]
        for (op, options, sizes, dtype), clock in _shares(self.cfg.time_budget_s, parts,
                                                          "--time-budget"):
            for n in sorted(sizes):
                self._run_size(op, options, cands_by_op[op.NAME], n, dtype, clock)

    def _run_size(self, op: ModuleType, options, cands, n, dtype, clock) -> None:
        problem, why = None, ""
        if not clock.over():
            try:
                problem = op.make_problem(n, dtype, self.cfg.device, options)
            except Exception as exc:  # the inputs alone do not fit
                if not timing.is_oom(exc):
                    raise
                why = f"the inputs at n={n} do not fit in memory"
                timing.release(self.cfg.device, after_error=True)
        ready = []
        try:
            for cand in cands:
                self._tick(f"{op.NAME} {cand.name} n={n} {dtype_name(dtype)}")
                if clock.over():
                    self._skip_all(op, cand, n, dtype, options, f"not run: {clock.why}")
                elif problem is None:
                    self._record_all(op, cand, n, dtype, options, "oom", why)
                else:
                    unit = self._prepare(op, problem, cand)
                    if unit is not None:
                        ready.append(unit)
            for pass_ in self.cfg.passes:
                self._time_pass(op, problem, pass_, [u for u in ready if pass_ in u.runs])
        finally:
            for unit in ready:
                unit.release()
            del problem, ready
            timing.release(self.cfg.device)

    def _prepare(self, op, p: Problem, cand: Candidate) -> "_Unit | None":
        """Build, warm up, check the limits and probe each pass's peak memory: a unit ready to
        time with the others, or None (with its rows recorded) when it cannot be."""
        key = (op.NAME, cand.name, p.dtype)
        if key in self.stopped:
            return self._skip_all(op, cand, p.n, p.dtype, p, self.stopped[key])
        try:
            reasons = cand.reasons(p)
        except Exception as exc:
            reasons = [f"asking the backend failed: {type(exc).__name__}: {exc}"]
        if reasons:
            return self._record_all(op, cand, p.n, p.dtype, p, "unsupported", "; ".join(reasons))
        cap = self.cfg.mem_cap_bytes
        history = self.history.get(key, [])
        predicted = timing.grow([(n, peak) for n, peak, _ in history], p.n)
        if cap is not None and predicted is not None and predicted > cap:
            why = (f"predicted peak {predicted / 2**20:.0f} MiB at n={p.n} is over the memory "
                   f"cap {cap / 2**20:.0f} MiB (--mem-cap-gb)")
            self.stopped[key] = why
            return self._skip_all(op, cand, p.n, p.dtype, p, why)
        # Predicted before the warm-up, which may autotune for this size at many times the
        # cost of one call.
        predicted_s = timing.grow([(n, sec) for n, _, sec in history], p.n)
        if predicted_s is not None and predicted_s > self.cfg.max_call_s:
            why = (f"one call predicted to take {predicted_s:.2f} s at n={p.n}, over the "
                   f"--max-call-s limit of {self.cfg.max_call_s:g} s")
            self.stopped[key] = why
            return self._skip_all(op, cand, p.n, p.dtype, p, why)

        unit = _Unit(cand, key, _passes_of(cand, self.cfg.passes))
        full_name = "fwd+bwd" if cand.differentiable else "fwd"
        try:
            forward, unit.grads = cand.build(p)
            unit.forward = forward
            grad_out = grad_like(forward())
            full, _ = make_pass(forward, full_name, grad_out)
            full()  # warm-up: compiles and autotunes
            seconds = timing.time_call(full, p.device)
            unit.entry = [p.n, None, seconds]  # (n, forward+backward peak bytes, seconds)
            self.history.setdefault(key, []).append(unit.entry)
            if seconds > self.cfg.max_call_s:
                why = (f"one {full_name} call took {seconds:.2f} s at n={p.n}, over the "
                       f"--max-call-s limit of {self.cfg.max_call_s:g} s")
                self.stopped[key] = why
                unit.release()
                return self._skip_all(op, cand, p.n, p.dtype, p, why)
            for pass_ in unit.passes:
                run, setup = make_pass(forward, pass_, grad_out)
                peak, _ = timing.peak_memory(run, p.device, setup=setup, grad_to_none=unit.grads)
                unit.runs[pass_] = (timing.Contender(run, setup, unit.grads or ()), peak)
        except Exception as exc:
            self._failed(op, unit, p, exc)
            return None
        return unit

    def _time_pass(self, op, p: Problem, pass_: str, units: list) -> None:
        """Time one pass of every ready candidate, interleaved (timing.bench_interleaved)."""
        if not units:
            return
        results = timing.bench_interleaved(
            {i: u.runs[pass_][0] for i, u in enumerate(units)}, p.device,
            warmup_ms=self.cfg.warmup_ms, rep_ms=self.cfg.rep_ms, min_reps=self.cfg.min_reps)
        for i, unit in enumerate(units):
            t = results[i]
            if isinstance(t, BaseException):
                self._failed(op, unit, p, t)
                continue
            peak = unit.runs.pop(pass_)[1]
            if pass_ == ("fwd+bwd" if unit.cand.differentiable else "fwd"):
                # the median is steadier than the single call
                unit.entry[1], unit.entry[2] = peak, min(unit.entry[2], t.ms / 1e3)
            self._ok(op, unit.cand, p, pass_, t, peak)

    def _failed(self, op, unit: "_Unit", p: Problem, exc: BaseException) -> None:
        """Rows for the passes of ``unit`` not yet measured: "oom" (and the larger sizes
        skipped) or "error", with the exception's first line; the unit is released."""
        done = {r.pass_ for r in self.rows if (r.op, r.candidate, r.dtype, r.n) ==
                (op.NAME, unit.cand.name, dtype_name(p.dtype), p.n)}
        status = "oom" if timing.is_oom(exc) else "error"
        if status == "oom":
            self.stopped[unit.key] = f"out of memory at n={p.n}"
        for pass_ in unit.passes:
            if pass_ not in done:
                self.rows.append(_row(op, unit.cand, pass_, p.dtype, p, status, _one_line(exc)))
        unit.release()
        timing.release(p.device, after_error=True)

    # -- the largest batch that fits ---------------------------------------------------------
    def run_fit(self, cands_by_op: dict) -> None:
        parts = [(op, options, sizes, dtype) for op, options, sizes in self.cfg.ops
                 for dtype in self.cfg.dtypes]
        for (op, options, sizes, dtype), clock in _shares(self.cfg.fit_budget_s, parts,
                                                          "--fit-budget"):
            for cand in cands_by_op[op.NAME]:
                if cand.kind == "neighbour" or not cand.differentiable:
                    continue
                self._tick(f"fit {op.NAME} {cand.name} {dtype_name(dtype)}")
                self.fits.append(self._fit_one(op, options, min(sizes), dtype, cand, clock))

    def _fit_one(self, op, options, n, dtype, cand: Candidate, clock) -> Fit:
        cfg, probes = self.cfg, []
        largest = peak_at = sec_at = None

        def done(stopped, detail):
            return Fit(op.NAME, cand.name, cand.kind, dtype_name(dtype), options.get("d", 0),
                       largest, peak_at, sec_at, stopped, detail, tuple(probes))

        while True:
            if clock.over():
                return done("budget", f"n={n} not run: {clock.why}")
            points = [(q["n"], q["peak_mem_bytes"]) for q in probes]
            predicted = timing.grow(points, n)
            if cfg.mem_cap_bytes is not None and predicted is not None \
                    and predicted > cfg.mem_cap_bytes:
                return done("mem-cap", f"predicted peak {predicted / 2**20:.0f} MiB at n={n} is "
                                       f"over the cap {cfg.mem_cap_bytes / 2**20:.0f} MiB")
            # The first warm-up may hold a one-off compile: it does not predict the others.
            for what, points in (("call", [(q["n"], q["seconds"]) for q in probes]),
                                 ("warm-up", [(q["n"], q["warmup_s"]) for q in probes[1:]])):
                predicted_s = timing.grow(points, n)
                if predicted_s is not None and predicted_s > 2 * cfg.fit_max_call_s:
                    return done("time-limit", f"n={n} not run: its {what} is predicted to take "
                                              f"{predicted_s:.1f} s, over twice --fit-max-call-s "
                                              f"{cfg.fit_max_call_s:g} s")
            failure = None
            try:
                reasons, peak, seconds, warmup_s = self._probe(op, options, n, dtype, cand)
            except Exception as exc:
                failure = ("oom" if timing.is_oom(exc) else "error", f"n={n}: {_one_line(exc)}")
            # Outside the handler, where the failed call's frames can be collected.
            timing.release(cfg.device, after_error=failure is not None)
            if failure:
                probes.append({"n": n, "status": failure[0], "seconds": None, "warmup_s": None,
                               "peak_mem_bytes": None})
                return done(*failure)
            if reasons:
                return done("unsupported", "; ".join(reasons))
            probes.append({"n": n, "status": "ok", "seconds": seconds, "warmup_s": warmup_s,
                           "peak_mem_bytes": peak})
            if cfg.mem_cap_bytes is not None and peak > cfg.mem_cap_bytes:
                return done("mem-cap", f"n={n} took {peak / 2**20:.0f} MiB, over the cap "
                                       f"{cfg.mem_cap_bytes / 2**20:.0f} MiB")
            largest, peak_at, sec_at = n, peak, seconds
            if seconds > cfg.fit_max_call_s:
                return done("time-limit", f"one call took {seconds:.2f} s at n={n}, over "
                                          f"--fit-max-call-s {cfg.fit_max_call_s:g} s")
            if 2 * n > cfg.fit_max_n:
                return done("max-n", f"next size {2 * n} is over --fit-max-n {cfg.fit_max_n}")
            n *= 2

    def _probe(self, op, options, n, dtype, cand: Candidate):
        """(refusal reasons, peak bytes, seconds, warm-up seconds) of one forward+backward
        call at size n, after a warm-up call (compiling or autotuning for the new size)."""
        p = op.make_problem(n, dtype, self.cfg.device, options)
        reasons = cand.reasons(p)
        if reasons:
            return reasons, None, None, None
        forward, grads = cand.build(p)
        full, _ = make_pass(forward, "fwd+bwd", grad_like(forward()))
        warmup_s = timing.time_call(full, p.device)
        peak, seconds = timing.peak_memory(full, p.device, grad_to_none=grads)
        return [], peak, seconds, warmup_s

    # -- records -----------------------------------------------------------------------------
    def _tick(self, text: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(text, refresh=False)
            self.progress.update(1)

    def _ok(self, op, cand, p: Problem, pass_, t: timing.Timing, peak: int) -> None:
        w = (cand.work or op.work)(p, pass_)
        tflops = w.flops / (t.ms * 1e-3) / 1e12 if w.flops else None
        gbps = w.bytes / (t.ms * 1e-3) / 1e9 if w.bytes else None
        self.rows.append(Measurement(
            op.NAME, cand.name, cand.kind, pass_, dtype_name(p.dtype), p.n, p.m, p.d, "ok",
            ms=t.ms, ms_p20=t.p20, ms_p80=t.p80, reps=t.reps, tflops=tflops, gbps=gbps,
            peak_mem_bytes=int(peak)))

    def _record_all(self, op, cand, n, dtype, where, status, reason) -> None:
        for pass_ in _passes_of(cand, self.cfg.passes):
            self.rows.append(_row(op, cand, pass_, dtype, where, status, reason, n))

    def _skip_all(self, op, cand, n, dtype, where, reason) -> None:
        self._record_all(op, cand, n, dtype, where, "skipped", reason)


@dataclass
class _Unit:
    """One candidate at one size, built and warmed up: its passes' contenders and peaks."""
    cand: Candidate
    key: tuple
    passes: tuple
    forward: object = None
    grads: tuple | None = None
    entry: list | None = None
    runs: dict = field(default_factory=dict)  # pass -> (timing.Contender, peak bytes)

    def release(self) -> None:
        for x in self.grads or ():
            x.grad = None
        self.forward = self.grads = None
        self.runs.clear()


def _row(op, cand, pass_, dtype, where, status, reason, n=None) -> Measurement:
    """A row with no figures. ``where`` is the Problem, or the op's options when none exists."""
    if isinstance(where, Problem):
        n, m, d = where.n, where.m, where.d
    else:
        m, d = n, where.get("d", 0)
    return Measurement(op.NAME, cand.name, cand.kind, pass_, dtype_name(dtype), n, m, d,
                       status, reason)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
