"""attacks.PGD's torchattacks surface against torchattacks 3.5 itself: targeted modes,
normalisation, training mode, get_logits, save, and evaluate's names for its attacks."""

import pytest
import torch
from torch import nn

from anchor_kernels.attacks import PGD, attack_name, evaluate

from .utils import assert_close

torchattacks = pytest.importorskip("torchattacks")

TOL = dict(atol=1e-12, rtol=0)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def make_model(seed=0, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
              nn.Linear(4 * 6 * 6, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(16, 5))
    return nn.Sequential(*layers).double().eval()


def batch(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


KW = dict(eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)


@pytest.mark.parametrize("mode", ["label", "function", "least_likely", "least_likely_2"])
def test_targeted_modes_match_torchattacks(mode):
    model, (x, y) = make_model(), batch()
    ours, theirs = PGD(model, **KW), torchattacks.PGD(model, **KW)
    for atk in (ours, theirs):
        if mode == "label":
            atk.set_mode_targeted_by_label(quiet=True)
        elif mode == "function":
            atk.set_mode_targeted_by_function(lambda inputs, labels: (labels + 1) % 5, quiet=True)
        else:
            atk.set_mode_targeted_least_likely(kth_min=int(mode[-1]) if mode[-1] == "2" else 1,
                                               quiet=True)
    assert ours.get_mode() == theirs.get_mode()
    target = (y + 2) % 5 if mode == "label" else y
    expected = theirs(x, target)
    assert_close(ours(x, target), expected, **TOL, what=f"x_adv, targeted {mode}")
    assert not torch.equal(expected, torchattacks.PGD(model, **KW)(x, target))  # mode mattered
    ours.set_mode_default(quiet=True)
    assert_close(ours(x, y), torchattacks.PGD(model, **KW)(x, y), **TOL, what="default again")


def test_targeted_random_draws_other_classes_and_descends():
    model, (x, y) = make_model(), batch(64)
    atk = PGD(model, eps=0.3, alpha=0.05, steps=10, random_start=False,
              generator=torch.Generator().manual_seed(3))
    atk.set_mode_targeted_random(quiet=True)
    targets = atk._random_targets(x, y)
    assert ((targets != y) & (targets >= 0) & (targets < 5)).all()
    assert len(set(targets.tolist())) > 2
    atk.set_mode_targeted_by_function(lambda inputs, labels: targets, quiet=True)
    ce = nn.functional.cross_entropy
    assert ce(model(atk(x, y)), targets) < ce(model(x), targets) - 0.05
    with pytest.raises(ValueError, match="supcon"):
        PGD(model, loss="supcon").set_mode_targeted_by_label()


def test_normalization_matches_torchattacks():
    model, (x, y) = make_model(), batch()
    ours, theirs = PGD(model, **KW), torchattacks.PGD(model, **KW)
    ours.set_normalization_used(MEAN, STD)
    theirs.set_normalization_used(MEAN, STD)
    mean, std = torch.tensor(MEAN).reshape(1, 3, 1, 1), torch.tensor(STD).reshape(1, 3, 1, 1)
    x_norm = ((x - mean) / std).double()
    expected = theirs(x_norm, y)
    got = ours(x_norm, y)
    assert_close(got, expected, **TOL, what="normalised x_adv")
    assert_close(ours.get_logits(got), theirs.get_logits(expected), **TOL, what="get_logits")
    assert ours.config()["normalization_used"] is True
    with pytest.raises(ValueError, match="std"):
        ours.set_normalization_used(MEAN, (1.0, 0.0, 1.0))


@pytest.mark.parametrize("flags", [(False, False, False), (True, False, False),
                                   (True, True, False), (True, False, True), (True, True, True)])
def test_model_training_mode_matches_torchattacks(flags):
    model, (x, y) = make_model(dropout=True), batch()
    seen = []
    for m in model:
        m.register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, mod.training)))
    modes = {}
    for name, atk in (("ours", PGD(model, **{**KW, "steps": 1})),
                      ("theirs", torchattacks.PGD(model, **{**KW, "steps": 1}))):
        atk.set_model_training_mode(*flags)
        seen.clear()
        atk(x, y)
        modes[name] = list(seen)
        # ours restores every module's mode; torchattacks leaves an eval model in train mode
        assert name == "theirs" or not any(m.training for m in model.modules())
        model.eval()
    assert modes["ours"] == modes["theirs"]


@pytest.mark.parametrize("save_type", ["float", "int"])
def test_save_matches_torchattacks(tmp_path, save_type, capsys):
    model = make_model().float()  # torchattacks converts only float32 inputs to uint8
    loader = [(x.float(), y) for x, y in (batch(8, seed=s) for s in range(3))]
    ours, theirs = PGD(model, **KW), torchattacks.PGD(model, **KW)
    opts = dict(save_predictions=True, save_clean_inputs=True, save_type=save_type)
    acc, l2, _ = ours.save(loader, str(tmp_path / "ours.pt"), verbose=False, return_verbose=True,
                           **opts)
    their_acc, their_l2, _ = theirs.save(loader, str(tmp_path / "theirs.pt"), verbose=False,
                                         return_verbose=True, **opts)
    assert acc == pytest.approx(their_acc) and l2 == pytest.approx(their_l2, rel=1e-6)
    a, b = torch.load(tmp_path / "ours.pt"), torch.load(tmp_path / "theirs.pt")
    assert set(a) == set(b)
    for key in a:
        if key == "save_type":
            assert a[key] == b[key] == save_type
        else:
            assert a[key].dtype == b[key].dtype, key
            # uint8 pixels: float32 rounding of the step may move x * 255 across an integer
            atol = 1 if a[key].dtype == torch.uint8 else 1e-6
            assert_close(a[key].double(), b[key].double(), atol=atol, rtol=0, what=key)
    assert ours.save(loader, verbose=True) is None
    assert "Robust accuracy" in capsys.readouterr().out


def test_evaluate_names_attacks_by_class_and_settings():
    model = make_model()
    data = [batch(8, seed=s) for s in range(2)]
    pgd = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=2)
    fgsm = torchattacks.FGSM(model, eps=4 / 255)
    ours = PGD(model, steps=2)
    result = evaluate(model, data, [pgd, fgsm, ours], progress=False)
    names = list(result["robust_acc"])
    assert names == [attack_name(pgd), attack_name(fgsm), ours.name]
    assert names[0] == "PGD(eps=0.03137, alpha=0.007843, steps=2, random_start=True)"
    assert names[1] == "FGSM(eps=0.01569)"
    pgd.set_mode_targeted_by_label(quiet=True)
    assert attack_name(pgd).endswith("mode=targeted(label))")
    with pytest.raises(ValueError, match="two attacks are named"):
        evaluate(model, data, [fgsm, torchattacks.FGSM(model, eps=4 / 255)], progress=False)
