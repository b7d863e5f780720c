"""Forward and forward+backward time of the SupCon loss on a GPU: every fused backend that
can run against eager PyTorch and torch.compile'd eager, median of triton.testing.do_bench
after warm-up, with peak memory and achieved TFLOP/s (2 M N D forward, 4 M N D backward).

    python benchmarks/supcon_gpu_table.py --out results.json
"""

import argparse
import datetime
import json

import torch
import triton
from triton.testing import do_bench

import anchor_kernels as ak
from anchor_kernels import reference


def measure(fn, grad_to_none):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        q = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return q, (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda", "eager", "compiled"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in args.n:
        f = torch.randn(n, args.d, device="cuda", dtype=dtype, requires_grad=True)
        y = torch.randint(0, 100, (n,), device="cuda")
        for backend in args.backends:
            if backend == "compiled":
                loss_fn = torch.compile(lambda x: reference.supcon_loss(
                    x, y, temperature=0.1, hard_positive_beta=args.beta))
            else:
                reasons = ak.available_backends(ak.backends.SupConProblem(
                    f, y, None, None, 0.1, args.beta, None, True, True, 0)).get(backend, ["unknown"])
                if reasons:
                    rows.append(dict(n=n, backend=backend, skipped="; ".join(reasons)))
                    continue
                loss_fn = lambda x, b=backend: ak.supcon_loss(  # noqa: E731
                    x, y, temperature=0.1, hard_positive_beta=args.beta, backend=b)

            def fwd():
                with torch.no_grad():
                    loss_fn(f)

            def fwd_bwd():
                loss_fn(f).backward()

            row = dict(n=n, d=args.d, dtype=args.dtype, beta=args.beta, backend=backend)
            for name, fn, flops in (("fwd", fwd, 2), ("fwd_bwd", fwd_bwd, 6)):
                result = measure(fn, [f])
                if result is None:
                    row[name] = "OOM"
                    continue
                (med, lo, hi), mem = result
                row.update({f"{name}_ms": med, f"{name}_ms_q20": lo, f"{name}_ms_q80": hi,
                            f"{name}_peak_mib": mem,
                            f"{name}_tflops": flops * n * n * args.d / med / 1e9})
            rows.append(row)
            print(json.dumps(row), flush=True)
        del f
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {args.dtype} D={args.d} beta={args.beta}")
    print(f"{'N':>7} {'backend':>9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'peak MiB':>9}")
    for r in rows:
        if "skipped" in r:
            continue
        fb = r.get("fwd_bwd_ms")
        print(f"{r['n']:>7} {r['backend']:>9} {r.get('fwd_ms', r.get('fwd')) if not isinstance(r.get('fwd_ms'), float) else round(r['fwd_ms'], 3):>9} "
              f"{round(fb, 3) if isinstance(fb, float) else r.get('fwd_bwd'):>11} "
              f"{round(r['fwd_bwd_tflops'], 1) if 'fwd_bwd_tflops' in r else '-':>8} "
              f"{round(r['fwd_bwd_peak_mib']) if 'fwd_bwd_peak_mib' in r else '-':>9}")


if __name__ == "__main__":
    main()
