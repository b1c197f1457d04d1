"""Where the triton backend's one-program sort stops paying: `sort_pairs` below and above
ONE_PROGRAM_SORT_MAX_PAIRS against torch.sort of int32 keys + a histogram (what it replaces), GPU
time per call from CUDA-graph replays (triton.testing.do_bench_cudagraph, median), on random
routing.   python tools/sort_pairs_ab.py [OUTPUT.json]   (default data/h100_sort_pairs.json)
"""
from __future__ import annotations

import json
import sys
from unittest import mock

import torch
import triton.testing

import moe_lab
from moe_lab.backends import triton_fused
from moe_lab.bench.provenance import command_line, provenance


def sort_pairs_with_limit(limit):
    """triton_fused.sort_pairs with ONE_PROGRAM_SORT_MAX_PAIRS = limit: both branches, whatever the size."""
    def sort(index, num_experts):
        with mock.patch.object(triton_fused, "ONE_PROGRAM_SORT_MAX_PAIRS", limit):
            return triton_fused.sort_pairs(index, num_experts)
    return sort


one_program, torch_sort = sort_pairs_with_limit(1 << 20), sort_pairs_with_limit(0)


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
            "threshold_in_code": triton_fused.ONE_PROGRAM_SORT_MAX_PAIRS}
    with open(output, "w") as file:
        json.dump({"provenance": info, "rows": rows}, file, indent=1, default=str)
        file.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/h100_sort_pairs.json")
