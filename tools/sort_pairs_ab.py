"""Where the triton backend's one-program sort stops paying: `sort_pairs(..., one_program=True)`
against torch.sort of int32 keys + a histogram (`one_program=False`, what it replaces) on both sides
of ONE_PROGRAM_SORT_MAX_PAIRS, GPU time per call from CUDA-graph replays
(triton.testing.do_bench_cudagraph, median), on random routing.
    python tools/sort_pairs_ab.py [OUTPUT.json]   (default data/h100_sort_pairs.json)
"""
from __future__ import annotations

import json
import sys

import torch

import moe_lab  # first: without a GPU it switches triton to its interpreter before triton is imported
import triton
import triton.testing
from moe_lab.backends.triton_launch import sort_pairs
from moe_lab.backends.triton_plan import ONE_PROGRAM_SORT_MAX_PAIRS
from moe_lab.bench.provenance import command_line, provenance


def one_program(index, num_experts):
    return sort_pairs(index, num_experts, one_program=True)


def torch_sort(index, num_experts):
    return sort_pairs(index, num_experts, one_program=False)


def main(output: str) -> None:
    rows = []
    for num_experts, top_k in ((128, 8), (64, 8), (60, 4)):
        for num_pairs in (128, 512, 1024, 2048, 4096):
            index, _ = moe_lab.synthetic_routing(num_pairs // top_k, num_experts, top_k, device="cuda")
            assert torch.equal(one_program(index, num_experts)[0].long(), torch_sort(index, num_experts)[0])
            ms = {name: triton.testing.do_bench_cudagraph(lambda: fn(index, num_experts), rep=100,
                                                          return_mode="median")
                  for name, fn in (("one_program", one_program), ("torch_sort", torch_sort))}
            rows.append(dict(num_experts=num_experts, top_k=top_k, num_pairs=num_pairs,
                             one_program_us=ms["one_program"] * 1e3, torch_sort_us=ms["torch_sort"] * 1e3))
            print(rows[-1])
    info = {**provenance("cuda"), "triton_version": triton.__version__, "command_line": command_line(),
            "threshold_in_code": ONE_PROGRAM_SORT_MAX_PAIRS}
    with open(output, "w") as file:
        json.dump({"provenance": info, "rows": rows}, file, indent=1, default=str)
        file.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/h100_sort_pairs.json")
