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


def recorded_run():
    """(summary, per-rank rows, card label) of the recorded GPU run, or (None, None, a sentence saying it is not
    recorded). The label names the card: every number read from it is that card's."""
    from ..recorded_tables import load_ep_record, load_ep_rows, recorded_label

    record = load_ep_record()
    if record is None:
        return None, None, recorded_summary()[1]
    summary, provenance = record
    return summary, load_ep_rows(), recorded_label(provenance)


def weak_scaling_view(summary, variant: str = "exact"):
    """Per (preset, T per rank, routing): `variant`'s per-GPU TFLOP/s and its fraction of the one-GPU layer in the
    same launch, one column per EP size (T per rank fixed as EP grows: weak scaling)."""
    from ..bench.ep_summary import weak_scaling

    table = weak_scaling(summary, variant)
    view = table.pivot_table(index=["preset", "num_tokens", "distribution"], columns="world_size",
                             values=["tflops_per_gpu", "fraction_of_one_device"])
    view.columns = [f"{'TFLOP/s' if name == 'tflops_per_gpu' else 'x 1 GPU'} EP={ep}" for name, ep in view.columns]
    return view


def ep1_time_split(rows, distribution: str = "uniform"):
    """At EP = 1 (one rank, nothing crosses a link): the exact layer's four phases beside the one-GPU layer's
    whole forward, per preset and T. What the layer costs beyond the experts, without any transfer."""
    ep1 = rows[(rows["world_size"] == 1) & (rows["distribution"] == distribution) & (rows["status"] == "ok")]
    keys = ["preset", "num_tokens"]
    exact = ep1[ep1["variant"] == "exact"].set_index(keys)
    table = exact[["count_exchange_ms", "dispatch_ms", "expert_compute_ms", "combine_ms", "median_ms"]].copy()
    table = table.rename(columns={"median_ms": "exact_ms"})
    table["one_device_ms"] = ep1[ep1["variant"] == "one_device"].set_index(keys)["median_ms"]
    table["exact - one_device"] = table["exact_ms"] - table["one_device_ms"]
    return table


