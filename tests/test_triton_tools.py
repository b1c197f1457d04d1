"""The triton tuning tools run against the package as it is: tools/tune_triton.py --smoke on this
machine (tiny shapes; through triton's interpreter without a GPU) writes the rows the lead's GPU run
will write, with plans passed as values."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import moe_lab

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
def test_tune_triton_backward_smoke_run_writes_every_row(tmp_path):
    output = tmp_path / "tuning.json"
    _tool("tune_triton").main(["--smoke", "--parts", "backward", "--output", str(output)])
    written = json.loads(output.read_text())
    assert written["provenance"]["triton_version"]
    rows = written["results"]
    kernels = [row["kernel"] for row in rows if row["kind"] == "backward"]
    assert kernels == ["down_backward", "gate_up_input_grad", "gate_up_weight_grad", "down_weight_grad"]
    (step,) = [row for row in rows if row["kind"] == "training_step"]
    for label in ("grouped_mm", "plan_save", "plan_recompute", "winners_save", "winners_recompute"):
        assert step[label]["ms"] > 0 and step[label]["peak_bytes"] > 0, label
    assert step["plans"]["plan"]["save_pre_activation"] is True


def test_sort_pairs_ab_compares_both_branches_of_the_real_sort():
    tool = _tool("sort_pairs_ab")
    index, _ = moe_lab.synthetic_routing(40, 16, 4, seed=1, device=DEVICE)
    by_one_program, counts = tool.one_program(index, 16)
    by_torch, torch_counts = tool.torch_sort(index, 16)
    assert by_one_program.dtype == torch.int32 and by_torch.dtype == torch.int64  # two different branches
    assert torch.equal(by_one_program.long(), by_torch) and torch.equal(counts.long(), torch_counts.long())
