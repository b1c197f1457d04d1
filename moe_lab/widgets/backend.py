"""Pick a backend, top_k, expert count, tokens and dtype; measure live; plot latency and memory.

Live numbers come from `moe_lab.bench.live`: one torch thread and interleaved rounds, so a burst
of other work on the machine lands on every backend alike, and a difference is read only when
every round agrees ("too noisy to compare on this machine right now" otherwise). The plots show
the current settings only, one line per backend; what was measured at other settings stays in
`dataframe()`.
"""
from __future__ import annotations

import contextlib
import html
import math

import ipywidgets as widgets
import torch

from .. import available_backends, choose_backend, default_device, resolve_dtype, runnable_backends, scale_down
from ..config import MoEConfig
from ..plots import latency_vs_tokens, memory_vs_tokens
from ..plots._common import fmt_bytes, fmt_num, is_missing
from ._common import POWERS_OF_TWO_TOKENS, first_line, new_figure_widget, status_html, sync_figure

DTYPES = ("float32", "bfloat16", "float16", "float64")
SETTINGS = ("num_experts", "top_k", "dtype")  # what the plots show one value of at a time
PLOT_COLUMNS = ("backend", "num_tokens", "status", "reason", "median_ms", "p10_ms", "p90_ms", "peak_bytes",
                "predicted_bytes", *SETTINGS)
TIMING_OPTIONS = ("warmup", "min_reps", "max_reps", "max_seconds")  # keywords that shape one timed visit


def _default_config(device) -> MoEConfig:
    if torch.device(device if device is not None else default_device()).type == "cuda":
        return scale_down("mixtral-8x7b", hidden_size=1024, dtype="bfloat16")
    return scale_down("mixtral-8x7b")  # H=64, E=8, top_k=2, float32: milliseconds on a laptop CPU


