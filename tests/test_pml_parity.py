"""PMLSupConLoss against pytorch-metric-learning's SupConLoss, and SupConLoss's label shapes
against SupContrast's: forward values and gradients, case by case."""

import pytest
import torch
import torch.nn.functional as F

import anchor_kernels as ak
from anchor_kernels import reference as ref

from .utils import assert_close, labels_for

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-9, rtol=1e-9)


def run(module, emb, *args, ref_emb=None, **kw):
    """Loss and the gradients of embeddings (and ref_emb) for ``module(emb, *args, **kw)``."""
    emb = emb.detach().clone().requires_grad_()
    if ref_emb is not None:
        ref_emb = emb if ref_emb == "same" else ref_emb.detach().clone().requires_grad_()
        kw["ref_emb"] = ref_emb
    loss = module(emb, *args, **kw)
    if loss.requires_grad:
        loss.sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t)
             for t in (emb, ref_emb) if t is not None and t.requires_grad]
    return loss.detach(), grads


def assert_matches(ours, theirs, emb, *args, tol=TOL, **kw):
    loss, grads = run(ours, emb, *args, **kw)
    expected, expected_grads = run(theirs, emb, *args, **kw)
    assert_close(loss, expected, **tol, what="loss")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close(g, e, **tol, what=f"gradient {i}")
    return loss, grads


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("kind", ["random", "some_alone", "one_class", "all_distinct"])
def test_self_case(backend, kind):
    emb, y = torch.randn(24, 8, dtype=torch.float64), labels_for(kind, 24)
    loss, grads = assert_matches(ak.PMLSupConLoss(0.1, backend=backend),
                                 pml_losses.SupConLoss(0.1), emb, y)
    if kind in ("one_class", "all_distinct"):  # no negative pair / no positive pair
        assert loss.item() == 0 and torch.count_nonzero(grads[0]) == 0


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_average_over_nonzero_losses(backend):
    # Well-separated classes at tau = 0.05: four anchors' float32 losses are exactly 0, and
    # PML's AvgNonZeroReducer leaves them out of the mean (log 5, not 2 log 5 / 6).
    e = torch.tensor([[1., 0, 0], [1, 0, 0], [-1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, 1]])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, _ = assert_matches(ak.PMLSupConLoss(0.05, backend=backend), pml_losses.SupConLoss(0.05),
                             e, y, tol=dict(atol=1e-6, rtol=1e-6))
    assert loss.item() == pytest.approx(1.6094379, abs=1e-6)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_ref_emb_self_case_is_decided_by_identity(backend):
    emb, y = torch.randn(20, 8, dtype=torch.float64), labels_for("random", 20)
    ours, theirs = ak.PMLSupConLoss(0.1, backend=backend), pml_losses.SupConLoss(0.1)
    same, _ = assert_matches(ours, theirs, emb, y, ref_emb="same", ref_labels=y)
    plain, _ = run(ours, emb, y)
    assert_close(same, plain, **TOL, what="ref_emb=embeddings, ref_labels=labels")
    # Equal values but other tensors: the anchor's own copy counts, as in PML.
    other, _ = assert_matches(ours, theirs, emb, y, ref_emb=emb.clone(), ref_labels=y.clone())
    assert abs(other.item() - same.item()) > 1e-3
    # A different reference set, and ref_labels that is labels with another ref_emb.
    ref_emb, ref_y = torch.randn(12, 8, dtype=torch.float64), labels_for("random", 12)
    assert_matches(ours, theirs, emb, y, ref_emb=ref_emb, ref_labels=ref_y)
    assert_matches(ours, theirs, emb, y, ref_emb=torch.randn(20, 8, dtype=torch.float64),
                   ref_labels=y)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_float32_on_the_default_device(backend):
    # auto: the C++ kernel on the CPU; triton: the interpreter on the CPU, the kernels on a GPU
    emb, y = torch.randn(32, 16), labels_for("some_alone", 32)
    ours = ak.PMLSupConLoss(0.1, backend=backend)
    loss, grads = run(ours, emb.to(DEVICE), y.to(DEVICE))
    expected, expected_grads = run(pml_losses.SupConLoss(0.1), emb.double(), y)
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, what="loss")
    assert_close(grads[0], expected_grads[0], atol=1e-5, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("miner", [
    miners.MultiSimilarityMiner(epsilon=0.1), miners.BatchHardMiner(),
    miners.TripletMarginMiner(margin=0.2, type_of_triplets="all"), miners.PairMarginMiner()])
def test_miner_indices_tuple(miner):
    emb, y = torch.randn(24, 8, dtype=torch.float64), labels_for("random", 24)
    indices = miner(emb, y)
    assert_matches(ak.PMLSupConLoss(0.1), pml_losses.SupConLoss(0.1), emb, y,
                   indices_tuple=indices)
    ref_emb, ref_y = torch.randn(16, 8, dtype=torch.float64), labels_for("random", 16)
    indices = miner(emb, y, ref_emb, ref_y)
    assert_matches(ak.PMLSupConLoss(0.1), pml_losses.SupConLoss(0.1), emb, y,
                   indices_tuple=indices, ref_emb=ref_emb, ref_labels=ref_y)


def test_indices_tuple_edge_cases():
    emb, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    ours, theirs = ak.PMLSupConLoss(0.1), pml_losses.SupConLoss(0.1)
    one_pair = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    loss, _ = assert_matches(ours, theirs, emb, y, indices_tuple=one_pair)
    assert loss.item() == 0  # PML: at most one pair of each kind gives its zero loss
    no_negatives = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([], dtype=torch.int64),
                    torch.tensor([], dtype=torch.int64))
    assert run(ours, emb, y, indices_tuple=no_negatives)[0].item() == 0
    assert_matches(ours, theirs, emb, None, indices_tuple=(torch.tensor([0, 2, 4]),
                                                           torch.tensor([1, 3, 5]),
                                                           torch.tensor([3, 4, 0])))
    with pytest.raises(ValueError, match="both positive and negative"):
        ours(emb, y, indices_tuple=(torch.tensor([0, 1]), torch.tensor([1, 2]),
                                    torch.tensor([0, 3]), torch.tensor([1, 4])))
    with pytest.raises(ValueError, match="indices_tuple must be"):
        ours(emb, y, indices_tuple=(torch.tensor([0]), torch.tensor([1])))


