"""Every registered backend with each capability on this machine, and why: `describe_backends()`."""
from __future__ import annotations

import torch

from ..devices import default_device, default_dtype
from . import registry
from .spec import CAPABILITIES, CAPABILITY_MEANING, Where


def backend_capabilities(device=None, dtype=None, hidden_size=None, intermediate_size=None) -> list[dict]:
    """One dict per registered backend: name, summary, builtin, and per capability
    {"ok": True/False/None, "reason": str} (plus "slow" for "runs": only through an interpreter).
    `device` defaults to the GPU when there is one; `dtype` to bfloat16 on CUDA, float32 elsewhere."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    where = Where(device, dtype, hidden_size, intermediate_size)
    rows = []
    for name in registry.available_backends():
        spec = registry.get_spec(name)
        row = {"backend": name, "summary": spec.summary, "builtin": spec.builtin}
        for capability, support in spec.table(where).items():
            row[capability] = {"ok": support.ok, "reason": support.reason}
            if capability == "runs":
                row[capability]["slow"] = support.slow
        rows.append(row)
    return rows


def describe_backends(device=None, dtype=None, hidden_size=None, intermediate_size=None) -> str:
    """A text table for a terminal or a notebook: backend x capability (yes / no / unknown), then the
    reason for every answer that is not a plain yes, and what each capability means."""
    rows = backend_capabilities(device, dtype, hidden_size, intermediate_size)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    words = {True: "yes", False: "no", None: "unknown"}

    def cell(row, capability):
        answer = row[capability]
        return words[answer["ok"]] + (" (interpreted)" if answer.get("slow") else "")

    header = ["backend", *CAPABILITIES]
    table = [[row["backend"], *(cell(row, c) for c in CAPABILITIES)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    shape = "" if hidden_size is None else f", H={hidden_size}, I={intermediate_size}"
    lines = [f"experts backends on {device} ({str(dtype).removeprefix('torch.')}{shape})", ""]
    lines += ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in [header, *table]]
    lines.append("")
    answer_width = max(len(cell(row, c)) for row in rows for c in CAPABILITIES)
    for row in rows:
        lines.append(f"{row['backend']}: {row['summary']}")
        for capability in CAPABILITIES:
            lines.append(f"  {capability:10s} {cell(row, capability):{answer_width}s} {row[capability]['reason']}")
    lines.append("")
    lines += [f"{capability:10s} = {meaning}" for capability, meaning in CAPABILITY_MEANING.items()]
    return "\n".join(lines)
