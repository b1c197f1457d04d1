"""Dispatch and combine with exact split sizes: the rows each rank sends are exactly its pairs.

    top_k_index [T, k] (global expert ids) --flatten--> S = T*k (token, expert) pairs
    sort pairs by expert            -> order [S]; rank d's pairs are one contiguous block (sharding.py)
    counts [E] -> [world, E/w]      -> all-to-all of the counts: counts_in [world, E/w], what each rank sends here
    host reads the split sizes      -> the ONE sync: all_to_all_single needs them as Python ints
    rows = hidden[order // k]       [S, H]     sorted, grouped by destination rank
    all-to-all(rows)                [R, H]     R = counts_in.sum(): from rank 0, then rank 1, ... each by local expert
    local experts(rows)             [R, H]     any registered backend, one expert per row, weight 1
    all-to-all back                 [S, H]     the same rows, now through their expert, in `order`
    combine: un-sort, times the routing weights, sum each token's k rows -> [T, H]

The routing weights stay on the rank that owns the token: they multiply the returned rows in the
combine (a "weighted sum"), so no all-to-all carries them and their gradient is computed where
they live. The receiving rank knows each row's local expert from counts_in (rows arrive sorted by
expert within each source), so no expert ids travel either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routing import tokens_per_expert
from .collectives import all_to_all, exchange_counts
from .sharding import ExpertShard


@dataclass
class SortedPairs:
    """This rank's (token, expert) pairs sorted by global expert id."""

    order: torch.Tensor  # [S] int64: sorted position -> pair index (pair = token * k + slot)
    position: torch.Tensor  # [S] int64: pair index -> sorted position (the inverse of `order`)
    counts: torch.Tensor  # [E] int64 pairs per global expert
    sorted_experts: torch.Tensor  # [S] global expert id of each sorted pair
    top_k: int

    @property
    def token_of_sorted(self) -> torch.Tensor:
        return self.order // self.top_k  # [S]


def sort_pairs(top_k_index: torch.Tensor, num_experts: int) -> SortedPairs:
    flat = top_k_index.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S]
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return SortedPairs(order, position, tokens_per_expert(flat, num_experts), flat[order], top_k_index.shape[1])


@dataclass
class ExactPlan:
    """Split sizes of one dispatch, read on the host, and what the receiver needs to run its experts."""

    send_splits: list[int]  # [world] rows this rank sends to each rank
    receive_splits: list[int]  # [world] rows each rank sends here
    local_expert_of_row: torch.Tensor  # [R] int64 local expert of every received row


def plan_exact(pairs: SortedPairs, shard: ExpertShard, group) -> ExactPlan:
    """Exchange the per-expert counts, then read the split sizes on the host (one device sync)."""
    counts_out = pairs.counts.view(shard.world_size, shard.count)  # [world, E/w]
    counts_in = exchange_counts(counts_out, group)  # [world, E/w]
    both = torch.stack([counts_out.sum(1), counts_in.sum(1)]).tolist()  # the sync: split sizes as Python ints
    local_ids = torch.arange(shard.count, device=counts_in.device).repeat(shard.world_size)  # [world * E/w]
    local_expert_of_row = torch.repeat_interleave(local_ids, counts_in.reshape(-1), output_size=sum(both[1]))
    return ExactPlan(both[0], both[1], local_expert_of_row)


def dispatch_exact(hidden_states: torch.Tensor, pairs: SortedPairs, plan: ExactPlan, group) -> torch.Tensor:
    """[T, H] -> [R, H]: every pair's row sent to the rank that holds its expert."""
    rows = hidden_states[pairs.token_of_sorted]  # [S, H], grouped by destination rank
    return all_to_all(rows, plan.receive_splits, plan.send_splits, group)


def return_exact(expert_rows: torch.Tensor, plan: ExactPlan, group) -> torch.Tensor:
    """[R, H] expert outputs -> [S, H] back on the ranks that sent them, in sorted order."""
    return all_to_all(expert_rows, plan.send_splits, plan.receive_splits, group)


def weighted_sum(sorted_rows: torch.Tensor, pairs: SortedPairs, top_k_weights: torch.Tensor) -> torch.Tensor:
    """[S, H] rows in sorted order -> [T, H]: un-sort, scale by the routing weights, sum each token's k rows.

    Like the single-process backends: the weighted rows stay in the model dtype and the sum over k
    accumulates in float32 (torch's reduction), rounding once."""
    T, k = top_k_weights.shape
    by_pair = sorted_rows[pairs.position]  # [S, H] in (token, slot) order
    weighted = by_pair * top_k_weights.reshape(-1, 1).to(by_pair.dtype)  # [S, H]
    return weighted.view(T, k, sorted_rows.shape[-1]).sum(dim=1)  # [T, H]
