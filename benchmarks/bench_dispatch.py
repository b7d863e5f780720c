"""What each way of exposing a forward/backward kernel pair to PyTorch costs the host, on the
CPU: one forward + ``.backward()`` through each wrapper, with kernels that only allocate their
outputs (the same schema as the Triton loss's two ops), so what is timed is the wrapper.

    .venv/bin/python benchmarks/bench_dispatch.py --out benchmarks/results/dispatch_cpu.json

Wrappers, interleaved (one call of each per round), garbage collector paused, median and
20/80 % quantiles of ``--rounds`` rounds after ``--warmup``:
- ``autograd.Function, direct``: the function calls the implementations itself (the Triton
  loss's plain eager path);
- ``autograd.Function over Library ops``: it calls ``torch.ops`` ops made with
  ``Library.define`` / ``impl`` (the loss's path under tracing and dispatch modes);
- ``Library.define + register_autograd``: the same ops, autograd registered on the op;
- ``custom_op + register_autograd``: ``torch.library.custom_op`` ops;
- ``floor``: ``(x * 2).sum().backward()``, what any autograd forward + backward costs.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.host_timing import STATS_HEADER, arguments, cpu, interleaved_us, stats, write  # noqa: E402

SCHEMA_FWD = ("(Tensor f, Tensor? g, Tensor y_f, Tensor? y_g, int self_offset, float temperature, "
              "float beta, float scale, bool normalize, bool lse_only, int reduction) -> (Tensor, Tensor)")
SCHEMA_BWD = ("(Tensor grad, Tensor f, Tensor? g, Tensor y_f, Tensor? y_g, Tensor ws, int self_offset, "
              "float temperature, float beta, float scale, bool normalize, bool lse_only, bool exact, "
              "int reduction) -> (Tensor, Tensor)")
ARGS = (None, None, 256, 0.1, 0.0, 1.0, True, False, 2)  # g, y_g and the forward's scalars
BWD_SCALARS = ARGS[2:8] + (False, 2)


def fwd_impl(f, g, y_f, y_g, *scalars):
    return f.new_empty((), dtype=torch.float32), f.new_empty(6 * f.shape[0] + 1, dtype=torch.float32)


def bwd_impl(grad, f, g, y_f, y_g, ws, *scalars):
    return torch.empty_like(f), f.new_empty(0)


_lib = torch.library.Library("akbench", "DEF")
for name in ("ld", "ldra"):
    _lib.define(f"fwd_{name}{SCHEMA_FWD}")
    _lib.define(f"bwd_{name}{SCHEMA_BWD}")
    for key in ("CPU", "CUDA"):
        _lib.impl(f"fwd_{name}", fwd_impl, key)
        _lib.impl(f"bwd_{name}", bwd_impl, key)


def _function(fwd, bwd):
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, f, y, *args):
            loss, ws = fwd(f, None, y, None, *ARGS[2:])
            ctx.save_for_backward(f, y, ws)
            ctx.set_materialize_grads(False)
            ctx.mark_non_differentiable(ws)
            return loss, ws

        @staticmethod
        def backward(ctx, grad, _):
            f, y, ws = ctx.saved_tensors
            df, _ = bwd(grad, f, None, y, None, ws, *BWD_SCALARS)
            return (df, None) + (None,) * len(ARGS)
    return lambda f, y: Fn.apply(f, y, *ARGS)[0]


def _setup(ctx, inputs, output):
    f, _, y = inputs[:3]
    ctx.save_for_backward(f, y, output[1])


def _register(op_name: str, bwd):
    def backward(ctx, grad, _):
        f, y, ws = ctx.saved_tensors
        df, _ = bwd(grad, f, None, y, None, ws, *BWD_SCALARS)
        return (df,) + (None,) * 10
    torch.library.register_autograd(op_name, backward, setup_context=_setup)


_register("akbench::fwd_ldra", torch.ops.akbench.bwd_ldra)


@torch.library.custom_op("akbench::fwd_co", mutates_args=())
def fwd_co(f: Tensor, g: Optional[Tensor], y_f: Tensor, y_g: Optional[Tensor], self_offset: int,
           temperature: float, beta: float, scale: float, normalize: bool, lse_only: bool,
           reduction: int) -> tuple[Tensor, Tensor]:
    return fwd_impl(f, g, y_f, y_g)


@torch.library.custom_op("akbench::bwd_co", mutates_args=())
def bwd_co(grad: Tensor, f: Tensor, g: Optional[Tensor], y_f: Tensor, y_g: Optional[Tensor],
           ws: Tensor, self_offset: int, temperature: float, beta: float, scale: float,
           normalize: bool, lse_only: bool, exact: bool, reduction: int) -> tuple[Tensor, Tensor]:
    return bwd_impl(grad, f, g, y_f, y_g, ws)


_register("akbench::fwd_co", bwd_co)


def candidates(n: int, d: int) -> tuple[dict, Tensor]:
    f = torch.randn(n, d, requires_grad=True)
    y = torch.randint(0, 10, (n,))
    x = torch.ones(16, requires_grad=True)
    direct = _function(fwd_impl, bwd_impl)
    over_ops = _function(torch.ops.akbench.fwd_ld, torch.ops.akbench.bwd_ld)

    def op_with_autograd(op):
        return lambda: op(f, None, y, None, *ARGS[2:])[0].backward()
    return {"autograd.Function, direct": lambda: direct(f, y).backward(),
            "autograd.Function over Library ops": lambda: over_ops(f, y).backward(),
            "Library.define + register_autograd": op_with_autograd(torch.ops.akbench.fwd_ldra),
            "custom_op + register_autograd": op_with_autograd(torch.ops.akbench.fwd_co),
            "floor: (x * 2).sum().backward()": lambda: (x * 2).sum().backward()}, f


def measure(n: int, d: int, rounds: int, warmup: int) -> dict:
    fns, f = candidates(n, d)
    return interleaved_us(fns, rounds, warmup, grad_to_none=(f,))


def main(argv=None) -> int:
    args = arguments(__doc__, rounds=2000, warmup=100, n=256, d=128).parse_args(argv)
    results = measure(args.n, args.d, args.rounds, args.warmup)
    print(f"host cost of one forward + backward per wrapper, CPU ({cpu()}), torch {torch.__version__}")
    print(f"{'wrapper':38s} {STATS_HEADER}")
    for name, r in results.items():
        print(f"{name:38s} {stats(r)}")
    if args.out:
        write(args.out, results, n=args.n, d=args.d, rounds=args.rounds, warmup=args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
