"""hard_positive_mining: every backend against the reference and a brute-force oracle.

Exact index agreement is required wherever the data has no near-ties; every random case
asserts that its positives' cosines are separated by more than float32 rounding, and ties are
tested with exact duplicates (equal in any precision).
"""


import pytest
import torch

from anchor_kernels import _ext, hard_positive_mining, reference
from anchor_kernels.hard_positive import DISPATCH
from anchor_kernels.ops.hard_positive_triton import MAX_K

from .cuda_emulation import hard_positive_emulated as emu
from .cuda_emulation.similarity_emulated import build_emulator
from .utils import DispatchedOps, TritonCalls, assert_graph_safe, cuda_kernels_run, labels_for

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)  # the CUDA C++ kernel: tier 2
CPU_BACKENDS = ["triton", "cpu", "eager", CUDA]
FUSED = ["triton", "cpu", CUDA]
INF = float("inf")
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


def mine(z, y, k, *, backend, contrast=None, contrast_labels=None, **kw):
    """hard_positive_mining on the backend's device; (indices, cosines) on the CPU."""
    dev = device_for(backend)
    if contrast is not None:
        kw.update(contrast=contrast.to(dev), contrast_labels=contrast_labels.to(dev))
    idx, cos = hard_positive_mining(z.to(dev), y.to(dev), k, backend=backend, **kw)
    return idx.cpu(), cos.cpu()


def brute_force(z, y, k, c=None, yc=None, offset=0, normalize=True):
    """Python loops over float64 rows: sort (cos, j) pairs of the positives, keep k (at
    most N, the contrast rows)."""
    z = z.double()
    c = z if c is None else c.double()
    yc = y if yc is None else yc
    k = min(k, c.shape[0])
    if normalize:
        z, c = reference.normalize_rows(z), reference.normalize_rows(c)
    idx = torch.full((z.shape[0], k), -1, dtype=torch.int64)
    cos = torch.full((z.shape[0], k), INF, dtype=torch.float64)
    for i in range(z.shape[0]):
        cands = sorted((float(z[i] @ c[j]), j) for j in range(c.shape[0])
                       if int(yc[j]) == int(y[i]) and (offset is None or j != offset + i))
        for r, (value, j) in enumerate(cands[:k]):
            idx[i, r], cos[i, r] = j, value
    return idx, cos


def assert_separated(z, y, c, yc, offset, normalize=True, gap=1e-6, k=None):
    """The data has no near-ties: distinct positives of a row differ in cosine by > gap
    (ten times the float32 error of a cosine at these D); with k, only among the k + 1
    lowest of each row, which decide the selection and its order."""
    z = z.double()
    c = z if c is None else c.double()
    yc = y if yc is None else yc
    if normalize:
        z, c = reference.normalize_rows(z), reference.normalize_rows(c)
    _, pos = reference.self_and_positive_masks(y, yc, offset)
    cos = (z @ c.T).masked_fill(~pos, INF).sort(dim=1).values
    d = (cos if k is None else cos[:, :k + 1]).diff(dim=1)
    d = d[torch.isfinite(d)]
    assert d.numel() == 0 or d.min() > gap, f"test data has near-ties ({d.min().item():.2e})"


def check(z, y, k, c=None, yc=None, offset=0, backend="triton", normalize=True):
    """Indices exactly as the float64 reference; cosines within float32 rounding."""
    kw = dict(normalize=normalize)
    if c is not None:
        kw.update(contrast=c, contrast_labels=yc, anchor_offset=offset)
    idx, cos = mine(z, y, k, backend=backend, **kw)
    ref_idx, ref_cos = reference.hard_positive_mining(
        z.double(), y, k, **{**kw, **({"contrast": c.double()} if c is not None else {})})
    n = z.shape[0] if c is None else c.shape[0]
    assert idx.shape == (z.shape[0], min(k, n)) and idx.dtype == torch.int64
    assert cos.dtype == torch.promote_types(z.dtype, torch.float32)
    mismatch = idx != ref_idx
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} indices differ, first at {mismatch.nonzero()[:5].tolist()}: "
        f"got {idx[mismatch][:5].tolist()}, want {ref_idx[mismatch][:5].tolist()}")
    assert torch.equal(cos == INF, idx == -1)
    real = idx >= 0
    torch.testing.assert_close(cos[real].double(), ref_cos[real], rtol=0, atol=2e-6)
    return idx, cos


