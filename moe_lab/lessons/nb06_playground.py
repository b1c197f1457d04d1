"""Notebook 06: its parameters, and reading the recorded GPU tables (`moe_lab.recorded_tables.load_recorded("presets")`).

Every recorded row carries the ceilings its roofline used (`ceiling_copy_GBps`,
`ceiling_matmul_TFLOPs`, measured on the same card in the same run) and moe_lab rows carry
`speedup_vs_transformers` (transformers' median / moe_lab's median for the backend of the same name).
The sentences that read the tables (`reading_guide`, `replay_summary`) are written from the data, so a
new recording cannot leave them wrong.
"""
from __future__ import annotations

from ..parameters import Device, Dtype, Float, Int, IntList, Parameters, Str
from ..presets import PRESETS

MOE_LAB_BACKENDS = ("eager", "batched_mm", "grouped_mm", "triton")

PARAMETERS = Parameters(
    device=Device(),
    preset=Str(choices=lambda: list(PRESETS)),
    hidden_size=Int(min=16, max=4096, multiple_of=16,
                    help="the scaled-down layer's H; a multiple of 16 keeps every row 16-byte aligned"),
    dtype=Dtype(),
    tokens=IntList(min=1, max=65536, max_len=17, help="the explorer's token counts, e.g. [1, 8, 64, 256]"),
    max_seconds=Float(positive=True, max=5.0, help="timing budget of one visit of one point, in seconds"),
    rounds=Int(min=1, max=9, help="interleaved rounds per live comparison; 3 or more give a verdict"),
)


def recorded_ceilings(rows) -> dict:
    """The ceilings of one recorded run, as `moe_lab.plots.roofline_chart` takes them.

    {"copy_GBps", "matmul_TFLOPs", "device" (the card), "dtype"}; raises ValueError if `rows` mix
    runs with different ceilings (plot one preset, or one file, at a time).
    """
    measured = rows.dropna(subset=["ceiling_copy_GBps", "ceiling_matmul_TFLOPs"])
    pairs = measured[["ceiling_copy_GBps", "ceiling_matmul_TFLOPs"]].drop_duplicates()
    if len(pairs) != 1:
        raise ValueError(f"expected the ceilings of one run, found {len(pairs)} different pairs: "
                         f"{pairs.round(1).values.tolist()}; select rows of one preset")
    copy_gbps, matmul_tflops = pairs.iloc[0]
    return {"copy_GBps": float(copy_gbps), "matmul_TFLOPs": float(matmul_tflops),
            "device": ", ".join(sorted(measured["device_name"].unique())),
            "dtype": ", ".join(sorted(measured["dtype"].unique()))}


def recorded_table(df, values=("fraction_of_roofline", "speedup_vs_transformers"), backends=MOE_LAB_BACKENDS):
    """One row per preset x tokens, one column per (value, backend); "refused" where the backend
    refused to run, "—" where the value does not exist (transformers has no triton backend).

    fraction_of_roofline: 1.0 would be the ceiling (memory- or compute-bound, whichever is slower).
    speedup_vs_transformers: > 1 means moe_lab's backend beat transformers' of the same name.
    """
    import pandas as pd

    rows = df[df["backend"].isin(backends)]
    order = list(dict.fromkeys(rows["preset"]))  # presets in recorded order, not alphabetical
    table = rows.pivot_table(index=["preset", "num_tokens"], columns="backend", values=list(values),
                             aggfunc="first", dropna=False)
    table = table.reindex(columns=pd.MultiIndex.from_product([list(values), list(backends)]))
    table = table.reindex(pd.MultiIndex.from_product([order, sorted(rows["num_tokens"].unique())],
                                                     names=["preset", "T"]))
    status = rows.pivot_table(index=["preset", "num_tokens"], columns="backend", values="status", aggfunc="first")
    status = status.reindex(columns=list(backends)).reindex(table.index)
    filler = pd.concat({value: status.map(lambda s: "refused" if s == "refused" else "—") for value in values}, axis=1)
    return table.round(3).astype(object).where(table.notna(), filler)


# ----------------------------------------------------------------------------- sentences from the data


def _span(values, fmt: str = ".2f") -> str:
    """"0.41–0.99" (or one value when they are equal at this precision)."""
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}–{high}"


def _ours(recorded):
    return recorded[recorded["backend"].isin(MOE_LAB_BACKENDS)]


