"""Notebook 10's helpers, figures, widget and exercise checker."""
import math

import pandas as pd
import pytest
import torch

import moe_lab
from moe_lab.exercises.nb10_expert_parallelism import check_padded_rows, worst_case_rows
from moe_lab.lessons import nb10_expert_parallelism as nb10
from moe_lab.parallel.padded import worst_case_capacity
from moe_lab.parameters import NotebookParameterError, check_values
from moe_lab.plots.diagrams import expert_parallel_figure
from moe_lab.plots.expert_parallel import phases_figure, receive_load_figure, pairs_received_figure

CONFIG = moe_lab.MoEConfig(32, 16, num_experts=8, top_k=2)


def test_memory_table_is_computed_from_the_presets():
    table = nb10.expert_memory_table().set_index("preset")
    deepseek = moe_lab.get_preset("deepseek-v3").config
    assert table.loc["deepseek-v3", "EP=1 GiB/GPU"] == deepseek.expert_parameter_count() * 2 / 2**30
    assert table.loc["deepseek-v3", "EP=8 GiB/GPU"] == pytest.approx(table.loc["deepseek-v3", "EP=1 GiB/GPU"] / 8)
    assert math.isnan(table.loc["qwen1.5-moe-a2.7b", "EP=8 GiB/GPU"])  # 60 experts do not split over 8


def test_send_matrix_counts_pairs_by_destination_rank():
    index = [torch.tensor([[0, 3], [1, 2]]), torch.tensor([[3, 2]])]  # E=4 over 2 ranks: experts {0,1}, {2,3}
    assert nb10.send_matrix(index, 4, 2).tolist() == [[2, 2], [0, 2]]


def test_skew_moves_pairs_onto_the_first_rank():
    loads = nb10.receive_loads(CONFIG, 64, 4, [0.0, 3.0])
    share = loads.groupby("skew").apply(lambda g: g["pairs_received"].iloc[0] / g["pairs_received"].sum(),
                                        include_groups=False)
    assert share[3.0] > 0.8 > share[0.0]
    assert (loads.groupby("skew")["pairs_received"].sum() == 64 * 4 * 2).all()
    table = nb10.imbalance_table(CONFIG, 64, 4, [0.0, 3.0]).set_index("skew")
    # A rank sums a block of experts: its imbalance is never larger than the experts' (max/mean of sums).
    assert (table["rank imbalance"] <= table["expert imbalance"] + 1e-9).all()


def test_padded_cost_table_uses_dispatch_bytes():
    table = nb10.padded_cost_table(presets=("deepseek-v3",), tokens=(128,), world_size=8)
    row = table.iloc[0]
    assert row["never drops: capacity"] == worst_case_capacity(128, 8, 32) == 1024
    assert row["x exact"] == 8.0 and row["x exact "] == 2.0


def test_parameters_refuse_a_world_size_that_does_not_divide_the_experts():
    values = dict(world_size=3, num_experts=8, top_k=2, hidden_size=32, intermediate_size=16, tokens_per_rank=8,
                  skew=0.0, backend="grouped_mm", seed=0)
    with pytest.raises(NotebookParameterError, match="world_size=3 must divide num_experts=8"):
        check_values(nb10.PARAMETERS, values)
    assert check_values(nb10.PARAMETERS, values | {"world_size": 4})["world_size"] == 4


def test_recorded_summary_says_when_nothing_is_recorded(tmp_path, monkeypatch):
    from moe_lab import recorded_tables

    monkeypatch.setattr(recorded_tables, "data_dir", lambda: tmp_path)
    table, message = nb10.recorded_summary()
    assert table is None and "not recorded yet" in message


def test_recorded_summary_names_the_card(tmp_path, monkeypatch):
    import json

    from moe_lab import recorded_tables

    folder = tmp_path / "ep_record"
    folder.mkdir()
    pd.DataFrame([{"preset": "qwen3-30b-a3b", "num_tokens": 8192, "distribution": "uniform", "world_size": 2,
                   "variant": "exact", "slowest_ms": 1.0, "tflops_per_gpu": 500.0}]).to_csv(folder / "ep_summary.csv")
    (folder / "ep2.json").write_text(json.dumps({"provenance": {"device_name": "NVIDIA H200", "torch_version": "2.11",
                                                                "date": "2026-11-28T13:00:00"}}))
    monkeypatch.setattr(recorded_tables, "data_dir", lambda: tmp_path)
    table, label = nb10.recorded_summary()
    assert label.startswith("NVIDIA H200") and table["tflops_per_gpu"].tolist() == [500.0]


