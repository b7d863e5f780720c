"""The "triton" backend of the SupCon loss: one kernel launch forward (reduction included)
and one backward, behind a thin ``torch.autograd.Function`` over two ``torch.library`` ops
(fake kernels registered, so ``torch.compile(fullgraph=True)`` traces them).

The kernels are in ``supcon_kernels_triton.py``. Every launch goes through :func:`_run`, so
tests can count launches and benchmarks can stub them to measure the host cost alone.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Optional

import torch
import triton
from torch import Tensor

from .._autograd import apply, plain_eager, refuse_double_backward
from ..backends import REDUCTION_CODES, SupConProblem
from . import supcon_composite, supcon_topk
from . import supcon_kernels_triton as kernels
from ..reference import reduce_loss
from .triton_launch import cdiv, device_guard, dot_precision, interpreter_upcast, interpreting

INTERPRET = interpreting()  # decided before the kernels were decorated, as Triton does

MAX_D = 256  # a row block of f stays in registers: whole feature dimension per tile
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Every configuration the autotuner may pick on a GPU; the sm_90 report compiles each one.
# Half precision runs on the tensor cores (wgmma). 8 warps need 128 rows per block: with 64,
# both warpgroups would compute the same wgmma tile. Only tilings that compile without spills
# on sm_90, per variant: the bare log-sum-exp (the largest batches' plain SupCon, "_lse")
# keeps two forward tilings (128 x 128, and 128 x 64 with 4 warps, spill) and, with one set,
# four backward ones. With per-logit labels the forward spills at 3 stages and at 64 x 64
# (where it also issues 40-50 instructions per logit against 27-37 at 128 x 64); the backward
# spills at 64 columns with labels or with two sets. fp32 at "highest" precision is an FMA
# loop, where large tiles only spill, so it gets smaller ones.
CONFIGS = {
    "fwd_half": [_config(128, 64, 8, 2)],
    "fwd_half_lse": [_config(128, 64, 8, 3), _config(64, 64, 4, 3)],
    "bwd_half": [_config(128, 32, 8, 2), _config(64, 32, 4, 2)],
    "bwd_half_lse": [_config(128, 64, 8, 2), _config(64, 64, 4, 2), _config(128, 32, 8, 2),
                     _config(64, 32, 4, 2)],
    "fwd_fp32": [_config(64, 32, 4, 2), _config(32, 64, 4, 2), _config(64, 64, 8, 2)],
    "bwd_fp32": [_config(64, 32, 4, 2), _config(32, 64, 4, 2), _config(32, 32, 4, 2)],
}
# The interpreter runs one numpy program per block: fewer, larger blocks are faster there.
INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32}
MIN_BLOCK = 32
SPLIT_ALIGN = 128  # chunk boundaries on multiples of every BLOCK_M / BLOCK_N
_KERNELS = {"fwd": kernels._supcon_fwd_kernel, "bwd": kernels._supcon_bwd_kernel}
# Constexprs that select a kernel variant: part of the autotuning key, so that each variant
# is tuned on its own.
VARIANT_KEYS = ("NORMALIZE", "SINGLE_SET", "BETA_ZERO", "LSE_ONLY", "FIXED_SHIFT", "SPLIT", "EVEN_D",
                "NORMS_GIVEN")
# From this many logits (M N) on, the norms are computed by a small kernel before the main
# one (instead of per tile), and plain SupCon takes its positive term from class sums
# (supcon_classsum.py), leaving the O(M N) kernels a bare log-sum-exp. Below it, one
# launch each way. The class-sum path costs about 3 ms of host time per forward + backward on
# an H200 machine (some 50 small torch ops) and saved no GPU time where measured: forward +
# backward took 4.5 / 4.9 / 20.5 ms that way at N = 8192 / 16384 / 65536 against 1.1 / 1.5 /
# 18.6 ms in one launch each way (scripts/supcon_tune.py; benchmarks/results/supcon_tune_h200*.json).
# So it starts past the largest N measured; N = 131072 ran it in 58.7 ms.
STREAMING_MIN_LOGITS = 131072 * 131072
# From this many logits on (and on the large-batch path), the norms kernel runs first while the
# forward keeps its per-logit labels. Computing the streamed tile's norms in the loop costs
# the one-launch forward about 11 of its 27 thread-instructions per logit on sm_90 (plain
# SupCon; soft mining 37 -> 25; `python -m anchor_kernels.ops.sm90_check`), for one launch
# less. Where the saving outweighs the launch is for a GPU to say (scripts/supcon_tune.py,
# candidate "norms-first"); until measured it starts where the large-batch path does.
NORMS_FIRST_MIN_LOGITS = STREAMING_MIN_LOGITS


def next_power_of_2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def config_family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def configs_for(kernel: str, dtype: torch.dtype, lse_only: bool, single_set: bool) -> list:
    """The configurations a launch of ``kernel`` may use in this variant (see CONFIGS)."""
    name = kernel + "_" + config_family(dtype)
    lse = lse_only and (single_set or kernel == "fwd")
    return CONFIGS.get(name + "_lse", CONFIGS[name]) if lse else CONFIGS[name]


def _prune(kernel: str, family: str):
    """The autotuner's ``early_config_prune``: ``configs_for`` of the launch's variant."""
    dtype = torch.float32 if family == "fp32" else torch.bfloat16
    return lambda configs, nargs, **kw: configs_for(kernel, dtype, kw["LSE_ONLY"], kw["SINGLE_SET"])


def _all_configs(kernel: str, family: str) -> list:
    """Every configuration of ``kernel`` for the autotuner to prune from, each once."""
    out = []
    for name in (kernel + "_" + family, kernel + "_" + family + "_lse"):
        out += [c for c in CONFIGS.get(name, []) if c not in out]
    return out


# ANCHOR_KERNELS_AUTOTUNE=0 launches the first configuration of each list without tuning.
AUTOTUNE = os.environ.get("ANCHOR_KERNELS_AUTOTUNE", "1") == "1"
# Tuning keys: the batch sizes bucketed to powers of two (a ragged last batch reuses the
# choice), D and the variant; the choice is cached on disk where this Triton can.
_TUNE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_autotuned = {(k, fam): triton.autotune(_all_configs(k, fam),
                                        key=["M_BUCKET", "N_BUCKET", "D", *VARIANT_KEYS],
                                        prune_configs_by={"early_config_prune": _prune(k, fam)},
                                        **_TUNE_KW)(fn)
              for k, fn in _KERNELS.items() for fam in ("half", "fp32")}


def _run(kernel, grid, args: tuple, constexprs: dict) -> None:
    """Every Triton launch of this module (patched by the launch-count test and the host-cost
    benchmark)."""
    kernel[grid](*args, **constexprs)


def _launch(name: str, dtype: torch.dtype, grid, args: tuple, constexprs: dict, chosen: list) -> None:
    """Launch kernel ``name``. ``chosen`` is the launch plan's slot for the configuration it
    runs: the first launch of a plan asks the autotuner, later ones call the kernel with that
    configuration directly (the autotuner's Python rebuilds its key from every argument,
    about 40 us a launch on a 2-core host)."""
    if INTERPRET:
        _run(_KERNELS[name], grid, args, dict(constexprs, **INTERPRET_META))
        return
    if chosen[0] is None:
        if AUTOTUNE:
            tuner = _autotuned[(name, config_family(dtype))]
            _run(tuner, grid, args, constexprs)
            chosen[0] = dict(constexprs, **tuner.best_config.all_kwargs())
            return
        config = configs_for(name, dtype, constexprs["LSE_ONLY"], constexprs["SINGLE_SET"])[0]
        chosen[0] = dict(constexprs, **config.all_kwargs())
    _run(_KERNELS[name], grid, args, chosen[0])


def num_splits(rows: int, cols: int, device: torch.device) -> int:
    """Chunks to cut the streamed dimension into so that about two programs per SM run when
    there are few row blocks (small batches); 1 for large batches."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = cdiv(rows, 128)
    return max(1, min(cdiv(2 * sms, row_blocks), cdiv(cols, 4 * SPLIT_ALIGN), 16))


