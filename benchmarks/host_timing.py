"""Host-side timing on the CPU shared by the host-cost benchmarks: the runner's interleaved
timer with one call of each candidate per round, in us, the columns of their tables, and the
JSON they write."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from typing import Sequence

import torch

from . import timing


def interleaved_us(fns: dict, rounds: int, warmup: int, grad_to_none: Sequence[torch.Tensor] = ()) -> dict:
    """``{name: {"median_us", "p20_us", "p80_us"}}`` of ``rounds`` rounds, each timing one call
    of every function in turn (``timing.bench_interleaved``), after ``warmup`` such rounds;
    the gradients of ``grad_to_none`` are reset before each call, untimed."""
    for _ in range(warmup):
        for fn in fns.values():
            timing._reset_grads(grad_to_none)
            fn()
    out = timing.bench_interleaved(
        {name: timing.Contender(fn, grad_to_none=grad_to_none) for name, fn in fns.items()},
        torch.device("cpu"), warmup_ms=0.0, rep_ms=0.0, min_reps=rounds, rounds=rounds,
        max_reps=rounds)
    for t in out.values():
        if isinstance(t, BaseException):
            raise t
    return {name: {"median_us": t.ms * 1e3, "p20_us": t.p20 * 1e3, "p80_us": t.p80 * 1e3}
            for name, t in out.items()}


def arguments(doc: str, rounds: int, warmup: int, **sizes: int) -> argparse.ArgumentParser:
    """The command line every host-cost script shares: ``--rounds``, ``--warmup``, ``--out``
    and one int option per entry of ``sizes`` (``n=256`` gives ``--n``, default 256)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in sizes.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--out", default=None, help="JSON path for the results")
    return parser


class NoLaunch:
    """Stands in for a Triton JIT kernel: ``kernel[grid](...)`` calls ``run`` as Triton's does,
    and ``run`` launches nothing, so that what is timed is the host's work around it."""

    def run(self, *args, **kwargs):
        return None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


def cpu() -> str:
    """The machine the timings ran on, for a table's title."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


STATS_HEADER = f"{'median us':>10} {'p20':>8} {'p80':>8}"


def stats(r: dict) -> str:
    """One candidate's timing columns (an ``interleaved_us`` entry), under STATS_HEADER."""
    return f"{r['median_us']:10.1f} {r['p20_us']:8.1f} {r['p80_us']:8.1f}"


def write(path: str, results: dict, **settings) -> None:
    """``{"meta": machine, versions, date and settings, "results": results}`` to ``path``."""
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), **settings}
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
