"""The triton tuning tools run against the package as it is: tools/tune_triton.py --smoke on this
machine (tiny shapes; through triton's interpreter without a GPU) writes the rows the lead's GPU run
will write, with plans passed as values."""
import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.backends.triton_plan import KernelConfig, launch_plan
from moe_lab.reference import max_abs_difference

from triton_device import triton_device_or_skip

DEVICE = triton_device_or_skip()

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tune_triton_backward_smoke_run_writes_every_row(tmp_path, capsys):
    output = tmp_path / "tuning.json"
    _tool("tune_triton").main(["--smoke", "--parts", "backward", "--output", str(output)])
    written = json.loads(output.read_text())
    assert written["provenance"]["triton_version"]
    rows = written["results"]
    kernels = [(row["kernel"], row["variant"]) for row in rows if row["kind"] == "backward"]
    assert kernels == [("down_backward", "gathered"), ("down_backward", "sorted"), ("down_backward", "split"),
                       ("gate_up_input_grad", "sorted"),
                       ("gate_up_weight_grad", "gathered"), ("gate_up_weight_grad", "sorted"),
                       ("down_weight_grad", "gathered"), ("down_weight_grad", "sorted")]
    assert {row["operand"] for row in rows if row["kind"] == "backward_gather"} == {"grad_out", "hidden_states"}
    (step,) = [row for row in rows if row["kind"] == "training_step"]
    labels = ["grouped_mm", "plan_save", "winners_save"] + (["sorted_save"] if "sorted" in step["plans"] else [])
    for label in labels:
        # >= 0: on CPU the profiler's allocation count (moe_lab.bench.memory) now and then reads 0
        assert step[label]["ms"] > 0 and step[label]["peak_bytes"] >= 0, label
    assert step["plans"]["plan"]["save_pre_activation"] is True
    sorted_plan = step["plans"].get("sorted", step["plans"]["winners"])  # absent: the winners are that plan
    assert sorted_plan["sorted_grad_out"] and sorted_plan["sorted_hidden_states"]
    # The summary again from the JSON alone, as the lead reads a GPU run's file
    _tool("tune_triton").main(["--summarize", str(output)])
    summary = capsys.readouterr().out.split("=== backward summary")[-1]
    assert "down_backward" in summary and "training step: grouped_mm" in summary
    assert "winners: sorted_grad_out=" in summary


def test_backward_winners_take_a_gather_only_where_the_kernels_gain_more():
    tool = _tool("tune_triton")
    plan = launch_plan(8192, 8, 128, 2048, 768, torch.bfloat16, interpreted=False, needs_grad=True)
    K = KernelConfig
    best = {("down_backward", "gathered"): (K(64, 64, 64, 4, 3), 1.0),
            ("down_backward", "sorted"): (K(64, 64, 64, 4, 4, tma=True), 0.8),
            ("down_backward", "split"): (K(128, 128, 64, 8, 4, tma=True), 0.6),
            ("down_weight_grad", "gathered"): (K(128, 128, 64, 8, 4), 0.8),
            ("down_weight_grad", "sorted"): (K(128, 256, 64, 8, 3, tma=True), 0.5),
            ("gate_up_weight_grad", "gathered"): (K(128, 128, 64, 8, 3), 1.6),
            ("gate_up_weight_grad", "sorted"): (K(128, 128, 64, 8, 4, tma=True), 1.55),
            ("gate_up_input_grad", "sorted"): (K(128, 256, 64, 8, 3, tma=True), 0.7)}
    plans = tool._backward_plans(plan, best, {"grad_out": 0.1, "hidden_states": 0.1})
    winners, sorted_plan = plans["winners"], plans["sorted"]
    # dout: 0.6 (split) + 0.5 + 0.1 (its gather) < 1.0 + 0.8; x: 1.55 + 0.1 > 1.6
    assert winners.sorted_grad_out and winners.split_down_backward and not winners.sorted_hidden_states
    assert winners.down_backward == best["down_backward", "split"][0]
    assert winners.down_weight_grad == best["down_weight_grad", "sorted"][0]
    assert winners.gate_up_weight_grad == best["gate_up_weight_grad", "gathered"][0]
    assert winners.gate_up_input_grad == best["gate_up_input_grad", "sorted"][0]
    assert sorted_plan.sorted_hidden_states and sorted_plan.gate_up_weight_grad == best["gate_up_weight_grad",
                                                                                        "sorted"][0]
    # A gather that did not run (an error string) is never taken
    plans = tool._backward_plans(plan, best, {"grad_out": "OutOfMemoryError", "hidden_states": 0.0})
    assert not plans["winners"].sorted_grad_out and plans["winners"].sorted_hidden_states
    assert not plans["winners"].split_down_backward  # the split reads the sorted dout: not without it
    assert plans["winners"].down_backward == best["down_backward", "gathered"][0]


