"""The --ep table read across ranks and launches: one line per (preset, T, routing, EP size, variant).

    ep_summary(rows)          the slowest rank's time, per-GPU TFLOP/s against the same launch's one-device
                              layer, tokens/s, how unevenly the ranks received, the dispatch all-to-all's
                              bandwidth against the library's for the same bytes
    summarize_tables(paths)   the same over several saved tables (tools/ep_record.sh: one per EP size)
"""
from __future__ import annotations

import math


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
    single = summary[summary["variant"] == "one_device"].set_index(point)["tflops_per_gpu"]
    baseline = [single.get(tuple(key), math.nan) for key in summary[point].itertuples(index=False)]
    summary["fraction_of_one_device"] = summary["tflops_per_gpu"] / pd.Series(baseline, index=summary.index)
    library = summary[summary["variant"].isin(["nccl_all_to_all", "gloo_all_to_all"])]
    library = library.set_index(point)["a2a_GBps"]
    summary["a2a_fraction_of_library"] = [
        row.a2a_GBps / library.get((row.preset, row.num_tokens, row.distribution, row.world_size), math.nan)
        if row.variant == "dispatch_all_to_all" else math.nan for row in summary.itertuples(index=False)]
    no_flops = summary["variant"].str.endswith("all_to_all")
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
