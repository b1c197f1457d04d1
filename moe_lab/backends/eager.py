"""`eager`: a Python loop over the experts that received tokens.

The simplest correct backend and the baseline the others are measured against. Its cost is not
the arithmetic but the control flow: Python must know, on the host, how many tokens each expert
got before it can slice them out and launch that expert's matmuls. On a GPU that number lives in
device memory, so reading it is a host-device synchronisation: the CPU stops queueing work and
waits for the GPU to drain. This version pays exactly ONE sync (it reads all group sizes at once);
the textbook version (`torch.where(top_k_index == e)` per expert, as in transformers' eager) pays
one per expert. After the sync it launches ~6 small kernels per expert that received tokens.
"""
from __future__ import annotations

import torch

from ..routing import tokens_per_expert
from .common import accumulation_dtype, apply_gate, expert_weights
from .spec import BackendSpec, no, yes


def eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    weights = expert_weights(experts)  # gate_up [E, 2I, H], down [E, H, I]

    # Group the T*k (token, expert) pairs by expert; a stable sort keeps token order inside a group.
    expert_of_pair = top_k_index.reshape(-1)  # [S = T*k]
    pair_order = torch.argsort(expert_of_pair, stable=True)  # [S]
    token_of_pair = pair_order // top_k  # [S] which token each sorted pair belongs to
    weight_of_pair = top_k_weights.reshape(-1)[pair_order]  # [S]
    group_sizes = tokens_per_expert(top_k_index, weights.num_experts)  # [E], on the device

    # ---- HOST SYNC -------------------------------------------------------------------------
    # The loop bounds below are Python ints, so the group sizes must come to the host. On CUDA
    # this `.tolist()` blocks until every kernel queued so far has finished. This is the line
    # that makes eager un-capturable in a CUDA graph and a graph break under torch.compile.
    group_sizes_on_host = group_sizes.tolist()
    # ------------------------------------------------------------------------------------------

    output = torch.zeros(num_tokens, hidden, dtype=accumulation_dtype(hidden_states.dtype),
                         device=hidden_states.device)  # [T, H]
    start = 0
    for expert, size in enumerate(group_sizes_on_host):
        if size == 0:
            continue  # experts with no tokens cost nothing: the loop's one advantage
        rows = token_of_pair[start:start + size]  # [n]
        x = hidden_states[rows]  # [n, H]
        gate_up = x @ weights.gate_up[expert].T  # [n, 2I]
        if weights.gate_up_bias is not None:
            gate_up = gate_up + weights.gate_up_bias[expert]
        y = apply_gate(experts, gate_up) @ weights.down[expert].T  # [n, I] @ [I, H] -> [n, H]
        if weights.down_bias is not None:
            y = y + weights.down_bias[expert]
        y = y.to(output.dtype) * weight_of_pair[start:start + size, None].to(output.dtype)
        output.index_add_(0, rows, y)  # scatter each row back to its token
        start += size
    return output.to(hidden_states.dtype)  # [T, H]


_READS_COUNTS = "reads the per-expert token counts on the host (group_sizes.tolist())"

SPEC = BackendSpec(
    name="eager",
    forward=eager_experts_forward,
    summary="a Python loop over the experts that received tokens: gather, gate/up, act, down, scatter-add",
    runs=yes("torch ops only: any device and floating dtype"),
    autograd=yes("torch ops throughout (indexing, matmul, index_add_)"),
    cuda_graph=no(f"it {_READS_COUNTS}, which a capture cannot do"),
    fullgraph=no(f"it {_READS_COUNTS}: a graph break under torch.compile"),
    sync_free=no(f"it {_READS_COUNTS}: one sync per call on a GPU"),
    builtin=True,
)
