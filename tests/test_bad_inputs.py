"""Bad inputs, as a careful user would try them, at every public entry point.

Part 1: per entry point, a table of bad calls with the error type and the words the message
must contain (the argument's name and what was expected). Part 2: inputs that used to give a
silently wrong result (overflowing norms, huge beta, aliased PGD buffers, NaN rows, double
backward), checked against the float64 reference on eager, cpu and (for similarity, selection
and PGD) Triton under the interpreter. Part 3: the trainer's command line, every failure one
line with exit status 2 (bad input) or 1 (environment). The gloo cases (ranks passing
different shapes or dtypes to ``distributed.all_gather_with_grad``) are in test_distributed.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import anchor_kernels as ak
from anchor_kernels import attacks, distributed, reference
from anchor_kernels.train import checkpoint, main

from .test_train import tiny

CPU_BACKENDS = ("eager", "cpu")
OP_BACKENDS = ("eager", "cpu", "triton")  # similarity, selection, PGD: Triton interpreted


def f32(*shape):
    return torch.randn(*shape)


LAB = torch.tensor([0, 1, 0, 1, 2, 2])
F2 = torch.randn(6, 4)
F3 = torch.randn(3, 2, 4)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10))


# (id, call, exception type, words the message must contain)
CASES = [
    # --- supcon_loss
    ("loss-features-list", lambda: ak.supcon_loss([[1.0]], LAB), TypeError,
     ["features must be a torch.Tensor"]),
    ("loss-features-int", lambda: ak.supcon_loss(torch.ones(6, 4, dtype=torch.int64), LAB),
     TypeError, ["features must be float16"]),
    ("loss-features-1d", lambda: ak.supcon_loss(torch.randn(6), LAB), ValueError,
     ["features must be (M, D) or (B, V, D)"]),
    ("loss-features-empty-2d", lambda: ak.supcon_loss(torch.randn(0, 4), LAB[:0]), ValueError,
     ["features is an empty batch"]),
    ("loss-features-no-dim", lambda: ak.supcon_loss(torch.randn(6, 0), LAB), ValueError,
     ["features has no feature dimension"]),
    ("loss-labels-missing", lambda: ak.supcon_loss(F2), ValueError, ["labels is required"]),
    ("loss-labels-shape", lambda: ak.supcon_loss(F2, LAB[:5]), ValueError,
     ["labels must have shape (6,)"]),
    ("loss-labels-float", lambda: ak.supcon_loss(F2, LAB.float()), TypeError,
     ["labels must hold integer class labels"]),
    ("loss-labels-uint16", lambda: ak.supcon_loss(F2, LAB.to(torch.uint16)), TypeError,
     ["labels must have a signed integer dtype", "torch.uint16"]),
    ("loss-labels-device", lambda: ak.supcon_loss(F2, LAB.to("meta")), ValueError,
     ["labels is on meta but features is on cpu"]),
    ("loss-views-labels-shape", lambda: ak.supcon_loss(F3, LAB), ValueError,
     ["labels must have shape (3,)", "B=3"]),
    ("loss-temperature-zero", lambda: ak.supcon_loss(F2, LAB, temperature=0), ValueError,
     ["temperature must be finite and > 0"]),
    ("loss-temperature-nan", lambda: ak.supcon_loss(F2, LAB, temperature=float("nan")),
     ValueError, ["temperature must be finite"]),
    ("loss-temperature-str", lambda: ak.supcon_loss(F2, LAB, temperature="0.1"), TypeError,
     ["temperature must be a real number"]),
    ("loss-temperature-bool", lambda: ak.supcon_loss(F2, LAB, temperature=True), TypeError,
     ["temperature must be a real number"]),
    ("loss-base-temperature", lambda: ak.supcon_loss(F2, LAB, base_temperature=-1), ValueError,
     ["base_temperature must be finite and > 0"]),
    ("loss-beta-negative", lambda: ak.supcon_loss(F2, LAB, hard_positive_beta=-1), ValueError,
     ["hard_positive_beta must be finite and >= 0"]),
    ("loss-beta-inf", lambda: ak.supcon_loss(F2, LAB, hard_positive_beta=float("inf")),
     ValueError, ["hard_positive_beta must be finite"]),
    ("loss-topk-zero", lambda: ak.supcon_loss(F2, LAB, hard_positive_topk=0), ValueError,
     ["hard_positive_topk must be >= 1"]),
    ("loss-topk-float", lambda: ak.supcon_loss(F2, LAB, hard_positive_topk=2.5), TypeError,
     ["hard_positive_topk must be an int"]),
    ("loss-topk-and-beta",
     lambda: ak.supcon_loss(F2, LAB, hard_positive_topk=2, hard_positive_beta=1.0),
     ValueError, ["two mining modes"]),
    ("loss-detach-str", lambda: ak.supcon_loss(F2, LAB, detach_weights="yes"), TypeError,
     ["detach_weights must be a bool"]),
    ("loss-reduction", lambda: ak.supcon_loss(F2, LAB, reduction="avg"), ValueError,
     ["reduction must be one of"]),
    ("loss-backend-name", lambda: ak.supcon_loss(F2, LAB, backend="gpu"), ValueError,
     ["backend must be one of"]),
    ("loss-backend-cuda-on-cpu", lambda: ak.supcon_loss(F2, LAB, backend="cuda"), ValueError,
     ["backend='cuda' cannot run these inputs"]),
    ("loss-contrast-dim", lambda: ak.supcon_loss(F2, LAB, contrast=f32(5, 3),
                                                 contrast_labels=LAB[:5], anchor_offset=None),
     ValueError, ["contrast must be (N, 4)"]),
    ("loss-contrast-dtype", lambda: ak.supcon_loss(F2, LAB, contrast=F2.double(),
                                                   contrast_labels=LAB), TypeError,
     ["contrast has dtype torch.float64 but features has torch.float32"]),
    ("loss-contrast-no-labels", lambda: ak.supcon_loss(F2, LAB, contrast=F2), ValueError,
     ["contrast_labels is required"]),
    ("loss-contrast-labels-alone", lambda: ak.supcon_loss(F2, LAB, contrast_labels=LAB),
     ValueError, ["contrast_labels was given without contrast"]),
    ("loss-offset-past-end", lambda: ak.supcon_loss(F2, LAB, contrast=F2[:4],
                                                    contrast_labels=LAB[:4]), ValueError,
     ["anchor_offset=0 puts the 6 anchors past the end of the 4 contrast rows"]),
    ("loss-offset-negative", lambda: ak.supcon_loss(F2, LAB, contrast=F2, contrast_labels=LAB,
                                                    anchor_offset=-1), ValueError,
     ["anchor_offset must be >= 0"]),
    ("loss-offset-without-contrast", lambda: ak.supcon_loss(F2, LAB, anchor_offset=2),
     ValueError, ["anchor_offset must be 0 when contrast is None"]),
    ("loss-features-empty-3d", lambda: ak.supcon_loss(torch.randn(0, 2, 4)),
     ValueError, ["features is an empty batch"]),
    # --- loss modules
    ("supcon-module-temperature", lambda: ak.SupConLoss(temperature=0), ValueError,
     ["temperature must be finite and > 0"]),
    ("supcon-module-mode", lambda: ak.SupConLoss(contrast_mode="two"), ValueError,
     ["contrast_mode must be one of"]),
    ("supcon-module-2d", lambda: ak.SupConLoss()(F2, LAB), ValueError,
     ["features must be (B, V, ...) with at least 3 dimensions"]),
    ("supcon-module-labels-and-mask", lambda: ak.SupConLoss()(F3, LAB[:3], torch.eye(3)),
     ValueError, ["give labels or mask, not both"]),
    ("supcon-module-mask-shape", lambda: ak.SupConLoss()(F3, mask=torch.eye(4)), ValueError,
     ["mask must be (3, 3)"]),
    ("supcon-module-mask-device", lambda: ak.SupConLoss()(F3, mask=torch.eye(3, device="meta")),
     ValueError, ["mask is on meta but features is on cpu"]),
    ("supcon-module-mask-1d", lambda: ak.SupConLoss()(F3, mask=torch.ones(3)), ValueError,
     ["mask must be 2-D"]),
    ("hard-module-topk", lambda: ak.HardMinedSupConLoss(hard_positive_topk=0)(F2, LAB),
     ValueError, ["hard_positive_topk must be >= 1"]),
    ("hard-module-labels", lambda: ak.HardMinedSupConLoss()(F2, LAB[:2]), ValueError,
     ["labels must have shape (6,)"]),
    ("pml-indices-tuple", lambda: ak.PMLSupConLoss()(F2, LAB, indices_tuple=(LAB,)), ValueError,
     ["indices_tuple must be a miner's"]),
    ("pml-ref-labels-alone", lambda: ak.PMLSupConLoss()(F2, LAB, ref_labels=LAB), ValueError,
     ["ref_labels was given without ref_emb"]),
    ("pml-ref-emb-alone", lambda: ak.PMLSupConLoss()(F2, LAB, ref_emb=F2), ValueError,
     ["ref_labels is required with ref_emb"]),
    # --- pairwise_similarity
    ("sim-a-1d", lambda: ak.pairwise_similarity(torch.randn(4)), ValueError,
     ["a must be 2-D"]),
    ("sim-a-int", lambda: ak.pairwise_similarity(torch.ones(2, 2, dtype=torch.int32)), TypeError,
     ["a must be float16"]),
    ("sim-b-dim", lambda: ak.pairwise_similarity(F2, f32(3, 5)), ValueError,
     ["b must be (N, 4) to match a's D"]),
    ("sim-b-dtype", lambda: ak.pairwise_similarity(F2, F2.double()), TypeError,
     ["b has dtype torch.float64 but a has torch.float32"]),
    ("sim-b-device", lambda: ak.pairwise_similarity(F2, F2.to("meta")), ValueError,
     ["b is on meta but a is on cpu"]),
    ("sim-temperature", lambda: ak.pairwise_similarity(F2, temperature=-1.0), ValueError,
     ["temperature must be finite and > 0"]),
    ("sim-normalize-int", lambda: ak.pairwise_similarity(F2, normalize=1), TypeError,
     ["normalize must be a bool"]),
    ("sim-backend", lambda: ak.pairwise_similarity(F2, backend="fast"), ValueError,
     ["backend must be one of"]),
    # --- hard_positive_mining
    ("mine-k-zero", lambda: ak.hard_positive_mining(F2, LAB, 0), ValueError,
     ["k must be >= 1"]),
    ("mine-k-float", lambda: ak.hard_positive_mining(F2, LAB, 1.5), TypeError,
     ["k must be an int"]),
    ("mine-labels-shape", lambda: ak.hard_positive_mining(F2, LAB[:3], 2), ValueError,
     ["labels must have shape (6,)"]),
    ("mine-labels-uint32", lambda: ak.hard_positive_mining(F2, LAB.to(torch.uint32), 2),
     TypeError, ["labels must have a signed integer dtype"]),
    ("mine-contrast-no-labels", lambda: ak.hard_positive_mining(F2, LAB, 2, contrast=F2),
     ValueError, ["contrast_labels is required"]),
    ("mine-offset-past-end", lambda: ak.hard_positive_mining(
        F2, LAB, 2, contrast=F2[:3], contrast_labels=LAB[:3]), ValueError,
     ["anchor_offset=0 puts the 6 anchors past the end of the 3 contrast rows"]),
    ("mine-backend-cuda", lambda: ak.hard_positive_mining(F2, LAB, 2, backend="cuda"),
     ValueError, ["backend='cuda' cannot run these inputs"]),
    # --- pgd_step
    ("step-shape", lambda: ak.pgd_step(f32(2, 3), f32(2, 3), f32(2, 4), 0.1, 0.01), ValueError,
     ["x_adv has shape (2, 3) but x has (2, 4)"]),
    ("step-dtype", lambda: ak.pgd_step(f32(2, 3), f32(2, 3).double(), f32(2, 3), 0.1, 0.01),
     TypeError, ["grad has dtype torch.float64 but x has torch.float32"]),
    ("step-x-int", lambda: ak.pgd_step(f32(2), f32(2), torch.ones(2, dtype=torch.int64), 0.1,
                                       0.01), TypeError, ["x must be float16"]),
    ("step-eps-negative", lambda: ak.pgd_step(f32(2, 3), f32(2, 3), f32(2, 3), -0.1, 0.01),
     ValueError, ["eps must be finite and >= 0"]),
    ("step-alpha-zero", lambda: ak.pgd_step(f32(2, 3), f32(2, 3), f32(2, 3), 0.1, 0), ValueError,
     ["alpha must be finite and > 0"]),
    ("step-eps-tensor-shape", lambda: ak.pgd_step(f32(2, 3), f32(2, 3), f32(2, 3), f32(3), 0.01),
     ValueError, ["eps as a tensor must have shape (2,)"]),
    ("step-bounds", lambda: ak.pgd_step(f32(2, 3), f32(2, 3), f32(2, 3), 0.1, 0.01, 1.0, 0.0),
     ValueError, ["lo must be < hi"]),
    ("step-norm", lambda: ak.pgd_step(f32(2, 3), f32(2, 3), f32(2, 3), 0.1, 0.01, norm="l3"),
     ValueError, ["norm must be one of"]),
    ("step-x-adv-stride0", lambda: ak.pgd_step(torch.zeros(3).expand(2, 3), f32(2, 3),
                                               f32(2, 3), 0.1, 0.01), ValueError,
     ["x_adv has elements that share memory", "clone()"]),
    ("step-l2-cpu", lambda: ak.pgd_step(f32(2, 3), f32(2, 3), f32(2, 3), 0.1, 0.01, norm="l2",
                                        backend="cpu"), ValueError,
     ["backend='cpu' cannot run this PGD call", "norm='l2'"]),
    # --- pgd_random_start
    ("start-generator-str", lambda: ak.pgd_random_start(f32(2, 3), 0.1, generator="gen"),
     TypeError, ["generator must be a torch.Generator or None, got str"]),
    ("start-seed-negative", lambda: ak.pgd_random_start(f32(2, 3), 0.1, seed=-1), ValueError,
     ["seed must be >= 0"]),
    ("start-seed-huge", lambda: ak.pgd_random_start(f32(2, 3), 0.1, seed=2 ** 63), ValueError,
     ["seed must be < 2^63"]),
    ("start-eps-nan", lambda: ak.pgd_random_start(f32(2, 3), float("nan")), ValueError,
     ["eps must be finite"]),
    ("start-out-shape", lambda: ak.pgd_random_start(f32(2, 3), 0.1, out=f32(3, 2)), ValueError,
     ["out has shape (3, 2) but x has (2, 3)"]),
    ("start-out-stride0", lambda: ak.pgd_random_start(f32(2, 3), 0.1,
                                                      out=torch.zeros(3).expand(2, 3)),
     ValueError, ["out has elements that share memory"]),
    # --- PGD and evaluate
    ("pgd-labels-out-of-range", lambda: attacks.PGD(_tiny_model(), steps=1)(
        torch.rand(2, 3, 4), torch.tensor([3, 110])), ValueError,
     ["y must hold class indices in [0, 10)", "[3, 110]"]),
    ("pgd-labels-negative", lambda: attacks.PGD(_tiny_model(), steps=1)(
        torch.rand(2, 3, 4), torch.tensor([-1, 0])), ValueError,
     ["y must hold class indices in [0, 10)"]),
    ("pgd-labels-shape", lambda: attacks.PGD(_tiny_model(), steps=1)(
        torch.rand(2, 3, 4), torch.tensor([1, 2, 3])), ValueError,
     ["y must have shape (2,)"]),
    ("pgd-x-out-of-box", lambda: attacks.PGD(_tiny_model(), steps=1)(
        torch.rand(2, 3, 4) + 2, torch.tensor([1, 2])), ValueError,
     ["x must lie in [lo, hi]"]),
    ("evaluate-x-only-batches", lambda: attacks.evaluate(
        _tiny_model(), [(torch.rand(2, 3, 4),)], progress=False), ValueError,
     ["data must yield (x, y) batches, got a tuple of 1"]),
    ("evaluate-attack-not-callable", lambda: attacks.evaluate(
        _tiny_model(), [(torch.rand(2, 3, 4), torch.tensor([0, 1]))], {"pgd": "pgd20"},
        progress=False), TypeError, ["attack 'pgd' must be callable", "str"]),
    ("evaluate-max-samples", lambda: attacks.evaluate(
        _tiny_model(), [(torch.rand(2, 3, 4), torch.tensor([0, 1]))], max_samples=0,
        progress=False), ValueError, ["max_samples must be >= 1"]),
    # --- distributed helpers without a process group
    ("dist-gather-no-group", lambda: distributed.all_gather_with_grad(F2), RuntimeError,
     ["init_process_group"]),
    ("dist-loss-no-group", lambda: distributed.supcon_loss(F2, LAB), RuntimeError,
     ["init_process_group"]),
]


def _params(cases):
    """pytest params named by each case's id (a case is a tuple or a pytest.param of one)."""
    out = []
    for c in cases:
        values, marks = (c.values, c.marks) if hasattr(c, "marks") else (c, ())
        out.append(pytest.param(*values[1:], id=values[0], marks=marks))
    return out


