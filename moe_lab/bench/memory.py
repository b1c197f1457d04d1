"""Peak memory of one call: measured here, and predicted from the shapes (see `memory_model`).

What "peak" means, on both devices: the most bytes held at one moment by tensors that `fn`
allocated, counting from zero when `fn` starts (memory already allocated before — weights,
inputs — is the baseline and is not counted). Whatever `fn` returns is still alive when it ends,
so the output counts.

CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
`memory_allocated()` before the call. These are caching-allocator blocks (sizes rounded up to
512 bytes); memory the allocator has reserved but not handed out does not count, and neither do
buffers libraries allocate outside it.

CPU: torch's CPU allocator reports every allocation and free to the profiler when
`torch.profiler.profile(profile_memory=True)` is on. We replay those events in time order and
take the maximum of the running sum. This counts exactly the bytes requested by tensors created
during `fn` (not pages, not the process RSS). It does NOT see memory that oneDNN/MKL or the
Python interpreter allocate with their own malloc, and a free of a tensor that existed before
`fn` started is not reported (the profiler never saw its allocation), so it cannot lower the
peak the way it would on CUDA. Allocations made by other threads while `fn` runs are counted.
"""
from __future__ import annotations

import contextlib
import os

from dataclasses import dataclass

import torch

from .memory_model import predict_memory  # noqa: F401  (re-exported: bench.memory.predict_memory)
from .timing import resolve_device, synchronize

CUDA_METHOD = "cuda max_memory_allocated - memory_allocated before the call"
CPU_METHOD = "cpu profiler: peak of the running sum of torch CPU allocations made during the call"


@dataclass(frozen=True)
class MemoryMeasurement:
    peak_bytes: int  # most bytes alive at once among the tensors allocated during the call
    method: str  # how it was measured (CUDA_METHOD or CPU_METHOD)


def measure_peak_memory(fn, device=None, *, warmup: int = 1) -> MemoryMeasurement:
    """Run `fn()` once (after `warmup` unmeasured calls) and return its peak extra memory.

    The warm-up keeps one-off allocations out of the number (cuBLAS's workspace on the first
    matmul, lazily created buffers). Raises NotImplementedError for devices other than CPU/CUDA,
    and lets the call's own errors (e.g. torch.cuda.OutOfMemoryError) propagate.
    """
    device = resolve_device(device)
    for _ in range(max(0, warmup)):
        fn()
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type == "cpu":
        return _cpu_peak(fn)
    raise NotImplementedError(f"peak memory is measured on cpu and cuda, not {device.type}")


def _cuda_peak(fn, device: torch.device) -> MemoryMeasurement:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return MemoryMeasurement(int(peak), CUDA_METHOD)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto prints "USDT: ... profiler_start/stop" from C++ on every profile; keep it out of
    notebook cells and terminals by pointing file descriptor 2 at /dev/null meanwhile."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (some embedded interpreters): print rather than fail
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn) -> MemoryMeasurement:
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result  # freed after profiling stopped: it counts as alive at the end of the call
    events = _cpu_allocation_events(prof.profiler.kineto_results.experimental_event_tree())
    changes = sorted(events, key=lambda event: (event[0], -event[1]))  # ties: allocation first
    alive = peak = 0
    for _, size in changes:
        alive += size
        peak = max(peak, alive)
    return MemoryMeasurement(int(peak), CPU_METHOD)


def _cpu_allocation_events(roots):
    """(time_ns, +bytes allocated / -bytes freed) for every CPU allocator event in the tree."""
    from torch._C._profiler import _EventType

    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                yield node.start_time_ns, int(fields.alloc_size)
        stack.extend(node.children)


def available_bytes(device=None) -> int | None:
    """Bytes that could still be allocated on `device`, or None when unknown.

    CUDA: free device memory (`torch.cuda.mem_get_info`) plus what torch's caching allocator holds
    but has not handed out. CPU: MemAvailable from /proc/meminfo (Linux only).
    """
    device = resolve_device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
