"""Helpers of notebook 01 (routing): small text tables and the experts-hit arithmetic.

Tables are returned as plain strings (fixed-width, rounded) so that a notebook cell can print them
and nbval can compare the output exactly across torch and pandas versions.
"""
from __future__ import annotations

import torch

from ..parameters import Device, Float, Int, Parameters, Rule
from ..routing import RoutingStats
from .figures import Prose

PARAMETERS = Parameters(
    device=Device(),
    num_experts=Int(min=1, max=256), top_k=Int(min=1, max=256),
    num_tokens=Int(min=1, max=64, help="rows of the step-by-step tables"),
    stats_tokens=Int(min=1, max=65536), zipf_skew=Float(min=0, max=10), seed=Int(min=0),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts")],
)


def format_matrix(values, *, row_name: str = "token", col_name: str = "expert", decimals: int = 3,
                  col_labels=None) -> str:
    """A [rows, cols] tensor (floats rounded to `decimals`, or ints) as a fixed-width table."""
    values = torch.as_tensor(values).detach().cpu()
    if values.dim() == 1:
        values = values[:, None]
    is_int = not values.dtype.is_floating_point
    cells = [[str(int(v)) if is_int else f"{float(v):.{decimals}f}" for v in row] for row in values]
    col_labels = list(col_labels) if col_labels is not None else [f"{col_name} {j}" for j in range(values.shape[1])]
    width = max([len(c) for row in cells for c in row] + [len(c) for c in col_labels])
    first = max(len(f"{row_name} {values.shape[0] - 1}"), len(row_name))
    lines = [" " * first + "  " + "  ".join(c.rjust(width) for c in col_labels)]
    for i, row in enumerate(cells):
        lines.append(f"{row_name} {i}".ljust(first) + "  " + "  ".join(c.rjust(width) for c in row))
    return "\n".join(lines)


def stats_table(cases: dict[str, RoutingStats]) -> str:
    """One line per routing: experts hit, max and mean load, max/mean, normalized entropy (2 decimals)."""
    header = f"{'routing':<16}{'experts hit':>12}{'max load':>10}{'mean load':>11}{'max/mean':>10}{'norm. entropy':>15}"
    lines = [header]
    for name, s in cases.items():
        lines.append(f"{name:<16}{f'{s.experts_hit}/{s.num_experts}':>12}{s.max_load:>10}{s.mean_load:>11.1f}"
                     f"{s.imbalance:>10.2f}{s.normalized_entropy:>15.2f}")
    return "\n".join(lines)


def expected_experts_hit(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected number of distinct experts hit by `num_tokens` tokens routed uniformly at random.

    Each token picks top_k distinct experts, so a given expert is missed by one token with
    probability 1 - k/E and by all T tokens with probability (1 - k/E)^T.
    """
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def experts_hit_table(recorded, backend: str = "grouped_mm") -> str:
    """Recorded experts hit per preset and token count, with the uniform expectation beside it.

    `recorded`: the DataFrame of `moe_lab.recorded_tables.load_recorded("presets")`. The last column is
    columns say how many bytes of weights one expert, and all E experts, hold in bf16: each
    expert hit is one expert's weights read from memory.
    """
    rows = recorded[recorded["backend"] == backend]
    tokens = sorted(int(t) for t in rows["num_tokens"].unique())
    head = f"{'preset':<19}{'E':>4}{'k':>3}" + "".join(f"{f'T={t}':>13}" for t in tokens) + f"{'1 expert':>11}{'all E':>11}"
    lines = [head, " " * 26 + "".join(f"{'hit (unif.)':>13}" for _ in tokens) + f"{'(bf16)':>11}{'(bf16)':>11}"]
    for preset, sub in rows.groupby("preset", sort=False):
        first = sub.iloc[0]
        E, k, H, I = (int(first[c]) for c in ("num_experts", "top_k", "hidden_size", "intermediate_size"))
        cells = []
        for t in tokens:
            hit = sub.loc[sub["num_tokens"] == t, "experts_hit"]
            cells.append(f"{int(hit.iloc[0])} ({expected_experts_hit(E, k, t):.0f})" if len(hit) else "-")
        one = 3 * H * I * 2
        lines.append(f"{preset:<19}{E:>4}{k:>3}" + "".join(f"{c:>13}" for c in cells)
                     + f"{one / 2**20:>7.1f} MiB{E * one / 2**30:>7.2f} GiB")
    return "\n".join(lines)


def recorded_reading(recorded, preset: str = "qwen3-30b-a3b") -> Prose:
    """One row of `experts_hit_table` read out loud: the weight bytes at T=1 and T=16, how long the
    T=16 bytes take at the card's measured copy bandwidth, and from which T every expert is hit."""
    rows = recorded[(recorded["preset"] == preset) & (recorded["backend"] == "grouped_mm")].set_index("num_tokens")
    first = rows.iloc[0]
    E, H, I = (int(first[c]) for c in ("num_experts", "hidden_size", "intermediate_size"))
    one = 3 * H * I * 2  # bytes of one expert in bf16
    hit1, hit16 = int(rows.loc[1, "experts_hit"]), int(rows.loc[16, "experts_hit"])
    bandwidth = float(rows.loc[16, "ceiling_copy_GBps"]) * 1e9  # bytes/s, measured on the recording card
    full = [int(t) for t, hit in rows["experts_hit"].items() if hit == E]
    return Prose(
        f"Read one row: {preset} at T=1 hit {hit1} experts × {one / 2**20:.0f} MiB = {hit1 * one / 2**20:.0f} MiB "
        f"of weights per layer; at T=16 it hit {hit16}, {hit16} × {one / 2**20:.0f} MiB ≈ "
        f"{hit16 * one / 2**30:.2f} GiB — {hit16 / hit1:.1f} times the bytes for sixteen times the tokens, at least "
        f"{hit16 * one / bandwidth * 1e3:.2f} ms at the {bandwidth / 1e12:.2f} TB/s copy bandwidth measured on that card. "
        + (f"From T={full[0]} on every expert is hit and the weight bytes stop growing: more tokens add only arithmetic."
           if full else "Even the largest T recorded left some experts idle.")
    )
