"""Join tables that one device call wrote in parts (tools/gpu_record.sh backward:<preset> writes one
per token count; tools/gpu_parallel.sh runs parts on several GPUs) into one CSV + JSON sidecar.

    python tools/merge_tables.py data/h200_bf16_backward /tmp/record/h200_bf16_backward_*.csv

The rows keep their own columns (device_name, torch_version, date, git_commit); the sidecar keeps
the first part's provenance (with keys only later parts have, such as a compared library's version), and lists every part's command line, date and commit under "parts",
so nothing of where a row came from is lost. Rows are ordered by preset, token count and backend.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_lab.bench import load_results, save_results  # noqa: E402


def merge(output: str, inputs: list[str], notes: str | None = None) -> tuple[Path, Path]:
    import pandas as pd

    frames, parts, first = [], [], {}
    for path in inputs:
        frame, info = load_results(path)
        frames.append(frame)
        first = {**info, **first}  # the first part's values, and keys only later parts have (a library's version)
        parts.append({key: info.get(key) for key in ("command_line", "date", "git_commit", "device_name")}
                     | {"file": Path(path).with_suffix("").name})
    if not frames:
        raise SystemExit("merge_tables: no input tables")
    frame = pd.concat(frames, ignore_index=True)
    order = [c for c in ("preset", "num_tokens", "backend") if c in frame.columns]
    frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
    kept = {key: value for key, value in first.items() if key not in ("command_line", "saved")}
    extra = {**kept, "parts": parts}
    if notes:
        extra["notes"] = notes
    return save_results(frame, output, extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the merged table's path, without suffix")
    parser.add_argument("inputs", nargs="+", help="the parts' CSV (or JSON) files")
    parser.add_argument("--notes", help="a sentence for the sidecar: how the parts were run")
    args = parser.parse_args(argv)
    print("wrote", *merge(args.output, args.inputs, args.notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
