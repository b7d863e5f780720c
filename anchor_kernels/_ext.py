"""Build and load the C++/CUDA extension (``csrc/``) that registers the ``anchor_kernels::*``
C++ ops with ``torch.library``.

Layout: ``csrc/<stem>.cpp`` holds an op's schemas (``TORCH_LIBRARY_FRAGMENT``) and CPU kernels,
``csrc/cuda/<stem>_kernels.cu`` its CUDA kernels (CUDA and CUTLASS/CuTe headers, no torch's) and
``csrc/cuda/<stem>_cuda.cpp`` the torch glue for them. Every ``csrc/*.cpp`` is compiled into one
library; the CUDA files join it when torch is a CUDA build, a CUDA toolkit is found
(``torch.version.cuda`` and ``CUDA_HOME``; a visible GPU is not needed) and the
``nvidia-cutlass`` package is installed (its headers, ``cutlass_include()``, go on the CUDA
build's include path). Adding an op is adding its files.

The library is used from, in order: a prebuilt ``anchor_kernels/_C*.so`` (``setup.py`` with
``ANCHOR_KERNELS_BUILD_EXT=1``) unless the sources in ``csrc/`` are newer; else a just-in-time
build with ninja into ``<repo>/build/ext/<key>`` (or torch's extension cache when the package
directory is read-only), keyed on the sources, flags and versions (nvidia-cutlass's included),
so it is built once.

``load()`` never raises: it returns None once the ops are registered, or the reason they are
not, which the "cpu" and "cuda" backends report.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import sys
import sysconfig

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PACKAGE_DIR)
CSRC_DIR = os.path.join(REPO_DIR, "csrc")
NAME = "anchor_kernels_ext"
# The CUDA kernels are written with CuTe (CUTLASS's headers), taken from this PyPI package.
CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"

# torch's own name for the host's vector ISA -> the flags that make at::vec use it. The build
# is keyed on it, so a build is never reused on a machine without that ISA.
_CPU_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_state: dict = {}


def cpu_capability() -> str:
    """The vector ISA the CPU kernels are compiled for: ANCHOR_KERNELS_CPU_CAPABILITY, else
    what torch detects on this machine (DEFAULT when neither names one we know)."""
    cap = os.environ.get("ANCHOR_KERNELS_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    return cap if cap in _CPU_FLAGS else "DEFAULT"


def openmp_flags() -> list[str]:
    """-fopenmp when torch's at::parallel_for is OpenMP: its header runs `#pragma omp parallel`,
    which without the flag compiles to a serial loop (the library then reuses torch's libgomp)."""
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def cxx_flags() -> list[str]:
    return ["-O3", *openmp_flags(), *(_CPU_FLAGS.get(cpu_capability(), []))]


def cuda_arch_list() -> str:
    """The GPU architectures the CUDA half is compiled for, in TORCH_CUDA_ARCH_LIST's syntax:
    that variable when set, else the visible GPUs' compute capabilities ("" when there are
    none: torch's builder then decides). Hopper's "9.0" becomes "9.0a": the wgmma, TMA and
    setmaxnreg instructions of the Hopper kernels exist only in arch-specific sm_90a code,
    which runs on exactly the devices that sm_90 code targets."""
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";")
    if not arches and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arches = ";".join(f"{major}.{minor}" for major, minor in caps)
    names = [a.strip() for a in arches.split(";") if a.strip()]
    return ";".join("9.0a" + a[3:] if a.startswith("9.0") and not a.startswith("9.0a") else a
                    for a in names)


def cuda_flags() -> list[str]:
    """nvcc flags; ANCHOR_KERNELS_SM90A tells the launchers that the binary holds sm_90a code."""
    sm90a = any(a.startswith("9.0a") for a in cuda_arch_list().split(";"))
    return ["-O3", "--expt-relaxed-constexpr", *(["-DANCHOR_KERNELS_SM90A=1"] if sm90a else [])]


def cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def cutlass_include() -> str | None:
    """The include directory of the ``nvidia-cutlass`` package (``cute/``, ``cutlass/``), or None
    when the package is missing or lacks the CuTe headers. Found without importing the package."""
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        return None
    roots = (spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        include = os.path.join(root, "source", "include")
        if os.path.isfile(os.path.join(include, "cute", "tensor.hpp")):
            return include
    return None


def _cutlass_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("nvidia-cutlass")
    except Exception:
        return None


def cuda_skip_reason() -> str | None:
    """Why the CUDA half is not built here (None when it is): judged from torch's build, the
    toolkit and the CUTLASS headers, not from a visible GPU."""
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    if not cuda_home():
        return "no CUDA toolkit found (set CUDA_HOME to the toolkit that matches torch)"
    if cutlass_include() is None:
        return (f"nvidia-cutlass is not installed (pip install {CUTLASS_REQUIREMENT}): the CUDA "
                "kernels use its CuTe headers")
    return None


def include_dirs(with_cuda: bool) -> list[str]:
    """csrc/, and for the CUDA half the CUTLASS headers (when found)."""
    cutlass = cutlass_include() if with_cuda else None
    return [CSRC_DIR] + ([cutlass] if cutlass else [])


def sources(with_cuda: bool) -> list[str]:
    files = sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(CSRC_DIR, "cuda", "*.cpp")))
        files += sorted(glob.glob(os.path.join(CSRC_DIR, "cuda", "*.cu")))
    return files


