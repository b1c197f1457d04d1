"""Launching the triton backend's backward kernels (triton_backward_kernels.py). For S = T*k pairs
sorted by expert:

    d_pre, weighted_h, d top_k_weights = launch_down_backward(dout, ...)     one kernel
    dX          = launch_input_grad(d_pre, ...)   d_pre @ gate_up[e], the k rows of a token summed
    dW_gate_up  = launch_weight_grad(d_pre, x)     per expert: its rows' d_pre^T x[token]   (+ d bias)
    dW_down     = launch_weight_grad(dout, weighted_h)   per expert: dout[token]^T weighted_h (+ d bias)

`sorted_rows(dout or x, ...)` gathers a [T, H] operand into sorted row order ([S, H]) once; the
launchers take it in place of the token rows (the plan's sorted_grad_out / sorted_hidden_states),
and then load its tiles through TMA where the config asks. `launch_down_backward_split` gives
launch_down_backward's results in two kernels from the sorted dout (the plan's split_down_backward).

Every grid comes from E and the shapes; like the forward, nothing reads a GPU number on the host,
so a training step is capturable in a CUDA graph. triton_autograd.py calls them, only for the
gradients that are needed.
"""
from __future__ import annotations

import functools

import torch

from .triton_launch import (
    bias_strides,
    can_use_tma,
    grid_launch,
    kernels,
    launch_sum_over_top_k,
    max_row_blocks,
    next_power_of_two,
    precision_constexprs,
    weight_tiles,
)
from .triton_plan import KernelConfig


@functools.lru_cache(maxsize=None)
def backward_kernels():
    from . import triton_backward_kernels

    return triton_backward_kernels


