"""Helpers of notebook 01 (routing): small text tables and the experts-hit arithmetic.

Tables are returned as plain strings (fixed-width, rounded) so that a notebook cell can print them
and nbval can compare the output exactly across torch and pandas versions.
"""
from __future__ import annotations

import torch

from ..routing import RoutingStats


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

    `recorded`: the DataFrame of `moe_lab.recorded.load_recorded("presets")`. The last column is
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
