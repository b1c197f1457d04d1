"""The name of a device, as result rows and calibration entries record it (so the two agree)."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


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
