"""Where a compiled decode step's GPU time goes, kernel by kernel, for each experts backend of a full-size model.

The end-to-end table's "experts share by removal" compares a step with and without the experts call; under
torch.compile that also removes whatever only the experts used (the router's top-k and its normalisation are
dead code then), and it says nothing of what the rest of the step is made of. Here the decode steps of
`generate` (static cache, compiled with CUDA graphs) run under torch.profiler, which traces the kernels a
CUDA graph replays one by one, and the kernels are summed per step by name.

    python tools/profile_decode_step.py --model qwen3-30b-a3b --backends moe_lab_triton,batched_mm --output $OUT/x.txt

Per backend: the step's wall time (CUDA events, as the e2e table), GPU busy time, kernels per step, and the
top kernels by time per step. Random weights built on the GPU from moe_lab/hf/configs, as `moe-lab e2e` does.
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys

import torch

import moe_lab  # noqa: F401  (first: the triton setup)
from moe_lab.bench.e2e import implementation_of
from moe_lab.bench.e2e_generate import random_prompt, timed_generate
from moe_lab.bench.e2e_profile import no_experts_registered
from moe_lab.bench.e2e_run import build_for_e2e
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.hf import register_with_transformers


def short(name: str, width: int = 90) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def profile_backend(model, backend, batch, prompt, new_tokens, execution, out, device):
    input_ids = random_prompt(model, batch, prompt, device)
    model.set_experts_implementation(implementation_of(backend))
    for _ in range(2):  # compile and capture, then once more warm
        timed_generate(model, input_ids, new_tokens, execution)
    compiled = {"graph breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
                "unique graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    _, timing = timed_generate(model, input_ids, new_tokens, execution)
    step_ms = statistics.median(timing.step_ms[1:])
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        _, profiled = timed_generate(model, input_ids, new_tokens, execution)
    if device.type == "cuda":
        torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind and (device.type == "cuda" or e.name.startswith("aten::"))]
    by_name = summed_by_name(events, lambda e: e.device_time if device.type == "cuda" else e.self_cpu_time_total)
    steps = new_tokens  # the prefill's kernels are in the trace too; they are a handful of big ones, named
    total = sum(t for t, _ in by_name.values())
    print(f"=== {backend} ({execution}, batch {batch}, {new_tokens} new tokens): step {step_ms:.3f} ms median "
          f"(profiled run {statistics.median(profiled.step_ms[1:]):.3f} ms); all kernels of the generate "
          f"{total / 1e3:.2f} ms, {sum(c for _, c in by_name.values())} launches", file=out)
    print(f"{'us/step':>9} {'calls/step':>10}  kernel (summed over the whole generate, divided by {steps} steps)",
          file=out)
    for name, (t, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{t / steps:9.1f} {count / steps:10.1f}  {short(name)}", file=out)
    print_host_side(prof, compiled, steps, out)
    out.flush()


def summed_by_name(events, time_of) -> dict:
    """{event name: [summed time_of(event) in µs, count]}."""
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        by_name[e.name][0] += time_of(e)
        by_name[e.name][1] += 1
    return by_name


def print_host_side(prof, compiled, steps, out, top=15):
    """What the host does per step: inside a replayed CUDA graph it launches nothing kernel by kernel, so kernel
    launches from the host (cudaLaunchKernel, cuLaunchKernel: triton's launcher) and the host's own busiest events
    say where a compiled step leaves the graph; dynamo's counters say whether it broke the model into pieces."""
    host = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    by_name = summed_by_name(host, lambda e: e.self_cpu_time_total)
    runtime_calls = ("cudaGraphLaunch", "cudaLaunch", "cuLaunch", "cudaMemcpy", "cudaStreamSynchronize")
    launches = {name: count / steps for name, (_, count) in sorted(by_name.items()) if name.startswith(runtime_calls)}
    print(f"  host, per step: {compiled['graph breaks']} graph breaks and {compiled['unique graphs']} graphs compiled "
          "(dynamo's counters for this backend's generate calls); runtime calls "
          + (", ".join(f"{name} {count:.1f}" for name, count in launches.items()) or "none traced"), file=out)
    print(f"{'us/step':>9} {'calls/step':>10}  host event (self CPU time, summed over the whole generate)", file=out)
    for name, (t, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{t / steps:9.1f} {count / steps:10.1f}  {short(name)}", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--backends", default="moe_lab_triton,batched_mm,no_experts")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--execution", default="compile:reduce-overhead")
    parser.add_argument("--output", default="-")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the tool (tiny:<family> models, eager)")
    args = parser.parse_args(argv)
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    register_with_transformers()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    built = build_for_e2e(args.model, device=device, dtype=dtype)
    meta = provenance(device)
    print(f"{args.model}: {built.layers} of {built.full_layers} layers; {meta.get('device_name')}, torch "
          f"{meta.get('torch_version')}, commit {meta.get('git_commit')}; {command_line()}", file=out)
    for backend in args.backends.split(","):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        try:
            with no_experts_registered():  # "no_experts": the step without the experts call, as the e2e table's
                profile_backend(built.model, backend, args.batch, args.prompt, args.new_tokens, args.execution, out,
                                device)
        except Exception as error:  # one backend's failure must not lose the others'
            print(f"=== {backend}: {type(error).__name__}: {str(error)[:300]}", file=out)


if __name__ == "__main__":
    main()
