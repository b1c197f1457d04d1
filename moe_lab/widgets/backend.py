"""Pick a backend, top_k, expert count, tokens and dtype; measure live; plot latency and memory."""
from __future__ import annotations

import math

import ipywidgets as widgets
import torch

from .. import available_backends, default_device, resolve_dtype, runnable_backends, scale_down
from ..config import MoEConfig
from ..plots import latency_vs_tokens, memory_vs_tokens
from ..plots._common import fmt_bytes, fmt_num, is_missing
from ._common import POWERS_OF_TWO_TOKENS, first_line, new_figure_widget, status_html, sync_figure

DTYPES = ("float32", "bfloat16", "float16", "float64")
LABEL_FIELDS = ("num_experts", "top_k", "dtype")  # every line is named by these, so a change starts a new line
PLOT_COLUMNS = ("backend", "num_tokens", "status", "reason", "median_ms", "peak_bytes", "predicted_bytes",
                *LABEL_FIELDS)


def _default_config(device) -> MoEConfig:
    if torch.device(device if device is not None else default_device()).type == "cuda":
        return scale_down("mixtral-8x7b", hidden_size=1024, dtype="bfloat16")
    return scale_down("mixtral-8x7b")  # H=64, E=8, top_k=2, float32: milliseconds on a laptop CPU


def _dtype_name(dtype) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def _as_row(result) -> dict:
    """measure() returns a dict; accept a one-row DataFrame or a Series too."""
    if isinstance(result, dict):
        return dict(result)
    if hasattr(result, "to_dict") and hasattr(result, "columns"):
        records = result.to_dict("records")
        if len(records) != 1:
            raise ValueError(f"measure_fn returned {len(records)} rows; expected one")
        return records[0]
    if hasattr(result, "to_dict"):
        return result.to_dict()
    raise TypeError(f"measure_fn returned {type(result).__name__}; expected a dict row")


