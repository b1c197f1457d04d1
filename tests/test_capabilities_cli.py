import json
import subprocess
import sys

import torch

import moe_lab
from moe_lab.cli import main


def test_capabilities_measure_grouped_mm_here():
    info = moe_lab.capabilities("cpu")
    assert info["device"] == "cpu" and info["torch"] == torch.__version__
    assert set(info["grouped_mm"]) == {"bfloat16", "float16", "float32"}
    for dtype, probe in info["grouped_mm"].items():
        assert probe["native"] is False  # no fused grouped GEMM kernel on a CPU
        # Whether it runs was tried, not assumed: torch's CPU grouped_mm exists from 2.9 on.
        assert probe["runs"] is (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"))
    assert info["torch_compile"]["usable"] in (True, False)
    text = moe_lab.format_capabilities(info)
    assert "grouped_mm   float32" in text and "torch.compile" in text


def test_cli_info_json(capsys):
    assert main(["info", "--device", "cpu", "--json", "--no-compile-probe"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu" and "torch_compile" not in info


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "moe_lab.cli", "info", "--no-compile-probe"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "grouped_mm" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "moe_lab.cli", "frobnicate"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'frobnicate'" in bad.stderr
