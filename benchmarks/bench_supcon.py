"""pytest-benchmark suite of the supcon loss: every candidate of ``benchmarks/ops/supcon.py``
(anchor_kernels backends, eager, torch.compile, and on CUDA flash attention), one group per
(pass, dtype, N, D), so the group tables and ``--benchmark-compare`` put fused and eager side
by side. Peak memory of one call goes to ``extra_info``.

    .venv/bin/python -m pytest benchmarks/bench_supcon.py --benchmark-autosave
    .venv/bin/python -m pytest benchmarks/bench_supcon.py --benchmark-compare
"""

import pytest
import torch

from benchmarks import timing
from benchmarks.ops import supcon
from benchmarks.passes import grad_like, make_pass
from benchmarks.records import PASSES, Settings
from benchmarks.results import device_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = {"cpu": (1024, 2048), "cuda": (4096, 16384)}[DEVICE.type]
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)}[DEVICE.type]
OPTIONS = dict(supcon.OPTIONS)
CANDIDATES = supcon.candidates(DEVICE, OPTIONS, Settings())
TARGET_S = 0.5  # timed seconds per benchmark


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("candidate", CANDIDATES, ids=lambda c: c.name)
def test_supcon(benchmark, candidate, n, dtype, pass_):
    problem = supcon.make_problem(n, dtype, DEVICE, OPTIONS)
    reasons = candidate.reasons(problem)
    if reasons:
        pytest.skip("; ".join(reasons))
    forward, grads = candidate.build(problem)
    run, make_state = make_pass(forward, pass_, grad_like(forward()))

    def setup():
        for t in grads:
            t.grad = None
        state = make_state() if make_state else None
        timing.synchronize(DEVICE)  # nothing from the setup runs inside the timed call
        return ((state,) if make_state else ()), {}

    def timed(*state):
        run(*state)
        timing.synchronize(DEVICE)

    timed(*setup()[0])  # compile / autotune
    estimate = timing.time_call(lambda: timed(*setup()[0]), DEVICE)
    peak, _ = timing.peak_memory(run, DEVICE, setup=make_state, grad_to_none=grads)
    benchmark.group = f"supcon {pass_} {str(dtype).replace('torch.', '')} N={n} D={problem.d}"
    benchmark.extra_info.update(candidate=candidate.name, kind=candidate.kind,
                                peak_mem_bytes=peak, device=device_name(DEVICE))
    benchmark.pedantic(timed, setup=setup, warmup_rounds=1, iterations=1,
                       rounds=max(5, min(200, int(TARGET_S / max(estimate, 1e-6)))))

