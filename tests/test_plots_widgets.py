"""moe_lab.plots (figures from tidy result frames) and moe_lab.widgets (driven headless)."""
import math
import re
import subprocess
import sys

import pytest
import torch

pd = pytest.importorskip("pandas")
go = pytest.importorskip("plotly.graph_objects")
pytest.importorskip("ipywidgets")

import moe_lab  # noqa: E402
from html import escape as html_escape  # noqa: E402
from moe_lab import plots  # noqa: E402

MIB = 2**20
REFUSAL = "predicted gathered weights 5.00 GiB exceed the batched_mm budget 4.00 GiB"


def _row(backend, num_tokens, num_experts=8, top_k=2, ms=None, status="ok", reason="", **extra):
    H, I, itemsize = 64, 128, 4
    ok = status == "ok"
    ms = ms if ms is not None else 0.01 * num_tokens * top_k
    flops = 6 * num_tokens * top_k * H * I
    min_bytes = num_experts * 3 * H * I * itemsize + 2 * num_tokens * H * itemsize
    row = dict(
        backend=backend, preset="toy", hidden_size=H, intermediate_size=I, num_experts=num_experts, top_k=top_k,
        num_tokens=num_tokens, dtype="float32", device="cpu", distribution="uniform", skew=1.0,
        experts_hit=float(num_experts), status=status, reason=reason,
        median_ms=ms if ok else math.nan, p10_ms=0.9 * ms if ok else math.nan, p90_ms=1.2 * ms if ok else math.nan,
        reps=10.0 if ok else math.nan, peak_bytes=1000.0 * num_tokens if ok else math.nan,
        memory_method="test", predicted_bytes=1100.0 * num_tokens, predicted_gather_bytes=0.0, flops=float(flops),
        min_bytes=float(min_bytes), tflops=flops / (ms * 1e-3) / 1e12 if ok else math.nan, gbps=math.nan,
        roofline_ms=math.nan, fraction_of_roofline=math.nan, grouped_mm_kernel="", rel_err=1e-7 if ok else math.nan,
        device_name="Test CPU", torch_version=torch.__version__, moe_lab_version="0.1.0",
        date="2025-01-02T03:04:05+00:00", git_commit="unknown",
    )
    row.update(extra)
    return row


@pytest.fixture
def results():
    """eager 2x slower than grouped_mm everywhere; batched_mm refused at T=1024."""
    rows = []
    for T in (16, 128, 1024):
        rows.append(_row("eager", T, ms=0.02 * T))
        rows.append(_row("grouped_mm", T, ms=0.01 * T))
        if T == 1024:
            rows.append(_row("batched_mm", T, status="refused", reason=REFUSAL))
        else:
            rows.append(_row("batched_mm", T, ms=0.015 * T))
    return pd.DataFrame(rows)


def _kind(status_widget):
    """The coloured word the widgets put first in their status line ("ok", "refused", ...)."""
    match = re.search(r"<b[^>]*>(\w+)</b>", status_widget.value)
    return match.group(1) if match else None


def _by_name(fig):
    return {t.name: t for t in fig.data}


