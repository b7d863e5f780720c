"""The loss's top-k mode (``hard_positive_topk=k``) in the fused backends.

Selection rule under test: the fused path ranks float32 cosines (half inputs multiplied
exactly, float32 accumulation); the reference ranks in float64. They select the same
positives whenever no two positives of an anchor are closer in cosine than float32 rounding,
so every random case here asserts that separation first, and ties are tested with exact
duplicates. At scale (tier 2), exact agreement is tested with integer embeddings and
``normalize=False`` (every dot product is exact in every precision).
"""

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import _ext, reference
from anchor_kernels.backends import SupConProblem, get_backend, select_backend
from anchor_kernels.ops import supcon_topk

from .utils import assert_close, labels_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = ["triton", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def device_for(backend):
    return DEVICE if backend in ("triton", "cuda") else "cpu"


@pytest.fixture(scope="module", autouse=True)
def extension():
    """The C++ extension must build on every tier-1 machine; fail with the reason if not."""
    assert _ext.load() is None, _ext.load()
    get_backend("cpu")


class EagerLSE:
    """A stand-in fused backend: LSE_i from the eager formula, as a fused kernel's
    ``lse_only`` mode returns it, and top-k through the shared helper. It isolates the
    top-k path from any one backend and runs in float64 (with the eager selection)."""

    name = "eager-lse"

    def __init__(self, mining):
        self.mining = mining

    def not_supported_reasons(self, p):
        return supcon_topk.topk_reasons(p, self.mining) if p.topk is not None else []

    def per_anchor(self, p):
        if p.topk is not None:
            return supcon_topk.topk_per_anchor(self, p, self.mining)
        assert p.lse_only
        z = reference.normalize_rows(p.f) if p.normalize else p.f
        c = z if p.g is None else (reference.normalize_rows(p.g) if p.normalize else p.g)
        denom, _ = reference.self_and_positive_masks(p.y_f, p.y_f if p.g is None else p.y_g,
                                                     p.anchor_offset)
        has = denom.any(dim=1)
        s = (z @ c.T / p.temperature).masked_fill(~(denom | ~has[:, None]), float("-inf"))
        lse = torch.where(has, torch.logsumexp(s, dim=1), torch.zeros(()))
        return lse.to(p.out_dtype), has


def problem(f, y, g=None, y_g=None, *, k, tau=0.1, normalize=True, offset=0):
    return SupConProblem(f, y, g, y_g, tau, 0.0, k, True, normalize, offset)


def assert_separated(f, y, g=None, y_g=None, offset=0, normalize=True, gap=1e-6):
    z = f.double()
    c = z if g is None else g.double()
    if normalize:
        z, c = reference.normalize_rows(z), reference.normalize_rows(c)
    _, pos = reference.self_and_positive_masks(y, y if g is None else y_g, offset)
    d = (z @ c.T).masked_fill(~pos, float("inf")).sort(dim=1).values.diff(dim=1)
    d = d[torch.isfinite(d)]
    assert d.numel() == 0 or d.min() > gap, f"test data has near-ties ({d.min().item():.2e})"


# ------------------------------------------------------------ the helper, stand-in backend

@pytest.mark.parametrize("separate", [False, True])
def test_helper_float64_exact_and_gradcheck(separate):
    f = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (11,))
    g = torch.randn(15, 5, dtype=torch.float64, requires_grad=True) if separate else None
    y_g = torch.randint(0, 3, (15,)) if separate else None
    offset = None if separate else 0
    backend = EagerLSE("eager")

    def run(*x):
        p = problem(x[0], y, x[1] if separate else None, y_g, k=2, offset=offset)
        return backend.per_anchor(p)[0]

    inputs = (f, g) if separate else (f,)
    want, valid = reference.supcon_per_anchor(f, y, g, y_g, temperature=0.1, hard_positive_topk=2,
                                              anchor_offset=offset)
    assert_close(run(*inputs), want, atol=1e-12, rtol=0, what="per-anchor loss")
    assert torch.autograd.gradcheck(run, inputs)


def test_helper_with_triton_selection():
    f, y = torch.randn(40, 16), labels_for("some_alone", 40)
    assert_separated(f, y)
    f64 = f.double().requires_grad_()
    want, want_valid = reference.supcon_per_anchor(f64, y, temperature=0.1, hard_positive_topk=3)
    fx = f.to(DEVICE).requires_grad_()
    got, valid = EagerLSE("triton").per_anchor(problem(fx, y.to(DEVICE), k=3))
    assert torch.equal(valid.cpu(), want_valid)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="per-anchor loss")
    w = torch.rand(40, dtype=torch.float64)
    (dw,) = torch.autograd.grad((want * w).sum(), f64)
    (dg,) = torch.autograd.grad((got * w.float().to(DEVICE)).sum(), fx)
    assert_close(dg, dw, atol=1e-5, rtol=1e-4, what="grad f")


