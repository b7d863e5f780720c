"""The reference ANCHOR trainer (anchor_kernels.train): smoke runs of every method, exact
resume, SIGKILL mid-epoch, data loaders, flag errors, a 2-process gloo run, the benchmark.

Everything runs a tiny ResNet-18 (width 1/16) on 16x16 synthetic images for a few steps on
one CPU thread; GPU tests (tier 2) use the real sizes briefly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anchor_kernels import supcon_loss
from anchor_kernels.train import Trainer, TrainingDiverged, main, parse_args
from anchor_kernels.train import bench, checkpoint, data
from anchor_kernels.train.augment import random_crop_flip
from anchor_kernels.train.config import TrainConfig
from anchor_kernels.train.methods import STEPS, StepContext, attack_budget, build_attack
from anchor_kernels.train.metrics import read_jsonl
from anchor_kernels.train.models import AnchorNet
from anchor_kernels.train.schedule import lr_at
from anchor_kernels.train.timing import SectionTimer

from .utils import one_thread  # noqa: F401  (autouse: one torch thread)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_LOSS_PARTS = {"anchor": {"loss_supcon", "loss_ce"}, "pgd-at": {"loss_ce"},
                       "trades": {"loss_ce", "loss_kl"}}



def tiny(out_dir, *extra, **opts) -> list[str]:
    """Command line of a tiny synthetic run; ``opts`` override defaults (flag=value)."""
    base = {"dataset": "synthetic", "synthetic-train-size": 48, "synthetic-test-size": 16,
            "synthetic-image-size": 16, "batch-size": 8, "epochs": 1, "steps-per-epoch": 2,
            "width": 0.0625, "pgd-steps": 2, "eval-samples": 8, "final-eval-samples": 8,
            "eval-batch-size": 8, "loss-backend": "eager", "out-dir": str(out_dir)}
    base.update({k.replace("_", "-"): v for k, v in opts.items()})
    return [a for k, v in base.items() for a in (f"--{k}", str(v))] + ["--no-progress", *extra]


def trainer(out_dir, *extra, **opts) -> Trainer:
    cfg, given = parse_args(tiny(out_dir, *extra, **opts))
    return Trainer(cfg, given)


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    return env


def ckpt(out_dir) -> dict:
    return checkpoint.load(os.path.join(out_dir, checkpoint.CHECKPOINT_NAME))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max()
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {diff}"


# ---- runs of each method ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["anchor", "pgd-at", "trades"])
def test_each_method_writes_metrics_and_checkpoint(tmp_path, method, capsys):
    assert main(tiny(tmp_path, method=method)) == 0
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1]
    row = rows[0]
    parts = EXPECTED_LOSS_PARTS[method]
    assert parts <= set(row) and all(np.isfinite(row[p]) for p in parts | {"loss"})
    weight = {"loss_supcon": 1.0, "loss_ce": 1.0, "loss_kl": 6.0}
    if method != "pgd-at":
        assert row["loss"] == pytest.approx(sum(weight[p] * row[p] for p in parts), rel=1e-5)
    for key in ("clean_acc", "pgd20_acc", "pgd20_trades_acc", "train_adv_acc"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["eval_images"] == 8
    for key in ("images_per_s", "attack_ms", "fwd_bwd_ms", "loss_ms", "step_ms"):
        assert row[key] > 0, key
    assert row["attack_ms"] + row["fwd_bwd_ms"] + row["loss_ms"] <= row["step_ms"] * 1.01

    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 2 and csv_lines[0].split(",")[:2] == ["epoch", "phase"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = json.loads((tmp_path / "final.json").read_text())
    assert {"clean_acc", "pgd20_acc", "pgd20_trades_acc"} <= set(final)
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method

    state = ckpt(tmp_path)
    assert state["epoch"] == 1 and state["global_step"] == 2 and state["config"]["method"] == method
    torch.manual_seed(0)
    init = AnchorNet(10, 0.0625).state_dict()
    assert not torch.equal(init["classifier.weight"], state["model"]["classifier.weight"])
    head_trained = method == "anchor"
    assert torch.equal(init["head.0.weight"], state["model"]["head.0.weight"]) != head_trained


def test_anchor_supcon_attack_and_phase2_trains_only_the_classifier(tmp_path):
    t = trainer(tmp_path, phase2_epochs=1, attack_loss="supcon")
    assert t.train_epoch()["phase"] == 1
    before = {k: v.clone() for k, v in t.net.state_dict().items()}
    row = t.train_epoch()
    assert row["phase"] == 2 and set(EXPECTED_LOSS_PARTS["pgd-at"]) <= set(row)
    after = t.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}  # incl. BN buffers unchanged


@pytest.mark.parametrize("attack,budget", [
    ("pgd", dict(eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)),
    ("fgsm-rs", dict(eps=8 / 255, alpha=1.25 * 8 / 255, steps=1, random_start=True)),
    ("n-fgsm", dict(eps=3 * 8 / 255, alpha=8 / 255, steps=1, random_start=True,
                    start_eps=2 * 8 / 255)),
])
def test_training_attacks_have_their_published_budgets(attack, budget):
    cfg = TrainConfig(method="pgd-at", train_attack=attack).validate()
    assert attack_budget(cfg) == pytest.approx(budget)
    pgd = build_attack("pgd-at", AnchorNet(10, 0.0625), cfg)
    assert pgd.steps == budget["steps"] and pgd.start_eps == budget.get("start_eps")
    assert pgd.name.startswith("pgd10" if attack == "pgd" else attack)


def test_n_fgsm_perturbations_reach_past_eps_but_stay_in_three_eps(tmp_path):
    """N-FGSM's noise (2 eps) plus its step (eps) is not projected back to the eps ball."""
    cfg = TrainConfig(method="pgd-at", train_attack="n-fgsm", eps=0.05).validate()
    torch.manual_seed(0)
    net = AnchorNet(10, 0.0625)
    x = 0.25 + 0.5 * torch.rand(64, 3, 8, 8)  # away from the [0, 1] clamp
    y = torch.randint(0, 10, (64,))
    delta = (build_attack("pgd-at", net, cfg)(x, y) - x).abs().amax()
    assert 0.05 < delta <= 0.15 + 1e-6


