"""Shared helpers for the figure builders: column checks, labels, colours, byte formatting."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import plotly.colors as pcolors

# Backends keep the same colour in every figure, so a reader can follow one across a notebook.
_FIXED_COLORS = {"eager": "#636EFA", "batched_mm": "#EF553B", "grouped_mm": "#00CC96"}
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
    if backend in _FIXED_COLORS:
        return _FIXED_COLORS[backend]
    others = [b for b in order if b not in _FIXED_COLORS]
    i = others.index(backend) if backend in others else abs(hash(backend))
    return _PALETTE[i % len(_PALETTE)]


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
