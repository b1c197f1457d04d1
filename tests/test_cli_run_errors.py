"""`moe-lab run` with a bad parameter: refused before anything runs, or the notebook's own error in one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moe_lab.backends import builtin_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))  # notebook_cases, also under --import-mode=importlib
from notebook_cases import write_backend_notebook  # noqa: E402

nbformat = pytest.importorskip("nbformat")
# The built-in names as the registry lists them in a fresh process (where the notebook's kernel runs).
VALID = ", ".join(map(repr, builtin_backends()))


@pytest.fixture(scope="module")
def notebook_path(tmp_path_factory):
    return write_backend_notebook(tmp_path_factory.mktemp("nb") / "backend_param.ipynb")


def test_cli_unknown_backend_value_fails_at_first_use_with_the_valid_names(notebook_path, tmp_path, capsys):
    """`-p backend nonexistent` passes the parameter check (a notebook may register its own backend
    before using the name); the notebook's first use raises UnknownBackendError, and `moe-lab run`
    says so in one line, exit code 1, pointing at the executed notebook with the traceback."""
    from moe_lab.cli import main

    out_dir = tmp_path / "runs"
    assert main(["run", str(notebook_path), "-p", "backend", "nonexistent", "--output-dir", str(out_dir), "--quiet",
                 "--kernel", "python3"]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert (f"{notebook_path} failed in cell [3]: UnknownBackendError: unknown experts implementation "
            f"'nonexistent'; registered: [{VALID}]") in stderr
    assert f"with the full traceback: {out_dir / notebook_path.name}" in stderr
    executed = json.loads((out_dir / notebook_path.name).read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert [o["ename"] for o in outputs if o["output_type"] == "error"] == ["UnknownBackendError"]
    assert not any("the cell after ran" in "".join(o.get("text", "")) for o in outputs), "execution stopped"


def test_cli_misspelled_parameter_refused_before_any_notebook_runs(notebook_path, tmp_path, capsys):
    """Several notebooks: a name that one of them lacks is refused before the first one runs
    (tests/test_notebook_runner.py checks the exit code of the installed command itself)."""
    from moe_lab.cli import main

    other = tmp_path / "other.ipynb"
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("top_k = 2")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(top_k)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, other)
    out_dir = tmp_path / "runs"
    assert main(["run", str(notebook_path), str(other), "-p", "backend", "eager", "--output-dir", str(out_dir)]) == 2
    stderr = capsys.readouterr().err
    assert "other.ipynb has no parameter(s) ['backend']; its parameters are: top_k (default 2)" in stderr
    assert not out_dir.exists(), "nothing is executed, not even the notebook that has `backend`"
    assert main(["run", str(tmp_path / "missing.ipynb"), "--output-dir", str(out_dir)]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_failed_cell_summary_for_sweeps_and_the_cli():
    """A sweep row's `error` is the cell's exception, not the first line of papermill's banner."""
    from papermill.exceptions import PapermillExecutionError

    from moe_lab.notebook_runner import error_summary

    error = PapermillExecutionError(1, 3, "layer = ...", "UnknownBackendError",
                                    "unknown experts implementation 'x'; registered: [...]\nmore", [])
    assert str(error).strip().splitlines()[0].startswith("----"), "what the sweep used to report"
    assert error_summary(error) == "UnknownBackendError: unknown experts implementation 'x'; registered: [...]"
    assert error_summary(ValueError("first\nsecond")) == "first" and error_summary(KeyError()) == "KeyError"
