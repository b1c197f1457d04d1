"""Routing: which experts each token goes to, with what weight, and how even the load is.

A router turns hidden states [T, H] into logits [T, E], scores them (softmax or sigmoid), picks
the top_k experts per token and returns `top_k_index` [T, k] (int64) and `top_k_weights` [T, k]
(the scores of the picked experts, optionally renormalised to sum to one) — exactly the two
tensors an experts backend consumes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ROUTER_SCORE_FUNCTIONS, MoEConfig
from .errors import ConfigError


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [T, E] raw router logits
    scores: torch.Tensor  # [T, E] softmax or sigmoid of the logits, float32
    top_k_index: torch.Tensor  # [T, k] int64 expert ids, best first
    top_k_weights: torch.Tensor  # [T, k] float32 routing weights


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    score: str = "softmax",
    norm_topk_prob: bool = True,
    score_bias: torch.Tensor | None = None,
) -> RouterOutput:
    """Score `logits` [T, E] and pick `top_k` experts per token.

    `score_bias` [E] (DeepSeek-V3's auxiliary-loss-free load balancing) shifts which experts are
    *selected* but not the weights they get: the weights are the unbiased scores.
    """
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
    if score not in ROUTER_SCORE_FUNCTIONS:
        raise ConfigError(f"unknown router score {score!r}; allowed: {list(ROUTER_SCORE_FUNCTIONS)}")
    # Scores in float32 whatever the model dtype: bf16 softmax over 256 experts loses the ranking.
    logits32 = logits.float()
    scores = logits32.softmax(dim=-1) if score == "softmax" else logits32.sigmoid()
    selection = scores if score_bias is None else scores + score_bias.float()
    _, top_k_index = torch.topk(selection, top_k, dim=-1)  # [T, k]
    top_k_weights = scores.gather(-1, top_k_index)  # [T, k]
    if norm_topk_prob:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return RouterOutput(logits, scores, top_k_index, top_k_weights)


class TopKRouter(nn.Module):
    """A linear router [H -> E] followed by `route`; `score_bias` is a buffer, not a parameter."""

    def __init__(self, config: MoEConfig, *, use_score_bias: bool | None = None):
        super().__init__()
        self.config = config
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=config.dtype))
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)
        if use_score_bias is None:
            use_score_bias = config.router_score == "sigmoid"
        self.register_buffer("score_bias", torch.zeros(config.num_experts) if use_score_bias else None)

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        logits = nn.functional.linear(hidden_states, self.weight)  # [T, E]
        return route(
            logits, self.top_k, score=self.config.router_score,
            norm_topk_prob=self.config.norm_topk_prob, score_bias=self.score_bias,
        )


def load_balancing_loss(routing: RouterOutput) -> torch.Tensor:
    """The auxiliary load-balancing loss of Switch Transformer (as transformers' `load_balancing_loss_func`
    computes it for Mixtral / Qwen-MoE): E * sum_e f_e * P_e, where f_e is the fraction of the T*k
    (token, slot) picks that went to expert e and P_e the mean router score of expert e over the tokens.

    f_e comes from the top-k choice (not differentiable); P_e carries the gradient, so minimising the
    loss pushes the router's scores away from the experts that are picked most. It is 1 for a perfectly
    even load (every f_e = P_e = 1/E) and approaches E when one expert gets everything. A scalar,
    float32; 0 for zero tokens.
    """
    num_tokens, num_experts = routing.scores.shape
    if num_tokens == 0:
        return routing.scores.sum() * 0.0
    picks = torch.zeros_like(routing.scores).scatter_add_(
        1, routing.top_k_index, torch.ones_like(routing.top_k_index, dtype=routing.scores.dtype))  # [T, E]
    fraction_picked = picks.mean(dim=0) / routing.top_k_index.shape[1]  # [E], sums to 1
    mean_score = routing.scores.mean(dim=0)  # [E]
    return num_experts * (fraction_picked * mean_score).sum()


# ----------------------------------------------------------------------------- statistics


@dataclass
class RoutingStats:
    tokens_per_expert: list[int]  # [E] (token, expert) pairs each expert received
    num_tokens: int
    top_k: int
    experts_hit: int  # experts that received at least one token
    max_load: int
    mean_load: float
    imbalance: float  # max / mean load: 1.0 is perfectly even, E/k... is everything on one expert
    entropy: float  # of the load distribution, nats
    normalized_entropy: float  # entropy / log(E): 1.0 is uniform, 0.0 is one expert

    @property
    def num_experts(self) -> int:
        return len(self.tokens_per_expert)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"num_experts": self.num_experts}


def tokens_per_expert(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 count of (token, expert) pairs per expert; no host sync."""
    flat = top_k_index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))


def routing_stats(top_k_index: torch.Tensor, num_experts: int) -> RoutingStats:
    counts = tokens_per_expert(top_k_index, num_experts).cpu()
    total = int(counts.sum())
    mean = total / num_experts
    probs = counts.double() / max(total, 1)
    nonzero = probs[probs > 0]
    entropy = float(-(nonzero * nonzero.log()).sum()) if total else 0.0
    return RoutingStats(
        tokens_per_expert=counts.tolist(),
        num_tokens=int(top_k_index.shape[0]),
        top_k=int(top_k_index.shape[-1]) if top_k_index.dim() == 2 else 1,
        experts_hit=int((counts > 0).sum()),
        max_load=int(counts.max()) if num_experts else 0,
        mean_load=mean,
        imbalance=float(counts.max()) / mean if total else 0.0,
        entropy=entropy,
        normalized_entropy=entropy / math.log(num_experts) if num_experts > 1 and total else 0.0,
    )


# ----------------------------------------------------------------------------- synthetic routing

DISTRIBUTIONS = ("uniform", "zipf", "single")


def synthetic_routing(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    distribution: str = "uniform",
    skew: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    weights_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing tensors (`top_k_index` [T, k] int64, `top_k_weights` [T, k]) with a chosen load shape.

    - "uniform": every expert equally likely.
    - "zipf": expert e is picked with probability proportional to 1 / (e + 1) ** skew, so skew=0 is
      uniform and larger skew piles tokens onto the first experts.
    - "single": every token sends its first choice to expert 0 (the rest of its top_k go to
      experts 1..k-1): the worst case for load balance.
    Each token's experts are distinct, as a real top-k router guarantees. Weights are positive and
    sum to one per token.
    """
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown routing distribution {distribution!r}; allowed: {list(DISTRIBUTIONS)}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if num_tokens < 0:
        raise ConfigError(f"num_tokens must be >= 0, got {num_tokens}")
    if skew < 0:
        raise ConfigError(f"skew must be >= 0, got {skew}")
    generator = torch.Generator().manual_seed(seed)
    if distribution == "single":
        top_k_index = torch.arange(top_k).expand(num_tokens, top_k).clone()
    else:
        exponent = skew if distribution == "zipf" else 0.0
        probs = (torch.arange(1, num_experts + 1, dtype=torch.float64) ** -exponent)
        if num_tokens:
            top_k_index = torch.multinomial(probs.expand(num_tokens, num_experts), top_k, generator=generator)
        else:
            top_k_index = torch.empty(0, top_k, dtype=torch.int64)
    logits = torch.randn(num_tokens, top_k, generator=generator)
    top_k_weights = logits.softmax(dim=-1).to(weights_dtype)
    return top_k_index.to(device), top_k_weights.to(device)
