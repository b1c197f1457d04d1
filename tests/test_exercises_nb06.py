"""Notebook 06: the recorded-data helpers and the fastest-backend exercise."""
import pytest

from moe_lab.exercises import nb06_playground as ex
from moe_lab.lessons import nb06_playground as nb06
from moe_lab.recorded import load_recorded


@pytest.fixture(scope="module")
def recorded():
    return load_recorded("presets")[0]


def test_recorded_ceilings_of_one_run(recorded):
    ceilings = nb06.recorded_ceilings(recorded[recorded["preset"] == "qwen3-30b-a3b"])
    assert round(ceilings["copy_GBps"]) == 2978 and round(ceilings["matmul_TFLOPs"]) == 687
    assert ceilings["device"] == "NVIDIA H100 80GB HBM3" and ceilings["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="ceilings of one run, found 2"):
        nb06.recorded_ceilings(recorded)  # two files, two runs


def test_recorded_table_shape_and_refusals(recorded):
    table = nb06.recorded_table(recorded)
    assert table.shape == (30, 8)  # (roofline, speedup) x (eager, batched_mm, grouped_mm, triton)
    assert list(table.index.get_level_values(0).unique()) == list(dict.fromkeys(recorded["preset"]))
    assert table.loc[("qwen3-30b-a3b", 8192), ("fraction_of_roofline", "batched_mm")] == "refused"
    assert table.loc[("qwen3-30b-a3b", 8192), ("fraction_of_roofline", "grouped_mm")] == pytest.approx(0.341)
    assert table.loc[("deepseek-v3", 16), ("speedup_vs_transformers", "batched_mm")] == "refused"
    assert table.loc[("deepseek-v3", 16), ("speedup_vs_transformers", "triton")] == "—"  # no transformers twin


def test_fastest_from_the_data():
    truth = ex.fastest()
    assert truth[1][0] == "triton" and truth[1][1] == pytest.approx(0.138, abs=1e-3)
    assert truth[8192][0] == "triton" and truth[8192][1] == pytest.approx(0.490, abs=1e-3)


def test_correct_answer_passes(capsys):
    assert ex.check_fastest_qwen3({1: ("triton", 0.14), 8192: ("triton", 0.49)})
    assert ex.check_fastest_qwen3({1: ["triton", 0.1376], 8192: ["triton", 0.4896]})
    assert capsys.readouterr().out.startswith("Correct")


def test_refused_backend_and_percentage():
    result = ex.check_fastest_qwen3({1: ("triton", 13.8), 8192: ("batched_mm", 0.49)})
    assert not result
    assert "T=1: 13.8 looks like a percentage; give the fraction (0.138)" in result.message
    assert "T=8192: batched_mm was not measured there (status refused: GatherBudgetError" in result.message


def test_slower_backend_and_its_fraction():
    result = ex.check_fastest_qwen3({1: ("grouped_mm", 0.0733), 8192: ("transformers:grouped_mm", 0.197)})
    assert not result
    assert "T=1: grouped_mm took 0.346 ms, but triton took 0.184 ms" in result.message
    assert "0.0733 is the fraction of grouped_mm at T=1" in result.message
    assert "T=8192: transformers:grouped_mm took 4.57 ms, but triton took 1.84 ms" in result.message
    assert "0.197 is the fraction of transformers:grouped_mm at T=8192" in result.message


def test_swapped_fractions_and_unfilled_answer():
    result = ex.check_fastest_qwen3({1: ("triton", 0.49), 8192: ("triton", 0.138)})
    assert not result and "T=1: 0.49 is the fraction of triton at T=8192" in result.message


def test_a_fraction_no_row_has_is_reported_as_off():
    result = ex.check_fastest_qwen3({1: ("triton", 0.27), 8192: ("triton", 0.49)})
    assert not result and "T=1: fraction 0.27 is off by +0.132" in result.message


def test_unfilled_and_malformed_answers():
    assert not ex.check_fastest_qwen3({1: (None, None), 8192: (None, None)})
    assert "expected a dict" in ex.check_fastest_qwen3(None).message
    assert "no backend 'bmm'" in ex.check_fastest_qwen3({1: ("bmm", 0.15), 8192: ("grouped_mm", 0.27)}).message
