"""Triton kernel for hard-positive selection: per anchor, the k positives of lowest cosine.

For anchors ``a`` (M, D) with labels ``y_a`` and contrast rows ``b`` (N, D) with labels
``y_b``, row i keeps the k smallest of

    cos[i, j] = (a_i . b_j) / (n_a[i] n_b[j])   over P(i) = {j != self(i) : y_b[j] == y_a[i]}

(``n = max(||.||, eps)``, or 1 when not normalising; ``self(i) = anchor_offset + i``), in
ascending cosine order with ties to the lower j, exactly as ``reference.topk_hardest_mask``.

Streaming: one program owns BM anchors and walks the contrast set in BN-column tiles; a tile
is a dot over D (tensor cores) of the raw rows scaled by inverse norms (O(M + N)) that one
launch computes first (``rows_triton``, which also scales rows whose squares could overflow),
and a running per-row top-k of size KP >= k is kept in registers. No M x N buffer exists.

Exact ordering with a single integer compare: each candidate becomes the int64 key
``(ordered(cos) << 32) | j``, where ``ordered`` maps the float32 bits to an int32 with the
same order (negative floats have their magnitude bits flipped; -0 is folded into +0 first
so that it ties with +0 as in torch's sort). Smaller key = lower cosine, then lower index;
keys are unique. Non-positives get the key +inf (int64 max).

Merge: the row threshold is the largest key held; while some row of the block has a tile key
below its threshold, every such row swaps its threshold for its smallest tile key. After the
first tiles, a tile rarely holds more than one or two improvements per row, so this costs a
few vector reductions per tile instead of a sort. Unused slots (KP > k) hold keys below any
real key so they are never the threshold; empty slots hold distinct keys above any real key
so that exactly one slot is replaced per round.

Output (M, k): indices (int64; -1 where the anchor has fewer than k positives) and their
float32 cosines (+inf there), ascending.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._autograd import direct_or_op
from .rows_triton import prepare
from .similarity_triton import dot_acc, flag_arg
from . import triton_launch
from .triton_launch import (Launch, cdiv, device_guard, device_reasons, dot_precision,
                            interpreter_upcast)

# Largest k the kernel keeps in registers; larger k runs on the other backends.
MAX_K = 64
KEY_INF: tl.constexpr = tl.constexpr(0x7FFFFFFFFFFFFFFF)
# Every key at or above this is an empty-slot sentinel (real keys have j < 2**31).
KEY_PAD: tl.constexpr = tl.constexpr(0x7FFFFFFF80000000)
KEY_NEG: tl.constexpr = tl.constexpr(-0x7FFFFFFFFFFFFFFF)


@triton.jit(do_not_specialize=["k_eff", "stride_om"])  # k = 1 would compile twice
def _hard_positive_kernel(
    a_ptr, b_ptr, ya_ptr, yb_ptr, ra_ptr, rb_ptr, idx_ptr, cos_ptr,
    M, N, D, k_eff,
    stride_am, stride_ad, stride_bn, stride_bd, stride_om,
    self_offset, has_self,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    row_ok = rm < M
    rk = tl.arange(0, BK)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    ya = tl.load(ya_ptr + rm, mask=row_ok, other=0)
    self_col = tl.where(has_self != 0, rm + self_offset, -1)
    inv_na = tl.load(ra_ptr + rm, mask=row_ok, other=1.0)

    slot = tl.arange(0, KP)
    slot64 = slot.to(tl.int64)
    init = tl.where(slot < k_eff, KEY_INF - slot64, KEY_NEG + slot64)
    best = tl.zeros((BM, KP), dtype=tl.int64) + init[None, :]

    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        col_ok = rn < N
        yb = tl.load(yb_ptr + rn, mask=col_ok, other=0)
        pos = (ya[:, None] == yb[None, :]) & row_ok[:, None] & col_ok[None, :]
        pos = pos & (rn[None, :] != self_col[:, None])
        # Tiles without a positive for any row of the block (common with many classes or
        # instance labels) cost only the label compare.
        if tl.max(pos.to(tl.int32)) > 0:
            b_rows = b_ptr + rn.to(tl.int64)[:, None] * stride_bn
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, D, BK):
                kk = k0 + rk
                a = tl.load(a_rows + kk[None, :] * stride_ad,
                            mask=row_ok[:, None] & (kk[None, :] < D), other=0.0)
                b = tl.load(b_rows + kk[None, :] * stride_bd,
                            mask=col_ok[:, None] & (kk[None, :] < D), other=0.0)
                acc = dot_acc(a, tl.trans(b), acc, PRECISION, UPCAST)
            inv_nb = tl.load(rb_ptr + rn, mask=col_ok, other=1.0)
            cos = acc * inv_na[:, None] * inv_nb[None, :]
            cos = tl.where(cos == 0.0, 0.0, cos)  # -0 -> +0: ties with +0 as in torch.sort
            bits = cos.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
            key = (ordered.to(tl.int64) << 32) | rn.to(tl.int64)[None, :]
            key = tl.where(pos, key, KEY_INF)

            thr = tl.max(best, axis=1)
            low = tl.min(key, axis=1)
            while tl.max((low < thr).to(tl.int32), axis=0) > 0:
                take = low < thr
                best = tl.where((best == thr[:, None]) & take[:, None], low[:, None], best)
                key = tl.where(key == low[:, None], KEY_INF, key)
                thr = tl.max(best, axis=1)
                low = tl.min(key, axis=1)

    best = tl.sort(best, dim=1)
    # Sorted: KP - k_eff unused slots first, then the k_eff results in ascending order.
    col = slot - (KP - k_eff)
    is_pad = best >= KEY_PAD
    j = tl.where(is_pad, -1, best & 0xFFFFFFFF)
    o = (best >> 32).to(tl.int32)
    cos_bits = tl.where(o >= 0, o, o ^ 0x7FFFFFFF)
    cos_out = tl.where(is_pad, float("inf"), cos_bits.to(tl.float32, bitcast=True))
    out_mask = row_ok[:, None] & (col[None, :] >= 0)
    out_off = rm.to(tl.int64)[:, None] * stride_om + col[None, :]
    tl.store(idx_ptr + out_off, j, mask=out_mask)
    tl.store(cos_ptr + out_off, cos_out, mask=out_mask)


def kp_for(k_eff: int) -> int:
    """Register slots for k results: a few fixed sizes, so CI compiles each one."""
    for kp in (4, 16, MAX_K):
        if k_eff <= kp:
            return kp
    raise ValueError(f"k={k_eff} is above the Triton kernel's limit of {MAX_K}")


def mining_launch(a: Tensor, ya: Tensor, b: Tensor, yb: Tensor, ra: Tensor, rb: Tensor,
                  idx: Tensor, cos: Tensor, k_eff: int, anchor_offset: int | None) -> Launch:
    m, d = a.shape
    n = b.shape[0]
    kp = kp_for(k_eff)
    bk = 64 if a.dtype in (torch.float16, torch.bfloat16) else 32
    args = (a, b, ya, yb, ra, rb, idx, cos, m, n, d, k_eff, a.stride(0), a.stride(1),
            b.stride(0), b.stride(1), idx.stride(0), 0 if anchor_offset is None else anchor_offset,
            flag_arg(anchor_offset is not None))
    # 8 warps: the int64 key tile and the running top-k fit in registers without spills
    # (sm_90 compile: <= 206 registers, no stack, HGMMA for half and TF32 inputs).
    return Launch(_hard_positive_kernel, (cdiv(m, 64),), args,
                  dict(BM=64, BN=64, BK=bk, KP=kp, PRECISION=dot_precision(a.dtype),
                       UPCAST=interpreter_upcast(a.dtype)),
                  num_warps=8, num_stages=2)


def _out_like(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    m = z.shape[0]
    return (z.new_empty((m, k), dtype=torch.int64), z.new_empty((m, k), dtype=torch.float32))


def hard_positive_triton(z: Tensor, labels: Tensor, c: Tensor, c_labels: Tensor, k: int,
                         normalize: bool, anchor_offset: int | None) -> tuple[Tensor, Tensor]:
    """(indices (M, k) int64, cosines (M, k) float32) of each anchor's k hardest positives."""
    m, n = z.shape[0], c.shape[0]
    k_eff = min(k, n)
    if k_eff < k or n == 0:
        idx = torch.full((m, k), -1, dtype=torch.int64, device=z.device)
        cos = torch.full((m, k), float("inf"), dtype=torch.float32, device=z.device)
    else:
        idx, cos = _out_like(z, k)
    if m == 0 or n == 0:
        return idx, cos
    ya = labels.to(torch.int64).contiguous()
    yb = c_labels.to(torch.int64).contiguous()
    with device_guard(z):
        # inverse norms, and copies of rows that could overflow scaled exactly
        rz, rc = prepare(z, c, normalize, inverse=True)
        mining_launch(rz.scaled, ya, rc.scaled, yb, rz.norms, rc.norms, idx, cos, k_eff,
                      anchor_offset)()
    return idx, cos


