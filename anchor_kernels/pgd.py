"""The fused PGD step and random start: argument checks and backend dispatch.

    pgd_step:          x_adv <- clamp(min(max(x_adv + alpha sign(grad), x - eps), x + eps), lo, hi)
    pgd_random_start:  x_adv  = clamp(x + eps (2u - 1), lo, hi),  u ~ U[0, 1) per element

in one pass over memory each (``reference.pgd_step`` / ``reference.pgd_random_start`` are
the spec, bit for bit). Backends, xformers-style: ``triton`` (CUDA; the interpreter on CPU
when TRITON_INTERPRET=1), ``cuda`` and ``cpu`` (the C++ extension), ``eager`` (the reference,
any device). The L2 step runs in triton and eager, the L2 random start in eager.
``backend="auto"`` takes the first of triton, cuda, eager on CUDA tensors and cpu, eager on
CPU tensors that can run the call; an explicit backend that cannot run raises ValueError
with its reasons, never falling back.

The random numbers are counter-based (Philox4x32-10 keyed by a 64-bit seed drawn from a
``torch.Generator``), so every backend draws the same start for the same generator state.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validate as v
from . import reference
from .backends import UnavailableBackend

NORMS = ("linf", "l2")
BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "eager")
AUTO_ORDER = {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpu", "eager")}
_LOCATIONS = {
    "triton": "anchor_kernels.ops.pgd_triton:BACKEND",
    "cpu": "anchor_kernels.ops.pgd_cpp:CPU_BACKEND",
    "cuda": "anchor_kernels.ops.pgd_cpp:CUDA_BACKEND",
}


@dataclass(frozen=True)
class PGDProblem:
    """What a backend needs to know to accept or refuse a call."""

    x: Tensor  # (B, ...): the clean inputs (device, dtype, shape)
    norm: str
    op: str = "step"  # or "random_start"


class EagerPGD:
    """The reference, out of place then copied back: any device and float dtype, L-inf and L2."""

    name = "eager"

    def not_supported_reasons(self, p: PGDProblem) -> list[str]:
        return []

    def step(self, x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi, norm) -> None:
        x_adv.copy_(reference.pgd_step(x_adv, grad, x, eps if eps_t is None else eps_t,
                                       alpha if alpha_t is None else alpha_t, lo, hi, norm=norm))

    def random_start(self, out, x, eps_t, eps, seed, lo, hi, norm) -> None:
        out.copy_(reference.pgd_random_start(x, eps if eps_t is None else eps_t, seed, lo, hi,
                                             norm=norm))


_cache: dict[str, object] = {"eager": EagerPGD()}


def get_backend(name: str):
    if name not in _cache and torch.compiler.is_compiling():
        # Dynamo cannot trace an import or a C++ build: a backend is loaded on its first eager
        # use (Triton's with this module).
        return UnavailableBackend(name, f"the {name} PGD backend is loaded on first eager use, "
                                        "and this process had not used it before torch.compile "
                                        "traced this call")
    if name not in _cache:
        module, attr = _LOCATIONS[name].split(":")
        try:
            _cache[name] = getattr(importlib.import_module(module), attr)
        except Exception as exc:  # a missing compiler or extension disables only this backend
            _cache[name] = UnavailableBackend(name, f"{module} failed to import: {exc}")
    return _cache[name]


def select_backend(name: str, p: PGDProblem):
    """The backend object for ``p``, or ValueError saying why none (or the named one) can run."""
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(p)
        if reasons:
            raise ValueError(f"backend={name!r} cannot run this PGD call: " + "; ".join(reasons))
        return backend
    refused = []
    for candidate in AUTO_ORDER.get(p.x.device.type, ("eager",)):
        backend = get_backend(candidate)
        reasons = backend.not_supported_reasons(p)
        if not reasons:
            return backend
        refused.append(f"{candidate}: " + "; ".join(reasons))
    raise ValueError("no backend can run this PGD call:\n  " + "\n  ".join(refused))


def available_backends(x: Tensor, norm: str = "linf", op: str = "step") -> dict[str, list[str]]:
    """Every PGD backend's refusal reasons for ``op`` ("step" or "random_start") on inputs
    like ``x`` (an empty list: it can run)."""
    p = PGDProblem(x, norm, op)
    return {n: get_backend(n).not_supported_reasons(p) for n in BACKEND_NAMES if n != "auto"}


# ---------------------------------------------------------------------------------------
# argument checks (shapes, dtypes, devices and Python numbers only: no device sync)


def check_budget(name: str, value, x: Tensor, *, allow_zero: bool):
    """A finite float (>= 0 or > 0), or a floating (B,) tensor on x's device, returned as
    (float, None) or (0.0, tensor (B,) in the compute dtype, contiguous). Tensor values are
    not read here (that would synchronise the device); ``attacks.PGD`` checks them once."""
    if isinstance(value, Tensor):
        v.check_tensor(name, value, floating=True)
        batch = x.shape[0] if x.dim() > 0 else 1
        if value.dim() != 1 or value.shape[0] != batch or x.dim() == 0:
            raise ValueError(f"{name} as a tensor must have shape ({batch},), one value per "
                             f"sample of x {tuple(x.shape)}; got {tuple(value.shape)}")
        v.check_same(name, value, "x", x, dtype=False)
        return 0.0, value.detach().to(reference.pgd_compute_dtype(x.dtype)).contiguous()
    return v.check_positive(name, value, allow_zero=allow_zero), None


def check_bounds(lo, hi) -> tuple[float, float]:
    for name, value in (("lo", lo), ("hi", hi)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    lo, hi = float(lo), float(hi)
    if not lo < hi:
        raise ValueError(f"lo must be < hi, got lo={lo}, hi={hi}")
    return lo, hi


def _check_like(name: str, t, x_name: str, x: Tensor) -> None:
    v.check_tensor(name, t, floating=True)
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {x_name} has {tuple(x.shape)}; "
                         "they must match")
    v.check_same(name, t, x_name, x)


def _check_writable(name: str, t: Tensor) -> None:
    """An output written in place must not have elements sharing memory (stride 0, expand).
    Under torch.compile only the strides are read (the memory check does not trace)."""
    stride0 = any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride()))
    if stride0 or (not torch.compiler.is_compiling()
                   and torch._debug_has_internal_overlap(t) == 1):
        raise ValueError(f"{name} has elements that share memory (stride {tuple(t.stride())}, "
                         f"e.g. an expand()ed tensor), so it cannot be written in place; pass "
                         f"{name}.clone() or a fresh tensor")


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether a and b may share memory: the same storage and intersecting address ranges."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:
        start = t.storage_offset()
        last = start + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return start * t.element_size(), (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _unaliased(t: Tensor, out: Tensor) -> Tensor:
    """t, or a copy of it when it may share memory with the output written in place (not
    under torch.compile, whose functionalisation sees the aliasing itself)."""
    if torch.compiler.is_compiling():
        return t
    return t.clone() if _may_overlap(t, out) else t


# ---------------------------------------------------------------------------------------
# memory layout: the fused kernels see flat memory


def _sample_major_dense(t: Tensor) -> bool:
    """Dense with the batch outermost (contiguous, or channels_last for 4-D / 5-D)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _like(t: Tensor, layout: Tensor) -> Tensor:
    """t with layout's strides (a copy only when they differ)."""
    if t.stride() == layout.stride():
        return t
    return torch.empty_like(layout).copy_(t)


