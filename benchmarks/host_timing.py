"""Host-side timing on the CPU shared by the host-cost benchmarks: candidates interleaved
(one call of each per round), garbage collector paused, median and 20/80 % quantiles in us,
and the JSON they write."""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def interleaved_us(fns: dict, rounds: int, warmup: int, reset: Callable[[], None] = lambda: None) -> dict:
    """``{name: {"median_us", "p20_us", "p80_us"}}``; ``reset`` runs before each call, untimed."""
    times = {name: [] for name in fns}
    gc.disable()
    try:
        for i in range(warmup + rounds):
            for name, fn in fns.items():
                reset()
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[name].append(elapsed * 1e6)
    finally:
        gc.enable()
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        out[name] = {"median_us": statistics.median(ts), "p20_us": q[1], "p80_us": q[7]}
    return out


def write(path: str, results: dict, **settings) -> None:
    """``{"meta": machine, versions, date and settings, "results": results}`` to ``path``."""
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), **settings}
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
