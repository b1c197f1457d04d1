"""The widget notebooks work in a real browser: JupyterLab + headless Chromium, driven by Playwright.

nbval and papermill run the notebooks' Python, but they never render a widget: a front end
that cannot find ipywidgets' or anywidget's JavaScript ("Error displaying widget", "Failed to
load model class ...") or a plotly FigureWidget that never draws passes them. These tests
start JupyterLab, open each notebook in Chromium, run it with Run > Run All Cells like a
student would, and then check what is on the page:

* no widget error text, and no cell raised (except cells tagged `raises-exception`);
* the ipywidgets sliders and dropdowns, and the plotly plots, are drawn;
* every plot reads well as drawn (tests/plot_layout_check.js): no legend that scrolls or covers
  the plot, no plot area squeezed by its legend, no note printed over an axis title, no
  overlapping tick labels, no log axis that writes 0.5 as "5";
* a backend explorer is left measuring after Run All: "measure on every change" ticked, an "ok"
  status (not a stale refusal or error), the line saying what `auto` runs, one line per backend;
* moving a `top_k` slider with the keyboard, and choosing another entry of a `backend`
  dropdown, redraws the plot next to it (its trace data / SVG paths change), and the plots still
  read well afterwards;
* a full-page screenshot of each notebook is saved under screenshots/ (git-ignored); with
  MOE_LAB_SCREENSHOTS=failures (.ci/run sets it) only of a notebook whose checks failed.

Two kinds of notebook are covered: a small notebook written here (always run, independent of
the curriculum: `backend_explorer` with a fake, instant `measure_fn`), and every
notebooks/*.ipynb (the widget checks where its code uses widgets: `moe_lab.widgets`, ipywidgets,
a plotly FigureWidget).

Needs Chromium (Debian: `apt-get install chromium`; elsewhere point MOE_LAB_CHROMIUM at a
Chrome/Chromium binary) and the `playwright` Python package (in the `test` extra). Without
either the tests are skipped, saying why, unless MOE_LAB_REQUIRE_BROWSER=1 (set by .ci/run,
which installs Chromium), which turns the skip into a failure. Playwright's own browser
download (`playwright install`) is not needed.

The server is isolated from the user's Jupyter set-up (its own config, data, runtime,
settings and workspace folders in a temporary directory) and cannot change the notebooks:
autosave is off, every save is refused by a pre-save hook, and checkpoints go to the
temporary folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SCREENSHOTS = ROOT / "screenshots"

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome",
                       "google-chrome-stable")
# --headless: no display here. --no-sandbox: CI runs as root, where Chromium's sandbox refuses to
# start. The rest keep Chromium from phoning home: without --disable-background-networking and
# friends, a machine whose network only reaches package registries refuses Chromium's connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

WIDGET_ERRORS = ("Error displaying widget", "Failed to load model class")
# Given a drawn plotly figure, the problems a reader would see (a list of sentences; [] when none).
PLOT_LAYOUT_JS = (Path(__file__).resolve().parent / "plot_layout_check.js").read_text()
SERVER_START_S = 90  # a cold JupyterLab on a 2-core CI machine takes ~5-15 s
RUN_ALL_S = 240  # Run All Cells of one notebook, kernel start included (a loaded 2-core machine)
RENDER_S = 30  # widgets and plots drawn after the cells finished
REDRAW_S = 30  # a control changed -> the kernel re-measures -> the plot redraws
VIEWPORT = {"width": 1600, "height": 1000}
MAX_SCREENSHOT_HEIGHT = 16000  # Chromium's limit for one capture is 16384 px


# --------------------------------------------------------------------------------------------- #
# Finding the browser
# --------------------------------------------------------------------------------------------- #


def _unavailable(reason: str):
    """Skip (the default) or fail (MOE_LAB_REQUIRE_BROWSER=1, as in CI) for a missing browser."""
    if os.environ.get("MOE_LAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (MOE_LAB_REQUIRE_BROWSER=1 makes this a failure instead of a skip)")
    pytest.skip(reason)


def find_chromium() -> str | None:
    """MOE_LAB_CHROMIUM if set, else Debian's /usr/bin/chromium or a chromium/chrome on PATH."""
    override = os.environ.get("MOE_LAB_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in CHROMIUM_CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        where = os.environ.get("MOE_LAB_CHROMIUM") or ", ".join(CHROMIUM_CANDIDATES)
        _unavailable(f"no Chromium found (looked for {where}); on Debian: apt-get install chromium, "
                     "or set MOE_LAB_CHROMIUM to a Chrome/Chromium binary")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"playwright is not importable ({exc}); pip install playwright (it is in the test extra)")
    with sync_playwright() as p:
        # Playwright gives every launch a fresh, temporary user-data dir, so no profile state leaks in.
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# --------------------------------------------------------------------------------------------- #
# JupyterLab
# --------------------------------------------------------------------------------------------- #


