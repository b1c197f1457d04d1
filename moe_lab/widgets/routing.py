"""Shape a synthetic routing (experts, top_k, skew, tokens, distribution) and watch the load."""
from __future__ import annotations

import html

import ipywidgets as widgets

from .. import predict_gather_bytes, routing_stats, synthetic_routing
from ..config import MoEConfig
from ..plots import routing_heatmap, routing_histogram
from ..plots._common import fmt_bytes
from ..presets import get_preset
from ..routing import DISTRIBUTIONS
from ._common import POWERS_OF_TWO_TOKENS, first_line, new_figure_widget, status_html, sync_figure


class RoutingExplorer(widgets.VBox):
    """The container returned by `routing_explorer`.

    `controls`: num_experts, top_k, num_tokens, distribution, skew, seed. `figures`: "histogram"
    (tokens per expert) and, unless disabled, "heatmap" (token x expert weights of the first
    tokens). `stats` (HTML with the load statistics and what they cost each backend), `status`
    (errors), `routing` (the current (top_k_index, top_k_weights)), `routing_stats` (RoutingStats).
    """

    def __init__(self, config: MoEConfig | str | None = None, *, num_tokens: int = 512, distribution: str = "zipf",
                 skew: float = 1.0, seed: int = 0, max_experts: int = 256, show_heatmap: bool = True,
                 heatmap_tokens: int = 32):
        if config is None:
            config = "olmoe-1b-7b"
        if isinstance(config, str):
            config = get_preset(config).config
        self.config = config
        self.heatmap_tokens = heatmap_tokens
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        tokens = list(POWERS_OF_TWO_TOKENS)
        self.controls = {
            "num_experts": widgets.IntSlider(value=config.num_experts, min=1,
                                             max=max(max_experts, config.num_experts), description="experts (E)",
                                             **slider),
            "top_k": widgets.IntSlider(value=config.top_k, min=1, max=config.num_experts, description="top_k",
                                       **slider),
            "num_tokens": widgets.SelectionSlider(options=tokens, value=min(tokens, key=lambda t: abs(t - num_tokens)),
                                                  description="tokens (T)", **slider),
            "distribution": widgets.Dropdown(options=list(DISTRIBUTIONS), value=distribution,
                                             description="distribution"),
            "skew": widgets.FloatSlider(value=skew, min=0.0, max=3.0, step=0.1, description="zipf skew",
                                        **slider),
            "seed": widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="160px")),
        }
        self.status = widgets.HTML("")
        self.stats = widgets.HTML("")
        self._suspend = False
        self.routing = None
        self.routing_stats = None
        self._compute()
        self.figures = {"histogram": new_figure_widget(routing_histogram(self.routing_stats), width=680)}
        if show_heatmap:
            self.figures["heatmap"] = new_figure_widget(self._heatmap_figure(), height=380)
        self._update_stats_text()
        c = self.controls
        c["num_experts"].observe(self._on_experts, names="value")
        for name in ("top_k", "num_tokens", "distribution", "skew", "seed"):
            c[name].observe(self._on_change, names="value")
        self._sync_skew_enabled()
        super().__init__([
            widgets.HBox([c["num_experts"], c["top_k"], c["num_tokens"]]),
            widgets.HBox([c["distribution"], c["skew"], c["seed"]]),
            self.status,
            widgets.HBox([self.figures["histogram"], self.stats]),
            *([self.figures["heatmap"]] if show_heatmap else []),
        ])

    def _sync_skew_enabled(self):
        self.controls["skew"].disabled = self.controls["distribution"].value != "zipf"

    def _on_experts(self, change):
        top_k = self.controls["top_k"]
        self._suspend = True
        try:
            top_k.max = max(1, change["new"])
            top_k.value = min(top_k.value, top_k.max)
        finally:
            self._suspend = False
        self.update()

    def _on_change(self, _change):
        self._sync_skew_enabled()
        if not self._suspend:
            self.update()

    def _compute(self):
        c = self.controls
        self.routing = synthetic_routing(c["num_tokens"].value, c["num_experts"].value, c["top_k"].value,
                                         distribution=c["distribution"].value, skew=c["skew"].value,
                                         seed=c["seed"].value)
        self.routing_stats = routing_stats(self.routing[0], c["num_experts"].value)

    def _heatmap_figure(self):
        idx, w = self.routing
        return routing_heatmap(idx, w, self.controls["num_experts"].value, max_tokens=self.heatmap_tokens)

    def update(self) -> None:
        """Recompute the routing from the controls and redraw; errors go to `status`."""
        try:
            self._compute()
            sync_figure(self.figures["histogram"], routing_histogram(self.routing_stats))
            if "heatmap" in self.figures:
                sync_figure(self.figures["heatmap"], self._heatmap_figure())
        except Exception as exc:
            self.status.value = status_html("error", first_line(exc))
            return
        self.status.value = ""
        self._update_stats_text()

    def _update_stats_text(self):
        s, cfg = self.routing_stats, self.config
        T, k, E = s.num_tokens, s.top_k, s.num_experts
        gather = predict_gather_bytes(T, k, cfg.hidden_size, cfg.intermediate_size, cfg.dtype)
        weights_hit = s.experts_hit * 3 * cfg.hidden_size * cfg.intermediate_size * cfg.dtype.itemsize
        rows = [
            ("tokens x top_k", f"{T} x {k} = {T * k} (token, expert) pairs"),
            ("experts hit", f"{s.experts_hit} / {E}"),
            ("max load", f"{s.max_load} pairs (mean {s.mean_load:.1f})"),
            ("max / mean", f"{s.imbalance:.2f}  (1.00 = perfectly even)"),
            ("normalized entropy", f"{s.normalized_entropy:.3f}  (1 = uniform, 0 = one expert)"),
        ]
        cost = [
            ("eager", f"loops over the {s.experts_hit} experts hit (one small matmul pair each)"),
            ("batched_mm", f"gathers one weight copy per pair: {fmt_bytes(gather)}"),
            ("grouped_mm", f"reads the {s.experts_hit} experts hit once: {fmt_bytes(weights_hit)}; "
                           f"the busiest expert does {s.imbalance:.1f}x the mean work"),
        ]
        table = "".join(f"<tr><td><b>{html.escape(a)}</b></td><td>{html.escape(b)}</td></tr>" for a, b in rows)
        costs = "".join(f"<li><code>{html.escape(a)}</code>: {html.escape(b)}</li>" for a, b in cost)
        self.stats.value = (
            f"<table>{table}</table><p>At the expert sizes of the config (H={cfg.hidden_size}, "
            f"I={cfg.intermediate_size}, {str(cfg.dtype).removeprefix('torch.')}):</p><ul>{costs}</ul>"
        )


def routing_explorer(config=None, **kwargs) -> RoutingExplorer:
    """Interactive synthetic routing: returns a `RoutingExplorer` (an ipywidgets VBox).

    Sliders for experts, top_k (its maximum follows the expert count), tokens, zipf skew, and a
    distribution dropdown (uniform / zipf / single) drive `moe_lab.synthetic_routing`; the tokens
    per expert histogram, a token x expert weight heatmap and the load statistics update live.
    `config` (a MoEConfig or preset name, default "olmoe-1b-7b") sets the starting E and top_k and
    the expert sizes used to say what the routing costs each backend in bytes.
    Keyword arguments: num_tokens, distribution, skew, seed, max_experts, show_heatmap, heatmap_tokens.
    """
    return RoutingExplorer(config, **kwargs)
