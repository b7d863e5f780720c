"""Building the C++/CUDA extension: the JIT build and its cache, failure reporting, the CPU-only
case, the CUTLASS headers, and compiling every CUDA source for sm_80 and sm_90 with the
machine's nvcc (nothing runs them here; a CUDA file that does not compile fails CI)."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from anchor_kernels import _ext

from .cuda_emulation.supcon_emulated import cuda_include_dir, nvcc

CUDA_SOURCES = sorted(glob.glob(os.path.join(_ext.CSRC_DIR, "cuda", "*.cu")))
CUDA_GLUE = sorted(glob.glob(os.path.join(_ext.CSRC_DIR, "cuda", "*.cpp")))
TRITON_BIN = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin")


def test_extension_builds_and_registers_ops():
    assert _ext.load() is None, _ext.load()
    for op in ("supcon_fwd", "supcon_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"anchor_kernels::{op}", "CPU")


def test_build_is_cached_by_content():
    with_cuda = _ext.cuda_skip_reason() is None
    key = _ext.build_key(with_cuda)
    assert key == _ext.build_key(with_cuda)
    built = glob.glob(os.path.join(_ext._build_root(), key, _ext.NAME + "*.so"))
    assert built, "the extension was not built into its keyed build directory"


def test_every_source_is_compiled():
    names = {os.path.basename(p) for p in _ext.sources(with_cuda=True)}
    assert {"supcon.cpp", "supcon_kernels.cu"} <= names
    cpu_only = {os.path.basename(p) for p in _ext.sources(with_cuda=False)}
    assert not any(n.endswith(".cu") for n in cpu_only) and "supcon.cpp" in cpu_only


def test_object_files_do_not_collide():
    """torch's builder names each object after its source's base name (``x.cpp`` -> ``x.o``,
    ``x.cu`` -> ``x.cuda.o``): two sources with one name would make ninja refuse the build."""
    objects = [os.path.basename(p).replace(".cu", ".cuda").rsplit(".", 1)[0]
               for p in _ext.sources(with_cuda=True)]
    assert len(objects) == len(set(objects)), sorted(objects)


def test_cutlass_headers_are_found():
    include = _ext.cutlass_include()
    if include is None:
        pytest.skip(f"nvidia-cutlass is not installed (pip install {_ext.CUTLASS_REQUIREMENT})")
    assert os.path.isfile(os.path.join(include, "cute", "tensor.hpp"))
    assert os.path.isfile(os.path.join(include, "cutlass", "cutlass.h"))
    assert _ext.include_dirs(with_cuda=True) == [_ext.CSRC_DIR, include]
    assert _ext.include_dirs(with_cuda=False) == [_ext.CSRC_DIR]


def test_missing_cutlass_skips_cuda_half_with_a_reason(monkeypatch):
    """With a CUDA torch and a toolkit, a missing nvidia-cutlass is the reason given (after
    torch's and the toolkit's checks), and the pip command names the pinned version."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_ext, "cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setattr(_ext, "cutlass_include", lambda: None)
    reason = _ext.cuda_skip_reason()
    assert reason is not None and "nvidia-cutlass is not installed" in reason
    assert f"pip install {_ext.CUTLASS_REQUIREMENT}" in reason and "CuTe" in reason
    assert _ext.include_dirs(with_cuda=True) == [_ext.CSRC_DIR]
    monkeypatch.setattr(_ext, "cutlass_include", lambda: "/some/include")
    assert _ext.cuda_skip_reason() is None
    monkeypatch.setattr(_ext, "cuda_home", lambda: None)
    assert "no CUDA toolkit" in _ext.cuda_skip_reason()


def test_cuda_build_key_covers_the_cutlass_headers(monkeypatch):
    monkeypatch.setattr(_ext, "cutlass_include", lambda: "/a/include")
    key_a, cpu_key = _ext.build_key(True), _ext.build_key(False)
    monkeypatch.setattr(_ext, "cutlass_include", lambda: "/b/include")
    assert _ext.build_key(True) != key_a
    assert _ext.build_key(False) == cpu_key


def test_cutlass_pin_is_the_same_everywhere():
    """The pin in _ext (named by the skip reason) is the one scripts/setup.sh and setup.py's
    "cuda" extra install."""
    for name in (os.path.join("scripts", "setup.sh"), "setup.py"):
        with open(os.path.join(_ext.REPO_DIR, name)) as fh:
            assert _ext.CUTLASS_REQUIREMENT in fh.read(), name


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build here")
def test_cpu_only_torch_skips_cuda_half_with_a_reason():
    assert "not a CUDA build" in _ext.cuda_skip_reason()
    assert "CUDA half of the C++ extension is not built" in _ext.cuda_error()


