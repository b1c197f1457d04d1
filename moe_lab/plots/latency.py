"""Latency and memory against the number of tokens, one line per backend (and per config)."""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import (
    STATUS_SYMBOLS, backend_color, backend_sort_key, fmt_bytes, fmt_num, is_missing, provenance_title, reason_of,
    require_columns, series_label, status_of, varying_fields, wrap,
)

MIB = 2**20


def _series(df, label_fields):
    """(label, backend, sub-frame) per line, in a stable order: backend first, then config."""
    keys = ["backend", *label_fields]
    out = []
    for _, sub in df.groupby(keys, sort=True, dropna=False):
        first = sub.iloc[0]
        out.append((series_label(first, label_fields), str(first["backend"]), sub))
    # stable sort: backends in lesson order, configs in groupby order within each
    return sorted(out, key=lambda item: backend_sort_key(item[1]))


def _row_hover(label, row, extra: Sequence[str] = ()) -> str:
    lines = [f"<b>{label}</b>", f"tokens: {int(row['num_tokens'])}"]
    status = str(row.get("status", "ok"))
    if status == "ok" and not is_missing(row.get("median_ms")):
        ms = f"median {fmt_num(row['median_ms'])} ms"
        if "p10_ms" in row and "p90_ms" in row:
            ms += f" (p10 {fmt_num(row['p10_ms'])}, p90 {fmt_num(row['p90_ms'])})"
        if "reps" in row and not is_missing(row["reps"]):
            ms += f", {int(row['reps'])} reps"
        lines.append(ms)
    else:
        lines.append(f"<b>status: {status}</b>")
        lines.append("reason: " + (wrap(reason_of(row)) or "(none given)"))
    for name in extra:
        lines.append(name)
    if "peak_bytes" in row and not is_missing(row["peak_bytes"]):
        method = f" ({row['memory_method']})" if "memory_method" in row and not is_missing(row["memory_method"]) else ""
        lines.append(f"peak memory: {fmt_bytes(row['peak_bytes'])}{method}")
    if "predicted_bytes" in row and not is_missing(row["predicted_bytes"]):
        lines.append(f"predicted memory: {fmt_bytes(row['predicted_bytes'])}")
    if "grouped_mm_kernel" in row and not is_missing(row["grouped_mm_kernel"]) and row["grouped_mm_kernel"]:
        lines.append(f"grouped_mm kernel: {row['grouped_mm_kernel']}")
    if "rel_err" in row and not is_missing(row["rel_err"]):
        lines.append(f"rel. error vs fp64 reference: {fmt_num(row['rel_err'], '.2e')}")
    return "<br>".join(lines)


def _not_measured_trace(label, backend, bad, y_values, color, **kw) -> go.Scatter:
    statuses = status_of(bad)
    symbols = [STATUS_SYMBOLS.get(s, "x") for s in statuses]
    return go.Scatter(
        x=bad["num_tokens"].tolist(), y=list(y_values), mode="markers",
        name=f"{label}: not measured", legendgroup=label,
        marker=dict(symbol=symbols, size=11, color=color, line=dict(width=2, color=color)),
        hovertext=[_row_hover(label, r) for _, r in bad.iterrows()],
        hovertemplate="%{hovertext}<extra></extra>",
        customdata=[[s, reason_of(r)] for s, (_, r) in zip(statuses, bad.iterrows())],
        meta={"backend": backend, "kind": "not_measured"},
        **kw,
    )


