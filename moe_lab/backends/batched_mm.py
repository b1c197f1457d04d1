"""`batched_mm`: gather one weight copy per (token, expert) pair and run `torch.bmm`.

No loop and no host sync: every shape is known from T and k alone, so it traces cleanly under
torch.compile and CUDA graphs. The price is memory traffic: T*k copies of a [2I, H] and a [H, I]
matrix are materialised. At decode (T=1) that is just the k experts a token needs — cheap; at
T=8192 on Qwen3-30B-A3B it is 8192*8*3*2048*768*2 bytes = 594 GiB. So the backend predicts the
bytes before gathering and refuses (GatherBudgetError) instead of killing the process with an OOM.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import GatherBudgetError
from .common import apply_gate, expert_weights, sum_over_top_k
from .spec import BackendSpec, yes

DEFAULT_BUDGET_BYTES = 4 * 2**30
_budget_bytes: int | None = None  # None: use the environment variable or the default


def get_batched_mm_budget() -> int:
    """Bytes batched_mm may gather: set_batched_mm_budget(), else $MOE_LAB_BATCHED_MM_BUDGET, else 4 GiB."""
    if _budget_bytes is not None:
        return _budget_bytes
    env = os.environ.get("MOE_LAB_BATCHED_MM_BUDGET")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"MOE_LAB_BATCHED_MM_BUDGET={env!r} is not a number of bytes") from None
    return DEFAULT_BUDGET_BYTES


def set_batched_mm_budget(num_bytes: int | None) -> None:
    """Set the gather budget in bytes for this process (None restores the default)."""
    global _budget_bytes
    if num_bytes is not None and (not isinstance(num_bytes, (int, float)) or num_bytes < 0):
        raise ValueError(f"the batched_mm budget must be a number of bytes >= 0 or None, got {num_bytes!r}")
    _budget_bytes = None if num_bytes is None else int(num_bytes)


@contextlib.contextmanager
def batched_mm_budget(num_bytes: int | None):
    """Temporarily change the gather budget: `with batched_mm_budget(2**30): ...`."""
    previous = _budget_bytes
    set_batched_mm_budget(num_bytes)
    try:
        yield
    finally:
        set_batched_mm_budget(previous)


def predict_gather_bytes(num_tokens: int, top_k: int, hidden_size: int, intermediate_size: int,
                         dtype: torch.dtype) -> int:
    """Bytes of expert weights batched_mm materialises: T*k * (2I*H + H*I) * itemsize."""
    itemsize = dtype.itemsize  # bytes per element, no tensor allocated
    return num_tokens * top_k * 3 * hidden_size * intermediate_size * itemsize


def gathered_matvec(weight: torch.Tensor, expert_of_pair: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight [E, out, in] (maybe a transposed view), expert_of_pair [S], v [S, in] -> [S, out].

    The gather copies each pair's expert matrix in its STORED layout (a gather through a transposed
    view would read it strided), and the product is oriented to match: [out, in] rows times a
    column, or for modules stored [E, in, out] (is_transposed) a row times [in, out]."""
    stored = weight.transpose(-2, -1)  # [E, in, out]
    if stored.is_contiguous() and not weight.is_contiguous():
        return torch.bmm(v.unsqueeze(1), stored[expert_of_pair]).squeeze(1)  # [S, 1, in] @ [S, in, out]
    return torch.bmm(weight[expert_of_pair], v.unsqueeze(-1)).squeeze(-1)  # [S, out, in] @ [S, in, 1]


def batched_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    weights = expert_weights(experts)  # gate_up [E, 2I, H], down [E, H, I]

    predicted = predict_gather_bytes(num_tokens, top_k, hidden, weights.intermediate_size, weights.gate_up.dtype)
    budget = get_batched_mm_budget()
    if predicted > budget:
        raise GatherBudgetError(
            predicted, budget,
            f"T={num_tokens} tokens x top_k={top_k} copies of [2I+I={3 * weights.intermediate_size}] x "
            f"[H={hidden}] {weights.gate_up.dtype} weights",
        )

    expert_of_pair = top_k_index.reshape(-1)  # [S = T*k]
    # Each token repeated k times, matching the row-major flattening of top_k_index.
    x = hidden_states.unsqueeze(1).expand(num_tokens, top_k, hidden).reshape(-1, hidden)  # [S, H]

    gate_up = gathered_matvec(weights.gate_up, expert_of_pair, x)  # gather [S, 2I, H] -> [S, 2I]
    if weights.gate_up_bias is not None:
        gate_up = gate_up + weights.gate_up_bias[expert_of_pair]
    h = apply_gate(experts, gate_up)  # [S, I]
    y = gathered_matvec(weights.down, expert_of_pair, h)  # gather [S, H, I] -> [S, H]
    if weights.down_bias is not None:
        y = y + weights.down_bias[expert_of_pair]

    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)  # [S, H] weighted by the router
    # Sum the k contributions of each token with a reshape, not index_add_: deterministic on CUDA.
    return sum_over_top_k(y, num_tokens, top_k)  # [T, H]


_SHAPES_FROM_T_AND_K = "every shape follows from T and k, so nothing is read on the host"

SPEC = BackendSpec(
    name="batched_mm",
    forward=batched_mm_experts_forward,
    summary="gather one weight copy per (token, expert) pair and run torch.bmm (refuses over its gather budget)",
    runs=yes("torch ops only: any device and floating dtype"),
    autograd=yes("torch ops throughout (gather, bmm, sum)"),
    cuda_graph=yes(_SHAPES_FROM_T_AND_K),
    fullgraph=yes(_SHAPES_FROM_T_AND_K),
    sync_free=yes(_SHAPES_FROM_T_AND_K),
    builtin=True,
)
