"""Self-check for notebook 05: read a compile matrix — the fastest mode per backend that stayed correct."""
from __future__ import annotations

import math

from . import feedback

NAN = math.nan
#: A made-up matrix in the shape of moe_lab.bench.compile_matrix's, from an imagined older torch on
#: which CUDA graphs replayed a stale grouped_mm after the routing changed — so both modes with CUDA
#: graphs (reduce-overhead, max-autotune) are wrong for it, and the mode transformers' documentation
#: recommends for grouped_mm (max-autotune-no-cudagraphs) is right. One token count. Made consistent
#: with what compiling does: within a backend, default compiles quickest, CUDA graphs add capture
#: time, autotuning adds tens of seconds; uncompiled_ms is one number per backend (the same function);
#: batched_mm barely changes (its time is the gather), eager keeps its host sync and gains little.
#: (mode, backend, status, compile_s, compiled_ms, uncompiled_ms, equal_to_uncompiled,
#:  equal_after_routing_change, error)
ROWS = (
    ("default", "eager", "compiled", 3.6, 6.20, 6.75, True, True, ""),
    ("reduce-overhead", "eager", "compiled", 5.1, 5.85, 6.75, True, True, ""),
    ("max-autotune-no-cudagraphs", "eager", "failed", NAN, NAN, NAN, False, False,
     "TimeoutError: autotuning 37 distinct matmul shapes did not finish"),
    ("default", "batched_mm", "compiled", 2.9, 1.27, 1.24, True, True, ""),
    ("reduce-overhead", "batched_mm", "compiled", 4.0, 1.19, 1.24, True, True, ""),
    ("max-autotune", "batched_mm", "compiled", 41.0, 1.22, 1.24, True, True, ""),
    ("default", "grouped_mm", "compiled", 1.7, 0.46, 0.54, True, True, ""),
    ("reduce-overhead", "grouped_mm", "compiled", 2.6, 0.38, 0.54, True, False, ""),
    ("max-autotune", "grouped_mm", "compiled", 38.5, 0.37, 0.54, True, False, ""),
    ("max-autotune-no-cudagraphs", "grouped_mm", "compiled", 36.0, 0.43, 0.54, True, True, ""),
    ("default", "my_backend", "failed", NAN, NAN, NAN, False, False,
     "Unsupported: call to a non-torch function with a tensor argument"),
    ("reduce-overhead", "my_backend", "failed", NAN, NAN, NAN, False, False,
     "Unsupported: call to a non-torch function with a tensor argument"),
)
COLUMNS = ("mode", "backend", "status", "compile_s", "compiled_ms", "uncompiled_ms", "equal_to_uncompiled",
           "equal_after_routing_change", "error")


def exercise_frame():
    """The exercise's compile matrix as a pandas DataFrame (num_tokens=16 on every row)."""
    import pandas as pd

    frame = pd.DataFrame(list(ROWS), columns=list(COLUMNS))
    frame.insert(2, "num_tokens", 16)
    frame["speedup"] = frame["uncompiled_ms"] / frame["compiled_ms"]
    return frame


def fastest_correct_modes(frame) -> dict:
    """{backend: mode} — the lowest compiled_ms among rows that compiled and matched after the routing change."""
    good = frame[(frame["status"] == "compiled") & frame["equal_to_uncompiled"].astype(bool)
                 & frame["equal_after_routing_change"].astype(bool) & frame["compiled_ms"].notna()]
    return {b: str(g.loc[g["compiled_ms"].idxmin(), "mode"]) for b, g in good.groupby("backend", sort=False)}


def check_fastest_modes(answer, frame=None):
    """Is `answer` ({backend: mode}) the fastest correct mode of each backend in `frame` (default:
    `exercise_frame()`)? Backends with no usable row may be left out or mapped to None."""
    frame = exercise_frame() if frame is None else frame
    expected = fastest_correct_modes(frame)
    if answer is None:
        return feedback(False, 'replace `answer = None` with a dict {backend: mode}, e.g. {"eager": "default", ...}')
    if hasattr(answer, "to_dict") and not isinstance(answer, dict):
        answer = answer.to_dict()
    if not isinstance(answer, dict):
        return feedback(False, f"give a dict {{backend: mode}}, got {type(answer).__name__}")
    problems = []
    for backend in dict.fromkeys(frame["backend"]):
        rows = frame[frame["backend"] == backend]
        pick = answer.get(backend)
        if backend not in expected:
            if pick is not None:
                problems.append(f"{backend} never compiled in any mode (its rows are "
                                f"{'/'.join(sorted(set(rows['status'])))}): it has no usable mode — leave it out "
                                f"or map it to None; do not include failed rows")
            continue
        if pick is None:
            problems.append(f"{backend} is missing: it has compiled rows that stayed correct")
            continue
        chosen = rows[rows["mode"] == pick]
        if not len(chosen):
            problems.append(f"{backend} has no row with mode {pick!r} (modes: {list(rows['mode'])})")
            continue
        row = chosen.iloc[0]
        if row["status"] != "compiled":
            problems.append(f"{backend} under {pick} {row['status']} ({row['error']}): failed rows have no "
                            "steady-state time and are never the answer")
        elif not (bool(row["equal_after_routing_change"]) and bool(row["equal_to_uncompiled"])):
            problems.append(f"{backend} under {pick} is fast ({row['compiled_ms']} ms) but its output was wrong "
                            "after the routing changed (equal_after_routing_change is False): you ignored "
                            "correctness")
        elif pick != expected[backend]:
            quickest_compile = rows.loc[rows["compile_s"].idxmin(), "mode"] if rows["compile_s"].notna().any() else None
            hint = (" — that is the quickest to COMPILE; fastest means the lowest compiled_ms (steady state)"
                    if pick == quickest_compile else ": compare compiled_ms among the correct rows")
            problems.append(f"{backend} under {pick} is correct but not the fastest correct mode{hint}")
    extra = sorted(set(answer) - set(frame["backend"]))
    if extra:
        problems.append(f"no backend(s) {extra} in the matrix")
    if problems:
        return feedback(False, "; ".join(problems) + ".")
    return feedback(True, ", ".join(f"{b}: {m}" for b, m in expected.items())
                    + " — every other faster-looking cell either failed or gave a wrong answer after the "
                      "routing changed")
