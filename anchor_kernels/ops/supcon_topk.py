"""The loss's top-k mode (``hard_positive_topk=k``) for the fused backends, kept fused.

With ``T(i)`` the ``k' = min(k, |P(i)|)`` positives of lowest cosine (ties to the lower
index), the weights are ``1/k'`` on ``T(i)``, so

    L_i = LSE_i - sbar_i,      sbar_i = (1/k') sum_{j in T(i)} s_ij = (1/(k' tau)) sum_{j in T(i)} cos_ij

for anchors with a positive (``k' > 0``), 0 for the others. Three streaming pieces, none of
size M x N:

- ``LSE_i`` and its gradient: the backend's own fused kernels, run on the problem with
  ``lse_only=True`` (``SupConProblem.lse_only``);
- ``T(i)`` and ``cos_ij`` on it: the selection kernel of the same backend
  (``anchor_kernels.hard_positive``), whose cosines carry a sparse backward
  (``SelectedCosine``: O((M + N) D + M k));
- ``sbar_i``: a masked mean over an (M, k) tensor.

The selection is a constant of the loss (weights are piecewise constant), so the gradient is
``dL/ds_ij = g_i (p_ij - [j in T(i)] / k')`` exactly as the reference with detached weights.

A fused backend supports top-k by adding ``topk_reasons`` to its refusals, and runs it through
``supcon_composite.composite``, which calls ``topk_per_anchor`` (``lse_only`` is the kernels'
mode and wins: such a problem returns LSE_i only).

Precision: the selection ranks float32 cosines (half inputs multiplied exactly with float32
accumulation). Positives whose cosines differ by less than that rounding may be ranked
differently from a float64 reference; anything separated by more is selected identically.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import hard_positive
from ..backends import SupConProblem


def topk_reasons(p: SupConProblem, mining: str) -> list[str]:
    """Why ``p``'s top-k selection cannot run on the ``mining`` selection backend."""
    g = p.f if p.g is None else p.g
    return [f"top-k selection: {r}"
            for r in hard_positive.DISPATCH.get(mining).not_supported_reasons(p.f, g, p.topk)]


def topk_per_anchor(backend, p: SupConProblem, mining: str) -> tuple[Tensor, Tensor]:
    """(L_i (M,) in ``p.out_dtype``, valid (M,) bool) of the top-k mode of ``p``.

    ``backend`` computes ``LSE_i`` from ``p`` with ``lse_only=True``; ``mining`` names the
    selection backend ("triton", "cuda", "cpu" or "eager").
    """
    lse, _ = backend.per_anchor(dataclasses.replace(p, topk=None, lse_only=True))
    if p.g is None:
        g, y_g = p.f, p.y_f
    else:
        g, y_g = p.g, p.y_g
    idx, cos = hard_positive.mine(p.f, p.y_f, g, y_g, p.topk, normalize=p.normalize,
                                  anchor_offset=p.anchor_offset, backend=mining)
    chosen = idx >= 0
    k_prime = chosen.sum(dim=1)
    valid = k_prime > 0
    out = p.out_dtype
    zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
    sbar = torch.where(chosen, cos, zero).sum(dim=1) / (k_prime.clamp_min(1).to(cos.dtype)
                                                        * p.temperature)
    per_anchor = torch.where(valid, lse.to(out) - sbar.to(out), torch.zeros((), dtype=out,
                                                                           device=lse.device))
    return per_anchor, valid
