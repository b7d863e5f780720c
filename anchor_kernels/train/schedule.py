"""Learning rate per optimiser step: linear warm-up, then cosine, step or constant.

A pure function of the step number, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

STEP_MILESTONES = (0.5, 0.75)  # fractions of the run where "step" divides the rate by 10


def lr_at(step: int, total_steps: int, peak: float, schedule: str = "cosine",
          warmup_steps: int = 0) -> float:
    """Rate for optimiser step ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return peak * 0.1 ** sum(t >= m for m in STEP_MILESTONES)
    if schedule == "constant":
        return peak
    raise ValueError(f"--lr-schedule must be cosine, step or constant, got {schedule!r}")