def recorded_findings(summary, rows) -> str:
    """What the recorded run shows, as Markdown bullets whose every number is read from it."""
    from ..bench.ep_summary import busiest_receiver, goal_status, variants_against_exact

    goals = goal_status(summary).set_index("goal")
    goal = goals.iloc[0]
    point = summary[(summary["preset"] == goal["preset"]) & (summary["num_tokens"] == goal["T per rank"])
                    & (summary["distribution"] == "uniform")]
    by = point.set_index(["variant", "world_size"])["tflops_per_gpu"]
    ep_sizes = sorted(point["world_size"].unique())
    fractions = ", ".join(f"EP={ep} {point[(point.variant == 'exact') & (point.world_size == ep)]['fraction_of_one_device'].iloc[0]:.2f}"
                          for ep in ep_sizes)
    split = ep1_time_split(rows).loc[(goal["preset"], goal["T per rank"])]
    a2a = goals.iloc[1]
    ratios = summary[(summary["variant"] == "dispatch_all_to_all") & (summary["num_tokens"] == summary["num_tokens"].max())]
    uniform, zipf = (ratios[ratios["distribution"] == d]["a2a_fraction_of_library"] for d in ("uniform", "zipf"))
    hot = busiest_receiver(rows)
    hot = hot[(hot["num_tokens"] == hot["num_tokens"].max()) & (hot["distribution"] == "zipf")]["fraction"]
    versus = variants_against_exact(summary)
    chunked = versus[versus["world_size"] > 1].melt(id_vars=["preset", "num_tokens", "distribution", "world_size"],
                                                    value_vars=["pipelined_2", "pipelined_4"]).dropna()
    wins = chunked[chunked["value"] < 1]
    spread = rows[rows["status"] == "ok"].groupby(["preset", "num_tokens", "distribution", "world_size", "variant"])
    spread = spread[["p10_ms", "p90_ms"]].max()  # the slowest rank's spread, bounded from above
    clear = [w for w in wins.itertuples() if spread.loc[(w.preset, w.num_tokens, w.distribution, w.world_size,
             w.variant), "p90_ms"] < spread.loc[(w.preset, w.num_tokens, w.distribution, w.world_size, "exact"), "p10_ms"]]
    win_text = "; ".join(f"{w.preset} T={w.num_tokens} {w.distribution} EP={w.world_size} {w.variant} {w.value:.2f}×"
                         for w in clear) or "none"
    graph = versus[(versus["num_tokens"] == versus["num_tokens"].min())]
    return "\n".join([
        f"- **Goal: EP=2 at ≥ {goal['target']:.0%} of the one-GPU TFLOP/s — {goal['status']}.** {goal['preset']}, "
        f"T={goal['T per rank']} per rank, uniform: EP=2 runs {by[('exact', 2)]:.1f} TFLOP/s per GPU against "
        f"{by[('one_device', 2)]:.1f} for the whole layer on one GPU in the same launch. Fraction of one GPU: {fractions}.",
        f"- **Even EP=1 is slow:** with one rank nothing crosses a link, yet the exact layer takes "
        f"{split['exact_ms']:.2f} ms against the one-GPU layer's {split['one_device_ms']:.2f} ms. Its phases: count "
        f"exchange {split['count_exchange_ms']:.2f}, dispatch {split['dispatch_ms']:.2f}, expert compute "
        f"{split['expert_compute_ms']:.2f}, combine {split['combine_ms']:.2f} ms. So the layer's own work halves the "
        "rate — the host sync, the index building, the extra passes over the rows — not the all-to-all.",
        f"- **Goal: the all-to-all at ≥ {a2a['target']:.0%} of NCCL's — {a2a['status']} at uniform routing** "
        f"({uniform.min():.2f}–{uniform.max():.2f} of the equal-block all-to-all of the same bytes). Under Zipf routing "
        f"the ratio falls to {zipf.min():.2f}–{zipf.max():.2f}, but that compares unlike transfers: most rows go to "
        f"one rank. The rows arriving at that busiest rank come in at {hot.min():.2f}–{hot.max():.2f}× NCCL's "
        "equal-block rate per rank. The links into the hot rank set the time, and the all-to-all uses them fully.",
        f"- **The chunked forward** was slower than the plain one at {len(chunked) - len(wins)} of {len(chunked)} "
        f"multi-rank points, and faster beyond the spread (its slowest rank's p90 under the plain forward's p10) "
        f"only at: {win_text}; its other {len(wins) - len(clear)} faster points are inside the spread. The clear "
        "wins are the skewed prefill cases, where the hot rank's long transfers have experts' work to hide behind.",
        f"- **Goal: EP=8 at ≥ {goals.iloc[2]['target']:.0%} of EP=1 (issue 17) — {goals.iloc[2]['status']}:** no "
        f"8-GPU machine was lent. On {goals.iloc[2]['preset']} at T={goals.iloc[2]['T per rank']}, uniform, EP="
        f"{ep_sizes[-1]} keeps {_fraction_of_ep1(summary, goals.iloc[2], ep_sizes[-1]):.2f} of EP=1's per-GPU TFLOP/s.",
        f"- **At decode sizes (T={graph['num_tokens'].iloc[0]}), the padded layer replayed from a CUDA graph** takes "
        + "; ".join(f"{name}: {g['padded_graph'].min():.2f}–{g['padded_graph'].max():.2f}×" for name, g in graph.groupby("preset"))
        + " the exact layer's time (launched from Python the padded layer takes "
        f"{graph['padded'].min():.2f}–{graph['padded'].max():.2f}×). What the graph removes — the launches and the "
        "host sync — is most of a small forward where the experts' weights are few, a small part where reading "
        "many experts' weights dominates."])


def _fraction_of_ep1(summary, goal, world_size: int) -> float:
    from ..bench.ep_summary import weak_scaling

    table = weak_scaling(summary)
    match = table[(table["preset"] == goal["preset"]) & (table["num_tokens"] == goal["T per rank"])
                  & (table["distribution"] == "uniform") & (table["world_size"] == world_size)]
    return float(match["fraction_of_ep1"].iloc[0])


DEDUP_VARIANTS = ("exact", "dedup", "pipelined_2", "dedup_pipelined_2")