@dataclass
class LabServer:
    root: Path
    url: str
    token: str
    log: Path

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def stop_kernels(self) -> None:
        with contextlib.suppress(Exception):
            for kernel in self.api("/api/kernels") or []:
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_CONFIG = '''\
# Written by tests/test_browser.py: the browser test must never write into the notebooks.
from tornado.web import HTTPError


def _refuse_save(model=None, path=None, contents_manager=None, **kwargs):
    raise HTTPError(403, f"saving is switched off in moe_lab's browser test (tried to save {path})")


c.ContentsManager.pre_save_hook = _refuse_save
c.FileCheckpoints.checkpoint_dir = {checkpoints!r}  # absolute: nothing lands next to the notebooks
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
'''

LAB_SETTINGS = {
    # Running cells must not write outputs back into the notebook files.
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    # Attach every cell to the page (the default virtualises cells out of view): the test reads,
    # and the screenshot shows, all outputs at once.
    # No blank screen of "scroll past the end" at the bottom of the screenshots either.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none", "scrollPastEnd": False},
    # No news / update pop-ups (and no requests for them).
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


@contextlib.contextmanager
def jupyter_lab(root: Path, home: Path):
    """JupyterLab serving `root` on 127.0.0.1:<free port> with a token; always shut down on exit."""
    for sub in ("config", "data", "runtime", "workspaces", "checkpoints"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "config" / "jupyter_server_config.py").write_text(
        SERVER_CONFIG.replace("{checkpoints!r}", repr(str(home / "checkpoints"))))
    for rel, settings in LAB_SETTINGS.items():
        path = home / "settings" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), PYTHONUNBUFFERED="1")
    env.pop("JUPYTER_TOKEN", None)
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root; the server only listens on 127.0.0.1
    log = home / "server.log"
    server = LabServer(root=root, url=f"http://127.0.0.1:{port}", token=token, log=log)
    with log.open("wb") as log_file:
        # A session of its own: the clean-up below can reach the server's whole process group.
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"jupyter lab exited with {proc.returncode} before serving:\n{server.log_tail()}")
                try:
                    server.api("/api/status")
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if time.monotonic() > deadline:
                        pytest.fail(f"jupyter lab did not answer within {SERVER_START_S} s:\n{server.log_tail()}")
                    time.sleep(0.5)
            yield server
        finally:
            _shut_down(server, proc)


def _shut_down(server: LabServer, proc: subprocess.Popen) -> None:
    """Stop the kernels politely, then the server: SIGTERM, wait, SIGKILL (its process group too)."""
    if proc.poll() is None:
        server.stop_kernels()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the server started in its group and left behind


@pytest.fixture(scope="module")
def lab_notebooks(tmp_path_factory):
    """JupyterLab on the repository's notebooks/."""
    with jupyter_lab(NOTEBOOKS, tmp_path_factory.mktemp("jupyter-notebooks")) as server:
        yield server


