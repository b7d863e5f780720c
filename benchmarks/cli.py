"""``python -m benchmarks``: time every op's backends against eager PyTorch, torch.compile and
(on CUDA) flash attention; write JSON + CSV + PNG and print a table.

Presets: ``--quick`` (the loss, small sizes: under two minutes on a 2-core CPU; ``--ops`` adds
the others), ``--gpu-sweep`` (the loss on one GPU: N = 512 .. 131072, D = 128, bf16 and fp32,
plus the largest-batch search, bounded to about four and a half minutes). Explicit arguments
override a preset.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import presets

def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="short run of the loss at small sizes (--ops for the others)")
    mode.add_argument("--gpu-sweep", action="store_true",
                      help="supcon sweep on CUDA: N 1024..131072, D 128, bf16 + fp32, <= ~4.5 min")
    mode.add_argument("--list", action="store_true", help="list ops and candidates, then exit")
    mode.add_argument("--replot", metavar="JSON", type=Path,
                      help="re-plot and re-print a results file, run nothing")
    p.add_argument("--ops", nargs="+", help="ops to run (default: all registered)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if present")
    p.add_argument("--sizes", nargs="+", type=_positive(int), metavar="N",
                   help="batch sizes (default: the op's, per device)")
    p.add_argument("--dim", type=_positive(int), help="feature dimension D (default 128)")
    p.add_argument("--dtypes", nargs="+", help="fp32, bf16, fp16, fp64 (default: fp32 on "
                                                "cpu, bf16 on cuda)")
    p.add_argument("--passes", nargs="+", help="fwd, bwd, fwd+bwd (default: all)")
    p.add_argument("--candidates", nargs="+", help="only these candidates (e.g. eager compile)")
    p.add_argument("--set", action="append", default=[], metavar="OP.KEY=VALUE",
                   help="an op option, e.g. supcon.beta=1.0 (see --list)")
    p.add_argument("--warmup-ms", type=_positive(float), help="warm-up per measurement")
    p.add_argument("--rep-ms", type=_positive(float), help="timed duration per measurement")
    p.add_argument("--min-reps", type=_positive(int), help="fewest timed calls (default 5 on CPU, 20 on CUDA)")
    p.add_argument("--max-call-s", type=_positive(float),
                   help="skip timing a candidate once one call takes longer")
    p.add_argument("--mem-cap-gb", type=_positive(float),
                   help="never run what is predicted to allocate more (default 4 on cpu)")
    p.add_argument("--time-budget", type=_positive(float), metavar="S",
                   help="seconds for the sweep, shared between ops and dtypes; work past a "
                        "share is recorded as skipped")
    p.add_argument("--threads", type=_positive(int),
                   help="CPU threads for torch (default: torch's, usually one per core)")
    p.add_argument("--no-fit", action="store_true", help="skip the largest-batch search")
    p.add_argument("--fit-max-n", type=_positive(int), help="largest N the search tries")
    p.add_argument("--fit-max-call-s", type=_positive(float),
                   help="the search stops after a call (or warm-up) this long")
    p.add_argument("--fit-budget", type=_positive(float), metavar="S",
                   help="seconds for the largest-batch search")
    p.add_argument("--compile-shapes", choices=("dynamic", "static"), default="dynamic",
                   help="torch.compile(dynamic=True), one graph for all sizes (default), or "
                        "one graph per size")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled baseline (default inductor; "
                        "aot_eager traces without code generation, for quick checks)")
    p.add_argument("--float32-matmul-precision", choices=("highest", "high", "medium"),
                   help="torch.set_float32_matmul_precision for the run: 'high' lets every "
                        "candidate multiply float32 in TF32 on GPU (default: torch's, 'highest')")
    p.add_argument("--include-interpreter", action="store_true",
                   help="also time Triton under TRITON_INTERPRET=1 (labelled; CPU only)")
    p.add_argument("--out", type=Path, metavar="PATH.json",
                   help="results file, or a folder for the default name; the CSV and PNG go "
                        "next to it (default: benchmarks/results/<ops>-<mode>-<device>.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    out_dir = None
    if args.out is not None and (args.out.is_dir() or str(args.out).endswith("/")):
        out_dir, args.out = args.out, None
    if args.out is not None and args.out.suffix != ".json":
        p.error(f"argument --out: must name a .json file or a folder, got {str(args.out)!r}")
    if args.replot is not None:
        return _replot(p, args)

    import torch

    device = torch.device(_device_type(p, args))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.float32_matmul_precision:  # every candidate's float32 products follow it
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    s = presets.merge(args, device.type)
    modules, dtypes, passes = _choices(p, args, s)
    options = _options(p, args, s, modules)

    from . import results, runner
    from .records import Settings

    settings = Settings(include_interpreter=args.include_interpreter,
                        compile_dynamic=args.compile_shapes == "dynamic",
                        compile_backend=args.compile_backend)
    cands = {m.NAME: m.candidates(device, options[m.NAME], settings) for m in modules}
    only = tuple(presets.split(args.candidates)) or None
    known = {c.name for cs in cands.values() for c in cs}
    for name in only or ():
        if name not in known:
            p.error(f"argument --candidates: unknown candidate {name!r}; known on {device.type}: "
                    f"{', '.join(sorted(known))}")
    if args.list:
        return _list(modules, options, cands, device)

    cfg = runner.RunConfig(
        ops=tuple((m, options[m.NAME], tuple(s.get("sizes") or m.sizes(device.type,
                                                                      bool(args.quick))))
                  for m in modules),
        device=device, dtypes=dtypes, passes=passes, only=only, settings=settings,
        warmup_ms=s["warmup_ms"], rep_ms=s["rep_ms"], min_reps=s["min_reps"],
        max_call_s=s["max_call_s"],
        mem_cap_bytes=int(s["mem_cap_gb"] * 2**30) if s["mem_cap_gb"] else None,
        time_budget_s=s["time_budget"], fit=not args.no_fit, fit_max_n=s["fit_max_n"],
        fit_max_call_s=s["fit_max_call_s"], fit_budget_s=s["fit_budget"])
    chosen = {name: runner.select(cs, only) for name, cs in cands.items()}
    out = args.out or _default_out(out_dir or presets.RESULTS_DIR, [m.NAME for m in modules],
                                   s["preset"], results.slug(results.device_name(device)))
    doc = _run(cfg, chosen, progress=not args.no_progress, preset=s["preset"], argv=argv)
    _write(doc, out, plot=not args.no_plot)
    return 0


def _device_type(p, args) -> str:
    import torch

    if args.gpu_sweep and args.device == "cpu":
        p.error("argument --gpu-sweep: needs --device cuda (or no --device)")
    device_type = args.device or ("cuda" if torch.cuda.is_available() or args.gpu_sweep
                                  else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument {'--gpu-sweep' if args.gpu_sweep else '--device'}: no CUDA device "
                "is available on this machine")
    if args.include_interpreter:
        if device_type == "cuda":
            p.error("argument --include-interpreter: only for --device cpu (on CUDA Triton "
                    "compiles)")
        # The interpreter is chosen when triton.jit decorates the kernels, so before
        # anchor_kernels is imported (by the op modules).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device_type


def _choices(p, args, s: dict) -> tuple:
    """(op modules, dtypes, passes), each checked against what exists."""
    import torch

    from . import ops as registry
    from .records import PASSES

    op_names = s.get("ops") or list(registry.OPS)
    for name in op_names:
        if name not in registry.OPS:
            p.error(f"argument --ops: unknown op {name!r}; known: {', '.join(registry.OPS)}")
    dtypes = []
    for name in s["dtypes"]:
        if name not in presets.DTYPES:
            p.error(f"argument --dtypes: unknown dtype {name!r}; choose from {', '.join(presets.DTYPES)}")
        dtypes.append(getattr(torch, presets.DTYPES[name]))
    passes = tuple(presets.split(args.passes)) or PASSES
    for name in passes:
        if name not in PASSES:
            p.error(f"argument --passes: unknown pass {name!r}; choose from {', '.join(PASSES)}")
    modules = []
    for name in op_names:
        try:
            modules.append(registry.load(name))
        except ImportError as exc:  # an op whose library part is missing or broken
            if s.get("ops"):
                p.error(f"argument --ops: op {name!r} cannot be loaded: {exc}")
            print(f"skipping op {name!r}: it cannot be loaded: {exc}", file=sys.stderr)
    return modules, tuple(dtypes), passes


def _options(p, args, s: dict, modules) -> dict:
    """Each op's options: its defaults, then --dim, then every --set."""
    options = {m.NAME: dict(m.OPTIONS) for m in modules}
    for name in (n for n in options if s.get("dim") and "d" in options[n]):
        options[name]["d"] = s["dim"]
    for item in args.set:
        _apply_option(p, options, item)
    return options


