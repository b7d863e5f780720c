"""The CUDA similarity kernels run on the host (``similarity_emulator.cpp``), driven like
``csrc/cuda/similarity_cuda.cpp`` drives them on a GPU: same inverse norms, same launches, same
chain rule through the normalisation.

As for the SupCon kernels (``supcon_emulated.py``), the device code is compiled without WMMA:
this checks indexing, tiling, masks, strides (G and G^T), barriers and scaling, not the
tensor-core tile products.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import torch

from .supcon_emulated import CSRC, DTYPE_CODES, HERE, NORM_EPS, Matrix, cuda_include_dir

_p = ctypes.c_void_p


class FwdArgs(ctypes.Structure):
    _fields_ = [("a", Matrix), ("b", Matrix), ("D", ctypes.c_int64), ("rna", _p), ("rnb", _p),
                ("inv_t", ctypes.c_float), ("s", _p), ("ld_s", ctypes.c_int64)]


class BwdArgs(ctypes.Structure):
    _fields_ = [("g", _p), ("gr", ctypes.c_int64), ("gq", ctypes.c_int64), ("R", ctypes.c_int64),
                ("y", Matrix), ("D", ctypes.c_int64), ("rny", _p), ("inv_t", ctypes.c_float),
                ("dz", _p)]


def build_emulator(source: str, out_dir: str) -> str:
    """Compile one of the ``*_emulator.cpp`` files with its kernels; returns the library."""
    include = cuda_include_dir()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or cxx is None:
        raise FileNotFoundError("needs a C++ compiler and the CUDA toolkit headers (cuda_fp16.h)")
    lib = os.path.join(out_dir, os.path.splitext(source)[0] + ".so")
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", include, "-I", CSRC,
                    "-I", os.path.join(CSRC, "cuda"), "-I", HERE,
                    "-include", os.path.join(HERE, "cuda_host_shim.h"),
                    os.path.join(HERE, source), "-o", lib],
                   check=True, capture_output=True, text=True)
    return lib


def _matrix(x: torch.Tensor) -> Matrix:
    return Matrix(x.data_ptr(), x.shape[0], x.stride(0), x.stride(1))


class Emulator:
    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        assert self.lib.emu_sizeof_similarity_args(0) == ctypes.sizeof(FwdArgs)
        assert self.lib.emu_sizeof_similarity_args(1) == ctypes.sizeof(BwdArgs)

    @staticmethod
    def norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        if not normalize:
            return torch.ones(x.shape[0])
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS)

    def forward(self, a, b, normalize, temperature, order=0):
        """(S, n_a, n_b) as similarity_fwd_cuda returns them."""
        na, nb = self.norms(a, normalize), self.norms(b, normalize)
        rna, rnb = na.reciprocal(), nb.reciprocal()
        s = torch.empty(a.shape[0], b.shape[0], dtype=a.dtype)
        args = FwdArgs(_matrix(a), _matrix(b), a.shape[1], rna.data_ptr(), rnb.data_ptr(),
                       1.0 / temperature, s.data_ptr(), s.stride(0))
        assert self.lib.emu_similarity_fwd(DTYPE_CODES[a.dtype], ctypes.byref(args), order) == 0
        return s, na, nb

    def _side(self, g, gr, gq, x, y, nx, ny, normalize, temperature, order):
        dz = torch.empty(x.shape, dtype=torch.float32)
        rny = ny.reciprocal()
        args = BwdArgs(g.data_ptr(), gr, gq, x.shape[0], _matrix(y), x.shape[1], rny.data_ptr(),
                       1.0 / temperature, dz.data_ptr())
        assert self.lib.emu_similarity_bwd(DTYPE_CODES[x.dtype], ctypes.byref(args), order) == 0
        if not normalize:
            return dz.to(x.dtype)
        z = x.float() / nx[:, None]
        proj = torch.where(nx > NORM_EPS, (z * dz).sum(1), torch.zeros(()))
        return ((dz - proj[:, None] * z) / nx[:, None]).to(x.dtype)

    def backward(self, grad, a, b, na, nb, normalize, temperature, order=0):
        """(da, db) as similarity_bwd_cuda returns them."""
        g = grad.to(a.dtype)
        return (self._side(g, g.stride(0), g.stride(1), a, b, na, nb, normalize, temperature, order),
                self._side(g, g.stride(1), g.stride(0), b, a, nb, na, normalize, temperature, order))