def chunk(length: int, splits: int) -> int:
    """Streamed rows per chunk, a multiple of SPLIT_ALIGN, so that ``splits`` chunks cover ``length``."""
    return cdiv(cdiv(max(length, 1), splits), SPLIT_ALIGN) * SPLIT_ALIGN


def fixed_shift(temperature: float, normalize: bool, n: int) -> float:
    """The fixed log-sum-exp shift 2^shift2 >= every 2^t_ij, or 0.0 when the online form is
    needed: without normalisation (no bound), or when 2 shift2 + log2 N > 96 (tau below about
    0.04 at N = 65536), where terms that matter could underflow."""
    if not normalize:
        return 0.0
    shift2 = math.log2(math.e) / temperature * (1.0 + 2.0 ** -8)
    return shift2 if 2.0 * shift2 + math.log2(max(n, 2)) <= 96.0 else 0.0


def dk_rows(meta: dict, split: bool) -> int:
    """Contrast rows per program in the two-set backward's dK part. Unchunked: BLOCK_M, the
    dQ part's tile shape, so its products run on wgmma (32 resident rows, BLOCK_N, do not
    fill a warpgroup's 64-row tile and compile to mma.sync). With column chunks: BLOCK_N,
    because the chunk merge then needs registers that the larger block would spill."""
    return meta["BLOCK_N"] if split else meta["BLOCK_M"]


