import pytest
import torch

import moe_lab
from moe_lab import ConfigError, MoEConfig


def test_valid_config_and_dtype_names():
    cfg = MoEConfig(64, 32, num_experts=8, top_k=2, dtype="bf16")
    assert cfg.dtype is torch.bfloat16
    assert cfg.expert_parameter_count() == 8 * 3 * 64 * 32
    assert cfg.replace(top_k=8).top_k == 8
    assert not cfg.has_shared_expert and cfg.replace(shared_expert_intermediate_size=16).has_shared_expert


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(top_k=9), r"top_k=9 must be between 1 and num_experts=8"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(hidden_size=-1), "hidden_size must be a positive integer, got -1"),
        (dict(intermediate_size=2.5), "intermediate_size must be a positive integer"),
        (dict(num_experts=True), "num_experts must be a positive integer"),
        (dict(activation="swish"), r"unknown activation 'swish'; allowed: \['gelu', 'gelu_tanh', 'relu', 'silu'\]"),
        (dict(router_score="tanh"), r"allowed: \['softmax', 'sigmoid'\]"),
        (dict(shared_expert_intermediate_size=-4), "0 = no shared expert"),
        (dict(dtype="int8"), "unknown dtype 'int8'"),
        (dict(dtype=torch.int32), "not supported"),
    ],
)
def test_invalid_config_says_what_is_allowed(fields, message):
    base = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2)
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**(base | fields))


def test_presets_carry_real_shapes_and_sources():
    assert set(moe_lab.PRESETS) == {
        "mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v3", "gpt-oss-20b"}
    qwen3 = moe_lab.get_preset("qwen3-30b-a3b").config
    assert (qwen3.hidden_size, qwen3.intermediate_size, qwen3.num_experts, qwen3.top_k) == (2048, 768, 128, 8)
    mixtral = moe_lab.get_preset("mixtral-8x7b").config
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_experts, mixtral.top_k) == (4096, 14336, 8, 2)
    deepseek = moe_lab.get_preset("deepseek-v3").config
    assert deepseek.router_score == "sigmoid" and deepseek.num_experts == 256
    for preset in moe_lab.PRESETS.values():
        assert preset.source.endswith("config.json") and preset.config.dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="available: .*'deepseek-v3'"):
        moe_lab.get_preset("llama")


@pytest.mark.parametrize("name", sorted(moe_lab.PRESETS))
def test_scale_down_keeps_ratios_and_alignment(name):
    big = moe_lab.get_preset(name).config
    small = moe_lab.scale_down(name, hidden_size=64)
    assert (small.num_experts, small.top_k, small.router_score) == (big.num_experts, big.top_k, big.router_score)
    assert small.hidden_size == 64 and small.dtype is torch.float32
    assert small.intermediate_size % 16 == 0 and small.shared_expert_intermediate_size % 16 == 0
    # I/H kept to within the rounding to a multiple of 16 elements.
    assert abs(small.intermediate_size / 64 - big.intermediate_size / big.hidden_size) <= 8 / 64 + 1e-9
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert moe_lab.grouped_mm_path("cpu", dtype, small.hidden_size, small.intermediate_size).uses_torch_op


def test_scale_down_overrides_and_rejects_unaligned():
    small = moe_lab.scale_down("mixtral-8x7b", hidden_size=32, top_k=1, dtype="bfloat16")
    assert small.top_k == 1 and small.dtype is torch.bfloat16 and small.intermediate_size == 112
    with pytest.raises(ConfigError, match="multiple of 16"):
        moe_lab.scale_down("mixtral-8x7b", hidden_size=40)
