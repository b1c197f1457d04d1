"""Keep only what a notebook in this repository should store.

    python tools/nbclean.py notebooks/*.ipynb            # clean in place
    python tools/nbclean.py --check notebooks/*.ipynb    # exit 1 and list what is dirty

Outputs are kept only for cells marked `# NBVAL_CHECK_OUTPUT` (nbval compares them); every other
cell loses its outputs and execution count; error outputs, widget views and widget state are never
kept. A checked cell whose stored output is an error is reported: fix the notebook instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MARK = "# NBVAL_CHECK_OUTPUT"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def is_checked(cell: dict) -> bool:
    return cell.get("cell_type") == "code" and MARK in "".join(cell.get("source", ""))


def clean(notebook: dict) -> tuple[dict, list[str]]:
    problems = []
    notebook.get("metadata", {}).pop("widgets", None)
    for number, cell in enumerate(notebook.get("cells", [])):
        cell.get("metadata", {}).pop("execution", None)
        if cell.get("cell_type") != "code":
            continue
        if not is_checked(cell):
            cell["outputs"], cell["execution_count"] = [], None
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"cell {number}: stored error output ({output.get('ename')})")
                continue
            data = output.get("data")
            if data and WIDGET_MIME in data:
                continue
            kept.append(output)
        cell["outputs"] = kept
        if not kept:
            problems.append(f"cell {number}: marked {MARK} but has no stored output")
    return notebook, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not clean")
    args = parser.parse_args(argv)
    dirty = False
    for path in args.notebooks:
        original = path.read_text()
        notebook, problems = clean(json.loads(original))
        text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
        for problem in problems:
            print(f"{path}: {problem}")
        if text != original:
            if args.check:
                print(f"{path}: has outputs or metadata that should not be stored (run tools/nbclean.py)")
            else:
                path.write_text(text)
        dirty |= bool(problems) or (args.check and text != original)
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
