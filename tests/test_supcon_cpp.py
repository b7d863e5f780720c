"""The C++ extension's SupCon loss against the float64 reference: the "cpu" backend here (float64
to machine precision, float32, bf16/fp16 by the low-precision rule, float64 gradcheck through
the C++ backward, opcheck, torch.compile), the "cuda" backend on a GPU (tier 2)."""

import os
import subprocess
import sys

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import _ext
from anchor_kernels.backends import SupConProblem, get_backend, select_backend
from anchor_kernels.reference import self_and_positive_masks

from .utils import DispatchedOps, assert_close, cuda_kernels_run, labels_for, loss_and_grads

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def extension():
    """The extension must build on every tier-1 machine; fail with the reason if it does not."""
    error = _ext.load()
    assert error is None, error
    get_backend("cpu")  # resolved once eagerly, so that torch.compile traces no import


def hopper_skip_reason():
    """Why the cuda backend's Hopper kernels cannot run here, or None: they need a compute
    capability 9.0 GPU and an extension built with sm_90a code."""
    if torch.cuda.get_device_capability() != (9, 0):
        return "the Hopper kernels run on compute capability 9.0"
    if "-DANCHOR_KERNELS_SM90A=1" not in _ext.cuda_flags():
        return "the extension was not built with sm_90a code (TORCH_CUDA_ARCH_LIST)"
    return None


def hopper_chosen():
    """Whether the cuda backend's loss runs on its Hopper kernels here: chosen
    (ANCHOR_KERNELS_CUDA_KERNELS=sm90) where they can run."""
    return os.environ.get("ANCHOR_KERNELS_CUDA_KERNELS") == "sm90" and hopper_skip_reason() is None


def per_anchor_and_grad(f, y, dtype, tau=0.1, lse_only=False, **options):
    """The cuda backend's per-anchor losses of one set (f in dtype, labels y) and their sum's
    gradient."""
    x = f.to(dtype, copy=True).requires_grad_()
    problem = SupConProblem(x, y, None, None, tau, options.get("hard_positive_beta", 0.0), None,
                            options.get("detach_weights", True), True, 0, lse_only=lse_only)
    loss, _ = get_backend("cuda").per_anchor(problem)
    loss.sum().backward()
    return loss.detach(), x.grad


def compare(backend, f, y, g=None, y_g=None, *, dtype=torch.float64, **kw):
    """Per-anchor losses and every input gradient against the float64 reference.

    float64: 1e-9 (the kernels then compute in float64). float32: 1e-4. bf16/fp16, and
    float32 on a GPU where torch allows TF32 matmuls: the kernel's error against float64 is at
    most twice eager PyTorch's own error at that precision, plus 1e-3 (1 + max |reference|).
    """
    weights = torch.rand(f.shape[0], dtype=torch.float64, device=f.device) + 0.5
    ref = loss_and_grads("eager", f.double(), y, None if g is None else g.double(), y_g,
                         weights=weights, **kw)
    out = loss_and_grads(backend, f, y, g, y_g, dtype=dtype, weights=weights, **kw)
    names = ("loss", "grad features", "grad contrast")
    tf32 = dtype == torch.float32 and f.is_cuda and torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float64 or (dtype == torch.float32 and not tf32):
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        for name, a, e in zip(names, out, ref):
            if e is not None:
                assert a.dtype == (dtype if name != "loss" else torch.promote_types(dtype, torch.float32))
                assert_close(a, e, atol=tol, rtol=tol, what=f"{backend} {dtype} {name}")
        return
    low = loss_and_grads("eager", f, y, g, y_g, dtype=dtype, weights=weights, **kw)
    for name, a, e, l in zip(names, out, ref, low):
        if e is not None:
            assert torch.isfinite(a).all(), f"{name}: non-finite values"
            eager_err = (l.double() - e).abs().max().item()
            kernel_err = (a.double() - e).abs().max().item()
            assert kernel_err <= 2 * eager_err + 1e-3 * (1 + e.abs().max().item()), (
                f"{backend} {dtype} {name}: kernel error {kernel_err:.3e} > 2 x eager error "
                f"{eager_err:.3e}")


SHAPES = [(1, 3), (2, 3), (3, 59), (97, 130), (1025, 128)]
OPTIONS = [
    dict(),
    dict(hard_positive_beta=2.0),
    dict(hard_positive_beta=2.0, detach_weights=False),
    dict(normalize=False, temperature=0.5),
]
OPTION_IDS = ["supcon", "soft", "soft-exact", "unnormalized"]


@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_single_set_float64(m, d, options):
    f = torch.randn(m, d, dtype=torch.float64)
    compare("cpu", f, labels_for("random", m), **options)


@pytest.mark.parametrize("m,d", [(97, 59), (1025, 128)])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_single_set_float32(m, d, options):
    f = torch.randn(m, d)
    compare("cpu", f, labels_for("random", m), dtype=torch.float32, **options)


@pytest.mark.parametrize("kind", ["one_class", "all_distinct", "some_alone", "wide"])
@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_label_patterns(kind, beta):
    f = torch.randn(41, 24, dtype=torch.float64)
    compare("cpu", f, labels_for(kind, 41), hard_positive_beta=beta, detach_weights=False)


