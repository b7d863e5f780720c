"""The CUDA similarity kernels run on the host (``similarity_emulator.cpp``), driven like
``csrc/cuda/similarity_cuda.cpp`` drives them on a GPU: the same row-norms launch (with its
overflow-safe copy), same launches, same chain rule through the normalisation.

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

from .supcon_emulated import (CSRC, DTYPE_CODES, HERE, Matrix, cuda_include_dir, matrix,
                              normalize_backward, row_norms)

_p = ctypes.c_void_p


class FwdArgs(ctypes.Structure):
    _fields_ = [("a", Matrix), ("b", Matrix), ("D", ctypes.c_int64), ("rna", _p), ("rnb", _p),
                ("inv_t", ctypes.c_float), ("s", _p), ("ld_s", ctypes.c_int64)]


class BwdArgs(ctypes.Structure):
    _fields_ = [("g", _p), ("gr", ctypes.c_int64), ("gq", ctypes.c_int64), ("R", ctypes.c_int64),
                ("y", Matrix), ("D", ctypes.c_int64), ("rny", _p), ("inv_t", ctypes.c_float),
                ("dz", _p), ("splits", ctypes.c_int)]


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


class Emulator:
    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        assert self.lib.emu_sizeof_similarity_args(0) == ctypes.sizeof(FwdArgs)
        assert self.lib.emu_sizeof_similarity_args(1) == ctypes.sizeof(BwdArgs)

    def forward(self, a, b, normalize, temperature, order=0):
        """S as similarity_fwd_cuda returns it."""
        m, single = a.shape[0], b is a
        rows, _, inv, _ = row_norms(self.lib, a, None if single else b, normalize, order)
        of_b = slice(0, m) if single else slice(m, None)
        s = torch.empty(m, b.shape[0], dtype=a.dtype)
        args = FwdArgs(matrix(rows[:m]), matrix(rows[of_b]), a.shape[1], inv[:m].data_ptr(),
                       inv[of_b].data_ptr(), 1.0 / temperature, s.data_ptr(), s.stride(0))
        assert self.lib.emu_similarity_fwd(DTYPE_CODES[a.dtype], ctypes.byref(args), order) == 0
        return s

    def _side(self, g, gr, gq, x, y, nx, px, rny, normalize, temperature, order):
        dz = torch.empty(x.shape, dtype=torch.float32)
        args = BwdArgs(g.data_ptr(), gr, gq, x.shape[0], matrix(y), x.shape[1], rny.data_ptr(),
                       1.0 / temperature, dz.data_ptr())
        assert self.lib.emu_similarity_bwd(DTYPE_CODES[x.dtype], ctypes.byref(args), order) == 0
        return normalize_backward(self.lib, x, nx, px, dz, normalize, order)

    def backward(self, grad, a, b, normalize, temperature, order=0):
        """(da, db) as similarity_bwd_cuda returns them (the rows and norms again)."""
        m = a.shape[0]
        rows, norms, inv, pre = row_norms(self.lib, a, b, normalize, order)
        xa, xb = rows[:m], rows[m:]
        pa, pb = (None, None) if pre is None else (pre[:m], pre[m:])
        g = grad.to(a.dtype)
        return (self._side(g, g.stride(0), g.stride(1), xa, xb, norms[:m], pa, inv[m:], normalize,
                           temperature, order),
                self._side(g, g.stride(1), g.stride(0), xb, xa, norms[m:], pb, inv[:m], normalize,
                           temperature, order))
