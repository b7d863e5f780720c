"""Every hyper-parameter of a run: one dataclass, the command line built from it, a JSON
config file, and the checks that turn bad values into errors naming the flag.

Precedence: dataclass defaults < ``--config FILE.json`` < flags given on the command line.
The resolved config is written to ``OUT_DIR/config.json``, so ``--config OUT_DIR/config.json``
repeats a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from ..backends import BACKEND_NAMES

METHODS = ("anchor", "pgd-at", "trades", "standard")
DATASETS = ("cifar10", "synthetic", "digits", "npz")
MODELS = ("resnet18", "small-cnn")
TRAIN_ATTACKS = ("pgd", "fgsm-rs", "n-fgsm")


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Defaults: ANCHOR on CIFAR-10 with a CIFAR ResNet-18 (see README.md, Training)."""

    # what to train
    method: str = _opt("anchor", "training objective; the adversarial three share data, model, "
                       "schedule and attack, so runs compare side by side; 'standard' is plain "
                       "cross-entropy on clean images (no attack), the floor", choices=METHODS)
    dataset: str = _opt("cifar10", "'cifar10' reads --data; 'npz' reads any image set from the "
                        ".npz --data; 'digits' is scikit-learn's 8x8 digits (stratified 80/20 "
                        "split drawn from --seed); 'synthetic' makes class-dependent random "
                        "images (smoke runs, throughput)", choices=DATASETS)
    flip: bool | None = _opt(None, "random horizontal flips in the augmentation (default: on for "
                             "cifar10 and synthetic, off for digits and npz, where a flip can "
                             "change the class)")
    data: str = _opt("data/cifar-10-batches-py", "CIFAR-10 as the standard python-pickle folder "
                     "(data_batch_1..5, test_batch, batches.meta) or an .npz with x_train, "
                     "y_train, x_test, y_test (with --dataset npz: any images (N, H, W, C) or "
                     "(N, C, H, W), C in 1, 3, 4)")
    synthetic_train_size: int = _opt(2048, "training images of --dataset synthetic")
    synthetic_test_size: int = _opt(512, "test images of --dataset synthetic")
    synthetic_image_size: int = _opt(32, "side of the --dataset synthetic images (small for tests)")
    out_dir: str = _opt("runs/anchor", "checkpoint, metrics.jsonl/.csv, curves.png and "
                        "config.json go here")
    overwrite: bool = _opt(False, "start afresh in an --out-dir that already holds a run")
    resume: str | None = _opt(None, "continue a run: from OUT_DIR/checkpoint.pt (bare --resume) or "
                              "from the given checkpoint", nargs="?", const="auto")

    # schedule and optimiser (SGD with momentum, per-step cosine decay after linear warm-up)
    epochs: int = _opt(100, "phase-1 epochs")
    batch_size: int = _opt(256, "global batch size (split evenly over torchrun processes)")
    steps_per_epoch: int | None = _opt(None, "cap on steps per epoch (smoke runs); default: one pass")
    lr: float = _opt(0.1, "peak learning rate (scale it with the batch size: 0.1 per 256 images)")
    lr_schedule: str = _opt("cosine", "decay after warm-up", choices=("cosine", "step", "constant"))
    warmup_epochs: float = _opt(0.0, "linear warm-up from 0 to --lr")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay")

    # model
    model: str = _opt("resnet18", "backbone: the CIFAR ResNet-18, or 'small-cnn' (3 conv layers, "
                      "32..128 channels) for small images; input channels and classes follow "
                      "the data", choices=MODELS)
    width: float = _opt(1.0, "channel multiplier of the backbone (ResNet-18 at 1.0: 64..512 "
                        "channels, 512-d features); small values for tests")
    embed_dim: int = _opt(128, "output size of the projection head")

    # attack used for training (L-inf PGD, maximising the method's objective)
    eps: float = _opt(8 / 255, "L-inf radius of the training attack")
    alpha: float = _opt(2 / 255, "step size of the training attack")
    pgd_steps: int = _opt(10, "PGD steps K of the training attack")
    random_start: bool = _opt(True, "uniform random start in the eps-ball")
    train_attack: str = _opt("pgd", "the training attack: 'pgd' (--pgd-steps steps of --alpha), or "
                             "a single-step one, reported under its own name: 'fgsm-rs' (FGSM "
                             "from a random start, step 1.25 eps; Wong et al. 2020) or 'n-fgsm' "
                             "(noise from the 2 eps ball, step eps, no projection; de Jorge et "
                             "al. 2022); those ignore --pgd-steps, --alpha and --random-start",
                             choices=TRAIN_ATTACKS)
    attack_loss: str = _opt("ce", "objective the ANCHOR attack maximises", choices=("ce", "supcon"))
    pgd_backend: str = _opt("auto", "backend of the fused PGD step and random start (training "
                            "and evaluation attacks)", choices=BACKEND_NAMES)
    attack_bn: str = _opt("eval", "BatchNorm while crafting training attacks: 'eval' (running "
                          "statistics, as TRADES) or 'train' (batch statistics, updating the "
                          "running ones)", choices=("eval", "train"))

    # losses
    temperature: float = _opt(0.1, "SupCon temperature tau")
    hard_positive_beta: float = _opt(1.0, "soft hard-positive mining strength beta >= 0 "
                                     "(0: plain SupCon)")
    hard_positive_topk: int | None = _opt(None, "top-k hard-positive mining instead of soft mining "
                                          "(--hard-positive-beta then defaults to 0)")
    ce_weight: float = _opt(1.0, "lambda in L = L_supcon + lambda * CE(classifier(x_adv), y)",
                            flags=("--ce-weight", "--lambda"))
    trades_beta: float = _opt(6.0, "TRADES trade-off 1/lambda on the KL term")
    loss_backend: str = _opt("auto", "backend of the SupCon loss ('eager' is the reference; "
                             "compare throughput with the fused ones)", choices=BACKEND_NAMES)

    # phase 2: frozen backbone, classifier trained on adversarial examples
    phase2_epochs: int = _opt(0, "epochs of phase 2 after phase 1 (0: none)")
    phase2_lr: float = _opt(0.01, "peak learning rate of phase 2 (cosine, no warm-up)")

    # evaluation (clean and PGD-20 accuracy on the test set)
    eval_every: int = _opt(1, "evaluate every N epochs (and always after the last)")
    eval_samples: int = _opt(1000, "test images used by the per-epoch evaluation (0: all)")
    final_eval_samples: int = _opt(0, "test images used by the final evaluation (0: all)")
    eval_batch_size: int = _opt(500, "batch size of the evaluation attacks")

    # execution
    seed: int = _opt(0, "seed of the model init, data order, augmentation and attacks")
    device: str = _opt("auto", "'auto' takes CUDA when present", choices=("auto", "cpu", "cuda"))
    precision: str = _opt("auto", "'auto' is bf16 autocast on CUDA, fp32 on CPU",
                          choices=("auto", "bf16", "fp32"))
    channels_last: bool | None = _opt(None, "channels_last memory format (default: on for CUDA)")
    compile: bool = _opt(False, "torch.compile the model")
    attack_graph: bool = _opt(False, "replay the training attack's steps from a CUDA graph, "
                              "captured once per batch shape (CUDA; anchor and pgd-at)")
    deterministic: bool = _opt(False, "deterministic kernels, so that --resume is bit-exact on a GPU "
                               "too (slower; on the CPU runs are deterministic anyway)")
    sync_bn: bool = _opt(False, "SyncBatchNorm under torchrun")
    progress: bool = _opt(True, "tqdm progress bars for training (images/s) and evaluation (rank 0 "
                          "only); the per-epoch summary lines are printed either way")
    log_every: int = _opt(20, "steps between progress updates and NaN checks (each one synchronises)")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the flag of the first bad value."""
        def need(cond: bool, flag: str, what: str, value) -> None:
            if not cond:
                raise ValueError(f"--{flag} must be {what}, got {value!r}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"--{flag_of(f.name)} must be one of {', '.join(choices)}; "
                                 f"got {value!r}")
        for name in ("epochs", "phase2_epochs", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None:
                need(isinstance(value, int) and value >= (0 if "epochs" in name else 1),
                     flag_of(name), "a non-negative int" if "epochs" in name else "an int >= 1", value)
        need(self.epochs + self.phase2_epochs > 0, "epochs", "> 0 (or give --phase2-epochs)",
             self.epochs)
        for name in ("batch_size", "pgd_steps", "embed_dim", "eval_every", "eval_batch_size",
                     "log_every", "synthetic_train_size", "synthetic_test_size",
                     "synthetic_image_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, flag_of(name), "an int >= 1", value)
        for name in ("eval_samples", "final_eval_samples"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, flag_of(name), "an int >= 0 (0: all)", value)
        for name in ("lr", "phase2_lr", "temperature", "width", "eps", "alpha"):
            value = getattr(self, name)
            need(_real(value) and value > 0, flag_of(name), "a finite number > 0", value)
        for name in ("weight_decay", "warmup_epochs", "hard_positive_beta", "ce_weight", "trades_beta"):
            value = getattr(self, name)
            need(_real(value) and value >= 0, flag_of(name), "a finite number >= 0", value)
        need(_real(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        need(self.eps <= 1, "eps", "<= 1 (pixels are in [0, 1])", self.eps)
        if self.train_attack != "pgd" and self.method == "standard":
            raise ValueError(f"--train-attack {self.train_attack} needs an adversarial --method "
                             "(anchor, pgd-at or trades); standard training runs no attack")
        if self.attack_graph and self.method not in ("anchor", "pgd-at"):
            raise ValueError(f"--attack-graph needs --method anchor or pgd-at, got {self.method!r} "
                             "(the TRADES attack's objective changes with every step's clean "
                             "prediction; standard training runs no attack)")
        if self.hard_positive_topk is not None:
            need(isinstance(self.hard_positive_topk, int) and self.hard_positive_topk >= 1,
                 "hard-positive-topk", "an int >= 1", self.hard_positive_topk)
            if self.hard_positive_beta != 0:
                raise ValueError("--hard-positive-topk and --hard-positive-beta are two mining modes; "
                                 "pass --hard-positive-beta 0 with --hard-positive-topk")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def flag_of(name: str) -> str:
    return name.replace("_", "-")


# Fields that do not change the trajectory of a run: a resumed run may change them. The epoch
# counts are not among them: the learning-rate schedule is a function of the total, so a
# different --epochs would change every remaining step.
RESUME_FREE = {"out_dir", "overwrite", "resume", "eval_every",
               "eval_samples", "final_eval_samples", "eval_batch_size", "progress", "log_every",
               "compile", "data", "loss_backend", "pgd_backend", "attack_graph"}


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line, one flag per TrainConfig field (``--config`` adds a JSON file)."""
    parser = argparse.ArgumentParser(
        prog="anchor-train",
        description="Adversarial training on CIFAR-10: ANCHOR (hard-mined SupCon + adversarial "
                    "CE), PGD-AT (Madry) and TRADES with one data pipeline, model and attack. "
                    "Multi-GPU: torchrun --nproc_per_node=K -m anchor_kernels.train ...",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.json",
                        help="JSON object of option names (as in config.json) to values; "
                             "command-line flags override it")
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flags = meta.pop("flags", (f"--{flag_of(f.name)}",))
        kw: dict = {"dest": f.name, "help": meta.pop("help")}
        if not suppress_defaults:
            kw["default"] = f.default
        if "choices" in meta:
            kw["choices"] = meta.pop("choices")
        kw.update(meta)
        if f.type in ("bool", "bool | None"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _TYPES[f.type]
        parser.add_argument(*flags, **kw)
    return parser


_TYPES = {"str": str, "str | None": str, "int": int, "int | None": int, "float": float}


def parse_args(argv=None) -> tuple[TrainConfig, set[str]]:
    """Resolve defaults, the ``--config`` file and the flags into a validated config, and the
    set of options set explicitly (by a flag or the file; ``--resume`` needs it). Exits with a
    usage error naming the flag on bad input (status 2, like argparse)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    config_file = args.pop("config")
    given.pop("config", None)
    if config_file is not None:
        try:
            given = {**load_config_file(config_file), **given}
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    values.update(given)
    if values.get("hard_positive_topk") is not None and "hard_positive_beta" not in given:
        values["hard_positive_beta"] = 0.0  # top-k replaces soft mining unless beta is given
    try:
        return from_dict(values), set(given)
    except ValueError as exc:
        parser.error(str(exc))


def from_dict(values: dict) -> TrainConfig:
    """A validated TrainConfig from a dict of field names."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return TrainConfig(**values).validate()


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    with open(path) as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path} must hold a JSON object of option names to values")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in names:
            raise ValueError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out
