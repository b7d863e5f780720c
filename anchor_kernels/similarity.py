"""Public fused pairwise similarity: ``S = norm(a) norm(b)^T / t``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import _validate as v
from . import reference
from .backends import BACKEND_NAMES


class Unavailable:
    """Stands in for a backend that is not built or failed to import."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def not_supported_reasons(self, *args) -> list[str]:
        return [self.reason]


class OpDispatch:
    """Backend choice for one op, with the loss's rules (``anchor_kernels.backends``).

    An explicit backend that cannot run the inputs raises its reasons; ``"auto"`` takes the
    first that can in the device's preference order (the Triton interpreter is never in it),
    and raises every refusal when none can. Backends are imported on first use so that a
    missing compiler or extension disables only that backend; each loader is a function with
    a literal ``import`` statement, which torch.compile can trace (``importlib`` it cannot).
    """

    def __init__(self, op: str, loaders: dict[str, Callable[[], object]], eager,
                 auto_order: dict[str, tuple]):
        self.op, self.loaders, self.auto_order = op, loaders, auto_order
        self.cache = {"eager": eager}

    def get(self, name: str):
        if name not in self.cache:
            loader = self.loaders.get(name)
            if loader is None:
                self.cache[name] = Unavailable(
                    name, f"{self.op} has no {name} backend in this version")
            else:
                try:
                    self.cache[name] = loader()
                except Exception as exc:  # a missing compiler or library disables this backend
                    self.cache[name] = Unavailable(
                        name, f"the {name} backend failed to import: {exc}")
        return self.cache[name]

    def select(self, name: str, device: torch.device, *args):
        """The backend to run ``args`` (passed to ``not_supported_reasons``), or ValueError."""
        if name != "auto":
            backend = self.get(name)
            reasons = backend.not_supported_reasons(*args)
            if reasons:
                raise ValueError(f"{self.op}: backend={name!r} cannot run these inputs: "
                                 + "; ".join(reasons))
            return backend
        refused = []
        for candidate in self.auto_order.get(device.type, ("eager",)):
            backend = self.get(candidate)
            reasons = backend.not_supported_reasons(*args)
            if not reasons:
                return backend
            refused.append(f"{candidate}: " + "; ".join(reasons))
        raise ValueError(f"{self.op}: no backend can run these inputs:\n  " + "\n  ".join(refused))

    def available(self, *args) -> dict[str, list[str]]:
        """Every backend's refusal reasons for ``args`` (empty list: it can run them)."""
        return {n: self.get(n).not_supported_reasons(*args) for n in BACKEND_NAMES if n != "auto"}


class EagerSimilarity:
    """The reference: any device and dtype, autograd through PyTorch ops."""

    name = "eager"

    def not_supported_reasons(self, a: Tensor, b: Tensor) -> list[str]:
        return []

    def __call__(self, a: Tensor, b: Tensor, normalize: bool, temperature: float) -> Tensor:
        return reference.pairwise_similarity(a, b, normalize=normalize, temperature=temperature)


def _load_triton():
    from .ops.similarity_triton import BACKEND
    return BACKEND


def _load_cpu():
    from .ops.similarity_cpp import CPU_BACKEND
    return CPU_BACKEND


def _load_cuda():
    from .ops.similarity_cpp import CUDA_BACKEND
    return CUDA_BACKEND


DISPATCH = OpDispatch(
    "pairwise_similarity",
    {"triton": _load_triton, "cpu": _load_cpu, "cuda": _load_cuda},
    EagerSimilarity(),
    {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpu", "eager")},
)


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under ``torch.autocast`` the op runs in the autocast dtype, like ``torch.matmul``."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype != torch.float64 else t for t in tensors)


def pairwise_similarity(
    a: Tensor,  # (M, D)
    b: Tensor | None = None,  # (N, D)
    *,
    normalize: bool = True,
    temperature: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Scaled cosine similarity ``S = norm(a) norm(b)^T / t`` (M, N), fused.

    ``norm(x)_i = x_i / max(||x_i||, 1e-12)`` as ``F.normalize`` (rows of zeros give zeros,
    never NaN); ``b=None`` means ``b = a``. The kernels scale the raw ``a b^T`` tile by the
    inverse row norms instead of writing normalised copies, and differentiate through the
    normalisation in the backward:
    ``da_i = (dz_i - [||a_i|| > eps] z_i (z_i . dz_i)) / max(||a_i||, eps)`` with
    ``dz = dS norm(b) / t``, likewise for ``b``.

    Args:
        a: (M, D) float16, bfloat16, float32 or float64.
        b: (N, D) with a's dtype and device, or None.
        normalize: L2-normalise the rows (False: ``S = a b^T / t``).
        temperature: t > 0.
        backend: "auto", "triton", "cuda", "cpu" or "eager"; an explicit backend that cannot
            run the inputs raises ValueError saying why.

    Returns:
        S (M, N) in the inputs' dtype (float32 accumulation). Float32 inputs follow
        ``torch.get_float32_matmul_precision()``: "highest" (the default) multiplies in
        full float32, "high" allows TF32 on GPU. Under ``torch.autocast`` the inputs are cast
        to the autocast dtype first, as for ``torch.matmul``.
    """
    v.check_tensor("a", a, ndim=2, floating=True)
    if b is not None:
        v.check_tensor("b", b, ndim=2, floating=True)
        v.check_same("b", b, "a", a)
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"b must be (N, {a.shape[1]}) to match a's D, got {tuple(b.shape)}")
    temperature = v.check_positive("temperature", temperature)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    v.check_choice("backend", backend, BACKEND_NAMES)
    if b is None:
        (a,) = autocast_inputs(a)
    else:
        a, b = autocast_inputs(a, b)
    other = a if b is None else b
    impl = DISPATCH.select(backend, a.device, a, other)
    return impl(a, b if isinstance(impl, EagerSimilarity) else other, normalize, temperature)
