"""The triton backend's sorts of (token, expert) pairs by expert, against each other and against what they
replace: `sort_pairs(..., method=...)` for each of SORT_METHODS ("one_program": one program's bitonic sort,
up to a few thousand pairs; "blocks": the counting sort over blocks of pairs, two launches; "torch":
torch.sort of int32 keys + a histogram), on random routing, at pair counts on both sides of
ONE_PROGRAM_SORT_MAX_PAIRS. Per method: GPU time per call from CUDA-graph replays
(triton.testing.do_bench_cudagraph, median), and the host's time to launch one call while the GPU is kept
busy (what a call launched from Python costs before its kernels can start).
    python tools/sort_pairs_ab.py [OUTPUT.json]   (default data/h100_sort_pairs.json)
    python tools/sort_pairs_ab.py --layers OUTPUT.json   the whole triton forward (no gradient) of real
        presets with each sort that fits, launched (CUDA events around one synchronised call) and replayed
        from a CUDA graph, medians of interleaved rounds: what the sort changes in a layer's time
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import time

import torch

import moe_lab  # first: without a GPU it switches triton to its interpreter before triton is imported
import triton
import triton.testing
from moe_lab.backends.triton_launch import sort_pairs
from moe_lab.backends.triton_plan import BLOCK_SORT_PAIRS, ONE_PROGRAM_SORT_MAX_PAIRS, SORT_METHODS, fits_one_program_sort
from moe_lab.bench.provenance import command_line, provenance

PAIR_COUNTS = (128, 512, 1024, 2048, 4096, 16384, 65536, 262144)


def sort_with(method):
    return lambda index, num_experts: sort_pairs(index, num_experts, method=method)


def methods_for(num_pairs, num_experts):
    """Every method that can sort this many pairs (the one-program sort stops at 4096: its bitonic stages)."""
    return [m for m in SORT_METHODS
            if m != "one_program" or (num_pairs <= 4096 and fits_one_program_sort(num_pairs, num_experts))]


def host_us(fn, reps=20):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # the GPU stays busy: only the host's launching is timed
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


LAYER_POINTS = [(preset, T) for preset in ("qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "mixtral-8x7b")
                for T in (256, 1024, 8192)]


def layers(output: str, rounds: int = 3) -> None:
    """The triton forward with each sort, interleaved round by round, in one process."""
    import dataclasses

    from moe_lab.backends.triton_fused import launch_plan, triton_experts_forward
    from moe_lab.bench.inputs import build_experts, random_hidden_states, random_routing
    from moe_lab.bench.timing import time_fn

    rows = []
    for preset, T in LAYER_POINTS:
        config, cuda = moe_lab.get_preset(preset).config.replace(dtype=torch.bfloat16), torch.device("cuda")
        layer, x = build_experts(config, cuda), random_hidden_states(T, config, cuda)
        index, weights, _ = random_routing(T, config, cuda)
        plan = launch_plan(T, config.top_k, config.num_experts, config.hidden_size, config.intermediate_size,
                           torch.bfloat16, interpreted=False)
        row = dict(preset=preset, num_tokens=T, num_pairs=T * config.top_k, plan_sort=plan.sort)
        with torch.no_grad():
            calls = {method: functools.partial(triton_experts_forward, layer, x, index, weights,
                                               plan=dataclasses.replace(plan, sort=method))
                     for method in methods_for(T * config.top_k, config.num_experts)}
            launched, replayed = {m: [] for m in calls}, {m: [] for m in calls}
            for _ in range(rounds):
                for method, call in calls.items():
                    launched[method].append(time_fn(call, device="cuda", max_seconds=0.2).median_ms)
                    replayed[method].append(triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median"))
        for method in calls:
            row[f"{method}_launched_ms"] = statistics.median(launched[method])
            row[f"{method}_graph_ms"] = statistics.median(replayed[method])
        rows.append(row)
        print(row, flush=True)
    _write(output, rows)


def _write(output, rows):
    info = {**provenance("cuda"), "triton_version": triton.__version__, "command_line": command_line(),
            "one_program_max_pairs_in_code": ONE_PROGRAM_SORT_MAX_PAIRS, "block_sort_pairs": BLOCK_SORT_PAIRS}
    with open(output, "w") as file:
        json.dump({"provenance": info, "rows": rows}, file, indent=1, default=str)
        file.write("\n")


def main(output: str) -> None:
    rows = []
    for num_experts, top_k in ((128, 8), (64, 8), (60, 4), (256, 8)):
        for num_pairs in PAIR_COUNTS:
            index, _ = moe_lab.synthetic_routing(num_pairs // top_k, num_experts, top_k, device="cuda")
            expected = sort_with("torch")(index, num_experts)
            row = dict(num_experts=num_experts, top_k=top_k, num_pairs=num_pairs)
            for method in methods_for(num_pairs, num_experts):
                fn = sort_with(method)
                got = fn(index, num_experts)
                assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), method
                row[f"{method}_us"] = triton.testing.do_bench_cudagraph(lambda: fn(index, num_experts), rep=100,
                                                                        return_mode="median") * 1e3
                row[f"{method}_host_us"] = host_us(lambda: fn(index, num_experts))
            rows.append(row)
            print(row, flush=True)
    _write(output, rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--layers"]:
        layers(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "data/h100_sort_pairs.json")
