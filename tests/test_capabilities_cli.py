import json
import subprocess
import sys

import pytest
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


def test_cli_bench_scaled_preset_writes_csv_and_provenance(tmp_path, capsys):
    pytest = __import__("pytest")
    pytest.importorskip("pandas")
    from moe_lab.bench import load_results

    out = tmp_path / "cpu_bench"
    rc = main(["bench", "--preset", "qwen3-30b-a3b", "--scale-down", "64", "--tokens", "1,16", "--quiet",
               "--max-seconds", "0.05", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "qwen3-30b-a3b" in printed and "grouped_mm" in printed
    frame, provenance = load_results(out)
    assert sorted(frame.backend.unique()) == ["auto", "batched_mm", "eager", "grouped_mm"]
    assert sorted(frame.num_tokens.unique()) == [1, 16] and (frame.status == "ok").all()
    assert (frame.num_experts == 128).all() and (frame.hidden_size == 64).all()
    assert (frame.median_ms > 0).all() and frame.fraction_of_roofline.between(0, 1.5).all()
    assert provenance["device"] == "cpu" and provenance["ceilings"]["copy_GBps"] > 0


def test_cli_bench_compare_hf_adds_ratios(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    rc = main(["bench", "--hidden", "32", "--intermediate", "16", "--experts", "4", "--top-k", "2",
               "--tokens", "8", "--backends", "grouped_mm,eager", "--compare-hf", "--no-ceilings", "--quiet",
               "--max-seconds", "0.02", "--rounds", "2", "--output", str(out)])
    assert rc == 0
    # transformers' backends are timed, never registered in moe_lab's registry
    assert not any(":" in name for name in moe_lab.available_backends())
    from moe_lab.bench import load_results

    frame, provenance = load_results(out)
    assert provenance["transformers_version"] == __import__("transformers").__version__
    assert set(frame.backend) == {"eager", "grouped_mm", "transformers:eager", "transformers:grouped_mm"}
    ours = frame[~frame.backend.str.startswith("transformers:")]
    assert (ours.speedup_vs_transformers > 0).all()
    assert (frame.status == "ok").all() and (frame.rounds == 2).all()
    # two interleaved rounds: the ratio is also taken round by round, and the terminal table shows it
    assert (ours.speedup_lowest_round <= ours.speedup_highest_round).all()
    assert (ours.speedup_lowest_round > 0).all()
    assert "speedup_lowest_round" in capsys.readouterr().out


def test_cli_bench_bad_arguments_exit_2(capsys):
    assert main(["bench", "--preset", "llama-7b", "--quiet", "--no-ceilings"]) == 2
    assert "unknown preset 'llama-7b'" in capsys.readouterr().err
    assert main(["bench", "--hidden", "32", "--quiet"]) == 2
    assert "also needs --intermediate, --experts, --top-k" in capsys.readouterr().err
    assert main(["bench", "--preset", "olmoe-1b-7b", "--scale-down", "64", "--backends", "flash", "--quiet",
                 "--no-ceilings"]) == 2
    assert "unknown experts implementation 'flash'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--rounds", "0", "--quiet"])
    assert exited.value.code == 2 and "--rounds: must be an integer >= 1, got 0" in capsys.readouterr().err
