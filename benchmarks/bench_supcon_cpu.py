"""The C++ CPU SupCon loss against eager PyTorch and torch.compile'd eager: forward + backward,
D = 128, N in 1024, 4096, 8192, float32, 10 classes, time and peak memory.

    .venv/bin/python -m pytest benchmarks/bench_supcon_cpu.py --benchmark-only     # pytest-benchmark
    .venv/bin/python benchmarks/bench_supcon_cpu.py --out benchmarks/results/supcon_cpu   # table

Time: median wall time of `rounds` calls of loss.backward() after one warm-up call (which
also compiles, for the compiled baseline), inputs reused, gradients cleared between calls.

Peak memory: how much the resident set grows during one forward + backward, measured in a
fresh process per (backend, N): after a warm-up call, Linux's peak-RSS counter (VmHWM) is
reset through /proc/self/clear_refs and read again after the call. glibc's mmap threshold is
fixed at 64 KiB in that process (MALLOC_MMAP_THRESHOLD_), so freed buffers leave the resident
set instead of being cached in the heap; the number is then the peak of live allocations
(torch tensors, the kernel's per-thread tiles, inductor's buffers) above the inputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import anchor_kernels as ak  # noqa: E402
from anchor_kernels import reference  # noqa: E402

D = 128
NS = (1024, 4096, 8192)
BACKENDS = ("cpu", "eager", "compiled")
CLASSES = 10
TEMPERATURE = 0.1


def make_inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, D, generator=gen).requires_grad_()
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return f, y


def loss_fn(backend: str, y, beta: float = 0.0):
    """features (N, D) -> scalar loss for one of BACKENDS."""
    if backend == "compiled":
        return torch.compile(lambda f: reference.supcon_loss(f, y, temperature=TEMPERATURE,
                                                             hard_positive_beta=beta))
    return lambda f: ak.supcon_loss(f, y, temperature=TEMPERATURE, hard_positive_beta=beta,
                                    backend=backend)


def step(fn, f):
    f.grad = None
    fn(f).backward()


def rounds_for(backend: str, n: int) -> int:
    return 10 if backend == "cpu" or n <= 1024 else 3


def time_backend(backend: str, n: int, rounds: int, beta: float = 0.0) -> list[float]:
    f, y = make_inputs(n)
    fn = loss_fn(backend, y, beta)
    step(fn, f)  # warm-up (and compilation)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step(fn, f)
        times.append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_memory_here(backend: str, n: int, beta: float) -> float:
    """MiB the resident set grows by during one forward + backward (see the module docstring)."""
    f, y = make_inputs(n)
    fn = loss_fn(backend, y, beta)
    step(fn, f)
    f.grad = None
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn(f).backward()
    return (_status_kib("VmHWM") - before) / 1024


def peak_memory_mib(backend: str, n: int, beta: float = 0.0) -> float | None:
    """Runs _peak_memory_here in a fresh process; None where /proc/self/clear_refs is missing."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--peak-memory", backend, str(n), str(beta)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                python=platform.python_version(), load_average=os.getloadavg(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# ---------------------------------------------------------------------------------------
# pytest-benchmark entry points

try:
    import pytest
except ImportError:  # the table runner does not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("n", NS)
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_supcon_cpu_fwd_bwd(benchmark, backend, n):
        f, y = make_inputs(n)
        fn = loss_fn(backend, y)
        benchmark.group = f"supcon fwd+bwd N={n} D={D}"
        benchmark.extra_info["peak_mib"] = peak_memory_mib(backend, n)
        benchmark.pedantic(step, args=(fn, f), rounds=rounds_for(backend, n), warmup_rounds=1,
                           iterations=1)


# ---------------------------------------------------------------------------------------
# Table runner


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=list(NS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
    parser.add_argument("--peak-memory", nargs=3, metavar=("BACKEND", "N", "BETA"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory:
        backend, n, beta = args.peak_memory
        print(_peak_memory_here(backend, int(n), float(beta)))
        return

    meta = machine_info()
    rows = []
    for n in args.n:
        for backend in args.backends:
            times = time_backend(backend, n, rounds_for(backend, n), args.beta)
            row = dict(n=n, d=D, backend=backend, beta=args.beta, rounds=len(times),
                       median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
                       max_ms=1e3 * max(times), peak_mib=peak_memory_mib(backend, n, args.beta))
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta["load_average_after"] = os.getloadavg()
    table = format_table(meta, rows)
    print(table)
    if args.out:
        with open(args.out + ".json", "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
        with open(args.out + ".md", "w") as fh:
            fh.write(table + "\n")


def format_table(meta: dict, rows: list[dict]) -> str:
    by = {(r["n"], r["backend"]): r for r in rows}
    lines = [
        f"SupCon loss forward + backward on CPU, D={D}, float32, {CLASSES} classes, "
        f"beta={rows[0]['beta'] if rows else 0}",
        f"{meta['cpu']}, {meta['cores']} cores ({meta['torch_threads']} torch threads), "
        f"torch {meta['torch']} ({meta['cpu_capability']}), {meta['date']}, "
        f"load average {meta['load_average'][0]:.1f} before / "
        f"{meta.get('load_average_after', meta['load_average'])[0]:.1f} after",
        "",
        "| N | backend | median ms (min-max) | speed-up vs eager | peak extra MiB | memory vs eager |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        eager = by.get((r["n"], "eager"))
        speed = f"{eager['median_ms'] / r['median_ms']:.1f}x" if eager else "-"
        mem = "-"
        if eager and eager["peak_mib"] and r["peak_mib"] is not None:
            mem = f"{r['peak_mib'] / eager['peak_mib']:.3f}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(f"| {r['n']} | {r['backend']} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-"
                     f"{r['max_ms']:.1f}) | {speed} | {peak} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