@pytest.mark.parametrize("attack", ["fgsm-rs", "n-fgsm"])
def test_single_step_attacks_train_and_record_their_name(tmp_path, attack):
    t = trainer(tmp_path, method="anchor", train_attack=attack)
    row = t.train_epoch()
    assert np.isfinite(row["loss"])
    assert json.loads((tmp_path / "config.json").read_text())["train_attack"] == attack


def test_single_step_attack_needs_an_adversarial_method():
    with pytest.raises(ValueError, match="--train-attack fgsm-rs needs an adversarial --method"):
        TrainConfig(method="standard", train_attack="fgsm-rs").validate()


class _RecordingOptimizer:
    """Stands in for SGD: keeps the gradients of the step instead of applying them."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("method", ["anchor", "trades"])
def test_split_loss_backward_gives_the_joint_gradient(method):
    """The step computes the loss on detached outputs and then backpropagates their gradient
    (to time the loss on its own); that must be the gradient of one joint backward."""
    torch.manual_seed(0)
    net = AnchorNet(10, 0.0625)
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 0, 2, 1, 0])
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    cfg = TrainConfig(method=method, loss_backend="eager")
    opt = _RecordingOptimizer(net.parameters())
    ctx = StepContext(model=net, train_model=net, optimizer=opt, cfg=cfg,
                      timer=SectionTimer(torch.device("cpu")), autocast=contextlib.nullcontext,
                      attack=lambda *_: x_adv,
                      supcon=lambda f, lab: supcon_loss(f, lab, hard_positive_beta=1.0,
                                                        backend="eager"))
    out = STEPS[method](ctx, x, y)

    net.zero_grad()
    if method == "anchor":
        logits, emb = net(torch.cat([x, x_adv]), with_embedding=True)
        loss = supcon_loss(torch.stack([emb[:6], emb[6:]], 1), y, hard_positive_beta=1.0,
                           backend="eager") + F.cross_entropy(logits[6:], y)
    else:
        logits = net(torch.cat([x, x_adv]))
        loss = F.cross_entropy(logits[:6], y) + 6.0 * F.kl_div(
            F.log_softmax(logits[6:], 1), F.softmax(logits[:6], 1), reduction="batchmean")
    loss.backward()
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), g in zip(net.named_parameters(), opt.grads):
        assert (g is None) == (p.grad is None), name  # the baselines leave the head untouched
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---- exact resume ----------------------------------------------------------------------------


def test_resume_repeats_the_next_step_exactly(tmp_path):
    a = trainer(tmp_path, epochs=2)
    a.train_epoch()
    a.save_checkpoint()
    x_a, y_a = next(iter(a.train_loader.epoch(2)))
    out_a = a.step(x_a, y_a)

    b = trainer(tmp_path, "--resume", epochs=2)
    assert b.epoch == 1 and b.global_step == 2
    x_b, y_b = next(iter(b.train_loader.epoch(2)))
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)  # same batch, same augmentation
    out_b = b.step(x_b, y_b)
    for k in ("loss", "loss_supcon", "loss_ce"):
        assert out_a[k].item() == out_b[k].item(), k
    assert_same_state(a.net.state_dict(), b.net.state_dict())
    assert_same_state(a.optimizer.state_dict()["state"][0], b.optimizer.state_dict()["state"][0])


def test_resume_errors_name_the_problem(tmp_path, capsys):
    assert main(tiny(tmp_path, "--resume")) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(tiny(tmp_path)) == 0
    assert main(tiny(tmp_path)) == 2  # a second run into the same folder
    assert "already holds a run" in capsys.readouterr().err
    assert main(tiny(tmp_path, "--resume", lr=0.5)) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5" in err and "(the run used 0.1)" in err


def test_resume_refuses_new_epochs_and_says_when_finished(tmp_path, capsys):
    assert main(tiny(tmp_path, "--progress")) == 0
    err = capsys.readouterr().err
    assert "epoch=1 " in err and "eval:" in err  # the epoch line and the evaluation's bar
    assert main(tiny(tmp_path, "--resume", epochs=2)) == 2  # the schedule depends on it
    assert "--epochs 2 (the run used 1)" in capsys.readouterr().err
    assert main(tiny(tmp_path, "--resume")) == 0
    err = capsys.readouterr().err
    assert "already finished its 1 epochs; nothing to train" in err
    assert "epoch=" not in err  # no epoch was trained again


def test_no_progress_keeps_the_epoch_lines(tmp_path, capsys):
    t = trainer(tmp_path)
    t._print_row({"epoch": 3, "loss": 1.5})
    assert "epoch=3 loss=1.5" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    t = trainer(tmp_path, epochs=3)
    t.log.append(t.train_epoch())
    t.save_checkpoint()
    with torch.no_grad():
        t.net.classifier.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"not finite at epoch 2, step 1 .*epoch 1\) is kept"):
        t.run()
    state = ckpt(tmp_path)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = tiny(tmp_path / "killed", epochs=3, steps_per_epoch=20, eval_every=10,
                synthetic_train_size=320)
    cmd = [sys.executable, "-m", "anchor_kernels.train", *args]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    path = tmp_path / "killed" / checkpoint.CHECKPOINT_NAME
    deadline = time.time() + 240
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive and proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = ckpt(tmp_path / "killed")["epoch"]
    # The kill lands once the first checkpoint exists and before the run's last epoch ends,
    # so that the resume below has epochs left to redo.
    assert 1 <= killed_at < 3, f"killed after epoch {killed_at}; expected 1 or 2 of 3"

    done = subprocess.run(cmd + ["--resume"], env=subprocess_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    ref_args = tiny(tmp_path / "ref", epochs=3, steps_per_epoch=20, eval_every=10,
                    synthetic_train_size=320)
    ref = subprocess.run([sys.executable, "-m", "anchor_kernels.train", *ref_args],
                         env=subprocess_env(), capture_output=True, timeout=300)
    assert ref.returncode == 0, ref.stderr.decode()[-2000:]

    resumed, uninterrupted = ckpt(tmp_path / "killed"), ckpt(tmp_path / "ref")
    assert resumed["epoch"] == 3
    assert_same_state(resumed["model"], uninterrupted["model"])
    rows = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    ref_rows = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r, q in zip(rows, ref_rows):
        for key in ("loss", "loss_supcon", "loss_ce", "clean_acc", "pgd20_acc"):
            assert r.get(key) == q.get(key), (r["epoch"], key)
    assert not [p for p in os.listdir(tmp_path / "killed") if p.endswith(".tmp")]


# ---- data ------------------------------------------------------------------------------------


def write_cifar_folder(folder, n_per_batch=4, n_test=3) -> np.ndarray:
    """The official layout: Python-2-style pickles with bytes keys, rows of 3072 uint8 (the
    R, G, B planes, row-major)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (5 * n_per_batch + n_test, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 5 * n_per_batch + n_test)
    for i in range(6):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        sl = slice(i * n_per_batch, (i + 1) * n_per_batch) if i < 5 else slice(5 * n_per_batch, None)
        batch = {b"batch_label": name.encode(), b"labels": labels[sl].tolist(), b"data": rows[sl],
                 b"filenames": [b"img.png"] * len(labels[sl])}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with open(folder / "batches.meta", "wb") as fh:
        meta = {b"label_names": [b"airplane"] * 10, b"num_vis": 3072,
                b"num_cases_per_batch": n_per_batch}
        pickle.dump(meta, fh, protocol=2)
    return rows, labels