def ws_size(m: int, n: int, single: bool) -> int:
    """float32 workspace: STAT_ROWS rows of M stats, RF (M), RG (N, two sets), the count."""
    return (kernels.STAT_ROWS.value + 1) * m + (0 if single else n) + 1


def _bucket(x: int) -> int:
    return next_power_of_2(max(x, 1))


_locks: dict = {}


def _lock_buffer(device: torch.device, size: int, reuse: bool) -> Tensor:
    """Zeroed int32 counters for the last-program-done merges. The kernels leave them at 0,
    so with ``reuse`` one buffer per device and stream serves every launch of the plain eager
    path. Calls through the registered op (torch.compile, dispatch modes) get their own, with
    a zero-fill: a buffer kept across calls would be memory that CUDA-graph trees
    (``mode="reduce-overhead"``) own without tracking it. So do launches under CUDA graph
    capture (the zero-fill is captured with them)."""
    if not reuse or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(size, device=device, dtype=torch.int32)
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    buf = _locks.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1024), device=device, dtype=torch.int32)
        _locks[key] = buf
    return buf


def is_streaming(m: int, n: int) -> bool:
    """Whether an M x N problem takes the large-batch path (see STREAMING_MIN_LOGITS)."""
    return m * n >= STREAMING_MIN_LOGITS


def _shared_constexprs(d: int, dtype: torch.dtype, precision: str, normalize: bool,
                       single: bool) -> tuple[int, dict]:
    """(BLOCK_D, the constexprs both kernels take): the whole feature dimension per tile."""
    block_d = max(16, next_power_of_2(d))
    return block_d, dict(NORMALIZE=normalize, SINGLE_SET=single, EVEN_D=block_d == d,
                         DOT_PRECISION=precision, UPCAST=interpreter_upcast(dtype), BLOCK_D=block_d)


