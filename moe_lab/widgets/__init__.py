"""Jupyter widgets for exploring experts backends live. Needs the `notebook` extra
(ipywidgets, plotly>=6 with anywidget for `FigureWidget`, pandas); `import moe_lab` does not load it.

Each factory returns an ipywidgets VBox subclass whose important parts are attributes:
`controls` (dict of input widgets), `figures` (dict of plotly FigureWidgets) and `status`
(an HTML widget), so a notebook or a test can drive it from code.
"""
from .backend import BackendExplorer, backend_explorer
from .compile import CompileExplorer, compile_explorer
from .routing import RoutingExplorer, routing_explorer

__all__ = ["BackendExplorer", "CompileExplorer", "RoutingExplorer", "backend_explorer", "compile_explorer",
           "routing_explorer"]
