"""The --ep table read across ranks and launches: one line per (preset, T, routing, EP size, variant).

    ep_summary(rows)          the slowest rank's time, per-GPU TFLOP/s against the same launch's one-device
                              layer, tokens/s, how unevenly the ranks received, the dispatch all-to-all's
                              bandwidth against the library's for the same bytes
    summarize_tables(paths)   the same over several saved tables (tools/ep_record.sh: one per EP size)
"""
from __future__ import annotations

import math


#: Rows that time the library's own collective on the same bytes as a layer's dispatch (name endings).
LIBRARY_ROWS = ("nccl_all_to_all", "gloo_all_to_all", "nccl_all_gather", "gloo_all_gather")
#: Rows that time a collective alone, not the layer (no FLOPs): the layers' dispatches and the library's.
COLLECTIVE_ROWS = ("dispatch_all_to_all", "dispatch_all_gather", *LIBRARY_ROWS)


def ep_summary(frame):
    """One line per (preset, T, routing, variant, EP size): the slowest rank's median time (the layer
    is done when it is), per-GPU TFLOP/s of useful expert work and its fraction of the single-GPU
    layer's in the same run, tokens/s over all ranks, and all-to-all bandwidth (the slowest rank's)."""
    import pandas as pd

    ok = frame[frame["status"] == "ok"]
    keys = ["preset", "num_tokens", "distribution", "world_size", "variant"]
    grouped = ok.groupby(keys, sort=False)
    summary = grouped.agg(slowest_ms=("median_ms", "max"), flops=("flops", "first"), ranks=("rank", "nunique"),
                          a2a_GBps=("a2a_GBps", "min"), pairs_received_max=("pairs_received", "max"),
                          pairs_received_mean=("pairs_received", "mean")).reset_index()
    summary["tflops_per_gpu"] = summary["flops"] / (summary["slowest_ms"] * 1e9)
    summary["tokens_per_s"] = summary["num_tokens"] * summary["ranks"] / (summary["slowest_ms"] * 1e-3)
    summary["receive_imbalance"] = summary["pairs_received_max"] / summary["pairs_received_mean"]
    point = ["preset", "num_tokens", "distribution", "world_size"]  # world_size: the launch (one_device: its rank 0)
    # Launched layers against the launched one-GPU layer, CUDA-graph replays ("*_graph") against its replay
    # (one_device_graph) where the run has one: the launch cost of a few kernels is not the EP layer's to carry.
    single = summary[summary["variant"] == "one_device"].set_index(point)["tflops_per_gpu"]
    replayed = summary[summary["variant"] == "one_device_graph"].set_index(point)["tflops_per_gpu"]
    baseline = [(replayed if variant.endswith("_graph") and tuple(key) in replayed.index else single).get(
                    tuple(key), math.nan)
                for key, variant in zip(summary[point].itertuples(index=False), summary["variant"])]
    summary["fraction_of_one_device"] = summary["tflops_per_gpu"] / pd.Series(baseline, index=summary.index)
    # Each dispatch's all-to-all against the library's equal-block one for the same bytes: "dispatch_all_to_all"
    # (the exact layer's) with "nccl_all_to_all" (or gloo's), "dedup_dispatch_all_to_all" with "dedup_nccl_...".
    # The gathered layer's all-gather likewise: "gathered_dispatch_all_gather" with "gathered_nccl_all_gather".
    library = summary[summary["variant"].str.endswith(LIBRARY_ROWS)]
    library = library.assign(variant=library["variant"].str.replace(r"(nccl|gloo)_all_(to_all|gather)$",
                                                                    r"dispatch_all_\2", regex=True))
    library = library.set_index(point + ["variant"])["a2a_GBps"]
    summary["a2a_fraction_of_library"] = [
        row.a2a_GBps / library.get((row.preset, row.num_tokens, row.distribution, row.world_size, row.variant),
                                   math.nan)
        if row.variant.endswith(("dispatch_all_to_all", "dispatch_all_gather")) else math.nan
        for row in summary.itertuples(index=False)]
    no_flops = summary["variant"].str.endswith(COLLECTIVE_ROWS)
    summary.loc[no_flops, ["tflops_per_gpu", "tokens_per_s", "fraction_of_one_device"]] = math.nan
    return pd.DataFrame(summary)


def summarize_tables(paths):
    """ep_summary of several saved --ep tables (one per EP size) as one table, with each table's card."""
    import pandas as pd

    from .results import load_results

    frames = []
    for path in paths:
        frame, info = load_results(path)
        frames.append(frame.assign(device_name=info.get("device_name", "")))
    whole = pd.concat(frames, ignore_index=True)
    summary = ep_summary(whole)
    cards = whole.groupby("world_size")["device_name"].first()
    summary.insert(0, "device_name", summary["world_size"].map(cards).fillna(whole["device_name"].iloc[0]))
    return summary


#: Issue 16's and 17's goals: (name, preset, T per rank, EP size, what is compared, target).
EP_GOALS = (
    ("EP=2 per-GPU TFLOP/s vs one GPU", "qwen3-30b-a3b", 8192, 2, "fraction_of_one_device", 0.85),
    ("dispatch all-to-all vs NCCL, same bytes", "qwen3-30b-a3b", 8192, 2, "a2a_fraction_of_library", 0.80),
    ("EP=8 per-GPU TFLOP/s vs EP=1", "deepseek-v3", 8192, 8, "fraction_of_ep1", 0.75),
)


