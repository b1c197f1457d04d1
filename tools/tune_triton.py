"""Measure what the triton backend's launch plan (moe_lab/backends/triton_plan.py) encodes: tile
sizes per kernel and regime, the decode/sorted crossover, the backward's tiles and save vs recompute.

    python tools/tune_triton.py --parts backward --budget-seconds 360 --output $OUT/triton_backward_tuning.json

Parts (--parts, comma-separated; each bounded by --budget-seconds in all):
  sorted     gate_up_kernel and down_kernel alone, every candidate KernelConfig with and without TMA
             tiles, on real preset shapes (triton.testing.do_bench: median, L2 flushed between runs);
             then the whole forward, replayed from a CUDA graph, with the plan's configs and the winners;
  decode     decode_gate_up_kernel / decode_down_kernel alone at T=1 and 2;
  crossover  the whole forward replayed from a CUDA graph with the decode path forced on and off;
  backward   each backward kernel alone (down_backward, the input gradient, both weight gradients)
             over candidate configs, bf16, T = 8192 then 1024 on qwen3-30b-a3b, olmoe-1b-7b,
             qwen1.5-moe-a2.7b and mixtral-8x7b, in both operand layouts: "gathered" (the kernel
             gathers dout / x rows by token) and "sorted" (it reads a copy in sorted row order,
             through TMA tiles where the config asks; the gathers making the copies are timed too).
             down_backward also "split" (the plan's split_down_backward: GEMM + streaming kernel).
             Then the whole training step (forward, and the backward of the hidden states, both
             weights and the routing weights) with the plan's configs, the winners' and the sorted
             layout's best (--recompute: each also recomputing the pre-activation): time (CUDA
             events, launched), TFLOP/s counting 3x the forward's FLOPs, peak memory, beside
             moe_lab's grouped_mm in the same process. A summary table ends the part, with the
             winners' plan fields to copy into backward_configs. --points preset:T,... measures
             those points instead of the eight.
Every row is written to the JSON (with provenance) as it is measured, so a run cut short keeps what
it has; the printed lines are the summary. Plans are values: nothing in the package is patched.

    python tools/tune_triton.py --summarize triton_backward_tuning.json   # its backward summary again, anywhere
    python tools/tune_triton.py --smoke --parts backward,decode   # CPU, triton's interpreter: checks the tool runs
(--smoke: one point, its preset scaled down to H=64, T <= 8, one candidate per kernel besides the
plan's, one timing each; the parts
that replay CUDA graphs, sorted and crossover, need a GPU.)
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import torch

import moe_lab  # first: without a GPU it switches triton to its interpreter before triton is imported
import triton
import triton.testing
from moe_lab.backends import triton_fused as tf
from moe_lab.backends.triton_backward import (
    launch_down_backward,
    launch_down_backward_split,
    launch_input_grad,
    launch_weight_grad,
    sorted_rows,
)
from moe_lab.backends.triton_launch import (
    interpreting,
    launch_decode_down,
    launch_decode_gate_up,
    launch_down,
    launch_gate_up,
    sort_pairs,
)
from moe_lab.bench.inputs import build_experts, random_hidden_states, random_routing
from moe_lab.bench.memory import measure_peak_memory
from moe_lab.bench.provenance import command_line, provenance
from moe_lab.bench.roofline import expert_flops, training_flops
from moe_lab.bench.timing import time_fn
from moe_lab.cuda_graph import CapturedStep

K = tf.KernelConfig
D = tf.DecodeConfig


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
DECODE_CANDIDATES = [D(bn, bk, w, s) for bn, bk, w, s in itertools.product([8, 16, 32, 64], [128, 256, 512], [4, 8], [1, 3])]
DECODE_POINTS = [(p, 1) for p in moe_lab.PRESETS] + [("qwen3-30b-a3b", 2)]
CROSSOVER_TOKENS = [1, 2, 4, 8, 16, 32]

# Backward: candidates per (kernel, operand layout), for both regimes (64-128 and 512-2048 rows per
# expert at T=1024 / 8192); the plan's own config is always added to its layout's list. "gathered":
# the kernel gathers dout / x rows by token itself; "sorted": it reads the copy in sorted row order
# that the plan's sorted_grad_out / sorted_hidden_states make once ([S, H], timed as "gather");
# "split" (down_backward only): the plan's split_down_backward, a GEMM of the sorted dout into a
# [S, I] buffer in the model dtype (these tiles) and a streaming activation-backward kernel, timed together.
# Weight-gradient tiles cover the weight, block_k steps through an expert's rows; tma=True loads
# every operand in sorted order (d_pre, weighted_h, the sorted copies) through TMA descriptors.
BACKWARD_CANDIDATES = {
    ("down_backward", "gathered"): [K(64, 64, 64, 4, 3), K(64, 128, 64, 4, 3, tma=True),
                                    K(128, 128, 64, 8, 4, tma=True)],
    ("down_backward", "sorted"): [K(64, 64, 64, 4, 3, tma=True), K(64, 64, 64, 4, 4, tma=True),
                                  K(128, 128, 64, 8, 4, tma=True)],
    ("down_backward", "split"): [K(128, 128, 64, 8, 4, tma=True), K(128, 128, 64, 8, 3, tma=True),
                                 K(128, 256, 64, 8, 4, tma=True), K(128, 256, 64, 8, 3, tma=True),
                                 K(64, 128, 64, 4, 4, tma=True), K(64, 64, 64, 4, 3, tma=True)],
    ("gate_up_input_grad", "sorted"): [K(128, 256, 64, 8, 4, tma=True), K(128, 256, 64, 8, 3, tma=True),
                                       K(128, 128, 64, 8, 4, tma=True)],
    ("weight_grad", "gathered"): [K(128, 128, 64, 8, 4), K(128, 128, 32, 8, 4), K(64, 128, 32, 4, 3),
                                  K(128, 128, 64, 8, 4, tma=True)],
    ("weight_grad", "sorted"): [K(128, 128, 64, 8, 4, tma=True), K(128, 128, 64, 8, 3, tma=True),
                                K(128, 256, 64, 8, 3, tma=True), K(128, 256, 64, 8, 4, tma=True),
                                K(256, 128, 64, 8, 3, tma=True), K(128, 128, 128, 8, 3, tma=True),
                                K(128, 128, 32, 8, 5, tma=True), K(128, 128, 64, 8, 2, tma=True)],
}
BACKWARD_POINTS = [(preset, T) for T in (8192, 1024)
                   for preset in ("qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "mixtral-8x7b")]


@dataclasses.dataclass
class Run:
    """What one invocation measures on: the device, the time budget, and (--smoke) how much smaller."""

    device: torch.device
    deadline: float  # time.monotonic() after which no new measurement starts
    smoke: bool = False
    recompute: bool = False  # training steps also recompute the pre-activation (save won everywhere so far)
    backward_points: list = dataclasses.field(default_factory=list)  # --points: instead of BACKWARD_POINTS

    def spent(self) -> bool:
        return time.monotonic() > self.deadline

    def layer(self, preset):
        config = moe_lab.get_preset(preset).config.replace(dtype=torch.bfloat16)
        if self.smoke:
            config = moe_lab.scale_down(config, 64)
        return build_experts(config, self.device, implementation="triton")

    def inputs(self, layer, num_tokens, seed=0):
        x = random_hidden_states(num_tokens, layer.config, self.device, seed=seed)
        index, weights, _ = random_routing(num_tokens, layer.config, self.device, seed=seed)
        return x, index, weights

    def tokens(self, num_tokens):
        return min(num_tokens, 8) if self.smoke else num_tokens

    def points(self, points):
        """--smoke: the one point with the fewest experts (the interpreter runs a program at a time)."""
        if not self.smoke:
            return points
        return [min(points, key=lambda point: moe_lab.get_preset(point[0]).config.num_experts)]

    def candidates(self, configs):
        return list(configs)[:1] if self.smoke else list(configs)

    def plan(self, layer, num_tokens, needs_grad=False, **changes):
        c = layer.config
        plan = tf.launch_plan(num_tokens, c.top_k, c.num_experts, c.hidden_size, c.intermediate_size, c.dtype,
                              interpreted=interpreting(), needs_grad=needs_grad)
        return dataclasses.replace(plan, **changes)

    def kernel_ms(self, fn):
        try:
            fn()
            if self.device.type != "cuda":
                return time_fn(fn, device=self.device, warmup=0, min_reps=1, max_reps=1).median_ms
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        except Exception as error:  # out of shared memory / registers for this tile: not a candidate
            return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"

    def step_ms(self, fn):
        if self.smoke:
            return time_fn(fn, device=self.device, warmup=0, min_reps=1, max_reps=1)
        return time_fn(fn, device=self.device, warmup=2, min_reps=5, max_seconds=0.5)

    def replay_ms(self, fn) -> float:
        """Median GPU time of `fn` replayed from a CUDA graph (its inputs already in place)."""
        if self.device.type != "cuda":
            raise SystemExit("the sorted and crossover parts replay CUDA graphs: they need a CUDA GPU")
        return time_fn(CapturedStep(fn, warmup=2).replay, device=self.device, warmup=3, min_reps=20,
                       max_seconds=0.3).median_ms

    def release(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _sweep(kind, preset, T, name, candidates, current, run, extra, results, budget: Run, variant=None):
    """Time run(config) for each candidate (and the current one, if any); record the best in a row.
    Returns (best config, its ms), or None when nothing ran."""
    timings = {}
    for config in dict.fromkeys(budget.candidates(candidates) + ([current] if current else [])):
        if budget.spent():
            break
        timings[config] = budget.kernel_ms(lambda config=config: run(config))
    ok = {c: t for c, t in timings.items() if isinstance(t, float)}
    label = f"{name}[{variant}]" if variant else name
    if not ok:
        print(kind, preset, T, label, "no candidate ran:", next(iter(timings.values()), "budget spent"), flush=True)
        return None
    best = min(ok, key=ok.get)
    row = dict(kind=kind, preset=preset, T=T, kernel=name, best=dataclasses.asdict(best), best_ms=ok[best],
               current=dataclasses.asdict(current) if current else None,
               current_ms=ok.get(current, float("nan")),
               all={str(tuple(dataclasses.astuple(c))): t for c, t in timings.items()}, **extra(ok[best]))
    if variant:
        row["variant"] = variant
    results.append(row)
    print(kind, preset, T, label, "best", dataclasses.astuple(best), f"{ok[best]:.4f} ms",
          {k: round(v) for k, v in extra(ok[best]).items()}, "current", f"{row['current_ms']:.4f}", flush=True)
    return best, ok[best]


def tune_sorted(results, run: Run):
    """Each sorted forward kernel alone over the candidates; then the whole forward, replayed from a
    CUDA graph, with the plan's configs and with the two winners (what the kernel winners are worth)."""
    for preset, T, regime in run.points(SORTED_POINTS):
        if run.spent():
            return
        layer, T = run.layer(preset), run.tokens(T)
        c = layer.config
        H, I, E, k = c.hidden_size, c.intermediate_size, c.num_experts, c.top_k
        x, index, weights = run.inputs(layer, T)
        sorted_pair, counts = sort_pairs(index, E)
        S, hit = T * k, int((counts > 0).sum())
        h = torch.randn(S, I, device=run.device, dtype=torch.bfloat16)
        plan = run.plan(layer, T)
        winners = {}
        for name, weight_bytes, flops, current, launch in (
            ("gate_up", hit * 2 * I * H * 2, 2 * S * H * 2 * I, plan.gate_up,
             lambda cfg: launch_gate_up(x, layer.gate_up_proj, None, sorted_pair, counts, k, "silu", cfg)),
            ("down", hit * I * H * 2, 2 * S * I * H, plan.down,
             lambda cfg: launch_down(h, layer.down_proj, None, weights.reshape(-1), sorted_pair, counts, cfg)),
        ):
            best = _sweep("sorted", preset, T, name, SORTED_CANDIDATES[regime], current, launch,
                          lambda ms, b=weight_bytes, f=flops: {"GBps": b / ms / 1e6, "TFLOPs": f / ms / 1e9},
                          results, run)
            if best:
                winners[name] = best[0]
        if len(winners) == 2:
            candidates = {"plan": plan, "winners": dataclasses.replace(plan, **winners)}
            results.append(_forward_row(run, layer, preset, T, x, index, weights, candidates))
        del layer
        run.release()


