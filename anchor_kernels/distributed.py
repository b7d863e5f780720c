"""The ANCHOR loss over the global batch under ``torch.distributed`` (DDP).

Each rank's anchors are its local batch; the contrast set is the global batch, all-gathered
with autograd. Rank ``r`` holds ``M_r`` anchor rows (``V B_r`` for (B_r, V, D) features,
flattened view-major per rank), the global batch has ``N = sum_r M_r`` rows in rank order,
and rank ``r``'s anchors are contrast rows ``o_r .. o_r + M_r - 1`` with ``o_r = sum_{q<r} M_q``.
The fused kernels run as ``anchor_kernels.supcon_loss(f_r, y_r, contrast=g, contrast_labels=y,
anchor_offset=o_r)``, so memory per rank is O(N D) (O(M_r N) with the eager backend), never N^2.

Scaling (what makes DDP exact). Let ``L = (tau/base_tau) sum_{i in V} L_i / |V|`` be the
single-process loss over the concatenated batch (``V``: anchors with a positive, over all
ranks) and ``R`` the world size. Rank ``r`` returns

    loss_r = R * (tau/base_tau) * sum_{i on rank r} L_i / |V|

so that ``mean_r loss_r = L``. The gather's backward *sums* the contrast-row gradients of
every rank (a reduce-scatter), so rank ``r``'s features receive ``R dL/df_r``: every rank's
loss terms, through both its own anchors and its rows in everyone's contrast set. DDP then
averages parameter gradients over ranks, ``(1/R) sum_r R dL/df_r df_r/dtheta = dL/dtheta``:
exactly the single-process gradient, for unequal local batches and unequal valid counts.
``|V|`` is the same on every rank: it is counted from the gathered labels (anchor ``i`` has a
positive iff its label occurs at least twice in the global batch), so no extra collective.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _validate as v
from .backends import BACKEND_NAMES
from .supcon import REDUCTIONS
from .supcon import supcon_loss as _local_supcon_loss

# Flat-buffer collectives (one NCCL kernel, no per-rank copies); the "_single" names replace
# the "_into_tensor"/"_tensor" ones in newer torch.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _require_group(group) -> tuple[int, int]:
    """(world size, rank) of ``group``, or an error saying how to set it up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "anchor_kernels.distributed needs an initialised torch.distributed process group: "
            "call torch.distributed.init_process_group(...) first (torchrun sets the environment "
            "it reads), or use anchor_kernels.supcon_loss in a single process")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as group")
    return dist.get_world_size(group), rank


def _metadata_device(group, features) -> torch.device:
    """Where the small metadata tensor is exchanged: host memory when the group can (gloo), so
    that ranks whose features sit on different device types still meet and get an error."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if isinstance(features, Tensor) and features.device.type not in ("cpu", "meta"):
        return features.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_padded(x: Tensor, sizes: tuple[int, ...], group) -> Tensor:
    """All-gather rows: (sizes[rank], ...) on each rank -> (sum(sizes), ...) in rank order.

    Uneven sizes are padded to the largest so that one flat collective moves them all.
    """
    cap = max(sizes)
    if cap == 0:  # every rank knows ``sizes``, so every rank skips the collective together
        return x.new_empty((0, *x.shape[1:]))
    if x.shape[0] < cap:
        x = torch.cat([x, x.new_zeros((cap - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((len(sizes) * cap, *x.shape[1:]))
    _all_gather_flat(out, x.contiguous(), group=group)
    if all(s == cap for s in sizes):
        return out
    return torch.cat([out[q * cap:q * cap + s] for q, s in enumerate(sizes)])


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather forward; reduce-scatter (sum) backward.

    The gathered rows of rank ``q`` are an input of every rank's loss, so their gradient is the
    *sum* over ranks of each rank's gradient for them. Written here rather than taken from
    ``torch.distributed.nn.all_gather``, whose backward has had wrong scaling and fails on
    non-contiguous gradients (pytorch/pytorch#120386), and which needs equal sizes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, rank = ctx.sizes, ctx.rank
        cap = max(sizes)
        if cap == 0:
            return grad.new_zeros((0, *grad.shape[1:])), None, None, None
        if all(s == cap for s in sizes):
            padded = grad.contiguous()
        else:
            padded = grad.new_zeros((len(sizes) * cap, *grad.shape[1:]))
            start = 0
            for q, s in enumerate(sizes):
                padded[q * cap:q * cap + s] = grad[start:start + s]
                start += s
        out = grad.new_empty((cap, *grad.shape[1:]))
        _reduce_scatter_flat(out, padded, op=dist.ReduceOp.SUM, group=ctx.group)
        # gradients for (x, sizes, rank, group); only x is a tensor input
        return out[:sizes[rank]], None, None, None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's ``x`` (M_r, ...) into (sum_r M_r, ...), in rank order.

    Differentiable: the gradient each rank's ``x`` receives is the sum over ranks of the
    gradients for its rows (not the average). Local sizes may differ between ranks (they are
    gathered first); dtype and trailing shape must match.
    """
    world, rank = _require_group(group)
    error = None
    try:
        v.check_tensor("x", x)
        if x.dim() == 0:
            raise ValueError("x must have a leading row dimension, got a 0-d tensor")
    except Exception as exc:  # reaches the other ranks through the metadata exchange
        error = exc
    table = _gather_metadata(None if error else _shape_row(x), group, x)
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise RuntimeError(f"rank(s) {failed} passed an invalid x to all_gather_with_grad (the "
                           "reason is raised on those ranks)")
    _same_on_every_rank(table)
    return _GatherRowsWithGrad.apply(x, tuple(row[1] for row in table), rank, group)


