"""moe_lab: how a Mixture-of-Experts layer runs its expert matmuls, and why each way wins where it wins.

Importing this package pulls in torch only: no jupyter, widgets or plotting.
"""
from . import _triton_setup  # noqa: F401  (first: see its docstring)
from .backends import (
    CAPABILITIES,
    BackendSpec,
    Calibration,
    CalibrationError,
    Support,
    Where,
    backend_capabilities,
    calibration_path,
    choose_backend,
    describe_backends,
    load_calibration,
    reload_calibration,
    GroupedMMPath,
    available_backends,
    batched_mm_budget,
    experts_forward,
    get_backend,
    get_spec,
    get_batched_mm_budget,
    grouped_mm_path,
    predict_gather_bytes,
    register,
    runnable_backends,
    set_batched_mm_budget,
    triton_status,
    unregister,
)
from . import notebook_values  # moe_lab.notebook_values.record(name, value): notebooks hand values to `moe-lab sweep`
from .capabilities import capabilities, default_device, format_capabilities
from .cuda_graph import GraphCaptureError, GraphedExperts
from .config import ACTIVATIONS, MoEConfig, resolve_dtype
from .errors import (
    BackendCapabilityError, BackendInputError, ConfigError, DetachedOutputError, GatherBudgetError, UnknownBackendError,
)
from .model import MultiBackboneConfig, MultiBackboneMoEModel
from .modules import Experts, GatedMLP, SparseMoeBlock
from .presets import PRESETS, Preset, get_preset, scale_down
from .reference import reference_experts_forward, relative_error
from .routing import (
    RouterOutput, RoutingStats, TopKRouter, load_balancing_loss, route, routing_stats, synthetic_routing,
    tokens_per_expert,
)

__version__ = "0.1.0"


def calibrate(*args, **kwargs):
    """Measure where one backend overtakes another here and store it for `auto`: see
    moe_lab.bench.calibrate.calibrate (imported on first use; the bench is not part of `import moe_lab`)."""
    from .bench.calibrate import calibrate as measure_and_store

    return measure_and_store(*args, **kwargs)


__all__ = [
    "CAPABILITIES", "BackendCapabilityError", "BackendSpec", "DetachedOutputError", "Support", "Where",
    "backend_capabilities", "describe_backends", "get_spec",
    "Calibration", "CalibrationError", "calibrate", "calibration_path", "choose_backend", "load_calibration",
    "reload_calibration",
    "ACTIVATIONS", "BackendInputError", "ConfigError", "Experts", "GatedMLP", "GatherBudgetError", "GroupedMMPath",
    "MoEConfig", "MultiBackboneConfig", "MultiBackboneMoEModel", "PRESETS", "Preset", "RouterOutput",
    "RoutingStats", "SparseMoeBlock", "TopKRouter", "UnknownBackendError", "available_backends",
    "batched_mm_budget", "capabilities", "default_device", "experts_forward", "format_capabilities",
    "get_backend", "get_batched_mm_budget", "get_preset", "grouped_mm_path", "load_balancing_loss", "predict_gather_bytes",
    "reference_experts_forward", "register", "relative_error", "resolve_dtype", "route", "routing_stats",
    "runnable_backends", "scale_down", "set_batched_mm_budget", "synthetic_routing", "tokens_per_expert",
    "triton_status", "unregister", "GraphCaptureError", "GraphedExperts",
]
