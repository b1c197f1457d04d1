"""`MoEConfig`: the shape of one Mixture-of-Experts layer, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import ConfigError

#: Activations a gated expert can use on its gate half (name -> callable on a tensor).
ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}

ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or its name ("bfloat16", "bf16", "fp32", ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "fp64": "float64", "double": "float64"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} (or bf16/fp16/fp32)")
    return DTYPES[name]


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: `num_experts` gated MLPs of width `intermediate_size`, `top_k` per token.

    Field names follow transformers' MoE configs where one exists (`hidden_size`,
    `moe_intermediate_size` -> `intermediate_size`, `num_experts`, `num_experts_per_tok` ->
    `top_k`, `norm_topk_prob`, `hidden_act` -> `activation`).
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    activation: str = "silu"
    norm_topk_prob: bool = True
    router_score: str = "softmax"
    shared_expert_intermediate_size: int = 0
    dtype: torch.dtype | str = torch.float32

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}: "
                "each token picks top_k distinct experts"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; allowed: {sorted(ACTIVATIONS)}")
        if self.router_score not in ROUTER_SCORE_FUNCTIONS:
            raise ConfigError(
                f"unknown router_score {self.router_score!r}; allowed: {list(ROUTER_SCORE_FUNCTIONS)}"
            )
        shared = self.shared_expert_intermediate_size
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise ConfigError(
                f"shared_expert_intermediate_size must be an integer >= 0 (0 = no shared expert), got {shared!r}"
            )
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))

    @property
    def act_fn(self):
        return ACTIVATIONS[self.activation]

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    def replace(self, **changes) -> "MoEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def expert_parameter_count(self) -> int:
        """Parameters of all routed experts: gate_up (2I x H) + down (H x I) each."""
        return self.num_experts * 3 * self.hidden_size * self.intermediate_size