_SHOWN_DIMS = 4  # trailing dimensions sent verbatim (the rest only as a checksum)


def _shape_row(x: Tensor) -> list[int]:
    """(error=0, rows, ndim, dtype, device type, checksum of x.shape[1:], first dims of it)."""
    tail = list(x.shape[1:])
    shown = (tail + [-1] * _SHOWN_DIMS)[:_SHOWN_DIMS]
    return [0, x.shape[0], x.dim(), _code(x.dtype, _DTYPES), _code(x.device.type, _DEVICE_TYPES),
            zlib.crc32(repr(tail).encode()), *shown]


def _gather_metadata(row: list[int] | None, group, like) -> list[list[int]]:
    """Every rank's ``_shape_row`` (error = 1 where a rank's x was invalid): one small gather
    before the real one, so that a mismatch is an error on every rank instead of a collective
    that aborts or silently reinterprets bytes."""
    width = 6 + _SHOWN_DIMS
    row = [1] + [0] * (width - 1) if row is None else row
    mine = torch.tensor([row], dtype=torch.int64, device=_metadata_device(group, like))
    world = dist.get_world_size(group)
    return _gather_padded(mine, (1,) * world, group).tolist()


def _same_on_every_rank(table: list[list[int]]) -> None:
    def show_tail(row):
        n = row[2] - 1
        return str(tuple(row[6:6 + n])) if n <= _SHOWN_DIMS else f"({n} dims, checksum {row[5]:08x})"

    checks = [((2, 5), "x.shape[1:] (every dimension but the rows)", show_tail, ValueError),
              ((3,), "x's dtype", lambda row: _name(row[3], _DTYPES), TypeError),
              ((4,), "x's device type", lambda row: _name(row[4], _DEVICE_TYPES), ValueError)]
    for fields, what, show, exc in checks:
        if len({tuple(row[f] for f in fields) for row in table}) > 1:
            per_rank = ", ".join(f"rank {r}: {show(row)}" for r, row in enumerate(table))
            raise exc(f"all_gather_with_grad: {what} differs between ranks ({per_rank}); every "
                      "rank must pass the same (only the number of rows may differ)")


# --- exchanging and checking what each rank passes ---------------------------------------

_DTYPES = (*v.FLOAT_DTYPES, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
           *(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)))
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta", "mtia", "privateuseone")
_FIELDS = ("error", "views", "samples", "dim", "dtype", "device", "labels_dtype",
           "labels_device", "options", "needs_grad")


def _code(value, table) -> int:
    return table.index(value) if value in table else len(table)


def _name(code: int, table) -> str:
    return str(table[code]) if 0 <= code < len(table) else "another type"


@dataclass(frozen=True)
class _Local:
    """One rank's validated inputs: anchor rows (M_r, D) = (V B_r, D) and their labels."""

    rows: Tensor  # (V B_r, D), view-major
    labels: Tensor | None  # (B_r,), or None for instance positives
    samples: int  # B_r (M_r for 2-D features)
    views: int  # V; 0 marks 2-D features (no views)


