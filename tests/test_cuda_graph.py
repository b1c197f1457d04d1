"""moe_lab.GraphedExperts on a machine without CUDA: the errors say what is wrong (the capture and
replay themselves are checked on a GPU in tests/test_gpu.py)."""
import pytest
import torch

import moe_lab
from moe_lab.bench import measure


def _layer():
    return moe_lab.Experts(moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2))


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(moe_lab.UnknownBackendError, match="'fused_moe'"):
        moe_lab.GraphedExperts(_layer(), "fused_moe")


def test_replay_before_any_capture_says_so():
    with pytest.raises(RuntimeError, match="nothing captured yet"):
        moe_lab.GraphedExperts(_layer()).replay()


def test_cpu_tensors_cannot_be_captured():
    layer = _layer()
    x = torch.randn(3, 32)
    index, weights = moe_lab.synthetic_routing(3, 4, 2)
    with pytest.raises(moe_lab.GraphCaptureError, match="CUDA graphs need CUDA tensors; hidden_states is on cpu"):
        moe_lab.GraphedExperts(layer, "grouped_mm")(x, index, weights)


@pytest.mark.parametrize("execution", ["cuda_graph", "cuda_graph_back_to_back"])
def test_bench_rows_for_cuda_graph_on_cpu_are_unsupported_with_the_reason(execution):
    row = measure(moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2), 4, "grouped_mm", device="cpu",
                  execution=execution, max_seconds=0.01, measure_memory=False)
    assert row["execution"] == execution and row["status"] == "unsupported"
    assert "CUDA graphs need CUDA tensors" in row["reason"]


def test_unknown_execution_is_a_row_with_the_allowed_ones():
    row = measure(moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2), 4, "grouped_mm", device="cpu",
                  execution="graph", max_seconds=0.01)
    assert row["status"] == "unsupported" and "unknown execution 'graph'" in row["reason"]
    assert "'eager', 'cuda_graph', 'cuda_graph_back_to_back'" in row["reason"]


def test_sweep_refuses_an_unknown_execution_before_running():
    from moe_lab.bench import sweep

    with pytest.raises(ValueError, match=r"unknown executions \['graph'\]; allowed: \['eager', 'cuda_graph', 'cuda_graph_back_to_back'\]"):
        sweep(moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2), 4, ["grouped_mm"], device="cpu",
              progress=False, executions=["graph"])
