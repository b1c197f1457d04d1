"""moe_lab backends in transformers' experts registry (`ALL_EXPERTS_FUNCTIONS`), as `moe_lab_<name>`.

Each entry checks that the experts module is one moe_lab can run (a gated layout moe_lab's backends
read), then runs the backend through `moe_lab.experts_forward`: inputs validated, and a backend
that cannot give gradients refused when the model is training.

A module transformers has sharded for expert parallelism (`_is_expert_parallel`: its ids >= num_experts
mark other ranks' experts, with zero weights) runs through `moe_lab.parallel.local.run_partial_experts`:
the backend's `partial_forward` where it has one (the absent slots cost nothing), else ids clamped and
weights zeroed, as transformers' own batched_mm does. Either way those slots contribute nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from transformers.integrations import moe as _tf_moe
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .. import backends as _backends
from ..errors import BackendInputError
from ..parallel.local import run_partial_experts

DEFAULT_PREFIX = "moe_lab_"

# transformers functions that register_with_transformers(..., overwrite=True) replaced, by name,
# so that unregister_from_transformers can put them back.
_replaced: dict[str, Callable] = {}

# --------------------------------------------------------------------------------------------
# Registering moe_lab backends in transformers' experts registry
# --------------------------------------------------------------------------------------------

def _default_apply_gate():
    # transformers' decorator installs this chunk(2)-based gate on classes that define none.
    # Private in transformers; if it ever disappears we treat every gate as the default one.
    return getattr(_tf_moe, "_default_apply_gate", None)


#: Set on an expert-parallel experts module while moe_lab.hf.expert_parallel runs it: no sentinel ids, every
#: row is for one of this rank's experts, so the backend's plain forward runs it.
LOCAL_ROWS_ONLY = "_moe_lab_local_rows_only"


def _check_supported(experts, transformers_name: str) -> None:
    """Raise a ValueError for a transformers experts module that moe_lab's backends would get wrong."""
    kind = type(experts).__name__
    advice = (f"; use a transformers implementation for this model instead, e.g. "
              f"model.set_experts_implementation('eager') (requested: {transformers_name!r})")
    if getattr(experts, "has_gate", True) is False:
        raise BackendInputError(
            f"{kind} has no gate (has_gate=False: up_proj + activation, no gate_up_proj); moe_lab backends "
            f"implement gated experts only (gate_up_proj [E, 2I, H] with the gate rows first){advice}"
        )
    if getattr(experts, "is_concatenated", True) is False:
        gate = getattr(type(experts), "_apply_gate", None)
        default_gate = _default_apply_gate()
        if gate is None or default_gate is None or gate is default_gate:
            raise BackendInputError(
                f"{kind} stores gate and up rows interleaved (is_concatenated=False) and has no `_apply_gate` "
                f"of its own to undo that; moe_lab backends split gate_up_proj into a gate half then an up "
                f"half{advice}"
            )
        # A module with its own `_apply_gate` (gpt-oss) de-interleaves there; moe_lab's backends
        # call `experts._apply_gate`, so the layout is handled.
    if getattr(experts, "has_post_expert_norm", False):
        raise BackendInputError(
            f"{kind} normalises each expert's output (has_post_expert_norm=True), which moe_lab backends "
            f"do not implement{advice}"
        )


def _has_sentinel_ids(experts) -> bool:
    """Whether transformers' expert parallelism may hand this module ids >= num_experts ("another rank's
    expert"): it is sharded, and not run by moe_lab.hf.expert_parallel, which sends only local rows."""
    return getattr(experts, "_is_expert_parallel", False) and not getattr(experts, LOCAL_ROWS_ONLY, False)


def _make_wrapper(backend_name: str, transformers_name: str) -> Callable:
    def forward(experts, hidden_states, top_k_index, top_k_weights):
        _check_supported(experts, transformers_name)
        # Looked up per call, so re-registering `backend_name` in moe_lab takes effect at once.
        if _has_sentinel_ids(experts):  # the absent slots contribute nothing, as in transformers' own backends
            return run_partial_experts(experts, hidden_states, top_k_index, top_k_weights, backend=backend_name)
        return _backends.experts_forward(backend_name, experts, hidden_states, top_k_index, top_k_weights)

    forward.__name__ = f"{transformers_name}_experts_forward"
    forward.__qualname__ = forward.__name__
    forward.__doc__ = f"moe_lab backend {backend_name!r}, registered in transformers as {transformers_name!r}."
    forward.moe_lab_backend = backend_name
    return forward


