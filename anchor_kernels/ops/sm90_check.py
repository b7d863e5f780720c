"""Compile every Triton kernel of the package for Hopper (sm_90) with no GPU present.

``python -m anchor_kernels.ops.sm90_check`` prints one line per compiled variant (registers,
stack frame, static shared memory, whether the PTX uses wgmma) and exits non-zero if a
variant fails to compile or a half-precision matmul kernel misses the wgmma path. Each
listed module provides ``sm90_compile_specs()``. It must run without TRITON_INTERPRET, which
turns kernels into Python functions.
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

MODULES = ["anchor_kernels.ops.supcon_triton", "anchor_kernels.ops.similarity_triton",
           "anchor_kernels.ops.hard_positive_triton"]


def compile_spec(kernel, signature, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(kernel, signature, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(cubin: bytes) -> str:
    """Registers, spills and shared memory from ``cuobjdump --dump-resource-usage`` (shipped
    with Triton), or "" if the tool is missing."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return f"regs={match[1]} stack={match[2]} smem={match[3]}" if match else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="only these modules (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    count, failures = 0, []
    for name in args.module or MODULES:
        module = importlib.import_module(name)
        for kernel, signature, constexprs, warps, stages in module.sm90_compile_specs():
            start = time.perf_counter()
            uses_dot = constexprs.pop("USES_DOT", True)
            compiled = compile_spec(kernel, signature, constexprs, warps, stages)
            ptx = compiled.asm["ptx"]
            dtype = next(v for k, v in signature.items() if v.startswith("*") and v[1:] in ("fp16", "bf16", "fp32"))
            blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
            print(f"{kernel.__name__:28s} {dtype:6s} {blocks} warps={warps} stages={stages} "
                  f"{resource_usage(compiled.asm['cubin'])} "
                  f"wgmma={'yes' if re.search(r'wgmma', ptx) else 'no'} "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
            count += 1
            if dtype in ("*fp16", "*bf16") and "wgmma" not in ptx and uses_dot:
                failures.append(f"{kernel.__name__} {dtype} {blocks}: no wgmma in the PTX")
    print(f"compiled {count} kernel variants for sm_90")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
