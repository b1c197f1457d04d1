"""Let a notebook record named values that `moe-lab sweep` collects from the executed copy.

`record("grouped_mm_ms", 0.42)` displays a small JSON output with its own MIME type, so the value
survives in the executed .ipynb; `read_records(path)` reads every recorded value back. The same
idea as scrapbook's `glue`, without the dependency. Outside IPython it only returns the value.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MIME_TYPE = "application/vnd.moe-lab.record+json"


def _jsonable(value):
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # 0-d tensors, numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    json.dumps(value)  # raises TypeError early for values a CSV cannot hold
    return value


def record(name: str, value):
    """Record `value` (a JSON-serialisable scalar, list or dict) under `name` in the notebook's output."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"record names must be identifiers (letters, digits, _), got {name!r}")
    payload = {"name": name, "value": _jsonable(value)}
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return value
    if get_ipython() is not None:
        display({MIME_TYPE: payload, "text/plain": f"recorded {name} = {payload['value']!r}"}, raw=True)
    return value


def read_records(notebook_path: str | Path) -> dict:
    """{name: value} of every `record(...)` output in an executed notebook (last one wins)."""
    notebook = json.loads(Path(notebook_path).read_text())
    records = {}
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []) or []:
            payload = output.get("data", {}).get(MIME_TYPE)
            if payload is not None:
                records[payload["name"]] = payload["value"]
    return records
