"""Pictures of how the backends move data: drawn as plotly shapes from the routing they explain.

Each function returns a `plotly.graph_objects.Figure` made of rectangles, arrows and labels, so it
renders in JupyterLab and in `make html`'s offline pages (plotly.js is embedded there) without image
files, and a test can count what it drew. The pictures are schematic: sizes are not to scale and
nothing in them is a measurement.

    gather_figure(top_k_index, E)        batched_mm: one weight copy per (token, expert) pair (notebook 03)
    grouped_tiles_figure(top_k_index, E) grouped GEMM: tiles over the rows sorted by expert (notebook 04)
    fused_kernels_figure()               grouped_mm's kernels against triton's fused ones (notebook 04)
    cuda_graph_figure()                  launched kernel by kernel against replayed from a CUDA graph (04, 05)
"""
from __future__ import annotations

import math

import plotly.colors as pcolors
import plotly.graph_objects as go
import torch

GREY, DARK, LIGHT = "#9e9e9e", "#424242", "#eeeeee"


def expert_colors(num_experts: int) -> list[str]:
    """One colour per expert (the same palette as notebook 04's permutation figure)."""
    palette = pcolors.qualitative.Plotly + pcolors.qualitative.D3
    return [palette[e % len(palette)] for e in range(num_experts)]


def _box(fig, x0, y0, x1, y1, color, text="", *, font=11, text_color="white", dash=None, name=None):
    fig.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, fillcolor=color, line=dict(color="white", width=1, dash=dash),
                  layer="below", name=name)
    if text:
        fig.add_annotation(x=(x0 + x1) / 2, y=(y0 + y1) / 2, text=text, showarrow=False,
                           font=dict(size=font, color=text_color))


def _arrow(fig, x0, y0, x1, y1, color=GREY):
    fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                       arrowhead=2, arrowsize=1, arrowwidth=1.2, arrowcolor=color, text="")


def _canvas(fig, title, width_units, height_units, height_px):
    fig.update_layout(title=title, template="plotly_white", height=height_px, showlegend=False,
                      margin=dict(l=10, r=10, t=60, b=10), plot_bgcolor="white")
    fig.update_xaxes(visible=False, range=[-0.5, width_units + 0.5])
    fig.update_yaxes(visible=False, range=[-0.5, height_units + 0.5], scaleanchor=None)
    return fig


def gather_figure(top_k_index: torch.Tensor, num_experts: int) -> go.Figure:
    """batched_mm's gather: the E expert weight blocks on the left, the S = T·k copies it makes on
    the right (one per pair, in (token, slot) order), an arrow from each expert to each of its copies.
    An expert picked by n pairs is copied n times; an expert nobody picked is not copied at all."""
    experts_of_pairs = top_k_index.reshape(-1).tolist()
    top_k = top_k_index.shape[1]
    S, colors = len(experts_of_pairs), expert_colors(num_experts)
    height = max(S, num_experts)
    fig = go.Figure()
    expert_y = {}
    for e in range(num_experts):
        y = height - (e + 0.5) * height / num_experts
        expert_y[e] = y
        _box(fig, 0, y - 0.4, 2, y + 0.4, colors[e], f"expert {e}")
    for p, e in enumerate(experts_of_pairs):
        y = height - (p + 0.5) * height / S
        _box(fig, 6, y - 0.4, 8, y + 0.4, colors[e], f"copy of {e}: t{p // top_k}")
        _arrow(fig, 2, expert_y[e], 6, y, colors[e])
    counts = [experts_of_pairs.count(e) for e in range(num_experts)]
    fig.add_annotation(x=1, y=height + 0.3, text="<b>gate_up_proj [E, 2I, H]</b> (read)", showarrow=False)
    fig.add_annotation(x=7, y=height + 0.3, text="<b>gathered [S, 2I, H]</b> (written)", showarrow=False)
    title = (f"batched_mm gathers one weight copy per (token, expert) pair: S = T·k = {S} copies of {num_experts} "
             f"experts<br><sup>copies per expert {counts}; the same happens again for down_proj</sup>")
    return _canvas(fig, title, 8, height + 0.5, 80 + 28 * height)


def tiles_of(top_k_index: torch.Tensor, num_experts: int, tile_rows: int, column_blocks: int) -> list[dict]:
    """The output tiles a grouped GEMM runs: for each expert with rows, ceil(rows / tile_rows) row
    tiles x `column_blocks` column tiles; each dict has expert, first row, rows used, column block."""
    counts = torch.bincount(top_k_index.reshape(-1).cpu(), minlength=num_experts).tolist()
    tiles, start = [], 0
    for e, n in enumerate(counts):
        for first in range(start, start + n, tile_rows):
            for block in range(column_blocks):
                tiles.append({"expert": e, "row": first, "rows": min(tile_rows, start + n - first), "block": block})
        start += n
    return tiles


