"""Notebook 07: two experts backends written from scratch, in the registry's signature.

    fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]

`sorted_loop_experts_forward` (registered as "sorted_loop" in the notebook)
    one argsort groups the S = T*k (token, expert) pairs by expert; ONE gather puts the hidden rows
    in that order; ONE host sync reads the group sizes; each expert then runs its two matmuls on a
    contiguous slice (a view, no copy); ONE weighted index_add sums the rows back into their tokens.
    The built-in `eager` gathers and scatters once per expert instead.

`padded_capacity_experts_forward` (registered as "padded_capacity")
    every expert gets a buffer of C rows (its capacity); pair number j of expert e (in token order)
    goes to row j of e's buffer if j < C, else it is DROPPED (contributes nothing). Two bmm over
    [E, C, H] run every expert at once, with no host sync: C comes from the shapes only. This is the
    GShard / Switch-Transformer scheme: fixed shapes, paid for with padding (C*E - S wasted rows when
    nothing is dropped) or with dropped tokens (when C is small). With `capacity=None` and
    `capacity_factor=None`, C = T: no pair can be dropped (a token picks an expert at most once).

Both read the weight layout through `moe_lab.backends.expert_weights` (so transformers' transposed /
biased experts modules work too) and gate through `moe_lab.backends.apply_gate`.
"""
from __future__ import annotations

import math

import torch

from ..backends import apply_gate, expert_weights
from ..parameters import Device, Dtype, Float, Int, Parameters, Rule
from ..routing import tokens_per_expert

PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(), num_experts=Int(min=1, max=256), top_k=Int(min=1, max=256),
    hidden_size=Int(min=1, max=1024), num_tokens=Int(min=1, max=4096), capacity_factor=Float(positive=True, max=64),
    seed=Int(min=0),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts")],
)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # sum the k contributions in at least float32


