"""Reading an expert-parallel recording: weak scaling, the goals' status, the chunked and padded variants against
the plain forward, the busiest receiver's incoming rate; and notebook 10's reading of data/ep_record."""
import math
import shutil

import pandas as pd
import pytest

from moe_lab.bench.ep_summary import busiest_receiver, goal_status, variants_against_exact, weak_scaling

POINT = {"preset": "p", "num_tokens": 8192, "distribution": "uniform"}


def _summary(lines):
    return pd.DataFrame([POINT | line for line in lines])


def test_weak_scaling_compares_each_ep_size_with_ep1():
    summary = _summary([
        {"world_size": 1, "variant": "exact", "slowest_ms": 2.0, "tflops_per_gpu": 100.0, "fraction_of_one_device": 0.5},
        {"world_size": 4, "variant": "exact", "slowest_ms": 2.5, "tflops_per_gpu": 80.0, "fraction_of_one_device": 0.4},
        {"world_size": 4, "variant": "one_device", "slowest_ms": 1.0, "tflops_per_gpu": 200.0,
         "fraction_of_one_device": 1.0}])
    table = weak_scaling(summary)
    assert table["world_size"].tolist() == [1, 4] and table["fraction_of_ep1"].tolist() == [1.0, 0.8]


def test_goal_status_says_met_missed_and_not_run():
    goals = (("fast", "p", 8192, 2, "fraction_of_one_device", 0.85),
             ("a2a", "p", 8192, 2, "a2a_fraction_of_library", 0.8),
             ("wide", "p", 8192, 8, "fraction_of_ep1", 0.75))
    summary = _summary([
        {"world_size": 1, "variant": "exact", "slowest_ms": 1.0, "tflops_per_gpu": 100.0, "fraction_of_one_device": 0.9},
        {"world_size": 2, "variant": "exact", "slowest_ms": 1.1, "tflops_per_gpu": 90.0, "fraction_of_one_device": 0.84},
        {"world_size": 2, "variant": "dispatch_all_to_all", "a2a_fraction_of_library": 0.8}])
    status = goal_status(summary, goals).set_index("goal")
    assert status.loc["fast", "status"] == "missed" and status.loc["fast", "measured"] == 0.84
    assert status.loc["a2a", "status"] == "met"  # the target itself meets it
    assert status.loc["wide", "status"] == "not run" and math.isnan(status.loc["wide", "measured"])


def test_variants_against_exact_is_a_time_ratio():
    summary = _summary([{"world_size": 2, "variant": "exact", "slowest_ms": 4.0},
                        {"world_size": 2, "variant": "pipelined_2", "slowest_ms": 3.0},
                        {"world_size": 2, "variant": "padded_graph", "slowest_ms": 1.0}])
    table = variants_against_exact(summary).iloc[0]
    assert table["pipelined_2"] == 0.75 and table["padded_graph"] == 0.25


def test_busiest_receiver_counts_only_rows_from_other_ranks():
    # Two ranks, H = 4 bf16 (8-byte rows), 10 pairs each. Rank 0 keeps 6 and sends 4 to rank 1; rank 1 keeps 2
    # and sends 8 to rank 0. So rank 0 receives 14 rows, 8 of them from rank 1: 64 bytes in 1e-6 ms.
    base = POINT | {"world_size": 2, "status": "ok", "hidden_size": 4, "dtype": "bfloat16", "pairs_sent": 10}
    rows = pd.DataFrame([
        base | {"rank": 0, "variant": "dispatch_all_to_all", "pairs_received": 14, "bytes_off_rank": 32,
                "median_ms": 1e-6, "a2a_GBps": 32e-3},
        base | {"rank": 1, "variant": "dispatch_all_to_all", "pairs_received": 6, "bytes_off_rank": 64,
                "median_ms": 1e-6, "a2a_GBps": 64e-3},
        base | {"rank": 0, "variant": "nccl_all_to_all", "pairs_received": 14, "bytes_off_rank": 40,
                "median_ms": 1e-6, "a2a_GBps": 40.0},
        base | {"rank": 1, "variant": "nccl_all_to_all", "pairs_received": 6, "bytes_off_rank": 40,
                "median_ms": 1e-6, "a2a_GBps": 32.0}])
    line = busiest_receiver(rows).iloc[0]
    assert line["busiest rank"] == 0 and line["its incoming GB"] == pytest.approx(64e-9)
    assert line["incoming GB/s"] == pytest.approx(64.0) and line["NCCL equal-block GB/s"] == 32.0
    assert line["fraction"] == pytest.approx(2.0)


def test_notebook_10_reads_the_recorded_run():
    from moe_lab.lessons import nb10_expert_parallelism as nb10

    summary, rows, label = nb10.recorded_run()
    assert label.startswith("NVIDIA H200")
    assert set(summary["world_size"]) == {1, 2, 4} and set(rows["world_size"]) == {1, 2, 4}
    assert goal_status(summary)["status"].tolist() == ["missed", "met", "not run"]
    findings = nb10.recorded_findings(summary, rows)
    assert "— missed.**" in findings and "— not run:** no 8-GPU machine was lent" in findings
    split = nb10.ep1_time_split(rows)
    phases = split[["count_exchange_ms", "dispatch_ms", "expert_compute_ms", "combine_ms"]].sum(axis=1)
    assert ((phases - split["exact_ms"]).abs() < 0.05 * split["exact_ms"]).all()  # the phases make up the forward
    assert (split["exact - one_device"] > 0).all()