@functools.lru_cache(maxsize=256)
def _fwd_plan(m: int, n: int, d: int, f_strides: tuple, g_strides: tuple, dtype: torch.dtype,
              precision: str, device: torch.device, single: bool, self_offset: int, temperature: float,
              beta: float, scale: float, normalize: bool, lse_only: bool, reduction: int,
              _policy) -> tuple:
    """Everything of a forward launch but its tensors, computed once per problem shape and
    options (about 30 us of Python a call otherwise), and a slot for the configuration the
    autotuner picks for it (see ``_launch``). ``precision`` follows torch's float32
    matmul setting; ``_policy`` holds the module's tunables, so that patching them (tests,
    scripts/supcon_tune.py) takes effect."""
    block_d, cx = _shared_constexprs(d, dtype, precision, normalize, single)
    streaming = is_streaming(m, n)
    norms_first = streaming or m * n >= NORMS_FIRST_MIN_LOGITS
    splits = num_splits(m, n, device)
    per_split = chunk(n, splits)
    splits = cdiv(n, per_split)
    shift2 = fixed_shift(temperature, normalize, n)
    norms = None
    if norms_first:
        norms = ((cdiv(max(m, n), 64),), (m, n, d) + f_strides + g_strides,
                 dict(NORMALIZE=normalize, SINGLE_SET=single, EVEN_D=cx["EVEN_D"],
                      UPCAST=cx["UPCAST"], BLOCK_R=64, BLOCK_D=block_d))
    return (ws_size(m, n, single), (m,) if reduction == 0 else (),
            kernels.PART_ROWS.value * splits * m if splits > 1 else 0, cdiv(m, MIN_BLOCK) + 1, norms,
            lambda meta: (cdiv(m, meta["BLOCK_M"]), splits),
            (m, n, d) + f_strides + g_strides + (self_offset, 1.0 / temperature, beta, shift2, scale,
                                                 per_split, _bucket(m), _bucket(n)),
            dict(cx, NORMS_GIVEN=norms_first, BETA_ZERO=beta == 0.0, LSE_ONLY=lse_only,
                 FIXED_SHIFT=shift2 > 0.0, REDUCE=reduction, SPLIT=splits > 1), [None])


def supcon_fwd(f: Tensor, g: Optional[Tensor], y_f: Tensor, y_g: Optional[Tensor], self_offset: int,
               temperature: float, beta: float, scale: float, normalize: bool, lse_only: bool,
               reduction: int, reuse_locks: bool = False) -> tuple[Tensor, Tensor]:
    """(loss, workspace): the loss reduced (0-d; reduction 1 sum, 2 mean) or per anchor (M,),
    times ``scale``; the float32 workspace holds what the backward reads. ``reuse_locks``:
    see ``_lock_buffer`` (True on the plain eager path only)."""
    single = g is None
    g_, y_g_ = (f, y_f) if single else (g, y_g)
    device = f.device
    ws_numel, loss_shape, part_numel, locks_numel, norms, grid, tail, cx, chosen = _fwd_plan(
        f.shape[0], g_.shape[0], f.shape[1], f.stride(), g_.stride(), f.dtype,
        dot_precision(f.dtype), device, single,
        self_offset, temperature, beta, scale, normalize, lse_only, reduction,
        (num_splits, STREAMING_MIN_LOGITS, NORMS_FIRST_MIN_LOGITS))
    ws = torch.empty(ws_numel, device=device, dtype=torch.float32)
    loss = torch.empty(loss_shape, device=device, dtype=torch.float32)
    part = torch.empty(part_numel, device=device, dtype=torch.float32) if part_numel else ws
    locks = _lock_buffer(device, locks_numel, reuse_locks)
    with device_guard(f):
        if norms is not None:
            _run(kernels._supcon_norms_kernel, norms[0], (f, g_, ws) + norms[1], norms[2])
        _launch("fwd", f.dtype, grid, (f, g_, y_f, y_g_, ws, loss if reduction == 0 else ws,
                                       loss, part, locks) + tail, cx, chosen)
    return loss, ws


