"""The row pass of the Triton similarity and selection: one launch over the rows of both
inputs, in place of the eager ops that used to run in front of their kernels (about thirty
for a normalised similarity).

For each row x_i it writes

    n_i = max(||x'_i||, eps)     (1 / n_i with INVERSE: the selection scales its tiles by it)
    x'_i = x_i p_i               (bfloat16 / float32 rows, SCALE: a contiguous copy, and p_i)

with p_i = 2^-e_i for the exponent e_i that ``reference.overflow_safe_scale`` takes (that of
the row's largest component where it exceeds sqrt(float32 max / 4D), so that no sum of
squares overflows float32; capped at 126, where 2^-e is still a normal float), else 1.
Multiplying by a power of two is exact, so x' has the cosines of x. float16 rows need no
scaling (their squares cannot overflow a float32 sum): SCALE is off and x' is x.

A backward that worked on x' multiplies its result by p_i: the chain rule of the exact
scaling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_launch
from .triton_launch import Launch, cdiv, interpreter_upcast

NORM_EPS = 1e-12
_EPS = tl.constexpr(NORM_EPS)
BLOCK_R, BLOCK_D = 16, 64  # 16 rows a program, their columns 64 at a time


@triton.jit
def _pow2(k):
    """2^k for integers k in [-126, 127], built from its bits (exact, never flushed)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def cast(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """float32 v in dtype. UPCAST (the interpreter, ``interpreter_upcast``): its conversion to
    bfloat16 garbles float32 subnormals, which a scaled-back gradient can be, so bfloat16
    values below 2^-126 are built from their bits there: sign, and |v| in units of 2^-133
    rounded to nearest even (2^-126 itself, 128 units, is the smallest normal's bits)."""
    out = v.to(dtype)
    if UPCAST and dtype == tl.bfloat16:
        a = tl.abs(v)
        tiny = a < 1.1754943508222875e-38
        u = tl.where(tiny, a, 0.0) * 1.4757395258967641e20 * 7.378697629483821e19  # 2^67 2^66
        t = tl.floor(u)
        odd = (t.to(tl.int32) & 1) == 1
        units = (t + tl.where((u - t > 0.5) | ((u - t == 0.5) & odd), 1.0, 0.0)).to(tl.int32)
        bits = tl.where(v < 0, units | 0x8000, units).to(tl.int16)
        out = tl.where(tiny, bits.to(tl.bfloat16, bitcast=True), out)
    return out


@triton.jit
def _rows(X, XS, NORM, FACTOR, R, D, stride_r, stride_d, big, pid,
          SCALE: tl.constexpr, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    offs = tl.arange(0, BLOCK_D)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_r
    xs_rows = XS + rows.to(tl.int64)[:, None] * D
    if SCALE:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs
            x = tl.load(x_rows + cols[None, :] * stride_d, mask=rmask[:, None] & (cols[None, :] < D),
                        other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        # frexp's exponent of a normal float: amax = m 2^e with m in [1/2, 1), at most 126
        # so that 2^-e is a normal float (the largest component then below 4). Non-finite
        # maxima fail the test and leave the row as it is, as in overflow_safe_scale.
        biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.where((amax > big) & (amax < float("inf")), tl.minimum(biased - 126, 126), 0)
        p = _pow2(-e)
        tl.store(FACTOR + rows, p, mask=rmask)
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs
        mask = rmask[:, None] & (cols[None, :] < D)
        x = tl.load(x_rows + cols[None, :] * stride_d, mask=mask, other=0.0)
        if SCALE:
            x = cast(x.to(tl.float32) * p[:, None], x.dtype, UPCAST)
            tl.store(xs_rows + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
    n = tl.maximum(tl.sqrt(ss), _EPS)
    if INVERSE:
        n = 1.0 / n
    tl.store(NORM + rows, n, mask=rmask)


@triton.jit
def _row_pass_kernel(A, AS, NA, PA, MA, B, BS, NB, PB, MB, D,
                     stride_am, stride_ad, stride_bm, stride_bd, big,
                     SCALE: tl.constexpr, INVERSE: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """The programs of a's row blocks, then those of b's (none when MB = 0: one set)."""
    pid = tl.program_id(0)
    blocks_a = tl.cdiv(MA, BLOCK_R)
    if pid < blocks_a:
        _rows(A, AS, NA, PA, MA, D, stride_am, stride_ad, big, pid, SCALE, INVERSE, BLOCK_R,
              BLOCK_D, UPCAST)
    else:
        _rows(B, BS, NB, PB, MB, D, stride_bm, stride_bd, big, pid - blocks_a, SCALE, INVERSE,
              BLOCK_R, BLOCK_D, UPCAST)


def scales(dtype: torch.dtype) -> bool:
    """Whether rows of this dtype may need the exact scaling (float16's never do)."""
    return dtype != torch.float16


class Rows:
    """What the row pass gives one input: x' (x itself without SCALE), its norms (or their
    inverses) and its factors p (None without SCALE)."""

    def __init__(self, scaled: Tensor, norms: Tensor, factor: Tensor | None):
        self.scaled, self.norms, self.factor = scaled, norms, factor

    @classmethod
    def empty(cls, x: Tensor) -> "Rows":
        """The buffers the row pass writes for x."""
        rows, device, scale = x.shape[0], x.device, scales(x.dtype)
        return cls(torch.empty((rows, x.shape[1]), dtype=x.dtype, device=device) if scale else x,
                   torch.empty(rows, dtype=torch.float32, device=device),
                   torch.empty(rows, dtype=torch.float32, device=device) if scale else None)

    @classmethod
    def plain(cls, x: Tensor) -> "Rows":
        """x as it is, with norms of 1: the rows of an op that does not normalise."""
        return cls(x, torch.ones(x.shape[0], dtype=torch.float32, device=x.device), None)


def row_pass(a: Tensor, b: Tensor | None, inverse: bool) -> tuple[Launch, Rows, Rows]:
    """The launch writing ``Rows`` of a and of b (b None: a's serve both), and those Rows."""
    ra = Rows.empty(a)
    rb = ra if b is None else Rows.empty(b)
    other = a if b is None else b
    m, d = a.shape
    n = 0 if b is None else b.shape[0]
    big = (torch.finfo(torch.float32).max / (4.0 * max(d, 1))) ** 0.5
    pa = ra.norms if ra.factor is None else ra.factor  # never written without SCALE
    pb = rb.norms if rb.factor is None else rb.factor
    args = (a, ra.scaled, ra.norms, pa, m, other, rb.scaled, rb.norms, pb, n, d,
            a.stride(0), a.stride(1), other.stride(0), other.stride(1), big)
    grid = (cdiv(m, BLOCK_R) + cdiv(n, BLOCK_R),)
    return Launch(_row_pass_kernel, grid, args,
                  dict(SCALE=scales(a.dtype), INVERSE=inverse, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                       UPCAST=interpreter_upcast(a.dtype)),
                  num_warps=4, num_stages=1), ra, rb


def prepare(a: Tensor, b: Tensor, normalize: bool, inverse: bool,
            share: bool = True) -> tuple[Rows, Rows]:
    """The Rows of a and b that an op's kernels read: from the row pass, launched here, when
    normalising; else a and b as they are. With one set (b is a) one Rows serves both, unless
    not ``share``: an op that returns both norms (a custom op's outputs may not alias)."""
    one = b is a and share
    if not normalize:
        ra = Rows.plain(a)
        return ra, ra if one else Rows.plain(b)
    launch, ra, rb = row_pass(a, None if one else b, inverse)
    launch()
    return ra, rb


def sm90_compile_specs():
    """Every configuration of the row pass, for ``anchor_kernels.ops.sm90_check``: one per
    dtype (which decides SCALE) and INVERSE; no matrix product."""
    launches = [row_pass(torch.randn(100, 59).to(dtype), torch.randn(80, 59).to(dtype), inverse)[0]
                for dtype in (torch.float32, torch.bfloat16, torch.float16)
                for inverse in (False, True)]
    for kernel, signature, constexprs, num_warps, num_stages in \
            triton_launch.sm90_compile_specs(launches):
        yield kernel, signature, dict(constexprs, USES_DOT=False), num_warps, num_stages
