"""Where the triton tests run: the CUDA GPU if there is one, else the CPU through triton's
interpreter (moe_lab switches it on at import); a test module that cannot run either way is skipped."""
import pytest
import torch

from moe_lab.backends.triton_fused import triton_status


def triton_device_or_skip() -> str:
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs, why = triton_status(device)
    if not runs:
        pytest.skip(f"triton cannot run on this {device}-only process: {why}", allow_module_level=True)
    return device
