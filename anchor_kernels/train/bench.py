"""Throughput of the trainer's own step, per loss backend: images/s of the ANCHOR step (PGD
view, 2B-image forward, hard-mined SupCon + CE, backward, SGD) on synthetic CIFAR-sized data,
beside the same step written the way people write it today ("conventional":
torchattacks' PGD, the eager loss, AMP autocast, NCHW; ``anchor_kernels/train/baseline.py``).

    python -m anchor_kernels.train.bench --batch 512 4096 --loss-backend conventional eager triton

For each batch size and backend: the same initial weights and batches, ``--warmup`` steps,
then ``--steps`` timed steps between two device synchronisations; the trainer's step is also
split into attack / model forward+backward / loss (forward and backward) with CUDA events.
``--attack-graph off on`` also times each backend with the attack replayed from a CUDA graph
(rows "+graph"). The speed-up column is against the conventional step where it ran, else
against eager (without the graph). Writes a
JSON and a CSV (device, versions, date) next to ``--out``. Throughput does not depend on the
pixel values, so synthetic data is enough.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import sys
import time

import torch

from ..backends import BACKEND_NAMES
from .augment import random_crop_flip
from .baseline import conventional_step
from .config import METHODS, TrainConfig
from .methods import STEPS, StepContext, build_attack, make_supcon
from .models import AnchorNet
from .timing import SectionTimer


CONVENTIONAL = "conventional"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m anchor_kernels.train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[512, 4096],
                   help="batch sizes B (2B rows in the loss)")
    p.add_argument("--loss-backend", nargs="+", default=["conventional", "eager", "triton"],
                   choices=(CONVENTIONAL, *BACKEND_NAMES),
                   help=f"'{CONVENTIONAL}': the baseline step (torchattacks, eager loss, AMP)")
    p.add_argument("--pgd-backend", default="auto", choices=BACKEND_NAMES,
                   help="backend of the fused PGD step")
    p.add_argument("--method", default="anchor", choices=METHODS)
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps K of the training attack")
    p.add_argument("--hard-positive-beta", type=float, default=1.0)
    p.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, cudnn)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--attack-graph", nargs="+", default=["off"], choices=("off", "on"),
                   help="the trainer's attack replayed from a CUDA graph ('on'), or not; "
                        "'off on' times both (the conventional step has no such option)")
    p.add_argument("--out", default="benchmarks/results/train_step.json",
                   help="JSON path (the CSV goes beside it); '' writes nothing")
    args = p.parse_args(argv)
    for name in ("steps", "pgd_steps", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or min(args.batch) < 2:
        p.error("--warmup must be >= 0 and every --batch >= 2")
    return args


def run_config(args, batch: int, backend: str, device: torch.device, bf16: bool,
               attack_graph: bool = False) -> dict:
    """One (batch, backend) measurement; the same seed gives the same weights and batches."""
    conventional = backend == CONVENTIONAL
    if conventional and args.method != "anchor":
        raise ValueError(f"--loss-backend {CONVENTIONAL} is the ANCHOR step; it needs --method anchor")
    cfg = TrainConfig(method=args.method, pgd_steps=args.pgd_steps, width=args.width,
                      hard_positive_beta=args.hard_positive_beta,
                      loss_backend="eager" if conventional else backend,
                      pgd_backend=args.pgd_backend, batch_size=batch, attack_graph=attack_graph)
    torch.manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" and not conventional else torch.contiguous_format
    net = AnchorNet(10, cfg.width, cfg.embed_dim).to(device, memory_format=fmt)
    if cfg.method != "anchor":
        net.head.requires_grad_(False)
    model = torch.compile(net) if args.compile else net
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=5e-4)
    timer = SectionTimer(device)

    def autocast():
        if bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    ctx = StepContext(model=model, train_model=model, optimizer=opt, cfg=cfg, timer=timer,
                      autocast=autocast, attack=build_attack(cfg.method, model, cfg),
                      supcon=make_supcon(cfg, 1) if cfg.method == "anchor" else None)
    step = STEPS[cfg.method]
    if conventional:
        plain = conventional_step(model, opt, cfg, bf16)
        step = lambda ctx, x, y: plain(x, y)  # noqa: E731
    gen = torch.Generator(device=device).manual_seed(1)
    s = args.image_size
    images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device, generator=gen)
    labels = torch.randint(0, 10, (batch,), device=device, generator=gen)

    def one_step():
        x = random_crop_flip(images, 4, gen).float().div_(255).contiguous(memory_format=fmt)
        return step(ctx, x, labels)

    net.train()
    for _ in range(args.warmup):
        one_step()
    _sync(device)
    timer.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = one_step()
    _sync(device)
    wall = time.perf_counter() - t0
    sections = timer.totals()
    n = args.steps
    row = {"batch": batch, "loss_backend": backend, "attack_graph": attack_graph,
           "pgd_backend": "torchattacks" if conventional else cfg.pgd_backend,
           "method": cfg.method, "pgd_steps": cfg.pgd_steps,
           "width": cfg.width, "images_per_s": batch * n / wall, "step_ms": 1e3 * wall / n,
           "final_loss": out["loss"].item()}
    if not conventional:  # the baseline step is timed whole: no sections
        row.update(attack_ms=1e3 * sections.get("attack", 0) / n,
                   fwd_bwd_ms=1e3 * (sections.get("forward", 0) + sections.get("backward", 0)) / n,
                   loss_ms=1e3 * sections.get("loss", 0) / n)
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else platform.processor() or "cpu")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    env = environment(device)
    print(f"# {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"{'bf16 autocast' if bf16 else 'fp32'} | {args.method}, PGD-{args.pgd_steps}, "
          f"width {args.width}")
    header = (f"{'batch':>6} {'backend':>12} {'images/s':>10} {'step ms':>9} {'attack':>8} "
              f"{'fwd+bwd':>8} {'loss':>8} {'speed-up':>8}")
    print(header)
    rows = []
    for batch in args.batch:
        group = []
        runs = [(backend, graph == "on") for backend in args.loss_backend
                for graph in (["off"] if backend == CONVENTIONAL else args.attack_graph)]
        for backend, graph in runs:
            try:
                row = run_config(args, batch, backend, device, bf16, graph)
            except torch.OutOfMemoryError as exc:
                row = {"batch": batch, "loss_backend": backend, "attack_graph": graph,
                       "error": f"out of memory: {str(exc).splitlines()[0]}"}
            except (ValueError, RuntimeError) as exc:
                row = {"batch": batch, "loss_backend": backend, "attack_graph": graph,
                       "error": str(exc).splitlines()[0]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            group.append(row)
        ok = {r["loss_backend"]: r["images_per_s"] for r in group
              if "error" not in r and not r["attack_graph"]}
        ref_name = CONVENTIONAL if CONVENTIONAL in ok else "eager"
        ref = ok.get(ref_name)
        for row in group:
            name = row["loss_backend"] + ("+graph" if row["attack_graph"] else "")
            if "error" in row:
                print(f"{batch:>6} {name:>12}  {row['error']}")
                continue
            row["speedup_vs"] = ref_name
            row["speedup"] = row["images_per_s"] / ref if ref else None
            sp = f"{row['speedup']:.3f}x" if ref else "-"
            parts = " ".join(f"{row[k]:>8.2f}" if k in row else f"{'-':>8}"
                             for k in ("attack_ms", "fwd_bwd_ms", "loss_ms"))
            print(f"{batch:>6} {name:>12} {row['images_per_s']:>10.1f} "
                  f"{row['step_ms']:>9.2f} {parts} {sp:>8}", flush=True)
        rows += group
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"environment": env, "args": vars(args), "results": rows}, fh, indent=2)
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(os.path.splitext(args.out)[0] + ".csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(env) + keys, restval="")
            w.writeheader()
            w.writerows({**env, **r} for r in rows)
        print(f"# wrote {args.out} and {os.path.splitext(args.out)[0]}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
