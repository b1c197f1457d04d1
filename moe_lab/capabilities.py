"""What this machine can do, found by trying it here rather than read from a table."""
from __future__ import annotations

import functools
import importlib.util
import platform

import torch

from .backends.grouped_mm import _TORCH_GROUPED_MM, grouped_mm_path
from .devices import default_device

_PROBE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> dict:
    """Run a tiny grouped_mm (two groups, one empty) and compare it with per-group matmuls."""
    path = grouped_mm_path(device, dtype, 32, 32)
    result = {"dtype": str(dtype).removeprefix("torch."), "kernel": path.kernel, "native": path.native,
              "reason": path.reason, "runs": False, "error": None}
    if _TORCH_GROUPED_MM is None or not path.uses_torch_op:
        return result
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8, 32, generator=generator).to(device, dtype)
        w = torch.randn(3, 32, 16, generator=generator).to(device, dtype)
        offsets = torch.tensor([3, 3, 8], dtype=torch.int32, device=device)
        out = _TORCH_GROUPED_MM(x, w, offs=offsets)
        expected = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
        result["runs"] = bool(torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2))
        if not result["runs"]:
            result["error"] = "ran but disagreed with per-group matmuls"
    except Exception as error:  # a capability probe reports, it does not raise
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return result


def _compile_usable() -> dict:
    """Compile a two-op function with the default inductor backend and run it."""
    try:
        compiled = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0, fullgraph=True)
        x = torch.randn(4, 4)
        ok = bool(torch.allclose(compiled(x), torch.nn.functional.silu(x) * 2.0))
        return {"usable": ok, "error": None if ok else "compiled output differs"}
    except Exception as error:
        return {"usable": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}


@functools.lru_cache(maxsize=None)
def _cached(device_str: str, probe_compile: bool) -> dict:
    device = torch.device(device_str)
    info = {
        "device": device_str,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "grouped_mm_op": _TORCH_GROUPED_MM is not None,
        "grouped_mm": {str(d).removeprefix("torch."): _probe_grouped_mm(device, d) for d in _PROBE_DTYPES},
        "triton": importlib.util.find_spec("triton") is not None,
    }
    if info["triton"]:
        import triton
        info["triton_version"] = triton.__version__
    if probe_compile:
        info["torch_compile"] = _compile_usable()
    return info


def capabilities(device: torch.device | str | None = None, *, probe_compile: bool = True) -> dict:
    """Device, versions, grouped GEMM per dtype (native kernel, torch's loop, or moe_lab's loop — and
    whether it actually ran here), triton, and whether torch.compile works. Cached per device.
    """
    device = torch.device(device) if device is not None else default_device()
    return dict(_cached(str(device), probe_compile))


def format_capabilities(info: dict) -> str:
    lines = [f"device       {info['device']} ({info['device_name']})", f"torch        {info['torch']}"]
    if info.get("compute_capability"):
        lines.append(f"capability   SM{info['compute_capability'].replace('.', '')}")
    for dtype, g in info["grouped_mm"].items():
        state = "native kernel" if g["native"] and g["runs"] else ("runs, loop" if g["runs"] else "moe_lab loop")
        lines.append(f"grouped_mm   {dtype:9s} {state:14s} {g['reason']}")
    lines.append(f"triton       {info.get('triton_version', 'not installed')}")
    if "torch_compile" in info:
        tc = info["torch_compile"]
        lines.append(f"torch.compile {'usable' if tc['usable'] else 'NOT usable: ' + str(tc['error'])}")
    return "\n".join(lines)
