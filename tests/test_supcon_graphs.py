"""The Triton loss on a GPU without host synchronisation: forward + backward under
``torch.cuda.set_sync_debug_mode("error")``, captured in a CUDA graph and replayed, and
under ``torch.compile(mode="reduce-overhead")`` (tier 2: needs a CUDA device)."""

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels.ops import supcon_triton

from .utils import assert_close, assert_graph_safe

pytestmark = pytest.mark.gpu

CASES = {
    "supcon": dict(),
    "soft": dict(hard_positive_beta=1.0, detach_weights=False),
    "sum": dict(reduction="sum"),
    "per-anchor": dict(reduction="none"),
    "two-sets": dict(contrast=True),
    "top-k": dict(hard_positive_topk=4),
}


def make(n=2048, d=128, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    f = torch.randn(n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (n,), device="cuda", generator=gen)
    return f, y


def step(f, y, options):
    options = dict(options)
    if options.pop("contrast", False):
        options.update(contrast=f, contrast_labels=y, anchor_offset=None)
    loss = ak.supcon_loss(f, y, backend="triton", **options)
    (grad,) = torch.autograd.grad(loss.sum(), f)
    return loss, grad


@pytest.fixture(params=[False, True], ids=["one-launch", "streaming"])
def streaming(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(supcon_triton, "STREAMING_MIN_LOGITS", 1)
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_no_host_synchronisation_and_cuda_graph_replay(name, streaming):
    f, y = make()
    assert_graph_safe(lambda: step(f, y, CASES[name]), (f, y))


def test_reduce_overhead_compile():
    f, y = make()
    compiled = torch.compile(lambda f: step(f, y, {}), mode="reduce-overhead", fullgraph=False)
    for _ in range(3):
        loss_c, grad_c = compiled(f)
    loss_e, grad_e = step(f, y, {})
    assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(grad_c, grad_e, atol=1e-5, rtol=1e-5, what="grad")


def test_deterministic():
    """Fixed-order merges (no float atomics): two runs give the same bits."""
    f, y = make(n=4096)
    a = step(f, y, dict(hard_positive_beta=1.0))
    b = step(f, y, dict(hard_positive_beta=1.0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
