"""Notebook 05 (torch.compile): its parameters, the live break-even table, and the recorded compile
matrix set against transformers' documented compatibility table (data/transformers_compile_table.json).

Everything here is computed from the recorded tables, so recording more modes later (max-autotune,
max-autotune-no-cudagraphs, eager) changes what the notebook says without editing it.
"""
from __future__ import annotations

import json
import math

from ..backends import available_backends
from ..bench.compile_matrix import COMPILE_MODES
from ..bench.live import DEFAULT_MARGIN
from ..bench.rounds import parse_round_medians
from ..parameters import Device, Dtype, Float, Int, Parameters, Rule, Str, StrList
from ..recorded_tables import data_dir
from .figures import Prose

FULLGRAPH_BACKENDS = ("aot_eager", "inductor", "eager")
PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(), hidden_size=Int(min=16, max=1024, multiple_of=16),
    num_experts=Int(min=1, max=64), top_k=Int(min=1, max=64), num_tokens=Int(min=1, max=256),
    modes=StrList(choices=COMPILE_MODES), backends=StrList(choices=lambda: [b for b in available_backends()
                                                                            if b != "auto"]),
    fullgraph_backend=Str(choices=FULLGRAPH_BACKENDS), seed=Int(min=0), max_seconds=Float(positive=True, max=10),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts")],
)
SEED_FILE = "transformers_compile_table.json"
LIBRARIES = {"moe_lab": "", "transformers": "transformers:"}


# ----------------------------------------------------------------------------- live


def break_even_table(live, margin: float = DEFAULT_MARGIN):
    """Per compiled cell: did compiling save time in every timing round, and after how many calls
    does the compile time pay for itself? `verdict`: "faster" when every round's compiled median
    is below the uncompiled median by more than `margin`, "slower" when every one is above it by
    more, "no clear difference" otherwise; calls_to_break_even only for "faster"."""
    rows = []
    for _, row in live.iterrows():
        rounds = parse_round_medians(row.get("compiled_round_ms", ""))
        verdict, calls = "not compiled", math.nan
        if row["status"] == "compiled" and rounds:
            uncompiled = row["uncompiled_ms"]
            if all(r * (1 + margin) < uncompiled for r in rounds):
                verdict = "faster"
                calls = row["compile_s"] * 1e3 / (uncompiled - row["compiled_ms"])
            elif all(r > uncompiled * (1 + margin) for r in rounds):
                verdict = "slower"
            else:
                verdict = "no clear difference"
        rows.append({"mode": row["mode"], "backend": row["backend"], "compile_s": row["compile_s"],
                     "uncompiled_ms": row["uncompiled_ms"], "compiled_ms": row["compiled_ms"],
                     "compiled_round_ms": row.get("compiled_round_ms", ""), "verdict": verdict,
                     "calls_to_break_even": calls})
    import pandas as pd

    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- recorded vs the seed


def seed_table() -> dict:
    """transformers' documented compile table (a transcription, with its source), as stored in data/."""
    return json.loads((data_dir() / SEED_FILE).read_text())


def _seed_says(seed: dict, backend: str, path: str, mode: str, dtype: str) -> str:
    for row in seed["rows"]:
        if row["backend"] == backend and row["path"] in ("", path):
            if dtype not in row["dtypes"]:
                return f"not for {dtype}"
            return "yes" if mode in row["modes"] else "no"
    return "—"


def recorded_path(recorded, provenance: dict) -> str:
    """Which grouped matmul the recorded grouped_mm rows ran, read from the rows and the provenance:
    torch's op in bf16 on compute capability 9.x/10.x is its fused kernel (the rule of
    `moe_lab.grouped_mm_path`); anything else is torch's per-group loop or moe_lab's."""
    kernels = set(recorded.loc[recorded["backend"] == "grouped_mm", "grouped_mm_kernel"].dropna()) - {"", "False"}
    dtypes = set(recorded["dtype"])
    major = str(provenance.get("compute_capability", "0")).split(".")[0]
    if kernels and all("grouped_mm" in k for k in kernels) and dtypes == {"bfloat16"} and major in ("9", "10"):
        return "native"
    return "fallback"


def _cell(rows) -> str:
    if rows.empty:
        return "not recorded"
    parts = []
    for status, group in rows.groupby("status", sort=False):
        tokens = ", ".join(f"T={int(t)}" for t in sorted(group["num_tokens"]))
        if status == "compiled":
            right = group["equal_after_routing_change"].astype(bool) & group["equal_to_uncompiled"].astype(bool)
            word = "compiled, right after the routing changed" if right.all() else "compiled, WRONG after a change"
            parts.append(f"{word} ({tokens})")
        else:
            parts.append(f"{status} ({tokens})")
    return "; ".join(parts)


def seed_comparison(recorded, provenance: dict):
    """One row per (backend, mode): what transformers' table says for the recorded dtype and path, and
    what the recorded matrix shows for moe_lab's backend and transformers' own of the same name."""
    import pandas as pd

    seed, path = seed_table(), recorded_path(recorded, provenance)
    dtype = ", ".join(sorted(set(recorded["dtype"])))
    rows = []
    for backend in ("grouped_mm", "batched_mm", "eager"):
        for mode in COMPILE_MODES:
            row = {"backend": backend, "mode": mode,
                   "transformers' table says": _seed_says(seed, backend, path if backend == "grouped_mm" else "",
                                                          mode, dtype)}
            for library, prefix in LIBRARIES.items():
                cells = recorded[(recorded["backend"] == prefix + backend) & (recorded["mode"] == mode)]
                row[f"recorded, {library}"] = _cell(cells)
            rows.append(row)
    return pd.DataFrame(rows)