def _dtype_name(dtype) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def _as_row(result) -> dict:
    """A measure_fn returns a dict; accept a one-row DataFrame or a Series too."""
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
    backend, num_experts, top_k, num_tokens, dtype, auto, measure, sweep, compare, clear), `figures`
    ("latency", "memory": plotly FigureWidgets), `status` (HTML: the last outcome), `auto_line` (HTML:
    what `auto` runs at the current settings and why), `rows` (every measurement so far),
    `dataframe()`, `measure()`, `sweep_tokens()`, `compare_backends()`, `clear()`, and `hold()`, a
    context manager that changes several controls with one measurement at the end.
    """

    def __init__(self, config=None, *, measure_fn=None, compare_fn=None, device=None, tokens=None, backends=None,
                 dtypes=DTYPES, max_experts: int = 256, measure_on_start: bool = True, figure_width: int = 560,
                 rounds: int = 3, threads: int | None = 1, **measure_kwargs):
        self.device = torch.device(device) if device is not None else default_device()
        self.base_config = config if config is not None else _default_config(self.device)
        self._measure_fn, self._compare_fn = measure_fn, compare_fn
        self.rounds, self.threads = rounds, threads
        self.measure_kwargs = measure_kwargs
        self.rows: list[dict] = []
        self.verdicts: list[str] = []  # the last comparison, one line per token count
        self._suspend = False
        cfg = self.base_config
        # Default: what runs here compiled. triton's CPU interpreter is exact but takes seconds a call,
        # too slow for a widget that measures on every change; pass backends=[..., "triton"] to time it.
        backends = list(backends) if backends is not None else runnable_backends(self.device, interpreted=False)
        if not backends:
            raise ValueError(f"backends= is empty; give at least one name, e.g. from {available_backends()}")
        tokens = tuple(tokens) if tokens is not None else POWERS_OF_TWO_TOKENS[: 14 if self._is_cpu() else 17]
        dtypes = list(dict.fromkeys([_dtype_name(cfg.dtype), *dtypes]))
        start_tokens = min(tokens, key=lambda t: abs(math.log2(t) - math.log2(128)))
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        fit = widgets.Layout(width="auto")  # a button as wide as its label
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
            "measure": widgets.Button(description="measure", button_style="primary", icon="play", layout=fit),
            "sweep": widgets.Button(description="all token counts", tooltip="this backend at every token count",
                                    layout=fit),
            "compare": widgets.Button(description="compare backends", icon="balance-scale", layout=fit,
                                      tooltip="every backend at every token count, in interleaved rounds"),
            "clear": widgets.Button(description="clear", icon="trash", layout=fit),
        }
        self.status = widgets.HTML(status_html("info", "change a control (or press measure) to time the experts"))
        self.auto_line = widgets.HTML("")
        self.figures = {
            "latency": new_figure_widget(self._latency_figure(), height=460, width=figure_width),
            "memory": new_figure_widget(self._memory_figure(), height=460, width=figure_width),
        }
        c = self.controls
        c["num_experts"].observe(self._on_experts, names="value")
        for name in ("backend", "top_k", "num_tokens", "dtype"):
            c[name].observe(self._on_change, names="value")
        c["measure"].on_click(lambda _: self.measure())
        c["sweep"].on_click(lambda _: self.sweep_tokens())
        c["compare"].on_click(lambda _: self.compare_backends())
        c["clear"].on_click(lambda _: self.clear())
        shape = widgets.HTML(f"<small>H={cfg.hidden_size}, I={cfg.intermediate_size}, "
                             f"activation={cfg.activation}; device={self.device}</small>")
        plots = widgets.HBox([self.figures["latency"], self.figures["memory"]],
                             layout=widgets.Layout(flex_flow="row wrap"))  # one under the other when narrow
        super().__init__([
            widgets.HBox([c["backend"], c["dtype"], shape]),
            widgets.HBox([c["num_experts"], c["top_k"], c["num_tokens"]]),
            widgets.HBox([c["auto"], c["measure"], c["sweep"], c["compare"], c["clear"]]),
            self.status,
            self.auto_line,
            plots,
        ])
        self._update_auto_line()
        if measure_on_start:
            self.measure()

    # -- plumbing -------------------------------------------------------------------------------
    def _is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def _threads_text(self) -> str:
        if self.threads is None:
            return f"torch's {torch.get_num_threads()} threads"
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}"

    def _timing(self) -> dict:
        return {k: v for k, v in self.measure_kwargs.items() if k in TIMING_OPTIONS}

    def _live(self, config, tokens, backends, dtype):
        """bench.live's interleaved rounds on `threads` threads, memory measured in the first round."""
        from ..bench.live import measure_live  # lazy: the bench pulls in pandas

        return measure_live(config, list(tokens), list(backends), dtypes=[dtype], device=self.device,
                            rounds=self.rounds, threads=self.threads, measure_memory=True, timing=self._timing())

    def _measure_point(self, config, num_tokens, backend, *, device=None, dtype=None, **_):
        return _as_row(self._live(config, [num_tokens], [backend], dtype))

    @property
    def measure_fn(self):
        return self._measure_fn or self._measure_point

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
        self._update_auto_line()
        if not self._suspend and self.controls["auto"].value:
            self.measure()

    @contextlib.contextmanager
    def hold(self, measure: bool = True):
        """Change several controls inside the block without measuring each change; measure once at the
        end (unless measure=False). "measure on every change" is left as it was."""
        suspended, self._suspend = self._suspend, True
        try:
            yield self
        finally:
            self._suspend = suspended
            self._update_auto_line()
        if measure:
            self.measure()

    def current_config(self) -> MoEConfig:
        c = self.controls
        return self.base_config.replace(num_experts=c["num_experts"].value, top_k=c["top_k"].value,
                                        dtype=c["dtype"].value)

    def settings(self) -> dict:
        """The settings the plots show: num_experts, top_k, dtype."""
        c = self.controls
        return {"num_experts": c["num_experts"].value, "top_k": c["top_k"].value, "dtype": c["dtype"].value}

    def dataframe(self):
        """Every measurement so far (all settings), one row each, oldest first."""
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        for col in PLOT_COLUMNS:  # a minimal or failing measure_fn may leave some out
            if col not in frame.columns:
                frame[col] = "" if col in ("status", "reason") else float("nan")
        return frame

    def shown(self):
        """The rows the plots draw: the current settings, the latest measurement per (backend, T)."""
        frame = self.dataframe()
        if not len(frame):
            return frame
        mask = True
        for name, value in self.settings().items():
            mask = mask & (frame[name].astype(str) == str(value))
        return frame[mask].drop_duplicates(subset=["backend", "num_tokens"], keep="last")

    def _subtitle(self, shown) -> str:
        s, cfg = self.settings(), self.base_config
        how = (f"{self.rounds} interleaved round{'s' if self.rounds != 1 else ''}, {self._threads_text()}"
               if self._measure_fn is None else "custom measure_fn")
        hidden = len(self.rows) - len(shown)
        return (f"E={s['num_experts']}, k={s['top_k']}, {s['dtype']}, H={cfg.hidden_size}, I={cfg.intermediate_size}, "
                f"{self.device}</sup><br><sup>{how}; bars p10–p90"
                + (f"; {hidden} earlier point(s) not shown" if hidden else ""))

    def _latency_figure(self):
        import pandas as pd

        shown = self.shown() if self.rows else pd.DataFrame(columns=list(PLOT_COLUMNS))
        title = "Latency vs tokens (lower is better)" + ("" if self.rows else ", nothing measured yet")
        fig = latency_vs_tokens(shown, label_fields=[], title=f"{title}<br><sup>{self._subtitle(shown)}</sup>")
        return fig.update_layout(margin=dict(t=110))  # room for the two lines under the title

    def _memory_figure(self):
        import pandas as pd

        shown = self.shown() if self.rows else pd.DataFrame(columns=list(PLOT_COLUMNS))
        title = "Peak memory vs tokens (dots measured, dashed predicted)"
        fig = memory_vs_tokens(shown, label_fields=[], title=f"{title}<br><sup>{self._subtitle(shown)}</sup>")
        return fig.update_layout(margin=dict(t=110))

    def refresh(self) -> None:
        sync_figure(self.figures["latency"], self._latency_figure())
        sync_figure(self.figures["memory"], self._memory_figure())

    def _update_auto_line(self) -> None:
        """What `auto` runs at the current settings, and why (its rule, or the calibration it read)."""
        try:
            config = self.current_config()
            backend, why = choose_backend(self.controls["num_tokens"].value, self.device, config.dtype, config)
            text = f"<b>auto</b> at these settings runs <code>{html.escape(backend)}</code>: {html.escape(why)}"
        except Exception as exc:  # a corrupt calibration file says so here, the widget keeps working
            text = f"<b>auto</b> cannot choose here: {html.escape(first_line(exc))}"
        self.auto_line.value = f'<div style="font-family: monospace; font-size: small">{text}</div>'

    # -- actions --------------------------------------------------------------------------------
    def _measure_one(self, num_tokens: int, backend: str | None = None) -> dict:
        c = self.controls
        backend, dtype = backend or c["backend"].value, c["dtype"].value
        base = dict(backend=backend, num_experts=c["num_experts"].value, top_k=c["top_k"].value,
                    num_tokens=int(num_tokens), dtype=dtype, hidden_size=self.base_config.hidden_size,
                    intermediate_size=self.base_config.intermediate_size, median_ms=float("nan"))
        try:
            config = self.current_config()
            extra = {} if self._measure_fn is None else self.measure_kwargs
            row = _as_row(self.measure_fn(config, int(num_tokens), backend, device=self.device,
                                          dtype=resolve_dtype(dtype), **extra))
        except Exception as exc:  # measure() itself never raises; a bug or a custom measure_fn might
            row = {**base, "status": "error", "reason": first_line(exc)}
        self._append(row, base)
        return row

    def _append(self, row: dict, base: dict) -> None:
        for key, value in base.items():  # fill what a minimal measure_fn left out
            row.setdefault(key, value)
        row.setdefault("status", "ok")
        row.setdefault("reason", "")
        row["dtype"] = _dtype_name(row["dtype"]) if row["dtype"] else base["dtype"]
        self.rows.append(row)

    def _describe(self, row: dict) -> tuple[str, str]:
        what = (f"{row['backend']}, E={row['num_experts']}, k={row['top_k']}, T={row['num_tokens']}, "
                f"{row['dtype']}" + (f" on {row['device']}" if row.get("device") else ""))
        if row["backend"] == "auto":
            picked, _ = choose_backend(int(row["num_tokens"]), self.device, row["dtype"], self.current_config())
            what += f" (auto ran {picked})"
        status = str(row.get("status", "ok"))
        if status != "ok":
            reason = row.get("reason") or "(no reason given)"
            return status, f"{what}: {reason}"
        parts = [f"median {fmt_num(row.get('median_ms'))} ms"]
        if not is_missing(row.get("p10_ms")) and not is_missing(row.get("p90_ms")):
            parts[-1] += f" (p10 {fmt_num(row['p10_ms'])}, p90 {fmt_num(row['p90_ms'])})"
        rounds = row.get("rounds")
        if not is_missing(rounds) and rounds and int(rounds) > 1:
            parts[-1] += f", {int(rounds)} rounds"
        if not is_missing(row.get("peak_bytes")):
            parts.append(f"peak {fmt_bytes(row['peak_bytes'])}"
                         + (f" (predicted {fmt_bytes(row['predicted_bytes'])})"
                            if not is_missing(row.get("predicted_bytes")) else ""))
        if row.get("grouped_mm_kernel"):
            parts.append(f"kernel {row['grouped_mm_kernel']}")
        if not is_missing(row.get("rel_err")):
            parts.append(f"rel. error {row['rel_err']:.1e}")
        text = f"{what}: " + ", ".join(parts)
        if bool(row.get("noisy", False)):
            from ..bench.live import TOO_NOISY

            text += f". Its rounds disagree by {row['round_spread']:.0%}: {TOO_NOISY}"
        return "ok", text

    def measure(self) -> dict:
        """Measure the current settings once, add the point to both plots, report in `status`."""
        self.status.value = status_html("busy", "measuring...")
        row = self._measure_one(self.controls["num_tokens"].value)
        self._show(status_html(*self._describe(row)))
        return row

    def _show(self, status: str) -> None:
        try:
            self.refresh()
        except Exception as exc:  # a malformed row must not kill the widget
            self.status.value = status_html("error", f"could not plot: {first_line(exc)}")
            return
        self.status.value = status

    def sweep_tokens(self) -> list[dict]:
        """Measure the current backend at every token count of the tokens slider."""
        options = list(self.controls["num_tokens"].options)
        out = []
        for i, t in enumerate(options):
            self.status.value = status_html("busy", f"measuring T={t} ({i + 1}/{len(options)})")
            out.append(self._measure_one(t))
            self.refresh()
        bad = [r for r in out if r.get("status") != "ok"]
        self._show(status_html(
            "ok" if not bad else str(bad[0].get("status")),
            f"{self.controls['backend'].value}: {len(out) - len(bad)}/{len(out)} token counts measured"
            + (f"; first not measured: T={bad[0]['num_tokens']}: {bad[0].get('reason', '')}" if bad else ""),
        ))
        return out

    def compare_backends(self, backends=None, tokens=None):
        """Every backend (default: the dropdown's, but auto, which runs one of them) at every token count
        (default: the slider's), at the current settings, in interleaved rounds; the plots get one line
        per backend and `status` says, per T, which backend was fastest and whether every round agreed.
        Returns the rows as a DataFrame."""
        from ..bench.live import TOO_NOISY, compare

        backends = list(backends or [b for b in self.controls["backend"].options if b != "auto"])
        tokens = [int(t) for t in (tokens or self.controls["num_tokens"].options)]
        self.status.value = status_html("busy", f"comparing {', '.join(backends)} at T={tokens}: "
                                                f"{self.rounds} interleaved rounds...")
        base = dict(num_experts=self.controls["num_experts"].value, top_k=self.controls["top_k"].value,
                    dtype=self.controls["dtype"].value)
        try:
            if self._compare_fn is not None:
                frame = self._compare_fn(self.current_config(), tokens, backends, device=self.device,
                                         dtype=resolve_dtype(base["dtype"]))
            elif self._measure_fn is None:
                frame = self._live(self.current_config(), tokens, backends, resolve_dtype(base["dtype"]))
            else:  # a custom measure_fn: one call per point, no rounds (nothing to read a verdict from)
                for t in tokens:
                    for b in backends:
                        self._measure_one(t, b)
                frame = self.dataframe().tail(len(tokens) * len(backends))
        except Exception as exc:
            self._show(status_html("error", f"comparison failed: {first_line(exc)}"))
            return None
        if self._measure_fn is None or self._compare_fn is not None:
            for row in frame.to_dict("records"):
                self._append(row, {**base, "backend": row.get("backend"), "num_tokens": row.get("num_tokens"),
                                   "median_ms": float("nan")})
        self.verdicts = [self._verdict(frame, t, compare, TOO_NOISY) for t in tokens]
        noisy = sum(TOO_NOISY in v for v in self.verdicts)
        head = (f"compared {', '.join(backends)} at E={base['num_experts']}, k={base['top_k']}, {base['dtype']}"
                + (f", {self.rounds} interleaved rounds on {self._threads_text()}" if "rounds" in frame else "")
                + (f"; {noisy} of {len(tokens)} token counts {TOO_NOISY}" if noisy else ""))
        self._show(status_html("ok", head + "\n" + "\n".join(self.verdicts)))
        return frame

    @staticmethod
    def _verdict(frame, num_tokens, compare, too_noisy) -> str:
        """"T=64: grouped_mm fastest, 0.52x batched_mm's time in every round" (or a tie, or too noisy)."""
        here = frame[(frame["num_tokens"] == num_tokens) & (frame["status"] == "ok")].sort_values("median_ms")
        if len(here) == 0:
            return f"T={num_tokens}: nothing ran"
        first = here.iloc[0]
        if len(here) == 1:
            return f"T={num_tokens}: only {first['backend']} ran ({fmt_num(first['median_ms'])} ms)"
        second = here.iloc[1]
        if "round_medians_ms" not in frame:
            return (f"T={num_tokens}: {first['backend']} fastest ({fmt_num(first['median_ms'])} ms), then "
                    f"{second['backend']} ({fmt_num(second['median_ms'])} ms); one pass, no rounds to check")
        result = compare(frame, {"backend": first["backend"], "num_tokens": num_tokens},
                         {"backend": second["backend"], "num_tokens": num_tokens})
        ratios = f"rounds {min(result.round_ratios):.2f}–{max(result.round_ratios):.2f}x" if result.round_ratios else ""
        if result.verdict == "faster":
            return (f"T={num_tokens}: {first['backend']} fastest, {result.ratio:.2f}x {second['backend']}'s time "
                    f"({ratios}, every round agrees)")
        if result.verdict == "same":
            return f"T={num_tokens}: {first['backend']} and {second['backend']} tie ({ratios})"
        return f"T={num_tokens}: {first['backend']} vs {second['backend']}: {too_noisy} ({ratios})"

    def clear(self) -> None:
        self.rows.clear()
        self.verdicts = []
        self.refresh()
        self.status.value = status_html("info", "cleared")


