"""Live timings a learner can believe: one thread, interleaved rounds, the spread, and a verdict.

A notebook that times backends on the reader's machine competes with whatever else runs there.
On a loaded 2-core machine, two torch threads fighting other processes for two cores gave medians
of up to 945 ms for calls that take 1-30 ms alone, and whichever point ran during a burst looked
slow: eager "got faster" as more experts were hit. Three things make a live number readable:

- **one thread** (`threads=1`): a tiny matmul gains nothing from a second thread, and one thread
  cannot be starved half-way through a parallel region by another process;
- **interleaved rounds** over the whole grid: round 0 visits every point in order, round 1 in
  reverse, ... (`bench.rounds.round_order`), each visit a full `measure` with its own warm-up, so a
  burst of load lands on every point alike instead of on whichever ran at that moment;
- **the spread, and a verdict**: each row keeps p10/p90 of all repetitions and every round's
  median; `compare` reads a difference only when every round agrees on it, and otherwise says
  "too noisy to compare on this machine right now".

    frame = measure_live(config, [1, 16], ["eager", "grouped_mm"], num_experts=[8, 32])
    spread_table(frame, index=["num_experts", "num_tokens"])      # "1.23 (1.19–1.31)" per cell
    claim = check_claim(frame, "eager's time grew with the experts hit",
                        {"backend": "eager", "num_experts": 32, "num_tokens": 16},
                        {"backend": "eager", "num_experts": 8, "num_tokens": 16}, expect="slower")
    claim.holds    # True, False, or None when the rounds disagree; str(claim) is the sentence

A selector is a dict of column -> value that picks exactly one row; `Ratio(a, b)` compares a
speed-up instead of a time (per round: a's median / b's median).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .columns import ROW_COLUMNS, to_frame
from .measure import measure_with_layer, set_time_columns
from .rounds import merge_rounds, parse_round_medians, round_order
from .sweep import ROUTING_FIELDS, _as_list, _grid, _layers, _unsupported_row, normalize_configs
from .timing import resolve_device

#: Rounds per point: with 5 rounds, a difference that is really a tie shows the same sign in every
#: round with probability 2 / 2**5 = 1 in 16, before the margin makes that rarer still.
DEFAULT_ROUNDS = 5
#: Fewer rounds than this give no verdict at all.
MIN_ROUNDS_FOR_VERDICT = 3
#: Two times within this factor (1.15 means 15 %) are "the same"; a difference must exceed it in
#: every round to count.
DEFAULT_MARGIN = 0.15
#: A point whose slowest round median is more than this fraction above its fastest is flagged noisy.
NOISY_ROUND_SPREAD = 0.5
#: Timing options of each visit: short, since every point is visited `rounds` times.
LIVE_TIMING = dict(warmup=2, min_reps=5, max_reps=50, max_seconds=0.02)

VERDICTS = ("slower", "faster", "same", "too noisy", "not measured")
TOO_NOISY = "too noisy to compare on this machine right now"


@contextlib.contextmanager
def single_threaded(threads: int | None = 1):
    """torch.set_num_threads(threads) inside the block, the previous count restored after.
    None leaves the thread count alone."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_live(configs, tokens, backends=None, dtypes=None, *, device=None, rounds: int = DEFAULT_ROUNDS,
                 threads: int | None = 1, seed: int = 0, measure_memory: bool = False, ceilings=None,
                 timing: dict | None = None, **field_grid):
    """Time every grid point `rounds` times in interleaved order, with `threads` torch threads.

    The grid is `bench.sweep`'s: configs (a MoEConfig, a preset name, a dict or a list) x
    field_grid (MoEConfig fields such as num_experts=[8, 32], and distribution / skew) x dtypes x
    tokens x backends. `timing` overrides `LIVE_TIMING` (warmup, min_reps, max_reps, max_seconds:
    per visit). Returns `sweep`'s table — median_ms, p10_ms and p90_ms pooled over the rounds,
    `round_medians_ms` one median per round — plus `round_spread` (slowest round / fastest - 1)
    and `noisy` (round_spread > NOISY_ROUND_SPREAD). A refused or failed point is measured once:
    its row says why. Bad arguments raise before anything runs.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    timing_options = {**LIVE_TIMING, **(timing or {})}
    unknown = set(timing_options) - set(LIVE_TIMING)
    if unknown:
        raise ValueError(f"unknown timing options {sorted(unknown)}; allowed: {sorted(LIVE_TIMING)}")
    device = resolve_device(device)
    points = _points(normalize_configs(configs), _grid(field_grid), dtypes, tokens, backends, device)
    runs: list[list[dict]] = [[] for _ in points]
    layers: dict = {}  # one layer per (config, dtype), reused by every token count, backend and round
    with single_threaded(threads):
        for round_index in range(rounds):
            for number in round_order(range(len(points)), round_index):
                done = runs[number]
                if done and done[0]["status"] != "ok":
                    continue  # a refusal or an error is the point's result
                done.append(_visit(points[number], layers, device, seed, ceilings, timing_options,
                                   measure_memory and round_index == 0))
    rows = [merge_rounds(done, set_time_columns) for done in runs]
    for row in rows:
        row["round_spread"] = _round_spread(parse_round_medians(row.get("round_medians_ms", "")))
        row["noisy"] = bool(row["round_spread"] > NOISY_ROUND_SPREAD) if row["status"] == "ok" else False
    return to_frame(rows, ROW_COLUMNS)


@dataclass(frozen=True)
class _Point:
    label: str
    base: object
    fields: dict
    config: object
    error: Exception | None
    dtype: object
    num_tokens: int
    backend: str
    layer_key: tuple


def _points(configs, grid, dtypes, tokens, backends, device) -> list[_Point]:
    from ..backends import runnable_backends

    tokens = [int(t) for t in _as_list(tokens)]
    backends = runnable_backends(device, interpreted=False) if backends is None else _as_list(backends)
    dtypes = [None] if dtypes is None else _as_list(dtypes)
    points = []
    for layer_number, (label, base, fields, config, error) in enumerate(_layers(configs, grid)):
        for dtype in dtypes:
            for num_tokens in tokens:
                for backend in backends:
                    points.append(_Point(label, base, fields, config, error, dtype, num_tokens, str(backend),
                                         (layer_number, str(dtype))))
    return points


def _visit(point: _Point, layers: dict, device, seed, ceilings, timing_options, measure_memory) -> dict:
    if point.error is not None:
        row = _unsupported_row(point.label, point.base, point.fields, point.dtype, point.num_tokens, point.backend,
                               device, point.error)
        row["_times_ms"] = []
        return row
    routing = {k: v for k, v in point.fields.items() if k in ROUTING_FIELDS}
    routing.setdefault("seed", seed)
    row, built = measure_with_layer(point.config, point.num_tokens, point.backend, device=device, dtype=point.dtype,
                                    ceilings=ceilings, preset=point.label, experts=layers.get(point.layer_key),
                                    measure_memory=measure_memory, timing_options=timing_options, keep_times=True,
                                    **routing)
    if built is not None:
        layers[point.layer_key] = built
    return row


def _round_spread(medians) -> float:
    medians = [m for m in medians if m > 0]
    return max(medians) / min(medians) - 1 if len(medians) > 1 else math.nan


# ----------------------------------------------------------------------------- reading the rows


@dataclass(frozen=True)
class Ratio:
    """A speed-up instead of a time: per round, the median of row `numerator` / that of row `denominator`
    (e.g. Ratio(eager_row, grouped_row) is how many times faster grouped_mm was)."""

    numerator: dict
    denominator: dict


def select(frame, selector: dict):
    """The one row of `frame` whose columns equal `selector`'s values; a clear error otherwise."""
    mask = None
    for column, value in selector.items():
        if column not in frame.columns:
            raise KeyError(f"no column {column!r} to select on; columns: {list(frame.columns)}")
        match = frame[column] == value
        mask = match if mask is None else mask & match
    rows = frame if mask is None else frame[mask]
    if len(rows) != 1:
        raise ValueError(f"{selector} picks {len(rows)} rows, not one; add columns to the selector "
                         f"(e.g. backend, num_tokens, num_experts)")
    return rows.iloc[0]


