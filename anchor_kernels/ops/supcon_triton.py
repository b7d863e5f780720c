"""The "triton" backend of the SupCon loss: launchers, ``torch.library`` custom ops with
registered fake kernels and autograd, and the backend object used by ``supcon_loss``.

The kernels themselves are in ``supcon_kernels_triton.py``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from ..backends import SupConProblem
from ..reference import NORM_EPS
from . import supcon_kernels_triton as kernels
from . import supcon_topk

MAX_D = 256  # a row block of f stays in registers: whole feature dimension per tile
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Every configuration the autotuner may pick on a GPU; the tests compile each one for sm_90.
# Half precision runs on the tensor cores (wgmma); fp32 at "highest" precision is an FMA
# loop, where large tiles only spill, so it gets its own smaller tiles.
CONFIGS = {
    "fwd_half": [_config(128, 64, 8, 3), _config(128, 128, 8, 2), _config(64, 64, 4, 3),
                 _config(64, 128, 4, 3)],
    "bwd_half": [_config(64, 64, 8, 2), _config(64, 64, 4, 2), _config(128, 64, 8, 2),
                 _config(64, 128, 8, 2)],
    "fwd_fp32": [_config(64, 32, 4, 2), _config(32, 64, 4, 2), _config(64, 64, 8, 2)],
    "bwd_fp32": [_config(64, 32, 4, 2), _config(32, 64, 4, 2), _config(32, 32, 4, 2)],
}
# The interpreter runs one numpy program per block: fewer, larger blocks are faster there.
INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32}
_KERNELS = {"fwd": kernels._supcon_fwd_kernel, "bwd_rows": kernels._supcon_bwd_rows_kernel,
            "bwd_cols": kernels._supcon_bwd_cols_kernel}


def config_family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def configs_for(kernel: str, dtype: torch.dtype) -> list:
    return CONFIGS[("fwd_" if kernel == "fwd" else "bwd_") + config_family(dtype)]


# ANCHOR_KERNELS_AUTOTUNE=0 launches the first configuration of each list without tuning
# (used by the GPU tests, where tuning every new shape would dominate the run).
AUTOTUNE = os.environ.get("ANCHOR_KERNELS_AUTOTUNE", "1") == "1"
_autotuned = {(k, fam): triton.autotune(CONFIGS[("fwd_" if k == "fwd" else "bwd_") + fam],
                                        key=["M", "N", "D"])(fn)
              for k, fn in _KERNELS.items() for fam in ("half", "fp32")}


def _launcher(kernel: str, dtype: torch.dtype):
    """(launchable kernel, extra launch arguments) for this kernel and dtype."""
    if INTERPRET:
        return _KERNELS[kernel], INTERPRET_META
    if AUTOTUNE:
        return _autotuned[(kernel, config_family(dtype))], {}
    config = configs_for(kernel, dtype)[0]
    return _KERNELS[kernel], dict(config.kwargs, num_warps=config.num_warps,
                                  num_stages=config.num_stages)


def _launch(kernel: str, dtype: torch.dtype, rows: int, block: str, splits: int, *args,
            **constexprs):
    fn, meta = _launcher(kernel, dtype)
    fn[lambda m: (triton.cdiv(rows, m[block]), splits)](*args, **constexprs, **meta)


SPLIT_ALIGN = 128  # chunk boundaries on multiples of every BLOCK_M / BLOCK_N


def num_splits(rows: int, cols: int, device: torch.device) -> int:
    """Chunks to cut the streamed dimension into so that about two programs per SM run when
    there are few row blocks (small batches); 1 for large batches."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(rows, 128)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(cols, 4 * SPLIT_ALIGN), 16))


