"""Build script. The package is pure Python plus an optional C++/CUDA extension (csrc/) that
is compiled just in time on first use (see anchor_kernels/_ext.py).

To compile the extension ahead of time instead, with torch already installed:

    ANCHOR_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .

The CUDA half is built when torch is a CUDA build, a CUDA toolkit is found (torch.version.cuda
and CUDA_HOME; no GPU is needed) and nvidia-cutlass is installed (its CuTe headers); otherwise
the CPU half alone, with one line saying why. TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") picks the
GPU architectures it is compiled for; without it the visible GPUs', so set it on a machine
without one. "9.0" is built as "9.0a", the Hopper-specific code the wgmma kernels need.
ANCHOR_KERNELS_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 picks the CPU vector ISA (default: this
machine's), e.g. DEFAULT for a build that runs on any x86-64.
"""

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_build():
    """(ext_modules, cmdclass): empty unless ANCHOR_KERNELS_BUILD_EXT=1."""
    if os.environ.get("ANCHOR_KERNELS_BUILD_EXT", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sys.path.insert(0, HERE)
    from anchor_kernels import _ext

    skip = _ext.cuda_skip_reason()
    if skip:
        print(f"anchor_kernels: building the C++ extension for CPU only; CUDA half skipped: {skip}")
    sources = [os.path.relpath(p, HERE) for p in _ext.sources(with_cuda=skip is None)]
    arches = _ext.cuda_arch_list() if skip is None else ""
    if arches:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arches  # Hopper as sm_90a
    kind = CppExtension if skip else CUDAExtension
    ext = kind("anchor_kernels._C", sources, include_dirs=_ext.include_dirs(with_cuda=skip is None),
               extra_compile_args={"cxx": _ext.cxx_flags(), "nvcc": _ext.cuda_flags()},
               extra_link_args=_ext.openmp_flags())
    # The library registers torch ops and is loaded with torch.ops.load_library, not imported.
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_build()

setup(
    name="anchor_kernels",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for ANCHOR hard-mined supervised contrastive learning",
    packages=find_packages(include=["anchor_kernels", "anchor_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    # "cuda": the CUTLASS/CuTe headers the CUDA half of the extension is compiled with.
    extras_require={"triton": ["triton>=3.0"], "cuda": ["nvidia-cutlass==4.2.0.0"],
                    "train": ["tqdm", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["anchor-train=anchor_kernels.train.trainer:main"]},
)
