"""`moe-lab run` / `sweep` on a tiny notebook made here: parameters checked, records collected."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("papermill")

from moe_lab.cli import main  # noqa: E402
from moe_lab.notebook_runner import NotebookParameterError, check_parameters, parse_value  # noqa: E402
from moe_lab.notebook_values import MIME_TYPE, read_records  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # notebook_cases, also under --import-mode=importlib
from notebook_cases import write_notebook  # noqa: E402


@pytest.fixture
def notebook(tmp_path):
    return write_notebook(tmp_path / "tiny.ipynb", "top_k = 2\nnum_tokens = 16\nlabel = 'x'",
                          "from moe_lab.notebook_values import record\n"
                          "record('pairs', top_k * num_tokens)\n"
                          "record('label_seen', label)\n"
                          "assert top_k != 99, 'top_k 99 is refused by this notebook'")


def test_parse_value():
    assert parse_value("16") == 16 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("grouped_mm") == "grouped_mm"


def test_unknown_and_mistyped_parameters_are_refused(notebook):
    with pytest.raises(NotebookParameterError, match=r"has no parameter\(s\) \['topk'\]; its parameters are: top_k \(default 2\), num_tokens \(default 16\), label"):
        check_parameters(notebook, {"topk": 4})
    with pytest.raises(NotebookParameterError, match=r"parameter top_k of tiny.ipynb expects int \(default 2\), got 'four'"):
        check_parameters(notebook, {"top_k": "four"})
    assert check_parameters(notebook, {"top_k": 4, "label": "y"}) == {"top_k": 4, "label": "y"}


def test_cli_run_with_parameters_and_records(notebook, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    assert main(["run", str(notebook), "-p", "top_k", "4", "-p", "label", "hello", "--output-dir", str(out_dir),
                 "--kernel", "python3", "--quiet"]) == 0
    executed = out_dir / "tiny.ipynb"
    assert read_records(executed) == {"pairs": 64, "label_seen": "hello"}
    outputs = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])]
    assert any(MIME_TYPE in o.get("data", {}) for o in outputs)


def test_cli_run_misspelled_parameter_exits_2_with_the_valid_names(notebook, tmp_path):
    result = subprocess.run([sys.executable, "-m", "moe_lab.cli", "run", str(notebook), "-p", "topk", "4",
                             "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "has no parameter(s) ['topk']" in result.stderr and "top_k (default 2)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "nothing runs when a parameter is refused"


def test_cli_sweep_collects_records_and_keeps_going(notebook, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    rc = main(["sweep", str(notebook), "--grid", "top_k=1,99", "--grid", "num_tokens=8,32", "--output-dir", str(out_dir),
               "--kernel", "python3"])
    assert rc == 1, "a failed run makes the exit code non-zero"
    import pandas as pd

    frame = pd.read_csv(out_dir / "tiny_sweep.csv")
    assert len(frame) == 4
    ok = frame[frame.status == "ok"].sort_values(["top_k", "num_tokens"])
    assert ok[["top_k", "num_tokens", "pairs"]].values.tolist() == [[1, 8, 8], [1, 32, 32]]
    failed = frame[frame.status == "error"]
    assert len(failed) == 2 and failed.top_k.tolist() == [99, 99]
    assert len(list(out_dir.glob("tiny__*.ipynb"))) == 4


def test_a_bool_for_an_int_parameter_is_refused(notebook, tmp_path):
    # True == 1 in Python: without the explicit bool check `-p top_k True` would run with top_k=1
    with pytest.raises(NotebookParameterError, match=r"parameter top_k of tiny.ipynb expects int \(default 2\), got True"):
        check_parameters(notebook, {"top_k": True})
    result = subprocess.run([sys.executable, "-m", "moe_lab.cli", "run", str(notebook), "-p", "top_k", "True",
                             "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "expects int" in result.stderr and "got True" in result.stderr


@pytest.fixture
def checked_notebook(tmp_path):
    """A notebook whose second cell checks its parameters with moe_lab.parameters, as the lessons do."""
    return write_notebook(tmp_path / "checked.ipynb", "top_k = 2\nsweep_tokens = [1, 16]",
                          "from moe_lab.parameters import Int, IntList, Parameters, check_parameters\n"
                          "from moe_lab.notebook_values import record\n"
                          "SPEC = Parameters(top_k=Int(min=1, max=8), sweep_tokens=IntList(min=1, max=4096))\n"
                          "record('parameters', check_parameters(globals(), SPEC))",
                          "record('total', sum(sweep_tokens) * top_k)")


def test_papermill_lists_as_text_and_misspelled_names_are_handled_in_the_notebook(checked_notebook, tmp_path):
    """papermill itself (no moe-lab pre-check): the notebook's own first cells parse and refuse."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out = tmp_path / "ok.ipynb"
    # `papermill -p sweep_tokens "[4, 8]"` passes the list as this string
    papermill.execute_notebook(str(checked_notebook), str(out), parameters={"sweep_tokens": "[4, 8]"},
                               kernel_name="python3", progress_bar=False)
    assert read_records(out) == {"parameters": {"top_k": 2, "sweep_tokens": [4, 8]}, "total": 24}
    with pytest.raises(PapermillExecutionError) as error:
        papermill.execute_notebook(str(checked_notebook), str(tmp_path / "bad.ipynb"), parameters={"topk": 4},
                                   kernel_name="python3", progress_bar=False)
    assert error.value.ename == "NotebookParameterError"
    assert "no parameter(s) ['topk']; its parameters are: top_k, sweep_tokens" in error.value.evalue
    with pytest.raises(PapermillExecutionError, match="parameter top_k must be an integer from 1 to 8, got 9"):
        papermill.execute_notebook(str(checked_notebook), str(tmp_path / "big.ipynb"), parameters={"top_k": 9},
                                   kernel_name="python3", progress_bar=False)