def chunking(rows: int, cols: int, device: torch.device) -> tuple[int, int]:
    """(splits, streamed rows per split) with chunk starts aligned to SPLIT_ALIGN."""
    per_split = triton.cdiv(triton.cdiv(cols, num_splits(rows, cols, device)), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(cols, per_split), per_split


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting ("highest" means no TF32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def dot_flags(dtype: torch.dtype) -> dict:
    return dict(DOT_PRECISION=dot_precision(dtype), UPCAST=INTERPRET and dtype == torch.bfloat16)


def inv_norms(x: Tensor, normalize: bool) -> Tensor:
    """(rows,) float32 1 / max(||x_i||, eps), or ones: the kernels scale dot tiles by these."""
    if not normalize:
        return torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal()


def dense_label_ids(y_f: Tensor, y_g: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """int32 ids in [0, M + N), equal iff the labels are equal: the kernels compare 32-bit
    ids (half the registers of int64) and use -1/-2 for padding. Sort + searchsorted, so no
    host synchronisation."""
    every = y_f if y_g is None else torch.cat([y_f, y_g])
    table = torch.sort(every).values
    ids = lambda y: torch.searchsorted(table, y, out_int32=True)  # noqa: E731
    return ids(y_f), (None if y_g is None else ids(y_g))


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("anchor_kernels::supcon_fwd_triton", mutates_args=())
def supcon_fwd_triton(
    f: Tensor,  # (M, D)
    g: Optional[Tensor],  # (N, D); None: the contrast set is f itself
    y_f: Tensor,  # (M,) int32 dense label ids (see dense_label_ids)
    y_g: Optional[Tensor],  # (N,) int32
    self_offset: int,  # anchor i's own column is i + self_offset (N: none)
    temperature: float,
    beta: float,
    normalize: bool,
    lse_only: bool,
    exact_weights: bool,  # read by the backward only
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss_i, LSE_i, sbar_i, log2 Z_i, npos_i, 1/||f_i||, 1/||g_j||), all O(M + N)."""
    single = g is None
    g_, y_g_ = (f, y_f) if single else (g, y_g)
    m, d = f.shape
    n = g_.shape[0]
    rf = inv_norms(f, normalize)
    rg = rf if single else inv_norms(g_, normalize)
    loss, lse, sbar, logz2 = (torch.empty(m, device=f.device, dtype=torch.float32) for _ in range(4))
    npos = torch.empty(m, device=f.device, dtype=torch.int32)
    splits, per_split = chunking(m, n, f.device)
    part = torch.empty(6, splits, m, device=f.device, dtype=torch.float32) if splits > 1 else loss
    flags = dict(BETA_ZERO=beta == 0.0, LSE_ONLY=lse_only)
    with _device_guard(f):
        _launch(
            "fwd", f.dtype, m, "BLOCK_M", splits, f, g_, y_f, y_g_, rf, rg, loss, lse, sbar,
            logz2, npos, part, m, n, d, f.stride(0), f.stride(1), g_.stride(0), g_.stride(1),
            self_offset, 1.0 / temperature, beta, per_split, **flags, **dot_flags(f.dtype),
            SPLIT=splits > 1, BLOCK_D=block_d(d))
        if splits > 1:
            kernels._supcon_fwd_combine_kernel[(triton.cdiv(m, 128),)](
                part, loss, lse, sbar, logz2, npos, m, splits, **flags, BLOCK_M=128)
    rg_out = rf.new_empty(0) if single else rg  # outputs of a custom op may not alias
    return loss, lse, sbar, logz2, npos, rf, rg_out


@supcon_fwd_triton.register_fake
def _(f, g, y_f, y_g, self_offset, temperature, beta, normalize, lse_only, exact_weights):
    m = f.shape[0]
    vec = lambda n, dt=torch.float32: f.new_empty(n, dtype=dt)  # noqa: E731
    return (vec(m), vec(m), vec(m), vec(m), vec(m, torch.int32), vec(m),
            vec(0 if g is None else g.shape[0]))


@torch.library.custom_op("anchor_kernels::supcon_bwd_triton", mutates_args=())
def supcon_bwd_triton(
    grad: Tensor,  # (M,) dL/dL_i
    f: Tensor, g: Optional[Tensor], y_f: Tensor, y_g: Optional[Tensor],
    lse: Tensor, sbar: Tensor, logz2: Tensor, npos: Tensor, rf: Tensor, rg: Tensor,
    self_offset: int, temperature: float, beta: float, normalize: bool, lse_only: bool,
    exact_weights: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (df (M, D), dg (N, D)); dg is empty when g is None (its part is in df)."""
    single = g is None
    g_, y_g_ = (f, y_f) if single else (g, y_g)
    rg_ = rf if single else rg
    m, d = f.shape
    n = g_.shape[0]
    grad = grad.to(torch.float32).contiguous()
    df = torch.empty(m, d, device=f.device, dtype=f.dtype)
    flags = dict(NORMALIZE=normalize, BETA_ZERO=beta == 0.0, LSE_ONLY=lse_only,
                 EXACT=exact_weights and beta != 0.0, **dot_flags(f.dtype),
                 BLOCK_D=block_d(d))
    scalars = (self_offset, 1.0 / temperature, beta)
    with _device_guard(f):
        _grad_pass("bwd_rows", f, m, n, "BLOCK_M", df, (f, g_, y_f, y_g_, rf, rg_, lse, sbar,
                   logz2, npos, grad), scalars, rf, flags, SINGLE_SET=single)
        if single:
            return df, f.new_empty(0)
        dg = torch.empty(n, d, device=g.device, dtype=g.dtype)
        _grad_pass("bwd_cols", g, n, m, "BLOCK_N", dg, (f, g, y_f, y_g, rf, rg, lse, sbar, logz2,
                   npos, grad), scalars, rg, flags)
    return df, dg


def _grad_pass(kernel, x, rows, streamed, block, out, tensors, scalars, r, flags, **extra):
    """One gradient pass (rows: dQ, cols: dK) into ``out``, chunked along the streamed
    dimension when ``rows`` alone cannot fill the GPU; ``x`` is the set being differentiated."""
    d = x.shape[1]
    f, g = tensors[0], tensors[1]
    strides = (f.stride(0), f.stride(1), g.stride(0), g.stride(1))
    m, n = f.shape[0], g.shape[0]
    splits, per_split = chunking(rows, streamed, x.device)
    if splits == 1:
        _launch(kernel, x.dtype, rows, block, 1, *tensors, out, m, n, d, *strides,
                out.stride(0), out.stride(1), *scalars, per_split, SPLIT=False, **flags, **extra)
        return
    part = torch.empty(splits, rows, d, device=x.device, dtype=torch.float32)
    _launch(kernel, x.dtype, rows, block, splits, *tensors, part, m, n, d, *strides, d, 1,
            *scalars, per_split, SPLIT=True, **flags, **extra)
    kernels._supcon_bwd_finish_kernel[(triton.cdiv(rows, 16),)](
        x, r, part, out, rows, d, splits, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        NORMALIZE=flags["NORMALIZE"], BLOCK_M=16, BLOCK_D=flags["BLOCK_D"])


@supcon_bwd_triton.register_fake
def _(grad, f, g, y_f, y_g, lse, sbar, logz2, npos, rf, rg, self_offset, temperature, beta,
      normalize, lse_only, exact_weights):
    return torch.empty_like(f, memory_format=torch.contiguous_format), (
        f.new_empty(0) if g is None else torch.empty_like(g, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    f, g, y_f, y_g, self_offset, temperature, beta, normalize, lse_only, exact = inputs
    _, lse, sbar, logz2, npos, rf, rg = output
    ctx.mark_non_differentiable(lse, sbar, logz2, npos, rf, rg)
    ctx.save_for_backward(f, g, y_f, y_g, lse, sbar, logz2, npos, rf, rg)
    ctx.scalars = (self_offset, temperature, beta, normalize, lse_only, exact)


def _backward(ctx, grad_loss, *unused_stat_grads):
    f, g, y_f, y_g, lse, sbar, logz2, npos, rf, rg = ctx.saved_tensors
    df, dg = supcon_bwd_triton(grad_loss, f, g, y_f, y_g, lse, sbar, logz2, npos, rf, rg,
                               *ctx.scalars)
    # Gradients of (f, g, y_f, y_g, self_offset, temperature, beta, normalize, lse_only, exact).
    return df, (None if g is None else dg), None, None, None, None, None, None, None, None


supcon_fwd_triton.register_autograd(_backward, setup_context=_setup_context)


class TritonSupCon:
    """Fused forward and backward in Triton: CUDA tensors (or any under TRITON_INTERPRET=1)."""

    name = "triton"

    def not_supported_reasons(self, p: SupConProblem) -> list[str]:
        reasons = []
        device = p.f.device
        if device.type != "cuda" and not INTERPRET:
            reasons.append(f"tensors are on {device.type}; Triton needs CUDA tensors "
                           "(TRITON_INTERPRET=1 runs it on the CPU, for testing)")
        elif device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            reasons.append("needs a GPU of compute capability 8.0 or newer")
        if p.f.dtype not in DTYPES:
            reasons.append(f"dtype {p.f.dtype} is not supported (float16, bfloat16, float32)")
        if p.f.shape[1] > MAX_D:
            reasons.append(f"feature dimension D={p.f.shape[1]} is over the {MAX_D} this kernel holds per tile")
        if p.topk is not None and not p.lse_only:
            reasons += supcon_topk.topk_reasons(p, "triton")
        return reasons

    def per_anchor(self, p: SupConProblem) -> tuple[Tensor, Tensor]:
        if p.topk is not None and not p.lse_only:  # LSE_i from this backend's lse_only kernels + sparse sbar_i
            return supcon_topk.topk_per_anchor(self, p, "triton")
        n = p.f.shape[0] if p.g is None else p.g.shape[0]
        self_offset = n if p.anchor_offset is None else p.anchor_offset
        y_f, y_g = dense_label_ids(p.y_f, p.y_g)
        loss, _, _, _, npos, _, _ = torch.ops.anchor_kernels.supcon_fwd_triton(
            p.f, p.g, y_f, y_g, self_offset, p.temperature,
            p.beta, p.normalize, p.lse_only, not p.detach_weights)
        return loss, npos > 0


BACKEND = TritonSupCon()


def sm90_compile_specs():
    """(kernel, signature, constexprs, num_warps, num_stages) for every kernel, dtype and
    autotuner configuration, for ``anchor_kernels.ops.sm90_check`` (compiled with no GPU)."""
    flag_sets = {
        "fwd": [dict(BETA_ZERO=False, LSE_ONLY=False, SPLIT=split) for split in (False, True)],
        "bwd_rows": [dict(SINGLE_SET=single, NORMALIZE=True, BETA_ZERO=False, LSE_ONLY=False,
                          EXACT=True, SPLIT=single) for single in (True, False)],
        "bwd_cols": [dict(NORMALIZE=True, BETA_ZERO=False, LSE_ONLY=False, EXACT=True,
                          SPLIT=False)],
    }
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    for name, kernel in _KERNELS.items():
        for dtype in DTYPES:
            for flags in flag_sets[name]:
                for config in configs_for(name, dtype):
                    constexprs = dict(flags, DOT_PRECISION=dot_precision(dtype), UPCAST=False,
                                      BLOCK_D=128, **config.kwargs)
                    signature = _signature(kernel, names[dtype], constexprs)
                    yield kernel, signature, constexprs, config.num_warps, config.num_stages
    yield (kernels._supcon_fwd_combine_kernel, _signature(kernels._supcon_fwd_combine_kernel,
           "fp32", dict(BETA_ZERO=False, LSE_ONLY=False, BLOCK_M=128)),
           dict(BETA_ZERO=False, LSE_ONLY=False, BLOCK_M=128, USES_DOT=False), 4, 1)
    for dtype in DTYPES:
        constexprs = dict(NORMALIZE=True, BLOCK_M=16, BLOCK_D=128)
        yield (kernels._supcon_bwd_finish_kernel,
               _signature(kernels._supcon_bwd_finish_kernel, names[dtype], constexprs),
               dict(constexprs, USES_DOT=False), 4, 1)


def _signature(kernel, dtype_name: str, constexprs: dict) -> dict:
    """Triton signature strings for a kernel's arguments, from their names."""
    kinds = {"F": "x", "G": "x", "DF": "x", "DG": "x", "X": "x", "OUT": "x", "YF": "*i32",
             "YG": "*i32", "NPOS": "*i32", "inv_tau": "fp32", "beta": "fp32"}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("DF", "DG") and constexprs.get("SPLIT"):
            signature[arg] = "*fp32"  # chunked passes write float32 partial sums
        elif kinds.get(arg) == "x":
            signature[arg] = "*" + dtype_name
        elif arg in kinds:
            signature[arg] = kinds[arg]
        elif arg in ("M", "N", "D", "ROWS", "SPLITS", "SELF_OFFSET") \
                or arg.startswith("stride") or arg.endswith("PER_SPLIT"):
            signature[arg] = "i32"
        else:  # statistics, partial sums and gradients: float32
            signature[arg] = "*fp32"
    return signature
