"""Random crop with zero padding and horizontal flip for a whole batch, in tensor ops on the
batch's device (torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``
semantics, drawn per image; the flip can be turned off for data where it changes the class,
such as digits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, pad: int = 4, generator: torch.Generator | None = None,
                     flip: bool = True) -> Tensor:
    """x (B, C, H, W) -> (B, C, H, W): per image, the H x W window at a uniform offset in
    [0, 2 pad]^2 of the zero-padded image, mirrored left-right with probability 1/2 (never
    with ``flip=False``; the same random numbers are drawn either way).

    Two gathers over the padded batch (rows, then columns) and one ``where``; the random
    numbers come from ``generator`` (on x's device) so that a resumed run repeats them.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, b), device=x.device, generator=generator)
    top, left = offsets[0], offsets[1]
    mirror = torch.randint(0, 2, (b,), device=x.device, generator=generator).bool() & flip
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, W)
    # Mirroring is a reversed column index, so the flip costs nothing extra.
    cols = torch.where(mirror[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
