"""Figures of notebook 10: where the pairs land (load per rank) and where a forward's time goes (phases)."""
from __future__ import annotations

import plotly.colors as pcolors
import plotly.graph_objects as go

PALETTE = pcolors.qualitative.Plotly


def palette_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


PHASE_COLUMNS = {"count_exchange_ms": "count exchange", "dispatch_ms": "dispatch", "expert_compute_ms": "experts",
                 "combine_ms": "combine"}


def receive_load_figure(loads) -> go.Figure:
    """Pairs each rank's experts receive, one group of bars per skew (from nb10.receive_loads)."""
    fig = go.Figure()
    for index, (skew, group) in enumerate(loads.groupby("skew", sort=True)):
        fig.add_bar(x=[f"rank {r}" for r in group["rank"]], y=group["pairs_received"], name=f"skew {skew:g}",
                    marker_color=palette_color(index), customdata=group["over_mean"],
                    hovertemplate="%{x}: %{y} pairs (%{customdata:.2f}× the mean)<extra>skew " + f"{skew:g}</extra>")
    fig.update_layout(barmode="group", template="plotly_white", height=360, title="(token, expert) pairs each rank's "
                      "experts receive<br><sup>Zipf-skewed routing piles pairs onto the first experts: the first "
                      "rank's</sup>", yaxis_title="pairs received", legend_title_text="routing")
    return fig


def phases_figure(rows) -> go.Figure:
    """Per rank, the exact layer's forward split into its four phases (median ms), stacked."""
    exact = rows[rows["variant"] == "exact"].sort_values("rank")
    fig = go.Figure()
    for index, (column, label) in enumerate(PHASE_COLUMNS.items()):
        fig.add_bar(x=[f"rank {r}" for r in exact["rank"]], y=exact[column], name=label,
                    marker_color=palette_color(index))
    one = rows[rows["variant"] == "one_device"]
    if len(one):
        fig.add_hline(y=float(one["median_ms"].iloc[0]), line_dash="dash", line_color="#424242",
                      annotation_text="whole layer, one device, same T", annotation_position="top left")
    fig.update_layout(barmode="stack", template="plotly_white", height=380, yaxis_title="ms (median)",
                      title="Where one expert-parallel forward spends its time, per rank<br><sup>measured here: "
                            "gloo between CPU processes; on GPUs with NVLink both the times and the shares differ</sup>")
    return fig


def pairs_received_figure(rows) -> go.Figure:
    """Pairs each rank's experts received in a measured run (the exact variant's rows), against the even share."""
    exact = rows[rows["variant"] == "exact"].sort_values("rank")
    fig = go.Figure()
    fig.add_bar(x=[f"rank {r}" for r in exact["rank"]], y=exact["pairs_received"], marker_color=palette_color(4),
                name="received")
    even = exact["pairs_received"].mean() if len(exact) else 0
    fig.add_hline(y=float(even), line_dash="dot", line_color="#424242", annotation_text="even share")
    fig.update_layout(template="plotly_white", height=380, showlegend=False, yaxis_title="pairs received",
                      title="Pairs each rank's experts received<br><sup>the slowest rank sets the layer's time</sup>")
    return fig
