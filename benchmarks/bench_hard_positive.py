"""pytest-benchmark suite of ``hard_positive_mining`` (selection only, no backward): every
fused backend that can run against the eager baseline users write today, ``torch.topk`` over
the masked similarity matrix (O(N^2) memory), and ``torch.compile`` of that baseline. One
group per (dtype, N, k); ``extra_info`` holds the peak memory of one call (CUDA).

    .venv/bin/python -m pytest benchmarks/bench_hard_positive.py     # CPU: N 1024 .. 8192
    .venv/bin/python -m pytest benchmarks/bench_hard_positive.py --benchmark-json out.json

On a GPU the sizes are N = 4096, 16384, 65536 (D = 128, 10 classes) in bfloat16 and float32.
"""

import time

import pytest
import torch
import triton
import torch.nn.functional as F

import anchor_kernels as ak
from anchor_kernels.hard_positive import DISPATCH

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = {"cpu": (1024, 2048, 4096, 8192), "cuda": (4096, 16384, 65536)}[DEVICE.type]
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)}[DEVICE.type]
KS = (1, 4, 16)
D = 128
CLASSES = 10
TARGET_S = 0.5
MIN_ROUNDS = 20 if DEVICE.type == "cuda" else 3  # a GPU figure takes 20 repetitions at least


def eager(z, y, k):
    """The k lowest-cosine positives by topk over the masked (N, N) cosine matrix."""
    zn = F.normalize(z, dim=1)
    cos = zn @ zn.T
    pos = y[:, None] == y[None, :]
    pos.fill_diagonal_(False)
    cos = cos.masked_fill(~pos, float("inf"))
    return torch.topk(cos, k, dim=1, largest=False)


_compiled = torch.compile(eager)
# cuda-general: the cuda backend with ANCHOR_KERNELS_CUDA_KERNELS=general (its general kernel
# where the CuTe tensor-core one would run), to measure what that gains.
CANDIDATES = ["triton", "cuda", "cuda-general", "cpu", "eager", "compiled"]


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn):
    if DEVICE.type != "cuda":
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("k", KS, ids=lambda k: f"k{k}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_hard_positive(benchmark, candidate, n, dtype, k, monkeypatch):
    backend = candidate
    if candidate == "cuda-general":
        backend = "cuda"
        monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", "general")
    torch.manual_seed(0)
    z = torch.randn(n, D, device=DEVICE, dtype=dtype)
    y = torch.randint(0, CLASSES, (n,), device=DEVICE)
    if candidate in ("eager", "compiled"):
        base = eager if candidate == "eager" else _compiled
        fn = lambda: base(z, y, k)  # noqa: E731
    else:
        reasons = DISPATCH.get(backend).not_supported_reasons(z, z, k)
        if DEVICE.type == "cpu" and backend == "triton":
            reasons = ["the Triton interpreter is not timed"]
        if reasons:
            pytest.skip("; ".join(reasons))
        fn = lambda: ak.hard_positive_mining(z, y, k, backend=backend)  # noqa: E731

    def run():
        fn()
        sync()

    try:
        run()  # compile / warm up
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of memory")
    start = time.perf_counter()
    run()
    estimate = time.perf_counter() - start
    benchmark.group = f"hard_positive {str(dtype).replace('torch.', '')} N={n} k={k} D={D}"
    benchmark.extra_info.update(candidate=candidate, peak_mem_bytes=peak_memory(run),
                                device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                                torch=torch.__version__, triton=triton.__version__)
    benchmark.pedantic(run, warmup_rounds=1, iterations=1,
                       rounds=max(MIN_ROUNDS, min(100, int(TARGET_S / max(estimate, 1e-6)))))