def sorted_rows(by_token, sorted_pair, top_k, token_of_row=None):
    """[T, H] rows of tokens -> [S, H]: row r is the row of sorted row r's token (torch's gather).
    `token_of_row` [S] (sorted_pair // top_k), if given, saves computing it again."""
    return by_token.index_select(0, sorted_pair // top_k if token_of_row is None else token_of_row)


def launch_down_backward(grad_out, down, routing_weights, saved, sorted_pair, counts, top_k, activation,
                         config: KernelConfig, grad_out_sorted=None):
    """dout [T, H], down [E, H, I] -> (d_pre [S, 2I] (dh [S, I] for activation "none"), weighted_h [S, I],
    d top_k_weights [S] float32 in pair order, without the down bias's term).

    `saved` is the pre-activation [S, 2I] for a fused activation, h [S, I] for "none".
    `grad_out_sorted` ([S, H], `sorted_rows(grad_out)`), if given, is read instead of grad_out's token rows."""
    num_experts, hidden, inter = down.shape
    num_pairs = sorted_pair.numel()
    width = 2 * inter if activation != "none" else inter
    d_pre = grad_out.new_empty(num_pairs, width)  # [S, 2I] sorted rows
    weighted_h = grad_out.new_empty(num_pairs, inter)  # [S, I] sorted rows
    column_blocks = -(-inter // config.block_n)
    # Every pair's row gets all its column blocks, unless its expert id is out of range (left out of
    # the counts, as in the forward): zeros keep its routing-weight gradient finite.
    dw_partial = torch.zeros(num_pairs, column_blocks, device=grad_out.device, dtype=torch.float32)
    w, use_tma, k_major = weight_tiles(down.transpose(1, 2), config)  # [E, N=I, K=H]
    dout = grad_out if grad_out_sorted is None else grad_out_sorted
    dout_tma = grad_out_sorted is not None and can_use_tma(config, dout)
    a = kernels().tile_descriptor(dout, [config.block_m, config.block_k]) if dout_tma else dout
    grid_launch(backward_kernels().down_backward_kernel, config, num_pairs, num_experts, inter,
                a, w, routing_weights, saved, d_pre, weighted_h, dw_partial, sorted_pair, counts,
                num_experts, max_row_blocks(num_pairs, num_experts, config), top_k, inter, hidden,
                dout.stride(0), dout.stride(1), down.stride(0), down.stride(1), down.stride(2),
                saved.stride(0), saved.stride(1), d_pre.stride(0), d_pre.stride(1),
                weighted_h.stride(0), weighted_h.stride(1), dw_partial.stride(0), dw_partial.stride(1),
                ACTIVATION=activation, USE_TMA=use_tma, DOUT_SORTED=grad_out_sorted is not None, DOUT_TMA=dout_tma,
                W_TILE_KN=k_major, **precision_constexprs(grad_out.dtype, num_experts))
    return d_pre, weighted_h, dw_partial.sum(dim=1)


def launch_down_backward_split(grad_out_sorted, down, routing_weights, saved, sorted_pair, counts, top_k, activation,
                               config: KernelConfig):
    """launch_down_backward's results in two kernels, from dout's rows in sorted order [S, H]: the
    GEMM grad_out_sorted @ down[e] into an [S, I] buffer in the model dtype (down_kernel, tiles
    from `config`), then activation_backward_kernel streaming it with `saved` into d_pre, weighted_h
    and the routing-weight gradient, whole rows per program (no partial sums). The buffer is dh / w
    rounded once to the model dtype, as a grouped_mm backward's dh is: float32 would double its
    bytes at the backward's peak (it is alive beside the pre-activation, d_pre and weighted_h)."""
    num_experts, hidden, inter = down.shape
    num_pairs = sorted_pair.numel()
    acc = grad_out_sorted.new_empty(num_pairs, inter)  # [S, I] sorted rows, the model dtype
    down_nk = down.transpose(1, 2)  # [E, N=I, K=H]
    w, use_tma, k_major = (weight_tiles(down_nk, config) if can_use_tma(config, grad_out_sorted)
                           else (down_nk, False, False))
    a = kernels().tile_descriptor(grad_out_sorted, [config.block_m, config.block_k]) if use_tma else grad_out_sorted
    grid_launch(kernels().down_kernel, config, num_pairs, num_experts, inter,
                a, w, None, None, acc, sorted_pair, counts,
                num_experts, max_row_blocks(num_pairs, num_experts, config), inter, hidden,
                grad_out_sorted.stride(0), grad_out_sorted.stride(1), *down_nk.stride(),
                0, 0, acc.stride(0), acc.stride(1),
                HAS_BIAS=False, USE_TMA=use_tma, SCALE_ROWS=False, W_TILE_KN=k_major, STORE_SORTED=True,
                **precision_constexprs(grad_out_sorted.dtype, num_experts))
    width = 2 * inter if activation != "none" else inter
    d_pre = grad_out_sorted.new_empty(num_pairs, width)  # [S, 2I] sorted rows
    weighted_h = grad_out_sorted.new_empty(num_pairs, inter)  # [S, I] sorted rows
    dw = torch.empty(num_pairs, device=grad_out_sorted.device, dtype=torch.float32)  # every pair written
    block_m, block_n = 8, min(512, next_power_of_two(inter))
    if num_pairs:
        backward_kernels().activation_backward_kernel[(-(-num_pairs // block_m),)](
            acc, routing_weights, saved, d_pre, weighted_h, dw, sorted_pair, counts,
            num_experts, num_pairs, inter, acc.stride(0), acc.stride(1), saved.stride(0), saved.stride(1),
            d_pre.stride(0), d_pre.stride(1), weighted_h.stride(0), weighted_h.stride(1),
            ACTIVATION=activation, NUM_EXPERTS_POW2=next_power_of_two(num_experts), BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=4)
    return d_pre, weighted_h, dw


def launch_input_grad(d_pre, gate_up, expert_of_pair, sorted_pair, counts, num_tokens, top_k, config: KernelConfig):
    """d_pre [S, 2I] in sorted row order, gate_up [E, 2I, H] -> dX [T, H]: each row times its
    expert's gate_up, stored at its pair's row (down_kernel without the routing weight), then each
    token's k rows summed (expert_of_pair [S]: the slots of out-of-range ids, never written, skipped)."""
    num_experts, reduction, hidden = gate_up.shape  # [E, K, N]
    num_pairs = sorted_pair.numel()
    dx_by_pair = d_pre.new_empty(num_pairs, hidden)  # [S, H] in (token, slot) order
    gate_up_nk = gate_up.transpose(1, 2)  # [E, N=H, K=2I]
    w, use_tma, k_major = (weight_tiles(gate_up_nk, config) if can_use_tma(config, d_pre)
                           else (gate_up_nk, False, False))
    a = kernels().tile_descriptor(d_pre, [config.block_m, config.block_k]) if use_tma else d_pre
    grid_launch(kernels().down_kernel, config, num_pairs, num_experts, hidden,
                a, w, None, None, dx_by_pair, sorted_pair, counts,
                num_experts, max_row_blocks(num_pairs, num_experts, config), hidden, reduction,
                d_pre.stride(0), d_pre.stride(1), *gate_up_nk.stride(),
                0, 0, dx_by_pair.stride(0), dx_by_pair.stride(1),
                HAS_BIAS=False, USE_TMA=use_tma, SCALE_ROWS=False, W_TILE_KN=k_major,
                **precision_constexprs(d_pre.dtype, num_experts))
    return launch_sum_over_top_k(dx_by_pair, expert_of_pair, num_tokens, top_k, num_experts)


def launch_weight_grad(left, right, like, bias_like, row_scale, sorted_pair, counts, top_k, *, left_by_token: bool,
                       right_by_token: bool, config: KernelConfig):
    """Per expert e: sum over its sorted rows r of left[r]^T right[r] -> a tensor shaped and strided
    like `like` [E, M, N] (a transposed module's weight view included); a *_by_token operand is
    [T, *] and read at token(r), the other is [S, *] in sorted row order (through TMA tiles where
    the config asks). With `bias_like` [E, M], also the sum of the left rows (each times
    row_scale[pair] if given). Returns (weight gradient, bias gradient or None)."""
    num_experts, rows, cols = like.shape
    grad = torch.empty_like(like)  # keeps like's strides: a transposed view's gradient is one too
    bias_grad = torch.empty_like(bias_like) if bias_like is not None else None
    grid = (num_experts * -(-rows // config.block_m) * -(-cols // config.block_n),)
    left_tma = not left_by_token and can_use_tma(config, left)
    right_tma = not right_by_token and can_use_tma(config, right)
    if grid[0]:
        backward_kernels().expert_weight_grad_kernel[grid](
            kernels().tile_descriptor(left, [config.block_k, config.block_m]) if left_tma else left,
            kernels().tile_descriptor(right, [config.block_k, config.block_n]) if right_tma else right,
            row_scale, grad, bias_grad, sorted_pair, counts,
            num_experts, top_k, rows, cols,
            left.stride(0), left.stride(1), right.stride(0), right.stride(1), *grad.stride(), *bias_strides(bias_grad),
            LEFT_BY_TOKEN=left_by_token, RIGHT_BY_TOKEN=right_by_token, HAS_BIAS=bias_like is not None,
            BIAS_ROW_SCALED=row_scale is not None, LEFT_TMA=left_tma, RIGHT_TMA=right_tma,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
            **precision_constexprs(left.dtype, num_experts))
    return grad, bias_grad


def routing_weight_grad(dw_without_bias, grad_out, down_bias, expert_of_pair, top_k, dtype):
    """d top_k_weights [S] = <dout[t], z_p>: the kernel's part plus <dout[t], down_bias[e]> for a biased module.
    A pair whose expert id is out of range contributed nothing: its gradient is 0 (the kernels wrote 0)."""
    dw = dw_without_bias  # [S] float32
    if down_bias is not None:
        num_experts = down_bias.shape[0]
        per_expert = grad_out.float() @ down_bias.float().T  # [T, E]: <dout[t], bias[e]> for every expert
        expert = expert_of_pair.view(grad_out.shape[0], top_k).long()  # [T, k]
        present = (expert >= 0) & (expert < num_experts)
        bias_term = per_expert.gather(1, torch.where(present, expert, 0)) * present  # [T, k]
        dw = dw + bias_term.reshape(-1)
    return dw.to(dtype)
