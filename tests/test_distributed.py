"""anchor_kernels.distributed on CPU with gloo: 2 and 3 spawned processes against one process.

Each world size is spawned once (module fixture); its workers run every case of that size and
save what each rank returned and the gradients it got. The tests rebuild the same global batch
here, run the single-process loss on the concatenation, and compare: the mean over ranks of
the returned losses with the single-process loss, and each rank's feature gradient divided by
the world size (what DDP's averaging does) with the single-process gradient of its rows.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import time
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import anchor_kernels
from anchor_kernels import distributed as akd

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo")

DIN, D = 5, 4  # DDP cases: a Linear(DIN, D) makes the features


def case(name, world, sizes, *, views=None, classes=3, kind="fn", dtype=torch.float64, **kw):
    return dict(name=name, world=world, sizes=sizes, views=views, classes=classes, kind=kind,
                dtype=dtype, kw=kw)


TOL = {torch.float64: dict(atol=1e-10, rtol=1e-8), torch.float32: dict(atol=2e-5, rtol=1e-4),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


# classes: number of label values, None for instance labels, or an explicit list.
CASES = [
    case("equal", 2, (4, 4), hard_positive_beta=0.0),
    case("unequal_beta", 2, (3, 6), hard_positive_beta=0.7),
    case("unequal_exact_weights", 2, (5, 2), hard_positive_beta=1.5, detach_weights=False,
         temperature=0.3, base_temperature=0.2),
    case("views_instance", 2, (3, 2), views=2, classes=None),
    case("views_labels_exact", 2, (2, 4), views=3, classes=2, hard_positive_beta=1.0,
         detach_weights=False),
    case("topk", 2, (4, 3), classes=2, hard_positive_topk=2),
    case("sum", 2, (3, 5), hard_positive_beta=0.5, reduction="sum"),
    case("none_views", 2, (2, 3), views=2, reduction="none", hard_positive_beta=0.5),
    # rank 0 has no anchor with a positive, rank 1 two: unequal valid counts
    case("unequal_valid", 2, (3, 4), classes=[10, 11, 12, 0, 0, 1, 2], hard_positive_beta=0.3,
         detach_weights=False),
    case("no_valid", 2, (2, 3), classes=[0, 1, 2, 3, 4]),
    case("module_hard", 2, (3, 5), views=2, kind="hard_module", temperature=0.2),
    case("module_supcon_all", 2, (2, 3), views=2, classes=2, kind="supcon_module"),
    case("module_supcon_one", 2, (3, 2), views=2, classes=None, kind="supcon_module",
         contrast_mode="one"),
    case("ddp", 2, (3, 5), views=2, kind="ddp", hard_positive_beta=0.5, detach_weights=False),
    case("gather", 2, (3, 1), kind="gather"),
    # the fused Triton kernels (under the interpreter on CPU) in the workers, float32
    case("triton", 2, (3, 5), dtype=torch.float32, backend="triton", hard_positive_beta=0.5,
         detach_weights=False),
    case("triton_views", 2, (2, 3), views=2, classes=None, dtype=torch.float32,
         backend="triton"),
    case("unequal_3", 3, (4, 1, 6), hard_positive_beta=0.8, detach_weights=False),
    case("empty_rank_3", 3, (2, 0, 3), views=2, classes=None, hard_positive_beta=0.5),
    case("views_3", 3, (2, 3, 1), views=2, classes=2),
    case("ddp_3", 3, (3, 1, 4), views=2, kind="ddp", hard_positive_beta=1.0),
    case("gather_3", 3, (2, 0, 3), kind="gather"),
]

# Bad inputs: (name, world, what rank 1 does wrong). They run between the cases above, so the
# cases after them also show that the group is still usable after the error.
ERRORS = [("label_dtype", 2), ("device", 2), ("local_shape", 2), ("label_device", 2),
          ("options", 2), ("label_dtype", 3), ("gather_dim", 2), ("gather_dtype", 2),
          ("gather_not_tensor", 2), ("gather_dim", 3)]
# errors found by rank 1's own checks: rank 1 raises this, the others name rank 1
LOCAL_ERRORS = {"local_shape": "labels must have shape (3,)",
                "label_device": "labels is on meta but features is on cpu",
                "gather_not_tensor": "x must be a torch.Tensor, got list"}


def make_inputs(c):
    """The global batch of case ``c``: features (B, [V,] D) float64 and labels (B,) or None."""
    gen = torch.Generator().manual_seed(zlib.crc32(c["name"].encode()))
    b = sum(c["sizes"])
    width = DIN if c["kind"] == "ddp" else D
    shape = (b, width) if c["views"] is None else (b, c["views"], width)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if c["kind"] == "supcon_module":  # SupContrast expects normalised features
        x = torch.nn.functional.normalize(x, dim=-1)
    classes = c["classes"]
    if classes is None:
        labels = None
    elif isinstance(classes, list):
        labels = torch.tensor(classes)
    else:
        labels = torch.randint(0, classes, (b,), generator=gen)
    return x, labels


def local_part(c, x, labels, rank):
    start = sum(c["sizes"][:rank])
    stop = start + c["sizes"][rank]
    return x[start:stop], None if labels is None else labels[start:stop]


def make_model():
    torch.manual_seed(1)
    return torch.nn.Linear(DIN, D, dtype=torch.float64)


def loss_fn(c, distributed: bool):
    """The loss of case ``c``: distributed or single-process (eager, float64) form."""
    kw = dict(c["kw"])
    if c["kind"] in ("fn", "ddp"):
        kw["backend"] = kw.get("backend", "eager") if distributed else "eager"
        fn = akd.supcon_loss if distributed else anchor_kernels.supcon_loss
        return lambda f, y: fn(f, y, **kw)
    if c["kind"] == "hard_module":
        if distributed:
            return akd.DistributedHardMinedSupConLoss(backend="eager", **kw)
        return anchor_kernels.HardMinedSupConLoss(backend="eager", **kw)
    cls = akd.DistributedSupConLoss if distributed else anchor_kernels.SupConLoss
    return cls(backend="eager", **kw)


# --- worker side ------------------------------------------------------------------------

def run_case(c, rank, device):
    x, labels = make_inputs(c)
    x, y = local_part(c, x, labels, rank)
    x = x.to(device, c["dtype"])
    y = None if y is None else y.to(device)
    if c["kind"] == "gather":
        x.requires_grad_(True)
        gathered = akd.all_gather_with_grad(x)
        weight = torch.arange(gathered.numel(), dtype=x.dtype, device=device)
        (gathered * weight.reshape(gathered.shape)).sum().backward()
        return dict(value=gathered.detach().cpu(), grad=x.grad.cpu())
    if c["kind"] == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(make_model().to(device), device_ids=ids)
        loss = loss_fn(c, True)(model(x), y)
        loss.backward()
        return dict(value=loss.detach().cpu(), grads=[p.grad.cpu() for p in model.parameters()])
    x.requires_grad_(True)
    loss = loss_fn(c, True)(x, y)
    loss.sum().backward()
    return dict(value=loss.detach().cpu(), grad=x.grad.cpu())


def run_error(name, world, rank):
    x, labels = torch.randn(3, 2, D, dtype=torch.float64), torch.tensor([0, 1, 0])
    kw = dict(backend="eager")
    if name.startswith("gather_"):  # all_gather_with_grad: rank 1 passes another D or dtype
        x = torch.randn(2 + rank, D, dtype=torch.float64)
        if rank == 1:
            x = {"gather_dim": x[:, :-1], "gather_dtype": x.float(),
                 "gather_not_tensor": x.tolist()}[name]
        try:
            akd.all_gather_with_grad(x)
        except Exception as exc:
            return dict(type=type(exc).__name__, message=str(exc))
        return dict(type=None, message="")
    if rank == 1:
        if name == "label_dtype":
            labels = labels.to(torch.int32)
        elif name == "device":
            x, labels = x.to("meta"), labels.to("meta")
        elif name == "local_shape":
            labels = labels[:2]
        elif name == "label_device":
            labels = labels.to("meta")
        elif name == "options":
            kw["temperature"] = 0.2
    try:
        akd.supcon_loss(x, labels, **kw)
    except Exception as exc:  # the test checks the type and message of every rank's error
        return dict(type=type(exc).__name__, message=str(exc))
    return dict(type=None, message="")


def worker(rank, world, port, out_dir, backend):
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        for c in gpu_cases(world):
            results[c["name"]] = run_case(c, rank, torch.device("cuda", rank))
    else:
        cases = [c for c in CASES if c["world"] == world]
        errors = [e for e, w in ERRORS if w == world]
        # interleave: an error case, then a normal case, so recovery is exercised
        for i, c in enumerate(cases):
            if i < len(errors):
                results["error:" + errors[i]] = run_error(errors[i], world, rank)
            results[c["name"]] = run_case(c, rank, torch.device("cpu"))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# --- test side --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, tmp_path_factory, backend="gloo", timeout=90.0):
    out_dir = str(tmp_path_factory.mktemp(f"{backend}{world}"))
    ctx = mp.start_processes(worker, args=(world, free_port(), out_dir, backend), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {timeout} s "
                        "(a hang in a collective?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = spawn(world, tmp_path_factory)
        return cache[world]
    return get


def single_process(c):
    """Loss value and gradient w.r.t. the concatenated features, in one process, float64."""
    x, labels = make_inputs(c)
    x = x.to(c["dtype"]).double()  # the inputs the workers saw
    if c["kind"] == "ddp":
        model = make_model()
        loss = loss_fn(c, False)(model(x), labels)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]
    x.requires_grad_(True)
    loss = loss_fn(c, False)(x, labels)
    loss.sum().backward()
    return loss.detach(), x.grad


def rows_of(c, rank, per_anchor):
    """Rank ``rank``'s entries of a single-process "none" output (global view-major)."""
    start, size = sum(c["sizes"][:rank]), c["sizes"][rank]
    if c["views"] is None:
        return per_anchor[start:start + size]
    return per_anchor.reshape(c["views"], -1)[:, start:start + size].reshape(-1)


