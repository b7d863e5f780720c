"""What one loss call costs on the host, counted without a clock: Triton launches and the
torch ops dispatched for a forward + backward (CPU tensors, Triton under its interpreter)."""

import pytest
import torch

import anchor_kernels as ak
from anchor_kernels.ops import supcon_triton

from .utils import DispatchedOps, labels_for

if not supcon_triton.interpreting() and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def count(monkeypatch, fn):
    launches = []
    real = supcon_triton._run
    monkeypatch.setattr(supcon_triton, "_run", lambda kernel, grid, args, cx: (
        launches.append(getattr(kernel, "__name__", str(kernel))), real(kernel, grid, args, cx)))
    with DispatchedOps() as mode:
        fn()
    return launches, mode.ops


@pytest.mark.parametrize("options", [dict(), dict(hard_positive_beta=1.0, detach_weights=False),
                                     dict(reduction="none"), dict(two_sets=True)],
                         ids=["supcon", "soft-exact", "per-anchor", "two-sets"])
def test_one_launch_each_way(monkeypatch, options):
    options = dict(options)
    f = torch.randn(96, 32, device=DEVICE, requires_grad=True)
    y = labels_for("random", 96).to(DEVICE)
    inputs = 1
    if options.pop("two_sets", False):
        inputs = 2
        options.update(contrast=f.detach().clone().requires_grad_(), contrast_labels=y,
                       anchor_offset=0)

    def step():
        loss = ak.supcon_loss(f, y, backend="triton", **options)
        loss.backward(torch.ones_like(loss))

    launches, ops = count(monkeypatch, step)
    assert launches == ["_supcon_fwd_kernel", "_supcon_bwd_kernel"]
    # Besides the two ops: the test's seed gradient and the accumulation into each .grad.
    # No label pre-pass, no norms, no zero-fills, no reduction ops.
    assert ops.count("anchor_kernels.supcon_fwd_triton") == 1
    assert ops.count("anchor_kernels.supcon_bwd_triton") == 1
    assert len(ops) <= 3 + inputs, ops


def test_large_batches_add_only_linear_work(monkeypatch):
    """From STREAMING_MIN_LOGITS on: a norms kernel, the log-sum-exp-only pair, and plain
    SupCon's class sums as O((M + N) D) torch ops."""
    monkeypatch.setattr(supcon_triton, "STREAMING_MIN_LOGITS", 1)
    f = torch.randn(96, 32, device=DEVICE, requires_grad=True)
    y = labels_for("random", 96).to(DEVICE)
    launches, ops = count(monkeypatch, lambda: ak.supcon_loss(f, y, backend="triton").backward())
    assert launches == ["_supcon_norms_kernel", "_supcon_fwd_kernel", "_supcon_bwd_kernel"]
    assert len(ops) <= 100, ops  # O((M + N) D) each


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    """In plain eager mode the autograd function calls the implementations directly (the ops
    would only dispatch to them); under a dispatch mode, as under tracing, it calls the ops."""
    direct = []
    for name in ("supcon_fwd", "supcon_bwd"):
        real = getattr(supcon_triton, name)
        monkeypatch.setattr(supcon_triton, name, lambda *a, _real=real, _name=name, **kw: (
            direct.append(_name), _real(*a, **kw))[1])
    f = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    y = labels_for("random", 40).to(DEVICE)
    ak.supcon_loss(f, y, backend="triton").backward()
    assert direct == ["supcon_fwd", "supcon_bwd"]
    direct.clear()
    with DispatchedOps() as mode:
        ak.supcon_loss(f, y, backend="triton").backward()
    assert direct == []
    assert "anchor_kernels.supcon_fwd_triton" in mode.ops and "anchor_kernels.supcon_bwd_triton" in mode.ops


def test_op_calls_use_their_own_counters(monkeypatch):
    """Through the registered op (as torch.compile calls it) each launch gets fresh zeroed
    counters, never the buffer the eager path keeps across calls: CUDA-graph trees
    (mode="reduce-overhead") refuse memory of theirs that outlives a call untracked."""
    monkeypatch.setattr(supcon_triton, "_locks", {})
    f = torch.randn(40, 16, device=DEVICE)
    y = labels_for("random", 40).to(DEVICE)
    args = (f, None, y, None, 40, 0.1, 0.0, 1.0, True, False, 2)
    loss, ws = torch.ops.anchor_kernels.supcon_fwd_triton(*args)
    torch.ops.anchor_kernels.supcon_bwd_triton(torch.ones_like(loss), f, None, y, None, ws,
                                               *args[4:10], False, 2)
    assert supcon_triton._locks == {}
    supcon_triton.supcon_fwd(*args, reuse_locks=True)
    assert len(supcon_triton._locks) == 1


