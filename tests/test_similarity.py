"""pairwise_similarity: every backend against ``F.normalize(a) @ F.normalize(b).T / t``.

Tier 1 (CPU): Triton under the interpreter on small shapes, the C++ "cpu" kernels, eager,
float64 gradcheck (eager and C++), opcheck, torch.compile, every Triton configuration compiled
for sm_90, and the CUDA kernels' device code under the host emulation. Tier 2 (``gpu``): the
same tests with compiled Triton on CUDA tensors, and Triton and CUDA C++ at N = 4096 / 16384 /
65536.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anchor_kernels import _ext, pairwise_similarity, reference
import anchor_kernels.ops.similarity_triton  # noqa: F401  registers the Triton ops
from anchor_kernels.similarity import DISPATCH

from .cuda_emulation import similarity_emulated as emu
from .utils import DispatchedOps, TritonCalls, assert_graph_safe, cuda_kernels_run

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)  # the CUDA C++ kernels: tier 2
CPU_BACKENDS = ["triton", "cpu", "eager", CUDA]
FUSED = ["triton", "cpu", CUDA]
LOW = [torch.bfloat16, torch.float16]
# Triton runs compiled on CUDA tensors when a GPU is present (the same tests are then tier 2),
# under the interpreter on CPU tensors otherwise. Results are compared on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(backend):
    return DEVICE if backend in ("triton", "cuda") else "cpu"


@pytest.fixture(scope="module", autouse=True)
def extension():
    """The C++ extension must build on every tier-1 machine; fail with the reason if not."""
    assert _ext.load() is None, _ext.load()
    DISPATCH.get("cpu")  # resolved eagerly, so that torch.compile traces no import


def oracle(a, b, temperature, normalize=True):
    """The formula of the issue, independent of the library."""
    if b is None:
        b = a
    if normalize:
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    return a @ b.T / temperature


def assert_close(name, out, ref64, eager, atol):
    """|out - ref64| <= 2 |eager - ref64| (eager's own error at that precision) + atol."""
    err = (out.double() - ref64).abs()
    bound = 2 * (eager.double() - ref64).abs().max().item() + atol
    bad = err > bound
    if bad.any():
        first = [tuple(i) for i in bad.nonzero()[:5].tolist()]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements above {bound:.3g} "
            f"(first {first}); max err {err.max().item():.3g}, mean {err.mean().item():.3g}")


def run(a, b, g, backend, temperature, normalize=True):
    """S and (da, db) for dL/dS = g, on the CPU; db is None when b is None."""
    dev = device_for(backend)
    a = a.detach().to(dev).requires_grad_()
    b = None if b is None else b.detach().to(dev).requires_grad_()
    s = pairwise_similarity(a, b, temperature=temperature, normalize=normalize, backend=backend)
    grads = torch.autograd.grad(s, [a] if b is None else [a, b], g.to(dev))
    return s.cpu(), grads[0].cpu(), (None if b is None else grads[1].cpu())


def check_against_oracle(a, b, backend, temperature=0.5, normalize=True):
    m = a.shape[0]
    n = m if b is None else b.shape[0]
    g = torch.randn(m, n).to(a.dtype)
    out = run(a, b, g, backend, temperature, normalize)
    a64 = a.double()
    b64 = None if b is None else b.double()
    ref = run_oracle(a64, b64, g.double(), temperature, normalize)
    eager = run_oracle(a, b, g, temperature, normalize)
    scale = max(1.0, ref[0].abs().max().item())
    atol = (1e-5 if a.dtype == torch.float32 else 2e-3) * scale
    for name, o, r, e in zip(("S", "da", "db"), out, ref, eager):
        if r is not None:
            assert o.dtype == a.dtype and o.shape == r.shape, (name, o.dtype, o.shape)
            assert torch.isfinite(o).all(), f"{name} has non-finite values"
            assert_close(name, o, r, e, atol * max(1.0, r.abs().max().item() / scale))