def compile_reading(recorded, provenance: dict, presets_table=None) -> Prose:
    """What the recorded compile matrix shows against transformers' table, in words computed from both:
    where they agree, where they differ and why, and what was not recorded."""
    comparison = seed_comparison(recorded, provenance)
    path = recorded_path(recorded, provenance)
    recorded_modes = [m for m in COMPILE_MODES if m in set(recorded["mode"])]
    missing_modes = [m for m in COMPILE_MODES if m not in recorded_modes]
    missing_backends = [b for b in ("eager", "batched_mm", "grouped_mm")
                        if not (recorded["backend"] == b).any()]
    differs = comparison[(comparison["transformers' table says"] == "no")
                         & comparison["recorded, transformers"].str.startswith("compiled, right")]
    lines = [f"- **Recorded**: modes {', '.join(recorded_modes)}; backends "
             f"{', '.join(sorted(set(recorded['backend'])))}; T = {', '.join(str(int(t)) for t in sorted(set(recorded['num_tokens'])))}; "
             f"{', '.join(sorted(set(recorded['dtype'])))} on compute capability {provenance.get('compute_capability', '?')}, "
             f"so grouped_mm ran torch's {'fused (native) grouped GEMM' if path == 'native' else 'fallback loop'}."]
    if missing_modes or missing_backends:
        lines.append("- **Not recorded**: " + "; ".join(
            ([f"modes {', '.join(missing_modes)}"] if missing_modes else [])
            + ([f"{', '.join(missing_backends)} under compile"] if missing_backends else [])
            + ["grouped_mm on its fallback path (another dtype, or a GPU other than SM90/SM100)"]
        ) + ". Nothing below says anything about them.")
    for _, row in differs.iterrows():
        lines.append(
            f"- **Differs**: transformers' table says {row['backend']} is not compatible with `{row['mode']}` (CUDA "
            f"graphs); the recording shows transformers' own {row['backend']} {row['recorded, transformers']}, and "
            f"moe_lab's {row['recorded, moe_lab']}.")
    if len(differs) and path == "native":
        lines.append(
            "- **Why**: a CUDA graph can only replay work that never waits for the host. On the native path every "
            "step — sort, counts, int32 offsets, and the fused grouped GEMM, which reads the offsets on the GPU — is "
            "a kernel, so one graph serves every routing of the same T. The fallback path's per-group loop copies "
            "the offsets to the host (notebook 04), which a CUDA graph cannot capture: there the table's warning is "
            "what to expect — but that path was not recorded.")
    versus = recorded.dropna(subset=["speedup_vs_transformers"])
    for backend, rows in versus.groupby("backend", sort=False):
        low, high = rows["speedup_lowest_round"].min(), rows["speedup_highest_round"].max()
        verdict = ("every timing round put moe_lab ahead" if low > 1 else
                   "every round put transformers ahead" if high < 1 else "the rounds straddle 1.0: a tie")
        lines.append(
            f"- **{backend} against transformers' {backend}**, same mode and T: "
            f"{rows['speedup_vs_transformers'].min():.2f}–{rows['speedup_vs_transformers'].max():.2f}× "
            f"(transformers' compiled time / moe_lab's), round by round {low:.3f}–{high:.3f}×: {verdict}.")
    if presets_table is not None:
        graphed = presets_table[(presets_table["backend"] == "transformers:grouped_mm")
                                & (presets_table["execution"] == "cuda_graph")]
        ok = int((graphed["status"] == "ok").sum())
        lines.append(
            f"- **A compiled cell is not proof of a CUDA graph**: `status` says the mode compiled and gave the right "
            f"answer, not that Inductor captured a graph (it skips capture, with a log message, when it cannot). The "
            f"direct evidence is elsewhere: transformers' grouped_mm was captured and replayed by "
            f"`moe_lab.GraphedExperts` at {ok} of {len(graphed)} recorded points (`load_recorded(\"presets\", "
            f"execution=None)`, execution \"cuda_graph\").")
    return Prose("\n".join(lines))


def autotune_reading(autotune, provenance: dict) -> Prose:
    """The max-autotune modes, recorded on their own card: per mode and backend whether it compiled and
    stayed right after the routing changed, and its time against the same backend uncompiled — in words
    computed from the rows."""
    lines = [f"- **Recorded separately**, on {provenance.get('device_name', '?')} (another card than the matrix "
             f"above: compare only within it): modes {', '.join(sorted(set(autotune['mode'])))}, backends "
             f"{', '.join(sorted(set(autotune['backend'])))}."]
    for (mode, backend), rows in autotune.groupby(["mode", "backend"], sort=True):
        compiled = rows[rows["status"] == "compiled"]
        parts = [_cell(rows)]
        if len(compiled):
            parts.append("compiled / uncompiled time " + ", ".join(
                f"{r['speedup']:.2f}× faster at T={int(r['num_tokens'])}" if r["speedup"] >= 1 else
                f"{1 / r['speedup']:.2f}× slower at T={int(r['num_tokens'])}" for _, r in compiled.iterrows()))
        lines.append(f"- `{mode}`, {backend}: " + "; ".join(parts) + ".")
    missing = sorted({(m, b) for m in set(autotune["mode"]) for b in set(autotune["backend"])}
                     - set(zip(autotune["mode"], autotune["backend"])))
    if missing:
        lines.append("- **Not recorded** there: " + ", ".join(f"{b} under `{m}`" for m, b in missing) + ".")
    return Prose("\n".join(lines))
