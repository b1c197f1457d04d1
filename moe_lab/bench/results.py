"""Saving and loading result tables: a CSV for the numbers, a JSON sidecar for where they came from.

The sidecar (same name, .json) holds the provenance (device, its name, torch/CUDA/Python/moe_lab
versions, UTC date, git commit, the command line, ceilings if given, anything extra) and the
pandas dtype of every column, so `load_results` gives back the same table with the same types.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

from .provenance import command_line, provenance, utc_now

DEFAULT_DIR = Path("data")


def _pair(path: Path) -> tuple[Path, Path]:
    if path.suffix.lower() in (".csv", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".csv"), path.with_name(path.name + ".json")


def _paths(path) -> tuple[Path, Path]:
    """Where to write: a bare file name goes to data/, None to data/bench-<UTC time>."""
    if path is None:
        path = DEFAULT_DIR / f"bench-{utc_now().replace(':', '').replace('+0000', 'Z')}"
    path = Path(path)
    if not path.is_absolute() and path.parent == Path("."):
        path = DEFAULT_DIR / path
    return _pair(path.resolve())


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def save_results(df, path=None, extra_provenance: dict | None = None, *, ceilings=None) -> tuple[Path, Path]:
    """Write `df` to `<path>.csv` and its provenance to `<path>.json`; return both paths.

    `path`: a file name (with or without .csv) — a bare name is placed in data/ (relative to
    the working directory), None picks data/bench-<UTC time>.csv. Device, torch version and git
    commit are read from the table's own columns when it has them (they describe the run, which
    may have been on another machine), else from this process.
    """
    csv_path, json_path = _paths(path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    device = _first(df, "device", None)
    try:
        info = provenance(device)
    except Exception:  # e.g. a CUDA table saved on a machine without CUDA
        info = provenance("cpu")
        info["device"] = str(device)
    for column in ("device_name", "torch_version", "moe_lab_version", "git_commit", "date"):
        if column in df.columns and len(df):
            info[column] = str(df[column].iloc[0])
    info["command_line"] = command_line()
    info["saved"] = utc_now()
    if ceilings is not None:
        info["ceilings"] = dataclasses.asdict(ceilings)
    info.update(extra_provenance or {})
    sidecar = {
        "provenance": info,
        "rows": int(len(df)),
        "columns": {name: str(dtype) for name, dtype in df.dtypes.items()},
        "csv": csv_path.name,
    }
    df.to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(sidecar, indent=1, default=_jsonable) + "\n")
    return csv_path, json_path


def load_results(path) -> tuple:
    """Read a table written by `save_results` -> (DataFrame with the saved dtypes, provenance dict).

    `path` may name the .csv, the .json or neither suffix. Without a sidecar the CSV is read with
    pandas' own type inference and the provenance is {}.
    """
    import pandas as pd

    csv_path, json_path = _pair(Path(path))
    if not csv_path.exists() and not csv_path.is_absolute() and csv_path.parent == Path("."):
        csv_path, json_path = _pair(DEFAULT_DIR / csv_path)  # where save_results put a bare name
    if not json_path.exists():
        return pd.read_csv(csv_path), {}
    sidecar = json.loads(json_path.read_text())
    dtypes = sidecar.get("columns", {})
    text = [name for name, dtype in dtypes.items() if dtype in ("object", "str", "string")]
    with warnings.catch_warnings():  # pandas 4 deprecates float_precision; pandas 3 needs it
        warnings.simplefilter("ignore")
        frame = pd.read_csv(csv_path, dtype={name: str for name in text}, keep_default_na=False,
                            float_precision="round_trip",  # the default parser may differ in the last digit
                            na_values={name: ["", "nan", "NaN"] for name in dtypes if name not in text})
    for name, dtype in dtypes.items():
        if name not in frame.columns:
            continue
        if name in text:
            frame[name] = frame[name].astype(dtype if dtype != "object" else object)
        elif dtype == "bool":
            frame[name] = frame[name].map(_to_bool).astype(bool)
        else:
            frame[name] = frame[name].astype(dtype)
    return frame, sidecar.get("provenance", {})


def _to_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1")


def _first(df, column, default):
    return df[column].iloc[0] if column in df.columns and len(df) else default
