"""Plain SupCon (beta = 0) with its positive term from class sums, for the fused backends.

With weights ``1/|P(i)|`` the positive term needs no per-logit label work:

    sum_{j in P(i)} s_ij = z_i . (C_{y_i} - [y_self = y_i] c_self(i)) / tau,
    |P(i)| = count_{y_i} - [y_self = y_i],

with ``C_y`` the sum of the normalised contrast rows of label y and ``count_y`` their number,
both O((M + N) D) (labels of any integer range: dense ids from sort + searchsorted; the sums
by ``index_put`` with accumulation, deterministic). The O(M N) kernel then computes only the
self-masked log-sum-exp, ``LSE_i`` (``SupConProblem.lse_only``), and its backward only
``p_ij``; autograd differentiates the O((M + N) D) part, whose backward is a gather.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..backends import SupConProblem


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def normalize(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-12)`` row-wise in ``compute_dtype``, without overflow or underflow
    for any finite x: the row is divided by its largest magnitude first (a constant for
    autograd, since the result does not depend on it)."""
    x = x.to(compute_dtype(x))
    a = x.detach().abs().amax(dim=1, keepdim=True)
    a = torch.where(a > 0, a, torch.ones_like(a))
    y = x / a
    return y / torch.maximum(y.norm(dim=1, keepdim=True), 1e-12 / a)


def dense_ids(y_f: Tensor, y_g: Tensor) -> tuple[Tensor, Tensor]:
    """int64 ids in [0, M + N), equal iff the labels are equal, with no host synchronisation."""
    table = torch.sort(torch.cat([y_f.reshape(-1), y_g.reshape(-1)]).to(torch.int64)).values
    return (torch.searchsorted(table, y_f.to(torch.int64)),
            torch.searchsorted(table, y_g.to(torch.int64)))


def classsum_per_anchor(backend, p: SupConProblem) -> tuple[Tensor, Tensor]:
    """(L_i (M,) in ``p.out_dtype``, valid (M,) bool) of plain SupCon: ``LSE_i`` from ``backend`` in
    log-sum-exp-only mode, the positive term from class sums."""
    lse, _ = backend.per_anchor(dataclasses.replace(p, lse_only=True))
    g, y_g = (p.f, p.y_f) if p.g is None else (p.g, p.y_g)
    m, n = p.f.shape[0], g.shape[0]
    dtype = compute_dtype(p.f)
    z = normalize(p.f) if p.normalize else p.f.to(dtype)
    c = z if p.g is None else (normalize(g) if p.normalize else g.to(dtype))
    ids_f, ids_g = dense_ids(p.y_f, y_g)
    sums = torch.zeros(m + n, c.shape[1], device=c.device, dtype=c.dtype).index_put(
        (ids_g,), c, accumulate=True)
    counts = torch.zeros(m + n, device=c.device, dtype=dtype).index_put(
        (ids_g,), torch.ones(n, device=c.device, dtype=dtype), accumulate=True)
    positive_sum, npos = sums[ids_f], counts[ids_f]
    if p.anchor_offset is not None:  # anchor i is contrast row offset + i: not its own positive
        own = p.anchor_offset + torch.arange(m, device=c.device)
        is_own_positive = (y_g[own] == p.y_f).to(c.dtype)
        positive_sum = positive_sum - is_own_positive[:, None] * c[own]
        npos = npos - is_own_positive
    valid = npos > 0
    sbar = (z * positive_sum).sum(dim=1) / (p.temperature * npos.clamp_min(1.0))
    per_anchor = torch.where(valid, lse.to(dtype) - sbar, torch.zeros((), device=c.device))
    return per_anchor.to(p.out_dtype), valid