def test_dispatch_figure_draws_one_arrow_per_nonempty_route():
    fig = expert_parallel_figure(torch.tensor([[3, 0], [2, 5]]), experts_per_rank=4)
    labels = [a.text for a in fig.layout.annotations]
    assert sorted(t for t in labels if t.isdigit()) == ["2", "3", "5"]
    assert "rank 1: experts 4–7<br>5 pairs in" in labels and "2 of them cross" in fig.layout.title.text


def _rows():
    rows = []
    for rank, received in enumerate([30, 10]):
        rows.append({"variant": "exact", "rank": rank, "count_exchange_ms": 0.1, "dispatch_ms": 0.2,
                     "expert_compute_ms": 0.3 + rank, "combine_ms": 0.2, "median_ms": 0.8 + rank, "p10_ms": 0.7,
                     "p90_ms": 1.0 + rank, "pairs_received": received})
    rows.append({"variant": "one_device", "rank": 0, "median_ms": 0.5})
    return pd.DataFrame(rows)


def test_phase_figures_and_table():
    rows = _rows()
    assert [trace.name for trace in phases_figure(rows).data] == ["count exchange", "dispatch", "experts", "combine"]
    assert list(pairs_received_figure(rows).data[0].y) == [30, 10]
    table = nb10.phase_table(rows)
    assert table.loc[0, "all-to-all share"] == pytest.approx(0.5 / 0.8)
    fig = receive_load_figure(nb10.receive_loads(CONFIG, 16, 2, [0.0, 1.0]))
    assert [trace.name for trace in fig.data] == ["skew 0", "skew 1"]


def test_explorer_measures_on_start_and_on_change():
    from moe_lab.widgets.expert_parallel import expert_parallel_explorer

    explorer = expert_parallel_explorer(CONFIG, tokens_per_rank=8, world_size=2, reps=1)
    assert set(explorer.rows["rank"]) == {0, 1} and "ok" in explorer.status.value
    assert list(explorer.controls["world_size"].options) == [1, 2, 4]
    explorer.controls["world_size"].value = 4
    assert set(explorer.rows["rank"]) == {0, 1, 2, 3}
    assert len(explorer.figures["received"].data[0].y) == 4