def test_sort_pairs_ab_times_every_sort_that_fits():
    tool = _tool("sort_pairs_ab")
    assert tool.methods_for(2048, 128) == ["one_program", "blocks", "torch"]
    assert tool.methods_for(65536, 128) == ["blocks", "torch"]  # past one program's bitonic stages
    index, _ = moe_lab.synthetic_routing(40, 16, 4, seed=1, device=DEVICE)
    results = [tool.sort_with(method)(index, 16) for method in tool.methods_for(160, 16)]
    for sorted_pair, counts in results[1:]:
        assert torch.equal(sorted_pair, results[0][0]) and torch.equal(counts, results[0][1])


def test_tune_triton_points_name_presets_and_token_counts():
    tool = _tool("tune_triton")
    assert tool._points("qwen3-30b-a3b:8192,mixtral-8x7b:1024") == [("qwen3-30b-a3b", 8192), ("mixtral-8x7b", 1024)]
    for wrong in ("qwen3:8192", "mixtral-8x7b", "mixtral-8x7b:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="preset:T"):
            tool._points(wrong)


def test_profile_training_step_compares_against_the_backend_without_its_host_levers():
    from moe_lab.backends import triton_autograd, triton_plan
    from moe_lab.bench.inputs import build_experts, random_hidden_states, random_routing

    tool = _tool("profile_training_step")
    plan_args = (4096, 8, 64, 64, 32, torch.float32)
    assert triton_plan.launch_plan(*plan_args, interpreted=True, needs_grad=True).sort == "blocks"
    config = moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2, dtype=torch.float32)
    index, weights, _ = random_routing(6, config, torch.device(DEVICE))
    hidden, layer = random_hidden_states(6, config, torch.device(DEVICE)), build_experts(config, torch.device(DEVICE))
    layer.set_experts_implementation("triton")
    after = tool.training_step(layer, hidden, index, weights, seed=0)[0]()
    with tool.without_host_levers():
        assert triton_plan.launch_plan(*plan_args, interpreted=True, needs_grad=True).sort == "torch"
        before = tool.training_step(layer, hidden, index, weights, seed=0)[0]()  # through the custom op's dispatcher
        assert triton_autograd._call_differentiable(triton_autograd.sort_pairs_op, index.reshape(-1), 4,
                                                    "torch")[1].sum() == 12
    assert triton_plan.launch_plan(*plan_args, interpreted=True, needs_grad=True).sort == "blocks"  # restored
    for got, expected in zip(after, before):
        torch.testing.assert_close(got, expected)


