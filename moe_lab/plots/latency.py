"""Latency and memory against the number of tokens, one line per backend (and per config)."""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import (
    STATUS_SYMBOLS, backend_sort_key, backend_style, fmt_bytes, fmt_num, is_missing, legend_below, log_ticks,
    provenance_title, reason_of, require_columns, series_label, status_of, token_ticks, varying_fields, wrap,
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


#: Where rows that did not run are drawn: a strip of their own under the latency plot, one row per
#: line, never on the milliseconds axis (a mark at "0.1 ms" reads as a measurement).
NOT_RUN_TITLE = "not run"


def _not_run_trace(label, backend, bad, color, **kw) -> go.Scatter:
    """Markers at the T where `label` did not run, in the strip row named `label`, hover = status + reason."""
    statuses = status_of(bad)
    symbols = [STATUS_SYMBOLS.get(s, "x") for s in statuses]
    row = f"{label}: {'/'.join(dict.fromkeys(statuses))}"  # the strip's row says what happened
    return go.Scatter(
        x=bad["num_tokens"].tolist(), y=[row] * len(bad), mode="markers",
        name=f"{label}: not run", legendgroup=label, showlegend=False,
        marker=dict(symbol=symbols, size=11, color=color, line=dict(width=2, color=color)),
        hovertext=[_row_hover(label, r) for _, r in bad.iterrows()],
        hovertemplate="%{hovertext}<extra></extra>",
        customdata=[[s, reason_of(r)] for s, (_, r) in zip(statuses, bad.iterrows())],
        meta={"backend": backend, "kind": "not_run"},
        **kw,
    )


def latency_traces(df, *, label_fields=None, showlegend=True) -> list[go.Scatter]:
    """The traces of `latency_vs_tokens`: one line per backend (and config), p10..p90 error bars;
    rows that did not run as traces with meta kind "not_run" (place them with `latency_figure`)."""
    require_columns(df, ["backend", "num_tokens", "median_ms"], "latency_vs_tokens")
    if label_fields is None:
        label_fields = varying_fields(df)
    label_fields = [f for f in label_fields if f in df.columns]
    order = sorted(df["backend"].astype(str).unique(), key=backend_sort_key)
    traces = []
    for label, backend, sub in _series(df, label_fields):
        style = backend_style(backend, order)
        sub_status = status_of(sub)
        measured = (sub_status == "ok") & sub["median_ms"].notna()
        good, bad = sub[measured].sort_values("num_tokens"), sub[~measured]
        if len(good):
            error_y = None
            if {"p10_ms", "p90_ms"} <= set(good.columns) and good["p90_ms"].notna().all():
                error_y = dict(type="data", symmetric=False, thickness=1,
                               array=(good["p90_ms"] - good["median_ms"]).clip(lower=0).tolist(),
                               arrayminus=(good["median_ms"] - good["p10_ms"]).clip(lower=0).tolist())
            traces.append(go.Scatter(
                x=good["num_tokens"].tolist(), y=good["median_ms"].tolist(), mode="lines+markers",
                name=label, legendgroup=label, line=dict(color=style["color"], dash=style["dash"]),
                marker=dict(color=style["color"], size=7), error_y=error_y,
                hovertext=[_row_hover(label, r) for _, r in good.iterrows()],
                hovertemplate="%{hovertext}<extra></extra>", showlegend=showlegend,
                meta={"backend": backend, "kind": "measured"},
            ))
        if len(bad):
            traces.append(_not_run_trace(label, backend, bad, style["color"]))
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


def latency_figure(panels, *, titles=None, height=None) -> go.Figure:
    """Place latency traces: a log-log panel per entry of `panels` (lists of `latency_traces`) side by
    side, and under them, only when some row did not run, a strip naming each line that did not, with
    an x (refused), triangle (out of memory) or diamond (unsupported) at that T. The token axis is
    shared; ticks are the token counts and times written in full (0.5, not plotly's "5")."""
    everything = [t for panel in panels for t in panel]
    not_run = list(dict.fromkeys(y for t in everything if (t.meta or {}).get("kind") == "not_run" for y in t.y))
    rows = 2 if not_run else 1
    strip = min(0.35, 0.06 + 0.05 * len(not_run))
    fig = make_subplots(rows=rows, cols=max(1, len(panels)), shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.03 if rows == 2 else 0.0,
                        row_heights=[1 - strip, strip] if rows == 2 else None,
                        subplot_titles=list(titles) if titles else None)
    for col, panel in enumerate(panels, start=1):
        for trace in panel:
            fig.add_trace(trace, row=2 if (trace.meta or {}).get("kind") == "not_run" else 1, col=col)
    tokens = [x for t in everything for x in t.x]
    times = []  # the medians and the ends of their p10..p90 bars: the axis must label all of them
    for t in everything:
        if (t.meta or {}).get("kind") == "measured":
            times += list(t.y)
            if t.error_y is not None and t.error_y.array is not None:
                times += [y + up for y, up in zip(t.y, t.error_y.array)]
                times += [y - down for y, down in zip(t.y, t.error_y.arrayminus) if y - down > 0]
    for col in range(1, max(1, len(panels)) + 1):
        fig.update_xaxes(type="log", row=rows, col=col, title_text="tokens (T)", **token_ticks(tokens))
        fig.update_xaxes(type="log", row=1, col=col, **token_ticks(tokens))
        fig.update_yaxes(type="log", row=1, col=col, **log_ticks(times))
        if rows == 2:
            fig.update_yaxes(type="category", categoryorder="array", categoryarray=not_run[::-1], row=2, col=col,
                             showgrid=False, fixedrange=True, tickfont=dict(size=10))
    fig.update_yaxes(title_text="median latency (ms)", row=1, col=1)
    if rows == 2:
        fig.update_yaxes(title_text=NOT_RUN_TITLE, title_font=dict(size=11), row=2, col=1)
    height = height or (440 + (22 * len(not_run) if not_run else 0))
    fig.update_layout(hovermode="closest", template="plotly_white", height=height)
    return legend_below(fig, y=-0.16 if rows == 1 else -0.12)


def latency_vs_tokens(df, *, label_fields=None, facet_col=None, title=None) -> go.Figure:
    """Median latency (ms) against tokens, log-log, one line per backend (and per config that varies).

    Error bars span p10..p90. Rows whose status is not "ok" (refused, oom, unsupported, error) are
    not dropped: a strip under the plot marks where each line did not run, and the hover gives the
    status and the reason. A "<library>:<backend>" line (e.g. transformers' grouped_mm) is dashed in
    the colour of moe_lab's backend of that name.
    `label_fields`: config columns to name lines by (default: those that vary in `df`).
    `facet_col`: a column (e.g. "num_experts") to split into side-by-side panels.
    """
    require_columns(df, ["backend", "num_tokens", "median_ms"], "latency_vs_tokens")
    if label_fields is None:
        label_fields = [f for f in varying_fields(df) if f != facet_col]
    title = title or _title("Experts forward latency vs tokens (lower is better)", df)
    if facet_col is None:
        fig = latency_figure([latency_traces(df, label_fields=label_fields)])
    else:
        require_columns(df, [facet_col], "latency_vs_tokens(facet_col=...)")
        values = sorted(df[facet_col].unique())
        panels = [latency_traces(df[df[facet_col] == v], label_fields=label_fields, showlegend=(i == 0))
                  for i, v in enumerate(values)]
        fig = latency_figure(panels, titles=[f"{facet_col} = {v}" for v in values])
    fig.update_layout(title=title)
    return fig


def memory_traces(df, *, label_fields=None, showlegend=True) -> list[go.Scatter]:
    """The traces of `memory_vs_tokens`: measured peaks as dots, the prediction as a dashed line in the
    same colour (one legend entry per line), and rows that did not run as an x on their prediction."""
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
    order = sorted(df["backend"].astype(str).unique(), key=backend_sort_key)
    traces = []
    for label, backend, sub in _series(df, label_fields):
        color = backend_style(backend, order)["color"]
        ok = status_of(sub) == "ok"
        measured = sub[ok & sub["peak_bytes"].notna()].sort_values("num_tokens")
        predicted = sub[sub["predicted_bytes"].notna()].sort_values("num_tokens")
        bad = sub[~ok & sub["predicted_bytes"].notna()]
        legend = [showlegend]  # the first trace of a line carries its legend entry

        def entry():
            shown, legend[0] = legend[0], False
            return shown

        if len(measured):
            traces.append(go.Scatter(
                x=measured["num_tokens"].tolist(), y=(measured["peak_bytes"] / MIB).tolist(), mode="markers",
                name=label, legendgroup=label, marker=dict(color=color, size=9), showlegend=entry(),
                hovertext=[_row_hover(label, r) for _, r in measured.iterrows()],
                hovertemplate="%{hovertext}<extra></extra>", meta={"backend": backend, "kind": "measured"},
            ))
        if len(predicted):
            traces.append(go.Scatter(
                x=predicted["num_tokens"].tolist(), y=(predicted["predicted_bytes"] / MIB).tolist(),
                mode="lines", name=label, legendgroup=label, line=dict(color=color, dash="dash"),
                showlegend=entry(),
                hovertext=[
                    f"<b>{label}</b> predicted<br>tokens: {int(r['num_tokens'])}<br>"
                    f"total: {fmt_bytes(r['predicted_bytes'])}"
                    + (f"<br>gathered weights: {fmt_bytes(r['predicted_gather_bytes'])}"
                       if "predicted_gather_bytes" in r and not is_missing(r["predicted_gather_bytes"]) else "")
                    for _, r in predicted.iterrows()
                ],
                hovertemplate="%{hovertext}<extra></extra>", meta={"backend": backend, "kind": "predicted"},
            ))
        if len(bad):  # where it would have needed this much: the reason it did not run
            statuses = status_of(bad)
            traces.append(go.Scatter(
                x=bad["num_tokens"].tolist(), y=(bad["predicted_bytes"] / MIB).tolist(), mode="markers+text",
                name=f"{label}: not run", legendgroup=label, showlegend=False, text=statuses.tolist(),
                textposition="middle left", textfont=dict(size=10, color=color),
                marker=dict(symbol=[STATUS_SYMBOLS.get(x, "x") for x in statuses], size=11, color=color,
                            line=dict(width=2, color=color)),
                hovertext=[_row_hover(label, r) for _, r in bad.iterrows()],
                hovertemplate="%{hovertext}<extra></extra>",
                customdata=[[x, reason_of(r)] for x, (_, r) in zip(statuses, bad.iterrows())],
                meta={"backend": backend, "kind": "not_run"},
            ))
    return traces


def memory_vs_tokens(df, *, label_fields=None, budget_bytes=None, title=None) -> go.Figure:
    """Peak memory (MiB) against tokens, log-log: measured peaks as dots, the predicted total as a
    dashed line of the same colour.

    Rows that were not measured (e.g. batched_mm refused because its gathered weights would exceed
    the budget) sit on their predicted value as an x labelled with the status, the reason in the hover.
    `budget_bytes`: draw the batched_mm gather budget as a horizontal line.
    """
    traces = memory_traces(df, label_fields=label_fields)
    fig = go.Figure(traces)
    mib = [y for t in traces for y in t.y]
    if budget_bytes:
        fig.add_hline(y=budget_bytes / MIB, line_dash="dot", line_color="grey",
                      annotation_text=f"batched_mm gather budget ({fmt_bytes(budget_bytes)})",
                      annotation_position="top left")
        mib.append(budget_bytes / MIB)
    methods = []
    if "memory_method" in df.columns:  # e.g. "cpu profiler: ..." -> "cpu profiler" (the full text is in hovers)
        methods = sorted({str(m).split(":")[0] for m in df["memory_method"].dropna() if str(m)})
    if title is None:
        extra = [f"measured by {' / '.join(methods)}"] if methods else []
        title = _title("Peak memory vs tokens (dots measured, dashed predicted)", df, extra)
    fig.update_layout(
        title=title,
        xaxis=dict(type="log", title="tokens (T)", **token_ticks([x for t in traces for x in t.x])),
        yaxis=dict(type="log", title="peak memory (MiB)", **log_ticks(mib)),
        template="plotly_white", hovermode="closest", height=440,
    )
    return legend_below(fig, y=-0.16)
