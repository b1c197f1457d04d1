"""The chunked, overlapped forward computes the same output as the plain expert-parallel forward."""
import pytest
import torch

import moe_lab
from moe_lab.errors import BackendCapabilityError
from moe_lab.lessons.tolerances import reference_tolerance
from moe_lab.parallel import ExpertParallelExperts, run_on_ranks
from moe_lab.parallel.checks import EPCase, compare_pipelined


def _config():
    return moe_lab.MoEConfig(32, 16, num_experts=8, top_k=2)


@pytest.mark.parametrize("variant", ["exact", "dedup"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
@pytest.mark.parametrize("tokens,distribution", [((9, 4), "uniform"), ((6, 0), "zipf"), ((2, 7), "single")])
def test_chunked_equals_plain(chunks, tokens, distribution, variant):
    case = EPCase(_config(), tokens_per_rank=tokens, distribution=distribution, skew=2.0, backward=False,
                  variant=variant)
    for result in run_on_ranks(compare_pipelined, 2, case, chunks):
        assert result["difference"] <= reference_tolerance(torch.float32)
        assert result["output_error"] <= reference_tolerance(torch.float32)


def _refuses(variant):
    from moe_lab.parallel.dedup import DedupExpertParallelExperts
    from moe_lab.parallel.pipelined import pipelined_dedup_forward, pipelined_forward

    layer = (DedupExpertParallelExperts if variant == "dedup" else ExpertParallelExperts)(_config())
    forward = pipelined_dedup_forward if variant == "dedup" else pipelined_forward
    x = torch.randn(4, 32, requires_grad=True)
    index, weights = torch.zeros(4, 2, dtype=torch.int64), torch.full((4, 2), 0.5)
    index[:, 1] = 1
    messages = []
    for call in (lambda: forward(layer, x, index, weights), lambda: forward(layer, x, index, weights, chunks=0)):
        try:
            call()
        except ValueError as error:
            messages.append((type(error).__name__, str(error)))
    return messages


@pytest.mark.parametrize("variant", ["exact", "dedup"])
def test_gradients_and_bad_chunk_counts_are_refused(variant):
    (grad_type, grad_message), (_, chunks_message) = run_on_ranks(_refuses, 2, variant)[0]
    assert grad_type == BackendCapabilityError.__name__ and "torch.no_grad()" in grad_message
    assert "chunks must be a positive integer" in chunks_message