@pytest.mark.parametrize("m,n,offset", [(3, 97, 0), (17, 97, 40), (97, 1300, 1203),
                                        (5, 3, None), (600, 40, None), (1, 1, 0)])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_two_sets(m, n, offset, options):
    d = 59
    g = torch.randn(n, d, dtype=torch.float64)
    y_g = labels_for("random", n)
    if offset is None:
        f = torch.randn(m, d, dtype=torch.float64)
        y = torch.randint(0, max(1, n // 4), (m,))
    else:  # the anchors are rows offset..offset+m of the contrast set (the distributed case)
        f, y = g[offset:offset + m].clone(), y_g[offset:offset + m].clone()
    compare("cpu", f, y, g, y_g, anchor_offset=offset, **options)


def test_single_set_without_self_column():
    """anchor_offset=None with no contrast: every column, self included, is in A(i) and P(i)."""
    f = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    y = labels_for("random", 30)
    args = (f, y, None, None, 0.3, 1.0, False, True, None, False)
    loss, valid, _ = torch.ops.anchor_kernels.supcon_fwd(*args)
    ref, ref_valid = ak.reference.supcon_per_anchor(f, y, temperature=0.3, hard_positive_beta=1.0,
                                                    detach_weights=False, anchor_offset=None)
    assert torch.equal(valid, ref_valid)
    assert_close(loss, ref, atol=1e-10, rtol=1e-10, what="loss")
    (grad,) = torch.autograd.grad(loss.sum(), f)
    (ref_grad,) = torch.autograd.grad(ref.sum(), f)
    assert_close(grad, ref_grad, atol=1e-10, rtol=1e-10, what="grad")


@pytest.mark.parametrize("single", [True, False])
def test_lse_only_mode(single):
    """Value LSE_i, validity "A(i) non-empty", gradient through LSE only (the top-k mode's base)."""
    m, n, offset = 37, 50, 5
    f = torch.randn(m, 20, dtype=torch.float64)
    y = labels_for("random", m)
    g = None if single else torch.randn(n, 20, dtype=torch.float64)
    y_g = None if single else labels_for("random", n)
    x = f.clone().requires_grad_()
    gx = None if single else g.clone().requires_grad_()
    z = ak.reference.normalize_rows(x)
    c = z if single else ak.reference.normalize_rows(gx)
    denom, _ = self_and_positive_masks(y, y if single else y_g, 0 if single else offset)
    ref = torch.logsumexp((z @ c.T / 0.2).masked_fill(~denom, float("-inf")), dim=1)
    ref.sum().backward()
    xt = f.clone().requires_grad_()
    gt = None if single else g.clone().requires_grad_()
    problem = SupConProblem(xt, y, gt, y_g, 0.2, 0.0, 3, True, True, 0 if single else offset,
                            lse_only=True)
    backend = get_backend("cpu")
    assert backend.not_supported_reasons(problem) == []  # top-k is fine with lse_only
    lse, valid = backend.per_anchor(problem)
    lse.sum().backward()
    assert valid.all()
    assert_close(lse, ref, atol=1e-10, rtol=1e-10, what="lse")
    assert_close(xt.grad, x.grad, atol=1e-10, rtol=1e-10, what="grad features")
    if not single:
        assert_close(gt.grad, gx.grad, atol=1e-10, rtol=1e-10, what="grad contrast")


def test_lse_only_empty_denominator():
    f = torch.randn(1, 4, requires_grad=True)
    problem = SupConProblem(f, torch.zeros(1, dtype=torch.long), None, None, 0.1, 0.0, None,
                            True, True, 0, lse_only=True)
    lse, valid = get_backend("cpu").per_anchor(problem)
    lse.sum().backward()
    assert not valid.any() and lse.item() == 0.0 and torch.count_nonzero(f.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("two_sets", [False, True])
def test_classsum_path(monkeypatch, two_sets, dtype):
    """Plain SupCon on large batches: the positive term from class sums around the kernels'
    log-sum-exp-only mode (forced here on a small batch; labels of any integer range)."""
    from anchor_kernels.ops import supcon_classsum, supcon_cpp

    calls = []
    classsum = supcon_classsum.classsum_per_anchor
    monkeypatch.setattr(supcon_cpp, "CLASSSUM_MIN_LOGITS", 1)
    monkeypatch.setattr(supcon_classsum, "classsum_per_anchor",
                        lambda backend, p: calls.append(p.beta) or classsum(backend, p))
    g = torch.randn(300, 20, dtype=torch.float64)
    y_g = labels_for("some_alone", 300) * 1000 - 7
    if two_sets:
        compare("cpu", g[100:250], y_g[100:250], g, y_g, dtype=dtype, anchor_offset=100)
        compare("cpu", g[:40], y_g[:40], g, y_g, dtype=dtype, anchor_offset=None)
    else:
        compare("cpu", g, y_g, dtype=dtype)
        compare("cpu", g, y_g, dtype=dtype, normalize=False, temperature=0.5)
        compare("cpu", g, y_g, dtype=dtype, hard_positive_beta=1.0)
    assert calls == [0.0, 0.0]  # soft mining keeps its per-logit positives


def test_strided_inputs_and_labels():
    base = torch.randn(64, 2 * 59, dtype=torch.float64)
    f = base[:, ::2]  # non-unit stride along D
    assert not f.is_contiguous()
    y = labels_for("random", 128)[::2]  # strided labels
    compare("cpu", f, y, hard_positive_beta=1.0)
    ft = torch.randn(59, 64, dtype=torch.float64).T  # transposed storage
    compare("cpu", ft, labels_for("random", 64).to(torch.int32))
    g = torch.randn(80, 2 * 59, dtype=torch.float64)[:, 1::2]
    compare("cpu", ft, labels_for("random", 64), g, labels_for("random", 80).to(torch.int16),
            anchor_offset=None, hard_positive_beta=0.5, detach_weights=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_low_precision(dtype, beta):
    f = torch.randn(97, 64)
    compare("cpu", f, labels_for("random", 97), dtype=dtype, hard_positive_beta=beta)
    g = torch.randn(130, 64)
    compare("cpu", f, labels_for("random", 97), g, labels_for("random", 130), dtype=dtype,
            anchor_offset=None, hard_positive_beta=beta, detach_weights=False)


def test_small_temperature_stays_finite():
    """1/temperature = 100: logits up to 100 must not overflow (online maxima)."""
    f = torch.randn(64, 32, dtype=torch.float64)
    y = labels_for("random", 64)
    compare("cpu", f, y, temperature=0.01)
    compare("cpu", f, y, temperature=0.01, hard_positive_beta=5.0, detach_weights=False)
    compare("cpu", f.float(), y, dtype=torch.bfloat16, temperature=0.01, hard_positive_beta=5.0)


def test_no_positives_gives_zero_and_zero_grad():
    f = torch.randn(10, 8, requires_grad=True)
    loss = ak.supcon_loss(f, torch.arange(10), backend="cpu")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(f.grad) == 0


def test_zero_norm_rows_are_finite():
    f = torch.randn(12, 8, dtype=torch.float64)
    f[3] = 0.0
    compare("cpu", f, labels_for("random", 12))


def test_public_api_reductions_and_views():
    feats = torch.randn(16, 2, 32, dtype=torch.float64)
    y = labels_for("some_alone", 16)
    for reduction in ("mean", "sum", "none"):
        for labels in (y, None):
            kw = dict(reduction=reduction, temperature=0.2, base_temperature=0.07,
                      hard_positive_beta=1.0)
            assert_close(ak.supcon_loss(feats, labels, backend="cpu", **kw),
                         ak.supcon_loss(feats, labels, backend="eager", **kw),
                         atol=1e-10, rtol=1e-10, what=f"{reduction} labels={labels is not None}")


def test_same_result_with_one_and_two_threads():
    """Each row block is computed by one thread in a fixed order: bitwise reproducible."""
    f = torch.randn(300, 40, requires_grad=True)
    y = labels_for("random", 300)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            f.grad = None
            loss = ak.supcon_loss(f, y, hard_positive_beta=1.0, detach_weights=False, backend="cpu")
            loss.backward()
            results.append((loss.detach().clone(), f.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


GRADCHECK_CASES = [
    dict(single=True, beta=0.0, normalize=True, offset=0),
    dict(single=True, beta=1.5, normalize=True, offset=0),
    dict(single=True, beta=1.5, normalize=False, offset=0),
    dict(single=False, beta=1.5, normalize=True, offset=2),
    dict(single=False, beta=0.0, normalize=True, offset=None),
    dict(single=False, beta=1.5, normalize=False, offset=None),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradcheck_float64(case):
    """The C++ backward is the true gradient (exact weights), checked by finite differences."""
    f = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 2, 0])
    g = None if case["single"] else torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y_g = None if case["single"] else torch.tensor([0, 1, 0, 1, 2, 0, 1, 2, 2])
    if case["offset"] is not None and not case["single"]:
        y_g[case["offset"]:case["offset"] + 6] = y

    def per_anchor(*inputs):
        loss, _, _ = torch.ops.anchor_kernels.supcon_fwd(
            inputs[0], y, None if case["single"] else inputs[1], y_g, 0.5, case["beta"], False,
            case["normalize"], case["offset"], False)
        return loss

    inputs = (f,) if case["single"] else (f, g)
    assert torch.autograd.gradcheck(per_anchor, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("single", [True, False])
def test_gradcheck_reduced_in_the_op(single, reduction):
    """The ops' own reduction (1 sum, 2 mean over valid anchors) and scale: the backward's
    expansion of the one-value gradient is the true gradient, by finite differences, and the
    value is the reference's. Anchor 4 has no positive, so the mean's count is not M."""
    f = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 2, 0])
    g = None if single else torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y_g = None if single else torch.tensor([0, 1, 0, 1, 3, 0, 1, 2, 2])

    def loss(*inputs):
        out, _, _ = torch.ops.anchor_kernels.supcon_fwd(
            inputs[0], y, None if single else inputs[1], y_g, 0.5, 1.5, False, True,
            0 if single else None, False, 0.7, reduction)
        return out

    inputs = (f,) if single else (f, g)
    assert loss(*inputs).shape == ()
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    expected = ak.supcon_loss(f, y, contrast=g, contrast_labels=y_g, temperature=0.5,
                              base_temperature=0.5 / 0.7, hard_positive_beta=1.5,
                              anchor_offset=0 if single else None,
                              reduction=("none", "sum", "mean")[reduction], backend="eager")
    assert_close(loss(*inputs), expected, atol=1e-12, rtol=1e-12, what=f"reduction {reduction}")


@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(single, dtype, reduced):
    f = torch.randn(20, 8, dtype=dtype, requires_grad=True)
    y = labels_for("random", 20)
    g, y_g = (None, None) if single else (torch.randn(30, 8, dtype=dtype, requires_grad=True),
                                          labels_for("random", 30))
    reduction = (0.5, 2) if reduced else (1.0, 0)  # (scale, reduction)
    fwd_args = (f, y, g, y_g, 0.2, 1.5, False, True, 0, False) + reduction
    torch.library.opcheck(torch.ops.anchor_kernels.supcon_fwd.default, fwd_args)
    _, _, stats = torch.ops.anchor_kernels.supcon_fwd(*fwd_args)
    bwd_args = (torch.rand(() if reduced else 20), f.detach(), y, None if g is None else g.detach(),
                y_g, stats, 0.2, 1.5, False, True, 0, False) + reduction
    torch.library.opcheck(torch.ops.anchor_kernels.supcon_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    x = torch.randn(40, 16, requires_grad=True)
    y = labels_for("random", 40)

    def step(x):
        return ak.supcon_loss(x, y, hard_positive_beta=1.0, detach_weights=False, backend="cpu")

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    grad, x.grad = x.grad.clone(), None
    eager = step(x)
    eager.backward()
    assert_close(loss, eager, atol=1e-6, rtol=1e-6, what="compiled loss")
    assert_close(grad, x.grad, atol=1e-6, rtol=1e-6, what="compiled grad")


def test_auto_picks_cpu_and_refusals():
    x, y = torch.randn(8, 4), labels_for("random", 8)
    problem = SupConProblem(x, y, None, None, 0.1, 0.0, None, True, True, 0)
    assert select_backend("auto", problem).name == "cpu"
    reasons = ak.available_backends(x, y)
    assert reasons["cpu"] == []
    assert any("cuda" in r for r in reasons["cuda"])
    # top-k runs fused: LSE_i from these kernels plus the selection op (test_supcon_topk.py)
    torch.testing.assert_close(ak.supcon_loss(x, y, hard_positive_topk=2, backend="cpu"),
                               ak.supcon_loss(x, y, hard_positive_topk=2, backend="eager"),
                               rtol=1e-5, atol=1e-5)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="backend='cuda' cannot run.*not a CUDA build"):
            ak.supcon_loss(x, y, backend="cuda")


def test_unavailable_extension_reports_reason(monkeypatch):
    from anchor_kernels.ops import supcon_cpp

    monkeypatch.setattr(supcon_cpp, "LOAD_ERROR", "the C++ extension failed to build: test")
    x, y = torch.randn(8, 4), labels_for("random", 8)
    with pytest.raises(ValueError, match="backend='cpu' cannot run these inputs: the C\\+\\+ "
                                         "extension failed to build: test"):
        ak.supcon_loss(x, y, backend="cpu")
    problem = SupConProblem(x, y, None, None, 0.1, 0.0, None, True, True, 0)
    assert select_backend("auto", problem).name == "eager"


def test_op_argument_errors_name_the_tensor():
    op = torch.ops.anchor_kernels.supcon_fwd
    f, y = torch.randn(8, 4), labels_for("random", 8)
    with pytest.raises(RuntimeError, match=r"labels must have shape \(8,\)"):
        op(f, y[:5], None, None, 0.1, 0.0, True, True, 0, False)
    with pytest.raises(RuntimeError, match=r"contrast must have shape \(N, 4\)"):
        op(f, y, torch.randn(5, 3), y[:5], 0.1, 0.0, True, True, 0, False)
    with pytest.raises(RuntimeError, match="anchor_offset=3"):
        op(f, y, torch.randn(10, 4), labels_for("random", 10), 0.1, 0.0, True, True, 3, False)
    with pytest.raises(RuntimeError, match="temperature must be finite"):
        op(f, y, None, None, 0.0, 0.0, True, True, 0, False)
    _, _, stats = op(f, y, None, None, 0.1, 0.0, True, True, 0, False)
    with pytest.raises(RuntimeError, match=r"stats must have shape \(8, 4\)"):
        torch.ops.anchor_kernels.supcon_bwd(torch.ones(8), f, y, None, None, stats[:, :3], 0.1,
                                            0.0, True, True, 0, False)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \(8,\)"):
        torch.ops.anchor_kernels.supcon_bwd(torch.ones(7), f, y, None, None, stats, 0.1, 0.0,
                                            True, True, 0, False)
    with pytest.raises(RuntimeError, match="grad_loss must be 0-d with reduction 2"):
        torch.ops.anchor_kernels.supcon_bwd(torch.ones(8), f, y, None, None, stats, 0.1, 0.0,
                                            True, True, 0, False, 1.0, 2)
    with pytest.raises(RuntimeError, match=r"reduction must be 0 \(none\), 1 \(sum\) or 2 \(mean\), got 3"):
        op(f, y, None, None, 0.1, 0.0, True, True, 0, False, 1.0, 3)
    with pytest.raises(RuntimeError, match="scale must be finite and > 0, got -1"):
        op(f, y, None, None, 0.1, 0.0, True, True, 0, False, -1.0, 2)


# ---------------------------------------------------------------------------------------
# Tier 2: the "cuda" backend on a GPU.

# D = 8, 120, 128 run on the tensor-core (CuTe) kernels in bf16 / fp16, D = 3, 59, 130 on the
# general ones.
GPU_SHAPES = [(n, d) for n in (1, 2, 3, 97, 1025) for d in (3, 8, 59, 120, 128, 130)]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("n,d", GPU_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2]], ids=["supcon", "soft-exact"])
def test_gpu_single_set(n, d, dtype, options):
    f = torch.randn(n, d, device="cuda")
    compare("cuda", f, labels_for("random", n).cuda(), dtype=dtype, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_gpu_options(dtype, options):
    f = torch.randn(300, 64, device="cuda")
    compare("cuda", f, labels_for("some_alone", 300).cuda(), dtype=dtype, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature,beta", [(0.1, 0.0), (0.1, 2.0), (0.02, 0.0), (0.1, 31.0)],
                         ids=["fixed", "fixed-soft", "running-small-tau", "running-large-beta"])
def test_gpu_fixed_and_running_shifts(dtype, temperature, beta):
    """The tensor-core forwards' two ways to shift the exponentials (FwdArgs::shift2): the
    bounds of normalised rows where 2 shift + log2(N) <= 96 admits them, running maxima past
    it (tau = 0.02: 2 log2(e) / tau = 144; beta = 31: 2 beta log2(e) = 89 > 96 - log2(700))."""
    f = torch.randn(700, 64, device="cuda")
    compare("cuda", f, labels_for("random", 700).cuda(), dtype=dtype, temperature=temperature,
            hard_positive_beta=beta)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,offset", [(3, 97, 0), (97, 1300, 1203), (600, 40, None), (1025, 3000, 1000)])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("d", [64, 130])
def test_gpu_two_sets(m, n, offset, dtype, d):
    g = torch.randn(n, d, device="cuda")
    y_g = labels_for("random", n).cuda()
    if offset is None:
        f, y = torch.randn(m, d, device="cuda"), torch.randint(0, max(1, n // 4), (m,)).cuda()
    else:
        f, y = g[offset:offset + m].clone(), y_g[offset:offset + m].clone()
    compare("cuda", f, y, g, y_g, dtype=dtype, anchor_offset=offset, hard_positive_beta=1.0,
            detach_weights=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["one_class", "all_distinct", "some_alone"])
def test_gpu_label_patterns_and_strides(kind):
    base = torch.randn(97, 2 * 59, device="cuda")
    compare("cuda", base[:, ::2], labels_for(kind, 97).cuda(), dtype=torch.float32,
            hard_positive_beta=1.5, detach_weights=False)
    compare("cuda", torch.randn(59, 97, device="cuda").T, labels_for(kind, 97).cuda(),
            dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("choice", ["sm80", "sm90"])
@pytest.mark.parametrize("options", OPTIONS[:3], ids=OPTION_IDS[:3])
def test_gpu_tensor_core_kernels_take_labels_of_any_int64_range(choice, options, monkeypatch):
    """The tensor-core forwards and the Hopper backward compare 32-bit keys of the labels
    (csrc/cuda/label_keys.cuh): with labels past int32, some equal in their low 32 bits, and at
    the edges of the keys' ranges, the loss and gradients still match the reference, one set
    and two; the sm_80 and the Hopper kernels (the latter on compute capability 9.0 with sm_90a
    code)."""
    if choice == "sm90" and hopper_skip_reason():
        pytest.skip(hopper_skip_reason())
    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", choice)
    g = torch.Generator().manual_seed(5)
    f, y = torch.randn(700, 64, generator=g).cuda(), labels_for("wide", 700, g).cuda()
    names = cuda_kernels_run(lambda: compare("cuda", f, y, dtype=torch.bfloat16, **options))
    kernel = {"sm80": "mma", "sm90": "sm90"}[choice]
    for way in ("fwd", "bwd"):
        assert any(f"supcon_{way}_{kernel}_kernel" in k for k in names), (way, names)
    c, y_c = torch.randn(900, 64, generator=g).cuda(), labels_for("wide", 900, g).cuda()
    compare("cuda", f, y, c, y_c, dtype=torch.bfloat16, anchor_offset=None, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 8192])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_large(n, dtype):
    f = torch.randn(n, 128, device="cuda")
    compare("cuda", f, torch.randint(0, 10, (n,), device="cuda"), dtype=dtype,
            hard_positive_beta=2.0)


@pytest.mark.gpu
def test_gpu_matches_cpu_backend_and_lse_only():
    f = torch.randn(200, 48, dtype=torch.float64)
    y = labels_for("random", 200)
    cpu = loss_and_grads("cpu", f, y, dtype=torch.float32, hard_positive_beta=1.0)
    gpu = loss_and_grads("cuda", f.cuda(), y.cuda(), dtype=torch.float32, hard_positive_beta=1.0)
    for a, b, name in zip(gpu, cpu, ("loss", "grad")):
        if b is not None:
            assert_close(a, b, atol=1e-5, rtol=1e-5, what=name)
    x = f.float().cuda().requires_grad_()
    problem = SupConProblem(x, y.cuda(), None, None, 0.2, 0.0, 3, True, True, 0, lse_only=True)
    lse, valid = get_backend("cuda").per_anchor(problem)
    xc = f.float().requires_grad_()
    ref, _ = get_backend("cpu").per_anchor(
        SupConProblem(xc, y, None, None, 0.2, 0.0, 3, True, True, 0, lse_only=True))
    lse.sum().backward()
    ref.sum().backward()
    assert valid.all()
    assert_close(lse, ref, atol=1e-5, rtol=1e-5, what="lse")
    assert_close(x.grad, xc.grad, atol=1e-5, rtol=1e-5, what="lse grad")


@pytest.mark.gpu
@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_lse_only_half(single, dtype):
    """The denominator-only mode in half precision (the tensor-core kernels at D = 128): LSE and
    its gradient against the cpu backend in float64."""
    f64 = torch.randn(700, 128, dtype=torch.float64)
    g64 = None if single else torch.randn(900, 128, dtype=torch.float64)
    y = labels_for("random", 700)
    y_g = None if single else labels_for("random", 900)
    offset = 0 if single else None

    def run(backend, f, g, yf, yg):
        f = f.requires_grad_()
        g = None if g is None else g.requires_grad_()
        problem = SupConProblem(f, yf, g, yg, 0.1, 0.0, None, True, True, offset, lse_only=True)
        lse, _ = get_backend(backend).per_anchor(problem)
        lse.double().sum().backward()
        return lse.double().cpu(), f.grad.double().cpu(), None if g is None else g.grad.double().cpu()

    # The reference sees the same rounded inputs: what is left is the kernels' own error.
    f64, g64 = f64.to(dtype).double(), None if single else g64.to(dtype).double()
    ref = run("cpu", f64.clone(), None if single else g64.clone(), y, y_g)
    out = run("cuda", f64.to("cuda", dtype), None if single else g64.to("cuda", dtype), y.cuda(),
              None if single else y_g.cuda())
    for a, e, name in zip(out, ref, ("lse", "grad features", "grad contrast")):
        if e is not None:
            assert_close(a, e, atol=3e-2, rtol=2e-2, what=f"lse-only {dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_opcheck(single, dtype):
    f = torch.randn(20, 8, device="cuda", dtype=dtype, requires_grad=True)
    y = labels_for("random", 20).cuda()
    g, y_g = (None, None) if single else (torch.randn(30, 8, device="cuda", dtype=dtype, requires_grad=True),
                                          labels_for("random", 30).cuda())
    torch.library.opcheck(torch.ops.anchor_kernels.supcon_fwd.default,
                          (f, y, g, y_g, 0.2, 1.5, False, True, 0, False))


@pytest.mark.gpu
def test_gpu_autocast_and_compile():
    f = torch.randn(512, 128, device="cuda", requires_grad=True)
    y = torch.randint(0, 10, (512,), device="cuda")
    lin = torch.nn.Linear(128, 128).cuda()

    def step(f):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ak.supcon_loss(lin(f), y, backend="cuda")

    loss = step(f)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(f.grad).all()
    compiled = torch.compile(step, fullgraph=True)
    # inductor may round the bf16 linear layer differently; the loss itself is the same op
    assert_close(compiled(f), loss, atol=1e-2, rtol=1e-2, what="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS[:3] + [dict(lse_only=True)],
                         ids=["supcon", "soft", "soft-exact", "lse-only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_hopper_kernels_when_chosen(options, dtype, monkeypatch):
    """ANCHOR_KERNELS_CUDA_KERNELS=sm90 on a compute capability 9.0 GPU runs the loss on the
    Hopper kernels (wgmma, TMA; checked by their names in the profile) and matches the sm_80
    kernels and the reference, forward and gradients (one set and two, partial tiles, the self
    pair on and off the tile diagonal); unset, the sm_80 kernels run."""
    if hopper_skip_reason():
        pytest.skip(hopper_skip_reason())
    lse_only = options.get("lse_only", False)
    options = {k: v for k, v in options.items() if k != "lse_only"}
    n, d = 1000, 120
    f = torch.randn(n, d, device="cuda")
    y = labels_for("random", n).cuda()

    def run():
        return per_anchor_and_grad(f, y, dtype, lse_only=lse_only, **options)

    monkeypatch.delenv("ANCHOR_KERNELS_CUDA_KERNELS", raising=False)
    names = cuda_kernels_run(run)
    assert not any("sm90" in k for k in names) and any("mma" in k for k in names), names
    sm80 = run()
    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", "sm90")
    names = cuda_kernels_run(run)
    assert any("supcon_fwd_sm90_kernel" in k for k in names), names
    assert any("supcon_bwd_sm90_kernel" in k for k in names), names
    for a, b, what in zip(run(), sm80, ("loss", "grad")):
        assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, what=f"sm90 against sm80 {dtype} {what}")
    if not lse_only:
        compare("cuda", f, y, dtype=dtype, **options)
        g, y_g = torch.randn(700, d, device="cuda"), labels_for("random", 700).cuda()
        compare("cuda", g[200:530].clone(), y_g[200:530].clone(), g, y_g, dtype=dtype,
                anchor_offset=200, **options)
        compare("cuda", f[:130], y[:130], g, y_g, dtype=dtype, anchor_offset=None, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("n,d", [(97, 20), (300, 64), (1025, 128), (5000, 128), (97, 130), (64, 30)])
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[2], OPTIONS[3]], ids=["supcon", "soft-exact", "unnormalized"])
@pytest.mark.parametrize("single", [True, False], ids=["one-set", "two-sets"])
def test_gpu_tf32_kernels_when_torch_allows_it(precision, n, d, options, single, matmul_precision):
    """float32 features take the TF32 tensor-core forward and backward (their names in the
    profile; the Hopper ones where chosen) exactly where torch allows TF32 matmuls and the rows
    fit them (D <= 128, D % 4 == 0): one set, and two (the anchors 40 rows into the contrast
    set, whose backward runs a pass per set); the results follow the float32 tolerance without
    TF32 and the 2x-eager rule with it (eager PyTorch under the same precision)."""
    matmul_precision(precision)
    f, y = torch.randn(n, d, device="cuda"), labels_for("random", n).cuda()
    if single:
        names = cuda_kernels_run(lambda: compare("cuda", f, y, dtype=torch.float32, **options))
    else:
        g, y_g = torch.randn(n + 40, d, device="cuda"), labels_for("random", n + 40).cuda()
        g[40:], y_g[40:] = f, y
        names = cuda_kernels_run(lambda: compare("cuda", f, y, g, y_g, dtype=torch.float32,
                                                 anchor_offset=40, **options))
    tf32 = precision == "high" and d <= 128 and d % 4 == 0
    kernels = "sm90" if hopper_chosen() else "mma"  # (the Hopper kernels take TF32 rows too)
    for way in ("fwd", "bwd"):
        assert any(f"supcon_{way}_{kernels}_kernel" in k and "tfloat32" in k for k in names) == tf32, names


@pytest.mark.gpu
@pytest.mark.parametrize("n,d", [(97, 20), (1000, 120), (1025, 128)])
@pytest.mark.parametrize("options", OPTIONS[:3] + [dict(lse_only=True)],
                         ids=["supcon", "soft", "soft-exact", "lse-only"])
def test_gpu_hopper_tf32_kernels_when_chosen(n, d, options, matmul_precision, monkeypatch):
    """With ANCHOR_KERNELS_CUDA_KERNELS=sm90 on a compute capability 9.0 GPU and torch allowing
    TF32, float32 features take the Hopper kernels' TF32 variants (names in the profile: the
    forward on 128 x 64 tiles, the backward with its transposed Y tiles): loss and gradients
    match the sm_80 TF32 kernels' and follow the reference by the 2x-eager rule, one set and
    two (the anchors 40 rows into the contrast set), partial tiles, D below a TMA box (20) and
    at 128."""
    if hopper_skip_reason():
        pytest.skip(hopper_skip_reason())
    matmul_precision("high")
    lse_only = options.get("lse_only", False)
    options = {k: v for k, v in options.items() if k != "lse_only"}
    g = torch.Generator().manual_seed(11)
    f, y = torch.randn(n, d, generator=g).cuda(), labels_for("random", n, g).cuda()

    def run():
        return per_anchor_and_grad(f, y, torch.float32, lse_only=lse_only, **options)

    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", "sm80")
    sm80 = run()
    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", "sm90")
    names = cuda_kernels_run(run)
    for way in ("fwd", "bwd"):
        assert any(f"supcon_{way}_sm90_kernel" in k and "tfloat32" in k for k in names), (way, names)
    for a, b, what in zip(run(), sm80, ("loss", "grad")):
        assert_close(a, b, atol=1e-3, rtol=1e-3, what=f"sm90 TF32 against sm80 TF32 {what}")
    if not lse_only:
        compare("cuda", f, y, dtype=torch.float32, **options)
        c, y_c = torch.randn(n + 40, d, generator=g).cuda(), labels_for("random", n + 40, g).cuda()
        c[40:], y_c[40:] = f, y
        compare("cuda", f, y, c, y_c, dtype=torch.float32, anchor_offset=40, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [300, 1000, 5000])
@pytest.mark.parametrize("options", OPTIONS + [dict(lse_only=True)], ids=OPTION_IDS + ["lse-only"])
def test_gpu_splits_the_columns_when_rows_are_few(n, options):
    """With fewer row blocks than two per SM (128 rows forward, 64 backward), the sm_80 kernels
    split the columns among CTAs (at least 4 tiles each): the forward merges their statistics
    in one more launch, the backward sums their fp32 slices in the chain-rule launch
    (norm_backward_kernel, otherwise fused into its epilogue); each kernel in the profile
    exactly then. The Hopper kernels (ANCHOR_KERNELS_CUDA_KERNELS=sm90 on compute capability
    9.0) split theirs by the same rule, on 128-row blocks (and 128-column forward tiles). The
    loss and gradients match the reference, one set and two (the self pairs at an offset into
    the contrast rows)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hopper = hopper_chosen()

    def splits(rows, cols):
        return max(1, min(-(-2 * sms // -(-n // rows)), -(-n // cols) // 4, 64))

    soft = options.get("hard_positive_beta", 0.0) > 0
    f = torch.randn(n, 64, device="cuda")
    y = labels_for("random", n).cuda()
    lse_only = options.get("lse_only", False)
    if lse_only:  # the per-anchor log-sum-exp over the other rows, against float64
        x = f.to(torch.bfloat16)
        problem = SupConProblem(x, y, None, None, 0.1, 0.0, None, True, True, 0, lse_only=True)
        out = []
        names = cuda_kernels_run(lambda: out.append(get_backend("cuda").per_anchor(problem)[0]))
        z = torch.nn.functional.normalize(x.double(), dim=1)
        logits = (z @ z.T / 0.1).fill_diagonal_(-float("inf"))
        assert_close(out[0].double(), logits.logsumexp(dim=1), atol=2e-2, rtol=2e-3, what="lse")
    else:
        names = cuda_kernels_run(lambda: compare("cuda", f, y, dtype=torch.bfloat16, **options))
        g, y_g = torch.randn(n + 40, 64, device="cuda"), labels_for("random", n + 40).cuda()
        g[40:], y_g[40:] = f, y
        compare("cuda", f, y, g, y_g, dtype=torch.bfloat16, anchor_offset=40, **options)
    for way in ("fwd",) if lse_only else ("fwd", "bwd"):
        assert any(f"supcon_{way}_{'sm90' if hopper else 'mma'}_kernel" in k for k in names), (way, names)
    split_fwd = splits(128, 128 if hopper else 64) > 1
    assert any("supcon_fwd_merge_kernel" in k for k in names) == split_fwd, names
    if not lse_only:
        split_bwd = splits(128 if hopper else 64, 32 if soft else 64) > 1
        assert any("norm_backward_kernel" in k for k in names) == split_bwd, names


@pytest.mark.gpu
def test_gpu_kernel_choice_is_checked(monkeypatch):
    """ANCHOR_KERNELS_CUDA_KERNELS is checked by every op it steers (the error names the op and
    the variable); general runs the loss and the similarity on their general kernels (no
    tensor-core ones in the profile), with the sm_80 kernels' results."""
    f = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = labels_for("random", 300).cuda()
    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", "sm_90")
    with pytest.raises(RuntimeError, match="supcon \\(CUDA\\): ANCHOR_KERNELS_CUDA_KERNELS must be auto, sm80, sm90 or general, got 'sm_90'"):
        ak.supcon_loss(f, y, backend="cuda")
    with pytest.raises(RuntimeError, match="similarity_fwd \\(CUDA\\): ANCHOR_KERNELS_CUDA_KERNELS must be"):
        ak.pairwise_similarity(f, backend="cuda")

    def run():
        loss = ak.supcon_loss(f, y, backend="cuda")
        s = ak.pairwise_similarity(f, backend="cuda")
        return (loss, s) + torch.autograd.grad(loss + s.float().square().mean(), f)

    results = {}
    for choice in ("sm80", "general"):
        monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", choice)
        names = cuda_kernels_run(run)
        assert any("mma" in k for k in names) == (choice == "sm80"), (choice, names)
        results[choice] = run()
    for a, b, what in zip(results["general"], results["sm80"], ("loss", "S", "grad")):
        assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, what=f"general against sm80 {what}")


@pytest.mark.gpu
def test_gpu_refuses_float64():
    f = torch.randn(8, 4, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported by the cuda kernels"):
        ak.supcon_loss(f, labels_for("random", 8).cuda(), backend="cuda")


def test_compile_fullgraph_in_a_fresh_process():
    """The first use of the C++ backend may be inside torch.compile(fullgraph=True), and
    "auto" then picks it (not the O(M N) eager path)."""
    code = """
import torch, anchor_kernels as ak
from anchor_kernels import backends
x = torch.randn(24, 8, requires_grad=True); y = torch.randint(0, 3, (24,))
for name in ("cpu", "auto"):
    fn = torch.compile(lambda x: ak.supcon_loss(x, y, backend=name), fullgraph=True,
                       backend="aot_eager")
    loss = fn(x)
    ref = ak.supcon_loss(x.detach().double(), y, backend="eager")
    assert abs(loss.item() - ref.item()) < 1e-5, (name, loss.item(), ref.item())
print(backends.select_backend("auto", backends.SupConProblem(x, y, None, None, 0.1, 0.0, None,
                                                            True, True, 0)).name)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("cpu")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_op_call_each_way(reduction):
    """A reduced loss's forward and backward are one C++ op call each: the scale and the
    reduction run inside the op, and no zero gradients are filled for valid and stats."""
    f = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
    y = labels_for("random", 24)
    with DispatchedOps() as mode:
        loss = ak.supcon_loss(f, y, base_temperature=0.07, reduction=reduction, backend="cpu")
        torch.autograd.grad(loss, f)
    ops = [op for op in mode.ops if op != "aten.ones_like"]  # the seed of autograd.grad
    assert ops == ["anchor_kernels.supcon_fwd", "anchor_kernels.supcon_bwd"], mode.ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("single", [True, False])
def test_gpu_one_op_call_each_way(dtype, single):
    """On CUDA too a normalised loss is one op call each way, for every dtype: rows that could
    overflow are scaled inside the op, not by eager ops in front of it."""
    f = torch.randn(64, 32, device="cuda", dtype=dtype, requires_grad=True)
    y = labels_for("random", 64).cuda()
    g = None if single else torch.randn(80, 32, device="cuda", dtype=dtype, requires_grad=True)
    y_g = None if single else labels_for("random", 80).cuda()
    with DispatchedOps() as mode:
        loss = ak.supcon_loss(f, y, contrast=g, contrast_labels=y_g, backend="cuda",
                              anchor_offset=0 if single else None)
        torch.autograd.grad(loss, [f] + ([] if single else [g]))
    ops = [op for op in mode.ops if op != "aten.ones_like"]  # the seed of autograd.grad
    assert ops == ["anchor_kernels.supcon_fwd", "anchor_kernels.supcon_bwd"], mode.ops


def test_plain_eager_calls_skip_the_registered_autograd(monkeypatch):
    """In plain eager mode the loss goes through ``SupConCpp`` (the kernels below the autograd
    keys, about half the host cost); under a dispatch mode, as under tracing, through the op
    and its registered autograd. Both give the same loss and gradient."""
    from anchor_kernels.ops import supcon_cpp

    applied = []
    real = supcon_cpp.SupConCpp.forward
    monkeypatch.setattr(supcon_cpp.SupConCpp, "forward",
                        staticmethod(lambda ctx, *a: (applied.append(1), real(ctx, *a))[1]))
    f = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
    y = labels_for("random", 24)
    loss = ak.supcon_loss(f, y, hard_positive_beta=1.0, backend="cpu")
    (grad,) = torch.autograd.grad(loss, f)
    assert applied == [1]
    with DispatchedOps() as mode:
        loss_op = ak.supcon_loss(f, y, hard_positive_beta=1.0, backend="cpu")
        (grad_op,) = torch.autograd.grad(loss_op, f)
    assert applied == [1] and "anchor_kernels.supcon_fwd" in mode.ops
    assert torch.equal(loss, loss_op) and torch.equal(grad, grad_op)
