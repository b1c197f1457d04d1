"""Figures for notebook 09: loss curves of one model trained with several backends, and how the
router spreads the picks over the experts as training goes on."""
from __future__ import annotations

import plotly.graph_objects as go

from ._common import backend_color


def loss_curves(histories) -> go.Figure:
    """One next-token-loss line per backend (moe_lab.lessons.nb09_training.TrainingHistory), with the
    best achievable loss as a dashed line when histories carry it. Lines that lie on top of each
    other are the point: the backends compute the same function."""
    figure = go.Figure()
    order = [history.backend for history in histories]
    for number, history in enumerate(histories):
        figure.add_trace(go.Scatter(
            x=list(range(1, len(history.loss) + 1)), y=history.loss, mode="lines", name=history.backend,
            line=dict(color=backend_color(history.backend, order), width=2, dash=("solid", "dot", "dash")[number % 3])))
    figure.update_layout(
        title="Training loss per step, one line per backend (same seed, same batches)",
        xaxis_title="step", yaxis_title="next-token loss (nats)", height=360, margin=dict(t=60, b=80),
        legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    return figure


def expert_usage(history) -> go.Figure:
    """A heatmap: share of the first block's top-k picks per expert (rows) at each step (columns)."""
    usage = list(zip(*history.usage))  # [E][steps]
    figure = go.Figure(go.Heatmap(
        z=usage, x=list(range(1, len(history.usage) + 1)), y=[f"expert {e}" for e in range(len(usage))],
        colorscale="Viridis", zmin=0, colorbar=dict(title="share", len=0.8, nticks=5)))
    figure.update_layout(title=f"Which experts the router picks as training goes on ({history.backend})",
                         xaxis_title="step", height=340, margin=dict(t=60))
    return figure
