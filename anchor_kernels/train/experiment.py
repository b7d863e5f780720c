"""Side-by-side comparison of the training methods on real images, with strong evaluation.

``python -m anchor_kernels.train.experiment digits`` trains, on scikit-learn's 8 x 8 digits,
standard training (no attack), PGD-AT, TRADES and ANCHOR (soft mining at beta 0, 1 and 4, and
top-k mining) with the same model, epochs, schedule and training attack, for several seeds
(each with its own stratified split) and L-inf radii (``--eps``, default 0.1), and evaluates
every model on its whole test split: clean accuracy, PGD-20
(random start, step eps / 4) and the AutoAttack-style worst case of
``anchor_kernels.autoattack`` (APGD-CE and APGD-T at the standard's settings by default;
``--attacks`` adds FAB-T and Square). Standard training does not depend on eps: it is
trained once per seed and evaluated at every eps.

Writes ``OUT.json`` (settings, machine, the last run's split, every run with the SHA-1 of its
test indices, mean +- std per method and eps),
``OUT.md`` (the table) and ``OUT.png`` (the plot); ``OUT.json`` is rewritten after every run,
and ``--resume`` skips the runs it already holds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch

from ..attacks import PGD
from ..autoattack import STANDARD_ATTACKS, standard_attacks, worst_case_accuracy
from .config import from_dict
from .metrics import write_json
from .trainer import Trainer

# Every method shares these; eps-dependent values (alpha) are set per run.
PRESETS = {
    "digits": dict(dataset="digits", model="small-cnn", width=0.5, embed_dim=64, epochs=8,
                   batch_size=128, lr=0.1, warmup_epochs=1.0, lr_schedule="cosine",
                   weight_decay=5e-4, pgd_steps=5),
}
# (label, TrainConfig overrides)
METHODS = (
    ("standard", {"method": "standard"}),
    ("PGD-AT", {"method": "pgd-at"}),
    ("TRADES (beta 6)", {"method": "trades", "trades_beta": 6.0}),
    ("ANCHOR beta 0", {"method": "anchor", "hard_positive_beta": 0.0}),
    ("ANCHOR beta 1", {"method": "anchor", "hard_positive_beta": 1.0}),
    ("ANCHOR beta 4", {"method": "anchor", "hard_positive_beta": 4.0}),
    ("ANCHOR top-5", {"method": "anchor", "hard_positive_beta": 0.0, "hard_positive_topk": 5}),
)
METRICS = ("clean_acc", "pgd20_acc", "aa_acc")
DEFAULT_OUT = os.path.join("benchmarks", "results", "{preset}_robustness")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m anchor_kernels.train.experiment",
        description="Standard training, PGD-AT, TRADES and ANCHOR side by side on real images, "
                    "clean / PGD-20 / AutoAttack-style accuracy as mean +- std over seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("preset", choices=sorted(PRESETS), help="data set and shared settings")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1],
                   help="L-inf radii (pixels in [0, 1]); training and evaluation use the same")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=[m for m, _ in METHODS],
                   help="labels of the methods to run")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch (smoke runs)")
    p.add_argument("--attacks", default="apgd-ce,apgd-t",
                   help=f"comma-separated AutoAttack attacks for the worst case, from "
                        f"{','.join(STANDARD_ATTACKS)}")
    p.add_argument("--aa-steps", type=int, default=100,
                   help="APGD / FAB iterations (100 is the standard; fewer for smoke runs only)")
    p.add_argument("--eval-samples", type=int, default=0, help="test images evaluated (0: all)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help=f"output path without extension (default: {DEFAULT_OUT})")
    p.add_argument("--runs-dir", help="keep each run's trainer files here (default: a temporary "
                                      "folder, removed at the end)")
    p.add_argument("--resume", action="store_true", help="skip the runs OUT.json already holds")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    labels = [m for m, _ in METHODS]
    bad = [m for m in args.methods if m not in labels]
    if bad:
        p.error(f"--methods: unknown {bad}; known: {labels}")
    args.attacks = [a for a in args.attacks.split(",") if a]
    if not args.attacks or any(a not in STANDARD_ATTACKS for a in args.attacks):
        p.error(f"--attacks must be a comma-separated subset of {','.join(STANDARD_ATTACKS)}")
    if any(not (0 < e <= 1) for e in args.eps):
        p.error(f"--eps values must be in (0, 1], got {args.eps}")
    for flag in ("epochs", "steps_per_epoch", "aa_steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_samples < 0:
        p.error("--eval-samples must be >= 0 (0: all)")
    args.out = args.out or DEFAULT_OUT.format(preset=args.preset)
    return args


def run_config(args, label: str, eps: float, seed: int, out_dir: str):
    """The TrainConfig of one run: preset, method overrides, eps, alpha = 2.5 eps / K."""
    values = dict(PRESETS[args.preset])
    values.update(dict(METHODS)[label])
    if args.epochs:
        values["epochs"] = args.epochs
    values.update(eps=eps, alpha=2.5 * eps / values["pgd_steps"], seed=seed, out_dir=out_dir,
                  overwrite=True, progress=False, device=args.device,
                  steps_per_epoch=args.steps_per_epoch, eval_every=values["epochs"],
                  eval_samples=100, final_eval_samples=100)
    return from_dict(values)


def evaluate(net, test, eps_list, args, seed: int) -> dict:
    """{eps: {clean_acc, pgd20_acc, aa_acc, aa_after, eval_s}} on the test split."""
    n = len(test) if not args.eval_samples else min(args.eval_samples, len(test))
    device = next(net.parameters()).device
    x = test.x[:n].to(device)
    x = x.float().div_(255) if test.x.dtype == torch.uint8 else x.float()
    y = test.y[:n].to(device)
    out = {}
    for eps in eps_list:
        t0 = time.perf_counter()
        pgd20 = PGD(net, eps=eps, alpha=eps / 4, steps=20, random_start=True,
                    generator=torch.Generator(device).manual_seed(seed))
        pgd = worst_case_accuracy(net, x, y, {"pgd20": pgd20}, eps=eps)
        attacks = standard_attacks(net, eps, num_classes=int(test.y.max()) + 1,
                                   names=args.attacks, steps=args.aa_steps, seed=seed)
        aa = worst_case_accuracy(net, x, y, attacks, eps=eps)
        out[eps] = {"clean_acc": pgd["clean_acc"], "pgd20_acc": pgd["robust_acc"],
                    "aa_acc": aa["robust_acc"], "aa_after": aa["acc_after"],
                    "eval_images": n, "eval_s": time.perf_counter() - t0}
    return out


def summarise(runs: list[dict], labels, eps_list) -> list[dict]:
    """Mean and sample standard deviation over seeds per (method, eps)."""
    rows = []
    for eps in eps_list:
        for label in labels:
            group = [r for r in runs if r["method"] == label and r["eps"] == eps]
            if not group:
                continue
            row = {"method": label, "eps": eps, "seeds": sorted(r["seed"] for r in group)}
            for m in METRICS:
                vals = [r[m] for r in group]
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
                    if len(vals) > 1 else 0.0
                row[m] = {"mean": mean, "std": std}
            rows.append(row)
    return rows


def markdown(summary: list[dict], meta: dict) -> str:
    attacks = " + ".join(meta["attacks"])
    lines = [f"Robust accuracy on {meta['preset']} ({meta['test_images']} test images), "
             f"mean +- std over seeds {meta['seeds']}; AA = worst case per image over "
             f"{attacks} ({meta['aa_steps']} iterations). Training: {meta['train_summary']}.",
             "", "| eps | method | clean | PGD-20 | AA |", "| --- | --- | --- | --- | --- |"]
    for row in summary:
        cells = [f"{100 * row[m]['mean']:.1f} +- {100 * row[m]['std']:.1f}" for m in METRICS]
        lines.append(f"| {row['eps']:g} | {row['method']} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time {meta['wall_s'] / 60:.1f} min on {meta['machine']}.", ""]
    return "\n".join(lines)


def plot(summary: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps_list = sorted({r["eps"] for r in summary})
    fig, axes = plt.subplots(1, len(eps_list), figsize=(6.5 * len(eps_list), 4.2), squeeze=False)
    names = {"clean_acc": "clean", "pgd20_acc": "PGD-20", "aa_acc": "AA"}
    for ax, eps in zip(axes[0], eps_list):
        rows = [r for r in summary if r["eps"] == eps]
        for j, m in enumerate(METRICS):
            xs = [i + (j - 1) * 0.27 for i in range(len(rows))]
            ax.bar(xs, [100 * r[m]["mean"] for r in rows], 0.27,
                   yerr=[100 * r[m]["std"] for r in rows], capsize=2, label=names[m])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"eps = {eps:g}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    cores = os.cpu_count()
    return (f"{platform.processor() or platform.machine()}, {cores} CPU cores, "
            f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    labels = list(args.methods)
    eps_list = sorted(set(args.eps))
    # (label, eps, seed) of each training run; standard training once per seed, all eps.
    jobs = [(label, None if label == "standard" else eps, seed)
            for label in labels for eps in (eps_list if label != "standard" else [None])
            for seed in args.seeds]
    json_path = args.out + ".json"
    runs: list[dict] = []
    prior_wall, split = 0.0, None
    if args.resume and os.path.isfile(json_path):
        with open(json_path) as fh:
            saved = json.load(fh)
        runs, prior_wall = saved["runs"], saved.get("wall_s", 0.0)
        split = saved.get("split")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    meta = {"preset": args.preset, "settings": PRESETS[args.preset], "eps": eps_list,
            "seeds": args.seeds, "attacks": args.attacks, "aa_steps": args.aa_steps,
            "epochs": args.epochs or PRESETS[args.preset]["epochs"],
            "command": "python -m anchor_kernels.train.experiment " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "machine": machine(), "split": split}
    p = PRESETS[args.preset]
    meta["train_summary"] = (f"{p['model']} (width {p['width']}), {meta['epochs']} epochs, batch "
                             f"{p['batch_size']}, SGD lr {p['lr']} cosine with {p['warmup_epochs']:g} "
                             f"warm-up epoch(s), PGD-{p['pgd_steps']} training attack with step "
                             f"2.5 eps / {p['pgd_steps']}")
    start = time.perf_counter() - prior_wall  # a resumed experiment adds its earlier time
    tmp = None if args.runs_dir else tempfile.TemporaryDirectory(prefix="anchor-experiment-")
    runs_dir = args.runs_dir or tmp.name
    bar = tqdm(jobs, desc=f"{args.preset} runs", disable=not args.progress, file=sys.stderr)
    try:
        for label, eps, seed in bar:
            todo = [e for e in ([eps] if eps is not None else eps_list)
                    if not any(r["method"] == label and r["eps"] == e and r["seed"] == seed
                               for r in runs)]
            if not todo:
                continue
            bar.set_postfix_str(f"{label} eps={eps if eps is not None else 'all'} seed={seed}")
            tag = f"{label.replace(' ', '_').replace('(', '').replace(')', '')}_eps{eps}_s{seed}"
            cfg = run_config(args, label, eps if eps is not None else eps_list[0], seed,
                             os.path.join(runs_dir, tag))
            t0 = time.perf_counter()
            trainer = Trainer(cfg)
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own "final:" line
                trainer.run()
            train_s = time.perf_counter() - t0
            meta["split"] = trainer.test_split.info or meta["split"]
            meta["test_images"] = len(trainer.test_split) if not args.eval_samples else min(
                args.eval_samples, len(trainer.test_split))
            results = evaluate(trainer.net, trainer.test_split, todo, args, seed)
            for e, res in results.items():
                runs.append({"method": label, "eps": e, "seed": seed, "train_s": train_s, **res,
                             "split_sha1": trainer.test_split.info.get("test_index_sha1")})
                bar.write(f"{label:16s} eps={e:g} seed={seed}: clean {res['clean_acc']:.3f} "
                          f"pgd20 {res['pgd20_acc']:.3f} aa {res['aa_acc']:.3f} "
                          f"(train {train_s:.0f}s, eval {res['eval_s']:.0f}s)")
            meta["wall_s"] = time.perf_counter() - start
            write_json(json_path, {**meta, "runs": runs,
                                   "summary": summarise(runs, labels, eps_list)})
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()
    meta["wall_s"] = time.perf_counter() - start
    summary = summarise(runs, labels, eps_list)
    meta.setdefault("test_images", runs[0]["eval_images"] if runs else 0)
    write_json(json_path, {**meta, "runs": runs, "summary": summary})
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(summary, meta))
    plot(summary, args.out + ".png",
         f"{args.preset}: clean / PGD-20 / AA accuracy, mean +- std over {len(args.seeds)} seeds")
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
