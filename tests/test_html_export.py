"""Offline HTML (`make html`): the page holds the figure and plotly.js (and, where a Chromium is
installed, the figure is drawn offline); moe_lab.display's preprocessor on its own (figures, widget
snapshots), and the FigureWidget state it relies on staying current."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lab import MoEConfig

ROOT = Path(__file__).resolve().parents[1]
nbformat = pytest.importorskip("nbformat")


def _plot_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("num_tokens = 64")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A plot for `make html`"),
        params,
        nbformat.v4.new_code_cell(
            "import moe_lab, moe_lab.plots\n"
            "idx, _ = moe_lab.synthetic_routing(num_tokens, 8, 2, distribution='zipf', seed=0)\n"
            "moe_lab.plots.routing_histogram(idx, 8)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _chromium() -> str | None:
    return os.environ.get("MOE_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


def test_make_html_renders_the_plot_offline(tmp_path):
    """`make html` on two notebooks written here: one is executed into runs/, the other already has a
    newer executed copy there, which is reused; both pages carry their figure and plotly.js."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    import plotly.graph_objects as go

    fresh = _plot_notebook(tmp_path / "nb" / "tiny_plot.ipynb")
    reused = _plot_notebook(tmp_path / "nb" / "reused_plot.ipynb")
    runs, pages = tmp_path / "runs", tmp_path / "html"
    executed = nbformat.read(reused, as_version=4)  # an executed copy, made without a kernel
    figure = go.Figure(go.Bar(x=[0, 1, 2], y=[5, 1, 2]), layout_title_text="Reused figure").to_plotly_json()
    executed.cells[-1].outputs = [nbformat.v4.new_output(
        "display_data", data={"application/vnd.plotly.v1+json": figure, "text/plain": "Figure()"})]
    runs.mkdir()
    nbformat.write(executed, runs / "reused_plot.ipynb")
    os.utime(reused, (0, 0))  # the notebook is older than its executed copy

    venv = Path(sys.executable).parent.parent
    # -o: never (re)install the venv from a test; VENV: the one running this test.
    command = ["make", "-C", str(ROOT), "--no-print-directory", "html", f"VENV={venv}", "-o", str(venv / ".installed"),
               f"NOTEBOOKS={fresh} {reused}", f"RUNS_DIR={runs}", f"HTML_DIR={pages}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reusing {runs / 'reused_plot.ipynb'}" in result.stdout
    assert f"reusing {runs / 'tiny_plot.ipynb'}" not in result.stdout

    run = json.loads((runs / "tiny_plot.ipynb").read_text())
    mimes = [m for c in run["cells"] for o in c.get("outputs", []) for m in o.get("data", {})]
    assert "application/vnd.plotly.v1+json" in mimes and "text/html" not in mimes, \
        "runs/ keeps plotly's own mimetype; the HTML is made at conversion time"
    for name, title in (("tiny_plot", "Tokens per expert"), ("reused_plot", "Reused figure")):
        page = (pages / f"{name}.html").read_text()
        assert page.count('class="plotly-graph-div"') == 1, f"{name}: the figure's div"
        assert page.count("* plotly.js v") == 1, f"{name}: plotly.js embedded once, inline"
        assert not re.findall(r'<script[^>]*src="[^"]*plotly', page) and title in page
        size = len(page.encode())
        assert 3e6 < size < 8e6, f"{name}: {size} bytes; plotly.js is ~4.8 MB, the rest is small"

    chromium = _chromium()
    if chromium is None:
        return  # the drawing check below needs a browser; the page content is checked above
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", (pages / "tiny_plot.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 2, "plotly drew the figure (offline: no network is used)"
    assert dom.count('class="point"') == 8, "one bar per expert"


def test_make_html_without_notebooks_says_so(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "html", f"VENV={venv}",
                             "-o", str(venv / ".installed"), "NOTEBOOKS=", f"HTML_DIR={tmp_path / 'html'}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "nothing to render" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "html").exists()


def test_html_preprocessor_figures_and_widget_snapshot():
    """Without a kernel: plotly outputs gain text/html (plotly.js in the first only); a saved widget
    becomes a static snapshot of its state, and the widget state leaves the page."""
    pytest.importorskip("nbconvert")
    from moe_lab.display import PlotlyHTMLPreprocessor

    figure = {"data": [{"type": "bar", "x": [0, 1], "y": [3, 4]}], "layout": {"title": {"text": "two bars"}}}
    plotly_output = {"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.plotly.v1+json": figure, "text/plain": "Figure()"}}

    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
                "state": state}

    state = {
        "box": model("VBoxModel", children=["IPY_MODEL_html", "IPY_MODEL_fig", "IPY_MODEL_slider",
                                            "IPY_MODEL_drop", "IPY_MODEL_button"]),
        "html": model("HTMLModel", value="<b>status</b>: ok", description=""),
        "fig": model("AnyModel", _widget_data=[{"type": "scatter", "y": [1, 2]}],
                     _widget_layout={"title": {"text": "widget figure"}}, _esm="x" * 1000),
        "slider": model("IntSliderModel", value=4, description="top_k"),
        "drop": model("DropdownModel", index=1, _options_labels=["eager", "grouped_mm"], description="backend"),
        "button": model("ButtonModel", description="measure"),
    }
    widget_output = {"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.jupyter.widget-view+json": {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "BackendExplorer(...)"}}
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("fig", outputs=[nbformat.from_dict(plotly_output)]),
                nbformat.v4.new_code_cell("w", outputs=[nbformat.from_dict(widget_output)]),
                nbformat.v4.new_code_cell("fig", outputs=[nbformat.from_dict(plotly_output)])]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2,
                                                                             "version_minor": 0}}
    nb, _ = PlotlyHTMLPreprocessor().preprocess(nb, {})

    htmls = [o["data"]["text/html"] for c in nb.cells for o in c.outputs]
    assert ["* plotly.js v" in h for h in htmls] == [True, False, False], "plotly.js once, in the first figure"
    assert all('class="plotly-graph-div"' in h for h in htmls)
    snapshot = htmls[1]
    assert "application/vnd.jupyter.widget-view+json" not in nb.cells[1].outputs[0]["data"]
    for text in ("<b>status</b>: ok", "widget figure", "top_k: 4", "backend: grouped_mm", "static snapshot"):
        assert text in snapshot, text
    assert "measure" not in snapshot, "buttons do nothing on a static page"
    assert "widgets" not in nb.metadata, "no widget state (megabytes of plotly.js per FigureWidget) in the page"


