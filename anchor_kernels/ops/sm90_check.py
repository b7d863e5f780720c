"""Compile every Triton kernel of the package for Hopper (sm_90) with no GPU and report its SASS.

``python -m anchor_kernels.ops.sm90_check`` prints one line per compiled variant: registers,
stack frame, shared memory (static + Triton's dynamic), local loads/stores (spills) in the
whole kernel and in the hot loop, the HGMMA shapes, and for the hot loop its instruction,
MMA and ``MUFU.EX2`` counts and the thread-instructions and exponentials per logit (the
hot loop's rule is in :mod:`anchor_kernels.ops.sass_report`). ``--json PATH`` writes every
figure; ``--module``/``--kernel`` keep a run short. It exits non-zero if a variant fails to
compile, a half-precision matmul kernel has no HGMMA in its SASS, any variant spills (local
loads or stores anywhere), or a variant exceeds its instructions-per-logit ceiling. It must
run without TRITON_INTERPRET, which turns kernels into Python functions.

Each listed module provides ``sm90_compile_specs()``, yielding ``(kernel, signature,
constexprs, num_warps, num_stages)`` for every variant its launchers can run, with the
signature the Triton runtime derives from real arguments (unit strides are constexprs).
``constexprs`` may also hold these keys, which the check removes before compiling:

- ``USES_DOT``: False for kernels without a matrix product (no HGMMA required);
- ``TILE``: the two constexpr names whose product is the logits one hot-loop iteration
  covers, e.g. ``("BLOCK_N", "BLOCK_M")`` for a kernel stepping over rows; None for a
  kernel without a per-logit loop (a reduction over D, a finishing pass). Default:
  ``("BLOCK_M", "BLOCK_N")`` when both exist and the kernel uses a dot, else None;
- ``MAX_INSTR_PER_LOGIT``: the ceiling on thread-instructions per logit of the hot loop
  (``hot-loop SASS instructions x 32 x num_warps / tile``); the variant fails above it, or
  without a per-logit figure;
- ``ATTRS``: Triton's specialisation of runtime arguments, ``{name: "D"}`` for a pointer
  or int divisible by 16, as the runtime derives it from a launch.
"""

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import re
import sys
import time

from anchor_kernels.ops import sass_report

MODULES = ["anchor_kernels.ops.supcon_triton", "anchor_kernels.ops.similarity_triton",
           "anchor_kernels.ops.hard_positive_triton", "anchor_kernels.ops.rows_triton"]
HALF = ("fp16", "bf16")


def compile_spec(kernel, signature, constexprs, num_warps, num_stages, attrs=None):
    """``triton.compile`` for sm_90; ``attrs`` maps argument names to Triton's
    specialisation strings ("D": divisible by 16)."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget

    attrs = {(kernel.arg_names.index(name),): BaseBackend.parse_attr(desc)
             for name, desc in (attrs or {}).items()}
    src = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def split_spec(constexprs: dict) -> tuple[dict, dict]:
    """(constexprs to compile, check options) from a spec's constexprs (module docstring)."""
    constexprs = dict(constexprs)
    uses_dot = constexprs.pop("USES_DOT", True)
    default = ("BLOCK_M", "BLOCK_N") if uses_dot and {"BLOCK_M", "BLOCK_N"} <= constexprs.keys() \
        else None
    options = {"uses_dot": uses_dot, "tile_names": constexprs.pop("TILE", default),
               "max_instr_per_logit": constexprs.pop("MAX_INSTR_PER_LOGIT", None),
               "attrs": constexprs.pop("ATTRS", {})}
    names = options["tile_names"]
    if names is not None and (len(names) != 2 or not set(names) <= constexprs.keys()):
        raise ValueError(f"TILE must name two constexprs of the spec, got {names!r}")
    return constexprs, options


def element_type(signature: dict) -> str:
    """The floating-point element type of the kernel's first float tensor argument."""
    return next((v[1:] for v in signature.values() if v in ("*fp16", "*bf16", "*fp32")), "-")