def grouped_tiles_figure(top_k_index: torch.Tensor, num_experts: int, *, tile_rows: int = 4,
                         column_blocks: int = 3) -> go.Figure:
    """A grouped GEMM's output [S, N] over the rows sorted by expert: each group is cut into tiles of
    `tile_rows` rows x one column block; every tile multiplies its rows by its own expert's weights,
    and all tiles of all groups are scheduled together across the GPU. A group's last tile is often
    partly empty (hatched): that is the grouped GEMM's padding. An expert without rows has no tile."""
    tiles = tiles_of(top_k_index, num_experts, tile_rows, column_blocks)
    counts = torch.bincount(top_k_index.reshape(-1).cpu(), minlength=num_experts).tolist()
    S, colors = sum(counts), expert_colors(num_experts)
    rows_drawn = max(S, sum(math.ceil(n / tile_rows) * tile_rows for n in counts))
    fig = go.Figure()
    start, y, wasted, number = 0, rows_drawn, 0, 0
    for e, n in enumerate(counts):  # left: the sorted rows, contiguous; right: each group's tiles
        if not n:
            continue
        row_top = rows_drawn - start
        _box(fig, 0, row_top - n, 1.6, row_top, colors[e], f"e{e}: rows {start}–{start + n - 1}", font=9)
        group_top = y
        for first in range(0, n, tile_rows):
            used = min(tile_rows, n - first)
            for block in range(column_blocks):
                x0 = 3 + block * 2.2
                _box(fig, x0, y - used, x0 + 2, y, colors[e], f"tile {number}", font=9)
                if used < tile_rows:
                    _box(fig, x0, y - tile_rows, x0 + 2, y - used, LIGHT, "masked", font=8, text_color=GREY, dash="dot")
                number += 1
            wasted += tile_rows - used
            y -= tile_rows
        _arrow(fig, 1.6, row_top - n / 2, 3, (group_top + y) / 2, colors[e])
        start += n
    empty = [e for e, n in enumerate(counts) if n == 0]
    fig.add_annotation(x=0.8, y=rows_drawn + 0.6, text="<b>sorted rows [S, H]</b>", showarrow=False)
    fig.add_annotation(x=3 + column_blocks * 1.1, y=rows_drawn + 0.6, text="<b>output tiles [S, N]</b>",
                       showarrow=False)
    title = (f"Grouped GEMM: {len(tiles)} tiles of {tile_rows} rows x 1 column block over S={S} rows sorted by expert"
             f"<br><sup>tokens per expert {counts}; the last tile of a group masks the rows past its end "
             f"({wasted} per column block)" + (f"; experts {empty} have no rows and no tile" if empty else "")
             + "</sup>")
    return _canvas(fig, title, 3 + column_blocks * 2.2, rows_drawn + 1, 90 + 22 * rows_drawn)


#: The steps of one experts forward on each path, and which kernel runs them (a step's group).
PATHS = {
    "grouped_mm": [("sort pairs by expert", 0), ("count + int32 offsets", 1), ("gather x into sorted rows", 2),
                   ("grouped GEMM gate_up", 3), ("act(gate)·up", 4), ("grouped GEMM down", 5),
                   ("× routing weight", 6), ("un-permute", 7), ("sum k rows per token", 8)],
    "triton (sorted)": [("sort pairs by expert", 0), ("count per expert", 0), ("gather x rows", 1),
                        ("GEMM gate_up", 1), ("act(gate)·up", 1), ("GEMM down", 2), ("× routing weight", 2),
                        ("store at (token, slot)", 2), ("sum k rows per token", 3)],
    "triton (decode)": [("GEMV gate_up per (pair, block)", 0), ("act(gate)·up", 0), ("GEMV down", 1),
                        ("× routing weight", 1), ("sum k in registers", 1)],
}


def fused_kernels_figure(paths: dict | None = None) -> go.Figure:
    """One row per path, one box per step; boxes of one colour run in one kernel. grouped_mm runs each
    step as one kernel or more (writing its result to memory and reading it back in the next);
    triton's sorted path sorts and counts in one kernel (up to 2048 pairs; above that a counting sort over
    blocks of pairs in two), fuses the gather and the activation into the gate_up kernel and the
    weighting and un-permute into the down kernel; its decode path skips the sort: two GEMV kernels."""
    paths = paths or PATHS
    palette = pcolors.qualitative.Pastel
    fig = go.Figure()
    width = max(len(steps) for steps in paths.values())
    for row, (name, steps) in enumerate(paths.items()):
        y = (len(paths) - 1 - row) * 2
        kernels = len({k for _, k in steps})
        count = f"{kernels} steps, ≥ {kernels} kernels" if kernels == len(steps) else f"{kernels} kernels"
        fig.add_annotation(x=-0.1, y=y + 0.5, text=f"<b>{name}</b><br>{count}", showarrow=False, xanchor="right",
                           font=dict(size=11))
        for position, (step, kernel) in enumerate(steps):
            _box(fig, position * 1.55, y, position * 1.55 + 1.45, y + 1, palette[kernel % len(palette)],
                 step.replace(" ", "<br>", 1), font=9, text_color=DARK)
    title = ("One experts forward, step by step: a colour is one kernel"
             "<br><sup>each kernel boundary writes its result to memory and the next kernel reads it back</sup>")
    fig = _canvas(fig, title, width * 1.55, len(paths) * 2 - 1, 110 + 75 * len(paths))
    fig.update_xaxes(range=[-2.6, width * 1.55])
    return fig


