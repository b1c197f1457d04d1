"""A/B of the triton backend's launch-plan choices on whole training steps, in one process on one card.

A variant is the plan the backend chooses ("plan") with some of its flags replaced. Per preset, every
variant's step (forward, then torch.autograd.grad of the hidden states, the routing weights and both weight
tensors; random inputs and upstream gradient) is first checked against the plan's gradients (bit-equal or
the largest difference), its peak memory measured, and then timed in interleaved rounds, the variants'
order rotated each round: replayed from a CUDA graph with a synchronize after each replay (as `moe-lab bench
--cuda-graph` times it), replayed back to back (as a training loop runs it, the card never idle:
`moe_lab.bench.timing.back_to_back_ms`), and launched from Python (synced, as `moe-lab bench --backward` times
it). GPU only. Run it beside `nvidia-smi --query-gpu=clocks.sm,clocks_event_reasons.active ... -lms 100`: on
the H200 these steps reach the 700 W power cap and the SM clock moves with it, so one round can differ from
the next by more than a lever's effect (tools/step_power_state.py sizes that).

    python tools/training_plan_ab.py --presets qwen3-30b-a3b,qwen1.5-moe-a2.7b --tokens 8192 \
        --variant gathered=sorted_grad_out:false,sorted_hidden_states:false,split_down_backward:false \
        --variant recompute=save_pre_activation:false --output $OUT/training_plan_ab.json

A variant is NAME=FLAG[,FLAG...]; a FLAG sets that plan flag to True, FLAG:false to False; KERNEL.tma:false
switches one kernel's TMA tiles off (KERNEL: one of the plan's kernel configs, e.g. gate_up_weight_grad), and
backward.tma:false those of the four backward kernels. It recorded data/h200_training_plan_ab_fused_gathers.json
at the commit named there, whose plan had two more flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

import moe_lab  # noqa: F401  (first: the triton setup)
from moe_lab.backends.triton_fused import KernelConfig, LaunchPlan, launch_plan, triton_experts_forward
from moe_lab.bench.inputs import build_experts, random_hidden_states, random_routing
from moe_lab.bench.memory import measure_peak_memory
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.bench.roofline import training_flops
from moe_lab.bench.timing import back_to_back_ms, median_ms
from moe_lab.cuda_graph import CapturedStep
from moe_lab.presets import get_preset
from moe_lab.reference import max_abs_difference

PLAN_FLAGS = tuple(field.name for field in dataclasses.fields(LaunchPlan)
                   if field.type in (bool, "bool"))
KERNELS = tuple(field.name for field in dataclasses.fields(LaunchPlan) if field.type in (KernelConfig, "KernelConfig"))
BACKWARD_KERNELS = ("down_backward", "gate_up_input_grad", "gate_up_weight_grad", "down_weight_grad")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, fields = text.partition("=")
    if not name or not fields:
        raise SystemExit(f"--variant {text!r}: expected NAME=FLAG[,FLAG:false...]")
    changes = {}
    for field in fields.split(","):
        key, _, value = field.partition(":")
        on = value.lower() not in ("0", "false", "no") if value else True
        kernel, dot, attribute = key.partition(".")
        if dot:
            kernels = BACKWARD_KERNELS if kernel == "backward" else (kernel,)
            if attribute != "tma" or not set(kernels) <= set(KERNELS):
                raise SystemExit(f"--variant {text!r}: {key!r} is not KERNEL.tma; kernels: {list(KERNELS)} "
                                 "or backward")
            changes.update({name: ("tma", on) for name in kernels})
        elif key in PLAN_FLAGS:
            changes[key] = on
        else:
            raise SystemExit(f"--variant {text!r}: {key!r} is not a plan flag; allowed: {list(PLAN_FLAGS)}")
    return name, changes


def apply_changes(plan, changes: dict):
    fields = {key: dataclasses.replace(getattr(plan, key), **{value[0]: value[1]}) if isinstance(value, tuple)
              else value for key, value in changes.items()}
    return dataclasses.replace(plan, **fields)


def training_step(layer, x, index, w, upstream, plan):
    inputs = [x, w, layer.gate_up_proj, layer.down_proj]

    def step():
        return torch.autograd.grad(triton_experts_forward(layer, x, index, w, plan=plan), inputs, upstream)

    return step


def measure_preset(preset: str, T: int, variants: dict, rounds: int, reps: int) -> dict:
    config = get_preset(preset).config.replace(dtype=torch.bfloat16)
    device = torch.device("cuda")
    layer = build_experts(config, device, seed=0, implementation="triton")
    layer.requires_grad_(True)
    x = random_hidden_states(T, config, device, seed=0).requires_grad_(True)
    index, w, _ = random_routing(T, config, device, seed=0)
    w = w.detach().requires_grad_(True)
    upstream = random_hidden_states(T, config, device, seed=1)
    c = config
    base = launch_plan(T, c.top_k, c.num_experts, c.hidden_size, c.intermediate_size, c.dtype, interpreted=False,
                       needs_grad=True)
    plans = {"plan": base, **{name: apply_changes(base, changes) for name, changes in variants.items()}}
    steps = {name: training_step(layer, x, index, w, upstream, plan) for name, plan in plans.items()}
    names = ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj")
    expected = steps["plan"]()
    record = dict(preset=preset, tokens=T, flops=training_flops(T, c.top_k, c.hidden_size, c.intermediate_size),
                  variants={})
    for name, step in steps.items():
        got = step()
        record["variants"][name] = dict(
            changes={k: v if isinstance(v, bool) else dataclasses.asdict(v) for k, v in vars(plans[name]).items()
                     if v != getattr(base, k)},
            bit_equal={n: bool(torch.equal(a, b)) for n, a, b in zip(names, got, expected)},
            max_abs_diff={n: max_abs_difference(a, b) for n, a, b in zip(names, got, expected)},
            peak_bytes=measure_peak_memory(step, device, warmup=0).peak_bytes,
            replay_ms=[], back_to_back_ms=[], launched_ms=[])
        del got
    captured = {name: CapturedStep(step, warmup=2) for name, step in steps.items()}
    order = list(steps)
    for round_ in range(rounds):
        for name in order[round_ % len(order):] + order[:round_ % len(order)]:
            row = record["variants"][name]
            row["replay_ms"].append(median_ms(captured[name].replay, reps, warmup=3))
            row["back_to_back_ms"].append(back_to_back_ms(captured[name].replay, 10 * reps).median_ms)
            row["launched_ms"].append(median_ms(steps[name], reps, warmup=3))
    for name, row in record["variants"].items():
        for kind in ("replay", "back_to_back", "launched"):
            ms = statistics.median(row[f"{kind}_ms"])
            row[f"{kind}_median_ms"] = ms
            row[f"{kind}_tflops"] = record["flops"] / ms / 1e9
            row[f"{kind}_vs_plan"] = statistics.median(record["variants"]["plan"][f"{kind}_ms"]) / ms
    del captured
    torch.cuda.empty_cache()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="qwen3-30b-a3b,olmoe-1b-7b,qwen1.5-moe-a2.7b")
    parser.add_argument("--tokens", default="8192", help="comma-separated token counts")
    parser.add_argument("--variant", action="append", default=[], help="NAME=FLAG[,FLAG:false...]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this A/B replays CUDA graphs: it needs a CUDA GPU")
    variants = dict(parse_variant(text) for text in args.variant)
    results = dict(provenance=dict(provenance(torch.device("cuda")), command_line=command_line()), points=[])
    for preset, T in ((p, int(t)) for p in args.presets.split(",") for t in args.tokens.split(",")):
        record = measure_preset(preset, T, variants, args.rounds, args.reps)
        results["points"].append(record)
        for name, row in record["variants"].items():
            print(f"{preset} T={T} {name:>8}: replay {row['replay_median_ms']:.3f} ms "
                  f"({row['replay_tflops']:.0f} TFLOP/s, x{row['replay_vs_plan']:.3f}) back to back "
                  f"{row['back_to_back_median_ms']:.3f} ms (x{row['back_to_back_vs_plan']:.3f}) launched "
                  f"{row['launched_median_ms']:.3f} ms (x{row['launched_vs_plan']:.3f}) peak "
                  f"{row['peak_bytes'] / 2**30:.2f} GiB equal={all(row['bit_equal'].values())} "
                  f"rounds {row['replay_ms']}", flush=True)
        with open(args.output, "w") as file:
            json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
