"""The ops the runner knows. Adding an op is adding a module here and one line to ``OPS``.

Each op module defines:

- ``NAME``: the op's stem (``supcon``, ``similarity``, ``hard_positive``, ``pgd``, ``clip``,
  ``attack``);
- ``SIZE_LABEL``: what the swept size ``n`` is (the plot's x axis);
- ``OPTIONS``: the op's settings and their defaults (``--set <op>.<key>=<value>`` overrides);
  an op with a feature dimension calls it ``d`` (``--dim`` sets it);
- ``sizes(device_type, quick) -> tuple[int, ...]``: default sizes for ``"cpu"`` / ``"cuda"``;
- ``make_problem(n, dtype, device, options) -> records.Problem``;
- ``candidates(device, options, settings) -> list[records.Candidate]``: every
  backend of the op (asked from anchor_kernels, not hard-coded), the eager and compiled
  baselines, and any roofline neighbour; a candidate that cannot run says why in ``reasons``;
- ``work(problem, pass_) -> records.Work``: the flop (or byte) count of each pass.
"""

from __future__ import annotations

import importlib
from types import ModuleType

OPS = {
    "supcon": "benchmarks.ops.supcon",
    "similarity": "benchmarks.ops.similarity",
    "hard_positive": "benchmarks.ops.hard_positive",
    "pgd": "benchmarks.ops.pgd",
    "clip": "benchmarks.ops.clip",
    "attack": "benchmarks.ops.attack",
}


def load(name: str) -> ModuleType:
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(OPS)}")
    return importlib.import_module(OPS[name])
