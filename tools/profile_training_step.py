"""Where one layer's training step (forward + backward) spends its time: GPU kernels, launch gaps, host.

`moe-lab bench --backward` times each step launched from Python and synchronised, so everything the
host does before the GPU has work queued is in its number. This tool splits that number, per
implementation, in one process on one card:

    synced     the bench's own measure: CUDA events around one step, then a synchronize (median)
    pipelined  20 steps launched back to back, one pair of events around them all: the host's time is
               hidden wherever the GPU is behind it, as in a training loop of many layers
    host       the Python time to enqueue one step while the GPU is kept busy (a sleep kernel first)
    graph      the same step captured in a CUDA graph and replayed: the kernels alone, without gaps
    kernels    torch.profiler over synced steps: each kernel's GPU time per step, and their sum
    lead, gaps where the GPU waited for the host in those steps: from the step's start to its first
               kernel, and the idle gaps between its kernels (the largest named by the kernel after them)

and for moe_lab's triton backend the host's top functions under cProfile (with --cprofile).
"triton:before" is the triton backend without this session's host-time levers, in the same process (for an
A/B): torch's sort and histogram instead of the block counting sort, and its autograd through the custom
op's dispatcher instead of a plain autograd.Function.

    python tools/profile_training_step.py --preset qwen3-30b-a3b --tokens 8192 \
        --backends triton,grouped_mm,transformers:grouped_mm --output $OUT/training_profile.txt
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import dataclasses
import io
import json
import pstats
import re
import statistics
import sys
import time

import torch

import moe_lab  # noqa: F401  (first: the triton setup)
from moe_lab.bench import implementations
from moe_lab.bench.inputs import build_experts, random_hidden_states, random_routing
from moe_lab.bench.measure import training_step
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.bench.roofline import training_flops
from moe_lab.bench.timing import median_ms
from moe_lab.cuda_graph import CapturedStep
from moe_lab.presets import get_preset


@contextlib.contextmanager
def without_host_levers():
    """The triton backend with torch's sort and the custom ops' dispatcher (what the levers replaced)."""
    from moe_lab.backends import triton_autograd, triton_plan

    real_call, real_plan = triton_autograd._call_differentiable, triton_plan._plan_cached

    def plan_with_torch_sort(*key):
        plan = real_plan(*key)
        return dataclasses.replace(plan, sort="torch") if plan.sort == "blocks" else plan

    triton_autograd._call_differentiable = lambda op, *args: op(*args)
    triton_plan._plan_cached = plan_with_torch_sort
    try:
        yield
    finally:
        triton_autograd._call_differentiable, triton_plan._plan_cached = real_call, real_plan


def synced_ms(call, reps):
    """The bench's own measure: CUDA events around each call, then a synchronize; the median."""
    return median_ms(call, reps, device=torch.device("cuda"))


def pipelined_ms(call, steps, rounds):
    per_step = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            call()
        end.record()
        end.synchronize()
        per_step.append(start.elapsed_time(end) / steps)
    return statistics.median(per_step)