def test_profile_training_step_finds_where_the_gpu_waited_for_the_host():
    idle_gaps = _tool("profile_training_step").idle_gaps
    # two steps starting at 0 and 1000 us; step 1: kernels at 100-200, 250-300 ("b" waits 50 us);
    # step 2: 1020-1100, 1100-1400 (back to back), 1500-1510 ("c" waits 100 us)
    kernels = [(100, 200, "a"), (250, 300, "b"), (1020, 1100, "a"), (1100, 1400, "b"), (1500, 1510, "c")]
    idle = idle_gaps(kernels, [0, 1000])
    assert idle["lead_ms"] == pytest.approx((0.1 + 0.02) / 2)  # median of two leads
    assert idle["gaps_ms"] == pytest.approx((0.05 + 0.1) / 2)
    assert idle["gaps"][0] == (" 2: c", pytest.approx(0.1))
    assert dict(idle["gaps"])[" 1: b"] == pytest.approx(0.025)  # 50 us and 0 us: median 25 us
    # a kernel overlapping a longer one (another stream) leaves no gap: idle is measured from the latest end
    overlapped = idle_gaps([(0, 500, "long"), (10, 20, "short"), (400, 450, "x"), (520, 530, "y")], [0])
    assert dict(overlapped["gaps"]) == {" 1: short": 0.0, " 2: x": 0.0, " 3: y": pytest.approx(0.02)}
    assert idle_gaps([], [0]) == {}


def test_the_persistent_weight_grad_experiment_computes_what_the_package_kernel_does():
    """tools/weight_grad_persistent_ab.py's kernel (a lever tried and not kept) against launch_weight_grad, through the
    interpreter at tiny sizes: experts with many rows, none, and a partial last block of rows."""
    from moe_lab.backends.triton_backward import launch_weight_grad
    from moe_lab.backends.triton_launch import sort_pairs
    from moe_lab.backends.triton_plan import KernelConfig

    tool = _tool("weight_grad_persistent_ab")
    num_experts, top_k, tokens = 5, 2, 37
    generator = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    index[:, 0] = 1  # one expert gets every token; others few or none
    index[index == 4] = 3
    sorted_pair, counts = sort_pairs(index.to(DEVICE), num_experts)
    left = torch.randn(tokens * top_k, 64, generator=generator).to(DEVICE)
    right = torch.randn(tokens * top_k, 32, generator=generator).to(DEVICE)
    like = torch.empty(num_experts, 64, 32, device=DEVICE)
    expected = launch_weight_grad(left, right, like, None, None, sorted_pair, counts, top_k, left_by_token=False,
                                  right_by_token=False, config=KernelConfig(16, 16, 16, 4, 2, 8, True))[0]
    assert counts[4] == 0 and expected[4].abs().max() == 0
    for flatten in (False, True):
        got = tool.persistent(left, right, like, counts, 16, 32, 16, 4, 2, 7, flatten, False)
        torch.testing.assert_close(got, expected)


def test_the_training_plan_ab_reads_variants_as_plan_flags():
    """tools/training_plan_ab.py (GPU only) builds each variant with dataclasses.replace from NAME=FLAG[:false]."""
    tool = _tool("training_plan_ab")
    assert {"save_pre_activation", "sorted_grad_out", "split_down_backward"} <= set(tool.PLAN_FLAGS)
    assert tool.parse_variant("gathered=sorted_grad_out:false,split_down_backward:false") == (
        "gathered", {"sorted_grad_out": False, "split_down_backward": False})
    assert tool.parse_variant("keep=save_pre_activation") == ("keep", {"save_pre_activation": True})
    with pytest.raises(SystemExit, match="'block_m' is not a plan flag; allowed: .*save_pre_activation"):
        tool.parse_variant("tiles=block_m")
    with pytest.raises(SystemExit, match="expected NAME=FLAG"):
        tool.parse_variant("nothing")


