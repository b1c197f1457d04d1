"""`make html` pages work offline: math rendered to MathML, plotly embedded, nothing fetched from a CDN."""
import re

import nbformat
import pytest

pytest.importorskip("nbconvert")
pytest.importorskip("latex2mathml", reason="make html renders math with latex2mathml (the lab extra)")

from moe_lab.display import OfflineHTMLExporter, tex_to_mathml  # noqa: E402

MARKDOWN = r"""# Gathered bytes

Each pair copies $3 \cdot H \cdot I$ elements:

$$\text{gathered bytes} = T \cdot k \cdot 3 \cdot H \cdot I \cdot b$$

Code stays code: `cost = $5` and

```bash
echo $HOME $PWD
```

A formula that cannot be read is shown, not dropped: $x^$.
"""


def _page(cells, outputs=()):
    nb = nbformat.v4.new_notebook(cells=cells)
    for cell, cell_outputs in zip(nb.cells, outputs):
        cell.outputs = [nbformat.from_dict(o) for o in cell_outputs]
    body, _ = OfflineHTMLExporter().from_notebook_node(nb)
    return body


def test_math_becomes_mathml_and_nothing_is_fetched():
    figure = {"data": [{"type": "bar", "x": [0, 1], "y": [3, 4]}], "layout": {"title": {"text": "two bars"}}}
    plotly_output = {"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.plotly.v1+json": figure, "text/plain": "Figure()"}}
    markdown_output = {"output_type": "display_data", "metadata": {}, "data": {
        "text/markdown": "from code: $T \\cdot k$ pairs", "text/plain": "<Markdown>"}}
    body = _page([nbformat.v4.new_markdown_cell(MARKDOWN), nbformat.v4.new_code_cell("fig"),
                  nbformat.v4.new_code_cell("Markdown(...)")], [[], [plotly_output], [markdown_output]])
    # no script or stylesheet from the network: no MathJax, no require.js, no widget manager
    remote = re.findall(r'<(?:script|link)[^>]*(?:src|href)="(https?://[^"]+)"', body)
    assert remote == [], remote
    assert "MathJax.Hub" not in body and "mathjax" not in body.split("<body")[0].lower()
    # math: the display formula as a block, the inline ones inline, from markdown cells and markdown outputs
    assert len(re.findall(r'<math[^>]*display="block"', body)) == 1
    assert len(re.findall(r'<math[^>]*display="inline"', body)) >= 2
    assert "<mtext>gathered bytes</mtext>" in body.replace("&#x000A0;", " ").replace("\xa0", " ")
    text = re.sub(r"<script.*?</script>|<pre.*?</pre>|<code.*?</code>", "", body.split("<body", 1)[1], flags=re.S)
    assert "$$" not in text and "\\cdot" not in text  # no raw TeX left for a reader
    assert '<code class="tex"' in body and "x^" in body  # the unreadable one, as code
    # code is left alone
    assert "<code>cost = $5</code>" in body and "$HOME" in body and "$PWD" in body
    # plotly is drawn from the embedded plotly.js
    assert 'class="plotly-graph-div"' in body and "* plotly.js v" in body


def test_unreadable_tex_is_shown_not_dropped():
    html = tex_to_mathml(r"\frac{a}{", display=False)
    assert html.startswith('<code class="tex"') and r"\frac{a}{" in html and "not rendered" in html
    assert re.match(r'<math[^>]*display="block"', tex_to_mathml(r"\frac{a}{b}", display=True))


def test_make_html_uses_the_offline_exporter():
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    html_recipe = makefile.split("\nhtml:", 1)[1].split("\nclean:", 1)[0]
    assert "--to moe_lab.display.OfflineHTMLExporter" in html_recipe
