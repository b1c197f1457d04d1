"""The expert-parallel forward in chunks, so one chunk's all-to-all overlaps another chunk's experts:
`pipelined_forward` for the exact layer, `pipelined_dedup_forward` for the dedup one (dedup.py),
`pipelined_gathered_forward` for the all-gather one (gathered.py; no counts and no sync at all).

A plain forward runs dispatch, experts and combine one after the other, and the GPU's matmul units
idle while the rows travel. Split the tokens into n chunks and queue the collectives without waiting
(`all_to_all_async`): NCCL runs them on its own stream, so while chunk c's experts run on the compute
stream, chunk c+1's dispatch and chunk c-1's combine can move:

    compute stream   [experts 0][experts 1][experts 2] ...
    NCCL stream  [d0][d1]      [c0][d2]   [c1][d3] ...          d: dispatch, c: combine

All chunks' counts go in ONE exchange and one host read, so chunking adds no syncs. The price: n
smaller matmuls (less efficient at small T) and n times the collectives' fixed latency. Inference
only: a call that needs gradients is refused (the plain forward trains). Whether it pays is measured,
not assumed (`moe-lab bench --ep --ep-chunks 2,4`, docs/expert_parallelism.md).
"""
from __future__ import annotations

import torch

from ..errors import BackendCapabilityError, ConfigError
from ..backends.common import needs_grad
from .collectives import all_gather_async, all_to_all_async, exchange_counts, waited
from .dispatch import sort_pairs, weighted_sum
from .local import check_routed_inputs, run_local_experts


def pipelined_forward(layer, hidden_states, top_k_index, top_k_weights, chunks: int = 2) -> torch.Tensor:
    """[T, H], [T, k], [T, k] -> [T, H] through `layer` (an ExpertParallelExperts), `chunks` chunks in
    flight. Every rank must use the same `chunks` (a rank's chunk may hold zero tokens)."""
    _check_call(layer, hidden_states, top_k_index, top_k_weights, chunks)
    shard, group = layer.shard, layer.group
    world, El = shard.world_size, shard.count
    hidden_chunks = torch.tensor_split(hidden_states, chunks)  # n x [T_c, H]
    index_chunks = torch.tensor_split(top_k_index, chunks)
    weight_chunks = torch.tensor_split(top_k_weights, chunks)
    pairs = [sort_pairs(index, layer.num_experts) for index in index_chunks]

    counts_out = torch.stack([p.counts.view(world, El) for p in pairs], dim=1)  # [world, n, E/w]
    counts_in = exchange_counts(counts_out.reshape(world, -1), group).view(world, chunks, El)  # [world, n, E/w]
    send, receive = torch.stack([counts_out.sum(2), counts_in.sum(2)]).permute(0, 2, 1).tolist()  # the one sync
    local_ids = torch.arange(El, device=counts_in.device).repeat(world)  # [world * E/w]
    ids = [torch.repeat_interleave(local_ids, counts_in[:, c].reshape(-1), output_size=sum(receive[c]))
           for c in range(chunks)]  # n x [R_c]
    layer._phase_done("count_exchange")

    rows = [h[p.token_of_sorted] for h, p in zip(hidden_chunks, pairs)]  # n x [S_c, H]
    received = [all_to_all_async(rows[0], receive[0], send[0], group)] + [None] * (chunks - 1)
    returned = []
    for c in range(chunks):
        if c + 1 < chunks:  # queued before chunk c's experts: it moves while they run
            received[c + 1] = all_to_all_async(rows[c + 1], receive[c + 1], send[c + 1], group)
        expert_rows = run_local_experts(layer.local, waited(received[c]), ids[c])  # waits for chunk c's rows only
        returned.append(all_to_all_async(expert_rows, send[c], receive[c], group))
    outputs = [weighted_sum(waited(r), p, w) for r, p, w in zip(returned, pairs, weight_chunks)]  # n x [T_c, H]
    return torch.cat(outputs)  # [T, H]; dispatch, experts and combine interleave: no phase marks past the counts


