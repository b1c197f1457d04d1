"""A sync-free expert-parallel layer: fixed-capacity buffers instead of exact split sizes.

The exact layer reads the split sizes on the host (the all-to-all wants Python ints): one device
sync per forward, which stalls a decode step and forbids CUDA-graph capture. Here every
(source rank, destination rank) pair gets a fixed block of `capacity` rows, so every all-to-all
moves equal blocks of a size known before the call, and nothing reads a device value on the host:

    send buffer [world, C, H]   pair p of destination d goes to row d*C + (its position among d's pairs)
    all-to-all (equal blocks)   [world, C, H] received: block s from rank s, its first counts_in[s].sum() rows real
    local experts               on all world*C rows (padding rows are zeros: computed, never read back)
    all-to-all back             [world, C, H], then each pair reads its own row; the weighted sum as before

What it costs: every all-to-all moves world*C rows however few are real, and the local experts run on
all of them (`dispatch_bytes` says how many bytes against the exact layer). With the default capacity
(the worst case: a source's T tokens each send min(k, E/world) pairs to one destination) nothing is
ever dropped. A smaller capacity trades bytes for a risk: pairs past a destination's capacity are
dropped (they add nothing to their token's output, like a capacity factor in GShard/Switch) — never
silently: `last_dropped_pairs` (a device tensor, read without a sync until you ask) counts them and
`check_no_overflow()` raises `CapacityOverflowError` when there were any.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MoEConfig
from ..errors import BackendInputError, CapacityOverflowError, ConfigError
from ..modules import DEFAULT_IMPLEMENTATION
from .collectives import all_to_all, exchange_counts
from .dispatch import SortedPairs, sort_pairs, weighted_sum
from .layer import ExpertParallelExperts
from .local import check_routed_inputs, run_local_experts
from .sharding import ExpertShard


def worst_case_capacity(tokens_per_rank: int, top_k: int, experts_per_rank: int) -> int:
    """Rows one source can send one destination: each token's k experts are distinct, so at most
    min(k, E/world) of them live on one rank."""
    return max(1, tokens_per_rank * min(top_k, experts_per_rank))


@dataclass(frozen=True)
class DispatchBytes:
    """Per rank and per forward: bytes of token rows sent (dispatch + return) and rows the local experts run."""

    exact_bytes: int  # 2 * T*k*H*itemsize: every pair's row out and back
    padded_bytes: int  # 2 * world*C*H*itemsize
    exact_expert_rows: int  # average rows a rank's experts run with exact splits (T*k under any routing, on average)
    padded_expert_rows: int  # world*C
    count_bytes: int  # the count exchange, the same in both: world * E/world int64 per rank
    capacity: int

    @property
    def padded_over_exact(self) -> float:
        return self.padded_bytes / self.exact_bytes if self.exact_bytes else float("inf")


def dispatch_bytes(config: MoEConfig, tokens_per_rank: int, world_size: int, capacity: int | None = None,
                   dtype=None) -> DispatchBytes:
    """What the padded layer moves against the exact one, for one rank with `tokens_per_rank` tokens.
    (A rank's rows for its own experts are copied, not sent over a link; both counts include them.)"""
    shard = ExpertShard(0, world_size, config.num_experts)
    C = worst_case_capacity(tokens_per_rank, config.top_k, shard.count) if capacity is None else capacity
    itemsize = (dtype or config.dtype).itemsize
    H, k = config.hidden_size, config.top_k
    return DispatchBytes(
        exact_bytes=2 * tokens_per_rank * k * H * itemsize,
        padded_bytes=2 * world_size * C * H * itemsize,
        exact_expert_rows=tokens_per_rank * k,
        padded_expert_rows=world_size * C,
        count_bytes=config.num_experts * 8,
        capacity=C,
    )


@dataclass
class PaddedPlan:
    slot_of_sorted: torch.Tensor  # [S] row of the send buffer for each sorted pair; world*C = dropped
    local_expert_of_row: torch.Tensor  # [world*C] local expert of every received row (padding: any valid id)
    dropped_pairs: torch.Tensor  # [] int64 pairs over capacity, on the device


def plan_padded(pairs: SortedPairs, shard: ExpertShard, capacity: int, group) -> PaddedPlan:
    """Slots in the fixed-size buffers, the counts exchange and the receiver's expert ids: no host sync."""
    world, El, C = shard.world_size, shard.count, capacity
    counts_out = pairs.counts.view(world, El)  # [world, E/w] pairs for each destination's experts
    start = counts_out.cumsum(1) - counts_out  # [world, E/w] where each expert starts in its destination's block
    kept = (C - start).clamp(min=0).minimum(counts_out)  # [world, E/w] what fits
    counts_in = exchange_counts(kept, group)  # [world, E/w] real rows in each source's block, by local expert

    per_destination = counts_out.sum(1)  # [world]
    block_start = per_destination.cumsum(0) - per_destination  # [world] first sorted pair of each destination
    destination = pairs.sorted_experts // El  # [S]
    position = torch.arange(destination.numel(), device=destination.device) - block_start[destination]  # [S]
    slot = torch.where(position < C, destination * C + position, world * C)  # [S]; world*C: the drop slot

    rows = torch.arange(C, device=counts_in.device).expand(world, C).contiguous()  # [world, C]
    local_expert = torch.searchsorted(counts_in.cumsum(1), rows, right=True).clamp(max=El - 1)  # [world, C]
    return PaddedPlan(slot, local_expert.reshape(-1), (position >= C).sum())


class PaddedExpertParallelExperts(ExpertParallelExperts):
    """The expert-parallel layer with fixed-capacity all-to-alls: no host sync, capturable in a CUDA graph
    (with a sync-free backend and NCCL). Every rank must use the same `tokens_per_rank` and capacity."""

    def __init__(self, config: MoEConfig, group=None, experts_implementation: str = DEFAULT_IMPLEMENTATION, *,
                 tokens_per_rank: int, capacity: int | None = None, device: torch.device | str | None = None,
                 local=None):
        super().__init__(config, group, experts_implementation, device=device, local=local)
        if isinstance(tokens_per_rank, bool) or not isinstance(tokens_per_rank, int) or tokens_per_rank < 1:
            raise ConfigError(f"tokens_per_rank must be a positive integer (the most tokens a rank sends), "
                              f"got {tokens_per_rank!r}")
        worst = worst_case_capacity(tokens_per_rank, config.top_k, self.shard.count)
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ConfigError(f"capacity must be a positive integer (rows per source/destination pair; "
                              f"{worst} never drops) or None for that worst case, got {capacity!r}")
        self.tokens_per_rank = tokens_per_rank
        self.capacity = worst if capacity is None else capacity
        self.register_buffer("last_dropped_pairs", torch.zeros((), dtype=torch.int64, device=self.local.down_proj.device),
                             persistent=False)

    def dispatch_bytes(self) -> DispatchBytes:
        return dispatch_bytes(self.config, self.tokens_per_rank, self.shard.world_size, self.capacity)

    def check_no_overflow(self) -> None:
        """Raise `CapacityOverflowError` if the last forward dropped pairs on this rank (reads the count: a sync)."""
        dropped = int(self.last_dropped_pairs)
        if dropped:
            raise CapacityOverflowError(
                f"the last forward on rank {self.shard.rank} dropped {dropped} (token, expert) pairs: more than "
                f"capacity={self.capacity} rows for one destination rank. Raise the capacity (at most "
                f"{worst_case_capacity(self.tokens_per_rank, self.config.top_k, self.shard.count)} never drops) "
                "or use ExpertParallelExperts (exact split sizes, one host sync)"
            )

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """[T, H], [T, k], [T, k] -> [T, H], T <= tokens_per_rank; pairs over capacity are counted, not sent."""
        check_routed_inputs(self.local, self.num_experts, hidden_states, top_k_index, top_k_weights)
        if hidden_states.shape[0] > self.tokens_per_rank:
            raise BackendInputError(f"this padded layer was sized for at most {self.tokens_per_rank} tokens per rank, "
                                    f"got {hidden_states.shape[0]}; build it with a larger tokens_per_rank")
        world, C, H = self.shard.world_size, self.capacity, self.config.hidden_size
        pairs = sort_pairs(top_k_index, self.num_experts)
        plan = plan_padded(pairs, self.shard, C, self.group)
        self._phase_done("count_exchange")
        rows = hidden_states[pairs.token_of_sorted]  # [S, H]
        send = hidden_states.new_zeros(world * C + 1, H).index_copy(0, plan.slot_of_sorted, rows)  # [world*C + 1, H]
        received = all_to_all(send[:-1], None, None, self.group)  # [world*C, H]
        self._phase_done("dispatch")
        expert_rows = run_local_experts(self.local, received, plan.local_expert_of_row)  # [world*C, H]
        self._phase_done("expert_compute")
        returned = all_to_all(expert_rows, None, None, self.group)  # [world*C, H]
        with_drop_row = torch.cat([returned, returned.new_zeros(1, H)])  # [world*C + 1, H]: dropped pairs read zeros
        output = weighted_sum(with_drop_row[plan.slot_of_sorted], pairs, top_k_weights)  # [T, H]
        self.last_dropped_pairs.copy_(plan.dropped_pairs)
        self._phase_done("combine")
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tokens_per_rank={self.tokens_per_rank}, capacity={self.capacity}"
