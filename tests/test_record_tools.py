"""The recording tools on CPU: tools/merge_tables.py joins the parts of one recorded table with every part's provenance;
tools/profile_decode_step.py prints its sections in its smoke mode."""
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from moe_lab.bench import load_results, save_results

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


def _merge_tables():
    spec = importlib.util.spec_from_file_location("merge_tables", TOOLS / "merge_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_tables"] = module
    spec.loader.exec_module(module)
    return module


def _part(tmp_path, name, num_tokens, extra):
    rows = pd.DataFrame({"preset": ["p", "p"], "num_tokens": [num_tokens] * 2, "backend": ["triton", "grouped_mm"],
                         "median_ms": [1.5, 2.5], "device_name": ["Card X"] * 2, "git_commit": ["abc"] * 2})
    save_results(rows, tmp_path / name, extra)
    return str(tmp_path / f"{name}.csv")


def test_merged_table_keeps_rows_ordered_and_every_parts_provenance(tmp_path):
    first = _part(tmp_path, "t8192", 8192, {"transformers_version": "5.0"})
    second = _part(tmp_path, "t128", 128, {"transformers_version": "5.0", "liger_kernel_version": "0.8.5"})
    _merge_tables().merge(str(tmp_path / "merged"), [first, second], notes="two GPUs")
    frame, info = load_results(tmp_path / "merged")
    assert list(zip(frame["num_tokens"], frame["backend"])) == [
        (128, "grouped_mm"), (128, "triton"), (8192, "grouped_mm"), (8192, "triton")]
    assert frame.loc[(frame.num_tokens == 128) & (frame.backend == "triton"), "median_ms"].item() == 1.5
    assert info["device_name"] == "Card X" and info["git_commit"] == "abc"
    assert info["liger_kernel_version"] == "0.8.5"  # a key only a later part has is kept
    assert [part["file"] for part in info["parts"]] == ["t8192", "t128"]
    assert all(part["command_line"] for part in info["parts"]) and info["notes"] == "two GPUs"


@pytest.mark.slow
def test_backward_record_command_runs_on_cpu_and_its_tables_merge(tmp_path):
    """The lead's GPU command (tools/gpu_parallel.sh with backward-hf:<preset>:<T,...> parts) on CPU,
    tiny (BENCH_ARGS scales the presets down, triton runs through its interpreter): the tables come
    back in one archive under $OUT, at most 8 files, and merge_tables joins them with their parts."""
    out, record = tmp_path / "out", tmp_path / "record"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), R=str(record), ROUNDS="1", DEADLINE="240",
               BENCH_ARGS="--device cpu --scale-down 16 --max-seconds 0.02",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    # two "GPUs" at once, as on a 2-GPU machine: the two processes share this machine's cores
    # few experts and pairs: every program of triton's interpreted kernels costs milliseconds (olmoe at T=8: 90 s)
    done = subprocess.run(["bash", "tools/gpu_parallel.sh", "backward-hf:gpt-oss-20b:2", "backward-hf:mixtral-8x7b:8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(path.name for path in out.iterdir()) == ["log_gpu0.txt", "log_gpu1.txt", "record.tar.gz"]
    with tarfile.open(out / "record.tar.gz") as archive:
        archive.extractall(tmp_path / "back", filter="data")
    parts = sorted(str(path) for path in (tmp_path / "back").glob("cpu_bf16_backward_*.csv"))
    assert [Path(part).name for part in parts] == ["cpu_bf16_backward_gpt-oss-20b_T2.csv",
                                                   "cpu_bf16_backward_mixtral-8x7b_T8.csv"]
    _merge_tables().merge(str(tmp_path / "merged"), parts, notes="tiny CPU try of the command")
    table, info = load_results(tmp_path / "merged.csv")
    assert set(table["backend"]) == {"grouped_mm", "triton", "transformers:grouped_mm"}
    assert (table["status"] == "ok").all() and (table["peak_bytes"] > 0).all()
    assert len(info["parts"]) == 2 and info["notes"] == "tiny CPU try of the command"


def test_decode_profile_tool_prints_every_section_and_keeps_going_past_a_failing_backend(tmp_path):
    """tools/profile_decode_step.py's CPU smoke mode (a tiny model, eager; its GPU run wrote the decode profiles in
    data/): per backend the step, the kernel table and the host side with dynamo's counters; a backend that fails
    gets one line with its error, and the backends after it still run."""
    output = tmp_path / "profile.txt"
    done = subprocess.run(
        [sys.executable, "tools/profile_decode_step.py", "--device", "cpu", "--model", "tiny:qwen3_moe",
         "--backends", "nonesuch,moe_lab_grouped_mm", "--execution", "eager", "--new-tokens", "3", "--prompt", "8",
         "--output", str(output)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    text = output.read_text()
    assert text.startswith("tiny:qwen3_moe: 2 of 2 layers;")
    assert "=== nonesuch: ValueError:" in text
    profiled = text[text.index("=== moe_lab_grouped_mm (eager, batch 1, 3 new tokens): step "):]
    assert "aten::_grouped_mm" in profiled  # the kernel table names the op that ran the experts
    host = profiled[profiled.index("  host, per step: "):]
    # eager: nothing compiled, and on CPU no CUDA runtime calls to trace
    assert host.startswith("  host, per step: 0 graph breaks and 0 graphs compiled")
    assert "runtime calls none traced" in host.splitlines()[0]
    rows = host.splitlines()[2:]
    assert rows and all(len(row.split(None, 2)) == 3 for row in rows)  # us/step, calls/step, event name
    assert [float(row.split()[0]) for row in rows] == sorted((float(row.split()[0]) for row in rows), reverse=True)