def describe(selector) -> str:
    """{"backend": "eager", "num_experts": 32} -> "eager, num_experts=32"; a Ratio -> "a / b"."""
    if isinstance(selector, Ratio):
        return f"({describe(selector.numerator)}) / ({describe(selector.denominator)})"
    return ", ".join(str(v) if k == "backend" else f"{k}={v}" for k, v in selector.items())


def round_values(frame, selector) -> list[float]:
    """Each round's median time of one row (a dict selector), or each round's ratio (a `Ratio`);
    [] when the row did not run."""
    if isinstance(selector, Ratio):
        top, bottom = round_values(frame, selector.numerator), round_values(frame, selector.denominator)
        if len(top) != len(bottom):
            return []
        return [a / b for a, b in zip(top, bottom) if b > 0]
    row = select(frame, selector)
    if row["status"] != "ok":
        return []
    return parse_round_medians(row["round_medians_ms"])


@dataclass(frozen=True)
class Comparison:
    """How `a` compared with `b`, round by round (each round measured both, close in time).

    verdict: "slower" (a's value above b's by more than the margin in every round), "faster" (below,
    every round), "same" (within the margin, every round), "too noisy" (the rounds disagree, or fewer
    than MIN_ROUNDS_FOR_VERDICT), "not measured" (a row was refused or failed).
    ratio: the median over rounds of a / b; round_ratios: each round's a / b.
    """

    verdict: str
    ratio: float
    round_ratios: tuple
    margin: float
    a: str
    b: str

    def __str__(self) -> str:
        return f"{self.a} vs {self.b}: {self.summary()}"

    def summary(self) -> str:
        """The numbers and the verdict without the row names: "2.82x, rounds 2.42–2.94x, above 1.15x in all 5"."""
        if self.verdict == "not measured":
            return "not measured (a row was refused or failed)"
        ratios = f"time ratio {self.ratio:.2f}x, rounds {min(self.round_ratios):.2f}–{max(self.round_ratios):.2f}x"
        if self.verdict == "too noisy":
            return f"{TOO_NOISY} ({ratios})"
        high, low = 1 + self.margin, 1 / (1 + self.margin)
        bound = {"slower": f"above {high:.2f}x", "faster": f"below {low:.2f}x",
                 "same": f"between {low:.2f}x and {high:.2f}x"}[self.verdict]
        return f"{ratios}: {bound} in all {len(self.round_ratios)} rounds"


