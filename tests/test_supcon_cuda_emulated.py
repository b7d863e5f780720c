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


def eager_low_precision(f, y, g, y_g, weights, dtype, **options):
    """The eager reference on inputs of ``dtype``: (loss, valid, grad f, grad g) as run()'s."""
    xl = f.to(dtype).requires_grad_()
    gl = None if g is None else g.to(dtype).requires_grad_()
    low, valid = reference.supcon_per_anchor(xl, y, gl, y_g, **options)
    grads = torch.autograd.grad((low.float() * weights.float()).sum(), [xl] + ([] if g is None else [gl]))
    return low.detach(), valid, grads[0], None if g is None else grads[1]


def check_half(ours, ref, eager):
    """Loss and gradients within twice the eager low-precision reference's error."""
    for name, a, e, l in zip(("loss", "grad f", "grad g"), (ours[0], ours[2], ours[3]),
                             (ref[0], ref[2], ref[3]), (eager[0], eager[2], eager[3])):
        if e is not None:
            eager_err = (l.double() - e).abs().max().item()
            err = (a.double() - e).abs().max().item()
            assert err <= 2 * eager_err + 1e-3 * (1 + e.abs().max().item()), f"{name}: {err:.3e} vs {eager_err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(emulator, dtype):
    """Half inputs through the tensor-core kernels' FMA fallback: within 2x eager's error."""
    f, y = torch.randn(97, 64), labels_for("random", 97)
    ours, ref, (_, _, weights) = run(emulator, f, y, dtype=dtype, beta=1.0, detach_weights=False)
    check_half(ours, ref, eager_low_precision(f, y, None, None, weights, dtype, hard_positive_beta=1.0,
                                              detach_weights=False))


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


# ---------------------------------------------------------------------------------------
# The O(M + N) passes (csrc/cuda/supcon_rows.cuh), each against the ATen ops it replaces in
# the glue, in both thread orders.

