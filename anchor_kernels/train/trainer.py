"""The training loop: set-up, epochs, evaluation, checkpoints, resume, NaN stop.

``Trainer(cfg)`` builds everything from a TrainConfig (resuming when ``cfg.resume`` is set);
``run()`` trains to the end. Epochs are numbered from 1; ``self.epoch`` counts finished ones.
Phase 1 is ``cfg.epochs`` epochs of the method, phase 2 (optional) ``cfg.phase2_epochs`` epochs
of classifier-only training on PGD examples with the backbone frozen.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings

import torch
from torch import nn

from . import checkpoint, ddp
from .checkpoint import CHECKPOINT_NAME
from .config import RESUME_FREE, TrainConfig, flag_of, from_dict
from .data import DeviceLoader, load_dataset
from .evaluation import evaluate
from .methods import STEPS, StepContext, build_attack, make_supcon, phase2_step
from .metrics import FINAL_NAME, PLOT_NAME, MetricsLog, plot_curves, write_json
from .models import AnchorNet
from .schedule import lr_at
from .timing import SectionTimer

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


def resolve_resume(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, dict | None]:
    """With ``--resume``: the checkpoint and the saved config, where the command line may change
    only options that do not alter the trajectory (``config.RESUME_FREE``)."""
    if cfg.resume is None:
        return cfg, None
    if cfg.resume == "auto":
        path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    else:
        path = cfg.resume
    state = checkpoint.load(path)
    saved = dict(state["config"])
    conflicts = [f"--{flag_of(k)} {getattr(cfg, k)!r} (the run used {saved.get(k)!r})"
                 for k in sorted(given) if k not in RESUME_FREE and saved.get(k) != getattr(cfg, k)]
    if conflicts:
        raise ValueError("--resume continues a run with its own settings; these flags differ: "
                         + "; ".join(conflicts) + ". Flags a resumed run may change: "
                         + ", ".join(f"--{flag_of(k)}" for k in sorted(RESUME_FREE)))
    for k in given & RESUME_FREE:
        saved[k] = getattr(cfg, k)
    if "out_dir" not in given and cfg.resume != "auto":
        saved["out_dir"] = os.path.dirname(os.path.abspath(path))
    saved["resume"] = path
    saved["overwrite"] = False
    return from_dict(saved), state


class Trainer:
    def __init__(self, cfg: TrainConfig, given: set[str] | frozenset = frozenset(),
                 info: ddp.DistInfo | None = None):
        self.info = info or ddp.setup(cfg.device)
        cfg, state = resolve_resume(cfg, set(given))
        self.cfg = cfg
        self.device = dev = self.info.device
        rank, world = self.info.rank, self.info.world
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                             f"processes ({world})")
        if self.info.is_main:
            _prepare_out_dir(cfg.out_dir)
        if state is None:
            self._claim_out_dir()

        if cfg.attack_graph and dev.type != "cuda":
            raise ValueError(f"--attack-graph needs a CUDA device, the run is on {dev.type}")
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        self.channels_last = dev.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format

        train, test, num_classes = load_dataset(
            cfg.dataset, cfg.data, seed=cfg.seed,
            synthetic_sizes=(cfg.synthetic_train_size, cfg.synthetic_test_size),
            image_size=cfg.synthetic_image_size)
        self.num_classes = num_classes
        self.aug_gen = torch.Generator(device=dev).manual_seed(_stream_seed(cfg.seed, rank, 1))
        flip = cfg.dataset in ("cifar10", "synthetic") if cfg.flip is None else cfg.flip
        self.train_loader = DeviceLoader(train, cfg.batch_size // world, dev, train=True,
                                         seed=cfg.seed, rank=rank, world=world,
                                         aug_generator=self.aug_gen, max_steps=cfg.steps_per_epoch,
                                         flip=flip)
        self.test_split = test

        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        net = AnchorNet(num_classes, cfg.width, cfg.embed_dim, in_channels=train.x.shape[1],
                        model=cfg.model)
        if cfg.sync_bn and self.info.enabled:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if cfg.method != "anchor":
            net.head.requires_grad_(False)  # the baselines do not use the projection head
        self.net = net.to(dev, memory_format=fmt)
        torch.manual_seed(_stream_seed(cfg.seed, rank, 2))  # attack random starts differ per process

        self.steps_per_epoch = len(self.train_loader)
        self.epoch, self.global_step = 0, 0
        self.timer = SectionTimer(dev)
        self.supcon = make_supcon(cfg, world) if cfg.method == "anchor" else None
        self._phase = None
        if state is not None:
            self._restore(state)
        self._enter_phase(self.phase_of(self.epoch + 1))
        if state is not None and state["phase"] == self._phase:
            # A checkpoint at the end of phase 1 is followed by phase 2's fresh optimiser.
            self.optimizer.load_state_dict(state["optimizer"])
        self.log = None
        if self.info.is_main:
            self.log = MetricsLog(cfg.out_dir, None if state is None else self.epoch)
            write_json(os.path.join(cfg.out_dir, "config.json"), cfg.to_dict())

    # ---- set-up helpers -------------------------------------------------------------------

    def _claim_out_dir(self) -> None:
        path = os.path.join(self.cfg.out_dir, CHECKPOINT_NAME)
        if os.path.exists(path) and not self.cfg.overwrite:
            raise ValueError(f"--out-dir {self.cfg.out_dir!r} already holds a run ({CHECKPOINT_NAME}); "
                             "pass --resume to continue it, --overwrite to start afresh, or "
                             "another --out-dir")
        ddp.barrier(self.info)  # every process has looked before rank 0 removes anything
        if os.path.exists(path) and self.info.is_main:
            os.remove(path)  # --overwrite: never leave the old run's checkpoint beside new metrics

    def phase_of(self, epoch: int) -> int:
        return 1 if epoch <= self.cfg.epochs else 2

    @property
    def total_epochs(self) -> int:
        return self.cfg.epochs + self.cfg.phase2_epochs

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _enter_phase(self, phase: int) -> None:
        """(Re)build optimiser, model wrappers, attack and step for ``phase``."""
        if phase == self._phase:
            return
        cfg, net = self.cfg, self.net
        if phase == 2:
            net.freeze_backbone()
        params = [p for p in net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr if phase == 1 else cfg.phase2_lr,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        attack_model = torch.compile(net) if cfg.compile else net
        train_model = attack_model
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
            if cfg.compile:
                train_model = torch.compile(train_model)
        self.attack_model = attack_model
        method = cfg.method if phase == 1 else "pgd-at"
        self.step_fn = STEPS[cfg.method] if phase == 1 else phase2_step
        self.ctx = StepContext(model=attack_model, train_model=train_model,
                               optimizer=self.optimizer, cfg=cfg, timer=self.timer,
                               autocast=self.autocast, attack=build_attack(method, attack_model, cfg),
                               supcon=self.supcon)
        self._phase = phase

    def _restore(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume: checkpoint format {state.get('format')!r} is not "
                             f"{CHECKPOINT_FORMAT}")
        if state["device_type"] != self.device.type:
            raise ValueError(f"--resume: the checkpoint comes from a {state['device_type']} run; "
                             f"resume it with --device {state['device_type']}")
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        try:
            self.net.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ValueError("--resume: the checkpoint's model weights do not fit this model: "
                             + " ".join(str(exc).split())) from None
        rng = state["rng"]
        if len(rng) == self.info.world:
            try:
                checkpoint.restore_rng(rng[self.info.rank], self.device, {"aug": self.aug_gen})
            except (KeyError, TypeError, RuntimeError) as exc:
                raise ValueError("--resume: the checkpoint's random states are malformed: "
                                 + " ".join(str(exc).split())) from None
        else:
            warnings.warn(f"--resume: the checkpoint was written by {len(rng)} process(es), this run "
                          f"has {self.info.world}; random streams restart from the seed, so the run "
                          "continues but does not repeat the uninterrupted one exactly", stacklevel=2)
            torch.manual_seed(_stream_seed(self.cfg.seed + self.epoch, self.info.rank, 2))
            self.aug_gen.manual_seed(_stream_seed(self.cfg.seed + self.epoch, self.info.rank, 1))

    def state_dict(self) -> dict:
        rng = ddp.gather_objects(checkpoint.capture_rng(self.device, {"aug": self.aug_gen}), self.info)
        return {"format": CHECKPOINT_FORMAT, "epoch": self.epoch, "global_step": self.global_step,
                "phase": self._phase, "config": self.cfg.to_dict(), "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng, "world_size": self.info.world,
                "device_type": self.device.type, "torch_version": str(torch.__version__)}

    # ---- training -------------------------------------------------------------------------

    def _set_lr(self) -> float:
        cfg, spe = self.cfg, self.steps_per_epoch
        if self._phase == 1:
            lr = lr_at(self.global_step, cfg.epochs * spe, cfg.lr, cfg.lr_schedule,
                       round(cfg.warmup_epochs * spe))
        else:
            lr = lr_at(self.global_step - cfg.epochs * spe, cfg.phase2_epochs * spe, cfg.phase2_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch (x (b, 3, H, W) in [0, 1], y (b,)); detached outputs."""
        self._set_lr()
        out = self.step_fn(self.ctx, x, y)
        self.global_step += 1
        return out

    def train_epoch(self) -> dict:
        """Train one epoch (``self.epoch + 1``); returns its metrics row (no evaluation)."""
        epoch = self.epoch + 1
        self._enter_phase(self.phase_of(epoch))
        self.net.train()
        self.timer.reset()
        sums: dict[str, torch.Tensor] = {}
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        n = self.steps_per_epoch
        global_batch = self.train_loader.batch_size * self.info.world
        bar = self._progress(epoch, n)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader.epoch(epoch, self.channels_last)):
            out = self.step(x, y)
            for k, v in out.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(out["loss"]), i + 1, bad_step)
            if (i + 1) % self.cfg.log_every == 0 or i + 1 == n:
                self._check_finite(bad_step, epoch, out)
                if bar is not None:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix({"img/s": f"{(i + 1) * global_batch / elapsed:.0f}",
                                     "loss": f"{out['loss'].item():.4f}"}, refresh=False)
                    bar.update((i + 1) - bar.n)
        sections = self.timer.totals()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        self.epoch = epoch
        lr = self.optimizer.param_groups[0]["lr"]  # of the epoch's last step
        return self._epoch_row(epoch, sums, sections, wall, n, global_batch, lr)

    def _progress(self, epoch: int, n: int):
        if not (self.cfg.progress and self.info.is_main):
            return None
        from tqdm import tqdm
        return tqdm(total=n, desc=f"epoch {epoch}/{self.total_epochs} (phase {self._phase})",
                    unit="step", dynamic_ncols=True, leave=True, file=sys.stderr)

    def _check_finite(self, bad_step: torch.Tensor, epoch: int, out: dict) -> None:
        flag = ddp.all_reduce_max((bad_step >= 0).to(torch.float32).reshape(1), self.info)
        if flag.item() == 0:
            return
        where = f"step {bad_step.item()}" if bad_step.item() >= 0 else "a step (on another process)"
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k.startswith("loss"))
        ckpt = os.path.join(self.cfg.out_dir, CHECKPOINT_NAME)
        kept = (f"the last good checkpoint {ckpt!r} (epoch {self.epoch}) is kept"
                if os.path.exists(ckpt) else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"loss is not finite at epoch {epoch}, {where} of {self.steps_per_epoch} (last step: "
            f"{parts}); stopping. {kept}. Lower --lr, add --warmup-epochs, or try --precision fp32.")

    def _epoch_row(self, epoch, sums, sections, wall, n, global_batch, lr) -> dict:
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys])
        ddp.all_reduce_sum(packed, self.info)
        totals = dict(zip(keys, packed.tolist()))
        images = n * global_batch
        row = {"epoch": epoch, "phase": self._phase, "lr": lr, "world_size": self.info.world}
        for k, v in totals.items():
            if k.startswith("loss"):
                row[k] = v / (n * self.info.world)
        for k in ("correct_clean", "correct_adv"):
            if k in totals:
                row[f"train_{k.split('_')[1]}_acc"] = totals[k] / images
        row["images_per_s"] = images / wall
        row["step_ms"] = 1e3 * wall / n
        attack, fwd, loss, bwd = (sections.get(k, 0.0)
                                  for k in ("attack", "forward", "loss", "backward"))
        row["attack_ms"] = 1e3 * attack / n
        row["fwd_bwd_ms"] = 1e3 * (fwd + bwd) / n
        row["loss_ms"] = 1e3 * loss / n
        row["other_ms"] = row["step_ms"] - row["attack_ms"] - row["fwd_bwd_ms"] - row["loss_ms"]
        row["epoch_s"] = wall
        return row

    def evaluate(self, samples: int) -> dict:
        loader = DeviceLoader(self.test_split, self.cfg.eval_batch_size, self.device, train=False,
                              rank=self.info.rank, world=self.info.world, limit=samples)
        t0 = time.perf_counter()
        out = evaluate(self.attack_model, loader, self.info, torch.bfloat16 if self.bf16 else None,
                       self.channels_last, self.cfg.pgd_backend,
                       progress=self.cfg.progress and self.info.is_main)
        out["eval_s"] = time.perf_counter() - t0
        return out

    def save_checkpoint(self) -> None:
        state = self.state_dict()  # collective: every process contributes its RNG state
        if self.info.is_main:
            checkpoint.save(state, os.path.join(self.cfg.out_dir, CHECKPOINT_NAME))
        ddp.barrier(self.info)

    def run(self) -> dict:
        """Train the remaining epochs; evaluate, log and checkpoint after each; final evaluation."""
        cfg = self.cfg
        if self.epoch >= self.total_epochs and self.info.is_main:
            print(f"anchor-train: the run in {cfg.out_dir} already finished its "
                  f"{self.total_epochs} epochs; nothing to train, repeating the final evaluation "
                  f"on {cfg.final_eval_samples or 'all'} test images", file=sys.stderr, flush=True)
        while self.epoch < self.total_epochs:
            row = self.train_epoch()
            last = self.epoch == self.total_epochs
            if self.epoch % cfg.eval_every == 0 or last:
                row.update(self.evaluate(cfg.eval_samples))
            if self.log is not None:
                self.log.append(row)
                self._print_row(row)
            self.save_checkpoint()
        final = {"epoch": self.epoch, **self.evaluate(cfg.final_eval_samples)}
        if self.test_split.info:
            final["data"] = self.test_split.info  # how a drawn train / test split was drawn
        if self.info.is_main:
            write_json(os.path.join(cfg.out_dir, FINAL_NAME), final)
            if self.log.rows:
                plot_curves(self.log.rows, os.path.join(cfg.out_dir, PLOT_NAME))
            print("final: " + json.dumps({k: _round(v) for k, v in final.items()}), flush=True)
        return final

    def _print_row(self, row: dict) -> None:
        keep = ("epoch", "loss", "clean_acc", "pgd20_trades_acc", "pgd20_acc", "images_per_s",
                "attack_ms", "fwd_bwd_ms", "loss_ms")
        print(" ".join(f"{k}={_round(row[k])}" for k in keep if k in row), file=sys.stderr, flush=True)


