"""moe_lab: how a Mixture-of-Experts layer runs its expert matmuls, and why each way wins where it wins.

Importing this package pulls in torch only: no jupyter, widgets or plotting.
"""
from . import _triton_setup  # noqa: F401  (first: see its docstring)
from .backends import (
    Calibration,
    CalibrationError,
    calibration_path,
    choose_backend,
    load_calibration,
    reload_calibration,
    GroupedMMPath,
    available_backends,
    batched_mm_budget,
    experts_forward,
    get_backend,
    get_batched_mm_budget,
    grouped_mm_path,
    predict_gather_bytes,
    register,
    runnable_backends,
    set_batched_mm_budget,
    triton_status,
    unregister,
)
from . import record  # moe_lab.record.record(name, value): notebooks record values for `moe-lab sweep`
from .calibration import calibrate
from .capabilities import capabilities, default_device, format_capabilities
from .cuda_graph import GraphCaptureError, GraphedExperts
from .config import ACTIVATIONS, MoEConfig, resolve_dtype
from .errors import BackendInputError, ConfigError, GatherBudgetError, UnknownBackendError
from .model import MultiBackboneConfig, MultiBackboneMoEModel
from .modules import Experts, GatedMLP, SparseMoeBlock
from .presets import PRESETS, Preset, get_preset, scale_down
from .reference import reference_experts_forward, relative_error
from .routing import RouterOutput, RoutingStats, TopKRouter, route, routing_stats, synthetic_routing, tokens_per_expert

__version__ = "0.1.0"

__all__ = [
    "Calibration", "CalibrationError", "calibrate", "calibration_path", "choose_backend", "load_calibration",
    "reload_calibration",
    "ACTIVATIONS", "BackendInputError", "ConfigError", "Experts", "GatedMLP", "GatherBudgetError", "GroupedMMPath",
    "MoEConfig", "MultiBackboneConfig", "MultiBackboneMoEModel", "PRESETS", "Preset", "RouterOutput",
    "RoutingStats", "SparseMoeBlock", "TopKRouter", "UnknownBackendError", "available_backends",
    "batched_mm_budget", "capabilities", "default_device", "experts_forward", "format_capabilities",
    "get_backend", "get_batched_mm_budget", "get_preset", "grouped_mm_path", "predict_gather_bytes",
    "reference_experts_forward", "register", "relative_error", "resolve_dtype", "route", "routing_stats",
    "runnable_backends", "scale_down", "set_batched_mm_budget", "synthetic_routing", "tokens_per_expert",
    "triton_status", "unregister", "GraphCaptureError", "GraphedExperts",
]