@functools.lru_cache(maxsize=256)
def _bwd_plan(m: int, n: int, d: int, f_strides: tuple, g_strides: tuple, dtype: torch.dtype,
              precision: str, device: torch.device, single: bool, self_offset: int, temperature: float,
              beta: float, scale: float, normalize: bool, lse_only: bool, exact: bool,
              reduction: int, _policy) -> tuple:
    """The backward's counterpart of ``_fwd_plan``."""
    block_d, cx = _shared_constexprs(d, dtype, precision, normalize, single)
    splits = num_splits(m if single else m + n, n if single else max(m, n), device)
    cols_per_split, rows_per_split = chunk(n, splits), chunk(m, splits)
    splits = max(cdiv(n, cols_per_split), 1 if single else cdiv(m, rows_per_split))
    shift2 = fixed_shift(temperature, normalize, n)
    grid = (lambda meta: (cdiv(m, meta["BLOCK_M"]), splits)) if single else \
        (lambda meta: (cdiv(m, meta["BLOCK_M"]) + cdiv(n, dk_rows(meta, splits > 1)), splits))
    # df and dg are allocated contiguous: strides (D, 1)
    tail = (m, n, d) + f_strides + g_strides + (d, 1, d, 1, self_offset, 1.0 / temperature, beta,
                                                shift2, scale, cols_per_split, rows_per_split,
                                                _bucket(m), _bucket(n))
    return (splits * (m + (0 if single else n)) * block_d if splits > 1 else 0,
            cdiv(m, MIN_BLOCK) + cdiv(n, MIN_BLOCK) + 1, grid, tail,
            dict(cx, BETA_ZERO=beta == 0.0, LSE_ONLY=lse_only, EXACT=exact and beta != 0.0,
                 FIXED_SHIFT=shift2 > 0.0, GRAD_MODE=reduction, SPLIT=splits > 1), [None])


def supcon_bwd(grad: Tensor, f: Tensor, g: Optional[Tensor], y_f: Tensor, y_g: Optional[Tensor],
               ws: Tensor, self_offset: int, temperature: float, beta: float, scale: float,
               normalize: bool, lse_only: bool, exact: bool, reduction: int,
               reuse_locks: bool = False) -> tuple[Tensor, Tensor]:
    """(df (M, D), dg (N, D); dg empty for one set, whose whole gradient is df)."""
    single = g is None
    g_, y_g_ = (f, y_f) if single else (g, y_g)
    device = f.device
    part_numel, locks_numel, grid, tail, cx, chosen = _bwd_plan(
        f.shape[0], g_.shape[0], f.shape[1], f.stride(), g_.stride(), f.dtype,
        dot_precision(f.dtype), device, single,
        self_offset, temperature, beta, scale, normalize, lse_only, exact, reduction,
        (num_splits,))
    grad = grad.contiguous()  # e.g. the stride-0 gradient of a sum
    df = torch.empty(f.shape, device=device, dtype=f.dtype)
    dg = f.new_empty(0) if single else torch.empty(g.shape, device=device, dtype=g.dtype)
    part = torch.empty(part_numel, device=device, dtype=torch.float32) if part_numel else ws
    locks = _lock_buffer(device, locks_numel, reuse_locks)
    with device_guard(f):
        _launch("bwd", f.dtype, grid, (f, g_, y_f, y_g_, ws, grad, df, df if single else dg, part,
                                       locks) + tail, cx, chosen)
    return df, dg


_lib = torch.library.Library("anchor_kernels", "FRAGMENT")
_lib.define("supcon_fwd_triton(Tensor f, Tensor? g, Tensor y_f, Tensor? y_g, int self_offset, "
            "float temperature, float beta, float scale, bool normalize, bool lse_only, "
            "int reduction) -> (Tensor, Tensor)")
_lib.define("supcon_bwd_triton(Tensor grad, Tensor f, Tensor? g, Tensor y_f, Tensor? y_g, "
            "Tensor ws, int self_offset, float temperature, float beta, float scale, "
            "bool normalize, bool lse_only, bool exact, int reduction) -> (Tensor, Tensor)")
for _key in ("CUDA", "CPU"):  # CPU: under TRITON_INTERPRET=1 only (the backend says so)
    _lib.impl("supcon_fwd_triton", supcon_fwd, _key)
    _lib.impl("supcon_bwd_triton", supcon_bwd, _key)


@torch.library.register_fake("anchor_kernels::supcon_fwd_triton")
def _(f, g, y_f, y_g, self_offset, temperature, beta, scale, normalize, lse_only, reduction):
    m = f.shape[0]
    n = m if g is None else g.shape[0]
    return (f.new_empty((m,) if reduction == 0 else (), dtype=torch.float32),
            f.new_empty(ws_size(m, n, g is None), dtype=torch.float32))


