"""Static HTML for executed notebooks: plotly figures and widgets drawn offline, without a kernel.

In a kernel started by Jupyter (JupyterLab, papermill, nbval) plotly's default renderer emits only
its own mimetype, `application/vnd.plotly.v1+json`. JupyterLab draws it; nbconvert's HTML exporter
does not, so the figure silently disappears from the HTML. Widgets fare no better offline: the HTML
would load the widget manager from a CDN and replay the saved widget state (including a 5 MB
plotly.js copy per `FigureWidget`).

`PlotlyHTMLPreprocessor` fixes both at conversion time, so notebooks need no extra line and executed
notebooks (`runs/`) keep their small plotly mimetype:
  - every plotly-mimetype output gets a `text/html` version (a div plus a script); plotly.js is
    embedded once per page, inline, so the file works offline and on its own;
  - every widget output whose state was saved is replaced by a static snapshot of its last state:
    figures (`FigureWidget`) as plotly figures, HTML/label widgets as their text, controls as
    "description: value", boxes as rows and columns, with a note that it is a snapshot.

    jupyter nbconvert --to html --HTMLExporter.preprocessors=moe_lab.display.PlotlyHTMLPreprocessor runs/*.ipynb

`OfflineHTMLExporter` is the page `make html` writes: the lab template with both of the above and
every formula of the notebook's markdown (and of markdown outputs) rendered to MathML at conversion
time (`latex2mathml`), so the page needs no MathJax, which nbconvert would load from a CDN, and shows
math offline in any current browser:

    jupyter nbconvert --to moe_lab.display.OfflineHTMLExporter runs/*.ipynb

Importing this module needs nbconvert and plotly (the `lab` extra); the exporter also needs latex2mathml.
"""
from __future__ import annotations

import html

from jinja2 import DictLoader, pass_context
from nbconvert.exporters import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath
from nbconvert.preprocessors import Preprocessor
from traitlets import Bool, List, default

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"

_BOXES = {"VBoxModel": "column", "BoxModel": "column", "GridBoxModel": "row", "HBoxModel": "row",
          "AccordionModel": "column", "TabModel": "column", "StackModel": "column"}
_SKIPPED = {"ButtonModel", "PlayModel", "LayoutModel", "DescriptionStyleModel", "ButtonStyleModel"}
_NOTE = ('<div style="font-size: small; color: #57606a">static snapshot of an interactive widget; '
         "run the notebook to use it</div>")


def figure_html(figure: dict, include_plotlyjs: bool) -> str:
    """A plotly figure dict ({"data": [...], "layout": {...}}) as an HTML fragment (div + script)."""
    import plotly.io

    return plotly.io.to_html(dict(figure), include_plotlyjs=include_plotlyjs, full_html=False,
                             validate=False, default_width="100%", default_height=480)


