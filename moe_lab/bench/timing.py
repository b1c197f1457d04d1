"""Wall time of one call, measured the way the device sees it.

CUDA work is asynchronous: `fn()` returns as soon as its kernels are queued. So on CUDA each
repetition is bracketed by a pair of `torch.cuda.Event`s recorded on the current stream and
followed by a synchronize; the time is `start.elapsed_time(end)`, i.e. from the moment the
(idle) stream reached the start event to the moment it finished the last kernel of `fn`.
Because the stream is idle at the start, host-side launch overhead that the GPU has to wait
for (Python loops, host syncs such as eager's `.tolist()`) is included — that is the latency of
one layer call. On CPU, `time.perf_counter()` around the call.

Warm-up calls run first (untimed) so that one-off costs — lazy CUDA/cuBLAS init, allocator
growth, autotuning — do not land in the numbers. Caches stay warm between repetitions (weights
of a small layer may sit in L2): a hot-loop measurement, as every benchmark of this kind is.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..devices import default_device


@dataclass(frozen=True)
class Timing:
    """Per-call times of `reps` timed repetitions, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    reps: int
    times_ms: list = field(repr=False)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: 0.05 means the middle 80% of repetitions lie within +-2.5%."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else float("nan")


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def resolve_device(device) -> torch.device:
    """None -> CUDA when available, else CPU; strings and torch.device pass through."""
    if device is None:
        return default_device()
    return torch.device(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_call_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_fn(fn, *, device=None, warmup: int = 2, min_reps: int = 5, max_reps: int = 200,
            max_seconds: float = 0.5) -> Timing:
    """Time `fn()` (no arguments; its result is discarded).

    `warmup` untimed calls, then timed repetitions until `max_reps` are done, or until
    `max_seconds` of wall time have passed since the first timed call and at least `min_reps`
    are done (so a slow `fn` runs `min_reps` times however long that takes; `min_reps` is capped
    at `max_reps`). Returns the median, the 10th/90th percentiles and the minimum.
    """
    if max_reps < 1:
        raise ValueError(f"max_reps must be >= 1, got {max_reps}")
    device = resolve_device(device)
    min_reps = max(1, min(min_reps, max_reps))
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)

    times: list[float] = []
    began = time.perf_counter()
    while len(times) < max_reps:
        if len(times) >= min_reps and time.perf_counter() - began >= max_seconds:
            break
        times.append(_one_call_ms(fn, device))
    return Timing(
        median_ms=percentile(times, 50), p10_ms=percentile(times, 10), p90_ms=percentile(times, 90),
        min_ms=min(times), reps=len(times), times_ms=times,
    )


def median_ms(fn, reps: int, *, device=None, warmup: int = 0) -> float:
    """The median of exactly `reps` timed calls of `fn` (after `warmup` untimed ones), however long they take:
    the A/B tools compare variants at the same repetition count rather than within a time budget."""
    return time_fn(fn, device=device, warmup=warmup, min_reps=reps, max_reps=reps, max_seconds=float("inf")).median_ms


def back_to_back_ms(fn, reps: int, *, device=None, rest_s: float = 0.0, warmup: int = 0) -> Timing:
    """The GPU time of each of `reps` calls of `fn` queued one after another (CUDA events around each, one
    synchronize at the end): the regime of a training loop, where the card never idles between steps and stays
    at its power limit if the work reaches it (an H200 lowers its SM clock there: docs/performance_notes.md).
    `time_fn` instead synchronizes after every call, so the card idles briefly between them. With rest_s > 0 the
    host sleeps that long (the card idle) before each call: the same work on a rested card. CUDA only; `fn`
    should not wait for the GPU itself (e.g. a CUDA-graph replay), or the calls are not back to back. `warmup`
    untimed calls are queued just before the timed ones, with no synchronize between: the card enters the timed
    calls already in the state the loop drives it to."""
    device = resolve_device(device)
    if device.type != "cuda":
        raise ValueError(f"back_to_back_ms times queued GPU work with CUDA events; the device is {device.type}")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    stream = torch.cuda.current_stream(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    synchronize(device)
    for _ in range(max(0, warmup)):
        fn()
    for start, end in events:
        if rest_s > 0:
            synchronize(device)
            time.sleep(rest_s)
        start.record(stream)
        fn()
        end.record(stream)
    synchronize(device)
    times = [start.elapsed_time(end) for start, end in events]
    return Timing(median_ms=percentile(times, 50), p10_ms=percentile(times, 10), p90_ms=percentile(times, 90),
                  min_ms=min(times), reps=reps, times_ms=times)


#: A cap on the queued calls of `time_back_to_back` (a pair of CUDA events each): calls shorter than the host's
#: enqueue are not back to back on the GPU anyway.
BACK_TO_BACK_MAX_CALLS = 5000
#: A cap on its untimed warm-up queue: enough for `max_seconds` of calls down to a few µs each.
BACK_TO_BACK_MAX_WARMUP = 200_000


def time_back_to_back(fn, *, device=None, max_seconds: float = 0.5, min_reps: int = 5) -> Timing:
    """`back_to_back_ms` sized by time: about `max_seconds` of untimed calls queued first (a training loop's
    steady state: at the power limit, if the work reaches it, which takes an H200 a few hundred ms), then about
    `max_seconds` of timed calls, at least `min_reps`. One synchronized call first estimates a call's time."""
    device = resolve_device(device)
    if device.type != "cuda":
        raise ValueError(f"back-to-back timing queues GPU work behind CUDA events; the device is {device.type}")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    fn()
    one_ms = max(_one_call_ms(fn, device), 1e-3)
    calls = max(1, math.ceil(max_seconds * 1e3 / one_ms))
    # The warm-up queue needs no events, so only the timed calls are capped.
    return back_to_back_ms(fn, max(min(calls, BACK_TO_BACK_MAX_CALLS), min_reps), device=device,
                           warmup=min(calls, BACK_TO_BACK_MAX_WARMUP))
