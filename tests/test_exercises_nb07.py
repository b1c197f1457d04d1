"""Notebook 07: the lesson's own backends are correct, and check_backend says which case fails."""
import functools

import pytest
import torch

import moe_lab
from moe_lab.exercises import nb07_own_backend as ex
from moe_lab.lessons import nb07_own_backend as nb07

BACKENDS = {
    "sorted_loop": nb07.sorted_loop_experts_forward,
    "padded_capacity": nb07.padded_capacity_experts_forward,  # C = T: nothing dropped
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def _inputs(T, E, k, dtype=torch.float32, distribution="uniform", seed=0, index_dtype=torch.int64):
    config = moe_lab.MoEConfig(32, 48, E, k, dtype=dtype)
    torch.manual_seed(seed)
    experts = moe_lab.Experts(config, "eager")
    hidden = torch.randn(T, 32).to(dtype)
    index, weights = moe_lab.synthetic_routing(T, E, k, distribution=distribution, skew=2.0, seed=seed)
    return experts, hidden, index.to(index_dtype), weights


ROUTINGS = [
    dict(T=64, E=8, k=2),
    dict(T=40, E=16, k=4, distribution="zipf"),  # skewed: some experts get nothing
    dict(T=16, E=8, k=2, distribution="single"),  # only experts 0 and 1 are hit
    dict(T=1, E=8, k=2),
    dict(T=0, E=8, k=2),
    dict(T=12, E=4, k=4),  # top_k = E
    dict(T=8, E=1, k=1),
    dict(T=32, E=8, k=2, index_dtype=torch.int32),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items()))
def test_lesson_backends_match_reference(name, dtype, routing):
    experts, hidden, index, weights = _inputs(dtype=dtype, **routing)
    with torch.no_grad():
        out = BACKENDS[name](experts, hidden, index, weights)
    assert out.shape == hidden.shape and out.dtype == dtype
    expected = moe_lab.reference_experts_forward(experts, hidden, index, weights)
    assert moe_lab.relative_error(out, expected) <= TOL[dtype]


def test_padded_capacity_drops_exactly_the_pairs_over_capacity():
    experts, hidden, index, weights = _inputs(48, 8, 2, distribution="zipf", seed=3)
    capacity = nb07.capacity_for(48, 2, 8, capacity_factor=1.0)
    assert capacity == 12
    slot, kept = nb07.capacity_slots(index, 8, capacity)
    counts = moe_lab.tokens_per_expert(index, 8)
    assert int((~kept).sum()) == int((counts - capacity).clamp(min=0).sum()) > 0
    # within each expert, slots number the pairs 0, 1, 2, ... in token order
    for e in range(8):
        assert sorted(slot[index == e].tolist()) == list(range(int(counts[e])))
        assert slot[index == e].tolist() == sorted(slot[index == e].tolist())
    out = nb07.padded_capacity_experts_forward(experts, hidden, index, weights, capacity_factor=1.0)
    expected = moe_lab.reference_experts_forward(experts, hidden, index, weights * kept)
    assert moe_lab.relative_error(out, expected) < 1e-5
    assert moe_lab.relative_error(out, moe_lab.reference_experts_forward(experts, hidden, index, weights)) > 1e-2


def test_capacity_for():
    assert nb07.capacity_for(10, 2, 4) == 10
    assert nb07.capacity_for(10, 2, 4, capacity_factor=1.25) == 7
    assert nb07.capacity_for(10, 2, 4, capacity=3) == 3
    with pytest.raises(ValueError):
        nb07.capacity_for(10, 2, 4, capacity_factor=0)


def test_lesson_backends_register_and_run_in_a_block():
    moe_lab.register("nb07_test_sorted_loop")(nb07.sorted_loop_experts_forward)
    try:
        config = moe_lab.MoEConfig(32, 48, 8, 2, shared_expert_intermediate_size=16)
        torch.manual_seed(0)
        block = moe_lab.SparseMoeBlock(config, "grouped_mm")
        x = torch.randn(2, 3, 32)
        expected = block(x)
        block.set_experts_implementation("nb07_test_sorted_loop")
        assert moe_lab.relative_error(block(x), expected) < 1e-5
    finally:
        moe_lab.unregister("nb07_test_sorted_loop")


# -- the exercise's check ------------------------------------------------------------------------

def test_check_backend_accepts_correct_backends(capsys):
    for fn in (*BACKENDS.values(), moe_lab.backends.eager_experts_forward):
        assert ex.check_backend(fn)
    assert "Correct" in capsys.readouterr().out
    assert ex.CHECK_NAME not in moe_lab.available_backends()  # the temporary registration is gone


def _per_expert_loop(experts, hidden_states, top_k_index, top_k_weights, *, weighted=True, cast=True):
    output = torch.zeros_like(hidden_states)
    for e in range(experts.num_experts):
        token, slot = torch.where(top_k_index == e)
        gate, up = (hidden_states[token] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        y = (experts.act_fn(gate) * up) @ experts.down_proj[e].T
        if weighted:
            y = y * top_k_weights[token, slot, None]
        output.index_add_(0, token, y.to(output.dtype) if cast else y)
    return output


def test_check_backend_names_the_missing_routing_weights(capsys):
    result = ex.check_backend(functools.partial(_per_expert_loop, weighted=False))
    assert not result and "5 of 6 cases fail" in result.message
    assert "it equals the UNWEIGHTED sum" in result.message
    assert "no tokens (T=0" not in result.message  # T=0 passes: nothing to weight


def test_check_backend_names_the_bf16_dtype_mismatch():
    result = ex.check_backend(functools.partial(_per_expert_loop, cast=False))
    assert not result and "1 of 6 cases fail" in result.message
    assert "bfloat16 (T=32" in result.message and "raised RuntimeError" in result.message
    assert "cast the weighted rows" in result.message


def test_check_backend_names_zero_token_and_empty_failures():
    def assumes_every_expert_is_hit(experts, hidden_states, top_k_index, top_k_weights):
        sizes = moe_lab.tokens_per_expert(top_k_index, experts.num_experts)
        if int(sizes.min()) == 0:
            raise ValueError("an expert got no tokens")
        return moe_lab.backends.eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights)

    result = ex.check_backend(assumes_every_expert_is_hit)
    assert not result
    assert "zero-token experts (T=16, E=8, k=2, float32, single routing; experts [2, 3, 4, 5, 6, 7] get no " \
           "tokens): raised ValueError: an expert got no tokens" in result.message
    assert "no tokens (T=0" in result.message and "uniform routing (T=32" not in result.message


def test_check_backend_wrong_shape_and_not_callable():
    def returns_pairs(experts, hidden_states, top_k_index, top_k_weights):
        return hidden_states.repeat_interleave(top_k_index.shape[1], dim=0)

    result = ex.check_backend(returns_pairs)
    assert not result and "returned shape (64, 32), expected (32, 32)" in result.message
    assert not ex.check_backend(None)


def test_check_backend_reports_a_block_failure():
    def fails_on_ten_tokens(experts, hidden_states, top_k_index, top_k_weights):
        if hidden_states.shape[0] == 10:  # the block check's [2, 5, H] input; no case has T=10
            raise RuntimeError("boom")
        return nb07.sorted_loop_experts_forward(experts, hidden_states, top_k_index, top_k_weights)

    result = ex.check_backend(fails_on_ten_tokens)
    assert not result and "all 6 cases match the reference, but" in result.message
    assert "SparseMoeBlock" in result.message and "RuntimeError: boom" in result.message
