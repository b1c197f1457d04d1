"""`triton`: the whole experts forward in two fused Triton GEMM kernels and a streaming sum, after
one sort; and, when a gradient is needed, a backward of four fused GEMM kernels (triton_autograd.py).

    top_k_index [T, k] --flatten--> expert_of_pair [S]             (S = T*k)
    sort by expert      ----------> sorted_pair [S]: pair ids (token*k + slot), expert 0's first
    counts per expert   ----------> counts [E]                     (a histogram, no host sync)
                        (in one kernel up to 2048 pairs, in two above: `sort_pairs`)
    gate_up_kernel: h [S, I] = act(x[token] @ gate^T) * (x[token] @ up^T)  one kernel, gather fused
    down_kernel:    y [S, H] = weight * (h @ down^T), stored at the pair's own row: un-permuted
    sum_top_k_kernel: out [T, H] = the k rows of each token summed          one streaming pass

Compared with `grouped_mm` this drops the gathered copy of x, the [S, 2I] projection, the separate
activation kernels, the weight multiply and the un-permute copy: ~6 launches instead of ~15, and no
intermediate larger than [S, max(I, H)]. Nothing reads a GPU number on the host, so the forward is
capturable in a CUDA graph and traceable by torch.compile.

Decode (T=1, or while T*k*4 <= E for experts of H <= 2048: few pairs, seldom two on one expert)
skips the sort too:

    decode_gate_up_kernel: h [S, I], one program per (pair, block of columns), a GEMV
    decode_down_kernel:    out [T, H], one program per (token, block of columns), k experts summed
                           in registers — two launches for the whole layer (`uses_decode_path`).

An expert id outside [0, E) (expert parallelism's "another rank's expert") contributes nothing on the
sorted path: its pair sorts after every expert and the top-k sums skip it. That path is the spec's
`partial_forward`, with gradients (the absent slots' routing gradient is 0); the decode kernels assume
every id is in range.

Training: when grad mode is on and any of the hidden states, the weights, the biases or the
routing weights requires grad, the sorted path runs through torch custom ops whose backward is
fused and sync-free too (triton_autograd.py, triton_backward.py); the decode path is skipped then.
Without a gradient the forward launches exactly the kernels above and writes nothing more.

Which kernels run with which tiles is one value, the `LaunchPlan` (triton_plan.py), chosen from
the shape by `launch_plan`; the tools pass their own (`triton_experts_forward(..., plan=...)`).

On a machine without a CUDA GPU the kernels run in triton's interpreter (numpy, slow): `import
moe_lab` sets TRITON_INTERPRET=1 there before triton is first imported (moe_lab/_triton_setup.py),
so the tests and notebooks run the same kernels on CPU. `triton_status(device)` says whether and
how the backend runs.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch

from ..compile_marks import assume_constant_result
from ..errors import BackendInputError
from .common import expert_weights, needs_grad
from .spec import BackendSpec, Support, Where, no, yes
from .triton_autograd import compiled_inference_forward, experts_forward_with_grad
from .triton_launch import (
    decode_forward,
    interpreting,
    interpreting_cached,
    launch_down,
    launch_gate_up,
    launch_sum_over_top_k,
    sort_pairs,
    sorted_forward,
)
from .triton_plan import (
    ONE_PROGRAM_SORT_MAX_PAIRS,
    DecodeConfig,
    KernelConfig,
    LaunchPlan,
    backward_configs,
    decode_configs,
    kernel_configs,
    launch_plan,
    uses_decode_path,
    weights_transposed,
)

__all__ = [
    "DecodeConfig", "KernelConfig", "LaunchPlan", "ONE_PROGRAM_SORT_MAX_PAIRS", "TritonUnavailableError",
    "backward_configs", "decode_configs", "fused_activation", "kernel_configs", "launch_down", "launch_gate_up",
    "launch_plan", "launch_sum_over_top_k", "sort_pairs", "triton_available", "triton_experts_forward",
    "triton_path", "triton_status", "uses_decode_path", "weights_transposed",
]


class TritonUnavailableError(NotImplementedError):
    """The triton backend cannot run here (no triton, or CPU tensors without the interpreter)."""


_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_status(device) -> tuple[bool, str]:
    """(runs, why) for the triton backend on `device`, without running anything."""
    return _status_for(torch.device(device).type)


@assume_constant_result
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
        if interpreting():
            return True, "CUDA tensors through triton's interpreter (TRITON_INTERPRET=1): correct but slow"
        return True, "compiled Triton kernels on the GPU"
    if device.type == "cpu":
        if interpreting():
            return True, "triton's interpreter on CPU (TRITON_INTERPRET=1): numpy, slow; for tests and reading"
        return False, ("triton kernels run on CUDA GPUs; on CPU they need triton's interpreter, which must be "
                       "switched on (TRITON_INTERPRET=1) before triton is first imported")
    return False, f"triton kernels do not run on {device.type}"


def triton_available(device) -> bool:
    return triton_status(device)[0]


def triton_path(num_tokens: int, top_k: int, num_experts: int, *, needs_grad: bool = False,
                hidden_size: int | None = None) -> str:
    """Which kernels the triton backend runs for this many tokens, in words."""
    if not needs_grad and uses_decode_path(num_tokens, top_k, num_experts, hidden_size):
        return "decode: 2 token-major GEMV kernels, no sort, k summed in registers"
    path = "sorted: sort + 2 grouped-tile kernels (gather and activation fused), k rows summed by one streaming kernel"
    if needs_grad:
        path += ("; backward: down + activation backward + d top_k_weights in one kernel, dX (k rows summed), "
                 "dW_gate_up and dW_down as per-expert grouped GEMMs")
    return path


def _runnable_weights(experts, hidden_states):
    """The module's expert weights, once the kernels are known to run here on this dtype (else a clear error)."""
    runs, why = _status_for(hidden_states.device.type)
    if not runs:
        raise TritonUnavailableError(f"the triton backend cannot run here: {why}")
    if hidden_states.dtype not in _KERNEL_DTYPES:
        raise BackendInputError(f"the triton backend runs bfloat16/float16/float32, got {hidden_states.dtype}")
    return expert_weights(experts)


def triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights, *, plan: LaunchPlan | None = None):
    """hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H].

    `plan` replaces the launch plan `launch_plan` would choose (the tuning tools pass theirs)."""
    num_tokens, hidden = hidden_states.shape  # [T, H]
    top_k = top_k_index.shape[1]
    weights = _runnable_weights(experts, hidden_states)  # gate_up [E, 2I, H], down [E, H, I]
    # The kernels index the routing tensors as flat [S] arrays: a strided view (w[:, ::2]) is copied.
    top_k_index, top_k_weights = top_k_index.contiguous(), top_k_weights.contiguous()
    grad = needs_grad(experts, hidden_states, top_k_weights)
    if plan is None:
        plan = launch_plan(num_tokens, top_k, weights.num_experts, hidden, weights.intermediate_size,
                           hidden_states.dtype, interpreted=interpreting_cached(), needs_grad=grad,
                           transposed=weights_transposed(weights.gate_up))
    activation = fused_activation(experts)
    if grad:
        return experts_forward_with_grad(experts, weights, hidden_states, top_k_index, top_k_weights, activation,
                                         plan)
    if num_tokens * top_k == 0:
        return hidden_states.new_zeros(num_tokens, hidden)
    if torch.compiler.is_compiling():
        return compiled_inference_forward(experts, weights, hidden_states, top_k_index, top_k_weights, activation,
                                          plan)
    if plan.decode:
        return decode_forward(experts, weights, hidden_states, top_k_index, top_k_weights, activation, plan)
    return sorted_forward(experts, weights, hidden_states, top_k_index, top_k_weights, activation, plan)


def triton_partial_forward(experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The spec's `partial_forward`: [N, H], [N, k] ids where an id >= num_experts means "not here", [N, k] ->
    [N, H]. It is the sorted path of the forward: the sort puts an absent slot's pair after every expert, where no
    GEMM reaches it, and the top-k sums (the output's, and dX's in the backward) skip it, so it costs nothing and
    contributes nothing; its routing-weight gradient is 0. It trains like the forward. Never the decode path,
    whose kernels would index the absent id (why they do not skip it: docs/performance_notes.md)."""
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[1]
    weights = _runnable_weights(experts, hidden_states)  # gate_up [E, 2I, H], down [E, H, I]
    # Planned for all N*k slots though only the present ones run: the tiles follow rows per expert, which
    # this overstates by the share of absent slots (a tile choice, never a result).
    plan = launch_plan(num_tokens, top_k, weights.num_experts, hidden, weights.intermediate_size,
                       hidden_states.dtype, interpreted=interpreting_cached(),
                       needs_grad=needs_grad(experts, hidden_states, top_k_weights),
                       transposed=weights_transposed(weights.gate_up))
    if plan.decode:
        plan = dataclasses.replace(plan, decode=False)
    return triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights, plan=plan)


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
    that is exactly what the kernel fuses, so it does not count. Read from the class, where transformers puts
    it: a plain function, which dynamo reads the same as Python does (through the bound method, torch 2.11's
    dynamo answered "own gate" for transformers' default, so compiled models left the fused path)."""
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is None:
        return False
    return not (getattr(gate, "__name__", "") == "_default_apply_gate"
                and getattr(gate, "__module__", "").startswith("transformers."))


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
    return yes(why, slow=interpreting())


_ON_THE_GPU = "the sort, the counts and the tile schedule stay on the GPU: nothing is read on the host"

SPEC = BackendSpec(
    name="triton",
    forward=triton_experts_forward,
    summary="fused Triton kernels: one sort, gate_up with the gather and activation fused, down with the "
            "routing weight and un-permute fused, a streaming top-k sum",
    runs=_runs,
    autograd=yes("fused backward kernels (triton_autograd): gradients of the hidden states, both weights (and "
                 "biases), the routing weights; sync-free"),
    cuda_graph=yes(_ON_THE_GPU),
    fullgraph=yes("its launches trace: the run mode and the device facts are constants to dynamo"),
    sync_free=yes(_ON_THE_GPU),
    builtin=True,
    partial_forward=triton_partial_forward,
)
