"""moe_lab's expert-parallel dispatch and combine inside a transformers model.

transformers (the versions with `transformers.distributed.expert_parallel`) shards a model's experts
itself — a DeviceMesh, each experts tensor a DTensor split on the expert dimension — and asks an
`EPImplementation`, picked by name from `EPImplementationInterface`, how tokens reach them: it is
called with this rank's (hidden_states, top_k_index with global ids, top_k_weights) and given the
experts' own forward on LOCAL expert ids. `MoeLabAllToAllEP` is moe_lab.parallel's exact layer in that
seat: sort, count exchange, all-to-all of the rows, the experts' forward (whatever
`experts_implementation` the model uses, moe_lab's backends included), reverse all-to-all, weighted sum.

    import moe_lab.hf.expert_parallel as ep
    ep.register_expert_parallel()                       # -> "moe_lab_all_to_all"
    # then DistributedConfig(ep_size=..., ep_implementation="moe_lab_all_to_all"), or
    # transformers.distributed.expert_parallel.apply_expert_parallelism(model, ep_mesh, tp_mesh, plan,
    #                                                                   ep_implementation="moe_lab_all_to_all")

The experts only ever see rows for their own experts (no sentinel ids), which is why moe_lab's backends,
refused on an expert-parallel module in general, run here. Tensor parallelism inside the expert group
(a TP mesh larger than one rank) is refused: this dispatch does not slice a shared batch.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..parallel.dispatch import dispatch_exact, plan_exact, return_exact, sort_pairs, weighted_sum
from ..parallel.sharding import ExpertShard
from .registry import LOCAL_ROWS_ONLY

try:
    from transformers.distributed.expert_parallel import EPImplementation, EPImplementationInterface
except ImportError as _error:  # a transformers without pluggable expert parallelism
    raise ImportError(
        "moe_lab.hf.expert_parallel needs transformers.distributed.expert_parallel (EPImplementationInterface), "
        "which this transformers does not have; upgrade transformers"
    ) from _error

NAME = "moe_lab_all_to_all"


@contextlib.contextmanager
def local_rows_only(experts):
    setattr(experts, LOCAL_ROWS_ONLY, True)
    try:
        yield
    finally:
        setattr(experts, LOCAL_ROWS_ONLY, False)


class MoeLabAllToAllEP(EPImplementation):
    """moe_lab.parallel's dispatch/combine around a transformers experts module's own forward."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        if tp_mesh.size() > 1:
            raise ConfigError(f"{NAME} runs expert parallelism without tensor parallelism in the expert group "
                              f"(tp_size 1), got a TP mesh of {tp_mesh.size()} ranks; use ep_implementation='all_to_all'")
        self.experts = experts

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        """[T, H], [T, k] global ids, [T, k] -> [T, H] for this rank's tokens."""
        group, world = self.ep_mesh.get_group(), self.ep_mesh.size()
        shard = ExpertShard(self.ep_mesh.get_local_rank(), world, self.num_local_experts * world)
        pairs = sort_pairs(top_k_index, shard.num_experts)
        plan = plan_exact(pairs, shard, group)
        received = dispatch_exact(hidden_states, pairs, plan, group)  # [R, H]
        local_ids = plan.local_expert_of_row.view(-1, 1)  # [R, 1]
        ones = torch.ones(local_ids.shape, dtype=received.dtype, device=received.device)
        with local_rows_only(self.experts):
            expert_rows = self.experts_forward(received, local_ids, ones)  # [R, H]
        if received.shape[0] == 0 and torch.is_grad_enabled():
            # Every rank joins the backward all-to-alls: tie an empty output to the rows and the weights.
            anchors = [t[:0].sum() for t in (received, *self.experts.parameters()) if t.requires_grad]
            if anchors:
                expert_rows = expert_rows + sum(anchors).to(expert_rows.dtype)
        returned = return_exact(expert_rows, plan, group)  # [S, H]
        return weighted_sum(returned, pairs, top_k_weights)


def register_expert_parallel(name: str = NAME) -> str:
    """Register MoeLabAllToAllEP in transformers' EPImplementationInterface under `name` (idempotent)."""
    EPImplementationInterface.register(name, MoeLabAllToAllEP)
    return name