def test_the_training_plan_ab_switches_one_kernels_tma_or_the_backwards():
    tool = _tool("training_plan_ab")
    plan = launch_plan(8192, 8, 128, 2048, 768, torch.bfloat16, interpreted=False, needs_grad=True)
    name, changes = tool.parse_variant("pointers=backward.tma:false,gate_up.tma:false")
    variant = tool.apply_changes(plan, changes)
    assert set(tool.KERNELS) == {"gate_up", "down", *tool.BACKWARD_KERNELS}
    for kernel in tool.KERNELS:  # all but the forward's down kernel
        assert getattr(variant, kernel) == dataclasses.replace(getattr(plan, kernel), tma=kernel == "down")
    _, only = tool.parse_variant("dw=down_weight_grad.tma:false,split_down_backward:false")
    variant = tool.apply_changes(plan, only)
    assert not variant.down_weight_grad.tma and variant.gate_up_weight_grad.tma and not variant.split_down_backward
    assert variant.gate_up_weight_grad == plan.gate_up_weight_grad
    for text in ("x=down_weight_grad.block_m:false", "x=nowhere.tma:false"):
        with pytest.raises(SystemExit, match="is not KERNEL.tma"):
            tool.parse_variant(text)
    a = torch.zeros(40, 3, 2)
    b = a.clone()
    b[33, 2, 1] = -0.5  # in the third slice of 16
    assert tool.max_abs_difference is max_abs_difference  # the package's, sliced (deepseek-v3's gradients)
    assert max_abs_difference(a, b) == 0.5 and max_abs_difference(a, a) == 0.0


def test_the_layout_ab_turns_every_kernels_tma_off_and_nothing_else():
    tool = _tool("layout_ab")
    plan = launch_plan(8192, 4, 32, 2880, 2880, torch.bfloat16, interpreted=False, needs_grad=True)
    off = tool.without_tma(plan)
    assert plan.gate_up.tma and plan.gate_up_weight_grad.tma
    for field in dataclasses.fields(plan):
        value, new = getattr(plan, field.name), getattr(off, field.name)
        assert new == (dataclasses.replace(value, tma=False) if isinstance(value, KernelConfig) else value)


def test_the_power_state_tool_summarises_nvidia_smi_samples_per_block(tmp_path):
    """tools/step_power_state.py (GPU only) reads the clocks nvidia-smi sampled beside it: idle samples
    left out, the software power cap counted, a line cut off by stopping the sampler skipped."""
    import datetime

    tool = _tool("step_power_state")
    path = tmp_path / "clocks.csv"
    path.write_text(
        "timestamp, clocks.current.sm [MHz], power.draw [W], temperature.gpu, clocks_event_reasons.active\n"
        "2026/11/29 01:50:40.000, 345 MHz, 76.94 W, 32, 0x0000000000000001\n"
        "2026/11/29 01:50:40.100, 1980 MHz, 650.00 W, 40, 0x0000000000000000\n"
        "2026/11/29 01:50:40.200, 1500 MHz, 700.50 W, 41, 0x0000000000000004\n"
        "2026/11/29 01:50:40.300, 1620 MHz, 699.00 W, 41, 0x0000000000000004\n"
        "2026/11/29 01:50:41.000, 1980 MHz, 300.00 W, 41, 0x0000000000000000\n"
        "2026/11/29 01:50:41.1")
    samples = tool.read_clock_samples(str(path))
    assert len(samples) == 5 and samples[2]["reasons"] == tool.POWER_CAP_REASON
    at = datetime.datetime(2026, 11, 29, 1, 50, 40)
    summary = tool.clock_summary(samples, at, at + datetime.timedelta(milliseconds=500))
    assert summary == dict(samples=4, busy=3, power_capped=2, median_clock_mhz=1620, min_clock_mhz=1500,
                           median_watts=699.0, max_watts=700.5)
    assert tool.clock_summary(samples, at, at) == dict(samples=1, busy=0)


