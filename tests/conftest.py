import moe_lab  # noqa: F401  first: on a CPU-only machine it switches triton to its interpreter
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Tiny tensors: one thread is faster than two contending ones, and timings are steadier.
    torch.set_num_threads(1)
