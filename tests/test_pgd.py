"""The fused PGD step and random start against the eager reference, bit for bit."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels import pgd as P
from anchor_kernels import reference as R

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Awkward shapes: a batch of one, 1-D samples, a row crossing a kernel block, odd sizes.
SHAPES = ((5, 3, 7, 9), (1, 1), (7,), (2, 4099), (3, 1, 2, 2))


def cpu_backends():
    """Backends that can run on CPU tensors here, each with a skip reason when it cannot."""
    out = []
    for name in ("eager", "triton", "cpu"):
        reasons = P.available_backends(torch.zeros(1))[name]
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        out.append(pytest.param(name, marks=marks))
    return out


def assert_equal_bits(actual, expected, what=""):
    """Exact equality (NaN == NaN); the failure says how many elements differ and where."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    if not bool(same.all()):
        bad = torch.nonzero(~same)
        idx = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {int((~same).sum())}/{same.numel()} elements differ; first at "
            f"{bad[:5].tolist()}: {actual[idx].item()} != {expected[idx].item()}, max err "
            f"{(actual.double() - expected.double()).abs().nan_to_num(0).max().item():.3e}")


def step_inputs(shape, dtype, generator, per_sample=False):
    """x in [0, 1] with some pixels exactly at the bounds, x_adv inside or on the ball's
    edge or on [0, 1]'s edge, grad with exact zeros."""
    g = generator
    x = torch.rand(shape, generator=g)
    x.view(-1)[::5] = 0.0
    x.view(-1)[1::7] = 1.0
    b = shape[0]
    if per_sample:
        eps = torch.rand(b, generator=g) * 0.1
        eps[0] = 0.0
        alpha = torch.rand(b, generator=g) * 0.05 + 1e-3
        e = eps.reshape(-1, *([1] * (len(shape) - 1)))
    else:
        eps, alpha, e = 8 / 255, 2 / 255, 8 / 255
    delta = (torch.rand(shape, generator=g) * 2 - 1) * e
    delta.view(-1)[::3] = (torch.sign(delta) * e).reshape(-1)[::3]  # on the ball's edge
    x_adv = (x + delta).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad.view(-1)[::4] = 0.0
    return x_adv.to(dtype), grad.to(dtype), x.to(dtype), eps, alpha


# ---------------------------------------------------------------------------------------
# the reference against the plain formula


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_reference_is_the_formula(shape):
    gen = torch.Generator().manual_seed(1)
    x_adv, grad, x, eps, alpha = step_inputs(shape, torch.float32, gen)
    plain = torch.clamp(torch.min(torch.max(x_adv + alpha * torch.sign(grad), x - eps), x + eps), 0, 1)
    assert_equal_bits(R.pgd_step(x_adv, grad, x, eps, alpha), plain)


def test_reference_per_sample_is_a_loop_over_samples():
    gen = torch.Generator().manual_seed(2)
    x_adv, grad, x, eps, alpha = step_inputs((4, 3, 5), torch.float32, gen, per_sample=True)
    out = R.pgd_step(x_adv, grad, x, eps, alpha)
    for b in range(4):
        one = R.pgd_step(x_adv[b], grad[b], x[b], eps[b].item(), alpha[b].item())
        assert_equal_bits(out[b], one, f"sample {b}")


def test_reference_half_rounds_once():
    """Half inputs: computed in float32, one rounding at the end."""
    gen = torch.Generator().manual_seed(3)
    x_adv, grad, x, eps, alpha = step_inputs((64, 33), torch.bfloat16, gen)
    f32 = R.pgd_step(x_adv.float(), grad.float(), x.float(), eps, alpha)
    assert_equal_bits(R.pgd_step(x_adv, grad, x, eps, alpha), f32.to(torch.bfloat16))


def test_philox_known_answer():
    """Random123's published Philox4x32-10 known-answer vectors (kat_vectors)."""
    def run(ctr, key):
        c = [torch.tensor([w], dtype=torch.int64) for w in ctr]
        return [int(w) for w in R.philox_4x32_10(*c, *key)]
    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


