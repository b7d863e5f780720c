"""The public functional and modules: call shapes, equivalences with the losses users already
have, backend selection, bad input, torch.compile and opcheck."""

import pytest
import torch
import torch.nn.functional as F

import anchor_kernels as ak
from anchor_kernels import reference as ref

from .utils import assert_close, labels_for

# Under the interpreter the Triton backend runs on CPU tensors; the tests name it explicitly.
FUSED = "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("backend", ["eager", FUSED])
def test_supcontrast_module_matches_supcontrast(mode, labelled, backend):
    feats = F.normalize(torch.randn(24, 3, 16, dtype=torch.float64), dim=-1)
    y = labels_for("some_alone", 24) if labelled else None
    expected_x = feats.clone().requires_grad_()
    expected = ref.supcontrast_loss(expected_x, y, temperature=0.07, contrast_mode=mode,
                                    base_temperature=0.07)
    expected.backward()
    dtype, device = (torch.float64, "cpu") if backend == "eager" else (torch.float32, DEVICE)
    x = feats.to(device, dtype).requires_grad_()
    loss = ak.SupConLoss(0.07, mode, 0.07, backend=backend)(x, None if y is None else y.to(device))
    loss.backward()
    tol = 1e-10 if backend == "eager" else 1e-4
    assert_close(loss, expected, atol=tol, rtol=tol, what="loss")
    assert_close(x.grad, expected_x.grad, atol=tol, rtol=tol, what="grad")


def test_supcontrast_module_dense_mask():
    feats = F.normalize(torch.randn(10, 2, 8, dtype=torch.float64), dim=-1)
    y = labels_for("random", 10)
    mask = (y[:, None] == y[None, :]).float()
    by_mask = ak.SupConLoss()(feats, mask=mask)
    by_labels = ak.SupConLoss(backend="eager")(feats, y)
    assert_close(by_mask, by_labels, atol=1e-10, rtol=1e-10, what="mask vs labels")
    with pytest.raises(ValueError, match="labels or mask"):
        ak.SupConLoss()(feats, y, mask)
    with pytest.raises(ValueError, match="mask must be"):
        ak.SupConLoss()(feats, mask=mask[:5])


def test_supcontrast_module_counts_anchors_without_positives():
    """SupContrast averages over all anchors (no-positive anchors count 0); the functional
    averages over anchors with a positive."""
    feats = F.normalize(torch.randn(6, 1, 8, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 0, 1, 2, 3, 4])
    module = ak.SupConLoss(0.1, base_temperature=0.1, backend="eager")(feats, y)
    functional = ak.supcon_loss(feats, y, temperature=0.1, normalize=False, backend="eager")
    assert_close(module * 6, functional * 2, atol=1e-10, rtol=1e-10, what="mean over anchors")


def test_hard_mined_module():
    x = torch.randn(20, 8)
    y = labels_for("random", 20)
    module = ak.HardMinedSupConLoss(temperature=0.2, hard_positive_beta=3.0, backend="eager")
    expected = ak.supcon_loss(x, y, temperature=0.2, hard_positive_beta=3.0, backend="eager")
    assert_close(module(x, y), expected, atol=0, rtol=0, what="module")
    assert "hard_positive_beta=3.0" in repr(module)
    topk = ak.HardMinedSupConLoss(hard_positive_topk=2, backend="eager")
    assert topk.kwargs["hard_positive_beta"] == 0.0


def test_pml_call_shape_runs_fused():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = torch.randn(40, 16)
    y = labels_for("random", 40)
    expected = pml.SupConLoss(temperature=0.1)(emb.double(), y)
    ours = ak.PMLSupConLoss(temperature=0.1, backend=FUSED)(emb.to(DEVICE), y.to(DEVICE))
    assert_close(ours, expected, atol=1e-5, rtol=1e-5, what="loss")
    with pytest.raises(ValueError, match="indices_tuple"):
        ak.PMLSupConLoss()(emb, y, indices_tuple=(y, y, y))
    with pytest.raises(ValueError, match="ref_labels"):
        ak.PMLSupConLoss()(emb, y, ref_emb=emb)


def test_backend_auto_and_refusals():
    x, y = torch.randn(8, 4), labels_for("random", 8)
    assert torch.isfinite(ak.supcon_loss(x, y))  # auto never picks the interpreter
    reasons = ak.available_backends(x, y, temperature=0.1)
    assert reasons["eager"] == []
    assert set(reasons) == {"triton", "cuda", "cpu", "eager"}
    views = ak.available_backends(torch.randn(33, 2, 17), hard_positive_topk=2, backend="eager")
    assert views["eager"] == [] and set(views) == set(reasons)
    with pytest.raises(ValueError, match="labels is required"):
        ak.available_backends(torch.randn(33, 17))
    with pytest.raises(ValueError, match="backend"):
        ak.supcon_loss(x, y, backend="fast")


