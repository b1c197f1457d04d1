"""FLOPs, minimum bytes, and the roofline: the fastest a layer could possibly run on this machine.

A call cannot finish before its arithmetic is done at the machine's matmul rate, nor before its
unavoidable bytes have moved at the machine's copy bandwidth. Both ceilings are measured here
(`measure_ceilings`), on the same machine, in the same dtype — never taken from a data sheet.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..devices import default_dtype
from .timing import resolve_device, time_fn


def _dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))


def dtype_name(dtype) -> str:
    return str(_dtype(dtype)).removeprefix("torch.")


def expert_flops(num_tokens: int, top_k: int, hidden: int, intermediate: int) -> int:
    """6*T*k*H*I: each of the T*k pairs runs gate, up ([H] -> [I] each) and down ([I] -> [H]),
    3*H*I multiply-adds, 2 flops per multiply-add. (The activation and weighting are O(T*k*I).)"""
    return 6 * num_tokens * top_k * hidden * intermediate


def training_flops(num_tokens: int, top_k: int, hidden: int, intermediate: int) -> int:
    """3 x the forward's: the backward runs each projection twice more, once for the input gradient
    and once for the weight gradient (the convention the published fwd+bwd TFLOP/s figures use)."""
    return 3 * expert_flops(num_tokens, top_k, hidden, intermediate)


def training_min_bytes(config, num_tokens: int, experts_hit: int, dtype=None) -> int:
    """3 x the forward's minimum bytes: the weights of the experts hit are read by the forward and by
    the input-gradient GEMMs, and their gradients written; the activations likewise three times.
    A floor for the roofline, not a prediction of what any backend moves."""
    return 3 * min_bytes(config, num_tokens, experts_hit, dtype)


def min_bytes(config, num_tokens: int, experts_hit: int, dtype=None) -> int:
    """experts_hit*3*H*I*itemsize + 2*T*H*itemsize: the weights of the experts that received
    tokens, each read once, plus the hidden states read and the output written once."""
    itemsize = _dtype(config.dtype if dtype is None else dtype).itemsize
    H, I = config.hidden_size, config.intermediate_size
    return experts_hit * 3 * H * I * itemsize + 2 * num_tokens * H * itemsize


@dataclass(frozen=True)
class Ceilings:
    """Measured limits of one device in one dtype."""

    copy_GBps: float  # device-memory copy bandwidth: 2 * bytes / time (each byte read once, written once)
    matmul_TFLOPs: float  # dense square matmul rate: 2 * n^3 / time
    device: str
    dtype: str


def roofline_ms(flops: float, num_bytes: float, ceilings: Ceilings) -> float:
    """max(flops / matmul rate, bytes / copy bandwidth), in milliseconds."""
    compute_s = flops / (ceilings.matmul_TFLOPs * 1e12)
    memory_s = num_bytes / (ceilings.copy_GBps * 1e9)
    return max(compute_s, memory_s) * 1e3


# Sizes: big enough to reach the device's steady state, small enough to be quick.
_DEFAULT_SIZE = {"cuda": 8192, "cpu": 512}  # matmul side n
_DEFAULT_COPY_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}


def measure_ceilings(device=None, dtype=None, size: int | None = None, *, copy_bytes: int | None = None,
                     max_seconds: float = 0.25) -> Ceilings:
    """Measure copy bandwidth (copy of a `copy_bytes` random uint8 buffer) and matmul rate (random
    `size` x `size` matrices in `dtype`, default bfloat16 on CUDA, float32 on CPU), medians of
    `time_fn`. Defaults take well under a second on CUDA and a few seconds at most on a laptop CPU."""
    device = resolve_device(device)
    dtype = _dtype(dtype if dtype is not None else default_dtype(device))
    n = size or _DEFAULT_SIZE.get(device.type, 512)
    nbytes = copy_bytes or _DEFAULT_COPY_BYTES.get(device.type, 64 * 2**20)
    generator = torch.Generator(device=device).manual_seed(0)

    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=generator)
    target = torch.empty_like(source)
    copy_ms = time_fn(lambda: target.copy_(source), device=device, max_seconds=max_seconds).median_ms
    del source, target

    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    mm_ms = time_fn(lambda: a @ b, device=device, max_seconds=max_seconds).median_ms
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(
        copy_GBps=2 * nbytes / (copy_ms / 1e3) / 1e9,
        matmul_TFLOPs=2 * n**3 / (mm_ms / 1e3) / 1e12,
        device=str(device),
        dtype=dtype_name(dtype),
    )


@functools.lru_cache(maxsize=None)
def cached_ceilings(device: str, dtype: str) -> Ceilings:
    """`measure_ceilings` once per (device, dtype) per process (what `measure` uses by default)."""
    return measure_ceilings(device, dtype)
