"""The Triton SupCon kernels against the float64 reference (CPU: under TRITON_INTERPRET=1)."""

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels.ops import supcon_triton
from anchor_kernels.ops.supcon_triton import MAX_D

from .utils import assert_close, labels_for, loss_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compare(f, y, g=None, y_g=None, *, dtype=torch.float32, low_precision_rule=False, **kw):
    """Kernel vs float64 reference on per-anchor losses and every input gradient.

    fp32: tight tolerance. fp16/bf16: the kernel's error against float64 must be at most twice
    the eager reference's own error at that precision, plus a small atol.
    """
    weights = torch.rand(f.shape[0], dtype=torch.float64, device=f.device) + 0.5
    ref = loss_and_grads("eager", f.double(), y, None if g is None else g.double(), y_g,
                         weights=weights, **kw)
    out = loss_and_grads("triton", f, y, g, y_g, dtype=dtype, weights=weights, **kw)
    names = ("loss", "grad f", "grad contrast")
    if not low_precision_rule:
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        for name, a, e in zip(names, out, ref):
            if e is not None:
                assert_close(a, e, atol=tol, rtol=tol, what=name)
        return
    low = loss_and_grads("eager", f, y, g, y_g, dtype=dtype, weights=weights, **kw)
    for name, a, e, l in zip(names, out, ref, low):
        if e is not None:
            eager_err = (l.double() - e).abs().max().item()
            kernel_err = (a.double() - e).abs().max().item()
            assert kernel_err <= 2 * eager_err + 1e-3 * (1 + e.abs().max().item()), (
                f"{name}: kernel error {kernel_err:.3e} > 2 x eager error {eager_err:.3e}")


SHAPES = [(1, 3), (2, 3), (3, 59), (97, 59), (130, 128)]
OPTIONS = [
    dict(),
    dict(hard_positive_beta=2.0),
    dict(hard_positive_beta=2.0, detach_weights=False),
    dict(normalize=False, temperature=0.5),
]


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=["supcon", "soft", "soft-exact", "unnormalized"])
def test_single_set(m, d, options):
    f = torch.randn(m, d, device=DEVICE)
    compare(f, labels_for("random", m).to(DEVICE), **options)


@pytest.mark.parametrize("kind", ["one_class", "all_distinct", "some_alone"])
@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_label_patterns(kind, beta):
    f = torch.randn(41, 24, device=DEVICE)
    compare(f, labels_for(kind, 41).to(DEVICE), hard_positive_beta=beta, detach_weights=False)


