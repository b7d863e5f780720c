"""Argument checks shared by every public entry point.

Checks read only shapes, dtypes and devices (never tensor values), so they cost no device
synchronisation and trace under ``torch.compile(fullgraph=True)``. Values are not checked:
NaN or inf in the features propagate to the loss (documented in ``supcon_loss``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim=None, floating: bool = False, integer: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer class labels (e.g. torch.int64), got {x.dtype}")
    return x


def check_same(name: str, x: Tensor, ref_name: str, ref: Tensor, *, dtype: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; "
                         "move them to the same device")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    # type() first: the numbers.Real check goes through ABC machinery, slow on every call
    if type(value) not in (float, int) and (isinstance(value, bool)
                                            or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


# Unsigned integer dtypes past uint8 have few kernels in torch (no searchsorted, sort or
# unique on some devices): refused up front rather than deep inside a backend.
_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def check_labels(name: str, labels, n: int, like: Tensor, what: str) -> Tensor:
    check_tensor(name, labels, integer=True)
    if labels.dtype in _UNSIGNED:
        raise TypeError(f"{name} must have a signed integer dtype or uint8 (e.g. torch.int64), "
                        f"got {labels.dtype}; convert with {name}.long()")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match {what}, got {tuple(labels.shape)}")
    check_same(name, labels, "features", like, dtype=False)
    return labels