def dedup_comparison():
    """(table, card label) of the 2-GPU recording (data/ep_record_dedup): per (preset, T per rank, routing, EP
    size) each layer's fraction of the one-GPU layer timed in the same launch — the exact layer, the one that
    sends each token once per rank (dedup), and both chunked — and each dispatch's all-to-all in ms; or
    (None, a sentence saying it is not recorded)."""
    from ..recorded_tables import EP_RECORD_DEDUP, data_dir, load_ep_record, recorded_label

    record = load_ep_record(data_dir() / EP_RECORD_DEDUP)
    if record is None:
        return None, "not recorded yet: tools/ep_record.sh on 2 GPUs, its output folder copied to data/ep_record_dedup/"
    summary, provenance = record
    keys = ["preset", "num_tokens", "distribution", "world_size"]
    layers = summary[summary["variant"].isin(DEDUP_VARIANTS)]
    table = layers.pivot_table(index=keys, columns="variant", values="fraction_of_one_device")
    table = table[[v for v in DEDUP_VARIANTS if v in table.columns]].add_prefix("x 1 GPU ")
    transfers = summary[summary["variant"].isin(["dispatch_all_to_all", "dedup_dispatch_all_to_all"])]
    a2a = transfers.pivot_table(index=keys, columns="variant", values="slowest_ms")
    a2a = a2a.rename(columns={"dispatch_all_to_all": "exact a2a ms", "dedup_dispatch_all_to_all": "dedup a2a ms"})
    return table.join(a2a), recorded_label(provenance)


def profile_excerpt(layer: str = "dedup", lines: int = 6) -> str:
    """The first `lines` lines of rank 0's profile of one EP=2 forward of `layer` (data/ep_record_dedup/
    ep_profile.txt, written by moe_lab.bench.ep_profile): the GPU's busy and idle time, the top kernels."""
    from ..recorded_tables import EP_RECORD_DEDUP, data_dir

    path = data_dir() / EP_RECORD_DEDUP / "ep_profile.txt"
    if not path.exists():
        return "not recorded yet"
    text = path.read_text().split("=== rank 1")[0]  # rank 0's part
    marker = f"--- {layer}\n"
    if marker not in text:
        raise ValueError(f"no profile of layer {layer!r} in {path}; it holds: "
                         f"{[line[4:] for line in text.splitlines() if line.startswith('--- ')]}")
    section = text.split(marker, 1)[1].splitlines()
    return "\n".join(line[:150] for line in section[:lines])


def gathered_bytes_table(preset: str = "qwen3-30b-a3b", world_sizes=(2, 4, 8), tokens_per_rank: int = 8192):
    """Per EP size: the chance a token has an expert on a given other rank (uniform routing), and the MiB one rank
    sends other ranks per forward with the exact, dedup and gathered layers
    (moe_lab.parallel.gathered.dispatch_bytes, bf16). Arithmetic from the formulas, not a measurement."""
    import pandas as pd

    from ..parallel.gathered import dispatch_bytes, rank_hit_probability

    config = PRESETS[preset].config.replace(dtype=torch.bfloat16)
    rows = []
    for world in world_sizes:
        cost = dispatch_bytes(config, tokens_per_rank, world)
        reach = rank_hit_probability(config.num_experts, config.top_k, world)
        rows.append({"EP": world, "P(token reaches a rank)": reach,
                     "exact MiB": cost.exact_bytes / 2**20, "dedup MiB": cost.dedup_bytes / 2**20,
                     "gathered MiB": cost.gathered_bytes / 2**20, "gathered / dedup": cost.gathered_over_dedup,
                     "gathered / exact": cost.gathered_over_exact})
    return pd.DataFrame(rows)


def gathered_stops_paying(preset: str = "qwen3-30b-a3b", tokens_per_rank: int = 8192) -> str:
    """A sentence, computed from dispatch_bytes over every EP size that divides the preset's experts: the first
    size at which the gathered layer sends more than the exact layer, and its bytes over dedup's there."""
    from ..parallel.gathered import dispatch_bytes

    config = PRESETS[preset].config.replace(dtype=torch.bfloat16)
    sizes = [w for w in range(2, config.num_experts + 1) if config.num_experts % w == 0]
    costs = {w: dispatch_bytes(config, tokens_per_rank, w) for w in sizes}
    worse = next((w for w in sizes if costs[w].gathered_over_exact > 1), None)
    if worse is None:
        return (f"On {preset} the gathered layer sends fewer bytes than the exact layer at every EP size up to "
                f"{sizes[-1]}.")
    return (f"On {preset} (k = {config.top_k} of {config.num_experts} experts) the gathered layer sends more bytes "
            f"than the exact layer from EP = {worse} on ({costs[worse].gathered_over_exact:.2f}× there, "
            f"{costs[worse].gathered_over_dedup:.2f}× the dedup layer's; at EP = {sizes[-1]}, "
            f"{costs[sizes[-1]].gathered_over_exact:.1f}× the exact layer's): its regime is EP small against k.")