def test_cifar_folder_loader_reads_the_pickle_format(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    rows, labels = write_cifar_folder(folder)
    for path in (folder, tmp_path):  # the folder itself or its parent
        train, test, classes = data.load_dataset("cifar10", str(path))
        assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
        assert train.x.dtype == torch.uint8 and classes == int(labels.max()) + 1
        # pixel (c, r, col) of image i is byte c*1024 + r*32 + col of its row
        i, c, r, col = 7, 2, 5, 30
        assert train.x[i, c, r, col].item() == rows[i, c * 1024 + r * 32 + col]
        assert test.x[1, 1, 31, 0].item() == rows[21, 1024 + 31 * 32]
        assert train.y.tolist() == labels[:20].tolist() and test.y.tolist() == labels[20:].tolist()
    # end to end: one step on the folder
    assert main(tiny(tmp_path / "run", "--dataset", "cifar10", "--data", str(folder),
                     steps_per_epoch=1, pgd_steps=1, batch_size=4, eval_samples=3)) == 0

    (folder / "test_batch").unlink()
    expected = r"lacks test_batch; expected .*data_batch_1.*batches\.meta"
    with pytest.raises(data.DataError, match=expected):
        data.load_dataset("cifar10", str(tmp_path))
    missing = str(tmp_path / "nowhere")
    assert main(tiny(tmp_path / "run2", "--dataset", "cifar10", "--data", missing)) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "x_train" in err
    assert "data_batch_5, test_batch, batches.meta" in err


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)  # NHWC, as Keras saves it
    x_test = rng.random((4, 3, 32, 32)).astype(np.float32)  # NCHW floats in [0, 1]
    path = tmp_path / "c.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(10) % 3, x_test=x_test, y_test=np.arange(4))
    train, test, classes = data.load_dataset("cifar10", str(path))
    assert torch.equal(train.x, torch.from_numpy(x_train).permute(0, 3, 1, 2))
    assert torch.equal(test.x, torch.from_numpy(x_test)) and classes == 4
    loader = data.DeviceLoader(test, 3, "cpu", train=False)
    xs = [x for x, _ in loader.epoch(0)]
    assert [len(x) for x in xs] == [3, 1] and torch.equal(torch.cat(xs), test.x)

    np.savez(path, x_train=x_train, y_train=np.arange(10))
    with pytest.raises(data.DataError, match="lacks array.*x_test, y_test"):
        data.load_dataset("cifar10", str(path))
    np.savez(path, x_train=x_train, y_train=np.arange(10), x_test=x_test * 255, y_test=np.arange(4))
    with pytest.raises(data.DataError, match=r"must lie in \[0, 1\]"):
        data.load_dataset("cifar10", str(path))


