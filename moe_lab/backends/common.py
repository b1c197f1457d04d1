"""What every experts backend shares: input checks, the weight layout, the gated activation.

Weight layout is transformers' default, so a transformers experts module can be handed to a
moe_lab backend unchanged:
    gate_up_proj [E, 2I, H]  (gate rows first, then up rows)
    down_proj    [E, H, I]
transformers modules flagged `is_transposed` store [E, H, 2I] and [E, I, H]; those flagged
`has_bias` add `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H]. Both are read here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BackendInputError


@dataclass
class ExpertWeights:
    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]
    gate_up_bias: torch.Tensor | None  # [E, 2I]
    down_bias: torch.Tensor | None  # [E, H]

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate_up.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[2]


def expert_weights(experts) -> ExpertWeights:
    if getattr(experts, "has_gate", True) is False:
        raise BackendInputError(
            f"{type(experts).__name__} has no gate (has_gate=False); moe_lab backends implement gated experts "
            "(gate_up_proj [E, 2I, H] + down_proj [E, H, I])"
        )
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(-2, -1), down.transpose(-2, -1)
    has_bias = getattr(experts, "has_bias", False)
    return ExpertWeights(
        gate_up=gate_up,
        down=down,
        gate_up_bias=getattr(experts, "gate_up_proj_bias", None) if has_bias else None,
        down_bias=getattr(experts, "down_proj_bias", None) if has_bias else None,
    )


def needs_grad(experts, hidden_states, top_k_weights) -> bool:
    """Grad mode is on and any of the hidden states, the routing weights or the experts' parameters
    (biases included) requires grad: the call must give gradients."""
    if not torch.is_grad_enabled():
        return False
    if hidden_states.requires_grad or top_k_weights.requires_grad:
        return True
    return any(getattr(getattr(experts, name, None), "requires_grad", False)
               for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"))


def apply_gate(experts, gate_up: torch.Tensor) -> torch.Tensor:
    """[S, 2I] -> [S, I]: act(gate) * up, or the module's own gate (transformers' `_apply_gate`)."""
    custom_gate = getattr(experts, "_apply_gate", None)
    if custom_gate is not None:
        return custom_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sum the top_k contributions in at least float32: bf16 sums of 8 terms lose ~2 bits."""
    return torch.promote_types(dtype, torch.float32)


def sum_over_top_k(y_by_pair: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """[S, H] rows in (token, slot) order -> [T, H]: each token's k weighted rows summed.

    torch's sum of a bfloat16/float16 tensor accumulates in float32 and rounds once at the end
    (on CPU and CUDA), so the k terms stay in the model dtype — half the bytes of a float32 copy —
    without a half-precision accumulation.

    With one slot per token the rows already are the output: a view, not a reduction that would copy
    every row once more (expert parallelism's local experts always run with top_k = 1)."""
    if top_k == 1:
        return y_by_pair.view(num_tokens, y_by_pair.shape[-1])
    return y_by_pair.view(num_tokens, top_k, y_by_pair.shape[-1]).sum(dim=1)


def expert_counts(expert_of_pair: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[S] int32 expert ids -> [E] pairs per expert, as one histogram kernel (a scatter-add count
    takes three: zeros, ones, scatter) and without a host sync. CUDA's histc counts the int32 ids;
    the CPU's wants floats. Bins of width (E-1)/E over [0, E-1] put id e in bin e."""
    if num_experts == 1:  # histc with min == max reads the data's range on the host: a sync
        return expert_of_pair.new_full((1,), expert_of_pair.numel())
    ids = expert_of_pair if expert_of_pair.is_cuda else expert_of_pair.float()
    return torch.histc(ids, bins=num_experts, min=0, max=num_experts - 1)


def check_inputs(experts, hidden_states, top_k_index, top_k_weights, *, absent_ids: bool = False) -> None:
    """Raise `BackendInputError` (a ValueError) saying what is wrong and what is expected.

    `absent_ids`: the inputs of a `partial_forward` entry, where an id >= num_experts means "this expert is not
    here" (expert parallelism): such ids, and more slots per token than there are experts, are allowed.

    Only metadata is read (no host-device sync), except the expert-id range check, which runs on
    CPU tensors only: on a GPU it would cost a sync per call. There an out-of-range id is not
    caught: the gathering backends (eager, batched_mm) stop at a device-side assert; grouped_mm leaves
    the pair out of the histogram (as transformers' grouped_mm does on purpose for expert-parallel
    sentinels) and sums a row no GEMM wrote, so its output is wrong without an error; triton's sorted
    path skips the slot, which contributes nothing (its `partial_forward` always takes that path), and
    its decode path (a few tokens) would read weights past the last expert.
    """
    weights = expert_weights(experts)
    num_experts, hidden = weights.num_experts, weights.hidden_size
    for name, value in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if not isinstance(value, torch.Tensor):
            raise BackendInputError(f"{name} must be a torch.Tensor [tokens, top_k], got {type(value).__name__}")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
        raise BackendInputError(
            f"hidden_states must be a 2-D tensor [tokens, hidden_size={hidden}], got {shape}; "
            "flatten (batch, seq, hidden) inputs first (SparseMoeBlock does this for you)"
        )
    if hidden_states.shape[1] != hidden:
        raise BackendInputError(
            f"hidden_states has hidden size {hidden_states.shape[1]} but the experts expect {hidden}"
        )
    num_tokens = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != num_tokens:
        raise BackendInputError(
            f"top_k_index must be [tokens={num_tokens}, top_k], got {tuple(top_k_index.shape)}"
        )
    if top_k_weights.shape != top_k_index.shape:
        raise BackendInputError(
            f"top_k_weights shape {tuple(top_k_weights.shape)} must equal top_k_index shape "
            f"{tuple(top_k_index.shape)}"
        )
    if top_k_index.dtype not in (torch.int64, torch.int32):
        # uint8 would index as a boolean mask and int8/int16 are rejected by advanced indexing.
        raise BackendInputError(f"top_k_index must hold integer expert ids (int64 or int32), got {top_k_index.dtype}")
    if not top_k_weights.dtype.is_floating_point:
        raise BackendInputError(f"top_k_weights must be floating point, got {top_k_weights.dtype}")
    if top_k_index.shape[1] > num_experts and not absent_ids:
        raise BackendInputError(f"top_k={top_k_index.shape[1]} exceeds the number of experts ({num_experts})")
    if hidden_states.dtype != weights.gate_up.dtype:
        raise BackendInputError(
            f"hidden_states dtype {hidden_states.dtype} differs from the expert weights' dtype "
            f"{weights.gate_up.dtype}; cast one of them (e.g. hidden_states.to({weights.gate_up.dtype}))"
        )
    devices = {t.device for t in (hidden_states, top_k_index, top_k_weights, weights.gate_up, weights.down)}
    if len(devices) > 1:
        raise BackendInputError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if top_k_index.device.type == "cpu" and top_k_index.numel() and not torch.compiler.is_compiling():
        low, high = int(top_k_index.min()), int(top_k_index.max())
        if low < 0 or (high >= num_experts and not absent_ids):
            valid = f"0..{num_experts - 1}" + (f", or >= {num_experts} for an absent expert" if absent_ids else "")
            raise BackendInputError(f"top_k_index holds expert ids in [{low}, {high}] but valid ids are {valid}")
