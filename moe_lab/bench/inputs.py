"""Random, reproducible inputs for measurements: never zeros (zeros make some kernels faster).

Weights come from `Experts.reset_parameters` (normal, std = fan_in^-1/2), hidden states from
`torch.randn`, routing from `moe_lab.synthetic_routing`; all seeded without disturbing the
caller's global random state.
"""
from __future__ import annotations

import contextlib

import torch

from ..modules import Experts
from ..routing import synthetic_routing, tokens_per_expert


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """torch.manual_seed(seed) inside; the global CPU (and CUDA) RNG state restored afterwards."""
    cuda_devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def build_experts(config, device: torch.device, seed: int = 0, implementation: str = "grouped_mm") -> Experts:
    """An `Experts` layer allocated directly on `device`, with seeded random weights."""
    with seeded(device, seed), torch.device(device):
        return Experts(config, experts_implementation=implementation)


class TransposedStorageExperts(torch.nn.Module):
    """The values of an `Experts` layer stored as transformers' `is_transposed` modules (gpt-oss) store them:
    gate_up_proj [E, H, 2I], down_proj [E, I, H]; no biases, the layer's activation. The backends read it as
    they read such a module, so the same layer can be timed or checked in both layouts."""

    is_transposed = True
    has_bias = False

    def __init__(self, experts: Experts):
        super().__init__()
        self.config, self.num_experts, self.act_fn = experts.config, experts.num_experts, experts.act_fn
        self.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous(),
                                               requires_grad=experts.gate_up_proj.requires_grad)  # [E, H, 2I]
        self.down_proj = torch.nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous(),
                                            requires_grad=experts.down_proj.requires_grad)  # [E, I, H]


def random_hidden_states(num_tokens: int, config, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[T, H] standard-normal hidden states in the config's dtype."""
    with seeded(device, seed + 1):
        return torch.randn(num_tokens, config.hidden_size, device=device, dtype=config.dtype)


def random_routing(num_tokens: int, config, device: torch.device, *, distribution: str = "uniform",
                   skew: float = 1.0, seed: int = 0):
    """(top_k_index [T, k], top_k_weights [T, k] float32, tokens per expert as a list of E ints)."""
    index, weights = synthetic_routing(num_tokens, config.num_experts, config.top_k, distribution=distribution,
                                       skew=skew, seed=seed)
    groups = tokens_per_expert(index, config.num_experts).tolist()  # on CPU: no device sync
    return index.to(device), weights.to(device), groups
