"""Plotly figures for moe_lab results. Every function returns a `plotly.graph_objects.Figure`
(call `.show()` or let Jupyter display it); none shows anything itself.

Inputs are the tidy DataFrames of `moe_lab.bench` (one row per measurement, columns as in
`moe_lab.bench.measure`), or routing tensors / `moe_lab.RoutingStats`. Importing this module imports
plotly; `import moe_lab` does not.
"""
from .compile import compile_matrix_chart
from .e2e import time_split_bars
from .latency import latency_traces, latency_vs_tokens, memory_traces, memory_vs_tokens
from .recorded_explorer import recorded_explorer
from .roofline import roofline_chart
from .routing import routing_heatmap, routing_histogram, routing_summary
from .speedup import speedup_heatmap

__all__ = [
    "compile_matrix_chart", "latency_traces", "latency_vs_tokens", "memory_traces", "memory_vs_tokens",
    "recorded_explorer", "roofline_chart", "routing_heatmap", "routing_histogram", "routing_summary",
    "speedup_heatmap", "time_split_bars",
]