def partial_forward_demo(config: MoEConfig, num_tokens: int = 16, world_size: int = 2, seed: int = 0):
    """One layer's experts cut into world_size blocks, as the ranks hold them; every block runs the same
    `num_tokens` rows with run_partial_experts (ids of experts elsewhere -> "not here"), once per registered backend
    that runs on this CPU in float32, with gradients. One row per backend: whether its spec declares
    `partial_forward` (asked of the registry), the expert pairs its blocks computed, the error of the blocks' summed
    partials against the whole layer's float64 reference, and the worst error of the gradients (rows, routing
    weights, both weight tensors, the blocks' put back together) against the whole layer's float64 ones; each
    judged against moe_lab's float32 tolerance."""
    import pandas as pd

    from ..backends import Where, get_spec
    from ..modules import Experts
    from ..parallel import ExpertShard
    from ..parallel.local import partial_spec, run_partial_experts
    from ..parallel.sharding import local_config
    from ..reference import reference_experts_forward, reference_gradients, relative_error
    from .tolerances import reference_tolerance

    torch.manual_seed(seed)
    config = config.replace(dtype=torch.float32)
    whole = Experts(config)
    hidden = torch.randn(num_tokens, config.hidden_size)  # [N, H]
    upstream = torch.randn(num_tokens, config.hidden_size)  # [N, H]: the gradient arriving from above
    index, weights = synthetic_routing(num_tokens, config.num_experts, config.top_k, seed=seed)  # [N, k] each
    expected = reference_experts_forward(whole, hidden, index, weights)  # [N, H]
    expected_grads = reference_gradients(whole, hidden, index, weights, upstream)
    tolerance = reference_tolerance(torch.float32)
    where = Where(torch.device("cpu"), torch.float32, config.hidden_size, config.intermediate_size)
    rows = []
    for name in available_backends():
        spec = get_spec(name)
        if not spec.supports("runs", where):
            continue
        trains = spec.supports("autograd", where).ok is not False  # a backend declared without autograd: forward only
        x, w = hidden.clone().requires_grad_(trains), weights.clone().requires_grad_(trains)
        total, pairs, blocks = torch.zeros_like(hidden), 0, []
        for rank in range(world_size):
            shard = ExpertShard(rank, world_size, config.num_experts)
            block = Experts(local_config(config, shard), name).requires_grad_(trains)
            with torch.no_grad():
                block.gate_up_proj.copy_(whole.gate_up_proj[shard.first:shard.first + shard.count])
                block.down_proj.copy_(whole.down_proj[shard.first:shard.first + shard.count])
            local = index - shard.first
            local = torch.where((local >= 0) & (local < shard.count), local, shard.count)  # [N, k]
            total = total + run_partial_experts(block, x, local, w)  # [N, H]
            runs = partial_spec(block, x, local, w)  # what run_partial_experts ran (auto: its choice here)
            pairs += int((local < shard.count).sum()) if runs.partial_forward is not None else local.numel()
            blocks.append(block)
        gradient_error = float("nan")
        if trains:
            total.backward(upstream)
            got_grads = {"hidden_states": x.grad, "top_k_weights": w.grad,
                         "gate_up_proj": torch.cat([b.gate_up_proj.grad for b in blocks]),
                         "down_proj": torch.cat([b.down_proj.grad for b in blocks])}
            gradient_error = max(relative_error(got, expected_grads[key]) if got is not None else float("inf")
                                 for key, got in got_grads.items())  # None: a gradient that never arrived
        error = relative_error(total.detach(), expected)
        rows.append({"backend": name, "declares partial_forward": spec.partial_forward is not None,
                     "pairs computed (all ranks)": pairs, "pairs routed": index.numel(),
                     "error of the summed partials": error, "error of the gradients": gradient_error,
                     "result": "equals the whole layer" if error <= tolerance else "differs from the whole layer",
                     "gradients": ("not asked (declared without autograd)" if not trains
                                   else "equal the whole layer's" if gradient_error <= tolerance else "differ")})
    return pd.DataFrame(rows)


#: The layers the gathered recording's table shows, launched from Python (against the launched one-GPU layer).
GATHERED_LAUNCHED = ("exact", "dedup", "gathered")