SMOKE_CELLS = [
    '''\
import math

import moe_lab
from moe_lab.widgets import backend_explorer


def fake_measure(config, num_tokens, backend, device=None, dtype=None, **kwargs):
    """Instant and deterministic: each backend, top_k and T gives a different point."""
    speed = {"eager": 3.0, "batched_mm": 2.0, "grouped_mm": 1.0}.get(backend, 1.5)
    bytes_ = 4 * config.hidden_size * config.intermediate_size * min(config.num_experts, num_tokens * config.top_k)
    return dict(median_ms=speed * config.top_k * math.log2(2 * num_tokens), peak_bytes=speed * bytes_,
                predicted_bytes=bytes_, device="cpu")''',
    '''\
explorer = backend_explorer(moe_lab.MoEConfig(64, 32, num_experts=8, top_k=2), measure_fn=fake_measure,
                            device="cpu", tokens=(1, 16, 128, 1024), backends=["eager", "batched_mm", "grouped_mm"])
explorer''',
    '''\
explorer.controls["num_tokens"].value = 16  # driven from code: one more point on the plots
print(len(explorer.rows), "measurements")''',
]


@pytest.fixture(scope="module")
def lab_smoke(tmp_path_factory):
    """JupyterLab on a temporary folder holding one small backend_explorer notebook."""
    root = tmp_path_factory.mktemp("smoke-notebooks")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in SMOKE_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "browser_smoke.ipynb")
    with jupyter_lab(root, tmp_path_factory.mktemp("jupyter-smoke")) as server:
        yield server


# --------------------------------------------------------------------------------------------- #
# Which notebooks, and what they should show
# --------------------------------------------------------------------------------------------- #


def _code(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


# `moe_lab.widgets`, `from moe_lab import plots, widgets`, or ipywidgets / a FigureWidget directly.
USES_WIDGETS = re.compile(r"moe_lab\.widgets|from\s+moe_lab\s+import\s+[^\n]*\bwidgets\b|\bipywidgets\b|FigureWidget")


def widget_notebooks() -> list[Path]:
    """notebooks/*.ipynb whose code uses widgets (moe_lab.widgets, ipywidgets, plotly FigureWidget)."""
    return [path for path in curriculum_notebooks() if expectations(path).widgets]


def curriculum_notebooks() -> list[Path]:
    """Every notebooks/*.ipynb that can be read (nbval reports a broken file)."""
    found = []
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        try:
            _code(path)
        except Exception:  # a notebook being written right now
            continue
        found.append(path)
    return found


@dataclass
class Expect:
    widgets: bool  # the code uses widgets: they must be drawn
    plots: bool  # the code draws plotly figures (moe_lab.plots, an explorer, a plotly Figure)
    sliders: bool  # ipywidgets sliders are drawn
    dropdowns: bool  # ipywidgets dropdowns are drawn
    top_k: bool  # a top_k slider exists and moving it redraws a plot
    backend: bool  # a backend dropdown exists and changing it redraws a plot


def expectations(path: Path) -> Expect:
    """What the page must show, read from the notebook's code (moe_lab's widget factories)."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    explorers_with_sliders = re.search(r"\b(backend_explorer|routing_explorer|BackendExplorer|RoutingExplorer)\b", code)
    backend = re.search(r"\b(backend_explorer|BackendExplorer)\b", code)
    plots = re.search(r"moe_lab\.plots|from moe_lab import [^\n]*\bplots\b|\bplots\.|_explorer\(|_figure\(|_chart\(|"
                      r"plotly|_heatmap\(|_histogram\(|_vs_tokens\(", code)
    return Expect(widgets=bool(USES_WIDGETS.search(code)), plots=bool(plots), sliders=bool(explorers_with_sliders or re.search(r"Slider\(|\binteract\(", code)),
                  dropdowns=bool(explorers_with_sliders or re.search(r"Dropdown\(|\bcompile_explorer\b", code)),
                  top_k=bool(explorers_with_sliders), backend=bool(backend))


# --------------------------------------------------------------------------------------------- #
# Driving the page
# --------------------------------------------------------------------------------------------- #

SLIDERS = ".jupyter-widgets .widget-slider, .jupyter-widgets .widget-hslider, .jupyter-widgets.widget-slider"
DROPDOWNS = ".jupyter-widgets .widget-dropdown, .jupyter-widgets.widget-dropdown"
DROPDOWN_SELECTS = ".widget-dropdown select"
PLOTS = ".js-plotly-plot"
# The notebook on show (hidden Lumino widgets carry lm-mod-hidden); every query below is scoped to it.
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
OUTPUT = "xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' jp-OutputArea-output ')][1]"

NOTEBOOK_READY_JS = """() => {
    const app = window.jupyterapp;
    const panel = app && app.shell.currentWidget;
    const kernel = panel && panel.sessionContext && panel.sessionContext.session
        && panel.sessionContext.session.kernel;
    return !!(panel && panel.context && panel.context.isReady && kernel && kernel.status === 'idle'
        && panel.node.querySelector('.jp-Notebook .jp-Cell'));
}"""

# Run All finished: the kernel is idle, no prompt shows [*], and at least one cell has run.
RUN_FINISHED_JS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    const prompts = [...panel.node.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
        .map(p => p.textContent.trim());
    return !!kernel && kernel.status === 'idle' && prompts.length > 0 && !prompts.some(p => p.includes('*'))
        && prompts.some(p => /\\[\\d+\\]/.test(p));
}"""

# What a plot currently draws: its trace data and the SVG paths plotly made from it.
PLOTS_SNAPSHOT_JS = """(root) => JSON.stringify([...root.querySelectorAll('.js-plotly-plot')].map(gd => ({
    traces: (gd.data || []).map(t => [t.name, t.type, JSON.stringify(t.x), JSON.stringify(t.y)]),
    paths: [...gd.querySelectorAll('path')].map(p => p.getAttribute('d') || '').filter(d => d.length > 0),
})))"""


def open_notebook(page, server: LabServer, name: str) -> None:
    # ?reset: start from the default layout, not the workspace the previous notebook left behind.
    page.goto(f"{server.url}/lab/tree/{name}?reset&token={server.token}", wait_until="domcontentloaded")
    deadline = time.monotonic() + RUN_ALL_S
    while True:
        # A "Select Kernel" dialog (no matching kernelspec) would block everything: take its default.
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        if page.evaluate(NOTEBOOK_READY_JS):
            page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # room for the plots
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}: the notebook or its kernel was not ready after {RUN_ALL_S} s:\n"
                                 f"{server.log_tail()}")
        page.wait_for_timeout(250)


