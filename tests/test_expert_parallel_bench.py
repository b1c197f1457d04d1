"""`moe-lab bench --ep` on CPU with gloo: every variant measured on every rank, the derived columns,
the summary, the command line, and tools/ep_record.sh's launches at tiny sizes."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import moe_lab
from moe_lab.bench.ep_summary import ep_summary
from moe_lab.bench.expert_parallel import EPBenchSettings, run_ep_bench
from moe_lab.bench.roofline import expert_flops
from moe_lab.parallel import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
CONFIG = moe_lab.MoEConfig(32, 16, num_experts=8, top_k=2)
SETTINGS = EPBenchSettings(tokens=(8, 24), distributions=("uniform", "zipf"), warmup=1, reps=2, chunks=(2,),
                           padded_max_tokens=8)


def _bench_on_rank():
    return run_ep_bench({"tiny": CONFIG}, SETTINGS, torch.device("cpu"))


@pytest.fixture(scope="module")
def rows():
    every_rank = run_on_ranks(_bench_on_rank, 2)
    frame = pd.DataFrame(every_rank[0])
    assert frame.equals(pd.DataFrame(every_rank[1]))  # all ranks' rows gathered on every rank
    return frame


def test_every_variant_on_every_rank(rows):
    assert (rows["status"] == "ok").all(), rows[rows["status"] != "ok"][["variant", "reason"]]
    for (T, distribution), point in rows.groupby(["num_tokens", "distribution"]):
        expected = {"exact", "dedup", "pipelined_2", "dedup_pipelined_2", "dispatch_all_to_all", "gloo_all_to_all",
                    "dedup_dispatch_all_to_all", "dedup_gloo_all_to_all", "gathered", "gathered_pipelined_2",
                    "gathered_dispatch_all_gather", "gathered_gloo_all_gather"} | ({"padded"} if T <= 8 else set())
        for rank in (0, 1):
            assert expected <= set(point[point["rank"] == rank]["variant"]), (T, distribution, rank)
        assert list(point[point["variant"] == "one_device"]["rank"]) == [0]  # the baseline runs on rank 0 only


@pytest.mark.parametrize("variant", ["exact", "dedup", "gathered"])
def test_phases_add_up_to_the_total(rows, variant):
    exact = rows[rows["variant"] == variant]
    phases = exact[["count_exchange_ms", "dispatch_ms", "expert_compute_ms", "combine_ms"][variant == "gathered":]]
    assert (phases > 0).all().all()
    # Medians of parts need not add up to the median of the whole, but they come from the same calls.
    assert (phases.sum(axis=1) <= exact["p90_ms"] * 1.5).all()
    assert (phases.sum(axis=1) >= exact["p10_ms"] * 0.5).all()


def test_flops_pairs_and_bandwidth(rows):
    for row in rows.itertuples():
        assert row.flops == expert_flops(row.num_tokens, 2, 32, 16)
        if row.variant.endswith(("all_to_all", "all_gather")):
            assert math.isnan(row.tflops) and row.a2a_GBps > 0 and row.bytes_off_rank > 0
        else:
            assert row.tflops > 0 and row.tokens_per_s > 0
    exact = rows[rows["variant"] == "exact"]
    assert (exact["pairs_sent"] == exact["num_tokens"] * 2).all() and (exact["rows_sent"] == exact["pairs_sent"]).all()
    for _, point in exact.groupby(["num_tokens", "distribution"]):
        assert point["pairs_received"].sum() == point["pairs_sent"].sum()  # every pair lands somewhere
    dedup = rows[rows["variant"] == "dedup"]
    # One row per (token, rank it visits): at least T (every token goes somewhere), at most T*min(k, world) = 2T,
    # and every row sent is received.
    assert (dedup["rows_sent"] >= dedup["num_tokens"]).all() and (dedup["rows_sent"] <= 2 * dedup["num_tokens"]).all()
    for _, point in dedup.groupby(["num_tokens", "distribution"]):
        assert point["rows_received"].sum() == point["rows_sent"].sum()
    a2a = rows[rows["variant"] == "dedup_dispatch_all_to_all"].set_index(["num_tokens", "distribution", "rank"])
    assert (a2a["rows_sent"] == dedup.set_index(["num_tokens", "distribution", "rank"])["rows_sent"]).all()
    gathered = rows[rows["variant"].str.startswith("gathered")]  # every token to both ranks, whatever the routing
    assert (gathered["rows_sent"] == 2 * gathered["num_tokens"]).all()
    all_gather = rows[rows["variant"].str.endswith("all_gather")]
    assert (all_gather["bytes_off_rank"] == all_gather["num_tokens"] * 32 * 4).all()  # the other rank's T rows of H


def test_summary(rows):
    summary = ep_summary(rows)
    one = summary[summary["variant"] == "one_device"]
    assert (one["fraction_of_one_device"] == 1.0).all() and (one["world_size"] == 2).all() and (one["ranks"] == 1).all()
    exact = summary[summary["variant"] == "exact"]
    assert (exact["ranks"] == 2).all() and (exact["fraction_of_one_device"] > 0).all()
    for name in ("dispatch_all_to_all", "dedup_dispatch_all_to_all", "gathered_dispatch_all_gather"):
        dispatch = summary[summary["variant"] == name]
        assert len(dispatch) == 4 and (dispatch["a2a_fraction_of_library"] > 0).all()
    skewed = summary[(summary["distribution"] == "zipf") & (summary["variant"] == "exact")]
    assert (skewed["receive_imbalance"] >= 1.0).all()


def test_command_line_outside_torchrun_is_a_group_of_one(tmp_path):
    from moe_lab.cli import main

    output = tmp_path / "ep1"
    code = main(["bench", "--ep", "--preset", "qwen3-30b-a3b", "--scale-down", "32", "--device", "cpu",
                 "--tokens", "8", "--distribution", "uniform", "--ep-reps", "1", "--ep-warmup", "0",
                 "--ep-chunks", "2", "--output", str(output)])
    assert code == 0
    frame, info = moe_lab.bench.load_results(output)
    assert set(frame["world_size"]) == {1} and info["world_size"] == 1
    assert {"exact", "dedup", "pipelined_2", "padded", "gathered", "gathered_pipelined_2", "one_device"} \
        <= set(frame["variant"])


def test_command_line_refuses_a_misspelled_backend_before_starting(capsys):
    import torch.distributed as dist
    from moe_lab.cli import main

    assert main(["bench", "--ep", "--backends", "grouped_mn", "--device", "cpu"]) == 2
    assert "unknown experts implementation 'grouped_mn'" in capsys.readouterr().err
    assert not dist.is_initialized()


@pytest.mark.slow
def test_record_script_at_tiny_sizes(tmp_path):
    # The GPU recording's exact launches (torchrun, gloo, CPU), so a typo fails here and not on the GPU machine.
    # Slow: each torchrun launch starts fresh interpreters that import torch (~10 s each on a small machine).
    env = os.environ | {"MOE_LAB_EP_TINY": "1", "OUT": str(tmp_path), "EP_SIZES": "1 2", "PYTHON": sys.executable,
                        "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "tools" / "ep_record.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(path.name for path in tmp_path.iterdir())
    # The script goes on past a launch that failed; its log says how (a CI run once had EP=1's rank die at start
    # with glibc's "malloc(): unaligned tcache chunk detected", SIGABRT, not reproduced in four runs after it).
    log = (tmp_path / "ep_record.log").read_text() if (tmp_path / "ep_record.log").exists() else "(no log)"
    assert files == ["ep1.csv", "ep1.json", "ep2.csv", "ep2.json", "ep_profile.txt", "ep_record.log",
                     "ep_summary.csv"], f"{files}\n{log[:3000]}"
    summary = pd.read_csv(tmp_path / "ep_summary.csv")
    assert set(summary["world_size"]) == {1, 2} and set(summary["preset"]) == {"qwen3-30b-a3b"}
    assert {"exact", "dedup", "dedup_dispatch_all_to_all", "gathered", "gathered_pipelined_2",
            "gathered_dispatch_all_gather", "one_device"} <= set(summary["variant"])
    log = (tmp_path / "ep_record.log").read_text()
    assert log.count("exit 0") == 3 and "goals, gathered layer:" in log  # EP=1, EP=2, the profile
    profile = (tmp_path / "ep_profile.txt").read_text()
    assert "=== rank 0 of 2" in profile and "=== rank 1 of 2" in profile and "--- dedup" in profile
    assert "--- gathered_pipelined_2" in profile


def test_profile_summary_finds_busy_time_idle_gaps_and_top_kernels():
    from moe_lab.bench.ep_profile import summarize_trace

    # Two streams: a GEMM 0-100 us, an NCCL kernel 50-150 overlapping it, then nothing until a gather at 400-450
    # (a 250 us gap: the host was waiting), and a host sync of 240 us.
    events = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_SendRecv", "ts": 50, "dur": 100},
        {"ph": "X", "cat": "kernel", "name": "gather", "ts": 400, "dur": 50},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 455, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 150, "dur": 240},
        {"ph": "X", "cat": "cpu_op", "name": "aten::index", "ts": 390, "dur": 8},
    ]
    text = summarize_trace(events, top=4)
    assert "GPU window 460 us: busy 205 us, idle 255 us (55%) in 2 gaps" in text
    assert "250.0  ncclDevKernel_SendRecv  ->  gather" in text
    assert text.index("gemm") < text.index("gather")  # 100 us before 50 us
    assert "240.0     1x  cudaStreamSynchronize" in text
    assert summarize_trace([]) == "no GPU activity in the trace"
