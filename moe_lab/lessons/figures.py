"""Figures quoted in prose, computed from the recorded data — and a checker for the prose that quotes them.

A lesson's sentence that quotes a measurement must not go stale when the GPU tables are
re-recorded. Two ways keep it right:

1. **Generate the sentence** from the data (`figure_text(...)` inside an f-string rendered with
   `IPython.display.Markdown`, in a `# NBVAL_CHECK_OUTPUT` cell) — needed when the words depend on the
   data too ("grows", "falls").
2. **Cite the figure** in a markdown cell: put an HTML comment right after the number, naming a
   figure of this registry. Jupyter does not render the comment; the test reads it:

       eager was 1.0 to 3.7 times slower<!-- data: ratio numerator=eager denominator=grouped_mm tokens=1 -->
       best path at 54–91 %<!-- data: best_roofline tokens=1 --> of the roofline

   `check_markdown(text)` recomputes every cited figure and compares it with the quoted number at the
   quoted precision ("1.2" must be within 0.05, "22" within 0.5); a range "a–b" (or "a-b", "a to b")
   must match (min, max). A figure in a unit of measurement (ms, µs, ×, %, TFLOP/s, GB/s, TB/s, s)
   with no comment after it is reported too, so a hand-typed number cannot hide. A number that is
   not a measurement (arithmetic on a preset's shape, a budget) says so: `<!-- not data: why -->`.

Arguments in a citation are `key=value` words; a value with commas is a list; `presets` also takes
"fine-grained", "coarse" (the presets of each recorded file) or "all".
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Callable

from ..recorded_tables import RECORDED, data_dir, load_recorded, recorded_label


@dataclass(frozen=True)
class Figure:
    """One number (values has one entry) or a range (low, high), in `unit`: "x" (a ratio), "ms",
    "fraction" (quoted as a fraction or as %), "TFLOP/s", "TB/s", "s" or "count"; `source` names the data."""

    values: tuple
    unit: str
    source: str

    @property
    def is_range(self) -> bool:
        return len(self.values) == 2


FIGURES: dict[str, Callable[..., Figure]] = {}


def _figure(function):
    FIGURES[function.__name__] = function
    return function


# ----------------------------------------------------------------------------- the data


@functools.lru_cache(maxsize=None)
def _table(kind: str, execution: str | None = "eager"):
    frame, provenance = load_recorded(kind, execution=execution)
    return frame, recorded_label(provenance)


@functools.lru_cache(maxsize=None)
def _best():
    from ..bench import best_paths

    frame, label = _table("presets", None)
    return best_paths(frame), label


@functools.lru_cache(maxsize=None)
def preset_groups() -> dict[str, list[str]]:
    """{"fine-grained": [...], "coarse": [...], "all": [...]}: the presets of each recorded file."""
    from ..bench import load_results

    groups = {}
    for name in RECORDED["presets"]:
        frame, _ = load_results(data_dir() / name)
        group = {"finegrained": "fine-grained"}.get(name.rsplit("_", 1)[-1], name.rsplit("_", 1)[-1])
        groups[group] = list(dict.fromkeys(frame["preset"]))
    groups["all"] = [p for group in list(groups.values()) for p in group]
    return groups


def _presets(presets) -> list[str]:
    if presets is None:
        presets = "all"
    if isinstance(presets, str):
        groups = preset_groups()
        return groups[presets] if presets in groups else [presets]
    return list(presets)


def _tokens_filter(frame, tokens=None, min_tokens=None):
    if tokens is not None:
        frame = frame[frame["num_tokens"].isin(_as_list(tokens))]
    if min_tokens is not None:
        frame = frame[frame["num_tokens"] >= int(min_tokens)]
    return frame


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _span(values, unit, source) -> Figure:
    values = [float(v) for v in values if v == v]
    if not values:
        raise ValueError("no recorded rows match this figure's arguments")
    low, high = min(values), max(values)
    return Figure((low,) if low == high else (low, high), unit, source)


# ----------------------------------------------------------------------------- the figures


@_figure
def measured(backend: str, preset: str, num_tokens: int, column: str = "median_ms", execution: str = "eager") -> Figure:
    """One recorded value (median_ms by default) of one backend at one point."""
    frame, label = _table("presets", execution)
    rows = frame[(frame["backend"] == backend) & (frame["preset"] == preset) & (frame["num_tokens"] == int(num_tokens))]
    unit = {"median_ms": "ms", "fraction_of_roofline": "fraction", "tflops": "TFLOP/s",
            "speedup_vs_transformers": "x"}.get(column, "count")
    return _span(rows[column], unit, label)


@_figure
def ratio(numerator: str, denominator: str, presets="all", tokens=None, min_tokens=None,
          execution: str = "eager") -> Figure:
    """Range over points of numerator's median / denominator's (how many times slower numerator was)."""
    frame, label = _table("presets", execution)
    frame = _tokens_filter(frame[frame["preset"].isin(_presets(presets)) & (frame["status"] == "ok")], tokens,
                           min_tokens)
    times = frame.pivot_table(index=["preset", "num_tokens"], columns="backend", values="median_ms")
    return _span(times[numerator] / times[denominator], "x", label)


@_figure
def per_expert_ms(presets="all", tokens=None, min_tokens=None, backend: str = "eager") -> Figure:
    """Range of median_ms / experts_hit: the time per expert hit."""
    frame, label = _table("presets")
    frame = _tokens_filter(frame[(frame["backend"] == backend) & frame["preset"].isin(_presets(presets))
                                 & (frame["status"] == "ok")], tokens, min_tokens)
    return _span(frame["median_ms"] / frame["experts_hit"], "ms", label)


@_figure
def change(backend: str, preset: str, start: int, end: int) -> Figure:
    """median_ms at `end` tokens / at `start` tokens (1.6 means 60 % more time)."""
    return Figure((measured(backend, preset, end).values[0] / measured(backend, preset, start).values[0],),
                  "x", _table("presets")[1])


def _best_rows(presets, tokens, min_tokens):
    best, label = _best()
    return _tokens_filter(best[best["preset"].isin(_presets(presets))], tokens, min_tokens), label


@_figure
def best_speedup(presets="all", tokens=None, min_tokens=None) -> Figure:
    """Range of transformers' best path / moe_lab's best path (launched or graph-replayed)."""
    rows, label = _best_rows(presets, tokens, min_tokens)
    return _span(rows["speedup"], "x", label)


@_figure
def best_roofline(presets="all", tokens=None, min_tokens=None) -> Figure:
    """Range of the fraction of the roofline reached by moe_lab's best path."""
    rows, label = _best_rows(presets, tokens, min_tokens)
    return _span(rows["moe_lab_roofline"], "fraction", label)


