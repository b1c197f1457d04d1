"""A float64 reference for the experts computation, independent of every backend.

It does not sort, gather, loop or group: every token goes through every expert densely in
float64, and the routing becomes a dense [T, E] weight matrix (zero where a token did not pick an
expert). Slow and memory-hungry (T*E*2I numbers) — it exists to be obviously right.
"""
from __future__ import annotations

import torch


def _float64(tensor):
    return None if tensor is None else tensor.detach().to(torch.float64)


def reference_experts_forward(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """[T, H] float64 output of the gated experts for the given routing.

    Reads transformers' layout flags itself (`is_transposed`, `has_bias`) and uses a module's own
    `_apply_gate` if it has one (gpt-oss), so it also checks transformers' experts modules.
    """
    x = hidden_states.to(torch.float64)  # [T, H]
    gate_up_proj = _float64(experts.gate_up_proj)  # [E, 2I, H]
    down_proj = _float64(experts.down_proj)  # [E, H, I]
    if getattr(experts, "is_transposed", False):
        gate_up_proj, down_proj = gate_up_proj.transpose(-2, -1), down_proj.transpose(-2, -1)
    has_bias = getattr(experts, "has_bias", False)
    gate_up = torch.einsum("th,eoh->teo", x, gate_up_proj)  # [T, E, 2I]
    if has_bias:
        gate_up = gate_up + _float64(experts.gate_up_proj_bias)  # + [E, 2I]
    if getattr(experts, "_apply_gate", None) is not None:
        h = experts._apply_gate(gate_up)  # [T, E, I], the module's own gating on the last dim
    else:
        intermediate = gate_up.shape[-1] // 2
        h = experts.act_fn(gate_up[..., :intermediate]) * gate_up[..., intermediate:]  # [T, E, I]
    y = torch.einsum("tei,ehi->teh", h, down_proj)  # [T, E, H]
    if has_bias:
        y = y + _float64(experts.down_proj_bias)  # + [E, H]
    dense_weights = torch.zeros(x.shape[0], gate_up_proj.shape[0], dtype=torch.float64, device=x.device)
    dense_weights.scatter_add_(1, top_k_index.long(), top_k_weights.to(torch.float64))  # [T, E]
    return torch.einsum("te,teh->th", dense_weights, y)  # [T, H]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are empty or zero)."""
    actual, expected = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    denominator = expected.norm()
    if denominator == 0:
        return float((actual - expected).norm())
    return float((actual - expected).norm() / denominator)