def pipelined_dedup_forward(layer, hidden_states, top_k_index, top_k_weights, chunks: int = 2) -> torch.Tensor:
    """The same overlap for the dedup layer (a DedupExpertParallelExperts): chunk c's experts run while chunk c+1's
    token rows and routing move and chunk c-1's sums come back. One count exchange and one host read for all chunks
    (dedup.plan_token_dispatch). Inference only, like `pipelined_forward`."""
    from .dedup import experts_on_received, plan_token_dispatch, sum_per_token

    _check_call(layer, hidden_states, top_k_index, top_k_weights, chunks)
    group = layer.group
    planned = plan_token_dispatch(hidden_states, top_k_index, top_k_weights, layer.shard, group, chunks)
    layer._phase_done("count_exchange")

    def dispatch(plan, rows, routing):  # both all-to-alls queued, not waited for
        return (all_to_all_async(rows, plan.receive_rows, plan.send_rows, group),
                all_to_all_async(routing, plan.receive_rows, plan.send_rows, group))

    received = [dispatch(*planned[0])] + [None] * (chunks - 1)
    returned = []
    for c, (plan, _, _) in enumerate(planned):
        if c + 1 < chunks:  # queued before chunk c's experts: it moves while they run
            received[c + 1] = dispatch(*planned[c + 1])
        rows, routing = (waited(r) for r in received[c])
        partial = experts_on_received(layer.local, rows, routing, plan)  # [N_in_c, H]
        returned.append(all_to_all_async(partial, plan.send_rows, plan.receive_rows, group))
    return torch.cat([sum_per_token(waited(r), plan) for r, (plan, _, _) in zip(returned, planned)])  # [T, H]


def pipelined_gathered_forward(layer, hidden_states, top_k_index, top_k_weights, chunks: int = 2) -> torch.Tensor:
    """The same overlap for the all-gather layer (a GatheredExpertParallelExperts): its padded tokens in `chunks`
    equal chunks on every rank, chunk c+1's all-gathers queued before chunk c's experts and chunk c's combine
    right after them. No counts, no host read at all: the host queues every chunk ahead of the device, and the
    whole forward can be captured in a CUDA graph. Inference only, like `pipelined_forward`."""
    from .gathered import experts_on_gathered, padded_routing, sum_partials

    _check_call(layer, hidden_states, top_k_index, top_k_weights, chunks)
    layer.check_tokens(hidden_states, top_k_index, top_k_weights)
    group, world = layer.group, layer.shard.world_size
    rows, routing = padded_routing(layer, hidden_states, top_k_index, top_k_weights)  # [Tp, H], [Tp, 2k]
    row_chunks, routing_chunks = torch.tensor_split(rows, chunks), torch.tensor_split(routing, chunks)  # same on all

    def dispatch(c):  # both all-gathers queued, not waited for
        return all_gather_async(row_chunks[c], group), all_gather_async(routing_chunks[c], group)

    gathered = [dispatch(0)] + [None] * (chunks - 1)
    returned = []
    for c in range(chunks):
        if c + 1 < chunks:  # queued before chunk c's experts: it moves while they run
            gathered[c + 1] = dispatch(c + 1)
        partial = experts_on_gathered(layer, *(waited(g) for g in gathered[c]))  # [w*Tp_c, H]
        returned.append(all_to_all_async(partial, None, None, group))  # equal blocks: block s back to rank s
    output = torch.cat([sum_partials(waited(r), world, r.shape[0] // world) for r in returned])  # [Tp, H]
    return output[:hidden_states.shape[0]]  # [T, H]


def _check_call(layer, hidden_states, top_k_index, top_k_weights, chunks) -> None:
    """What both chunked forwards refuse: a chunk count that is not a positive int, the layer's own input errors,
    and a call that needs gradients (they are for inference)."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(f"chunks must be a positive integer, got {chunks!r}")
    check_routed_inputs(layer.local, layer.num_experts, hidden_states, top_k_index, top_k_weights)
    if needs_grad(layer.local, hidden_states, top_k_weights):
        raise BackendCapabilityError(
            "the pipelined expert-parallel forward is for inference: run it under torch.no_grad() "
            "(or call the layer itself, whose forward trains)")
