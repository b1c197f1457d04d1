"""`ExpertParallelExperts`: an experts layer whose E experts are spread over the ranks of a process group.

Every rank calls it with its own tokens and the same kind of routing a single-process `Experts`
takes (global expert ids); each rank holds E/world experts (sharding.py). A forward is four phases,
each a function of dispatch.py, named as the bench reports them:

    count_exchange  sort pairs by expert, all-to-all of the per-expert counts, read the split sizes (host sync)
    dispatch        all-to-all of the token rows to the ranks holding their experts
    expert_compute  the local experts, through any registered backend
    combine         the reverse all-to-all, then the weighted sum back to tokens

Output and gradients (hidden states, both weight tensors, routing weights) equal the single-process
layer's (tests/test_expert_parallel.py). Every rank must call forward (and backward) together, in the
same grad mode: the all-to-alls are collectives.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import MoEConfig
from ..errors import ConfigError
from ..modules import DEFAULT_IMPLEMENTATION, Experts
from .collectives import group_rank_and_size
from .dispatch import dispatch_exact, plan_exact, return_exact, sort_pairs, weighted_sum
from .local import check_routed_inputs, run_local_experts
from .sharding import ExpertShard, copy_shard, local_config, local_experts

PHASES = ("count_exchange", "dispatch", "expert_compute", "combine")


class ExpertParallelExperts(nn.Module):
    """E experts over `group` (default: the whole world); this rank's block lives in `self.local`."""

    def __init__(self, config: MoEConfig, group=None, experts_implementation: str = DEFAULT_IMPLEMENTATION, *,
                 device: torch.device | str | None = None, local: Experts | None = None):
        """`local`: an `Experts` already holding this rank's block, shared rather than allocated (two
        variants of the layer over one set of weights; it keeps its own backend, and `experts_implementation`
        is not applied to it); else a fresh block on `device`, running `experts_implementation`."""
        super().__init__()
        rank, world_size = group_rank_and_size(group)
        self.config = config
        self.group = group
        self.shard = ExpertShard(rank, world_size, config.num_experts)
        if local is not None and local.config != local_config(config, self.shard):
            raise ConfigError(f"local experts {local.config} are not rank {rank}'s block of {config}")
        self.local = local if local is not None else local_experts(config, self.shard, experts_implementation, device)
        #: Called with each phase's name as it ends (the bench records CUDA events here); None: nothing.
        self.phase_hook: Callable[[str], None] | None = None

    @classmethod
    def from_experts(cls, experts: Experts, group=None, experts_implementation: str | None = None, *,
                     device: torch.device | str | None = None, **kwargs):
        """This rank's block of a single-process `Experts` (same values), on `device` (default: the
        experts' own), e.g. to check against it."""
        implementation = experts_implementation or experts.get_experts_implementation()
        device = device if device is not None else experts.gate_up_proj.device
        layer = cls(experts.config, group, implementation, device=device, **kwargs)
        copy_shard(experts, layer.local, layer.shard)
        return layer

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def set_experts_implementation(self, implementation: str) -> None:
        """The backend the local experts run through (a registered name; unknown names are refused)."""
        self.local.set_experts_implementation(implementation)

    def get_experts_implementation(self) -> str:
        return self.local.get_experts_implementation()

    def _phase_done(self, name: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(name)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """[T, H], [T, k] global expert ids, [T, k] -> [T, H] (T may differ between ranks, and may be 0)."""
        check_routed_inputs(self.local, self.num_experts, hidden_states, top_k_index, top_k_weights)
        pairs = sort_pairs(top_k_index, self.num_experts)
        plan = plan_exact(pairs, self.shard, self.group)
        self._phase_done("count_exchange")
        received = dispatch_exact(hidden_states, pairs, plan, self.group)  # [R, H]
        self._phase_done("dispatch")
        expert_rows = run_local_experts(self.local, received, plan.local_expert_of_row)  # [R, H]
        self._phase_done("expert_compute")
        returned = return_exact(expert_rows, plan, self.group)  # [S, H]
        output = weighted_sum(returned, pairs, top_k_weights)  # [T, H]
        self._phase_done("combine")
        return output

    def extra_repr(self) -> str:
        return (f"rank={self.shard.rank}, world_size={self.shard.world_size}, experts={self.shard.first}.."
                f"{self.shard.first + self.shard.count - 1} of {self.num_experts}")
