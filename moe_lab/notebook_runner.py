"""Run notebooks headless with papermill, checking parameters against the notebook first.

papermill injects any `-p name value` it is given, even a misspelled one, and the notebook then
silently runs with its default. Here an unknown name is refused, with the list of the notebook's
real parameters (papermill reads them from the cell tagged `parameters`).
"""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

from .parameters import NotebookParameterError  # noqa: F401  (one error for the runner and the notebooks)

_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


def parse_value(text: str):
    """'16' -> 16, '0.5' -> 0.5, 'True' -> True, '[1, 2]' -> [1, 2], anything else -> the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebook_parameters(path: str | Path) -> dict:
    """{name: {"default": ..., "type": ...}} declared in the notebook's `parameters` cell."""
    import papermill

    declared = papermill.inspect_notebook(str(path))
    parameters = {}
    for name, info in declared.items():
        type_name = info.get("inferred_type_name")
        if type_name in (None, "None"):  # no annotation: take the type of the default's literal
            type_name = type(parse_value(info.get("default") or "None")).__name__
        parameters[name] = {"default": info.get("default"), "type": type_name}
    return parameters


def check_parameters(path: str | Path, parameters: dict) -> dict:
    """Return `parameters` if every name is declared and every value fits its declared type."""
    declared = notebook_parameters(path)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookParameterError(
            f"{Path(path).name} has no parameter(s) {unknown}; its parameters are: "
            + ", ".join(f"{name} (default {info['default']})" for name, info in declared.items())
        )
    for name, value in parameters.items():
        expected = _TYPE_NAMES.get(declared[name]["type"] or "")
        ok = expected is None or isinstance(value, expected) or (expected is float and isinstance(value, int))
        if not ok or (expected is int and isinstance(value, bool)):
            raise NotebookParameterError(
                f"parameter {name} of {Path(path).name} expects {declared[name]['type']} "
                f"(default {declared[name]['default']}), got {value!r}"
            )
    return parameters


def run_notebook(path: str | Path, output_dir: str | Path = "runs", parameters: dict | None = None,
                 *, output_name: str | None = None, kernel_name: str | None = None, progress: bool = False) -> Path:
    """Execute `path` with papermill into `output_dir` (its own folder as working directory)."""
    import papermill

    path = Path(path)
    parameters = check_parameters(path, dict(parameters or {}))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / (output_name or path.name)
    papermill.execute_notebook(
        str(path), str(output), parameters=parameters, cwd=str(path.parent.resolve()),
        kernel_name=kernel_name, progress_bar=progress,
    )
    return output


def error_summary(error: BaseException) -> str:
    """One line saying why a run failed: "UnknownBackendError: unknown experts ..." for an error raised
    in a notebook cell (papermill's error carries the cell's exception name and value), else the
    error's first line."""
    ename = getattr(error, "ename", None)
    if ename:
        lines = str(getattr(error, "evalue", "") or "").strip().splitlines()
        return f"{ename}: {lines[0]}" if lines else str(ename)
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def parameter_grid(grid: dict[str, list]) -> list[dict]:
    """{"top_k": [1, 2], "num_tokens": [16]} -> [{"top_k": 1, "num_tokens": 16}, {"top_k": 2, ...}]."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[name] for name in names))]


def sweep_notebook(path: str | Path, grid: dict[str, list], output_dir: str | Path = "runs/sweep",
                   fixed: dict | None = None, *, kernel_name: str | None = None):
    """Run one notebook per grid point; return a DataFrame of parameters + recorded values per run.

    A run that fails becomes a row with `status` "error" and the error's first line: the sweep goes on.
    """
    import pandas as pd

    from .notebook_values import read_records

    path = Path(path)
    combos = parameter_grid(grid)
    for combo in combos:  # refuse a bad name or type before running anything
        check_parameters(path, {**(fixed or {}), **combo})
    rows = []
    for number, combo in enumerate(combos):
        name = f"{path.stem}__" + "__".join(f"{k}-{v}" for k, v in combo.items()) + ".ipynb"
        row = {**combo, "notebook": name, "status": "ok", "error": ""}
        try:
            output = run_notebook(path, output_dir, {**(fixed or {}), **combo}, output_name=name,
                                  kernel_name=kernel_name)
            row.update(read_records(output))
        except Exception as error:  # noqa: BLE001 - one failed run must not end the sweep
            row.update(status="error", error=error_summary(error))
        rows.append(row)
    return pd.DataFrame(rows)