def test_the_partial_training_tool_marks_other_ranks_experts_and_its_two_paths_agree():
    """tools/partial_training_ab.py (GPU only) on a tiny layer through the interpreter: rank 0's view of the
    gathered rows marks every other rank's expert as E/w, and the step through triton's partial entry gives
    the gradients of the step through the generic path (ids clamped, weights zeroed)."""
    import dataclasses

    from moe_lab.backends import get_spec, register, unregister
    from moe_lab.bench.inputs import build_experts

    tool = _tool("partial_training_ab")
    config = moe_lab.MoEConfig(32, 16, num_experts=8, top_k=3, dtype=torch.float32)
    device = torch.device("cpu")
    rows, local_index, weights, local_experts = tool.rank_inputs(config, 6, 2, device)
    assert rows.shape == (12, 32) and local_experts == 4
    assert int(local_index.max()) == 4 and 0 < int((local_index == 4).sum()) < local_index.numel()
    experts = build_experts(config.replace(num_experts=4), device, seed=0)
    upstream = torch.randn_like(rows)
    register(tool.WITHOUT_PARTIAL, dataclasses.replace(get_spec("triton"), partial_forward=None))
    try:
        partial = tool.step(experts, "triton", rows, local_index, weights, upstream)()
        generic = tool.step(experts, tool.WITHOUT_PARTIAL, rows, local_index, weights, upstream)()
    finally:
        unregister(tool.WITHOUT_PARTIAL)
    for a, b in zip(partial, generic):
        assert moe_lab.relative_error(a, b) < 1e-5


def test_tune_decode_transposed_smoke_run_reads_the_stored_layout(tmp_path):
    # --transposed keeps one copy of the weights, stored [E, H, 2I] / [E, I, H] as gpt-oss stores them, and sweeps
    # the tiles of that layout against the plan's own choice for it.
    output = tmp_path / "decode.json"
    tool = _tool("tune_decode")
    layers = tool.build_layers("gpt-oss-20b", 1, torch.device(DEVICE), smoke=True, transposed=True)
    assert layers.experts[0].gate_up_proj is None and layers.activation == "none"
    assert layers.gate_up[0].stride(-1) != 1 and layers.down[0].stride(-1) != 1
    tool.main(["--smoke", "--transposed", "--presets", "gpt-oss-20b", "--output", str(output)])
    rows = json.loads(output.read_text())["results"]
    assert [row["kind"] for row in rows] == ["transposed gate_up", "transposed down", "layer"]
    assert all(isinstance(value, float) for row in rows[:2] for value in row["all"].values())


def test_the_transposed_decode_tiles_are_each_recorded_presets_best():
    # decode_configs(..., transposed=True) is what tools/tune_decode.py --transposed measured on an H200: for each
    # preset and kernel, the rule's tile within 2 % of the fastest candidate, and the whole layer with the rule's
    # tiles (the sweep's winners) well under the row tiles the plan took before.
    import dataclasses

    from moe_lab.backends.triton_plan import decode_configs

    recorded = json.loads((TOOLS.parent / "data" / "h200_decode_layers_transposed.json").read_text())
    assert recorded["provenance"]["device_name"] == "NVIDIA H200"
    sweeps = [row for row in recorded["results"] if "all" in row]
    assert {row["preset"] for row in sweeps} == {"gpt-oss-20b", "qwen3-30b-a3b", "mixtral-8x7b"}
    for row in sweeps:
        config = moe_lab.get_preset(row["preset"]).config
        gate_up, down = decode_configs(config.hidden_size, config.intermediate_size, interpreted=False, transposed=True)
        chosen = gate_up if row["kind"].endswith("gate_up") else down
        timings = {name: us for name, us in row["all"].items() if isinstance(us, float)}
        name = str(dataclasses.astuple(chosen))
        assert name in timings, f"{row['preset']} {row['kind']}: the rule's tile {name} was not swept"
        assert timings[name] <= 1.02 * min(timings.values()), (row["preset"], row["kind"])
    for layer in (row for row in recorded["results"] if row["kind"] == "layer"):
        config = moe_lab.get_preset(layer["preset"]).config
        rule = decode_configs(config.hidden_size, config.intermediate_size, interpreted=False, transposed=True)
        assert [tuple(w) for w in layer["winners"]] == [dataclasses.astuple(c) for c in rule], layer["preset"]
        assert max(layer["winners_us"]) < 0.5 * min(layer["plan_us"]), layer["preset"]