# --- plots -------------------------------------------------------------------------------------
def test_import_moe_lab_does_not_import_plotting():
    code = "import sys, moe_lab; bad = [m for m in ('plotly', 'ipywidgets', 'pandas') if m in sys.modules]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_latency_vs_tokens_lines_log_axes_and_refused_row(results):
    fig = plots.latency_vs_tokens(results)
    assert isinstance(fig, go.Figure)
    traces = _by_name(fig)
    assert set(traces) == {"eager", "batched_mm", "grouped_mm", "batched_mm: not run"}
    assert [t.name for t in fig.data][0] == "eager"  # lesson order, not alphabetical
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert "ms" in fig.layout.yaxis.title.text and "tokens" in fig.layout.xaxis2.title.text
    assert "Test CPU" in fig.layout.title.text and "2025-01-02" in fig.layout.title.text
    grouped = traces["grouped_mm"]
    assert list(grouped.x) == [16, 128, 1024]
    assert list(grouped.y) == pytest.approx([0.16, 1.28, 10.24])
    # p10..p90 error bars
    assert list(grouped.error_y.array) == pytest.approx([0.2 * y for y in grouped.y])
    assert list(traces["batched_mm"].x) == [16, 128]
    # the refused row is not drawn on the milliseconds axis: it sits in a strip of its own, named
    refused = traces["batched_mm: not run"]
    assert list(refused.x) == [1024] and list(refused.y) == ["batched_mm: refused"]
    assert refused.yaxis == "y2" and grouped.yaxis == "y" and fig.layout.yaxis2.type == "category"
    assert fig.layout.yaxis2.title.text == "not run" and fig.layout.yaxis2.domain[1] < fig.layout.yaxis.domain[0]
    assert REFUSAL in refused.hovertext[0].replace("<br>", " ")
    assert "refused" in refused.hovertext[0]
    assert refused.customdata[0][0] == "refused"
    assert refused.showlegend is False  # the legend lists lines, the strip names what did not run
    # the token counts are the ticks; the legend sits under the plot, in rows
    assert list(fig.layout.xaxis2.tickvals) == [16, 128, 1024]
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0


def test_latency_vs_tokens_without_refusals_has_no_strip(results):
    fig = plots.latency_vs_tokens(results[results["status"] == "ok"])
    assert "yaxis2" not in fig.layout.to_plotly_json()
    assert {t.yaxis for t in fig.data} == {"y"}


def test_log_ticks_are_written_in_full():
    from moe_lab.plots._common import log_ticks, tick_label

    ticks = log_ticks([0.15, 0.4, 3.0])
    labels = dict(zip(ticks["tickvals"], ticks["ticktext"]))
    assert labels[0.5] == "0.5" and labels[0.2] == "0.2" and labels[2] == "2" and labels[1] == "1"
    for value, text in labels.items():  # every label is its own value (plotly's default writes 0.5 as "5")
        assert float(text.removesuffix("k")) * (1000 if text.endswith("k") else 1) == pytest.approx(value)
    wide = log_ticks([0.001, 5000.0])
    inside = [v for v in wide["tickvals"] if 0.001 <= v <= 5000]
    assert 2 <= len(inside) <= 9
    narrow = log_ticks([0.0625, 0.0625])  # one value (a flat line): the decades around it, still in full
    assert "0.05" in narrow["ticktext"] and "0.1" in narrow["ticktext"] and log_ticks([]) == {}
    assert tick_label(2000) == "2k" and tick_label(0.05) == "0.05" and tick_label(3e6) == "3M"


def test_other_library_backends_are_dashed_in_the_same_colour(results):
    other = results.assign(backend="transformers:" + results["backend"])
    traces = _by_name(plots.latency_vs_tokens(pd.concat([results, other])))
    ours, theirs = traces["grouped_mm"], traces["transformers:grouped_mm"]
    assert ours.line.color == theirs.line.color and theirs.line.dash == "dash" and ours.line.dash == "solid"


def test_user_backends_get_colours_of_their_own(results):
    mine = pd.concat([results, results.assign(backend="sorted_loop"), results.assign(backend="padded")])
    colors = {t.name: t.line.color for t in plots.latency_vs_tokens(mine).data if t.meta["kind"] == "measured"}
    assert len(set(colors.values())) == len(colors) == 5, colors


def test_latency_vs_tokens_names_lines_by_varying_config_and_facets(results):
    more = pd.concat([results, results.assign(num_experts=64, median_ms=results["median_ms"] * 3)])
    names = {t.name for t in plots.latency_vs_tokens(more).data}
    assert {"eager E=8", "eager E=64", "grouped_mm E=64", "batched_mm E=64: not run"} <= names
    faceted = plots.latency_vs_tokens(more, facet_col="num_experts")
    assert {t.name for t in faceted.data} == {"eager", "batched_mm", "grouped_mm", "batched_mm: not run"}
    measured = [t for t in faceted.data if t.meta["kind"] == "measured"]
    assert {t.xaxis for t in measured} == {"x", "x2"}
    assert faceted.layout.xaxis2.type == "log"
    assert sum(t.showlegend is not False for t in faceted.data) == 3  # legend entries once per line


