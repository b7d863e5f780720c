"""pytest-benchmark suite of ``pairwise_similarity``: every fused backend that can run against
eager PyTorch (``F.normalize(a) @ F.normalize(b).T / t``) and ``torch.compile`` of it, forward
and forward+backward, one group per (pass, dtype, N, D) so the fused and eager rows sit side
by side. ``extra_info`` holds the peak memory of one call and the achieved TFLOP/s
(2 M N D forward, 6 M N D forward+backward).

    .venv/bin/python -m pytest benchmarks/bench_similarity.py                 # CPU: N 1024, 4096
    .venv/bin/python -m pytest benchmarks/bench_similarity.py --benchmark-json out.json

On a GPU the sizes are N = 4096, 16384, 65536 (D = 128) in bfloat16 and float32.
"""

import time

import pytest
import torch
import triton
import torch.nn.functional as F

import anchor_kernels as ak
from anchor_kernels.similarity import DISPATCH

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = {"cpu": (1024, 4096), "cuda": (4096, 16384, 65536)}[DEVICE.type]
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)}[DEVICE.type]
D = 128
TEMPERATURE = 0.1
TARGET_S = 0.5  # timed seconds per benchmark
MIN_ROUNDS = 20 if DEVICE.type == "cuda" else 3  # a GPU figure takes 20 repetitions at least


def eager(a, b):
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / TEMPERATURE


_compiled = torch.compile(eager)
# cuda-general: the cuda backend with ANCHOR_KERNELS_CUDA_KERNELS=general (its general kernels
# where the CuTe tensor-core ones would run), to measure what those gain.
CANDIDATES = ["triton", "cuda", "cuda-general", "cpu", "eager", "compiled"]


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn):
    """Peak bytes allocated above the inputs during one call (CUDA only; None on CPU)."""
    if DEVICE.type != "cuda":
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_similarity(benchmark, candidate, n, dtype, pass_, monkeypatch):
    backend = candidate
    if candidate == "cuda-general":
        backend = "cuda"
        monkeypatch.setenv("ANCHOR_KERNELS_CUDA_KERNELS", "general")
    torch.manual_seed(0)
    a = torch.randn(n, D, device=DEVICE, dtype=dtype, requires_grad=pass_ != "fwd")
    b = torch.randn(n, D, device=DEVICE, dtype=dtype, requires_grad=pass_ != "fwd")
    if candidate in ("eager", "compiled"):
        fn = eager if candidate == "eager" else _compiled
    else:
        reasons = DISPATCH.get(backend).not_supported_reasons(a, b)
        if DEVICE.type == "cpu" and backend == "triton":
            reasons = ["the Triton interpreter is not timed"]
        if reasons:
            pytest.skip("; ".join(reasons))
        fn = lambda a, b: ak.pairwise_similarity(  # noqa: E731
            a, b, temperature=TEMPERATURE, backend=backend)
    grad = torch.randn(n, n, device=DEVICE, dtype=dtype) if pass_ != "fwd" else None

    def run():
        s = fn(a, b)
        if grad is not None:
            torch.autograd.grad(s, (a, b), grad)
        sync()

    try:
        run()  # compile / warm up
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of memory")
    start = time.perf_counter()
    run()
    estimate = time.perf_counter() - start
    peak = peak_memory(run)
    flops = (2 if pass_ == "fwd" else 6) * n * n * D
    benchmark.group = f"similarity {pass_} {str(dtype).replace('torch.', '')} N={n} D={D}"
    benchmark.extra_info.update(candidate=candidate, peak_mem_bytes=peak, flops=flops,
                                device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                                torch=torch.__version__, triton=triton.__version__)
    benchmark.pedantic(run, warmup_rounds=1, iterations=1,
                       rounds=max(MIN_ROUNDS, min(100, int(TARGET_S / max(estimate, 1e-6)))))
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