def run_oracle(a, b, g, temperature, normalize):
    a = a.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    s = oracle(a, b, temperature, normalize)
    grads = torch.autograd.grad(s, [a] if b is None else [a, b], g)
    return s, grads[0], (None if b is None else grads[1])


# Shapes cover: single rows, D below/at/above one backward feature block (64, 128), M and N
# not multiples of any tile, D = 130 (two-pass normalisation backward).
SHAPES = [(1, 1, 1), (2, 3, 3), (97, 33, 59), (33, 97, 100), (37, 20, 130)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m,n,d", SHAPES)
def test_float32_matches_oracle(backend, m, n, d):
    check_against_oracle(torch.randn(m, d), torch.randn(n, d), backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("m,n,d", [(2, 3, 3), (37, 20, 130)])
def test_low_precision_matches_oracle(backend, dtype, m, n, d):
    check_against_oracle(torch.randn(m, d).to(dtype), torch.randn(n, d).to(dtype), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_similarity(backend):
    check_against_oracle(torch.randn(19, 59), None, backend, temperature=0.07)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("d", [3, 130])
def test_unnormalized(backend, d):
    check_against_oracle(torch.randn(9, d), torch.randn(11, d), backend, temperature=2.0,
                         normalize=False)


@pytest.mark.parametrize("backend", FUSED)
def test_strided_inputs(backend):
    a = torch.randn(59, 40).T  # (40, 59), column-major
    b = torch.randn(50, 59)[::2]  # (25, 59), row stride 2 D
    assert not a.is_contiguous() and not b.is_contiguous()
    check_against_oracle(a, b, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", [5, 130])
def test_zero_rows_never_nan(backend, d):
    a = torch.randn(6, d)
    b = torch.randn(5, d)
    a[2] = 0
    b[0] = 0
    b[3] = 1e-30  # below eps: scaled by 1/eps like F.normalize, no gradient to the norm
    check_against_oracle(a, b, backend)
    s, da, db = run(a, b, torch.ones(6, 5), backend, 0.1)
    assert (s[2] == 0).all() and (s[:, 0] == 0).all()
    for t in (s, da, db):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", LOW)
def test_zero_rows_never_nan_low_precision(backend, dtype):
    """Never NaN, and the kernels never form G / n_b (1 / eps = 1e12 overflows float16).

    The true gradient of a zero row is dz / eps, about 1e12: finite in bfloat16, beyond
    float16's range (there it is +-inf, and eager float16 F.normalize gives NaN since eps
    underflows to 0). Every other row matches the float64 formula.
    """
    a, b = torch.randn(6, 5).to(dtype), torch.randn(5, 5).to(dtype)
    a[2], b[0] = 0, 0
    g = torch.randn(6, 5).to(dtype)
    s, da, db = run(a, b, g, backend, 0.1)
    ref = run_oracle(a.double(), b.double(), g.double(), 0.1, True)
    assert torch.isfinite(s).all()
    for got, want, zero in ((da, ref[1], 2), (db, ref[2], 0)):
        assert not got.isnan().any()
        keep = torch.arange(got.shape[0]) != zero
        torch.testing.assert_close(got[keep].double(), want[keep], rtol=2e-2, atol=2e-2)
        if dtype == torch.bfloat16:  # relative to the row's scale: dz sums with cancellation
            scale = want[zero].abs().max().item()
            torch.testing.assert_close(got[zero].double() / scale, want[zero] / scale,
                                       rtol=0, atol=2e-2)
    torch.testing.assert_close(s.double(), ref[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(backend, normalize):
    """Through the C++ backward (float64 kernels) and through autograd of the reference.
    Zero rows sit on the kink of x / max(||x||, eps); test_zero_rows_never_nan covers them."""
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(530, 4, dtype=torch.float64, requires_grad=True)  # two C++ column tiles
    kw = dict(temperature=0.3, normalize=normalize, backend=backend)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_similarity(a, b, **kw), (a, b))
    assert torch.autograd.gradcheck(lambda a: pairwise_similarity(a, **kw), (a,))


def test_triton_gradients_match_float64_eager():
    """The Triton backward against autograd through the float64 reference (not the oracle)."""
    a = torch.randn(13, 70, dtype=torch.float64)
    b = torch.randn(17, 70, dtype=torch.float64)
    g = torch.randn(13, 17, dtype=torch.float64)
    ref = run(a, b, g, "eager", 0.2)
    out = run(a.float(), b.float(), g.float(), "triton", 0.2)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(normalize):
    a, b = torch.randn(5, 7, device=DEVICE), torch.randn(6, 7, device=DEVICE)
    ops = torch.ops.anchor_kernels
    torch.library.opcheck(ops.similarity_fwd_triton.default, (a, b, normalize, 0.5))
    # one set: the op's two norm outputs are distinct tensors (outputs may not alias)
    torch.library.opcheck(ops.similarity_fwd_triton.default, (a, a, normalize, 0.5))
    _, na, nb = ops.similarity_fwd_triton(a, b, normalize, 0.5)
    g = torch.randn(5, 6, device=DEVICE)
    torch.library.opcheck(ops.similarity_bwd_triton.default, (g, a, b, na, nb, normalize, 0.5))
    _, na, na2 = ops.similarity_fwd_triton(a, a, normalize, 0.5)
    torch.library.opcheck(ops.similarity_bwd_triton.default,
                          (torch.randn(5, 5, device=DEVICE), a, a, na, na2, normalize, 0.5))
    a, b, g = a.cpu().double(), b.cpu().double(), g.cpu().double()
    torch.library.opcheck(ops.similarity_fwd, (a.requires_grad_(), b, True, 0.5))
    torch.library.opcheck(ops.similarity_bwd, (g, a.detach(), b, True, 0.5))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    a = torch.randn(9, 20, device=dev, requires_grad=True)
    b = torch.randn(7, 20, device=dev, requires_grad=True)
    fn = torch.compile(lambda a, b: pairwise_similarity(a, b, temperature=0.5, backend=backend),
                       fullgraph=True)
    g = torch.randn(9, 7, device=dev)
    out = run(a.cpu(), b.cpu(), g.cpu(), "eager", 0.5)
    s = fn(a, b)
    da, db = torch.autograd.grad(s, (a, b), g)
    for o, r in zip((s, da, db), out):
        torch.testing.assert_close(o.cpu(), r, rtol=1e-5, atol=1e-5)
    # one set, through the same compiled graph's op
    single = torch.compile(lambda a: pairwise_similarity(a, temperature=0.5, backend=backend),
                           fullgraph=True)
    g = torch.randn(9, 9, device=dev)
    s = single(a)
    (da,) = torch.autograd.grad(s, (a,), g)
    a64 = a.detach().cpu().double().requires_grad_(True)
    s64 = reference.pairwise_similarity(a64, temperature=0.5)
    (da64,) = torch.autograd.grad(s64, (a64,), g.cpu().double())
    torch.testing.assert_close(s.cpu().double(), s64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(da.cpu().double(), da64, rtol=1e-5, atol=1e-5)


def test_autocast_runs_in_low_precision():
    a, b = torch.randn(6, 10, device=DEVICE), torch.randn(4, 10, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        s = pairwise_similarity(a, b, backend="triton")
    assert s.dtype == torch.bfloat16
    torch.testing.assert_close(s.float(), oracle(a, b, 1.0), rtol=0, atol=2e-2)


def test_empty_inputs():
    s = pairwise_similarity(torch.randn(0, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE),
                            backend="triton")
    assert s.shape == (0, 3)


@pytest.mark.parametrize("call,err,match", [
    (lambda: pairwise_similarity([1.0]), TypeError, "a must be a torch.Tensor"),
    (lambda: pairwise_similarity(torch.randn(3)), ValueError, "a must be 2-D"),
    (lambda: pairwise_similarity(torch.ones(3, 2, dtype=torch.int64)), TypeError, "a must be float"),
    (lambda: pairwise_similarity(torch.randn(3, 2), torch.randn(3, 4)), ValueError, r"b must be \(N, 2\)"),
    (lambda: pairwise_similarity(torch.randn(3, 2), torch.randn(3, 2).double()), TypeError, "b has dtype"),
    (lambda: pairwise_similarity(torch.randn(3, 2), temperature=0), ValueError, "temperature"),
    (lambda: pairwise_similarity(torch.randn(3, 2), normalize=1), TypeError, "normalize must be a bool"),
    (lambda: pairwise_similarity(torch.randn(3, 2), backend="fast"), ValueError, "backend must be one of"),
    (lambda: pairwise_similarity(torch.randn(3, 2).double(), backend="triton"), ValueError,
     "triton.*float64"),
    # the C++ ops check their arguments too, for direct calls
    (lambda: torch.ops.anchor_kernels.similarity_fwd(torch.randn(3, 2), torch.randn(4, 3), True, 1.0),
     RuntimeError, r"b must have shape \(N, 2\)"),
    (lambda: torch.ops.anchor_kernels.similarity_fwd(torch.randn(3, 2), torch.randn(4, 2), True, 0.0),
     RuntimeError, "temperature must be finite and > 0"),
    (lambda: torch.ops.anchor_kernels.similarity_bwd(torch.randn(3, 3), torch.randn(3, 2),
                                                     torch.randn(4, 2), True, 1.0),
     RuntimeError, r"grad must have shape \(3, 4\)"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_reference_matches_oracle():
    a, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(reference.pairwise_similarity(a, b, temperature=0.3),
                               oracle(a, b, 0.3), rtol=0, atol=1e-14)
    torch.testing.assert_close(reference.pairwise_similarity(a, normalize=False), a @ a.T)


_SPEC_SCRIPT = """
import torch
from unittest import mock
import triton._C.libtriton as lib
from anchor_kernels.ops import hard_positive_triton as H, rows_triton as R, similarity_triton as S
def specs():
    return [(k.__name__, tuple((n, 'i1' if t == 'u1' else t) for n, t in sig.items()),
             tuple(sorted(c.items()))) for k, sig, c, w, st in
            list(S.sm90_compile_specs()) + list(H.sm90_compile_specs()) + list(R.sm90_compile_specs())]
native = specs()
with mock.patch.object(lib, 'native_specialize_impl', side_effect=TypeError):
    fallback = specs()
print(len(native), native == fallback)
"""


def test_specialization_fallback_matches_triton():
    """triton_launch derives launch signatures with Triton's own routine where it exists and
    with the same rules in Python otherwise (older Triton, e.g. 3.6 on the GPU machine): on
    every launch the kernels make, both give the same signature (bool is u1 or i1 by version)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SPEC_SCRIPT], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["45", "True"], proc.stdout


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    try:
        path = emu.build_emulator("similarity_emulator.cpp", str(tmp_path_factory.mktemp("emu")))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return emu.Emulator(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,d,normalize", [(1, 1, 1, True), (70, 130, 59, True),
                                             (65, 3, 130, True), (9, 70, 20, False)])
def test_cuda_kernels_emulated(emulator, dtype, m, n, d, normalize):
    """The CUDA kernels' device code on the host (FMA paths; the tensor-core products are
    tier 2): S and both gradients, with G strided as for db (G^T), in both thread orders
    (bitwise equal: no missing barrier), against the float64 formula by the 2x-eager rule."""
    a, b = torch.randn(m, d).to(dtype), torch.randn(n, d).to(dtype)
    if dtype != torch.float16 and m > 2:
        a[2] = 0  # (in float16 the true gradient of a zero row, 1e12, is out of range)
    g = torch.randn(n, m).to(dtype).T
    outs = []
    for order in (0, 1):
        s = emulator.forward(a, b, normalize, 0.5, order)
        outs.append((s, *emulator.backward(g, a, b, normalize, 0.5, order)))
    for x, y in zip(*outs):
        assert torch.equal(x, y), "thread orders disagree: a barrier is missing"
    ref = run_oracle(a.double(), b.double(), g.double(), 0.5, normalize)
    eager = run_oracle(a, b, g, 0.5, normalize)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, o, r, e in zip(("S", "da", "db"), outs[0], ref, eager):
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        assert_close(name, o, r, e, atol * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e36), (torch.bfloat16, 1e36),
                                         (torch.float32, 1e-30)])
def test_cuda_kernels_emulated_scale_huge_rows_in_the_op(emulator, dtype, scale):
    """Rows whose sum of squares overflows fp32 reach the glue raw: its one row-norms launch
    writes their overflow-safe copy (and near-zero rows stay as they are), and S and the
    gradients (times ||x||: unit scale) match the float64 reference, one set and two."""
    a, b = (torch.randn(70, 24) * scale).to(dtype), (torch.randn(9, 24) * scale).to(dtype)
    a[1] /= scale  # one ordinary row among the huge ones
    for other in (a, b):
        s = emulator.forward(a, other, True, 0.5)
        g = torch.randn_like(s)
        da, db = emulator.backward(g, a, other, True, 0.5)
        ad, od = a.double().requires_grad_(), other.double().requires_grad_()
        want = reference.pairwise_similarity(ad, od, temperature=0.5)
        want_da, want_db = torch.autograd.grad(want, [ad, od], g.double())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(s.double(), want, rtol=tol, atol=tol)
        for got, ref, x in ((da, want_da, ad), (db, want_db, od)):
            unit = x.detach().norm(dim=1, keepdim=True)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double() * unit, ref * unit, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------- tier 2

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large(backend, n, dtype):
    """S and both gradients, checked on row and column slices against the float64 formula:
    normalisation is per row, so a slice of rows (or columns) is an exact sub-problem and the
    oracle stays small. Everything stays on the GPU."""
    torch.manual_seed(0)
    d = 128
    a = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    b = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    g = torch.randn(n, n, device="cuda", dtype=dtype)
    s = pairwise_similarity(a, b, temperature=0.1, backend=backend)
    da, db = torch.autograd.grad(s, (a, b), g)
    rows = torch.randperm(n, device="cuda")[:256]
    atol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16: output and operand rounding
    ref_s, ref_da, _ = run_oracle(a[rows].double(), b.double(), g[rows].double(), 0.1, True)
    s_atol = 1e-4 if dtype == torch.float32 else 5e-2  # |S| <= 1 / t = 10; bf16 keeps 8 bits
    torch.testing.assert_close(s[rows].double(), ref_s, rtol=0, atol=s_atol)
    scale = ref_da.abs().max().item()
    torch.testing.assert_close(da[rows].double() / scale, ref_da / scale, rtol=0, atol=atol)
    _, _, ref_db = run_oracle(a.double(), b[rows].double(), g[:, rows].double(), 0.1, True)
    scale = ref_db.abs().max().item()
    torch.testing.assert_close(db[rows].double() / scale, ref_db / scale, rtol=0, atol=atol)


# Shapes around the CuTe kernels' rule (bf16 / fp16, D <= 128 with D % 8 == 0; for a backward
# side, G contiguous along an extent that is a multiple of 8: N for da and db as G comes, M when
# it comes transposed): rows off the 128 / 64 tiles, one row, an odd N (S stored a column at a
# time), forward CTAs that stream two column tiles with a last one left alone (4224 x 3976),
# D = 130 (the other kernels throughout).
TENSOR_CORE_SHAPES = [(200, 72, 128), (136, 520, 64), (1, 8, 8), (77, 200, 24), (200, 77, 128),
                      (4224, 3976, 128), (70, 72, 130)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("m,n,d", TENSOR_CORE_SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("g_transposed", [False, True])
@pytest.mark.parametrize("choice", ["auto", "general"])
def test_gpu_tensor_core_kernels(dtype, m, n, d, normalize, g_transposed, choice, monkeypatch):
    """The CUDA backend's CuTe kernels (their names in the profile) run exactly where the rule
    says, and not at all with ANCHOR_KERNELS_CUDA_KERNELS=general; either way S and both
    gradients match the float64 formula by the 2x-eager rule, the upstream gradient as it comes
    or transposed (da then reads it as G^T, db as it lies)."""
    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", choice)
    torch.manual_seed(0)
    a, b = torch.randn(m, d).to(dtype), torch.randn(n, d).to(dtype)
    g = torch.randn(n, m).to(dtype).T if g_transposed else torch.randn(m, n).to(dtype)
    out = []
    names = cuda_kernels_run(lambda: out.append(run(a, b, g, "cuda", 0.5, normalize)))
    rows = d <= 128 and d % 8 == 0 and choice == "auto"
    assert any("similarity_fwd_mma_kernel" in k for k in names) == rows, names
    g_rows = (m if g_transposed else n) % 8 == 0
    assert sum("similarity_bwd_mma_kernel" in k for k in names) == (2 if rows and g_rows else 0), names
    # the oracles run on the GPU too (the largest shape would take seconds on the host)
    on_gpu = [x.cuda() for x in (a, b, g)]
    ref = [x.cpu() for x in run_oracle(*(x.double() for x in on_gpu), 0.5, normalize)]
    eager = [x.cpu() for x in run_oracle(*on_gpu, 0.5, normalize)]
    scale = max(1.0, ref[0].abs().max().item())
    for name, o, r, e in zip(("S", "da", "db"), out[0], ref, eager):
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        assert_close(name, o, r, e, 2e-3 * scale * max(1.0, r.abs().max().item() / scale))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("m,n,d", [(200, 72, 128), (77, 200, 20), (4224, 3976, 128), (70, 72, 130), (9, 33, 30)])
@pytest.mark.parametrize("normalize", [True, False])
def test_gpu_tf32_forward_when_torch_allows_it(precision, m, n, d, normalize, matmul_precision):
    """float32 rows take the CuTe kernels in TF32 (their names in the profile) exactly where
    torch allows TF32 matmuls and the rows fit them (D <= 128, D % 4 == 0; for each backward
    side G contiguous along a multiple of 8, N here); S and both gradients match the float64
    formula by the 2x-eager rule against eager PyTorch under the same precision."""
    matmul_precision(precision)
    torch.manual_seed(0)
    a, b, g = torch.randn(m, d), torch.randn(n, d), torch.randn(m, n)
    out = []
    names = cuda_kernels_run(lambda: out.append(run(a, b, g, "cuda", 0.5, normalize)))
    on_gpu = [x.cuda() for x in (a, b, g)]
    ref = [x.cpu() for x in run_oracle(*(x.double() for x in on_gpu), 0.5, normalize)]
    eager = [x.cpu() for x in run_oracle(*on_gpu, 0.5, normalize)]
    tf32 = precision == "high" and d <= 128 and d % 4 == 0
    assert any("similarity_fwd_mma_kernel" in k and "tfloat32" in k for k in names) == tf32, names
    backward = sum("similarity_bwd_mma_kernel" in k and "tfloat32" in k for k in names)
    assert backward == (2 if tf32 and n % 8 == 0 else 0), names
    scale = max(1.0, ref[0].abs().max().item())
    for name, o, r, e in zip(("S", "da", "db"), out[0], ref, eager):
        assert o.dtype == torch.float32 and torch.isfinite(o).all(), name
        assert_close(name, o, r, e, 2e-3 * scale * max(1.0, r.abs().max().item() / scale))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_graph_safe(backend):
    """Forward + backward with no host synchronisation, and the same from a CUDA graph."""
    a = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(777, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        s = pairwise_similarity(a, b, temperature=0.1, backend=backend)
        return (s,) + torch.autograd.grad(s.float().square().sum(), (a, b))

    assert_graph_safe(step, (a, b))


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
                                           pytest.param("cuda", torch.float32, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("single", [True, False])
def test_one_op_call_each_way(backend, dtype, single):
    """A normalised similarity on the C++ kernels is one op call each way: rows that could
    overflow are scaled inside the op, not by eager ops in front of it."""
    device = "cuda" if backend == "cuda" else "cpu"
    a = torch.randn(9, 5, device=device, dtype=dtype, requires_grad=True)
    b = None if single else torch.randn(7, 5, device=device, dtype=dtype, requires_grad=True)
    with DispatchedOps() as mode:
        s = pairwise_similarity(a, b, temperature=0.5, backend=backend)
        torch.autograd.grad(s, [a] if single else [a, b], torch.ones_like(s))
    ops = [op for op in mode.ops if op != "aten.ones_like"]  # the gradient's seed
    # With one set the op takes a twice: autograd adds its two gradients.
    tail = ["aten.add"] if single else []
    assert ops == ["anchor_kernels.similarity_fwd", "anchor_kernels.similarity_bwd"] + tail, mode.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("d", [32, 130])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_launches_each_way(monkeypatch, dtype, single, d, normalize):
    """A normalised Triton similarity is its row pass and its kernel forward, and backward
    its two sides (each with the projection's pass above D = 128), after the row pass again
    for rows that may have been scaled (not float16): no torch op does work around them.
    Without normalisation: the kernels alone, and the norms of 1 the op returns."""
    a = torch.randn(9, d, device=DEVICE, dtype=dtype, requires_grad=True)
    b = None if single else torch.randn(7, d, device=DEVICE, dtype=dtype, requires_grad=True)
    with TritonCalls(monkeypatch) as calls:
        s = pairwise_similarity(a, b, normalize=normalize, temperature=0.5, backend="triton")
        torch.autograd.grad(s, [a] if single else [a, b], torch.ones_like(s))
    side = ["_similarity_bwd_kernel"] + (["_norm_bwd_kernel"] if normalize and d > 128 else [])
    rows = ["_row_pass_kernel"] if normalize else []
    again = rows if dtype != torch.float16 else []
    assert calls.launches == rows + ["_similarity_fwd_kernel"] + again + 2 * side
    # the gradient's seed, and with one set autograd's sum of the op's two gradients
    ones = [] if normalize else ["ones", "ones"]  # the norms the forward returns
    assert calls.ops == ones + ["ones_like"] + (["add"] if single else []), calls.ops


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_plain_eager_calls_skip_the_registered_autograd(monkeypatch, backend):
    """In plain eager mode the backend's autograd.Function calls its kernels below the
    autograd keys; under a dispatch mode, as under tracing, the op and its registered
    autograd run; both give the same S and gradients, and neither differentiates twice."""
    from anchor_kernels.ops import similarity_cpp, similarity_triton

    reasons = DISPATCH.available(torch.zeros(1, 1), torch.zeros(1, 1))[backend]
    if reasons:
        pytest.skip("; ".join(reasons))
    function, op = {"cpu": (similarity_cpp.SimilarityCpp, "anchor_kernels.similarity_fwd"),
                    "triton": (similarity_triton.SimilarityTriton,
                               "anchor_kernels.similarity_fwd_triton")}[backend]
    dtype = torch.float64 if backend == "cpu" else torch.float32
    applied = []
    real = function.forward
    monkeypatch.setattr(function, "forward",
                        staticmethod(lambda ctx, *a: (applied.append(1), real(ctx, *a))[1]))
    a = torch.randn(9, 5, dtype=dtype, requires_grad=True)
    b = torch.randn(7, 5, dtype=dtype, requires_grad=True)
    s = pairwise_similarity(a, b, temperature=0.5, backend=backend)
    grads = torch.autograd.grad(s.square().sum(), (a, b))
    assert applied == [1]
    with DispatchedOps() as mode:
        s_op = pairwise_similarity(a, b, temperature=0.5, backend=backend)
        grads_op = torch.autograd.grad(s_op.square().sum(), (a, b))
    assert applied == [1] and op in mode.ops
    assert torch.equal(s, s_op) and all(torch.equal(x, y) for x, y in zip(grads, grads_op))
    (da,) = torch.autograd.grad(pairwise_similarity(a, b, backend=backend).sum(), a,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        da.sum().backward()
