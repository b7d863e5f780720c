"""Triton kernels of the fused PGD step (L-inf and L2) and random start (L-inf), as in-place
custom ops.

The maths is ``reference.pgd_step`` / ``reference.pgd_random_start``; each kernel is one
pass over memory:

    step:          x_adv = clamp(min(max(x_adv + alpha sign(g), x - eps), x + eps), lo, hi)
                   reads x_adv, grad, x and writes x_adv: 4 tensor passes
    random start:  out = clamp(x + eps (2u - 1), lo, hi), u from Philox4x32-10
                   reads x and writes out: 2 tensor passes

Arithmetic is float32 for float16 / bfloat16 / float32 inputs, rounded once at the store.
The ops take flat memory: x_adv, grad and x must share one dense layout whose outermost
dimension is the batch (contiguous or channels_last), so that memory offset // inner is the
sample index of per-sample eps / alpha. ``anchor_kernels.pgd`` arranges that.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._autograd import direct_or_op
from .triton_launch import cdiv

# Both kernels are bandwidth-bound: 4096 elements per program with 8 warps gives each thread
# 16 elements (four 16-byte loads per tensor in float32) in flight, enough to cover HBM latency.
BLOCK = 4096
NUM_WARPS = 8
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

PHILOX_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox_word0(c0, c1, k0, k1):
    """Word 0 of Philox4x32-10 with counter (c0, c1, 0, 0) and key (k0, k1), all uint32."""
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(PHILOX_ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(PHILOX_ROUND_A, _c0) ^ c3 ^ k1
        c1 = _c2 * PHILOX_ROUND_B
        c3 = _c0 * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0


@triton.jit
def _round_to(y, dtype: tl.constexpr):
    """float32 -> dtype, round to nearest even. bfloat16 is rounded with integer ops because
    the interpreter's cast truncates; the compiled cast rounds the same way."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, (bits >> 16) | 0x40, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.jit
