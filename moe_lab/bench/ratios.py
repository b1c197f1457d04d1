"""moe_lab against transformers in one results table: same-named ratios, and the best path of each.

A table measured with `moe-lab bench --compare-hf` holds rows for moe_lab's backends ("grouped_mm")
and transformers' ("transformers:grouped_mm": moe_lab.hf.comparison) on the same weights and inputs.
`add_transformers_ratios(df)` puts `speedup_vs_transformers` on each moe_lab row; `best_paths`
compares the fastest path of each library per point.
"""
from __future__ import annotations

import math

from .implementations import MOE_LAB, TRANSFORMERS, backend_of, library_of
from .rounds import parse_round_medians


def add_transformers_ratios(df):
    """Add `speedup_vs_transformers` = transformers' median / moe_lab's median of the same-named
    backend at the same shape, tokens, dtype, device and execution (eager launches or CUDA graph; NaN
    where either was not measured). A table measured in interleaved rounds (`sweep(rounds=R)`) also
    gets `speedup_lowest_round` / `speedup_highest_round`: the same ratio taken round by round."""
    keys = ["preset", "hidden_size", "intermediate_size", "num_experts", "top_k", "num_tokens", "dtype", "device",
            "execution"]
    return _with_ratio(df, keys, "median_ms", "transformers_ms", ok="ok", rounds_column="round_medians_ms")


def add_transformers_compile_ratios(frame):
    """On a `compile_matrix` frame holding both libraries: `speedup_vs_transformers` = transformers'
    compiled median / moe_lab's compiled median, same mode, token count and backend name."""
    keys = ["mode", "num_tokens", "hidden_size", "intermediate_size", "num_experts", "top_k", "dtype", "device"]
    return _with_ratio(frame, keys, "compiled_ms", "transformers_compiled_ms", ok="compiled",
                       rounds_column="compiled_round_ms")


def _with_ratio(frame, keys, time_column, their_column, ok, rounds_column):
    """Join transformers' `time_column` onto the same-named moe_lab rows (equal `keys`) as
    `their_column`, and add `speedup_vs_transformers` = theirs / ours; with `rounds_column`
    (per-round medians, interleaved), also the lowest and highest round-by-round ratio."""
    keys = keys + (["pass"] if "pass" in frame.columns else [])  # forward against forward, training against training
    theirs = frame[_is_transformers(frame["backend"]) & (frame["status"] == ok)].copy()
    theirs["backend"] = theirs["backend"].map(backend_of)
    has_rounds = rounds_column in frame.columns
    carried = [time_column] + ([rounds_column] if has_rounds else [])
    theirs = theirs[keys + ["backend", *carried]].rename(
        columns={time_column: their_column, rounds_column: "_their_rounds"})
    merged = frame.merge(theirs, on=keys + ["backend"], how="left")
    merged["speedup_vs_transformers"] = merged[their_column] / merged[time_column]
    if has_rounds:
        paired = [_round_ratios(ours, theirs_) for ours, theirs_ in zip(merged[rounds_column], merged["_their_rounds"])]
        merged["speedup_lowest_round"] = [min(r) if r else math.nan for r in paired]
        merged["speedup_highest_round"] = [max(r) if r else math.nan for r in paired]
        merged = merged.drop(columns="_their_rounds")
    return merged


def _round_ratios(ours: str, theirs: str) -> list[float]:
    """theirs / ours for each round both ran (a row measured once has one round)."""
    return [t / o for o, t in zip(parse_round_medians(ours), parse_round_medians(theirs)) if o > 0]


def best_paths(frame):
    """Per (preset, tokens, pass): the fastest moe_lab path (backend and execution, `auto` left out: it is
    one of the others) beside the fastest transformers path, with fractions of the roofline and
    `speedup` = transformers' best / moe_lab's best. Takes a table with both libraries (e.g.
    `load_recorded("presets", execution=None)`)."""
    import pandas as pd

    ok = frame[frame["status"] == "ok"].reset_index(drop=True)  # concatenated tables repeat index labels
    if "pass" not in ok.columns:
        ok = ok.assign(**{"pass": "forward"})
    rows = []
    for (preset, tokens, pass_), group in ok.groupby(["preset", "num_tokens", "pass"], sort=False):
        is_theirs = _is_transformers(group["backend"])
        ours = group[(group["backend"].map(library_of) == MOE_LAB) & ~group["backend"].map(_dispatches)]
        theirs = group[is_theirs]
        if ours.empty or theirs.empty:
            continue
        best, best_theirs = ours.loc[ours["median_ms"].idxmin()], theirs.loc[theirs["median_ms"].idxmin()]
        rows.append({
            "preset": preset, "num_tokens": int(tokens), "pass": pass_ or "forward",
            "moe_lab": f"{best['backend']} ({best['execution']})", "moe_lab_ms": best["median_ms"],
            "moe_lab_roofline": best["fraction_of_roofline"], "moe_lab_tflops": best["tflops"],
            "transformers": f"{backend_of(best_theirs['backend'])} ({best_theirs['execution']})",
            "transformers_ms": best_theirs["median_ms"], "transformers_roofline": best_theirs["fraction_of_roofline"],
            "speedup": best_theirs["median_ms"] / best["median_ms"],
        })
    return pd.DataFrame(rows)


def _is_transformers(names):
    return names.map(library_of) == TRANSFORMERS


def _dispatches(name: str) -> bool:
    """auto runs one of the others: it is not a path of its own (asked of the spec; False if unregistered)."""
    from ..backends import available_backends, get_spec

    return name in available_backends() and get_spec(name).dispatcher
