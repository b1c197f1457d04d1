"""Time `moe-lab run` on each notebook with its default parameters; write data/cpu_notebook_run_times.json.

    python tools/time_notebooks.py                       # every notebooks/NN_*.ipynb
    python tools/time_notebooks.py notebooks/02_eager_loop.ipynb --repeat 3

The README's notebook table quotes these seconds (`<!-- data: run_seconds notebook=... -->`), and
tests/test_prose_figures.py checks that it does. Each notebook runs `--repeat` times through the CLI,
as a reader would type it (a fresh kernel each time, so kernel start-up is included); the median is
recorded, with every run and the machine's load average before and after, because a shared machine
makes these numbers move. One untimed run comes first, so that the first notebook timed does not also
pay for reading torch from a cold disk cache. Notebooks not given keep their previous entry.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "data" / "cpu_notebook_run_times.json"


def time_one(notebook: Path, output_dir: Path) -> float:
    cli = Path(sys.executable).with_name("moe-lab")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "moe_lab.cli"]
    begin = time.perf_counter()
    subprocess.run([*command, "run", str(notebook), "--output-dir", str(output_dir), "--quiet"], check=True,
                   cwd=ROOT)
    return time.perf_counter() - begin


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

    import torch

    from moe_lab.bench.provenance import provenance

    record = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {"seconds": {}, "runs": {}}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        time_one(notebooks[0], Path(scratch))  # untimed: the first run also pays for a cold disk cache
        for notebook in notebooks:
            runs = [round(time_one(notebook, Path(scratch)), 1) for _ in range(args.repeat)]
            record["seconds"][notebook.stem] = statistics.median(runs)
            record["runs"][notebook.stem] = runs
            print(f"{notebook.stem}: {runs} s", flush=True)
    info = provenance("cpu")
    record["provenance"] = {
        "device_name": info.get("device_name"), "cpu_threads": os.cpu_count(), "torch_version": torch.__version__,
        "git_commit": info.get("git_commit"), "date": info.get("date"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python tools/time_notebooks.py " + " ".join(sys.argv[1:]),
        "what": "wall seconds of `moe-lab run <notebook>` with default parameters, median of `runs`",
    }
    OUTPUT.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