def cuda_graph_figure(num_kernels: int = 6) -> go.Figure:
    """Two timelines of the same `num_kernels` kernels. Launched from Python, the CPU issues each
    launch in turn and a short kernel finishes before the next launch arrives, so the GPU idles
    between kernels. Replayed from a CUDA graph, the CPU issues one replay and the GPU runs the
    kernels back to back. (Schematic: the gaps are not to scale.)"""
    fig = go.Figure()
    launch, kernel = 1.0, 0.6
    lanes = {"CPU, launched": 4.5, "GPU, launched": 3.3, "CPU, replayed": 1.5, "GPU, replayed": 0.3}
    for name, y in lanes.items():
        fig.add_annotation(x=-0.2, y=y + 0.4, text=f"<b>{name}</b>", showarrow=False, xanchor="right")
    for k in range(num_kernels):
        x = k * launch
        _box(fig, x, lanes["CPU, launched"], x + launch * 0.9, lanes["CPU, launched"] + 0.8, GREY, f"launch {k + 1}",
             font=9)
        _box(fig, x + launch * 0.9, lanes["GPU, launched"], x + launch * 0.9 + kernel, lanes["GPU, launched"] + 0.8,
             expert_colors(num_kernels)[k], f"k{k + 1}", font=9)
        _box(fig, 1.0 + k * kernel, lanes["GPU, replayed"], 1.0 + (k + 1) * kernel, lanes["GPU, replayed"] + 0.8,
             expert_colors(num_kernels)[k], f"k{k + 1}", font=9)
    _box(fig, 0, lanes["CPU, replayed"], 0.9, lanes["CPU, replayed"] + 0.8, DARK, "replay", font=9)
    end_launched, end_replayed = (num_kernels - 1) * launch + launch * 0.9 + kernel, 1.0 + num_kernels * kernel
    fig.add_annotation(x=end_launched, y=lanes["GPU, launched"] + 0.4, text="  done", showarrow=False,
                       xanchor="left")
    fig.add_annotation(x=end_replayed, y=lanes["GPU, replayed"] + 0.4, text="  done", showarrow=False,
                       xanchor="left")
    title = (f"The same {num_kernels} kernels, launched one by one from Python vs replayed from a CUDA graph"
             "<br><sup>schematic: a decode step's kernels are short, so launch time, not GPU time, sets the pace</sup>")
    fig = _canvas(fig, title, end_launched + 1, 5.5, 330)
    fig.update_xaxes(range=[-2.2, end_launched + 1.2])
    return fig


def expert_parallel_figure(send_matrix, experts_per_rank: int) -> go.Figure:
    """Dispatch and combine over `world` ranks: each rank twice, on the left with its tokens (the pairs it
    sends) and on the right with its block of experts (the pairs it receives); an arrow from s to d for
    every non-empty entry of send_matrix [world, world], labelled with its rows. The combine runs the
    same arrows backwards: each row returns to the rank that sent it, which does the weighted sum."""
    matrix = [[int(n) for n in row] for row in send_matrix]
    world = len(matrix)
    colors = expert_colors(world)
    height = 2 * world
    fig = go.Figure()
    y_of = [height - 2 * r - 1.5 for r in range(world)]
    for r in range(world):
        sent, received = sum(matrix[r]), sum(row[r] for row in matrix)
        first = r * experts_per_rank
        _box(fig, 0, y_of[r], 2.4, y_of[r] + 1, colors[r], f"rank {r}: tokens<br>{sent} pairs out")
        _box(fig, 7.6, y_of[r], 10, y_of[r] + 1, colors[r],
             f"rank {r}: experts {first}–{first + experts_per_rank - 1}<br>{received} pairs in")
    for s in range(world):
        for d in range(world):
            if matrix[s][d]:
                y0, y1 = y_of[s] + 0.5 + 0.08 * (d - world / 2), y_of[d] + 0.5 + 0.08 * (s - world / 2)
                _arrow(fig, 2.4, y0, 7.6, y1, colors[s])
                fig.add_annotation(x=3.3 + 0.35 * d, y=y0 + (y1 - y0) * (0.9 + 0.35 * d) / 5.2, text=str(matrix[s][d]),
                                   showarrow=False, font=dict(size=10, color=colors[s]), bgcolor="white")
    fig.add_annotation(x=1.2, y=height + 0.2, text="<b>dispatch: rows out</b>", showarrow=False)
    fig.add_annotation(x=8.8, y=height + 0.2, text="<b>local experts</b>", showarrow=False)
    total = sum(map(sum, matrix))
    own = sum(matrix[r][r] for r in range(world))
    title = (f"Expert parallelism over {world} ranks: {total} (token, expert) rows, {total - own} of them cross to "
             f"another rank<br><sup>combine: the same arrows backwards; each rank then sums its tokens' k rows, "
             f"weighted</sup>")
    return _canvas(fig, title, 10, height + 0.5, 120 + 70 * world)
