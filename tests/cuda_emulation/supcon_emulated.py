"""The CUDA SupCon kernels run on the host (``emulator.cpp``), driven like ``csrc/cuda/supcon_cuda.cpp``
drives them on a GPU: the same launches (row norms, the loss kernels, the loss reduction and
the backward's anchor staging), the same chain rule through the norm.

The emulation compiles the kernels' device code without WMMA, so it checks everything but the
tensor-core tile products (indexing, tiling, masks, self column, online statistics, pair
reductions, barriers, the backward's H tile and second product, scaling, both-set passes).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")
NORM_EPS = 1e-12
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FWD_LSE, FWD_UNIFORM, FWD_SOFT = 0, 1, 2
BWD_LSE, BWD_UNIFORM, BWD_SOFT_DETACHED, BWD_SOFT_EXACT = 0, 1, 2, 3

_p = ctypes.c_void_p


class Matrix(ctypes.Structure):
    _fields_ = [("data", _p), ("rows", ctypes.c_int64), ("s0", ctypes.c_int64),
                ("s1", ctypes.c_int64)]


class FwdArgs(ctypes.Structure):
    _fields_ = [("x", Matrix), ("y", Matrix), ("D", ctypes.c_int64), ("lx", _p), ("ly", _p),
                ("rnx", _p), ("rny", _p), ("has_self", ctypes.c_bool), ("shift", ctypes.c_int64),
                ("inv_tau", ctypes.c_float), ("nbt", ctypes.c_float), ("shift2", ctypes.c_float),
                ("mode", ctypes.c_int), ("loss", _p), ("valid", _p), ("stats", _p),
                ("splits", ctypes.c_int), ("partial", _p)]


class BwdArgs(ctypes.Structure):
    _fields_ = [("x", Matrix), ("y", Matrix), ("D", ctypes.c_int64), ("lx", _p), ("ly", _p),
                ("rnx", _p), ("rny", _p), ("anchor", _p), ("M", ctypes.c_int64), ("gmax", _p),
                ("outer", ctypes.c_bool), ("inner", ctypes.c_bool), ("has_self", ctypes.c_bool),
                ("shift", ctypes.c_int64), ("inv_tau", ctypes.c_float), ("nbt", ctypes.c_float),
                ("mode", ctypes.c_int), ("dx", _p),
                # read by the tensor-core kernels only; null here (the emulated kernels write dx)
                ("df", _p), ("norms", _p), ("prescale", _p), ("norm_eps", ctypes.c_float),
                ("splits", ctypes.c_int)]


class RowNormArgs(ctypes.Structure):
    _fields_ = [("x", Matrix), ("y", Matrix), ("D", ctypes.c_int64), ("normalize", ctypes.c_bool),
                ("eps", ctypes.c_float), ("norms", _p), ("inv", _p), ("scaled", _p),
                ("prescale", _p), ("big", ctypes.c_float), ("tf32", ctypes.c_bool)]


class NormBwdArgs(ctypes.Structure):
    _fields_ = [("x", Matrix), ("dz", _p), ("norms", _p), ("prescale", _p), ("D", ctypes.c_int64),
                ("normalize", ctypes.c_bool), ("eps", ctypes.c_float), ("dx", _p),
                ("parts", ctypes.c_int)]


class LossReduceArgs(ctypes.Structure):
    _fields_ = [("loss", _p), ("valid", _p), ("M", ctypes.c_int64), ("scale", ctypes.c_float),
                ("reduction", ctypes.c_int), ("out", _p)]


class AnchorStageArgs(ctypes.Structure):
    _fields_ = [("stats", _p), ("grad", _p), ("grad_stride", ctypes.c_int64), ("M", ctypes.c_int64),
                ("scale", ctypes.c_float), ("reduction", ctypes.c_int), ("uniform", ctypes.c_bool),
                ("anchor", _p), ("gmax", _p)]


def cuda_include_dir() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for root in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


def nvcc() -> str | None:
    """The CUDA compiler: on PATH, else in the toolkit torch found; None when there is none."""
    from anchor_kernels import _ext

    found = shutil.which("nvcc") or os.path.join(_ext.cuda_home() or "", "bin", "nvcc")
    return found if os.path.isfile(found) else None


def build(out_dir: str) -> str:
    """Compile emulator.cpp with the kernels into a shared library; returns its path."""
    include = cuda_include_dir()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or cxx is None:
        raise FileNotFoundError("needs a C++ compiler and the CUDA toolkit headers (cuda_fp16.h)")
    lib = os.path.join(out_dir, "supcon_emulator.so")
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", include, "-I", CSRC,
                    "-include", os.path.join(HERE, "cuda_host_shim.h"),
                    os.path.join(HERE, "emulator.cpp"), "-o", lib],
                   check=True, capture_output=True, text=True)
    return lib


def row_norms(lib, f, g, normalize, order=0, tf32=False):
    """(rows, norms, inverse norms, prescale factors) from emu_row_norms in lib (every emulator
    library has it): what the kernels read, f's then g's rows (none when g is None) as one
    (M + N, D) tensor, and per row of it its statistics. ``rows`` and ``prescale`` are the
    overflow-safe copy and its factors for bf16 and fp32 inputs with normalisation, and for
    fp32 rows with ``tf32`` (kTFloat32) the copy rounded to TF32 (as rows_glue.h asks for
    them), else the inputs themselves and None."""
    rows = f.shape[0] + (0 if g is None else g.shape[0])
    d = f.shape[1]
    out = torch.empty(3, rows)
    copy = (normalize and f.dtype != torch.float16) or tf32
    scaled = torch.empty(rows, d, dtype=f.dtype) if copy else None
    big = (torch.finfo(torch.float32).max / (4.0 * d)) ** 0.5 if copy else 0.0
    args = RowNormArgs(matrix(f), matrix(g), d, normalize, NORM_EPS,
                       out[0].data_ptr(), out[1].data_ptr(),
                       scaled.data_ptr() if copy else None,
                       out[2].data_ptr() if copy else None, big, tf32)
    _check(lib.emu_row_norms(DTYPE_CODES[f.dtype], ctypes.byref(args), order))
    if not copy:
        scaled = f if g is None else torch.cat([f, g])
    return scaled, out[0], out[1], out[2] if copy else None


def matrix(x: torch.Tensor | None) -> Matrix:
    """The kernels' view of a 2-D tensor (an empty matrix for None)."""
    if x is None:
        return Matrix(None, 0, 0, 0)
    return Matrix(x.data_ptr(), x.shape[0], x.stride(0), x.stride(1))