def run_all_cells(page, name: str) -> float:
    """Run > Run All Cells through the menu bar, then wait for the kernel to finish; returns seconds."""
    start = time.monotonic()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    page.wait_for_function(RUN_FINISHED_JS, timeout=RUN_ALL_S * 1000, polling=250)
    page.wait_for_timeout(500)  # let the last outputs attach
    page.wait_for_function(RUN_FINISHED_JS, timeout=RUN_ALL_S * 1000, polling=250)
    return time.monotonic() - start


# Error outputs of the notebook on show, from JupyterLab's own model (on the page an error is drawn
# like stderr), except those of cells tagged raises-exception, which are meant to raise.
UNEXPECTED_ERRORS_JS = """() => {
    const errors = [];
    for (const cell of window.jupyterapp.shell.currentWidget.content.widgets) {
        if (cell.model.type !== 'code' || (cell.model.getMetadata('tags') || []).includes('raises-exception')) {
            continue;
        }
        const outputs = cell.model.outputs;
        for (let i = 0; i < outputs.length; i++) {
            const out = outputs.get(i).toJSON();
            if (out.output_type === 'error') {
                errors.push(`${out.ename}: ${out.evalue}\n` + (cell.model.sharedModel.getSource() || '').slice(0, 300));
            }
        }
    }
    return errors;
}"""


def unexpected_errors(page) -> list[str]:
    return page.evaluate(UNEXPECTED_ERRORS_JS)


def labelled(root, selector: str, label: str):
    """Widgets matching `selector` below `root` whose description label reads exactly `label`."""
    # `has=` is matched inside each widget, so it must be built from the page, not from `root`.
    return root.locator(selector).filter(
        has=root.page.locator(".widget-label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")))


def plots_snapshot(output) -> str:
    return output.evaluate(PLOTS_SNAPSHOT_JS)


def wait_for_redraw(page, output, before: str, what: str) -> None:
    deadline = time.monotonic() + REDRAW_S
    while time.monotonic() < deadline:
        page.wait_for_timeout(250)
        if plots_snapshot(output) != before:
            return
    raise AssertionError(f"{what} did not change the plot within {REDRAW_S} s")


