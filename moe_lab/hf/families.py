"""Every transformers model family whose experts go through transformers' experts registry, found in
the installed transformers, and whether moe_lab's backends can run them.

transformers marks an experts class with `@use_experts_implementation(...)`, whose flags describe
the weight layout (`has_gate`, `is_transposed`, `has_bias`, `is_concatenated`,
`has_post_expert_norm`). This module reads those decorators from transformers' source (no import
of 60+ modeling files to list them), builds each experts class on a tiny config, and asks
`moe_lab.hf.registry` whether moe_lab runs that layout (and why not):

    experts_families()                 -> {"qwen3_moe": [ExpertsClass(...)], "nemotron_h": [...], ...}
    refusal_reason(entry)              -> None, or why moe_lab refuses it
    tiny_experts(entry, seed=0)        -> the experts module with random weights (hidden 64, 8 experts)
    experts_hidden_size(experts)       -> H, read from the weights (a config may name it differently)
    tiny_causal_lm(family, seed=0)     -> a whole 2-layer causal LM of the family, where a generic shrink of its
                                          default config builds one (about half the families: multimodal,
                                          hybrid-attention and MLA configs need family-specific sizes)
"""
from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

from ..errors import BackendInputError
from .registry import _check_supported

_DECORATED = re.compile(r"@use_experts_implementation(?:\(([^)]*)\))?\s*\nclass (\w+)")
TINY_HIDDEN = 64
TINY_EXPERTS = 8
TINY_WIDTH = 32
# Config fields set on the text config before an experts class is built from it (when it has them).
_TINY_FIELDS = dict(
    hidden_size=TINY_HIDDEN, intermediate_size=TINY_HIDDEN, moe_intermediate_size=TINY_WIDTH,
    expert_intermediate_size=TINY_WIDTH, shared_expert_intermediate_size=TINY_WIDTH, num_experts=TINY_EXPERTS,
    num_local_experts=TINY_EXPERTS, n_routed_experts=TINY_EXPERTS, moe_num_experts=TINY_EXPERTS,
    num_experts_per_tok=2,
)


@dataclass(frozen=True)
class ExpertsClass:
    family: str  # the folder under transformers/models
    model_type: str  # the config the tiny experts are built from
    class_name: str
    flags: str  # the decorator's arguments as written, e.g. "has_gate=False"

    @property
    def label(self) -> str:
        return f"{self.family}.{self.class_name}"

    def load(self) -> type:
        module = importlib.import_module(f"transformers.models.{self.family}.modeling_{self.family}")
        return getattr(module, self.class_name)


def _model_types_by_family() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        found.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    return found


def _pick_model_type(family: str, candidates: list[str]) -> str:
    # The family's own name first (e.g. "inkling2"), then a text model's, then the first one.
    for wanted in (family, f"{family}_text"):
        if wanted in candidates:
            return wanted
    return sorted(candidates)[0]


@lru_cache(maxsize=None)
def experts_families() -> dict[str, tuple[ExpertsClass, ...]]:
    """{family: its experts classes} for every family of the installed transformers that uses the registry."""
    models = Path(transformers.__file__).parent / "models"
    types = _model_types_by_family()
    families: dict[str, tuple[ExpertsClass, ...]] = {}
    for path in sorted(models.glob("*/modeling_*.py")):
        family = path.parent.name
        found = _DECORATED.findall(path.read_text(encoding="utf-8"))
        if found and family in types:
            model_type = _pick_model_type(family, types[family])
            families[family] = tuple(ExpertsClass(family, model_type, name, flags.strip()) for flags, name in found)
    return families


# Whole models: the experts fields above plus attention, layers and vocabulary (MLA sizes for DeepSeek-likes).
_TINY_MODEL_FIELDS = dict(
    _TINY_FIELDS, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    max_position_embeddings=256, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16,
    v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, initializer_range=0.1,
)
_PER_LAYER_LISTS = ("layer_types", "mlp_layer_types")


def _shrink(config, fields: dict) -> None:
    layers_before = getattr(config, "num_hidden_layers", None)
    for name, value in fields.items():
        try:
            current = getattr(config, name)
        except Exception:  # noqa: BLE001 - absent, or a per-layer field read globally
            continue
        if isinstance(current, (list, tuple)) and current and all(isinstance(v, int) for v in current):
            value = [value] * len(current)
        elif current is not None and not isinstance(current, (int, float)) or isinstance(current, bool):
            continue
        try:
            setattr(config, name, value)
        except Exception:  # noqa: BLE001 - a derived or read-only field
            continue
    for name in _PER_LAYER_LISTS:
        current = getattr(config, name, None)
        if isinstance(current, list) and layers_before and len(current) == layers_before:
            try:
                setattr(config, name, current[: config.num_hidden_layers])
            except AttributeError:  # derived from other fields (jamba): follows the layer count by itself
                pass


def _tiny_text_config(model_type: str):
    config = transformers.AutoConfig.for_model(model_type).get_text_config()
    _shrink(config, _TINY_FIELDS)
    return config


def tiny_experts(entry: ExpertsClass, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`entry`'s experts class built on a tiny config, with random weights (std 0.1) and biases."""
    config = _tiny_text_config(entry.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = entry.load()
        # Families with several experts widths (ernie4_5_vl_moe: text and vision) take the width as an argument.
        if "intermediate_size" in inspect.signature(cls.__init__).parameters:
            experts = cls(config, intermediate_size=TINY_WIDTH)
        else:
            experts = cls(config)
        with torch.no_grad():
            for parameter in experts.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    experts.config._experts_implementation = "eager"
    return experts.to(dtype).eval()


def tiny_causal_lm(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer random causal LM of `family` (a key of `experts_families()`), in `.eval()`, built from
    its default config shrunk field by field; raises what transformers raises where that does not build."""
    entry = experts_families()[family][0]
    config = transformers.AutoConfig.for_model(entry.model_type)
    _shrink(config, _TINY_MODEL_FIELDS)
    if config.get_text_config() is not config:
        _shrink(config.get_text_config(), _TINY_MODEL_FIELDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def experts_hidden_size(experts) -> int:
    """H of an experts module, read from its down projection ([E, H, I], or [E, I, H] when transposed)."""
    return int(experts.down_proj.shape[2 if getattr(experts, "is_transposed", False) else 1])


def refusal_reason(entry: ExpertsClass) -> str | None:
    """Why moe_lab's backends refuse `entry`'s layout (the message its registered backends raise), or None."""
    cls = entry.load()
    stand_in = cls.__new__(cls)  # the decorator's flags without building anything
    torch.nn.Module.__init__(stand_in)
    flags = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
                 has_post_expert_norm=False)
    for item in filter(None, (part.strip() for part in entry.flags.split(","))):
        name, _, value = item.partition("=")
        flags[name.strip()] = value.strip() == "True"
    for name, value in flags.items():
        setattr(stand_in, name, value)
    stand_in._is_expert_parallel = False
    try:
        _check_supported(stand_in, "moe_lab_<backend>")
    except BackendInputError as error:
        return str(error)
    return None
