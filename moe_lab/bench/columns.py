"""The tidy result table: one row per measurement, these columns, these types."""
from __future__ import annotations

import math

from .provenance import ROW_PROVENANCE

#: Integer columns that are always known (the requested shape).
INT_COLUMNS = ("hidden_size", "intermediate_size", "num_experts", "top_k", "num_tokens")
#: Numeric columns, float64 so that "not measured" can be NaN (counts included: reps, bytes).
FLOAT_COLUMNS = (
    "skew", "experts_hit", "median_ms", "p10_ms", "p90_ms", "reps", "peak_bytes", "predicted_bytes",
    "predicted_gather_bytes", "flops", "min_bytes", "tflops", "gbps", "roofline_ms", "fraction_of_roofline",
    "rel_err", "ceiling_copy_GBps", "ceiling_matmul_TFLOPs", "rounds",
)
STR_COLUMNS = ("backend", "execution", "pass", "preset", "dtype", "device", "distribution", "status", "reason", "memory_method",
               "grouped_mm_kernel", "round_medians_ms")

ROW_COLUMNS = (
    "backend", "preset", "hidden_size", "intermediate_size", "num_experts", "top_k", "num_tokens", "dtype",
    "device", "distribution", "skew", "experts_hit", "status", "reason", "median_ms", "p10_ms", "p90_ms", "reps",
    "peak_bytes", "memory_method", "predicted_bytes", "predicted_gather_bytes", "flops", "min_bytes", "tflops",
    "gbps", "roofline_ms", "fraction_of_roofline", "grouped_mm_kernel", "rel_err", *ROW_PROVENANCE,
    # added beyond the agreed interface: the ceilings this row's roofline used
    "ceiling_copy_GBps", "ceiling_matmul_TFLOPs",
    # "eager" (launched from Python), "cuda_graph" (replayed by moe_lab.cuda_graph, synchronized after each replay)
    # or "cuda_graph_back_to_back" (the same replays queued with no synchronize between: bench.measure.EXECUTIONS)
    "execution",
    # interleaved rounds (bench.rounds): how many, and each one's median, e.g. "0.512 0.498 0.503"
    "rounds", "round_medians_ms",
    # "forward", or "forward_backward": one forward and the backward of all its inputs (training)
    "pass",
)

STATUSES = ("ok", "refused", "oom", "unsupported", "error")


def empty_row() -> dict:
    """Every column present: NaN for numbers, "" for text."""
    row = {name: "" for name in ROW_COLUMNS}
    row.update({name: math.nan for name in FLOAT_COLUMNS})
    row.update({name: 0 for name in INT_COLUMNS})
    return row


def to_frame(rows, columns=ROW_COLUMNS, int_columns=INT_COLUMNS, float_columns=FLOAT_COLUMNS):
    """A pandas DataFrame with `columns` first (extra keys after), typed: ints int64, numbers
    float64, text str."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    extra = [c for c in frame.columns if c not in columns]
    frame = frame.reindex(columns=[*columns, *extra])
    for name in frame.columns:
        if name in int_columns:
            frame[name] = frame[name].astype("int64")
        elif name in float_columns:
            frame[name] = frame[name].astype("float64")
        elif frame[name].dtype == object and name in columns:
            frame[name] = frame[name].fillna("").astype(str)
    return frame
