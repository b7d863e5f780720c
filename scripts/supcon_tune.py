"""Size rules of the Triton loss, measured: forward + backward of ``supcon_loss(backend="triton")``
on one GPU with the large-batch path (norm pre-pass, class sums) forced on and off, and with the
column-chunk count (``num_splits``) halved, doubled or set to 1, at each N.

Candidates are interleaved (one timed batch of calls of each per round), garbage collector
paused, CUDA events around each batch; the median and 20/80 % quantiles of the per-call time
over ``--rounds`` rounds are printed and written as JSON.

    python scripts/supcon_tune.py --out tune.json
"""

import argparse
import contextlib
import gc
import json
import statistics

import torch
import triton

import anchor_kernels as ak
from anchor_kernels.ops import supcon_triton as st

BASE_SPLITS = st.num_splits


@contextlib.contextmanager
def variant(streaming, splits):
    """Patch the two size rules for the duration of one candidate's calls."""
    saved = st.STREAMING_MIN_LOGITS, st.num_splits
    if streaming is not None:
        st.STREAMING_MIN_LOGITS = 0 if streaming else 1 << 62
    if splits is not None:
        st.num_splits = lambda r, c, dev: max(1, min(16, splits(BASE_SPLITS(r, c, dev))))
    try:
        yield
    finally:
        st.STREAMING_MIN_LOGITS, st.num_splits = saved


CANDIDATES = {
    "default": (None, None),
    "streaming": (True, None),
    "one-launch": (False, None),
    "splits=1": (None, lambda s: 1),
    "splits/2": (None, lambda s: s // 2),
    "splits*2": (None, lambda s: s * 2),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=5, help="calls per timed batch")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    results = []
    for n in args.n:
        f = torch.randn(n, args.d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, 10, (n,), device=dev)

        def call():
            ak.supcon_loss(f, y, hard_positive_beta=args.beta, backend="triton").backward()
            f.grad = None

        for streaming, splits in CANDIDATES.values():  # warm-up: compile and autotune each
            with variant(streaming, splits):
                for _ in range(3):
                    call()
        torch.cuda.synchronize()
        times = {name: [] for name in CANDIDATES}
        gc.disable()
        for _ in range(args.rounds):
            for name, (streaming, splits) in CANDIDATES.items():
                with variant(streaming, splits):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(args.calls):
                        call()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) / args.calls)
        gc.enable()
        row = {"n": n, "splits_default": BASE_SPLITS(n, n, dev), "streaming_default": st.is_streaming(n, n)}
        for name, t in times.items():
            q = statistics.quantiles(t, n=5)
            row[name] = {"ms": statistics.median(t), "p20": q[0], "p80": q[3], "reps": len(t) * args.calls}
        results.append(row)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "d": args.d, "beta": args.beta, "dtype": "bfloat16", "pass": "fwd+bwd"}
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | bf16 D={args.d} "
          f"beta={args.beta}: fwd+bwd ms, median of {args.rounds} interleaved rounds x {args.calls} calls")
    print(f"{'N':>7} {'splits':>6} " + " ".join(f"{c:>11}" for c in CANDIDATES))
    for row in results:
        print(f"{row['n']:>7} {row['splits_default']:>6} " + " ".join(f"{row[c]['ms']:>11.4f}" for c in CANDIDATES))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