def test_notebook_10_says_when_nothing_is_recorded(tmp_path, monkeypatch):
    from moe_lab import recorded_tables
    from moe_lab.lessons import nb10_expert_parallelism as nb10

    monkeypatch.setattr(recorded_tables, "data_dir", lambda: tmp_path)
    summary, rows, label = nb10.recorded_run()
    assert summary is None and rows is None and "not recorded yet" in label
    assert recorded_tables.load_ep_rows() is None


def test_notebook_10_dedup_reading_matches_the_recording():
    # notebook 10's prose on the 2-GPU recording: fewer bytes made the dispatch all-to-all faster but the layer
    # hardly faster; the GPU idles about half the window; embedding_bag takes about as long as both grouped GEMMs
    import re

    from moe_lab.lessons import nb10_expert_parallelism as nb10

    table, label = nb10.dedup_comparison()
    assert label.startswith("NVIDIA H200")
    goal = table.loc[("qwen3-30b-a3b", 8192, "uniform", 2)]
    assert goal["dedup a2a ms"] < 0.6 * goal["exact a2a ms"]
    assert abs(goal["x 1 GPU dedup"] - goal["x 1 GPU exact"]) < 0.05
    excerpt = nb10.profile_excerpt("dedup", lines=20)
    window, busy = map(float, re.search(r"GPU window (\d+) us: busy (\d+) us", excerpt).groups())
    assert 0.4 < 1 - busy / window < 0.6
    totals = {name: float(us) for us, name in re.findall(r"^\s+([\d.]+)\s+\d+x\s+[\d.]+%\s+(.+)$", excerpt, re.M)}
    gemm = next(v for k, v in totals.items() if "cutlass" in k)
    bag = next(v for k, v in totals.items() if "EmbeddingBag" in k)
    assert 0.8 < bag / gemm < 1.2
    with pytest.raises(ValueError, match="no profile of layer 'nonsense'"):
        nb10.profile_excerpt("nonsense")


def _gathered_csv():
    from moe_lab.recorded_tables import EP_RECORD_GATHERED, data_dir

    return data_dir() / EP_RECORD_GATHERED / "ep_summary.csv"


def test_notebook_10_gathered_sentence_is_the_recording():
    # Read the CSV here, not through the lesson: the sentence's numbers must be the recording's.
    from moe_lab.bench.ep_summary import EP_GOALS
    from moe_lab.lessons import nb10_expert_parallelism as nb10

    csv = pd.read_csv(_gathered_csv())
    summary, label = nb10.gathered_record()
    assert label.startswith("NVIDIA H200")
    sentence = nb10.gathered_finding(summary, label)
    point = csv[(csv.preset == "qwen3-30b-a3b") & (csv.num_tokens == 8192) & (csv.distribution == "uniform")]
    fraction = point.set_index("variant")["fraction_of_one_device"]
    replayed = point.set_index("variant")["slowest_ms"]
    assert fraction["gathered_graph"] == pytest.approx(replayed["one_device_graph"] / replayed["gathered_graph"])
    target = EP_GOALS[0][5]
    assert f"{fraction['gathered']:.2f} of one GPU launched and {fraction['gathered_graph']:.2f} replayed" in sentence
    assert f"the goal of {target:.2f} missed" in sentence and fraction["gathered_graph"] < target
    assert sentence.startswith("On two NVIDIA H200 GPUs the gathered layer is the fastest EP layer recorded")
    layers = csv[~csv.variant.str.contains("one_device|_all_to_all|_all_gather")]
    for _, at in layers.groupby(["num_tokens", "distribution"]):
        launched = at[~at.variant.str.endswith("_graph")]
        graphed = at[at.variant.str.endswith("_graph")]
        assert launched.loc[launched.fraction_of_one_device.idxmax(), "variant"] == "gathered"
        assert graphed.loc[graphed.fraction_of_one_device.idxmax(), "variant"] == "gathered_graph"
    table = nb10.gathered_comparison(summary).loc[("qwen3-30b-a3b", 8192, "uniform")]
    assert table["gathered"] == fraction["gathered"] and table["gathered, replayed"] == fraction["gathered_graph"]
    assert table["x NCCL"] == point.set_index("variant").loc["gathered_dispatch_all_gather", "a2a_fraction_of_library"]


def test_notebook_10_gathered_sentence_follows_planted_numbers(tmp_path, monkeypatch):
    # A recording with two numbers changed: the sentence must change with them (a typed sentence would not).
    from moe_lab import recorded_tables
    from moe_lab.lessons import nb10_expert_parallelism as nb10

    folder = tmp_path / recorded_tables.EP_RECORD_GATHERED
    folder.mkdir()
    csv = pd.read_csv(_gathered_csv())
    goal = (csv.preset == "qwen3-30b-a3b") & (csv.num_tokens == 8192) & (csv.distribution == "uniform")
    csv.loc[goal & (csv.variant == "gathered_graph"), "fraction_of_one_device"] = 0.91
    csv.loc[(csv.num_tokens == 128) & (csv.distribution == "zipf") & (csv.variant == "dedup"),
            "fraction_of_one_device"] = 0.99
    csv.to_csv(folder / "ep_summary.csv", index=False)
    shutil.copy(_gathered_csv().with_name("ep2.json"), folder)  # the provenance: the card
    monkeypatch.setattr(recorded_tables, "data_dir", lambda: tmp_path)
    summary, label = nb10.gathered_record()
    sentence = nb10.gathered_finding(summary, label)
    assert sentence.startswith("On two NVIDIA H200 GPUs")
    assert "0.91 replayed" in sentence and "the goal of 0.85 met" in sentence
    assert "fastest EP layer at 3 of 4 points" in sentence
    (folder / "ep_summary.csv").unlink()
    summary, label = nb10.gathered_record()
    assert summary is None and "not recorded yet" in label
