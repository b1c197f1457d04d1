"""The expert-parallel layer equals the single-process layer: outputs and every gradient, on 2, 3, 4
and 8 gloo ranks on CPU, with ranks that receive nothing, ranks that send nothing and skewed routing.

Each case runs `moe_lab.parallel.checks.check_against_reference` on every rank (run_on_ranks): the
rank rebuilds the whole batch from seeds, computes the float64 reference for all ranks' tokens, and
reports the relative error of its own output and gradients (hidden states, routing weights, and its
block of both weight tensors) against its share of the reference.
"""
import pytest
import torch

from ep_cases import assert_close as _assert_close, run_case as _run, small_config as _config
from moe_lab.parallel.checks import EPCase

# Backends that give gradients on a CPU, cheap enough for a test (triton runs interpreted: slow).
BACKENDS = ("eager", "batched_mm", "grouped_mm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size,num_experts", [(2, 8), (3, 6), (4, 8)])
def test_outputs_and_gradients_equal_single_process(world_size, num_experts, backend):
    case = EPCase(_config(num_experts), tokens_per_rank=tuple(5 + 2 * r for r in range(world_size)), backend=backend)
    _assert_close(_run(case), torch.float32)


def test_float64_matches_to_float64_precision():
    # The dispatch only moves rows and the combine is the backends' own weighted sum: nothing is lost.
    case = EPCase(_config(dtype=torch.float64), tokens_per_rank=(6, 9), backend="grouped_mm")
    _assert_close(_run(case), torch.float64)


def test_bfloat16_within_its_tolerance():
    case = EPCase(_config(dtype=torch.bfloat16), tokens_per_rank=(16, 16), backend="grouped_mm")
    _assert_close(_run(case), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_that_receive_no_tokens(backend):
    # "single": every token picks experts 0 and 1, both on rank 0: ranks 1..3 receive nothing and must
    # still join every all-to-all, forward and backward (a rank that skipped one would hang the others).
    case = EPCase(_config(), tokens_per_rank=(4, 3, 5, 2), distribution="single", backend=backend)
    results = _run(case)
    assert [r["pairs_received"] for r in results] == [28, 0, 0, 0]
    _assert_close(results, torch.float32)
    for result in results[1:]:
        assert result["gate_up_proj_grad_error"] == 0.0 and result["down_proj_grad_error"] == 0.0


def test_ranks_that_send_no_tokens():
    case = EPCase(_config(), tokens_per_rank=(0, 7, 0, 4), backend="grouped_mm")
    results = _run(case)
    assert results[0]["tokens"] == 0 and results[2]["tokens"] == 0
    _assert_close(results, torch.float32)


def test_skewed_routing_sends_most_tokens_to_one_rank():
    case = EPCase(_config(), tokens_per_rank=(24, 24), distribution="zipf", skew=3.0, backend="grouped_mm")
    results = _run(case)
    received = [r["pairs_received"] for r in results]
    assert received[0] > 0.85 * sum(received), received
    _assert_close(results, torch.float32)


def test_one_rank_is_the_single_process_layer():
    _assert_close(_run(EPCase(_config(), tokens_per_rank=(9,), backend="grouped_mm")), torch.float32)


def test_more_ranks_than_top_k_and_one_expert_per_rank():
    # E=8 over 8 ranks: each rank holds one expert, each token visits 2 of the 8 ranks (issue 17's 8-rank check).
    case = EPCase(_config(), tokens_per_rank=(3, 4, 0, 5, 2, 3, 1, 4), distribution="zipf", skew=1.0,
                  backend="grouped_mm")
    _assert_close(_run(case), torch.float32)


def test_top_k_larger_than_experts_per_rank():
    # k=4 > E/world=2: a token sends up to two pairs to one rank.
    case = EPCase(_config(num_experts=8, top_k=4), tokens_per_rank=(6, 5, 7, 3), backend="eager")
    _assert_close(_run(case), torch.float32)