def compare(frame, a, b, *, margin: float = DEFAULT_MARGIN) -> Comparison:
    """Compare two rows of a `measure_live` table (selectors or `Ratio`s) round by round."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    top, bottom = round_values(frame, a), round_values(frame, b)
    names = describe(a), describe(b)
    if not top or not bottom or len(top) != len(bottom):
        return Comparison("not measured", math.nan, (), margin, *names)
    ratios = tuple(x / y for x, y in zip(top, bottom) if y > 0)
    ratio = sorted(ratios)[len(ratios) // 2] if len(ratios) % 2 else \
        sum(sorted(ratios)[len(ratios) // 2 - 1:len(ratios) // 2 + 1]) / 2
    high, low = 1 + margin, 1 / (1 + margin)
    if len(ratios) < MIN_ROUNDS_FOR_VERDICT:
        verdict = "too noisy"
    elif all(r > high for r in ratios):
        verdict = "slower"
    elif all(r < low for r in ratios):
        verdict = "faster"
    elif all(low <= r <= high for r in ratios):
        verdict = "same"
    else:
        verdict = "too noisy"
    return Comparison(verdict, ratio, ratios, margin, *names)


@dataclass(frozen=True)
class Claim:
    """A lesson's claim checked against live rows: holds is True, False, or None (too noisy or not measured)."""

    claim: str
    expect: str
    comparison: Comparison

    @property
    def holds(self) -> bool | None:
        if self.comparison.verdict in ("too noisy", "not measured"):
            return None
        return self.comparison.verdict == self.expect

    @property
    def answer(self) -> str:
        return {True: "yes", False: "no", None: "cannot tell"}[self.holds]

    def __str__(self) -> str:
        return f"On this machine, now, {self.claim}: **{self.answer}** ({self.comparison.summary()})."

    def _repr_markdown_(self) -> str:
        return str(self)


def check_claim(frame, claim: str, a, b, *, expect: str, margin: float = DEFAULT_MARGIN) -> Claim:
    """Check "a is `expect` than b" ("slower", "faster" or "same") on the live rows, in words:
    str(result) reads "On this machine, now, <claim>: yes/no/cannot tell — <the numbers>"."""
    if expect not in ("slower", "faster", "same"):
        raise ValueError(f"expect must be 'slower', 'faster' or 'same', got {expect!r}")
    return Claim(claim, expect, compare(frame, a, b, margin=margin))


def claims_markdown(claims) -> str:
    """Several claims as a markdown list, for IPython.display.Markdown."""
    return "\n".join(f"- {claim}" for claim in claims)


def format_timing(row) -> str:
    """"1.23 (1.10–1.41)": the median and p10–p90 in ms, 3 significant digits; " ⚠" when the
    rounds disagree by more than NOISY_ROUND_SPREAD; the status when the row did not run."""
    if row["status"] != "ok":
        return str(row["status"])
    text = f"{row['median_ms']:.3g} ({row['p10_ms']:.3g}–{row['p90_ms']:.3g})"
    return text + " ⚠" if bool(row.get("noisy", False)) else text


def spread_table(frame, index, columns="backend"):
    """Median ms with p10–p90 per cell, as text: one row per `index` value(s), one column per `columns` value."""
    table = frame.assign(timing=[format_timing(row) for _, row in frame.iterrows()])
    for name in [index] if isinstance(index, str) else list(index):
        values = table[name]
        if values.dtype.kind == "f" and values.notna().all() and (values == values.round()).all():
            table[name] = values.astype("int64")  # experts_hit is a float column: show 8, not 8.0
    return table.pivot_table(index=index, columns=columns, values="timing", aggfunc="first", sort=False)


def noise_summary(frame) -> str:
    """One sentence: how many measured points had rounds that agreed, and with how many threads/rounds."""
    measured = frame[frame["status"] == "ok"]
    if not len(measured):
        return "nothing was measured"
    noisy = int(measured["noisy"].sum())
    rounds = int(measured["rounds"].max())
    worst = measured["round_spread"].max()
    text = (f"{len(measured) - noisy} of {len(measured)} points had round medians within "
            f"{NOISY_ROUND_SPREAD:.0%} of each other over {rounds} interleaved rounds (worst: {worst:.0%} apart)")
    if noisy:
        text += f"; ⚠ marks the {noisy} that did not: other work on this machine moved them"
    return text