def test_figure_widget_saved_state_follows_updates():
    """What nbclient saves for a FigureWidget (and the HTML snapshot shows) is `_widget_data` /
    `_widget_layout`; plotly sets them only on creation, so moe_lab's widgets keep them current."""
    pytest.importorskip("ipywidgets")
    from moe_lab.widgets import backend_explorer

    def fake_measure(config, num_tokens, backend, **kwargs):
        return dict(backend=backend, num_tokens=num_tokens, status="ok", median_ms=0.01 * num_tokens * config.top_k,
                    num_experts=config.num_experts, top_k=config.top_k, dtype="float32")

    explorer = backend_explorer(MoEConfig(16, 16, num_experts=4, top_k=2), measure_fn=fake_measure, tokens=(8, 16))
    explorer.controls["num_tokens"].value = 8
    explorer.controls["top_k"].value = 3
    latency = explorer.figures["latency"]
    saved = latency._widget_data
    # the explorer draws the current setting (k=3) only, one line per backend: the saved state follows
    assert [t.get("name") for t in saved] == [t.name for t in latency.data] == ["grouped_mm"]
    assert list(saved[0]["x"]) == [8] and list(saved[0]["y"]) == pytest.approx([0.24])
    assert latency._widget_layout["title"]["text"] == latency.layout.title.text