# ---------------------------------------------------------------------------------------
# every backend against the reference


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_step_bitwise(backend, dtype, shape, per_sample):
    gen = torch.Generator().manual_seed(hash((shape, per_sample)) % 1000)
    x_adv, grad, x, eps, alpha = step_inputs(shape, dtype, gen, per_sample)
    expected = R.pgd_step(x_adv, grad, x, eps, alpha)
    ptr = x_adv.data_ptr()
    out = ak.pgd_step(x_adv, grad, x, eps, alpha, backend=backend)
    assert out is x_adv and x_adv.data_ptr() == ptr, "pgd_step must work in place"
    assert_equal_bits(x_adv, expected, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_step_float64(backend):
    if backend == "triton":
        with pytest.raises(ValueError, match="float64"):
            ak.pgd_step(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
                        torch.zeros(2, 3, dtype=torch.float64), 0.1, 0.1, backend=backend)
        return
    gen = torch.Generator().manual_seed(4)
    x_adv, grad, x, eps, alpha = step_inputs((3, 50), torch.float64, gen, per_sample=True)
    expected = R.pgd_step(x_adv, grad, x, eps, alpha)
    assert_equal_bits(ak.pgd_step(x_adv, grad, x, eps, alpha, backend=backend), expected)


@pytest.mark.parametrize("backend", cpu_backends())
def test_step_edge_values(backend):
    """grad 0, -0 and NaN (no move), x at both bounds, x_adv on the ball's edge, eps 0,
    lo/hi other than [0, 1], NaN in x_adv propagates."""
    x = torch.tensor([[0.0, 1.0, 0.5, 0.5, -1.0, 2.0, 0.5, 0.25]])
    x_adv = torch.tensor([[0.0, 1.0, 0.6, 0.4, -1.0, 2.0, float("nan"), 0.25]])
    grad = torch.tensor([[-1.0, 1.0, 0.0, -0.0, float("nan"), 3.0, 1.0, 1e-30]])
    for eps, alpha, lo, hi in ((0.1, 0.05, 0.0, 1.0), (0.0, 0.5, 0.0, 1.0), (1.0, 0.3, -1.0, 2.0)):
        expected = R.pgd_step(x_adv, grad, x, eps, alpha, lo, hi)
        out = ak.pgd_step(x_adv.clone(), grad, x, eps, alpha, lo, hi, backend=backend)
        assert_equal_bits(out, expected, f"eps={eps} lo={lo}")
    out = ak.pgd_step(x_adv.clone(), grad, x, 0.1, 0.05, backend=backend)
    assert out[0, 2] == 0.6 and out[0, 3] == 0.4 and math.isnan(out[0, 6])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "strided"])
def test_step_layouts(backend, layout):
    """channels_last runs in place on its own layout; a strided x_adv and grads of another
    layout give the same numbers."""
    gen = torch.Generator().manual_seed(5)
    x_adv, grad, x, eps, alpha = step_inputs((4, 3, 5, 6), torch.float32, gen, per_sample=True)
    expected = R.pgd_step(x_adv, grad, x, eps, alpha)
    if layout == "channels_last":
        x_adv, grad, x = (t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x))
        target = x_adv
    elif layout == "mixed":
        x_adv = x_adv.contiguous(memory_format=torch.channels_last)
        target = x_adv
    else:
        big = torch.zeros(4, 3, 5, 12)
        big[..., ::2] = x_adv
        target = big[..., ::2]
    ak.pgd_step(target, grad, x, eps, alpha, backend=backend)
    assert_equal_bits(target.contiguous(), expected, layout)
    if layout == "strided":
        assert bool((big[..., 1::2] == 0).all()), "the strided step wrote outside its view"


@pytest.mark.parametrize("backend", cpu_backends())
def test_step_empty(backend):
    z = torch.zeros(0, 3, 4)
    assert ak.pgd_step(z, z.clone(), z.clone(), 0.1, 0.1, backend=backend).shape == (0, 3, 4)


