"""torch.compile mode x backend grid: what compiled, what it bought, what broke."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from ._common import backend_sort_key, colorbar_ticks, fmt_num, is_missing, provenance_title, require_columns, wrap

# Same order as moe_lab.bench.COMPILE_MODES (kept here so plotting never imports the bench).
MODE_ORDER = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_NOT_COMPILED = {"refused": 0.0, "failed": 1.0}


def _column_labels(df):
    extra = [c for c in ("num_tokens", "dtype", "device") if c in df.columns and df[c].nunique() > 1]
    short = {"num_tokens": "T=", "dtype": "", "device": ""}

    def label(row):  # "transformers:grouped_mm" on two lines: the columns stay narrow, labels upright
        return "<br>".join(str(row["backend"]).replace(":", ":<br>").split("<br>")
                           + [f"{short[c]}{row[c]}" for c in extra])

    return label, extra


def _ratio_text(s: float) -> str:
    return f"{s:.3g}×" if s >= 0.01 else f"1/{1 / s:.3g}×"


def compile_matrix_chart(df, *, title=None) -> go.Figure:
    """Grid of compile mode (rows) x backend (columns).

    Compiled cells are coloured by speedup = uncompiled_ms / compiled_ms (log scale centred on 1×,
    blue faster); a "≠" marks a cell whose compiled output did not match the uncompiled one (after
    the first call or after a routing change). Failed cells are red and refused cells grey, with the
    error text in the hover. Always two heatmap traces: "speedup" and "not compiled".
    When the frame has several token counts (or dtypes), each gets its own column.
    """
    require_columns(df, ["mode", "backend", "status"], "compile_matrix_chart")
    label, _ = _column_labels(df)
    d = df.copy()
    d["_col"] = [label(r) for _, r in d.iterrows()]
    backends = sorted(set(d["backend"].astype(str)), key=backend_sort_key)
    cols = []
    for b in backends:
        sub = d[d["backend"] == b]
        sort_cols = [c for c in ("num_tokens", "dtype") if c in sub.columns]
        cols += list(dict.fromkeys(sub.sort_values(sort_cols)["_col"] if sort_cols else sub["_col"]))
    modes = [m for m in MODE_ORDER if m in set(d["mode"])] + sorted(set(d["mode"]) - set(MODE_ORDER))
    shape = (len(modes), len(cols))
    z_speed, z_fail = np.full(shape, np.nan), np.full(shape, np.nan)
    text = [["" for _ in cols] for _ in modes]
    hover = [["" for _ in cols] for _ in modes]
    for _, r in d.iterrows():
        i, j = modes.index(r["mode"]), cols.index(r["_col"])
        status = str(r["status"])
        lines = [f"<b>{r['backend']}</b>, mode={r['mode']}" + (f", T={r['num_tokens']}" if "num_tokens" in r else ""),
                 f"status: <b>{status}</b>"]
        for col, name, unit in (("compile_s", "compile time", " s"), ("uncompiled_ms", "uncompiled", " ms"),
                                ("compiled_ms", "compiled", " ms"), ("max_rel_err", "max rel. error", "")):
            if col in r and not is_missing(r[col]):
                lines.append(f"{name}: {fmt_num(r[col])}{unit}")
        mismatch = []
        for col, name in (("equal_to_uncompiled", "matches uncompiled"),
                          ("equal_after_routing_change", "matches after routing change")):
            if col in r and not is_missing(r[col]):
                lines.append(f"{name}: {bool(r[col])}")
                if not bool(r[col]):
                    mismatch.append(name)
        error = r.get("error", "")
        if not is_missing(error) and str(error):
            lines.append("error: " + wrap(str(error), 70))
        hover[i][j] = "<br>".join(lines)
        speedup = r.get("speedup", float("nan"))
        if status == "compiled" and not is_missing(speedup) and speedup > 0:
            z_speed[i, j] = math.log2(float(speedup))
            text[i][j] = _ratio_text(float(speedup)) + (" ≠" if mismatch else "")
        elif status == "compiled":
            z_speed[i, j] = 0.0
            text[i][j] = "compiled" + (" ≠" if mismatch else "")
        else:
            z_fail[i, j] = _NOT_COMPILED.get(status, 1.0)
            text[i][j] = status
    finite = z_speed[np.isfinite(z_speed)]
    zmax = max(1.0, math.ceil(float(np.abs(finite).max()))) if finite.size else 1.0
    ticks = colorbar_ticks(zmax)
    common = dict(x=cols, y=modes, texttemplate="%{text}", hovertemplate="%{hovertext}<extra></extra>",
                  hoverongaps=False, xgap=2, ygap=2)

    def only(z):  # each trace carries the text / hover of its own cells only
        keep = np.isfinite(z)
        return ([[t if keep[i, j] else "" for j, t in enumerate(row)] for i, row in enumerate(text)],
                [[h if keep[i, j] else "" for j, h in enumerate(row)] for i, row in enumerate(hover)])

    speed_text, speed_hover = only(z_speed)
    fail_text, fail_hover = only(z_fail)
    fig = go.Figure([
        go.Heatmap(z=z_speed, name="speedup", colorscale="RdBu", zmin=-zmax, zmax=zmax, zmid=0,
                   text=speed_text, hovertext=speed_hover,
                   colorbar=dict(title=dict(text="speedup<br>(uncompiled /<br>compiled)"), tickvals=ticks,
                                 ticktext=[_ratio_text(2.0**t) for t in ticks]), **common),
        go.Heatmap(z=z_fail, name="not compiled", colorscale=[[0, "#C8C8C8"], [0.5, "#C8C8C8"],
                                                              [0.5, "#E45756"], [1, "#E45756"]],
                   zmin=0, zmax=1, showscale=False, text=fail_text, hovertext=fail_hover, **common),
    ])
    prov = provenance_title(df)
    main = ("torch.compile: mode x backend<br><sup>speedup over uncompiled; red failed, grey refused, "
            "≠ wrong output</sup>")
    fig.update_layout(
        title=title or (f"{main}<br><sup>{prov}</sup>" if prov else main), margin=dict(t=100),
        xaxis=dict(type="category", title="backend", side="bottom", tickangle=0, tickfont=dict(size=10)),
        yaxis=dict(type="category", title="torch.compile mode", autorange="reversed"),
        template="plotly_white",
    )
    return fig
