"""Dispatch each token once per destination rank, not once per (token, expert) pair.

The exact layer sends a row for every pair: T*k rows out and T*k back. A token whose k experts live on
one rank sends that rank the same row several times. Here a token sends one row to every rank that holds
at least one of its experts, with its routing (the k weights, and its k expert ids made local to that rank,
E/w where the expert lives elsewhere); the receiver expands the rows to its pairs, runs its experts on
rows grouped by expert, and sums each row's weighted expert outputs before sending ONE row back; the
sender adds a token's returned rows. (DeepEP's and torchtitan's token dispatchers aim at the same.)

    sender (T tokens)                                                         host
    sends_to [T, world] = does token t have an expert on rank d?
    counts [world, 1 + E/w] = rows for d, then pairs per expert of d  -> all_to_all_single (no autograd)
    rows = hidden[sent tokens], meta = (weights, local ids)            queued before the sync
    .tolist() of the split sizes                                                         <- the ONE sync
    all-to-all rows [N, H] and meta [N, 2k]       -> receiver: [N_in, H], [N_in, 2k]
    receiver: its P pairs sorted by local expert (a sort of N_in*k small ids, not of rows), x = rows[pair row]
              y = local experts on x grouped by expert (the backend's sorted_rows entry)    [P, H]
              partial[row] = sum of its pairs' weight * y                                     [N_in, H]
    all-to-all partial back -> [N, H]; output[t] = sum of t's returned rows                  [T, H]

At EP=2 with k=8 of 128 experts a token needs about 2 rows instead of 8: about 4x fewer bytes in each
all-to-all (docs/expert_parallelism.md has the bytes). Both weighted sums are `embedding_bag` in "sum" mode:
a gather, a per-row weight and a sum over a variable number of rows in one kernel, accumulated in float32
for half-precision rows and rounded once, with backward to the rows and to the weights.

Output and gradients (hidden states, routing weights, both weight tensors) equal the single-process
layer's (tests/test_expert_parallel_dedup.py). Every rank must call forward and backward together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backends.common import expert_counts
from .collectives import all_to_all, start_count_exchange
from .layer import ExpertParallelExperts
from .local import check_routed_inputs, run_sorted_rows
from .sharding import ExpertShard


@dataclass
class TokenPlan:
    """One forward's layout on the sender, and the split sizes read on the host."""

    send_rows: list[int]  # [world] token rows this rank sends to each rank
    receive_rows: list[int]  # [world] token rows each rank sends here
    receive_pairs: int  # pairs for this rank's experts, over all sources: P
    pairs_per_local_expert: torch.Tensor  # [E/w] on the device, over all sources
    rows_by_token: torch.Tensor  # [N] sent rows ordered by token: the combine's bags
    token_offsets: torch.Tensor  # [T] where each token's bag starts in rows_by_token


def plan_token_dispatch(hidden_states, top_k_index, top_k_weights, shard: ExpertShard, group, chunks: int = 1):
    """[(plan, rows [N, H], routing [N, 2k])] for each of `chunks` consecutive chunks of the tokens: which rows
    go where and with what routing. Every chunk's counts go in ONE exchange, started first; the rows are
    gathered while it moves; then the one host sync for all chunks.

    routing holds each row's k weights, then its k expert ids made local to its destination (E/w: that
    expert lives elsewhere), as floats, so one differentiable all-to-all carries both (ids < 2^24 are exact
    in float32)."""
    world = shard.world_size
    index_chunks = torch.tensor_split(top_k_index, chunks)
    counted = [_count(index, shard) for index in index_chunks]  # n x (sends_to [T_c, world], counts [world, 1 + E/w])
    counts_out = torch.stack([counts for _, counts in counted], dim=1)  # [world, n, 1 + E/w]
    counts_in, exchange = start_count_exchange(counts_out.reshape(world, -1), group)  # [world, n * (1 + E/w)]
    laid_out = [_lay_out(h, index, w, sends_to, counts, shard) for h, index, w, (sends_to, counts) in
                zip(torch.tensor_split(hidden_states, chunks), index_chunks, torch.tensor_split(top_k_weights, chunks),
                    counted)]
    exchange.wait()
    counts_in = counts_in.view(world, chunks, -1)  # [world, n, 1 + E/w]
    sizes = torch.stack([counts_out[:, :, 0], counts_in[:, :, 0], counts_in[:, :, 1:].sum(2)]).tolist()  # the sync
    planned = []
    for c, (rows, routing, rows_by_token, per_token) in enumerate(laid_out):
        send_rows = [sizes[0][d][c] for d in range(world)]
        receive_rows = [sizes[1][s][c] for s in range(world)]
        N = sum(send_rows)
        plan = TokenPlan(send_rows, receive_rows, sum(sizes[2][s][c] for s in range(world)),
                         counts_in[:, c, 1:].sum(0), rows_by_token[:N], per_token.cumsum(0) - per_token)
        planned.append((plan, rows[:N], routing[:N]))
    return planned


