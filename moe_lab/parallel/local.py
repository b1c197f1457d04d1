"""One rank's experts, run through any registered backend, and the input checks of an EP layer."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..backends import check_inputs, experts_forward
from ..modules import Experts


def run_local_experts(local: Experts, rows: torch.Tensor, local_expert_of_row: torch.Tensor) -> torch.Tensor:
    """[R, H] received rows, [R] local expert ids -> [R, H] each row through its expert, unweighted.

    The backend is the one `local` is set to, through moe_lab's checked entry point (unknown names,
    backends that cannot give the gradients a call needs and detached outputs are refused there).
    Every row is one (token, expert) pair, so the backend sees top_k = 1 and weight 1."""
    index = local_expert_of_row.view(-1, 1)  # [R, 1]
    ones = torch.ones(index.shape, dtype=torch.float32, device=rows.device)  # [R, 1]
    output = experts_forward(local.experts_implementation, local, rows, index, ones)  # [R, H]
    if rows.shape[0] == 0 and torch.is_grad_enabled():
        # A rank that received nothing must still take part in the backward all-to-alls, and autograd runs
        # a node's backward only if the loss depends on it. Some backends skip an empty input entirely
        # (eager returns a fresh, detached tensor), so tie the empty output to the received rows and the
        # weights: a zero-sized sum, whose gradients are zeros.
        anchors = [t[:0].sum() for t in (rows, local.gate_up_proj, local.down_proj) if t.requires_grad]
        if anchors:
            output = output + sum(anchors).to(output.dtype)
    return output


def check_routed_inputs(local: Experts, num_experts: int, hidden_states, top_k_index, top_k_weights) -> None:
    """The single-process checks (shapes, dtypes, one device, ids in 0..E-1 for CPU tensors) against
    the whole layer's E experts: a stand-in module whose weights are this rank's first expert
    broadcast to E (a view, no memory)."""
    whole_layer = SimpleNamespace(
        gate_up_proj=local.gate_up_proj[:1].expand(num_experts, -1, -1),  # [E, 2I, H]
        down_proj=local.down_proj[:1].expand(num_experts, -1, -1),  # [E, H, I]
    )
    check_inputs(whole_layer, hidden_states, top_k_index, top_k_weights)
