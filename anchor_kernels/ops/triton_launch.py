"""Launch plans for Triton kernels, and compiling a plan for a GPU that is not present.

A launcher builds a :class:`Launch` (kernel, grid, runtime arguments, constexprs, warps,
stages) and runs it. Because the plan is a value, CI can also hand the very plans the
launchers choose to ``python -m anchor_kernels.ops.sm90_check`` (through
:func:`sm90_compile_specs`), which compiles them for Hopper (sm_90) with no GPU. That
catches kernels the interpreter accepts but the compiler rejects.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch


def interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reasons(tensors, name: str = "the Triton kernels") -> list[str]:
    """Why these tensors cannot run Triton kernels here (empty list: they can)."""
    reasons = []
    dev = tensors[0].device
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        reasons.append(f"inputs are on {dev.type}; {name} need a CUDA device "
                       "(or TRITON_INTERPRET=1 for CPU tensors)")
    for t in tensors:
        if t.dtype == torch.float64:
            reasons.append(f"{name} do not support float64 (use backend='cpu' or 'eager')")
            break
    if dev.type == "cuda" and any(t.dtype == torch.bfloat16 for t in tensors):
        if torch.cuda.get_device_capability(dev) < (8, 0):
            reasons.append("bfloat16 needs compute capability >= 8.0")
    return reasons


def cdiv(a: int, b: int) -> int:
    """Ceiling division (``triton.cdiv`` is a jit function: costly to call from Python)."""
    return -(-a // b)


def device_guard(x: torch.Tensor):
    """Make x's GPU current: Triton launches on the current device, not the tensors'."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Whether dot operands must be widened to float32 before ``tl.dot``.

    Triton 3.9's interpreter multiplies bfloat16 ``tl.dot`` operands as their raw uint16
    bits. Widening to float32 first gives the same products (a bf16 product is exact in
    float32), so kernels do it under the interpreter only; compiled kernels never do.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for float32 inputs, following torch's matmul setting.

    ``torch.set_float32_matmul_precision("highest")`` (torch's default) gives exact float32
    products ("ieee"), as ``torch.matmul`` does; "high"/"medium" allow TF32, as torch does.
    Half-precision inputs always multiply exactly with float32 accumulation.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=, num_stages=)``."""

    kernel: object
    grid: tuple
    args: tuple  # runtime arguments in kernel order (constexprs come last in every kernel)
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __call__(self) -> None:
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                                   num_stages=self.num_stages)


_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


def _specialize(arg, param) -> tuple[str, object, str]:
    """(signature type, constexpr value or None, "D" if divisible by 16 else "") of one
    runtime argument, as the Triton runtime derives it: Triton's own C++ routine where this
    Triton has it (3.5 and newer), else the same rules in Python (pointer element types,
    16-byte aligned pointers and ints divisible by 16 marked "D"; ints equal to 1 become
    constexprs unless do_not_specialize; i32 or i64 by range; Python floats are fp32)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        kind, key = native_specialize_impl(CUDABackend, arg, False, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)[:2]
        if kind == "constexpr":
            return kind, key, ""
        return kind, None, key if key == "D" else ""
    except (ImportError, TypeError):
        pass
    align = not param.do_not_specialize_on_alignment
    if isinstance(arg, torch.Tensor):
        return "*" + _POINTER_TYPES[arg.dtype], None, "D" if align and arg.data_ptr() % 16 == 0 else ""
    if isinstance(arg, bool):
        return "i1", None, ""
    if isinstance(arg, int):
        if arg == 1 and not param.do_not_specialize:
            return "constexpr", 1, ""
        kind = "i32" if -2**31 <= arg < 2**31 else "i64"
        return kind, None, "D" if align and not param.do_not_specialize and arg % 16 == 0 else ""
    if isinstance(arg, float):
        return "fp32", None, ""
    raise TypeError(f"cannot specialise argument {param.name} of type {type(arg).__name__}")


def sm90_compile_specs(launches):
    """``(kernel, signature, constexprs, num_warps, num_stages)`` for each distinct
    configuration among ``launches``, for ``anchor_kernels.ops.sm90_check``.

    The signature is what the Triton runtime derives from the launch's actual arguments
    (tensor element types, ints equal to 1 become constexprs), so the compiled variants are
    the ones the launchers run.
    """
    import triton

    seen = set()
    for launch in launches:
        kernel = launch.kernel
        if not isinstance(kernel, triton.runtime.jit.JITFunction):
            raise RuntimeError("compiling needs real triton.jit kernels; unset TRITON_INTERPRET")
        runtime = [p for p in kernel.params if not p.is_constexpr]
        if len(runtime) != len(launch.args):
            raise ValueError(f"{kernel.__name__} takes {len(runtime)} runtime arguments, "
                             f"the launch has {len(launch.args)}")
        signature, constexprs, attrs = {}, dict(launch.constexprs), {}
        for p, arg in zip(runtime, launch.args):
            kind, value, attr = _specialize(arg, p)
            signature[p.name] = kind
            if kind == "constexpr":
                constexprs[p.name] = value
            elif attr:
                attrs[p.name] = attr
        for p in kernel.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
        key = (kernel.__name__, tuple(signature.items()), repr(sorted(constexprs.items())),
               tuple(sorted(attrs.items())), launch.num_warps, launch.num_stages)
        if key not in seen:
            seen.add(key)
            # ATTRS: the divisibility the runtime would see (sm90_check passes it on)
            yield kernel, signature, dict(constexprs, ATTRS=attrs), launch.num_warps, launch.num_stages
