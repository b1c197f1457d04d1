"""What the backends and the result rows ask about a device: its name (as result rows and calibration
entries record it, so the two agree) and, for CUDA, its compute capability."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from .compile_marks import assume_constant_result


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU: where every "device=None" in the package runs."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """bfloat16 on CUDA (what MoE models run in), float32 elsewhere (CPUs' bf16 matmuls are slow or emulated)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def device_name(device) -> str:
    """The GPU's name, the CPU model from /proc/cpuinfo (else platform's answer), or the device type."""
    return _device_name(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _device_name(device: str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "unknown cpu"
    return device.type


@assume_constant_result
def cuda_device_facts(index: int) -> tuple[int, int, int]:
    """(device count, major, minor) of CUDA device `index`; major = minor = -1 if there is none.
    A constant to torch.compile: dynamo cannot trace torch.cuda's queries, and a graph break on every
    forward cost compiled grouped_mm ~0.3 ms a call on an H100 (two graphs, guards and Python between).
    Cached because the answer never changes in a process and the backends ask on every call."""
    return _cuda_device_facts(index)


@functools.lru_cache(maxsize=None)
def _cuda_device_facts(index: int) -> tuple[int, int, int]:
    count = torch.cuda.device_count()
    if index >= count:
        return count, -1, -1
    return (count, *torch.cuda.get_device_capability(index))
