"""Size rules of the Triton loss, measured: forward + backward of ``supcon_loss(backend="triton")``
on one GPU with the large-batch path (norm pre-pass, class sums) forced on and off, with only
the norm pre-pass forced on ("norms-first": per-logit labels, no class sums), with the
column-chunk count (``num_splits``) halved, doubled or set to 1, and the default captured in a
CUDA graph and replayed (what ``torch.compile(mode="reduce-overhead")`` users get: the GPU time
without the host's), at each N. Also the host's floor: a trivial autograd forward + backward
on a CUDA tensor.

With ``--profile``, the host side of the default path is profiled first (cProfile over 200
calls at the first N; the 30 costliest functions by cumulative and by own time are printed),
to show where a forward + backward's host time goes on that machine.

Candidates are interleaved (one timed batch of calls of each per round), garbage collector
paused, CUDA events around each batch; the median and 20/80 % quantiles of the per-call time
over ``--rounds`` rounds are printed and written as JSON.

    python scripts/supcon_tune.py --out tune.json
"""

import argparse
import contextlib
import cProfile
import gc
import json
import pstats
import statistics

import torch
import triton

import anchor_kernels as ak
from anchor_kernels.ops import supcon_triton as st

BASE_SPLITS = st.num_splits


@contextlib.contextmanager
def variant(streaming, splits, norms_first=None):
    """Patch the size rules for the duration of one candidate's calls."""
    saved = st.STREAMING_MIN_LOGITS, st.num_splits, st.NORMS_FIRST_MIN_LOGITS
    if streaming is not None:
        st.STREAMING_MIN_LOGITS = 0 if streaming else 1 << 62
    if norms_first is not None:
        st.NORMS_FIRST_MIN_LOGITS = 0 if norms_first else 1 << 62
    if splits is not None:
        st.num_splits = lambda r, c, dev: max(1, min(16, splits(BASE_SPLITS(r, c, dev))))
    try:
        yield
    finally:
        st.STREAMING_MIN_LOGITS, st.num_splits, st.NORMS_FIRST_MIN_LOGITS = saved


CANDIDATES = {
    "default": (None, None),
    "streaming": (True, None),
    "one-launch": (False, None, False),
    "norms-first": (False, None, True),
    "splits=1": (None, lambda s: 1),
    "splits/2": (None, lambda s: s // 2),
    "splits*2": (None, lambda s: s * 2),
    "graph": (None, None),
}
SMALL = 16384  # above this N, the split rule does not apply (one chunk): those are not timed


def graphed(step):
    """``step`` captured once in a CUDA graph (after a warm-up on a side stream, as torch asks);
    returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def timed(fn, calls):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def host_floor(rounds, calls):
    """ms of ``(x * 2).sum().backward()`` on a 16-element CUDA tensor: autograd's own cost."""
    x = torch.ones(16, device="cuda", requires_grad=True)
    for _ in range(10):
        (x * 2).sum().backward()
    return statistics.median(timed(lambda: (x * 2).sum().backward(), calls) for _ in range(rounds))


def profile_host(n, d, beta, dev, calls=200):
    f = torch.randn(n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 10, (n,), device=dev)

    def call():
        ak.supcon_loss(f, y, hard_positive_beta=beta, backend="triton").backward()
        f.grad = None

    for _ in range(10):
        call()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    prof.disable()
    print(f"host profile: {calls} forward + backward calls at N={n} (times are totals)")
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof).sort_stats(key).print_stats(30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=5, help="calls per timed batch")
    p.add_argument("--profile", action="store_true", help="profile the host side first")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.profile:
        profile_host(args.n[0], args.d, args.beta, dev)
    results = []
    for n in args.n:
        f = torch.randn(n, args.d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, 10, (n,), device=dev)

        def call():
            ak.supcon_loss(f, y, hard_positive_beta=args.beta, backend="triton").backward()
            f.grad = None

        names = [c for c in CANDIDATES if c != "graph" and (n <= SMALL or not c.startswith("splits"))]
        runs = {}
        for name in names:  # warm-up: compile and autotune each
            with variant(*CANDIDATES[name]):
                for _ in range(3):
                    call()
            runs[name] = call
        try:
            runs["graph"] = graphed(lambda: torch.autograd.grad(
                ak.supcon_loss(f, y, hard_positive_beta=args.beta, backend="triton"), f))
        except Exception as exc:  # reported, not fatal: the other candidates still count
            print(f"N={n}: CUDA graph capture failed: {type(exc).__name__}: {exc}")
            del runs["graph"]
        torch.cuda.synchronize()
        calls = max(1, min(args.calls, int(args.calls * (16384 / n) ** 2) or 1))
        times = {name: [] for name in runs}
        gc.disable()
        for _ in range(args.rounds):
            for name, run in runs.items():
                with variant(*CANDIDATES[name]):
                    times[name].append(timed(run, calls))
        gc.enable()
        row = {"n": n, "splits_default": BASE_SPLITS(n, n, dev), "streaming_default": st.is_streaming(n, n)}
        for name, t in times.items():
            q = statistics.quantiles(t, n=5)
            row[name] = {"ms": statistics.median(t), "p20": q[0], "p80": q[3], "reps": len(t) * calls}
        results.append(row)
    floor = host_floor(args.rounds, 20)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "d": args.d, "beta": args.beta, "dtype": "bfloat16", "pass": "fwd+bwd",
           "host_floor_ms": floor}
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | bf16 D={args.d} "
          f"beta={args.beta}: fwd+bwd ms, median of {args.rounds} interleaved rounds x {args.calls} calls")
    print(f"{'N':>7} {'splits':>6} " + " ".join(f"{c:>11}" for c in CANDIDATES))
    for row in results:
        print(f"{row['n']:>7} {row['splits_default']:>6} " + " ".join(
            f"{row[c]['ms']:>11.4f}" if c in row else f"{'-':>11}" for c in CANDIDATES))
    print(f"host floor, (x * 2).sum().backward() on a CUDA tensor: {floor:.4f} ms")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