def _forward_row(run, layer, preset, T, x, index, weights, plans):
    """The whole triton forward replayed from a CUDA graph under each plan."""
    flops = expert_flops(T, layer.config.top_k, layer.config.hidden_size, layer.config.intermediate_size)
    row = dict(kind="forward", preset=preset, T=T)
    with torch.no_grad():
        for label, plan in plans.items():
            ms = run.replay_ms(lambda plan=plan: tf.triton_experts_forward(layer, x, index, weights, plan=plan))
            row[label] = dict(plan=dataclasses.asdict(plan), ms=ms, TFLOPs=flops / ms / 1e9)
    print("forward", preset, T, {label: f"{v['ms']:.4f} ms {v['TFLOPs']:.0f} TFLOP/s" for label, v in row.items()
                                 if isinstance(v, dict)}, flush=True)
    return row


def tune_decode(results, run: Run):
    for preset, T in run.points(DECODE_POINTS):
        if run.spent():
            return
        layer = run.layer(preset)
        c = layer.config
        H, I, k = c.hidden_size, c.intermediate_size, c.top_k
        x, index, weights = run.inputs(layer, T)
        S, flat = T * k, index.reshape(-1)
        h = torch.randn(S, I, device=run.device, dtype=torch.bfloat16)
        plan = run.plan(layer, T)
        for name, current, weight_bytes, launch in (
            ("decode_gate_up", plan.decode_gate_up, S * 2 * I * H * 2,
             lambda cfg: launch_decode_gate_up(x, layer.gate_up_proj, None, flat, k, "silu", cfg)),
            ("decode_down", plan.decode_down, S * I * H * 2,
             lambda cfg: launch_decode_down(h, layer.down_proj, None, flat, weights.reshape(-1), k, cfg)),
        ):
            _sweep("decode", preset, T, name, DECODE_CANDIDATES, current, launch,
                   lambda ms, b=weight_bytes: {"GBps": b / ms / 1e6}, results, run)
        del layer
        run.release()


