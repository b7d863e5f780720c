import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before
# triton.jit decorates them, so before anchor_kernels is imported.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="tier 2: needs a CUDA GPU, none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def matmul_precision():
    """Sets torch.set_float32_matmul_precision for one test, and restores it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)
