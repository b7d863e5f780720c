"""The fused backends' backwards are hand-written kernels with no backward of their own: a
second differentiation (``create_graph=True``, then backward of the gradient) is refused with
one error, the same words on every backend, instead of a silently wrong (constant) result."""

from __future__ import annotations

import torch
from torch import Tensor


def plain_eager(t: Tensor) -> bool:
    """Whether a fused op may skip the dispatcher and call its implementation itself: in plain
    eager mode (no tracing, no dispatch mode, no tensor subclass), where the registered op
    would only dispatch to that same function (about 25 us a call on a 2-core CPU host, more
    with an autograd kernel registered on the op). Under torch.compile, fake tensors,
    functorch (wrapped tensors, or any transform active) or a TorchDispatchMode the registered
    op is called."""
    return (type(t) is Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and not torch._C._are_functorch_transforms_active())


def eager_function(name: str, op, setup_context, backward, n_inputs: int):
    """The plain eager path of an op whose autograd is registered with
    ``torch.library.register_autograd(op, backward, setup_context=...)``: an
    ``autograd.Function`` with the same forward, saved state and backward that calls the op
    below the autograd keys, at about half the host cost (benchmarks/bench_dispatch.py). The
    registered autograd still serves torch.compile, opcheck and functorch; ``call`` picks."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                output = op(*inputs)
            setup_context(ctx, inputs, output)
            ctx.set_materialize_grads(False)
            return output

        @staticmethod
        def backward(ctx, grad, *grads):
            if grad is None:  # the first output unused: no zero gradient is materialised
                return (None,) * n_inputs
            return backward(ctx, grad, *grads)

    Function.__name__ = Function.__qualname__ = name
    return Function


def _base_apply(function, *inputs):
    """``function.apply(*inputs)`` without the Python prologue of ``autograd.Function.apply``:
    a walk over the arguments that unwraps functorch's dead wrappers, which plain eager inputs
    are not (about 5 us a call on a 2-core CPU host). For plain eager inputs only: tracing and
    functorch recognise ``function.apply`` itself."""
    return super(torch.autograd.Function, function).apply(*inputs)


def apply(function, *inputs):
    """``function.apply(*inputs)``, through ``_base_apply`` in plain eager mode."""
    return _base_apply(function, *inputs) if plain_eager(inputs[0]) else function.apply(*inputs)


def direct_or_op(impl, op, *inputs):
    """``impl(*inputs)`` in plain eager mode, else the registered ``op``, which would only
    dispatch to ``impl`` there (tens of us a call) but is what tracing and dispatch modes need."""
    return impl(*inputs) if plain_eager(inputs[0]) else op(*inputs)


def call(function, op, *inputs):
    """``function`` applied (``_base_apply``) in plain eager mode, else the registered ``op``."""
    return _base_apply(function, *inputs) if plain_eager(inputs[0]) else op(*inputs)


def double_backward_error(backend: str) -> RuntimeError:
    return RuntimeError(f"anchor_kernels: double backward (create_graph=True) is not supported "
                        f"by backend={backend!r}; use backend='eager'")


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on the first ``n`` tensors; its backward raises. The other tensors only tie it
    to the graph (the inputs a second backward would reach)."""

    @staticmethod
    def forward(ctx, backend: str, n: int, *tensors: Tensor):
        ctx.backend = backend
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise double_backward_error(ctx.backend)


def refuse_double_backward(backend: str, grads: tuple, inputs: tuple) -> tuple:
    """``grads`` (a kernel backward's results, None allowed) as they are, unless this backward
    runs with ``create_graph=True`` and ``inputs`` reach a graph: then they come back tied to a
    node that raises :func:`double_backward_error` if they are differentiated again."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    links = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    present = [i for i, g in enumerate(grads) if g is not None]
    if not links or not present:
        return grads
    outs = _RaiseOnBackward.apply(backend, len(present), *(grads[i] for i in present), *links)
    out = list(grads)
    for i, g in zip(present, outs):
        out[i] = g
    return tuple(out)