def crossover(results, run: Run):
    for preset in moe_lab.PRESETS:
        layer = run.layer(preset)
        for T in CROSSOVER_TOKENS:
            if run.spent():
                return
            x, index, weights = run.inputs(layer, T)
            plan = run.plan(layer, T)
            row = dict(kind="crossover", preset=preset, T=T, default_decode=plan.decode)
            with torch.no_grad():
                for label, decode in (("decode_ms", True), ("sorted_ms", False)):
                    forced = dataclasses.replace(plan, decode=decode)
                    row[label] = run.replay_ms(lambda: tf.triton_experts_forward(layer, x, index, weights, plan=forced))
            results.append(row)
            print("crossover", preset, T, f"decode {row['decode_ms']:.4f} sorted {row['sorted_ms']:.4f}",
                  "default:", "decode" if row["default_decode"] else "sorted", flush=True)
        del layer
        run.release()


def tune_backward(results, run: Run):
    """Each backward kernel alone over its candidates, in both operand layouts; the gathers of dout
    and x into sorted order; then whole training steps with the plan's configs, the winners' and the
    sorted layout's best, beside grouped_mm. A summary table at the end."""
    for preset, T in run.points(run.backward_points or BACKWARD_POINTS):
        if run.spent():
            print("backward: budget spent before", preset, T, flush=True)
            break
        layer, T = run.layer(preset), run.tokens(T)
        c = layer.config
        H, I, E, k = c.hidden_size, c.intermediate_size, c.num_experts, c.top_k
        x, index, weights = run.inputs(layer, T)
        routing = weights.reshape(-1)
        S = T * k
        plan = run.plan(layer, T, needs_grad=True)
        sorted_pair, counts = sort_pairs(index, E)
        _, pre = launch_gate_up(x, layer.gate_up_proj, None, sorted_pair, counts, k, "silu", plan.gate_up,
                                save_pre=True)
        grad_out = random_hidden_states(T, c, run.device, seed=1)
        grad_out_sorted, x_sorted = sorted_rows(grad_out, sorted_pair, k), sorted_rows(x, sorted_pair, k)  # [S, H]
        d_pre, weighted_h, _ = launch_down_backward(grad_out, layer.down_proj, routing, pre, sorted_pair, counts, k,
                                                    "silu", plan.down_backward)
        gather_ms = {}
        for name, rows in (("grad_out", grad_out), ("hidden_states", x)):
            gather_ms[name] = run.kernel_ms(lambda rows=rows: sorted_rows(rows, sorted_pair, k))
            results.append(dict(kind="backward_gather", preset=preset, T=T, operand=name, ms=gather_ms[name],
                                GBps=2 * S * H * x.element_size() / gather_ms[name] / 1e6
                                if isinstance(gather_ms[name], float) else None))
        print("backward_gather", preset, T, {name: f"{ms:.4f} ms" if isinstance(ms, float) else ms
                                            for name, ms in gather_ms.items()}, flush=True)

        def down_backward(cfg, sorted_dout=None):
            return launch_down_backward(grad_out, layer.down_proj, routing, pre, sorted_pair, counts, k, "silu", cfg,
                                        grad_out_sorted=sorted_dout)

        def weight_grad(left, right, like, left_by_token, right_by_token):
            return lambda cfg: launch_weight_grad(left, right, like, None, None, sorted_pair, counts, k,
                                                  left_by_token=left_by_token, right_by_token=right_by_token,
                                                  config=cfg)

        gate_up_flops, down_flops = 2 * S * 2 * I * H, 2 * S * H * I
        kernels = (  # (kernel, operand layout, FLOPs, launch)
            ("down_backward", "gathered", down_flops, down_backward),
            ("down_backward", "sorted", down_flops, lambda cfg: down_backward(cfg, grad_out_sorted)),
            ("down_backward", "split", down_flops,
             lambda cfg: launch_down_backward_split(grad_out_sorted, layer.down_proj, routing, pre, sorted_pair,
                                                    counts, k, "silu", cfg)),
            ("gate_up_input_grad", "sorted", gate_up_flops,
             lambda cfg: launch_input_grad(d_pre, layer.gate_up_proj, index.reshape(-1), sorted_pair, counts, T, k,
                                           cfg)),
            ("gate_up_weight_grad", "gathered", gate_up_flops,
             weight_grad(d_pre, x, layer.gate_up_proj, False, True)),
            ("gate_up_weight_grad", "sorted", gate_up_flops,
             weight_grad(d_pre, x_sorted, layer.gate_up_proj, False, False)),
            ("down_weight_grad", "gathered", down_flops,
             weight_grad(grad_out, weighted_h, layer.down_proj, True, False)),
            ("down_weight_grad", "sorted", down_flops,
             weight_grad(grad_out_sorted, weighted_h, layer.down_proj, False, False)),
        )
        best = {}
        for name, layout, flops, launch in kernels:
            plan_layout = _plan_layout(plan, name)
            candidates = BACKWARD_CANDIDATES[("weight_grad" if name.endswith("weight_grad") else name, layout)]
            found = _sweep("backward", preset, T, name, candidates,
                           getattr(plan, name) if layout == plan_layout else None, launch,
                           lambda ms, f=flops: {"TFLOPs": f / ms / 1e9}, results, run, variant=layout)
            if found:
                best[name, layout] = found
        del d_pre, weighted_h, pre, grad_out_sorted, x_sorted
        plans = {"plan": plan, **_backward_plans(plan, best, gather_ms)}
        results.append(_training_row(run, layer, preset, T, x, index, weights, grad_out, plans))
        del layer
        run.release()
    _print_backward_summary(results)


