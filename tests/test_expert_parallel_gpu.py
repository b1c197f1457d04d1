"""The expert-parallel layer on NCCL, one GPU per rank: outputs and gradients against the float64
reference (the exact layer, the one that sends each token once per rank, the all-gather one), padded = exact,
the padded and gathered layers replayed from a CUDA graph (the gathered one plain and chunked, through
grouped_mm and through triton's partial forward), the chunked forwards. Needs 2 GPUs
(`pytest tests/test_expert_parallel_gpu.py` on a multi-GPU machine); skipped elsewhere with the reason.

The checks run in three launches of two NCCL processes (starting them and NCCL costs seconds; one launch of
every check outran 300 s on two H200s): the references with gradients, the other forwards, the CUDA graphs.
A check that raises stops its launch with the traceback (every test of that launch fails with it); a launch
that times out names the check each rank was in."""
import pytest
import torch

import moe_lab
from moe_lab.errors import first_line
from moe_lab.lessons.tolerances import reference_tolerance
from moe_lab.parallel import run_on_ranks
from moe_lab.parallel.launch import report_progress
from moe_lab.parallel.checks import (
    EPCase, check_against_reference, compare_pipelined, compare_variants, replay_from_cuda_graph,
    replay_padded_from_cuda_graph,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason=f"NCCL expert parallelism needs 2 GPUs; this machine has {torch.cuda.device_count()}"),
]
ERRORS = ("output_error", "hidden_states_grad_error", "top_k_weights_grad_error", "gate_up_proj_grad_error",
          "down_proj_grad_error")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DISTRIBUTIONS = ("uniform", "zipf", "single")
VARIANTS = ("exact", "dedup", "gathered")
GATHERED_BACKENDS = ("grouped_mm", "triton")  # triton without gradients: its partial forward (absent experts skipped)
CHUNKS = (2, 4)


def _config(dtype):
    return moe_lab.MoEConfig(256, 128, num_experts=16, top_k=4, dtype=dtype)


def _attempt(check, *args):
    """Run a check on this rank; an error is raised, not recorded. On NCCL a rank that records an error and
    moves on leaves its peer inside a collective of the failed check, and the next check's collectives meet
    that one: the launch hangs (it did, on 2 H200s). Raised, it stops the launch at once with its traceback."""
    report_progress(f"{check.__name__} {args[0]} {args[1:]}")
    try:
        return check(*args)
    except Exception as error:
        report_progress(f"failed: {first_line(error)}")
        raise


def _reference_checks():
    results = {}
    for variant in VARIANTS:
        for name, dtype in DTYPES.items():
            for distribution in DISTRIBUTIONS:
                case = EPCase(_config(dtype), tokens_per_rank=(96, 64), distribution=distribution, skew=2.0,
                              device="cuda", variant=variant)
                results[("reference", variant, name, distribution)] = _attempt(check_against_reference, case)
    return results


def _forward_checks():
    results = {"padded_vs_exact": _attempt(compare_variants, EPCase(_config(torch.float32), tokens_per_rank=(64, 64),
                                                                    distribution="zipf", device="cuda"))}
    for chunks in CHUNKS:
        case = EPCase(_config(torch.bfloat16), tokens_per_rank=(256, 256), device="cuda", backward=False)
        results[("chunked", chunks)] = _attempt(compare_pipelined, case, chunks)
    for backend in GATHERED_BACKENDS:
        for name, dtype in DTYPES.items():
            case = EPCase(_config(dtype), tokens_per_rank=(96, 64), distribution="zipf", skew=2.0, device="cuda",
                          variant="gathered", backend=backend, backward=False)
            results[("gathered_inference", backend, name)] = _attempt(check_against_reference, case)
        for chunks in CHUNKS:
            case = EPCase(_config(torch.bfloat16), tokens_per_rank=(256, 200), device="cuda", backward=False,
                          variant="gathered", backend=backend)
            results[("chunked_gathered", backend, chunks)] = _attempt(compare_pipelined, case, chunks)
    return results


def _graph_checks():
    # a failed capture can leave the device unusable for what follows: these have a launch of their own
    results = {"graph": _attempt(replay_padded_from_cuda_graph, EPCase(_config(torch.bfloat16),
                                                                       tokens_per_rank=(32, 32), device="cuda",
                                                                       backward=False))}
    for backend in GATHERED_BACKENDS:
        for chunks in (1, 2):
            case = EPCase(_config(torch.bfloat16), tokens_per_rank=(48, 32), device="cuda", backward=False,
                          variant="gathered", backend=backend)
            results[("graph_gathered", backend, chunks)] = _attempt(replay_from_cuda_graph, case, chunks)
    return results


@pytest.fixture(scope="module")
def reference_ranks():
    return run_on_ranks(_reference_checks, 2, backend="nccl", timeout_s=240)


@pytest.fixture(scope="module")
def forward_ranks():
    return run_on_ranks(_forward_checks, 2, backend="nccl", timeout_s=180)


@pytest.fixture(scope="module")
def graph_ranks():
    return run_on_ranks(_graph_checks, 2, backend="nccl", timeout_s=120)


def _ok(result):
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_outputs_and_gradients_on_nccl(reference_ranks, variant, dtype, distribution):
    for rank in reference_ranks:
        result = _ok(rank[("reference", variant, dtype, distribution)])
        for name in ERRORS:
            assert result[name] <= reference_tolerance(DTYPES[dtype]), (result["rank"], name, result[name])


def test_padded_equals_exact_on_nccl(forward_ranks):
    for rank in forward_ranks:
        assert _ok(rank["padded_vs_exact"])["max_difference"] <= reference_tolerance(torch.float32)


@pytest.mark.parametrize("chunks", CHUNKS)
def test_chunked_forward_on_nccl(forward_ranks, chunks):
    for rank in forward_ranks:
        assert _ok(rank[("chunked", chunks)])["difference"] <= reference_tolerance(torch.bfloat16)


def test_padded_layer_replays_from_a_cuda_graph(graph_ranks):
    for rank in graph_ranks:
        result = _ok(rank["graph"])
        assert result["replay_vs_eager"] <= reference_tolerance(torch.bfloat16)
        assert result["output_error"] <= reference_tolerance(torch.bfloat16)


@pytest.mark.parametrize("backend", GATHERED_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gathered_inference_on_nccl(forward_ranks, backend, dtype):
    for rank in forward_ranks:
        assert _ok(rank[("gathered_inference", backend, dtype)])["output_error"] <= reference_tolerance(DTYPES[dtype])


@pytest.mark.parametrize("backend", GATHERED_BACKENDS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_chunked_gathered_forward_on_nccl(forward_ranks, backend, chunks):
    for rank in forward_ranks:
        result = _ok(rank[("chunked_gathered", backend, chunks)])
        assert result["difference"] <= reference_tolerance(torch.bfloat16)
        assert result["output_error"] <= reference_tolerance(torch.bfloat16)


@pytest.mark.parametrize("backend", GATHERED_BACKENDS)
@pytest.mark.parametrize("chunks", (1, 2))
def test_gathered_layer_replays_from_a_cuda_graph(graph_ranks, backend, chunks):
    # Sync-free: capture once (rank 1's 32 tokens padded to 48), replay on new tokens and routing = eager.
    for rank in graph_ranks:
        result = _ok(rank[("graph_gathered", backend, chunks)])
        assert result["replay_vs_eager"] <= reference_tolerance(torch.bfloat16)
        assert result["output_error"] <= reference_tolerance(torch.bfloat16)
