"""transformers' own experts backends, run on a moe_lab layer's weights, as moe_lab `BackendSpec`s.

The bench times them beside moe_lab's (`moe-lab bench --compare-hf`) under the names
"transformers:eager", "transformers:batched_mm" and "transformers:grouped_mm"
(`moe_lab.bench.implementations` resolves such names here). Each runs a real transformers
`Qwen2MoeExperts` module whose parameters ARE the moe_lab layer's parameters (no copy), dispatched
by transformers' own `config._experts_implementation` — the same inputs, timer and rules for both
libraries. The one rule added: transformers' batched_mm has no memory guard, so the same gather
budget as moe_lab's is applied (over it, the bench's row is "refused", not an out-of-memory).

These entries are not in moe_lab's registry: they exist to be measured, not to be chosen.
"""
from __future__ import annotations

import functools
import weakref

import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

from ..backends import BackendSpec, Where, expert_weights, get_batched_mm_budget, predict_gather_bytes
from ..backends.grouped_mm import grouped_mm_path
from ..backends.spec import Support, no, yes
from ..errors import GatherBudgetError

LIBRARY = "transformers"
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_twins: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def transformers_twin(experts) -> Qwen2MoeExperts:
    """A transformers `Qwen2MoeExperts` sharing the moe_lab `experts`' parameters (built on the meta
    device, then given the very same Parameter objects: no copy, same data)."""
    twin = _twins.get(experts)
    if twin is None:
        cfg = experts.config
        hf_config = Qwen2MoeConfig(
            hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k, hidden_act=_HF_ACTIVATION[cfg.activation],
        )
        with torch.device("meta"):
            twin = Qwen2MoeExperts(hf_config)
        twin.gate_up_proj = experts.gate_up_proj
        twin.down_proj = experts.down_proj
        _twins[experts] = twin
    return twin


def _forward(implementation: str):
    def transformers_backend(experts, hidden_states, top_k_index, top_k_weights):
        if implementation == "batched_mm":
            num_tokens, top_k = top_k_index.shape
            weights = expert_weights(experts)
            predicted = predict_gather_bytes(num_tokens, top_k, weights.hidden_size, weights.intermediate_size,
                                             hidden_states.dtype)
            if predicted > get_batched_mm_budget():
                raise GatherBudgetError(predicted, get_batched_mm_budget(),
                                        "the same budget is applied to transformers' batched_mm")
        twin = transformers_twin(experts)
        twin.config._experts_implementation = implementation
        return twin(hidden_states, top_k_index, top_k_weights)

    transformers_backend.__name__ = f"transformers_{implementation}"
    transformers_backend.__doc__ = f"transformers' own `{implementation}` experts forward (for comparison)."
    return transformers_backend


def _grouped_mm_sync_free(where: Where) -> Support:
    path = grouped_mm_path(where.device, where.dtype, where.hidden_size or 64, where.intermediate_size or 64)
    if path.native:
        return yes(f"torch's fused grouped GEMM ({path.reason})")
    return no(f"{path.reason}: the offsets are read on the host")


_TORCH_OPS = yes("torch ops only")
_CAPABILITIES = {
    # transformers' eager finds each expert's tokens with torch.where on the device, then loops on the host.
    "eager": dict(autograd=_TORCH_OPS, cuda_graph=no("loops over the experts hit, read on the host"),
                  fullgraph=no("its loop bounds are read on the host: a graph break"),
                  sync_free=no("reads which experts were hit on the host")),
    "batched_mm": dict(autograd=_TORCH_OPS, cuda_graph=yes("every shape follows from T and k"),
                       fullgraph=yes("every shape follows from T and k"), sync_free=yes("every shape follows from T and k")),
    "grouped_mm": dict(autograd=_TORCH_OPS, cuda_graph=_grouped_mm_sync_free,
                       fullgraph=yes("torch.compile traces torch's grouped_mm"), sync_free=_grouped_mm_sync_free),
}


@functools.cache
def comparison_spec(implementation: str) -> BackendSpec:
    """transformers' `implementation` ("eager", "batched_mm" or "grouped_mm") as a BackendSpec named
    "transformers:<implementation>", to run on a moe_lab `Experts` layer."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"transformers' experts backends compared here are {list(IMPLEMENTATIONS)}, "
                         f"not {implementation!r}")
    return BackendSpec(
        name=f"{LIBRARY}:{implementation}", forward=_forward(implementation),
        summary=f"transformers' own {implementation} experts forward, on the moe_lab layer's weights",
        runs=yes("torch ops only"), **_CAPABILITIES[implementation])