def gathered_record():
    """(summary, card label) of the 2-GPU recording with the gathered layer (data/ep_record_gathered/ep_summary.csv:
    one line per preset, T, routing, EP size and variant), or (None, a sentence saying it is not recorded)."""
    from ..recorded_tables import EP_RECORD_GATHERED, data_dir, load_ep_record, recorded_label

    record = load_ep_record(data_dir() / EP_RECORD_GATHERED)
    if record is None:
        return None, ("not recorded yet: tools/ep_record.sh on 2 GPUs, its output folder copied to "
                      "data/ep_record_gathered/")
    summary, provenance = record
    return summary, recorded_label(provenance)


def gathered_comparison(summary):
    """Per (preset, T per rank, routing) at EP=2: the launched exact, dedup and gathered layers' fractions of the
    launched one-GPU layer, the gathered layer replayed from a CUDA graph against the replayed one-GPU layer
    (`one_device_graph`), and the gathered dispatch's all-gather against NCCL's own for the same bytes."""
    summary = summary[summary["world_size"] == 2]
    keys = ["preset", "num_tokens", "distribution"]
    fractions = summary.pivot_table(index=keys, columns="variant", values="fraction_of_one_device")
    table = fractions[list(GATHERED_LAUNCHED)].copy()  # launched, x the launched one-GPU layer
    table["gathered, replayed"] = fractions["gathered_graph"]  # x the replayed one-GPU layer
    times = summary.pivot_table(index=keys, columns="variant", values="slowest_ms")
    table["all-gather ms"] = times["gathered_dispatch_all_gather"]
    table["NCCL's ms"] = times["gathered_nccl_all_gather"]
    bandwidth = summary.pivot_table(index=keys, columns="variant", values="a2a_fraction_of_library")
    table["x NCCL"] = bandwidth["gathered_dispatch_all_gather"]  # bytes/s over NCCL's, same bytes
    table.columns.name = None
    return table


def fastest_ep_layers(summary):
    """Per (preset, T per rank, routing, EP size > 1): the EP layer with the highest fraction of one GPU among
    those launched from Python and among those replayed from a CUDA graph (`*_graph`). Transfers alone
    (`*_all_to_all`, `*_all_gather`) and the one-GPU layer are not layers here."""
    import pandas as pd

    keys = ["preset", "num_tokens", "distribution", "world_size"]
    layers = summary[(summary["world_size"] > 1) & ~summary["variant"].str.startswith("one_device")
                     & ~summary["variant"].str.contains("_all_to_all|_all_gather")]
    replayed = layers["variant"].str.endswith("_graph")
    best = {kind: part.loc[part.groupby(keys)["fraction_of_one_device"].idxmax()].set_index(keys)["variant"]
            for kind, part in (("launched", layers[~replayed]), ("replayed", layers[replayed]))}
    return pd.DataFrame(best)


def gathered_finding(summary, label: str, preset: str = "qwen3-30b-a3b", num_tokens: int = 8192) -> str:
    """One sentence, every number read from the recording: whether the gathered layer is the fastest EP layer at
    every recorded point (launched and replayed), its fractions at the goal's point (launched against the launched
    one-GPU layer, replayed against the replayed one), and the goal's verdict, with the card named."""
    from ..bench.ep_summary import EP_GOALS

    target = next(goal[5] for goal in EP_GOALS if goal[4] == "fraction_of_one_device")
    fastest = fastest_ep_layers(summary)
    wins = (fastest["launched"] == "gathered") & (fastest["replayed"] == "gathered_graph")
    lead = (f"the gathered layer is the fastest EP layer recorded, launched and replayed, at all {len(wins)} points"
            if wins.all() else f"the gathered layer is the fastest EP layer at {wins.sum()} of {len(wins)} points")
    point = summary[(summary["preset"] == preset) & (summary["num_tokens"] == num_tokens)
                    & (summary["distribution"] == "uniform") & (summary["world_size"] == 2)]
    fraction = point.set_index("variant")["fraction_of_one_device"]
    launched, replayed = fraction["gathered"], fraction["gathered_graph"]
    verdict = "met" if max(launched, replayed) >= target else "missed"
    return (f"On two {label.split(',')[0]} GPUs {lead}: on {preset} at T = {num_tokens} per rank, uniform, it runs "
            f"at {launched:.2f} of one GPU launched and {replayed:.2f} replayed from a CUDA graph against the replayed "
            f"one-GPU layer — the goal of {target:.2f} {verdict}.")
