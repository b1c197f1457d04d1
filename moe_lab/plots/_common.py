"""Shared helpers for the figure builders: column checks, labels, colours, byte formatting."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import plotly.colors as pcolors

# Backends keep the same colour in every figure, so a reader can follow one across a notebook.
_FIXED_COLORS = {"eager": "#636EFA", "batched_mm": "#EF553B", "grouped_mm": "#00CC96", "triton": "#AB63FA",
                 "auto": "#FFA15A"}
_PALETTE = [c for c in pcolors.qualitative.Plotly if c not in _FIXED_COLORS.values()] + list(
    pcolors.qualitative.D3
)

# Columns that describe *which* experiment a row is (besides backend and tokens). When one of these
# takes several values in a DataFrame, each value gets its own line, labelled with the short name.
SERIES_FIELDS = (
    "preset", "device", "dtype", "hidden_size", "intermediate_size", "num_experts", "top_k",
    "distribution", "skew",
)
SHORT = {
    "preset": "", "device": "", "dtype": "", "distribution": "", "hidden_size": "H=",
    "intermediate_size": "I=", "num_experts": "E=", "top_k": "k=", "skew": "skew=",
}

STATUS_SYMBOLS = {"refused": "x", "oom": "triangle-down", "unsupported": "diamond-open", "error": "x-open",
                  "failed": "x", "compiled": "circle"}


def require_columns(df, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{where}: the DataFrame lacks column(s) {missing}; it has {list(df.columns)}. "
            "Pass rows from moe_lab.bench.measure / sweep (or load_results)."
        )


CANONICAL_BACKENDS = ("eager", "batched_mm", "grouped_mm", "triton", "auto")


def backend_sort_key(backend) -> tuple:
    """eager, batched_mm, grouped_mm, triton, auto first (the order of the lessons), then the rest by name."""
    b = str(backend)
    return (CANONICAL_BACKENDS.index(b), "") if b in CANONICAL_BACKENDS else (len(CANONICAL_BACKENDS), b)


def backend_color(backend: str, order: Sequence[str] = ()) -> str:
    """The backend's colour: fixed for the built-ins, else the next palette colour in `order`
    (the backends of the figure), so a reader's own backends get colours of their own."""
    if backend in _FIXED_COLORS:
        return _FIXED_COLORS[backend]
    others = list(dict.fromkeys(b for b in order if b not in _FIXED_COLORS))
    i = others.index(backend) if backend in others else sum(map(ord, backend))
    return _PALETTE[i % len(_PALETTE)]


def backend_style(backend: str, order: Sequence[str] = ()) -> dict:
    """Line colour and dash of a backend. A name "<library>:<backend>" (another library's backend of
    the same name, measured beside moe_lab's, e.g. "transformers:grouped_mm") takes that backend's
    colour with a dashed line; auto, which runs one of the others, is dotted."""
    library, _, base = str(backend).rpartition(":")
    if library:
        bases = [str(b).rpartition(":")[2] for b in order]
        return {"color": backend_color(base, bases), "dash": "dash"}
    return {"color": backend_color(str(backend), [str(b).rpartition(":")[2] for b in order]),
            "dash": "dot" if backend == "auto" else "solid"}


def legend_below(fig, *, y: float = -0.2):
    """Legend as rows under the plot, so it never takes the plot's width nor scrolls; returns `fig`.
    `y` is in plot-height units below the plot area (leave room for the x axis title)."""
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=y, xanchor="left", x=0, title_text="",
                                  font=dict(size=11), tracegroupgap=4))
    return fig


def colorbar_ticks(zmax: int, max_ticks: int = 7) -> list[int]:
    """Integer log2 ticks from -zmax to zmax, at most `max_ticks` of them (always 0, i.e. 1x): a colour
    bar of 2^-8..2^8 with a label per power stacks 17 labels into a short bar."""
    zmax = max(1, int(zmax))
    step = max(1, math.ceil(2 * zmax / (max_ticks - 1)))
    return [t for t in range(-zmax, zmax + 1) if t % step == 0]


