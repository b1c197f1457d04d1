"""Notebook 00's exercise check: expert parameters of a preset layer, all and per token."""
import pytest

import moe_lab
from moe_lab.exercises.nb00_start_here import check_expert_parameters


def shape(preset):
    c = moe_lab.get_preset(preset).config
    return c.hidden_size, c.intermediate_size, c.num_experts, c.top_k


@pytest.mark.parametrize("preset", sorted(moe_lab.PRESETS))
def test_correct_answer_passes(preset):
    H, I, E, k = shape(preset)
    result = check_expert_parameters(preset, E * 3 * H * I, k * 3 * H * I)
    assert result and f"{E * 3 * H * I:,}" in result.message
    assert E * 3 * H * I == moe_lab.get_preset(preset).config.expert_parameter_count()


def test_missing_down_proj():
    H, I, E, k = shape("qwen3-30b-a3b")
    result = check_expert_parameters("qwen3-30b-a3b", E * 2 * H * I, k * 3 * H * I)
    assert not result and "two of each expert's three matrices" in result.message


def test_active_counts_every_expert():
    H, I, E, k = shape("qwen3-30b-a3b")
    result = check_expert_parameters("qwen3-30b-a3b", E * 3 * H * I, E * 3 * H * I)
    assert not result and "one token runs only its top_k=8 experts" in result.message


def test_shared_expert_included():
    H, I, E, k = shape("qwen1.5-moe-a2.7b")
    shared = moe_lab.get_preset("qwen1.5-moe-a2.7b").config.shared_expert_intermediate_size
    result = check_expert_parameters("qwen1.5-moe-a2.7b", E * 3 * H * I + 3 * H * shared, k * 3 * H * I)
    assert not result and "includes the shared expert" in result.message


def test_unanswered_does_not_raise():
    result = check_expert_parameters("mixtral-8x7b", None, 1.5)
    assert not result and "still None" in result.message and "whole number" in result.message
