"""Time transformers' own experts backends beside moe_lab's, on the same weights, in one process.

`register_transformers_backends()` adds "transformers:eager", "transformers:batched_mm" and
"transformers:grouped_mm" to moe_lab's registry. Each runs a real transformers `Qwen2MoeExperts`
module whose parameters ARE the moe_lab layer's parameters (no copy), dispatched by transformers'
own `config._experts_implementation` — so `sweep`/`measure` time both libraries with the same
inputs, timer and rules. The one rule added: transformers' batched_mm has no memory guard, so the
same gather budget as moe_lab's is applied (over it, the row is "refused", not an OOM).
`add_transformers_ratios(df)` then puts `speedup_vs_transformers` on each moe_lab row.
"""
from __future__ import annotations

import math
import weakref

import torch

from ..backends import available_backends, expert_weights, get_batched_mm_budget, predict_gather_bytes, register, unregister
from ..errors import GatherBudgetError
from .rounds import parse_round_medians

PREFIX = "transformers:"
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_twins: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _transformers_twin(experts):
    """A transformers Qwen2MoeExperts sharing `experts`' parameters (built on the meta device)."""
    twin = _twins.get(experts)
    if twin is None:
        try:
            from transformers import Qwen2MoeConfig
            from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
        except ImportError as error:
            raise ImportError("comparing with transformers needs it installed: pip install 'moe-lab[hf]'") from error
        cfg = experts.config
        hf_config = Qwen2MoeConfig(
            hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, hidden_act=_HF_ACTIVATION[cfg.activation],
        )
        with torch.device("meta"):
            twin = Qwen2MoeExperts(hf_config)
        twin.gate_up_proj = experts.gate_up_proj  # the same Parameter objects: no copy, same data
        twin.down_proj = experts.down_proj
        _twins[experts] = twin
    return twin


def _make_backend(implementation: str):
    def transformers_backend(experts, hidden_states, top_k_index, top_k_weights):
        if implementation == "batched_mm":
            T, k = top_k_index.shape
            weights = expert_weights(experts)
            predicted = predict_gather_bytes(T, k, weights.hidden_size, weights.intermediate_size, hidden_states.dtype)
            if predicted > get_batched_mm_budget():
                raise GatherBudgetError(predicted, get_batched_mm_budget(),
                                        "the same budget is applied to transformers' batched_mm")
        twin = _transformers_twin(experts)
        twin.config._experts_implementation = implementation
        return twin(hidden_states, top_k_index, top_k_weights)

    transformers_backend.__doc__ = f"transformers' own `{implementation}` experts forward (for comparison)."
    return transformers_backend


def register_transformers_backends() -> list[str]:
    """Register transformers' three backends in moe_lab's registry; return their names."""
    names = []
    for implementation in IMPLEMENTATIONS:
        register(PREFIX + implementation, _make_backend(implementation))
        names.append(PREFIX + implementation)
    return names


def unregister_transformers_backends() -> None:
    """Remove what `register_transformers_backends` added."""
    for implementation in IMPLEMENTATIONS:
        if PREFIX + implementation in available_backends():
            unregister(PREFIX + implementation)


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
    theirs = frame[frame["backend"].str.startswith(PREFIX) & (frame["status"] == ok)].copy()
    theirs["backend"] = theirs["backend"].str.removeprefix(PREFIX)
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
    """Per (preset, tokens): the fastest moe_lab path (backend and execution, `auto` left out: it is
    one of the others) beside the fastest transformers path, with fractions of the roofline and
    `speedup` = transformers' best / moe_lab's best. Takes a table with both libraries (e.g.
    `load_recorded("presets", execution=None)`)."""
    import pandas as pd

    ok = frame[frame["status"] == "ok"].reset_index(drop=True)  # concatenated tables repeat index labels
    rows = []
    for (preset, tokens), group in ok.groupby(["preset", "num_tokens"], sort=False):
        is_theirs = group["backend"].str.startswith(PREFIX)
        ours = group[~is_theirs & (group["backend"] != "auto")]
        theirs = group[is_theirs]
        if ours.empty or theirs.empty:
            continue
        best, best_theirs = ours.loc[ours["median_ms"].idxmin()], theirs.loc[theirs["median_ms"].idxmin()]
        rows.append({
            "preset": preset, "num_tokens": int(tokens),
            "moe_lab": f"{best['backend']} ({best['execution']})", "moe_lab_ms": best["median_ms"],
            "moe_lab_roofline": best["fraction_of_roofline"], "moe_lab_tflops": best["tflops"],
            "transformers": f"{best_theirs['backend'].removeprefix(PREFIX)} ({best_theirs['execution']})",
            "transformers_ms": best_theirs["median_ms"], "transformers_roofline": best_theirs["fraction_of_roofline"],
            "speedup": best_theirs["median_ms"] / best["median_ms"],
        })
    return pd.DataFrame(rows)
