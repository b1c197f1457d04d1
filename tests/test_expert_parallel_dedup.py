"""The layer that sends each token once per destination rank (parallel/dedup.py) equals the single-process
layer: outputs and every gradient on 1, 2, 3, 4 and 8 gloo ranks, empty receivers, idle senders, skew,
k > E/world; it sends fewer rows than the exact layer; and the backends' sorted-rows entry it runs through."""
import pytest
import torch
import torch.distributed as dist

import moe_lab
from moe_lab.parallel import run_on_ranks
from ep_cases import assert_close as _assert_close, run_case as _run, small_config as _config
from moe_lab.parallel.checks import EPCase, whole_batch

BACKENDS = ("eager", "batched_mm", "grouped_mm")  # grouped_mm through its sorted_rows entry, the others through forward


@pytest.mark.parametrize("world_size,num_experts", [(1, 8), (2, 8), (3, 6), (4, 8)])
def test_float64_equals_the_single_process_layer(world_size, num_experts):
    case = EPCase(_config(num_experts, dtype=torch.float64), tokens_per_rank=tuple(5 + 2 * r for r in range(world_size)),
                  variant="dedup")
    _assert_close(_run(case), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_cpu_backend(backend):
    case = EPCase(_config(num_experts=6), tokens_per_rank=(7, 4, 6), distribution="zipf", variant="dedup",
                  backend=backend)
    _assert_close(_run(case), torch.float32)


def test_bfloat16_within_its_tolerance():
    case = EPCase(_config(dtype=torch.bfloat16), tokens_per_rank=(16, 16), variant="dedup")
    _assert_close(_run(case), torch.bfloat16)


@pytest.mark.parametrize("backend", ("eager", "grouped_mm"))
def test_ranks_that_receive_no_tokens(backend):
    # Every token picks experts 0 and 1, both on rank 0: ranks 1..3 receive nothing, yet join every all-to-all.
    case = EPCase(_config(dtype=torch.float64), tokens_per_rank=(4, 3, 5, 2), distribution="single", variant="dedup",
                  backend=backend)
    results = _run(case)
    assert [r["pairs_received"] for r in results] == [28, 0, 0, 0]
    _assert_close(results, torch.float64)
    for result in results[1:]:
        assert result["gate_up_proj_grad_error"] == 0.0 and result["down_proj_grad_error"] == 0.0


def test_ranks_that_send_no_tokens():
    case = EPCase(_config(dtype=torch.float64), tokens_per_rank=(0, 7, 0, 4), variant="dedup")
    _assert_close(_run(case), torch.float64)


def test_skewed_routing():
    case = EPCase(_config(dtype=torch.float64), tokens_per_rank=(24, 24), distribution="zipf", skew=3.0,
                  variant="dedup")
    results = _run(case)
    received = [r["pairs_received"] for r in results]
    assert received[0] > 0.85 * sum(received), received
    _assert_close(results, torch.float64)


def test_eight_ranks_one_expert_each():
    case = EPCase(_config(dtype=torch.float64), tokens_per_rank=(3, 4, 0, 5, 2, 3, 1, 4), distribution="zipf",
                  variant="dedup")
    _assert_close(_run(case), torch.float64)


def test_top_k_larger_than_experts_per_rank():
    # k=4 > E/world=2: a token has up to two experts on one rank, summed there before its one row goes back.
    case = EPCase(_config(num_experts=8, top_k=4, dtype=torch.float64), tokens_per_rank=(6, 5, 7, 3), variant="dedup")
    _assert_close(_run(case), torch.float64)


def _rows_sent(case: EPCase) -> dict:
    from moe_lab.parallel.checks import build_layer
    from moe_lab.parallel.dedup import plan_token_dispatch

    experts, hidden, index, weights, _ = whole_batch(case)
    rank = dist.get_rank()
    layer = build_layer(case, experts)
    [(plan, rows, routing)] = plan_token_dispatch(hidden[rank], index[rank], weights[rank], layer.shard, layer.group)
    visited = sum(len({int(e) // layer.shard.count for e in token}) for token in index[rank])  # (token, rank) pairs
    return {"send_rows": plan.send_rows, "rows": rows.shape[0], "routing": tuple(routing.shape), "visited": visited}


def test_each_token_is_sent_once_per_rank_it_visits():
    # 16 experts over 2 ranks, k=8: a token visits at most 2 ranks, so it sends at most 2 rows, not 8.
    case = EPCase(_config(num_experts=16, top_k=8), tokens_per_rank=(10, 6), variant="dedup")
    for result, T in zip(run_on_ranks(_rows_sent, 2, case), case.tokens_per_rank):
        assert sum(result["send_rows"]) == result["rows"] == result["visited"]
        assert T <= result["rows"] <= 2 * T < 8 * T
        assert result["routing"] == (result["rows"], 16)  # 8 weights and 8 local ids per row


class _Counting:
    """A backend with a sorted_rows entry that counts its calls, delegating to grouped_mm."""

    def __init__(self):
        self.sorted_calls = 0

    def sorted_rows(self, experts, rows, counts):
        self.sorted_calls += 1
        return moe_lab.get_spec("grouped_mm").sorted_rows(experts, rows, counts)


def test_sorted_rows_entry_is_used_and_equals_the_forward():
    from moe_lab.parallel.local import run_local_experts, run_sorted_rows
    from moe_lab.parallel.sharding import ExpertShard, local_experts

    config = _config(num_experts=4, dtype=torch.float64)
    counting = _Counting()
    moe_lab.register("counting_sorted", moe_lab.get_backend("grouped_mm"), sorted_rows=counting.sorted_rows,
                     autograd=True)
    try:
        local = local_experts(config, ExpertShard(0, 1, 4), "counting_sorted")
        counts = torch.tensor([3, 0, 5, 2])
        rows = torch.randn(10, 32, dtype=torch.float64, requires_grad=True)
        sorted_out = run_sorted_rows(local, rows, counts)
        assert counting.sorted_calls == 1
        ids = torch.repeat_interleave(torch.arange(4), counts)
        torch.testing.assert_close(sorted_out, run_local_experts(local, rows, ids))
        sorted_out.sum().backward()
        assert rows.grad is not None and local.down_proj.grad is not None
        local.set_experts_implementation("eager")  # no sorted_rows entry: the forward with top_k = 1
        torch.testing.assert_close(run_sorted_rows(local, rows, counts), sorted_out)
        assert counting.sorted_calls == 1
    finally:
        moe_lab.unregister("counting_sorted")


def test_auto_runs_the_sorted_rows_entry_of_the_backend_it_chooses(monkeypatch, tmp_path):
    from moe_lab.backends import auto
    from moe_lab.parallel.local import run_sorted_rows
    from moe_lab.parallel.sharding import ExpertShard, local_experts

    counting = _Counting()
    moe_lab.register("counting_sorted", moe_lab.get_backend("grouped_mm"), sorted_rows=counting.sorted_rows,
                     autograd=True)
    monkeypatch.setenv(auto.ENV_VAR, str(tmp_path / "no_calibration.json"))
    monkeypatch.setitem(auto.DEFAULT_CROSSOVERS, "cpu", ((None, "counting_sorted"),))
    monkeypatch.setattr(auto, "_forward_decisions", {})
    try:
        local = local_experts(_config(num_experts=4, dtype=torch.float64), ExpertShard(0, 1, 4), "auto")
        counts = torch.tensor([3, 0, 5, 2])
        rows = torch.randn(10, 32, dtype=torch.float64, requires_grad=True)
        through_auto = run_sorted_rows(local, rows, counts)
        assert counting.sorted_calls == 1
        local.set_experts_implementation("eager")
        torch.testing.assert_close(through_auto, run_sorted_rows(local, rows, counts))
    finally:
        moe_lab.unregister("counting_sorted")


def test_sorted_rows_of_a_backend_without_declared_autograd_is_not_trusted_with_gradients():
    from moe_lab.parallel.local import run_sorted_rows
    from moe_lab.parallel.sharding import ExpertShard, local_experts

    counting = _Counting()
    moe_lab.register("counting_unsure", moe_lab.get_backend("grouped_mm"), sorted_rows=counting.sorted_rows)
    try:
        local = local_experts(_config(num_experts=2), ExpertShard(0, 1, 2), "counting_unsure")
        rows = torch.randn(4, 32, requires_grad=True)
        run_sorted_rows(local, rows, torch.tensor([1, 3]))  # needs grad, autograd undeclared: the checked forward
        assert counting.sorted_calls == 0
        with torch.no_grad():
            run_sorted_rows(local, rows, torch.tensor([1, 3]))
        assert counting.sorted_calls == 1
    finally:
        moe_lab.unregister("counting_unsure")


def test_register_refuses_a_sorted_rows_that_is_not_callable():
    with pytest.raises(TypeError, match="sorted_rows"):
        moe_lab.register("bad_sorted", moe_lab.get_backend("eager"), sorted_rows=3)


def _int32_against_int64(case: EPCase) -> float:
    from moe_lab.parallel.checks import build_layer

    experts, hidden, index, weights, _ = whole_batch(case)
    rank = dist.get_rank()
    layer = build_layer(case, experts)
    with torch.no_grad():
        wide = layer(hidden[rank], index[rank], weights[rank])
        narrow = layer(hidden[rank], index[rank].int(), weights[rank])
    return float((wide - narrow).abs().max()) if wide.numel() else 0.0


def test_int32_expert_ids_give_the_same_output():
    case = EPCase(_config(), tokens_per_rank=(5, 3), variant="dedup")
    assert run_on_ranks(_int32_against_int64, 2, case) == [0.0, 0.0]
