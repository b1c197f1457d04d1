"""moe_lab.plots.diagrams: the pictures draw what the routing implies, and need no image files."""
import plotly.graph_objects as go
import pytest
import torch

from moe_lab.plots.diagrams import (PATHS, cuda_graph_figure, fused_kernels_figure, gather_figure,
                                    grouped_tiles_figure, tiles_of)

ROUTING = torch.tensor([[2, 4], [5, 0], [5, 0], [4, 2], [0, 5]])  # experts 1 and 3 get nothing


def texts(fig):
    return [a.text for a in fig.layout.annotations]


def test_gather_draws_one_copy_per_pair_and_none_for_unpicked_experts():
    fig = gather_figure(ROUTING, 6)
    copies = [t for t in texts(fig) if t.startswith("copy of")]
    assert len(copies) == ROUTING.numel()
    assert sorted(int(t.split()[2].rstrip(":")) for t in copies) == sorted(ROUTING.reshape(-1).tolist())
    assert "copies per expert [3, 0, 2, 0, 2, 3]" in fig.layout.title.text


def test_tiles_cover_each_group_and_mask_the_rest():
    tiles = tiles_of(ROUTING, 6, tile_rows=2, column_blocks=1)
    # expert 0: 3 rows -> 2 tiles (2 + 1), experts 2 and 4: 2 rows -> 1 tile, expert 5: 3 rows -> 2 tiles
    assert [(t["expert"], t["rows"]) for t in tiles] == [(0, 2), (0, 1), (2, 2), (4, 2), (5, 2), (5, 1)]
    assert sum(t["rows"] for t in tiles) == ROUTING.numel()
    fig = grouped_tiles_figure(ROUTING, 6, tile_rows=4, column_blocks=3)
    assert sum(t.startswith("tile ") for t in texts(fig)) == 4 * 3  # one row tile per group, 3 column blocks
    assert "experts [1, 3] have no rows and no tile" in fig.layout.title.text
    assert "(6 per column block)" in fig.layout.title.text  # 1 + 2 + 2 + 1 masked rows


def test_fused_kernels_counts_kernels_per_path():
    fig = fused_kernels_figure()
    labels = " ".join(texts(fig))
    assert "triton (decode)</b><br>2 kernels" in labels and "triton (sorted)</b><br>4 kernels" in labels
    assert f"≥ {len(PATHS['grouped_mm'])} kernels" in labels


def test_cuda_graph_draws_one_replay_against_one_launch_per_kernel():
    fig = cuda_graph_figure(num_kernels=5)
    labels = texts(fig)
    assert sum(t.startswith("launch ") for t in labels) == 5 and labels.count("replay") == 1
    assert sum(t.startswith("k") and t[1:].isdigit() for t in labels) == 10  # the kernels, in both timelines


@pytest.mark.parametrize("fig", [gather_figure(ROUTING, 6), grouped_tiles_figure(ROUTING, 6), fused_kernels_figure(),
                                 cuda_graph_figure()], ids=["gather", "tiles", "fused", "graph"])
def test_pictures_are_self_contained_plotly_figures(fig):
    assert isinstance(fig, go.Figure)
    html = fig.to_html(include_plotlyjs=False)
    assert "<img" not in html and "http" not in fig.to_json().replace("https://plot.ly", "")
