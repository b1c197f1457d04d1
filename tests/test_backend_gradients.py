"""Every backend trains or refuses: gradients against float64, and no silent detachment.

Gradients of <output, G> (G a random upstream gradient) with respect to the hidden states, both
weight tensors, the routing weights and, where a module has them, the biases — each compared with
autograd through the dense float64 reference (`moe_lab.reference.reference_gradients`) in float32
and bfloat16 through the real kernels, with `backend_cases.tolerance(dtype, reduction length)`.
The checker itself is tested on planted bugs (a detached weight, a dropped routing-weight term).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.reference import reference_gradients

sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_cases, also under --import-mode=importlib
from backend_cases import MATMUL_BACKENDS, UNIT_ROUNDOFF, make_case, tolerance  # noqa: E402


def run_with_grad(experts, x, idx, w, grad_output, forward=None):
    """Output and {input name: grad} of one backward; `forward(experts, x, idx, w)` defaults to the module."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().to(x.dtype if x.dtype == torch.float64 else torch.float32).requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    output = forward(experts, x, idx, w) if forward else experts(x, idx, w)
    output.backward(grad_output.to(output.dtype))
    grads = {"hidden_states": x.grad, "top_k_weights": w.grad}
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        parameter = getattr(experts, name, None)
        if isinstance(parameter, torch.Tensor) and parameter.requires_grad:
            grads[name] = parameter.grad
    return output, grads, (x, w)


def gradient_problems(experts, x, idx, w, dtype, seed=0, forward=None) -> list[str]:
    """What is wrong with the gradients of the current backend (empty: nothing)."""
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7))
    output, grads, (x_used, w_used) = run_with_grad(experts, x, idx, w, grad_output, forward)
    problems = []
    if not output.requires_grad or output.grad_fn is None:
        problems.append("the output has no grad_fn")
    expected = reference_gradients(experts, x_used, idx, w_used, grad_output)
    groups = torch.bincount(idx.reshape(-1), minlength=experts.gate_up_proj.shape[0])
    H, I = x.shape[1], experts.down_proj.numel() // (experts.gate_up_proj.shape[0] * x.shape[1])
    allowed = tolerance(dtype, max(H, 2 * I, int(groups.max()) if groups.numel() else 1))
    for name, want in expected.items():
        got = grads.get(name)
        if got is None:
            problems.append(f"{name}: no gradient")
            continue
        assert got.shape == want.shape, f"{name}: gradient shape {tuple(got.shape)} != {tuple(want.shape)}"
        error = moe_lab.relative_error(got, want)
        if not error <= allowed:
            problems.append(f"{name}: relative error {error:.2e} > {allowed:.2e}")
    return problems


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", MATMUL_BACKENDS)
def test_gradients_match_the_float64_reference(backend, dtype, distribution):
    experts, x, idx, w = make_case(dtype, distribution=distribution)
    experts.set_experts_implementation(backend)
    assert gradient_problems(experts, x, idx, w, dtype) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_mm_gradients_run_through_torchs_grouped_mm_op(dtype):
    # The float64 tests go through moe_lab's own loop; here, in float32 and bfloat16, torch's op runs.
    experts, x, idx, w = make_case(dtype)
    path = moe_lab.grouped_mm_path("cpu", dtype, x.shape[1], experts.intermediate_size)
    if not path.uses_torch_op:
        pytest.skip(f"torch's grouped_mm op does not run here: {path.reason}")
    experts.set_experts_implementation("grouped_mm")
    assert gradient_problems(experts, x, idx, w, dtype) == []


@pytest.mark.parametrize("backend", MATMUL_BACKENDS)
def test_gradcheck_in_float64(backend):
    experts, x, idx, w = make_case(torch.float64, T=5, H=6, I=4, E=4, k=2, distribution="zipf")
    experts.set_experts_implementation(backend)

    def f(x, w, gate_up, down):  # the layer with these weight tensors in place of its parameters
        return torch.func.functional_call(experts, {"gate_up_proj": gate_up, "down_proj": down}, (x, idx, w))

    inputs = tuple(t.detach().clone().requires_grad_(True)
                   for t in (x, w.double(), experts.gate_up_proj, experts.down_proj))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", MATMUL_BACKENDS)
def test_biases_transposed_layout_and_a_custom_gate(backend):
    # gpt-oss's experts: stored [E, H, 2I] / [E, I, H] (is_transposed), with biases, and gate/up rows
    # interleaved that its own `_apply_gate` (a clamped SwiGLU) takes apart.
    hf = pytest.importorskip("moe_lab.hf")
    model = hf.tiny_transformers_model("gpt_oss")
    experts = next(hf.experts_modules(model))  # random biases (tiny_transformers_model): a dropped term shows
    assert experts.has_bias and experts.is_transposed
    k = model.config.num_experts_per_tok
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    idx, w = moe_lab.synthetic_routing(9, experts.num_experts, k, seed=3)

    def forward(experts, x, idx, w):
        return moe_lab.experts_forward(backend, experts, x, idx, w)

    problems = gradient_problems(experts, x, idx, w, torch.float32, forward=forward)
    assert problems == []
    assert experts.gate_up_proj_bias.grad is not None and experts.down_proj_bias.grad is not None