@pytest.mark.parametrize("call,exc,words", _params(CASES))
def test_bad_input_gives_a_clear_error(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


# --- part 2: inputs that used to give silently wrong results --------------------------------

def _batch(m=12, d=8, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen), torch.randint(0, classes, (m,), generator=gen)


def _close(got, want, rtol, atol=0.0):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


# (id, features from a float32 batch f, rtol): rows whose sum of squares overflows the dtype
# (float16 |x| < 6e4 with norms past 65504), and rows far below eps (taken as zero, as
# F.normalize does).
HUGE = [("f32-1e20", lambda f: f * 1e20, 1e-5), ("f32-1e36", lambda f: f * 1e36, 1e-5),
        ("bf16-1e36", lambda f: (f * 1e36).bfloat16(), 2e-2),
        ("f16-6e4", lambda f: (f.clamp(-3, 3) * 2e4).half(), 5e-3),
        ("f32-1e-30", lambda f: f * 1e-30, 1e-5)]


def _check_extreme_norms(make, rtol, backend, device="cpu"):
    f, y = _batch()
    x = make(f).to(device).requires_grad_(True)
    xd = x.detach().cpu().double().requires_grad_(True)
    want = reference.supcon_loss(xd, y, hard_positive_beta=0.5)
    got = ak.supcon_loss(x, y.to(device), hard_positive_beta=0.5, backend=backend)
    _close(got.cpu(), want, rtol)
    got.backward()
    want.backward()
    # gradients scale as 1 / ||x||: compare them at unit scale
    scale = xd.detach().norm(dim=1, keepdim=True)
    assert torch.isfinite(x.grad).all()
    _close(x.grad.cpu().double() * scale, xd.grad * scale, rtol=max(rtol, 1e-4), atol=max(rtol, 1e-3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("make,rtol", [pytest.param(m, r, id=i) for i, m, r in HUGE])
def test_loss_with_extreme_norms_matches_the_reference(make, rtol, backend):
    _check_extreme_norms(make, rtol, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("make,rtol", [pytest.param(m, r, id=i) for i, m, r in HUGE])
def test_gpu_loss_with_extreme_norms_matches_the_reference(make, rtol, backend):
    """The GPU kernels scale rows that could overflow inside their ops (the CUDA kernels'
    overflow-safe copy, Triton's norms): same results as on CPU."""
    _check_extreme_norms(make, rtol, backend, "cuda")


def _check_huge_similarity(make, rtol, backend, device="cpu"):
    f, y = _batch(m=10, d=6)
    x = make(f).to(device).requires_grad_(True)
    xd = x.detach().cpu().double().requires_grad_(True)
    want = reference.pairwise_similarity(xd)
    got = ak.pairwise_similarity(x, backend=backend)
    _close(got.cpu(), want, rtol, atol=rtol)
    got.double().sum().backward()
    want.sum().backward()
    scale = xd.detach().norm(dim=1, keepdim=True)
    assert torch.isfinite(x.grad).all()
    _close(x.grad.cpu().double() * scale, xd.grad * scale, rtol=max(rtol, 1e-4), atol=max(rtol, 1e-3))
    idx, cos = ak.hard_positive_mining(x.detach(), y.to(device), 2, backend=backend)
    want_idx, want_cos = reference.hard_positive_mining(xd.detach(), y, 2)
    assert torch.equal(idx.cpu(), want_idx)
    _close(cos.cpu(), want_cos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("make,rtol", [pytest.param(m, r, id=i) for i, m, r in HUGE[:4]])
def test_similarity_and_selection_with_huge_norms_match_the_reference(make, rtol, backend):
    _check_huge_similarity(make, rtol, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("make,rtol", [pytest.param(m, r, id=i) for i, m, r in HUGE[:4]])
def test_gpu_similarity_and_selection_with_huge_norms_match_the_reference(make, rtol, backend):
    """On the GPU too (the CUDA ops scale such rows inside, from their row-norms launch)."""
    _check_huge_similarity(make, rtol, backend, "cuda")


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("backend,dtype,beta", [
    ("eager", torch.float32, 1e10), ("eager", torch.float32, 1e30), ("eager", torch.float32, 1e300),
    ("eager", torch.float64, 1e300), ("cpu", torch.float32, 1e3), ("cpu", torch.float64, 1e10)])
def test_huge_beta_stays_finite_and_matches_the_reference(backend, dtype, beta, detach):
    f, y = _batch(seed=1)
    x = f.to(dtype).clone().requires_grad_(True)
    xd = f.double().requires_grad_(True)
    kw = dict(hard_positive_beta=beta, detach_weights=detach)
    got = ak.supcon_loss(x, y, backend=backend, **kw)
    want = reference.supcon_loss(xd, y, **kw)
    assert torch.isfinite(got)
    _close(got, want, rtol=1e-5)
    got.backward()
    want.backward()
    assert torch.isfinite(x.grad).all()
    _close(x.grad, xd.grad, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype,beta", [(torch.float32, 1e4), (torch.float16, 1e10),
                                        (torch.float64, 1e12)])
def test_beta_past_the_kernels_resolution_is_refused_by_name(dtype, beta):
    f, y = _batch()
    with pytest.raises(ValueError) as info:
        ak.supcon_loss(f.to(dtype), y, hard_positive_beta=beta, backend="cpu")
    assert "hard_positive_beta" in str(info.value) and "backend='eager'" in str(info.value)
    # "auto" takes the eager backend, which has no such bound
    assert torch.isfinite(ak.supcon_loss(f.to(dtype), y, hard_positive_beta=beta))


DOUBLE_BACKWARD = {
    "loss": lambda f, y, b: ak.supcon_loss(f, y, hard_positive_beta=0.5, backend=b),
    "loss-topk": lambda f, y, b: ak.supcon_loss(f, y, hard_positive_topk=2, backend=b),
    "loss-contrast": lambda f, y, b: ak.supcon_loss(f[:4], y[:4], contrast=f, contrast_labels=y,
                                                    backend=b),
    "similarity": lambda f, y, b: ak.pairwise_similarity(f, backend=b).sum(),
}


@pytest.mark.parametrize("what", DOUBLE_BACKWARD)
def test_double_backward_is_refused_by_the_fused_backends_and_runs_on_eager(what):
    f, y = _batch()
    f = f.double().requires_grad_(True)
    fn = DOUBLE_BACKWARD[what]
    (g,) = torch.autograd.grad(fn(f, y, "eager"), f, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), f)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0
    (g,) = torch.autograd.grad(fn(f, y, "cpu"), f, create_graph=True)  # first backward: fine
    with pytest.raises(RuntimeError) as info:
        g.pow(2).sum().backward()
    assert str(info.value) == ("anchor_kernels: double backward (create_graph=True) is not "
                               "supported by backend='cpu'; use backend='eager'")


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_pgd_with_overlapping_buffers_matches_the_reference(backend):
    gen = torch.Generator().manual_seed(3)
    buf, g = torch.rand(193, generator=gen), torch.randn(192, generator=gen)
    want = reference.pgd_step(buf[1:].clone(), g, buf[:-1].clone(), 0.1, 0.05)
    ak.pgd_step(buf[1:], g, buf[:-1], 0.1, 0.05, backend=backend)  # x_adv overlaps x
    assert torch.equal(buf[1:], want)
    x = torch.rand(4, 8, generator=gen)
    want = reference.pgd_step(x.clone(), x.clone(), x.clone(), 0.1, 0.05)
    ak.pgd_step(x, x, x, 0.1, 0.05, backend=backend)  # one tensor in every role
    assert torch.equal(x, want)
    buf = torch.rand(65, generator=gen)
    want = reference.pgd_random_start(buf[:-1].clone(), 0.1, seed=5)
    got = ak.pgd_random_start(buf[:-1], 0.1, seed=5, out=buf[1:], backend=backend)
    assert torch.equal(got, want)


def test_selection_ranks_nan_cosines_last_on_every_backend():
    z, y = _batch(m=10, d=6, classes=2, seed=4)
    z[2] = float("nan")  # anchor 2's cosines are all NaN; every column 2 is NaN
    want = ak.hard_positive_mining(z, y, 3, backend="eager")
    positives = [j for j in range(10) if y[j] == y[2] and j != 2]
    assert want[0][2].tolist() == positives[:3] and torch.isnan(want[1][2]).all()
    for i in range(10):  # other rows: real positives first, column 2 only after them
        row = want[0][i].tolist()
        if 2 in row:
            assert row.index(2) == sum(1 for j in row if j >= 0) - 1
    for backend in OP_BACKENDS[1:]:
        idx, cos = ak.hard_positive_mining(z, y, 3, backend=backend)
        assert torch.equal(idx, want[0]), backend
        torch.testing.assert_close(cos, want[1], equal_nan=True)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_half_selection_ranks_float32_cosines(backend):
    z, y = _batch(m=40, d=16, seed=5)
    z = z.half()
    idx, cos = ak.hard_positive_mining(z, y, 3, backend=backend)
    want_idx, want_cos = reference.hard_positive_mining(z.double(), y, 3)
    assert cos.dtype == torch.float32 and torch.equal(idx, want_idx)
    assert (cos.double() - want_cos).abs().max() < 1e-6


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_huge_k_is_clamped_to_the_contrast_rows(backend):
    z, y = _batch(m=10, d=4)
    idx, cos = ak.hard_positive_mining(z, y, 10 ** 12, backend=backend)
    want = ak.hard_positive_mining(z, y, 10, backend="eager")
    assert idx.shape == (10, 10) and torch.equal(idx, want[0])
    if backend != "triton":  # the loss's top-k mode on triton is the SupCon kernels' owner's
        _close(ak.supcon_loss(z, y, hard_positive_topk=10 ** 12, backend=backend),
               reference.supcon_loss(z.double(), y, hard_positive_topk=10), rtol=1e-5)


# --- part 3: the trainer's command line --------------------------------------------------

def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("anchor-train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_out_dir_naming_a_file_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("x")
    assert main(tiny(path)) == 2
    line = _one_line_error(capsys)
    assert "--out-dir" in line and "is a file, not a folder" in line


def test_out_dir_that_cannot_be_created_is_an_environment_error(capsys):
    assert main(tiny("/proc/anchor-kernels-no-such-dir/run")) == 1
    assert "/proc/anchor-kernels-no-such-dir" in _one_line_error(capsys)


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_full_disk_corrupt_or_foreign_checkpoints_and_leftover_temporaries(tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "run"
    real_fdopen, saves = os.fdopen, []

    def fdopen(fd, *args, **kwargs):  # the second checkpoint save meets a full disk
        fh = real_fdopen(fd, *args, **kwargs)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            saves.append(fd)
            if len(saves) == 2:
                return _FullDisk(fh)
        return fh

    fast = dict(epochs=2, steps_per_epoch=1, pgd_steps=1)
    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    assert main(tiny(out, **fast)) == 1
    monkeypatch.undo()
    assert "No space left on device" in _one_line_error(capsys)
    path = out / checkpoint.CHECKPOINT_NAME
    assert checkpoint.load(str(path))["epoch"] == 1  # the previous checkpoint is intact
    assert not list(out.glob(checkpoint.TEMP_PATTERN))

    good = path.read_bytes()
    flipped = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 64):
        flipped[i] ^= 0xFF
    bad = {"corrupted": bytes(flipped), "truncated": good[:len(good) // 3],
           "plain torch.save": None, "a list": [1, 2], "missing keys": {"format": 1}}
    words = {"corrupted": "is corrupted", "truncated": "is corrupted",
             "plain torch.save": "is not an anchor_kernels checkpoint",
             "a list": "holds a list, not a trainer checkpoint",
             "missing keys": "lacks epoch, global_step"}
    for name, content in bad.items():
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is None:
            torch.save({"epoch": 1}, path)
        else:
            checkpoint.save(content, str(path))
        assert main(tiny(out, "--resume", **fast)) == 2, name
        assert words[name] in _one_line_error(capsys), name

    path.write_bytes(good)
    (out / ".checkpoint-abc123.tmp").write_bytes(good[:100])  # a kill during a save
    assert main(tiny(out, "--resume", **fast)) == 0
    assert not list(out.glob(checkpoint.TEMP_PATTERN))
    assert checkpoint.load(str(path))["epoch"] == 2