def _is_ours(function) -> bool:
    # Our wrappers carry the moe_lab backend name; that is how only our entries are ever replaced or removed.
    return getattr(function, "moe_lab_backend", None) is not None


def register_with_transformers(names: Iterable[str] | None = None, prefix: str = DEFAULT_PREFIX,
                               *, overwrite: bool = False) -> list[str]:
    """Register moe_lab backends in transformers' experts registry as `prefix + name`.

    `names` defaults to every name in `moe_lab.available_backends()` at call time, so backends
    registered with `moe_lab.register` come along (call again after registering more). Each entry
    checks that the experts module is one moe_lab can run (a clear ValueError otherwise: no gate,
    interleaved gate/up rows without a custom `_apply_gate`, a post-expert norm), validates the
    tensors with `moe_lab.backends.check_inputs`, then runs the backend.

    Idempotent: registering a name again keeps the same function. A transformers name that is
    already taken by something else (transformers' own "grouped_mm" when prefix="") is refused
    unless `overwrite=True`; "eager" is never replaced (transformers reserves it for the module's
    own forward). Returns the transformers names, in the order of `names`.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
    if isinstance(names, str):
        names = [names]
    names = _backends.available_backends() if names is None else list(names)
    planned = []
    for name in names:
        _backends.get_backend(name)  # unknown -> moe_lab.UnknownBackendError naming the valid ones
        transformers_name = prefix + name
        if transformers_name == "eager":
            raise ValueError("'eager' is reserved by transformers for the experts module's own forward; "
                             "register moe_lab's eager backend under a prefix (the default is 'moe_lab_')")
        existing = ALL_EXPERTS_FUNCTIONS.get(transformers_name)
        if existing is not None and not _is_ours(existing) and not overwrite:
            raise ValueError(
                f"transformers already has an experts implementation named {transformers_name!r} "
                f"({getattr(existing, '__module__', '?')}.{getattr(existing, '__name__', '?')}); pick another "
                "prefix or pass overwrite=True to replace it"
            )
        planned.append((name, transformers_name, existing))
    registered = []
    for name, transformers_name, existing in planned:
        if existing is not None and _is_ours(existing) and existing.moe_lab_backend == name:
            wrapper = existing  # already there: keep the very same function
        else:
            if existing is not None and not _is_ours(existing):
                _replaced[transformers_name] = existing  # overwrite=True: keep it to restore later
            wrapper = _make_wrapper(name, transformers_name)
            type(ALL_EXPERTS_FUNCTIONS).register(transformers_name, wrapper)  # class-wide: every instance sees it
        registered.append(transformers_name)
    return registered


def registered_with_transformers() -> dict[str, str]:
    """{transformers name: moe_lab backend name} for every moe_lab entry now in transformers' registry."""
    return {key: ALL_EXPERTS_FUNCTIONS[key].moe_lab_backend for key in ALL_EXPERTS_FUNCTIONS
            if _is_ours(ALL_EXPERTS_FUNCTIONS[key])}


def unregister_from_transformers(names: Iterable[str] | None = None) -> list[str]:
    """Remove moe_lab entries (transformers names, default: all of them) from transformers' registry.

    transformers has no public way to unregister, so this edits `ExpertsInterface._global_mapping`;
    entries that are not moe_lab's are never touched (asking for one raises ValueError), and one
    that `overwrite=True` replaced is put back. Models whose config still names a removed
    implementation raise transformers' KeyError on forward. Returns the names removed.
    """
    ours = registered_with_transformers()
    if isinstance(names, str):
        names = [names]
    names = list(ours) if names is None else list(names)
    for name in names:
        if name not in ours:
            raise ValueError(f"{name!r} is not a moe_lab entry in transformers' experts registry; "
                             f"moe_lab entries: {sorted(ours)}")
    mapping = type(ALL_EXPERTS_FUNCTIONS)._global_mapping
    for name in names:
        if name in _replaced:
            mapping[name] = _replaced.pop(name)
        else:
            mapping.pop(name, None)
    return names
