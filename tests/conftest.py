"""Shared test settings: GPU tests (marker `gpu`) skip cleanly without CUDA; seeds are fixed."""

import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through triton's interpreter; triton reads this
# when it is imported, so it is set here, before any test module can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on shared cores: one intra-op thread avoids OpenMP oversubscription (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tol(dtype):
    """(rtol, atol) used to compare a kernel with its reference in ``dtype``."""
    return {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]
