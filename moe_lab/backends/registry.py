"""The experts-implementation registry, with transformers' `ExpertsInterface` vocabulary.

A backend is a `BackendSpec` (moe_lab.backends.spec): a forward function
    fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
where `experts` carries `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], `act_fn` and
`num_experts`, plus what it can do. `register` adds one (as a decorator or a plain call),
`get_backend` returns a forward function, `get_spec` its spec, `available_backends` lists the
names; an unknown name is a `ValueError` naming the valid ones.

The registry knows no backend by name: the package (`moe_lab/backends/__init__.py`) adds the
built-in specs when it is imported.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..errors import UnknownBackendError
from .spec import CAPABILITIES, BackendSpec, Support, no, unknown, yes

ExpertsForward = Callable  # (experts, hidden_states, top_k_index, top_k_weights) -> Tensor

_registry: dict[str, BackendSpec] = {}
_builtins: dict[str, BackendSpec] = {}  # as the package declared them: what unregister() restores

_UNDECLARED = {
    "runs": unknown("not declared: tried wherever it is called"),
    "autograd": unknown("not declared: the first call that needs gradients checks that they reach every input"),
    "cuda_graph": unknown("not declared: GraphedExperts tries it with torch's sync debug mode before capturing"),
    "fullgraph": unknown("not declared: torch.compile finds out"),
    "sync_free": unknown("not declared"),
}


def add_builtin(spec: BackendSpec) -> None:
    """Register a built-in backend's spec (the package does this on import)."""
    if not spec.builtin:
        raise ValueError(f"{spec.name!r} is not marked builtin; use register() for other backends")
    _registry[spec.name] = _builtins[spec.name] = spec


def register(name: str, fn: ExpertsForward | None = None, *, overwrite: bool = False, summary: str | None = None,
             sorted_rows: Callable | None = None, partial_forward: Callable | None = None, **capabilities):
    """Register an experts backend under `name`.

        @moe_lab.register("sorted_loop")
        def sorted_loop(experts, hidden_states, top_k_index, top_k_weights): ...

        moe_lab.register("sorted_loop", sorted_loop, cuda_graph=False)   # the same, as a plain call

    Capabilities (`runs`, `autograd`, `cuda_graph`, `fullgraph`, `sync_free`; see
    moe_lab.backends.spec) may be declared as True/False, a `Support`, or a function of `Where`.
    What is not declared is unknown and found out by trying. For autograd that means: the first
    call that needs gradients checks that the output's autograd graph reaches every input that
    requires grad — true of a function made of differentiable torch ops, false of one that
    detaches, goes through numpy or a kernel without a backward — and refuses it otherwise.

    `fn` may also be a whole `BackendSpec` (e.g. one from `get_spec`), registered under `name` as it is.
    `sorted_rows(experts, rows [R, H] grouped by expert, counts [E]) -> [R, H]` (unweighted) is an optional
    second entry for rows that arrive already grouped by expert (expert parallelism's receivers; see
    `BackendSpec.sorted_rows`); without it those callers run `fn` with top_k = 1.
    `partial_forward(experts, hidden_states, top_k_index, top_k_weights) -> [T, H]`, where an id >= the experts'
    count means "absent, contributes nothing", is another (`BackendSpec.partial_forward`; it must give gradients
    wherever `autograd` says `fn` does, and is checked like `fn`); without it those callers clamp the ids, zero
    their weights and run `fn`.
    Registering a user name again replaces it (re-running a notebook cell just works); replacing a
    built-in needs `overwrite=True`, and `unregister(name)` puts the built-in back.
    """
    if not isinstance(name, str) or not name or name.strip() != name:
        raise ValueError(f"a backend name must be a non-empty string without surrounding spaces, got {name!r}")
    unexpected = sorted(set(capabilities) - set(CAPABILITIES))
    if unexpected:
        raise TypeError(f"register() got unknown capabilities {unexpected}; capabilities are {list(CAPABILITIES)}")
    declared = {capability: _declared(name, capability, capabilities.get(capability)) for capability in CAPABILITIES}

    def add(function: ExpertsForward) -> ExpertsForward:
        if isinstance(function, BackendSpec):
            _check_replaceable(name, overwrite)
            if capabilities or summary or sorted_rows or partial_forward:
                raise TypeError("register(name, spec) takes the spec as it is: declare capabilities in the spec")
            _registry[name] = dataclasses.replace(function, name=name, builtin=name in _builtins)
            return function
        if not callable(function):
            raise TypeError(f"backend {name!r} must be callable, got {type(function).__name__}")
        for entry, value in (("sorted_rows", sorted_rows), ("partial_forward", partial_forward)):
            if value is not None and not callable(value):
                raise TypeError(f"{entry} of backend {name!r} must be callable or None, got {type(value).__name__}")
        _check_replaceable(name, overwrite)
        first_doc_line = (function.__doc__ or "").strip().splitlines()[:1]
        _registry[name] = BackendSpec(
            name=name, forward=function, summary=summary or (first_doc_line[0] if first_doc_line else "user backend"),
            builtin=name in _builtins, sorted_rows=sorted_rows, partial_forward=partial_forward, **declared)
        return function

    return add if fn is None else add(fn)


def _check_replaceable(name: str, overwrite: bool) -> None:
    if name in _builtins and not overwrite:
        raise ValueError(f"{name!r} is a built-in backend; pass overwrite=True to replace it")


def _declared(name: str, capability: str, value):
    if value is None:
        return _UNDECLARED[capability]
    if value is True:
        return yes("declared by its author")
    if value is False:
        return no("declared by its author")
    if isinstance(value, Support) or callable(value):
        return value
    raise TypeError(f"register({name!r}, {capability}=...) takes True, False, None, a Support or a function of "
                    f"Where, got {type(value).__name__}")


def unregister(name: str) -> None:
    """Remove a user backend, or put back a built-in that `register(..., overwrite=True)` replaced
    (built-ins themselves stay)."""
    spec = get_spec(name)
    if name in _builtins:
        if spec is _builtins[name]:
            raise ValueError(f"{name!r} is a built-in backend and cannot be removed")
        _registry[name] = _builtins[name]
        return
    del _registry[name]


def available_backends() -> list[str]:
    """Registered names: the built-ins first, then user backends in registration order."""
    return list(_registry)


def builtin_backends() -> list[str]:
    return list(_builtins)


def get_spec(name: str) -> BackendSpec:
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise UnknownBackendError(
            f"unknown experts implementation {name!r}; registered: {available_backends()} "
            "(add your own with moe_lab.register(name))"
        ) from None


def resolve_spec(name: str, experts, hidden_states, top_k: int, grad: bool) -> BackendSpec:
    """The spec of the backend that runs a call of `name` on `hidden_states` [T, H] with `top_k` slots: `name`'s
    own, or, for a dispatcher that declares `chooses` (auto), that of the backend it chooses for this call, so
    callers of the other entries (`sorted_rows`, `partial_forward`) get its choice's entries."""
    spec = get_spec(name)
    seen = {name}
    while spec.dispatcher and spec.chooses is not None:
        chosen = spec.chooses(experts, hidden_states, top_k, grad)
        if chosen in seen:
            raise ValueError(f"dispatcher {spec.name!r} chose {chosen!r}, which dispatches back to it")
        seen.add(chosen)
        spec = get_spec(chosen)
    return spec


def get_backend(name: str) -> ExpertsForward:
    """The forward function registered under `name`."""
    return get_spec(name).forward
