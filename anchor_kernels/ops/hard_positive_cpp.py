"""The "cpu" and "cuda" backends of ``hard_positive_mining``: the C++ extension's op
``anchor_kernels::hard_positive`` (``csrc/hard_positive.cpp``, ``csrc/cuda/hard_positive*``)
with its fake kernel registered here. Selection only: ``anchor_kernels.hard_positive``
attaches the gradient of the cosines.

Schema (declared once, in ``csrc/hard_positive.cpp``; the dispatcher picks the CPU or CUDA kernel)::

    hard_positive(z (M, D), labels (M,), c (N, D), c_labels (N,), k, normalize, anchor_offset?)
        -> indices (M, k) int64 (-1 padded), cosines (M, k) float32 (float64 for float64; +inf padded)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext

LOAD_ERROR = _ext.load()
# The CUDA kernel keeps each anchor's list in a scratch row and sorts it at the end by
# insertion (O(k^2) per anchor): made for the small k of hard-positive mining.
MAX_CUDA_K = 256


def _fake(z, labels, c, c_labels, k, normalize, anchor_offset):
    m = z.shape[0]
    return (z.new_empty((m, k), dtype=torch.int64),
            z.new_empty((m, k), dtype=torch.promote_types(z.dtype, torch.float32)))


if LOAD_ERROR is None:
    torch.library.register_fake("anchor_kernels::hard_positive")(_fake)


class CppHardPositive:
    """The extension's streaming selection on one device type (O(M k) extra memory)."""

    def __init__(self, name: str, device_type: str, dtypes: tuple[torch.dtype, ...]):
        self.name, self.device_type, self.dtypes = name, device_type, dtypes

    def not_supported_reasons(self, z: Tensor, c: Tensor, k: int) -> list[str]:
        reasons = []
        error = LOAD_ERROR if self.device_type == "cpu" else _ext.cuda_error()
        if error is not None:
            reasons.append(error)
        if z.device.type != self.device_type:
            reasons.append(f"the {self.name} backend runs {self.device_type} tensors; "
                           f"z is on {z.device}")
        if z.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {z.dtype} is not supported by the {self.name} kernels ({names})")
        if self.device_type == "cuda" and min(k, c.shape[0]) > MAX_CUDA_K:
            reasons.append(f"k={k} is above the CUDA kernel's limit of {MAX_CUDA_K}")
        return reasons

    def __call__(self, z: Tensor, labels: Tensor, c: Tensor, c_labels: Tensor, k: int,
                 normalize: bool, anchor_offset: int | None) -> tuple[Tensor, Tensor]:
        return torch.ops.anchor_kernels.hard_positive(z, labels, c, c_labels, k, normalize,
                                                      anchor_offset)


CPU_BACKEND = CppHardPositive("cpu", "cpu",
                              (torch.float16, torch.bfloat16, torch.float32, torch.float64))
CUDA_BACKEND = CppHardPositive("cuda", "cuda", (torch.float16, torch.bfloat16, torch.float32))
