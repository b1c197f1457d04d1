"""`triton`: the whole experts forward in two fused Triton GEMM kernels and a streaming sum, after one sort.

    top_k_index [T, k] --flatten--> expert_of_pair [S]             (S = T*k)
    sort by expert      ----------> sorted_pair [S]: pair ids (token*k + slot), expert 0's first
    counts per expert   ----------> counts [E]                     (a histogram, no host sync)
                        (both in one kernel up to 2048 pairs: `sort_pairs`)
    gate_up_kernel: h [S, I] = act(x[token] @ gate^T) * (x[token] @ up^T)  one kernel, gather fused
    down_kernel:    y [S, H] = weight * (h @ down^T), stored at the pair's own row: un-permuted
    sum_top_k_kernel: out [T, H] = the k rows of each token summed          one streaming pass

Compared with `grouped_mm` this drops the gathered copy of x, the [S, 2I] projection, the separate
activation kernels, the weight multiply and the un-permute copy: ~6 launches instead of ~15, and no
intermediate larger than [S, max(I, H)]. Nothing reads a GPU number on the host, so the forward is
capturable in a CUDA graph and traceable by torch.compile.

Decode (T=1, or while T*k*4 <= E: few pairs, seldom two on one expert) skips the sort too:

    decode_gate_up_kernel: h [S, I], one program per (pair, block of columns), a GEMV
    decode_down_kernel:    out [T, H], one program per (token, block of columns), k experts summed
                           in registers — two launches for the whole layer (`uses_decode_path`).

Tile sizes come from H100 measurements (`kernel_configs`, `decode_configs`, tools/tune_triton.py).

On a machine without a CUDA GPU the kernels run in triton's interpreter (numpy, slow): `import
moe_lab` sets TRITON_INTERPRET=1 there before triton is first imported (moe_lab/_triton_setup.py),
so the tests and notebooks run the same kernels on CPU. `triton_status(device)` says whether and
how the backend runs.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from ..devices import cuda_device_facts
from ..errors import BackendInputError
from .common import apply_gate, expert_counts, expert_weights
from .spec import BackendSpec, Support, Where, no, yes


class TritonUnavailableError(NotImplementedError):
    """The triton backend cannot run here (no triton, or CPU tensors without the interpreter)."""


_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import triton_kernels

    return triton_kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result
def _interpreting_cached() -> bool:
    """_interpreting() as the forward sees it: read once (triton fixed its mode at import), constant to dynamo."""
    return _interpreting_once()


@functools.lru_cache(maxsize=None)
def _interpreting_once() -> bool:
    return _interpreting()


def triton_status(device) -> tuple[bool, str]:
    """(runs, why) for the triton backend on `device`, without running anything."""
    return _status_for(torch.device(device).type)


@torch.compiler.assume_constant_result
def _status_for(device_type: str) -> tuple[bool, str]:
    # A constant to torch.compile (dynamo would graph-break on importlib), cached because triton's
    # interpret-or-compile choice is fixed once it is imported.
    return _status_for_cached(device_type)


@functools.lru_cache(maxsize=None)
def _status_for_cached(device_type: str) -> tuple[bool, str]:
    device = torch.device(device_type)
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (it comes with torch's CUDA builds on Linux: pip install triton)"
    if device.type == "cuda":
        if _interpreting():
            return True, "CUDA tensors through triton's interpreter (TRITON_INTERPRET=1): correct but slow"
        return True, "compiled Triton kernels on the GPU"
    if device.type == "cpu":
        if _interpreting():
            return True, "triton's interpreter on CPU (TRITON_INTERPRET=1): numpy, slow; for tests and reading"
        return False, ("triton kernels run on CUDA GPUs; on CPU they need triton's interpreter, which must be "
                       "switched on (TRITON_INTERPRET=1) before triton is first imported")
    return False, f"triton kernels do not run on {device.type}"


def triton_available(device) -> bool:
    return triton_status(device)[0]


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    tma: bool = False  # weight tiles (and down's h tiles) through TMA descriptors where the GPU has TMA


def kernel_configs(rows_per_expert: float, interpreted: bool, wide_output: bool = False, itemsize: int = 2
                   ) -> tuple[KernelConfig, KernelConfig]:
    """Tile sizes for (gate_up_kernel, down_kernel) by the mean rows per expert hit.

    Small groups are memory bound: the smallest row block tl.dot allows (16), so enough programs
    stream the experts' weights; big groups want big tiles for reuse, loaded through TMA.
    `wide_output` means H >= 4096 (a long K for gate_up). Chosen from H100 measurements of every
    candidate in bfloat16 (tools/tune_triton.py; the numbers are in docs/performance_notes.md);
    4-byte dtypes get half the BLOCK_K, so a pipeline stage takes the same shared memory.
    """
    if itemsize > 2 and not interpreted:
        return tuple(dataclasses.replace(config, block_k=config.block_k * 2 // itemsize)
                     for config in kernel_configs(rows_per_expert, interpreted, wide_output))
    if interpreted:  # the interpreter runs programs one by one in numpy: fewer, bigger programs
        return KernelConfig(16, 64, 64, 1, 1), KernelConfig(16, 64, 64, 1, 1)
    if rows_per_expert <= 8:
        return KernelConfig(16, 64, 128, 4, 4), KernelConfig(16, 64, 128, 4, 4)
    if rows_per_expert <= 32:  # ~16 rows: 16-row blocks would split half the experts in two, reading them twice
        return KernelConfig(32, 64, 128, 4, 3), KernelConfig(32, 128, 128, 4, 3)
    if rows_per_expert < 256:
        return KernelConfig(64, 64, 64, 4, 3), KernelConfig(64, 128, 64, 4, 4)
    # Compute bound: TMA tiles (15-25 % faster per kernel on an H100), a fourth stage except for
    # long K (H >= 4096, where three won), and 256-column tiles for down everywhere. From 256 rows
    # on: mixtral at T=1024 and deepseek-v3 at T=8192 have exactly 256.
    return (KernelConfig(128, 128, 64, 8, 3 if wide_output else 4, tma=True),
            KernelConfig(128, 256, 64, 8, 4, tma=True))


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def decode_configs(interpreted: bool) -> tuple[DecodeConfig, DecodeConfig]:
    """Tile sizes for (decode_gate_up_kernel, decode_down_kernel).

    A decode kernel is a GEMV that only streams weight rows, so what matters is many programs with
    many bytes in flight each: 8 rows per program, 8 warps. Measured on an H100 over
    BLOCK_N 8-64 x BLOCK_K 128-512 x 4/8 warps x 1/3 stages on the mixtral, qwen1.5, qwen3 and
    olmoe shapes at T=1 (tools/tune_triton.py, docs/performance_notes.md): 8 rows and 8 warps won
    every time; BLOCK_K 256 (gate_up) and 512 (down) won or were within 3 %.
    """
    if interpreted:
        return DecodeConfig(32, 64, 1, 1), DecodeConfig(32, 64, 1, 1)
    return DecodeConfig(8, 256, 8, 1), DecodeConfig(8, 512, 8, 1)


def uses_decode_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """The token-major decode kernels read one expert's weights once per (token, expert) pair; the
    sorted kernels once per expert hit, after a sort. One token never repeats an expert, so T=1 is
    always decode; beyond that, only while there are at most E/4 pairs. Measured on an H100 (whole
    layer, CUDA-graph replay, tools/tune_triton.py --parts crossover): decode is 15-20 % faster at
    T=2 on qwen3, olmoe and qwen1.5, ties at T*k = E/4 to E/2, and loses from T*k = E on."""
    return num_tokens == 1 or num_tokens * top_k * 4 <= num_experts


def triton_path(num_tokens: int, top_k: int, num_experts: int) -> str:
    """Which kernels the triton backend runs for this many tokens, in words."""
    if uses_decode_path(num_tokens, top_k, num_experts):
        return "decode: 2 token-major GEMV kernels, no sort, k summed in registers"
    return "sorted: sort + 2 grouped-tile kernels (gather and activation fused), k rows summed by torch"


_ACTIVATION_BY_CONFIG = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu"}
_ACTIVATION_BY_TYPE = {
    "SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "ReLU": "relu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
}


def fused_activation(experts) -> str:
    """The activation the gate_up kernel applies itself, or "none" (the module's own gate runs in torch)."""
    if _has_own_gate(experts):
        return "none"  # e.g. gpt-oss's clamped gate: keep its exact formula
    config = getattr(experts, "config", None)
    act_fn = getattr(experts, "act_fn", None)
    name = getattr(config, "activation", None)
    if name in _ACTIVATION_BY_CONFIG and act_fn is getattr(config, "act_fn", None):
        return _ACTIVATION_BY_CONFIG[name]
    if act_fn is torch.nn.functional.silu:
        return "silu"
    if isinstance(act_fn, torch.nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    return _ACTIVATION_BY_TYPE.get(type(act_fn).__name__, "none")


def _has_own_gate(experts) -> bool:
    """True for a module whose `_apply_gate` is its own formula. transformers installs its default
    chunk-in-two gate (`_default_apply_gate`, act(gate) * up) on every experts class without one:
    that is exactly what the kernel fuses, so it does not count."""
    gate = getattr(experts, "_apply_gate", None)
    if gate is None:
        return False
    function = getattr(gate, "__func__", gate)
    return not (getattr(function, "__name__", "") == "_default_apply_gate"
                and getattr(function, "__module__", "").startswith("transformers."))


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    weights = expert_weights(experts)  # gate_up [E, 2I, H], down [E, H, I]
    num_experts, inter = weights.num_experts, weights.intermediate_size
    runs, why = _status_for(hidden_states.device.type)
    if not runs:
        raise TritonUnavailableError(f"the triton backend cannot run here: {why}")
    if hidden_states.dtype not in _KERNEL_DTYPES:
        raise BackendInputError(f"the triton backend runs bfloat16/float16/float32, got {hidden_states.dtype}")
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return hidden_states.new_zeros(num_tokens, hidden)
    activation = fused_activation(experts)
    if uses_decode_path(num_tokens, top_k, num_experts):
        gate_up_width = inter if activation != "none" else 2 * inter
        return _decode_forward(_kernels(), experts, weights, activation, gate_up_width, hidden_states, top_k_index,
                               top_k_weights)

    sorted_pair, counts = sort_pairs(top_k_index, num_experts)  # [S] pair ids grouped by expert, [E]
    rows_per_expert = num_pairs / min(num_experts, num_pairs)
    up_config, down_config = kernel_configs(rows_per_expert, _interpreting_cached(), wide_output=hidden >= 4096,
                                            itemsize=hidden_states.element_size())
    h = launch_gate_up(hidden_states, weights, sorted_pair, counts, top_k, activation, up_config)  # [S, I]
    if activation == "none":
        h = apply_gate(experts, h)  # [S, 2I] -> [S, I] with the module's own formula
    y = launch_down(h, weights, top_k_weights.reshape(-1), sorted_pair, counts, down_config)  # [S, H]
    return launch_sum_over_top_k(y, num_tokens, top_k)  # [T, H]


#: Up to this many pairs one program sorts them (sort_pairs_kernel). Measured on an H100 against
#: torch.sort + histogram (GPU time from CUDA-graph replays: tools/sort_pairs_ab.py, recorded in
#: data/h100_sort_pairs.json): 1.8 vs 13.5 us at 128 pairs, 8.4 vs 25.6 at 1024, 16.9 vs 25.6
#: at 2048 — and 63.7 vs 27.8 at 4096, where one program's bitonic sort has too many stages.
ONE_PROGRAM_SORT_MAX_PAIRS = 2048


def sort_pairs(top_k_index, num_experts):
    """top_k_index [T, k] -> (sorted_pair [S]: pair ids grouped by expert, in pair order within an
    expert; counts [E]). Up to ONE_PROGRAM_SORT_MAX_PAIRS pairs: one kernel. Beyond: torch's sort of
    int32 keys (half the radix passes of int64: 58 vs 95 us for 65k pairs on an H100) and a histogram."""
    expert_of_pair = top_k_index.reshape(-1)  # [S]
    num_pairs = expert_of_pair.numel()
    if num_pairs <= ONE_PROGRAM_SORT_MAX_PAIRS and num_experts <= 2**18:  # keys: expert << 12 | pair < 2**31
        block = max(16, _next_power_of_two(num_pairs))
        sorted_pair = expert_of_pair.new_empty(num_pairs, dtype=torch.int32)
        counts = expert_of_pair.new_empty(num_experts, dtype=torch.int32)
        _kernels().sort_pairs_kernel[(1,)](
            expert_of_pair, sorted_pair, counts, num_pairs, NUM_EXPERTS=num_experts,
            HIST_BINS=_next_power_of_two(num_experts), BLOCK=block, PAIR_BITS=block.bit_length() - 1,
            num_warps=4 if block <= 1024 else 8)
        return sorted_pair, counts
    keys = expert_of_pair.to(torch.int32)  # [S]
    _, sorted_pair = torch.sort(keys, stable=True)  # [S]
    return sorted_pair, expert_counts(keys, num_experts)


def launch_gate_up(hidden_states, weights, sorted_pair, counts, top_k, activation, config: KernelConfig):
    """x [T, H] -> h [S, I] (act(gate) * up; [S, 2I] raw for activation "none") in sorted row order."""
    hidden = hidden_states.shape[1]
    num_pairs, num_experts = sorted_pair.numel(), weights.num_experts
    width = weights.intermediate_size if activation != "none" else 2 * weights.intermediate_size
    h = hidden_states.new_empty(num_pairs, width)  # [S, I] (or [S, 2I] for a custom gate)
    use_tma = _can_use_tma(config, weights.gate_up)
    w = _tile_descriptor(weights.gate_up, config.block_n, config.block_k) if use_tma else weights.gate_up
    _launch(_kernels().gate_up_kernel, config, num_pairs, num_experts, width,
            hidden_states, w, weights.gate_up_bias, h, sorted_pair, counts,
            num_experts, _max_row_blocks(num_pairs, num_experts, config), top_k, width, hidden,
            hidden_states.stride(0), hidden_states.stride(1), *weights.gate_up.stride(),
            *_bias_strides(weights.gate_up_bias), h.stride(0), h.stride(1),
            ACTIVATION=activation, HAS_BIAS=weights.gate_up_bias is not None, USE_TMA=use_tma,
            **_precision_constexprs(hidden_states.dtype, num_experts))
    return h


def launch_down(h, weights, routing_weights, sorted_pair, counts, config: KernelConfig):
    """h [S, I] in sorted row order -> y [S, H] in (token, slot) order, each row times its routing weight."""
    hidden, inter = weights.hidden_size, weights.intermediate_size
    num_pairs, num_experts = sorted_pair.numel(), weights.num_experts
    y = h.new_empty(num_pairs, hidden)  # [S, H]
    use_tma = _can_use_tma(config, weights.down) and _can_use_tma(config, h)
    a = _kernels().tile_descriptor(h, [config.block_m, config.block_k]) if use_tma else h
    w = _tile_descriptor(weights.down, config.block_n, config.block_k) if use_tma else weights.down
    _launch(_kernels().down_kernel, config, num_pairs, num_experts, hidden,
            a, w, weights.down_bias, routing_weights, y, sorted_pair, counts,
            num_experts, _max_row_blocks(num_pairs, num_experts, config), hidden, inter,
            h.stride(0), h.stride(1), *weights.down.stride(), *_bias_strides(weights.down_bias),
            y.stride(0), y.stride(1),
            HAS_BIAS=weights.down_bias is not None, USE_TMA=use_tma, **_precision_constexprs(h.dtype, num_experts))
    return y


def launch_sum_over_top_k(y, num_tokens, top_k):
    """y [S, H] in (token, slot) order -> [T, H], as common.sum_over_top_k but one streaming kernel."""
    hidden = y.shape[1]
    out = y.new_empty(num_tokens, hidden)  # [T, H]
    block_n = min(2048, _next_power_of_two(hidden))
    _kernels().sum_top_k_kernel[(num_tokens, -(-hidden // block_n))](
        y, out, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_N=block_n, num_warps=8)
    return out


def _precision_constexprs(dtype, num_experts) -> dict:
    return dict(
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        DOT_IN_FP32=_interpreting_cached() and dtype == torch.bfloat16,
        NUM_EXPERTS_POW2=_next_power_of_two(num_experts),
    )


def _can_use_tma(config: KernelConfig, w: torch.Tensor) -> bool:
    """TMA tiles need the config to ask for them, a Hopper-or-later GPU (or the interpreter, which
    emulates them), and a contiguous [..., K] tensor (weights [E, rows, K], h [S, K]) whose rows
    are a multiple of 16 bytes."""
    if not config.tma or not w.is_contiguous() or (w.shape[-1] * w.element_size()) % 16:
        return False
    # The base address too; torch.compile cannot trace data_ptr(), and there w is a module's own
    # parameter or a fresh buffer, both allocator-aligned (256 bytes).
    if not torch.compiler.is_compiling() and w.data_ptr() % 16:
        return False
    if _interpreting_cached():
        return True
    return w.device.type == "cuda" and cuda_device_facts(w.device.index or 0)[1] >= 9


def _tile_descriptor(w: torch.Tensor, block_rows: int, block_k: int):
    """A TMA descriptor over w [E, rows, K] viewed as [E*rows, K], in [block_rows, block_k] tiles."""
    return _kernels().tile_descriptor(w.view(-1, w.shape[-1]), [block_rows, block_k])


def _decode_forward(kernels, experts, weights, activation, gate_up_width, hidden_states, top_k_index,
                    top_k_weights):
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    num_pairs = num_tokens * top_k
    up_config, down_config = decode_configs(_interpreting_cached())
    expert_of_pair = top_k_index.reshape(-1)  # [S] in pair order: no sort
    h = hidden_states.new_empty(num_pairs, gate_up_width)  # [S, I]
    grid = (num_pairs * -(-gate_up_width // up_config.block_n),)
    kernels.decode_gate_up_kernel[grid](
        hidden_states, weights.gate_up, weights.gate_up_bias, h, expert_of_pair,
        top_k, gate_up_width, hidden,
        hidden_states.stride(0), hidden_states.stride(1), *weights.gate_up.stride(),
        *_bias_strides(weights.gate_up_bias), h.stride(0), h.stride(1),
        ACTIVATION=activation, HAS_BIAS=weights.gate_up_bias is not None,
        BLOCK_N=up_config.block_n, BLOCK_K=up_config.block_k, num_warps=up_config.num_warps,
        num_stages=up_config.num_stages)
    if activation == "none":
        h = apply_gate(experts, h)  # [S, 2I] -> [S, I]
    out = hidden_states.new_empty(num_tokens, hidden)  # [T, H]
    grid = (num_tokens * -(-hidden // down_config.block_n),)
    kernels.decode_down_kernel[grid](
        h, weights.down, weights.down_bias, expert_of_pair, top_k_weights.reshape(-1), out,
        hidden, weights.intermediate_size,
        h.stride(0), h.stride(1), *weights.down.stride(), *_bias_strides(weights.down_bias),
        out.stride(0), out.stride(1),
        TOP_K=top_k, HAS_BIAS=weights.down_bias is not None, BLOCK_N=down_config.block_n, BLOCK_K=down_config.block_k,
        num_warps=down_config.num_warps, num_stages=down_config.num_stages)
    return out


def _bias_strides(bias):
    return (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)


def _max_row_blocks(num_pairs, num_experts, config: KernelConfig) -> int:
    """Row blocks never straddle experts, so there are at most S/BLOCK_M + (experts hit) of them, and
    never more than S (each holds at least one row): a bound known without reading the counts."""
    return min(num_pairs, -(-num_pairs // config.block_m) + min(num_experts, num_pairs))


def _launch(kernel, config: KernelConfig, num_pairs, num_experts, width, *args, **constexprs):
    grid = (_max_row_blocks(num_pairs, num_experts, config) * -(-width // config.block_n),)
    kernel[grid](*args, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                 GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages, **constexprs)


# ---------------------------------------------------------------------------------------------
# What the backend can do (moe_lab.backends.spec): asked by auto, GraphedExperts, the bench, ...
# ---------------------------------------------------------------------------------------------

def _runs(where: Where) -> Support:
    runs, why = triton_status(where.device)
    if not runs:
        return no(why)
    if where.dtype not in _KERNEL_DTYPES:
        names = "/".join(str(d).removeprefix("torch.") for d in _KERNEL_DTYPES)
        return no(f"the triton kernels take {names}, not {str(where.dtype).removeprefix('torch.')}")
    return yes(why, slow=_interpreting())


_ON_THE_GPU = "the sort, the counts and the tile schedule stay on the GPU: nothing is read on the host"

SPEC = BackendSpec(
    name="triton",
    forward=triton_experts_forward,
    summary="fused Triton kernels: one sort, gate_up with the gather and activation fused, down with the "
            "routing weight and un-permute fused, a streaming top-k sum",
    runs=_runs,
    autograd=no("its kernels have no backward pass: the output would be detached from the weights"),
    cuda_graph=yes(_ON_THE_GPU),
    fullgraph=yes("its launches trace: the run mode and the device facts are constants to dynamo"),
    sync_free=yes(_ON_THE_GPU),
    builtin=True,
)
