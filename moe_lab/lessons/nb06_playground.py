"""Notebook 06: read the recorded GPU tables (`moe_lab.recorded.load_recorded("presets")`).

Every recorded row carries the ceilings its roofline used (`ceiling_copy_GBps`,
`ceiling_matmul_TFLOPs`, measured on the same card in the same run) and moe_lab rows carry
`speedup_vs_transformers` (transformers' median / moe_lab's median for the backend of the same name).
"""
from __future__ import annotations

MOE_LAB_BACKENDS = ("eager", "batched_mm", "grouped_mm", "triton")


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
