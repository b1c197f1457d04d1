"""The backward kernels of the `triton` backend. Imported only when triton is installed.

Notation as in the forward (triton_kernels.py): S = T*k pairs sorted by expert, sorted row r holds
pair(r) = token(r) * k + slot of expert e; pre [S, 2I] = [g | u] = x[token] @ gate_up[e]^T (+ bias),
h = act(g) * u, z = h @ down[e]^T (+ bias), y = weight * z, out[t] = the sum of its k rows of y.
Given dout [T, H]:

  down_backward_kernel (row blocks of one expert x column blocks of I, like gate_up_kernel):
      acc[r]    = dout[token(r)] @ down[e]                  [S, I]   gathered rows, K = H
      dh[r]     = weight(pair(r)) * acc[r]
      d_pre[r]  = [dh * u * act'(g) | dh * act(g)]          [S, 2I]  the activation's backward, fused
      weighted_h[r] = weight * h                            [S, I]   the operand of dW_down
      dw_partial[pair(r), column block] = sum over the block's columns of acc * h
                d top_k_weights = <dout[t], z> = <dout[t] @ down[e], h> (+ <dout[t], down_bias[e]>),
                summed over the column blocks by the caller; no [S, H] z is kept
      ACTIVATION="none" (a module's own gate runs in torch): it reads h, writes d_pre = dh [S, I].
  down_kernel (triton_kernels.py) then gives dX: d_pre @ gate_up[e] stored at each pair's row, and
  sum_top_k_kernel sums a token's k rows.
  expert_weight_grad_kernel (one program per expert x weight tile; the reduction runs over that
  expert's sorted rows, so the grid is E x tiles, known on the host without reading the counts):
      dW_gate_up[e] = sum over e's rows of d_pre[r]^T x[token(r)]      [2I, H]   (+ d bias = row sums)
      dW_down[e]    = sum over e's rows of dout[token(r)]^T weighted_h[r]   [H, I]   (+ d bias)
  split_down_backward (plan): the same in two kernels, down_kernel's GEMM of dout's sorted rows
  into an [S, I] buffer in the model dtype, then activation_backward_kernel streaming it with the saved
  pre-activation; the fused kernel's epilogue holds five [BM, BN] tiles besides the accumulator.
  With the plan's sorted_grad_out / sorted_hidden_states the launchers first gather dout / x into
  sorted row order ([S, H]); down_backward and the weight gradients then read row tiles that are
  contiguous, through TMA descriptors where the config asks, instead of gathering rows themselves.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import _activation, _grouped_program_order, _sorted_row_block


@triton.jit
def _activation_derivative(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx for the activations _activation fuses, in float32."""
    if ACTIVATION == "silu":
        sigmoid = tl.sigmoid(x)
        x = sigmoid * (1.0 + x * (1.0 - sigmoid))
    elif ACTIVATION == "gelu":
        # Phi(x) + x * phi(x): the normal CDF plus x times the normal density
        x = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == "gelu_tanh":
        # act = x * s with s = sigmoid(2z) = (1 + tanh z) / 2, z = c * (x + 0.044715 x^3):
        # act' = s + x * 2 s (1 - s) * z'
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * z)
        x = s + x * 2.0 * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACTIVATION == "relu":
        x = tl.where(x > 0.0, 1.0, 0.0)
    return x