class PlotlyHTMLPreprocessor(Preprocessor):
    """nbconvert preprocessor: plotly figures and saved widgets become static, offline HTML."""

    snapshot_widgets = Bool(True, help="Replace widget views by a static snapshot of their saved state.").tag(
        config=True)

    def preprocess(self, nb, resources):
        self._plotlyjs_done = False
        widgets = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE_MIME, {})
        self._state = widgets.get("state", {}) if isinstance(widgets, dict) else {}
        views_left = 0
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                data = output.get("data")
                if not data:
                    continue
                if PLOTLY_MIME in data and "text/html" not in data:
                    data["text/html"] = self._figure(data[PLOTLY_MIME])
                if WIDGET_VIEW_MIME in data:
                    snapshot = self._widget_snapshot(data[WIDGET_VIEW_MIME]) if self.snapshot_widgets else None
                    if snapshot is None:
                        views_left += 1
                    else:
                        del data[WIDGET_VIEW_MIME]
                        data["text/html"] = snapshot
        if self.snapshot_widgets and not views_left:
            # Nothing needs the widget manager any more: drop the state (megabytes per FigureWidget)
            # so the page does not fetch the manager from a CDN either.
            nb.get("metadata", {}).pop("widgets", None)
        return nb, resources

    # -- plotly ---------------------------------------------------------------------------------
    def _figure(self, figure: dict) -> str:
        include = not self._plotlyjs_done
        self._plotlyjs_done = True
        return figure_html(figure, include_plotlyjs=include)

    # -- widgets --------------------------------------------------------------------------------
    def _widget_snapshot(self, view) -> str | None:
        model_id = view.get("model_id") if isinstance(view, dict) else None
        if model_id not in self._state:
            return None  # state not saved: leave the view to nbconvert
        return f"<div>{self._render(model_id, depth=0)}{_NOTE}</div>"

    def _render(self, model_id: str, depth: int) -> str:
        model = self._state.get(model_id)
        if model is None or depth > 50:
            return ""
        name, state = model.get("model_name", ""), model.get("state", {})
        if "_widget_data" in state and "_widget_layout" in state:  # plotly FigureWidget (anywidget)
            return self._figure({"data": state["_widget_data"], "layout": state["_widget_layout"]})
        if name in _BOXES:
            children = "".join(self._render(str(child).removeprefix("IPY_MODEL_"), depth + 1)
                               for child in state.get("children", []))
            return (f'<div style="display: flex; flex-direction: {_BOXES[name]}; flex-wrap: wrap; gap: 6px; '
                    f'align-items: flex-start">{children}</div>')
        if name in ("HTMLModel", "HTMLMathModel"):
            return f"<div>{self._label(state)}{state.get('value', '')}</div>"
        if name == "LabelModel":
            return f"<span>{html.escape(str(state.get('value', '')))}</span>"
        if name == "OutputModel":
            return "".join(self._output(o) for o in state.get("outputs", []))
        if name in _SKIPPED or name.endswith("StyleModel") or "value" not in state and "index" not in state:
            return ""
        value = state.get("value")
        labels = state.get("_options_labels")
        if labels is not None and isinstance(state.get("index"), int) and 0 <= state["index"] < len(labels):
            value = labels[state["index"]]
        return (f'<span style="font-family: monospace; font-size: small; padding-right: 1em">'
                f"{self._label(state)}{html.escape(str(value))}</span>")

    @staticmethod
    def _label(state) -> str:
        description = state.get("description")
        return f"{html.escape(str(description))}: " if description else ""

    def _output(self, output) -> str:
        data = output.get("data", {})
        if PLOTLY_MIME in data:
            return self._figure(data[PLOTLY_MIME])
        if "text/html" in data:
            return "".join(data["text/html"])
        if "image/png" in data:
            return f'<img src="data:image/png;base64,{"".join(data["image/png"]).strip()}">'
        text = output.get("text") or "".join(data.get("text/plain", ""))
        return f"<pre>{html.escape(''.join(text))}</pre>" if text else ""


# -- math, offline ------------------------------------------------------------------------------
def tex_to_mathml(tex: str, display: bool) -> str:
    """One formula as MathML (`display`: a block of its own). A formula latex2mathml cannot read is
    shown as its TeX in a <code> element, marked, rather than dropped."""
    from latex2mathml.converter import convert

    try:
        return convert(tex.strip(), display="block" if display else "inline")
    except Exception as error:  # latex2mathml raises its own exception types for unknown commands
        why = f"{type(error).__name__}: {error}".rstrip(": ")
        return f'<code class="tex" title="not rendered: {html.escape(why, quote=True)}">{html.escape(tex)}</code>'



class MathMLRenderer(IPythonRenderer):
    """nbconvert's markdown renderer (it finds $...$, $$...$$, \\(...\\), \\[...\\] and LaTeX
    environments, and leaves code alone) with each formula written as MathML instead of TeX for MathJax."""

    def block_math(self, body: str) -> str:
        return tex_to_mathml(body, display=True)

    def inline_math(self, body: str) -> str:
        return tex_to_mathml(body, display=False)

    def latex_environment(self, name: str, body: str) -> str:
        return tex_to_mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)


_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{#- math is MathML already (OfflineHTMLExporter.markdown2html): no MathJax, nothing fetched -#}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{#- plotly.js is inline and widgets are snapshots: nothing needs require.js from a CDN either -#}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
"""


class OfflineHTMLExporter(HTMLExporter):
    """HTML pages that work offline and on their own: plotly figures and saved widgets drawn
    (`PlotlyHTMLPreprocessor`), math rendered to MathML, and no MathJax script from a CDN."""

    export_from_notebook = "HTML, offline"
    extra_loaders = List([DictLoader({"moe_lab_offline.html.j2": _OFFLINE_TEMPLATE})]).tag(affects_environment=True)

    @default("template_file")
    def _template_file_default(self):
        return "moe_lab_offline.html.j2"

    @default("preprocessors")
    def _preprocessors_default(self):
        return [PlotlyHTMLPreprocessor]

    @pass_context
    def markdown2html(self, context, source):
        cell = context.get("cell", {})
        renderer = MathMLRenderer(
            escape=False, attachments=cell.get("attachments", {}), embed_images=self.embed_images,
            path=context.get("resources", {}).get("metadata", {}).get("path", ""),
            anchor_link_text=self.anchor_link_text, exclude_anchor_links=self.exclude_anchor_links,
            **self.lexer_options,
        )
        return MarkdownWithMath(renderer=renderer).render(source)
