"""One rank's experts, run through any registered backend, and the input checks of an EP layer.

    run_local_experts   rows in any order, each with its local expert id: the backend's forward, top_k = 1
    run_sorted_rows     rows already grouped by local expert, with the counts: the backend's `sorted_rows`
                        entry where its spec declares one (no sort, gather or un-permute), else the former
    run_partial_experts rows with k ids, some of them "not on this rank": the backend's `partial_forward`
                        entry where it has one, else ids clamped and weights zeroed
    partial_spec        which backend's entries run_partial_experts runs for a call
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..backends import Where, check_inputs, checked_forward, experts_forward, resolve_spec
from ..backends.common import expert_weights, needs_grad
from ..errors import BackendInputError
from ..modules import Experts


def run_local_experts(local: Experts, rows: torch.Tensor, local_expert_of_row: torch.Tensor) -> torch.Tensor:
    """[R, H] received rows, [R] local expert ids -> [R, H] each row through its expert, unweighted.

    The backend is the one `local` is set to, through moe_lab's checked entry point (unknown names,
    backends that cannot give the gradients a call needs and detached outputs are refused there).
    Every row is one (token, expert) pair, so the backend sees top_k = 1 and weight 1."""
    index = local_expert_of_row.view(-1, 1)  # [R, 1]
    ones = torch.ones(index.shape, dtype=torch.float32, device=rows.device)  # [R, 1]
    output = experts_forward(local.experts_implementation, local, rows, index, ones)  # [R, H]
    return _tied_if_empty(output, rows, local)


def run_sorted_rows(local: Experts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[R, H] rows grouped by local expert (expert 0's first), counts [E/w] summing to R -> [R, H] unweighted.

    Through the backend's `sorted_rows` entry when its spec has one and, if this call needs gradients,
    declares autograd; otherwise through its forward with each row's expert id (rebuilt from the counts
    on the device: no sync), as `run_local_experts` does."""
    if rows.dim() != 2 or rows.shape[1] != local.config.hidden_size or counts.shape != (local.num_experts,):
        raise BackendInputError(f"run_sorted_rows wants rows [R, {local.config.hidden_size}] and counts "
                                f"[{local.num_experts}], got {tuple(rows.shape)} and {tuple(counts.shape)}")
    grad = needs_grad(local, rows, counts)
    spec = resolve_spec(local.experts_implementation, local, rows, 1, grad)  # auto: the backend it runs here
    if spec.sorted_rows is not None:
        where = Where(rows.device, rows.dtype, local.config.hidden_size, local.config.intermediate_size)
        if not grad or spec.supports("autograd", where):
            return _tied_if_empty(spec.sorted_rows(local, rows, counts), rows, local)
    expert_of_row = torch.repeat_interleave(torch.arange(local.num_experts, device=rows.device), counts.long(),
                                            output_size=rows.shape[0])  # [R]
    return run_local_experts(local, rows, expert_of_row)


def run_partial_experts(local: Experts, rows: torch.Tensor, local_index: torch.Tensor, weights: torch.Tensor, *,
                        backend: str | None = None) -> torch.Tensor:
    """[N, H] rows, [N, k] local expert ids (>= E/w: that expert lives on another rank), [N, k] weights -> [N, H]:
    each row's weighted sum over the experts it has here (zeros for a row with none).

    Through the backend's `partial_forward` entry when its spec has one (for `auto`, the backend it chooses:
    `partial_spec`): the absent slots cost nothing, and their routing weights get a zero gradient. It is held
    to the backend's autograd declaration like the forward (`checked_forward`). Otherwise the generic path,
    transformers' way: absent ids clamped to a real expert and their weights zeroed, through the backend's
    forward. It trains too, but computes every absent slot and throws the result away: at EP=w about (w-1)/w
    of the expert FLOPs are wasted.

    `backend` (default: `local.experts_implementation`) names the registered backend; `local` may be any
    experts module moe_lab's backends run (a transformers one included)."""
    shapes = expert_weights(local)  # moe_lab's module or transformers' (transposed layouts too)
    El, hidden = shapes.num_experts, shapes.hidden_size
    if rows.dim() != 2 or rows.shape[1] != hidden or local_index.shape != weights.shape \
            or local_index.dim() != 2 or local_index.shape[0] != rows.shape[0]:
        raise BackendInputError(f"run_partial_experts wants rows [N, {hidden}], ids and weights "
                                f"[N, k], got {tuple(rows.shape)}, {tuple(local_index.shape)} and "
                                f"{tuple(weights.shape)}")
    spec = partial_spec(local, rows, local_index, weights, backend=backend)
    backend = spec.name  # auto: the backend it chooses for this call, with that backend's entries
    if spec.partial_forward is not None:
        check_inputs(local, rows, local_index, weights, absent_ids=True)
        output = checked_forward(spec, local, rows, local_index, weights, entry=spec.partial_forward)
        return _tied_if_empty(output, rows, local)
    absent = local_index >= El  # [N, k]
    clamped = torch.where(absent, torch.zeros_like(local_index), local_index)  # [N, k]: any real expert
    zeroed = torch.where(absent, torch.zeros_like(weights), weights)  # [N, k]: their results count zero
    if local_index.shape[1] <= El:
        output = experts_forward(backend, local, rows, clamped, zeroed)  # [N, H]
    else:  # top_k > E/w: a backend takes at most E/w slots a row, so the slots go in groups of E/w, summed
        wide = torch.promote_types(rows.dtype, torch.float32)  # each group rounded once, summed wider
        parts = [experts_forward(backend, local, rows, ids, w).to(wide)
                 for ids, w in zip(clamped.split(El, dim=1), zeroed.split(El, dim=1))]
        output = torch.stack(parts).sum(0).to(rows.dtype)  # [N, H]
    return _tied_if_empty(output, rows, local)


def partial_spec(local: Experts, rows: torch.Tensor, local_index: torch.Tensor, weights: torch.Tensor, *,
                 backend: str | None = None):
    """The BackendSpec `run_partial_experts` runs for this call: `backend`'s (default: the module's), or for a
    dispatcher (`auto`) the backend it chooses here. Its `partial_forward` is None where the absent slots are
    computed and thrown away (the generic path)."""
    backend = local.experts_implementation if backend is None else backend
    return resolve_spec(backend, local, rows, local_index.shape[1], needs_grad(local, rows, weights))


def _tied_if_empty(output: torch.Tensor, rows: torch.Tensor, local: Experts) -> torch.Tensor:
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
