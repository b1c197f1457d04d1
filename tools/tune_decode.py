"""The triton decode kernels where a model runs them: L layers with their own weights, back to back in one
CUDA graph, so every layer reads its experts cold from HBM (as in a decode step of a 48-layer model), not
from the L2 cache a kernel repeated on one layer's weights partly hits.

    python tools/tune_decode.py --output $OUT/decode_layers.json [--presets qwen3-30b-a3b,...] [--tokens 1]

For each preset (bf16, random routing, distinct experts per token) and each candidate DecodeConfig of
decode_gate_up_kernel and decode_down_kernel: one graph of L launches over L layers' weights, replayed (CUDA
events, median of >= 20 replays), as microseconds per layer and GB/s of expert weights read. Then the whole
decode layer (both kernels) with the plan's configs and with the two winners, in interleaved rounds, beside
a device-to-device copy of the same bytes (what streaming them can cost on this card). --crossover T,T,...:
instead, the whole triton forward at each T with the decode path forced on and off (the plan's tiles
otherwise), in interleaved rounds: where the decode kernels stop paying when the weights come cold. --ab-old-kernels
PATH: instead, the whole decode layer (the plan's configs) with the package's kernels and with the decode kernels of
an older copy of triton_kernels.py (e.g. `git show <commit>:moe_lab/backends/triton_kernels.py`), five interleaved
rounds. Every row goes to the JSON with provenance as it is measured. --smoke: tiny shapes, one candidate, on this
machine (checks the tool). --transposed: the weights stored as transformers' `is_transposed` modules store them
([E, H, 2I] and [E, I, H], gpt-oss), with biases and the gate left to the module (activation "none", as gpt-oss
runs, with a same-size stand-in for its gate): the kernels then read weight tiles whose contiguous dimension is the
output's, and the sweep takes its own candidates, whole runs of N read a row of K at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import statistics
import time

import torch

import moe_lab  # first: without a GPU it switches triton to its interpreter before triton is imported
from moe_lab.backends import triton_fused as tf
from moe_lab.backends.triton_launch import decode_constexprs, interpreting, launch_decode_down, launch_decode_gate_up
from moe_lab.bench.inputs import build_experts, random_hidden_states, random_routing
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.bench.timing import time_fn

D = tf.DecodeConfig
GATE_UP_CANDIDATES = ([D(bn, bk, w, 1) for bn, bk, w in itertools.product([2, 4, 8, 16], [512, 1024, 2048], [4, 8, 16])]
                      + [D(8, 256, 8, 3), D(8, 512, 8, 2), D(4, 1024, 8, 2), D(8, 256, 4, 1)])
DOWN_CANDIDATES = ([D(bn, bk, w, 1) for bn, bk, w in itertools.product([4, 8, 16, 32], [256, 512, 1024], [4, 8])]
                   + [D(8, 512, 8, 2), D(16, 1024, 16, 1), D(8, 2048, 8, 1)])
# Transposed storage: the output dimension N is the contiguous one, so a tile spans N and a row of it is read
# whole. The down kernel runs one program per (token, N block): narrow blocks keep enough programs at T=1.
TRANSPOSED_GATE_UP_CANDIDATES = [D(bn, bk, w, st) for bn, bk, w, st in
                                 itertools.product([16, 32, 64, 128], [64, 128, 256], [4, 8], [1, 3])]
TRANSPOSED_DOWN_CANDIDATES = [D(bn, bk, w, st) for bn, bk, w, st in
                              itertools.product([8, 16, 32, 64], [64, 128, 256, 512], [4, 8], [1])]
PRESETS = ["qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b", "gpt-oss-20b", "mixtral-8x7b", "deepseek-v3"]
COLD_BYTES = 400e6  # L layers read at least this much: 8x an H100/H200's 50 MB L2


@dataclasses.dataclass
class Layers:
    """L layers of one preset, each with its own weights, input row(s), routing and h."""

    experts: list
    gate_up: list  # [E, 2I, H] views the kernels read: the experts' own, or of [E, H, 2I] storage (--transposed)
    down: list  # [E, H, I] views
    gate_up_bias: list  # [E, 2I] or None
    down_bias: list  # [E, H] or None
    activation: str  # "silu", or "none" (a module's own gate: gate_up writes [S, 2I])
    x: list
    flat_index: list
    routing_weights: list
    h: list
    top_k: int
    read_gate_up: int  # bytes of expert weights one layer's gate_up reads
    read_down: int


def build_layers(preset: str, tokens: int, device, smoke: bool, transposed: bool = False) -> Layers:
    config = moe_lab.get_preset(preset).config.replace(dtype=torch.bfloat16)
    if smoke:
        config = moe_lab.scale_down(config, 64)
    H, I, k = config.hidden_size, config.intermediate_size, config.top_k
    pairs = tokens * k  # distinct experts per token; at T=1 every pair reads its own expert
    read_gate_up, read_down = pairs * 2 * I * H * 2, pairs * I * H * 2
    per_layer_bytes = config.num_experts * 3 * I * H * 2
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * per_layer_bytes
    count = 1 if smoke else max(2, min(8, math.ceil(COLD_BYTES / (read_gate_up + read_down)),
                                       int(0.6 * free // per_layer_bytes)))
    layers = Layers(experts=[], gate_up=[], down=[], gate_up_bias=[], down_bias=[],
                    activation="none" if transposed else "silu", x=[], flat_index=[], routing_weights=[], h=[],
                    top_k=k, read_gate_up=read_gate_up, read_down=read_down)
    for seed in range(count):
        experts = build_experts(config, device, implementation="triton")
        layers.experts.append(experts)
        if transposed:  # stored [E, H, 2I] / [E, I, H]; the kernels get [E, 2I, H] / [E, H, I] views of it
            layers.gate_up.append(experts.gate_up_proj.detach().transpose(1, 2).contiguous().transpose(1, 2))
            layers.down.append(experts.down_proj.detach().transpose(1, 2).contiguous().transpose(1, 2))
            layers.gate_up_bias.append(torch.randn(config.num_experts, 2 * I, device=device, dtype=torch.bfloat16))
            layers.down_bias.append(torch.randn(config.num_experts, H, device=device, dtype=torch.bfloat16))
            experts.gate_up_proj, experts.down_proj = None, None  # one copy of the weights on the card
        else:
            layers.gate_up.append(experts.gate_up_proj)
            layers.down.append(experts.down_proj)
            layers.gate_up_bias.append(None)
            layers.down_bias.append(None)
        layers.x.append(random_hidden_states(tokens, config, device, seed=seed))
        index, weights, _ = random_routing(tokens, config, device, seed=seed)
        layers.flat_index.append(index.reshape(-1).contiguous())
        layers.routing_weights.append(weights.reshape(-1).contiguous())
        layers.h.append(torch.randn(pairs, I, device=device, dtype=torch.bfloat16))
    return layers


def gate_up_launches(layers: Layers, config):
    return [lambda i=i: launch_decode_gate_up(layers.x[i], layers.gate_up[i], layers.gate_up_bias[i],
                                              layers.flat_index[i], layers.top_k, layers.activation, config)
            for i in range(len(layers.experts))]


def down_launches(layers: Layers, config):
    return [lambda i=i: launch_decode_down(layers.h[i], layers.down[i], layers.down_bias[i], layers.flat_index[i],
                                           layers.routing_weights[i], layers.top_k, config)
            for i in range(len(layers.experts))]


def layer_launches(layers: Layers, gate_up_config, down_config):
    def one(i):
        h = launch_decode_gate_up(layers.x[i], layers.gate_up[i], layers.gate_up_bias[i], layers.flat_index[i],
                                  layers.top_k, layers.activation, gate_up_config)
        if layers.activation == "none":  # where a module's own gate runs, in torch: [S, 2I] -> [S, I] (a stand-in
            # of the same size for gpt-oss's clamped, interleaved one; these rows time the kernels' tiles)
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
        return launch_decode_down(h, layers.down[i], layers.down_bias[i], layers.flat_index[i],
                                  layers.routing_weights[i], layers.top_k, down_config)
    return [lambda i=i: one(i) for i in range(len(layers.experts))]


def copy_launches(layers: Layers):
    """A device-to-device copy of the bytes a decode layer reads, from buffers as cold as the weights."""
    elements = (layers.read_gate_up + layers.read_down) // 2
    sources = [torch.randn(elements, device=layers.x[0].device, dtype=torch.bfloat16) for _ in layers.experts]
    targets = [torch.empty_like(s) for s in sources]
    return [lambda s=s, t=t: t.copy_(s) for s, t in zip(sources, targets)]


def graph_us_per_layer(launches, device, smoke: bool):
    """Median microseconds per launch group, replayed from one CUDA graph of all of them (eager on CPU)."""
    def run_all():
        for launch in launches:
            launch()
    try:
        run_all()
        if device.type != "cuda":
            return 1e3 * time_fn(run_all, device=device, warmup=0, min_reps=1, max_reps=1).median_ms / len(launches)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_all()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        ms = time_fn(graph.replay, device=device, warmup=3, min_reps=20, max_seconds=0.3).median_ms
        return 1e3 * ms / len(launches)
    except Exception as error:  # out of registers / shared memory for this tile: not a candidate
        return f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"


def sweep(kind, preset, layers, candidates, current, make_launches, read_bytes, device, smoke, results):
    timings = {}
    for config in dict.fromkeys((candidates[:1] if smoke else candidates) + [current]):
        timings[config] = graph_us_per_layer(make_launches(layers, config), device, smoke)
    ok = {c: t for c, t in timings.items() if isinstance(t, float)}
    best = min(ok, key=ok.get)
    row = dict(kind=kind, preset=preset, layers=len(layers.experts), read_bytes=read_bytes,
               best=dataclasses.astuple(best), best_us=ok[best], best_GBps=read_bytes / ok[best] / 1e3,
               current=dataclasses.astuple(current), current_us=ok.get(current),
               all={str(dataclasses.astuple(c)): t for c, t in timings.items()})
    results.append(row)
    print(f"{kind:9s} {preset:18s} L={len(layers.experts)} best {dataclasses.astuple(best)} {ok[best]:.1f} us "
          f"({row['best_GBps']:.0f} GB/s); current {dataclasses.astuple(current)} {ok.get(current, float('nan')):.1f} us",
          flush=True)
    return best


def whole_layer(preset, layers, plan, winners, device, smoke, results, rounds=3):
    """Both kernels per layer, the plan's configs against the winners, and the copy, in interleaved rounds."""
    entries = {"plan": layer_launches(layers, plan.decode_gate_up, plan.decode_down),
               "winners": layer_launches(layers, *winners)}
    if device.type == "cuda":
        entries["copy"] = copy_launches(layers)
    samples = {name: [] for name in entries}
    for r in range(1 if smoke else rounds):
        for name in (list(entries) if r % 2 == 0 else list(entries)[::-1]):
            samples[name].append(graph_us_per_layer(entries[name], device, smoke))
    read = layers.read_gate_up + layers.read_down
    row = dict(kind="layer", preset=preset, layers=len(layers.experts), read_bytes=read,
               winners=[dataclasses.astuple(w) for w in winners],
               **{f"{name}_us": samples[name] for name in samples},
               **{f"{name}_GBps": read / statistics.median(s) / 1e3 for name, s in samples.items()
                  if all(isinstance(v, float) for v in s)})
    results.append(row)
    print("layer    ", preset, {name: [round(v, 1) if isinstance(v, float) else v for v in s]
                                for name, s in samples.items()}, flush=True)