@pytest.mark.parametrize("m,n,offset", [(3, 97, 0), (17, 97, 40), (97, 130, 33), (5, 3, None), (97, 40, None)])
@pytest.mark.parametrize("options", OPTIONS[:3], ids=["supcon", "soft", "soft-exact"])
def test_two_sets(m, n, offset, options):
    d = 59
    g = torch.randn(n, d, device=DEVICE)
    y_g = labels_for("random", n).to(DEVICE)
    if offset is None:
        f = torch.randn(m, d, device=DEVICE)
        y = torch.randint(0, max(1, n // 4), (m,)).to(DEVICE)
    else:  # the anchors are rows offset..offset+m of the contrast set, as in the distributed case
        f, y = g[offset:offset + m].clone(), y_g[offset:offset + m].clone()
    compare(f, y, g, y_g, anchor_offset=offset, **options)


def test_lse_only_mode():
    """The log-sum-exp-only mode used by top-k mining: value LSE_i and gradient through it."""
    from anchor_kernels.backends import SupConProblem, get_backend
    from anchor_kernels.reference import self_and_positive_masks

    f = torch.randn(37, 20, device=DEVICE, dtype=torch.float64)
    y = labels_for("random", 37).to(DEVICE)
    x = f.clone().requires_grad_()
    z = ak.reference.normalize_rows(x)
    denom, _ = self_and_positive_masks(y, y, 0)
    ref = torch.logsumexp((z @ z.T / 0.2).masked_fill(~denom, float("-inf")), dim=1)
    ref.sum().backward()
    xt = f.float().requires_grad_()
    problem = SupConProblem(xt, y, None, None, 0.2, 0.0, None, True, True, 0, lse_only=True)
    lse, valid = get_backend("triton").per_anchor(problem)
    lse.sum().backward()
    assert valid.all()
    assert_close(lse, ref, atol=1e-4, rtol=1e-4, what="lse")
    assert_close(xt.grad, x.grad, atol=1e-4, rtol=1e-4, what="grad")


def test_strided_inputs():
    base = torch.randn(64, 2 * 59, device=DEVICE)
    f = base[:, ::2]  # non-unit stride along D
    assert not f.is_contiguous()
    compare(f, labels_for("random", 64).to(DEVICE), hard_positive_beta=1.0)
    ft = torch.randn(59, 64, device=DEVICE).T  # transposed storage
    compare(ft, labels_for("random", 64).to(DEVICE))


def test_views_and_simclr():
    feats = torch.randn(16, 2, 32, device=DEVICE)
    ref = ak.supcon_loss(feats.double(), backend="eager")
    out = ak.supcon_loss(feats, backend="triton")
    assert_close(out, ref, atol=1e-5, rtol=1e-5, what="simclr loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_low_precision(dtype, beta):
    f = torch.randn(97, 64, device=DEVICE)
    compare(f, labels_for("random", 97).to(DEVICE), dtype=dtype, low_precision_rule=True,
            hard_positive_beta=beta)


def test_bf16_logits_of_100_stay_finite():
    """1/temperature = 100 in bf16: exponents up to 100 (2^144) must not overflow."""
    f = torch.randn(64, 32, device=DEVICE)
    y = labels_for("random", 64).to(DEVICE)
    compare(f, y, dtype=torch.bfloat16, low_precision_rule=True, temperature=0.01)
    compare(f, y, dtype=torch.bfloat16, low_precision_rule=True, temperature=0.01,
            hard_positive_beta=5.0)


def test_no_positives_gives_zero_and_zero_grad():
    f = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    loss = ak.supcon_loss(f, torch.arange(10, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(f.grad) == 0


def test_zero_norm_rows_are_finite():
    f = torch.randn(12, 8, device=DEVICE)
    f[3] = 0.0
    compare(f, labels_for("random", 12).to(DEVICE))


def test_refusal_reasons():
    f = torch.randn(4, MAX_D + 1, device=DEVICE)
    with pytest.raises(ValueError, match="feature dimension"):
        ak.supcon_loss(f, torch.zeros(4, dtype=torch.long, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        ak.supcon_loss(f[:, :8].double(), torch.zeros(4, dtype=torch.long, device=DEVICE),
                       backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1025, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta,detach", [(0.0, True), (2.0, True), (2.0, False)])
def test_gpu_large(n, dtype, beta, detach):
    f = torch.randn(n, 128, device="cuda")
    y = torch.randint(0, 10, (n,), device="cuda")
    compare(f, y, dtype=dtype, low_precision_rule=dtype != torch.float32,
            hard_positive_beta=beta, detach_weights=detach)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_two_sets(dtype):
    g = torch.randn(3000, 130, device="cuda")
    y_g = torch.randint(0, 10, (3000,), device="cuda")
    compare(g[1000:2025], y_g[1000:2025], g, y_g, anchor_offset=1000, dtype=dtype,
            low_precision_rule=dtype != torch.float32, hard_positive_beta=1.0)


@pytest.mark.gpu
def test_gpu_autocast():
    f = torch.randn(512, 128, device="cuda", requires_grad=True)
    y = torch.randint(0, 10, (512,), device="cuda")
    lin = torch.nn.Linear(128, 128).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        emb = lin(f)
        assert emb.dtype == torch.bfloat16
        loss = ak.supcon_loss(emb, y, backend="triton")
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(f.grad).all()


@pytest.mark.parametrize("two_sets", [False, True])
@pytest.mark.parametrize("beta,detach", [(0.0, True), (2.0, False)])
def test_chunked_passes(monkeypatch, two_sets, beta, detach):
    """Small batches cut the streamed dimension into chunks merged afterwards (forced here)."""
    from anchor_kernels.ops import supcon_triton

    monkeypatch.setattr(supcon_triton, "num_splits", lambda rows, cols, device: 3)
    assert supcon_triton.chunk(300, 3) == 128
    if two_sets:
        g = torch.randn(300, 20, device=DEVICE)
        y_g = labels_for("random", 300).to(DEVICE)
        compare(g[100:400], y_g[100:400], g, y_g, anchor_offset=100, hard_positive_beta=beta,
                detach_weights=detach)
    else:
        compare(torch.randn(300, 20, device=DEVICE), labels_for("random", 300).to(DEVICE),
                hard_positive_beta=beta, detach_weights=detach)


def reduced_loss_and_grads(backend, f, y, g=None, y_g=None, **kw):
    fx = f.detach().clone().requires_grad_()
    gx = None if g is None else g.detach().clone().requires_grad_()
    loss = ak.supcon_loss(fx, y, contrast=gx, contrast_labels=y_g, backend=backend, **kw)
    (3.0 * loss).backward()
    return loss.detach(), fx.grad, (None if gx is None else gx.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("two_sets", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_fused_reduction(monkeypatch, reduction, splits, two_sets, beta):
    """The reduction finished inside the forward launch (last row block to finish, fixed
    order) and the incoming gradient read on the device, with and without column chunks."""
    from anchor_kernels.ops import supcon_triton

    monkeypatch.setattr(supcon_triton, "num_splits", lambda rows, cols, device: splits)
    g = torch.randn(260, 20, device=DEVICE)
    y_g = labels_for("some_alone", 260).to(DEVICE)
    kw = dict(hard_positive_beta=beta, reduction=reduction, base_temperature=0.07)
    if two_sets:
        args = (g[100:170], y_g[100:170], g, y_g)
        kw["anchor_offset"] = 100
    else:
        args = (g, y_g)
    ref = reduced_loss_and_grads("eager", *(a.double() if a.is_floating_point() else a for a in args), **kw)
    out = reduced_loss_and_grads("triton", *args, **kw)
    for name, a, e in zip(("loss", "grad f", "grad contrast"), out, ref):
        if e is not None:
            assert_close(a, e, atol=1e-4, rtol=1e-4, what=name)


@pytest.mark.parametrize("two_sets", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_streaming_path(monkeypatch, two_sets, splits):
    """Large batches: norms from their own small kernel, plain SupCon's positive term from
    class sums around a log-sum-exp-only kernel (forced here on a small batch)."""
    from anchor_kernels.ops import supcon_triton

    monkeypatch.setattr(supcon_triton, "STREAMING_MIN_LOGITS", 1)
    monkeypatch.setattr(supcon_triton, "num_splits", lambda rows, cols, device: splits)
    g = torch.randn(300, 20, device=DEVICE)
    y_g = labels_for("some_alone", 300).to(DEVICE) * 1000 - 7  # any integer range
    if two_sets:
        compare(g[100:250], y_g[100:250], g, y_g, anchor_offset=100)
        compare(g[:40], y_g[:40], g, y_g, anchor_offset=None)
    else:
        compare(g, y_g)
        compare(g, y_g, hard_positive_beta=1.0)  # soft mining: per-logit positives, norms given


@pytest.mark.parametrize("two_sets", [False, True])
def test_norms_first_path(monkeypatch, two_sets):
    """The norms kernel first, then the one-launch forward with per-logit labels and norms
    read, not computed per tile (forced here on a small batch, with extreme norms too)."""
    from anchor_kernels.ops import supcon_triton

    monkeypatch.setattr(supcon_triton, "NORMS_FIRST_MIN_LOGITS", 1)
    monkeypatch.setattr(supcon_triton, "num_splits", lambda rows, cols, device: 2)
    g = torch.randn(300, 20, device=DEVICE)
    g[::7] *= 1e20
    y_g = labels_for("some_alone", 300).to(DEVICE) * 1000 - 7
    for beta in (0.0, 1.0):
        if two_sets:
            compare(g[100:250], y_g[100:250], g, y_g, anchor_offset=100, hard_positive_beta=beta)
        else:
            compare(g, y_g, hard_positive_beta=beta)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_label_dtypes(dtype):
    """Labels are compared as they come: any integer dtype, no densifying pre-pass."""
    f = torch.randn(40, 16, device=DEVICE)
    y = labels_for("random", 40)
    if dtype == torch.int64:
        y = y + 2**40  # beyond 32 bits
    compare(f, y.to(dtype).to(DEVICE), hard_positive_beta=1.0)


def test_huge_and_tiny_norms_stay_exact():
    """Rows of norm 1e20 and 1e-30 (float32): the norms are taken on rows scaled by a power
    of two, so nothing overflows or underflows (a row under eps = 1e-12 is divided by eps,
    as F.normalize does)."""
    f = torch.randn(24, 16, device=DEVICE, dtype=torch.float64)
    y = labels_for("random", 24).to(DEVICE)
    f[::3] *= 1e20
    f[1::3] *= 1e-30
    ref = ak.supcon_loss(f, y, backend="eager")
    out = ak.supcon_loss(f.float(), y, backend="triton")
    assert_close(out, ref, atol=1e-5, rtol=1e-5, what="loss")


def test_huge_beta_is_finite():
    """beta = 1e10: the soft weights collapse on the hardest positive, finite everywhere. Which
    positive is hardest is decided in float32 (as eager float32 decides it), hence the
    precision rule against float64."""
    f = torch.randn(40, 16, device=DEVICE)
    y = labels_for("random", 40).to(DEVICE)
    compare(f, y, hard_positive_beta=1e10, low_precision_rule=True)
    compare(f, y, hard_positive_beta=1e10, detach_weights=False, low_precision_rule=True)


def test_double_backward_is_refused_with_its_reason():
    f = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    y = labels_for("random", 20).to(DEVICE)
    loss = ak.supcon_loss(f, y, backend="triton")
    (grad,) = torch.autograd.grad(loss, f, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not "
                                           r"supported by backend='triton'"):
        grad.sum().backward()


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lse_only,single", [(True, True), (True, False), (False, True), (False, False)])
def test_autotuner_picks_only_from_the_variants_configurations(kernel, dtype, lse_only, single):
    """The autotuner prunes its list to the variant's (the ones the sm_90 report compiles
    and finds spill-free), and the untuned launch takes the first of those."""
    family = supcon_triton.config_family(dtype)
    tuner = supcon_triton._autotuned[(kernel, family)]
    mine = supcon_triton.configs_for(kernel, dtype, lse_only, single)
    assert tuner.early_config_prune(tuner.configs, {}, LSE_ONLY=lse_only, SINGLE_SET=single) == mine
    assert all(c in tuner.configs for c in mine)
    if dtype == torch.bfloat16 and kernel == "bwd" and not (lse_only and single):
        assert {c.kwargs["BLOCK_N"] for c in mine} == {32}


GPU_TILES = sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                    for name, configs in supcon_triton.CONFIGS.items() if "half" in name
                    for c in configs})


@pytest.mark.parametrize("tile", GPU_TILES, ids=[f"{m}x{n}" for m, n in GPU_TILES])
@pytest.mark.parametrize("splits", [1, 3])
def test_gpu_tile_shapes_under_the_interpreter(monkeypatch, tile, splits):
    """Every tile shape the GPU configurations use, run by the interpreter (which otherwise
    runs 32 x 32): the diagonal band, the bounds tile and the chunk merges at those sizes."""
    monkeypatch.setattr(supcon_triton, "INTERPRET_META", {"BLOCK_M": tile[0], "BLOCK_N": tile[1]})
    monkeypatch.setattr(supcon_triton, "num_splits", lambda rows, cols, device: splits)
    g = torch.randn(300, 20, device=DEVICE)
    y_g = labels_for("some_alone", 300).to(DEVICE)
    compare(g, y_g)
    compare(g, y_g, hard_positive_beta=2.0, detach_weights=False)
    compare(g[100:250], y_g[100:250], g, y_g, anchor_offset=100, hard_positive_beta=1.0)