@pytest.mark.parametrize("make", [
    reducers.MeanReducer, reducers.SumReducer, reducers.AvgNonZeroReducer,
    lambda: reducers.ThresholdReducer(low=1.5),
    lambda: reducers.ClassWeightedReducer(torch.arange(1, 7, dtype=torch.float64) / 6)])
@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_reducers(make, backend):
    emb, y = torch.randn(24, 8, dtype=torch.float64), labels_for("some_alone", 24) % 6
    assert_matches(ak.PMLSupConLoss(0.1, reducer=make(), backend=backend),
                   pml_losses.SupConLoss(0.1, reducer=make()), emb, y)
    one = torch.zeros(24, dtype=torch.int64)  # the zero loss goes through the reducer too
    assert_matches(ak.PMLSupConLoss(0.1, reducer=make(), backend=backend),
                   pml_losses.SupConLoss(0.1, reducer=make()), emb, one)


def test_do_nothing_reducer_returns_the_loss_dict():
    emb, y = torch.randn(16, 8, dtype=torch.float64), labels_for("some_alone", 16)
    ours = ak.PMLSupConLoss(0.1, reducer=reducers.DoNothingReducer())(emb, y)["loss"]
    theirs = pml_losses.SupConLoss(0.1, reducer=reducers.DoNothingReducer())(emb, y)["loss"]
    assert ours["reduction_type"] == theirs["reduction_type"] == "element"
    assert torch.equal(ours["indices"], theirs["indices"])
    assert_close(ours["losses"], theirs["losses"], **TOL, what="per-anchor losses")


@pytest.mark.parametrize("make", [distances.CosineSimilarity, distances.DotProductSimilarity,
                                  lambda: distances.DotProductSimilarity(normalize_embeddings=False)])
def test_similarities_and_regularizer(make):
    emb, y = 0.3 * torch.randn(24, 8, dtype=torch.float64), labels_for("random", 24)
    assert_matches(ak.PMLSupConLoss(0.2, distance=make(), backend="cpu"),
                   pml_losses.SupConLoss(0.2, distance=make()), emb, y)
    miner_out = miners.MultiSimilarityMiner(epsilon=0.1)(emb, y)
    assert_matches(ak.PMLSupConLoss(0.2, distance=make()),
                   pml_losses.SupConLoss(0.2, distance=make()), emb, y, indices_tuple=miner_out)
    reg = dict(embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.3)
    assert_matches(ak.PMLSupConLoss(0.2, distance=make(), **reg),
                   pml_losses.SupConLoss(0.2, distance=make(), **reg), emb, y)


def test_attributes_and_refusals():
    emb, y = torch.randn(8, 4), labels_for("random", 8)
    loss = ak.PMLSupConLoss(0.1)
    loss.temperature = 0.5  # read at every call, as PML's attribute
    assert_close(loss(emb, y), pml_losses.SupConLoss(0.5)(emb, y), atol=1e-6, rtol=1e-6,
                 what="temperature changed after construction")
    with pytest.raises(ValueError, match="LpDistance|CosineSimilarity"):
        ak.PMLSupConLoss(distance=distances.LpDistance())
    with pytest.raises(ValueError, match="power=1"):
        ak.PMLSupConLoss(distance=distances.DotProductSimilarity(power=2))
    with pytest.raises(ValueError, match="2D tensor"):
        loss(torch.randn(8, 2, 4), y)
    with pytest.raises(ValueError, match="2D tensor"):
        pml_losses.SupConLoss()(torch.randn(8, 2, 4), y)  # PML refuses them too
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
        loss(emb, y[:, None])
    with pytest.raises(ValueError, match="cannot both be None"):
        loss(emb)
    with pytest.raises(ValueError, match="ref_labels is required"):
        loss(emb, y, ref_emb=emb)
    with pytest.raises(ValueError, match="hard_positive"):
        ak.PMLSupConLoss(hard_positive_beta=1.0)(emb, y, indices_tuple=miners.BatchHardMiner()(emb, y))


@pytest.mark.parametrize("shape", ["(B,)", "(B, 1)"])
@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcontrast_label_shapes(shape, mode):
    feats = F.normalize(torch.randn(12, 2, 8, dtype=torch.float64), dim=-1)
    y = labels_for("random", 12)
    expected = ref.supcontrast_loss(feats, y, temperature=0.07, contrast_mode=mode)
    labels = y if shape == "(B,)" else y[:, None]
    loss = ak.SupConLoss(0.07, mode, backend="cpu")(feats, labels)
    assert_close(loss, expected, atol=1e-10, rtol=1e-10, what=f"labels {shape}")
    with pytest.raises(ValueError, match="labels"):
        ak.SupConLoss()(feats, y[:6, None])