def test_reasons_name_the_selection():
    f = torch.randn(100, 8, device=DEVICE)
    y = torch.zeros(100, dtype=torch.int64, device=DEVICE)
    reasons = EagerLSE("triton").not_supported_reasons(problem(f, y, k=65))
    assert reasons and all(r.startswith("top-k selection:") for r in reasons), reasons


# ------------------------------------------------------------ fused backends, end to end

def compare(backend, f, y, g=None, y_g=None, *, dtype=torch.float32, offset=0, **kw):
    """supcon_loss(backend=...) vs the float64 reference: per-anchor loss and every gradient;
    float64 to 1e-9, float32 to 1e-4, half inputs by the 2x-eager-error rule. The inputs are
    moved to the backend's device."""
    dev = device_for(backend)
    f, y = f.to(dev), y.to(dev)
    g = None if g is None else g.to(dev)
    y_g = None if y_g is None else y_g.to(dev)
    kw.setdefault("temperature", 0.1)
    kw.update(reduction="none")
    contrast = {} if g is None else dict(contrast_labels=y_g, anchor_offset=offset)
    w = torch.rand(f.shape[0], dtype=torch.float64, device=f.device) + 0.5

    def run(backend, dt):
        fx = f.detach().to(dt).requires_grad_()
        gx = None if g is None else g.detach().to(dt).requires_grad_()
        loss = ak.supcon_loss(fx, y, contrast=gx, backend=backend, **contrast, **kw)
        grads = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), [fx] + ([] if g is None else [gx]))
        return [loss] + list(grads)

    ref = run("eager", torch.float64)
    out = run(backend, dtype)
    names = ["loss", "grad f", "grad contrast"]
    if dtype in (torch.float32, torch.float64):
        tol = 2e-5 if dtype == torch.float32 else 1e-9
        for name, a, e in zip(names, out, ref):
            assert_close(a, e, atol=tol * (1 + e.abs().max().item()), rtol=5 * tol,
                         what=f"{backend} {name}")
        return
    low = run("eager", dtype)
    for name, a, e, lo in zip(names, out, ref, low):
        eager_err = (lo.double() - e).abs().max().item()
        err = (a.double() - e).abs().max().item()
        assert err <= 2 * eager_err + 1e-3 * (1 + e.abs().max().item()), (
            f"{name}: kernel error {err:.3e} > 2 x eager error {eager_err:.3e}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("m,d,kind,k", [
    (2, 3, "one_class", 1),
    (3, 59, "one_class", 2),
    (41, 24, "random", 1),
    (41, 24, "some_alone", 4),  # anchors without positives
    (41, 130, "random", 16),  # k larger than any class
])
def test_single_set(backend, m, d, kind, k):
    f, y = torch.randn(m, d), labels_for(kind, m)
    assert_separated(f, y)
    compare(backend, f, y, hard_positive_topk=k)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("offset", [None, 7])
def test_separate_contrast(backend, offset):
    f, y = torch.randn(30, 20), labels_for("random", 30)
    g, y_g = torch.randn(50, 20), labels_for("random", 50)
    if offset is not None:
        g[offset:offset + 30], y_g[offset:offset + 30] = f, y
    assert_separated(f, y, g, y_g, offset)
    compare(backend, f, y, g, y_g, offset=offset, hard_positive_topk=3)


@pytest.mark.parametrize("backend", FUSED)
def test_ties_and_unnormalized(backend):
    base = torch.randn(10, 6)
    f = torch.cat([base, base, base])  # every cosine appears three times
    y = torch.zeros(30, dtype=torch.int64)
    compare(backend, f, y, hard_positive_topk=4)
    compare(backend, f, y, hard_positive_topk=4, normalize=False, temperature=2.0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    f, y = torch.randn(41, 24).to(dtype), labels_for("random", 41)
    assert_separated(f, y)
    compare(backend, f, y, dtype=dtype, hard_positive_topk=3)


@pytest.mark.parametrize("separate", [False, True])
def test_cpu_float64_exact_and_gradcheck(separate):
    """The C++ CPU backend in float64: LSE_i from its kernels, selection in float64, to 1e-9;
    and a float64 gradcheck through both C++ backwards and the sparse cosine backward."""
    f, y = torch.randn(41, 24, dtype=torch.float64), labels_for("some_alone", 41)
    g = torch.randn(50, 24, dtype=torch.float64) if separate else None
    y_g = labels_for("random", 50) if separate else None
    compare("cpu", f, y, g, y_g, dtype=torch.float64, offset=None, hard_positive_topk=3)
    f, y = f[:9].clone().requires_grad_(), y[:9]
    g = g[:12].clone().requires_grad_() if separate else None
    y_g = y_g[:12] if separate else None
    kw = dict(contrast=g, contrast_labels=y_g, anchor_offset=None) if separate else {}

    def loss(*x):
        if separate:
            kw["contrast"] = x[1]
        return ak.supcon_loss(x[0], y, hard_positive_topk=2, reduction="none", backend="cpu", **kw)

    assert torch.autograd.gradcheck(loss, (f, g) if separate else (f,))


@pytest.mark.parametrize("backend", FUSED)
def test_no_positives_anywhere_is_zero_not_nan(backend):
    dev = device_for(backend)
    f = torch.randn(9, 5, device=dev, requires_grad=True)
    loss = ak.supcon_loss(f, torch.arange(9, device=dev), hard_positive_topk=2, backend=backend)
    (df,) = torch.autograd.grad(loss, f)
    assert loss.item() == 0.0 and (df == 0).all()


@pytest.mark.parametrize("backend", FUSED)
def test_mean_reduction_and_module(backend):
    dev = device_for(backend)
    f, y = torch.randn(20, 8, device=dev), labels_for("random", 20).to(dev)
    want = reference.supcon_loss(f.double(), y, temperature=0.2, hard_positive_topk=2)
    got = ak.supcon_loss(f, y, temperature=0.2, hard_positive_topk=2, backend=backend)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="mean loss")
    module = ak.HardMinedSupConLoss(temperature=0.2, hard_positive_topk=2, backend=backend)
    assert_close(module(f, y), want, atol=1e-5, rtol=1e-5, what="module loss")


