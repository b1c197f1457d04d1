"""Notebook 10 (expert parallelism): what the notebook computes, runs on gloo ranks and reads from data/.

The process plumbing lives in moe_lab.parallel (run_on_ranks); the functions each rank runs are
module-level here or in moe_lab.parallel.checks, so a forkserver child can import them by name.
"""
from __future__ import annotations

import torch

from ..backends import available_backends
from ..config import MoEConfig
from ..parameters import Float, Int, Parameters, Rule, Str
from ..presets import PRESETS
from ..routing import synthetic_routing

PARAMETERS = Parameters(
    world_size=Int(min=1, max=8), num_experts=Int(min=1, max=256), top_k=Int(min=1, max=16),
    hidden_size=Int(min=8, max=512), intermediate_size=Int(min=8, max=1024), tokens_per_rank=Int(min=0, max=4096),
    skew=Float(min=0.0, max=4.0), backend=Str(choices=available_backends), seed=Int(min=0),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts"),
           Rule(lambda p: p["num_experts"] % p["world_size"] == 0,
                "world_size={world_size} must divide num_experts={num_experts}: each rank holds E / world_size experts")],
)

EP_SIZES = (1, 2, 4, 8)


def expert_memory_table(world_sizes=EP_SIZES, dtype=torch.bfloat16):
    """GiB of routed-expert weights of ONE MoE layer per GPU, for every preset, at each EP size."""
    import pandas as pd

    rows = []
    for name, preset in PRESETS.items():
        config = preset.config
        total = config.expert_parameter_count() * dtype.itemsize
        row = {"preset": name, "experts": config.num_experts, "top_k": config.top_k}
        for world in world_sizes:
            row[f"EP={world} GiB/GPU"] = total / world / 2**30 if config.num_experts % world == 0 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def routing_per_rank(config: MoEConfig, tokens_per_rank: int, world_size: int, *, skew: float = 0.0, seed: int = 0):
    """[world] top_k_index of each rank, as check_against_reference builds them (Zipf with this skew; 0 = uniform)."""
    distribution = "zipf" if skew > 0 else "uniform"
    return [synthetic_routing(tokens_per_rank, config.num_experts, config.top_k, distribution=distribution, skew=skew,
                              seed=seed + 1000 * (rank + 1))[0] for rank in range(world_size)]