@pytest.mark.parametrize("c", CASES, ids=[c["name"] for c in CASES])
def test_matches_single_process(c, worlds):
    check_against_single_process(c, [r[c["name"]] for r in worlds(c["world"])])


def check_against_single_process(c, results):
    """Mean over ranks of the returned loss = single-process loss; each rank's gradient after
    DDP's averaging = the single-process gradient of its rows."""
    world = c["world"]
    if c["kind"] == "gather":
        x, _ = make_inputs(c)
        weight = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape)
        for rank, res in enumerate(results):
            torch.testing.assert_close(res["value"], x)
            # every rank's sum(gathered * weight) reaches this rank's rows: R times its weights
            local_w, _ = local_part(c, weight, None, rank)
            torch.testing.assert_close(res["grad"], world * local_w)
        return
    expected, expected_grad = single_process(c)
    close = functools.partial(torch.testing.assert_close, check_dtype=False, **TOL[c["dtype"]])
    if c["kind"] == "ddp":
        close(sum(r["value"] for r in results) / world, expected)
        for res in results:  # DDP already averaged these over ranks
            for got, want in zip(res["grads"], expected_grad):
                close(got, want)
        return
    if c["kw"].get("reduction") == "none":
        for rank, res in enumerate(results):
            close(res["value"], rows_of(c, rank, expected))
            # backward of each rank's sum: the gather sums every rank's terms, no averaging
            close(res["grad"], local_part(c, expected_grad, None, rank)[0])
        return
    close(sum(r["value"] for r in results) / world, expected)
    for rank, res in enumerate(results):
        want = local_part(c, expected_grad, None, rank)[0]
        close(res["grad"] / world, want)


