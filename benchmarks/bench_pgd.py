"""Speed of the fused PGD step and random start (the whole attack is an op of the benchmark
runner: ``python -m benchmarks --ops attack``, interleaved with torchattacks and the model's
bare passes).

1. Step kernel against the eager update, in GB/s. The update is memory-bound, so the bytes
   are the minimum any implementation must move: read x_adv, grad, x and write x_adv
   (4 tensors) for the step, read x and write x_adv (2) for the random start. Baselines:
   "eager" is the unfused torchattacks update
   (``x_adv + alpha sign(g)``, ``clamp(x_adv - x, -eps, eps)``, ``clamp(x + delta, 0, 1)``),
   "compiled" is ``torch.compile`` of the reference formula.

Command line (prints a table, writes JSON with device, versions and date):

    python benchmarks/bench_pgd.py --gpu --out benchmarks/results/pgd_h100.json
    python benchmarks/bench_pgd.py            # CPU: eager, compiled, cpu backends

pytest-benchmark suite (CPU, or GPU when present): ``pytest benchmarks/bench_pgd.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anchor_kernels as ak  # noqa: E402
from anchor_kernels import pgd as P  # noqa: E402
from anchor_kernels import reference  # noqa: E402

GPU_SHAPES = ((512, 3, 32, 32), (8192, 3, 32, 32), (256, 3, 224, 224))
CPU_SHAPES = ((512, 3, 32, 32), (4096, 3, 32, 32))


# ---------------------------------------------------------------------------------------
# timing


def bench_ms(fn, device: str, reps: int = 100) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of fn() after warm-up."""
    if device == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=25, rep=reps, quantiles=[0.5, 0.2, 0.8]))
    for _ in range(3):
        fn()
    times = []
    deadline = time.perf_counter() + 2.0
    while len(times) < 5 or (len(times) < reps and time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def eager_step(x_adv, grad, x, eps, alpha):
    """The unfused update users run today (torchattacks' PGD), in place on x_adv."""
    stepped = x_adv + alpha * grad.sign()
    delta = torch.clamp(stepped - x, min=-eps, max=eps)
    x_adv.copy_(torch.clamp(x + delta, min=0, max=1))


_compiled_ref = None


def compiled_step(x_adv, grad, x, eps, alpha):
    global _compiled_ref
    if _compiled_ref is None:
        _compiled_ref = torch.compile(reference.pgd_step)
    x_adv.copy_(_compiled_ref(x_adv, grad, x, eps, alpha))


def step_fn(backend: str):
    if backend == "eager":
        return eager_step
    if backend == "compiled":
        return compiled_step
    return lambda x_adv, grad, x, eps, alpha: ak.pgd_step(x_adv, grad, x, eps, alpha, backend=backend)


def start_fn(backend: str):
    if backend == "eager":  # torchattacks: uniform noise, then clamp
        return lambda x, eps: torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)
    if backend == "compiled":
        return None
    return lambda x, eps: ak.pgd_random_start(x, eps, seed=1234, backend=backend)


def runnable(backend: str, x: torch.Tensor) -> str | None:
    if backend in ("eager", "compiled"):
        return None
    reasons = P.available_backends(x)[backend]
    return "; ".join(reasons) if reasons else None


def step_rows(shapes, dtypes, backends, device):
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            x = torch.rand(shape, device=device).to(dtype)
            grad = torch.randn(shape, device=device).to(dtype)
            x_adv = x.clone()
            for backend in backends:
                skip = runnable(backend, x)
                row = dict(op="step", shape=list(shape), dtype=str(dtype).split(".")[-1],
                           backend=backend)
                if skip:
                    rows.append({**row, "skipped": skip})
                    continue
                fn = step_fn(backend)
                ms = bench_ms(lambda: fn(x_adv, grad, x, 8 / 255, 2 / 255), device)
                nbytes = 4 * x.numel() * x.element_size()
                rows.append({**row, "ms": ms[0], "ms_q20": ms[1], "ms_q80": ms[2],
                             "gb_s": nbytes / ms[0] / 1e6})
                sfn = start_fn(backend)
                if sfn is not None:
                    ms = bench_ms(lambda: sfn(x, 8 / 255), device)
                    nbytes = 2 * x.numel() * x.element_size()
                    rows.append({**row, "op": "random_start", "ms": ms[0], "ms_q20": ms[1],
                                 "ms_q80": ms[2], "gb_s": nbytes / ms[0] / 1e6})
            del x, grad, x_adv
    return rows


# ---------------------------------------------------------------------------------------
# command line


def print_table(rows, meta):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta.get('triton')}")
    print(f"{'op':>13} {'shape':>18} {'dtype':>9} {'backend':>9} {'ms':>9} {'GB/s':>8}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        if "skipped" in r:
            print(f"{r['op']:>13} {shape:>18} {r['dtype']:>9} {r['backend']:>9}   skipped: {r['skipped'][:60]}")
        else:
            print(f"{r['op']:>13} {shape:>18} {r['dtype']:>9} {r['backend']:>9} {r['ms']:>9.4f} {r['gb_s']:>8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="benchmark on CUDA")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu given but no CUDA device is visible")
    backends = args.backends or (["triton", "cuda", "eager", "compiled"] if args.gpu
                                 else ["cpu", "eager", "compiled"])
    shapes = GPU_SHAPES if args.gpu else CPU_SHAPES
    rows = step_rows(shapes, [getattr(torch, d) for d in args.dtypes], backends, device)
    meta = dict(device=torch.cuda.get_device_name() if args.gpu else f"cpu ({os.cpu_count()} cores)",
                torch=torch.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print_table(rows, meta)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    return rows


# ---------------------------------------------------------------------------------------
# pytest-benchmark


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH_BACKENDS = ["triton", "cuda", "eager"] if DEVICE == "cuda" else ["cpu", "eager"]


@pytest.mark.parametrize("backend", BENCH_BACKENDS)
@pytest.mark.parametrize("shape", [(512, 3, 32, 32), (8192, 3, 32, 32)])
def test_step(benchmark, backend, shape):
    x = torch.rand(shape, device=DEVICE)
    grad, x_adv = torch.randn_like(x), x.clone()
    skip = runnable(backend, x)
    if skip:
        pytest.skip(skip)
    fn = step_fn(backend)

    def run():
        fn(x_adv, grad, x, 8 / 255, 2 / 255)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = 4 * x.numel() * x.element_size() / benchmark.stats["median"] / 1e9


if __name__ == "__main__":
    main()
