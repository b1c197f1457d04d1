"""The experts-implementation registry, with transformers' `ExpertsInterface` vocabulary.

A backend is any callable
    fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
where `experts` carries `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], `act_fn` and
`num_experts`. `register` adds one (as a decorator or a plain call), `get_backend` looks one up
and `available_backends` lists them; an unknown name is a `ValueError` naming the valid ones.
"""
from __future__ import annotations

from collections.abc import Callable

from ..errors import UnknownBackendError
from .auto import auto_experts_forward
from .batched_mm import batched_mm_experts_forward
from .eager import eager_experts_forward
from .grouped_mm import grouped_mm_experts_forward
from .triton_fused import triton_experts_forward

ExpertsForward = Callable  # (experts, hidden_states, top_k_index, top_k_weights) -> Tensor

BUILTIN_BACKENDS: dict[str, ExpertsForward] = {
    "eager": eager_experts_forward,
    "batched_mm": batched_mm_experts_forward,
    "grouped_mm": grouped_mm_experts_forward,
    "triton": triton_experts_forward,
    "auto": auto_experts_forward,
}
_registry: dict[str, ExpertsForward] = dict(BUILTIN_BACKENDS)


def register(name: str, fn: ExpertsForward | None = None, *, overwrite: bool = False):
    """Register an experts backend under `name`.

        @moe_lab.register("sorted_loop")
        def sorted_loop(experts, hidden_states, top_k_index, top_k_weights): ...

        moe_lab.register("sorted_loop", sorted_loop)   # the same, as a plain call

    Registering a user name again replaces it (re-running a notebook cell just works); replacing a
    built-in needs `overwrite=True`.
    """
    if not isinstance(name, str) or not name or name.strip() != name:
        raise ValueError(f"a backend name must be a non-empty string without surrounding spaces, got {name!r}")

    def add(function: ExpertsForward) -> ExpertsForward:
        if not callable(function):
            raise TypeError(f"backend {name!r} must be callable, got {type(function).__name__}")
        if name in BUILTIN_BACKENDS and not overwrite:
            raise ValueError(f"{name!r} is a built-in backend; pass overwrite=True to replace it")
        _registry[name] = function
        return function

    return add if fn is None else add(fn)


def unregister(name: str) -> None:
    """Remove a user backend (built-ins stay)."""
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"{name!r} is a built-in backend and cannot be removed")
    get_backend(name)  # raises with the valid names if unknown
    del _registry[name]


def available_backends() -> list[str]:
    """Registered names: the built-ins first, then user backends in registration order."""
    return list(_registry)


def get_backend(name: str) -> ExpertsForward:
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise UnknownBackendError(
            f"unknown experts implementation {name!r}; registered: {available_backends()} "
            "(add your own with moe_lab.register(name))"
        ) from None