@torch.library.register_fake("anchor_kernels::supcon_bwd_triton")
def _(grad, f, g, y_f, y_g, ws, self_offset, temperature, beta, scale, normalize, lse_only, exact,
      reduction):
    return (torch.empty_like(f, memory_format=torch.contiguous_format),
            f.new_empty(0) if g is None else torch.empty_like(g, memory_format=torch.contiguous_format))


class SupConTriton(torch.autograd.Function):
    """The loss with the fused backward; also the workspace (not differentiable) when the
    caller reads it. No zero gradients are materialised for outputs without one. The
    options travel as one tuple ``(self_offset, temperature, beta, scale, normalize,
    lse_only, exact, reduction, with_workspace)``: ``apply`` walks every argument, so fewer
    arguments cost less host time, and so does one output instead of two."""

    @staticmethod
    def forward(ctx, f, g, y_f, y_g, options):
        self_offset, temperature, beta, scale, normalize, lse_only, _, reduction, with_ws = options
        args = (f, g, y_f, y_g, self_offset, temperature, beta, scale, normalize, lse_only, reduction)
        if plain_eager(f):
            loss, ws = supcon_fwd(*args, reuse_locks=True)
        else:
            loss, ws = torch.ops.anchor_kernels.supcon_fwd_triton(*args)
        ctx.save_for_backward(f, g, y_f, y_g, ws)
        ctx.options = options[:8]
        ctx.set_materialize_grads(False)
        if not with_ws:
            return loss
        ctx.mark_non_differentiable(ws)
        return loss, ws

    @staticmethod
    def backward(ctx, grad, *_ws_grad):
        if grad is None:
            return None, None, None, None, None
        f, g, y_f, y_g, ws = ctx.saved_tensors
        if plain_eager(grad):
            df, dg = supcon_bwd(grad, f, g, y_f, y_g, ws, *ctx.options, reuse_locks=True)
        else:
            with torch.no_grad():
                df, dg = torch.ops.anchor_kernels.supcon_bwd_triton(grad, f, g, y_f, y_g, ws, *ctx.options)
        # create_graph=True: differentiating these gradients again raises, by name
        return refuse_double_backward("triton", (df, None if g is None else dg), (f, g)) + (None,) * 3


_SIGNED = (torch.int8, torch.int16, torch.int32, torch.int64)


def _labels(y: Optional[Tensor]) -> Optional[Tensor]:
    """Labels as the kernels compare them: any signed integer dtype as it is (unsigned and
    bool widened to int64, which Triton pointers of those types do not all support)."""
    if y is None or y.dtype in _SIGNED:
        return y
    return y.to(torch.int64)


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

    def _apply(self, p: SupConProblem, scale: float, reduction: int, with_ws: bool):
        """The loss, and the workspace too with ``with_ws``."""
        n = p.f.shape[0] if p.g is None else p.g.shape[0]
        self_offset = n if p.anchor_offset is None else p.anchor_offset
        return apply(SupConTriton, p.f, p.g, _labels(p.y_f), _labels(p.y_g), (
            self_offset, p.temperature, p.beta, scale, p.normalize, p.lse_only,
            not p.detach_weights, reduction, with_ws))

    def _composite(self, p: SupConProblem):
        return supcon_composite.composite(self, p, "triton", STREAMING_MIN_LOGITS)

    def per_anchor(self, p: SupConProblem) -> tuple[Tensor, Tensor]:
        composite = self._composite(p)
        if composite is not None:
            return composite()
        loss, ws = self._apply(p, 1.0, 0, True)
        m = p.f.shape[0]
        npos = kernels.NPOS_ROW.value
        return loss, ws[npos * m:(npos + 1) * m] > 0

    def loss(self, p: SupConProblem, scale: float, reduction: str) -> Tensor:
        """The reduced loss in one launch (``reduction`` "mean", "sum" or "none")."""
        composite = self._composite(p)
        if composite is not None:
            per_anchor, valid = composite()
            return reduce_loss(per_anchor, valid, scale, reduction)
        return self._apply(p, scale, REDUCTION_CODES[reduction], False)


