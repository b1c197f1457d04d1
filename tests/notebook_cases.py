"""Shared by tests that run notebooks: a small notebook whose `backend` parameter is used at once.

Not a test file: imported by tests/test_hostile_calls.py and tests/test_cli_run_errors.py.
"""
from __future__ import annotations

from pathlib import Path

import nbformat


def write_backend_notebook(path: Path) -> Path:
    """A notebook whose parameters cell says `backend = "grouped_mm"`, and which uses it at once."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('backend = "grouped_mm"\nnum_tokens = 4')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "import moe_lab\n"
            "layer = moe_lab.Experts(moe_lab.MoEConfig(16, 16, 4, 2), experts_implementation=backend)\n"
            "print('built', layer.get_experts_implementation())"),
        nbformat.v4.new_code_cell("print('the cell after ran')"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path
