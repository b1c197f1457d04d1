"""Every built-in backend against the independent float64 reference: values, gradients, errors."""
import pytest
import torch

import moe_lab
from moe_lab.backends import batched_mm_experts_forward, eager_experts_forward, grouped_mm_experts_forward
from moe_lab.backends import builtin_backends

BACKENDS = ["eager", "batched_mm", "grouped_mm"]

# Relative (Frobenius) error allowed against the float64 reference, per dtype.
# float32: ~1e-7 per rounding, a few hundred accumulations per output -> 1e-5 is comfortable.
# float16: 11-bit mantissa (eps 2^-11 = 4.9e-4); inputs, weights, the [S, 2I] and [S, I]
#   intermediates and the output are each rounded once -> a few eps ~ 3e-3.
# bfloat16: 8-bit mantissa (eps 2^-8 = 3.9e-3), the same chain of roundings -> ~3e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def make_case(dtype=torch.float32, T=24, H=32, I=16, E=6, k=2, distribution="uniform", seed=0):
    cfg = moe_lab.MoEConfig(H, I, num_experts=E, top_k=k, dtype=dtype)
    experts = moe_lab.Experts(cfg)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=generator).to(dtype)
    idx, w = moe_lab.synthetic_routing(T, E, k, distribution=distribution, skew=1.5, seed=seed)
    return experts, x, idx, w


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distribution", ["uniform", "zipf", "single"])
def test_forward_matches_float64_reference(backend, dtype, distribution):
    experts, x, idx, w = make_case(dtype, distribution=distribution)
    experts.set_experts_implementation(backend)
    out = experts(x, idx, w)
    assert out.shape == x.shape and out.dtype == dtype
    ref = moe_lab.reference_experts_forward(experts, x, idx, w)
    assert moe_lab.relative_error(out, ref) < TOLERANCE[dtype]


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_reference(backend):
    # Gradients w.r.t. inputs, both weight tensors and the routing weights, in float64 so the
    # comparison is exact up to summation order.
    experts, x, idx, w = make_case(torch.float64, T=12, H=16, I=8, E=5, k=2, distribution="zipf")
    experts.set_experts_implementation(backend)
    x.requires_grad_(True)
    w = w.double().requires_grad_(True)
    upstream = torch.randn(12, 16, dtype=torch.float64)

    (experts(x, idx, w) * upstream).sum().backward()
    got = [x.grad, w.grad, experts.gate_up_proj.grad, experts.down_proj.grad]

    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    experts.zero_grad()
    gate_up = experts.gate_up_proj
    # The reference detaches the weights, so differentiate a functional copy of it instead.
    weights = [gate_up.detach().clone().requires_grad_(True), experts.down_proj.detach().clone().requires_grad_(True)]

    class Params:
        gate_up_proj, down_proj = weights
        act_fn = experts.act_fn

    ref_out = _reference_with_grad(Params, x_ref, idx, w_ref)
    (ref_out * upstream).sum().backward()
    expected = [x_ref.grad, w_ref.grad, weights[0].grad, weights[1].grad]
    for name, g, e in zip(["hidden_states", "top_k_weights", "gate_up_proj", "down_proj"], got, expected):
        assert g is not None, f"no gradient for {name}"
        assert moe_lab.relative_error(g, e) < 1e-10, name


def _reference_with_grad(params, x, idx, w):
    gate_up = torch.einsum("th,eoh->teo", x, params.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.einsum("tei,ehi->teh", params.act_fn(gate) * up, params.down_proj)
    dense = torch.zeros(x.shape[0], params.gate_up_proj.shape[0], dtype=x.dtype).scatter_add(1, idx, w)
    return torch.einsum("te,teh->th", dense, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradients_through_torch_grouped_op_path(backend, dtype):
    # H=32, I=16 are aligned, so in fp32/bf16 grouped_mm runs torch's grouped_mm op (and its backward).
    experts, x, idx, w = make_case(dtype, T=10)
    experts.set_experts_implementation(backend)
    experts(x, idx, w).float().pow(2).sum().backward()
    got = experts.gate_up_proj.grad.float().clone()
    experts.zero_grad()
    experts.set_experts_implementation("eager")
    experts(x, idx, w).float().pow(2).sum().backward()
    assert moe_lab.relative_error(got, experts.gate_up_proj.grad) < TOLERANCE[dtype]


def test_raw_backend_functions_are_the_registered_ones():
    assert moe_lab.get_backend("eager") is eager_experts_forward
    assert moe_lab.get_backend("batched_mm") is batched_mm_experts_forward
    assert moe_lab.get_backend("grouped_mm") is grouped_mm_experts_forward


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
        assert moe_lab.available_backends()[:3] == BACKENDS
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
