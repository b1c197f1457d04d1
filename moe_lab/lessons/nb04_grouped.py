"""Notebook 04 (grouped GEMM): its parameters, the picture of the sort that groups (token, expert) pairs
by expert, the live claims it checks and the recorded 128-against-8-experts reading."""
from __future__ import annotations

import plotly.colors as pcolors
import plotly.graph_objects as go
import torch

from ..bench.live import Ratio, check_claim, claims_markdown
from ..parameters import Device, Dtype, Float, Int, IntList, Parameters, Rule
from ..routing import tokens_per_expert
from .figures import Prose

PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(),
    num_tokens=Int(min=1, max=64, help="T of the step-by-step example"), num_experts=Int(min=1, max=64),
    top_k=Int(min=1, max=64), hidden_size=Int(min=1, max=4096), intermediate_size=Int(min=1, max=4096),
    token_counts=IntList(min=1, max=4096, max_len=8), expert_counts=IntList(min=1, max=256, max_len=6),
    seed=Int(min=0), max_seconds=Float(positive=True, max=10),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts"),
           Rule(lambda p: p["top_k"] <= min(p["expert_counts"]),
                "every expert_counts value must be at least top_k={top_k}, got {expert_counts}")],
)


def _expert_colors(num_experts: int) -> list[str]:
    palette = pcolors.qualitative.Plotly + pcolors.qualitative.D3
    return [palette[e % len(palette)] for e in range(num_experts)]


def permutation_figure(top_k_index: torch.Tensor, num_experts: int, *, title: str | None = None) -> go.Figure:
    """The S = T*k (token, expert) pairs before sorting (top row, in (token, slot) order) and after
    (bottom row, grouped by expert), each marker coloured by its expert and labelled t<token>/e<expert>.

    A grey line joins each pair's two positions: that line is the permutation `pair_order`. Dotted
    vertical lines in the bottom row are the int32 offsets (the end of each expert's group); an
    expert without tokens has an empty group, so two of its boundaries coincide.
    """
    top_k = top_k_index.shape[1]
    expert_of_pair = top_k_index.reshape(-1).cpu()  # [S]
    num_pairs = expert_of_pair.numel()
    _, pair_order = torch.sort(expert_of_pair, stable=True)  # sorted position i holds pair pair_order[i]
    position_after = torch.empty_like(pair_order)
    position_after[pair_order] = torch.arange(num_pairs)  # where each pair lands
    offsets = torch.cumsum(tokens_per_expert(top_k_index.cpu(), num_experts), 0).tolist()
    colors = _expert_colors(num_experts)
    empty = [e for e in range(num_experts) if not (expert_of_pair == e).any()]
    fig = go.Figure()
    line_x, line_y = [], []
    for p in range(num_pairs):
        line_x += [p, int(position_after[p]), None]
        line_y += [1, 0, None]
    fig.add_trace(go.Scatter(x=line_x, y=line_y, mode="lines", line=dict(color="#BBBBBB", width=1),
                             hoverinfo="skip", showlegend=False))
    for e in range(num_experts):
        pairs = (expert_of_pair == e).nonzero().flatten().tolist()
        name = f"expert {e}"
        x = pairs + [int(position_after[p]) for p in pairs]
        labels = [f"t{p // top_k}/e{e}" for p in pairs] * 2
        hover = [f"pair {p}: token {p // top_k}, slot {p % top_k} → expert {e}<br>"
                 f"{'before' if i < len(pairs) else 'after'}: position "
                 f"{p if i < len(pairs) else int(position_after[p])}" for i, p in enumerate(pairs * 2)]
        fig.add_trace(go.Scatter(
            x=x, y=[1] * len(pairs) + [0] * len(pairs), mode="markers+text", name=name, text=labels,
            textposition=["top center"] * len(pairs) + ["bottom center"] * len(pairs),
            marker=dict(color=colors[e], size=16, line=dict(color="white", width=1)),
            hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        ))
    ends: dict[int, list[int]] = {}
    for e, end in enumerate(offsets):
        ends.setdefault(end, []).append(e)
    for end, group in ends.items():  # one boundary per distinct offset; empty experts share theirs
        fig.add_shape(type="line", x0=end - 0.5, x1=end - 0.5, y0=-0.3, y1=0.25,
                      line=dict(color="#555555", dash="dot", width=1.5))
        fig.add_annotation(x=end - 0.5, y=-0.42, showarrow=False, font=dict(size=11),
                           text="end of " + ", ".join(f"e{e}" for e in group) + f"<br>offset {end}")
    fig.update_layout(
        title=title or ("(token, expert) pairs before and after the sort by expert"
                        f"<br><sup>T={num_pairs // top_k}, top_k={top_k}, E={num_experts}; offsets {offsets}"
                        + (f"; experts {empty} have no tokens (empty groups)" if empty else "") + "</sup>"),
        xaxis=dict(title="position of the pair", dtick=1, range=[-0.8, num_pairs - 0.2], zeroline=False),
        yaxis=dict(tickvals=[0, 1], ticktext=["after: sorted by expert", "before: (token, slot) order"],
                   range=[-0.65, 1.4], zeroline=False),
        template="plotly_white", legend_title_text="expert", height=380,
    )
    return fig


def live_claims(live) -> Prose:
    """The lesson's claims about grouped_mm against eager, checked on this notebook's live table."""
    tokens = int(live["num_tokens"].max())
    few, many = int(live["num_experts"].min()), int(live["num_experts"].max())
    eager = {e: {"backend": "eager", "num_experts": e, "num_tokens": tokens} for e in (few, many)}
    grouped = {e: {"backend": "grouped_mm", "num_experts": e, "num_tokens": tokens} for e in (few, many)}
    claims = [check_claim(live, f"grouped_mm was faster than eager at E={many}, T={tokens}", grouped[many],
                          eager[many], expect="faster")]
    if few != many:
        claims.append(check_claim(live, f"grouped_mm's lead over eager was larger with E={many} experts than with "
                                        f"E={few}, both at T={tokens}", Ratio(eager[many], grouped[many]),
                                  Ratio(eager[few], grouped[few]), expect="slower"))
    return Prose(claims_markdown(claims))


def recorded_reading(recorded, many: str = "qwen3-30b-a3b", few: str = "mixtral-8x7b", tokens: int = 1024) -> Prose:
    """grouped_mm over eager for a preset with many experts and one with few, from the recorded table."""
    ms = recorded[recorded["status"] == "ok"].pivot_table(index=["preset", "num_tokens"], columns="backend",
                                                           values="median_ms")
    over = ms["eager"] / ms["grouped_mm"]
    rows = recorded[recorded["backend"] == "grouped_mm"].set_index(["preset", "num_tokens"])
    experts = {p: int(rows.loc[(p, tokens), "num_experts"]) for p in (many, few)}
    pairs = {p: tokens * int(rows.loc[(p, tokens), "top_k"]) for p in (many, few)}
    last = int(ms.index.get_level_values("num_tokens").max())
    return Prose(
        f"At T={tokens}, grouped_mm was {over[many, tokens]:.1f}× faster than eager on {many} ({pairs[many]} pairs "
        f"over {experts[many]} experts, about {pairs[many] // experts[many]} rows each) and {over[few, tokens]:.2f}× "
        f"on {few} ({pairs[few]} pairs over {experts[few]} experts, about {pairs[few] // experts[few]} rows each): on "
        f"{few} it saved {1 - 1 / over[few, tokens]:.0%} of eager's time, and {1 - 1 / over[few, last]:.0%} at "
        f"T={last}."
    )