def test_plots_reject_frames_without_needed_columns():
    with pytest.raises(ValueError, match="median_ms"):
        plots.latency_vs_tokens(pd.DataFrame({"backend": ["eager"], "num_tokens": [1]}))


def test_memory_vs_tokens_measured_points_and_dashed_prediction(results):
    fig = plots.memory_vs_tokens(results, budget_bytes=4 * 2**30)
    grouped = [t for t in fig.data if t.meta["backend"] == "grouped_mm"]
    measured, predicted = ({t.meta["kind"]: t for t in grouped}[k] for k in ("measured", "predicted"))
    assert measured.mode == "markers" and predicted.line.dash == "dash"
    assert measured.marker.color == predicted.line.color
    assert [t.showlegend for t in grouped] == [True, False]  # one legend entry per line
    assert list(measured.y) == pytest.approx([1000 * T / MIB for T in (16, 128, 1024)])
    assert list(predicted.y) == pytest.approx([1100 * T / MIB for T in (16, 128, 1024)])
    # the refused batched_mm row sits on its prediction, with its reason
    refused = _by_name(fig)["batched_mm: not run"]
    assert list(refused.y) == pytest.approx([1100 * 1024 / MIB]) and list(refused.text) == ["refused"]
    assert REFUSAL in refused.hovertext[0].replace("<br>", " ")
    batched_predicted = [t for t in fig.data if t.meta == {"backend": "batched_mm", "kind": "predicted"}][0]
    assert list(batched_predicted.x) == [16, 128, 1024]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert "MiB" in fig.layout.yaxis.title.text and "measured by test" in fig.layout.title.text
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == pytest.approx(4 * 1024)  # budget line


def test_speedup_heatmap_values_and_unmeasured_cells(results):
    more = pd.concat([results, results.assign(num_experts=64)])
    fig = plots.speedup_heatmap(more)
    heat = fig.data[0]
    assert heat.type == "heatmap"
    assert list(heat.x) == ["16", "128", "1024"] and list(heat.y) == ["8", "64"]
    assert heat.z.tolist() == [[1.0] * 3] * 2  # log2(2x)
    assert heat.text[0][0] == "2×"
    assert "tokens" in fig.layout.xaxis.title.text and "experts" in fig.layout.yaxis.title.text

    fig = plots.speedup_heatmap(more, baseline="eager", backend="batched_mm")
    assert math.isnan(fig.data[0].z[0][2])
    missing = _by_name(fig)["not measured"]
    assert list(missing.x) == ["1024", "1024"]
    assert REFUSAL in missing.hovertext[0].replace("<br>", " ")
    with pytest.raises(ValueError, match="no rows for backend 'nope'"):
        plots.speedup_heatmap(more, backend="nope")


def test_roofline_chart_roofs_and_points(results):
    ceilings = {"copy_GBps": 20.0, "matmul_TFLOPs": 0.5, "device": "cpu", "dtype": "float32"}
    fig = plots.roofline_chart(results, ceilings)
    traces = _by_name(fig)
    memory_roof = traces["memory roof (20 GB/s)"]
    compute_roof = traces["compute roof (0.5 TFLOP/s)"]
    ridge = 0.5e12 / 20e9
    assert memory_roof.x[-1] == pytest.approx(ridge) and memory_roof.y[-1] == pytest.approx(0.5)
    assert memory_roof.y[0] == pytest.approx(memory_roof.x[0] * 20 / 1e3)
    assert list(compute_roof.y) == [0.5, 0.5]
    grouped = results[results.backend == "grouped_mm"]
    assert list(traces["grouped_mm"].x) == pytest.approx((grouped.flops / grouped.min_bytes).tolist())
    assert list(traces["grouped_mm"].y) == pytest.approx(grouped.tflops.tolist())
    assert len(traces["batched_mm"].x) == 2  # the refused row has no throughput
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert "FLOP" in fig.layout.xaxis.title.text and "TFLOP/s" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="copy_GBps"):
        plots.roofline_chart(results, {"matmul_TFLOPs": 1.0})


