"""Real data in the trainer (scikit-learn's digits, any .npz image set), standard training, the
AutoAttack-style evaluation and the experiment command; and the sanity checks of a robustness
evaluation on small models trained here on digits: a standard model's robust accuracy far
below its clean accuracy, robust accuracy falling as eps grows, and 100-step attacks never
leaving a higher accuracy than 20-step ones (gradient masking otherwise)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from anchor_kernels.attacks import PGD
from anchor_kernels.autoattack import (STANDARD_ATTACKS, project, standard_attacks,
                                       worst_case_accuracy)
from anchor_kernels.train import Trainer, main, parse_args
from anchor_kernels.train import data, experiment
from anchor_kernels.train.augment import random_crop_flip
from anchor_kernels.train.models import AnchorNet

from .utils import one_thread  # noqa: F401  (autouse: one torch thread)


def digits_args(out_dir, *extra, **opts) -> list[str]:
    """Command line of a tiny digits run; ``opts`` override defaults (flag=value)."""
    base = {"dataset": "digits", "model": "small-cnn", "width": 0.25, "embed-dim": 16,
            "batch-size": 32, "epochs": 1, "steps-per-epoch": 2, "pgd-steps": 2, "eps": 0.1,
            "alpha": 0.05, "eval-samples": 8, "final-eval-samples": 8, "eval-batch-size": 8,
            "loss-backend": "eager", "out-dir": str(out_dir)}
    base.update({k.replace("_", "-"): v for k, v in opts.items()})
    return [a for k, v in base.items() for a in (f"--{k}", str(v))] + ["--no-progress", *extra]


# ---- data --------------------------------------------------------------------------------


def test_digits_split_is_stratified_drawn_from_the_seed_and_reported():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, test, classes = data.load_dataset("digits", "", seed=3)
    assert classes == 10 and train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.x.min() == 0 and train.x.max() == 1
    # every image once, pixels / 16, labels kept
    both = torch.cat([train.x, test.x]).reshape(1797, 64) * 16
    order = np.lexsort(both.numpy().T)
    ref = raw.data[np.lexsort(raw.data.T)]
    assert np.array_equal(both.numpy()[order], ref)
    counts = np.bincount(test.y.numpy(), minlength=10)
    assert counts.tolist() == test.info["test_per_class"]
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (174..183 images)
    assert test.info["split_seed"] == 3 and test.info["test_images"] == 360
    again = data.load_dataset("digits", "", seed=3)[1]
    other = data.load_dataset("digits", "", seed=4)[1]
    assert torch.equal(again.x, test.x) and not torch.equal(other.x, test.x)
    assert other.info["test_index_sha1"] != test.info["test_index_sha1"]


def test_digits_without_scikit_learn_names_the_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(data.DataError, match=r"pip install scikit-learn"):
        data.load_digits(0)


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw", "rgba"])
def test_npz_of_any_channels_trains_a_model_that_follows_the_input(tmp_path, layout):
    rng = np.random.default_rng(0)
    c = 4 if layout == "rgba" else 1
    nchw = rng.integers(0, 256, (40, c, 12, 12), dtype=np.uint8)
    arrays = {"nchw": nchw, "nhwc": nchw.transpose(0, 2, 3, 1), "rgba": nchw.transpose(0, 2, 3, 1),
              "nhw": nchw[:, 0]}[layout]
    path = tmp_path / "set.npz"
    np.savez(path, x_train=arrays[:32], y_train=np.arange(32) % 5, x_test=arrays[32:],
             y_test=np.arange(8) % 5)
    train, test, classes = data.load_dataset("npz", str(path))
    assert torch.equal(train.x, torch.from_numpy(nchw[:32])) and classes == 5
    assert main(digits_args(tmp_path / "run", "--dataset", "npz", "--data", str(path))) == 0
    t = Trainer(*parse_args(digits_args(tmp_path / "run2", "--dataset", "npz", "--data", str(path),
                                        epochs=1)))
    assert t.net.backbone.layers[0].in_channels == c and t.net.classifier.out_features == 5
    assert t.train_loader.pad == 2 and not t.train_loader.flip  # 12 / 8 -> 2; npz: no flips


def test_npz_errors_name_what_was_expected(tmp_path, capsys):
    good = np.zeros((4, 8, 8, 1), np.uint8)
    cases = {
        "missing.npz": None,
        "notzip.npz": b"not a zip archive",
        "keys.npz": dict(x_train=good, y_train=np.zeros(4, int)),
        "shape.npz": dict(x_train=np.zeros((4, 8, 8, 7), np.uint8), y_train=np.zeros(4, int),
                          x_test=good, y_test=np.zeros(4, int)),
        "ambiguous.npz": dict(x_train=np.zeros((4, 3, 3, 3), np.uint8), y_train=np.zeros(4, int),
                              x_test=good, y_test=np.zeros(4, int)),
        "mismatch.npz": dict(x_train=good, y_train=np.zeros(4, int),
                             x_test=np.zeros((4, 9, 9, 1), np.uint8), y_test=np.zeros(4, int)),
        "labels.npz": dict(x_train=good, y_train=np.zeros(3, int), x_test=good,
                           y_test=np.zeros(4, int)),
    }
    messages = {"missing.npz": "does not exist", "notzip.npz": "cannot read",
                "keys.npz": "lacks array.*x_test, y_test", "shape.npz": r"\(4, 8, 8, 7\)",
                "ambiguous.npz": r"\(4, 3, 3, 3\)", "mismatch.npz": "must match",
                "labels.npz": "y_train must hold 4 integer labels"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            np.savez(path, **content)
        with pytest.raises(data.DataError, match=messages[name]) as err:
            data.load_dataset("npz", str(path))
        if name not in ("labels.npz", "mismatch.npz"):
            assert "x_train, y_train, x_test, y_test" in str(err.value)
    with pytest.raises(data.DataError, match="is a folder, not a file"):
        data.load_dataset("npz", str(tmp_path))
    assert main(digits_args(tmp_path / "run", "--dataset", "npz", "--data",
                            str(tmp_path / "missing.npz"))) == 2
    assert "expected an .npz file with arrays" in capsys.readouterr().err


def test_augmentation_fits_the_size_and_flips_only_where_asked():
    assert [data.crop_padding(s) for s in (8, 12, 28, 32, 64)] == [1, 2, 4, 4, 8]
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8).repeat(64, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    flipped = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    assert any(torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x)))
    kept = random_crop_flip(x, 0, g, flip=False)
    assert torch.equal(kept, x)  # pad 0, no flip: identity


# ---- the methods on digits ---------------------------------------------------------------


@pytest.mark.parametrize("opts", [
    {"method": "standard"}, {"method": "pgd-at"}, {"method": "trades"},
    {"method": "anchor", "hard_positive_beta": 0.0}, {"method": "anchor", "hard_positive_beta": 4.0},
    {"method": "anchor", "hard_positive_beta": 0.0, "hard_positive_topk": 3},
], ids=["standard", "pgd-at", "trades", "anchor-beta0", "anchor-beta4", "anchor-top3"])
def test_tiny_digits_run_of_each_method(tmp_path, opts):
    t = Trainer(*parse_args(digits_args(tmp_path, **opts)))
    assert not t.train_loader.flip and t.train_loader.pad == 1
    init = {k: v.clone() for k, v in t.net.state_dict().items()}
    final = t.run()
    assert final["data"]["dataset"] == "digits" and final["data"]["test_images"] == 360
    with open(tmp_path / "final.json") as fh:
        assert json.load(fh)["data"]["test_index_sha1"] == final["data"]["test_index_sha1"]
    row = t.log.rows[-1]
    assert np.isfinite(row["loss"]) and any(
        not torch.equal(init[k], v) for k, v in t.net.state_dict().items())
    if opts["method"] == "standard":
        assert row["attack_ms"] == 0 and "train_adv_acc" not in row and "train_clean_acc" in row
    else:
        assert row["attack_ms"] > 0


# ---- the AutoAttack-style evaluation -----------------------------------------------------


class _Fixed(torch.nn.Module):
    """Logits that say 'correct' unless the image's first pixel has moved above 0.5."""

    def forward(self, x):
        fooled = (x.flatten(1)[:, 0] > 0.5).float()
        return torch.stack([1 - fooled, fooled], 1) + 0 * self.w

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def test_worst_case_is_per_image_over_the_attacks_and_projects_onto_the_ball():
    model = _Fixed()
    x = torch.full((6, 1, 2, 2), 0.45)
    x[:, 0, 1, 1] = torch.arange(6) / 10  # tells the images apart
    x[5, 0, 0, 0] = 0.9  # misclassified clean
    y = torch.zeros(6, dtype=torch.long)
    seen = []

    def push(ids, amount):
        def attack(xb, yb):
            seen.append(len(xb))
            out = xb.clone()
            hit = torch.tensor([bool(((xb[i] - x).abs().flatten(1).amax(1) == 0)[list(ids)].any())
                                for i in range(len(xb))])
            out[hit, 0, 0, 0] += amount
            return out
        return attack

    res = worst_case_accuracy(model, x, y, {"a": push({0, 1}, 0.1), "b": push({1, 2}, 0.1),
                                            "far": push({3}, 5.0)}, eps=0.1, batch_size=2)
    # a fools 0 and 1, b fools 2 (1 is already gone), "far" oversteps and is projected: 0.45 +
    # 0.1 = 0.55 still fools. Image 4 survives; image 5 was wrong from the start.
    assert res["clean_acc"] == pytest.approx(5 / 6)
    assert res["acc_after"] == pytest.approx({"a": 3 / 6, "b": 2 / 6, "far": 1 / 6})
    assert res["robust_acc"] == pytest.approx(1 / 6)
    assert seen == [2, 2, 1, 2, 1, 2]  # each attack sees only the images still robust
    res = worst_case_accuracy(model, x, y, {"far": push({3}, 5.0)}, eps=0.01)
    assert res["robust_acc"] == pytest.approx(5 / 6)  # 0.46 after projection: not fooled
    x_adv = project(x + 3 * torch.randn_like(x), x, 0.05)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_worst_case_errors_name_the_argument():
    model = _Fixed()
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        worst_case_accuracy(model, torch.full((2, 1, 2, 2), 2.0), y, {}, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        worst_case_accuracy(model, torch.zeros(2, 1, 2, 2), y, {}, eps=0.0)
    with pytest.raises(ValueError, match="names must be a non-empty subset"):
        standard_attacks(model, 0.1, names=("apgd-dlr",))


def test_standard_attacks_use_the_standard_settings():
    net = AnchorNet(10, 0.25, 16, in_channels=1, model="small-cnn")
    attacks = standard_attacks(net, 0.1)
    assert tuple(attacks) == STANDARD_ATTACKS
    apgd, apgdt, fab, square = attacks.values()
    assert apgd.steps == apgdt.steps == fab.steps == 100 and apgd.loss == "ce"
    assert apgd.n_restarts == apgdt.n_restarts == fab.n_restarts == square.n_restarts == 1
    assert apgdt.n_target_classes == fab.n_target_classes == 9 and fab.multi_targeted
    assert square.n_queries == 5000 and square.p_init == 0.8
    assert all(a.eps == 0.1 and a.norm == "Linf" for a in attacks.values())
    wide = standard_attacks(AnchorNet(100, 0.25, 16, in_channels=1, model="small-cnn"), 0.1,
                            num_classes=100, names=("apgd-t",))
    assert wide["apgd-t"].n_target_classes == 9  # the standard's 9, not all 99


# ---- sanity checks on models trained here ------------------------------------------------


def _train(tmp, method: str, epochs: int):
    args = digits_args(tmp, method=method, width=0.5, embed_dim=32, batch_size=128, epochs=epochs,
                       steps_per_epoch=11, lr=0.1, warmup_epochs=1, pgd_steps=3, eps=0.1,
                       alpha=0.05, eval_every=epochs, eval_samples=8, final_eval_samples=8,
                       seed=0)
    t = Trainer(*parse_args(args))
    t.run()
    net = t.net.eval()
    return net, t.test_split.x[:120], t.test_split.y[:120]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("trained")
    return {m: _train(tmp / m, m, e) for m, e in (("standard", 6), ("pgd-at", 6))}


def _pgd_acc(net, x, y, eps, steps):
    attack = PGD(net, eps=eps, alpha=eps / 4, steps=steps, random_start=False)
    return worst_case_accuracy(net, x, y, {"pgd": attack}, eps=eps)


def test_sanity_standard_model_is_accurate_but_not_robust(trained):
    net, x, y = trained["standard"]
    res = _pgd_acc(net, x, y, 0.1, 20)
    assert res["clean_acc"] >= 0.85
    assert res["robust_acc"] <= res["clean_acc"] - 0.5
    adv_net, _, _ = trained["pgd-at"]
    assert _pgd_acc(adv_net, x, y, 0.1, 20)["robust_acc"] >= res["robust_acc"] + 0.2


@pytest.mark.parametrize("method", ["standard", "pgd-at"])
def test_sanity_robust_accuracy_falls_as_eps_grows(trained, method):
    net, x, y = trained[method]
    accs = [_pgd_acc(net, x, y, eps, 20)["robust_acc"] for eps in (0.01, 0.03, 0.1, 0.2, 0.4)]
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[0] and accs[-1] <= 0.1, accs


def test_sanity_100_step_attacks_never_beat_20_step_ones(trained):
    net, x, y = trained["pgd-at"]
    pgd20, pgd100 = (_pgd_acc(net, x, y, 0.1, s)["robust_acc"] for s in (20, 100))
    assert pgd100 <= pgd20
    apgd20, apgd100 = (worst_case_accuracy(net, x, y, standard_attacks(
        net, 0.1, names=("apgd-ce",), steps=s), eps=0.1)["robust_acc"] for s in (20, 100))
    assert apgd100 <= apgd20
    # the AutoAttack-style worst case is at least as strong as PGD-20
    aa = worst_case_accuracy(net, x, y, standard_attacks(net, 0.1, names=("apgd-ce", "apgd-t"),
                                                         steps=20), eps=0.1)
    assert aa["robust_acc"] <= pgd20 and aa["robust_acc"] <= apgd20
    assert 0 < aa["robust_acc"] < aa["clean_acc"]


# ---- the experiment command --------------------------------------------------------------


def test_experiment_writes_json_table_and_plot_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "res" / "digits")
    argv = ["digits", "--epochs", "1", "--steps-per-epoch", "1", "--seeds", "0", "1",
            "--methods", "standard", "PGD-AT", "--eps", "0.1", "0.2", "--aa-steps", "2",
            "--attacks", "apgd-ce", "--eval-samples", "12", "--out", out, "--no-progress"]
    assert experiment.main(argv) == 0
    with open(out + ".json") as fh:
        res = json.load(fh)
    runs = res["runs"]
    assert len(runs) == 8 and {r["method"] for r in runs} == {"standard", "PGD-AT"}
    std = [r for r in runs if r["method"] == "standard"]
    # standard training is eps-independent: one model per seed, evaluated at both eps
    assert sorted((r["seed"], r["eps"]) for r in std) == [(0, 0.1), (0, 0.2), (1, 0.1), (1, 0.2)]
    assert std[0]["train_s"] == next(r["train_s"] for r in std[1:] if r["seed"] == std[0]["seed"])
    assert all(r["eval_images"] == 12 and r["aa_acc"] <= r["clean_acc"] for r in runs)
    row = next(r for r in res["summary"] if r["method"] == "PGD-AT" and r["eps"] == 0.2)
    vals = [r["pgd20_acc"] for r in runs if r["method"] == "PGD-AT" and r["eps"] == 0.2]
    assert row["pgd20_acc"]["mean"] == pytest.approx(np.mean(vals))
    assert row["pgd20_acc"]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert res["split"]["dataset"] == "digits" and res["wall_s"] > 0
    table = open(out + ".md").read()
    assert "| 0.2 | PGD-AT |" in table and "apgd-ce" in table
    assert os.path.getsize(out + ".png") > 1000
    capsys.readouterr()
    assert experiment.main(argv + ["--resume"]) == 0  # nothing left to run
    with open(out + ".json") as fh:
        assert json.load(fh)["runs"] == runs


def test_experiment_rejects_bad_arguments(capsys):
    for argv, msg in ((["digits", "--methods", "SGD"], "unknown"),
                      (["digits", "--attacks", "pgd"], "--attacks must be"),
                      (["digits", "--eps", "0"], "--eps values")):
        with pytest.raises(SystemExit):
            experiment.parse_args(argv)
        assert msg in capsys.readouterr().err