def test_loss_dtype():
    x, y = torch.randn(8, 4), labels_for("random", 8)
    assert ak.supcon_loss(x.bfloat16(), y, backend="eager").dtype == torch.float32
    assert ak.supcon_loss(x.double(), y, backend="eager").dtype == torch.float64


BAD_INPUTS = [
    (dict(features=[1.0, 2.0]), TypeError, "features must be a torch.Tensor"),
    (dict(features=torch.randn(8)), ValueError, "features must be"),
    (dict(features=torch.randint(0, 3, (8, 4))), TypeError, "features must be float"),
    (dict(features=torch.randn(0, 4), labels=torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
    (dict(features=torch.randn(8, 0)), ValueError, "feature dimension"),
    (dict(labels=None), ValueError, "labels is required"),
    (dict(labels=torch.zeros(7, dtype=torch.long)), ValueError, r"labels must have shape \(8,\)"),
    (dict(labels=torch.zeros(8)), TypeError, "labels must hold integer"),
    (dict(labels=torch.zeros(8, 1, dtype=torch.long)), ValueError, "labels must have shape"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(base_temperature=-1.0), ValueError, "base_temperature"),
    (dict(hard_positive_beta=-0.5), ValueError, "hard_positive_beta must be finite and >= 0"),
    (dict(hard_positive_topk=0), ValueError, "hard_positive_topk must be >= 1"),
    (dict(hard_positive_topk=2.5), TypeError, "hard_positive_topk must be an int"),
    (dict(hard_positive_topk=2, hard_positive_beta=1.0), ValueError, "two mining modes"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(detach_weights="yes"), TypeError, "detach_weights"),
    (dict(contrast=torch.randn(5, 3), contrast_labels=torch.zeros(5, dtype=torch.long)),
     ValueError, r"contrast must be \(N, 4\)"),
    (dict(contrast=torch.randn(5, 4).double(), contrast_labels=torch.zeros(5, dtype=torch.long)),
     TypeError, "contrast has dtype"),
    (dict(contrast=torch.randn(5, 4)), ValueError, "contrast_labels is required"),
    (dict(contrast=torch.randn(5, 4), contrast_labels=torch.zeros(4, dtype=torch.long)),
     ValueError, r"contrast_labels must have shape \(5,\)"),
    (dict(contrast=torch.randn(10, 4), contrast_labels=torch.zeros(10, dtype=torch.long),
          anchor_offset=3), ValueError, "past the end"),
    (dict(anchor_offset=2), ValueError, "anchor_offset must be 0 when contrast is None"),
    (dict(contrast_labels=torch.zeros(8, dtype=torch.long)), ValueError, "without contrast"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_INPUTS)
def test_bad_input(kwargs, error, match):
    call = dict(features=torch.randn(8, 4), labels=torch.zeros(8, dtype=torch.long))
    call.update(kwargs)
    with pytest.raises(error, match=match):
        ak.supcon_loss(call.pop("features"), call.pop("labels"), **call)


def test_bad_views_labels():
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        ak.supcon_loss(torch.randn(4, 2, 8), torch.zeros(8, dtype=torch.long))


def test_nan_features_propagate():
    """Documented: values are not checked (no device sync), NaN reaches the loss."""
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    assert torch.isnan(ak.supcon_loss(x, torch.zeros(8, dtype=torch.long), backend="eager"))
    assert torch.isnan(ak.supcon_loss(x.to(DEVICE), torch.zeros(8, dtype=torch.long, device=DEVICE),
                                      backend=FUSED))


def test_torch_compile_fullgraph():
    x = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    y = labels_for("random", 40).to(DEVICE)

    def step(x):
        return ak.supcon_loss(x, y, hard_positive_beta=1.0, backend=FUSED)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    grad, x.grad = x.grad.clone(), None
    eager = step(x)
    eager.backward()
    assert_close(loss, eager, atol=1e-6, rtol=1e-6, what="compiled loss")
    assert_close(grad, x.grad, atol=1e-6, rtol=1e-6, what="compiled grad")


@pytest.mark.parametrize("single", [True, False])
def test_opcheck_triton_ops(single):
    from anchor_kernels.ops import supcon_triton  # noqa: F401  registers the ops

    f = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    y = labels_for("random", 20).to(DEVICE)
    g, y_g = (None, None) if single else (torch.randn(30, 8, device=DEVICE, requires_grad=True),
                                          labels_for("random", 30).to(DEVICE))
    for reduction in (0, 2):
        args = (f, g, y, y_g, 0, 0.2, 1.5, 0.5, True, False, reduction)
        torch.library.opcheck(torch.ops.anchor_kernels.supcon_fwd_triton.default, args)
        loss, ws = torch.ops.anchor_kernels.supcon_fwd_triton(*args)
        bwd = (torch.ones_like(loss), f.detach(), None if g is None else g.detach(), y, y_g, ws,
               0, 0.2, 1.5, 0.5, True, False, True, reduction)
        torch.library.opcheck(torch.ops.anchor_kernels.supcon_bwd_triton.default, bwd)