class OutDirUnavailable(OSError):
    """The output folder cannot be created (permissions, a read-only file system, ...)."""


def _prepare_out_dir(path: str) -> None:
    """--out-dir exists as a folder (created if needed), and an interrupted save's temporary
    file is gone. A path naming a file is a usage error; a folder that cannot be created is
    an OSError (the environment)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out-dir {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:  # never reported as a usage error, even when it is ENOENT
        raise OutDirUnavailable(f"--out-dir {path!r} cannot be created: {exc}") from None
    checkpoint.remove_stale_temporaries(path)


def _round(v):
    return round(v, 4) if isinstance(v, float) and math.isfinite(v) else v


def _stream_seed(seed: int, rank: int, stream: int) -> int:
    """Distinct seeds per (run seed, process, stream)."""
    return (seed * 65_537 + rank) * 16 + stream


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv=None) -> int:
    from .config import parse_args

    cfg, given = parse_args(argv)
    info, finished = None, False
    try:
        info = ddp.setup(cfg.device)
        trainer = Trainer(cfg, given, info)
        trainer.run()
        finished = True
    except TrainingDiverged as exc:
        print(f"anchor-train: stopped: {exc}", file=sys.stderr, flush=True)
        return 3
    except (ValueError, TypeError, FileNotFoundError) as exc:  # the command line or its files
        print(f"anchor-train: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # the environment: permissions, a full disk, ...
        print(f"anchor-train: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        if info is not None:
            ddp.cleanup(info, finished)
    return 0

