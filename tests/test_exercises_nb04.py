"""Notebook 04's exercise check (int32 group offsets) and its permutation figure."""
import torch

from moe_lab import synthetic_routing, tokens_per_expert
from moe_lab.exercises.nb04_grouped import check_offsets, exercise_routing
from moe_lab.lessons.nb04_grouped import permutation_figure

INDEX, E = exercise_routing()
RIGHT = torch.cumsum(tokens_per_expert(INDEX, E), 0, dtype=torch.int32)


def test_correct_answer_passes():
    assert RIGHT.tolist() == [2, 4, 4, 7, 7, 8]
    assert check_offsets(RIGHT)
    assert check_offsets(torch.tensor([2, 4, 4, 7, 7, 8], dtype=torch.int32))
    index, _ = synthetic_routing(5, 6, 2, seed=0)
    assert check_offsets(torch.tensor([3, 3, 5, 5, 7, 10], dtype=torch.int32), index, 6)


def test_wrong_dtype():
    result = check_offsets(RIGHT.long())
    assert not result and "int32" in result.message and "int64" in result.message
    result = check_offsets([2, 4, 4, 7, 7, 8])
    assert not result and "values [2, 4, 4, 7, 7, 8] are right" in result.message
    assert "integers" in check_offsets(RIGHT.float()).message


def test_off_by_one():
    result = check_offsets(torch.tensor([0, 2, 4, 4, 7, 7], dtype=torch.int32))
    assert not result and "off by one" in result.message and "END" in result.message
    result = check_offsets(torch.tensor([0, 2, 4, 4, 7, 7, 8], dtype=torch.int32))
    assert not result and "leading 0" in result.message


def test_missing_empty_experts():
    result = check_offsets(torch.tensor([2, 4, 7, 8], dtype=torch.int32))
    assert not result and "[2, 4]" in result.message and "empty group" in result.message


def test_other_wrong_answers():
    assert "running sum" in check_offsets(torch.tensor([2, 2, 0, 3, 0, 1], dtype=torch.int32)).message
    assert "replace" in check_offsets(None).message
    assert "last offset" in check_offsets(torch.tensor([2, 4, 4, 7, 7, 9], dtype=torch.int32)).message
    assert "entry 1" in check_offsets(torch.tensor([2, 3, 4, 7, 7, 8], dtype=torch.int32)).message
    assert "E=6 entries" in check_offsets(torch.tensor([2, 4, 8], dtype=torch.int32)).message


def test_permutation_figure():
    index, _ = synthetic_routing(5, 6, 2, seed=0)
    fig = permutation_figure(index, 6)
    markers = [t for t in fig.data if t.mode == "markers+text"]
    assert len(markers) == 6  # one trace per expert, empty ones included
    assert sum(len(t.x) for t in markers) == 2 * 10  # every pair before and after
    assert len(fig.layout.shapes) == 4 and "experts [1, 3] have no tokens" in fig.layout.title.text
    after = sorted((x, t.name) for t in markers for x, y in zip(t.x, t.y) if y == 0)
    assert [name for _, name in after][:3] == ["expert 0"] * 3  # sorted by expert
