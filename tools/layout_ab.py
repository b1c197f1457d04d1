"""A/B of the triton backend on the two weight layouts transformers uses, in one process on one card.

transformers' experts store gate_up_proj [E, 2I, H] and down_proj [E, H, I] by default, and [E, H, 2I] /
[E, I, H] in modules flagged `is_transposed` (gpt-oss). The backend reads both (transposed views of the second);
this times the same values in both layouts, so any difference is the layout's. Variants, per preset and T:

    own                the preset's layer in the default layout, the plan the backend chooses
    own_no_tma         the same with every kernel's TMA tiles switched off (what TMA is worth there)
    transposed         the same values stored transposed, the plan the backend chooses
    transposed_no_tma  the same with TMA off

Each variant's forward output and training gradients (hidden states, routing weights, both weights) are
compared with `own`'s (largest difference; the layouts reduce in the same order, so they should be equal), then
timed in interleaved rounds, the order rotated each round: the forward without gradients replayed from a CUDA
graph, and the training step (forward + torch.autograd.grad) replayed, replayed back to back (a training loop's
power state) and launched from Python. GPU only.

    python tools/layout_ab.py --presets gpt-oss-20b,qwen3-30b-a3b --tokens 1024,8192 --output $OUT/layout_ab.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

import moe_lab  # noqa: F401  (first: the triton setup)
from moe_lab.backends.triton_fused import KernelConfig, launch_plan, triton_experts_forward, weights_transposed
from moe_lab.bench.inputs import TransposedStorageExperts, build_experts, random_hidden_states, random_routing
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.bench.roofline import training_flops
from moe_lab.bench.timing import back_to_back_ms, median_ms
from moe_lab.cuda_graph import CapturedStep
from moe_lab.presets import get_preset
from moe_lab.reference import max_abs_difference

VARIANTS = ("own", "own_no_tma", "transposed", "transposed_no_tma")


def without_tma(plan):
    changes = {field.name: dataclasses.replace(getattr(plan, field.name), tma=False)
               for field in dataclasses.fields(plan) if isinstance(getattr(plan, field.name), KernelConfig)}
    return dataclasses.replace(plan, **changes)


def measure(preset: str, T: int, rounds: int, reps: int) -> dict:
    c = get_preset(preset).config.replace(dtype=torch.bfloat16)
    device = torch.device("cuda")
    own = build_experts(c, device, seed=0, implementation="triton").requires_grad_(True)
    transposed = TransposedStorageExperts(own)
    assert weights_transposed(transposed.gate_up_proj.transpose(1, 2))
    x = random_hidden_states(T, c, device, seed=0).requires_grad_(True)
    index, w, _ = random_routing(T, c, device, seed=0)
    w = w.detach().requires_grad_(True)
    upstream = random_hidden_states(T, c, device, seed=1)
    plans = {}
    for layout in ("own", "transposed"):
        for grad in (False, True):
            plan = launch_plan(T, c.top_k, c.num_experts, c.hidden_size, c.intermediate_size, c.dtype,
                               interpreted=False, needs_grad=grad, transposed=layout == "transposed")
            plans[layout, grad], plans[f"{layout}_no_tma", grad] = plan, without_tma(plan)
    layers = {name: own if name.startswith("own") else transposed for name in VARIANTS}

    def forward(name):
        def call():
            with torch.no_grad():
                return triton_experts_forward(layers[name], x, index, w, plan=plans[name, False])
        return call

    def step(name):
        layer = layers[name]
        inputs = [x, w, layer.gate_up_proj, layer.down_proj]

        def call():
            grads = torch.autograd.grad(triton_experts_forward(layer, x, index, w, plan=plans[name, True]), inputs,
                                        upstream)
            # Both layouts' weight gradients as [E, 2I, H] / [E, H, I], to compare.
            return grads[:2] + tuple(g.transpose(1, 2) if layer is transposed else g for g in grads[2:])
        return call

    forwards = {name: forward(name) for name in VARIANTS}
    steps = {name: step(name) for name in VARIANTS}
    names = ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj")
    expected_out, expected_grads = forwards["own"](), steps["own"]()
    record = dict(preset=preset, tokens=T, flops=training_flops(T, c.top_k, c.hidden_size, c.intermediate_size),
                  variants={})
    for name in VARIANTS:
        out, grads = forwards[name](), steps[name]()
        record["variants"][name] = dict(
            plan_asks_for_forward_tma=any(cfg.tma for cfg in (plans[name, True].gate_up, plans[name, True].down)),
            forward_max_abs_diff=max_abs_difference(out, expected_out),
            grad_max_abs_diff={n: max_abs_difference(a, b) for n, a, b in zip(names, grads, expected_grads)},
            forward_replay_ms=[], step_replay_ms=[], step_back_to_back_ms=[], step_launched_ms=[])
        del out, grads
    captured_forward = {name: CapturedStep(fn, warmup=2) for name, fn in forwards.items()}
    captured_step = {name: CapturedStep(fn, warmup=2) for name, fn in steps.items()}
    order = list(VARIANTS)
    for round_ in range(rounds):
        for name in order[round_ % len(order):] + order[:round_ % len(order)]:
            row = record["variants"][name]
            row["forward_replay_ms"].append(median_ms(captured_forward[name].replay, reps, warmup=3))
            row["step_replay_ms"].append(median_ms(captured_step[name].replay, reps, warmup=3))
            row["step_back_to_back_ms"].append(back_to_back_ms(captured_step[name].replay, 10 * reps).median_ms)
            row["step_launched_ms"].append(median_ms(steps[name], reps, warmup=3))
    for row in record["variants"].values():
        for kind in ("forward_replay", "step_replay", "step_back_to_back", "step_launched"):
            row[f"{kind}_median_ms"] = statistics.median(row[f"{kind}_ms"])
            row[f"{kind}_vs_own"] = (statistics.median(record["variants"]["own"][f"{kind}_ms"])
                                     / row[f"{kind}_median_ms"])
        row["step_replay_tflops"] = record["flops"] / row["step_replay_median_ms"] / 1e9
    del captured_forward, captured_step
    torch.cuda.empty_cache()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="gpt-oss-20b,qwen3-30b-a3b")
    parser.add_argument("--tokens", default="1024,8192", help="comma-separated token counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this A/B replays CUDA graphs: it needs a CUDA GPU")
    results = dict(provenance=dict(provenance(torch.device("cuda")), command_line=command_line()), points=[])
    for preset in args.presets.split(","):
        for T in (int(t) for t in args.tokens.split(",")):
            record = measure(preset, T, args.rounds, args.reps)
            results["points"].append(record)
            for name, row in record["variants"].items():
                print(f"{preset} T={T} {name:>17}: forward {row['forward_replay_median_ms']:.3f} ms "
                      f"(x{row['forward_replay_vs_own']:.3f}) step replay {row['step_replay_median_ms']:.3f} ms "
                      f"(x{row['step_replay_vs_own']:.3f}) back to back {row['step_back_to_back_median_ms']:.3f} "
                      f"(x{row['step_back_to_back_vs_own']:.3f}) launched {row['step_launched_median_ms']:.3f} "
                      f"(x{row['step_launched_vs_own']:.3f}) fwd diff {row['forward_max_abs_diff']:.2e} "
                      f"grad diff {max(row['grad_max_abs_diff'].values()):.2e}", flush=True)
            with open(args.output, "w") as file:
                json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