@_figure
def best_tflops(presets="all", tokens=None, min_tokens=None) -> Figure:
    """Range of TFLOP/s reached by moe_lab's best path."""
    rows, label = _best_rows(presets, tokens, min_tokens)
    return _span(rows["moe_lab_tflops"], "TFLOP/s", label)


@_figure
def vs_transformers(backend: str, execution: str = "eager", presets="all", tokens=None, min_tokens=None) -> Figure:
    """Range of speedup_vs_transformers (transformers' median / moe_lab's, same backend name)."""
    frame, label = _table("presets", execution)
    frame = _tokens_filter(frame[(frame["backend"] == backend) & frame["preset"].isin(_presets(presets))],
                           tokens, min_tokens)
    return _span(frame["speedup_vs_transformers"].dropna(), "x", label)


@_figure
def points(backend: str, execution: str = "eager", above: float | None = None, below: float | None = None) -> Figure:
    """How many recorded points have a speedup_vs_transformers (above / below a bound when given)."""
    frame, label = _table("presets", execution)
    values = frame.loc[frame["backend"] == backend, "speedup_vs_transformers"].dropna()
    if above is not None:
        values = values[values > float(above)]
    if below is not None:
        values = values[values < float(below)]
    return Figure((float(len(values)),), "count", label)


@_figure
def copy_bandwidth() -> Figure:
    """The card's measured copy bandwidth (the memory roof), range over the recorded files, in TB/s."""
    frame, label = _table("presets")
    return _span(frame["ceiling_copy_GBps"].dropna() / 1e3, "TB/s", label)


@_figure
def compile_speedup(backend: str, mode: str | None = None, num_tokens: int | None = None) -> Figure:
    """Compiled vs uncompiled (uncompiled_ms / compiled_ms) in the recorded compile matrix; a range
    over modes and token counts not given."""
    frame, label = _table("compile", None)
    rows = frame[(frame["backend"] == backend) & (frame["status"] == "compiled")]
    if mode is not None:
        rows = rows[rows["mode"] == mode]
    if num_tokens is not None:
        rows = rows[rows["num_tokens"] == int(num_tokens)]
    return _span(rows["speedup"], "x", label)


