"""The row pass of the Triton similarity and selection (``anchor_kernels.ops.rows_triton``)
against ``reference.overflow_safe_scale`` / ``prescale_rows`` and torch's norms: rows that
could overflow, rows below eps, zero, inf and NaN rows, D past one block, strided inputs, one
set and two. Tier 1 under the Triton interpreter, tier 2 compiled on CUDA tensors."""

import pytest
import torch
import triton
import triton.language as tl

from anchor_kernels import reference
from anchor_kernels.ops import rows_triton
from anchor_kernels.ops.triton_launch import interpreter_upcast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows(dtype, n=11, d=130, seed=0):
    """Normal rows, and rows at the edges: huge (scaled, up to past the 2^126 cap), tiny,
    zero, inf, NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[1] *= 1e36
    x[2] *= 1e-30
    x[3] = 0
    x[4, 0] = float("inf")
    x[5, 1] = float("nan")
    if dtype != torch.float16:
        x[6] = x[6] / x[6].abs().max() * 3e38  # amax 2^127.8: the exponent is capped at 126
        x[7] *= 2e20
    return x.to(dtype)


def expected(x):
    """(x', p, norms) as the row pass must give them: the reference's factor, except that
    it is capped at 2^-126 (a normal float) where the reference's would be 2^-127 or 2^-128."""
    if not rows_triton.scales(x.dtype):
        return x, None, torch.linalg.vector_norm(x.float(), dim=1).clamp_min(rows_triton.NORM_EPS)
    p = reference.overflow_safe_scale(x).float().squeeze(1).clamp_min(2.0 ** -126)
    xs = (x.float() * p[:, None]).to(x.dtype)
    return xs, p, torch.linalg.vector_norm(xs.float(), dim=1).clamp_min(rows_triton.NORM_EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("single", [True, False])
def test_row_pass_matches_the_reference(dtype, inverse, single):
    a = rows(dtype).to(DEVICE)
    b = None if single else rows(dtype, n=9, seed=1).flip(0).to(DEVICE)
    launch, ra, rb = rows_triton.row_pass(a, b, inverse)
    launch()
    assert (rb is ra) == single
    if dtype == torch.float32:  # the cap is reached (the reference scales by 2^-128 there)
        assert reference.overflow_safe_scale(a)[6].item() == 2.0 ** -128
    for x, r in [(a, ra)] + ([] if single else [(b, rb)]):
        xs, p, n = expected(x.cpu())
        if p is None:
            assert r.scaled is x and r.factor is None
        else:
            assert r.scaled.is_contiguous()
            assert torch.equal(r.factor.cpu(), p)
            # Exact: the copy is x times a power of two (NaN where x has NaN)
            torch.testing.assert_close(r.scaled.cpu(), xs, rtol=0, atol=0, equal_nan=True)
            # Where no cap applies it is the reference's own copy
            safe = p > 2.0 ** -126
            torch.testing.assert_close(r.scaled.cpu()[safe], reference.prescale_rows(x.cpu())[safe],
                                       rtol=0, atol=0, equal_nan=True)
        want = 1 / n if inverse else n
        torch.testing.assert_close(r.norms.cpu(), want, rtol=2e-6, atol=0, equal_nan=True)
        assert torch.isfinite(r.norms.cpu()[~x.cpu().isnan().any(1) & ~x.cpu().isinf().any(1)]).all()


def test_strided_rows_and_d_below_one_block():
    base = torch.randn(9, 40, dtype=torch.bfloat16, device=DEVICE) * 1e30
    a = base[:, ::2]  # (9, 20), column stride 2
    b = base.t()[:7, :9].t()  # (9, 7) read across rows: row stride 1
    for x, other in [(a, None), (b, a[:, :7])]:
        launch, r, _ = rows_triton.row_pass(x, other, inverse=False)
        launch()
        xs, p, n = expected(x.cpu())
        assert torch.equal(r.scaled.cpu(), xs) and torch.equal(r.factor.cpu(), p)
        torch.testing.assert_close(r.norms.cpu(), n, rtol=2e-6, atol=0)


def test_no_rows_launch_nothing():
    launch, ra, rb = rows_triton.row_pass(torch.empty(0, 5, device=DEVICE), None, inverse=False)
    assert launch.grid == (0,)
    launch()


@triton.jit
def _cast_kernel(X, Y, N, UPCAST: tl.constexpr):
    offs = tl.arange(0, 1024)
    v = tl.load(X + offs, mask=offs < N)
    tl.store(Y + offs, rows_triton.cast(v, tl.bfloat16, UPCAST), mask=offs < N)


def test_cast_to_bfloat16_rounds_subnormals_like_torch():
    """The interpreter's own float32 -> bfloat16 conversion garbles float32 subnormals, which
    a gradient taken back to a huge row can be; ``cast`` builds those from their bits. Below
    2^-126 the result is torch's round-to-nearest; above it, a conversion of the same ulp."""
    k = torch.arange(1, 400, dtype=torch.float32)
    tiny = torch.cat([k * 2.0 ** -149 * 37, -k * 2.0 ** -140, torch.tensor([2.0 ** -126, -2.0 ** -127])])
    x = torch.cat([tiny, torch.randn(100) * 1e-37]).to(DEVICE)
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), UPCAST=interpreter_upcast(torch.bfloat16))
    want = x.cpu().to(torch.bfloat16).float()
    got = y.cpu().float()
    sub = x.cpu().abs() < 2.0 ** -126
    assert torch.equal(got[sub], want[sub])
    ulp = 2.0 ** -133 * torch.ones(()).expand_as(got)  # bfloat16's ulp just above 2^-126
    assert ((got - want).abs()[~sub] <= torch.maximum(ulp, want.abs() * 2 ** -7)[~sub]).all()
