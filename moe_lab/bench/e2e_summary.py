"""Reading an end-to-end table: the best backend of each library per case, the speed-up, the goal.

    e2e_goals(table)  one row per (phase, execution, batch / prompt): moe_lab's best backend and
                      transformers' best by the measured times, the ratio, whether it meets `goal`,
                      and each one's experts share (by removal where the no-experts baseline ran)
    time_split(table) the hook profile: experts, attention and the rest of an uncompiled decode step

The issue's goals (issue 15): decode at batch 1 and 8 compiled with CUDA graphs, and the prefill of
4096 tokens, moe_lab's best >= 1.3x transformers' best in the same run.
"""
from __future__ import annotations

import math

from .e2e_generate import uses_cuda_graphs

GOAL = 1.3
#: The cases the goals name: decode batches (compiled with CUDA graphs) and the prefill length.
GOAL_DECODE_BATCHES = (1, 8)
GOAL_PREFILL_TOKENS = 4096


def _best(rows, column: str, lower_is_better: bool):
    rows = rows[(rows["status"] == "ok") & rows[column].notna()]
    if rows.empty:
        return None
    return rows.loc[rows[column].idxmin() if lower_is_better else rows[column].idxmax()]


def e2e_goals(table, goal: float = GOAL):
    """A DataFrame: phase, execution, batch, prompt_tokens, moe_lab / transformers best backend and value
    (prefill ms, or decode tokens/s), speedup (>1: moe_lab faster), meets_goal, goal_case (one the issue
    names), cuda_graphs (a compiled case where torch skipped no CUDA graph for either row), experts_share_*
    (by removal, decode only). Cases where either library has no ok row are left out."""
    import pandas as pd

    rows = []
    cases = table[table["phase"].isin(["prefill", "decode"])]
    for (phase, execution, batch, prompt), group in cases.groupby(
            ["phase", "execution", "batch", "prompt_tokens"], sort=True):
        column, lower = ("prefill_ms", True) if phase == "prefill" else ("tokens_per_s", False)
        ours = _best(group[group["library"] == "moe_lab"], column, lower)
        theirs = _best(group[group["library"] == "transformers"], column, lower)
        if ours is None or theirs is None:
            continue
        speedup = theirs[column] / ours[column] if lower else ours[column] / theirs[column]
        goal_case = (phase == "decode" and uses_cuda_graphs(execution) and batch in GOAL_DECODE_BATCHES) or (
            phase == "prefill" and prompt == GOAL_PREFILL_TOKENS)
        rows.append(dict(
            phase=phase, execution=execution, batch=int(batch), prompt_tokens=int(prompt),
            moe_lab_backend=ours["backend"], moe_lab_value=float(ours[column]),
            transformers_backend=theirs["backend"], transformers_value=float(theirs[column]),
            unit="ms" if lower else "tokens/s", speedup=float(speedup), meets_goal=bool(speedup >= goal),
            goal_case=bool(goal_case),
            # compiled rows ran wholly from CUDA graphs only where torch skipped none (0, not NaN: measured)
            cuda_graphs=bool(uses_cuda_graphs(execution) and ours.get("cudagraph_skips", math.nan) == 0
                             and theirs.get("cudagraph_skips", math.nan) == 0),
            transformers_experts_share=float(theirs.get("experts_share_by_removal", math.nan)),
            moe_lab_experts_share=float(ours.get("experts_share_by_removal", math.nan)),
        ))
    return pd.DataFrame(rows)


def time_split(table):
    """Per backend, the shares of an uncompiled decode step (hook profile rows): experts, attention, the rest."""
    profile = table[(table["phase"] == "profile") & (table["status"] == "ok")]
    split = profile[["backend", "batch", "step_ms", "experts_share", "attention_share"]].copy()
    split["rest_share"] = 1.0 - split["experts_share"] - split["attention_share"]
    return split.reset_index(drop=True)
