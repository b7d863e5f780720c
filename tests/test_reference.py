"""The eager reference is the spec: check it against float64 gradcheck, a loop-by-loop
transcription of the definition, the closed-form gradient of the design, and the real
pytorch-metric-learning package."""

import math

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import reference as ref

from .utils import assert_close, labels_for


def loop_loss(f, y, g=None, y_g=None, *, tau, beta=0.0, topk=None, offset=0, normalize=True):
    """Per-anchor losses, one anchor and one column at a time, straight from the definition."""
    g, y_g = (f, y) if g is None else (g, y_g)
    out = []
    for i in range(f.shape[0]):
        zi = f[i] / max(f[i].norm().item(), 1e-12) if normalize else f[i]
        cols = [j for j in range(g.shape[0]) if offset is None or j != offset + i]
        cos = {}
        for j in cols:
            cj = g[j] / max(g[j].norm().item(), 1e-12) if normalize else g[j]
            cos[j] = float(zi @ cj)
        pos = [j for j in cols if y_g[j] == y[i]]
        if not pos:
            out.append(0.0)
            continue
        lse = math.log(sum(math.exp(cos[j] / tau) for j in cols))
        if topk is not None:
            chosen = sorted(pos, key=lambda j: (cos[j], j))[:topk]
            w = {j: 1.0 / len(chosen) for j in chosen}
        else:
            z = sum(math.exp(-beta * cos[j]) for j in pos)
            w = {j: math.exp(-beta * cos[j]) / z for j in pos}
        out.append(sum(wj * (lse - cos[j] / tau) for j, wj in w.items()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["random", "one_class", "all_distinct", "some_alone"])
@pytest.mark.parametrize("mode", [dict(), dict(beta=3.0), dict(topk=2), dict(normalize=False)])
def test_matches_loop_transcription(kind, mode):
    f = torch.randn(11, 5, dtype=torch.float64)
    y = labels_for(kind, 11)
    per_anchor, _ = ref.supcon_per_anchor(
        f, y, temperature=0.3, hard_positive_beta=mode.get("beta", 0.0),
        hard_positive_topk=mode.get("topk"), normalize=mode.get("normalize", True))
    expected = loop_loss(f, y, tau=0.3, beta=mode.get("beta", 0.0), topk=mode.get("topk"),
                         normalize=mode.get("normalize", True))
    assert_close(per_anchor, expected, atol=1e-10, rtol=1e-10, what="per-anchor loss")


@pytest.mark.parametrize("offset", [0, 3, None])
def test_two_sets_match_loop_transcription(offset):
    g = torch.randn(12, 4, dtype=torch.float64)
    y_g = labels_for("random", 12)
    f, y = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))) if offset is None \
        else (g[offset:offset + 5], y_g[offset:offset + 5])
    per_anchor, _ = ref.supcon_per_anchor(f, y, g, y_g, temperature=0.5, hard_positive_beta=1.0,
                                          anchor_offset=offset)
    expected = loop_loss(f, y, g, y_g, tau=0.5, beta=1.0, offset=offset)
    assert_close(per_anchor, expected, atol=1e-10, rtol=1e-10, what="per-anchor loss")


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_closed_form_gradient(detach, beta):
    """dL_i/ds_ij = p_ij - w_ij (detached) or p_ij - w_ij (1 - beta tau (s_ij - sbar_i)):
    the formula every backward kernel implements."""
    tau, m = 0.2, 9
    y = labels_for("random", m)
    s = (torch.randn(m, m, dtype=torch.float64) * 0.5).requires_grad_()
    denom, pos = ref.self_and_positive_masks(y, y, 0)
    lse = torch.logsumexp(s.masked_fill(~denom, float("-inf")), dim=1)
    w = torch.softmax((-beta * tau * s).masked_fill(~pos, float("-inf")), dim=1)
    w = torch.nan_to_num(w) * pos
    w_used = w.detach() if detach else w
    sbar = (w_used * s).sum(1)
    valid = pos.any(1)
    torch.where(valid, lse - sbar, torch.zeros_like(lse)).sum().backward()
    p = torch.exp(s - lse[:, None]).detach() * denom
    w, sbar = w.detach(), sbar.detach()
    expected = p - (w if detach else w * (1 - beta * tau * (s.detach() - sbar[:, None])))
    expected = expected * valid[:, None]
    assert_close(s.grad, expected, atol=1e-12, rtol=1e-10, what="dL/ds")


