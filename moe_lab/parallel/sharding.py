"""Which experts live on which rank: contiguous blocks of E / world experts.

    rank 0: experts [0, E/w)   rank 1: [E/w, 2E/w)   ...   rank w-1: [E - E/w, E)

A contiguous block makes the destination of a (token, expert) pair one integer division
(expert // experts_per_rank) and keeps a rank's pairs contiguous once they are sorted by expert,
so the dispatch needs no second permutation. Uneven blocks are refused rather than guessed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MoEConfig
from ..errors import ConfigError
from ..modules import Experts


@dataclass(frozen=True)
class ExpertShard:
    """The experts one rank holds: global ids [first, first + count)."""

    rank: int
    world_size: int
    num_experts: int  # E, over all ranks

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside the group of {self.world_size} ranks")
        if self.num_experts % self.world_size:
            divisors = [w for w in range(1, self.num_experts + 1) if self.num_experts % w == 0]
            raise ConfigError(
                f"{self.num_experts} experts cannot be split evenly over {self.world_size} ranks; "
                f"expert parallelism here needs a world size that divides the expert count: one of {divisors}"
            )

    @property
    def count(self) -> int:
        """E / world: experts on every rank."""
        return self.num_experts // self.world_size

    @property
    def first(self) -> int:
        return self.rank * self.count

    @property
    def experts(self) -> range:
        return range(self.first, self.first + self.count)


def local_config(config: MoEConfig, shard: ExpertShard) -> MoEConfig:
    """The config of one rank's `Experts`: its E/world experts. The local layer is always called with
    one expert per row (top_k 1), so top_k is capped at the local expert count to stay a valid config."""
    if config.num_experts != shard.num_experts:
        raise ConfigError(f"shard is for {shard.num_experts} experts but the config has {config.num_experts}")
    return config.replace(num_experts=shard.count, top_k=min(config.top_k, shard.count))


def local_experts(config: MoEConfig, shard: ExpertShard, experts_implementation: str,
                  device: torch.device | str | None = None) -> Experts:
    """A fresh `Experts` holding only this rank's block, its weights allocated directly on `device`
    (deepseek-v3's whole layer is ~22 GB in bf16: a rank never materialises the other ranks' blocks)."""
    with torch.device(device if device is not None else "cpu"):
        return Experts(local_config(config, shard), experts_implementation)


@torch.no_grad()
def copy_shard(full: Experts, local: Experts, shard: ExpertShard) -> None:
    """Copy this rank's block out of a single-process `Experts` [E, ...] into `local` [E/world, ...]."""
    if full.num_experts != shard.num_experts:
        raise ConfigError(f"the experts module has {full.num_experts} experts, the shard expects {shard.num_experts}")
    block = slice(shard.first, shard.first + shard.count)
    local.gate_up_proj.copy_(full.gate_up_proj[block])  # [E/w, 2I, H]
    local.down_proj.copy_(full.down_proj[block])  # [E/w, H, I]