def build_key(with_cuda: bool) -> str:
    """Hash of every file under csrc/, the flags, the include directories and the versions the
    build depends on (nvidia-cutlass's too, for the CUDA half)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC_DIR, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, CSRC_DIR).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    parts = (cxx_flags(), (cuda_flags(), cuda_arch_list()) if with_cuda else None, torch.__version__,
             torch.version.cuda, sysconfig.get_config_var("SOABI"))
    if with_cuda:
        parts += (cutlass_include(), _cutlass_version())
    h.update(repr(parts).encode())
    return h.hexdigest()[:16]


def _build_root() -> str:
    root = os.path.join(REPO_DIR, "build", "ext")
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    from torch.utils.cpp_extension import get_default_build_root

    return os.path.join(get_default_build_root(), "anchor_kernels")


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the venv's (or the ninja wheel's) may not be."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    for d in dirs:
        if os.path.isfile(os.path.join(d, "ninja")) and d not in path:
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            path.insert(0, d)


def _prebuilt() -> str | None:
    """A library built by setup.py, unless csrc/ holds newer sources than it."""
    libs = sorted(glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")))
    if not libs:
        return None
    srcs = glob.glob(os.path.join(CSRC_DIR, "**", "*"), recursive=True)
    if srcs and max(os.path.getmtime(p) for p in srcs) > os.path.getmtime(libs[0]):
        return None
    return libs[0]


def _has_cuda_kernels() -> bool:
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("anchor_kernels::")]
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in ops)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(str(text).strip().splitlines()[-lines:])


def _build(with_cuda: bool, note: str = "") -> str | None:
    """JIT-build and load csrc/ (with or without its CUDA half); the reason on failure.
    The first build of a key prints one line (with `note` appended)."""
    key = build_key(with_cuda)
    build_dir = os.path.join(_build_root(), key)
    os.makedirs(build_dir, exist_ok=True)
    if not glob.glob(os.path.join(build_dir, NAME + "*.so")):
        half = "CPU and CUDA halves" if with_cuda else "CPU half"
        print(f"anchor_kernels: building the C++ extension ({half}) in {build_dir}, once{note}",
              file=sys.stderr)
    _ensure_ninja_on_path()
    from torch.utils import cpp_extension

    arches = cuda_arch_list() if with_cuda else ""
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arches:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arches  # read by torch's builder
    try:
        cpp_extension.load(
            name=NAME,
            sources=sources(with_cuda),
            extra_cflags=cxx_flags(),
            extra_cuda_cflags=cuda_flags(),
            extra_ldflags=openmp_flags(),
            extra_include_paths=include_dirs(with_cuda),
            build_directory=build_dir,
            is_python_module=False,
            verbose=os.environ.get("ANCHOR_KERNELS_VERBOSE_BUILD") == "1",
        )
    except Exception as exc:
        return f"the C++ extension failed to build or load ({type(exc).__name__}): {_tail(exc)}"
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    _state["library"] = build_dir
    return None


def _load() -> str | None:
    prebuilt = _prebuilt()
    if prebuilt is not None:
        try:
            torch.ops.load_library(prebuilt)
            _state["library"] = prebuilt
            if not _has_cuda_kernels():
                _state["cuda_error"] = "the prebuilt C++ extension has no CUDA kernels"
            return None
        except Exception as exc:  # fall through to a JIT build
            _state["prebuilt_error"] = f"{prebuilt}: {exc}"
    if not os.path.isdir(CSRC_DIR):
        return ("the C++ extension is not built: no prebuilt anchor_kernels/_C library and no "
                f"csrc/ sources next to the package ({REPO_DIR}); build it ahead of time with "
                "ANCHOR_KERNELS_BUILD_EXT=1 (see setup.py)")
    skip = cuda_skip_reason()
    if skip is None:
        error = _build(with_cuda=True)
        if error is None:
            return None
        # A CUDA half that does not build must not take the CPU half with it.
        skip = "its build failed: " + error
    _state["cuda_error"] = "the CUDA half of the C++ extension is not built: " + skip
    return _build(with_cuda=False, note=f"; CUDA half skipped: {skip}")


def load() -> str | None:
    """Build (first call) and load the extension. Returns None when the ``anchor_kernels::``
    C++ ops are registered, else the reason they are not; never raises."""
    if "error" not in _state:
        try:
            _state["error"] = _load()
        except Exception as exc:  # anything unexpected still only disables the backends
            _state["error"] = f"the C++ extension could not be loaded ({type(exc).__name__}): {exc}"
    return _state["error"]


def cuda_error() -> str | None:
    """None when the CUDA kernels are registered, else why not."""
    err = load()
    return err if err is not None else _state.get("cuda_error")