def backend_explorer(config=None, *, measure_fn=None, device=None, **kwargs) -> BackendExplorer:
    """Interactive timing of experts backends: returns a `BackendExplorer` (an ipywidgets VBox).

    `config`: the layer to time (default: Mixtral scaled down to H=64 on CPU, H=1024 bf16 on CUDA);
    the sliders override its num_experts, top_k and dtype. Each change measures the chosen backend
    once (`moe_lab.bench.live`: `rounds` rounds on `threads` torch threads, default 3 and 1) and the
    plots show the current settings, one line per backend; **compare backends**
    (`compare_backends()`) times every backend at every token count in interleaved rounds and says
    per T which was fastest, or that the machine is too noisy to tell. The line under the status
    says what `auto` runs at these settings and why. A refused / failed measurement shows its
    reason and the widget keeps going.
    Other keyword arguments: `tokens` (token-count choices), `backends` (default:
    `moe_lab.runnable_backends(device, interpreted=False)`: on a CPU all but triton, whose
    interpreter takes seconds a call), `dtypes`, `max_experts`, `measure_on_start`, `figure_width`
    (pixels, each plot), `rounds`, `threads`, `measure_fn` (same signature as `moe_lab.bench.measure`,
    returning one row dict; no rounds then), `compare_fn(config, tokens, backends, device=, dtype=)`
    (a DataFrame), and timing keywords for each visit (`max_seconds`, `warmup`, `min_reps`, `max_reps`).
    """
    return BackendExplorer(config, measure_fn=measure_fn, device=device, **kwargs)
