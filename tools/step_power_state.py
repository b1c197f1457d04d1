"""How a training step's replayed time moves with the card's power state. GPU only.

Each implementation's step (one layer's forward and `torch.autograd.grad`, the bench's training step) is
captured in a CUDA graph and replayed in alternating blocks:

    back_to_back  replays queued one after another, each timed with CUDA events: the card runs as in a
                  training loop, at its power limit if the step draws that much
    rested        a host sleep before each replay, so the card idles in between and its clock recovers

An H200 under this load reaches its 700 W software power cap and lowers its SM clock
(data/h200_training_plan_ab_fused_gathers_clocks.csv). With --clocks-csv, the file an `nvidia-smi
--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active --format=csv -lms 100`
started beside the tool is summarised per block: the SM clock, the power and how often the cap was active.

    nvidia-smi --query-gpu=... --format=csv -lms 100 > $OUT/clocks.csv &
    python tools/step_power_state.py --backends triton,transformers:grouped_mm --clocks-csv $OUT/clocks.csv \\
        --output $OUT/step_power_state.json
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
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
from moe_lab.bench.timing import back_to_back_ms
from moe_lab.cuda_graph import CapturedStep
from moe_lab.presets import get_preset

MODES = ("back_to_back", "rested")
POWER_CAP_REASON = 0x4  # nvidia-smi clocks_event_reasons: SW Power Cap
IDLE_REASON = 0x1


def read_clock_samples(path: str) -> list[dict]:
    """nvidia-smi's CSV (timestamp, clocks.sm, power.draw, temperature.gpu, clocks_event_reasons.active)."""
    samples = []
    with open(path) as file:
        for row in csv.reader(file):
            if len(row) < 5 or not row[1].strip()[:1].isdigit():
                continue  # the header, or a line cut off when the sampler was stopped
            samples.append(dict(time=datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f"),
                                clock_mhz=int(row[1].split()[0]), watts=float(row[2].split()[0]),
                                reasons=int(row[4].strip(), 16)))
    return samples


def clock_summary(samples: list[dict], began: datetime.datetime, ended: datetime.datetime) -> dict:
    window = [s for s in samples if began <= s["time"] <= ended]
    busy = [s for s in window if not s["reasons"] & IDLE_REASON]
    if not busy:
        return dict(samples=len(window), busy=0)
    return dict(samples=len(window), busy=len(busy),
                power_capped=sum(1 for s in busy if s["reasons"] & POWER_CAP_REASON),
                median_clock_mhz=statistics.median(s["clock_mhz"] for s in busy),
                min_clock_mhz=min(s["clock_mhz"] for s in busy),
                median_watts=statistics.median(s["watts"] for s in busy), max_watts=max(s["watts"] for s in busy))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--backends", default="triton,transformers:grouped_mm")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per mode, alternating")
    parser.add_argument("--back-to-back-reps", type=int, default=400)
    parser.add_argument("--rested-reps", type=int, default=40)
    parser.add_argument("--rest-ms", type=float, default=50.0)
    parser.add_argument("--clocks-csv", help="nvidia-smi's samples, written while this runs")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this tool replays CUDA graphs: it needs a CUDA GPU")
    device = torch.device("cuda")
    config = get_preset(args.preset).config.replace(dtype=torch.bfloat16)
    c = config
    flops = training_flops(args.tokens, c.top_k, c.hidden_size, c.intermediate_size)
    hidden_states = random_hidden_states(args.tokens, config, device, seed=0)
    top_k_index, top_k_weights, _ = random_routing(args.tokens, config, device, seed=0)
    results = dict(provenance=dict(provenance(device), command_line=command_line()), preset=args.preset,
                   tokens=args.tokens, flops=flops, blocks=[])
    for name in args.backends.split(","):
        experts = build_experts(config, device, seed=0)
        experts.set_experts_implementation(implementations.implementation(name))
        call, _ = training_step(experts, hidden_states, top_k_index, top_k_weights, seed=0)
        captured = CapturedStep(call, name=f"{name}'s training step")
        for block in range(2 * args.blocks):
            mode = MODES[block % 2]
            reps, rest = ((args.back_to_back_reps, 0.0) if mode == "back_to_back"
                          else (args.rested_reps, args.rest_ms / 1e3))
            began = datetime.datetime.now()
            timing = back_to_back_ms(captured.replay, reps, device=device, rest_s=rest)
            ended = datetime.datetime.now()
            results["blocks"].append(dict(implementation=name, mode=mode, block=block, reps=reps, began=began.isoformat(),
                                          ended=ended.isoformat(), median_ms=timing.median_ms, min_ms=timing.min_ms,
                                          p90_ms=timing.p90_ms, tflops=flops / timing.median_ms / 1e9))
            print(f"{name:>24} {mode:>12}: {timing.median_ms:.3f} ms ({flops / timing.median_ms / 1e9:.0f} TFLOP/s), "
                  f"min {timing.min_ms:.3f}", flush=True)
        del captured, call, experts
        torch.cuda.empty_cache()
    if args.clocks_csv:
        time.sleep(0.3)  # the sampler's last lines
        samples = read_clock_samples(args.clocks_csv)
        for row in results["blocks"]:
            row["clocks"] = clock_summary(samples, datetime.datetime.fromisoformat(row["began"]),
                                          datetime.datetime.fromisoformat(row["ended"]))
    summary = {}
    for row in results["blocks"]:
        summary.setdefault(row["implementation"], {}).setdefault(row["mode"], []).append(row["median_ms"])
    results["summary"] = {name: {mode: dict(median_ms=statistics.median(ms), tflops=flops / statistics.median(ms) / 1e9)
                                 for mode, ms in modes.items()} for name, modes in summary.items()}
    with open(args.output, "w") as file:
        json.dump(results, file, indent=1)
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
