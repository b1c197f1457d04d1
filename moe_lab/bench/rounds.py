"""Interleaved rounds: measure every backend of a grid point once, then again, R times, and merge.

Launched from Python, a layer call at small T is mostly host time, and host time drifts: the first
points of a process run slower (cold caches, allocator growth, clocks ramping), and a busy host
slows whatever runs at that moment. Timing backend A fully, then B, puts that drift into the
A/B ratio. Rounds spread it over both: round 0 runs the backends in order, round 1 in reverse,
and so on (A B B A ...), each round a full `measure` with its own warm-up. The merged row pools
the repetitions of all rounds (median, p10, p90 of the pool) and keeps each round's median in
`round_medians_ms`, so a ratio between two backends can be taken round by round
(`ratios.add_transformers_ratios` reports the lowest and highest): a ratio below 1.0 in every
round is a real difference, one that flips between rounds is noise.
"""
from __future__ import annotations

from .timing import percentile


def round_order(items: list, round_index: int) -> list:
    """Round 0 in order, round 1 reversed, round 2 in order, ...: each item's mean position is the same."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


def format_round_medians(medians) -> str:
    """[0.5123, 0.49871] -> "0.5123 0.49871" (milliseconds, 5 significant digits): one CSV cell."""
    return " ".join(f"{m:.5g}" for m in medians)


def parse_round_medians(text) -> list[float]:
    """The inverse of `format_round_medians`; "" or NaN (a row that did not run) -> []."""
    if not isinstance(text, str) or not text.strip():
        return []
    return [float(value) for value in text.split()]


def merge_rounds(rows: list[dict], set_time_columns) -> dict:
    """One row from the rows of one (backend, execution, point) over several rounds.

    Each row carries its repetitions' times under the private key "_times_ms". A round that did
    not end "ok" decides the row (its status and reason: a refusal or an error is the result);
    otherwise the first round's row (correctness, memory) gets the pooled timing, computed by
    `set_time_columns(row, median_ms)`, and `rounds` / `round_medians_ms`."""
    failed = [row for row in rows if row["status"] != "ok"]
    merged = dict(failed[0] if failed else rows[0])
    merged.pop("_times_ms", None)
    merged["rounds"] = len(rows)
    if failed:
        return merged
    pooled = [t for row in rows for t in row["_times_ms"]]
    medians = [percentile(row["_times_ms"], 50) for row in rows]
    merged.update(p10_ms=percentile(pooled, 10), p90_ms=percentile(pooled, 90), reps=len(pooled),
                  round_medians_ms=format_round_medians(medians))
    set_time_columns(merged, percentile(pooled, 50))
    return merged