def test_auto_picks_a_fused_backend_for_topk():
    f, y = torch.randn(20, 8), labels_for("random", 20)
    p = problem(f, y, k=2)
    assert select_backend("auto", p).name == "cpu"
    assert ak.supcon_loss(f, y, hard_positive_topk=2).isfinite()


def test_triton_refuses_k_above_kernel_limit_with_reason():
    f, y = torch.randn(100, 4, device=DEVICE), torch.zeros(100, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="top-k selection: k=65"):
        ak.supcon_loss(f, y, hard_positive_topk=65, backend="triton")


# ------------------------------------------------------------------------------- tier 2

def block_reference(f, y, k, tau, normalize, r0, w):
    """Float64 per-anchor losses of anchors r0 .. r0 + len(w) - 1 and d(sum w L)/df: the block
    against the whole set, self column at its offset, is an exact sub-problem, and anchors
    outside it carry weight 0, so this is the full gradient of sum w L."""
    f64 = f.double().requires_grad_()
    r1 = r0 + w.shape[0]
    loss, _ = reference.supcon_per_anchor(f64[r0:r1], y[r0:r1], f64, y, temperature=tau,
                                          hard_positive_topk=k, normalize=normalize,
                                          anchor_offset=r0)
    (loss * w).sum().backward()
    return loss.detach(), f64.grad


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_gpu_exact_integer_embeddings(backend, n, k):
    """Integer embeddings, no normalisation: every dot product is exact in float32, so the
    selection (ties included) must equal the float64 reference's, and so must the gradient.
    Anchors in a random 1024-row block carry random weights, the rest 0."""
    torch.manual_seed(0)
    f = torch.randint(-1, 2, (n, 128), device="cuda").float()
    y = torch.randint(0, 10, (n,), device="cuda")
    r0 = int(torch.randint(0, n - 1024 + 1, ()))
    w = torch.rand(1024, device="cuda", dtype=torch.float64)
    weights = torch.zeros(n, device="cuda")
    weights[r0:r0 + 1024] = w.float()
    fx = f.clone().requires_grad_()
    loss = ak.supcon_loss(fx, y, temperature=10.0, hard_positive_topk=k, normalize=False,
                          reduction="none", backend=backend)
    (df,) = torch.autograd.grad((loss * weights).sum(), fx)
    want, want_df = block_reference(f, y, k, 10.0, False, r0, w)
    assert_close(loss[r0:r0 + 1024], want, atol=1e-4, rtol=1e-5, what="per-anchor loss")
    assert_close(df, want_df, atol=1e-5 * want_df.abs().max().item(), rtol=1e-4, what="grad f")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_gpu_random_bf16_loss(backend, n, k):
    """Random bf16 embeddings at scale have near-ties, so only the loss is compared (on a
    random 2048-anchor block): a swap of two positives within float32 rounding moves L_i by at
    most that rounding / tau."""
    torch.manual_seed(0)
    f = torch.randn(n, 128, device="cuda").bfloat16()
    y = torch.randint(0, 10, (n,), device="cuda")
    loss = ak.supcon_loss(f, y, temperature=0.1, hard_positive_topk=k, reduction="none",
                          backend=backend)
    r0 = int(torch.randint(0, n - 2048 + 1, ()))
    want, _ = block_reference(f, y, k, 0.1, True, r0,
                              torch.zeros(2048, device="cuda", dtype=torch.float64))
    assert_close(loss[r0:r0 + 2048], want, atol=2e-3, rtol=1e-3, what="per-anchor loss")
