"""Real MoE layer shapes, each with where it comes from, and a way to shrink one for a CPU.

Numbers are the routed-expert part of each model's published `config.json` on the Hugging Face
Hub (the file named in `source`). Details the experts backends do not see (attention, layer
count, DeepSeek's group-limited routing and routed scaling factor, gpt-oss's clamped SwiGLU and
expert biases) are named in `notes` rather than modelled.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import MoEConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    config: MoEConfig
    source: str
    notes: str = ""


def _preset(name, source, notes="", **fields) -> Preset:
    return Preset(name=name, config=MoEConfig(dtype="bfloat16", **fields), source=source, notes=notes)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset(
            "mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1/config.json",
            "softmax over the top-2 logits, which equals renormalised top-2 softmax probabilities.",
            hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2, norm_topk_prob=True,
        ),
        _preset(
            "qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B/config.json",
            "shared expert of width 5632 gated by a sigmoid, as in transformers' Qwen2MoeSparseMoeBlock.",
            hidden_size=2048, intermediate_size=1408, num_experts=60, top_k=4, norm_topk_prob=False,
            shared_expert_intermediate_size=5632,
        ),
        _preset(
            "qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B/config.json", "fine-grained experts, no shared expert.",
            hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8, norm_topk_prob=True,
        ),
        _preset(
            "olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924/config.json", "no renormalisation of the top-8 weights.",
            hidden_size=2048, intermediate_size=1024, num_experts=64, top_k=8, norm_topk_prob=False,
        ),
        _preset(
            "deepseek-v3", "deepseek-ai/DeepSeek-V3/config.json",
            "sigmoid scores with a load-balancing bias; the real router also limits each token to 4 of 8 "
            "expert groups and scales routed outputs by 2.5 (not modelled). One shared expert of width 2048.",
            hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8, norm_topk_prob=True,
            router_score="sigmoid", shared_expert_intermediate_size=2048,
        ),
        _preset(
            "gpt-oss-20b", "openai/gpt-oss-20b/config.json",
            "the real experts add biases, use a clamped SwiGLU (alpha 1.702, limit 7) on interleaved gate/up "
            "rows, and are stored transposed ([E, H, 2I], [E, I, H]); shapes are exact, the activation here is "
            "plain SiLU and the layout moe_lab's own. The real module is timed end to end (moe-lab e2e).",
            hidden_size=2880, intermediate_size=2880, num_experts=32, top_k=4, norm_topk_prob=True,
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def scale_down(config: MoEConfig | str, hidden_size: int = 64, *, multiple: int = 16, **overrides) -> MoEConfig:
    """Shrink a layer for a CPU, keeping the expert count and top_k, and I/H up to rounding.

    `hidden_size` becomes the new H; the expert and shared widths become their ratio to the real H
    times the new H, rounded to a multiple of `multiple` elements, so every row is a multiple of 16
    bytes and the grouped GEMM kernel's alignment rule holds for every dtype. The rounding moves
    I/H at a small H: qwen3-30b-a3b (I/H 0.375) gets I=16 at H=32 (0.5, and 2I = H) and I=48 at
    H=128 (0.375). Read the result's own widths rather than assuming the ratio. `overrides`
    change any other field.
    """
    if isinstance(config, str):
        config = get_preset(config).config
    if hidden_size % multiple:
        raise ConfigError(f"hidden_size={hidden_size} must be a multiple of {multiple} to keep rows aligned")
    ratio = hidden_size / config.hidden_size
    shared = config.shared_expert_intermediate_size
    fields = dict(
        hidden_size=hidden_size,
        intermediate_size=_round_to(config.intermediate_size * ratio, multiple),
        shared_expert_intermediate_size=_round_to(shared * ratio, multiple) if shared else 0,
        dtype="float32",
    )
    fields.update(overrides)
    return config.replace(**fields)
