"""Bad input to the expert-parallel layer and to run_on_ranks: a clear error that says what is allowed."""
import pytest
import torch

import moe_lab
from moe_lab.errors import BackendInputError, ConfigError, UnknownBackendError
from moe_lab.parallel import ExpertParallelExperts, ExpertShard, RankFailedError, run_on_ranks


def _config(num_experts=8):
    return moe_lab.MoEConfig(32, 16, num_experts=num_experts, top_k=2)


def test_world_size_must_divide_the_experts():
    with pytest.raises(ConfigError, match=r"8 experts cannot be split evenly over 3 ranks.*\[1, 2, 4, 8\]"):
        ExpertShard(0, 3, 8)


def _build_on_three_ranks():
    return ExpertParallelExperts(_config(8))


def test_world_size_not_dividing_the_experts_fails_on_the_ranks():
    with pytest.raises(RankFailedError, match="cannot be split evenly over 3 ranks"):
        run_on_ranks(_build_on_three_ranks, 3)


def test_shards_are_contiguous_blocks():
    assert [list(ExpertShard(rank, 4, 8).experts) for rank in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_without_a_process_group_the_error_says_how_to_start_one():
    with pytest.raises(RuntimeError, match="init_process_group.*run_on_ranks"):
        ExpertParallelExperts(_config())


def _bad_calls():
    """Each bad call's error type and message, on every rank (the checks run before any collective)."""
    layer = ExpertParallelExperts(_config())
    x, index, weights = torch.randn(4, 32), torch.zeros(4, 2, dtype=torch.int64), torch.full((4, 2), 0.5)
    index[:, 1] = 1
    calls = {
        "unknown backend": lambda: layer.set_experts_implementation("no_such_backend"),
        "unknown backend at construction": lambda: ExpertParallelExperts(_config(), experts_implementation="nope"),
        "hidden size": lambda: layer(torch.randn(4, 31), index, weights),
        "3-D hidden": lambda: layer(torch.randn(2, 2, 32), index, weights),
        "weights shape": lambda: layer(x, index, weights[:, :1]),
        "expert id out of range": lambda: layer(x, index + 7, weights),
        "dtype": lambda: layer(x.double(), index, weights),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except Exception as error:  # noqa: BLE001 (the test inspects them)
            errors[name] = (type(error).__name__, str(error))
    return errors


def test_bad_calls_are_refused_before_any_collective():
    errors = run_on_ranks(_bad_calls, 2)[0]
    assert errors["unknown backend"][0] == UnknownBackendError.__name__
    assert "grouped_mm" in errors["unknown backend"][1]  # the registry's own message lists the names
    assert errors["unknown backend at construction"][0] == UnknownBackendError.__name__
    assert errors["hidden size"] == (BackendInputError.__name__, errors["hidden size"][1])
    assert "hidden size 31" in errors["hidden size"][1]
    assert "2-D tensor" in errors["3-D hidden"][1]
    assert "top_k_weights shape" in errors["weights shape"][1]
    assert "valid ids are 0..7" in errors["expert id out of range"][1]
    assert "dtype" in errors["dtype"][1]


def _raise_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise KeyError("planted failure")
    dist.barrier()  # rank 0 waits for a peer that is gone: run_on_ranks must not wait for the timeout
    return "unreachable"


def test_a_failing_rank_stops_the_launch_with_its_traceback():
    with pytest.raises(RankFailedError) as info:
        run_on_ranks(_raise_on_rank_one, 2, timeout_s=60)
    assert info.value.rank == 1 and "planted failure" in info.value.text


def _sleep_forever():
    import time

    import torch.distributed as dist

    from moe_lab.parallel.launch import report_progress

    if dist.get_rank() == 1:
        report_progress("the planted hang")
    time.sleep(600)


def test_a_launch_past_its_timeout_is_stopped_and_says_where_each_rank_was():
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 were still running") as info:
        run_on_ranks(_sleep_forever, 2, timeout_s=3)
    assert "rank 0: nothing" in str(info.value)
    assert "rank 1: 'the planted hang'" in str(info.value)


@pytest.mark.parametrize("world_size", [0, -1, 2.0, True])
def test_world_size_must_be_a_positive_integer(world_size):
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        run_on_ranks(_sleep_forever, world_size)


def _dynamo_loaded_before_the_call():
    import sys

    return "torch._dynamo" in sys.modules


def test_ranks_start_with_dynamo_loaded():
    # torch's functional collectives import torch._dynamo on a rank's first all-to-all. Once `import moe_lab` stopped
    # loading it, every rank paid that import (~2 s on a small machine) until the forkserver preloaded it: the
    # expert-parallel tests went from 6 to 144 s.
    assert run_on_ranks(_dynamo_loaded_before_the_call, 2, timeout_s=60) == [True, True]
