"""Test setup: runs before any test module imports triton or fastdistill."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTDISTILL_POISON"] = "1"  # kernel outputs start as NaN: unwritten elements fail

HAS_CUDA = torch.cuda.is_available()
# Backends checked against the reference here: the C++ CPU kernel always, triton (interpreted
# on CPU without a GPU), and the CUDA kernel when a GPU is present.
KERNEL_BACKENDS = ["cpu", "triton"] + (["cuda"] if HAS_CUDA else [])


def backend_device(backend: str) -> str:
    return "cuda" if backend in ("cuda",) or (backend == "triton" and HAS_CUDA) else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test (FASTDISTILL_TEST_SEED pins it); printed on failure via the test id report."""
    value = int(os.environ.get("FASTDISTILL_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