def labels(n, classes):
    return torch.randint(0, classes, (n,))


# ------------------------------------------------------------------------ reference

def test_reference_matches_brute_force_and_loss_rule():
    z = torch.randn(23, 6, dtype=torch.float64)
    y = labels(23, 4)
    c = torch.cat([torch.randn(30, 6, dtype=torch.float64), z])  # anchors are rows 30..52
    yc = torch.cat([labels(30, 4), y])
    for k in (1, 3, 50):
        for args in [dict(), dict(contrast=c, contrast_labels=yc, anchor_offset=30),
                     dict(contrast=c, contrast_labels=yc, anchor_offset=None)]:
            idx, cos = reference.hard_positive_mining(z, y, k, **args)
            want_idx, want_cos = brute_force(z, y, k, args.get("contrast"),
                                             args.get("contrast_labels"),
                                             args.get("anchor_offset", 0))
            assert torch.equal(idx, want_idx)
            torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-12)
            # Same set as the loss's top-k selection rule.
            cc = z if "contrast" not in args else c
            yy = y if "contrast" not in args else yc
            cos_all = reference.normalize_rows(z) @ reference.normalize_rows(cc).T
            _, pos = reference.self_and_positive_masks(y, yy, args.get("anchor_offset", 0))
            mask = torch.zeros_like(pos)
            rows = torch.arange(z.shape[0])[:, None].expand_as(idx)
            mask[rows[idx >= 0], idx[idx >= 0]] = True
            assert torch.equal(mask, reference.topk_hardest_mask(cos_all, pos, k))


