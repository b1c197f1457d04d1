"""The GPU results recorded under data/, for notebooks on machines without that GPU."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

RECORDED = {
    "presets": ["h100_bf16_compare_hf_finegrained", "h100_bf16_compare_hf_coarse"],
    "compile": ["h100_bf16_compare_hf_compile_qwen3-30b-a3b"],
    # the two max-autotune modes, recorded later on another card (an H200): moe_lab's backends only
    "compile_autotune": ["h200_bf16_compile_autotune_qwen3-30b-a3b"],
    # forward + backward of one layer (a training step's), moe_lab beside transformers and Liger, on an H200; the
    # second file fills the three points the first has no rows for (recorded a day later, without Liger)
    "backward": ["h200_bf16_backward", "h200_bf16_backward_filled"],
    # the points of "backward" that missed the memory goal, re-recorded after the backward's two memory levers
    "backward_memory": ["h200_bf16_backward_memory"],
    # the points of issue 14's goals, re-recorded (with Liger) after the triton backward's host-time levers
    "backward_host": ["h200_bf16_backward_host"],
    # the same goal points with each implementation's whole step also replayed from one CUDA graph
    "backward_graph": ["h200_bf16_backward_graph"],
    # the goal points again, the replays also queued back to back (a training loop) and the card's clock beside
    "backward_back_to_back": ["h200_bf16_backward_back_to_back"],
}


def data_dir() -> Path:
    """data/ of this checkout (moe_lab is installed editable from it), else ./data or ../data."""
    for candidate in (DATA_DIR, Path.cwd() / "data", Path.cwd().parent / "data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "no data/ folder found next to the moe_lab package or the working directory; the recorded "
        "GPU results live in the repository's data/ (install with `pip install -e .` from a clone)"
    )


def load_recorded(kind: str = "presets", execution: str | None = "eager"):
    """(DataFrame, provenance) of a recorded table set: "presets" (six models x five token
    counts, moe_lab and transformers backends), "compile" (the torch.compile matrix, both libraries)
    "compile_autotune" (the max-autotune modes for moe_lab's backends, on another card) or "backward" (forward
    + backward of one layer: moe_lab's, transformers' grouped_mm and Liger's fused MoE, on another card) or
    "backward_memory" (the same, no Liger, at the points that missed the memory goal, after its fix) or
    "backward_host" (the same, with Liger, at the goal points, after the host-time levers) or "backward_graph"
    (the goal points again, each step launched from Python and replayed from one CUDA graph) or
    "backward_back_to_back" (the same, the replays also queued back to back, as a training loop runs them).

    A set with an `execution` column ("presets", "backward_graph", "backward_back_to_back") holds each measurement
    once per way it was issued (`moe_lab.bench.measure.EXECUTIONS`): kernels launched from Python (execution
    "eager", the default here: one row per backend and point), replayed from a CUDA graph ("cuda_graph") or
    replayed back to back ("cuda_graph_back_to_back"); `execution` picks one, None returns all."""
    import pandas as pd

    from .bench import load_results
    from .bench.measure import EXECUTIONS

    if kind not in RECORDED:
        raise ValueError(f"unknown recorded set {kind!r}; available: {sorted(RECORDED)}")
    if execution is not None and execution not in EXECUTIONS:
        raise ValueError(f"unknown execution {execution!r}; allowed: {list(EXECUTIONS)} or None for all")
    frames, provenance = [], {}
    for name in RECORDED[kind]:
        frame, info = load_results(data_dir() / name)
        frames.append(frame)
        provenance = provenance or info
    frame = pd.concat(frames, ignore_index=True)
    if execution is not None and "execution" in frame.columns:  # the compile tables have no such column
        frame = frame[frame["execution"] == execution].reset_index(drop=True)
    return frame, provenance


#: End-to-end runs (tools/e2e_record.sh): data/<card>_bf16_e2e_<model>.csv, one per model size.
E2E_PATTERN = "*_e2e_{model}.csv"


class NotRecordedYet(LookupError):
    """No recorded table of that kind under data/ (yet)."""


def load_recorded_e2e(model: str = "qwen3-30b-a3b"):
    """(DataFrame, provenance) of the recorded end-to-end run of `model` (the newest file when several
    cards recorded it), or NotRecordedYet saying which file is missing and how it is made."""
    from .bench import load_results

    found = sorted(data_dir().glob(E2E_PATTERN.format(model=model)))
    if not found:
        raise NotRecordedYet(
            f"no end-to-end run of {model} recorded yet: data/<card>_bf16_e2e_{model}.csv comes from "
            f"`bash tools/e2e_record.sh` on a GPU (README: Measuring)")
    frames = [load_results(path) for path in found]
    table, provenance = max(frames, key=lambda pair: str(pair[1].get("date", "")))
    return _with_columns_added_since(table), provenance


def _with_columns_added_since(table):
    """A table recorded before a column existed gets it empty (NaN: not counted then), never a made-up value.
    `cudagraph_skips` came after the first H200 recording (e3da1c6): there, whether a compiled row replayed
    CUDA graphs is unknown, and e2e_goals says so (cuda_graphs False)."""
    from .bench.e2e import E2E_COLUMNS

    missing = [name for name in E2E_COLUMNS if name not in table.columns]
    return table.assign(**{name: float("nan") for name in missing}) if missing else table


def recorded_label(provenance: dict, dates=()) -> str:
    """"NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, 2026-11-26" — say where numbers come from. `dates` (the
    rows' own date column) names the first and last day when a table's points were recorded on several."""
    days = sorted({str(date)[:10] for date in dates}) or [str(provenance.get("date", "?"))[:10]]
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    return f"{provenance.get('device_name', '?')}, torch {provenance.get('torch_version', '?')}, {when}"


#: tools/step_power_state.py: one preset's training step replayed back to back and with the card rested, per card.
POWER_STATE_PATTERN = "*_step_power_state_{preset}.json"


def load_power_state(preset: str = "qwen3-30b-a3b") -> dict:
    """The recorded power-state run of `preset` (the JSON tools/step_power_state.py writes: provenance, blocks,
    summary per implementation and mode), or NotRecordedYet saying how it is made."""
    import json

    found = sorted(data_dir().glob(POWER_STATE_PATTERN.format(preset=preset)))
    if not found:
        raise NotRecordedYet(f"no power-state run of {preset} recorded yet: data/<card>_step_power_state_{preset}.json "
                             f"comes from tools/step_power_state.py on a GPU")
    return json.loads(found[-1].read_text())


#: The expert-parallel recording (tools/ep_record.sh): its output folder, copied as it is into data/.
EP_RECORD = "ep_record"
#: The second one (2 GPUs): the layer that sends each token once per rank beside the exact layer, and a profile.
EP_RECORD_DEDUP = "ep_record_dedup"
#: The third one (2 GPUs): the gathered (all-gather) layer beside the exact and dedup ones, launched and replayed.
EP_RECORD_GATHERED = "ep_record_gathered"


def load_ep_record(directory: Path | str | None = None):
    """(summary DataFrame, provenance) of the recorded expert-parallel run — ep_summary.csv (one line per
    preset, T, routing, EP size and variant: moe_lab.bench.ep_summary.ep_summary) and the provenance of
    its first ep<N>.json — or None when it has not been recorded into data/ yet."""
    import json

    import pandas as pd

    folder = Path(directory) if directory is not None else data_dir() / EP_RECORD
    summary_path = folder / "ep_summary.csv"
    if not summary_path.exists():
        return None
    sidecars = sorted(folder.glob("ep[0-9]*.json"))
    provenance = json.loads(sidecars[0].read_text())["provenance"] if sidecars else {}
    return pd.read_csv(summary_path), provenance


def load_ep_rows(directory: Path | str | None = None):
    """The recorded expert-parallel run's per-rank rows (every ep<N>.csv, one per EP size, as one DataFrame),
    or None when it has not been recorded into data/ yet."""
    import pandas as pd

    from .bench.results import load_results

    folder = Path(directory) if directory is not None else data_dir() / EP_RECORD
    tables = sorted(folder.glob("ep[0-9]*.csv"))
    if not tables:
        return None
    return pd.concat([load_results(path)[0] for path in tables], ignore_index=True)
