"""Browse a recorded results DataFrame (e.g. a GPU sweep saved to data/) without a GPU."""
from __future__ import annotations

import plotly.graph_objects as go

from ._common import is_missing, provenance_title, require_columns, varying_fields
from .latency import latency_figure, latency_traces


def _group_label(row, by_device: bool) -> str:
    preset = row.get("preset", "")
    if is_missing(preset) or not str(preset):
        cfg = [f"{short}{row[c]}" for c, short in (("hidden_size", "H="), ("intermediate_size", "I="),
                                                   ("num_experts", "E="), ("top_k", "k=")) if c in row]
        preset = " ".join(cfg) or "results"
    return f"{preset} on {row['device_name']}" if by_device else str(preset)


def recorded_explorer(df, *, title_prefix: str = "Recorded results") -> go.Figure:
    """Latency vs tokens per backend, with a dropdown over the presets (configs) in `df`.

    Each dropdown entry shows only that preset's lines and puts its card and date (from the
    provenance columns `device_name` and `date`) in the title. Rows not measured are marked in a
    strip under the plot with their reason, as in `latency_vs_tokens`; another library's backend
    ("transformers:grouped_mm") is dashed in the colour of moe_lab's backend of that name.
    """
    require_columns(df, ["backend", "num_tokens", "median_ms"], "recorded_explorer")
    by_device = "device_name" in df.columns and df["device_name"].nunique() > 1
    d = df.copy()
    d["_group"] = [_group_label(r, by_device) for _, r in d.iterrows()]
    groups = list(dict.fromkeys(d["_group"]))
    traces, spans, titles = [], [], []
    for g in groups:
        sub = d[d["_group"] == g]
        fields = [f for f in varying_fields(sub) if f != "preset"]
        start = len(traces)
        traces += latency_traces(sub, label_fields=fields)
        spans.append((start, len(traces)))
        prov = provenance_title(sub)
        dtypes = ", ".join(sorted(sub["dtype"].astype(str).unique())) if "dtype" in sub.columns else ""
        sup = ", ".join(x for x in (dtypes, prov) if x)
        titles.append(f"{title_prefix}: {g}" + (f"<br><sup>{sup}</sup>" if sup else ""))
    fig = latency_figure([traces], height=520)
    n = len(fig.data)
    for t, trace in enumerate(fig.data):
        trace.visible = spans[0][0] <= t < spans[0][1] if spans else True
    buttons = [
        dict(label=g, method="update",
             args=[{"visible": [a <= t < b for t in range(n)]}, {"title.text": titles[i]}])
        for i, (g, (a, b)) in enumerate(zip(groups, spans))
    ]
    fig.update_layout(
        title=dict(text=titles[0] if titles else title_prefix),
        updatemenus=[dict(type="dropdown", buttons=buttons, active=0, x=1.0, xanchor="right", y=1.02,
                          yanchor="bottom", showactive=True)],
        margin=dict(t=110),
    )
    return fig