@pytest.mark.parametrize("backend", [*MATMUL_BACKENDS, "auto"])
def test_the_router_learns_through_the_routing_weights(backend):
    # SparseMoeBlock: the router's weight gets its gradient only through top_k_weights (the top-k
    # choice itself is not differentiable). float32 against the same block in float64.
    config = moe_lab.MoEConfig(32, 12, num_experts=6, top_k=2, shared_expert_intermediate_size=8)
    blocks = {torch.float32: moe_lab.SparseMoeBlock(config, backend),
              torch.float64: moe_lab.SparseMoeBlock(config.replace(dtype=torch.float64), "eager")}
    blocks[torch.float64].load_state_dict({name: value.double() for name, value in blocks[torch.float32].state_dict().items()})
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    for dtype, block in blocks.items():
        (block(x.to(dtype)) * upstream.to(dtype)).sum().backward()
    got, want = dict(blocks[torch.float32].named_parameters()), dict(blocks[torch.float64].named_parameters())
    assert got.keys() == want.keys() and "router.weight" in got
    for name in got:
        assert got[name].grad is not None, f"{name}: no gradient"
        assert moe_lab.relative_error(got[name].grad, want[name].grad) < tolerance(torch.float32, 64), name


# ----------------------------------------------------------------------------- the checker is not blind


def _planted(name, forward):
    spec = dataclasses.replace(moe_lab.get_spec("grouped_mm"), name=name, forward=forward, builtin=False)
    moe_lab.register(name, spec)
    return name


def _detached_down_proj(experts, x, idx, w):
    class Detached:
        gate_up_proj, down_proj, act_fn = experts.gate_up_proj, experts.down_proj.detach(), experts.act_fn
        num_experts = experts.num_experts

    return moe_lab.get_backend("grouped_mm")(Detached, x, idx, w)


def _routing_weights_without_gradient(experts, x, idx, w):
    return moe_lab.get_backend("grouped_mm")(experts, x, idx, w.detach())


@pytest.mark.parametrize("forward, broken", [(_detached_down_proj, "down_proj: no gradient"),
                                             (_routing_weights_without_gradient, "top_k_weights: no gradient")])
def test_planted_gradient_bugs_are_caught(forward, broken):
    # Declared "autograd: yes" like grouped_mm, so the guard trusts them: the gradient check must see it.
    name = _planted("test_planted_bug", forward)
    try:
        experts, x, idx, w = make_case(torch.float32)
        experts.set_experts_implementation(name)
        assert broken in gradient_problems(experts, x, idx, w, torch.float32)
    finally:
        moe_lab.unregister(name)


def test_a_wrong_gradient_value_is_caught_and_a_low_precision_reference_fails_the_tolerance():
    experts, x, idx, w = make_case(torch.float32)
    experts.set_experts_implementation("grouped_mm")
    grad_output = torch.randn(x.shape)
    _, grads, (x_used, w_used) = run_with_grad(experts, x, idx, w, grad_output)
    expected = reference_gradients(experts, x_used, idx, w_used, grad_output)
    n = max(x.shape[1], 2 * experts.intermediate_size)
    assert moe_lab.relative_error(grads["down_proj"], expected["down_proj"]) <= tolerance(torch.float32, n)
    # A term dropped from one expert's gradient is far outside the tolerance.
    wrong = grads["down_proj"].clone()
    wrong[idx[0, 0]] *= 0.5
    assert moe_lab.relative_error(wrong, expected["down_proj"]) > 100 * tolerance(torch.float32, n)
    # A "reference" computed in bfloat16 fails a float32 tolerance by orders of magnitude.
    low = reference_gradients(copy.deepcopy(experts).to(torch.bfloat16), x_used.bfloat16(), idx, w_used.bfloat16(),
                              grad_output.bfloat16())
    rounded = {name: g.to(torch.bfloat16) for name, g in low.items()}
    assert moe_lab.relative_error(rounded["down_proj"], expected["down_proj"]) > 100 * tolerance(torch.float32, n)
    # And a sum of n bfloat16 terms accumulated in bfloat16 (not float32) fails the bfloat16 one.
    terms = torch.randn(4096, 64, dtype=torch.float64)
    exact = terms.sum(0)
    accumulator = torch.zeros(64, dtype=torch.bfloat16)
    for row in terms.to(torch.bfloat16):
        accumulator = accumulator + row
    assert moe_lab.relative_error(accumulator, exact) > tolerance(torch.bfloat16, 4096)
    assert UNIT_ROUNDOFF[torch.bfloat16] == 2.0**-8 and UNIT_ROUNDOFF[torch.float32] == 2.0**-24


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", MATMUL_BACKENDS)
def test_a_compiled_training_step_gives_the_launched_gradients(backend, dtype):
    # Where a backend declares fullgraph, torch.compile(fullgraph=True) must trace forward and backward
    # (grouped_mm's loop fallback, float32 here, has a custom-op backward: no .tolist() in the trace).
    where = moe_lab.Where.of("cpu", dtype, 64, 24)
    if not moe_lab.get_spec(backend).supports("fullgraph", where):
        pytest.skip(f"{backend} declares no fullgraph compile: {moe_lab.get_spec(backend).supports('fullgraph', where).reason}")
    experts, x, idx, w = make_case(dtype, T=12)
    experts.set_experts_implementation(backend)
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
        _, compiled_grads, _ = run_with_grad(experts, x, idx, w, grad_output, forward=lambda e, *a: compiled(*a))
        _, launched_grads, _ = run_with_grad(experts, x, idx, w, grad_output)
    finally:
        torch._dynamo.reset()
    for name, got in compiled_grads.items():
        assert got is not None, name
        assert moe_lab.relative_error(got, launched_grads[name]) <= tolerance(dtype, 64), name
