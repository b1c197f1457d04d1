"""`grouped_mm`: sort the (token, expert) pairs by expert and run ONE grouped GEMM per projection.

    top_k_index [T, k] --flatten--> expert_of_pair [S] int32   (S = T*k)
    sort by expert      ----------> pair_order [S]: pairs of expert 0, then expert 1, ...
    histogram, cumsum   ----------> offsets [E] int32: group e is rows offsets[e-1]:offsets[e]
    x_sorted = hidden[pair_order // k]              [S, H]
    gate_up  = grouped_mm(x_sorted, gate_up_proj^T) [S, 2I]   one kernel for all experts
    h        = act(gate) * up                       [S, I]
    y        = grouped_mm(h, down_proj^T)           [S, H]    one kernel
    un-permute (a gather with the inverse order), times routing weights, sum each token's k rows -> [T, H]

No step needs a number on the host, so on a GPU with the native kernel the whole forward is
sync-free (capturable in a CUDA graph). Experts with zero tokens are empty groups and cost
nothing. `grouped_mm_path()` tells which grouped matmul runs and why.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..devices import cuda_device_facts
from .common import apply_gate, expert_counts, expert_weights, sum_over_top_k
from .grouped_loop import grouped_matmul_loop
from .spec import BackendSpec, Support, Where, no, yes

_TORCH_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_HAS_CPU_KERNEL = torch.__version__ >= (2, 9)  # a version comparison parses strings: once, not per call


@dataclass(frozen=True)
class GroupedMMPath:
    """Which grouped matmul the grouped_mm backend runs for some device, dtype and shape."""

    kernel: str  # "torch.nn.functional.grouped_mm", "torch._grouped_mm" or "moe_lab loop"
    native: bool  # True: one fused grouped-GEMM kernel; False: a loop of per-expert matmuls
    reason: str

    @property
    def uses_torch_op(self) -> bool:
        return self.kernel != "moe_lab loop"


def _torch_op_name() -> str:
    return "torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "torch._grouped_mm"


def grouped_mm_path(device, dtype: torch.dtype, hidden_size: int, intermediate_size: int,
                    *, compiling: bool | None = None) -> GroupedMMPath:
    """Decide (and explain) the grouped matmul for this device, dtype and layer shape.

    Rules, from torch's own checks: the op exists in torch >= 2.8 (CPU kernels from 2.9); it takes
    bf16/fp16/fp32 with every row a multiple of 16 bytes; torch.compile traces it for bf16 only;
    on CUDA its fused CUTLASS kernel runs for bf16 on SM90/SM100, and anything else runs torch's
    per-group loop (which copies the offsets to the host).
    """
    compiling = torch.compiler.is_compiling() if compiling is None else compiling
    if compiling:  # traced once per graph, so nothing to save; dynamo would only skip the cache anyway
        return _decide_path(torch.device(device), dtype, hidden_size, intermediate_size, True)
    # Launched from Python the forward asks on every call; the answer never changes for a key.
    return _decide_path_cached(torch.device(device), dtype, hidden_size, intermediate_size)


def _decide_path(device: torch.device, dtype: torch.dtype, hidden_size: int, intermediate_size: int,
                 compiling: bool) -> GroupedMMPath:
    loop = "moe_lab loop"
    if _TORCH_GROUPED_MM is None:
        return GroupedMMPath(loop, False, f"torch {torch.__version__} has no grouped_mm op")
    if device.type == "cpu" and not _HAS_CPU_KERNEL:
        return GroupedMMPath(loop, False, f"torch {torch.__version__} has no CPU kernel for grouped_mm (2.9+)")
    if dtype not in _KERNEL_DTYPES:
        return GroupedMMPath(loop, False, f"grouped_mm accepts bfloat16/float16/float32, not {dtype}")
    itemsize = dtype.itemsize  # bytes per element, no tensor allocated
    for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if (size * itemsize) % 16:
            return GroupedMMPath(
                loop, False,
                f"{name}={size} x {itemsize} bytes is not a multiple of 16 bytes (grouped_mm's row alignment rule)",
            )
    if compiling and dtype != torch.bfloat16:
        return GroupedMMPath(loop, False, f"torch.compile traces grouped_mm for bfloat16 only, not {dtype}")
    op = _torch_op_name()
    if device.type == "cuda":
        count, major, minor = cuda_device_facts(device.index or 0)
        if major < 0:  # torch would raise AssertionError
            raise ValueError(f"no CUDA device {device} here (torch.cuda.device_count() = {count}); "
                             "on a GPU the path depends on its compute capability")
        if dtype == torch.bfloat16 and major in (9, 10):
            return GroupedMMPath(op, True, f"bfloat16 on SM{major}{minor}: torch's fused CUTLASS grouped GEMM")
        why = f"{dtype} on SM{major}{minor}" if dtype != torch.bfloat16 else f"SM{major}{minor} (not SM90/SM100)"
        return GroupedMMPath(op, False, f"{why}: torch runs its per-group matmul loop (offsets copied to the host)")
    return GroupedMMPath(op, False, f"on {device.type}, torch's grouped_mm is a per-group matmul loop")


@functools.lru_cache(maxsize=64)
def _decide_path_cached(device: torch.device, dtype: torch.dtype, hidden_size: int,
                        intermediate_size: int) -> GroupedMMPath:
    return _decide_path(device, dtype, hidden_size, intermediate_size, False)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, path: GroupedMMPath) -> torch.Tensor:
    """[S, K] x [E, K, N] with groups delimited by `offsets` -> [S, N]."""
    if path.uses_torch_op:
        return _TORCH_GROUPED_MM(x, w, offs=offsets)
    return grouped_matmul_loop(x.contiguous(), w, offsets)


def grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    num_experts = expert_weights(experts).num_experts

    # int32 keys: a radix sort of 32-bit keys takes half the passes of int64 ones.
    expert_of_pair = top_k_index.reshape(-1).to(torch.int32)  # [S = T*k]
    expert_sorted, pair_order = torch.sort(expert_of_pair, stable=True)  # [S], [S]
    x_sorted = hidden_states[pair_order // top_k]  # [S, H], rows grouped by expert
    # Counts from a fixed-size histogram, not bincount: bincount sizes its output from the data
    # (a host sync on CUDA).
    counts = expert_counts(expert_sorted, num_experts)  # [E]
    y = grouped_mm_sorted_rows(experts, x_sorted, counts, expert_sorted)  # [S, H]

    # Un-permute as a gather: sorted_row_of_pair[p] is where pair p's row landed. A gather, unlike
    # a scatter into an empty buffer, fuses with the weighting and the sum under torch.compile.
    sorted_row_of_pair = torch.empty_like(pair_order)
    sorted_row_of_pair[pair_order] = torch.arange(pair_order.numel(), device=pair_order.device)  # [S]
    y = y[sorted_row_of_pair]  # [S, H] in (token, slot) order; rebinding frees the sorted copy
    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)  # not in place: autograd needs y for the weights' grad
    return sum_over_top_k(y, num_tokens, top_k)  # [T, H]


def grouped_mm_sorted_rows(experts, rows, counts, expert_of_row=None):
    """[R, H] rows grouped by expert (expert 0's first), counts [E] (summing to R) -> [R, H] unweighted:
    the two grouped GEMMs and the gate, nothing else. The backend's `sorted_rows` entry (spec.py), and the
    middle of its own forward. expert_of_row [R]: each row's expert, needed only for biases (rebuilt from
    the counts when not given)."""
    weights = expert_weights(experts)  # gate_up [E, 2I, H], down [E, H, I]
    path = grouped_mm_path(rows.device, rows.dtype, weights.hidden_size, weights.intermediate_size)
    # One expert: its count is the offset. (Inductor's cumsum rewrite fails on a one-element cumsum of
    # a symbolic size: grouped_mm with E=1 under torch.compile(dynamic=True).)
    offsets = counts.int() if weights.num_experts == 1 else torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E]
    if expert_of_row is None and (weights.gate_up_bias is not None or weights.down_bias is not None):
        expert_of_row = torch.repeat_interleave(torch.arange(weights.num_experts, device=rows.device), counts.long(),
                                                output_size=rows.shape[0])  # [R]
    gate_up = grouped_matmul(rows, weights.gate_up.transpose(-2, -1), offsets, path)  # [R, 2I]
    if weights.gate_up_bias is not None:
        gate_up = gate_up + weights.gate_up_bias[expert_of_row]
    h = apply_gate(experts, gate_up)  # [R, I]
    y = grouped_matmul(h, weights.down.transpose(-2, -1), offsets, path)  # [R, H]
    if weights.down_bias is not None:
        y = y + weights.down_bias[expert_of_row]
    return y


def _path_at(where: Where, compiling: bool = False) -> GroupedMMPath:
    # Without a shape, assume rows of 16-byte multiples (every real model's): the common case.
    return grouped_mm_path(where.device, where.dtype, where.hidden_size or 64, where.intermediate_size or 64,
                           compiling=compiling)


def _sync_free(where: Where) -> Support:
    path = _path_at(where)
    if path.native:
        return yes(f"{path.reason}, which reads the group offsets on the GPU")
    return no(f"{path.reason}: the group offsets are read on the host")


def _fullgraph(where: Where) -> Support:
    path = _path_at(where, compiling=True)
    if path.uses_torch_op:
        return yes(f"torch.compile traces {path.kernel} ({where.dtype})")
    return yes(f"{path.reason}; moe_lab's loop is a custom op, one opaque call to torch.compile")


SPEC = BackendSpec(
    name="grouped_mm",
    forward=grouped_mm_experts_forward,
    summary="sort the (token, expert) pairs by expert, one grouped GEMM per projection, un-permute",
    runs=yes("torch's grouped_mm where it can run, moe_lab's loop elsewhere (grouped_mm_path says which)"),
    autograd=yes("torch's grouped_mm has a backward; moe_lab's loop fallback is a custom op with an explicit backward"),
    cuda_graph=_sync_free,  # capturable exactly when nothing is read on the host
    fullgraph=_fullgraph,
    sync_free=_sync_free,
    builtin=True,
    kernel_path=lambda where, compiling=False: _path_at(where, compiling).kernel,
    sorted_rows=grouped_mm_sorted_rows,
)