# ---------------------------------------------------------------------------------------
# random start


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("per_sample", [False, True])
def test_random_start_bitwise(backend, dtype, per_sample):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels do not take float64")
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(3, 3, 11, 13, generator=gen)
    x.view(-1)[::5] = 0.0
    x.view(-1)[1::5] = 1.0
    x = x.to(dtype)
    eps = torch.tensor([0.0, 0.05, 0.3]) if per_sample else 8 / 255
    seed = 0x0123456789ABCDEF
    out = ak.pgd_random_start(x, eps, seed=seed, backend=backend)
    assert_equal_bits(out, R.pgd_random_start(x, eps, seed), f"{backend} {dtype}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape,layout", [((3, 3, 11, 13), torch.channels_last),
                                          ((2, 3, 4, 5, 6), torch.channels_last_3d)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_random_start_channels_last_in_place(backend, shape, layout, per_sample):
    """channels_last inputs: the same bits as the row-major reference, the output in the
    input's layout (the Triton kernel maps memory offsets to logical indices: no copy)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(*shape, generator=gen).contiguous(memory_format=layout)
    eps = torch.linspace(0.0, 0.3, shape[0]) if per_sample else 8 / 255
    out = ak.pgd_random_start(x, eps, seed=0xFEDCBA9876543210 >> 1, backend=backend)
    assert out.is_contiguous(memory_format=layout)
    assert_equal_bits(out, R.pgd_random_start(x.contiguous(), eps, 0xFEDCBA9876543210 >> 1),
                      f"{backend} {layout}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_random_start_in_ball_and_uniform(backend):
    x = torch.full((64, 3, 16, 16), 0.5)
    eps = 0.25
    out = ak.pgd_random_start(x, eps, generator=torch.Generator().manual_seed(7), backend=backend)
    noise = (out - x).flatten()
    assert noise.abs().max() <= eps
    # uniform on [-eps, eps): mean 0, variance eps^2 / 3, every tenth of the range used
    n = noise.numel()
    assert abs(noise.mean().item()) < 4 * eps / math.sqrt(3 * n)
    assert abs(noise.var().item() / (eps ** 2 / 3) - 1) < 0.02
    counts = torch.histc(noise, bins=10, min=-eps, max=eps)
    assert (counts - n / 10).abs().max() < 5 * math.sqrt(n / 10)


def test_random_start_generator_and_layout():
    x = torch.rand(4, 3, 8, 8)
    a = ak.pgd_random_start(x, 0.1, generator=torch.Generator().manual_seed(1))
    b = ak.pgd_random_start(x, 0.1, generator=torch.Generator().manual_seed(1))
    c = ak.pgd_random_start(x, 0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = ak.pgd_random_start(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(d, ak.pgd_random_start(x, 0.1))
    # the noise follows the logical index, whatever the memory layout
    cl = x.contiguous(memory_format=torch.channels_last)
    e = ak.pgd_random_start(cl, 0.1, seed=11)
    assert e.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(e, ak.pgd_random_start(x, 0.1, seed=11))
    out = torch.empty_like(x)
    assert ak.pgd_random_start(x, 0.1, seed=11, out=out) is out and torch.equal(out, e)


def test_random_start_counter_past_2_32():
    """Element i uses counter (i mod 2^32, i div 2^32): the high word changes the numbers."""
    i = torch.tensor([5, 5 + 2 ** 32], dtype=torch.int64)
    z = torch.zeros_like(i)
    r, *_ = R.philox_4x32_10(i & 0xFFFFFFFF, i >> 32, z, z, 1, 2)
    assert r[0] != r[1]


# ---------------------------------------------------------------------------------------
# L2 (eager backend)


def test_l2_step_matches_torchattacks_formula():
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grad[0] = 0.0
    eps, alpha = 0.5, 0.2
    # torchattacks' PGDL2 step, written out
    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    delta = x_adv + alpha * grad / gn - x
    dn = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    factor = torch.minimum(eps / dn, torch.ones_like(dn))
    expected = (x + delta * factor).clamp(0, 1)
    out = ak.pgd_step(x_adv.clone(), grad, x, eps, alpha, norm="l2")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert ((out - x).flatten(1).norm(dim=1) <= eps + 1e-12).all()


@pytest.mark.parametrize("backend", cpu_backends()[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (3, 2500), (4, 1)])
def test_l2_step_backends(backend, dtype, shape):
    """The Triton L2 step against the reference: equal up to the order of the norms' sums
    (float32), or one rounding of the stored value (bfloat16)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(shape, generator=gen)
    x_adv = (x + 0.2 * torch.randn(shape, generator=gen)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    grad[0] = 0.0
    eps = torch.rand(shape[0], generator=gen) + 0.05
    eps[1] = 0.0
    x_adv, grad, x = x_adv.to(dtype), grad.to(dtype), x.to(dtype)
    expected = R.pgd_step(x_adv.double(), grad.double(), x.double(), eps.double(), 0.3, norm="l2")
    out = ak.pgd_step(x_adv.clone(), grad, x, eps, 0.3, norm="l2", backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)
    assert ((out.double() - x.double()).flatten(1).norm(dim=1) <= eps + 10 * tol).all()


def test_l2_random_start_in_ball():
    x = torch.rand(32, 3, 8, 8)
    eps = torch.linspace(0, 2, 32)
    out = ak.pgd_random_start(x, eps, seed=3, norm="l2")
    assert ((out - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-6)).all()
    assert (out >= 0).all() and (out <= 1).all()
    with pytest.raises(ValueError, match="L2 random start is implemented only in the eager"):
        ak.pgd_random_start(x, 0.1, norm="l2", backend="triton")


# ---------------------------------------------------------------------------------------
# errors


def test_bad_input():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        ak.pgd_step(x.clone(), x, x, -0.1, 0.1)
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        ak.pgd_step(x.clone(), x, x, 0.1, 0.0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        ak.pgd_step(x.clone(), x, x, 0.1, float("inf"))
    with pytest.raises(TypeError, match="eps must be a real number"):
        ak.pgd_step(x.clone(), x, x, "0.1", 0.1)
    with pytest.raises(ValueError, match="grad has shape"):
        ak.pgd_step(x.clone(), torch.rand(2, 4), x, 0.1, 0.1)
    with pytest.raises(ValueError, match="x_adv has shape"):
        ak.pgd_step(torch.rand(3, 3), x, x, 0.1, 0.1)
    with pytest.raises(TypeError, match="grad has dtype torch.float64 but x has torch.float32"):
        ak.pgd_step(x.clone(), x.double(), x, 0.1, 0.1)
    with pytest.raises(ValueError, match="grad is on meta but x is on cpu"):
        ak.pgd_step(x.clone(), torch.empty(2, 3, device="meta"), x, 0.1, 0.1)
    with pytest.raises(TypeError, match="x must be float16"):
        ak.pgd_step(x.long(), x.long(), x.long(), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"eps as a tensor must have shape \(2,\)"):
        ak.pgd_step(x.clone(), x, x, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="lo must be < hi"):
        ak.pgd_step(x.clone(), x, x, 0.1, 0.1, 1.0, 0.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        ak.pgd_step(x.clone(), x, x, 0.1, 0.1, norm="l1")
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.pgd_step(x.clone(), x, x, 0.1, 0.1, backend="fast")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ak.pgd_random_start(x, 0.1, seed=-1)
    with pytest.raises(ValueError, match="out has shape"):
        ak.pgd_random_start(x, 0.1, out=torch.empty(3, 3))


def test_explicit_backend_never_falls_back():
    x = torch.rand(2, 3)
    reasons = P.available_backends(x)
    assert reasons["eager"] == []
    if not torch.cuda.is_available():
        assert reasons["cuda"], "the CUDA backend cannot run CPU tensors"
        with pytest.raises(ValueError, match="backend='cuda' cannot run"):
            ak.pgd_step(x.clone(), x, x, 0.1, 0.1, backend="cuda")


# ---------------------------------------------------------------------------------------
# custom op checks and torch.compile


def test_opcheck_triton_ops():
    if P.available_backends(torch.zeros(1))["triton"]:
        pytest.skip("Triton cannot run on CPU tensors here")
    from anchor_kernels.ops import pgd_triton  # noqa: F401 (registers the ops)
    gen = torch.Generator().manual_seed(9)
    x_adv, grad, x, eps, alpha = step_inputs((3, 2, 5), torch.float32, gen, per_sample=True)
    torch.library.opcheck(torch.ops.anchor_kernels.pgd_step_triton,
                          (x_adv, grad, x, eps, None, 0.0, 0.01, 0.0, 1.0))
    torch.library.opcheck(torch.ops.anchor_kernels.pgd_random_start_triton,
                          (torch.empty_like(x), x, None, 0.03, 12345, 0.0, 1.0))


def test_plain_eager_triton_calls_skip_the_dispatcher(monkeypatch):
    """In plain eager mode the Triton step and random start call their implementations
    directly (the registered ops cost about 100 us of dispatch a call); under a dispatch
    mode, as under tracing, they go through the ops."""
    if P.available_backends(torch.zeros(1))["triton"]:
        pytest.skip("Triton cannot run on CPU tensors here")
    from anchor_kernels.ops import pgd_triton

    from .utils import DispatchedOps

    direct = []
    for name in ("pgd_step_triton", "pgd_random_start_triton"):
        real = getattr(pgd_triton, name)
        monkeypatch.setattr(pgd_triton, name, lambda *a, _real=real, _name=name: (
            direct.append(_name), _real(*a))[1])
    gen = torch.Generator().manual_seed(9)
    x_adv, grad, x, _, _ = step_inputs((3, 2, 5), torch.float32, gen, per_sample=False)

    def run():
        ak.pgd_step(x_adv, grad, x, 0.03, 0.01, backend="triton")
        ak.pgd_random_start(x, 0.03, seed=5, backend="triton")

    run()
    assert direct == ["pgd_step_triton", "pgd_random_start_triton"]
    direct.clear()
    with DispatchedOps() as mode:
        run()
    assert direct == []
    assert {"anchor_kernels.pgd_step_triton", "anchor_kernels.pgd_random_start_triton"} <= set(mode.ops)


def test_opcheck_cpp_ops():
    reasons = P.available_backends(torch.zeros(1))["cpu"]
    if reasons:
        pytest.skip("; ".join(reasons))
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x_adv, grad, x, eps, alpha = step_inputs((3, 2, 5), dtype, gen, per_sample=True)
        ct = R.pgd_compute_dtype(dtype)
        torch.library.opcheck(torch.ops.anchor_kernels.pgd_step,
                              (x_adv, grad, x, eps.to(ct), alpha.to(ct), 0.0, 0.0, 0.0, 1.0))
        torch.library.opcheck(torch.ops.anchor_kernels.pgd_random_start,
                              (torch.empty_like(x), x, None, 0.03, 2 ** 62 + 5, 0.0, 1.0))
    with pytest.raises(RuntimeError, match="pgd_step: grad has shape"):
        torch.ops.anchor_kernels.pgd_step(x_adv, grad[:1], x, None, None, 0.1, 0.1, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="pgd_step: eps must be finite and >= 0"):
        torch.ops.anchor_kernels.pgd_step(x_adv, grad, x, None, None, -0.1, 0.1, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"pgd_step: alpha must have shape \(3,\)"):
        torch.ops.anchor_kernels.pgd_step(x_adv, grad, x, None, alpha[:2].double(), 0.1, 0.1, 0.0, 1.0)


def test_compile_fullgraph():
    backend = "triton" if not P.available_backends(torch.zeros(1))["triton"] else "eager"

    def two_steps(x_adv, grad, x):
        ak.pgd_step(x_adv, grad, x, 0.03, 0.01, backend=backend)
        return ak.pgd_step(x_adv, -grad, x, 0.03, 0.004, backend=backend)

    gen = torch.Generator().manual_seed(10)
    x_adv, grad, x, _, _ = step_inputs((4, 37), torch.float32, gen)
    expected = R.pgd_step(R.pgd_step(x_adv, grad, x, 0.03, 0.01), -grad, x, 0.03, 0.004)
    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    assert_equal_bits(compiled(x_adv.clone(), grad, x), expected)


def test_compile_before_any_eager_use(monkeypatch):
    """A backend never used eagerly is not loaded inside a trace: "auto" takes another one,
    an explicit one says why."""
    monkeypatch.setattr(P, "_cache", {"eager": P.EagerPGD()})
    gen = torch.Generator().manual_seed(16)
    x_adv, grad, x, _, _ = step_inputs((3, 20), torch.float32, gen)
    expected = R.pgd_step(x_adv, grad, x, 0.03, 0.01)
    auto = torch.compile(lambda a, g, c: ak.pgd_step(a, g, c, 0.03, 0.01), fullgraph=True,
                         backend="aot_eager")
    assert_equal_bits(auto(x_adv.clone(), grad, x), expected)
    explicit = torch.compile(lambda a, g, c: ak.pgd_step(a, g, c, 0.03, 0.01, backend="cpu"),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="loaded on first eager use"):
        explicit(x_adv.clone(), grad, x)


# ---------------------------------------------------------------------------------------
# the Triton kernels compile for Hopper with no GPU


_COMPILE_SM90 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from anchor_kernels.ops import pgd_triton as P
    target = GPUTarget("cuda", 90, 32)
    step_args = ["xa_ptr", "g_ptr", "x_ptr", "eps_ptr", "alpha_ptr", "eps", "alpha", "lo", "hi", "n", "inner"]
    start_args = ["out_ptr", "x_ptr", "eps_ptr", "eps", "lo", "hi", "seed_lo", "seed_hi", "n", "inner", "chans"]
    def sig(names, dt, i64):
        t = {"xa_ptr": "*" + dt, "g_ptr": "*" + dt, "x_ptr": "*" + dt, "out_ptr": "*" + dt,
             "eps_ptr": "*fp32", "alpha_ptr": "*fp32", "n": "i64" if i64 else "i32",
             "inner": "i32", "seed_lo": "i32", "seed_hi": "i32", "chans": "i32"}
        return {a: t.get(a, "fp32") for a in names}
    def attrs(names):  # what the launcher sees for (B, 3, 32, 32): aligned pointers, n % 16 == 0
        return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
                if a.endswith("_ptr") or a in ("n", "inner")}
    for dt in ("fp32", "bf16", "fp16"):
        for per_sample in (False, True):
            for i64 in (False, True):
                s = sig(step_args, dt, i64)
                s.update(BLOCK="constexpr", EPS_PER_SAMPLE="constexpr", ALPHA_PER_SAMPLE="constexpr", INT64="constexpr")
                k = triton.compile(triton.compiler.ASTSource(P._pgd_step_linf_kernel, s,
                    dict(BLOCK=P.BLOCK, EPS_PER_SAMPLE=per_sample, ALPHA_PER_SAMPLE=per_sample, INT64=i64),
                    attrs(step_args)), target=target, options={"num_warps": P.NUM_WARPS})
                assert k.asm["cubin"] and "ld.global.v4" in k.asm["ptx"], (dt, per_sample, i64)
                for cl in (False, True):
                    s = sig(start_args, dt, i64)
                    s.update(BLOCK="constexpr", EPS_PER_SAMPLE="constexpr", INT64="constexpr",
                             CHANNELS_LAST="constexpr")
                    k = triton.compile(triton.compiler.ASTSource(P._pgd_random_start_linf_kernel, s,
                        dict(BLOCK=P.BLOCK, EPS_PER_SAMPLE=per_sample, INT64=i64, CHANNELS_LAST=cl),
                        attrs(start_args)),
                        target=target, options={"num_warps": P.NUM_WARPS, "enable_fp_fusion": False})
                    assert k.asm["cubin"] and "fma" not in k.asm["ptx"], (dt, per_sample, i64, cl)
            l2_args = step_args[:9] + ["inner"]
            s = sig(l2_args, dt, False)
            s.update(BLOCK="constexpr", EPS_PER_SAMPLE="constexpr", ALPHA_PER_SAMPLE="constexpr")
            k = triton.compile(triton.compiler.ASTSource(P._pgd_step_l2_kernel, s,
                dict(BLOCK=P.L2_BLOCK, EPS_PER_SAMPLE=per_sample, ALPHA_PER_SAMPLE=per_sample),
                attrs(l2_args)), target=target, options={"num_warps": 4})
            assert k.asm["cubin"], (dt, per_sample, "l2")
    print("ok")
""")


def test_triton_kernels_compile_for_sm90():
    """Every kernel variant the launchers can pick compiles for sm_90 (run without the
    interpreter, in a subprocess, since this process imported the kernels interpreted)."""
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# the CUDA kernels' device code, run on the host (tests/pgd_cuda_emulator.cpp)


EMU_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    import ctypes
    import shutil

    from torch.utils.cpp_extension import CUDA_HOME
    include = next((os.path.join(r, "include") for r in (os.environ.get("CUDA_HOME"), CUDA_HOME,
                    "/usr/local/cuda") if r and os.path.isfile(os.path.join(r, "include", "cuda_fp16.h"))),
                   None)
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers (cuda_fp16.h)")
    here = os.path.dirname(os.path.abspath(__file__))
    lib = str(tmp_path_factory.mktemp("emu") / "pgd_emulator.so")
    res = subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", include, "-I",
                          os.path.join(os.path.dirname(here), "csrc"),
                          os.path.join(here, "pgd_cuda_emulator.cpp"), "-o", lib],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    emu = ctypes.CDLL(lib)
    p, d, i64, b, u = ctypes.c_void_p, ctypes.c_double, ctypes.c_int64, ctypes.c_bool, ctypes.c_uint
    emu.emu_pgd_step.argtypes = [ctypes.c_int, p, p, p, p, p, d, d, d, d, i64, i64, b, u, b]
    emu.emu_pgd_random_start.argtypes = [ctypes.c_int, p, p, p, d, ctypes.c_uint64, d, d, i64,
                                         i64, b, u, b]
    return emu


def _ptr(t):
    return None if t is None else t.data_ptr()


@pytest.mark.parametrize("dtype", list(EMU_DTYPES))
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (7,), (3, 1, 2, 2)])
@pytest.mark.parametrize("vec,grid,index64", [(True, 1, False), (True, 3, True), (False, 2, False)])
def test_cuda_kernels_emulated(cuda_emulator, dtype, shape, vec, grid, index64):
    """Every path of the CUDA kernels: 128-bit packs with the n mod V tail or one element per
    thread, a grid-stride loop over a small grid, 32- and 64-bit indices, per-sample eps and
    alpha (both, one, none)."""
    gen = torch.Generator().manual_seed(15)
    ct = R.pgd_compute_dtype(dtype)
    n, inner = math.prod(shape), math.prod(shape[1:])
    for per_sample_eps, per_sample_alpha in ((True, True), (True, False), (False, True), (False, False)):
        x_adv, grad, x, eps, alpha = step_inputs(shape, dtype, gen, per_sample=True)
        eps_t = eps.to(ct) if per_sample_eps else None
        alpha_t = alpha.to(ct) if per_sample_alpha else None
        e = eps if per_sample_eps else 0.05
        a = alpha if per_sample_alpha else 0.01
        expected = R.pgd_step(x_adv, grad, x, e, a)
        cuda_emulator.emu_pgd_step(EMU_DTYPES[dtype], _ptr(x_adv), _ptr(grad), _ptr(x), _ptr(eps_t),
                                   _ptr(alpha_t), 0.05, 0.01, 0.0, 1.0, n, inner, vec, grid, index64)
        assert_equal_bits(x_adv, expected, f"step eps={per_sample_eps} alpha={per_sample_alpha}")
        out = torch.empty_like(x)
        seed = 2 ** 63 - 25
        cuda_emulator.emu_pgd_random_start(EMU_DTYPES[dtype], _ptr(out), _ptr(x), _ptr(eps_t), 0.05,
                                           seed, 0.0, 1.0, n, inner, vec, grid, index64)
        assert_equal_bits(out, R.pgd_random_start(x, e, seed), f"start eps={per_sample_eps}")


# ---------------------------------------------------------------------------------------
# tier 2: CUDA


def gpu_backends():
    return ["triton", "cuda", "eager"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + ((512, 3, 32, 32),))
@pytest.mark.parametrize("per_sample", [False, True])
def test_step_bitwise_gpu(backend, dtype, shape, per_sample):
    gen = torch.Generator().manual_seed(11)
    x_adv, grad, x, eps, alpha = step_inputs(shape, dtype, gen, per_sample)
    expected = R.pgd_step(x_adv, grad, x, eps, alpha)  # on the CPU
    dev = [t.cuda() for t in (x_adv, grad, x)]
    eps_d = eps.cuda() if per_sample else eps
    alpha_d = alpha.cuda() if per_sample else alpha
    out = ak.pgd_step(dev[0], dev[1], dev[2], eps_d, alpha_d, backend=backend)
    assert_equal_bits(out.cpu(), expected, f"{backend} {dtype} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_step_large_gpu(backend, dtype, layout):
    """A large batch, odd per-sample size, against the reference run on the GPU (IEEE
    elementwise ops: the same bits as on the CPU)."""
    torch.manual_seed(14)
    shape = (1023, 3, 61, 67)
    x = torch.rand(shape, device="cuda").to(dtype)
    x_adv = (x.float() + 0.03 * torch.randn(shape, device="cuda")).clamp(0, 1).to(dtype)
    grad = torch.randn(shape, device="cuda").to(dtype)
    if layout == "channels_last":
        x, x_adv, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, x_adv, grad))
    eps = torch.rand(shape[0], device="cuda") * 0.05
    expected = R.pgd_step(x_adv, grad, x, eps, 0.01)
    out = ak.pgd_step(x_adv, grad, x, eps, 0.01, backend=backend)
    assert_equal_bits(out, expected, f"{backend} {dtype} {layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_start_bitwise_gpu(backend, dtype):
    x = torch.rand(512, 3, 32, 32).to(dtype)
    eps = torch.rand(512) * 0.1
    expected = R.pgd_random_start(x, eps, 2 ** 40 + 17)
    out = ak.pgd_random_start(x.cuda().contiguous(memory_format=torch.channels_last),
                              eps.cuda(), seed=2 ** 40 + 17, backend=backend)
    assert_equal_bits(out.cpu(), expected, f"{backend} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_step_gpu(dtype):
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(512, 3, 32, 32, generator=gen)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    grad = torch.randn(x.shape, generator=gen)
    eps = torch.rand(512, generator=gen)
    x_adv, grad, x = x_adv.to(dtype), grad.to(dtype), x.to(dtype)
    expected = R.pgd_step(x_adv.double(), grad.double(), x.double(), eps.double(), 0.5, norm="l2")
    out = ak.pgd_step(x_adv.cuda(), grad.cuda(), x.cuda(), eps.cuda(), 0.5, norm="l2", backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=tol)


@pytest.mark.gpu
def test_auto_picks_a_fused_backend_gpu():
    x = torch.rand(8, 3, 4, 4, device="cuda")
    assert P.select_backend("auto", P.PGDProblem(x, "linf")).name == "triton"
    assert P.select_backend("auto", P.PGDProblem(x, "l2")).name == "triton"
    assert P.select_backend("auto", P.PGDProblem(x, "l2", "random_start")).name == "eager"