def _offsets(BLOCK: tl.constexpr, INT64: tl.constexpr):
    # int64 only past 2^31 elements: 64-bit division (per-sample index) is slow on the GPU.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _pgd_step_linf_kernel(
    xa_ptr, g_ptr, x_ptr,  # (n,) flat memory, one dtype
    eps_ptr, alpha_ptr,  # (B,) float32, read only when *_PER_SAMPLE
    eps, alpha, lo, hi,  # float32 scalars
    n, inner,  # numel and elements per sample
    BLOCK: tl.constexpr, EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
    INT64: tl.constexpr,
):
    """x_adv = clamp(min(max(x_adv + alpha sign(g), x - eps), x + eps), lo, hi), in place."""
    offs = _offsets(BLOCK, INT64)
    mask = offs < n
    xa = tl.load(xa_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if EPS_PER_SAMPLE or ALPHA_PER_SAMPLE:
        sample = offs // inner
    if EPS_PER_SAMPLE:
        e = tl.load(eps_ptr + sample, mask=mask)
    else:
        e = eps
    if ALPHA_PER_SAMPLE:
        a = tl.load(alpha_ptr + sample, mask=mask)
    else:
        a = alpha
    # sign(0) = sign(NaN) = 0, as in the reference
    sgn = tl.where(g > 0, 1.0, 0.0) - tl.where(g < 0, 1.0, 0.0)
    # a * sgn is exact, so contracting it into an FMA changes nothing
    step = xa.to(tl.float32) + a * sgn
    out = tl.maximum(step, x - e, propagate_nan=tl.PropagateNan.ALL)
    out = tl.minimum(out, x + e, propagate_nan=tl.PropagateNan.ALL)
    out = tl.maximum(out, lo, propagate_nan=tl.PropagateNan.ALL)
    out = tl.minimum(out, hi, propagate_nan=tl.PropagateNan.ALL)
    tl.store(xa_ptr + offs, _round_to(out, xa_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_step_l2_kernel(
    xa_ptr, g_ptr, x_ptr,  # (B, inner) flat memory, one dtype
    eps_ptr, alpha_ptr,  # (B,) float32, read only when *_PER_SAMPLE
    eps, alpha, lo, hi,  # float32 scalars
    inner,  # elements per sample
    BLOCK: tl.constexpr, EPS_PER_SAMPLE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr,
):
    """One program per sample b, three passes over its row:
    ||g||, then ||d|| with d = x_adv + alpha g / max(||g||, 1e-12) - x, then
    x_adv = clamp(x + d min(1, eps / ||d||), lo, hi)."""
    base = tl.program_id(0).to(tl.int64) * inner
    if EPS_PER_SAMPLE:
        e = tl.load(eps_ptr + tl.program_id(0))
    else:
        e = eps
    if ALPHA_PER_SAMPLE:
        a = tl.load(alpha_ptr + tl.program_id(0))
    else:
        a = alpha
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, inner, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + base + offs, mask=offs < inner, other=0.0).to(tl.float32)
        acc += g * g
    scale = a / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), 1e-12)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, inner, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < inner
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        xa = tl.load(xa_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = xa + scale * g - x
        acc += d * d
    dnorm = tl.sqrt(tl.sum(acc, axis=0))
    factor = tl.where(dnorm > e, e / dnorm, 1.0)
    for start in range(0, inner, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < inner
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        xa = tl.load(xa_ptr + base + offs, mask=m, other=0.0)
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = xa.to(tl.float32) + scale * g - x
        y = tl.minimum(tl.maximum(x + d * factor, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                       propagate_nan=tl.PropagateNan.ALL)
        tl.store(xa_ptr + base + offs, _round_to(y, xa_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])  # one compiled variant for every seed
def _pgd_random_start_linf_kernel(
    out_ptr, x_ptr,  # (n,) contiguous row-major: the Philox counter is the logical index
    eps_ptr,  # (B,) float32, read only when EPS_PER_SAMPLE
    eps, lo, hi,  # float32 scalars
    seed_lo, seed_hi,  # the 64-bit seed's two words, bit-cast to int32
    n, inner, chans,  # chans: C, read only when CHANNELS_LAST
    BLOCK: tl.constexpr, EPS_PER_SAMPLE: tl.constexpr, INT64: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """out = clamp(x + eps (2u - 1), lo, hi), u = (Philox(i, seed) >> 8) 2^-24 (exact in fp32),
    i the row-major (logical) index of the element. out and x share one dense layout with the
    batch outermost: row-major, or CHANNELS_LAST (B, spatial..., C in memory), whose memory
    offsets are mapped to logical indices here, so no layout copy is made.

    Launched with fp fusion off: eps (2u - 1) must be rounded before the sum, as in the reference.
    """
    offs = _offsets(BLOCK, INT64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if CHANNELS_LAST:  # offs = (b, s, c) in memory -> logical (b, c, s)
        b = offs // inner
        rest = offs - b * inner
        s = rest // chans
        idx = b * inner + (rest - s * chans) * (inner // chans) + s
    else:
        idx = offs
    c0 = idx.to(tl.uint32)
    if INT64:
        c1 = (idx >> 32).to(tl.uint32)
    else:
        c1 = c0 * 0
    r = _philox_word0(c0, c1, seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True))
    u = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    if EPS_PER_SAMPLE:
        e = tl.load(eps_ptr + offs // inner, mask=mask)
    else:
        e = eps
    y = x.to(tl.float32) + e * (2.0 * u - 1.0)
    y = tl.maximum(y, lo, propagate_nan=tl.PropagateNan.ALL)
    y = tl.minimum(y, hi, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs, _round_to(y, out_ptr.dtype.element_ty), mask=mask)


# True when the kernels run under TRITON_INTERPRET=1 (on CPU tensors), read as triton.jit did.
INTERPRET = not isinstance(_pgd_step_linf_kernel, triton.runtime.JITFunction)


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def _launch_args(t: Tensor) -> tuple:
    n = t.numel()
    batch = t.shape[0] if t.dim() > 0 and n > 0 else 1
    return n, max(n // batch, 1), (cdiv(n, BLOCK),), n >= 2 ** 31 - BLOCK


def pgd_step_triton(x_adv: Tensor, grad: Tensor, x: Tensor, eps_t: Optional[Tensor],
                    alpha_t: Optional[Tensor], eps: float, alpha: float, lo: float,
                    hi: float) -> None:
    """In-place L-inf step on flat memory. x_adv, grad, x: (B, ...) with one dense layout;
    eps_t / alpha_t: (B,) float32 per-sample values, or None to use the floats."""
    n, inner, grid, int64 = _launch_args(x_adv)
    if n == 0:
        return
    dummy = x_adv  # never read: the per-sample branches are compiled out
    with _device_guard(x_adv):
        _pgd_step_linf_kernel[grid](
            x_adv, grad, x, dummy if eps_t is None else eps_t,
            dummy if alpha_t is None else alpha_t, eps, alpha, lo, hi, n, inner, BLOCK=BLOCK,
            EPS_PER_SAMPLE=eps_t is not None, ALPHA_PER_SAMPLE=alpha_t is not None,
            INT64=int64, num_warps=NUM_WARPS)


_step_op = torch.library.custom_op("anchor_kernels::pgd_step_triton", pgd_step_triton,
                                   mutates_args=("x_adv",))


@_step_op.register_fake
def _(x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi) -> None:
    return None


L2_BLOCK = 1024


def pgd_step_l2_triton(x_adv: Tensor, grad: Tensor, x: Tensor, eps_t: Optional[Tensor],
                       alpha_t: Optional[Tensor], eps: float, alpha: float, lo: float,
                       hi: float) -> None:
    """In-place L2 step; x_adv, grad, x: (B, ...) with one dense, batch-outer layout."""
    n, inner, _, _ = _launch_args(x_adv)
    if n == 0:
        return
    dummy = x_adv
    with _device_guard(x_adv):
        _pgd_step_l2_kernel[(n // inner,)](
            x_adv, grad, x, dummy if eps_t is None else eps_t,
            dummy if alpha_t is None else alpha_t, eps, alpha, lo, hi, inner, BLOCK=L2_BLOCK,
            EPS_PER_SAMPLE=eps_t is not None, ALPHA_PER_SAMPLE=alpha_t is not None, num_warps=4)


_step_l2_op = torch.library.custom_op("anchor_kernels::pgd_step_l2_triton", pgd_step_l2_triton,
                                      mutates_args=("x_adv",))


@_step_l2_op.register_fake
def _(x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi) -> None:
    return None


def pgd_random_start_triton(out: Tensor, x: Tensor, eps_t: Optional[Tensor], eps: float,
                            seed: int, lo: float, hi: float) -> None:
    """out = clamp(x + eps (2u - 1), lo, hi); out, x: (B, ...) of one layout, contiguous or
    channels_last (4-D or 5-D); seed in [0, 2^63)."""
    n, inner, grid, int64 = _launch_args(x)
    if n == 0:
        return
    with _device_guard(x):
        _pgd_random_start_linf_kernel[grid](
            out, x, x if eps_t is None else eps_t, eps, lo, hi,
            _int32(seed & 0xFFFFFFFF), _int32((seed >> 32) & 0xFFFFFFFF), n, inner,
            x.shape[1] if x.dim() > 1 else 1, BLOCK=BLOCK, EPS_PER_SAMPLE=eps_t is not None,
            INT64=int64, CHANNELS_LAST=not x.is_contiguous(), num_warps=NUM_WARPS,
            enable_fp_fusion=False)


_random_start_op = torch.library.custom_op("anchor_kernels::pgd_random_start_triton",
                                           pgd_random_start_triton, mutates_args=("out",))


@_random_start_op.register_fake
def _(out, x, eps_t, eps, seed, lo, hi) -> None:
    return None


class TritonPGD:
    """The fused L-inf kernels: CUDA tensors (or CPU ones under TRITON_INTERPRET=1)."""

    name = "triton"

    def not_supported_reasons(self, p) -> list[str]:
        reasons = []
        if p.x.device.type != "cuda" and not INTERPRET:
            reasons.append(f"tensors are on {p.x.device.type}; Triton needs CUDA tensors "
                           "(TRITON_INTERPRET=1 runs it on the CPU, for testing)")
        if p.x.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {p.x.dtype} is not supported (float16, bfloat16, float32)")
        if p.norm == "l2" and p.op == "random_start":
            reasons.append("the L2 random start is implemented only in the eager backend")
        return reasons

    # In plain eager mode the implementations are called directly: the registered ops would
    # only dispatch to them, at about 100 us a call (torch.library.custom_op with a mutated
    # argument, 2-core CPU host). torch.compile, functorch and dispatch modes get the ops.
    def step(self, x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi, norm) -> None:
        impl, op = (pgd_step_triton, _step_op) if norm == "linf" else (pgd_step_l2_triton, _step_l2_op)
        direct_or_op(impl, op, x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi)

    def random_start(self, out, x, eps_t, eps, seed, lo, hi, norm) -> None:
        direct_or_op(pgd_random_start_triton, _random_start_op, out, x, eps_t, eps, seed, lo, hi)


BACKEND = TritonPGD()