@triton.jit
def down_backward_kernel(
    dout_ptr, w_ptr, routing_weight_ptr, saved_ptr, d_pre_ptr, weighted_h_ptr, dw_partial_ptr,
    sorted_pair_ptr, counts_ptr,
    num_experts, num_m_blocks, top_k, N, K,
    stride_dt, stride_dk, stride_we, stride_wk, stride_wn, stride_sm, stride_sn, stride_gm, stride_gn,
    stride_hm, stride_hn, stride_dwp, stride_dwn,
    ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    NUM_EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, DOUT_SORTED: tl.constexpr = False, DOUT_TMA: tl.constexpr = False,
    W_TILE_KN: tl.constexpr = True,
):
    """dout [T, K=H], w = down [E, H, I] read as [E, K, N=I] -> d_pre, weighted_h, dw_partial.
    saved is pre [S, 2I] for a fused ACTIVATION, h [S, I] for "none". With USE_TMA, w_ptr is a
    descriptor over down viewed [E*H, I] in [BLOCK_K, BLOCK_N] tiles (W_TILE_KN; K a multiple of
    BLOCK_K), or, for down stored [E, I, H] (transformers' `is_transposed`), over that storage viewed
    [E*I, H] in [BLOCK_N, BLOCK_K] tiles.
    DOUT_SORTED: dout is already gathered into sorted row order, [S, H], read at the sorted rows;
    with DOUT_TMA through a descriptor in [BLOCK_M, BLOCK_K] tiles (rows past the expert's only
    reach accumulator rows that are masked at every store, and h is zero there)."""
    expert, pid_n, first_row, sorted_rows, row_mask, pair = _sorted_row_block(
        counts_ptr, sorted_pair_ptr, num_experts, num_m_blocks, N, NUM_EXPERTS_POW2, BLOCK_M, BLOCK_N, GROUP_M)
    if expert >= num_experts:
        return
    token = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    if not DOUT_TMA:
        dout_rows = token
        if DOUT_SORTED:
            dout_rows = sorted_rows
        a_ptrs = dout_ptr + dout_rows[:, None] * stride_dt + offs_k[None, :] * stride_dk  # [BM, BK] (gathered) rows
    if USE_TMA:
        if W_TILE_KN:
            w_row = expert * K  # this expert's first row in [E*H, I]
        else:
            w_row = expert * (stride_we // stride_wn) + pid_n * BLOCK_N  # first row of the tile in [E*I, H]
    else:
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        if DOUT_TMA:
            a = dout_ptr.load([first_row, k0])  # [BM, BK]
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if USE_TMA:
            if W_TILE_KN:
                w = w_ptr.load([w_row + k0, pid_n * BLOCK_N])  # [BK, BN]
            else:
                w = w_ptr.load([w_row, k0]).T  # [BN, BK] -> [BK, BN]
        else:
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if not DOUT_TMA:
            a_ptrs += BLOCK_K * stride_dk
        if not USE_TMA:
            w_ptrs += BLOCK_K * stride_wk

    weight = tl.load(routing_weight_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
    row_sums = _activation_backward_tile(
        acc, weight, saved_ptr, d_pre_ptr, weighted_h_ptr, sorted_rows, row_mask, offs_n, n_mask, N,
        stride_sm, stride_sn, stride_gm, stride_gn, stride_hm, stride_hn, ACTIVATION)
    tl.store(dw_partial_ptr + pair * stride_dwp + pid_n * stride_dwn, row_sums, mask=row_mask)


@triton.jit
def _activation_backward_tile(acc, weight, saved_ptr, d_pre_ptr, weighted_h_ptr, sorted_rows, row_mask, offs_n,
                              n_mask, N, stride_sm, stride_sn, stride_gm, stride_gn, stride_hm, stride_hn,
                              ACTIVATION: tl.constexpr):
    """From acc = dout @ down[e] [BM, BN] (float32) of sorted rows: store d_pre's (and weighted_h's)
    tile, return the rows' sums of acc * h [BM] (their part of d top_k_weights)."""
    tile_mask = row_mask[:, None] & n_mask[None, :]
    weight = weight[:, None]  # [BM, 1]
    saved_ptrs = saved_ptr + sorted_rows[:, None] * stride_sm + offs_n[None, :] * stride_sn
    d_pre_ptrs = d_pre_ptr + sorted_rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
    out_dtype = d_pre_ptr.dtype.element_ty
    if ACTIVATION != "none":
        gate = tl.load(saved_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        up = tl.load(saved_ptrs + N * stride_sn, mask=tile_mask, other=0.0).to(tl.float32)
        activated = _activation(gate, ACTIVATION)
        # h as the forward's down GEMM read it: rounded to the model dtype
        h = (activated * up).to(out_dtype).to(tl.float32)
        dh = acc * weight
        tl.store(d_pre_ptrs, (dh * up * _activation_derivative(gate, ACTIVATION)).to(out_dtype), mask=tile_mask)
        tl.store(d_pre_ptrs + N * stride_gn, (dh * activated).to(out_dtype), mask=tile_mask)
    else:
        h = tl.load(saved_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(d_pre_ptrs, (acc * weight).to(out_dtype), mask=tile_mask)
    weighted_h_ptrs = weighted_h_ptr + sorted_rows[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(weighted_h_ptrs, (h * weight).to(weighted_h_ptr.dtype.element_ty), mask=tile_mask)
    # h is zero outside the tile's rows and columns, so the row sums need no mask (and acc, which may
    # hold other experts' rows there when its dout rows came through TMA, does not count)
    return tl.sum(acc * h, axis=1)


@triton.jit
def activation_backward_kernel(
    acc_ptr, routing_weight_ptr, saved_ptr, d_pre_ptr, weighted_h_ptr, dw_ptr, sorted_pair_ptr, counts_ptr,
    num_experts, num_pairs, N, stride_am, stride_an, stride_sm, stride_sn, stride_gm, stride_gn, stride_hm, stride_hn,
    ACTIVATION: tl.constexpr, NUM_EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The split down_backward's second half: acc [S, N=I] in the model dtype (dout's sorted rows @ down[e],
    from down_kernel) -> d_pre, weighted_h, and dw [S] in pair order: each program streams BLOCK_M
    whole rows, so a row's sum over its columns needs no partial buffer. Only the experts' rows
    (the counts' sum) are computed: a pair with an out-of-range expert id sorts after them (sort_pairs),
    has no acc row, and gets dw = 0 here, so every one of the S pairs is written."""
    expert_ids = tl.arange(0, NUM_EXPERTS_POW2)
    counted_rows = tl.sum(tl.load(counts_ptr + expert_ids, mask=expert_ids < num_experts, other=0).to(tl.int32))
    sorted_rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_mask = sorted_rows < counted_rows
    pair_mask = sorted_rows < num_pairs
    pair = tl.load(sorted_pair_ptr + sorted_rows, mask=pair_mask, other=0).to(tl.int64)
    weight = tl.load(routing_weight_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
    row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.load(acc_ptr + sorted_rows[:, None] * stride_am + offs_n[None, :] * stride_an,
                      mask=row_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        row_sums += _activation_backward_tile(
            acc, weight, saved_ptr, d_pre_ptr, weighted_h_ptr, sorted_rows, row_mask, offs_n, n_mask, N,
            stride_sm, stride_sn, stride_gm, stride_gn, stride_hm, stride_hn, ACTIVATION)
    tl.store(dw_ptr + pair, row_sums, mask=pair_mask)  # zero past the counted rows


@triton.jit
def expert_weight_grad_kernel(
    left_ptr, right_ptr, row_scale_ptr, out_ptr, bias_out_ptr, sorted_pair_ptr, counts_ptr,
    num_experts, top_k, M, N,
    stride_lr, stride_lm, stride_rr, stride_rn, stride_oe, stride_om, stride_on, stride_be, stride_bm,
    LEFT_BY_TOKEN: tl.constexpr, RIGHT_BY_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_ROW_SCALED: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    NUM_EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, LEFT_TMA: tl.constexpr = False, RIGHT_TMA: tl.constexpr = False,
):
    """out[e] [M, N] = sum over expert e's sorted rows r of left[row]^T right[row], where a
    *_BY_TOKEN operand is a [T, *] tensor read at token(r) and the other a [S, *] one read at r.
    HAS_BIAS: bias_out[e] [M] = the sum of the left rows (times row_scale[pair(r)] if
    BIAS_ROW_SCALED), by the programs of the first column block. An expert without rows gets zeros.

    *_TMA (only for an operand in sorted order): its pointer is a descriptor over [S, M] (or
    [S, N]) in [BLOCK_K, BLOCK_M] ([BLOCK_K, BLOCK_N]) tiles. The loop runs over the expert's whole
    row blocks without masks, then one masked block for the rest: a TMA tile past the expert's
    last row holds the next expert's rows, which must not enter the sum, so the tail zeroes them."""
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    tiles_per_expert = num_m_blocks * tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // tiles_per_expert
    pid_m, pid_n = _grouped_program_order(pid % tiles_per_expert, num_m_blocks, N, BLOCK_N, GROUP_M)
    expert_ids = tl.arange(0, NUM_EXPERTS_POW2)
    counts = tl.load(counts_ptr + expert_ids, mask=expert_ids < num_experts, other=0).to(tl.int32)  # [E]
    num_rows = tl.sum(tl.where(expert_ids == expert, counts, 0), axis=0)
    first_row = tl.sum(tl.where(expert_ids < expert, counts, 0), axis=0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    whole_rows = num_rows - num_rows % BLOCK_K
    for r0 in range(0, whole_rows, BLOCK_K):
        acc, bias_acc = _weight_grad_step(
            acc, bias_acc, left_ptr, right_ptr, row_scale_ptr, sorted_pair_ptr, first_row + r0, BLOCK_K, top_k,
            pid_m, pid_n, offs_m, offs_n, m_mask, n_mask, stride_lr, stride_lm, stride_rr, stride_rn,
            LEFT_BY_TOKEN, RIGHT_BY_TOKEN, HAS_BIAS, BIAS_ROW_SCALED, INPUT_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N,
            BLOCK_K, LEFT_TMA, RIGHT_TMA, MASK_ROWS=False)
    if whole_rows < num_rows:
        acc, bias_acc = _weight_grad_step(
            acc, bias_acc, left_ptr, right_ptr, row_scale_ptr, sorted_pair_ptr, first_row + whole_rows,
            num_rows - whole_rows, top_k, pid_m, pid_n, offs_m, offs_n, m_mask, n_mask, stride_lr, stride_lm, stride_rr,
            stride_rn, LEFT_BY_TOKEN, RIGHT_BY_TOKEN, HAS_BIAS, BIAS_ROW_SCALED, INPUT_PRECISION, DOT_IN_FP32,
            BLOCK_M, BLOCK_N, BLOCK_K, LEFT_TMA, RIGHT_TMA, MASK_ROWS=True)

    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + offs_m[:, None].to(tl.int64) * stride_om
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:
        if pid_n == 0:
            bias_ptrs = bias_out_ptr + expert.to(tl.int64) * stride_be + offs_m * stride_bm
            tl.store(bias_ptrs, bias_acc.to(bias_out_ptr.dtype.element_ty), mask=m_mask)


@triton.jit
def _weight_grad_step(
    acc, bias_acc, left_ptr, right_ptr, row_scale_ptr, sorted_pair_ptr, first_row, rows_left, top_k,
    pid_m, pid_n, offs_m, offs_n, m_mask, n_mask, stride_lr, stride_lm, stride_rr, stride_rn,
    LEFT_BY_TOKEN: tl.constexpr, RIGHT_BY_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ROW_SCALED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, LEFT_TMA: tl.constexpr, RIGHT_TMA: tl.constexpr, MASK_ROWS: tl.constexpr,
):
    """acc += left[rows]^T right[rows] for the BLOCK_K sorted rows from first_row (only the first
    rows_left of them with MASK_ROWS); bias_acc += the left rows' (scaled) sum on column block 0."""
    offs_r = tl.arange(0, BLOCK_K)
    r_mask = offs_r < rows_left  # [BK]; all true without MASK_ROWS
    sorted_rows = (first_row + offs_r).to(tl.int64)  # [BK]
    pair = sorted_rows
    if LEFT_BY_TOKEN or RIGHT_BY_TOKEN or BIAS_ROW_SCALED:
        pair = tl.load(sorted_pair_ptr + sorted_rows, mask=r_mask, other=0).to(tl.int64)
    left = _rows_tile(left_ptr, sorted_rows, pair // top_k, r_mask, offs_m, m_mask, first_row, pid_m,
                      stride_lr, stride_lm, LEFT_BY_TOKEN, LEFT_TMA, MASK_ROWS, BLOCK_M)  # [BK, BM]
    right = _rows_tile(right_ptr, sorted_rows, pair // top_k, r_mask, offs_n, n_mask, first_row, pid_n,
                       stride_rr, stride_rn, RIGHT_BY_TOKEN, RIGHT_TMA, MASK_ROWS, BLOCK_N)  # [BK, BN]
    # A TMA tile holds rows past the expert's: the next expert's, or after the last expert the rows of
    # out-of-range pairs (transformers' expert-parallel sentinels), which no kernel writes in d_pre or
    # weighted_h and may hold anything, NaN included. Zero every TMA side: a zero on the other side
    # would not do (0 * NaN is NaN). A pointer-loaded tile is masked to zeros at the load.
    if MASK_ROWS and LEFT_TMA:
        left = tl.where(r_mask[:, None], left, 0.0).to(left.dtype)
    if MASK_ROWS and RIGHT_TMA:
        right = tl.where(r_mask[:, None], right, 0.0).to(right.dtype)
    if HAS_BIAS:
        if pid_n == 0:
            rows = tl.where(r_mask[:, None], left.to(tl.float32), 0.0)
            if BIAS_ROW_SCALED:
                rows = rows * tl.load(row_scale_ptr + pair, mask=r_mask, other=0.0).to(tl.float32)[:, None]
            bias_acc += tl.sum(rows, axis=0)
    if DOT_IN_FP32:
        left, right = left.to(tl.float32), right.to(tl.float32)
    acc = tl.dot(tl.trans(left), right, acc, input_precision=INPUT_PRECISION)
    return acc, bias_acc


@triton.jit
def _rows_tile(ptr, sorted_rows, token, r_mask, offs_c, c_mask, first_row, pid_c, stride_r, stride_c,
               BY_TOKEN: tl.constexpr, TMA: tl.constexpr, MASK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One operand's [BLOCK_K, BLOCK_C] tile of the weight-gradient loop: a TMA tile of a sorted
    tensor (rows past the expert's included), or a pointer load of sorted or token rows."""
    if TMA:
        tile = ptr.load([first_row, pid_c * BLOCK_C])
    else:
        rows = sorted_rows
        if BY_TOKEN:
            rows = token
        mask = c_mask[None, :]
        if MASK_ROWS:
            mask = r_mask[:, None] & c_mask[None, :]
        tile = tl.load(ptr + rows[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)
    return tile
