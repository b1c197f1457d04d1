"""The all-gather layer (parallel/gathered.py) equals the single-process layer: outputs and every gradient on 1, 2,
3 and 4 gloo ranks, skewed routing, ranks whose experts get nothing, T shorter than tokens_per_rank; its chunked
forward equals the plain one; the triton backend's partial forward (absent experts skipped), with its gradients,
through the interpreter; the bytes it moves; and its errors.

Each world size runs its cases in ONE launch of gloo processes (starting them costs about a second each)."""
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import moe_lab
from ep_cases import assert_close, small_config
from moe_lab.backends import get_spec
from moe_lab.errors import BackendCapabilityError, BackendInputError, ConfigError
from moe_lab.lessons.tolerances import reference_tolerance
from moe_lab.modules import Experts
from moe_lab.parallel import run_on_ranks
from moe_lab.parallel.checks import EPCase, check_against_reference, compare_pipelined
from moe_lab.parallel.gathered import dispatch_bytes, rank_hit_probability
from moe_lab.parallel.local import run_partial_experts
from moe_lab.reference import reference_experts_forward, relative_error


def _checks(cases, pipelined=()):
    """On every rank: check_against_reference for each case, then compare_pipelined for each (case, chunks)."""
    return ([check_against_reference(case) for case in cases]
            + [compare_pipelined(case, chunks) for case, chunks in pipelined])


def _gathered(tokens, **kwargs):
    kwargs.setdefault("variant", "gathered")
    config = kwargs.pop("config", small_config(dtype=torch.float64))
    return EPCase(config, tokens_per_rank=tokens, **kwargs)


CASES = {
    1: [_gathered((6,)), _gathered((4,), tokens_per_rank_bound=9, backend="eager")],
    2: [_gathered((5, 3), distribution="zipf", skew=2.0),
        _gathered((0, 6), backend="eager", tokens_per_rank_bound=8),  # a rank with no tokens, both padded
        _gathered((8, 8), config=small_config(), backend="batched_mm")],
    3: [_gathered((5, 2, 7), config=small_config(num_experts=6), distribution="zipf")],
    # "single": every token picks experts 0 and 1, both on rank 0: ranks 1..3's experts get nothing
    4: [_gathered((4, 3, 5, 2), distribution="single", backend="eager"), _gathered((3, 0, 4, 1)),
        # top_k=4 > E/w=2: the generic path hands a backend at most E/w slots a row (notebook 10's parameters)
        _gathered((3, 2, 4, 1), config=small_config(num_experts=8, top_k=4, dtype=torch.float64))],
}
PIPELINED = {2: [(_gathered((7, 5), backward=False), 3), (_gathered((2, 2), backward=False), 4)],
             3: [(_gathered((5, 0, 3), config=small_config(num_experts=6), backward=False,
                            tokens_per_rank_bound=6), 2)]}


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_equals_the_single_process_layer(world_size):
    cases, pipelined = CASES[world_size], PIPELINED.get(world_size, [])
    every_rank = run_on_ranks(_checks, world_size, cases, pipelined, timeout_s=120)
    for rank, results in enumerate(every_rank):
        for case, result in zip(cases, results):
            assert_close([result], case.config.dtype)
            if case.distribution == "single" and rank > 0:  # nothing reached these experts: zero gradients
                assert result["pairs_received"] == 0
                assert result["gate_up_proj_grad_error"] == 0.0 and result["down_proj_grad_error"] == 0.0
        for (case, chunks), result in zip(pipelined, results[len(cases):]):
            tolerance = reference_tolerance(case.config.dtype)
            assert result["difference"] <= tolerance and result["output_error"] <= tolerance, (chunks, result)


# --- the triton backend's partial forward, through the interpreter (tiny shapes) ---

def _partial_inputs(num_experts=4, top_k=3, tokens=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=generator)
    index = torch.stack([torch.randperm(num_experts + 2, generator=generator)[:top_k] for _ in range(tokens)])
    index = index.clamp(max=num_experts)  # ids past the last expert: "absent"; a row may hold it several times
    index[0] = num_experts  # a row with no expert here
    index[1] = torch.tensor([num_experts, 2, num_experts])
    weights = torch.rand(tokens, top_k, generator=generator)
    return x, index, weights