def weak_scaling(summary, variant: str = "exact"):
    """One line per (preset, T, routing, EP size): `variant`'s slowest-rank time and per-GPU TFLOP/s, as a
    fraction of the one-GPU layer in the same launch and of the EP=1 launch (T per rank fixed: weak scaling)."""
    keys = ["preset", "num_tokens", "distribution"]
    rows = summary[summary["variant"] == variant]
    table = rows[keys + ["world_size", "slowest_ms", "tflops_per_gpu", "fraction_of_one_device"]].copy()
    ep1 = rows[rows["world_size"] == 1].set_index(keys)["tflops_per_gpu"]
    table["fraction_of_ep1"] = [row.tflops_per_gpu / ep1.get((row.preset, row.num_tokens, row.distribution), math.nan)
                                for row in table.itertuples(index=False)]
    return table.sort_values(keys + ["world_size"]).reset_index(drop=True)


def goal_status(summary, goals=EP_GOALS, variant: str = "exact"):
    """Each goal's measured value at its (preset, T, EP size), uniform routing, for `variant`'s layer ("exact",
    "dedup"; the all-to-all goal reads that layer's dispatch row): 'met', 'missed' or 'not run' (no such EP size,
    or no such variant, in the recording)."""
    import pandas as pd

    scaling = weak_scaling(summary, variant)
    dispatch_variant = {"exact": "dispatch_all_to_all", "gathered": "gathered_dispatch_all_gather"}.get(
        variant, f"{variant}_dispatch_all_to_all")
    rows = []
    for name, preset, tokens, world, column, target in goals:
        source = summary if column == "a2a_fraction_of_library" else scaling
        variant_of_row = {"a2a_fraction_of_library": dispatch_variant}.get(column)
        match = source[(source["preset"] == preset) & (source["num_tokens"] == tokens)
                       & (source["distribution"] == "uniform") & (source["world_size"] == world)]
        if variant_of_row is not None:
            match = match[match["variant"] == variant_of_row]
        value = float(match[column].iloc[0]) if len(match) else math.nan
        status = "not run" if math.isnan(value) else ("met" if value >= target else "missed")
        rows.append({"goal": name, "preset": preset, "T per rank": tokens, "EP": world, "target": target,
                     "measured": value, "status": status})
    return pd.DataFrame(rows)


def variants_against_exact(summary):
    """Per (preset, T, routing, EP size): each other variant's slowest-rank time over the exact layer's
    (< 1: faster than the plain forward)."""
    point = ["preset", "num_tokens", "distribution", "world_size"]
    exact = summary[summary["variant"] == "exact"].set_index(point)["slowest_ms"]
    layers = ~summary["variant"].str.endswith(COLLECTIVE_ROWS) & ~summary["variant"].isin(["exact", "one_device"])
    others = summary[layers]
    table = others.pivot_table(index=point, columns="variant", values="slowest_ms")
    return table.div(exact, axis=0).reset_index()


def busiest_receiver(rows):
    """Per (preset, T, routing, EP size > 1): the rank that receives the most rows from other ranks, and the
    rate at which they arrive in the dispatch all-to-all against the equal-block all-to-all's per-rank rate.
    Under skew every rank sends as much as under uniform routing, but one rank receives most of it: its
    incoming links, not the all-to-all's efficiency, set the time. rows: the per-rank --ep rows."""
    import pandas as pd

    ok = rows[(rows["status"] == "ok") & (rows["world_size"] > 1)]
    point = ["preset", "num_tokens", "distribution", "world_size"]
    out = []
    for key, group in ok.groupby(point, sort=False):
        dispatch = group[group["variant"] == "dispatch_all_to_all"]
        library = group[group["variant"].isin(["nccl_all_to_all", "gloo_all_to_all"])]
        if dispatch.empty or library.empty:
            continue
        row_bytes = dispatch["hidden_size"] * dispatch["dtype"].map(_dtype_bytes)  # bytes per [H] row
        to_self = dispatch["pairs_sent"] - dispatch["bytes_off_rank"] / row_bytes  # rows a rank keeps
        incoming = (dispatch["pairs_received"] - to_self) * row_bytes  # bytes arriving from other ranks
        busiest = incoming.idxmax()
        dispatch_GBps = incoming[busiest] / (dispatch.loc[busiest, "median_ms"] * 1e6)
        library_GBps = library["a2a_GBps"].min()  # equal blocks: every rank receives what it sends off-rank
        out.append(dict(zip(point, key)) | {
            "busiest rank": int(dispatch.loc[busiest, "rank"]), "its incoming GB": incoming[busiest] / 1e9,
            "incoming GB/s": dispatch_GBps, "NCCL equal-block GB/s": library_GBps,
            "fraction": dispatch_GBps / library_GBps})
    return pd.DataFrame(out)


def _dtype_bytes(name: str) -> int:
    import torch

    return getattr(torch, str(name).replace("torch.", "")).itemsize
