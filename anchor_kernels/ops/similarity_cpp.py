"""The "cpu" and "cuda" backends of ``pairwise_similarity``: the C++ extension's ops
``anchor_kernels::similarity_fwd`` / ``similarity_bwd`` (``csrc/similarity.cpp``,
``csrc/cuda/similarity*``) with their fake kernels and autograd registered here.

Schemas (declared once, in ``csrc/similarity.cpp``; the dispatcher picks the CPU or CUDA kernel)::

    similarity_fwd(a (M, D), b (N, D), normalize, temperature)
        -> S (M, N) in a's dtype, n_a (M,), n_b (N,)   clamped norms, float32 (float64 for float64)
    similarity_bwd(grad (M, N), a, b, n_a, n_b, normalize, temperature) -> da (M, D), db (N, D)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from .._autograd import call, eager_function, refuse_double_backward

LOAD_ERROR = _ext.load()


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _fwd_fake(a, b, normalize, temperature):
    m, n = a.shape[0], b.shape[0]
    acc = _norm_dtype(a.dtype)
    return a.new_empty((m, n)), a.new_empty((m,), dtype=acc), a.new_empty((n,), dtype=acc)


def _bwd_fake(grad, a, b, na, nb, normalize, temperature):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    a, b, normalize, temperature = inputs
    _, na, nb = output
    ctx.mark_non_differentiable(na, nb)
    ctx.set_materialize_grads(False)  # the norms' gradients are never read: no zero tensors
    ctx.save_for_backward(a, b, na, nb)
    ctx.normalize, ctx.temperature = normalize, temperature


def _backward(ctx, grad_s, grad_na, grad_nb):
    a, b, na, nb = ctx.saved_tensors
    da, db = torch.ops.anchor_kernels.similarity_bwd(grad_s, a, b, na, nb, ctx.normalize,
                                                     ctx.temperature)
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
                    temperature)[0]


CPU_BACKEND = CppSimilarity("cpu", "cpu",
                            (torch.float16, torch.bfloat16, torch.float32, torch.float64))
CUDA_BACKEND = CppSimilarity("cuda", "cuda", (torch.float16, torch.bfloat16, torch.float32))
