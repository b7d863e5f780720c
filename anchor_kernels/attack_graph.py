"""CUDA-graph capture of a PGD attack's steps (``PGD(..., cuda_graph=True)``).

An attack of K steps launches some hundreds of small kernels per step (the model's forward
and input gradient, the loss, the update); replayed from a CUDA graph they cost one launch.
What is captured is everything after the random start, which runs eagerly before each
replay so that every call draws a fresh start from its generator.

A captured graph reads and writes fixed addresses, so each entry keeps static copies of its
inputs (the clean batch, the start, the labels, per-sample budgets), and is keyed by
everything that fixes the launches: shapes, dtypes, strides, scalar budgets, the autocast
state and the addresses of the model's parameters and buffers. An optimiser that updates
parameters in place (as every ``torch.optim`` optimiser does) is seen by the next replay;
a parameter replaced by a new tensor makes a new entry.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch
from torch import Tensor

MAX_GRAPHS = 4  # entries kept per attack; the oldest goes first


def warm_up(fn: Callable[[], Tensor], device: torch.device) -> Tensor:
    """One eager run of ``fn`` on a side stream, as capture requires (lazy initialisation,
    cuDNN and Triton autotuning happen here, not during capture). Its result is the call's
    result, so a first call runs the attack exactly once."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA inputs; x is on {device.type}")
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        out = fn()
    current.wait_stream(stream)
    # allocated on the side stream, used on this one: its memory must not be handed to the
    # side stream's next allocation (streams are pooled) before this stream is done with it
    out.record_stream(current)
    return out


def capture(fn: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
    """(replay, output): ``fn`` captured in a CUDA graph (not run), and the tensor that each
    replay writes the result into."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class CapturedSteps:
    """Captured graphs of one attack, by key (see the module's docstring)."""

    def __init__(self):
        self.entries: OrderedDict = OrderedDict()

    def run(self, key: Hashable, inputs: dict[str, Tensor],
            body: Callable[[dict[str, Tensor]], Tensor], first: Callable[[], Tensor]) -> Tensor:
        """``body(static)`` for these ``inputs``: replayed when ``key`` was captured before;
        otherwise ``first()`` runs eagerly (its result is returned) and ``body`` is captured
        reading static copies of ``inputs``."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            static, replay, out = entry
            for name, value in inputs.items():
                static[name].copy_(value)
            replay()
            return out.clone()  # the next replay overwrites out
        device = next(iter(inputs.values())).device
        result = warm_up(first, device)
        static = {name: value.clone() for name, value in inputs.items()}
        replay, out = capture(lambda: body(static))
        self.entries[key] = (static, replay, out)
        while len(self.entries) > MAX_GRAPHS:
            self.entries.popitem(last=False)
        return result

    def clear(self) -> None:
        self.entries.clear()


def state_key(model: torch.nn.Module) -> tuple:
    """Addresses of the model's parameters and buffers: what a captured forward reads."""
    return tuple(t.data_ptr() for t in model.parameters()) + tuple(
        t.data_ptr() for t in model.buffers())


def tensor_key(t) -> Hashable:
    """A budget or label argument as a key: floats by value, tensors by layout."""
    if isinstance(t, Tensor):
        return ("tensor", tuple(t.shape), t.dtype, t.stride(), t.device)
    return t
