"""Figures for end-to-end runs (moe_lab.bench.e2e): where a decode step's time goes, per backend."""
from __future__ import annotations

import plotly.graph_objects as go

from ._common import require_columns

PART_COLORS = {"experts": "#EF553B", "attention": "#636EFA", "rest": "#B6B6B6"}


def time_split_bars(split, title: str = "Where an uncompiled decode step goes") -> go.Figure:
    """Stacked horizontal bars, one per backend: the step's milliseconds in the experts, in attention and
    in the rest (`moe_lab.bench.e2e_summary.time_split`: shares of the median step from module hooks)."""
    require_columns(split, ["backend", "step_ms", "experts_share", "attention_share", "rest_share"], "time_split_bars")
    figure = go.Figure()
    for part in ("experts", "attention", "rest"):
        milliseconds = split[f"{part}_share"] * split["step_ms"]
        figure.add_trace(go.Bar(
            y=split["backend"], x=milliseconds, name=part, orientation="h", marker_color=PART_COLORS[part],
            customdata=split[f"{part}_share"] * 100,
            hovertemplate="%{y}: %{x:.3g} ms (%{customdata:.0f}% of the step)<extra>" + part + "</extra>"))
    figure.update_layout(barmode="stack", title=title, xaxis_title="milliseconds per decode step (median)",
                         height=120 + 40 * len(split), margin=dict(t=60, l=160, b=80),
                         legend=dict(orientation="h", yanchor="top", y=-0.3, x=0))
    return figure