def test_launch_plans_are_computed_once_per_shape():
    """A training loop's repeated calls reuse their launch plans (grid, scalar arguments,
    constexprs): only a new shape or new options compute one."""
    plans = (supcon_triton._fwd_plan, supcon_triton._bwd_plan)
    for plan in plans:
        plan.cache_clear()
    f = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    y = labels_for("random", 40).to(DEVICE)
    for _ in range(3):
        ak.supcon_loss(f, y, backend="triton").backward()
    assert [(p.cache_info().misses, p.cache_info().hits) for p in plans] == [(1, 2), (1, 2)]
    ak.supcon_loss(f[:33], y[:33], backend="triton").backward()  # a ragged last batch
    ak.supcon_loss(f, y, temperature=0.2, backend="triton").backward()
    assert [p.cache_info().misses for p in plans] == [3, 3]


def test_a_plan_asks_the_autotuner_once(monkeypatch):
    """On a GPU the first launch of a plan goes through the autotuner; later launches of the
    same plan call the kernel with the configuration it chose, skipping the autotuner's
    per-launch Python (its key is rebuilt from every argument)."""
    import triton

    calls = []

    class Tuner:
        best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)

    monkeypatch.setattr(supcon_triton, "INTERPRET", False)
    monkeypatch.setattr(supcon_triton, "AUTOTUNE", True)
    monkeypatch.setattr(supcon_triton, "_autotuned", {("fwd", "half"): Tuner()})
    monkeypatch.setattr(supcon_triton, "_run", lambda kernel, grid, args, cx: calls.append((kernel, cx)))
    chosen = [None]
    for _ in range(3):
        supcon_triton._launch("fwd", torch.bfloat16, None, (), {"LSE_ONLY": False}, chosen)
    assert isinstance(calls[0][0], Tuner) and calls[0][1] == {"LSE_ONLY": False}
    direct = {"LSE_ONLY": False, "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_ctas": 1,
              "num_stages": 2}
    assert calls[1:] == [(supcon_triton._KERNELS["fwd"], direct)] * 2


def test_norms_first_adds_one_launch_and_no_ops(monkeypatch):
    """NORMS_FIRST_MIN_LOGITS on: the norms kernel, then the same one-launch pair, per-logit
    labels kept (no class sums, no extra torch ops)."""
    monkeypatch.setattr(supcon_triton, "NORMS_FIRST_MIN_LOGITS", 1)
    f = torch.randn(96, 32, device=DEVICE, requires_grad=True)
    y = labels_for("random", 96).to(DEVICE)

    def step():
        loss = ak.supcon_loss(f, y, backend="triton")
        loss.backward(torch.ones_like(loss))

    launches, ops = count(monkeypatch, step)
    assert launches == ["_supcon_norms_kernel", "_supcon_fwd_kernel", "_supcon_bwd_kernel"]
    assert len(ops) <= 4, ops


def test_launch_plans_follow_the_float32_matmul_precision(monkeypatch, matmul_precision):
    """The cached plans are keyed on torch's float32 matmul setting: "highest" multiplies in
    full float32 ("ieee"), "high" allows TF32, from one call to the next."""
    seen = []
    real = supcon_triton._run
    monkeypatch.setattr(supcon_triton, "_run", lambda kernel, grid, args, cx: (
        seen.append(cx["DOT_PRECISION"]), real(kernel, grid, args, cx)))
    f = torch.randn(40, 16, device=DEVICE)
    y = labels_for("random", 40).to(DEVICE)
    for precision in ("highest", "high", "highest"):
        matmul_precision(precision)
        ak.supcon_loss(f, y, backend="triton")
    assert seen == ["ieee", "tf32", "ieee"]


@pytest.mark.gpu
def test_gpu_tuned_plans_launch_directly_after_the_first(monkeypatch):
    """Tuned: a plan's first forward and backward go through the autotuner, later ones call
    the kernels with its choice; every call gives the same loss and gradient bit for bit,
    and the eager result."""
    import triton

    monkeypatch.setattr(supcon_triton, "AUTOTUNE", True)
    for plan in (supcon_triton._fwd_plan, supcon_triton._bwd_plan):
        plan.cache_clear()
    kinds = []
    real = supcon_triton._run
    monkeypatch.setattr(supcon_triton, "_run", lambda kernel, grid, args, cx: (
        kinds.append(isinstance(kernel, triton.runtime.Autotuner)), real(kernel, grid, args, cx)))
    f = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = labels_for("random", 1000).cuda()
    runs = []
    for _ in range(3):
        loss = ak.supcon_loss(f, y, backend="triton", hard_positive_beta=1.0)
        (grad,) = torch.autograd.grad(loss, f)
        runs.append((loss, grad))
    assert kinds == [True, True, False, False, False, False]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    ref = ak.supcon_loss(f.float(), y, backend="eager", hard_positive_beta=1.0)
    assert torch.allclose(runs[0][0], ref, rtol=2e-2, atol=2e-2)