@_figure
def compile_vs_transformers(backend: str = "grouped_mm", mode: str | None = None) -> Figure:
    """Range of transformers' compiled time / moe_lab's, same backend name and mode."""
    frame, label = _table("compile", None)
    rows = frame[frame["backend"] == backend]
    if mode is not None:
        rows = rows[rows["mode"] == mode]
    return _span(rows["speedup_vs_transformers"].dropna(), "x", label)


@_figure
def live_setting(name: str) -> Figure:
    """A setting of moe_lab.bench.live that prose describes: "margin" (a difference must exceed it in
    every round), "noisy" (round spread that flags a point), "rounds" (rounds per point)."""
    from ..bench import live

    values = {"margin": (live.DEFAULT_MARGIN, "fraction"), "noisy": (live.NOISY_ROUND_SPREAD, "fraction"),
              "rounds": (live.DEFAULT_ROUNDS, "count")}
    value, unit = values[name]
    return Figure((float(value),), unit, "moe_lab.bench.live")


RUN_TIMES = "cpu_notebook_run_times.json"


@_figure
def run_seconds(notebook: str) -> Figure:
    """Seconds `moe-lab run` took on a notebook with its default parameters (data/cpu_notebook_run_times.json)."""
    record = json.loads((data_dir() / RUN_TIMES).read_text())
    seconds = record["seconds"][notebook]
    return Figure((float(seconds),), "s", record["provenance"].get("device_name", "a CPU"))


def figure(name: str, /, **arguments) -> Figure:
    """The named figure computed from the data, e.g. figure("best_speedup", tokens=1)."""
    if name not in FIGURES:
        raise KeyError(f"no figure {name!r}; figures: {sorted(FIGURES)}")
    return FIGURES[name](**arguments)


# ----------------------------------------------------------------------------- writing figures


def format_number(value: float, digits: int = 2) -> str:
    """`digits` significant digits, but never fewer decimals than needed to tell 1.04 from 1.0."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"


def figure_text(name: str, /, *, digits: int = 2, **arguments) -> str:
    """The figure as prose: "1.1–3.1×", "54–91 %", "12.4 ms", "463–508 TFLOP/s"."""
    fig = figure(name, **arguments)
    if fig.unit == "fraction":
        numbers = [format_number(100 * v, digits) for v in fig.values]
        unit = " %"
    else:
        numbers = [format_number(v, digits) if fig.unit != "count" else str(int(v)) for v in fig.values]
        unit = {"x": "×", "ms": " ms", "TFLOP/s": " TFLOP/s", "TB/s": " TB/s", "s": " s", "count": ""}[fig.unit]
    return "–".join(dict.fromkeys(numbers)) + unit  # a range whose ends round alike is one number


# ----------------------------------------------------------------------------- checking prose

NUMBER = r"\d+(?:\.\d+)?"
#: A figure in a unit of measurement: these are what a hand-typed stale number looks like.
MEASURED = re.compile(
    rf"(?<![\w.\-/=])(?P<low>{NUMBER})(?:\s*(?:–|-|to)\s*(?P<high>{NUMBER}))?"
    r"(?P<unit>\s?(?:ms|µs|us|TFLOP/s|GB/s|TB/s|%|s|seconds|percent)\b|\s?%|[×x](?![\w\d])|\s+times\b)"
)
CITATION = re.compile(r"\s*<!--\s*(?P<kind>data|not data)\s*:\s*(?P<body>.*?)-->", re.S)
CITED = re.compile(
    rf"(?P<low>{NUMBER})(?:\s*(?:–|-|to)\s*(?P<high>{NUMBER}))?"
    r"(?P<unit>\s?(?:ms|µs|us|TFLOP/s|GB/s|TB/s|%|s|seconds|percent|times)|[×x])?\s*$"
)


def _blank_code(text: str) -> str:
    """The text with fenced blocks and inline code replaced by spaces (same length: offsets stay)."""
    def blank(match):
        return re.sub(r"[^\n]", " ", match.group(0))
    text = re.sub(r"```.*?```", blank, text, flags=re.S)
    return re.sub(r"`[^`\n]*`", blank, text)


def parse_arguments(body: str) -> tuple[str, dict]:
    """"ratio numerator=eager tokens=1,16" -> ("ratio", {"numerator": "eager", "tokens": [1, 16]})."""
    words = body.split()
    if not words:
        raise ValueError("an empty citation: <!-- data: name key=value ... -->")
    arguments = {}
    for word in words[1:]:
        if "=" not in word:
            raise ValueError(f"argument {word!r} is not key=value")
        key, value = word.split("=", 1)
        parts = [_scalar(part) for part in value.split(",")]
        arguments[key] = parts if "," in value else parts[0]
    return words[0], arguments


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(text, text)


def _quoted_unit(unit: str | None) -> str:
    unit = (unit or "").strip()
    return {"×": "x", "x": "x", "times": "x", "percent": "%", "µs": "us", "seconds": "s"}.get(unit, unit)


def _agrees(quoted: str, value: float) -> bool:
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(float(quoted) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9)


def _expected_values(fig: Figure, unit: str) -> list[float] | None:
    """The figure's values in the quoted unit, or None when the units do not go together."""
    values = list(fig.values)
    if fig.unit == "fraction":
        return [100 * v for v in values] if unit == "%" else values if unit == "" else None
    if fig.unit == "ms" and unit == "us":
        return [1e3 * v for v in values]
    allowed = {"x": {"x"}, "ms": {"ms"}, "TFLOP/s": {"TFLOP/s"}, "TB/s": {"TB/s"}, "s": {"s"}, "count": {""}}
    return values if unit in allowed[fig.unit] else None


