"""Whole transformers MoE models for end-to-end runs: random weights from a shipped config, built
directly on the target device, or a real checkpoint through the very same call.

    model = build_model("qwen3-30b-a3b", device="cuda", dtype=torch.bfloat16)           # random, 48 layers
    model = build_model("deepseek-v3", device="cuda", num_layers=4)                     # where it fits
    model = build_model("Qwen/Qwen3-30B-A3B", pretrained=True, device="cuda",
                        experts_implementation="moe_lab_triton")                        # the checkpoint

Random weights are created and initialised on `device` (`with torch.device(device)`): nothing is
allocated on the host first, so a 60 GB model is built in seconds on a GPU. A checkpoint goes
through `from_pretrained(name_or_path, experts_implementation=..., dtype=..., device_map=device)`
(`device_map` needs the accelerate package; without it the checkpoint is read on the host, then moved);
moe_lab's backends must be registered in transformers first (`register_with_transformers()`, which
this function does when the name asks for one).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import transformers

from .real_configs import full_layer_count, real_config, real_config_names
from .registry import DEFAULT_PREFIX, register_with_transformers


@dataclass(frozen=True)
class BuiltModel:
    """A model and what it is: `layers` of `full_layers` (fewer when reduced to fit), random or loaded."""

    model: torch.nn.Module
    name: str
    layers: int
    full_layers: int
    weights: str  # "random" or "pretrained"

    @property
    def reduced(self) -> bool:
        return self.layers < self.full_layers

    def describe(self) -> str:
        size = (f"{self.layers} of its {self.full_layers} layers (reduced)" if self.reduced
                else f"all {self.layers} layers")
        return f"{self.name}: {size}, {self.weights} weights, {parameter_bytes(self.model) / 2**30:.1f} GiB"


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _auto_class(config):
    # Vision-language models (a text_config and a vision_config) are image-text-to-text models.
    if hasattr(config, "vision_config") and getattr(config, "vision_config", None) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def _register_if_needed(experts_implementation) -> None:
    names = (experts_implementation.values() if isinstance(experts_implementation, dict)
             else [experts_implementation])
    if any(isinstance(name, str) and name.startswith(DEFAULT_PREFIX) for name in names):
        register_with_transformers()


def build_model(name_or_path: str, *, device="cpu", dtype: torch.dtype = torch.bfloat16,
                num_layers: int | None = None, experts_implementation=None, pretrained: bool = False,
                seed: int = 0, **config_overrides) -> BuiltModel:
    """A transformers model in `.eval()`: random weights from a shipped config (`real_config_names()`),
    or, with `pretrained=True`, a checkpoint (a Hub name or a local folder) through `from_pretrained`.

    `num_layers` keeps the first layers only (random weights only: a checkpoint is loaded whole).
    `experts_implementation`: a name ("grouped_mm", "moe_lab_triton", ...) or a dict keyed by
    sub-config ({"text_config": ..., "": ...}), as transformers takes it. `seed` fixes the random
    weights (the global RNG is left as it was).
    """
    _register_if_needed(experts_implementation)
    kwargs = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if pretrained:
        if num_layers is not None:
            raise ValueError("num_layers applies to random-weight models; a checkpoint is loaded with all its layers")
        if importlib.util.find_spec("accelerate") is not None:  # transformers places weights with it
            kwargs["device_map"] = torch.device(device)
        model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, **config_overrides, **kwargs)
        model = model.to(device)  # without accelerate: loaded on the host, then moved
        layers = model.config.get_text_config().num_hidden_layers
        return BuiltModel(model.eval(), name_or_path, layers, layers, "pretrained")
    if name_or_path not in real_config_names():
        raise ValueError(f"{name_or_path!r} is not a config shipped with moe_lab ({list(real_config_names())}); "
                         "to load a checkpoint pass pretrained=True")
    config = real_config(name_or_path, num_layers=num_layers, **config_overrides)
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = _auto_class(config).from_config(config, **kwargs)
    layers = config.get_text_config().num_hidden_layers
    return BuiltModel(model.eval(), name_or_path, layers, full_layer_count(name_or_path), "random")