# Detached soft weights are, by design, not the derivative of the loss (the weights are held
# constant), so gradcheck applies only where the weights are constant or differentiated;
# test_closed_form_gradient covers the detached gradient.
@pytest.mark.parametrize("options", [
    dict(), dict(hard_positive_beta=2.0, detach_weights=False),
    dict(normalize=False), dict(hard_positive_topk=2), dict(reduction="sum"),
])
def test_gradcheck_single_set(options):
    f = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # anchors 5 and 6 have no positive
    fn = lambda x: ak.supcon_loss(x, y, temperature=0.5, backend="eager", **options)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f,))


def test_gradcheck_two_sets():
    f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y, y_g = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 1, 2, 2, 0])
    fn = lambda a, b: ak.supcon_loss(a, y, contrast=b, contrast_labels=y_g, anchor_offset=None,  # noqa: E731
                                     hard_positive_beta=1.0, detach_weights=False, backend="eager")
    assert torch.autograd.gradcheck(fn, (f, g))


def test_zero_rows_and_no_positives_are_finite():
    f = torch.randn(6, 3, dtype=torch.float64)
    f[2] = 0.0
    f.requires_grad_()
    loss = ak.supcon_loss(f, torch.tensor([0, 0, 0, 1, 2, 3]), backend="eager")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all()
    g = torch.randn(5, 3, requires_grad=True)
    loss = ak.supcon_loss(g, torch.arange(5), backend="eager")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(g.grad) == 0


def test_single_row_batch():
    f = torch.randn(1, 8, requires_grad=True)
    loss = ak.supcon_loss(f, torch.zeros(1, dtype=torch.long), backend="eager")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(f.grad).all()


def test_reductions_and_base_temperature():
    f = torch.randn(20, 6, dtype=torch.float64)
    y = labels_for("some_alone", 20)
    per_anchor, valid = ref.supcon_per_anchor(f, y, temperature=0.1)
    none = ak.supcon_loss(f, y, temperature=0.1, base_temperature=0.07, reduction="none",
                          backend="eager")
    assert_close(none, per_anchor * 0.1 / 0.07, atol=1e-12, rtol=1e-12, what="none")
    assert torch.all(none[~valid] == 0)
    mean = ak.supcon_loss(f, y, temperature=0.1, base_temperature=0.07, backend="eager")
    assert_close(mean, none.sum() / valid.sum(), atol=1e-12, rtol=1e-12, what="mean")


@pytest.mark.parametrize("kind", ["random", "some_alone", "all_distinct"])
def test_matches_pytorch_metric_learning(kind):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = torch.randn(32, 16, dtype=torch.float64)
    y = labels_for(kind, 32)
    expected = pml.SupConLoss(temperature=0.1)(emb, y)
    ours = ak.PMLSupConLoss(temperature=0.1, backend="eager")(emb, y)
    assert_close(ours, expected, atol=1e-8, rtol=1e-8, what="loss")
    ref_emb, ref_y = torch.randn(20, 16, dtype=torch.float64), labels_for("random", 20)
    expected = pml.SupConLoss(temperature=0.1)(emb, y, ref_emb=ref_emb, ref_labels=ref_y)
    ours = ak.PMLSupConLoss(temperature=0.1, backend="eager")(emb, y, ref_emb=ref_emb,
                                                             ref_labels=ref_y)
    assert_close(ours, expected, atol=1e-8, rtol=1e-8, what="loss with ref_emb")
