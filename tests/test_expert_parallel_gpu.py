"""The expert-parallel layer on NCCL, one GPU per rank: outputs and gradients against the float64
reference, the padded layer replayed from a CUDA graph, the chunked forward. Needs 2 GPUs
(`pytest tests/test_expert_parallel_gpu.py` on a multi-GPU machine); skipped elsewhere with the reason."""
import pytest
import torch

import moe_lab
from moe_lab.lessons.tolerances import reference_tolerance
from moe_lab.parallel import run_on_ranks
from moe_lab.parallel.checks import (
    EPCase, check_against_reference, compare_pipelined, compare_variants, replay_padded_from_cuda_graph,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason=f"NCCL expert parallelism needs 2 GPUs; this machine has {torch.cuda.device_count()}"),
]
ERRORS = ("output_error", "hidden_states_grad_error", "top_k_weights_grad_error", "gate_up_proj_grad_error",
          "down_proj_grad_error")


def _config(dtype):
    return moe_lab.MoEConfig(256, 128, num_experts=16, top_k=4, dtype=dtype)


def _nccl(fn, *args):
    return run_on_ranks(fn, 2, *args, backend="nccl", timeout_s=180)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("distribution", ["uniform", "zipf", "single"])
def test_outputs_and_gradients_on_nccl(dtype, distribution):
    case = EPCase(_config(dtype), tokens_per_rank=(96, 64), distribution=distribution, skew=2.0, device="cuda")
    for result in _nccl(check_against_reference, case):
        for name in ERRORS:
            assert result[name] <= reference_tolerance(dtype), (result["rank"], name, result[name])


def test_padded_equals_exact_on_nccl():
    case = EPCase(_config(torch.float32), tokens_per_rank=(64, 64), distribution="zipf", device="cuda")
    for result in _nccl(compare_variants, case):
        assert result["max_difference"] <= reference_tolerance(torch.float32)


def test_padded_layer_replays_from_a_cuda_graph():
    case = EPCase(_config(torch.bfloat16), tokens_per_rank=(32, 32), device="cuda", backward=False)
    for result in _nccl(replay_padded_from_cuda_graph, case):
        assert result["replay_vs_eager"] <= reference_tolerance(torch.bfloat16)
        assert result["output_error"] <= reference_tolerance(torch.bfloat16)


@pytest.mark.parametrize("chunks", [2, 4])
def test_chunked_forward_on_nccl(chunks):
    case = EPCase(_config(torch.bfloat16), tokens_per_rank=(256, 256), device="cuda", backward=False)
    for result in _nccl(compare_pipelined, case, chunks):
        assert result["difference"] <= reference_tolerance(torch.bfloat16)
