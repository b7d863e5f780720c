"""Host cost of launching the SupCon loss's Triton kernels, without a GPU: the Python between
the launcher and Triton's own ``JITFunction.run``, which is stubbed out (so Triton's binder and
driver launch are not timed).

    .venv/bin/python benchmarks/bench_launch.py --out benchmarks/results/launch_cpu.json

Candidates per kernel (forward, backward; bf16, one set, N = D = 128, as the loss calls
them), interleaved, garbage collector paused, median and 20/80 % quantiles:
- ``autotuner``: ``triton.autotune``'s ``run`` with its choice already cached, as every launch
  paid before the launch plans kept the choice;
- ``plan's direct call``: ``supcon_triton._launch`` after a plan's first launch, which calls
  the kernel with the remembered configuration.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from anchor_kernels.ops import supcon_triton as st  # noqa: E402
from benchmarks.host_timing import NoLaunch, STATS_HEADER, arguments, cpu, interleaved_us, stats, write  # noqa: E402


def candidates(kernel: str, n: int, d: int) -> dict:
    if st.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: this times the GPU launch path")
    f = torch.randn(n, d, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (n,))
    ws = torch.empty(st.ws_size(n, n, True))
    common = (n, n, d, f.stride(), f.stride(), f.dtype, "tf32", torch.device("cpu"), True, n,
              0.1, 0.0, 1.0, True, False)
    if kernel == "fwd":
        *_, grid, tail, cx, chosen = st._fwd_plan(
            *common, 2, (st.num_splits, st.STREAMING_MIN_LOGITS, st.NORMS_FIRST_MIN_LOGITS))
        args = (f, f, y, y, ws, ws, ws, ws, ws) + tail
    else:
        _, _, grid, tail, cx, chosen = st._bwd_plan(*common, True, 2, (st.num_splits,))
        args = (f, f, y, y, ws, ws, f, f, ws, ws) + tail
    tuner = st._autotuned[(kernel, "half")]
    tuner.fn = st._KERNELS[kernel] = NoLaunch()  # this process launches nothing
    # the autotuner's choice cached under its key (Triton 3.6's: the key arguments' values,
    # then every tensor argument's dtype), as after a first, tuned launch
    named = dict(zip(tuner.arg_names, args))
    key = tuple([named[k] for k in tuner.keys if k in named] + [cx[k] for k in tuner.keys if k in cx]
                + [str(a.dtype) for a in named.values() if hasattr(a, "dtype")])
    tuner.cache[key] = st.configs_for(kernel, torch.bfloat16, False, True)[0]
    chosen[0] = dict(cx, **tuner.cache[key].all_kwargs())
    return {"autotuner": lambda: st._run(tuner, grid, args, cx),
            "plan's direct call": lambda: st._launch(kernel, torch.bfloat16, grid, args, cx, chosen)}


def main(argv=None) -> int:
    args = arguments(__doc__, rounds=1000, warmup=50, n=128, d=128).parse_args(argv)
    results = {}
    print(f"host cost of one launch, kernel run stubbed, CPU ({cpu()})")
    print(f"{'kernel':>6} {'candidate':20s} {STATS_HEADER}")
    for kernel in ("fwd", "bwd"):
        results[kernel] = interleaved_us(candidates(kernel, args.n, args.d), args.rounds, args.warmup)
        for name, r in results[kernel].items():
            print(f"{kernel:>6} {name:20s} {stats(r)}")
    if args.out:
        write(args.out, results, n=args.n, d=args.d, rounds=args.rounds, warmup=args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
