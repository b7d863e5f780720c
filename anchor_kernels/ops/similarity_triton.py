"""Triton kernels for the fused pairwise similarity and its backward.

Forward, for ``a`` (M, D), ``b`` (N, D), temperature ``t``:

    n_a[i] = max(||a_i||, eps)      n_b[j] = max(||b_j||, eps)           (1 when not normalising)
    S[i, j] = (a_i . b_j) / (n_a[i] n_b[j] t)

The dot tile is computed on the raw rows and scaled by the inverse norms in the epilogue, so
no normalised copy of ``a`` or ``b`` is ever written. The clamped norms (fp32, O(M + N)) are
computed first in one pass over the inputs (``rows_triton``, which also scales rows whose sum
of squares could overflow) and kept for the backward; accumulating them in
the dot loop instead would pull every tile into registers and spill (sm_90 compile: 255
registers and a 432-byte stack for bf16, against none without).

Backward, for ``G = dL/dS`` (M, N), with ``z_a = a / n_a`` and ``z_b = b / n_b``:

    dz_a[i] = (1/t) sum_j G[i, j] z_b[j] = (1/t) sum_j (G[i, j] / n_b[j]) b_j
    da[i]   = (dz_a[i] - [||a_i|| > eps] z_a[i] (z_a[i] . dz_a[i])) / n_a[i]

(the clamp passes no gradient to the norm below eps, as in ``x / x.norm().clamp_min(eps)``),
and the same with the roles of ``a`` and ``b`` swapped and ``G`` transposed for ``db``. One
kernel serves both sides: it scales the ``b`` tile by ``1 / n_b`` on load (entries stay in
[-1, 1], safe in float16), multiplies ``G`` by it, and, when one program holds the whole feature dimension (D <= 128), applies
the projection in its epilogue. For larger D it writes ``dz_a`` (fp32, M x D) and a row
kernel applies the projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._autograd import call, direct_or_op, eager_function, refuse_double_backward
from . import triton_launch
from .rows_triton import NORM_EPS, cast, prepare, scales
from .triton_launch import (Launch, cdiv, device_guard, device_reasons, dot_precision,
                            interpreter_upcast)

# Widest feature block of the backward; above it the normalisation backward runs as a
# second (O(M D)) kernel.
MAX_FUSED_D = 128


@triton.jit
def dot_acc(x, y, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y with float32 accumulation (UPCAST: see ``interpreter_upcast``)."""
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def _similarity_fwd_kernel(
    a_ptr, b_ptr, s_ptr, na_ptr, nb_ptr,
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd, stride_sm, stride_sn,
    inv_t,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """S tile = (a b^T tile) / (n_a n_b^T t); the norms are precomputed (O(M + N))."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped order: consecutive programs share rows of a, so its tiles stay in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + rn.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + rk
        a = tl.load(a_rows + kk[None, :] * stride_ad, mask=(rm[:, None] < M) & (kk[None, :] < D),
                    other=0.0)
        b = tl.load(b_rows + kk[None, :] * stride_bd, mask=(rn[:, None] < N) & (kk[None, :] < D),
                    other=0.0)
        acc = dot_acc(a, tl.trans(b), acc, PRECISION, UPCAST)

    na = tl.load(na_ptr + rm, mask=rm < M, other=1.0)
    nb = tl.load(nb_ptr + rn, mask=rn < N, other=1.0)
    acc = acc * (inv_t / na)[:, None] * (1.0 / nb)[None, :]
    s_ptrs = s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rn.to(tl.int64)[None, :] * stride_sn
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _similarity_bwd_kernel(
    g_ptr, x_ptr, y_ptr, nx_ptr, ny_ptr, px_ptr, out_ptr,
    M, N, D,
    stride_gm, stride_gn, stride_xm, stride_xd, stride_yn, stride_yd, stride_om, stride_od,
    inv_t, eps, normalize,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, FUSE_NORM: tl.constexpr,
    SCALED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One side of the backward: rows of x (M, D) against y (N, D) through G (M, N).

    out = dx when FUSE_NORM or not normalising, else dz_x in float32 for _norm_bwd_kernel.
    SCALED: x and y are the row pass's scaled copies x' = x px, y' = y py, and dx = px dx'.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = pid_d * BD + tl.arange(0, BD)
    rn0 = tl.arange(0, BN)
    g_rows = g_ptr + rm.to(tl.int64)[:, None] * stride_gm
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + rn0
        g = tl.load(g_rows + rn.to(tl.int64)[None, :] * stride_gn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        ny = tl.load(ny_ptr + rn, mask=rn < N, other=1.0)
        y = tl.load(y_ptr + rn.to(tl.int64)[:, None] * stride_yn + rd[None, :] * stride_yd,
                    mask=(rn[:, None] < N) & (rd[None, :] < D), other=0.0)
        # Scale the rows of y, not the columns of G: |y_j / n_j| <= 1 always (also below eps),
        # while G / n_j overflows float16 for a zero row (1 / eps = 1e12) and gives inf * 0.
        zy = (y.to(tl.float32) / ny[:, None]).to(y.dtype)
        acc = dot_acc(g.to(y.dtype), zy, acc, PRECISION, UPCAST)
    dz = acc * inv_t

    out_mask = (rm[:, None] < M) & (rd[None, :] < D)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rd[None, :] * stride_od
    if normalize:
        if FUSE_NORM:
            nx = tl.load(nx_ptr + rm, mask=rm < M, other=1.0)
            x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rd[None, :] * stride_xd,
                        mask=out_mask, other=0.0).to(tl.float32)
            # (z . dz) / n times z = x / n, and one factor a row: no z tile, no division per
            # element (the 128-wide float32 tile has no registers to spare for either)
            proj = tl.where(nx > eps, tl.sum(x * dz, axis=1) / (nx * nx), 0.0)
            if SCALED:  # px / n is subnormal only for rows past 2^125, where dx is too
                f = tl.load(px_ptr + rm, mask=rm < M, other=1.0) / nx
            else:
                f = 1.0 / nx
            dx = (dz - proj[:, None] * x) * f[:, None]
            tl.store(out_ptrs, cast(dx, out_ptr.dtype.element_ty, UPCAST), mask=out_mask)
        else:
            tl.store(out_ptrs, dz, mask=out_mask)
    else:
        tl.store(out_ptrs, dz.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _norm_bwd_kernel(
    dz_ptr, x_ptr, nx_ptr, px_ptr, out_ptr,
    M, D,
    stride_xm, stride_xd, stride_om, stride_od,
    eps,
    BM: tl.constexpr, BD: tl.constexpr, SCALED: tl.constexpr, UPCAST: tl.constexpr,
):
    """out = (dz - [n > eps] z (z . dz)) / n with z = x / n, row-wise; dz is (M, D) fp32
    contiguous; SCALED: times px (the similarity backward's SCALED)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rd0 = tl.arange(0, BD)
    nx = tl.load(nx_ptr + rm, mask=rm < M, other=1.0)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    dz_rows = dz_ptr + rm.to(tl.int64)[:, None] * D
    dot = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + rd0
        mask = (rm[:, None] < M) & (rd[None, :] < D)
        x = tl.load(x_rows + rd[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(dz_rows + rd[None, :], mask=mask, other=0.0)
        dot += tl.sum(x * dz, axis=1)
    proj = tl.where(nx > eps, dot / (nx * nx), 0.0)  # z . dz / n, times z = x / n below
    if SCALED:
        px = tl.load(px_ptr + rm, mask=rm < M, other=1.0)
    out_rows = out_ptr + rm.to(tl.int64)[:, None] * stride_om
    for d0 in range(0, D, BD):
        rd = d0 + rd0
        mask = (rm[:, None] < M) & (rd[None, :] < D)
        x = tl.load(x_rows + rd[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(dz_rows + rd[None, :], mask=mask, other=0.0)
        dx = (dz - proj[:, None] * x) / nx[:, None]
        if SCALED:
            dx *= px[:, None]
        tl.store(out_rows + rd[None, :] * stride_od, cast(dx, out_ptr.dtype.element_ty, UPCAST),
                 mask=mask)


# ---------------------------------------------------------------------------------------
# Launch plans. Fixed configurations chosen from the dtype and D (no autotuner), so that CI
# compiles every configuration a launch can use (tests/test_similarity.py).


def _exact_fp32(dtype: torch.dtype) -> bool:
    """float32 multiplied in full precision runs on FMA units: smaller tiles, or it spills."""
    return dot_precision(dtype) == "ieee"


def fwd_launch(a: Tensor, b: Tensor, s: Tensor, na: Tensor, nb: Tensor,
               temperature: float) -> Launch:
    m, d = a.shape
    n = b.shape[0]
    if _exact_fp32(a.dtype):
        bm, bn, bk, warps = 64, 64, 32, 4
    else:
        bm, bn, bk, warps = 128, 128, (32 if a.dtype == torch.float32 else 64), 8
    grid = (cdiv(m, bm) * cdiv(n, bn),)
    args = (a, b, s, na, nb, m, n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            s.stride(0), s.stride(1), 1.0 / temperature)
    return Launch(_similarity_fwd_kernel, grid, args,
                  dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, PRECISION=dot_precision(a.dtype),
                       UPCAST=interpreter_upcast(a.dtype)),
                  num_warps=warps, num_stages=3)


def flag_arg(value: bool):
    """A bool kernel argument. This Triton's interpreter cannot convert a Python bool (it
    builds a 32-bit array for the 1-bit type), so it gets an int there; compiled launches
    keep the bool (one signature for both values)."""
    return int(value) if triton_launch.interpreting() else bool(value)


def bwd_side_launches(g: Tensor, x: Tensor, y: Tensor, nx: Tensor, ny: Tensor, out: Tensor,
                      normalize: bool, temperature: float, px: Tensor | None = None) -> list[Launch]:
    """Launches writing dx = dL/dx into ``out`` for G (M, N) = dL/dS, x (M, D), y (N, D);
    px: x and y are the row pass's scaled copies, px x's factors (the result is for x's rows
    as given)."""
    m, d = x.shape
    n = y.shape[0]
    bd = 64 if d <= 64 else 128
    fuse = d <= MAX_FUSED_D
    bm, bn = (32, 32) if _exact_fp32(x.dtype) else (64, 64)
    two_pass = normalize and not fuse
    dz = torch.empty((m, d), dtype=torch.float32, device=x.device) if two_pass else out
    grid = (cdiv(m, bm), cdiv(d, bd))
    scaled = px is not None
    px = nx if px is None else px  # never read unless scaled
    args = (g, x, y, nx, ny, px, dz, m, n, d, g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            y.stride(0), y.stride(1), dz.stride(0), dz.stride(1), 1.0 / temperature, NORM_EPS,
            flag_arg(normalize))
    launches = [Launch(_similarity_bwd_kernel, grid, args,
                       dict(BM=bm, BN=bn, BD=bd, FUSE_NORM=fuse, SCALED=scaled and fuse,
                            PRECISION=dot_precision(x.dtype), UPCAST=interpreter_upcast(x.dtype)),
                       num_warps=4 if bd == 64 else 8, num_stages=3)]
    if two_pass:
        args = (dz, x, nx, px, out, m, d, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                NORM_EPS)
        launches.append(Launch(_norm_bwd_kernel, (cdiv(m, 16),), args,
                               dict(BM=16, BD=128, SCALED=scaled, UPCAST=interpreter_upcast(x.dtype)),
                               num_warps=4, num_stages=1))
    return launches


def _check_2d(a: Tensor, b: Tensor) -> None:
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "a and b must be 2-D")
    torch._check(a.shape[1] == b.shape[1], lambda: "a and b must have the same D")


def similarity_fwd_triton(a: Tensor, b: Tensor, normalize: bool,
                          temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(S (M, N) in a's dtype, n_a (M,) fp32, n_b (N,) fp32): see the module docstring."""
    _check_2d(a, b)
    m, n = a.shape[0], b.shape[0]
    s = torch.empty((m, n), dtype=a.dtype, device=a.device)
    with device_guard(a):
        # norms (one buffer per output), rows that could overflow scaled
        ra, rb = prepare(a, b, normalize, inverse=False, share=False)
        fwd_launch(ra.scaled, rb.scaled, s, ra.norms, rb.norms, temperature)()
    return s, ra.norms, rb.norms


_fwd_op = torch.library.custom_op("anchor_kernels::similarity_fwd_triton", similarity_fwd_triton,
                                  mutates_args=())


@_fwd_op.register_fake
def _(a, b, normalize, temperature):
    _check_2d(a, b)
    m, n = a.shape[0], b.shape[0]
    return (a.new_empty((m, n)), a.new_empty((m,), dtype=torch.float32),
            a.new_empty((n,), dtype=torch.float32))


def similarity_bwd_triton(grad: Tensor, a: Tensor, b: Tensor, na: Tensor, nb: Tensor,
                          normalize: bool, temperature: float) -> tuple[Tensor, Tensor]:
    """(da (M, D), db (N, D)) for grad = dL/dS (M, N)."""
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    db = torch.empty_like(b, memory_format=torch.contiguous_format)
    pa = pb = None
    with device_guard(a):
        if normalize and scales(a.dtype):  # the forward's scaled copies again (norms: na, nb)
            ra, rb = prepare(a, b, normalize, inverse=False)
            a, b, pa, pb = ra.scaled, rb.scaled, ra.factor, rb.factor
        for launch in bwd_side_launches(grad, a, b, na, nb, da, normalize, temperature, pa):
            launch()
        for launch in bwd_side_launches(grad.t(), b, a, nb, na, db, normalize, temperature, pb):
            launch()
    return da, db


_bwd_op = torch.library.custom_op("anchor_kernels::similarity_bwd_triton", similarity_bwd_triton,
                                  mutates_args=())


@_bwd_op.register_fake
def _(grad, a, b, na, nb, normalize, temperature):
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    a, b, normalize, temperature = inputs
    _, na, nb = output
    ctx.save_for_backward(a, b, na, nb)
    ctx.normalize, ctx.temperature = normalize, temperature


def _backward(ctx, grad_s, grad_na, grad_nb):
    # The norms are auxiliary outputs for this backward; they carry no gradient.
    a, b, na, nb = ctx.saved_tensors
    da, db = direct_or_op(similarity_bwd_triton, _bwd_op, grad_s, a, b, na, nb, ctx.normalize,
                          ctx.temperature)
    # create_graph=True: differentiating these gradients again raises, by name
    return refuse_double_backward("triton", (da, db), (grad_s, a, b)) + (None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
# The plain eager path: the same forward, saved state and backward as an autograd.Function
# that calls the implementations (the registered op's dispatch and autograd wrapper cost
# more than the work around a launch); torch.compile and dispatch modes get the op.
SimilarityTriton = eager_function("SimilarityTriton", similarity_fwd_triton, _setup_context,
                                  _backward, 4)


class TritonSimilarity:
    """Backend "triton" of :func:`anchor_kernels.pairwise_similarity`."""

    name = "triton"

    def not_supported_reasons(self, a: Tensor, b: Tensor) -> list[str]:
        return device_reasons([a, b])

    def __call__(self, a: Tensor, b: Tensor, normalize: bool, temperature: float) -> Tensor:
        return call(SimilarityTriton, _fwd_op, a, b, normalize, temperature)[0]


BACKEND = TritonSimilarity()


def sm90_compile_specs():
    """Every configuration the launchers can pick, for ``anchor_kernels.ops.sm90_check``.

    A launch depends only on the dtype, torch's float32 matmul precision, ``normalize`` and
    D's bucket (<= 64, <= 128, > 128); this spans all of them with real (CPU) arguments (the
    row pass: ``rows_triton``).
    """
    launches = []
    before = torch.get_float32_matmul_precision()
    try:
        for dtype, precision in [(torch.float32, "highest"), (torch.float32, "high"),
                                 (torch.bfloat16, "high"), (torch.float16, "high")]:
            torch.set_float32_matmul_precision(precision)
            for d in (59, 100, 130):
                for normalize in (True, False):
                    a, b = torch.randn(100, d).to(dtype), torch.randn(80, d).to(dtype)
                    s = torch.empty(100, 80, dtype=dtype)
                    na, nb = torch.empty(100), torch.empty(80)
                    launches.append(fwd_launch(a, b, s, na, nb, 0.1))
                    # the row pass's factors where the backward works on its scaled copies
                    pa = torch.ones(100) if normalize and scales(dtype) else None
                    launches += bwd_side_launches(s, a, b, na, nb, torch.empty_like(a), normalize,
                                                  0.1, pa)
        yield from triton_launch.sm90_compile_specs(launches)
    finally:
        torch.set_float32_matmul_precision(before)