def send_matrix(index_per_rank, num_experts: int, world_size: int) -> torch.Tensor:
    """[world, world] (token, expert) pairs rank s sends to rank d: the dispatch all-to-all's split sizes."""
    per_rank = num_experts // world_size
    return torch.stack([torch.bincount(index.reshape(-1) // per_rank, minlength=world_size)
                        for index in index_per_rank])


def receive_loads(config: MoEConfig, tokens_per_rank: int, world_size: int, skews, seed: int = 0):
    """One row per (skew, rank): pairs the rank's experts receive, and that over the mean (1 = even)."""
    import pandas as pd

    rows = []
    for skew in skews:
        received = send_matrix(routing_per_rank(config, tokens_per_rank, world_size, skew=skew, seed=seed),
                               config.num_experts, world_size).sum(0)
        mean = received.double().mean().item()
        rows += [{"skew": skew, "rank": rank, "pairs_received": int(n), "over_mean": int(n) / mean if mean else 0.0}
                 for rank, n in enumerate(received)]
    return pd.DataFrame(rows)


def live_check(config: MoEConfig, tokens_per_rank: int, world_size: int, *, skew: float = 0.0,
               backend: str = "grouped_mm", variant: str = "exact", seed: int = 0):
    """Start world_size gloo processes; each runs the expert-parallel layer forward and backward on its
    tokens and compares with the float64 single-process reference. One row per rank."""
    import pandas as pd

    from ..parallel import run_on_ranks
    from ..parallel.checks import EPCase, check_against_reference

    case = EPCase(config, (tokens_per_rank,) * world_size, "zipf" if skew > 0 else "uniform", skew=skew,
                  backend=backend, variant=variant, seed=seed)
    return pd.DataFrame(run_on_ranks(check_against_reference, world_size, case))


def phase_table(rows):
    """Per rank: each phase's median ms and its share of the forward (exact variant), plus the one-device row."""
    exact = rows[rows["variant"] == "exact"].set_index("rank")
    phases = ["count_exchange_ms", "dispatch_ms", "expert_compute_ms", "combine_ms"]
    table = exact[phases + ["median_ms", "p10_ms", "p90_ms", "pairs_received"]].copy()
    communication = exact["count_exchange_ms"] + exact["dispatch_ms"] + exact["combine_ms"]
    table["all-to-all share"] = communication / exact[phases].sum(axis=1)
    return table


def recorded_summary():
    """(table, card label) of the recorded GPU run — the layer's forward per EP size, with the one-GPU
    baseline and the all-to-all's bandwidth against NCCL's — or (None, a sentence saying it is not recorded)."""
    from ..recorded_tables import load_ep_record, recorded_label

    record = load_ep_record()
    if record is None:
        return None, ("not recorded yet: tools/ep_record.sh writes the table on a multi-GPU machine, "
                      "and its output folder goes to data/ep_record/")
    summary, provenance = record
    columns = ["preset", "num_tokens", "distribution", "world_size", "variant", "slowest_ms", "tflops_per_gpu",
               "fraction_of_one_device", "a2a_GBps", "a2a_fraction_of_library", "receive_imbalance"]
    return summary[[c for c in columns if c in summary.columns]], recorded_label(provenance)


def imbalance_table(config: MoEConfig, tokens_per_rank: int, world_size: int, skews, seed: int = 0):
    """Per skew: the experts' imbalance (max / mean pairs, moe_lab.routing_stats of all ranks' routing) and
    the ranks' (max / mean pairs received). A rank holds a block of experts, so it averages its experts' loads."""
    import pandas as pd

    from ..routing import routing_stats

    rows = []
    for skew in skews:
        index_per_rank = routing_per_rank(config, tokens_per_rank, world_size, skew=skew, seed=seed)
        stats = routing_stats(torch.cat(index_per_rank), config.num_experts)
        received = send_matrix(index_per_rank, config.num_experts, world_size).sum(0).double()
        rows.append({"skew": skew, "expert imbalance": stats.imbalance,
                     "rank imbalance": (received.max() / received.mean()).item() if received.sum() else 0.0,
                     "busiest rank's share": (received.max() / received.sum()).item() if received.sum() else 0.0})
    return pd.DataFrame(rows)


def padded_cost_table(presets=("qwen3-30b-a3b", "deepseek-v3"), tokens=(1, 128, 8192), world_size: int = 8):
    """Per preset and T: bytes one rank moves per forward with exact split sizes, with the padded layer's
    never-dropping capacity, and with a capacity of twice the even share (which drops pairs when routing is
    skewed: counted, not silent) — moe_lab.parallel.padded.dispatch_bytes, bf16."""
    import math

    import pandas as pd

    from ..parallel.padded import dispatch_bytes

    rows = []
    for name in presets:
        config = PRESETS[name].config.replace(dtype=torch.bfloat16)
        for T in tokens:
            cost = dispatch_bytes(config, T, world_size)
            twice_even = math.ceil(2 * T * config.top_k / world_size)
            factor_two = dispatch_bytes(config, T, world_size, capacity=twice_even)
            rows.append({"preset": name, "EP": world_size, "T per rank": T, "exact MiB": cost.exact_bytes / 2**20,
                         "never drops: capacity": cost.capacity, "MiB": cost.padded_bytes / 2**20,
                         "x exact": cost.padded_over_exact, "2x even share: capacity": twice_even,
                         "MiB ": factor_two.padded_bytes / 2**20, "x exact ": factor_two.padded_over_exact})
    return pd.DataFrame(rows)


def show_code(*functions):
    """The source of each function as a Markdown code block: the central code, read where it runs."""
    import inspect

    from IPython.display import Markdown

    blocks = [f"```python\n{inspect.getsource(function).rstrip()}\n```" for function in functions]
    return Markdown("\n\n".join(blocks))
