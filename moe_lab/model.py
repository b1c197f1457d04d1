"""A tiny two-backbone MoE model, so per-sub-config experts implementations mean something.

    pixel patches [B, P, patch_dim] -> vision backbone (vision_config MoE layers) -> project to text width
    input ids     [B, S]            -> embeddings
    [vision tokens ; text tokens]   -> text backbone (text_config MoE layers)  -> logits [B, P+S, vocab]

Layers are pre-norm residual MoE blocks without attention: the experts are the subject here.
The implementation vocabulary is transformers': `experts_implementation=` at construction and
`set_experts_implementation(...)` take a str (every backbone) or a dict keyed by sub-config name
("text_config", "vision_config"), where "" is the global key. In transformers "" sets the top-level
model's own experts and unnamed sub-configs keep their value; this model's top level owns no
experts, so here "" fills in every backbone the dict does not name. `get_experts_implementation()`
returns the same dict shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MoEConfig
from .modules import DEFAULT_IMPLEMENTATION, SparseMoeBlock, _checked_name


@dataclass(frozen=True)
class MultiBackboneConfig:
    text_config: MoEConfig = field(default_factory=lambda: MoEConfig(64, 32, num_experts=8, top_k=2))
    vision_config: MoEConfig = field(default_factory=lambda: MoEConfig(32, 64, num_experts=4, top_k=1))
    vocab_size: int = 128
    patch_dim: int = 48
    num_text_layers: int = 2
    num_vision_layers: int = 1

    sub_configs = ("text_config", "vision_config")

    def __post_init__(self):
        for name in ("vocab_size", "patch_dim", "num_text_layers", "num_vision_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class MoEBackbone(nn.Module):
    def __init__(self, config: MoEConfig, num_layers: int, experts_implementation: str):
        super().__init__()
        self.config = config
        self.norms = nn.ModuleList(nn.RMSNorm(config.hidden_size, dtype=config.dtype) for _ in range(num_layers))
        self.layers = nn.ModuleList(SparseMoeBlock(config, experts_implementation) for _ in range(num_layers))

    def set_experts_implementation(self, implementation: str) -> None:
        for layer in self.layers:
            layer.set_experts_implementation(implementation)

    def get_experts_implementation(self) -> str:
        return self.layers[0].get_experts_implementation()

    def forward(self, hidden_states):  # [B, S, H] -> [B, S, H]
        for norm, layer in zip(self.norms, self.layers):
            hidden_states = hidden_states + layer(norm(hidden_states))
        return hidden_states


class MultiBackboneMoEModel(nn.Module):
    def __init__(self, config: MultiBackboneConfig | None = None,
                 experts_implementation: str | dict = DEFAULT_IMPLEMENTATION):
        super().__init__()
        self.config = config = config or MultiBackboneConfig()
        text, vision = config.text_config, config.vision_config
        self.vision_in = nn.Linear(config.patch_dim, vision.hidden_size, dtype=vision.dtype)
        self.vision_model = MoEBackbone(vision, config.num_vision_layers, DEFAULT_IMPLEMENTATION)
        self.vision_to_text = nn.Linear(vision.hidden_size, text.hidden_size, dtype=text.dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, text.hidden_size, dtype=text.dtype)
        self.text_model = MoEBackbone(text, config.num_text_layers, DEFAULT_IMPLEMENTATION)
        self.lm_head = nn.Linear(text.hidden_size, config.vocab_size, bias=False, dtype=text.dtype)
        self.set_experts_implementation(experts_implementation)

    def _backbones(self) -> dict[str, MoEBackbone]:
        return {"text_config": self.text_model, "vision_config": self.vision_model}

    def set_experts_implementation(self, experts_implementation: str | dict) -> None:
        """A str sets every backbone; a dict sets the backbones it names, "" standing for the rest.

        Every name is checked before anything changes, so a bad dict leaves the model as it was.
        """
        backbones = self._backbones()
        if isinstance(experts_implementation, dict):
            unknown = set(experts_implementation) - set(backbones) - {""}
            if unknown:
                raise ValueError(
                    f"unknown sub-config key(s) {sorted(unknown)}; valid keys: {['', *backbones]}"
                )
            default = experts_implementation.get("")
            chosen = {key: experts_implementation.get(key, default) for key in backbones}
        else:
            chosen = dict.fromkeys(backbones, experts_implementation)
        chosen = {key: _checked_name(name) for key, name in chosen.items() if name is not None}
        for key, name in chosen.items():
            backbones[key].set_experts_implementation(name)

    def get_experts_implementation(self) -> dict[str, str]:
        """{"": common value or None if the backbones differ, "text_config": ..., "vision_config": ...}."""
        per_backbone = {key: backbone.get_experts_implementation() for key, backbone in self._backbones().items()}
        values = set(per_backbone.values())
        return {"": values.pop() if len(values) == 1 else None, **per_backbone}

    def forward(self, input_ids: torch.Tensor, pixel_patches: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] (+ pixel_patches [B, P, patch_dim]) -> logits [B, P+S, vocab]."""
        hidden = self.embed_tokens(input_ids)  # [B, S, H_text]
        if pixel_patches is not None:
            vision = self.vision_model(self.vision_in(pixel_patches))  # [B, P, H_vision]
            hidden = torch.cat([self.vision_to_text(vision), hidden], dim=1)  # [B, P+S, H_text]
        return self.lm_head(self.text_model(hidden))
