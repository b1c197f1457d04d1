"""Experts backends: the registry and one module per implementation.

Every backend keeps tokens apart: NaN or +-inf in one token's hidden state (or routing weights)
makes exactly that token's output non-finite and leaves the other tokens' outputs bit-identical
(tests/test_hostile_inputs.py; docs/errors.md). Nothing checks for NaN: that would cost a sync.
"""
from .auto import (
    DEFAULT_CROSSOVERS,
    Calibration,
    CalibrationError,
    auto_experts_forward,
    calibration_path,
    choose_backend,
    crossover_table,
    load_calibration,
    reload_calibration,
)
from .batched_mm import (
    batched_mm_budget,
    batched_mm_experts_forward,
    get_batched_mm_budget,
    predict_gather_bytes,
    set_batched_mm_budget,
)
from .common import apply_gate, check_inputs, expert_weights
from .eager import eager_experts_forward
from .grouped_mm import GroupedMMPath, grouped_mm_experts_forward, grouped_mm_path
from .registry import available_backends, get_backend, register, unregister
from .triton_fused import TritonUnavailableError, triton_available, triton_status


def runnable_backends(device, *, interpreted: bool = True) -> list[str]:
    """Registered moe_lab backends (not the "transformers:*" comparison entries) that can run on
    `device`: "triton" only where triton runs there — and, with interpreted=False, only compiled
    (triton's CPU interpreter is for correctness, far too slow to time)."""
    names = []
    for name in available_backends():
        if name.startswith("transformers:"):
            continue
        if name == "triton":
            runs, why = triton_status(device)
            if not runs or (not interpreted and "interpreter" in why):
                continue
        names.append(name)
    return names


def experts_forward(implementation, experts, hidden_states, top_k_index, top_k_weights):
    """Validate the inputs, then run the named backend: the checked entry point."""
    backend = get_backend(implementation)
    check_inputs(experts, hidden_states, top_k_index, top_k_weights)
    return backend(experts, hidden_states, top_k_index, top_k_weights)


__all__ = [
    "Calibration", "CalibrationError", "DEFAULT_CROSSOVERS", "auto_experts_forward", "calibration_path",
    "choose_backend", "crossover_table", "load_calibration", "reload_calibration",
    "GroupedMMPath", "apply_gate", "available_backends", "batched_mm_budget", "batched_mm_experts_forward",
    "check_inputs", "eager_experts_forward", "expert_weights", "experts_forward", "get_backend",
    "get_batched_mm_budget", "grouped_mm_experts_forward", "grouped_mm_path", "predict_gather_bytes",
    "register", "runnable_backends", "set_batched_mm_budget", "triton_available", "triton_status",
    "TritonUnavailableError", "unregister",
]