def test_train_loader_shards_like_distributed_sampler_and_reshuffles_per_epoch():
    split = data.Split(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10))
    sampler = torch.utils.data.DistributedSampler(range(11), num_replicas=3, rank=1, shuffle=False)
    assert data.shard_indices(11, 1, 3, None).tolist() == list(sampler)
    shards = [data.shard_indices(11, r, 3, torch.Generator().manual_seed(5)) for r in range(3)]
    assert sorted(set(torch.cat(shards).tolist())) == list(range(11))  # 12 slots, one wrapped
    loaders = [data.DeviceLoader(split, 2, "cpu", train=True, rank=r, world=2, seed=3)
               for r in range(2)]
    ep1 = [torch.cat([y for _, y in ld.epoch(1)]) for ld in loaders]
    assert len(loaders[0]) == 2  # 5 images per process, the incomplete batch dropped
    assert not set(ep1[0].tolist()) & set(ep1[1].tolist())
    again = torch.cat([y for _, y in loaders[0].epoch(1)])
    assert torch.equal(ep1[0], again)  # the order is a function of (seed, epoch)
    assert not torch.equal(ep1[0], torch.cat([y for _, y in loaders[0].epoch(2)]))


def test_random_crop_flip_is_a_padded_window_possibly_mirrored():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    padded = F.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        windows = [padded[i, :, t:t + 8, l:l + 8] for t in range(9) for l in range(9)]
        plain = any(torch.equal(w, out[i]) for w in windows)
        mirrored = any(torch.equal(w.flip(2), out[i]) for w in windows)
        assert plain or mirrored, i
        flips += mirrored and not plain
    assert 10 < flips < 54
    again = random_crop_flip(x, 4, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_lr_schedule():
    assert lr_at(0, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.01)
    assert lr_at(9, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(55, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.05)
    assert lr_at(75, 100, 0.1, "step") == pytest.approx(0.001)
    assert lr_at(74, 100, 0.1, "step") == pytest.approx(0.01)


# ---- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["--method", "simclr"], "argument --method: invalid choice: 'simclr'"),
    (["--loss-backend", "fast"], "argument --loss-backend: invalid choice: 'fast'"),
    (["--hard-positive-topk", "2", "--hard-positive-beta", "1"],
     "pass --hard-positive-beta 0 with --hard-positive-topk"),
    (["--eps", "2"], "--eps must be <= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--epochs", "0"], "--epochs must be > 0 (or give --phase2-epochs)"),
    (["--width", "x"], "argument --width: invalid float value: 'x'"),
    (["--config", "/nonexistent.json"], "--config /nonexistent.json: no such file"),
    (["--attack-graph", "--method", "trades"], "--attack-graph needs --method anchor or pgd-at"),
])
def test_bad_flags_give_usage_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_hard_positive_topk_alone_turns_soft_mining_off():
    cfg, given = parse_args(["--hard-positive-topk", "2"])
    assert (cfg.hard_positive_topk, cfg.hard_positive_beta) == (2, 0.0)
    assert given == {"hard_positive_topk"}
    assert parse_args([])[0].hard_positive_beta == 1.0


