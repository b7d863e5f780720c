"""OpenCLIP's contrastive loss (``anchor_kernels.ClipLoss``): B image-text pairs.

Inputs: image and text features (B, D), normalised, and the logit scale, all with
``requires_grad``. Work: the two similarity matmuls (image-to-text and text-to-image),
4 B^2 D flops forward and 8 B^2 D backward; a fused backend's recomputation is not counted.

Candidates: every anchor_kernels backend of the two-set loss, open_clip's formula in eager
PyTorch (two B x B logits matrices) and its ``torch.compile``, and ``inf-cl`` (PyPI package
``inf-cl``, Inf-CL's tiled Triton kernels, the single-process ``cal_flash_loss`` in both
directions), which runs on CUDA tensors only and is recorded as unsupported elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from anchor_kernels import available_backends, backends
from anchor_kernels.clip import clip_loss

from ..records import Candidate, Problem, Settings, Work
from . import _common

NAME = "clip"
SIZE_LABEL = "B (image-text pairs)"
OPTIONS = {"d": 128, "logit_scale": 1 / 0.07}  # open_clip's initial scale

_SIZES = {
    ("cpu", True): (256, 512, 1024, 2048),
    ("cpu", False): (512, 1024, 2048, 4096, 8192),
    ("cuda", True): (1024, 4096, 16384),
    ("cuda", False): tuple(1024 * 2 ** k for k in range(7)),  # 1024 .. 65536
}
INF_CL_HEAD_DIMS = (16, 32, 64, 128, 256)


def sizes(device_type: str, quick: bool) -> tuple[int, ...]:
    return _SIZES[(device_type, quick)]


def make_problem(n: int, dtype: torch.dtype, device: torch.device, options: dict) -> Problem:
    gen = torch.Generator(device=device).manual_seed(n)
    img, txt = (F.normalize(torch.randn(n, options["d"], device=device, generator=gen), dim=1)
                .to(dtype).requires_grad_() for _ in range(2))
    scale = torch.tensor(float(options["logit_scale"]), device=device, requires_grad=True)
    return Problem(op=NAME, n=n, m=n, d=options["d"], dtype=dtype, device=device,
                   inputs={"image": img, "text": txt, "logit_scale": scale},
                   grad_inputs=(img, txt, scale))


def work(p: Problem, pass_: str) -> Work:
    bbd = float(p.m) * p.n * p.d
    return Work(flops={"fwd": 4 * bbd, "bwd": 8 * bbd, "fwd+bwd": 12 * bbd}[pass_])


def openclip_loss(img, txt, logit_scale):
    """open_clip's ``ClipLoss.forward`` in one process, as written there."""
    logits_per_image = logit_scale * img @ txt.T
    logits_per_text = logit_scale * txt @ img.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits_per_image.float(), labels)
            + F.cross_entropy(logits_per_text.float(), labels)) / 2


def _args(p: Problem) -> tuple:
    return p.inputs["image"], p.inputs["text"], p.inputs["logit_scale"]


def _backend_reasons(name: str):
    def reasons(p: Problem) -> list[str]:
        img, txt, _ = _args(p)
        ids = torch.arange(p.n, device=p.device)
        return available_backends(img, ids, contrast=txt, contrast_labels=ids, anchor_offset=None,
                                  temperature=1.0, normalize=False)[name]
    return reasons


def _backend_build(name: str):
    def build(p: Problem):
        return functools.partial(clip_loss, *_args(p), distributed=False, backend=name), \
            p.grad_inputs
    return build


def _eager_build(p: Problem):
    return functools.partial(openclip_loss, *_args(p)), p.grad_inputs


def _compiled_build(settings: Settings):
    fn = _common.compiled(NAME, openclip_loss, settings)

    def build(p: Problem):
        return functools.partial(fn, *_args(p)), p.grad_inputs
    return build


def _inf_cl_reasons(p: Problem) -> list[str]:
    reasons = []
    if importlib.util.find_spec("inf_cl") is None:
        reasons.append("the inf-cl package is not installed (pip install inf-cl)")
    if p.device.type != "cuda":
        reasons.append("inf-cl's Triton kernels take CUDA tensors only (they assert q.is_cuda)")
    if p.d not in INF_CL_HEAD_DIMS and not any(p.d % h == 0 for h in INF_CL_HEAD_DIMS):
        reasons.append(f"inf-cl needs D divisible by a head dim in {INF_CL_HEAD_DIMS}, not {p.d}")
    return reasons


def _inf_cl_build(p: Problem):
    from inf_cl import cal_flash_loss

    head_dim = max(h for h in INF_CL_HEAD_DIMS if p.d % h == 0)
    img, txt, scale = _args(p)
    labels = torch.arange(p.n, device=p.device)

    def forward():
        # Inf-CL's README: the symmetric CLIP loss is the mean of the two directions.
        i2t = cal_flash_loss(img, txt, labels, scale, head_dim).mean()
        t2i = cal_flash_loss(txt, img, labels, scale, head_dim).mean()
        return (i2t + t2i) / 2
    return forward, p.grad_inputs


def candidates(device: torch.device, options: dict, settings: Settings) -> list[Candidate]:
    """Every anchor_kernels backend (eager is the baseline), open_clip's eager formula and its
    torch.compile, and inf-cl where it can run."""
    out = _common.backend_candidates(
        backends.BACKEND_NAMES, device, settings, _backend_reasons, _backend_build,
        note='ClipLoss(backend="{name}")')
    out.append(Candidate("eager", "baseline", _eager_build,
                         note="open_clip's ClipLoss formula in eager PyTorch: two B x B logits"))
    out.append(Candidate("compile", "baseline", _compiled_build(settings),
                         note=_common.compile_note(settings)))
    out.append(Candidate("inf-cl", "baseline", _inf_cl_build, _inf_cl_reasons,
                         note="inf-cl (PyPI) cal_flash_loss in both directions: Inf-CL's tiled "
                              "Triton kernels, fp32 logits"))
    return out