def _reference_partial(experts, x, index, weights):
    absent = index >= experts.num_experts
    return reference_experts_forward(experts, x, torch.where(absent, 0, index), torch.where(absent, 0.0, weights))


def test_triton_partial_forward_skips_absent_slots():
    torch.manual_seed(0)
    experts = Experts(small_config(num_experts=4, top_k=3), "triton")
    x, index, weights = _partial_inputs()
    # Unwritten memory reads NaN, so a sum that read an absent slot's (never written) row could not pass by luck.
    with torch.no_grad(), _uninitialized_memory_is_nan():
        triton_partial = get_spec("triton").partial_forward(experts, x, index, weights)
        through_local = run_partial_experts(experts, x, index, weights)  # asks the spec: the same entry
        experts.set_experts_implementation("eager")
        generic = run_partial_experts(experts, x, index, weights)  # ids clamped, weights zeroed
    reference = _reference_partial(experts, x, index, weights)
    tolerance = reference_tolerance(torch.float32)
    assert relative_error(triton_partial, reference) <= tolerance
    assert relative_error(generic, reference) <= tolerance
    assert torch.equal(through_local, triton_partial)
    assert torch.equal(triton_partial[0], torch.zeros(32))  # no expert here: exactly zero


def _register_counted(name, backend):
    """Register `name`: `backend`'s forward, autograd declared, and its partial entry counting its calls (returned)."""
    calls = []
    entry = get_spec(backend).partial_forward
    moe_lab.register(name, get_spec(backend).forward, autograd=True,
                     partial_forward=lambda *args: calls.append(1) or entry(*args))
    return calls


def _gradients(experts, x, index, weights, grad_out):
    experts.zero_grad(set_to_none=True)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    output = run_partial_experts(experts, x, index, weights)
    output.backward(grad_out)
    return output.detach(), {"hidden_states": x.grad, "top_k_weights": weights.grad,
                             "gate_up_proj": experts.gate_up_proj.grad, "down_proj": experts.down_proj.grad}


@pytest.mark.parametrize("backend", [name for name in moe_lab.backends.builtin_backends()
                                     if moe_lab.backends.get_spec(name).partial_forward is not None])
def test_partial_forward_trains_like_the_generic_path(backend):
    # With gradients run_partial_experts takes the backend's partial entry too (the absent slots cost nothing);
    # output and every gradient equal the generic path's (ids clamped, weights zeroed) and the float64 layer's.
    torch.manual_seed(0)
    experts = Experts(small_config(num_experts=4, top_k=3), backend)
    x, index, weights = _partial_inputs()
    index[2, 0] = 11  # any id past the last expert is absent, not only E
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    calls = _register_counted("counted", backend)
    try:
        experts.set_experts_implementation("counted")
        with _uninitialized_memory_is_nan():
            partial_output, partial = _gradients(experts, x, index, weights, grad_out)
    finally:
        moe_lab.unregister("counted")
    assert calls == [1]
    experts.set_experts_implementation("eager")
    generic_output, generic = _gradients(experts, x, index, weights, grad_out)
    double = Experts(small_config(num_experts=4, top_k=3, dtype=torch.float64), "eager")
    double.load_state_dict({name: value.double() for name, value in experts.state_dict().items()})
    reference_output, reference = _gradients(double, x.double(), index, weights.double(), grad_out.double())
    tolerance = reference_tolerance(torch.float32)
    assert relative_error(partial_output, reference_output) <= tolerance
    for name, expected in reference.items():
        assert relative_error(partial[name], expected) <= tolerance, name
        assert relative_error(generic[name], expected) <= tolerance, name
    assert torch.all(partial["top_k_weights"][index >= 4] == 0)
    assert torch.all(partial["hidden_states"][0] == 0)  # the row with no expert here