def _write(doc: dict, out: Path, plot: bool) -> None:
    from . import results

    results.write_json(doc, out)  # before the schema check: a bug there loses no figures
    results.validate(doc)
    results.write_csv(doc, out.with_suffix(".csv"))
    written = [out, out.with_suffix(".csv")]
    if plot:
        from .plot import plot as draw
        written.append(draw(doc, out.with_suffix(".png")))
    print(results.table(doc))
    if doc["meta"]["interrupted"]:
        print("\ninterrupted: the results hold what was measured before Ctrl-C or SIGTERM")
    print("\nwrote " + ", ".join(map(str, written)))


def _run(cfg, chosen: dict, progress: bool, preset, argv: list[str]) -> dict:
    import torch
    from tqdm import tqdm

    from . import results, runner

    fit_units = sum(1 for cs in chosen.values() for c in cs
                    if c.kind != "neighbour" and c.differentiable) * len(cfg.dtypes)
    total = sum(len(sizes) * len(cfg.dtypes) * len(chosen[m.NAME]) for m, _, sizes in cfg.ops)
    with tqdm(total=total + (fit_units if cfg.fit else 0), disable=not progress,
              desc="benchmarks", unit="case", dynamic_ncols=True) as bar:
        sweep = runner.Sweep(cfg, bar)
        interrupted = False
        # `timeout` and job schedulers stop with SIGTERM: treat it as Ctrl-C, keeping the results.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            sweep.discover(chosen)
            sweep.run_sweep(chosen)
            if cfg.fit:
                sweep.run_fit(chosen)
        except KeyboardInterrupt:  # keep what was measured
            interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous)
    config = {
        "preset": preset,
        "ops": {m.NAME: {"options": opts, "sizes": list(sizes), "size_label": m.SIZE_LABEL}
                for m, opts, sizes in cfg.ops},
        "dtypes": [runner.dtype_name(d) for d in cfg.dtypes], "passes": list(cfg.passes),
        "candidates": list(cfg.only) if cfg.only else None,
        "include_interpreter": cfg.settings.include_interpreter,
        "compile_dynamic": cfg.settings.compile_dynamic,
        "compile_backend": cfg.settings.compile_backend,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        **{k: getattr(cfg, k) for k in ("warmup_ms", "rep_ms", "min_reps", "max_call_s",
                                        "mem_cap_bytes", "time_budget_s", "fit", "fit_max_n",
                                        "fit_max_call_s", "fit_budget_s")},
    }
    described = {op: [{"name": c.name, "kind": c.kind, "note": c.note} for c in cs]
                 for op, cs in chosen.items()}
    meta = {**results.environment(cfg.device, argv), "interrupted": interrupted}
    return results.document(meta, config, described, sweep.rows, sweep.fits)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _apply_option(p, options: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    op, dot, name = key.partition(".")
    if not (sep and dot):
        p.error(f"argument --set: expected OP.KEY=VALUE, got {item!r}")
    if op not in options or name not in options[op]:
        known = ", ".join(f"{o}.{k}" for o in options for k in options[o])
        p.error(f"argument --set: unknown option {key!r}; known: {known}")
    default = options[op][name]
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            value = text.lower() in ("true", "1")
        else:
            value = type(default)(text)
    except ValueError:
        p.error(f"argument --set: {key} must be a {type(default).__name__}, got {text!r}")
    options[op][name] = value


def _default_out(folder: Path, op_names, preset, device_slug: str) -> Path:
    mode = {"quick": "quick", "gpu_sweep": "sweep"}.get(preset, "run")
    return folder / f"{'-'.join(op_names)}-{mode}-{device_slug}.json"


def _list(modules, options, cands, device) -> int:
    for m in modules:
        size = m.sizes(device.type, True)[0]
        problem = m.make_problem(size, _list_dtype(device), device, options[m.NAME])
        print(f"{m.NAME}: {m.SIZE_LABEL}; options {options[m.NAME]}")
        for c in cands[m.NAME]:
            reasons = c.reasons(problem)
            state = "runs" if not reasons else "cannot run: " + "; ".join(reasons)
            print(f"  {c.name:22s} {c.kind:11s} {state}\n  {'':22s} {c.note}")
    return 0


def _list_dtype(device):
    import torch
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _replot(p, args) -> int:
    import json

    from . import results
    from .plot import plot

    try:
        doc = json.loads(args.replot.read_text())
        results.validate(doc)
    except (OSError, ValueError) as exc:
        p.error(f"argument --replot: {args.replot}: {exc}")
    print(results.table(doc))
    if not args.no_plot:
        print(f"\nwrote {plot(doc, (args.out or args.replot).with_suffix('.png'))}")
    return 0
