"""What each timed pass runs, given a candidate's forward callable."""

from __future__ import annotations

from typing import Callable

import torch


def grad_like(out: torch.Tensor) -> torch.Tensor | None:
    """The output gradient: None (an implicit 1) for a scalar loss, fixed noise otherwise."""
    if out.numel() == 1:
        return None
    return torch.randn_like(out)


def make_pass(forward: Callable[[], torch.Tensor], pass_: str, grad_out):
    """(run, setup) of one pass: time ``run()``, or ``run(setup())`` with ``setup`` untimed.

    ``bwd`` times the backward of a fresh, untimed forward each repetition; replaying one
    graph with ``retain_graph=True`` would be refused by compiled graphs that donate their
    saved buffers to the backward.
    """
    if pass_ == "fwd":
        return forward, None
    if pass_ == "fwd+bwd":
        return (lambda: forward().backward(grad_out)), None
    if pass_ == "bwd":
        return (lambda out: out.backward(grad_out)), forward
    raise ValueError(f"unknown pass {pass_!r}")
