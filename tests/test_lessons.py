"""The lessons' helpers: each notebook's parameter spec matches its parameters cell, bad values are
refused with what is allowed, the live claims read their tables, and the recorded readings follow the data."""
import ast
import json
import math
from pathlib import Path

import pandas as pd
import pytest

import moe_lab
from moe_lab.lessons import (nb00_start_here, nb01_routing, nb02_eager_loop, nb03_bmm, nb04_grouped, nb05_compile, nb09_training,
                             nb07_own_backend, nb08_real_models)
from moe_lab.lessons.figures import figure
from moe_lab.parameters import NotebookParameterError, check_values
from moe_lab.recorded_tables import load_recorded

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"00_start_here": nb00_start_here, "01_routing": nb01_routing, "02_eager_loop": nb02_eager_loop,
         "03_bmm_batching": nb03_bmm, "04_grouped_gemm": nb04_grouped, "05_torch_compile": nb05_compile,
         "07_your_own_backend": nb07_own_backend, "08_real_models": nb08_real_models}


def parameters_cell(stem):
    notebook = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
    cell = next(c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    defaults = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}
    return defaults, notebook["metadata"]["moe_lab"]["test_parameters"]


@pytest.mark.parametrize("stem", SPECS)
def test_spec_declares_exactly_the_parameters_cell(stem):
    defaults, test_parameters = parameters_cell(stem)
    spec = SPECS[stem].PARAMETERS
    assert spec.names == list(defaults), "the spec lists the parameters cell's names, in its order"
    check_values(spec, defaults)
    check_values(spec, {**defaults, **test_parameters})


@pytest.mark.parametrize("stem", SPECS)
def test_lists_given_as_text_parse_to_the_same_list(stem):
    defaults, _ = parameters_cell(stem)
    lists = {name: value for name, value in defaults.items() if isinstance(value, list)}
    as_text = check_values(SPECS[stem].PARAMETERS, {**defaults, **{name: str(v) for name, v in lists.items()}})
    assert {name: as_text[name] for name in lists} == lists


@pytest.mark.parametrize("stem, changes, message", [
    ("01_routing", {"top_k": 9, "num_experts": 8}, "top_k=9 must be at most num_experts=8"),
    ("02_eager_loop", {"sweep_tokens": ""}, "parameter sweep_tokens must be a list"),
    ("02_eager_loop", {"sweep_experts": [2, 8], "top_k": 4}, "every sweep_experts value must be at least top_k=4"),
    ("02_eager_loop", {"preset": "llama"}, "one of ['mixtral-8x7b'"),
    ("03_bmm_batching", {"hidden_size": 40}, "a multiple of 16"),
    ("04_grouped_gemm", {"expert_counts": "-1"}, "each an integer from 1 to 256"),
    ("04_grouped_gemm", {"num_tokens": True}, "got True"),
    ("05_torch_compile", {"modes": ["fast"]}, "one of ['default', 'reduce-overhead'"),
    ("05_torch_compile", {"backends": ["grouped"]}, "'grouped_mm'"),
    ("07_your_own_backend", {"capacity_factor": 0}, "must be a number > 0"),
    ("08_real_models", {"family": "llama"}, "one of ['qwen2_moe'"),
    ("08_real_models", {"dtype": "int8"}, "one of ['float32'"),
])
def test_bad_values_are_refused_in_the_notebooks_words(stem, changes, message):
    defaults, _ = parameters_cell(stem)
    with pytest.raises(NotebookParameterError) as error:
        check_values(SPECS[stem].PARAMETERS, {**defaults, **changes})
    assert message in str(error.value)


def test_modes_given_as_one_word_are_one_mode_not_its_letters():
    defaults, _ = parameters_cell("05_torch_compile")
    assert check_values(nb05_compile.PARAMETERS, {**defaults, "modes": "reduce-overhead"})["modes"] == ["reduce-overhead"]
    assert check_values(nb05_compile.PARAMETERS, {**defaults, "backends": "batched_mm,grouped_mm"})["backends"] == \
        ["batched_mm", "grouped_mm"]


