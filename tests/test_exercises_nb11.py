"""Notebook 11: the decision tables read from the recorded data, the gradient probe, and the exercise."""
import json
import re
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.devices import default_device
from moe_lab.exercises import nb11_choosing_a_backend as ex
from moe_lab.lessons import nb11_choosing_a_backend as nb11
from moe_lab.recorded_tables import load_recorded

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def both():
    return load_recorded("presets", execution=None)[0]


def _fastest(both, execution, preset, tokens, backends):
    """The winner found by sorting, independently of nb11.winners."""
    rows = both[(both["execution"] == execution) & (both["preset"] == preset) & (both["num_tokens"] == tokens)
                & both["backend"].isin(backends) & (both["status"] == "ok")]
    return rows.sort_values("median_ms")["backend"].iloc[0]


def test_regimes_and_expert_sizes():
    assert [nb11.regime(t) for t in (1, 16, 128, 1024, 8192)] == ["decode", "small batch", "medium", "medium",
                                                                  "prefill"]
    sizes = nb11.expert_sizes()
    assert set(sizes.index) == set(moe_lab.PRESETS)
    for name, row in sizes.iterrows():
        c = moe_lab.get_preset(name).config
        small = 3 * c.hidden_size * c.intermediate_size < nb11.SMALL_EXPERT_PARAMS
        assert row["class"] == ("small experts" if small else "large experts")


@pytest.mark.parametrize("backends", [nb11.MOE_LAB_BACKENDS, ("eager", "batched_mm", "grouped_mm")])
def test_decision_table_counts_the_recorded_winners(both, backends):
    table = nb11.decision_table(both, backends=backends)
    won = nb11.winners(both, backends)
    assert len(won) == 60  # 6 presets x 5 T x 2 executions
    for _, w in won.iterrows():
        execution = {"launched": "eager", "CUDA graph": "cuda_graph"}[w["execution"]]
        assert w["winner"] == _fastest(both, execution, w["preset"], w["num_tokens"], backends)
    for (execution, experts, regime), row in table.iterrows():
        group = won[(won["execution"] == execution) & (won["experts"] == experts) & (won["regime"] == regime)]
        counts = group["winner"].value_counts()
        assert row["ship"] == counts.index[0] and row["points won"] == f"{counts.iloc[0]}/{len(group)}"
    # the rules name every (execution, expert size) group, or fold them into one line when all agree
    lines = nb11.rule_lines(table)
    assert len(lines) in (1, 4) and all(table["ship"].iloc[0] in line or ";" in line for line in lines)


def test_without_triton_the_regimes_matter(both):
    # What the notebook's prose says of this table, checked against the data it reads.
    table = nb11.decision_table(both, backends=("eager", "batched_mm", "grouped_mm"))
    assert table.loc[("launched", "small experts", "decode"), "ship"] == "batched_mm"
    assert set(table.xs("prefill", level="regime")["ship"]) == {"grouped_mm"}
    assert "eager" not in set(table.xs("CUDA graph", level="execution")["ship"])


def test_graph_and_compile_read_the_recorded_rows(both):
    compiled = load_recorded("compile")[0]
    table = nb11.graph_and_compile(both, compiled)
    assert table.loc["eager", "CUDA graph"].startswith("cannot be captured: ")
    graph = both[(both["execution"] == "cuda_graph") & (both["backend"] == "grouped_mm")]
    assert table.loc["grouped_mm", "CUDA graph"].startswith(
        f"replayed at {int((graph['status'] == 'ok').sum())}/{len(graph)} points")
    assert table.loc["eager", "compile default"] == "not recorded"  # said as such, not guessed


def _planted(name, fn):
    moe_lab.register(name, fn)
    return name


