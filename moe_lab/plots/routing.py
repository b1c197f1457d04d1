"""Where tokens go: per-expert load and the token x expert weight matrix."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch

from ..routing import RoutingStats, routing_stats


def _as_index_tensor(top_k_index) -> torch.Tensor:
    if isinstance(top_k_index, torch.Tensor):
        top_k_index = top_k_index.detach().cpu()
    t = torch.as_tensor(np.asarray(top_k_index))
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k] (or [T]), got shape {tuple(t.shape)}")
    return t.long()


def stats_of(routing, num_experts=None) -> RoutingStats:
    """RoutingStats from a RoutingStats (returned as is) or a [T, k] expert-index tensor/array."""
    if isinstance(routing, RoutingStats):
        if num_experts is not None and num_experts != routing.num_experts:
            raise ValueError(f"num_experts={num_experts} but the RoutingStats has {routing.num_experts} experts")
        return routing
    idx = _as_index_tensor(routing)
    if num_experts is None:
        num_experts = int(idx.max()) + 1 if idx.numel() else 1
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_experts):
        raise ValueError(f"expert indices must be in [0, {num_experts}); got {int(idx.min())}..{int(idx.max())}")
    return routing_stats(idx, num_experts)


def routing_summary(stats: RoutingStats) -> str:
    """One line for titles and status text."""
    return (f"T={stats.num_tokens}, top_k={stats.top_k}, E={stats.num_experts}: "
            f"{stats.experts_hit}/{stats.num_experts} experts hit, max/mean load {stats.imbalance:.2f}, "
            f"normalized entropy {stats.normalized_entropy:.2f}")


def routing_histogram(routing, num_experts=None, *, title=None) -> go.Figure:
    """Bars of (token, expert) pairs per expert, with the mean load as a dashed line.

    `routing`: a `moe_lab.RoutingStats`, or a `top_k_index` tensor/array [T, k] (then pass
    `num_experts`, or it is taken as max index + 1). Experts above 1.5x the mean load are drawn in
    red: those are the stragglers that a grouped GEMM waits for and batched_mm cannot skip.
    """
    stats = stats_of(routing, num_experts)
    counts = np.asarray(stats.tokens_per_expert, dtype=float)
    E = stats.num_experts
    total = counts.sum()
    mean = stats.mean_load
    colors = ["#EF553B" if mean and c > 1.5 * mean else ("#B6B6B6" if c == 0 else "#636EFA") for c in counts]
    share = counts / total if total else np.zeros_like(counts)
    bars = go.Bar(
        x=list(range(E)), y=counts.tolist(), name="tokens per expert", marker_color=colors,
        customdata=np.stack([share, counts / mean if mean else np.zeros_like(counts)], axis=-1).tolist(),
        hovertemplate="expert %{x}<br>%{y} (token, expert) pairs<br>%{customdata[0]:.1%} of all"
                      "<br>%{customdata[1]:.2f}× the mean<extra></extra>",
    )
    mean_line = go.Scatter(
        x=[-0.5, E - 0.5], y=[mean, mean], mode="lines", name=f"mean load ({mean:.1f})",
        line=dict(color="black", dash="dash"), hovertemplate=f"mean load: {mean:.2f}<extra></extra>",
    )
    fig = go.Figure([bars, mean_line])
    fig.update_layout(
        title=title or f"Tokens per expert<br><sup>{routing_summary(stats)}</sup>",
        xaxis=dict(title="expert index", range=[-0.5, E - 0.5]),
        yaxis=dict(title="(token, expert) pairs routed", rangemode="tozero"),
        template="plotly_white", bargap=0.1 if E <= 64 else 0, showlegend=True,
    )
    return fig


def routing_heatmap(top_k_index, top_k_weights, num_experts=None, *, max_tokens: int = 128,
                    title=None) -> go.Figure:
    """Token x expert matrix of routing weights (blank where a token does not use the expert).

    Shows the first `max_tokens` tokens only (the title says so when it cuts). Hover gives the
    weight and which of the token's top_k choices the expert is (1 = highest weight slot).
    """
    idx = _as_index_tensor(top_k_index)
    w = torch.as_tensor(np.asarray(top_k_weights.detach().float().cpu() if isinstance(top_k_weights, torch.Tensor)
                                   else top_k_weights, dtype=np.float64))
    if w.dim() == 1:
        w = w[:, None]
    if tuple(w.shape) != tuple(idx.shape):
        raise ValueError(f"top_k_weights shape {tuple(w.shape)} must match top_k_index shape {tuple(idx.shape)}")
    if num_experts is None:
        num_experts = int(idx.max()) + 1 if idx.numel() else 1
    T, k = idx.shape
    shown = min(T, max_tokens)
    idx_s, w_s = idx[:shown].numpy(), w[:shown].double().numpy()
    z = np.full((shown, num_experts), np.nan)
    rank = np.zeros((shown, num_experts), dtype=int)
    rows = np.repeat(np.arange(shown), k)
    z[rows, idx_s.reshape(-1)] = w_s.reshape(-1)
    rank[rows, idx_s.reshape(-1)] = np.tile(np.arange(1, k + 1), shown)
    # None, not NaN, marks the gaps: a FigureWidget sends z as JSON, and NaN is not valid JSON.
    z = [[None if np.isnan(v) else float(v) for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(num_experts)), y=list(range(shown)), customdata=rank, colorscale="Viridis",
        zmin=0, zmax=1, name="routing weight", colorbar=dict(title=dict(text="weight")),
        hovertemplate="token %{y} → expert %{x}<br>weight %{z:.3f}<br>choice #%{customdata} of "
                      f"{k}<extra></extra>",
        hoverongaps=False, xgap=1 if num_experts <= 64 else 0, ygap=1 if shown <= 64 else 0,
    ))
    cut = f" (first {shown} of {T} tokens)" if shown < T else ""
    fig.update_layout(
        title=title or f"Routing weights, token x expert{cut}<br><sup>top_k={k}, E={num_experts}; "
                       "blank: expert not used by that token</sup>",
        xaxis=dict(title="expert index"), yaxis=dict(title="token index", autorange="reversed"),
        template="plotly_white",
    )
    return fig
