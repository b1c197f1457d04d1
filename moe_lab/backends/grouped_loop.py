"""moe_lab's own grouped matmul for when torch's `grouped_mm` cannot run.

`grouped_matmul_loop(x [S, K], w [E, K, N], offsets [E] int32) -> [S, N]` computes, for each
expert e, `x[offsets[e-1]:offsets[e]] @ w[e]`. It is a torch custom op, so torch.compile treats
it as one opaque call (no graph break, `fullgraph=True` works) and autograd gets an explicit
backward — itself a custom op, so a compiled training step traces it as one call too. Inside
each, the offsets come to the host once: a loop cannot be launched without them.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("moe_lab::grouped_matmul_loop", mutates_args=())
def grouped_matmul_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[2])  # [S, N]
    start = 0
    for expert, end in enumerate(offsets.tolist()):  # the one host sync
        if end > start:
            torch.mm(x[start:end], w[expert], out=out[start:end])
        start = end
    return out


@grouped_matmul_loop.register_fake
def _(x, w, offsets):
    torch._check(x.dim() == 2 and w.dim() == 3 and offsets.dim() == 1)
    torch._check(x.shape[1] == w.shape[1], lambda: f"inner dims differ: {x.shape[1]} vs {w.shape[1]}")
    return x.new_empty(x.shape[0], w.shape[2])


def _setup_context(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


@torch.library.custom_op("moe_lab::grouped_matmul_loop_backward", mutates_args=())
def grouped_matmul_loop_backward(grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                                 offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(w)  # [S, K], [E, K, N]; an empty group's rows stay 0
    start = 0
    for expert, end in enumerate(offsets.tolist()):  # the one host sync
        if end > start:
            grad_x[start:end] = grad_out[start:end] @ w[expert].T  # [n, N] @ [N, K]
            grad_w[expert] = x[start:end].T @ grad_out[start:end]  # [K, n] @ [n, N]
        start = end
    return grad_x, grad_w


@grouped_matmul_loop_backward.register_fake
def _(grad_out, x, w, offsets):
    return torch.empty_like(x), torch.empty_like(w)


def _backward(ctx, grad_out):
    x, w, offsets = ctx.saved_tensors
    grad_x, grad_w = grouped_matmul_loop_backward(grad_out.contiguous(), x, w, offsets)
    return grad_x, grad_w, None


grouped_matmul_loop.register_autograd(_backward, setup_context=_setup_context)
