"""OpenCLIP's contrastive loss on the fused two-set kernels.

open_clip's ``ClipLoss`` is the symmetric cross-entropy of ``logit_scale * img @ txt.T`` with
the diagonal as targets. Row i of the image-to-text direction is ``LSE_j(s_ij) - s_ii``, which
is ``supcon_loss`` with the images as anchors, the texts as contrast set, label i for image i and
text i, ``anchor_offset=None`` (the anchor is not in the contrast set), temperature 1 and no
normalisation; the text-to-image direction swaps the two. ``logit_scale`` is multiplied into
the anchors, so its gradient comes out of the kernels' feature gradient with no extra pass,
and no (B, B) logits matrix is stored.

Under ``torch.distributed`` the features are gathered with
``anchor_kernels.distributed.all_gather_with_grad`` and the options mean what they mean in
open_clip: ``local_loss`` takes this rank's rows as anchors against the gathered batch (targets
offset by the rows of the ranks before), otherwise every rank computes the loss of the whole
gathered batch; ``gather_with_grad`` lets the gradient flow back through the gather to every
rank, otherwise the gathered copy is a constant except for this rank's own rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _validate as v
from .supcon import supcon_loss


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              local_loss: bool = False, gather_with_grad: bool = False, group=None,
              distributed: bool | None = None, backend: str = "auto") -> Tensor:
    """OpenCLIP's symmetric contrastive loss, fused.

    Args:
        image_features, text_features: (B, D) each, normalised by the caller as in open_clip
            (the loss does not normalise); the same dtype and device.
        logit_scale: the scale (``model.logit_scale.exp()``): a float or a 0-d / (1,) tensor,
            differentiable.
        local_loss, gather_with_grad: open_clip's options, used when the loss runs
            distributed (see the module doc).
        group: the process group (default: the world).
        distributed: gather over ``group``; default: when torch.distributed is initialised
            with more than one process.
        backend: the ``supcon_loss`` backend ("auto", "triton", "cuda", "cpu", "eager").

    Returns:
        ``(CE(logits_per_image, targets) + CE(logits_per_text, targets)) / 2``, a 0-d tensor
        (float32 for half-precision features).
    """
    v.check_tensor("image_features", image_features, ndim=2, floating=True)
    v.check_tensor("text_features", text_features, ndim=2, floating=True)
    v.check_same("text_features", text_features, "image_features", image_features)
    if text_features.shape != image_features.shape:
        raise ValueError("image_features and text_features must have the same shape (B, D), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape[0] == 0:
        raise ValueError("image_features is an empty batch")
    scale = _check_scale(logit_scale, image_features)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

    all_img, all_txt, offset = image_features, text_features, 0
    if distributed:
        all_img, all_txt, offset = _gather_pair(image_features, text_features, group,
                                                local_loss, gather_with_grad)
    if distributed and not local_loss:
        img, txt, offset = all_img, all_txt, 0
    else:
        img, txt = image_features, text_features
    n = all_img.shape[0]
    targets = torch.arange(offset, offset + img.shape[0], device=img.device)
    ids = torch.arange(n, device=img.device)
    common = dict(temperature=1.0, normalize=False, anchor_offset=None, backend=backend)
    per_image = supcon_loss(img * scale, targets, contrast=all_txt, contrast_labels=ids, **common)
    per_text = supcon_loss(txt * scale, targets, contrast=all_img, contrast_labels=ids, **common)
    return (per_image + per_text) / 2


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss``: ``loss = ClipLoss()(image_features,
    text_features, logit_scale)`` with open_clip's constructor arguments.

    ``rank`` and ``world_size`` are taken from ``torch.distributed`` (the arguments are
    checked against it when given); ``cache_labels`` is accepted and has nothing to cache;
    horovod is not supported. ``backend`` picks the ``supcon_loss`` backend. See
    :func:`clip_loss`.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, group=None, backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported; use torch.distributed")
        self.local_loss, self.gather_with_grad = bool(local_loss), bool(gather_with_grad)
        self.cache_labels = cache_labels
        self.rank = v.check_int("rank", rank, minimum=0)
        self.world_size = v.check_int("world_size", world_size, minimum=1)
        self.group, self.backend = group, backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                output_dict: bool = False):
        distributed = self.world_size > 1
        if distributed:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"ClipLoss(world_size={self.world_size}) needs an initialised "
                                   "torch.distributed process group")
            actual = (dist.get_rank(self.group), dist.get_world_size(self.group))
            if actual != (self.rank, self.world_size):
                raise ValueError(f"rank={self.rank}, world_size={self.world_size} do not match the "
                                 f"process group (rank {actual[0]} of {actual[1]})")
        loss = clip_loss(image_features, text_features, logit_scale, local_loss=self.local_loss,
                         gather_with_grad=self.gather_with_grad, group=self.group,
                         distributed=distributed, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"world_size={self.world_size}, backend={self.backend!r}")


def _check_scale(logit_scale, like: Tensor):
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar (0-d or (1,)), got shape "
                             f"{tuple(logit_scale.shape)}")
        v.check_tensor("logit_scale", logit_scale, floating=True)
        v.check_same("logit_scale", logit_scale, "image_features", like, dtype=False)
        return logit_scale.reshape(())
    return v.check_positive("logit_scale", logit_scale)


def _gather_pair(img: Tensor, txt: Tensor, group, local_loss: bool, with_grad: bool):
    """(all images, all texts, this rank's first row) gathered over ``group``, as open_clip's
    ``gather_features``: with the gradient, or detached with this rank's rows re-attached
    (unless ``local_loss``, where the local rows are used directly)."""
    from .distributed import all_gather_with_grad

    b, d = img.shape
    both = torch.cat([img, txt], dim=1)  # one collective for the two modalities
    if with_grad:
        gathered = all_gather_with_grad(both, group)
    else:
        with torch.no_grad():
            gathered = all_gather_with_grad(both.detach(), group)
    # Each rank's row count, to find this rank's first row (local batches may differ).
    sizes = all_gather_with_grad(torch.tensor([b], device=img.device), group).tolist()
    offset = sum(sizes[:dist.get_rank(group)])
    if not with_grad and not local_loss:
        gathered = torch.cat([gathered[:offset], both, gathered[offset + b:]])
    return gathered[:, :d], gathered[:, d:], offset