def _check(rc: int) -> None:
    assert rc == 0, "threads of a block passed different numbers of barriers"


class Emulator:
    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        for name, struct in (("fwd_args", FwdArgs), ("bwd_args", BwdArgs), ("row_norm_args", RowNormArgs),
                             ("norm_bwd_args", NormBwdArgs),
                             ("loss_reduce_args", LossReduceArgs),
                             ("anchor_stage_args", AnchorStageArgs)):
            assert getattr(self.lib, f"emu_sizeof_{name}")() == ctypes.sizeof(struct), name

    def row_norms(self, f, g, normalize, order=0, tf32=False):
        return row_norms(self.lib, f, g, normalize, order, tf32)

    def loss_reduce(self, loss, valid, scale, reduction, order=0):
        out = torch.empty(loss.shape[0] if reduction == 0 else 1)
        args = LossReduceArgs(loss.data_ptr(), valid.data_ptr(), loss.shape[0], scale, reduction,
                              out.data_ptr())
        _check(self.lib.emu_loss_reduce(ctypes.byref(args), order))
        return out if reduction == 0 else out[0]

    def anchor_stage(self, stats, grad, scale, reduction, uniform, order=0):
        """(anchor (4, M), gmax (1,)) as the backward kernels read them."""
        m = stats.shape[0]
        grad = grad.float()
        out = torch.empty(4 * m + 1)
        args = AnchorStageArgs(stats.contiguous().data_ptr(), grad.data_ptr(),
                               grad.stride(0) if grad.dim() else 0, m, scale, reduction, uniform,
                               out.data_ptr(), out[4 * m:].data_ptr())
        _check(self.lib.emu_anchor_stage(ctypes.byref(args), order))
        return out[:4 * m].view(4, m), out[4 * m:]

    def forward(self, f, y, g, y_g, *, temperature, beta, normalize, anchor_offset, lse_only,
                scale=1.0, reduction=0, order=0):
        """(loss, valid (M,), stats (M, 4)) as supcon_fwd returns them."""
        single = g is None
        gg = f if single else g
        lf = y.long().contiguous()
        lg = lf if single else y_g.long().contiguous()
        m = f.shape[0]
        rows, _, inv, _ = self.row_norms(f, g, normalize, order)
        f, gg = rows[:m], (rows[:m] if single else rows[m:])
        rnf, rng = inv[:m], (inv[:m] if single else inv[m:])
        loss, stats = torch.empty(m), torch.empty(m, 4)
        valid = torch.empty(m, dtype=torch.bool)
        has_self = anchor_offset is not None
        mode = FWD_LSE if lse_only else (FWD_UNIFORM if beta == 0 else FWD_SOFT)
        args = FwdArgs(matrix(f), matrix(gg), f.shape[1], lf.data_ptr(), lg.data_ptr(),
                       rnf.data_ptr(), rng.data_ptr(), has_self,
                       anchor_offset if has_self else 0, 1.0 / temperature, -beta * temperature,
                       0.0, mode, loss.data_ptr(), valid.data_ptr(), stats.data_ptr())
        _check(self.lib.emu_supcon_fwd(DTYPE_CODES[f.dtype], ctypes.byref(args), order))
        if reduction == 0 and scale == 1.0:
            return loss, valid, stats
        return self.loss_reduce(loss, valid, scale, reduction, order), valid, stats

    def backward(self, grad, f, y, g, y_g, stats, *, temperature, beta, detach_weights,
                 normalize, anchor_offset, lse_only, scale=1.0, reduction=0, order=0):
        """(grad f (M, D), grad g (N, D) or None) as supcon_bwd returns them."""
        single = g is None
        gg = f if single else g
        lf = y.long().contiguous()
        lg = lf if single else y_g.long().contiguous()
        m, d = f.shape
        rows, norms, inv, pre = self.row_norms(f, g, normalize, order)
        f, gg = rows[:m], (rows[:m] if single else rows[m:])
        nf, rnf, pf = norms[:m], inv[:m], (None if pre is None else pre[:m])
        ng, rng, pg = (nf, rnf, pf) if single else (norms[m:], inv[m:], None if pre is None else pre[m:])
        mode = (BWD_LSE if lse_only else BWD_UNIFORM if beta == 0
                else BWD_SOFT_DETACHED if detach_weights else BWD_SOFT_EXACT)
        anchor, gmax = self.anchor_stage(stats, grad, scale, reduction, mode == BWD_UNIFORM, order)
        has_self = anchor_offset is not None

        def launch(x, lx, rnx, yy, ly, rny, outer, inner, shift):
            dx = torch.empty(x.shape[0], d)
            args = BwdArgs(matrix(x), matrix(yy), d, lx.data_ptr(), ly.data_ptr(),
                           rnx.data_ptr(), rny.data_ptr(), anchor.data_ptr(), m, gmax.data_ptr(),
                           outer, inner, has_self, shift if has_self else 0, 1.0 / temperature,
                           -beta * temperature, mode, dx.data_ptr())
            _check(self.lib.emu_supcon_bwd(DTYPE_CODES[f.dtype], ctypes.byref(args), order))
            return dx

        dzf = launch(f, lf, rnf, gg, lg, rng, True, single, anchor_offset or 0)
        df = normalize_backward(self.lib, f, nf, pf, dzf, normalize, order)
        if single:
            return df, None
        dzg = launch(gg, lg, rng, f, lf, rnf, False, True, -(anchor_offset or 0))
        return df, normalize_backward(self.lib, gg, ng, pg, dzg, normalize, order)


def normalize_backward(lib, x, norms, prescale, dz, normalize, order=0):
    """rows_glue.h's normalize_backward: emu_norm_backward in lib (every emulator library has
    it) on the rows x the kernels read, prescale None where no copy was made; dz (R, D), or
    (parts, R, D) to be summed."""
    dx = torch.empty(x.shape, dtype=x.dtype)
    dz = dz.contiguous()
    args = NormBwdArgs(matrix(x), dz.data_ptr(), norms.contiguous().data_ptr(),
                       None if prescale is None else prescale.contiguous().data_ptr(), x.shape[1],
                       normalize, NORM_EPS, dx.data_ptr(), dz.shape[0] if dz.dim() == 3 else 1)
    _check(lib.emu_norm_backward(DTYPE_CODES[x.dtype], ctypes.byref(args), order))
    return dx