# ----------------------------------------------------------------------------- live claims on made-up tables


def live_rows(rows):
    """A measure_live-shaped table from dicts that carry their round medians as a list."""
    records = []
    for row in rows:
        medians = row.pop("rounds")
        records.append({**row, "status": "ok", "round_medians_ms": " ".join(map(str, medians)),
                        "median_ms": sorted(medians)[len(medians) // 2], "rounds": len(medians)})
    return pd.DataFrame(records)


def test_nb02_claims_follow_the_live_numbers():
    fast, slow = [1.0] * 5, [3.0, 3.1, 2.9, 3.0, 3.2]
    live = live_rows([
        {"backend": "eager", "num_experts": 8, "num_tokens": 64, "experts_hit": 8, "rounds": fast},
        {"backend": "eager", "num_experts": 32, "num_tokens": 64, "experts_hit": 32, "rounds": slow},
        {"backend": "grouped_mm", "num_experts": 8, "num_tokens": 64, "experts_hit": 8, "rounds": fast},
        {"backend": "grouped_mm", "num_experts": 32, "num_tokens": 64, "experts_hit": 32, "rounds": [1.2] * 5},
    ])
    same = live_rows([{"distribution": "single", "num_tokens": 64, "experts_hit": 4, "rounds": fast},
                      {"distribution": "uniform", "num_tokens": 64, "experts_hit": 16, "rounds": [1.0, 1.0, 5.0, 1.0, 1.0]}])
    text = nb02_eager_loop.live_claims(live, same)
    lines = text.splitlines()
    assert "32 experts hit (E=32) than with 8 (E=8)" in lines[0] and "**yes**" in lines[0]
    assert "slowed eager more than grouped_mm" in lines[1] and "**yes**" in lines[1]
    assert "**cannot tell**" in lines[2] and "too noisy to compare on this machine right now" in lines[2]


def test_nb03_and_nb04_claims_say_no_when_the_numbers_say_no():
    live = live_rows([{"backend": "batched_mm", "num_tokens": 1, "rounds": [2.0] * 3},
                      {"backend": "grouped_mm", "num_tokens": 1, "rounds": [1.0] * 3},
                      {"backend": "batched_mm", "num_tokens": 64, "rounds": [5.0] * 3},
                      {"backend": "grouped_mm", "num_tokens": 64, "rounds": [1.0] * 3}])
    first, second = nb03_bmm.live_claims(live).splitlines()
    assert "at T=1 batched_mm" in first and "**no**" in first and "**yes**" in second
    grid = live_rows([{"backend": b, "num_experts": e, "num_tokens": 128, "rounds": [t] * 3}
                      for b, e, t in [("eager", 8, 2.0), ("grouped_mm", 8, 1.0), ("eager", 64, 2.0), ("grouped_mm", 64, 1.0)]])
    faster, larger = nb04_grouped.live_claims(grid).splitlines()
    assert "**yes**" in faster and "**no**" in larger  # the same 2x at 8 and 64 experts: not larger


# ----------------------------------------------------------------------------- recorded readings


def test_recorded_readings_quote_the_tables():
    recorded, _ = load_recorded("presets")
    ms = recorded.pivot_table(index=["preset", "num_tokens"], columns="backend", values="median_ms")
    text = nb02_eager_loop.recorded_reading(recorded)
    assert f"deepseek-v3: 100 experts, {ms.loc[('deepseek-v3', 16), 'eager']:.2f} ms" in text
    growth = ms.loc[("qwen3-30b-a3b", 8192), "eager"] / ms.loc[("qwen3-30b-a3b", 128), "eager"] - 1
    assert f"qwen3-30b-a3b's time {'grew' if growth > 0 else 'fell'} by {abs(growth) * 100:.0f} %" in text
    reading = nb04_grouped.recorded_reading(recorded)
    ratio = ms.loc[("mixtral-8x7b", 1024), "eager"] / ms.loc[("mixtral-8x7b", 1024), "grouped_mm"]
    assert f"{ratio:.2f}× on mixtral-8x7b" in reading
    assert "batched_mm was faster than grouped_mm on" in nb03_bmm.recorded_t1_reading(recorded)
    assert "0.69 GiB" in nb01_routing.recorded_reading(recorded)


def test_recorded_training_steps_quote_the_same_run_table():
    recorded, provenance = load_recorded("backward")
    steps, label = nb09_training.recorded_training_steps()
    assert provenance["device_name"] in label
    ok = recorded[recorded["status"] == "ok"].set_index(["preset", "num_tokens", "backend"])["median_ms"]
    for _, row in steps.iterrows():
        point = (row["preset"], row["T"])
        best = min(ok[(*point, "triton")], ok[(*point, "grouped_mm")])
        assert row["× transformers"] == pytest.approx(ok[(*point, "transformers:grouped_mm")] / best)
        assert row["best moe_lab"] == ("triton" if ok[(*point, "triton")] == best else "grouped_mm")
    text = nb09_training.describe_recorded_training_steps(steps)
    wins = int((steps["× transformers"] > 1).sum())
    assert f"faster than transformers' grouped_mm at {wins} of {len(steps)} points" in text
    # a point where triton's peak is above transformers' is named; one made equal is not
    over = steps[steps["triton peak GiB"] > steps["transformers peak GiB"]]
    if len(over):
        first = over.iloc[0]
        assert f"{first['preset']} T={first['T']}" in text
        evened = steps.copy()
        evened.loc[over.index, "triton peak GiB"] = evened.loc[over.index, "transformers peak GiB"]
        assert "at or below transformers' at every point" in nb09_training.describe_recorded_training_steps(evened)


def test_host_rerecord_sentence_quotes_its_own_table(monkeypatch):
    import moe_lab.recorded_tables as recorded_tables

    frame, _ = load_recorded("backward_host")
    ok = frame[(frame["status"] == "ok") & (frame["num_tokens"] == 8192)].pivot_table(
        index="preset", columns="backend", values="median_ms")
    speedups = ok["transformers:grouped_mm"] / ok["triton"]
    text = nb09_training.describe_host_rerecord()
    assert f"{speedups.min():.2f}–{speedups.max():.2f}× transformers' grouped_mm" in text
    # a planted slower triton row moves the sentence: it is computed, not typed
    real = recorded_tables.load_recorded

    def slower(kind="presets", execution="eager"):
        table, info = real(kind, execution)
        if kind == "backward_host":
            table = table.copy()
            table.loc[table["backend"] == "triton", "median_ms"] *= 2
        return table, info

    monkeypatch.setattr(recorded_tables, "load_recorded", slower)
    assert f"{speedups.min() / 2:.2f}–{speedups.max() / 2:.2f}× transformers' grouped_mm" in \
        nb09_training.describe_host_rerecord()


def test_graph_rerecord_sentence_quotes_its_own_table(monkeypatch):
    import moe_lab.recorded_tables as recorded_tables

    frame, _ = load_recorded("backward_graph", execution=None)
    ok = frame[(frame["status"] == "ok") & (frame["num_tokens"] == 8192)]
    replayed = ok[(ok["backend"] == "triton") & (ok["execution"] == "cuda_graph")]["tflops"]
    text = nb09_training.describe_graph_rerecord()
    assert f"triton at {replayed.min():.0f}–{replayed.max():.0f} TFLOP/s replayed" in text
    assert "not capturable: liger:fused_moe: it waits for the GPU on the host" in text  # the recorded refusal
    real = recorded_tables.load_recorded

    def slower(kind="presets", execution="eager"):  # a planted slower replay moves the sentence
        table, info = real(kind, execution)
        if kind == "backward_graph":
            table = table.copy()
            rows = (table["backend"] == "triton") & (table["execution"] == "cuda_graph")
            table.loc[rows, "tflops"] /= 2
        return table, info

    monkeypatch.setattr(recorded_tables, "load_recorded", slower)
    assert f"triton at {replayed.min() / 2:.0f}–{replayed.max() / 2:.0f} TFLOP/s replayed" in \
        nb09_training.describe_graph_rerecord()


def test_back_to_back_sentence_quotes_its_own_table(monkeypatch):
    import moe_lab.recorded_tables as recorded_tables

    frame, provenance = load_recorded("backward_back_to_back", execution=None)
    ok = frame[frame["status"] == "ok"]
    ms = ok.pivot_table(index=["preset", "backend"], columns="execution", values="median_ms")
    ratio = ms["cuda_graph_back_to_back"] / ms["cuda_graph"]
    text = nb09_training.describe_back_to_back()
    assert f"{ratio.min():.3f}–{ratio.max():.3f}× its synchronized replay's" in text
    clocks = provenance["clocks_over_500_W"].values()
    assert (f"active in {sum(c['power_capped'] for c in clocks)} of the "
            f"{sum(c['samples_over_500_W'] for c in clocks)} clock samples") in text
    real = recorded_tables.load_recorded

    def slower_loop(kind="presets", execution="eager"):  # a planted slower back-to-back triton moves the sentence
        table, info = real(kind, execution)
        if kind == "backward_back_to_back":
            table = table.copy()
            rows = (table["backend"] == "triton") & (table["execution"] == "cuda_graph_back_to_back")
            table.loc[rows, "median_ms"] *= 2
            table.loc[rows, "tflops"] /= 2
        return table, info

    monkeypatch.setattr(recorded_tables, "load_recorded", slower_loop)
    planted = nb09_training.describe_back_to_back()
    assert f"{ratio.max():.3f}× its synchronized" not in planted and "–2.0" in planted


def test_compile_reading_lists_what_was_not_recorded_and_follows_new_modes():
    recorded, provenance = load_recorded("compile")
    assert "Not recorded**: modes max-autotune, max-autotune-no-cudagraphs" in nb05_compile.compile_reading(recorded, provenance)
    # a recording that adds max-autotune-no-cudagraphs: the reading stops calling it unrecorded
    extra = recorded[recorded["mode"] == "default"].assign(mode="max-autotune-no-cudagraphs")
    more = pd.concat([recorded, extra], ignore_index=True)
    reading = nb05_compile.compile_reading(more, provenance)
    assert "modes max-autotune;" in reading or "modes max-autotune." in reading
    table = nb05_compile.seed_comparison(more, provenance).set_index(["backend", "mode"])
    assert table.loc[("grouped_mm", "max-autotune-no-cudagraphs"), "recorded, moe_lab"].startswith("compiled")
    assert table.loc[("grouped_mm", "reduce-overhead"), "transformers' table says"] == "no"


def test_break_even_only_where_every_round_saved_time():
    live = pd.DataFrame([
        {"mode": "default", "backend": "a", "status": "compiled", "compile_s": 1.0, "uncompiled_ms": 1.0,
         "compiled_ms": 0.5, "compiled_round_ms": "0.5 0.5 0.52"},
        {"mode": "default", "backend": "b", "status": "compiled", "compile_s": 1.0, "uncompiled_ms": 1.0,
         "compiled_ms": 0.5, "compiled_round_ms": "0.5 1.2 0.5"},
        {"mode": "default", "backend": "c", "status": "failed", "compile_s": math.nan, "uncompiled_ms": math.nan,
         "compiled_ms": math.nan, "compiled_round_ms": ""}])
    table = nb05_compile.break_even_table(live).set_index("backend")
    assert table.loc["a", "verdict"] == "faster" and table.loc["a", "calls_to_break_even"] == pytest.approx(2000)
    assert table.loc["b", "verdict"] == "no clear difference" and math.isnan(table.loc["b", "calls_to_break_even"])
    assert table.loc["c", "verdict"] == "not compiled"


def test_nb07_edge_cases_do_not_depend_on_the_notebooks_token_count():
    cases = nb07_own_backend.edge_cases(8, 2, 16)
    assert {case: tuple(h.shape) for case, (h, _, _) in cases.items()} == {
        "zero-token experts": (16, 16), "one token": (1, 16), "no tokens": (0, 16), "top_k = E": (8, 16)}
    experts = moe_lab.Experts(moe_lab.MoEConfig(16, 32, 8, 2))
    for h, index, weights in cases.values():
        out = nb07_own_backend.sorted_loop_experts_forward(experts, h, index, weights)
        assert moe_lab.relative_error(out, moe_lab.reference_experts_forward(experts, h, index, weights)) < 1e-5



@pytest.mark.parametrize("stem", SPECS)
def test_papermill_reads_every_declared_parameter(stem):
    """moe-lab run refuses names papermill cannot read from the parameters cell: a comment papermill's
    parser chokes on (">=" in it did) would make a real parameter "unknown"."""
    from moe_lab.notebook_runner import notebook_parameters

    assert list(notebook_parameters(ROOT / "notebooks" / f"{stem}.ipynb")) == SPECS[stem].PARAMETERS.names


def test_scale_down_says_what_its_rounding_does():
    """The docstring's example is true: I/H is kept only up to rounding to 16 elements."""
    assert moe_lab.scale_down("qwen3-30b-a3b", hidden_size=32).intermediate_size == 16  # I/H 0.5, 2I = H
    assert moe_lab.scale_down("qwen3-30b-a3b", hidden_size=128).intermediate_size == 48  # I/H 0.375
    assert "up to rounding" in moe_lab.scale_down.__doc__


def test_power_state_sentences_follow_the_recording(monkeypatch):
    """Notebook 09's power-state sentences (describe_power_state) are computed from the recorded runs of
    tools/step_power_state.py: a planted change to one block's time and clock moves them."""
    import copy

    import moe_lab.recorded_tables as recorded_tables

    run = recorded_tables.load_power_state("qwen3-30b-a3b")
    triton = run["summary"]["triton"]
    text = nb09_training.describe_power_state(presets=("qwen3-30b-a3b",))
    assert f"triton {triton['back_to_back']['median_ms']:.2f} ms back to back" in text
    assert f"against {triton['rested']['median_ms']:.2f} ms rested" in text
    assert run["provenance"]["device_name"] in text and run["provenance"]["git_commit"][:7] in text
    planted = copy.deepcopy(run)
    planted["summary"]["triton"]["back_to_back"].update(median_ms=triton["rested"]["median_ms"] * 1.5, tflops=1.0)
    for block in planted["blocks"]:
        if block["implementation"] == "triton" and block["mode"] == "back_to_back":
            block["clocks"]["median_clock_mhz"] = 1234
    monkeypatch.setattr(recorded_tables, "load_power_state", lambda preset: planted)
    moved = nb09_training.describe_power_state(presets=("qwen3-30b-a3b",))
    assert "(1 TFLOP/s, 1234 MHz)" in moved and "+50.0%" in moved
    monkeypatch.setattr(recorded_tables, "load_power_state", lambda preset: (_ for _ in ()).throw(
        recorded_tables.NotRecordedYet("no power-state run")))
    with pytest.raises(recorded_tables.NotRecordedYet):
        nb09_training.describe_power_state()


def test_the_recorded_training_table_covers_the_issues_grid():
    """Six presets x T in {128, 1024, 8192, 32768} (issue 14), read from the two files of the "backward" set; the
    label names both days the points were recorded on."""
    steps, label = nb09_training.recorded_training_steps()
    grid = {(preset, T) for preset in moe_lab.PRESETS for T in (128, 1024, 8192, 32768)}
    assert set(zip(steps["preset"], steps["T"])) == grid
    assert steps["× transformers"].notna().all()
    assert "2026-11-28 to 2026-11-29" in label and label.startswith("NVIDIA H200")