def test_autograd_probe_finds_planted_gradient_bugs():
    from moe_lab.backends import eager_experts_forward

    def detached(experts, h, idx, w):
        return eager_experts_forward(experts, h, idx, w).detach()

    def no_weight_grad(experts, h, idx, w):
        return eager_experts_forward(experts, h, idx, w.detach())

    def refuses(experts, h, idx, w):
        if torch.is_grad_enabled() and h.requires_grad:
            raise NotImplementedError("no backward here; use eager, batched_mm or grouped_mm for training")
        return eager_experts_forward(experts, h, idx, w)

    def wrong(experts, h, idx, w):
        return eager_experts_forward(experts, h, idx, w) + 0.1 * h * h  # right value nowhere, wrong slope

    names = [_planted(f"planted_{f.__name__}", f) for f in (detached, no_weight_grad, refuses, wrong)]
    try:
        probe = nb11.autograd_probe(["eager", *names], device="cpu")
    finally:
        for name in names:
            moe_lab.unregister(name)
    assert probe.loc["eager", "supports training"]
    # moe_lab's guard turns a detached output, or one that does not reach an input, into a refusal with the reason
    assert probe.loc["planted_detached", "result"].startswith("refuses: DetachedOutputError")
    assert probe.loc["planted_no_weight_grad", "result"].startswith("refuses: DetachedOutputError") and \
        "does not reach top_k_weights" in probe.loc["planted_no_weight_grad", "result"]
    assert set(probe["declares autograd"]) == {"yes", "unknown"}
    assert probe.loc["planted_refuses", "result"].startswith("refuses: NotImplementedError: no backward here")
    assert probe.loc["planted_wrong", "result"].startswith("wrong gradient for hidden_states")
    assert nb11.trainable(probe) == ["eager"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note asks auto itself where a CUDA GPU is present")
def test_the_training_note_names_what_auto_runs_on_a_gpu_not_what_this_cpu_can_run(probe):
    # Asked on a machine without CUDA, choose_backend(..., "cuda") skips triton ("does not run here") and names
    # grouped_mm, which a learner on a laptop read as what auto runs on a GPU. The note quotes the CUDA rules.
    from moe_lab.backends.auto import DEFAULT_CROSSOVERS, pick

    note = nb11.auto_training_note(probe)
    expected = pick(DEFAULT_CROSSOVERS["cuda"], 1)
    assert f"on a CUDA GPU, uncalibrated, its rules name {expected} at T=1, {expected} at T=8192" in note
    assert "which trains correctly here too" in note  # triton's gradients matched through the interpreter


def test_auto_pick_is_explained_for_a_device_not_here():
    backend, why = moe_lab.choose_backend(1, "cuda", "bfloat16")
    assert backend in moe_lab.available_backends() and why


# --- the exercise --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe():
    # where the exercise's check probes: the GPU if there is one (triton's kernels), else the CPU (its interpreter)
    probe = nb11.autograd_probe(device=default_device())
    assert "triton" in probe.index, "triton should run wherever these tests run: the GPU, else its interpreter"
    return probe


def test_best_follows_the_data_and_the_probe(both, probe):
    for name, (_, preset, tokens, execution, triton, training) in ex.SCENARIOS.items():
        allowed = [b for b in nb11.MOE_LAB_BACKENDS if (triton or b != "triton")
                   and (not training or probe.loc[b, "supports training"])]
        assert ex.best(name, both, probe)[0] == _fastest(both, execution, preset, tokens, allowed)


def test_correct_answers_pass_and_ties_count(capsys, both, probe):
    assert ex.check_choices({name: ex.best(name)[0] for name in ex.SCENARIOS})
    assert capsys.readouterr().out.startswith("Correct")
    for name in ex.SCENARIOS:
        for tied in ex.ties(name, both, probe):  # any backend within the tie margin in every round counts
            answer = {n: ex.best(n)[0] for n in ex.SCENARIOS}
            answer[name] = tied
            assert ex.check_choices(answer), (name, tied)


def test_wrong_answers_say_what_is_off(both, probe):
    answer = {name: ex.best(name)[0] for name in ex.SCENARIOS}
    result = ex.check_choices({**answer, "finetune": "triton"})
    if not probe.loc["triton", "supports training"]:
        assert not result and "finetune: not triton: training needs gradients" in result.message
    result = ex.check_choices({**answer, "serve_decode_no_triton": "triton"})
    assert not result and "this GPU cannot run the triton kernels" in result.message
    result = ex.check_choices({**answer, "serve_decode": "eager"})
    assert not result and "serve_decode: eager did not run" in result.message and "unsupported" in result.message
    result = ex.check_choices({**answer, "prefill_no_triton": "auto"})
    assert not result and "auto only picks one of the others" in result.message
    result = ex.check_choices({**answer, "prefill_no_triton": "bmm"})
    assert not result and "'bmm' is not one of moe_lab's backends" in result.message
    assert not ex.check_choices({name: None for name in ex.SCENARIOS})
    assert "expected a dict" in ex.check_choices(["triton"]).message


def test_the_notebooks_solution_passes_the_check(capsys):
    cells = json.loads((Path(__file__).parents[1] / "notebooks" / "11_choosing_a_backend.ipynb").read_text())["cells"]
    solution = next("".join(c["source"]) for c in cells if "<summary>Solution</summary>" in "".join(c["source"]))
    namespace = {"SCENARIOS": ex.SCENARIOS}
    exec(re.search(r"```python\n(.*?)```", solution, re.S).group(1), namespace)
    assert ex.check_choices(namespace["answer"])
    assert capsys.readouterr().out.startswith("Correct")