def check_variant(module, kernel, signature, constexprs, num_warps, num_stages) -> dict:
    """Compile one spec and return its row: the spec, every figure and its failures."""
    constexprs, options = split_spec(constexprs)
    tile = tuple(constexprs[n] for n in options["tile_names"]) if options["tile_names"] else None
    row = {"module": module, "kernel": kernel.__name__, "dtype": element_type(signature),
           "signature": {k: v for k, v in signature.items() if v != "constexpr"},
           "num_warps": num_warps, "num_stages": num_stages, "constexprs": constexprs,
           "attrs": options["attrs"], "uses_dot": options["uses_dot"], "tile": tile,
           "max_instr_per_logit": options["max_instr_per_logit"], "failures": []}
    start = time.perf_counter()
    try:
        compiled = compile_spec(kernel, signature, constexprs, num_warps, num_stages,
                                options["attrs"])
        row["dynamic_smem"] = compiled.metadata.shared
        row.update(sass_report.cubin_report(compiled.asm["cubin"], num_warps, tile))
    except Exception as exc:  # noqa: BLE001 - a failure is reported, the run goes on
        row["failures"].append(f"compile or disassembly failed: {str(exc).strip()[:500]}")
        return row
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    failures = row["failures"]
    if row["dtype"] in HALF and options["uses_dot"] \
            and not any(s.startswith("HGMMA") for s in row["mma_shapes"]):
        failures.append("half-precision matmul without HGMMA in the SASS")
    if row["local_loads"] or row["local_stores"]:
        failures.append(f"spills: {row['local_loads']} local loads, "
                        f"{row['local_stores']} local stores")
    ceiling = options["max_instr_per_logit"]
    if ceiling is not None:
        if row["instr_per_logit"] is None:
            failures.append("an instructions-per-logit ceiling but no per-logit hot loop")
        elif row["instr_per_logit"] > ceiling:
            failures.append(f"{row['instr_per_logit']:.1f} instructions per logit "
                            f"> ceiling {ceiling}")
    return row


def describe(row: dict) -> str:
    """The variant, as the table and failure lines name it."""
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in row["constexprs"].items()
                      if _is_block(k))
    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                     for k, v in row["constexprs"].items() if not _is_block(k))
    return (f"{row['kernel']} {row['dtype']} {blocks} w{row['num_warps']} "
            f"s{row['num_stages']} [{flags}]")


def _is_block(name: str) -> bool:
    """Block-size constexprs: BLOCK_M, BLOCK_D, BM, BK, ..."""
    return name.startswith("BLOCK_") or re.fullmatch(r"B[A-Z]", name) is not None


def format_row(row: dict) -> str:
    """One table line: resources, spills (kernel/loop), MMA shapes, hot-loop figures."""
    if "registers" not in row:
        return f"{describe(row)}  FAILED ({row['seconds']}s)"
    per = lambda v, digits=1: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    shapes = ",".join(row["mma_shapes"]) or "no-mma"
    loop = (f"loop={row['loop_instructions']} mma={row['loop_mma']} ex2={row['loop_ex2']} "
            f"instr/logit={per(row['instr_per_logit'])} ex2/logit={per(row['ex2_per_logit'], 2)}"
            if row["loop"] else "no-loop")
    return (f"{describe(row)}  regs={row['registers']} stack={row['stack']} "
            f"smem={row['static_smem']}+{row['dynamic_smem']} "
            f"ldl/stl={row['local_loads']}/{row['local_stores']} "
            f"in-loop={row['loop_local_loads']}/{row['loop_local_stores']} {shapes} {loop} "
            f"({row['seconds']}s)")


def module_name(name: str) -> str:
    """Full module name; short names (``supcon_triton``) live in ``anchor_kernels.ops``."""
    return name if "." in name else f"anchor_kernels.ops.{name}"


_SPECS: dict = {}


def specs_of(module: str) -> list:
    """The module's specs, generated once per process (in order, so an index names one)."""
    if module not in _SPECS:
        _SPECS[module] = list(importlib.import_module(module).sm90_compile_specs())
    return _SPECS[module]


def check_indexed(job: tuple[str, int]) -> dict:
    """:func:`check_variant` of spec ``index`` of ``module``: what a worker process runs,
    so that no kernel object has to be pickled."""
    module, index = job
    return check_variant(module, *specs_of(module)[index])


def run_checks(jobs: list[tuple[str, int]], processes: int):
    """The rows of ``jobs``, in order, compiled by ``processes`` worker processes."""
    if processes <= 1 or len(jobs) <= 1:
        yield from map(check_indexed, jobs)
        return
    # spawn, not fork: the parent has torch (and its thread pools) loaded
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        yield from pool.map(check_indexed, jobs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append",
                        help="only this module (repeatable; e.g. supcon_triton; default: all)")
    parser.add_argument("--kernel", action="append",
                        help="only kernels whose name contains this (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="write every figure of every variant")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: one per CPU)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    modules = [module_name(name) for name in args.module or MODULES]
    jobs = [(module, index) for module in modules for index, spec in enumerate(specs_of(module))
            if args.kernel is None or any(k in spec[0].__name__ for k in args.kernel)]
    rows = []
    for row in run_checks(jobs, args.jobs):
        rows.append(row)
        print(format_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if not rows:
        print("no kernel variant matches --module/--kernel", file=sys.stderr)
        return 2
    failures = [f"{describe(row)}: {failure}" for row in rows for failure in row["failures"]]
    print(f"compiled {len(rows)} kernel variants for sm_90, {len(failures)} failures")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