# ---------------------------------------------------------------------------------------
# public functions


def pgd_step(
    x_adv: Tensor,  # (B, ...), updated in place
    grad: Tensor,  # (B, ...): d loss / d x_adv
    x: Tensor,  # (B, ...): the clean inputs, the centre of the eps-ball
    eps,  # float >= 0 or (B,) tensor
    alpha,  # float > 0 or (B,) tensor
    lo: float = 0.0,
    hi: float = 1.0,
    *,
    norm: str = "linf",
    backend: str = "auto",
) -> Tensor:
    """One PGD ascent step, in place on ``x_adv``, in one pass; returns ``x_adv``.

    L-inf (default): ``x_adv <- clamp(min(max(x_adv + alpha sign(grad), x - eps), x + eps), lo, hi)``
    with ``sign(0) = sign(NaN) = 0``. L2 (``norm="l2"``, triton and eager): a step of length alpha
    along grad / ||grad||, then projection onto the eps-ball around x and the box (see
    ``reference.pgd_step``). Arithmetic in float32 for float16 / bfloat16 inputs, rounded once
    at the store: every backend gives the reference's bits (L-inf; the L2 norms are sums whose
    order differs between backends).

    Args:
        x_adv, grad, x: same shape, device and dtype (float16, bfloat16, float32, float64).
            x_adv is written under ``torch.no_grad()``; pass a tensor that is not part of a graph.
            x_adv must not have elements sharing memory (stride 0); grad or x may share memory
            with x_adv (they are then read from a copy).
        eps, alpha: floats, or (B,) per-sample tensors on x's device. A tensor's values are not
            checked (that would synchronise the device).
        lo, hi: the valid input range, lo < hi.
        norm: "linf" or "l2".
        backend: "auto", "triton", "cuda", "cpu" or "eager" (module docstring).
    """
    v.check_tensor("x", x, floating=True)
    _check_like("x_adv", x_adv, "x", x)
    _check_like("grad", grad, "x", x)
    eps_f, eps_t = check_budget("eps", eps, x, allow_zero=True)
    alpha_f, alpha_t = check_budget("alpha", alpha, x, allow_zero=False)
    lo, hi = check_bounds(lo, hi)
    v.check_choice("norm", norm, NORMS)
    v.check_choice("backend", backend, BACKEND_NAMES)
    if norm == "l2" and x.dim() == 0:
        raise ValueError("norm='l2' needs a batch dimension: x must be (B, ...)")
    _check_writable("x_adv", x_adv)
    impl = select_backend(backend, PGDProblem(x, norm))
    with torch.no_grad():
        # An input sharing memory with x_adv (x_adv = buf[1:], x = buf[:-1]) is read from a
        # copy, so the in-place kernels never read an element they have already written.
        grad, x = _unaliased(grad, x_adv), _unaliased(x, x_adv)
        if impl.name == "eager" or x_adv.numel() == 0:
            impl.step(x_adv, grad, x, eps_t, alpha_t, eps_f, alpha_f, lo, hi, norm)
            return x_adv
        # The kernels read the three tensors as flat memory of one dense, batch-outer layout.
        work = x_adv if _sample_major_dense(x_adv) else x_adv.contiguous()
        impl.step(work, _like(grad, work), _like(x, work), eps_t, alpha_t, eps_f, alpha_f,
                  lo, hi, norm)
        if work is not x_adv:
            x_adv.copy_(work)
    return x_adv


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed in [0, 2^63) from ``generator`` (default: torch's global CPU generator).
    A CUDA generator costs one device synchronisation."""
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(0, 2 ** 63 - 1, (1,), generator=generator, device=device).item())


def pgd_random_start(
    x: Tensor,  # (B, ...)
    eps,  # float >= 0 or (B,) tensor
    lo: float = 0.0,
    hi: float = 1.0,
    *,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """A random point of the eps-ball around x, clamped to [lo, hi], in one pass.

    L-inf: ``clamp(x + eps (2u - 1), lo, hi)`` with u uniform in [0, 1) (24 random bits per
    element from Philox4x32-10, element i of x in row-major order is counter i), the same
    bits on every backend. L2 (eager backend only): uniform in the ball, a Gaussian direction
    scaled to radius ``eps r^(1/d)``, r ~ U[0, 1), d the elements per sample (torchattacks'
    PGDL2 takes radius ``eps r``, which crowds the centre).

    Args:
        x: clean inputs, float16, bfloat16, float32 or float64.
        eps: float or (B,) tensor.
        generator: where the 64-bit seed is drawn (default torch's global CPU generator, so
            ``torch.manual_seed`` makes it reproducible). Ignored when ``seed`` is given.
        seed: an int in [0, 2^63) to use instead of drawing one.
        out: (B, ...) tensor like x to write into (default: a new tensor like x); no
            elements sharing memory (stride 0). It may share memory with x.
    Returns:
        ``out`` (or the new tensor).
    """
    v.check_tensor("x", x, floating=True)
    eps_f, eps_t = check_budget("eps", eps, x, allow_zero=True)
    lo, hi = check_bounds(lo, hi)
    v.check_choice("norm", norm, NORMS)
    v.check_choice("backend", backend, BACKEND_NAMES)
    if norm == "l2" and x.dim() == 0:
        raise ValueError("norm='l2' needs a batch dimension: x must be (B, ...)")
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_like("out", out, "x", x)
        _check_writable("out", out)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if seed is None:
        seed = draw_seed(generator)
    else:
        seed = v.check_int("seed", seed, minimum=0)
        if seed >= 2 ** 63:
            raise ValueError(f"seed must be < 2^63, got {seed}")
    impl = select_backend(backend, PGDProblem(x, norm, "random_start"))
    with torch.no_grad():
        # Counters follow the row-major index. The Triton kernel maps channels_last offsets
        # to it itself; the other kernels see contiguous memory. x is read from a copy when it
        # shares memory with out.
        xc = _unaliased(x, out)
        if impl.name == "triton" and _sample_major_dense(xc) and out.stride() == xc.stride():
            impl.random_start(out, xc, eps_t, eps_f, seed, lo, hi, norm)
            return out
        xc = xc.contiguous()
        work = out if out.is_contiguous() else torch.empty_like(xc)
        impl.random_start(work, xc, eps_t, eps_f, seed, lo, hi, norm)
        if work is not out:
            out.copy_(work)
    return out


get_backend("triton")  # cheap (triton is imported with the loss backends): found under torch.compile
