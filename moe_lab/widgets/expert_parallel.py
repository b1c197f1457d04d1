"""Pick the number of ranks and the routing skew; watch where the pairs land and where the time goes.

Each change starts that many gloo processes on this machine (moe_lab.parallel.run_on_ranks) and
times the expert-parallel layer's phases on each (moe_lab.bench.expert_parallel), about a second.
"""
from __future__ import annotations

import ipywidgets as widgets

from ..bench.expert_parallel import measure_on_local_ranks
from ..config import MoEConfig
from ..plots.expert_parallel import phases_figure, pairs_received_figure
from ._common import first_line, new_figure_widget, status_html, sync_figure


class ExpertParallelExplorer(widgets.VBox):
    """`controls`: world_size (the divisors of E up to max_ranks), skew. `figures`: "phases" (stacked
    per rank) and "received" (pairs per rank). `rows`: the last measurement's DataFrame; `status`."""

    def __init__(self, config: MoEConfig, tokens_per_rank: int = 64, *, world_size: int = 2, skew: float = 0.0,
                 backend: str = "grouped_mm", max_ranks: int = 4, reps: int = 3):
        self.config, self.tokens_per_rank, self.backend, self.reps = config, tokens_per_rank, backend, reps
        choices = [w for w in range(1, max_ranks + 1) if config.num_experts % w == 0]
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.controls = {
            "world_size": widgets.Dropdown(options=choices, value=world_size if world_size in choices else choices[-1],
                                           description="ranks"),
            "skew": widgets.FloatSlider(value=skew, min=0.0, max=3.0, step=0.25, description="Zipf skew", **slider),
        }
        self.status = widgets.HTML("")
        self.rows = self._measure()
        self.figures = {"phases": new_figure_widget(phases_figure(self.rows), width=560),
                        "received": new_figure_widget(pairs_received_figure(self.rows), width=420)}
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        super().__init__([widgets.HBox(list(self.controls.values())), self.status,
                          widgets.HBox([self.figures["phases"], self.figures["received"]])])

    def _measure(self):
        world, skew = self.controls["world_size"].value, self.controls["skew"].value
        rows = measure_on_local_ranks(self.config, self.tokens_per_rank, world, skew=skew, backend=self.backend,
                                      reps=self.reps)
        self.status.value = status_html("ok", f"{world} gloo processes, {self.tokens_per_rank} tokens each, skew "
                                              f"{skew:g}: {self.backend} on each rank's experts")
        return rows

    def _on_change(self, change):
        try:
            self.rows = self._measure()
        except Exception as error:  # noqa: BLE001 (a widget reports, it does not raise into the event loop)
            self.status.value = status_html("error", first_line(error))
            return
        sync_figure(self.figures["phases"], phases_figure(self.rows))
        sync_figure(self.figures["received"], pairs_received_figure(self.rows))


def expert_parallel_explorer(config: MoEConfig, tokens_per_rank: int = 64, **kwargs) -> ExpertParallelExplorer:
    return ExpertParallelExplorer(config, tokens_per_rank, **kwargs)
