"""Notebook 06 exercise: from the recorded H100 data, the fastest backend for qwen3-30b-a3b at T=1
and T=8192, and its fraction of the roofline."""
from __future__ import annotations

import math

from . import feedback

PRESET = "qwen3-30b-a3b"
TOKENS = (1, 8192)
FRACTION_TOLERANCE = 0.01  # absolute: two decimals are enough


def _rows():
    """qwen3's recorded rows, `auto` left out: it runs one of the others (as in bench.best_paths)."""
    from ..recorded_tables import load_recorded

    df, _ = load_recorded("presets")
    return df[(df["preset"] == PRESET) & (df["backend"] != "auto")]


def fastest(rows=None) -> dict:
    """{T: (backend, fraction_of_roofline, median_ms)} of the fastest measured row at each T in TOKENS."""
    rows = _rows() if rows is None else rows
    out = {}
    for t in TOKENS:
        ok = rows[(rows["num_tokens"] == t) & (rows["status"] == "ok")]
        best = ok.loc[ok["median_ms"].idxmin()]
        out[t] = (str(best["backend"]), float(best["fraction_of_roofline"]), float(best["median_ms"]))
    return out


def _backend_problem(rows, t, name, best_name, best_ms) -> str | None:
    if name == best_name:
        return None
    if name == "auto":
        return f"T={t}: auto only picks one of the other backends each call; name the one that ran fastest"
    row = rows[(rows["num_tokens"] == t) & (rows["backend"] == name)]
    if row.empty:
        return (f"T={t}: there is no backend {name!r} in the recorded rows; they hold "
                f"{sorted(rows['backend'].unique())}")
    row = row.iloc[0]
    if row["status"] != "ok":
        reason = str(row["reason"]).split(". ")[0]
        return f"T={t}: {name} was not measured there (status {row['status']}: {reason})"
    ratio = row["median_ms"] / best_ms
    return (f"T={t}: {name} took {row['median_ms']:.3g} ms, but {best_name} took {best_ms:.3g} ms "
            f"({ratio:.2g}x faster); compare median_ms over every row with status 'ok'")


def _fraction_problem(rows, t, fraction, best_name, best_fraction) -> str | None:
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        return f"T={t}: the fraction should be a number, got {fraction!r}"
    if math.isfinite(fraction) and abs(fraction - best_fraction) <= FRACTION_TOLERANCE:
        return None
    if abs(fraction / 100 - best_fraction) <= FRACTION_TOLERANCE:
        return f"T={t}: {fraction} looks like a percentage; give the fraction ({fraction / 100:.3g})"
    ok = rows[rows["status"] == "ok"]
    distance = (ok["fraction_of_roofline"] - fraction).abs()
    close = distance <= FRACTION_TOLERANCE / 2
    # Select before assigning: pandas gives an EMPTY frame the index of an assigned Series.
    near = ok[close].assign(_other_t=lambda d: d["num_tokens"] != t, _distance=distance[close])  # this T first
    if len(near):
        other = near.sort_values(["_other_t", "_distance"]).iloc[0]
        return (f"T={t}: {fraction:.3g} is the fraction of {other['backend']} at T={other['num_tokens']}; "
                f"the fastest row ({best_name} at T={t}) has {best_fraction:.3g}")
    return (f"T={t}: fraction {fraction:.3g} is off by {fraction - best_fraction:+.3g} "
            f"(read the fraction_of_roofline column of the fastest row)")


def check_fastest_qwen3(answer):
    """`answer` = {1: (backend, fraction_of_roofline), 8192: (backend, fraction_of_roofline)}."""
    if not isinstance(answer, dict) or any(t not in answer for t in TOKENS):
        return feedback(False, f"expected a dict {{1: (backend, fraction), 8192: (backend, fraction)}}, "
                               f"got {answer!r}")
    rows, truth, problems = _rows(), fastest(), []
    for t in TOKENS:
        entry = answer[t]
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or None in entry:
            problems.append(f"T={t}: fill in (backend name, fraction_of_roofline), got {entry!r}")
            continue
        name, fraction = entry
        best_name, best_fraction, best_ms = truth[t]
        problems += [p for p in (_backend_problem(rows, t, str(name), best_name, best_ms),
                                 _fraction_problem(rows, t, fraction, best_name, best_fraction)) if p]
    if problems:
        return feedback(False, "; ".join(problems))
    (n1, f1, ms1), (n2, f2, ms2) = truth[1], truth[8192]
    return feedback(True, f"T=1: {n1} ({ms1:.3g} ms, {f1:.0%} of the roofline); T=8192: {n2} ({ms2:.3g} ms, "
                          f"{f2:.0%}). One token barely loads the weights it touches: launch and latency "
                          f"dominate; 8192 tokens keep the grouped GEMM busy, yet far from the ceiling")
