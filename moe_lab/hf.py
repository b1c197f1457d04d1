"""Optional interop with Hugging Face transformers (>= 5): run moe_lab backends inside transformers models.

transformers 5 keeps MoE expert weights as two 3-D tensors per layer (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) — the layout moe_lab's backends read — and dispatches each experts module's
forward through a registry, `ALL_EXPERTS_FUNCTIONS`, keyed by `config._experts_implementation`
("eager" runs the module's own loop; "grouped_mm", "batched_mm", ... are registered functions).
This module plugs moe_lab's backends into that registry:

    import moe_lab.hf
    moe_lab.hf.register_with_transformers()          # -> ["moe_lab_eager", "moe_lab_batched_mm", ...]
    model = moe_lab.hf.tiny_transformers_model("qwen3_moe")
    model.set_experts_implementation("moe_lab_grouped_mm")
    moe_lab.hf.compare_implementations(model, input_ids)   # max differences of the logits vs "eager"

and offers small random-weight models (no download) and access to their experts modules, so that a
moe_lab backend can be called on a transformers experts module directly:

    experts = next(moe_lab.hf.experts_modules(model))
    moe_lab.experts_forward("grouped_mm", experts, hidden, top_k_index, top_k_weights)

`import moe_lab` never imports transformers; only `import moe_lab.hf` does.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from . import backends as _backends
from .errors import BackendInputError
from .presets import scale_down
from .reference import relative_error

try:
    import transformers
    from transformers.integrations import moe as _tf_moe
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
except ImportError as _error:  # transformers missing, or a 4.x without the experts registry
    _installed = ""
    try:
        import importlib.metadata as _metadata

        _installed = f" (found transformers {_metadata.version('transformers')})"
    except Exception:  # noqa: BLE001 - any failure here just means "not installed"
        pass
    raise ImportError(
        "moe_lab.hf needs Hugging Face transformers >= 5.0 with its experts registry "
        f"(transformers.integrations.moe){_installed}. Install it with: pip install 'moe-lab[hf]'"
    ) from _error

__all__ = [
    "EXTRA_FAMILIES", "FAMILIES", "compare_implementations", "experts_modules", "named_experts_modules",
    "register_with_transformers", "registered_with_transformers", "tiny_transformers_config",
    "tiny_transformers_model", "transformers_experts_forward", "unregister_from_transformers",
]

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
    if getattr(experts, "_is_expert_parallel", False):
        raise BackendInputError(
            f"{kind} is sharded for expert parallelism (expert ids >= num_experts mark other ranks' "
            f"experts), which moe_lab backends do not implement{advice}"
        )


def _make_wrapper(backend_name: str, transformers_name: str) -> Callable:
    def forward(experts, hidden_states, top_k_index, top_k_weights):
        _check_supported(experts, transformers_name)
        # Looked up per call, so re-registering `backend_name` in moe_lab takes effect at once.
        backend = _backends.get_backend(backend_name)
        _backends.check_inputs(experts, hidden_states, top_k_index, top_k_weights)
        return backend(experts, hidden_states, top_k_index, top_k_weights)

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
    interleaved gate/up rows without a custom `_apply_gate`, a post-expert norm, expert
    parallelism), validates the tensors with `moe_lab.backends.check_inputs`, then runs the backend.

    Idempotent: registering a name again keeps the same function. A transformers name that is
    already taken by something else (transformers' own "grouped_mm" when prefix="") is refused
    unless `overwrite=True`; "eager" is never replaced (transformers reserves it for the module's
    own forward). Returns the transformers names, in the order of `names`.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
    if isinstance(names, str):
        names = [names]
    if names is None:
        # transformers' own backends, registered in moe_lab for timing (bench.hf_compare), go home only once.
        names = [n for n in _backends.available_backends() if not n.startswith("transformers:")]
    else:
        names = list(names)
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


# --------------------------------------------------------------------------------------------
# Tiny random-weight transformers models
# --------------------------------------------------------------------------------------------

# family -> (moe_lab preset whose intermediate/hidden ratio the tiny model keeps, extra config).
# Every family gets 8 experts, top_k 2, hidden 64, 2 layers, vocab 128.
_FAMILY_SPECS = {
    "qwen2_moe": ("qwen1.5-moe-a2.7b", {"decoder_sparse_step": 1, "mlp_only_layers": []}),
    "mixtral": ("mixtral-8x7b", {}),
    "qwen3_moe": ("qwen3-30b-a3b", {"decoder_sparse_step": 1, "mlp_only_layers": [], "head_dim": 16}),
    "olmoe": ("olmoe-1b-7b", {}),
    # gpt-oss stores its experts transposed, with biases, and with gate/up rows interleaved that
    # its own `_apply_gate` (a clamped SwiGLU) takes apart: moe_lab's backends run it through that
    # gate, but `moe_lab.reference_experts_forward` (gate-first halves, no bias) does not model it.
    "gpt_oss": ("gpt-oss-20b", {"head_dim": 16, "layer_types": ["sliding_attention", "full_attention"],
                                "sliding_window": 16,
                                # plain RoPE: gpt-oss's YaRN defaults assume a 4096-token original context
                                "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}}),
}
# The families whose experts are plain gated MLPs in moe_lab's layout (what the reference models).
FAMILIES: tuple[str, ...] = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")
EXTRA_FAMILIES: tuple[str, ...] = ("gpt_oss",)

TINY_NUM_EXPERTS = 8
TINY_TOP_K = 2
# transformers initialises with std 0.02; at hidden size 64 the experts then add only ~2% to the
# residual stream and a wrong experts backend barely moves the logits. std 0.1 makes the experts
# 15-65% of the logits, so comparing logits really compares the experts.
TINY_INITIALIZER_RANGE = 0.1


def _check_family(family: str) -> str:
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; tiny models exist for {list(FAMILIES + EXTRA_FAMILIES)}")
    return family


def tiny_transformers_config(family: str, **overrides):
    """A small transformers config for `family` ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe"; also "gpt_oss").

    hidden 64 (4 heads of 16, 2 KV heads), 2 layers, vocab 128, 8 experts, top_k 2; the expert
    (and, for qwen2_moe, shared-expert) intermediate sizes are those of `moe_lab.scale_down` of the
    family's preset (all multiples of 16). `overrides` are config keyword arguments and win
    (e.g. num_hidden_layers=1, experts_implementation="moe_lab_grouped_mm").
    """
    preset, extra = _FAMILY_SPECS[_check_family(family)]
    small = scale_down(preset)  # hidden 64, preset's I/H ratio
    kwargs = dict(
        vocab_size=128, hidden_size=small.hidden_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, hidden_act=small.activation,
        num_experts_per_tok=TINY_TOP_K, initializer_range=TINY_INITIALIZER_RANGE,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if family in ("mixtral", "gpt_oss"):
        kwargs.update(num_local_experts=TINY_NUM_EXPERTS, intermediate_size=small.intermediate_size)
    elif family == "olmoe":
        kwargs.update(num_experts=TINY_NUM_EXPERTS, intermediate_size=small.intermediate_size,
                      norm_topk_prob=small.norm_topk_prob)
    else:  # qwen2_moe, qwen3_moe: dense layers (none here) use intermediate_size, experts moe_intermediate_size
        kwargs.update(num_experts=TINY_NUM_EXPERTS, moe_intermediate_size=small.intermediate_size,
                      intermediate_size=4 * small.intermediate_size, norm_topk_prob=small.norm_topk_prob)
        if family == "qwen2_moe":
            kwargs["shared_expert_intermediate_size"] = small.shared_expert_intermediate_size
    kwargs.update(extra)
    kwargs.update(overrides)
    return transformers.AutoConfig.for_model(family, **kwargs)


def tiny_transformers_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                            experts_implementation: str | None = None, **overrides):
    """A small random-weight causal LM of `family`, built from a config (no download), in `.eval()`.

    Deterministic: the same `seed` gives the same weights (the global torch RNG is left as it
    was). `dtype` is the parameter dtype (float32 by default). `experts_implementation` is passed
    to `from_config` (transformers validates it then); `overrides` go to `tiny_transformers_config`.
    """
    config = tiny_transformers_config(family, **overrides)
    kwargs = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Experts modules and comparisons
# --------------------------------------------------------------------------------------------

_DECORATOR_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def _is_transformers_experts(module) -> bool:
    # `@use_experts_implementation` sets these flags and a `config` on every experts module.
    return (isinstance(module, torch.nn.Module) and all(hasattr(module, flag) for flag in _DECORATOR_FLAGS)
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def named_experts_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(qualified name, module) for every transformers experts module in `model`, in module order."""
    for name, module in model.named_modules():
        if _is_transformers_experts(module):
            yield name, module


