"""Launching the triton backend's forward kernels: sort, gate_up, down, the top-k sum, decode, and the
partial forward (absent experts skipped) expert parallelism's all-gather layer asks for.

Each launcher takes its tiles as a value (a `KernelConfig` / `DecodeConfig` from the launch plan,
triton_plan.py) and computes its grid from the shapes alone, so nothing reads a GPU number on the
host. The backward's launchers (triton_backward.py) reuse the helpers here.
"""
from __future__ import annotations

import functools
import os

import torch

from ..compile_marks import assume_constant_result
from ..devices import cuda_device_facts
from .common import apply_gate, expert_counts
from .triton_plan import (
    DecodeConfig,
    KernelConfig,
    LaunchPlan,
    BLOCK_SORT_PAIRS,
    SORT_METHODS,
    fits_one_program_sort,
    one_program_sort_block,
    sort_method,
)


@functools.lru_cache(maxsize=None)
def kernels():
    from . import triton_kernels

    return triton_kernels


def interpreting() -> bool:
    """Whether triton runs its interpreter (numpy on CPU tensors) instead of compiled GPU kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@assume_constant_result
def interpreting_cached() -> bool:
    """interpreting() as the kernels see it: read once (triton fixed its mode at import), constant to dynamo."""
    return _interpreting_once()


@functools.lru_cache(maxsize=None)
def _interpreting_once() -> bool:
    return interpreting()


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------
# The sorted path
# ---------------------------------------------------------------------------------------------

def sorted_forward(experts, weights, hidden_states, top_k_index, top_k_weights, activation: str,
                   plan: LaunchPlan) -> torch.Tensor:
    """hidden_states [T, H] -> [T, H]: sort, gate_up (+ the module's own gate), down, the top-k sum."""
    num_tokens, top_k = top_k_index.shape
    sorted_pair, counts = sort_pairs(top_k_index, weights.num_experts, method=plan.sort)
    h = launch_gate_up(hidden_states, weights.gate_up, weights.gate_up_bias, sorted_pair, counts, top_k, activation,
                       plan.gate_up)  # [S, I]
    if activation == "none":
        h = apply_gate(experts, h)  # [S, 2I] -> [S, I] with the module's own formula
    y = launch_down(h, weights.down, weights.down_bias, top_k_weights.reshape(-1), sorted_pair, counts,
                    plan.down)  # [S, H]
    return launch_sum_over_top_k(y, top_k_index.reshape(-1), num_tokens, top_k, weights.num_experts)  # [T, H]


def sort_pairs(top_k_index, num_experts, *, method: str | None = None):
    """top_k_index [T, k] -> (sorted_pair [S] int32: pair ids grouped by expert, in pair order within an
    expert; counts [E] int32). A pair whose expert id is out of range is in no count and sorts after
    every expert. `method` (SORT_METHODS; default `sort_method(S, E)`): "one_program" sorts up to a few
    thousand pairs in one kernel, "blocks" any number in two (a counting sort over blocks of pairs),
    "torch" is torch's stable sort of int32 keys and a histogram (what both replace, kept to measure them
    against: several launches of cub's radix sort, the key and index copies, the histogram's zeroing)."""
    expert_of_pair = top_k_index.reshape(-1)  # [S]
    num_pairs = expert_of_pair.numel()
    method = sort_method(num_pairs, num_experts) if method is None else method
    if method not in SORT_METHODS:
        raise ValueError(f"unknown sort method {method!r}; allowed: {list(SORT_METHODS)}")
    if method == "torch":
        keys = expert_of_pair.to(torch.int32)  # [S]
        keys = torch.where((keys >= 0) & (keys < num_experts), keys, num_experts)  # out of range: last
        sorted_pair = torch.sort(keys, stable=True).indices.to(torch.int32)  # [S]
        counts = expert_counts(keys, num_experts) if num_experts > 1 else (keys == 0).sum().reshape(1)
        return sorted_pair, counts.to(torch.int32)  # (one expert: expert_counts counts every pair)
    expert_of_pair = expert_of_pair.contiguous()
    sorted_pair = expert_of_pair.new_empty(num_pairs, dtype=torch.int32)
    counts = expert_of_pair.new_empty(num_experts, dtype=torch.int32)
    if method == "one_program":
        if not fits_one_program_sort(num_pairs, num_experts):
            raise ValueError(f"{num_pairs} pairs of {num_experts} experts do not fit the one-program sort's "
                             "int32 keys (expert << pair bits | pair); sort them with method='blocks'")
        block = one_program_sort_block(num_pairs)
        kernels().sort_pairs_kernel[(1,)](
            expert_of_pair, sorted_pair, counts, num_pairs, NUM_EXPERTS=num_experts,
            HIST_BINS=next_power_of_two(num_experts + 1), BLOCK=block, PAIR_BITS=block.bit_length() - 1,
            num_warps=4 if block <= 1024 else 8)
        return sorted_pair, counts
    num_blocks = -(-num_pairs // BLOCK_SORT_PAIRS)
    bins = next_power_of_two(num_experts + 1)  # every expert and one bin for the out-of-range ids
    if num_blocks == 0:
        return sorted_pair, counts.zero_()
    block_counts = expert_of_pair.new_empty(num_blocks, bins, dtype=torch.int32)
    kernels().pair_block_counts_kernel[(num_blocks,)](expert_of_pair, block_counts, num_pairs, num_experts,
                                                      HIST_BINS=bins, BLOCK=BLOCK_SORT_PAIRS, num_warps=4)
    kernels().pair_block_scatter_kernel[(num_blocks,)](
        expert_of_pair, block_counts, sorted_pair, counts, num_pairs, num_experts, num_blocks, HIST_BINS=bins,
        BLOCK=BLOCK_SORT_PAIRS, BLOCK_BITS=BLOCK_SORT_PAIRS.bit_length() - 1, num_warps=4)
    return sorted_pair, counts


def launch_gate_up(hidden_states, gate_up, gate_up_bias, sorted_pair, counts, top_k, activation, config: KernelConfig,
                   *, save_pre: bool = False):
    """x [T, H], gate_up [E, 2I, H] -> h [S, I] (act(gate) * up; [S, 2I] raw for activation "none")
    in sorted row order. save_pre (fused activations): also return the pre-activation [S, 2I] the
    backward reads, as (h, pre)."""
    num_experts, double_inter, hidden = gate_up.shape
    num_pairs = sorted_pair.numel()
    width = double_inter // 2 if activation != "none" else double_inter
    h = hidden_states.new_empty(num_pairs, width)  # [S, I] (or [S, 2I] for a custom gate)
    pre = hidden_states.new_empty(num_pairs, double_inter) if save_pre else None  # [S, 2I]
    w, use_tma, k_major = weight_tiles(gate_up, config)  # [E, N=2I, K=H]
    grid_launch(kernels().gate_up_kernel, config, num_pairs, num_experts, width,
                hidden_states, w, gate_up_bias, h, pre, sorted_pair, counts,
                num_experts, max_row_blocks(num_pairs, num_experts, config), top_k, width, hidden,
                hidden_states.stride(0), hidden_states.stride(1), *gate_up.stride(),
                *bias_strides(gate_up_bias), h.stride(0), h.stride(1), *(pre.stride() if save_pre else (0, 0)),
                ACTIVATION=activation, HAS_BIAS=gate_up_bias is not None, USE_TMA=use_tma, SAVE_PRE=save_pre,
                W_TILE_KN=k_major, **precision_constexprs(hidden_states.dtype, num_experts))
    return (h, pre) if save_pre else h


def launch_down(h, down, down_bias, routing_weights, sorted_pair, counts, config: KernelConfig):
    """h [S, I] in sorted row order, down [E, H, I] -> y [S, H] in (token, slot) order, each row
    times its routing weight (routing_weights [S] in pair order)."""
    num_experts, hidden, inter = down.shape
    num_pairs = sorted_pair.numel()
    y = h.new_empty(num_pairs, hidden)  # [S, H]
    w, use_tma, k_major = weight_tiles(down, config) if can_use_tma(config, h) else (down, False, False)
    a = kernels().tile_descriptor(h, [config.block_m, config.block_k]) if use_tma else h
    grid_launch(kernels().down_kernel, config, num_pairs, num_experts, hidden,
                a, w, down_bias, routing_weights, y, sorted_pair, counts,
                num_experts, max_row_blocks(num_pairs, num_experts, config), hidden, inter,
                h.stride(0), h.stride(1), *down.stride(), *bias_strides(down_bias),
                y.stride(0), y.stride(1),
                HAS_BIAS=down_bias is not None, USE_TMA=use_tma, W_TILE_KN=k_major,
                **precision_constexprs(h.dtype, num_experts))
    return y


def launch_sum_over_top_k(y, expert_of_pair, num_tokens, top_k, num_experts):
    """y [S, H] in (token, slot) order, expert_of_pair [S] -> [T, H], as common.sum_over_top_k but one
    streaming kernel. A slot whose expert id is outside [0, num_experts) is skipped: sort_pairs put its
    pair after every expert, so no kernel wrote its row of y, and it contributes nothing."""
    hidden = y.shape[1]
    out = y.new_empty(num_tokens, hidden)  # [T, H]
    if num_tokens == 0:
        return out
    block_n = min(2048, next_power_of_two(hidden))
    kernels().sum_top_k_kernel[(num_tokens, -(-hidden // block_n))](
        y, out, expert_of_pair, num_experts, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_N=block_n,
        num_warps=8)
    return out


# ---------------------------------------------------------------------------------------------
# The decode path: no sort, two token-major GEMV kernels
# ---------------------------------------------------------------------------------------------

def decode_forward(experts, weights, hidden_states, top_k_index, top_k_weights, activation: str,
                   plan: LaunchPlan) -> torch.Tensor:
    """hidden_states [T, H] -> [T, H] in two token-major kernels (+ the module's own gate)."""
    top_k = top_k_index.shape[1]
    expert_of_pair = top_k_index.reshape(-1)  # [S] in pair order: no sort
    h = launch_decode_gate_up(hidden_states, weights.gate_up, weights.gate_up_bias, expert_of_pair, top_k, activation,
                              plan.decode_gate_up)  # [S, I]
    if activation == "none":
        h = apply_gate(experts, h)  # [S, 2I] -> [S, I]
    return launch_decode_down(h, weights.down, weights.down_bias, expert_of_pair, top_k_weights.reshape(-1),
                              top_k, plan.decode_down)


def launch_decode_gate_up(hidden_states, gate_up, gate_up_bias, expert_of_pair, top_k, activation,
                          config: DecodeConfig):
    """x [T, H], expert_of_pair [S] -> h [S, I] in pair order (act(gate) * up; [S, 2I] for "none")."""
    hidden, double_inter = hidden_states.shape[1], gate_up.shape[1]
    width = double_inter // 2 if activation != "none" else double_inter
    num_pairs = expert_of_pair.numel()
    h = hidden_states.new_empty(num_pairs, width)  # [S, I]
    kernels().decode_gate_up_kernel[(num_pairs * -(-width // config.block_n),)](
        hidden_states, gate_up, gate_up_bias, h, expert_of_pair,
        top_k, width, hidden,
        hidden_states.stride(0), hidden_states.stride(1), *gate_up.stride(),
        *bias_strides(gate_up_bias), h.stride(0), h.stride(1),
        ACTIVATION=activation, HAS_BIAS=gate_up_bias is not None, **decode_constexprs(config))
    return h


def launch_decode_down(h, down, down_bias, expert_of_pair, routing_weights, top_k, config: DecodeConfig):
    """h [S, I] in pair order -> out [T, H]: each token's k experts weighted and summed in registers."""
    hidden, inter = down.shape[1], down.shape[2]
    num_tokens = expert_of_pair.numel() // top_k
    out = h.new_empty(num_tokens, hidden)  # [T, H]
    kernels().decode_down_kernel[(num_tokens * -(-hidden // config.block_n),)](
        h, down, down_bias, expert_of_pair, routing_weights, out,
        hidden, inter,
        h.stride(0), h.stride(1), *down.stride(), *bias_strides(down_bias),
        out.stride(0), out.stride(1),
        TOP_K=top_k, HAS_BIAS=down_bias is not None, **decode_constexprs(config))
    return out


def decode_constexprs(config: DecodeConfig) -> dict:
    return dict(BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
                num_stages=config.num_stages)


# ---------------------------------------------------------------------------------------------
# Shared by the forward and backward launchers
# ---------------------------------------------------------------------------------------------

def precision_constexprs(dtype, num_experts) -> dict:
    return dict(
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        DOT_IN_FP32=interpreting_cached() and dtype == torch.bfloat16,
        NUM_EXPERTS_POW2=next_power_of_two(num_experts),
    )


def can_use_tma(config: KernelConfig, w: torch.Tensor) -> bool:
    """TMA tiles need the config to ask for them, a Hopper-or-later GPU (or the interpreter, which
    emulates them), and a non-empty contiguous [..., K] tensor (weights [E, rows, K], h [S, K])
    whose rows are a multiple of 16 bytes (a descriptor cannot describe zero rows)."""
    if not config.tma or w.numel() == 0 or not w.is_contiguous() or (w.shape[-1] * w.element_size()) % 16:
        return False
    # The base address too; torch.compile cannot trace data_ptr(), and there w is a module's own
    # parameter or a fresh buffer, both allocator-aligned (256 bytes).
    if not torch.compiler.is_compiling() and w.data_ptr() % 16:
        return False
    if interpreting_cached():
        return True
    return w.device.type == "cuda" and cuda_device_facts(w.device.index or 0)[1] >= 9


def tile_descriptor(w: torch.Tensor, block_rows: int, block_cols: int):
    """A TMA descriptor over w [E, rows, cols] viewed as [E*rows, cols], in [block_rows, block_cols] tiles."""
    return kernels().tile_descriptor(w.view(-1, w.shape[-1]), [block_rows, block_cols])


def weight_tiles(w: torch.Tensor, config: KernelConfig):
    """A weight as a GEMM kernel reads it, w [E, N, K] (N the output's columns, K the reduction; any strides)
    -> (operand, use_tma, k_major). TMA tiles are cut from the storage: [E*N, K] in [BLOCK_N, BLOCK_K] tiles
    when K is the contiguous dimension, or (k_major, the kernels' W_TILE_KN) [E*K, N] in [BLOCK_K, BLOCK_N]
    tiles when N is: the weights of transformers' `is_transposed` modules in the forward, and the default
    layout's where the backward reads a weight the other way round. A k-major tile must not reach into the
    next expert along the reduction, so there K must be a multiple of BLOCK_K. Else the kernel gets w itself
    and loads through pointers."""
    if can_use_tma(config, w):
        return tile_descriptor(w, config.block_n, config.block_k), True, False
    k_major = w.transpose(1, 2)  # [E, K, N]
    if w.shape[2] % config.block_k == 0 and can_use_tma(config, k_major):
        return tile_descriptor(k_major, config.block_k, config.block_n), True, True
    return w, False, False


def bias_strides(bias):
    return (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)


def max_row_blocks(num_pairs, num_experts, config: KernelConfig) -> int:
    """Row blocks never straddle experts, so there are at most S/BLOCK_M + (experts hit) of them, and
    never more than S (each holds at least one row): a bound known without reading the counts."""
    return min(num_pairs, -(-num_pairs // config.block_m) + min(num_experts, num_pairs))


def grid_launch(kernel, config: KernelConfig, num_pairs, num_experts, width, *args, **constexprs):
    """Launch a sorted-rows kernel over (row blocks) x (column blocks of `width`); nothing for zero pairs."""
    grid = (max_row_blocks(num_pairs, num_experts, config) * -(-width // config.block_n),)
    if grid[0] == 0:
        return
    kernel[grid](*args, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                 GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages, **constexprs)
