"""The top-k sum kernel against an older copy of it, same inputs, one process. GPU (or the interpreter).

`sum_top_k_kernel` now reads each slot's expert id and skips ids outside [0, E) (expert parallelism's absent
experts). The copy of triton_kernels.py given by --old-kernels (e.g. `git show 9526b0b:moe_lab/backends/
triton_kernels.py`) has the kernel that summed every slot unless told otherwise; both run on the same rows
with every id in range, where they must give the same sums, timed in interleaved rounds with CUDA events.

    git show 9526b0b:moe_lab/backends/triton_kernels.py > /tmp/old_kernels.py
    python tools/sum_top_k_ab.py --old-kernels /tmp/old_kernels.py --output OUT.json
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import sys

import torch

import moe_lab  # noqa: F401  (first: the triton setup)
from moe_lab.backends.triton_launch import kernels, next_power_of_two
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.bench.timing import time_fn
from moe_lab.presets import get_preset


def load_old_kernels(path: str):
    spec = importlib.util.spec_from_file_location("old_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launcher(kernel, y, expert_of_pair, out, num_experts, top_k):
    """A no-argument call of `kernel` as the package launches it (the old one with its skip switched off)."""
    num_tokens, hidden = out.shape
    block_n = min(2048, next_power_of_two(hidden))
    extra = {"SKIP_ABSENT": False} if "SKIP_ABSENT" in inspect.signature(kernel.fn).parameters else {}

    def call():
        kernel[(num_tokens, -(-hidden // block_n))](y, out, expert_of_pair, num_experts, hidden, y.stride(0),
                                                     out.stride(0), TOP_K=top_k, BLOCK_N=block_n, num_warps=8,
                                                     **extra)
    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-kernels", required=True, help="an older moe_lab/backends/triton_kernels.py")
    parser.add_argument("--preset", action="append", help="repeatable (default: the three fine-grained ones)")
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    old = load_old_kernels(args.old_kernels)
    results = dict(provenance=dict(provenance(device), command_line=command_line(), old_kernels=args.old_kernels),
                   points=[])
    for preset in args.preset or ["qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"]:
        config = get_preset(preset).config
        for tokens in (int(t) for t in args.tokens.split(",")):
            generator = torch.Generator(device).manual_seed(0)
            y = torch.randn(tokens * config.top_k, config.hidden_size, device=device, dtype=torch.bfloat16,
                            generator=generator)  # [S, H] in (token, slot) order
            expert_of_pair = torch.randint(0, config.num_experts, (tokens * config.top_k,), device=device,
                                           generator=generator)  # every id in range: both sum every slot
            outs = {name: y.new_empty(tokens, config.hidden_size) for name in ("old", "new")}
            calls = {name: launcher(module.sum_top_k_kernel, y, expert_of_pair, outs[name], config.num_experts,
                                    config.top_k) for name, module in (("old", old), ("new", kernels()))}
            for call in calls.values():
                call()
            same = bool(torch.equal(outs["old"], outs["new"]))
            rounds = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    rounds[name].append(time_fn(call, device=device, max_reps=200, max_seconds=0.2).median_ms)
            bytes_moved = (y.numel() + outs["new"].numel()) * y.element_size() + expert_of_pair.numel() * 8
            point = dict(preset=preset, tokens=tokens, top_k=config.top_k, hidden=config.hidden_size,
                         identical_sums=same, rounds_ms=rounds,
                         median_ms={name: statistics.median(ms) for name, ms in rounds.items()})
            point["new_over_old"] = point["median_ms"]["new"] / point["median_ms"]["old"]
            point["new_GBps"] = bytes_moved / point["median_ms"]["new"] / 1e6
            results["points"].append(point)
            print(json.dumps({k: point[k] for k in ("preset", "tokens", "identical_sums", "median_ms",
                                                    "new_over_old", "new_GBps")}), flush=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
