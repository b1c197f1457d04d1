"""Helpers shared by the widget factories: updating a FigureWidget from a fresh Figure, status text."""
from __future__ import annotations

import copy
import html
import math

import plotly.graph_objects as go

from ..errors import first_line  # noqa: F401  (re-exported for the widget modules)

POWERS_OF_TWO_TOKENS = tuple(2**i for i in range(0, 17))  # 1 .. 65536


def json_safe(fig: go.Figure) -> go.Figure:
    """Replace NaN in heatmap `z` by None: a FigureWidget sends its data as JSON, where NaN is not
    allowed (jupyter_client warns on every update). Static figures may keep NaN gaps."""
    for trace in fig.data:
        z = getattr(trace, "z", None)
        if z is not None:
            trace.z = [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in z]
    return fig


def new_figure_widget(fig: go.Figure, height: int = 420, width: int | None = None) -> go.FigureWidget:
    """A FigureWidget with a fixed size (FigureWidgets inside an HBox do not autosize reliably)."""
    fw = go.FigureWidget(json_safe(fig))
    fw.layout.height = fw.layout.height or height
    if width:
        fw.layout.width = width
    return fw


def sync_figure(fw: go.FigureWidget, fig: go.Figure) -> None:
    """Make `fw` show `fig`: update traces in place when the trace list has the same shape, else rebuild.

    In-place updates keep the user's zoom and let plotly animate; a rebuild happens when traces
    appear or disappear (e.g. a measurement with a new top_k starts a new line).
    """
    fig = json_safe(fig)
    same = len(fw.data) == len(fig.data) and all(a.type == b.type for a, b in zip(fw.data, fig.data))
    if not same:
        fw.data = []
        if fig.data:
            fw.add_traces(list(fig.data))
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)
    size = {"height": fw.layout.height, "width": fw.layout.width}
    # Parts of the old layout the new figure does not have (a second axis that went away with the
    # last refusal, a note): an update alone would leave them drawn, so unset them first.
    stale = [key for key in fw.layout.to_plotly_json() if key not in layout and key not in ("template", *size)]
    with fw.batch_update():
        for key in stale:
            fw.layout[key] = None
        if same:
            for old, new in zip(fw.data, fig.data):
                props = new.to_plotly_json()
                props.pop("type", None)
                props.pop("uid", None)
                old.update(props, overwrite=True)
        fw.layout.update(layout, overwrite=True)
        if fig.layout.template is not None and fw.layout.template != fig.layout.template:
            fw.layout.template = fig.layout.template
        for key, value in size.items():  # keep the size the widget was given
            if value and not layout.get(key):
                fw.layout[key] = value
    # The front end redraws from the update messages above, but the state saved with an executed
    # notebook (what `make html` and a reopened notebook show) is `_widget_data` / `_widget_layout`,
    # which plotly sets only when the widget is created or displayed itself: keep them current.
    fw._widget_data = copy.deepcopy(fw._data)
    fw._widget_layout = copy.deepcopy(fw._layout_obj._props)


def status_html(kind: str, message: str) -> str:
    """A coloured one-liner for the status widget; `message` is escaped."""
    colors = {"ok": "#1a7f37", "info": "#57606a", "refused": "#9a6700", "unsupported": "#9a6700",
              "oom": "#cf222e", "error": "#cf222e", "failed": "#cf222e", "busy": "#0969da"}
    color = colors.get(kind, "#cf222e")
    return (f'<div style="font-family: monospace; white-space: pre-wrap">'
            f'<b style="color:{color}">{html.escape(kind)}</b>: {html.escape(message)}</div>')


