"""Pieces every op's candidate list needs: the Triton-interpreter rule, ``torch.compile`` of a
reference function, and the flash-attention roofline neighbour."""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from ..records import Candidate, Problem, Settings, Work

INTERPRETER_REFUSAL = (
    "Triton would run under its interpreter (TRITON_INTERPRET=1 or no GPU): a debugging aid, "
    "not a backend to time; pass --include-interpreter to time it anyway (labelled so)")


def triton_is_interpreted(device: torch.device) -> bool:
    """Triton kernels on CPU tensors, or with TRITON_INTERPRET=1, run in the interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_label(name: str, device: torch.device, settings: Settings) -> tuple[str, str, list[str]]:
    """(label, kind, extra refusal reasons) of a Triton backend on this device."""
    if not triton_is_interpreted(device):
        return name, "backend", []
    if settings.include_interpreter:
        return f"{name}[interpreter]", "interpreter", []
    return name, "backend", [INTERPRETER_REFUSAL]


def backend_candidates(names, device: torch.device, settings: Settings, reasons_for: Callable,
                       build_for: Callable, note: str, differentiable: bool = True) -> list:
    """One candidate per library backend in ``names`` but "auto" and "eager" (the baseline):
    ``reasons_for(name)`` and ``build_for(name)`` give its ``reasons`` and ``build``; a Triton
    backend that would run in the interpreter is refused, or labelled so when asked for."""
    out = []
    for name in names:
        if name in ("auto", "eager"):
            continue
        label, kind, extra = name, "backend", []
        if name == "triton":
            label, kind, extra = triton_label(name, device, settings)
        reasons = reasons_for(name)
        out.append(Candidate(label, kind, build_for(name),
                             (lambda p, extra=extra, reasons=reasons: list(extra) or reasons(p)),
                             differentiable=differentiable, note=note.format(name=name)))
    return out


# One compiled callable per (function, settings): a new torch.compile wrapper of the same
# function would re-trace, and every size shares the dynamic-shape graph.
_COMPILED: dict = {}


def compiled(key, fn: Callable, settings: Settings) -> Callable:
    key = (key, settings.compile_dynamic, settings.compile_backend)
    if key not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        # Static shapes recompile per size; never let a recompile limit silently run eager.
        # (The limit's name changed across torch releases, hence the attribute checks.)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
            dynamo_config.fail_on_recompile_limit_hit = True
        _COMPILED[key] = torch.compile(fn, dynamic=settings.compile_dynamic,
                                       backend=settings.compile_backend)
    return _COMPILED[key]


def compile_note(settings: Settings) -> str:
    shapes = "dynamic=True: one graph for every size" if settings.compile_dynamic else \
        "dynamic=False: one graph per size"
    return f"torch.compile of the eager reference (backend={settings.compile_backend!r}, {shapes})"


def _attention_reasons(p: Problem) -> list[str]:
    reasons = []
    if p.device.type != "cuda":
        reasons.append("flash attention needs a CUDA device")
    if p.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash attention supports float16/bfloat16 only, not {p.dtype}")
    if p.d > 256:
        reasons.append(f"flash attention supports head dim <= 256, not {p.d}")
    return reasons


def _attention_build(p: Problem):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # q (1, 1, M, D), k and v (1, 1, N, D): one head over the op's shapes.
    q, k, v = (torch.randn(1, 1, rows, p.d, device=p.device, dtype=p.dtype, requires_grad=True)
               for rows in (p.m, p.n, p.n))

    def forward():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return forward, (q, k, v)


def _attention_work(p: Problem, pass_: str) -> Work:
    # FlashAttention's accounting: 2 matmuls forward (4 N^2 D), 2.5 times that backward.
    fwd = 4.0 * p.m * p.n * p.d
    return Work(flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_])


ATTENTION = Candidate(
    name="sdpa-flash", kind="neighbour", build=_attention_build, reasons=_attention_reasons,
    work=_attention_work,
    note="F.scaled_dot_product_attention, flash backend, q/k/v (1, 1, N, D): a roofline "
         "neighbour doing 2x the forward matmul work")