def remeasure_if_manual(output) -> None:
    """backend_explorer with "measure on every change" unticked waits for its measure button: press it."""
    auto = output.locator(".widget-checkbox").filter(has_text="measure on every change").locator("input")
    if auto.count() and not auto.first.is_checked():
        output.locator("button.widget-button").filter(has_text=re.compile(r"^\s*measure\s*$")).first.click()


def movable(slider) -> bool:
    """Not disabled, and with somewhere to go (a top_k slider of 1..1 cannot move)."""
    handle = slider.locator(".noUi-handle, [role=slider]").first
    if not handle.count() or slider.locator(".slider[disabled], .noUi-target[disabled]").count():
        return False
    low, high = (handle.get_attribute(a) for a in ("aria-valuemin", "aria-valuemax"))
    return low is None or high is None or float(low) < float(high)


def move_top_k(page, slider, name: str) -> str:
    """Press an arrow key on the top_k slider's handle; returns 'old -> new' (its readout)."""
    output = slider.locator(OUTPUT)
    handle = slider.locator(".noUi-handle, [role=slider]").first
    now, top = (int(float(handle.get_attribute(a))) for a in ("aria-valuenow", "aria-valuemax"))
    readout = slider.locator(".widget-readout")
    old = readout.inner_text().strip()
    before = plots_snapshot(output)
    handle.focus()
    handle.press("ArrowLeft" if now >= top else "ArrowRight")
    page.wait_for_function("([el, old]) => el.textContent.trim() !== old", arg=[readout.element_handle(), old],
                           timeout=5000)
    new = readout.inner_text().strip()
    remeasure_if_manual(output)
    wait_for_redraw(page, output, before, f"{name}: moving the top_k slider {old} -> {new}")
    mark_tried(output)
    return f"{old} -> {new}"


def was_tried(output) -> bool:
    return output.evaluate("e => e.dataset.browserTested === '1'")


def mark_tried(output) -> None:
    output.evaluate("e => { e.dataset.browserTested = '1'; }")


def change_dropdown(page, dropdown, name: str) -> str | None:
    """Choose another entry; returns 'label: old -> new', or None when there is nothing else to choose.

    A backend dropdown goes to eager when it can (it runs for every shape on every device); any
    other dropdown to its first other entry.
    """
    output = dropdown.locator(OUTPUT)
    select = dropdown.locator("select")
    label = dropdown.locator(".widget-label").first.inner_text().strip() if dropdown.locator(".widget-label").count() \
        else "(unlabelled)"
    labels = select.locator("option").evaluate_all("os => os.map(o => o.textContent)")
    old = select.evaluate("s => s.selectedIndex >= 0 ? s.options[s.selectedIndex].textContent : ''")
    options = [o for o in labels if o != old]
    if not options:
        return None
    new = "eager" if label == "backend" and "eager" in options else options[0]
    before = plots_snapshot(output)
    select.select_option(label=new)
    remeasure_if_manual(output)
    wait_for_redraw(page, output, before, f"{name}: switching the {label} dropdown {old} -> {new}")
    mark_tried(output)
    return f"{label}: {old} -> {new}"


def wait_for_plots(page, panel, timeout_s: float = RENDER_S) -> int:
    """Wait until the number of drawn plots has stopped changing for a second; returns it."""
    deadline, last, stable_since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = panel.locator(f"{PLOTS} .main-svg").count()
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            break
        page.wait_for_timeout(250)
    return last


def plot_layout_problems(panel) -> list[str]:
    """What a reader would see wrong in each drawn plot (tests/plot_layout_check.js)."""
    problems = []
    plots = panel.locator(PLOTS)
    for i in range(plots.count()):
        plot = plots.nth(i)
        if plot.is_visible():
            problems += plot.evaluate(PLOT_LAYOUT_JS)
    return problems