def reading_guide(recorded, *, many_experts: int = 16) -> str:
    """The "what to see" bullets of notebook 06 as Markdown, every number read from `recorded`
    (launched rows of `load_recorded("presets")`). `many_experts`: presets with more experts than this
    count as fine-grained (many small experts), the others as coarse."""
    ours = _ours(recorded)
    ok = ours[ours["status"] == "ok"]
    decode = ok[ok["num_tokens"] == 1]
    winners = decode.loc[decode.groupby("preset")["median_ms"].idxmin()]
    counts = winners["backend"].value_counts()
    best = decode.loc[decode["fraction_of_roofline"].idxmax()]
    fastest = "; ".join(f"{b} on {n} of {len(winners)}" for b, n in counts.items())
    later = ok[ok["num_tokens"] >= 16]
    lines = [
        f"- **T=1**, launched from Python: the best row reaches {best['fraction_of_roofline']:.2f} of the roofline "
        f"({best['backend']} on {best['preset']}); a few kernels moving a few experts' weights, and the launches "
        f"themselves: latency-bound. Fastest per preset: {fastest}.",
    ]
    fused = []
    for backend in ("grouped_mm", "triton"):
        rows = later[later["backend"] == backend]
        if len(rows):
            top = rows.loc[rows["fraction_of_roofline"].idxmax()]
            fused.append(f"{backend} {_span(rows['fraction_of_roofline'])} (highest: {top['preset']} at "
                         f"T={top['num_tokens']})")
    lines.append("- **From T=16** the fraction of the roofline is " + ", ".join(fused)
                 + "; triton fuses the glue around the two matmuls.")
    eager = later[later["backend"] == "eager"]
    fine, coarse = eager[eager["num_experts"] > many_experts], eager[eager["num_experts"] <= many_experts]
    if len(fine) and len(coarse):
        lines.append(
            f"- **eager** depends on the experts' size: {_span(fine['fraction_of_roofline'])} with "
            f"{_span(fine['num_experts'], 'd')} small experts (a launch per expert and a host sync), but "
            f"{_span(coarse['fraction_of_roofline'])} with {_span(coarse['num_experts'], 'd')} large ones, where "
            "each per-expert matmul fills the GPU by itself.")
    speed = ok.dropna(subset=["speedup_vs_transformers"])
    per_backend = ", ".join(f"{b} {_span(g['speedup_vs_transformers'])}x"
                            for b, g in speed.groupby("backend", sort=False))
    ties = speed[(speed["speedup_lowest_round"] < 1) & (speed["speedup_highest_round"] > 1)]
    tie_text = "; ".join(f"{r.backend} on {r.preset} at T={r.num_tokens}: {r.speedup_lowest_round:.2f}–"
                         f"{r.speedup_highest_round:.2f}x over the rounds" for r in ties.itertuples())
    lines.append(f"- **speedup_vs_transformers**: {per_backend}. "
                 + (f"{len(ties)} ratio(s) straddle 1.0 across the {int(speed['rounds'].max())} interleaved rounds and count as ties "
                    f"({tie_text}). " if len(ties) else "No ratio straddles 1.0 across the rounds. ")
                 + "transformers has no triton backend (—).")
    return "\n".join(lines)


def replay_summary(best, launched) -> str:
    """Notebook 06's reading of `bench.best_paths` (launched and replayed, both libraries), as Markdown:
    how far replay takes the best path at T=1, where it stays from T=16 to 128, and how it compares
    with transformers' best path. `launched`: the launched rows (to say where T=1 started)."""
    one = best[best["num_tokens"] == 1]
    mid = best[best["num_tokens"].between(16, 128)]
    start = _ours(launched)
    start = start[(start["num_tokens"] == 1) & (start["status"] == "ok")]
    start = start.groupby("preset")["fraction_of_roofline"].max()
    above = int((best["speedup"] > 1).sum())
    verdict = ("at every recorded point" if above == len(best) else f"at {above} of {len(best)} recorded points")
    return (f"At T=1 replay takes the best path from {_span(start, '.0%')} of the roofline (launched, best "
            f"moe_lab row per preset) to {_span(one['moe_lab_roofline'], '.0%')}; from T=16 to 128 it stays at "
            f"{_span(mid['moe_lab_roofline'], '.0%')}. moe_lab's best path is "
            f"{_span(best['speedup'])}x faster than transformers' best path, faster {verdict}. "
            "`docs/performance_notes.md` walks through each lever (fused kernels, the decode kernels, CUDA graphs, "
            "tile sizes) with what was predicted and what was measured.")
