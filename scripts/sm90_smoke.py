"""Every variant of the Hopper (sm_90a) SupCon kernels run once against the sm_80 kernels and
the float64 reference, each in its turn under a time limit, so that one that hangs is named
and the others still run: dtype (bf16, fp16, float32 as TF32) x mode (log-sum-exp only,
SupCon, soft mining detached and exact) x one set or two x fixed shifts or running maxima
(temperature 0.1 or 0.02). Prints a table: the case, whether the Hopper kernels ran (the
forward's and the backward's names in the profile), the seconds, and the largest error of the
loss and of the gradients (anchors, and contrast rows with two sets) against the cpu backend
in float64, for the Hopper and the sm_80 kernels.

    python scripts/sm90_smoke.py [--n 1000] [--d 120] [--timeout 60] [--json out.json]

A worker process runs the cases in order and reports each as it starts and ends; when one
does not end within --timeout seconds, or ends in an error, or the worker dies, that case is
reported so and a new worker goes on with the next.
"""

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {"lse-only": dict(lse_only=True), "supcon": dict(beta=0.0),
         "soft": dict(beta=1.5), "soft-exact": dict(beta=1.5, detach_weights=False)}
CASES = list(itertools.product(("bfloat16", "float16", "tfloat32"), MODES,
                               ("one-set", "two-sets"), ("fixed", "running")))


def _run_case(case, n, d):
    """(ran on sm90, [loss, grads] errors of the Hopper kernels, the same of the sm_80 ones),
    errors as max |a - ref| / (1 + max |ref|) against the cpu backend in float64."""
    import torch

    from anchor_kernels.backends import SupConProblem, get_backend

    dtype, mode, sets, shift = case
    opts = MODES[mode]
    # float32 rows run as TF32 where torch allows TF32 matmuls (as torch.matmul's do)
    torch.set_float32_matmul_precision("high" if dtype == "tfloat32" else "highest")
    dt = torch.float32 if dtype == "tfloat32" else getattr(torch, dtype)
    tau = 0.1 if shift == "fixed" else 0.02
    gen = torch.Generator(device="cuda").manual_seed(0)
    g = torch.randn(n, d, device="cuda", generator=gen)
    y_g = torch.randint(0, 10, (n,), device="cuda", generator=gen)
    if sets == "one-set":
        f, y_f, c, y_c, offset = g, y_g, None, None, 0
    else:  # rows 200.. of the contrast set are the anchors (a distributed process's shape)
        f, y_f, c, y_c, offset = g[200:200 + n // 3], y_g[200:200 + n // 3], g, y_g, 200

    def run(backend, dt):
        device = "cpu" if backend == "cpu" else "cuda"
        if backend != "cpu":
            os.environ["ANCHOR_KERNELS_CUDA_KERNELS"] = backend
        leaves = [t.to(device, dt).requires_grad_() for t in (f, c) if t is not None]
        to = lambda t: None if t is None else t.to(device)
        problem = SupConProblem(leaves[0], to(y_f), leaves[1] if c is not None else None, to(y_c),
                                tau, opts.get("beta", 0.0), None, opts.get("detach_weights", True),
                                True, offset, lse_only=opts.get("lse_only", False))
        loss, _ = get_backend("cpu" if backend == "cpu" else "cuda").per_anchor(problem)
        weights = torch.linspace(0.5, 1.5, loss.shape[0], device=device, dtype=torch.float64)
        (loss.double() * weights).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return [loss.detach().double().cpu()] + [t.grad.double().cpu() for t in leaves]

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        hopper = run("sm90", dt)
    names = [e.name for e in prof.events()]
    ran = all(any(f"supcon_{way}_sm90_kernel" in k for k in names) for way in ("fwd", "bwd"))
    sm80 = run("sm80", dt)
    ref = run("cpu", torch.float64)
    rel = lambda a, b: (a - b).abs().max().item() / (1 + b.abs().max().item())
    err = lambda out: [rel(out[0], ref[0]), max(rel(a, b) for a, b in zip(out[1:], ref[1:]))]
    return ran, err(hopper), err(sm80)


def _worker(case_fn, cases, n, d, conn):
    """Runs the cases in order, sending each one's start and result (a pipe's send is
    synchronous: what was sent survives the process). Ends at the first error, which may have
    left the CUDA context unusable: the next case gets a fresh process."""
    for case in cases:
        conn.send(("start", case, None))
        try:
            conn.send(("done", case, case_fn(case, n, d)))
        except Exception as exc:
            conn.send(("error", case, f"{type(exc).__name__}: {exc}"[:300]))
            return


def run_all(cases, n, d, timeout, case_fn=None):
    """{case: (result, value, seconds)}: case_fn(case, n, d) (default: the Hopper check) for
    every case, in a worker process that is replaced when it hangs (killed after ``timeout``
    seconds), dies or reports an error. case_fn must be importable by the worker."""
    ctx = mp.get_context("spawn")
    results, todo = {}, list(cases)
    while todo:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(case_fn or _run_case, todo, n, d, child), daemon=True)
        proc.start()
        child.close()
        current, started = None, time.time()
        while True:
            if not parent.poll(1.0):
                if current is not None and time.time() - started > timeout:
                    proc.kill()
                    results[current] = ("hang", f"no result after {timeout:.0f} s", time.time() - started)
                    print(f"{' '.join(current)}: hang", flush=True)
                    break
                continue
            try:
                kind, case, value = parent.recv()
            except EOFError:  # the worker ended: all done, after an error, or it died
                if current is None or current not in results:  # died in a case, or before one
                    lost = current or todo[0]
                    results[lost] = ("worker died", f"exit code {proc.exitcode}", time.time() - started)
                break
            if kind == "start":
                current, started = case, time.time()
                continue
            results[case] = (kind, value, time.time() - started)
            print(f"{' '.join(case)}: {kind} {value}", flush=True)
        proc.join(timeout=5)
        todo = [c for c in todo if c not in results]
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--d", type=int, default=120)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = run_all(CASES, args.n, args.d, args.timeout)

    rows = []
    print(f"\n{'case':44} {'sm90 ran':>8} {'s':>5} {'sm90 loss':>10} {'sm90 grad':>10} "
          f"{'sm80 loss':>10} {'sm80 grad':>10}")
    for case in CASES:
        kind, value, secs = results.get(case, ("not run", None, 0.0))
        name = " ".join(case)
        if kind == "done":
            ran, hopper, sm80 = value
            print(f"{name:44} {str(ran):>8} {secs:5.1f} {hopper[0]:10.2e} {hopper[1]:10.2e} "
                  f"{sm80[0]:10.2e} {sm80[1]:10.2e}")
        else:
            print(f"{name:44} {kind}: {value}")
        rows.append(dict(case=name, result=kind, seconds=secs, value=value))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