def test_config_file_and_flag_precedence(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.3, "batch-size": 64, "method": "trades"}))
    cfg, given = parse_args(["--config", str(path), "--lr", "0.2"])
    assert (cfg.lr, cfg.batch_size, cfg.method, cfg.epochs) == (0.2, 64, "trades", 100)
    assert given == {"lr", "batch_size", "method"}
    path.write_text(json.dumps({"learning_rate": 0.3}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    assert "unknown option 'learning_rate'" in capsys.readouterr().err


# ---- multi-process and benchmark ---------------------------------------------------------------


def test_two_process_gloo_run(tmp_path):
    args = tiny(tmp_path, batch_size=16, eval_samples=7, final_eval_samples=7)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "anchor_kernels.train", *args]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert row["world_size"] == 2 and np.isfinite(row["loss_supcon"])
    assert row["eval_images"] == 7  # 4 + 3 over the two shards, counted once
    state = ckpt(tmp_path)
    assert len(state["rng"]) == 2  # each process's streams, for an exact resume
    assert not torch.equal(state["rng"][0]["aug"], state["rng"][1]["aug"])


def test_bench_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--batch", "4", "--width", "0.0625", "--steps", "1",
                       "--warmup", "0", "--pgd-steps", "1", "--image-size", "8",
                       "--loss-backend", "eager", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert res[0]["images_per_s"] > 0 and res[0]["speedup"] == 1.0 and res[0]["speedup_vs"] == "eager"
    assert "images/s" in capsys.readouterr().out and (tmp_path / "b.csv").exists()


def test_bench_attack_graph_rows(tmp_path, capsys):
    """--attack-graph off on: each backend twice; on the CPU the graph rows say why not."""
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--batch", "4", "--width", "0.0625", "--steps", "1",
                       "--warmup", "0", "--pgd-steps", "1", "--image-size", "8",
                       "--loss-backend", "eager", "--attack-graph", "off", "on",
                       "--out", str(out)]) == 0
    plain, graph = json.loads(out.read_text())["results"]
    assert not plain["attack_graph"] and plain["images_per_s"] > 0
    assert graph["attack_graph"] and "cuda_graph=True needs CUDA inputs" in graph["error"]
    assert "eager+graph" in capsys.readouterr().out


def test_bench_compares_with_the_conventional_step(tmp_path, capsys):
    """torchattacks' PGD + the eager loss + AMP, timed beside the trainer's step; the
    speed-ups are against it."""
    pytest.importorskip("torchattacks")
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--batch", "4", "--width", "0.0625", "--steps", "1",
                       "--warmup", "0", "--pgd-steps", "1", "--image-size", "8",
                       "--loss-backend", "conventional", "eager", "--out", str(out)]) == 0
    conventional, eager = json.loads(out.read_text())["results"]
    assert conventional["loss_backend"] == "conventional" and conventional["pgd_backend"] == "torchattacks"
    assert conventional["speedup"] == 1.0 and eager["speedup_vs"] == "conventional"
    assert "attack_ms" not in conventional and eager["attack_ms"] > 0
    assert np.isfinite(conventional["final_loss"]) and conventional["images_per_s"] > 0