def _local_inputs(features, labels, require_views: bool) -> _Local:
    v.check_tensor("features", features, floating=True)
    if features.dim() < 2 or (require_views and features.dim() < 3):
        want = "(B, V, D)" if require_views else "(M, D) or (B, V, D)"
        raise ValueError(f"features must be {want}, got shape {tuple(features.shape)}")
    if features.dim() >= 3:
        samples, views = features.shape[:2]
        if views == 0:
            raise ValueError(f"features has no views (shape {tuple(features.shape)})")
        # flatten_views' layout, with D explicit so that an empty local batch (B_r = 0) works
        dim = math.prod(features.shape[2:])
        rows = features.reshape(samples, views, dim).transpose(0, 1).reshape(samples * views, dim)
        what = f"the local batch size B={samples} of features (B, V, D)"
    else:
        if labels is None:
            raise ValueError("labels is required for 2-D features (M, D); for SimCLR-style "
                             "instance positives pass features as (B, V, D)")
        samples, views, rows = features.shape[0], 0, features
        what = f"features' M={samples} rows"
    if rows.shape[1] == 0:
        raise ValueError(f"features has no feature dimension (shape {tuple(features.shape)})")
    if labels is not None:
        v.check_labels("labels", labels, samples, features, what)
    return _Local(rows, labels, samples, views)


def _check_options(temperature, base_temperature, beta, topk, detach_weights, normalize,
                   reduction, backend) -> None:
    """The option checks of ``anchor_kernels.supcon_loss``, made before any collective so a
    bad option raises on every rank instead of leaving the others waiting."""
    v.check_positive("temperature", temperature)
    if base_temperature is not None:
        v.check_positive("base_temperature", base_temperature)
    beta = v.check_positive("hard_positive_beta", beta, allow_zero=True)
    if topk is not None:
        v.check_int("hard_positive_topk", topk, minimum=1)
        if beta != 0.0:
            raise ValueError("hard_positive_beta and hard_positive_topk are two mining modes; "
                             "give one of them")
    for name, flag in (("detach_weights", detach_weights), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    v.check_choice("reduction", reduction, REDUCTIONS)
    v.check_choice("backend", backend, BACKEND_NAMES)


def _metadata(local: _Local, options_key: str) -> list[int]:
    f, y = local.rows, local.labels
    return [0, local.views, local.samples, f.shape[1], _code(f.dtype, _DTYPES),
            _code(f.device.type, _DEVICE_TYPES),
            -1 if y is None else _code(y.dtype, _DTYPES),
            -1 if y is None else _code(y.device.type, _DEVICE_TYPES),
            zlib.crc32(options_key.encode()),
            int(torch.is_grad_enabled() and f.requires_grad)]


def _check_consistent(table: list[dict], rank: int, error: Exception | None) -> None:
    """Raise the same error on every rank when any rank's inputs are bad or disagree."""
    failed = [r for r, row in enumerate(table) if row["error"]]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank(s) {failed} rejected their inputs to the distributed loss "
                           "(the reason is raised on those ranks)")

    def differs(field, what, show, exc=ValueError, hint=""):
        values = [row[field] for row in table]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {show(x)}" for r, x in enumerate(values))
            raise exc(f"{what} differs between ranks ({per_rank}); every rank must pass the "
                      f"same{hint}")

    differs("views", "the number of views V of features (0: 2-D features)", str,
            hint=" layout: (M, D) everywhere or (B, V, D) with one V")
    differs("dim", "the feature dimension D", str)
    differs("dtype", "features' dtype", lambda c: _name(c, _DTYPES), TypeError)
    differs("device", "features' device type", lambda c: _name(c, _DEVICE_TYPES))
    differs("labels_dtype", "labels' dtype",
            lambda c: "labels=None" if c < 0 else _name(c, _DTYPES), TypeError,
            " (labels given on every rank, or None on every rank)")
    differs("labels_device", "labels' device type",
            lambda c: "labels=None" if c < 0 else _name(c, _DEVICE_TYPES))
    differs("options", "the loss options (temperature, mining, reduction, backend, ...)",
            lambda c: f"{c:08x}", hint=" options")
    differs("needs_grad", "whether features require grad",
            lambda c: "yes" if c else "no",
            hint="; the gather's backward is a collective that every rank must join")


def _exchange(local: _Local | None, options_key: str, group, features) -> list[dict]:
    """Every rank's metadata row (``_FIELDS``); a rank whose inputs failed sends error = 1."""
    row = [1] + [0] * (len(_FIELDS) - 1) if local is None else _metadata(local, options_key)
    mine = torch.tensor([row], dtype=torch.int64, device=_metadata_device(group, features))
    world = dist.get_world_size(group)
    rows = _gather_padded(mine, (1,) * world, group).tolist()
    return [dict(zip(_FIELDS, r)) for r in rows]


# --- the loss ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _GlobalBatch:
    world: int
    labels: Tensor  # (N,) labels of the gathered contrast rows
    n_anchors: int  # anchors over all ranks