def latency_traces(df, *, label_fields=None, floor_ms=None, showlegend=True) -> list[go.Scatter]:
    """The traces of `latency_vs_tokens` (used by the widgets and the recorded-results explorer)."""
    require_columns(df, ["backend", "num_tokens", "median_ms"], "latency_vs_tokens")
    if label_fields is None:
        label_fields = varying_fields(df)
    label_fields = [f for f in label_fields if f in df.columns]
    status = status_of(df)
    ok_mask = (status == "ok") & df["median_ms"].notna()
    if floor_ms is None:
        floor_ms = float(df.loc[ok_mask, "median_ms"].min()) / 2 if ok_mask.any() else 1.0
    order = sorted(df["backend"].astype(str).unique())
    traces = []
    for label, backend, sub in _series(df, label_fields):
        color = backend_color(backend, order)
        sub_status = status_of(sub)
        good = sub[(sub_status == "ok") & sub["median_ms"].notna()].sort_values("num_tokens")
        bad = sub[~((sub_status == "ok") & sub["median_ms"].notna())]
        if len(good):
            error_y = None
            if {"p10_ms", "p90_ms"} <= set(good.columns) and good["p90_ms"].notna().all():
                error_y = dict(type="data", symmetric=False, thickness=1,
                               array=(good["p90_ms"] - good["median_ms"]).clip(lower=0).tolist(),
                               arrayminus=(good["median_ms"] - good["p10_ms"]).clip(lower=0).tolist())
            traces.append(go.Scatter(
                x=good["num_tokens"].tolist(), y=good["median_ms"].tolist(), mode="lines+markers",
                name=label, legendgroup=label, line=dict(color=color), marker=dict(color=color, size=7),
                error_y=error_y, hovertext=[_row_hover(label, r) for _, r in good.iterrows()],
                hovertemplate="%{hovertext}<extra></extra>", showlegend=showlegend,
                meta={"backend": backend, "kind": "measured"},
            ))
        if len(bad):
            traces.append(_not_measured_trace(label, backend, bad, [floor_ms] * len(bad), color,
                                              showlegend=showlegend))
    return traces


def _title(main: str, df, extra=()) -> str:
    prov = provenance_title(df)
    parts = []
    for col in ("dtype", "device"):
        if col in df.columns and df[col].nunique() == 1:
            parts.append(str(df[col].iloc[0]))
    if prov:
        parts.append(prov)
    parts.extend(extra)
    sub = ", ".join(dict.fromkeys(", ".join(parts).split(", "))) if parts else ""
    return f"{main}<br><sup>{sub}</sup>" if sub else main


def latency_vs_tokens(df, *, label_fields=None, facet_col=None, title=None) -> go.Figure:
    """Median latency (ms) against tokens, log-log, one line per backend (and per config that varies).

    Error bars span p10..p90. Rows whose status is not "ok" (refused, oom, unsupported, error) are
    not dropped: they are drawn as hollow/x markers along the bottom of the plot, and their hover
    text gives the status and the reason.
    `label_fields`: config columns to name lines by (default: those that vary in `df`).
    `facet_col`: a column (e.g. "num_experts") to split into side-by-side panels.
    """
    require_columns(df, ["backend", "num_tokens", "median_ms"], "latency_vs_tokens")
    if label_fields is None:
        label_fields = [f for f in varying_fields(df) if f != facet_col]
    status = status_of(df)
    ok = (status == "ok") & df["median_ms"].notna()
    floor = float(df.loc[ok, "median_ms"].min()) / 2 if ok.any() else 1.0
    title = title or _title("Experts forward latency vs tokens (lower is better)", df)
    if facet_col is None:
        fig = go.Figure(latency_traces(df, label_fields=label_fields, floor_ms=floor))
    else:
        require_columns(df, [facet_col], "latency_vs_tokens(facet_col=...)")
        values = sorted(df[facet_col].unique())
        fig = make_subplots(rows=1, cols=len(values), shared_yaxes=True, horizontal_spacing=0.03,
                            subplot_titles=[f"{facet_col} = {v}" for v in values])
        for i, v in enumerate(values, start=1):
            for tr in latency_traces(df[df[facet_col] == v], label_fields=label_fields, floor_ms=floor,
                                     showlegend=(i == 1)):
                fig.add_trace(tr, row=1, col=i)
    fig.update_xaxes(type="log", title_text="tokens (T)")
    fig.update_yaxes(type="log")
    fig.layout.yaxis.title.text = "median latency (ms)"
    fig.update_layout(title=title, hovermode="closest", legend_title_text="backend",
                      template="plotly_white")
    if (~ok).any():
        fig.add_annotation(text="x / hollow markers at the bottom: not measured (hover for the reason)",
                           xref="paper", yref="paper", x=0, y=-0.18, showarrow=False, font=dict(size=11))
    return fig


