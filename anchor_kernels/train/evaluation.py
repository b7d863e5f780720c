"""Clean and PGD-20 test accuracy with the presets of ``anchor_kernels.attacks``.

Two PGD-20 settings: ``pgd20_trades`` (eps 0.031, step 0.003, no random
start, as TRADES' evaluation script) and ``pgd20`` (eps 8/255, step 2/255, random start).
Under torchrun every process evaluates its shard of the test images and the counts are summed.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ddp
from .data import DeviceLoader


def evaluate(model: nn.Module, loader: DeviceLoader, info: ddp.DistInfo,
             autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
             pgd_backend: str = "auto", progress: bool = False) -> dict:
    """{"clean_acc", "pgd20_trades_acc", "pgd20_acc", "eval_images"} over every image of
    ``loader`` on every process (forwards and attacks under ``autocast_dtype`` if given)."""
    from ..attacks import evaluate as attacks_evaluate
    from ..attacks import pgd20, pgd20_trades

    kw = dict(autocast_dtype=autocast_dtype, backend=pgd_backend)
    attacks = {"pgd20_trades": pgd20_trades(model, **kw), "pgd20": pgd20(model, **kw)}
    names = ["clean", *attacks]
    counts = torch.zeros(len(names) + 1, dtype=torch.float64)
    if len(loader):  # a process can get no test image when there are fewer than processes
        res = attacks_evaluate(model, loader.epoch(0, channels_last), attacks, device=info.device,
                               autocast_dtype=autocast_dtype, progress=progress)
        accs = [res["clean_acc"], *(res["robust_acc"][k] for k in attacks)]
        counts = torch.tensor([round(a * res["n"]) for a in accs] + [res["n"]], dtype=torch.float64)
    counts = ddp.all_reduce_sum(counts.to(info.device), info).cpu()
    total = counts[-1].item()
    out = {f"{k}_acc": (counts[i].item() / total if total else float("nan"))
           for i, k in enumerate(names)}
    out["eval_images"] = int(total)
    return out
