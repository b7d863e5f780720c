"""Host cost of one SupCon forward + backward: the Python, dispatch and autograd work around
the kernels, measured on the CPU with the Triton launches stubbed out (nothing runs on a
device, so what is timed is what the host spends per call).

    .venv/bin/python benchmarks/bench_host_cost.py --out benchmarks/results/host_cost_cpu.json

Two groups of candidates, each interleaved (one call of each per round), garbage collector
paused, median and 20/80 % quantiles of `--rounds` rounds after `--warmup`. Host cost only:
- `triton (launches stubbed)`: ``supcon_loss(f, y, backend="triton")`` + backward, with the
  module's single launch point replaced by a no-op (Triton's own launcher cost excluded);
- `autograd floor`: a ``torch.autograd.Function`` whose forward and backward only allocate
  their outputs, and its backward from a scalar: what any fused op pays torch's autograd
  before doing anything of its own;
Math included (a second group, so that their work does not evict the first group's caches):
- `eager` and `compile`: the reference loss eager and under ``torch.compile`` at the same
  small N on the CPU: an upper bound on their host cost.
The C++ backend (a third group, ``--cpp-n`` rows, 16 by default, where its kernels' work is
small): `cpu` (``backend="cpu"``, one op call each way) beside `eager` at that N.
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
from anchor_kernels.ops import supcon_triton  # noqa: E402
from benchmarks.host_timing import STATS_HEADER, arguments, cpu, interleaved_us, stats, write  # noqa: E402


class _Floor(torch.autograd.Function):
    """A fused op with no work: outputs allocated, nothing launched."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(ctx.shape)


def candidates(n: int, d: int, beta: float):
    """(host-only candidates, math-included candidates, the tensors whose .grad to reset)."""
    f = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, 10, (n,))

    def triton_stubbed():
        ak.supcon_loss(f, y, hard_positive_beta=beta, backend="triton").backward()

    def eager_loss(x):
        return reference.supcon_loss(x, y, hard_positive_beta=beta)

    compiled_loss = torch.compile(eager_loss)
    host = {"triton (launches stubbed)": triton_stubbed,
            "autograd floor": lambda: _Floor.apply(f).backward()}
    math = {"eager": lambda: eager_loss(f).backward(),
            "compile": lambda: compiled_loss(f).backward()}
    return host, math, (f,)


def cpp_candidates(n: int, d: int, beta: float):
    """The C++ backend and the eager reference at ``n`` rows, kernels included."""
    f = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, max(n // 4, 1), (n,))
    return {f"cpu, N={n}": lambda: ak.supcon_loss(f, y, hard_positive_beta=beta, backend="cpu").backward(),
            f"eager, N={n}": lambda: reference.supcon_loss(f, y, hard_positive_beta=beta).backward()}, (f,)


def measure(n: int, d: int, beta: float, rounds: int, warmup: int, cpp_n: int) -> dict:
    host, math, grads = candidates(n, d, beta)
    real_run = supcon_triton._run
    supcon_triton._run = lambda *args: None
    try:
        out = interleaved_us(host, rounds, warmup, grad_to_none=grads)
    finally:
        supcon_triton._run = real_run
    out.update(interleaved_us(math, rounds, warmup, grad_to_none=grads))
    if cpp_n:
        cpp, grads = cpp_candidates(cpp_n, d, beta)
        out.update(interleaved_us(cpp, rounds, warmup, grad_to_none=grads))
    return out


def main(argv=None) -> int:
    parser = arguments(__doc__, rounds=200, warmup=20, n=256, d=128)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--cpp-n", type=int, default=16, help="rows of the C++ group (0: none)")
    args = parser.parse_args(argv)
    results = {}
    print(f"host cost of one forward + backward, N={args.n}, D={args.d}, CPU ({cpu()})")
    print(f"{'beta':>5} {'candidate':28s} {STATS_HEADER}")
    for beta in args.betas:
        results[str(beta)] = measure(args.n, args.d, beta, args.rounds, args.warmup, args.cpp_n)
        for name, r in results[str(beta)].items():
            print(f"{beta:5.1f} {name:28s} {stats(r)}")
    if args.out:
        write(args.out, results, n=args.n, d=args.d, cpp_n=args.cpp_n, rounds=args.rounds,
              warmup=args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
