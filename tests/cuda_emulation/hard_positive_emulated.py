"""The CUDA hard-positive selection kernel runs on the host (``hard_positive_emulator.cpp``),
driven like ``csrc/cuda/hard_positive_cuda.cpp`` drives it on a GPU. The device code is compiled
without WMMA (see ``similarity_emulated.py``): this checks the tile skipping, masks, self
column, the running top-k with its int64 keys, the final sort and the decoding."""

from __future__ import annotations

import ctypes

import torch

from .supcon_emulated import DTYPE_CODES, Matrix, matrix, row_norms

_p = ctypes.c_void_p


class Args(ctypes.Structure):
    _fields_ = [("z", Matrix), ("c", Matrix), ("D", ctypes.c_int64), ("lz", _p), ("lc", _p),
                ("rnz", _p), ("rnc", _p), ("has_self", ctypes.c_bool), ("offset", ctypes.c_int64),
                ("keff", ctypes.c_int64), ("keys", _p), ("idx", _p), ("cos", _p),
                ("k", ctypes.c_int64)]


class Emulator:
    def __init__(self, lib_path: str):
        self.lib = ctypes.CDLL(lib_path)
        assert self.lib.emu_sizeof_hard_positive_args() == ctypes.sizeof(Args)

    def select(self, z, labels, c, c_labels, k, normalize, anchor_offset, order=0):
        """(indices, cosines) as hard_positive_cuda returns them."""
        m, n = z.shape[0], c.shape[0]
        keff = min(k, n)
        idx = torch.full((m, k), -1, dtype=torch.int64)
        cos = torch.full((m, k), float("inf"))
        keys = torch.empty(m, keff, dtype=torch.int64)
        same = c is z
        rows, _, inv, _ = row_norms(self.lib, z, None if same else c, normalize, order)
        xz, xc = rows[:m], (rows[:m] if same else rows[m:])
        rz, rc = inv[:m], (inv[:m] if same else inv[m:])
        lz, lc = labels.long().contiguous(), c_labels.long().contiguous()
        args = Args(matrix(xz), matrix(xc), z.shape[1], lz.data_ptr(), lc.data_ptr(),
                    rz.data_ptr(), rc.data_ptr(), anchor_offset is not None, anchor_offset or 0,
                    keff, keys.data_ptr(), idx.data_ptr(), cos.data_ptr(), k)
        assert self.lib.emu_hard_positive(DTYPE_CODES[z.dtype], ctypes.byref(args), order) == 0
        return idx, cos