def test_cases_are_not_degenerate():
    """The comparisons above mean something: losses are nonzero and gradients reach every row
    (except where the case is built to have no positive anywhere)."""
    for c in CASES:
        if c["kind"] in ("gather", "ddp") or c["name"] == "no_valid":
            continue
        value, grad = single_process(c)
        assert value.abs().sum() > 0.1, c["name"]
        assert (grad.reshape(grad.shape[0], -1).abs().sum(1) > 0).all(), c["name"]


@pytest.mark.parametrize("name,world", ERRORS, ids=[f"{n}-{w}" for n, w in ERRORS])
def test_errors_raised_on_every_rank(name, world, worlds):
    errors = [r["error:" + name] for r in worlds(world)]
    if name in LOCAL_ERRORS:
        assert errors[1]["type"] in ("ValueError", "TypeError"), errors[1]
        assert LOCAL_ERRORS[name] in errors[1]["message"], errors[1]
        for r, e in enumerate(errors):
            if r != 1:
                assert e["type"] == "RuntimeError" and "rank(s) [1]" in e["message"], e
        return
    want = {"label_dtype": ("TypeError", "labels' dtype differs between ranks"),
            "device": ("ValueError", "features' device type differs between ranks"),
            "options": ("ValueError", "loss options"),
            "gather_dim": ("ValueError", f"x.shape[1:] (every dimension but the rows) differs "
                                         f"between ranks (rank 0: ({D},), rank 1: ({D - 1},)"),
            "gather_dtype": ("TypeError", "x's dtype differs between ranks (rank 0: "
                                          "torch.float64, rank 1: torch.float32)")}[name]
    for e in errors:
        assert e["type"] == want[0] and want[1] in e["message"], e
    if name == "label_dtype":
        assert "torch.int32" in errors[0]["message"] and "torch.int64" in errors[0]["message"]


