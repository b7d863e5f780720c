"""Host cost of a Triton ``pairwise_similarity`` forward + backward and of a Triton
``hard_positive_mining``: the Python, dispatch and autograd work around their kernels, on the
CPU with every Triton kernel's launch stubbed out.

    .venv/bin/python benchmarks/bench_similarity_host.py --out benchmarks/results/similarity_host_cpu.json

Candidates, interleaved (one call of each per round), garbage collector paused, median and
20/80 % quantiles of ``--rounds`` rounds after ``--warmup``, bf16 rows of D = 128:
- ``similarity fwd+bwd (launches stubbed)``: ``pairwise_similarity(a, b, backend="triton")``
  and its backward to both inputs, two sets of ``--n`` rows;
- ``selection (launches stubbed)``: ``hard_positive_mining(z, y, 4, backend="triton")``;
- ``autograd floor``: a ``torch.autograd.Function`` that only allocates its output and its
  gradient: what any fused op pays torch's autograd before doing anything of its own;
- ``eager similarity fwd+bwd`` and ``eager selection``: ``anchor_kernels.reference`` on the
  same inputs, math included (an upper bound on their host cost).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the Triton backend (stubbed below)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import anchor_kernels as ak  # noqa: E402
from anchor_kernels import reference  # noqa: E402
from anchor_kernels.ops import hard_positive_triton, similarity_triton  # noqa: E402
from benchmarks.bench_host_cost import _Floor  # noqa: E402
from benchmarks.host_timing import NoLaunch, STATS_HEADER, arguments, cpu, interleaved_us, stats, write  # noqa: E402

# Every kernel the two ops can launch, by module.
KERNELS = {similarity_triton: ["_similarity_fwd_kernel", "_similarity_bwd_kernel", "_norm_bwd_kernel"],
           hard_positive_triton: ["_hard_positive_kernel"]}


def _stub_kernels() -> list:
    """Replace every kernel (and the row pass's, where the ops have one) by ``NoLaunch``;
    returns what to restore."""
    try:
        from anchor_kernels.ops import rows_triton
        kernels = {**KERNELS, rows_triton: ["_row_pass_kernel"]}
    except ImportError:
        kernels = KERNELS
    saved = [(module, name, getattr(module, name)) for module, names in kernels.items() for name in names]
    for module, name, _ in saved:
        setattr(module, name, NoLaunch())
    return saved


def candidates(n: int, d: int):
    """(host-only candidates, math-included candidates, the tensors whose .grad to reset)."""
    a = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    z, y = a.detach(), torch.randint(0, max(n // 8, 1), (n,))

    def similarity(fn):
        return lambda: fn(a, b).backward(torch.ones(n, n, dtype=torch.bfloat16))

    host = {"similarity fwd+bwd (launches stubbed)":
            similarity(lambda a, b: ak.pairwise_similarity(a, b, backend="triton")),
            "selection (launches stubbed)": lambda: ak.hard_positive_mining(z, y, 4, backend="triton"),
            "autograd floor": lambda: _Floor.apply(a).backward()}
    math = {"eager similarity fwd+bwd": similarity(reference.pairwise_similarity),
            "eager selection": lambda: reference.hard_positive_mining(z, y, 4)}
    return host, math, (a, b)


def main(argv=None) -> int:
    args = arguments(__doc__, rounds=400, warmup=20, n=64, d=128).parse_args(argv)
    host, math, grads = candidates(args.n, args.d)
    saved = _stub_kernels()
    try:
        results = interleaved_us(host, args.rounds, args.warmup, grad_to_none=grads)
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    results.update(interleaved_us(math, args.rounds, args.warmup, grad_to_none=grads))
    print(f"host cost, bf16, two sets of N={args.n} rows, D={args.d}, CPU ({cpu()})")
    print(f"{'candidate':40s} {STATS_HEADER}")
    for name, r in results.items():
        print(f"{name:40s} {stats(r)}")
    if args.out:
        write(args.out, results, n=args.n, d=args.d, rounds=args.rounds, warmup=args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
