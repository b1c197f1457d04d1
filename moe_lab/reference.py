"""A float64 reference for the experts computation and its gradients, independent of every backend.

It does not sort, gather, loop or group: every token goes through every expert densely in
float64, and the routing becomes a dense [T, E] weight matrix (zero where a token did not pick an
expert). Slow and memory-hungry (T*E*2I numbers) — it exists to be obviously right. Its gradients
are autograd's through that dense float64 computation (`reference_gradients`).
"""
from __future__ import annotations

import torch

#: The tensors an experts computation is differentiated with respect to, where a module has them.
GRADIENT_INPUTS = ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _float64(tensor):
    return None if tensor is None else tensor.detach().to(torch.float64)


def _stored(experts) -> dict:
    """The module's weight tensors as stored (transposed layouts stay transposed), biases only if it has them."""
    stored = {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}
    if getattr(experts, "has_bias", False):
        stored.update(gate_up_proj_bias=experts.gate_up_proj_bias, down_proj_bias=experts.down_proj_bias)
    return stored


def _dense(experts, x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_proj_bias=None,
           down_proj_bias=None) -> torch.Tensor:
    """[T, H] from float64 tensors in the module's stored layout, every token through every expert."""
    if getattr(experts, "is_transposed", False):
        gate_up_proj, down_proj = gate_up_proj.transpose(-2, -1), down_proj.transpose(-2, -1)  # [E, 2I, H], [E, H, I]
    gate_up = torch.einsum("th,eoh->teo", x, gate_up_proj)  # [T, E, 2I]
    if gate_up_proj_bias is not None:
        gate_up = gate_up + gate_up_proj_bias  # + [E, 2I]
    if getattr(experts, "_apply_gate", None) is not None:
        h = experts._apply_gate(gate_up)  # [T, E, I], the module's own gating on the last dim
    else:
        intermediate = gate_up.shape[-1] // 2
        h = experts.act_fn(gate_up[..., :intermediate]) * gate_up[..., intermediate:]  # [T, E, I]
    y = torch.einsum("tei,ehi->teh", h, down_proj)  # [T, E, H]
    if down_proj_bias is not None:
        y = y + down_proj_bias  # + [E, H]
    dense_weights = torch.zeros(x.shape[0], gate_up_proj.shape[0], dtype=torch.float64, device=x.device)
    dense_weights = dense_weights.scatter_add(1, top_k_index.long(), top_k_weights)  # [T, E]
    return torch.einsum("te,teh->th", dense_weights, y)  # [T, H]


def reference_experts_forward(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """[T, H] float64 output of the gated experts for the given routing.

    Reads transformers' layout flags itself (`is_transposed`, `has_bias`) and uses a module's own
    `_apply_gate` if it has one (gpt-oss), so it also checks transformers' experts modules.
    """
    weights = {name: _float64(tensor) for name, tensor in _stored(experts).items()}
    with torch.no_grad():
        return _dense(experts, hidden_states.detach().to(torch.float64), top_k_index,
                      top_k_weights.detach().to(torch.float64), **weights)


def reference_gradients(experts, hidden_states, top_k_index, top_k_weights, grad_output) -> dict[str, torch.Tensor]:
    """Float64 gradients of <output, grad_output> with respect to every input in GRADIENT_INPUTS the
    module has (biases only with `has_bias`), each in its tensor's own (stored) layout.

    grad_output [T, H] is the upstream gradient (any dtype: taken to float64). The computation is the
    dense float64 one of `reference_experts_forward`, differentiated by autograd."""
    inputs = {"hidden_states": hidden_states, "top_k_weights": top_k_weights, **_stored(experts)}
    leaves = {name: tensor.detach().to(torch.float64).requires_grad_(True) for name, tensor in inputs.items()}
    with torch.enable_grad():
        weights = {name: leaves[name] for name in _stored(experts)}
        output = _dense(experts, leaves["hidden_states"], top_k_index, leaves["top_k_weights"], **weights)
        grads = torch.autograd.grad(output, list(leaves.values()), grad_output.detach().to(torch.float64),
                                    allow_unused=True)
    return {name: torch.zeros_like(leaf) if grad is None else grad
            for (name, leaf), grad in zip(leaves.items(), grads)}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are empty or zero)."""
    actual, expected = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    denominator = expected.norm()
    if denominator == 0:
        return float((actual - expected).norm())
    return float((actual - expected).norm() / denominator)


def max_abs_difference(actual: torch.Tensor, expected: torch.Tensor, *, slice_rows: int = 16) -> float:
    """The largest |actual - expected| in float32, computed over slices of the leading dimension so that no
    float32 copy of a whole tensor is made (a large layer's weight gradient is tens of GB in float32)."""
    return max((float((a.float() - b.float()).abs().max())
                for a, b in zip(actual.detach().split(slice_rows), expected.detach().split(slice_rows))
                if a.numel()), default=0.0)