# A backend explorer's parts, read from its output area: the "measure on every change" checkbox, the
# status line (a coloured word first: ok, info, refused, error, ...), the line on what auto runs, and
# the names of the lines of its latency plot.
EXPLORER_STATE_JS = """(output) => {
    const auto = [...output.querySelectorAll('.widget-checkbox')]
        .find(c => c.textContent.includes('measure on every change'));
    const htmls = [...output.querySelectorAll('.widget-html-content')].map(h => h.textContent.trim());
    const status = htmls.find(t => /^(ok|info|busy|refused|unsupported|oom|error|failed):/.test(t)) || '';
    const autoLine = htmls.find(t => t.startsWith('auto ')) || '';
    const plot = output.querySelector('.js-plotly-plot');
    const lines = plot && plot.data ? plot.data.filter(t => t.meta && t.meta.kind === 'measured').map(t => t.name) : [];
    return {measuring: !!(auto && auto.querySelector('input').checked), status, autoLine, lines};
}"""


def backend_explorers(panel):
    """The output areas that hold a backend explorer (its "measure on every change" checkbox)."""
    return panel.locator(".jp-OutputArea-output").filter(
        has=panel.page.locator(".widget-checkbox", has_text="measure on every change"))


def explorer_problems(panel, when: str) -> list[str]:
    """A backend explorer must be left measuring, with an ok status, auto's line and one line per backend."""
    problems = []
    explorers = backend_explorers(panel)
    for i in range(explorers.count()):
        state = explorers.nth(i).evaluate(EXPLORER_STATE_JS)
        where = f"backend explorer {i + 1} {when}"
        if not state["measuring"]:
            problems.append(f"{where}: 'measure on every change' is off")
        if not state["status"].startswith(("ok:", "info:")):
            problems.append(f"{where}: the status reads {state['status'][:200]!r}")
        if "runs" not in state["autoLine"]:
            problems.append(f"{where}: no line saying what auto runs ({state['autoLine']!r})")
        if len(set(state["lines"])) != len(state["lines"]):
            problems.append(f"{where}: a backend has several lines: {state['lines']}")
    return problems


