"""Filter a compile-matrix DataFrame by mode / backend / tokens and read the failures."""
from __future__ import annotations

import html

import ipywidgets as widgets

from ..plots import compile_matrix_chart
from ..plots._common import backend_sort_key, is_missing, require_columns
from ..plots.compile import MODE_ORDER
from ._common import first_line, new_figure_widget, status_html, sync_figure

ALL = "all"


class CompileExplorer(widgets.VBox):
    """The container returned by `compile_explorer`.

    `controls`: "modes" and "backends" (SelectMultiple) and "num_tokens" (Dropdown with "all").
    `figures["matrix"]`: FigureWidget of `moe_lab.plots.compile_matrix_chart` on the selection.
    `status`: counts of compiled / failed / refused cells and the error text of each failure.
    `selected()`: the filtered DataFrame.
    """

    def __init__(self, df):
        require_columns(df, ["mode", "backend", "status"], "compile_explorer")
        self.df = df.reset_index(drop=True)
        modes = [m for m in MODE_ORDER if m in set(df["mode"])] + sorted(set(df["mode"]) - set(MODE_ORDER))
        backends = sorted(set(df["backend"].astype(str)), key=backend_sort_key)
        tokens = sorted(df["num_tokens"].unique().tolist()) if "num_tokens" in df.columns else []
        self.controls = {
            "modes": widgets.SelectMultiple(options=modes, value=tuple(modes), description="modes",
                                            rows=min(6, max(2, len(modes)))),
            "backends": widgets.SelectMultiple(options=backends, value=tuple(backends), description="backends",
                                               rows=min(6, max(2, len(backends)))),
            "num_tokens": widgets.Dropdown(options=[ALL, *tokens], value=ALL, description="tokens (T)",
                                           disabled=len(tokens) < 2),
        }
        self.status = widgets.HTML("")
        self.figures = {"matrix": new_figure_widget(compile_matrix_chart(self.df), height=360 + 30 * len(modes))}
        for control in self.controls.values():
            control.observe(lambda _change: self.update(), names="value")
        super().__init__([
            widgets.HBox(list(self.controls.values())),
            self.figures["matrix"],
            self.status,
        ])
        self.update()

    def selected(self):
        c, d = self.controls, self.df
        mask = d["mode"].isin(c["modes"].value) & d["backend"].astype(str).isin(c["backends"].value)
        if c["num_tokens"].value != ALL and "num_tokens" in d.columns:
            mask &= d["num_tokens"] == c["num_tokens"].value
        return d[mask]

    def update(self) -> None:
        sub = self.selected()
        try:
            sync_figure(self.figures["matrix"], compile_matrix_chart(sub))
        except Exception as exc:
            self.status.value = status_html("error", first_line(exc))
            return
        if not len(sub):
            self.status.value = status_html("info", "no cells match the selection")
            return
        counts = sub["status"].value_counts().to_dict()
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        problems = []
        for _, r in sub[sub["status"] != "compiled"].iterrows():
            err = r.get("error", "")
            err = "" if is_missing(err) else str(err)
            where = f"{r['backend']} / {r['mode']}" + (f" / T={r['num_tokens']}" if "num_tokens" in r else "")
            problems.append(f"<li><b>{html.escape(where)}</b> ({html.escape(str(r['status']))}): "
                            f"<code>{html.escape(err) or '(no error text)'}</code></li>")
        for col, what in (("equal_to_uncompiled", "differs from uncompiled"),
                          ("equal_after_routing_change", "differs after a routing change")):
            if col in sub.columns:
                for _, r in sub[(sub["status"] == "compiled") & (sub[col] == False)].iterrows():  # noqa: E712
                    problems.append(f"<li><b>{html.escape(str(r['backend']))} / {html.escape(str(r['mode']))}</b>: "
                                    f"compiled output {what}</li>")
        self.status.value = (f"<div><b>{html.escape(summary)}</b></div>"
                             + (f"<ul>{''.join(problems)}</ul>" if problems else ""))


def compile_explorer(df) -> CompileExplorer:
    """Interactive view of a `moe_lab.bench.compile_matrix` DataFrame: returns a `CompileExplorer`.

    Mode / backend / token selectors filter the mode x backend chart; below it, every failed or
    refused cell with its error text, and every compiled cell whose output did not match.
    """
    return CompileExplorer(df)
