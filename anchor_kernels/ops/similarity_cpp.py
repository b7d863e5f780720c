"""The "cpu" and "cuda" backends of ``pairwise_similarity``: the C++ extension's ops
``anchor_kernels::similarity_fwd`` / ``similarity_bwd`` (``csrc/similarity.cpp``,
``csrc/cuda/similarity*``) with their fake kernels and autograd registered here.

Schemas (declared once, in ``csrc/similarity.cpp``; the dispatcher picks the CPU or CUDA kernel)::

    similarity_fwd(a (M, D), b (N, D), normalize, temperature) -> S (M, N) in a's dtype
    similarity_bwd(grad (M, N), a, b, normalize, temperature) -> da (M, D), db (N, D)

The ops take the raw rows: both scale rows whose squares could overflow themselves, and the
backward recomputes the rows' norms (O((M + N) D)) rather than keeping them from the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from .._autograd import call, eager_function, refuse_double_backward

LOAD_ERROR = _ext.load()


def _fwd_fake(a, b, normalize, temperature):
    return a.new_empty((a.shape[0], b.shape[0]))


def _bwd_fake(grad, a, b, normalize, temperature):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    a, b, normalize, temperature = inputs
    ctx.save_for_backward(a, b)
    ctx.normalize, ctx.temperature = normalize, temperature


def _backward(ctx, grad_s):
    a, b = ctx.saved_tensors
    da, db = torch.ops.anchor_kernels.similarity_bwd(grad_s, a, b, ctx.normalize, ctx.temperature)
    da, db = refuse_double_backward(a.device.type, (da, db), (grad_s, a, b))
    return da, db, None, None  # a, b, normalize, temperature


if LOAD_ERROR is None:
    torch.library.register_fake("anchor_kernels::similarity_fwd")(_fwd_fake)
    torch.library.register_fake("anchor_kernels::similarity_bwd")(_bwd_fake)
    torch.library.register_autograd("anchor_kernels::similarity_fwd", _backward,
                                    setup_context=_setup_context)
    SimilarityCpp = eager_function("SimilarityCpp", torch.ops.anchor_kernels.similarity_fwd,
                                   _setup_context, _backward, 4)


class CppSimilarity:
    """The extension's kernels on one device type (tiled; no normalised copies)."""

    def __init__(self, name: str, device_type: str, dtypes: tuple[torch.dtype, ...]):
        self.name, self.device_type, self.dtypes = name, device_type, dtypes

    def not_supported_reasons(self, a: Tensor, b: Tensor) -> list[str]:
        reasons = []
        error = LOAD_ERROR if self.device_type == "cpu" else _ext.cuda_error()
        if error is not None:
            reasons.append(error)
        if a.device.type != self.device_type:
            reasons.append(f"the {self.name} backend runs {self.device_type} tensors; "
                           f"a is on {a.device}")
        if a.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {a.dtype} is not supported by the {self.name} kernels ({names})")
        return reasons

    def __call__(self, a: Tensor, b: Tensor, normalize: bool, temperature: float) -> Tensor:
        return call(SimilarityCpp, torch.ops.anchor_kernels.similarity_fwd, a, b, normalize,
                    temperature)


CPU_BACKEND = CppSimilarity("cpu", "cpu",
                            (torch.float16, torch.bfloat16, torch.float32, torch.float64))
CUDA_BACKEND = CppSimilarity("cuda", "cuda", (torch.float16, torch.bfloat16, torch.float32))
