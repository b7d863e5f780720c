"""Host cost of one PGD step, on the CPU with the Triton kernel's launch stubbed out: what
the attack loop pays per step around the kernel.

    .venv/bin/python benchmarks/bench_pgd_host.py --out benchmarks/results/pgd_host_cpu.json

Candidates, interleaved, garbage collector paused, median and 20/80 % quantiles:
- ``pgd_step (launch stubbed)``: ``anchor_kernels.pgd_step(..., backend="triton")``, argument
  checks included, as the attack calls it;
- ``registered op (launch stubbed)``: the ``torch.library.custom_op`` it registers for
  torch.compile, called alone (what a step cost when every call went through it);
- ``eager ops``: the five torch ops of the textbook step on the same small batch, math
  included (an upper bound on their host cost).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the Triton backend (stubbed below)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import anchor_kernels as ak  # noqa: E402
from anchor_kernels.ops import pgd_triton  # noqa: E402
from benchmarks.host_timing import NoLaunch, STATS_HEADER, arguments, cpu, interleaved_us, stats, write  # noqa: E402


def candidates(batch: int, eps: float = 8 / 255, alpha: float = 2 / 255) -> dict:
    x = torch.rand(batch, 3, 32, 32)
    x_adv, grad = x.clone(), torch.randn_like(x)

    def eager():
        with torch.no_grad():
            torch.clamp(torch.min(torch.max(x_adv + alpha * grad.sign(), x - eps), x + eps), 0, 1)

    return {"pgd_step (launch stubbed)":
            lambda: ak.pgd_step(x_adv, grad, x, eps, alpha, backend="triton"),
            "registered op (launch stubbed)":
            lambda: torch.ops.anchor_kernels.pgd_step_triton(x_adv, grad, x, None, None, eps, alpha,
                                                             0.0, 1.0),
            "eager ops": eager}


def main(argv=None) -> int:
    args = arguments(__doc__, rounds=1000, warmup=50, batch=8).parse_args(argv)
    real = pgd_triton._pgd_step_linf_kernel
    pgd_triton._pgd_step_linf_kernel = NoLaunch()
    try:
        results = interleaved_us(candidates(args.batch), args.rounds, args.warmup)
    finally:
        pgd_triton._pgd_step_linf_kernel = real
    print(f"host cost of one L-inf PGD step, batch {args.batch} x 3 x 32 x 32, CPU ({cpu()})")
    print(f"{'candidate':32s} {STATS_HEADER}")
    for name, r in results.items():
        print(f"{name:32s} {stats(r)}")
    if args.out:
        write(args.out, results, batch=args.batch, rounds=args.rounds, warmup=args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
