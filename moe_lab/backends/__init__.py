"""Experts backends: the registry, one module per implementation, and the checked entry point.

Each backend module declares its `SPEC` (moe_lab.backends.spec): the forward function and what it
can do. This package adds the built-in specs to the registry; everything else asks them.

Every backend keeps tokens apart: NaN or +-inf in one token's hidden state (or routing weights)
makes exactly that token's output non-finite and leaves the other tokens' outputs bit-identical
(tests/test_nonfinite_inputs.py; docs/errors.md). Nothing checks for NaN: that would cost a sync.
"""
from . import auto as _auto
from . import batched_mm as _batched_mm
from . import eager as _eager
from . import grouped_mm as _grouped_mm
from . import registry as _registry
from . import triton_fused as _triton_fused
from .auto import DEFAULT_CROSSOVERS, Needs, auto_experts_forward, choose_backend, crossover_table
from .autograd_check import DetachedOutputError, checked_forward
from .batched_mm import (
    batched_mm_budget,
    batched_mm_experts_forward,
    get_batched_mm_budget,
    predict_gather_bytes,
    set_batched_mm_budget,
)
from .calibration import Calibration, CalibrationError, calibration_path, load_calibration, reload_calibration
from .common import apply_gate, check_inputs, expert_weights
from .describe import backend_capabilities, describe_backends
from .eager import eager_experts_forward
from .grouped_mm import GroupedMMPath, grouped_mm_experts_forward, grouped_mm_path
from .registry import available_backends, builtin_backends, get_backend, get_spec, register, resolve_spec, unregister
from .spec import CAPABILITIES, BackendSpec, Support, Where
from .triton_fused import TritonUnavailableError, triton_available, triton_status

for _module in (_eager, _batched_mm, _grouped_mm, _triton_fused, _auto):
    _registry.add_builtin(_module.SPEC)


def runnable_backends(device, *, interpreted: bool = True, dtype=None) -> list[str]:
    """Registered backends that run on `device` (in `dtype`, if given), as their specs declare.
    With interpreted=False, not those that run only through an interpreter (triton on a CPU:
    exact but far too slow to time)."""
    import torch

    where = Where.of(device, dtype if dtype is not None else torch.float32)
    names = []
    for name in available_backends():
        runs = get_spec(name).supports("runs", where)
        if runs.ok is not False and (interpreted or not runs.slow):
            names.append(name)
    return names


def experts_forward(implementation, experts, hidden_states, top_k_index, top_k_weights):
    """Validate the inputs, then run the named backend: the checked entry point. A backend that
    cannot give gradients is refused when the call needs them, and an output that comes back
    detached from inputs that require grad raises, instead of training silently losing them."""
    spec = get_spec(implementation)
    check_inputs(experts, hidden_states, top_k_index, top_k_weights)
    return checked_forward(spec, experts, hidden_states, top_k_index, top_k_weights)


__all__ = [
    "CAPABILITIES", "BackendSpec", "Calibration", "CalibrationError", "DEFAULT_CROSSOVERS", "DetachedOutputError",
    "GroupedMMPath", "Needs", "Support", "TritonUnavailableError", "Where", "apply_gate", "auto_experts_forward",
    "available_backends", "backend_capabilities", "batched_mm_budget", "batched_mm_experts_forward",
    "builtin_backends", "calibration_path", "check_inputs", "choose_backend", "crossover_table", "describe_backends",
    "eager_experts_forward", "expert_weights", "experts_forward", "get_backend", "get_batched_mm_budget", "get_spec",
    "grouped_mm_experts_forward", "grouped_mm_path", "load_calibration", "predict_gather_bytes", "register",
    "reload_calibration", "resolve_spec", "runnable_backends", "set_batched_mm_budget", "triton_available", "triton_status",
    "unregister",
]
