"""tools/merge_tables.py: the parts of one recorded table come back as one, with every part's provenance."""
import importlib.util
import sys
from pathlib import Path

import pandas as pd

from moe_lab.bench import load_results, save_results

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _merge_tables():
    spec = importlib.util.spec_from_file_location("merge_tables", TOOLS / "merge_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_tables"] = module
    spec.loader.exec_module(module)
    return module


def _part(tmp_path, name, num_tokens, extra):
    rows = pd.DataFrame({"preset": ["p", "p"], "num_tokens": [num_tokens] * 2, "backend": ["triton", "grouped_mm"],
                         "median_ms": [1.5, 2.5], "device_name": ["Card X"] * 2, "git_commit": ["abc"] * 2})
    save_results(rows, tmp_path / name, extra)
    return str(tmp_path / f"{name}.csv")


def test_merged_table_keeps_rows_ordered_and_every_parts_provenance(tmp_path):
    first = _part(tmp_path, "t8192", 8192, {"transformers_version": "5.0"})
    second = _part(tmp_path, "t128", 128, {"transformers_version": "5.0", "liger_kernel_version": "0.8.5"})
    _merge_tables().merge(str(tmp_path / "merged"), [first, second], notes="two GPUs")
    frame, info = load_results(tmp_path / "merged")
    assert list(zip(frame["num_tokens"], frame["backend"])) == [
        (128, "grouped_mm"), (128, "triton"), (8192, "grouped_mm"), (8192, "triton")]
    assert frame.loc[(frame.num_tokens == 128) & (frame.backend == "triton"), "median_ms"].item() == 1.5
    assert info["device_name"] == "Card X" and info["git_commit"] == "abc"
    assert info["liger_kernel_version"] == "0.8.5"  # a key only a later part has is kept
    assert [part["file"] for part in info["parts"]] == ["t8192", "t128"]
    assert all(part["command_line"] for part in info["parts"]) and info["notes"] == "two GPUs"