def test_error_without_process_group():
    assert not dist.is_initialized()
    x, y = torch.randn(4, D), torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        akd.supcon_loss(x, y)
    with pytest.raises(RuntimeError, match="init_process_group"):
        akd.DistributedSupConLoss()(x[:, None].expand(4, 2, D), y)
    with pytest.raises(RuntimeError, match="init_process_group"):
        akd.all_gather_with_grad(x)


def test_valid_count_matches_reference():
    """The sort-based count of anchors with a positive agrees with the reference's mask."""
    from anchor_kernels.reference import supcon_per_anchor
    gen = torch.Generator().manual_seed(3)
    for n, k in ((1, 1), (2, 2), (7, 3), (20, 15)):
        y = torch.randint(0, k, (n,), generator=gen)
        _, valid = supcon_per_anchor(torch.randn(n, 3, generator=gen), y)
        assert int(akd._count_valid(y)) == int(valid.sum())


def gpu_cases(world):
    """Tier 2: the same checks with NCCL and CUDA tensors, one process per visible GPU (up to
    3; a single GPU still runs the NCCL collectives and the compiled kernels)."""
    sizes = tuple(3 + 2 * r for r in range(world))
    return [
        case("gpu_triton", world, sizes, dtype=torch.float32, backend="triton",
             hard_positive_beta=0.5, detach_weights=False),
        case("gpu_auto_views", world, sizes, views=2, classes=None, dtype=torch.float32,
             backend="auto"),
        case("gpu_triton_bf16", world, sizes, views=2, dtype=torch.bfloat16, backend="triton",
             hard_positive_beta=1.0),
        case("gpu_eager_f64", world, sizes, views=3, classes=2, hard_positive_topk=2),
        case("gpu_ddp", world, sizes, views=2, kind="ddp", hard_positive_beta=0.5),
        case("gpu_gather", world, sizes, kind="gather"),
    ]


@pytest.mark.gpu
def test_nccl_on_gpus(tmp_path_factory):
    if not dist.is_nccl_available():
        pytest.skip("torch.distributed has no NCCL in this build")
    world = min(torch.cuda.device_count(), 3)
    ranks = spawn(world, tmp_path_factory, backend="nccl", timeout=300.0)
    for c in gpu_cases(world):
        check_against_single_process(c, [r[c["name"]] for r in ranks])