def test_routing_histogram_from_index_or_stats():
    idx, _ = moe_lab.synthetic_routing(256, 8, 2, distribution="zipf", skew=1.5, seed=1)
    fig = plots.routing_histogram(idx, 8)
    bars, mean = fig.data
    assert bars.type == "bar" and list(bars.x) == list(range(8))
    assert list(bars.y) == moe_lab.tokens_per_expert(idx, 8).tolist() and sum(bars.y) == 512
    assert list(mean.y) == [64.0, 64.0] and mean.name.startswith("mean load")
    assert "experts hit" in fig.layout.title.text
    same = plots.routing_histogram(moe_lab.routing_stats(idx, 8))
    assert list(same.data[0].y) == list(bars.y)
    with pytest.raises(ValueError, match="expert indices"):
        plots.routing_histogram(idx, 4)


def test_routing_heatmap_places_weights():
    idx, w = moe_lab.synthetic_routing(40, 6, 3, seed=2)
    fig = plots.routing_heatmap(idx, w, 6, max_tokens=16)
    z = fig.data[0].z  # gaps are None (JSON-safe for FigureWidgets), not NaN
    assert len(z) == 16 and all(len(row) == 6 for row in z)
    for t in range(16):
        used = [e for e in range(6) if z[t][e] is not None]
        assert sorted(used) == sorted(idx[t].tolist())
        for slot in range(3):
            assert z[t][int(idx[t, slot])] == pytest.approx(float(w[t, slot]))
    assert "first 16 of 40 tokens" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "expert index"


@pytest.fixture
def compile_df():
    rows = []
    for mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        for backend in ("eager", "batched_mm", "grouped_mm"):
            for T in (16, 64):
                failed = backend == "grouped_mm" and mode == "max-autotune"
                refused = backend == "batched_mm" and mode == "reduce-overhead"
                rows.append(dict(
                    mode=mode, backend=backend, num_tokens=T,
                    status="failed" if failed else "refused" if refused else "compiled",
                    error="BackendCompilerFailed: inductor exploded" if failed else "",
                    compile_s=1.0, compiled_ms=1.0, uncompiled_ms=1.5, speedup=1.5, max_rel_err=0.0,
                    equal_to_uncompiled=True, equal_after_routing_change=backend != "eager",
                    device_name="Test CPU", date="2025-01-02T00:00:00+00:00",
                ))
    return pd.DataFrame(rows)


def test_compile_matrix_chart_grid(compile_df):
    fig = plots.compile_matrix_chart(compile_df[compile_df.num_tokens == 64])
    speed, failed = _by_name(fig)["speedup"], _by_name(fig)["not compiled"]
    assert list(speed.x) == ["eager", "batched_mm", "grouped_mm"]
    assert list(speed.y) == ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    assert speed.z[0][2] == pytest.approx(math.log2(1.5))
    assert speed.text[0][2] == "1.5×" and speed.text[0][0] == "1.5× ≠"  # eager wrong after routing change
    assert failed.text[2][2] == "failed" and failed.z[2][2] == 1.0
    assert "inductor exploded" in failed.hovertext[2][2]
    assert failed.text[1][1] == "refused" and math.isnan(speed.z[1][1])
    both = plots.compile_matrix_chart(compile_df)
    assert list(both.data[0].x)[:2] == ["eager<br>T=16", "eager<br>T=64"]
    other = plots.compile_matrix_chart(compile_df.assign(backend="transformers:" + compile_df["backend"]))
    assert "transformers:<br>eager<br>T=16" in list(other.data[0].x)  # upright, on lines of their own
    assert other.layout.xaxis.tickangle == 0


def test_colour_bars_carry_few_labels(results):
    from moe_lab.plots._common import colorbar_ticks

    for zmax in range(1, 12):
        ticks = colorbar_ticks(zmax)
        assert 0 in ticks and len(ticks) <= 7 and min(ticks) >= -zmax and max(ticks) <= zmax
    skewed = results.copy()
    skewed.loc[skewed["backend"] == "eager", "median_ms"] *= 300  # a 600x speedup: 2^-10..2^10
    bar = plots.speedup_heatmap(skewed).data[0].colorbar
    assert len(bar.tickvals) <= 7 and len(bar.ticktext) == len(bar.tickvals)