def _global_per_anchor(features, labels, *, group, one_view: bool, require_views: bool,
                       pending_error: Exception | None, temperature, base_temperature,
                       hard_positive_beta, hard_positive_topk, detach_weights, normalize,
                       reduction, backend) -> tuple[Tensor, _GlobalBatch]:
    """This rank's per-anchor losses against the gathered global batch.

    Every rank runs the same collectives in the same order whatever its inputs: local checks
    first, then one metadata exchange that turns any rank's bad input into an error on all.
    """
    world, rank = _require_group(group)
    local, error, options = None, pending_error, ""
    if error is None:
        try:
            _check_options(temperature, base_temperature, hard_positive_beta, hard_positive_topk,
                           detach_weights, normalize, reduction, backend)
            # floats, so that temperature=1 and temperature=1.0 agree
            base = None if base_temperature is None else float(base_temperature)
            options = repr((one_view, float(temperature), base, float(hard_positive_beta),
                            hard_positive_topk, detach_weights, normalize, reduction, backend))
            local = _local_inputs(features, labels, require_views)
        except Exception as exc:  # any local failure must reach the other ranks, which
            error = exc           # would otherwise wait in the exchange below forever
    table = _exchange(local if error is None else None, options, group, features)
    _check_consistent(table, rank, error)

    views = table[0]["views"]
    samples = [row["samples"] for row in table]
    sizes = tuple(s * max(views, 1) for s in samples)  # anchor rows per rank
    offset = sum(sizes[:rank])
    f = local.rows
    gathered = _GatherRowsWithGrad.apply(f, sizes, rank, group)  # (N, D)

    starts = [sum(samples[:q]) for q in range(world)]
    if local.labels is None:  # instance positives: globally unique sample ids
        per_rank = [torch.arange(s0, s0 + s, device=f.device) for s0, s in zip(starts, samples)]
    else:
        y_all = _gather_padded(local.labels, tuple(samples), group)
        per_rank = [y_all[s0:s0 + s] for s0, s in zip(starts, samples)]
    if views:  # per rank, view-major like flatten_views: rows v*B_q + b
        per_rank = [y.repeat(views) for y in per_rank]
    y_contrast = torch.cat(per_rank)  # (N,)

    n_local = samples[rank] if one_view else sizes[rank]
    anchors, y_anchors = f[:n_local], y_contrast[offset:offset + n_local]
    out_dtype = torch.promote_types(f.dtype, torch.float32)
    if n_local == 0:
        per_anchor = gathered[:0, 0].to(out_dtype)
    else:
        per_anchor = _local_supcon_loss(
            anchors, y_anchors, contrast=gathered, contrast_labels=y_contrast,
            anchor_offset=offset, temperature=temperature, base_temperature=base_temperature,
            hard_positive_beta=hard_positive_beta, hard_positive_topk=hard_positive_topk,
            detach_weights=detach_weights, normalize=normalize, reduction="none",
            backend=backend)
    # An exact zero that ties the result to the gather, so this rank's backward always joins
    # the gather's reduce-scatter, even with no anchors or a backend that returns a constant.
    per_anchor = per_anchor + gathered[:0].sum().to(out_dtype)
    n_anchors = sum(samples) if one_view else sum(sizes)
    return per_anchor, _GlobalBatch(world, y_contrast, n_anchors)


def _count_valid(labels: Tensor) -> Tensor:
    """Rows whose label occurs at least twice, i.e. anchors with a positive (0-d int tensor).

    Sort-based, so it costs no device synchronisation.
    """
    s = torch.sort(labels).values
    same = s[1:] == s[:-1]
    valid = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    valid[1:] |= same
    valid[:-1] |= same
    return valid.sum()


