"""Dispatch by all-gather: every rank gets every rank's tokens, runs its own experts on them, and sends
each rank back its share of the partial sums. No counts, no split sizes, no host sync.

At EP=w with k of E experts a token has no expert on a given rank with probability C(E - E/w, k) / C(E, k):
at w = 2, k = 8 of 128 that is 0.3 %, so the dedup layer sends almost every token to the other rank anyway.
Sending all of them costs few more bytes and buys fixed shapes: the host queues every collective ahead, the
layer can be captured in a CUDA graph, and chunks overlap without any sync (pipelined.py). Megatron-Core's
"allgather" token dispatcher works this way; transformers' own expert parallelism too, in spirit (ids of
experts elsewhere become a sentinel, the combine is a reduction).

    tokens_per_rank = Tp on every rank; this rank's T <= Tp tokens padded with zero rows, zero weights
    routing [Tp, 2k]          k weights, then k GLOBAL expert ids as floats (padding rows: id E, "nowhere")
    dispatch    all-gather    [Tp, H] -> [w*Tp, H] and [Tp, 2k] -> [w*Tp, 2k]   rank s's tokens in block s
    experts     ids made local: id - first if this rank holds it, else E/w ("not here")
                partial [w*Tp, H] = each row's weighted sum over the experts it has HERE (local.run_partial_experts:
                the backend's `partial_forward` skips the absent slots; the generic path computes and zeroes them)
    combine     equal-block all-to-all of partial: block s goes back to rank s -> [w, Tp, H] here, one block
                from every rank; summed over ranks in float32, rounded once -> [T, H]

The combine is a reduce-scatter in effect, but an all-to-all of the same bytes and a float32 sum keep one
rounding per output instead of one per hop (NCCL's bf16 reduce-scatter adds in bf16). What it costs in bytes
against the exact and dedup layers: `dispatch_bytes` (docs/expert_parallelism.md).

Output and gradients (hidden states, routing weights, both weight tensors) equal the single-process layer's
(tests/test_expert_parallel_gathered.py). Every rank must call forward and backward together, with the same
tokens_per_rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import MoEConfig
from ..errors import BackendInputError, ConfigError
from ..modules import DEFAULT_IMPLEMENTATION
from .collectives import all_gather_async, all_to_all, waited
from .layer import ExpertParallelExperts
from .local import check_routed_inputs, run_partial_experts
from .sharding import ExpertShard


@dataclass(frozen=True)
class GatheredBytes:
    """Bytes one rank sends to other ranks per forward (dispatch + combine; its own rows are not counted),
    under uniform routing for the exact and dedup layers (their bytes depend on the routing)."""

    gathered_bytes: int  # (w-1)*Tp*H*b out in the all-gather, (w-1)*Tp*2k*r routing, (w-1)*Tp*H*b back
    exact_bytes: float  # 2 * T*k*(w-1)/w rows of H*b: every off-rank pair out and back
    dedup_bytes: float  # 2 * T*(w-1)*p rows of H*b, plus their routing out (p: a rank holds one of a token's experts)
    gathered_expert_pairs: int  # pairs this rank's experts run with a partial_forward entry (~ T*k on average)
    generic_expert_pairs: int  # pairs the generic path runs (every gathered slot: w*Tp*k)

    @property
    def gathered_over_dedup(self) -> float:
        return self.gathered_bytes / self.dedup_bytes if self.dedup_bytes else math.inf

    @property
    def gathered_over_exact(self) -> float:
        return self.gathered_bytes / self.exact_bytes if self.exact_bytes else math.inf


def rank_hit_probability(num_experts: int, top_k: int, world_size: int) -> float:
    """Under uniform routing (k distinct experts of E), the chance that a given rank holds at least one of a
    token's experts: 1 - C(E - E/w, k) / C(E, k)."""
    El = num_experts // world_size
    return 1.0 - math.comb(num_experts - El, top_k) / math.comb(num_experts, top_k)


def dispatch_bytes(config: MoEConfig, tokens_per_rank: int, world_size: int, dtype=None) -> GatheredBytes:
    """What the gathered layer moves against the exact and dedup layers, per rank and forward (uniform routing)."""
    ExpertShard(0, world_size, config.num_experts)  # a world size that does not divide E is refused here
    b = (dtype or config.dtype).itemsize
    r = torch.promote_types(config.dtype, torch.float32).itemsize  # routing travels in float32 (float64 layers: 64)
    T, H, k, w = tokens_per_rank, config.hidden_size, config.top_k, world_size
    p = rank_hit_probability(config.num_experts, k, w)
    return GatheredBytes(
        gathered_bytes=(w - 1) * T * (2 * H * b + 2 * k * r),
        exact_bytes=2 * T * k * (w - 1) / w * H * b,
        dedup_bytes=T * (w - 1) * p * (2 * H * b + 2 * k * r),
        gathered_expert_pairs=T * k,
        generic_expert_pairs=w * T * k,
    )


