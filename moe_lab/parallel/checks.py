"""One rank's check of the expert-parallel layer against the single-process float64 reference.

Every rank builds the same whole layer and every rank's tokens from seeds, so it can compute the
reference for the whole batch itself; it then runs the expert-parallel layer on its own tokens
and its own block of experts, backpropagates a seeded upstream gradient, and reports relative
errors of the output and of every gradient against its share of the reference. Used by the tests
and by notebook 10, through `run_on_ranks(check_against_reference, world_size, case)`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..config import MoEConfig
from ..modules import Experts
from ..reference import reference_experts_forward, reference_gradients, relative_error
from ..routing import synthetic_routing


@dataclass(frozen=True)
class EPCase:
    """A layer, each rank's token count and a routing shape: everything a rank needs to rebuild the batch."""

    config: MoEConfig
    tokens_per_rank: tuple[int, ...]  # [world] T of each rank (0 allowed)
    distribution: str = "uniform"  # moe_lab.synthetic_routing's: uniform, zipf, single
    skew: float = 1.0
    backend: str = "grouped_mm"
    variant: str = "exact"  # "exact" (ExpertParallelExperts), "dedup" (DedupExpertParallelExperts), "padded",
    # or "gathered" (GatheredExpertParallelExperts)
    capacity: int | None = None  # padded only: rows per (source, destination) pair; None = the worst case
    tokens_per_rank_bound: int | None = None  # padded, gathered: the layer's tokens_per_rank (None: largest T)
    backward: bool = True
    seed: int = 0
    device: str = "cpu"  # "cuda": this rank's current GPU (run_on_ranks(..., backend="nccl"))


    def tokens_per_rank_max(self) -> int:
        """The padded and gathered layers' tokens_per_rank: the bound if given, else the largest rank's T (>= 1)."""
        return self.tokens_per_rank_bound or max(1, *self.tokens_per_rank)


