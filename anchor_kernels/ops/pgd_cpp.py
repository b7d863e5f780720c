"""The "cpu" and "cuda" backends of the PGD step and random start: the C++ extension's
``anchor_kernels::pgd_step`` / ``anchor_kernels::pgd_random_start`` ops (csrc/pgd.cpp,
csrc/cuda/pgd_kernels.cu), dispatched on the tensors' device, with fake kernels registered
here so that they trace under ``torch.compile``.

The extension is built on first use (``anchor_kernels._ext``); when it cannot be, the
backends report why instead of failing at import.
"""

from __future__ import annotations

import torch

from .. import _ext

CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_registered: dict[str, bool] = {}


def _register_fakes() -> None:
    """Mutating ops that return nothing: the fake kernels only have to accept the call."""
    if _registered.get("fakes"):
        return

    @torch.library.register_fake("anchor_kernels::pgd_step")
    def _(x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi) -> None:
        return None

    @torch.library.register_fake("anchor_kernels::pgd_random_start")
    def _(out, x, eps_t, eps, seed, lo, hi) -> None:
        return None

    _registered["fakes"] = True


_load_errors: dict[str, str | None] = {}


def load_error(device_type: str) -> str | None:
    """None when the C++ PGD ops run on ``device_type`` tensors, else why not. Found once,
    eagerly; later calls (also under torch.compile) read the answer."""
    if device_type not in _load_errors:
        err = _ext.load() if device_type == "cpu" else _ext.cuda_error()
        if err is None and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "anchor_kernels::pgd_step", device_type.upper()):
            err = f"the C++ extension was built without the {device_type} PGD kernels"
        if err is None:
            _register_fakes()
        _load_errors[device_type] = err
    return _load_errors[device_type]


class CppPGD:
    """The C++ kernels of one device type: "cpu" (any float dtype) or "cuda"."""

    def __init__(self, device_type: str):
        self.name = device_type

    def not_supported_reasons(self, p) -> list[str]:
        reasons = []
        if p.x.device.type != self.name:
            reasons.append(f"tensors are on {p.x.device.type}; the {self.name} backend needs "
                           f"{self.name} tensors")
        if p.x.dtype not in CPU_DTYPES:
            reasons.append(f"dtype {p.x.dtype} is not supported")
        if p.norm != "linf":
            reasons.append(f"norm={p.norm!r} is not implemented in the C++ kernels (only 'linf')")
        if not reasons:
            err = load_error(self.name)
            if err is not None:
                reasons.append(err)
        return reasons

    def step(self, x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi, norm) -> None:
        torch.ops.anchor_kernels.pgd_step(x_adv, grad, x, eps_t, alpha_t, eps, alpha, lo, hi)

    def random_start(self, out, x, eps_t, eps, seed, lo, hi, norm) -> None:
        torch.ops.anchor_kernels.pgd_random_start(out, x, eps_t, eps, seed, lo, hi)


CPU_BACKEND = CppPGD("cpu")
CUDA_BACKEND = CppPGD("cuda")