def supcon_loss(
    features: Tensor,
    labels: Tensor | None = None,
    *,
    group=None,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    hard_positive_beta: float = 0.0,
    hard_positive_topk: int | None = None,
    detach_weights: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """The hard-mined SupCon loss of the global batch, anchors local (see the module doc).

    Call it on every rank of ``group``, the same number of times and in the same order (it runs
    collectives), with this rank's part of the batch.

    Args:
        features: this rank's (M_r, D) anchors, or (B_r, V, D) views (flattened view-major per
            rank). Local batch sizes may differ between ranks, and may be 0; dtype, D, V and
            the device type must not.
        labels: (M_r,) or (B_r,) integer labels, the same dtype on every rank. None with
            (B_r, V, D) features: each sample's other views are its only positives, with
            sample ids unique over the global batch.
        group: the process group (default: the world); pass the one DDP averages over.
        temperature, base_temperature, hard_positive_beta, hard_positive_topk, detach_weights,
            normalize, backend: as in ``anchor_kernels.supcon_loss``; the same on every rank.
        reduction: "mean" returns ``R * (tau/base_tau) * sum_{i on this rank} L_i / |V|``, with
            ``|V|`` the anchors with a positive over all ranks and ``R`` the world size: the mean
            over ranks is the single-process loss of the concatenated batch, and after DDP
            averages the parameter gradients they equal that loss's gradients exactly. "sum":
            ``R * (tau/base_tau) * sum_{i on this rank} L_i`` (same two properties for the
            single-process sum). "none": this rank's (M_r,) per-anchor losses, not multiplied
            by ``R``; concatenated over ranks they are the single-process "none" output with the
            rows in per-rank view-major order.

    Returns:
        A 0-d tensor (a vector for "none"): float32 for half inputs, else the input dtype.
        The value differs from rank to rank; its mean over ranks (``all_reduce`` of
        ``loss.detach()``, divided by ``R``) is the global loss to log. Top-k ties are
        broken by the lower index in the gathered order (per-rank view-major), which differs
        from a single process's order only on exactly equal cosines.
    """
    per_anchor, batch = _global_per_anchor(
        features, labels, group=group, one_view=False, require_views=False, pending_error=None,
        temperature=temperature, base_temperature=base_temperature,
        hard_positive_beta=hard_positive_beta, hard_positive_topk=hard_positive_topk,
        detach_weights=detach_weights, normalize=normalize, reduction=reduction,
        backend=backend)
    if reduction == "none":
        return per_anchor
    total = batch.world * per_anchor.sum()
    if reduction == "sum":
        return total
    return total / _count_valid(batch.labels).clamp_min(1).to(total.dtype)


class DistributedHardMinedSupConLoss(nn.Module):
    """``HardMinedSupConLoss`` over the global batch: ``(features, labels=None)`` on each rank.

    Same options and defaults as ``anchor_kernels.HardMinedSupConLoss`` (soft mining at
    beta = 1 unless top-k is chosen), plus ``group``; the loss is
    ``anchor_kernels.distributed.supcon_loss`` (see it for the scaling that makes DDP exact).
    """

    def __init__(self, temperature: float = 0.1, base_temperature: float | None = None, *,
                 hard_positive_beta: float | None = None, hard_positive_topk: int | None = None,
                 detach_weights: bool = True, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", group=None):
        super().__init__()
        if hard_positive_beta is None:  # soft mining at beta = 1 unless top-k is chosen
            hard_positive_beta = 1.0 if hard_positive_topk is None else 0.0
        self.group = group
        self.kwargs = dict(temperature=temperature, base_temperature=base_temperature,
                           hard_positive_beta=hard_positive_beta,
                           hard_positive_topk=hard_positive_topk, detach_weights=detach_weights,
                           normalize=normalize, reduction=reduction, backend=backend)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return supcon_loss(features, labels, group=self.group, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={val!r}" for k, val in self.kwargs.items())


class DistributedSupConLoss(nn.Module):
    """SupContrast's ``SupConLoss`` over the global batch: ``(features (B_r, V, D), labels=None)``.

    Same arguments and numbers as ``anchor_kernels.SupConLoss`` on the concatenated batch:
    features normalised by the caller unless ``normalize=True``; the mean runs over *all*
    anchors of all ranks (anchors without positives count 0); ``contrast_mode="one"`` takes
    view 0 of each local sample as the anchors. Rank ``r`` returns
    ``R * sum_{anchors on r} L_i / (number of anchors over all ranks)``, so the mean over ranks
    is the single-process loss and DDP's averaged gradients are its gradients. A dense
    ``mask`` would be (global B)^2 and is not supported: pass labels.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all",
                 base_temperature: float = 0.07, *, normalize: bool = False,
                 backend: str = "auto", group=None):
        super().__init__()
        self.temperature = v.check_positive("temperature", temperature)
        self.contrast_mode = v.check_choice("contrast_mode", contrast_mode, ("all", "one"))
        self.base_temperature = v.check_positive("base_temperature", base_temperature)
        self.normalize = normalize
        self.backend = backend
        self.group = group

    def forward(self, features: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        pending = None
        if mask is not None:
            pending = ValueError("mask is not supported by the distributed loss (it would be a "
                                 "(global B, global B) matrix); pass labels instead")
        per_anchor, batch = _global_per_anchor(
            features, labels, group=self.group, one_view=self.contrast_mode == "one",
            require_views=True, pending_error=pending, temperature=self.temperature,
            base_temperature=self.base_temperature, hard_positive_beta=0.0,
            hard_positive_topk=None, detach_weights=True, normalize=self.normalize,
            reduction="mean", backend=self.backend)
        return batch.world * per_anchor.sum() / max(batch.n_anchors, 1)
