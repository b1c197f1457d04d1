"""Roofline: how close each measurement gets to the memory-bandwidth and matmul ceilings."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ._common import (
    backend_sort_key, backend_style, fmt_bytes, fmt_num, is_missing, legend_below, log_ticks, require_columns,
    series_label, status_of, varying_fields,
)


def _ceiling(ceilings, name):
    value = ceilings.get(name) if isinstance(ceilings, dict) else getattr(ceilings, name, None)
    if value is None or is_missing(value) or float(value) <= 0:
        raise ValueError(f"roofline_chart: ceilings need a positive {name!r} (got {value!r})")
    return float(value)


def roofline_chart(df, ceilings, *, label_fields=None, title=None) -> go.Figure:
    """Achieved TFLOP/s against arithmetic intensity (flops / min_bytes, FLOP/byte), log-log.

    `ceilings`: a `moe_lab.bench.Ceilings` (or a dict) with `copy_GBps` and `matmul_TFLOPs`. The
    memory roof is intensity * bandwidth, the compute roof is the matmul rate; they meet at the
    ridge point. `min_bytes` counts only the weights of experts actually hit plus hidden in/out,
    so a point under the sloped roof is bandwidth-bound even with perfect reuse.
    Rows that were not measured are left out and counted in the subtitle.
    """
    require_columns(df, ["backend", "num_tokens", "flops", "min_bytes"], "roofline_chart")
    if "tflops" not in df.columns and "median_ms" not in df.columns:
        raise ValueError("roofline_chart: needs a tflops or median_ms column")
    bw = _ceiling(ceilings, "copy_GBps")  # GB/s
    peak = _ceiling(ceilings, "matmul_TFLOPs")  # TFLOP/s
    ridge = peak * 1e12 / (bw * 1e9)  # FLOP/byte where the roofs meet

    d = df.copy()
    d["intensity"] = d["flops"] / d["min_bytes"]
    achieved = d["tflops"] if "tflops" in d.columns else np.nan
    if "median_ms" in d.columns:
        fallback = d["flops"] / (d["median_ms"] * 1e-3) / 1e12
        achieved = fallback if "tflops" not in d.columns else d["tflops"].fillna(fallback)
    d["achieved"] = achieved
    ok_mask = (status_of(d) == "ok") & d["achieved"].notna() & (d["achieved"] > 0) & (d["intensity"] > 0)
    ok = d[ok_mask]
    if label_fields is None:
        label_fields = varying_fields(d)
    order = sorted(d["backend"].astype(str).unique(), key=backend_sort_key)
    traces = []
    groups = [sub for _, sub in ok.groupby(["backend", *label_fields], sort=True, dropna=False)]
    for sub in sorted(groups, key=lambda g: backend_sort_key(g["backend"].iloc[0])):
        first = sub.iloc[0]
        label = series_label(first, label_fields)
        style = backend_style(str(first["backend"]), order)
        hover = []
        for _, r in sub.iterrows():
            roof = min(peak, r["intensity"] * bw / 1e3)
            lines = [f"<b>{label}</b>", f"tokens: {int(r['num_tokens'])}",
                     f"intensity: {r['intensity']:.3g} FLOP/byte", f"achieved: {r['achieved']:.3g} TFLOP/s",
                     f"roof here: {roof:.3g} TFLOP/s ({'memory' if r['intensity'] < ridge else 'compute'}-bound)",
                     f"fraction of roof: {r['achieved'] / roof:.1%}"]
            if "median_ms" in r and not is_missing(r["median_ms"]):
                lines.append(f"median: {fmt_num(r['median_ms'])} ms")
            if "gbps" in r and not is_missing(r["gbps"]):
                lines.append(f"min-bytes bandwidth: {fmt_num(r['gbps'])} GB/s")
            lines.append(f"flops: {r['flops']:.3g}, min bytes: {fmt_bytes(r['min_bytes'])}")
            hover.append("<br>".join(lines))
        traces.append(go.Scatter(
            x=sub["intensity"].tolist(), y=sub["achieved"].tolist(), mode="markers+lines",
            name=label, marker=dict(color=style["color"], size=8),
            line=dict(color=style["color"], width=1, dash="dash" if style["dash"] == "dash" else "dot"),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        ))
    xs = d.loc[d["intensity"] > 0, "intensity"]
    lo = min(float(xs.min()) if len(xs) else ridge, ridge) / 4
    hi = max(float(xs.max()) if len(xs) else ridge, ridge) * 4
    mem_x = np.geomspace(lo, ridge, 2)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=mem_x.tolist(), y=(mem_x * bw / 1e3).tolist(), mode="lines",
        name=f"memory roof ({bw:.4g} GB/s)", line=dict(color="black", width=2),
        hovertemplate="memory roof<br>%{x:.3g} FLOP/byte → %{y:.3g} TFLOP/s<extra></extra>",
    ))
    fig.add_trace(go.Scatter(
        x=[ridge, hi], y=[peak, peak], mode="lines", name=f"compute roof ({peak:.4g} TFLOP/s)",
        line=dict(color="black", width=2, dash="dash"),
        hovertemplate="compute roof<br>%{y:.3g} TFLOP/s<extra></extra>",
    ))
    fig.add_traces(traces)
    fig.add_annotation(x=np.log10(ridge), y=np.log10(peak), text=f"ridge: {ridge:.3g} FLOP/byte",
                       showarrow=True, arrowhead=2, ax=40, ay=30)
    skipped = int((~ok_mask).sum())
    where = ", ".join(str(v) for v in (
        ceilings.get("device") if isinstance(ceilings, dict) else getattr(ceilings, "device", None),
        ceilings.get("dtype") if isinstance(ceilings, dict) else getattr(ceilings, "dtype", None),
    ) if v is not None)
    notes = ([f"ceilings measured on {where}"] if where else []) + (
        [f"{skipped} row(s) that did not run are not drawn"] if skipped else [])
    main = "Roofline: achieved TFLOP/s vs arithmetic intensity"
    if title is None:
        title = f"{main}<br><sup>{'; '.join(notes)}</sup>" if notes else main
    elif skipped:
        title += f"<br><sup>{notes[-1]}</sup>"
    fig.update_layout(
        title=title,
        xaxis=dict(type="log", title="arithmetic intensity (FLOP / min byte)", **log_ticks([lo * 2, hi / 2])),
        yaxis=dict(type="log", title="achieved throughput (TFLOP/s)",
                   **log_ticks([*ok["achieved"].tolist(), peak, float(mem_x[0] * bw / 1e3)])),
        template="plotly_white", hovermode="closest", height=480,
    )
    return legend_below(fig, y=-0.16)
