"""moe_lab.bench.live: one thread, rounds over the whole grid, and verdicts that say "too noisy"."""
import math

import pandas as pd
import pytest
import torch

import moe_lab
from moe_lab.bench import live
from moe_lab.bench.live import (Ratio, check_claim, claims_markdown, compare, measure_live, noise_summary,
                                single_threaded, spread_table)


def frame_of(rows):
    """A measure_live-shaped table from (backend, num_tokens, round medians) triples."""
    records = []
    for backend, tokens, medians in rows:
        ok = medians is not None
        records.append(dict(backend=backend, num_tokens=tokens, status="ok" if ok else "refused",
                            round_medians_ms=" ".join(str(m) for m in medians) if ok else "",
                            median_ms=sorted(medians)[len(medians) // 2] if ok else math.nan,
                            p10_ms=min(medians) if ok else math.nan, p90_ms=max(medians) if ok else math.nan,
                            rounds=len(medians) if ok else 1, noisy=False,
                            round_spread=max(medians) / min(medians) - 1 if ok else math.nan))
    return pd.DataFrame(records)


A, B = {"backend": "a", "num_tokens": 1}, {"backend": "b", "num_tokens": 1}


@pytest.mark.parametrize("a_rounds, b_rounds, verdict", [
    ([2.0, 2.2, 2.1, 1.9, 2.0], [1.0, 1.1, 1.0, 0.9, 1.2], "slower"),
    ([1.0, 1.1, 1.0, 0.9, 1.2], [2.0, 2.2, 2.1, 1.9, 2.0], "faster"),
    ([1.0, 1.05, 0.98, 1.0, 1.02], [1.0, 1.0, 1.0, 1.0, 1.0], "same"),
    # the pooled medians differ 2x, but one round says the opposite: a burst of load, not a difference
    ([2.0, 2.0, 0.5, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0], "too noisy"),
    ([2.0, 2.0], [1.0, 1.0], "too noisy"),  # fewer rounds than MIN_ROUNDS_FOR_VERDICT
])
def test_compare_reads_a_difference_only_when_every_round_agrees(a_rounds, b_rounds, verdict):
    frame = frame_of([("a", 1, a_rounds), ("b", 1, b_rounds)])
    result = compare(frame, A, B)
    assert result.verdict == verdict
    assert result.round_ratios == tuple(x / y for x, y in zip(a_rounds, b_rounds))
    if verdict == "too noisy":
        assert "too noisy to compare on this machine right now" in str(result)


def test_compare_pairs_rounds_so_drift_shared_by_both_cancels():
    # Both rows slow down together (a load burst in rounds 3-5); a is 1.5x b in every round.
    frame = frame_of([("a", 1, [1.5, 1.5, 15, 30, 60]), ("b", 1, [1, 1, 10, 20, 40])])
    assert compare(frame, A, B).verdict == "slower"


def test_ratio_compares_speedups_round_by_round():
    frame = frame_of([("eager", 64, [4, 4, 4]), ("grouped", 64, [1, 1, 1]),
                      ("eager", 1, [1, 1, 1]), ("grouped", 1, [1, 1.05, 0.95])])
    big = Ratio({"backend": "eager", "num_tokens": 64}, {"backend": "grouped", "num_tokens": 64})
    small = Ratio({"backend": "eager", "num_tokens": 1}, {"backend": "grouped", "num_tokens": 1})
    result = compare(frame, big, small)
    assert result.verdict == "slower" and result.ratio == pytest.approx(4.0)


def test_refused_rows_are_not_measured_and_claims_say_cannot_tell():
    frame = frame_of([("a", 1, [1, 1, 1]), ("b", 1, None)])
    claim = check_claim(frame, "a is slower than b", A, B, expect="slower")
    assert claim.comparison.verdict == "not measured" and claim.holds is None
    assert "cannot tell" in str(claim)


def test_claim_sentence_says_yes_or_no():
    frame = frame_of([("a", 1, [2, 2, 2]), ("b", 1, [1, 1, 1])])
    yes = check_claim(frame, "a took longer", A, B, expect="slower")
    no = check_claim(frame, "a was quicker", A, B, expect="faster")
    assert yes.holds is True and str(yes).startswith("On this machine, now, a took longer: **yes**")
    assert no.holds is False and "**no**" in str(no)
    assert claims_markdown([yes, no]).count("\n- ") == 1
    with pytest.raises(ValueError, match="expect must be"):
        check_claim(frame, "x", A, B, expect="bigger")


def test_selector_must_pick_one_row():
    frame = frame_of([("a", 1, [1, 1, 1]), ("a", 2, [1, 1, 1])])
    with pytest.raises(ValueError, match="picks 2 rows, not one"):
        compare(frame, {"backend": "a"}, A)
    with pytest.raises(KeyError, match="no column 'num_experts'"):
        compare(frame, {"num_experts": 8}, A)


def test_single_threaded_restores_the_thread_count():
    before = torch.get_num_threads()
    with single_threaded(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be"):
        with single_threaded(0):
            pass


def test_rounds_visit_the_whole_grid_forward_then_backward_on_one_thread(monkeypatch):
    visits = []
    real = live.measure_with_layer

    def spy(config, num_tokens, backend, **kwargs):
        visits.append((config.num_experts, num_tokens, backend, torch.get_num_threads()))
        return real(config, num_tokens, backend, **kwargs)

    monkeypatch.setattr(live, "measure_with_layer", spy)
    config = moe_lab.MoEConfig(16, 16, 4, 2)
    torch.set_num_threads(2)
    frame = measure_live(config, [1, 4], ["eager", "grouped_mm"], num_experts=[4, 8], rounds=3,
                         timing=dict(max_seconds=0.001, min_reps=2, warmup=1))
    forward = [(e, t, b) for e in (4, 8) for t in (1, 4) for b in ("eager", "grouped_mm")]
    assert [v[:3] for v in visits] == forward + forward[::-1] + forward
    assert {v[3] for v in visits} == {1}, "every visit runs on one thread"
    assert torch.get_num_threads() == 2
    assert len(frame) == 8 and (frame["rounds"] == 3).all()
    assert all(len(r.split()) == 3 for r in frame["round_medians_ms"])
    assert (frame["p10_ms"] <= frame["median_ms"]).all() and (frame["median_ms"] <= frame["p90_ms"]).all()
    assert frame["rel_err"].max() < 1e-5
    table = spread_table(frame, index=["num_experts", "num_tokens"])
    assert table.shape == (4, 2) and "(" in table.iloc[0, 0]
    assert "interleaved rounds" in noise_summary(frame)


def test_a_refused_point_is_measured_once_and_keeps_its_reason():
    config = moe_lab.MoEConfig(16, 16, 4, 2)
    with moe_lab.batched_mm_budget(1000):
        frame = measure_live(config, [64], ["batched_mm", "eager"], rounds=3,
                             timing=dict(max_seconds=0.001, min_reps=2, warmup=1))
    refused = frame[frame["backend"] == "batched_mm"].iloc[0]
    assert refused["status"] == "refused" and "GatherBudgetError" in refused["reason"] and refused["rounds"] == 1
    assert frame[frame["backend"] == "eager"].iloc[0]["rounds"] == 3
    invalid = measure_live(config, [1], ["eager"], top_k=[8], rounds=2, timing=dict(max_seconds=0.001))
    assert invalid.iloc[0]["status"] == "unsupported" and "top_k=8" in invalid.iloc[0]["reason"]


def test_bad_arguments_raise_before_anything_runs():
    config = moe_lab.MoEConfig(16, 16, 4, 2)
    with pytest.raises(ValueError, match="rounds must be"):
        measure_live(config, [1], ["eager"], rounds=0)
    with pytest.raises(ValueError, match="unknown timing options"):
        measure_live(config, [1], ["eager"], timing={"seconds": 1})
    with pytest.raises(ValueError, match="unknown sweep field"):
        measure_live(config, [1], ["eager"], num_expert=[4])
