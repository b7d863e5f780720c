"""Backend selection for the loss, in the style of xformers' operator dispatch.

Each backend says which inputs it cannot run and why (``not_supported_reasons``). An explicit
``backend=`` that cannot run raises those reasons; ``"auto"`` takes the first backend in the
device's preference order that can, and never picks the Triton interpreter. Backends are
listed here explicitly (no import-time swapping of globals), each imported on first use so
that a missing compiler or extension only disables that backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "eager")



def _load_triton():
    from .ops.supcon_triton import BACKEND
    return BACKEND


def _load_cuda():
    from .ops.supcon_cpp import CUDA_BACKEND
    return CUDA_BACKEND


def _load_cpu():
    from .ops.supcon_cpp import CPU_BACKEND
    return CPU_BACKEND


# name -> loader of the backend object, imported on first use. Literal imports (not
# importlib), so that torch.compile can trace a first use too.
_LOADERS = {"triton": _load_triton, "cuda": _load_cuda, "cpu": _load_cpu}

# Preference of "auto", fastest first, per device type.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "eager"),
    "cpu": ("cpu", "eager"),
}


# The fused ops' integer codes of supcon_loss's ``reduction`` (their "reduction" argument).
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


@dataclass(frozen=True)
class SupConProblem:
    """Flattened, validated inputs of one loss call (see ``reference.supcon_per_anchor``)."""

    f: Tensor  # (M, D)
    y_f: Tensor  # (M,)
    g: Tensor | None  # (N, D); None when the contrast set is the anchors themselves
    y_g: Tensor | None  # (N,)
    temperature: float
    beta: float
    topk: int | None
    detach_weights: bool
    normalize: bool
    anchor_offset: int | None
    # Fused backends only: return LSE_i as the per-anchor value (0 where A(i) is empty) and
    # "A(i) non-empty" as the validity mask, with no positive term. The top-k mode adds its
    # sparse positive term to this (anchor_kernels/ops/supcon_topk.py).
    lse_only: bool = False

    @property
    def out_dtype(self) -> torch.dtype:
        """Loss dtype: float32 for half inputs (as autocast does for losses), else the input's."""
        return torch.promote_types(self.f.dtype, torch.float32)


class EagerBackend:
    """The reference itself: any device and dtype, O(M N) memory."""

    name = "eager"

    def not_supported_reasons(self, p: SupConProblem) -> list[str]:
        return []

    def per_anchor(self, p: SupConProblem) -> tuple[Tensor, Tensor]:
        loss, valid = reference.supcon_per_anchor(
            p.f, p.y_f, p.g, p.y_g, temperature=p.temperature, hard_positive_beta=p.beta,
            hard_positive_topk=p.topk, detach_weights=p.detach_weights,
            normalize=p.normalize, anchor_offset=p.anchor_offset)
        return loss.to(p.out_dtype), valid


class UnavailableBackend:
    """Stands in for a backend whose module could not be imported."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def not_supported_reasons(self, p: SupConProblem) -> list[str]:
        return [self.reason]

    def per_anchor(self, p: SupConProblem):
        raise RuntimeError(self.reason)


_cache: dict[str, object] = {"eager": EagerBackend()}


def get_backend(name: str):
    if name not in _cache:
        loader = _LOADERS.get(name)
        if loader is None:
            _cache[name] = UnavailableBackend(name, f"the {name} backend is not built in this version")
        else:
            try:
                _cache[name] = loader()
            except Exception as exc:  # a missing compiler or library disables only this backend
                _cache[name] = UnavailableBackend(name, f"the {name} backend failed to import: {exc}")
    return _cache[name]


def select_backend(name: str, p: SupConProblem):
    """The backend object to run ``p``, or ValueError listing why none (or the named one) can."""
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(p)
        if reasons:
            raise ValueError(f"backend={name!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    refused = []
    for candidate in AUTO_ORDER.get(p.f.device.type, ("eager",)):
        backend = get_backend(candidate)
        reasons = backend.not_supported_reasons(p)
        if not reasons:
            return backend
        refused.append(f"{candidate}: " + "; ".join(reasons))
    raise ValueError("no backend can run these inputs:\n  " + "\n  ".join(refused))


def available_backends(p: SupConProblem) -> dict[str, list[str]]:
    """Every backend's refusal reasons for ``p`` (an empty list means it can run)."""
    return {n: get_backend(n).not_supported_reasons(p) for n in BACKEND_NAMES if n != "auto"}


get_backend("triton")  # cheap (no build); loaded here so that torch.compile finds it