@pytest.mark.parametrize("answer,correct,hint", [
    (None, False, "still None"),
    (lambda T, k, E, w: w * T * k, False, "distinct"),
    (lambda T, k, E, w: T * min(k, E // w), False, "every one of the"),
    (lambda T, k, E, w: T * k // w, False, "average"),
    (lambda T, k, E, w: 1 / 0, False, "ZeroDivisionError"),
    (lambda T, k, E, w: "many", False, "whole number"),
    (lambda T, k, E, w: w * T * min(k, E // w), True, "world · T · min(k, E/world)"),
    (lambda T, k, E, w: torch.tensor(w * T * min(k, E // w)), True, "whatever the routing"),
])
def test_padded_rows_checker_names_the_mistake(answer, correct, hint):
    result = check_padded_rows(answer)
    assert bool(result) is correct and hint in result.message


def test_worst_case_rows_is_what_the_padded_layer_allocates():
    for T, k, E, w in [(128, 8, 256, 8), (16, 4, 8, 4), (10, 2, 8, 8)]:
        assert worst_case_rows(T, k, E, w) == w * worst_case_capacity(T, k, E // w)


def test_gathered_bytes_table_is_dispatch_bytes():
    from moe_lab.parallel.gathered import rank_hit_probability

    table = nb10.gathered_bytes_table(world_sizes=(2, 8)).set_index("EP")
    qwen3 = moe_lab.get_preset("qwen3-30b-a3b").config
    # Every token goes to every other rank, so the gathered layer moves 1/p of the dedup layer's bytes.
    for world in (2, 8):
        p = rank_hit_probability(qwen3.num_experts, qwen3.top_k, world)
        assert table.loc[world, "P(token reaches a rank)"] == p
        assert table.loc[world, "gathered / dedup"] == pytest.approx(1 / p)
    assert table.loc[2, "gathered / exact"] < 0.3 and table.loc[8, "gathered / exact"] > 1
    assert table.loc[2, "exact MiB"] == 2 * 8192 * 8 * (1 / 2) * 2048 * 2 / 2**20  # 2*T*k*(w-1)/w rows of H bf16


def test_gathered_stops_paying_where_ep_reaches_k():
    # Per token and other rank: gathered 2*H*b + routing, exact 2*k*H*b/w; they cross where w reaches k.
    assert "from EP = 8 on (1.01× there" in nb10.gathered_stops_paying("qwen3-30b-a3b")
    deepseek = nb10.gathered_stops_paying("deepseek-v3")  # k = 8 of 256: the same crossing
    assert "from EP = 8 on" in deepseek and "at EP = 256" in deepseek


def test_partial_forward_demo_sums_blocks_to_the_whole_layer():
    from moe_lab.backends import get_spec

    demo = nb10.partial_forward_demo(CONFIG, num_tokens=8, world_size=2).set_index("backend")
    assert (demo["result"] == "equals the whole layer").all() and (demo["error of the summed partials"] < 1e-5).all()
    # and it trains: every backend's blocks give the whole layer's gradients, the partial entry's included
    assert (demo["gradients"] == "equal the whole layer's").all() and (demo["error of the gradients"] < 1e-5).all()
    for name, row in demo.iterrows():
        declares = get_spec(name).partial_forward is not None
        assert row["declares partial_forward"] == declares
        # The entry runs each routed pair on the one rank that holds it; the generic path runs every slot everywhere.
        assert row["pairs computed (all ranks)"] == (8 * 2 if declares else 2 * 8 * 2)
    assert not demo.loc["eager", "declares partial_forward"]  # the reference backend: the generic path


def test_partial_forward_demo_with_more_slots_than_a_rank_has_experts():
    # top_k = 4 over blocks of 2 experts: the generic path takes the slots in groups of E/w (moe_lab.parallel.local),
    # triton's partial_forward skips the absent ones; both sum to the whole layer.
    config = moe_lab.MoEConfig(32, 16, num_experts=8, top_k=4)
    demo = nb10.partial_forward_demo(config, num_tokens=6, world_size=4).set_index("backend")
    assert (demo["result"] == "equals the whole layer").all() and (demo["gradients"] == "equal the whole layer's").all()
    assert demo.loc["eager", "pairs computed (all ranks)"] == 4 * 6 * 4


@pytest.mark.parametrize("answer,correct,hint", [
    (None, False, "still None"),
    (lambda E, k, w: 1 - (1 - 1 / w) ** k, False, "distinct"),
    (lambda E, k, w: math.comb(E - E // w, k) / math.comb(E, k), False, "NO expert"),
    (lambda E, k, w: min(1.0, k / w), False, "on average"),
    (lambda E, k, w: 1 / 0, False, "ZeroDivisionError"),
    (lambda E, k, w: "many", False, "raised"),
    (lambda E, k, w: 0.5, False, "held elsewhere"),
    (lambda E, k, w: 1 - math.comb(E - E // w, k) / math.comb(E, k), True, "1 - C(E - E/world, k) / C(E, k)"),
])
def test_rank_reach_checker_names_the_mistake(answer, correct, hint):
    from moe_lab.exercises.nb10_expert_parallelism import check_rank_reach

    result = check_rank_reach(answer)
    assert bool(result) is correct and hint in result.message


def test_rank_reach_is_the_gathered_layers_probability():
    from moe_lab.exercises.nb10_expert_parallelism import rank_reach
    from moe_lab.parallel.gathered import dispatch_bytes

    assert rank_reach(8, 6, 2) == 1.0  # more experts than the other rank holds: every token comes here
    assert rank_reach(8, 4, 2) == pytest.approx(1 - 1 / 70)
    qwen3 = moe_lab.get_preset("qwen3-30b-a3b").config
    cost = dispatch_bytes(qwen3, 64, 8)
    assert cost.gathered_over_dedup == pytest.approx(1 / rank_reach(128, 8, 8))


def test_partial_forward_demo_runs_a_backend_declared_without_autograd_forward_only():
    # A learner's backend registered with autograd=False earlier in the kernel must not stop the cell.
    moe_lab.register("forward_only", moe_lab.backends.get_spec("eager").forward, autograd=False, runs=True)
    try:
        demo = nb10.partial_forward_demo(CONFIG, num_tokens=8, world_size=2).set_index("backend")
    finally:
        moe_lab.unregister("forward_only")
    assert demo.loc["forward_only", "result"] == "equals the whole layer"
    assert demo.loc["forward_only", "gradients"] == "not asked (declared without autograd)"
    assert demo.loc["triton", "gradients"] == "equal the whole layer's"