def tick_label(value: float) -> str:
    """0.5 -> "0.5", 2000 -> "2k", 3e6 -> "3M": written in full, as a reader expects on a log axis."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def log_ticks(values, max_ticks: int = 9) -> dict:
    """tickvals / ticktext for a log axis over `values` (the data it shows).

    plotly labels the 2 and 5 between decades with a bare digit, so 0.5 reads "5" and 0.2 reads
    "2"; here every tick is written in full. Steps of 1-2-5 per decade, or 1-3, or one per decade,
    or every other decade: the densest that puts at most `max_ticks` inside the data's range.
    Empty (plotly's own ticks) only when there is no positive value."""
    positive = [float(v) for v in values if v is not None and not is_missing(v) and float(v) > 0]
    if not positive:
        return {}
    lo, hi = min(positive), max(positive)
    first, last = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    for mantissas, every in (((1, 2, 5), 1), ((1, 3), 1), ((1,), 1), ((1,), 2), ((1,), 3)):
        ticks = [m * 10.0**e for e in range(first, last + 1) if e % every == 0 for m in mantissas]
        inside = [t for t in ticks if lo / 1.05 <= t <= hi * 1.05]
        if len(inside) <= max_ticks:
            break
    # The ticks just outside the data stay: plotly pads a log axis beyond the data and hides the ticks it
    # does not show. A narrow range (one point, or a flat line) gets the ticks of the decades around it.
    pad = 4 if len(inside) >= 2 else 20
    shown = [t for t in ticks if lo / pad <= t <= hi * pad]
    return {"tickvals": shown, "ticktext": [tick_label(t) for t in shown]}


def token_ticks(values, max_ticks: int = 12) -> dict:
    """The token counts themselves as ticks of a log tokens axis (1, 16, 128, ...), when there are few."""
    tokens = sorted({int(v) for v in values if not is_missing(v) and float(v) > 0})
    if len(tokens) > max_ticks:
        return log_ticks(tokens)
    return {"tickvals": tokens, "ticktext": [str(t) for t in tokens]}


def is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return isinstance(value, float) and math.isnan(value)
    except TypeError:
        return False


def fmt_bytes(n) -> str:
    if is_missing(n):
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fmt_num(x, spec: str = ".3g", missing: str = "n/a") -> str:
    return missing if is_missing(x) else format(x, spec)


def varying_fields(df, candidates: Iterable[str] = SERIES_FIELDS) -> list[str]:
    """The candidate columns present in `df` that take more than one value."""
    return [c for c in candidates if c in df.columns and df[c].astype(str).nunique(dropna=False) > 1]


def series_label(row, fields: Sequence[str], backend_col: str = "backend") -> str:
    parts = [str(row[backend_col])] if backend_col else []
    for f in fields:
        value = row[f]
        if f == "preset" and (is_missing(value) or value == ""):
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(f"{SHORT.get(f, f + '=')}{value}")
    return " ".join(parts)


def status_of(df):
    """The status column, or "ok" everywhere when the frame has none."""
    if "status" in df.columns:
        return df["status"].fillna("error").astype(str)
    import pandas as pd

    return pd.Series(["ok"] * len(df), index=df.index)


def reason_of(row) -> str:
    reason = row.get("reason", "") if hasattr(row, "get") else ""
    return "" if is_missing(reason) else str(reason)


def wrap(text: str, width: int = 80) -> str:
    """Break long error text for hover boxes (plotly hover does not wrap on its own)."""
    import textwrap

    return "<br>".join(textwrap.wrap(str(text), width)) or ""


def provenance_title(df) -> str:
    """"on <card>, <date>" from the provenance columns, when the frame has them."""
    bits = []
    if "device_name" in df.columns:
        names = sorted({str(x) for x in df["device_name"].dropna()})
        if names:
            bits.append(" / ".join(names))
    if "date" in df.columns:
        dates = sorted({str(x)[:10] for x in df["date"].dropna() if str(x)})
        if dates:
            bits.append(dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")
    return ", ".join(bits)
