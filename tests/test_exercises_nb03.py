"""Notebook 03's exercise check: the bytes batched_mm gathers for a preset at T tokens."""
import torch

from moe_lab import get_preset, predict_gather_bytes
from moe_lab.exercises.nb03_bmm import NUM_TOKENS, PRESET, check_gather_bytes

CONFIG = get_preset(PRESET).config
T, K, E, H, I = NUM_TOKENS, CONFIG.top_k, CONFIG.num_experts, CONFIG.hidden_size, CONFIG.intermediate_size
RIGHT = T * K * 3 * H * I * 2  # bfloat16


def test_correct_answer_passes():
    assert RIGHT == predict_gather_bytes(T, K, H, I, torch.bfloat16)
    assert check_gather_bytes(RIGHT)
    assert check_gather_bytes(torch.tensor(RIGHT))
    assert check_gather_bytes(predict_gather_bytes(8, 2, 4096, 14336, torch.float32), "mixtral-8x7b", 8,
                              dtype="float32")


def test_forgot_top_k():
    result = check_gather_bytes(RIGHT // K)
    assert not result and "left out top_k" in result.message


def test_forgot_the_factor_three():
    result = check_gather_bytes(T * K * 2 * H * I * 2)
    assert not result and "factor 3" in result.message and "down_proj" in result.message
    result = check_gather_bytes(T * K * H * I * 2)
    assert not result and "factor 3" in result.message


def test_dtype_size():
    result = check_gather_bytes(RIGHT // 2)
    assert not result and "elements, not bytes" in result.message
    result = check_gather_bytes(RIGHT * 2)  # float32's 4 bytes
    assert not result and "4 bytes per element" in result.message and "bfloat16 has 2" in result.message


def test_several_slips_and_other_answers():
    result = check_gather_bytes(T * 3 * H * I)  # no top_k, elements
    assert not result and "left out top_k" in result.message and "elements, not bytes" in result.message
    result = check_gather_bytes(T * E * 3 * H * I * 2)
    assert not result and "num_experts" in result.message
    assert "replace" in check_gather_bytes(None).message
    assert "GiB" in check_gather_bytes(round(RIGHT / 2**30, 1)).message
    assert "factor of" in check_gather_bytes(12345).message
    assert "number of bytes" in check_gather_bytes("a lot").message
