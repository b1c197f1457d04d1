"""Where a number came from: the machine, the software and the code that produced it."""
from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..devices import device_name  # noqa: F401  (re-exported: bench.provenance.device_name)
from .timing import resolve_device

#: Provenance fields repeated on every result row (the JSON sidecar holds the full dict).
ROW_PROVENANCE = ("device_name", "torch_version", "moe_lab_version", "date", "git_commit")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """HEAD of the git checkout moe_lab is imported from, "+dirty" if it has uncommitted changes;
    "unknown" when moe_lab is not imported from a git checkout or git is missing. $MOE_LAB_GIT_COMMIT
    overrides it, for runs on a copy of the tree without its .git (e.g. a remote GPU machine)."""
    if os.environ.get("MOE_LAB_GIT_COMMIT"):
        return os.environ["MOE_LAB_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if status else "") if commit else "unknown"


def provenance(device=None) -> dict:
    """Device, its name, torch/CUDA/Python/moe_lab versions, UTC date, git commit, thread count."""
    from .. import __version__

    device = resolve_device(device)
    info = {
        "device": str(device),
        "device_name": device_name(str(device)),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "moe_lab_version": __version__,
        "date": utc_now(),
        "git_commit": git_commit(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def command_line() -> str:
    return " ".join(sys.argv)
