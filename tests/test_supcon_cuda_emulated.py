"""The CUDA SupCon kernels' device code on the host (tests/cuda_emulation): every tier-1
machine checks their indexing, masks, online statistics, barriers and both backward passes
against the float64 reference, FMA paths only (the tensor-core tile products need a GPU and
are covered by the tier-2 tests in test_supcon_cpp.py); of the CuTe kernels, the fragment
layouts they assume."""

import os
import subprocess

import pytest
import torch

from anchor_kernels import _ext, reference

from .cuda_emulation import supcon_emulated as emu
from .utils import labels_for


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    try:
        path = emu.build(str(tmp_path_factory.mktemp("cuda_emulation")))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return emu.Emulator(path)


def run(emulator, f, y, g=None, y_g=None, *, dtype=torch.float32, temperature=0.1, beta=0.0,
        detach_weights=True, normalize=True, anchor_offset=0):
    """Emulated forward + backward in both thread orders (must agree bitwise) and the float64
    reference; returns (ours, ref) as (loss, valid, grad f, grad g)."""
    fx = f.double().clone().requires_grad_()
    gx = None if g is None else g.double().clone().requires_grad_()
    loss, valid = reference.supcon_per_anchor(
        fx, y, gx, y_g, temperature=temperature, hard_positive_beta=beta,
        detach_weights=detach_weights, normalize=normalize, anchor_offset=anchor_offset)
    weights = torch.rand(f.shape[0], dtype=torch.float64) + 0.5
    grads = torch.autograd.grad((loss * weights).sum(), [fx] + ([] if g is None else [gx]))
    ref = (loss.detach(), valid, grads[0], None if g is None else grads[1])
    kw = dict(temperature=temperature, beta=beta, normalize=normalize, anchor_offset=anchor_offset)
    runs = []
    for order in (0, 1):
        fl, gl = f.to(dtype), None if g is None else g.to(dtype)
        out_loss, out_valid, stats = emulator.forward(fl, y, gl, y_g, lse_only=False, order=order, **kw)
        df, dg = emulator.backward(weights.float(), fl, y, gl, y_g, stats, lse_only=False,
                                   detach_weights=detach_weights, order=order, **kw)
        runs.append((out_loss, out_valid, df, dg))
    for a, b in zip(*runs):
        assert a is None or torch.equal(a, b), "results depend on the thread order: a missing barrier"
    return runs[0], ref, (fx, gx, weights)


def check_fp32(ours, ref, tol=1e-4):
    assert torch.equal(ours[1], ref[1])
    for name, a, e in zip(("loss", "grad f", "grad g"), (ours[0], ours[2], ours[3]), (ref[0], ref[2], ref[3])):
        if e is not None:
            err = (a.double() - e).abs()
            assert (err <= tol + tol * e.abs()).all(), f"{name}: max err {err.max().item():.3e}"


OPTIONS = [dict(), dict(beta=2.0), dict(beta=2.0, detach_weights=False),
           dict(normalize=False, temperature=0.5)]
OPTION_IDS = ["supcon", "soft", "soft-exact", "unnormalized"]


@pytest.mark.parametrize("m,d", [(1, 3), (2, 3), (3, 59), (97, 130), (130, 64)])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_single_set(emulator, m, d, options):
    ours, ref, _ = run(emulator, torch.randn(m, d), labels_for("random", m), **options)
    check_fp32(ours, ref)


@pytest.mark.parametrize("kind", ["one_class", "all_distinct", "some_alone"])
def test_label_patterns(emulator, kind):
    ours, ref, _ = run(emulator, torch.randn(70, 24), labels_for(kind, 70), beta=1.5,
                       detach_weights=False)
    check_fp32(ours, ref)


@pytest.mark.parametrize("m,n,offset", [(3, 97, 0), (70, 150, 80), (5, 3, None), (1, 1, 0)])
@pytest.mark.parametrize("options", OPTIONS[:3], ids=OPTION_IDS[:3])
def test_two_sets(emulator, m, n, offset, options):
    g, y_g = torch.randn(n, 59), labels_for("random", n)
    if offset is None:
        f, y = torch.randn(m, 59), torch.randint(0, max(1, n // 4), (m,))
    else:
        f, y = g[offset:offset + m].clone(), y_g[offset:offset + m].clone()
    ours, ref, _ = run(emulator, f, y, g, y_g, anchor_offset=offset, **options)
    check_fp32(ours, ref)


def test_strided_and_zero_rows(emulator):
    f = torch.randn(40, 2 * 33)[:, ::2]
    f[5] = 0.0
    ours, ref, _ = run(emulator, f, labels_for("random", 40), beta=1.0)
    check_fp32(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(emulator, dtype):
    """Half inputs through the tensor-core kernels' FMA fallback: within 2x eager's error."""
    f, y = torch.randn(97, 64), labels_for("random", 97)
    ours, ref, (fx, _, weights) = run(emulator, f, y, dtype=dtype, beta=1.0, detach_weights=False)
    xl = f.to(dtype).requires_grad_()
    low, _ = reference.supcon_per_anchor(xl, y, hard_positive_beta=1.0, detach_weights=False)
    (low_grad,) = torch.autograd.grad((low.float() * weights.float()).sum(), xl)
    for name, a, e, l in (("loss", ours[0], ref[0], low), ("grad", ours[2], ref[2], low_grad)):
        eager_err = (l.double() - e).abs().max().item()
        err = (a.double() - e).abs().max().item()
        assert err <= 2 * eager_err + 1e-3 * (1 + e.abs().max().item()), f"{name}: {err:.3e} vs {eager_err:.3e}"


def test_lse_only(emulator):
    f, y = torch.randn(50, 16), labels_for("random", 50)
    loss, valid, stats = emulator.forward(f, y, None, None, temperature=0.2, beta=0.0,
                                          normalize=True, anchor_offset=0, lse_only=True)
    x = f.double().requires_grad_()
    z = reference.normalize_rows(x)
    s = (z @ z.T / 0.2).masked_fill(torch.eye(50, dtype=torch.bool), float("-inf"))
    lse = torch.logsumexp(s, dim=1)
    lse.sum().backward()
    assert valid.all() and torch.equal(stats[:, 3], torch.full((50,), 49.0))
    assert (loss.double() - lse).abs().max() < 1e-5
    df, _ = emulator.backward(torch.ones(50), f, y, None, None, stats, temperature=0.2, beta=0.0,
                              detach_weights=True, normalize=True, anchor_offset=0, lse_only=True)
    assert (df.double() - x.grad).abs().max() < 1e-5


def test_tensor_core_fragment_layouts(tmp_path):
    """The CuTe kernels' fragment layout assumptions, for every thread, checked on the host
    (tests/cuda_emulation/supcon_mma_layouts.cu): nvcc compiles it, the host runs it."""
    compiler = emu.nvcc()
    if compiler is None or _ext.cutlass_include() is None:
        pytest.skip("needs nvcc and the nvidia-cutlass headers")
    source = os.path.join(os.path.dirname(__file__), "cuda_emulation", "supcon_mma_layouts.cu")
    exe = tmp_path / "layouts"
    build = subprocess.run([compiler, "-std=c++17", "--expt-relaxed-constexpr", "-I", _ext.CSRC_DIR,
                            "-I", _ext.cutlass_include(), source, "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and "failures 0" in out.stdout, out.stdout[-4000:]
