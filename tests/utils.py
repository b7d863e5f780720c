"""Comparison helpers whose failures say how many elements differ, where, and by how much."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import anchor_kernels as ak


def assert_close(actual, expected, *, atol, rtol, what=""):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {idx}; max err {err.max().item():.3e}, mean err {err.mean().item():.3e}")


def labels_for(kind: str, n: int, generator=None) -> torch.Tensor:
    """Label patterns that exercise the edge cases of the positive sets."""
    if kind == "random":
        return torch.randint(0, max(1, n // 4), (n,), generator=generator)
    if kind == "one_class":
        return torch.zeros(n, dtype=torch.int64)
    if kind == "all_distinct":
        return torch.arange(n)
    if kind == "some_alone":  # a few classes of size > 1 plus singletons with no positive
        y = torch.randint(0, 3, (n,), generator=generator)
        y[::3] = torch.arange(100, 100 + len(y[::3]))
        return y
    if kind == "wide":  # int64 labels past int32 both ways, some equal in their low 32 bits,
        # and labels at the edges of int32 and of the CUDA kernels' 32-bit label keys
        table = torch.tensor([0, 7, 1 << 32, -(1 << 32), (1 << 40) + 7, -2**31, -2**31 + 255,
                              -2**31 + 256, -2**31 + 257, 2**31 - 1, 2**31, 2**63 - 1, -2**63])
        return table[torch.randint(0, len(table), (n,), generator=generator)]
    raise ValueError(kind)


def loss_and_grads(backend, f, y, g=None, y_g=None, *, dtype=None, weights=None, **kw):
    """Per-anchor losses and the gradients of sum(weights * loss) w.r.t. f (and g)."""
    dtype = dtype or f.dtype
    fx = f.detach().to(dtype).requires_grad_()
    gx = None if g is None else g.detach().to(dtype).requires_grad_()
    per_anchor = ak.supcon_loss(fx, y, contrast=gx, contrast_labels=y_g, reduction="none",
                                backend=backend, **kw)
    if weights is None:
        weights = torch.ones_like(per_anchor)
    (per_anchor * weights.to(per_anchor.dtype)).sum().backward()
    return per_anchor.detach(), fx.grad, (None if gx is None else gx.grad)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (imported as an autouse fixture by the trainer tests): on two cores
    shared by many jobs, one thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_graph_safe(step, inputs):
    """Tier 2: ``step()`` (reading ``inputs``, tensors it closes over) runs without a host
    synchronisation under ``torch.cuda.set_sync_debug_mode("error")``, and a capture of it in
    a CUDA graph, replayed on new values copied into ``inputs``, gives the eager result
    (replayed twice: state a launch leaves behind, such as merge counters, must be reset)."""
    step()  # compile and tune outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for t in inputs:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
            else:
                t.copy_(torch.randint(0, 10, t.shape, device="cuda", generator=gen))
    graph.replay()
    graph.replay()
    eager = step()
    for i, (c, e) in enumerate(zip(captured, eager)):
        assert torch.equal(c, e), f"output {i}: the replayed graph differs from eager"


def cuda_kernels_run(fn):
    """Names of the CUDA kernels fn launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


class DispatchedOps(TorchDispatchMode):
    """Every op dispatched at the top level (the ops' own implementations run beneath it)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


_LAUNCH = "triton launch"
# Ops that allocate, view or describe tensors: no kernel of their own on a GPU.
_NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "detach", "view", "t",
            "transpose", "as_strided", "expand", "alias", "lift_fresh", "promote_types",
            "result_type", "contiguous", "_to_copy", "to", "select", "slice"}


class TritonCalls:
    """The Triton launches (kernel names, in order) and the torch ops that do work (outermost
    calls only, by aten name) of what runs inside the block, nested op implementations
    included: the whole host cost of a call, counted without a clock. ``to`` and
    ``contiguous`` count as no work: a kernel would show as the copy they dispatch to."""

    def __init__(self, monkeypatch):
        from anchor_kernels.ops import triton_launch

        self.launches, self.ops = [], []
        real = triton_launch.Launch.__call__

        def record(launch):
            self.launches.append(launch.kernel.__name__)
            with torch.profiler.record_function(_LAUNCH):  # the interpreter's own torch ops
                real(launch)

        monkeypatch.setattr(triton_launch.Launch, "__call__", record)

    def __enter__(self):
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        for e in self._profile.events():
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::") and parent.name != _LAUNCH:
                parent = parent.cpu_parent
            name = e.name.removeprefix("aten::")
            if e.name.startswith("aten::") and parent is None and name not in _NO_WORK:
                self.ops.append(name)
        return False
