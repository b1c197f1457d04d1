"""Float64 gradients of an experts layer, and the tolerance a low-precision backend is held to.

`reference_gradients` differentiates a dense float64 formula (every token through every expert,
the routing as a dense [T, E] matrix, as `moe_lab.reference_experts_forward`, which detaches) with
torch's autograd. It reads transformers' layout flags (`is_transposed`, `has_bias`) and a module's
own `_apply_gate`, so it covers gpt-oss-style experts too. Shared by tests/test_triton_backward.py
(CPU, triton's interpreter) and tests/test_triton_gpu.py.
"""
from __future__ import annotations

import math

import torch

import moe_lab

#: The gradients a call produces, by the name of the input they belong to.
GRADIENT_NAMES = ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")

#: Roundings to the model dtype between the exact inputs and each gradient, in the triton backend:
#: forward out: h, y, out. hidden_states: the pre-activation, d_pre, dX per pair, dX.
#: top_k_weights: the pre-activation, h (accumulated in float32, then stored in the weights' dtype).
#: gate_up_proj: the pre-activation, d_pre, dW. down_proj: the pre-activation, weight * h, dW.
#: biases: as their weight. A module's own gate adds the gate's output (h) and torch's roundings
#: inside the gate's backward: two more.
ROUNDINGS = {"out": 3, "hidden_states": 4, "top_k_weights": 2, "gate_up_proj": 3, "down_proj": 3,
             "gate_up_proj_bias": 3, "down_proj_bias": 3}


def rounding_unit(dtype: torch.dtype, truncating: bool) -> float:
    """The largest relative error of one rounding to `dtype`: half an ulp (2^-p for p significand
    bits) when rounding to nearest, a whole ulp when truncating — triton's interpreter converts
    float32 to bfloat16 by dropping the low bits (checked in test_interpreter_truncates_bfloat16)."""
    significand_bits = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}[dtype]
    truncates = truncating and dtype == torch.bfloat16
    return 2.0 ** (1 - significand_bits) if truncates else 2.0 ** -significand_bits


def gradient_tolerance(name: str, dtype: torch.dtype, reduction_length: int, *, truncating: bool,
                       own_gate: bool = False) -> float:
    """Relative (Frobenius) error allowed against float64 for one gradient.

    Each rounding in the chain (ROUNDINGS) moves a value by at most one rounding unit, and the
    float32 accumulation of a length-L reduction by ~sqrt(L) float32 units (random signs); a chain
    of n roundings is bounded by n units. Nothing else is allowed: a gradient with one more
    rounding to the model dtype inside a long reduction — summing in bfloat16, or multiplying in
    TF32 — exceeds it (test_tolerance_rejects_low_precision_references).
    """
    roundings = ROUNDINGS[name] + (2 if own_gate and name != "top_k_weights" else 0)
    accumulation = math.sqrt(reduction_length) * rounding_unit(torch.float32, truncating=False)
    return roundings * rounding_unit(dtype, truncating) + 4 * accumulation


def reference_gradients(experts, hidden_states, top_k_index, top_k_weights, grad_out) -> dict[str, torch.Tensor]:
    """{name: float64 gradient of <out, grad_out>} for the hidden states, routing weights, both
    weights and (where the module has them) both biases, by autograd through a dense formula.
    A slot whose id is >= the number of experts is absent (expert parallelism: another rank's expert):
    it contributes nothing, and its routing weight's gradient is 0."""
    num_experts = experts.gate_up_proj.shape[0]
    absent = top_k_index >= num_experts
    top_k_index = top_k_index.masked_fill(absent, 0)  # any real expert, at weight 0 below
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    names = ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"] if has_bias else [])
    leaves = {name: getattr(experts, name).detach().double().requires_grad_(True) for name in names}
    leaves["hidden_states"] = hidden_states.detach().double().requires_grad_(True)
    leaves["top_k_weights"] = top_k_weights.detach().double().requires_grad_(True)
    gate_up, down = leaves["gate_up_proj"], leaves["down_proj"]
    if transposed:
        gate_up, down = gate_up.transpose(-2, -1), down.transpose(-2, -1)  # [E, 2I, H], [E, H, I]
    pre = torch.einsum("th,eoh->teo", leaves["hidden_states"], gate_up)  # [T, E, 2I]
    if has_bias:
        pre = pre + leaves["gate_up_proj_bias"]
    if getattr(experts, "_apply_gate", None) is not None:
        h = experts._apply_gate(pre)  # [T, E, I]
    else:
        gate, up = pre.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    y = torch.einsum("tei,ehi->teh", h, down)  # [T, E, H]
    if has_bias:
        y = y + leaves["down_proj_bias"]
    num_tokens, num_experts = hidden_states.shape[0], gate_up.shape[0]
    dense = torch.zeros(num_tokens, num_experts, dtype=torch.float64, device=y.device)
    present_weights = leaves["top_k_weights"].masked_fill(absent, 0.0)  # an absent slot's weight gets no gradient
    dense = dense.scatter_add(1, top_k_index.long(), present_weights)  # [T, E]
    out = torch.einsum("te,teh->th", dense, y)
    (out * grad_out.double()).sum().backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


def backend_gradients(backend: str, experts, hidden_states, top_k_index, top_k_weights, grad_out, *, plan=None,
                      partial: bool = False):
    """(output, {name: gradient}) of `backend` for <out, grad_out>, every input a fresh leaf.
    `plan`: the triton backend's launch plan instead of the one it would choose. `partial`: through the
    backend's partial_forward entry (ids >= num_experts absent)."""
    for parameter in experts.parameters():
        parameter.grad = None
    hidden = hidden_states.detach().clone().requires_grad_(True)
    weights = top_k_weights.detach().clone().requires_grad_(True)
    if partial and plan is None:
        out = moe_lab.backends.get_spec(backend).partial_forward(experts, hidden, top_k_index, weights)
    elif plan is None:
        out = moe_lab.experts_forward(backend, experts, hidden, top_k_index, weights)
    else:
        from moe_lab.backends.triton_fused import triton_experts_forward

        assert backend == "triton", "only the triton backend takes a launch plan"
        out = triton_experts_forward(experts, hidden, top_k_index, weights, plan=plan)
    (out.float() * grad_out.float()).sum().backward()
    grads = {"hidden_states": hidden.grad, "top_k_weights": weights.grad}
    for name in GRADIENT_NAMES[2:]:
        parameter = getattr(experts, name, None)
        if isinstance(parameter, torch.Tensor) and (name.endswith("proj") or getattr(experts, "has_bias", False)):
            grads[name] = parameter.grad
    return out, grads
