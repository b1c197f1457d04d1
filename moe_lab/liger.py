"""Liger-Kernel's fused MoE as a moe_lab `BackendSpec`, to be timed beside moe_lab's (`moe-lab bench
--compare-liger`), under the name "liger:fused_moe".

Liger (`pip install 'moe-lab[compare]'`) ships `LigerFusedMoEFunction`: a routing-metadata pass, a
fused gather + grouped GEMM + SwiGLU, a down-projection GEMM and a token aggregation, with a backward
that recomputes rather than caches the expert outputs. It takes the same weight layout as moe_lab
(gate_up_proj [E, 2I, H] with the gate rows first, down_proj [E, H, I]) and SwiGLU only. Like the
transformers entries (moe_lab.hf.comparison), it is not in moe_lab's registry: it exists to be
measured, not to be chosen. Nothing here runs at `import moe_lab`.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from .backends import BackendSpec, Where, expert_weights
from .backends.spec import Support, no, unknown, yes

LIBRARY = "liger"
IMPLEMENTATIONS = ("fused_moe",)


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _runs(where: Where) -> Support:
    if not installed():
        return no("liger-kernel is not installed (pip install 'moe-lab[compare]')")
    if where.device.type != "cuda":
        return no(f"Liger's fused MoE kernels run on CUDA GPUs, not {where.device.type}")
    if where.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return no(f"Liger's fused MoE takes bfloat16/float16/float32, not {where.dtype}")
    return yes("LigerFusedMoEFunction (Triton)")


def fused_moe_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Liger's fused MoE on a moe_lab (or transformers) experts module's weights."""
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    if getattr(experts, "act_fn", None) is not torch.nn.functional.silu and \
            getattr(getattr(experts, "config", None), "activation", "silu") != "silu":
        raise NotImplementedError("Liger's fused MoE implements SwiGLU experts only (activation silu)")
    weights = expert_weights(experts)
    if weights.gate_up_bias is not None or getattr(experts, "is_transposed", False):
        raise NotImplementedError("Liger's fused MoE takes unbiased experts stored [E, 2I, H] / [E, H, I]")
    return LigerFusedMoEFunction.apply(hidden_states, weights.gate_up, weights.down, top_k_index.to(torch.int32),
                                       top_k_weights)


@functools.cache
def comparison_spec(implementation: str) -> BackendSpec:
    """Liger's "fused_moe" as a BackendSpec named "liger:fused_moe"."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Liger's backends compared here are {list(IMPLEMENTATIONS)}, not {implementation!r}")
    return BackendSpec(
        name=f"{LIBRARY}:{implementation}", forward=fused_moe_forward,
        summary="Liger-Kernel's fused MoE (gather + grouped GEMM + SwiGLU fused; recomputing backward)",
        runs=_runs, autograd=yes("LigerFusedMoEFunction has a backward"),
        cuda_graph=unknown("not tried here"), fullgraph=unknown("not tried here"), sync_free=unknown("not tried here"))
