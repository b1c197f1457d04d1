import os

import moe_lab  # noqa: F401  first: on a CPU-only machine it switches triton to its interpreter
import pytest
import torch


#: The longest files (CI's --durations, 2 cores), started first, longest first: `make test` hands whole files to the
#: pytest-xdist workers in collection order (--dist loadfile --no-loadscope-reorder), and a 3-minute file started
#: late leaves one worker running it alone at the end. A file missing here only runs in its alphabetical turn.
LONGEST_FIRST = ("tests/test_browser.py", "tests/test_notebooks.py", "tests/test_fresh_machine.py",
                 "tests/test_triton_backward.py", "tests/test_triton.py", "tests/test_triton_tools.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every uninitialised float buffer the launchers allocate starts as NaN, so a kernel reading a row
    nobody wrote shows up as a NaN instead of whatever the allocator happened to hand over."""
    def poison(make):
        def made(*args, **kwargs):
            tensor = make(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor
        return made

    monkeypatch.setattr(torch.Tensor, "new_empty", poison(torch.Tensor.new_empty))
    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Tiny tensors: one thread is faster than two contending ones, and timings are steadier.
    torch.set_num_threads(1)
    # The processes the tests start (notebook kernels: nbval's, papermill's, JupyterLab's in the browser tests; the
    # CLI) take every core by default. Beside the other pytest-xdist workers that oversubscribes the machine, and
    # OpenMP's waiting threads then slow a notebook by a quarter on 2 cores. Each worker's processes get its share;
    # an OMP_NUM_THREADS set by the caller wins.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))