class BackendExplorer(widgets.VBox):
    """The container returned by `backend_explorer`.

    Attributes for driving it from code (or tests): `controls` (dict of the input widgets:
    backend, num_experts, top_k, num_tokens, dtype, auto, measure, sweep, clear), `figures`
    ("latency", "memory": plotly FigureWidgets), `status` (HTML widget with the last outcome),
    `rows` (every measurement row so far), `dataframe()`, `measure()`, `sweep_tokens()`, `clear()`.
    """

    def __init__(self, config=None, *, measure_fn=None, device=None, tokens=None, backends=None,
                 dtypes=DTYPES, max_experts: int = 256, measure_on_start: bool = True, figure_width: int = 620,
                 **measure_kwargs):
        self.device = device
        self.base_config = config if config is not None else _default_config(device)
        self._measure_fn = measure_fn
        self.measure_kwargs = measure_kwargs
        self.rows: list[dict] = []
        self._suspend = False
        cfg = self.base_config
        # Default: what runs here compiled. triton's CPU interpreter is exact but takes seconds a call
        # (~7 s to measure T=128 at the CPU default shape), too slow for a widget that measures on every
        # change; pass backends=[..., "triton"] to time it anyway.
        backends = (list(backends) if backends is not None
                    else runnable_backends(device if device is not None else default_device(), interpreted=False))
        if not backends:
            raise ValueError(f"backends= is empty; give at least one name, e.g. from {available_backends()}")
        tokens = tuple(tokens) if tokens is not None else POWERS_OF_TWO_TOKENS[: 14 if self._is_cpu() else 17]
        dtypes = list(dict.fromkeys([_dtype_name(cfg.dtype), *dtypes]))
        start_tokens = min(tokens, key=lambda t: abs(math.log2(t) - math.log2(128)))
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.controls = {
            "backend": widgets.Dropdown(options=backends, description="backend",
                                        value="grouped_mm" if "grouped_mm" in backends else backends[0]),
            "num_experts": widgets.IntSlider(value=cfg.num_experts, min=1, max=max(max_experts, cfg.num_experts),
                                             description="experts (E)", **slider),
            "top_k": widgets.IntSlider(value=cfg.top_k, min=1, max=cfg.num_experts, description="top_k", **slider),
            "num_tokens": widgets.SelectionSlider(options=list(tokens), value=start_tokens,
                                                  description="tokens (T)", **slider),
            "dtype": widgets.Dropdown(options=dtypes, value=_dtype_name(cfg.dtype), description="dtype"),
            "auto": widgets.Checkbox(value=True, description="measure on every change", indent=False),
            "measure": widgets.Button(description="measure", button_style="primary", icon="play"),
            "sweep": widgets.Button(description="all token counts", tooltip="measure every token count"),
            "clear": widgets.Button(description="clear", icon="trash"),
        }
        self.status = widgets.HTML(status_html("info", "change a control (or press measure) to time the experts"))
        self.figures = {
            "latency": new_figure_widget(self._latency_figure(), width=figure_width),
            "memory": new_figure_widget(self._memory_figure(), width=figure_width),
        }
        c = self.controls
        c["num_experts"].observe(self._on_experts, names="value")
        for name in ("backend", "top_k", "num_tokens", "dtype"):
            c[name].observe(self._on_change, names="value")
        c["measure"].on_click(lambda _: self.measure())
        c["sweep"].on_click(lambda _: self.sweep_tokens())
        c["clear"].on_click(lambda _: self.clear())
        shape = widgets.HTML(f"<small>H={cfg.hidden_size}, I={cfg.intermediate_size}, "
                             f"activation={cfg.activation}; device={device or default_device()}</small>")
        super().__init__([
            widgets.HBox([c["backend"], c["dtype"], shape]),
            widgets.HBox([c["num_experts"], c["top_k"], c["num_tokens"]]),
            widgets.HBox([c["auto"], c["measure"], c["sweep"], c["clear"]]),
            self.status,
            widgets.HBox([self.figures["latency"], self.figures["memory"]]),
        ])
        if measure_on_start:
            self.measure()

    # -- plumbing -------------------------------------------------------------------------------
    def _is_cpu(self) -> bool:
        return torch.device(self.device if self.device is not None else default_device()).type == "cpu"

    @property
    def measure_fn(self):
        if self._measure_fn is None:
            from ..bench import measure  # lazy: the bench pulls in pandas

            self._measure_fn = measure
        return self._measure_fn

    def _on_experts(self, change):
        top_k = self.controls["top_k"]
        self._suspend = True
        try:
            top_k.max = max(1, change["new"])  # ipywidgets clamps top_k.value down when needed
            top_k.value = min(top_k.value, top_k.max)
        finally:
            self._suspend = False
        self._on_change(change)

    def _on_change(self, _change):
        if not self._suspend and self.controls["auto"].value:
            self.measure()

    def current_config(self) -> MoEConfig:
        c = self.controls
        return self.base_config.replace(num_experts=c["num_experts"].value, top_k=c["top_k"].value,
                                        dtype=c["dtype"].value)

    def dataframe(self):
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        for col in PLOT_COLUMNS:  # a minimal or failing measure_fn may leave some out
            if col not in frame.columns:
                frame[col] = "" if col in ("status", "reason") else float("nan")
        return frame

    def _latency_figure(self):
        import pandas as pd

        if not self.rows:
            fig = latency_vs_tokens(pd.DataFrame(columns=["backend", "num_tokens", "median_ms", *LABEL_FIELDS]))
            fig.update_layout(title="Latency vs tokens (no measurement yet)")
            return fig
        return latency_vs_tokens(self.dataframe(), label_fields=list(LABEL_FIELDS))

    def _memory_figure(self):
        import pandas as pd

        if not self.rows:
            fig = memory_vs_tokens(pd.DataFrame(columns=["backend", "num_tokens", "peak_bytes", "predicted_bytes",
                                                         *LABEL_FIELDS]))
            fig.update_layout(title="Peak memory vs tokens (no measurement yet)")
            return fig
        return memory_vs_tokens(self.dataframe(), label_fields=list(LABEL_FIELDS))

    def refresh(self) -> None:
        sync_figure(self.figures["latency"], self._latency_figure())
        sync_figure(self.figures["memory"], self._memory_figure())

    # -- actions --------------------------------------------------------------------------------
    def _measure_one(self, num_tokens: int) -> dict:
        c = self.controls
        backend, dtype = c["backend"].value, c["dtype"].value
        base = dict(backend=backend, num_experts=c["num_experts"].value, top_k=c["top_k"].value,
                    num_tokens=int(num_tokens), dtype=dtype, hidden_size=self.base_config.hidden_size,
                    intermediate_size=self.base_config.intermediate_size, median_ms=float("nan"))
        try:
            config = self.current_config()
            row = _as_row(self.measure_fn(config, int(num_tokens), backend, device=self.device,
                                          dtype=resolve_dtype(dtype), **self.measure_kwargs))
        except Exception as exc:  # measure() itself never raises; a bug or a custom measure_fn might
            row = {**base, "status": "error", "reason": first_line(exc)}
        for key, value in base.items():  # fill what a minimal measure_fn left out
            row.setdefault(key, value)
        row.setdefault("status", "ok")
        row.setdefault("reason", "")
        self.rows.append(row)
        return row

    def _describe(self, row: dict) -> tuple[str, str]:
        what = (f"{row['backend']}, E={row['num_experts']}, k={row['top_k']}, T={row['num_tokens']}, "
                f"{row['dtype']}" + (f" on {row['device']}" if row.get("device") else ""))
        status = str(row.get("status", "ok"))
        if status != "ok":
            reason = row.get("reason") or "(no reason given)"
            return status, f"{what}: {reason}"
        parts = [f"median {fmt_num(row.get('median_ms'))} ms"]
        if not is_missing(row.get("p10_ms")) and not is_missing(row.get("p90_ms")):
            parts[-1] += f" (p10 {fmt_num(row['p10_ms'])}, p90 {fmt_num(row['p90_ms'])})"
        if not is_missing(row.get("peak_bytes")):
            parts.append(f"peak {fmt_bytes(row['peak_bytes'])}"
                         + (f" (predicted {fmt_bytes(row['predicted_bytes'])})"
                            if not is_missing(row.get("predicted_bytes")) else ""))
        if row.get("grouped_mm_kernel"):
            parts.append(f"kernel {row['grouped_mm_kernel']}")
        if not is_missing(row.get("rel_err")):
            parts.append(f"rel. error {row['rel_err']:.1e}")
        return "ok", f"{what}: " + ", ".join(parts)

    def measure(self) -> dict:
        """Measure the current settings once, add the point to both plots, report in `status`."""
        self.status.value = status_html("busy", "measuring...")
        row = self._measure_one(self.controls["num_tokens"].value)
        self._show(row)
        return row

    def _show(self, row):
        try:
            self.refresh()
        except Exception as exc:  # a malformed row must not kill the widget
            self.status.value = status_html("error", f"could not plot: {first_line(exc)}")
            return
        self.status.value = status_html(*self._describe(row))

    def sweep_tokens(self) -> list[dict]:
        """Measure every token count of the tokens slider with the other settings as they are."""
        options = list(self.controls["num_tokens"].options)
        out = []
        for i, t in enumerate(options):
            self.status.value = status_html("busy", f"measuring T={t} ({i + 1}/{len(options)})")
            out.append(self._measure_one(t))
            self.refresh()
        bad = [r for r in out if r.get("status") != "ok"]
        self.status.value = status_html(
            "ok" if not bad else str(bad[0].get("status")),
            f"{len(out) - len(bad)}/{len(out)} token counts measured"
            + (f"; first not measured: T={bad[0]['num_tokens']}: {bad[0].get('reason', '')}" if bad else ""),
        )
        return out

    def clear(self) -> None:
        self.rows.clear()
        self.refresh()
        self.status.value = status_html("info", "cleared")


def backend_explorer(config=None, *, measure_fn=None, device=None, **kwargs) -> BackendExplorer:
    """Interactive timing of one experts backend: returns a `BackendExplorer` (an ipywidgets VBox).

    `config`: the layer to time (default: Mixtral scaled down to H=64 on CPU, H=1024 bf16 on CUDA);
    the sliders override its num_experts, top_k and dtype. `measure_fn`: defaults to
    `moe_lab.bench.measure` (same signature; must return one row dict). Each change measures once
    and adds a point to the latency and memory plots; a refused / failed measurement shows its
    reason in the status line and the widget keeps going. Other keyword arguments: `tokens`
    (token-count choices), `backends` (default: `moe_lab.runnable_backends(device, interpreted=False)`,
    every registered backend that runs compiled on the device: on a CPU all but triton, whose
    interpreter takes seconds a call), `dtypes`, `max_experts`, `measure_on_start`, `figure_width`
    (pixels, each of the two plots side by side), and any extra
    keyword is passed to `measure_fn` (e.g. `max_seconds=0.1`).
    """
    return BackendExplorer(config, measure_fn=measure_fn, device=device, **kwargs)
