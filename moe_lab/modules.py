"""nn.Modules: `Experts` (transformers' weight layout), `GatedMLP`, `SparseMoeBlock`.

Each module that owns experts answers `set_experts_implementation(name)` and
`get_experts_implementation()`; switching only changes which registered function the next
forward calls — no weights move, nothing is rebuilt. An `Experts` layer also takes a
`BackendSpec` that is not registered (the bench runs transformers' own backends this way).
"""
from __future__ import annotations

import torch
from torch import nn

from .backends import BackendSpec, check_inputs, checked_forward, experts_forward, get_backend
from .config import MoEConfig
from .errors import BackendInputError
from .routing import RouterOutput, TopKRouter

DEFAULT_IMPLEMENTATION = "grouped_mm"


def _checked_name(implementation, allow_spec: bool = False):
    if allow_spec and isinstance(implementation, BackendSpec):
        return implementation
    if not isinstance(implementation, str):
        raise ValueError(
            f"experts_implementation must be a backend name (str) here, got {type(implementation).__name__}; "
            "per-sub-config dicts are accepted by models with sub-configs"
        )
    get_backend(implementation)  # unknown -> ValueError naming the registered ones
    return implementation


class Experts(nn.Module):
    """`num_experts` gated MLPs stored as two 3-D parameters, dispatched to a registered backend.

    gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]:
        expert_e(x) = down_proj[e] @ (act(gate_up_proj[e, :I] @ x) * (gate_up_proj[e, I:] @ x))
    """

    def __init__(self, config: MoEConfig, experts_implementation: str = DEFAULT_IMPLEMENTATION):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.act_fn = config.act_fn
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, dtype=config.dtype))
        self.down_proj = nn.Parameter(torch.empty(E, H, I, dtype=config.dtype))
        self.reset_parameters()
        self.experts_implementation = _checked_name(experts_implementation, allow_spec=True)

    def reset_parameters(self) -> None:
        # Unit-variance activations through each projection (fan-in init), so outputs stay O(1).
        nn.init.normal_(self.gate_up_proj, std=self.hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=self.intermediate_size**-0.5)

    def set_experts_implementation(self, implementation) -> None:
        """A registered backend's name, or an unregistered `BackendSpec`."""
        self.experts_implementation = _checked_name(implementation, allow_spec=True)

    def get_experts_implementation(self):
        return self.experts_implementation

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """[T, H], [T, k], [T, k] -> [T, H] through the current backend."""
        implementation = self.experts_implementation
        if isinstance(implementation, str):
            return experts_forward(implementation, self, hidden_states, top_k_index, top_k_weights)
        check_inputs(self, hidden_states, top_k_index, top_k_weights)
        return checked_forward(implementation, self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        implementation = getattr(self.experts_implementation, "name", self.experts_implementation)
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, experts_implementation={implementation!r}")


class GatedMLP(nn.Module):
    """A dense gated MLP (the shared expert): down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn, dtype: torch.dtype):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, dtype=dtype)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act_fn(gate) * up)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ an optional shared expert with a sigmoid gate, as in Qwen2-MoE).

    Accepts [T, H] or [B, S, H] and returns the same shape.
    """

    def __init__(self, config: MoEConfig, experts_implementation: str = DEFAULT_IMPLEMENTATION):
        super().__init__()
        self.config = config
        self.router = TopKRouter(config)
        self.experts = Experts(config, experts_implementation)
        if config.has_shared_expert:
            self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size,
                                          config.act_fn, config.dtype)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, dtype=config.dtype)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def set_experts_implementation(self, implementation: str) -> None:
        self.experts.set_experts_implementation(implementation)

    def get_experts_implementation(self) -> str:
        return self.experts.get_experts_implementation()

    def forward(self, hidden_states: torch.Tensor, return_router_output: bool = False):
        H = self.config.hidden_size
        if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != H:
            raise BackendInputError(
                f"SparseMoeBlock expects [tokens, {H}] or [batch, seq, {H}], got {tuple(hidden_states.shape)}"
            )
        if hidden_states.dtype != self.config.dtype:
            raise BackendInputError(
                f"SparseMoeBlock holds {self.config.dtype} weights but got {hidden_states.dtype} hidden states; "
                f"cast them (hidden_states.to({self.config.dtype}))"
            )
        flat = hidden_states.reshape(-1, H)  # [T, H]
        routing: RouterOutput = self.router(flat)
        output = self.experts(flat, routing.top_k_index, routing.top_k_weights)  # [T, H]
        if self.shared_expert is not None:
            output = output + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        output = output.view(hidden_states.shape)
        return (output, routing) if return_router_output else output