def test_auto_runs_the_partial_entry_of_the_backend_it_chooses(monkeypatch, tmp_path):
    # auto has no partial entry of its own: run_partial_experts asks it which backend it runs for this call and
    # takes that backend's entry, with gradients, instead of computing every absent slot through auto's forward.
    from moe_lab.backends import auto

    calls = _register_counted("counted", "triton")
    monkeypatch.setenv(auto.ENV_VAR, str(tmp_path / "no_calibration.json"))
    monkeypatch.setitem(auto.DEFAULT_CROSSOVERS, "cpu", ((None, "counted"),))
    monkeypatch.setattr(auto, "_forward_decisions", {})
    torch.manual_seed(0)
    experts = Experts(small_config(num_experts=4, top_k=3), "auto")
    x, index, weights = _partial_inputs()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    try:
        through_auto, auto_grads = _gradients(experts, x, index, weights, grad_out)
    finally:
        moe_lab.unregister("counted")
    assert calls == [1]
    experts.set_experts_implementation("eager")
    generic, generic_grads = _gradients(experts, x, index, weights, grad_out)
    tolerance = reference_tolerance(torch.float32)
    assert relative_error(through_auto, generic) <= tolerance
    for name, expected in generic_grads.items():
        assert relative_error(auto_grads[name], expected) <= tolerance, name


def test_sorting_with_the_absent_id_is_the_same_either_way():
    from moe_lab.backends.triton_fused import sort_pairs

    _, index, _ = _partial_inputs(tokens=40)
    one_program, counts_one = sort_pairs(index, 5, method="one_program")
    for method in ("blocks", "torch"):
        other, counts_other = sort_pairs(index, 5, method=method)
        assert torch.equal(one_program, other) and torch.equal(counts_one, counts_other)
    counts_torch = counts_one
    assert int(counts_torch[4]) == int((index == 4).sum())  # the absent slots are counted last, apart


def test_triton_layer_on_two_ranks():
    # The partial_forward entry, plain and chunked, without gradients, and with them.
    config = small_config(num_experts=4, top_k=2)
    inference = _gathered((6, 4), config=config, backend="triton", backward=False, distribution="zipf")
    training = replace(inference, backward=True)
    for results in run_on_ranks(_checks, 2, [training], [(inference, 2)], timeout_s=300):
        assert_close([results[0]], torch.float32)
        assert results[1]["difference"] <= 1e-6 and results[1]["output_error"] <= reference_tolerance(torch.float32)


class _uninitialized_memory_is_nan:
    def __enter__(self):
        import torch.utils.deterministic as deterministic

        self.saved = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True, warn_only=True)
        deterministic.fill_uninitialized_memory = True

    def __exit__(self, *exc):
        import torch.utils.deterministic as deterministic

        torch.use_deterministic_algorithms(self.saved[0])
        deterministic.fill_uninitialized_memory = self.saved[1]


# --- bytes, and errors ---

def test_dispatch_bytes_against_exact_and_dedup():
    config = moe_lab.get_preset("qwen3-30b-a3b").config.replace(dtype=torch.bfloat16)
    T, H, k = 8192, config.hidden_size, config.top_k
    cost = dispatch_bytes(config, T, world_size=2)
    assert cost.gathered_bytes == T * (2 * H * 2 + 2 * k * 4)  # the other rank's rows out and back, routing out
    assert cost.exact_bytes == pytest.approx(2 * T * k / 2 * H * 2)
    p = rank_hit_probability(128, 8, 2)
    assert p == pytest.approx(1 - 0.5 ** 8, abs=2e-3)  # nearly every token has an expert on the other rank
    assert cost.dedup_bytes == pytest.approx(T * p * (2 * H * 2 + 2 * k * 4))
    assert 1.0 < cost.gathered_over_dedup < 1.01
    assert cost.gathered_over_exact == pytest.approx((2 * H * 2 + 2 * k * 4) / (k * H * 2))
    wide = dispatch_bytes(config, T, world_size=8)  # many ranks: each token reaches few of them
    assert wide.gathered_over_dedup > 1.2 and wide.generic_expert_pairs == 8 * T * k
    with pytest.raises(ConfigError):
        dispatch_bytes(config, T, world_size=3)  # 3 does not divide 128


