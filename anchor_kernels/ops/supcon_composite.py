"""The SupCon modes a fused backend computes around its O(M N) kernels rather than in them:
the top-k mode (``supcon_topk``), and plain SupCon (beta = 0) on large batches, whose positive
term then comes from class sums (``supcon_classsum``). Both run the backend's own kernels in
log-sum-exp-only mode; ``lse_only`` problems are the kernels' mode itself and never composite.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from ..backends import SupConProblem
from . import supcon_classsum, supcon_topk


def composite(backend, p: SupConProblem, name: str,
              classsum_min_logits: int) -> Optional[Callable[[], tuple[Tensor, Tensor]]]:
    """A function giving ``p``'s per-anchor (loss, valid) around ``backend``'s kernels, or None
    when ``backend`` computes ``p`` in its kernels alone. Class sums from ``classsum_min_logits``
    anchor-contrast pairs (M N) on."""
    if p.lse_only:
        return None
    if p.topk is not None:
        return lambda: supcon_topk.topk_per_anchor(backend, p, name)
    n = p.f.shape[0] if p.g is None else p.g.shape[0]
    if p.beta == 0.0 and p.f.shape[0] * n >= classsum_min_logits:
        return lambda: supcon_classsum.classsum_per_anchor(backend, p)
    return None