def old_layer_launches(layers: Layers, old, gate_up_config, down_config):
    """layer_launches through an older triton_kernels module's decode kernels, launched with the argument list
    they have had since the decode path came in (a file whose kernels take other arguments needs its own)."""
    def one(i):
        x, experts, index = layers.x[i], layers.experts[i], layers.flat_index[i]
        gate_up, down = experts.gate_up_proj, experts.down_proj
        width = gate_up.shape[1] // 2
        h = x.new_empty(index.numel(), width)
        old.decode_gate_up_kernel[(index.numel() * -(-width // gate_up_config.block_n),)](
            x, gate_up, None, h, index, layers.top_k, width, x.shape[1], x.stride(0), x.stride(1), *gate_up.stride(),
            0, 0, h.stride(0), h.stride(1), ACTIVATION="silu", HAS_BIAS=False, **decode_constexprs(gate_up_config))
        hidden, inter = down.shape[1], down.shape[2]
        out = h.new_empty(index.numel() // layers.top_k, hidden)
        old.decode_down_kernel[(out.shape[0] * -(-hidden // down_config.block_n),)](
            h, down, None, index, layers.routing_weights[i], out, hidden, inter, h.stride(0), h.stride(1),
            *down.stride(), 0, 0, out.stride(0), out.stride(1), TOP_K=layers.top_k, HAS_BIAS=False,
            **decode_constexprs(down_config))
        return out
    return [lambda i=i: one(i) for i in range(len(layers.experts))]


def ab_old_kernels(preset, layers: Layers, plan, old, device, smoke, results, rounds=5):
    """The whole decode layer, the package's kernels against `old`'s, same configs, same inputs, interleaved."""
    entries = {"old": old_layer_launches(layers, old, plan.decode_gate_up, plan.decode_down),
               "new": layer_launches(layers, plan.decode_gate_up, plan.decode_down)}
    same = all(torch.equal(a(), b()) for a, b in zip(entries["old"], entries["new"]))
    samples = {name: [] for name in entries}
    for r in range(1 if smoke else rounds):
        for name in (list(entries) if r % 2 == 0 else list(entries)[::-1]):
            samples[name].append(graph_us_per_layer(entries[name], device, smoke))
    row = dict(kind="ab_old_kernels", preset=preset, layers=len(layers.experts), identical_outputs=same,
               **{f"{name}_us": s for name, s in samples.items()},
               new_over_old=statistics.median(samples["new"]) / statistics.median(samples["old"]))
    results.append(row)
    print(f"ab        {preset:18s} identical {same}: old {[round(v, 1) for v in samples['old']]} new "
          f"{[round(v, 1) for v in samples['new']]} us; new/old {row['new_over_old']:.3f}", flush=True)


def crossover(preset, layers: Layers, tokens_list, device, smoke, results, rounds=3):
    """The whole forward at each T, decode path forced on and off, replayed from one graph over the L layers."""
    config = layers.experts[0].config
    for T in tokens_list:
        inputs = []
        for seed, experts in enumerate(layers.experts):
            index, weights, _ = random_routing(T, config, device, seed=100 + seed)
            inputs.append((random_hidden_states(T, config, device, seed=100 + seed), index, weights))
        plan = tf.launch_plan(T, config.top_k, config.num_experts, config.hidden_size, config.intermediate_size,
                              config.dtype, interpreted=interpreting())
        entries = {}
        for label, decode in (("decode", True), ("sorted", False)):
            forced = dataclasses.replace(plan, decode=decode)
            entries[label] = [lambda e=e, i=i, p=forced: tf.triton_experts_forward(e, *i, plan=p)
                              for e, i in zip(layers.experts, inputs)]
        samples = {name: [] for name in entries}
        for r in range(1 if smoke else rounds):
            for name in (list(entries) if r % 2 == 0 else list(entries)[::-1]):
                samples[name].append(graph_us_per_layer(entries[name], device, smoke))
        distinct = [int(torch.unique(i[1]).numel()) for i in inputs]
        row = dict(kind="crossover", preset=preset, T=T, layers=len(layers.experts), plan_decode=plan.decode,
                   experts_hit=statistics.mean(distinct), **{f"{n}_us": s for n, s in samples.items()})
        results.append(row)
        print(f"crossover {preset:18s} T={T:3d} hit {row['experts_hit']:.0f}: decode "
              f"{[round(v, 1) if isinstance(v, float) else v for v in samples['decode']]} sorted "
              f"{[round(v, 1) if isinstance(v, float) else v for v in samples['sorted']]} us; plan: "
              f"{'decode' if plan.decode else 'sorted'}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="decode_layers.json")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--budget-seconds", type=float, default=300.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--crossover", default="", help="comma-separated token counts: the decode/sorted crossover")
    parser.add_argument("--ab-old-kernels", help="an older triton_kernels.py: its decode kernels against the package's")
    parser.add_argument("--transposed", action="store_true",
                        help="weights stored [E, H, 2I] / [E, I, H] with biases, gate left to torch (as gpt-oss)")
    args = parser.parse_args(argv)
    if args.transposed and (args.crossover or args.ab_old_kernels):
        parser.error("--transposed sweeps the decode tiles only; it does not go with --crossover or --ab-old-kernels")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("measuring needs a CUDA GPU; --smoke runs the tool on tiny shapes here")
    deadline = time.monotonic() + args.budget_seconds
    meta = {**provenance(device), "command_line": command_line()}
    results = []
    old = None
    if args.ab_old_kernels:
        spec = importlib.util.spec_from_file_location("old_triton_kernels", args.ab_old_kernels)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    for preset in args.presets.split(","):
        if time.monotonic() > deadline:
            print("budget spent before", preset, flush=True)
            break
        layers = build_layers(preset, args.tokens, device, args.smoke, transposed=args.transposed)
        c = layers.experts[0].config
        plan = tf.launch_plan(args.tokens, c.top_k, c.num_experts, c.hidden_size, c.intermediate_size, c.dtype,
                              interpreted=interpreting(), transposed=args.transposed)
        with torch.no_grad():
            if old is not None:
                ab_old_kernels(preset, layers, plan, old, device, args.smoke, results)
            elif args.crossover:
                crossover(preset, layers, [int(t) for t in args.crossover.split(",")], device, args.smoke, results)
            else:
                kind = "transposed " if args.transposed else ""
                best_gate_up = sweep(kind + "gate_up", preset, layers,
                                     TRANSPOSED_GATE_UP_CANDIDATES if args.transposed else GATE_UP_CANDIDATES,
                                     plan.decode_gate_up, gate_up_launches, layers.read_gate_up, device, args.smoke,
                                     results)
                best_down = sweep(kind + "down", preset, layers,
                                  TRANSPOSED_DOWN_CANDIDATES if args.transposed else DOWN_CANDIDATES,
                                  plan.decode_down, down_launches, layers.read_down, device, args.smoke, results)
                whole_layer(preset, layers, plan, (best_gate_up, best_down), device, args.smoke, results)
        with open(args.output, "w") as f:
            json.dump({"provenance": meta, "results": results}, f, indent=1, default=str)
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
