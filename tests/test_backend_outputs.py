"""Every built-in backend's output against the independent float64 reference, grouped_mm's path,
what each backend does (syncs, launches), and the errors bad input gets. Gradients:
tests/test_backend_gradients.py; what backends declare: tests/test_backend_contract.py."""
import sys
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.backends import builtin_backends
from moe_lab.bench.inputs import random_hidden_states

sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_cases, also under --import-mode=importlib
from backend_cases import MATMUL_BACKENDS, tolerance  # noqa: E402

BACKENDS = MATMUL_BACKENDS

# Relative (Frobenius) error allowed against the float64 reference: backend_cases.tolerance(dtype, n).
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_case(dtype=torch.float32, T=24, H=32, I=16, E=6, k=2, distribution="uniform", seed=0):
    cfg = moe_lab.MoEConfig(H, I, num_experts=E, top_k=k, dtype=dtype)
    experts = moe_lab.Experts(cfg)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=generator).to(dtype)
    idx, w = moe_lab.synthetic_routing(T, E, k, distribution=distribution, skew=1.5, seed=seed)
    return experts, x, idx, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["uniform", "zipf", "single"])
def test_forward_matches_float64_reference(backend, dtype, distribution):
    experts, x, idx, w = make_case(dtype, distribution=distribution)
    experts.set_experts_implementation(backend)
    out = experts(x, idx, w)
    assert out.shape == x.shape and out.dtype == dtype
    ref = moe_lab.reference_experts_forward(experts, x, idx, w)
    assert moe_lab.relative_error(out, ref) < tolerance(dtype, max(x.shape[1], 2 * experts.intermediate_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_one_matches_the_reference_and_trains(backend, dtype):
    # top_k = 1 is how expert parallelism calls its local experts; the sum over one slot is a view there.
    experts, x, idx, w = make_case(dtype, k=1)
    experts.set_experts_implementation(backend)
    x.requires_grad_(True)
    out = experts(x, idx, w)
    ref = moe_lab.reference_experts_forward(experts, x.detach(), idx, w)
    assert out.shape == x.shape and moe_lab.relative_error(out, ref) < tolerance(dtype, 2 * experts.intermediate_size)
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sum_over_one_slot_is_a_view_of_the_rows():
    from moe_lab.backends.common import sum_over_top_k

    rows = torch.randn(5, 4, dtype=torch.bfloat16)
    assert sum_over_top_k(rows, 5, 1).data_ptr() == rows.data_ptr()  # no copy of every row
    assert torch.equal(sum_over_top_k(rows, 5, 1), rows.view(5, 1, 4).sum(dim=1))  # the values a sum gives
    assert torch.equal(sum_over_top_k(rows, 1, 5), rows.sum(dim=0, keepdim=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_dims_zero_token_experts_and_shuffled_tokens(backend):
    # H=13, I=7: rows are not 16-byte multiples, so grouped_mm must take its fallback path;
    # 9 experts with skewed routing leaves some with no tokens.
    experts, x, idx, w = make_case(H=13, I=7, E=9, k=3, distribution="zipf")
    shuffle = torch.randperm(x.shape[0])
    experts.set_experts_implementation(backend)
    out = experts(x[shuffle], idx[shuffle], w[shuffle])
    ref = moe_lab.reference_experts_forward(experts, x, idx, w)[shuffle]
    assert moe_lab.routing_stats(idx, 9).experts_hit < 9
    assert moe_lab.relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_top_k_equal_num_experts(backend):
    experts, x, idx, w = make_case(T=1, E=4, k=4)
    experts.set_experts_implementation(backend)
    ref = moe_lab.reference_experts_forward(experts, x, idx, w)
    assert moe_lab.relative_error(experts(x, idx, w), ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens_give_an_empty_output(backend):
    experts, x, idx, w = make_case(T=0)
    experts.set_experts_implementation(backend)
    out = experts(x, idx, w)
    assert out.shape == (0, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_expert_ids_and_float64_routing_weights(backend):
    experts, x, idx, w = make_case()
    experts.set_experts_implementation(backend)
    out = experts(x, idx.int(), w.double())
    ref = moe_lab.reference_experts_forward(experts, x, idx, w)
    assert moe_lab.relative_error(out, ref) < 1e-5


def test_eager_reads_the_host_once_and_runs_two_matmuls_per_expert_hit():
    from moe_lab.lessons.nb02_eager_loop import count_ops, count_sync_points

    index, weights = moe_lab.synthetic_routing(6, 8, 2, distribution="zipf", skew=1.5, seed=1)
    config = moe_lab.MoEConfig(hidden_size=16, intermediate_size=24, num_experts=8, top_k=2)
    experts = moe_lab.Experts(config)
    hidden = random_hidden_states(6, config, index.device)
    _, syncs = count_sync_points(moe_lab.backends.eager_experts_forward, experts, hidden, index, weights)
    assert dict(syncs) == {".tolist()": 1}
    _, ops = count_ops(moe_lab.backends.eager_experts_forward, experts, hidden, index, weights)
    assert ops["mm"] == 2 * moe_lab.routing_stats(index, 8).experts_hit


# ----------------------------------------------------------------------------- grouped_mm path


@pytest.mark.parametrize(
    "dtype, H, I, compiling, kernel_is_loop, reason_mentions",
    [
        (torch.float64, 32, 16, False, True, "float64"),
        (torch.float32, 13, 16, False, True, "16 bytes"),
        (torch.bfloat16, 32, 12, False, True, "intermediate_size=12"),
        (torch.float32, 32, 16, True, True, "bfloat16 only"),
        (torch.bfloat16, 32, 16, True, False, "cpu"),
        (torch.float32, 32, 16, False, False, "cpu"),
    ],
)
def test_grouped_mm_path_explains_itself(dtype, H, I, compiling, kernel_is_loop, reason_mentions):
    path = moe_lab.grouped_mm_path("cpu", dtype, H, I, compiling=compiling)
    assert (path.kernel == "moe_lab loop") is kernel_is_loop
    assert path.native is False  # never a fused kernel on a CPU
    assert reason_mentions in path.reason


def test_grouped_mm_path_is_decided_once_per_key_when_launched():
    # The forward asks on every call; launched from Python the answer is cached per (device, dtype,
    # H, I), and a string device and a torch.device share the entry.
    first = moe_lab.grouped_mm_path("cpu", torch.bfloat16, 32, 16, compiling=False)
    assert moe_lab.grouped_mm_path(torch.device("cpu"), torch.bfloat16, 32, 16, compiling=False) is first
    assert moe_lab.grouped_mm_path("cpu", torch.float64, 32, 16, compiling=False) != first
    # The compiling answer is its own (bf16 only there), not the cached launched one.
    assert moe_lab.grouped_mm_path("cpu", torch.float32, 32, 16, compiling=True).kernel == "moe_lab loop"
    assert moe_lab.grouped_mm_path("cpu", torch.float32, 32, 16, compiling=False).kernel != "moe_lab loop"


# ----------------------------------------------------------------------------- errors


def test_batched_mm_refuses_over_budget_before_allocating():
    experts, x, idx, w = make_case()
    experts.set_experts_implementation("batched_mm")
    predicted = moe_lab.predict_gather_bytes(24, 2, 32, 16, torch.float32)
    assert predicted == 24 * 2 * 3 * 32 * 16 * 4
    with moe_lab.batched_mm_budget(predicted - 1):
        with pytest.raises(moe_lab.GatherBudgetError) as info:
            experts(x, idx, w)
    assert info.value.predicted_bytes == predicted and info.value.budget_bytes == predicted - 1
    assert "would gather 288.0 KiB (294,912 bytes)" in str(info.value)
    assert "budget of 288.0 KiB (294,911 bytes)" in str(info.value) and "grouped_mm" in str(info.value)
    assert isinstance(info.value, ValueError)
    with moe_lab.batched_mm_budget(predicted):
        experts(x, idx, w)  # exactly at the budget is allowed
    assert moe_lab.get_batched_mm_budget() == 4 * 2**30  # context restored the default


def test_batched_mm_budget_from_environment(monkeypatch):
    monkeypatch.setenv("MOE_LAB_BATCHED_MM_BUDGET", "1e3")
    assert moe_lab.get_batched_mm_budget() == 1000
    monkeypatch.setenv("MOE_LAB_BATCHED_MM_BUDGET", "lots")
    with pytest.raises(ValueError, match="MOE_LAB_BATCHED_MM_BUDGET='lots'"):
        moe_lab.get_batched_mm_budget()
    with pytest.raises(ValueError, match="number of bytes"):
        moe_lab.set_batched_mm_budget(-5)


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(moe_lab.UnknownBackendError, match=r"unknown experts implementation 'flash'.*'eager', 'batched_mm', 'grouped_mm'"):
        moe_lab.get_backend("flash")
    experts, x, idx, w = make_case()
    with pytest.raises(ValueError, match="registered"):
        experts.set_experts_implementation("bmm")
    assert experts.get_experts_implementation() == "grouped_mm"  # unchanged after the error
    with pytest.raises(ValueError, match="registered"):
        moe_lab.Experts(experts.config, experts_implementation="Eager")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, i, w: (x[:, :-1], i, w), "hidden size 31 but the experts expect 32"),
        (lambda x, i, w: (x[0], i, w), "must be a 2-D tensor"),
        (lambda x, i, w: (x.double(), i, w), "differs from the expert weights' dtype"),
        (lambda x, i, w: (x, i[:-1], w[:-1]), r"top_k_index must be \[tokens=24, top_k\]"),
        (lambda x, i, w: (x, i, w[:, :1]), "must equal top_k_index shape"),
        (lambda x, i, w: (x, i.float(), w), "integer expert ids"),
        (lambda x, i, w: (x, i, w.long()), "must be floating point"),
        (lambda x, i, w: (x, i + 6, w), r"valid ids are 0\.\.5"),
        (lambda x, i, w: (x, i - 1, w), r"in \[-1"),
        (lambda x, i, w: (x, torch.zeros(24, 7, dtype=torch.long), torch.ones(24, 7)), "top_k=7 exceeds"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_value_errors(backend, mutate, message):
    experts, x, idx, w = make_case()
    experts.set_experts_implementation(backend)
    with pytest.raises(moe_lab.BackendInputError, match=message):
        experts(*mutate(x, idx, w))


def test_registry_register_as_decorator_and_call():
    def sorted_loop(experts, hidden_states, top_k_index, top_k_weights):
        return moe_lab.backends.eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights)

    try:
        decorated = moe_lab.register("test_decorated")(sorted_loop)
        assert decorated is sorted_loop
        moe_lab.register("test_plain", sorted_loop)
        assert moe_lab.available_backends()[:len(builtin_backends())] == builtin_backends()
        assert {"test_decorated", "test_plain"} <= set(moe_lab.available_backends())
        moe_lab.register("test_plain", sorted_loop)  # re-running a notebook cell is fine
        experts, x, idx, w = make_case()
        experts.set_experts_implementation("test_plain")
        ref = moe_lab.reference_experts_forward(experts, x, idx, w)
        assert moe_lab.relative_error(experts(x, idx, w), ref) < 1e-5
        with pytest.raises(ValueError, match="built-in backend; pass overwrite=True"):
            moe_lab.register("eager", sorted_loop)
        with pytest.raises(ValueError, match="cannot be removed"):
            moe_lab.unregister("grouped_mm")
        with pytest.raises(TypeError, match="must be callable"):
            moe_lab.register("not_callable", 42)
        with pytest.raises(ValueError, match="non-empty string"):
            moe_lab.register(" spaced ")
    finally:
        for name in ("test_decorated", "test_plain"):
            if name in moe_lab.available_backends():
                moe_lab.unregister(name)
    # Only the built-ins are left: BACKENDS, any other built-in kernel, and "auto" (it dispatches to them) last.
    assert moe_lab.available_backends() == builtin_backends() and set(builtin_backends()) >= {*BACKENDS, "auto"}
    assert moe_lab.available_backends()[-1] == "auto"
    with pytest.raises(moe_lab.UnknownBackendError):
        moe_lab.unregister("test_plain")
