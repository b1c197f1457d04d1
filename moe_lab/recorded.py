"""The GPU results recorded under data/, for notebooks on machines without that GPU."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

RECORDED = {
    "presets": ["h100_bf16_presets_finegrained", "h100_bf16_presets_coarse"],
    "compile": ["h100_bf16_compile_qwen3-30b-a3b"],
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


def load_recorded(kind: str = "presets"):
    """(DataFrame, provenance) of a recorded table set: "presets" (six models x five token
    counts, moe_lab and transformers backends) or "compile" (the torch.compile matrix)."""
    import pandas as pd

    from .bench import load_results

    if kind not in RECORDED:
        raise ValueError(f"unknown recorded set {kind!r}; available: {sorted(RECORDED)}")
    frames, provenance = [], {}
    for name in RECORDED[kind]:
        frame, info = load_results(data_dir() / name)
        frames.append(frame)
        provenance = provenance or info
    return pd.concat(frames, ignore_index=True), provenance


def recorded_label(provenance: dict) -> str:
    """"NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, 2026-11-26" — say where numbers come from."""
    return f"{provenance.get('device_name', '?')}, torch {provenance.get('torch_version', '?')}, " \
           f"{str(provenance.get('date', '?'))[:10]}"
