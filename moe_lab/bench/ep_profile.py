"""One expert-parallel forward under torch.profiler, summarised as text: where its GPU time goes, and where
the GPU sits idle (`moe-lab bench --ep --ep-profile PATH` under torchrun; tools/ep_record.sh runs it).

Per layer variant (exact, dedup, dedup in 2 overlapped chunks, gathered, gathered in 2 chunks) and per rank, after warm-up calls, one
forward started together on every rank is profiled. From the profiler's trace:

    GPU window    first kernel start to last kernel end (kernels, memcpys and memsets, every stream)
    busy / idle   the union of those intervals, and the rest of the window: time no kernel ran
    top kernels   by total GPU time (name, calls, total, share of busy)
    idle gaps     the longest, with the kernel before and the one after (a host sync shows up as a gap
                  that ends with the first kernel launched after the sync)
    host calls    CUDA runtime calls by total host time (cudaStreamSynchronize, cudaMemcpyAsync: the host waiting)

On a CPU (gloo, the tiny test run) there are no kernels: the top operators by self CPU time instead.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import torch
import torch.distributed as dist

from ..parallel.dedup import DedupExpertParallelExperts
from ..parallel.gathered import GatheredExpertParallelExperts
from ..parallel.layer import ExpertParallelExperts
from ..parallel.pipelined import pipelined_dedup_forward, pipelined_gathered_forward
from .expert_parallel import _inputs, _start_together, seeded

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def profile_ep_step(name, config, tokens: int, distribution: str, settings, device, warmup: int = 3,
                    top: int = 15) -> str:
    """Every rank profiles one forward of each variant; rank 0 returns all ranks' text (the others '')."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = settings.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = config.replace(dtype=dtype)
    with seeded(device, settings.seed + rank):
        exact = ExpertParallelExperts(config, experts_implementation=settings.backend, device=device)
    dedup = DedupExpertParallelExperts(config, exact.group, local=exact.local)
    gathered = GatheredExpertParallelExperts(config, exact.group, tokens_per_rank=tokens, local=exact.local)
    x, index, weights = _inputs(config, tokens, distribution, settings, device, rank)
    parts = [f"=== rank {rank} of {world}: {name}, T={tokens} per rank, {distribution}, {config.dtype}, "
             f"{settings.backend}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"]
    with torch.no_grad():
        variants = (("exact", lambda: exact(x, index, weights)), ("dedup", lambda: dedup(x, index, weights)),
                    ("dedup_pipelined_2", lambda: pipelined_dedup_forward(dedup, x, index, weights, chunks=2)),
                    ("gathered", lambda: gathered(x, index, weights)),
                    ("gathered_pipelined_2", lambda: pipelined_gathered_forward(gathered, x, index, weights, chunks=2)))
        for variant, call in variants:
            for _ in range(warmup):
                _start_together(device)
                call()
            _start_together(device)
            with torch.profiler.profile(activities=_activities(device)) as profiler:
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            parts.append(f"--- {variant}")
            parts.append(summarize_trace(_trace_events(profiler), top) if device.type == "cuda"
                         else profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    every = [None] * world
    dist.all_gather_object(every, "\n".join(parts))
    return "\n\n".join(every) if rank == 0 else ""


def _activities(device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def _trace_events(profiler) -> list[dict]:
    """The profiler's chrome-trace events (a stable format across torch versions)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as file:
            trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarize_trace(events: list[dict], top: int = 15) -> str:
    """Text: GPU window, busy and idle time, top kernels, longest idle gaps, host runtime calls. Times in µs."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        return "no GPU activity in the trace"
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy, gaps, covered_until, last = 0.0, [], start, gpu[0]
    for event in gpu:  # the union of intervals over all streams; a gap is time no stream ran anything
        begin, finish = event["ts"], event["ts"] + event["dur"]
        if begin > covered_until:
            gaps.append((begin - covered_until, last["name"], event["name"]))
        if finish > covered_until:
            busy += finish - max(begin, covered_until)
            covered_until, last = finish, event
    window = end - start
    lines = [f"GPU window {window:.0f} us: busy {busy:.0f} us, idle {window - busy:.0f} us "
             f"({(window - busy) / window:.0%}) in {len(gaps)} gaps"]
    lines.append(f"top {top} GPU activities by total time (name, calls, total us, share of busy):")
    totals, calls = defaultdict(float), defaultdict(int)
    for event in gpu:
        totals[event["name"]] += event["dur"]
        calls[event["name"]] += 1
    for kernel, total in sorted(totals.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {total:9.1f}  {calls[kernel]:4d}x  {total / busy:5.1%}  {_short(kernel)}")
    lines.append("longest idle gaps (us, after -> before):")
    for length, before, after in sorted(gaps, reverse=True)[:top // 2]:
        lines.append(f"  {length:9.1f}  {_short(before, 60)}  ->  {_short(after, 60)}")
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    host, host_calls = defaultdict(float), defaultdict(int)
    for event in runtime:
        host[event["name"]] += event["dur"]
        host_calls[event["name"]] += 1
    lines.append("host CUDA runtime calls by total time (us, calls):")
    for call, total in sorted(host.items(), key=lambda item: -item[1])[:8]:
        lines.append(f"  {total:9.1f}  {host_calls[call]:4d}x  {call}")
    return "\n".join(lines)


def _short(name: str, width: int = 110) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."