def whole_batch(case: EPCase):
    """(the whole layer, [hidden_r], [top_k_index_r], [top_k_weights_r], [grad_output_r]) for every rank r."""
    config = case.config
    generator = torch.Generator().manual_seed(case.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        experts = Experts(config, case.backend)
    # Routing weights in float32 as a router gives them, float64 for a float64 layer (else their gradient rounds to float32).
    weights_dtype = torch.float64 if config.dtype == torch.float64 else torch.float32
    hidden, index, weights, upstream = [], [], [], []
    for rank, T in enumerate(case.tokens_per_rank):
        hidden.append(torch.randn(T, config.hidden_size, generator=generator).to(config.dtype))
        upstream.append(torch.randn(T, config.hidden_size, generator=generator).to(config.dtype))
        i, w = synthetic_routing(T, config.num_experts, config.top_k, distribution=case.distribution, skew=case.skew,
                                 seed=case.seed + 1000 * (rank + 1), weights_dtype=weights_dtype)
        index.append(i)
        weights.append(w)
    return experts, hidden, index, weights, upstream


def _device(case: EPCase) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if case.device == "cuda" else torch.device(case.device)


def build_layer(case: EPCase, experts: Experts, device: torch.device | None = None):
    """This rank's block of `experts` (built on CPU from seeds) on `device`, as `case.variant` says."""
    if case.variant == "exact":
        from .layer import ExpertParallelExperts

        return ExpertParallelExperts.from_experts(experts, experts_implementation=case.backend, device=device)
    if case.variant == "dedup":
        from .dedup import DedupExpertParallelExperts

        return DedupExpertParallelExperts.from_experts(experts, experts_implementation=case.backend, device=device)
    if case.variant == "padded":
        from .padded import PaddedExpertParallelExperts

        return PaddedExpertParallelExperts.from_experts(experts, experts_implementation=case.backend,
                                                        tokens_per_rank=case.tokens_per_rank_max(),
                                                        capacity=case.capacity, device=device)
    if case.variant == "gathered":
        from .gathered import GatheredExpertParallelExperts

        return GatheredExpertParallelExperts.from_experts(experts, experts_implementation=case.backend,
                                                          tokens_per_rank=case.tokens_per_rank_max(), device=device)
    raise ValueError(f"unknown variant {case.variant!r}; allowed: 'exact', 'dedup', 'padded', 'gathered'")


def check_against_reference(case: EPCase) -> dict:
    """Run on every rank of a group of len(case.tokens_per_rank): relative errors against float64, and counts."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != len(case.tokens_per_rank):
        raise ValueError(f"the case has tokens for {len(case.tokens_per_rank)} ranks, the group has {world}")
    experts, hidden, index, weights, upstream = whole_batch(case)
    device = _device(case)
    layer = build_layer(case, experts, device)
    x = hidden[rank].to(device).requires_grad_(case.backward)
    w = weights[rank].to(device).requires_grad_(case.backward)
    output = layer(x, index[rank].to(device), w)
    block = slice(layer.shard.first, layer.shard.first + layer.shard.count)
    every_pair = torch.cat([i.reshape(-1) for i in index])  # [sum(T) * k] all ranks' pairs
    result = {"rank": rank, "tokens": case.tokens_per_rank[rank], "experts": list(layer.shard.experts),
              "pairs_received": int(((every_pair >= block.start) & (every_pair < block.stop)).sum())}
    result["output_error"] = relative_error(output.cpu(), _reference_output(experts, hidden, index, weights)[rank])
    result["dropped_pairs"] = int(getattr(layer, "last_dropped_pairs", torch.zeros(())).sum())
    if case.backward:
        (output * upstream[rank].to(device)).sum().backward()
        reference = reference_gradients(experts, torch.cat(hidden), torch.cat(index), torch.cat(weights),
                                        torch.cat(upstream))
        mine = slice(sum(case.tokens_per_rank[:rank]), sum(case.tokens_per_rank[:rank + 1]))
        result["hidden_states_grad_error"] = _grad_error(x.grad, reference["hidden_states"][mine])
        result["top_k_weights_grad_error"] = _grad_error(w.grad, reference["top_k_weights"][mine])
        result["gate_up_proj_grad_error"] = _grad_error(layer.local.gate_up_proj.grad, reference["gate_up_proj"][block])
        result["down_proj_grad_error"] = _grad_error(layer.local.down_proj.grad, reference["down_proj"][block])
    return result


def _reference_output(experts, hidden, index, weights) -> list[torch.Tensor]:
    whole = reference_experts_forward(experts, torch.cat(hidden), torch.cat(index), torch.cat(weights))
    return list(whole.split([h.shape[0] for h in hidden]))


def _grad_error(actual, expected) -> float:
    """relative_error, with a missing gradient counted as wrong (inf) unless the reference's is zero too."""
    if actual is None:
        return 0.0 if expected.numel() == 0 or not bool(expected.abs().max()) else float("inf")
    return relative_error(actual.cpu(), expected)


def compare_variants(case: EPCase) -> dict:
    """Run on every rank: the exact and the padded layer on the same tokens; the largest relative
    difference between their outputs and between each of their gradients."""
    experts, hidden, index, weights, upstream = whole_batch(case)
    rank, device = dist.get_rank(), _device(case)
    results = {}
    for variant in ("exact", "padded"):
        layer = build_layer(replace(case, variant=variant), experts, device)
        x = hidden[rank].to(device).requires_grad_()
        w = weights[rank].to(device).requires_grad_()
        output = layer(x, index[rank].to(device), w)
        (output * upstream[rank].to(device)).sum().backward()
        results[variant] = [output, x.grad, w.grad, layer.local.gate_up_proj.grad, layer.local.down_proj.grad]
    return {"max_difference": max(relative_error(p, e) for p, e in zip(results["padded"], results["exact"]))}


def compare_pipelined(case: EPCase, chunks: int) -> dict:
    """Run on every rank: the chunked, overlapped forward against the plain one (no gradients); the exact layer's,
    or the dedup or gathered layer's when case.variant says so."""
    from .pipelined import pipelined_dedup_forward, pipelined_forward, pipelined_gathered_forward

    experts, hidden, index, weights, _ = whole_batch(case)
    rank, device = dist.get_rank(), _device(case)
    variant = case.variant if case.variant in ("dedup", "gathered") else "exact"
    chunked_forward = {"exact": pipelined_forward, "dedup": pipelined_dedup_forward,
                       "gathered": pipelined_gathered_forward}[variant]
    layer = build_layer(replace(case, variant=variant), experts, device)
    x, i, w = hidden[rank].to(device), index[rank].to(device), weights[rank].to(device)
    with torch.no_grad():
        plain = layer(x, i, w)
        chunked = chunked_forward(layer, x, i, w, chunks=chunks)
    reference = _reference_output(experts, hidden, index, weights)[rank]
    return {"difference": relative_error(chunked, plain), "output_error": relative_error(chunked.cpu(), reference)}


def replay_padded_from_cuda_graph(case: EPCase) -> dict:
    """Run on every rank (NCCL): capture the padded layer once, then replay it on new tokens and new
    routing copied into the captured inputs; the replay against the layer called eagerly."""
    return replay_from_cuda_graph(replace(case, variant="padded"))


def replay_from_cuda_graph(case: EPCase, chunks: int = 1) -> dict:
    """Run on every rank (NCCL): capture a sync-free layer (case.variant "padded" or "gathered"; the gathered one
    in `chunks` chunks through pipelined_gathered_forward when chunks > 1) once, then replay it on new tokens and
    new routing copied into the captured inputs; the replay against the layer called eagerly."""
    from .pipelined import pipelined_gathered_forward

    if case.variant not in ("padded", "gathered") or (chunks > 1 and case.variant != "gathered"):
        raise ValueError(f"only the padded and gathered layers are sync-free (chunks: gathered only), got "
                         f"{case.variant!r} with chunks={chunks}")
    experts, hidden, index, weights, _ = whole_batch(case)
    rank, device = dist.get_rank(), _device(case)
    layer = build_layer(case, experts, device)
    x, i, w = hidden[rank].to(device), index[rank].to(device), weights[rank].to(device)

    def forward():
        return pipelined_gathered_forward(layer, x, i, w, chunks=chunks) if chunks > 1 else layer(x, i, w)

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()  # warm-up outside the capture: NCCL communicators, allocator, lazy init, triton compiles
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = forward()
        _, new_hidden, new_index, new_weights, _ = whole_batch(replace(case, seed=case.seed + 1))
        for captured_input, new in ((x, new_hidden), (i, new_index), (w, new_weights)):
            captured_input.copy_(new[rank])
        graph.replay()
        eager = forward()
    torch.cuda.synchronize()
    reference = _reference_output(experts, new_hidden, new_index, new_weights)[rank]
    return {"replay_vs_eager": relative_error(captured, eager), "output_error": relative_error(captured.cpu(), reference)}
