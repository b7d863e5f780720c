"""Figures of one compiled kernel from its SASS (``nvdisasm`` output) and resource usage.

The hot loop is found from the control flow alone. Every backward branch (a ``BRA`` whose
target lies at or before it; a branch to itself, the trap that closes every function, is
no loop) closes a loop spanning the addresses from its target to the branch; branches back
to the same target are one loop, extending to the furthest of them. The hot loop is

- the smallest loop (fewest instructions) that holds a matrix-multiply instruction
  (``HGMMA``/``HMMA``): the innermost loop around the tensor-core work. With nested loops it
  is the inner one; of two sibling loops (a peeled or stage-split loop), the leaner one,
  which is the one that runs for most tiles;
- without any, the largest innermost loop (one holding no other loop): FMA kernels.

Its figures are static: an instruction on a path the loop skips at run time still counts,
so figures for loops with branches inside are upper bounds.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

MMA_OPCODES = ("HGMMA", "HMMA")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"`\((\.L\w+)\)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: address, opcode with modifiers (``HGMMA.64x64x16.F32.BF16``),
    and the branch target's address for branches to a label."""

    addr: int
    opcode: str
    target: int | None = None


@dataclass(frozen=True)
class Loop:
    """Instructions from ``start`` to ``end`` (addresses, inclusive), closed by a backward
    branch at ``end``."""

    start: int
    end: int
    instrs: tuple = field(repr=False)

    def contains(self, other: "Loop") -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end


def parse_sass(text: str) -> list[Instr]:
    """The instructions of nvdisasm's output, in address order, with branch targets
    resolved from the labels."""
    raw, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label[1])
            continue
        match = _INSTR.match(line)
        if not match:
            continue
        addr, body = int(match[1], 16), _PRED.sub("", match[2])
        for name in pending:
            labels[name] = addr
        pending = []
        target = _TARGET.search(body)
        raw.append((addr, body.split()[0], target[1] if target else None))
    return [Instr(addr, opcode, labels.get(target) if target else None)
            for addr, opcode, target in raw]


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """The loops closed by backward branches, ordered by start address."""
    ends = {}
    for ins in instrs:
        if ins.opcode.startswith("BRA") and ins.target is not None and ins.target < ins.addr:
            ends[ins.target] = max(ends.get(ins.target, ins.addr), ins.addr)
    return [Loop(start, end, tuple(i for i in instrs if start <= i.addr <= end))
            for start, end in sorted(ends.items())]


def is_mma(opcode: str) -> bool:
    return opcode.split(".")[0] in MMA_OPCODES


def hot_loop(loops: list[Loop]) -> Loop | None:
    """The loop the module docstring defines as hot, or None for straight-line code."""
    with_mma = [loop for loop in loops if any(is_mma(i.opcode) for i in loop.instrs)]
    if with_mma:
        return min(with_mma, key=lambda loop: len(loop.instrs))
    innermost = [loop for loop in loops if not any(loop.contains(o) for o in loops)]
    return max(innermost, key=lambda loop: len(loop.instrs), default=None)


def count(instrs, *names: str) -> int:
    """How many instructions are one of ``names``, with any modifiers: "LDL" counts
    ``LDL`` and ``LDL.LU``, "MUFU.EX2" counts ``MUFU.EX2`` only."""
    return sum(1 for i in instrs if any(i.opcode == n or i.opcode.startswith(n + ".")
                                        for n in names))


def analyse(sass: str, num_warps: int, tile: tuple[int, int] | None) -> dict:
    """Every SASS figure of one kernel: local-memory traffic (spills), MMA shapes and, for
    the hot loop, instruction, MMA and ``MUFU.EX2`` counts; with ``tile`` (the logits one
    loop iteration covers), thread-instructions and exponentials per logit."""
    instrs = parse_sass(sass)
    if not instrs:
        raise ValueError("no SASS instructions found in the disassembly")
    loops = find_loops(instrs)
    loop = hot_loop(loops)
    body = loop.instrs if loop else ()
    figures = {
        "instructions": len(instrs),
        "local_loads": count(instrs, "LDL"),
        "local_stores": count(instrs, "STL"),
        "mma_shapes": sorted({i.opcode for i in instrs if is_mma(i.opcode)}),
        "loops": [{"start": l.start, "end": l.end, "instructions": len(l.instrs)} for l in loops],
        "loop": {"start": loop.start, "end": loop.end} if loop else None,
        "loop_instructions": len(body),
        "loop_local_loads": count(body, "LDL"),
        "loop_local_stores": count(body, "STL"),
        "loop_mma": count(body, *MMA_OPCODES),
        "loop_ex2": count(body, "MUFU.EX2"),
        "instr_per_logit": None,
        "ex2_per_logit": None,
        # the loop's mix, by opcode without modifiers: where its instructions go
        "loop_opcodes": dict(Counter(i.opcode.split(".")[0] for i in body).most_common()),
    }
    if loop and tile:
        threads_per_logit = 32 * num_warps / (tile[0] * tile[1])
        figures["instr_per_logit"] = len(body) * threads_per_logit
        figures["ex2_per_logit"] = figures["loop_ex2"] * threads_per_logit
    return figures


def resources(cuobjdump_out: str) -> dict:
    """Registers, stack frame, static shared and local memory (bytes) from
    ``cuobjdump --dump-resource-usage``."""
    match = _RESOURCES.search(cuobjdump_out)
    if not match:
        raise ValueError("no resource usage line in cuobjdump's output")
    return dict(zip(("registers", "stack", "static_smem", "local"), map(int, match.groups())))


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary shipped with Triton (``cuobjdump``, ``nvdisasm``)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}; this Triton does not ship it")
    return path


def cubin_report(cubin: bytes, num_warps: int, tile: tuple[int, int] | None) -> dict:
    """:func:`resources` and :func:`analyse` of a cubin, with the tools Triton ships."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _run([nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name])
        sass = _run([nvidia_tool("nvdisasm"), "-c", f.name])
    return {**resources(usage), **analyse(sass, num_warps, tile)}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {proc.stderr.strip()}")
    return proc.stdout