def host_ms(call, reps):
    """Python time to enqueue one step behind a sleeping GPU (nothing the host launches can start yet)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles: the queue stays ahead of the host
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def graph_ms(call, reps):
    return synced_ms(CapturedStep(call).replay, reps)


def kernel_table(call, steps):
    """Each kernel's GPU time per step, the launches per step, and where the GPU waited for the host:
    per synced step, `lead` (the step's start on the host to its first kernel) and each idle gap
    between two kernels, named by the kernel after it (medians over the steps, in ms)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("profiled_step"):
                call()
            torch.cuda.synchronize()
    per_kernel = collections.defaultdict(float)
    counts = collections.Counter()
    kernels, step_starts = [], []
    for event in prof.events():
        if event.name == "profiled_step":  # the step's own range (kineto also draws it on the GPU's timeline)
            if event.device_type == torch.autograd.DeviceType.CPU:
                step_starts.append(event.time_range.start)
        elif event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            name = re.sub(r"\s+", " ", event.name)[:100]
            per_kernel[name] += event.device_time / steps / 1e3  # ms per step
            counts[name] += 1
            kernels.append((event.time_range.start, event.time_range.end, name))
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    return rows, {name: counts[name] / steps for name, _ in rows}, idle_gaps(sorted(kernels), sorted(step_starts))


def idle_gaps(kernels, step_starts) -> dict:
    """kernels [(start_us, end_us, name)] and each step's host start (us, the profiler's one clock) ->
    {lead_ms, gaps_ms (sum of the idle gaps between a step's kernels), gaps: [(position: name, ms)]}."""
    leads, sums, per_position = [], [], collections.defaultdict(list)
    for index, begin in enumerate(step_starts):
        end = step_starts[index + 1] if index + 1 < len(step_starts) else float("inf")
        step = [k for k in kernels if begin <= k[0] < end]
        if not step:
            continue
        leads.append((step[0][0] - begin) / 1e3)
        total, busy_until = 0.0, step[0][1]
        for position, current in enumerate(step[1:], start=1):
            gap = max(0.0, current[0] - busy_until) / 1e3  # idle since every kernel before it ended
            per_position[(position, current[2])].append(gap)
            total += gap
            busy_until = max(busy_until, current[1])
        sums.append(total)
    if not leads:
        return {}
    gaps = sorted(((f"{position:2d}: {name}", statistics.median(values))
                   for (position, name), values in per_position.items()), key=lambda kv: -kv[1])
    return dict(lead_ms=statistics.median(leads), gaps_ms=statistics.median(sums), gaps=gaps[:8])


def host_profile(call, steps):
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    return text.getvalue()


def measure(call, flops, cprofile=False) -> dict:
    for _ in range(3):
        call()
    # synced, pipelined, synced again: drift lands on both
    record = dict(synced_ms=synced_ms(call, 15), pipelined_ms=pipelined_ms(call, 20, 3),
                  synced_again_ms=synced_ms(call, 15), host_ms=host_ms(call, 7))
    kernels, launches, idle = kernel_table(call, 5)
    record.update(kernel_sum_ms=sum(ms for _, ms in kernels), launches_per_step=sum(launches.values()),
                  kernels=[(kernel, ms, launches[kernel]) for kernel, ms in kernels],
                  lead_ms=idle.get("lead_ms"), idle_gaps_ms=idle.get("gaps_ms"), largest_gaps=idle.get("gaps", []))
    if cprofile:
        record["host_profile"] = host_profile(call, 20)
    try:  # last: a failed capture can leave the stream unusable for what follows
        record["graph_ms"] = graph_ms(call, 15)
    except Exception as error:  # noqa: BLE001  a backend that cannot be captured: say why
        record["graph_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        torch.cuda.synchronize()
    for key in ("synced_ms", "pipelined_ms", "graph_ms"):
        if key in record:
            record[key.replace("_ms", "_tflops")] = flops / (record[key] / 1e3) / 1e12
    return record


def report(record) -> list[str]:
    lines = [f"\n## {record['preset']} T={record['tokens']} {record['backend']}",
             "  " + "  ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                              for key, value in record.items()
                              if key not in ("kernels", "preset", "tokens", "backend", "host_profile",
                                             "largest_gaps"))]
    lines += [f"  {ms:8.4f} ms  x{count:4.1f}  {kernel}" for kernel, ms, count in record["kernels"][:25]]
    lines += ["  GPU idle before (largest gaps between kernels, median per step):"]
    lines += [f"  {ms:8.4f} ms  {where}" for where, ms in record["largest_gaps"]]
    return lines + [record.get("host_profile", "")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", required=True)
    parser.add_argument("--tokens", default="8192")
    parser.add_argument("--backends", default="triton,grouped_mm,transformers:grouped_mm")
    parser.add_argument("--cprofile", action="store_true", help="cProfile the triton step's host path")
    parser.add_argument("--output", required=True, help="a .txt report; a .json beside it with the numbers")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = torch.bfloat16
    lines = [f"# {command_line()}", f"# {json.dumps(provenance(device))}"]
    records = []
    for preset in args.preset:
        config = get_preset(preset).config.replace(dtype=dtype)
        for T in (int(t) for t in args.tokens.split(",")):
            top_k_index, top_k_weights, _ = random_routing(T, config, device)
            hidden_states = random_hidden_states(T, config, device)
            experts = build_experts(config, device)
            flops = training_flops(T, config.top_k, config.hidden_size, config.intermediate_size)
            for name in args.backends.split(","):
                with without_host_levers() if name == "triton:before" else contextlib.nullcontext():
                    experts.set_experts_implementation(implementations.implementation(name.removesuffix(":before")))
                    call, _ = training_step(experts, hidden_states, top_k_index, top_k_weights, seed=0)
                    record = dict(preset=preset, tokens=T, backend=name,
                                  **measure(call, flops, cprofile=args.cprofile and name == "triton"))
                records.append(record)
                lines += report(record)
                print("\n".join(report(record)), flush=True)
            del experts
            torch.cuda.empty_cache()
    with open(args.output, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(re.sub(r"\.txt$", "", args.output) + ".json", "w") as handle:
        json.dump(dict(provenance=provenance(device), command=command_line(), records=records), handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