def check_citation(quoted: str, body: str) -> str | None:
    """None when the figure quoted just before a citation agrees with the data, else what is wrong."""
    match = CITED.search(quoted)
    if match is None:
        return f"no number right before <!-- data: {body.strip()} -->"
    try:
        name, arguments = parse_arguments(body)
        fig = figure(name, **arguments)
    except (KeyError, TypeError, ValueError) as error:
        return f"<!-- data: {body.strip()} --> cannot be computed: {error}"
    unit = _quoted_unit(match["unit"])
    expected = _expected_values(fig, unit)
    if expected is None:
        return f"{match.group(0).strip()!r} is quoted in {unit or 'no unit'} but {name} is in {fig.unit}"
    numbers = [match["low"]] + ([match["high"]] if match["high"] else [])
    if len(numbers) != len(expected):
        if len(numbers) == 2 and len(expected) == 1:
            expected = expected * 2
        elif len(numbers) == 1 and all(_agrees(numbers[0], v) for v in expected):
            return None  # a range whose ends both round to the one number quoted
        else:
            return (f"{match.group(0).strip()!r} quotes {'a range' if len(numbers) == 2 else 'one number'} but "
                    f"{name} is {'a range' if fig.is_range else 'one number'}: {_show(expected)}")
    if not all(_agrees(q, v) for q, v in zip(numbers, expected)):
        return f"{match.group(0).strip()!r} disagrees with the data: {name} is {_show(expected)} {unit} ({fig.source})"
    return None


def _show(values) -> str:
    return "–".join(f"{v:.4g}" for v in values)


def check_markdown(text: str) -> list[str]:
    """Every problem with the figures of one markdown text: a cited figure that disagrees with the
    data (or cannot be computed), and a measured-looking figure with no citation after it."""
    text = _blank_code(text)
    problems, covered = [], []
    for citation in CITATION.finditer(text):
        covered.append(citation.start())
        if citation["kind"] == "data":
            problem = check_citation(text[max(0, citation.start() - 60):citation.start()], citation["body"])
            if problem:
                problems.append(problem)
    for match in MEASURED.finditer(text):
        follows = CITATION.match(text, match.end())
        if follows is None:
            line = text[:match.start()].count("\n") + 1
            context = text[max(0, match.start() - 30):match.end() + 10].replace("\n", " ")
            problems.append(f"line {line}: {match.group(0).strip()!r} looks measured but cites no data "
                            f"(…{context}…): add <!-- data: figure ... --> or <!-- not data: why -->")
    return problems


class Prose(str):
    """Markdown text generated from data: rendered as markdown in Jupyter, and the same text as its
    plain repr, so a `# NBVAL_CHECK_OUTPUT` cell compares the words themselves."""

    def _repr_markdown_(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return str(self)