_op = torch.library.custom_op("anchor_kernels::hard_positive_triton", hard_positive_triton,
                              mutates_args=())


@_op.register_fake
def _(z, labels, c, c_labels, k, normalize, anchor_offset):
    return _out_like(z, k)


class TritonHardPositive:
    """Backend "triton" of :func:`anchor_kernels.hard_positive_mining` (selection only)."""

    name = "triton"

    def not_supported_reasons(self, z: Tensor, c: Tensor, k: int) -> list[str]:
        reasons = device_reasons([z, c])
        if min(k, c.shape[0]) > MAX_K:
            reasons.append(f"k={k} is above the Triton kernel's limit of {MAX_K}")
        return reasons

    def __call__(self, z: Tensor, labels: Tensor, c: Tensor, c_labels: Tensor, k: int,
                 normalize: bool, anchor_offset: int | None) -> tuple[Tensor, Tensor]:
        return direct_or_op(hard_positive_triton, _op, z, labels, c, c_labels, k, normalize,
                            anchor_offset)


BACKEND = TritonHardPositive()


def sm90_compile_specs():
    """Every configuration the launchers can pick, for ``anchor_kernels.ops.sm90_check``: one
    per register size KP (every k up to MAX_K) and dot precision; nothing else varies (the
    row pass: ``rows_triton``)."""
    launches = []
    before = torch.get_float32_matmul_precision()
    try:
        for dtype, precision in [(torch.float32, "highest"), (torch.float32, "high"),
                                 (torch.bfloat16, "high"), (torch.float16, "high")]:
            torch.set_float32_matmul_precision(precision)
            z, c = torch.randn(100, 59).to(dtype), torch.randn(80, 59).to(dtype)
            y, yc = torch.zeros(100, dtype=torch.int64), torch.zeros(80, dtype=torch.int64)
            for k in range(1, MAX_K + 1):
                idx, cos = torch.empty(100, k, dtype=torch.int64), torch.empty(100, k)
                r = torch.ones(100)
                launches.append(mining_launch(z, y, c, yc, r, r[:80], idx, cos, k, None))
        yield from triton_launch.sm90_compile_specs(launches)
    finally:
        torch.set_float32_matmul_precision(before)