def sorted_loop_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Sort once, loop over experts on contiguous slices, index_add back once. [T, H] -> [T, H]."""
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    w = expert_weights(experts)  # w.gate_up [E, 2I, H], w.down [E, H, I]

    # 1. One argsort: pair p = (token p // k, slot p % k); sorting by expert groups the pairs.
    expert_of_pair = top_k_index.reshape(-1)  # [S = T*k]
    order = torch.argsort(expert_of_pair, stable=True)  # [S] pair ids, expert 0's first
    token_of_row = order // top_k  # [S] the token of each sorted row
    x_sorted = hidden_states[token_of_row]  # [S, H] ONE gather; expert e's rows are contiguous

    # 2. One host sync: the loop bounds must be Python ints (on a GPU `.tolist()` waits for it).
    group_sizes = tokens_per_expert(top_k_index, w.num_experts).tolist()  # E ints, sum S

    # 3. Per-expert matmuls on contiguous slices (views: no copy). Empty experts are skipped.
    y_sorted = torch.empty_like(x_sorted)  # [S, H]; every row is written below
    start = 0
    for expert, size in enumerate(group_sizes):
        if size:
            rows = slice(start, start + size)
            gate_up = x_sorted[rows] @ w.gate_up[expert].T  # [n, H] @ [H, 2I] -> [n, 2I]
            if w.gate_up_bias is not None:
                gate_up = gate_up + w.gate_up_bias[expert]
            y = apply_gate(experts, gate_up) @ w.down[expert].T  # [n, I] @ [I, H] -> [n, H]
            y_sorted[rows] = y if w.down_bias is None else y + w.down_bias[expert]
        start += size

    # 4. Weight each row by its routing weight, then ONE index_add sums the k rows of each token.
    acc = _accumulation_dtype(hidden_states.dtype)
    weight_of_row = top_k_weights.reshape(-1)[order].to(acc)  # [S]
    output = torch.zeros(num_tokens, hidden, dtype=acc, device=hidden_states.device)  # [T, H]
    output.index_add_(0, token_of_row, y_sorted.to(acc) * weight_of_row[:, None])
    return output.to(hidden_states.dtype)  # [T, H]


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None = None,
                 capacity: int | None = None) -> int:
    """Rows per expert buffer: `capacity` if given, else ceil(factor * T*k / E), else T (nothing dropped)."""
    if capacity is not None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        return int(capacity)
    if capacity_factor is None:
        return int(num_tokens)  # a token picks an expert at most once: no expert can get more than T pairs
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_slots(top_k_index: torch.Tensor, num_experts: int, capacity: int):
    """(slot [T, k], kept [T, k] bool): each pair's row in its expert's buffer, and whether slot < C.

    Slots count each expert's pairs in token order (token 0 first), so when an expert is over
    capacity the LAST tokens are dropped. Sync-free: a stable sort and a cumulative count.
    """
    expert_of_pair = top_k_index.reshape(-1)  # [S]
    order = torch.argsort(expert_of_pair, stable=True)  # [S]
    counts = tokens_per_expert(top_k_index, num_experts)  # [E]
    group_start = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
    rank_sorted = torch.arange(order.numel(), device=order.device) - group_start[expert_of_pair[order]]  # [S]
    slot = torch.empty_like(rank_sorted).index_copy_(0, order, rank_sorted)  # [S] back in pair order
    return slot.view(top_k_index.shape), (slot < capacity).view(top_k_index.shape)


def padded_capacity_experts_forward(experts, hidden_states, top_k_index, top_k_weights, *,
                                    capacity: int | None = None, capacity_factor: float | None = None):
    """Fixed-capacity buffers [E, C, H] and two bmm; pairs over capacity are dropped. [T, H] -> [T, H]."""
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    w = expert_weights(experts)  # w.gate_up [E, 2I, H], w.down [E, H, I]
    E = w.num_experts
    C = capacity_for(num_tokens, top_k, E, capacity_factor, capacity)  # from shapes only: no sync

    # Dispatch: pair (t, j) of expert e goes to row e*C + slot of a flat [E*C + 1, H] buffer; the extra
    # last row is a bin for dropped pairs (written, never used), so no data-dependent shape is needed.
    slot, kept = capacity_slots(top_k_index, E, C)  # [T, k], [T, k]
    dest = torch.where(kept, top_k_index * C + slot, E * C).reshape(-1)  # [S] row in the flat buffer
    token_of_pair = torch.arange(num_tokens * top_k, device=hidden_states.device) // top_k  # [S]
    buffer = hidden_states.new_zeros(E * C + 1, hidden)  # [E*C + 1, H], padding rows stay zero
    buffer[dest] = hidden_states[token_of_pair]  # only the bin row may be written twice

    x = buffer[:E * C].view(E, C, hidden)  # [E, C, H]
    gate_up = torch.bmm(x, w.gate_up.transpose(1, 2))  # [E, C, H] @ [E, H, 2I] -> [E, C, 2I]
    if w.gate_up_bias is not None:
        gate_up = gate_up + w.gate_up_bias[:, None, :]
    y = torch.bmm(apply_gate(experts, gate_up), w.down.transpose(1, 2))  # [E, C, I] @ [E, I, H] -> [E, C, H]
    if w.down_bias is not None:
        y = y + w.down_bias[:, None, :]

    # Combine: read each pair's row back (dropped pairs read the zero bin row), weight, sum over k.
    y = torch.cat([y.reshape(E * C, hidden), y.new_zeros(1, hidden)])  # [E*C + 1, H]
    acc = _accumulation_dtype(hidden_states.dtype)
    y_pair = y[dest].to(acc) * top_k_weights.reshape(-1, 1).to(acc)  # [S, H]
    return y_pair.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)  # [T, H]


def edge_cases(num_experts: int, top_k: int, hidden_size: int, *, seed: int = 0, device="cpu", dtype=torch.float32):
    """{case: (hidden_states, top_k_index, top_k_weights)} for the inputs that break hand-written backends,
    each with its own number of tokens: experts with no token, one token, no tokens, top_k = E."""
    from ..routing import synthetic_routing

    routings = {
        "zero-token experts": synthetic_routing(16, num_experts, top_k, distribution="single", seed=seed),
        "one token": synthetic_routing(1, num_experts, top_k, seed=seed),
        "no tokens": synthetic_routing(0, num_experts, top_k, seed=seed),
        "top_k = E": synthetic_routing(8, num_experts, num_experts, seed=seed),
    }
    cases = {}
    for number, (case, (index, weights)) in enumerate(routings.items()):
        generator = torch.Generator().manual_seed(seed + number)
        hidden = torch.randn(index.shape[0], hidden_size, generator=generator)
        cases[case] = (hidden.to(device, dtype), index.to(device), weights.to(device))
    return cases


def rounding_report(results, tolerance: float):
    """Which backends' rel_err exceeds `tolerance` at which T, in one sentence (a `figures.Prose`)."""
    from .figures import Prose

    measured = results.dropna(subset=["rel_err"])
    over = measured[measured["rel_err"] > tolerance]
    if over.empty:
        return Prose(f"Every backend stayed within {tolerance:g} of the float64 reference at every T measured.")
    parts = [f"{backend} at T={', '.join(str(int(t)) for t in sorted(rows['num_tokens']))}"
             for backend, rows in over.groupby("backend", sort=False)]
    exact = sorted(set(measured["backend"]) - set(over["backend"]))
    return Prose(f"Above {tolerance:g} of the float64 reference: {'; '.join(parts)}. At rounding level everywhere: "
                 f"{', '.join(exact)}.")