def padded_routing(layer, hidden_states, top_k_index, top_k_weights):
    """[T, H], [T, k], [T, k] -> [Tp, H] rows and [Tp, 2k] routing (k weights, k global ids as floats; ids < 2^24
    are exact in float32), padded to the layer's tokens_per_rank with zero rows, zero weights and id E."""
    T, k = top_k_index.shape
    pad = layer.tokens_per_rank - T
    routing_dtype = torch.promote_types(top_k_weights.dtype, torch.float32)
    routing = torch.cat([top_k_weights.to(routing_dtype), top_k_index.to(routing_dtype)], dim=1)  # [T, 2k]
    if pad:
        hidden_states = F.pad(hidden_states, (0, 0, 0, pad))  # [Tp, H]
        padding = torch.cat([routing.new_zeros(pad, k), routing.new_full((pad, k), layer.num_experts)], dim=1)
        routing = torch.cat([routing, padding])  # [Tp, 2k]
    return hidden_states, routing


def experts_on_gathered(layer, rows, routing) -> torch.Tensor:
    """[N, H] gathered rows, [N, 2k] their routing -> [N, H]: each row's weighted sum over the experts held here."""
    k = routing.shape[1] // 2
    shard = layer.shard
    weights, global_id = routing[:, :k], routing[:, k:].long()  # [N, k] each
    local_id = global_id - shard.first
    local_id = torch.where((local_id >= 0) & (local_id < shard.count), local_id, shard.count)  # E/w: not here
    return run_partial_experts(layer.local, rows, local_id, weights)  # [N, H]


def sum_partials(returned: torch.Tensor, world_size: int, num_tokens: int) -> torch.Tensor:
    """[w*Tp, H] (block s: rank s's partial sums for this rank's tokens) -> [T, H], added in float32 (float64
    stays), rounded once, the padding rows dropped."""
    H = returned.shape[1]
    dtype = returned.dtype
    total = returned.view(world_size, -1, H).sum(0, dtype=torch.promote_types(dtype, torch.float32))  # [Tp, H]
    return total[:num_tokens].to(dtype)


class GatheredExpertParallelExperts(ExpertParallelExperts):
    """The expert-parallel layer with an all-gather dispatch: no host sync, capturable in a CUDA graph (with NCCL
    and a sync-free backend). Every rank must use the same `tokens_per_rank` (the most tokens a rank passes)."""

    def __init__(self, config: MoEConfig, group=None, experts_implementation: str = DEFAULT_IMPLEMENTATION, *,
                 tokens_per_rank: int, device: torch.device | str | None = None, local=None):
        super().__init__(config, group, experts_implementation, device=device, local=local)
        if isinstance(tokens_per_rank, bool) or not isinstance(tokens_per_rank, int) or tokens_per_rank < 1:
            raise ConfigError(f"tokens_per_rank must be a positive integer (the most tokens a rank passes; the same "
                              f"on every rank), got {tokens_per_rank!r}")
        self.tokens_per_rank = tokens_per_rank

    def dispatch_bytes(self) -> GatheredBytes:
        return dispatch_bytes(self.config, self.tokens_per_rank, self.shard.world_size)

    def check_tokens(self, hidden_states, top_k_index, top_k_weights) -> None:
        """The single-process input checks, and no more than tokens_per_rank tokens."""
        check_routed_inputs(self.local, self.num_experts, hidden_states, top_k_index, top_k_weights)
        if hidden_states.shape[0] > self.tokens_per_rank:
            raise BackendInputError(f"this gathered layer was sized for at most {self.tokens_per_rank} tokens per "
                                    f"rank, got {hidden_states.shape[0]}; build it with a larger tokens_per_rank")

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """[T, H], [T, k] global expert ids, [T, k] -> [T, H], T <= tokens_per_rank (0 allowed)."""
        self.check_tokens(hidden_states, top_k_index, top_k_weights)
        rows, routing = padded_routing(self, hidden_states, top_k_index, top_k_weights)  # [Tp, H], [Tp, 2k]
        gathered = waited(all_gather_async(rows, self.group))  # [w*Tp, H]
        gathered_routing = waited(all_gather_async(routing, self.group))  # [w*Tp, 2k]
        self._phase_done("dispatch")
        partial = experts_on_gathered(self, gathered, gathered_routing)  # [w*Tp, H]
        self._phase_done("expert_compute")
        returned = all_to_all(partial, None, None, self.group)  # [w*Tp, H]: block s from rank s
        output = sum_partials(returned, self.shard.world_size, hidden_states.shape[0])  # [T, H]
        self._phase_done("combine")
        return output

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tokens_per_rank={self.tokens_per_rank}"
