"""Measure what `kernel_configs`, `decode_configs` and `uses_decode_path` in
moe_lab/backends/triton_fused.py encode: tile sizes per regime and the decode/sorted crossover.

    python tools/tune_triton.py --output tuning.json     # on a CUDA GPU; a few minutes

1. sorted kernels: gate_up_kernel and down_kernel alone, every candidate KernelConfig with and
   without TMA tiles, on real preset shapes and token counts (triton.testing.do_bench: median, L2
   flushed between runs); then the whole forward, replayed from a CUDA graph, with today's configs
   and with the two winners;
2. decode kernels: the same for decode_gate_up_kernel / decode_down_kernel at T=1 and 2;
3. crossover: the whole triton forward replayed from a CUDA graph with the decode path forced on
   and off, T = 1..32, per preset.
The JSON (with provenance) is the evidence; the printed lines are the summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics

import torch
import triton.testing

import moe_lab
from moe_lab.backends import triton_fused as tf
from moe_lab.backends import triton_kernels as tk
from moe_lab.bench.provenance import provenance
from moe_lab.cuda_graph import GraphedExperts

K = tf.KernelConfig


def _with_tma(configs):
    """Each candidate as it is and with its weight (and down's h) tiles through TMA descriptors."""
    return [dataclasses.replace(c, tma=tma) for c in configs for tma in (False, True)]


SORTED_CANDIDATES = {
    "small": _with_tma([K(16, bn, bk, 4, s) for bn, bk, s in itertools.product([64, 128], [128, 256], [3, 4])]
                       + [K(32, 64, 128, 4, 3), K(32, 128, 128, 4, 3), K(32, 64, 128, 4, 4), K(32, 128, 64, 4, 4),
                          K(64, 64, 64, 4, 4)]),
    "medium": _with_tma([K(bm, bn, 64, 4, s) for bm, bn, s in itertools.product([32, 64], [64, 128], [3, 4])]
                        + [K(128, 128, 64, 8, 3)]),
    "large": _with_tma([K(128, 128, 64, 8, 3), K(128, 128, 64, 8, 4), K(128, 128, 64, 8, 2), K(128, 256, 64, 8, 3),
                        K(128, 256, 64, 8, 4), K(128, 64, 64, 4, 4), K(128, 64, 64, 8, 4), K(128, 64, 128, 8, 3),
                        K(128, 128, 128, 8, 3), K(128, 128, 32, 8, 5), K(64, 256, 64, 4, 3), K(64, 128, 64, 4, 4),
                        K(128, 128, 64, 8, 3, 4), K(128, 128, 64, 8, 3, 16)]),
}
SORTED_POINTS = [("qwen3-30b-a3b", 8192, "large"), ("olmoe-1b-7b", 8192, "large"), ("qwen1.5-moe-a2.7b", 8192, "large"),
                 ("olmoe-1b-7b", 128, "small"), ("qwen3-30b-a3b", 128, "small"), ("mixtral-8x7b", 8192, "large"),
                 ("qwen3-30b-a3b", 1024, "medium"), ("deepseek-v3", 8192, "large")]
D = tf.DecodeConfig
DECODE_CANDIDATES = [D(bn, bk, w, s) for bn, bk, w, s in itertools.product([8, 16, 32, 64], [128, 256, 512], [4, 8], [1, 3])]
DECODE_POINTS = [(p, 1) for p in moe_lab.PRESETS] + [("qwen3-30b-a3b", 2)]
CROSSOVER_TOKENS = [1, 2, 4, 8, 16, 32]


def _bench(fn):
    try:
        fn()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as error:  # out of shared memory / registers for this tile: not a candidate
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"


def _layer(preset):
    config = moe_lab.get_preset(preset).config.replace(dtype=torch.bfloat16)
    torch.manual_seed(0)
    return moe_lab.Experts(config).cuda()


def _inputs(layer, T, seed=0):
    c = layer.config
    x = torch.randn(T, c.hidden_size, device="cuda", dtype=torch.bfloat16)
    index, weights = moe_lab.synthetic_routing(T, c.num_experts, c.top_k, seed=seed, device="cuda")
    return x, index, weights


def _best(kind, preset, T, name, timings, current, extra):
    ok = {c: t for c, t in timings.items() if isinstance(t, float)}
    if not ok:
        print(kind, preset, T, name, "no candidate ran:", next(iter(timings.values())), flush=True)
        return None
    best = min(ok, key=ok.get)
    row = dict(kind=kind, preset=preset, T=T, kernel=name, best=best.__dict__, best_ms=ok[best],
               current=current.__dict__, current_ms=ok.get(current, float("nan")),
               all={str(tuple(c.__dict__.values())): t for c, t in timings.items()}, **extra(ok[best]))
    print(kind, preset, T, name, "best", tuple(best.__dict__.values()), f"{ok[best]:.4f} ms",
          {k: round(v) for k, v in extra(ok[best]).items()}, "current", f"{row['current_ms']:.4f}", flush=True)
    return row


def tune_sorted(results):
    """Each sorted kernel alone over the candidates; then the whole forward, replayed from a CUDA
    graph, with today's configs and with the two winners (what the kernel winners are worth)."""
    layers = {}
    for preset, T, regime in SORTED_POINTS:
        layer = layers.setdefault(preset, _layer(preset))
        c = layer.config
        H, I, E, k = c.hidden_size, c.intermediate_size, c.num_experts, c.top_k
        x, index, weights = _inputs(layer, T)
        sorted_pair, counts = tf.sort_pairs(index, E)  # what the backend sorts with
        S, hit = T * k, int((counts > 0).sum())
        expert_weights = tf.expert_weights(layer)
        h = torch.randn(S, I, device="cuda", dtype=torch.bfloat16)
        current = tf.kernel_configs(S / min(E, S), False, wide_output=H >= 4096)
        winners = []
        for name, weight_bytes, flops, now in (
            ("gate_up", hit * 2 * I * H * 2, 2 * S * H * 2 * I, current[0]),
            ("down", hit * I * H * 2, 2 * S * I * H, current[1]),
        ):
            def run(cfg, name=name):
                if name == "gate_up":
                    tf.launch_gate_up(x, expert_weights, sorted_pair, counts, k, "silu", cfg)
                else:
                    tf.launch_down(h, expert_weights, weights.reshape(-1), sorted_pair, counts, cfg)
            candidates = SORTED_CANDIDATES[regime] + [now]
            timings = {cfg: _bench(lambda cfg=cfg: run(cfg)) for cfg in dict.fromkeys(candidates)}
            row = _best("sorted", preset, T, name, timings, now,
                        lambda ms, b=weight_bytes, f=flops: {"GBps": b / ms / 1e6, "TFLOPs": f / ms / 1e9})
            if row:
                results.append(row)
                winners.append(K(**row["best"]))
        if len(winners) == 2:
            results.append(_forward_with(layer, preset, T, x, index, weights, {"current": current,
                                                                               "winners": tuple(winners)}))
    layers.clear()
    torch.cuda.empty_cache()


def _forward_with(layer, preset, T, x, index, weights, config_pairs):
    """The whole triton forward replayed from a CUDA graph under each (gate_up, down) config pair."""
    original = tf.kernel_configs
    c = layer.config
    flops = 2 * T * c.top_k * 3 * c.hidden_size * c.intermediate_size
    row = dict(kind="forward", preset=preset, T=T)
    for label, pair in config_pairs.items():
        tf.kernel_configs = lambda *args, pair=pair, **kwargs: pair
        try:
            ms = _graph_ms(GraphedExperts(layer, "triton"), x, index, weights)
        finally:
            tf.kernel_configs = original
        row[label] = dict(configs=[cfg.__dict__ for cfg in pair], ms=ms, TFLOPs=flops / ms / 1e9)
    print("forward", preset, T, {label: f"{v['ms']:.4f} ms {v['TFLOPs']:.0f} TFLOP/s" for label, v in row.items()
                                 if isinstance(v, dict)}, flush=True)
    return row


def tune_decode(results):
    for preset, T in DECODE_POINTS:
        layer = _layer(preset)
        c = layer.config
        H, I, E, k = c.hidden_size, c.intermediate_size, c.num_experts, c.top_k
        x, index, weights = _inputs(layer, T)
        S = T * k
        flat = index.reshape(-1)
        h = torch.randn(S, I, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        current_up, current_down = tf.decode_configs(False)
        for name, current, weight_bytes in (("decode_gate_up", current_up, S * 2 * I * H * 2),
                                            ("decode_down", current_down, S * I * H * 2)):
            def run(cfg, name=name):
                if name == "decode_gate_up":
                    tk.decode_gate_up_kernel[(S * -(-I // cfg.block_n),)](
                        x, layer.gate_up_proj, None, h, flat, k, I, H, x.stride(0), x.stride(1),
                        *layer.gate_up_proj.stride(), 0, 0, h.stride(0), h.stride(1), ACTIVATION="silu",
                        HAS_BIAS=False, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages)
                else:
                    tk.decode_down_kernel[(T * -(-H // cfg.block_n),)](
                        h, layer.down_proj, None, flat, weights.reshape(-1), out, H, I, h.stride(0), h.stride(1),
                        *layer.down_proj.stride(), 0, 0, out.stride(0), out.stride(1), TOP_K=k, HAS_BIAS=False,
                        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            timings = {cfg: _bench(lambda cfg=cfg: run(cfg)) for cfg in dict.fromkeys(DECODE_CANDIDATES + [current])}
            row = _best("decode", preset, T, name, timings, current,
                        lambda ms, b=weight_bytes: {"GBps": b / ms / 1e6})
            if row:
                results.append(row)
        del layer
        torch.cuda.empty_cache()


def _graph_ms(graphed, x, index, weights, reps=50):
    for _ in range(3):
        graphed(x, index, weights)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphed(x, index, weights)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def crossover(results):
    original = tf.uses_decode_path
    for preset in moe_lab.PRESETS:
        layer = _layer(preset)
        for T in CROSSOVER_TOKENS:
            x, index, weights = _inputs(layer, T)
            row = dict(kind="crossover", preset=preset, T=T, default_decode=original(T, layer.config.top_k,
                                                                                   layer.config.num_experts))
            for label, forced in (("decode_ms", True), ("sorted_ms", False)):
                tf.uses_decode_path = lambda *args, forced=forced: forced
                try:
                    row[label] = _graph_ms(GraphedExperts(layer, "triton"), x, index, weights)
                finally:
                    tf.uses_decode_path = original
            results.append(row)
            print("crossover", preset, T, f"decode {row['decode_ms']:.4f} sorted {row['sorted_ms']:.4f}",
                  "default:", "decode" if row["default_decode"] else "sorted", flush=True)
        del layer
        torch.cuda.empty_cache()


class _SavedResults(list):
    """Rewrites the JSON after every row, so a run cut short by its time limit keeps what it measured."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.provenance = provenance("cuda")  # once: it asks git and the driver

    def append(self, row):
        super().append(row)
        with open(self.path, "w") as f:
            json.dump({"provenance": self.provenance, "results": list(self)}, f, indent=1, default=str)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="triton_tuning.json")
    parser.add_argument("--parts", default="decode,crossover,sorted")
    args = parser.parse_args()
    results = _SavedResults(args.output)
    for part in args.parts.split(","):
        {"decode": tune_decode, "crossover": crossover, "sorted": tune_sorted}[part](results)