def _plan_layout(plan, kernel: str) -> str:
    """Which operand layout the plan gives a backward kernel."""
    if kernel == "down_backward" and plan.split_down_backward:
        return "split"
    if kernel in ("down_backward", "down_weight_grad"):
        return "sorted" if plan.sorted_grad_out else "gathered"
    if kernel == "gate_up_weight_grad":
        return "sorted" if plan.sorted_hidden_states else "gathered"
    return "sorted"


def _backward_plans(plan, best, gather_ms) -> dict:
    """From the kernel sweeps: "winners" (each kernel's fastest config and layout, each gather taken
    where the kernels reading it gain more than it costs) and "sorted" (both gathers, the sorted
    layouts' fastest configs, down_backward fused or split, whichever was faster). Only what was
    measured; a layout without a result keeps the plan's config."""
    def ms(kernel, layout):
        return best[kernel, layout][1] if (kernel, layout) in best else float("inf")

    def config(kernel, layout):
        return best[kernel, layout][0] if (kernel, layout) in best else getattr(plan, kernel)

    def gather(operand):
        return gather_ms[operand] if isinstance(gather_ms.get(operand), float) else float("inf")

    split = ms("down_backward", "split") < ms("down_backward", "sorted")
    sorted_down_backward = "split" if split else "sorted"
    sort_dout = (ms("down_backward", sorted_down_backward) + ms("down_weight_grad", "sorted") + gather("grad_out")
                 < ms("down_backward", "gathered") + ms("down_weight_grad", "gathered"))
    sort_x = ms("gate_up_weight_grad", "sorted") + gather("hidden_states") < ms("gate_up_weight_grad", "gathered")
    winners = dict(down_backward=config("down_backward", sorted_down_backward if sort_dout else "gathered"),
                   down_weight_grad=config("down_weight_grad", "sorted" if sort_dout else "gathered"),
                   gate_up_weight_grad=config("gate_up_weight_grad", "sorted" if sort_x else "gathered"),
                   gate_up_input_grad=config("gate_up_input_grad", "sorted"))
    sorted_configs = dict(down_backward=config("down_backward", sorted_down_backward),
                          **{kn: config(kn, "sorted") for kn in ("down_weight_grad", "gate_up_weight_grad",
                                                                  "gate_up_input_grad")})
    plans = {"winners": dataclasses.replace(plan, sorted_grad_out=sort_dout, sorted_hidden_states=sort_x,
                                            split_down_backward=sort_dout and split, **winners),
             "sorted": dataclasses.replace(plan, sorted_grad_out=True, sorted_hidden_states=True,
                                           split_down_backward=split, **sorted_configs)}
    if plans["sorted"] == plans["winners"]:
        del plans["sorted"]  # the same plan: measured once, as winners
    return plans