BACKEND = TritonSupCon()


# Ceilings on the forward hot loop's thread-instructions per logit (sm90_check fails a variant
# above its own), a little over what each compiles to with Triton 3.6, one set / two sets:
# by (norms given, beta = 0, log-sum-exp only) and BLOCK_M. The bare log-sum-exp 7.4 / 7.9
# (128 / 64 rows); one launch, plain SupCon 27.4 / 27.7, soft mining 37.0 / 37.4; norms
# first, plain 16.0, soft 25.4.
FWD_CEILING = {(True, True, True): {128: 8.0, 64: 8.5},
               (False, True, False): {128: 28.5}, (False, False, False): {128: 38.5},
               (True, True, False): {128: 17.0}, (True, False, False): {128: 26.5}}


def sm90_compile_specs():
    """(kernel, signature, constexprs, num_warps, num_stages) for every kernel variant that
    the launchers run (flags, dtypes, autotuner configurations), specialised as the Triton
    runtime specialises the real launch arguments, for ``anchor_kernels.ops.sm90_check``."""
    from .triton_launch import Launch, sm90_compile_specs as specs

    launches = []
    m, n, d = 4096, 4096, 128
    # bfloat16 in every configuration. float16 is the same code with another element type;
    # float32 at "highest" precision is an FMA loop that compiles for minutes and spills
    # (known, see README), left out to keep CI within its budget.
    dtype = torch.bfloat16
    f = torch.empty(m, d, dtype=dtype)
    y = torch.empty(m, dtype=torch.int64)
    loss = torch.empty((), dtype=torch.float32)
    part = torch.empty(16, dtype=torch.float32)
    locks = torch.empty(16, dtype=torch.int32)
    # (norms given, beta = 0, lse_only): the largest batches' plain SupCon (the bare
    # log-sum-exp), in one launch each way (per-logit labels, column chunks, norms per tile)
    # plain SupCon, what most calls run, and soft mining, and both with the norms first (soft
    # mining on the largest batches); one set and two; every configuration the autotuner can
    # pick for the variant
    for single in (True, False):
        ws = torch.empty(ws_size(m, n, single), dtype=torch.float32)
        fwd_args = (f, f, y, y, ws, ws, loss, part, locks, m, n, d, d, 1, d, 1, 0 if single else n,
                    10.0, 0.0, 14.5, 1.0, n, m, n)
        bwd_args = (f, f, y, y, ws, loss, f, f, part, locks, m, n, d, d, 1, d, 1, d, 1, d, 1,
                    0 if single else n, 10.0, 0.0, 14.5, 1.0, n, m, m, n)
        for variant in FWD_CEILING:
            streaming, beta_zero, lse_only = variant
            flags = dict(NORMALIZE=True, SINGLE_SET=single, EVEN_D=True, UPCAST=False, BLOCK_D=d,
                         DOT_PRECISION=dot_precision(dtype), BETA_ZERO=beta_zero,
                         LSE_ONLY=lse_only, FIXED_SHIFT=True, SPLIT=not streaming)
            for config in configs_for("fwd", dtype, lse_only, single):
                ceiling = FWD_CEILING[variant][config.kwargs["BLOCK_M"]]
                launches.append(Launch(_KERNELS["fwd"], (1, 1), fwd_args, dict(
                    flags, NORMS_GIVEN=streaming, REDUCE=0 if lse_only else 2, **config.kwargs,
                    MAX_INSTR_PER_LOGIT=ceiling), config.num_warps, config.num_stages))
            for config in configs_for("bwd", dtype, lse_only, single):
                launches.append(Launch(_KERNELS["bwd"], (1, 1), bwd_args, dict(
                    flags, EXACT=False, GRAD_MODE=0 if lse_only else 2, **config.kwargs),
                    config.num_warps, config.num_stages))
    yield from specs(launches)