def full_page_screenshot(page, name: str) -> Path:
    """The whole notebook in one PNG: JupyterLab scrolls inside its panel, so grow the viewport to fit."""
    scroller = "window.jupyterapp.shell.currentWidget.node.querySelector('.jp-WindowedPanel-outer')"
    # Height of the notebook's content plus what is not the notebook (menus, toolbar, status bar).
    height = page.evaluate(f"""() => {{
        const s = {scroller};
        return s ? s.scrollHeight + (window.innerHeight - s.clientHeight) : document.body.scrollHeight;
    }}""")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(MAX_SCREENSHOT_HEIGHT, int(height) + 40)})
    page.wait_for_timeout(1000)  # plotly and lumino re-layout after the resize
    page.evaluate(f"() => {{ const s = {scroller}; if (s) s.scrollTop = 0; }}")
    page.wait_for_timeout(300)
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{Path(name).stem}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def check_notebook(browser, server: LabServer, name: str, expect: Expect) -> dict:
    """Open, run all, check and interact, screenshot. Returns what was done (for the test log)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    report: dict = {"notebook": name}
    passed = False
    try:
        t0 = time.monotonic()
        open_notebook(page, server, name)
        report["open_s"] = round(time.monotonic() - t0, 1)
        report["run_all_s"] = round(run_all_cells(page, name), 1)

        panel = page.locator(PANEL)
        assert panel.count() == 1, f"{name}: expected one notebook on show, found {panel.count()}"
        # Widgets render asynchronously after their output arrives: wait for what must be there.
        if expect.widgets:
            panel.locator(".jupyter-widgets").first.wait_for(timeout=RENDER_S * 1000)
        if expect.plots:
            panel.locator(f"{PLOTS} .main-svg").first.wait_for(timeout=RENDER_S * 1000)
        wait_for_plots(page, panel)
        body = panel.inner_text()
        for text in WIDGET_ERRORS:
            assert text not in body, (f"{name}: the page says {text!r}; browser console errors: "
                                      f"{console_errors[-5:]}")
        errors = unexpected_errors(page)
        assert not errors, f"{name}: {len(errors)} cell(s) raised:\n" + "\n---\n".join(errors)

        sliders, dropdowns = panel.locator(SLIDERS), panel.locator(DROPDOWN_SELECTS)
        plots = panel.locator(f"{PLOTS} .main-svg")
        report.update(sliders=sliders.count(), dropdowns=dropdowns.count(), plots=panel.locator(PLOTS).count())
        if expect.plots:
            assert report["plots"] > 0, f"{name}: no plotly plot was drawn"
            assert plots.count() > 0, f"{name}: plotly plots have no SVG"
        problems = plot_layout_problems(panel) + explorer_problems(panel, "after Run All")
        assert not problems, f"{name}: after Run All:\n" + "\n".join(problems)
        if expect.sliders:
            assert report["sliders"] > 0, f"{name}: no ipywidgets slider was drawn"
        if expect.dropdowns:
            assert report["dropdowns"] > 0, f"{name}: no ipywidgets dropdown was drawn"

        # Every top_k slider and backend dropdown that sits next to a plot must redraw it.
        moved = []
        top_k_sliders = labelled(panel, SLIDERS, "top_k")
        for i in range(top_k_sliders.count()):
            slider = top_k_sliders.nth(i)
            if slider.locator(OUTPUT).locator(PLOTS).count() and movable(slider):
                moved.append(move_top_k(page, slider, name))
        if expect.top_k:
            assert moved, f"{name}: no top_k slider next to a plot"
        report["top_k"] = moved
        switched = []
        backends = labelled(panel, DROPDOWNS, "backend")
        for i in range(backends.count()):
            dropdown = backends.nth(i)
            if dropdown.locator(OUTPUT).locator(PLOTS).count() and not dropdown.locator("select").is_disabled():
                switched.append(change_dropdown(page, dropdown, name))
        switched = [s for s in switched if s]
        if expect.backend:
            assert switched, f"{name}: no backend dropdown next to a plot"
        report["backend"] = switched
        # Any other widget with a plot (compile_explorer, ...) that neither of the above touched must
        # answer its first enabled dropdown.
        others = []
        dropdowns_all = panel.locator(DROPDOWNS)
        for i in range(dropdowns_all.count()):
            dropdown = dropdowns_all.nth(i)
            output = dropdown.locator(OUTPUT)
            if output.count() and output.locator(PLOTS).count() and not was_tried(output) \
                    and not dropdown.locator("select").is_disabled():
                others.append(change_dropdown(page, dropdown, name))
        report["other_dropdowns"] = [s for s in others if s]
        errors = unexpected_errors(page)
        assert not errors, f"{name}: after interacting, cells show errors:\n" + "\n---\n".join(errors)
        wait_for_plots(page, panel)
        problems = plot_layout_problems(panel) + explorer_problems(panel, "after the slider and dropdown moved")
        assert not problems, f"{name}: after interacting:\n" + "\n".join(problems)
        for text in WIDGET_ERRORS:
            assert text not in panel.inner_text(), f"{name}: after interacting the page says {text!r}"
        passed = True
    finally:
        # A screenshot when something failed, always; of a passing notebook unless MOE_LAB_SCREENSHOTS=failures
        # (.ci/run: nobody looks at CI's, and a tall page takes 2-4 s to capture). Then close the page.
        try:
            if not passed or os.environ.get("MOE_LAB_SCREENSHOTS", "all") != "failures":
                shot_started = time.monotonic()
                report["screenshot"] = str(full_page_screenshot(page, name).relative_to(ROOT))
                report["screenshot_s"] = round(time.monotonic() - shot_started, 1)
        except Exception as exc:  # never hide the test's own failure behind this one
            report["screenshot"] = f"failed: {exc}"
        context.close()
        server.stop_kernels()  # no idle kernel of this notebook is left holding memory beside the next one
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


# --------------------------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------------------------- #


@pytest.mark.timeout(300)
def test_backend_explorer_in_a_small_notebook(browser, lab_smoke):
    """Always runs: backend_explorer with a fake measure_fn, independent of the curriculum notebooks."""
    expect = Expect(widgets=True, plots=True, sliders=True, dropdowns=True, top_k=True, backend=True)
    report = check_notebook(browser, lab_smoke, "browser_smoke.ipynb", expect)
    print(report)
    assert report["sliders"] >= 3 and report["dropdowns"] >= 2, report  # experts, top_k, tokens; backend, dtype
    assert report["plots"] == 2, report  # latency and memory


def _notebook_params():
    found = curriculum_notebooks()
    if not found:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no notebooks/*.ipynb yet"), id="none-yet")]
    return [pytest.param(p, id=p.stem) for p in found]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("notebook", _notebook_params())
def test_notebook_in_the_browser(browser, lab_notebooks, notebook):
    report = check_notebook(browser, lab_notebooks, notebook.name, expectations(notebook))
    print(report)


def test_every_widget_notebook_is_covered():
    """The widget checks run wherever widgets are used (a notebook that starts using them is picked up)."""
    widgets = {p.name for p in widget_notebooks()}
    assert {"01_routing.ipynb", "06_playground.ipynb"} <= widgets
    assert expectations(NOTEBOOKS / "06_playground.ipynb").backend  # the explorer's dropdown is driven


@pytest.mark.timeout(120)
def test_plot_layout_check_sees_what_a_reader_sees(browser, tmp_path):
    """The layout check itself: a figure with plotly's defaults of the kind the issue listed (legend beside a
    narrow plot with many long entries, a note under the axis, a log axis labelled by plotly) is caught;
    the same data through moe_lab.plots reads well."""
    go = pytest.importorskip("plotly.graph_objects")
    import plotly.io as pio

    from moe_lab import plots

    import pandas as pd

    rows = [dict(backend=f"a rather long backend name {i}", num_tokens=t, median_ms=0.1 * t * (i + 1), status="ok")
            for i in range(14) for t in (1, 4, 16, 64, 256)]
    bad = go.Figure([go.Scatter(x=[1, 4, 16, 64, 256], y=[0.1 * t * (i + 1) for t in (1, 4, 16, 64, 256)],
                                name=f"a rather long backend name {i}") for i in range(14)])
    bad.update_layout(width=520, height=420, xaxis=dict(type="log", title="tokens (T)"),
                      yaxis=dict(type="log", title="median latency (ms)"), title="bad")
    bad.add_annotation(text="x / hollow markers at the bottom: not measured", xref="paper", yref="paper", x=0,
                       y=-0.18, showarrow=False)
    good = plots.latency_vs_tokens(pd.DataFrame(rows[:15])).update_layout(width=600, title="good")
    page_file = tmp_path / "figures.html"
    page_file.write_text("".join(pio.to_html(f, include_plotlyjs=(i == 0), full_html=False, div_id=f"fig{i}")
                                 for i, f in enumerate((bad, good))))
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(page_file.as_uri())
        page.locator("#fig1 .main-svg").first.wait_for(timeout=RENDER_S * 1000)
        page.wait_for_timeout(500)
        found_bad = page.locator("#fig0").evaluate(PLOT_LAYOUT_JS)
        found_good = page.locator("#fig1").evaluate(PLOT_LAYOUT_JS)
    finally:
        context.close()
    assert any("legend scrolls" in p for p in found_bad), found_bad
    assert any("plot area is" in p for p in found_bad), found_bad
    assert any("is printed over" in p for p in found_bad), found_bad
    assert any("(log) labels" in p for p in found_bad), found_bad
    assert found_good == [], found_good


def test_server_refuses_to_save(lab_smoke):
    """The server the browser drives cannot write a notebook (needs JupyterLab only, no browser)."""
    path = lab_smoke.root / "browser_smoke.ipynb"
    before = path.read_bytes()
    model = {"type": "notebook", "format": "json", "content": json.loads(before)}
    req = urllib.request.Request(f"{lab_smoke.url}/api/contents/browser_smoke.ipynb", method="PUT",
                                 data=json.dumps(model).encode(),
                                 headers={"Authorization": f"token {lab_smoke.token}",
                                          "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403, refused.value
    assert path.read_bytes() == before
    assert "screenshots/" in (ROOT / ".gitignore").read_text().split(), "screenshots/ must stay git-ignored"
