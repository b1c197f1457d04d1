"""The published `config.json` of real MoE models, kept in the package (moe_lab/hf/configs/), as
transformers configs: full size, or with fewer layers where a whole model does not fit.

Each file is the model's config.json (architecture fields) plus a `_source` entry: the model, the
URL of the file, its licence and how it was checked. Nothing here downloads anything.

    real_config_names()                      -> ["deepseek-v3", "gpt-oss-20b", ...]
    real_config("qwen3-30b-a3b")             -> a transformers Qwen3MoeConfig, 48 layers
    real_config("deepseek-v3", num_layers=4) -> the same model with its first 4 layers only
    config_source("qwen3-30b-a3b")           -> {"model", "url", "licence", "note"}

The expert shapes agree with `moe_lab.presets` (tests/test_real_configs.py checks it).
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources

import transformers

SOURCE_KEY = "_source"
# Entries of the published files that describe how the released weights are stored, not the model:
# random-weight models are built in the dtype asked for, so these are left out of the config.
_WEIGHT_STORAGE_KEYS = ("quantization_config", "torch_dtype", "dtype")
# Per-layer lists that must shrink with the layer count.
_PER_LAYER_LISTS = ("layer_types",)


@lru_cache(maxsize=None)
def real_config_names() -> tuple[str, ...]:
    """The names of the configs shipped with moe_lab (the file names without .json), sorted."""
    folder = resources.files(__package__).joinpath("configs")
    return tuple(sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".json")))


def _check_name(name: str) -> str:
    if name not in real_config_names():
        raise ValueError(f"unknown real model config {name!r}; shipped with moe_lab: {list(real_config_names())} "
                         "(for a checkpoint on disk or on the Hub, pass its path or name to build_model(..., "
                         "pretrained=True))")
    return name


@lru_cache(maxsize=None)
def _read(name: str) -> dict:
    text = resources.files(__package__).joinpath("configs", f"{_check_name(name)}.json").read_text()
    return json.loads(text)


def real_config_dict(name: str) -> dict:
    """The shipped file as a dict (a copy), `_source` included."""
    return copy.deepcopy(_read(name))


def config_source(name: str) -> dict:
    """Where the file came from: {"model", "url", "licence", "note"}."""
    return dict(_read(name)[SOURCE_KEY])


def _without_storage(fields: dict) -> dict:
    return {key: value for key, value in fields.items() if key not in _WEIGHT_STORAGE_KEYS and key != SOURCE_KEY}


def _shrink_layers(fields: dict, num_layers: int) -> dict:
    total = fields["num_hidden_layers"]
    fields["num_hidden_layers"] = num_layers
    for key in _PER_LAYER_LISTS:
        if isinstance(fields.get(key), list) and len(fields[key]) == total:
            fields[key] = fields[key][:num_layers]
    return fields


def text_fields(fields: dict) -> dict:
    """The part of a config that holds the decoder layers: `text_config` for multimodal models, else itself."""
    return fields["text_config"] if isinstance(fields.get("text_config"), dict) else fields


def full_layer_count(name: str) -> int:
    """The model's number of decoder layers as published."""
    return int(text_fields(_read(name))["num_hidden_layers"])


def real_config(name: str, *, num_layers: int | None = None, **overrides):
    """The transformers config of a shipped model (`real_config_names()`), optionally with only its
    first `num_layers` decoder layers (1 <= num_layers <= the published count).

    Entries describing how the released weights are stored (`quantization_config`, `torch_dtype`)
    are left out: a model built from this config has random weights in the dtype you ask for.
    `overrides` are config keyword arguments and win (e.g. experts_implementation=...).
    """
    fields = _without_storage(real_config_dict(name))
    if "text_config" in fields:
        fields["text_config"] = _without_storage(fields["text_config"])
    if num_layers is not None:
        total = full_layer_count(name)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an integer from 1 to {total} for {name!r}, got {num_layers!r}")
        _shrink_layers(text_fields(fields), num_layers)
    model_type = fields.pop("model_type")
    fields.pop("architectures", None)
    fields.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **fields)