def memory_traces(df, *, label_fields=None, showlegend=True) -> list[go.Scatter]:
    """The traces of `memory_vs_tokens`: measured points, predicted dashed lines, not-measured markers."""
    require_columns(df, ["backend", "num_tokens"], "memory_vs_tokens")
    if "peak_bytes" not in df.columns and "predicted_bytes" not in df.columns:
        raise ValueError("memory_vs_tokens: the DataFrame needs peak_bytes and/or predicted_bytes columns")
    if label_fields is None:
        label_fields = varying_fields(df)
    label_fields = [f for f in label_fields if f in df.columns]
    df = df.copy()
    for col in ("peak_bytes", "predicted_bytes"):
        if col not in df.columns:
            df[col] = float("nan")
    known = df.loc[:, ["peak_bytes", "predicted_bytes"]].stack()
    floor = float(known[known > 0].min()) / 2 / MIB if (known > 0).any() else 1.0
    order = sorted(df["backend"].astype(str).unique())
    traces = []
    for label, backend, sub in _series(df, label_fields):
        color = backend_color(backend, order)
        sub_status = status_of(sub)
        ok = sub_status == "ok"
        measured = sub[ok & sub["peak_bytes"].notna()].sort_values("num_tokens")
        predicted = sub[sub["predicted_bytes"].notna()].sort_values("num_tokens")
        bad = sub[~ok]
        if len(measured):
            traces.append(go.Scatter(
                x=measured["num_tokens"].tolist(), y=(measured["peak_bytes"] / MIB).tolist(), mode="markers",
                name=f"{label} measured", legendgroup=label, marker=dict(color=color, size=9),
                hovertext=[_row_hover(label, r) for _, r in measured.iterrows()],
                hovertemplate="%{hovertext}<extra></extra>", showlegend=showlegend,
                meta={"backend": backend, "kind": "measured"},
            ))
        if len(predicted):
            traces.append(go.Scatter(
                x=predicted["num_tokens"].tolist(), y=(predicted["predicted_bytes"] / MIB).tolist(),
                mode="lines", name=f"{label} predicted", legendgroup=label,
                line=dict(color=color, dash="dash"), showlegend=showlegend,
                hovertext=[
                    f"<b>{label}</b> predicted<br>tokens: {int(r['num_tokens'])}<br>"
                    f"total: {fmt_bytes(r['predicted_bytes'])}"
                    + (f"<br>gathered weights: {fmt_bytes(r['predicted_gather_bytes'])}"
                       if "predicted_gather_bytes" in r and not is_missing(r["predicted_gather_bytes"]) else "")
                    for _, r in predicted.iterrows()
                ],
                hovertemplate="%{hovertext}<extra></extra>", meta={"backend": backend, "kind": "predicted"},
            ))
        if len(bad):
            y = [(r["predicted_bytes"] / MIB if not is_missing(r["predicted_bytes"]) else floor)
                 for _, r in bad.iterrows()]
            traces.append(_not_measured_trace(label, backend, bad, y, color, showlegend=showlegend))
    return traces


def memory_vs_tokens(df, *, label_fields=None, budget_bytes=None, title=None) -> go.Figure:
    """Peak memory (MiB) against tokens, log-log: measured points and the predicted total as a dashed line.

    Rows that were not measured (e.g. batched_mm refused because its gathered weights would exceed
    the budget) sit on their predicted value as x markers, with the reason in the hover text.
    `budget_bytes`: draw the batched_mm gather budget as a horizontal line.
    """
    fig = go.Figure(memory_traces(df, label_fields=label_fields))
    if budget_bytes:
        fig.add_hline(y=budget_bytes / MIB, line_dash="dot", line_color="grey",
                      annotation_text=f"batched_mm gather budget ({fmt_bytes(budget_bytes)})",
                      annotation_position="top left")
    methods = []
    if "memory_method" in df.columns:  # e.g. "cpu profiler: ..." -> "cpu profiler" (the full text is in hovers)
        methods = sorted({str(m).split(":")[0] for m in df["memory_method"].dropna() if str(m)})
    if title is None:
        extra = [f"measured by {' / '.join(methods)}"] if methods else []
        title = _title("Peak memory vs tokens (measured points, predicted dashed)", df, extra)
    fig.update_layout(
        title=title,
        xaxis=dict(type="log", title="tokens (T)"), yaxis=dict(type="log", title="peak memory (MiB)"),
        legend_title_text="backend", template="plotly_white", hovermode="closest",
    )
    return fig