def test_failed_build_returns_reason_and_import_still_works(tmp_path):
    """A source that does not compile: load() returns why (it never raises), the package still
    imports and "auto" falls back to eager. Run in a fresh process with csrc/ replaced."""
    (tmp_path / "broken.cpp").write_text("this is not C++;\n")
    code = (
        "import torch, anchor_kernels._ext as e\n"
        f"e.CSRC_DIR = {str(tmp_path)!r}\n"
        f"e._build_root = lambda: {str(tmp_path / 'build')!r}\n"
        "import anchor_kernels as ak\n"
        "from anchor_kernels.backends import get_backend, SupConProblem\n"
        "x, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])\n"
        "p = SupConProblem(x, y, None, None, 0.1, 0.0, None, True, True, 0)\n"
        "print('REASON', get_backend('cpu').not_supported_reasons(p))\n"
        "print('LOSS', float(ak.supcon_loss(x, y)))\n"
    )
    env = dict(os.environ, PYTHONPATH=_ext.REPO_DIR)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "failed to build or load" in out.stdout, out.stdout[-3000:]
    loss_line = [line for line in out.stdout.splitlines() if line.startswith("LOSS")]
    assert loss_line and float(loss_line[0].split()[1]) > 0


def test_failed_cuda_half_keeps_the_cpu_half(tmp_path):
    """A CUDA half that does not build (here: forced on, with a broken .cu) leaves the CPU half
    loaded and gives the cuda backend the reason."""
    (tmp_path / "ok.cpp").write_text("int anchor_kernels_test_symbol() { return 1; }\n")
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "broken_kernels.cu").write_text("this is not CUDA;\n")
    code = (
        "import anchor_kernels._ext as e\n"
        f"e.CSRC_DIR = {str(tmp_path)!r}\n"
        f"e._build_root = lambda: {str(tmp_path / 'build')!r}\n"
        "e.cuda_skip_reason = lambda: None\n"
        "print('LOAD', e.load())\n"
        "print('CUDA', e.cuda_error())\n"
    )
    env = dict(os.environ, PYTHONPATH=_ext.REPO_DIR)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOAD None" in out.stdout, out.stdout[-3000:]
    assert "CUDA the CUDA half of the C++ extension is not built: its build failed" in out.stdout
    assert "CUDA half skipped" in out.stderr


MATMUL_FREE = {"pgd_kernels.cu", "supcon_rows.cu"}
# nvcc flags of each target: SASS for that architecture alone (cuobjdump -arch tells them apart).
# Hopper is built as sm_90a (what _ext.cuda_arch_list makes of "9.0"), with the macro that
# tells the launchers so.
CUDA_TARGETS = {"sm_90a": ["-gencode", "arch=compute_90a,code=sm_90a", "-DANCHOR_KERNELS_SM90A=1"],
                "sm_80": ["-gencode", "arch=compute_80,code=sm_80"]}
# Hopper kernels (``sm90`` in their names): their body is sm_90a code alone (wgmma fed by TMA,
# setmaxnreg), and compiles away for any other target.
HOPPER_INSTRUCTIONS = ("HGMMA", "UTMALDG", "USETMAXREG")
# The forwards built once more without their edge tiles' copy of the per-logit code and the
# label keys' search of labels out of int32's range (ANCHOR_KERNELS_INNER_TILES_ONLY,
# csrc/cuda/supcon_mma.cuh), to count what an inner tile runs with labels in range.
INNER = "+inner"
INNER_TILE_BUILDS = {"supcon_mma_fwd.cu": "sm_80", "supcon_sm90_fwd.cu": "sm_90a"}
# Mangled element types whose products run on the tensor cores: CUDA's half precision (__half,
# __nv_bfloat16), CUTLASS's, and CUTLASS's TF32 (fp32 rows where torch allows TF32).
TENSOR_CORE_TYPES = ("6__half", "13__nv_bfloat16", "7cutlass6half_t", "7cutlass10bfloat16_t",
                     "7cutlass10tfloat32_t")


def _cuobjdump():
    found = shutil.which("cuobjdump") or os.path.join(TRITON_BIN, "cuobjdump")
    return found if os.path.isfile(found) else None


