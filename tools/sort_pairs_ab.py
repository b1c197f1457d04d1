"""The triton backend's sorts of (token, expert) pairs by expert, against each other and against what they
replace: `sort_pairs(..., method=...)` for each of SORT_METHODS ("one_program": one program's bitonic sort,
up to a few thousand pairs; "blocks": the counting sort over blocks of pairs, two launches; "torch":
torch.sort of int32 keys + a histogram), on random routing, at pair counts on both sides of
ONE_PROGRAM_SORT_MAX_PAIRS. Per method: GPU time per call from CUDA-graph replays
(triton.testing.do_bench_cudagraph, median), and the host's time to launch one call while the GPU is kept
busy (what a call launched from Python costs before its kernels can start).
    python tools/sort_pairs_ab.py [OUTPUT.json]   (default data/h100_sort_pairs.json)
"""
from __future__ import annotations

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
    info = {**provenance("cuda"), "triton_version": triton.__version__, "command_line": command_line(),
            "one_program_max_pairs_in_code": ONE_PROGRAM_SORT_MAX_PAIRS, "block_sort_pairs": BLOCK_SORT_PAIRS}
    with open(output, "w") as file:
        json.dump({"provenance": info, "rows": rows}, file, indent=1, default=str)
        file.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/h100_sort_pairs.json")