# ------------------------------------------------------------------------ backends

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m,d,classes,k", [
    (1, 3, 1, 1),  # a lone anchor: no positive
    (2, 3, 1, 1),
    (3, 59, 1, 2),
    (97, 59, 5, 1),
    (97, 59, 5, 4),
    (97, 130, 5, 16),
    (97, 33, 5, 40),  # k larger than any class
    (130, 8, 2, 64),  # the largest register top-k
])
def test_self_contrast(backend, m, d, classes, k):
    z, y = torch.randn(m, d), labels(m, classes)
    assert_separated(z, y, None, None, 0)
    check(z, y, k, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset", [None, 20])
def test_separate_contrast(backend, offset):
    z, y = torch.randn(97, 40), labels(97, 5)
    c, yc = torch.randn(150, 40), labels(150, 5)
    if offset is not None:
        c[offset:offset + 97], yc[offset:offset + 97] = z, y
    assert_separated(z, y, c, yc, offset)
    check(z, y, 6, c, yc, offset, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_k_larger_than_contrast(backend):
    z, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.int64)
    c, yc = torch.randn(7, 4), torch.zeros(7, dtype=torch.int64)
    idx, cos = check(z, y, 9, c, yc, None, backend=backend)  # k acts as N = 7
    assert idx.shape == (5, 7) and (idx >= 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_positives(backend):
    z = torch.randn(70, 16)
    idx, cos = check(z, torch.arange(70), 3, backend=backend)
    assert (idx == -1).all() and (cos == INF).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lower_index(backend):
    # Integer-valued rows: every dot product is exact in float32, so the three copies of a
    # cosine are equal bit for bit whatever order a BLAS sums them in (the interpreter's
    # tl.dot is numpy's matmul, whose rounding can differ between columns).
    base = torch.randint(-100, 101, (40, 12)).float()
    c = torch.cat([base, base, base])  # every cosine appears three times: j, j + 40, j + 80
    yc = torch.zeros(120, dtype=torch.int64)
    z, y = torch.randint(-100, 101, (9, 12)).float(), torch.zeros(9, dtype=torch.int64)
    idx, _ = check(z, y, 7, c, yc, None, backend=backend)
    # each cosine's three copies come out together, lowest index first
    assert torch.equal(idx[:, 1] - idx[:, 0], torch.full((9,), 40))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_rows_tie_at_zero(backend):
    c = torch.randn(20, 5)
    c[[3, 7, 11]] = 0  # cosine exactly 0 with every anchor
    c[12] = -0.0
    z = torch.randn(4, 5)
    z[1] = 0  # a zero anchor: every cosine is 0, ties in index order
    same = torch.zeros(20, dtype=torch.int64)
    idx, cos = check(z, same[:4], 20, c, same, None, backend=backend)
    assert torch.equal(idx[1], torch.arange(20))
    assert torch.isfinite(cos).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unnormalized(backend):
    z, y = torch.randn(33, 7), labels(33, 3)
    assert_separated(z, y, None, None, 0, normalize=False)
    check(z, y, 5, backend=backend, normalize=False)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    """Half inputs are multiplied exactly with float32 accumulation: same selection as the
    float64 reference on the same (rounded) inputs when the data has no near-ties."""
    z, y = torch.randn(97, 59).to(dtype), labels(97, 4)
    c, yc = torch.randn(80, 59).to(dtype), labels(80, 4)
    assert_separated(z, y, c, yc, None)
    check(z, y, 5, c, yc, None, backend=backend)


def test_cpu_kernel_across_tiles():
    """The C++ CPU kernel over 2 row blocks x 3 column tiles (128 x 512), with the anchors
    inside the contrast set. float64 is ranked in float64 (errors ~1e-16); float32 on small
    integers without normalisation, where every dot product is exact (ties included)."""
    z, y = torch.randn(200, 16, dtype=torch.float64), labels(200, 6)
    c, yc = torch.randn(1100, 16, dtype=torch.float64), labels(1100, 6)
    c[700:900], yc[700:900] = z, y
    assert_separated(z, y, c, yc, 700, gap=1e-12, k=7)
    _, cos = check(z, y, 7, c, yc, 700, backend="cpu")
    assert cos.dtype == torch.float64
    zi, ci = torch.randint(-2, 3, (200, 16)).float(), torch.randint(-2, 3, (1100, 16)).float()
    ci[700:900] = zi
    check(zi, y, 7, ci, yc, 700, backend="cpu", normalize=False)


@pytest.mark.parametrize("backend", FUSED)
def test_strided_inputs(backend):
    z = torch.randn(59, 40).T
    c = torch.randn(100, 59)[::2]
    y, yc = labels(40, 3), labels(100, 3)[::2]
    assert not z.is_contiguous() and not c.is_contiguous() and not yc.is_contiguous()
    assert_separated(z, y, c, yc, None)
    check(z, y, 4, c, yc, None, backend=backend)


# ------------------------------------------------------------------------ gradients

def _loss(idx, cos, w):
    return torch.where(idx >= 0, cos * w, torch.zeros_like(cos)).sum()


@pytest.mark.parametrize("separate", [False, True])
def test_triton_gradients_match_reference(separate):
    z = torch.randn(41, 70, dtype=torch.float64, requires_grad=True)
    y = labels(41, 3)
    c = torch.randn(50, 70, dtype=torch.float64, requires_grad=True) if separate else None
    yc = labels(50, 3) if separate else None
    kw = dict(contrast=c, contrast_labels=yc, anchor_offset=None) if separate else {}
    ref_idx, ref_cos = reference.hard_positive_mining(z, y, 5, **kw)
    w = torch.randn(41, 5, dtype=torch.float64)
    inputs = (z, c) if separate else (z,)
    want = torch.autograd.grad(_loss(ref_idx, ref_cos, w), inputs)
    zf = z.detach().float().to(DEVICE).requires_grad_()
    cf = c.detach().float().to(DEVICE).requires_grad_() if separate else None
    if separate:
        kw.update(contrast=cf, contrast_labels=yc.to(DEVICE))
    idx, cos = hard_positive_mining(zf, y.to(DEVICE), 5, backend="triton", **kw)
    assert torch.equal(idx.cpu(), ref_idx)
    got = torch.autograd.grad(_loss(idx, cos, w.float().to(DEVICE)),
                              (zf, cf) if separate else (zf,))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(backend, normalize):
    """Through the shared sparse backward (the backend selects in float64, SelectedCosine
    differentiates), with the self column and with a separate contrast set."""
    z = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(14, 5, dtype=torch.float64, requires_grad=True)
    y, yc = labels(9, 3), labels(14, 3)

    def self_set(z):
        idx, cos = hard_positive_mining(z, y, 3, normalize=normalize, backend=backend)
        return torch.where(idx >= 0, cos, torch.zeros_like(cos))

    def contrast_set(z, c):
        idx, cos = hard_positive_mining(z, y, 3, contrast=c, contrast_labels=yc, anchor_offset=None,
                                        normalize=normalize, backend=backend)
        return torch.where(idx >= 0, cos, torch.zeros_like(cos))

    assert torch.autograd.gradcheck(self_set, (z,))
    assert torch.autograd.gradcheck(contrast_set, (z, c))


def test_padding_gets_no_gradient():
    z = torch.randn(6, 4, device=DEVICE, requires_grad=True)
    idx, cos = hard_positive_mining(z, torch.arange(6, device=DEVICE), 2, backend="triton")
    (dz,) = torch.autograd.grad(torch.where(idx >= 0, cos, 0.0).sum(), z)
    assert (dz == 0).all()


# ------------------------------------------------------------------------ ops and errors

def test_opcheck():
    z, c = torch.randn(5, 7, device=DEVICE), torch.randn(6, 7, device=DEVICE)
    y = torch.tensor([0, 1, 0, 1, 2], device=DEVICE)
    yc = torch.tensor([0, 0, 1, 1, 2, 2], device=DEVICE)
    op = torch.ops.anchor_kernels.hard_positive_triton.default
    torch.library.opcheck(op, (z, y, c, yc, 2, True, None))
    torch.library.opcheck(op, (z, y, z, y, 3, True, 0))
    z, c, y, yc = z.cpu(), c.cpu(), y.cpu(), yc.cpu()
    torch.library.opcheck(torch.ops.anchor_kernels.hard_positive, (z, y, c, yc, 2, True, None))
    torch.library.opcheck(torch.ops.anchor_kernels.hard_positive, (z, y, z, y, 9, False, 0))


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    z = torch.randn(12, 8, device=device_for(backend), requires_grad=True)
    y = labels(12, 3).to(z.device)

    def fn(z):
        idx, cos = hard_positive_mining(z, y, 2, backend=backend)
        return torch.where(idx >= 0, cos, 0.0).sum()

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(z)
    (dz,) = torch.autograd.grad(out, z)
    want = fn(z)
    (want_dz,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dz, want_dz)


def test_triton_k_limit_and_auto():
    z, y = torch.randn(100, 4, device=DEVICE), torch.zeros(100, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=f"limit of {MAX_K}"):
        hard_positive_mining(z, y, MAX_K + 1, backend="triton")
    idx, _ = hard_positive_mining(z[:50], y[:50], 1000, backend="triton")  # k capped by N
    assert idx.shape == (50, 50) and (idx[:, 49:] == -1).all()
    idx, _ = hard_positive_mining(z, y, MAX_K + 1)  # auto: a backend that can run it
    assert (idx[:, :99] >= 0).all() and idx.device == z.device


@pytest.mark.parametrize("call,err,match", [
    (lambda z, y: hard_positive_mining(z, y, 0), ValueError, "k must be >= 1"),
    (lambda z, y: hard_positive_mining(z, y, 2.0), TypeError, "k must be an int"),
    (lambda z, y: hard_positive_mining(z, y, True), TypeError, "k must be an int"),
    (lambda z, y: hard_positive_mining(z, y[:3], 1), ValueError, r"labels must have shape \(4,\)"),
    (lambda z, y: hard_positive_mining(z, y.float(), 1), TypeError, "labels must hold integer"),
    (lambda z, y: hard_positive_mining(z[0], y, 1), ValueError, "z must be 2-D"),
    (lambda z, y: hard_positive_mining(z, y, 1, contrast=z), ValueError, "contrast_labels is required"),
    (lambda z, y: hard_positive_mining(z, y, 1, contrast_labels=y), ValueError, "without contrast"),
    (lambda z, y: hard_positive_mining(z, y, 1, anchor_offset=None), ValueError, "anchor_offset must be 0"),
    (lambda z, y: hard_positive_mining(z, y, 1, contrast=z[:, :2], contrast_labels=y),
     ValueError, r"contrast must be \(N, 3\)"),
    (lambda z, y: hard_positive_mining(z, y, 1, contrast=z.double(), contrast_labels=y),
     TypeError, "contrast has dtype"),
    (lambda z, y: hard_positive_mining(z, y, 1, contrast=z, contrast_labels=y[:2]),
     ValueError, r"contrast_labels must have shape \(4,\)"),
    (lambda z, y: hard_positive_mining(z, y, 1, contrast=z, contrast_labels=y, anchor_offset=1),
     ValueError, "past the end"),
    (lambda z, y: hard_positive_mining(z, y, 1, backend="gpu"), ValueError, "backend must be one of"),
    (lambda z, y: hard_positive_mining(z.double(), y, 1, backend="triton"), ValueError, "float64"),
    # the C++ op checks its arguments too, for direct calls
    (lambda z, y: torch.ops.anchor_kernels.hard_positive(z, y, z, y, 0, True, None), RuntimeError,
     "k must be >= 1"),
    (lambda z, y: torch.ops.anchor_kernels.hard_positive(z, y[:3], z, y, 1, True, None),
     RuntimeError, r"labels must have shape \(4,\)"),
    (lambda z, y: torch.ops.anchor_kernels.hard_positive(z, y, z[:, :2], y, 1, True, None),
     RuntimeError, r"c must have shape \(N, 3\)"),
    (lambda z, y: torch.ops.anchor_kernels.hard_positive(z, y, z, y, 1, True, 1), RuntimeError,
     "anchor_offset=1 puts the 4 anchors outside"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
                                           pytest.param("cuda", torch.float32, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("single", [True, False])
def test_one_op_call(backend, dtype, single):
    """A normalised selection on the C++ kernels is one op call: rows that could overflow are
    scaled inside the op, not by eager ops in front of it."""
    device = "cuda" if backend == "cuda" else "cpu"
    z, y = torch.randn(9, 5, device=device, dtype=dtype), labels(9, 3).to(device)
    c, yc = (None, None) if single else (torch.randn(7, 5, device=device, dtype=dtype),
                                         labels(7, 3).to(device))
    with DispatchedOps() as mode:
        hard_positive_mining(z, y, 2, contrast=c, contrast_labels=yc,
                             anchor_offset=0 if single else None, backend=backend)
    assert mode.ops == ["anchor_kernels.hard_positive"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("single", [True, False])
def test_triton_launches(monkeypatch, dtype, single):
    """A normalised Triton selection is two launches, its row pass and its kernel: no torch
    op does work around them."""
    z, y = torch.randn(9, 5, device=DEVICE, dtype=dtype), labels(9, 3).to(DEVICE)
    c, yc = (None, None) if single else (torch.randn(7, 5, device=DEVICE, dtype=dtype),
                                         labels(7, 3).to(DEVICE))
    with TritonCalls(monkeypatch) as calls:
        hard_positive_mining(z, y, 2, contrast=c, contrast_labels=yc,
                             anchor_offset=0 if single else None, backend="triton")
    assert calls.launches == ["_row_pass_kernel", "_hard_positive_kernel"]
    assert calls.ops == [], calls.ops


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    try:
        path = build_emulator("hard_positive_emulator.cpp", str(tmp_path_factory.mktemp("emu")))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return emu.Emulator(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,d,k,classes,offset", [
    (70, 130, 6, 5, 3, None),  # separate contrast set, several tiles
    (70, 70, 20, 16, 3, 0),  # self set
    (10, 10, 4, 40, 2, 0),  # k above every class and above N
    (66, 66, 5, 1, 66, 0),  # no positives at all: every tile skipped
    (1, 1, 3, 1, 1, 0),  # a lone anchor
])
def test_cuda_kernel_emulated(emulator, dtype, m, n, d, k, classes, offset):
    """The CUDA kernel's device code on the host (FMA path), both thread orders (bitwise
    equal), against the float64 reference; plus exact ties from duplicated rows."""
    z, y = torch.randn(m, d).to(dtype), labels(m, classes)
    c, yc = (z, y) if offset == 0 else (torch.randn(n, d).to(dtype), labels(n, classes))
    assert_separated(z, y, c, yc, offset)
    outs = [emulator.select(z, y, c, yc, k, True, offset, order) for order in (0, 1)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    idx, cos = outs[0]
    ref_idx, ref_cos = reference.hard_positive_mining(z.double(), y, k, contrast=c.double(),
                                                      contrast_labels=yc, anchor_offset=offset)
    kk = ref_idx.shape[1]  # the op pads k past N; the public function (and reference) stop at N
    assert (idx[:, kk:] == -1).all() and (cos[:, kk:] == INF).all()
    idx, cos = idx[:, :kk], cos[:, :kk]
    assert torch.equal(idx, ref_idx)
    real = idx >= 0
    assert torch.equal(cos == INF, ~real)
    torch.testing.assert_close(cos[real].double(), ref_cos[real], rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_emulated_scales_huge_rows_in_the_op(emulator, dtype):
    """Rows whose sum of squares overflows fp32 reach the glue raw; the selection runs on
    their overflow-safe copy: the reference's indices and cosines, one set and two."""
    z, y = (torch.randn(40, 7) * 1e36).to(dtype), labels(40, 3)
    c, yc = (torch.randn(30, 7) * 1e36).to(dtype), labels(30, 3)
    for cc, ycc, offset in ((z, y, 0), (c, yc, None)):
        assert_separated(z, y, cc, ycc, offset)
        idx, cos = emulator.select(z, y, cc, ycc, 4, True, offset)
        ref_idx, ref_cos = reference.hard_positive_mining(
            z.double(), y, 4, contrast=cc.double(), contrast_labels=ycc, anchor_offset=offset)
        assert torch.equal(idx, ref_idx)
        real = idx >= 0
        torch.testing.assert_close(cos[real].double(), ref_cos[real], rtol=0, atol=2e-6)


@pytest.mark.parametrize("offset", [0, None])
def test_cuda_kernel_emulated_labels_of_any_int64_range(emulator, offset):
    """Labels past int32, some equal in their low 32 bits, and at the edges of the kernels'
    32-bit label keys: the reference's selection, anchors spread over three CTAs."""
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(150, 9, generator=g), labels_for("wide", 150, g)
    c, yc = (z, y) if offset == 0 else (torch.randn(140, 9, generator=g), labels_for("wide", 140, g))
    assert_separated(z, y, c, yc, offset)
    idx, cos = emulator.select(z, y, c, yc, 6, True, offset)
    ref_idx, ref_cos = reference.hard_positive_mining(z.double(), y, 6, contrast=c.double(),
                                                      contrast_labels=yc, anchor_offset=offset)
    assert torch.equal(idx, ref_idx)
    real = idx >= 0
    torch.testing.assert_close(cos[real].double(), ref_cos[real], rtol=0, atol=2e-6)


def test_cuda_kernel_emulated_ties(emulator):
    base = torch.randn(40, 12)
    c, yc = torch.cat([base, base, base]), torch.zeros(120, dtype=torch.int64)
    c[5] = 0  # a zero row: cosine exactly 0 with every anchor
    z, y = torch.randn(9, 12), torch.zeros(9, dtype=torch.int64)
    idx, _ = emulator.select(z, y, c, yc, 20, True, None)
    ref_idx, _ = reference.hard_positive_mining(z.double(), y, 20, contrast=c.double(),
                                                contrast_labels=yc, anchor_offset=None)
    assert torch.equal(idx, ref_idx)


# ------------------------------------------------------------------------------- tier 2

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_gpu_exact_integer_embeddings(backend, n, k):
    """Integer embeddings, no normalisation: every dot product is exact in float32 (and
    bf16 holds the inputs exactly), so the selection, ties included, must equal the
    reference's index for index."""
    torch.manual_seed(0)
    z = torch.randint(-1, 2, (n, 128), device="cuda").to(torch.bfloat16)
    y = torch.randint(0, 10, (n,), device="cuda")
    idx, cos = hard_positive_mining(z, y, k, normalize=False, backend=backend)
    for r0 in range(0, n, 4096):
        r1 = min(n, r0 + 4096)
        ref_idx, ref_cos = reference.hard_positive_mining(
            z[r0:r1].float(), y[r0:r1], k, contrast=z.float(), contrast_labels=y,
            anchor_offset=r0, normalize=False)
        assert torch.equal(idx[r0:r1], ref_idx)
        assert torch.equal(cos[r0:r1], ref_cos)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [4096, 16384, 65536])
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large(backend, n, k, dtype):
    """At this size random data has near-ties, so the check is by value: the kernel's picks
    are distinct positives, their reported cosines are right, and the sorted cosines equal the
    reference's k lowest; indices must agree except inside near-ties."""
    torch.manual_seed(0)
    z = torch.randn(n, 128, device="cuda").to(dtype)
    y = torch.randint(0, 10, (n,), device="cuda")
    idx, cos = hard_positive_mining(z, y, k, backend=backend)
    torch.cuda.synchronize()
    zn = reference.normalize_rows(z.double())
    rows = torch.arange(n, device="cuda")[:, None].expand_as(idx)
    assert (idx >= 0).all()  # ~n/10 positives per anchor
    assert (y[idx] == y[:, None]).all() and (idx != rows).all()
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct
    true_cos = (zn[rows] * zn[idx]).sum(-1)
    torch.testing.assert_close(cos.double(), true_cos, rtol=0, atol=2e-6)
    assert (cos.diff(dim=1) >= 0).all()
    mismatched = 0
    for r0 in range(0, n, 4096):
        r1 = min(n, r0 + 4096)
        ref_idx, ref_cos = reference.hard_positive_mining(
            zn[r0:r1], y[r0:r1], k, contrast=zn, contrast_labels=y, anchor_offset=r0,
            normalize=False)
        torch.testing.assert_close(cos[r0:r1].double(), ref_cos, rtol=0, atol=2e-6)
        mismatched += int((idx[r0:r1] != ref_idx).sum())
    assert mismatched <= 1e-3 * idx.numel(), mismatched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,d,classes,offset", [(200, 200, 128, 10, "self"), (77, 300, 64, 3, 50),
                                                  (130, 70, 8, 1000, None), (64, 64, 24, 2, "self"),
                                                  (70, 70, 130, 10, "self"), (150, 140, 64, "wide", None),
                                                  (150, 150, 32, "wide", "self")])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("choice", ["auto", "general"])
def test_gpu_tensor_core_kernel(dtype, m, n, d, classes, offset, k, choice, monkeypatch):
    """The CuTe kernel (its name in the profile) runs where the rule says (bf16 / fp16, D <= 128
    with D % 8 == 0) and not with ANCHOR_KERNELS_CUDA_KERNELS=general. Integer rows make every
    product exact, so the selection equals the reference's, ties included: anchors off the
    64-row tiles, contrast rows off the 64-column ones, so many labels that most tiles are
    skipped, the self pair in one set and at an offset into the contrast rows, and labels past
    int32 (both kernels compare 32-bit label keys)."""
    monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", choice)
    torch.manual_seed(0)
    z = torch.randint(-2, 3, (m, d)).to(dtype)
    draw = (lambda k: labels_for("wide", k)) if classes == "wide" else (lambda k: labels(k, classes))
    y = draw(m)
    c = yc = None
    if offset != "self":
        c, yc = torch.randint(-2, 3, (n, d)).to(dtype), draw(n)
        if offset is not None:
            c[offset:offset + m], yc[offset:offset + m] = z, y
    names = cuda_kernels_run(lambda: check(z, y, k, c, yc, 0 if offset == "self" else offset,
                                           backend="cuda", normalize=False))
    tensor_cores = d <= 128 and d % 8 == 0 and choice == "auto"
    assert any("hard_positive_mma_kernel" in name for name in names) == tensor_cores, names


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("m,n,d,offset", [(200, 200, 128, "self"), (77, 300, 20, 50), (70, 70, 130, "self"),
                                          (64, 64, 30, None)])
def test_gpu_tf32_kernel_when_torch_allows_it(precision, m, n, d, offset, matmul_precision):
    """float32 rows take the CuTe kernel in TF32 (its name in the profile) exactly where torch
    allows TF32 matmuls and the rows fit it (D <= 128, D % 4 == 0). Small integers are exact in
    TF32, so the selection equals the reference's, ties included."""
    matmul_precision(precision)
    torch.manual_seed(0)
    z, y = torch.randint(-2, 3, (m, d)).float(), labels(m, 10)
    c = yc = None
    if offset != "self":
        c, yc = torch.randint(-2, 3, (n, d)).float(), labels(n, 10)
        if offset is not None:
            c[offset:offset + m], yc[offset:offset + m] = z, y
    names = cuda_kernels_run(lambda: check(z, y, 3, c, yc, 0 if offset == "self" else offset,
                                           backend="cuda", normalize=False))
    tf32 = precision == "high" and d <= 128 and d % 4 == 0
    assert any("hard_positive_mma_kernel" in k and "tfloat32" in k for k in names) == tf32, names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_graph_safe(backend):
    """The selection with no host synchronisation, and the same from a CUDA graph."""
    z = torch.randn(3000, 128, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 10, (3000,), device="cuda")
    assert_graph_safe(lambda: hard_positive_mining(z, y, 4, backend=backend), (z, y))