def both_orders(fn):
    a, b = fn(0), fn(1)
    for x, y in zip(a, b):
        same = (x is None and y is None) or torch.equal(x, y) or (
            x.is_floating_point() and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))
        assert same, "results depend on the thread order: a missing barrier"
    return a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_row_norms(emulator, dtype, normalize):
    """Anchors and contrast rows in one launch: more rows than a CTA takes, D under and over
    the lanes per row, strided rows, a zero row (1 / eps)."""
    for m, n, d in ((1, 0, 1), (45, 0, 3), (33, 70, 130)):
        f = torch.randn(m, 2 * d)[:, ::2].to(dtype)  # element stride 2
        f[m // 2] = 0.0
        g = None if n == 0 else torch.randn(n, d).to(dtype)
        scaled, norms, inv, pre = both_orders(lambda order: emulator.row_norms(f, g, normalize, order))
        rows = f if g is None else torch.cat([f, g])
        assert torch.equal(scaled, rows)  # nothing to scale: the copy holds the rows as they are
        assert (pre is None) == (dtype == torch.float16 or not normalize)
        assert pre is None or torch.equal(pre, torch.ones(rows.shape[0]))
        expected = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
        torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
        expected_inv = expected.clamp_min(emu.NORM_EPS).reciprocal() if normalize else torch.ones_like(expected)
        torch.testing.assert_close(inv, expected_inv, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_norm_backward(emulator, dtype, normalize):
    """The chain rule through the normalisation in one launch: the float64 formula
    (dz - [||x|| >= eps] z (z . dz)) / max(||x||, eps) times the prescale factor, on strided
    rows, a zero row and a row below eps (no projection), with and without factors, dz whole
    or as the sum of three slices (the split backward's), in both thread orders."""
    m, d = 70, 37
    x = torch.randn(m, 2 * d)[:, ::2].to(dtype)  # element stride 2
    if dtype != torch.float16:  # (in float16 the true dx of a zero row, dz / eps, is out of range)
        x[3] = 0.0
        x[4] = 1e-14
    parts = torch.randn(3, m, d)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    for prescale, dz_in in ((None, parts[0]), (2.0 ** -torch.randint(0, 4, (m,)).float(), parts[0]),
                            (None, parts)):
        dz = dz_in if dz_in.dim() == 2 else dz_in.sum(0)
        got = both_orders(lambda order: emu.normalize_backward(emulator.lib, x, norms, prescale,
                                                               dz_in, normalize, order))
        n64 = norms.double().clamp_min(emu.NORM_EPS)
        z64 = x.double() / n64[:, None]
        want = dz.double()
        if normalize:
            proj = z64 * (z64 * dz.double()).sum(1, keepdim=True)
            proj = torch.where(norms[:, None] >= emu.NORM_EPS, proj, 0.0)
            want = (want - proj) / n64[:, None]
        if prescale is not None:
            want = want * prescale.double()[:, None]
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def _huge_rows(dtype, n=45, d=33):
    """Rows at every magnitude a float32 sum of squares cannot take: the largest finite value,
    just past the prescale threshold sqrt(FLT_MAX / 4D), and in between; with ordinary and
    tiny rows, a zero row, an infinite element and a NaN beside them."""
    x = torch.randn(n, d, dtype=torch.float64)
    big = (torch.finfo(torch.float32).max / (4.0 * d)) ** 0.5
    x[0] *= 0.99 * torch.finfo(torch.float32).max / x[0].abs().max()  # finite in bf16 too
    x[1] *= big * 1.001 / x[1].abs().max()
    x[2] *= big * 0.999 / x[2].abs().max()  # below the threshold: left as it is
    x[3:12] *= 1e30
    x[12:15] *= 1e-30
    x[15] = 0.0
    x[16, 3] = float("inf")
    x[17, 5] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_norms_prescaled_copy(emulator, dtype):
    """With normalisation, bf16 and fp32 rows whose squares could overflow float32 are scaled
    by a power of two into the copy the loss kernels read: bitwise what the reference's
    prescale_rows gives (exactly; itself checked against F.normalize in test_reference), with the
    copy's norms and the factors of overflow_safe_scale."""
    f = _huge_rows(dtype)
    g = _huge_rows(dtype, n=20)[torch.randperm(20)]
    scaled, norms, inv, pre = both_orders(lambda order: emulator.row_norms(f, g, True, order))
    rows = torch.cat([f, g])
    want = reference.prescale_rows(rows)
    torch.testing.assert_close(scaled, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(pre, reference.overflow_safe_scale(rows)[:, 0])
    assert (pre < 1).sum() >= 20 and pre[2] == 1  # the test scales rows, and only past the threshold
    expected = torch.linalg.vector_norm(want, dim=1, dtype=torch.float32)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(norms[finite], expected[finite], rtol=1e-6, atol=0)
    assert torch.isfinite(norms[pre < 1]).all() and (norms[pre < 1] >= 0.5).all()
    torch.testing.assert_close(inv[finite], expected[finite].clamp_min(emu.NORM_EPS).reciprocal(),
                               rtol=1e-6, atol=0)


def _round_tf32(x):
    """float32 x rounded to TF32 in float64 arithmetic: to 11 significant bits (10 stored), to
    nearest with ties away from zero, with float32's smallest normal exponent below which the
    step stays 2^-136 (TF32 keeps float32's exponent range and subnormals); inf and NaN stay."""
    x64 = x.double()
    _, e = torch.frexp(x64)  # |x| = m 2^e, m in [0.5, 1)
    step = torch.pow(2.0, (e.clamp_min(-125) - 11).double())
    rounded = torch.sign(x64) * torch.floor(x64.abs() / step + 0.5) * step
    return torch.where(torch.isfinite(x64), rounded, x64).float()


def _tf32_edges(n=40, d=24):
    """Rows of float32 values at TF32's rounding edges, bit patterns built directly: just below,
    at and above the halfway point of the 13 dropped bits (ties round away from zero), all
    dropped bits set under a carry into the exponent, both signs, subnormals, the largest
    finite values a product can take, zeros, inf and NaN."""
    low = torch.tensor([0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x0000, 0x0001], dtype=torch.int32)
    high = torch.randint(0, 1 << 19, (n, d), dtype=torch.int32) << 13  # sign, exponent, kept bits
    high = (high & ~(0xFF << 23)) | (torch.randint(100, 150, (n, d), dtype=torch.int32) << 23)
    bits = high | low[torch.randint(0, len(low), (n, d))]
    bits[0] = (0x3F7FF000 | 0x1FFF) - torch.arange(d, dtype=torch.int32) % 2  # 1 - 2^-24: carries to 1
    bits[1] = torch.randint(1, 1 << 23, (d,), dtype=torch.int32)  # subnormals
    bits[2] = bits[1] | torch.tensor(-(1 << 31), dtype=torch.int32)  # negative subnormals
    bits[3] = 0x7F7FE000 | torch.randint(0, 0x1000, (d,), dtype=torch.int32)  # huge, no overflow
    x = bits.view(torch.float32).clone()
    x[4] = 0.0
    x[5, 1] = float("inf")
    x[6, 2] = float("nan")
    x[7] = -x[7].abs()
    return x


@pytest.mark.parametrize("normalize", [True, False])
def test_row_norms_tf32_copy(emulator, normalize):
    """fp32 rows for the TF32 kernels (kTFloat32): the copy the kernels read is the rows
    (prescaled with normalisation, as for fp32) rounded to TF32 as cvt.rna.tf32.f32 rounds,
    against an independent float64 rounding, on every rounding edge; its norms are the rounded
    rows'; without normalisation nothing is prescaled."""
    f = _tf32_edges()
    g = torch.randn(23, 24)
    scaled, norms, inv, pre = both_orders(lambda order: emulator.row_norms(f, g, normalize, order, tf32=True))
    rows = torch.cat([f, g])
    unrounded = reference.prescale_rows(rows) if normalize else rows
    want = _round_tf32(unrounded)
    torch.testing.assert_close(scaled, want, rtol=0, atol=0, equal_nan=True)
    assert (scaled.view(torch.int32)[torch.isfinite(scaled)] & 0x1FFF == 0).all()
    assert not torch.equal(want, unrounded)  # the rows do need rounding
    if not normalize:
        assert torch.equal(pre, torch.ones(rows.shape[0]))
    expected = torch.linalg.vector_norm(want, dim=1, dtype=torch.float32)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(norms[finite], expected[finite], rtol=1e-6, atol=0)
    want_inv = expected[finite].clamp_min(emu.NORM_EPS).reciprocal() if normalize else 1.0
    torch.testing.assert_close(inv[finite], torch.ones_like(inv[finite]) * want_inv, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("single", [True, False])
def test_huge_rows_inside_the_op(emulator, dtype, single):
    """Rows up to float32's largest value through the glue's overflow-safe copy: finite loss
    and gradients, against the float64 reference on the same rounded rows (float32: 1e-4;
    bf16: within twice the eager bf16 reference's error), gradients (which scale as 1 / ||x||)
    compared at unit scale, so that a row's factor missing from the chain rule shows."""
    f = _huge_rows(torch.float64, n=40, d=24)
    f[16:18] = torch.randn(2, 24, dtype=torch.float64)  # no inf or NaN
    f[18:] *= 1e33
    f = f.to(dtype).double()
    y = labels_for("random", 40)
    g, y_g = (None, None) if single else (torch.cat([f[20:], f[:20] * 2.0 ** -100]), y.roll(7))
    offset = 0 if single else None
    ours, ref, (_, _, weights) = run(emulator, f, y, g, y_g, dtype=dtype, beta=1.0, anchor_offset=offset)
    assert all(torch.isfinite(a).all() for a in ours if a is not None and a.is_floating_point())

    def at_unit(out):
        return (out[0], out[1], out[2].double() * f.norm(dim=1, keepdim=True),
                None if single else out[3].double() * g.norm(dim=1, keepdim=True))

    if dtype == torch.float32:
        check_fp32(at_unit(ours), at_unit(ref))
    else:
        eager = eager_low_precision(f, y, g, y_g, weights, dtype, hard_positive_beta=1.0, anchor_offset=offset)
        check_half(at_unit(ours), at_unit(ref), at_unit(eager))


@pytest.mark.parametrize("m", [1, 7, 300])
def test_loss_reduce(emulator, m):
    loss = torch.randn(m)
    valid = torch.rand(m) > 0.3
    loss[~valid] = 0.0
    for scale in (1.0, 0.7):
        for code, name in enumerate(("none", "sum", "mean")):
            (out,) = both_orders(lambda order: (emulator.loss_reduce(loss, valid, scale, code, order),))
            expected = reference.reduce_loss(loss, valid, scale, name)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    none_valid = torch.zeros(m, dtype=torch.bool)
    out = emulator.loss_reduce(torch.zeros(m), none_valid, 1.0, 2)
    assert out.item() == 0.0  # the mean over no valid anchor is 0, not NaN


def staged_with_aten(stats, grad, scale, reduction, uniform):
    """What the glue computed with ATen ops before the staging kernel (its specification)."""
    m = stats.shape[0]
    ok = stats[:, 3] > 0
    g = grad.float().expand(m) * scale
    if reduction == 2:
        g = g / ok.sum().clamp_min(1)
    ga = torch.where(ok, g, 0.0)
    inf = float("inf")
    q = torch.where(ok, stats[:, 3].reciprocal(), 0.0) if uniform else torch.where(ok, stats[:, 2], inf)
    anchor = torch.stack([ga, torch.where(ok, stats[:, 0], inf), q, torch.where(ok, stats[:, 1], 0.0)])
    amax = ga.abs().max()
    return anchor, torch.where(amax > 0, amax, torch.ones_like(amax)).reshape(1)


@pytest.mark.parametrize("m", [1, 9, 260])
@pytest.mark.parametrize("uniform", [True, False])
def test_anchor_stage(emulator, m, uniform):
    """Per-anchor grad (stride 1 and an expanded stride 0) and a reduced loss's one value, with
    the scale and the mean's count of valid anchors; invalid anchors staged to give G = 0."""
    stats = torch.randn(m, 4)
    stats[:, 3] = torch.randint(0, 4, (m,)).float()  # |P(i)|, 0 for some: invalid
    stats[0, 3] = 2.0
    cases = [(torch.randn(m), 0), (torch.tensor(1.5).expand(m), 0), (torch.tensor(-0.5), 1),
             (torch.tensor(0.25), 2)]
    for grad, reduction in cases:
        for scale in (1.0, 0.7):
            anchor, gmax = both_orders(
                lambda order: emulator.anchor_stage(stats, grad, scale, reduction, uniform, order))
            exp_anchor, exp_gmax = staged_with_aten(stats, grad, scale, reduction, uniform)
            torch.testing.assert_close(anchor, exp_anchor, rtol=1e-6, atol=0)
            torch.testing.assert_close(gmax, exp_gmax, rtol=1e-6, atol=0)
    stats[:, 3] = 0.0  # no valid anchor: every g_i is 0 and gmax falls back to 1
    anchor, gmax = emulator.anchor_stage(stats, torch.tensor(1.0), 1.0, 2, uniform)
    assert torch.equal(anchor[0], torch.zeros(m)) and gmax.item() == 1.0


@pytest.mark.parametrize("single", [True, False])
def test_reduced_loss_end_to_end(emulator, single):
    """The glue's reduced path: the mean (over anchors with positives) times a scale, and its
    0-d gradient expanded by the staging kernel, against the reference's loss and gradients."""
    m, n = 40, 56
    f = torch.randn(m, 16)
    y = labels_for("some_alone", m)
    g = None if single else torch.randn(n, 16)
    y_g = None if single else labels_for("random", n)
    offset = 0 if single else None
    kw = dict(temperature=0.2, beta=1.0, normalize=True, anchor_offset=offset, lse_only=False)
    loss, _, stats = emulator.forward(f, y, g, y_g, scale=0.5, reduction=2, **kw)
    df, dg = emulator.backward(torch.tensor(1.0), f, y, g, y_g, stats, detach_weights=True,
                               scale=0.5, reduction=2, **kw)
    fx = f.double().requires_grad_()
    gx = None if single else g.double().requires_grad_()
    expected = reference.supcon_loss(fx, y, gx, y_g, temperature=0.2, base_temperature=0.4,
                                     hard_positive_beta=1.0, anchor_offset=offset)
    grads = torch.autograd.grad(expected, [fx] + ([] if single else [gx]))
    assert loss.shape == () and abs(loss.item() - expected.item()) < 1e-5
    assert (df.double() - grads[0]).abs().max() < 1e-5
    if not single:
        assert (dg.double() - grads[1]).abs().max() < 1e-5


def _run_host_check(name, tmp_path):
    """Compile tests/cuda_emulation/<name> with nvcc and the CuTe headers, run it on the host,
    and require that it reports no failure."""
    compiler = emu.nvcc()
    if compiler is None or _ext.cutlass_include() is None:
        pytest.skip("needs nvcc and the nvidia-cutlass headers")
    source = os.path.join(os.path.dirname(__file__), "cuda_emulation", name)
    exe = tmp_path / "check"
    build = subprocess.run([compiler, "-std=c++17", "--expt-relaxed-constexpr", "-I", _ext.CSRC_DIR,
                            "-I", _ext.cutlass_include(), source, "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and "failures 0" in out.stdout, out.stdout[-4000:]


def test_tensor_core_fragment_layouts(tmp_path):
    """The CuTe kernels' fragment layout assumptions, for every thread, checked on the host
    (tests/cuda_emulation/supcon_mma_layouts.cu): nvcc compiles it, the host runs it."""
    _run_host_check("supcon_mma_layouts.cu", tmp_path)


def test_ldmatrix_fills_the_fragments_the_products_expect(tmp_path):
    """Every ldmatrix of the sm_80 tensor-core kernels (SupCon forward and backward, similarity
    forward and backward, G^T read transposed, selection), with the rows CuTe has each lane point at in
    the kernels' swizzled layouts, read as the hardware reads them, fills each fragment
    register with the element the next mma.sync expects, for every warp and k-step, on the
    host (tests/cuda_emulation/mma_ldmatrix.cu)."""
    _run_host_check("mma_ldmatrix.cu", tmp_path)


def test_forward_math(tmp_path):
    """The forwards' per-logit code (online log-sum-exp in units of t, positives, soft
    weights, masks, the statistics; the sm_80 and Hopper TF32 kernels' 64-column tiles and the
    Hopper 16-bit one's 128) against float64, and the Hopper backward's 32-bit self-pair arithmetic against the
    64-bit condition, on the host
    (tests/cuda_emulation/supcon_fwd_math.cu)."""
    _run_host_check("supcon_fwd_math.cu", tmp_path)


def test_hopper_shared_memory_descriptors(tmp_path):
    """The wgmma descriptors CuTe builds from the Hopper kernels' shared-memory layouts, decoded
    as the hardware reads them (K-major S operands, the MN-major transposed Y of dX += H Y, the
    TF32 backward's Y^T, every k-step, stage and warpgroup), address the elements the TMA
    copies and the TF32 transposers put there; the transposers run over a tile
    (tests/cuda_emulation/supcon_sm90_smem.cu)."""
    _run_host_check("supcon_sm90_smem.cu", tmp_path)


def test_tma_descriptors_are_remembered_per_matrix(tmp_path):
    """The Hopper kernels' TMA descriptors are made once per row matrix while it stays among the
    last four asked for (RowsCache, csrc/cuda/rows_cache.h): every value returned is the one
    making it gives for that matrix and width, whichever field differs
    (tests/cuda_emulation/rows_cache.cu)."""
    _run_host_check("rows_cache.cu", tmp_path)
