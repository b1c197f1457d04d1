"""Small random-weight transformers models (no download), their experts modules, and comparing
experts implementations on a model's logits."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .. import backends as _backends
from ..presets import scale_down
from ..reference import relative_error
from .registry import registered_with_transformers

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
    Expert biases (gpt-oss's) get random values like the weights: transformers initialises them to
    zero, where a backend that dropped or misplaced a bias term would still match every other.
    """
    config = tiny_transformers_config(family, **overrides)
    kwargs = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        std = getattr(config, "initializer_range", 0.02)
        with torch.no_grad():
            for experts in experts_modules(model):
                for name in ("gate_up_proj_bias", "down_proj_bias", "up_proj_bias"):
                    bias = getattr(experts, name, None)
                    if isinstance(bias, torch.Tensor):
                        bias.normal_(0.0, std)
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