def test_conventional_step_trains_like_the_trainers_eager_step():
    """Same weights and batch, an attack with no room to move (so no randomness): the
    baseline's loss is the ANCHOR loss of the eager reference, and one step moves the weights."""
    pytest.importorskip("torchattacks")
    from anchor_kernels.train.baseline import conventional_step

    # eps far below float32's spacing near the pixel values: x_adv == x
    cfg = TrainConfig(method="anchor", pgd_steps=1, random_start=False, eps=1e-12, width=0.0625,
                      loss_backend="eager")
    torch.manual_seed(0)
    net = AnchorNet(10, cfg.width, cfg.embed_dim)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 2, 2])
    with torch.no_grad():
        logits, emb = net(torch.cat([x, x]), with_embedding=True)
        expected = supcon_loss(torch.stack([emb[:6], emb[6:]], 1), y, backend="eager",
                                  hard_positive_beta=cfg.hard_positive_beta) \
            + cfg.ce_weight * F.cross_entropy(logits[6:], y)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = conventional_step(net, opt, cfg, bf16=False)(x, y)
    assert torch.allclose(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


# ---- tier 2: GPU -------------------------------------------------------------------------------


@pytest.fixture
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gpu_run_bf16_channels_last(tmp_path, backend):
    t = trainer(tmp_path, width=0.25, synthetic_image_size=32, batch_size=64,
                synthetic_train_size=256, loss_backend=backend, device="cuda")
    assert t.bf16 and t.channels_last
    assert t.net.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    row = t.train_epoch()
    assert np.isfinite(row["loss"]) and row["images_per_s"] > 0 and row["loss_ms"] > 0


@pytest.mark.gpu
def test_gpu_fused_and_eager_loss_agree_in_the_step(tmp_path, _restore_determinism):
    losses = {}
    for backend in ("eager", "triton"):
        t = trainer(tmp_path / backend, "--deterministic", width=0.25, synthetic_image_size=32,
                    batch_size=64, synthetic_train_size=256, loss_backend=backend, device="cuda")
        x, y = next(iter(t.train_loader.epoch(1, t.channels_last)))
        losses[backend] = t.step(x, y)["loss_supcon"].item()
    assert losses["triton"] == pytest.approx(losses["eager"], rel=2e-2)


@pytest.mark.gpu
def test_gpu_resume_is_exact_with_deterministic(tmp_path, _restore_determinism):
    opts = dict(width=0.25, synthetic_image_size=32, batch_size=64, synthetic_train_size=256,
                device="cuda", epochs=2, loss_backend="eager")
    a = trainer(tmp_path, "--deterministic", **opts)
    a.train_epoch()
    a.save_checkpoint()
    x, y = next(iter(a.train_loader.epoch(2, a.channels_last)))
    out_a = a.step(x, y)["loss"].item()
    b = trainer(tmp_path, "--deterministic", "--resume", **opts)
    x2, y2 = next(iter(b.train_loader.epoch(2, b.channels_last)))
    assert torch.equal(x, x2)
    assert b.step(x2, y2)["loss"].item() == out_a


@pytest.mark.gpu
def test_gpu_compile_run(tmp_path):
    assert main(tiny(tmp_path, "--compile", width=0.25, synthetic_image_size=32, batch_size=64,
                     synthetic_train_size=128, device="cuda", loss_backend="auto")) == 0
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"])


def test_attack_graph_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="--attack-graph needs a CUDA device, the run is on cpu"):
        trainer(tmp_path, "--attack-graph")


@pytest.mark.gpu
def test_gpu_attack_graph_steps_equal_the_eager_attack(tmp_path, _restore_determinism):
    """--attack-graph replays the attack from a CUDA graph: with deterministic kernels, the
    same losses step for step as the attack run eagerly (weights updated in place between)."""
    losses = {}
    for graph in (False, True):
        t = trainer(tmp_path / str(graph), "--deterministic", *(["--attack-graph"] if graph else []),
                    width=0.25, synthetic_image_size=32, batch_size=64, synthetic_train_size=256,
                    loss_backend="triton", device="cuda")
        batches = iter(t.train_loader.epoch(1, t.channels_last))
        losses[graph] = [t.step(*next(batches))["loss"].item() for _ in range(3)]
    assert losses[True] == losses[False]
