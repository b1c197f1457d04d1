"""The sync-free padded layer: equal to the exact layer, its byte cost, and overflow that is counted, never silent."""
import pytest
import torch

import moe_lab
from moe_lab.errors import CapacityOverflowError, ConfigError
from moe_lab.lessons.tolerances import reference_tolerance
from moe_lab.parallel import run_on_ranks
from moe_lab.parallel.checks import EPCase, check_against_reference, compare_variants
from moe_lab.parallel.padded import dispatch_bytes, worst_case_capacity

ERRORS = ("output_error", "hidden_states_grad_error", "top_k_weights_grad_error", "gate_up_proj_grad_error",
          "down_proj_grad_error")


def _config(num_experts=8, top_k=2, dtype=torch.float32):
    return moe_lab.MoEConfig(32, 16, num_experts=num_experts, top_k=top_k, dtype=dtype)


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "single"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_padded_equals_the_reference(world_size, distribution):
    case = EPCase(_config(), tokens_per_rank=(6,) * world_size, distribution=distribution, skew=2.0,
                  variant="padded")
    for result in run_on_ranks(check_against_reference, world_size, case):
        assert result["dropped_pairs"] == 0
        for name in ERRORS:
            assert result[name] <= reference_tolerance(torch.float32), (result["rank"], name, result[name])


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_padded_equals_exact(backend):
    case = EPCase(_config(), tokens_per_rank=(7, 2, 0, 5), distribution="zipf", skew=1.5, backend=backend)
    for result in run_on_ranks(compare_variants, 4, case):
        assert result["max_difference"] <= reference_tolerance(torch.float32)


def test_overflow_is_counted_and_the_kept_pairs_are_exact():
    # "single": each rank's 8 tokens send 16 pairs, all to rank 0 (experts 0 and 1); capacity 5 keeps 5.
    case = EPCase(_config(), tokens_per_rank=(8, 8), distribution="single", variant="padded", capacity=5)
    results = run_on_ranks(check_against_reference, 2, case)
    assert [r["dropped_pairs"] for r in results] == [11, 11]
    assert all(r["output_error"] > 0.1 for r in results)  # dropped pairs change the output: not hidden


def _overflowing_layer_raises():
    import torch.distributed as dist
    from moe_lab.parallel.padded import PaddedExpertParallelExperts

    layer = PaddedExpertParallelExperts(_config(), tokens_per_rank=4, capacity=1)
    index = torch.zeros(4, 2, dtype=torch.int64)
    index[:, 1] = 1
    layer(torch.randn(4, 32), index, torch.full((4, 2), 0.5))
    try:
        layer.check_no_overflow()
    except CapacityOverflowError as error:
        return dist.get_rank(), str(error)
    return dist.get_rank(), None


def test_check_no_overflow_raises_with_the_count():
    for rank, message in run_on_ranks(_overflowing_layer_raises, 2):
        assert message is not None and "dropped 7 (token, expert) pairs" in message and "capacity=1" in message


def test_worst_case_capacity_counts_distinct_experts_per_rank():
    assert worst_case_capacity(tokens_per_rank=10, top_k=8, experts_per_rank=128) == 80
    assert worst_case_capacity(tokens_per_rank=10, top_k=8, experts_per_rank=2) == 20  # at most 2 of 8 per rank


def test_dispatch_bytes_compares_padded_and_exact():
    config = moe_lab.get_preset("deepseek-v3").config.replace(dtype=torch.bfloat16)
    cost = dispatch_bytes(config, tokens_per_rank=128, world_size=8)
    H, k = 7168, 8
    assert cost.capacity == 128 * 8
    assert cost.exact_bytes == 2 * 128 * k * H * 2
    assert cost.padded_bytes == 2 * 8 * 1024 * H * 2
    assert cost.padded_over_exact == pytest.approx(8.0)
    assert cost.padded_expert_rows == 8 * 1024 and cost.exact_expert_rows == 1024
    smaller = dispatch_bytes(config, tokens_per_rank=128, world_size=8, capacity=256)
    assert smaller.padded_over_exact == pytest.approx(2.0)


def test_bad_capacity_and_token_counts_are_refused():
    def build(**kwargs):
        from moe_lab.parallel.padded import PaddedExpertParallelExperts
        return PaddedExpertParallelExperts(_config(), **kwargs)

    with pytest.raises(RuntimeError, match="init_process_group"):
        build(tokens_per_rank=4)
    with pytest.raises(ConfigError):
        dispatch_bytes(_config(), 4, world_size=3)
