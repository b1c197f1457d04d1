"""Speedup of one backend over another across a 2-D grid of settings."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from ._common import (
    SERIES_FIELDS, colorbar_ticks, fmt_num, legend_below, provenance_title, reason_of, require_columns, status_of, wrap,
)

AXIS_LABELS = {
    "num_tokens": "tokens (T)", "num_experts": "experts (E)", "top_k": "experts per token (top_k)",
    "hidden_size": "hidden size (H)", "intermediate_size": "expert width (I)", "dtype": "dtype",
    "skew": "routing skew", "distribution": "routing distribution", "preset": "preset",
}


def _sorted_values(values):
    values = list(dict.fromkeys(values))
    try:
        return sorted(values, key=float)
    except (TypeError, ValueError):
        return sorted(values, key=str)


def _ratio_label(log2_value: float) -> str:
    r = 2.0**log2_value
    return f"{r:.3g}×" if r >= 1 else f"1/{1 / r:.3g}×"


def speedup_heatmap(df, baseline: str = "eager", backend: str = "grouped_mm", x: str = "num_tokens",
                    y: str = "num_experts", *, title=None) -> go.Figure:
    """Heatmap of `baseline` latency / `backend` latency over an x-by-y grid (>1: `backend` is faster).

    Rows of the two backends are paired on every config column they share (x, y and whatever else
    varies: top_k, dtype, ...); a cell shows the geometric mean of its pairs' speedups. Colour is
    log2(speedup) on a diverging scale centred on 1× (blue: `backend` faster, red: slower). Cells
    where either backend was not measured get an x marker whose hover gives the status and reason.
    """
    require_columns(df, ["backend", "median_ms", x, y], "speedup_heatmap")
    present = set(df["backend"].astype(str))
    for name in (baseline, backend):
        if name not in present:
            raise ValueError(f"speedup_heatmap: no rows for backend {name!r}; the frame has {sorted(present)}")
    status = status_of(df)
    keys = [x, y] + [c for c in SERIES_FIELDS if c in df.columns and c not in (x, y)]
    keys += [c for c in ("num_tokens",) if c in df.columns and c not in keys]
    ok = df[(status == "ok") & df["median_ms"].notna()]
    base = ok[ok["backend"] == baseline].groupby(keys, dropna=False)["median_ms"].median().rename("base_ms")
    cand = ok[ok["backend"] == backend].groupby(keys, dropna=False)["median_ms"].median().rename("cand_ms")
    pairs = base.to_frame().join(cand, how="inner").reset_index()
    pairs["log2_speedup"] = np.log2(pairs["base_ms"] / pairs["cand_ms"])

    both = df[df["backend"].isin([baseline, backend])]
    xs, ys = _sorted_values(both[x].tolist()), _sorted_values(both[y].tolist())
    z = np.full((len(ys), len(xs)), np.nan)
    text = [["" for _ in xs] for _ in ys]
    hover = [["" for _ in xs] for _ in ys]
    missing_x, missing_y, missing_hover = [], [], []
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            cell = pairs[(pairs[x] == xv) & (pairs[y] == yv)]
            if len(cell):
                v = float(cell["log2_speedup"].mean())
                z[j, i] = v
                text[j][i] = _ratio_label(v)
                hover[j][i] = (
                    f"{AXIS_LABELS.get(x, x)}: {xv}<br>{AXIS_LABELS.get(y, y)}: {yv}<br>"
                    f"<b>{backend} is {2**v:.2f}× {'faster' if v >= 0 else 'slower'}</b> than {baseline}<br>"
                    f"{baseline}: {fmt_num(cell['base_ms'].median())} ms, "
                    f"{backend}: {fmt_num(cell['cand_ms'].median())} ms"
                    + (f"<br>(geometric mean of {len(cell)} pairs)" if len(cell) > 1 else "")
                )
            else:
                rows = both[(both[x] == xv) & (both[y] == yv)]
                if not len(rows):
                    continue
                bad = rows[status_of(rows) != "ok"]
                reasons = [f"{r['backend']}: {r.get('status', '?')}: {wrap(reason_of(r), 70)}"
                           for _, r in bad.iterrows()]
                have = sorted(set(rows["backend"]))
                if not reasons:
                    reasons = [f"only {have} measured here"]
                missing_x.append(str(xv))
                missing_y.append(str(yv))
                missing_hover.append(f"{AXIS_LABELS.get(x, x)}: {xv}<br>{AXIS_LABELS.get(y, y)}: {yv}<br>"
                                     "<b>no speedup</b><br>" + "<br>".join(reasons))
    finite = z[np.isfinite(z)]
    zmax = max(1.0, math.ceil(float(np.abs(finite).max()))) if finite.size else 1.0
    ticks = colorbar_ticks(zmax, max_ticks=5 if len(ys) <= 3 else 7)  # a short bar carries fewer labels
    fig = go.Figure(go.Heatmap(
        x=[str(v) for v in xs], y=[str(v) for v in ys], z=z, zmin=-zmax, zmax=zmax, zmid=0,
        colorscale="RdBu", text=text, texttemplate="%{text}", hovertext=hover,
        hovertemplate="%{hovertext}<extra></extra>", hoverongaps=False, name=f"{backend} vs {baseline}",
        colorbar=dict(title=dict(text=f"speedup<br>({baseline} ms /<br>{backend} ms)"), tickvals=ticks,
                      ticktext=[_ratio_label(t) for t in ticks], len=1.0, lenmode="fraction"),
    ))
    if missing_x:
        fig.add_trace(go.Scatter(
            x=missing_x, y=missing_y, mode="markers", name="not measured",
            marker=dict(symbol="x", size=14, color="black"), hovertext=missing_hover,
            hovertemplate="%{hovertext}<extra></extra>",
        ))
    prov = provenance_title(df)
    main = f"Speedup of {backend} over {baseline} (>1×: {backend} faster)"
    fig.update_layout(
        title=title or (f"{main}<br><sup>{prov}</sup>" if prov else main),
        xaxis=dict(type="category", title=AXIS_LABELS.get(x, x)),
        yaxis=dict(type="category", title=AXIS_LABELS.get(y, y)),
        template="plotly_white", showlegend=bool(missing_x), height=max(380, 170 + 50 * len(ys)),
    )
    if missing_x:
        legend_below(fig, y=-0.2)
    return fig
