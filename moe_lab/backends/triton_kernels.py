"""The forward kernels of the `triton` backend (the backward's are in triton_backward_kernels.py,
which reuses the helpers here). Imported only when triton is installed.

The sorted-path kernels walk the (token, expert) pairs sorted by expert, in row blocks of BLOCK_M
rows that never straddle two experts (an expert with 5 rows gets one block with 11 masked rows at
BLOCK_M=16). Which block belongs to which expert is worked out inside the kernel from the
per-expert counts, so the host never needs a number from the GPU:

    counts      [E]  pairs per expert           e.g. [5, 0, 20]  (BLOCK_M = 16)
    blocks      [E]  ceil(counts / BLOCK_M)           [1, 0, 2]
    block_ends  [E]  inclusive cumsum of blocks       [1, 1, 3]   -> block 0: expert 0,
                                                                     blocks 1, 2: expert 2
USE_TMA (Hopper and later) reads the weight tiles, and in down_kernel the sorted h rows too, through
TMA tensor descriptors: the copy engine moves whole tiles into shared memory while the warps do the
math, instead of every thread computing and issuing its own addresses. Each such operand is then a
descriptor over a 2-D view ([E*rows, K]), and a tile that runs past its expert's rows reads the next
expert's (or zeros past the end): those rows and columns are masked at the store, never used. A weight
whose output dimension N is the contiguous one (an `is_transposed` module's in the forward, the default
layout's in dX and the split down_backward) is cut the other way, [BLOCK_K, BLOCK_N] tiles of [E*K, N]
(W_TILE_KN), with K a multiple of BLOCK_K so no tile reaches the next expert along the reduction.
The gathered x rows of gate_up_kernel cannot be a TMA tile (they are not contiguous) and stay loads.
DOT_IN_FP32 is set only under triton's interpreter, whose tl.dot reads bfloat16 (stored as uint16)
as integers. The launch grid is an upper bound on the number of blocks; programs past the last block exit.

  sort_pairs_kernel: the pairs sorted by expert and counted, in one program (up to 2048 pairs)
  pair_block_counts_kernel, pair_block_scatter_kernel: the same for any number of pairs, as a
                   counting sort over blocks of pairs in two launches
  gate_up_kernel:  h[r]  = act(x[token(r)] @ W_gate[e]^T) * (x[token(r)] @ W_up[e]^T)   [S, I]
                   (gather of the token rows fused into the A load, activation in the epilogue;
                   ACTIVATION="none" writes the raw [S, 2I] projection for custom gates; SAVE_PRE
                   also writes the [S, 2I] pre-activation the backward reads)
  down_kernel:     y[pair(r)] = weight(pair(r)) * (h[r] @ W_down[e]^T)                  [S, H]
                   (routing weight and un-permute fused into the epilogue: rows land in
                   (token, slot) order; the backward runs it for dX = d_pre @ W_gate_up[e])
  sum_top_k_kernel: out[t] = the k rows of token t summed, one streaming pass         [T, H]
                   (slots whose expert id is out of range skipped: they contribute nothing)
  decode_gate_up_kernel, decode_down_kernel: the token-major GEMVs of the decode path (no sort)
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def tile_descriptor(tensor, block_shape):
    """A TMA descriptor over a 2-D, row-contiguous tensor, loaded in `block_shape` tiles (USE_TMA)."""
    return TensorDescriptor.from_tensor(tensor, block_shape)


@triton.jit
def _locate_block(pid_m, counts_ptr, num_experts, NUM_EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """-> (expert of row block pid_m, its first sorted row, rows of that expert left from there)."""
    expert_ids = tl.arange(0, NUM_EXPERTS_POW2)
    counts = tl.load(counts_ptr + expert_ids, mask=expert_ids < num_experts, other=0).to(tl.int32)  # [E]
    blocks = (counts + BLOCK_M - 1) // BLOCK_M  # [E]
    block_ends = tl.cumsum(blocks, axis=0)  # [E]
    row_ends = tl.cumsum(counts, axis=0)  # [E]
    # The first expert whose blocks end after pid_m; == num_experts when pid_m is past the last block.
    expert = tl.sum((block_ends <= pid_m).to(tl.int32), axis=0)
    is_expert = expert_ids == expert
    expert_rows = tl.sum(tl.where(is_expert, counts, 0), axis=0)
    expert_first_row = tl.sum(tl.where(is_expert, row_ends - counts, 0), axis=0)
    expert_first_block = tl.sum(tl.where(is_expert, block_ends - blocks, 0), axis=0)
    rows_before = (pid_m - expert_first_block) * BLOCK_M
    return expert, expert_first_row + rows_before, expert_rows - rows_before


@triton.jit
def _grouped_program_order(pid, num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) visiting GROUP_M row blocks per column of n-blocks, so the programs running at
    once share one expert's weight tiles through L2 (pid_m-major order streams all of an expert's
    weights again for every row block: 16x the HBM traffic on Mixtral's 235 MB experts at T=8192)."""
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_n_blocks
    first_m = (pid // programs_per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_size
    pid_n = (pid % programs_per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _sorted_row_block(counts_ptr, sorted_pair_ptr, num_experts, num_m_blocks, N, NUM_EXPERTS_POW2: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of a sorted-rows kernel -> (expert (== num_experts past the last block),
    pid_n, first sorted row, sorted_rows [BM] int64, row_mask [BM], pair [BM] int64 = token * k + slot)."""
    pid_m, pid_n = _grouped_program_order(tl.program_id(0), num_m_blocks, N, BLOCK_N, GROUP_M)
    expert, first_row, rows_left = _locate_block(pid_m, counts_ptr, num_experts, NUM_EXPERTS_POW2, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    row_mask = offs_m < rows_left  # [BM]; nothing past the last block (rows_left <= 0 there)
    sorted_rows = (first_row + offs_m).to(tl.int64)  # [BM]
    pair = tl.load(sorted_pair_ptr + sorted_rows, mask=row_mask, other=0).to(tl.int64)  # [BM]
    return expert, pid_n, first_row, sorted_rows, row_mask, pair


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # tanh(z) = 2 * sigmoid(2z) - 1, with z = sqrt(2/pi) * (x + 0.044715 x^3)
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * z)
    elif ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def gate_up_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, pre_ptr, sorted_pair_ptr, counts_ptr,
    num_experts, num_m_blocks, top_k, N, K,
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_om, stride_on,
    stride_pm, stride_pn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    NUM_EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, SAVE_PRE: tl.constexpr = False, W_TILE_KN: tl.constexpr = False,
):
    """x [T, K=H], w [E, 2I, H] -> out [S, N]; N = I when ACTIVATION fuses act(gate) * up, else 2I.
    With USE_TMA, w_ptr is a descriptor over w viewed [E*2I, H] with [BLOCK_N, BLOCK_K] tiles, or, for
    weights stored [E, H, 2I] (W_TILE_KN: transformers' `is_transposed`), over that storage viewed
    [E*H, 2I] in [BLOCK_K, BLOCK_N] tiles, K a multiple of BLOCK_K (a tile never reaches the next expert).
    SAVE_PRE (fused activations only) also stores gate and up before the activation in pre [S, 2I]."""
    expert, pid_n, first_row, sorted_rows, row_mask, pair = _sorted_row_block(
        counts_ptr, sorted_pair_ptr, num_experts, num_m_blocks, N, NUM_EXPERTS_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    if expert >= num_experts:
        return
    token = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xk  # [BM, BK] gathered rows
    if USE_TMA:
        if W_TILE_KN:
            w_row = expert * K  # this expert's first row in [E*H, 2I]; its up columns start at N = I
        else:
            gate_row = expert * (stride_we // stride_wn) + pid_n * BLOCK_N  # first row of the tile in [E*2I, H]
    else:
        w_expert = w_ptr + expert.to(tl.int64) * stride_we
        gate_ptrs = w_expert + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
        up_ptrs = gate_ptrs + N * stride_wn  # fused: the up rows start I = N rows below the gate rows
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_TMA:
            if W_TILE_KN:
                gate_w = w_ptr.load([w_row + k0, pid_n * BLOCK_N])  # [BK, BN]
            else:
                gate_w = w_ptr.load([gate_row, k0]).T  # [BN, BK] tile -> [BK, BN]
        else:
            gate_w = tl.load(gate_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            a, gate_w = a.to(tl.float32), gate_w.to(tl.float32)
        acc_gate = tl.dot(a, gate_w, acc_gate, input_precision=INPUT_PRECISION)
        if ACTIVATION != "none":
            if USE_TMA:
                if W_TILE_KN:
                    up_w = w_ptr.load([w_row + k0, N + pid_n * BLOCK_N])
                else:
                    up_w = w_ptr.load([gate_row + N, k0]).T
            else:
                up_w = tl.load(up_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_IN_FP32:
                up_w = up_w.to(tl.float32)
            acc_up = tl.dot(a, up_w, acc_up, input_precision=INPUT_PRECISION)
            if not USE_TMA:
                up_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_xk
        if not USE_TMA:
            gate_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias_expert = bias_ptr + expert.to(tl.int64) * stride_be
        acc_gate += tl.load(bias_expert + offs_n * stride_bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION != "none":
            acc_up += tl.load(bias_expert + (offs_n + N) * stride_bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:
        pre_ptrs = pre_ptr + sorted_rows[:, None] * stride_pm + offs_n[None, :] * stride_pn
        tile_mask = row_mask[:, None] & n_mask[None, :]
        tl.store(pre_ptrs, acc_gate.to(pre_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(pre_ptrs + N * stride_pn, acc_up.to(pre_ptr.dtype.element_ty), mask=tile_mask)
    if ACTIVATION != "none":
        result = _activation(acc_gate, ACTIVATION) * acc_up
    else:
        result = acc_gate
    out_ptrs = out_ptr + sorted_rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def down_kernel(
    h_ptr, w_ptr, bias_ptr, routing_weight_ptr, out_ptr, sorted_pair_ptr, counts_ptr,
    num_experts, num_m_blocks, N, K,
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_op, stride_on,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    NUM_EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, SCALE_ROWS: tl.constexpr = True, W_TILE_KN: tl.constexpr = False,
    STORE_SORTED: tl.constexpr = False,
):
    """h [S, K=I] (sorted rows), w [E, H, I] -> out [S, N=H] in (token, slot) order, times the routing weight.
    With USE_TMA, h_ptr and w_ptr are descriptors: h [S, I] in [BLOCK_M, BLOCK_K] tiles, w viewed
    [E*H, I] in [BLOCK_N, BLOCK_K] tiles.

    The backward's dX runs the same kernel: d_pre [S, K=2I] times gate_up [E, 2I, H] (strides as
    [E, N=H, K=2I]), without the routing weight (SCALE_ROWS=False). There the weight is K-major,
    so with TMA (W_TILE_KN) its descriptor is over gate_up viewed [E*2I, H] in [BLOCK_K, BLOCK_N]
    tiles, and the launcher takes TMA only when K is a multiple of BLOCK_K (a tile never reaches
    into the next expert along the reduction). The split down_backward runs it too: dout's sorted
    rows [S, K=H] times down [E, H, I] (W_TILE_KN), unscaled, stored at the sorted rows
    (STORE_SORTED) of an [S, N=I] buffer in the model dtype. Which way a weight's tiles are cut follows its
    storage (`weight_tiles`): on an `is_transposed` module's weights the forward is the K-major case and
    the backward's two the other."""
    expert, pid_n, first_row, sorted_rows, row_mask, pair = _sorted_row_block(
        counts_ptr, sorted_pair_ptr, num_experts, num_m_blocks, N, NUM_EXPERTS_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    if expert >= num_experts:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    if USE_TMA:
        if W_TILE_KN:
            w_row = expert * K  # this expert's first row in [E*K, N]
        else:
            w_row = expert * (stride_we // stride_wn) + pid_n * BLOCK_N  # first row of the tile in [E*H, I]
    else:
        a_ptrs = h_ptr + sorted_rows[:, None] * stride_hm + offs_k[None, :] * stride_hk  # [BM, BK]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        if USE_TMA:
            a = h_ptr.load([first_row, k0])  # [BM, BK]; rows past this expert's are never stored
            if W_TILE_KN:
                w = w_ptr.load([w_row + k0, pid_n * BLOCK_N])  # [BK, BN]
            else:
                w = w_ptr.load([w_row, k0]).T  # [BN, BK] -> [BK, BN]
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if not USE_TMA:
            a_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if SCALE_ROWS:
        routing_weight = tl.load(routing_weight_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
        acc = acc * routing_weight[:, None]
    out_rows = pair
    if STORE_SORTED:
        out_rows = sorted_rows
    out_ptrs = out_ptr + out_rows[:, None] * stride_op + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Decode: a handful of (token, expert) pairs, almost never two on one expert. Nothing to group,
# so no sort and no counts: one program per (pair, n-block) reads its expert's rows directly
# (a GEMV: tl.dot needs 16 rows, a decode step has one per expert), and the down kernel sums a
# token's k experts in registers, so the output needs no reduction kernel either. Two launches.
# ---------------------------------------------------------------------------------------------

@triton.jit
def decode_gate_up_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, index_ptr,
    top_k, N, K,
    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x [T, K=H], w [E, 2I, H], index [S] -> out [S, N] in pair order; N = I fused, 2I for "none"."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pair, pid_n = pid // num_n_blocks, pid % num_n_blocks
    expert = tl.load(index_ptr + pair).to(tl.int64)
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    x_ptrs = x_ptr + token * stride_xt + offs_k * stride_xk  # [BK]
    gate_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BN, BK]
    up_ptrs = gate_ptrs + N * stride_wn
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)[None, :]  # [1, BK]
        w_mask = n_mask[:, None] & k_mask[None, :]
        acc_gate += tl.sum(tl.load(gate_ptrs, mask=w_mask, other=0.0).to(tl.float32) * x, axis=1)
        if ACTIVATION != "none":
            acc_up += tl.sum(tl.load(up_ptrs, mask=w_mask, other=0.0).to(tl.float32) * x, axis=1)
            up_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias_expert = bias_ptr + expert * stride_be
        acc_gate += tl.load(bias_expert + offs_n * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
        if ACTIVATION != "none":
            acc_up += tl.load(bias_expert + (offs_n + N) * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
    if ACTIVATION != "none":
        result = _activation(acc_gate, ACTIVATION) * acc_up
    else:
        result = acc_gate
    tl.store(out_ptr + pair * stride_om + offs_n * stride_on, result.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def decode_down_kernel(
    h_ptr, w_ptr, bias_ptr, index_ptr, routing_weight_ptr, out_ptr,
    N, K,
    stride_hm, stride_hk, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ot, stride_on,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h [S, K=I] in pair order, w [E, H, I] -> out [T, N=H] = sum over the token's k slots of weight * (down @ h)."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    token, pid_n = pid // num_n_blocks, pid % num_n_blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Unrolled over the k slots so the loads of all k experts' rows are in flight together: one
    # expert's [BLOCK_N, I] slice is too little memory traffic to hide the latency on its own.
    for slot in tl.static_range(TOP_K):
        pair = (token * TOP_K + slot).to(tl.int64)
        expert = tl.load(index_ptr + pair).to(tl.int64)
        h_ptrs = h_ptr + pair * stride_hm + offs_k * stride_hk  # [BK]
        w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk  # [BN, BK]
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            h = tl.load(h_ptrs, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            part += tl.sum(w * h, axis=1)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            part += tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.load(routing_weight_ptr + pair).to(tl.float32) * part
    tl.store(out_ptr + token * stride_ot + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def sum_top_k_kernel(y_ptr, out_ptr, expert_ptr, num_experts, N, stride_ym, stride_om, TOP_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """y [T*k, N] in (token, slot) order -> out [T, N]: each token's k rows summed in fp32, rounded
    once. k unrolled loads of contiguous row blocks stream closer to the copy bandwidth than torch's
    strided reduction over the middle dimension of [T, k, N] (docs/performance_notes.md). The
    backward sums dX's k rows per token with it too. A slot whose expert (expert_ptr [T*k]) is
    outside [0, num_experts) is skipped: the sort put its pair after every expert, so no kernel
    wrote its row (an expert-parallel "not on this rank" id: that slot contributes nothing)."""
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        # The slot's id as a row, so that it masks the row's load: no branch between the k loads (why a mask:
        # docs/performance_notes.md), and triton 3.9's interpreter cannot AND a row mask with a scalar.
        expert = tl.load(expert_ptr + token * TOP_K + slot) + tl.zeros((BLOCK_N,), dtype=tl.int32)
        present = n_mask & (expert >= 0) & (expert < num_experts)
        acc += tl.load(y_ptr + (token * TOP_K + slot) * stride_ym + offs_n, mask=present, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def sort_pairs_kernel(expert_ptr, sorted_pair_ptr, counts_ptr, num_pairs, NUM_EXPERTS: tl.constexpr,
                      HIST_BINS: tl.constexpr, BLOCK: tl.constexpr, PAIR_BITS: tl.constexpr):
    """expert of each pair [S] (any int dtype) -> sorted_pair [S] int32 (pair ids grouped by expert,
    in pair order inside a group) and counts [E] int32, in ONE program (S <= BLOCK = 2**PAIR_BITS).

    For a few thousand pairs torch.sort runs a single-block radix sort, plus a copy to int32 keys,
    an index fill and a histogram, each a launch; this is one (measured against them by
    tools/sort_pairs_ab.py, docs/performance_notes.md). Each pair becomes the key
    expert << PAIR_BITS | pair, so one bitonic sort in registers orders by expert and keeps pair
    order within an expert (a stable sort by expert); the low bits are the pair id. A pair whose
    expert id is out of range sorts after every expert and is in no count (HIST_BINS > NUM_EXPERTS:
    its bin, and the padding's, is NUM_EXPERTS)."""
    offs = tl.arange(0, BLOCK)
    valid = offs < num_pairs
    expert = tl.load(expert_ptr + offs, mask=valid, other=0).to(tl.int32)  # [BLOCK]
    expert = tl.where(valid & (expert >= 0) & (expert < NUM_EXPERTS), expert, NUM_EXPERTS)
    keys = tl.sort(expert << PAIR_BITS | offs)  # the padding sorts after every expert (largest offsets)
    tl.store(sorted_pair_ptr + offs, keys & ((1 << PAIR_BITS) - 1), mask=valid)
    counts = tl.histogram(expert, HIST_BINS)  # [HIST_BINS]
    bins = tl.arange(0, HIST_BINS)
    tl.store(counts_ptr + bins, counts, mask=bins < NUM_EXPERTS)


@triton.jit
def pair_block_counts_kernel(expert_ptr, block_counts_ptr, num_pairs, num_experts, HIST_BINS: tl.constexpr,
                             BLOCK: tl.constexpr):
    """The first half of the block counting sort: block_counts [num_blocks, HIST_BINS] int32, row b =
    how many of pairs b*BLOCK .. b*BLOCK + BLOCK-1 go to each expert; bin num_experts (< HIST_BINS)
    counts the pairs whose expert id is out of range, which sort after every expert."""
    pid = tl.program_id(0)
    pair = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    valid = pair < num_pairs
    expert = tl.load(expert_ptr + pair, mask=valid, other=0).to(tl.int32)
    expert = tl.where(valid & (expert >= 0) & (expert < num_experts), expert, num_experts)
    counts = tl.histogram(expert, HIST_BINS)  # [HIST_BINS]; the padding past num_pairs went to bin num_experts
    bins = tl.arange(0, HIST_BINS)
    padding = BLOCK - tl.minimum(num_pairs - pid * BLOCK, BLOCK)
    tl.store(block_counts_ptr + pid * HIST_BINS + bins, counts - tl.where(bins == num_experts, padding, 0))


@triton.jit
def pair_block_scatter_kernel(expert_ptr, block_counts_ptr, sorted_pair_ptr, counts_ptr, num_pairs, num_experts,
                              num_blocks, HIST_BINS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_BITS: tl.constexpr):
    """The second half: each program places its block's pairs. An expert's rows start where the
    experts before it end (exclusive cumsum of the totals over all blocks); inside them, the blocks
    before this one come first, then this block's pairs in pair order (one bitonic sort of
    expert << BLOCK_BITS | offset in registers): a stable sort by expert, as sort_pairs_kernel's.
    Program 0 also writes counts [E] int32."""
    pid = tl.program_id(0)
    bins = tl.arange(0, HIST_BINS)
    total = tl.zeros((HIST_BINS,), dtype=tl.int32)  # pairs per expert, all blocks
    before = tl.zeros((HIST_BINS,), dtype=tl.int32)  # pairs per expert in the blocks before this one
    for block in range(0, num_blocks):
        row = tl.load(block_counts_ptr + block * HIST_BINS + bins)
        total += row
        before += tl.where(block < pid, row, 0)
    mine = tl.load(block_counts_ptr + pid * HIST_BINS + bins)
    # the sorted row of this block's j-th pair (in expert order) is base[its expert] + j
    base = (tl.cumsum(total, 0) - total) + before - (tl.cumsum(mine, 0) - mine)  # [HIST_BINS]
    offs = tl.arange(0, BLOCK)
    pair = pid * BLOCK + offs
    valid = pair < num_pairs
    expert = tl.load(expert_ptr + pair, mask=valid, other=0).to(tl.int32)
    expert = tl.where(valid & (expert >= 0) & (expert < num_experts), expert, num_experts)
    keys = tl.sort(expert << BLOCK_BITS | offs)  # the padding sorts last (its offsets are the largest)
    local = keys & (BLOCK - 1)
    sorted_row = tl.gather(base, keys >> BLOCK_BITS, 0) + offs
    tl.store(sorted_pair_ptr + sorted_row, pid * BLOCK + local, mask=pid * BLOCK + local < num_pairs)
    if pid == 0:
        tl.store(counts_ptr + bins, total, mask=bins < num_experts)