def _count(top_k_index, shard: ExpertShard):
    """sends_to [T, world] (has token t an expert on rank d?) and counts [world, 1 + E/w]: the token rows for
    each rank, then the pairs for each of its experts."""
    T = top_k_index.shape[0]
    world, El = shard.world_size, shard.count
    sends_to = torch.zeros(T, world, dtype=torch.bool, device=top_k_index.device)
    sends_to.scatter_(1, top_k_index.long() // El, True)  # [T, world] (scatter wants int64 ids; int32 are allowed)
    pairs = expert_counts(top_k_index.reshape(-1).int(), shard.num_experts).long().view(world, El)  # [world, E/w]
    return sends_to, torch.cat([sends_to.sum(0).view(world, 1), pairs], dim=1)


def _lay_out(hidden_states, top_k_index, top_k_weights, sends_to, counts, shard: ExpertShard):
    """Rows, routing and the combine's order for the most rows a token can send (one per rank, at most k),
    so nothing here needs the sync: [most, H], [most, 2k], [most] (sent rows first, by token), [T]."""
    T, k = top_k_index.shape
    world, El = shard.world_size, shard.count
    most = T * min(k, world)
    entry = torch.argsort(sends_to.t().reshape(-1).logical_not().to(torch.int8), stable=True)[:most]  # [most]
    send_token, destination = entry % max(T, 1), entry // max(T, 1)  # [most]: (destination, token), sent first
    rows = hidden_states[send_token]  # [most, H]
    local = top_k_index[send_token] - (destination * El).unsqueeze(1)  # [most, k]
    local = torch.where((local >= 0) & (local < El), local, El)
    routing_dtype = torch.promote_types(top_k_weights.dtype, torch.float32)
    routing = torch.cat([top_k_weights[send_token].to(routing_dtype), local.to(routing_dtype)], dim=1)  # [most, 2k]
    is_sent = torch.arange(most, device=entry.device) < counts[:, 0].sum()  # [most]
    rows_by_token = torch.argsort(torch.where(is_sent, send_token, T), stable=True)  # [most], sent rows first
    return rows, routing, rows_by_token, sends_to.sum(1)


def experts_on_received(local_experts, received, routing, plan: TokenPlan) -> torch.Tensor:
    """[N_in, H] received rows, [N_in, 2k] their routing -> [N_in, H]: each row's weighted sum over the
    experts it has here."""
    k = routing.shape[1] // 2
    weights, local_id = routing[:, :k], routing[:, k:].int()  # [N_in, k] each; ids E/w: not here (int32: a radix
    # sort of 32-bit keys takes half the passes of int64 ones)
    pair_of_sorted = torch.argsort(local_id.reshape(-1), stable=True)[:plan.receive_pairs]  # [P] row*k + slot
    x = received[pair_of_sorted // k]  # [P, H] grouped by local expert: the expansion is the permutation
    y = run_sorted_rows(local_experts, x, plan.pairs_per_local_expert)  # [P, H]
    pair_in_row_order, y_row = torch.sort(pair_of_sorted)  # [P]: pairs by row, and where each sits in y
    pairs_per_row = (local_id < local_experts.num_experts).sum(1)  # [N_in]
    pair_weights = weights.reshape(-1)[pair_in_row_order]  # [P]
    # CUDA has no bfloat16/float16 backward for embedding_bag's per-sample weights: there the weighted sum
    # runs in float32 (rounded once at the end) whenever a gradient may flow through it
    low_precision = y.dtype in (torch.bfloat16, torch.float16)
    in_float32 = low_precision and y.is_cuda and torch.is_grad_enabled() and (y.requires_grad or pair_weights.requires_grad)
    summed = F.embedding_bag(y_row, y.float() if in_float32 else y, pairs_per_row.cumsum(0) - pairs_per_row,
                             mode="sum", per_sample_weights=pair_weights.to(torch.float32 if in_float32 else y.dtype))
    return summed.to(y.dtype)  # [N_in, H]


def sum_per_token(returned: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    """[N, H] one row back per (token, destination) -> [T, H]: each token's rows added."""
    return F.embedding_bag(plan.rows_by_token, returned, plan.token_offsets, mode="sum")


class DedupExpertParallelExperts(ExpertParallelExperts):
    """The expert-parallel layer that sends each token once per destination rank (trains, one host sync).

    Its phases, as the bench reports them: count_exchange (the counts, their exchange, the rows and routing
    gathered while it moves, the sync), dispatch (the two all-to-alls), expert_compute (the receiver's
    order, gather, experts and per-row sums), combine (the all-to-all back and each token's sum)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """[T, H], [T, k] global expert ids, [T, k] -> [T, H] (T may differ between ranks, and may be 0)."""
        check_routed_inputs(self.local, self.num_experts, hidden_states, top_k_index, top_k_weights)
        [(plan, rows, routing)] = plan_token_dispatch(hidden_states, top_k_index, top_k_weights, self.shard, self.group)
        self._phase_done("count_exchange")
        received = all_to_all(rows, plan.receive_rows, plan.send_rows, self.group)  # [N_in, H]
        received_routing = all_to_all(routing, plan.receive_rows, plan.send_rows, self.group)  # [N_in, 2k]
        self._phase_done("dispatch")
        partial = experts_on_received(self.local, received, received_routing, plan)  # [N_in, H]
        self._phase_done("expert_compute")
        returned = all_to_all(partial, plan.send_rows, plan.receive_rows, self.group)  # [N, H]
        output = sum_per_token(returned, plan)  # [T, H]
        self._phase_done("combine")
        return output
