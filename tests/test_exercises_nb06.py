"""Notebook 06: the recorded-data helpers and the fastest-backend exercise."""
import pytest

from moe_lab.exercises import nb06_playground as ex
from moe_lab.lessons import nb06_playground as nb06
from moe_lab.recorded_tables import load_recorded


@pytest.fixture(scope="module")
def recorded():
    return load_recorded("presets")[0]


@pytest.fixture(scope="module")
def qwen3(recorded):
    # auto is left out, as in the exercise: it runs one of the others
    return recorded[(recorded["preset"] == "qwen3-30b-a3b") & (recorded["status"] == "ok")
                    & (recorded["backend"] != "auto")]


def _row(qwen3, tokens, backend):
    return qwen3[(qwen3["num_tokens"] == tokens) & (qwen3["backend"] == backend)].iloc[0]


def _fastest_row(qwen3, tokens):
    """The lowest median at this T, found by sorting (ex.fastest uses idxmin): an independent answer."""
    return qwen3[qwen3["num_tokens"] == tokens].sort_values("median_ms").iloc[0]


# The expectations below are read from the recorded rows, so a new recording keeps them true; what
# they pin is how the helpers and the checker treat whatever was recorded.

def test_recorded_ceilings_of_one_run(recorded):
    rows = recorded[recorded["preset"] == "qwen3-30b-a3b"]
    ceilings = nb06.recorded_ceilings(rows)
    assert ceilings["copy_GBps"] == rows["ceiling_copy_GBps"].iloc[0]
    assert ceilings["matmul_TFLOPs"] == rows["ceiling_matmul_TFLOPs"].iloc[0]
    assert 2000 < ceilings["copy_GBps"] < 3400 and 500 < ceilings["matmul_TFLOPs"] < 1000  # an H100's
    assert ceilings["device"] == "NVIDIA H100 80GB HBM3" and ceilings["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="ceilings of one run, found 2"):
        nb06.recorded_ceilings(recorded)  # two files, two runs


def test_recorded_table_shape_and_refusals(recorded, qwen3):
    table = nb06.recorded_table(recorded)
    assert table.shape == (30, 8)  # (roofline, speedup) x (eager, batched_mm, grouped_mm, triton)
    assert list(table.index.get_level_values(0).unique()) == list(dict.fromkeys(recorded["preset"]))
    assert table.loc[("qwen3-30b-a3b", 8192), ("fraction_of_roofline", "batched_mm")] == "refused"
    assert table.loc[("qwen3-30b-a3b", 8192), ("fraction_of_roofline", "grouped_mm")] == pytest.approx(
        _row(qwen3, 8192, "grouped_mm")["fraction_of_roofline"], abs=5e-4)  # the table rounds to 3 places
    assert table.loc[("deepseek-v3", 16), ("speedup_vs_transformers", "batched_mm")] == "refused"
    assert table.loc[("deepseek-v3", 16), ("speedup_vs_transformers", "triton")] == "—"  # no transformers twin


def test_fastest_from_the_data(qwen3):
    truth = ex.fastest()
    for tokens in (1, 8192):
        best = _fastest_row(qwen3, tokens)
        # notebook 06's solution text names triton at both points; a recording where it is not must say so
        assert truth[tokens][0] == best["backend"] == "triton"
        assert truth[tokens][1] == pytest.approx(best["fraction_of_roofline"])


def test_correct_answer_passes(capsys, qwen3):
    f1, f8192 = (_fastest_row(qwen3, t)["fraction_of_roofline"] for t in (1, 8192))
    assert ex.check_fastest_qwen3({1: ("triton", round(f1, 2)), 8192: ("triton", round(f8192, 2))})
    assert ex.check_fastest_qwen3({1: ["triton", round(f1, 4)], 8192: ["triton", round(f8192, 4)]})
    assert capsys.readouterr().out.startswith("Correct")


def test_refused_backend_and_percentage(qwen3):
    f1, f8192 = (_fastest_row(qwen3, t)["fraction_of_roofline"] for t in (1, 8192))
    percent = round(100 * f1, 1)
    result = ex.check_fastest_qwen3({1: ("triton", percent), 8192: ("batched_mm", round(f8192, 2))})
    assert not result
    assert f"T=1: {percent} looks like a percentage; give the fraction ({percent / 100:.3g})" in result.message
    assert "T=8192: batched_mm was not measured there (status refused: GatherBudgetError" in result.message


def test_slower_backend_and_its_fraction(qwen3):
    slow1, slow8192 = _row(qwen3, 1, "grouped_mm"), _row(qwen3, 8192, "transformers:grouped_mm")
    best1, best8192 = _fastest_row(qwen3, 1), _fastest_row(qwen3, 8192)
    f1, f8192 = round(slow1["fraction_of_roofline"], 4), round(slow8192["fraction_of_roofline"], 3)
    result = ex.check_fastest_qwen3({1: ("grouped_mm", f1), 8192: ("transformers:grouped_mm", f8192)})
    assert not result
    assert f"T=1: grouped_mm took {slow1['median_ms']:.3g} ms, but triton took {best1['median_ms']:.3g} ms" \
        in result.message
    assert f"{f1} is the fraction of grouped_mm at T=1" in result.message
    assert (f"T=8192: transformers:grouped_mm took {slow8192['median_ms']:.3g} ms, but triton took "
            f"{best8192['median_ms']:.3g} ms") in result.message
    assert f"{f8192} is the fraction of transformers:grouped_mm at T=8192" in result.message


def test_swapped_fractions_and_unfilled_answer(qwen3):
    f1, f8192 = (round(_fastest_row(qwen3, t)["fraction_of_roofline"], 3) for t in (1, 8192))
    result = ex.check_fastest_qwen3({1: ("triton", f8192), 8192: ("triton", f1)})
    assert not result and f"T=1: {f8192} is the fraction of triton at T=8192" in result.message


def test_a_fraction_no_row_has_is_reported_as_off(qwen3):
    f1, f8192 = (_fastest_row(qwen3, t)["fraction_of_roofline"] for t in (1, 8192))
    # a fraction no qwen3 row has, at any T (else the checker names that row instead)
    wrong = next(w for w in (round(f1 + step, 2) for step in (0.13, 0.17, 0.21, 0.29))
                 if not (qwen3["fraction_of_roofline"] - w).abs().le(ex.FRACTION_TOLERANCE / 2).any())
    result = ex.check_fastest_qwen3({1: ("triton", wrong), 8192: ("triton", round(f8192, 2))})
    assert not result and f"T=1: fraction {wrong:.3g} is off by {wrong - f1:+.3g}" in result.message


def test_the_notebooks_solution_passes_the_check(recorded, capsys):
    # The code in notebook 06's Solution cell, run as a reader would, must satisfy the checker.
    import json
    import re
    from pathlib import Path

    cells = json.loads((Path(__file__).parents[1] / "notebooks" / "06_playground.ipynb").read_text())["cells"]
    solution = next("".join(c["source"]) for c in cells if "<summary>Solution</summary>" in "".join(c["source"]))
    code = re.search(r"```python\n(.*?)```", solution, re.S).group(1)
    namespace = {"recorded": recorded}
    exec(code, namespace)
    assert ex.check_fastest_qwen3(namespace["answer"])
    assert capsys.readouterr().out.startswith("Correct")


def test_auto_is_not_an_answer(qwen3):
    f1, f8192 = (round(_fastest_row(qwen3, t)["fraction_of_roofline"], 2) for t in (1, 8192))
    result = ex.check_fastest_qwen3({1: ("triton", f1), 8192: ("auto", f8192)})
    assert not result and "T=8192: auto only picks one of the other backends" in result.message


def test_unfilled_and_malformed_answers():
    assert not ex.check_fastest_qwen3({1: (None, None), 8192: (None, None)})
    assert "expected a dict" in ex.check_fastest_qwen3(None).message
    assert "no backend 'bmm'" in ex.check_fastest_qwen3({1: ("bmm", 0.15), 8192: ("grouped_mm", 0.27)}).message


# --- the sentences written from the data: they follow it (a planted change in the table moves them) -------


def test_reading_guide_follows_the_data(recorded):
    text = nb06.reading_guide(recorded)
    ours = recorded[recorded["backend"].isin(nb06.MOE_LAB_BACKENDS) & (recorded["status"] == "ok")]
    best = ours[ours["num_tokens"] == 1]["fraction_of_roofline"].max()
    assert f"reaches {best:.2f} of the roofline" in text
    later = ours[(ours["num_tokens"] >= 16) & (ours["backend"] == "grouped_mm")]["fraction_of_roofline"]
    assert f"grouped_mm {later.min():.2f}–{later.max():.2f}" in text
    # plant: one grouped_mm point twice as close to the roof, and a ratio whose rounds now straddle 1.0
    planted = recorded.copy()
    row = later.idxmax()
    planted.loc[row, "fraction_of_roofline"] = later.max() * 2
    tie = ours[ours["backend"] == "eager"].index[0]
    planted.loc[tie, ["speedup_lowest_round", "speedup_highest_round"]] = [0.9, 1.1]
    moved = nb06.reading_guide(planted)
    assert f"grouped_mm {later.min():.2f}–{later.max() * 2:.2f}" in moved and moved != text
    assert f"eager on {recorded.loc[tie, 'preset']} at T={recorded.loc[tie, 'num_tokens']}: 0.90–1.10x" in moved


def test_replay_summary_says_when_moe_lab_is_not_faster(recorded):
    from moe_lab.bench import best_paths

    best = best_paths(load_recorded("presets", execution=None)[0])
    assert "faster at every recorded point" in nb06.replay_summary(best, recorded)
    slower = best.copy()
    slower.loc[slower.index[0], "speedup"] = 0.8  # plant: transformers ahead at one point
    text = nb06.replay_summary(slower, recorded)
    assert f"faster at {len(best) - 1} of {len(best)} recorded points" in text and "0.80–" in text


def test_every_recorded_set_with_an_execution_column_is_split_by_it():
    """load_recorded filters on the `execution` column wherever a set has one (asked of the data, not
    listed by set), so a set that later gains replayed rows cannot hand a reader both kinds mixed."""
    from moe_lab.bench.measure import EXECUTIONS
    from moe_lab.recorded_tables import RECORDED

    for kind in RECORDED:
        every, _ = load_recorded(kind, execution=None)
        launched, _ = load_recorded(kind)
        if "execution" not in every.columns:
            assert len(launched) == len(every), kind
            continue
        assert set(launched["execution"]) == {"eager"}, kind
        parts = {execution: load_recorded(kind, execution=execution)[0] for execution in EXECUTIONS}
        assert all(set(part["execution"]) <= {execution} for execution, part in parts.items()), kind
        assert sum(len(part) for part in parts.values()) == len(every), kind
    with pytest.raises(ValueError, match="unknown execution 'graph'; allowed: .*'cuda_graph'"):
        load_recorded("presets", execution="graph")