def _errors():
    from moe_lab.parallel.gathered import GatheredExpertParallelExperts
    from moe_lab.parallel.pipelined import pipelined_gathered_forward

    messages = {}
    for bad in (0, 2.5, True):
        try:
            GatheredExpertParallelExperts(small_config(), tokens_per_rank=bad)
        except ConfigError as error:
            messages[f"tokens_per_rank={bad!r}"] = str(error)
    layer = GatheredExpertParallelExperts(small_config(), tokens_per_rank=4)
    index = torch.zeros(5, 2, dtype=torch.int64)
    index[:, 1] = 1
    try:
        layer(torch.randn(5, 32), index, torch.full((5, 2), 0.5))
    except BackendInputError as error:
        messages["too many tokens"] = str(error)
    try:
        pipelined_gathered_forward(layer, torch.randn(4, 32, requires_grad=True), index[:4], torch.full((4, 2), 0.5))
    except BackendCapabilityError as error:
        messages["chunked with gradients"] = str(error)
    try:
        pipelined_gathered_forward(layer, torch.randn(4, 32), index[:4], torch.full((4, 2), 0.5), chunks=0)
    except ConfigError as error:
        messages["chunks=0"] = str(error)
    try:
        run_partial_experts(layer.local, torch.randn(4, 32), index[:3], torch.full((4, 2), 0.5))
    except BackendInputError as error:
        messages["partial shapes"] = str(error)
    return dist.get_rank(), messages


def test_errors_say_what_was_wrong():
    with pytest.raises(RuntimeError, match="init_process_group"):
        from moe_lab.parallel.gathered import GatheredExpertParallelExperts

        GatheredExpertParallelExperts(small_config(), tokens_per_rank=4)
    [(_, messages)] = run_on_ranks(_errors, 1)
    for bad in ("0", "2.5", "True"):
        assert "tokens_per_rank must be a positive integer" in messages[f"tokens_per_rank={bad}"]
    assert "sized for at most 4 tokens per rank, got 5" in messages["too many tokens"]
    assert "for inference" in messages["chunked with gradients"]
    assert "chunks must be a positive integer" in messages["chunks=0"]
    assert "run_partial_experts wants rows [N, 32]" in messages["partial shapes"]


def test_a_registered_partial_forward_is_asked_with_gradients_too_and_checked_like_the_forward():
    calls = []

    def partial(experts, hidden_states, top_k_index, top_k_weights):
        calls.append(top_k_index.clone())
        return run_partial_experts_generic(experts, hidden_states, top_k_index, top_k_weights)

    def run_partial_experts_generic(experts, hidden_states, top_k_index, top_k_weights):
        absent = top_k_index >= experts.num_experts
        return moe_lab.experts_forward("eager", experts, hidden_states, torch.where(absent, 0, top_k_index),
                                       torch.where(absent, 0.0, top_k_weights))

    moe_lab.register("partial_counting", moe_lab.backends.get_spec("eager").forward, partial_forward=partial)
    try:
        experts = Experts(small_config(num_experts=4, top_k=3), "partial_counting")
        x, index, weights = _partial_inputs()
        with torch.no_grad():
            run_partial_experts(experts, x, index, weights)
        assert len(calls) == 1 and torch.equal(calls[0], index)  # the sentinel ids reach the entry unchanged
        run_partial_experts(experts, x, index, weights.requires_grad_()).sum().backward()
        assert len(calls) == 2 and weights.grad is not None  # gradients: the same entry
        # An entry that detaches is refused like a forward that does (its autograd undeclared: checked once)...
        moe_lab.register("partial_detached", moe_lab.backends.get_spec("eager").forward,
                         partial_forward=lambda *args: partial(*args).detach())
        experts.set_experts_implementation("partial_detached")
        with pytest.raises(moe_lab.backends.DetachedOutputError, match="'partial_detached' .*its entry"):
            run_partial_experts(experts, x, index, weights)
        # ... and a backend declared without autograd before it runs.
        moe_lab.register("partial_no_grad", moe_lab.backends.get_spec("eager").forward, autograd=False,
                         partial_forward=partial)
        experts.set_experts_implementation("partial_no_grad")
        with pytest.raises(BackendCapabilityError, match="'partial_no_grad' .*cannot give gradients"):
            run_partial_experts(experts, x, index, weights)
        with pytest.raises(TypeError, match="partial_forward of backend 'bad' must be callable"):
            moe_lab.register("bad", moe_lab.backends.get_spec("eager").forward, partial_forward=3)
    finally:
        for name in ("partial_counting", "partial_detached", "partial_no_grad"):
            if name in moe_lab.available_backends():
                moe_lab.unregister(name)
