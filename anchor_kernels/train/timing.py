"""Per-section step timing that does not stall the GPU.

On CUDA each section records a pair of events and nothing waits for them until ``totals()``
(called once per log interval or epoch), so timing does not serialise the host with the
device. On the CPU the work is synchronous and ``perf_counter`` is exact.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class SectionTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """Seconds per section since the last ``reset`` (waits for recorded CUDA events)."""
        for name, start, end in self.pending:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1e3
        self.pending.clear()
        return dict(self.seconds)

    def reset(self) -> None:
        self.pending.clear()
        self.seconds.clear()
