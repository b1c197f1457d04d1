"""One expert-parallel rank's experts in a training step, with and without the backend's partial entry. GPU only.

The gathered layer (moe_lab.parallel.gathered) hands each of w ranks every rank's tokens, N = w*T rows with k
ids each, where an id E/w means "that expert is on another rank" (transformers' own all_reduce expert
parallelism hands its experts the same). `run_partial_experts` runs them two ways:

    partial   the backend's `partial_forward` entry (--backend, default triton, the one built-in backend with
              one): the absent slots sort after every expert and no GEMM reaches them, forward and backward
    generic   ids clamped to expert 0, weights zeroed, through the backend's forward: every slot computed,
              ~(w-1)/w of them thrown away (what a training step ran before the partial entry trained)

Each is one training step (forward + `torch.autograd.grad` of the rows, the routing weights and both weight
tensors), captured in a CUDA graph and replayed back to back in interleaved rounds; the gradients of the two
are compared. TFLOP/s count the present slots only (the work the layer needs).

    python tools/partial_training_ab.py --preset qwen3-30b-a3b --tokens 8192 --world-size 2 --output OUT.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

import moe_lab  # noqa: F401  (first: the triton setup)
from moe_lab.backends import get_spec, register, unregister
from moe_lab.bench.inputs import build_experts, random_hidden_states, random_routing
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.bench.roofline import training_flops
from moe_lab.bench.timing import back_to_back_ms
from moe_lab.cuda_graph import CapturedStep
from moe_lab.parallel.local import run_partial_experts
from moe_lab.presets import get_preset
from moe_lab.reference import relative_error

WITHOUT_PARTIAL = "without_partial_entry"


def rank_inputs(config, tokens: int, world_size: int, device):
    """Rank 0's view after the all-gather: [w*T, H] rows, local ids [w*T, k] (E/w: absent), weights [w*T, k]."""
    rows = world_size * tokens
    hidden_states = random_hidden_states(rows, config, device, seed=0)
    index, weights, _ = random_routing(rows, config, device, seed=0)  # global ids over all E experts
    local_experts = config.num_experts // world_size
    local_index = torch.where(index < local_experts, index, local_experts)  # rank 0 holds experts [0, E/w)
    return hidden_states, local_index, weights, local_experts


def step(experts, backend, hidden_states, local_index, weights, upstream):
    x = hidden_states.detach().requires_grad_(True)
    w = weights.detach().requires_grad_(True)
    inputs = [x, w, experts.gate_up_proj, experts.down_proj]

    def call():
        output = run_partial_experts(experts, x, local_index, w, backend=backend)
        return torch.autograd.grad(output, inputs, upstream)

    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="repeatable (default qwen3-30b-a3b)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank, T")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", default="triton", help="a backend whose spec has a partial_forward entry")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this tool replays CUDA graphs: it needs a CUDA GPU")
    device = torch.device("cuda")
    if get_spec(args.backend).partial_forward is None:
        raise SystemExit(f"backend {args.backend!r} has no partial_forward entry to compare")
    register(WITHOUT_PARTIAL, dataclasses.replace(get_spec(args.backend), partial_forward=None, builtin=False))
    results = dict(provenance=dict(provenance(device), command_line=command_line()), world_size=args.world_size,
                   tokens_per_rank=args.tokens, backend=args.backend, points=[])
    try:
        for preset in args.preset or ["qwen3-30b-a3b"]:
            config = get_preset(preset).config.replace(dtype=torch.bfloat16)
            hidden_states, local_index, weights, local_experts = rank_inputs(config, args.tokens, args.world_size,
                                                                             device)
            present = int((local_index < local_experts).sum())
            flops = training_flops(present, 1, config.hidden_size, config.intermediate_size)  # present slots only
            experts = build_experts(config.replace(num_experts=local_experts), device, seed=0)  # parameters: grad
            upstream = torch.randn_like(hidden_states)
            steps = {"partial": CapturedStep(step(experts, args.backend, hidden_states, local_index, weights, upstream),
                                             name="partial"),
                     "generic": CapturedStep(step(experts, WITHOUT_PARTIAL, hidden_states, local_index, weights,
                                                  upstream), name="generic")}
            partial_grads = [g.clone() for g in steps["partial"].replay()]
            generic_grads = steps["generic"].replay()
            names = ("rows", "top_k_weights", "gate_up_proj", "down_proj")
            errors = {name: relative_error(a, b) for name, a, b in zip(names, partial_grads, generic_grads)}
            rounds = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, captured in steps.items():
                    rounds[name].append(back_to_back_ms(captured.replay, args.reps, device=device).median_ms)
            point = dict(preset=preset, rows=hidden_states.shape[0], local_experts=local_experts,
                         present_slots=present, all_slots=local_index.numel(), present_flops=flops,
                         gradient_relative_difference=errors, rounds_ms=rounds,
                         median_ms={name: statistics.median(ms) for name, ms in rounds.items()})
            point["tflops"] = {name: flops / ms / 1e9 for name, ms in point["median_ms"].items()}
            point["generic_over_partial"] = point["median_ms"]["generic"] / point["median_ms"]["partial"]
            results["points"].append(point)
            print(json.dumps({k: point[k] for k in ("preset", "median_ms", "tflops", "generic_over_partial",
                                                    "gradient_relative_difference")}), flush=True)
            del steps, experts
            torch.cuda.empty_cache()
    finally:
        unregister(WITHOUT_PARTIAL)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