def _resource_usage(text):
    """``cuobjdump --dump-resource-usage`` -> (the architectures of its ELF sections,
    {function: {"REG": .., "STACK": .., "LOCAL": .., ...}})."""
    archs, usage, name = set(), {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            archs.add(line.split("=", 1)[1].strip())
        elif line.startswith("Function ") and line.endswith(":"):
            name = line[len("Function "):-1].strip()
        elif name is not None and line.startswith("REG:"):
            usage[name] = {k: int(v) for k, v in (f.split(":", 1) for f in line.split())
                           if v.isdigit()}
            name = None
    return archs, usage


@pytest.fixture(scope="module")
def cuda_objects(tmp_path_factory):
    """(source, arch) -> (nvcc's CompletedProcess, object path), every pair compiled at once on
    all cores (nvcc is single-threaded: in sequence they would take twice as long on 2 cores)."""
    compiler = nvcc()
    if compiler is None:
        pytest.skip("no nvcc on this machine")
    cutlass = _ext.cutlass_include()
    if cutlass is None:
        pytest.skip(f"nvidia-cutlass is not installed (pip install {_ext.CUTLASS_REQUIREMENT}): "
                    "the CUDA kernels are compiled with its CuTe headers")
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    out = tmp_path_factory.mktemp("cuda_objects")

    def compile_one(source, arch):
        target = arch.removesuffix(INNER)
        obj = out / f"{os.path.basename(source)}.{arch}.o"
        cmd = [compiler, *CUDA_TARGETS[target], "-std=c++17", "-O3", *COMMON_NVCC_FLAGS,
               *_ext.cuda_flags(), "-I", _ext.CSRC_DIR, "-I", cutlass, "-c", source, "-o", str(obj)]
        if arch != target:
            cmd.append("-DANCHOR_KERNELS_INNER_TILES_ONLY=1")
        return subprocess.run(cmd, capture_output=True, text=True), obj

    pairs = [(src, arch) for src in CUDA_SOURCES for arch in CUDA_TARGETS]
    pairs += [(os.path.join(_ext.CSRC_DIR, "cuda", stem), arch + INNER)
              for stem, arch in INNER_TILE_BUILDS.items()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(pairs, pool.map(lambda pair: compile_one(*pair), pairs)))


@pytest.mark.parametrize("arch", sorted(CUDA_TARGETS))
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_sources_compile_for_sm80_and_sm90a(source, arch, cuda_objects):
    """nvcc -c for one architecture, with the flags torch's builder adds (no implicit half
    conversions) and the CUTLASS/CuTe headers; the half-precision and TF32 matmul kernels must
    use the tensor cores (HMMA in that architecture's SASS; elementwise kernels, ``MATMUL_FREE``, have
    no product to put there), the Hopper kernels must hold wgmma, TMA loads and setmaxnreg in
    the sm_90a build and nothing of them elsewhere, and no tensor-core kernel (``mma`` or
    ``sm90`` in its name) may spill to local memory (stack or local bytes in
    ``cuobjdump --dump-resource-usage``)."""
    result, obj = cuda_objects[(source, arch)]
    assert result.returncode == 0, result.stderr[-4000:]
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return

    res = subprocess.run([cuobjdump, "--dump-resource-usage", str(obj)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    archs, usage = _resource_usage(res.stdout)
    assert archs == {arch}, (archs, res.stdout[-2000:])
    assert usage, f"no kernels in the {arch} object:\n{res.stdout[-2000:]}"
    spilling = {k: u for k, u in usage.items()
                if ("mma" in k.lower() or "sm90" in k) and (u.get("LOCAL", 0) or u.get("STACK", 0))}
    assert not spilling, "\n".join(
        f"{k}: REG:{u.get('REG')} STACK:{u.get('STACK')} LOCAL:{u.get('LOCAL')}"
        for k, u in spilling.items())

    kernels = {name: {op: sum(f" {op}" in f" {text}" for _, text in instructions)
                       for op in ("HMMA", *HOPPER_INSTRUCTIONS)}
               for name, instructions in _kernel_sass(obj, arch).items()}  # kernel -> counts
    assert set(kernels) == set(usage), (sorted(kernels), sorted(usage))
    hopper = {k: c for k, c in kernels.items() if "sm90" in k}
    for k, counts in hopper.items():
        if arch == "sm_90a":
            assert all(counts[op] > 0 for op in HOPPER_INSTRUCTIONS), (k, counts)
        else:
            assert not any(counts.values()), (k, counts)
    if os.path.basename(source) in MATMUL_FREE or hopper:
        return
    tensor_core = [k for k in kernels if any(t in k for t in TENSOR_CORE_TYPES)]
    assert tensor_core and all(kernels[k]["HMMA"] > 0 for k in tensor_core), kernels


@pytest.mark.parametrize("source", CUDA_GLUE, ids=os.path.basename)
def test_cuda_glue_compiles_against_torch_headers(source, tmp_path):
    """Syntax check of the torch glue of the CUDA kernels with the CPU torch wheel's headers.
    That wheel lacks only c10/cuda/impl/cuda_cmake_macros.h (generated for CUDA builds), which
    a stub stands in for; linking needs a CUDA torch and is left to the GPU machine."""
    include = cuda_include_dir()
    cxx = shutil.which("c++") or shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers")
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{p}" for p in include_paths()], f"-I{tmp_path}", f"-I{include}",
           f"-I{_ext.CSRC_DIR}", source]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_setup_py_reads_the_build_switch():
    env = dict(os.environ, ANCHOR_KERNELS_BUILD_EXT="1")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=_ext.REPO_DIR, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "anchor_kernels" in out.stdout
    if torch.version.cuda is None:
        assert "CUDA half skipped" in out.stdout + out.stderr


@pytest.mark.parametrize("given,built", [("9.0", "9.0a"), ("8.0;9.0+PTX", "8.0;9.0a+PTX"),
                                         ("8.0 9.0a", "8.0;9.0a"), ("8.0;8.6", "8.0;8.6")])
def test_hopper_is_built_as_sm90a(given, built, monkeypatch):
    """TORCH_CUDA_ARCH_LIST's "9.0" is built as "9.0a" (the wgmma / TMA kernels' target), and
    the launchers are told (ANCHOR_KERNELS_SM90A) exactly when the binary holds it; the build
    key follows the architectures."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    assert _ext.cuda_arch_list() == built
    assert ("-DANCHOR_KERNELS_SM90A=1" in _ext.cuda_flags()) == ("9.0a" in built)
    key = _ext.build_key(True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert _ext.build_key(True) != key


def _kernel_sass(obj, arch):
    """{kernel: [(address, instruction text)]} from ``cuobjdump -sass``."""
    sass = subprocess.run([_cuobjdump(), "-sass", "-arch", arch, str(obj)], capture_output=True,
                          text=True).stdout
    kernels, name = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :")[1].strip()
            kernels[name] = []
        elif name is not None and line.strip().startswith("/*") and ";" in line:
            addr, text = line.strip()[2:].split("*/", 1)
            kernels[name].append((int(addr, 16), text.split(";")[0].strip()))
    return kernels


def _branch_target(text):
    """The target address of a branch instruction (``@P0 BRA 0x1a0``), else None."""
    op = text.split()
    if "BRA" in [o.split(".")[0] for o in op] and op[-1].startswith("0x"):
        return int(op[-1], 16)
    return None


def _tensor_core_loop(instructions, op="HGMMA", outlined=False, nested_trips=None, last_only=False):
    """The instructions of the innermost loop around a kernel's tensor-core instructions
    (``op``; last_only: around the last of them, where the first iterations may be peeled off
    before the loop): from the target of the backward branch that closes it to that branch.
    outlined: with the blocks outside it that the loop branches to and that branch back into it
    (ptxas moves a conditional part of the loop body, such as the next tile's loads, out of line).
    nested_trips: the loop holds exactly one loop of its own, which runs that many times a
    tile, and its body counts that many times (what a tile runs); None: it holds none."""
    hgmma = [a for a, text in instructions if f" {op}" in f" {text}"][-1 if last_only else 0:]
    loops = []
    for addr, text in instructions:
        target = _branch_target(text)
        if target is not None and target <= hgmma[0] and addr >= hgmma[-1]:
            loops.append((addr - target, target, addr))
    assert loops, f"no loop around the {op}s"
    _, start, end = min(loops)
    nested = [(target, addr) for addr, text in instructions
              if (target := _branch_target(text)) is not None and start < target <= addr < end]
    assert len(nested) == (0 if nested_trips is None else 1), nested
    repeats = {a: nested_trips for t, e in nested for a, _ in instructions if t <= a <= e}
    inside = lambda a: start <= a <= end
    picked = {a for a, _ in instructions if inside(a)}
    if outlined:
        exits = {_branch_target(t) for a, t in instructions if inside(a)} - {None}
        at = {a: i for i, (a, _) in enumerate(instructions)}
        for target in sorted(t for t in exits if not inside(t) and t in at):
            block = []
            for a, text in instructions[at[target]:]:
                block.append(a)
                back = _branch_target(text)
                if back is not None and not text.startswith("@"):
                    if inside(back):
                        picked.update(block)
                    break
    return [text for a, text in instructions if a in picked for _ in range(repeats.get(a, 1))]


# The forwards' per-logit budgets, by (mode, fixed shifts): (the tile loop's instructions per
# logit a thread holds in each of its two copies of the per-logit code, edge tiles with masks
# and inner tiles without; the instructions an inner tile runs, per logit, counted in the build
# without the edge copy; exponentials per logit). Log-sum-exp only: scale, exp, sum, and the
# maxima with running maxima; plain SupCon adds the label compare and the positives' count and
# sum; soft mining a pass over the positives for their maximum, and their weights. Fixed
# shifts (normalised rows) drop the maxima. Logits a thread holds per tile: 64 in both. The
# label compare is one ISETP on 32-bit keys (csrc/cuda/label_keys.cuh; the inner-tile build
# leaves out the keys' search of labels out of range, which labels in range never run).
# The Hopper loop holds the turn and the product's issue and wait besides; nvcc 13.0 gives
# (8.9, 12.6, 22.2) running maxima and (7.5, 11.3, 16.2) fixed shifts, inner tiles
# (6.8, 10.1, 16.7) and (5.5, 8.8, 11.9); with int64 labels it gave (8.9, 13.7, 24.2) and
# (7.5, 12.3, 15.5), inner tiles (6.8, 11.1, 18.8) and (5.5, 9.8, 13.0).
HOPPER_FWD_BUDGET = {("ELi0E", False): (9.5, 7.1, 1), ("ELi1E", False): (13.0, 10.5, 1), ("ELi2E", False): (22.6, 17.2, 2),
                     ("ELi0E", True): (8.0, 5.8, 1), ("ELi1E", True): (11.7, 9.2, 1), ("ELi2E", True): (16.6, 12.4, 2)}
# Its TF32 variant runs the same per-logit code on 128 x 64 tiles (HGMMA.64x64x8.F32.TF32:
# 32 logits a thread per tile, 16 products), so the tile's fixed work (turn, product, barriers,
# quad reductions) weighs twice as much per logit: nvcc 13.0 gives (10.7, 14.4, 23.9) and
# (9.9, 12.7, 17.5), inner tiles (9.9, 13.3, 20.3) and (8.3, 11.5, 14.5) (before the column
# splits, the fixed-shift log-sum-exp-only whole loop was 9.0: ptxas's choice).
HOPPER_TF32_FWD_BUDGET = {("ELi0E", False): (11.2, 10.4, 1), ("ELi1E", False): (15.0, 13.8, 1), ("ELi2E", False): (24.3, 20.8, 2),
                          ("ELi0E", True): (10.4, 8.8, 1), ("ELi1E", True): (13.3, 12.1, 1), ("ELi2E", True): (18.0, 15.0, 2)}
# The sm_80 forward (the default on every tensor-core GPU) runs the same per-logit code
# (mma::tile_update) on 128 x 64 tiles, and its loop holds the product too: the next tile's
# cp.async (load_rows, offsets folded), ldmatrix, 128 HMMA, and the next tile's labels keyed.
# nvcc 13.0 gives (13.0, 16.8, 25.7) and (11.4, 15.7, 20.0), inner tiles (11.2, 14.4, 24.6)
# and (9.5, 12.8, 18.6); with int64 labels (13.0, 17.5, 28.6) and (11.5, 18.8, 20.6), inner
# tiles (11.0, 15.1, 25.7) and (9.7, 13.5, 19.4); before the shared code, one copy with
# run-time masks for every tile: (22.3, 31.8, 38.7) and (20.6, 30.0, 32.3).
SM80_FWD_BUDGET = {("ELi0E", False): (13.4, 11.6, 1), ("ELi1E", False): (17.2, 14.8, 1), ("ELi2E", False): (26.2, 25.0, 2),
                   ("ELi0E", True): (11.8, 9.7, 1), ("ELi1E", True): (16.1, 13.2, 1), ("ELi2E", True): (20.5, 19.0, 2)}
# Its TF32 variant (fp32 rows, torch allowing TF32) runs the same per-logit code; its product
# takes m16n8k8 steps over rows of twice the bytes: 256 HMMA, 96 ldmatrix and 16 cp.async a
# tile, against 128, 48 and 8, which is 2 to 6 more instructions per logit. nvcc 13.0 gives
# (15.6, 19.5, 28.1) and (14.1, 18.4, 22.8), inner tiles (16.9, 20.7, 27.6) and (15.3, 19.1, 22.0);
# with int64 labels (15.7, 20.2, 32.6) and (14.2, 21.4, 23.6), inner tiles (17.0, 21.1, 29.4)
# and (15.4, 20.0, 22.8).
SM80_TF32_FWD_BUDGET = {("ELi0E", False): (16.1, 17.4, 1), ("ELi1E", False): (20.0, 21.1, 1), ("ELi2E", False): (28.6, 28.0, 2),
                        ("ELi0E", True): (14.6, 15.8, 1), ("ELi1E", True): (18.8, 19.5, 1), ("ELi2E", True): (23.3, 22.4, 2)}
TF32 = "tfloat32_t"  # in a kernel's mangled name


def _kernels(cuda_objects, stem, arch="sm_90a"):
    """{kernel: [(address, instruction)]} of csrc/cuda/<stem>'s build for arch (arch + INNER:
    the build without the edge tiles' copy)."""
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (it ships with Triton)")
    result, obj = cuda_objects[(os.path.join(_ext.CSRC_DIR, "cuda", stem), arch)]
    assert result.returncode == 0, result.stderr[-4000:]
    return _kernel_sass(obj, arch.removesuffix(INNER))


def _opcode(text):
    """An instruction's opcode with its modifiers ("LDS.128"), past its predicate ("@!P0")."""
    return text.split()[1 if text.startswith("@") else 0]


def _hgmma_shapes(instructions):
    """The kinds of HGMMA a kernel issues (shape and types: "64x64x8.F32.TF32")."""
    return {w.removeprefix("HGMMA.") for _, text in instructions for w in text.split() if w.startswith("HGMMA.")}


def _check_forward_budget(cuda_objects, stem, arch, budgets, op, tf32_budgets=None, tf32_logits=64):
    """Every forward kernel's tile loop (around its ``op`` instructions) under its budgets per
    logit (``tf32_budgets`` for the TF32 kernels), the loop of its inner-tile build too, with
    one MUFU.EX2 per exponential of the maths and no more; the number of kernels checked. A
    thread holds 64 logits of a tile (``tf32_logits`` in the TF32 kernels)."""
    builds = (_kernels(cuda_objects, stem, arch), _kernels(cuda_objects, stem, arch + INNER))
    assert sorted(builds[0]) == sorted(builds[1])
    forwards = [name for name in builds[0] if "merge_kernel" not in name]  # (the splits' merge)
    for name in forwards:
        params = name.split("_t")[1][:12]  # e.g. ELi2ELb1E: mode 2, fixed shifts
        table = tf32_budgets if TF32 in name else budgets
        logits = tf32_logits if TF32 in name else 64
        mode = next(m for m, _ in table if params.startswith(m))
        *limits, exps_per_logit = table[mode, "Lb1E" in params]
        for kernels, copies, limit in zip(builds, (2, 1), limits):
            loop = _tensor_core_loop(kernels[name], op)
            exps = sum("MUFU.EX2" in text for text in loop)
            assert len(loop) / (copies * logits) <= limit, (name, copies, len(loop) / (copies * logits))
            assert exps <= copies * logits * (exps_per_logit + 1 / 8), (name, copies, exps)
    return len(forwards)


def test_hopper_forward_instructions_per_logit(cuda_objects):
    """Counted, not timed: the Hopper forward's tile loop stays under its per-logit
    instruction budgets, with one MUFU.EX2 per exponential of the maths and no more; the TF32
    kernels' products are TF32 wgmma, the others' 16-bit."""
    # bf16, fp16 and TF32, three modes, running maxima or fixed shifts
    assert _check_forward_budget(cuda_objects, "supcon_sm90_fwd.cu", "sm_90a", HOPPER_FWD_BUDGET, "HGMMA",
                                 HOPPER_TF32_FWD_BUDGET, tf32_logits=32) == 18
    for name, instructions in _kernels(cuda_objects, "supcon_sm90_fwd.cu").items():
        if "merge_kernel" in name:  # (the splits' merge: no product)
            continue
        shapes = _hgmma_shapes(instructions)
        assert shapes == ({"64x64x8.F32.TF32"} if TF32 in name else {"64x128x16.F32.BF16"} if "bfloat16" in name
                          else {"64x128x16.F32"}), (name, shapes)


def test_sm80_forward_instructions_per_logit(cuda_objects):
    """Counted, not timed: the same for the sm_80 forward, TF32 included."""
    # bf16, fp16 and TF32, three modes, running maxima or fixed shifts
    assert _check_forward_budget(cuda_objects, "supcon_mma_fwd.cu", "sm_80", SM80_FWD_BUDGET, "HMMA",
                                 SM80_TF32_FWD_BUDGET) == 18


# The Hopper backward's, by (BwdMode, sides): loop instructions per logit a consumer thread
# holds (kBwdN / 2 per tile: 32 at 64 columns, 16 at 32 for soft mining), and exponentials per
# logit and side. Per side H takes p_ij (one exponential), plus the soft weight (a second) and
# its exact-gradient factor; one set has both sides in one pass (sides 3). The loop also holds
# the turn, the S and dX products and the stage hand-back; the producer keys the labels, so
# that a logit's label compare is one ISETP. (nvcc 13.0 gives 13.5, 14.0, 17.0; 16.8, 17.3,
# 22.3; 23.0, 23.8, 30.4; 25.1, 25.9, 34.8 for sides 1, 2, 3 of modes 0 to 3, with the column
# splits; 13.4, 14.0, 17.0; 16.7, 17.2, 22.2; 22.8, 23.8, 30.3; 24.9, 25.8, 34.7 before them;
# with int64 labels 17.7, 18.2, 23.4; 23.6, 24.1, 30.8; 25.8, 26.3, 34.9 for modes 1 to 3.)
HOPPER_BWD_BUDGET = {0: (14.0, 14.5, 17.5, 1), 1: (17.2, 17.7, 22.8, 1),
                     2: (23.2, 24.2, 30.8, 2), 3: (25.4, 26.2, 35.2, 2)}
# Its TF32 variants: 32-column tiles (16 logits a thread), S in 16 HGMMA.64x32x8.F32.TF32 and
# dX in 4 HGMMA.64x128x8.F32.TF32, and the wait for the tile's Y^T (the producer warpgroup's
# other warps transpose it, outside this loop); the tile's fixed work weighs twice as much per
# logit. nvcc 13.0 gives 24.8, 25.4, 28.4; 28.1, 28.7, 33.7; 32.2, 32.8, 39.6; 34.1, 35.0, 43.8.
HOPPER_TF32_BWD_BUDGET = {0: (25.5, 25.9, 28.9, 1), 1: (28.6, 29.2, 34.2, 1),
                          2: (32.7, 33.3, 40.1, 2), 3: (34.6, 35.5, 44.3, 2)}


# The sm_80 backward's, the same way (64-row CTAs of 4 warps: the same logits per thread); its
# loop holds the next tile's cp.async, the ldmatrix fragments and both mma.sync products
# besides. It compares the int64 labels: with the forward's 32-bit keys, ptxas recomputed its
# ldmatrix addresses every tile, 50 to 180 instructions a tile more than the compares saved.
# (nvcc 13.0 gives 34.2, 36.0, 41.8; 37.5, 38.8, 44.4; 49.3, 52.4, 66.8; 51.3, 52.9, 73.6;
# before the split columns, 34.2, 35.6, 42.0; 38.5, 39.8, 46.9; 48.9, 50.4, 68.9; 51.0, 54.7,
# 74.1.)
SM80_BWD_BUDGET = {0: (35.0, 36.5, 43.0, 1), 1: (39.5, 40.8, 48.0, 1),
                   2: (50.0, 53.5, 70.5, 2), 3: (52.3, 56.0, 76.0, 2)}
# Its TF32 variants (supcon_mma_bwd_tf32.cu): twice the HMMA (m16n8k8) and ldmatrix for S, the
# tile transposed into Y^T through shared memory (16 LDS.128, 64 STS and a barrier a thread at
# 64 columns, half at 32), and dX's B operand as 128 LDS.64 (64). nvcc 13.0 gives 53.3, 56.2,
# 60.0; 55.9, 58.2, 70.7; 66.9, 68.7, 86.3; 68.9, 70.9, 91.9.
SM80_TF32_BWD_BUDGET = {0: (54.0, 57.0, 60.8, 1), 1: (56.6, 59.0, 71.5, 1),
                        2: (67.6, 69.5, 87.1, 2), 3: (69.6, 71.6, 92.7, 2)}


def _check_backward_budget(cuda_objects, stem, arch, budgets, op, transposes=False, tf32_budgets=None):
    """Every backward kernel's tile loop (around its ``op`` instructions) under its budget per
    logit, with the exponentials of the maths and no more; the number of kernels checked.
    transposes: the TF32 kernels' loop holds the tile's transposition, a loop of 4 iterations
    at 64 columns (2 at 32: mma::transpose_iterations), counted as many times. tf32_budgets:
    those of the TF32 kernels of a file that holds both, on 32-column tiles (the Hopper one)."""
    checked = 0
    for name, instructions in _kernels(cuda_objects, stem, arch).items():
        params = name.split("_t")[1][:10]  # e.g. ELi3ELi2E: mode 3, sides 2
        mode, sides = int(params[3]), int(params[7])
        tf32 = tf32_budgets is not None and TF32 in name
        *limits, exps_per_side = (tf32_budgets if tf32 else budgets)[mode]
        logits = (64 if mode < 2 and not tf32 else 32) // 2  # per thread and tile
        loop = _tensor_core_loop(instructions, op, nested_trips=(4 if mode < 2 else 2) if transposes else None)
        exps = sum("MUFU.EX2" in text for text in loop)
        assert len(loop) / logits <= limits[sides - 1], (name, len(loop) / logits)
        assert exps <= logits * exps_per_side * (2 if sides == 3 else 1) + 4, (name, exps)
        checked += 1
    return checked


def test_hopper_backward_instructions_per_logit(cuda_objects):
    """Counted, not timed: the Hopper backward's tile loop stays under its per-logit
    instruction budget, with the exponentials of the maths and no more; the TF32 kernels'
    products are TF32 wgmma, the others' 16-bit."""
    # bf16, fp16 and TF32, four modes, three sides
    assert _check_backward_budget(cuda_objects, "supcon_sm90_bwd.cu", "sm_90a", HOPPER_BWD_BUDGET, "HGMMA",
                                  tf32_budgets=HOPPER_TF32_BWD_BUDGET) == 36
    for name, instructions in _kernels(cuda_objects, "supcon_sm90_bwd.cu").items():
        shapes = _hgmma_shapes(instructions)
        assert shapes and all(s.endswith(".TF32") == (TF32 in name) for s in shapes), (name, shapes)


# The TF32 backward's transposers (sm90::transpose_tile, the producer warpgroup's warps 1 to 3
# after setmaxnreg.dec 40): their loop moves two 16-byte chunks of Y an iteration, an LDS.128
# and four STS each, with the stores' offsets formed once (nvcc 13.0: 40 instructions, 20 a
# chunk; 81 when each store's swizzled offset was formed anew).
TRANSPOSER_PER_CHUNK = 21


def test_hopper_tf32_transposers(cuda_objects):
    """Counted: in every TF32 Hopper backward, the transposers' loop stays under its budget
    per chunk moved and uses no register beyond the 40 the producer warpgroup keeps."""
    checked = 0
    for name, instructions in _kernels(cuda_objects, "supcon_sm90_bwd.cu").items():
        if TF32 not in name:
            continue
        start = next(i for i, (_, text) in enumerate(instructions) if "USETMAXREG.DEALLOC" in text)
        assert "0x28" in instructions[start][1], instructions[start]  # setmaxnreg.dec 40
        fence = next(i for i, (_, text) in enumerate(instructions[start:], start) if "FENCE.VIEW.ASYNC.S" in text)
        region = instructions[start:fence]
        loop = _tensor_core_loop(region, "LDS.128", last_only=True)
        count = lambda op: sum(_opcode(text).startswith(op) for text in loop)
        chunks = count("LDS.128")
        assert (chunks, count("STS")) == (2, 8), (name, chunks, count("STS"))
        assert len(loop) / chunks <= TRANSPOSER_PER_CHUNK, (name, len(loop) / chunks)
        registers = {int(r) for _, text in region for r in re.findall(r"\bR(\d+)\b", text)}
        assert max(registers) < 40, (name, max(registers))
        checked += 1
    assert checked == 12


def test_hopper_kernels_address_shared_memory_directly(cuda_objects):
    """Counted: no Hopper kernel reaches memory through generic addresses (LD / ST): their
    shared-memory accesses are LDS / STS. A swizzled CuTe pointer into shared memory (its
    address XORed as an integer) loses the address space, as a first form of the TF32
    backward's transposers did."""
    checked = 0
    for stem in ("supcon_sm90_fwd.cu", "supcon_sm90_bwd.cu"):
        for name, instructions in _kernels(cuda_objects, stem).items():
            ops = {_opcode(text).split(".")[0] for _, text in instructions}
            assert not ops & {"LD", "ST"}, (name, sorted(ops & {"LD", "ST"}))
            checked += "sm90" in name
    assert checked == 18 + 36


def test_sm80_backward_instructions_per_logit(cuda_objects):
    """Counted, not timed: the same for the sm_80 backward, and its TF32 variants."""
    assert _check_backward_budget(cuda_objects, "supcon_mma_bwd.cu", "sm_80", SM80_BWD_BUDGET, "HMMA") == 24
    assert _check_backward_budget(cuda_objects, "supcon_mma_bwd_tf32.cu", "sm_80", SM80_TF32_BWD_BUDGET,
                                  "HMMA", transposes=True) == 12


def _wide_compares(instructions, op):
    """64-bit integer compares (ISETP with .EX) in the tile loop around the ``op``s."""
    return sum("ISETP" in text and ".EX" in text for text in _tensor_core_loop(instructions, op))


@pytest.mark.parametrize("stem,arch,op,variants", [("supcon_mma_fwd.cu", "sm_80" + INNER, "HMMA", 12),
                                                   ("supcon_sm90_fwd.cu", "sm_90a" + INNER, "HGMMA", 12),
                                                   ("supcon_sm90_bwd.cu", "sm_90a", "HGMMA", 27)])
def test_label_compares_are_32_bit(cuda_objects, stem, arch, op, variants):
    """Counted: the loops that compare labels (plain SupCon, soft mining; every dtype, shift
    and side) hold no more 64-bit compares than the log-sum-exp-only loop of the same variant
    (row bounds, loop control), give or take two: a logit's label compare is one ISETP on
    32-bit keys (csrc/cuda/label_keys.cuh). int64 labels gave one 64-bit compare per logit,
    64 or more a tile."""
    kernels = _kernels(cuda_objects, stem, arch)
    compared = 0
    for name, instructions in kernels.items():
        mode = name.split("_tELi", 1)[1][0] if "_tELi" in name else "0"  # (the merge: no mode)
        if mode == "0":
            continue
        lse = name.replace(f"_tELi{mode}E", "_tELi0E", 1)
        extra = _wide_compares(instructions, op) - _wide_compares(kernels[lse], op)
        assert extra <= 2, (name, extra)
        compared += 1
    assert compared == variants


# The similarity kernels' tile loops (csrc/cuda/similarity_mma.cuh), per element of the tile a
# thread holds: the forward's 128 x 64 S tile (64 per thread; its loop holds the next tile's
# cp.async, ldmatrix, 128 HMMA, the scale and both store copies, pairs and single columns),
# the backward's 64 x 64 G tile (32 per thread: G's and y's cp.async, y's scaling by 1 / n_y,
# ldmatrix, 64 HMMA). nvcc 13.0 gives 16.2 and 22.4 to 23.9 (G^T, fp16 the most; 20.7 to 22.9
# before the backward's split columns). The TF32 forward's product is 256 HMMA over 16
# cp.async a tile (rows of twice the bytes, m16n8k8): 22.0; the TF32 backward's 128 HMMA over
# 24 cp.async, G's A registers read and rounded one by one, y's tile transposed (a loop of 4
# iterations, counted as many times; a second barrier): 42.7 and 42.1 (G^T).
SIMILARITY_BUDGET = {"fwd": (16.5, 64, 128, 8, 1), "bwd": (24.5, 32, 64, 12, 1),
                     "fwd-tf32": (22.5, 64, 256, 16, 1), "bwd-tf32": (43.3, 32, 128, 24, 2)}


def test_similarity_instructions_per_element(cuda_objects):
    """Counted, not timed: the similarity kernels' tile loops (with the blocks ptxas moves out
    of line) stay under their budgets per tile element, hold the tile's whole product and its
    next cp.async loads, and pass one barrier per tile (two in the TF32 backward)."""
    checked = 0
    for name, instructions in _kernels(cuda_objects, "similarity_mma.cu", "sm_80").items():
        kind = ("fwd" if "fwd_mma" in name else "bwd") + ("-tf32" if TF32 in name else "")
        limit, elements, hmma, loads, barriers = SIMILARITY_BUDGET[kind]
        loop = _tensor_core_loop(instructions, "HMMA", outlined=True,
                                 nested_trips=4 if kind == "bwd-tf32" else None)
        count = lambda op: sum(f" {op}" in f" {text}" for text in loop)
        assert len(loop) / elements <= limit, (name, len(loop) / elements)
        assert (count("HMMA"), count("LDGSTS"), count("BAR.SYNC")) == (hmma, loads, barriers), name
        checked += 1
    assert checked == 9  # bf16, fp16 and TF32; the backward with G as it lies and transposed


def test_hopper_consumers_take_turns(cuda_objects):
    """Counted, not timed: in every Hopper kernel's tile loop a consumer warpgroup waits for its
    turn (a named barrier, not the CTA's barrier 0) before it issues its products, and lets the
    other warpgroup go (BAR.ARV) after issuing them and before waiting for them, so that one's
    products run while the other does its per-logit work."""
    checked = 0
    for stem in ("supcon_sm90_fwd.cu", "supcon_sm90_bwd.cu"):
        for name, instructions in _kernels(cuda_objects, stem).items():
            if "merge_kernel" in name:  # (the splits' merge: no product)
                continue
            loop = _tensor_core_loop(instructions)
            at = lambda op: [i for i, text in enumerate(loop) if op in text]
            hgmma, turn = at("HGMMA"), [i for i in at("BAR.SYNC") if not loop[i].endswith(" 0x0")]
            arrive = [i for i in at("BAR.ARV") if hgmma[-1] < i]
            wait = [i for i in at("WARPGROUP.DEPBAR") if hgmma[-1] < i]
            assert turn and turn[0] < hgmma[0], (name, "no turn taken before the products")
            assert arrive and wait and arrive[0] < wait[0], (name, "the other warpgroup waits")
            checked += 1
    assert checked == 18 + 36, checked