def _training_row(run, layer, preset, T, x, index, weights, grad_out, plans):
    """Forward + backward (hidden states, weights, routing weights) for each plan, saving the
    pre-activation (and recomputing it with --recompute), and grouped_mm: median ms, TFLOP/s (3x
    forward FLOPs), peak bytes."""
    c = layer.config
    flops = training_flops(T, c.top_k, c.hidden_size, c.intermediate_size)
    x, weights = x.detach().requires_grad_(True), weights.detach().requires_grad_(True)
    forwards = {"grouped_mm": lambda: moe_lab.experts_forward("grouped_mm", layer, x, index, weights)}
    for label, plan in plans.items():
        for save in (True, False) if run.recompute else (True,):
            chosen = dataclasses.replace(plan, save_pre_activation=save)
            forwards[f"{label}_{'save' if save else 'recompute'}"] = (
                lambda chosen=chosen: tf.triton_experts_forward(layer, x, index, weights, plan=chosen))
    row = dict(kind="training_step", preset=preset, T=T, plans={k: dataclasses.asdict(v) for k, v in plans.items()})
    for label, forward in forwards.items():
        if run.spent():
            row[label] = "budget spent"
            continue

        def step(forward=forward):
            layer.zero_grad(set_to_none=True)
            x.grad = weights.grad = None
            forward().backward(grad_out)

        try:
            timing = run.step_ms(step)
            peak = measure_peak_memory(step, run.device, warmup=0).peak_bytes
            row[label] = dict(ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                              TFLOPs=flops / timing.median_ms / 1e9, peak_bytes=peak)
        except Exception as error:  # out of memory, or a variant that does not compile here: record it, go on
            row[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
            run.release()
    print("training_step", preset, T, {label: (f"{v['ms']:.3f} ms {v['TFLOPs']:.0f} TFLOP/s "
                                               f"{v['peak_bytes'] / 2**30:.2f} GiB" if isinstance(v, dict) else v)
                                       for label, v in row.items() if label in forwards}, flush=True)
    return row


def _print_backward_summary(results):
    """Per point: each kernel's plan / best gathered / best sorted time (TFLOP/s), the gathers, the
    training steps beside grouped_mm, and the winners' plan fields to copy into backward_configs."""
    points = dict.fromkeys((row["preset"], row["T"]) for row in results
                           if row["kind"] in ("backward", "training_step"))
    print("\n=== backward summary (ms, TFLOP/s in parentheses; kernels alone, L2 flushed; steps launched) ===")
    for preset, T in points:
        rows = [row for row in results if row.get("preset") == preset and row.get("T") == T]
        print(f"\n{preset} T={T}")
        print(f"  {'kernel':<22}{'plan':>16}{'best gathered':>18}{'best sorted':>18}{'best split':>18}  best config")
        for kernel in ("down_backward", "gate_up_input_grad", "gate_up_weight_grad", "down_weight_grad"):
            sweeps = {_layout_of(row): row for row in rows if row["kind"] == "backward" and row["kernel"] == kernel}
            if not sweeps:
                continue
            current = next((row for row in sweeps.values() if row["current"]), None)
            plan_ms = current["current_ms"] if current else float("nan")
            flops = next(iter(sweeps.values()))["TFLOPs"] * next(iter(sweeps.values()))["best_ms"] * 1e9
            cells = [_ms_cell(plan_ms, flops)] + [_ms_cell(sweeps[v]["best_ms"], flops) if v in sweeps else "-"
                                                  for v in ("gathered", "sorted", "split")]
            fastest = min(sweeps.values(), key=lambda row: row["best_ms"])
            print(f"  {kernel:<22}{cells[0]:>16}{cells[1]:>18}{cells[2]:>18}{cells[3]:>18}  "
                  f"{_layout_of(fastest)}: {_config_text(fastest['best'])}")
        gathers = {row["operand"]: row["ms"] for row in rows if row["kind"] == "backward_gather"}
        if gathers:
            print("  gather into sorted order: " + ", ".join(
                f"{name} {ms:.4f} ms" if isinstance(ms, float) else f"{name} {ms}" for name, ms in gathers.items()))
        for step in (row for row in rows if row["kind"] == "training_step"):
            print("  training step: " + " | ".join(
                f"{label} {v['ms']:.3f} ms ({v['TFLOPs']:.0f}) {v['peak_bytes'] / 2**30:.2f} GiB"
                if isinstance(v, dict) else f"{label} {v}" for label, v in step.items() if label not in
                ("kind", "preset", "T", "plans")))
            winners = step["plans"].get("winners")
            if winners:
                fields = ("sorted_grad_out", "sorted_hidden_states", "split_down_backward", "down_backward",
                          "gate_up_input_grad", "gate_up_weight_grad", "down_weight_grad")
                values = {name: winners.get(name) for name in fields}  # None: a field the run's plan did not have
                print("  winners: " + ", ".join(f"{name}={_config_text(value) if isinstance(value, dict) else value}"
                                                for name, value in values.items()))


def _layout_of(row) -> str:
    """A sweep row's operand layout; rows written before the layouts existed are the plan's of then."""
    return row.get("variant") or ("sorted" if row["kernel"] == "gate_up_input_grad" else "gathered")


def _ms_cell(ms, flops):
    return f"{ms:.3f} ({flops / ms / 1e9:.0f})" if ms == ms else "-"


def _config_text(config: dict) -> str:
    """KernelConfig(...) as backward_configs would write it."""
    text = ", ".join(str(config[name]) for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
    return f"K({text}{', tma=True' if config['tma'] else ''})"


class _SavedResults(list):
    """Rewrites the JSON after every row, so a run cut short by its time limit keeps what it measured."""

    def __init__(self, path, device):
        super().__init__()
        self.path = path
        self.provenance = {**provenance(device), "triton_version": triton.__version__,
                           "command_line": command_line()}  # once: it asks git and the driver

    def append(self, row):
        super().append(row)
        with open(self.path, "w") as f:
            json.dump({"provenance": self.provenance, "results": list(self)}, f, indent=1, default=str)


PARTS = {"decode": tune_decode, "crossover": crossover, "sorted": tune_sorted, "backward": tune_backward}


def _points(text: str) -> list[tuple[str, int]]:
    """"preset:T,preset:T" -> [(preset, T)], with the presets checked against moe_lab's."""
    points = []
    for item in filter(None, text.split(",")):
        preset, _, tokens = item.partition(":")
        if preset not in moe_lab.PRESETS or not tokens.isdigit() or int(tokens) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not preset:T with a preset of {sorted(moe_lab.PRESETS)} "
                                             "and T a positive number of tokens")
        points.append((preset, int(tokens)))
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="triton_tuning.json")
    parser.add_argument("--parts", default="decode,crossover,sorted", help=f"comma-separated, of {sorted(PARTS)}")
    parser.add_argument("--budget-seconds", type=float, default=420.0,
                        help="no new measurement starts after this long (what was measured is kept)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on this machine's device, to check the tool")
    parser.add_argument("--recompute", action="store_true",
                        help="backward: also time each training-step plan recomputing the pre-activation")
    parser.add_argument("--summarize", metavar="JSON",
                        help="print the backward summary of a JSON this tool wrote, and exit (no GPU needed)")
    parser.add_argument("--points", default="", type=_points,
                        help="backward: comma-separated preset:T to measure instead of the default eight, "
                             "e.g. qwen3-30b-a3b:8192,mixtral-8x7b:8192")
    args = parser.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            _print_backward_summary(json.load(f)["results"])
        return
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {sorted(PARTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("measuring needs a CUDA GPU; --smoke runs the tool on tiny shapes here")
    run = Run(device, time.monotonic() + args.budget_seconds, smoke=args.smoke, recompute=args.recompute,
              backward_points=args.points)
    results = _SavedResults(args.output, device)
    for part in parts:
        PARTS[part](results, run)


if __name__ == "__main__":
    main()
