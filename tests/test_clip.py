"""ClipLoss against open_clip's formula written out in eager torch: the loss and the gradients
of the image features, the text features and the logit scale, in one process and over two
gloo processes (local_loss and gather_with_grad)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import anchor_kernels as ak
from anchor_kernels.clip import ClipLoss, clip_loss

from .test_distributed import free_port
from .utils import assert_close

D = 8


def openclip_losses(imgs, txts, scales, local_loss, gather_with_grad):
    """open_clip's ``ClipLoss`` on each rank r of ``len(imgs)`` (its ``gather_features`` and
    ``get_logits``, emulated in one process): rank r's loss."""
    world, losses = len(imgs), []
    for r in range(world):
        if world == 1 or gather_with_grad:
            all_i, all_t = torch.cat(imgs), torch.cat(txts)
        else:  # gathered without gradient; the local rows re-attached unless local_loss
            gi, gt = [x.detach() for x in imgs], [x.detach() for x in txts]
            if not local_loss:
                gi[r], gt[r] = imgs[r], txts[r]
            all_i, all_t = torch.cat(gi), torch.cat(gt)
        if world > 1 and not local_loss:
            per_image = scales[r] * all_i @ all_t.T
            per_text, labels = per_image.T, torch.arange(all_i.shape[0])
        else:
            per_image = scales[r] * imgs[r] @ all_t.T
            per_text = scales[r] * txts[r] @ all_i.T
            offset = sum(x.shape[0] for x in imgs[:r])
            labels = torch.arange(offset, offset + imgs[r].shape[0])
        losses.append((F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2)
    return losses


def features(sizes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    make = lambda b: F.normalize(torch.randn(b, D, generator=g, dtype=dtype), dim=1)  # noqa: E731
    return [make(b) for b in sizes], [make(b) for b in sizes]


def leaves(xs):
    return [x.detach().clone().requires_grad_() for x in xs]


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_matches_openclip_one_process(backend, scale):
    imgs, txts = features([12])
    log_scale = torch.tensor(scale, dtype=torch.float64).log()
    ref_i, ref_t, ref_s = leaves(imgs), leaves(txts), leaves([log_scale])
    expected = openclip_losses(ref_i, ref_t, [ref_s[0].exp()], False, False)[0]
    expected.backward()
    img, txt, s = leaves(imgs)[0], leaves(txts)[0], log_scale.clone().requires_grad_()
    loss = ClipLoss(backend=backend)(img, txt, s.exp())
    loss.backward()
    tol = dict(atol=1e-10, rtol=1e-10)
    assert_close(loss, expected, **tol, what="loss")
    assert_close(img.grad, ref_i[0].grad, **tol, what="image gradient")
    assert_close(txt.grad, ref_t[0].grad, **tol, what="text gradient")
    assert_close(s.grad, ref_s[0].grad, **tol, what="logit_scale gradient")


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_float32_and_output_dict(backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    imgs, txts = features([32], dtype=torch.float32)
    scale = torch.tensor(30.0)
    expected = openclip_losses([x.double() for x in imgs], [x.double() for x in txts],
                               [scale.double()], False, False)[0]
    imgs, txts, scale = [x.to(device) for x in imgs], [x.to(device) for x in txts], scale.to(device)
    out = ClipLoss(backend=backend)(imgs[0], txts[0], scale, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dtype == torch.float32
    assert_close(out["contrastive_loss"], expected, atol=1e-5, rtol=1e-5, what="loss")
    assert_close(clip_loss(imgs[0], txts[0], 30.0), expected, atol=1e-5, rtol=1e-5,
                 what="float scale")


def test_bad_input():
    img, txt = torch.randn(4, D), torch.randn(4, D)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(img, txt[:3], 10.0)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        clip_loss(img, txt, torch.ones(2))
    with pytest.raises(TypeError, match="dtype"):
        clip_loss(img, txt.double(), 10.0)
    with pytest.raises(ValueError, match="horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(RuntimeError, match="process group"):
        ClipLoss(world_size=2, rank=1)(img, txt, 10.0)


# --- two gloo processes ---------------------------------------------------------------------

CASES = [(local, grad, sizes) for local in (False, True) for grad in (False, True)
         for sizes in ((3, 3),)] + [(True, True, (2, 5)), (False, False, (4, 1))]


def worker(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = []
    for i, (local, grad, sizes) in enumerate(CASES):
        imgs, txts = features(sizes, seed=i)
        img, txt = leaves(imgs[rank:rank + 1])[0], leaves(txts[rank:rank + 1])[0]
        s = torch.tensor(20.0 + i, dtype=torch.float64, requires_grad=True)
        loss = ClipLoss(local_loss=local, gather_with_grad=grad, rank=rank, world_size=world)(
            img, txt, s)
        loss.backward()
        results.append(dict(loss=loss.detach(), img=img.grad, txt=txt.grad, scale=s.grad))
    torch.save(results, out_path.format(rank))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clip") / "rank{}.pt")
    mp.start_processes(worker, args=(2, free_port(), out), nprocs=2, start_method="spawn",
                       join=True)
    return [torch.load(out.format(r)) for r in range(2)]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_openclip_two_processes(two_ranks, i):
    local, grad, sizes = CASES[i]
    imgs, txts = features(sizes, seed=i)
    imgs, txts = leaves(imgs), leaves(txts)
    scales = leaves([torch.tensor(20.0 + i, dtype=torch.float64)] * 2)
    losses = openclip_losses(imgs, txts, scales, local, grad)
    # Every rank backpropagates its own loss; the gathers' backward sums over ranks, which
    # the emulation gets from one backward of the sum.
    sum(losses).backward()
    tol = dict(atol=1e-10, rtol=1e-10)
    for r in range(2):
        got = two_ranks[r][i]
        what = f"local_loss={local}, gather_with_grad={grad}, sizes={sizes}, rank {r}"
        assert_close(got["loss"], losses[r], **tol, what=f"loss ({what})")
        assert_close(got["img"], imgs[r].grad, **tol, what=f"image gradient ({what})")
        assert_close(got["txt"], txts[r].grad, **tol, what=f"text gradient ({what})")
        assert_close(got["scale"], scales[r].grad, **tol, what=f"logit_scale gradient ({what})")


def test_exported():
    assert ak.ClipLoss is ClipLoss and ak.clip_loss is clip_loss


def test_benchmark_candidates():
    from benchmarks.ops import clip as op
    from benchmarks.records import Settings

    p = op.make_problem(16, torch.float32, torch.device("cpu"), dict(op.OPTIONS, d=16))
    cands = {c.name: c for c in op.candidates(torch.device("cpu"), op.OPTIONS, Settings())}
    assert {"eager", "compile", "inf-cl", "cpu", "triton"} <= set(cands)
    if not torch.cuda.is_available():  # recorded as unsupported with the reason, never faked
        assert any("CUDA" in r for r in cands["inf-cl"].reasons(p))
    fwd, _ = cands["eager"].build(p)
    assert_close(clip_loss(*(p.inputs[k] for k in ("image", "text", "logit_scale"))), fwd(),
                 atol=1e-5, rtol=1e-5, what="open_clip's formula in the benchmark")
