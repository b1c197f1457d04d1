"""Shared by tests that run notebooks: small notebooks written on the spot.

Not a test file: imported by tests/test_hostile_calls.py, tests/test_cli_run_errors.py and
tests/test_notebook_runner.py.
"""
from __future__ import annotations

from pathlib import Path

import nbformat


def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    """A notebook at `path`: a cell tagged `parameters` holding `parameters`, then one code cell per `cells`."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(source) for source in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def write_backend_notebook(path: Path) -> Path:
    """A notebook whose parameters cell says `backend = "grouped_mm"`, and which uses it at once."""
    return write_notebook(
        path, 'backend = "grouped_mm"\nnum_tokens = 4',
        "import moe_lab\n"
        "layer = moe_lab.Experts(moe_lab.MoEConfig(16, 16, 4, 2), experts_implementation=backend)\n"
        "print('built', layer.get_experts_implementation())",
        "print('the cell after ran')")