def test_recorded_explorer_dropdown_over_presets(results):
    other = results.assign(preset="big", device_name="NVIDIA H100 80GB HBM3", date="2025-03-04T00:00:00+00:00")
    fig = plots.recorded_explorer(pd.concat([results, other]))
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == ["toy on Test CPU", "big on NVIDIA H100 80GB HBM3"]
    per_group = len(fig.data) // 2
    assert [t.visible for t in fig.data] == [True] * per_group + [False] * per_group
    visible, layout = menu.buttons[1].args
    assert visible["visible"] == [False] * per_group + [True] * per_group
    assert "NVIDIA H100" in layout["title.text"] and "2025-03-04" in layout["title.text"]
    assert "Test CPU" in fig.layout.title.text and "2025-01-02" in fig.layout.title.text
    assert fig.layout.xaxis2.type == "log" and fig.layout.yaxis.type == "log"
    assert any(t.name == "batched_mm: not run" and t.yaxis == "y2" for t in fig.data)


# --- widgets -----------------------------------------------------------------------------------
class FakeMeasure:
    """Stands in for moe_lab.bench.measure: latency grows with T * top_k; batched_mm refused at T >= 1024."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, num_tokens, backend, *, device=None, dtype=None, **kwargs):
        self.calls.append(dict(config=config, num_tokens=num_tokens, backend=backend, dtype=dtype, kwargs=kwargs))
        extra = dict(dtype=str(dtype).removeprefix("torch."))
        if backend == "batched_mm" and num_tokens >= 1024:
            return _row(backend, num_tokens, config.num_experts, config.top_k, status="refused", reason=REFUSAL,
                        **extra)
        return _row(backend, num_tokens, config.num_experts, config.top_k,
                    ms=0.001 * num_tokens * config.top_k, **extra)


def _small_config():
    return moe_lab.MoEConfig(hidden_size=32, intermediate_size=32, num_experts=8, top_k=2)


@pytest.fixture
def explorer():
    from moe_lab.widgets import backend_explorer

    fake = FakeMeasure()
    w = backend_explorer(_small_config(), measure_fn=fake, tokens=(64, 128, 1024, 2048), max_seconds=0.01)
    return w, fake


def test_backend_explorer_measures_on_start_and_on_changes(explorer):
    w, fake = explorer
    import ipywidgets

    assert isinstance(w, ipywidgets.VBox)
    assert isinstance(w.figures["latency"], go.FigureWidget)
    assert w.figures["latency"] in w.children[-1].children
    # Every registered backend that runs compiled here: triton's CPU interpreter (seconds a call) is left out.
    assert list(w.controls["backend"].options) == moe_lab.runnable_backends(moe_lab.default_device(),
                                                                            interpreted=False)
    assert len(fake.calls) == 1 and fake.calls[0]["kwargs"] == {"max_seconds": 0.01}
    assert fake.calls[0]["num_tokens"] == 128 and fake.calls[0]["backend"] == "grouped_mm"
    assert w.controls["auto"].value is True  # it starts measuring on every change
    lat = w.figures["latency"]
    assert [t.name for t in lat.data] == ["grouped_mm"]  # one line per backend, named by the backend
    assert list(lat.data[0].y) == pytest.approx([0.256])
    assert _kind(w.status) == "ok" and "0.256 ms" in w.status.value
    assert "E=8, k=2, float32" in lat.layout.title.text  # the settings it shows are in the subtitle

    w.controls["top_k"].value = 4
    assert fake.calls[-1]["config"].top_k == 4
    # the plot shows the new setting only: the k=2 point is replaced, not stacked as another line
    assert [t.name for t in lat.data] == ["grouped_mm"] and lat.data[0].y[0] == pytest.approx(0.512)
    assert "k=4" in lat.layout.title.text and "1 earlier point(s) not shown" in lat.layout.title.text

    w.controls["num_tokens"].value = 2048
    assert list(lat.data[0].x) == [128, 2048]
    mem = [t for t in w.figures["memory"].data if t.meta["kind"] == "measured"]
    assert [t.name for t in mem] == ["grouped_mm"]
    assert list(mem[0].y) == pytest.approx([1000 * 128 / MIB, 1000 * 2048 / MIB])
    w.controls["num_tokens"].value = 128  # measured again: the newer point replaces the older one
    assert list(lat.data[0].x) == [128, 2048]

    w.controls["dtype"].value = "bfloat16"
    assert fake.calls[-1]["dtype"] == torch.bfloat16 and fake.calls[-1]["config"].dtype == torch.bfloat16
    assert [t.name for t in lat.data] == ["grouped_mm"] and "bfloat16" in lat.layout.title.text
    assert len(w.dataframe()) == len(fake.calls) == 5  # every measurement is kept in the table


def test_backend_explorer_one_line_per_backend_and_legend_fits(explorer):
    w, fake = explorer
    for backend in ("eager", "batched_mm", "grouped_mm"):
        w.controls["backend"].value = backend
    lat = w.figures["latency"]
    lines = [t.name for t in lat.data if t.meta["kind"] == "measured"]
    assert lines == ["eager", "batched_mm", "grouped_mm"]
    colors = [t.line.color for t in lat.data if t.meta["kind"] == "measured"]
    assert len(set(colors)) == 3
    assert lat.layout.legend.orientation == "h"  # under the plot: never narrows it, never scrolls


def test_backend_explorer_says_what_auto_runs(explorer):
    w, fake = explorer
    config = w.current_config()
    backend, why = moe_lab.choose_backend(128, w.device, config.dtype, config)
    assert f"runs <code>{backend}</code>" in w.auto_line.value and html_escape(why) in w.auto_line.value
    with w.hold():
        w.controls["num_tokens"].value = 64
        w.controls["backend"].value = "auto"
        assert len(fake.calls) == 1  # nothing measured inside the block
    assert len(fake.calls) == 2 and fake.calls[-1]["backend"] == "auto"
    small, _ = moe_lab.choose_backend(64, w.device, config.dtype, config)
    assert f"(auto ran {small})" in w.status.value and f"runs <code>{small}</code>" in w.auto_line.value
    assert w.controls["auto"].value is True  # hold() leaves "measure on every change" as it was


def test_backend_explorer_compare_backends_gives_a_verdict_per_token_count():
    from moe_lab.bench.live import TOO_NOISY
    from moe_lab.widgets import backend_explorer

    def rows(config, tokens, backends, *, device=None, dtype=None):
        """bench.live-shaped rows: eager 3x slower in every round; batched_mm and grouped_mm swap places."""
        out = []
        for t in tokens:
            for b in backends:
                rounds = {"eager": [3.0, 3.1, 2.9], "batched_mm": [0.9, 1.2, 0.8],
                          "grouped_mm": [1.0, 1.0, 1.0]}[b]
                row = _row(b, t, config.num_experts, config.top_k, ms=sorted(rounds)[1], dtype="float32")
                row.update(rounds=3, round_medians_ms=" ".join(map(str, rounds)), round_spread=0.5, noisy=False)
                out.append(row)
        return pd.DataFrame(out)

    w = backend_explorer(_small_config(), compare_fn=rows, tokens=(16, 128), measure_on_start=False,
                         backends=["eager", "batched_mm", "grouped_mm", "auto"])
    frame = w.compare_backends()
    assert len(frame) == 6 and set(frame["backend"]) == {"eager", "batched_mm", "grouped_mm"}  # auto left out
    assert len(w.verdicts) == 2 and all(TOO_NOISY in v for v in w.verdicts)  # the rounds disagree
    assert _kind(w.status) == "ok" and "2 of 2 token counts too noisy" in w.status.value
    lines = [t.name for t in w.figures["latency"].data if t.meta["kind"] == "measured"]
    assert lines == ["eager", "batched_mm", "grouped_mm"]
    frame = w.compare_backends(backends=["eager", "grouped_mm"], tokens=[16])
    assert w.verdicts == ["T=16: grouped_mm fastest, 0.33x eager's time (rounds 0.32–0.34x, every round agrees)"]


def test_backend_explorer_live_default_is_single_threaded_rounds():
    from moe_lab.widgets import backend_explorer

    before = torch.get_num_threads()
    w = backend_explorer(_small_config(), device="cpu", tokens=(4, 8), rounds=2, max_seconds=0.005,
                         min_reps=2, warmup=1, backends=["eager", "grouped_mm"])
    row = w.rows[-1]
    assert row["status"] == "ok" and row["rounds"] == 2 and len(row["round_medians_ms"].split()) == 2
    assert "2 interleaved rounds, 1 thread" in w.figures["latency"].layout.title.text
    assert torch.get_num_threads() == before  # the thread count is restored after measuring
    frame = w.compare_backends()
    assert set(frame["backend"]) == {"eager", "grouped_mm"} and (frame["rounds"] == 2).all()
    assert len(w.verdicts) == 2 and all(v.startswith("T=") for v in w.verdicts)


def test_backend_explorer_top_k_max_follows_experts(explorer):
    w, fake = explorer
    w.controls["top_k"].value = 6
    n = len(fake.calls)
    w.controls["num_experts"].value = 3
    assert w.controls["top_k"].max == 3 and w.controls["top_k"].value == 3
    assert len(fake.calls) == n + 1  # one measurement for the change, not one per slider
    assert (fake.calls[-1]["config"].num_experts, fake.calls[-1]["config"].top_k) == (3, 3)
    w.controls["num_experts"].value = 16
    assert w.controls["top_k"].max == 16 and w.controls["top_k"].value == 3
    w.controls["top_k"].value = 12
    assert fake.calls[-1]["config"].top_k == 12


def test_backend_explorer_shows_refusal_and_keeps_working(explorer):
    w, fake = explorer
    w.controls["backend"].value = "batched_mm"
    w.controls["num_tokens"].value = 1024  # refused by the fake
    assert _kind(w.status) == "refused" and "exceed the batched_mm budget" in w.status.value
    names = [t.name for t in w.figures["latency"].data]
    assert "batched_mm: not run" in names
    refused = [t for t in w.figures["latency"].data if t.name.endswith("not run")][0]
    assert REFUSAL in refused.hovertext[0].replace("<br>", " ")
    w.controls["num_tokens"].value = 64
    assert _kind(w.status) == "ok" and "budget" not in w.status.value
    assert list([t for t in w.figures["latency"].data if t.name == "batched_mm"][0].x) == [64, 128]


def test_backend_explorer_survives_a_raising_measure_fn():
    from moe_lab.widgets import backend_explorer

    def broken(config, num_tokens, backend, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    w = backend_explorer(_small_config(), measure_fn=broken, tokens=(8, 16))
    assert _kind(w.status) == "error" and "RuntimeError: CUDA error: an illegal memory access" in w.status.value
    assert "more lines" not in w.status.value
    w.controls["num_tokens"].value = 8  # still alive
    assert len(w.rows) == 2 and all(r["status"] == "error" for r in w.rows)
    assert [t.name for t in w.figures["latency"].data] == ["grouped_mm: not run"]


def test_backend_explorer_sweep_clear_and_user_backend():
    from moe_lab.widgets import backend_explorer

    moe_lab.register("my_test_backend", moe_lab.backends.eager_experts_forward)
    try:
        fake = FakeMeasure()
        w = backend_explorer(_small_config(), measure_fn=fake, tokens=(64, 1024, 2048), measure_on_start=False)
        assert "my_test_backend" in w.controls["backend"].options and fake.calls == []
        w.controls["auto"].value = False
        w.controls["backend"].value = "batched_mm"
        assert fake.calls == []  # auto-measure off
        rows = w.sweep_tokens()
        assert [r["status"] for r in rows] == ["ok", "refused", "refused"]
        assert "1/3 token counts measured" in w.status.value and "T=1024" in w.status.value
        w.controls["measure"].click()
        assert len(fake.calls) == 4
        w.clear()
        assert w.rows == [] and len(w.figures["latency"].data) == 0
    finally:
        moe_lab.unregister("my_test_backend")


def test_backend_explorer_with_real_measure():
    bench = pytest.importorskip("moe_lab.bench")
    if not hasattr(bench, "measure"):
        pytest.skip("moe_lab.bench.measure not there yet")
    from moe_lab.widgets import backend_explorer

    w = backend_explorer(_small_config(), tokens=(8, 16), device="cpu", max_seconds=0.02, max_reps=3, warmup=1)
    assert w.rows[-1]["status"] == "ok", w.rows[-1].get("reason")
    assert _kind(w.status) == "ok" and len(w.figures["latency"].data[0].y) == 1
    with moe_lab.batched_mm_budget(1):
        w.controls["backend"].value = "batched_mm"
    assert w.rows[-1]["status"] == "refused"
    assert _kind(w.status) == "refused" and "GatherBudgetError" in w.status.value
    if "triton" in moe_lab.runnable_backends("cpu"):  # interpreted: not offered by default, but runs when given
        w = backend_explorer(_small_config(), tokens=(4,), device="cpu", backends=["grouped_mm", "triton"],
                             measure_on_start=False, max_seconds=0.01, max_reps=1, min_reps=1, warmup=0)
        w.controls["backend"].value = "triton"
        assert (w.rows[-1]["backend"], w.rows[-1]["status"]) == ("triton", "ok"), w.rows[-1].get("reason")
        assert _kind(w.status) == "ok" and w.rows[-1]["rel_err"] < 1e-5


def test_routing_explorer_updates_histogram_and_stats():
    from moe_lab.widgets import routing_explorer

    w = routing_explorer("mixtral-8x7b", num_tokens=256, distribution="uniform", show_heatmap=True,
                         heatmap_tokens=8)
    hist = w.figures["histogram"]
    assert list(hist.data[0].x) == list(range(8)) and sum(hist.data[0].y) == 256 * 2
    assert w.controls["skew"].disabled  # skew only shapes zipf
    assert "experts hit" in w.stats.value and "batched_mm" in w.stats.value

    w.controls["num_experts"].value = 32
    w.controls["top_k"].value = 8
    assert len(hist.data[0].y) == 32 and sum(hist.data[0].y) == 256 * 8
    assert hist.data[1].y[0] == pytest.approx(256 * 8 / 32)
    z = w.figures["heatmap"].data[0].z
    assert len(z) == 8 and len(z[0]) == 32
    w.controls["num_experts"].value = 4
    assert w.controls["top_k"].max == 4 and w.controls["top_k"].value == 4

    w.controls["num_experts"].value = 16
    w.controls["top_k"].value = 1
    w.controls["distribution"].value = "single"
    assert hist.data[0].y[0] == 256 and sum(hist.data[0].y[1:]) == 0
    assert "1 / 16" in w.stats.value
    w.controls["distribution"].value = "zipf"
    assert not w.controls["skew"].disabled
    w.controls["skew"].value = 0.0
    flat = list(hist.data[0].y)
    w.controls["skew"].value = 3.0
    assert hist.data[0].y[0] > flat[0] and w.routing_stats.imbalance > 3
    assert "T=256" in hist.layout.title.text


def test_compile_explorer_filters(compile_df):
    from moe_lab.widgets import compile_explorer

    w = compile_explorer(compile_df)
    matrix = w.figures["matrix"]
    assert len(matrix.data[0].x) == 6  # 3 backends x 2 token counts
    assert "2 failed" in w.status.value and "inductor exploded" in w.status.value
    w.controls["num_tokens"].value = 64
    w.controls["backends"].value = ("eager", "grouped_mm")
    assert list(matrix.data[0].x) == ["eager", "grouped_mm"]
    assert "refused" not in w.status.value and "differs after a routing change" in w.status.value
    w.controls["modes"].value = ("default",)
    assert list(matrix.data[0].y) == ["default"] and "inductor exploded" not in w.status.value
    w.controls["modes"].value = ()
    assert "no cells match" in w.status.value


def test_figure_widgets_carry_no_nan_in_heatmaps():
    # NaN is not JSON: a FigureWidget holding it makes jupyter_client warn on every update.
    from moe_lab.widgets._common import new_figure_widget

    fig = go.Figure(go.Heatmap(z=[[1.0, float("nan")], [float("nan"), 2.0]]))
    fw = new_figure_widget(fig)
    assert [list(row) for row in fw.data[0].z] == [[1.0, None], [None, 2.0]]