def experts_modules(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The transformers experts modules (those dispatching on `config._experts_implementation`) of `model`.

    Each can be handed to a moe_lab backend as it is:
    `moe_lab.experts_forward("grouped_mm", experts, hidden [T, H], top_k_index, top_k_weights)`.
    """
    for _, module in named_experts_modules(model):
        yield module


def _set_config_implementation(config, name):
    # Set on this config only (transformers' setter would also recurse into sub-configs).
    if hasattr(config, "_experts_implementation_internal"):
        config._experts_implementation_internal = name
    else:  # pragma: no cover - other transformers layouts
        config._experts_implementation = name


@contextlib.contextmanager
def _config_implementation(config, name: str):
    previous = config._experts_implementation
    _set_config_implementation(config, name)
    try:
        yield
    finally:
        _set_config_implementation(config, previous)


def transformers_experts_forward(experts, hidden_states, top_k_index, top_k_weights,
                                 implementation: str = "eager"):
    """Run a transformers experts module through transformers' own dispatch under `implementation`.

    The module reads `experts.config._experts_implementation`, which is shared by every layer of
    the model; it is switched for this call only and restored afterwards.
    """
    if not _is_transformers_experts(experts):
        raise TypeError(f"{type(experts).__name__} is not a transformers experts module "
                        "(no @use_experts_implementation flags / config)")
    with _config_implementation(experts.config, implementation):
        return experts(hidden_states, top_k_index, top_k_weights)


def _logits(model, input_ids, **kwargs):
    output = model(input_ids=input_ids, **kwargs)
    return output.logits if hasattr(output, "logits") else output[0]


def compare_implementations(model, input_ids: torch.Tensor, implementations: Sequence[str] | None = None,
                            *, reference: str = "eager", **forward_kwargs) -> dict[str, dict[str, float]]:
    """Logits of `model(input_ids)` under each experts implementation vs under `reference`.

    `implementations` defaults to transformers' "grouped_mm" and "batched_mm" plus every moe_lab
    entry registered in transformers whose backend can run on the model's device. Returns {name: {"max_abs_diff", "max_rel_diff" (max abs diff /
    max |reference logit|), "relative_error" (||diff|| / ||reference||)}}; the reference itself maps
    to zeros. The model's experts implementation is restored afterwards (also on error).
    """
    if implementations is None:
        implementations = [name for name in ("grouped_mm", "batched_mm") if name in ALL_EXPERTS_FUNCTIONS]
        device = next(model.parameters()).device
        runnable = set(_backends.runnable_backends(device))  # e.g. no moe_lab_triton without triton
        implementations += sorted(name for name, backend in registered_with_transformers().items()
                                  if backend in runnable)
    snapshot = model.get_experts_implementation()
    results: dict[str, dict[str, float]] = {}
    try:
        with torch.no_grad():
            model.set_experts_implementation(reference)
            expected = _logits(model, input_ids, **forward_kwargs).detach().to(torch.float64)
            scale = float(expected.abs().max()) or 1.0
            for name in [reference, *[n for n in implementations if n != reference]]:
                model.set_experts_implementation(name)
                actual = _logits(model, input_ids, **forward_kwargs).detach().to(torch.float64)
                max_abs = float((actual - expected).abs().max()) if actual.numel() else 0.0
                results[name] = {
                    "max_abs_diff": max_abs,
                    "max_rel_diff": max_abs / scale,
                    "relative_error": relative_error(actual, expected),
                }
    finally:
        model.set_experts_implementation(snapshot)
    return results
